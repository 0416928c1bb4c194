//! The decode GEMV over 4-bit codes on AVX-512: each code indexes a 16-entry table of its
//! group's dequantized values (`vpermps` reads the low four bits of each lane), so a value costs
//! a third of a permute-and-FMA instead of a widening, a conversion, an FMA and its share of the
//! group's scale and offset folds. Widening was what bounded int4 decode: SmolLM2's int4
//! linears ran at 15–25 G values/s on two Xeon cores, below what DRAM delivers.
//!
//! A table entry is computed as [`QuantRows::row_to_f32`](super::QuantRows) computes the value
//! (`scale · q + offset`, or `scale · (q − 8)`), so the products are exactly those of the
//! dequantized row and only the summation order differs from the reference.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;
use std::ops::Range;

use super::Int4Weights;
use crate::cpu::matmul::{OutPtr, Problem};

/// Whether [`int4_columns`] takes these weights: groups of whole blocks (16-value groups give
/// a block's two halves different tables; they stay on the widening path).
pub(crate) fn takes(w: &Int4Weights<'_>) -> bool {
    w.group.is_multiple_of(32)
}

/// Columns `cols` of `y = x · Wᵀ + bias` for every activation row.
///
/// # Safety
/// The processor has AVX-512 F/BW/VL/DQ (callers check `isa()` first); `w` passed
/// [`QuantRows::check`](super::QuantRows) for `p.n × p.k` and [`takes`] it; `cols` lies in
/// `0..p.n`, and `out` holds `p.m × p.n` values of which this call alone writes these columns.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
pub(crate) unsafe fn int4_columns(
    w: &Int4Weights<'_>,
    p: &Problem<'_>,
    cols: Range<usize>,
    out: OutPtr,
) {
    for i in 0..p.m {
        let t = Tile { w, p, i };
        let mut j = cols.start;
        if p.tactic.wide_tiles {
            while j + 8 <= cols.end {
                t.run::<8>(j, out);
                j += 8;
            }
        }
        while j + 4 <= cols.end {
            t.run::<4>(j, out);
            j += 4;
        }
        for j in j..cols.end {
            t.run::<1>(j, out);
        }
    }
}

/// Activation row `i` against a tile of weight rows.
struct Tile<'a> {
    w: &'a Int4Weights<'a>,
    p: &'a Problem<'a>,
    i: usize,
}

impl Tile<'_> {
    /// Output columns `j..j + N` of row `i`: per weight row two accumulators (low and high
    /// nibbles), so a tile of 4 keeps 8 independent FMA chains.
    #[inline(always)]
    unsafe fn run<const N: usize>(&self, j: usize, out: OutPtr) {
        let (w, p) = (self.w, self.p);
        let k = p.k;
        let (row_bytes, nb, gb) = (k / 2, k / 32, w.group / 32);
        let ng = k.div_ceil(w.group);
        let ahead = p.tactic.prefetch_rows;
        let x = p.x.as_ptr().add(self.i * k);
        let q = w.q.as_ptr();
        let iota = _mm512_setr_ps(
            0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
        );
        let centred = _mm512_sub_ps(iota, _mm512_set1_ps(8.0));
        let mut acc = [[_mm512_setzero_ps(); 2]; N];
        for g in 0..ng {
            let mut table = [_mm512_setzero_ps(); N];
            for (r, t) in table.iter_mut().enumerate() {
                let at = (j + r) * ng + g;
                let scale = _mm512_set1_ps(*w.scales.get_unchecked(at));
                *t = match w.offsets {
                    Some(o) => _mm512_add_ps(
                        _mm512_mul_ps(scale, iota),
                        _mm512_set1_ps(*o.get_unchecked(at)),
                    ),
                    None => _mm512_mul_ps(scale, centred),
                };
            }
            for b in g * gb..((g + 1) * gb).min(nb) {
                let xl = _mm512_loadu_ps(x.add(b * 32));
                let xh = _mm512_loadu_ps(x.add(b * 32 + 16));
                for r in 0..N {
                    let row = (j + r) * row_bytes + b * 16;
                    if b % 4 == 0 {
                        // One prefetch per 64-byte line; past the matrix it is a no-op.
                        let next = q.wrapping_add(row + ahead * row_bytes);
                        _mm_prefetch::<_MM_HINT_T0>(next.cast());
                    }
                    let codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(q.add(row).cast()));
                    let lo = _mm512_permutexvar_ps(codes, table[r]);
                    let hi = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(codes), table[r]);
                    acc[r][0] = _mm512_fmadd_ps(xl, lo, acc[r][0]);
                    acc[r][1] = _mm512_fmadd_ps(xh, hi, acc[r][1]);
                }
            }
        }
        for (r, [a, b]) in acc.into_iter().enumerate() {
            let bias = p.bias.map_or(0.0, |bias| bias[j + r]);
            *out.get().add(self.i * p.n + j + r) = _mm512_reduce_add_ps(_mm512_add_ps(a, b)) + bias;
        }
    }
}
