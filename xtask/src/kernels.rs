//! `cargo xtask build-kernels`: every `kernels/*.cu` to PTX for each target architecture (nvcc when
//! a CUDA toolkit is on PATH, else NVRTC from NVIDIA's PyPI wheels, installed into the cache),
//! then assembled by `ptxas -v` to report registers, shared memory and spills. Any compiler
//! output on a successful NVRTC compile, any ptxas warning and any spill fails the task. The PTX
//! lands in `kernels/ptx/`, where trtllm-kernels' `cuda` feature embeds it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{cache_root, run};

/// Virtual architectures compiled for; the driver JITs the highest one a GPU supports.
const ARCHS: [&str; 2] = ["80", "90"];

/// Pinned so a new CUDA release cannot change a build; cudarc's `cuda-12090` matches.
const WHEELS: [&str; 3] = [
    "nvidia-cuda-nvrtc-cu12==12.9.86",
    "nvidia-cuda-runtime-cu12==12.9.79",
    "nvidia-cuda-nvcc-cu12==12.9.86",
];

pub fn kernels_dir() -> PathBuf {
    crate::repo_root().join("kernels")
}

/// Where the CUDA tools come from.
enum Toolchain {
    /// A CUDA toolkit on PATH: `nvcc` and `ptxas`.
    Toolkit,
    /// The PyPI wheels, unpacked at this root (`nvidia/cuda_nvrtc`, `cuda_runtime`, `cuda_nvcc`).
    Wheels(PathBuf),
}

impl Toolchain {
    fn find() -> Result<Self> {
        let on_path = |tool: &str| Command::new(tool).arg("--version").output().is_ok();
        if on_path("nvcc") && on_path("ptxas") {
            return Ok(Self::Toolkit);
        }
        let root = cache_root().join("cuda-wheels");
        let stamp = root.join(WHEELS.join(" "));
        if !stamp.exists() {
            eprintln!(
                "no CUDA toolkit on PATH: installing {} ...",
                WHEELS.join(", ")
            );
            let mut pip = Command::new("python3");
            pip.args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--upgrade",
                "--target",
            ])
            .arg(&root)
            .args(WHEELS);
            run(&mut pip)?;
            std::fs::write(&stamp, "").with_context(|| stamp.display().to_string())?;
        }
        Ok(Self::Wheels(root.join("nvidia")))
    }

    fn ptxas(&self) -> PathBuf {
        match self {
            Self::Toolkit => "ptxas".into(),
            Self::Wheels(root) => root.join("cuda_nvcc/bin/ptxas"),
        }
    }
}

