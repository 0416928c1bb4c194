//! Gemma 3 270M from its published Q4_K_M GGUF (k-quants dequantized at build, SentencePiece
//! tokenizer from the file's metadata, local and global layers) against transformers, which
//! loads the same file (tests/fixtures/gemma3-270m.json, made by make_gemma3_golden.py).

use std::sync::OnceLock;

use anyhow::{ensure, Result};
use serde::Deserialize;
use trtllm_api::builder::BuildConfig;
use trtllm_api::{LlmArgs, Prompt, SamplingParams, LLM};
use trtllm_tests::{fixtures, gemma3_gguf, read_json, shared_engine};

#[derive(Deserialize)]
struct Golden {
    cases: Vec<Case>,
    perplexity: Perplexity,
}

#[derive(Deserialize)]
struct Case {
    prompt: String,
    input_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    greedy_top2_margins: Vec<f32>,
}

#[derive(Deserialize)]
struct Perplexity {
    input_ids: Vec<u32>,
    mean_nll: f64,
}

fn golden() -> Golden {
    read_json(&fixtures().join("gemma3-270m.json")).expect("gemma3-270m.json")
}

type Engine = OnceLock<LLM>;

fn open(engine: &'static Engine, name: &str, config: BuildConfig) -> &'static LLM {
    engine.get_or_init(|| {
        let gguf = gemma3_gguf().expect("Gemma 3 GGUF");
        let dir = shared_engine(env!("CARGO_TARGET_TMPDIR"), name, &gguf, &config)
            .expect("build Gemma 3");
        LLM::new(LlmArgs {
            model: dir,
            ..Default::default()
        })
        .expect("open Gemma 3")
    })
}

/// The float32 engine most tests here share.
fn llm() -> &'static LLM {
    static ENGINE: Engine = OnceLock::new();
    open(&ENGINE, "gemma3-f32", BuildConfig::default())
}

/// The engine that keeps the file's Q4_K, Q5_0, Q6_K and Q8_0 weights packed.
fn kept() -> &'static LLM {
    static ENGINE: Engine = OnceLock::new();
    let config = BuildConfig {
        keep_quantized: true,
        ..Default::default()
    };
    open(&ENGINE, "gemma3-kept", config)
}

#[test]
fn tokenizer_from_the_gguf_matches_transformers_and_round_trips() -> Result<()> {
    let tok = llm().tokenizer()?;
    for (i, c) in golden().cases.iter().enumerate() {
        let ids = tok.encode(&c.prompt, true)?;
        ensure!(ids == c.input_ids, "case {i}: {ids:?} != {:?}", c.input_ids);
        let text = tok.decode(&ids[1..], false)?;
        ensure!(text == c.prompt, "case {i}: decode gave {text:?}");
    }
    Ok(())
}

#[test]
fn greedy_ids_match_transformers_past_the_sliding_window() -> Result<()> {
    let golden = golden();
    ensure!(golden.cases.iter().any(|c| c.input_ids.len() > 512));
    for (i, c) in golden.cases.iter().enumerate() {
        let params = SamplingParams {
            max_tokens: c.greedy_ids.len(),
            ignore_eos: true,
            ..Default::default()
        };
        let out = llm().generate(&[Prompt::TokenIds(c.input_ids.clone())], &params)?;
        let got = &out[0].outputs[0].token_ids;
        // Past a near-tie the two may rightly part ways; compare up to the first one.
        let upto = c
            .greedy_top2_margins
            .iter()
            .position(|&m| m < 1e-3)
            .unwrap_or(c.greedy_ids.len());
        ensure!(
            got[..upto] == c.greedy_ids[..upto],
            "case {i}: {got:?} != {:?}",
            c.greedy_ids
        );
    }
    Ok(())
}

#[test]
fn perplexity_within_a_fifth_of_a_percent_of_transformers() -> Result<()> {
    let golden = golden().perplexity;
    let p = llm().perplexity(&golden.input_ids)?;
    let rel = (p.mean_nll - golden.mean_nll).abs() / golden.mean_nll;
    ensure!(
        rel < 2e-3,
        "mean NLL {} vs transformers {}",
        p.mean_nll,
        golden.mean_nll
    );
    Ok(())
}

#[test]
fn kept_quantization_gives_the_float_engines_perplexity_and_greedy_ids() -> Result<()> {
    let golden = golden();
    let ids = &golden.perplexity.input_ids;
    let (float, packed) = (llm().perplexity(ids)?, kept().perplexity(ids)?);
    let rel = (packed.mean_nll - float.mean_nll).abs() / float.mean_nll;
    ensure!(
        rel < 1e-4,
        "kept {} vs float {} (relative {rel:e})",
        packed.mean_nll,
        float.mean_nll
    );
    let c = &golden.cases[0];
    let params = SamplingParams {
        max_tokens: c.greedy_ids.len(),
        ignore_eos: true,
        ..Default::default()
    };
    let out = kept().generate(&[Prompt::TokenIds(c.input_ids.clone())], &params)?;
    ensure!(out[0].outputs[0].token_ids == c.greedy_ids);
    Ok(())
}
