//! The prefill and batched-decode path of `linear` (several activation rows): weights are packed
//! into k-major panels of two vectors' width (16 output columns with AVX2, 32 with AVX-512),
//! widened to f32 once per panel, then a register tile (6×16, 12×32) broadcasts activations
//! against panel vectors (BLIS-style). No horizontal sums, and the bf16/f16 conversion cost is
//! shared by every activation row.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;
use std::ops::Range;

use super::lanes::{Avx2, Avx512, Lanes};
use super::matmul::{Elem, OutPtr, Problem, Rows, MAX_PANEL};
use super::simd::Isa;

/// Computes columns `cols` of the output for all rows, on the AVX-512 tile when `isa` allows.
/// `cols.start` must be a multiple of [`MAX_PANEL`] or the end of the output.
pub(super) unsafe fn columns<W: Rows>(
    isa: Isa,
    p: &Problem<'_>,
    w: &W,
    cols: Range<usize>,
    out: OutPtr,
) {
    match isa {
        Isa::Avx512 => columns_avx512(p, w, cols, out),
        _ => columns_avx2(p, w, cols, out),
    }
}

/// 6 rows × 16 columns: 12 accumulators, two panel vectors and a broadcast: 15 of the 16
/// registers.
///
/// # Safety
/// The processor has the features enabled here (callers check `isa()` first), and
/// the arguments meet the contract of the body it enters.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn columns_avx2<W: Rows>(p: &Problem<'_>, w: &W, cols: Range<usize>, out: OutPtr) {
    panels::<Avx2, W, 6>(p, w, cols, out)
}

/// 12 rows × 32 columns: 24 accumulators, two panel vectors and a broadcast of the 32
/// registers; each broadcast (folded into the FMA) feeds two FMAs of 16 lanes.
///
/// # Safety
/// The processor has the features enabled here (callers check `isa()` first), and
/// the arguments meet the contract of the body it enters.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
unsafe fn columns_avx512<W: Rows>(p: &Problem<'_>, w: &W, cols: Range<usize>, out: OutPtr) {
    panels::<Avx512, W, 12>(p, w, cols, out)
}

/// One panel at a time is packed over the whole depth (32×k f32: 72 KiB for k = 576,
/// L2-resident) just before use, then every row tile runs the full depth against it with its
/// accumulators in registers. Weight rows are read once, front to back, whatever the number of
/// rows; each output is one FMA chain over k, independent of the other rows.
#[inline(always)]
unsafe fn panels<L: Lanes, W: Rows, const MR: usize>(
    p: &Problem<'_>,
    w: &W,
    cols: Range<usize>,
    out: OutPtr,
) {
    let width = 2 * L::N;
    let mut packed = vec![0f32; width * p.k];
    // Rows split into equal tiles of at most MR (32 rows at MR 6: 6,6,5,5,5,5, not 6×5 + 2), so
    // no tile is too short to hide the FMA latency.
    let tiles = p.m.div_ceil(MR);
    let mut j = cols.start;
    while j < cols.end {
        let nr = width.min(cols.end - j);
        w.pack(p.k, j..j + nr, width, &mut packed);
        let mut i = 0;
        for t in 0..tiles {
            let mr = p.m / tiles + usize::from(t < p.m % tiles);
            let tile = Tile { i, j, nr };
            match mr {
                12 => tile.run::<L, 12>(p, &packed, out),
                11 => tile.run::<L, 11>(p, &packed, out),
                10 => tile.run::<L, 10>(p, &packed, out),
                9 => tile.run::<L, 9>(p, &packed, out),
                8 => tile.run::<L, 8>(p, &packed, out),
                7 => tile.run::<L, 7>(p, &packed, out),
                6 => tile.run::<L, 6>(p, &packed, out),
                5 => tile.run::<L, 5>(p, &packed, out),
                4 => tile.run::<L, 4>(p, &packed, out),
                3 => tile.run::<L, 3>(p, &packed, out),
                2 => tile.run::<L, 2>(p, &packed, out),
                _ => tile.run::<L, 1>(p, &packed, out),
            }
            i += mr;
        }
        j += nr;
    }
}

