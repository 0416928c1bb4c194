//! `trtllm router` over two `trtllm serve` replicas on loopback: requests sharing a long system
//! prompt all land on the replica that caches it (the replicas report those tokens as cached,
//! and fewer prompt tokens are computed in all than when the same requests go round-robin); a
//! request a replica drops before answering goes to another; with none left, a 503.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{post_at, stream_at, tiny_engine, Server, MODEL};
use serde_json::{json, Value};

struct Router {
    child: Child,
    base: String,
}

impl Router {
    fn start(backends: &[&Server], policy: &str) -> Router {
        let urls: Vec<&str> = backends.iter().map(|b| b.base.as_str()).collect();
        Self::start_with(&urls, policy)
    }

    fn start_with(backends: &[&str], policy: &str) -> Router {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_trtllm"));
        cmd.args(["router", "--port", "0", "--policy", policy]);
        for b in backends {
            cmd.args(["--backend", b]);
        }
        let mut child = cmd
            .stderr(Stdio::piped())
            .spawn()
            .expect("start trtllm router");
        let base = common::listening(&mut child);
        let router = Router { child, base };
        router.wait_for(backends.len());
        router
    }

    fn stats(&self) -> Value {
        let mut r = Server::agent()
            .get(format!("{}/router/stats", self.base))
            .call()
            .unwrap();
        serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap()
    }

