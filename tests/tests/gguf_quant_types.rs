//! SmolLM2 requantized by llama.cpp's own `llama-quantize` into each GGML type people publish:
//! every file builds with `--quant keep`, gives its float32 build's perplexity within 1e-4 and
//! the same greedy ids. (That the kept values are bit for bit gguf-py's dequantization is
//! `ggml.rs`; this is the whole path: the builder, the engine file and the kernels.)
//! `cargo xtask test` builds llama-quantize with `../shared/tools/llama-cpp.sh` and passes it in
//! `TRTLLM_LLAMA_QUANTIZE`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use trtllm_api::builder::gguf::GgufFile;
use trtllm_api::builder::BuildConfig;
use trtllm_api::runtime::quant::ggml::GgmlType::{self, *};
use trtllm_api::{LlmArgs, Prompt, SamplingParams, LLM};
use trtllm_tests::{fixtures, read_json, shared_engine, smollm2_gguf};

/// llama-quantize's name for each kind, whether it runs `--pure`, and the types its file must
/// then hold. SmolLM2's 576-wide matrices are not a whole number of 256-value super-blocks, so
/// llama-quantize falls back to 32-value types for those and the k-quants appear in the
/// 1536-wide down projections; its Q2_K and Q3_K mixes give those a larger type unless `--pure`.
const KINDS: [(&str, bool, &[GgmlType]); 9] = [
    ("Q2_K", true, &[Q2_K]),
    ("Q3_K_M", true, &[Q3_K]),
    ("Q4_K_M", false, &[Q4_K, Q6_K, Q5_0]),
    ("Q5_K_M", false, &[Q5_K, Q6_K, Q5_1]),
    ("Q6_K", false, &[Q6_K]),
    ("IQ4_NL", false, &[IQ4_NL]),
    ("IQ4_XS", false, &[IQ4_XS]),
    ("Q5_0", false, &[Q5_0]),
    ("Q5_1", false, &[Q5_1]),
];

#[derive(Deserialize)]
struct Golden {
    cases: Vec<Case>,
    perplexity: Ids,
}

#[derive(Deserialize)]
struct Case {
    input_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Ids {
    input_ids: Vec<u32>,
}

fn llama_quantize() -> Result<PathBuf> {
    match std::env::var_os("TRTLLM_LLAMA_QUANTIZE") {
        Some(p) => Ok(PathBuf::from(p)),
        None => bail!(
            "TRTLLM_LLAMA_QUANTIZE is not set: `cargo xtask test` builds llama.cpp's \
             llama-quantize and sets it"
        ),
    }
}

fn quantize(tool: &Path, (kind, pure): (&str, bool), out: &Path) -> Result<()> {
    let status = Command::new(tool)
        .arg("--allow-requantize")
        .args(pure.then_some("--pure"))
        .arg(smollm2_gguf()?)
        .arg(out)
        .arg(kind)
        .output()
        .with_context(|| format!("running {}", tool.display()))?;
    ensure!(
        status.status.success(),
        "llama-quantize {kind}: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    Ok(())
}

/// Perplexity over the golden text's first 256 tokens and 24 greedy ids after the first case's
/// prompt, with the top-2 log-probability margin at each step.
fn measure(engine: &Path, golden: &Golden) -> Result<(f64, Vec<u32>, Vec<f32>)> {
    let llm = LLM::new(LlmArgs {
        model: engine.to_path_buf(),
        ..Default::default()
    })?;
    let nll = llm
        .perplexity(&golden.perplexity.input_ids[..256])?
        .mean_nll;
    let params = SamplingParams {
        max_tokens: 24,
        ignore_eos: true,
        logprobs: Some(2),
        ..Default::default()
    };
    let prompt = Prompt::TokenIds(golden.cases[0].input_ids.clone());
    let out = llm
        .generate(&[prompt], &params)?
        .remove(0)
        .outputs
        .remove(0);
    let margins = out
        .logprobs
        .unwrap_or_default()
        .iter()
        .map(|l| match &l.top[..] {
            [a, b, ..] => a.logprob - b.logprob,
            _ => f32::INFINITY,
        })
        .collect();
    Ok((nll, out.token_ids, margins))
}

#[test]
fn every_requantized_type_keeps_the_float_builds_perplexity_and_greedy_ids() -> Result<()> {
    let tool = llama_quantize()?;
    let golden: Golden = read_json(&fixtures().join("smollm2-135m-instruct.json"))?;
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR")).join("quant-types");
    std::fs::create_dir_all(&tmp)?;
    for (kind, pure, types) in KINDS {
        let file = tmp.join(format!("smollm2-{kind}.gguf"));
        quantize(&tool, (kind, pure), &file)?;
        let held: Vec<GgmlType> = GgufFile::open(&file)?
            .tensors
            .values()
            .map(|t| t.ty)
            .collect();
        for t in types {
            ensure!(held.contains(t), "{kind}: the file holds no {t:?} tensor");
        }
        let mut results = Vec::new();
        for (name, keep) in [("float", false), ("keep", true)] {
            let config = BuildConfig {
                keep_quantized: keep,
                ..Default::default()
            };
            let dir = shared_engine(tmp.to_str().context("tmp path")?, name, &file, &config)?;
            results.push(measure(&dir, &golden)?);
            std::fs::remove_dir_all(&dir)?;
        }
        let [(float_nll, float_ids, margins), (kept_nll, kept_ids, _)] = &results[..] else {
            unreachable!("two builds")
        };
        let rel = (kept_nll - float_nll).abs() / float_nll;
        ensure!(
            rel < 1e-4,
            "{kind}: kept mean NLL {kept_nll} vs float {float_nll} (relative {rel:e})"
        );
        // Past a near-tie the two may rightly part ways; compare up to the first one.
        let upto = margins
            .iter()
            .position(|&m| m < 1e-3)
            .unwrap_or(float_ids.len());
        ensure!(
            kept_ids[..upto] == float_ids[..upto],
            "{kind}: kept greedy {kept_ids:?} vs float {float_ids:?}"
        );
        std::fs::remove_file(&file)?;
    }
    Ok(())
}
