//! Logits processing on SmolLM2, structured output (llguidance) and bad words: every completion
//! under a JSON schema parses and satisfies it, greedy and sampled with n = 2; regex and choice
//! constraints hold; a bad schema is an error naming it; constrained requests leave the tokens of
//! unconstrained ones in the same batch unchanged; banned words are never spelled.

use std::sync::OnceLock;

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use trtllm_api::builder::BuildConfig;
use trtllm_api::{ChatMessage, GuidedDecoding, LlmArgs, Prompt, SamplingParams, LLM};
use trtllm_tests::{shared_engine, smollm2_gguf};

fn llm() -> &'static LLM {
    static LLM_: OnceLock<LLM> = OnceLock::new();
    LLM_.get_or_init(|| {
        let gguf = smollm2_gguf().expect("demo model");
        let config = BuildConfig {
            max_batch_size: 8,
            max_seq_len: 512,
            ..Default::default()
        };
        let dir = shared_engine(env!("CARGO_TARGET_TMPDIR"), "guided", &gguf, &config)
            .expect("build SmolLM2");
        LLM::new(LlmArgs {
            model: dir,
            ..Default::default()
        })
        .expect("open SmolLM2")
    })
}

fn chat(text: &str, params: &SamplingParams) -> Result<Vec<String>> {
    let out = llm().chat(&[ChatMessage::new("user", text)], params)?;
    Ok(out.outputs.into_iter().map(|o| o.text).collect())
}

fn guided(g: GuidedDecoding, temperature: f32, n: usize) -> SamplingParams {
    SamplingParams {
        max_tokens: 200,
        temperature,
        n,
        seed: Some(3),
        guided_decoding: Some(g),
        ..Default::default()
    }
}

#[test]
fn json_schema_outputs_parse_and_satisfy_it() -> Result<()> {
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 130},
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                     "minItems": 1, "maxItems": 3},
            "email": {"anyOf": [{"type": "string", "pattern": "^[a-z]{1,12}@[a-z]{1,12}\\.com$"},
                                {"type": "null"}]}
        },
        "required": ["name", "age", "tags", "email"],
        "additionalProperties": false
    });
    for (t, n) in [(0.0, 1), (0.8, 2)] {
        let params = guided(GuidedDecoding::JsonSchema(schema.clone()), t, n);
        for text in chat("Describe a person as JSON.", &params)? {
            let v: Value = serde_json::from_str(&text).with_context(|| format!("{text:?}"))?;
            let o = v.as_object().context("an object")?;
            ensure!(o.len() == 4, "{text}");
            ensure!(
                o["name"].as_str().is_some_and(|s| s.chars().count() <= 20),
                "{text}"
            );
            ensure!(o["age"].as_u64().is_some_and(|a| a <= 130), "{text}");
            let tags = o["tags"].as_array().context("tags")?;
            ensure!((1..=3).contains(&tags.len()), "{text}");
            ensure!(tags
                .iter()
                .all(|x| ["red", "green", "blue"].contains(&x.as_str().unwrap_or(""))));
            ensure!(
                o["email"].is_null() || o["email"].as_str().is_some_and(|e| e.ends_with(".com"))
            );
        }
    }
    // Any object: a completion cut by max_tokens (a 135M model may write one long key) is a
    // prefix of one; a finished one parses.
    let params = guided(GuidedDecoding::JsonObject, 0.8, 2);
    let out = llm().chat(
        &[ChatMessage::new(
            "user",
            "Give a JSON object with a name and an age.",
        )],
        &params,
    )?;
    for o in out.outputs {
        ensure!(o.text.starts_with('{'), "{:?}", o.text);
        if o.finish_reason.as_deref() == Some("stop") {
            ensure!(
                serde_json::from_str::<Value>(&o.text)?.is_object(),
                "{:?}",
                o.text
            );
        }
    }
    Ok(())
}

