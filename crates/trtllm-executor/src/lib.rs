//! `GenerationExecutor`: accepts requests from any thread, runs them on a worker thread that owns
//! the runtime, and streams each request's new tokens back through its [`GenerationResult`].
//!
//! Architecture invariant: the worker is the only owner of the model runner; callers and worker
//! talk through channels (requests in, events out). Requests run one at a time for now; a
//! request's failure is reported on its own result and never stops the worker.

mod error;
mod executor;
mod request;

pub use error::ExecutorError;
pub use executor::GenerationExecutor;
pub use request::{GenerationRequest, GenerationResult, RequestEvent};
pub use trtllm_builder as builder;
pub use trtllm_builder::runtime;

pub type Result<T> = std::result::Result<T, ExecutorError>;
