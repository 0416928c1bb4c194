//! The JSON of OpenAI's responses and stream chunks for the two endpoints.

use serde_json::{json, Map, Value};
use trtllm_api::{Logprob, StopReason, Tokenizer, ToolCallDelta};

use crate::generation::PromptInfo;

/// Which endpoint a generation answers: the shapes differ, the flow does not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

/// What one choice has produced (a whole response, or one chunk's worth).
#[derive(Clone, Debug, Default)]
pub struct ChoiceText {
    pub text: String,
    /// Calls made (whole in a response; their new parts in a chunk).
    pub tool_calls: Vec<ToolCallDelta>,
    pub logprobs: Vec<Logprob>,
    pub finish_reason: Option<String>,
    pub stop_reason: Option<StopReason>,
    /// Characters of this choice's text before `text` (completions' `text_offset`).
    pub offset: usize,
}

pub struct Formatter {
    pub endpoint: Endpoint,
    pub id: String,
    pub model: String,
    pub created: u64,
    pub want_logprobs: bool,
    /// Completions per prompt: choice `i` answers prompt `i / n`.
    pub n: usize,
}

impl Formatter {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Completions, _) => "text_completion",
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
        }
    }

    fn envelope(&self, chunk: bool, choices: Vec<Value>) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("id".into(), json!(self.id));
        m.insert("object".into(), json!(self.object(chunk)));
        m.insert("created".into(), json!(self.created));
        m.insert("model".into(), json!(self.model));
        m.insert("choices".into(), Value::Array(choices));
        m
    }

    /// The non-streamed response: completions echo their prompt when asked and carry its
    /// log-probabilities per choice; chat carries them beside the choices (vLLM's shapes).
    pub fn response(
        &self,
        tok: Option<&Tokenizer>,
        choices: &[ChoiceText],
        prompts: &[PromptInfo],
        usage: Value,
    ) -> Value {
        let choices = choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let prompt = prompts.get(i / self.n.max(1));
                let mut choice = match (self.endpoint, prompt) {
                    (Endpoint::Completions, Some(p)) if p.echo.is_some() => {
                        self.echoed_choice(tok, i, c, p)
                    }
                    _ => self.choice(tok, i, c, false),
                };
                if let (Endpoint::Completions, Some(p)) = (self.endpoint, prompt) {
                    choice["prompt_logprobs"] = prompt_logprobs(tok, p);
                }
                choice
            })
            .collect();
        let mut m = self.envelope(false, choices);
        if self.endpoint == Endpoint::Chat {
            let p = prompts
                .first()
                .map_or(Value::Null, |p| prompt_logprobs(tok, p));
            m.insert("prompt_logprobs".into(), p);
        }
        m.insert("usage".into(), usage);
        Value::Object(m)
    }

    /// A completion that begins with its prompt: the prompt's text, and its tokens (the first
    /// with no log-probability) before the completion's in `logprobs`.
    fn echoed_choice(
        &self,
        tok: Option<&Tokenizer>,
        index: usize,
        c: &ChoiceText,
        prompt: &PromptInfo,
    ) -> Value {
        let echo = prompt.echo.clone().unwrap_or_default();
        let mut shifted = c.clone();
        shifted.offset = echo.chars().count();
        let mut choice = self.choice(tok, index, &shifted, false);
        choice["text"] = json!(format!("{echo}{}", c.text));
        if self.want_logprobs {
            let lps = prompt.logprobs.as_deref().unwrap_or_default();
            let mut all = completion_logprobs(tok, &prompt_as_choice(prompt, lps));
            let rest = completion_logprobs(tok, &shifted);
            for k in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
                if let (Some(a), Some(b)) = (all[k].as_array_mut(), rest[k].as_array()) {
                    a.extend(b.iter().cloned());
                }
            }
            // The first prompt token has no context, hence no log-probability.
            all["token_logprobs"][0] = Value::Null;
            all["top_logprobs"][0] = Value::Null;
            choice["logprobs"] = all;
        }
        choice
    }

    /// One stream chunk for one choice; `usage` is null when the client asked for usage (the
    /// last chunk carries it) and absent otherwise.
    pub fn chunk(
        &self,
        tok: Option<&Tokenizer>,
        index: usize,
        c: &ChoiceText,
        with_usage: bool,
    ) -> Value {
        self.chunk_of(self.choice(tok, index, c, true), with_usage)
    }

    /// The chat stream's opening chunk: the assistant role, no content yet.
    pub fn role_chunk(&self, index: usize, with_usage: bool) -> Value {
        let choice = json!({"index": index, "delta": {"role": "assistant", "content": ""},
            "logprobs": null, "finish_reason": null});
        self.chunk_of(choice, with_usage)
    }

    fn chunk_of(&self, choice: Value, with_usage: bool) -> Value {
        let mut m = self.envelope(true, vec![choice]);
        if with_usage {
            m.insert("usage".into(), Value::Null);
        }
        Value::Object(m)
    }

    pub fn usage_chunk(&self, usage: Value) -> Value {
        let mut m = self.envelope(true, Vec::new());
        m.insert("usage".into(), usage);
        Value::Object(m)
    }

    fn choice(&self, tok: Option<&Tokenizer>, index: usize, c: &ChoiceText, chunk: bool) -> Value {
        let logprobs = if self.want_logprobs {
            match self.endpoint {
                Endpoint::Completions => completion_logprobs(tok, c),
                Endpoint::Chat => chat_logprobs(tok, &c.logprobs),
            }
        } else {
            Value::Null
        };
        let stop_reason = match &c.stop_reason {
            Some(StopReason::Text(s)) => json!(s),
            Some(StopReason::Token(t)) => json!(t),
            None => Value::Null,
        };
        let mut m = Map::new();
        m.insert("index".into(), json!(index));
        match (self.endpoint, chunk) {
            (Endpoint::Completions, _) => {
                m.insert("text".into(), json!(c.text));
            }
            (Endpoint::Chat, false) => {
                let mut message = json!({"role": "assistant", "content": c.text});
                if !c.tool_calls.is_empty() {
                    if c.text.is_empty() {
                        message["content"] = Value::Null;
                    }
                    message["tool_calls"] = tool_calls(&c.tool_calls);
                }
                m.insert("message".into(), message);
            }
            (Endpoint::Chat, true) => {
                let mut delta = Map::new();
                if !c.text.is_empty() {
                    delta.insert("content".into(), json!(c.text));
                }
                if !c.tool_calls.is_empty() {
                    delta.insert("tool_calls".into(), tool_calls(&c.tool_calls));
                }
                m.insert("delta".into(), Value::Object(delta));
            }
        }
        m.insert("logprobs".into(), logprobs);
        m.insert("finish_reason".into(), json!(c.finish_reason));
        m.insert("stop_reason".into(), stop_reason);
        Value::Object(m)
    }
}

