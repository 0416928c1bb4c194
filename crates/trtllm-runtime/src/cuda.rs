//! An NVIDIA GPU as a [`Backend`]: the engine's tensors uploaded once (packed formats stay
//! packed), activations and the KV pool in device memory, the kernels of
//! `trtllm_kernels::cuda`. Embedding rows are gathered on the host from the memory-mapped table
//! (a few rows per step) and uploaded, so any table format works without a device copy of it.

use trtllm_quant::kernels::cuda::{
    nccl_available, nccl_unique_id, AttentionBatch, CudaDevice, CudaSlice, DeviceLoraMat,
    DeviceLoraRows, DeviceMatrix, DeviceRopeFreqs, KvSide, Nccl,
};
use trtllm_quant::kernels::LoraSegment;

use crate::decoder::Backend;
use crate::engine::TensorInfo;
use crate::kv_cache::pool_device::DeviceKvs;
use crate::kv_cache::{KvBudget, KvGroups, KvPool, KvStorage};
use crate::lora::{DeviceLora, LoraFactors, LoraInner, LoraWeights};
use crate::model::{
    attention_seqs, ActivationObserver, BatchLayout, HostModel, Linear, Norm, SeqChunk,
};
use crate::parallel::Comm;
use crate::rope::Ropes;
use crate::weights::f32s;
use crate::{MlpKind, ModelConfig, NormKind, Result};

pub(crate) struct DeviceNorm {
    w: CudaSlice<f32>,
    b: Option<CudaSlice<f32>>,
}

pub(crate) struct DeviceLinear {
    /// Carries the layer's FP8 input scale: the kernels layer picks how to apply it.
    w: DeviceMatrix,
    bias: Option<CudaSlice<f32>>,
    input_perm: Option<CudaSlice<u32>>,
    pre_quant_scale: Option<CudaSlice<f32>>,
}

pub(crate) struct CudaBackend {
    cfg: ModelConfig,
    dev: CudaDevice,
    ordinal: usize,
    rope: Option<Ropes>,
    groups: KvGroups,
    /// The tensor-parallel group's NCCL communicator, where every rank of it has NCCL.
    nccl: Option<Nccl>,
}

impl CudaBackend {
    /// GPU `ordinal`, a member of the NCCL group of `tp` (the tensor-parallel ranks, when the
    /// engine is split; collective over them).
    pub fn new(model: &HostModel, ordinal: usize, tp: Option<&dyn Comm>) -> Result<Self> {
        let dev = CudaDevice::new(ordinal)?;
        let nccl = match tp.filter(|tp| tp.size() > 1) {
            Some(tp) => nccl_group(&dev, tp)?,
            None => None,
        };
        Ok(Self {
            cfg: model.cfg.clone(),
            dev,
            ordinal,
            rope: model.rope.clone(),
            groups: model.cfg.kv_groups(),
            nccl,
        })
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    pub fn device(&self) -> &CudaDevice {
        &self.dev
    }

    /// See [`CudaDevice::set_batch_invariant`].
    pub fn set_batch_invariant(&mut self, on: bool) {
        self.dev.set_batch_invariant(on)
    }

    pub fn new_pool(&self, storage: KvStorage, budget: &KvBudget) -> Result<KvPool> {
        KvPool::on_device(&self.cfg, storage, budget, &self.dev)
    }

    /// An activation buffer the next kernel writes in full.
    fn output(&self, n: usize) -> Result<CudaSlice<f32>> {
        Ok(self.dev.output(n)?)
    }
}

/// The NCCL group of `tp`'s GPUs, bootstrapped over `tp` (MPI); `None` where a rank lacks NCCL,
/// whose sums then go through the host.
fn nccl_group(dev: &CudaDevice, tp: &dyn Comm) -> Result<Option<Nccl>> {
    let mut missing = [f32::from(u8::from(!nccl_available()))];
    tp.all_reduce_sum(&mut missing)?;
    if missing[0] > 0.0 {
        tracing::warn!(
            "NCCL (libnccl.so) is missing on a rank: tensor-parallel sums go through the host"
        );
        return Ok(None);
    }
    let id = match tp.rank() {
        0 => nccl_unique_id()?.to_vec(),
        _ => Vec::new(),
    };
    let id: [u8; 128] = tp
        .broadcast(&id)?
        .try_into()
        .map_err(|_| crate::parallel::error("rank 0 sent an NCCL id of the wrong size"))?;
    Ok(Some(dev.nccl(tp.rank(), tp.size(), &id)?))
}

/// What every layer of one forward pass shares.
pub(crate) struct CudaStep {
    /// Each KV group's attention indices (none for a group this pipeline stage computes no
    /// layer of).
    attention: Vec<Option<AttentionBatch>>,
    positions: CudaSlice<i32>,
    /// Each rotary table's frequencies for this step's tokens.
    rope: Vec<DeviceRopeFreqs>,
}

impl Backend for CudaBackend {
    type Act = CudaSlice<f32>;
    type Linear = DeviceLinear;
    type Norm = DeviceNorm;
    type Step<'a> = CudaStep;
    type Pool = DeviceKvs;
    type LoraMat = DeviceLoraMat;
    type LoraRows = DeviceLoraRows;

