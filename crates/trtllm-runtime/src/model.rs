//! The model as the engine file holds it ([`HostModel`]: configuration, tensor locations, the
//! embedding tables), and the shapes of a batch: chunks of sequences, their flattened layout,
//! which rows want logits. The forward pass itself is [`crate::decoder`].

use std::ops::Range;
use std::sync::Arc;

use trtllm_quant::kernels::cpu::{self, AttentionSeq, MatRef};
use trtllm_quant::DType;

use crate::engine::{names, EngineFile, TensorInfo};
use crate::kv_cache::BlockId;
use crate::parallel::Shard;
use crate::rope::Ropes;
pub(crate) use crate::weights::Linear;
use crate::weights::{optional_f32, tensor, Weight};
use crate::{ModelConfig, NormKind, PositionKind, Result, RuntimeError};

/// Sees the input of every linear module during a forward pass, by module name
/// (`layers.{i}.{part}`, the names quantization configs use): how calibration watches the
/// float model.
pub trait ActivationObserver: Send {
    fn observe(&mut self, module: &str, x: &[f32], rows: usize) -> Result<()>;
}

impl ActivationObserver for trtllm_quant::Calibration {
    fn observe(&mut self, module: &str, x: &[f32], rows: usize) -> Result<()> {
        Ok(trtllm_quant::Calibration::observe(self, module, x, rows)?)
    }
}

/// The observer of ordinary forward passes.
pub(crate) struct NoObserver;

impl ActivationObserver for NoObserver {
    fn observe(&mut self, _: &str, _: &[f32], _: usize) -> Result<()> {
        Ok(())
    }
}

/// Which positions the forward pass computes logits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum LogitsMode {
    /// None (a prompt chunk that is not the prompt's last).
    Skip,
    /// Only the last token (generation).
    Last,
    /// Every token (scoring, perplexity).
    All,
}

/// One sequence's share of a batched forward pass: `tokens` at positions `past..`, whose
/// keys and values go to (and are read from) the pool blocks in `blocks`: one table per KV
/// group ([`crate::KvGroups`]), each layer using its group's.
#[derive(Clone, Copy, Debug)]
pub struct SeqChunk<'a> {
    pub tokens: &'a [u32],
    pub past: usize,
    pub blocks: &'a [&'a [BlockId]],
    pub logits: LogitsMode,
    /// The LoRA adapter these tokens run with (loaded by this runner), if any.
    pub lora: Option<&'a crate::LoraWeights>,
}

/// A batch flattened: every chunk's tokens and positions back to back, and the rows (indices
/// into them) whose logits the chunks ask for.
pub(crate) struct BatchLayout {
    pub tokens: Vec<u32>,
    pub positions: Vec<usize>,
    pub logits_rows: Vec<usize>,
}

impl BatchLayout {
    pub fn of(batch: &[SeqChunk<'_>]) -> Self {
        let mut l = BatchLayout {
            tokens: Vec::new(),
            positions: Vec::new(),
            logits_rows: Vec::new(),
        };
        for c in batch {
            let start = l.tokens.len();
            let len = c.tokens.len();
            l.tokens.extend_from_slice(c.tokens);
            l.positions.extend(c.past..c.past + len);
            match c.logits {
                LogitsMode::Skip => {}
                LogitsMode::Last => l.logits_rows.push(start + len - 1),
                LogitsMode::All => l.logits_rows.extend(start..start + len),
            }
        }
        l
    }
}

/// Each chunk as the attention kernels of KV group `group` see it.
pub(crate) fn attention_seqs<'a>(batch: &[SeqChunk<'a>], group: usize) -> Vec<AttentionSeq<'a>> {
    batch
        .iter()
        .map(|c| AttentionSeq {
            blocks: c.blocks[group],
            past: c.past,
            n_new: c.tokens.len(),
        })
        .collect()
}

#[derive(Clone, Debug)]
pub(crate) struct Norm {
    pub w: TensorInfo,
    pub b: Option<TensorInfo>,
}

/// One layer's tensors; the linear layers carry their module names (`layers.{i}.{part}`).
pub(crate) struct Layer {
    pub attn_norm: Norm,
    pub qkv: Linear,
    /// The query and key head norms, where the config has them.
    pub qk_norm: Option<(Norm, Norm)>,
    /// The attention and MLP output norms, where the config has them.
    pub post_norms: Option<(Norm, Norm)>,
    pub o: Linear,
    pub mlp_norm: Norm,
    pub mlp: Mlp,
}

