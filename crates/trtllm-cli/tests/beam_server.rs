//! Beam search through `trtllm serve` (vLLM's `use_beam_search`) and `trtllm run --beam-width`.

mod common;

use std::process::Command;

use common::{engine, Server};
use serde_json::{json, Value};

/// `run --beam-width 2 --n 2 --json`'s output for `prompt` (vLLM searches `n` beams).
fn run_beams(prompt: &str) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_trtllm"))
        .args([
            "run",
            "--model",
            engine().to_str().unwrap(),
            "--prompt",
            prompt,
        ])
        .args([
            "--beam-width",
            "2",
            "--n",
            "2",
            "--max-tokens",
            "12",
            "--json",
        ])
        .args(["--length-penalty", "0.5", "--early-stopping"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The server's beams are the CLI's (both through the executor's beam search, which
/// tests/beam_search.rs checks against transformers), ranked by score, with their cumulative
/// log-probabilities; sampling fields beside beams, and beam fields without them, are refused.
#[test]
fn use_beam_search_gives_the_n_best_beams_and_refuses_sampling_fields() {
    let prompt = "The capital of France is";
    let want = run_beams(prompt);
    let server = Server::start(&[]);
    let body = json!({
        "prompt": prompt, "max_tokens": 12, "n": 2, "use_beam_search": true,
        "length_penalty": 0.5, "early_stopping": true,
    });
    let (status, got) = server.post("/v1/completions", &body, None);
    assert_eq!(status, 200, "{got}");
    for j in 0..2 {
        let (a, b) = (&got["choices"][j], &want["outputs"][j]);
        assert_eq!(a["index"], j, "{got}");
        assert_eq!(a["text"], b["text"], "beam {j}: {got} vs {want}");
    }
    let c0 = want["outputs"][0]["cumulative_logprob"].as_f64().unwrap();
    assert!(c0 < 0.0, "{want}");
    // The beams forked a partly filled block of the 5-token prompt's.
    assert!(server.metric("trtllm_kv_cache_copied_blocks_total") > 0.0);
    for (bad, field) in [
        (json!({"temperature": 0.7}), "temperature"),
        (json!({"stop": ["."]}), "stop"),
        (
            json!({"n": 2, "use_beam_search": false, "length_penalty": 2.0}),
            "length_penalty",
        ),
    ] {
        let mut b = body.clone();
        for (k, v) in bad.as_object().unwrap() {
            b[k] = v.clone();
        }
        let (status, resp) = server.post("/v1/completions", &b, None);
        assert_eq!(status, 400, "{field}: {resp}");
        let message = resp["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(field), "{field}: {resp}");
    }
}
