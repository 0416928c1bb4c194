//! Calibration statistics: what AWQ, GPTQ, SmoothQuant and FP8 need to know about the inputs of
//! each linear module, collected while the float model runs over calibration text. The runtime
//! feeds [`Calibration::observe`]; the algorithms read [`ActStats`].

use std::collections::BTreeMap;

use trtllm_kernels::cpu::{self, MatRef, WeightData};

use crate::config::{LayerQuantConfig, QuantAlgo, QuantConfig};
use crate::{QuantError, Result};

/// Input rows kept per module for the scale searches: enough to rank candidate scales,
/// few enough that a search over 20 candidates stays cheap.
pub const SAMPLE_ROWS: usize = 128;

/// Which statistics a quantization config needs beyond per-channel ranges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CalibNeeds {
    /// Σ x xᵀ per module (GPTQ).
    pub hessian: bool,
    /// Input rows to evaluate candidate scales on (AWQ-style searches).
    pub samples: usize,
}

impl CalibNeeds {
    fn of_config(c: &QuantConfig) -> Self {
        let search = match c.quant_algo {
            QuantAlgo::W4A16Awq => true,
            QuantAlgo::Fp8 | QuantAlgo::Nvfp4 => c.pre_quant_scale,
            _ => false,
        };
        Self {
            hessian: matches!(c.quant_algo, QuantAlgo::W4A16Gptq | QuantAlgo::W8A16Gptq),
            samples: if search { SAMPLE_ROWS } else { 0 },
        }
    }

    /// The union of what every layer's config needs.
    pub fn of(c: &LayerQuantConfig) -> Self {
        std::iter::once(&c.base)
            .chain(c.quantized_layers.values())
            .map(Self::of_config)
            .fold(Self::default(), |a, b| Self {
                hessian: a.hessian || b.hessian,
                samples: a.samples.max(b.samples),
            })
    }
}

/// Statistics of one module's input activations.
#[derive(Clone, Debug)]
pub struct ActStats {
    cols: usize,
    tokens: usize,
    absmax: Vec<f32>,
    sum_abs: Vec<f64>,
    samples: Vec<f32>,
    /// Σ x xᵀ, `cols × cols`.
    xtx: Option<Vec<f32>>,
}

impl ActStats {
    fn new(cols: usize, needs: CalibNeeds) -> Self {
        Self {
            cols,
            tokens: 0,
            absmax: vec![0.0; cols],
            sum_abs: vec![0.0; cols],
            samples: Vec::with_capacity(needs.samples * cols),
            xtx: needs.hessian.then(|| vec![0.0; cols * cols]),
        }
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Rows observed.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// max |x_j| per input channel.
    pub fn absmax(&self) -> &[f32] {
        &self.absmax
    }

    /// max |x| over the whole tensor.
    pub fn tensor_absmax(&self) -> f32 {
        self.absmax.iter().fold(0f32, |a, &b| a.max(b))
    }

    /// mean |x_j| per input channel.
    pub fn mean_abs(&self) -> Vec<f32> {
        let n = self.tokens.max(1) as f64;
        self.sum_abs.iter().map(|&s| (s / n) as f32).collect()
    }

    /// Sampled input rows, `sample_rows() × cols`.
    pub fn samples(&self) -> &[f32] {
        &self.samples
    }

    pub fn sample_rows(&self) -> usize {
        self.samples.len() / self.cols.max(1)
    }

    /// GPTQ's Hessian of the layer's squared output error, `2/n · Σ x xᵀ` (f64, `cols × cols`).
    pub fn hessian(&self) -> Option<Vec<f64>> {
        let scale = 2.0 / self.tokens.max(1) as f64;
        self.xtx
            .as_ref()
            .map(|h| h.iter().map(|&v| v as f64 * scale).collect())
    }

    fn observe(&mut self, x: &[f32], rows: usize, stride: usize, budget: usize) -> Result<()> {
        let cols = self.cols;
        for (i, row) in x.chunks_exact(cols).enumerate() {
            for ((m, s), &v) in self.absmax.iter_mut().zip(&mut self.sum_abs).zip(row) {
                *m = m.max(v.abs());
                *s += v.abs() as f64;
            }
            let seen = self.tokens + i;
            if seen.is_multiple_of(stride) && self.samples.len() < budget * cols {
                self.samples.extend_from_slice(row);
            }
        }
        if let Some(xtx) = &mut self.xtx {
            // Σ x xᵀ = Xᵀ X: the rows of Xᵀ multiplied by themselves, through the GEMM kernel.
            let mut xt = vec![0f32; rows * cols];
            for (r, row) in x.chunks_exact(cols).enumerate() {
                for (c, &v) in row.iter().enumerate() {
                    xt[c * rows + r] = v;
                }
            }
            let mut chunk = vec![0f32; cols * cols];
            let m = MatRef::new(WeightData::F32(&xt), cols, rows)?;
            cpu::linear(&xt, cols, m, None, &mut chunk)?;
            for (a, b) in xtx.iter_mut().zip(&chunk) {
                *a += b;
            }
        }
        self.tokens += rows;
        Ok(())
    }
}

/// Statistics of every observed module, by module name.
#[derive(Clone, Debug)]
pub struct Calibration {
    needs: CalibNeeds,
    /// Every `stride`-th row is sampled, so samples spread over the whole text.
    stride: usize,
    modules: BTreeMap<String, ActStats>,
}

impl Calibration {
    /// Ready to observe about `total_tokens` rows per module.
    pub fn new(needs: CalibNeeds, total_tokens: usize) -> Self {
        let stride = match needs.samples {
            0 => usize::MAX,
            s => (total_tokens / s).max(1),
        };
        Self {
            needs,
            stride,
            modules: BTreeMap::new(),
        }
    }

