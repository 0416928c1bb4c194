//! Block accounting over the model's KV groups: one [`BlockGroup`] per span of keys the layers
//! see (every earlier key, or a sliding window), each with its own blocks, moving in step —
//! a sequence is admitted, grown and released in every group at once, all or nothing.

use std::hash::Hasher;

use siphasher::sip::SipHasher13;

use serde::Serialize;

use super::block_group::BlockGroup;
use super::{BlockId, KvBudget};
use crate::{Result, RuntimeError};

/// What happened to a cached block, for consumers that mirror the cache (routers, monitors).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum KvCacheEvent {
    /// A full block became reusable under `hash` (which covers every token up to its end).
    Stored {
        block_id: BlockId,
        hash: u64,
        parent_hash: Option<u64>,
        num_tokens: usize,
    },
    /// A cached block was evicted to make room.
    Removed { block_id: BlockId, hash: u64 },
}

/// A block of KV group `group` whose contents the pool copies to another before the next pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct BlockCopy {
    pub group: usize,
    pub src: BlockId,
    pub dst: BlockId,
}

/// Where every block is, for stats and invariant checks (summed over the groups).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KvCacheSummary {
    pub total_blocks: usize,
    /// Referenced by at least one sequence.
    pub used_blocks: usize,
    pub free_blocks: usize,
    /// Unreferenced but kept for prefix reuse; evictable.
    pub cached_blocks: usize,
    pub sequences: usize,
    /// Blocks copied since the start because forked sequences (beams) would both write them.
    pub copied_blocks: u64,
}

impl KvCacheSummary {
    fn add(mut self, o: KvCacheSummary) -> Self {
        self.total_blocks += o.total_blocks;
        self.used_blocks += o.used_blocks;
        self.free_blocks += o.free_blocks;
        self.cached_blocks += o.cached_blocks;
        self.sequences = self.sequences.max(o.sequences);
        self.copied_blocks += o.copied_blocks;
        self
    }
}

/// One KV group's blocks: the layers whose attention sees `window` keys (`None`: every key).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KvGroupSummary {
    pub window: Option<usize>,
    #[serde(flatten)]
    pub blocks: KvCacheSummary,
}

pub struct KvCacheManager {
    budget: KvBudget,
    reuse: bool,
    groups: Vec<BlockGroup>,
}

impl KvCacheManager {
    /// One group of `num_blocks` that sees every earlier key.
    pub fn new(num_blocks: usize, block_size: usize, enable_reuse: bool) -> Self {
        Self::with_budget(KvBudget::single(num_blocks, block_size), enable_reuse)
    }

    pub fn with_budget(budget: KvBudget, enable_reuse: bool) -> Self {
        let groups = budget
            .groups
            .iter()
            .map(|g| BlockGroup::new(g.blocks, budget.block_size, g.window))
            .collect();
        Self {
            budget,
            reuse: enable_reuse,
            groups,
        }
    }

    pub fn budget(&self) -> &KvBudget {
        &self.budget
    }

    pub fn block_size(&self) -> usize {
        self.budget.block_size
    }

    pub fn reuse_enabled(&self) -> bool {
        self.reuse
    }

    /// Sequence `id`'s block table in each group (empty if unknown); entries its window has
    /// passed are [`super::NO_BLOCK`].
    pub fn block_tables(&self, id: u64) -> Vec<&[BlockId]> {
        self.groups.iter().map(|g| g.block_table(id)).collect()
    }

    /// Blocks sequence `id` holds in each group.
    pub fn held_blocks(&self, id: u64) -> Vec<usize> {
        self.groups.iter().map(|g| g.held_blocks(id)).collect()
    }

    /// Distinct blocks the sequences `ids` hold in each group (a beam search's beams share
    /// their prompt's).
    pub fn held_by(&self, ids: &[u64]) -> Vec<usize> {
        self.groups.iter().map(|g| g.held_by(ids)).collect()
    }

    /// Whether every group has room for `extra` more blocks on top of `reserved`
    /// (both per group).
    pub fn has_room(&self, reserved: &[usize], extra: &[usize]) -> bool {
        self.groups
            .iter()
            .zip(reserved.iter().zip(extra))
            .all(|(g, (r, e))| r + e <= g.available_blocks())
    }

