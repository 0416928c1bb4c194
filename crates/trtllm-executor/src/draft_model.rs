//! The draft-model drafter (TensorRT-LLM's draft-target decoding): a smaller engine with the
//! target's vocabulary proposes K tokens greedily, batched over the step's requests. It keeps its
//! own runner, KV pool and block manager, and per request the tokens its cache holds; each
//! proposal first brings that cache to the request's tokens (after the target kept only part of
//! the last draft, the common prefix stays and the rest is recomputed), then runs K − 1 one-token
//! steps. A drafter that cannot draft (no blocks, a failed pass) proposes nothing: requests
//! never fail because of it.

use std::collections::HashMap;
use std::path::Path;

use trtllm_builder::runtime::{
    argmax, Device, KvCacheConfig, KvCacheManager, KvPool, LogitsMode, ModelConfig, ModelRunner,
    SeqChunk, Session,
};

use crate::speculative::{DraftInput, Drafter};
use crate::{ExecutorError, Result};

pub(crate) struct DraftModel {
    runner: ModelRunner,
    pool: KvPool,
    kv: KvCacheManager,
    /// Per request: the tokens whose keys and values the draft's cache holds.
    held: HashMap<u64, Vec<u32>>,
    max_num_tokens: usize,
    max_batch_size: usize,
    max_seq_len: usize,
}

impl DraftModel {
    /// Opens the draft engine in `dir` on `device`, checking it can draft for `target`.
    pub fn open(
        dir: &Path,
        device: Device,
        kv_cache: &KvCacheConfig,
        target: &ModelConfig,
    ) -> Result<Self> {
        let runner = Session::open(dir)?.model_runner_on(device)?;
        let config = runner.engine_config().clone();
        if config.model.vocab_size != target.vocab_size {
            return Err(ExecutorError::DraftModel(format!(
                "{}: its vocabulary has {} tokens, the target's {}; a draft model must share the \
                 target's tokenizer",
                dir.display(),
                config.model.vocab_size,
                target.vocab_size
            )));
        }
        let build = &config.build;
        let kv_cache = KvCacheConfig {
            // Its blocks are its own: no other sequence ever shares them.
            enable_block_reuse: false,
            ..kv_cache.clone()
        };
        let budget = kv_cache.budget(&config.model, build, build.max_num_tokens)?;
        Ok(Self {
            pool: runner.new_pool(&budget)?,
            kv: KvCacheManager::with_budget(budget, false),
            runner,
            held: HashMap::new(),
            max_num_tokens: build.max_num_tokens.max(1),
            max_batch_size: build.max_batch_size.max(1),
            max_seq_len: build.max_seq_len,
        })
    }

    fn release(&mut self, id: u64) {
        self.kv.free_sequence(id);
        self.held.remove(&id);
    }

    /// Brings request `id`'s cache to `tokens` plus room for `k` drafted positions; false
    /// (and the request released) when the draft engine has no room for it.
    fn prepare(&mut self, id: u64, tokens: &[u32], k: usize) -> bool {
        if tokens.len() + k > self.max_seq_len {
            self.release(id);
            return false;
        }
        let held = self.held.entry(id).or_insert_with(|| {
            self.kv.add_sequence(id, &[]);
            Vec::new()
        });
        // The cache's last token is recomputed anyway when it is the sequence's last: its row
        // gives the first draft.
        let common = held
            .iter()
            .zip(tokens)
            .take_while(|(a, b)| a == b)
            .count()
            .min(tokens.len() - 1);
        held.truncate(common);
        if self.kv.ensure_capacity(id, tokens.len() + k - 1).is_err() {
            self.release(id);
            return false;
        }
        true
    }

