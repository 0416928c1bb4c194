//! An adapter cut as its engine is cut over ranks ([`Shard`]), so each rank adds its part of
//! every update: a column-parallel module (QKV, the MLP's input) keeps the rows of B that make
//! this rank's outputs; a row-parallel one (O, down) keeps the columns of A that read this
//! rank's inputs, and its partial update joins the partial product in the all-reduce
//! (`Σ_r (x_r·A_rᵀ)·Bᵀ = (x·Aᵀ)·Bᵀ`). A stage keeps only its layers.

use std::collections::BTreeMap;
use std::ops::Range;

use trtllm_quant::kernels::LoraBlock;

use super::{LoraAdapter, LoraFactors, LoraModule};
use crate::parallel::Shard;
use crate::ModelConfig;

impl LoraAdapter {
    /// This adapter (read for the whole model `full`) as rank `shard` holds it.
    pub fn shard(&self, full: &ModelConfig, shard: &Shard) -> LoraAdapter {
        let layers = self
            .layers
            .iter()
            .enumerate()
            .map(|(i, modules)| match shard.layers.contains(&i) {
                false => BTreeMap::new(),
                true => modules
                    .iter()
                    .map(|(&m, f)| {
                        let part = match m {
                            LoraModule::Qkv => rows_of(f, &shard.qkv_rows(full)),
                            LoraModule::Up => rows_of(f, &shard.mlp_in_rows(full, i)),
                            LoraModule::O => cols_of(f, shard.o_cols(full)),
                            LoraModule::Down => cols_of(f, shard.inter(full, i)),
                        };
                        (m, part)
                    })
                    .collect(),
            })
            .collect();
        LoraAdapter {
            layers,
            ..self.clone()
        }
    }
}

/// `f` for the outputs in `rows` (in order, one after another).
fn rows_of(f: &LoraFactors, rows: &[Range<usize>]) -> LoraFactors {
    let mut b = Vec::with_capacity(rows.iter().map(|r| r.len()).sum::<usize>() * f.rank);
    let mut blocks = Vec::new();
    for r in rows {
        let at = b.len() / f.rank.max(1);
        b.extend_from_slice(&f.b[r.start * f.rank..r.end * f.rank]);
        for block in &f.blocks {
            let (start, end) = (
                block.outputs.start.max(r.start),
                block.outputs.end.min(r.end),
            );
            if start < end {
                blocks.push(LoraBlock {
                    outputs: at + start - r.start..at + end - r.start,
                    ranks: block.ranks.clone(),
                });
            }
        }
    }
    LoraFactors {
        a: f.a.clone(),
        outputs: b.len() / f.rank.max(1),
        b,
        blocks,
        ..*f
    }
}

