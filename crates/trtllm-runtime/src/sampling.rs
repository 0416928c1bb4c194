//! Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling with a
//! seedable generator so a seeded request is reproducible.

use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::{Result, RuntimeError};

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingConfig {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p`; 1 disables.
    pub top_p: f32,
    /// Seed of the generator; None draws one from the OS.
    pub seed: Option<u64>,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: None,
        }
    }
}

impl SamplingConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(RuntimeError::InvalidSampling {
                field: "temperature",
                value: self.temperature.to_string(),
                expected: "a finite number >= 0",
            });
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(RuntimeError::InvalidSampling {
                field: "top_p",
                value: self.top_p.to_string(),
                expected: "a number in (0, 1]",
            });
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }
}

pub struct Sampler {
    cfg: SamplingConfig,
    rng: StdRng,
}

impl Sampler {
    pub fn new(cfg: SamplingConfig) -> Result<Self> {
        cfg.validate()?;
        let rng = match cfg.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Ok(Self { cfg, rng })
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.cfg.is_greedy() {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.cfg.temperature;
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l * inv_t))
            .collect();
        // Descending by logit; ties keep the lower id first so results are deterministic.
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.cfg.top_k > 0 {
            cand.truncate(self.cfg.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f64> = cand
            .iter()
            .map(|&(_, l)| ((l - max) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.cfg.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    acc += p;
                    acc >= self.cfg.top_p as f64
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut r = self.rng.random::<f64>() * total;
        for (i, p) in probs.iter().enumerate() {
            r -= p;
            if r <= 0.0 {
                return cand[i].0;
            }
        }
        cand[probs.len() - 1].0
    }
}

/// Index of the largest logit; the first one on ties, as torch.argmax does.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> Sampler {
        Sampler::new(SamplingConfig {
            temperature,
            top_k,
            top_p,
            seed: Some(seed),
        })
        .unwrap()
    }

    #[test]
    fn greedy_takes_first_maximum() {
        assert_eq!(argmax(&[0.0, 3.0, 3.0, -1.0]), 1);
        assert_eq!(sampler(0.0, 0, 1.0, 0).sample(&[1.0, 2.0, 0.5]), 1);
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let logits = [0.0f32, 5.0, 4.9, -3.0, 4.8];
        let mut s = sampler(1.0, 2, 1.0, 7);
        for _ in 0..200 {
            assert!([1, 2].contains(&s.sample(&logits)));
        }
        // p(1) ≈ 0.36 with these logits, so top_p = 0.3 keeps token 1 alone.
        let mut s = sampler(1.0, 0, 0.3, 7);
        for _ in 0..50 {
            assert_eq!(s.sample(&logits), 1);
        }
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_covers_candidates() {
        let logits = [1.0f32, 1.1, 0.9, 1.05];
        let a: Vec<u32> = (0..64)
            .map({
                let mut s = sampler(1.0, 0, 1.0, 42);
                move |_| s.sample(&logits)
            })
            .collect();
        let b: Vec<u32> = (0..64)
            .map({
                let mut s = sampler(1.0, 0, 1.0, 42);
                move |_| s.sample(&logits)
            })
            .collect();
        assert_eq!(a, b);
        for t in 0..4 {
            assert!(a.contains(&t));
        }
    }

    #[test]
    fn invalid_parameters_are_rejected() {
        let bad = |t: f32, p: f32| {
            SamplingConfig {
                temperature: t,
                top_p: p,
                ..Default::default()
            }
            .validate()
            .is_err()
        };
        assert!(bad(0.5, 1.5));
        assert!(bad(0.5, 0.0));
        assert!(bad(-1.0, 1.0));
        assert!(bad(f32::NAN, 1.0));
        assert!(!bad(0.7, 0.9));
    }
}
