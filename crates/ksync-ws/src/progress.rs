//! When a socket last moved bytes, for timeouts that mean "nothing moved for this long"
//! rather than "all of it within this long". A large message over a slow link takes as long
//! as the link needs while its bytes keep moving; bounded as a whole (1 MiB at 50 KB/s is
//! 20 s), it was cut off at the timeout and sent again on the next connection, for good. A
//! peer that stops taking bytes is still given up once the timeout passes without one.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// When the socket last took bytes to write and last gave bytes read (shared by the socket
/// and whoever waits on it).
#[derive(Clone, Debug)]
pub(crate) struct Activity(Arc<Stamps>);

#[derive(Debug)]
struct Stamps {
    /// What the stamps count from.
    origin: Instant,
    /// Nanoseconds after `origin`.
    written: AtomicU64,
    read: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity(Arc::new(Stamps {
            origin: Instant::now(),
            written: AtomicU64::new(0),
            read: AtomicU64::new(0),
        }))
    }

    fn stamp(&self, slot: &AtomicU64) {
        let now = self.0.origin.elapsed().as_nanos();
        slot.fetch_max(u64::try_from(now).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn at(&self, slot: &AtomicU64) -> Instant {
        self.0.origin + Duration::from_nanos(slot.load(Ordering::Relaxed))
    }

    /// When the socket last took bytes to write (its creation before any).
    pub(crate) fn last_write(&self) -> Instant {
        self.at(&self.0.written)
    }

    /// When bytes were last read from the socket (its creation before any).
    pub(crate) fn last_read(&self) -> Instant {
        self.at(&self.0.read)
    }
}

/// Runs `write` to its end, unless the socket takes no byte for `limit` (counted from the
/// later of the call and the last byte taken): `None` then, and `write` is dropped.
pub(crate) async fn unless_stalled<F: Future>(
    limit: Duration,
    activity: &Activity,
    write: F,
) -> Option<F::Output> {
    let called = Instant::now();
    let stalled_at = || activity.last_write().max(called) + limit;
    tokio::pin!(write);
    loop {
        let due = stalled_at();
        tokio::select! {
            // A write that ends as the timer fires has not stalled.
            biased;
            done = &mut write => return Some(done),
            () = tokio::time::sleep_until(due) => {
                if stalled_at() <= Instant::now() {
                    return None;
                }
            }
        }
    }
}

/// A socket that stamps its [`Activity`] whenever bytes move.
#[derive(Debug)]
pub(crate) struct Watched<T> {
    io: T,
    activity: Activity,
}

impl<T> Watched<T> {
    pub(crate) fn new(io: T) -> Self {
        Watched {
            io,
            activity: Activity::new(),
        }
    }

    pub(crate) fn activity(&self) -> Activity {
        self.activity.clone()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.io).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            self.activity.stamp(&self.activity.0.read);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let written = ready!(Pin::new(&mut self.io).poll_write(cx, buf))?;
        if written > 0 {
            self.activity.stamp(&self.activity.0.written);
        }
        Poll::Ready(Ok(written))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let written = ready!(Pin::new(&mut self.io).poll_write_vectored(cx, bufs))?;
        if written > 0 {
            self.activity.stamp(&self.activity.0.written);
        }
        Poll::Ready(Ok(written))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A write the reader keeps taking bytes of runs past the limit; one the reader stops
    /// taking ends `limit` after the last byte taken.
    #[tokio::test(start_paused = true)]
    async fn a_write_ends_only_when_nothing_moved_for_the_limit() {
        let limit = Duration::from_millis(100);
        let (near, mut far) = tokio::io::duplex(16);
        let mut near = Watched::new(near);
        let activity = near.activity();
        // The reader takes 16 bytes every 60 ms: 1 KiB takes ~4 s, 40 times the limit.
        let reader = tokio::spawn(async move {
            let mut got = vec![0; 1024];
            for chunk in got.chunks_mut(16) {
                tokio::time::sleep(Duration::from_millis(60)).await;
                far.read_exact(chunk).await.expect("read");
            }
            (far, got)
        });
        let written = unless_stalled(limit, &activity, near.write_all(&[7; 1024])).await;
        assert!(matches!(written, Some(Ok(()))), "{written:?}");
        let (_far, got) = reader.await.expect("reader");
        assert_eq!(got, vec![7; 1024]);
        // Nobody reads now: the pipe fills, then nothing moves.
        let start = Instant::now();
        let written = unless_stalled(limit, &activity, near.write_all(&[7; 1024])).await;
        assert!(written.is_none(), "a stalled write ended: {written:?}");
        assert_eq!(Instant::now() - start, limit);
    }
}
