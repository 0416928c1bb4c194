//! Results in the shape of TensorRT-LLM's / vLLM's `RequestOutput`.

use serde::Serialize;

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CompletionOutput {
    pub index: usize,
    pub text: String,
    pub token_ids: Vec<u32>,
    pub cumulative_logprob: Option<f64>,
    pub logprobs: Option<Vec<f64>>,
    /// "stop", "length" or "cancelled"; None while unfinished.
    pub finish_reason: Option<String>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RequestOutput {
    pub request_id: u64,
    pub prompt: Option<String>,
    pub prompt_token_ids: Vec<u32>,
    pub outputs: Vec<CompletionOutput>,
    pub finished: bool,
}
