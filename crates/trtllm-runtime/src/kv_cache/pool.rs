//! Storage of the paged cache: per layer, keys and values `[num_blocks × block_size × kv_dim]`,
//! in f32, bf16 or f16 (rounded to nearest even when written), or quantized to INT8 / FP8 E4M3
//! with one scale per (slot, KV head), computed from that head's values when they are written
//! (dynamic, so no calibration is needed).

use trtllm_quant::codec::f32_to_e4m3;
use trtllm_quant::kernels::cpu::{KvData, PagedKv, E4M3_MAX};
use trtllm_quant::{DType, QuantAlgo};

use super::{BlockId, KvBudget};
use crate::{BuildConfig, ModelConfig, Result, RuntimeError};

/// How the pool stores keys and values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvStorage {
    F32,
    Bf16,
    F16,
    Int8,
    Fp8,
}

impl KvStorage {
    /// The storage an engine was built for (`kv_cache_quant_algo`, else `kv_cache_dtype`).
    pub fn of(build: &BuildConfig) -> Self {
        match build.quant.base.kv_cache_quant_algo {
            QuantAlgo::Int8 => KvStorage::Int8,
            QuantAlgo::Fp8 => KvStorage::Fp8,
            _ => match build.kv_cache_dtype {
                Some(DType::BF16) => KvStorage::Bf16,
                Some(DType::F16) => KvStorage::F16,
                _ => KvStorage::F32,
            },
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvStorage::F32 => "float32",
            KvStorage::Bf16 => "bfloat16",
            KvStorage::F16 => "float16",
            KvStorage::Int8 => "int8",
            KvStorage::Fp8 => "fp8",
        }
    }
}

/// One layer's keys or values.
enum Store {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
    F16(Vec<u16>),
    Int8 { q: Vec<i8>, scales: Vec<f32> },
    Fp8 { q: Vec<u8>, scales: Vec<f32> },
}

impl Store {
    fn new(storage: KvStorage, values: usize, heads: usize) -> Self {
        match storage {
            KvStorage::F32 => Store::F32(vec![0.0; values]),
            KvStorage::Bf16 => Store::Bf16(vec![0; values]),
            KvStorage::F16 => Store::F16(vec![0; values]),
            KvStorage::Int8 => Store::Int8 {
                q: vec![0; values],
                scales: vec![0.0; heads],
            },
            KvStorage::Fp8 => Store::Fp8 {
                q: vec![0; values],
                scales: vec![0.0; heads],
            },
        }
    }

    fn data(&self) -> KvData<'_> {
        match self {
            Store::F32(d) => KvData::F32(d),
            Store::Bf16(d) => KvData::Bf16(d),
            Store::F16(d) => KvData::F16(d),
            Store::Int8 { q, scales } => KvData::Int8 { q, scales },
            Store::Fp8 { q, scales } => KvData::Fp8 { q, scales },
        }
    }

    /// Copies `n` slots from slot `src` to slot `dst` (values, and scales where quantized);
    /// `row` values and `heads` scales per slot.
    fn copy_slots(&mut self, (src, dst, n): (usize, usize, usize), (row, heads): (usize, usize)) {
        fn copy<T: Copy>(d: &mut [T], (src, dst, n): (usize, usize, usize), per: usize) {
            d.copy_within(src * per..(src + n) * per, dst * per);
        }
        let slots = (src, dst, n);
        match self {
            Store::F32(d) => copy(d, slots, row),
            Store::Bf16(d) | Store::F16(d) => copy(d, slots, row),
            Store::Int8 { q, scales } => {
                copy(q, slots, row);
                copy(scales, slots, heads);
            }
            Store::Fp8 { q, scales } => {
                copy(q, slots, row);
                copy(scales, slots, heads);
            }
        }
    }

    /// Stores the row of `slot` (`x.len()` values, `head_dim` per head).
    fn write(&mut self, slot: usize, x: &[f32], head_dim: usize) {
        let at = slot * x.len();
        let heads = x.len() / head_dim;
        match self {
            Store::F32(d) => d[at..at + x.len()].copy_from_slice(x),
            Store::Bf16(d) => {
                for (o, &v) in d[at..at + x.len()].iter_mut().zip(x) {
                    *o = half::bf16::from_f32(v).to_bits();
                }
            }
            Store::F16(d) => {
                for (o, &v) in d[at..at + x.len()].iter_mut().zip(x) {
                    *o = half::f16::from_f32(v).to_bits();
                }
            }
            Store::Int8 { q, scales } => {
                for (h, vals) in x.chunks_exact(head_dim).enumerate() {
                    let s = scale_for(vals, 127.0);
                    scales[slot * heads + h] = s;
                    let out = &mut q[at + h * head_dim..at + (h + 1) * head_dim];
                    for (o, &v) in out.iter_mut().zip(vals) {
                        *o = (v / s).round().clamp(-127.0, 127.0) as i8;
                    }
                }
            }
            Store::Fp8 { q, scales } => {
                for (h, vals) in x.chunks_exact(head_dim).enumerate() {
                    let s = scale_for(vals, E4M3_MAX);
                    scales[slot * heads + h] = s;
                    let out = &mut q[at + h * head_dim..at + (h + 1) * head_dim];
                    for (o, &v) in out.iter_mut().zip(vals) {
                        *o = f32_to_e4m3(v / s);
                    }
                }
            }
        }
    }
}

