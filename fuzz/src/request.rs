//! Request bodies through the server's router in process (no sockets): completions, chat,
//! tokenize and detokenize on a tiny engine. A defect is a 5xx other than 503, an error status
//! without an OpenAI-shaped JSON body, a 2xx whose body or stream events are not JSON, or
//! requests left running after the last case.

use std::path::Path;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;
use trtllm_api::builder::{build, BuildConfig};
use trtllm_api::executor::ExecutorConfig;
use trtllm_api::{LlmArgs, LLM};
use trtllm_serve::{router, ServeConfig};

use crate::formats::FileKind;
use crate::harness::{Input, Outcome, Seed, SeedFile, Target};
use crate::targets::repo;

const WORDS: &[&str] = &[
    "model",
    "prompt",
    "messages",
    "role",
    "content",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "best_of",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "bad_words",
    "logprobs",
    "top_logprobs",
    "prompt_logprobs",
    "echo",
    "stream",
    "stream_options",
    "include_usage",
    "logit_bias",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "response_format",
    "json_schema",
    "schema",
    "json_object",
    "guided_regex",
    "guided_choice",
    "guided_json",
    "guided_grammar",
    "tools",
    "tool_choice",
    "tool_calls",
    "parallel_tool_calls",
    "function",
    "parameters",
    "arguments",
    "name",
    "chat_template",
    "chat_template_kwargs",
    "add_generation_prompt",
    "continue_final_message",
    "add_special_tokens",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "ignore_eos",
    "min_tokens",
    "tokens",
    "user",
    "system",
    "assistant",
    "tool",
    "tool_call_id",
    "required",
    "none",
    "auto",
    "text",
    "image_url",
    "split_special_tokens",
];

fn bodies() -> Vec<(&'static str, serde_json::Value)> {
    use serde_json::json;
    let tools_template =
        std::fs::read_to_string(repo().join("docs/chat_templates/chatml-tools.jinja"))
            .unwrap_or_default();
    let chat = json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]);
    vec![
        (
            "/v1/completions",
            json!({"model": "trtllm", "prompt": "Hello there", "max_tokens": 8, "temperature": 0.7, "n": 2, "logprobs": 2, "stop": ["\n"], "seed": 3}),
        ),
        (
            "/v1/completions",
            json!({"prompt": ["a b", [1, 2, 3]], "max_tokens": 6, "stream": true, "stream_options": {"include_usage": true}, "echo": true, "logit_bias": {"5": 10}}),
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": 4, "prompt_logprobs": 2, "guided_choice": ["yes", "no"], "stop_token_ids": [2], "bad_words": ["ab"]}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": chat, "max_tokens": 8, "logprobs": true, "top_logprobs": 3, "presence_penalty": 0.5}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": chat, "max_tokens": 16, "stream": true, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": chat, "max_tokens": 24, "chat_template": tools_template, "tool_choice": "required",
            "tools": [{"type": "function", "function": {"name": "get", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "continue_final_message": true, "add_generation_prompt": false, "max_tokens": 4, "n": 3, "temperature": 1.2, "top_k": 5}),
        ),
        (
            "/tokenize",
            json!({"prompt": "Hello <|im_end|>", "add_special_tokens": true}),
        ),
        (
            "/tokenize",
            json!({"messages": chat, "add_generation_prompt": true}),
        ),
        ("/detokenize", json!({"tokens": [1, 2, 3, 500]})),
    ]
}

pub struct Requests {
    seeds: Vec<Seed>,
    app: axum::Router,
    rt: tokio::runtime::Runtime,
    _engine: tempfile::TempDir,
}

