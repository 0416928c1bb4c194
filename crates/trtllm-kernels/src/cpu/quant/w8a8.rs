//! W8A8 (SmoothQuant) linear layer: each activation row is quantized to int8 with its own
//! dynamic scale (`amax / 127`), multiplied against per-channel int8 weights with exact int32
//! accumulation, and the product rescaled by `scale_x · scale_w`.

use rayon::prelude::*;

use super::Int8Weights;
use crate::cpu::matmul::OutPtr;

/// Activation rows quantized per token: `q[i·k..]` with `scales[i]`.
struct QuantizedRows {
    q: Vec<i8>,
    scales: Vec<f32>,
}

fn quantize_rows(x: &[f32], m: usize, k: usize) -> QuantizedRows {
    let mut q = vec![0i8; m * k];
    let mut scales = vec![0f32; m];
    for i in 0..m {
        let row = &x[i * k..(i + 1) * k];
        let amax = row.iter().fold(0f32, |a, v| a.max(v.abs()));
        let s = if amax > 0.0 { amax / 127.0 } else { 1.0 };
        scales[i] = s;
        let inv = 1.0 / s;
        for (o, &v) in q[i * k..(i + 1) * k].iter_mut().zip(row) {
            *o = (v * inv).round().clamp(-127.0, 127.0) as i8;
        }
    }
    QuantizedRows { q, scales }
}

/// `y[m × n] = x[m × k] · Wᵀ + bias`, `w` per-channel (`group == k`); shapes checked by the
/// caller.
pub(crate) fn linear(
    x: &[f32],
    m: usize,
    w: &Int8Weights<'_>,
    (n, k): (usize, usize),
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    let xq = quantize_rows(x, m, k);
    let out = OutPtr(y.as_mut_ptr());
    let threads = rayon::current_num_threads().max(1);
    let chunk = n.div_ceil(threads * 4).max(8);
    (0..n.div_ceil(chunk)).into_par_iter().for_each(|c| {
        let out = &out;
        for j in c * chunk..((c + 1) * chunk).min(n) {
            let wrow = &w.q[j * k..(j + 1) * k];
            let sw = w.scales[j];
            let b = bias.map_or(0.0, |b| b[j]);
            for i in 0..m {
                let d = dot_i8(&xq.q[i * k..(i + 1) * k], wrow);
                // SAFETY: i < m, j < n; column j belongs to this worker only.
                unsafe { *out.0.add(i * n + j) = d as f32 * xq.scales[i] * sw + b };
            }
        }
    });
}

fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    #[cfg(target_arch = "x86_64")]
    match crate::cpu::isa() {
        // SAFETY: features detected at run time (VNNI checked beside AVX-512); equal lengths.
        crate::cpu::Isa::Avx512 if avx::vnni() => return unsafe { avx::dot_i8_vnni(a, b) },
        crate::cpu::Isa::Avx2 | crate::cpu::Isa::Avx512 => return unsafe { avx::dot_i8(a, b) },
        crate::cpu::Isa::Portable => {}
    }
    a.iter().zip(b).map(|(&x, &y)| x as i32 * y as i32).sum()
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    /// 32 products per step: `maddubs` multiplies |a| (unsigned) by b carrying a's sign, pairs
    /// summed in i16 (at most 2·127·127, no saturation since codes stay within ±127), then
    /// widened to i32 pairs by `madd` against ones.
    ///
    /// # Safety
    /// The processor has the features enabled here (callers check `isa()` first), and
    /// the arguments meet the contract of the body it enters.
    #[target_feature(enable = "avx2")]
    pub unsafe fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
        let n = a.len();
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_si256();
        let mut i = 0;
        while i + 32 <= n {
            let va = _mm256_loadu_si256(a.as_ptr().add(i).cast());
            let vb = _mm256_loadu_si256(b.as_ptr().add(i).cast());
            let p16 = _mm256_maddubs_epi16(_mm256_abs_epi8(va), _mm256_sign_epi8(vb, va));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p16, ones));
            i += 32;
        }
        finish(acc, a, b, i)
    }

    pub fn vnni() -> bool {
        static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *VNNI.get_or_init(|| is_x86_feature_detected!("avx512vnni"))
    }

    /// As [`dot_i8`], with one `vpdpbusd` per 32 products in place of maddubs + madd + add: the
    /// same |a| × sign(b, a) trick, summed straight into i32 lanes (the same integer result).
    ///
    /// # Safety
    /// The processor has the features enabled here (callers check `isa()` first), and
    /// the arguments meet the contract of the body it enters.
    #[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
    pub unsafe fn dot_i8_vnni(a: &[i8], b: &[i8]) -> i32 {
        let n = a.len();
        let mut acc = _mm256_setzero_si256();
        let mut i = 0;
        while i + 32 <= n {
            let va = _mm256_loadu_si256(a.as_ptr().add(i).cast());
            let vb = _mm256_loadu_si256(b.as_ptr().add(i).cast());
            acc = _mm256_dpbusd_epi32(acc, _mm256_abs_epi8(va), _mm256_sign_epi8(vb, va));
            i += 32;
        }
        finish(acc, a, b, i)
    }

    /// The lanes' sum plus the products from `i` on.
    #[inline(always)]
    unsafe fn finish(acc: __m256i, a: &[i8], b: &[i8], i: usize) -> i32 {
        let lanes: [i32; 8] = std::mem::transmute(acc);
        let mut s: i32 = lanes.iter().sum();
        for t in i..a.len() {
            s += a[t] as i32 * b[t] as i32;
        }
        s
    }
}