    /// Starts sequence `id`, sharing the cached blocks its `prompt` begins with. Returns how
    /// many prompt tokens those blocks already hold. The last prompt token is always left to
    /// compute, since its logits are needed.
    pub fn add_sequence(&mut self, id: u64, prompt: &[u32]) -> usize {
        self.add_salted_sequence(id, prompt, None)
    }

    /// [`Self::add_sequence`] for a sequence whose keys and values depend on `salt` as well as
    /// on its tokens (a LoRA adapter's id): it shares cached blocks only with sequences of the
    /// same salt.
    pub fn add_salted_sequence(&mut self, id: u64, prompt: &[u32], salt: Option<u64>) -> usize {
        let (m, found) = self.match_prefix(prompt, salt);
        for (g, found) in self.groups.iter_mut().zip(found) {
            let first = g.first_needed(m * self.budget.block_size);
            let matched: Vec<_> = found[..m]
                .iter()
                .enumerate()
                .map(|(j, &(b, h))| (b.filter(|_| j >= first), h))
                .collect();
            g.add_sequence(id, &matched, salt);
        }
        m * self.budget.block_size
    }

    /// How many leading tokens of `prompt` cached blocks of sequences salted `salt` hold (never
    /// the last token).
    pub fn cached_prefix_len(&self, prompt: &[u32], salt: Option<u64>) -> usize {
        self.match_prefix(prompt, salt).0 * self.budget.block_size
    }

    /// The most leading full blocks of `prompt` every group has what it needs of, and each
    /// group's cached block for each full block.
    #[allow(clippy::type_complexity)]
    fn match_prefix(
        &self,
        prompt: &[u32],
        salt: Option<u64>,
    ) -> (usize, Vec<Vec<(Option<BlockId>, u64)>>) {
        let bs = self.budget.block_size;
        let full = if self.reuse {
            prompt.len().saturating_sub(1) / bs
        } else {
            0
        };
        let chain = block_hashes(&prompt[..full * bs], bs, salt);
        let parents = std::iter::once(salt).chain(chain.iter().map(|&h| Some(h)));
        let hashes: Vec<(u64, Option<u64>)> = chain.iter().copied().zip(parents).collect();
        let found: Vec<Vec<(Option<BlockId>, u64)>> = self
            .groups
            .iter()
            .map(|g| {
                let chunks = prompt.chunks_exact(bs);
                hashes
                    .iter()
                    .zip(chunks)
                    .map(|(&(h, p), c)| (g.lookup(h, c, p), h))
                    .collect()
            })
            .collect();
        // A prefix of m blocks is usable in a group when it holds every block the first query
        // after it reads.
        let usable = |m: usize| {
            self.groups.iter().zip(&found).all(|(g, f)| {
                let first = g.first_needed(m * bs);
                f[first.min(m)..m].iter().all(|(b, _)| b.is_some())
            })
        };
        let m = (0..=full).rev().find(|&m| usable(m)).unwrap_or(0);
        (m, found)
    }

    /// Gives sequence `id` enough blocks for `tokens` positions in every group, all or nothing.
    pub fn ensure_capacity(&mut self, id: u64, tokens: usize) -> Result<()> {
        for g in &self.groups {
            let need = g.missing(id, tokens);
            if need > g.available_blocks() {
                return Err(RuntimeError::OutOfKvBlocks {
                    needed: need,
                    available: g.available_blocks(),
                });
            }
        }
        for g in &mut self.groups {
            g.grow(id, tokens);
        }
        Ok(())
    }

    /// Records that the first `computed` of `tokens` (the sequence's prompt and output so far)
    /// are in sequence `id`'s blocks: newly completed full blocks become reusable, and in
    /// sliding-window groups the blocks no later query reads go back to the pool.
    pub fn commit(&mut self, id: u64, tokens: &[u32], computed: usize) {
        for g in &mut self.groups {
            g.commit(id, tokens, computed, self.reuse);
        }
    }

    /// Starts sequence `child` on `parent`'s first `len` positions in every group, sharing its
    /// full blocks (beam search's fork). A partly filled last block is copied, all or nothing:
    /// the copies, per group, are for the pool to make before `child`'s next pass
    /// ([`super::KvPool::copy_blocks`]).
    pub fn fork(&mut self, parent: u64, child: u64, len: usize) -> Result<Vec<BlockCopy>> {
        let partial = !len.is_multiple_of(self.budget.block_size);
        if let Some(g) = self
            .groups
            .iter()
            .find(|g| partial && g.available_blocks() == 0)
        {
            return Err(RuntimeError::OutOfKvBlocks {
                needed: 1,
                available: g.available_blocks(),
            });
        }
        Ok(self
            .groups
            .iter_mut()
            .enumerate()
            .filter_map(|(group, g)| {
                let (src, dst) = g.fork(parent, child, len)?;
                Some(BlockCopy { group, src, dst })
            })
            .collect())
    }

