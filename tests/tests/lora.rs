//! LoRA adapters (issue 20) against transformers + peft (`tests/fixtures/make_lora_golden.py`):
//! PEFT adapters on three bases (all seven projections, q/v only with rsLoRA, q/k/v biases in the
//! base, Phi-3's fused targets) at ranks 4, 8 and 16 give peft's logits within 1e-3 and its greedy
//! tokens; malformed or mismatched adapters are refused, each with one clear error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Result};
use serde::Deserialize;
use trtllm_api::builder::{build, BuildConfig};
use trtllm_api::runtime::quant::{DType, LayerQuantConfig, QuantAlgo, QuantConfig};
use trtllm_api::runtime::{argmax, LogitsMode, ModelRunner, Session};
use trtllm_tests::{
    check_adapted_case, check_case_logits, fixtures, max_abs_diff, read_json, FixtureCase,
};

#[derive(Deserialize)]
struct Golden {
    adapters: BTreeMap<String, Adapter>,
}

#[derive(Deserialize)]
struct Adapter {
    base: String,
    cases: Vec<FixtureCase>,
}

fn lora_dir(name: &str) -> PathBuf {
    fixtures().join("lora").join(name)
}

fn engine(base: &str, config: &BuildConfig) -> Result<(tempfile::TempDir, ModelRunner)> {
    let out = tempfile::tempdir()?;
    build(
        &fixtures().join(base),
        out.path(),
        config,
        &mut |_, _, _| {},
    )?;
    let runner = Session::open(out.path())?.model_runner()?;
    Ok((out, runner))
}

#[test]
fn adapters_match_transformers_and_peft() -> Result<()> {
    let golden: Golden = read_json(&lora_dir("golden.json"))?;
    for (name, adapter) in &golden.adapters {
        let (_dir, runner) = engine(&adapter.base, &BuildConfig::default())?;
        let weights = runner.load_lora(&runner.read_lora(name, &lora_dir(name))?)?;
        for (ci, case) in adapter.cases.iter().enumerate() {
            let what = format!("{name} case {ci}");
            check_adapted_case(&runner, (case, Some(&weights)), 1e-3, &what)?;
            let greedy = greedy(&runner, case, &weights)?;
            for (i, (g, e)) in greedy.iter().zip(&case.greedy_ids).enumerate() {
                ensure!(
                    g == e || case.greedy_top2_margins[i] < 1e-3,
                    "{what}: greedy {greedy:?} != {:?}",
                    case.greedy_ids
                );
            }
        }
        // Without the adapter the same runner is the base model: the adapter changed its output.
        let mut cache = runner.new_cache(64)?;
        let case = &adapter.cases[0];
        let base = runner.forward(&case.input_ids, &mut cache, LogitsMode::Last)?;
        let moved = max_abs_diff(&base, case.prompt_logits.last().expect("logits"));
        ensure!(
            moved > 0.01,
            "{name}: the adapter moves the logits by only {moved}"
        );
    }
    Ok(())
}

fn greedy(
    runner: &ModelRunner,
    case: &FixtureCase,
    lora: &trtllm_api::runtime::LoraWeights,
) -> Result<Vec<u32>> {
    let mut cache = runner.new_cache(case.input_ids.len() + case.greedy_ids.len())?;
    let mut logits =
        runner.forward_adapted(&case.input_ids, (&mut cache, Some(lora)), LogitsMode::Last)?;
    let mut out = Vec::new();
    for _ in 0..case.greedy_ids.len() {
        let t = argmax(&logits);
        out.push(t);
        logits = runner.forward_adapted(&[t], (&mut cache, Some(lora)), LogitsMode::Last)?;
    }
    Ok(out)
}

/// An adapter merged into the weights at build time (`trtllm build --lora DIR --merge-lora`)
/// gives peft's logits with no adapter at run time.
#[test]
fn a_merged_adapter_matches_peft() -> Result<()> {
    let golden: Golden = read_json(&lora_dir("golden.json"))?;
    for name in ["tiny-llama-r8", "tiny-phi3-r8-fused"] {
        let adapter = &golden.adapters[name];
        let config = BuildConfig {
            dtype: Some(DType::F32),
            merge_lora: Some(lora_dir(name)),
            ..Default::default()
        };
        let (_dir, runner) = engine(&adapter.base, &config)?;
        for (ci, case) in adapter.cases.iter().enumerate() {
            check_case_logits(&runner, case, 1e-3, &format!("{name} merged, case {ci}"))?;
        }
    }
    Ok(())
}

