//! `trtllm serve` end to end on SmolLM2: the real `openai` Python client against transformers'
//! golden outputs, 64 concurrent streams, disconnects, bad requests, and `trtllm bench`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{engine, golden, openai_python, Server, EOS, MODEL};
use serde_json::{json, Value};

#[test]
fn openai_python_client_matches_golden_outputs() {
    let server = Server::start(&["--api-key", "sk-test"]);
    let mut spec = golden();
    spec["base_url"] = json!(format!("{}/v1", server.base));
    spec["api_key"] = json!("sk-test");
    spec["model"] = json!(MODEL);
    spec["eos_token_id"] = json!(EOS);
    spec["eos_text"] = json!("<|im_end|>");
    spec["tools_template"] =
        json!(Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../docs/chat_templates/chatml-tools.jinja"));
    let dir = tempfile::tempdir().unwrap();
    let spec_path = dir.path().join("spec.json");
    std::fs::write(&spec_path, spec.to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/openai_client.py");
    let out = Command::new(openai_python())
        .arg(&script)
        .arg(&spec_path)
        .output()
        .expect("run python");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "openai client checks failed:\n{log}");
    assert!(log.contains("checks passed"), "{log}");
    eprintln!("{log}");
}

#[test]
fn concurrent_streams_are_complete_and_disconnects_free_their_blocks() {
    let server = Server::start(&[]);
    let cases: Vec<Value> = golden()["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["kind"] == "raw")
        .cloned()
        .collect();
    std::thread::scope(|s| {
        for i in 0..64 {
            let case = &cases[i % cases.len()];
            let server = &server;
            s.spawn(move || {
                let ids = case["greedy_ids"].as_array().unwrap();
                let body = json!({"model": MODEL, "prompt": case["input_ids"],
                    "max_tokens": ids.len(), "temperature": 0, "stream": true,
                    "skip_special_tokens": false});
                let (text, finish) = server.stream(&body);
                let eos = ids.last().unwrap().as_u64() == Some(EOS as u64);
                // The end-of-sequence token that ends a completion is not in its text.
                let golden = case["greedy_text"].as_str().unwrap();
                let want = if eos {
                    golden.strip_suffix("<|im_end|>").unwrap()
                } else {
                    golden
                };
                assert_eq!(text, want, "client {i}");
                assert_eq!(finish, if eos { "stop" } else { "length" }, "client {i}");
            });
        }
    });
    assert_eq!(
        server.metric("trtllm_request_success_total{finish_reason=\"stop\"}") as usize
            + server.metric("trtllm_request_success_total{finish_reason=\"length\"}") as usize,
        64
    );

    // Eight clients read three chunks of a long stream, then hang up.
    let addr = server.base.trim_start_matches("http://").to_string();
    for _ in 0..8 {
        let body = json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 900,
            "ignore_eos": true, "stream": true})
        .to_string();
        let mut sock = TcpStream::connect(&addr).unwrap();
        write!(sock, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        let mut seen = String::new();
        let mut buf = [0u8; 4096];
        while seen.matches("data: ").count() < 3 {
            let n = sock.read(&mut buf).unwrap();
            assert!(n > 0, "server closed early: {seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let used = server.metric("trtllm_kv_cache_used_blocks");
        let running = server.metric("trtllm_num_requests_running");
        if used == 0.0 && running == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "blocks still held after disconnects: {used} used, {running} running"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        server.metric("trtllm_request_success_total{finish_reason=\"cancelled\"}"),
        8.0
    );
    assert!(server.metric("trtllm_generation_tokens_total") < (64 * 48 + 8 * 900) as f64);
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let server = Server::start(&["--api-key", "k", "--max-pending-requests", "1"]);
    let key = Some("k");
    let ok = json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0});
    let err = |status: u16, body: &Value, what: &str| {
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}: {body}"
        );
        assert!(body["error"]["type"].is_string(), "{what}: {body}");
        eprintln!("{what}: {status} {}", body["error"]["message"]);
    };
    let mut cases = vec![
        (
            json!({"model": "gpt-4", "prompt": "x"}),
            key,
            404,
            "unknown model",
        ),
        (
            json!({"model": MODEL, "prompt": "x", "max_tokens": -5}),
            key,
            400,
            "negative max_tokens",
        ),
        (
            json!({"model": MODEL, "prompt": "x", "temperature": -1}),
            key,
            400,
            "negative temperature",
        ),
        (
            json!({"model": MODEL, "prompt": vec![7; 2000]}),
            key,
            400,
            "prompt over the limit",
        ),
        (
            json!({"model": MODEL, "prompt": "x"}),
            Some("wrong"),
            401,
            "wrong API key",
        ),
        (
            json!({"model": MODEL, "prompt": "x"}),
            None,
            401,
            "no API key",
        ),
        (
            json!({"model": MODEL, "prompt": "a".repeat(10 << 20)}),
            key,
            413,
            "10 MB body",
        ),
    ];
    cases.push((ok.clone(), key, 200, "good request"));
    for (body, key, want, what) in &cases {
        let (status, resp) = server.post("/v1/completions", body, *key);
        assert_eq!(status, *want, "{what}: {resp}");
        if *want != 200 {
            err(status, &resp, what);
        }
    }
    // Fields we do not implement are refused by name, never ignored.
    for (path, body, field, code) in [
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": "x", "max_tokens": 1_000_000_000}),
            "",
            "context_length_exceeded",
        ),
        // Tools the model cannot be told how to call, and tools that are not functions.
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                   "tools": [{"type": "function", "function": {"name": "f"}}]}),
            "tool_choice",
            "",
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                   "tools": [{"type": "code"}], "tool_choice": "required"}),
            "tools",
            "",
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "tool", "content": "5"}]}),
            "messages",
            "",
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                   "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "frob"}}}}),
            "",
            "",
        ),
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": "x", "guided_regex": "a+", "guided_choice": ["a"]}),
            "guided_choice",
            "",
        ),
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": "x", "frobnicate": 1}),
            "frobnicate",
            "",
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "user"}]}),
            "messages",
            "",
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}),
            "messages",
            "",
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi", "audio": "a"}]}),
            "messages[0].audio",
            "",
        ),
    ] {
        let (status, resp) = server.post(path, &body, key);
        assert_eq!(status, 400, "{body}: {resp}");
        err(status, &resp, field);
        if !field.is_empty() {
            assert_eq!(resp["error"]["param"], field, "{resp}");
        }
        if !code.is_empty() {
            assert_eq!(resp["error"]["code"], code, "{resp}");
        }
    }

    // Roles: the usual four, and those the template itself names (Llama 3's `ipython`).
    let template = "{% for m in messages %}{% if m['role'] == 'ipython' %}<out>{% endif %}{{ m['content'] }}{% endfor %}";
    for (role, want) in [("ipython", 200), ("wizard", 400)] {
        let body = json!({"model": MODEL, "messages": [{"role": role, "content": "hi"}],
                          "max_tokens": 2, "chat_template": template});
        let (status, resp) = server.post("/v1/chat/completions", &body, key);
        assert_eq!(status, want, "{role}: {resp}");
    }

    // logit_bias: +100 makes every token that token; ids outside the vocabulary and biases
    // outside [-100, 100] are refused.
    let biased = json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 6,
                        "temperature": 0.8, "seed": 1, "logit_bias": {"1234": 100}});
    let (status, resp) = server.post("/v1/completions", &biased, key);
    assert_eq!(status, 200, "{resp}");
    let (_, six) = server.post("/detokenize", &json!({"tokens": vec![1234u32; 6]}), key);
    assert_eq!(resp["choices"][0]["text"], six["prompt"], "{resp}");
    for bias in [json!({"99999999": 1}), json!({"5": 200}), json!({"x": 1})] {
        let body = json!({"model": MODEL, "prompt": "x", "logit_bias": bias});
        let (status, resp) = server.post("/v1/completions", &body, key);
        assert_eq!(status, 400, "{resp}");
        assert_eq!(resp["error"]["param"], "logit_bias", "{resp}");
    }

    // Structured output through OpenAI's response_format and vLLM's fields.
    let schema = json!({"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                        "population": {"type": "integer", "minimum": 0, "maximum": 100000000}},
                        "required": ["city", "population"], "additionalProperties": false});
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "A city as JSON."}],
                      "max_tokens": 100, "temperature": 0.8, "n": 2, "seed": 5,
                      "response_format": {"type": "json_schema",
                                          "json_schema": {"name": "city", "schema": schema, "strict": true}}});
    let (status, resp) = server.post("/v1/chat/completions", &body, key);
    assert_eq!(status, 200, "{resp}");
    for c in resp["choices"].as_array().unwrap() {
        let text = c["message"]["content"].as_str().unwrap();
        let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert!(v["city"].is_string() && v["population"].is_u64(), "{v}");
        assert_eq!(v.as_object().unwrap().len(), 2, "{v}");
    }
    let body = json!({"model": MODEL, "prompt": "Is the sky blue? Answer:", "max_tokens": 5,
                      "guided_choice": ["yes", "no"]});
    let (status, resp) = server.post("/v1/completions", &body, key);
    assert_eq!(status, 200, "{resp}");
    assert!(
        ["yes", "no"].contains(&resp["choices"][0]["text"].as_str().unwrap()),
        "{resp}"
    );

    // Malformed JSON, sent raw.
    let mut resp = Server::agent()
        .post(format!("{}/v1/completions", server.base))
        .header("Authorization", "Bearer k")
        .header("Content-Type", "application/json")
        .send("{\"model\": ")
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let body: Value = serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).unwrap();
    err(400, &body, "malformed JSON");

    // With one request in flight, a second is refused with 503; then the server serves again.
    let long = json!({"model": MODEL, "prompt": "x", "max_tokens": 300, "ignore_eos": true});
    std::thread::scope(|s| {
        let first = s.spawn(|| server.post("/v1/completions", &long, key));
        let deadline = Instant::now() + Duration::from_secs(20);
        while server.metric("trtllm_http_requests_in_flight") < 1.0 {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(20));
        }
        let (status, body) = server.post("/v1/completions", &ok, key);
        assert_eq!(status, 503, "{body}");
        err(status, &body, "overloaded");
        assert_eq!(first.join().unwrap().0, 200);
    });
    let (status, body) = server.post("/v1/completions", &ok, key);
    assert_eq!(status, 200);
    // The golden continuation is " Paris.\n\nThe answer is: ..." (4 tokens: " Paris", ".", "\n", "\n").
    assert_eq!(body["choices"][0]["text"], " Paris.\n\n");
    assert_eq!(body["usage"]["completion_tokens"], 4);
}

