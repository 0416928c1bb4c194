//! GPTQ (Frantar et al., 2022): quantize a row one column at a time and push each column's
//! rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the
//! layer's output error, so the output on the calibration inputs moves as little as possible.
//! Groups take their scale from the already-updated weights when the group starts, as the
//! reference implementation does without `static_groups`.

use rayon::prelude::*;

use crate::format::{pack_int, GroupParams, PackedWeight, WeightFormat};
use crate::{QuantError, Result};

/// Diagonal damping as a fraction of the mean diagonal (the reference's `percdamp`).
const DAMP: f64 = 0.01;
/// Rows quantized together, so each row of the factor is read once per block.
const ROW_BLOCK: usize = 16;

/// GPTQ-quantizes `w` (`rows × cols`) into an int `format` given the Hessian `2/n · Σ x xᵀ`.
pub fn quantize_gptq(
    format: WeightFormat,
    w: &[f32],
    rows: usize,
    cols: usize,
    hessian: &[f64],
) -> Result<PackedWeight> {
    format.check_cols(cols)?;
    let (bits, zero_point, group) = match format {
        WeightFormat::Int4 { group, zero_point } => (4, zero_point, group.min(cols)),
        WeightFormat::Int8 { group, .. } => (8, false, group.min(cols)),
        other => {
            return Err(QuantError::Shape(format!(
                "GPTQ produces int4/int8 weights, not {}",
                other.describe()
            )))
        }
    };
    if hessian.len() != cols * cols || w.len() != rows * cols {
        return Err(QuantError::Shape(format!(
            "GPTQ: {} Hessian values and {} weights for a {rows}×{cols} matrix",
            hessian.len(),
            w.len()
        )));
    }
    let mut h = hessian.to_vec();
    let mut w = w.to_vec();
    // A channel that never fired carries no information: zero its weights, keep H invertible.
    for i in 0..cols {
        if h[i * cols + i] == 0.0 {
            h[i * cols + i] = 1.0;
            for r in 0..rows {
                w[r * cols + i] = 0.0;
            }
        }
    }
    let u = inverse_cholesky_upper(h, cols)?;
    let blocks: Vec<Vec<(GroupParams, Vec<f32>)>> = w
        .par_chunks(ROW_BLOCK * cols)
        .flat_map_iter(|block| {
            let mut block = block.to_vec();
            quantize_block(&mut block, cols, &u, bits, zero_point, group)
        })
        .collect();
    let mut rows_iter = blocks.into_iter();
    pack_int(format, rows, cols, |_| rows_iter.next().unwrap_or_default())
}

/// Quantizes the rows of `block` in place of their error feedback; returns each row's groups.
fn quantize_block(
    block: &mut [f32],
    cols: usize,
    u: &[f32],
    bits: u32,
    zero_point: bool,
    group: usize,
) -> Vec<Vec<(GroupParams, Vec<f32>)>> {
    let n = block.len() / cols;
    let mut out: Vec<Vec<(GroupParams, Vec<f32>)>> = vec![Vec::new(); n];
    for i in 0..cols {
        let urow = &u[i * cols..(i + 1) * cols];
        let d = urow[i];
        for (r, groups) in out.iter_mut().enumerate() {
            let row = &mut block[r * cols..(r + 1) * cols];
            if i % group == 0 {
                let end = (i + group).min(cols);
                let params = GroupParams::fit(&row[i..end], bits, zero_point);
                groups.push((params, Vec::with_capacity(end - i)));
            }
            let Some((params, codes)) = groups.last_mut() else {
                continue;
            };
            let code = params.code(row[i]);
            codes.push(code);
            let err = (row[i] - params.value(code)) / d;
            for (v, &f) in row[i + 1..].iter_mut().zip(&urow[i + 1..]) {
                *v -= err * f;
            }
        }
    }
    out
}

/// The upper Cholesky factor `U` of `(H + damp·I)⁻¹` (`Uᵀ U = H⁻¹`), as f32, `n × n`.
///
/// With `P` the reversal permutation and `P H P = L Lᵀ`, `H⁻¹ = (P L⁻¹ P)ᵀ (P L⁻¹ P)` and
/// `P L⁻¹ P` is upper triangular: one Cholesky and one triangular inverse, no full inverse.
/// When `H` is not positive definite in floating point the damping grows tenfold, twice.
pub fn inverse_cholesky_upper(mut h: Vec<f64>, n: usize) -> Result<Vec<f32>> {
    let mean_diag = (0..n).map(|i| h[i * n + i]).sum::<f64>() / n.max(1) as f64;
    let mut damp = DAMP * mean_diag.max(f64::MIN_POSITIVE);
    for i in 0..n {
        h[i * n + i] += damp;
    }
    for _ in 0..3 {
        let mut rev = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                rev[i * n + j] = h[(n - 1 - i) * n + (n - 1 - j)];
            }
        }
        if let Some(l) = cholesky_lower(rev, n) {
            let linv = lower_inverse(&l, n);
            let mut u = vec![0f32; n * n];
            for i in 0..n {
                for j in i..n {
                    u[i * n + j] = linv[(n - 1 - i) * n + (n - 1 - j)] as f32;
                }
            }
            return Ok(u);
        }
        for i in 0..n {
            h[i * n + i] += 9.0 * damp;
        }
        damp *= 10.0;
    }
    Err(QuantError::Shape(format!(
        "GPTQ: the {n}×{n} calibration Hessian is not positive definite even with damping; \
         calibrate on more text"
    )))
}

