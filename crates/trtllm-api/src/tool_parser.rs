//! Tool calls read back out of generated text, as it streams. Models write calls in their
//! family's format (Hermes/Qwen `<tool_call>{json}</tool_call>`, Llama 3 bare JSON, Mistral
//! `[TOOL_CALLS][...]`); a forced choice writes the JSON its grammar allows. The whole text is
//! rescanned at each delta and only what is settled is handed out: text that may still turn
//! out to open a call is held back, and a call leaves only once its JSON is complete.

use std::ops::Range;

use serde_json::Value;

use crate::{ApiError, Result, ToolCall};

/// How a model writes its tool calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolParser {
    /// `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number, between text
    /// (Hermes, Qwen 2.5/3, SmolLM3).
    Hermes,
    /// The whole answer is `{"name": ..., "parameters": {...}}` (`;`-separated for several),
    /// optionally after `<|python_tag|>` (Llama 3.1–3.3).
    Llama3Json,
    /// `[TOOL_CALLS]` then a JSON array of calls, or `name[ARGS]{...}` (Mistral).
    Mistral,
}

impl ToolParser {
    pub const NAMES: &'static str = "hermes, llama3_json, mistral";

    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "hermes" | "qwen" => Ok(Self::Hermes),
            "llama3_json" | "llama3" => Ok(Self::Llama3Json),
            "mistral" => Ok(Self::Mistral),
            other => Err(ApiError::InvalidInput(format!(
                "tool-call parser '{other}' is not one of {}",
                Self::NAMES
            ))),
        }
    }

    /// The format a chat template teaches, from the markers it writes.
    pub fn detect(template: &str) -> Option<Self> {
        if template.contains("<tool_call>") {
            Some(Self::Hermes)
        } else if template.contains("[TOOL_CALLS]") {
            Some(Self::Mistral)
        } else if template.contains("<|python_tag|>") || template.contains("ipython") {
            Some(Self::Llama3Json)
        } else {
            None
        }
    }

    /// Whether the format's marker is a special token, which the text must keep to be parsed.
    pub fn needs_special_tokens(self) -> bool {
        matches!(self, Self::Llama3Json | Self::Mistral)
    }
}

/// How a completion's text becomes tool calls.
#[derive(Clone, Debug, PartialEq)]
pub enum ToolMode {
    /// The model chose freely; its calls are parsed from its text.
    Auto(ToolParser),
    /// A grammar forced a JSON array of `{"name", "arguments"}` objects.
    Required,
    /// A grammar forced this function's arguments object.
    Named(String),
}

/// What one delta of generated text adds to a message.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ToolDelta {
    pub content: String,
    pub calls: Vec<ToolCallDelta>,
}

/// A tool call's part of a stream chunk: the first names it (id and name), later ones add to
/// its arguments.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCallDelta {
    pub index: usize,
    pub id: Option<String>,
    pub name: Option<String>,
    pub arguments: String,
}

/// One completion's text, turned into content and tool calls as it streams.
pub struct ToolCallStream {
    mode: ToolMode,
    text: String,
    /// Bytes of content handed out.
    content_sent: usize,
    content: String,
    calls: Vec<ToolCall>,
    /// Calls past this many are dropped (`parallel_tool_calls: false`).
    max_calls: usize,
}

impl ToolCallStream {
    pub fn new(mode: ToolMode) -> Self {
        Self {
            mode,
            text: String::new(),
            content_sent: 0,
            content: String::new(),
            calls: Vec::new(),
            max_calls: usize::MAX,
        }
    }

    /// Keeps only the first `n` calls.
    pub fn limit(mut self, n: usize) -> Self {
        self.max_calls = n;
        self
    }

    /// Takes more generated text; returns what became settled.
    pub fn push(&mut self, text: &str) -> ToolDelta {
        self.text.push_str(text);
        self.advance(false)
    }

