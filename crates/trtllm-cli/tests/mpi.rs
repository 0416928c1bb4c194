//! Engines split over ranks (`build --tp-size/--pp-size`) under `mpirun`: the same greedy
//! tokens as one rank (and as transformers), perplexity within 1e-4, the server, and the
//! failures: a wrong number of ranks, a rank that cannot load its shard, a rank killed mid-request.
//! Needs Open MPI's `mpirun` and the `mpi` feature (`cargo xtask test` enables it where MPI is
//! installed; CI installs it).

#![cfg(feature = "mpi")]

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use trtllm_tests::{fixtures, smollm2_gguf, FixtureGolden};

const TRTLLM: &str = env!("CARGO_BIN_EXE_trtllm");
const LIMIT: Duration = Duration::from_secs(120);

/// `mpirun -np N trtllm ARGS`, as root if need be, with more ranks than cores allowed.
fn mpirun(ranks: usize, args: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    c.args([
        "--allow-run-as-root",
        "--oversubscribe",
        "--bind-to",
        "none",
    ])
    .args(["-np", &ranks.to_string(), TRTLLM])
    .args(args);
    c
}

/// `trtllm ARGS` on one process (`ranks` 1) or under `mpirun`.
fn trtllm(ranks: usize, args: &[&str]) -> Command {
    match ranks {
        1 => {
            let mut c = Command::new(TRTLLM);
            c.args(args);
            c
        }
        n => mpirun(n, args),
    }
}

/// Runs `cmd` to its end, failing the test if it takes longer than `limit` (a hang).
fn finish(mut cmd: Command, limit: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("wait"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("{cmd:?} still running after {limit:?}")
        }
    }
}

fn ok(out: Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\n{stderr}", out.status);
    String::from_utf8(out.stdout).expect("utf-8")
}

/// Builds `checkpoint` split `tp` × `pp` (with `extra` build flags) through the CLI, once per
/// test binary (the tests run at once and share engines).
fn build(checkpoint: &Path, split: (usize, usize), extra: &[&str]) -> PathBuf {
    build_named(checkpoint, split, extra, "")
}

/// [`build`] under a name with `tag` (for builds with other flags).
fn build_named(checkpoint: &Path, (tp, pp): (usize, usize), extra: &[&str], tag: &str) -> PathBuf {
    static BUILT: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    let name = checkpoint.file_name().unwrap().to_string_lossy();
    let name = format!("mpi-{name}{tag}-tp{tp}-pp{pp}");
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    if built.contains(&out) {
        return out;
    }
    built.push(out.clone());
    let (ck, o) = (checkpoint.to_str().unwrap(), out.to_str().unwrap());
    let (tp, pp) = (tp.to_string(), pp.to_string());
    let args = ["build", "--checkpoint", ck, "--output", o, "--force"];
    let split = ["--tp-size", &tp, "--pp-size", &pp];
    ok(finish(
        trtllm(1, &[&args[..], &split, extra].concat()),
        Duration::from_secs(300),
    ));
    out
}

/// Greedy token ids after `ids` (no stop at EOS).
fn greedy(engine: &Path, ranks: usize, ids: &[u32], tokens: usize) -> Vec<u32> {
    greedy_on(engine, ranks, ids, tokens, "cpu")
}

/// [`greedy`] with the model on `device`.
fn greedy_on(engine: &Path, ranks: usize, ids: &[u32], tokens: usize, device: &str) -> Vec<u32> {
    greedy_with(engine, ranks, (ids, tokens), &["--device", device])
}

/// [`greedy`] with more `trtllm run` flags.
fn greedy_with(
    engine: &Path,
    ranks: usize,
    (ids, tokens): (&[u32], usize),
    extra: &[&str],
) -> Vec<u32> {
    let ids: Vec<String> = ids.iter().map(u32::to_string).collect();
    let (ids, n) = (ids.join(","), tokens.to_string());
    let model = engine.to_str().unwrap();
    let args = ["run", "--model", model, "--input-ids", &ids];
    let flags = ["--max-tokens", &n, "--ignore-eos", "--json"];
    let args = [&args[..], extra, &flags].concat();
    let out = ok(finish(trtllm(ranks, &args), Duration::from_secs(120)));
    let v: Value = serde_json::from_str(out.lines().next().expect("a line")).expect("json");
    serde_json::from_value(v["outputs"][0]["token_ids"].clone()).expect("ids")
}

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

