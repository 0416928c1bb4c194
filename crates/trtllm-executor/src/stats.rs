//! What the executor reports about its steps and requests.

use serde::Serialize;
use trtllm_builder::runtime::{KvCacheSummary, KvGroupSummary};

/// One engine step.
#[derive(Clone, Debug, Default, Serialize)]
pub struct IterationStats {
    pub iteration: u64,
    /// Requests in the step's forward pass.
    pub batch_size: usize,
    /// Requests whose prompt (or a chunk of it) ran in this step.
    pub context_requests: usize,
    pub context_tokens: usize,
    pub generation_requests: usize,
    pub generation_tokens: usize,
    /// Requests admitted but not scheduled in this step, and those still queued.
    pub paused_requests: usize,
    pub queued_requests: usize,
    /// Requests preempted (blocks freed, to be recomputed) in this step.
    pub preempted_requests: usize,
    pub kv: KvCacheSummary,
    /// The same per KV group: sliding-window layers hold only the blocks their window sees.
    pub kv_groups: Vec<KvGroupSummary>,
    /// Blocks matched from the prefix cache by requests admitted in this step.
    pub reused_blocks: usize,
    /// Draft tokens verified in this step, and how many of them were kept.
    pub draft_tokens: usize,
    pub accepted_draft_tokens: usize,
    pub iteration_time_ms: f64,
}

/// One request, reported with its final output.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RequestStats {
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    /// Tokens found in the prefix cache instead of computed (after a preemption, this includes
    /// the request's own blocks found again).
    pub reused_tokens: usize,
    /// Prompt and recomputed tokens that went through forward passes.
    pub context_tokens_computed: usize,
    pub preemptions: usize,
    /// Draft tokens verified for this request (speculative decoding), and how many were kept:
    /// their ratio is the acceptance rate.
    pub draft_tokens: usize,
    pub accepted_draft_tokens: usize,
    /// Verifying passes that had a draft; output tokens they produced per pass is the mean
    /// accepted length plus one.
    pub draft_steps: usize,
    /// Submission to first scheduled step.
    pub queue_time_s: f64,
    pub time_to_first_token_s: f64,
    /// Output tokens after the first, per second after the first.
    pub decode_tokens_per_s: f64,
    pub total_time_s: f64,
}

/// The executor's load between two steps.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ExecutorLoad {
    /// Admitted requests (prefilling, decoding or paused).
    pub running: usize,
    /// Queued, not yet admitted.
    pub waiting: usize,
    pub kv: KvCacheSummary,
    /// Speculative decoding since the executor started.
    pub speculative: SpeculativeTotals,
}

/// Speculative decoding's running totals (vLLM's `spec_decode_*` counters): acceptance rate
/// is `accepted_draft_tokens / draft_tokens`, mean accepted length `accepted_draft_tokens /
/// drafts`.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct SpeculativeTotals {
    /// Verifying passes of a request that had a draft.
    pub drafts: u64,
    pub draft_tokens: u64,
    pub accepted_draft_tokens: u64,
}
