//! Compute kernels for trtllm-rs.
//!
//! Architecture invariant: this crate knows nothing of models, checkpoints or requests. It sees
//! slices of numbers and shapes; the layers above decide what they mean.
//!
//! The CPU kernels in [`cpu`] choose an AVX2+FMA path at run time when the processor has it and
//! fall back to portable scalar code otherwise; both produce the same results up to float
//! summation order. Work is split over all cores with rayon.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod error;
mod lora;

pub use error::KernelError;
pub use lora::{LoraBlock, LoraDims, LoraSegment};

pub type Result<T> = std::result::Result<T, KernelError>;
