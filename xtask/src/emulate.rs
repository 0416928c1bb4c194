//! Host emulation of the CUDA path, for machines without a GPU. The kernel sources compile as
//! C++ with `TRT_EMULATE`, which swaps the CUDA built-ins and the PTX helpers for host versions
//! (kernels/emu/cuda_emu.h):
//! - `cargo xtask emulate-kernels` runs every kernel against a plain reference (emulate.cpp);
//! - `cargo xtask emulate-gpu` builds an emulated driver (driver.cpp: the CUDA driver API and the
//!   cuBLAS calls cudarc makes, over host memory and those kernels) as libcuda.so / libcublas.so
//!   and runs the Rust GPU tests through it, so the launchers, device matrices and decoder execute
//!   unchanged; as libnccl.so it also sums between ranks in separate processes, so the split
//!   engines' GPU path runs under `mpirun` too. Neither says anything about GPU speed, and
//!   neither stands in for `test-gpu`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{cargo_command, run};

fn out_dir() -> Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::repo_root().join("target"));
    let out = target.join("cuda-emulation");
    std::fs::create_dir_all(&out).with_context(|| out.display().to_string())?;
    Ok(out)
}

/// Compiles `kernels/emu/<source>` for the host into `out`.
fn compile(source: &str, out: &Path, extra: &[&str]) -> Result<()> {
    let src = crate::kernels::kernels_dir().join("emu").join(source);
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    let mut cmd = Command::new(&cxx);
    cmd.args(["-std=c++20", "-O2", "-pthread", "-DTRT_EMULATE"])
        // The kernels' arithmetic as the GPU does it: no contraction the source does not ask for.
        .args(["-ffp-contract=off", "-fno-strict-aliasing"])
        .args(["-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas"])
        .args(extra)
        .args(["-x", "c++"])
        .arg(&src)
        .arg("-o")
        .arg(out);
    run(&mut cmd).with_context(|| format!("compiling {} with {cxx} (set CXX)", src.display()))
}

pub fn emulate_kernels() -> Result<()> {
    let exe = out_dir()?.join("emulate");
    compile("emulate.cpp", &exe, &[])?;
    run(&mut Command::new(&exe))
}

/// Every kernel in the PTX has a host build in driver.cpp's table; otherwise module loading fails
/// in every GPU test with only the kernel's name to go on.
fn check_driver_table() -> Result<()> {
    let kernels = crate::kernels::kernels_dir();
    let driver = std::fs::read_to_string(kernels.join("emu/driver.cpp"))?;
    let registered: std::collections::BTreeSet<&str> = driver
        .split("K(")
        .skip(1)
        .filter_map(|s| s.split(')').next())
        .collect();
    let mut missing = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(kernels.join("ptx"))? {
        let path = entry?.path();
        let text = std::fs::read_to_string(&path)?;
        for name in text
            .lines()
            .filter_map(|l| l.trim().strip_prefix(".visible .entry "))
        {
            let name = name.split('(').next().unwrap_or(name).trim();
            if !registered.contains(name) {
                missing.insert(name.to_string());
            }
        }
    }
    if !missing.is_empty() {
        bail!(
            "kernels without a host build in kernels/emu/driver.cpp (add K(name) to its table): {}",
            missing.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

/// `full`: every GPU test (SmolLM2's golden cases and all engine formats, minutes under
/// emulation) instead of the kernel tests and the tiny fixtures.
pub fn emulate_gpu(full: bool) -> Result<()> {
    crate::kernels::build_kernels()?; // the PTX the cuda feature embeds
    check_driver_table()?;
    let lib = out_dir()?.join("lib");
    std::fs::create_dir_all(&lib).with_context(|| lib.display().to_string())?;
    // Built beside and renamed over, so a process still using the old library keeps its copy.
    let built = lib.join("libcuda.so.new");
    compile("driver.cpp", &built, &["-shared", "-fPIC"])?;
    std::fs::rename(&built, lib.join("libcuda.so"))?;
    for name in ["libcublas.so", "libnccl.so"] {
        let alias = lib.join(name);
        if !alias.exists() {
            std::os::unix::fs::symlink("libcuda.so", &alias)
                .with_context(|| alias.display().to_string())?;
        }
    }
    eprintln!(
        "CUDA tests through the emulated driver in {} (host emulation, not a GPU)",
        lib.display()
    );
    let test = |args: &[&str]| {
        run(cargo_command()
            .arg("test")
            .args(args)
            .env("LD_LIBRARY_PATH", &lib))
    };
    test(crate::KERNEL_GPU_TESTS)?;
    // Two emulated GPUs, one per rank of a split engine, summing through the emulated NCCL.
    test(crate::MULTI_GPU_TESTS)?;
    let gpu = crate::END_TO_END_GPU_TESTS;
    if full {
        crate::fetch_demo_model()?;
        test(gpu)
    } else {
        test(&[gpu, &["tiny_fixtures"]].concat())
    }
}