    /// One batched pass: each `(id, tokens)` appended to its cache; the last row of those
    /// that `want` a row, in order.
    fn pass(&mut self, work: &[(u64, Vec<u32>, bool)]) -> Result<Vec<f32>> {
        let tables: Vec<_> = work
            .iter()
            .map(|(id, ..)| self.kv.block_tables(*id))
            .collect();
        let batch: Vec<SeqChunk<'_>> = work
            .iter()
            .zip(&tables)
            .map(|((id, tokens, want), blocks)| SeqChunk {
                tokens,
                past: self.held[id].len(),
                blocks,
                logits: if *want {
                    LogitsMode::Last
                } else {
                    LogitsMode::Skip
                },
                lora: None,
            })
            .collect();
        let rows = self.runner.forward_batch(&batch, &mut self.pool)?;
        for (id, tokens, _) in work {
            if let Some(h) = self.held.get_mut(id) {
                h.extend(tokens);
            }
        }
        Ok(rows)
    }

    /// Appends `pending[i]` to sequence `ids[i]`'s cache in passes within the engine's limits,
    /// and returns each sequence's greedy next token.
    fn extend(&mut self, ids: &[u64], mut pending: Vec<Vec<u32>>) -> Result<Vec<u32>> {
        let vocab = self.runner.model().vocab_size;
        let mut next = vec![0; ids.len()];
        while pending.iter().any(|p| !p.is_empty()) {
            let mut work = Vec::new();
            let mut who = Vec::new();
            let mut left = self.max_num_tokens;
            for (i, p) in pending.iter_mut().enumerate() {
                if p.is_empty() || left == 0 || work.len() == self.max_batch_size {
                    continue;
                }
                let n = p.len().min(left);
                let rest = p.split_off(n);
                let last = rest.is_empty();
                work.push((ids[i], std::mem::replace(p, rest), last));
                if last {
                    who.push(i);
                }
                left -= n;
            }
            let rows = self.pass(&work)?;
            for (&i, row) in who.iter().zip(rows.chunks_exact(vocab)) {
                next[i] = argmax(row);
            }
        }
        Ok(next)
    }

    fn draft(&mut self, seqs: &[DraftInput<'_>]) -> Result<Vec<Vec<u32>>> {
        let mut drafts = vec![Vec::new(); seqs.len()];
        let mut ids = Vec::new();
        let mut pending = Vec::new();
        let mut index = Vec::new();
        for (i, s) in seqs.iter().enumerate() {
            if s.max > 0 && !s.tokens.is_empty() && self.prepare(s.id, s.tokens, s.max) {
                ids.push(s.id);
                pending.push(s.tokens[self.held[&s.id].len()..].to_vec());
                index.push(i);
            }
        }
        let mut next = self.extend(&ids, pending)?;
        for step in 0.. {
            for (j, &i) in index.iter().enumerate() {
                if drafts[i].len() == step && step < seqs[i].max {
                    drafts[i].push(next[j]);
                }
            }
            // Who needs another token: those whose draft is still short.
            let more: Vec<usize> = (0..index.len())
                .filter(|&j| drafts[index[j]].len() == step + 1 && step + 1 < seqs[index[j]].max)
                .collect();
            if more.is_empty() {
                break;
            }
            let more_ids: Vec<u64> = more.iter().map(|&j| ids[j]).collect();
            let feed = more.iter().map(|&j| vec![next[j]]).collect();
            let got = self.extend(&more_ids, feed)?;
            for (&j, t) in more.iter().zip(got) {
                next[j] = t;
            }
        }
        Ok(drafts)
    }
}

impl Drafter for DraftModel {
    fn propose(&mut self, seqs: &[DraftInput<'_>]) -> Vec<Vec<u32>> {
        // Requests not drafted for this step (finished, cancelled, preempted, on their last
        // token) give their blocks back; one that comes back is recomputed.
        let live: Vec<u64> = seqs.iter().map(|s| s.id).collect();
        let gone: Vec<u64> = self
            .held
            .keys()
            .copied()
            .filter(|id| !live.contains(id))
            .collect();
        for id in gone {
            self.release(id);
        }
        match self.draft(seqs) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(
                    "the draft model failed a pass ({e}); this step runs without drafts"
                );
                for id in live {
                    self.release(id);
                }
                vec![Vec::new(); seqs.len()]
            }
        }
    }
}
