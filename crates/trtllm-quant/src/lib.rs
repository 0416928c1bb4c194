//! Weight storage formats of trtllm-rs: the element types an engine stores weights in, how f32
//! values are encoded into them, how stored bytes are viewed as the slices the kernels read, and
//! the GGML block formats that GGUF checkpoints arrive in.
//!
//! Architecture invariant: this crate knows storage, not models. It never sees a layer name.

mod dtype;
mod error;
pub mod ggml;

pub use dtype::DType;
pub use error::QuantError;
pub use trtllm_kernels as kernels;

pub type Result<T> = std::result::Result<T, QuantError>;