/// `f` for the inputs in `cols`.
fn cols_of(f: &LoraFactors, cols: Range<usize>) -> LoraFactors {
    let a =
        f.a.chunks_exact(f.inputs.max(1))
            .flat_map(|row| &row[cols.clone()])
            .copied()
            .collect();
    LoraFactors {
        a,
        b: f.b.clone(),
        inputs: cols.len(),
        blocks: f.blocks.clone(),
        ..*f
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::Mapping;

    fn model() -> ModelConfig {
        let mut m: ModelConfig = serde_json::from_value(serde_json::json!({
            "architecture": "LlamaForCausalLM", "vocab_size": 50, "hidden_size": 8,
            "intermediate_size": 12, "num_layers": 2, "num_heads": 4,
            "num_kv_heads": 2, "head_dim": 2, "max_position_embeddings": 64,
            "norm": "rms_norm", "norm_eps": 1e-5, "mlp": "gated_silu",
            "position": {"type": "learned"}, "tie_word_embeddings": true,
            "bos_token_id": null, "eos_token_ids": []
        }))
        .expect("config");
        m.eos_token_ids.clear();
        m
    }

    /// Factors with distinct values, and blocks as a fused module of `parts` projections has.
    fn factors(inputs: usize, outputs: usize, parts: &[Range<usize>]) -> LoraFactors {
        let rank = 2 * parts.len();
        let value = |i: usize| ((i * 7919) % 97) as f32 / 97.0 - 0.5;
        let mut b = vec![0.0; outputs * rank];
        let blocks = parts
            .iter()
            .enumerate()
            .map(|(p, rows)| {
                for o in rows.clone() {
                    for c in 2 * p..2 * p + 2 {
                        b[o * rank + c] = value(o * rank + c + 1000);
                    }
                }
                LoraBlock {
                    outputs: rows.clone(),
                    ranks: 2 * p..2 * p + 2,
                }
            })
            .collect();
        LoraFactors {
            a: (0..rank * inputs).map(value).collect(),
            b,
            rank,
            inputs,
            outputs,
            blocks,
        }
    }

    /// `(x·Aᵀ)·Bᵀ` for one row, honouring the blocks as the kernels do.
    fn update(f: &LoraFactors, x: &[f32]) -> Vec<f32> {
        let ax: Vec<f32> =
            f.a.chunks_exact(f.inputs)
                .map(|row| row.iter().zip(x).map(|(a, x)| a * x).sum())
                .collect();
        let mut y = vec![0.0; f.outputs];
        for block in &f.blocks {
            for o in block.outputs.clone() {
                y[o] = block
                    .ranks
                    .clone()
                    .map(|r| f.b[o * f.rank + r] * ax[r])
                    .sum();
            }
        }
        y
    }

    #[test]
    fn the_ranks_updates_make_the_whole_update() {
        let full = model();
        let (h, qkv, inter) = (8, full.qkv_dim(), 12);
        // q, k and v targeted; gate and up fused; o and down whole.
        let qkv_f = factors(h, qkv, &[0..8, 8..12, 12..16]);
        let up_f = factors(h, 2 * inter, &[0..inter, inter..2 * inter]);
        let whole = 0..h;
        let o_f = factors(full.q_dim(), h, std::slice::from_ref(&whole));
        let down_f = factors(inter, h, std::slice::from_ref(&whole));
        let adapter = LoraAdapter {
            name: "t".into(),
            rank: 2,
            layers: vec![
                BTreeMap::new(),
                BTreeMap::from([
                    (LoraModule::Qkv, qkv_f.clone()),
                    (LoraModule::Up, up_f.clone()),
                    (LoraModule::O, o_f.clone()),
                    (LoraModule::Down, down_f.clone()),
                ]),
            ],
            dir: None,
        };
        let x: Vec<f32> = (0..inter).map(|i| i as f32 * 0.25 - 1.0).collect();
        let map = Mapping::new(2, 1).unwrap();
        let shards: Vec<Shard> = (0..2).map(|r| map.shard(&full, r).unwrap()).collect();
        let parts: Vec<LoraAdapter> = shards.iter().map(|s| adapter.shard(&full, s)).collect();
        for (m, f, input) in [(LoraModule::Qkv, &qkv_f, h), (LoraModule::Up, &up_f, h)] {
            // Column-parallel: each rank's outputs are the whole update's at its rows.
            let whole = update(f, &x[..input]);
            for (s, p) in shards.iter().zip(&parts) {
                let rows = match m {
                    LoraModule::Qkv => s.qkv_rows(&full),
                    _ => s.mlp_in_rows(&full, 1),
                };
                let want: Vec<f32> = rows
                    .iter()
                    .flat_map(|r| whole[r.clone()].to_vec())
                    .collect();
                assert_eq!(update(&p.layers[1][&m], &x[..input]), want, "{m:?}");
            }
        }
        for (m, f) in [(LoraModule::O, &o_f), (LoraModule::Down, &down_f)] {
            // Row-parallel: the ranks' updates over their inputs sum to the whole update.
            let whole = update(f, &x[..f.inputs]);
            let mut sum = vec![0.0; h];
            for (s, p) in shards.iter().zip(&parts) {
                let cols = match m {
                    LoraModule::O => s.o_cols(&full),
                    _ => s.inter(&full, 1),
                };
                for (acc, v) in sum.iter_mut().zip(update(&p.layers[1][&m], &x[cols])) {
                    *acc += v;
                }
            }
            for (a, b) in sum.iter().zip(&whole) {
                assert!((a - b).abs() < 1e-5, "{m:?}: {sum:?} vs {whole:?}");
            }
        }
        // A stage keeps only its layers.
        let stage = Mapping::new(1, 2).unwrap().shard(&full, 0).unwrap();
        let first = adapter.shard(&full, &stage);
        assert!(first.layers[1].is_empty() && first.layers.len() == 2);
    }
}
