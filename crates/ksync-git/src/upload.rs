//! A request's progress, for a `request_timeout` that means "nothing moved for this long"
//! rather than "the whole request within this long". A push batch (up to 4 MiB) over a slow
//! link takes as long as the link needs while its bytes keep being taken (4 MiB at 50 KB/s
//! is 84 s); bounded as a whole against the 60 s default, it failed at every push, for good.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::time::Instant;

/// Most bytes of a body handed to the connection at once. Taking the next slice is the
/// sign that the connection sent earlier ones (hyper queues up to 16 slices, the kernel
/// what it will): one slice of the whole body would be taken at once, and nothing be seen
/// of its sending. 4 KiB keeps hyper's part of what is buffered to 64 KiB.
const SLICE: usize = 4 << 10;

/// When a request last made progress: it was started, or the connection took a slice of its
/// body. Shared by the body and whoever waits on the request.
#[derive(Clone, Debug)]
pub(crate) struct Progress(Arc<Stamps>);

#[derive(Debug)]
struct Stamps {
    /// What the stamps count from (the request's start).
    origin: Instant,
    /// Nanoseconds after `origin`: the first slice of the body taken (`u64::MAX` before).
    first: AtomicU64,
    /// The last slice taken (0, the start, before any).
    last: AtomicU64,
    /// The whole body was taken.
    taken: AtomicBool,
}

impl Progress {
    /// Progress of a request starting now.
    pub(crate) fn start() -> Self {
        Progress(Arc::new(Stamps {
            origin: Instant::now(),
            first: AtomicU64::new(u64::MAX),
            last: AtomicU64::new(0),
            taken: AtomicBool::new(false),
        }))
    }

    /// A slice taken; `whole` if it was the body's last.
    fn stamp(&self, whole: bool) {
        let now = u64::try_from(self.0.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.0.first.fetch_min(now, Ordering::Relaxed);
        self.0.last.fetch_max(now, Ordering::Relaxed);
        if whole {
            self.0.taken.store(true, Ordering::Relaxed);
        }
    }

    fn at(&self, nanos: u64) -> Instant {
        self.0.origin + Duration::from_nanos(nanos)
    }

    /// When the request stalls if nothing more happens: `limit` after its start or the last
    /// slice of its body taken. Once the whole body is taken, what hyper and the kernel
    /// still hold of it (up to some 100-300 KiB) has to cross the link before the service
    /// can answer, and nothing here sees it go: the answer is given as long again as the body
    /// took to be taken, at most `limit` more. That covers the crossing when the body is at
    /// least twice what they hold (what was taken at once from the start, while the rest was
    /// taken at the link's rate), whatever the rate.
    fn stalls_at(&self, limit: Duration) -> Instant {
        let last = self.0.last.load(Ordering::Relaxed);
        let mut due = self.at(last) + limit;
        if self.0.taken.load(Ordering::Relaxed) {
            let first = self.0.first.load(Ordering::Relaxed).min(last);
            due += Duration::from_nanos(last - first).min(limit);
        }
        due
    }

    /// Runs `request` to its end unless it stalls (see `stalls_at`): `None` then, and
    /// `request` is dropped.
    pub(crate) async fn unless_stalled<F: Future>(
        &self,
        limit: Duration,
        request: F,
    ) -> Option<F::Output> {
        tokio::pin!(request);
        loop {
            let due = self.stalls_at(limit);
            tokio::select! {
                // A request that ends as the timer fires has not stalled.
                biased;
                done = &mut request => return Some(done),
                () = tokio::time::sleep_until(due) => {
                    if self.stalls_at(limit) <= Instant::now() {
                        return None;
                    }
                }
            }
        }
    }
}

/// A request body handed to the connection a [`SLICE`] at a time, stamping [`Progress`] as
/// each is taken. Its length is known (`Content-Length`, as a whole body has).
pub(crate) struct Upload {
    rest: Bytes,
    progress: Progress,
}

impl Upload {
    pub(crate) fn new(body: Bytes, progress: Progress) -> Self {
        Upload {
            rest: body,
            progress,
        }
    }
}

impl http_body::Body for Upload {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.rest.is_empty() {
            return Poll::Ready(None);
        }
        let n = self.rest.len().min(SLICE);
        // `Bytes` slices share the buffer: nothing is copied.
        let slice = self.rest.split_to(n);
        let whole = self.rest.is_empty();
        self.progress.stamp(whole);
        Poll::Ready(Some(Ok(Frame::data(slice))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.rest.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;

    const LIMIT: Duration = Duration::from_millis(100);

    async fn next_slice(upload: &mut Upload) -> Option<Bytes> {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut *upload).poll_frame(cx)).await;
        frame.map(|frame| match frame {
            Ok(frame) => frame.into_data().unwrap_or_default(),
            Err(never) => match never {},
        })
    }

