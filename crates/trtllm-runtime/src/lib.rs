//! Runtime of trtllm-rs: opens a built engine ([`Session`]), runs the decoder over it
//! ([`ModelRunner`]) over a paged KV cache ([`KvPool`], [`KvCacheManager`]), and samples.
//!
//! Architecture invariants: the runtime never sees a request queue or text — it gets token ids
//! and limits and returns token ids and logits. Weights are read where the engine file is
//! memory-mapped; nothing copies them.

mod config;
mod cpu_backend;
#[cfg(feature = "cuda")]
mod cuda;
mod decoder;
mod device;
pub mod engine;
mod error;
mod generation;
mod kv_cache;
mod lora;
mod model;
pub mod parallel;
mod rope;
mod sampling;
mod session;
mod tuning;
mod weights;

pub use config::{Features, LocalRope, MlpKind, ModelConfig, MoeConfig, NormKind, PositionKind};
pub use device::Device;
pub use engine::{BuildConfig, EngineConfig, EngineWriter, ENGINE_FORMAT_VERSION};
pub use error::{panic_message, RuntimeError};
pub use generation::{
    Beam, BeamParams, EarlyStopping, FinishReason, GenerationOutput, GenerationParams, NeverTag,
};
pub use kv_cache::{
    block_hashes, BlockCopy, BlockId, GroupBudget, KvBudget, KvCache, KvCacheConfig, KvCacheEvent,
    KvCacheManager, KvCacheSummary, KvGroupSummary, KvGroups, KvPool, KvStorage, NO_BLOCK,
};
pub use lora::{LoraAdapter, LoraFactors, LoraModule, LoraWeights};
pub use model::{ActivationObserver, LogitsMode, SeqChunk};
pub use sampling::{
    argmax, token_logprobs, SampledToken, Sampler, SamplingConfig, TokenLogprobs, MAX_LOGPROBS,
    MIN_TEMPERATURE,
};
pub use session::{ModelRunner, Session};
pub use trtllm_quant as quant;
pub use trtllm_quant::kernels::cpu::RopeScaling;
pub use tuning::{TimingCache, TuneReport};

pub type Result<T> = std::result::Result<T, RuntimeError>;