/// An adapter over quantized weights (W8A16, W4A16: the adapter stays f32) moves the logits as it
/// does over the float model: the update is added to the quantized layer's output.
#[test]
fn adapters_apply_over_quantized_bases() -> Result<()> {
    let name = "tiny-llama-r8";
    let case = |r: &ModelRunner, lora: bool| -> Result<Vec<f32>> {
        let w = r.load_lora(&r.read_lora(name, &lora_dir(name))?)?;
        let ids = [5u32, 77, 300, 12, 9, 640, 31];
        let mut cache = r.new_cache(16)?;
        let lora = lora.then_some(&w);
        Ok(r.forward_adapted(&ids, (&mut cache, lora), LogitsMode::Last)?)
    };
    let delta = |r: &ModelRunner| -> Result<Vec<f32>> {
        let (with, without) = (case(r, true)?, case(r, false)?);
        Ok(with.iter().zip(&without).map(|(a, b)| a - b).collect())
    };
    let (_f, float) = engine("tiny-llama", &BuildConfig::default())?;
    let want = delta(&float)?;
    // 4-bit codes move this 64-wide random model's activations far (so the change the adapter
    // makes downstream too): there the check is that the update is applied at all (not applied,
    // the difference would be the whole change).
    for (algo, tol) in [(QuantAlgo::W8A16, 0.05), (QuantAlgo::W4A16, 0.5)] {
        let config = BuildConfig {
            quant: LayerQuantConfig::uniform(QuantConfig::for_algo(algo)),
            ..Default::default()
        };
        let (_q, quantized) = engine("tiny-llama", &config)?;
        let d = max_abs_diff(&delta(&quantized)?, &want);
        let size = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        ensure!(
            d < tol * size,
            "{algo:?}: the adapter's change differs by {d} (of {size})"
        );
    }
    Ok(())
}

/// Copies an adapter directory so a test can damage its copy.
fn copy_adapter(name: &str) -> Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(lora_dir(name).join(f), dir.path().join(f))?;
    }
    Ok(dir)
}

fn refused(runner: &ModelRunner, name: &str, dir: &Path) -> String {
    match runner
        .read_lora(name, dir)
        .and_then(|a| runner.load_lora(&a))
    {
        Ok(_) => panic!("{name}: loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_adapters_are_refused_with_one_clear_error() -> Result<()> {
    let (_dir, runner) = engine("tiny-llama", &BuildConfig::default())?;
    // Another base's shapes (Phi-3's MLP is 128 wide, this model's 160), named by tensor.
    let e = refused(&runner, "phi3", &lora_dir("tiny-phi3-r8-fused"));
    assert!(
        e.contains("LoRA adapter phi3: layers.0.down_proj.lora_A: shape [8, 128]")
            && e.contains("needs [8, 160]"),
        "{e}"
    );
    // A rank over the engine's limit.
    let small = BuildConfig {
        max_lora_rank: 4,
        ..Default::default()
    };
    let (_d, limited) = engine("tiny-llama", &small)?;
    let e = refused(&limited, "r8", &lora_dir("tiny-llama-r8"));
    assert!(
        e.contains("rank 8") && e.contains("limit of 4") && e.contains("--max-lora-rank"),
        "{e}"
    );
    // A missing file, a truncated safetensors file, and a setting that changes the arithmetic.
    let d = copy_adapter("tiny-llama-r8")?;
    std::fs::remove_file(d.path().join("adapter_model.safetensors"))?;
    let e = refused(&runner, "gone", d.path());
    assert!(e.contains("adapter_model.safetensors"), "{e}");
    let d = copy_adapter("tiny-llama-r8")?;
    let f = d.path().join("adapter_model.safetensors");
    let bytes = std::fs::read(&f)?;
    std::fs::write(&f, &bytes[..bytes.len() / 2])?;
    let e = refused(&runner, "cut", d.path());
    assert!(
        e.contains("LoRA adapter cut") && e.contains("adapter_model.safetensors"),
        "{e}"
    );
    let d = copy_adapter("tiny-llama-r8")?;
    let f = d.path().join("adapter_config.json");
    let text = std::fs::read_to_string(&f)?.replace("\"use_dora\": false", "\"use_dora\": true");
    std::fs::write(&f, text)?;
    let e = refused(&runner, "dora", d.path());
    assert!(e.contains("use_dora") && e.contains("not supported"), "{e}");
    Ok(())
}
