//! `trtllm serve`: an OpenAI-compatible HTTP server over the LLM API — `/v1/models`,
//! `/v1/completions`, `/v1/chat/completions` (with server-sent-event streaming), `/health`
//! and Prometheus `/metrics`.
//!
//! Architecture invariant: the server only translates. Parameters become `SamplingParams`,
//! prompts go through `LLM`, and every scheduling decision stays with the executor; the async
//! runtime never blocks on the engine (streams are drained on blocking threads).

mod error;
mod format;
mod generation;
mod handlers;
mod metrics;
mod protocol;
mod state;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::middleware::from_fn_with_state;
use axum::routing::{get, post};
use axum::Router;
use trtllm_api::LLM;

pub use error::ServeError;

#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub host: String,
    /// 0 picks a free port (printed at start).
    pub port: u16,
    /// Clients must send `Authorization: Bearer KEY` to /v1 routes.
    pub api_key: Option<String>,
    /// The model id clients name in requests.
    pub served_model_name: String,
    /// Larger bodies are refused with 413.
    pub max_body_bytes: usize,
    /// More generation requests in flight than this are refused with 503.
    pub max_pending_requests: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8000,
            api_key: None,
            served_model_name: "trtllm".into(),
            max_body_bytes: 4 << 20,
            max_pending_requests: 1024,
        }
    }
}

/// The application: routes, auth on /v1, error counting and the body limit.
pub fn router(llm: LLM, config: ServeConfig) -> Router {
    let st = Arc::new(state::AppState::new(llm, config));
    let v1 = Router::new()
        .route("/v1/models", get(handlers::models))
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/chat/completions", post(handlers::chat))
        .route_layer(from_fn_with_state(st.clone(), handlers::auth));
    Router::new()
        .merge(v1)
        .route("/health", get(handlers::health))
        .route("/metrics", get(handlers::metrics))
        .fallback(handlers::not_found)
        .layer(from_fn_with_state(st.clone(), handlers::count_errors))
        // JsonBody enforces `max_body_bytes` itself, answering 413 in OpenAI's shape.
        .layer(DefaultBodyLimit::disable())
        .with_state(st)
}

/// Serves until SIGINT or SIGTERM, then lets open responses finish and shuts the executor
/// down. Prints `listening on http://ADDR` to stderr once bound.
pub fn serve(llm: LLM, config: ServeConfig) -> Result<(), ServeError> {
    let addr = format!("{}:{}", config.host, config.port);
    // Each request in flight holds a blocking thread per prompt that drains its stream; size the
    // pool so the admission limit, not the pool, is what turns requests away.
    let blocking = config.max_pending_requests.saturating_mul(2).max(64);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(blocking)
        .enable_all()
        .build()
        .map_err(|e| ServeError::Internal(format!("tokio runtime: {e}")))?;
    rt.block_on(async move {
        let listen_err = |e| ServeError::Listen {
            addr: addr.clone(),
            source: e,
        };
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(listen_err)?;
        let local = listener.local_addr().map_err(listen_err)?;
        eprintln!("listening on http://{local}");
        axum::serve(listener, router(llm, config))
            .with_graceful_shutdown(shutdown_signal())
            .await
            .map_err(listen_err)
    })
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