pub fn build_kernels() -> Result<()> {
    let tools = Toolchain::find()?;
    let src = kernels_dir();
    let out = src.join("ptx");
    std::fs::create_dir_all(&out).with_context(|| out.display().to_string())?;
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&src)
        .with_context(|| src.display().to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    if sources.is_empty() {
        bail!("no .cu files in {}", src.display());
    }
    // Every PTX is rebuilt: one left from a deleted source would still be embedded.
    for old in std::fs::read_dir(&out).with_context(|| out.display().to_string())? {
        let old = old?.path();
        if old.extension().is_some_and(|e| e == "ptx") {
            std::fs::remove_file(&old).with_context(|| old.display().to_string())?;
        }
    }
    match &tools {
        Toolchain::Toolkit => {
            for cu in &sources {
                for arch in ARCHS {
                    let ptx = out.join(ptx_name(cu, arch)?);
                    let mut nvcc = Command::new("nvcc");
                    nvcc.args(["-ptx", "-std=c++17", "-Werror", "all-warnings"])
                        .arg(format!("-arch=compute_{arch}"))
                        .arg(cu)
                        .arg("-o")
                        .arg(&ptx);
                    run(&mut nvcc)?;
                }
            }
        }
        Toolchain::Wheels(root) => {
            // NVRTC is loaded with dlopen, which reads LD_LIBRARY_PATH only at process start:
            // the compile runs in a child of this binary with the wheel's library directory set.
            let mut child = Command::new(std::env::current_exe()?);
            child
                .arg("nvrtc-compile")
                .arg("--include")
                .arg(root.join("cuda_runtime/include"))
                .arg("--out")
                .arg(&out)
                .args(&sources)
                .env("LD_LIBRARY_PATH", root.join("cuda_nvrtc/lib"));
            run(&mut child)?;
        }
    }
    let mut rows = Vec::new();
    for cu in &sources {
        for arch in ARCHS {
            rows.extend(assemble(
                &tools.ptxas(),
                &out.join(ptx_name(cu, arch)?),
                arch,
            )?);
        }
    }
    print_table(&rows);
    let spills: Vec<&Usage> = rows
        .iter()
        .filter(|r| r.spill_stores + r.spill_loads > 0)
        .collect();
    if !spills.is_empty() {
        let names: Vec<String> = spills
            .iter()
            .map(|r| format!("{} (sm_{})", r.kernel, r.arch))
            .collect();
        bail!("register spills in {}", names.join(", "));
    }
    // A kernel that needs a newer architecture (FP8 tensor cores) exists only in its PTX.
    let kernels: std::collections::BTreeSet<&str> =
        rows.iter().map(|r| r.kernel.as_str()).collect();
    println!(
        "{} kernels, {} builds for sm_{}, PTX in {}",
        kernels.len(),
        rows.len(),
        ARCHS.join("/sm_"),
        out.display()
    );
    Ok(())
}

/// The NVIDIA driver lists each GPU under /proc/driver/nvidia/gpus.
pub fn require_gpu() -> Result<()> {
    let gpus = Path::new("/proc/driver/nvidia/gpus");
    let listed = std::fs::read_dir(gpus).is_ok_and(|mut d| d.next().is_some());
    match listed {
        true => Ok(()),
        false => bail!(
            "no CUDA device: {} lists no GPU (is the NVIDIA driver loaded?)",
            gpus.display()
        ),
    }
}

fn ptx_name(cu: &Path, arch: &str) -> Result<String> {
    let stem = cu
        .file_stem()
        .and_then(|s| s.to_str())
        .with_context(|| format!("{} has no UTF-8 name", cu.display()))?;
    Ok(format!("{stem}.sm_{arch}.ptx"))
}

/// The child half of the NVRTC path: compiles each source for each architecture.
pub fn nvrtc_compile(include: &Path, out: &Path, sources: &[PathBuf]) -> Result<()> {
    use cudarc::nvrtc::result;
    use std::ffi::CString;
    for cu in sources {
        let text = std::fs::read_to_string(cu).with_context(|| cu.display().to_string())?;
        for arch in ARCHS {
            let name = CString::new(cu.display().to_string())?;
            let prog = result::create_program(&CString::new(text.as_str())?, Some(&name))
                .map_err(|e| anyhow::anyhow!("{}: {e:?} (is libnvrtc loadable?)", cu.display()))?;
            let options = vec![
                format!("--gpu-architecture=compute_{arch}"),
                "--std=c++17".to_string(),
                "--include-path".to_string(),
                kernels_dir().display().to_string(),
                "--include-path".to_string(),
                include.display().to_string(),
            ];
            // SAFETY: `prog` was created above and is destroyed once below.
            let compiled = unsafe { result::compile_program(prog, &options) };
            let log = unsafe { result::get_program_log(prog) }
                .map(|l| c_chars_to_string(&l))
                .unwrap_or_default();
            // SAFETY: as above; the program is still alive here.
            let ptx = compiled.and_then(|_| unsafe { result::get_ptx(prog) });
            // SAFETY: the last use of `prog`.
            unsafe { result::destroy_program(prog) }.ok();
            let log = log.trim();
            match ptx {
                Err(e) => bail!("{} (compute_{arch}): {e:?}\n{log}", cu.display()),
                Ok(_) if !log.is_empty() => {
                    bail!("{} (compute_{arch}) warns:\n{log}", cu.display())
                }
                Ok(ptx) => {
                    let path = out.join(ptx_name(cu, arch)?);
                    std::fs::write(&path, c_chars_to_string(&ptx))
                        .with_context(|| path.display().to_string())?;
                }
            }
        }
    }
    Ok(())
}

