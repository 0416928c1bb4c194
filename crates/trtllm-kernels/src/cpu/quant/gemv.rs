//! Decode-time matrix-vector products over packed weights (AVX2 and AVX-512, one body generic
//! over [`Lanes`]). Codes are widened to f32 in registers block by block and multiplied against
//! f32 activations, so activations are never quantized and no dequantized copy of the weights
//! exists.
//!
//! A row is a run of scale groups, each a run of blocks. Per group, four (or, as a tactic, eight)
//! rows accumulate their raw `x · code` sums side by side (independent FMA chains sharing the
//! activation loads), then fold them in with the group's scale: `acc += scale · Σ x·code`.
//! Groups of 16 values (GGML's k-quant sub-blocks) are halves of a block, each half scaled as
//! it is read, into a chain of its own.
//! Formats with an offset (int4 with a zero point, or symmetric int4 as `−8·scale`) add
//! `offset · Σ x` per group. The weight stream is prefetched `Tactic::prefetch_rows` rows ahead:
//! without it a tile's row streams leave too few loads in flight for a server core (SmolLM2
//! W8A16 decode on a Xeon: 48 → 83 tok/s).
//! On AVX-512, 4-bit codes in groups of whole blocks take [`super::gemv_table`] instead.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;
use std::ops::Range;

use super::{Fp8Weights, Int4Weights, Int8Weights, Nvfp4Weights, QuantRows};
use crate::cpu::lanes::{Avx2, Avx512, Lanes};
use crate::cpu::matmul::{OutPtr, Problem};
use crate::cpu::simd::Isa;

/// What the tile driver needs of a format beyond [`QuantRows`].
pub(crate) trait BlockDot: QuantRows {
    /// Values per scale group in a `cols`-wide row: a whole number of blocks, or 16 (half a
    /// 32-value block: the codes [`BlockDot::visit_block`] hands over 16 at a time).
    fn group_len(&self, cols: usize) -> usize;
    /// Whether [`BlockDot::offset`] can be non-zero.
    fn has_offset(&self) -> bool;
    /// Hands block `b` of row `r` to `v` as vectors of codes, in the units `scale` expects.
    unsafe fn visit_block<V: Visit>(&self, r: usize, cols: usize, b: usize, v: &mut V);
    /// Address of block `b` of row `r`, for prefetching only: it may lie past the matrix.
    fn block_addr(&self, r: usize, cols: usize, b: usize) -> *const u8;
    /// Scale of group `g` of row `r`, in a matrix of `ng` groups per row (passed in, not
    /// derived per call: a division per block costs as much as the block's dot product).
    fn scale(&self, r: usize, ng: usize, g: usize) -> f32;
    /// Offset of group `g` of row `r`, multiplied by the group's activation sum.
    fn offset(&self, _r: usize, _ng: usize, _g: usize) -> f32 {
        0.0
    }
    /// Runs the AVX-512 table kernel ([`super::gemv_table`]) where the format has one; false,
    /// having done nothing, where it has none.
    ///
    /// # Safety
    /// As [`columns`], with AVX-512 available.
    unsafe fn table_columns(&self, _p: &Problem<'_>, _cols: Range<usize>, _out: OutPtr) -> bool {
        false
    }
}

/// What is done with a block's codes, 16 at a time from value `at` of the block: a dot product
/// with activations ([`Dot`]) or a dequantization ([`Dequant`]).
pub(crate) trait Visit {
    unsafe fn i8x16(&mut self, at: usize, codes: __m128i);
    unsafe fn u8x16(&mut self, at: usize, codes: __m128i);
    unsafe fn f16x16(&mut self, at: usize, h: __m256i);
}

/// `acc + Σ x[i] · code_i` over a block.
struct Dot<L: Lanes> {
    x: *const f32,
    acc: L::V,
}

