//! The executor on SmolLM2: in-flight batching gives each request exactly the tokens it gets
//! alone, under every batch/token limit, abort, KV-pool exhaustion and prefix reuse; the pool
//! is whole again after every test; shutdown never leaves a caller hanging.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use trtllm_api::builder::BuildConfig;
use trtllm_api::executor::{
    CapacitySchedulerPolicy, ExecutorConfig, ExecutorError, GenerationExecutor, GenerationRequest,
    IterationStats, RequestEvent, RequestStats, SchedulerConfig,
};
use trtllm_api::runtime::{FinishReason, GenerationOutput, GenerationParams, KvCacheEvent};
use trtllm_tests::{fixtures, read_json, shared_engine, smollm2_gguf, SmolGolden};

fn engine_dir() -> &'static std::path::Path {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let cfg = BuildConfig {
            max_batch_size: 64,
            max_seq_len: 1024,
            ..Default::default()
        };
        let gguf = smollm2_gguf().expect("demo model");
        shared_engine(env!("CARGO_TARGET_TMPDIR"), "executor-smollm2", &gguf, &cfg)
            .expect("build SmolLM2 engine")
    })
}

fn golden() -> SmolGolden {
    read_json(&fixtures().join("smollm2-135m-instruct.json")).expect("golden file")
}

/// Real text to cut prompts from: the golden perplexity ids (Apache-2.0 license text).
fn text_ids() -> Vec<u32> {
    golden().perplexity.input_ids
}

fn executor(cfg: ExecutorConfig) -> GenerationExecutor {
    GenerationExecutor::with_config(engine_dir(), cfg).expect("executor")
}

fn limits(max_batch_size: Option<usize>, max_num_tokens: Option<usize>) -> ExecutorConfig {
    ExecutorConfig {
        scheduler: SchedulerConfig {
            max_batch_size,
            max_num_tokens,
            ..Default::default()
        },
        ..Default::default()
    }
}

fn greedy(max_new_tokens: usize, ignore_eos: bool) -> GenerationParams {
    GenerationParams {
        max_new_tokens,
        ignore_eos,
        ..Default::default()
    }
}

type Job = (Vec<u32>, GenerationParams);