/// A layer's MLP: one, or a routed mixture of experts. One per layer: the variants' size
/// difference costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Mlp {
    Dense {
        up: Linear,
        down: Linear,
    },
    Experts {
        router: Linear,
        experts: Vec<(Linear, Linear)>,
    },
}

impl Mlp {
    /// Every linear layer in it.
    pub fn linears(&self) -> Vec<&Linear> {
        match self {
            Mlp::Dense { up, down } => vec![up, down],
            Mlp::Experts { router, experts } => std::iter::once(router)
                .chain(experts.iter().flat_map(|(u, d)| [u, d]))
                .collect(),
        }
    }
}

/// The model's tensors, as the engine file holds them (each backend places them on its device).
/// A rank of a split engine holds its shard: its stage's layers (the embedding on the first
/// stage, the final norm and head on the last), its heads, MLP columns and vocabulary rows.
pub(crate) struct HostModel {
    /// The model as this rank computes it ([`Shard::model`]: its heads and MLP columns).
    pub cfg: ModelConfig,
    pub file: Arc<EngineFile>,
    /// The rows `vocab` of the token embeddings, where this rank gathers them.
    pub embed: Option<Weight>,
    pub pos_embed: Option<Weight>,
    /// Layers `first_layer..` of the model.
    pub layers: Vec<Layer>,
    pub first_layer: usize,
    pub final_norm: Option<Norm>,
    /// The tied embedding table or its own matrix (rows `vocab`); never bias or activation
    /// scales. Only where the last layer is.
    pub lm_head: Option<Linear>,
    /// The vocabulary rows of the embedding and head held here.
    pub vocab: Range<usize>,
    pub(crate) rope: Option<Ropes>,
}

