//! The paged KV cache: [`KvPool`] holds the keys and values of every layer in fixed-size blocks;
//! [`KvCacheManager`] decides which blocks belong to which sequence, shares full blocks between
//! sequences with the same prefix, and evicts unreferenced cached blocks least recently used
//! first. Layers that see the same span of keys form a group with its own blocks ([`KvBudget`]):
//! in a sliding-window group a sequence holds only the blocks its window still sees.
//! [`KvCache`] is a single sequence's private cache for callers that run one sequence.

mod block_group;
mod manager;
mod pool;
mod sequence;

use serde::{Deserialize, Serialize};

pub use block_group::NO_BLOCK;
pub use manager::{
    block_hashes, BlockCopy, KvCacheEvent, KvCacheManager, KvCacheSummary, KvGroupSummary,
};
#[cfg(feature = "cuda")]
pub(crate) use pool::device as pool_device;
pub(crate) use pool::HostKv;
pub use pool::{KvPool, KvStorage};
pub use sequence::KvCache;
pub(crate) use sequence::KV_CACHE_BLOCK;

use crate::engine::BuildConfig;
use crate::{ModelConfig, Result, RuntimeError};

/// Index of a block in the pool.
pub type BlockId = u32;

/// The first block the query at position `pos` reads with a window of `window` keys (blocks
/// before it are never touched again).
pub(crate) fn first_block_read(window: Option<usize>, pos: usize, block_size: usize) -> usize {
    window.map_or(0, |w| (pos + 1).saturating_sub(w) / block_size)
}

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

    /// How the pool is divided for this model and engine: `max_tokens` (or what fits) tokens
    /// for the layers that see every key, and for each sliding-window group what that many
    /// tokens of sequences need of it (each holds its window and one prompt chunk of at most
    /// `max_chunk` tokens), never less than one full-length sequence's peak.
    pub fn budget(
        &self,
        model: &ModelConfig,
        build: &BuildConfig,
        max_chunk: usize,
    ) -> Result<KvBudget> {
        self.validate()?;
        let bs = self.tokens_per_block;
        let groups = model.kv_groups();
        let seq_len = build.max_seq_len.max(1);
        // The share of a full-length sequence's positions each group keeps.
        let share =
            |w: Option<usize>| w.map_or(1.0, |w| ((w + bs).min(seq_len)) as f64 / seq_len as f64);
        let tokens = match self.max_tokens {
            Some(t) => t,
            None => {
                let wanted = build.max_batch_size.max(1) * build.max_seq_len;
                let per_layer = KvPool::bytes_per_layer_token(model, KvStorage::of(build)) as f64;
                let layers = groups.layers_of(model);
                let per_token: f64 = groups
                    .windows
                    .iter()
                    .zip(&layers)
                    .map(|(&w, &n)| per_layer * n as f64 * share(w))
                    .sum();
                match available_memory() {
                    Some(avail) => {
                        let fit = (avail as f64 * self.memory_fraction / per_token) as usize;
                        wanted.min(fit)
                    }
                    None => wanted,
                }
            }
        };
        if tokens / bs == 0 {
            return Err(RuntimeError::InvalidKvConfig {
                field: "max_tokens",
                value: tokens.to_string(),
                expected: "at least one block (tokens_per_block tokens)",
            });
        }
        let mut budget = KvBudget {
            block_size: bs,
            groups: groups
                .windows
                .iter()
                .map(|&window| GroupBudget { window, blocks: 0 })
                .collect(),
            max_chunk,
        };
        let one_seq = budget.peak_blocks(build.max_seq_len);
        for (g, peak) in budget.groups.iter_mut().zip(one_seq) {
            let full = tokens / bs;
            g.blocks = match g.window {
                None => full,
                Some(w) => ((tokens as f64 * share(Some(w))) as usize)
                    .div_ceil(bs)
                    .max(peak)
                    .min(full.max(peak)),
            };
        }
        Ok(budget)
    }
}

/// One KV group's share of the pool: the layers whose attention sees `window` keys (`None`:
/// every earlier one), in blocks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupBudget {
    pub window: Option<usize>,
    pub blocks: usize,
}

/// How the pool is divided: tokens per block, each group's blocks (in [`KvGroups`] order), and
/// the longest prompt chunk one step brings (what a windowed sequence holds beyond its window).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KvBudget {
    pub block_size: usize,
    pub groups: Vec<GroupBudget>,
    pub max_chunk: usize,
}

