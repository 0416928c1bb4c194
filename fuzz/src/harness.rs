//! The fuzzing loop: cases drawn by proptest from each target's seeds, laid out as files, run
//! under a watchdog and a heap cap with panics caught; the corpus of past failures replayed
//! first; a failure shrunk and saved to the corpus.

use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestError, TestRunner};

use crate::alloc;
use crate::formats::{Edits, FileKind};
use crate::mutate::{byte_op, field_op, json_op};

pub struct SeedFile {
    /// Path inside the case directory.
    pub rel: String,
    pub bytes: Vec<u8>,
    pub kind: FileKind,
}

/// A valid input: the files a case may mutate, beside the unmutated files of `dir`.
pub struct Seed {
    pub name: String,
    pub dir: Option<PathBuf>,
    pub files: Vec<SeedFile>,
}

/// One case as files: the seed it came from and the files that differ from it.
#[derive(Clone, Debug)]
pub struct Input {
    pub seed: String,
    /// A per-target switch (e.g. keep a stale checksum, build with quantized weights kept).
    pub flag: bool,
    pub files: Vec<(String, Vec<u8>)>,
}

/// How a case ended, when it ended well.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Loaded (and ran) without an error.
    Accepted,
    /// Refused with this error.
    Refused(String),
}

pub trait Target {
    fn name(&self) -> &'static str;
    fn seeds(&self) -> &[Seed];
    /// Runs one case laid out in `dir`. `Err` is a defect the harness cannot see for itself
    /// (a 500, an error without a message, work left running), with what was seen; panics,
    /// aborts, hangs and heap growth the harness catches.
    fn run(&self, dir: &Path, input: &Input) -> Result<Outcome, String>;
    /// Checks after the last case (e.g. nothing left running).
    fn finish(&self) -> Result<(), String> {
        Ok(())
    }
}

#[derive(Clone, Debug)]
struct Case {
    seed: Index,
    file: Index,
    edits: Edits,
    flag: bool,
}

fn case() -> impl Strategy<Value = Case> {
    let edits = (
        proptest::collection::vec(json_op(), 0..5),
        proptest::collection::vec(field_op(), 0..4),
        prop_oneof![3 => Just(Vec::new()), 1 => proptest::collection::vec(byte_op(), 1..4)],
    )
        .prop_map(|(json, fields, bytes)| Edits {
            json,
            fields,
            bytes,
        });
    (any::<Index>(), any::<Index>(), edits, any::<bool>()).prop_map(|(seed, file, edits, flag)| {
        Case {
            seed,
            file,
            edits,
            flag,
        }
    })
}

fn materialize(target: &dyn Target, case: &Case) -> Input {
    let seed = case.seed.get(target.seeds());
    let file = case.file.get(&seed.files);
    Input {
        seed: seed.name.clone(),
        flag: case.flag,
        files: vec![(file.rel.clone(), file.kind.mutate(&file.bytes, &case.edits))],
    }
}

pub struct Limits {
    pub cases: u32,
    /// None: a new random seed (printed).
    pub rng_seed: Option<u64>,
    pub case_timeout: Duration,
    /// Most heap one case may add at its peak.
    pub case_heap: usize,
}

#[derive(Debug, Default)]
pub struct Report {
    pub replayed: usize,
    pub cases: u32,
    pub accepted: u32,
    pub refused: u32,
    pub peak_heap: usize,
    pub elapsed: Duration,
}

/// Replays `corpus/<target>/`, then runs `limits.cases` new cases; a failure is shrunk, saved
/// to the corpus and returned with where its input is.
pub fn fuzz(
    target: &dyn Target,
    limits: &Limits,
    corpus: &Path,
    scratch: &Path,
) -> Result<Report, String> {
    let start = Instant::now();
    let report = Mutex::new(Report::default());
    let dir = scratch.join(target.name());
    let check = |input: &Input| -> Result<(), String> {
        let (outcome, heap) = check(target, input, &dir, limits)?;
        let mut r = report.lock().unwrap_or_else(|e| e.into_inner());
        r.peak_heap = r.peak_heap.max(heap);
        if std::env::var_os("TRTLLM_FUZZ_VERBOSE").is_some() {
            eprintln!("{} {:?}", input.seed, outcome);
        }
        match outcome {
            Outcome::Accepted => r.accepted += 1,
            Outcome::Refused(_) => r.refused += 1,
        }
        Ok(())
    };

    // Straight to the stream, past the test harness's capture: an abort loses captured output,
    // and this says where the aborting case's files are.
    let _ = writeln!(
        std::io::stderr(),
        "fuzz {}: each case runs in {} (an abort leaves its input there)",
        target.name(),
        dir.display()
    );
    let saved = load_corpus(&corpus.join(target.name()))?;
    for (path, input) in &saved {
        check(input).map_err(|e| format!("corpus entry {} fails again: {e}", path.display()))?;
    }

    let seed = limits.rng_seed.unwrap_or_else(|| {
        let s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        eprintln!("fuzz {}: rng seed {s}", target.name());
        s
    });
    let mut runner = TestRunner::new(Config {
        cases: limits.cases,
        max_shrink_iters: 200,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(seed),
        ..Config::default()
    });
    let result = runner.run(&case(), |c| {
        check(&materialize(target, &c)).map_err(TestCaseError::fail)
    });
    if let Err(e) = result {
        return Err(match e {
            TestError::Fail(why, c) => {
                let input = materialize(target, &c);
                let saved = save_corpus(&corpus.join(target.name()), &input);
                format!("{why}\n  input saved to {saved}")
            }
            TestError::Abort(why) => why.to_string(),
        });
    }
    target.finish()?;

    let mut r = report.into_inner().unwrap_or_else(|e| e.into_inner());
    r.replayed = saved.len();
    r.cases = limits.cases;
    r.elapsed = start.elapsed();
    Ok(r)
}