fn scale_for(vals: &[f32], max_code: f32) -> f32 {
    let amax = vals.iter().fold(0f32, |a, v| a.max(v.abs()));
    if amax > 0.0 {
        amax / max_code
    } else {
        1.0
    }
}

/// Every layer's pools in host memory: what the CPU backend reads and writes.
pub(crate) struct HostKv {
    layers: Vec<(Store, Store)>,
    block_size: usize,
    head_dim: usize,
    kv_dim: usize,
}

impl HostKv {
    /// Layer `i`'s pools.
    pub(crate) fn layer(&self, i: usize) -> PagedKv<'_> {
        let (k, v) = &self.layers[i];
        PagedKv {
            k: k.data(),
            v: v.data(),
            block_size: self.block_size,
        }
    }

    /// Makes each copy in every layer of its group (`layer_group`).
    pub(crate) fn copy_blocks(&mut self, layer_group: &[usize], copies: &[super::BlockCopy]) {
        let (bs, per) = (self.block_size, (self.kv_dim, self.kv_dim / self.head_dim));
        for (layer, (k, v)) in self.layers.iter_mut().enumerate() {
            for c in copies.iter().filter(|c| c.group == layer_group[layer]) {
                let slots = (c.src as usize * bs, c.dst as usize * bs, bs);
                k.copy_slots(slots, per);
                v.copy_slots(slots, per);
            }
        }
    }

    /// Stores one position's key and value rows of layer `layer` in `blocks`' slot for `pos`.
    pub(crate) fn write(
        &mut self,
        layer: usize,
        blocks: &[BlockId],
        pos: usize,
        k: &[f32],
        v: &[f32],
    ) {
        let slot = blocks[pos / self.block_size] as usize * self.block_size + pos % self.block_size;
        let (kl, vl) = &mut self.layers[layer];
        kl.write(slot, k, self.head_dim);
        vl.write(slot, v, self.head_dim);
    }
}

/// Every layer's pools, in host memory or on a GPU (where the model runs). Each backend takes
/// its own half once per forward pass ([`KvPool::host_mut`], `device_mut`), so inside the
/// decoder a pool on the wrong device is a type error.
enum Layers {
    Host(HostKv),
    #[cfg(feature = "cuda")]
    Device(device::DeviceKvs),
}

pub struct KvPool {
    /// Its twins on the other ranks of a split engine (made by rank 0's runner).
    pub(crate) remote: Option<crate::parallel::proxy::RemotePool>,
    layers: Layers,
    block_size: usize,
    storage: KvStorage,
    /// Blocks of each KV group, to check block tables against.
    group_blocks: Vec<usize>,
    /// Each layer's KV group.
    layer_group: Vec<usize>,
}

impl KvPool {
    /// Each layer gets its group's blocks of `budget`. Zeroed pages come from the OS lazily,
    /// so an unused pool costs address space, not memory.
    pub fn new(model: &ModelConfig, storage: KvStorage, budget: &KvBudget) -> Result<Self> {
        let per_layer = layer_blocks(model, budget)?;
        // Address space is not memory: a pool past the machine's memory would fail at first
        // use (or abort at allocation), so it is refused here, with the figures.
        let slots: usize = per_layer.iter().map(|b| b * budget.block_size).sum();
        let value_bytes = match storage {
            KvStorage::F32 => 4,
            KvStorage::Bf16 | KvStorage::F16 => 2,
            KvStorage::Int8 | KvStorage::Fp8 => 1,
        };
        let bytes = slots as f64 * 2.0 * model.kv_dim() as f64 * value_bytes as f64;
        if let Some(total) = super::meminfo("MemTotal:").filter(|&t| bytes > t as f64) {
            return Err(RuntimeError::KvCacheTooLarge {
                need_gib: bytes / GIB,
                have_gib: total as f64 / GIB,
            });
        }
        let layers = per_layer
            .into_iter()
            .map(|blocks| {
                let slots = blocks * budget.block_size;
                let (values, heads) = (slots * model.kv_dim(), slots * model.num_kv_heads);
                (
                    Store::new(storage, values, heads),
                    Store::new(storage, values, heads),
                )
            })
            .collect();
        Ok(Self {
            remote: None,
            layers: Layers::Host(HostKv {
                layers,
                block_size: budget.block_size,
                head_dim: model.head_dim,
                kv_dim: model.kv_dim(),
            }),
            block_size: budget.block_size,
            storage,
            group_blocks: budget.groups.iter().map(|g| g.blocks).collect(),
            layer_group: layer_groups(model),
        })
    }

