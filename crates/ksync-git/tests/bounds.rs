//! Bounds of the repository service found by an audit: what a merge writes, how much memory
//! request bodies may take decoded, and how large one merge answer may grow.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use ksync_core::{LogName, Name};
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