/// Row-major lower Cholesky factor, or None when `a` is not positive definite.
fn cholesky_lower(mut a: Vec<f64>, n: usize) -> Option<Vec<f64>> {
    for j in 0..n {
        let pivot = a[j * n..j * n + j].to_vec();
        let d = a[j * n + j] - dot(&pivot, &pivot);
        if d.is_nan() || d <= 0.0 || d.is_infinite() {
            return None;
        }
        let d = d.sqrt();
        a[j * n + j] = d;
        for i in j + 1..n {
            let row_i = &mut a[i * n..(i + 1) * n];
            row_i[j] = (row_i[j] - dot(&row_i[..j], &pivot)) / d;
        }
        a[j * n + j + 1..(j + 1) * n].fill(0.0);
    }
    Some(a)
}

/// `L⁻¹` of a lower-triangular `L`, a row at a time: row i is `(e_i − Σ_{k<i} L_ik row_k) / L_ii`.
fn lower_inverse(l: &[f64], n: usize) -> Vec<f64> {
    let mut x = vec![0f64; n * n];
    for i in 0..n {
        let (done, rest) = x.split_at_mut(i * n);
        let row = &mut rest[..n];
        row[i] = 1.0;
        for k in 0..i {
            let c = l[i * n + k];
            if c != 0.0 {
                for (v, &p) in row[..=k].iter_mut().zip(&done[k * n..k * n + k + 1]) {
                    *v -= c * p;
                }
            }
        }
        let d = l[i * n + i];
        for v in &mut row[..=i] {
            *v /= d;
        }
    }
    x
}

/// A dot product with independent partial sums, so it vectorises without reassociation.
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0f64; 4];
    let (ac, bc) = (a.chunks_exact(4), b.chunks_exact(4));
    let tail: f64 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for k in 0..4 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f64>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::quantize_rtn;
    use rand::{Rng, SeedableRng};

    fn random_inputs(n: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        // Correlated channels with a few large ones, like real activations.
        (0..n)
            .flat_map(|_| {
                let common: f32 = rng.random_range(-1.0..1.0);
                (0..cols)
                    .map(|j| {
                        let big = if j % 13 == 0 { 8.0 } else { 1.0 };
                        big * (rng.random_range(-1.0..1.0) + 0.5 * common)
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn hessian(x: &[f32], cols: usize) -> Vec<f64> {
        let n = x.len() / cols;
        let mut h = vec![0f64; cols * cols];
        for row in x.chunks_exact(cols) {
            for a in 0..cols {
                for b in 0..cols {
                    h[a * cols + b] += 2.0 * (row[a] * row[b]) as f64 / n as f64;
                }
            }
        }
        h
    }

    #[test]
    fn factor_is_the_upper_cholesky_of_the_damped_inverse() {
        let n = 7;
        let x = random_inputs(40, n, 1);
        let h = hessian(&x, n);
        let u = inverse_cholesky_upper(h.clone(), n).unwrap();
        let mut damped = h;
        let damp = DAMP * (0..n).map(|i| damped[i * n + i]).sum::<f64>() / n as f64;
        for i in 0..n {
            damped[i * n + i] += damp;
        }
        // (Uᵀ U) H = I.
        for i in 0..n {
            for j in 0..n {
                let mut v = 0f64;
                for k in 0..n {
                    let utu: f64 = (0..n)
                        .map(|m| u[m * n + i] as f64 * u[m * n + k] as f64)
                        .sum();
                    v += utu * damped[k * n + j];
                }
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((v - want).abs() < 1e-4, "({i},{j}) = {v}");
                if j < i {
                    assert_eq!(u[i * n + j], 0.0);
                }
            }
        }
    }

    #[test]
    fn gptq_lowers_output_error_against_round_to_nearest() {
        let (rows, cols) = (24, 64);
        let x = random_inputs(256, cols, 2);
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let w: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let h = hessian(&x, cols);
        let output_error = |q: &[f32]| -> f64 {
            x.chunks_exact(cols)
                .map(|row| {
                    (0..rows)
                        .map(|r| {
                            let d: f32 = (0..cols)
                                .map(|c| row[c] * (w[r * cols + c] - q[r * cols + c]))
                                .sum();
                            (d as f64).powi(2)
                        })
                        .sum::<f64>()
                })
                .sum()
        };
        for format in [
            WeightFormat::Int4 {
                group: 32,
                zero_point: true,
            },
            WeightFormat::Int4 {
                group: 64,
                zero_point: false,
            },
            WeightFormat::Int8 {
                group: cols,
                zero_point: false,
            },
        ] {
            let g = quantize_gptq(format, &w, rows, cols, &h).unwrap();
            let r = quantize_rtn(format, &w, rows, cols).unwrap();
            assert_eq!(
                (g.codes.len(), g.scales.len()),
                (r.codes.len(), r.scales.len())
            );
            let (eg, er) = (
                output_error(&g.dequantize().unwrap()),
                output_error(&r.dequantize().unwrap()),
            );
            assert!(eg < 0.8 * er, "{format:?}: GPTQ {eg} vs RTN {er}");
        }
        let bad = quantize_gptq(WeightFormat::Fp8, &w, rows, cols, &h);
        assert!(bad.is_err());
        assert!(quantize_gptq(WeightFormat::W8A8, &w, rows, cols, &h[1..]).is_err());
    }
}
