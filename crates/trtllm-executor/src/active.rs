//! A request inside the engine loop: its tokens, how many of them the KV cache holds, its
//! sampler, its event channel and its timings.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::Sender;
use trtllm_builder::runtime::{
    token_logprobs, FinishReason, GenerationOutput, GenerationParams, KvCacheManager, LogitsMode,
    SampledToken, Sampler, TokenLogprobs,
};

use crate::beam_request::BeamState;
use crate::lora::RequestLora;
use crate::{ExecutorError, LogitsProcessor, RequestEvent, RequestStats};

pub(crate) struct ActiveRequest {
    pub id: u64,
    /// Prompt followed by the tokens generated so far.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Leading `tokens` whose keys and values are in the cache.
    pub computed: usize,
    /// Tokens a drafter proposed after the last one, verified in this step's pass (speculative
    /// decoding); empty otherwise. Never part of `tokens` until the sampler agrees.
    pub draft: Vec<u32>,
    /// Most tokens this request may generate.
    pub budget: usize,
    /// A beam search's state; its beams' tokens are not in `tokens`, which keeps the prompt.
    pub beam: Option<BeamState>,
    pub params: GenerationParams,
    pub sampler: Sampler,
    /// Changes each step's logits before sampling (a grammar), if the request has one.
    pub processor: Option<Box<dyn LogitsProcessor>>,
    /// Log-probabilities of the output tokens, when the request asked for them.
    pub logprobs: Option<Vec<TokenLogprobs>>,
    /// Log-probabilities of prompt tokens 1.., filled in as prefill chunks run.
    pub prompt_logprobs: Option<Vec<TokenLogprobs>>,
    /// Rows of the prompt's logits taken so far (`return_context_logits`).
    context_logits: Option<Vec<Vec<f32>>>,
    /// The raw logits of each sampled token (`return_generation_logits`).
    generation_logits: Option<Vec<Vec<f32>>>,
    pub events: Sender<RequestEvent>,
    pub cancel: Arc<AtomicBool>,
    pub stats: RequestStats,
    pub arrived: Instant,
    pub first_scheduled: Option<Instant>,
    pub first_token: Option<Instant>,
    /// The LoRA adapter the request runs with.
    pub lora: Option<RequestLora>,
}

impl ActiveRequest {
    pub fn new(
        id: u64,
        prompt: Vec<u32>,
        params: GenerationParams,
        budget: usize,
        sampler: Sampler,
        events: Sender<RequestEvent>,
        cancel: Arc<AtomicBool>,
    ) -> Self {
        Self {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            computed: 0,
            draft: Vec::new(),
            budget,
            beam: params.beam.map(BeamState::new),
            logprobs: params.sampling.logprobs.map(|_| Vec::new()),
            prompt_logprobs: params.prompt_logprobs.map(|_| Vec::new()),
            context_logits: params.return_context_logits.then(Vec::new),
            generation_logits: params.return_generation_logits.then(Vec::new),
            params,
            sampler,
            processor: None,
            events,
            cancel,
            stats: RequestStats::default(),
            arrived: Instant::now(),
            first_scheduled: None,
            first_token: None,
            lora: None,
        }
    }

    /// The id of the request's LoRA adapter: its KV blocks' salt, its group in a pass.
    pub fn lora_id(&self) -> Option<u64> {
        self.lora.as_ref().map(|l| l.id)
    }

