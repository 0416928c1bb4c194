//! `cargo xtask emulate-kernels`: every CUDA kernel executed on the host against a plain reference
//! (kernels/emu), so the kernels' logic is tested on machines without a GPU. The sources compile
//! as C++ with `TRT_EMULATE`, which swaps the CUDA built-ins and the PTX helpers for host versions.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};

use crate::run;

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

pub fn emulate_kernels() -> Result<()> {
    let src = crate::kernels::kernels_dir().join("emu/emulate.cpp");
    let out = target_dir().join("emulate-kernels");
    std::fs::create_dir_all(&out).with_context(|| out.display().to_string())?;
    let exe = out.join("emulate");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    let mut compile = Command::new(&cxx);
    compile
        .args(["-std=c++20", "-O2", "-pthread", "-DTRT_EMULATE"])
        // The kernels' arithmetic as the GPU does it: no contraction the source does not ask for.
        .args(["-ffp-contract=off", "-fno-strict-aliasing"])
        .args([
            "-Wall",
            "-Wextra",
            "-Werror",
            "-Wno-unknown-pragmas",
            "-x",
            "c++",
        ])
        .arg(&src)
        .arg("-o")
        .arg(&exe);
    run(&mut compile)
        .with_context(|| format!("compiling the kernel emulation with {cxx} (set CXX)"))?;
    run(&mut Command::new(&exe))
}
