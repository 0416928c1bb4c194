//! `Session` opens an engine; `ModelRunner` runs forward passes over it with input validation.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::cpu_backend::CpuBackend;
use crate::decoder::Decoder;
use crate::engine::{EngineConfig, EngineFile, TensorInfo};
use crate::kv_cache::{KvBudget, KvCache, KvPool, KvStorage, KV_CACHE_BLOCK};
use crate::lora::{DeviceLora, LoraAdapter, LoraInner, LoraWeights};
use crate::model::{ActivationObserver, HostModel, LogitsMode, NoObserver, SeqChunk};
use crate::parallel::proxy::{self, Chunk, Msg, RemoteLora, RemotePool};
use crate::parallel::{self, Comm, Groups, Shard};
use crate::tuning::{TimingCache, TuneReport};
use crate::{Device, ModelConfig, Result, RuntimeError};

/// A loaded engine: its config and its memory-mapped weights (this rank's file of a split one).
pub struct Session {
    dir: PathBuf,
    config: EngineConfig,
    file: Arc<EngineFile>,
    /// This process's rank of a split engine, and the job's ranks.
    parallel: Option<(Shard, Arc<dyn Comm>)>,
}

impl Session {
    /// Opens an engine directory, checking its format version, size and checksum.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(RuntimeError::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "engine directory not found"),
            ));
        }
        let config = EngineConfig::read(dir)?;
        let parallel = match config.mapping.is_parallel() {
            true => {
                let world = job_for(dir, &config)?;
                Some((config.mapping.shard(&config.model, world.rank())?, world))
            }
            false => None,
        };
        let rank = parallel.as_ref().map_or(0, |(s, _)| s.rank);
        let file = config.ranks.get(rank).ok_or_else(|| {
            RuntimeError::corrupt(dir.join("config.json"), "no rank files listed")
        })?;
        let file = EngineFile::open(dir, file)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            file,
            parallel,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Every tensor of the engine, sorted by name.
    pub fn tensors(&self) -> Vec<TensorInfo> {
        self.file.tensors().cloned().collect()
    }

    pub fn engine_bytes(&self) -> usize {
        self.file.len()
    }

    /// A runner on the CPU.
    pub fn model_runner(&self) -> Result<ModelRunner> {
        self.model_runner_on(Device::Cpu)
    }

    /// A runner with the weights on `device` (a CUDA device needs the `cuda` feature and a GPU).
    /// On rank 0 of a split engine, the other ranks make theirs at the same time.
    pub fn model_runner_on(&self, device: Device) -> Result<ModelRunner> {
        if let Some((_, world)) = self.parallel.as_ref().filter(|(s, _)| s.rank == 0) {
            let dir = std::path::absolute(&self.dir).map_err(|e| RuntimeError::io(&self.dir, e))?;
            proxy::send(&**world, &Msg::Open { dir, device })?;
        }
        self.runner(device)
    }

    /// This rank's runner; with other ranks, every rank learns whether all of them made theirs.
    pub(crate) fn runner(&self, device: Device) -> Result<ModelRunner> {
        let groups = match &self.parallel {
            Some((shard, world)) => {
                // The twin of a worker's report that it could not open the engine.
                parallel::agree(&**world, false, "open the engine")?;
                Some(Groups::new(world.clone(), shard.clone())?)
            }
            None => None,
        };
        let backend = self.decoder(device, groups.clone());
        if let Some(g) = &groups {
            parallel::agree(&*g.world, backend.is_err(), "load its shard of the engine")?;
        }
        Ok(ModelRunner {
            backend: backend?,
            config: self.config.clone(),
            front: groups.filter(|g| g.shard.rank == 0).map(|g| g.world),
        })
    }

    fn decoder(&self, device: Device, par: Option<Groups>) -> Result<Backend> {
        let shard = self.parallel.as_ref().map(|(s, _)| s);
        let model = HostModel::new(&self.config.model, self.file.clone(), shard)?;
        Ok(match device {
            Device::Cpu => {
                let cpu = CpuBackend::new(&model);
                Backend::Cpu(Decoder::new(model, cpu, par)?)
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => {
                let tp = par.as_ref().map(|g| &*g.tp);
                let cuda = crate::cuda::CudaBackend::new(&model, n, tp)?;
                Backend::Cuda(Decoder::new(model, cuda, par)?)
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => {
                return Err(RuntimeError::InvalidDevice(format!(
                    "{device}: this build of trtllm has no CUDA support; rebuild with \
                     `--features cuda` (after `cargo xtask build-kernels`)"
                )))
            }
        })
    }
}

/// The job's ranks, when they are the ranks `config` (in `dir`) is split over.
fn job_for(dir: &Path, config: &EngineConfig) -> Result<Arc<dyn Comm>> {
    let m = config.mapping;
    let how = format!(
        "{}: the engine is split over {} ranks (tp_size {}, pp_size {})",
        dir.display(),
        m.world_size,
        m.tp_size,
        m.pp_size
    );
    match crate::parallel::world() {
        None => Err(crate::parallel::error(format!(
            "{how}: run it under `mpirun -np {}` with a trtllm built with the `mpi` feature",
            m.world_size
        ))),
        Some(w) if w.size() != m.world_size => Err(crate::parallel::error(format!(
            "{how}, and this job has {} ranks: start it with `mpirun -np {}`",
            w.size(),
            m.world_size
        ))),
        Some(w) => Ok(w),
    }
}

/// Executes the model: forward passes, prompt validation and scoring.
pub struct ModelRunner {
    backend: Backend,
    config: EngineConfig,
    /// On rank 0 of a split engine, the ranks it sends each call to before making it (from the
    /// one thread that uses the runner, so that they arrive in the order they are made).
    front: Option<Arc<dyn Comm>>,
}

/// The decoder, on the device the runner was opened for. One runner exists per engine, so the
/// variants' size difference costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
enum Backend {
    Cpu(Decoder<CpuBackend>),
    #[cfg(feature = "cuda")]
    Cuda(Decoder<crate::cuda::CudaBackend>),
}

impl ModelRunner {
    /// This rank's part of a split engine.
    fn shard(&self) -> Option<&Shard> {
        match &self.backend {
            Backend::Cpu(d) => d.shard(),
            #[cfg(feature = "cuda")]
            Backend::Cuda(d) => d.shard(),
        }
    }

    pub fn model(&self) -> &ModelConfig {
        match &self.backend {
            Backend::Cpu(d) => d.config(),
            #[cfg(feature = "cuda")]
            Backend::Cuda(d) => d.config(),
        }
    }

    pub fn device(&self) -> Device {
        match &self.backend {
            Backend::Cpu(_) => Device::Cpu,
            #[cfg(feature = "cuda")]
            Backend::Cuda(d) => Device::Cuda(d.backend.ordinal()),
        }
    }

    /// Reads the PEFT adapter in `dir` for this engine's model (ranks up to the engine's
    /// `max_lora_rank`), on the calling thread: a runner's device is not touched.
    pub fn read_lora(&self, name: &str, dir: &Path) -> Result<LoraAdapter> {
        LoraAdapter::for_engine(name, dir, &self.config)
    }

    /// `adapter` (read for this engine) placed on this runner's device, for [`SeqChunk::lora`].
    /// On rank 0 of a split engine every rank places its part, read from the adapter's
    /// directory as each reads the engine's.
    pub fn load_lora(&self, adapter: &LoraAdapter) -> Result<LoraWeights> {
        let mut weights = self.place_lora(adapter)?;
        if let Some(world) = &self.front {
            let dir = adapter.dir.as_deref().ok_or_else(|| RuntimeError::Lora {
                adapter: adapter.name.clone(),
                reason: "the other ranks of a split engine read an adapter from its directory, \
                         and this one was not read from one"
                    .into(),
            })?;
            let dir = std::path::absolute(dir).map_err(|e| RuntimeError::io(dir, e))?;
            let (id, name) = (weights.id(), &adapter.name);
            // Dropped on failure, which tells the ranks that could place it to drop it.
            weights.remote = Some(RemoteLora::new(world.clone(), id, name, dir)?);
            parallel::agree(&**world, false, &format!("load LoRA adapter {name}"))?;
        }
        Ok(weights)
    }

    /// A worker's part of the adapter rank 0 loaded from `dir`.
    pub(crate) fn load_lora_from(&self, name: &str, dir: &Path) -> Result<LoraWeights> {
        self.place_lora(&LoraAdapter::for_engine(name, dir, &self.config)?)
    }

    /// This rank's part of `adapter` on this runner's device.
    fn place_lora(&self, adapter: &LoraAdapter) -> Result<LoraWeights> {
        let max_rank = self.config.build.max_lora_rank;
        adapter.check(&self.config.model, max_rank)?;
        let part;
        let adapter = match self.shard() {
            Some(shard) => {
                part = adapter.shard(&self.config.model, shard);
                part.check(self.model(), max_rank)?;
                &part
            }
            None => adapter,
        };
        let inner = match &self.backend {
            Backend::Cpu(d) => LoraInner::Cpu(DeviceLora::new(&d.backend, adapter)?),
            #[cfg(feature = "cuda")]
            Backend::Cuda(d) => LoraInner::Cuda(DeviceLora::new(&d.backend, adapter)?),
        };
        Ok(LoraWeights::new(&adapter.name, inner))
    }

    /// A zeroed KV pool divided as `budget` says, on the runner's device, in the engine's KV
    /// storage.
    pub fn new_pool(&self, budget: &KvBudget) -> Result<KvPool> {
        let storage = KvStorage::of(&self.config.build);
        let mut pool = match &self.backend {
            Backend::Cpu(_) => KvPool::new(self.model(), storage, budget)?,
            #[cfg(feature = "cuda")]
            Backend::Cuda(d) => d.backend.new_pool(storage, budget)?,
        };
        if let Some(world) = &self.front {
            pool.remote = Some(RemotePool::new(world.clone(), budget)?);
        }
        Ok(pool)
    }

    pub fn engine_config(&self) -> &EngineConfig {
        &self.config
    }

    /// Chooses the CPU linear kernels' tactics for this engine on this machine from `cache`,
    /// timing (within `budget`) what it lacks and adding it there. On a GPU the kernels are
    /// fixed and nothing is timed. On rank 0 of a split engine every rank tunes its own shard,
    /// one after another, through the cache's file (which then holds every rank's entries and
    /// is read back into `cache`); the report is rank 0's.
    pub fn tune(&mut self, cache: &mut TimingCache, budget: Duration) -> Result<TuneReport> {
        let Some(world) = self.front.clone() else {
            return self.tune_here(cache, budget);
        };
        let path =
            std::path::absolute(cache.path()).map_err(|e| RuntimeError::io(cache.path(), e))?;
        proxy::send(
            &*world,
            &Msg::Tune {
                path: path.clone(),
                budget,
            },
        )?;
        let report = self.tune_in_turn(&*world, &path, budget)?;
        *cache = TimingCache::open(&path)?;
        Ok(report)
    }

    /// Rank by rank, each under the conditions it runs in (its shard, its threads): this rank,
    /// on its turn, tunes from the cache file as the ranks before it left it and saves it.
    pub(crate) fn tune_in_turn(
        &mut self,
        world: &dyn Comm,
        path: &Path,
        budget: Duration,
    ) -> Result<TuneReport> {
        let mut mine = Ok(TuneReport::default());
        for turn in 0..world.size() {
            if turn == world.rank() {
                mine = TimingCache::open(path).and_then(|mut cache| {
                    let report = self.tune_here(&mut cache, budget)?;
                    cache.save().map(|()| report)
                });
            }
            let failed = turn == world.rank() && mine.is_err();
            parallel::agree(world, failed, "tune its shard")?;
        }
        mine
    }

    fn tune_here(&mut self, cache: &mut TimingCache, budget: Duration) -> Result<TuneReport> {
        match &mut self.backend {
            Backend::Cpu(d) => d.tune(cache, budget),
            #[cfg(feature = "cuda")]
            Backend::Cuda(_) => Ok(TuneReport::default()),
        }
    }

    /// Batch invariance (see `Decoder::set_batch_invariant`), on either device (and every rank).
    pub fn set_batch_invariant(&mut self, on: bool) {
        if let Some(world) = &self.front {
            if let Err(e) = proxy::send(&**world, &Msg::Invariant { on }) {
                fatal(&**world, e);
            }
        }
        match &mut self.backend {
            Backend::Cpu(d) => d.set_batch_invariant(on),
            #[cfg(feature = "cuda")]
            Backend::Cuda(d) => d.backend.set_batch_invariant(on),
        }
    }

    pub fn max_seq_len(&self) -> usize {
        self.config.build.max_seq_len
    }

    /// A cache able to hold `max_len` positions (capped at the engine's max_seq_len).
    pub fn new_cache(&self, max_len: usize) -> Result<KvCache> {
        let max_len = max_len.min(self.max_seq_len());
        let blocks = max_len.div_ceil(KV_CACHE_BLOCK);
        let pool = self.new_pool(&KvBudget::uniform(self.model(), blocks, KV_CACHE_BLOCK))?;
        let groups = self.model().kv_groups().windows.len();
        Ok(KvCache::new(pool, max_len, groups))
    }

    /// Runs `tokens` after what `cache` holds, in chunks of at most max_num_tokens.
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        mode: LogitsMode,
    ) -> Result<Vec<f32>> {
        self.forward_observed(tokens, (cache, None), mode, &mut NoObserver)
    }

    /// [`Self::forward`] with the sequence's LoRA adapter (loaded by this runner).
    pub fn forward_adapted(
        &self,
        tokens: &[u32],
        (cache, lora): (&mut KvCache, Option<&LoraWeights>),
        mode: LogitsMode,
    ) -> Result<Vec<f32>> {
        self.forward_observed(tokens, (cache, lora), mode, &mut NoObserver)
    }

    /// Runs one sequence `tokens` with `obs` watching every linear module's input
    /// (calibration); computes no logits. On a GPU each input is downloaded for `obs`.
    pub fn observe(&self, tokens: &[u32], obs: &mut dyn ActivationObserver) -> Result<()> {
        let mut cache = self.new_cache(tokens.len())?;
        self.forward_observed(tokens, (&mut cache, None), LogitsMode::Skip, obs)?;
        Ok(())
    }

    fn forward_observed(
        &self,
        tokens: &[u32],
        (cache, lora): (&mut KvCache, Option<&LoraWeights>),
        mode: LogitsMode,
        obs: &mut dyn ActivationObserver,
    ) -> Result<Vec<f32>> {
        self.config.check_ids(tokens)?;
        cache.check_room(tokens.len())?;
        let chunk = self.config.build.max_num_tokens.max(1);
        let mut logits = Vec::new();
        for (i, part) in tokens.chunks(chunk).enumerate() {
            let last = (i + 1) * chunk >= tokens.len();
            let logits_mode = match mode {
                LogitsMode::Last if !last => LogitsMode::Skip,
                m => m,
            };
            let tables = vec![&cache.blocks[..]; cache.groups];
            let step = SeqChunk {
                tokens: part,
                past: cache.len(),
                blocks: &tables,
                logits: logits_mode,
                lora,
            };
            logits.extend(self.run(&[step], &mut cache.pool, obs)?);
            cache.advance(part.len());
        }
        Ok(logits)
    }

    /// Copies blocks within `pool` (what [`crate::KvCacheManager::fork`] returned) before the
    /// next pass reads the forked sequences.
    pub fn copy_blocks(&self, pool: &mut KvPool, copies: &[crate::BlockCopy]) -> Result<()> {
        if copies.is_empty() {
            return Ok(());
        }
        let layer_group = pool.check_copies(copies)?.to_vec();
        if let Some(world) = &self.front {
            let pool = remote_id(pool)?;
            let copies = copies.to_vec();
            proxy::send(&**world, &Msg::Copy { pool, copies })?;
        }
        match &self.backend {
            Backend::Cpu(_) => pool.host_mut()?.copy_blocks(&layer_group, copies),
            #[cfg(feature = "cuda")]
            Backend::Cuda(d) => {
                let dev = d.backend.device();
                pool.device_mut()?.copy_blocks(dev, &layer_group, copies)?;
            }
        }
        Ok(())
    }

    /// One batched forward pass over chunks of several sequences sharing `pool` (the
    /// scheduler's step). Checks token ids, and that every chunk's block tables cover it and name
    /// the pool's blocks wherever it reads or writes.
    pub fn forward_batch(&self, batch: &[SeqChunk<'_>], pool: &mut KvPool) -> Result<Vec<f32>> {
        let windows = self.model().kv_groups().windows;
        for c in batch {
            if c.tokens.is_empty() {
                return Err(RuntimeError::EmptyPrompt);
            }
            self.config.check_ids(c.tokens)?;
            let end = c.past + c.tokens.len();
            if end > self.max_seq_len() {
                return Err(RuntimeError::PromptTooLong {
                    len: end,
                    max: self.max_seq_len(),
                    limit: "max_seq_len",
                });
            }
            if c.blocks.len() != windows.len() {
                return Err(RuntimeError::InvalidKvConfig {
                    field: "block tables",
                    value: format!("{} per sequence", c.blocks.len()),
                    expected: "one per KV group of the model",
                });
            }
            for (g, (table, &window)) in c.blocks.iter().zip(&windows).enumerate() {
                pool.check_table((g, window), table, (c.past, end))?;
            }
        }
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.run(batch, pool, &mut NoObserver)
    }

    fn run(
        &self,
        batch: &[SeqChunk<'_>],
        pool: &mut KvPool,
        obs: &mut dyn ActivationObserver,
    ) -> Result<Vec<f32>> {
        let Some(world) = &self.front else {
            return self.run_here(batch, pool, obs);
        };
        if let Some(w) = batch
            .iter()
            .find_map(|c| c.lora.filter(|w| w.remote.is_none()))
        {
            return Err(RuntimeError::Lora {
                adapter: w.name().to_string(),
                reason: "its weights were not loaded by this runner of a split engine".into(),
            });
        }
        let chunks = batch.iter().map(Chunk::of).collect();
        let pool_id = remote_id(pool)?;
        proxy::send(
            &**world,
            &Msg::Forward {
                pool: pool_id,
                chunks,
            },
        )?;
        // The other ranks are in this pass: failing (or panicking) here would leave them
        // waiting in a collective, so it ends the job rather than the request.
        let pass = std::panic::AssertUnwindSafe(|| self.run_here(batch, pool, obs));
        match std::panic::catch_unwind(pass) {
            Ok(Ok(logits)) => Ok(logits),
            Ok(Err(e)) => fatal(&**world, e),
            Err(panic) => {
                let why = crate::panic_message(&*panic).unwrap_or_default();
                fatal(
                    &**world,
                    crate::parallel::error(format!("a pass panicked: {why}")),
                )
            }
        }
    }

    /// A pass rank 0 sent, on this rank's shard, with this rank's parts of rank 0's adapters.
    pub(crate) fn run_chunks(
        &self,
        chunks: &[Chunk],
        pool: &mut KvPool,
        loras: &HashMap<u64, LoraWeights>,
    ) -> Result<()> {
        let lora = |id: Option<u64>| {
            id.map(|id| {
                loras.get(&id).ok_or_else(|| {
                    crate::parallel::error(format!(
                        "rank 0 named LoRA adapter #{id}, which this rank lacks"
                    ))
                })
            })
            .transpose()
        };
        let adapters = chunks
            .iter()
            .map(|c| lora(c.lora))
            .collect::<Result<Vec<_>>>()?;
        let tables: Vec<Vec<&[crate::BlockId]>> = chunks
            .iter()
            .map(|c| c.blocks.iter().map(|b| &b[..]).collect())
            .collect();
        let batch: Vec<SeqChunk<'_>> = chunks
            .iter()
            .zip(&tables)
            .zip(adapters)
            .map(|((c, blocks), lora)| SeqChunk {
                tokens: &c.tokens,
                past: c.past,
                blocks,
                logits: c.logits,
                lora,
            })
            .collect();
        self.run_here(&batch, pool, &mut NoObserver).map(drop)
    }

    fn run_here(
        &self,
        batch: &[SeqChunk<'_>],
        pool: &mut KvPool,
        obs: &mut dyn ActivationObserver,
    ) -> Result<Vec<f32>> {
        match &self.backend {
            // The whole pass on a pool thread: each kernel's parallel loop then starts from a
            // worker (its halves stolen by the other workers) instead of being injected from
            // outside the pool with the caller put to sleep and woken, ~150 times per decode
            // step (kept Q4_1 SmolLM2 decode: 13.2 → 8.8 ms per token on a 2-core Xeon).
            Backend::Cpu(d) => rayon::scope(|_| d.forward_batch(batch, pool, obs)),
            #[cfg(feature = "cuda")]
            Backend::Cuda(d) => d.forward_batch(batch, pool, obs),
        }
    }

    /// Negative log-likelihood of each of `ids[1..]` given the tokens before it.
    pub fn score(&self, ids: &[u32]) -> Result<Vec<f64>> {
        if ids.len() < 2 {
            return Err(RuntimeError::PromptTooLong {
                len: ids.len(),
                max: 2,
                limit: "at least 2 tokens to score",
            });
        }
        if ids.len() > self.max_seq_len() {
            return Err(RuntimeError::PromptTooLong {
                len: ids.len(),
                max: self.max_seq_len(),
                limit: "max_seq_len",
            });
        }
        self.config.check_ids(ids)?;
        let vocab = self.model().vocab_size;
        let mut cache = self.new_cache(ids.len())?;
        let chunk = self.config.build.max_num_tokens.clamp(1, 512);
        let mut nll = Vec::with_capacity(ids.len() - 1);
        for start in (0..ids.len() - 1).step_by(chunk) {
            let end = (start + chunk).min(ids.len() - 1);
            let logits = self.forward(&ids[start..end], &mut cache, LogitsMode::All)?;
            for (row, &next) in logits.chunks_exact(vocab).zip(&ids[start + 1..=end]) {
                nll.push(-log_softmax_at(row, next as usize));
            }
        }
        Ok(nll)
    }
}

/// The id under which the other ranks keep their twins of `pool`.
fn remote_id(pool: &KvPool) -> Result<u64> {
    let remote = pool.remote.as_ref();
    remote.map(|r| r.id).ok_or_else(|| {
        crate::parallel::error("a KV pool not made by this runner of a split engine")
    })
}

/// Ends the job: the ranks can no longer agree on what runs next.
pub(crate) fn fatal(world: &dyn Comm, e: RuntimeError) -> ! {
    eprintln!("error: rank {}: {e}", world.rank());
    world.abort(1)
}

fn log_softmax_at(row: &[f32], i: usize) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&l| (l as f64 - max).exp()).sum();
    row[i] as f64 - max - sum.ln()
}
