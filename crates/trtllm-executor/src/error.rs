use thiserror::Error;

#[derive(Debug, Error)]
pub enum ExecutorError {
    #[error("the executor has shut down")]
    ShutDown,
    #[error("executor config: {field} = {value}: expected 1..={max}")]
    InvalidConfig {
        field: &'static str,
        value: usize,
        max: usize,
    },
    #[error("request needs {needed} KV-cache blocks for its prompt and max_tokens, but the pool has {total}; raise the pool (kv_cache.max_tokens, the CLI's --kv-cache-tokens) or lower max_tokens")]
    RequestTooLarge { needed: usize, total: usize },
    /// A step failed or panicked; every request in it fails with this message.
    #[error("engine step failed: {0}")]
    Step(String),
    /// The request's own logits processor (its grammar, for structured output) failed; only
    /// this request fails.
    #[error("the request's logits processor failed: {0}")]
    LogitsProcessor(String),
    /// The draft model of speculative decoding cannot serve this target.
    #[error("draft model: {0}")]
    DraftModel(String),
    #[error(transparent)]
    Runtime(#[from] trtllm_builder::runtime::RuntimeError),
    #[error(transparent)]
    Build(#[from] trtllm_builder::BuildError),
}
