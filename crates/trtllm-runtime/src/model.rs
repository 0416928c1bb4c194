//! The one parameterised decoder every family runs through: pre-norm blocks of attention and
//! MLP with residual connections, shaped by [`ModelConfig`] and the tensors the engine holds.

use std::sync::Arc;
use std::time::Duration;

use trtllm_quant::kernels::cpu::{self, AttentionSeq, RopeTable};
use trtllm_quant::DType;

use crate::engine::{names, EngineFile, TensorInfo};
use crate::kv_cache::{BlockId, KvPool};
use crate::tuning::{self, Tactics, TimingCache, TuneReport};
use crate::weights::{f32s, optional_f32, tensor, Linear, Weight};
use crate::{MlpKind, ModelConfig, NormKind, PositionKind, Result, RuntimeError};

/// Sees the input of every linear module during a forward pass, by module name
/// (`layers.{i}.{part}`, the names quantization configs use): how calibration watches the
/// float model.
pub trait ActivationObserver {
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
/// keys and values go to (and are read from) the pool blocks in `blocks`.
#[derive(Clone, Copy, Debug)]
pub struct SeqChunk<'a> {
    pub tokens: &'a [u32],
    pub past: usize,
    pub blocks: &'a [BlockId],
    pub logits: LogitsMode,
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

/// Each chunk as the attention kernels see it.
pub(crate) fn attention_seqs<'a>(batch: &[SeqChunk<'a>]) -> Vec<AttentionSeq<'a>> {
    batch
        .iter()
        .map(|c| AttentionSeq {
            blocks: c.blocks,
            past: c.past,
            n_new: c.tokens.len(),
        })
        .collect()
}

/// The whole batch's tokens, as each layer sees them.
#[derive(Clone, Copy)]
struct Step<'a> {
    batch: &'a [SeqChunk<'a>],
    positions: &'a [usize],
}

pub(crate) struct Norm {
    pub w: TensorInfo,
    pub b: Option<TensorInfo>,
}

pub(crate) struct Layer {
    pub attn_norm: Norm,
    pub qkv: Linear,
    pub o: Linear,
    pub mlp_norm: Norm,
    pub up: Linear,
    pub down: Linear,
}

/// The model's tensors, as the engine file holds them, and its forward pass on the CPU (the
/// CUDA decoder uploads these same tensors).
pub(crate) struct Decoder {
    pub cfg: ModelConfig,
    pub file: Arc<EngineFile>,
    pub embed: Weight,
    pub pos_embed: Option<Weight>,
    pub layers: Vec<Layer>,
    pub final_norm: Norm,
    pub lm_head: Weight,
    pub rope: Option<RopeTable>,
    /// The linear kernels' tactic per weight shape (defaults until [`Decoder::tune`]).
    tactics: Tactics,
}

