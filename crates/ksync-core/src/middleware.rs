//! Middleware (transform or drop events on their way in or out) and filters.

use std::any::Any;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::str::FromStr;
use std::sync::{Arc, RwLock};

use crate::event::Event;

/// Which way an event is travelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Received from the network, before it is stored or delivered.
    Incoming,
    /// About to be sent to the network (after it was stored locally).
    Outgoing,
}

impl FromStr for Direction {
    type Err = MiddlewareError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "incoming" => Ok(Direction::Incoming),
            "outgoing" => Ok(Direction::Outgoing),
            other => Err(MiddlewareError::UnknownDirection(other.to_owned())),
        }
    }
}

/// Errors raised by middleware.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MiddlewareError {
    /// `use()` was given something other than `incoming` or `outgoing`.
    #[error("unknown middleware direction {0:?} (expected \"incoming\" or \"outgoing\")")]
    UnknownDirection(String),
    /// `filter` was given an unknown built-in name.
    #[error("unknown built-in filter {0:?} (known: \"public-only\")")]
    UnknownFilter(String),
    /// A middleware refused the event; the reason says why.
    #[error("middleware {name} failed: {reason}")]
    Failed {
        /// The middleware's name.
        name: String,
        /// Why.
        reason: String,
    },
    /// A middleware panicked while processing the event ([`Pipeline::run`] catches it, so a
    /// bug in one middleware costs that event, not the client's task).
    #[error("middleware {name} panicked: {message}")]
    Panicked {
        /// The middleware's name.
        name: String,
        /// The panic's message (`"<no message>"` when it was not a string).
        message: String,
    },
}

/// Transforms an event, or drops it by returning `Ok(None)`.
///
/// Any `Fn(Event) -> Option<Event>` closure is a middleware.
pub trait Middleware: Send + Sync + 'static {
    /// Processes one event.
    fn process(&self, event: Event) -> Result<Option<Event>, MiddlewareError>;

    /// A short name for logs and errors.
    fn name(&self) -> &str {
        "middleware"
    }
}

impl<F> Middleware for F
where
    F: Fn(Event) -> Option<Event> + Send + Sync + 'static,
{
    fn process(&self, event: Event) -> Result<Option<Event>, MiddlewareError> {
        Ok(self(event))
    }

    fn name(&self) -> &str {
        "closure"
    }
}

/// Which events to sync.
#[derive(Clone)]
pub enum Filter {
    /// Sync events for which the predicate is true.
    Predicate(Arc<dyn Fn(&Event) -> bool + Send + Sync>),
    /// The built-in `public-only`, the spec's `!event.data.private`: drops events whose
    /// `data.private` is truthy as JavaScript counts it (anything but absent, `null`, `false`,
    /// `0` and `""`), so a private flag written as `1` or `"yes"` keeps the event home too.
    PublicOnly,
}

impl Filter {
    /// A filter from a predicate.
    pub fn predicate(f: impl Fn(&Event) -> bool + Send + Sync + 'static) -> Self {
        Filter::Predicate(Arc::new(f))
    }

    /// Whether `event` passes. A predicate that panics holds the event back (`false`, logged
    /// at `error`): transports call this on their own tasks, which a panic would end.
    pub fn allows(&self, event: &Event) -> bool {
        self.check(event).unwrap_or_else(|error| {
            tracing::error!(id = %event.id, %error, "filter failed; the event is held back");
            false
        })
    }

    /// Whether `event` passes; a predicate that panics is [`MiddlewareError::Panicked`].
    pub fn check(&self, event: &Event) -> Result<bool, MiddlewareError> {
        match self {
            Filter::Predicate(f) => std::panic::catch_unwind(AssertUnwindSafe(|| f(event)))
                .map_err(|payload| MiddlewareError::Panicked {
                    name: "filter".to_owned(),
                    message: panic_message(payload.as_ref()),
                }),
            Filter::PublicOnly => Ok(!event.data.get("private").is_some_and(truthy)),
        }
    }
}

/// JavaScript truthiness of a JSON value (what the spec's `!event.data.private` tests).
fn truthy(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::Null => false,
        serde_json::Value::Bool(b) => *b,
        serde_json::Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        serde_json::Value::String(s) => !s.is_empty(),
        serde_json::Value::Array(_) | serde_json::Value::Object(_) => true,
    }
}

impl fmt::Debug for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Filter::Predicate(_) => f.write_str("Filter::Predicate(..)"),
            Filter::PublicOnly => f.write_str("Filter::PublicOnly"),
        }
    }
}

impl FromStr for Filter {
    type Err = MiddlewareError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "public-only" => Ok(Filter::PublicOnly),
            other => Err(MiddlewareError::UnknownFilter(other.to_owned())),
        }
    }
}

impl Middleware for Filter {
    fn process(&self, event: Event) -> Result<Option<Event>, MiddlewareError> {
        Ok(self.check(&event)?.then_some(event))
    }

