//! The HTTP bodies of the Git-like protocol (see `docs/PROTOCOL.md`, "Git-like HTTP").
//!
//! Shared by the client and the service so the two cannot drift apart. Field names are
//! camelCase on the wire.

use ksync_core::{Conflict, Event};
use serde::{Deserialize, Serialize};

/// Path prefix under which the service is mounted: `/git/{repo}/...`.
pub const GIT_PREFIX: &str = "/git";

/// The branch every repository starts with.
pub const DEFAULT_BRANCH: &str = "main";

/// Header carrying `ksync_core::PROTOCOL_VERSION` on requests and responses. A request that
/// announces another version is refused with 400 `unsupported_protocol`.
pub const PROTOCOL_HEADER: &str = "x-ksync-protocol";

/// Default number of events in one pull page.
pub const DEFAULT_PAGE: usize = 1000;

/// Most events a client sends in one push request by default. Fewer, larger requests cost
/// fewer round trips (and, on a durable server, fewer syncs) per event.
pub const DEFAULT_PUSH_BATCH: usize = 10_000;

/// Most bytes of encoded events a client sends in one push request by default: a quarter of
/// the service's default body limit (16 MiB), so large events make smaller batches instead of
/// a 413. A single event larger than this is still sent, alone.
pub const DEFAULT_PUSH_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// Most bytes of one answer a client reads by default (after gzip decoding): four times the
/// service's default body limit, so a page holding one event as large as the service accepts
/// still fits, while a hostile server or a gzip bomb cannot make the client buffer without
/// bound.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// Most times a client sends one request while the service answers that it is busy (503, or
/// 429 with `Retry-After`) by default: four retries, about 4 s at the service's `Retry-After: 1`.
pub const DEFAULT_BUSY_ATTEMPTS: u32 = 5;

/// Longest wait of a client before it sends a busy-refused request again, whatever
/// `Retry-After` asks: a service asking for an hour would otherwise hold the call that long.
pub const MAX_BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Most time a client waits on a busy service for one request, across its retries.
pub const MAX_BUSY_WAIT_TOTAL: std::time::Duration = std::time::Duration::from_secs(60);

/// Most bytes of events in one pull page by default (`GitServerConfig::max_page_bytes`): a
/// page ends before the event that would take it past this, unless it is the page's first.
pub const DEFAULT_PAGE_BYTES: usize = 8 * 1024 * 1024;

/// Decodes a JSON body, the one reader of bodies on both sides. JSON text is UTF-8: checking
/// the whole body once and parsing it as a `str` spares serde_json a UTF-8 check per string
/// (about an eighth of decoding an event).
///
/// Read through [`ksync_core::received_json`]: an answer nesting past the 127 levels
/// serde_json reads (a pull page puts 3 levels around an event's data, a push or merge
/// answer's conflict 5) is read too, so events older builds stored with data up to 128
/// levels deep are pulled instead of failing every pull of their page. The service bounds a
/// request body's decoded size with serde_json's own reader first (`decoded::decoded_bound`),
/// so it still refuses a body past 127 levels: no new event is that deep.
pub(crate) fn from_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> serde_json::Result<T> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        <serde_json::Error as serde::de::Error>::custom(format_args!("body is not UTF-8: {e}"))
    })?;
    ksync_core::received_json::from_str(text)
}

/// Appends `event` as JSON to `out`: the same bytes as `serde_json::to_writer` writes, found
/// faster. Strings without characters JSON must escape (nearly all of them) are copied as
/// they are after one branch-free pass; the rest go through serde_json.
pub(crate) fn write_event(out: &mut Vec<u8>, event: &Event) -> serde_json::Result<()> {
    out.extend_from_slice(b"{\"id\":");
    write_str(out, &event.id)?;
    out.extend_from_slice(b",\"type\":");
    write_str(out, &event.event_type)?;
    out.extend_from_slice(b",\"data\":");
    write_value(out, &event.data)?;
    out.extend_from_slice(b",\"timestamp\":");
    write_u64(out, event.timestamp);
    out.extend_from_slice(b",\"version\":");
    write_u64(out, event.version);
    if let Some(origin) = &event.origin {
        out.extend_from_slice(b",\"origin\":");
        write_str(out, origin)?;
    }
    out.push(b'}');
    Ok(())
}

