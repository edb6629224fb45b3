//! Bounds of the repository service found by an audit: what a merge writes, how much memory
//! request bodies may take decoded, and how large one merge answer may grow.

use crate::common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use ksync_core::{
    BoxFuture, Event, InMemoryProvider, InMemoryStorage, KSync, LogName, MergeOutcome, Name,
    Notification, Storage, StorageError, StorageProvider, Stored,
};
use ksync_git::server::GitServerConfig;
use ksync_storage_file::FileProvider;
use serde_json::{Value, json};

/// A service on a file provider in a fresh directory, with repository `r`.
async fn file_server(
    config: GitServerConfig,
) -> (common::Server, Arc<FileProvider>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let provider = Arc::new(FileProvider::new(dir.path()).expect("provider"));
    let server = common::start_with(Arc::clone(&provider) as _, config, &["r"]).await;
    (server, provider, dir)
}

/// The file of branch `branch` of repository `r`.
fn branch_file(provider: &FileProvider, branch: &str) -> PathBuf {
    provider.path_of(&LogName::Branch {
        repo: Name::new("r").expect("valid"),
        branch: Name::new(branch).expect("valid"),
    })
}

fn file_len(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).expect("log file").len()
}

fn event(id: &str, data: Value) -> Value {
    json!({"id": id, "type": "t", "data": data, "timestamp": 1, "version": 1})
}

/// Pushes `events` to `branch` of `r` and returns the answer, which must be 200.
async fn push(
    server: &common::Server,
    http: &reqwest::Client,
    branch: &str,
    events: Vec<Value>,
) -> Value {
    let (status, body) = common::call(
        http.post(server.url(&format!("/git/r/branches/{branch}/events")))
            .json(&json!({"baseVersion": 0, "events": events})),
    )
    .await;
    assert_eq!(status, 200, "push to {branch}: {body}");
    body
}

/// Merges `from` into `into` of `r` (with `merge_id` when given); the answer, which must be 200.
async fn merge(
    server: &common::Server,
    http: &reqwest::Client,
    into: &str,
    from: &str,
    merge_id: Option<&str>,
) -> Value {
    let mut request = json!({"into": into, "from": from});
    if let Some(id) = merge_id {
        request["mergeId"] = json!(id);
    }
    let (status, body) = common::call(http.post(server.url("/git/r/merge")).json(&request)).await;
    assert_eq!(status, 200, "merge {from} into {into}: {body}");
    body
}

/// The `(id, ours.data, theirs.data)` of each conflict of a merge answer.
fn conflicts(answer: &Value) -> Vec<(String, Value, Value)> {
    answer["conflicts"]
        .as_array()
        .expect("conflicts")
        .iter()
        .map(|c| {
            let c = &c["conflict"];
            (
                c["theirs"]["id"].as_str().expect("id").to_owned(),
                c["ours"]["data"].clone(),
                c["theirs"]["data"].clone(),
            )
        })
        .collect()
}