    /// A connection taking `slices` slices of `upload`, one every 60 ms, then waiting for an
    /// answer that never comes (or, `stop_after`, taking nothing more from then on).
    async fn slow_connection(mut upload: Upload, stop_after: Option<usize>) {
        let mut taken = 0;
        while stop_after != Some(taken) && next_slice(&mut upload).await.is_some() {
            taken += 1;
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
        std::future::pending().await
    }

    /// The body comes whole, in slices, with its length known.
    #[tokio::test(start_paused = true)]
    async fn an_upload_is_its_body_in_slices() {
        let body: Vec<u8> = (0..SLICE * 2 + 5).map(|i| i as u8).collect();
        let mut upload = Upload::new(Bytes::from(body.clone()), Progress::start());
        assert_eq!(upload.size_hint().exact(), Some(body.len() as u64));
        let mut got = Vec::new();
        let mut slices = 0;
        while let Some(slice) = next_slice(&mut upload).await {
            assert!(slice.len() <= SLICE);
            got.extend_from_slice(&slice);
            slices += 1;
        }
        assert!(upload.is_end_stream());
        assert_eq!(got, body);
        assert_eq!(slices, 3);
    }

    /// An upload whose slices keep being taken runs far past the limit; the answer is then
    /// awaited `LIMIT` after the last slice, plus as long again as the body took, at most
    /// `LIMIT` more (what the connection still holds of it has to cross the link first).
    #[tokio::test(start_paused = true)]
    async fn an_upload_stalls_only_when_nothing_is_taken_for_the_limit() {
        let body = Bytes::from(vec![7; SLICE * 20]);
        let start = Instant::now();
        let progress = Progress::start();
        let upload = Upload::new(body.clone(), progress.clone());
        let stalled = progress
            .unless_stalled(LIMIT, slow_connection(upload, None))
            .await;
        assert!(stalled.is_none());
        // 20 slices, the last at 19 x 60 ms: 1.14 s, then 100 + 100 ms.
        assert_eq!(Instant::now() - start, Duration::from_millis(1140 + 200));

        // A short body taken at once: the answer gets the limit, and only just more.
        let start = Instant::now();
        let progress = Progress::start();
        let upload = Upload::new(body.slice(..SLICE), progress.clone());
        let stalled = progress
            .unless_stalled(LIMIT, slow_connection(upload, None))
            .await;
        assert!(stalled.is_none());
        assert_eq!(Instant::now() - start, LIMIT);

        // The connection stops taking the body: given up the limit after its last slice.
        let start = Instant::now();
        let progress = Progress::start();
        let upload = Upload::new(body, progress.clone());
        let stalled = progress
            .unless_stalled(LIMIT, slow_connection(upload, Some(5)))
            .await;
        assert!(stalled.is_none());
        assert_eq!(Instant::now() - start, Duration::from_millis(4 * 60 + 100));
    }

    /// A request that ends is not cut off, and no body is no slice: the limit from the start.
    #[tokio::test(start_paused = true)]
    async fn a_request_without_a_body_gets_the_limit_from_its_start() {
        let progress = Progress::start();
        let answered = progress
            .unless_stalled(LIMIT, tokio::time::sleep(LIMIT / 2))
            .await;
        assert!(answered.is_some());
        let start = Instant::now();
        let progress = Progress::start();
        let stalled = progress
            .unless_stalled(LIMIT, std::future::pending::<()>())
            .await;
        assert!(stalled.is_none());
        assert_eq!(Instant::now() - start, LIMIT);
    }
}