impl<L: Lanes> Visit for Dot<L> {
    #[inline(always)]
    unsafe fn i8x16(&mut self, at: usize, codes: __m128i) {
        self.acc = L::dot_i8x16(self.x.add(at), codes, self.acc);
    }
    #[inline(always)]
    unsafe fn u8x16(&mut self, at: usize, codes: __m128i) {
        self.acc = L::dot_u8x16(self.x.add(at), codes, self.acc);
    }
    #[inline(always)]
    unsafe fn f16x16(&mut self, at: usize, h: __m256i) {
        self.acc = L::dot_f16x16(self.x.add(at), h, self.acc);
    }
}

/// `acc[h] + scale[h] · Σ x[i] · code_i` over a block whose halves `h` (16 values each) are
/// groups of their own: a chain per half, so the two scale multiplications do not queue.
struct SplitDot<L: Lanes> {
    x: *const f32,
    acc: [L::V; 2],
    scale: [L::V; 2],
}

impl<L: Lanes> SplitDot<L> {
    #[inline(always)]
    unsafe fn fold(&mut self, at: usize, dot: L::V) {
        let h = at / 16;
        self.acc[h] = L::fmadd(dot, self.scale[h], self.acc[h]);
    }
}

impl<L: Lanes> Visit for SplitDot<L> {
    #[inline(always)]
    unsafe fn i8x16(&mut self, at: usize, codes: __m128i) {
        self.fold(at, L::dot_i8x16(self.x.add(at), codes, L::zero()));
    }
    #[inline(always)]
    unsafe fn u8x16(&mut self, at: usize, codes: __m128i) {
        self.fold(at, L::dot_u8x16(self.x.add(at), codes, L::zero()));
    }
    #[inline(always)]
    unsafe fn f16x16(&mut self, at: usize, h: __m256i) {
        self.fold(at, L::dot_f16x16(self.x.add(at), h, L::zero()));
    }
}

/// `out[i] = code_i · scale + offset` over a block, with the scale and offset of the half
/// (16 values) it lies in; both halves alike unless groups are 16 values.
struct Dequant<L> {
    out: *mut f32,
    scale: [f32; 2],
    offset: [f32; 2],
    lanes: std::marker::PhantomData<L>,
}

impl<L: Lanes> Visit for Dequant<L> {
    #[inline(always)]
    unsafe fn i8x16(&mut self, at: usize, codes: __m128i) {
        let h = at / 16;
        L::dequant_i8x16(self.out.add(at), codes, self.scale[h], self.offset[h]);
    }
    #[inline(always)]
    unsafe fn u8x16(&mut self, at: usize, codes: __m128i) {
        let h = at / 16;
        L::dequant_u8x16(self.out.add(at), codes, self.scale[h], self.offset[h]);
    }
    #[inline(always)]
    unsafe fn f16x16(&mut self, at: usize, h: __m256i) {
        // Formats with f16 codes have no offset.
        L::dequant_f16x16(self.out.add(at), h, self.scale[at / 16]);
    }
}

/// Rows per tile (8 with `Tactic::wide_tiles`: more loads in flight, more registers).
const R: usize = 4;

/// Columns `cols` of `y = x · Wᵀ + bias` for every activation row, on the path of `isa` (AVX2
/// or better, checked by the caller).
pub(crate) unsafe fn columns<W: BlockDot>(
    isa: Isa,
    w: &W,
    p: &Problem<'_>,
    cols: Range<usize>,
    out: OutPtr,
) {
    match isa {
        Isa::Avx512 if w.table_columns(p, cols.clone(), out) => {}
        Isa::Avx512 => columns_avx512(w, p, cols, out),
        _ => columns_avx2(w, p, cols, out),
    }
}

/// # Safety
/// The processor has the features enabled here (callers check `isa()` first), and
/// the arguments meet the contract of the body it enters.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn columns_avx2<W: BlockDot>(w: &W, p: &Problem<'_>, cols: Range<usize>, out: OutPtr) {
    rows::<Avx2, W>(w, p, cols, out)
}

/// # Safety
/// The processor has the features enabled here (callers check `isa()` first), and
/// the arguments meet the contract of the body it enters.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
unsafe fn columns_avx512<W: BlockDot>(w: &W, p: &Problem<'_>, cols: Range<usize>, out: OutPtr) {
    rows::<Avx512, W>(w, p, cols, out)
}

