use thiserror::Error;

#[derive(Debug, Error)]
pub enum ExecutorError {
    #[error("the executor has shut down")]
    ShutDown,
    #[error(transparent)]
    Runtime(#[from] trtllm_builder::runtime::RuntimeError),
    #[error(transparent)]
    Build(#[from] trtllm_builder::BuildError),
}
