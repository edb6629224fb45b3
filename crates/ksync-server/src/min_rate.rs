//! The minimum average rate of a request body (`Limits::request_body_min_rate`), beside the
//! wait for each piece (`Limits::request_body_timeout`, tower-http's `RequestBodyTimeout`).
//!
//! The wait for each piece alone let a body that kept coming a byte at a time hold its
//! request for good, and with it a repository request slot (`max_git_requests`) and a push
//! place: a few clients each sending a byte a little more often than the timeout shed every
//! other repository request with 503. As Apache's `mod_reqtimeout` (`MinRate`), a body now has
//! a grace of `request_body_timeout` from its first read, extended by one second for each
//! `min_rate` bytes received; past it, the body fails (the repository service answers 408
//! `body_incomplete`) and what it held is freed. A body that keeps the rate may take as long
//! as it needs.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use hyper::body::{Bytes, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

/// The rule's two numbers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MinRate {
    /// Before any byte counts.
    pub grace: Duration,
    /// Bytes a second; 0 turns the rule off.
    pub bytes_per_sec: u64,
}

/// Why a body was cut off (the source of the body's error).
#[derive(Debug, thiserror::Error)]
#[error("the request body arrived slower than {0} bytes a second")]
pub(crate) struct TooSlow(u64);

/// Middleware: gives the request's body the rule.
pub(crate) async fn enforce(
    State(rule): State<Arc<MinRate>>,
    request: Request,
    next: Next,
) -> Response {
    if rule.bytes_per_sec == 0 {
        return next.run(request).await;
    }
    let rule = *rule;
    next.run(request.map(|body| Body::new(MinRateBody::new(body, rule))))
        .await
}

/// A body that fails once it has fallen behind its [`MinRate`].
struct MinRateBody {
    inner: Body,
    rule: MinRate,
    /// The first read (not the request's arrival: a handler may look at storage first).
    started: Option<Instant>,
    received: u64,
    /// Running while the body has nothing to give; moved as bytes come.
    behind: Option<Pin<Box<Sleep>>>,
}

impl MinRateBody {
    fn new(inner: Body, rule: MinRate) -> Self {
        Self {
            inner,
            rule,
            started: None,
            received: 0,
            behind: None,
        }
    }

    /// When the body falls behind: the grace plus a second per `bytes_per_sec` received.
    fn deadline(&self, started: Instant) -> Instant {
        let earned = Duration::from_secs_f64(self.received as f64 / self.rule.bytes_per_sec as f64);
        // Saturating: a huge body's credit must not overflow the clock (it is bounded by the
        // configured duration check and the body limit in practice).
        started
            .checked_add(self.rule.grace.saturating_add(earned))
            .unwrap_or_else(|| started + ksync_core::MAX_CONFIG_DURATION)
    }
}

impl hyper::body::Body for MinRateBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let started = *this.started.get_or_insert_with(Instant::now);
        // What has arrived counts before the clock is looked at: a body read late (its
        // handler was busy) is not cut off for bytes that were waiting.
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => {}
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.received = this.received.saturating_add(data.len() as u64);
                }
                return Poll::Ready(Some(Ok(frame)));
            }
            done => return done,
        }
        let deadline = this.deadline(started);
        let behind = this
            .behind
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if behind.deadline() != deadline {
            behind.as_mut().reset(deadline);
        }
        match behind.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(axum::Error::new(TooSlow(
                this.rule.bytes_per_sec,
            ))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
