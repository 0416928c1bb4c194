//! f32 vectors of one x86 instruction set ([`Avx2`]: 8 lanes, [`Avx512`]: 16), so a kernel body
//! is written once, generic over [`Lanes`], and compiled once per instruction set.
//!
//! Every method is `inline(always)` and must only be reached from a function compiled with the
//! matching `#[target_feature]` (the `*_avx2` / `*_avx512` entry points of each kernel);
//! anywhere else the intrinsics become out-of-line calls (the symbol-table test in `simd`
//! catches that).

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

/// A vector of `N` f32 lanes and the operations the kernels need on it.
pub(crate) trait Lanes: Copy + Send + Sync + 'static {
    const N: usize;
    type V: Copy;
    unsafe fn zero() -> Self::V;
    unsafe fn splat(x: f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    /// `a · b + c`.
    unsafe fn fmadd(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    /// e^x, relative error ≈ 2e-7; inputs below -87.3 give ≈ 1.2e-38, not 0.
    unsafe fn exp(x: Self::V) -> Self::V;
    unsafe fn hsum(v: Self::V) -> f32;
    /// The lane sums of four vectors, sharing the shuffles.
    unsafe fn hsum4(v: [Self::V; 4]) -> [f32; 4];
    /// `N` bf16 bit patterns widened.
    unsafe fn load_bf16(p: *const u16) -> Self::V;
    /// `N` f16 bit patterns widened.
    unsafe fn load_f16(p: *const u16) -> Self::V;
    /// `acc + Σ x[i] · codes[i]` over 16 signed bytes.
    unsafe fn dot_i8x16(x: *const f32, codes: __m128i, acc: Self::V) -> Self::V;
    /// `acc + Σ x[i] · codes[i]` over 16 unsigned bytes.
    unsafe fn dot_u8x16(x: *const f32, codes: __m128i, acc: Self::V) -> Self::V;
    /// `acc + Σ x[i] · h[i]` over 16 f16 bit patterns.
    unsafe fn dot_f16x16(x: *const f32, h: __m256i, acc: Self::V) -> Self::V;
    /// `dst[i] = codes[i] · scale + offset` for 16 signed bytes.
    unsafe fn dequant_i8x16(dst: *mut f32, codes: __m128i, scale: f32, offset: f32);
    /// `dst[i] = codes[i] · scale + offset` for 16 unsigned bytes.
    unsafe fn dequant_u8x16(dst: *mut f32, codes: __m128i, scale: f32, offset: f32);
    /// `dst[i] = h[i] · scale` for 16 f16 bit patterns.
    unsafe fn dequant_f16x16(dst: *mut f32, h: __m256i, scale: f32);
}

#[derive(Clone, Copy)]
pub(crate) struct Avx2;

#[derive(Clone, Copy)]
pub(crate) struct Avx512;

impl Lanes for Avx2 {
    const N: usize = 8;
    type V = __m256;
    #[inline(always)]
    unsafe fn zero() -> __m256 {
        _mm256_setzero_ps()
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m256 {
        _mm256_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m256) {
        _mm256_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn fmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
        _mm256_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn add(a: __m256, b: __m256) -> __m256 {
        _mm256_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn sub(a: __m256, b: __m256) -> __m256 {
        _mm256_sub_ps(a, b)
    }
    #[inline(always)]
    unsafe fn max(a: __m256, b: __m256) -> __m256 {
        _mm256_max_ps(a, b)
    }
    #[inline(always)]
    unsafe fn exp(x: __m256) -> __m256 {
        super::simd::avx::exp8(x)
    }
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        super::simd::avx::hsum(v)
    }
    #[inline(always)]
    unsafe fn hsum4(v: [__m256; 4]) -> [f32; 4] {
        // [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, ...], then [a0..3, b0..3, c0..3, d0..3 | a4..7, ...].
        let ab = _mm256_hadd_ps(v[0], v[1]);
        let cd = _mm256_hadd_ps(v[2], v[3]);
        let abcd = _mm256_hadd_ps(ab, cd);
        let s = _mm_add_ps(
            _mm256_castps256_ps128(abcd),
            _mm256_extractf128_ps::<1>(abcd),
        );
        let mut out = [0f32; 4];
        _mm_storeu_ps(out.as_mut_ptr(), s);
        out
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> __m256 {
        let h = _mm_loadu_si128(p.cast());
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }
    #[inline(always)]
    unsafe fn dot_i8x16(x: *const f32, codes: __m128i, acc: __m256) -> __m256 {
        let lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes));
        let hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(codes)));
        _mm256_fmadd_ps(
            _mm256_loadu_ps(x.add(8)),
            hi,
            _mm256_fmadd_ps(_mm256_loadu_ps(x), lo, acc),
        )
    }
    #[inline(always)]
    unsafe fn dot_u8x16(x: *const f32, codes: __m128i, acc: __m256) -> __m256 {
        let lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes));
        let hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(codes)));
        _mm256_fmadd_ps(
            _mm256_loadu_ps(x.add(8)),
            hi,
            _mm256_fmadd_ps(_mm256_loadu_ps(x), lo, acc),
        )
    }
    #[inline(always)]
    unsafe fn dot_f16x16(x: *const f32, h: __m256i, acc: __m256) -> __m256 {
        let lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
        let hi = _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(h));
        _mm256_fmadd_ps(
            _mm256_loadu_ps(x.add(8)),
            hi,
            _mm256_fmadd_ps(_mm256_loadu_ps(x), lo, acc),
        )
    }
    #[inline(always)]
    unsafe fn dequant_i8x16(dst: *mut f32, codes: __m128i, scale: f32, offset: f32) {
        let (s, o) = (_mm256_set1_ps(scale), _mm256_set1_ps(offset));
        let lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes));
        let hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(codes)));
        _mm256_storeu_ps(dst, _mm256_fmadd_ps(lo, s, o));
        _mm256_storeu_ps(dst.add(8), _mm256_fmadd_ps(hi, s, o));
    }
    #[inline(always)]
    unsafe fn dequant_u8x16(dst: *mut f32, codes: __m128i, scale: f32, offset: f32) {
        let (s, o) = (_mm256_set1_ps(scale), _mm256_set1_ps(offset));
        let lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes));
        let hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(codes)));
        _mm256_storeu_ps(dst, _mm256_fmadd_ps(lo, s, o));
        _mm256_storeu_ps(dst.add(8), _mm256_fmadd_ps(hi, s, o));
    }
    #[inline(always)]
    unsafe fn dequant_f16x16(dst: *mut f32, h: __m256i, scale: f32) {
        let s = _mm256_set1_ps(scale);
        let lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
        let hi = _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(h));
        _mm256_storeu_ps(dst, _mm256_mul_ps(lo, s));
        _mm256_storeu_ps(dst.add(8), _mm256_mul_ps(hi, s));
    }
}

