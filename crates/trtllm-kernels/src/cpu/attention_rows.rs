//! The row path of paged attention (decode, short chunks): the queries of one row that read one
//! KV head (its group: 3 heads in SmolLM2, 4 in Llama 3 8B), against one block of keys or
//! values at a time. The group shares every key and value load; each score is a dot product
//! along `head_dim` reduced across lanes, four keys' reductions at once. Each query's sums run in
//! the same order whatever its group, so a row's output does not depend on its neighbours.

use super::simd::dot_portable;

/// `scores[i · n + p] = scale · q_i · k_p` for the queries `q_i = q[i·d..][..d]` and the `len`
/// keys `k_p = k[p·stride..][..d]`.
pub(super) fn key_scores(
    (q, d): (&[f32], usize),
    (k, stride): (&[f32], usize),
    scale: f32,
    (scores, n): (&mut [f32], usize),
    len: usize,
) {
    let nq = q.len() / d;
    if len == 0 || nq == 0 {
        return;
    }
    assert!(
        k.len() >= (len - 1) * stride + d,
        "key_scores: keys too short"
    );
    assert!(
        scores.len() >= (nq - 1) * n + len,
        "key_scores: scores too short"
    );
    #[cfg(target_arch = "x86_64")]
    {
        use super::simd::Isa;
        let isa = super::simd::isa();
        if isa >= Isa::Avx2 {
            // SAFETY: `isa` is at most what was detected at run time; the extents of `k` and
            // `scores` were checked above.
            return unsafe { simd::key_scores(isa, (q, d), (k, stride), scale, (scores, n), len) };
        }
    }
    for (i, qi) in q.chunks_exact(d).enumerate() {
        for p in 0..len {
            scores[i * n + p] = dot_portable(qi, &k[p * stride..][..d]) * scale;
        }
    }
}

