//! Paged attention and KV-cache writes on the GPU, with the CPU kernel's batch description
//! ([`AttentionSeq`]) and checks; the per-call index arrays (each row's sequence and position,
//! the block tables) are uploaded by the launcher.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};

use super::ops::{int, launch};
use super::CudaDevice;
use crate::cpu::{check_batch, AttentionSeq, AttentionShape, PoolShape};
use crate::error::check_len;
use crate::{KernelError, Result};

/// Threads of an attention block (kernels/attention.cu: ATTN_WARPS warps).
const ATTN_THREADS: u32 = 128;
const ATTN_MAX_HEAD_DIM: usize = 256;

/// One layer's key and value pools on the device, `[num_blocks × block_size × n_kv_heads ×
/// head_dim]`; quantized pools carry one scale per (slot, KV head).
pub enum DeviceKv {
    F32 {
        k: CudaSlice<f32>,
        v: CudaSlice<f32>,
    },
    Int8 {
        k: CudaSlice<i8>,
        k_scales: CudaSlice<f32>,
        v: CudaSlice<i8>,
        v_scales: CudaSlice<f32>,
    },
    Fp8 {
        k: CudaSlice<u8>,
        k_scales: CudaSlice<f32>,
        v: CudaSlice<u8>,
        v_scales: CudaSlice<f32>,
    },
}

/// Which pool of a [`DeviceKv`] a write goes to.
#[derive(Clone, Copy, Debug)]
pub enum KvSide {
    Key,
    Value,
}

impl DeviceKv {
    /// Values in the key pool (the value pool has as many).
    fn len(&self) -> usize {
        match self {
            DeviceKv::F32 { k, .. } => k.len(),
            DeviceKv::Int8 { k, .. } => k.len(),
            DeviceKv::Fp8 { k, .. } => k.len(),
        }
    }

    fn shape(&self, block_size: usize) -> PoolShape {
        let (k, v, scales) = match self {
            DeviceKv::F32 { k, v } => (k.len(), v.len(), None),
            DeviceKv::Int8 {
                k,
                v,
                k_scales,
                v_scales,
            } => (k.len(), v.len(), Some((k_scales.len(), v_scales.len()))),
            DeviceKv::Fp8 {
                k,
                v,
                k_scales,
                v_scales,
            } => (k.len(), v.len(), Some((k_scales.len(), v_scales.len()))),
        };
        PoolShape {
            k,
            v,
            k_scales: scales.map(|s| s.0),
            v_scales: scales.map(|s| s.1),
            block_size,
        }
    }
}

/// `AttnArgs` of kernels/attention.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct AttnArgs {
    q: u64,
    out: u64,
    row_seq: u64,
    row_pos: u64,
    tables: u64,
    table_start: u64,
    n_heads: i32,
    n_kv_heads: i32,
    head_dim: i32,
    block_size: i32,
    scale: f32,
}
// SAFETY: plain-old-data in the kernel's layout; the pointers stay valid for the launch (the
// buffers they come from outlive it on the one stream).
unsafe impl DeviceRepr for AttnArgs {}

