//! Engines split over ranks (`build --tp-size/--pp-size`) under `mpirun`: the same greedy
//! tokens as one rank (and as transformers and peft), perplexity within 1e-4, on the CPU and on
//! two (emulated) GPUs, quantized weights cut with their scales. How jobs start, serve and end:
//! `mpi_jobs.rs`. Needs Open MPI's `mpirun` and the `mpi` feature (`cargo xtask test` enables it
//! where MPI is installed; CI installs it).

#![cfg(feature = "mpi")]

mod common;

use std::path::Path;
use std::time::Duration;

use common::ranks::*;
use serde_json::Value;
use trtllm_tests::{fixtures, smollm2_gguf, FixtureGolden};

/// Mean negative log-likelihood of `ids`.
fn mean_nll(engine: &Path, ranks: usize, ids: &[u32]) -> f64 {
    let file = engine.with_extension("ids.txt");
    let text: Vec<String> = ids.iter().map(u32::to_string).collect();
    std::fs::write(&file, text.join(" ")).unwrap();
    let args = ["perplexity", "--model", engine.to_str().unwrap()];
    let args = [&args[..], &["--input-ids-file", file.to_str().unwrap()]].concat();
    let out = ok(finish(trtllm(ranks, &args), Duration::from_secs(120)));
    let v: Value = serde_json::from_str(out.trim()).expect("json");
    v["mean_nll"].as_f64().expect("mean_nll")
}

/// Every split of `fixture` gives transformers' greedy tokens (as one rank does) and its
/// perplexity within 1e-4.
fn check_splits(fixture: &str, splits: &[(usize, usize)]) {
    let dir = fixtures().join(fixture);
    let golden: FixtureGolden =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let whole = build(&dir, (1, 1), &[]);
    for &(tp, pp) in splits {
        let split = build(&dir, (tp, pp), &[]);
        for case in &golden.cases {
            let n = case.greedy_ids.len();
            let expected = greedy(&whole, 1, &case.input_ids, n);
            assert_eq!(
                expected, case.greedy_ids,
                "{fixture}: one rank vs transformers"
            );
            let got = greedy(&split, tp * pp, &case.input_ids, n);
            assert_eq!(
                got, expected,
                "{fixture} tp {tp} pp {pp}: {:?}",
                case.prompt
            );
        }
        let ids: Vec<u32> = golden
            .cases
            .iter()
            .flat_map(|c| c.input_ids.clone())
            .collect();
        let (a, b) = (mean_nll(&whole, 1, &ids), mean_nll(&split, tp * pp, &ids));
        assert!(
            (a - b).abs() < 1e-4,
            "{fixture} tp {tp} pp {pp}: nll {b} vs {a}"
        );
    }
}

#[test]
fn gqa_fixture_split_by_tensor_and_by_pipeline() {
    check_splits("tiny-llama", &[(2, 1), (1, 2), (2, 2)]);
}

#[test]
fn mqa_fixture_replicates_its_kv_head() {
    check_splits("tiny-llama-mqa", &[(2, 1), (4, 1)]);
}

/// Biases on every projection (O's and down's on TP rank 0 only), LayerNorm, learned positions.
#[test]
fn gpt2_fixture_with_biases_and_learned_positions() {
    check_splits("tiny-gpt2", &[(2, 1), (1, 2)]);
}

/// Experts split like the dense MLP; q/k head norms; Gemma 2's windowed and global layers (two
/// KV groups, a stage holding layers of both or of one), post-norms and soft caps.
#[test]
fn moe_qk_norm_and_windowed_fixtures() {
    check_splits("tiny-mixtral", &[(2, 1)]);
    check_splits("tiny-qwen3", &[(2, 1)]);
    check_splits("tiny-gemma2", &[(2, 1), (1, 2)]);
}

/// PEFT adapters on split engines, each rank adding its part of every update (B's rows of
/// QKV and the MLP's input, A's columns of O and down, a stage's layers): peft's greedy tokens
/// (tests/fixtures/lora/golden.json), as on one rank.
#[test]
fn lora_adapters_on_split_engines_match_peft() {
    for adapter in ["tiny-llama-r8", "tiny-phi3-r8-fused", "tiny-qwen2-r16"] {
        check_lora_splits(adapter, "cpu");
    }
}

