use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum RuntimeError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("{path}: engine format version {found} is not supported (this build reads version {supported}); rebuild the engine with this version of trtllm")]
    FormatVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("engine has no tensor '{0}'")]
    MissingTensor(String),
    #[error("tensor '{name}': shape {got:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("invalid model config: {0}")]
    InvalidConfig(String),
    #[error("tensor '{name}' holds a non-finite value ({value}) at element {index}: the engine is corrupt; rebuild it")]
    NonFiniteTensor {
        name: String,
        index: usize,
        value: f32,
    },
    #[error("prompt has {len} tokens; this engine allows at most {max} ({limit})")]
    PromptTooLong {
        len: usize,
        max: usize,
        limit: &'static str,
    },
    #[error("prompt is empty")]
    EmptyPrompt,
    #[error("token id {id} is outside the vocabulary (size {vocab})")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("sampling parameter {field} = {value}: expected {expected}")]
    InvalidSampling {
        field: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("the KV cache asked for needs {need_gib:.1} GiB and this machine has {have_gib:.1} GiB: lower the pool (kv_cache.max_tokens, the CLI's --kv-cache-tokens)")]
    KvCacheTooLarge { need_gib: f64, have_gib: f64 },
    #[error("KV cache: {field} = {value}: expected {expected}")]
    InvalidKvConfig {
        field: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("KV cache exhausted: {needed} more blocks needed, {available} available")]
    OutOfKvBlocks { needed: usize, available: usize },
    #[error("device {0}")]
    InvalidDevice(String),
    #[error("parallel run: {0}")]
    Parallel(String),
    #[error("LoRA adapter {adapter}: {reason}")]
    Lora { adapter: String, reason: String },
    #[error(transparent)]
    Kernel(#[from] trtllm_quant::kernels::KernelError),
    #[error(transparent)]
    Quant(#[from] trtllm_quant::QuantError),
}

/// The message a caught panic carried (`panic!` with a literal or a formatted string), for
/// turning a panic in a step or a library into an error.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> Option<String> {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
}

impl RuntimeError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        RuntimeError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corrupt(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        RuntimeError::Corrupt {
            path: path.into(),
            message: message.into(),
        }
    }
}
