//! The server's accept loop: HTTP/1.1 connections with a cap and a header (and idle) timeout.
//!
//! `axum::serve` builds hyper without a timer, so hyper's header timeout never runs: a client
//! that sends half a request, or keeps an idle keep-alive connection, held its socket (and a
//! task, and up to ~400 KB of header buffer) for good, and enough of them ran the process out
//! of file descriptors. Here every connection must send each request's headers within
//! `header_timeout` of connecting or of its previous response, and at most
//! `max_http_connections` plain HTTP connections are open at once: past that the loop stops
//! accepting and new clients wait in the kernel's listen backlog. A connection upgraded to a
//! WebSocket leaves this count at the upgrade (the relay caps those with its own
//! `max_connections`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{Semaphore, watch};

/// Limits of the accept loop.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnectionLimits {
    /// Most plain HTTP connections open at once (WebSockets not counted once upgraded).
    pub max_http_connections: usize,
    /// Longest wait for a request's headers, counted from the connection's start or from the
    /// end of its previous response; the connection is closed then.
    pub header_timeout: Duration,
}

/// Serves `app` on `listener` until `stop` says so (or its sender is gone), then asks every
/// connection to finish its request in flight and close, and returns once all have.
pub(crate) async fn serve<L>(
    mut listener: L,
    app: Router,
    limits: ConnectionLimits,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()>
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    // `Semaphore::MAX_PERMITS` is far above any useful cap; `acquire_many` takes a u32.
    let capacity = limits.max_http_connections.clamp(1, u32::MAX as usize);
    let slots = Arc::new(Semaphore::new(capacity));
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    loop {
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                // Never closed; treat it as a stop all the same.
                Err(_) => break,
            },
            _ = stop.wait_for(|stop| *stop) => break,
        };
        let (io, remote) = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|stop| *stop) => break,
        };
        let router = app.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            // What `into_make_service_with_connect_info` gives handlers (the auth limiter and
            // the logs key on it).
            request.extensions_mut().insert(ConnectInfo(remote));
            let router = router.clone();
            async move {
                let request = request.map(axum::body::Body::new);
                Ok::<_, Infallible>(
                    tower::ServiceExt::oneshot(router, request)
                        .await
                        .unwrap_or_else(|never| match never {}),
                )
            }
        });
        let connection = http1
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        // Not hyper-util's `GracefulShutdown`: it does not take hyper's HTTP/1 connection with
        // upgrades. The slot also tells the loop's end when every connection is gone.
        let mut stop = stop.clone();
        tokio::spawn(async move {
            // Given back when the connection ends (for an upgrade: once the WebSocket has its
            // socket).
            let _slot = slot;
            tokio::pin!(connection);
            let mut stopping = false;
            loop {
                tokio::select! {
                    served = connection.as_mut() => {
                        if let Err(e) = served {
                            tracing::debug!(%remote, error = %e, "http connection ended");
                        }
                        break;
                    }
                    _ = stop.wait_for(|stop| *stop), if !stopping => {
                        stopping = true;
                        connection.as_mut().graceful_shutdown();
                    }
                }
            }
        });
    }
    drop(listener);
    // Every slot back: every connection has ended.
    let _all = slots.acquire_many(capacity as u32).await;
    Ok(())
}
