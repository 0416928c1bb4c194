//! Rotary position embedding in the "rotate half" layout Hugging Face uses: dimension `j` pairs
//! with `j + rotary_dim/2`.

use crate::error::check_len;
use crate::Result;

/// How the base frequencies are rescaled for long contexts. Serialised as the engine config
/// stores it (`{"type": "llama3", ...}`).
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
}

/// The inverse frequencies of one model's rotary embedding.
#[derive(Clone, Debug)]
pub struct RopeTable {
    inv_freq: Vec<f32>,
}

impl RopeTable {
    /// `rotary_dim` is the number of leading dimensions of each head that rotate (even).
    pub fn new(rotary_dim: usize, theta: f32, scaling: &RopeScaling) -> Self {
        // Computed in f32 the way transformers does, so positions far out stay bit-close.
        let base: Vec<f32> = (0..rotary_dim / 2)
            .map(|j| {
                let e = (2 * j) as f32 / rotary_dim as f32;
                1.0 / ((theta as f64).powf(e as f64) as f32)
            })
            .collect();
        let inv_freq = match *scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = original_max_position_embeddings as f32;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
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
        };
        Self { inv_freq }
    }

    pub fn rotary_dim(&self) -> usize {
        self.inv_freq.len() * 2
    }

    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }
}

/// Rotates `x` (`[positions.len() × n_heads × head_dim]`) in place; token `t` is at `positions[t]`.
pub fn apply_rope(
    x: &mut [f32],
    positions: &[usize],
    n_heads: usize,
    head_dim: usize,
    table: &RopeTable,
) -> Result<()> {
    check_len("rope", "x", x.len(), positions.len() * n_heads * head_dim)?;
    let half = table.inv_freq.len();
    if 2 * half > head_dim {
        return Err(crate::KernelError::ShapeMismatch {
            op: "rope",
            what: "rotary dim (≤ head_dim)",
            expected: head_dim,
            got: 2 * half,
        });
    }
    let mut cos = vec![0f32; half];
    let mut sin = vec![0f32; half];
    for (tok, &pos) in x.chunks_exact_mut(n_heads * head_dim).zip(positions) {
        for j in 0..half {
            let angle = pos as f32 * table.inv_freq[j];
            cos[j] = (angle as f64).cos() as f32;
            sin[j] = (angle as f64).sin() as f32;
        }
        for head in tok.chunks_exact_mut(head_dim) {
            for j in 0..half {
                let (a, b) = (head[j], head[j + half]);
                head[j] = a * cos[j] - b * sin[j];
                head[j + half] = b * cos[j] + a * sin[j];
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::{assert_close, rand_vec};

    #[test]
    fn rotation_preserves_norm_and_position_zero_is_identity() {
        let (nh, hd) = (3, 10);
        let orig = rand_vec(2 * nh * hd, 5);
        let mut x = orig.clone();
        let t = RopeTable::new(hd, 10000.0, &RopeScaling::None);
        apply_rope(&mut x, &[0, 17], nh, hd, &t).unwrap();
        assert_close(&x[..nh * hd], &orig[..nh * hd], 1e-7);
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        for h in 0..nh {
            let r = nh * hd + h * hd..nh * hd + (h + 1) * hd;
            assert!((norm(&x[r.clone()]) - norm(&orig[r])).abs() < 1e-4);
        }
    }

    #[test]
    fn rotation_matches_explicit_pairing() {
        let hd = 6;
        let mut x = rand_vec(hd, 6);
        let orig = x.clone();
        let t = RopeTable::new(hd, 100.0, &RopeScaling::None);
        apply_rope(&mut x, &[5], 1, hd, &t).unwrap();
        for j in 0..3 {
            let f = 1.0 / 100f64.powf(2.0 * j as f64 / 6.0);
            let (c, s) = ((5.0 * f).cos(), (5.0 * f).sin());
            let a = orig[j] as f64 * c - orig[j + 3] as f64 * s;
            let b = orig[j + 3] as f64 * c + orig[j] as f64 * s;
            assert_close(&[x[j], x[j + 3]], &[a as f32, b as f32], 1e-5);
        }
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let s = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let plain = RopeTable::new(128, 500000.0, &RopeScaling::None);
        let scaled = RopeTable::new(128, 500000.0, &s);
        assert_eq!(plain.inv_freq()[0], scaled.inv_freq()[0]);
        let last = plain.inv_freq().len() - 1;
        assert_close(
            &[scaled.inv_freq()[last]],
            &[plain.inv_freq()[last] / 8.0],
            1e-6,
        );
    }
}
