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
//!
//! A cap on all connections is one that a single address could fill: opening ~34
//! connections a second and sending nothing, it held all 1,024 slots (each to the header
//! timeout) and every other client waited. [`Waiting`] caps, per IP address, the connections
//! waiting for a request head (just opened, or idle between requests): past it the one of
//! that address that has waited longest is closed. Not all connections per address: behind a
//! reverse proxy every client is one address, and its connections are busy serving requests
//! (a proxy sends a whole head at once).

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::time::{Instant, Sleep};

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
    /// Most connections of one IP address waiting for a request head at once (0: no cap);
    /// see [`Waiting`].
    pub max_waiting_per_ip: usize,
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
    let waiting = Arc::new(Waiting::new(limits.max_waiting_per_ip));
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    loop {
        // No slot free: a connection closed for its address's waiting cap gives its slot up
        // now rather than at its grace's end (the grace is a slot nobody else wants).
        if slots.available_permits() == 0 {
            waiting.reclaim();
        }
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
        let wait = Arc::new(Wait::new(remote.ip()));
        waiting.begin(&wait);
        // Ends the connection's part in `waiting` when its task ends, even by a panic.
        let waits = Waits {
            waiting: Arc::clone(&waiting),
            wait: Arc::clone(&wait),
        };
        let first_wait = wait.current();
        let service = {
            let (waiting, wait) = (Arc::clone(&waiting), Arc::clone(&wait));
            hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
                // A whole head came: no longer waiting, until its response has been written.
                waiting.end(&wait);
                // What `into_make_service_with_connect_info` gives handlers (the auth limiter
                // and the logs key on it).
                request.extensions_mut().insert(ConnectInfo(remote));
                let router = router.clone();
                let upgraded = Arc::clone(&upgraded);
                let rearm = Rearm {
                    waiting: Arc::clone(&waiting),
                    wait: Arc::clone(&wait),
                    upgraded: Arc::clone(&upgraded),
                };
                async move {
                    let request = request.map(axum::body::Body::new);
                    let response = tower::ServiceExt::oneshot(router, request)
                        .await
                        .unwrap_or_else(|never| match never {});
                    // From here on the socket is the relay's, whose own write timeout and
                    // queue bounds watch it; a subscriber may rightly be quiet longer than an
                    // answer.
                    if response.status() == hyper::StatusCode::SWITCHING_PROTOCOLS {
                        upgraded.store(true, Ordering::Relaxed);
                    }
                    Ok::<_, Infallible>(response.map(|body| Answer {
                        body,
                        _rearm: rearm,
                    }))
                }
            })
        };
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
            let waits = waits;
            let mut connection = Box::pin(connection);
            let mut stopping = false;
            // The wait this connection was told to close for, and when it may be closed.
            let mut closing: Option<(u64, Pin<Box<Sleep>>)> = None;
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
                    // Told to close, or told to close sooner (its slot is needed).
                    () = waits.wait.evicted.notified() => {
                        if let Some((key, at)) = waits.wait.eviction() {
                            closing = Some((key, Box::pin(tokio::time::sleep_until(at))));
                        }
                    }
                    () = async { if let Some((_, at)) = closing.as_mut() { at.as_mut().await } }, if closing.is_some() => {
                        let Some((key, _)) = closing.take() else { continue };
                        // A head read meanwhile ended that wait: the connection is not closed.
                        if waits.wait.current() != key {
                            continue;
                        }
                        tracing::debug!(%remote, "http connection closed: its address has too many waiting for a request");
                        if key == first_wait {
                            // No request yet: nothing to finish, and a graceful shutdown
                            // would wait for one.
                            break;
                        }
                        // Between requests: closes now if idle, or once the last response
                        // is written.
                        stopping = true;
                        connection.as_mut().graceful_shutdown();
                    }
                }
            }
            // The connection (and a response body it held, which starts a wait when dropped)
            // first, then its last wait.
            drop(connection);
            drop(waits);
        });
    }
    drop(listener);
    // Every slot back: every connection has ended.
    let _all = slots.acquire_many(capacity as u32).await;
    Ok(())
}

