//! The spec's filter and middleware (`use('incoming' | 'outgoing', ..)`) for P2P: what this
//! peer publishes or serves in catch-up goes through the filter, then the outgoing chain; what
//! it receives, by gossip or catch-up, through the incoming chain, then the filter, before it
//! is stored. The log holds events as the application made or took them in (e.g. plaintext
//! with an encrypting middleware), so catch-up digests compare like with like on both sides.

use ksync_core::{Direction, Event, Filter, Middleware, MiddlewareError, Pipeline};

/// A client's middleware chains and filter. Clones share the chains, so middleware added to
/// the client after `start` reaches the running node too.
#[derive(Debug, Clone, Default)]
pub(crate) struct Shaping {
    pipeline: Pipeline,
    filter: Option<Filter>,
}

impl Shaping {
    pub(crate) fn new(filter: Option<Filter>) -> Self {
        Self {
            pipeline: Pipeline::new(),
            filter,
        }
    }

    pub(crate) fn use_middleware(&self, direction: Direction, middleware: impl Middleware) {
        self.pipeline.use_middleware(direction, middleware);
    }

    /// The filter, if any.
    pub(crate) fn filter(&self) -> Option<&Filter> {
        self.filter.as_ref()
    }

    /// Nothing to run (lets hot paths skip copying events).
    pub(crate) fn is_noop(&self) -> bool {
        self.filter.is_none() && self.pipeline.is_empty()
    }

    /// The form `event` leaves this peer in; `None`: it stays home.
    pub(crate) fn outgoing(&self, event: Event) -> Result<Option<Event>, MiddlewareError> {
        self.run(Direction::Outgoing, event)
    }

    /// The form a received `event` is stored in; `None`: it is not taken in.
    pub(crate) fn incoming(&self, event: Event) -> Result<Option<Event>, MiddlewareError> {
        self.run(Direction::Incoming, event)
    }

    /// The filter sees events as the application made them: before the outgoing chain (an
    /// encrypting middleware would hide `data.private` from it), after the incoming one.
    fn run(&self, direction: Direction, event: Event) -> Result<Option<Event>, MiddlewareError> {
        self.pipeline
            .run_filtered(direction, self.filter.as_ref(), event)
    }
}
