//! Auto-tuning of the CPU linear kernels (TensorRT's timing cache, for our kernels): for each
//! weight shape and format of an engine and each row regime (decode, batched, prefill), time
//! candidate [`Tactic`]s on the machine at hand and keep the fastest. Choices persist in a
//! timing cache file keyed by the machine (CPU model, instruction set, threads), so a later build
//! or run on the same machine reuses them and a cache from another machine is never applied.
//! Without an entry the defaults run (the kernels' hand-tuned constants).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use trtllm_quant::kernels::cpu::{self, Isa, MatRef, Regime, Tactic, WeightData};

use crate::{Result, RuntimeError};

const CACHE_FORMAT: &str = "trtllm-timing-cache";
const CACHE_VERSION: u32 = 1;
/// Layers whose matrices a timing pass runs (every shape is in each layer).
const LAYERS: usize = 4;

/// A timing cache file: tactics per machine, per "shape regime" entry.
pub struct TimingCache {
    path: PathBuf,
    file: CacheFile,
}

#[derive(Serialize, Deserialize)]
struct CacheFile {
    format: String,
    version: u32,
    machines: BTreeMap<String, BTreeMap<String, Entry>>,
}

#[derive(Clone, Serialize, Deserialize)]
struct Entry {
    tactic: Tactic,
    /// The call's time under this tactic when it was tuned (for the reader; never compared).
    micros: f64,
}

impl TimingCache {
    /// Reads `path`, or starts an empty cache there when it does not exist yet.
    pub fn open(path: &Path) -> Result<Self> {
        let file = match std::fs::read(path) {
            Ok(bytes) => {
                let file: CacheFile =
                    serde_json::from_slice(&bytes).map_err(|source| RuntimeError::Json {
                        path: path.into(),
                        source,
                    })?;
                if file.format != CACHE_FORMAT || file.version != CACHE_VERSION {
                    return Err(RuntimeError::Corrupt {
                        path: path.into(),
                        message: format!(
                            "not a timing cache of this version ({} version {}, expected {CACHE_FORMAT} version {CACHE_VERSION}); delete it to start a new one",
                            file.format, file.version
                        ),
                    });
                }
                file
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => CacheFile {
                format: CACHE_FORMAT.into(),
                version: CACHE_VERSION,
                machines: BTreeMap::new(),
            },
            Err(e) => return Err(RuntimeError::io(path, e)),
        };
        Ok(Self {
            path: path.into(),
            file,
        })
    }

    /// Writes the cache (to a temporary file renamed over the old one, so a crash never leaves
    /// half a cache).
    pub fn save(&self) -> Result<()> {
        let text =
            serde_json::to_string_pretty(&self.file).map_err(|source| RuntimeError::Json {
                path: self.path.clone(),
                source,
            })?;
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, text).map_err(|e| RuntimeError::io(&tmp, e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| RuntimeError::io(&self.path, e))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Entries this machine has.
    pub fn entries_here(&self) -> usize {
        self.file.machines.get(&machine()).map_or(0, BTreeMap::len)
    }

    fn get(&self, machine: &str, key: &str) -> Option<Tactic> {
        self.file.machines.get(machine)?.get(key).map(|e| e.tactic)
    }

    fn insert(&mut self, machine: &str, key: String, entry: Entry) {
        self.file
            .machines
            .entry(machine.into())
            .or_default()
            .insert(key, entry);
    }
}

/// What a machine's tactics are valid for: the CPU model, the instruction set the kernels take
/// and the threads they split over.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map_or("unknown CPU", |m| m.trim_start_matches([' ', '\t', ':']));
    format!(
        "{model} | {} | {} threads",
        cpu::detected_isa().name(),
        rayon::current_num_threads()
    )
}

/// Dense weights: the formats the batched path may read in place.
fn dense(w: &MatRef<'_>) -> bool {
    matches!(
        w.data(),
        WeightData::F32(_) | WeightData::Bf16(_) | WeightData::F16(_)
    )
}

/// The decoder's tactic per row regime; the default where none was tuned.
#[derive(Clone, Debug, Default)]
pub(crate) struct Tactics([Option<Tactic>; 3]);

impl Tactics {
    pub fn get(&self, rows: usize) -> Tactic {
        self.0[Regime::of(rows) as usize].unwrap_or_default()
    }

    /// Batch invariance: the decode regime's tactic for every row count (one instruction set,
    /// so one lane width), with the kernels that keep one summation order.
    pub fn invariant(&self) -> Self {
        let t = Tactic {
            invariant: true,
            ..self.get(1)
        };
        Self([Some(t); 3])
    }
}

/// What a tuning run did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TuneReport {
    /// Regime entries timed now.
    pub tuned: usize,
    /// Entries taken from the cache.
    pub cached: usize,
    /// Entries left at the default because the time budget ran out.
    pub skipped: usize,
    pub seconds: f64,
}