    /// Releases sequence `id`'s blocks: cached ones become evictable (tail first), the rest free.
    pub fn free_sequence(&mut self, id: u64) {
        for g in &mut self.groups {
            g.free_sequence(id);
        }
    }

    /// Events since the last call, of the first group: the others store and evict the same
    /// prefixes, and a router mirrors prefixes, not groups.
    pub fn take_events(&mut self) -> Vec<KvCacheEvent> {
        let mut groups = self.groups.iter_mut();
        let first = groups
            .next()
            .map(BlockGroup::take_events)
            .unwrap_or_default();
        for g in groups {
            g.take_events();
        }
        first
    }

    /// Summed over the groups.
    pub fn summary(&self) -> KvCacheSummary {
        self.groups
            .iter()
            .map(BlockGroup::summary)
            .fold(KvCacheSummary::default(), KvCacheSummary::add)
    }

    pub fn group_summaries(&self) -> Vec<KvGroupSummary> {
        self.groups
            .iter()
            .map(|g| KvGroupSummary {
                window: g.window(),
                blocks: g.summary(),
            })
            .collect()
    }

    /// Every group's invariants (see [`BlockGroup::check_invariants`]).
    pub fn check_invariants(&self) -> std::result::Result<KvCacheSummary, String> {
        for (i, g) in self.groups.iter().enumerate() {
            g.check_invariants()
                .map_err(|e| format!("group {i}: {e}"))?;
        }
        Ok(self.summary())
    }
}

/// Hash of a block's tokens chained to the hash of everything before it: SipHash-1-3 with zero
/// keys over a tag byte, the parent's hash and the token ids, all little-endian. Written out
/// byte by byte, not through `std::hash`, so it is the same in every build and Rust release: a
/// router in another process computes it from a prompt ([`block_hashes`]) to find the replica
/// that caches it. A lookup also compares the tokens, so a collision never reuses a wrong block.
pub(crate) fn chain_hash(parent: Option<u64>, tokens: &[u32]) -> u64 {
    let mut bytes = Vec::with_capacity(9 + 4 * tokens.len());
    match parent {
        Some(p) => {
            bytes.push(1);
            bytes.extend_from_slice(&p.to_le_bytes());
        }
        None => bytes.push(0),
    }
    bytes.extend(tokens.iter().flat_map(|t| t.to_le_bytes()));
    let mut h = SipHasher13::new();
    h.write(&bytes);
    h.finish()
}

/// The hashes [`KvCacheEvent::Stored`] names for the full blocks of `tokens`, in order: each
/// block of `block_size` chained to everything before it, the chain rooted at `salt` (the LoRA
/// adapter id a sequence runs with, `None` for the base model).
pub fn block_hashes(tokens: &[u32], block_size: usize, salt: Option<u64>) -> Vec<u64> {
    let mut parent = salt;
    tokens
        .chunks_exact(block_size.max(1))
        .map(|chunk| {
            let h = chain_hash(parent, chunk);
            parent = Some(h);
            h
        })
        .collect()
}
#[cfg(test)]
mod tests {
    use super::*;