#[test]
fn regex_and_choice_hold() -> Result<()> {
    // `\d` would be any Unicode digit, as in Rust's regex.
    let phone = guided(
        GuidedDecoding::Regex(r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}".into()),
        0.8,
        2,
    );
    for text in chat("A phone number?", &phone)? {
        let b = text.as_bytes();
        ensure!(
            b.len() == 14 && b[0] == b'(' && b[4] == b')' && b[9] == b'-',
            "{text:?}"
        );
    }
    let choice = guided(
        GuidedDecoding::Choice(vec!["yes".into(), "no".into(), "a.b".into()]),
        0.8,
        2,
    );
    for text in chat("Is Paris in France?", &choice)? {
        ensure!(["yes", "no", "a.b"].contains(&text.as_str()), "{text:?}");
    }
    Ok(())
}

#[test]
fn bad_schemas_and_regexes_are_errors_naming_them() {
    for (g, what) in [
        (
            GuidedDecoding::JsonSchema(json!({"type": "frobnicate"})),
            "JSON schema",
        ),
        (GuidedDecoding::Regex("(unclosed".into()), "regex"),
        (
            GuidedDecoding::Grammar("start: nothing_defined".into()),
            "grammar",
        ),
    ] {
        let e = chat("x", &guided(g, 0.0, 1)).unwrap_err().to_string();
        assert!(e.contains(&format!("invalid {what}")), "{e}");
    }
}

/// Unconstrained requests decode the same tokens alone and beside constrained ones.
#[test]
fn constrained_requests_do_not_change_unconstrained_ones() -> Result<()> {
    let plain = SamplingParams {
        max_tokens: 24,
        ..Default::default()
    };
    let prompts = ["The capital of France is", "Water boils at"];
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let out = llm().generate(&[Prompt::Text(p.to_string())], &plain)?;
            Ok(out[0].outputs[0].token_ids.clone())
        })
        .collect::<Result<_>>()?;
    let short = json!({"type": "object", "properties": {"answer": {"type": "string", "maxLength": 10}},
                       "required": ["answer"], "additionalProperties": false});
    let schema = guided(GuidedDecoding::JsonSchema(short), 0.8, 2);
    let constrained = llm().chat_async(&[ChatMessage::new("user", "JSON please")], &schema)?;
    let streams = prompts
        .iter()
        .map(|p| llm().generate_async(Prompt::Text(p.to_string()), &plain))
        .collect::<trtllm_api::Result<Vec<_>>>()?;
    for (s, want) in streams.into_iter().zip(&alone) {
        ensure!(&s.collect()?.outputs[0].token_ids == want);
    }
    for o in constrained.collect()?.outputs {
        ensure!(
            serde_json::from_str::<Value>(&o.text)?.is_object(),
            "{}",
            o.text
        );
    }
    Ok(())
}

/// vLLM's bad_words: the greedy continuation names Paris; banned, it never spells it, alone or
/// under a grammar.
#[test]
fn bad_words_are_never_spelled() -> Result<()> {
    let prompt = || vec![Prompt::Text("The capital of France is".into())];
    let plain = SamplingParams {
        max_tokens: 12,
        ..Default::default()
    };
    let free = &llm().generate(&prompt(), &plain)?[0].outputs[0].text;
    ensure!(free.contains("Paris"), "{free:?}");
    let banned = SamplingParams {
        bad_words: vec!["Paris".into()],
        ..plain.clone()
    };
    let text = &llm().generate(&prompt(), &banned)?[0].outputs[0].text;
    ensure!(!text.contains("Paris"), "{text:?}");
    let both = SamplingParams {
        guided_decoding: Some(GuidedDecoding::Regex("[A-Za-z ]{1,12}".into())),
        ..banned
    };
    let text = &llm().generate(&prompt(), &both)?[0].outputs[0].text;
    ensure!(!text.contains("Paris") && !text.is_empty(), "{text:?}");
    Ok(())
}
