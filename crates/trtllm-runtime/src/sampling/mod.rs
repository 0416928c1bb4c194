//! Choosing the next token from logits: penalties, then greedy or temperature / top-k / top-p /
//! min-p sampling with a seedable generator so a seeded request is reproducible; optionally the
//! log-probabilities of the model's distribution.

mod draw;
mod logprobs;
mod penalties;

use std::borrow::Cow;

use rand::{rngs::StdRng, Rng, SeedableRng};

use draw::Truncation;
#[cfg(test)]
use logprobs::log_sum_exp;
pub use logprobs::{token_logprobs, TokenLogprobs, MAX_LOGPROBS};
use penalties::Penalties;

use crate::{Result, RuntimeError};

/// The lowest temperature that samples; below it decoding is greedy (vLLM's threshold).
pub const MIN_TEMPERATURE: f32 = 1e-5;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingConfig {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p`; 1 disables.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the most likely one; 0 disables.
    pub min_p: f32,
    /// Seed of the generator; None draws one from the OS.
    pub seed: Option<u64>,
    /// Lowers every token already in the prompt or output (transformers' semantics); 1 disables.
    pub repetition_penalty: f32,
    /// Subtracted once from every token already in the output; 0 disables.
    pub presence_penalty: f32,
    /// Subtracted per occurrence in the output; 0 disables.
    pub frequency_penalty: f32,
    /// Return log-probabilities: None returns none, Some(k) the sampled token's and the top k.
    pub logprobs: Option<usize>,
    /// Added to a token's logit before sampling (OpenAI's `logit_bias`: −100 bans a token, +100
    /// all but forces it); each in [−100, 100].
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: None,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logprobs: None,
            logit_bias: Vec::new(),
        }
    }
}

fn invalid(field: &'static str, value: impl ToString, expected: &'static str) -> RuntimeError {
    RuntimeError::InvalidSampling {
        field,
        value: value.to_string(),
        expected,
    }
}

impl SamplingConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(invalid(
                "temperature",
                self.temperature,
                "a finite number >= 0",
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(invalid("top_p", self.top_p, "a number in (0, 1]"));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(invalid("min_p", self.min_p, "a number in [0, 1]"));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(invalid(
                "repetition_penalty",
                self.repetition_penalty,
                "a finite number > 0",
            ));
        }
        for (field, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(invalid(field, v, "a number in [-2, 2]"));
            }
        }
        if let Some(k) = self.logprobs.filter(|&k| k > MAX_LOGPROBS) {
            return Err(invalid("logprobs", k, "at most 20"));
        }
        if let Some((_, b)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(-100.0..=100.0).contains(b))
        {
            return Err(invalid("logit_bias", b, "values in [-100, 100]"));
        }
        Ok(())
    }

    /// Temperatures below [`MIN_TEMPERATURE`] are greedy: dividing logits by them overflows
    /// (1e-40 turned every logit infinite and drew the least likely token).
    pub fn is_greedy(&self) -> bool {
        self.temperature < MIN_TEMPERATURE || self.top_k == 1
    }
}

/// A token the sampler chose, with its log-probabilities when they were asked for.
#[derive(Clone, Debug, PartialEq)]
pub struct SampledToken {
    pub id: u32,
    pub logprobs: Option<TokenLogprobs>,
}

pub struct Sampler {
    cfg: SamplingConfig,
    rng: StdRng,
    penalties: Option<Penalties>,
}

impl Sampler {
    /// A sampler for a sequence that starts with `prompt` (the repetition penalty's context).
    pub fn new(cfg: SamplingConfig, prompt: &[u32]) -> Result<Self> {
        cfg.validate()?;
        let rng = match cfg.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        let penalties = Penalties::new(
            cfg.repetition_penalty,
            cfg.presence_penalty,
            cfg.frequency_penalty,
            prompt,
        );
        Ok(Self {
            cfg,
            rng,
            penalties,
        })
    }

    /// Chooses the next token; `banned` tokens (e.g. end-of-sequence before `min_tokens`) are
    /// never chosen.
    pub fn sample(&mut self, logits: &[f32], banned: &[u32]) -> SampledToken {
        let bias = &self.cfg.logit_bias;
        let adjusted: Cow<[f32]> =
            if self.penalties.is_some() || !banned.is_empty() || !bias.is_empty() {
                let mut l = logits.to_vec();
                if let Some(p) = &self.penalties {
                    p.apply(&mut l);
                }
                for &(t, b) in bias {
                    if let Some(x) = l.get_mut(t as usize) {
                        *x += b;
                    }
                }
                for &t in banned {
                    if let Some(x) = l.get_mut(t as usize) {
                        *x = f32::NEG_INFINITY;
                    }
                }
                Cow::Owned(l)
            } else {
                Cow::Borrowed(logits)
            };
        let id = if self.cfg.is_greedy() {
            argmax(&adjusted)
        } else {
            self.draw(&adjusted)
        };
        if let Some(p) = &mut self.penalties {
            p.record(id);
        }
        SampledToken {
            id,
            logprobs: self.cfg.logprobs.map(|k| token_logprobs(logits, id, k)),
        }
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        let truncation = Truncation {
            top_k: self.cfg.top_k,
            top_p: self.cfg.top_p,
            min_p: self.cfg.min_p,
        };
        let u = self.rng.random::<f64>();
        draw::draw(logits, self.cfg.temperature, &truncation, u).unwrap_or_else(|| argmax(logits))
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
        Sampler::new(
            SamplingConfig {
                temperature,
                top_k,
                top_p,
                seed: Some(seed),
                ..Default::default()
            },
            &[],
        )
        .unwrap()
    }

    fn draw(s: &mut Sampler, logits: &[f32]) -> u32 {
        s.sample(logits, &[]).id
    }

    #[test]
    fn greedy_takes_first_maximum() {
        assert_eq!(argmax(&[0.0, 3.0, 3.0, -1.0]), 1);
        assert_eq!(draw(&mut sampler(0.0, 0, 1.0, 0), &[1.0, 2.0, 0.5]), 1);
        // A vanishing temperature is greedy, never an overflow that draws anything.
        let logits: Vec<f32> = (0..1000).map(|i| (i % 17) as f32 * 0.1).collect();
        for seed in 0..20 {
            assert_eq!(draw(&mut sampler(1e-40, 0, 1.0, seed), &logits), 16);
            assert_eq!(draw(&mut sampler(1e-6, 0, 1.0, seed), &logits), 16);
        }
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let logits = [0.0f32, 5.0, 4.9, -3.0, 4.8];
        let mut s = sampler(1.0, 2, 1.0, 7);
        for _ in 0..200 {
            assert!([1, 2].contains(&draw(&mut s, &logits)));
        }
        // p(1) ≈ 0.36 with these logits, so top_p = 0.3 keeps token 1 alone.
        let mut s = sampler(1.0, 0, 0.3, 7);
        for _ in 0..50 {
            assert_eq!(draw(&mut s, &logits), 1);
        }
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_covers_candidates() {
        let logits = [1.0f32, 1.1, 0.9, 1.05];
        let a: Vec<u32> = (0..64)
            .map({
                let mut s = sampler(1.0, 0, 1.0, 42);
                move |_| draw(&mut s, &logits)
            })
            .collect();
        let b: Vec<u32> = (0..64)
            .map({
                let mut s = sampler(1.0, 0, 1.0, 42);
                move |_| draw(&mut s, &logits)
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
        let field = |c: SamplingConfig| match c.validate() {
            Err(RuntimeError::InvalidSampling { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        let d = SamplingConfig::default;
        assert_eq!(field(SamplingConfig { min_p: 1.5, ..d() }), "min_p");
        assert_eq!(
            field(SamplingConfig {
                repetition_penalty: 0.0,
                ..d()
            }),
            "repetition_penalty"
        );
        assert_eq!(
            field(SamplingConfig {
                presence_penalty: 2.5,
                ..d()
            }),
            "presence_penalty"
        );
        assert_eq!(
            field(SamplingConfig {
                frequency_penalty: -3.0,
                ..d()
            }),
            "frequency_penalty"
        );
        assert_eq!(
            field(SamplingConfig {
                logprobs: Some(21),
                ..d()
            }),
            "logprobs"
        );
    }

    #[test]
    fn min_p_keeps_tokens_near_the_most_likely() {
        // p ∝ e^0, e^-0.1, e^-5: min_p 0.5 keeps the first two only.
        let logits = [0.0f32, -0.1, -5.0];
        let mut s = sampler(1.0, 0, 1.0, 3);
        s.cfg.min_p = 0.5;
        let seen: std::collections::HashSet<u32> =
            (0..300).map(|_| draw(&mut s, &logits)).collect();
        assert_eq!(seen, [0, 1].into_iter().collect());
    }

    #[test]
    fn banned_tokens_are_never_chosen_greedy_or_sampled() {
        let logits = [0.0f32, 9.0, 1.0];
        assert_eq!(sampler(0.0, 0, 1.0, 0).sample(&logits, &[1]).id, 2);
        let mut s = sampler(1.0, 0, 1.0, 5);
        for _ in 0..100 {
            assert_ne!(s.sample(&logits, &[1]).id, 1);
        }
    }

    #[test]
    fn logit_bias_forces_or_bans_a_token_and_is_range_checked() {
        let logits = [0.0f32, 9.0, 1.0, 2.0];
        let with = |bias: Vec<(u32, f32)>, t: f32| {
            let cfg = SamplingConfig {
                temperature: t,
                seed: Some(7),
                logit_bias: bias,
                ..Default::default()
            };
            Sampler::new(cfg, &[]).unwrap()
        };
        let mut forced = with(vec![(0, 100.0)], 1.0);
        assert!((0..100).all(|_| forced.sample(&logits, &[]).id == 0));
        assert_eq!(with(vec![(1, -100.0)], 0.0).sample(&logits, &[]).id, 3);
        let cfg = SamplingConfig {
            logit_bias: vec![(0, 150.0)],
            ..Default::default()
        };
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn penalties_steer_greedy_and_logprobs_stay_raw() {
        let cfg = SamplingConfig {
            frequency_penalty: 2.0,
            logprobs: Some(1),
            ..Default::default()
        };
        let mut s = Sampler::new(cfg, &[]).unwrap();
        let logits = [3.0f32, 2.0];
        let first = s.sample(&logits, &[]);
        assert_eq!(first.id, 0);
        // Token 0 now costs 2: greedy switches to token 1, whose raw log-probability is reported.
        let second = s.sample(&logits, &[]);
        assert_eq!(second.id, 1);
        let lp = second.logprobs.unwrap();
        assert!((lp.logprob - (2.0 - log_sum_exp(&logits)) as f32).abs() < 1e-6);
        assert_eq!(lp.top[0].0, 0);
    }
}
