//! Per-input-channel activation scaling: a linear layer computes `(x ∘ s⁻¹) · (W ∘ s)ᵀ`, the
//! same product, but the quantized matrix is `W ∘ s` and the runtime multiplies `s⁻¹` into the
//! activations (`pre_quant_scale`). AWQ picks `s` to protect the weights of large activation
//! channels; SmoothQuant picks it to move activation outliers into the weights.

use trtllm_kernels::cpu::{self, MatRef, WeightData, E4M3_MAX};

use crate::calib::ActStats;
use crate::codec::fp8_qdq;
use crate::format::{quantize_rtn, WeightFormat};
use crate::quantize::QuantizedLinear;
use crate::{QuantError, Result};

/// Candidate strengths α = i / GRID, i < GRID (AWQ's `n_grid`).
const GRID: usize = 20;

/// AWQ's activation-aware scale search: for each α, `s = mean|x|^α` (normalised to a geometric
/// mean range of 1), quantize `W ∘ s` to nearest and measure the output error on the sampled
/// calibration rows; keep the best. α = 0 is plain round-to-nearest, so the search never does
/// worse than it on the samples. With `fp8_activations` the candidates' activations go through
/// FP8 with their static scale, as they will at run time.
pub fn search_scales(
    format: WeightFormat,
    w: &[f32],
    [rows, cols]: [usize; 2],
    stats: &ActStats,
    fp8_activations: bool,
) -> Result<QuantizedLinear> {
    check_stats(stats, cols)?;
    let n = stats.sample_rows();
    if n == 0 {
        return Err(QuantError::Shape(
            "activation-aware scaling needs sampled calibration rows".into(),
        ));
    }
    let x = stats.samples();
    let mut reference = vec![0f32; n * rows];
    cpu::linear(
        x,
        n,
        MatRef::new(WeightData::F32(w), rows, cols)?,
        None,
        &mut reference,
    )?;
    let mean = stats.mean_abs();
    let mut best: Option<(f64, QuantizedLinear)> = None;
    for i in 0..GRID {
        let s = awq_scales(&mean, i as f32 / GRID as f32);
        let candidate = scaled_linear(format, w, [rows, cols], &s, stats, fp8_activations)?;
        let err = output_error(&candidate, x, n, &reference)?;
        if best.as_ref().is_none_or(|(e, _)| err < *e) {
            best = Some((err, candidate));
        }
    }
    best.map(|(_, q)| q)
        .ok_or_else(|| QuantError::Shape("empty AWQ grid".into()))
}

/// SmoothQuant's migration: `s_j = max|X_j|^α / max|W_j|^(1−α)` with α = `smoothquant_val`.
pub fn smooth(
    format: WeightFormat,
    w: &[f32],
    [rows, cols]: [usize; 2],
    stats: &ActStats,
    alpha: f32,
) -> Result<QuantizedLinear> {
    check_stats(stats, cols)?;
    let mut wmax = vec![0f32; cols];
    for row in w.chunks_exact(cols) {
        for (m, &v) in wmax.iter_mut().zip(row) {
            *m = m.max(v.abs());
        }
    }
    let s: Vec<f32> = stats
        .absmax()
        .iter()
        .zip(&wmax)
        .map(|(&a, &m)| (a.max(1e-5).powf(alpha) / m.max(1e-5).powf(1.0 - alpha)).max(1e-5))
        .collect();
    scaled_linear(format, w, [rows, cols], &s, stats, false)
}

/// Round-to-nearest with a static FP8 activation scale from the calibration range.
pub fn fp8_static(
    format: WeightFormat,
    w: &[f32],
    [rows, cols]: [usize; 2],
    stats: &ActStats,
) -> Result<QuantizedLinear> {
    check_stats(stats, cols)?;
    scaled_linear(format, w, [rows, cols], &vec![1.0; cols], stats, true)
}

fn check_stats(stats: &ActStats, cols: usize) -> Result<()> {
    if stats.cols() == cols && stats.tokens() > 0 {
        Ok(())
    } else {
        Err(QuantError::Shape(format!(
            "calibration saw {} rows of {} inputs; the module has {cols}",
            stats.tokens(),
            stats.cols()
        )))
    }
}

/// `mean^α / sqrt(max · min)` of the powered values (all ones at α = 0).
fn awq_scales(mean: &[f32], alpha: f32) -> Vec<f32> {
    let s: Vec<f32> = mean.iter().map(|&m| m.max(1e-4).powf(alpha)).collect();
    let (lo, hi) = s
        .iter()
        .fold((f32::MAX, 0f32), |(l, h), &v| (l.min(v), h.max(v)));
    let norm = (lo * hi).sqrt();
    s.iter().map(|&v| v / norm).collect()
}

