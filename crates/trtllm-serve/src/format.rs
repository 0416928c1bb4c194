//! The JSON of OpenAI's responses and stream chunks for the two endpoints.

use serde_json::{json, Map, Value};
use trtllm_api::{Logprob, StopReason, Tokenizer, ToolCallDelta};

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

    /// The non-streamed response.
    pub fn response(&self, tok: Option<&Tokenizer>, choices: &[ChoiceText], usage: Value) -> Value {
        let choices = choices
            .iter()
            .enumerate()
            .map(|(i, c)| self.choice(tok, i, c, false))
            .collect();
        let mut m = self.envelope(false, choices);
        m.insert("usage".into(), usage);
        Value::Object(m)
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

pub fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

/// A token's text as OpenAI shows it: the token decoded on its own.
fn token_text(tok: Option<&Tokenizer>, id: u32) -> String {
    tok.and_then(|t| t.decode(&[id], false).ok())
        .unwrap_or_else(|| format!("token_id:{id}"))
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
        let text = token_text(tok, id);
        json!({"token": text, "logprob": logprob, "bytes": text.as_bytes()})
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