/// How long a connection's wait lasts at least before it is closed for its address's
/// [`Waiting`] cap, while a slot is free: a connection is told to close as soon as a newer one
/// of its address starts waiting, and one just accepted may have its whole head in the socket,
/// not yet read. A reverse proxy opening many connections at once would otherwise lose
/// requests it had sent. Only while a slot is free: an address opening R connections a second
/// would otherwise hold R slots more than its cap (see [`Waiting::reclaim`]).
const EVICTION_GRACE: Duration = Duration::from_secs(1);

/// The connections of each IP address that wait for a request head (just opened, or idle
/// between requests), at most `cap` per address: when one more starts waiting, the one that
/// has waited longest is told to close (after [`EVICTION_GRACE`] from the start of its wait,
/// or at once when the accept loop needs its slot).
/// The newest is kept rather than refused: a proxy's new connection carries a request, and an
/// address opening more only shortens its own connections' waits. Bounded: one entry per
/// waiting connection, and connections are bounded by `max_http_connections`.
struct Waiting {
    /// 0: no cap (nothing is tracked).
    cap: usize,
    inner: Mutex<WaitingInner>,
}

#[derive(Default)]
struct WaitingInner {
    /// Numbers the waits in the order they start (0 is "not waiting").
    next: u64,
    /// Per address, its waiting connections by the number of their wait (oldest first), with
    /// when it started.
    by_ip: HashMap<IpAddr, BTreeMap<u64, (Instant, Arc<Wait>)>>,
    /// The connections told to close and still in their grace, by the number of their wait
    /// (oldest first); each is in no `by_ip` list any more.
    in_grace: BTreeMap<u64, Arc<Wait>>,
}

/// One connection's part in [`Waiting`].
struct Wait {
    ip: IpAddr,
    /// The number of its current wait; 0 while a request is being served.
    current: AtomicU64,
    /// Set once the connection has ended: no wait starts after it.
    closed: AtomicBool,
    /// The wait it was told to close for, and when to close it.
    eviction: Mutex<Option<(u64, Instant)>>,
    evicted: Notify,
}

impl Wait {
    fn new(ip: IpAddr) -> Self {
        Self {
            // An IPv4 client of a dual-stack listener is one address either way; an IPv6
            // host usually owns its whole /64, so that is one address too.
            ip: ksync_core::ClientId::host_key(ip),
            current: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            eviction: Mutex::new(None),
            evicted: Notify::new(),
        }
    }

    fn current(&self) -> u64 {
        self.current.load(Ordering::SeqCst)
    }

    fn eviction(&self) -> Option<(u64, Instant)> {
        self.eviction.lock().ok()?.take()
    }
}

impl Waiting {
    fn new(cap: usize) -> Self {
        Self {
            cap,
            inner: Mutex::new(WaitingInner::default()),
        }
    }

    /// `wait`'s connection starts waiting for a request head.
    fn begin(&self, wait: &Arc<Wait>) {
        if self.cap == 0 {
            return;
        }
        // A poisoned lock: a panic elsewhere while it was held; its map is still whole.
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if wait.closed.load(Ordering::SeqCst) {
            return;
        }
        inner.next += 1;
        let key = inner.next;
        let old = wait.current.swap(key, Ordering::SeqCst);
        // Its previous wait, if that one was in its grace.
        inner.in_grace.remove(&old);
        let waits = inner.by_ip.entry(wait.ip).or_default();
        waits.remove(&old);
        waits.insert(key, (Instant::now(), Arc::clone(wait)));
        if waits.len() > self.cap
            && let Some((oldest, (since, victim))) = waits.pop_first()
        {
            victim.close_at(oldest, since + EVICTION_GRACE);
            inner.in_grace.insert(oldest, victim);
        }
    }

