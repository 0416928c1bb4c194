//! Soak: `trtllm serve` under 48 streaming clients that finish, disconnect mid-stream, abort
//! before the answer and read slowly, past the admission limit (503s), beside 1,000 idle and
//! half-sent connections that the header deadline keeps closing, for `TRTLLM_SOAK_SECS`
//! (default 60). Asserts: every stream read to its end finishes cleanly (no request lost),
//! `/health` answers within a second throughout, nothing is left running or holding KV blocks
//! afterwards, and greedy output is the same before and after.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{Server, MODEL};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const CLIENTS: usize = 48;
const IDLE: usize = 1000;

#[derive(Default)]
struct Tally {
    finished: AtomicUsize,
    dropped: AtomicUsize,
    aborted: AtomicUsize,
    overloaded: AtomicUsize,
    lost: Mutex<Vec<String>>,
}

fn greedy(server: &Server) -> String {
    let body = json!({"model": MODEL, "prompt": "The three primary colors are", "max_tokens": 24, "temperature": 0});
    let (status, resp) = server.post("/v1/completions", &body, None);
    assert_eq!(status, 200, "{resp}");
    resp["choices"][0]["text"].as_str().unwrap().to_string()
}

/// One streaming request, read to the end (slowly when `slow`) or dropped after `keep` events.
fn stream(server: &Server, rng: &mut StdRng, tally: &Tally, keep: Option<usize>, slow: bool) {
    let n = if rng.random_bool(0.2) { 3 } else { 1 };
    let (path, mut body) = if rng.random_bool(0.5) {
        let prompt = format!("Story {} begins:", rng.random_range(0..1000));
        ("/v1/completions", json!({"prompt": prompt}))
    } else {
        let content = format!("Name {} animals.", rng.random_range(2..9));
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": content}]}),
        )
    };
    body["model"] = MODEL.into();
    body["stream"] = true.into();
    body["n"] = n.into();
    body["max_tokens"] = rng.random_range(4..40).into();
    body["temperature"] = 0.8.into();
    body["seed"] = rng.random_range(0..1000).into();
    let resp = Server::agent()
        .post(format!("{}{path}", server.base))
        .header("Content-Type", "application/json")
        .send(body.to_string());
    let Ok(mut resp) = resp else {
        tally
            .lost
            .lock()
            .unwrap()
            .push(format!("{path}: no response"));
        return;
    };
    match resp.status().as_u16() {
        200 => {}
        503 => {
            tally.overloaded.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(200));
            return;
        }
        s => {
            let text = resp.body_mut().read_to_string().unwrap_or_default();
            tally
                .lost
                .lock()
                .unwrap()
                .push(format!("{path}: {s} {text}"));
            return;
        }
    }
    let mut finishes = 0;
    let mut done = false;
    for (i, line) in BufReader::new(resp.body_mut().as_reader())
        .lines()
        .enumerate()
    {
        if keep == Some(i) {
            tally.dropped.fetch_add(1, Ordering::Relaxed);
            return; // the connection closes with the reader
        }
        if slow {
            std::thread::sleep(Duration::from_millis(100));
        }
        let Ok(line) = line else { break };
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
            break;
        }
        let event: Value = serde_json::from_str(data).unwrap_or(Value::Null);
        if event.get("error").is_some() || event.is_null() {
            tally.lost.lock().unwrap().push(format!("{path}: {data}"));
            return;
        }
        finishes += event["choices"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| matches!(c["finish_reason"].as_str(), Some("stop" | "length")))
            .count();
    }
    if done && finishes == n {
        tally.finished.fetch_add(1, Ordering::Relaxed);
    } else {
        let what = format!("{path}: [DONE] {done}, {finishes} of {n} choices finished");
        tally.lost.lock().unwrap().push(what);
    }
}

