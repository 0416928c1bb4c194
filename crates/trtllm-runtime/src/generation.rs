//! What a generation asks for and how it ends; the loop itself is the executor's.

use serde::{Deserialize, Serialize};

use crate::{Result, RuntimeError, SamplingConfig, TokenLogprobs};

#[derive(Clone, Debug, Default)]
pub struct GenerationParams {
    pub max_new_tokens: usize,
    pub sampling: SamplingConfig,
    /// Keep generating past the model's end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Extra token ids that end generation (included in the output).
    pub stop_token_ids: Vec<u32>,
    /// End-of-sequence and stop tokens cannot be produced before this many tokens.
    pub min_tokens: usize,
    /// Log-probabilities of every prompt token after the first (given what precedes it), with
    /// this many most likely alternatives. The prompt is then computed whole: it reuses no
    /// cached prefix.
    pub prompt_logprobs: Option<usize>,
    /// The logits at every prompt position (TensorRT-LLM's `return_context_logits`); the
    /// prompt is then computed whole, like `prompt_logprobs`.
    pub return_context_logits: bool,
    /// The logits each generated token was sampled from, as the model produced them (before
    /// penalties, biases and logits processors).
    pub return_generation_logits: bool,
    /// Beam search instead of sampling (transformers' `num_beams`); `None` samples.
    pub beam: Option<BeamParams>,
}

/// A beam search: `width` beams, scored as transformers scores them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BeamParams {
    pub width: usize,
    /// Finished hypotheses score `sum_logprobs / length^length_penalty`.
    pub length_penalty: f32,
    pub early_stopping: EarlyStopping,
}

/// transformers' `early_stopping`: `true`, `false` or `"never"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EarlyStopping {
    /// `true`: stop as soon as `width` hypotheses are finished; `false` (the default): stop when
    /// the best running beam, scored at its current length, cannot beat the worst finished one.
    Bool(bool),
    /// `"never"`: as `false`, but a positive length penalty scores the running beam at the
    /// longest length it could reach.
    Never(NeverTag),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NeverTag {
    #[default]
    Never,
}

impl Default for EarlyStopping {
    fn default() -> Self {
        EarlyStopping::Bool(false)
    }
}

/// A finished beam: its new tokens (ending with the end-of-sequence token unless it ran to the
/// length limit), the sum of their log-probabilities, and that sum length-penalized (the score
/// beams are ranked by).
#[derive(Clone, Debug, PartialEq)]
pub struct Beam {
    pub tokens: Vec<u32>,
    pub cumulative_logprob: f32,
    pub score: f32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence or stop token was produced.
    Stop,
    /// max_new_tokens or the engine's max_seq_len was reached.
    Length,
    /// The caller asked to stop.
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

#[derive(Clone, Debug)]
pub struct GenerationOutput {
    pub tokens: Vec<u32>,
    /// One entry per token when `SamplingConfig::logprobs` asked for them.
    pub logprobs: Option<Vec<TokenLogprobs>>,
    /// One entry per prompt token after the first, when `prompt_logprobs` asked for them.
    pub prompt_logprobs: Option<Vec<TokenLogprobs>>,
    /// One vocabulary-wide row per prompt position, when `return_context_logits` asked.
    pub context_logits: Option<Vec<Vec<f32>>>,
    /// One vocabulary-wide row per generated token, when `return_generation_logits` asked.
    pub generation_logits: Option<Vec<Vec<f32>>>,
    /// Every finished beam of a beam search, best first (`tokens` is the best one's).
    pub beams: Option<Vec<Beam>>,
    pub finish_reason: FinishReason,
}

impl GenerationParams {
    pub fn validate(&self) -> Result<()> {
        self.sampling.validate()?;
        if let Some(k) = self.prompt_logprobs.filter(|&k| k > crate::MAX_LOGPROBS) {
            return Err(RuntimeError::InvalidSampling {
                field: "prompt_logprobs",
                value: k.to_string(),
                expected: "at most 20",
            });
        }
        if self.min_tokens > self.max_new_tokens {
            return Err(RuntimeError::InvalidSampling {
                field: "min_tokens",
                value: self.min_tokens.to_string(),
                expected: "at most max_tokens",
            });
        }
        match &self.beam {
            Some(b) => self.validate_beam(b),
            None => Ok(()),
        }
    }

