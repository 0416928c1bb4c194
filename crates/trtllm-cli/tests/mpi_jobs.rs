//! How jobs of split engines start, serve and end: `mpirun -np 2 trtllm serve` answering the
//! openai client as one rank, a rank killed mid-request, a command starting its own ranks (for a
//! split engine, or a checkpoint built split), every rank tuning its shard, and a wrong number
//! of ranks or a rank that cannot load its shard. Needs Open MPI's `mpirun` and the `mpi` feature.

#![cfg(feature = "mpi")]

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::ranks::*;
use serde_json::{json, Value};
use trtllm_tests::{fixtures, smollm2_gguf, FixtureGolden};

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

/// An idle job's other ranks wait for rank 0 without spinning a core each (as a blocking MPI
/// receive or broadcast would), and still answer the next request.
#[test]
fn idle_ranks_wait_without_spinning() {
    let split = build(&fixtures().join("tiny-llama"), (2, 1), &[]);
    let (_job, base) = serve(&split, 2);
    let cpu_ticks = |pid: u32| -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // utime and stime: fields 14 and 15, counted after the command's closing parenthesis.
        let after = stat.rsplit_once(')').map_or("", |s| s.1);
        let f: Vec<&str> = after.split_whitespace().collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    };
    let ranks = job_ranks(&split);
    let worker = ranks.iter().find(|(rank, _)| *rank == 1).expect("rank 1").1;
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_ticks(worker);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(worker) - before;
    // Spinning is ~200 ticks (2 s of one core at 100 Hz); waiting, a handful.
    assert!(used < 40, "rank 1 used {used} ticks of CPU in 2 s idle");
    let (status, v) = common::post_at(
        &base,
        "/v1/completions",
        &json!({"model": "m", "prompt": [1, 5, 9], "max_tokens": 4, "temperature": 0}),
        None,
    );
    assert_eq!(status, 200, "{v}");
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

/// `--timing-cache` on a split engine: every rank tunes its own shard in turn (with the one
/// thread mpirun gives it), so the cache holds both stages' shapes; `build --timing-cache` of a
/// split engine leaves the tuning to its ranks instead of failing.
#[test]
fn every_rank_tunes_its_shard_into_the_timing_cache() {
    let tiny = fixtures().join("tiny-llama");
    let dir = tempfile::tempdir().unwrap();
    let (engine, cache) = (dir.path().join("pp2"), dir.path().join("timing-cache.json"));
    let (engine, cache) = (engine.to_str().unwrap(), cache.to_str().unwrap());
    let args = [
        "build",
        "--checkpoint",
        tiny.to_str().unwrap(),
        "--output",
        engine,
    ];
    let args = [&args[..], &["--pp-size", "2", "--timing-cache", cache]].concat();
    let out = finish(trtllm(1, &args), LIMIT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("ranks tune their shards when they start"),
        "{stderr}"
    );
    let args = ["run", engine, "--input-ids", "1,5,9", "--max-tokens", "4"];
    ok(finish(
        trtllm(2, &[&args[..], &["--timing-cache", cache]].concat()),
        LIMIT,
    ));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(cache).unwrap()).unwrap();
    let shapes: std::collections::BTreeSet<&str> = v["machines"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|m| m.as_object().unwrap().keys())
        .map(|k| k.rsplit_once(" | ").unwrap().0)
        .collect();
    // Stage 0's matrices, and stage 1's with the LM head.
    assert_eq!(shapes.len(), 2, "{v}");
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
