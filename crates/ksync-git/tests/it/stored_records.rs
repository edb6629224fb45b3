//! What the service keeps on disk besides events: a branch's record (`git.branch` in its log's
//! metadata), as a newer service version may have written it.

use crate::common;

use std::sync::Arc;

use ksync_core::{LogName, Name, PullPushClient, StorageProvider, SyncClient};
use ksync_git::server::{GitServer, GitServerConfig};
use ksync_storage_file::FileProvider;

use common::{TestAuth, call, http, start_with};

/// A branch record with a field this build does not know (a newer service's: it may say what
/// the branch must not do) is refused, the record named, not read as if the field were absent.
#[tokio::test]
async fn a_branch_record_with_an_unknown_field_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = LogName::Branch {
        repo: Name::new("r").expect("valid"),
        branch: Name::new("main").expect("valid"),
    };
    {
        let provider: Arc<dyn StorageProvider> =
            Arc::new(FileProvider::new(dir.path()).expect("provider"));
        // The record as this build writes it (no server left running: it holds the directory).
        let service = GitServer::with_config(
            Arc::clone(&provider),
            Arc::new(TestAuth),
            GitServerConfig::default(),
        );
        assert!(
            service
                .create_repo(&Name::new("r").expect("valid"))
                .await
                .expect("create")
        );
        let storage = provider.open(&log).expect("open");
        let raw = storage.meta("git.branch").expect("meta").expect("a record");
        let mut record: serde_json::Value = serde_json::from_str(&raw).expect("JSON");
        record["readOnly"] = serde_json::Value::Bool(true);
        storage
            .set_meta("git.branch", &record.to_string())
            .await
            .expect("set");
    }
    let provider: Arc<dyn StorageProvider> =
        Arc::new(FileProvider::new(dir.path()).expect("provider"));
    let server = start_with(provider, GitServerConfig::default(), &[]).await;
    let (status, body) = call(http().get(server.url("/git/r/branches/main"))).await;
    assert_eq!(status, 500, "{body}");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(message.contains("r/main"), "{message}");
    assert!(message.contains("readOnly"), "{message}");
}

/// A merge that is done (its answer kept, so a retry under its `mergeId` is answered from
/// that) leaves no `git.merge-pending.<from>` record behind in `into`'s log: it stayed for
/// good, one per branch ever merged from, in every replay of the log.
#[tokio::test]
async fn a_finished_merge_leaves_no_pending_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let provider: Arc<dyn StorageProvider> =
        Arc::new(FileProvider::new(dir.path()).expect("provider"));
    let server = start_with(Arc::clone(&provider), GitServerConfig::default(), &["r"]).await;
    let client = common::client(&server.repo_url("r"));
    client.create_branch("feature").await.expect("branch");
    client.checkout("feature").await.expect("checkout");
    client
        .send(ksync_core::Event::new("f", "t", serde_json::json!(1), 1))
        .await
        .expect("send");
    client.push().await.expect("push");
    let merged = client.merge("main", "feature").await.expect("merge");
    assert_eq!((merged.appended, merged.duplicates), (1, 0), "{merged:?}");
    let main = provider
        .existing(&LogName::Branch {
            repo: Name::new("r").expect("valid"),
            branch: Name::new("main").expect("valid"),
        })
        .expect("open")
        .expect("main");
    assert_eq!(main.meta("git.merge-pending.feature").expect("meta"), None);
    // The answer is still there for a retry, and the merge cursor moved.
    assert!(
        main.meta("git.merge-answer.feature")
            .expect("meta")
            .is_some()
    );
    assert_eq!(
        main.meta("git.merged.feature").expect("meta").as_deref(),
        Some("1")
    );
}