/// OpenAI's `tool_calls` entries; a chunk's continuation of a call carries only its index and
/// the arguments' new text.
fn tool_calls(calls: &[ToolCallDelta]) -> Value {
    calls
        .iter()
        .map(|c| {
            let mut function = Map::new();
            if let Some(name) = &c.name {
                function.insert("name".into(), json!(name));
            }
            function.insert("arguments".into(), json!(c.arguments));
            let mut call = Map::new();
            call.insert("index".into(), json!(c.index));
            if let Some(id) = &c.id {
                call.insert("id".into(), json!(id));
                call.insert("type".into(), json!("function"));
            }
            call.insert("function".into(), Value::Object(function));
            Value::Object(call)
        })
        .collect()
}

/// The prompt's tokens as a choice's `logprobs` entries (the first with a placeholder).
fn prompt_as_choice(prompt: &PromptInfo, lps: &[Logprob]) -> ChoiceText {
    let first = prompt.ids.first().map(|&id| Logprob {
        token_id: id,
        logprob: 0.0,
        top: Vec::new(),
    });
    ChoiceText {
        logprobs: first.into_iter().chain(lps.iter().cloned()).collect(),
        ..ChoiceText::default()
    }
}

/// vLLM's `prompt_logprobs`: null for the first token, then for each token a map from token id
/// to its log-probability and text, holding the token and the most likely alternatives.
fn prompt_logprobs(tok: Option<&Tokenizer>, prompt: &PromptInfo) -> Value {
    let Some(lps) = &prompt.logprobs else {
        return Value::Null;
    };
    let entry =
        |id: u32, logprob: f32| json!({"logprob": logprob, "decoded_token": token_text(tok, id)});
    let rows = lps.iter().map(|lp| {
        let mut m = Map::new();
        m.insert(lp.token_id.to_string(), entry(lp.token_id, lp.logprob));
        for t in &lp.top {
            m.insert(t.token_id.to_string(), entry(t.token_id, t.logprob));
        }
        Value::Object(m)
    });
    std::iter::once(Value::Null).chain(rows).collect()
}

/// OpenAI's usage, with the prompt tokens served from the prefix cache as
/// `prompt_tokens_details.cached_tokens`.
pub fn usage(prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": { "cached_tokens": cached_tokens },
    })
}

/// A token's own bytes (part of a character, for some).
fn token_bytes(tok: Option<&Tokenizer>, id: u32) -> Option<Vec<u8>> {
    tok.and_then(|t| t.token_piece(id).ok())
}

/// A token's text as OpenAI shows it: its bytes as text, or, for a token that holds part of a
/// UTF-8 character, `bytes:` and their escapes (OpenAI's spelling), so distinct tokens never
/// share a text.
fn token_text(tok: Option<&Tokenizer>, id: u32) -> String {
    match token_bytes(tok, id).map(String::from_utf8) {
        Some(Ok(text)) => text,
        Some(Err(e)) => {
            let escaped: String = e.as_bytes().iter().map(|b| format!("\\x{b:02x}")).collect();
            format!("bytes:{escaped}")
        }
        None => format!("token_id:{id}"),
    }
}

/// The legacy completions shape: parallel arrays and a token → logprob map per position.
fn completion_logprobs(tok: Option<&Tokenizer>, c: &ChoiceText) -> Value {
    let mut offset = c.offset;
    let (mut tokens, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    for lp in &c.logprobs {
        let text = token_text(tok, lp.token_id);
        offsets.push(offset);
        offset += text.chars().count();
        tokens.push(text);
        lps.push(lp.logprob);
        let top: Map<String, Value> = lp
            .top
            .iter()
            .map(|t| (token_text(tok, t.token_id), json!(t.logprob)))
            .collect();
        tops.push(Value::Object(top));
    }
    json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

fn chat_logprobs(tok: Option<&Tokenizer>, logprobs: &[Logprob]) -> Value {
    let entry = |id: u32, logprob: f32| {
        let bytes = token_bytes(tok, id).unwrap_or_default();
        json!({"token": token_text(tok, id), "logprob": logprob, "bytes": bytes})
    };
    let content: Vec<Value> = logprobs
        .iter()
        .map(|lp| {
            let mut e = entry(lp.token_id, lp.logprob);
            e["top_logprobs"] = lp
                .top
                .iter()
                .map(|t| entry(t.token_id, t.logprob))
                .collect();
            e
        })
        .collect();
    json!({ "content": content })
}
