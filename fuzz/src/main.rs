//! `trtllm-fuzz`: the fuzzer's long mode. Failures are shrunk and saved under fuzz/corpus/.

use std::time::Duration;

use anyhow::bail;
use clap::Parser;
use trtllm_fuzz::alloc::Counting;
use trtllm_fuzz::harness::Limits;

#[global_allocator]
static HEAP: Counting = Counting;

#[derive(Parser)]
struct Args {
    /// Targets to fuzz (default: all).
    #[arg(long = "target")]
    targets: Vec<String>,
    #[arg(long, default_value_t = 10_000)]
    cases: u32,
    /// A number, or "random".
    #[arg(long, default_value = "random")]
    seed: String,
    /// A case running longer than this is a hang.
    #[arg(long, default_value_t = 60)]
    case_timeout_s: u64,
    /// Most heap one case may add, in MB.
    #[arg(long, default_value_t = 512)]
    case_heap_mb: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rng_seed = match args.seed.as_str() {
        "random" => None,
        s => Some(s.parse()?),
    };
    let limits = Limits {
        cases: args.cases,
        rng_seed,
        case_timeout: Duration::from_secs(args.case_timeout_s),
        case_heap: args.case_heap_mb << 20,
    };
    let names: Vec<&str> = if args.targets.is_empty() {
        trtllm_fuzz::TARGETS.to_vec()
    } else {
        args.targets.iter().map(String::as_str).collect()
    };
    let scratch = tempfile::tempdir()?;
    let failures = trtllm_fuzz::run(&names, &limits, scratch.path())?;
    if !failures.is_empty() {
        bail!(
            "{} target(s) failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    Ok(())
}