/// `W ∘ s` quantized to nearest, with `s⁻¹` as pre_quant_scale (none when `s` is all ones)
/// and, for FP8 activations, the static scale of the scaled activations' calibrated range.
fn scaled_linear(
    format: WeightFormat,
    w: &[f32],
    [rows, cols]: [usize; 2],
    s: &[f32],
    stats: &ActStats,
    fp8_activations: bool,
) -> Result<QuantizedLinear> {
    let identity = s.iter().all(|&v| v == 1.0);
    let scaled: Vec<f32> = w
        .chunks_exact(cols)
        .flat_map(|row| row.iter().zip(s).map(|(&v, &m)| v * m))
        .collect();
    let input_scale = fp8_activations.then(|| {
        let amax = stats
            .absmax()
            .iter()
            .zip(s)
            .fold(0f32, |a, (&x, &m)| a.max(x / m));
        if amax > 0.0 {
            amax / E4M3_MAX
        } else {
            1.0
        }
    });
    Ok(QuantizedLinear {
        weight: quantize_rtn(format, &scaled, rows, cols)?,
        pre_quant_scale: (!identity).then(|| s.iter().map(|&v| 1.0 / v).collect()),
        input_scale,
    })
}

/// Σ (y − reference)² over the sampled rows, computed as the runtime computes the layer.
fn output_error(q: &QuantizedLinear, x: &[f32], n: usize, reference: &[f32]) -> Result<f64> {
    let mut x = x.to_vec();
    let cols = q.weight.cols;
    if let Some(s) = &q.pre_quant_scale {
        for row in x.chunks_exact_mut(cols) {
            for (v, m) in row.iter_mut().zip(s) {
                *v *= m;
            }
        }
    }
    if let Some(s) = q.input_scale {
        fp8_qdq(&mut x, s);
    }
    let mut y = vec![0f32; reference.len()];
    let m = MatRef::new(q.weight.as_ref().view(), q.weight.rows, cols)?;
    cpu::linear(&x, n, m, None, &mut y)?;
    Ok(y.iter()
        .zip(reference)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calib::{CalibNeeds, Calibration};
    use rand::{Rng, SeedableRng};

    /// Activations with a few channels 30× larger than the rest, as LLMs have.
    fn outlier_stats(cols: usize, n: usize) -> Calibration {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let x: Vec<f32> = (0..n * cols)
            .map(|i| {
                let big = if (i % cols) % 17 == 3 { 30.0 } else { 1.0 };
                big * rng.random_range(-1.0f32..1.0)
            })
            .collect();
        let needs = CalibNeeds {
            hessian: false,
            samples: 64,
        };
        let mut cal = Calibration::new(needs, n);
        cal.observe("m", &x, n).unwrap();
        cal
    }

    fn weights(rows: usize, cols: usize) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        (0..rows * cols)
            .map(|_| rng.random_range(-0.1f32..0.1))
            .collect()
    }

    fn error_of(q: &QuantizedLinear, w: &[f32], stats: &ActStats) -> f64 {
        let (n, rows, cols) = (stats.sample_rows(), q.weight.rows, q.weight.cols);
        let mut reference = vec![0f32; n * rows];
        let m = MatRef::new(WeightData::F32(w), rows, cols).unwrap();
        cpu::linear(stats.samples(), n, m, None, &mut reference).unwrap();
        output_error(q, stats.samples(), n, &reference).unwrap()
    }

    #[test]
    fn awq_search_beats_round_to_nearest_on_outlier_channels() {
        let (rows, cols) = (48, 128);
        let cal = outlier_stats(cols, 256);
        let stats = cal.get("m").unwrap();
        let w = weights(rows, cols);
        for format in [
            WeightFormat::Int4 {
                group: 64,
                zero_point: true,
            },
            WeightFormat::Nvfp4,
        ] {
            let awq = search_scales(format, &w, [rows, cols], stats, false).unwrap();
            let rtn = QuantizedLinear {
                weight: quantize_rtn(format, &w, rows, cols).unwrap(),
                pre_quant_scale: None,
                input_scale: None,
            };
            let s = awq
                .pre_quant_scale
                .as_ref()
                .expect("a non-trivial scale wins");
            assert_eq!(s.len(), cols);
            let (ea, er) = (error_of(&awq, &w, stats), error_of(&rtn, &w, stats));
            assert!(ea < 0.9 * er, "{format:?}: AWQ {ea} vs RTN {er}");
        }
    }

    #[test]
    fn smoothquant_and_fp8_scales_follow_the_calibrated_ranges() {
        let (rows, cols) = (16, 64);
        let cal = outlier_stats(cols, 128);
        let stats = cal.get("m").unwrap();
        let w = weights(rows, cols);
        let sq = smooth(WeightFormat::W8A8, &w, [rows, cols], stats, 0.5).unwrap();
        let inv = sq.pre_quant_scale.unwrap();
        // Outlier channels are divided most.
        let (outlier, plain) = (inv[3], inv[4]);
        assert!(outlier < 0.5 * plain, "{outlier} vs {plain}");
        assert!(sq.input_scale.is_none());
        let fp8 = fp8_static(WeightFormat::Fp8, &w, [rows, cols], stats).unwrap();
        let want = stats.tensor_absmax() / E4M3_MAX;
        assert_eq!(fp8.input_scale, Some(want));
        assert!(fp8.pre_quant_scale.is_none());
        let wrong = smooth(
            WeightFormat::W8A8,
            &w[..cols * 2],
            [2, cols / 2],
            stats,
            0.5,
        );
        assert!(wrong.is_err(), "calibrated on 64 inputs, asked for 32");
    }
}