/// A merge that merges nothing writes nothing: hundreds of them leave `into`'s log file as it
/// was (a file log never compacts, so each used to append a cursor and an answer record). A
/// merge that does merge still records its cursor (its collision is not reported again) and
/// its answer (a retry with its `mergeId` gets it again, also after the no-op merges).
#[tokio::test]
async fn no_op_merges_do_not_grow_the_log() {
    let (server, provider, _dir) = file_server(GitServerConfig::default()).await;
    // One client: a new one per request costs a connection and ~40 ms here.
    let http = common::http();
    let (status, body) = common::call(
        http.post(server.url("/git/r/branches"))
            .json(&json!({"name": "feature", "at": 0})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    push(&server, &http, "main", vec![event("x", json!("main"))]).await;
    push(
        &server,
        &http,
        "feature",
        vec![event("x", json!("feature")), event("y", json!(1))],
    )
    .await;
    let main_file = branch_file(&provider, "main");
    let before = file_len(&main_file);

    let first = merge(&server, &http, "main", "feature", Some("m-1")).await;
    assert_eq!(
        (
            &first["appended"],
            &first["fromVersion"],
            &first["serverVersion"]
        ),
        (&json!(1), &json!(2), &json!(2)),
        "{first}"
    );
    let expected = vec![("x".to_owned(), json!("main"), json!("feature"))];
    assert_eq!(conflicts(&first), expected);
    let after_merge = file_len(&main_file);
    assert!(
        after_merge > before,
        "the merge wrote its event and records"
    );

    for i in 0..500 {
        // As `GitSyncClient` does: a fresh id per merge; and some without one.
        let id = format!("noop-{i}");
        let answer = merge(
            &server,
            &http,
            "main",
            "feature",
            (i % 3 != 0).then_some(&*id),
        )
        .await;
        assert_eq!(
            (
                &answer["appended"],
                &answer["duplicates"],
                &answer["fromVersion"]
            ),
            (&json!(0), &json!(0), &json!(2)),
            "{answer}"
        );
        assert_eq!(conflicts(&answer), vec![], "reported once only");
    }
    assert_eq!(
        file_len(&main_file),
        after_merge,
        "no-op merges wrote to the log"
    );

    // The first merge's answer was lost: its retry gets it again, collision included.
    let again = merge(&server, &http, "main", "feature", Some("m-1")).await;
    assert_eq!(conflicts(&again), expected);
    assert_eq!(
        (&again["appended"], &again["fromVersion"]),
        (&json!(1), &json!(2))
    );
    assert_eq!(file_len(&main_file), after_merge, "a replay writes nothing");

    // New events on `from` are merged (and recorded) as before.
    push(&server, &http, "feature", vec![event("z", json!(2))]).await;
    let more = merge(&server, &http, "main", "feature", Some("m-2")).await;
    assert_eq!(
        (
            &more["appended"],
            &more["fromVersion"],
            &more["serverVersion"]
        ),
        (&json!(1), &json!(3), &json!(3)),
        "{more}"
    );
    assert_eq!(conflicts(&more), vec![]);
    assert!(file_len(&main_file) > after_merge);
    let ids: Vec<String> = common::branch_events(&server, "r", "main")
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids, ["x", "y", "z"]);
}

/// A push body of one event whose `data` is `zeros` zeros: 2 bytes of JSON each, a
/// `serde_json::Value` (32 bytes) each once decoded.
fn zeros_push(id: &str, zeros: usize) -> Vec<u8> {
    let mut body =
        format!(r#"{{"baseVersion":0,"events":[{{"id":"{id}","type":"t","data":["#).into_bytes();
    body.reserve(2 * zeros + 64);
    for i in 0..zeros {
        if i > 0 {
            body.push(b',');
        }
        body.push(b'0');
    }
    body.extend_from_slice(br#"],"timestamp":1,"version":1}]}"#);
    body
}

fn gzipped(body: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(body).expect("gzip");
    gz.finish().expect("gzip")
}

/// 32 MiB for the decoded bodies of all requests in flight (the default is 256 MiB; smaller
/// keeps the test quick). A zero decodes to 32 bytes: about 1,048,000 of them fill it.
const BODY_MEMORY: usize = 32 * 1024 * 1024;

/// A few KB of gzip that decode to more than the whole budget (the audit's case: a 16 KB push
/// of a number array took 280 MB) are refused with 413 before anything is decoded, although
/// the JSON is far under `max_body_bytes`; the service goes on serving, and a body that
/// decodes large but fits is taken.
#[tokio::test]
async fn a_body_that_decodes_past_the_whole_budget_is_refused() {
    let config = {
        let mut git_config = GitServerConfig::default();
        git_config.body_memory_bytes = BODY_MEMORY;
        git_config
    };
    let server = common::start_with(Arc::new(InMemoryProvider::new()), config, &["r"]).await;
    let http = common::http();
    let huge = zeros_push("huge", 1_100_000);
    let packed = gzipped(&huge);
    assert!(packed.len() < 16 * 1024, "{} bytes of gzip", packed.len());
    assert!(huge.len() < GitServerConfig::default().max_body_bytes);
    let response = http
        .post(server.url("/git/r/branches/main/events"))
        .header("authorization", "Bearer writer")
        .header("content-encoding", "gzip")
        .header("content-type", "application/json")
        .body(packed)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status().as_u16(), 413);
    let body: Value = response.json().await.expect("a JSON error");
    assert_eq!(common::code(&body), "payload_too_large", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("decoded")),
        "{body}"
    );

    // Others are served: a small push and a pull, and a body that decodes to most of the
    // budget (28 MiB from 1.8 MB of JSON) is taken.
    push(
        &server,
        &http,
        "main",
        vec![event("small", json!({"n": 1}))],
    )
    .await;
    let (status, page) = common::call(http.get(server.url("/git/r/branches/main/events"))).await;
    assert_eq!((status, &page["events"][0]["id"]), (200, &json!("small")));
    let (status, body) = common::call(
        http.post(server.url("/git/r/branches/main/events"))
            .header("content-type", "application/json")
            .body(zeros_push("large", 900_000)),
    )
    .await;
    assert_eq!((status, &body["appended"]), (200, &json!(1)), "{body}");
    let ids: Vec<String> = common::branch_events(&server, "r", "main")
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids, ["small", "large"]);
}

