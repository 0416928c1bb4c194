//! The model as the engine file holds it ([`HostModel`]: configuration, tensor locations, the
//! embedding tables), and the shapes of a batch: chunks of sequences, their flattened layout,
//! which rows want logits. The forward pass itself is [`crate::decoder`].

use std::sync::Arc;

use trtllm_quant::kernels::cpu::{self, AttentionSeq, MatRef};
use trtllm_quant::DType;

use crate::engine::{names, EngineFile, TensorInfo};
use crate::kv_cache::BlockId;
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
pub(crate) struct HostModel {
    pub cfg: ModelConfig,
    pub file: Arc<EngineFile>,
    pub embed: Weight,
    pub pos_embed: Option<Weight>,
    pub layers: Vec<Layer>,
    pub final_norm: Norm,
    /// The tied embedding table or its own matrix; never bias or activation scales.
    pub lm_head: Linear,
    pub(crate) rope: Option<Ropes>,
}

impl HostModel {
    pub fn new(cfg: ModelConfig, file: Arc<EngineFile>) -> Result<Self> {
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
        let layers = (0..cfg.num_layers)
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
        let embed = Weight::load(f, names::EMBED_PREFIX, cfg.vocab_size, h)?;
        let lm_head = Linear {
            name: names::LM_HEAD_PREFIX.into(),
            weight: if cfg.tie_word_embeddings {
                embed.clone()
            } else {
                Weight::load(f, names::LM_HEAD_PREFIX, cfg.vocab_size, h)?
            },
            bias: None,
            input_perm: None,
            pre_quant_scale: None,
            input_scale: None,
        };
        let pos_embed = match cfg.position {
            PositionKind::Learned => Some(Weight::load(
                f,
                names::POS_EMBED_PREFIX,
                cfg.max_position_embeddings,
                h,
            )?),
            PositionKind::Rope { .. } => None,
        };
        let rope = Ropes::of(&cfg);
        let final_norm = norm(names::FINAL_NORM)?;
        Ok(Self {
            cfg,
            file,
            embed,
            pos_embed,
            layers,
            final_norm,
            lm_head,
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
            .chain([&self.lm_head])
            .map(|l| Ok((l.weight.mat(&self.file)?, l.weight.describe())))
            .collect()
    }

    /// The token embeddings of a batch (plus learned position embeddings), gathered from the
    /// mapped tables.
    pub fn embed(&self, layout: &BatchLayout) -> Result<Vec<f32>> {
        let n = layout.tokens.len();
        let mut hidden = vec![0f32; n * self.cfg.hidden_size];
        cpu::embedding_gather(self.embed.mat(&self.file)?, &layout.tokens, &mut hidden)?;
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
