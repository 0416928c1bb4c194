//! `y = x · Wᵀ (+ bias)`: the linear layer, for f32 activations over f32, bf16 or f16 weights.
//!
//! Weights keep the checkpoint's `[out_features, in_features]` row layout. With 1–3 activation
//! rows (decode) every output is a dot product of two contiguous rows, bf16/f16 widened in
//! registers, so no widened copy of the weights exists (`gemv`, and `quant::gemv` for packed
//! formats); up to 32 rows (batched decode) dense weights are read in place by register tiles of
//! rows × rows (`gemm_direct`); with more rows, or quantized weights, panels are packed per
//! worker and a broadcast tile runs over them (`gemm_packed`). Each path exists for AVX2 and
//! AVX-512 (one body over `lanes::Lanes`) beside the portable one. Output columns are split over
//! the rayon pool.

use std::ops::Range;

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::lanes::Lanes;
use super::quant::{w8a8, Fp8Weights, Int4Weights, Int8Weights, Nvfp4Weights, QuantRows};
use super::simd::Isa;
use super::tactic::Tactic;
use crate::error::check_len;
use crate::Result;

/// The storage of a weight matrix as the kernels read it. bf16 and f16 are raw bit patterns.
#[derive(Clone, Copy, Debug)]
pub enum WeightData<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
    F16(&'a [u16]),
    Int8(Int8Weights<'a>),
    Int4(Int4Weights<'a>),
    Fp8(Fp8Weights<'a>),
    Nvfp4(Nvfp4Weights<'a>),
    /// Per-channel int8 weights whose activations are quantized per token as well.
    W8A8(Int8Weights<'a>),
}

impl WeightData<'_> {
    /// Checks the storage against a `rows × cols` matrix.
    fn check(&self, rows: usize, cols: usize) -> Result<()> {
        let dense = |len| check_len("MatRef", "weight", len, rows * cols);
        match self {
            WeightData::F32(d) => dense(d.len()),
            WeightData::Bf16(d) | WeightData::F16(d) => dense(d.len()),
            WeightData::Int8(w) => w.check(rows, cols),
            WeightData::W8A8(w) => {
                w.check(rows, cols)?;
                // The integer kernel has no term for a zero point.
                check_len(
                    "W8A8 weights",
                    "offsets",
                    w.offsets.map_or(0, <[f32]>::len),
                    0,
                )?;
                check_len("W8A8 weights", "scales (one per row)", w.scales.len(), rows)
            }
            WeightData::Int4(w) => w.check(rows, cols),
            WeightData::Fp8(w) => w.check(rows, cols),
            WeightData::Nvfp4(w) => w.check(rows, cols),
        }
    }
}

/// A row-major `rows × cols` weight matrix.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    data: WeightData<'a>,
    rows: usize,
    cols: usize,
}

impl<'a> MatRef<'a> {
    pub fn new(data: WeightData<'a>, rows: usize, cols: usize) -> Result<Self> {
        data.check(rows, cols)?;
        Ok(Self { data, rows, cols })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn data(&self) -> WeightData<'a> {
        self.data
    }

    /// Writes row `r` widened (or dequantized) to f32 into `out` (`out.len() == cols`).
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        let k = self.cols;
        match self.data {
            WeightData::F32(d) => Dense(d).row_to_f32(r, k, out),
            WeightData::Bf16(d) => Dense(as_bf16(d)).row_to_f32(r, k, out),
            WeightData::F16(d) => Dense(as_f16(d)).row_to_f32(r, k, out),
            WeightData::Int8(w) | WeightData::W8A8(w) => QuantRows::row_to_f32(&w, r, k, out),
            WeightData::Int4(w) => QuantRows::row_to_f32(&w, r, k, out),
            WeightData::Fp8(w) => QuantRows::row_to_f32(&w, r, k, out),
            WeightData::Nvfp4(w) => QuantRows::row_to_f32(&w, r, k, out),
        }
    }
}

/// `y[m × n] = x[m × k] · w[n × k]ᵀ + bias[n]`, with the default [`Tactic`].
pub fn linear(
    x: &[f32],
    m: usize,
    w: MatRef<'_>,
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    linear_with(x, m, w, bias, y, &Tactic::default())
}

/// [`linear`] run as `tactic` says (W8A8 weights take their own kernel whatever it says).
pub fn linear_with(
    x: &[f32],
    m: usize,
    w: MatRef<'_>,
    bias: Option<&[f32]>,
    y: &mut [f32],
    tactic: &Tactic,
) -> Result<()> {
    let (n, k) = (w.rows, w.cols);
    check_len("linear", "x", x.len(), m * k)?;
    check_len("linear", "y", y.len(), m * n)?;
    if let Some(b) = bias {
        check_len("linear", "bias", b.len(), n)?;
    }
    let problem = Problem {
        x,
        m,
        k,
        n,
        bias,
        xt: None,
        tactic: tactic.clamped(),
    };
    let out = OutPtr(y.as_mut_ptr());
    match w.data {
        WeightData::F32(d) => run_dense(&problem, d, out),
        WeightData::Bf16(d) => run_dense(&problem, as_bf16(d), out),
        WeightData::F16(d) => run_dense(&problem, as_f16(d), out),
        WeightData::Int8(q) => run(&problem, &q, out),
        WeightData::Int4(q) => run(&problem, &q, out),
        WeightData::Fp8(q) => run(&problem, &q, out),
        WeightData::Nvfp4(q) => run(&problem, &q, out),
        WeightData::W8A8(q) => w8a8::linear(x, m, &q, (n, k), bias, y),
    }
    Ok(())
}

/// From this many activation rows on, a GEMM tile (direct or packed) beats one GEMV per row.
pub(crate) const PACKED_MIN_ROWS: usize = 4;

/// Up to this many activation rows the direct tiles beat packing (before their AVX-512 broadcast
/// form, which widened the gap): `linear_bench` on SmolLM2's
/// shapes, 2 Xeon cores (AVX-512), GFLOP/s direct vs packed: 97 vs 55 at 8 rows, 136 vs 94 at
/// 16, 149–155 vs 130–135 at 32, 161 vs 187 at 64.
pub(crate) const DIRECT_MAX_ROWS: usize = 32;

/// Widest packed-GEMM panel (AVX-512: two 16-lane vectors); column chunks are a whole number of
/// it so tiles and panels stay full.
pub(crate) const MAX_PANEL: usize = 32;

pub(crate) struct Problem<'a> {
    pub x: &'a [f32],
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub bias: Option<&'a [f32]>,
    /// `x` transposed into panels of `TRANSPOSED_PANEL` rows, for the direct tiles of
    /// AVX-512 (built once per call by [`run_dense`], shared by every worker).
    pub xt: Option<&'a [f32]>,
    /// How the call runs (clamped to this CPU and to valid ranges).
    pub tactic: Tactic,
}

/// The output pointer shared by the workers; each writes a disjoint part (columns here, (row,
/// head) slots in attention).
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub *mut f32);
// SAFETY: workers write disjoint parts of the output (see `run` and `paged_attention`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer itself; a closure that calls this captures the whole `OutPtr` (which is
    /// `Sync`), not the raw pointer field (which is not).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// A weight matrix in some storage format, as the three paths of `linear` read it.