impl Decoder {
    pub fn new(cfg: ModelConfig, file: Arc<EngineFile>) -> Result<Self> {
        let h = cfg.hidden_size;
        let f = &*file;
        let norm = |prefix: &str| -> Result<Norm> {
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
        let linear = |i: usize, part: &str, out: usize, inp: usize| {
            Linear::load(f, &format!("layers.{i}.{part}"), out, inp)
        };
        let inter = cfg.intermediate_size;
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let (up_name, up_rows) = cfg.mlp_in();
                Ok(Layer {
                    attn_norm: norm(&format!("layers.{i}.{}", names::ATTN_NORM))?,
                    qkv: linear(i, names::QKV, cfg.qkv_dim(), h)?,
                    o: linear(i, names::O, h, cfg.q_dim())?,
                    mlp_norm: norm(&format!("layers.{i}.{}", names::MLP_NORM))?,
                    up: linear(i, up_name, up_rows, h)?,
                    down: linear(i, names::DOWN, h, inter)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed = Weight::load(f, names::EMBED_PREFIX, cfg.vocab_size, h)?;
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            Weight::load(f, names::LM_HEAD_PREFIX, cfg.vocab_size, h)?
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
        let rope = match &cfg.position {
            PositionKind::Rope {
                theta,
                rotary_dim,
                scaling,
            } => Some(RopeTable::new(*rotary_dim, *theta, scaling)),
            PositionKind::Learned => None,
        };
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
            tactics: Tactics::default(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Chooses the linear kernels' tactics for this engine's weights on this machine: from
    /// `cache`, else timed within `budget` and added to it.
    pub fn tune(&mut self, cache: &mut TimingCache, budget: Duration) -> Result<TuneReport> {
        let file = self.file.clone();
        let weights = self
            .layers
            .iter()
            .flat_map(|l| [&l.qkv, &l.o, &l.up, &l.down]);
        let mut mats = Vec::with_capacity(self.layers.len() * 4 + 1);
        for w in weights.map(|l| &l.weight).chain([&self.lm_head]) {
            mats.push((w.mat(&file)?, w.describe()));
        }
        let (tactics, report) = tuning::tune(&mats, cache, budget);
        self.tactics = tactics;
        Ok(report)
    }

    fn f32s(&self, t: &TensorInfo) -> Result<&[f32]> {
        f32s(&self.file, t)
    }

    fn linear(
        &self,
        l: &Linear,
        x: &[f32],
        rows: usize,
        obs: &mut dyn ActivationObserver,
    ) -> Result<Vec<f32>> {
        obs.observe(&l.name, x, rows)?;
        l.forward(&self.file, x, rows, &self.tactics)
    }

    fn norm(&self, n: &Norm, x: &mut [f32]) -> Result<()> {
        let w = self.f32s(&n.w)?;
        match (self.cfg.norm, &n.b) {
            (NormKind::LayerNorm, Some(b)) => {
                cpu::layer_norm(x, w, self.f32s(b)?, self.cfg.norm_eps)?
            }
            _ => cpu::rms_norm(x, w, self.cfg.norm_eps)?,
        }
        Ok(())
    }

    /// Runs a batch of sequence chunks through the model in one pass, writing their keys and
    /// values into `pool` through each chunk's block table. Returns the logits rows the chunks
    /// ask for, chunk by chunk, `[rows × vocab]`. `obs` sees every linear module's input.
    pub fn forward_batch(
        &self,
        batch: &[SeqChunk<'_>],
        pool: &mut KvPool,
        obs: &mut dyn ActivationObserver,
    ) -> Result<Vec<f32>> {
        let h = self.cfg.hidden_size;
        let layout = BatchLayout::of(batch);
        let n = layout.tokens.len();
        let mut hidden = self.embed(&layout)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let step = Step {
                batch,
                positions: &layout.positions,
            };
            self.attention_block(i, layer, &mut hidden, step, pool, obs)?;
            self.mlp_block(layer, &mut hidden, n, obs)?;
        }
        let rows = &layout.logits_rows;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let mut x: Vec<f32> = rows
            .iter()
            .flat_map(|&r| hidden[r * h..(r + 1) * h].iter().copied())
            .collect();
        self.norm(&self.final_norm, &mut x)?;
        let head = self.lm_head.mat(&self.file)?;
        let mut logits = vec![0f32; rows.len() * self.cfg.vocab_size];
        let tactic = self.tactics.get(rows.len());
        cpu::linear_with(&x, rows.len(), head, None, &mut logits, &tactic)?;
        Ok(logits)
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
        Ok(hidden)
    }

    fn attention_block(
        &self,
        i: usize,
        layer: &Layer,
        hidden: &mut [f32],
        Step { batch, positions }: Step<'_>,
        pool: &mut KvPool,
        obs: &mut dyn ActivationObserver,
    ) -> Result<()> {
        let c = &self.cfg;
        let n = positions.len();
        let (qd, kvd) = (c.q_dim(), c.kv_dim());
        let mut x = hidden.to_vec();
        self.norm(&layer.attn_norm, &mut x)?;
        let qkv = self.linear(&layer.qkv, &x, n, obs)?;
        let mut q = Vec::with_capacity(n * qd);
        let mut k = Vec::with_capacity(n * kvd);
        for row in qkv.chunks_exact(c.qkv_dim()) {
            q.extend_from_slice(&row[..qd]);
            k.extend_from_slice(&row[qd..qd + kvd]);
        }
        if let Some(rope) = &self.rope {
            cpu::apply_rope(&mut q, positions, c.num_heads, c.head_dim, rope)?;
            cpu::apply_rope(&mut k, positions, c.num_kv_heads, c.head_dim, rope)?;
        }
        let mut r = 0;
        for chunk in batch {
            for pos in chunk.past..chunk.past + chunk.tokens.len() {
                let v = &qkv[r * c.qkv_dim() + qd + kvd..(r + 1) * c.qkv_dim()];
                pool.write(i, chunk.blocks, pos, &k[r * kvd..(r + 1) * kvd], v)?;
                r += 1;
            }
        }
        let seqs = attention_seqs(batch);
        let mut attn = vec![0f32; n * qd];
        cpu::paged_attention(&q, pool.layer(i)?, &seqs, c.attention_shape(), &mut attn)?;
        let o = self.linear(&layer.o, &attn, n, obs)?;
        cpu::add_inplace(hidden, &o)?;
        Ok(())
    }

    fn mlp_block(
        &self,
        layer: &Layer,
        hidden: &mut [f32],
        n: usize,
        obs: &mut dyn ActivationObserver,
    ) -> Result<()> {
        let mut x = hidden.to_vec();
        self.norm(&layer.mlp_norm, &mut x)?;
        let up = self.linear(&layer.up, &x, n, obs)?;
        let act = match self.cfg.mlp {
            MlpKind::GatedSilu => {
                let mut a = vec![0f32; n * self.cfg.intermediate_size];
                cpu::silu_mul(&up, n, &mut a)?;
                a
            }
            MlpKind::GeluTanh => {
                let mut a = up;
                cpu::gelu_tanh(&mut a);
                a
            }
        };
        let down = self.linear(&layer.down, &act, n, obs)?;
        cpu::add_inplace(hidden, &down)?;
        Ok(())
    }
}
