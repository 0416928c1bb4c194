//! Block accounting: free list, per-sequence block tables, reference counts, the prefix-hash
//! index of full blocks, LRU eviction of cached blocks nobody references, and the events that
//! report what was stored and removed.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};

use serde::Serialize;

use super::BlockId;
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

/// Where every block is, for stats and invariant checks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KvCacheSummary {
    pub total_blocks: usize,
    /// Referenced by at least one sequence.
    pub used_blocks: usize,
    pub free_blocks: usize,
    /// Unreferenced but kept for prefix reuse; evictable.
    pub cached_blocks: usize,
    pub sequences: usize,
}

#[derive(Default)]
struct Block {
    refs: u32,
    /// Set while the block is in the prefix index.
    hash: Option<u64>,
    /// Tokens and parent hash the hash was made from, checked on every match.
    tokens: Vec<u32>,
    parent: Option<u64>,
    /// Key in `lru` while unreferenced and cached.
    lru_tick: Option<u64>,
}

#[derive(Default)]
struct SeqBlocks {
    blocks: Vec<BlockId>,
    /// Chain hashes of the sequence's leading full blocks whose contents are computed.
    hashes: Vec<u64>,
}

pub struct KvCacheManager {
    block_size: usize,
    reuse: bool,
    blocks: Vec<Block>,
    free: Vec<BlockId>,
    index: HashMap<u64, BlockId>,
    lru: BTreeMap<u64, BlockId>,
    tick: u64,
    seqs: HashMap<u64, SeqBlocks>,
    events: Vec<KvCacheEvent>,
}

