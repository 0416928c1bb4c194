//! What every handler shares: the LLM, the server's settings, its metrics and the count of
//! generation requests in flight (the overload limit).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;
use trtllm_api::{LoRARequest, LLM};

use crate::lora::Adapters;

use crate::metrics::Metrics;
use crate::{ServeConfig, ServeError};

pub struct AppState {
    pub llm: Arc<LLM>,
    pub config: ServeConfig,
    pub metrics: Metrics,
    pub created: u64,
    /// Sequences (prompts x n) of the generation requests in flight.
    pending: AtomicUsize,
    /// The LoRA adapters served by name.
    adapters: Mutex<Adapters>,
    /// Why every open response must fail now, once that is so.
    stopping: watch::Sender<Option<String>>,
}

impl AppState {
    pub fn new(llm: LLM, config: ServeConfig) -> Self {
        Self {
            llm: Arc::new(llm),
            adapters: Mutex::new(Adapters::new(&config.lora_modules)),
            config,
            metrics: Metrics::default(),
            created: unix_time(),
            pending: AtomicUsize::new(0),
            stopping: watch::Sender::new(None),
        }
    }

    /// Fails every open response, and every one started from now on, with `why`.
    pub fn fail_open_responses(&self, why: String) {
        self.stopping.send_replace(Some(why));
    }

    /// Resolves (with the reason) once open responses must fail.
    pub fn stopping(&self) -> watch::Receiver<Option<String>> {
        self.stopping.subscribe()
    }

    /// Counts a request's `sequences` in, or refuses it when they would take the sequences in
    /// flight past `max_pending_sequences` (a request alone is never refused here: its size is
    /// bounded by `max_sequences_per_request`).
    pub fn admit(self: &Arc<Self>, sequences: usize) -> Result<Admission, ServeError> {
        let limit = self.config.max_pending_sequences;
        let before = self.pending.fetch_add(sequences, Ordering::SeqCst);
        if before > 0 && before + sequences > limit {
            self.pending.fetch_sub(sequences, Ordering::SeqCst);
            return Err(ServeError::Overloaded(format!(
                "{before} sequences in flight; {sequences} more would pass the limit of {limit} \
                 (--max-pending-sequences); retry later"
            )));
        }
        self.metrics.in_flight(1);
        Ok(Admission {
            state: self.clone(),
            sequences,
        })
    }

    /// The id a response names: the one the request gave, which must be served, or the first
    /// (one model is served, under each of its names); and the LoRA adapter the name selects.
    pub fn check_model(
        &self,
        model: Option<&str>,
    ) -> Result<(String, Option<LoRARequest>), ServeError> {
        let names = &self.config.served_model_names;
        match model {
            Some(m) if names.iter().any(|n| n == m) => Ok((m.to_string(), None)),
            Some(m) => match self.adapters().get(m) {
                Some(lora) => Ok((m.to_string(), Some(lora))),
                None => Err(ServeError::ModelNotFound(m.to_string())),
            },
            None => Ok((names.first().cloned().unwrap_or_default(), None)),
        }
    }

    pub fn adapters(&self) -> MutexGuard<'_, Adapters> {
        self.adapters.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A generation request in flight; its sequences are counted out when dropped.
pub struct Admission {
    state: Arc<AppState>,
    sequences: usize,
}

impl Admission {
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.state
            .pending
            .fetch_sub(self.sequences, Ordering::SeqCst);
        self.state.metrics.in_flight(-1);
    }
}

pub fn unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
