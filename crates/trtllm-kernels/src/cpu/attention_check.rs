//! The checks every attention backend (CPU and CUDA) runs on a batch before reading a pool.

use super::attention::{AttentionSeq, AttentionShape};
use crate::error::check_len;
use crate::{KernelError, Result};

/// Lengths of one layer's key/value pools (values, and scales for quantized pools).
#[derive(Clone, Copy, Debug)]
pub(crate) struct PoolShape {
    pub k: usize,
    pub v: usize,
    pub k_scales: Option<usize>,
    pub v_scales: Option<usize>,
    pub block_size: usize,
}

/// The checks every attention backend runs before reading the pools: head counts, `q`/`out`
/// lengths, whole blocks, scales per (slot, head), and block tables that cover each sequence
/// with block ids inside the pool.
pub(crate) fn check_batch(
    (q_len, out_len): (usize, usize),
    pool: PoolShape,
    seqs: &[AttentionSeq<'_>],
    shape: AttentionShape,
) -> Result<()> {
    let AttentionShape {
        n_heads,
        n_kv_heads,
        head_dim,
        ..
    } = shape;
    if n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
        return Err(KernelError::ShapeMismatch {
            op: "attention",
            what: "n_heads (a multiple of n_kv_heads)",
            expected: n_kv_heads,
            got: n_heads,
        });
    }
    let kv_row = n_kv_heads * head_dim;
    let block_floats = pool.block_size * kv_row;
    let rows: usize = seqs.iter().map(|s| s.n_new).sum();
    check_len("attention", "q", q_len, rows * n_heads * head_dim)?;
    check_len("attention", "out", out_len, q_len)?;
    check_len("attention", "v pool", pool.v, pool.k)?;
    for (what, n) in [("k scales", pool.k_scales), ("v scales", pool.v_scales)] {
        if let Some(n) = n {
            check_len("attention", what, n, pool.k / head_dim.max(1))?;
        }
    }
    if block_floats == 0 || !pool.k.is_multiple_of(block_floats) {
        return Err(KernelError::ShapeMismatch {
            op: "attention",
            what: "k pool (a whole number of blocks)",
            expected: block_floats,
            got: pool.k,
        });
    }
    let num_blocks = pool.k / block_floats;
    for s in seqs {
        let len = s.past + s.n_new;
        check_len(
            "attention",
            "block table (blocks covering past + new tokens)",
            s.blocks.len().min(len.div_ceil(pool.block_size)),
            len.div_ceil(pool.block_size),
        )?;
        // With a window, the entries before the earliest query's window are never read (the
        // KV manager has handed those blocks back).
        let first = shape.first_key(s.past + 1) / pool.block_size;
        let read = s.blocks.get(first..).unwrap_or_default();
        if let Some(&b) = read.iter().find(|&&b| b as usize >= num_blocks) {
            return Err(KernelError::OutOfRange {
                op: "attention",
                what: "block id",
                index: b as usize,
                limit: num_blocks,
            });
        }
    }
    Ok(())
}
