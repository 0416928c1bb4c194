//! 16-bit floats (bf16, f16 bit patterns) widened to f32 a vector at a time: how a bf16 or f16
//! KV cache is read. Scalar widening cost more than the bandwidth a 16-bit cache saves.

/// A 16-bit float format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Half {
    Bf16,
    F16,
}

/// `dst[i] = src[i]` widened; the lengths must match.
pub(crate) fn widen(format: Half, src: &[u16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "widen: lengths differ");
    #[cfg(target_arch = "x86_64")]
    {
        use super::simd::Isa;
        let isa = super::simd::isa();
        if isa >= Isa::Avx2 {
            // SAFETY: `isa` is at most what was detected at run time; the lengths match.
            return unsafe { simd::widen(isa, format, src, dst) };
        }
    }
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = one(format, s);
    }
}

fn one(format: Half, bits: u16) -> f32 {
    match format {
        Half::Bf16 => f32::from_bits((bits as u32) << 16),
        Half::F16 => half::f16::from_bits(bits).to_f32(),
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::super::lanes::{Avx2, Avx512, Lanes};
    use super::super::simd::Isa;
    use super::Half;

    /// # Safety
    /// `isa` is AVX2 or better and available; `src` and `dst` have the same length.
    pub(super) unsafe fn widen(isa: Isa, format: Half, src: &[u16], dst: &mut [f32]) {
        match isa {
            Isa::Avx512 => widen_avx512(format, src, dst),
            _ => widen_avx2(format, src, dst),
        }
    }

    /// # Safety
    /// The processor has the features enabled here (callers check `isa()` first), and
    /// the arguments meet the contract of the body it enters.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn widen_avx2(format: Half, src: &[u16], dst: &mut [f32]) {
        lanes::<Avx2>(format, src, dst)
    }

    /// # Safety
    /// The processor has the features enabled here (callers check `isa()` first), and
    /// the arguments meet the contract of the body it enters.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    unsafe fn widen_avx512(format: Half, src: &[u16], dst: &mut [f32]) {
        lanes::<Avx512>(format, src, dst)
    }

    #[inline(always)]
    unsafe fn lanes<L: Lanes>(format: Half, src: &[u16], dst: &mut [f32]) {
        let whole = src.len() / L::N * L::N;
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
        let mut i = 0;
        while i < whole {
            let v = match format {
                Half::Bf16 => L::load_bf16(s.add(i)),
                Half::F16 => L::load_f16(s.add(i)),
            };
            L::store(d.add(i), v);
            i += L::N;
        }
        for (d, &s) in dst[whole..].iter_mut().zip(&src[whole..]) {
            *d = super::one(format, s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::every_path;

    #[test]
    fn widening_matches_the_scalar_conversion_on_every_path() {
        // Every 16-bit pattern but the NaNs (whose payload need not survive).
        let bits: Vec<u16> = (0..=u16::MAX).collect();
        for format in [Half::Bf16, Half::F16] {
            let keep = |&&b: &&u16| !one(format, b).is_nan();
            let src: Vec<u16> = bits.iter().filter(keep).copied().collect();
            let expect: Vec<u32> = src.iter().map(|&b| one(format, b).to_bits()).collect();
            every_path(|| {
                let mut dst = vec![0f32; src.len()];
                widen(format, &src, &mut dst);
                assert!(dst.iter().map(|x| x.to_bits()).eq(expect.iter().copied()));
            });
        }
    }
}