/// vLLM's /tokenize and /detokenize round-trip and count a chat prompt as the chat endpoint
/// does; /version answers; with --lenient-requests an unsupported field is ignored (and
/// logged) instead of refused; `model` may be left out, or be any of the served names.
#[test]
fn tokenize_detokenize_version_and_lenient_requests() {
    let server = Server::start(&["--lenient-requests", "--served-model-name", "alias"]);
    let text = "Hello, world! ünïcödé 漢字 🙂";
    let (status, t) = server.post("/tokenize", &json!({"prompt": text}), None);
    assert_eq!(status, 200, "{t}");
    assert_eq!(
        t["count"].as_u64(),
        Some(t["tokens"].as_array().unwrap().len() as u64)
    );
    assert_eq!(t["max_model_len"], 1024);
    let (status, d) = server.post("/detokenize", &json!({"tokens": t["tokens"]}), None);
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["prompt"], text);
    let (status, d) = server.post("/detokenize", &json!({"tokens": [99_999_999]}), None);
    assert_eq!(status, 400, "{d}");

    let messages = json!([{"role": "user", "content": "What is 2 + 2?"}]);
    let (_, t) = server.post("/tokenize", &json!({"messages": messages}), None);
    let chat = json!({"messages": messages, "max_tokens": 1, "best_of": 1});
    let (status, c) = server.post("/v1/chat/completions", &chat, None);
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["usage"]["prompt_tokens"], t["count"]);

    let get = |path: &str| -> Value {
        let mut resp = Server::agent()
            .get(format!("{}{path}", server.base))
            .call()
            .unwrap();
        serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).unwrap()
    };
    assert!(get("/version")["version"].is_string());
    // Two names for the one model: both listed, and a response names the one asked for.
    let ids: Vec<Value> = get("/v1/models")["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(ids, [json!(MODEL), json!("alias")]);
    let (status, c) = server.post(
        "/v1/completions",
        &json!({"model": "alias", "prompt": "x", "max_tokens": 1}),
        None,
    );
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["model"], "alias");
}

