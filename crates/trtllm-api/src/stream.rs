//! `RequestStream`: the handle of one prompt's request (its `n` completions), yielding
//! detokenised deltas as the executor produces tokens.

use std::sync::Arc;

use trtllm_executor::runtime::{Beam, TokenLogprobs};
use trtllm_executor::{GenerationResult, RequestEvent};

use crate::completion::{to_logprob, CompletionState};
use crate::{ApiError, CompletionDelta, Logprob, RequestOutput, Result, Tokenizer};

/// Owns everything it needs (no borrow of the `LLM`), so a server can move it to another
/// thread. Dropping it cancels whatever has not finished.
pub struct RequestStream {
    pub(crate) tokenizer: Option<Arc<Tokenizer>>,
    pub(crate) results: Vec<GenerationResult>,
    pub(crate) states: Vec<CompletionState>,
    pub(crate) prompt: Option<String>,
    pub(crate) prompt_token_ids: Vec<u32>,
    pub(crate) prompt_logprobs: Option<Vec<Logprob>>,
    pub(crate) context_logits: Option<Vec<Vec<f32>>>,
    pub(crate) failed: bool,
    /// Deltas made and not yet returned: a beam search ends all its completions at once.
    pub(crate) queued: std::collections::VecDeque<CompletionDelta>,
    /// The last delta of each completion a stop string ended, held until the engine's end of
    /// it, which says how much of the prompt came from the prefix cache.
    pub(crate) held: Vec<Option<CompletionDelta>>,
}

impl RequestStream {
    /// The executor's id of the first completion.
    pub fn request_id(&self) -> u64 {
        self.results.first().map_or(0, |r| r.request_id())
    }

    /// The executor's ids of every completion, by index.
    pub fn request_ids(&self) -> Vec<u64> {
        self.results.iter().map(|r| r.request_id()).collect()
    }

    pub fn prompt_token_ids(&self) -> &[u32] {
        &self.prompt_token_ids
    }

    /// Cancels every completion; each then finishes with reason `cancelled`.
    pub fn abort(&self) {
        for r in &self.results {
            r.abort();
        }
    }

    /// The next delta of any completion, blocking; None once every completion has finished.
    /// A failure ends the stream (the other completions are cancelled).
    pub fn next_delta(&mut self) -> Option<Result<CompletionDelta>> {
        Self::next_of_any(std::slice::from_mut(self)).map(|(_, delta)| delta)
    }

    /// The next delta of any completion of any of `streams`, blocking, with the index of its
    /// stream: one thread drains a whole request of many prompts. None once all have ended.
    pub fn next_of_any(streams: &mut [RequestStream]) -> Option<(usize, Result<CompletionDelta>)> {
        loop {
            if let Some((s, d)) = streams
                .iter_mut()
                .enumerate()
                .find_map(|(s, stream)| stream.queued.pop_front().map(|d| (s, d)))
            {
                return Some((s, Ok(d)));
            }
            let ((s, c), event) = {
                let (keys, results): (Vec<_>, Vec<_>) = streams
                    .iter_mut()
                    .enumerate()
                    .filter(|(_, stream)| !stream.failed)
                    .flat_map(|(s, stream)| {
                        let results = stream.results.iter_mut().enumerate();
                        results.map(move |(c, r)| ((s, c), r))
                    })
                    .unzip();
                let (k, event) = GenerationResult::next_of_any(results)?;
                (keys[k], event)
            };
            if let Some(delta) = streams[s].on_event(c, event) {
                return Some((s, delta));
            }
        }
    }

