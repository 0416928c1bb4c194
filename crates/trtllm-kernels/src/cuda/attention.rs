//! Paged attention and KV-cache writes on the GPU, with the CPU kernel's batch description
//! ([`AttentionSeq`]) and checks; a pass's index arrays are uploaded once ([`AttentionBatch`]).

use cudarc::driver::{
    CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
};

use super::ops::{int, launch};
use super::{CudaDevice, Kernel};
use crate::cpu::{check_batch, AttentionSeq, AttentionShape, PoolShape};
use crate::error::check_len;
use crate::{KernelError, Result};

/// Threads of an attention block (kernels/attention.cu: ATTN_WARPS warps).
const ATTN_THREADS: u32 = 128;
const ATTN_MAX_HEAD_DIM: usize = 256;
/// The tiled prefill kernel: rows of one sequence per block, and its head_dim limit.
const ATTN_TILE_ROWS: usize = 16;
const ATTN_TILE_MAX_HEAD_DIM: usize = 128;

/// One layer's key and value pools on the device, `[num_blocks × block_size × n_kv_heads ×
/// head_dim]`; 16-bit pools hold bf16 or f16 bit patterns, quantized pools carry one scale per
/// (slot, KV head).
pub enum DeviceKv {
    F32 {
        k: CudaSlice<f32>,
        v: CudaSlice<f32>,
    },
    Bf16 {
        k: CudaSlice<u16>,
        v: CudaSlice<u16>,
    },
    F16 {
        k: CudaSlice<u16>,
        v: CudaSlice<u16>,
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
            DeviceKv::Bf16 { k, .. } | DeviceKv::F16 { k, .. } => k.len(),
            DeviceKv::Int8 { k, .. } => k.len(),
            DeviceKv::Fp8 { k, .. } => k.len(),
        }
    }

    /// The storage's kernel-name suffix.
    /// The attention kernels for this storage: per decode row, per prefill tile, and the KV
    /// write.
    fn kernels(&self) -> [Kernel; 3] {
        use Kernel::*;
        match self {
            DeviceKv::F32 { .. } => [paged_attention_f32, paged_attention_tiled_f32, kv_write_f32],
            DeviceKv::Bf16 { .. } => [
                paged_attention_bf16,
                paged_attention_tiled_bf16,
                kv_write_bf16,
            ],
            DeviceKv::F16 { .. } => [paged_attention_f16, paged_attention_tiled_f16, kv_write_f16],
            DeviceKv::Int8 { .. } => [
                paged_attention_int8,
                paged_attention_tiled_int8,
                kv_write_int8,
            ],
            DeviceKv::Fp8 { .. } => [paged_attention_fp8, paged_attention_tiled_fp8, kv_write_fp8],
        }
    }

    /// One side's pool as a device address (the kernels take it untyped per storage) and its
    /// per-(slot, head) scales, which quantized pools have. Kernels write through the address too:
    /// every launch is on the device's one stream, which orders it after earlier uses.
    fn side(&self, side: KvSide, stream: &CudaStream) -> (u64, Option<&CudaSlice<f32>>) {
        match self {
            DeviceKv::F32 { k, v } => (pick(side, k, v).device_ptr(stream).0, None),
            DeviceKv::Bf16 { k, v } | DeviceKv::F16 { k, v } => {
                (pick(side, k, v).device_ptr(stream).0, None)
            }
            DeviceKv::Int8 {
                k,
                k_scales,
                v,
                v_scales,
            } => {
                let (pool, scales) = pick(side, (k, k_scales), (v, v_scales));
                (pool.device_ptr(stream).0, Some(scales))
            }
            DeviceKv::Fp8 {
                k,
                k_scales,
                v,
                v_scales,
            } => {
                let (pool, scales) = pick(side, (k, k_scales), (v, v_scales));
                (pool.device_ptr(stream).0, Some(scales))
            }
        }
    }

    fn shape(&self, block_size: usize) -> PoolShape {
        let (k, v, scales) = match self {
            DeviceKv::F32 { k, v } => (k.len(), v.len(), None),
            DeviceKv::Bf16 { k, v } | DeviceKv::F16 { k, v } => (k.len(), v.len(), None),
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
    /// Keys seen per query (sliding window); 0: all earlier ones.
    window: i32,
    /// Logit soft cap; 0: none.
    softcap: f32,
}
// SAFETY: plain-old-data in the kernel's layout; the pointers stay valid for the launch (the
// buffers they come from outlive it on the one stream).
unsafe impl DeviceRepr for AttnArgs {}

/// One forward pass's attention indices on the device, uploaded once and shared by every
/// layer: each new row's sequence and position, the block tables, and each new token's pool slot.
pub struct AttentionBatch {
    row_seq: CudaSlice<i32>,
    row_pos: CudaSlice<i32>,
    tables: CudaSlice<i32>,
    table_start: CudaSlice<i32>,
    slots: CudaSlice<i32>,
    /// (first row, rows) of up to ATTN_TILE_ROWS rows of one sequence, for the tiled kernel.
    tiles: CudaSlice<i32>,
    n_tiles: usize,
    rows: usize,
    /// The pool shape the tables were checked against.
    pool: (usize, usize),
    shape: AttentionShape,
}

impl CudaDevice {
    /// Checks `seqs` against a pool of `kv`'s shape (every layer's pool has it) and uploads
    /// their indices.
    pub fn attention_batch(
        &self,
        seqs: &[AttentionSeq<'_>],
        (kv, block_size): (&DeviceKv, usize),
        shape: AttentionShape,
    ) -> Result<AttentionBatch> {
        let rows: usize = seqs.iter().map(|s| s.n_new).sum();
        let q_len = rows * shape.n_heads * shape.head_dim;
        check_batch((q_len, q_len), kv.shape(block_size), seqs, shape)?;
        if shape.head_dim > ATTN_MAX_HEAD_DIM {
            return Err(KernelError::OutOfRange {
                op: "cuda attention",
                what: "head_dim",
                index: shape.head_dim,
                limit: ATTN_MAX_HEAD_DIM + 1,
            });
        }
        let (mut row_seq, mut row_pos, mut slots) = (Vec::new(), Vec::new(), Vec::new());
        let (mut tables, mut table_start, mut tiles) = (Vec::new(), Vec::new(), Vec::new());
        for (i, s) in seqs.iter().enumerate() {
            for first in (0..s.n_new).step_by(ATTN_TILE_ROWS) {
                tiles.push(int("row", row_seq.len() + first)?);
                tiles.push(int("rows", (s.n_new - first).min(ATTN_TILE_ROWS))?);
            }
            table_start.push(int("block table offset", tables.len())?);
            // Entries before the earliest query's window are never read: the KV manager may
            // have handed their blocks back.
            let first = shape.first_key(s.past + 1) / block_size;
            for (j, &b) in s.blocks.iter().enumerate() {
                tables.push(if j < first {
                    0
                } else {
                    int("block id", b as usize)?
                });
            }
            for pos in s.past..s.past + s.n_new {
                row_seq.push(int("sequence", i)?);
                row_pos.push(int("position", pos)?);
                let slot = s.blocks[pos / block_size] as usize * block_size + pos % block_size;
                slots.push(int("slot", slot)?);
            }
        }
        // Empty uploads are fine for cudarc but not for every driver: keep one entry.
        let at_least_one = |mut v: Vec<i32>| {
            if v.is_empty() {
                v.push(0);
            }
            v
        };
        Ok(AttentionBatch {
            row_seq: self.upload(&at_least_one(row_seq))?,
            row_pos: self.upload(&at_least_one(row_pos))?,
            tables: self.upload(&at_least_one(tables))?,
            table_start: self.upload(&at_least_one(table_start))?,
            slots: self.upload(&at_least_one(slots))?,
            n_tiles: tiles.len() / 2,
            tiles: self.upload(&at_least_one(tiles))?,
            rows,
            pool: (kv.len(), block_size),
            shape,
        })
    }

    fn check_pool(&self, kv: &DeviceKv, batch: &AttentionBatch) -> Result<()> {
        check_len(
            "cuda attention",
            "pool (as the batch was checked against)",
            kv.len(),
            batch.pool.0,
        )
    }

    /// Causal attention of every sequence's new rows over its paged keys and values, as
    /// [`crate::cpu::paged_attention`] computes it, with the window and soft cap of `layer`
    /// (layers of one batch may differ in them; heads and head_dim are the batch's).
    pub fn paged_attention(
        &self,
        q: &CudaSlice<f32>,
        kv: &DeviceKv,
        (batch, layer): (&AttentionBatch, &AttentionShape),
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let shape = batch.shape;
        self.check_pool(kv, batch)?;
        check_len(
            "cuda attention",
            "q",
            q.len(),
            batch.rows * shape.n_heads * shape.head_dim,
        )?;
        check_len("cuda attention", "out", out.len(), q.len())?;
        if batch.rows == 0 {
            return Ok(());
        }
        let stream = &self.stream;
        let (out_ptr, _out_sync) = out.device_ptr_mut(stream);
        let args = AttnArgs {
            q: q.device_ptr(stream).0,
            out: out_ptr,
            row_seq: batch.row_seq.device_ptr(stream).0,
            row_pos: batch.row_pos.device_ptr(stream).0,
            tables: batch.tables.device_ptr(stream).0,
            table_start: batch.table_start.device_ptr(stream).0,
            n_heads: int("n_heads", shape.n_heads)?,
            n_kv_heads: int("n_kv_heads", shape.n_kv_heads)?,
            head_dim: int("head_dim", shape.head_dim)?,
            block_size: int("block_size", batch.pool.1)?,
            scale: shape.scale,
            window: int("window", layer.window.unwrap_or(0))?,
            softcap: layer.softcap.unwrap_or(0.0),
        };
        // Prefill chunks share key tiles across rows; decode rows (one per sequence) split their
        // positions across the block's warps instead. The two sum in different orders, so
        // batch-invariant mode keeps every row on the row kernel.
        let tiled = batch.n_tiles < batch.rows
            && shape.head_dim <= ATTN_TILE_MAX_HEAD_DIM
            && !self.invariant;
        let blocks = if tiled { batch.n_tiles } else { batch.rows };
        let cfg = LaunchConfig {
            grid_dim: (int("blocks", blocks)? as u32, args.n_heads as u32, 1),
            block_dim: (ATTN_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let [rows, tiles, _] = kv.kernels();
        let kernel = if tiled { tiles } else { rows };
        let mut b = self.builder(kernel)?;
        b.arg(&args);
        if tiled {
            b.arg(&batch.tiles);
        }
        let sides = [kv.side(KvSide::Key, stream), kv.side(KvSide::Value, stream)];
        for (pool, scales) in &sides {
            b.arg(pool);
            if let Some(scales) = scales {
                b.arg(*scales);
            }
        }
        launch(b, cfg, kernel)
    }

    /// Copies `n` slots from slot `src` to slot `dst` of both sides of `kv` (values, and scales
    /// where quantized), on the device's stream: a forked sequence's copy of a shared block.
    pub fn kv_copy_slots(
        &self,
        kv: &mut DeviceKv,
        (src, dst, n): (usize, usize, usize),
        (row, heads): (usize, usize),
    ) -> Result<()> {
        let slots = kv.len() / row.max(1);
        if src.max(dst) + n > slots {
            return Err(KernelError::OutOfRange {
                op: "cuda kv copy",
                what: "slot",
                index: src.max(dst) + n,
                limit: slots + 1,
            });
        }
        let slots = (src, dst, n);
        match kv {
            DeviceKv::F32 { k, v } => {
                self.copy_within(k, slots, row)?;
                self.copy_within(v, slots, row)?;
            }
            DeviceKv::Bf16 { k, v } | DeviceKv::F16 { k, v } => {
                self.copy_within(k, slots, row)?;
                self.copy_within(v, slots, row)?;
            }
            DeviceKv::Int8 { k, v, .. } => {
                self.copy_within(k, slots, row)?;
                self.copy_within(v, slots, row)?;
            }
            DeviceKv::Fp8 { k, v, .. } => {
                self.copy_within(k, slots, row)?;
                self.copy_within(v, slots, row)?;
            }
        }
        match kv {
            DeviceKv::Int8 {
                k_scales, v_scales, ..
            }
            | DeviceKv::Fp8 {
                k_scales, v_scales, ..
            } => {
                self.copy_within(k_scales, slots, heads)?;
                self.copy_within(v_scales, slots, heads)
            }
            _ => Ok(()),
        }
    }

    /// Copies `n · per` elements of `buf` from `src · per` to `dst · per` (ranges that do not
    /// overlap: two different blocks).
    fn copy_within<T: DeviceRepr>(
        &self,
        buf: &mut CudaSlice<T>,
        (src, dst, n): (usize, usize, usize),
        per: usize,
    ) -> Result<()> {
        let size = std::mem::size_of::<T>();
        let (base, _sync) = buf.device_ptr_mut(&self.stream);
        let at = |slot: usize| base + (slot * per * size) as u64;
        // SAFETY: both ranges lie inside `buf` (the caller checked the slots against its
        // length), `buf` is borrowed mutably for the call, and the copy is queued on the stream
        // every other use of `buf` is ordered on.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(
                at(dst),
                at(src),
                n * per * size,
                self.stream.cu_stream(),
            )
        }
        .map_err(super::cuda_err("cuda kv copy"))
    }

    /// Stores the batch's new keys or values `x` (`[rows × n_kv_heads × head_dim]`) at their
    /// slots, rounding to bf16/f16 or quantizing per (slot, head) for INT8/FP8 pools as the CPU
    /// pool does.
    pub fn kv_write(
        &self,
        (kv, side): (&mut DeviceKv, KvSide),
        x: &CudaSlice<f32>,
        batch: &AttentionBatch,
    ) -> Result<()> {
        self.check_pool(kv, batch)?;
        let (nkv, hd) = (batch.shape.n_kv_heads, batch.shape.head_dim);
        check_len("cuda kv write", "rows", x.len(), batch.rows * nkv * hd)?;
        if batch.rows == 0 {
            return Ok(());
        }
        let (h, d) = (int("n_kv_heads", nkv)?, int("head_dim", hd)?);
        let cfg = LaunchConfig {
            grid_dim: (int("rows", batch.rows)? as u32, h as u32, 1),
            block_dim: (32 * hd.div_ceil(32).clamp(1, 8) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let kernel = kv.kernels()[2];
        let (pool, scales) = kv.side(side, &self.stream);
        let mut b = self.builder(kernel)?;
        b.arg(x).arg(&batch.slots).arg(&pool);
        if let Some(scales) = scales {
            b.arg(scales);
        }
        b.arg(&h).arg(&d);
        launch(b, cfg, kernel)
    }
}

fn pick<T>(side: KvSide, k: T, v: T) -> T {
    match side {
        KvSide::Key => k,
        KvSide::Value => v,
    }
}
