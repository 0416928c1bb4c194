//! A private paged cache for one sequence, its blocks numbered in order: what scoring,
//! benchmarks and tests use when no scheduler shares a pool.

use super::{BlockId, KvPool, KvStorage};
use crate::{ModelConfig, Result, RuntimeError};

const BLOCK: usize = 64;

pub struct KvCache {
    pub(crate) pool: KvPool,
    pub(crate) blocks: Vec<BlockId>,
    len: usize,
    max_len: usize,
}

impl KvCache {
    pub fn new(model: &ModelConfig, storage: KvStorage, max_len: usize) -> Self {
        let num_blocks = max_len.div_ceil(BLOCK);
        Self {
            pool: KvPool::new(model, storage, BLOCK, num_blocks),
            blocks: (0..num_blocks as BlockId).collect(),
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
