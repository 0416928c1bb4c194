//! The engine loop: the one thread that owns the model runner, the KV pool and the KV-cache
//! manager. Each iteration takes new jobs, drops cancelled requests, asks the scheduler for a
//! step, runs it as one batched forward pass, samples, streams tokens and reports stats.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use trtllm_builder::runtime::{
    panic_message, FinishReason, KvCacheEvent, KvCacheManager, KvCacheSummary, KvPool, LogitsMode,
    ModelRunner, SeqChunk,
};

use crate::active::ActiveRequest;
use crate::beam_request::{BeamCtx, BeamStep};
use crate::lora::ResidentLoras;
use crate::scheduler::{preempt, Schedule, Scheduler};
use crate::speculative::{DraftInput, Drafter};
use crate::{
    ExecutorError, ExecutorLoad, IterationStats, LogitsProcessor, Result, SpeculativeTotals,
};

pub(crate) enum Job {
    Submit(Box<ActiveRequest>),
    /// Per-token negative log-likelihoods of a sequence (perplexity).
    Score {
        ids: Vec<u32>,
        reply: Sender<Result<Vec<f64>>>,
    },
    /// The pool's state after an invariant check.
    KvSummary {
        reply: Sender<std::result::Result<KvCacheSummary, String>>,
    },
    /// Requests running and queued, and where the blocks are.
    Load {
        reply: Sender<ExecutorLoad>,
    },
}

pub(crate) struct EngineLoop {
    pub runner: ModelRunner,
    pub pool: KvPool,
    pub kv: KvCacheManager,
    pub scheduler: Scheduler,
    pub jobs: Receiver<Job>,
    pub stop: Arc<AtomicBool>,
    pub stats: Sender<IterationStats>,
    pub kv_events: Sender<KvCacheEvent>,
    pub running: Vec<ActiveRequest>,
    pub waiting: VecDeque<ActiveRequest>,
    pub iteration: u64,
    /// Speculative decoding's drafter and its longest draft, when configured.
    pub drafter: Option<(Box<dyn Drafter>, usize)>,
    pub speculative: SpeculativeTotals,
    /// The LoRA adapters on the runner's device.
    pub loras: ResidentLoras,
}