/// `adapter`'s golden cases on one rank and split (TP 2, PP 2) on `device`.
fn check_lora_splits(adapter: &str, device: &str) {
    let golden: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("lora/golden.json")).unwrap(),
    )
    .unwrap();
    let spec = &golden["adapters"][adapter];
    let base = fixtures().join(spec["base"].as_str().unwrap());
    let dir = fixtures().join("lora").join(adapter);
    let flags = ["--lora", dir.to_str().unwrap(), "--device", device];
    for case in spec["cases"].as_array().unwrap() {
        let ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        let want: Vec<u32> = serde_json::from_value(case["greedy_ids"].clone()).unwrap();
        let whole = greedy_with(&build(&base, (1, 1), &[]), 1, (&ids, want.len()), &flags);
        assert_eq!(whole, want, "{adapter} on {device}: one rank vs peft");
        for (tp, pp) in [(2, 1), (1, 2)] {
            let split = build(&base, (tp, pp), &[]);
            let got = greedy_with(&split, tp * pp, (&ids, want.len()), &flags);
            assert_eq!(got, want, "{adapter} on {device}, tp {tp} pp {pp}: vs peft");
        }
    }
}

/// SmolLM2-135M with its GGUF's Q4_1 weights kept packed: 9 heads over 3 KV heads split 6 + 3,
/// the int4 columns of O and down cut between their groups.
#[test]
fn smollm2_tp2_and_pp2_match_one_rank() {
    let gguf = smollm2_gguf().expect("demo model");
    let keep = ["--quant", "keep", "--max-seq-len", "512"];
    let whole = build(&gguf, (1, 1), &keep);
    let golden = common::golden();
    let prompts: Vec<Vec<u32>> = golden["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .take(2)
        .map(|c| serde_json::from_value(c["input_ids"].clone()).expect("ids"))
        .collect();
    for split in [(2, 1), (1, 2)] {
        let engine = build(&gguf, split, &keep);
        for ids in &prompts {
            let expected = greedy(&whole, 1, ids, 16);
            assert_eq!(greedy(&engine, 2, ids, 16), expected, "{split:?}");
        }
        let ids = &prompts[0];
        let (a, b) = (mean_nll(&whole, 1, ids), mean_nll(&engine, 2, ids));
        assert!((a - b).abs() < 1e-4, "{split:?}: nll {b} vs {a}");
    }
}

/// Two GPUs, one per rank, summing through NCCL (with a LoRA adapter too): the emulated
/// driver's two devices in CI (`cargo xtask emulate-gpu`), or a machine with two GPUs.
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs two CUDA GPUs (or the emulated driver) and NCCL: cargo xtask emulate-gpu"]
fn gpu_tp2_and_pp2_match_one_rank_on_tiny_fixtures() {
    for fixture in ["tiny-llama", "tiny-llama-mqa"] {
        let dir = fixtures().join(fixture);
        let golden: FixtureGolden =
            serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap())
                .unwrap();
        let whole = build(&dir, (1, 1), &[]);
        for split in [(2, 1), (1, 2)] {
            let engine = build(&dir, split, &[]);
            let args = [
                "run",
                "--model",
                engine.to_str().unwrap(),
                "--input-ids",
                "1,2,3",
            ];
            let out = finish(
                mpirun(2, &[&args[..], &["--device", "cuda"]].concat()),
                LIMIT,
            );
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!stderr.contains("NCCL (libnccl.so) is missing"), "{stderr}");
            for case in golden.cases.iter().take(2) {
                let n = case.greedy_ids.len();
                let on_gpu = |e: &Path, ranks| greedy_on(e, ranks, &case.input_ids, n, "cuda");
                let expected = on_gpu(&whole, 1);
                assert_eq!(
                    expected, case.greedy_ids,
                    "{fixture}: one GPU vs transformers"
                );
                assert_eq!(on_gpu(&engine, 2), expected, "{fixture} {split:?}");
            }
        }
    }
    check_lora_splits("tiny-llama-r8", "cuda");
}

/// Quantized weights split with their scales: int8 per channel (each rank's O/down columns keep
/// their rows' scales); int4 groups of 128 that a rank's 96 MLP columns would cut are refused at
/// build, before any weight is converted, naming the tensor and the fix.
#[test]
fn quantized_engines_split_whole_groups_or_say_why_not() {
    let dir = fixtures().join("tiny-llama");
    let q = ["--quant", "w8a16"];
    let whole = build_named(&dir, (1, 1), &q, "w8a16");
    let split = build_named(&dir, (2, 1), &q, "w8a16");
    let ids = [1, 5, 9, 30, 44];
    assert_eq!(greedy(&split, 2, &ids, 16), greedy(&whole, 1, &ids, 16));

    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("mpi-tiny-llama-w4a16-tp2");
    let args = ["build", "--checkpoint", dir.to_str().unwrap(), "--output"];
    let args = [
        &args[..],
        &[out.to_str().unwrap(), "--force", "--quant", "w4a16"],
    ]
    .concat();
    let o = finish(trtllm(1, &[&args[..], &["--tp-size", "2"]].concat()), LIMIT);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && !out.exists(), "{stderr}");
    assert!(
        stderr.contains("inside a quantization group of 128"),
        "{stderr}"
    );
    assert!(stderr.contains("'layers.0.down.weight'"), "{stderr}");
}