/// Tactics for the engine whose linear matrices are `mats` (layer by layer, the LM head last,
/// each named by `Weight::describe`), from `cache` where it has them, else timed (within
/// `budget`) and added to it. One tactic per regime serves every shape: it is timed on passes over the first [`LAYERS`] layers and the
/// head in the order a forward pass runs them, because a matrix timed alone, hot in the cache
/// and with the thread pool to itself, chose tactics that lost 4–10 % inside the model.
pub(crate) fn tune(
    mats: &[(MatRef<'_>, String)],
    cache: &mut TimingCache,
    budget: Duration,
) -> (Tactics, TuneReport) {
    let start = Instant::now();
    let machine = machine();
    // W8A8 takes its own kernel whatever the tactic.
    let mats: Vec<&(MatRef<'_>, String)> = mats
        .iter()
        .filter(|(m, _)| !matches!(m.data(), WeightData::W8A8(_)))
        .collect();
    let mut pass: Vec<MatRef<'_>> = mats.iter().take(LAYERS * 4).map(|(m, _)| *m).collect();
    pass.extend(
        mats.last()
            .filter(|_| mats.len() > LAYERS * 4)
            .map(|(m, _)| *m),
    );
    let shapes: BTreeSet<&str> = mats.iter().map(|(_, name)| name.as_str()).collect();
    let signature: Vec<&str> = shapes.into_iter().collect();
    let mut tactics = Tactics::default();
    let mut report = TuneReport::default();
    for regime in Regime::ALL {
        if pass.is_empty() {
            break;
        }
        let name = format!("{} | {}", signature.join(", "), regime.name());
        let tactic = match cache.get(&machine, &name) {
            Some(t) => {
                report.cached += 1;
                t
            }
            None if start.elapsed() < budget => {
                let entry = search(&pass, regime);
                cache.insert(&machine, name, entry.clone());
                report.tuned += 1;
                entry.tactic
            }
            None => {
                report.skipped += 1;
                continue;
            }
        };
        tactics.0[regime as usize] = Some(tactic);
    }
    report.seconds = start.elapsed().as_secs_f64();
    (tactics, report)
}

/// A coordinate search from the default: the instruction set, then the prefetch distance and
/// the quantized GEMV's tile (decode kernels), the batched GEMM (dense weights), then the
/// column split. A candidate must beat the incumbent by 5 % to replace it, so timing noise keeps
/// the hand-tuned defaults.
fn search(mats: &[MatRef<'_>], regime: Regime) -> Entry {
    let m = regime.sample_rows();
    let k = mats.iter().map(MatRef::cols).max().unwrap_or(0);
    let n = mats.iter().map(MatRef::rows).max().unwrap_or(0);
    let x: Vec<f32> = (0..m * k)
        .map(|i| ((i * 7919) % 997) as f32 / 997.0 - 0.5)
        .collect();
    let mut y = vec![0f32; m * n];
    // Microseconds of one pass over the matrices.
    let mut pass = |t: &Tactic| -> f64 {
        let s = Instant::now();
        for w in mats {
            let (x, y) = (&x[..m * w.cols()], &mut y[..m * w.rows()]);
            if cpu::linear_with(x, m, *w, None, y, t).is_err() {
                return f64::MAX;
            }
        }
        s.elapsed().as_secs_f64() * 1e6
    };
    let mut best = Tactic::default();
    // A first pass pages the weights in and starts the pool's threads.
    pass(&best);
    let mut best_us = f64::MAX;
    // Incumbent and candidate alternate, best of 4 passes each, so a machine whose speed drifts
    // (other tenants, frequency) favours neither.
    let mut consider = |cand: Tactic, best: &mut Tactic, best_us: &mut f64| {
        let (mut inc, mut new) = (f64::MAX, f64::MAX);
        for _ in 0..4 {
            inc = inc.min(pass(best));
            new = new.min(pass(&cand));
        }
        *best_us = inc;
        if new < inc * 0.95 {
            (*best, *best_us) = (cand, new);
        }
    };
    for isa in [Isa::Avx2, Isa::Avx512] {
        if isa <= cpu::detected_isa() && isa != best.isa {
            consider(Tactic { isa, ..best }, &mut best, &mut best_us);
        }
    }
    if regime != Regime::Prefill {
        for prefetch_rows in [0, 4, 16, 32] {
            consider(
                Tactic {
                    prefetch_rows,
                    ..best
                },
                &mut best,
                &mut best_us,
            );
        }
    }
    if regime == Regime::Decode && mats.iter().any(|w| !dense(w)) {
        let wide_tiles = !best.wide_tiles;
        consider(Tactic { wide_tiles, ..best }, &mut best, &mut best_us);
    }
    if regime == Regime::Batched && mats.iter().any(dense) {
        let direct = !best.direct;
        consider(Tactic { direct, ..best }, &mut best, &mut best_us);
    }
    for chunks_per_thread in [1, 2, 8] {
        consider(
            Tactic {
                chunks_per_thread,
                ..best
            },
            &mut best,
            &mut best_us,
        );
    }
    Entry {
        tactic: best,
        micros: best_us,
    }
}
