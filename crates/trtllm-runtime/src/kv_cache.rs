//! A contiguous per-sequence KV cache: for every layer, keys and values of all cached positions,
//! `[len × num_kv_heads × head_dim]`, grown on demand up to the sequence limit.

use crate::{ModelConfig, Result, RuntimeError};

pub struct KvCache {
    layers: Vec<LayerCache>,
    kv_dim: usize,
    len: usize,
    max_len: usize,
}

pub(crate) struct LayerCache {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

impl KvCache {
    pub fn new(cfg: &ModelConfig, max_len: usize) -> Self {
        let layers = (0..cfg.num_layers)
            .map(|_| LayerCache {
                k: Vec::new(),
                v: Vec::new(),
            })
            .collect();
        Self {
            layers,
            kv_dim: cfg.kv_dim(),
            len: 0,
            max_len,
        }
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Forgets every position from `len` on (e.g. to reuse a prompt prefix).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Makes room for `n` more positions in every layer.
    pub(crate) fn reserve(&mut self, n: usize) -> Result<()> {
        let need = self.len + n;
        if need > self.max_len {
            return Err(RuntimeError::PromptTooLong {
                len: need,
                max: self.max_len,
                limit: "max_seq_len",
            });
        }
        let elems = need * self.kv_dim;
        for l in &mut self.layers {
            if l.k.len() < elems {
                // Grow geometrically so decode does not reallocate every step.
                let cap = (elems.max(l.k.len() * 2)).min(self.max_len * self.kv_dim);
                l.k.resize(cap, 0.0);
                l.v.resize(cap, 0.0);
            }
        }
        Ok(())
    }

    pub(crate) fn layer_mut(&mut self, i: usize) -> &mut LayerCache {
        &mut self.layers[i]
    }

    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}
