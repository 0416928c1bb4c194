//! One group's block accounting (the layers that see the same span of keys): free list,
//! per-sequence block tables, reference counts, the prefix-hash index of full blocks, LRU
//! eviction of cached blocks nobody references, and the events that report what was stored and
//! removed. In a sliding-window group a sequence hands back the blocks its window has passed.

use std::collections::{BTreeMap, HashMap};

use super::manager::{KvCacheEvent, KvCacheSummary};
use super::BlockId;

/// A table entry whose block the sequence does not hold: positions its window has passed (or
/// never needed, when its prefix came from the cache). Attention never reads it.
pub const NO_BLOCK: BlockId = BlockId::MAX;

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
    /// Entries before this one are out of the window and handed back.
    released: usize,
    /// The parent hash of the first block: what besides the tokens its contents depend on (a
    /// LoRA adapter), so only sequences with the same root share blocks.
    root: Option<u64>,
}

pub(crate) struct BlockGroup {
    block_size: usize,
    window: Option<usize>,
    blocks: Vec<Block>,
    free: Vec<BlockId>,
    index: HashMap<u64, BlockId>,
    lru: BTreeMap<u64, BlockId>,
    tick: u64,
    seqs: HashMap<u64, SeqBlocks>,
    events: Vec<KvCacheEvent>,
    /// Blocks copied at forks since the start (copy-on-write of a shared partial block).
    copied: u64,
}

impl BlockGroup {
    pub fn new(num_blocks: usize, block_size: usize, window: Option<usize>) -> Self {
        Self {
            block_size,
            window,
            blocks: (0..num_blocks).map(|_| Block::default()).collect(),
            // Popped from the back: hand out low ids first.
            free: (0..num_blocks as BlockId).rev().collect(),
            index: HashMap::new(),
            lru: BTreeMap::new(),
            tick: 0,
            seqs: HashMap::new(),
            events: Vec::new(),
            copied: 0,
        }
    }

    pub fn window(&self) -> Option<usize> {
        self.window
    }

    /// Blocks that can be handed out now: free ones plus evictable cached ones.
    pub fn available_blocks(&self) -> usize {
        self.free.len() + self.lru.len()
    }

    /// Entries of sequence `id`'s table, held or not (empty if unknown).
    pub fn block_table(&self, id: u64) -> &[BlockId] {
        self.seqs.get(&id).map_or(&[], |s| &s.blocks)
    }

    /// Blocks sequence `id` holds.
    pub fn held_blocks(&self, id: u64) -> usize {
        self.held_by(&[id])
    }

    /// Distinct blocks the sequences `ids` hold (blocks they share count once).
    pub fn held_by(&self, ids: &[u64]) -> usize {
        let mut all: Vec<BlockId> = ids
            .iter()
            .flat_map(|id| self.block_table(*id).iter().copied())
            .filter(|&b| b != NO_BLOCK)
            .collect();
        all.sort_unstable();
        all.dedup();
        all.len()
    }

    /// The first block the query at position `pos` reads.
    pub fn first_needed(&self, pos: usize) -> usize {
        super::first_block_read(self.window, pos, self.block_size)
    }

    /// The cached block with these contents, if any.
    pub fn lookup(&self, hash: u64, tokens: &[u32], parent: Option<u64>) -> Option<BlockId> {
        let &b = self.index.get(&hash)?;
        let block = &self.blocks[b as usize];
        (block.tokens == tokens && block.parent == parent).then_some(b)
    }

    /// Starts sequence `id` on the cached blocks `matched` (its leading full blocks, `None` for
    /// those its window does not need).
    pub fn add_sequence(&mut self, id: u64, matched: &[(Option<BlockId>, u64)], root: Option<u64>) {
        let mut seq = SeqBlocks {
            root,
            ..Default::default()
        };
        for &(b, hash) in matched {
            seq.hashes.push(hash);
            let Some(b) = b else {
                seq.blocks.push(NO_BLOCK);
                continue;
            };
            let block = &mut self.blocks[b as usize];
            if let Some(t) = block.lru_tick.take() {
                self.lru.remove(&t);
            }
            block.refs += 1;
            seq.blocks.push(b);
        }
        seq.released = seq.blocks.iter().take_while(|&&b| b == NO_BLOCK).count();
        self.seqs.insert(id, seq);
    }

    /// Blocks sequence `id` lacks to hold `tokens` positions.
    pub fn missing(&self, id: u64, tokens: usize) -> usize {
        tokens
            .div_ceil(self.block_size)
            .saturating_sub(self.block_table(id).len())
    }

    /// Extends sequence `id`'s table to `tokens` positions; the caller checked availability.
    pub fn grow(&mut self, id: u64, tokens: usize) {
        let fresh: Vec<BlockId> = (0..self.missing(id, tokens))
            .map(|_| self.take_block())
            .collect();
        self.seqs.entry(id).or_default().blocks.extend(fresh);
    }

