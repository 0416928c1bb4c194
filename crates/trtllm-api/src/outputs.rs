//! Results in the shape of TensorRT-LLM's / vLLM's `RequestOutput`, and the deltas a stream
//! yields.

use serde::Serialize;

/// A token's log-probability, with the most likely alternatives at that position.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Logprob {
    pub token_id: u32,
    pub logprob: f32,
    /// Most likely first.
    pub top: Vec<TopLogprob>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct TopLogprob {
    pub token_id: u32,
    pub logprob: f32,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CompletionOutput {
    pub index: usize,
    pub text: String,
    pub token_ids: Vec<u32>,
    /// Sum of the output tokens' log-probabilities, when `logprobs` was asked for.
    pub cumulative_logprob: Option<f64>,
    pub logprobs: Option<Vec<Logprob>>,
    /// The logits each token of `token_ids` was sampled from, one vocabulary-wide row per
    /// token, when `SamplingParams::return_generation_logits` asked (set when finished).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation_logits: Option<Vec<Vec<f32>>>,
    /// "stop", "length" or "cancelled"; None while unfinished.
    pub finish_reason: Option<String>,
    /// The stop string or stop token that ended the completion.
    pub stop_reason: Option<StopReason>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(untagged)]
pub enum StopReason {
    Text(String),
    Token(u32),
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RequestOutput {
    pub request_id: u64,
    pub prompt: Option<String>,
    pub prompt_token_ids: Vec<u32>,
    /// Log-probabilities of prompt tokens 1.. (entry `i` is token `i + 1`'s given those before
    /// it), when `SamplingParams::prompt_logprobs` asked for them.
    pub prompt_logprobs: Option<Vec<Logprob>>,
    /// The logits at every prompt position (row `i` predicts token `i + 1`), when
    /// `SamplingParams::return_context_logits` asked (set when completion 0 finishes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context_logits: Option<Vec<Vec<f32>>>,
    /// One per completion (`SamplingParams::n`), ordered by index.
    pub outputs: Vec<CompletionOutput>,
    pub finished: bool,
}

impl RequestOutput {
    /// Tokens generated over all completions.
    pub fn num_output_tokens(&self) -> usize {
        self.outputs.iter().map(|o| o.token_ids.len()).sum()
    }
}

/// What one completion of a streamed request produced since the last delta. Text is only ever
/// whole UTF-8 characters, and text that might still turn into a stop string is held back.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CompletionDelta {
    pub index: usize,
    pub text: String,
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<Logprob>,
    /// The prompt's log-probabilities (see `RequestOutput`), on one delta of completion 0
    /// before its first token.
    pub prompt_logprobs: Option<Vec<Logprob>>,
    /// Set on the completion's last delta.
    pub finish_reason: Option<String>,
    pub stop_reason: Option<StopReason>,
    /// Prompt tokens the completion's request found in the prefix cache instead of computing;
    /// set on its last delta.
    pub cached_tokens: Option<usize>,
}