fn write_value(out: &mut Vec<u8>, value: &serde_json::Value) -> serde_json::Result<()> {
    use serde_json::Value;
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => match n.as_u64() {
            Some(u) => write_u64(out, u),
            None => serde_json::to_writer(&mut *out, n)?,
        },
        Value::String(s) => write_str(out, s)?,
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item)?;
            }
            out.push(b']');
        }
        Value::Object(map) => {
            out.push(b'{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(out, key)?;
                out.push(b':');
                write_value(out, item)?;
            }
            out.push(b'}');
        }
    }
    Ok(())
}

fn write_str(out: &mut Vec<u8>, s: &str) -> serde_json::Result<()> {
    let bytes = s.as_bytes();
    // No early exit: the compiler vectorises the whole pass.
    let plain = bytes.iter().fold(true, |plain, &b| {
        plain & (b >= 0x20) & (b != b'"') & (b != b'\\')
    });
    if plain {
        out.reserve(bytes.len() + 2);
        out.push(b'"');
        out.extend_from_slice(bytes);
        out.push(b'"');
        Ok(())
    } else {
        serde_json::to_writer(&mut *out, s)
    }
}

fn write_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// `POST /git/{repo}/branches/{branch}/events`: a batch to append.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PushRequest {
    /// The branch version the client had pulled up to when it made this batch. A base ahead
    /// of the branch (the client saw more than the server has) is refused with 409.
    pub base_version: u64,
    /// The events, in the client's log order.
    pub events: Vec<Event>,
    /// The branch log the client's `base_version` counts in (the `logId` of its last pull or
    /// push). Another branch log is refused with 409 `branch_reset`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_id: Option<String>,
}

/// The answer to a push.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PushResponse {
    /// The branch's last sequence number after the push.
    pub server_version: u64,
    /// How many events were new and were stored.
    pub appended: u64,
    /// How many events the branch already held identically (a retried push).
    pub duplicates: u64,
    /// Events refused because the branch holds other content under their `(id, version)`.
    pub rejected: Vec<RejectedEvent>,
    /// Set when every event sits right after `baseVersion`, in order (appended now, or already
    /// there: the batch sent again): the
    /// branch is then exactly what the client had pulled plus this batch, so the client may
    /// treat it as pulled up to this version (a fast-forward) without fetching its own events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fast_forward_to: Option<u64>,
    /// Names the branch's log (see [`BranchInfo::log_id`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_id: Option<String>,
}

/// One refused event of a push.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RejectedEvent {
    /// Position of the event in the pushed batch.
    pub index: usize,
    /// `ours` is the branch's revision, `theirs` the pushed one.
    pub conflict: Conflict,
}

/// `GET /git/{repo}/branches/{branch}/events?since=N&limit=M`: one page of a branch's log.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PullResponse {
    /// The `since` this page starts after; `events[i]` has sequence number `since + i + 1`.
    pub since: u64,
    /// The events, in log order.
    pub events: Vec<Event>,
    /// The branch's last sequence number when the page was read.
    pub server_version: u64,
    /// The `since` of the next page, or `None` when this page reaches the end.
    pub next: Option<u64>,
    /// Names the branch's log (see [`BranchInfo::log_id`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_id: Option<String>,
}

/// A branch as the service describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BranchInfo {
    /// The branch name.
    pub name: String,
    /// Its last sequence number.
    pub server_version: u64,
    /// The branch it was forked from (`None` for a repository's first branch).
    pub forked_from: Option<String>,
    /// The version of `forked_from` it was forked at: its first `forked_at` events are a copy
    /// of that prefix.
    pub forked_at: Option<u64>,
    /// Names the branch's log: it stays the same for the branch's life (across restarts of a
    /// durable service) and changes when the branch is another one (the repository was
    /// deleted and made again, an in-memory service restarted). Versions count within one
    /// log: a client's cursors mean nothing in another. Absent for branches made before it
    /// existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_id: Option<String>,
}

/// `GET /git/{repo}`: a repository and its branches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RepoInfo {
    /// The repository name.
    pub repo: String,
    /// The branch clients check out by default.
    pub default_branch: String,
    /// Every branch, sorted by name.
    pub branches: Vec<BranchInfo>,
}

