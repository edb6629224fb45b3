//! [`debug_log!`](crate::debug_log): the transports' log line for the spec's `debug` option.

/// Logs at `debug` when `$debug` is true (the client was built with `debug(true)`), else at
/// `trace`, under the given fixed target; the rest is what `tracing::event!` takes (fields,
/// then a message).
///
/// The target is given explicitly so that a line keeps the target users filter on (e.g.
/// `ksync_ws::client`) whichever module it is written from. Callers need no `tracing`
/// dependency of their own for it.
///
/// ```
/// let debug = true;
/// let events = 3;
/// ksync_core::debug_log!(debug, target: "my_app::sync", events, "pulled");
/// ```
#[macro_export]
macro_rules! debug_log {
    ($debug:expr, target: $target:expr, $($arg:tt)+) => {
        if $debug {
            $crate::__tracing::debug!(target: $target, $($arg)+);
        } else {
            $crate::__tracing::trace!(target: $target, $($arg)+);
        }
    };
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Level, Metadata, Subscriber};

    /// Records the level and target of every event.
    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<(Level, String)>>>);

    impl Subscriber for Seen {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(1)
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, event: &Event<'_>) {
            let meta = event.metadata();
            if let Ok(mut seen) = self.0.lock() {
                seen.push((*meta.level(), meta.target().to_owned()));
            }
        }
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }

    #[test]
    fn the_flag_picks_the_level_and_the_target_is_kept() {
        let seen = Seen::default();
        tracing::subscriber::with_default(seen.clone(), || {
            for debug in [true, false] {
                crate::debug_log!(debug, target: "ksync_test::client", n = 1, "line");
            }
        });
        let seen = seen.0.lock().expect("lock").clone();
        assert_eq!(
            seen,
            vec![
                (Level::DEBUG, "ksync_test::client".to_owned()),
                (Level::TRACE, "ksync_test::client".to_owned()),
            ]
        );
    }
}
