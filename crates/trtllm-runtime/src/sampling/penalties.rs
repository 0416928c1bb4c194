//! Repetition, presence and frequency penalties: the logit adjustments that depend on what a
//! sequence already contains, with the semantics of transformers (repetition) and OpenAI / vLLM
//! (presence, frequency).

use std::collections::{HashMap, HashSet};

pub(crate) struct Penalties {
    repetition: f32,
    presence: f32,
    frequency: f32,
    prompt: HashSet<u32>,
    /// How often each token occurs in the output so far.
    output: HashMap<u32, u32>,
}

impl Penalties {
    /// None when every penalty is neutral, so the common case costs nothing.
    pub fn new(repetition: f32, presence: f32, frequency: f32, prompt: &[u32]) -> Option<Self> {
        if repetition == 1.0 && presence == 0.0 && frequency == 0.0 {
            return None;
        }
        Some(Self {
            repetition,
            presence,
            frequency,
            // Only the repetition penalty looks at the prompt.
            prompt: if repetition != 1.0 {
                prompt.iter().copied().collect()
            } else {
                HashSet::new()
            },
            output: HashMap::new(),
        })
    }

    pub fn record(&mut self, token: u32) {
        *self.output.entry(token).or_default() += 1;
    }

    /// Adjusts `logits` in place. The repetition penalty divides a positive logit and
    /// multiplies a negative one (so it always lowers the token), once per distinct token of
    /// prompt and output; presence and frequency subtract per output occurrence.
    pub fn apply(&self, logits: &mut [f32]) {
        let repeat = |l: &mut f32| {
            *l = if *l > 0.0 {
                *l / self.repetition
            } else {
                *l * self.repetition
            };
        };
        if self.repetition != 1.0 {
            for &t in &self.prompt {
                if let Some(l) = logits.get_mut(t as usize) {
                    repeat(l);
                }
            }
        }
        for (&t, &count) in &self.output {
            let Some(l) = logits.get_mut(t as usize) else {
                continue;
            };
            if self.repetition != 1.0 && !self.prompt.contains(&t) {
                repeat(l);
            }
            *l -= self.presence + self.frequency * count as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neutral_penalties_allocate_nothing() {
        assert!(Penalties::new(1.0, 0.0, 0.0, &[1, 2, 3]).is_none());
    }

    #[test]
    fn repetition_lowers_prompt_and_output_tokens_once_each() {
        let mut p = Penalties::new(2.0, 0.0, 0.0, &[0, 1, 1]).unwrap();
        p.record(1);
        p.record(2);
        p.record(2);
        let mut logits = [4.0, -4.0, 3.0, 5.0];
        p.apply(&mut logits);
        assert_eq!(logits, [2.0, -8.0, 1.5, 5.0]);
    }

    #[test]
    fn presence_once_frequency_per_occurrence_output_only() {
        let mut p = Penalties::new(1.0, 0.5, 0.25, &[3]).unwrap();
        p.record(0);
        p.record(0);
        p.record(0);
        p.record(1);
        let mut logits = [1.0, 1.0, 1.0, 1.0];
        p.apply(&mut logits);
        assert_eq!(logits, [1.0 - 0.5 - 0.75, 1.0 - 0.5 - 0.25, 1.0, 1.0]);
    }
}
