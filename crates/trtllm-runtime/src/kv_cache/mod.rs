//! The paged KV cache: [`KvPool`] holds the keys and values of every layer in fixed-size blocks;
//! [`KvCacheManager`] decides which blocks belong to which sequence, shares full blocks between
//! sequences with the same prefix, and evicts unreferenced cached blocks least recently used
//! first. [`KvCache`] is a single sequence's private cache for callers that run one sequence.

mod manager;
mod pool;
mod sequence;

use serde::{Deserialize, Serialize};

pub use manager::{KvCacheEvent, KvCacheManager, KvCacheSummary};
pub use pool::{KvPool, KvStorage};
pub use sequence::KvCache;
pub(crate) use sequence::KV_CACHE_BLOCK;

use crate::engine::BuildConfig;
use crate::{ModelConfig, Result, RuntimeError};

/// Index of a block in the pool.
pub type BlockId = u32;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct KvCacheConfig {
    /// Positions per block.
    pub tokens_per_block: usize,
    /// Pool size in tokens; None sizes it for `max_batch_size` full-length sequences, capped by
    /// `memory_fraction` of the memory available when the pool is created.
    pub max_tokens: Option<usize>,
    pub memory_fraction: f64,
    /// Share full blocks between sequences whose prompts start alike (never for models whose
    /// RoPE follows the sequence length).
    pub enable_block_reuse: bool,
}

impl Default for KvCacheConfig {
    fn default() -> Self {
        Self {
            tokens_per_block: 32,
            max_tokens: None,
            memory_fraction: 0.9,
            enable_block_reuse: true,
        }
    }
}

impl KvCacheConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |field, value: String, expected| RuntimeError::InvalidKvConfig {
            field,
            value,
            expected,
        };
        if self.tokens_per_block == 0 || self.tokens_per_block > 1024 {
            return Err(bad(
                "tokens_per_block",
                self.tokens_per_block.to_string(),
                "1..=1024",
            ));
        }
        if self.max_tokens == Some(0) {
            return Err(bad("max_tokens", "0".into(), "at least 1"));
        }
        if !(self.memory_fraction > 0.0 && self.memory_fraction <= 1.0) {
            return Err(bad(
                "memory_fraction",
                self.memory_fraction.to_string(),
                "in (0, 1]",
            ));
        }
        Ok(())
    }

    /// How many blocks the pool gets for this model and engine.
    pub fn num_blocks(&self, model: &ModelConfig, build: &BuildConfig) -> Result<usize> {
        self.validate()?;
        let tokens = match self.max_tokens {
            Some(t) => t,
            None => {
                let wanted = build.max_batch_size.max(1) * build.max_seq_len;
                let bytes_per_token = KvPool::bytes_per_token(model, KvStorage::of(build));
                match available_memory() {
                    Some(avail) => {
                        let fit = (avail as f64 * self.memory_fraction) as usize / bytes_per_token;
                        wanted.min(fit)
                    }
                    None => wanted,
                }
            }
        };
        let blocks = tokens / self.tokens_per_block;
        if blocks == 0 {
            return Err(RuntimeError::InvalidKvConfig {
                field: "max_tokens",
                value: tokens.to_string(),
                expected: "at least one block (tokens_per_block tokens)",
            });
        }
        Ok(blocks)
    }
}

/// MemAvailable of /proc/meminfo, where there is one.
fn available_memory() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