/// `out[i·d + c] += Σ_p w[i·n + p] · v[p·stride + c]` for the `out.len() / d` queries and the
/// `len` value rows.
pub(super) fn weighted_values(
    (w, n): (&[f32], usize),
    (v, stride): (&[f32], usize),
    len: usize,
    (out, d): (&mut [f32], usize),
) {
    let nq = out.len() / d;
    if len == 0 || nq == 0 {
        return;
    }
    assert!(
        v.len() >= (len - 1) * stride + d,
        "weighted_values: values too short"
    );
    assert!(
        w.len() >= (nq - 1) * n + len,
        "weighted_values: weights too short"
    );
    #[cfg(target_arch = "x86_64")]
    {
        use super::simd::Isa;
        let isa = super::simd::isa();
        if isa >= Isa::Avx2 {
            // SAFETY: as in `key_scores`.
            return unsafe { simd::weighted_values(isa, (w, n), (v, stride), len, (out, d)) };
        }
    }
    for (i, o) in out.chunks_exact_mut(d).enumerate() {
        for p in 0..len {
            let wp = w[i * n + p];
            for (o, &x) in o.iter_mut().zip(&v[p * stride..][..d]) {
                *o += wp * x;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::super::lanes::{Avx2, Avx512, Lanes};
    use super::super::simd::Isa;

    /// # Safety
    /// `isa` is AVX2 or better and available; the extents were checked by the caller.
    pub(super) unsafe fn key_scores(
        isa: Isa,
        q: (&[f32], usize),
        k: (&[f32], usize),
        scale: f32,
        scores: (&mut [f32], usize),
        len: usize,
    ) {
        match isa {
            Isa::Avx512 => scores_avx512(q, k, scale, scores, len),
            _ => scores_avx2(q, k, scale, scores, len),
        }
    }

    /// # Safety
    /// The processor has the features enabled here (callers check `isa()` first), and
    /// the arguments meet the contract of the body it enters.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scores_avx2(
        q: (&[f32], usize),
        k: (&[f32], usize),
        scale: f32,
        s: (&mut [f32], usize),
        len: usize,
    ) {
        dots::<Avx2, 2>(q, k, scale, s, len)
    }

    /// # Safety
    /// The processor has the features enabled here (callers check `isa()` first), and
    /// the arguments meet the contract of the body it enters.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    unsafe fn scores_avx512(
        q: (&[f32], usize),
        k: (&[f32], usize),
        scale: f32,
        s: (&mut [f32], usize),
        len: usize,
    ) {
        dots::<Avx512, 4>(q, k, scale, s, len)
    }

    /// `QN` queries × 4 keys of accumulators; a short tile repeats its last query or key rather
    /// than branching, and stores only its real scores. A `d` that is not a whole number of
    /// vectors finishes in scalar code.
    #[inline(always)]
    unsafe fn dots<L: Lanes, const QN: usize>(
        (q, d): (&[f32], usize),
        (k, stride): (&[f32], usize),
        scale: f32,
        (scores, n): (&mut [f32], usize),
        len: usize,
    ) {
        let nq = q.len() / d;
        let whole = d / L::N * L::N;
        let mut i0 = 0;
        while i0 < nq {
            let qn = QN.min(nq - i0);
            let mut qp = [q.as_ptr(); QN];
            for (i, p) in qp.iter_mut().enumerate() {
                *p = q.as_ptr().add((i0 + i.min(qn - 1)) * d);
            }
            let mut p = 0;
            while p < len {
                let kn = (len - p).min(4);
                let mut kp = [k.as_ptr(); 4];
                for (j, x) in kp.iter_mut().enumerate() {
                    *x = k.as_ptr().add((p + j.min(kn - 1)) * stride);
                }
                let mut acc = [[L::zero(); 4]; QN];
                let mut c = 0;
                while c < whole {
                    let mut kv = [L::zero(); 4];
                    for (x, ptr) in kv.iter_mut().zip(&kp) {
                        *x = L::load(ptr.add(c));
                    }
                    for (a, qi) in acc.iter_mut().zip(&qp) {
                        let qv = L::load(qi.add(c));
                        for (x, &kj) in a.iter_mut().zip(&kv) {
                            *x = L::fmadd(qv, kj, *x);
                        }
                    }
                    c += L::N;
                }
                for (i, a) in acc.iter().enumerate().take(qn) {
                    let sums = L::hsum4(*a);
                    for (j, &s) in sums.iter().enumerate().take(kn) {
                        let mut tail = 0f32;
                        for t in whole..d {
                            tail += *qp[i].add(t) * *kp[j].add(t);
                        }
                        scores[(i0 + i) * n + p + j] = (s + tail) * scale;
                    }
                }
                p += kn;
            }
            i0 += qn;
        }
    }

    /// # Safety
    /// As [`key_scores`].
    pub(super) unsafe fn weighted_values(
        isa: Isa,
        w: (&[f32], usize),
        v: (&[f32], usize),
        len: usize,
        out: (&mut [f32], usize),
    ) {
        match isa {
            Isa::Avx512 => weighted_avx512(w, v, len, out),
            _ => weighted_avx2(w, v, len, out),
        }
    }

    /// # Safety
    /// The processor has the features enabled here (callers check `isa()` first), and
    /// the arguments meet the contract of the body it enters.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn weighted_avx2(
        w: (&[f32], usize),
        v: (&[f32], usize),
        len: usize,
        o: (&mut [f32], usize),
    ) {
        weighted::<Avx2, 2>(w, v, len, o)
    }

    /// # Safety
    /// The processor has the features enabled here (callers check `isa()` first), and
    /// the arguments meet the contract of the body it enters.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    unsafe fn weighted_avx512(
        w: (&[f32], usize),
        v: (&[f32], usize),
        len: usize,
        o: (&mut [f32], usize),
    ) {
        weighted::<Avx512, 4>(w, v, len, o)
    }

    /// Groups of `QW` queries; for each, columns in chunks of 4 vectors, then of 1, then scalar.
    #[inline(always)]
    unsafe fn weighted<L: Lanes, const QW: usize>(
        (w, n): (&[f32], usize),
        (v, stride): (&[f32], usize),
        len: usize,
        (out, d): (&mut [f32], usize),
    ) {
        let nq = out.len() / d;
        let mut i0 = 0;
        while i0 < nq {
            let qn = QW.min(nq - i0);
            let rows: [usize; QW] = std::array::from_fn(|i| i0 + i.min(qn - 1));
            let mut c0 = 0;
            while c0 + 4 * L::N <= d {
                columns::<L, QW, 4>((w, n), (v, stride), len, (out, d), (&rows, qn), c0);
                c0 += 4 * L::N;
            }
            while c0 + L::N <= d {
                columns::<L, QW, 1>((w, n), (v, stride), len, (out, d), (&rows, qn), c0);
                c0 += L::N;
            }
            for &r in &rows[..qn] {
                for p in 0..len {
                    let wp = w[r * n + p];
                    for c in c0..d {
                        out[r * d + c] += wp * v[p * stride + c];
                    }
                }
            }
            i0 += qn;
        }
    }

    /// Columns `c0..c0 + CV·N` of the queries `rows` (the first `qn` real): accumulators loaded
    /// from `out` and stored back once, every value row loaded once for all of them.
    #[inline(always)]
    unsafe fn columns<L: Lanes, const QW: usize, const CV: usize>(
        (w, n): (&[f32], usize),
        (v, stride): (&[f32], usize),
        len: usize,
        (out, d): (&mut [f32], usize),
        (rows, qn): (&[usize; QW], usize),
        c0: usize,
    ) {
        let mut acc = [[L::zero(); CV]; QW];
        for (a, &r) in acc.iter_mut().zip(rows) {
            for (l, x) in a.iter_mut().enumerate() {
                *x = L::load(out.as_ptr().add(r * d + c0 + l * L::N));
            }
        }
        for p in 0..len {
            let mut vv = [L::zero(); CV];
            for (l, x) in vv.iter_mut().enumerate() {
                *x = L::load(v.as_ptr().add(p * stride + c0 + l * L::N));
            }
            for (a, &r) in acc.iter_mut().zip(rows) {
                let wb = L::splat(*w.get_unchecked(r * n + p));
                for (x, &y) in a.iter_mut().zip(&vv) {
                    *x = L::fmadd(wb, y, *x);
                }
            }
        }
        for (a, &r) in acc.iter().zip(rows).take(qn) {
            for (l, &x) in a.iter().enumerate() {
                L::store(out.as_mut_ptr().add(r * d + c0 + l * L::N), x);
            }
        }
    }
}
