//! `trtllm router`: an OpenAI-compatible front over several `trtllm serve` replicas. Each
//! completion or chat request goes to the replica that holds the longest cached prefix of its
//! prompt (the prompt's block hashes, `trtllm_api::runtime::block_hashes`, against each
//! replica's blocks as its `/kv_events` reports them, plus the prompts routed to it since),
//! else to the least loaded one. A request a replica does not answer (gone, refusing
//! connections) is sent to another before anything reached the client; once a replica answers,
//! its status, body and stream pass through unchanged, so errors keep `serve`'s shapes.

mod replica;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio_stream::wrappers::ReceiverStream;
use trtllm_api::runtime::block_hashes;

use crate::handlers::bearer_matches;
use crate::{listen, ServeError};
use replica::Replica;

/// How a replica is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// The longest cached prefix, else the fewest requests in flight.
    CacheAware,
    /// The fewest requests in flight.
    LeastLoaded,
    /// Each replica in turn (a baseline to compare with).
    RoundRobin,
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cache-aware" => Ok(Self::CacheAware),
            "least-loaded" => Ok(Self::LeastLoaded),
            "round-robin" => Ok(Self::RoundRobin),
            _ => Err(format!(
                "unknown policy {s:?} (cache-aware, least-loaded, round-robin)"
            )),
        }
    }
}

pub struct RouterConfig {
    pub host: String,
    pub port: u16,
    /// The replicas' base URLs (`http://HOST:PORT`).
    pub backends: Vec<String>,
    pub policy: Policy,
    /// The key clients must give, if any.
    pub api_key: Option<String>,
    /// The key the replicas want, if any.
    pub backend_api_key: Option<String>,
    pub max_body_bytes: usize,
    pub max_connections: usize,
}

struct RouterState {
    replicas: Vec<Arc<Replica>>,
    config: RouterConfig,
    next: AtomicUsize,
    /// Held from choosing a replica to counting the request on it, so requests with one prefix
    /// arriving together follow the first instead of each seeing an empty cache.
    choosing: std::sync::Mutex<()>,
    agent: ureq::Agent,
}

/// Routes until SIGINT or SIGTERM. Prints `listening on http://ADDR` to stderr once bound.
pub fn serve_router(config: RouterConfig) -> Result<(), ServeError> {
    if config.backends.is_empty() {
        return Err(ServeError::Config("give at least one --backend URL".into()));
    }
    let replicas: Vec<_> = config
        .backends
        .iter()
        .map(|u| Replica::new(u, config.backend_api_key.clone()))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    for r in &replicas {
        let (r, stop) = (r.clone(), stop.clone());
        std::thread::Builder::new()
            .name("trtllm-router-watch".into())
            .spawn(move || r.watch(stop))
            .map_err(|e| ServeError::Internal(format!("watcher thread: {e}")))?;
    }
    let agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(5)))
        .http_status_as_error(false)
        .build()
        .into();
    let addr = format!("{}:{}", config.host, config.port);
    let limits = listen::ConnectionLimits {
        max_connections: config.max_connections,
        header_timeout: Duration::from_secs(20),
    };
    let state = Arc::new(RouterState {
        replicas,
        config,
        next: AtomicUsize::new(0),
        choosing: std::sync::Mutex::new(()),
        agent,
    });
    // Each request in flight holds a blocking thread (the call to its replica, then the reader
    // of its response).
    let blocking = limits.max_connections.max(64);
    let result = listen::serve_on(
        &addr,
        limits,
        blocking,
        app(state),
        crate::shutdown_signal(),
        || {},
    );
    stop.store(true, Ordering::Relaxed);
    result
}

fn app(st: Arc<RouterState>) -> Router {
    Router::new()
        .route("/v1/completions", post(generate))
        .route("/v1/chat/completions", post(generate))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/router/stats", get(stats))
        .fallback(
            |uri: Uri| async move { ServeError::NotFound(format!("no route for {}", uri.path())) },
        )
        .with_state(st)
}

async fn generate(
    State(st): State<Arc<RouterState>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let run = move || -> Result<Response, ServeError> {
        st.check_key(&headers)?;
        if body.len() > st.config.max_body_bytes {
            return Err(ServeError::TooLarge(format!(
                "the body has {} bytes; the limit is {}",
                body.len(),
                st.config.max_body_bytes
            )));
        }
        let request: Value = serde_json::from_slice(&body)
            .map_err(|e| ServeError::bad(format!("the body is not JSON: {e}"), None))?;
        st.forward(&path, &request, &body)
    };
    blocking(run).await
}

async fn models(State(st): State<Arc<RouterState>>, headers: HeaderMap) -> Response {
    let run = move || -> Result<Response, ServeError> {
        st.check_key(&headers)?;
        for r in st.replicas.iter().filter(|r| r.load().is_some()) {
            let mut req = st.agent.get(format!("{}/v1/models", r.url));
            if let Some(auth) = r.authorization() {
                req = req.header("Authorization", auth);
            }
            if let Ok(mut resp) = req.call() {
                let status =
                    StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
                let text = resp.body_mut().read_to_string().unwrap_or_default();
                let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                return Ok((status, Json(v)).into_response());
            }
        }
        Err(no_replica())
    };
    blocking(run).await
}

/// Runs `run` (blocking HTTP to the replicas) off the async runtime.
async fn blocking(run: impl FnOnce() -> Result<Response, ServeError> + Send + 'static) -> Response {
    match tokio::task::spawn_blocking(run).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => e.into_response(),
        Err(e) => ServeError::Internal(e.to_string()).into_response(),
    }
}

async fn health(State(st): State<Arc<RouterState>>) -> Response {
    match st.replicas.iter().any(|r| r.load().is_some()) {
        true => StatusCode::OK.into_response(),
        false => no_replica().into_response(),
    }
}

