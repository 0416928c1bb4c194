//! Chat templates: the checkpoint's own Jinja template rendered with minijinja, configured the
//! way transformers renders them (trim_blocks, lstrip_blocks, Python string methods, a `tojson`
//! that writes what Python's `json.dumps` writes), with tools and tool calls passed as
//! transformers and vLLM pass them.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::tools::{Tool, ToolCall};
use crate::{ApiError, Result};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// The calls an assistant message made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// In a `tool` message: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// In a `tool` message: the function that answered (some templates print it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            ..Self::default()
        }
    }

    /// The message as the template sees it: OpenAI's shape, with each call's `arguments` as
    /// the JSON object it holds (templates print it with `tojson`, as vLLM arranges).
    fn template_value(&self) -> Value {
        let mut m = Map::new();
        m.insert("role".into(), Value::String(self.role.clone()));
        m.insert("content".into(), Value::String(self.content.clone()));
        if !self.tool_calls.is_empty() {
            let calls = self.tool_calls.iter().map(ToolCall::template_value);
            m.insert("tool_calls".into(), calls.collect());
        }
        if let Some(id) = &self.tool_call_id {
            m.insert("tool_call_id".into(), Value::String(id.clone()));
        }
        if let Some(name) = &self.name {
            m.insert("name".into(), Value::String(name.clone()));
        }
        Value::Object(m)
    }
}

/// How a conversation is rendered, beyond its messages.
#[derive(Clone, Debug)]
pub struct ChatOptions {
    /// End with the opening of the assistant's turn.
    pub add_generation_prompt: bool,
    /// Leave the last message (an assistant's) open, for the model to continue.
    pub continue_final_message: bool,
    /// The functions the model may call, as the template's `tools`.
    pub tools: Vec<Tool>,
    /// More variables for the template (vLLM's `chat_template_kwargs`).
    pub template_kwargs: Map<String, Value>,
    /// A template of its own instead of the tokenizer's.
    pub template: Option<String>,
    /// Read special-token strings inside message content as the control tokens they spell
    /// (off: as text, so a message cannot forge another turn).
    pub special_tokens_in_content: bool,
}

impl Default for ChatOptions {
    fn default() -> Self {
        Self {
            add_generation_prompt: true,
            continue_final_message: false,
            tools: Vec::new(),
            template_kwargs: Map::new(),
            template: None,
            special_tokens_in_content: false,
        }
    }
}

/// The special tokens a template may print.
#[derive(Clone, Copy, Debug, Default)]
pub struct SpecialTokens<'a> {
    pub bos: Option<&'a str>,
    pub eos: Option<&'a str>,
}

pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    source: String,
}

/// The roles a template compares a message's role with (`role == 'ipython'`,
/// `role in ['function', 'observation']`): roles it is written for beyond the usual four.
pub fn template_roles(source: &str) -> Vec<String> {
    let mut roles = Vec::new();
    for (at, _) in source.match_indices("role") {
        let rest = source[at + 4..].trim_start_matches(['\'', '"', ']', ' ']);
        let (list, single) =
            if let Some(r) = rest.strip_prefix("==").or_else(|| rest.strip_prefix("!=")) {
                (r.trim_start(), true)
            } else if let Some(r) = rest.strip_prefix("in ") {
                let r = r.trim_start();
                let Some(end) = r.find([']', ')']) else {
                    continue;
                };
                (&r[..end], false)
            } else {
                continue;
            };
        // A single literal after a comparison, every literal of a list.
        for lit in list.split(',').map(str::trim) {
            let lit = lit.trim_start_matches(['[', '(']).trim_start();
            let Some(q) = lit.chars().next().filter(|c| *c == '\'' || *c == '"') else {
                break;
            };
            let Some(end) = lit[1..].find(q) else { break };
            let name = &lit[1..1 + end];
            if !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !roles.iter().any(|r| r == name)
            {
                roles.push(name.to_string());
            }
            if single {
                break;
            }
        }
    }
    roles
}