    /// The text has ended: everything left is settled.
    pub fn finish(&mut self) -> ToolDelta {
        self.advance(true)
    }

    pub fn mode(&self) -> &ToolMode {
        &self.mode
    }

    /// The message's content: the text that is not a call.
    pub fn content(&self) -> &str {
        &self.content
    }

    pub fn calls(&self) -> &[ToolCall] {
        &self.calls
    }

    fn advance(&mut self, done: bool) -> ToolDelta {
        if let ToolMode::Named(name) = &self.mode {
            return self.advance_named(name.clone());
        }
        let scan = match &self.mode {
            ToolMode::Auto(ToolParser::Hermes) => hermes(&self.text, done),
            ToolMode::Auto(ToolParser::Llama3Json) => llama3(&self.text, done),
            ToolMode::Auto(ToolParser::Mistral) => mistral(&self.text, done),
            _ => required(&self.text, done),
        };
        let mut delta = ToolDelta::default();
        let mut content_seen = 0;
        let mut calls_seen = 0;
        for segment in scan.segments {
            match segment {
                Segment::Content(r) => {
                    let r = r.start..r.end.min(scan.settled).max(r.start);
                    let piece = &self.text[r.clone()];
                    let new_from = self.content_sent.saturating_sub(content_seen);
                    if new_from < piece.len() {
                        delta.content.push_str(&piece[new_from..]);
                    }
                    content_seen += r.len();
                }
                Segment::Call(name, arguments) => {
                    if calls_seen == self.calls.len() && calls_seen < self.max_calls {
                        let call = ToolCall::new(name, arguments);
                        delta.calls.push(ToolCallDelta {
                            index: calls_seen,
                            id: Some(call.id.clone()),
                            name: Some(call.name.clone()),
                            arguments: call.arguments.clone(),
                        });
                        self.calls.push(call);
                    }
                    calls_seen += 1;
                }
            }
        }
        self.content_sent += delta.content.len();
        self.content.push_str(&delta.content);
        delta
    }

    /// A named function's arguments stream as they come: the call opens at the first text.
    fn advance_named(&mut self, name: String) -> ToolDelta {
        let args = self.text.trim_start();
        let mut delta = ToolDelta::default();
        if args.is_empty() {
            return delta;
        }
        if self.calls.is_empty() {
            let call = ToolCall::new(name, String::new());
            delta.calls.push(ToolCallDelta {
                index: 0,
                id: Some(call.id.clone()),
                name: Some(call.name.clone()),
                arguments: String::new(),
            });
            self.calls.push(call);
        }
        let call = &mut self.calls[0];
        let new = args[call.arguments.len()..].to_string();
        call.arguments.push_str(&new);
        match delta.calls.first_mut() {
            Some(d) => d.arguments = new,
            None if !new.is_empty() => delta.calls.push(ToolCallDelta {
                index: 0,
                id: None,
                name: None,
                arguments: new,
            }),
            None => {}
        }
        delta
    }
}

enum Segment {
    Content(Range<usize>),
    Call(String, String),
}

/// A parse of the whole text so far: content ranges and complete calls, in order; nothing at
/// or past `settled` may be handed out yet.
#[derive(Default)]
struct Scan {
    segments: Vec<Segment>,
    settled: usize,
}

impl Scan {
    fn content(&mut self, r: Range<usize>) {
        if !r.is_empty() {
            self.segments.push(Segment::Content(r));
        }
    }

    /// Takes the text from `pos` up to the next `marker` as content and returns where the
    /// marker starts; None once no marker follows (the rest taken as content, but for a tail
    /// that may be the marker arriving).
    fn next_marker(&mut self, text: &str, pos: usize, marker: &str, done: bool) -> Option<usize> {
        let Some(at) = text[pos..].find(marker).map(|i| pos + i) else {
            let arriving = if done {
                0
            } else {
                partial_marker(&text[pos..], marker)
            };
            self.content(pos..text.len() - arriving);
            self.settled = text.len() - arriving;
            return None;
        };
        self.content(pos..at);
        self.settled = at;
        Some(at)
    }

