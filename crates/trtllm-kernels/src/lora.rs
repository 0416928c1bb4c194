//! LoRA's batched update, the shapes both devices' kernels take: every adapted row adds
//! `(x·Aᵀ)·Bᵀ` with its own adapter's factors, all adapters in one pass over the rows (Punica's
//! BGMV / S-LoRA), never a loop over requests. A row's sums run in one order whatever its
//! neighbours, so the update is batch invariant.

use std::ops::Range;

use crate::error::check_len;
use crate::{KernelError, Result};

/// A part of B that is not zero: its output rows and the ranks (A's rows) that feed them. A fused
/// module's B is block-diagonal (q/k/v, or gate/up, each fed by its own projection's ranks), and
/// the kernels skip the zeros.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoraBlock {
    pub outputs: Range<usize>,
    pub ranks: Range<usize>,
}

/// The widths of one module's update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoraDims {
    pub inputs: usize,
    pub outputs: usize,
}

/// A consecutive run of a pass's rows and the slot (the pass's adapter) whose factors they use.
pub type LoraSegment = (Range<usize>, usize);

/// The factors' lengths and blocks against the module's widths: A `[rank × inputs]`, Bᵀ
/// `[rank × outputs]`.
pub(crate) fn check_factors(
    dims: LoraDims,
    rank: usize,
    (a, bt): (usize, usize),
    blocks: &[LoraBlock],
) -> Result<()> {
    check_len("lora", "A", a, rank * dims.inputs)?;
    check_len("lora", "B", bt, rank * dims.outputs)?;
    for b in blocks {
        if b.outputs.start > b.outputs.end || b.outputs.end > dims.outputs {
            return Err(out_of_range(
                "block outputs",
                b.outputs.end,
                dims.outputs + 1,
            ));
        }
        if b.ranks.start > b.ranks.end || b.ranks.end > rank {
            return Err(out_of_range("block ranks", b.ranks.end, rank + 1));
        }
    }
    Ok(())
}

/// Segments in increasing order, disjoint, within `rows` rows, naming one of `slots` slots.
pub(crate) fn check_segments(segments: &[LoraSegment], rows: usize, slots: usize) -> Result<()> {
    let mut end = 0;
    for (r, slot) in segments {
        if r.start < end || r.start > r.end {
            return Err(out_of_range("segment start", r.start, end.max(r.end) + 1));
        }
        if r.end > rows {
            return Err(out_of_range("segment end", r.end, rows + 1));
        }
        if *slot >= slots {
            return Err(out_of_range("slot", *slot, slots));
        }
        end = r.end;
    }
    Ok(())
}

fn out_of_range(what: &'static str, index: usize, limit: usize) -> KernelError {
    KernelError::OutOfRange {
        op: "lora",
        what,
        index,
        limit,
    }
}
