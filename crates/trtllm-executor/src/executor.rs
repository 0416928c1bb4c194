//! The executor front and its worker thread.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{unbounded, Sender};
use trtllm_builder::runtime::{EngineConfig, GenerationSession, ModelRunner, Session};

use crate::request::{GenerationRequest, GenerationResult, RequestEvent};
use crate::{ExecutorError, Result};

enum Job {
    Generate {
        request: GenerationRequest,
        events: Sender<RequestEvent>,
        cancel: Arc<AtomicBool>,
    },
    /// Per-token negative log-likelihoods of a sequence (perplexity).
    Score {
        ids: Vec<u32>,
        reply: Sender<Result<Vec<f64>>>,
    },
}

pub struct GenerationExecutor {
    jobs: Option<Sender<Job>>,
    worker: Option<JoinHandle<()>>,
    next_id: AtomicU64,
    /// Cancel flags of requests not yet finished, for `abort_request` by id.
    cancels: Mutex<HashMap<u64, std::sync::Weak<AtomicBool>>>,
    config: EngineConfig,
}

impl GenerationExecutor {
    /// Opens the engine in `dir` and starts the worker.
    pub fn new(dir: &Path) -> Result<Self> {
        let session = Session::open(dir)?;
        let runner = session.model_runner()?;
        let config = runner.engine_config().clone();
        let (tx, rx) = unbounded::<Job>();
        let worker = std::thread::Builder::new()
            .name("trtllm-executor".into())
            .spawn(move || {
                for job in rx {
                    match job {
                        Job::Generate {
                            request,
                            events,
                            cancel,
                        } => run_generation(&runner, request, events, cancel),
                        Job::Score { ids, reply } => {
                            let _ = reply.send(runner.score(&ids).map_err(ExecutorError::from));
                        }
                    }
                }
            })
            .map_err(|e| {
                ExecutorError::Runtime(trtllm_builder::runtime::RuntimeError::Io {
                    path: dir.into(),
                    source: e,
                })
            })?;
        Ok(Self {
            jobs: Some(tx),
            worker: Some(worker),
            next_id: AtomicU64::new(1),
            cancels: Mutex::default(),
            config,
        })
    }

    pub fn engine_config(&self) -> &EngineConfig {
        &self.config
    }

    /// Queues a request; its tokens stream through the returned handle.
    pub fn submit(&self, request: GenerationRequest) -> Result<GenerationResult> {
        let jobs = self.jobs.as_ref().ok_or(ExecutorError::ShutDown)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = unbounded();
        let cancel = Arc::new(AtomicBool::new(false));
        let client_id = request.client_id;
        {
            let mut cancels = self.cancels.lock().unwrap_or_else(|e| e.into_inner());
            cancels.retain(|_, w| w.strong_count() > 0);
            cancels.insert(id, Arc::downgrade(&cancel));
        }
        jobs.send(Job::Generate {
            request,
            events: tx,
            cancel: cancel.clone(),
        })
        .map_err(|_| ExecutorError::ShutDown)?;
        Ok(GenerationResult {
            id,
            client_id,
            events: rx,
            cancel,
            done: false,
        })
    }

    /// Negative log-likelihood of each of `ids[1..]` given the tokens before it.
    pub fn score(&self, ids: Vec<u32>) -> Result<Vec<f64>> {
        let jobs = self.jobs.as_ref().ok_or(ExecutorError::ShutDown)?;
        let (reply, rx) = crossbeam_channel::bounded(1);
        jobs.send(Job::Score { ids, reply })
            .map_err(|_| ExecutorError::ShutDown)?;
        rx.recv().unwrap_or(Err(ExecutorError::ShutDown))
    }

    /// Cancels request `id` if it has not finished; returns whether it was still known.
    pub fn abort_request(&self, id: u64) -> bool {
        let cancels = self.cancels.lock().unwrap_or_else(|e| e.into_inner());
        match cancels.get(&id).and_then(|w| w.upgrade()) {
            Some(flag) => {
                flag.store(true, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// Stops accepting requests, lets the worker finish the queue, and joins it.
    pub fn shutdown(&mut self) {
        self.jobs = None;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl Drop for GenerationExecutor {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn run_generation(
    runner: &ModelRunner,
    request: GenerationRequest,
    events: Sender<RequestEvent>,
    cancel: Arc<AtomicBool>,
) {
    if cancel.load(Ordering::Relaxed) {
        let out = trtllm_builder::runtime::GenerationOutput {
            tokens: Vec::new(),
            finish_reason: trtllm_builder::runtime::FinishReason::Cancelled,
        };
        let _ = events.send(RequestEvent::Finished(out));
        return;
    }
    let session = GenerationSession::new(runner);
    let result = session.generate(&request.prompt_token_ids, &request.params, |tok| {
        // A caller that dropped its handle no longer wants tokens.
        if events.send(RequestEvent::Tokens(vec![tok])).is_err() || cancel.load(Ordering::Relaxed) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    let ev = match result {
        Ok(out) => RequestEvent::Finished(out),
        Err(e) => RequestEvent::Failed(e.into()),
    };
    let _ = events.send(ev);
}