#[inline(always)]
unsafe fn rows<L: Lanes, W: BlockDot>(w: &W, p: &Problem<'_>, cols: Range<usize>, out: OutPtr) {
    let k = p.k;
    let gl = w.group_len(k);
    let mut xsum = vec![0f32; if w.has_offset() { k.div_ceil(gl) } else { 0 }];
    for i in 0..p.m {
        let x = &p.x[i * k..(i + 1) * k];
        for (g, s) in xsum.iter_mut().enumerate() {
            *s = x[g * gl..((g + 1) * gl).min(k)].iter().sum();
        }
        let t = Tile {
            w,
            p,
            x,
            xsum: &xsum,
            i,
        };
        let mut j = cols.start;
        if p.tactic.wide_tiles {
            while j + 8 <= cols.end {
                t.run::<L, 8>(j, out);
                j += 8;
            }
        }
        while j + R <= cols.end {
            t.run::<L, R>(j, out);
            j += R;
        }
        for j in j..cols.end {
            t.run::<L, 1>(j, out);
        }
    }
}

/// One activation row against the weight rows of a tile.
struct Tile<'a, W> {
    w: &'a W,
    p: &'a Problem<'a>,
    x: &'a [f32],
    /// The activation row's sum per scale group (formats with offsets only).
    xsum: &'a [f32],
    /// The activation row.
    i: usize,
}

impl<W: BlockDot> Tile<'_, W> {
    /// Output columns `j..j + N` of row `i`.
    #[inline(always)]
    unsafe fn run<L: Lanes, const N: usize>(&self, j: usize, out: OutPtr) {
        let (w, p) = (self.w, self.p);
        let gl = w.group_len(p.k);
        let ng = p.k.div_ceil(gl);
        let (acc, off) = if gl < W::BLOCK {
            self.split_groups::<L, N>(j, ng)
        } else {
            self.whole_groups::<L, N>(j, ng, gl / W::BLOCK)
        };
        for r in 0..N {
            let bias = p.bias.map_or(0.0, |bias| bias[j + r]);
            *out.0.add(self.i * p.n + j + r) = L::hsum(acc[r]) + off[r] + bias;
        }
    }

    /// Groups of `gb` whole blocks: per group, the rows' raw sums side by side, then scaled.
    #[inline(always)]
    unsafe fn whole_groups<L: Lanes, const N: usize>(
        &self,
        j: usize,
        ng: usize,
        gb: usize,
    ) -> ([L::V; N], [f32; N]) {
        let w = self.w;
        let (k, ahead) = (self.p.k, self.p.tactic.prefetch_rows);
        let (nb, has_offset) = (k / W::BLOCK, w.has_offset());
        let xp = self.x.as_ptr();
        let mut acc = [L::zero(); N];
        let mut off = [0f32; N];
        let mut b = 0;
        let mut g = 0;
        while b < nb {
            let end = (b + gb).min(nb);
            let mut part = [L::zero(); N];
            for blk in b..end {
                let xb = xp.add(blk * W::BLOCK);
                for (r, a) in part.iter_mut().enumerate() {
                    prefetch(w.block_addr(j + r + ahead, k, blk));
                    let mut dot = Dot::<L> { x: xb, acc: *a };
                    w.visit_block(j + r, k, blk, &mut dot);
                    *a = dot.acc;
                }
            }
            for r in 0..N {
                acc[r] = L::fmadd(part[r], L::splat(w.scale(j + r, ng, g)), acc[r]);
                if has_offset {
                    off[r] += w.offset(j + r, ng, g) * self.xsum[g];
                }
            }
            b = end;
            g += 1;
        }
        (acc, off)
    }

    /// Groups of 16 values, two per block.
    #[inline(always)]
    unsafe fn split_groups<L: Lanes, const N: usize>(
        &self,
        j: usize,
        ng: usize,
    ) -> ([L::V; N], [f32; N]) {
        let w = self.w;
        let (k, ahead) = (self.p.k, self.p.tactic.prefetch_rows);
        let has_offset = w.has_offset();
        let xp = self.x.as_ptr();
        let mut acc = [[L::zero(); 2]; N];
        let mut off = [0f32; N];
        for blk in 0..k / W::BLOCK {
            let g = 2 * blk;
            for r in 0..N {
                prefetch(w.block_addr(j + r + ahead, k, blk));
                let scale = |g| L::splat(w.scale(j + r, ng, g));
                let mut dot = SplitDot::<L> {
                    x: xp.add(blk * W::BLOCK),
                    acc: acc[r],
                    scale: [scale(g), scale(g + 1)],
                };
                w.visit_block(j + r, k, blk, &mut dot);
                acc[r] = dot.acc;
                if has_offset {
                    off[r] += w.offset(j + r, ng, g) * self.xsum[g]
                        + w.offset(j + r, ng, g + 1) * self.xsum[g + 1];
                }
            }
        }
        (acc.map(|[a, b]| L::add(a, b)), off)
    }
}

