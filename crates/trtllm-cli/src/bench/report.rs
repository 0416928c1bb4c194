//! Benchmark figures: throughput and latency percentiles, as a text table or JSON.

use std::fmt::Write;
use std::time::Duration;

use serde::Serialize;
use trtllm_api::executor::SpeculativeTotals;
use trtllm_api::runtime::parallel::CommTime;

use super::backend::Timing;

#[derive(Serialize)]
pub struct Percentiles {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    /// Milliseconds; nearest-rank percentiles.
    fn of(mut v: Vec<f64>) -> Self {
        if v.is_empty() {
            return Self {
                mean: 0.0,
                p50: 0.0,
                p90: 0.0,
                p99: 0.0,
                max: 0.0,
            };
        }
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Self {
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: v[v.len() - 1],
        }
    }
}

#[derive(Serialize)]
pub struct Report {
    pub mode: String,
    pub backend: String,
    pub requests: usize,
    pub concurrency: usize,
    pub duration_s: f64,
    pub input_tokens: usize,
    pub output_tokens: usize,
    pub request_throughput: f64,
    pub input_tokens_per_s: f64,
    pub output_tokens_per_s: f64,
    pub total_tokens_per_s: f64,
    /// Output tokens/s of one request after its first token, averaged over requests.
    pub per_request_output_tokens_per_s: f64,
    pub ttft_ms: Percentiles,
    /// Time per output token after the first: (e2e - ttft) / (output - 1), per request.
    pub tpot_ms: Percentiles,
    pub itl_ms: Percentiles,
    pub e2e_ms: Percentiles,
    /// Speculative decoding in the measured requests (in process, when drafts were made).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speculative: Option<Speculation>,
    /// Rank 0's time inside collectives, for an engine split over ranks (`mpirun`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub communication: Option<Communication>,
}

/// Where rank 0's time in collectives went during the measured requests, in milliseconds.
#[derive(Serialize)]
pub struct Communication {
    pub all_reduce_ms: f64,
    pub all_gather_ms: f64,
    pub send_recv_ms: f64,
    pub broadcast_ms: f64,
    pub calls: u64,
    /// Their sum over the measured wall time.
    pub share_of_wall: f64,
}

impl Communication {
    pub fn between(before: CommTime, after: CommTime, wall: Duration) -> Self {
        let d = |f: fn(&CommTime) -> Duration| ms(f(&after).saturating_sub(f(&before)));
        let total = d(CommTime::total);
        Self {
            all_reduce_ms: d(|t| t.all_reduce),
            all_gather_ms: d(|t| t.all_gather),
            send_recv_ms: d(|t| t.send_recv),
            broadcast_ms: d(|t| t.broadcast),
            calls: after.calls - before.calls,
            share_of_wall: total / ms(wall).max(1e-9),
        }
    }
}

#[derive(Serialize)]
pub struct Speculation {
    pub drafts: u64,
    pub draft_tokens: u64,
    pub accepted_draft_tokens: u64,
    /// Kept over proposed draft tokens.
    pub acceptance_rate: f64,
    /// Draft tokens kept per verifying pass.
    pub mean_accepted_len: f64,
}