pub(crate) trait Rows: Sync {
    /// Row `r` of a `k`-wide matrix as f32.
    fn row_to_f32(&self, r: usize, k: usize, out: &mut [f32]);
    /// The decode path: columns `cols` of the output, reading the stored format directly, on
    /// the path of `isa` (AVX2 or better; the caller checked it is available).
    #[cfg(target_arch = "x86_64")]
    unsafe fn gemv(&self, isa: Isa, p: &Problem<'_>, cols: Range<usize>, out: OutPtr);
    /// The batched path for up to `DIRECT_MAX_ROWS` rows where the format reads its rows in
    /// place (dense weights); false, having done nothing, for formats that must be packed.
    #[cfg(target_arch = "x86_64")]
    unsafe fn gemm_direct(
        &self,
        _isa: Isa,
        _p: &Problem<'_>,
        _cols: Range<usize>,
        _out: OutPtr,
    ) -> bool {
        false
    }
    /// Fills a k-major panel of up to `width` columns for the packed GEMM (zero past the last).
    #[cfg(target_arch = "x86_64")]
    unsafe fn pack(&self, k: usize, cols: Range<usize>, width: usize, packed: &mut [f32]);
}

/// Dense rows of one element type.
pub(crate) struct Dense<'a, E>(pub &'a [E]);