/// `packed[kk · width + c] = w[cols.start + c][kk]` for one panel of at most `width` columns,
/// zero past the last column. Full 8×8 blocks go through registers (8 row loads, a transpose, 8 stores).
///
/// Its own `target_feature`, not `inline(always)`: it is reached through the `Rows::pack` trait
/// method, which has none, and an intrinsic inlined into a function without the feature becomes
/// an out-of-line call per instruction (a 10× slowdown of every batched step, once).
///
/// # Safety
/// The processor has the features enabled here (callers check `isa()` first), and
/// the arguments meet the contract of the body it enters.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn pack<E: Elem>(
    w: &[E],
    k: usize,
    cols: Range<usize>,
    width: usize,
    packed: &mut [f32],
) {
    let nr = cols.len();
    let full_k = k / 8 * 8;
    let full_c = nr / 8 * 8;
    let wp = w.as_ptr();
    let dst = packed.as_mut_ptr();
    for c0 in (0..full_c).step_by(8) {
        let src = wp.add((cols.start + c0) * k);
        for kk in (0..full_k).step_by(8) {
            let rows: [__m256; 8] = std::array::from_fn(|r| E::load::<Avx2>(src.add(r * k + kk)));
            for (t, v) in transpose8(rows).into_iter().enumerate() {
                _mm256_storeu_ps(dst.add((kk + t) * width + c0), v);
            }
        }
    }
    for (c, j) in cols.clone().enumerate() {
        let row = &w[j * k..(j + 1) * k];
        let from = if c < full_c { full_k } else { 0 };
        for (kk, &v) in row.iter().enumerate().skip(from) {
            *packed.get_unchecked_mut(kk * width + c) = v.to_f32();
        }
    }
    zero_tail(k, nr, width, packed);
}

/// Zeroes the columns of a panel past its last weight row.
fn zero_tail(k: usize, nr: usize, width: usize, packed: &mut [f32]) {
    if nr < width {
        for row in packed.chunks_exact_mut(width).take(k) {
            row[nr..].fill(0.0);
        }
    }
}

/// Rows of the result are the columns of `r`.
#[inline(always)]
unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(s0, s4),
        _mm256_permute2f128_ps::<0x20>(s1, s5),
        _mm256_permute2f128_ps::<0x20>(s2, s6),
        _mm256_permute2f128_ps::<0x20>(s3, s7),
        _mm256_permute2f128_ps::<0x31>(s0, s4),
        _mm256_permute2f128_ps::<0x31>(s1, s5),
        _mm256_permute2f128_ps::<0x31>(s2, s6),
        _mm256_permute2f128_ps::<0x31>(s3, s7),
    ]
}

/// Where a tile writes: rows from `i`, the `nr` columns from `j`.
struct Tile {
    i: usize,
    j: usize,
    nr: usize,
}

impl Tile {
    /// `y[i..i+R][j..j+nr] = bias + x[i..i+R] · panel`, the whole depth in registers: two
    /// vectors per row.
    #[inline(always)]
    unsafe fn run<L: Lanes, const R: usize>(&self, p: &Problem<'_>, b: &[f32], out: OutPtr) {
        let Tile { i, j, nr } = *self;
        let width = 2 * L::N;
        let mut acc = [[L::zero(); 2]; R];
        let x = p.x.as_ptr().add(i * p.k);
        let bp = b.as_ptr();
        for kk in 0..p.k {
            let panel = [
                L::load(bp.add(kk * width)),
                L::load(bp.add(kk * width + L::N)),
            ];
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = L::splat(*x.add(r * p.k + kk));
                a[0] = L::fmadd(xv, panel[0], a[0]);
                a[1] = L::fmadd(xv, panel[1], a[1]);
            }
        }
        let mut tmp = [0f32; MAX_PANEL];
        if let Some(bias) = p.bias {
            tmp[..nr].copy_from_slice(&bias[j..j + nr]);
        }
        let bias = [L::load(tmp.as_ptr()), L::load(tmp.as_ptr().add(L::N))];
        for (r, a) in acc.iter().enumerate() {
            let y = out.0.add((i + r) * p.n + j);
            let dst = if nr == width { y } else { tmp.as_mut_ptr() };
            L::store(dst, L::add(bias[0], a[0]));
            L::store(dst.add(L::N), L::add(bias[1], a[1]));
            if nr < width {
                std::ptr::copy_nonoverlapping(tmp.as_ptr(), y, nr);
            }
        }
    }
}