    /// `wait`'s connection is not waiting any more (a head came).
    fn end(&self, wait: &Wait) {
        if self.cap == 0 {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        // Under the lock: a `begin` cannot slip in between taking the key and removing it.
        let key = wait.current.swap(0, Ordering::SeqCst);
        if key == 0 {
            return;
        }
        inner.in_grace.remove(&key);
        if let Some(waits) = inner.by_ip.get_mut(&wait.ip) {
            waits.remove(&key);
            if waits.is_empty() {
                inner.by_ip.remove(&wait.ip);
            }
        }
    }

    /// `wait`'s connection has ended: its wait ends, and none starts after it.
    fn close(&self, wait: &Wait) {
        {
            let _inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            // Under the lock `begin` checks it: no wait starts after this.
            wait.closed.store(true, Ordering::SeqCst);
        }
        self.end(wait);
    }

    /// The accept loop has no slot free: the connection in its grace that has waited longest
    /// (if any) is told to close now, so its slot comes back.
    fn reclaim(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((key, victim)) = inner.in_grace.pop_first() {
            victim.close_at(key, Instant::now());
        }
    }
}

impl Wait {
    /// Tells the connection to close at `at` unless its wait `key` has ended by then.
    fn close_at(&self, key: u64, at: Instant) {
        *self.eviction.lock().unwrap_or_else(|p| p.into_inner()) = Some((key, at));
        self.evicted.notify_one();
    }
}

/// A connection's part in [`Waiting`], ended when its task ends (by a panic too: an entry
/// left behind would count against its address for good).
struct Waits {
    waiting: Arc<Waiting>,
    wait: Arc<Wait>,
}

impl Drop for Waits {
    fn drop(&mut self) {
        self.waiting.close(&self.wait);
    }
}

/// Starts the connection's next wait once its response has been written (hyper drops the
/// body then), unless the connection was upgraded.
struct Rearm {
    waiting: Arc<Waiting>,
    wait: Arc<Wait>,
    upgraded: Arc<AtomicBool>,
}

impl Drop for Rearm {
    fn drop(&mut self) {
        if !self.upgraded.load(Ordering::Relaxed) {
            self.waiting.begin(&self.wait);
        }
    }
}

/// A response body that starts its connection's next wait when dropped ([`Rearm`]).
struct Answer {
    body: axum::body::Body,
    _rearm: Rearm,
}

impl hyper::body::Body for Answer {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
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

    /// Two IPv6 addresses of one /64 are one address to the cap; another /64 is not; the
    /// one told to close is the one waiting longest, and one whose wait ended is not counted.
    #[tokio::test]
    async fn ipv6_hosts_of_one_64_share_the_waiting_cap() {
        let waiting = Waiting::new(1);
        let wait = |ip: &str| Arc::new(Wait::new(ip.parse().expect("ip")));
        let (first, same_64, other_64) = (
            wait("2001:db8::1"),
            wait("2001:db8::2"),
            wait("2001:db8:0:1::1"),
        );
        waiting.begin(&first);
        waiting.begin(&other_64);
        assert!(first.eviction().is_none());
        waiting.begin(&same_64);
        let (key, _) = first.eviction().expect("the first was told to close");
        assert_eq!(key, first.current());
        assert!(other_64.eviction().is_none() && same_64.eviction().is_none());
        // A head came on `same_64`: a newcomer of its /64 makes no one close.
        waiting.end(&same_64);
        waiting.begin(&wait("2001:db8::3"));
        assert!(same_64.eviction().is_none());
    }

    /// A connection's entry ends with its task even when the task panics (before, only the
    /// task's normal end removed it, and a panic left it counted against its address for
    /// good); none starts after it, and one in its grace goes too.
    #[test]
    fn a_connection_task_that_panics_leaves_no_wait_behind() {
        let waiting = Arc::new(Waiting::new(1));
        let (older, newer) = (
            Arc::new(Wait::new("192.0.2.1".parse().expect("ip"))),
            Arc::new(Wait::new("192.0.2.1".parse().expect("ip"))),
        );
        waiting.begin(&older);
        waiting.begin(&newer);
        let tasks = [&older, &newer].map(|wait| Waits {
            waiting: Arc::clone(&waiting),
            wait: Arc::clone(wait),
        });
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _tasks = tasks;
            panic!("a connection task panics");
        }));
        assert!(panicked.is_err());
        waiting.begin(&newer);
        let inner = waiting.inner.lock().expect("lock");
        assert!(inner.by_ip.is_empty() && inner.in_grace.is_empty());
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
