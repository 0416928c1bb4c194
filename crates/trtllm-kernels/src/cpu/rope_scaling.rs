//! How a model's rotary base frequencies are rescaled for long contexts: every scheme of
//! transformers' `rope_parameters`, each computed in the same precision transformers uses so that
//! positions far out stay bit-close.

use std::f64::consts::PI;

/// Serialised as the engine config stores it (`{"type": "llama3", ...}`); derived values (YaRN's
/// and LongRoPE's attention factors) are resolved by the builder and stored.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f32,
    },
    /// Llama 3.1's piecewise scaling of low and high frequencies.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
    /// Dynamic NTK: once a sequence is longer than `max_position_embeddings`, the base grows
    /// with its length (the frequencies follow each sequence's length at the step that rotates
    /// a token, as transformers and TensorRT-LLM compute them).
    Dynamic {
        factor: f32,
        max_position_embeddings: usize,
    },
    /// YaRN: interpolated low frequencies, extrapolated high ones with a linear ramp between
    /// the dimensions that turn `beta_slow` and `beta_fast` times over the original context;
    /// cos and sin scaled by `attention_factor`.
    Yarn {
        factor: f32,
        original_max_position_embeddings: usize,
        beta_fast: f32,
        beta_slow: f32,
        /// Round the ramp's ends outwards to whole dimensions (transformers' default).
        truncate: bool,
        attention_factor: f32,
    },
    /// LongRoPE (Phi-3): per-dimension divisors, `short_factor` while a sequence is within
    /// `original_max_position_embeddings` and `long_factor` past it; cos and sin scaled by
    /// `attention_factor`.
    LongRope {
        short_factor: Vec<f32>,
        long_factor: Vec<f32>,
        original_max_position_embeddings: usize,
        attention_factor: f32,
    },
}

impl RopeScaling {
    /// Whether the frequencies depend on the length of the sequence being rotated.
    pub fn depends_on_length(&self) -> bool {
        matches!(self, Self::Dynamic { .. } | Self::LongRope { .. })
    }

    /// The longest sequence a model with this scaling is meant for, given its config's
    /// `max_position_embeddings`: dynamic NTK stretches that by its factor (it is where the
    /// scaling starts); YaRN's context is its original one times the factor.
    pub fn context_len(&self, max_position_embeddings: usize) -> usize {
        match *self {
            Self::Dynamic { factor, .. } => (max_position_embeddings as f32 * factor) as usize,
            Self::Yarn {
                factor,
                original_max_position_embeddings,
                ..
            } => max_position_embeddings
                .max((original_max_position_embeddings as f32 * factor) as usize),
            _ => max_position_embeddings,
        }
    }

    /// The factor cos and sin are multiplied by.
    pub fn attention_factor(&self) -> f32 {
        match *self {
            Self::Yarn {
                attention_factor, ..
            }
            | Self::LongRope {
                attention_factor, ..
            } => attention_factor,
            _ => 1.0,
        }
    }

    /// Which frequency set a sequence of `len` tokens uses: equal keys, equal frequencies.
    pub(crate) fn set_key(&self, len: usize) -> usize {
        match *self {
            Self::Dynamic {
                max_position_embeddings,
                ..
            } => len.max(max_position_embeddings),
            Self::LongRope {
                original_max_position_embeddings,
                ..
            } => usize::from(len > original_max_position_embeddings),
            _ => 0,
        }
    }

    /// The inverse frequencies of `rotary_dim / 2` pairs for a sequence of `len` tokens.
    pub(crate) fn inv_freq(&self, rotary_dim: usize, theta: f32, len: usize) -> Vec<f32> {
        let base = || plain_inv_freq(rotary_dim, theta as f64);
        match self {
            Self::None => base(),
            Self::Linear { factor } => base().iter().map(|f| f / factor).collect(),
            Self::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = *original_max_position_embeddings as f32;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base()
                    .iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
            Self::Dynamic {
                factor,
                max_position_embeddings,
            } => {
                let max = *max_position_embeddings as f64;
                let len = (len as f64).max(max);
                let (factor, dim) = (*factor as f64, rotary_dim as f64);
                let grown =
                    theta as f64 * ((factor * len / max) - (factor - 1.0)).powf(dim / (dim - 2.0));
                plain_inv_freq(rotary_dim, grown)
            }
            Self::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                truncate,
                ..
            } => {
                let ramp = YarnRamp::new(
                    rotary_dim,
                    theta as f64,
                    *original_max_position_embeddings as f64,
                    (*beta_fast as f64, *beta_slow as f64),
                    *truncate,
                );
                plain_powers(rotary_dim, theta as f64)
                    .iter()
                    .enumerate()
                    .map(|(j, &p)| {
                        let (extrapolated, interpolated) = (1.0 / p, 1.0 / (factor * p));
                        let keep = 1.0 - ramp.at(j);
                        interpolated * (1.0 - keep) + extrapolated * keep
                    })
                    .collect()
            }
            Self::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                ..
            } => {
                let ext = if len > *original_max_position_embeddings {
                    long_factor
                } else {
                    short_factor
                };
                plain_powers(rotary_dim, theta as f64)
                    .iter()
                    .zip(ext)
                    .map(|(p, e)| 1.0 / (e * p))
                    .collect()
            }
        }
    }
}

