//! Beam search against transformers 5.24's `generate(num_beams=4, num_return_sequences=4,
//! do_sample=False, ...)` on four tiny fixtures and SmolLM2 (tests/fixtures/beam-search.json,
//! made by make_beam_golden.py), under early_stopping true / false / "never" and length
//! penalties 1 / 0.5 / 2: through the executor (every case of a model in flight at once, each
//! beam a KV sequence forked from its parent's), and the search alone (`BeamSearch`, each beam's
//! logits recomputed whole per step) on the tiny fixtures.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use serde::Deserialize;
use trtllm_api::builder::{build, BuildConfig};
use trtllm_api::executor::{
    BeamConfig, BeamSearch, EarlyStopping, ExecutorConfig, GenerationExecutor, GenerationRequest,
};
use trtllm_api::runtime::{Beam, BeamParams, GenerationParams, LogitsMode, ModelRunner, Session};
use trtllm_tests::{fixtures, read_json, smollm2_gguf};

#[derive(Deserialize)]
struct Golden {
    models: std::collections::BTreeMap<String, Vec<Case>>,
}

#[derive(Deserialize)]
struct Case {
    input_ids: Vec<u32>,
    max_new_tokens: usize,
    configs: Vec<Config>,
}

#[derive(Deserialize)]
struct Config {
    early_stopping: EarlyStopping,
    length_penalty: f32,
    beams: Vec<GoldBeam>,
}

#[derive(Deserialize)]
struct GoldBeam {
    ids: Vec<u32>,
    score: f32,
}

/// Scores this close are a tie our float32 logits may order either way.
const TIE: f32 = 2e-4;

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

/// Each beam request's beams, and each greedy request's tokens.
type Outcome = (Vec<Vec<Beam>>, Vec<Vec<u32>>);

/// Every case and configuration submitted to one executor at once, with `others` greedy
/// requests of 16 tokens beside them; their beams, the greedy outputs, and the KV summary
/// after (every block back).
fn through_executor(engine: &Path, cases: &[Case], others: &[Vec<u32>]) -> Result<Outcome> {
    with_config(engine, ExecutorConfig::default(), cases, others).map(|(o, _)| o)
}

/// [`through_executor`] with `cfg`; also the preemptions the beam requests went through.
fn with_config(
    engine: &Path,
    cfg: ExecutorConfig,
    cases: &[Case],
    others: &[Vec<u32>],
) -> Result<(Outcome, usize)> {
    let exec = GenerationExecutor::with_config(engine, cfg)?;
    let mut handles = Vec::new();
    for case in cases {
        for c in &case.configs {
            let params = GenerationParams {
                max_new_tokens: case.max_new_tokens,
                beam: Some(BeamParams {
                    width: c.beams.len(),
                    length_penalty: c.length_penalty,
                    early_stopping: c.early_stopping,
                }),
                ..Default::default()
            };
            handles.push(exec.submit(request(case.input_ids.clone(), params))?);
        }
    }
    let greedy = GenerationParams {
        max_new_tokens: 16,
        ..Default::default()
    };
    let mut greedy_handles = Vec::new();
    for p in others {
        greedy_handles.push(exec.submit(request(p.clone(), greedy.clone()))?);
    }
    let mut preemptions = 0;
    let mut beams = Vec::new();
    for h in handles {
        let (out, stats) = h.wait_with_stats()?;
        preemptions += stats.preemptions;
        beams.push(out.beams.context("a beam request's beams")?);
    }
    let outputs = greedy_handles
        .into_iter()
        .map(|h| Ok(h.wait()?.tokens))
        .collect::<Result<Vec<_>>>()?;
    let kv = exec.kv_cache_summary()?;
    ensure!(kv.used_blocks == 0, "blocks still held after: {kv:?}");
    // Beams forked from partly filled blocks: the copy-on-write path ran.
    ensure!(
        cases.is_empty() || kv.copied_blocks > 0,
        "no block copied: {kv:?}"
    );
    Ok(((beams, outputs), preemptions))
}

fn request(prompt_token_ids: Vec<u32>, params: GenerationParams) -> GenerationRequest {
    GenerationRequest {
        prompt_token_ids,
        params,
        client_id: None,
    }
}

/// `ours` (one list of beams per case and configuration, in order) against the golden beams.
fn check(name: &str, cases: &[Case], ours: &[Vec<Beam>]) -> Result<()> {
    let configs = cases
        .iter()
        .enumerate()
        .flat_map(|(i, case)| case.configs.iter().map(move |c| (i, c)));
    for ((i, c), ours) in configs.zip(ours) {
        let what = format!(
            "{name} case {i}, early_stopping {:?}, length_penalty {}",
            c.early_stopping, c.length_penalty
        );
        ensure!(ours.len() == c.beams.len(), "{what}: beams");
        for (j, (a, g)) in ours.iter().zip(&c.beams).enumerate() {
            ensure!(
                (a.score - g.score).abs() < 1e-3,
                "{what}: beam {j} score {} vs {}",
                a.score,
                g.score
            );
            // A beam whose score ties a neighbour's may trade places with it.
            let tied = c
                .beams
                .iter()
                .enumerate()
                .any(|(m, o)| m != j && (o.score - g.score).abs() < TIE);
            ensure!(
                a.tokens == g.ids || tied,
                "{what}: beam {j} {:?} vs {:?}",
                a.tokens,
                g.ids
            );
        }
    }
    Ok(())
}

fn golden() -> Result<Golden> {
    read_json(&fixtures().join("beam-search.json"))
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
        check(name, cases, &search_alone(engine.path(), cases)?)?;
        let (beams, _) = through_executor(engine.path(), cases, &[])?;
        check(name, cases, &beams)?;
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
        let ((beams, _), preemptions) = with_config(engine.path(), cfg, cases, &others)?;
        check(name, cases, &beams)?;
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
    check("smollm2", cases, &beams)?;
    ensure!(
        alone == beside,
        "greedy outputs changed beside the beam requests"
    );
    Ok(())
}
