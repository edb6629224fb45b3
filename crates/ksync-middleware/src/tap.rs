//! A logging and metrics tap.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ksync_core::{Event, Middleware, MiddlewareError};

/// How many distinct event types a [`Tap`] counts one by one; events of further types are
/// counted together in [`TapStats::untracked_types`] (so a flood of made-up types cannot grow
/// the tap's memory without bound).
pub const MAX_TRACKED_TYPES: usize = 256;

/// Passes every event through unchanged, logs it at `debug` level with `tracing` (target
/// `ksync_middleware::tap`, fields `tap`, `id`, `type`, `version`, `bytes`) and counts it.
///
/// Clones share the counters: register one clone, read [`Tap::stats`] on another.
///
/// ```
/// use ksync_core::{Direction, Event, Pipeline};
/// use ksync_middleware::Tap;
/// let tap = Tap::new("incoming");
/// let pipeline = Pipeline::new();
/// pipeline.use_middleware(Direction::Incoming, tap.clone());
/// pipeline.run(Direction::Incoming, Event::new("1", "chat", serde_json::json!("hi"), 1))?;
/// let stats = tap.stats();
/// assert_eq!((stats.events, stats.data_bytes, stats.by_type["chat"]), (1, 4, 1));
/// # Ok::<(), ksync_core::MiddlewareError>(())
/// ```
#[derive(Clone, Debug)]
pub struct Tap {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    label: String,
    events: AtomicU64,
    data_bytes: AtomicU64,
    untracked: AtomicU64,
    by_type: Mutex<BTreeMap<String, u64>>,
}

/// A snapshot of a [`Tap`]'s counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TapStats {
    /// Events seen.
    pub events: u64,
    /// Bytes of `data` seen, as compact JSON.
    pub data_bytes: u64,
    /// Events per type, for the first [`MAX_TRACKED_TYPES`] types seen.
    pub by_type: BTreeMap<String, u64>,
    /// Events of types beyond the first [`MAX_TRACKED_TYPES`].
    pub untracked_types: u64,
}

impl Tap {
    /// A tap whose log lines and middleware name carry `label` (e.g. `"ws-outgoing"`).
    pub fn new(label: impl Into<String>) -> Self {
        Self {
            inner: Arc::new(Inner {
                label: label.into(),
                events: AtomicU64::new(0),
                data_bytes: AtomicU64::new(0),
                untracked: AtomicU64::new(0),
                by_type: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    /// The label.
    pub fn label(&self) -> &str {
        &self.inner.label
    }

    /// The counters now.
    pub fn stats(&self) -> TapStats {
        TapStats {
            events: self.inner.events.load(Ordering::Relaxed),
            data_bytes: self.inner.data_bytes.load(Ordering::Relaxed),
            by_type: self
                .inner
                .by_type
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            untracked_types: self.inner.untracked.load(Ordering::Relaxed),
        }
    }

    fn count(&self, event: &Event) -> u64 {
        let mut counter = ByteCounter(0);
        // Writing a Value to a counter cannot fail.
        let _ = serde_json::to_writer(&mut counter, &event.data);
        self.inner.events.fetch_add(1, Ordering::Relaxed);
        self.inner
            .data_bytes
            .fetch_add(counter.0, Ordering::Relaxed);
        let mut by_type = self.inner.by_type.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = by_type.get_mut(&event.event_type) {
            *n += 1;
        } else if by_type.len() < MAX_TRACKED_TYPES {
            by_type.insert(event.event_type.clone(), 1);
        } else {
            self.inner.untracked.fetch_add(1, Ordering::Relaxed);
        }
        counter.0
    }
}

impl Middleware for Tap {
    fn process(&self, event: Event) -> Result<Option<Event>, MiddlewareError> {
        let bytes = self.count(&event);
        tracing::debug!(
            tap = %self.inner.label,
            id = %event.id,
            r#type = %event.event_type,
            version = event.version,
            bytes,
            "event"
        );
        Ok(Some(event))
    }

    fn name(&self) -> &str {
        &self.inner.label
    }
}

/// Counts bytes written, keeps none.
struct ByteCounter(u64);

impl io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    // The log line itself is checked in `tests/tap_log.rs`, a test binary of its own with a
    // global subscriber: tracing caches each callsite's interest process-wide, so a thread-local
    // subscriber here could be missed when another test thread registered the callsite first.
    #[test]
    fn counts_without_changing_events() {
        let tap = Tap::new("ws-out");
        let event = Event::new("e-17", "chat", json!({"text": "hello"}), 1);
        let out = tap.process(event.clone()).expect("ok").expect("kept");
        assert_eq!(out, event);
        tap.clone()
            .process(Event::new("e-18", "presence", json!(null), 1))
            .expect("ok");
        let stats = tap.stats();
        assert_eq!(stats.events, 2);
        assert_eq!(stats.data_bytes, r#"{"text":"hello"}"#.len() as u64 + 4);
        assert_eq!(stats.by_type.get("chat"), Some(&1));
        assert_eq!(stats.by_type.get("presence"), Some(&1));
        assert_eq!(tap.name(), "ws-out");
    }

    #[test]
    fn distinct_types_are_bounded() {
        let tap = Tap::new("t");
        for i in 0..MAX_TRACKED_TYPES + 10 {
            tap.process(Event::new("1", format!("type-{i}"), json!(1), 1))
                .expect("ok");
        }
        let stats = tap.stats();
        assert_eq!(stats.by_type.len(), MAX_TRACKED_TYPES);
        assert_eq!(stats.untracked_types, 10);
        assert_eq!(stats.events, MAX_TRACKED_TYPES as u64 + 10);
    }
}