/// What transformers appends to the final message to find where it ends in the rendering.
const CONTINUE_TAG: &str = "CONTINUE_FINAL_MESSAGE_TAG ";

impl ChatTemplate {
    pub fn new(source: String) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source.clone())
            .map_err(|e| ApiError::ChatTemplate(e.to_string()))?;
        Ok(Self { env, source })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn render(
        &self,
        messages: &[ChatMessage],
        opts: &ChatOptions,
        special: SpecialTokens,
    ) -> Result<String> {
        let err = |m: String| ApiError::ChatTemplate(m);
        let mut messages: Vec<Value> = messages.iter().map(ChatMessage::template_value).collect();
        let mut final_content = None;
        if opts.continue_final_message {
            if opts.add_generation_prompt {
                return Err(err(
                    "continue_final_message and add_generation_prompt exclude each other".into(),
                ));
            }
            let content = messages
                .last_mut()
                .and_then(|m| m.get_mut("content"))
                .ok_or_else(|| err("continue_final_message: no final message".into()))?;
            final_content = content.as_str().map(str::to_string);
            *content = Value::String(format!("{}{CONTINUE_TAG}", content.as_str().unwrap_or("")));
        }
        let tools: Option<Vec<&Value>> =
            (!opts.tools.is_empty()).then(|| opts.tools.iter().map(Tool::definition).collect());
        let t = self
            .env
            .get_template("chat")
            .map_err(|e| err(e.to_string()))?;
        let ctx = minijinja::context! {
            messages => messages,
            tools => tools,
            add_generation_prompt => opts.add_generation_prompt,
            bos_token => special.bos.unwrap_or(""),
            eos_token => special.eos.unwrap_or(""),
            ..minijinja::Value::from_serialize(&opts.template_kwargs)
        };
        let rendered = t.render(ctx).map_err(|e| err(e.to_string()))?;
        match final_content {
            None => Ok(rendered),
            Some(content) => cut_at_tag(rendered, &content),
        }
    }
}

/// The rendering up to the end of the final message (transformers' `continue_final_message`).
fn cut_at_tag(rendered: String, content: &str) -> Result<String> {
    let tag = CONTINUE_TAG.trim();
    let at = rendered
        .rfind(tag)
        .filter(|_| rendered.contains(content.trim()));
    let Some(at) = at else {
        return Err(ApiError::ChatTemplate(
            "continue_final_message: the template does not show the final message as given".into(),
        ));
    };
    let mut out = rendered;
    let keeps_spacing = out[at..].starts_with(CONTINUE_TAG);
    out.truncate(at);
    if !keeps_spacing {
        out.truncate(out.trim_end().len());
    }
    Ok(out)
}

/// Python's `json.dumps(x, ensure_ascii=False, indent=indent)`, which transformers gives chat
/// templates as `tojson`: `", "` and `": "` between items, keys in their order, no HTML escapes.
fn tojson(
    v: minijinja::Value,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<String, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&v).map_err(|e| {
        minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string())
    })?;
    let mut out = String::new();
    write_py_json(&json, indent, 0, &mut out);
    Ok(out)
}

fn write_py_json(v: &Value, indent: Option<usize>, level: usize, out: &mut String) {
    let open = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    let sep = if indent.is_some() { "," } else { ", " };
    match v {
        Value::Number(n) => out.push_str(&py_number(n)),
        Value::Array(a) if !a.is_empty() => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                open(out, level + 1);
                write_py_json(x, indent, level + 1, out);
            }
            open(out, level);
            out.push(']');
        }
        Value::Object(m) if !m.is_empty() => {
            out.push('{');
            for (i, (k, x)) in m.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                open(out, level + 1);
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                write_py_json(x, indent, level + 1, out);
            }
            open(out, level);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// A number as Python's `repr` writes it: floats positional from 1e-4 up to 1e16 (with at
