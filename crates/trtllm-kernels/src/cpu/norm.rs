//! RMSNorm and LayerNorm over the rows of a `[rows × dim]` matrix, in place.
//! Statistics accumulate in f64 like a careful reference would, so long rows do not drift.

use crate::error::check_len;
use crate::Result;

/// `x = x / sqrt(mean(x²) + eps) * weight` for each row.
pub fn rms_norm(x: &mut [f32], weight: &[f32], eps: f32) -> Result<()> {
    let dim = weight.len();
    check_len("rms_norm", "x", x.len() % dim.max(1), 0)?;
    for row in x.chunks_exact_mut(dim) {
        let ms = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / dim as f64;
        let inv = (1.0 / (ms + eps as f64).sqrt()) as f32;
        for (v, &w) in row.iter_mut().zip(weight) {
            *v = w * (*v * inv);
        }
    }
    Ok(())
}

/// `x = (x - mean) / sqrt(var + eps) * weight + bias` for each row.
pub fn layer_norm(x: &mut [f32], weight: &[f32], bias: &[f32], eps: f32) -> Result<()> {
    let dim = weight.len();
    check_len("layer_norm", "bias", bias.len(), dim)?;
    check_len("layer_norm", "x", x.len() % dim.max(1), 0)?;
    for row in x.chunks_exact_mut(dim) {
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / dim as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / dim as f64;
        let inv = 1.0 / (var + eps as f64).sqrt();
        for ((v, &w), &b) in row.iter_mut().zip(weight).zip(bias) {
            *v = ((*v as f64 - mean) * inv) as f32 * w + b;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::{assert_close, rand_vec};

    #[test]
    fn rms_norm_matches_definition() {
        let dim = 37;
        let mut x = rand_vec(3 * dim, 1);
        let w = rand_vec(dim, 2);
        let expect: Vec<f32> = x
            .chunks(dim)
            .flat_map(|r| {
                let ms: f32 = r.iter().map(|v| v * v).sum::<f32>() / dim as f32;
                r.iter()
                    .zip(&w)
                    .map(move |(v, w)| v / (ms + 1e-5).sqrt() * w)
                    .collect::<Vec<_>>()
            })
            .collect();
        rms_norm(&mut x, &w, 1e-5).unwrap();
        assert_close(&x, &expect, 1e-5);
    }

    #[test]
    fn layer_norm_gives_zero_mean_unit_variance() {
        let dim = 29;
        let mut x = rand_vec(2 * dim, 3);
        layer_norm(&mut x, &vec![1.0; dim], &vec![0.0; dim], 0.0).unwrap();
        for r in x.chunks(dim) {
            let mean: f32 = r.iter().sum::<f32>() / dim as f32;
            let var: f32 = r.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / dim as f32;
            assert!(mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-4);
        }
    }

    #[test]
    fn ragged_input_is_an_error() {
        assert!(rms_norm(&mut [0.0; 5], &[1.0; 2], 1e-5).is_err());
    }
}
