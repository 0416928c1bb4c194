//! Context and generation logits through the LLM API (TensorRT-LLM's `return_context_logits` /
//! `return_generation_logits`) against transformers' golden logits of the tiny fixtures.

use anyhow::{ensure, Result};
use trtllm_api::builder::{build, BuildConfig};
use trtllm_api::{LlmArgs, Prompt, SamplingParams, LLM};
use trtllm_tests::{fixtures, max_abs_diff, read_json, FixtureGolden};

const TOL: f32 = 1e-3;

/// A tiny fixture built with the default config, and an `LLM` over it (the engine lives as
/// long as the directory).
fn open(name: &str) -> Result<(tempfile::TempDir, LLM)> {
    let engine = tempfile::tempdir()?;
    let config = BuildConfig::default();
    build(
        &fixtures().join(name),
        engine.path(),
        &config,
        &mut |_, _, _| {},
    )?;
    let llm = LLM::new(LlmArgs {
        model: engine.path().into(),
        ..Default::default()
    })?;
    Ok((engine, llm))
}

fn check(name: &str) -> Result<()> {
    let golden: FixtureGolden = read_json(&fixtures().join(name).join("golden.json"))?;
    let (_engine, llm) = open(name)?;
    let case = &golden.cases[0];
    let steps = case.greedy_step_logits_first4.len();
    ensure!(
        case.prompt_logits.len() == case.input_ids.len(),
        "{name}: golden rows"
    );
    let params = SamplingParams {
        max_tokens: steps,
        ignore_eos: true,
        n: 2,
        return_context_logits: true,
        return_generation_logits: true,
        ..Default::default()
    };
    let prompt = Prompt::TokenIds(case.input_ids.clone());
    // The second time the prompt's blocks are cached: context logits must not reuse them.
    for round in 0..2 {
        let out = llm
            .generate(std::slice::from_ref(&prompt), &params)?
            .remove(0);
        let context = out.context_logits.as_ref().expect("context logits");
        ensure!(
            context.len() == case.input_ids.len(),
            "{name}: {} context rows",
            context.len()
        );
        for (pos, (row, gold)) in context.iter().zip(&case.prompt_logits).enumerate() {
            let d = max_abs_diff(row, gold);
            ensure!(
                d < TOL,
                "{name} round {round}: context position {pos}: max |Δ| {d}"
            );
        }
        for c in &out.outputs {
            ensure!(
                c.token_ids == case.greedy_ids[..steps],
                "{name}: greedy ids"
            );
            let rows = c.generation_logits.as_ref().expect("generation logits");
            ensure!(
                rows.len() == steps,
                "{name}: {} generation rows",
                rows.len()
            );
            for (s, (row, gold)) in rows.iter().zip(&case.greedy_step_logits_first4).enumerate() {
                let d = max_abs_diff(row, gold);
                ensure!(d < TOL, "{name} round {round}: step {s}: max |Δ| {d}");
            }
        }
    }
    Ok(())
}

#[test]
fn context_and_generation_logits_equal_transformers() -> Result<()> {
    for name in ["tiny-llama", "tiny-qwen3-moe", "tiny-gemma3"] {
        check(name)?;
    }
    Ok(())
}

#[test]
fn logits_are_only_returned_when_asked() -> Result<()> {
    let (_engine, llm) = open("tiny-llama")?;
    let out = llm
        .generate(
            &[Prompt::TokenIds(vec![1, 2, 3])],
            &SamplingParams::default(),
        )?
        .remove(0);
    ensure!(out.context_logits.is_none() && out.outputs[0].generation_logits.is_none());
    let json = serde_json::to_value(&out)?;
    ensure!(json.get("context_logits").is_none(), "{json}");
    Ok(())
}