impl HostModel {
    /// The tensors of `shard` (the whole model without one) in `file`, for `full`.
    pub fn new(full: &ModelConfig, file: Arc<EngineFile>, shard: Option<&Shard>) -> Result<Self> {
        let cfg = shard.map_or_else(|| full.clone(), |s| s.model(full));
        let layers = shard.map_or(0..cfg.num_layers, |s| s.layers.clone());
        let vocab = shard.map_or(0..cfg.vocab_size, |s| s.vocab.clone());
        let (first, last) = (layers.start == 0, layers.end == cfg.num_layers);
        let h = cfg.hidden_size;
        let f = &*file;
        let sized_norm = |prefix: &str, h: usize| -> Result<Norm> {
            let w = tensor(f, &format!("{prefix}.weight"), &[h])?;
            let b = optional_f32(f, &format!("{prefix}.bias"), &[h])?;
            if w.dtype != DType::F32 {
                return Err(RuntimeError::InvalidConfig(format!(
                    "norm '{prefix}' must be stored as float32"
                )));
            }
            if cfg.norm == NormKind::LayerNorm && b.is_none() {
                return Err(RuntimeError::MissingTensor(format!("{prefix}.bias")));
            }
            Ok(Norm { w, b })
        };
        let norm = |prefix: &str| sized_norm(prefix, h);
        let head_norm =
            |i: usize, part: &str| sized_norm(&format!("layers.{i}.{part}"), cfg.head_dim);
        let linear = |i: usize, part: &str, out: usize, inp: usize| {
            Linear::load(f, &format!("layers.{i}.{part}"), out, inp)
        };
        let first_layer = layers.start;
        let layers = layers
            .map(|i| {
                let (up_name, up_rows) = cfg.mlp_in(i);
                let inter = cfg.mlp_inter(i);
                Ok(Layer {
                    attn_norm: norm(&format!("layers.{i}.{}", names::ATTN_NORM))?,
                    qkv: linear(i, names::QKV, cfg.qkv_dim(), h)?,
                    qk_norm: match cfg.features.qk_norm {
                        true => Some((head_norm(i, names::Q_NORM)?, head_norm(i, names::K_NORM)?)),
                        false => None,
                    },
                    post_norms: match cfg.features.post_norms {
                        true => Some((
                            norm(&format!("layers.{i}.{}", names::POST_ATTN_NORM))?,
                            norm(&format!("layers.{i}.{}", names::POST_MLP_NORM))?,
                        )),
                        false => None,
                    },
                    o: linear(i, names::O, h, cfg.q_dim())?,
                    mlp_norm: norm(&format!("layers.{i}.{}", names::MLP_NORM))?,
                    mlp: match cfg.moe(i) {
                        None => Mlp::Dense {
                            up: linear(i, up_name, up_rows, h)?,
                            down: linear(i, names::DOWN, h, inter)?,
                        },
                        Some(m) => Mlp::Experts {
                            router: linear(i, names::ROUTER, m.num_experts, h)?,
                            experts: (0..m.num_experts)
                                .map(|e| {
                                    let part = |p: &str| format!("{}.{e}.{p}", names::EXPERTS);
                                    Ok((
                                        linear(i, &part(up_name), up_rows, h)?,
                                        linear(i, &part(names::DOWN), h, inter)?,
                                    ))
                                })
                                .collect::<Result<Vec<_>>>()?,
                        },
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let table = first || (last && cfg.tie_word_embeddings);
        let embed = match table {
            true => Some(Weight::load(f, names::EMBED_PREFIX, vocab.len(), h)?),
            false => None,
        };
        let lm_head = match (last, &embed) {
            (false, _) => None,
            (true, Some(e)) if cfg.tie_word_embeddings => Some(e.clone()),
            (true, _) => Some(Weight::load(f, names::LM_HEAD_PREFIX, vocab.len(), h)?),
        };
        let lm_head = lm_head.map(|weight| Linear {
            name: names::LM_HEAD_PREFIX.into(),
            weight,
            bias: None,
            input_perm: None,
            pre_quant_scale: None,
            input_scale: None,
        });
        let embed = embed.filter(|_| first);
        let pos_embed = match cfg.position {
            PositionKind::Learned if first => Some(Weight::load(
                f,
                names::POS_EMBED_PREFIX,
                cfg.max_position_embeddings,
                h,
            )?),
            _ => None,
        };
        let rope = Ropes::of(&cfg);
        let final_norm = last.then(|| norm(names::FINAL_NORM)).transpose()?;
        Ok(Self {
            cfg,
            file,
            embed,
            pos_embed,
            layers,
            first_layer,
            final_norm,
            lm_head,
            vocab,
            rope,
        })
    }

    /// Every linear layer's weights, with the shape and format the timing cache keys on.
    pub fn matrices(&self) -> Result<Vec<(MatRef<'_>, String)>> {
        let linears = self
            .layers
            .iter()
            .flat_map(|l| [&l.qkv, &l.o].into_iter().chain(l.mlp.linears()));
        linears
            .chain(&self.lm_head)
            .map(|l| Ok((l.weight.mat(&self.file)?, l.weight.describe())))
            .collect()
    }

    /// The token embeddings of a batch from the rows this rank holds (zeros for the tokens
    /// outside them, which other ranks hold), gathered from the mapped table.
    pub fn embed_tokens(&self, layout: &BatchLayout) -> Result<Vec<f32>> {
        let h = self.cfg.hidden_size;
        let embed = self
            .embed
            .as_ref()
            .ok_or_else(|| RuntimeError::MissingTensor(names::EMBED_PREFIX.into()))?;
        let table = embed.mat(&self.file)?;
        let mut hidden = vec![0f32; layout.tokens.len() * h];
        if self.vocab == (0..self.cfg.vocab_size) {
            cpu::embedding_gather(table, &layout.tokens, &mut hidden)?;
            return Ok(hidden);
        }
        let (rows, ids): (Vec<usize>, Vec<u32>) = (layout.tokens.iter().enumerate())
            .filter(|(_, &t)| self.vocab.contains(&(t as usize)))
            .map(|(r, &t)| (r, t - self.vocab.start as u32))
            .unzip();
        let mut held = vec![0f32; ids.len() * h];
        cpu::embedding_gather(table, &ids, &mut held)?;
        for (&r, row) in rows.iter().zip(held.chunks_exact(h)) {
            hidden[r * h..(r + 1) * h].copy_from_slice(row);
        }
        Ok(hidden)
    }

    /// The first layer's input from the token embeddings of the batch (summed over the ranks
    /// holding parts of the vocabulary): learned position embeddings added, scaled.
    pub fn embed_finish(&self, layout: &BatchLayout, mut hidden: Vec<f32>) -> Result<Vec<f32>> {
        if let Some(pe) = &self.pos_embed {
            let mut pos = vec![0f32; hidden.len()];
            let ids: Vec<u32> = layout.positions.iter().map(|&p| p as u32).collect();
            cpu::embedding_gather(pe.mat(&self.file)?, &ids, &mut pos)?;
            cpu::add_inplace(&mut hidden, &pos)?;
        }
        if let Some(s) = self.cfg.features.embed_scale {
            hidden.iter_mut().for_each(|x| *x *= s);
        }
        Ok(hidden)
    }
}
