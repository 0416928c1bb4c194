//! `GET /kv_events`: a cache-aware router's view of a replica. The stream opens with the block
//! size and hash name, and the blocks a prompt stores are named by the hashes
//! `trtllm_api::runtime::block_hashes` computes from its token ids, chained in order; it needs
//! the API key like every /v1 route. A prompt served from those blocks says so in its usage.

mod common;

use std::io::{BufRead, BufReader};
use std::sync::mpsc;
use std::time::Duration;

use common::{tiny_engine, Server, MODEL};
use serde_json::{json, Value};
use trtllm_api::runtime::block_hashes;

/// The named events of an SSE stream, parsed, in a channel (a reader thread per stream).
fn subscribe(server: &Server, key: &str) -> mpsc::Receiver<(String, Value)> {
    let resp = Server::agent()
        .get(format!("{}/kv_events", server.base))
        .header("Authorization", format!("Bearer {key}"))
        .call()
        .expect("GET /kv_events");
    assert_eq!(resp.status().as_u16(), 200);
    let (tx, rx) = mpsc::channel();
    let reader = BufReader::new(resp.into_body().into_reader());
    std::thread::spawn(move || {
        let mut name = String::new();
        for line in reader.lines() {
            let Ok(line) = line else { return };
            if let Some(n) = line.strip_prefix("event: ") {
                name = n.to_string();
            } else if let Some(d) = line.strip_prefix("data: ") {
                let v = serde_json::from_str(d).expect("event data is JSON");
                if tx.send((std::mem::take(&mut name), v)).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

#[test]
fn stored_blocks_are_named_by_the_hashes_of_the_prompt() {
    let key = "router-key";
    let server = Server::start_on(tiny_engine(), &["--api-key", key]);
    let unauthorized = Server::agent()
        .get(format!("{}/kv_events", server.base))
        .call()
        .unwrap();
    assert_eq!(
        unauthorized.status().as_u16(),
        401,
        "/kv_events without the key"
    );

    let events = subscribe(&server, key);
    let wait = Duration::from_secs(20);
    let (name, config) = events.recv_timeout(wait).expect("config event");
    assert_eq!(name, "config");
    assert_eq!(config["hash"], "siphash13-chain-v1");
    assert_eq!(config["block_reuse"], true);
    let bs = config["block_size"].as_u64().unwrap() as usize;

    // Three full blocks of prompt and a partial one; one generated token fills no other block.
    let prompt: Vec<u32> = (0..3 * bs as u32 + 5)
        .map(|i| (i * 37 + 11) % 1000)
        .collect();
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0.0});
    let (status, out) = server.post("/v1/completions", &body, Some(key));
    assert_eq!(status, 200, "{out}");
    let want = block_hashes(&prompt, bs, None);
    assert_eq!(want.len(), 3);
    let mut stored = Vec::new();
    while stored.len() < want.len() {
        let (name, ev) = events.recv_timeout(wait).expect("stored events");
        assert_eq!(name, "stored", "{ev}");
        assert_eq!(ev["num_tokens"].as_u64(), Some(bs as u64));
        stored.push((ev["hash"].as_u64().unwrap(), ev["parent_hash"].as_u64()));
    }
    let parents = [None, Some(want[0]), Some(want[1])];
    assert_eq!(stored, want.into_iter().zip(parents).collect::<Vec<_>>());
    let cached = |out: &Value| out["usage"]["prompt_tokens_details"]["cached_tokens"].clone();
    assert_eq!(cached(&out), 0);

    // The same prompt again computes only its partial block: the usage says so.
    let (status, again) = server.post("/v1/completions", &body, Some(key));
    assert_eq!(status, 200, "{again}");
    assert_eq!(cached(&again), 3 * bs, "{again}");

    // Ended by a stop string before the engine ended it: the usage still counts the cache.
    let stop = json!({"model": MODEL, "prompt": prompt, "max_tokens": 64, "temperature": 0.0,
                      "stop": [" ", "\n"], "ignore_eos": true});
    let (status, stopped) = server.post("/v1/completions", &stop, Some(key));
    assert_eq!(status, 200, "{stopped}");
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop", "{stopped}");
    assert!(
        stopped["usage"]["completion_tokens"].as_u64() < Some(64),
        "{stopped}"
    );
    assert_eq!(cached(&stopped), 3 * bs, "{stopped}");
}