/// A body counts against the budget while it arrives: an upload stalled after 3 MiB of a
/// declared 3.5 MiB holds them, so a push that would fit alone gets 503 `busy` (small ones
/// still fit beside it); once the stalled client goes away, the push is taken. Bodies being
/// received were not counted at all, up to `max_git_requests` × `max_body_bytes` at once.
#[tokio::test]
async fn a_body_counts_against_the_budget_while_it_arrives() {
    use tokio::io::AsyncWriteExt;

    const BUDGET: usize = 4 * 1024 * 1024;
    let config = {
        let mut git_config = GitServerConfig::default();
        git_config.body_memory_bytes = BUDGET;
        git_config
    };
    let server = common::start_with(Arc::new(InMemoryProvider::new()), config, &["r"]).await;
    let http = common::http();

    let mut stalled = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let head = format!(
        "POST /git/r/branches/main/events HTTP/1.1\r\nHost: localhost\r\n\
         Authorization: Bearer writer\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        3 * 1024 * 1024 + 512 * 1024
    );
    stalled.write_all(head.as_bytes()).await.expect("head");
    stalled
        .write_all(&vec![b' '; 3 * 1024 * 1024])
        .await
        .expect("3 MiB of the body");

    // 100,000 zeros: about 3.2 MiB decoded, which fits the budget alone but not beside the
    // stalled 3 MiB. Until the service has read those, it may be taken (a retry is then a
    // duplicate): what must come is the refusal.
    let big = || {
        http.post(server.url("/git/r/branches/main/events"))
            .header("authorization", "Bearer writer")
            .header("content-type", "application/json")
            .body(zeros_push("big", 100_000))
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let response = big().send().await.expect("send");
        if response.status().as_u16() == 503 {
            let body: Value = response.json().await.expect("a JSON error");
            assert_eq!(common::code(&body), "busy", "{body}");
            break;
        }
        assert_eq!(response.status().as_u16(), 200);
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stalled upload's bytes were never counted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    push(&server, &http, "main", vec![event("small", json!(1))]).await;

    drop(stalled);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let response = big().send().await.expect("send");
        if response.status().as_u16() == 200 {
            break;
        }
        assert_eq!(response.status().as_u16(), 503);
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stalled upload's share was never given back"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let mut ids: Vec<String> = common::branch_events(&server, "r", "main")
        .into_iter()
        .map(|e| e.id)
        .collect();
    ids.sort();
    assert_eq!(ids, ["big", "small"]);
}

/// A log whose appends wait until its gate opens (a slow disk), counting the appends waiting.
struct GatedStorage {
    log: Arc<dyn Storage>,
    open: tokio::sync::watch::Receiver<bool>,
    waiting: Arc<AtomicUsize>,
}

impl Storage for GatedStorage {
    fn append(&self, events: Vec<Event>) -> BoxFuture<'_, Result<MergeOutcome, StorageError>> {
        Box::pin(async move {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            let mut open = self.open.clone();
            // The sender lives as long as the test's provider.
            let _ = open.wait_for(|open| *open).await;
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            self.log.append(events).await
        })
    }
    fn read_since(&self, after: u64, limit: usize) -> Result<Vec<Stored>, StorageError> {
        self.log.read_since(after, limit)
    }
    ksync_testkit::storage_pass_through!(log);
}

