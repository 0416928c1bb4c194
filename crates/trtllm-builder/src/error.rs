use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum BuildError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error("{path}: missing field `{field}` (required for {arch})")]
    MissingField {
        path: PathBuf,
        field: String,
        arch: String,
    },
    #[error("{path}: field `{field}`: {message}")]
    InvalidField {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("{path}: unsupported architecture '{arch}' (supported: {supported})")]
    UnsupportedArchitecture {
        path: PathBuf,
        arch: String,
        supported: &'static str,
    },
    #[error("{path}: tensor '{name}' not found in the checkpoint")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor '{name}' has shape {got:?}, expected {expected:?}")]
    TensorShape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("invalid build config: {0}")]
    InvalidBuildConfig(String),
    #[error(transparent)]
    Runtime(#[from] trtllm_runtime::RuntimeError),
    #[error(transparent)]
    Quant(#[from] trtllm_runtime::quant::QuantError),
}

impl BuildError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        BuildError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn checkpoint(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        BuildError::Checkpoint {
            path: path.into(),
            message: message.into(),
        }
    }
}
