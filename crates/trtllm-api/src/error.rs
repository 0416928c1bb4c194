use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ApiError {
    #[error("{path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("invalid sampling parameter {field} = {value}: expected {expected}")]
    InvalidParam {
        field: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("{0}")]
    InvalidInput(String),
    #[error(transparent)]
    Executor(#[from] trtllm_executor::ExecutorError),
}

impl From<trtllm_executor::runtime::RuntimeError> for ApiError {
    fn from(e: trtllm_executor::runtime::RuntimeError) -> Self {
        ApiError::Executor(e.into())
    }
}

impl From<trtllm_executor::builder::BuildError> for ApiError {
    fn from(e: trtllm_executor::builder::BuildError) -> Self {
        ApiError::Executor(e.into())
    }
}
