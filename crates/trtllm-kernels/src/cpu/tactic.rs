//! How one `linear` call runs (its tactic, in TensorRT's word): the instruction set, how far
//! ahead the decode kernels prefetch the weight stream, which GEMM serves batched rows over dense
//! weights, and how finely output columns are split over the thread pool. The runtime times
//! candidates per weight shape on the machine at hand and keeps the fastest in a timing cache;
//! [`Tactic::default`] is what the kernels were tuned to by hand.

use serde::{Deserialize, Serialize};

use super::simd::{detected_isa, Isa};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tactic {
    /// The best instruction set the call may use (capped at run time by what the CPU has, so a
    /// tactic timed elsewhere never runs an instruction this CPU lacks).
    pub isa: Isa,
    /// Weight rows ahead that the decode kernels prefetch (0: none; at most [`MAX_PREFETCH`]).
    pub prefetch_rows: usize,
    /// Batched rows over dense weights take the direct tiles, not the packed GEMM.
    pub direct: bool,
    /// Column chunks per pool thread (1 to [`MAX_CHUNKS`]): more balance the load, fewer cost
    /// less scheduling.
    pub chunks_per_thread: usize,
    /// The quantized GEMV runs 8 weight rows per tile instead of 4 (SmolLM2 decode on the Xeon:
    /// W4A16 g128 and W8A16 +6–7 %, int4 g32 −5 %; so a tuned choice, not a constant).
    #[serde(default)]
    pub wide_tiles: bool,
    /// Batch invariance: every row count takes kernels with one summation order per output
    /// element (the GEMV's: dot tiles over dense weights, the GEMV itself over packed ones), so
    /// a row's result does not depend on the rows beside it.
    #[serde(default)]
    pub invariant: bool,
}

pub const MAX_PREFETCH: usize = 64;
pub const MAX_CHUNKS: usize = 64;

impl Default for Tactic {
    fn default() -> Self {
        Self {
            isa: detected_isa(),
            prefetch_rows: 8,
            direct: true,
            chunks_per_thread: 4,
            wide_tiles: false,
            invariant: false,
        }
    }
}

impl Tactic {
    /// The tactic with every field in its valid range (a cache file is user input).
    pub(crate) fn clamped(&self) -> Self {
        Self {
            isa: self.isa.min(super::simd::isa()),
            prefetch_rows: self.prefetch_rows.min(MAX_PREFETCH),
            direct: self.direct,
            chunks_per_thread: self.chunks_per_thread.clamp(1, MAX_CHUNKS),
            wide_tiles: self.wide_tiles,
            invariant: self.invariant,
        }
    }
}

/// Which kernels a call's row count selects; a tactic is chosen per regime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Regime {
    /// 1–3 rows: one GEMV per row.
    Decode,
    /// 4–32 rows: the direct tiles (dense weights) or the packed GEMM.
    Batched,
    /// More rows: the packed GEMM.
    Prefill,
}

impl Regime {
    pub const ALL: [Regime; 3] = [Regime::Decode, Regime::Batched, Regime::Prefill];

    pub fn of(rows: usize) -> Self {
        if rows < super::matmul::PACKED_MIN_ROWS {
            Regime::Decode
        } else if rows <= super::matmul::DIRECT_MAX_ROWS {
            Regime::Batched
        } else {
            Regime::Prefill
        }
    }

    /// The row count a regime is timed at.
    pub fn sample_rows(self) -> usize {
        match self {
            Regime::Decode => 1,
            Regime::Batched => 32,
            Regime::Prefill => 128,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Regime::Decode => "decode",
            Regime::Batched => "batched",
            Regime::Prefill => "prefill",
        }
    }
}
