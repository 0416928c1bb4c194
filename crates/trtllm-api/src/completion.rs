//! One completion's progress as its tokens stream in: detokenised text, stop strings matched
//! across token boundaries, log-probabilities, and how it ended.

use trtllm_executor::runtime::{Beam, FinishReason, GenerationOutput, SampledToken, TokenLogprobs};

use crate::detokenizer::IncrementalDecoder;
use crate::{
    CompletionDelta, CompletionOutput, Logprob, Result, StopReason, Tokenizer, TopLogprob,
};

pub(crate) struct CompletionState {
    index: usize,
    decoder: IncrementalDecoder,
    stop: Vec<String>,
    /// Longest stop string minus one byte: how much text may still be the start of a match.
    holdback: usize,
    stop_token_ids: Vec<u32>,
    /// Tokens that end the completion (end-of-sequence unless ignored, stop tokens): never
    /// part of its text, as in vLLM, even when special tokens are kept.
    end_ids: Vec<u32>,
    text: String,
    /// Bytes of `text` already handed out in deltas.
    emitted: usize,
    token_ids: Vec<u32>,
    logprobs: Option<Vec<Logprob>>,
    cumulative_logprob: f64,
    /// Whether `cumulative_logprob` is known: log-probabilities were asked for, or a beam
    /// search gave it.
    has_cumulative: bool,
    generation_logits: Option<Vec<Vec<f32>>>,
    finish_reason: Option<String>,
    stop_reason: Option<StopReason>,
}

pub(crate) struct CompletionSpec<'a> {
    pub index: usize,
    pub stop: &'a [String],
    pub stop_token_ids: &'a [u32],
    /// The model's end-of-sequence ids, when they end the completion.
    pub eos_ids: &'a [u32],
    pub want_logprobs: bool,
    pub skip_special_tokens: bool,
}

impl CompletionState {
    pub fn new(spec: CompletionSpec) -> Self {
        Self {
            index: spec.index,
            decoder: IncrementalDecoder::new(spec.skip_special_tokens),
            stop: spec.stop.to_vec(),
            holdback: spec.stop.iter().map(String::len).max().unwrap_or(1) - 1,
            stop_token_ids: spec.stop_token_ids.to_vec(),
            end_ids: [spec.stop_token_ids, spec.eos_ids].concat(),
            text: String::new(),
            emitted: 0,
            token_ids: Vec::new(),
            logprobs: spec.want_logprobs.then(Vec::new),
            cumulative_logprob: 0.0,
            has_cumulative: spec.want_logprobs,
            generation_logits: None,
            finish_reason: None,
            stop_reason: None,
        }
    }

    pub fn is_finished(&self) -> bool {
        self.finish_reason.is_some()
    }

    /// Takes new tokens. Tokens that arrive after a stop string ended the completion (the
    /// engine had already produced them) are dropped.
    pub fn on_tokens(
        &mut self,
        tok: Option<&Tokenizer>,
        tokens: &[SampledToken],
    ) -> Result<CompletionDelta> {
        let mut delta = self.delta();
        if self.is_finished() {
            return Ok(delta);
        }
        for t in tokens {
            self.token_ids.push(t.id);
            delta.token_ids.push(t.id);
            if let (Some(all), Some(lp)) = (&mut self.logprobs, &t.logprobs) {
                let lp = to_logprob(t.id, lp);
                self.cumulative_logprob += lp.logprob as f64;
                all.push(lp.clone());
                delta.logprobs.push(lp);
            }
        }
        if let Some(tok) = tok {
            let ids: Vec<u32> = tokens
                .iter()
                .map(|t| t.id)
                .filter(|id| !self.end_ids.contains(id))
                .collect();
            let piece = self.decoder.push(tok, &ids, false)?;
            self.append_text(&piece);
        }
        self.take_text(&mut delta);
        Ok(delta)
    }

    /// The engine's final word on the completion (ignored if a stop string already ended it).
    pub fn on_finished(
        &mut self,
        tok: Option<&Tokenizer>,
        output: &GenerationOutput,
    ) -> Result<CompletionDelta> {
        let mut delta = self.delta();
        if let Some(rows) = &output.generation_logits {
            // A stop string may have cut the completion short of the engine's tokens.
            self.generation_logits = Some(rows[..rows.len().min(self.token_ids.len())].to_vec());
        }
        if self.is_finished() {
            return Ok(delta);
        }
        if let Some(tok) = tok {
            let piece = self.decoder.push(tok, &[], true)?;
            self.append_text(&piece);
        }
        if !self.is_finished() {
            let last = output.tokens.last().copied();
            self.stop_reason = match (output.finish_reason, last) {
                (FinishReason::Stop, Some(t)) if self.stop_token_ids.contains(&t) => {
                    Some(StopReason::Token(t))
                }
                _ => None,
            };
            self.finish_reason = Some(output.finish_reason.as_str().to_string());
        }
        self.take_text(&mut delta);
        Ok(delta)
    }