    fn name(&self) -> &str {
        "filter"
    }
}

/// The `incoming` and `outgoing` middleware chains of one client, run in registration order.
///
/// Cloning shares the chains, so a client and its tasks see the same pipeline.
#[derive(Clone, Default)]
pub struct Pipeline {
    inner: Arc<RwLock<Chains>>,
}

#[derive(Default)]
struct Chains {
    incoming: Vec<Arc<dyn Middleware>>,
    outgoing: Vec<Arc<dyn Middleware>>,
}

impl fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let chains = self.inner.read().unwrap_or_else(|p| p.into_inner());
        f.debug_struct("Pipeline")
            .field("incoming", &chains.incoming.len())
            .field("outgoing", &chains.outgoing.len())
            .finish()
    }
}

impl Pipeline {
    /// An empty pipeline.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a middleware at the end of one chain.
    pub fn use_middleware(&self, direction: Direction, middleware: impl Middleware) {
        self.use_arc(direction, Arc::new(middleware));
    }

    /// Adds a shared middleware at the end of one chain.
    pub fn use_arc(&self, direction: Direction, middleware: Arc<dyn Middleware>) {
        let mut chains = self.inner.write().unwrap_or_else(|p| p.into_inner());
        match direction {
            Direction::Incoming => chains.incoming.push(middleware),
            Direction::Outgoing => chains.outgoing.push(middleware),
        }
    }

    /// Runs one chain. `Ok(None)`: some middleware dropped the event. A middleware that
    /// panics is [`MiddlewareError::Panicked`]: the transports run their chains on their own
    /// tasks, which a panic would end, silently stopping the sync.
    pub fn run(
        &self,
        direction: Direction,
        event: Event,
    ) -> Result<Option<Event>, MiddlewareError> {
        let chain = {
            let chains = self.inner.read().unwrap_or_else(|p| p.into_inner());
            match direction {
                Direction::Incoming => chains.incoming.clone(),
                Direction::Outgoing => chains.outgoing.clone(),
            }
        };
        let mut current = event;
        for middleware in chain {
            // Unwind safety: the event moves in and is gone if it panics (callers run chains
            // on copies, from storage or the wire); a middleware's own state behind a lock is
            // poisoned, which this crate's and ksync-middleware's locks tolerate.
            let processed =
                std::panic::catch_unwind(AssertUnwindSafe(|| middleware.process(current)))
                    .map_err(|payload| MiddlewareError::Panicked {
                        name: middleware.name().to_owned(),
                        message: panic_message(payload.as_ref()),
                    })?;
            match processed? {
                Some(next) => current = next,
                None => return Ok(None),
            }
        }
        Ok(Some(current))
    }

    /// Runs one chain together with a client's `filter`, in the order that lets the filter
    /// see events as the application has them: outgoing, the filter first and then the chain
    /// (which may encrypt or redact what the filter reads, e.g. `data.private`); incoming, the
    /// chain first (which may decrypt) and then the filter. `Ok(None)`: held back or dropped.
    ///
    /// ```
    /// use ksync_core::{Direction, Event, Filter, Pipeline};
    /// use serde_json::json;
    /// let pipeline = Pipeline::new();
    /// // Stands in for an encrypting middleware: `data` becomes opaque.
    /// pipeline.use_middleware(Direction::Outgoing, |mut e: Event| {
    ///     e.data = json!({"enc": "opaque"});
    ///     Some(e)
    /// });
    /// let private = Event::new("1", "note", json!({"private": true}), 1);
    /// let sent = pipeline.run_filtered(Direction::Outgoing, Some(&Filter::PublicOnly), private)?;
    /// assert!(sent.is_none(), "a private event stays home even though it would go out encrypted");
    /// # Ok::<(), ksync_core::MiddlewareError>(())
    /// ```
    pub fn run_filtered(
        &self,
        direction: Direction,
        filter: Option<&Filter>,
        event: Event,
    ) -> Result<Option<Event>, MiddlewareError> {
        let passes = |event: &Event| filter.map_or(Ok(true), |f| f.check(event));
        match direction {
            Direction::Outgoing => {
                if !passes(&event)? {
                    return Ok(None);
                }
                self.run(direction, event)
            }
            Direction::Incoming => match self.run(direction, event)? {
                Some(event) if passes(&event)? => Ok(Some(event)),
                _ => Ok(None),
            },
        }
    }

    /// Whether both chains are empty (lets hot paths skip cloning).
    pub fn is_empty(&self) -> bool {
        let chains = self.inner.read().unwrap_or_else(|p| p.into_inner());
        chains.incoming.is_empty() && chains.outgoing.is_empty()
    }
}