    fn toks(n: usize, salt: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i * 31 + salt).collect()
    }

    #[test]
    fn a_fork_shares_full_blocks_and_copies_the_partial_one() {
        let mut m = KvCacheManager::new(8, 4, false);
        m.add_sequence(1, &toks(10, 0));
        m.ensure_capacity(1, 10).unwrap();
        let parent = m.block_tables(1)[0].to_vec();
        let copies = m.fork(1, 2, 10).unwrap();
        let child = m.block_tables(2)[0].to_vec();
        assert_eq!(child[..2], parent[..2], "full blocks shared");
        assert_ne!(child[2], parent[2], "the partial block is the child's own");
        let want = BlockCopy {
            group: 0,
            src: parent[2],
            dst: child[2],
        };
        assert_eq!(copies, [want]);
        // At a block boundary nothing is copied.
        assert_eq!(m.fork(1, 3, 8).unwrap(), []);
        assert_eq!(m.block_tables(3)[0], &parent[..2]);
        let s = m.check_invariants().unwrap();
        assert_eq!((s.used_blocks, s.copied_blocks), (4, 1));
        // The pool is full but for 4 blocks: a fork that needs one more fails whole.
        m.add_sequence(4, &toks(16, 1));
        m.ensure_capacity(4, 16).unwrap();
        assert!(m.fork(1, 5, 10).is_err());
        assert!(m.block_tables(5)[0].is_empty());
        for id in [1, 2, 3, 4] {
            m.free_sequence(id);
        }
        assert_eq!(m.check_invariants().unwrap().used_blocks, 0);
    }

    #[test]
    fn allocate_commit_free_and_reuse_prefix() {
        let mut m = KvCacheManager::new(8, 4, true);
        let a = toks(10, 0);
        assert_eq!(m.add_sequence(1, &a), 0);
        m.ensure_capacity(1, 10).unwrap();
        assert_eq!(m.held_blocks(1)[0], 3);
        m.commit(1, &a, 10);
        let stored = m.take_events();
        assert_eq!(stored.len(), 2, "two full blocks: {stored:?}");
        m.free_sequence(1);
        let s = m.check_invariants().unwrap();
        assert_eq!((s.used_blocks, s.cached_blocks, s.free_blocks), (0, 2, 6));

        // Same first 8 tokens, then different: both full blocks reused.
        let mut b = a[..8].to_vec();
        b.extend([999, 998, 997]);
        assert_eq!(m.add_sequence(2, &b), 8);
        m.ensure_capacity(2, b.len()).unwrap();
        // Differs in the first block: nothing reused.
        let mut c = a.clone();
        c[0] = 7;
        assert_eq!(m.add_sequence(3, &c), 0);
        m.check_invariants().unwrap();
        m.free_sequence(2);
        m.free_sequence(3);
        assert_eq!(m.check_invariants().unwrap().used_blocks, 0);
    }

    #[test]
    fn stored_events_name_the_hashes_a_router_computes_from_the_prompt() {
        let mut m = KvCacheManager::new(8, 4, true);
        let a = toks(13, 5);
        m.add_salted_sequence(1, &a, Some(77));
        m.ensure_capacity(1, 13).unwrap();
        m.commit(1, &a, 13);
        let stored: Vec<(u64, Option<u64>)> = m
            .take_events()
            .into_iter()
            .filter_map(|e| match e {
                KvCacheEvent::Stored {
                    hash, parent_hash, ..
                } => Some((hash, parent_hash)),
                KvCacheEvent::Removed { .. } => None,
            })
            .collect();
        let chain = block_hashes(&a, 4, Some(77));
        assert_eq!(chain.len(), 3);
        let parents = [Some(77), Some(chain[0]), Some(chain[1])];
        assert_eq!(
            stored,
            chain.iter().copied().zip(parents).collect::<Vec<_>>()
        );
        // The salt and every token are in the chain; the values are fixed for every build.
        assert_ne!(block_hashes(&a, 4, None), chain);
        assert_ne!(block_hashes(&toks(13, 6), 4, Some(77))[0], chain[0]);
        assert_eq!(chain_hash(None, &[1, 2, 3, 4]), PINNED);
    }

    /// `chain_hash(None, [1, 2, 3, 4])`, as CPython computes it independently: `PYTHONHASHSEED=0
    /// python3 -c 'print(hash(bytes([0, 1,0,0,0, 2,0,0,0, 3,0,0,0, 4,0,0,0])) % 2**64)'` (its
    /// bytes hash is SipHash-1-3, keys zero under that seed). A change breaks other builds' routers.
    const PINNED: u64 = 9757011934068895090;

    #[test]
    fn prompt_of_exact_blocks_leaves_the_last_token_to_compute() {
        let mut m = KvCacheManager::new(8, 4, true);
        let a = toks(8, 0);
        m.add_sequence(1, &a);
        m.ensure_capacity(1, 8).unwrap();
        m.commit(1, &a, 8);
        m.free_sequence(1);
        assert_eq!(m.add_sequence(2, &a), 4);
        m.free_sequence(2);
    }

    #[test]
    fn eviction_is_lru_and_reported_and_exhaustion_is_all_or_nothing() {
        let mut m = KvCacheManager::new(4, 2, true);
        for id in 0..2u64 {
            let t = toks(4, id as u32 * 100);
            m.add_sequence(id, &t);
            m.ensure_capacity(id, 4).unwrap();
            m.commit(id, &t, 4);
            m.free_sequence(id);
        }
        m.take_events();
        let s = m.summary();
        assert_eq!(s.free_blocks + s.cached_blocks, 4);
        m.add_sequence(9, &[1]);
        m.ensure_capacity(9, 4).unwrap();
        let removed: Vec<_> = m
            .take_events()
            .into_iter()
            .filter(|e| matches!(e, KvCacheEvent::Removed { .. }))
            .collect();
        assert_eq!(
            removed.len(),
            2,
            "sequence 0's blocks were least recently used"
        );
        let err = m.ensure_capacity(9, 20).unwrap_err();
        assert!(err.to_string().contains("KV"), "{err}");
        assert_eq!(m.held_blocks(9)[0], 2, "failed allocation took nothing");
        assert_eq!(
            m.add_sequence(10, &toks(4, 100)),
            2,
            "sequence 1 still cached"
        );
        m.free_sequence(9);
        m.free_sequence(10);
        let s = m.check_invariants().unwrap();
        assert_eq!(s.used_blocks, 0);
    }

    #[test]
    fn without_reuse_nothing_is_cached() {
        let mut m = KvCacheManager::new(4, 2, false);
        let t = toks(6, 0);
        m.add_sequence(1, &t);
        m.ensure_capacity(1, 6).unwrap();
        m.commit(1, &t, 6);
        m.free_sequence(1);
        assert!(m.take_events().is_empty());
        assert_eq!(m.add_sequence(2, &t), 0);
        assert_eq!(m.check_invariants().unwrap().free_blocks, 4);
    }
}