impl<E: Elem> Rows for Dense<'_, E> {
    fn row_to_f32(&self, r: usize, k: usize, out: &mut [f32]) {
        for (o, &e) in out.iter_mut().zip(&self.0[r * k..(r + 1) * k]) {
            *o = e.to_f32();
        }
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn gemv(&self, isa: Isa, p: &Problem<'_>, cols: Range<usize>, out: OutPtr) {
        match isa {
            Isa::Avx512 => gemv::columns_avx512(p, self.0, cols, out),
            _ => gemv::columns_avx2(p, self.0, cols, out),
        }
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn gemm_direct(
        &self,
        isa: Isa,
        p: &Problem<'_>,
        cols: Range<usize>,
        out: OutPtr,
    ) -> bool {
        super::gemm_direct::columns(isa, p, self.0, cols, out);
        true
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn pack(&self, k: usize, cols: Range<usize>, width: usize, packed: &mut [f32]) {
        super::gemm_packed::pack(self.0, k, cols, width, packed)
    }
}

macro_rules! quant_rows {
    ($($t:ident),*) => {$(
        impl Rows for $t<'_> {
            fn row_to_f32(&self, r: usize, k: usize, out: &mut [f32]) {
                QuantRows::row_to_f32(self, r, k, out)
            }
            #[cfg(target_arch = "x86_64")]
            unsafe fn gemv(&self, isa: Isa, p: &Problem<'_>, cols: Range<usize>, out: OutPtr) {
                super::quant::gemv::columns(isa, self, p, cols, out)
            }
            #[cfg(target_arch = "x86_64")]
            unsafe fn pack(&self, k: usize, cols: Range<usize>, width: usize, packed: &mut [f32]) {
                super::quant::gemv::pack(self, k, cols, width, packed)
            }
        }
    )*};
}
quant_rows!(Int8Weights, Int4Weights, Fp8Weights, Nvfp4Weights);

/// `run` over dense rows, with the activations transposed first where the direct tiles read
/// them that way.
fn run_dense<E: Elem>(p: &Problem<'_>, w: &[E], out: OutPtr) {
    #[cfg(target_arch = "x86_64")]
    if super::gemm_direct::reads_transposed(p) {
        let xt = super::gemm_direct::transpose(p.x, p.m, p.k);
        let p = Problem {
            xt: Some(&xt),
            ..*p
        };
        return run(&p, &Dense(w), out);
    }
    run(p, &Dense(w), out)
}

fn run<W: Rows>(p: &Problem<'_>, w: &W, out: OutPtr) {
    let tactic = &p.tactic;
    // Enough chunks for load balance, each a whole number of the widest panel so tiles and
    // packed panels stay full.
    let threads = rayon::current_num_threads().max(1);
    let work = p.m * p.n * p.k;
    let chunks = if work < 1 << 15 {
        1
    } else {
        threads * tactic.chunks_per_thread
    };
    let chunk = p.n.div_ceil(chunks).next_multiple_of(MAX_PANEL);
    let nchunks = p.n.div_ceil(chunk);
    let isa = tactic.isa;
    // Batch invariance keeps the dot-product order at every row count: direct tiles past
    // DIRECT_MAX_ROWS too, and the GEMV for packed weights.
    let direct = tactic.invariant || (tactic.direct && p.m <= DIRECT_MAX_ROWS);
    let body = |c: usize| {
        let cols = c * chunk..((c + 1) * chunk).min(p.n);
        #[cfg(target_arch = "x86_64")]
        if isa >= Isa::Avx2 {
            // SAFETY: `isa` is at most what was detected at run time (the tactic was clamped);
            // `cols` is in bounds and disjoint per worker.
            unsafe {
                if p.m < PACKED_MIN_ROWS {
                    w.gemv(isa, p, cols, out)
                } else if direct && w.gemm_direct(isa, p, cols.clone(), out) {
                } else if tactic.invariant {
                    w.gemv(isa, p, cols, out)
                } else {
                    super::gemm_packed::columns(isa, p, w, cols, out)
                }
            };
            return;
        }
        portable_columns(p, w, cols, out);
    };
    if nchunks == 1 {
        body(0);
    } else {
        (0..nchunks).into_par_iter().for_each(body);
    }
}

fn portable_columns<W: Rows>(p: &Problem<'_>, w: &W, cols: Range<usize>, out: OutPtr) {
    let mut row = vec![0f32; p.k];
    for j in cols {
        w.row_to_f32(j, p.k, &mut row);
        let b = p.bias.map_or(0.0, |b| b[j]);
        for i in 0..p.m {
            let v = super::simd::dot_portable(&p.x[i * p.k..(i + 1) * p.k], &row) + b;
            // SAFETY: i < m, j < n, and column j belongs to this worker only.
            unsafe { *out.0.add(i * p.n + j) = v };
        }
    }
}

/// A weight element type the kernels can widen to f32.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    /// Loads `L::N` consecutive elements widened to f32.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load<L: Lanes>(p: *const Self) -> L::V;
}

