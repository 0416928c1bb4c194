//! Batch invariance (`ExecutorConfig::batch_invariant`): one request's prompt and generation
//! logits are bit for bit those it gets alone, whatever runs beside it (0 to 31 other requests
//! of other lengths, submitted before and after it) and however the step's token budget chunks
//! its prompt (13, 64 or 2048 tokens per step), over float32 and kept-Q4_1 SmolLM2 engines.

use anyhow::{ensure, Result};
use trtllm_api::builder::BuildConfig;
use trtllm_api::executor::{ExecutorConfig, GenerationExecutor, GenerationRequest};
use trtllm_api::runtime::GenerationParams;
use trtllm_tests::{fixtures, read_json, shared_engine, smollm2_gguf, SmolGolden};

/// Every prompt and generated row of the request under test, as raw bits.
type Bits = Vec<Vec<u32>>;

fn request(prompt: &[u32], max_new_tokens: usize, logits: bool) -> GenerationRequest {
    GenerationRequest {
        prompt_token_ids: prompt.to_vec(),
        params: GenerationParams {
            max_new_tokens,
            return_context_logits: logits,
            return_generation_logits: logits,
            ignore_eos: true,
            ..Default::default()
        },
        client_id: None,
    }
}

/// The request under test (`text[..48]`, 8 tokens) among `others` others, half submitted before
/// it and half after, with `max_num_tokens` per step.
fn run(
    engine: &std::path::Path,
    text: &[u32],
    others: usize,
    max_num_tokens: usize,
) -> Result<Bits> {
    let mut cfg = ExecutorConfig {
        batch_invariant: true,
        ..Default::default()
    };
    cfg.scheduler.max_num_tokens = Some(max_num_tokens);
    let exec = GenerationExecutor::with_config(engine, cfg)?;
    let other = |i: usize| request(&text[100 + 9 * i..][..5 + 7 * i % 53], 4 + i % 9, false);
    let mut handles: Vec<_> = (0..others / 2)
        .map(|i| exec.submit(other(i)))
        .collect::<Result<_, _>>()?;
    let mine = exec.submit(request(&text[..48], 8, true))?;
    for i in others / 2..others {
        handles.push(exec.submit(other(i))?);
    }
    let out = mine.wait()?;
    for h in handles {
        h.wait()?;
    }
    let rows = out
        .context_logits
        .into_iter()
        .flatten()
        .chain(out.generation_logits.into_iter().flatten());
    Ok(rows
        .map(|r| r.iter().map(|v| v.to_bits()).collect())
        .collect())
}

fn check(name: &str, config: &BuildConfig) -> Result<()> {
    let engine = shared_engine(env!("CARGO_TARGET_TMPDIR"), name, &smollm2_gguf()?, config)?;
    let golden: SmolGolden = read_json(&fixtures().join("smollm2-135m-instruct.json"))?;
    let text = &golden.perplexity.input_ids;
    let alone = run(&engine, text, 0, 2048)?;
    ensure!(alone.len() == 48 + 8, "{name}: {} rows", alone.len());
    for (others, max_num_tokens) in [(0, 13), (3, 64), (12, 2048), (31, 64), (31, 13)] {
        let got = run(&engine, text, others, max_num_tokens)?;
        let first = alone.iter().zip(&got).position(|(a, b)| a != b);
        ensure!(
            got.len() == alone.len() && first.is_none(),
            "{name}: with {others} others and {max_num_tokens} tokens per step, row {first:?} \
             differs from the request alone"
        );
    }
    Ok(())
}

#[test]
fn float32_logits_do_not_depend_on_the_batch() -> Result<()> {
    let config = BuildConfig {
        max_batch_size: 64,
        ..Default::default()
    };
    check("invariance-f32", &config)
}

#[test]
fn quantized_logits_do_not_depend_on_the_batch() -> Result<()> {
    let config = BuildConfig {
        max_batch_size: 64,
        keep_quantized: true,
        ..Default::default()
    };
    check("invariance-q4_1", &config)
}