fn c_chars_to_string(chars: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = chars
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// One kernel's resources as ptxas reports them.
#[derive(Debug, Default)]
struct Usage {
    kernel: String,
    arch: String,
    registers: u32,
    smem: u32,
    spill_stores: u32,
    spill_loads: u32,
}

fn assemble(ptxas: &Path, ptx: &Path, arch: &str) -> Result<Vec<Usage>> {
    let output = Command::new(ptxas)
        .args([
            "-v",
            "-Werror",
            &format!("-arch=sm_{arch}"),
            "-o",
            "/dev/null",
        ])
        .arg(ptx)
        .output()
        .with_context(|| format!("starting {}", ptxas.display()))?;
    let text = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    if !output.status.success() || text.contains("warning") {
        bail!("ptxas {} (sm_{arch}) failed:\n{text}", ptx.display());
    }
    Ok(parse_ptxas(&text, arch))
}

/// Reads `ptxas -v`: an "entry function 'NAME'" line opens a kernel; later lines carry its spills
/// ("N bytes spill stores, N bytes spill loads") and usage ("Used N registers, ... N bytes smem").
fn parse_ptxas(text: &str, arch: &str) -> Vec<Usage> {
    let number_before = |line: &str, word: &str| -> u32 {
        line.split(',')
            .find(|part| part.contains(word))
            .and_then(|part| part.split_whitespace().find_map(|w| w.parse().ok()))
            .unwrap_or(0)
    };
    let mut rows: Vec<Usage> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.split("entry function '").nth(1) {
            rows.push(Usage {
                kernel: rest.split('\'').next().unwrap_or(rest).to_string(),
                arch: arch.to_string(),
                ..Usage::default()
            });
        } else if let Some(row) = rows.last_mut() {
            if line.contains("spill stores") {
                row.spill_stores = number_before(line, "spill stores");
                row.spill_loads = number_before(line, "spill loads");
            } else if line.contains("Used") && line.contains("registers") {
                row.registers = number_before(line, "registers");
                row.smem = number_before(line, "smem");
            }
        }
    }
    rows
}

fn print_table(rows: &[Usage]) {
    println!(
        "{:<32} {:>6} {:>10} {:>11} {:>13} {:>12}",
        "kernel", "arch", "registers", "smem bytes", "spill stores", "spill loads"
    );
    for r in rows {
        println!(
            "{:<32} {:>6} {:>10} {:>11} {:>13} {:>12}",
            r.kernel,
            format!("sm_{}", r.arch),
            r.registers,
            r.smem,
            r.spill_stores,
            r.spill_loads
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ptxas_verbose_output() {
        let text = "ptxas info    : 0 bytes gmem\n\
            ptxas info    : Compiling entry function 'rms_norm_f32' for 'sm_80'\n\
            ptxas info    : Function properties for rms_norm_f32\n\
            \x20   0 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n\
            ptxas info    : Used 18 registers, used 1 barriers, 128 bytes smem, 372 bytes cmem[0]\n\
            ptxas info    : Compiling entry function 'softmax_f32' for 'sm_80'\n\
            ptxas info    : Used 12 registers, 380 bytes cmem[0]\n";
        let rows = parse_ptxas(text, "80");
        assert_eq!(rows.len(), 2);
        let r = &rows[0];
        assert_eq!(
            (r.kernel.as_str(), r.registers, r.smem),
            ("rms_norm_f32", 18, 128)
        );
        assert_eq!((r.spill_stores, r.spill_loads), (8, 4));
        let r = &rows[1];
        assert_eq!(
            (r.kernel.as_str(), r.registers, r.smem, r.spill_stores),
            ("softmax_f32", 12, 0, 0)
        );
    }
}