#[inline(always)]
unsafe fn prefetch(at: *const u8) {
    _mm_prefetch::<_MM_HINT_T0>(at.cast());
}

impl BlockDot for Int8Weights<'_> {
    #[inline(always)]
    fn block_addr(&self, r: usize, cols: usize, b: usize) -> *const u8 {
        self.q.as_ptr().cast::<u8>().wrapping_add(r * cols + b * 32)
    }
    fn group_len(&self, _cols: usize) -> usize {
        self.group
    }
    fn has_offset(&self) -> bool {
        self.offsets.is_some()
    }
    #[inline(always)]
    unsafe fn visit_block<V: Visit>(&self, r: usize, cols: usize, b: usize, v: &mut V) {
        let q = self.q.as_ptr().add(r * cols + b * 32);
        v.i8x16(0, _mm_loadu_si128(q.cast()));
        v.i8x16(16, _mm_loadu_si128(q.add(16).cast()));
    }
    #[inline(always)]
    fn scale(&self, r: usize, ng: usize, g: usize) -> f32 {
        self.scales[r * ng + g]
    }
    #[inline(always)]
    fn offset(&self, r: usize, ng: usize, g: usize) -> f32 {
        self.offsets.map_or(0.0, |o| o[r * ng + g])
    }
}

impl BlockDot for Int4Weights<'_> {
    #[inline(always)]
    fn block_addr(&self, r: usize, cols: usize, b: usize) -> *const u8 {
        self.q.as_ptr().wrapping_add(r * cols / 2 + b * 16)
    }
    fn group_len(&self, _cols: usize) -> usize {
        self.group
    }
    /// Symmetric codes have the offset `−8·scale`.
    fn has_offset(&self) -> bool {
        true
    }
    #[inline(always)]
    unsafe fn visit_block<V: Visit>(&self, r: usize, cols: usize, b: usize, v: &mut V) {
        let bytes = _mm_loadu_si128(self.q.as_ptr().add(r * cols / 2 + b * 16).cast());
        let mask = _mm_set1_epi8(0x0f);
        v.u8x16(0, _mm_and_si128(bytes, mask));
        v.u8x16(16, _mm_and_si128(_mm_srli_epi16::<4>(bytes), mask));
    }
    #[inline(always)]
    fn scale(&self, r: usize, ng: usize, g: usize) -> f32 {
        self.scales[r * ng + g]
    }
    #[inline(always)]
    fn offset(&self, r: usize, ng: usize, g: usize) -> f32 {
        let at = r * ng + g;
        match self.offsets {
            Some(o) => o[at],
            None => -8.0 * self.scales[at],
        }
    }
    unsafe fn table_columns(&self, p: &Problem<'_>, cols: Range<usize>, out: OutPtr) -> bool {
        let takes = super::gemv_table::takes(self);
        if takes {
            super::gemv_table::int4_columns(self, p, cols, out);
        }
        takes
    }
}

