//! The timing cache: tuning an engine fills it for this machine, a second tuning reuses every
//! entry, a tuned runner still matches transformers, and a damaged cache file is a clear error.

use std::time::Duration;

use anyhow::{ensure, Result};
use trtllm_api::builder::{build, BuildConfig};
use trtllm_api::executor::{ExecutorConfig, GenerationExecutor};
use trtllm_api::runtime::{Session, TimingCache};
use trtllm_tests::{check_case_logits, fixtures, read_json, FixtureGolden};

#[test]
fn tuning_fills_then_reuses_the_cache_and_keeps_outputs() -> Result<()> {
    let dir = fixtures().join("tiny-llama");
    let golden: FixtureGolden = read_json(&dir.join("golden.json"))?;
    let engine = tempfile::tempdir()?;
    build(
        &dir,
        engine.path(),
        &BuildConfig::default(),
        &mut |_, _, _| {},
    )?;
    let scratch = tempfile::tempdir()?;
    let path = scratch.path().join("timing-cache.json");

    let mut cache = TimingCache::open(&path)?;
    let mut runner = Session::open(engine.path())?.model_runner()?;
    let first = runner.tune(&mut cache, Duration::from_secs(30))?;
    ensure!(first.tuned == 3 && first.cached == 0, "{first:?}");
    cache.save()?;
    check_case_logits(&runner, &golden.cases[0], 1e-3, "tuned tiny-llama")?;

    let mut cache = TimingCache::open(&path)?;
    ensure!(
        cache.entries_here() == 3,
        "{} entries",
        cache.entries_here()
    );
    let mut runner = Session::open(engine.path())?.model_runner()?;
    let again = runner.tune(&mut cache, Duration::from_secs(30))?;
    ensure!(again.tuned == 0 && again.cached == 3, "{again:?}");

    // A zero budget times nothing: the defaults run.
    let mut empty = TimingCache::open(&scratch.path().join("other.json"))?;
    let none = runner.tune(&mut empty, Duration::ZERO)?;
    ensure!(none.tuned == 0 && none.skipped == 3, "{none:?}");

    // The executor takes the cache through its config.
    let cfg = ExecutorConfig {
        timing_cache: Some(path.clone()),
        ..ExecutorConfig::default()
    };
    GenerationExecutor::with_config(engine.path(), cfg)?;
    Ok(())
}

#[test]
fn a_damaged_cache_is_a_clear_error() -> Result<()> {
    let scratch = tempfile::tempdir()?;
    let path = scratch.path().join("timing-cache.json");
    std::fs::write(
        &path,
        "{\"format\": \"trtllm-timing-cache\", \"version\": 1, \"mach",
    )?;
    let e = TimingCache::open(&path).err().map(|e| e.to_string());
    ensure!(
        e.as_deref()
            .is_some_and(|e| e.contains("timing-cache.json")),
        "{e:?}"
    );
    std::fs::write(
        &path,
        "{\"format\": \"other\", \"version\": 9, \"machines\": {}}",
    )?;
    let e = TimingCache::open(&path).err().map(|e| e.to_string());
    ensure!(
        e.as_deref()
            .is_some_and(|e| e.contains("not a timing cache") && e.contains("delete it")),
        "{e:?}"
    );
    Ok(())
}
