//! `trtllm bench throughput|latency`: runs a workload through the engine in process, or
//! through a running `trtllm serve` (`--url`), and reports request and token throughput with
//! TTFT, TPOT, ITL and end-to-end latency percentiles.

mod backend;
mod report;
mod workload;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};

use crate::run::{ExecutorArgs, ModelArg};
use backend::{Backend, HttpBackend, InProcess};
use report::{Communication, Report, Speculation};
use trtllm_api::runtime::parallel;
use workload::{Workload, WorkloadArgs};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Every request submitted at once (or --concurrency at a time): request/s and tokens/s.
    Throughput(BenchArgs),
    /// One request at a time (or --concurrency): TTFT, TPOT/ITL and end-to-end percentiles.
    Latency(BenchArgs),
}

#[derive(Args)]
pub struct BenchArgs {
    /// The model to run in process (or --url).
    #[command(flatten)]
    pub(crate) model: ModelArg,
    /// A running `trtllm serve` (e.g. http://127.0.0.1:8000) to drive over HTTP.
    #[arg(long)]
    url: Option<String>,
    /// Model id to send with --url (default: the server's first model).
    #[arg(long, requires = "url")]
    served_model_name: Option<String>,
    /// API key for --url.
    #[arg(long, env = "TRTLLM_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    #[command(flatten)]
    workload: WorkloadArgs,
    /// Requests in flight at once (throughput default: all; latency default: 1).
    #[arg(long)]
    concurrency: Option<usize>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    executor: ExecutorArgs,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    let (mode, a) = match cmd {
        BenchCommand::Throughput(a) => ("throughput", a),
        BenchCommand::Latency(a) => ("latency", a),
    };
    let backend: Box<dyn Backend> = match (a.model.get(), &a.url) {
        (Some(_), Some(_)) => bail!("give a model or --url, not both"),
        (Some(_), None) => Box::new(InProcess::open(&a.model, &a.executor)?),
        (None, Some(_)) if a.workload.uses_lora() => {
            bail!("--lora runs in process; a server selects its adapters by model name")
        }
        (None, Some(url)) => Box::new(HttpBackend::connect(
            url,
            a.served_model_name.clone(),
            a.api_key.clone(),
        )?),
        (None, None) => bail!("a model (MODEL or --model) or --url is required"),
    };
    let workload = Workload::build(&a.workload, backend.vocab_size())?;
    let concurrency = a
        .concurrency
        .unwrap_or(if mode == "latency" {
            1
        } else {
            workload.requests.len()
        })
        .clamp(1, workload.requests.len().max(1));
    backend.prepare(&workload.requests)?;
    if mode == "latency" {
        // One warm-up request so the first measurement does not pay for page faults.
        backend.run(&workload.requests[0])?;
    }
    let before = backend.speculative();
    let comm = || parallel::world().map(|w| w.time());
    let comm_before = comm();
    let start = Instant::now();
    let timings = drive(backend.as_ref(), &workload, concurrency)?;
    let wall = start.elapsed();
    let mut report = Report::new(mode, backend.describe(), concurrency, wall, &timings);
    if let (Some(b), Some(a)) = (before, backend.speculative()) {
        report.speculative = Speculation::between(b, a);
    }
    if let (Some(b), Some(a)) = (comm_before, comm()) {
        report.communication = Some(Communication::between(b, a, wall));
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

/// Runs every request with at most `concurrency` in flight (one thread each).
fn drive(
    backend: &dyn Backend,
    workload: &Workload,
    concurrency: usize,
) -> Result<Vec<backend::Timing>> {
    let next = AtomicUsize::new(0);
    // After a failure no new request starts; those in flight finish.
    let failed = AtomicBool::new(false);
    let results = Mutex::new(Vec::with_capacity(workload.requests.len()));
    let first_error = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..concurrency {
            s.spawn(|| loop {
                if failed.load(Ordering::Relaxed) {
                    return;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(req) = workload.requests.get(i) else {
                    return;
                };
                match backend.run(req) {
                    Ok(t) => results.lock().unwrap_or_else(|e| e.into_inner()).push(t),
                    Err(e) => {
                        first_error
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get_or_insert(e);
                        failed.store(true, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e.context("a benchmark request failed"));
    }
    Ok(results.into_inner().unwrap_or_else(|e| e.into_inner()))
}
