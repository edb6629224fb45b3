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
//!
//! hyper has no write timeout either: a client that asked for a large answer (a pull page is
//! up to 8 MiB) and stopped reading held its connection slot and the answer's memory for good,
//! and enough such clients stopped the server accepting until it was restarted. [`Stalls`]
//! closes a connection whose writes make no progress for `response_write_timeout`.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Semaphore, watch};
use tokio::time::Sleep;

/// Limits of the accept loop.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnectionLimits {
    /// Most plain HTTP connections open at once (WebSockets not counted once upgraded).
    pub max_http_connections: usize,
    /// Longest wait for a request's headers, counted from the connection's start or from the
    /// end of its previous response; the connection is closed then.
    pub header_timeout: Duration,
    /// Longest a write to the client may make no progress (not a byte taken) before the
    /// connection is closed; not applied once the connection is upgraded.
    pub write_timeout: Duration,
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
        let upgraded = Arc::new(AtomicBool::new(false));
        let io = Stalls::new(io, limits.write_timeout, Arc::clone(&upgraded));
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            // What `into_make_service_with_connect_info` gives handlers (the auth limiter and
            // the logs key on it).
            request.extensions_mut().insert(ConnectInfo(remote));
            let router = router.clone();
            let upgraded = Arc::clone(&upgraded);
            async move {
                let request = request.map(axum::body::Body::new);
                let response = tower::ServiceExt::oneshot(router, request)
                    .await
                    .unwrap_or_else(|never| match never {});
                // From here on the socket is the relay's, whose own write timeout and queue
                // bounds watch it; a subscriber may rightly be quiet longer than an answer.
                if response.status() == hyper::StatusCode::SWITCHING_PROTOCOLS {
                    upgraded.store(true, Ordering::Relaxed);
                }
                Ok::<_, Infallible>(response)
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

/// A connection's socket that fails a write (or flush, or shutdown) which has made no progress
/// for `timeout`: hyper then drops the connection, and with it the answer it was writing.
/// Progress is any byte taken, so a slow reader that keeps reading is never cut off. Off once
/// `upgraded` is set.
struct Stalls<T> {
    inner: T,
    timeout: Duration,
    upgraded: Arc<AtomicBool>,
    /// Running while a write is pending; reset by any progress.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<T> Stalls<T> {
    fn new(inner: T, timeout: Duration, upgraded: Arc<AtomicBool>) -> Self {
        Self {
            inner,
            timeout,
            upgraded,
            stalled: None,
        }
    }

    /// What a write returned, turned into an error when it has been pending too long.
    fn watch<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        if polled.is_ready() || self.upgraded.load(Ordering::Relaxed) {
            self.stalled = None;
            return polled;
        }
        let timeout = self.timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.stalled = None;
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client took no byte of the response within the write timeout",
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Stalls<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Stalls<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A write that makes no progress fails after the timeout; once the connection is
    /// upgraded it waits for the reader however long it takes (the relay watches it then).
    #[tokio::test(start_paused = true)]
    async fn a_stalled_write_fails_after_the_timeout_unless_upgraded() {
        for upgraded in [false, true] {
            let (near, mut far) = tokio::io::duplex(16);
            let flag = Arc::new(AtomicBool::new(upgraded));
            let mut stalls = Stalls::new(near, Duration::from_millis(300), flag);
            // Fills the pipe; the next write has nowhere to go.
            stalls.write_all(&[0; 16]).await.expect("fits");
            let stalled = tokio::time::timeout(Duration::from_secs(60), stalls.write_all(&[1]));
            if upgraded {
                assert!(stalled.await.is_err(), "the upgraded write gave up");
                // The reader comes back: the write goes through.
                let mut got = [0; 16];
                far.read_exact(&mut got).await.expect("read");
                stalls.write_all(&[1]).await.expect("written");
            } else {
                let failed = stalled
                    .await
                    .expect("failed before 60 s")
                    .expect_err("fails");
                assert_eq!(failed.kind(), io::ErrorKind::TimedOut);
            }
        }
    }

    /// A reader that keeps taking bytes, however slowly, is never cut off.
    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_reading_gets_everything() {
        let (near, mut far) = tokio::io::duplex(16);
        let mut stalls = Stalls::new(
            near,
            Duration::from_millis(300),
            Arc::new(AtomicBool::new(false)),
        );
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut byte = [0; 1];
            while got.len() < 256 {
                // Each byte taken within the timeout, the whole far past it.
                tokio::time::sleep(Duration::from_millis(200)).await;
                far.read_exact(&mut byte).await.expect("read");
                got.push(byte[0]);
            }
            got
        });
        let sent: Vec<u8> = (0..=255).collect();
        stalls.write_all(&sent).await.expect("written whole");
        assert_eq!(reader.await.expect("reader"), sent);
    }
}