fn trtllm(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_trtllm"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "trtllm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn bench_throughput_in_process_and_latency_over_http() {
    let e = engine().to_str().unwrap();
    let table = trtllm(&[
        "bench",
        "throughput",
        "--model",
        e,
        "--num-requests",
        "6",
        "--input-len",
        "24",
        "--output-len",
        "8",
    ]);
    assert!(
        table.contains("output throughput (tok/s)") && table.contains("TTFT"),
        "{table}"
    );
    assert!(table.contains("48"), "6 × 8 output tokens: {table}");

    let server = Server::start(&[]);
    let json = trtllm(&[
        "bench",
        "latency",
        "--url",
        &server.base,
        "--num-requests",
        "3",
        "--input-len",
        "16",
        "--output-len",
        "6",
        "--json",
    ]);
    let r: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(r["requests"], 3);
    assert_eq!(r["concurrency"], 1);
    assert_eq!(r["output_tokens"], 18);
    assert_eq!(r["input_tokens"], 48);
    for k in ["ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"] {
        assert!(r[k]["p50"].as_f64().unwrap() > 0.0, "{k}: {json}");
        assert!(r[k]["p99"].as_f64().unwrap() >= r[k]["p50"].as_f64().unwrap());
    }
    let table = trtllm(&[
        "bench",
        "latency",
        "--url",
        &server.base,
        "--num-requests",
        "2",
        "--input-len",
        "8",
        "--output-len",
        "4",
    ]);
    assert!(table.contains("p99") && table.contains("E2E"), "{table}");
}

/// `--chat-template` shows tools to the model: /tokenize counts the prompt the chat endpoint
/// renders with them, a forced call comes back as `tool_calls` (whole, and streamed as one
/// opening delta with id and name followed by argument pieces), and a bad parser name is
/// refused at start.
#[test]
fn tool_calls_through_a_chat_template_file() {
    let template =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/chat_templates/chatml-tools.jinja");
    let server = Server::start(&["--chat-template", template.to_str().unwrap()]);
    let tools = json!([{"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"], "additionalProperties": false}}}]);
    let messages = json!([{"role": "user", "content": "What is 2 + 3?"}]);
    let (status, t) = server.post(
        "/tokenize",
        &json!({"messages": messages, "tools": tools}),
        None,
    );
    assert_eq!(status, 200, "{t}");
    let named = json!({"type": "function", "function": {"name": "add"}});
    let body = json!({"messages": messages, "tools": tools, "tool_choice": named,
                      "max_tokens": 60, "temperature": 0});
    let (status, c) = server.post("/v1/chat/completions", &body, None);
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["usage"]["prompt_tokens"], t["count"]);
    let call = &c["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "add", "{c}");
    assert_eq!(call["type"], "function");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(args["a"].is_i64() && args["b"].is_i64(), "{args}");

    let mut stream = json!({"stream": true});
    for (k, v) in body.as_object().unwrap() {
        stream[k] = v.clone();
    }
    let mut resp = Server::agent()
        .post(format!("{}/v1/chat/completions", server.base))
        .header("Content-Type", "application/json")
        .send(stream.to_string())
        .unwrap();
    let (mut opened, mut arguments) = (0, String::new());
    for line in BufReader::new(resp.body_mut().as_reader()).lines() {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ").filter(|d| *d != "[DONE]") else {
            continue;
        };
        let chunk: Value = serde_json::from_str(data).unwrap();
        for d in chunk["choices"][0]["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            assert_eq!(d["index"], 0);
            if d.get("id").is_some() {
                opened += 1;
                assert_eq!(d["function"]["name"], "add");
            }
            arguments.push_str(d["function"]["arguments"].as_str().unwrap());
        }
    }
    assert_eq!(opened, 1);
    assert_eq!(arguments, call["function"]["arguments"].as_str().unwrap());

    let out = Command::new(env!("CARGO_BIN_EXE_trtllm"))
        .args([
            "serve",
            engine().to_str().unwrap(),
            "--tool-call-parser",
            "xml",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("hermes"));
}