/// The text a panic was raised with (`panic!("..")` gives a `&str` or a `String`).
fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "<no message>".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn public_only_drops_private() {
        let filter: Filter = "public-only".parse().expect("built-in");
        assert!(filter.allows(&Event::new("1", "t", json!({"private": false}), 1)));
        assert!(filter.allows(&Event::new("1", "t", json!("scalar"), 1)));
        assert!(!filter.allows(&Event::new("1", "t", json!({"private": true}), 1)));
        // The spec's `!event.data.private`: JavaScript truthiness.
        for private in [json!(1), json!("yes"), json!({}), json!([])] {
            let event = Event::new("1", "t", json!({ "private": private }), 1);
            assert!(!filter.allows(&event), "{private}");
        }
        for public in [json!(null), json!(0), json!(0.0), json!("")] {
            let event = Event::new("1", "t", json!({ "private": public }), 1);
            assert!(filter.allows(&event), "{public}");
        }
        assert!(matches!(
            "nope".parse::<Filter>(),
            Err(MiddlewareError::UnknownFilter(_))
        ));
    }

    #[test]
    fn pipeline_runs_in_order_and_can_drop() {
        let pipeline = Pipeline::new();
        pipeline.use_middleware(Direction::Outgoing, |mut e: Event| {
            e.data = json!({"step": 1});
            Some(e)
        });
        pipeline.use_middleware(Direction::Outgoing, |mut e: Event| {
            e.data["step"] = json!(2);
            Some(e)
        });
        pipeline.use_middleware(Direction::Incoming, Filter::PublicOnly);
        let out = pipeline
            .run(Direction::Outgoing, Event::new("1", "t", json!(null), 1))
            .expect("ok")
            .expect("kept");
        assert_eq!(out.data, json!({"step": 2}));
        let dropped = pipeline
            .run(
                Direction::Incoming,
                Event::new("1", "t", json!({"private": true}), 1),
            )
            .expect("ok");
        assert!(dropped.is_none());
        assert!(matches!(
            "sideways".parse::<Direction>(),
            Err(MiddlewareError::UnknownDirection(_))
        ));
    }

    #[test]
    fn the_filter_sees_events_as_the_application_has_them() {
        let pipeline = Pipeline::new();
        let opaque = |mut e: Event| {
            e.data = json!({"enc": "opaque"});
            Some(e)
        };
        let restore = |mut e: Event| {
            e.data = json!({"private": e.id == "secret"});
            Some(e)
        };
        pipeline.use_middleware(Direction::Outgoing, opaque);
        pipeline.use_middleware(Direction::Incoming, restore);
        let public_only = Some(&Filter::PublicOnly);
        let private = Event::new("secret", "t", json!({"private": true}), 1);
        let public = Event::new("open", "t", json!({"private": false}), 1);
        assert!(
            pipeline
                .run_filtered(Direction::Outgoing, public_only, private.clone())
                .expect("ok")
                .is_none()
        );
        let sent = pipeline
            .run_filtered(Direction::Outgoing, public_only, public.clone())
            .expect("ok")
            .expect("sent");
        assert_eq!(sent.data, json!({"enc": "opaque"}));
        assert!(
            pipeline
                .run_filtered(Direction::Incoming, public_only, sent.clone())
                .expect("ok")
                .is_some()
        );
        let mut arriving = sent;
        arriving.id = "secret".into();
        assert!(
            pipeline
                .run_filtered(Direction::Incoming, public_only, arriving)
                .expect("ok")
                .is_none(),
            "filtered after decryption"
        );
        assert!(
            pipeline
                .run_filtered(Direction::Outgoing, None, private)
                .expect("ok")
                .is_some()
        );
    }

    #[test]
    fn a_panicking_middleware_is_an_error_not_a_panic() {
        let pipeline = Pipeline::new();
        pipeline.use_middleware(Direction::Incoming, |e: Event| {
            assert!(e.id != "bad", "no bad ids");
            Some(e)
        });
        pipeline.use_middleware(Direction::Outgoing, |_: Event| -> Option<Event> {
            std::panic::panic_any(7_u32)
        });
        let err = pipeline
            .run(Direction::Incoming, Event::new("bad", "t", json!(null), 1))
            .expect_err("panicked");
        assert!(
            matches!(&err, MiddlewareError::Panicked { name, message } if name == "closure" && message == "no bad ids"),
            "{err:?}"
        );
        assert!(
            pipeline
                .run(Direction::Incoming, Event::new("good", "t", json!(null), 1))
                .expect("the chain still runs")
                .is_some()
        );
        let err = pipeline
            .run(Direction::Outgoing, Event::new("1", "t", json!(null), 1))
            .expect_err("panicked");
        assert_eq!(err.to_string(), "middleware closure panicked: <no message>");

        let filter = Filter::predicate(|e| {
            assert!(e.id != "bad", "no bad ids");
            true
        });
        let bad = Event::new("bad", "t", json!(null), 1);
        assert!(!filter.allows(&bad), "held back");
        assert!(filter.allows(&Event::new("good", "t", json!(null), 1)));
        assert!(matches!(
            filter.process(bad),
            Err(MiddlewareError::Panicked { ref name, ref message }) if name == "filter" && message == "no bad ids"
        ));
    }
}
