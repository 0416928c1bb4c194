//! One HTTP request's generation: its `RequestStream`s (one per prompt) drained on blocking
//! threads into a channel the async side reads, with per-choice accumulation, latency metrics
//! and cancellation when the request is dropped (the client went away).

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, watch};
use trtllm_api::{CompletionDelta, Logprob, RequestStream, ToolCallStream, ToolMode};

use crate::format::{usage, ChoiceText};
use crate::protocol::ToolCalls;
use crate::state::{Admission, AppState};
use crate::ServeError;

enum Item {
    /// A delta of the prompt at this position.
    Delta(usize, CompletionDelta),
    Failed(ServeError),
}

/// Cancels every completion of the request when dropped; a no-op for those that finished.
struct AbortGuard {
    state: Arc<AppState>,
    ids: Vec<u64>,
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        for &id in &self.ids {
            self.state.llm.executor().abort_request(id);
        }
    }
}

#[derive(Default)]
struct Choice {
    all: ChoiceText,
    tokens: usize,
    chars: usize,
    last_delta: Option<Instant>,
    /// Reads tool calls out of the text, when the request has tools.
    tools: Option<ToolCallStream>,
}

/// One prompt of the request: its ids, its text when echoed, its log-probabilities when asked.
#[derive(Clone, Debug, Default)]
pub struct PromptInfo {
    pub ids: Vec<u32>,
    pub echo: Option<String>,
    pub logprobs: Option<Vec<Logprob>>,
}

/// What a generation answers: its response id (for the request log), completions per prompt,
/// when it arrived, and how tool calls are read.
pub struct GenerationSpec {
    pub id: String,
    pub n: usize,
    pub arrived: Instant,
    pub tool_calls: Option<ToolCalls>,
    /// Prompts to echo (their text, None: decoded from their ids).
    pub echo: Option<Vec<Option<String>>>,
}

pub struct Generation {
    /// The response id, for the request log.
    id: String,
    rx: mpsc::Receiver<Item>,
    /// Set when open responses must fail (`AppState::fail_open_responses`).
    stop: watch::Receiver<Option<String>>,
    state: Arc<AppState>,
    n: usize,
    prompt_tokens: usize,
    /// Of them, the tokens found in the prefix cache (each prompt's first completion's).
    cached_tokens: usize,
    prompts: Vec<PromptInfo>,
    choices: Vec<Choice>,
    arrived: Instant,
    first_token: Option<Instant>,
    finished: bool,
    failed: bool,
    _guard: AbortGuard,
    _admission: Admission,
}

impl Drop for Generation {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Resolves with the reason once open responses must fail; never, if they need not.
async fn stopped(stop: &mut watch::Receiver<Option<String>>) -> String {
    // The reason is cloned out at once: the watch's borrow may not be held across an await.
    let why = stop.wait_for(Option::is_some).await.map(|w| w.clone());
    match why {
        Ok(why) => why.unwrap_or_default(),
        Err(_) => std::future::pending().await,
    }
}

impl Generation {
    pub fn start(spec: GenerationSpec, admission: Admission, streams: Vec<RequestStream>) -> Self {
        let GenerationSpec {
            id,
            n,
            arrived,
            tool_calls,
            echo,
        } = spec;
        let state = admission.state().clone();
        let (tx, rx) = mpsc::channel(256);
        let ids = streams
            .iter()
            .flat_map(RequestStream::request_ids)
            .collect();
        let prompt_tokens = streams.iter().map(|s| s.prompt_token_ids().len()).sum();
        let tok = state.llm.tokenizer().ok();
        let prompts = streams
            .iter()
            .enumerate()
            .map(|(p, s)| {
                let ids = s.prompt_token_ids().to_vec();
                let decoded = || tok.and_then(|t| t.decode(&ids, false).ok());
                let echo = echo
                    .as_ref()
                    .map(|e| e[p].clone().or_else(decoded).unwrap_or_default());
                PromptInfo {
                    ids,
                    echo,
                    logprobs: None,
                }
            })
            .collect();
        let choices = (0..streams.len() * n)
            .map(|_| Choice {
                tools: tool_calls.as_ref().map(|t| {
                    let s = ToolCallStream::new(t.mode.clone());
                    if t.parallel {
                        s
                    } else {
                        s.limit(1)
                    }
                }),
                ..Choice::default()
            })
            .collect();
        // One blocking thread drains every prompt's stream (it waits on the engine's
        // channels). Dropping the streams (when the receiver is gone) cancels their completions.
        tokio::task::spawn_blocking(move || {
            let mut streams = streams;
            while let Some((prompt, delta)) = RequestStream::next_of_any(&mut streams) {
                let (item, last) = match delta {
                    Ok(d) => (Item::Delta(prompt, d), false),
                    Err(e) => (Item::Failed(e.into()), true),
                };
                if tx.blocking_send(item).is_err() || last {
                    return;
                }
            }
        });
        Self {
            id,
            rx,
            stop: state.stopping(),
            _guard: AbortGuard {
                state: state.clone(),
                ids,
            },
            state,
            n,
            prompt_tokens,
            cached_tokens: 0,
            prompts,
            choices,
            arrived,
            first_token: None,
            finished: false,
            failed: false,
            _admission: admission,
        }
    }

