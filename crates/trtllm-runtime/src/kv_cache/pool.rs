//! Storage of the paged cache: per layer, keys and values `[num_blocks × block_size × kv_dim]`.

use trtllm_quant::kernels::cpu::PagedKv;

use super::BlockId;
use crate::ModelConfig;

pub struct KvPool {
    layers: Vec<(Vec<f32>, Vec<f32>)>,
    block_size: usize,
    kv_dim: usize,
}

impl KvPool {
    /// Zeroed pages come from the OS lazily, so an unused pool costs address space, not memory.
    pub fn new(model: &ModelConfig, block_size: usize, num_blocks: usize) -> Self {
        let kv_dim = model.kv_dim();
        let floats = num_blocks * block_size * kv_dim;
        let layers = (0..model.num_layers)
            .map(|_| (vec![0f32; floats], vec![0f32; floats]))
            .collect();
        Self {
            layers,
            block_size,
            kv_dim,
        }
    }

    pub fn bytes_per_token(model: &ModelConfig) -> usize {
        2 * model.num_layers * model.kv_dim() * std::mem::size_of::<f32>()
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn layer(&self, i: usize) -> PagedKv<'_> {
        let (k, v) = &self.layers[i];
        PagedKv {
            k,
            v,
            block_size: self.block_size,
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
        let range = slot * self.kv_dim..(slot + 1) * self.kv_dim;
        let (kl, vl) = &mut self.layers[layer];
        kl[range.clone()].copy_from_slice(k);
        vl[range].copy_from_slice(v);
    }
}