impl Speculation {
    /// What happened between two readings of the executor's totals.
    pub fn between(before: SpeculativeTotals, after: SpeculativeTotals) -> Option<Self> {
        let drafts = after.drafts - before.drafts;
        let draft_tokens = after.draft_tokens - before.draft_tokens;
        let accepted = after.accepted_draft_tokens - before.accepted_draft_tokens;
        (drafts > 0).then(|| Self {
            drafts,
            draft_tokens,
            accepted_draft_tokens: accepted,
            acceptance_rate: accepted as f64 / draft_tokens.max(1) as f64,
            mean_accepted_len: accepted as f64 / drafts as f64,
        })
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Report {
    pub fn new(
        mode: &str,
        backend: String,
        concurrency: usize,
        wall: Duration,
        t: &[Timing],
    ) -> Self {
        let secs = wall.as_secs_f64().max(1e-9);
        let input: usize = t.iter().map(|x| x.input_tokens).sum();
        let output: usize = t.iter().map(|x| x.output_tokens).sum();
        let tpot: Vec<f64> = t
            .iter()
            .filter(|x| x.output_tokens > 1)
            .map(|x| ms(x.e2e - x.ttft) / (x.output_tokens - 1) as f64)
            .collect();
        let per_request = if tpot.is_empty() {
            0.0
        } else {
            tpot.iter().map(|p| 1e3 / p.max(1e-9)).sum::<f64>() / tpot.len() as f64
        };
        Self {
            mode: mode.into(),
            backend,
            requests: t.len(),
            concurrency,
            duration_s: secs,
            input_tokens: input,
            output_tokens: output,
            request_throughput: t.len() as f64 / secs,
            input_tokens_per_s: input as f64 / secs,
            output_tokens_per_s: output as f64 / secs,
            total_tokens_per_s: (input + output) as f64 / secs,
            per_request_output_tokens_per_s: per_request,
            ttft_ms: Percentiles::of(t.iter().map(|x| ms(x.ttft)).collect()),
            tpot_ms: Percentiles::of(tpot),
            itl_ms: Percentiles::of(
                t.iter()
                    .flat_map(|x| x.itl.iter().map(|d| ms(*d)))
                    .collect(),
            ),
            e2e_ms: Percentiles::of(t.iter().map(|x| ms(x.e2e)).collect()),
            speculative: None,
            communication: None,
        }
    }

    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "== trtllm bench {} — {}", self.mode, self.backend);
        let rows = [
            ("requests", format!("{}", self.requests)),
            ("concurrency", format!("{}", self.concurrency)),
            ("duration (s)", format!("{:.2}", self.duration_s)),
            (
                "input / output tokens",
                format!("{} / {}", self.input_tokens, self.output_tokens),
            ),
            (
                "request throughput (req/s)",
                format!("{:.3}", self.request_throughput),
            ),
            (
                "input throughput (tok/s)",
                format!("{:.1}", self.input_tokens_per_s),
            ),
            (
                "output throughput (tok/s)",
                format!("{:.1}", self.output_tokens_per_s),
            ),
            (
                "total throughput (tok/s)",
                format!("{:.1}", self.total_tokens_per_s),
            ),
            (
                "per-request output (tok/s)",
                format!("{:.1}", self.per_request_output_tokens_per_s),
            ),
        ];
        for (k, v) in rows {
            let _ = writeln!(s, "{k:<30} {v:>14}");
        }
        if let Some(sp) = &self.speculative {
            let _ = writeln!(
                s,
                "{:<30} {:>14}",
                "draft acceptance",
                format!(
                    "{:.1} % ({:.2}/pass)",
                    sp.acceptance_rate * 100.0,
                    sp.mean_accepted_len
                )
            );
        }
        if let Some(c) = &self.communication {
            let _ = writeln!(
                s,
                "{:<30} {:>14}",
                "rank 0 in collectives",
                format!("{:.1} % of wall", c.share_of_wall * 100.0)
            );
            let _ = writeln!(
                s,
                "{:<30} {:>14}",
                "  all-reduce/gather/p2p/bcast",
                format!(
                    "{:.0}/{:.0}/{:.0}/{:.0} ms",
                    c.all_reduce_ms, c.all_gather_ms, c.send_recv_ms, c.broadcast_ms
                )
            );
        }
        let _ = writeln!(
            s,
            "\n{:<12} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "latency (ms)", "mean", "p50", "p90", "p99", "max"
        );
        for (name, p) in [
            ("TTFT", &self.ttft_ms),
            ("TPOT", &self.tpot_ms),
            ("ITL", &self.itl_ms),
            ("E2E", &self.e2e_ms),
        ] {
            let _ = writeln!(
                s,
                "{name:<12} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
                p.mean, p.p50, p.p90, p.p99, p.max
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let p = Percentiles::of((1..=100).map(f64::from).collect());
        assert_eq!((p.p50, p.p90, p.p99, p.max), (50.0, 90.0, 99.0, 100.0));
        assert_eq!(p.mean, 50.5);
        let one = Percentiles::of(vec![7.0]);
        assert_eq!((one.p50, one.p99), (7.0, 7.0));
    }

    #[test]
    fn throughput_and_tpot_from_timings() {
        let t = Timing {
            input_tokens: 10,
            output_tokens: 11,
            ttft: Duration::from_millis(100),
            e2e: Duration::from_millis(1100),
            itl: vec![Duration::from_millis(100); 10],
        };
        let r = Report::new(
            "throughput",
            "x".into(),
            2,
            Duration::from_secs(2),
            &[t.clone(), t],
        );
        assert_eq!(r.output_tokens_per_s, 11.0);
        assert_eq!(r.total_tokens_per_s, 21.0);
        assert!((r.tpot_ms.p50 - 100.0).abs() < 1e-9);
        assert!((r.per_request_output_tokens_per_s - 10.0).abs() < 1e-9);
        assert_eq!(r.itl_ms.max, 100.0);
    }
}
