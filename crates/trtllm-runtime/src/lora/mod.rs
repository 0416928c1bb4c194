//! LoRA adapters: read from PEFT's files on the host ([`LoraAdapter`]), placed on a runner's
//! device ([`LoraWeights`], made by `ModelRunner::load_lora`), and added to the forward pass's
//! linear modules for the rows of the sequences that name them.
//!
//! A pass numbers its adapters (slots) and segments its rows by adapter once; each adapted module
//! then adds every adapter's update in one kernel over the adapted rows (Punica's BGMV, the
//! backend's `lora_add`): no per-request or per-adapter loop, no gathered copies, and rows
//! without an adapter pay nothing.

mod adapter;
mod shard;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

pub use adapter::{LoraAdapter, LoraFactors, LoraModule};

use crate::cpu_backend::CpuBackend;
use crate::decoder::Backend;
use crate::model::SeqChunk;
use crate::{Result, RuntimeError};
use trtllm_quant::kernels::LoraSegment;

/// An adapter's factors in one runner's device memory. A [`SeqChunk`] names the adapter its
/// rows use; a runner refuses weights another device's runner made.
pub struct LoraWeights {
    id: u64,
    name: String,
    pub(crate) inner: LoraInner,
    /// On rank 0 of a split engine: the other ranks' parts, dropped with this.
    pub(crate) remote: Option<crate::parallel::proxy::RemoteLora>,
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
            remote: None,
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
    layers: Vec<BTreeMap<LoraModule, B::LoraMat>>,
}

impl<B: Backend> DeviceLora<B> {
    pub fn new(b: &B, adapter: &LoraAdapter) -> Result<Self> {
        let layers = adapter
            .layers
            .iter()
            .map(|modules| {
                modules
                    .iter()
                    .map(|(&m, f)| Ok((m, b.lora_mat(f)?)))
                    .collect::<Result<BTreeMap<_, _>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }
}

/// The adapters of one forward pass (its slots) and which rows use each.
pub(crate) struct LoraPass<'a, B: Backend> {
    adapters: Vec<&'a DeviceLora<B>>,
    rows: B::LoraRows,
}

/// The pass's adapters, in the order the batch first names them, and its rows by adapter
/// (consecutive chunks of one adapter form one segment); `None` when no chunk names one.
pub(crate) fn pass<'a, B: Backend>(
    b: &B,
    batch: &[SeqChunk<'a>],
    rows: usize,
) -> Result<Option<LoraPass<'a, B>>> {
    let mut ids: Vec<u64> = Vec::new();
    let mut adapters = Vec::new();
    let mut segments: Vec<LoraSegment> = Vec::new();
    let mut start = 0;
    for c in batch {
        let span = start..start + c.tokens.len();
        start = span.end;
        let Some(w) = c.lora else { continue };
        let slot = match ids.iter().position(|&id| id == w.id) {
            Some(s) => s,
            None => {
                adapters.push(b.lora(w)?);
                ids.push(w.id);
                ids.len() - 1
            }
        };
        match segments.last_mut() {
            Some((r, s)) if *s == slot && r.end == span.start => r.end = span.end,
            _ => segments.push((span, slot)),
        }
    }
    if adapters.is_empty() {
        return Ok(None);
    }
    let rows = b.lora_rows(&segments, rows, adapters.len())?;
    Ok(Some(LoraPass { adapters, rows }))
}

/// `y[r] += (x[r]·Aᵀ)·Bᵀ` of module `module` of layer `layer` for every row whose adapter
/// changes it; `x` and `y` hold all the pass's rows.
pub(crate) fn apply<B: Backend>(
    b: &B,
    pass: &LoraPass<'_, B>,
    (layer, module): (usize, LoraModule),
    x: &B::Act,
    y: &mut B::Act,
) -> Result<()> {
    let slots: Vec<Option<&B::LoraMat>> = pass
        .adapters
        .iter()
        .map(|d| d.layers.get(layer).and_then(|l| l.get(&module)))
        .collect();
    if slots.iter().all(Option::is_none) {
        return Ok(());
    }
    b.lora_add(x, y, &pass.rows, &slots)
}
