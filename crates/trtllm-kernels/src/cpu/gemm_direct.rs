//! The batched-decode path of `linear` over dense weights (from `PACKED_MIN_ROWS` up to
//! `DIRECT_MAX_ROWS` activation rows): register tiles of activation rows × weight rows, each output a dot
//! product along k, reading the row-major weights in place. At 32 rows the packed GEMM spends a
//! quarter of its time transposing panels that only 32 rows then use; here each weight row is
//! read once from memory per column tile (then from L1 for the other row tiles), with nothing
//! written but the outputs.
//!
//! On AVX-512 the tiles turn around: the activations are transposed once per call into panels
//! of 16 rows (at most 32 × k floats, cheap), and each weight element is broadcast against a
//! panel, so one tile covers every row (2 panels × 12 weight rows = 24 accumulators). The
//! weights still stream once, the activations are read from L1/L2 at a tenth of the 4 × 4
//! tiles' rate, and no horizontal sums are left at the end: 128 → ~230 GFLOP/s at 32 rows.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
use std::ops::Range;

use super::lanes::{Avx2, Avx512, Lanes};
use super::matmul::{Elem, OutPtr, Problem, DIRECT_MAX_ROWS};
use super::simd::Isa;

/// Rows per transposed panel: one AVX-512 vector.
const PANEL: usize = 16;

/// Below this many rows a panel is mostly padding and the 4 × 4 dot tiles win (`linear_bench`,
/// 1536 × 576 on the Xeon, GFLOP/s broadcast vs dot: 65 vs 83 at 8 rows, 93 vs 95 at 12, 126 vs
/// 109 at 16, 176 vs 117 at 32).
pub(super) const TRANSPOSED_MIN_ROWS: usize = 13;

/// Whether the direct tiles of `p` read the activations transposed (see [`transpose`]).
pub(super) fn reads_transposed(p: &Problem<'_>) -> bool {
    p.tactic.isa == Isa::Avx512
        && p.tactic.direct
        && !p.tactic.invariant
        && (TRANSPOSED_MIN_ROWS..=DIRECT_MAX_ROWS).contains(&p.m)
}

/// `x[m × k]` as panels of `PANEL` rows, k-major within a panel (`xt[(r·k + q)·PANEL + l] =
/// x[r·PANEL + l][q]`), rows past `m` zero.
pub(super) fn transpose(x: &[f32], m: usize, k: usize) -> Vec<f32> {
    let mut xt = vec![0f32; m.div_ceil(PANEL) * PANEL * k];
    for (i, row) in x.chunks_exact(k).take(m).enumerate() {
        let (r, l) = (i / PANEL, i % PANEL);
        let panel = &mut xt[r * k * PANEL..][..k * PANEL];
        for (q, &v) in row.iter().enumerate() {
            panel[q * PANEL + l] = v;
        }
    }
    xt
}

/// Columns `cols` of the output for all rows, on the path of `isa` (AVX2 or better).
pub(super) unsafe fn columns<E: Elem>(
    isa: Isa,
    p: &Problem<'_>,
    w: &[E],
    cols: Range<usize>,
    out: OutPtr,
) {
    match isa {
        Isa::Avx512 => columns_avx512(p, w, cols, out),
        _ => columns_avx2(p, w, cols, out),
    }
}

/// 3 × 3 tiles: 9 accumulators, 3 weight vectors and an activation vector of the 16 registers.
///
/// # Safety
/// The processor has the features enabled here (callers check `isa()` first), and
/// the arguments meet the contract of the body it enters.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn columns_avx2<E: Elem>(p: &Problem<'_>, w: &[E], cols: Range<usize>, out: OutPtr) {
    tiles::<Avx2, E, 3, 3>(p, w, cols, out)
}

/// 4 × 4 tiles: 16 accumulators, 4 weight vectors and an activation vector of the 32 registers.
///
/// # Safety
/// The processor has the features enabled here (callers check `isa()` first), and
/// the arguments meet the contract of the body it enters.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
unsafe fn columns_avx512<E: Elem>(p: &Problem<'_>, w: &[E], cols: Range<usize>, out: OutPtr) {
    match p.xt {
        Some(xt) if p.m <= PANEL => broadcast::<Avx512, E, 1, 24>(p, xt, w, cols, out),
        Some(xt) => broadcast::<Avx512, E, 2, 12>(p, xt, w, cols, out),
        // Up to 6 rows in one row tile (no padded rows: a 5-row verifying pass of speculative
        // decoding ran as 4 + 4 with 3 repeated).
        None if p.m == 5 => tiles::<Avx512, E, 5, 4>(p, w, cols, out),
        None if p.m == 6 => tiles::<Avx512, E, 6, 4>(p, w, cols, out),
        None => tiles::<Avx512, E, 4, 4>(p, w, cols, out),
    }
}

