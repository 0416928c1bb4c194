//! Prometheus metrics: request and token counters, latency histograms, and the executor's
//! load read at scrape time (so an idle server reports an empty queue, not a stale one).

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::{text::encode, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use trtllm_api::executor::GenerationExecutor;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FinishLabel {
    finish_reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: String,
}

pub struct Metrics {
    registry: Registry,
    finished: Family<FinishLabel, Counter>,
    errors: Family<StatusLabel, Counter>,
    prompt_tokens: Counter,
    cached_tokens: Counter,
    generation_tokens: Counter,
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
    running: Gauge,
    waiting: Gauge,
    http_in_flight: Gauge,
    kv_used: Gauge,
    kv_total: Gauge,
    kv_usage: Gauge<f64, AtomicU64>,
    kv_copied: Counter,
    spec_drafts: Counter,
    spec_draft_tokens: Counter,
    spec_accepted_tokens: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = Registry::with_prefix("trtllm");
        let m = Metrics {
            finished: Family::default(),
            errors: Family::default(),
            prompt_tokens: Counter::default(),
            cached_tokens: Counter::default(),
            generation_tokens: Counter::default(),
            // 1 ms .. ~65 s
            ttft: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            // 0.5 ms .. ~16 s
            itl: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            e2e: Histogram::new(exponential_buckets(0.01, 2.0, 16)),
            running: Gauge::default(),
            waiting: Gauge::default(),
            http_in_flight: Gauge::default(),
            kv_used: Gauge::default(),
            kv_total: Gauge::default(),
            kv_usage: Gauge::default(),
            kv_copied: Counter::default(),
            spec_drafts: Counter::default(),
            spec_draft_tokens: Counter::default(),
            spec_accepted_tokens: Counter::default(),
            registry: Registry::default(),
        };
        r.register(
            "request_success",
            "Completions finished, by finish reason",
            m.finished.clone(),
        );
        r.register(
            "request_errors",
            "Requests answered with an error, by HTTP status",
            m.errors.clone(),
        );
        r.register(
            "prompt_tokens",
            "Prompt tokens of served requests",
            m.prompt_tokens.clone(),
        );
        r.register(
            "prefix_cache_hit_tokens",
            "Prompt tokens found in the prefix cache instead of computed (of prompt_tokens)",
            m.cached_tokens.clone(),
        );
        r.register(
            "generation_tokens",
            "Tokens generated",
            m.generation_tokens.clone(),
        );
        r.register(
            "time_to_first_token_seconds",
            "Time from request arrival to its first token",
            m.ttft.clone(),
        );
        r.register(
            "inter_token_latency_seconds",
            "Time between two streamed token deltas of one completion",
            m.itl.clone(),
        );
        r.register(
            "e2e_request_latency_seconds",
            "Time from request arrival to its last token",
            m.e2e.clone(),
        );
        r.register(
            "num_requests_running",
            "Requests admitted by the scheduler",
            m.running.clone(),
        );
        r.register(
            "num_requests_waiting",
            "Requests queued, not yet admitted",
            m.waiting.clone(),
        );
        r.register(
            "http_requests_in_flight",
            "Generation requests the server is handling",
            m.http_in_flight.clone(),
        );
        r.register(
            "kv_cache_used_blocks",
            "KV-cache blocks referenced by a sequence",
            m.kv_used.clone(),
        );
        r.register(
            "kv_cache_total_blocks",
            "KV-cache blocks in the pool",
            m.kv_total.clone(),
        );
        r.register(
            "kv_cache_usage_ratio",
            "Fraction of KV-cache blocks in use",
            m.kv_usage.clone(),
        );
        r.register(
            "kv_cache_copied_blocks",
            "KV-cache blocks copied because forked beams would both write them",
            m.kv_copied.clone(),
        );
        r.register(
            "spec_decode_num_drafts",
            "Verifying passes of a request with a draft (speculative decoding)",
            m.spec_drafts.clone(),
        );
        r.register(
            "spec_decode_num_draft_tokens",
            "Draft tokens verified",
            m.spec_draft_tokens.clone(),
        );
        r.register(
            "spec_decode_num_accepted_tokens",
            "Draft tokens kept (acceptance rate: this over draft tokens)",
            m.spec_accepted_tokens.clone(),
        );
        Metrics { registry: r, ..m }
    }
}

impl Metrics {
    pub fn finished(&self, finish_reason: &str, n: u64) {
        if n > 0 {
            self.finished
                .get_or_create(&FinishLabel {
                    finish_reason: finish_reason.to_string(),
                })
                .inc_by(n);
        }
    }

    pub fn error(&self, status: u16) {
        self.errors
            .get_or_create(&StatusLabel {
                status: status.to_string(),
            })
            .inc();
    }

    pub fn cached_tokens(&self, n: usize) {
        self.cached_tokens.inc_by(n as u64);
    }

    pub fn tokens(&self, prompt: usize, generated: usize) {
        self.prompt_tokens.inc_by(prompt as u64);
        self.generation_tokens.inc_by(generated as u64);
    }

    pub fn ttft(&self, d: Duration) {
        self.ttft.observe(d.as_secs_f64());
    }

    pub fn itl(&self, d: Duration) {
        self.itl.observe(d.as_secs_f64());
    }

    pub fn e2e(&self, d: Duration) {
        self.e2e.observe(d.as_secs_f64());
    }

    pub fn in_flight(&self, delta: i64) {
        self.http_in_flight.inc_by(delta);
    }

    /// The text exposition, with the executor's load read now (blocking up to two seconds
    /// while a step finishes; on timeout the gauges keep their last values).
    pub fn render(&self, executor: &GenerationExecutor) -> String {
        if let Ok(load) = executor.load(Duration::from_secs(2)) {
            self.running.set(load.running as i64);
            self.waiting.set(load.waiting as i64);
            self.kv_used.set(load.kv.used_blocks as i64);
            self.kv_total.set(load.kv.total_blocks as i64);
            self.kv_usage
                .set(load.kv.used_blocks as f64 / load.kv.total_blocks.max(1) as f64);
            // The executor keeps totals; the counters catch up to them.
            let s = load.speculative;
            for (c, total) in [
                (&self.kv_copied, load.kv.copied_blocks),
                (&self.spec_drafts, s.drafts),
                (&self.spec_draft_tokens, s.draft_tokens),
                (&self.spec_accepted_tokens, s.accepted_draft_tokens),
            ] {
                c.inc_by(total.saturating_sub(c.get()));
            }
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
