//! LoRA's update on the CPU: each task takes up to [`ROWS_PER_TASK`] rows of one adapter,
//! computes their `x·Aᵀ` with the attention row path's dot tiles (A's rows are the
//! "keys"), then each non-zero block of B through its weighted sums over the task's rows. No
//! packing; the temporaries are the task's gathered rows, their `rows × rank` and one block's
//! update.

use rayon::prelude::*;

use super::attention_rows::{key_scores, weighted_values};
use crate::error::check_len;
use crate::lora::{check_factors, check_segments, LoraBlock, LoraDims, LoraSegment};
use crate::Result;

/// Rows one task takes: enough to share each A load among several rows, few enough that a
/// decode batch's rows still spread over the cores.
const ROWS_PER_TASK: usize = 16;

/// One adapter's factors of one module: A `[rank × inputs]` and Bᵀ `[rank × outputs]`,
/// row-major, with B's non-zero blocks.
#[derive(Clone, Copy, Debug)]
pub struct LoraMat<'a> {
    pub a: &'a [f32],
    pub bt: &'a [f32],
    pub rank: usize,
    pub blocks: &'a [LoraBlock],
}

/// `y[r] += (x[r]·Aᵀ)·Bᵀ` for the rows of every segment, with the factors of its slot; a slot
/// of `None` (an adapter that leaves this module alone) and rows in no segment are unchanged.
/// `x` is `[rows × inputs]`, `y` `[rows × outputs]`.
pub fn lora_add(
    x: &[f32],
    y: &mut [f32],
    dims: LoraDims,
    segments: &[LoraSegment],
    slots: &[Option<LoraMat<'_>>],
) -> Result<()> {
    let LoraDims { inputs, outputs } = dims;
    if inputs == 0 {
        return check_len("lora_add", "inputs", 0, 1);
    }
    check_len("lora_add", "x", x.len() % inputs, 0)?;
    let rows = x.len() / inputs;
    check_len("lora_add", "y", y.len(), rows * outputs)?;
    for m in slots.iter().flatten() {
        check_factors(dims, m.rank, (m.a.len(), m.bt.len()), m.blocks)?;
    }
    check_segments(segments, rows, slots.len())?;
    if outputs == 0 {
        return Ok(());
    }
    let tasks = tasks(y, outputs, segments, slots);
    let run = |t: Task<'_, '_>| add_rows(x, t, dims);
    if tasks.len() > 1 {
        tasks.into_par_iter().for_each(run);
    } else {
        tasks.into_iter().for_each(run);
    }
    Ok(())
}

/// Up to [`ROWS_PER_TASK`] rows of one adapter (wherever they lie in the pass: a decode batch
/// interleaves adapters row by row) and those rows of `y`.
struct Task<'y, 'm> {
    rows: Vec<usize>,
    y: Vec<&'y mut [f32]>,
    m: LoraMat<'m>,
}

fn tasks<'y, 'm>(
    y: &'y mut [f32],
    outputs: usize,
    segments: &[LoraSegment],
    slots: &[Option<LoraMat<'m>>],
) -> Vec<Task<'y, 'm>> {
    // Segments are disjoint (checked), so each row is taken by one task at most.
    let mut by_row: Vec<Option<&mut [f32]>> = y.chunks_exact_mut(outputs).map(Some).collect();
    let mut tasks = Vec::new();
    for (slot, m) in slots.iter().enumerate() {
        let Some(m) = m.filter(|m| m.rank > 0) else {
            continue;
        };
        let rows: Vec<usize> = segments
            .iter()
            .filter(|(_, s)| *s == slot)
            .flat_map(|(r, _)| r.clone())
            .collect();
        for chunk in rows.chunks(ROWS_PER_TASK) {
            let y = chunk.iter().filter_map(|&r| by_row[r].take()).collect();
            tasks.push(Task {
                rows: chunk.to_vec(),
                y,
                m,
            });
        }
    }
    tasks
}

fn add_rows(x: &[f32], task: Task<'_, '_>, dims: LoraDims) {
    let LoraDims { inputs, outputs } = dims;
    let Task { rows, mut y, m } = task;
    let n = rows.len();
    let xs: Vec<f32> = rows
        .iter()
        .flat_map(|&r| &x[r * inputs..(r + 1) * inputs])
        .copied()
        .collect();
    let mut t = vec![0f32; n * m.rank];
    key_scores((&xs, inputs), (m.a, inputs), 1.0, (&mut t, m.rank), m.rank);
    // Each block's update for all the task's rows at once, so they share every load of Bᵀ,
    // then added to their rows of `y`.
    let mut u = Vec::new();
    for b in m.blocks.iter().filter(|b| !b.outputs.is_empty()) {
        let d = b.outputs.len();
        u.clear();
        u.resize(n * d, 0.0);
        weighted_values(
            (&t[b.ranks.start..], m.rank),
            (&m.bt[b.ranks.start * outputs + b.outputs.start..], outputs),
            b.ranks.len(),
            (&mut u, d),
        );
        for (yr, ur) in y.iter_mut().zip(u.chunks_exact(d)) {
            for (y, &u) in yr[b.outputs.clone()].iter_mut().zip(ur) {
                *y += u;
            }
        }
    }
}

#[cfg(test)]
mod tests;
