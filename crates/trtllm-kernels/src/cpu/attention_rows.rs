//! The inner loops of paged attention over one block of keys or values, written once over
//! [`Lanes`] and entered per instruction set: the query's scores against a block of keys, and
//! the score-weighted sum of a block of value rows.

#![cfg(target_arch = "x86_64")]

use super::lanes::{Avx2, Avx512, Lanes};
use super::simd::Isa;

/// `out[p] = scale · q·k_p` for keys `k_p = k[p·stride ..][..q.len()]`. The caller checked that
/// `k` holds `out.len()` keys; `isa` is AVX2 or better and available.
pub(super) unsafe fn scaled_dots(
    isa: Isa,
    q: &[f32],
    (k, stride): (&[f32], usize),
    scale: f32,
    out: &mut [f32],
) {
    match isa {
        Isa::Avx512 => scaled_dots_avx512(q, (k, stride), scale, out),
        _ => scaled_dots_avx2(q, (k, stride), scale, out),
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scaled_dots_avx2(q: &[f32], k: (&[f32], usize), scale: f32, out: &mut [f32]) {
    dots::<Avx2>(q, k, scale, out)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
unsafe fn scaled_dots_avx512(q: &[f32], k: (&[f32], usize), scale: f32, out: &mut [f32]) {
    dots::<Avx512>(q, k, scale, out)
}

/// Four keys at a time share each query load; a head_dim that is not a whole number of vectors
/// finishes in scalar code.
#[inline(always)]
unsafe fn dots<L: Lanes>(q: &[f32], (k, stride): (&[f32], usize), scale: f32, out: &mut [f32]) {
    let d = q.len();
    let whole = d / L::N * L::N;
    let (qp, kp) = (q.as_ptr(), k.as_ptr());
    let mut p = 0;
    while p < out.len() {
        let keys = (out.len() - p).min(4);
        let mut acc = [L::zero(); 4];
        let mut i = 0;
        while i < whole {
            let qv = L::load(qp.add(i));
            for (j, a) in acc.iter_mut().enumerate().take(keys) {
                *a = L::fmadd(qv, L::load(kp.add((p + j) * stride + i)), *a);
            }
            i += L::N;
        }
        for (j, a) in acc.iter().enumerate().take(keys) {
            let key = &k[(p + j) * stride..(p + j) * stride + d];
            let tail: f32 = q[whole..]
                .iter()
                .zip(&key[whole..])
                .map(|(a, b)| a * b)
                .sum();
            out[p + j] = (L::hsum(*a) + tail) * scale;
        }
        p += keys;
    }
}

/// `out[c] += Σ_p w[p] · v[p·stride + c]`. The caller checked that `v` holds `w.len()` rows of
/// `out.len()` floats; `isa` is AVX2 or better and available.
pub(super) unsafe fn weighted_rows(
    isa: Isa,
    w: &[f32],
    (v, stride): (&[f32], usize),
    out: &mut [f32],
) {
    match isa {
        Isa::Avx512 => weighted_rows_avx512(w, (v, stride), out),
        _ => weighted_rows_avx2(w, (v, stride), out),
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weighted_rows_avx2(w: &[f32], v: (&[f32], usize), out: &mut [f32]) {
    weighted::<Avx2>(w, v, out)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
unsafe fn weighted_rows_avx512(w: &[f32], v: (&[f32], usize), out: &mut [f32]) {
    weighted::<Avx512>(w, v, out)
}

/// Up to eight vectors of columns (64 with AVX2, 128 with AVX-512) stay in registers across all
/// rows, so `out` is loaded and stored once, not once per row.
#[inline(always)]
unsafe fn weighted<L: Lanes>(w: &[f32], (v, stride): (&[f32], usize), out: &mut [f32]) {
    let d = out.len();
    let vp = v.as_ptr();
    let mut c0 = 0;
    while c0 + L::N <= d {
        let lanes = ((d - c0) / L::N).min(8);
        let mut acc = [L::zero(); 8];
        for (l, a) in acc.iter_mut().enumerate().take(lanes) {
            *a = L::load(out.as_ptr().add(c0 + l * L::N));
        }
        for (p, &wp) in w.iter().enumerate() {
            let wv = L::splat(wp);
            let row = vp.add(p * stride + c0);
            for (l, a) in acc.iter_mut().enumerate().take(lanes) {
                *a = L::fmadd(wv, L::load(row.add(l * L::N)), *a);
            }
        }
        for (l, a) in acc.iter().enumerate().take(lanes) {
            L::store(out.as_mut_ptr().add(c0 + l * L::N), *a);
        }
        c0 += lanes * L::N;
    }
    for (p, &wp) in w.iter().enumerate() {
        for (c, o) in out.iter_mut().enumerate().skip(c0) {
            *o += wp * v[p * stride + c];
        }
    }
}
