//! Picks each step's work: which requests run, how many of their tokens, which wait, which are
//! preempted. It asks the KV-cache manager for blocks; it never touches the model.

use std::collections::VecDeque;
use std::time::Instant;

use trtllm_builder::runtime::KvCacheManager;

use crate::active::ActiveRequest;
use crate::config::StepLimits;
use crate::CapacitySchedulerPolicy;

/// `n_tokens` of request `id`'s pending tokens run in this step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ScheduledChunk {
    pub id: u64,
    pub n_tokens: usize,
}

#[derive(Debug, Default)]
pub(crate) struct Schedule {
    /// In the order of `running`.
    pub chunks: Vec<ScheduledChunk>,
    pub preempted: usize,
    pub reused_blocks: usize,
}

pub(crate) struct Scheduler {
    pub policy: CapacitySchedulerPolicy,
    pub limits: StepLimits,
}

impl Scheduler {
    /// Running requests first, oldest first (preempting the newest when blocks run out), then
    /// admissions from the front of `waiting` while batch slots, tokens and blocks allow.
    pub fn schedule(
        &self,
        running: &mut Vec<ActiveRequest>,
        waiting: &mut VecDeque<ActiveRequest>,
        kv: &mut KvCacheManager,
    ) -> Schedule {
        let mut out = Schedule::default();
        let mut tokens_left = self.limits.max_num_tokens;
        let mut i = 0;
        while i < running.len() && out.chunks.len() < self.limits.max_batch_size && tokens_left > 0
        {
            let (id, computed, n) = {
                let r = &running[i];
                (r.id, r.computed, r.pending().min(tokens_left))
            };
            if kv.ensure_capacity(id, computed + n).is_err() {
                let victim = running.len() - 1;
                preempt(running.remove(victim), kv, waiting);
                out.preempted += 1;
                // When the victim was this request, `i` now names the next one (or none).
                continue;
            }
            out.chunks.push(ScheduledChunk { id, n_tokens: n });
            tokens_left -= n;
            i += 1;
        }
        if out.preempted == 0 {
            self.admit(running, waiting, kv, &mut out, tokens_left);
        }
        let now = Instant::now();
        for r in running.iter_mut() {
            if out.chunks.iter().any(|c| c.id == r.id) {
                r.first_scheduled.get_or_insert(now);
            }
        }
        out
    }

    fn admit(
        &self,
        running: &mut Vec<ActiveRequest>,
        waiting: &mut VecDeque<ActiveRequest>,
        kv: &mut KvCacheManager,
        out: &mut Schedule,
        mut tokens_left: usize,
    ) {
        let mut j = 0;
        while j < waiting.len() && out.chunks.len() < self.limits.max_batch_size && tokens_left > 0
        {
            let r = &waiting[j];
            if !self.fits(r, running, kv, tokens_left) {
                break;
            }
            if self.prefix_in_flight(r, running, kv) {
                // Its prefix is being computed right now by another request: admitted next
                // step, it reuses those blocks instead of computing them again.
                j += 1;
                continue;
            }
            let Some(mut r) = waiting.remove(j) else {
                break;
            };
            let reused = kv.add_sequence(r.id, &r.tokens);
            r.computed = reused;
            let n = r.pending().min(tokens_left);
            if kv.ensure_capacity(r.id, r.computed + n).is_err() {
                kv.free_sequence(r.id);
                r.computed = 0;
                waiting.insert(j, r);
                break;
            }
            r.stats.reused_tokens += reused;
            out.reused_blocks += reused / kv.block_size();
            out.chunks.push(ScheduledChunk {
                id: r.id,
                n_tokens: n,
            });
            tokens_left -= n;
            running.push(r);
        }
    }

    /// Whether the policy lets `r` start now.
    fn fits(
        &self,
        r: &ActiveRequest,
        running: &[ActiveRequest],
        kv: &KvCacheManager,
        tokens_left: usize,
    ) -> bool {
        match self.policy {
            CapacitySchedulerPolicy::GuaranteedNoEvict => {
                let reserved: usize = running
                    .iter()
                    .map(|x| {
                        kv.blocks_for(x.final_len())
                            .saturating_sub(kv.num_blocks_of(x.id))
                    })
                    .sum();
                reserved + kv.blocks_for(r.final_len()) <= kv.available_blocks()
            }
            CapacitySchedulerPolicy::MaxUtilization => {
                let first_chunk = r.tokens.len().min(tokens_left);
                kv.blocks_for(first_chunk) <= kv.available_blocks()
            }
        }
    }

    fn prefix_in_flight(
        &self,
        r: &ActiveRequest,
        running: &[ActiveRequest],
        kv: &KvCacheManager,
    ) -> bool {
        if !kv.reuse_enabled() {
            return false;
        }
        let bs = kv.block_size();
        let cached = kv.cached_prefix_len(&r.tokens);
        let reusable = r.tokens.len().saturating_sub(1) / bs * bs;
        running.iter().filter(|x| x.in_context_phase()).any(|x| {
            let common = r
                .tokens
                .iter()
                .zip(&x.tokens)
                .take_while(|(a, b)| a == b)
                .count();
            common.min(reusable) / bs * bs > cached
        })
    }
}

fn preempt(mut r: ActiveRequest, kv: &mut KvCacheManager, waiting: &mut VecDeque<ActiveRequest>) {
    kv.free_sequence(r.id);
    r.computed = 0;
    r.stats.preemptions += 1;
    waiting.push_front(r);
}