impl EngineLoop {
    pub fn run(mut self) {
        while self.intake() && !self.stop.load(Ordering::Relaxed) {
            self.drop_cancelled();
            if self.running.is_empty() && self.waiting.is_empty() {
                continue;
            }
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| self.step())) {
                let msg = panic_message(panic.as_ref()).unwrap_or_else(|| "panic".into());
                // The step's state is unknown: start the block accounting afresh (so releasing
                // cannot trip over it) and fail everything in flight.
                self.kv =
                    KvCacheManager::with_budget(self.kv.budget().clone(), self.kv.reuse_enabled());
                self.fail_all(|| ExecutorError::Step(msg.clone()));
            }
        }
        self.fail_all(|| ExecutorError::ShutDown);
    }

    /// Takes every queued job, blocking while idle. False once the executor is gone.
    fn intake(&mut self) -> bool {
        let idle = self.running.is_empty() && self.waiting.is_empty();
        let mut next = if idle {
            match self.jobs.recv() {
                Ok(job) => Some(job),
                Err(_) => return false,
            }
        } else {
            None
        };
        loop {
            let job = match next.take() {
                Some(job) => job,
                None => match self.jobs.try_recv() {
                    Ok(job) => job,
                    Err(TryRecvError::Empty) => return true,
                    Err(TryRecvError::Disconnected) => return !idle,
                },
            };
            self.handle(job);
        }
    }

    fn handle(&mut self, job: Job) {
        match job {
            Job::Submit(r) => {
                if r.budget == 0 {
                    r.finish(FinishReason::Length);
                } else {
                    self.waiting.push_back(*r);
                }
            }
            Job::Score { ids, reply } => {
                let _ = reply.send(self.runner.score(&ids).map_err(ExecutorError::from));
            }
            Job::KvSummary { reply } => {
                let _ = reply.send(self.kv.check_invariants());
            }
            Job::Load { reply } => {
                let _ = reply.send(ExecutorLoad {
                    running: self.running.len(),
                    waiting: self.waiting.len(),
                    kv: self.kv.summary(),
                    speculative: self.speculative,
                });
            }
        }
    }

    fn drop_cancelled(&mut self) {
        let kv = &mut self.kv;
        for r in extract(&mut self.running, |r| r.cancelled()) {
            r.free_kv(kv);
            r.finish(FinishReason::Cancelled);
        }
        let waiting = std::mem::take(&mut self.waiting);
        let (gone, kept): (Vec<_>, Vec<_>) = waiting.into_iter().partition(|r| r.cancelled());
        self.waiting = kept.into();
        for r in gone {
            r.finish(FinishReason::Cancelled);
        }
    }

    fn step(&mut self) {
        let start = Instant::now();
        self.propose_drafts();
        let mut schedule =
            self.scheduler
                .schedule(&mut self.running, &mut self.waiting, &mut self.kv);
        self.place_loras(&mut schedule);
        if schedule.chunks.is_empty() {
            return;
        }
        let mut stats = IterationStats {
            iteration: self.iteration,
            batch_size: schedule.chunks.len(),
            preempted_requests: schedule.preempted,
            reused_blocks: schedule.reused_blocks,
            ..Default::default()
        };
        self.iteration += 1;
        match self.forward_and_prepare(&schedule) {
            Ok(logits) => self.apply(&schedule, &logits, &mut stats),
            Err(e) => {
                let ids: Vec<u64> = schedule.chunks.iter().map(|c| c.id).collect();
                let kv = &mut self.kv;
                for r in extract(&mut self.running, |r| ids.contains(&r.id)) {
                    r.free_kv(kv);
                    r.fail(ExecutorError::Step(e.to_string()));
                }
            }
        }
        stats.paused_requests = self.running.len().saturating_sub(schedule.chunks.len());
        stats.queued_requests = self.waiting.len();
        stats.kv = self.kv.summary();
        stats.kv_groups = self.kv.group_summaries();
        stats.iteration_time_ms = start.elapsed().as_secs_f64() * 1e3;
        for ev in self.kv.take_events() {
            let _ = self.kv_events.send(ev);
        }
        let _ = self.stats.send(stats);
    }

    /// Puts the LoRA adapters of the step's requests on the device. A request whose adapter
    /// cannot be placed fails alone and leaves the step.
    fn place_loras(&mut self, schedule: &mut Schedule) {
        let in_use: Vec<u64> = self.running.iter().filter_map(|r| r.lora_id()).collect();
        let mut failed = Vec::new();
        for c in &schedule.chunks {
            let lora = self
                .running
                .iter()
                .find(|r| r.id == c.id)
                .and_then(|r| r.lora.as_ref());
            if let Some(l) = lora {
                if let Err(e) = self.loras.ensure(&self.runner, l, &in_use) {
                    failed.push((c.id, e));
                }
            }
        }
        for (id, e) in failed {
            schedule.chunks.retain(|c| c.id != id);
            for r in extract(&mut self.running, |r| r.id == id) {
                r.free_kv(&mut self.kv);
                r.fail(ExecutorError::Step(e.to_string()));
            }
        }
    }

    /// Drafts for the decoding requests, each at most what its budget leaves after the token
    /// the verifying pass adds anyway (so drafts stay inside the KV room admission reserved).
    fn propose_drafts(&mut self) {
        let Some((drafter, max_len)) = &mut self.drafter else {
            return;
        };
        // (index in `running`, most draft tokens) of each request to draft for.
        let asks: Vec<(usize, usize)> = self
            .running
            .iter()
            .enumerate()
            .filter(|(_, r)| r.decoding())
            .map(|(i, r)| {
                (
                    i,
                    r.budget.saturating_sub(r.output().len() + 1).min(*max_len),
                )
            })
            .filter(|&(_, max)| max > 0)
            .collect();
        if asks.is_empty() {
            return;
        }
        let inputs: Vec<DraftInput<'_>> = asks
            .iter()
            .map(|&(i, max)| DraftInput {
                id: self.running[i].id,
                tokens: &self.running[i].tokens,
                max,
            })
            .collect();
        let drafts = drafter.propose(&inputs);
        for (&(i, max), mut draft) in asks.iter().zip(drafts) {
            draft.truncate(max);
            self.running[i].draft = draft;
        }
    }

    /// Runs the step's forward pass while another thread prepares the logits processors of
    /// the requests that sample this step (a grammar's mask then costs no step time).
    fn forward_and_prepare(&mut self, schedule: &Schedule) -> Result<Vec<f32>> {
        let mut prepare: Vec<(u64, Vec<u32>, Box<dyn LogitsProcessor>)> = Vec::new();
        for c in &schedule.chunks {
            let Some(r) = self.running.iter_mut().find(|r| r.id == c.id) else {
                continue;
            };
            if r.computed + c.n_tokens >= r.tokens.len() {
                if let Some(p) = r.processor.take() {
                    prepare.push((r.id, r.output().to_vec(), p));
                }
            }
        }
        if prepare.is_empty() {
            return self.forward(schedule);
        }
        let ids: Vec<u64> = prepare.iter().map(|x| x.0).collect();
        let (logits, prepared) = std::thread::scope(|s| {
            let helper = s.spawn(move || {
                for (_, output, p) in &mut prepare {
                    p.prepare(output);
                }
                prepare
            });
            let logits = self.forward(schedule);
            (logits, helper.join())
        });
        let prepared: Vec<(u64, Box<dyn LogitsProcessor>)> = match prepared {
            Ok(all) => all.into_iter().map(|(id, _, p)| (id, p)).collect(),
            // The processors went down with their thread: their requests fail as they sample,
            // never sample unconstrained.
            Err(_) => ids
                .into_iter()
                .map(|id| (id, Box::new(Lost) as _))
                .collect(),
        };
        for (id, p) in prepared {
            if let Some(r) = self.running.iter_mut().find(|r| r.id == id) {
                r.processor = Some(p);
            }
        }
        logits
    }

    fn forward(&mut self, schedule: &Schedule) -> Result<Vec<f32>> {
        let mut running = Vec::with_capacity(schedule.chunks.len());
        for c in &schedule.chunks {
            let r =
                self.running.iter().find(|r| r.id == c.id).ok_or_else(|| {
                    ExecutorError::Step(format!("request {} is not running", c.id))
                })?;
            running.push(r);
        }
        // (tokens, past, KV sequence, logits, adapter) of every sequence: a beam search has one
        // per beam.
        let mut seqs = Vec::with_capacity(running.len());
        for (r, c) in running.iter().zip(&schedule.chunks) {
            let lora = r.lora_id().and_then(|id| self.loras.get(id));
            match &r.beam {
                Some(b) if b.decoding() => {
                    let past = b.past(r.prompt_len);
                    for (&s, t) in b.seqs().iter().zip(b.pending_tokens()) {
                        seqs.push((vec![t], past, s, LogitsMode::Last, lora));
                    }
                }
                _ => seqs.push((
                    r.chunk_tokens(c.n_tokens),
                    r.computed,
                    r.id,
                    r.logits_mode(c.n_tokens),
                    lora,
                )),
            }
        }
        let tables: Vec<_> = seqs.iter().map(|s| self.kv.block_tables(s.2)).collect();
        let batch: Vec<SeqChunk<'_>> = seqs
            .iter()
            .zip(&tables)
            .map(|((tokens, past, _, logits, lora), blocks)| SeqChunk {
                tokens,
                past: *past,
                blocks,
                logits: *logits,
                lora: *lora,
            })
            .collect();
        Ok(self.runner.forward_batch(&batch, &mut self.pool)?)
    }

    /// Advances every scheduled request by its chunk and samples where a prompt or decode
    /// step completed.
    fn apply(&mut self, schedule: &Schedule, logits: &[f32], stats: &mut IterationStats) {
        let vocab = self.runner.model().vocab_size;
        let eos = &self.runner.model().eos_token_ids;
        let mut rows = logits.chunks_exact(vocab);
        let mut finished = Vec::new();
        // Beam searches whose forks found no block: preempted, to start again.
        let mut out_of_blocks = Vec::new();
        for c in &schedule.chunks {
            let Some(r) = self.running.iter_mut().find(|r| r.id == c.id) else {
                continue;
            };
            if r.beam_decoding() {
                stats.generation_requests += 1;
                stats.generation_tokens += c.n_tokens;
                let chunk_rows: Vec<&[f32]> = rows.by_ref().take(c.n_tokens).collect();
                let ctx = beam_ctx(r, (&mut self.kv, &self.runner, &mut self.pool), eos);
                let step = r.beam_step(&chunk_rows, ctx);
                sort_beam_step(r.id, step, (&mut finished, &mut out_of_blocks));
                continue;
            }
            if r.in_context_phase() {
                stats.context_requests += 1;
                stats.context_tokens += c.n_tokens;
                r.stats.context_tokens_computed += c.n_tokens;
            } else {
                stats.generation_requests += 1;
                stats.generation_tokens += c.n_tokens;
            }
            let (mode, from) = (r.logits_mode(c.n_tokens), r.computed);
            let in_context = r.in_context_phase();
            let mut draft = std::mem::take(&mut r.draft);
            draft.truncate(c.n_tokens.saturating_sub(r.pending()));
            r.computed += c.n_tokens - draft.len();
            let n_rows = match mode {
                LogitsMode::Skip => 0,
                LogitsMode::Last => 1,
                LogitsMode::All => c.n_tokens,
            };
            let chunk_rows: Vec<&[f32]> = rows.by_ref().take(n_rows).collect();
            if chunk_rows.len() < n_rows {
                finished.push((r.id, Err(ExecutorError::Step("missing logits row".into()))));
                continue;
            }
            if mode == LogitsMode::All && in_context {
                r.take_prompt_rows(from, &chunk_rows);
            }
            if r.computed < r.tokens.len() {
                self.kv.commit(r.id, &r.tokens, r.computed);
                continue;
            }
            if r.beam.is_some() {
                // The prompt is done: the beams start from its last row.
                self.kv.commit(r.id, &r.tokens, r.computed);
                r.first_token.get_or_insert_with(Instant::now);
                let ctx = beam_ctx(r, (&mut self.kv, &self.runner, &mut self.pool), eos);
                let step = r.beam_step(&chunk_rows[chunk_rows.len() - 1..], ctx);
                sort_beam_step(r.id, step, (&mut finished, &mut out_of_blocks));
                continue;
            }
            // The last computed token's row, then one per drafted token.
            let Some(first) = chunk_rows.len().checked_sub(draft.len() + 1) else {
                finished.push((r.id, Err(ExecutorError::Step("missing logits row".into()))));
                continue;
            };
            let computed_before = r.computed;
            let outcome = r.sample_rows(&chunk_rows[first..], &draft, eos);
            if !draft.is_empty() {
                // Each kept draft token moved `computed` past it.
                let accepted = r.computed - computed_before;
                stats.draft_tokens += draft.len();
                stats.accepted_draft_tokens += accepted;
                self.speculative.drafts += 1;
                self.speculative.draft_tokens += draft.len() as u64;
                self.speculative.accepted_draft_tokens += accepted as u64;
            }
            self.kv.commit(r.id, &r.tokens, r.computed);
            match outcome {
                Ok(None) => {}
                Ok(Some(reason)) => finished.push((r.id, Ok(reason))),
                Err(e) => finished.push((r.id, Err(e))),
            }
        }
        for id in out_of_blocks {
            for r in extract(&mut self.running, |r| r.id == id) {
                stats.preempted_requests += 1;
                preempt(r, &mut self.kv, &mut self.waiting);
            }
        }
        for (id, outcome) in finished {
            let kv = &mut self.kv;
            // Ids are unique: at most one request.
            if let Some(r) = extract(&mut self.running, |r| r.id == id).pop() {
                r.free_kv(kv);
                match outcome {
                    Ok(reason) => r.finish(reason),
                    Err(e) => r.fail(e),
                }
            }
        }
    }

    fn fail_all(&mut self, error: impl Fn() -> ExecutorError) {
        for r in self.running.drain(..).chain(self.waiting.drain(..)) {
            r.free_kv(&mut self.kv);
            r.fail(error());
        }
    }
}