    /// Checks that `copies` name blocks of their KV groups; returns each layer's group, which
    /// the copies apply to.
    pub(crate) fn check_copies(&self, copies: &[super::BlockCopy]) -> Result<&[usize]> {
        if let Some(c) = copies.iter().find(|c| {
            let blocks = self.group_blocks.get(c.group).copied().unwrap_or(0);
            c.src as usize >= blocks || c.dst as usize >= blocks
        }) {
            return Err(crate::RuntimeError::InvalidKvConfig {
                field: "block copy",
                value: format!("{c:?}"),
                expected: "blocks of the pool's KV groups",
            });
        }
        Ok(&self.layer_group)
    }

    /// Errors unless `table` (KV group `group`'s, whose layers see `window` keys) covers
    /// positions up to `end` and names existing blocks wherever a query after `past` reads or
    /// writes (entries before the window's start are never touched).
    pub(crate) fn check_table(
        &self,
        (group, window): (usize, Option<usize>),
        table: &[BlockId],
        (past, end): (usize, usize),
    ) -> Result<()> {
        let bs = self.block_size;
        if table.len() * bs < end {
            return Err(crate::RuntimeError::OutOfKvBlocks {
                needed: end.div_ceil(bs) - table.len(),
                available: 0,
            });
        }
        let blocks = self.group_blocks.get(group).copied().unwrap_or(0);
        let first = super::first_block_read(window, past, bs);
        match table[first..end.div_ceil(bs)]
            .iter()
            .find(|&&b| b as usize >= blocks)
        {
            Some(&b) => Err(crate::RuntimeError::InvalidKvConfig {
                field: "block table",
                value: format!("block {b} in KV group {group}"),
                expected: "ids of the pool's blocks",
            }),
            None => Ok(()),
        }
    }

    /// Bytes of one token's key and value in one layer.
    pub fn bytes_per_layer_token(model: &ModelConfig, storage: KvStorage) -> usize {
        let per_side = match storage {
            KvStorage::F32 => model.kv_dim() * 4,
            KvStorage::Bf16 | KvStorage::F16 => model.kv_dim() * 2,
            KvStorage::Int8 | KvStorage::Fp8 => model.kv_dim() + model.num_kv_heads * 4,
        };
        2 * per_side
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn storage(&self) -> KvStorage {
        self.storage
    }

    /// The pools in host memory; an error for a pool on a GPU.
    pub(crate) fn host_mut(&mut self) -> Result<&mut HostKv> {
        match &mut self.layers {
            Layers::Host(h) => Ok(h),
            #[cfg(feature = "cuda")]
            Layers::Device(_) => Err(on_other_device()),
        }
    }
}

/// Each layer's block count: its group's in `budget`, which must have the model's groups.
pub(crate) fn layer_blocks(model: &ModelConfig, budget: &KvBudget) -> Result<Vec<usize>> {
    let groups = model.kv_groups();
    let windows: Vec<_> = budget.groups.iter().map(|g| g.window).collect();
    if windows != groups.windows {
        return Err(crate::RuntimeError::InvalidKvConfig {
            field: "budget",
            value: format!("groups with windows {windows:?}"),
            expected: "one group per attention span of the model",
        });
    }
    // A layer another pipeline stage computes gets no blocks here.
    Ok(groups
        .of_layer
        .iter()
        .enumerate()
        .map(|(l, &g)| match model.computes_layer(l) {
            true => budget.groups[g].blocks,
            false => 0,
        })
        .collect())
}

/// Each layer's KV group; none (a group no copy names) for a layer another pipeline stage
/// computes, which holds no blocks here.
pub(crate) fn layer_groups(model: &ModelConfig) -> Vec<usize> {
    let groups = model.kv_groups().of_layer;
    let held = |l: usize| model.computes_layer(l);
    (groups.iter().enumerate())
        .map(|(l, &g)| if held(l) { g } else { usize::MAX })
        .collect()
}

/// A pool and a model on different devices: the caller created the pool elsewhere than through
/// its runner's `new_pool`.
#[cfg(feature = "cuda")]
fn on_other_device() -> crate::RuntimeError {
    crate::RuntimeError::InvalidDevice(
        "the KV pool is not on the model's device: create it with ModelRunner::new_pool".into(),
    )
}

#[cfg(feature = "cuda")]
pub(crate) mod device {
    use trtllm_quant::kernels::cuda::{CudaDevice, DeviceKv};

