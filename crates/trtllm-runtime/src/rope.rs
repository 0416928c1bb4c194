//! Which rotary table each layer rotates by, and each table's frequencies for one step.

use trtllm_quant::kernels::cpu::{RopeFreqs, RopeTable};

use crate::model::SeqChunk;
use crate::{ModelConfig, PositionKind};

/// A model's rotary embeddings: the global table and, where sliding-window layers have their
/// own base and scaling (Gemma 3), theirs.
#[derive(Clone, Debug)]
pub(crate) struct Ropes {
    tables: Vec<RopeTable>,
    table_of_layer: Vec<usize>,
}

impl Ropes {
    /// `None` for a model with learned positions.
    pub fn of(cfg: &ModelConfig) -> Option<Self> {
        let PositionKind::Rope {
            theta,
            rotary_dim,
            scaling,
        } = &cfg.position
        else {
            return None;
        };
        let mut tables = vec![RopeTable::new(*rotary_dim, *theta, scaling)];
        let mut table_of_layer = vec![0; cfg.num_layers];
        if let Some(local) = &cfg.features.local_rope {
            tables.push(RopeTable::new(*rotary_dim, local.theta, &local.scaling));
            for (layer, table) in table_of_layer.iter_mut().enumerate() {
                if cfg.window(layer).is_some() {
                    *table = 1;
                }
            }
        }
        Some(Self {
            tables,
            table_of_layer,
        })
    }

    /// Each table's frequencies for the tokens of `batch`, indexed as [`Self::table_of`] says.
    pub fn step(&self, batch: &[SeqChunk<'_>]) -> Vec<RopeFreqs> {
        let seqs = || {
            batch
                .iter()
                .map(|c| (c.tokens.len(), c.past + c.tokens.len()))
        };
        self.tables.iter().map(|t| t.step_freqs(seqs())).collect()
    }

    pub fn table_of(&self, layer: usize) -> usize {
        self.table_of_layer[layer]
    }
}
