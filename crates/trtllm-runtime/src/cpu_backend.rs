//! The CPU as a [`Backend`]: weights read in place from the memory-mapped engine, activations
//! in host vectors, the kernels of `trtllm_kernels::cpu` with the tactics the tuner chose.

use std::sync::Arc;
use std::time::Duration;

use trtllm_quant::kernels::cpu::{self, AttentionPath, AttentionSeq, RopeFreqs};

use crate::decoder::{Backend, Decoder};
use crate::engine::EngineFile;
use crate::kv_cache::{HostKv, KvGroups, KvPool};
use crate::lora::{DeviceLora, LoraFactors, LoraInner, LoraWeights};
use crate::model::{
    attention_seqs, ActivationObserver, BatchLayout, HostModel, Linear, Norm, SeqChunk,
};
use crate::rope::Ropes;
use crate::tuning::{self, Tactics, TimingCache, TuneReport};
use crate::weights::f32s;
use crate::{MlpKind, ModelConfig, NormKind, Result};
use trtllm_quant::kernels::{LoraBlock, LoraDims, LoraSegment};

pub(crate) struct CpuBackend {
    cfg: ModelConfig,
    file: Arc<EngineFile>,
    rope: Option<Ropes>,
    groups: KvGroups,
    /// The linear kernels' tactic per weight shape (defaults until [`Decoder::tune`]).
    tactics: Tactics,
    /// Batch invariance: the tactics' invariant form, attention row by row.
    invariant: bool,
}

impl CpuBackend {
    pub fn new(model: &HostModel) -> Self {
        Self {
            cfg: model.cfg.clone(),
            file: model.file.clone(),
            rope: model.rope.clone(),
            groups: model.cfg.kv_groups(),
            tactics: Tactics::default(),
            invariant: false,
        }
    }
}

/// One module's LoRA factors in the layout `cpu::lora_add` reads (B transposed).
pub(crate) struct HostLoraMat {
    a: Vec<f32>,
    bt: Vec<f32>,
    rank: usize,
    blocks: Vec<LoraBlock>,
    dims: LoraDims,
}

/// A pass's adapted rows: its segments, checked by `cpu::lora_add` at every use.
pub(crate) struct HostLoraRows {
    segments: Vec<LoraSegment>,
}

impl Decoder<CpuBackend> {
    /// Chooses the linear kernels' tactics for this engine's weights on this machine: from
    /// `cache`, else timed within `budget` and added to it.
    pub fn tune(&mut self, cache: &mut TimingCache, budget: Duration) -> Result<TuneReport> {
        let (tactics, report) = tuning::tune(&self.model.matrices()?, cache, budget);
        self.backend.tactics = tactics;
        Ok(report)
    }

    /// Batch invariance: from now on a sequence's logits do not depend, to the last bit, on
    /// the other sequences of a pass or on how its prompt is split into chunks (one summation
    /// order per output element in every linear layer and attention row).
    pub fn set_batch_invariant(&mut self, on: bool) {
        self.backend.invariant = on;
    }
}

/// The batch as every layer sees it.
pub(crate) struct CpuStep<'a> {
    batch: &'a [SeqChunk<'a>],
    positions: Vec<usize>,
    /// Each rotary table's frequencies for this step's tokens.
    rope: Vec<RopeFreqs>,
    /// The chunks as each KV group's attention sees them.
    seqs: Vec<Vec<AttentionSeq<'a>>>,
}

impl Backend for CpuBackend {
    type Act = Vec<f32>;
    type Linear = Linear;
    type Norm = Norm;
    type Step<'a> = CpuStep<'a>;
    type Pool = HostKv;
    type LoraMat = HostLoraMat;
    type LoraRows = HostLoraRows;

    fn linear_of(&self, _: &HostModel, l: &Linear) -> Result<Linear> {
        Ok(l.clone())
    }

    fn norm_of(&self, _: &HostModel, n: &Norm) -> Result<Norm> {
        Ok(n.clone())
    }

    fn upload(&self, x: Vec<f32>) -> Result<Vec<f32>> {
        Ok(x)
    }

    fn all_reduce(&self, mut x: Vec<f32>, tp: &dyn crate::parallel::Comm) -> Result<Vec<f32>> {
        tp.all_reduce_sum(&mut x)?;
        Ok(x)
    }

    fn download(&self, x: Vec<f32>) -> Result<Vec<f32>> {
        Ok(x)
    }