/// In memory, with the logs of repository `slow` gated (see [`GatedStorage`]).
struct GatedProvider {
    logs: InMemoryProvider,
    open: tokio::sync::watch::Sender<bool>,
    waiting: Arc<AtomicUsize>,
}

impl GatedProvider {
    fn gate(&self, name: &LogName, log: Arc<dyn Storage>) -> Arc<dyn Storage> {
        match name {
            LogName::Branch { repo, .. } if repo.as_str() == "slow" => Arc::new(GatedStorage {
                log,
                open: self.open.subscribe(),
                waiting: Arc::clone(&self.waiting),
            }),
            _ => log,
        }
    }
}

impl StorageProvider for GatedProvider {
    fn open(&self, name: &LogName) -> Result<Arc<dyn Storage>, StorageError> {
        Ok(self.gate(name, self.logs.open(name)?))
    }
    fn existing(&self, name: &LogName) -> Result<Option<Arc<dyn Storage>>, StorageError> {
        Ok(self.logs.existing(name)?.map(|log| self.gate(name, log)))
    }
    fn list(&self) -> Result<Vec<LogName>, StorageError> {
        self.logs.list()
    }
}

/// Bodies that fit the budget alone but not beside the ones in flight get 503 `busy` with
/// `Retry-After: 1` (the server's load shedding answer); smaller ones and reads are served
/// meanwhile, and the refused one is taken once the others are done (their memory is given
/// back: a body needing nearly all of it fits afterwards).
#[tokio::test]
async fn a_body_that_does_not_fit_beside_others_gets_busy() {
    let (open, _) = tokio::sync::watch::channel(false);
    let provider = Arc::new(GatedProvider {
        logs: InMemoryProvider::new(),
        open,
        waiting: Arc::new(AtomicUsize::new(0)),
    });
    let config = {
        let mut git_config = GitServerConfig::default();
        git_config.body_memory_bytes = BODY_MEMORY;
        git_config
    };
    let server = common::start_with(Arc::clone(&provider) as _, config, &["r", "slow"]).await;
    let http = common::http();
    let push_to = |repo: &str, body: Vec<u8>| {
        http.post(server.url(&format!("/git/{repo}/branches/main/events")))
            .header("authorization", "Bearer writer")
            .header("content-type", "application/json")
            .body(body)
    };

    // 600,000 zeros: about 19 MiB decoded, held while the append waits.
    let first = tokio::spawn(push_to("slow", zeros_push("first", 600_000)).send());
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while provider.waiting.load(Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first push never reached its append"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }

    // As much again does not fit now, in another repository too.
    let refused = push_to("r", zeros_push("second", 600_000))
        .send()
        .await
        .expect("send");
    assert_eq!(refused.status().as_u16(), 503);
    assert_eq!(
        refused
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let body: Value = refused.json().await.expect("a JSON error");
    assert_eq!(common::code(&body), "busy", "{body}");

    // Small bodies fit beside it, and reads need none.
    push(&server, &http, "main", vec![event("small", json!(1))]).await;
    let (status, page) = common::call(http.get(server.url("/git/r/branches/main/events"))).await;
    assert_eq!((status, &page["serverVersion"]), (200, &json!(1)), "{page}");

    provider.open.send_replace(true);
    let first = first.await.expect("task").expect("answer");
    assert_eq!(first.status().as_u16(), 200);
    let (status, body) = common::call(
        http.post(server.url("/git/r/branches/main/events"))
            .header("content-type", "application/json")
            .body(zeros_push("second", 600_000)),
    )
    .await;
    assert_eq!((status, &body["appended"]), (200, &json!(1)), "{body}");
    let (status, body) = common::call(
        http.post(server.url("/git/r/branches/main/events"))
            .header("content-type", "application/json")
            .body(zeros_push("third", 950_000)),
    )
    .await;
    assert_eq!((status, &body["appended"]), (200, &json!(1)), "{body}");
    let ids = |repo| -> Vec<String> {
        common::branch_events(&server, repo, "main")
            .into_iter()
            .map(|e| e.id)
            .collect()
    };
    assert_eq!(ids("slow"), ["first"]);
    assert_eq!(ids("r"), ["small", "second", "third"]);
}

/// `r` with `main` and `feature` forked at 0; `main` holds `c0..c{n}` ("main", t=1), `feature`
/// the same ids with other content ("feature ..", t=2) after each of `n0..n{n}`: `n`
/// collisions and `n` events new to `main`, interleaved. `pad` bytes of padding per revision.
async fn colliding_branches(server: &common::Server, http: &reqwest::Client, n: usize, pad: usize) {
    let (status, body) = common::call(
        http.post(server.url("/git/r/branches"))
            .json(&json!({"name": "feature", "at": 0})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let padding = "p".repeat(pad);
    let revision = |id: String, data: String, timestamp: u64| json!({"id": id, "type": "t", "data": data, "timestamp": timestamp, "version": 1});
    let main = (0..n)
        .map(|i| revision(format!("c{i}"), format!("main {padding}"), 1))
        .collect();
    push(server, http, "main", main).await;
    let feature = (0..n)
        .flat_map(|i| {
            [
                revision(format!("n{i}"), format!("new {padding}"), 2),
                revision(format!("c{i}"), format!("feature {padding}"), 2),
            ]
        })
        .collect();
    push(server, http, "feature", feature).await;
}

/// A merge answer holds at most `max_page` collisions and says with `next` that more remain;
/// asked again, the service goes on from there. Across the pages every collision is reported
/// exactly once, every new event is appended (and counted once, although a page ends inside a
/// storage batch whose later events it already stored), and a page's answer is kept for a
/// retry under its `mergeId`.
#[tokio::test]
async fn merge_answers_are_paged_by_collisions() {
    let config = {
        let mut git_config = GitServerConfig::default();
        git_config.max_page = 10;
        git_config
    };
    let server = common::start_with(Arc::new(InMemoryProvider::new()), config, &["r"]).await;
    let http = common::http();
    colliding_branches(&server, &http, 55, 0).await;

    let mut reported = Vec::new();
    let (mut appended, mut duplicates) = (0, 0);
    let mut from_version = 0;
    for page in 0.. {
        let id = format!("page-{page}");
        let answer = merge(&server, &http, "main", "feature", Some(&id)).await;
        let found = conflicts(&answer);
        assert!(
            (1..=10).contains(&found.len()),
            "page {page}: {} collisions",
            found.len()
        );
        let next = answer["fromVersion"].as_u64().expect("fromVersion");
        assert!(next > from_version, "page {page} did not move on");
        from_version = next;
        if page == 1 {
            // Its answer lost: asked again under its id, the same answer, nothing merged.
            let again = merge(&server, &http, "main", "feature", Some(&id)).await;
            assert_eq!(again, answer);
        }
        appended += answer["appended"].as_u64().expect("appended");
        duplicates += answer["duplicates"].as_u64().expect("duplicates");
        reported.extend(found);
        if answer["next"].is_null() {
            break;
        }
        assert_eq!(answer["next"], answer["fromVersion"], "{answer}");
        assert_eq!(found_len(&answer), 10, "only a full page says more remain");
    }
    assert_eq!(from_version, 110);
    let expected: Vec<_> = (0..55)
        .map(|i| (format!("c{i}"), json!("main "), json!("feature ")))
        .collect();
    assert_eq!(reported, expected, "each collision once, in order");
    assert_eq!((appended, duplicates), (55, 0));
    let main = common::branch_events(&server, "r", "main");
    let new: Vec<_> = main.iter().filter(|e| e.id.starts_with('n')).collect();
    assert_eq!(new.len(), 55);
    assert_eq!(main.len(), 110);
    // Done: the next merge finds nothing.
    let after = merge(&server, &http, "main", "feature", Some("after")).await;
    assert_eq!(
        (&after["appended"], &after["next"], conflicts(&after).len()),
        (&json!(0), &Value::Null, 0)
    );
}

fn found_len(answer: &Value) -> usize {
    answer["conflicts"].as_array().map_or(0, Vec::len)
}

/// `GitSyncClient::merge` follows `next` until the merge is done: with answers cut at a few KB
/// of collisions, all 120 collisions of a branch are reported (`MergeResult` and one
/// `conflict` notification each) and settled, once each, and every new event reaches `into`.
#[tokio::test]
async fn the_client_merges_across_answer_pages() {
    let config = {
        let mut git_config = GitServerConfig::default();
        git_config.max_page_bytes = 4096;
        git_config
    };
    let server = common::start_with(Arc::new(InMemoryProvider::new()), config, &["r"]).await;
    let http = common::http();
    colliding_branches(&server, &http, 120, 200).await;
    let node = KSync::builder()
        .storage(Arc::new(InMemoryStorage::new()))
        .sync_client(Arc::new(common::client(&server.repo_url("r"))))
        .replica_id("a")
        .build()
        .await
        .expect("ksync");
    let notified = Arc::new(std::sync::Mutex::new(Vec::new()));
    let _sub = {
        let notified = Arc::clone(&notified);
        node.on("conflict", move |n: &Notification| {
            if let Notification::Conflict(c) = n {
                notified.lock().expect("lock").push(c.theirs.id.clone());
            }
        })
        .expect("on")
    };

    let merged = node.client().merge("main", "feature").await.expect("merge");
    let ids: Vec<String> = (0..120).map(|i| format!("c{i}")).collect();
    let reported: Vec<String> = merged
        .conflicts
        .iter()
        .map(|c| c.theirs.id.clone())
        .collect();
    assert_eq!(reported, ids, "every collision once, in order");
    assert_eq!(
        *notified.lock().expect("lock"),
        ids,
        "one notification each"
    );
    assert_eq!((merged.appended, merged.duplicates), (120, 0));
    // Settled by last-write-wins (feature's revisions are later), each once, on `main`.
    assert_eq!(merged.resolutions.len(), 120);
    let main = common::branch_events(&server, "r", "main");
    assert_eq!(main.len(), 360, "120 + 120 new + 120 resolutions");
    for id in &ids {
        let revisions: Vec<_> = main.iter().filter(|e| &e.id == id).collect();
        assert_eq!(revisions.len(), 2, "{id}");
        assert!(
            revisions[1].version == 2
                && revisions[1]
                    .data
                    .as_str()
                    .is_some_and(|d| d.starts_with("feature")),
            "{id}: {:?}",
            revisions[1]
        );
    }
    // `main` is checked out: the merge pulled it, new events and resolutions alike.
    let state = node.state().expect("state");
    assert_eq!(state.len(), 240);
    assert!((0..120).all(|i| state.contains_key(&format!("n{i}"))));

    // Each answer was a page: merging by hand from the start, with the same limits, takes many.
    let (status, body) = common::call(
        http.post(server.url("/git/r/branches"))
            .json(&json!({"name": "again", "at": 120})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let page = merge(&server, &http, "again", "feature", None).await;
    assert!(
        (1..20).contains(&found_len(&page)) && page["next"].is_u64(),
        "{page}"
    );
    let again = node.client().merge("main", "feature").await.expect("merge");
    assert_eq!((again.appended, again.conflicts.len()), (0, 0));
}
