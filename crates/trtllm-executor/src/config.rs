//! How the executor schedules: capacity policy, batch limits and the KV-cache pool.

use serde::{Deserialize, Serialize};
use trtllm_builder::runtime::{BuildConfig, KvCacheConfig};

use crate::{ExecutorError, Result};

/// How requests are admitted against the KV-cache pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CapacitySchedulerPolicy {
    /// Admit a request only when blocks for its whole prompt and output are guaranteed, so a
    /// running request is never evicted.
    #[default]
    GuaranteedNoEvict,
    /// Admit while blocks for the next step exist; when they run out, preempt the newest
    /// request (free its blocks, recompute it later).
    MaxUtilization,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    pub policy: CapacitySchedulerPolicy,
    /// Requests per step; None uses the engine's max_batch_size (also the upper limit).
    pub max_batch_size: Option<usize>,
    /// Tokens per step, prompt chunks included; None uses the engine's max_num_tokens.
    pub max_num_tokens: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ExecutorConfig {
    pub scheduler: SchedulerConfig,
    pub kv_cache: KvCacheConfig,
    /// How many iteration stats and KV events are kept for `latest_*` readers.
    pub history: usize,
    /// A timing cache: the CPU kernels take its tactics for this machine, and what it lacks is
    /// timed at start (at most [`TUNE_BUDGET`]) and written back.
    pub timing_cache: Option<std::path::PathBuf>,
    /// Speculative decoding for every request (none: plain decoding).
    pub speculative: Option<crate::SpeculativeConfig>,
    /// A request's logits bit for bit the same whatever else is in its batch and however its
    /// prompt is chunked, on either device (costs throughput: docs/benchmarks.md).
    pub batch_invariant: bool,
}

/// The most time tuning may take when an executor starts.
pub const TUNE_BUDGET: std::time::Duration = std::time::Duration::from_secs(10);

impl Default for ExecutorConfig {
    fn default() -> Self {
        Self {
            scheduler: SchedulerConfig::default(),
            kv_cache: KvCacheConfig::default(),
            history: 1000,
            timing_cache: None,
            speculative: None,
            batch_invariant: false,
        }
    }
}

/// The limits one step runs under, resolved against the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct StepLimits {
    pub max_batch_size: usize,
    pub max_num_tokens: usize,
    /// Distinct LoRA adapters one step runs (the engine's `max_loras`).
    pub max_loras: usize,
}

impl SchedulerConfig {
    pub(crate) fn limits(&self, build: &BuildConfig) -> Result<StepLimits> {
        let pick = |field: &'static str, asked: Option<usize>, engine: usize| match asked {
            Some(v) if v == 0 || v > engine => Err(ExecutorError::InvalidConfig {
                field,
                value: v,
                max: engine,
            }),
            Some(v) => Ok(v),
            None => Ok(engine.max(1)),
        };
        Ok(StepLimits {
            max_batch_size: pick("max_batch_size", self.max_batch_size, build.max_batch_size)?,
            max_num_tokens: pick("max_num_tokens", self.max_num_tokens, build.max_num_tokens)?,
            max_loras: build.max_loras.max(1),
        })
    }
}
