//! How an engine is split over ranks (TensorRT-LLM's `Mapping`): `tp_size` ranks share each
//! layer (attention heads, MLP columns and the vocabulary split between them), `pp_size`
//! pipeline stages hold consecutive layers. Rank `r` is TP rank `r % tp_size` of stage
//! `r / tp_size`. The builder cuts the tensors and the runtime reads them by the same
//! [`Shard`], so the two can never disagree on who holds what.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::{ModelConfig, Result, RuntimeError};

/// Most ranks along one dimension (far beyond any machine this runs on; a bound for configs).
const MAX_SIZE: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    pub world_size: usize,
    pub tp_size: usize,
    pub pp_size: usize,
}

impl Default for Mapping {
    fn default() -> Self {
        Self {
            world_size: 1,
            tp_size: 1,
            pp_size: 1,
        }
    }
}

impl Mapping {
    pub fn new(tp_size: usize, pp_size: usize) -> Result<Self> {
        let m = Self {
            world_size: tp_size.saturating_mul(pp_size),
            tp_size,
            pp_size,
        };
        m.validate()?;
        Ok(m)
    }

    pub fn validate(&self) -> Result<()> {
        let ok = (1..=MAX_SIZE).contains(&self.tp_size)
            && (1..=MAX_SIZE).contains(&self.pp_size)
            && self.world_size == self.tp_size * self.pp_size;
        match ok {
            true => Ok(()),
            false => Err(RuntimeError::InvalidConfig(format!(
                "mapping {self:?}: tp_size and pp_size must be 1 to {MAX_SIZE} and world_size \
                 their product"
            ))),
        }
    }

    pub fn is_parallel(&self) -> bool {
        self.world_size > 1
    }

    /// The file of rank `rank`.
    pub fn rank_file(rank: usize) -> String {
        format!("rank{rank}.engine")
    }

    /// What rank `rank` holds of `model`; an error names why the model cannot be split so.
    pub fn shard(&self, model: &ModelConfig, rank: usize) -> Result<Shard> {
        self.validate()?;
        if rank >= self.world_size {
            return Err(RuntimeError::InvalidConfig(format!(
                "rank {rank} is outside a world of {} ranks",
                self.world_size
            )));
        }
        let (tp, pp) = (self.tp_size, self.pp_size);
        let (tp_rank, pp_rank) = (rank % tp, rank / tp);
        let cannot = |why: String| {
            RuntimeError::InvalidConfig(format!(
                "cannot split the model over tp_size {tp} × pp_size {pp}: {why}"
            ))
        };
        if model.num_layers < pp {
            return Err(cannot(format!("it has only {} layers", model.num_layers)));
        }
        let (nh, nkv) = (model.num_heads, model.num_kv_heads);
        let group = nh / nkv;
        let (q_heads, kv_heads) = if nkv >= tp {
            let kv = split(nkv, tp, 1, tp_rank);
            (kv.start * group..kv.end * group, kv)
        } else {
            // Fewer KV heads than ranks: each KV head is replicated on the ranks that share
            // its query heads (TensorRT-LLM's rule for MQA/GQA).
            let per_kv = tp / nkv;
            if !tp.is_multiple_of(nkv) || group < per_kv {
                return Err(cannot(format!(
                    "{nkv} KV heads of {group} query heads each: with fewer KV heads than \
                     ranks, tp_size must be a multiple of the KV heads and at most the \
                     attention heads"
                )));
            }
            let kv = tp_rank / per_kv;
            let q = split(group, per_kv, 1, tp_rank % per_kv);
            (kv * group + q.start..kv * group + q.end, kv..kv + 1)
        };
        if model.vocab_size < tp || model.intermediate_size < tp {
            return Err(cannot(
                "fewer vocabulary rows or MLP columns than ranks".into(),
            ));
        }
        Ok(Shard {
            mapping: *self,
            rank,
            tp_rank,
            pp_rank,
            q_heads,
            kv_heads,
            vocab: vocab_part(model.vocab_size, tp, tp_rank),
            layers: split(model.num_layers, pp, 1, pp_rank),
        })
    }
}

/// What one rank holds: its query and KV heads, vocabulary rows and layers, and (by layer,
/// [`Shard::inter`]) its MLP columns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shard {
    pub mapping: Mapping,
    pub rank: usize,
    pub tp_rank: usize,
    pub pp_rank: usize,
    pub q_heads: Range<usize>,
    pub kv_heads: Range<usize>,
    pub vocab: Range<usize>,
    pub layers: Range<usize>,
}

