//! Small element-wise kernels: residual add, softmax, embedding gather.

use super::matmul::MatRef;
use crate::error::check_len;
use crate::{KernelError, Result};

/// `x += y` (the residual connection).
pub fn add_inplace(x: &mut [f32], y: &[f32]) -> Result<()> {
    check_len("add", "y", y.len(), x.len())?;
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
    Ok(())
}

/// Numerically stable softmax of one row, in place.
pub fn softmax_inplace(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::simd::simd_available() {
        // SAFETY: the features were detected at run time.
        return unsafe { super::simd::avx::softmax(x) };
    }
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return;
    }
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Rows `ids` of `table` widened to f32, one after another in `out`.
/// An id outside the table is an error, not an out-of-bounds read.
pub fn embedding_gather(table: MatRef<'_>, ids: &[u32], out: &mut [f32]) -> Result<()> {
    let dim = table.cols();
    check_len("embedding", "out", out.len(), ids.len() * dim)?;
    for (&id, row) in ids.iter().zip(out.chunks_exact_mut(dim.max(1))) {
        if id as usize >= table.rows() {
            return Err(KernelError::OutOfRange {
                op: "embedding",
                what: "token id",
                index: id as usize,
                limit: table.rows(),
            });
        }
        table.row_to_f32(id as usize, row);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::{assert_close, every_path, rand_vec};
    use crate::cpu::WeightData;

    #[test]
    fn softmax_sums_to_one_and_handles_masked_rows() {
        every_path(|| {
            let mut x = [1.0f32, 2.0, 3.0, f32::NEG_INFINITY, 0.5];
            softmax_inplace(&mut x);
            assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
            assert_eq!(x[3], 0.0);
            let e: Vec<f64> = [1.0f64, 2.0, 3.0, 0.5].iter().map(|v| v.exp()).collect();
            let s: f64 = e.iter().sum();
            assert_close(&[x[2]], &[(e[2] / s) as f32], 1e-6);
        });
    }

    #[test]
    fn softmax_matches_f64_reference_on_long_rows() {
        for n in [1usize, 7, 8, 9, 61, 300] {
            let x: Vec<f32> = rand_vec(n, n as u64).iter().map(|v| v * 30.0).collect();
            let m = x.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let e: Vec<f64> = x.iter().map(|&v| (v as f64 - m).exp()).collect();
            let s: f64 = e.iter().sum();
            let expect: Vec<f32> = e.iter().map(|v| (v / s) as f32).collect();
            every_path(|| {
                let mut y = x.clone();
                softmax_inplace(&mut y);
                assert_close(&y, &expect, 1e-6);
            });
        }
    }

    #[test]
    fn gather_widens_bf16_and_rejects_bad_ids() {
        let table: Vec<u16> = (0..6)
            .map(|i| half::bf16::from_f32(i as f32).to_bits())
            .collect();
        let m = MatRef::new(WeightData::Bf16(&table), 3, 2).unwrap();
        let mut out = vec![0f32; 4];
        embedding_gather(m, &[2, 0], &mut out).unwrap();
        assert_eq!(out, [4.0, 5.0, 0.0, 1.0]);
        assert!(embedding_gather(m, &[3, 0], &mut out).is_err());
    }
}
