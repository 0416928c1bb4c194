//! `trtllm router --backend URL ...`: a cache-aware OpenAI-compatible front over `trtllm serve`
//! replicas.

use anyhow::Result;
use clap::Args;
use trtllm_serve::{Policy, RouterConfig};

use crate::serve::ListenArgs;

#[derive(Args)]
pub struct RouterArgs {
    /// A replica's base URL (`http://HOST:PORT`); repeat for each.
    #[arg(long = "backend", required = true)]
    backends: Vec<String>,
    /// cache-aware (longest cached prefix, else least loaded), least-loaded or round-robin.
    #[arg(long, default_value = "cache-aware")]
    policy: Policy,
    #[command(flatten)]
    listen: ListenArgs,
    /// The key the replicas require.
    #[arg(long, env = "TRTLLM_BACKEND_API_KEY", hide_env_values = true)]
    backend_api_key: Option<String>,
    /// Request bodies larger than this get 413.
    #[arg(long, default_value_t = 32 << 20)]
    max_body_bytes: usize,
    /// Open connections beyond this get 503 and are closed.
    #[arg(long, default_value_t = 4096)]
    max_connections: usize,
}

pub fn router(a: RouterArgs) -> Result<()> {
    Ok(trtllm_serve::serve_router(RouterConfig {
        host: a.listen.host,
        port: a.listen.port,
        backends: a.backends,
        policy: a.policy,
        api_key: a.listen.api_key,
        backend_api_key: a.backend_api_key,
        max_body_bytes: a.max_body_bytes,
        max_connections: a.max_connections,
    })?)
}