    fn linear_of(&self, model: &HostModel, l: &Linear) -> Result<DeviceLinear> {
        let file = &*model.file;
        let up =
            |t: &TensorInfo| -> Result<CudaSlice<f32>> { Ok(self.dev.upload(f32s(file, t)?)?) };
        let scale = |t: &TensorInfo| f32s(file, t).map(|s| s[0]);
        let input_scale = l.input_scale.as_ref().map(scale).transpose()?;
        Ok(DeviceLinear {
            w: self.dev.upload_matrix(l.weight.mat(file)?, input_scale)?,
            bias: l.bias.as_ref().map(up).transpose()?,
            input_perm: l
                .input_perm
                .as_ref()
                .map(|p| self.dev.upload(p))
                .transpose()?,
            pre_quant_scale: l.pre_quant_scale.as_ref().map(up).transpose()?,
        })
    }

    fn norm_of(&self, model: &HostModel, n: &Norm) -> Result<DeviceNorm> {
        let up = |t: &TensorInfo| -> Result<CudaSlice<f32>> {
            Ok(self.dev.upload(f32s(&model.file, t)?)?)
        };
        Ok(DeviceNorm {
            w: up(&n.w)?,
            b: n.b.as_ref().map(up).transpose()?,
        })
    }

    fn upload(&self, x: Vec<f32>) -> Result<CudaSlice<f32>> {
        Ok(self.dev.upload(&x)?)
    }

    fn all_reduce(&self, mut x: CudaSlice<f32>, tp: &dyn Comm) -> Result<CudaSlice<f32>> {
        if let Some(nccl) = &self.nccl {
            nccl.all_reduce_sum(&mut x)?;
            return Ok(x);
        }
        let mut host = self.download(x)?;
        tp.all_reduce_sum(&mut host)?;
        self.upload(host)
    }

    fn download(&self, x: CudaSlice<f32>) -> Result<Vec<f32>> {
        Ok(self.dev.download(&x)?)
    }