    /// Turns completion `i`'s event into a delta; None when it adds nothing to show.
    fn on_event(&mut self, i: usize, event: RequestEvent) -> Option<Result<CompletionDelta>> {
        let tok = self.tokenizer.as_deref();
        let was_finished = self.states[i].is_finished();
        let (cached, ends) = match &event {
            RequestEvent::Finished { stats, .. } => (Some(stats.reused_tokens), true),
            RequestEvent::Failed(_) => (None, true),
            _ => (None, false),
        };
        if self.held[i].is_some() {
            // Ended by a stop string: of what the engine still sends about it, only its end
            // matters, completing the held delta with the cached-token count.
            let held = if ends { self.held[i].take() } else { None };
            return held.map(|d| {
                Ok(CompletionDelta {
                    cached_tokens: cached,
                    ..d
                })
            });
        }
        let delta = match event {
            RequestEvent::Tokens(t) => self.states[i].on_tokens(tok, &t),
            RequestEvent::PromptLogprobs(lps) => {
                let lps = prompt_logprobs(&self.prompt_token_ids, &lps);
                self.prompt_logprobs = Some(lps.clone());
                return Some(Ok(CompletionDelta {
                    index: i,
                    prompt_logprobs: Some(lps),
                    ..Default::default()
                }));
            }
            RequestEvent::Finished { output, .. } => {
                // A one-token prompt has none to send before the end.
                if let (None, Some(lps)) = (&self.prompt_logprobs, &output.prompt_logprobs) {
                    self.prompt_logprobs = Some(prompt_logprobs(&self.prompt_token_ids, lps));
                }
                if output.context_logits.is_some() {
                    self.context_logits.clone_from(&output.context_logits);
                }
                match &output.beams {
                    // One request gave every completion: the best `n` beams, by index.
                    Some(beams) => self.on_beams(beams),
                    None => self.states[i].on_finished(tok, &output),
                }
            }
            RequestEvent::Failed(e) => Err(ApiError::from(e)),
        };
        let delta = match delta {
            Ok(d) => CompletionDelta {
                cached_tokens: cached,
                ..d
            },
            Err(e) => {
                self.failed = true;
                self.abort();
                return Some(Err(e));
            }
        };
        if !was_finished && self.states[i].is_finished() && !ends {
            // A stop string ended it early: the engine need not go on, and its end (the
            // cancellation, a step away) brings the count of cached prompt tokens.
            self.results[i].abort();
            self.held[i] = Some(delta);
            return None;
        }
        let empty =
            delta.text.is_empty() && delta.token_ids.is_empty() && delta.finish_reason.is_none();
        (!empty).then_some(Ok(delta))
    }

    /// Completion `j` from beam `j`; the first's delta is returned, the others queued.
    fn on_beams(&mut self, beams: &[Beam]) -> Result<CompletionDelta> {
        let tok = self.tokenizer.as_deref();
        let mut deltas = Vec::with_capacity(self.states.len());
        for (j, state) in self.states.iter_mut().enumerate() {
            let beam = beams.get(j).ok_or_else(|| {
                ApiError::InvalidInput(format!(
                    "the beam search finished {} beams for {} completions",
                    beams.len(),
                    j + 1
                ))
            })?;
            deltas.push(state.on_beam(tok, beam)?);
        }
        let first = deltas.remove(0);
        self.queued.extend(deltas);
        Ok(first)
    }

    /// Everything produced so far, completions ordered by index.
    pub fn output(&self) -> RequestOutput {
        RequestOutput {
            request_id: self.request_id(),
            prompt: self.prompt.clone(),
            prompt_token_ids: self.prompt_token_ids.clone(),
            prompt_logprobs: self.prompt_logprobs.clone(),
            context_logits: self.context_logits.clone(),
            outputs: self.states.iter().map(CompletionState::output).collect(),
            finished: self.states.iter().all(CompletionState::is_finished),
        }
    }

    /// Waits for every completion and returns the whole output.
    pub fn collect(mut self) -> Result<RequestOutput> {
        while let Some(delta) = self.next_delta() {
            delta?;
        }
        Ok(self.output())
    }
}

/// The engine's prompt log-probabilities as `Logprob`s of prompt tokens 1.. .
fn prompt_logprobs(prompt: &[u32], lps: &[TokenLogprobs]) -> Vec<Logprob> {
    lps.iter()
        .zip(prompt.iter().skip(1))
        .map(|(lp, &id)| to_logprob(id, lp))
        .collect()
}

impl Iterator for RequestStream {
    type Item = Result<CompletionDelta>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_delta()
    }
}