/// least one decimal), otherwise with a signed exponent of at least two digits.
fn py_number(n: &serde_json::Number) -> String {
    let x = match n.as_f64() {
        Some(x) if n.is_f64() && x.is_finite() => x,
        _ => return n.to_string(),
    };
    let sci = format!("{x:e}"); // shortest round-trip digits: "-1.25e-7"
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..16).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exp.abs());
    }
    let (neg, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits = mantissa.replace('.', "");
    let point = exp + 1; // digits before the decimal point
    let text = if point <= 0 {
        format!("0.{}{digits}", "0".repeat((-point) as usize))
    } else if (point as usize) >= digits.len() {
        format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
    } else {
        format!(
            "{}.{}",
            &digits[..point as usize],
            &digits[point as usize..]
        )
    };
    format!("{neg}{text}")
}

#[cfg(test)]
mod tests {
    use super::template_roles;

    #[test]
    fn roles_a_template_names() {
        let src = "{% if message['role'] == 'ipython' %}{% elif message.role in ['function', \"observation\"] %}{% endif %}{{ '<|' + message['role'] + '|>' + message['content'] }}{% if messages[0]['role'] != 'system' %}{% endif %}";
        assert_eq!(
            template_roles(src),
            ["ipython", "function", "observation", "system"]
        );
        assert!(template_roles("{{ message['role'] + message['content'] }}").is_empty());
    }

    use super::*;

    fn render(src: &str, messages: &[ChatMessage], opts: &ChatOptions) -> Result<String> {
        ChatTemplate::new(src.into())?.render(messages, opts, SpecialTokens::default())
    }

    #[test]
    fn chatml_with_default_system_prompt() {
        let src = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nSYS<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
        let out = render(
            src,
            &[ChatMessage::new("user", "Hi")],
            &ChatOptions::default(),
        )
        .unwrap();
        assert_eq!(out, "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn python_methods_and_raise_exception() {
        let src = "{{ messages[0]['content'].strip() }}{% if messages|length > 1 %}{{ raise_exception('one only') }}{% endif %}";
        let opts = ChatOptions::default();
        assert_eq!(
            render(src, &[ChatMessage::new("user", "  x ")], &opts).unwrap(),
            "x"
        );
        let two = [ChatMessage::new("user", "a"), ChatMessage::new("user", "b")];
        let e = render(src, &two, &opts).unwrap_err().to_string();
        assert!(e.contains("one only"), "{e}");
    }

    #[test]
    fn tojson_writes_what_python_writes() {
        let v = serde_json::json!({"b": [1, 2.5, 1e-5, 1e20, -0.25, 100.0, 1e15, 0.0001, -3], "a": {"x": "é<\"\n"}, "e": [], "o": {}});
        let mut flat = String::new();
        write_py_json(&v, None, 0, &mut flat);
        assert_eq!(
            flat,
            r#"{"b": [1, 2.5, 1e-05, 1e+20, -0.25, 100.0, 1000000000000000.0, 0.0001, -3], "a": {"x": "é<\"\n"}, "e": [], "o": {}}"#
        );
        let mut indented = String::new();
        write_py_json(
            &serde_json::json!({"a": [1, {"b": null}]}),
            Some(2),
            0,
            &mut indented,
        );
        assert_eq!(
            indented,
            "{\n  \"a\": [\n    1,\n    {\n      \"b\": null\n    }\n  ]\n}"
        );
    }

    #[test]
    fn kwargs_and_continued_final_message() {
        let src = "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>\n{% endfor %}{% if flag %}F{% endif %}";
        let mut opts = ChatOptions {
            add_generation_prompt: false,
            continue_final_message: true,
            ..ChatOptions::default()
        };
        opts.template_kwargs
            .insert("flag".into(), Value::Bool(true));
        let msgs = [
            ChatMessage::new("user", "Hi"),
            ChatMessage::new("assistant", "Hello, I am"),
        ];
        assert_eq!(
            render(src, &msgs, &opts).unwrap(),
            "<user>Hi</user>\n<assistant>Hello, I am"
        );
        opts.add_generation_prompt = true;
        assert!(render(src, &msgs, &opts).is_err());
    }
}