/// Submits every job at once, then waits for each.
fn run_all(
    exec: &GenerationExecutor,
    jobs: &[Job],
) -> Result<Vec<(GenerationOutput, RequestStats)>> {
    let handles = jobs
        .iter()
        .map(|(prompt, params)| {
            exec.submit(GenerationRequest {
                prompt_token_ids: prompt.clone(),
                params: params.clone(),
                client_id: None,
                lora: None,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(handles
        .into_iter()
        .map(|h| h.wait_with_stats())
        .collect::<Result<Vec<_>, _>>()?)
}

/// Each job run by itself: an executor that never batches.
fn alone(jobs: &[Job]) -> Result<Vec<Vec<u32>>> {
    let exec = executor(limits(Some(1), None));
    let mut out = Vec::new();
    for job in jobs {
        out.push(
            run_all(&exec, std::slice::from_ref(job))?
                .remove(0)
                .0
                .tokens,
        );
    }
    assert_pool_whole(&exec)?;
    Ok(out)
}

/// The invariant check of the KV-cache manager, and no block still referenced.
fn assert_pool_whole(exec: &GenerationExecutor) -> Result<()> {
    let s = exec.kv_cache_summary()?;
    ensure!(
        s.used_blocks == 0 && s.sequences == 0,
        "blocks still held after all requests ended: {s:?}"
    );
    ensure!(s.free_blocks + s.cached_blocks == s.total_blocks, "{s:?}");
    Ok(())
}

/// Everything a subscription received; the engine loop has sent it all once a
/// `kv_cache_summary` round trip returns, the dispatcher forwards it right after.
fn collect<T>(rx: &crossbeam_channel::Receiver<T>) -> Vec<T> {
    let mut v = Vec::new();
    while let Ok(x) = rx.recv_timeout(Duration::from_millis(300)) {
        v.push(x);
    }
    v
}

fn assert_same_tokens(got: &[(GenerationOutput, RequestStats)], want: &[Vec<u32>], what: &str) {
    assert_eq!(got.len(), want.len());
    for (i, ((out, _), w)) in got.iter().zip(want).enumerate() {
        assert_eq!(
            &out.tokens, w,
            "{what}: request {i} differs from its run alone"
        );
    }
}

/// 64 prompts of 1..=300 tokens and 1..=24 new tokens, cut from real text.
fn mixed_jobs() -> Vec<Job> {
    let text = text_ids();
    (0..64)
        .map(|i| {
            let len = 1 + (i * 97) % 300;
            let start = (i * 37) % (text.len() - len);
            let max_new = 1 + (i * 13) % 24;
            (text[start..start + len].to_vec(), greedy(max_new, false))
        })
        .collect()
}

#[test]
fn batched_outputs_equal_alone_under_every_limit() -> Result<()> {
    let jobs = mixed_jobs();
    let want = alone(&jobs)?;
    for (what, cfg) in [
        ("max_batch_size 64", limits(None, None)),
        ("max_batch_size 8", limits(Some(8), None)),
        ("max_num_tokens 256", limits(None, Some(256))),
    ] {
        let exec = executor(cfg);
        let stats = exec.subscribe_iteration_stats();
        let got = run_all(&exec, &jobs)?;
        assert_same_tokens(&got, &want, what);
        assert_pool_whole(&exec)?;
        let iters: Vec<IterationStats> = collect(&stats);
        let max_batch = iters.iter().map(|s| s.batch_size).max().unwrap_or(0);
        let max_tokens = iters
            .iter()
            .map(|s| s.context_tokens + s.generation_tokens)
            .max()
            .unwrap_or(0);
        let mixed = iters
            .iter()
            .any(|s| s.context_requests > 0 && s.generation_requests > 0);
        match what {
            "max_batch_size 64" => ensure!(max_batch > 8, "{what}: batches of {max_batch}"),
            "max_batch_size 8" => ensure!(max_batch == 8, "{what}: batches of {max_batch}"),
            _ => ensure!(
                max_tokens == 256 && mixed,
                "{what}: no chunked, mixed steps"
            ),
        }
    }
    Ok(())
}

#[test]
fn golden_cases_pass_when_run_concurrently() -> Result<()> {
    let golden = golden();
    let jobs: Vec<Job> = golden
        .cases
        .iter()
        .map(|c| (c.input_ids.clone(), greedy(c.greedy_ids.len(), false)))
        .collect();
    let exec = executor(ExecutorConfig::default());
    let got = run_all(&exec, &jobs)?;
    for (i, ((out, _), case)) in got.iter().zip(&golden.cases).enumerate() {
        assert_eq!(out.tokens, case.greedy_ids, "golden case {i}");
    }
    assert_pool_whole(&exec)
}

#[test]
fn aborting_half_cancels_them_and_leaves_the_rest_unchanged() -> Result<()> {
    let text = text_ids();
    let jobs: Vec<Job> = (0..40)
        .map(|i| {
            let len = 5 + (i * 11) % 40;
            (text[i * 13..i * 13 + len].to_vec(), greedy(24, true))
        })
        .collect();
    let kept: Vec<usize> = (0..40).filter(|i| i % 2 == 1).collect();
    let kept_jobs: Vec<Job> = kept.iter().map(|&i| jobs[i].clone()).collect();
    let want = alone(&kept_jobs)?;

    let exec = executor(ExecutorConfig::default());
    let handles = jobs
        .iter()
        .map(|(p, params)| exec.generate_async(p.clone(), params.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let outcomes: Vec<GenerationOutput> = std::thread::scope(|s| {
        let threads: Vec<_> = handles
            .into_iter()
            .enumerate()
            .map(|(i, mut h)| {
                let exec = &exec;
                s.spawn(move || {
                    // Pseudo-random abort point, 1..=12 tokens in; by id or by handle.
                    let abort_at = (i * 7919 % 12) + 1;
                    let mut seen = 0;
                    while let Some(ev) = h.next_event() {
                        match ev {
                            RequestEvent::Tokens(t) => {
                                seen += t.len();
                                if i % 2 == 0 && seen == abort_at {
                                    if i % 4 == 0 {
                                        h.abort();
                                    } else {
                                        assert!(exec.abort_request(h.request_id()));
                                    }
                                }
                            }
                            RequestEvent::PromptLogprobs(_) => {}
                            RequestEvent::Finished { output, .. } => return output,
                            RequestEvent::Failed(e) => panic!("request {i} failed: {e}"),
                        }
                    }
                    panic!("request {i} ended without a final event")
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("stream thread"))
            .collect()
    });
    for (i, out) in outcomes.iter().enumerate() {
        if i % 2 == 0 {
            assert_eq!(out.finish_reason, FinishReason::Cancelled, "request {i}");
            assert!(out.tokens.len() < 24, "request {i} ran to the end");
        }
    }
    let kept_out: Vec<Vec<u32>> = kept.iter().map(|&i| outcomes[i].tokens.clone()).collect();
    assert_eq!(kept_out, want, "requests that were not aborted changed");
    assert_pool_whole(&exec)
}

/// 12 requests of 100-160 prompt tokens + 32 new in a pool of 20 blocks of 32 tokens
/// (about 4 requests' worth).
fn exhausting_jobs() -> Vec<Job> {
    let text = text_ids();
    (0..12)
        .map(|i| {
            let len = 100 + i * 5;
            (text[i * 40..i * 40 + len].to_vec(), greedy(32, true))
        })
        .collect()
}

fn small_pool(policy: CapacitySchedulerPolicy) -> ExecutorConfig {
    let mut cfg = ExecutorConfig::default();
    cfg.scheduler.policy = policy;
    cfg.kv_cache.max_tokens = Some(640);
    cfg
}

#[test]
fn exhausted_pool_queues_or_preempts_and_every_request_completes() -> Result<()> {
    let jobs = exhausting_jobs();
    let want = alone(&jobs)?;
    for policy in [
        CapacitySchedulerPolicy::GuaranteedNoEvict,
        CapacitySchedulerPolicy::MaxUtilization,
    ] {
        let exec = executor(small_pool(policy));
        let stats = exec.subscribe_iteration_stats();
        let got = run_all(&exec, &jobs)?;
        assert_same_tokens(&got, &want, &format!("{policy:?}"));
        assert_pool_whole(&exec)?;
        let iters = collect(&stats);
        let max_batch = iters.iter().map(|s| s.batch_size).max().unwrap_or(0);
        ensure!(
            max_batch < jobs.len(),
            "{policy:?}: the pool should not fit all at once"
        );
        let preempted: usize = got.iter().map(|(_, s)| s.preemptions).sum();
        match policy {
            CapacitySchedulerPolicy::GuaranteedNoEvict => ensure!(preempted == 0),
            CapacitySchedulerPolicy::MaxUtilization => {
                ensure!(preempted > 0, "MAX_UTILIZATION never preempted");
                ensure!(iters.iter().any(|s| s.preempted_requests > 0));
            }
        }
    }
    // A request that could never fit is refused up front, naming the pool's size.
    let exec = executor(small_pool(CapacitySchedulerPolicy::MaxUtilization));
    let text = text_ids();
    let err = exec
        .generate_async(text[..600].to_vec(), greedy(100, true))
        .err()
        .expect("a request larger than the pool must be refused");
    ensure!(
        matches!(
            err,
            ExecutorError::RequestTooLarge {
                needed: 22,
                total: 20
            }
        ),
        "{err}"
    );
    Ok(())
}

#[test]
fn shared_system_prompt_reuses_blocks_with_identical_outputs() -> Result<()> {
    let text = text_ids();
    let system = &text[..200];
    let jobs: Vec<Job> = (0..16)
        .map(|i| {
            let mut p = system.to_vec();
            p.extend_from_slice(&text[300 + i * 30..300 + i * 30 + 10 + i]);
            (p, greedy(8, false))
        })
        .collect();
    let mut results = Vec::new();
    for reuse in [false, true] {
        let mut cfg = ExecutorConfig::default();
        cfg.kv_cache.enable_block_reuse = reuse;
        let exec = executor(cfg);
        let stats = exec.subscribe_iteration_stats();
        let events = exec.subscribe_kv_events();
        let got = run_all(&exec, &jobs)?;
        assert_pool_whole(&exec)?;
        let iters = collect(&stats);
        let events: Vec<KvCacheEvent> = collect(&events);
        results.push((got, iters, events));
    }
    let (off, on) = (&results[0], &results[1]);
    for (i, (a, b)) in off.0.iter().zip(&on.0).enumerate() {
        assert_eq!(
            a.0.tokens, b.0.tokens,
            "request {i}: reuse changed the output"
        );
    }
    let computed = |r: &[(GenerationOutput, RequestStats)]| -> usize {
        r.iter().map(|(_, s)| s.context_tokens_computed).sum()
    };
    let reused: usize = on.0.iter().map(|(_, s)| s.reused_tokens).sum();
    // 200 shared tokens = 6 full blocks of 32, reused by the 15 requests after the first.
    ensure!(reused == 15 * 192, "reused {reused} prompt tokens");
    ensure!(computed(&on.0) + reused == computed(&off.0));
    let iter_context =
        |it: &[IterationStats]| -> usize { it.iter().map(|s| s.context_tokens).sum() };
    ensure!(
        iter_context(&on.1) + reused == iter_context(&off.1),
        "iteration stats disagree"
    );
    ensure!(on.1.iter().map(|s| s.reused_blocks).sum::<usize>() == 15 * 6);
    ensure!(off.2.is_empty(), "no cache events without reuse");
    ensure!(on.2.iter().any(|e| matches!(
        e,
        KvCacheEvent::Stored {
            parent_hash: None,
            ..
        }
    )));
    Ok(())
}

#[test]
fn shutdown_with_requests_in_flight_fails_every_caller_promptly() -> Result<()> {
    let text = text_ids();
    let mut exec = executor(limits(Some(4), None));
    let mut handles = (0..8)
        .map(|i| exec.generate_async(text[i..i + 20].to_vec(), greedy(500, true)))
        .collect::<Result<Vec<_>, _>>()?;
    // Wait until the first batch is decoding, so some requests are mid-flight, others queued.
    match handles[0].next_event() {
        Some(RequestEvent::Tokens(_)) => {}
        other => panic!("expected a token, got {other:?}"),
    }
    let waiters: Vec<_> = handles
        .into_iter()
        .map(|h| std::thread::spawn(move || h.wait()))
        .collect();
    let start = Instant::now();
    exec.shutdown();
    ensure!(
        start.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        start.elapsed()
    );
    for w in waiters {
        let r = w.join().expect("waiter");
        ensure!(matches!(r, Err(ExecutorError::ShutDown)), "{r:?}");
    }
    ensure!(matches!(
        exec.generate_async(vec![1], greedy(1, true)),
        Err(ExecutorError::ShutDown)
    ));
    Ok(())
}
