//! `cargo bench -p trtllm-tests --bench engine` (or `cargo xtask bench`): SmolLM2-135M prefill
//! tokens/s for a 512-token prompt and batch-1 decode tokens/s, per weight dtype.

use std::time::Instant;

use anyhow::Result;
use trtllm_api::builder::{build, BuildConfig};
use trtllm_api::runtime::{quant::DType, LogitsMode, ModelRunner, Session};
use trtllm_tests::{fixtures, read_json, smollm2_gguf, SmolGolden};

const PREFILL: usize = 512;
const DECODE: usize = 128;

fn prefill_rate(runner: &ModelRunner, ids: &[u32]) -> Result<f64> {
    let mut best = f64::MAX;
    for _ in 0..3 {
        let mut cache = runner.new_cache(ids.len());
        let t = Instant::now();
        runner.forward(ids, &mut cache, LogitsMode::Last)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(ids.len() as f64 / best)
}

fn decode_rate(runner: &ModelRunner, prompt: &[u32]) -> Result<f64> {
    let mut cache = runner.new_cache(prompt.len() + DECODE + 1);
    runner.forward(prompt, &mut cache, LogitsMode::Last)?;
    let t = Instant::now();
    let mut tok = prompt[prompt.len() - 1];
    for _ in 0..DECODE {
        let logits = runner.forward(&[tok], &mut cache, LogitsMode::Last)?;
        tok = trtllm_api::runtime::argmax(&logits);
    }
    Ok(DECODE as f64 / t.elapsed().as_secs_f64())
}

fn main() -> Result<()> {
    let gguf = smollm2_gguf()?;
    let golden: SmolGolden = read_json(&fixtures().join("smollm2-135m-instruct.json"))?;
    let ids = &golden.perplexity.input_ids[..PREFILL];
    println!(
        "SmolLM2-135M-Instruct, {} threads",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:<10} {:>12} {:>16} {:>16}",
        "dtype", "engine MiB", "prefill tok/s", "decode tok/s"
    );
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let dir = tempfile::tempdir()?;
        build(
            &gguf,
            dir.path(),
            &BuildConfig {
                dtype: Some(dtype),
                ..Default::default()
            },
            &mut |_, _, _| {},
        )?;
        let session = Session::open(dir.path())?;
        let runner = session.model_runner()?;
        let prefill = prefill_rate(&runner, ids)?;
        let decode = decode_rate(&runner, &ids[..8])?;
        let mib = session.engine_bytes() as f64 / (1 << 20) as f64;
        println!(
            "{:<10} {:>12.0} {:>16.1} {:>16.1}",
            dtype.name(),
            mib,
            prefill,
            decode
        );
    }
    Ok(())
}
