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
use tokio::net::{TcpListener, TcpSocket, TcpStream};
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

/// Binds `addr` with a listen backlog for `max_connections` (tokio's default, 1,024, overflows
/// when a thousand clients reconnect at once: the kernel drops their SYNs and each retries a
/// second later, `/health` included). The kernel caps it at `net.core.somaxconn`.
pub async fn bind(addr: &str, max_connections: usize) -> std::io::Result<TcpListener> {
    let backlog = max_connections.clamp(1024, 65535) as u32;
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket = match a {
            std::net::SocketAddr::V4(_) => TcpSocket::new_v4()?,
            std::net::SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(a).and_then(|()| socket.listen(backlog)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last
        .unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::AddrNotAvailable, "no address")))
}

/// Descriptors beyond the connections: the engine's files, logs, the listener.
const SPARE_FILES: u64 = 64;

/// Each connection holds a descriptor, and the soft limit is often 1,024: it is raised to
/// what `max_connections` needs, up to the hard limit (as servers and the Go runtime do); a
/// hard limit below that is warned of, since connections past it are refused by the kernel.
pub fn raise_open_file_limit(max_connections: usize) {
    #[cfg(unix)]
    {
        let want = max_connections as u64 + SPARE_FILES;
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit read and write the one struct passed by pointer.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                return;
            }
            if lim.rlim_cur >= want {
                return;
            }
            let raised = libc::rlimit {
                rlim_cur: want.min(lim.rlim_max),
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = raised.rlim_cur;
            }
        }
        if lim.rlim_cur < want {
            tracing::warn!(
                "the open-file limit is {} (hard limit {}): fewer than --max-connections {max_connections} can be open",
                lim.rlim_cur,
                lim.rlim_max
            );
        }
    }
}

/// Serves `app` on `addr` until `shutdown` resolves, on a runtime of its own with up to
/// `blocking` blocking threads. Prints `listening on http://ADDR` to stderr once bound, after
/// `bound`.
pub fn serve_on(
    addr: &str,
    limits: ConnectionLimits,
    blocking: usize,
    app: Router,
    shutdown: impl std::future::Future<Output = ()>,
    bound: impl FnOnce(),
) -> Result<(), ServeError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(blocking)
        .enable_all()
        .build()
        .map_err(|e| ServeError::Internal(format!("tokio runtime: {e}")))?;
    let served = rt.block_on(async move {
        let listen_err = |e| ServeError::Listen {
            addr: addr.to_string(),
            source: e,
        };
        let listener = bind(addr, limits.max_connections)
            .await
            .map_err(listen_err)?;
        let local = listener.local_addr().map_err(listen_err)?;
        bound();
        eprintln!("listening on http://{local}");
        raise_open_file_limit(limits.max_connections);
        run(listener, app, limits, shutdown).await;
        Ok(())
    });
    // Blocking threads still waiting on an engine (responses past the drain, or an engine that
    // lost its ranks) must not hold the caller: they end when the executor does.
    rt.shutdown_background();
    served
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
        // Streamed tokens are small writes: without this, Nagle's algorithm holds each one
        // back until the previous is acknowledged, and a delayed ACK makes that 40 ms.
        let _ = stream.set_nodelay(true);
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
