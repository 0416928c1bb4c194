//! Beam search against transformers 5.24's `generate(num_beams=4, num_return_sequences=4,
//! do_sample=False, ...)` on four tiny fixtures and SmolLM2 (tests/fixtures/beam-search.json,
//! made by make_beam_golden.py), under early_stopping true / false / "never" and length
//! penalties 1 / 0.5 / 2: through the executor (every case of a model in flight at once, each
//! beam a KV sequence forked from its parent's), and the search alone (`BeamSearch`, each beam's
//! logits recomputed whole per step) on the tiny fixtures.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use trtllm_api::builder::{build, BuildConfig};
use trtllm_api::executor::{BeamConfig, BeamSearch, ExecutorConfig};
use trtllm_api::runtime::{Beam, Device, LogitsMode, ModelRunner, Session};
use trtllm_tests::beam_golden::{check, golden, through_executor, with_config, Case, TIE};
use trtllm_tests::{fixtures, smollm2_gguf};

fn last_logits(runner: &ModelRunner, tokens: &[u32]) -> Result<Vec<f32>> {
    let mut cache = runner.new_cache(tokens.len())?;
    Ok(runner.forward(tokens, &mut cache, LogitsMode::Last)?)
}

/// Each case and configuration's beams by `BeamSearch` alone, every running beam's logits
/// recomputed from scratch.
fn search_alone(engine: &Path, cases: &[Case]) -> Result<Vec<Vec<Beam>>> {
    let runner = Session::open(engine)?.model_runner()?;
    let eos = runner.model().eos_token_ids.clone();
    let mut out = Vec::new();
    for case in cases {
        for c in &case.configs {
            let mut search = BeamSearch::new(BeamConfig {
                width: c.beams.len(),
                length_penalty: c.length_penalty,
                early_stopping: c.early_stopping,
                max_new_tokens: case.max_new_tokens,
                eos: eos.clone(),
            });
            while !search.is_done() {
                let rows = search
                    .running()
                    .iter()
                    .map(|beam| last_logits(&runner, &[&case.input_ids[..], beam].concat()))
                    .collect::<Result<Vec<_>>>()?;
                let rows: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
                search.step(&rows);
            }
            out.push(search.finish());
        }
    }
    Ok(out)
}

fn engine(checkpoint: &Path) -> Result<tempfile::TempDir> {
    let engine = tempfile::tempdir()?;
    build(
        checkpoint,
        engine.path(),
        &BuildConfig::default(),
        &mut |_, _, _| {},
    )?;
    Ok(engine)
}

#[test]
fn tiny_fixtures_give_transformers_beams() -> Result<()> {
    let golden = golden()?;
    for (name, cases) in golden.models.iter().filter(|(n, _)| *n != "smollm2") {
        let engine = engine(&fixtures().join(name))?;
        check(
            name,
            cases,
            &search_alone(engine.path(), cases)?,
            (1e-3, TIE),
        )?;
        let (beams, _) = through_executor(engine.path(), cases, &[])?;
        check(name, cases, &beams, (1e-3, TIE))?;
    }
    Ok(())
}

/// A pool too small for every beam at once, under MAX_UTILIZATION: beam searches are
/// preempted (their blocks released, the search restarted) and still give transformers' beams;
/// in small blocks, with a sliding-window group (Gemma 2) whose beams fork too.
#[test]
fn preempted_beam_searches_restart_and_give_the_same_beams() -> Result<()> {
    use trtllm_api::executor::CapacitySchedulerPolicy;
    let golden = golden()?;
    for name in ["tiny-llama", "tiny-gemma2"] {
        let cases = &golden.models[name];
        let engine = engine(&fixtures().join(name))?;
        let mut cfg = ExecutorConfig::default();
        cfg.scheduler.policy = CapacitySchedulerPolicy::MaxUtilization;
        cfg.kv_cache.tokens_per_block = 4;
        cfg.kv_cache.max_tokens = Some(96);
        let others: Vec<Vec<u32>> = (0..4).map(|i| vec![5 + i, 9, 13, 17, 21, 25]).collect();
        let ((beams, _), preemptions) =
            with_config(engine.path(), (cfg, Device::Cpu), cases, &others)?;
        check(name, cases, &beams, (1e-3, TIE))?;
        ensure!(preemptions > 0, "{name}: no beam search was preempted");
    }
    Ok(())
}

/// Every SmolLM2 prompt and configuration in flight together with 16 greedy requests: the
/// beams are transformers', the greedy outputs those of the same requests alone.
#[test]
fn smollm2_beams_beside_greedy_requests() -> Result<()> {
    let golden = golden()?;
    let cases = golden.models.get("smollm2").context("smollm2 cases")?;
    let engine = engine(&smollm2_gguf()?)?;
    let prompts: Vec<Vec<u32>> = (0..16u32)
        .map(|i| [&cases[i as usize % cases.len()].input_ids[..], &[1000 + i]].concat())
        .collect();
    let (_, alone) = through_executor(engine.path(), &[], &prompts)?;
    let (beams, beside) = through_executor(engine.path(), cases, &prompts)?;
    check("smollm2", cases, &beams, (1e-3, TIE))?;
    ensure!(
        alone == beside,
        "greedy outputs changed beside the beam requests"
    );
    Ok(())
}