impl BlockDot for Fp8Weights<'_> {
    #[inline(always)]
    fn block_addr(&self, r: usize, cols: usize, b: usize) -> *const u8 {
        self.q.as_ptr().wrapping_add(r * cols + b * 32)
    }
    fn group_len(&self, cols: usize) -> usize {
        cols
    }
    fn has_offset(&self) -> bool {
        false
    }
    /// Sixteen codes at a time: sign-extended to 16 bits, shifted into f16 position (the sign
    /// copy that lands in the f16 exponent's top bit is masked off), widened by F16C.
    #[inline(always)]
    unsafe fn visit_block<V: Visit>(&self, r: usize, cols: usize, b: usize, v: &mut V) {
        let q = self.q.as_ptr().add(r * cols + b * 32);
        for at in [0, 16] {
            let wide = _mm256_cvtepi8_epi16(_mm_loadu_si128(q.add(at).cast()));
            let h = _mm256_and_si256(
                _mm256_slli_epi16::<7>(wide),
                _mm256_set1_epi16(0xbf80u16 as i16),
            );
            v.f16x16(at, h);
        }
    }
    /// The f16 widening leaves values 2⁸ too small.
    #[inline(always)]
    fn scale(&self, r: usize, _ng: usize, _g: usize) -> f32 {
        self.scales[r] * 256.0
    }
}

impl BlockDot for Nvfp4Weights<'_> {
    #[inline(always)]
    fn block_addr(&self, r: usize, cols: usize, b: usize) -> *const u8 {
        self.q.as_ptr().wrapping_add(r * cols / 2 + b * 8)
    }
    fn group_len(&self, _cols: usize) -> usize {
        16
    }
    fn has_offset(&self) -> bool {
        false
    }
    /// A byte shuffle maps each E2M1 code to twice its value as an i8.
    #[inline(always)]
    unsafe fn visit_block<V: Visit>(&self, r: usize, cols: usize, b: usize, v: &mut V) {
        let bytes = _mm_loadl_epi64(self.q.as_ptr().add(r * cols / 2 + b * 8).cast());
        let mask = _mm_set1_epi8(0x0f);
        let lo = _mm_and_si128(bytes, mask);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(bytes), mask);
        let lut = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
        v.i8x16(0, _mm_shuffle_epi8(lut, _mm_unpacklo_epi64(lo, hi)));
    }
    #[inline(always)]
    fn scale(&self, r: usize, ng: usize, g: usize) -> f32 {
        super::e4m3_to_f32(self.block_scales[r * ng + g]) * self.global_scale * 0.5
    }
}

/// Fills a panel of the packed GEMM from quantized rows `cols`: each row dequantized block by
/// block in registers into a scratch matrix, then transposed by the dense f32 pack.
///
/// # Safety
/// The processor has the features enabled here (callers check `isa()` first), and
/// the arguments meet the contract of the body it enters.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn pack<W: BlockDot>(
    w: &W,
    k: usize,
    cols: Range<usize>,
    width: usize,
    packed: &mut [f32],
) {
    let gl = w.group_len(k);
    let ng = k.div_ceil(gl);
    // The group of each half of a block (the same one unless groups are 16 values).
    let half_group = |b: usize, h: usize| (b * W::BLOCK + h * W::BLOCK / 2) / gl;
    let mut rows = vec![0f32; cols.len() * k];
    for (c, r) in cols.clone().enumerate() {
        for b in 0..k / W::BLOCK {
            let g = [half_group(b, 0), half_group(b, 1)];
            let mut dq = Dequant::<Avx2> {
                out: rows.as_mut_ptr().add(c * k + b * W::BLOCK),
                scale: g.map(|g| w.scale(r, ng, g)),
                offset: g.map(|g| w.offset(r, ng, g)),
                lanes: std::marker::PhantomData,
            };
            w.visit_block(r, k, b, &mut dq);
        }
    }
    crate::cpu::gemm_packed::pack(&rows, k, 0..cols.len(), width, packed)
}