    /// Everything from `from` on is plain text.
    fn rest_is_content(mut self, text: &str, from: usize) -> Self {
        self.content(from..text.len());
        self.settled = text.len();
        self
    }
}

enum Json {
    /// A value and the bytes it took (leading whitespace included).
    Done(Value, usize),
    Partial,
    Bad,
}

fn json_at(s: &str) -> Json {
    let mut values = serde_json::Deserializer::from_str(s).into_iter::<Value>();
    match values.next() {
        Some(Ok(v)) => Json::Done(v, values.byte_offset()),
        Some(Err(e)) if e.is_eof() => Json::Partial,
        None => Json::Partial,
        Some(Err(_)) => Json::Bad,
    }
}

/// A call object: `name` and its `arguments` (or Llama's `parameters`) object, which may also
/// come as a string holding the object.
fn call_of(v: &Value) -> Option<(String, String)> {
    let name = v.get("name")?.as_str()?.to_string();
    let args = match v.get("arguments").or_else(|| v.get("parameters")) {
        None => "{}".to_string(),
        Some(a @ Value::Object(_)) => a.to_string(),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(a @ Value::Object(_)) => a.to_string(),
            _ => return None,
        },
        Some(_) => return None,
    };
    Some((name, args))
}

/// Bytes at the end of `text` that `marker` starts with (a marker that may be arriving).
fn partial_marker(text: &str, marker: &str) -> usize {
    (1..marker.len().min(text.len() + 1))
        .rev()
        .find(|&k| {
            text.is_char_boundary(text.len() - k) && marker.starts_with(&text[text.len() - k..])
        })
        .unwrap_or(0)
}

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";

fn hermes(text: &str, done: bool) -> Scan {
    let mut s = Scan::default();
    let mut pos = 0;
    loop {
        let Some(at) = s.next_marker(text, pos, HERMES_OPEN, done) else {
            return s;
        };
        let body = at + HERMES_OPEN.len();
        let (call, after) = match json_at(&text[body..]) {
            Json::Done(v, n) => (call_of(&v), body + n),
            Json::Partial if !done => return s,
            _ => (None, text.len()),
        };
        let rest = text[after..].trim_start();
        let close_at = text.len() - rest.len();
        match call {
            Some((name, args)) if rest.starts_with(HERMES_CLOSE) => {
                s.segments.push(Segment::Call(name, args));
                pos = close_at + HERMES_CLOSE.len();
                s.settled = pos;
            }
            // The closing tag may be arriving, or the text ended without it.
            Some(_) if !done && HERMES_CLOSE.starts_with(rest) => return s,
            Some((name, args)) if done && rest.is_empty() => {
                s.segments.push(Segment::Call(name, args));
                s.settled = text.len();
                return s;
            }
            // Not a call: the block is text, through its closing tag if it has one.
            _ => match text[body..].find(HERMES_CLOSE) {
                Some(i) => {
                    pos = body + i + HERMES_CLOSE.len();
                    s.content(at..pos);
                    s.settled = pos;
                }
                None => return s.rest_is_content(text, at),
            },
        }
    }
}

const PYTHON_TAG: &str = "<|python_tag|>";

