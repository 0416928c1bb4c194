//! The executor front: validates and queues requests, and reads stats and KV events. The
//! engine loop runs on its own thread; stats and KV events are fanned out by two more.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;

use crossbeam_channel::{unbounded, Receiver, Sender};
use trtllm_builder::runtime::{
    Device, EngineConfig, GenerationParams, KvBudget, KvCacheEvent, KvCacheManager, KvCacheSummary,
    LoraAdapter, RuntimeError, Sampler, Session, TimingCache,
};

use crate::active::ActiveRequest;
use crate::dispatch::Dispatcher;
use crate::engine_loop::{EngineLoop, Job};
use crate::lora::{HostLoras, LoraRequest, RequestLora, ResidentLoras};
use crate::scheduler::Scheduler;
use crate::speculative::DraftContext;
use crate::{
    ExecutorConfig, ExecutorError, ExecutorLoad, GenerationRequest, GenerationResult,
    IterationStats, LogitsProcessor, Result,
};

pub struct GenerationExecutor {
    jobs: Option<Sender<Job>>,
    stop: Arc<AtomicBool>,
    worker: Option<JoinHandle<()>>,
    next_id: AtomicU64,
    /// Cancel flags of requests not yet finished, for `abort_request` by id.
    cancels: Mutex<HashMap<u64, Weak<AtomicBool>>>,
    config: EngineConfig,
    /// How the KV pool is divided, to refuse at submission what could never fit.
    kv_budget: KvBudget,
    /// Whether full blocks are shared between prompts (and so reported as stored).
    block_reuse: bool,
    /// LoRA adapters read on the host.
    loras: Mutex<HostLoras>,
    // Declared after `worker` so they are dropped (and joined) once the loop has let go.
    stats: Dispatcher<IterationStats>,
    kv_events: Dispatcher<KvCacheEvent>,
}

impl GenerationExecutor {
    /// Opens the engine in `dir` with the default executor config.
    pub fn new(dir: &Path) -> Result<Self> {
        Self::with_config(dir, ExecutorConfig::default())
    }

    /// Opens the engine in `dir` on the CPU, sizes the KV pool and starts the engine loop.
    pub fn with_config(dir: &Path, cfg: ExecutorConfig) -> Result<Self> {
        Self::on_device(dir, cfg, Device::Cpu)
    }

    /// As [`Self::with_config`], with the model and its KV pool on `device`.
    pub fn on_device(dir: &Path, cfg: ExecutorConfig, device: Device) -> Result<Self> {
        let session = Session::open(dir)?;
        let mut runner = session.model_runner_on(device)?;
        if let Some(path) = &cfg.timing_cache {
            let mut cache = TimingCache::open(path)?;
            if runner.tune(&mut cache, crate::config::TUNE_BUDGET)?.tuned > 0 {
                cache.save()?;
            }
        }
        runner.set_batch_invariant(cfg.batch_invariant);
        let config = runner.engine_config().clone();
        let limits = cfg.scheduler.limits(&config.build)?;
        let drafter = match &cfg.speculative {
            Some(spec) => {
                let ctx = DraftContext {
                    device,
                    kv_cache: &cfg.kv_cache,
                    target: &config.model,
                };
                Some((spec.drafter(&ctx)?, spec.max_draft_len()))
            }
            None => None,
        };
        let kv_budget = cfg
            .kv_cache
            .budget(&config.model, &config.build, limits.max_num_tokens)?;
        // A cached key rotated for one sequence's length is wrong for another's (dynamic NTK,
        // LongRoPE), so such models never share blocks.
        let reuse = cfg.kv_cache.enable_block_reuse && !config.model.rope_depends_on_length();
        let spawn_err = |e| {
            ExecutorError::Runtime(RuntimeError::Io {
                path: dir.into(),
                source: e,
            })
        };
        let stats = Dispatcher::spawn("trtllm-stats", cfg.history).map_err(spawn_err)?;
        let kv_events = Dispatcher::spawn("trtllm-kv-events", cfg.history).map_err(spawn_err)?;
        let (tx, rx) = unbounded::<Job>();
        let stop = Arc::new(AtomicBool::new(false));
        let engine = EngineLoop {
            pool: runner.new_pool(&kv_budget)?,
            kv: KvCacheManager::with_budget(kv_budget.clone(), reuse),
            runner,
            scheduler: Scheduler {
                policy: cfg.scheduler.policy,
                limits,
            },
            jobs: rx,
            stop: stop.clone(),
            stats: stats.sender(),
            kv_events: kv_events.sender(),
            running: Vec::new(),
            waiting: Default::default(),
            loras: ResidentLoras::new(config.build.max_loras),
            iteration: 0,
            drafter,
            speculative: Default::default(),
        };
        let worker = std::thread::Builder::new()
            .name("trtllm-engine".into())
            .spawn(move || engine.run())
            .map_err(spawn_err)?;
        Ok(Self {
            jobs: Some(tx),
            stop,
            worker: Some(worker),
            next_id: AtomicU64::new(1),
            cancels: Mutex::default(),
            loras: Mutex::new(HostLoras::new(config.build.max_cpu_loras)),
            config,
            kv_budget,
            block_reuse: reuse,
            stats,
            kv_events,
        })
    }