impl Requests {
    pub fn new() -> anyhow::Result<Self> {
        let engine = tempfile::tempdir()?;
        let config = BuildConfig {
            max_seq_len: 96,
            ..Default::default()
        };
        build(
            &repo().join("tests/fixtures/tiny-llama"),
            engine.path(),
            &config,
            &mut |_, _, _| {},
        )?;
        let mut executor_config = ExecutorConfig::default();
        executor_config.kv_cache.max_tokens = Some(4096);
        let llm = LLM::new(LlmArgs {
            model: engine.path().into(),
            executor_config,
            ..Default::default()
        })?;
        let app = router(
            llm,
            ServeConfig {
                max_sequences_per_request: 16,
                max_pending_sequences: 64,
                ..Default::default()
            },
        );
        let kind = FileKind::Json { dictionary: WORDS };
        let seeds = bodies()
            .into_iter()
            .enumerate()
            .map(|(i, (route, body))| Seed {
                name: format!("{i}{route}"),
                dir: None,
                files: vec![SeedFile {
                    rel: "body.json".into(),
                    bytes: serde_json::to_vec(&body).unwrap_or_default(),
                    kind,
                }],
            })
            .collect();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        Ok(Self {
            seeds,
            app,
            rt,
            _engine: engine,
        })
    }

    fn send(
        &self,
        method: &str,
        route: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, String, Vec<u8>), String> {
        let req = Request::builder()
            .method(method)
            .uri(route)
            .header("content-type", "application/json")
            .body(Body::from(body))
            .map_err(|e| e.to_string())?;
        let app = self.app.clone();
        self.rt.block_on(async move {
            let work = async {
                let resp = app.oneshot(req).await.map_err(|e| e.to_string())?;
                let status = resp.status();
                let ctype = resp
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| format!("body: {e}"))?;
                Ok((status, ctype, body.to_bytes().to_vec()))
            };
            tokio::time::timeout(Duration::from_secs(60), work)
                .await
                .map_err(|_| "no complete answer within 60 s".to_string())?
        })
    }
}

/// What a response must look like whatever the request was.
fn check_response(status: StatusCode, ctype: &str, body: &[u8]) -> Result<Outcome, String> {
    let text = String::from_utf8_lossy(body);
    let show = || text.chars().take(300).collect::<String>();
    if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
        return Err(format!("{status}: {}", show()));
    }
    if !status.is_success() {
        let v: serde_json::Value = serde_json::from_slice(body)
            .map_err(|_| format!("{status} without a JSON body: {}", show()))?;
        let message = v
            .pointer("/error/message")
            .and_then(|m| m.as_str())
            .unwrap_or_default();
        if message.trim().is_empty() {
            return Err(format!("{status} without error.message: {}", show()));
        }
        return Ok(Outcome::Refused(format!("{status}: {message}")));
    }
    if ctype.starts_with("text/event-stream") {
        let mut done = false;
        for line in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
            if line == "[DONE]" {
                done = true;
            } else if serde_json::from_str::<serde_json::Value>(line).is_err() {
                return Err(format!("a stream event that is not JSON: {line}"));
            }
        }
        if !done {
            return Err(format!("a stream without [DONE]: {}", show()));
        }
    } else if serde_json::from_slice::<serde_json::Value>(body).is_err() {
        return Err(format!("{status} with a body that is not JSON: {}", show()));
    }
    Ok(Outcome::Accepted)
}

impl Target for Requests {
    fn name(&self) -> &'static str {
        "request"
    }
    fn seeds(&self) -> &[Seed] {
        &self.seeds
    }
    fn run(&self, dir: &Path, input: &Input) -> Result<Outcome, String> {
        let route = input.seed.trim_start_matches(|c: char| c.is_ascii_digit());
        let body = std::fs::read(dir.join("body.json")).map_err(|e| e.to_string())?;
        let (status, ctype, answer) = self.send("POST", route, body)?;
        check_response(status, &ctype, &answer)
    }

    /// Nothing may be left running, queued or holding KV blocks once every answer is in.
    fn finish(&self) -> Result<(), String> {
        let mut last = String::new();
        for _ in 0..50 {
            let (_, _, body) = self.send("GET", "/metrics", Vec::new())?;
            let text = String::from_utf8_lossy(&body).into_owned();
            let value = |name: &str| {
                text.lines()
                    .find_map(|l| {
                        l.strip_prefix(name)
                            .and_then(|v| v.trim().parse::<f64>().ok())
                    })
                    .unwrap_or(-1.0)
            };
            let left = [
                value("trtllm_num_requests_running "),
                value("trtllm_num_requests_waiting "),
                value("trtllm_kv_cache_used_blocks "),
            ];
            if left == [0.0; 3] {
                return Ok(());
            }
            last = format!("running, waiting, KV blocks used: {left:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!("work left after the last answer: {last}"))
    }
}