/// `POST /git/{repo}/branches`: fork a branch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateBranchRequest {
    /// The new branch's name.
    pub name: String,
    /// The branch to fork (default `main`).
    #[serde(default)]
    pub from: Option<String>,
    /// The version of `from` to fork at (default: its current version).
    #[serde(default)]
    pub at: Option<u64>,
}

/// `POST /git/{repo}/merge`: append to `into` what `from` has that `into` lacks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MergeRequest {
    /// The branch that receives events.
    pub into: String,
    /// The branch whose events are merged.
    pub from: String,
    /// Chosen by the client (up to 64 letters, digits and `-`) and sent again when it retries
    /// a merge whose answer it did not get: the service then answers what it answered that
    /// merge (it keeps the last answer per pair of branches, of a merge that found something
    /// new: one that found nothing reports no collision, and a retry merges afresh), so no
    /// collision goes unreported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge_id: Option<String>,
}

/// The answer to a merge.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MergeResponse {
    /// Events of `from` appended to `into`.
    pub appended: u64,
    /// Events of `from` that `into` already held identically.
    pub duplicates: u64,
    /// Events of `from` that collide with `into` (not stored).
    pub conflicts: Vec<MergeConflict>,
    /// `into`'s last sequence number after the merge.
    pub server_version: u64,
    /// The version of `from` merged up to (the next merge starts after it).
    pub from_version: u64,
    /// Set (to `from_version`) when the answer was full (`GitServerConfig::max_page`
    /// collisions, or `max_page_bytes` of them) before `from`'s end: merge again (with a new
    /// `mergeId`) for the rest. `None` once the merge reached the end of `from`, as it was when
    /// the request came. As a pull page's `next`.
    #[serde(default)]
    pub next: Option<u64>,
}

/// One collision found by a merge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MergeConflict {
    /// `ours` is `into`'s revision, `theirs` is `from`'s.
    pub conflict: Conflict,
    /// The highest version of this id on `into`: a resolution must be written above it.
    pub latest_version: u64,
}

/// The body of every error response: `{"error":{"code":"...","message":"..."}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// A machine-readable code and a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable code, e.g. `repo_not_found`, `invalid_name`, `payload_too_large`.
    pub code: String,
    /// What went wrong, for people.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn write_event_writes_what_serde_json_writes() {
        let events = [
            Event::new("a", "t", json!(null), 0),
            Event::new(
                "evt-1",
                "message",
                json!({"room": "general", "n": 7}),
                1_700_000_000_000,
            )
            .with_origin("replica-1")
            .with_version(u64::MAX),
            Event::new(
                "q\"uote\\back\nline\u{1}\u{7f}",
                "ünïcödé ✓ \u{1F600}",
                json!({
                    "arr": [1, -2, 3.5, -0.0, 1e300, true, false, null, "x", [], {}],
                    "nested": {"b": {"c": ["\t", "\r", "\u{8}", "\u{c}", "</script>"]}},
                    "neg": i64::MIN,
                    "big": u64::MAX,
                    "": "",
                    "k\"ey": "v\\al",
                }),
                42,
            ),
            Event::new("s", "t", json!("just a string"), 9).with_origin(""),
            Event::new("n", "t", json!(-17), 9),
            Event::new("f", "t", json!(0.1), 9),
        ];
        for event in &events {
            let mut ours = Vec::new();
            write_event(&mut ours, event).expect("write");
            let theirs = serde_json::to_vec(event).expect("serde_json");
            assert_eq!(
                String::from_utf8_lossy(&ours),
                String::from_utf8_lossy(&theirs)
            );
            let back: Event = from_json(&ours).expect("decodes");
            assert_eq!(&back, event);
        }
    }

    #[test]
    fn from_json_refuses_bodies_that_are_not_utf8() {
        assert!(from_json::<Event>(b"{\"id\":\"\xff\"}").is_err());
        let event: Event =
            from_json(br#"{"id":"a","type":"t","data":1,"timestamp":1,"version":1}"#)
                .expect("decodes");
        assert_eq!(event, Event::new("a", "t", json!(1), 1));
    }
}