    /// The longest sequence (prompt and completion) a request may have: the engine's
    /// `max_seq_len`, or less when the KV pool holds less.
    pub fn max_sequence_len(&self) -> usize {
        self.config
            .build
            .max_seq_len
            .min(self.kv_budget.longest_sequence())
    }

    pub fn engine_config(&self) -> &EngineConfig {
        &self.config
    }

    /// Tokens per KV block: the size of the blocks whose hashes the KV events name
    /// (`trtllm_runtime::block_hashes` computes them from a prompt).
    pub fn kv_block_size(&self) -> usize {
        self.kv_budget.block_size
    }

    /// Whether full blocks are shared between prompts; without it no block is ever stored.
    pub fn block_reuse(&self) -> bool {
        self.block_reuse
    }

    /// Token ids in the parameters (stop tokens, biased tokens) must be in the vocabulary.
    fn check_token_params(&self, p: &GenerationParams) -> Result<()> {
        let vocab = self.config.model.vocab_size;
        let bias: Vec<u32> = p.sampling.logit_bias.iter().map(|&(t, _)| t).collect();
        for (field, ids) in [("stop_token_ids", &p.stop_token_ids), ("logit_bias", &bias)] {
            if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
                return Err(RuntimeError::InvalidSampling {
                    field,
                    value: id.to_string(),
                    expected: "token ids in the vocabulary",
                }
                .into());
            }
        }
        Ok(())
    }

    /// A beam search within the engine's max_beam_width, without a logits processor (which
    /// sees one output, not a beam's).
    fn check_beam(&self, p: &GenerationParams, has_processor: bool) -> Result<()> {
        let Some(b) = p.beam else {
            return Ok(());
        };
        let max_width = self.config.build.max_beam_width;
        let (field, value, expected) = if b.width > max_width.max(1) {
            (
                "beam_width",
                format!("{} (this engine's max_beam_width is {max_width})", b.width),
                "at most the engine's max_beam_width (trtllm build --max-beam-width)",
            )
        } else if has_processor {
            (
                "guided_decoding",
                "a logits processor".into(),
                "none with beam search",
            )
        } else {
            return Ok(());
        };
        Err(RuntimeError::InvalidSampling {
            field,
            value,
            expected,
        }
        .into())
    }

    /// Checks and queues a request; its tokens stream through the returned handle. Bad input
    /// (prompt, sampling parameters, a request larger than the whole KV pool) is an error
    /// here and never reaches the engine loop.
    pub fn submit(&self, request: GenerationRequest) -> Result<GenerationResult> {
        self.submit_with(request, None)
    }

    /// [`Self::submit`], with a processor that sees and may change each step's logits.
    pub fn submit_with(
        &self,
        request: GenerationRequest,
        processor: Option<Box<dyn LogitsProcessor>>,
    ) -> Result<GenerationResult> {
        let jobs = self.jobs.as_ref().ok_or(ExecutorError::ShutDown)?;
        self.config.validate_prompt(&request.prompt_token_ids)?;
        request.params.validate()?;
        self.check_token_params(&request.params)?;
        self.check_beam(&request.params, processor.is_some())?;
        let sampler = Sampler::new(request.params.sampling.clone(), &request.prompt_token_ids)?;
        let lora = request.lora.as_ref().map(|l| self.lora(l)).transpose()?;
        let prompt_len = request.prompt_token_ids.len();
        let budget = request
            .params
            .budget(prompt_len, self.config.build.max_seq_len);
        // A beam search may hold a whole sequence per beam.
        let width = request.params.beam.map_or(1, |b| b.width);
        if let Some((needed, total)) = self.kv_budget.too_large((prompt_len + budget) * width) {
            return Err(ExecutorError::RequestTooLarge { needed, total });
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = unbounded();
        let cancel = Arc::new(AtomicBool::new(false));
        {
            let mut cancels = self.cancels.lock().unwrap_or_else(|e| e.into_inner());
            cancels.retain(|_, w| w.strong_count() > 0);
            cancels.insert(id, Arc::downgrade(&cancel));
        }
        let mut active = ActiveRequest::new(
            id,
            request.prompt_token_ids,
            request.params,
            budget,
            sampler,
            tx,
            cancel.clone(),
        );
        active.processor = processor;
        active.lora = lora;
        jobs.send(Job::Submit(Box::new(active)))
            .map_err(|_| ExecutorError::ShutDown)?;
        Ok(GenerationResult {
            id,
            client_id: request.client_id,
            events: rx,
            cancel,
            done: false,
        })
    }

    /// Reads and checks the adapter `req` names against this engine, keeping it in the host
    /// cache: an error here is the one its requests would get.
    pub fn preload_lora(&self, req: &LoraRequest) -> Result<()> {
        self.lora(req).map(|_| ())
    }

    /// The adapter `req` names, from the host cache or read and checked now (on the caller's
    /// thread, outside the lock).
    fn lora(&self, req: &LoraRequest) -> Result<RequestLora> {
        let lock = || self.loras.lock().unwrap_or_else(|e| e.into_inner());
        // The guard is dropped before reading: a statement of its own.
        let cached = lock().cached(req)?;
        let adapter = match cached {
            Some(a) => a,
            None => {
                let a = Arc::new(LoraAdapter::for_engine(&req.name, &req.path, &self.config)?);
                lock().insert(req.clone(), a.clone());
                a
            }
        };
        Ok(RequestLora {
            id: req.id,
            adapter,
        })
    }

    /// `submit` for a prompt and parameters: returns at once; stream or wait on the handle.
    pub fn generate_async(
        &self,
        prompt_token_ids: Vec<u32>,
        params: GenerationParams,
    ) -> Result<GenerationResult> {
        self.submit(GenerationRequest {
            prompt_token_ids,
            params,
            client_id: None,
            lora: None,
        })
    }

    /// Negative log-likelihood of each of `ids[1..]` given the tokens before it.
    pub fn score(&self, ids: Vec<u32>) -> Result<Vec<f64>> {
        let (reply, rx) = crossbeam_channel::bounded(1);
        self.send(Job::Score { ids, reply })?;
        rx.recv().unwrap_or(Err(ExecutorError::ShutDown))
    }

    /// Checks the KV-cache manager's invariants (every block free, cached or referenced by
    /// exactly its refcount) between two steps and returns where the blocks are.
    pub fn kv_cache_summary(&self) -> Result<KvCacheSummary> {
        let (reply, rx) = crossbeam_channel::bounded(1);
        self.send(Job::KvSummary { reply })?;
        match rx.recv() {
            Ok(Ok(summary)) => Ok(summary),
            Ok(Err(msg)) => Err(ExecutorError::Step(format!(
                "KV-cache invariant broken: {msg}"
            ))),
            Err(_) => Err(ExecutorError::ShutDown),
        }
    }

    /// Requests running and queued and the KV pool's use, as of the end of the current step
    /// (waits at most `timeout` for the step to end).
    pub fn load(&self, timeout: std::time::Duration) -> Result<ExecutorLoad> {
        let (reply, rx) = crossbeam_channel::bounded(1);
        self.send(Job::Load { reply })?;
        rx.recv_timeout(timeout).map_err(|_| {
            ExecutorError::Step(format!(
                "no answer within {timeout:?} (a long step is running)"
            ))
        })
    }

    fn send(&self, job: Job) -> Result<()> {
        let jobs = self.jobs.as_ref().ok_or(ExecutorError::ShutDown)?;
        jobs.send(job).map_err(|_| ExecutorError::ShutDown)
    }

    /// Cancels request `id` if it has not finished; returns whether it was still known.
    pub fn abort_request(&self, id: u64) -> bool {
        let cancels = self.cancels.lock().unwrap_or_else(|e| e.into_inner());
        match cancels.get(&id).and_then(|w| w.upgrade()) {
            Some(flag) => {
                flag.store(true, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// Iteration stats kept since the last call (at most `ExecutorConfig::history`).
    pub fn latest_iteration_stats(&self) -> Vec<IterationStats> {
        self.stats.drain()
    }

    /// Every iteration's stats from now on.
    pub fn subscribe_iteration_stats(&self) -> Receiver<IterationStats> {
        self.stats.subscribe()
    }

    /// KV-cache events kept since the last call (at most `ExecutorConfig::history`).
    pub fn latest_kv_events(&self) -> Vec<KvCacheEvent> {
        self.kv_events.drain()
    }

    /// Every KV-cache event from now on.
    pub fn subscribe_kv_events(&self) -> Receiver<KvCacheEvent> {
        self.kv_events.subscribe()
    }

    /// Stops at the end of the current step: requests in flight or queued fail with
    /// `ShutDown`; then joins the engine loop.
    pub fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.jobs = None;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl Drop for GenerationExecutor {
    fn drop(&mut self) {
        self.shutdown();
    }
}
