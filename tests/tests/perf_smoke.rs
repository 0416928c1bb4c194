//! Ratio smoke checks for the big performance cliffs, measured within one run so the machine's
//! speed and load cancel out. Each test is its own binary's only test: nothing else shares the
//! cores while it times.

use std::time::Instant;

use anyhow::{ensure, Result};
use trtllm_api::builder::BuildConfig;
use trtllm_api::executor::{ExecutorConfig, GenerationExecutor, GenerationRequest};
use trtllm_api::runtime::GenerationParams;
use trtllm_tests::{build_smollm2, fixtures, read_json, SmolGolden};

const PROMPT: usize = 8;
const OUTPUT: usize = 32;

/// Output tokens/s of `prompts` submitted together through one executor.
fn output_tok_s(exec: &GenerationExecutor, prompts: &[Vec<u32>]) -> Result<f64> {
    let params = GenerationParams {
        max_new_tokens: OUTPUT,
        ignore_eos: true,
        ..Default::default()
    };
    let start = Instant::now();
    let handles = prompts
        .iter()
        .map(|p| {
            exec.submit(GenerationRequest {
                prompt_token_ids: p.clone(),
                params: params.clone(),
                client_id: None,
                lora: None,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut tokens = 0;
    for h in handles {
        tokens += h.wait()?.tokens.len();
    }
    Ok(tokens as f64 / start.elapsed().as_secs_f64())
}

/// In-flight batching must pay: 8 concurrent requests give at least twice the output tokens/s
/// of one. A batched step that falls off its fast path (it once ran at 0.1× this ratio, from
/// intrinsics called out of line in the weight pack) fails here.
#[test]
fn eight_streams_give_at_least_twice_one_stream() -> Result<()> {
    let golden: SmolGolden = read_json(&fixtures().join("smollm2-135m-instruct.json"))?;
    let text = &golden.perplexity.input_ids;
    let prompts: Vec<Vec<u32>> = (0..8)
        .map(|i| text[i * 37..i * 37 + PROMPT].to_vec())
        .collect();
    let engine = build_smollm2(&BuildConfig {
        max_batch_size: 8,
        max_seq_len: 256,
        ..Default::default()
    })?;
    let mut cfg = ExecutorConfig::default();
    cfg.kv_cache.enable_block_reuse = false;
    let exec = GenerationExecutor::with_config(engine.path(), cfg)?;
    // Warm up (page in the weights, start the thread pool), then time.
    output_tok_s(&exec, &prompts[..1])?;
    let one = output_tok_s(&exec, &prompts[..1])?;
    let eight = output_tok_s(&exec, &prompts)?;
    println!(
        "output tok/s: 1 stream {one:.1}, 8 streams {eight:.1} ({:.2}x)",
        eight / one
    );
    ensure!(
        eight >= 2.0 * one,
        "8 concurrent requests give {eight:.1} output tok/s, one gives {one:.1}: {:.2}x, expected >= 2x",
        eight / one
    );
    Ok(())
}
