//! What the service keeps on disk besides events: a branch's record (`git.branch` in its log's
//! metadata), as a newer service version may have written it.

use crate::common;

use std::sync::Arc;

use ksync_core::{LogName, Name, StorageProvider};
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