impl CudaDevice {
    /// Causal attention of every sequence's new rows over its paged keys and values, as
    /// [`crate::cpu::paged_attention`] computes it.
    pub fn paged_attention(
        &self,
        q: &CudaSlice<f32>,
        (kv, block_size): (&DeviceKv, usize),
        seqs: &[AttentionSeq<'_>],
        shape: AttentionShape,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        check_batch((q.len(), out.len()), kv.shape(block_size), seqs, shape)?;
        if shape.head_dim > ATTN_MAX_HEAD_DIM {
            return Err(KernelError::OutOfRange {
                op: "cuda attention",
                what: "head_dim",
                index: shape.head_dim,
                limit: ATTN_MAX_HEAD_DIM + 1,
            });
        }
        let mut row_seq = Vec::new();
        let mut row_pos = Vec::new();
        let mut tables = Vec::new();
        let mut table_start = Vec::new();
        for (i, s) in seqs.iter().enumerate() {
            table_start.push(int("block table offset", tables.len())?);
            for &b in s.blocks {
                tables.push(int("block id", b as usize)?);
            }
            for t in 0..s.n_new {
                row_seq.push(int("sequence", i)?);
                row_pos.push(int("position", s.past + t)?);
            }
        }
        if row_seq.is_empty() {
            return Ok(());
        }
        let row_seq = self.upload(&row_seq)?;
        let row_pos = self.upload(&row_pos)?;
        let tables = self.upload(&tables)?;
        let table_start = self.upload(&table_start)?;
        let stream = &self.stream;
        let (out_ptr, _out_sync) = out.device_ptr_mut(stream);
        let args = AttnArgs {
            q: q.device_ptr(stream).0,
            out: out_ptr,
            row_seq: row_seq.device_ptr(stream).0,
            row_pos: row_pos.device_ptr(stream).0,
            tables: tables.device_ptr(stream).0,
            table_start: table_start.device_ptr(stream).0,
            n_heads: int("n_heads", shape.n_heads)?,
            n_kv_heads: int("n_kv_heads", shape.n_kv_heads)?,
            head_dim: int("head_dim", shape.head_dim)?,
            block_size: int("block_size", block_size)?,
            scale: shape.scale,
        };
        let cfg = LaunchConfig {
            grid_dim: (int("rows", row_pos.len())? as u32, args.n_heads as u32, 1),
            block_dim: (ATTN_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (name, b) = match kv {
            DeviceKv::F32 { k, v } => {
                let mut b = self.builder("paged_attention_f32")?;
                b.arg(&args).arg(k).arg(v);
                ("paged_attention_f32", b)
            }
            DeviceKv::Int8 {
                k,
                k_scales,
                v,
                v_scales,
            } => {
                let mut b = self.builder("paged_attention_int8")?;
                b.arg(&args).arg(k).arg(k_scales).arg(v).arg(v_scales);
                ("paged_attention_int8", b)
            }
            DeviceKv::Fp8 {
                k,
                k_scales,
                v,
                v_scales,
            } => {
                let mut b = self.builder("paged_attention_fp8")?;
                b.arg(&args).arg(k).arg(k_scales).arg(v).arg(v_scales);
                ("paged_attention_fp8", b)
            }
        };
        launch(b, cfg, name)?;
        // The index arrays must outlive the queued launch: wait before they drop.
        self.synchronize()
    }

    /// Stores rows `x` (`[slots.len() × n_kv_heads × head_dim]`) of keys or values at `slots`,
    /// quantizing per (slot, head) for INT8/FP8 pools as the CPU pool does.
    pub fn kv_write(
        &self,
        (kv, side): (&mut DeviceKv, KvSide),
        x: &CudaSlice<f32>,
        slots: &[usize],
        (n_kv_heads, head_dim): (usize, usize),
    ) -> Result<()> {
        let kv_row = n_kv_heads * head_dim;
        check_len("cuda kv write", "rows", x.len(), slots.len() * kv_row)?;
        let pool_slots = kv.len() / kv_row.max(1);
        if let Some(&s) = slots.iter().find(|&&s| s >= pool_slots) {
            return Err(KernelError::OutOfRange {
                op: "cuda kv write",
                what: "slot",
                index: s,
                limit: pool_slots,
            });
        }
        if slots.is_empty() {
            return Ok(());
        }
        let slots: Vec<i32> = slots
            .iter()
            .map(|&s| int("slot", s))
            .collect::<Result<_>>()?;
        let slots = self.upload(&slots)?;
        let (h, d) = (int("n_kv_heads", n_kv_heads)?, int("head_dim", head_dim)?);
        let cfg = LaunchConfig {
            grid_dim: (int("rows", slots.len())? as u32, h as u32, 1),
            block_dim: (32 * head_dim.div_ceil(32).clamp(1, 8) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (name, b) = match kv {
            DeviceKv::F32 { k, v } => {
                let mut b = self.builder("kv_write_f32")?;
                b.arg(x).arg(&slots).arg(pick(side, k, v)).arg(&h).arg(&d);
                ("kv_write_f32", b)
            }
            DeviceKv::Int8 {
                k,
                k_scales,
                v,
                v_scales,
            } => {
                let (pool, scales) = pick(side, (k, k_scales), (v, v_scales));
                let mut b = self.builder("kv_write_int8")?;
                b.arg(x).arg(&slots).arg(pool).arg(scales).arg(&h).arg(&d);
                ("kv_write_int8", b)
            }
            DeviceKv::Fp8 {
                k,
                k_scales,
                v,
                v_scales,
            } => {
                let (pool, scales) = pick(side, (k, k_scales), (v, v_scales));
                let mut b = self.builder("kv_write_fp8")?;
                b.arg(x).arg(&slots).arg(pool).arg(scales).arg(&h).arg(&d);
                ("kv_write_fp8", b)
            }
        };
        launch(b, cfg, name)?;
        self.synchronize()
    }
}

fn pick<T>(side: KvSide, k: T, v: T) -> T {
    match side {
        KvSide::Key => k,
        KvSide::Value => v,
    }
}
