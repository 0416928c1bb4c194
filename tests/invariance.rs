//! Batch invariance (`ExecutorConfig::batch_invariant`) as the CPU and GPU tests check it: one
//! request's prompt and generation logits are bit for bit those it gets alone, whatever runs
//! beside it (other requests of other lengths, submitted before and after it) and however the
//! step's token budget chunks its prompt.

use std::path::Path;

use anyhow::{ensure, Result};
use trtllm_api::executor::{ExecutorConfig, GenerationExecutor, GenerationRequest};
use trtllm_api::runtime::{Device, GenerationParams};

/// Every prompt and generated row of the request under test, as raw bits.
type Bits = Vec<Vec<u32>>;

/// How the request under test runs: beside `others` other requests, with `max_num_tokens` per
/// step.
#[derive(Clone, Copy, Debug)]
pub struct Mix {
    pub others: usize,
    pub max_num_tokens: usize,
}

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
        lora: None,
    }
}

/// The request under test (`text[..48]`, 8 new tokens) as `mix` says, half the others submitted
/// before it and half after; the others' prompts are cut from `text` past 100 (it needs
/// 100 + 9 · others + 60 tokens).
fn run(engine: &Path, device: Device, text: &[u32], mix: Mix) -> Result<Bits> {
    let mut cfg = ExecutorConfig {
        batch_invariant: true,
        ..Default::default()
    };
    cfg.scheduler.max_num_tokens = Some(mix.max_num_tokens);
    let exec = GenerationExecutor::on_device(engine, cfg, device)?;
    let other = |i: usize| request(&text[100 + 9 * i..][..5 + 7 * i % 53], 4 + i % 9, false);
    let mut handles: Vec<_> = (0..mix.others / 2)
        .map(|i| exec.submit(other(i)))
        .collect::<Result<_, _>>()?;
    let mine = exec.submit(request(&text[..48], 8, true))?;
    for i in mix.others / 2..mix.others {
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

/// The request alone in one step, then in each of `mixes`: every row must match.
pub fn check(
    name: &str,
    (engine, device): (&Path, Device),
    text: &[u32],
    mixes: &[Mix],
) -> Result<()> {
    let alone = Mix {
        others: 0,
        max_num_tokens: 2048,
    };
    let want = run(engine, device, text, alone)?;
    ensure!(want.len() == 48 + 8, "{name}: {} rows", want.len());
    for &mix in mixes {
        let got = run(engine, device, text, mix)?;
        let first = want.iter().zip(&got).position(|(a, b)| a != b);
        ensure!(
            got.len() == want.len() && first.is_none(),
            "{name}: with {mix:?}, row {first:?} differs from the request alone"
        );
    }
    Ok(())
}
