//! What every handler shares: the LLM, the server's settings, its metrics and the count of
//! generation requests in flight (the overload limit).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use trtllm_api::LLM;

use crate::metrics::Metrics;
use crate::{ServeConfig, ServeError};

pub struct AppState {
    pub llm: Arc<LLM>,
    pub config: ServeConfig,
    pub metrics: Metrics,
    pub created: u64,
    pending: AtomicUsize,
}

impl AppState {
    pub fn new(llm: LLM, config: ServeConfig) -> Self {
        Self {
            llm: Arc::new(llm),
            config,
            metrics: Metrics::default(),
            created: unix_time(),
            pending: AtomicUsize::new(0),
        }
    }

    /// Counts a generation request in, or refuses it when `max_pending_requests` are in flight.
    pub fn admit(self: &Arc<Self>) -> Result<Admission, ServeError> {
        let before = self.pending.fetch_add(1, Ordering::SeqCst);
        if before >= self.config.max_pending_requests {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            return Err(ServeError::Overloaded(format!(
                "{before} requests in flight (limit {}); retry later",
                self.config.max_pending_requests
            )));
        }
        self.metrics.in_flight(1);
        Ok(Admission(self.clone()))
    }

    /// The id a response names: the one the request gave, which must be served, or the first
    /// (one model is served, under each of its names).
    pub fn check_model(&self, model: Option<&str>) -> Result<String, ServeError> {
        let names = &self.config.served_model_names;
        match model {
            Some(m) if names.iter().any(|n| n == m) => Ok(m.to_string()),
            Some(m) => Err(ServeError::ModelNotFound(m.to_string())),
            None => Ok(names.first().cloned().unwrap_or_default()),
        }
    }
}

/// A generation request in flight; counted out when dropped.
pub struct Admission(Arc<AppState>);

impl Admission {
    pub fn state(&self) -> &Arc<AppState> {
        &self.0
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::SeqCst);
        self.0.metrics.in_flight(-1);
    }
}

pub fn unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
