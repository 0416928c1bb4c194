//! What the server tests share: the demo engine built once per test binary, and a `trtllm
//! serve` child process on a free port with helpers to talk to it.

#![allow(dead_code)] // each test binary uses its own part

pub mod ranks;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use serde_json::Value;
use trtllm_api::builder::BuildConfig;
use trtllm_tests::{fixtures, shared_engine, smollm2_gguf};

pub const MODEL: &str = "smollm2";
pub const EOS: u32 = 2;

/// One engine per test binary, built for 64 concurrent sequences of up to 1024 tokens, under
/// the target's scratch directory (a temporary directory held by a static is never removed:
/// each run would leave half a gigabyte behind).
pub fn engine() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let config = BuildConfig {
            max_batch_size: 64,
            max_seq_len: 1024,
            ..BuildConfig::default()
        };
        let gguf = smollm2_gguf().expect("demo model");
        let name = format!("{}-engine", env!("CARGO_CRATE_NAME"));
        shared_engine(env!("CARGO_TARGET_TMPDIR"), &name, &gguf, &config)
            .expect("build SmolLM2 engine")
    })
}

/// One tiny-llama engine per test binary (its tests run in parallel and share it).
pub fn tiny_engine() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let tiny = fixtures().join("tiny-llama");
        let name = format!("{}-tiny-engine", env!("CARGO_CRATE_NAME"));
        shared_engine(
            env!("CARGO_TARGET_TMPDIR"),
            &name,
            &tiny,
            &BuildConfig::default(),
        )
        .expect("build tiny-llama engine")
    })
}

/// The Python interpreter with `openai` and `jsonschema` installed: `TRTLLM_TEST_PYTHON`, or the
/// venv that `cargo xtask test` creates in the cache.
pub fn openai_python() -> PathBuf {
    if let Some(p) = std::env::var_os("TRTLLM_TEST_PYTHON") {
        return p.into();
    }
    let venv = trtllm_api::cache_dir().join("venv-openai/bin/python");
    assert!(
        venv.exists(),
        "{} not found: run `cargo xtask test` (it installs the openai client) or set \
         TRTLLM_TEST_PYTHON to a python with `openai` and `jsonschema` installed",
        venv.display()
    );
    venv
}

pub fn golden() -> Value {
    let path = fixtures().join("smollm2-135m-instruct.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

pub struct Server {
    pub child: Child,
    pub base: String,
}

impl Server {
    /// Starts `trtllm serve` on a free port and waits for its "listening on" line.
    pub fn start(extra: &[&str]) -> Server {
        Self::start_on(engine(), extra)
    }

    /// [`Self::start`] on another engine.
    pub fn start_on(engine: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_trtllm"))
            .args(["serve", engine.to_str().unwrap(), "--port", "0"])
            .args(["--served-model-name", MODEL])
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start trtllm serve");
        let base = listening(&mut child);
        Server { child, base }
    }

    pub fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into()
    }

    /// POSTs JSON; returns status and parsed body.
    pub fn post(&self, path: &str, body: &Value, key: Option<&str>) -> (u16, Value) {
        post_at(&self.base, path, body, key)
    }

    pub fn metric(&self, name: &str) -> f64 {
        let mut resp = Self::agent()
            .get(format!("{}/metrics", self.base))
            .call()
            .unwrap();
        let text = resp.body_mut().read_to_string().unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("metric {name} missing from:\n{text}"))
    }

    /// Streams a completion; returns the concatenated text and the finish reason.
    pub fn stream(&self, body: &Value) -> (String, String) {
        stream_at(&self.base, body)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address a starting server (its stderr piped) prints in its "listening on" line; the rest
/// of its stderr is drained.
pub fn listening(child: &mut Child) -> String {
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let base = loop {
        let line = lines
            .next()
            .expect("server exited before listening")
            .unwrap();
        if let Some(addr) = line.strip_prefix("listening on ") {
            break addr.to_string();
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    base
}

/// POSTs JSON to the server at `base`; returns status and parsed body.
pub fn post_at(base: &str, path: &str, body: &Value, key: Option<&str>) -> (u16, Value) {
    let mut req = Server::agent()
        .post(format!("{base}{path}"))
        .header("Content-Type", "application/json");
    if let Some(k) = key {
        req = req.header("Authorization", format!("Bearer {k}"));
    }
    let mut resp = req.send(body.to_string()).expect("POST");
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Streams a completion from the server at `base`; returns the concatenated text and the finish
/// reason.
pub fn stream_at(base: &str, body: &Value) -> (String, String) {
    let mut resp = Server::agent()
        .post(format!("{base}/v1/completions"))
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let (mut text, mut finish, mut done) = (String::new(), String::new(), false);
    for line in BufReader::new(resp.body_mut().as_reader()).lines() {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
            break;
        }
        let chunk: Value = serde_json::from_str(data).unwrap();
        let c = &chunk["choices"][0];
        text.push_str(c["text"].as_str().unwrap_or(""));
        if let Some(f) = c["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    assert!(done, "stream ended without [DONE]");
    (text, finish)
}
