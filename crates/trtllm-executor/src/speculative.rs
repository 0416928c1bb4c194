//! Speculative decoding: a drafter proposes up to K tokens after a request's last one, the
//! target model computes all of them in one pass (its logits at every drafted position), and the
//! request keeps each drafted token its own sampler would have produced there, plus the first
//! token that differs (or the one after the last draft).
//!
//! The request samples each position exactly as plain decoding would (same penalties, grammar
//! and RNG draws, one draw per emitted token) and a draft is kept only where it equals that
//! sample. For a deterministic drafter this is rejection sampling with a point-mass proposal:
//! a draft `d` survives with probability `p(d)`, and when it does not the token emitted is
//! drawn from `p` without `d`. So outputs are those of plain decoding — bit for bit under
//! greedy or a seed, as far as the verifying pass reproduces plain decoding's logits.
//!
//! Drafters: prompt lookup (n-gram matching over the request's own tokens) and a draft model
//! (`draft_model.rs`). EAGLE/MTP heads, which read the target's hidden states, would be a
//! further `Drafter` fed from the target's pass; checkpoints with such heads are not available
//! here, so none is built.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use trtllm_builder::runtime::{Device, KvCacheConfig, ModelConfig};

use crate::{ExecutorError, Result};

/// How requests are drafted (TensorRT-LLM's `decoding_type`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "decoding_type")]
pub enum SpeculativeConfig {
    /// Prompt lookup: the tokens that followed the latest earlier occurrence of the sequence's
    /// last `n` tokens (n from `max_matching_ngram_size` down to 1) are the draft.
    NGram {
        max_draft_len: usize,
        max_matching_ngram_size: usize,
    },
    /// A draft engine (built like any engine, with the target's vocabulary) proposes greedily.
    DraftTarget {
        max_draft_len: usize,
        speculative_model: PathBuf,
    },
}

/// What a drafter is built against: the target's device, KV-cache settings and model.
pub(crate) struct DraftContext<'a> {
    pub device: Device,
    pub kv_cache: &'a KvCacheConfig,
    pub target: &'a ModelConfig,
}

/// The most tokens one draft may hold: the verifying pass runs `1 + K` rows per request.
pub const MAX_DRAFT_LEN: usize = 32;

impl SpeculativeConfig {
    pub fn max_draft_len(&self) -> usize {
        match self {
            Self::NGram { max_draft_len, .. } | Self::DraftTarget { max_draft_len, .. } => {
                *max_draft_len
            }
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |field, value, max| Err(ExecutorError::InvalidConfig { field, value, max });
        let k = self.max_draft_len();
        if k == 0 || k > MAX_DRAFT_LEN {
            return bad("max_draft_len", k, MAX_DRAFT_LEN);
        }
        if let Self::NGram {
            max_matching_ngram_size: n,
            ..
        } = self
        {
            if *n == 0 || *n > MAX_DRAFT_LEN {
                return bad("max_matching_ngram_size", *n, MAX_DRAFT_LEN);
            }
        }
        Ok(())
    }

    pub(crate) fn drafter(&self, ctx: &DraftContext<'_>) -> Result<Box<dyn Drafter>> {
        self.validate()?;
        Ok(match self {
            Self::NGram {
                max_matching_ngram_size,
                ..
            } => Box::new(NgramDrafter {
                max_ngram: *max_matching_ngram_size,
            }),
            Self::DraftTarget {
                speculative_model, ..
            } => Box::new(crate::draft_model::DraftModel::open(
                speculative_model,
                ctx.device,
                ctx.kv_cache,
                ctx.target,
            )?),
        })
    }
}

/// One request to draft for: its tokens so far (prompt and output) and the most it may take.
pub(crate) struct DraftInput<'a> {
    pub id: u64,
    pub tokens: &'a [u32],
    pub max: usize,
}

/// Proposes draft tokens for a step's decoding requests, all at once (a draft model batches).
pub(crate) trait Drafter: Send {
    fn propose(&mut self, seqs: &[DraftInput<'_>]) -> Vec<Vec<u32>>;
}

struct NgramDrafter {
    max_ngram: usize,
}

impl Drafter for NgramDrafter {
    fn propose(&mut self, seqs: &[DraftInput<'_>]) -> Vec<Vec<u32>> {
        seqs.iter()
            .map(|s| ngram_lookup(s.tokens, self.max_ngram, s.max))
            .collect()
    }
}

/// The up to `max` tokens that followed the latest earlier occurrence of `tokens`' last `n`
/// tokens, for the longest `n ≤ max_ngram` that occurs.
pub(crate) fn ngram_lookup(tokens: &[u32], max_ngram: usize, max: usize) -> Vec<u32> {
    let len = tokens.len();
    if max == 0 {
        return Vec::new();
    }
    for n in (1..=max_ngram.min(len.saturating_sub(1))).rev() {
        let suffix = &tokens[len - n..];
        // Latest start first; a match must be followed by at least one token.
        if let Some(start) = (0..len - n).rev().find(|&s| &tokens[s..s + n] == suffix) {
            let from = start + n;
            return tokens[from..(from + max).min(len)].to_vec();
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_latest_match_gives_the_draft() {
        // "1 2 3" occurs at 0 and 5; the latest (5) is followed by 9, 1, 2, 3.
        let t = [1, 2, 3, 4, 5, 1, 2, 3, 9, 1, 2, 3];
        assert_eq!(ngram_lookup(&t, 3, 4), vec![9, 1, 2, 3]);
        assert_eq!(ngram_lookup(&t, 3, 2), vec![9, 1]);
        // Only the last token matches: 7 occurs once before, followed by 8.
        let t = [7, 8, 1, 2, 7];
        assert_eq!(ngram_lookup(&t, 3, 5), vec![8, 1, 2, 7]);
        // A 2-gram beats a later 1-gram.
        let t = [5, 6, 0, 9, 6, 1, 5, 6];
        assert_eq!(ngram_lookup(&t, 2, 1), vec![0]);
    }

    #[test]
    fn no_match_no_draft() {
        assert!(ngram_lookup(&[1, 2, 3], 3, 4).is_empty());
        assert!(ngram_lookup(&[], 3, 4).is_empty());
        assert!(ngram_lookup(&[4], 3, 4).is_empty());
        assert!(ngram_lookup(&[4, 4], 3, 0).is_empty());
        // A repeated token drafts itself.
        assert_eq!(ngram_lookup(&[4, 4], 3, 4), vec![4]);
    }

    #[test]
    fn limits_are_validated() {
        let ok = SpeculativeConfig::NGram {
            max_draft_len: 4,
            max_matching_ngram_size: 3,
        };
        assert!(ok.validate().is_ok());
        for (k, n) in [(0, 3), (MAX_DRAFT_LEN + 1, 3), (4, 0)] {
            let c = SpeculativeConfig::NGram {
                max_draft_len: k,
                max_matching_ngram_size: n,
            };
            assert!(c.validate().is_err());
        }
    }
}
