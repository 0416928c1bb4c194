//! Per-request generation settings, validated before a request reaches the executor.

use trtllm_executor::runtime::{BeamParams, EarlyStopping, GenerationParams, SamplingConfig};

use crate::{ApiError, GuidedDecoding, Result};

/// Most completions one request may ask for.
pub const MAX_N: usize = 128;
/// Most stop strings (and bad words) a request may give, and their longest, in bytes: each is
/// looked for in the text at every token.
pub const MAX_STOP_STRINGS: usize = 64;
pub const MAX_STOP_LEN: usize = 1024;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// End-of-sequence and stop tokens are not produced before this many tokens.
    pub min_tokens: usize,
    /// 0 is greedy.
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// In (0, 1]; 1 disables.
    pub top_p: f32,
    /// In [0, 1]; 0 disables.
    pub min_p: f32,
    /// Completion `i` of a request uses seed + i.
    pub seed: Option<u64>,
    /// > 0; 1 disables.
    pub repetition_penalty: f32,
    /// In [-2, 2].
    pub presence_penalty: f32,
    /// In [-2, 2].
    pub frequency_penalty: f32,
    /// Text that ends a completion; matched across token boundaries and left out of the text.
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// Completions per prompt.
    pub n: usize,
    /// Log-probabilities per output token: None none, Some(k) the chosen token's and the top k.
    pub logprobs: Option<usize>,
    /// The same for each prompt token after the first (`RequestOutput::prompt_logprobs`). The
    /// prompt is then computed whole, without a cached prefix.
    pub prompt_logprobs: Option<usize>,
    /// The logits at every prompt position (`RequestOutput::context_logits`); the prompt is
    /// then computed whole, like `prompt_logprobs`.
    pub return_context_logits: bool,
    /// The logits each output token was sampled from (`CompletionOutput::generation_logits`),
    /// as the model produced them.
    pub return_generation_logits: bool,
    /// Leave special tokens (e.g. `<|im_end|>`) out of the returned text.
    pub skip_special_tokens: bool,
    /// (token id, bias) added to that token's logit before sampling; biases in [−100, 100].
    pub logit_bias: Vec<(u32, f32)>,
    /// Structured output: what the text must match (a JSON schema, a regex, a grammar, a
    /// choice); each completion's tokens are limited to those that keep it matching.
    pub guided_decoding: Option<GuidedDecoding>,
    /// Words no completion may spell (vLLM's `bad_words`): the token that would complete one
    /// is banned wherever the output ends with the rest of its tokens.
    pub bad_words: Vec<String>,
    /// Beam search instead of sampling: the `n` best of `beam_width` beams, each completion
    /// with its `cumulative_logprob`. Sampling settings are refused beside it.
    pub use_beam_search: bool,
    /// Beams searched (default: `n`); at most the engine's `max_beam_width`.
    pub beam_width: Option<usize>,
    /// Beams are ranked by `cumulative_logprob / length^length_penalty` (transformers').
    pub length_penalty: f32,
    /// When the search stops: true, false or "never", as transformers.
    pub early_stopping: EarlyStopping,
    /// The LoRA adapter every completion runs with (none: the base model). vLLM and
    /// TensorRT-LLM pass it beside the sampling parameters; here it travels with them, so every
    /// entry point (generate, chat, streams) takes it.
    pub lora_request: Option<LoRARequest>,
}

/// A LoRA adapter for a request: a name, an id (requests with different ids never share cached
/// KV blocks; one id names one adapter) and a PEFT adapter directory.
pub type LoRARequest = trtllm_executor::LoraRequest;

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_tokens: 16,
            min_tokens: 0,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: None,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            n: 1,
            logprobs: None,
            prompt_logprobs: None,
            return_context_logits: false,
            return_generation_logits: false,
            skip_special_tokens: true,
            logit_bias: Vec::new(),
            guided_decoding: None,
            bad_words: Vec::new(),
            use_beam_search: false,
            beam_width: None,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::default(),
            lora_request: None,
        }
    }
}

fn invalid(field: &'static str, value: impl ToString, expected: &'static str) -> ApiError {
    ApiError::InvalidParam {
        field,
        value: value.to_string(),
        expected,
    }
}

impl SamplingParams {
    /// Checks every field; the sampling ranges are the runtime's own
    /// (`GenerationParams::validate`).
    pub fn validate(&self) -> Result<()> {
        if self.max_tokens == 0 {
            return Err(invalid("max_tokens", 0, "at least 1"));
        }
        if !(1..=MAX_N).contains(&self.n) {
            return Err(invalid("n", self.n, "between 1 and 128"));
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(invalid("stop", "\"\"", "non-empty strings"));
        }
        for (field, words) in [("stop", &self.stop), ("bad_words", &self.bad_words)] {
            if words.len() > MAX_STOP_STRINGS {
                return Err(invalid(
                    field,
                    format!("{} strings", words.len()),
                    "at most 64",
                ));
            }
            if let Some(w) = words.iter().find(|w| w.len() > MAX_STOP_LEN) {
                return Err(invalid(
                    field,
                    format!("a string of {} bytes", w.len()),
                    "strings of at most 1024 bytes",
                ));
            }
        }
        if self.bad_words.iter().any(|w| w.trim().is_empty()) {
            return Err(invalid("bad_words", "\"\"", "words that are not blank"));
        }
        self.validate_beam()?;
        self.to_generation(0).validate()?;
        Ok(())
    }

