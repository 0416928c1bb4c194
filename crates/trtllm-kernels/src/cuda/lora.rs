//! LoRA's batched update on the GPU (kernels/lora.cu): the factors of one module of one adapter
//! on the device ([`DeviceLoraMat`]), a pass's adapted rows with their slots ([`DeviceLoraRows`],
//! uploaded once per pass), and one launch per module adding every slot's update.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};

use super::ops::{int, launch};
use super::{CudaDevice, Kernel};
use crate::error::check_len;
use crate::lora::{check_factors, check_segments, LoraBlock, LoraDims, LoraSegment};
use crate::{KernelError, Result};

/// kernels/lora.cu's limits.
const LORA_THREADS: u32 = 256;
const LORA_MAX_SLOTS: usize = 8;
const LORA_MAX_BLOCKS: usize = 3;
const LORA_MAX_RANK: usize = 1024;

/// One adapter's factors of one module: A `[rank × inputs]`, Bᵀ `[rank × outputs]`.
pub struct DeviceLoraMat {
    a: CudaSlice<f32>,
    bt: CudaSlice<f32>,
    rank: usize,
    blocks: Vec<LoraBlock>,
    dims: LoraDims,
}

/// A pass's adapted rows, each with its slot, as the kernel reads them.
pub struct DeviceLoraRows {
    pairs: Option<CudaSlice<u32>>,
    rows: usize,
    slots: usize,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct LoraSlot {
    a: u64,
    bt: u64,
    rank: i32,
    n_blocks: i32,
    blocks: [[i32; 4]; LORA_MAX_BLOCKS],
}

#[repr(C)]
struct LoraArgs {
    x: u64,
    y: u64,
    rows: u64,
    n_rows: i32,
    inputs: i32,
    outputs: i32,
    slot_base: i32,
    slots: [LoraSlot; LORA_MAX_SLOTS],
}
// SAFETY: plain-old-data in the kernel's layout (`LoraArgs` in kernels/lora.cu); the pointers
// stay valid for the launch (the buffers they come from outlive it on the one stream).
unsafe impl DeviceRepr for LoraArgs {}

impl CudaDevice {
    /// Places one module's factors on the device.
    pub fn lora_mat(
        &self,
        (a, bt): (&[f32], &[f32]),
        rank: usize,
        blocks: &[LoraBlock],
        dims: LoraDims,
    ) -> Result<DeviceLoraMat> {
        check_factors(dims, rank, (a.len(), bt.len()), blocks)?;
        let limit = |what, index, limit| KernelError::OutOfRange {
            op: "cuda lora",
            what,
            index,
            limit,
        };
        if rank > LORA_MAX_RANK {
            return Err(limit("rank", rank, LORA_MAX_RANK + 1));
        }
        if blocks.len() > LORA_MAX_BLOCKS {
            return Err(limit("blocks of B", blocks.len(), LORA_MAX_BLOCKS + 1));
        }
        int("lora outputs", rank * dims.outputs)?;
        int("lora inputs", rank * dims.inputs)?;
        Ok(DeviceLoraMat {
            a: self.upload(a)?,
            bt: self.upload(bt)?,
            rank,
            blocks: blocks.to_vec(),
            dims,
        })
    }

    /// A pass of `rows` rows whose `segments` use `slots` adapters.
    pub fn lora_rows(
        &self,
        segments: &[LoraSegment],
        rows: usize,
        slots: usize,
    ) -> Result<DeviceLoraRows> {
        check_segments(segments, rows, slots)?;
        let pairs: Vec<u32> = segments
            .iter()
            .flat_map(|(r, s)| r.clone().flat_map(move |row| [row as u32, *s as u32]))
            .collect();
        int("lora rows", rows)?;
        Ok(DeviceLoraRows {
            pairs: (!pairs.is_empty())
                .then(|| self.upload(&pairs))
                .transpose()?,
            rows,
            slots,
        })
    }

