//! Causal scaled-dot-product attention for MHA, GQA and MQA over a KV cache.

use rayon::prelude::*;

use super::elementwise::softmax_inplace;
use super::simd::{axpy, dot};
use crate::error::check_len;
use crate::Result;

/// Head layout of one attention layer. Query head `h` reads KV head `h / (n_heads / n_kv_heads)`.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// Keys and values of one sequence, `[len × n_kv_heads × head_dim]` each.
#[derive(Clone, Copy, Debug)]
pub struct KvView<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub len: usize,
}

/// `q` holds `n_new` tokens (`[n_new × n_heads × head_dim]`) at positions `past..past+n_new`;
/// token `t` attends to cache positions `0..=past+t`. Writes `[n_new × n_heads × head_dim]`.
pub fn causal_attention(
    q: &[f32],
    kv: KvView<'_>,
    past: usize,
    shape: AttentionShape,
    out: &mut [f32],
) -> Result<()> {
    let AttentionShape {
        n_heads,
        n_kv_heads,
        head_dim,
        scale,
    } = shape;
    let row = n_heads * head_dim;
    let kv_row = n_kv_heads * head_dim;
    let n_new = q.len() / row.max(1);
    check_len("attention", "q", q.len(), n_new * row)?;
    check_len("attention", "out", out.len(), q.len())?;
    check_len("attention", "k", kv.k.len(), kv.len * kv_row)?;
    check_len("attention", "v", kv.v.len(), kv.len * kv_row)?;
    check_len(
        "attention",
        "kv length (past + new tokens)",
        kv.len.min(past + n_new),
        past + n_new,
    )?;
    if n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
        return Err(crate::KernelError::ShapeMismatch {
            op: "attention",
            what: "n_heads (a multiple of n_kv_heads)",
            expected: n_kv_heads,
            got: n_heads,
        });
    }
    let group = n_heads / n_kv_heads;
    out.par_chunks_mut(head_dim)
        .enumerate()
        .for_each(|(idx, o)| {
            let (t, h) = (idx / n_heads, idx % n_heads);
            let kvh = h / group;
            let qh = &q[idx * head_dim..(idx + 1) * head_dim];
            let n_keys = past + t + 1;
            let mut scores = vec![0f32; n_keys];
            key_scores(qh, &kv.k[kvh * head_dim..], kv_row, scale, &mut scores);
            softmax_inplace(&mut scores);
            o.fill(0.0);
            for (p, &w) in scores.iter().enumerate() {
                let off = p * kv_row + kvh * head_dim;
                axpy(w, &kv.v[off..off + head_dim], o);
            }
        });
    Ok(())
}

/// `scores[p] = scale · q · key p`, keys `stride` floats apart starting at `k`.
fn key_scores(q: &[f32], k: &[f32], stride: usize, scale: f32, scores: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::simd::simd_available() {
        // SAFETY: the features were detected at run time; the caller checked the cache length.
        return unsafe { super::simd::avx::scaled_dots(q, k, stride, scale, scores) };
    }
    for (p, s) in scores.iter_mut().enumerate() {
        *s = dot(q, &k[p * stride..p * stride + q.len()]) * scale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::{assert_close, both_paths, rand_vec};

    fn reference(q: &[f32], k: &[f32], v: &[f32], past: usize, s: AttentionShape) -> Vec<f32> {
        let (nh, nkv, hd) = (s.n_heads, s.n_kv_heads, s.head_dim);
        let n_new = q.len() / (nh * hd);
        let mut out = vec![0f32; q.len()];
        for t in 0..n_new {
            for h in 0..nh {
                let kvh = h * nkv / nh;
                let qv = &q[(t * nh + h) * hd..][..hd];
                let sc: Vec<f64> = (0..=past + t)
                    .map(|p| {
                        let kk = &k[(p * nkv + kvh) * hd..][..hd];
                        qv.iter().zip(kk).map(|(a, b)| (a * b) as f64).sum::<f64>() * s.scale as f64
                    })
                    .collect();
                let m = sc.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..hd {
                    let acc: f64 = e
                        .iter()
                        .enumerate()
                        .map(|(p, w)| w / z * v[(p * nkv + kvh) * hd + d] as f64)
                        .sum();
                    out[(t * nh + h) * hd + d] = acc as f32;
                }
            }
        }
        out
    }

    #[test]
    fn mha_gqa_mqa_prefill_and_decode_match_reference() {
        for &(nh, nkv, hd, past, n_new) in &[
            (4, 4, 9, 0, 5),
            (6, 2, 13, 3, 4),
            (5, 1, 17, 11, 1),
            (9, 3, 64, 0, 33),
        ] {
            let s = AttentionShape {
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: hd,
                scale: 1.0 / (hd as f32).sqrt(),
            };
            let len = past + n_new;
            let q = rand_vec(n_new * nh * hd, 7);
            let k = rand_vec(len * nkv * hd, 8);
            let v = rand_vec(len * nkv * hd, 9);
            let expect = reference(&q, &k, &v, past, s);
            both_paths(|| {
                let mut out = vec![0f32; q.len()];
                causal_attention(&q, KvView { k: &k, v: &v, len }, past, s, &mut out).unwrap();
                assert_close(&out, &expect, 1e-5);
            });
        }
    }

    #[test]
    fn short_cache_is_an_error() {
        let s = AttentionShape {
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: 2,
            scale: 1.0,
        };
        let mut out = [0f32; 2];
        let kv = KvView {
            k: &[0.0; 2],
            v: &[0.0; 2],
            len: 1,
        };
        assert!(causal_attention(&[0.0; 2], kv, 1, s, &mut out).is_err());
    }
}