fn llama3(text: &str, done: bool) -> Scan {
    let mut s = Scan::default();
    let lead = text.len() - text.trim_start().len();
    let mut pos = lead;
    if text[pos..].starts_with(PYTHON_TAG) {
        pos += PYTHON_TAG.len();
    } else if !done && PYTHON_TAG.starts_with(&text[pos..]) {
        return s;
    }
    if !text[pos..].trim_start().starts_with('{') {
        return match text[pos..].trim().is_empty() && !done {
            true => s,
            false => s.rest_is_content(text, 0),
        };
    }
    loop {
        let (value, n) = match json_at(&text[pos..]) {
            Json::Done(v, n) => (Some(v), n),
            Json::Partial if !done => return s,
            _ => (None, 0),
        };
        let Some((name, args)) = value.as_ref().and_then(call_of) else {
            // Not a call: the text is an answer (from a call that did parse on, if any).
            let from = if s.segments.is_empty() { 0 } else { pos };
            return s.rest_is_content(text, from);
        };
        s.segments.push(Segment::Call(name, args));
        pos += n;
        s.settled = pos;
        let rest = text[pos..].trim_start();
        match rest.strip_prefix(';') {
            Some(_) => pos = text.len() - rest.len() + 1,
            None if rest.is_empty() => return s,
            None => return s.rest_is_content(text, pos),
        }
    }
}

const MISTRAL_CALLS: &str = "[TOOL_CALLS]";
const MISTRAL_ARGS: &str = "[ARGS]";

fn mistral(text: &str, done: bool) -> Scan {
    let mut s = Scan::default();
    let mut pos = 0;
    loop {
        let Some(at) = s.next_marker(text, pos, MISTRAL_CALLS, done) else {
            return s;
        };
        let body = at + MISTRAL_CALLS.len();
        let rest = text[body..].trim_start();
        let calls = if rest.starts_with('[') {
            // `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`
            match json_at(rest) {
                Json::Done(Value::Array(a), n) => a
                    .iter()
                    .map(call_of)
                    .collect::<Option<Vec<_>>>()
                    .map(|c| (c, text.len() - rest.len() + n)),
                Json::Partial if !done => return s,
                _ => None,
            }
        } else {
            // `[TOOL_CALLS]name[ARGS]{...}` (and `name{...}`)
            let split = rest.find(MISTRAL_ARGS).map(|i| (i, i + MISTRAL_ARGS.len()));
            let split = split.or_else(|| rest.find('{').map(|i| (i, i)));
            match split {
                Some((name_end, args_at)) => match json_at(&rest[args_at..]) {
                    Json::Done(args @ Value::Object(_), n) => {
                        let name = rest[..name_end].trim().to_string();
                        let end = text.len() - rest.len() + args_at + n;
                        (!name.is_empty()).then(|| (vec![(name, args.to_string())], end))
                    }
                    Json::Partial if !done => return s,
                    _ => None,
                },
                None if !done => return s,
                None => None,
            }
        };
        let Some((calls, end)) = calls else {
            return s.rest_is_content(text, at);
        };
        s.segments
            .extend(calls.into_iter().map(|(n, a)| Segment::Call(n, a)));
        pos = end;
        s.settled = end;
    }
}

/// The forced `[{"name": ..., "arguments": {...}}, ...]`; what does not parse (text cut off by
/// the token limit) is left as content.
fn required(text: &str, done: bool) -> Scan {
    let mut s = Scan::default();
    let rest = text.trim_start();
    if rest.is_empty() {
        return s;
    }
    if !rest.starts_with('[') {
        return s.rest_is_content(text, 0);
    }
    let mut pos = text.len() - rest.len() + 1;
    loop {
        let rest = text[pos..].trim_start();
        if rest.starts_with(']') {
            s.settled = text.len();
            return s;
        }
        let (value, n) = match json_at(rest) {
            Json::Done(v, n) => (v, n),
            Json::Partial if !done => return s,
            _ => return s.rest_is_content(text, text.len() - rest.len()),
        };
        let Some((name, args)) = call_of(&value) else {
            return s.rest_is_content(text, text.len() - rest.len());
        };
        s.segments.push(Segment::Call(name, args));
        pos = text.len() - rest.len() + n;
        s.settled = pos;
        let after = text[pos..].trim_start();
        if after.starts_with(',') {
            pos = text.len() - after.len() + 1;
        }
    }
}

#[cfg(test)]
#[path = "tool_parser_tests.rs"]
mod tests;
