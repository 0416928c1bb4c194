//! Rotary position embedding in the "rotate half" layout Hugging Face uses: dimension `j` pairs
//! with `j + rotary_dim/2`.

use crate::error::check_len;
use crate::Result;

pub use super::rope_scaling::RopeScaling;

/// One model's rotary embedding: which dimensions rotate, the base and its scaling.
#[derive(Clone, Debug)]
pub struct RopeTable {
    rotary_dim: usize,
    theta: f32,
    scaling: RopeScaling,
    /// The frequencies of sequences whose length does not change them.
    inv_freq: Vec<f32>,
}

impl RopeTable {
    /// `rotary_dim` is the number of leading dimensions of each head that rotate (even).
    pub fn new(rotary_dim: usize, theta: f32, scaling: &RopeScaling) -> Self {
        Self {
            rotary_dim,
            theta,
            scaling: scaling.clone(),
            inv_freq: scaling.inv_freq(rotary_dim, theta, 1),
        }
    }

    pub fn rotary_dim(&self) -> usize {
        self.rotary_dim
    }

    /// Whether a rotated key depends on the length of its sequence when it was rotated (dynamic
    /// NTK, LongRoPE): such keys cannot be shared between sequences of different lengths.
    pub fn depends_on_length(&self) -> bool {
        self.scaling.depends_on_length()
    }

    /// The frequencies of one forward step: `seqs` gives each sequence's token count in the step
    /// (in token order) and its length once they are in. Sequences whose scaling agrees share
    /// one set, so a step without length-dependent scaling carries one.
    pub fn step_freqs(&self, seqs: impl IntoIterator<Item = (usize, usize)>) -> RopeFreqs {
        let half = self.rotary_dim / 2;
        let mut keys: Vec<usize> = Vec::new();
        let mut table = Vec::new();
        let mut set_of_token = Vec::new();
        for (tokens, len) in seqs {
            let key = self.scaling.set_key(len);
            let set = match keys.iter().position(|&k| k == key) {
                Some(s) => s,
                None => {
                    match self.depends_on_length() {
                        true => {
                            table.extend(self.scaling.inv_freq(self.rotary_dim, self.theta, len))
                        }
                        false => table.extend_from_slice(&self.inv_freq),
                    }
                    keys.push(key);
                    keys.len() - 1
                }
            };
            set_of_token.extend(std::iter::repeat_n(set as u32, tokens));
        }
        RopeFreqs {
            half,
            table,
            set_of_token,
            scale: self.scaling.attention_factor(),
        }
    }
}

/// The rotary frequencies of one step's tokens: `set_of_token[t]` picks token `t`'s row of
/// `table` (`[sets × half]`); cos and sin are multiplied by `scale`.
#[derive(Clone, Debug)]
pub struct RopeFreqs {
    pub half: usize,
    pub table: Vec<f32>,
    pub set_of_token: Vec<u32>,
    pub scale: f32,
}

impl RopeFreqs {
    /// Errors unless there is one set per token, every set exists and the rotated dimensions
    /// fit in `head_dim`.
    pub fn check(&self, tokens: usize, head_dim: usize) -> Result<()> {
        check_len("rope", "frequency sets", self.set_of_token.len(), tokens)?;
        if 2 * self.half > head_dim {
            return Err(crate::KernelError::ShapeMismatch {
                op: "rope",
                what: "rotary dim (≤ head_dim)",
                expected: head_dim,
                got: 2 * self.half,
            });
        }
        let sets = self.table.len() / self.half.max(1);
        match self.set_of_token.iter().find(|&&s| s as usize >= sets) {
            Some(&bad) => Err(crate::KernelError::OutOfRange {
                op: "rope",
                what: "frequency set",
                index: bad as usize,
                limit: sets,
            }),
            None => Ok(()),
        }
    }
}

/// Rotates `x` (`[positions.len() × n_heads × head_dim]`) in place; token `t` is at
/// `positions[t]` and rotates by `freqs`' set for it.
pub fn apply_rope(
    x: &mut [f32],
    positions: &[usize],
    n_heads: usize,
    head_dim: usize,
    freqs: &RopeFreqs,
) -> Result<()> {
    check_len("rope", "x", x.len(), positions.len() * n_heads * head_dim)?;
    freqs.check(positions.len(), head_dim)?;
    let half = freqs.half;
    let mut cos = vec![0f32; half];
    let mut sin = vec![0f32; half];
    let tokens = x.chunks_exact_mut(n_heads * head_dim).zip(positions);
    for ((tok, &pos), &set) in tokens.zip(&freqs.set_of_token) {
        let inv_freq = &freqs.table[set as usize * half..][..half];
        for j in 0..half {
            // The angle in f32 as transformers forms it, its sine and cosine in f64.
            let angle = pos as f32 * inv_freq[j];
            cos[j] = (angle as f64).cos() as f32 * freqs.scale;
            sin[j] = (angle as f64).sin() as f32 * freqs.scale;
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

    fn one_seq(t: &RopeTable, positions: &[usize]) -> RopeFreqs {
        t.step_freqs([(positions.len(), positions.last().map_or(0, |p| p + 1))])
    }

    #[test]
    fn rotation_preserves_norm_and_position_zero_is_identity() {
        let (nh, hd) = (3, 10);
        let orig = rand_vec(2 * nh * hd, 5);
        let mut x = orig.clone();
        let t = RopeTable::new(hd, 10000.0, &RopeScaling::None);
        apply_rope(&mut x, &[0, 17], nh, hd, &one_seq(&t, &[0, 17])).unwrap();
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
        apply_rope(&mut x, &[5], 1, hd, &one_seq(&t, &[5])).unwrap();
        for j in 0..3 {
            let f = 1.0 / 100f64.powf(2.0 * j as f64 / 6.0);
            let (c, s) = ((5.0 * f).cos(), (5.0 * f).sin());
            let a = orig[j] as f64 * c - orig[j + 3] as f64 * s;
            let b = orig[j + 3] as f64 * c + orig[j] as f64 * s;
            assert_close(&[x[j], x[j + 3]], &[a as f32, b as f32], 1e-5);
        }
    }

    #[test]
    fn each_sequence_rotates_by_its_own_length_and_the_attention_factor() {
        let s = RopeScaling::LongRope {
            short_factor: vec![1.0, 1.0, 1.0],
            long_factor: vec![2.0, 3.0, 4.0],
            original_max_position_embeddings: 8,
            attention_factor: 1.5,
        };
        let t = RopeTable::new(6, 100.0, &s);
        // A short sequence's 2 tokens, a long one's 1, another short one's 1.
        let f = t.step_freqs([(2, 5), (1, 20), (1, 3)]);
        assert_eq!(f.set_of_token, [0, 0, 1, 0]);
        assert_eq!(f.table.len(), 2 * 3);
        let x = rand_vec(6, 7);
        let mut short = x.clone();
        let mut long = x.clone();
        apply_rope(&mut short, &[3], 1, 6, &t.step_freqs([(1, 4)])).unwrap();
        apply_rope(&mut long, &[3], 1, 6, &t.step_freqs([(1, 9)])).unwrap();
        assert_ne!(short, long);
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((norm(&short) - 2.25 * norm(&x)).abs() < 1e-4);
    }
}
