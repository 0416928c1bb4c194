//! Run-time selection of the instruction set the kernels use.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

/// The instruction sets the kernels have paths for, in increasing order: a kernel takes the
/// best path at or below [`isa`].
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Isa {
    /// Plain Rust, any processor.
    Portable,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512 F/BW/VL/DQ on top of AVX2 (16 f32 lanes, 32 registers).
    Avx512,
}

impl Isa {
    pub const ALL: [Isa; 3] = [Isa::Portable, Isa::Avx2, Isa::Avx512];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// The processor features this path needs.
    pub fn features(self) -> &'static str {
        match self {
            Isa::Portable => "none",
            Isa::Avx2 => "avx2, fma, f16c",
            Isa::Avx512 => "avx512f, avx512bw, avx512vl, avx512dq (and avx2, fma, f16c)",
        }
    }
}

impl std::str::FromStr for Isa {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Isa::ALL
            .into_iter()
            .find(|i| i.name() == s)
            .ok_or_else(|| format!("unknown instruction set {s:?} (portable, avx2, avx512)"))
    }
}

/// No limit set by [`limit_isa`].
const UNLIMITED: u8 = u8::MAX;
static LIMIT: AtomicU8 = AtomicU8::new(UNLIMITED);

/// The best path this processor supports, capped by `TRTLLM_ISA=portable|avx2|avx512`
/// (`TRTLLM_NO_SIMD=1` is `portable`).
pub fn detected_isa() -> Isa {
    static DETECTED: OnceLock<Isa> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        let hw = detect();
        let env = if std::env::var_os("TRTLLM_NO_SIMD").is_some_and(|v| v == "1") {
            Some(Isa::Portable)
        } else {
            std::env::var("TRTLLM_ISA")
                .ok()
                .and_then(|v| v.parse().ok())
        };
        env.map_or(hw, |cap| cap.min(hw))
    })
}

/// The path kernels take now: [`detected_isa`], or less under [`limit_isa`].
#[inline]
pub fn isa() -> Isa {
    let detected = detected_isa();
    match LIMIT.load(Ordering::Relaxed) {
        UNLIMITED => detected,
        l => Isa::ALL[l as usize].min(detected),
    }
}

/// Caps the path every kernel takes (`None`: the best the processor has), for tests and for
/// comparing paths on one machine.
pub fn limit_isa(limit: Option<Isa>) {
    LIMIT.store(limit.map_or(UNLIMITED, |i| i as u8), Ordering::Relaxed);
}

/// True when the AVX2 (or better) kernels run.
#[inline]
pub fn simd_available() -> bool {
    isa() >= Isa::Avx2
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Isa {
    let avx2 = is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c");
    let avx512 = is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512dq");
    match (avx2, avx512) {
        (true, true) => Isa::Avx512,
        (true, false) => Isa::Avx2,
        _ => Isa::Portable,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Isa {
    Isa::Portable
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx {
    use std::arch::x86_64::*;

    /// Sum of the 8 lanes.
    #[inline(always)]
    pub unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// The Cephes coefficients of e^r on [-ln2/2, ln2/2] after the leading 1.987_569_1e-4.
    pub const EXP_POLY: [f32; 5] = [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ];

    /// e^x for 8 lanes (Cephes polynomial, relative error ≈ 2e-7 over the f32 range).
    #[inline(always)]
    pub unsafe fn exp8(x: __m256) -> __m256 {
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.3)),
            _mm256_set1_ps(88.3),
        );
        let fx = _mm256_floor_ps(_mm256_fmadd_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
            _mm256_set1_ps(0.5),
        ));
        let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut y = _mm256_set1_ps(1.987_569_1e-4);
        for c in EXP_POLY {
            y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
        }
        y = _mm256_fmadd_ps(
            y,
            _mm256_mul_ps(r, r),
            _mm256_add_ps(r, _mm256_set1_ps(1.0)),
        );
        let pow2 = _mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)),
            23,
        );
        _mm256_mul_ps(y, _mm256_castsi256_ps(pow2))
    }

    /// Softmax of one row in place.
    ///
    /// # Safety
    /// The processor has the features enabled here (callers check `isa()` first), and
    /// the arguments meet the contract of the body it enters.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn softmax(x: &mut [f32]) {
        let n = x.len();
        let p = x.as_mut_ptr();
        let mut vmax = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i + 8 <= n {
            vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(p.add(i)));
            i += 8;
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), vmax);
        let max = lanes
            .iter()
            .chain(&x[i..])
            .copied()
            .fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            return;
        }
        let vm = _mm256_set1_ps(max);
        let mut vsum = _mm256_setzero_ps();
        i = 0;
        while i + 8 <= n {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), vm));
            _mm256_storeu_ps(p.add(i), e);
            vsum = _mm256_add_ps(vsum, e);
            i += 8;
        }
        let mut sum = hsum(vsum);
        for v in &mut x[i..] {
            *v = (*v - max).exp();
            sum += *v;
        }
        let inv = _mm256_set1_ps(1.0 / sum);
        i = 0;
        while i + 8 <= n {
            _mm256_storeu_ps(p.add(i), _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), inv));
            i += 8;
        }
        for v in &mut x[i..] {
            *v /= sum;
        }
    }
}

/// Scalar dot product (the portable path and the test reference).
pub(crate) fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    /// Every intrinsic must be inlined into a function compiled with its feature. One reached
    /// from a function without the `target_feature` (a trait method, a closure) is compiled as a
    /// call per instruction; that made batched decode 10× slower once, and only a symbol table
    /// shows it. This test binary is built with the kernels' optimisation level (see the
    /// workspace's dev profile), so its symbols are the release build's.
    #[test]
    fn no_intrinsic_is_called_out_of_line() {
        let exe = std::env::current_exe().expect("test binary path");
        let out = std::process::Command::new("nm")
            .arg("--demangle")
            .arg(&exe)
            .output()
            .expect("`nm` (binutils, installed with gcc) is needed to read the symbol table");
        assert!(out.status.success(), "nm failed on {}", exe.display());
        let symbols = String::from_utf8_lossy(&out.stdout);
        let out_of_line: Vec<&str> = symbols
            .lines()
            .filter(|l| l.contains("core::core_arch::x86") && l.contains("::_mm"))
            .collect();
        assert!(
            out_of_line.is_empty(),
            "intrinsics compiled as functions (a caller lacks #[target_feature]):\n{}",
            out_of_line.join("\n")
        );
    }
}
