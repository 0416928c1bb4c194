//! transformers' beams (tests/fixtures/beam-search.json, made by make_beam_golden.py) and
//! the executor's beam requests run against them, on any device.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use serde::Deserialize;
use trtllm_api::executor::{EarlyStopping, ExecutorConfig, GenerationExecutor, GenerationRequest};
use trtllm_api::runtime::{Beam, BeamParams, Device, GenerationParams};

use crate::{fixtures, read_json};

#[derive(Deserialize)]
pub struct Golden {
    pub models: std::collections::BTreeMap<String, Vec<Case>>,
}

#[derive(Deserialize)]
pub struct Case {
    pub input_ids: Vec<u32>,
    pub max_new_tokens: usize,
    pub configs: Vec<Config>,
}

#[derive(Deserialize)]
pub struct Config {
    pub early_stopping: EarlyStopping,
    pub length_penalty: f32,
    pub beams: Vec<GoldBeam>,
}

#[derive(Deserialize)]
pub struct GoldBeam {
    pub ids: Vec<u32>,
    pub score: f32,
}

/// Scores this close are a tie our float32 logits may order either way.
pub const TIE: f32 = 2e-4;

/// Each beam request's beams, and each greedy request's tokens.
pub type Outcome = (Vec<Vec<Beam>>, Vec<Vec<u32>>);

/// Every case and configuration submitted to one executor at once, with `others` greedy
/// requests of 16 tokens beside them; their beams, the greedy outputs, and the KV summary
/// after (every block back).
pub fn through_executor(engine: &Path, cases: &[Case], others: &[Vec<u32>]) -> Result<Outcome> {
    with_config(
        engine,
        (ExecutorConfig::default(), Device::Cpu),
        cases,
        others,
    )
    .map(|(o, _)| o)
}

/// [`through_executor`] with `cfg` on `device`; also the preemptions the beam requests went
/// through.
pub fn with_config(
    engine: &Path,
    (cfg, device): (ExecutorConfig, Device),
    cases: &[Case],
    others: &[Vec<u32>],
) -> Result<(Outcome, usize)> {
    let exec = GenerationExecutor::on_device(engine, cfg, device)?;
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
        lora: None,
    }
}

/// `ours` (one list of beams per case and configuration, in order) against the golden beams.
/// Scores must agree within `score_tol`, and beams whose golden scores are within `tie` of a
/// neighbour's may trade places.
pub fn check(
    name: &str,
    cases: &[Case],
    ours: &[Vec<Beam>],
    (score_tol, tie): (f32, f32),
) -> Result<()> {
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
                (a.score - g.score).abs() < score_tol,
                "{what}: beam {j} score {} vs {}",
                a.score,
                g.score
            );
            // A beam whose score ties a neighbour's may trade places with it.
            let tied = c
                .beams
                .iter()
                .enumerate()
                .any(|(m, o)| m != j && (o.score - g.score).abs() < tie);
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

pub fn golden() -> Result<Golden> {
    read_json(&fixtures().join("beam-search.json"))
}