    pub fn num_choices(&self) -> usize {
        self.choices.len()
    }

    /// The next delta as (choice index, what it adds); None once every choice has finished.
    pub async fn next(&mut self) -> Option<Result<(usize, ChoiceText), ServeError>> {
        loop {
            let item = tokio::select! {
                item = self.rx.recv() => item,
                why = stopped(&mut self.stop) => Some(Item::Failed(ServeError::Internal(why))),
            };
            return match item {
                None => {
                    self.finish();
                    None
                }
                Some(Item::Failed(e)) => {
                    self.failed = true;
                    Some(Err(e))
                }
                Some(Item::Delta(prompt, mut d)) => {
                    if let Some(lps) = d.prompt_logprobs.take() {
                        self.prompts[prompt].logprobs = Some(lps);
                        if d.token_ids.is_empty() && d.finish_reason.is_none() {
                            continue;
                        }
                    }
                    Some(Ok(self.observe(prompt * self.n + d.index, d)))
                }
            };
        }
    }

    /// The request's prompts, in order (choice `i` answers prompt `i / n`).
    pub fn prompts(&self) -> &[PromptInfo] {
        &self.prompts
    }

    fn observe(&mut self, index: usize, d: CompletionDelta) -> (usize, ChoiceText) {
        let now = Instant::now();
        if index.is_multiple_of(self.n.max(1)) {
            self.cached_tokens += d.cached_tokens.unwrap_or(0);
        }
        let metrics = &self.state.metrics;
        let c = &mut self.choices[index];
        if !d.token_ids.is_empty() {
            if self.first_token.is_none() {
                self.first_token = Some(now);
                metrics.ttft(now - self.arrived);
            }
            if let Some(prev) = c.last_delta {
                metrics.itl(now - prev);
            }
            c.last_delta = Some(now);
            c.tokens += d.token_ids.len();
        }
        let (text, tool_calls) = match &mut c.tools {
            None => (d.text, Vec::new()),
            Some(t) => {
                let mut out = t.push(&d.text);
                if d.finish_reason.is_some() {
                    let rest = t.finish();
                    out.content.push_str(&rest.content);
                    out.calls.extend(rest.calls);
                }
                (out.content, out.calls)
            }
        };
        // A completion that stopped after calls it chose to make ended for them (OpenAI's
        // reason); a forced named function ends as any completion does.
        let made_calls = c
            .tools
            .as_ref()
            .is_some_and(|t| !t.calls().is_empty() && !matches!(t.mode(), ToolMode::Named(_)));
        let finish_reason = match d.finish_reason {
            Some(r) if r == "stop" && made_calls => Some("tool_calls".to_string()),
            r => r,
        };
        if let Some(reason) = &finish_reason {
            metrics.finished(reason, 1);
        }
        let piece = ChoiceText {
            text,
            tool_calls,
            logprobs: d.logprobs,
            finish_reason,
            stop_reason: d.stop_reason,
            offset: c.chars,
        };
        c.chars += piece.text.chars().count();
        c.all.text.push_str(&piece.text);
        c.all.logprobs.extend(piece.logprobs.iter().cloned());
        for call in &piece.tool_calls {
            match c.all.tool_calls.get_mut(call.index) {
                Some(whole) => whole.arguments.push_str(&call.arguments),
                None => c.all.tool_calls.push(call.clone()),
            }
        }
        if piece.finish_reason.is_some() {
            c.all.finish_reason = piece.finish_reason.clone();
            c.all.stop_reason = piece.stop_reason.clone();
        }
        (index, piece)
    }

    fn finish(&mut self) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        // Choices still open when the generation is dropped early (the client went away):
        // the guard cancels them, nobody reads their last delta, so count them here.
        let open = self
            .choices
            .iter()
            .filter(|c| c.all.finish_reason.is_none())
            .count();
        let metrics = &self.state.metrics;
        metrics.finished("cancelled", open as u64);
        let e2e = self.arrived.elapsed();
        metrics.e2e(e2e);
        metrics.tokens(self.prompt_tokens, self.completion_tokens());
        metrics.cached_tokens(self.cached_tokens);
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        let ttft = self.first_token.map(|t| ms(t - self.arrived));
        let status = match (self.failed, open) {
            (true, _) => "failed".to_string(),
            (false, 0) => "ok".to_string(),
            (false, n) => format!("{n} of {} cancelled", self.choices.len()),
        };
        tracing::info!(
            "{}: {} prompt + {} completion tokens, TTFT {}, {:.1} ms, {status}",
            self.id,
            self.prompt_tokens,
            self.completion_tokens(),
            ttft.map_or("-".into(), |t| format!("{t:.1} ms")),
            ms(e2e),
        );
    }

    fn completion_tokens(&self) -> usize {
        self.choices.iter().map(|c| c.tokens).sum()
    }

    pub fn usage(&self) -> serde_json::Value {
        usage(
            self.prompt_tokens,
            self.completion_tokens(),
            self.cached_tokens,
        )
    }

    /// Everything each choice produced, by index.
    pub fn choices(&self) -> Vec<ChoiceText> {
        self.choices.iter().map(|c| c.all.clone()).collect()
    }
}