    use super::{layer_blocks, KvBudget, KvPool, KvStorage, Layers};
    use crate::kv_cache::BlockCopy;
    use crate::{ModelConfig, Result};

    /// Every layer's pools on the GPU: what the CUDA backend reads and writes.
    pub(crate) struct DeviceKvs {
        layers: Vec<DeviceKv>,
        block_size: usize,
        /// Values and scales per slot: (kv_dim, n_kv_heads).
        row: (usize, usize),
    }

    impl DeviceKvs {
        pub(crate) fn block_size(&self) -> usize {
            self.block_size
        }

        /// Layer `i`'s pools.
        pub(crate) fn layer(&mut self, i: usize) -> &mut DeviceKv {
            &mut self.layers[i]
        }

        /// Each copy in every layer of its group (`layer_group`), on `dev`'s stream.
        pub(crate) fn copy_blocks(
            &mut self,
            dev: &CudaDevice,
            layer_group: &[usize],
            copies: &[BlockCopy],
        ) -> Result<()> {
            let bs = self.block_size;
            for (layer, kv) in self.layers.iter_mut().enumerate() {
                for c in copies.iter().filter(|c| c.group == layer_group[layer]) {
                    let slots = (c.src as usize * bs, c.dst as usize * bs, bs);
                    dev.kv_copy_slots(kv, slots, self.row)?;
                }
            }
            Ok(())
        }
    }

    impl KvPool {
        /// A zeroed pool in `dev`'s memory, each layer with its group's blocks of `budget`.
        pub(crate) fn on_device(
            model: &ModelConfig,
            storage: KvStorage,
            budget: &KvBudget,
            dev: &CudaDevice,
        ) -> Result<Self> {
            let layer = |blocks: usize| -> Result<DeviceKv> {
                // A layer another stage computes keeps one slot: no device allocation is empty.
                let slots = (blocks * budget.block_size).max(1);
                let (values, heads) = (slots * model.kv_dim(), slots * model.num_kv_heads);
                Ok(match storage {
                    KvStorage::F32 => DeviceKv::F32 {
                        k: dev.zeros(values)?,
                        v: dev.zeros(values)?,
                    },
                    KvStorage::Bf16 => DeviceKv::Bf16 {
                        k: dev.zeros(values)?,
                        v: dev.zeros(values)?,
                    },
                    KvStorage::F16 => DeviceKv::F16 {
                        k: dev.zeros(values)?,
                        v: dev.zeros(values)?,
                    },
                    KvStorage::Int8 => DeviceKv::Int8 {
                        k: dev.zeros(values)?,
                        k_scales: dev.zeros(heads)?,
                        v: dev.zeros(values)?,
                        v_scales: dev.zeros(heads)?,
                    },
                    KvStorage::Fp8 => DeviceKv::Fp8 {
                        k: dev.zeros(values)?,
                        k_scales: dev.zeros(heads)?,
                        v: dev.zeros(values)?,
                        v_scales: dev.zeros(heads)?,
                    },
                })
            };
            let layers = layer_blocks(model, budget)?
                .into_iter()
                .map(layer)
                .collect::<Result<_>>()?;
            Ok(Self {
                remote: None,
                layers: Layers::Device(DeviceKvs {
                    layers,
                    block_size: budget.block_size,
                    row: (model.kv_dim(), model.num_kv_heads),
                }),
                block_size: budget.block_size,
                storage,
                group_blocks: budget.groups.iter().map(|g| g.blocks).collect(),
                layer_group: super::layer_groups(model),
            })
        }

        /// The pools on the GPU; an error for a pool in host memory.
        pub(crate) fn device_mut(&mut self) -> Result<&mut DeviceKvs> {
            match &mut self.layers {
                Layers::Device(d) => Ok(d),
                Layers::Host(_) => Err(super::on_other_device()),
            }
        }
    }
}

const GIB: f64 = (1u64 << 30) as f64;