    pub fn output(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Length the sequence can reach: its whole-life KV footprint.
    pub fn final_len(&self) -> usize {
        self.prompt_len + self.budget
    }

    /// Tokens still to run before the next token can be sampled.
    pub fn pending(&self) -> usize {
        self.tokens.len() - self.computed
    }

    /// Still prefilling (its prompt, or its recomputed prefix after a preemption).
    pub fn in_context_phase(&self) -> bool {
        !self.beam_decoding() && (self.pending() > 1 || self.output().is_empty())
    }

    /// A beam search past its prompt: one KV sequence and one pending token per beam.
    pub fn beam_decoding(&self) -> bool {
        self.beam.as_ref().is_some_and(BeamState::decoding)
    }

    /// The KV sequences this request holds: its own, or its beams'.
    pub fn seq_ids(&self) -> Vec<u64> {
        match &self.beam {
            Some(b) if b.decoding() => b.seqs().to_vec(),
            _ => vec![self.id],
        }
    }

    /// A beam search's step from `rows` (the prompt's last row, or one per beam).
    pub fn beam_step(
        &mut self,
        rows: &[&[f32]],
        ctx: crate::beam_request::BeamCtx<'_>,
    ) -> Result<crate::beam_request::BeamStep, ExecutorError> {
        let (id, prompt_len) = (self.id, self.prompt_len);
        match &mut self.beam {
            Some(b) => b.step(rows, (id, prompt_len), ctx),
            None => Err(ExecutorError::Step(format!(
                "request {id} has no beam search"
            ))),
        }
    }

    /// Releases every block the request holds.
    pub fn free_kv(&self, kv: &mut KvCacheManager) {
        for s in self.seq_ids() {
            kv.free_sequence(s);
        }
    }

    /// Sequences at their longest: one, or one per beam.
    pub fn width(&self) -> usize {
        self.beam.as_ref().map_or(1, |b| b.params.width)
    }

    /// Whether prompt log-probabilities or context logits are asked for and not all computed
    /// yet: the prompt then runs whole (no reused prefix) with logits at every position.
    pub fn needs_prompt_logits(&self) -> bool {
        let logprobs_due = self
            .prompt_logprobs
            .as_ref()
            .is_some_and(|v| v.len() + 1 < self.prompt_len);
        let logits_due = self
            .context_logits
            .as_ref()
            .is_some_and(|v| v.len() < self.prompt_len);
        logprobs_due || logits_due
    }

    /// Whether the request is decoding (its prompt done, one token pending): the state in
    /// which a draft may be proposed.
    pub fn decoding(&self) -> bool {
        self.pending() == 1 && !self.output().is_empty()
    }

    /// The tokens a chunk of `n_tokens` from `computed` on runs: pending tokens, then the draft.
    pub fn chunk_tokens(&self, n_tokens: usize) -> Vec<u32> {
        let pending = &self.tokens[self.computed..];
        let take = n_tokens.min(pending.len());
        let mut t = pending[..take].to_vec();
        t.extend(self.draft.iter().take(n_tokens - take));
        t
    }

    /// Which logits rows a chunk of `n_tokens` from `computed` on produces: every position
    /// while prompt log-probabilities are due or a draft is verified, else the last when it
    /// completes the sequence.
    pub fn logits_mode(&self, n_tokens: usize) -> LogitsMode {
        if self.needs_prompt_logits() || self.computed + n_tokens > self.tokens.len() {
            LogitsMode::All
        } else if self.computed + n_tokens == self.tokens.len() {
            LogitsMode::Last
        } else {
            LogitsMode::Skip
        }
    }

    /// Takes the logits rows of positions `from..` (each predicting the token after it) into
    /// the prompt log-probabilities; sends them once the prompt is complete. Positions already
    /// taken (a prefill recomputed after preemption) are skipped.
    pub fn take_prompt_rows(&mut self, from: usize, rows: &[&[f32]]) {
        if let Some(all) = &mut self.context_logits {
            for (j, row) in rows.iter().enumerate() {
                if from + j == all.len() && all.len() < self.prompt_len {
                    all.push(row.to_vec());
                }
            }
        }
        let (Some(all), Some(k)) = (&mut self.prompt_logprobs, self.params.prompt_logprobs) else {
            return;
        };
        for (j, row) in rows.iter().enumerate() {
            let p = from + j;
            if p == all.len() && p + 1 < self.prompt_len {
                all.push(token_logprobs(row, self.tokens[p + 1], k));
            }
        }
        if all.len() + 1 >= self.prompt_len {
            let _ = self.events.send(RequestEvent::PromptLogprobs(all.clone()));
        }
    }

    /// Cancelled by the caller, or the caller dropped its handle.
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// Samples the next token from this request's logits row, through its processor if it
    /// has one (an error from which fails this request).
    pub fn sample(&mut self, logits: &[f32], eos: &[u32]) -> Result<SampledToken, ExecutorError> {
        // A broken model (NaN weights, an overflow) must fail the request, not emit tokens.
        if let Some(i) = logits
            .iter()
            .position(|l| l.is_nan() || *l == f32::INFINITY)
        {
            return Err(ExecutorError::Step(format!(
                "the model produced a non-finite logit ({} for token {i}); the engine's weights \
                 or activations are broken",
                logits[i]
            )));
        }
        if let Some(all) = &mut self.generation_logits {
            all.push(logits.to_vec());
        }
        let banned = self.params.banned_tokens(self.output().len(), eos);
        let Some(p) = self.processor.as_mut() else {
            return Ok(self.sampler.sample(logits, &banned));
        };
        let output = &self.tokens[self.prompt_len..];
        let mut processed = logits.to_vec();
        let failed = ExecutorError::LogitsProcessor;
        p.process(output, &mut processed).map_err(failed)?;
        let token = self.sampler.sample(&processed, &banned);
        // The grammar's mask and the banned tokens (bad_words, EOS before min_tokens) can leave
        // nothing: the sampler then returns a token no constraint allows.
        if processed[token.id as usize] == f32::NEG_INFINITY || banned.contains(&token.id) {
            return Err(failed(
                "no token is allowed here: the grammar and the banned tokens (bad_words, the \
                 end of sequence before min_tokens) exclude every token"
                    .into(),
            ));
        }
        p.accept(token.id).map_err(failed)?;
        Ok(token)
    }

    /// Samples from the logits `rows` in order (row `i` follows `draft[..i]`, the first follows
    /// the last computed token), appending each sample; stops after the first sample that is
    /// not the drafted token, or after the last row. Each drafted token kept has its keys and
    /// values already in the cache, so `computed` moves past it. Returns why the request
    /// ends, if it does.
    pub fn sample_rows(
        &mut self,
        rows: &[&[f32]],
        draft: &[u32],
        eos: &[u32],
    ) -> Result<Option<FinishReason>, ExecutorError> {
        if !draft.is_empty() {
            self.stats.draft_tokens += draft.len();
            self.stats.draft_steps += 1;
        }
        for (i, row) in rows.iter().enumerate() {
            let token = self.sample(row, eos)?;
            let kept = draft.get(i) == Some(&token.id);
            if kept {
                self.computed += 1;
                self.stats.accepted_draft_tokens += 1;
            }
            if let Some(reason) = self.push_token(token, eos) {
                return Ok(Some(reason));
            }
            if !kept {
                break;
            }
        }
        Ok(None)
    }

    /// Appends a sampled token and streams it; returns why the request ends, if it does.
    pub fn push_token(&mut self, token: SampledToken, eos: &[u32]) -> Option<FinishReason> {
        let now = Instant::now();
        self.first_token.get_or_insert(now);
        self.tokens.push(token.id);
        if let (Some(all), Some(lp)) = (&mut self.logprobs, &token.logprobs) {
            all.push(lp.clone());
        }
        if self.events.send(RequestEvent::Tokens(vec![token])).is_err() {
            return Some(FinishReason::Cancelled);
        }
        self.params.finish_reason(self.output(), eos, self.budget)
    }

    /// Sends the final output. The caller frees the request's blocks first, so that a caller
    /// who sees the end also sees the blocks back in the pool.
    pub fn finish(mut self, reason: FinishReason) {
        let now = Instant::now();
        let beams = self.beam.as_mut().and_then(|b| b.beams.take());
        let mut tokens = self.tokens.split_off(self.prompt_len);
        if let Some(best) = beams.as_ref().and_then(|b| b.first()) {
            tokens = best.tokens.clone();
        }
        let s = &mut self.stats;
        s.prompt_tokens = self.prompt_len;
        s.output_tokens = tokens.len();
        s.total_time_s = (now - self.arrived).as_secs_f64();
        if let Some(t) = self.first_scheduled {
            s.queue_time_s = (t - self.arrived).as_secs_f64();
        }
        if let Some(t) = self.first_token {
            s.time_to_first_token_s = (t - self.arrived).as_secs_f64();
            let decode = (now - t).as_secs_f64();
            if s.output_tokens > 1 && decode > 0.0 {
                s.decode_tokens_per_s = (s.output_tokens - 1) as f64 / decode;
            }
        }
        let output = GenerationOutput {
            tokens,
            beams,
            logprobs: self.logprobs.take(),
            prompt_logprobs: self.prompt_logprobs.take(),
            context_logits: self.context_logits.take(),
            generation_logits: self.generation_logits.take(),
            finish_reason: reason,
        };
        let _ = self.events.send(RequestEvent::Finished {
            output,
            stats: self.stats,
        });
    }

    pub fn fail(self, error: ExecutorError) {
        let _ = self.events.send(RequestEvent::Failed(error));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_logits_fail_the_request_instead_of_becoming_tokens() {
        let (tx, _rx) = crossbeam_channel::unbounded();
        let params = GenerationParams {
            max_new_tokens: 4,
            ..Default::default()
        };
        let sampler = Sampler::new(params.sampling.clone(), &[1]).unwrap();
        let cancel = Arc::new(AtomicBool::new(false));
        let mut r = ActiveRequest::new(0, vec![1], params, 4, sampler, tx, cancel);
        for bad in [f32::NAN, f32::INFINITY] {
            let e = r.sample(&[0.0, bad, 1.0], &[]).unwrap_err();
            assert!(e.to_string().contains("non-finite"), "{e}");
        }
        // A masked (−∞) logit is no fault.
        assert_eq!(r.sample(&[0.0, f32::NEG_INFINITY, 1.0], &[]).unwrap().id, 2);
    }

    /// Allows only token 1.
    struct OnlyOne;
    impl LogitsProcessor for OnlyOne {
        fn process(&mut self, _: &[u32], logits: &mut [f32]) -> Result<(), String> {
            for (i, l) in logits.iter_mut().enumerate() {
                if i != 1 {
                    *l = f32::NEG_INFINITY;
                }
            }
            Ok(())
        }
        fn accept(&mut self, _: u32) -> Result<(), String> {
            Ok(())
        }
    }

    #[test]
    fn a_grammar_and_bans_that_leave_no_token_fail_the_request() {
        let (tx, _rx) = crossbeam_channel::unbounded();
        // Token 1 is the end of sequence, banned before min_tokens: nothing is left.
        let params = GenerationParams {
            max_new_tokens: 4,
            min_tokens: 2,
            ..Default::default()
        };
        let sampler = Sampler::new(params.sampling.clone(), &[1]).unwrap();
        let cancel = Arc::new(AtomicBool::new(false));
        let mut r = ActiveRequest::new(0, vec![0], params, 4, sampler, tx, cancel);
        r.processor = Some(Box::new(OnlyOne));
        let e = r.sample(&[0.0, 0.5, 1.0], &[1]).unwrap_err();
        assert!(e.to_string().contains("no token is allowed"), "{e}");
    }
}