/// A finished or failed beam search joins `finished`; one whose fork found no block, `preempt`.
fn sort_beam_step(
    id: u64,
    step: Result<BeamStep>,
    (finished, preempt): (&mut Vec<(u64, Result<FinishReason>)>, &mut Vec<u64>),
) {
    match step {
        Ok(BeamStep::Running) => {}
        Ok(BeamStep::Done(reason)) => finished.push((id, Ok(reason))),
        Ok(BeamStep::OutOfBlocks) => preempt.push(id),
        Err(e) => finished.push((id, Err(e))),
    }
}

/// What request `r`'s beam step needs from the loop.
fn beam_ctx<'a>(
    r: &ActiveRequest,
    (kv, runner, pool): (&'a mut KvCacheManager, &'a ModelRunner, &'a mut KvPool),
    eos: &[u32],
) -> BeamCtx<'a> {
    BeamCtx {
        kv,
        runner,
        pool,
        eos: r.params.end_tokens(eos),
        max_new_tokens: r.budget,
    }
}

/// Stands in for a logits processor that panicked while preparing.
struct Lost;

impl LogitsProcessor for Lost {
    fn process(&mut self, _: &[u32], _: &mut [f32]) -> std::result::Result<(), String> {
        Err("the logits processor panicked while preparing its step".into())
    }

    fn accept(&mut self, _: u32) -> std::result::Result<(), String> {
        Ok(())
    }
}

/// Removes and returns the elements matching `pred`, keeping the others in order.
fn extract<T>(v: &mut Vec<T>, pred: impl Fn(&T) -> bool) -> Vec<T> {
    let (out, keep): (Vec<T>, Vec<T>) = std::mem::take(v).into_iter().partition(|x| pred(x));
    *v = keep;
    out
}
