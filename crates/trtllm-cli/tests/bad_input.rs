//! Bad input through the `trtllm` binary: each gives a non-zero exit and one line naming the
//! file or field and what was expected — never a panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::json;
use tempfile::TempDir;
use trtllm_api::runtime::ENGINE_FORMAT_VERSION;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn trtllm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trtllm"))
        .args(args)
        .output()
        .expect("run trtllm")
}

/// Asserts failure with a single `error:` line containing every needle.
fn fails_with(out: Output, needles: &[&str]) {
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
    // Each cause once (an error's text already ends with its source's).
    let parts: Vec<&str> = lines[0].split(": ").filter(|p| p.len() > 8).collect();
    for (i, p) in parts.iter().enumerate() {
        assert!(!parts[i + 1..].contains(p), "'{p}' twice in: {}", lines[0]);
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

/// Runs `trtllm build` on a copy of tiny-llama after `damage` has edited the copy.
fn build_damaged_checkpoint(damage: impl FnOnce(&Path)) -> Output {
    let t = tempfile::tempdir().unwrap();
    let ck = t.path().join("ck");
    std::fs::create_dir_all(&ck).unwrap();
    for e in std::fs::read_dir(fixtures().join("tiny-llama")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), ck.join(e.file_name())).unwrap();
    }
    damage(&ck);
    trtllm(&[
        "build",
        "--checkpoint",
        path(&ck),
        "--output",
        path(&t.path().join("e")),
    ])
}

fn edit(file: &Path, f: impl FnOnce(String) -> String) {
    let text = std::fs::read_to_string(file).unwrap();
    std::fs::write(file, f(text)).unwrap();
}

/// A tiny-llama engine in a temporary directory.
struct TinyEngine {
    _tmp: TempDir,
    dir: PathBuf,
}