impl KvBudget {
    /// One group seeing every key.
    pub fn single(blocks: usize, block_size: usize) -> Self {
        Self {
            block_size,
            groups: vec![GroupBudget {
                window: None,
                blocks,
            }],
            max_chunk: usize::MAX,
        }
    }

    /// `blocks` in every group of `model`.
    pub fn uniform(model: &ModelConfig, blocks: usize, block_size: usize) -> Self {
        Self {
            block_size,
            groups: model
                .kv_groups()
                .windows
                .into_iter()
                .map(|window| GroupBudget { window, blocks })
                .collect(),
            max_chunk: usize::MAX,
        }
    }

    /// The most blocks a sequence of up to `len` positions holds at once in each group.
    pub fn peak_blocks(&self, len: usize) -> Vec<usize> {
        self.groups.iter().map(|g| self.peak_in(g, len)).collect()
    }

    fn peak_in(&self, g: &GroupBudget, len: usize) -> usize {
        let blocks = |t: usize| t.div_ceil(self.block_size);
        match g.window {
            None => blocks(len),
            Some(w) => blocks(len).min(blocks(w + self.max_chunk.min(len)) + 1),
        }
    }

    /// The longest sequence the pool could hold alone (windowed groups hold any length once
    /// their window fits).
    pub fn longest_sequence(&self) -> usize {
        self.groups
            .iter()
            .map(|g| match g.window {
                Some(_) if self.peak_in(g, usize::MAX / 2) <= g.blocks => usize::MAX,
                _ => g.blocks * self.block_size,
            })
            .min()
            .unwrap_or(0)
    }

    /// Blocks needed and available in a group that could never hold a sequence of `len`.
    pub fn too_large(&self, len: usize) -> Option<(usize, usize)> {
        self.groups
            .iter()
            .map(|g| (self.peak_in(g, len), g.blocks))
            .find(|(need, have)| need > have)
    }
}

/// Which layers share a block table: one group per distinct attention span, the full-attention
/// layers first, then windows from the smallest.
#[derive(Clone, Debug, PartialEq)]
pub struct KvGroups {
    pub windows: Vec<Option<usize>>,
    pub of_layer: Vec<usize>,
}

impl KvGroups {
    /// The lowest layer of group `g` that `model` computes (one whose pool shows the group's
    /// shape); none where a pipeline stage holds no layer of the group.
    pub fn first_layer(&self, g: usize, model: &ModelConfig) -> Option<usize> {
        (self.of_layer.iter().enumerate())
            .find_map(|(l, &x)| (x == g && model.computes_layer(l)).then_some(l))
    }

    /// Layers per group that `model` computes (a pipeline stage's).
    pub fn layers_of(&self, model: &ModelConfig) -> Vec<usize> {
        let mut n = vec![0; self.windows.len()];
        for (l, &g) in self.of_layer.iter().enumerate() {
            n[g] += usize::from(model.computes_layer(l));
        }
        n
    }
}

/// MemAvailable of /proc/meminfo, where there is one.
fn available_memory() -> Option<usize> {
    meminfo("MemAvailable:")
}

/// A field of Linux's /proc/meminfo (`MemTotal:`, `MemAvailable:`) in bytes; None where it
/// cannot be read.
fn meminfo(field: &str) -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::{GroupBudget, KvBudget};

    #[test]
    fn the_longest_sequence_a_pool_holds() {
        assert_eq!(KvBudget::single(4, 32).longest_sequence(), 128);
        assert_eq!(KvBudget::single(4, 32).too_large(129), Some((5, 4)));
        // A windowed group holds any length once its window (and a chunk) fits; the full
        // group still bounds the sequence.
        let budget = KvBudget {
            block_size: 32,
            groups: vec![
                GroupBudget {
                    window: None,
                    blocks: 10,
                },
                GroupBudget {
                    window: Some(64),
                    blocks: 4,
                },
            ],
            max_chunk: 32,
        };
        assert_eq!(budget.longest_sequence(), 320);
        let windows_only = KvBudget {
            groups: budget.groups[1..].to_vec(),
            ..budget
        };
        assert_eq!(windows_only.longest_sequence(), usize::MAX);
    }
}
