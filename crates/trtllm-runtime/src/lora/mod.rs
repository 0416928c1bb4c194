//! LoRA adapters: read from PEFT's files on the host ([`LoraAdapter`]), placed on a runner's
//! device ([`LoraWeights`], made by `ModelRunner::load_lora`), and added to the forward pass's
//! linear modules for the rows of the sequences that name them.
//!
//! A pass groups its rows by adapter, and each adapted module runs two small products per
//! adapter over that adapter's rows only (S-LoRA / Punica's segmented form): the cost grows with
//! the adapters in the batch, never with its requests, and rows without an adapter pay nothing.

mod adapter;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

pub use adapter::{LoraAdapter, LoraFactors, LoraModule};

use crate::cpu_backend::CpuBackend;
use crate::decoder::Backend;
use crate::model::SeqChunk;
use crate::{Result, RuntimeError};

/// An adapter's factors in one runner's device memory. A [`SeqChunk`] names the adapter its
/// rows use; a runner refuses weights another device's runner made.
pub struct LoraWeights {
    id: u64,
    name: String,
    pub(crate) inner: LoraInner,
}

pub(crate) enum LoraInner {
    Cpu(DeviceLora<CpuBackend>),
    #[cfg(feature = "cuda")]
    Cuda(DeviceLora<crate::cuda::CudaBackend>),
}

impl LoraWeights {
    pub(crate) fn new(name: &str, inner: LoraInner) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Self {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            name: name.to_string(),
            inner,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Distinct for every load, so two loads of one adapter never share rows by accident.
    pub fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn wrong_device(&self) -> RuntimeError {
        RuntimeError::Lora {
            adapter: self.name.clone(),
            reason: "its weights were loaded by a runner on another device".into(),
        }
    }
}

impl std::fmt::Debug for LoraWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LoraWeights({} #{})", self.name, self.id)
    }
}

/// Each adapted module's factors on the device, per layer.
pub(crate) struct DeviceLora<B: Backend> {
    layers: Vec<BTreeMap<LoraModule, Factors<B>>>,
}

struct Factors<B: Backend> {
    a: B::Matrix,
    b: B::Matrix,
    inputs: usize,
    outputs: usize,
}

impl<B: Backend> DeviceLora<B> {
    pub fn new(b: &B, adapter: &LoraAdapter) -> Result<Self> {
        let layers = adapter
            .layers
            .iter()
            .map(|modules| {
                modules
                    .iter()
                    .map(|(&m, f)| {
                        let factors = Factors {
                            a: b.matrix_of(&f.a, f.rank, f.inputs)?,
                            b: b.matrix_of(&f.b, f.outputs, f.rank)?,
                            inputs: f.inputs,
                            outputs: f.outputs,
                        };
                        Ok((m, factors))
                    })
                    .collect::<Result<BTreeMap<_, _>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }
}

/// Most rows one LoRA product takes.
const ROWS_PER_PRODUCT: usize = 256;

/// The rows of one pass that use one adapter.
pub(crate) struct LoraGroup<'a, B: Backend> {
    lora: &'a DeviceLora<B>,
    rows: Vec<usize>,
    ones: Vec<f32>,
}

/// The pass's rows grouped by the adapter their chunk names (chunks without one are in none).
pub(crate) fn groups<'a, B: Backend>(
    b: &B,
    batch: &[SeqChunk<'a>],
) -> Result<Vec<LoraGroup<'a, B>>> {
    let mut by_id: BTreeMap<u64, LoraGroup<'a, B>> = BTreeMap::new();
    let mut start = 0;
    for c in batch {
        let rows = start..start + c.tokens.len();
        start = rows.end;
        let Some(w) = c.lora else { continue };
        let g = match by_id.entry(w.id) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => e.insert(LoraGroup {
                lora: b.lora(w)?,
                rows: Vec::new(),
                ones: Vec::new(),
            }),
        };
        g.rows.extend(rows);
    }
    let mut groups: Vec<_> = by_id.into_values().collect();
    for g in &mut groups {
        g.ones = vec![1.0; g.rows.len()];
    }
    Ok(groups)
}

/// `y[rows] += (x[rows]·Aᵀ)·Bᵀ` of module `module` of layer `layer`, for every group whose
/// adapter changes it; `x` and `y` hold all `n` rows of the pass.
pub(crate) fn apply<B: Backend>(
    b: &B,
    groups: &[LoraGroup<'_, B>],
    (layer, module): (usize, LoraModule),
    (x, n): (&B::Act, usize),
    y: &mut B::Act,
) -> Result<()> {
    for g in groups {
        let Some(f) = g.lora.layers.get(layer).and_then(|l| l.get(&module)) else {
            continue;
        };
        // A bounded number of rows per product keeps the temporaries small enough for the
        // allocator to reuse: a prefill's whole update (thousands of rows × the fused width)
        // would be fresh pages, zeroed by the kernel, at every module.
        for rows in g.rows.chunks(ROWS_PER_PRODUCT) {
            let m = rows.len();
            let gathered;
            let xg = match m == n {
                true => x,
                false => {
                    gathered = b.gather_rows(x, rows, f.inputs)?;
                    &gathered
                }
            };
            let t = b.matmul(&f.a, xg, m)?;
            let u = b.matmul(&f.b, &t, m)?;
            b.add_rows_scaled(y, &u, (rows, &g.ones[..m]), f.outputs)?;
        }
    }
    Ok(())
}
