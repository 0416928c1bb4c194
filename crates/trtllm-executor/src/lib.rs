//! `GenerationExecutor`: accepts requests from any thread and serves them with in-flight
//! batching over a paged KV cache.
//!
//! Architecture invariants: the engine loop thread is the only owner of the model runner, the
//! KV pool and the KV-cache manager; callers talk to it through channels (jobs in, per-request
//! events out). The scheduler decides each step, the KV-cache manager owns blocks, the runner
//! executes. A request's failure is reported on its own handle and never stops the loop; a
//! request's blocks are back in the pool before its final event is sent.

mod active;
mod beam;
mod beam_request;
mod config;
mod dispatch;
mod draft_model;
mod engine_loop;
mod error;
mod executor;
mod lora;
mod request;
mod scheduler;
mod speculative;
mod stats;

pub use beam::{BeamConfig, BeamSearch};
pub use config::{CapacitySchedulerPolicy, ExecutorConfig, SchedulerConfig, TUNE_BUDGET};
pub use error::ExecutorError;
pub use executor::GenerationExecutor;
pub use lora::LoraRequest;
pub use request::{GenerationRequest, GenerationResult, LogitsProcessor, RequestEvent};
pub use speculative::{SpeculativeConfig, MAX_DRAFT_LEN};
pub use stats::{ExecutorLoad, IterationStats, RequestStats, SpeculativeTotals};
pub use trtllm_builder as builder;
pub use trtllm_builder::runtime;
pub use trtllm_builder::runtime::{Beam, BeamParams, EarlyStopping, NeverTag};

pub type Result<T> = std::result::Result<T, ExecutorError>;