#[derive(Clone, Copy)]
#[repr(transparent)]
pub(crate) struct Bf16Bits(pub u16);
#[derive(Clone, Copy)]
#[repr(transparent)]
pub(crate) struct F16Bits(pub u16);

fn as_bf16(d: &[u16]) -> &[Bf16Bits] {
    // SAFETY: Bf16Bits is repr(transparent) over u16.
    unsafe { std::slice::from_raw_parts(d.as_ptr().cast(), d.len()) }
}

fn as_f16(d: &[u16]) -> &[F16Bits] {
    // SAFETY: F16Bits is repr(transparent) over u16.
    unsafe { std::slice::from_raw_parts(d.as_ptr().cast(), d.len()) }
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load<L: Lanes>(p: *const Self) -> L::V {
        L::load(p)
    }
}

impl Elem for Bf16Bits {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.0 as u32) << 16)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load<L: Lanes>(p: *const Self) -> L::V {
        L::load_bf16(p.cast())
    }
}

impl Elem for F16Bits {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::f16::from_bits(self.0).to_f32()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load<L: Lanes>(p: *const Self) -> L::V {
        L::load_f16(p.cast())
    }
}

/// The decode path of `linear` (fewer than `PACKED_MIN_ROWS` activation rows): one row at a time,
/// eight weight rows per register tile so eight independent FMA chains (and eight weight streams)
/// are in flight.
#[cfg(target_arch = "x86_64")]
mod gemv {
    use super::{Elem, OutPtr, Problem};
    use crate::cpu::lanes::{Avx2, Avx512, Lanes};
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    use std::ops::Range;

    const NR: usize = 8;