    /// Beam search ranks continuations by log-probability: settings that shape or draw from
    /// the distribution have no meaning in it and are refused, never ignored.
    fn validate_beam(&self, b: &BeamParams) -> Result<()> {
        let bad = |field: &'static str, value: String, expected: &'static str| {
            Err(RuntimeError::InvalidSampling {
                field,
                value,
                expected,
            })
        };
        if b.width == 0 {
            return bad("beam_width", "0".into(), "at least 1");
        }
        if !b.length_penalty.is_finite() {
            return bad(
                "length_penalty",
                b.length_penalty.to_string(),
                "a finite number",
            );
        }
        let s = &self.sampling;
        let d = SamplingConfig::default();
        let not_with_beams = "its default with beam search";
        let checks: [(&'static str, bool, String); 11] = [
            (
                "temperature",
                s.temperature != d.temperature,
                s.temperature.to_string(),
            ),
            ("top_k", s.top_k != d.top_k, s.top_k.to_string()),
            ("top_p", s.top_p != d.top_p, s.top_p.to_string()),
            ("min_p", s.min_p != d.min_p, s.min_p.to_string()),
            ("seed", s.seed.is_some(), format!("{:?}", s.seed)),
            (
                "repetition_penalty",
                s.repetition_penalty != 1.0,
                s.repetition_penalty.to_string(),
            ),
            (
                "presence_penalty",
                s.presence_penalty != 0.0,
                s.presence_penalty.to_string(),
            ),
            (
                "frequency_penalty",
                s.frequency_penalty != 0.0,
                s.frequency_penalty.to_string(),
            ),
            (
                "logprobs",
                s.logprobs.is_some(),
                format!("{:?}", s.logprobs),
            ),
            (
                "logit_bias",
                !s.logit_bias.is_empty(),
                format!("{:?}", s.logit_bias),
            ),
            (
                "min_tokens",
                self.min_tokens > 0,
                self.min_tokens.to_string(),
            ),
        ];
        if let Some((field, _, value)) = checks.into_iter().find(|c| c.1) {
            return bad(field, value, not_with_beams);
        }
        if self.return_generation_logits {
            return bad("return_generation_logits", "true".into(), not_with_beams);
        }
        Ok(())
    }

    /// Tokens the sampler must not choose after `generated` tokens: the ones that would end
    /// the request before `min_tokens`.
    pub fn banned_tokens(&self, generated: usize, eos: &[u32]) -> Vec<u32> {
        if generated >= self.min_tokens {
            return Vec::new();
        }
        eos.iter().chain(&self.stop_token_ids).copied().collect()
    }

    /// How many tokens a request with a `prompt_len`-token prompt may generate.
    pub fn budget(&self, prompt_len: usize, max_seq_len: usize) -> usize {
        self.max_new_tokens
            .min(max_seq_len.saturating_sub(prompt_len))
    }

    /// The tokens that end a generation: the model's end-of-sequence ids `eos` (unless
    /// ignored) and the stop tokens.
    pub fn end_tokens(&self, eos: &[u32]) -> Vec<u32> {
        let eos = if self.ignore_eos { &[][..] } else { eos };
        eos.iter().chain(&self.stop_token_ids).copied().collect()
    }

    /// Whether generation ends after `tokens` (the output so far, newest last), and why.
    /// `eos` are the model's end-of-sequence ids; `budget` comes from [`Self::budget`].
    pub fn finish_reason(
        &self,
        tokens: &[u32],
        eos: &[u32],
        budget: usize,
    ) -> Option<FinishReason> {
        let last = tokens.last()?;
        if (!self.ignore_eos && eos.contains(last)) || self.stop_token_ids.contains(last) {
            Some(FinishReason::Stop)
        } else if tokens.len() >= budget {
            Some(FinishReason::Length)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_beats_length_and_ignore_eos_skips_eos_only() {
        let p = GenerationParams {
            max_new_tokens: 3,
            stop_token_ids: vec![7],
            ..Default::default()
        };
        assert_eq!(p.finish_reason(&[], &[2], 3), None);
        assert_eq!(p.finish_reason(&[1, 2], &[2], 3), Some(FinishReason::Stop));
        assert_eq!(
            p.finish_reason(&[1, 1, 7], &[2], 3),
            Some(FinishReason::Stop)
        );
        assert_eq!(
            p.finish_reason(&[1, 1, 1], &[2], 3),
            Some(FinishReason::Length)
        );
        let ignore = GenerationParams {
            ignore_eos: true,
            ..p
        };
        assert_eq!(ignore.finish_reason(&[2], &[2], 3), None);
        assert_eq!(
            ignore.finish_reason(&[7], &[2], 3),
            Some(FinishReason::Stop)
        );
        assert_eq!(ignore.budget(10, 12), 2);
    }

    #[test]
    fn min_tokens_bans_ending_tokens_until_reached() {
        let p = GenerationParams {
            max_new_tokens: 8,
            min_tokens: 2,
            stop_token_ids: vec![7],
            ..Default::default()
        };
        assert_eq!(p.banned_tokens(1, &[2]), [2, 7]);
        assert!(p.banned_tokens(2, &[2]).is_empty());
        assert!(p.validate().is_ok());
        assert!(GenerationParams { min_tokens: 9, ..p }.validate().is_err());
    }
}