    fn pool<'p>(&self, pool: &'p mut KvPool) -> Result<&'p mut HostKv> {
        pool.host_mut()
    }

    fn lora_mat(&self, f: &LoraFactors) -> Result<HostLoraMat> {
        Ok(HostLoraMat {
            a: f.a.clone(),
            bt: f.b_transposed(),
            rank: f.rank,
            blocks: f.blocks.clone(),
            dims: f.dims(),
        })
    }

    fn lora_rows(&self, segments: &[LoraSegment], _: usize, _: usize) -> Result<HostLoraRows> {
        Ok(HostLoraRows {
            segments: segments.to_vec(),
        })
    }

    fn lora_add(
        &self,
        x: &Vec<f32>,
        y: &mut Vec<f32>,
        rows: &HostLoraRows,
        slots: &[Option<&HostLoraMat>],
    ) -> Result<()> {
        let Some(dims) = slots.iter().flatten().map(|m| m.dims).next() else {
            return Ok(());
        };
        let mats: Vec<_> = slots
            .iter()
            .map(|m| {
                m.map(|m| cpu::LoraMat {
                    a: &m.a,
                    bt: &m.bt,
                    rank: m.rank,
                    blocks: &m.blocks,
                })
            })
            .collect();
        Ok(cpu::lora_add(x, y, dims, &rows.segments, &mats)?)
    }

    fn lora<'l>(&self, w: &'l LoraWeights) -> Result<&'l DeviceLora<Self>> {
        match &w.inner {
            LoraInner::Cpu(d) => Ok(d),
            #[allow(unreachable_patterns)]
            _ => Err(w.wrong_device()),
        }
    }

    fn step<'a>(
        &self,
        batch: &'a [SeqChunk<'a>],
        layout: &BatchLayout,
        _: &mut HostKv,
    ) -> Result<CpuStep<'a>> {
        Ok(CpuStep {
            batch,
            positions: layout.positions.clone(),
            rope: self
                .rope
                .as_ref()
                .map(|r| r.step(batch))
                .unwrap_or_default(),
            seqs: (0..self.groups.windows.len())
                .map(|g| attention_seqs(batch, g))
                .collect(),
        })
    }

    fn norm(&self, n: &Norm, x: &Vec<f32>, residual: Option<&mut Vec<f32>>) -> Result<Vec<f32>> {
        let mut out = match residual {
            Some(r) => {
                cpu::add_inplace(r, x)?;
                r.clone()
            }
            None => x.clone(),
        };
        let w = f32s(&self.file, &n.w)?;
        match (self.cfg.norm, &n.b) {
            (NormKind::LayerNorm, Some(b)) => {
                cpu::layer_norm(&mut out, w, f32s(&self.file, b)?, self.cfg.norm_eps)?
            }
            _ => cpu::rms_norm(&mut out, w, self.cfg.norm_eps)?,
        }
        Ok(out)
    }

    fn linear(&self, l: &Linear, x: &Vec<f32>, rows: usize) -> Result<Vec<f32>> {
        match self.invariant {
            true => l.forward(&self.file, x, rows, &self.tactics.invariant()),
            false => l.forward(&self.file, x, rows, &self.tactics),
        }
    }

    fn observe(
        &self,
        obs: &mut dyn ActivationObserver,
        module: &str,
        x: &Vec<f32>,
        rows: usize,
    ) -> Result<()> {
        obs.observe(module, x, rows)
    }

    fn split_cols<const N: usize>(
        &self,
        x: &Vec<f32>,
        total: usize,
        widths: [usize; N],
    ) -> Result<[Vec<f32>; N]> {
        let rows = x.len() / total.max(1);
        let mut parts: [Vec<f32>; N] =
            std::array::from_fn(|i| Vec::with_capacity(rows * widths[i]));
        for row in x.chunks_exact(total) {
            let mut start = 0;
            for (part, &w) in parts.iter_mut().zip(&widths) {
                part.extend_from_slice(&row[start..start + w]);
                start += w;
            }
        }
        Ok(parts)
    }

    fn rope(&self, x: &mut Vec<f32>, heads: usize, layer: usize, step: &CpuStep<'_>) -> Result<()> {
        if let Some(rope) = &self.rope {
            let freqs = &step.rope[rope.table_of(layer)];
            cpu::apply_rope(x, &step.positions, heads, self.cfg.head_dim, freqs)?;
        }
        Ok(())
    }

    fn attention(
        &self,
        layer: usize,
        (q, k, v): (&Vec<f32>, &Vec<f32>, &Vec<f32>),
        step: &CpuStep<'_>,
        pool: &mut HostKv,
    ) -> Result<Vec<f32>> {
        let kvd = self.cfg.kv_dim();
        let group = self.groups.of_layer[layer];
        let mut r = 0;
        for chunk in step.batch {
            for pos in chunk.past..chunk.past + chunk.tokens.len() {
                let row = r * kvd..(r + 1) * kvd;
                pool.write(layer, chunk.blocks[group], pos, &k[row.clone()], &v[row]);
                r += 1;
            }
        }
        let mut out = vec![0f32; q.len()];
        let shape = self.cfg.attention_shape(layer);
        let seqs = (&step.seqs[group][..], shape);
        let path = match self.invariant {
            true => AttentionPath::Rows,
            false => AttentionPath::Fastest,
        };
        cpu::paged_attention_with(q, pool.layer(layer), seqs, &mut out, path)?;
        Ok(out)
    }

    fn activation(&self, mlp: MlpKind, up: Vec<f32>, rows: usize) -> Result<Vec<f32>> {
        Ok(match mlp {
            MlpKind::GatedSilu => {
                let mut a = vec![0f32; up.len() / 2];
                cpu::silu_mul(&up, rows, &mut a)?;
                a
            }
            MlpKind::GatedGeluTanh => {
                let mut a = vec![0f32; up.len() / 2];
                cpu::gelu_tanh_mul(&up, rows, &mut a)?;
                a
            }
            MlpKind::GeluTanh => {
                let mut a = up;
                cpu::gelu_tanh(&mut a);
                a
            }
        })
    }

    fn gather_rows(&self, x: &Vec<f32>, rows: &[usize], width: usize) -> Result<Vec<f32>> {
        Ok(rows
            .iter()
            .flat_map(|&r| x[r * width..(r + 1) * width].iter().copied())
            .collect())
    }

    fn zeros(&self, rows: usize, width: usize) -> Result<Vec<f32>> {
        Ok(vec![0f32; rows * width])
    }

    fn add_rows_scaled(
        &self,
        out: &mut Vec<f32>,
        x: &Vec<f32>,
        (rows, weights): (&[usize], &[f32]),
        width: usize,
    ) -> Result<()> {
        for ((&r, &w), src) in rows.iter().zip(weights).zip(x.chunks_exact(width)) {
            for (o, &v) in out[r * width..(r + 1) * width].iter_mut().zip(src) {
                *o += w * v;
            }
        }
        Ok(())
    }
}