    fn pool<'p>(&self, pool: &'p mut KvPool) -> Result<&'p mut DeviceKvs> {
        pool.device_mut()
    }

    fn lora_mat(&self, f: &LoraFactors) -> Result<DeviceLoraMat> {
        let bt = f.b_transposed();
        Ok(self
            .dev
            .lora_mat((&f.a, &bt), f.rank, &f.blocks, f.dims())?)
    }

    fn lora_rows(
        &self,
        segments: &[LoraSegment],
        rows: usize,
        slots: usize,
    ) -> Result<DeviceLoraRows> {
        Ok(self.dev.lora_rows(segments, rows, slots)?)
    }

    fn lora_add(
        &self,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        rows: &DeviceLoraRows,
        slots: &[Option<&DeviceLoraMat>],
    ) -> Result<()> {
        Ok(self.dev.lora_add(x, y, rows, slots)?)
    }

    fn lora<'l>(&self, w: &'l LoraWeights) -> Result<&'l DeviceLora<Self>> {
        match &w.inner {
            LoraInner::Cuda(d) => Ok(d),
            _ => Err(w.wrong_device()),
        }
    }

    fn step<'a>(
        &self,
        batch: &'a [SeqChunk<'a>],
        layout: &BatchLayout,
        pool: &mut DeviceKvs,
    ) -> Result<CudaStep> {
        let block_size = pool.block_size();
        let groups = &self.groups;
        let mut attention = Vec::with_capacity(groups.windows.len());
        for g in 0..groups.windows.len() {
            let Some(layer) = groups.first_layer(g, &self.cfg) else {
                attention.push(None);
                continue;
            };
            attention.push(Some(self.dev.attention_batch(
                &attention_seqs(batch, g),
                (pool.layer(layer), block_size),
                // The group's window; heads and head_dim are the same in every layer.
                self.cfg.attention_shape(layer),
            )?));
        }
        let positions: Vec<i32> = layout.positions.iter().map(|&p| p as i32).collect();
        Ok(CudaStep {
            attention,
            positions: self.dev.upload(&positions)?,
            rope: match &self.rope {
                Some(r) => r
                    .step(batch)
                    .iter()
                    .map(|f| self.dev.upload_rope(f, self.cfg.head_dim))
                    .collect::<std::result::Result<_, _>>()?,
                None => Vec::new(),
            },
        })
    }

    fn norm(
        &self,
        n: &DeviceNorm,
        x: &CudaSlice<f32>,
        residual: Option<&mut CudaSlice<f32>>,
    ) -> Result<CudaSlice<f32>> {
        let mut out = self.output(x.len())?;
        let eps = self.cfg.norm_eps;
        match (self.cfg.norm, &n.b) {
            (NormKind::LayerNorm, Some(b)) => {
                self.dev.layer_norm(x, residual, (&n.w, b), &mut out, eps)?
            }
            _ => self.dev.rms_norm(x, residual, &n.w, &mut out, eps)?,
        }
        Ok(out)
    }

    /// Through FP8 when the layer has an input scale.
    fn linear(&self, l: &DeviceLinear, x: &CudaSlice<f32>, rows: usize) -> Result<CudaSlice<f32>> {
        let mut prepared = match &l.input_perm {
            Some(perm) => {
                let mut g = self.dev.zeros::<f32>(x.len())?;
                self.dev.gather_cols(x, perm, &mut g)?;
                Some(g)
            }
            None => None,
        };
        if let Some(s) = &l.pre_quant_scale {
            let mut c = match prepared.take() {
                Some(g) => g,
                None => self.dev.copy(x)?,
            };
            self.dev.scale_cols(&mut c, s)?;
            prepared = Some(c);
        }
        let mut y = self.output(rows * l.w.rows)?;
        self.dev.matmul(
            &l.w,
            prepared.as_ref().unwrap_or(x),
            l.bias.as_ref(),
            &mut y,
        )?;
        Ok(y)
    }

    /// The activations are downloaded for the observer (calibration is a one-off pass).
    fn observe(
        &self,
        obs: &mut dyn ActivationObserver,
        module: &str,
        x: &CudaSlice<f32>,
        rows: usize,
    ) -> Result<()> {
        obs.observe(module, &self.dev.download(x)?, rows)
    }

    fn split_cols<const N: usize>(
        &self,
        x: &CudaSlice<f32>,
        total: usize,
        widths: [usize; N],
    ) -> Result<[CudaSlice<f32>; N]> {
        let rows = x.len() / total.max(1);
        let mut parts = Vec::with_capacity(N);
        let mut start = 0;
        for w in widths {
            let mut part = self.output(rows * w)?;
            self.dev.copy_cols((x, total), start, &mut part)?;
            parts.push(part);
            start += w;
        }
        Ok(parts
            .try_into()
            .unwrap_or_else(|_| unreachable!("one part per width")))
    }

    fn rope(
        &self,
        x: &mut CudaSlice<f32>,
        heads: usize,
        layer: usize,
        step: &CudaStep,
    ) -> Result<()> {
        if let Some(rope) = &self.rope {
            let freqs = &step.rope[rope.table_of(layer)];
            self.dev
                .rope(x, &step.positions, freqs, heads, self.cfg.head_dim)?;
        }
        Ok(())
    }

    fn attention(
        &self,
        layer: usize,
        (q, k, v): (&CudaSlice<f32>, &CudaSlice<f32>, &CudaSlice<f32>),
        step: &CudaStep,
        pool: &mut DeviceKvs,
    ) -> Result<CudaSlice<f32>> {
        let kv = pool.layer(layer);
        let batch = step.attention[self.groups.of_layer[layer]]
            .as_ref()
            .ok_or_else(|| crate::parallel::error(format!("layer {layer} is another stage's")))?;
        self.dev.kv_write((kv, KvSide::Key), k, batch)?;
        self.dev.kv_write((kv, KvSide::Value), v, batch)?;
        let mut out = self.output(q.len())?;
        self.dev
            .paged_attention(q, kv, (batch, &self.cfg.attention_shape(layer)), &mut out)?;
        Ok(out)
    }

    fn activation(&self, mlp: MlpKind, up: CudaSlice<f32>, rows: usize) -> Result<CudaSlice<f32>> {
        Ok(match mlp {
            MlpKind::GatedSilu => {
                let mut a = self.output(up.len() / 2)?;
                self.dev.silu_mul(&up, rows, &mut a)?;
                a
            }
            MlpKind::GatedGeluTanh => {
                let mut a = self.output(up.len() / 2)?;
                self.dev.gelu_tanh_mul(&up, rows, &mut a)?;
                a
            }
            MlpKind::GeluTanh => {
                let mut a = up;
                self.dev.gelu_tanh(&mut a)?;
                a
            }
        })
    }

    /// The embedding gather doubles as a row gather.
    fn gather_rows(
        &self,
        x: &CudaSlice<f32>,
        rows: &[usize],
        width: usize,
    ) -> Result<CudaSlice<f32>> {
        let ids: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let mut out = self.output(rows.len() * width)?;
        self.dev
            .embedding(x, &self.dev.upload(&ids)?, width, &mut out)?;
        Ok(out)
    }

    fn zeros(&self, rows: usize, width: usize) -> Result<CudaSlice<f32>> {
        Ok(self.dev.zeros(rows * width)?)
    }

    fn add_rows_scaled(
        &self,
        out: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        (rows, weights): (&[usize], &[f32]),
        width: usize,
    ) -> Result<()> {
        let ids: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let (ids, w) = (self.dev.upload(&ids)?, self.dev.upload(weights)?);
        Ok(self.dev.add_rows_scaled(out, x, (&ids, &w), width)?)
    }
}
