//! A private paged cache for one sequence, its blocks numbered in order: what scoring,
//! benchmarks and tests use when no scheduler shares a pool.

use super::{BlockId, KvPool};
use crate::{Result, RuntimeError};

/// Tokens per block of a private cache.
pub(crate) const KV_CACHE_BLOCK: usize = 64;

pub struct KvCache {
    pub(crate) pool: KvPool,
    /// Every KV group's table (a private cache never hands blocks back).
    pub(crate) blocks: Vec<BlockId>,
    pub(crate) groups: usize,
    len: usize,
    max_len: usize,
}

impl KvCache {
    /// A cache of up to `max_len` positions over all of `pool`'s blocks, in order, in each of
    /// the model's `groups` KV groups.
    pub(crate) fn new(pool: KvPool, max_len: usize, groups: usize) -> Self {
        let num_blocks = max_len.div_ceil(pool.block_size());
        Self {
            pool,
            blocks: (0..num_blocks as BlockId).collect(),
            groups,
            len: 0,
            max_len,
        }
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn check_room(&self, n: usize) -> Result<()> {
        if self.len + n > self.max_len {
            return Err(RuntimeError::PromptTooLong {
                len: self.len + n,
                max: self.max_len,
                limit: "max_seq_len",
            });
        }
        Ok(())
    }

    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}