async fn stats(State(st): State<Arc<RouterState>>) -> Json<Value> {
    let policy = format!("{:?}", st.config.policy);
    let replicas: Vec<_> = st.replicas.iter().map(|r| r.stats()).collect();
    Json(json!({ "policy": policy, "replicas": replicas }))
}

fn no_replica() -> ServeError {
    ServeError::Overloaded("no replica is up; retry later".into())
}

impl RouterState {
    fn check_key(&self, headers: &HeaderMap) -> Result<(), ServeError> {
        match &self.config.api_key {
            Some(key) if !bearer_matches(headers, key) => Err(ServeError::Unauthorized),
            _ => Ok(()),
        }
    }

    /// Sends the request to the replica the policy picks, and to the next one while a replica
    /// fails to answer; the first answer passes through.
    fn forward(&self, path: &str, request: &Value, body: &Bytes) -> Result<Response, ServeError> {
        let tokens = match self.config.policy {
            Policy::CacheAware => self.prompt_tokens(path, request),
            _ => None,
        };
        let mut tried = Vec::new();
        loop {
            let choosing = self.choosing.lock().unwrap_or_else(|e| e.into_inner());
            let (i, hashes) = self
                .pick(tokens.as_deref(), &tried)
                .ok_or_else(no_replica)?;
            let replica = self.replicas[i].clone();
            replica.begin(&hashes);
            drop(choosing);
            let mut req = self
                .agent
                .post(format!("{}{path}", replica.url))
                .header("Content-Type", "application/json");
            if let Some(auth) = replica.authorization() {
                req = req.header("Authorization", auth);
            }
            match req.send(&body[..]) {
                Ok(resp) => return Ok(pass_through(replica, resp)),
                Err(e) => {
                    tracing::warn!(
                        "replica {} did not take a request ({e}); retrying",
                        replica.url
                    );
                    replica.failed_before_start(&hashes);
                    tried.push(i);
                }
            }
        }
    }

    /// The replica for a prompt of `tokens` (unknown: by load alone), and the hashes of the
    /// prompt's full blocks at that replica's block size.
    fn pick(&self, tokens: Option<&[u32]>, tried: &[usize]) -> Option<(usize, Vec<u64>)> {
        // (replica, requests in flight, the prompt's hashes at its block size)
        let mut up: Vec<(usize, usize, Vec<u64>)> = (0..self.replicas.len())
            .filter(|i| !tried.contains(i))
            .filter_map(|i| {
                let (bs, n) = self.replicas[i].load()?;
                let hashes = tokens.map_or_else(Vec::new, |t| block_hashes(t, bs, None));
                Some((i, n, hashes))
            })
            .collect();
        if up.is_empty() {
            return None;
        }
        let k = match self.config.policy {
            Policy::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed) % up.len(),
            Policy::LeastLoaded => (0..up.len()).min_by_key(|&k| (up[k].1, up[k].0))?,
            Policy::CacheAware => (0..up.len()).min_by_key(|&k| {
                let (i, n, hashes) = &up[k];
                let matched = self.replicas[*i].matched(hashes);
                (std::cmp::Reverse(matched), *n, *i)
            })?,
        };
        let (i, _, hashes) = up.swap_remove(k);
        Some((i, hashes))
    }

    /// The prompt's token ids: given as ids, or from a replica's `/tokenize` (text, or chat
    /// messages through the model's template); `None` when neither works (routed by load).
    fn prompt_tokens(&self, path: &str, request: &Value) -> Option<Vec<u32>> {
        let ids = |v: &Value| -> Option<Vec<u32>> {
            v.as_array()?
                .iter()
                .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
                .collect()
        };
        let ask = if path.ends_with("/chat/completions") {
            json!({ "messages": request.get("messages")? })
        } else {
            let prompt = request.get("prompt")?;
            let first = prompt.as_array().and_then(|a| a.first());
            match (prompt, first) {
                (Value::String(_), _) => json!({ "prompt": prompt }),
                (_, Some(Value::String(s))) => json!({ "prompt": s }),
                (_, Some(Value::Array(_))) => return ids(first?),
                _ => return ids(prompt),
            }
        };
        let r = self.replicas.iter().find(|r| r.load().is_some())?;
        let mut req = self.agent.post(format!("{}/tokenize", r.url));
        if let Some(auth) = r.authorization() {
            req = req.header("Authorization", auth);
        }
        let mut resp = req.send_json(&ask).ok()?;
        let v: Value = serde_json::from_str(&resp.body_mut().read_to_string().ok()?).ok()?;
        ids(&v["tokens"])
    }
}

/// The replica's answer as this server's: status, content type and body, streamed as it comes
/// (a reader thread per response; the request counts as in flight until it ends).
fn pass_through(replica: Arc<Replica>, resp: ureq::http::Response<ureq::Body>) -> Response {
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type = resp.headers().get("content-type").cloned();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(32);
    let url = replica.url.clone();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut reader = resp.into_body().into_reader();
        let mut buf = vec![0u8; 16 << 10];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if tx
                        .blocking_send(Ok(Bytes::copy_from_slice(&buf[..n])))
                        .is_err()
                    {
                        break; // the client is gone: dropping the reader ends the replica's work
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    break;
                }
            }
        }
        replica.end();
    });
    let mut out = Response::new(Body::from_stream(ReceiverStream::new(rx)));
    *out.status_mut() = status;
    if let Some(ct) = content_type {
        out.headers_mut().insert("content-type", ct);
    }
    if let Ok(v) = HeaderValue::from_str(&url) {
        out.headers_mut().insert("x-trtllm-replica", v);
    }
    out
}
