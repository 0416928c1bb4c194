//! `cargo bench -p trtllm-tests --bench engine` (or `cargo xtask bench`): SmolLM2-135M prefill
//! tokens/s for a 512-token prompt, batch-1 decode tokens/s and the decode tokens/s of 32 sequences
//! stepped together through `forward_batch`, per weight format (float, quantized, kept GGUF), on
//! the CPU or (`TRTLLM_BENCH_DEVICE=cuda`, built with `--features cuda`) a GPU.

use std::time::Instant;

use anyhow::Result;
use trtllm_api::builder::{build, BuildConfig};
use trtllm_api::runtime::{
    argmax,
    quant::{DType, LayerQuantConfig, QuantAlgo, QuantConfig},
    Device, KvBudget, LogitsMode, ModelRunner, SeqChunk, Session,
};
use trtllm_tests::{fixtures, read_json, smollm2_gguf, SmolGolden};

const PREFILL: usize = 512;
const DECODE: usize = 128;

fn prefill_rate(runner: &ModelRunner, ids: &[u32]) -> Result<f64> {
    let mut best = f64::MAX;
    for _ in 0..3 {
        let mut cache = runner.new_cache(ids.len())?;
        let t = Instant::now();
        runner.forward(ids, &mut cache, LogitsMode::Last)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(ids.len() as f64 / best)
}

fn decode_rate(runner: &ModelRunner, prompt: &[u32]) -> Result<f64> {
    let mut cache = runner.new_cache(prompt.len() + DECODE + 1)?;
    runner.forward(prompt, &mut cache, LogitsMode::Last)?;
    let t = Instant::now();
    let mut tok = prompt[prompt.len() - 1];
    for _ in 0..DECODE {
        let logits = runner.forward(&[tok], &mut cache, LogitsMode::Last)?;
        tok = argmax(&logits);
    }
    Ok(DECODE as f64 / t.elapsed().as_secs_f64())
}

/// Decode steps of `BATCH` sequences at once straight through `forward_batch` (no scheduler):
/// the runtime's ceiling for in-flight batching.
fn batched_decode_rate(runner: &ModelRunner, text: &[u32]) -> Result<f64> {
    const BATCH: usize = 32;
    const PROMPT: usize = 128;
    let bs = 32;
    let per_seq = (PROMPT + DECODE).div_ceil(bs);
    let mut pool = runner.new_pool(&KvBudget::single(BATCH * per_seq, bs))?;
    let own: Vec<Vec<u32>> = (0..BATCH)
        .map(|s| ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect())
        .collect();
    // SmolLM2 has one KV group: one table per sequence.
    let tables: Vec<[&[u32]; 1]> = own.iter().map(|t| [&t[..]]).collect();
    let mut next = Vec::with_capacity(BATCH);
    for (s, table) in tables.iter().enumerate() {
        let prompt = &text[s * 7..s * 7 + PROMPT];
        let chunk = SeqChunk {
            tokens: prompt,
            past: 0,
            blocks: &table[..],
            logits: LogitsMode::Last,
            lora: None,
        };
        next.push(argmax(&runner.forward_batch(&[chunk], &mut pool)?));
    }
    let t = Instant::now();
    for step in 0..DECODE {
        let tokens: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let batch: Vec<SeqChunk> = tokens
            .iter()
            .zip(&tables)
            .map(|(tok, table)| SeqChunk {
                tokens: tok,
                past: PROMPT + step,
                blocks: &table[..],
                logits: LogitsMode::Last,
                lora: None,
            })
            .collect();
        let logits = runner.forward_batch(&batch, &mut pool)?;
        let vocab = runner.model().vocab_size;
        next = logits.chunks_exact(vocab).map(argmax).collect();
    }
    Ok((BATCH * DECODE) as f64 / t.elapsed().as_secs_f64())
}

fn main() -> Result<()> {
    let gguf = smollm2_gguf()?;
    let golden: SmolGolden = read_json(&fixtures().join("smollm2-135m-instruct.json"))?;
    let ids = &golden.perplexity.input_ids[..PREFILL];
    // `TRTLLM_BENCH_DEVICE=cuda` (what `cargo xtask bench-gpu` sets) runs on the GPU.
    let device: Device = std::env::var("TRTLLM_BENCH_DEVICE")
        .unwrap_or_else(|_| "cpu".into())
        .parse()?;
    println!(
        "SmolLM2-135M-Instruct on {device}, {} CPU threads",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:<14} {:>12} {:>16} {:>16} {:>18}",
        "weights", "engine MiB", "prefill tok/s", "decode tok/s", "decode x32 tok/s"
    );
    let float = |dtype| BuildConfig {
        dtype: Some(dtype),
        ..Default::default()
    };
    let quant = |algo, group_size| BuildConfig {
        quant: LayerQuantConfig::uniform(QuantConfig {
            group_size,
            ..QuantConfig::for_algo(algo)
        }),
        ..Default::default()
    };
    let variants = [
        ("float32", float(DType::F32)),
        ("bfloat16", float(DType::BF16)),
        ("W8A16", quant(QuantAlgo::W8A16, 128)),
        ("W4A16 g128", quant(QuantAlgo::W4A16, 128)),
        ("W4A16 g32", quant(QuantAlgo::W4A16, 32)),
        (
            "keep (Q4_1)",
            BuildConfig {
                keep_quantized: true,
                ..Default::default()
            },
        ),
        ("FP8", quant(QuantAlgo::Fp8, 128)),
        ("NVFP4", quant(QuantAlgo::Nvfp4, 128)),
    ];
    let only = std::env::var("TRTLLM_BENCH_WEIGHTS").ok();
    for (name, config) in variants {
        if only
            .as_deref()
            .is_some_and(|o| !o.split(',').any(|w| w == name))
        {
            continue;
        }
        let dir = tempfile::tempdir()?;
        build(&gguf, dir.path(), &config, &mut |_, _, _| {})?;
        let session = Session::open(dir.path())?;
        let runner = session.model_runner_on(device)?;
        let prefill = prefill_rate(&runner, ids)?;
        let decode = decode_rate(&runner, &ids[..8])?;
        let batched = batched_decode_rate(&runner, &golden.perplexity.input_ids)?;
        let mib = session.engine_bytes() as f64 / (1 << 20) as f64;
        println!("{name:<14} {mib:>12.0} {prefill:>16.1} {decode:>16.1} {batched:>18.1}");
    }
    Ok(())
}
