//! Beam search as transformers 5 runs it (`GenerationMixin._beam_search`), one request at a
//! time: the state a beam request carries between steps, fed each running beam's logits row and
//! answering which beam each new beam continues (so the caller can reorder or fork the KV
//! cache). The executor's beam requests drive this; it is public so any decoding loop can.
//!
//! Each step takes the best `K = max(2, 1 + n_eos) · width` continuations over all running
//! beams (cumulative log-probabilities); the best `width` that do not end (end of sequence, or
//! the length limit) run on; those among the first `width` that end compete with the finished
//! hypotheses for the `width` finished slots, scored by `sum_logprobs / new_len^length_penalty`.
//! The search stops when every slot is finished under `early_stopping = true`, when the best
//! running beam cannot beat the worst finished one (transformers' heuristic, which
//! `early_stopping` false and "never" estimate differently), or when nothing can continue.

use trtllm_builder::runtime::{Beam, EarlyStopping, NeverTag};

#[derive(Clone, Debug, PartialEq)]
pub struct BeamConfig {
    pub width: usize,
    pub length_penalty: f32,
    pub early_stopping: EarlyStopping,
    pub max_new_tokens: usize,
    pub eos: Vec<u32>,
}

/// transformers' stand-in for minus infinity in beam scores.
const NEG: f32 = -1.0e9;

pub struct BeamSearch {
    cfg: BeamConfig,
    running: Vec<Vec<u32>>,
    running_scores: Vec<f32>,
    finished: Vec<(Vec<u32>, f32, bool)>,
    heuristic_unsatisfied: bool,
    generated: usize,
    done: bool,
}

struct Candidate {
    score: f32,
    beam: usize,
    token: u32,
}

impl BeamSearch {
    pub fn new(cfg: BeamConfig) -> Self {
        let w = cfg.width.max(1);
        let mut running_scores = vec![NEG; w];
        running_scores[0] = 0.0;
        Self {
            running: vec![Vec::new(); w],
            running_scores,
            finished: vec![(Vec::new(), NEG, false); w],
            heuristic_unsatisfied: true,
            generated: 0,
            done: cfg.max_new_tokens == 0,
            cfg,
        }
    }

    /// The running beams' new tokens, whose next logits [`Self::step`] takes in this order.
    pub fn running(&self) -> &[Vec<u32>] {
        &self.running
    }

    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Advances by one token from each running beam's logits row; returns, for each new
    /// running beam, the index of the running beam it continues.
    pub fn step(&mut self, logits: &[&[f32]]) -> Vec<usize> {
        let w = self.running.len();
        assert_eq!(logits.len(), w, "one logits row per running beam");
        let k = 2.max(1 + self.cfg.eos.len()) * w;
        let top = self.top_candidates(logits, k);
        let new_len = self.generated + 1;
        let hits: Vec<bool> = top
            .iter()
            .map(|c| self.cfg.eos.contains(&c.token) || new_len >= self.cfg.max_new_tokens)
            .collect();
        // The best `width` continuations that do not end run on.
        let mut order: Vec<usize> = (0..top.len()).collect();
        let live = |i: usize| top[i].score + if hits[i] { NEG } else { 0.0 };
        order.sort_by(|&a, &b| live(b).total_cmp(&live(a)).then(a.cmp(&b)));
        let next: Vec<usize> = order.into_iter().take(w).collect();
        let with = |c: &Candidate, from: &[Vec<u32>]| {
            let mut t = from[c.beam].clone();
            t.push(c.token);
            t
        };
        self.update_finished(&top, &hits, new_len);
        let running: Vec<Vec<u32>> = next.iter().map(|&i| with(&top[i], &self.running)).collect();
        self.running_scores = next.iter().map(|&i| live(i)).collect();
        let parents = next.iter().map(|&i| top[i].beam).collect();
        self.running = running;
        self.generated = new_len;
        self.check_heuristic();
        let all_finished = self.finished.iter().all(|f| f.2);
        let open = !(all_finished && self.cfg.early_stopping == EarlyStopping::Bool(true));
        self.done = !(self.heuristic_unsatisfied && open && !hits.iter().all(|&h| h));
        parents
    }

    /// The finished hypotheses, best first (as many as the width).
    pub fn finish(self) -> Vec<Beam> {
        let lp = self.cfg.length_penalty as f64;
        self.finished
            .into_iter()
            .filter(|f| f.2)
            .map(|(tokens, score, _)| Beam {
                cumulative_logprob: score * (tokens.len() as f64).powf(lp) as f32,
                tokens,
                score,
            })
            .collect()
    }

    /// Tokens each running beam has generated.
    pub fn generated(&self) -> usize {
        self.generated
    }