/// A process killed when the test ends, passed or not.
struct Job(Child);

impl Drop for Job {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `trtllm serve` (or `mpirun -np N trtllm serve`) on a free port.
fn serve(engine: &Path, ranks: usize) -> (Job, String) {
    let args = ["serve", engine.to_str().unwrap(), "--port", "0"];
    let args = [&args[..], &["--served-model-name", "m"]].concat();
    let mut child = trtllm(ranks, &args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start serve");
    let base = common::listening(&mut child);
    (Job(child), base)
}

/// What the openai client gets from the server at `base`: a completion and a chat answer.
fn openai_answers(base: &str) -> Value {
    const CLIENT: &str = r#"
import json, sys, openai
c = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="none")
done = c.completions.create(model="m", prompt="The assert statement is", max_tokens=24,
                            temperature=0, extra_body={"ignore_eos": True})
chat = c.chat.completions.create(model="m", max_tokens=24, temperature=0,
                                 messages=[{"role": "user", "content": "What is 2 + 2?"}])
print(json.dumps([done.choices[0].text, chat.choices[0].message.content]))
"#;
    let mut cmd = Command::new(common::openai_python());
    cmd.args(["-c", CLIENT, base]);
    serde_json::from_str(&ok(finish(cmd, LIMIT))).expect("json")
}

/// `mpirun -np 2 trtllm serve` on SmolLM2 split by TP answers the openai client (a completion
/// and a chat) with one rank's text.
#[test]
fn serve_under_mpirun_answers_the_openai_client_as_one_rank() {
    let gguf = smollm2_gguf().expect("demo model");
    let keep = ["--quant", "keep", "--max-seq-len", "512"];
    let (whole, split) = (build(&gguf, (1, 1), &keep), build(&gguf, (2, 1), &keep));
    let (one, base) = serve(&whole, 1);
    let expected = openai_answers(&base);
    drop(one);
    let (_job, base) = serve(&split, 2);
    assert_eq!(openai_answers(&base), expected);
    assert_eq!(
        openai_answers(&base),
        expected,
        "again, the prefix cache warm"
    );
}

#[test]
fn a_rank_killed_mid_request_ends_the_job() {
    let gguf = smollm2_gguf().expect("demo model");
    let split = build(&gguf, (2, 1), &["--quant", "keep", "--max-seq-len", "512"]);
    let (mut job, base) = serve(&split, 2);
    // Rank 1 killed during a request: the request fails with an error saying why, and the job
    // ends (mpirun tears the other ranks down) with an error, within seconds, leaving no rank
    // behind.
    let ranks = job_ranks(&split);
    assert_eq!(ranks.len(), 2, "{ranks:?}");
    let worker = ranks.iter().find(|(rank, _)| *rank == 1).expect("rank 1").1;
    let long = json!({"model": "m", "prompt": "The assert statement is", "max_tokens": 400,
                      "temperature": 0, "ignore_eos": true, "stream": true});
    let (started, first) = std::sync::mpsc::channel();
    let client = std::thread::spawn(move || {
        let resp = common::Server::agent()
            .post(format!("{base}/v1/completions"))
            .send_json(&long);
        let mut text = String::new();
        if let Ok(mut r) = resp {
            for line in BufReader::new(r.body_mut().as_reader()).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("data:") {
                    let _ = started.send(());
                }
                text.push_str(&line);
            }
        }
        text
    });
    first
        .recv_timeout(Duration::from_secs(60))
        .expect("a first chunk");
    let _ = Command::new("kill")
        .args(["-9", &worker.to_string()])
        .status();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = job.0.try_wait().expect("wait") {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the job outlived its rank 1"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success(), "{status}");
    let streamed = client.join().expect("client");
    assert!(
        streamed.contains("data:"),
        "the request had started: {streamed:?}"
    );
    assert!(
        !streamed.contains("\"finish_reason\":\"length\""),
        "{streamed}"
    );
    // The client is told why, not just cut off.
    assert!(
        streamed.contains("\"error\"") && streamed.contains("one of its ranks exited"),
        "{streamed}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(job_ranks(&split), vec![], "ranks left running");
}

/// The (rank, pid) of each running `trtllm` process of an mpirun job on `engine`.
fn job_ranks(engine: &Path) -> Vec<(usize, u32)> {
    let engine = engine.to_str().unwrap();
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let ours = args.first().is_some_and(|a| a.ends_with(b"trtllm"))
            && args.contains(&engine.as_bytes());
        let environ = std::fs::read(e.path().join("environ")).unwrap_or_default();
        let rank = environ
            .split(|&b| b == 0)
            .find_map(|v| v.strip_prefix(b"OMPI_COMM_WORLD_RANK="))
            .and_then(|r| std::str::from_utf8(r).ok()?.parse().ok());
        if let (true, Some(rank)) = (ours, rank) {
            found.push((rank, pid));
        }
    }
    found.sort();
    found
}

/// `trtllm run CHECKPOINT --tp-size 2` (or `--pp-size 2`) outside a job: the checkpoint is
/// built split into the engine cache once, then the command starts its ranks itself; greedy
/// tokens are transformers'. An engine built otherwise is not re-split.
#[test]
fn a_checkpoint_run_split_builds_once_and_starts_its_ranks() {
    let tiny = fixtures().join("tiny-llama");
    let golden: FixtureGolden =
        serde_json::from_str(&std::fs::read_to_string(tiny.join("golden.json")).unwrap()).unwrap();
    let case = &golden.cases[0];
    let cache = tempfile::tempdir().unwrap();
    let run = |model: &Path, split: &[&str]| {
        let ids: Vec<String> = case.input_ids.iter().map(u32::to_string).collect();
        let n = case.greedy_ids.len().to_string();
        let args = [
            "run",
            model.to_str().unwrap(),
            "--input-ids",
            &ids.join(","),
        ];
        let flags = ["--max-tokens", &n, "--ignore-eos", "--json"];
        let mut cmd = trtllm(1, &[&args[..], split, &flags].concat());
        cmd.env("TRTLLM_CACHE", cache.path());
        finish(cmd, LIMIT)
    };
    for split in [["--tp-size", "2"], ["--pp-size", "2"]] {
        let out = run(&tiny, &split);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{split:?}: {stderr}");
        assert!(
            stderr.contains("built an engine") && stderr.contains("`mpirun -np 2`"),
            "{stderr}"
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("json");
        let ids: Vec<u32> = serde_json::from_value(v["outputs"][0]["token_ids"].clone()).unwrap();
        assert_eq!(ids, case.greedy_ids, "{split:?}");
        // Again: found in the cache, not rebuilt.
        let again = run(&tiny, &split);
        assert!(again.status.success());
        assert!(!String::from_utf8_lossy(&again.stderr).contains("built an engine"));
    }
    let whole = build(&tiny, (1, 1), &[]);
    let out = run(&whole, &["--tp-size", "2"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("an engine built for tp_size 1"), "{stderr}");
}

#[test]
fn wrong_ranks_and_unloadable_shards_are_errors_not_hangs() {
    let tiny = fixtures().join("tiny-llama");
    let split = build(&tiny, (2, 1), &[]);
    let run = |ranks: usize, engine: &Path| {
        let args = [
            "run",
            "--model",
            engine.to_str().unwrap(),
            "--input-ids",
            "1,5,9",
        ];
        finish(trtllm(ranks, &args), Duration::from_secs(60))
    };
    let fails_with = |out: Output, text: &str| {
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "{stderr}");
        assert!(stderr.contains(text), "{text:?} not in:\n{stderr}");
    };
    // Outside a job, the command starts the engine's ranks itself (mpirun of the same command).
    let out = run(1, &split);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("starting them with `mpirun -np 2`"),
        "{stderr}"
    );
    fails_with(
        run(3, &split),
        "this job has 3 ranks: start it with `mpirun -np 2`",
    );

    // Rank 1's file corrupt: rank 1 names it, rank 0 fails the command, nobody waits.
    let bad = split.with_file_name("mpi-tiny-llama-corrupt-rank1");
    let _ = std::fs::remove_dir_all(&bad);
    std::fs::create_dir_all(&bad).unwrap();
    for f in std::fs::read_dir(&split).unwrap().flatten() {
        std::fs::copy(f.path(), bad.join(f.file_name())).unwrap();
    }
    let rank1 = bad.join("rank1.engine");
    let mut bytes = std::fs::read(&rank1).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&rank1, bytes).unwrap();
    let out = run(2, &bad);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        stderr.contains("rank 1") && stderr.contains("checksum"),
        "{stderr}"
    );
    fails_with(out, "another rank could not open the engine");
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
