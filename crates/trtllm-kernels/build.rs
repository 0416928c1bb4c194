//! With the `cuda` feature, embeds the PTX that `cargo xtask build-kernels` wrote to
//! `kernels/ptx/` (one file per source and architecture: `NAME.sm_ARCH.ptx`), and generates the
//! `Kernel` enum of every entry point in it, so a launcher naming a kernel that does not exist
//! does not compile.

use std::collections::BTreeSet;
use std::fmt::Write;
use std::path::Path;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    // The run-time value: a build script reused from a shared target directory may have been
    // compiled for a checkout elsewhere.
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let dir = Path::new(&manifest).join("../../kernels/ptx");
    println!("cargo::rerun-if-changed={}", dir.display());
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|e| e == "ptx"));
    files.sort();
    if files.is_empty() {
        panic!(
            "the cuda feature embeds the kernels' PTX, and {} has none: run `cargo xtask build-kernels` first",
            dir.display()
        );
    }
    let mut out = String::from("pub(crate) const MODULES: &[PtxModule] = &[\n");
    let mut kernels = BTreeSet::new();
    for path in &files {
        let ptx = std::fs::read_to_string(path).expect("readable PTX");
        kernels.extend(ptx.lines().filter_map(|l| {
            let rest = l.trim_start().strip_prefix(".visible .entry ")?;
            Some(rest.split('(').next().unwrap_or(rest).trim().to_string())
        }));
        let file = path
            .file_name()
            .and_then(|f| f.to_str())
            .expect("UTF-8 PTX name");
        let (name, arch) = file
            .trim_end_matches(".ptx")
            .rsplit_once(".sm_")
            .unwrap_or_else(|| panic!("{file}: expected NAME.sm_ARCH.ptx"));
        let arch: u32 = arch
            .parse()
            .unwrap_or_else(|_| panic!("{file}: bad architecture"));
        writeln!(
            out,
            "    PtxModule {{ name: {name:?}, arch: {arch}, ptx: include_str!({:?}) }},",
            path.canonicalize().expect("PTX path").display()
        )
        .expect("write to a String");
    }
    out.push_str("];\n");
    out.push_str(
        "\n/// Every kernel of the embedded PTX, named as in its `.cu` source.\n\
         #[allow(non_camel_case_types, dead_code)]\n\
         #[derive(Clone, Copy, Debug, PartialEq, Eq)]\n\
         pub(crate) enum Kernel {\n",
    );
    for k in &kernels {
        writeln!(out, "    {k},").expect("write to a String");
    }
    out.push_str("}\n\nimpl Kernel {\n    pub(crate) const fn name(self) -> &'static str {\n        match self {\n");
    for k in &kernels {
        writeln!(out, "            Kernel::{k} => {k:?},").expect("write to a String");
    }
    out.push_str("        }\n    }\n}\n");
    let dest = Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR")).join("ptx_modules.rs");
    std::fs::write(dest, out).expect("write ptx_modules.rs");
}
