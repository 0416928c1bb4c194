use super::*;

/// The content and (name, arguments) calls of `text`, read whole.
fn whole(mode: &ToolMode, text: &str) -> (String, Vec<(String, String)>) {
    let mut s = ToolCallStream::new(mode.clone());
    s.push(text);
    s.finish();
    let calls = s
        .calls()
        .iter()
        .map(|c| (c.name.clone(), c.arguments.clone()));
    (s.content().to_string(), calls.collect())
}

/// The same read in pieces of `step` bytes (on character boundaries), rebuilt from the deltas
/// alone, as a client rebuilds a stream.
fn streamed(mode: &ToolMode, text: &str, step: usize) -> (String, Vec<(String, String)>) {
    let mut s = ToolCallStream::new(mode.clone());
    let (mut content, mut calls) = (String::new(), Vec::<(String, String)>::new());
    let mut take = |d: ToolDelta| {
        content.push_str(&d.content);
        for c in d.calls {
            if let Some(name) = c.name {
                assert_eq!(c.index, calls.len());
                calls.push((name, String::new()));
            }
            calls[c.index].1.push_str(&c.arguments);
        }
    };
    let mut at = 0;
    while at < text.len() {
        let mut end = (at + step).min(text.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        take(s.push(&text[at..end]));
        at = end;
    }
    take(s.finish());
    (content, calls)
}

fn check(mode: ToolMode, text: &str, content: &str, calls: &[(&str, &str)]) {
    let want: Vec<(String, String)> = calls
        .iter()
        .map(|(n, a)| (n.to_string(), a.to_string()))
        .collect();
    assert_eq!(
        whole(&mode, text),
        (content.to_string(), want.clone()),
        "{text:?}"
    );
    for step in 1..=text.len() {
        assert_eq!(
            streamed(&mode, text, step),
            (content.to_string(), want.clone()),
            "{text:?} in pieces of {step}"
        );
    }
}

#[test]
fn hermes_calls_between_text() {
    let mode = ToolMode::Auto(ToolParser::Hermes);
    check(
        mode.clone(),
        "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>{\"name\": \"now\", \"arguments\": {}}</tool_call>",
        "Let me check.\n\n",
        &[("get_weather", r#"{"city":"Paris"}"#), ("now", "{}")],
    );
    // No closing tag before the end, and arguments given as a string holding the object.
    check(
        mode.clone(),
        "<tool_call>{\"name\": \"f\", \"arguments\": \"{\\\"x\\\": 1}\"}",
        "",
        &[("f", r#"{"x":1}"#)],
    );
    // Text that only looks like a call stays text, and so does a lone `<`.
    check(
        mode.clone(),
        "a < b <tool_call>not json</tool_call> c",
        "a < b <tool_call>not json</tool_call> c",
        &[],
    );
    check(
        mode.clone(),
        "<tool_call>{\"name\": \"f\"",
        "<tool_call>{\"name\": \"f\"",
        &[],
    );
    check(mode, "plain answer é", "plain answer é", &[]);
}

#[test]
fn llama3_json_calls() {
    let mode = ToolMode::Auto(ToolParser::Llama3Json);
    check(
        mode.clone(),
        "<|python_tag|>{\"name\": \"f\", \"parameters\": {\"a\": [1, 2]}}; {\"name\": \"g\", \"parameters\": {}}",
        "",
        &[("f", r#"{"a":[1,2]}"#), ("g", "{}")],
    );
    check(mode.clone(), " {\"answer\": 42}", " {\"answer\": 42}", &[]);
    check(mode, "The answer is {x}.", "The answer is {x}.", &[]);
}

#[test]
fn mistral_calls() {
    let mode = ToolMode::Auto(ToolParser::Mistral);
    check(
        mode.clone(),
        "Sure. [TOOL_CALLS] [{\"name\": \"f\", \"arguments\": {\"q\": \"x\"}}, {\"name\": \"g\", \"arguments\": {}}]",
        "Sure. ",
        &[("f", r#"{"q":"x"}"#), ("g", "{}")],
    );
    check(
        mode.clone(),
        "[TOOL_CALLS]f[ARGS]{\"q\": 1}[TOOL_CALLS]g[ARGS]{}",
        "",
        &[("f", r#"{"q":1}"#), ("g", "{}")],
    );
    check(mode, "[TOOL_CALLS] oops", "[TOOL_CALLS] oops", &[]);
}

#[test]
fn forced_calls() {
    check(
        ToolMode::Required,
        "[{\"name\": \"f\", \"arguments\": {\"a\": \"]\"}} ,\n {\"name\": \"g\", \"arguments\": {}}]",
        "",
        &[("f", r#"{"a":"]"}"#), ("g", "{}")],
    );
    // Cut off by the token limit: the complete call stands, the rest is text.
    check(
        ToolMode::Required,
        "[{\"name\": \"f\", \"arguments\": {}}, {\"name\": \"g\", \"argu",
        "{\"name\": \"g\", \"argu",
        &[("f", "{}")],
    );
    // A named function's arguments are the text, streamed as they come.
    check(
        ToolMode::Named("f".into()),
        "\n{\"a\": \"b\"}",
        "",
        &[("f", "{\"a\": \"b\"}")],
    );
}

#[test]
fn parsers_by_name_and_by_template() {
    assert_eq!(ToolParser::from_name("hermes").unwrap(), ToolParser::Hermes);
    assert!(ToolParser::from_name("xml")
        .unwrap_err()
        .to_string()
        .contains("llama3_json"));
    assert_eq!(
        ToolParser::detect("... <tool_call> ..."),
        Some(ToolParser::Hermes)
    );
    assert_eq!(
        ToolParser::detect("{{ '[TOOL_CALLS]' }}"),
        Some(ToolParser::Mistral)
    );
    assert_eq!(ToolParser::detect("{{ message.content }}"), None);
}
