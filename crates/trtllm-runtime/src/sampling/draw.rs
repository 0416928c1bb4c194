//! Drawing a token from temperature-scaled logits truncated by top-k, top-p and min-p, without
//! sorting the vocabulary: candidates are put in order (most likely first, lower id first on
//! ties) only as far as a truncation needs — a selection, then a sort of that prefix — and a
//! draw that truncates nothing walks them as they lie. Sorting 49k logits per token had cost a
//! third of a 32-sequence decode step.

use std::cmp::Ordering;

/// Which tokens may be drawn (see `SamplingConfig`).
pub(super) struct Truncation {
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
}

type Cand = (u32, f32);

fn most_likely_first(a: &Cand, b: &Cand) -> Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Candidates whose leading `sorted` entries are the most likely ones, in order.
struct Ranked {
    cand: Vec<Cand>,
    sorted: usize,
}

impl Ranked {
    /// Puts the `upto` most likely candidates first, in order.
    fn rank(&mut self, upto: usize) {
        let upto = upto.min(self.cand.len());
        if upto <= self.sorted {
            return;
        }
        let rest = &mut self.cand[self.sorted..];
        let k = upto - self.sorted;
        if k < rest.len() {
            rest.select_nth_unstable_by(k - 1, most_likely_first);
        }
        rest[..k].sort_unstable_by(most_likely_first);
        self.sorted = upto;
    }

    fn truncate(&mut self, n: usize) {
        self.rank(n);
        self.cand.truncate(n);
    }
}

/// The token that uniform `u` in [0, 1) picks from `logits` / `temperature` after truncation;
/// None when every logit is −∞.
pub(super) fn draw(logits: &[f32], temperature: f32, t: &Truncation, u: f64) -> Option<u32> {
    let inv_t = 1.0 / temperature;
    if t.top_k == 0 && t.top_p >= 1.0 && t.min_p <= 0.0 {
        return draw_untruncated(logits, inv_t, u);
    }
    let cand: Vec<Cand> = logits
        .iter()
        .enumerate()
        .filter(|(_, l)| **l > f32::NEG_INFINITY)
        .map(|(i, &l)| (i as u32, l * inv_t))
        .collect();
    let mut r = Ranked { cand, sorted: 0 };
    if r.cand.is_empty() {
        return None;
    }
    if t.top_k > 0 {
        r.truncate(t.top_k);
    }
    let max = r.cand.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
    let weight = |c: &Cand| ((c.1 - max) as f64).exp();
    if t.top_p < 1.0 {
        let goal = t.top_p as f64 * r.cand.iter().map(weight).sum::<f64>();
        // Rank a growing prefix until its mass reaches the goal.
        let mut upto = 64;
        let keep = loop {
            r.rank(upto);
            let mut acc = 0.0;
            let hit = r.cand[..r.sorted].iter().position(|c| {
                acc += weight(c);
                acc >= goal
            });
            match hit {
                Some(i) => break i + 1,
                None if r.sorted == r.cand.len() => break r.sorted,
                None => upto *= 4,
            }
        };
        r.truncate(keep);
    }
    if t.min_p > 0.0 {
        // Relative to the most likely token, which always survives.
        let floor = (t.min_p as f64).ln();
        r.cand.retain(|c| ((c.1 - max) as f64) >= floor);
    }
    let total: f64 = r.cand.iter().map(weight).sum();
    let mut left = u * total;
    for c in &r.cand {
        left -= weight(c);
        if left <= 0.0 {
            return Some(c.0);
        }
    }
    r.cand.last().map(|c| c.0)
}

/// Plain temperature sampling: one pass of exponentials, then a walk in id order.
fn draw_untruncated(logits: &[f32], inv_t: f32, u: f64) -> Option<u32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return None;
    }
    let weights: Vec<f32> = logits.iter().map(|&l| ((l - max) * inv_t).exp()).collect();
    let total: f64 = weights.iter().map(|&w| w as f64).sum();
    let mut left = u * total;
    let mut last = None;
    for (i, &w) in weights.iter().enumerate() {
        if w > 0.0 {
            left -= w as f64;
            last = Some(i as u32);
            if left <= 0.0 {
                break;
            }
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(top_k: usize, top_p: f32, min_p: f32) -> Truncation {
        Truncation {
            top_k,
            top_p,
            min_p,
        }
    }

    /// How often each token is drawn for `n` evenly spaced `u`.
    fn frequencies(logits: &[f32], t: &Truncation, n: usize) -> Vec<f64> {
        let mut f = vec![0.0; logits.len()];
        for i in 0..n {
            let id = draw(logits, 1.0, t, (i as f64 + 0.5) / n as f64).unwrap();
            f[id as usize] += 1.0 / n as f64;
        }
        f
    }

    #[test]
    fn draws_follow_the_truncated_softmax() {
        // A large vocabulary, so the ranked prefix has to grow past its first block.
        let logits: Vec<f32> = (0..5000)
            .map(|i| ((i * 7919) % 1000) as f32 / 300.0)
            .collect();
        let p: Vec<f64> = {
            let m = logits.iter().copied().fold(f32::MIN, f32::max);
            let w: Vec<f64> = logits.iter().map(|&l| ((l - m) as f64).exp()).collect();
            let s: f64 = w.iter().sum();
            w.iter().map(|x| x / s).collect()
        };
        let f = frequencies(&logits, &all(0, 1.0, 0.0), 20_000);
        let worst = f
            .iter()
            .zip(&p)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-4, "{worst}");
        // top_p keeps the most likely tokens until their mass reaches it, and no others.
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        let mut acc = 0.0;
        let keep = order
            .iter()
            .position(|&i| {
                acc += p[i];
                acc >= 0.5
            })
            .unwrap()
            + 1;
        assert!(keep > 64, "the test should need a second block ({keep})");
        let f = frequencies(&logits, &all(0, 0.5, 0.0), 20_000);
        assert!(order[keep..].iter().all(|&i| f[i] == 0.0));
        assert!(f[order[0]] > 0.0 && f[order[keep - 1]] > 0.0);
    }

    #[test]
    fn top_k_min_p_and_an_empty_support() {
        let logits = [0.0f32, 5.0, 4.9, -3.0, 4.8];
        let f = frequencies(&logits, &all(2, 1.0, 0.0), 1000);
        assert!(f[1] > 0.0 && f[2] > 0.0 && f[0] + f[3] + f[4] == 0.0);
        let f = frequencies(&[0.0, -0.1, -5.0], &all(0, 1.0, 0.5), 1000);
        assert!(f[0] > 0.0 && f[1] > 0.0 && f[2] == 0.0);
        assert_eq!(
            draw(&[f32::NEG_INFINITY; 3], 1.0, &all(0, 1.0, 0.0), 0.5),
            None
        );
    }
}