    /// Beam settings need `use_beam_search`; with it, `n` beams of at least `n`, and nothing
    /// that works on the text of a completion as it streams (stop strings, a grammar, bad
    /// words: the beams are only known at the end).
    fn validate_beam(&self) -> Result<()> {
        let d = Self::default();
        if !self.use_beam_search {
            let set = [
                ("beam_width", self.beam_width.is_some()),
                ("length_penalty", self.length_penalty != d.length_penalty),
                ("early_stopping", self.early_stopping != d.early_stopping),
            ];
            if let Some((field, _)) = set.into_iter().find(|s| s.1) {
                return Err(invalid(field, "set", "use_beam_search with it"));
            }
            return Ok(());
        }
        if self.beam_width.is_some_and(|w| w < self.n) {
            return Err(invalid(
                "beam_width",
                format!("{} with n = {}", self.beam_width.unwrap_or(0), self.n),
                "at least n",
            ));
        }
        let text_level = [
            ("stop", !self.stop.is_empty()),
            ("guided_decoding", self.guided_decoding.is_some()),
            ("bad_words", !self.bad_words.is_empty()),
        ];
        if let Some((field, _)) = text_level.into_iter().find(|s| s.1) {
            return Err(invalid(field, "set", "none with beam search"));
        }
        Ok(())
    }

    /// Completions submitted to the executor: one beam search for all `n`, else one each.
    pub(crate) fn requests(&self) -> usize {
        if self.use_beam_search {
            1
        } else {
            self.n
        }
    }

    /// The executor's parameters for completion `index` of a request.
    pub(crate) fn to_generation(&self, index: usize) -> GenerationParams {
        GenerationParams {
            max_new_tokens: self.max_tokens,
            min_tokens: self.min_tokens,
            sampling: SamplingConfig {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                seed: self.seed.map(|s| s.wrapping_add(index as u64)),
                repetition_penalty: self.repetition_penalty,
                presence_penalty: self.presence_penalty,
                frequency_penalty: self.frequency_penalty,
                logprobs: self.logprobs,
                logit_bias: self.logit_bias.clone(),
            },
            ignore_eos: self.ignore_eos,
            stop_token_ids: self.stop_token_ids.clone(),
            // The prompt is the same for every completion: the first computes its logprobs.
            prompt_logprobs: self.prompt_logprobs.filter(|_| index == 0),
            return_context_logits: self.return_context_logits && index == 0,
            return_generation_logits: self.return_generation_logits,
            beam: self.use_beam_search.then(|| BeamParams {
                width: self.beam_width.unwrap_or(self.n),
                length_penalty: self.length_penalty,
                early_stopping: self.early_stopping,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_values_name_the_field() {
        let d = SamplingParams::default;
        let e = SamplingParams { top_p: 1.5, ..d() }
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("top_p") && e.contains("1.5") && e.contains("(0, 1]"),
            "{e}"
        );
        for (p, field) in [
            (
                SamplingParams {
                    max_tokens: 0,
                    ..d()
                },
                "max_tokens",
            ),
            (
                SamplingParams {
                    temperature: -0.1,
                    ..d()
                },
                "temperature",
            ),
            (SamplingParams { n: 0, ..d() }, "n"),
            (SamplingParams { n: 129, ..d() }, "n"),
            (SamplingParams { min_p: -0.5, ..d() }, "min_p"),
            (
                SamplingParams {
                    stop: vec![String::new()],
                    ..d()
                },
                "stop",
            ),
            (
                SamplingParams {
                    stop: vec!["x".repeat(400); 10_000],
                    ..d()
                },
                "stop",
            ),
            (
                SamplingParams {
                    bad_words: vec!["y".repeat(2000)],
                    ..d()
                },
                "bad_words",
            ),
            (
                SamplingParams {
                    prompt_logprobs: Some(21),
                    ..d()
                },
                "prompt_logprobs",
            ),
            (
                SamplingParams {
                    min_tokens: 17,
                    ..d()
                },
                "min_tokens",
            ),
            (
                SamplingParams {
                    logprobs: Some(50),
                    ..d()
                },
                "logprobs",
            ),
            (
                SamplingParams {
                    frequency_penalty: 9.0,
                    ..d()
                },
                "frequency_penalty",
            ),
        ] {
            let e = p.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{field}: {e}");
        }
        assert!(d().validate().is_ok());
    }

    #[test]
    fn completions_of_a_seeded_request_get_distinct_seeds() {
        let p = SamplingParams {
            seed: Some(7),
            ..Default::default()
        };
        assert_eq!(p.to_generation(0).sampling.seed, Some(7));
        assert_eq!(p.to_generation(2).sampling.seed, Some(9));
    }
}
