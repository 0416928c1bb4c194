//! Log-probabilities of the model's distribution (raw logits, before penalties and
//! temperature, as OpenAI and vLLM report them).

/// Most alternatives a request may ask for per token (OpenAI's `top_logprobs` limit).
pub const MAX_LOGPROBS: usize = 20;

#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    /// Log-probability of the sampled token.
    pub logprob: f32,
    /// The most likely tokens with their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// log Σ exp(logits), accumulated in f64 so a 50k-entry vocabulary loses no precision.
pub fn log_sum_exp(logits: &[f32]) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max as f64;
    }
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    max as f64 + sum.ln()
}

/// The sampled token's log-probability and the `k` most likely tokens (ties: lower id first).
pub fn token_logprobs(logits: &[f32], token: u32, k: usize) -> TokenLogprobs {
    let lse = log_sum_exp(logits);
    let lp = |i: u32| (logits[i as usize] as f64 - lse) as f32;
    let order = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(ids.len());
    if k > 0 && k < ids.len() {
        ids.select_nth_unstable_by(k - 1, order);
    }
    ids.truncate(k);
    ids.sort_unstable_by(order);
    TokenLogprobs {
        logprob: lp(token),
        top: ids.into_iter().map(|i| (i, lp(i))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_are_a_normalised_distribution_with_sorted_top_k() {
        let logits = [1.0f32, 3.0, 2.0, 3.0, -1.0];
        let total: f64 = (0..5)
            .map(|t| (token_logprobs(&logits, t, 0).logprob as f64).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-6);
        let t = token_logprobs(&logits, 2, 3);
        let ids: Vec<u32> = t.top.iter().map(|x| x.0).collect();
        assert_eq!(ids, [1, 3, 2]);
        assert_eq!(t.top[2].1, t.logprob);
        assert_eq!(token_logprobs(&logits, 0, 99).top.len(), 5);
    }
}
