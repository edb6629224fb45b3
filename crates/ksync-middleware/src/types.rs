//! A set of event types that a middleware applies to.

use std::collections::BTreeSet;
use std::sync::Arc;

/// `None` = every type.
#[derive(Debug, Clone, Default)]
pub(crate) struct TypeSet(Option<Arc<BTreeSet<String>>>);

impl TypeSet {
    pub(crate) fn only<I, S>(types: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        TypeSet(Some(Arc::new(types.into_iter().map(Into::into).collect())))
    }

    pub(crate) fn contains(&self, event_type: &str) -> bool {
        self.0.as_ref().is_none_or(|set| set.contains(event_type))
    }
}