    /// A block for one new reference: a free one, else the least recently used cached one.
    /// The caller checked availability.
    fn take_block(&mut self) -> BlockId {
        let b = match self.free.pop() {
            Some(b) => b,
            None => self.evict_lru(),
        };
        self.blocks[b as usize].refs = 1;
        b
    }

    /// Starts sequence `child` as a copy of `parent`'s first `len` positions: full blocks are
    /// shared (one more reference each), and a partly filled last block, which both would write,
    /// is copied into a fresh block (copy-on-write, done at the fork). Returns that copy as
    /// (source, destination) for the pool. The caller checked that a block is available.
    pub fn fork(&mut self, parent: u64, child: u64, len: usize) -> Option<(BlockId, BlockId)> {
        let mut seq = SeqBlocks::default();
        if let Some(p) = self.seqs.get(&parent) {
            seq.blocks = p.blocks[..len.div_ceil(self.block_size).min(p.blocks.len())].to_vec();
            seq.hashes = p.hashes[..(len / self.block_size).min(p.hashes.len())].to_vec();
            seq.released = p.released.min(seq.blocks.len());
            seq.root = p.root;
        }
        for &b in seq.blocks.iter().filter(|&&b| b != NO_BLOCK) {
            self.blocks[b as usize].refs += 1;
        }
        let mut copy = None;
        let last = seq.blocks.last().copied().filter(|&b| b != NO_BLOCK);
        if let (Some(src), true) = (last, !len.is_multiple_of(self.block_size)) {
            let dst = self.take_block();
            self.release(src);
            *seq.blocks.last_mut().expect("a last block") = dst;
            self.copied += 1;
            copy = Some((src, dst));
        }
        self.seqs.insert(child, seq);
        copy
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

    /// Records that the first `computed` of `tokens` are in sequence `id`'s blocks: newly full
    /// blocks become reusable (with `reuse`), and blocks the window has passed go back.
    pub fn commit(&mut self, id: u64, tokens: &[u32], computed: usize, reuse: bool) {
        if reuse {
            self.index_full_blocks(id, tokens, computed);
        }
        let first_needed = self.first_needed(computed);
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        let upto = first_needed.min(seq.blocks.len());
        let passed: Vec<BlockId> = (seq.released..upto)
            .map(|j| std::mem::replace(&mut seq.blocks[j], NO_BLOCK))
            .collect();
        seq.released = seq.released.max(upto);
        for b in passed.into_iter().rev() {
            self.release(b);
        }
    }

    fn index_full_blocks(&mut self, id: u64, tokens: &[u32], computed: usize) {
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        let bs = self.block_size;
        let full = computed.min(tokens.len()) / bs;
        while seq.hashes.len() < full.min(seq.blocks.len()) {
            let j = seq.hashes.len();
            let parent = seq.hashes.last().copied().or(seq.root);
            let chunk = &tokens[j * bs..(j + 1) * bs];
            let hash = super::manager::chain_hash(parent, chunk);
            seq.hashes.push(hash);
            let b = seq.blocks[j];
            if b == NO_BLOCK {
                continue;
            }
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
                num_tokens: bs,
            });
        }
    }

    /// Drops one reference: a cached block becomes evictable, any other one free.
    fn release(&mut self, b: BlockId) {
        let block = &mut self.blocks[b as usize];
        block.refs -= 1;
        if block.refs > 0 {
            return;
        }
        if block.hash.is_some() {
            self.tick += 1;
            block.lru_tick = Some(self.tick);
            self.lru.insert(self.tick, b);
        } else {
            self.free.push(b);
        }
    }

    /// Releases sequence `id`'s blocks, tail first.
    pub fn free_sequence(&mut self, id: u64) {
        let Some(seq) = self.seqs.remove(&id) else {
            return;
        };
        for &b in seq.blocks.iter().rev().filter(|&&b| b != NO_BLOCK) {
            self.release(b);
        }
    }

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
            copied_blocks: self.copied,
        }
    }

    /// Verifies that every block is in exactly one place — free, cached or referenced by the
    /// block tables exactly `refs` times — and that the prefix index and LRU agree.
    pub fn check_invariants(&self) -> std::result::Result<KvCacheSummary, String> {
        let mut refs = vec![0u32; self.blocks.len()];
        for seq in self.seqs.values() {
            for &b in seq.blocks.iter().filter(|&&b| b != NO_BLOCK) {
                refs[b as usize] += 1;
            }
            if seq.blocks[..seq.released.min(seq.blocks.len())]
                .iter()
                .any(|&b| b != NO_BLOCK)
            {
                return Err("a released table entry still names a block".into());
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
