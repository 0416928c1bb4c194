//! The chat request: messages (with tool calls and tool results), how the template renders
//! them, and the tools the model may call — `auto` read back by the template's parser,
//! `required` or a named function forced by a grammar over the functions' parameter schemas.

use serde::Deserialize;
use serde_json::{Map, Value};
use trtllm_api::{ChatMessage, ChatOptions, Tool, ToolCall, ToolChoice, ToolMode, ToolParser};

use crate::protocol::{
    check_unknown, count, no_prompt_logprobs_streamed, Parsed, SamplingFields, StreamOptions,
    ToolCalls,
};
use crate::state::AppState;
use crate::ServeError;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessageIn {
    pub role: String,
    pub content: Option<Content>,
    pub tool_calls: Option<Vec<Value>>,
    pub tool_call_id: Option<String>,
    pub name: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<ChatMessageIn>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<i64>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    #[serde(flatten)]
    pub template: TemplateFields,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// How a conversation is rendered (vLLM's fields, in the chat endpoint and /tokenize).
#[derive(Debug, Default, Deserialize)]
pub struct TemplateFields {
    pub tools: Option<Vec<Value>>,
    pub chat_template: Option<String>,
    pub chat_template_kwargs: Option<Map<String, Value>>,
    pub add_generation_prompt: Option<bool>,
    pub continue_final_message: Option<bool>,
    /// transformers' name: true (the default) reads special-token strings inside messages as
    /// text; false lets them be control tokens.
    pub split_special_tokens: Option<bool>,
}

impl TemplateFields {
    pub fn options(self) -> Result<ChatOptions, ServeError> {
        let continue_final = self.continue_final_message.unwrap_or(false);
        Ok(ChatOptions {
            add_generation_prompt: self.add_generation_prompt.unwrap_or(!continue_final),
            continue_final_message: continue_final,
            tools: tools(self.tools)?,
            template_kwargs: self.chat_template_kwargs.unwrap_or_default(),
            template: self.chat_template,
            special_tokens_in_content: !self.split_special_tokens.unwrap_or(true),
        })
    }
}

/// A conversation and how to render it.
pub struct ChatInput {
    pub messages: Vec<ChatMessage>,
    pub options: ChatOptions,
}

/// The roles every chat template is written for; a template may name more (`ipython`).
const ROLES: &[&str] = &["system", "user", "assistant", "tool"];

impl ChatRequest {
    pub fn params(mut self, st: &AppState) -> Result<Parsed<ChatInput>, ServeError> {
        let lenient = st.config.lenient_requests;
        check_unknown(&self.extra, "", lenient)?;
        let max_tokens = count(self.max_completion_tokens, "max_completion_tokens", 1)?.or(count(
            self.max_tokens,
            "max_tokens",
            1,
        )?);
        let top = count(self.top_logprobs, "top_logprobs", 0)?;
        if top.is_some() && !self.logprobs {
            return Err(ServeError::bad(
                "top_logprobs needs logprobs: true",
                Some("top_logprobs"),
            ));
        }
        let logprobs = self.logprobs.then_some(top.unwrap_or(0));
        if self.messages.is_empty() {
            return Err(ServeError::bad("messages is empty", Some("messages")));
        }
        let options = std::mem::take(&mut self.template).options()?;
        let (choice, tool_calls) = self.tool_calls(st, &options)?;
        let include_usage = self.stream_options.is_some_and(|o| o.include_usage);
        let mut params = self.sampling.params(max_tokens.unwrap_or(1), logprobs)?;
        let parallel = tool_calls.as_ref().is_none_or(|t| t.parallel);
        if let Some(g) = choice
            .grammar(&options.tools, parallel)
            .map_err(|e| ServeError::bad(e.to_string(), Some("tool_choice")))?
        {
            if params.guided_decoding.is_some() {
                return Err(ServeError::bad(
                    "a forced tool_choice and a structured-output constraint exclude each other",
                    Some("tool_choice"),
                ));
            }
            params.guided_decoding = Some(g);
        }
        if let Some(ToolCalls {
            mode: ToolMode::Auto(p),
            ..
        }) = &tool_calls
        {
            // The format's marker is a special token; it must reach the parser.
            params.skip_special_tokens &= !p.needs_special_tokens();
        }
        no_prompt_logprobs_streamed(self.stream, &params)?;
        Ok(Parsed {
            params,
            max_tokens,
            echo: None,
            prompts: 1,
            inputs: ChatInput {
                messages: chat_messages(self.messages, &template_roles(st, &options)?, lenient)?,
                options,
            },
            stream: self.stream,
            include_usage,
            tool_calls,
        })
    }

    /// What `tool_choice` asks for (default: `auto` with tools, `none` without) and how the
    /// output becomes calls; `auto` needs a parser, given or read from the template.
    fn tool_calls(
        &self,
        st: &AppState,
        options: &ChatOptions,
    ) -> Result<(ToolChoice, Option<ToolCalls>), ServeError> {
        let bad = |m: String| ServeError::bad(m, Some("tool_choice"));
        let choice = match &self.tool_choice {
            None if options.tools.is_empty() => ToolChoice::None,
            None => ToolChoice::Auto,
            Some(v) => ToolChoice::from_openai(v).map_err(|e| bad(e.to_string()))?,
        };
        if choice != ToolChoice::None && options.tools.is_empty() {
            return Err(bad("tool_choice needs tools".into()));
        }
        let mode = match &choice {
            ToolChoice::None => return Ok((choice, None)),
            ToolChoice::Required => ToolMode::Required,
            ToolChoice::Function(name) => ToolMode::Named(name.clone()),
            ToolChoice::Auto => {
                let template = match &options.template {
                    Some(t) => Some(t.as_str()),
                    None => st.llm.tokenizer()?.chat_template(),
                };
                let parser = st
                    .config
                    .tool_call_parser
                    .or_else(|| template.and_then(ToolParser::detect));
                ToolMode::Auto(parser.ok_or_else(|| {
                    bad(format!(
                        "tool_choice 'auto' needs to know how the model writes calls: start the \
                         server with --tool-call-parser ({})",
                        ToolParser::NAMES
                    ))
                })?)
            }
        };
        let parallel = self.parallel_tool_calls.unwrap_or(true);
        Ok((choice, Some(ToolCalls { mode, parallel })))
    }
}

fn tools(given: Option<Vec<Value>>) -> Result<Vec<Tool>, ServeError> {
    let bad = |i: usize, e: trtllm_api::ApiError| {
        ServeError::bad(format!("tools[{i}]: {e}"), Some("tools"))
    };
    given
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, v)| Tool::from_openai(v).map_err(|e| bad(i, e)))
        .collect()
}