impl KvCacheManager {
    pub fn new(num_blocks: usize, block_size: usize, enable_reuse: bool) -> Self {
        Self {
            block_size,
            reuse: enable_reuse,
            blocks: (0..num_blocks).map(|_| Block::default()).collect(),
            // Popped from the back: hand out low ids first.
            free: (0..num_blocks as BlockId).rev().collect(),
            index: HashMap::new(),
            lru: BTreeMap::new(),
            tick: 0,
            seqs: HashMap::new(),
            events: Vec::new(),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn total_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks that can be handed out now: free ones plus evictable cached ones.
    pub fn available_blocks(&self) -> usize {
        self.free.len() + self.lru.len()
    }

    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// The block table of sequence `id` (empty if unknown).
    pub fn block_table(&self, id: u64) -> &[BlockId] {
        self.seqs.get(&id).map_or(&[], |s| &s.blocks)
    }

    pub fn num_blocks_of(&self, id: u64) -> usize {
        self.block_table(id).len()
    }

    /// Starts sequence `id`, sharing the cached blocks its `prompt` begins with. Returns how
    /// many prompt tokens those blocks already hold. The last prompt token is always left to
    /// compute, since its logits are needed.
    pub fn add_sequence(&mut self, id: u64, prompt: &[u32]) -> usize {
        let matched = self.match_prefix(prompt);
        let mut seq = SeqBlocks::default();
        for (b, hash) in matched {
            let block = &mut self.blocks[b as usize];
            if let Some(t) = block.lru_tick.take() {
                self.lru.remove(&t);
            }
            block.refs += 1;
            seq.blocks.push(b);
            seq.hashes.push(hash);
        }
        let reused = seq.blocks.len() * self.block_size;
        self.seqs.insert(id, seq);
        reused
    }

    /// How many leading tokens of `prompt` cached blocks hold (never the last token).
    pub fn cached_prefix_len(&self, prompt: &[u32]) -> usize {
        self.match_prefix(prompt).len() * self.block_size
    }

    fn match_prefix(&self, prompt: &[u32]) -> Vec<(BlockId, u64)> {
        let mut found = Vec::new();
        if !self.reuse {
            return found;
        }
        let full = prompt.len().saturating_sub(1) / self.block_size;
        let mut parent = None;
        for chunk in prompt.chunks_exact(self.block_size).take(full) {
            let hash = chain_hash(parent, chunk);
            let Some(&b) = self.index.get(&hash) else {
                break;
            };
            let block = &self.blocks[b as usize];
            if block.tokens != chunk || block.parent != parent {
                break;
            }
            found.push((b, hash));
            parent = Some(hash);
        }
        found
    }

    pub fn reuse_enabled(&self) -> bool {
        self.reuse
    }

    /// Gives sequence `id` enough blocks for `tokens` positions, all or nothing.
    pub fn ensure_capacity(&mut self, id: u64, tokens: usize) -> Result<()> {
        let have = self.num_blocks_of(id);
        let need = self.blocks_for(tokens).saturating_sub(have);
        if need > self.available_blocks() {
            return Err(RuntimeError::OutOfKvBlocks {
                needed: need,
                available: self.available_blocks(),
            });
        }
        let mut fresh = Vec::with_capacity(need);
        for _ in 0..need {
            let b = match self.free.pop() {
                Some(b) => b,
                None => self.evict_lru(),
            };
            self.blocks[b as usize].refs = 1;
            fresh.push(b);
        }
        self.seqs.entry(id).or_default().blocks.extend(fresh);
        Ok(())
    }

    fn evict_lru(&mut self) -> BlockId {
        let (_, b) = self
            .lru
            .pop_first()
            .expect("caller checked available_blocks");
        let block = &mut self.blocks[b as usize];
        block.lru_tick = None;
        if let Some(hash) = block.hash.take() {
            self.index.remove(&hash);
            self.events
                .push(KvCacheEvent::Removed { block_id: b, hash });
        }
        block.tokens.clear();
        block.parent = None;
        b
    }

    /// Records that the first `computed` of `tokens` (the sequence's prompt and output so far)
    /// are in sequence `id`'s blocks, making its newly completed full blocks reusable.
    pub fn commit(&mut self, id: u64, tokens: &[u32], computed: usize) {
        if !self.reuse {
            return;
        }
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        let full = computed.min(tokens.len()) / self.block_size;
        while seq.hashes.len() < full.min(seq.blocks.len()) {
            let j = seq.hashes.len();
            let parent = seq.hashes.last().copied();
            let chunk = &tokens[j * self.block_size..(j + 1) * self.block_size];
            let hash = chain_hash(parent, chunk);
            seq.hashes.push(hash);
            let b = seq.blocks[j];
            let block = &mut self.blocks[b as usize];
            // Another sequence may have stored the same contents first; then this copy stays
            // private and returns to the free list when released.
            if block.hash.is_some() || self.index.contains_key(&hash) {
                continue;
            }
            block.hash = Some(hash);
            block.tokens = chunk.to_vec();
            block.parent = parent;
            self.index.insert(hash, b);
            self.events.push(KvCacheEvent::Stored {
                block_id: b,
                hash,
                parent_hash: parent,
                num_tokens: self.block_size,
            });
        }
    }

    /// Releases sequence `id`'s blocks: cached ones become evictable (tail first), the rest free.
    pub fn free_sequence(&mut self, id: u64) {
        let Some(seq) = self.seqs.remove(&id) else {
            return;
        };
        for &b in seq.blocks.iter().rev() {
            let block = &mut self.blocks[b as usize];
            block.refs -= 1;
            if block.refs > 0 {
                continue;
            }
            if block.hash.is_some() {
                self.tick += 1;
                block.lru_tick = Some(self.tick);
                self.lru.insert(self.tick, b);
            } else {
                self.free.push(b);
            }
        }
    }

    /// Events since the last call.
    pub fn take_events(&mut self) -> Vec<KvCacheEvent> {
        std::mem::take(&mut self.events)
    }

    pub fn summary(&self) -> KvCacheSummary {
        KvCacheSummary {
            total_blocks: self.blocks.len(),
            used_blocks: self.blocks.len() - self.free.len() - self.lru.len(),
            free_blocks: self.free.len(),
            cached_blocks: self.lru.len(),
            sequences: self.seqs.len(),
        }
    }

    /// Verifies that every block is in exactly one place — free, cached or referenced by the
    /// block tables exactly `refs` times — and that the prefix index and LRU agree.
    pub fn check_invariants(&self) -> std::result::Result<KvCacheSummary, String> {
        let mut refs = vec![0u32; self.blocks.len()];
        for seq in self.seqs.values() {
            for &b in &seq.blocks {
                refs[b as usize] += 1;
            }
        }
        let mut place = vec![0u8; self.blocks.len()];
        for &b in &self.free {
            place[b as usize] += 1;
        }
        for (&tick, &b) in &self.lru {
            place[b as usize] += 1;
            if self.blocks[b as usize].lru_tick != Some(tick) {
                return Err(format!("block {b}: LRU tick mismatch"));
            }
        }
        for (i, block) in self.blocks.iter().enumerate() {
            if block.refs != refs[i] {
                return Err(format!(
                    "block {i}: refcount {} but {} table entries",
                    block.refs, refs[i]
                ));
            }
            let places = place[i] as u32 + u32::from(refs[i] > 0);
            if places != 1 {
                return Err(format!("block {i} is in {places} places"));
            }
            if let Some(h) = block.hash {
                if self.index.get(&h) != Some(&(i as BlockId)) {
                    return Err(format!("block {i}: hash not in the prefix index"));
                }
            }
        }
        if self.index.len() != self.blocks.iter().filter(|b| b.hash.is_some()).count() {
            return Err("prefix index names blocks that are not cached".into());
        }
        Ok(self.summary())
    }
}

/// Hash of a block's tokens chained to the hash of everything before it.
fn chain_hash(parent: Option<u64>, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(n: usize, salt: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i * 31 + salt).collect()
    }

    #[test]
    fn allocate_commit_free_and_reuse_prefix() {
        let mut m = KvCacheManager::new(8, 4, true);
        let a = toks(10, 0);
        assert_eq!(m.add_sequence(1, &a), 0);
        m.ensure_capacity(1, 10).unwrap();
        assert_eq!(m.num_blocks_of(1), 3);
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
        assert_eq!(m.available_blocks(), 4);
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
        assert_eq!(m.num_blocks_of(9), 2, "failed allocation took nothing");
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
