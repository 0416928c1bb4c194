//! What the tests of split engines share: `trtllm` on one process or under `mpirun`, run to its
//! end within a limit, engines built split once per test binary, greedy tokens.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;

pub const TRTLLM: &str = env!("CARGO_BIN_EXE_trtllm");
pub const LIMIT: Duration = Duration::from_secs(120);

/// `mpirun -np N trtllm ARGS`, as root if need be, with more ranks than cores allowed.
pub fn mpirun(ranks: usize, args: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    c.args([
        "--allow-run-as-root",
        "--oversubscribe",
        "--bind-to",
        "none",
    ])
    .args(["-np", &ranks.to_string(), TRTLLM])
    .args(args);
    c
}

/// `trtllm ARGS` on one process (`ranks` 1) or under `mpirun`.
pub fn trtllm(ranks: usize, args: &[&str]) -> Command {
    match ranks {
        1 => {
            let mut c = Command::new(TRTLLM);
            c.args(args);
            c
        }
        n => mpirun(n, args),
    }
}

/// Runs `cmd` to its end, failing the test if it takes longer than `limit` (a hang).
pub fn finish(mut cmd: Command, limit: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("wait"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("{cmd:?} still running after {limit:?}")
        }
    }
}

pub fn ok(out: Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\n{stderr}", out.status);
    String::from_utf8(out.stdout).expect("utf-8")
}

/// Builds `checkpoint` split `tp` × `pp` (with `extra` build flags) through the CLI, once per
/// test binary (the tests run at once and share engines).
pub fn build(checkpoint: &Path, split: (usize, usize), extra: &[&str]) -> PathBuf {
    build_named(checkpoint, split, extra, "")
}

/// [`build`] under a name with `tag` (for builds with other flags).
pub fn build_named(
    checkpoint: &Path,
    (tp, pp): (usize, usize),
    extra: &[&str],
    tag: &str,
) -> PathBuf {
    static BUILT: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    let name = checkpoint.file_name().unwrap().to_string_lossy();
    let name = format!("{}-{name}{tag}-tp{tp}-pp{pp}", env!("CARGO_CRATE_NAME"));
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    if built.contains(&out) {
        return out;
    }
    built.push(out.clone());
    let (ck, o) = (checkpoint.to_str().unwrap(), out.to_str().unwrap());
    let (tp, pp) = (tp.to_string(), pp.to_string());
    let args = ["build", "--checkpoint", ck, "--output", o, "--force"];
    let split = ["--tp-size", &tp, "--pp-size", &pp];
    ok(finish(
        trtllm(1, &[&args[..], &split, extra].concat()),
        Duration::from_secs(300),
    ));
    out
}

/// Greedy token ids after `ids` (no stop at EOS).
pub fn greedy(engine: &Path, ranks: usize, ids: &[u32], tokens: usize) -> Vec<u32> {
    greedy_on(engine, ranks, ids, tokens, "cpu")
}

/// [`greedy`] with the model on `device`.
pub fn greedy_on(
    engine: &Path,
    ranks: usize,
    ids: &[u32],
    tokens: usize,
    device: &str,
) -> Vec<u32> {
    greedy_with(engine, ranks, (ids, tokens), &["--device", device])
}

/// [`greedy`] with more `trtllm run` flags.
pub fn greedy_with(
    engine: &Path,
    ranks: usize,
    (ids, tokens): (&[u32], usize),
    extra: &[&str],
) -> Vec<u32> {
    let ids: Vec<String> = ids.iter().map(u32::to_string).collect();
    let (ids, n) = (ids.join(","), tokens.to_string());
    let model = engine.to_str().unwrap();
    let args = ["run", "--model", model, "--input-ids", &ids];
    let flags = ["--max-tokens", &n, "--ignore-eos", "--json"];
    let args = [&args[..], extra, &flags].concat();
    let out = ok(finish(trtllm(ranks, &args), Duration::from_secs(120)));
    let v: Value = serde_json::from_str(out.lines().next().expect("a line")).expect("json");
    serde_json::from_value(v["outputs"][0]["token_ids"].clone()).expect("ids")
}
