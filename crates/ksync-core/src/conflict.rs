//! Conflicts and their resolution. Conflicts are values, never errors.

use std::cmp::Ordering;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::event::{Event, MAX_EVENT_INTEGER};

/// What kind of conflict was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ConflictKind {
    /// Two different contents under the same `(id, version)`.
    ConcurrentEdit,
}

impl fmt::Display for ConflictKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConflictKind::ConcurrentEdit => f.write_str("concurrent-edit"),
        }
    }
}

/// Two revisions that claim the same `(id, version)` with different content.
///
/// Serialises as `{"type":"concurrent-edit","ours":{..},"theirs":{..}}`, the spec's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conflict {
    /// The kind of conflict (`conflict.type` in the spec).
    #[serde(rename = "type")]
    pub kind: ConflictKind,
    /// The revision this replica already holds.
    pub ours: Event,
    /// The revision that arrived from elsewhere.
    pub theirs: Event,
}

impl Conflict {
    /// A `concurrent-edit` conflict.
    pub fn concurrent_edit(ours: Event, theirs: Event) -> Self {
        Self {
            kind: ConflictKind::ConcurrentEdit,
            ours,
            theirs,
        }
    }
}

/// How to settle a [`Conflict`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Resolution {
    /// Keep our content.
    Ours,
    /// Take their content.
    Theirs,
    /// Use this content instead (its id is forced to the conflict's id).
    Merged(Event),
    /// Last write wins: the later `timestamp`, ties broken deterministically (see [`lww_cmp`]).
    /// It trusts the writers' clocks: a revision stamped in the future wins every conflict of
    /// its version (and the settling revision keeps its timestamp).
    LastWriteWins,
}

/// A user callback that picks a [`Resolution`] for each conflict.
pub type ConflictResolver = Arc<dyn Fn(&Conflict) -> Resolution + Send + Sync>;

/// Orders two revisions for last-write-wins: later `timestamp` wins; on a tie the larger
/// `origin`, then the larger serialised `data`, then the larger `type` wins. Every replica
/// computes the same order, so every replica picks the same winner.
pub fn lww_cmp(a: &Event, b: &Event) -> Ordering {
    a.timestamp
        .cmp(&b.timestamp)
        .then_with(|| a.origin.cmp(&b.origin))
        .then_with(|| a.data.to_string().cmp(&b.data.to_string()))
        .then_with(|| a.event_type.cmp(&b.event_type))
}

/// The outcome of resolving one conflict: the new revision to write.
///
/// Every resolution writes a new revision at `max(ours.version, theirs.version) + 1` carrying
/// the chosen content, so that it supersedes both conflicting revisions everywhere it travels.
/// Two replicas that resolve the same conflict the same way produce revisions with the same
/// content, which deduplicate (origin is not content). At [`MAX_EVENT_INTEGER`] (the highest
/// valid version) the version stays there: that revision conflicts again and cannot be
/// written, and the conflict stays unsettled.
pub fn resolve(conflict: &Conflict, resolution: &Resolution, resolver_origin: &str) -> Event {
    let version = conflict
        .ours
        .version
        .max(conflict.theirs.version)
        .saturating_add(1)
        .min(MAX_EVENT_INTEGER);
    let chosen: Event = match resolution {
        Resolution::Ours => conflict.ours.clone(),
        Resolution::Theirs => conflict.theirs.clone(),
        Resolution::Merged(merged) => merged.clone(),
        Resolution::LastWriteWins => {
            if lww_cmp(&conflict.ours, &conflict.theirs) == Ordering::Less {
                conflict.theirs.clone()
            } else {
                conflict.ours.clone()
            }
        }
    };
    Event {
        id: conflict.ours.id.clone(),
        event_type: chosen.event_type,
        data: chosen.data,
        timestamp: chosen.timestamp,
        version,
        origin: Some(resolver_origin.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pair() -> Conflict {
        let ours = Event::new("x", "t", json!({"v": "ours"}), 10).with_origin("a");
        let theirs = Event::new("x", "t", json!({"v": "theirs"}), 20).with_origin("b");
        Conflict::concurrent_edit(ours, theirs)
    }

    #[test]
    fn serialises_in_spec_shape() {
        let value = serde_json::to_value(pair()).expect("ser");
        assert_eq!(value["type"], "concurrent-edit");
        assert_eq!(value["ours"]["data"]["v"], "ours");
        assert_eq!(value["theirs"]["data"]["v"], "theirs");
    }

    #[test]
    fn each_resolution_writes_a_superseding_revision() {
        let c = pair();
        let ours = resolve(&c, &Resolution::Ours, "me");
        assert_eq!((ours.version, &ours.data), (2, &json!({"v": "ours"})));
        let theirs = resolve(&c, &Resolution::Theirs, "me");
        assert_eq!(theirs.data, json!({"v": "theirs"}));
        let lww = resolve(&c, &Resolution::LastWriteWins, "me");
        assert_eq!(lww.data, json!({"v": "theirs"}), "later timestamp wins");
        let merged = resolve(
            &c,
            &Resolution::Merged(Event::new("ignored", "t", json!({"v": "both"}), 30)),
            "me",
        );
        assert_eq!((merged.id.as_str(), merged.version), ("x", 2));
        assert_eq!(merged.origin.as_deref(), Some("me"));
    }

    #[test]
    fn lww_is_symmetric_between_replicas() {
        // Same timestamp: the tie-break must not depend on which side is "ours".
        let a = Event::new("x", "t", json!(1), 10).with_origin("a");
        let b = Event::new("x", "t", json!(2), 10).with_origin("b");
        let from_a = resolve(
            &Conflict::concurrent_edit(a.clone(), b.clone()),
            &Resolution::LastWriteWins,
            "a",
        );
        let from_b = resolve(
            &Conflict::concurrent_edit(b, a),
            &Resolution::LastWriteWins,
            "b",
        );
        assert!(from_a.same_content(&from_b));
        assert_eq!(from_a.version, from_b.version);
    }
}
