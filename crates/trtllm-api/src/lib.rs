//! The LLM API of trtllm-rs: [`LLM`] built from [`LlmArgs`], generation with
//! [`SamplingParams`] returning [`RequestOutput`]s, tokenization and chat templates.
//!
//! Architecture invariant: this crate turns text into token ids and back and shapes results;
//! every decision about running the model belongs to the executor below.

mod chat;
mod chat_tokens;
mod completion;
mod detokenizer;
mod error;
mod guided;
mod llm;
mod outputs;
mod processors;
mod sampling_params;
mod stream;
mod tokenizer;
mod tool_parser;
mod tools;

pub use chat::{template_roles, ChatMessage, ChatOptions, ChatTemplate, SpecialTokens};
pub use error::ApiError;
pub use guided::GuidedDecoding;
pub use llm::{cache_dir, LlmArgs, Perplexity, Prompt, LLM};
pub use outputs::{
    CompletionDelta, CompletionOutput, Logprob, RequestOutput, StopReason, TopLogprob,
};
pub use sampling_params::{LoRARequest, SamplingParams, MAX_N};
pub use stream::RequestStream;
pub use tokenizer::Tokenizer;
pub use tool_parser::{ToolCallDelta, ToolCallStream, ToolDelta, ToolMode, ToolParser};
pub use tools::{Tool, ToolCall, ToolChoice};
pub use trtllm_executor as executor;
pub use trtllm_executor::builder;
pub use trtllm_executor::runtime;
pub use trtllm_executor::runtime::EarlyStopping;

pub type Result<T> = std::result::Result<T, ApiError>;