impl Shard {
    pub fn is_first_stage(&self) -> bool {
        self.pp_rank == 0
    }

    pub fn is_last_stage(&self) -> bool {
        self.pp_rank + 1 == self.mapping.pp_size
    }

    /// The columns of an MLP of `inter` columns this rank holds: in whole 128-column units
    /// where the size allows, so that a quantized down projection is cut between its groups.
    pub fn inter_of(&self, inter: usize) -> Range<usize> {
        let tp = self.mapping.tp_size;
        let unit = [128, 64, 32, 16, 8, 4, 2, 1]
            .into_iter()
            .find(|&u| inter.is_multiple_of(u) && inter / u >= tp)
            .unwrap_or(1);
        split(inter, tp, unit, self.tp_rank)
    }

    /// How many of a `vocab`-row embedding or head each TP rank holds, in TP rank order.
    pub fn vocab_widths(&self, vocab: usize) -> Vec<usize> {
        let tp = self.mapping.tp_size;
        (0..tp).map(|r| vocab_part(vocab, tp, r).len()).collect()
    }

    /// The MLP columns of `full`'s layer `layer` this rank holds.
    pub fn inter(&self, full: &ModelConfig, layer: usize) -> Range<usize> {
        self.inter_of(full.mlp_inter(layer))
    }

    /// `full` as this rank's decoder sees it: its heads and MLP columns. Sizes that stay whole
    /// (hidden, vocabulary, layers) are the model's, so that layers keep their indices and
    /// token ids their meaning.
    pub fn model(&self, full: &ModelConfig) -> ModelConfig {
        let mut m = full.clone();
        m.stage_layers = Some(self.layers.clone());
        m.num_heads = self.q_heads.len();
        m.num_kv_heads = self.kv_heads.len();
        m.intermediate_size = self.inter_of(full.intermediate_size).len();
        if let Some(moe) = &mut m.features.moe {
            moe.expert_intermediate_size =
                moe.expert_intermediate_size.map(|e| self.inter_of(e).len());
        }
        m
    }

    /// The rows of a fused QKV matrix (or bias) this rank holds: its query heads' rows, then its
    /// KV heads' key rows and value rows.
    pub fn qkv_rows(&self, full: &ModelConfig) -> Vec<Range<usize>> {
        let hd = full.head_dim;
        let (q, kv) = (full.q_dim(), full.kv_dim());
        let heads = |r: &Range<usize>, at: usize| at + r.start * hd..at + r.end * hd;
        vec![
            heads(&self.q_heads, 0),
            heads(&self.kv_heads, q),
            heads(&self.kv_heads, q + kv),
        ]
    }

    /// The output projection's input columns this rank holds (its query heads').
    pub fn o_cols(&self, full: &ModelConfig) -> Range<usize> {
        self.q_heads.start * full.head_dim..self.q_heads.end * full.head_dim
    }

    /// The rows of layer `layer`'s MLP input projection this rank holds (gate rows then up rows
    /// when fused).
    pub fn mlp_in_rows(&self, full: &ModelConfig, layer: usize) -> Vec<Range<usize>> {
        let inter = full.mlp_inter(layer);
        let r = self.inter(full, layer);
        match full.mlp_in(layer).1 == inter {
            true => vec![r],
            false => vec![r.clone(), inter + r.start..inter + r.end],
        }
    }
}

/// TP rank `i`'s rows of a `vocab`-row embedding or head (of `tp` ranks).
fn vocab_part(vocab: usize, tp: usize, i: usize) -> Range<usize> {
    split(vocab, tp, 1, i)
}

