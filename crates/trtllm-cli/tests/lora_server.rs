//! LoRA adapters through `trtllm serve` (vLLM's `--lora-modules`, `/v1/load_lora_adapter`,
//! `/v1/unload_lora_adapter`): a request's `model` selects its adapter, and its text is what
//! `trtllm run --lora` gives (both through the executor, which tests/lora*.rs check against
//! peft); `/v1/models` lists adapters with their base as `parent`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{tiny_engine, Server, MODEL};
use serde_json::{json, Value};
use trtllm_tests::fixtures;

const PROMPT: &str = "The assert statement is";

fn adapter(name: &str) -> PathBuf {
    fixtures().join("lora").join(name)
}

/// `trtllm run`'s greedy text for PROMPT, with `--lora DIR` when given.
fn run_text(engine: &Path, lora: Option<&Path>) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_trtllm"));
    cmd.args([
        "run",
        "--model",
        engine.to_str().unwrap(),
        "--prompt",
        PROMPT,
    ])
    .args(["--max-tokens", "8", "--ignore-eos", "--json"]);
    if let Some(dir) = lora {
        cmd.arg("--lora").arg(dir);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["outputs"][0]["text"].as_str().unwrap().to_string()
}

fn complete(server: &Server, model: &str) -> (u16, Value) {
    let body = json!({
        "model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0.0,
        "ignore_eos": true,
    });
    server.post("/v1/completions", &body, None)
}

fn text(resp: &Value) -> String {
    resp["choices"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn adapters_are_served_by_name_loaded_and_unloaded() {
    let engine = tiny_engine();
    let r8 = adapter("tiny-llama-r8");
    let module = format!("r8={}", r8.display());
    let server = Server::start_on(engine, &["--lora-modules", &module]);

    let mut resp = Server::agent()
        .get(format!("{}/v1/models", server.base))
        .call()
        .unwrap();
    let models: Value = serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).unwrap();
    let listed = &models["data"][1];
    assert_eq!(listed["id"], "r8", "{models}");
    assert_eq!(listed["parent"], MODEL, "{models}");
    assert_eq!(listed["root"], r8.display().to_string(), "{models}");

    let (status, base) = complete(&server, MODEL);
    assert_eq!(status, 200, "{base}");
    assert_eq!(text(&base), run_text(engine, None));
    let (status, adapted) = complete(&server, "r8");
    assert_eq!(status, 200, "{adapted}");
    assert_eq!(text(&adapted), run_text(engine, Some(&r8)));
    assert_ne!(text(&adapted), text(&base));
    assert_eq!(adapted["model"], "r8");

    // Loaded at run time, used, refused twice, unloaded.
    let qv = adapter("tiny-llama-r4-qv-rslora");
    let load = json!({"lora_name": "qv", "lora_path": qv});
    let (status, msg) = server.post("/v1/load_lora_adapter", &load, None);
    assert_eq!(status, 200, "{msg}");
    let (status, resp) = complete(&server, "qv");
    assert_eq!(status, 200, "{resp}");
    assert_eq!(text(&resp), run_text(engine, Some(&qv)));
    let (status, again) = server.post("/v1/load_lora_adapter", &load, None);
    assert_eq!(status, 400, "{again}");
    let bad = json!({"lora_name": "phi3", "lora_path": adapter("tiny-phi3-r8-fused")});
    let (status, err) = server.post("/v1/load_lora_adapter", &bad, None);
    assert_eq!(status, 400, "{err}");
    let message = err["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("LoRA adapter phi3") && message.contains("shape"),
        "{err}"
    );
    let unload = json!({"lora_name": "qv"});
    let (status, msg) = server.post("/v1/unload_lora_adapter", &unload, None);
    assert_eq!(status, 200, "{msg}");
    let (status, gone) = complete(&server, "qv");
    assert_eq!(status, 404, "{gone}");
    assert_eq!(gone["error"]["code"], "model_not_found", "{gone}");
    let (status, _) = server.post("/v1/unload_lora_adapter", &unload, None);
    assert_eq!(status, 404);
}

#[test]
fn a_bad_lora_module_stops_the_server_before_it_listens() {
    let module = format!("phi3={}", adapter("tiny-phi3-r8-fused").display());
    let out = Command::new(env!("CARGO_BIN_EXE_trtllm"))
        .args(["serve", tiny_engine().to_str().unwrap(), "--port", "0"])
        .args(["--lora-modules", &module])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--lora-modules") && err.contains("LoRA adapter phi3"),
        "{err}"
    );
}