#[cfg(test)]
mod window_tests {
    use super::super::{GroupBudget, NO_BLOCK};
    use super::*;

    /// Groups of 16 blocks of 4: every key, and a window of 6.
    fn manager() -> KvCacheManager {
        let group = |window| GroupBudget { window, blocks: 16 };
        let budget = KvBudget {
            block_size: 4,
            groups: vec![group(None), group(Some(6))],
            max_chunk: 8,
        };
        KvCacheManager::with_budget(budget, true)
    }

    fn toks(n: usize) -> Vec<u32> {
        (0..n as u32).map(|i| i * 7 + 1).collect()
    }

    #[test]
    fn a_window_group_keeps_only_what_the_next_query_reads() {
        let mut m = manager();
        let t = toks(30);
        m.add_sequence(1, &t[..20]);
        for end in [8, 16, 20, 21, 22, 23, 24, 25] {
            m.ensure_capacity(1, end).unwrap();
            m.commit(1, &t, end);
            m.check_invariants().unwrap();
        }
        // Position 25 reads keys from 20 on: blocks 5 and 6 only; the full group all 7.
        assert_eq!(m.held_blocks(1), [7, 2]);
        let window = m.block_tables(1)[1];
        assert_eq!(&window[..5], &[NO_BLOCK; 5]);
        assert!(window[5..].iter().all(|&b| b != NO_BLOCK));
        let groups = m.group_summaries();
        assert_eq!(groups[1].window, Some(6));
        assert_eq!(groups[1].blocks.used_blocks, 2);
        m.free_sequence(1);
        assert_eq!(m.check_invariants().unwrap().used_blocks, 0);
    }

    #[test]
    fn a_windowed_prefix_is_reused_from_the_blocks_its_window_needs() {
        let mut m = manager();
        let t = toks(24);
        m.add_sequence(1, &t);
        m.ensure_capacity(1, 24).unwrap();
        m.commit(1, &t, 24);
        m.free_sequence(1);
        // Same 20 tokens, then others: 5 blocks reused; the window group takes blocks 3 and 4
        // (position 20 reads keys from 15 on) and leaves the rest out.
        let mut u = t[..20].to_vec();
        u.extend([500, 501, 502]);
        assert_eq!(m.add_sequence(2, &u), 20);
        assert_eq!(m.held_blocks(2), [5, 2]);
        assert_eq!(&m.block_tables(2)[1][..3], &[NO_BLOCK; 3]);
        m.ensure_capacity(2, u.len()).unwrap();
        m.commit(2, &u, u.len());
        m.check_invariants().unwrap();
        m.free_sequence(2);
        assert_eq!(m.check_invariants().unwrap().used_blocks, 0);
    }
}