/// Chat messages as the template takes them: roles it is written for, text content (parts of
/// type text joined), tool calls and results, no fields we do not implement.
pub fn chat_messages(
    messages: Vec<ChatMessageIn>,
    template_roles: &[String],
    lenient: bool,
) -> Result<Vec<ChatMessage>, ServeError> {
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| chat_message(&format!("messages[{i}]"), m, template_roles, lenient))
        .collect()
}

/// The roles the template that renders `options` names besides [`ROLES`].
pub fn template_roles(st: &AppState, options: &ChatOptions) -> Result<Vec<String>, ServeError> {
    let source = match &options.template {
        Some(t) => Some(t.as_str()),
        None => st.llm.tokenizer()?.chat_template(),
    };
    Ok(source.map(trtllm_api::template_roles).unwrap_or_default())
}

fn chat_message(
    at: &str,
    m: ChatMessageIn,
    template_roles: &[String],
    lenient: bool,
) -> Result<ChatMessage, ServeError> {
    let bad = |m: String| ServeError::bad(m, Some("messages"));
    check_unknown(&m.extra, &format!("{at}."), lenient)?;
    if !ROLES.contains(&m.role.as_str()) && !template_roles.contains(&m.role) {
        let roles: Vec<&str> = ROLES
            .iter()
            .copied()
            .chain(
                template_roles
                    .iter()
                    .map(String::as_str)
                    .filter(|r| !ROLES.contains(r)),
            )
            .collect();
        return Err(bad(format!(
            "{at}.role '{}' is not one this chat template is written for ({})",
            m.role,
            roles.join(", ")
        )));
    }
    let tool_calls = m
        .tool_calls
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(j, c)| tool_call(c).ok_or_else(|| bad(format!("{at}.tool_calls[{j}]: expected {{\"id\", \"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}"))))
        .collect::<Result<Vec<_>, _>>()?;
    if !tool_calls.is_empty() && m.role != "assistant" {
        return Err(bad(format!(
            "{at}: only assistant messages make tool calls"
        )));
    }
    if m.role == "tool" && m.tool_call_id.is_none() {
        return Err(bad(format!("{at}: a tool message needs tool_call_id")));
    }
    let content = match m.content {
        // An assistant's turn may be only calls.
        None if !tool_calls.is_empty() => String::new(),
        None => return Err(bad(format!("{at} has no content"))),
        Some(Content::Text(t)) => t,
        Some(Content::Parts(parts)) => parts
            .into_iter()
            .map(|p| match (p.kind.as_str(), p.text) {
                ("text", Some(t)) => Ok(t),
                (kind, _) => Err(bad(format!(
                    "content part of type '{kind}' is not supported (text only)"
                ))),
            })
            .collect::<Result<Vec<_>, _>>()?
            .concat(),
    };
    Ok(ChatMessage {
        role: m.role,
        content,
        tool_calls,
        tool_call_id: m.tool_call_id,
        name: m.name,
    })
}

/// An assistant's earlier call in OpenAI's shape (`arguments` a string holding JSON).
fn tool_call(v: &Value) -> Option<ToolCall> {
    let f = v.get("function")?;
    Some(ToolCall {
        id: v.get("id")?.as_str()?.to_string(),
        name: f.get("name")?.as_str()?.to_string(),
        arguments: match f.get("arguments")? {
            Value::String(s) => s.clone(),
            a @ Value::Object(_) => a.to_string(),
            _ => return None,
        },
    })
}
