//! The decoder on an NVIDIA GPU: the CPU decoder's tensors uploaded once (packed formats stay
//! packed), the same forward pass through the CUDA kernels, keys and values in a device pool.
//! Embedding rows are gathered on the host from the memory-mapped table by the CPU decoder (a few
//! rows per step) and uploaded, so any table format works without a device copy of it.

use trtllm_quant::kernels::cuda::{AttentionBatch, CudaDevice, CudaSlice, DeviceMatrix, KvSide};

use crate::config::{MlpKind, NormKind};
use crate::engine::TensorInfo;
use crate::kv_cache::{KvPool, KvStorage};
use crate::model::{attention_seqs, BatchLayout, Decoder, Norm, SeqChunk};
use crate::weights::{f32s, Linear};
use crate::{ModelConfig, Result};

struct DeviceNorm {
    w: CudaSlice<f32>,
    b: Option<CudaSlice<f32>>,
}

struct DeviceLinear {
    /// Carries the layer's FP8 input scale: the kernels layer picks how to apply it.
    w: DeviceMatrix,
    bias: Option<CudaSlice<f32>>,
    pre_quant_scale: Option<CudaSlice<f32>>,
}

struct DeviceLayer {
    attn_norm: DeviceNorm,
    qkv: DeviceLinear,
    o: DeviceLinear,
    mlp_norm: DeviceNorm,
    up: DeviceLinear,
    down: DeviceLinear,
}

pub(crate) struct CudaDecoder {
    /// The host decoder: configuration, the embedding tables it gathers from.
    host: Decoder,
    dev: CudaDevice,
    ordinal: usize,
    layers: Vec<DeviceLayer>,
    final_norm: DeviceNorm,
    lm_head: DeviceLinear,
    inv_freq: Option<CudaSlice<f32>>,
}