/// Lays `input` out in `dir` and runs it under the watchdog and the heap check.
fn check(
    target: &dyn Target,
    input: &Input,
    dir: &Path,
    limits: &Limits,
) -> Result<(Outcome, usize), String> {
    lay_out(target, input, dir)
        .map_err(|e| format!("laying out the case in {}: {e}", dir.display()))?;
    let base = alloc::reset_peak();
    arm(dir, limits.case_timeout);
    let result = catch_unwind(AssertUnwindSafe(|| target.run(dir, input)));
    disarm();
    let heap = alloc::peak().saturating_sub(base);
    let outcome = match result {
        Ok(r) => r?,
        Err(payload) => {
            let msg = trtllm_api::runtime::panic_message(payload.as_ref()).unwrap_or_default();
            return Err(format!("panicked: {msg}"));
        }
    };
    if heap > limits.case_heap {
        return Err(format!(
            "the heap grew by {} MB (limit {} MB)",
            heap >> 20,
            limits.case_heap >> 20
        ));
    }
    Ok((outcome, heap))
}

fn lay_out(target: &dyn Target, input: &Input, dir: &Path) -> std::io::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)?;
    let seed = target
        .seeds()
        .iter()
        .find(|s| s.name == input.seed)
        .ok_or_else(|| std::io::Error::other(format!("no seed named {}", input.seed)))?;
    if let Some(src) = &seed.dir {
        for e in std::fs::read_dir(src)? {
            let e = e?;
            let name = e.file_name();
            let skip = name == "golden.json" || e.path().extension().is_some_and(|x| x == "py");
            if e.file_type()?.is_file() && !skip {
                std::fs::copy(e.path(), dir.join(name))?;
            }
        }
    }
    for f in &seed.files {
        std::fs::write(dir.join(&f.rel), &f.bytes)?;
    }
    for (rel, bytes) in &input.files {
        std::fs::write(dir.join(rel), bytes)?;
    }
    Ok(())
}

/// The case running now, for the watchdog.
static ARMED: Mutex<Option<(Instant, Duration, PathBuf)>> = Mutex::new(None);

fn arm(dir: &Path, timeout: Duration) {
    static WATCHDOG: OnceLock<()> = OnceLock::new();
    WATCHDOG.get_or_init(|| {
        std::thread::spawn(|| loop {
            std::thread::sleep(Duration::from_millis(200));
            let armed = ARMED.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((start, timeout, dir)) = armed.as_ref() {
                if start.elapsed() > *timeout {
                    eprintln!(
                        "fuzz: a case ran past {timeout:?} (a hang); its input is in {}",
                        dir.display()
                    );
                    std::process::abort();
                }
            }
        });
    });
    *ARMED.lock().unwrap_or_else(|e| e.into_inner()) =
        Some((Instant::now(), timeout, dir.to_path_buf()));
}

fn disarm() {
    *ARMED.lock().unwrap_or_else(|e| e.into_inner()) = None;
}

/// Corpus entries: `<dir>/<id>/seed` (the seed's name, then the flag) and `<dir>/<id>/files/`.
fn load_corpus(dir: &Path) -> Result<Vec<(PathBuf, Input)>, String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(Vec::new());
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    let read = |p: &Path| -> std::io::Result<Input> {
        let head = std::fs::read_to_string(p.join("seed"))?;
        let mut lines = head.lines();
        let seed = lines.next().unwrap_or_default().to_string();
        let flag = lines.next() == Some("true");
        let mut files = Vec::new();
        for f in std::fs::read_dir(p.join("files"))? {
            let f = f?;
            files.push((
                f.file_name().to_string_lossy().into_owned(),
                std::fs::read(f.path())?,
            ));
        }
        files.sort();
        Ok(Input { seed, flag, files })
    };
    paths
        .into_iter()
        .filter(|p| p.is_dir())
        .map(|p| {
            read(&p)
                .map(|i| (p.clone(), i))
                .map_err(|e| format!("corpus entry {}: {e}", p.display()))
        })
        .collect()
}

fn save_corpus(dir: &Path, input: &Input) -> String {
    let mut crc = crc32fast::Hasher::new();
    crc.update(input.seed.as_bytes());
    for (rel, bytes) in &input.files {
        crc.update(rel.as_bytes());
        crc.update(bytes);
    }
    let entry = dir.join(format!("{:08x}", crc.finalize()));
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(entry.join("files"))?;
        std::fs::write(
            entry.join("seed"),
            format!("{}\n{}\n", input.seed, input.flag),
        )?;
        for (rel, bytes) in &input.files {
            std::fs::write(entry.join("files").join(rel), bytes)?;
        }
        Ok(())
    };
    match write() {
        Ok(()) => entry.display().to_string(),
        Err(e) => format!("(not saved: {e})"),
    }
}