    /// Waits until the router follows `n` healthy replicas.
    fn wait_for(&self, n: usize) {
        let start = Instant::now();
        loop {
            let s = self.stats();
            let up = s["replicas"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["healthy"] == true)
                .count();
            if up == n {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "replicas up: {s}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A completion through the router: status, body and the replica that answered.
    fn complete(&self, prompt: &str) -> (u16, Value, String) {
        let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0.0});
        let mut resp = Server::agent()
            .post(format!("{}/v1/completions", self.base))
            .header("Content-Type", "application/json")
            .send(body.to_string())
            .unwrap();
        let replica = resp
            .headers()
            .get("x-trtllm-replica")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let text = resp.body_mut().read_to_string().unwrap();
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (resp.status().as_u16(), v, replica)
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// 32 prompts over 4 system prompts of several KV blocks each, two of a topic after another
/// (round-robin splits each topic over both replicas).
fn prompts() -> Vec<(usize, String)> {
    let topics = ["astronomy", "cooking", "sailing", "geology"];
    (0..32)
        .map(|i| {
            let t = (i / 2) % 4;
            let system = format!(
                "You are a patient tutor of {0}. Answer every question about {0} with care, \
                 in plain words, and say so when you are not sure. Topic: {0}. Question: ",
                topics[t]
            );
            (t, format!("{system}number {i}?"))
        })
        .collect()
}

/// Sends every prompt through `router`, 8 at a time; the replica each one landed on.
fn run_all(router: &Router, prompts: &[(usize, String)]) -> Vec<(usize, String)> {
    prompts
        .chunks(8)
        .flat_map(|wave| {
            std::thread::scope(|s| {
                let handles: Vec<_> = wave
                    .iter()
                    .map(|(t, p)| {
                        s.spawn(move || {
                            let (status, body, replica) = router.complete(p);
                            assert_eq!(status, 200, "{body}");
                            (*t, replica)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect()
}

fn cached_and_prompt_tokens(servers: &[&Server]) -> (f64, f64) {
    servers.iter().fold((0.0, 0.0), |(c, p), s| {
        (
            c + s.metric("trtllm_prefix_cache_hit_tokens_total "),
            p + s.metric("trtllm_prompt_tokens_total "),
        )
    })
}

fn replicas(engine: &Path) -> (Server, Server) {
    (Server::start_on(engine, &[]), Server::start_on(engine, &[]))
}

#[test]
fn a_system_prompt_sticks_to_one_replica_and_saves_prefill_over_round_robin() {
    let engine = tiny_engine();
    let prompts = prompts();

    let (a, b) = replicas(engine);
    let router = Router::start(&[&a, &b], "cache-aware");
    let landed = run_all(&router, &prompts);
    for t in 0..4 {
        let mut on: Vec<&str> = landed
            .iter()
            .filter(|(u, _)| *u == t)
            .map(|(_, r)| r.as_str())
            .collect();
        on.dedup();
        assert_eq!(on.len(), 1, "topic {t} went to {on:?}");
    }
    let used: std::collections::BTreeSet<_> = landed.iter().map(|(_, r)| r.clone()).collect();
    assert_eq!(used.len(), 2, "both replicas take topics: {used:?}");
    let (cached, prompt) = cached_and_prompt_tokens(&[&a, &b]);
    drop(router);
    drop((a, b));

    let (a, b) = replicas(engine);
    let router = Router::start(&[&a, &b], "round-robin");
    run_all(&router, &prompts);
    let (rr_cached, rr_prompt) = cached_and_prompt_tokens(&[&a, &b]);
    assert_eq!(prompt, rr_prompt);
    assert!(
        prompt - cached < rr_prompt - rr_cached,
        "prompt tokens computed: cache-aware {} vs round-robin {}",
        prompt - cached,
        rr_prompt - rr_cached
    );
}

#[test]
fn streams_chats_models_and_errors_pass_through_unchanged() {
    let a = Server::start_on(tiny_engine(), &[]);
    let router = Router::start(&[&a], "cache-aware");
    let via = router.base.as_str();
    // A streamed completion: the same text and finish reason as from the replica itself.
    let body = json!({
        "model": MODEL, "prompt": "The assert statement is", "max_tokens": 6,
        "temperature": 0.0, "stream": true, "ignore_eos": true,
    });
    assert_eq!(stream_at(via, &body), a.stream(&body));
    // A chat (its prompt tokenized by the replica for routing) and the model list.
    let chat = json!({
        "model": MODEL, "max_tokens": 4, "temperature": 0.0,
        "messages": [{"role": "user", "content": "Say hello"}],
    });
    let (status, routed) = post_at(via, "/v1/chat/completions", &chat, None);
    assert_eq!(status, 200, "{routed}");
    let (_, direct) = a.post("/v1/chat/completions", &chat, None);
    assert_eq!(
        routed["choices"][0]["message"]["content"],
        direct["choices"][0]["message"]["content"]
    );
    let mut models = Server::agent()
        .get(format!("{}/v1/models", router.base))
        .call()
        .unwrap();
    let models: Value = serde_json::from_str(&models.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(models["data"][0]["id"], MODEL);
    // The replica's errors keep their status and shape; the router's own are the same shape.
    let bad = json!({"model": MODEL, "prompt": "x", "max_tokens": 1, "temperature": -1.0});
    let (status, err) = post_at(via, "/v1/completions", &bad, None);
    assert_eq!(status, 400, "{err}");
    assert_eq!(err, a.post("/v1/completions", &bad, None).1);
    let mut resp = Server::agent()
        .post(format!("{via}/v1/completions"))
        .send("{not json")
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let err: Value = serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).unwrap();
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not JSON"),
        "{err}"
    );
}

/// A replica that looks healthy to the router (its `/kv_events` stream is up) but drops every
/// request it is sent without answering, as one that died after its last event would.
fn dropping_replica() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                if head.starts_with(b"GET /kv_events") {
                    let config =
                        r#"{"block_size":32,"block_reuse":true,"hash":"siphash13-chain-v1"}"#;
                    let _ = write!(
                        conn,
                        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n\
                         event: config\ndata: {config}\n\n"
                    );
                    std::thread::sleep(Duration::from_secs(600));
                }
            });
        }
    });
    base
}

#[test]
fn a_request_a_replica_drops_goes_to_another_and_none_left_is_a_503() {
    let a = Server::start_on(tiny_engine(), &[]);
    let dropping = dropping_replica();
    let router = Router::start_with(&[a.base.as_str(), dropping.as_str()], "round-robin");
    let landed = run_all(&router, &prompts()[..16]);
    assert!(landed.iter().all(|(_, r)| *r == a.base), "{landed:?}");
    let s = router.stats();
    let dropped = &s["replicas"][1];
    assert_eq!(dropped["routed"], 0, "{s}");
    assert!(dropped["failed_before_start"].as_u64().unwrap() >= 1, "{s}");
    // The live replica goes away: the router says so with a 503 (once it has seen it go, or
    // at once where every replica drops the request).
    drop(a);
    let start = Instant::now();
    loop {
        let (status, body, _) = router.complete("hello");
        if status == 503 {
            assert!(body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("no replica"));
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{status} {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