    /// One finished beam of a beam search as this completion, whole: its tokens, text and
    /// cumulative log-probability; it stopped if it ends with an end token, else ran out.
    pub fn on_beam(&mut self, tok: Option<&Tokenizer>, beam: &Beam) -> Result<CompletionDelta> {
        let mut delta = self.delta();
        self.token_ids.clone_from(&beam.tokens);
        delta.token_ids.clone_from(&beam.tokens);
        self.cumulative_logprob = beam.cumulative_logprob as f64;
        self.has_cumulative = true;
        if let Some(tok) = tok {
            let ids: Vec<u32> = beam
                .tokens
                .iter()
                .copied()
                .filter(|id| !self.end_ids.contains(id))
                .collect();
            let piece = self.decoder.push(tok, &ids, true)?;
            self.append_text(&piece);
        }
        let last = beam.tokens.last().copied();
        let stopped = last.filter(|t| self.end_ids.contains(t));
        self.stop_reason = stopped
            .filter(|t| self.stop_token_ids.contains(t))
            .map(StopReason::Token);
        let reason = match stopped {
            Some(_) => FinishReason::Stop,
            None => FinishReason::Length,
        };
        self.finish_reason = Some(reason.as_str().to_string());
        self.take_text(&mut delta);
        Ok(delta)
    }

    pub fn output(&self) -> CompletionOutput {
        CompletionOutput {
            index: self.index,
            text: self.text.clone(),
            token_ids: self.token_ids.clone(),
            cumulative_logprob: self.has_cumulative.then_some(self.cumulative_logprob),
            logprobs: self.logprobs.clone(),
            generation_logits: self.generation_logits.clone(),
            finish_reason: self.finish_reason.clone(),
            stop_reason: self.stop_reason.clone(),
        }
    }

    fn delta(&self) -> CompletionDelta {
        CompletionDelta {
            index: self.index,
            ..Default::default()
        }
    }

    /// Appends decoded text and ends the completion at the first stop string, which may have
    /// begun in text already seen (but not yet emitted: that much is always held back).
    fn append_text(&mut self, piece: &str) {
        if piece.is_empty() {
            return;
        }
        let from = floor_char_boundary(&self.text, self.text.len().saturating_sub(self.holdback));
        self.text.push_str(piece);
        let hit = self
            .stop
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|at| (from + at, s)))
            .min_by_key(|(at, _)| *at);
        if let Some((at, s)) = hit {
            self.stop_reason = Some(StopReason::Text(s.clone()));
            self.finish_reason = Some("stop".into());
            self.text.truncate(at);
        }
    }

    /// Length of the longest tail of the text that a stop string starts with (at most
    /// `holdback`, and on a character boundary).
    fn partial_stop_len(&self) -> usize {
        let t = &self.text;
        (1..=self.holdback.min(t.len()))
            .rev()
            .find(|&k| {
                t.is_char_boundary(t.len() - k)
                    && self
                        .stop
                        .iter()
                        .any(|s| s.as_bytes().starts_with(&t.as_bytes()[t.len() - k..]))
            })
            .unwrap_or(0)
    }

    /// Moves the text that can no longer be part of a stop string into `delta`: everything but
    /// the longest tail that is the beginning of some stop string.
    fn take_text(&mut self, delta: &mut CompletionDelta) {
        let end = if self.is_finished() {
            self.text.len()
        } else {
            self.text.len() - self.partial_stop_len()
        };
        if end > self.emitted {
            delta.text = self.text[self.emitted..end].to_string();
            self.emitted = end;
        }
        delta.finish_reason = self.finish_reason.clone();
        delta.stop_reason = self.stop_reason.clone();
    }
}

pub(crate) fn to_logprob(id: u32, lp: &TokenLogprobs) -> Logprob {
    Logprob {
        token_id: id,
        logprob: lp.logprob,
        top: lp
            .top
            .iter()
            .map(|&(token_id, logprob)| TopLogprob { token_id, logprob })
            .collect(),
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(stop: &[&str]) -> CompletionState {
        let stop: Vec<String> = stop.iter().map(|s| s.to_string()).collect();
        CompletionState::new(CompletionSpec {
            index: 0,
            stop: &stop,
            stop_token_ids: &[],
            eos_ids: &[],
            want_logprobs: false,
            skip_special_tokens: true,
        })
    }

    /// Feeds text pieces as if each came from one token; returns the streamed text.
    fn feed(s: &mut CompletionState, pieces: &[&str]) -> Vec<String> {
        pieces
            .iter()
            .map(|p| {
                let mut d = s.delta();
                if !s.is_finished() {
                    s.append_text(p);
                    s.take_text(&mut d);
                }
                d.text
            })
            .collect()
    }

    #[test]
    fn stop_string_split_over_tokens_is_found_and_never_streamed() {
        let mut s = state(&["\n\nUser:"]);
        let out = feed(&mut s, &["Hello", " world", "\n", "\nUs", "er:", " more"]);
        assert_eq!(out.concat(), "Hello world");
        assert_eq!(s.text, "Hello world");
        assert_eq!(s.finish_reason.as_deref(), Some("stop"));
        assert_eq!(s.stop_reason, Some(StopReason::Text("\n\nUser:".into())));
    }

    #[test]
    fn held_back_text_is_released_once_it_cannot_match() {
        let mut s = state(&["abc"]);
        let out = feed(&mut s, &["xa", "b", "d", "ab"]);
        // "xa" may start "abc": only "x" goes out; "ab" + "d" cannot, so it is released.
        assert_eq!(out, ["x", "", "abd", ""]);
        assert!(!s.is_finished());
        let mut d = s.delta();
        s.finish_reason = Some("length".into());
        s.take_text(&mut d);
        assert_eq!(d.text, "ab");
    }

    #[test]
    fn earliest_of_several_stop_strings_wins_and_multibyte_text_is_whole() {
        let mut s = state(&["é!", "b"]);
        let out = feed(&mut s, &["aé", "é", "!b"]);
        assert_eq!(out.concat(), "aé");
        assert_eq!(s.stop_reason, Some(StopReason::Text("é!".into())));
        for piece in out {
            assert!(std::str::from_utf8(piece.as_bytes()).is_ok());
        }
    }
}
