//! `trtllm serve`: an OpenAI-compatible HTTP server over the LLM API — `/v1/models`,
//! `/v1/completions`, `/v1/chat/completions` (with server-sent-event streaming), vLLM's
//! `/tokenize` and `/detokenize`, `/version`, `/health` and Prometheus `/metrics`. Logs its
//! start and one line per request through `tracing`.
//!
//! Architecture invariant: the server only translates. Parameters become `SamplingParams`,
//! prompts go through `LLM`, and every scheduling decision stays with the executor; the async
//! runtime never blocks on the engine (streams are drained on blocking threads).

mod chat;
mod error;
mod format;
mod generation;
mod handlers;
mod kv_events;
mod listen;
mod lora;
mod metrics;
mod protocol;
mod router;
mod state;
mod tokenize;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::middleware::from_fn_with_state;
use axum::routing::{get, post};
use axum::Router;
use trtllm_api::runtime::quant::QuantAlgo;
use trtllm_api::{ToolParser, LLM};

pub use error::ServeError;
pub use router::{serve_router, Policy, RouterConfig};
use state::AppState;

#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub host: String,
    /// 0 picks a free port (printed at start).
    pub port: u16,
    /// Clients must send `Authorization: Bearer KEY` to /v1 routes.
    pub api_key: Option<String>,
    /// The model ids clients may name in requests (at least one; the first is the default).
    pub served_model_names: Vec<String>,
    /// Larger bodies are refused with 413.
    pub max_body_bytes: usize,
    /// Sequences (prompts x n) in flight past this are refused with 503.
    pub max_pending_sequences: usize,
    /// A request asking for more sequences than this is refused with 400.
    pub max_sequences_per_request: usize,
    /// Open connections past this get 503 and are closed.
    pub max_connections: usize,
    /// A request's headers (and the next request on an idle keep-alive connection) must
    /// arrive within this; so must each piece of its body.
    pub header_timeout: std::time::Duration,
    /// Fields we do not implement are warned of and ignored instead of refused with 400 (for
    /// clients that always send extras).
    pub lenient_requests: bool,
    /// How models write tool calls, for `tool_choice: auto`; None: read from the chat
    /// template's markers.
    pub tool_call_parser: Option<ToolParser>,
    /// LoRA adapters served from the start, as (model name, PEFT directory): a request naming
    /// one as its `model` runs with it (vLLM's `--lora-modules`).
    pub lora_modules: Vec<(String, std::path::PathBuf)>,
    /// What SIGINT and SIGTERM do to the responses still open.
    pub on_signal: OnSignal,
}

/// What a stop signal does to the responses still open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnSignal {
    /// Stop accepting, let open responses finish (up to 30 s), shut the executor down.
    #[default]
    Drain,
    /// For rank 0 of an `mpirun` job: mpirun signals it when another rank exits (or when it is
    /// itself signalled) and kills it a second later, and an engine waiting on lost ranks can
    /// neither finish a response nor shut down. So fail every open response at once with an
    /// error saying why, and exit with status 1.
    FailAndExit,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8000,
            api_key: None,
            served_model_names: vec!["trtllm".into()],
            max_body_bytes: 4 << 20,
            max_pending_sequences: 1024,
            max_sequences_per_request: 256,
            max_connections: 4096,
            header_timeout: std::time::Duration::from_secs(20),
            lenient_requests: false,
            tool_call_parser: None,
            lora_modules: Vec::new(),
            on_signal: OnSignal::Drain,
        }
    }
}

/// The application: routes, auth on /v1, error counting and the body limit.
pub fn router(llm: LLM, config: ServeConfig) -> Router {
    routes(Arc::new(AppState::new(llm, config)))
}

fn routes(st: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/models", get(handlers::models))
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/chat/completions", post(handlers::chat))
        .route("/v1/load_lora_adapter", post(lora::load))
        .route("/v1/unload_lora_adapter", post(lora::unload))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/kv_events", get(kv_events::kv_events))
        .route_layer(from_fn_with_state(st.clone(), handlers::auth));
    Router::new()
        .merge(v1)
        .route("/health", get(handlers::health))
        .route("/version", get(tokenize::version))
        .route("/metrics", get(handlers::metrics))
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(from_fn_with_state(st.clone(), handlers::count_errors))
        // JsonBody enforces `max_body_bytes` itself, answering 413 in OpenAI's shape.
        .layer(DefaultBodyLimit::disable())
        .with_state(st)
}

/// Serves until SIGINT or SIGTERM, then lets open responses finish and shuts the executor
/// down, or fails them and exits (`ServeConfig::on_signal`). Prints `listening on
/// http://ADDR` to stderr once bound.
pub fn serve(llm: LLM, config: ServeConfig) -> Result<(), ServeError> {
    if config
        .api_key
        .as_deref()
        .is_some_and(|k| k.trim().is_empty())
    {
        return Err(ServeError::Config(
            "the API key is empty (--api-key / TRTLLM_API_KEY): give a key, or none".into(),
        ));
    }
    // A bad adapter stops the server before it listens, naming the adapter and its fault.
    for lora in lora::Adapters::new(&config.lora_modules).list() {
        llm.executor()
            .preload_lora(&lora)
            .map_err(|e| ServeError::Config(format!("--lora-modules: {e}")))?;
    }
    let addr = format!("{}:{}", config.host, config.port);
    // Each request in flight holds a blocking thread that drains its streams, and briefly one
    // that submits them; size the pool so the admission limit, not the pool, turns requests away.
    let blocking = config.max_pending_sequences.saturating_mul(2).max(64);
    let limits = listen::ConnectionLimits {
        max_connections: config.max_connections,
        header_timeout: config.header_timeout,
    };
    let summary = summary(&llm, &config);
    let st = Arc::new(AppState::new(llm, config));
    let signalled = {
        let st = st.clone();
        async move {
            shutdown_signal().await;
            if st.config.on_signal == OnSignal::FailAndExit {
                st.fail_open_responses(
                    "the engine stopped: its MPI job is being torn down (one of its ranks exited, \
                     or mpirun was signalled); this request cannot complete"
                        .into(),
                );
            }
        }
    };
    listen::serve_on(
        &addr,
        limits,
        blocking,
        routes(st.clone()),
        signalled,
        move || tracing::info!("{summary}"),
    )?;
    if st.config.on_signal == OnSignal::FailAndExit {
        // Without running destructors: the executor would wait on the lost ranks forever.
        tracing::error!(
            "stopped with its MPI job (signalled, or a rank exited); open responses failed"
        );
        std::process::exit(1);
    }
    Ok(())
}

/// What is being served, logged once bound.
fn summary(llm: &LLM, config: &ServeConfig) -> String {
    let exec = llm.executor();
    let e = exec.engine_config();
    let kv = exec
        .kv_cache_summary()
        .map_or("-".into(), |k| k.total_blocks.to_string());
    let weights = match (e.build.keep_quantized, e.build.quant.quant_algo()) {
        (true, _) => "as the checkpoint quantized them".to_string(),
        (false, QuantAlgo::NoQuant) => e.build.dtype.map_or("float32", |d| d.name()).into(),
        (false, algo) => algo.to_string(),
    };
    format!(
        "serving {} as '{}': {} ({} layers), weights {weights}, KV cache {} in {kv} blocks, up \
         to {} sequences of {} tokens at once",
        llm.engine_dir().display(),
        config.served_model_names.join("', '"),
        e.model.architecture,
        e.model.num_layers,
        e.build.kv_cache_dtype.map_or("float32", |d| d.name()),
        e.build.max_batch_size,
        e.build.max_seq_len,
    )
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
