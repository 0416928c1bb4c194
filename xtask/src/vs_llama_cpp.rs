//! `cargo xtask bench --vs-llama-cpp`: trtllm-rs and llama.cpp side by side on this machine, in
//! one run (`../shared/tools/side-by-side.sh`), with the read-bandwidth ceiling of batch-1 decode
//! measured in the same run. Not part of CI: it builds llama.cpp and takes several minutes.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{cache_root, cargo, fetch_demo_model, path_str, run};

pub fn bench() -> Result<()> {
    let root = crate::repo_root();
    let tools = root.join("../shared/tools");
    if !tools.join("side-by-side.sh").exists() {
        bail!(
            "{} not found: the side-by-side tools live in ../shared beside the repository",
            tools.display()
        );
    }
    let gguf = fetch_demo_model()?;
    // Two builds: `--example` would narrow a single build to examples only, leaving a stale
    // trtllm binary to be measured.
    cargo(&["build", "--release", "-p", "trtllm-cli"])?;
    cargo(&[
        "build",
        "--release",
        "-p",
        "trtllm-kernels",
        "--example",
        "read_bandwidth",
    ])?;
    let target = target_dir(&root);
    let llama = llama_cpp_bins(&tools)?;
    print_cpu();
    let out = Command::new(target.join("release/examples/read_bandwidth"))
        .output()
        .context("running read_bandwidth")?;
    let gbs: f64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("read_bandwidth's output")?;
    let work = cache_root().join("side-by-side");
    run(Command::new("bash")
        .arg(tools.join("side-by-side.sh"))
        .arg(target.join("release/trtllm"))
        .arg(&gguf)
        .arg(&llama)
        .arg(&work))?;
    println!("\nread bandwidth {gbs:.1} GB/s (2 threads); batch-1 decode ceiling = engine bytes / bandwidth:");
    println!("| engine | bytes | ceiling tok/s |\n| --- | --- | --- |");
    for e in ["f32", "bf16", "w8a16", "keep", "w4a16"] {
        let bytes = dir_bytes(&work.join(format!("e-{e}")))?;
        println!(
            "| {e} | {:.0} MB | {:.1} |",
            bytes as f64 / 1e6,
            gbs * 1e9 / bytes as f64
        );
    }
    Ok(())
}

/// llama.cpp's `llama-quantize`, for the test that requantizes SmolLM2 into each GGML type
/// (quantizing runs no AMX code, so the native build serves on any host).
pub fn llama_quantize() -> Result<PathBuf> {
    let tools = crate::repo_root().join("../shared/tools");
    Ok(llama_cpp_sh(&tools)?.join("llama-quantize"))
}

/// The directory of the tools `llama-cpp.sh` builds (native flags; cached after the first run).
fn llama_cpp_sh(tools: &Path) -> Result<PathBuf> {
    let out = Command::new("bash")
        .arg(tools.join("llama-cpp.sh"))
        .output()
        .context("running ../shared/tools/llama-cpp.sh")?;
    if !out.status.success() {
        bail!(
            "llama-cpp.sh failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// llama.cpp's bench tools built by `llama-cpp.sh`. Where the processor reports AMX, that build
/// dies on its first AMX instruction under hypervisors that do not grant AMX state to guests, so
/// a second build from the same source leaves AMX out.
fn llama_cpp_bins(tools: &Path) -> Result<PathBuf> {
    let bin = llama_cpp_sh(tools)?;
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if !cpuinfo.contains("amx_tile") {
        return Ok(bin);
    }
    let dir = bin.join("../..");
    let build = dir.join("build-noamx");
    if !build.join("bin/llama-bench").exists() {
        let flags = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16";
        let cmake = dir.join("venv/bin/cmake");
        run(Command::new(&cmake)
            .args(["-S", path_str(&dir.join("src"))?, "-B", path_str(&build)?])
            .args([
                "-DCMAKE_BUILD_TYPE=Release",
                "-DGGML_NATIVE=ON",
                "-DLLAMA_CURL=OFF",
            ])
            .args([
                "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_BUILD_EXAMPLES=OFF",
                "-DLLAMA_BUILD_SERVER=OFF",
            ])
            .arg(format!("-DCMAKE_C_FLAGS={flags}"))
            .arg(format!("-DCMAKE_CXX_FLAGS={flags}")))?;
        run(Command::new(&cmake)
            .args(["--build", path_str(&build)?, "-j2", "--target"])
            .args(["llama-bench", "llama-batched-bench", "llama-quantize"]))?;
    }
    Ok(build.join("bin"))
}

fn print_cpu() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map_or("unknown", |m| m.trim_start_matches([' ', '\t', ':']));
    let flags = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("flags"))
        .unwrap_or("");
    let isa: Vec<&str> = [
        "avx2",
        "avx512f",
        "avx512_vnni",
        "avx512_bf16",
        "avx512_fp16",
        "amx_tile",
    ]
    .into_iter()
    .filter(|f| flags.split_whitespace().any(|x| x == *f))
    .collect();
    println!(
        "CPU: {model} ({}), {} threads",
        isa.join(" "),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from)
}

fn dir_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).with_context(|| dir.display().to_string())? {
        let meta = entry?.metadata()?;
        if meta.is_file() {
            total += meta.len();
        }
    }
    Ok(total)
}