/// Sends a whole request and closes the socket before any answer.
fn abort(addr: &str, tally: &Tally) {
    let body = json!({"model": MODEL, "prompt": "Abandoned", "max_tokens": 32, "stream": true})
        .to_string();
    if let Ok(mut s) = TcpStream::connect(addr) {
        let head = format!(
            "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let _ = s.write_all(head.as_bytes());
        let _ = s.write_all(body.as_bytes());
        tally.aborted.fetch_add(1, Ordering::Relaxed);
    }
}

fn client(server: &Server, seed: u64, until: Instant, tally: &Tally) {
    let mut rng = StdRng::seed_from_u64(seed);
    let addr = server.base.trim_start_matches("http://");
    while Instant::now() < until {
        match rng.random_range(0..10) {
            0..=4 => stream(server, &mut rng, tally, None, false),
            5 | 6 => {
                let keep = rng.random_range(1..6);
                stream(server, &mut rng, tally, Some(keep), false)
            }
            7 => abort(addr, tally),
            _ => stream(server, &mut rng, tally, None, true),
        }
    }
}

/// Keeps `IDLE` connections open (a tenth with half-sent headers), reopening each one the
/// server's header deadline closes; returns how many it reopened.
fn idle_connections(addr: &str, stop: &AtomicBool) -> usize {
    let open = |i: usize| -> TcpStream {
        let mut s = TcpStream::connect(addr).expect("idle connection");
        if i.is_multiple_of(10) {
            s.write_all(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n")
                .unwrap();
        }
        s.set_nonblocking(true).unwrap();
        s
    };
    let mut conns: Vec<TcpStream> = (0..IDLE).map(open).collect();
    let mut reopened = 0;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(500));
        for (i, c) in conns.iter_mut().enumerate() {
            let mut buf = [0u8; 1024];
            match c.read(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                _ => {
                    *c = open(i);
                    reopened += 1;
                }
            }
        }
    }
    reopened
}

/// The slowest `/health` answer, each on a new connection, every 200 ms until `stop`.
fn health(server: &Server, stop: &AtomicBool) -> (Duration, usize) {
    let (mut worst, mut checks) = (Duration::ZERO, 0);
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let status = Server::agent()
            .get(format!("{}/health", server.base))
            .call()
            .map(|r| r.status().as_u16());
        assert_eq!(status.ok(), Some(200), "/health failed during the soak");
        worst = worst.max(started.elapsed());
        checks += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    (worst, checks)
}

#[test]
fn the_server_holds_up_under_a_mixed_load() {
    let secs: u64 = std::env::var("TRTLLM_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let server = Server::start(&["--max-pending-sequences", "48", "--header-timeout", "10"]);
    let addr = server.base.trim_start_matches("http://").to_string();
    let before = greedy(&server);
    let tally = Tally::default();
    let stop = AtomicBool::new(false);
    let until = Instant::now() + Duration::from_secs(secs);

    let ((worst, checks), reopened) = std::thread::scope(|s| {
        let idle = s.spawn(|| idle_connections(&addr, &stop));
        let health = s.spawn(|| health(&server, &stop));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|i| {
                let (server, tally) = (&server, &tally);
                s.spawn(move || client(server, i as u64, until, tally))
            })
            .collect();
        for c in clients {
            c.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        (health.join().unwrap(), idle.join().unwrap())
    });

    let lost = tally.lost.lock().unwrap();
    let finished = tally.finished.load(Ordering::Relaxed);
    eprintln!(
        "soak {secs} s: {finished} streams finished, {} dropped mid-stream, {} aborted before the \
         answer, {} overloaded (503), {} lost; /health worst {worst:?} over {checks} checks; \
         {reopened} idle connections reopened after the header deadline",
        tally.dropped.load(Ordering::Relaxed),
        tally.aborted.load(Ordering::Relaxed),
        tally.overloaded.load(Ordering::Relaxed),
        lost.len(),
    );
    assert!(lost.is_empty(), "requests lost: {lost:#?}");
    assert!(finished >= CLIENTS, "only {finished} streams finished");
    assert!(worst < Duration::from_secs(1), "/health took {worst:?}");

    // Every dropped and aborted request is cancelled: nothing left running or holding blocks.
    let settled = Instant::now();
    let left = || {
        [
            "trtllm_num_requests_running ",
            "trtllm_num_requests_waiting ",
            "trtllm_kv_cache_used_blocks ",
        ]
        .map(|m| server.metric(m))
    };
    while left() != [0.0; 3] {
        assert!(
            settled.elapsed() < Duration::from_secs(15),
            "left after the soak: {:?}",
            left()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        greedy(&server),
        before,
        "greedy output changed after the soak"
    );
}