    /// # Safety
    /// The processor has the features enabled here (callers check `isa()` first), and
    /// the arguments meet the contract of the body it enters.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn columns_avx2<E: Elem>(
        p: &Problem<'_>,
        w: &[E],
        cols: Range<usize>,
        out: OutPtr,
    ) {
        columns::<Avx2, E>(p, w, cols, out)
    }

    /// # Safety
    /// The processor has the features enabled here (callers check `isa()` first), and
    /// the arguments meet the contract of the body it enters.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    pub(super) unsafe fn columns_avx512<E: Elem>(
        p: &Problem<'_>,
        w: &[E],
        cols: Range<usize>,
        out: OutPtr,
    ) {
        columns::<Avx512, E>(p, w, cols, out)
    }

    #[inline(always)]
    unsafe fn columns<L: Lanes, E: Elem>(
        p: &Problem<'_>,
        w: &[E],
        cols: Range<usize>,
        out: OutPtr,
    ) {
        for i in 0..p.m {
            let mut j = cols.start;
            while j + NR <= cols.end {
                tile::<L, E, NR>(p, w, i, j, out);
                j += NR;
            }
            for j in j..cols.end {
                tile::<L, E, 1>(p, w, i, j, out);
            }
        }
    }

    /// `out[i][j..j+R] = x[i] · w[j..j+R]ᵀ (+ bias)`.
    #[inline(always)]
    unsafe fn tile<L: Lanes, E: Elem, const R: usize>(
        p: &Problem<'_>,
        w: &[E],
        i: usize,
        j: usize,
        out: OutPtr,
    ) {
        let k = p.k;
        let x = p.x.as_ptr().add(i * k);
        let wp = w.as_ptr().add(j * k);
        let mut acc = [L::zero(); R];
        let mut q = 0;
        while q + L::N <= k {
            let xv = L::load(x.add(q));
            for (c, a) in acc.iter_mut().enumerate() {
                let ahead = wp.wrapping_add((c + p.tactic.prefetch_rows) * k + q);
                _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
                *a = L::fmadd(xv, E::load::<L>(wp.add(c * k + q)), *a);
            }
            q += L::N;
        }
        for (c, a) in acc.iter().enumerate() {
            let mut s = L::hsum(*a);
            for t in q..k {
                s += *x.add(t) * (*wp.add(c * k + t)).to_f32();
            }
            if let Some(b) = p.bias {
                s += b[j + c];
            }
            *out.0.add(i * p.n + j + c) = s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::{assert_close, bf16_bits, every_path, rand_vec};

    fn reference(
        x: &[f32],
        m: usize,
        w: &[f32],
        n: usize,
        k: usize,
        bias: Option<&[f32]>,
    ) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for q in 0..k {
                    s += x[i * k + q] as f64 * w[j * k + q] as f64;
                }
                y[i * n + j] = s as f32 + bias.map_or(0.0, |b| b[j]);
            }
        }
        y
    }

    #[test]
    fn all_storage_types_match_reference_on_awkward_shapes() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (1, 37, 13),
            (3, 5, 7),
            (5, 11, 29),
            (7, 67, 101),
            (53, 131, 77),
            (6, 19, 40),
            (13, 29, 45),
            (17, 70, 33),
            (1, 300, 520),
            (32, 48, 600),
        ] {
            let x = rand_vec(m * k, 1);
            let w = rand_vec(n * k, 2);
            let bias = rand_vec(n, 3);
            // Round the weights through each storage type so the reference sees the same values.
            let bf = bf16_bits(&w);
            let hf: Vec<u16> = w
                .iter()
                .map(|&v| half::f16::from_f32(v).to_bits())
                .collect();
            let wb: Vec<f32> = bf
                .iter()
                .map(|&b| half::bf16::from_bits(b).to_f32())
                .collect();
            let wh: Vec<f32> = hf
                .iter()
                .map(|&b| half::f16::from_bits(b).to_f32())
                .collect();
            for (data, wref) in [
                (WeightData::F32(&w), &w),
                (WeightData::Bf16(&bf), &wb),
                (WeightData::F16(&hf), &wh),
            ] {
                for b in [None, Some(bias.as_slice())] {
                    let expect = reference(&x, m, wref, n, k, b);
                    every_path(|| {
                        let mut y = vec![0f32; m * n];
                        linear(&x, m, MatRef::new(data, n, k).unwrap(), b, &mut y).unwrap();
                        assert_close(&y, &expect, 1e-4);
                    });
                }
            }
        }
    }

    /// Every tactic computes the same product; out-of-range fields (as a hand-edited timing
    /// cache may hold) are clamped, never trusted.
    #[test]
    fn every_tactic_matches_reference() {
        let (n, k) = (70, 45);
        let w = rand_vec(n * k, 4);
        let bias = rand_vec(n, 5);
        let mut tactics = vec![];
        for isa in Isa::ALL {
            for (prefetch_rows, direct, chunks_per_thread) in
                [(0, true, 1), (16, false, 8), (usize::MAX, true, 0)]
            {
                tactics.push(Tactic {
                    isa,
                    prefetch_rows,
                    direct,
                    chunks_per_thread,
                    wide_tiles: direct,
                    invariant: !direct,
                });
            }
        }
        for m in [1, 6, 16, 21, 40] {
            let x = rand_vec(m * k, 6);
            let expect = reference(&x, m, &w, n, k, Some(&bias));
            for t in &tactics {
                let mut y = vec![0f32; m * n];
                let mat = MatRef::new(WeightData::F32(&w), n, k).unwrap();
                linear_with(&x, m, mat, Some(&bias), &mut y, t).unwrap();
                assert_close(&y, &expect, 1e-4);
            }
        }
    }

    #[test]
    fn shape_errors_are_reported() {
        let w = vec![0f32; 6];
        assert!(MatRef::new(WeightData::F32(&w), 4, 2).is_err());
        let m = MatRef::new(WeightData::F32(&w), 3, 2).unwrap();
        let mut y = vec![0f32; 3];
        assert!(linear(&[1.0; 3], 1, m, None, &mut y).is_err());
    }
}
