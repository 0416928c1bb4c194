//! The batched-decode path of `linear` over dense weights (from `PACKED_MIN_ROWS` up to
//! `DIRECT_MAX_ROWS` activation rows): register tiles of activation rows × weight rows, each output a dot
//! product along k, reading the row-major weights in place. At 32 rows the packed GEMM spends a
//! quarter of its time transposing panels that only 32 rows then use; here each weight row is
//! read once from memory per column tile (then from L1 for the other row tiles), with nothing
//! written but the outputs.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
use std::ops::Range;

use super::lanes::{Avx2, Avx512, Lanes};
use super::matmul::{Elem, OutPtr, Problem};
use super::simd::Isa;

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
    tiles::<Avx512, E, 4, 4>(p, w, cols, out)
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
