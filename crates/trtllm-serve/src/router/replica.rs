//! One `trtllm serve` replica as the router sees it: healthy or not, the requests it is running
//! for the router, and the KV blocks it holds by hash. A watcher thread follows the replica's
//! `/kv_events` stream; the stream's connection is also the health check (a replica that goes
//! away drops it at once), retried every second while the replica is down.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::Value;

use crate::kv_events::BLOCK_HASH;

pub struct Replica {
    pub url: String,
    key: Option<String>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    healthy: bool,
    block_size: usize,
    /// Block hash → how many times it was stored (or routed to, below) and not removed.
    blocks: HashMap<u64, usize>,
    in_flight: usize,
    routed: u64,
    retried_away: u64,
}

impl State {
    /// One count off each of `hashes`; a block at none is no longer held.
    fn forget(&mut self, hashes: &[u64]) {
        for h in hashes {
            if let Some(n) = self.blocks.get_mut(h) {
                *n -= 1;
                if *n == 0 {
                    self.blocks.remove(h);
                }
            }
        }
    }
}

/// A replica's figures for `/router/stats`.
#[derive(serde::Serialize)]
pub struct ReplicaStats {
    pub url: String,
    pub healthy: bool,
    pub cached_blocks: usize,
    pub in_flight: usize,
    pub routed: u64,
    pub failed_before_start: u64,
}

impl Replica {
    pub fn new(url: &str, key: Option<String>) -> Arc<Self> {
        Arc::new(Self {
            url: url.trim_end_matches('/').to_string(),
            key,
            state: Mutex::default(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn authorization(&self) -> Option<String> {
        self.key.as_ref().map(|k| format!("Bearer {k}"))
    }

    /// Follows the replica's events until `stop` is set.
    pub fn watch(self: Arc<Self>, stop: Arc<AtomicBool>) {
        while !stop.load(Ordering::Relaxed) {
            let ended = self.follow(&stop);
            let mut s = self.state();
            if let (Err(e), true) = (&ended, s.healthy) {
                tracing::warn!("replica {} is down: {e}", self.url);
            }
            // What it held is unknown from here on; a restarted replica starts empty anyway.
            s.healthy = false;
            s.blocks.clear();
            drop(s);
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    fn follow(&self, stop: &AtomicBool) -> Result<(), String> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(2)))
            .http_status_as_error(false)
            .build()
            .into();
        let mut req = agent.get(format!("{}/kv_events", self.url));
        if let Some(auth) = self.authorization() {
            req = req.header("Authorization", auth);
        }
        let resp = req.call().map_err(|e| e.to_string())?;
        if resp.status() != 200 {
            return Err(format!("/kv_events answered {}", resp.status()));
        }
        let mut name = String::new();
        for line in BufReader::new(resp.into_body().into_reader()).lines() {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            let line = line.map_err(|e| e.to_string())?;
            if let Some(n) = line.strip_prefix("event: ") {
                name = n.to_string();
            } else if let Some(d) = line.strip_prefix("data: ") {
                let v: Value = serde_json::from_str(d).map_err(|e| e.to_string())?;
                self.apply(&std::mem::take(&mut name), &v)?;
            }
        }
        Err("the event stream ended".into())
    }

    fn apply(&self, name: &str, v: &Value) -> Result<(), String> {
        let mut s = self.state();
        match name {
            "config" => {
                if v["hash"] != BLOCK_HASH {
                    return Err(format!(
                        "unknown block hash {} (need {BLOCK_HASH})",
                        v["hash"]
                    ));
                }
                s.block_size = v["block_size"].as_u64().unwrap_or(0) as usize;
                s.healthy = true;
                tracing::info!("replica {} is up (blocks of {})", self.url, s.block_size);
            }
            "stored" => {
                if let Some(h) = v["hash"].as_u64() {
                    *s.blocks.entry(h).or_default() += 1;
                }
            }
            "removed" => {
                if let Some(h) = v["hash"].as_u64() {
                    s.forget(&[h]);
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Block size and in-flight count, or `None` while the replica is down.
    pub fn load(&self) -> Option<(usize, usize)> {
        let s = self.state();
        s.healthy.then_some((s.block_size, s.in_flight))
    }

    /// How many of `hashes` (a prompt's chain, in order) the replica holds from the start.
    pub fn matched(&self, hashes: &[u64]) -> usize {
        let s = self.state();
        hashes
            .iter()
            .take_while(|h| s.blocks.contains_key(h))
            .count()
    }

    /// A request is sent here with a prompt of these block hashes: they count as held from now
    /// on (the replica stores them as it runs the prompt), so the next request with the same
    /// prefix follows this one before the replica reports them.
    pub fn begin(&self, hashes: &[u64]) {
        let mut s = self.state();
        s.in_flight += 1;
        s.routed += 1;
        for &h in hashes {
            *s.blocks.entry(h).or_default() += 1;
        }
    }

    pub fn end(&self) {
        let mut s = self.state();
        s.in_flight = s.in_flight.saturating_sub(1);
    }

    /// A request sent here with a prompt of these block hashes failed before the replica
    /// answered: it goes elsewhere, and the blocks `begin` counted are not coming. (A replica
    /// that died is marked down by its watcher, whose stream drops with it.)
    pub fn failed_before_start(&self, hashes: &[u64]) {
        let mut s = self.state();
        s.forget(hashes);
        s.in_flight = s.in_flight.saturating_sub(1);
        s.routed = s.routed.saturating_sub(1);
        s.retried_away += 1;
    }

    pub fn stats(&self) -> ReplicaStats {
        let s = self.state();
        ReplicaStats {
            url: self.url.clone(),
            healthy: s.healthy,
            cached_blocks: s.blocks.len(),
            in_flight: s.in_flight,
            routed: s.routed,
            failed_before_start: s.retried_away,
        }
    }
}
