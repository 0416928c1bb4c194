//! `GenerationSession`: the autoregressive loop over one sequence — prefill, then sample and
//! decode one token at a time until a stop condition.

use std::ops::ControlFlow;

use crate::model::LogitsMode;
use crate::{ModelRunner, Result, Sampler, SamplingConfig};

#[derive(Clone, Debug, Default)]
pub struct GenerationParams {
    pub max_new_tokens: usize,
    pub sampling: SamplingConfig,
    /// Keep generating past the model's end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Extra token ids that end generation (included in the output).
    pub stop_token_ids: Vec<u32>,
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
    pub finish_reason: FinishReason,
}

pub struct GenerationSession<'a> {
    runner: &'a ModelRunner,
}

impl<'a> GenerationSession<'a> {
    pub fn new(runner: &'a ModelRunner) -> Self {
        Self { runner }
    }

    /// Generates after `prompt`, calling `on_token` with each new token as soon as it exists;
    /// `ControlFlow::Break` from it cancels the request.
    pub fn generate(
        &self,
        prompt: &[u32],
        params: &GenerationParams,
        mut on_token: impl FnMut(u32) -> ControlFlow<()>,
    ) -> Result<GenerationOutput> {
        self.runner.validate_prompt(prompt)?;
        let mut sampler = Sampler::new(params.sampling.clone())?;
        let budget = params
            .max_new_tokens
            .min(self.runner.max_seq_len() - prompt.len());
        let mut cache = self.runner.new_cache(prompt.len() + budget);
        let eos = &self.runner.model().eos_token_ids;
        let mut tokens = Vec::new();
        if budget == 0 {
            return Ok(GenerationOutput {
                tokens,
                finish_reason: FinishReason::Length,
            });
        }
        let mut logits = self.runner.forward(prompt, &mut cache, LogitsMode::Last)?;
        loop {
            let next = sampler.sample(&logits);
            tokens.push(next);
            if on_token(next).is_break() {
                return Ok(GenerationOutput {
                    tokens,
                    finish_reason: FinishReason::Cancelled,
                });
            }
            let stop = (!params.ignore_eos && eos.contains(&next))
                || params.stop_token_ids.contains(&next);
            if stop {
                return Ok(GenerationOutput {
                    tokens,
                    finish_reason: FinishReason::Stop,
                });
            }
            if tokens.len() >= budget {
                return Ok(GenerationOutput {
                    tokens,
                    finish_reason: FinishReason::Length,
                });
            }
            logits = self.runner.forward(&[next], &mut cache, LogitsMode::Last)?;
        }
    }
}
