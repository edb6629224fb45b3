//! Filters: which events go through.
//!
//! Predicate filters and the built-in `public-only` are core's [`Filter`] (re-exported here, so
//! this crate is one place to find every ready middleware); [`TypeFilter`] adds allow and deny
//! lists by event type.

use std::collections::BTreeSet;
use std::sync::Arc;

use ksync_core::{Event, Middleware, MiddlewareError};

/// Core's filter: [`Filter::predicate`] and [`Filter::PublicOnly`] (`"public-only".parse()`).
pub use ksync_core::Filter;

/// Keeps or drops events by their `type`.
///
/// ```
/// use ksync_core::Event;
/// use ksync_middleware::TypeFilter;
/// let only_users = TypeFilter::allow(["user_created", "user_deleted"]);
/// assert!(only_users.allows(&Event::new("1", "user_created", serde_json::json!({}), 1)));
/// assert!(!only_users.allows(&Event::new("1", "cursor_moved", serde_json::json!({}), 1)));
/// let no_noise = TypeFilter::deny(["cursor_moved"]);
/// assert!(!no_noise.allows(&Event::new("1", "cursor_moved", serde_json::json!({}), 1)));
/// ```
#[derive(Debug, Clone)]
pub struct TypeFilter {
    types: Arc<BTreeSet<String>>,
    /// `true`: keep only listed types; `false`: drop listed types.
    allow_list: bool,
}

impl TypeFilter {
    /// Keeps only events whose type is listed.
    pub fn allow<I, S>(types: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            types: Arc::new(types.into_iter().map(Into::into).collect()),
            allow_list: true,
        }
    }

    /// Drops events whose type is listed.
    pub fn deny<I, S>(types: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            types: Arc::new(types.into_iter().map(Into::into).collect()),
            allow_list: false,
        }
    }

    /// Whether `event` passes.
    pub fn allows(&self, event: &Event) -> bool {
        self.types.contains(&event.event_type) == self.allow_list
    }

    /// The same rule as a core [`Filter`], for a client's `filter` option.
    pub fn into_filter(self) -> Filter {
        Filter::predicate(move |event| self.allows(event))
    }
}

impl Middleware for TypeFilter {
    fn process(&self, event: Event) -> Result<Option<Event>, MiddlewareError> {
        Ok(self.allows(&event).then_some(event))
    }

    fn name(&self) -> &str {
        "type-filter"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ksync_core::{Direction, Pipeline};
    use serde_json::json;

    fn ev(t: &str, data: serde_json::Value) -> Event {
        Event::new("1", t, data, 1)
    }

    #[test]
    fn allow_and_deny_lists() {
        let allow = TypeFilter::allow(["a", "b"]);
        let deny = TypeFilter::deny(vec!["a".to_owned()]);
        for (t, allowed, denied) in [("a", true, false), ("b", true, true), ("c", false, true)] {
            assert_eq!(allow.allows(&ev(t, json!(1))), allowed, "allow {t}");
            assert_eq!(deny.allows(&ev(t, json!(1))), denied, "deny {t}");
        }
        assert!(TypeFilter::deny(Vec::<String>::new()).allows(&ev("x", json!(1))));
        assert!(!TypeFilter::allow(Vec::<String>::new()).allows(&ev("x", json!(1))));
        let as_filter = allow.into_filter();
        assert!(as_filter.allows(&ev("a", json!(1))) && !as_filter.allows(&ev("c", json!(1))));
    }

    #[test]
    fn composes_with_core_filters_in_a_pipeline() {
        let pipeline = Pipeline::new();
        pipeline.use_middleware(Direction::Outgoing, TypeFilter::deny(["debug"]));
        pipeline.use_middleware(Direction::Outgoing, Filter::PublicOnly);
        pipeline.use_middleware(
            Direction::Outgoing,
            Filter::predicate(|e| e.data.get("size").and_then(|s| s.as_u64()) < Some(100)),
        );
        let run = |e| pipeline.run(Direction::Outgoing, e).expect("ok");
        assert!(run(ev("debug", json!({"size": 1}))).is_none());
        assert!(run(ev("note", json!({"size": 1, "private": true}))).is_none());
        assert!(run(ev("note", json!({"size": 500}))).is_none());
        assert!(run(ev("note", json!({"size": 1}))).is_some());
    }
}