/// `theta^(2j / dim)` in f32, as `base ** (arange(0, dim, 2).float() / dim)` gives it.
fn plain_powers(rotary_dim: usize, theta: f64) -> Vec<f32> {
    (0..rotary_dim / 2)
        .map(|j| {
            let e = (2 * j) as f32 / rotary_dim as f32;
            theta.powf(e as f64) as f32
        })
        .collect()
}

fn plain_inv_freq(rotary_dim: usize, theta: f64) -> Vec<f32> {
    plain_powers(rotary_dim, theta)
        .into_iter()
        .map(|p| 1.0 / p)
        .collect()
}

/// YaRN's blend between interpolation and extrapolation: 0 below `low`, 1 above `high`.
struct YarnRamp {
    low: f64,
    high: f64,
}

impl YarnRamp {
    fn new(dim: usize, base: f64, original: f64, (fast, slow): (f64, f64), truncate: bool) -> Self {
        let dim_f = dim as f64;
        let correction =
            |rotations: f64| dim_f * (original / (rotations * 2.0 * PI)).ln() / (2.0 * base.ln());
        let (mut low, mut high) = (correction(fast), correction(slow));
        if truncate {
            (low, high) = (low.floor(), high.ceil());
        }
        let (low, mut high) = (low.max(0.0), high.min(dim_f - 1.0));
        if low == high {
            high += 0.001; // transformers' guard against a zero-width ramp
        }
        Self { low, high }
    }

    fn at(&self, j: usize) -> f32 {
        // The ends' difference in f64, the rest in f32: as transformers' tensor arithmetic.
        ((j as f32 - self.low as f32) / (self.high - self.low) as f32).clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::assert_close;

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let s = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let plain = RopeScaling::None.inv_freq(128, 500000.0, 1);
        let scaled = s.inv_freq(128, 500000.0, 1);
        assert_eq!(plain[0], scaled[0]);
        let last = plain.len() - 1;
        assert_close(&[scaled[last]], &[plain[last] / 8.0], 1e-6);
    }

    #[test]
    fn dynamic_ntk_is_plain_within_the_context_and_grows_the_base_past_it() {
        let s = RopeScaling::Dynamic {
            factor: 2.0,
            max_position_embeddings: 100,
        };
        let plain = RopeScaling::None.inv_freq(64, 10000.0, 1);
        assert_eq!(s.inv_freq(64, 10000.0, 100), plain);
        let past = s.inv_freq(64, 10000.0, 150);
        assert_eq!(past[0], plain[0]);
        assert!(past[31] < plain[31]);
        assert_eq!(s.set_key(10), s.set_key(100));
        assert_ne!(s.set_key(100), s.set_key(101));
    }

    #[test]
    fn yarn_extrapolates_fast_dimensions_and_interpolates_slow_ones() {
        let s = RopeScaling::Yarn {
            factor: 4.0,
            original_max_position_embeddings: 4096,
            beta_fast: 32.0,
            beta_slow: 1.0,
            truncate: true,
            attention_factor: 1.0,
        };
        let plain = RopeScaling::None.inv_freq(128, 10000.0, 1);
        let yarn = s.inv_freq(128, 10000.0, 1);
        assert_eq!(yarn[0], plain[0]);
        assert_close(&[yarn[63]], &[plain[63] / 4.0], 1e-6);
    }

    #[test]
    fn longrope_switches_factors_past_the_original_context() {
        let s = RopeScaling::LongRope {
            short_factor: vec![1.0, 2.0],
            long_factor: vec![3.0, 4.0],
            original_max_position_embeddings: 8,
            attention_factor: 1.2,
        };
        let plain = RopeScaling::None.inv_freq(4, 100.0, 1);
        assert_close(&s.inv_freq(4, 100.0, 8), &[plain[0], plain[1] / 2.0], 1e-7);
        assert_close(
            &s.inv_freq(4, 100.0, 9),
            &[plain[0] / 3.0, plain[1] / 4.0],
            1e-7,
        );
        assert!(s.depends_on_length());
        assert_eq!(s.attention_factor(), 1.2);
    }
}
