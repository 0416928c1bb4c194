//! Chat templates with tools rendered as transformers renders them: tool definitions through
//! `tojson` (Python's spacing, key order, unicode, exponents; `indent`), assistant tool calls
//! with their arguments as objects, tool results, template variables and a continued final
//! message. The expected text comes from transformers (tests/fixtures/chat-templates/make_golden.py).

use anyhow::{Context, Result};
use serde_json::Value;
use trtllm_api::{ChatMessage, ChatOptions, ChatTemplate, SpecialTokens, Tool, ToolCall};
use trtllm_tests::{fixtures, read_json};

/// A message in OpenAI's shape, as the server reads it.
fn message(v: &Value) -> Result<ChatMessage> {
    let text = |k: &str| v.get(k).and_then(Value::as_str).map(String::from);
    let calls = v
        .get("tool_calls")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    Ok(ChatMessage {
        role: text("role").context("role")?,
        content: text("content").unwrap_or_default(),
        tool_calls: calls
            .iter()
            .map(|c| ToolCall {
                id: c["id"].as_str().unwrap_or_default().into(),
                name: c["function"]["name"].as_str().unwrap_or_default().into(),
                arguments: c["function"]["arguments"]
                    .as_str()
                    .unwrap_or_default()
                    .into(),
            })
            .collect(),
        tool_call_id: text("tool_call_id"),
        name: text("name"),
    })
}

#[test]
fn templates_with_tools_render_as_transformers_does() -> Result<()> {
    let dir = fixtures().join("chat-templates");
    let golden: Value = read_json(&dir.join("golden.json"))?;
    let source = |name: &str| -> Result<String> {
        let path = match name {
            "chatml-tools" => dir.join("../../../docs/chat_templates/chatml-tools.jinja"),
            other => dir.join(format!("{other}.jinja")),
        };
        std::fs::read_to_string(&path).with_context(|| path.display().to_string())
    };
    let cases = golden["cases"].as_array().context("cases")?;
    assert!(cases.len() >= 15);
    for case in cases {
        let what = format!("{} / {}", case["template"], case["case"]);
        let template = ChatTemplate::new(source(case["template"].as_str().context("template")?)?)?;
        let messages = case["messages"]
            .as_array()
            .context("messages")?
            .iter()
            .map(message)
            .collect::<Result<Vec<_>>>()?;
        let tools = case["tools"].as_array().cloned().unwrap_or_default();
        let cont = case["continue_final_message"].as_bool().unwrap_or(false);
        let opts = ChatOptions {
            add_generation_prompt: !cont,
            continue_final_message: cont,
            tools: tools
                .into_iter()
                .map(Tool::from_openai)
                .collect::<trtllm_api::Result<_>>()?,
            template_kwargs: case["template_kwargs"]
                .as_object()
                .cloned()
                .unwrap_or_default(),
            template: None,
            special_tokens_in_content: false,
        };
        let special = SpecialTokens {
            bos: Some("<s>"),
            eos: Some("</s>"),
        };
        let got = template
            .render(&messages, &opts, special)
            .context(what.clone())?;
        assert_eq!(
            got,
            case["expected"].as_str().context("expected")?,
            "{what}"
        );
    }
    Ok(())
}
