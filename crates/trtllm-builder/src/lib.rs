//! Builder of trtllm-rs: reads a checkpoint (a Hugging Face directory or a GGUF file), maps its
//! family onto the one decoder the runtime runs, rearranges the weights into the layout the
//! kernels read (QKV and gate/up fused, `[out × in]` rows, chosen storage type) and serialises
//! an engine directory.
//!
//! Architecture invariant: a model family is data — a config mapping ([`hf_config`], [`gguf`])
//! and a table of weight names ([`family`]) — never a copy of the decoder.

mod build;
mod calibrate;
mod checkpoint;
mod error;
pub mod family;
pub mod gguf;
mod gguf_spm;
pub mod gguf_tokenizer;
pub mod hf_config;
mod hf_rope;
mod matrices;
pub mod prequant;
mod shard;
pub mod tokenizer_json;

pub use build::{build, BuildProgress};
pub use checkpoint::{Checkpoint, Tensor};
pub use error::BuildError;
pub use trtllm_runtime as runtime;
pub use trtllm_runtime::BuildConfig;

pub type Result<T> = std::result::Result<T, BuildError>;