impl TinyEngine {
    fn build(extra: &[&str]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("e");
        let ck = fixtures().join("tiny-llama");
        let mut args = vec!["build", "--checkpoint", path(&ck), "--output", path(&dir)];
        args.extend_from_slice(extra);
        let o = trtllm(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        Self { _tmp: tmp, dir }
    }

    /// `trtllm run --engine DIR` followed by `args`.
    fn run(&self, args: &[&str]) -> Output {
        let mut full = vec!["run", "--engine", path(&self.dir)];
        full.extend_from_slice(args);
        trtllm(&full)
    }
}

#[test]
fn missing_directory() {
    let t = tempfile::tempdir().unwrap();
    let out = trtllm(&[
        "build",
        "--checkpoint",
        "/nonexistent/model",
        "--output",
        path(&t.path().join("x")),
    ]);
    fails_with(out, &["/nonexistent/model", "not found"]);
}

/// A corrupt tokenizer fails the build (not the first run) and leaves nothing behind; an
/// existing engine is replaced only with --force, and then whole.
#[test]
fn corrupt_tokenizer_and_an_existing_output() {
    let out = build_damaged_checkpoint(|ck| {
        std::fs::write(ck.join("tokenizer.json"), "{\"model\": 1").unwrap()
    });
    fails_with(out, &["tokenizer.json", "not a tokenizer"]);

    let engine = TinyEngine::build(&[]);
    let parent = engine.dir.parent().unwrap();
    let tiny = fixtures().join("tiny-llama");
    let again = [
        "build",
        "--checkpoint",
        path(&tiny),
        "--output",
        path(&engine.dir),
    ];
    fails_with(trtllm(&again), &["already exists", "--force"]);
    let forced = trtllm(&[&again[..], &["--force", "--max-batch-size", "3"]].concat());
    assert!(
        forced.status.success(),
        "{}",
        String::from_utf8_lossy(&forced.stderr)
    );
    let config = std::fs::read_to_string(engine.dir.join("config.json")).unwrap();
    assert!(config.contains("\"max_batch_size\": 3"), "{config}");
    let leftovers: Vec<_> = std::fs::read_dir(parent)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("building"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(engine
        .run(&["--prompt", "hi", "--max-tokens", "2"])
        .status
        .success());
}

#[test]
fn config_without_num_attention_heads() {
    let out = build_damaged_checkpoint(|ck| {
        edit(&ck.join("config.json"), |cfg| {
            let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
            v.as_object_mut().unwrap().remove("num_attention_heads");
            v.to_string()
        })
    });
    fails_with(out, &["config.json", "num_attention_heads"]);
}

/// Sizes and values a config must not be trusted with: each is an error naming it, before
/// anything is allocated by it (2^31 - 1 intermediate size was a 1 TB allocation, 10^9 layers
/// 480 GB).
#[test]
fn config_values_out_of_range() {
    for (field, value, needle) in [
        (
            "/intermediate_size",
            json!(2147483647u64),
            "intermediate_size",
        ),
        (
            "/num_hidden_layers",
            json!(1_000_000_000u64),
            "num_hidden_layers",
        ),
        (
            "/max_position_embeddings",
            json!(u64::MAX),
            "max_position_embeddings",
        ),
        ("/rope_parameters/rope_theta", json!(-1.0), "rope_theta"),
        ("/bos_token_id", json!(0.5), "bos_token_id"),
        ("/eos_token_id", json!(5000), "outside the vocabulary"),
    ] {
        let out = build_damaged_checkpoint(|ck| {
            edit(&ck.join("config.json"), |cfg| {
                let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
                *v.pointer_mut(field).expect("the fixture has the field") = value.clone();
                v.to_string()
            })
        });
        fails_with(out, &["config.json", needle]);
    }
}

/// A KV pool past the machine's memory is refused with the figures, not an abort.
#[test]
fn kv_cache_larger_than_the_machine() {
    let engine = TinyEngine::build(&[]);
    let out = engine.run(&["--prompt", "hi", "--kv-cache-tokens", "100000000000000"]);
    fails_with(out, &["GiB", "--kv-cache-tokens"]);
}

#[test]
fn unknown_architecture() {
    let out = build_damaged_checkpoint(|ck| {
        edit(&ck.join("config.json"), |cfg| {
            cfg.replace("LlamaForCausalLM", "FalconForCausalLM")
        })
    });
    fails_with(out, &["FalconForCausalLM", "supported"]);
}

#[test]
fn safetensors_truncated_by_one_byte() {
    let out = build_damaged_checkpoint(|ck| {
        let st = ck.join("model.safetensors");
        let bytes = std::fs::read(&st).unwrap();
        std::fs::write(&st, &bytes[..bytes.len() - 1]).unwrap();
    });
    fails_with(out, &["model.safetensors", "safetensors"]);
}

#[test]
fn gguf_with_bad_magic() {
    let t = tempfile::tempdir().unwrap();
    let f = t.path().join("bad.gguf");
    std::fs::write(&f, b"GGUX\x03\x00\x00\x00 and then some bytes").unwrap();
    let out = trtllm(&[
        "build",
        "--checkpoint",
        path(&f),
        "--output",
        path(&t.path().join("e")),
    ]);
    fails_with(out, &["bad.gguf", "magic", "GGUF"]);
}

/// A GGUF v3 file: `kv` as (key, type id, encoded value), then one-dimensional f32 tensors of
/// 32 values as (name, offset), then `data` bytes.
fn gguf(kv: &[(&str, u32, Vec<u8>)], tensors: &[(&str, u64)], data: usize) -> Vec<u8> {
    let s = |out: &mut Vec<u8>, text: &str| {
        out.extend((text.len() as u64).to_le_bytes());
        out.extend(text.as_bytes());
    };
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((kv.len() as u64).to_le_bytes());
    for (key, ty, value) in kv {
        s(&mut out, key);
        out.extend(ty.to_le_bytes());
        out.extend(value);
    }
    for (name, offset) in tensors {
        s(&mut out, name);
        out.extend(1u32.to_le_bytes());
        out.extend(32u64.to_le_bytes());
        out.extend(0u32.to_le_bytes());
        out.extend(offset.to_le_bytes());
    }
    out.resize(out.len().next_multiple_of(32) + data, 0);
    out
}

/// GGUF headers are checked before anything is sized by them: a metadata array longer than any
/// vocabulary (it was 3 GB of memory before its error), a tensor named twice (the last had
/// won), a tensor off its alignment.
#[test]
fn gguf_headers_that_lie() {
    let t = tempfile::tempdir().unwrap();
    let build = |name: &str, bytes: Vec<u8>| {
        let f = t.path().join(name);
        std::fs::write(&f, bytes).unwrap();
        trtllm(&[
            "build",
            "--checkpoint",
            path(&f),
            "--output",
            path(&t.path().join("e")),
        ])
    };
    let mut array = 0u32.to_le_bytes().to_vec(); // of uint8
    array.extend(6_000_000u64.to_le_bytes());
    let huge = gguf(&[("tokenizer.ggml.tokens", 9, array)], &[], 6_000_100);
    fails_with(build("huge.gguf", huge), &["huge.gguf", "6000000 entries"]);
    let twice = gguf(&[], &[("w.weight", 0), ("w.weight", 128)], 256);
    fails_with(
        build("twice.gguf", twice),
        &["twice.gguf", "'w.weight' appears twice"],
    );
    let askew = gguf(&[], &[("w.weight", 4)], 256);
    fails_with(build("askew.gguf", askew), &["askew.gguf", "not aligned"]);
}

#[test]
fn engine_format_version_from_the_future() {
    let e = TinyEngine::build(&[]);
    edit(&e.dir.join("config.json"), |cfg| {
        let current = format!("\"format_version\": {ENGINE_FORMAT_VERSION}");
        cfg.replace(&current, "\"format_version\": 99")
    });
    let supported = format!("version {ENGINE_FORMAT_VERSION}");
    fails_with(
        e.run(&["--input-ids", "1,2,3"]),
        &["config.json", "version 99", &supported],
    );
}

#[test]
fn corrupt_engine_file() {
    let e = TinyEngine::build(&[]);
    let file = e.dir.join("rank0.engine");
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();
    fails_with(
        e.run(&["--input-ids", "1,2,3"]),
        &["rank0.engine", "checksum"],
    );
}

/// A NaN written into a weight's scales, with the checksum recomputed as a careless tool
/// would: the engine is refused at load (it used to run and emit token 0 forever).
#[test]
fn nan_weight_scales_under_a_valid_checksum() {
    let e = TinyEngine::build(&["--quant", "w4a16"]);
    let file = e.dir.join("rank0.engine");
    let mut bytes = std::fs::read(&file).unwrap();
    let index_len = u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize;
    let index: serde_json::Value = serde_json::from_slice(&bytes[24..24 + index_len]).unwrap();
    let scale = index
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "layers.1.down.weight_scale")
        .expect("a scale tensor");
    let at = (24 + index_len).next_multiple_of(64) + scale["offset"].as_u64().unwrap() as usize + 8;
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&file, &bytes).unwrap();
    edit(&e.dir.join("config.json"), |cfg| {
        let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
        v["ranks"][0]["crc32"] = crc32fast::hash(&bytes).into();
        v.to_string()
    });
    fails_with(
        e.run(&["--input-ids", "1,2,3"]),
        &["layers.1.down.weight_scale", "non-finite", "element 2"],
    );
}