    /// `y[r] += (x[r]·Aᵀ)·Bᵀ` for every row of `rows` with the factors of its slot in `slots`
    /// (`None`: that adapter leaves this module alone). `x` is `[rows × inputs]`, `y` `[rows ×
    /// outputs]`.
    pub fn lora_add(
        &self,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        rows: &DeviceLoraRows,
        slots: &[Option<&DeviceLoraMat>],
    ) -> Result<()> {
        check_len("cuda lora", "slots", slots.len(), rows.slots)?;
        let Some(dims) = slots.iter().flatten().map(|m| m.dims).next() else {
            return Ok(());
        };
        for m in slots.iter().flatten() {
            check_len("cuda lora", "inputs", m.dims.inputs, dims.inputs)?;
            check_len("cuda lora", "outputs", m.dims.outputs, dims.outputs)?;
        }
        check_len("cuda lora", "x", x.len(), rows.rows * dims.inputs)?;
        check_len("cuda lora", "y", y.len(), rows.rows * dims.outputs)?;
        let Some(pairs) = &rows.pairs else {
            return Ok(());
        };
        let stream = &self.stream;
        let n_pairs = pairs.len() / 2;
        let (y_ptr, _y_sync) = y.device_ptr_mut(stream);
        for (chunk, base) in slots
            .chunks(LORA_MAX_SLOTS)
            .zip((0..).step_by(LORA_MAX_SLOTS))
        {
            let mut args = LoraArgs {
                x: x.device_ptr(stream).0,
                y: y_ptr,
                rows: pairs.device_ptr(stream).0,
                n_rows: int("lora rows", n_pairs)?,
                inputs: int("lora inputs", dims.inputs)?,
                outputs: int("lora outputs", dims.outputs)?,
                slot_base: int("lora slot", base)?,
                slots: [LoraSlot::default(); LORA_MAX_SLOTS],
            };
            for (slot, m) in args.slots.iter_mut().zip(chunk) {
                if let Some(m) = m {
                    *slot = self.slot(m)?;
                }
            }
            if args.slots.iter().all(|s| s.rank == 0) {
                continue;
            }
            let cfg = LaunchConfig {
                grid_dim: (n_pairs as u32, 1, 1),
                block_dim: (LORA_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = self.builder(Kernel::lora_bgmv_f32)?;
            b.arg(&args);
            launch(b, cfg, Kernel::lora_bgmv_f32)?;
        }
        Ok(())
    }

    fn slot(&self, m: &DeviceLoraMat) -> Result<LoraSlot> {
        let mut blocks = [[0i32; 4]; LORA_MAX_BLOCKS];
        for (d, b) in blocks.iter_mut().zip(&m.blocks) {
            *d = [
                int("lora block", b.outputs.start)?,
                int("lora block", b.outputs.len())?,
                int("lora block", b.ranks.start)?,
                int("lora block", b.ranks.len())?,
            ];
        }
        Ok(LoraSlot {
            a: m.a.device_ptr(&self.stream).0,
            bt: m.bt.device_ptr(&self.stream).0,
            rank: m.rank as i32,
            n_blocks: m.blocks.len() as i32,
            blocks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{assert_close, device};
    use crate::cpu::{self, testutil::rand_vec, LoraMat};
    use crate::{LoraBlock, LoraDims, LoraSegment};

    const DIMS: LoraDims = LoraDims {
        inputs: 45,
        outputs: 70,
    };

    /// Slot `s`'s (A, Bᵀ, rank, blocks): plain modules of ranks 1–9 and every third a fused one
    /// whose B has three blocks.
    fn factors(s: usize) -> (Vec<f32>, Vec<f32>, usize, Vec<LoraBlock>) {
        let rank = 1 + s % 9;
        let blocks = match s % 3 {
            2 if rank >= 3 => vec![
                LoraBlock {
                    outputs: 0..40,
                    ranks: 0..1,
                },
                LoraBlock {
                    outputs: 40..55,
                    ranks: 1..2,
                },
                LoraBlock {
                    outputs: 55..70,
                    ranks: 2..rank,
                },
            ],
            _ => vec![LoraBlock {
                outputs: 0..70,
                ranks: 0..rank,
            }],
        };
        let a = rand_vec(rank * DIMS.inputs, 100 + s as u64);
        let bt = rand_vec(rank * DIMS.outputs, 200 + s as u64);
        (a, bt, rank, blocks)
    }

    #[test]
    #[ignore = "needs a CUDA GPU: cargo xtask test-gpu"]
    fn lora_rows_of_ten_adapters_match_cpu_and_their_rows_alone() {
        let d = device();
        let rows = 37;
        // Ten slots (two launches), slot 3 without this module, rows 0 and 30..32 in no segment.
        let host: Vec<_> = (0..10).map(factors).collect();
        let mats: Vec<_> = host
            .iter()
            .enumerate()
            .map(|(s, (a, bt, rank, blocks))| {
                (s != 3).then(|| d.lora_mat((a, bt), *rank, blocks, DIMS).unwrap())
            })
            .collect();
        let segments: Vec<LoraSegment> = (1..30)
            .step_by(3)
            .enumerate()
            .map(|(i, r)| (r..r + 3, i % 10))
            .chain([(32..37, 9)])
            .collect();
        let x = rand_vec(rows * DIMS.inputs, 1);
        let y0 = rand_vec(rows * DIMS.outputs, 2);
        let mut want = y0.clone();
        let cpu_mats: Vec<_> = host
            .iter()
            .enumerate()
            .map(|(s, (a, bt, rank, blocks))| {
                (s != 3).then_some(LoraMat {
                    a,
                    bt,
                    rank: *rank,
                    blocks,
                })
            })
            .collect();
        cpu::lora_add(&x, &mut want, DIMS, &segments, &cpu_mats).unwrap();
        let slots: Vec<_> = mats.iter().map(Option::as_ref).collect();
        let xd = d.upload(&x).unwrap();
        let mut yd = d.upload(&y0).unwrap();
        let pass = d.lora_rows(&segments, rows, 10).unwrap();
        d.lora_add(&xd, &mut yd, &pass, &slots).unwrap();
        let got = d.download(&yd).unwrap();
        assert_close(&got, &want, 1e-5, "lora_add");
        // Row 5 (slot 1) alone gives the bits it had among 37 rows.
        let xr = d.upload(&x[5 * DIMS.inputs..6 * DIMS.inputs]).unwrap();
        let mut yr = d.upload(&y0[5 * DIMS.outputs..6 * DIMS.outputs]).unwrap();
        let alone = d.lora_rows(&[(0..1, 1)], 1, 10).unwrap();
        d.lora_add(&xr, &mut yr, &alone, &slots).unwrap();
        assert_eq!(
            d.download(&yr).unwrap(),
            got[5 * DIMS.outputs..6 * DIMS.outputs]
        );
        // A rank over the kernel's limit and a slot count that does not match are errors.
        let big = rand_vec(1025 * DIMS.inputs, 3);
        let block = [LoraBlock {
            outputs: 0..70,
            ranks: 0..1025,
        }];
        let bt = rand_vec(1025 * DIMS.outputs, 4);
        assert!(d.lora_mat((&big, &bt), 1025, &block, DIMS).is_err());
        assert!(d.lora_add(&xd, &mut yd, &pass, &slots[..9]).is_err());
    }
}
