//! Bad input through the `trtllm` binary: each gives a non-zero exit and one line naming the
//! file or field and what was expected — never a panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn trtllm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trtllm"))
        .args(args)
        .output()
        .expect("run trtllm")
}

/// Asserts failure with a single `error:` line containing every needle; returns that line.
fn fails_with(out: Output, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "'{n}' not in: {}", lines[0]);
    }
    lines[0].to_string()
}

fn copy_fixture(name: &str, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(fixtures().join(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// `trtllm build` of checkpoint `ck` into a fresh engine directory under `t`.
fn build_from(ck: &Path, t: &Path) -> Output {
    trtllm(&[
        "build",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--output",
        t.join("e").to_str().unwrap(),
    ])
}

fn build_tiny(out: &Path, extra: &[&str]) {
    let ck = fixtures().join("tiny-llama");
    let mut args = vec![
        "build",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = trtllm(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn missing_directory() {
    let out = trtllm(&[
        "build",
        "--checkpoint",
        "/nonexistent/model",
        "--output",
        "/tmp/x",
    ]);
    fails_with(out, &["/nonexistent/model", "not found"]);
}

#[test]
fn config_without_num_attention_heads() {
    let t = tempfile::tempdir().unwrap();
    let ck = t.path().join("ck");
    copy_fixture("tiny-llama", &ck);
    let cfg = std::fs::read_to_string(ck.join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    v.as_object_mut().unwrap().remove("num_attention_heads");
    std::fs::write(ck.join("config.json"), v.to_string()).unwrap();
    let out = build_from(&ck, t.path());
    fails_with(out, &["config.json", "num_attention_heads"]);
}

#[test]
fn unknown_architecture() {
    let t = tempfile::tempdir().unwrap();
    let ck = t.path().join("ck");
    copy_fixture("tiny-llama", &ck);
    let cfg = std::fs::read_to_string(ck.join("config.json"))
        .unwrap()
        .replace("LlamaForCausalLM", "FalconForCausalLM");
    std::fs::write(ck.join("config.json"), cfg).unwrap();
    let out = build_from(&ck, t.path());
    fails_with(out, &["FalconForCausalLM", "supported"]);
}

#[test]
fn safetensors_truncated_by_one_byte() {
    let t = tempfile::tempdir().unwrap();
    let ck = t.path().join("ck");
    copy_fixture("tiny-llama", &ck);
    let st = ck.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() - 1]).unwrap();
    let out = build_from(&ck, t.path());
    fails_with(out, &["model.safetensors", "safetensors"]);
}

#[test]
fn gguf_with_bad_magic() {
    let t = tempfile::tempdir().unwrap();
    let f = t.path().join("bad.gguf");
    std::fs::write(&f, b"GGUX\x03\x00\x00\x00 and then some bytes").unwrap();
    let out = build_from(&f, t.path());
    fails_with(out, &["bad.gguf", "magic", "GGUF"]);
}

#[test]
fn engine_format_version_from_the_future() {
    let t = tempfile::tempdir().unwrap();
    let e = t.path().join("e");
    build_tiny(&e, &[]);
    let cfg = std::fs::read_to_string(e.join("config.json"))
        .unwrap()
        .replace("\"format_version\": 1", "\"format_version\": 99");
    std::fs::write(e.join("config.json"), cfg).unwrap();
    let out = trtllm(&[
        "run",
        "--engine",
        e.to_str().unwrap(),
        "--input-ids",
        "1,2,3",
    ]);
    fails_with(out, &["config.json", "version 99", "version 1"]);
}

#[test]
fn corrupt_engine_file() {
    let t = tempfile::tempdir().unwrap();
    let e = t.path().join("e");
    build_tiny(&e, &[]);
    let mut bytes = std::fs::read(e.join("rank0.engine")).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(e.join("rank0.engine"), bytes).unwrap();
    let out = trtllm(&[
        "run",
        "--engine",
        e.to_str().unwrap(),
        "--input-ids",
        "1,2,3",
    ]);
    fails_with(out, &["rank0.engine", "checksum"]);
}

#[test]
fn prompt_longer_than_max_seq_len() {
    let t = tempfile::tempdir().unwrap();
    let e = t.path().join("e");
    build_tiny(&e, &["--max-seq-len", "16"]);
    let ids = vec!["5"; 20].join(",");
    let out = trtllm(&["run", "--engine", e.to_str().unwrap(), "--input-ids", &ids]);
    fails_with(out, &["20 tokens", "at most 15", "max_input_len"]);
}

#[test]
fn top_p_out_of_range() {
    let t = tempfile::tempdir().unwrap();
    let e = t.path().join("e");
    build_tiny(&e, &[]);
    let out = trtllm(&[
        "run",
        "--engine",
        e.to_str().unwrap(),
        "--prompt",
        "hi",
        "--top-p",
        "1.5",
    ]);
    fails_with(out, &["top_p", "1.5", "(0, 1]"]);
}

#[test]
fn token_id_outside_vocabulary() {
    let t = tempfile::tempdir().unwrap();
    let e = t.path().join("e");
    build_tiny(&e, &[]);
    let out = trtllm(&[
        "run",
        "--engine",
        e.to_str().unwrap(),
        "--input-ids",
        "1,5000",
    ]);
    fails_with(out, &["5000", "vocabulary", "1024"]);
}

#[test]
fn run_json_and_inspect_on_a_tiny_engine() {
    let t = tempfile::tempdir().unwrap();
    let e = t.path().join("e");
    build_tiny(&e, &["--dtype", "float32"]);
    let out = trtllm(&[
        "run",
        "--engine",
        e.to_str().unwrap(),
        "--prompt",
        "The assert statement is",
        "--max-tokens",
        "5",
        "--ignore-eos",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["prompt_token_ids"],
        serde_json::json!([343, 379, 791, 86, 469, 294])
    );
    assert_eq!(
        v["outputs"][0]["token_ids"],
        serde_json::json!([177, 252, 525, 252, 903])
    );
    assert_eq!(v["outputs"][0]["finish_reason"], "length");
    let out = trtllm(&["inspect", e.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("layers.0.qkv.weight") && text.contains("float32"),
        "{text}"
    );
}
