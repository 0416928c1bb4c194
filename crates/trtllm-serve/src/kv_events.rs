//! `GET /kv_events`: the executor's KV-cache events as server-sent events, for a cache-aware
//! router over several replicas. The first event, `config`, says how to compute from a prompt's
//! token ids the hashes the others name (`trtllm_api::runtime::block_hashes`: blocks of
//! `block_size`, SipHash-1-3 chained from the adapter's id); then `stored` (a full block became
//! reusable) and `removed` (a cached block was evicted), from the moment of connection on. A
//! router that connects late learns only later blocks; one that reconnects after a restart of
//! this server starts from its empty cache.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use crossbeam_channel::RecvTimeoutError;
use serde_json::json;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use trtllm_api::runtime::KvCacheEvent;

use crate::state::AppState;

/// The hash `block_hashes` computes, named so a router can refuse one it does not know.
pub(crate) const BLOCK_HASH: &str = "siphash13-chain-v1";

pub async fn kv_events(
    State(st): State<Arc<AppState>>,
) -> Sse<impl tokio_stream::Stream<Item = Result<Event, Infallible>>> {
    let executor = st.llm.executor();
    let events = executor.subscribe_kv_events();
    let config = json!({
        "block_size": executor.kv_block_size(),
        "block_reuse": executor.block_reuse(),
        "hash": BLOCK_HASH,
    });
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(256);
    let first = Event::default().event("config").data(config.to_string());
    // The subscription is a blocking channel: drained on a blocking thread that ends when the
    // client goes away (checked between events) or the executor shuts down.
    tokio::task::spawn_blocking(move || {
        if tx.blocking_send(first).is_err() {
            return;
        }
        loop {
            match events.recv_timeout(Duration::from_millis(250)) {
                Ok(ev) => {
                    if tx.blocking_send(event(&ev)).is_err() {
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) if tx.is_closed() => return,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    });
    Sse::new(ReceiverStream::new(rx).map(Ok)).keep_alive(KeepAlive::default())
}

fn event(ev: &KvCacheEvent) -> Event {
    let (name, data) = match ev {
        KvCacheEvent::Stored {
            block_id,
            hash,
            parent_hash,
            num_tokens,
        } => (
            "stored",
            json!({
                "block_id": block_id,
                "hash": hash,
                "parent_hash": parent_hash,
                "num_tokens": num_tokens,
            }),
        ),
        KvCacheEvent::Removed { block_id, hash } => {
            ("removed", json!({"block_id": block_id, "hash": hash}))
        }
    };
    Event::default().event(name).data(data.to_string())
}
