//! A beam-search request inside the engine loop: after its prompt, each running beam is a KV
//! sequence of its own, all decoding one token per step in the same pass. After each step the
//! beams that continue a beam take over its sequence (the first) or fork it (the others: full
//! blocks shared, the partial block copied), and beams nobody continues are released.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};

use trtllm_builder::runtime::{
    Beam, BeamParams, FinishReason, KvCacheManager, KvPool, ModelRunner,
};

use crate::beam::{BeamConfig, BeamSearch};
use crate::ExecutorError;

/// KV sequence ids of beams, from a range request ids never reach.
static NEXT_SEQ: AtomicU64 = AtomicU64::new(1 << 62);

pub(crate) struct BeamState {
    pub params: BeamParams,
    search: Option<BeamSearch>,
    /// The KV sequence of each running beam, in `search.running()` order; empty until the
    /// prompt is done.
    seqs: Vec<u64>,
    /// The search's result, once it is done.
    pub beams: Option<Vec<Beam>>,
}

/// Where a beam step left the search.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BeamStep {
    Running,
    Done(FinishReason),
    /// The pool had no block for a fork: the search must start again later (preempted), its
    /// sequences as they were before the step.
    OutOfBlocks,
}

/// What a beam step needs from the engine loop.
pub(crate) struct BeamCtx<'a> {
    pub kv: &'a mut KvCacheManager,
    pub runner: &'a ModelRunner,
    pub pool: &'a mut KvPool,
    /// End-of-sequence and stop tokens.
    pub eos: Vec<u32>,
    pub max_new_tokens: usize,
}

impl BeamState {
    pub fn new(params: BeamParams) -> Self {
        Self {
            params,
            search: None,
            seqs: Vec::new(),
            beams: None,
        }
    }

    /// Decoding its beams (the prompt is done and the search is not).
    pub fn decoding(&self) -> bool {
        !self.seqs.is_empty()
    }

    pub fn seqs(&self) -> &[u64] {
        &self.seqs
    }

    /// Each running beam's pending token (its newest, not yet in the cache).
    pub fn pending_tokens(&self) -> Vec<u32> {
        self.search.as_ref().map_or_else(Vec::new, |s| {
            s.running()
                .iter()
                .map(|b| b.last().copied().unwrap_or(0))
                .collect()
        })
    }

    /// Positions in each beam's cache before its pending token.
    pub fn past(&self, prompt_len: usize) -> usize {
        prompt_len + self.search.as_ref().map_or(0, |s| s.generated()) - 1
    }

    /// Back to before the prompt (a preemption): the search restarts, and gives the same beams.
    pub fn reset(&mut self, kv: &mut KvCacheManager) {
        for &s in &self.seqs {
            kv.free_sequence(s);
        }
        self.seqs.clear();
        self.search = None;
    }

    /// Advances the search by one token from `rows` (the prompt's last row when it starts, else
    /// one per running beam) and moves the beams' KV sequences after it. `prompt_seq` holds the
    /// prompt's cache until the first step.
    pub fn step(
        &mut self,
        rows: &[&[f32]],
        (prompt_seq, prompt_len): (u64, usize),
        ctx: BeamCtx<'_>,
    ) -> Result<BeamStep, ExecutorError> {
        if let Some((i, row)) = rows
            .iter()
            .enumerate()
            .find(|(_, r)| r.iter().any(|l| l.is_nan() || *l == f32::INFINITY))
        {
            return Err(ExecutorError::Step(format!(
                "the model produced a non-finite logit in beam {i}'s row of {} logits; the \
                 engine's weights or activations are broken",
                row.len()
            )));
        }
        let width = self.params.width;
        let (prev, rows): (Vec<u64>, Vec<&[f32]>) = match &self.search {
            Some(_) => (self.seqs.clone(), rows.to_vec()),
            // Every beam starts from the prompt (transformers' first step: only beam 0 counts).
            None => {
                self.search = Some(BeamSearch::new(BeamConfig {
                    width,
                    length_penalty: self.params.length_penalty,
                    early_stopping: self.params.early_stopping,
                    max_new_tokens: ctx.max_new_tokens,
                    eos: ctx.eos.clone(),
                }));
                (vec![prompt_seq; width], vec![rows[0]; width])
            }
        };
        let search = self.search.as_mut().expect("started above");
        let len = prompt_len + search.generated();
        let parents = search.step(&rows);
        let Some(seqs) = move_sequences(&prev, &parents, len, ctx.kv, (ctx.runner, ctx.pool))?
        else {
            return Ok(BeamStep::OutOfBlocks);
        };
        self.seqs = seqs;
        if !search.is_done() {
            return Ok(BeamStep::Running);
        }
        let beams = self.search.take().expect("running").finish();
        let stopped = beams
            .first()
            .and_then(|b| b.tokens.last())
            .is_some_and(|t| ctx.eos.contains(t));
        self.beams = Some(beams);
        Ok(BeamStep::Done(if stopped {
            FinishReason::Stop
        } else {
            FinishReason::Length
        }))
    }
}

/// The new beams' KV sequences: beam `i` continues `prev[parents[i]]`, whose cache holds `len`
/// positions. The first beam to continue a sequence takes it; the others fork it; sequences no
/// beam continues are released. Block copies are made before returning. None when a fork finds
/// no block (the forks made are released).
fn move_sequences(
    prev: &[u64],
    parents: &[usize],
    len: usize,
    kv: &mut KvCacheManager,
    (runner, pool): (&ModelRunner, &mut KvPool),
) -> Result<Option<Vec<u64>>, ExecutorError> {
    // Sequences no beam continues go first, so their blocks serve the forks.
    let continued: HashSet<u64> = parents.iter().map(|&p| prev[p]).collect();
    let unused: HashSet<u64> = prev
        .iter()
        .copied()
        .filter(|s| !continued.contains(s))
        .collect();
    for &s in &unused {
        kv.free_sequence(s);
    }
    let mut taken = HashSet::new();
    let mut seqs = Vec::with_capacity(parents.len());
    let mut copies = Vec::new();
    for &p in parents {
        let parent = prev[p];
        if taken.insert(parent) {
            seqs.push(parent);
            continue;
        }
        let child = NEXT_SEQ.fetch_add(1, Ordering::Relaxed);
        match kv.fork(parent, child, len) {
            Ok(c) => copies.extend(c),
            Err(_) => {
                for &s in seqs.iter().filter(|s| !prev.contains(s)) {
                    kv.free_sequence(s);
                }
                return Ok(None);
            }
        }
        seqs.push(child);
    }
    runner.copy_blocks(pool, &copies)?;
    Ok(Some(seqs))
}