/// `echo` puts the prompt before the completion (its tokens first in `logprobs`, the first
/// with none), streamed too; `prompt_logprobs` returns vLLM's per-token maps, and is refused
/// with streaming.
#[test]
fn echo_and_prompt_logprobs() {
    let server = Server::start(&[]);
    let prompt = "The capital of France is";
    let body = json!({"prompt": prompt, "max_tokens": 4, "temperature": 0, "echo": true,
                      "logprobs": 2});
    let (status, c) = server.post("/v1/completions", &body, None);
    assert_eq!(status, 200, "{c}");
    let choice = &c["choices"][0];
    let text = choice["text"].as_str().unwrap();
    assert!(text.starts_with(prompt) && text.len() > prompt.len(), "{c}");
    let (_, t) = server.post("/tokenize", &json!({"prompt": prompt}), None);
    let n_prompt = t["count"].as_u64().unwrap() as usize;
    let lps = &choice["logprobs"];
    assert_eq!(lps["tokens"].as_array().unwrap().len(), n_prompt + 4);
    assert!(lps["token_logprobs"][0].is_null() && lps["top_logprobs"][0].is_null());
    assert!(lps["token_logprobs"][1].as_f64().unwrap() < 0.0);
    assert_eq!(
        lps["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect::<String>(),
        text
    );

    let (_, plain) = server.post(
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 4, "temperature": 0}),
        None,
    );
    let (streamed, _) = server.stream(&json!({"prompt": prompt, "max_tokens": 4, "temperature": 0,
                                             "echo": true, "stream": true}));
    assert_eq!(
        streamed,
        format!("{prompt}{}", plain["choices"][0]["text"].as_str().unwrap())
    );

    let chat = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                      "prompt_logprobs": 1});
    let (status, c) = server.post("/v1/chat/completions", &chat, None);
    assert_eq!(status, 200, "{c}");
    let rows = c["prompt_logprobs"].as_array().unwrap();
    assert_eq!(
        rows.len() as u64,
        c["usage"]["prompt_tokens"].as_u64().unwrap()
    );
    assert!(rows[0].is_null());
    assert!(rows[1..]
        .iter()
        .all(|r| (1..=2).contains(&r.as_object().unwrap().len())));

    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    let (status, e) = server.post("/v1/chat/completions", &streamed, None);
    assert_eq!(status, 400, "{e}");
    assert_eq!(e["error"]["param"], "prompt_logprobs");
    let (status, e) = server.post(
        "/v1/completions",
        &json!({"prompt": "x", "echo": true, "logprobs": 1, "stream": true}),
        None,
    );
    assert_eq!(status, 400, "{e}");
}