#[test]
fn prompt_longer_than_max_seq_len() {
    let e = TinyEngine::build(&["--max-seq-len", "16"]);
    let ids = vec!["5"; 20].join(",");
    fails_with(
        e.run(&["--input-ids", &ids]),
        &["20 tokens", "at most 15", "max_input_len"],
    );
}

#[test]
fn top_p_out_of_range() {
    let e = TinyEngine::build(&[]);
    fails_with(
        e.run(&["--prompt", "hi", "--top-p", "1.5"]),
        &["top_p", "1.5", "(0, 1]"],
    );
}

#[test]
fn token_id_outside_vocabulary() {
    let e = TinyEngine::build(&[]);
    fails_with(
        e.run(&["--input-ids", "1,5000"]),
        &["5000", "vocabulary", "1024"],
    );
}

#[test]
fn run_json_and_inspect_on_a_tiny_engine() {
    let e = TinyEngine::build(&["--dtype", "float32"]);
    let out = e.run(&[
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
    // Logits rows on request, with --json only.
    let ids = ["--input-ids", "1,2,3", "--max-tokens", "2", "--ignore-eos"];
    let logits = ["--return-context-logits", "--return-generation-logits"];
    let out = e.run(&[&ids[..], &logits, &["--json"]].concat());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["context_logits"].as_array().map(Vec::len), Some(3));
    let rows = v["outputs"][0]["generation_logits"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].as_array().map(Vec::len), Some(1024));
    fails_with(e.run(&[&ids[..], &logits].concat()), &["--json"]);
    let out = trtllm(&["inspect", path(&e.dir)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("layers.0.qkv.weight") && text.contains("float32"),
        "{text}"
    );
}

/// A split the model cannot take is refused before any weight is converted, saying why; a split
/// engine is inspected without its ranks; its config.json listing too few rank files is corrupt.
#[test]
fn impossible_splits_and_missing_rank_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("e");
    let mqa = fixtures().join("tiny-llama-mqa");
    let build = |extra: &[&str]| {
        let args = [
            "build",
            "--checkpoint",
            path(&mqa),
            "--output",
            path(&out),
            "--force",
        ];
        trtllm(&[&args[..], extra].concat())
    };
    fails_with(
        build(&["--tp-size", "8"]),
        &["cannot split", "tp_size 8", "1 KV heads of 4 query heads"],
    );
    fails_with(build(&["--pp-size", "9"]), &["only 2 layers"]);
    fails_with(
        build(&["--tp-size", "0"]),
        &["--tp-size/--pp-size", "must be 1 to"],
    );
    assert!(!out.exists());

    assert!(build(&["--tp-size", "2"]).status.success());
    // Inspected without its ranks: the mapping and each rank's shard.
    let shown = trtllm(&["inspect", path(&out)]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.status.success(), "{text}");
    assert!(
        text.contains("\"tp_size\": 2") && text.contains("rank1.engine"),
        "{text}"
    );
    // MQA over 2 ranks: each holds 2 query heads and the one KV head's K and V (4 × 16 rows).
    let qkv = text.lines().find(|l| l.starts_with("layers.0.qkv.weight"));
    assert!(qkv.is_some_and(|l| l.contains("[64, 64]")), "{text}");
    edit(&out.join("config.json"), |cfg| {
        let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
        v["ranks"].as_array_mut().unwrap().pop();
        v.to_string()
    });
    let run = trtllm(&["run", "--model", path(&out), "--input-ids", "1,2"]);
    fails_with(run, &["1 rank files listed for a world of 2 ranks"]);
}