    /// The `k` best continuations by cumulative log-probability, best first (ties: lower beam,
    /// then lower token).
    fn top_candidates(&self, logits: &[&[f32]], k: usize) -> Vec<Candidate> {
        let mut all = Vec::new();
        for (beam, row) in logits.iter().enumerate() {
            let lse = log_sum_exp(row);
            let base = self.running_scores[beam];
            for (token, &l) in row.iter().enumerate() {
                all.push(Candidate {
                    score: (l - lse) + base,
                    beam,
                    token: token as u32,
                });
            }
        }
        let k = k.min(all.len());
        let rank = |a: &Candidate, b: &Candidate| {
            b.score
                .total_cmp(&a.score)
                .then(a.beam.cmp(&b.beam))
                .then(a.token.cmp(&b.token))
        };
        if k < all.len() {
            all.select_nth_unstable_by(k, rank);
            all.truncate(k);
        }
        all.sort_by(rank);
        all
    }

    /// Candidates among the first `width` that end join the finished hypotheses, which keep the
    /// best `width` (transformers masks the others with −1e9 rather than removing them).
    fn update_finished(&mut self, top: &[Candidate], hits: &[bool], new_len: usize) {
        let w = self.finished.len();
        let all_finished = self.finished.iter().all(|f| f.2);
        let full = all_finished && self.cfg.early_stopping == EarlyStopping::Bool(true);
        let penalty = (new_len as f64).powf(self.cfg.length_penalty as f64) as f32;
        let mut merged: Vec<(Vec<u32>, f32, bool)> = std::mem::take(&mut self.finished);
        for (i, c) in top.iter().enumerate() {
            let just_finished = hits[i] && i < w;
            let mut score = c.score / penalty;
            if full {
                score += NEG;
            }
            if !self.heuristic_unsatisfied {
                score += NEG;
            }
            if !just_finished {
                score += NEG;
            }
            let mut tokens = self.running[c.beam].clone();
            tokens.push(c.token);
            merged.push((tokens, score, just_finished));
        }
        let mut order: Vec<usize> = (0..merged.len()).collect();
        order.sort_by(|&a, &b| merged[b].1.total_cmp(&merged[a].1).then(a.cmp(&b)));
        let keep: Vec<usize> = order.into_iter().take(w).collect();
        self.finished = keep.iter().map(|&i| merged[i].clone()).collect();
    }

    /// Whether the best running beam could still beat the worst finished hypothesis.
    fn check_heuristic(&mut self) {
        let lp = self.cfg.length_penalty;
        let best_len =
            if self.cfg.early_stopping == EarlyStopping::Never(NeverTag::Never) && lp > 0.0 {
                self.cfg.max_new_tokens
            } else {
                self.generated
            };
        let best = self.running_scores[0] / (best_len as f64).powf(lp as f64) as f32;
        let worst = self
            .finished
            .iter()
            .map(|f| f.1)
            .fold(f32::INFINITY, f32::min);
        let improvable = self
            .finished
            .iter()
            .any(|f| best > if f.2 { worst } else { NEG });
        self.heuristic_unsatisfied &= improvable;
    }
}

/// `log Σ exp(row)`, computed as torch's `log_softmax` does (max subtracted, float32).
fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = row.iter().map(|&l| (l - max).exp()).sum();
    max + sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(width: usize, max_new_tokens: usize) -> BeamConfig {
        BeamConfig {
            width,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::Bool(true),
            max_new_tokens,
            eos: vec![0],
        }
    }

    #[test]
    fn the_first_step_expands_only_the_first_beam() {
        let mut b = BeamSearch::new(cfg(2, 3));
        let row = [0.0f32, 1.0, 3.0, 2.0];
        let parents = b.step(&[&row, &row]);
        assert_eq!(parents, vec![0, 0]);
        assert_eq!(b.running(), &[vec![2], vec![3]]);
    }

    #[test]
    fn an_ending_candidate_is_finished_and_the_search_runs_to_the_limit() {
        let mut b = BeamSearch::new(cfg(2, 2));
        // EOS (token 0) is the best continuation: it finishes, the next two run on.
        let row = [5.0f32, 1.0, 3.0, 2.0];
        b.step(&[&row, &row]);
        assert_eq!(b.running(), &[vec![2], vec![3]]);
        assert!(!b.is_done());
        b.step(&[&row, &row]);
        assert!(b.is_done());
        let out = b.finish();
        assert_eq!(out[0].tokens, vec![0]);
        assert!(out[0].score > out[1].score);
    }

    #[test]
    fn early_stopping_parses_as_transformers_writes_it() {
        let v: Vec<EarlyStopping> = serde_json::from_str(r#"[true, false, "never"]"#).unwrap();
        assert_eq!(
            v,
            vec![
                EarlyStopping::Bool(true),
                EarlyStopping::Bool(false),
                EarlyStopping::Never(NeverTag::Never)
            ]
        );
    }
}
