//! `cargo bench -p trtllm-tests --bench batching` (part of `cargo xtask bench`): aggregate output
//! tokens/s of SmolLM2 f32 through the executor for 32 requests of 128 prompt + 128 output
//! tokens, in-flight batched at 8 and 32, against the same requests one at a time.

use std::time::Instant;

use anyhow::Result;
use trtllm_api::builder::BuildConfig;
use trtllm_api::executor::{ExecutorConfig, GenerationExecutor, GenerationRequest, IterationStats};
use trtllm_api::runtime::GenerationParams;
use trtllm_tests::{build_smollm2, fixtures, read_json, SmolGolden};

const PROMPT: usize = 128;
const OUTPUT: usize = 128;
const REQUESTS: usize = 32;
/// One-at-a-time requests timed (each is the same work; more only lengthens the run).
const SEQUENTIAL: usize = 4;

struct Run {
    output_tok_s: f64,
    total_tok_s: f64,
    mean_ttft_s: f64,
    /// Output tokens/s over steps that only decode (the steady state of the batch).
    decode_step_tok_s: f64,
}

fn run(dir: &std::path::Path, batch: usize, prompts: &[Vec<u32>]) -> Result<Run> {
    let mut cfg = ExecutorConfig::default();
    cfg.scheduler.max_batch_size = Some(batch);
    // Distinct prompts; reuse off so every prompt token is computed.
    cfg.kv_cache.enable_block_reuse = false;
    let exec = GenerationExecutor::with_config(dir, cfg)?;
    let params = GenerationParams {
        max_new_tokens: OUTPUT,
        ignore_eos: true,
        ..Default::default()
    };
    let stats = exec.subscribe_iteration_stats();
    let start = Instant::now();
    let mut ttft = 0.0;
    let submit = |p: &Vec<u32>| {
        exec.submit(GenerationRequest {
            prompt_token_ids: p.clone(),
            params: params.clone(),
            client_id: None,
            lora: None,
        })
    };
    if batch == 1 {
        for p in prompts {
            ttft += submit(p)?.wait_with_stats()?.1.time_to_first_token_s;
        }
    } else {
        let handles = prompts.iter().map(submit).collect::<Result<Vec<_>, _>>()?;
        for h in handles {
            ttft += h.wait_with_stats()?.1.time_to_first_token_s;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    drop(exec);
    let iters: Vec<IterationStats> = stats.try_iter().collect();
    let decode: Vec<&IterationStats> = iters.iter().filter(|s| s.context_tokens == 0).collect();
    let decode_tokens: usize = decode.iter().map(|s| s.generation_tokens).sum();
    let decode_ms: f64 = decode.iter().map(|s| s.iteration_time_ms).sum();
    let n = prompts.len() as f64;
    Ok(Run {
        output_tok_s: n * OUTPUT as f64 / secs,
        total_tok_s: n * (PROMPT + OUTPUT) as f64 / secs,
        mean_ttft_s: ttft / n,
        decode_step_tok_s: decode_tokens as f64 / (decode_ms / 1e3),
    })
}

fn main() -> Result<()> {
    let golden: SmolGolden = read_json(&fixtures().join("smollm2-135m-instruct.json"))?;
    let text = &golden.perplexity.input_ids;
    let prompts: Vec<Vec<u32>> = (0..REQUESTS)
        .map(|i| {
            let start = (i * 29) % (text.len() - PROMPT);
            text[start..start + PROMPT].to_vec()
        })
        .collect();
    let engine = build_smollm2(&BuildConfig {
        max_batch_size: REQUESTS,
        max_seq_len: 512,
        ..Default::default()
    })?;
    println!(
        "SmolLM2-135M-Instruct f32, {REQUESTS} requests of {PROMPT} prompt + {OUTPUT} output tokens, {} threads",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:<22} {:>14} {:>13} {:>14} {:>10} {:>9}",
        "mode", "output tok/s", "total tok/s", "decode-step/s", "TTFT s", "vs alone"
    );
    let mut alone = 0.0;
    for (mode, batch, reqs) in [
        ("one at a time", 1, &prompts[..SEQUENTIAL]),
        ("in-flight, batch 8", 8, &prompts[..]),
        ("in-flight, batch 32", 32, &prompts[..]),
    ] {
        let r = run(engine.path(), batch, reqs)?;
        if batch == 1 {
            alone = r.output_tok_s;
        }
        println!(
            "{:<22} {:>14.1} {:>13.1} {:>14.1} {:>10.2} {:>8.2}x",
            mode,
            r.output_tok_s,
            r.total_tok_s,
            r.decode_step_tok_s,
            r.mean_ttft_s,
            r.output_tok_s / alone
        );
    }
    Ok(())
}
