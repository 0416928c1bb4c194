//! What a caller submits and what it gets back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Select};
use trtllm_builder::runtime::{GenerationOutput, GenerationParams, SampledToken, TokenLogprobs};

use crate::{ExecutorError, RequestStats, Result};

/// Per-request control of each step's logits before sampling (a grammar's token mask, a
/// caller's own processor). `process` sees the logits of the next position, given the output
/// so far, and may change them; the token then sampled goes to `accept`. An error fails this
/// request alone.
pub trait LogitsProcessor: Send {
    /// Work that needs only the output so far (a grammar's token mask), done while the model
    /// computes the step's logits, on another thread; its errors surface from `process`.
    fn prepare(&mut self, _output: &[u32]) {}
    fn process(&mut self, output: &[u32], logits: &mut [f32]) -> std::result::Result<(), String>;
    fn accept(&mut self, token: u32) -> std::result::Result<(), String>;
}

#[derive(Clone, Debug)]
pub struct GenerationRequest {
    pub prompt_token_ids: Vec<u32>,
    pub params: GenerationParams,
    /// The caller's own identifier, echoed back untouched.
    pub client_id: Option<u64>,
    /// The LoRA adapter the request runs with (none: the base model).
    pub lora: Option<crate::LoraRequest>,
}

/// One step of a request's life as the engine loop reports it.
#[derive(Debug)]
pub enum RequestEvent {
    /// Tokens produced since the last event (one per step), with their log-probabilities when
    /// the request asked for them.
    Tokens(Vec<SampledToken>),
    /// The prompt's log-probabilities (`GenerationParams::prompt_logprobs`), once, before the
    /// first token.
    PromptLogprobs(Vec<TokenLogprobs>),
    Finished {
        output: GenerationOutput,
        stats: RequestStats,
    },
    Failed(ExecutorError),
}

impl RequestEvent {
    /// Whether the request ends with this event.
    pub fn is_last(&self) -> bool {
        matches!(
            self,
            RequestEvent::Finished { .. } | RequestEvent::Failed(_)
        )
    }
}

/// The handle of a submitted request: iterate it for streamed deltas, or `wait()` for the end.
pub struct GenerationResult {
    pub(crate) id: u64,
    pub(crate) client_id: Option<u64>,
    pub(crate) events: Receiver<RequestEvent>,
    pub(crate) cancel: Arc<AtomicBool>,
    pub(crate) done: bool,
}

impl GenerationResult {
    pub fn request_id(&self) -> u64 {
        self.id
    }

    pub fn client_id(&self) -> Option<u64> {
        self.client_id
    }

    /// Asks the engine to stop this request; it finishes with reason `cancelled`.
    pub fn abort(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// The next event, blocking; None once the request has finished.
    pub fn next_event(&mut self) -> Option<RequestEvent> {
        if self.done {
            return None;
        }
        let ev = self
            .events
            .recv()
            .unwrap_or(RequestEvent::Failed(ExecutorError::ShutDown));
        self.done = ev.is_last();
        Some(ev)
    }

    /// The next event of whichever unfinished request in `results` has one first, blocking, with
    /// its index; None once all have finished (how the `n` completions of one prompt, or every
    /// completion of a many-prompt request, are drained by one thread).
    pub fn next_of_any(mut results: Vec<&mut GenerationResult>) -> Option<(usize, RequestEvent)> {
        let live: Vec<usize> = (0..results.len()).filter(|&i| !results[i].done).collect();
        if live.is_empty() {
            return None;
        }
        let mut select = Select::new();
        for &i in &live {
            select.recv(&results[i].events);
        }
        let op = select.select();
        let i = live[op.index()];
        let ev = op
            .recv(&results[i].events)
            .unwrap_or(RequestEvent::Failed(ExecutorError::ShutDown));
        drop(select);
        results[i].done = ev.is_last();
        Some((i, ev))
    }

    /// Blocks until the request ends and returns its full output and stats.
    pub fn wait_with_stats(mut self) -> Result<(GenerationOutput, RequestStats)> {
        while let Some(ev) = self.next_event() {
            match ev {
                RequestEvent::Tokens(_) | RequestEvent::PromptLogprobs(_) => {}
                RequestEvent::Finished { output, stats } => return Ok((output, stats)),
                RequestEvent::Failed(e) => return Err(e),
            }
        }
        Err(ExecutorError::ShutDown)
    }

    /// Blocks until the request ends and returns its full output.
    pub fn wait(self) -> Result<GenerationOutput> {
        self.wait_with_stats().map(|(out, _)| out)
    }
}

/// Dropping the handle of an unfinished request cancels it, so its blocks go back at once
/// rather than when its next token finds nobody listening.
impl Drop for GenerationResult {
    fn drop(&mut self) {
        if !self.done {
            self.abort();
        }
    }
}

impl Iterator for GenerationResult {
    type Item = RequestEvent;

    fn next(&mut self) -> Option<RequestEvent> {
        self.next_event()
    }
}
