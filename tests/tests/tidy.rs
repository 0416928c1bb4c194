//! Architecture checks over the sources (rust-analyzer's tidy idea): crate layering as
//! docs/ARCHITECTURE.md states it, file length, SAFETY comments, `# Safety` docs on
//! `#[target_feature]` functions. Each failure names the file and line to fix.

use std::path::{Path, PathBuf};

/// A source file over this many lines fails: split it by concept (the target is ~600).
const MAX_LINES: usize = 650;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn sources(ext: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![
        root().join("crates"),
        root().join("xtask"),
        root().join("tests"),
        root().join("kernels"),
        root().join("fuzz"),
    ];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).expect("source dir").flatten() {
            let p = e.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if p.is_dir() {
                if !matches!(name, "target" | "ptx" | "fixtures") {
                    dirs.push(p);
                }
            } else if ext.iter().any(|x| name.ends_with(x)) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn rel(p: &Path) -> String {
    p.strip_prefix(root()).unwrap_or(p).display().to_string()
}

/// The crates in the order docs/ARCHITECTURE.md's table lists them, bottom to top.
fn documented_layers() -> Vec<String> {
    let doc =
        std::fs::read_to_string(root().join("docs/ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    doc.lines()
        .filter_map(|l| l.strip_prefix("| `trtllm-"))
        .filter_map(|l| l.split('`').next())
        .map(|n| format!("trtllm-{n}"))
        .collect()
}

/// The trtllm-* crates in a manifest's `[dependencies]` (not dev- or build-dependencies).
fn trtllm_dependencies(manifest: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(manifest).expect("Cargo.toml");
    let mut section = "";
    let mut deps = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line;
        } else if section == "[dependencies]" && line.starts_with("trtllm-") {
            deps.push(line.split([' ', '=', '.']).next().unwrap_or("").to_string());
        }
    }
    deps.sort();
    deps
}

/// "Each crate depends only on the one directly below it; trtllm-serve sits beside the CLI on
/// top of trtllm-api" (the CLI runs the server, so it has both).
#[test]
fn crates_depend_only_on_the_layer_below() {
    let layers = documented_layers();
    let expected = [
        "trtllm-kernels",
        "trtllm-quant",
        "trtllm-runtime",
        "trtllm-builder",
        "trtllm-executor",
        "trtllm-api",
        "trtllm-serve",
        "trtllm-cli",
    ];
    assert_eq!(
        layers, expected,
        "ARCHITECTURE.md's crate table changed: update this test"
    );
    let mut bad = Vec::new();
    for (i, name) in expected.iter().enumerate() {
        let allowed: Vec<&str> = match *name {
            "trtllm-kernels" => vec![],
            "trtllm-serve" => vec!["trtllm-api"],
            "trtllm-cli" => vec!["trtllm-api", "trtllm-serve"],
            _ => vec![expected[i - 1]],
        };
        let manifest = root().join("crates").join(name).join("Cargo.toml");
        let deps = trtllm_dependencies(&manifest);
        if deps.iter().any(|d| !allowed.contains(&d.as_str())) {
            bad.push(format!("{name} depends on {deps:?}; allowed: {allowed:?}"));
        }
    }
    assert!(bad.is_empty(), "layering broken:\n{}", bad.join("\n"));
}

#[test]
fn no_source_file_is_too_long() {
    let long: Vec<String> = sources(&[".rs", ".cu", ".cuh", ".cpp", ".h"])
        .iter()
        .filter_map(|p| {
            let n = std::fs::read_to_string(p).ok()?.lines().count();
            (n > MAX_LINES).then(|| format!("{}: {n} lines", rel(p)))
        })
        .collect();
    assert!(
        long.is_empty(),
        "over {MAX_LINES} lines, split by concept:\n{}",
        long.join("\n")
    );
}

/// Every `unsafe { ... }` block and `unsafe impl` has a `SAFETY:` comment on it or within the
/// four lines above (a comment may cover the arms of one match).
#[test]
fn every_unsafe_block_says_why_it_is_sound() {
    let mut bad = Vec::new();
    for p in sources(&[".rs"]) {
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            // (Not the patterns quoted in this file.)
            let quoted = code.contains("\"unsafe");
            let block = !quoted && (code.contains("unsafe {") || code.contains("unsafe impl"));
            if block
                && !lines[i.saturating_sub(4)..=i]
                    .iter()
                    .any(|l| l.contains("SAFETY"))
            {
                bad.push(format!("{}:{}: {}", rel(&p), i + 1, line.trim()));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "unsafe without a SAFETY comment:\n{}",
        bad.join("\n")
    );
}

/// A `#[target_feature]` function is unsafe to call: its doc says what the caller guarantees.
#[test]
fn every_target_feature_function_documents_its_safety() {
    let mut bad = Vec::new();
    for p in sources(&[".rs"]) {
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if !line.trim_start().starts_with("#[target_feature") {
                continue;
            }
            let doc = lines[..i]
                .iter()
                .rev()
                .map(|l| l.trim())
                .take_while(|l| l.starts_with("///") || l.starts_with("#["));
            if !doc.into_iter().any(|l| l.contains("# Safety")) {
                bad.push(format!("{}:{}", rel(&p), i + 1));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "#[target_feature] functions without a `# Safety` doc:\n{}",
        bad.join("\n")
    );
}