impl Lanes for Avx512 {
    const N: usize = 16;
    type V = __m512;
    #[inline(always)]
    unsafe fn zero() -> __m512 {
        _mm512_setzero_ps()
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m512 {
        _mm512_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m512) {
        _mm512_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn fmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn add(a: __m512, b: __m512) -> __m512 {
        _mm512_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn sub(a: __m512, b: __m512) -> __m512 {
        _mm512_sub_ps(a, b)
    }
    #[inline(always)]
    unsafe fn max(a: __m512, b: __m512) -> __m512 {
        _mm512_max_ps(a, b)
    }
    #[inline(always)]
    unsafe fn exp(x: __m512) -> __m512 {
        // The polynomial of `avx::exp8`, on 16 lanes.
        let x = _mm512_min_ps(
            _mm512_max_ps(x, _mm512_set1_ps(-87.3)),
            _mm512_set1_ps(88.3),
        );
        let fx =
            _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(_mm512_fmadd_ps(
                x,
                _mm512_set1_ps(std::f32::consts::LOG2_E),
                _mm512_set1_ps(0.5),
            ));
        let r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut y = _mm512_set1_ps(1.987_569_1e-4);
        for c in super::simd::avx::EXP_POLY {
            y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(c));
        }
        y = _mm512_fmadd_ps(
            y,
            _mm512_mul_ps(r, r),
            _mm512_add_ps(r, _mm512_set1_ps(1.0)),
        );
        let pow2 = _mm512_slli_epi32::<23>(_mm512_add_epi32(
            _mm512_cvtps_epi32(fx),
            _mm512_set1_epi32(127),
        ));
        _mm512_mul_ps(y, _mm512_castsi512_ps(pow2))
    }
    #[inline(always)]
    unsafe fn hsum(v: __m512) -> f32 {
        // The two halves first, then the 8-lane reduction: the same pairing as the AVX2 path
        // would do on the same values, not the sequential sum `_mm512_reduce_add_ps` does.
        let lo = _mm512_castps512_ps256(v);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        super::simd::avx::hsum(_mm256_add_ps(lo, hi))
    }
    #[inline(always)]
    unsafe fn hsum4(v: [__m512; 4]) -> [f32; 4] {
        // No closure for the halving: it would be compiled without the target features.
        let mut halves = [_mm256_setzero_ps(); 4];
        for (h, &x) in halves.iter_mut().zip(&v) {
            *h = _mm256_add_ps(_mm512_castps512_ps256(x), _mm512_extractf32x8_ps::<1>(x));
        }
        Avx2::hsum4(halves)
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> __m512 {
        let h = _mm256_loadu_si256(p.cast());
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
    }
    #[inline(always)]
    unsafe fn dot_i8x16(x: *const f32, codes: __m128i, acc: __m512) -> __m512 {
        let v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes));
        _mm512_fmadd_ps(_mm512_loadu_ps(x), v, acc)
    }
    #[inline(always)]
    unsafe fn dot_u8x16(x: *const f32, codes: __m128i, acc: __m512) -> __m512 {
        let v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(codes));
        _mm512_fmadd_ps(_mm512_loadu_ps(x), v, acc)
    }
    #[inline(always)]
    unsafe fn dot_f16x16(x: *const f32, h: __m256i, acc: __m512) -> __m512 {
        _mm512_fmadd_ps(_mm512_loadu_ps(x), _mm512_cvtph_ps(h), acc)
    }
    #[inline(always)]
    unsafe fn dequant_i8x16(dst: *mut f32, codes: __m128i, scale: f32, offset: f32) {
        let v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes));
        _mm512_storeu_ps(
            dst,
            _mm512_fmadd_ps(v, _mm512_set1_ps(scale), _mm512_set1_ps(offset)),
        );
    }
    #[inline(always)]
    unsafe fn dequant_u8x16(dst: *mut f32, codes: __m128i, scale: f32, offset: f32) {
        let v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(codes));
        _mm512_storeu_ps(
            dst,
            _mm512_fmadd_ps(v, _mm512_set1_ps(scale), _mm512_set1_ps(offset)),
        );
    }
    #[inline(always)]
    unsafe fn dequant_f16x16(dst: *mut f32, h: __m256i, scale: f32) {
        _mm512_storeu_ps(
            dst,
            _mm512_mul_ps(_mm512_cvtph_ps(h), _mm512_set1_ps(scale)),
        );
    }
}
