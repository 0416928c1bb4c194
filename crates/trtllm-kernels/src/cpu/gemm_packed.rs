//! The prefill path of `linear` (several activation rows): weights are packed per worker into
//! k-major panels of 16 output columns, widened to f32 once per panel, then a 6×16 register
//! tile broadcasts activations against panel vectors (BLIS-style). No horizontal sums, and the
//! bf16/f16 conversion cost is shared by every activation row.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;
use std::ops::Range;

use super::matmul::{Elem, OutPtr, Problem};

const NR: usize = 16;
const MR: usize = 6;
/// Depth of one packed block: a 16×KC f32 panel (16 KiB) stays in L1.
const KC: usize = 256;

/// Computes columns `cols` of the output for all rows. `cols.start` must be a multiple of 16
/// or the end of the output (the caller splits work in multiples of 16).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn columns<E: Elem>(p: &Problem<'_>, w: &[E], cols: Range<usize>, out: OutPtr) {
    let ncols = cols.len();
    let panels = ncols.div_ceil(NR);
    let mut packed = vec![0f32; panels * NR * KC];
    let mut k0 = 0;
    while k0 < p.k {
        let kc = KC.min(p.k - k0);
        pack(w, p.k, &cols, k0, kc, &mut packed);
        let first = k0 == 0;
        let mut i = 0;
        while i < p.m {
            let mr = MR.min(p.m - i);
            for panel in 0..panels {
                let j = cols.start + panel * NR;
                let nr = NR.min(cols.end - j);
                let b = &packed[panel * NR * KC..];
                match mr {
                    6 => tile::<E, 6>(p, b, i, j, nr, k0, kc, first, out),
                    5 => tile::<E, 5>(p, b, i, j, nr, k0, kc, first, out),
                    4 => tile::<E, 4>(p, b, i, j, nr, k0, kc, first, out),
                    3 => tile::<E, 3>(p, b, i, j, nr, k0, kc, first, out),
                    2 => tile::<E, 2>(p, b, i, j, nr, k0, kc, first, out),
                    _ => tile::<E, 1>(p, b, i, j, nr, k0, kc, first, out),
                }
            }
            i += mr;
        }
        k0 += kc;
    }
}

/// `packed[panel][kk][c] = w[cols.start + panel·16 + c][k0 + kk]`, zero past the last column.
#[inline(always)]
unsafe fn pack<E: Elem>(
    w: &[E],
    k: usize,
    cols: &Range<usize>,
    k0: usize,
    kc: usize,
    packed: &mut [f32],
) {
    for (c_idx, j) in cols.clone().enumerate() {
        let (panel, c) = (c_idx / NR, c_idx % NR);
        let row = &w[j * k + k0..j * k + k0 + kc];
        let dst = &mut packed[panel * NR * KC..];
        for (kk, &v) in row.iter().enumerate() {
            *dst.get_unchecked_mut(kk * NR + c) = v.to_f32();
        }
    }
    let tail = cols.len() % NR;
    if tail != 0 {
        let panel = cols.len() / NR;
        for kk in 0..kc {
            for c in tail..NR {
                packed[panel * NR * KC + kk * NR + c] = 0.0;
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tile<E: Elem, const R: usize>(
    p: &Problem<'_>,
    b: &[f32],
    i: usize,
    j: usize,
    nr: usize,
    k0: usize,
    kc: usize,
    first: bool,
    out: OutPtr,
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    let x = p.x.as_ptr().add(i * p.k + k0);
    let bp = b.as_ptr();
    for kk in 0..kc {
        let b0 = _mm256_loadu_ps(bp.add(kk * NR));
        let b1 = _mm256_loadu_ps(bp.add(kk * NR + 8));
        for (r, a) in acc.iter_mut().enumerate() {
            let xv = _mm256_broadcast_ss(&*x.add(r * p.k + kk));
            a[0] = _mm256_fmadd_ps(xv, b0, a[0]);
            a[1] = _mm256_fmadd_ps(xv, b1, a[1]);
        }
    }
    let mut tmp = [0f32; NR];
    for (r, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(tmp.as_mut_ptr(), a[0]);
        _mm256_storeu_ps(tmp.as_mut_ptr().add(8), a[1]);
        let y = out.0.add((i + r) * p.n + j);
        for (c, &v) in tmp[..nr].iter().enumerate() {
            let base = if first {
                p.bias.map_or(0.0, |bias| bias[j + c])
            } else {
                *y.add(c)
            };
            *y.add(c) = base + v;
        }
    }
}