    /// Records `rows` input rows of module `name` (`x` is `rows × cols`).
    pub fn observe(&mut self, name: &str, x: &[f32], rows: usize) -> Result<()> {
        if rows == 0 || !x.len().is_multiple_of(rows) {
            return Err(QuantError::Shape(format!(
                "calibration of {name}: {} values are not {rows} rows",
                x.len()
            )));
        }
        let cols = x.len() / rows;
        let needs = self.needs;
        let stats = self
            .modules
            .entry(name.to_string())
            .or_insert_with(|| ActStats::new(cols, needs));
        if stats.cols != cols {
            return Err(QuantError::Shape(format!(
                "calibration of {name}: rows of {cols} values after rows of {}",
                stats.cols
            )));
        }
        stats.observe(x, rows, self.stride, self.needs.samples)
    }

    pub fn get(&self, name: &str) -> Option<&ActStats> {
        self.modules.get(name)
    }

    pub fn modules(&self) -> impl Iterator<Item = &str> {
        self.modules.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_match_a_direct_computation() {
        let needs = CalibNeeds {
            hessian: true,
            samples: 3,
        };
        let mut cal = Calibration::new(needs, 6);
        let x: Vec<f32> = (0..6 * 4).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
        cal.observe("m", &x[..8], 2).unwrap();
        cal.observe("m", &x[8..], 4).unwrap();
        let s = cal.get("m").unwrap();
        assert_eq!((s.tokens(), s.cols()), (6, 4));
        for j in 0..4 {
            let col: Vec<f32> = x.chunks(4).map(|r| r[j]).collect();
            let amax = col.iter().fold(0f32, |a, v| a.max(v.abs()));
            let mean = col.iter().map(|v| v.abs()).sum::<f32>() / 6.0;
            assert_eq!(s.absmax()[j], amax);
            assert!((s.mean_abs()[j] - mean).abs() < 1e-6);
        }
        // Rows 0, 2, 4 are sampled (stride 2), across the two observations.
        assert_eq!(s.sample_rows(), 3);
        assert_eq!(&s.samples()[4..8], &x[8..12]);
        let h = s.hessian().unwrap();
        for a in 0..4 {
            for b in 0..4 {
                let want: f64 = x.chunks(4).map(|r| (r[a] * r[b]) as f64).sum::<f64>() / 3.0;
                assert!((h[a * 4 + b] - want).abs() < 1e-4, "{a},{b}");
            }
        }
        assert!(cal.observe("m", &x[..6], 2).is_err(), "3 columns after 4");
        assert!(cal.observe("m", &x[..7], 2).is_err(), "ragged rows");
    }
}
