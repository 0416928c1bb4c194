//! Our own fuzzer: property-based mutations (proptest, so failures shrink) of every loader's
//! inputs — GGUF files, safetensors, Hugging Face config.json, engine directories, tokenizer
//! files — and of request bodies through the server's router, with zero tolerance for panics,
//! aborts, hangs and heap blow-ups. Past failures live in `fuzz/corpus/<target>/` and are
//! replayed first on every run.
//!
//! `cargo test -p trtllm-fuzz` runs 1,000 cases per target from a fixed seed (CI);
//! `cargo run --release -p trtllm-fuzz -- --cases 100000 --seed random` explores.

pub mod alloc;
pub mod formats;
pub mod harness;
pub mod mutate;
pub mod request;
pub mod targets;

use std::path::{Path, PathBuf};
use std::time::Duration;

use harness::{Limits, Report, Target};

/// Allocations past this abort the run (`alloc::set_cap`).
pub const HEAP_CAP: usize = 4 << 30;

pub const TARGETS: &[&str] = &[
    "gguf",
    "safetensors",
    "hf-config",
    "engine",
    "tokenizer",
    "request",
];

pub fn target(name: &str) -> anyhow::Result<Box<dyn Target>> {
    Ok(match name {
        "gguf" => Box::new(targets::Gguf::new()?),
        "safetensors" => Box::new(targets::Checkpoint::safetensors()?),
        "hf-config" => Box::new(targets::Checkpoint::hf_config()?),
        "engine" => Box::new(targets::Engine::new()?),
        "tokenizer" => Box::new(targets::Tokenizers::new()?),
        "request" => Box::new(request::Requests::new()?),
        other => anyhow::bail!("no fuzz target '{other}' (targets: {})", TARGETS.join(", ")),
    })
}

pub fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus")
}

/// Fuzzes each named target in turn; the failures, with their saved inputs.
pub fn run(names: &[&str], limits: &Limits, scratch: &Path) -> anyhow::Result<Vec<String>> {
    alloc::set_cap(HEAP_CAP);
    let mut failures = Vec::new();
    for name in names {
        let target = target(name)?;
        match harness::fuzz(target.as_ref(), limits, &corpus_dir(), scratch) {
            Ok(r) => print_report(name, &r),
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    Ok(failures)
}

fn print_report(name: &str, r: &Report) {
    eprintln!(
        "fuzz {name}: {} corpus entries replayed, {} cases ({} accepted, {} refused) in {:.1} s, peak heap per case {} MB",
        r.replayed,
        r.cases,
        r.accepted,
        r.refused,
        r.elapsed.as_secs_f64(),
        r.peak_heap >> 20
    );
}

/// Limits for CI: `TRTLLM_FUZZ_CASES` (default 1,000) cases per target from a fixed seed.
pub fn ci_limits() -> Limits {
    Limits {
        cases: std::env::var("TRTLLM_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000),
        rng_seed: Some(0x7472_746c_6c6d),
        case_timeout: Duration::from_secs(60),
        case_heap: 512 << 20,
    }
}