/// Part `i` of `parts` near-equal consecutive parts of `0..total`, in whole `unit`s (the
/// first parts take the remainder).
fn split(total: usize, parts: usize, unit: usize, i: usize) -> Range<usize> {
    let units = total / unit;
    let (base, extra) = (units / parts, units % parts);
    let start = i * base + i.min(extra);
    let end = start + base + usize::from(i < extra);
    let end = if i + 1 == parts { total } else { end * unit };
    start * unit..end
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(heads: usize, kv: usize, inter: usize, vocab: usize) -> ModelConfig {
        let mut m: ModelConfig = serde_json::from_value(serde_json::json!({
            "architecture": "LlamaForCausalLM", "vocab_size": vocab, "hidden_size": 64,
            "intermediate_size": inter, "num_layers": 5, "num_heads": heads,
            "num_kv_heads": kv, "head_dim": 16, "max_position_embeddings": 64,
            "norm": "rms_norm", "norm_eps": 1e-5, "mlp": "gated_silu",
            "position": {"type": "learned"}, "tie_word_embeddings": true,
            "bos_token_id": null, "eos_token_ids": []
        }))
        .expect("config");
        m.validate().expect("valid");
        m.eos_token_ids.clear();
        m
    }

    fn shards(m: &ModelConfig, tp: usize, pp: usize) -> Vec<Shard> {
        let map = Mapping::new(tp, pp).expect("mapping");
        (0..tp * pp)
            .map(|r| map.shard(m, r).expect("shard"))
            .collect()
    }

    #[test]
    fn split_covers_everything_once_in_units() {
        for (total, parts, unit) in [(10, 3, 1), (1536, 2, 128), (49152, 3, 1), (7, 7, 1)] {
            let r: Vec<_> = (0..parts).map(|i| split(total, parts, unit, i)).collect();
            assert_eq!(r[0].start, 0);
            assert_eq!(r[parts - 1].end, total);
            for w in r.windows(2) {
                assert_eq!(w[0].end, w[1].start);
                assert!(w[0].end % unit == 0 && !w[0].is_empty());
            }
        }
        assert_eq!(split(10, 3, 1, 0), 0..4);
        assert_eq!(split(1536, 2, 128, 1), 768..1536);
    }

    #[test]
    fn heads_split_by_kv_group_and_replicate_kv_when_fewer_than_ranks() {
        // SmolLM2-135M: 9 heads over 3 KV heads, tp 2: 6 + 3 query heads.
        let s = shards(&model(9, 3, 1536, 100), 2, 1);
        assert_eq!((s[0].q_heads.clone(), s[0].kv_heads.clone()), (0..6, 0..2));
        assert_eq!((s[1].q_heads.clone(), s[1].kv_heads.clone()), (6..9, 2..3));
        assert_eq!(s[1].inter_of(1536), 768..1536);
        // MQA over 2 ranks: the one KV head on both.
        let s = shards(&model(4, 1, 64, 100), 2, 1);
        assert_eq!((s[0].q_heads.clone(), s[0].kv_heads.clone()), (0..2, 0..1));
        assert_eq!((s[1].q_heads.clone(), s[1].kv_heads.clone()), (2..4, 0..1));
        let local = s[1].model(&model(4, 1, 64, 100));
        assert_eq!(
            (local.num_heads, local.num_kv_heads, local.intermediate_size),
            (2, 1, 32)
        );
        assert_eq!(
            s[1].qkv_rows(&model(4, 1, 64, 100)),
            vec![32..64, 64..80, 80..96]
        );
    }

    #[test]
    fn stages_hold_consecutive_layers_and_ranks_are_tp_major() {
        let s = shards(&model(4, 2, 64, 100), 2, 2);
        assert_eq!(s[1].layers, 0..3);
        assert_eq!(
            (s[2].tp_rank, s[2].pp_rank, s[2].layers.clone()),
            (0, 1, 3..5)
        );
        assert!(s[2].is_last_stage() && !s[2].is_first_stage());
        assert_eq!(s[3].vocab, 50..100);
    }

    #[test]
    fn impossible_splits_are_errors_that_say_why() {
        let m = model(4, 1, 64, 100);
        let e = Mapping::new(8, 1).unwrap().shard(&m, 0).unwrap_err();
        assert!(e.to_string().contains("at most the attention heads"), "{e}");
        let e = Mapping::new(3, 1)
            .unwrap()
            .shard(&model(4, 2, 64, 100), 0)
            .unwrap_err();
        assert!(e.to_string().contains("multiple of the KV heads"), "{e}");
        let e = Mapping::new(1, 6).unwrap().shard(&m, 0).unwrap_err();
        assert!(e.to_string().contains("only 5 layers"), "{e}");
        assert!(Mapping::new(0, 1).is_err());
        assert!(Mapping::new(2, 1).unwrap().shard(&m, 2).is_err());
    }
}