impl CudaDecoder {
    pub fn new(host: Decoder, ordinal: usize) -> Result<Self> {
        let dev = CudaDevice::new(ordinal)?;
        let file = &*host.file;
        let up = |t: &TensorInfo| -> Result<CudaSlice<f32>> { Ok(dev.upload(f32s(file, t)?)?) };
        let norm = |n: &Norm| -> Result<DeviceNorm> {
            Ok(DeviceNorm {
                w: up(&n.w)?,
                b: n.b.as_ref().map(up).transpose()?,
            })
        };
        let linear = |l: &Linear| -> Result<DeviceLinear> {
            let scale = |t: &TensorInfo| f32s(file, t).map(|s| s[0]);
            let input_scale = l.input_scale.as_ref().map(scale).transpose()?;
            Ok(DeviceLinear {
                w: dev.upload_matrix(l.weight.mat(file)?, input_scale)?,
                bias: l.bias.as_ref().map(up).transpose()?,
                pre_quant_scale: l.pre_quant_scale.as_ref().map(up).transpose()?,
            })
        };
        let layers = host
            .layers
            .iter()
            .map(|l| {
                Ok(DeviceLayer {
                    attn_norm: norm(&l.attn_norm)?,
                    qkv: linear(&l.qkv)?,
                    o: linear(&l.o)?,
                    mlp_norm: norm(&l.mlp_norm)?,
                    up: linear(&l.up)?,
                    down: linear(&l.down)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let lm_head = DeviceLinear {
            w: dev.upload_matrix(host.lm_head.mat(file)?, None)?,
            bias: None,
            pre_quant_scale: None,
        };
        let inv_freq = host
            .rope
            .as_ref()
            .map(|r| dev.upload(r.inv_freq()))
            .transpose()?;
        Ok(Self {
            final_norm: norm(&host.final_norm)?,
            layers,
            lm_head,
            inv_freq,
            dev,
            ordinal,
            host,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.host.cfg
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    pub fn new_pool(
        &self,
        storage: KvStorage,
        block_size: usize,
        num_blocks: usize,
    ) -> Result<KvPool> {
        KvPool::on_device(self.config(), storage, (block_size, num_blocks), &self.dev)
    }

    /// An activation buffer the next kernel writes in full.
    fn output(&self, n: usize) -> Result<CudaSlice<f32>> {
        Ok(self.dev.output(n)?)
    }

    /// `norm(x)`; with `residual`, first `residual += x` and `norm(residual)` (one kernel).
    fn norm(
        &self,
        n: &DeviceNorm,
        x: &CudaSlice<f32>,
        residual: Option<&mut CudaSlice<f32>>,
    ) -> Result<CudaSlice<f32>> {
        let mut out = self.output(x.len())?;
        let eps = self.config().norm_eps;
        match (self.config().norm, &n.b) {
            (NormKind::LayerNorm, Some(b)) => {
                self.dev.layer_norm(x, residual, (&n.w, b), &mut out, eps)?
            }
            _ => self.dev.rms_norm(x, residual, &n.w, &mut out, eps)?,
        }
        Ok(out)
    }

    /// `(x ∘ pre_quant_scale) · Wᵀ + bias` (through FP8 when the layer has an input scale).
    fn linear(&self, l: &DeviceLinear, x: &CudaSlice<f32>, rows: usize) -> Result<CudaSlice<f32>> {
        let scaled = match &l.pre_quant_scale {
            Some(s) => {
                let mut c = self.dev.copy(x)?;
                self.dev.scale_cols(&mut c, s)?;
                Some(c)
            }
            None => None,
        };
        let mut y = self.output(rows * l.w.rows)?;
        self.dev
            .matmul(&l.w, scaled.as_ref().unwrap_or(x), l.bias.as_ref(), &mut y)?;
        Ok(y)
    }

    /// As [`Decoder::forward_batch`], on the device, with `pool` in device memory.
    pub fn forward_batch(&self, batch: &[SeqChunk<'_>], pool: &mut KvPool) -> Result<Vec<f32>> {
        let block_size = pool.block_size();
        let layout = BatchLayout::of(batch);
        let n = layout.tokens.len();
        let mut hidden = self.dev.upload(&self.host.embed(&layout)?)?;
        let seqs = attention_seqs(batch);
        let first = pool.device_layer(0)?;
        let step = DeviceStep {
            attention: self.dev.attention_batch(
                &seqs,
                (first, block_size),
                self.config().attention_shape(),
            )?,
            positions: self.dev.upload(
                &layout
                    .positions
                    .iter()
                    .map(|&p| p as i32)
                    .collect::<Vec<_>>(),
            )?,
            n,
        };
        // Each block's output is added to the residual stream by the next norm's kernel; the
        // final norm runs over every row (the CPU norms only the logits rows: same values).
        let norm_after = |i: usize| {
            self.layers
                .get(i)
                .map_or(&self.final_norm, |l| &l.attn_norm)
        };
        let mut x = self.norm(norm_after(0), &hidden, None)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let o = self.attention_block(i, layer, &x, &step, pool)?;
            x = self.norm(&layer.mlp_norm, &o, Some(&mut hidden))?;
            let down = self.mlp_block(layer, &x, n)?;
            x = self.norm(norm_after(i + 1), &down, Some(&mut hidden))?;
        }
        let rows: Vec<u32> = layout.logits_rows.iter().map(|&r| r as u32).collect();
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        // The embedding gather doubles as a row gather from the normed hidden states.
        let h = self.config().hidden_size;
        let mut last = self.output(rows.len() * h)?;
        self.dev
            .embedding(&x, &self.dev.upload(&rows)?, h, &mut last)?;
        let logits = self.linear(&self.lm_head, &last, rows.len())?;
        Ok(self.dev.download(&logits)?)
    }

    /// The attention block's output for the normed hidden states `x` (not yet added to the
    /// residual stream).
    fn attention_block(
        &self,
        i: usize,
        layer: &DeviceLayer,
        x: &CudaSlice<f32>,
        step: &DeviceStep,
        pool: &mut KvPool,
    ) -> Result<CudaSlice<f32>> {
        let c = self.config();
        let n = step.n;
        let (qd, kvd, qkvd) = (c.q_dim(), c.kv_dim(), c.qkv_dim());
        let qkv = self.linear(&layer.qkv, x, n)?;
        let (mut q, mut k, mut v) = (
            self.output(n * qd)?,
            self.output(n * kvd)?,
            self.output(n * kvd)?,
        );
        self.dev.copy_cols((&qkv, qkvd), 0, &mut q)?;
        self.dev.copy_cols((&qkv, qkvd), qd, &mut k)?;
        self.dev.copy_cols((&qkv, qkvd), qd + kvd, &mut v)?;
        if let Some(inv_freq) = &self.inv_freq {
            self.dev
                .rope(&mut q, &step.positions, inv_freq, c.num_heads, c.head_dim)?;
            self.dev.rope(
                &mut k,
                &step.positions,
                inv_freq,
                c.num_kv_heads,
                c.head_dim,
            )?;
        }
        let kv = pool.device_layer(i)?;
        self.dev.kv_write((kv, KvSide::Key), &k, &step.attention)?;
        self.dev
            .kv_write((kv, KvSide::Value), &v, &step.attention)?;
        let mut attn = self.output(n * qd)?;
        self.dev
            .paged_attention(&q, kv, &step.attention, &mut attn)?;
        self.linear(&layer.o, &attn, n)
    }

    /// The MLP block's output for the normed hidden states `x`.
    fn mlp_block(
        &self,
        layer: &DeviceLayer,
        x: &CudaSlice<f32>,
        n: usize,
    ) -> Result<CudaSlice<f32>> {
        let up = self.linear(&layer.up, x, n)?;
        let act = match self.config().mlp {
            MlpKind::GatedSilu => {
                let mut a = self.output(n * self.config().intermediate_size)?;
                self.dev.silu_mul(&up, n, &mut a)?;
                a
            }
            MlpKind::GeluTanh => {
                let mut a = up;
                self.dev.gelu_tanh(&mut a)?;
                a
            }
        };
        self.linear(&layer.down, &act, n)
    }
}

/// What every layer of one forward pass shares.
struct DeviceStep {
    attention: AttentionBatch,
    positions: CudaSlice<i32>,
    n: usize,
}
