//! The accept loop: HTTP/1.1 connections through hyper with the hygiene a public server needs —
//! a deadline for each request's headers that also closes idle keep-alive connections (a
//! half-sent request or an idle socket cannot hold a file descriptor forever), a cap on open
//! connections answered with an OpenAI-shaped 503 past it, accept errors (out of descriptors)
//! survived, and a graceful shutdown that lets open responses finish.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::ServeError;

/// How connections are kept.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// Open connections past this get a 503 and are closed.
    pub max_connections: usize,
    /// A request's headers must arrive within this, counted from when the connection is ready
    /// for one: an idle keep-alive connection is closed after it too.
    pub header_timeout: Duration,
}

/// How long open responses may run on after the shutdown signal.
const DRAIN: Duration = Duration::from_secs(30);

/// Serves `app` on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, most often: let connections close, then go on.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tokio::spawn(refuse(stream, limits.max_connections));
            continue;
        };
        let conn =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            // A client that goes away or times out ends its connection; nothing to report.
            let _ = conn.await;
            drop(slot);
        });
    }
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("responses still open {DRAIN:?} after the shutdown signal; closing them");
    }
}

/// Answers a connection past the cap with a 503 in OpenAI's shape and closes it.
async fn refuse(mut stream: TcpStream, cap: usize) {
    let body = ServeError::Overloaded(format!(
        "{cap} connections open (--max-connections); retry later"
    ))
    .body()
    .to_string();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        stream.write_all(response.as_bytes()),
    )
    .await;
}
