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
            if running[i].beam_decoding() {
                // One token per beam; a search that does not fit the step's tokens waits.
                let (id, width) = (running[i].id, running[i].width());
                if width <= tokens_left {
                    if !grow_beams(&running[i], kv) {
                        preempt(running.remove(running.len() - 1), kv, waiting);
                        out.preempted += 1;
                        continue;
                    }
                    running[i].first_scheduled.get_or_insert_with(Instant::now);
                    tokens_left -= width;
                    out.chunks.push(ScheduledChunk {
                        id,
                        n_tokens: width,
                    });
                }
                i += 1;
                continue;
            }
            let (id, computed, n) = {
                let r = &mut running[i];
                let n = (r.pending() + r.draft.len()).min(tokens_left);
                // A draft past the step's token budget is cut, never the pending tokens.
                r.draft.truncate(n.saturating_sub(r.pending()));
                (r.id, r.computed, n)
            };
            if kv.ensure_capacity(id, computed + n).is_err() {
                if !running[i].draft.is_empty() {
                    // No request is preempted for a draft's blocks: this one runs without.
                    running[i].draft.clear();
                    continue;
                }
                let victim = running.len() - 1;
                preempt(running.remove(victim), kv, waiting);
                out.preempted += 1;
                // When the victim was this request, `i` now names the next one (or none).
                continue;
            }
            running[i].first_scheduled.get_or_insert_with(Instant::now);
            out.chunks.push(ScheduledChunk { id, n_tokens: n });
            tokens_left -= n;
            i += 1;
        }
        if out.preempted == 0 {
            self.admit(running, waiting, kv, &mut out, tokens_left);
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
            if !self.adapter_fits(r, running) {
                // One more distinct adapter than the device holds: it waits for one to finish.
                j += 1;
                continue;
            }
            if !r.needs_prompt_logits() && self.prefix_in_flight(r, running, kv) {
                // Its prefix is being computed right now by another request: admitted next
                // step, it reuses those blocks instead of computing them again.
                j += 1;
                continue;
            }
            let Some(mut r) = waiting.remove(j) else {
                break;
            };
            // A request that wants its prompt's log-probabilities computes the prompt whole.
            let reusable = if r.needs_prompt_logits() {
                &[][..]
            } else {
                &r.tokens[..]
            };
            let reused = kv.add_salted_sequence(r.id, reusable, r.lora_id());
            r.computed = reused;
            let n = r.pending().min(tokens_left);
            if kv.ensure_capacity(r.id, r.computed + n).is_err() {
                kv.free_sequence(r.id);
                r.computed = 0;
                waiting.insert(j, r);
                break;
            }
            r.first_scheduled.get_or_insert_with(Instant::now);
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
        let budget = kv.budget();
        match self.policy {
            CapacitySchedulerPolicy::GuaranteedNoEvict => {
                // What every running request may still take at its peak, per KV group.
                // A beam search is budgeted as its beams at their longest, each on its own
                // blocks (shared prompt blocks make that an upper bound).
                let peak = |x: &ActiveRequest| -> Vec<usize> {
                    let one = budget.peak_blocks(x.final_len());
                    one.into_iter().map(|b| b * x.width()).collect()
                };
                let mut reserved = vec![0; budget.groups.len()];
                for x in running {
                    let held = kv.held_by(&x.seq_ids());
                    for ((res, p), held) in reserved.iter_mut().zip(peak(x)).zip(held) {
                        *res += p.saturating_sub(held);
                    }
                }
                kv.has_room(&reserved, &peak(r))
            }
            CapacitySchedulerPolicy::MaxUtilization => {
                let first_chunk = r.tokens.len().min(tokens_left);
                let none = vec![0; budget.groups.len()];
                kv.has_room(&none, &budget.peak_blocks(first_chunk))
            }
        }
    }

    /// Whether `r`'s LoRA adapter is one the running requests use, or there is room for one
    /// more (`max_loras` distinct adapters at once).
    fn adapter_fits(&self, r: &ActiveRequest, running: &[ActiveRequest]) -> bool {
        let Some(id) = r.lora_id() else {
            return true;
        };
        let mut active: Vec<u64> = running.iter().filter_map(|x| x.lora_id()).collect();
        active.sort_unstable();
        active.dedup();
        active.contains(&id) || active.len() < self.limits.max_loras
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
        let cached = kv.cached_prefix_len(&r.tokens, r.lora_id());
        let reusable = r.tokens.len().saturating_sub(1) / bs * bs;
        let same = |x: &&ActiveRequest| x.in_context_phase() && x.lora_id() == r.lora_id();
        running.iter().filter(same).any(|x| {
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

/// Grows each beam's sequence of a decoding beam search by the position this step writes;
/// false when the blocks run out.
fn grow_beams(r: &ActiveRequest, kv: &mut KvCacheManager) -> bool {
    let Some(past) = r.beam.as_ref().map(|b| b.past(r.prompt_len)) else {
        return false;
    };
    r.seq_ids()
        .iter()
        .all(|&s| kv.ensure_capacity(s, past + 1).is_ok())
}

/// Releases `r`'s blocks and queues it first to compute again from its tokens.
pub(crate) fn preempt(
    mut r: ActiveRequest,
    kv: &mut KvCacheManager,
    waiting: &mut VecDeque<ActiveRequest>,
) {
    r.free_kv(kv);
    if let Some(b) = &mut r.beam {
        b.reset(kv);
    }
    r.computed = 0;
    r.draft.clear();
    r.stats.preemptions += 1;
    waiting.push_front(r);
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    use trtllm_builder::runtime::{GenerationParams, Sampler, SamplingConfig};

    use super::*;

    fn request(id: u64, prompt_len: usize, budget: usize) -> ActiveRequest {
        let (tx, _) = crossbeam_channel::unbounded();
        ActiveRequest::new(
            id,
            (0..prompt_len as u32)
                .map(|t| t + id as u32 * 1000)
                .collect(),
            GenerationParams::default(),
            budget,
            Sampler::new(SamplingConfig::default(), &[]).unwrap(),
            tx,
            Arc::new(AtomicBool::new(false)),
        )
    }

    fn chunk(id: u64, n_tokens: usize) -> ScheduledChunk {
        ScheduledChunk { id, n_tokens }
    }

    fn scheduler(policy: CapacitySchedulerPolicy, batch: usize, tokens: usize) -> Scheduler {
        Scheduler {
            policy,
            limits: StepLimits {
                max_loras: 4,
                max_batch_size: batch,
                max_num_tokens: tokens,
            },
        }
    }

    /// Marks every scheduled chunk as computed and samples a dummy token where one is due.
    fn run_step(s: &Schedule, running: &mut [ActiveRequest]) {
        for c in &s.chunks {
            let r = running.iter_mut().find(|r| r.id == c.id).unwrap();
            r.computed += c.n_tokens;
            if r.computed == r.tokens.len() {
                r.tokens.push(7);
            }
        }
    }

    #[test]
    fn chunked_prefill_shares_the_token_budget_with_decodes() {
        let sched = scheduler(CapacitySchedulerPolicy::GuaranteedNoEvict, 8, 64);
        let mut kv = KvCacheManager::new(64, 16, false);
        let (mut running, mut waiting) = (Vec::new(), VecDeque::from([request(1, 10, 4)]));
        let s = sched.schedule(&mut running, &mut waiting, &mut kv);
        run_step(&s, &mut running);
        waiting.push_back(request(2, 150, 4));
        let s = sched.schedule(&mut running, &mut waiting, &mut kv);
        // Request 1 decodes one token; request 2 gets the 63 tokens left of the budget.
        assert_eq!(s.chunks, [chunk(1, 1), chunk(2, 63)]);
    }

    #[test]
    fn no_evict_admits_only_what_can_finish() {
        let sched = scheduler(CapacitySchedulerPolicy::GuaranteedNoEvict, 8, 1024);
        // 10 blocks of 16: each request needs (40 + 40) / 16 = 5 over its life.
        let mut kv = KvCacheManager::new(10, 16, false);
        let mut waiting: VecDeque<_> = (1..=3).map(|id| request(id, 40, 40)).collect();
        let mut running = Vec::new();
        let s = sched.schedule(&mut running, &mut waiting, &mut kv);
        assert_eq!(s.chunks.len(), 2);
        assert_eq!(waiting.len(), 1);
    }

    #[test]
    fn max_utilization_preempts_the_newest_and_it_comes_back_first() {
        let sched = scheduler(CapacitySchedulerPolicy::MaxUtilization, 8, 1024);
        // 4 blocks of 16; two 31-token prompts take 2 blocks each and fill the pool.
        let mut kv = KvCacheManager::new(4, 16, false);
        let mut waiting: VecDeque<_> = (1..=2).map(|id| request(id, 31, 10)).collect();
        let mut running = Vec::new();
        let s = sched.schedule(&mut running, &mut waiting, &mut kv);
        assert_eq!(s.chunks.len(), 2);
        run_step(&s, &mut running);
        // Position 31 still fits in two blocks ...
        let s = sched.schedule(&mut running, &mut waiting, &mut kv);
        assert_eq!((s.chunks.len(), s.preempted), (2, 0));
        run_step(&s, &mut running);
        // ... position 32 needs a third block each: request 2, the newest, is evicted.
        let s = sched.schedule(&mut running, &mut waiting, &mut kv);
        assert_eq!(s.preempted, 1);
        assert_eq!(s.chunks, [chunk(1, 1)]);
        let back = waiting.front().unwrap();
        assert_eq!((back.id, back.computed, back.stats.preemptions), (2, 0, 1));
        assert_eq!(
            back.tokens.len(),
            33,
            "its generated tokens are kept for the recompute"
        );
        kv.check_invariants().unwrap();
    }

    #[test]
    fn a_prefix_being_computed_this_step_is_waited_for_then_reused() {
        let sched = scheduler(CapacitySchedulerPolicy::GuaranteedNoEvict, 8, 1024);
        let mut kv = KvCacheManager::new(32, 16, true);
        let a = request(1, 40, 4);
        let mut b = request(2, 40, 4);
        b.tokens[..32].copy_from_slice(&a.tokens[..32]);
        let (mut running, mut waiting) = (Vec::new(), VecDeque::from([a, b]));
        let s = sched.schedule(&mut running, &mut waiting, &mut kv);
        assert_eq!(s.chunks, [chunk(1, 40)]);
        run_step(&s, &mut running);
        let tokens = running[0].tokens.clone();
        kv.commit(1, &tokens, running[0].computed);
        let s = sched.schedule(&mut running, &mut waiting, &mut kv);
        assert_eq!(s.reused_blocks, 2);
        assert!(s.chunks.contains(&chunk(2, 8)));
    }
}