/// Tiles of all `P` transposed panels × `NR` weight rows: each weight element is broadcast and
/// multiplied into every panel, each output's sum runs along k in order.
#[inline(always)]
unsafe fn broadcast<L: Lanes, E: Elem, const P: usize, const NR: usize>(
    p: &Problem<'_>,
    xt: &[f32],
    w: &[E],
    cols: Range<usize>,
    out: OutPtr,
) {
    let k = p.k;
    debug_assert!(L::N == PANEL && xt.len() >= P * PANEL * k && p.m <= P * PANEL);
    let xp: [*const f32; P] = std::array::from_fn(|r| xt.as_ptr().add(r * k * PANEL));
    let ahead = p.tactic.prefetch_rows * k;
    let mut j = cols.start;
    while j < cols.end {
        let nj = NR.min(cols.end - j);
        let wr: [*const E; NR] = std::array::from_fn(|c| w.as_ptr().add((j + c.min(nj - 1)) * k));
        let mut acc = [[L::zero(); NR]; P];
        for q in 0..k {
            // One prefetch per cache line of each weight row.
            if ahead > 0 && q % 16 == 0 {
                for &row in &wr {
                    _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(ahead + q).cast());
                }
            }
            let xv: [L::V; P] = std::array::from_fn(|r| L::load(xp[r].add(q * PANEL)));
            for c in 0..NR {
                let b = L::splat((*wr[c].add(q)).to_f32());
                for r in 0..P {
                    acc[r][c] = L::fmadd(xv[r], b, acc[r][c]);
                }
            }
        }
        let mut lanes = [0f32; PANEL];
        for (r, a) in acc.iter().enumerate() {
            for (c, v) in a.iter().enumerate().take(nj) {
                L::store(lanes.as_mut_ptr(), *v);
                let b = p.bias.map_or(0.0, |b| b[j + c]);
                for (l, s) in lanes.iter().enumerate().take(p.m.saturating_sub(r * PANEL)) {
                    *out.0.add((r * PANEL + l) * p.n + j + c) = s + b;
                }
            }
        }
        j += nj;
    }
}

/// Weight-row tiles outside, activation-row tiles inside, so a weight tile (`NR` rows) stays in
/// L1 while every activation row passes over it.
#[inline(always)]
unsafe fn tiles<L: Lanes, E: Elem, const MR: usize, const NR: usize>(
    p: &Problem<'_>,
    w: &[E],
    cols: Range<usize>,
    out: OutPtr,
) {
    let mut j = cols.start;
    while j < cols.end {
        let nj = NR.min(cols.end - j);
        let mut i = 0;
        while i < p.m {
            let mi = MR.min(p.m - i);
            tile::<L, E, MR, NR>(p, w, (i, mi), (j, nj), out);
            i += mi;
        }
        j += nj;
    }
}

/// `out[i..i+mi][j..j+nj]`. A short tile repeats its last row (activation or weight) in the
/// unused registers rather than branching per row count; only `mi × nj` outputs are written.
#[inline(always)]
unsafe fn tile<L: Lanes, E: Elem, const MR: usize, const NR: usize>(
    p: &Problem<'_>,
    w: &[E],
    (i, mi): (usize, usize),
    (j, nj): (usize, usize),
    out: OutPtr,
) {
    let k = p.k;
    let xr: [*const f32; MR] = std::array::from_fn(|r| p.x.as_ptr().add((i + r.min(mi - 1)) * k));
    let wr: [*const E; NR] = std::array::from_fn(|c| w.as_ptr().add((j + c.min(nj - 1)) * k));
    // The first row tile reads the weights from memory; start the next weight tile's stream.
    let prefetch = i == 0;
    let mut acc = [[L::zero(); NR]; MR];
    let mut q = 0;
    while q + L::N <= k {
        if prefetch {
            for &row in &wr {
                _mm_prefetch::<_MM_HINT_T0>(
                    row.wrapping_add(p.tactic.prefetch_rows * k + q).cast(),
                );
            }
        }
        let wv: [L::V; NR] = std::array::from_fn(|c| E::load::<L>(wr[c].add(q)));
        for (r, a) in acc.iter_mut().enumerate() {
            let xv = L::load(xr[r].add(q));
            for (c, v) in a.iter_mut().enumerate() {
                *v = L::fmadd(xv, wv[c], *v);
            }
        }
        q += L::N;
    }
    for (r, a) in acc.iter().enumerate().take(mi) {
        for (c, v) in a.iter().enumerate().take(nj) {
            let mut s = L::hsum(*v);
            for t in q..k {
                s += *xr[r].add(t) * (*wr[c].add(t)).to_f32();
            }
            if let Some(b) = p.bias {
                s += b[j + c];
            }
            *out.0.add((i + r) * p.n + j + c) = s;
        }
    }
}
