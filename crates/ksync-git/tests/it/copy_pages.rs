//! A fork's copy and a merge read their source in pages held decoded: the pages are bounded by
//! bytes (`max_page_bytes`), not only by their count (10,000 events: a 64-event branch of
//! 1 MiB `[0,0,...]` events made one fork take 1.26 GiB on a file log).

use crate::common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use ksync_core::{
    BoxFuture, Event, InMemoryProvider, LogName, MergeOutcome, Name, Storage, StorageError,
    StorageProvider, Stored,
};
use ksync_git::server::GitServerConfig;
use serde_json::json;

/// A log that keeps the most bytes (decoded, as `Event::decoded_len` counts them) that one
/// `read_since` returned.
struct MeasuredStorage {
    log: Arc<dyn Storage>,
    largest_read: Arc<AtomicUsize>,
}

impl Storage for MeasuredStorage {
    fn append(&self, events: Vec<Event>) -> BoxFuture<'_, Result<MergeOutcome, StorageError>> {
        self.log.append(events)
    }
    fn read_since(&self, after: u64, limit: usize) -> Result<Vec<Stored>, StorageError> {
        let read = self.log.read_since(after, limit)?;
        let bytes = read.iter().map(|s| s.event.decoded_len()).sum();
        self.largest_read.fetch_max(bytes, Ordering::SeqCst);
        Ok(read)
    }
    ksync_testkit::storage_pass_through!(log);
}

/// In memory, every log measured (see [`MeasuredStorage`]).
struct MeasuredProvider {
    logs: InMemoryProvider,
    largest_read: Arc<AtomicUsize>,
}

impl MeasuredProvider {
    fn measured(&self, log: Arc<dyn Storage>) -> Arc<dyn Storage> {
        Arc::new(MeasuredStorage {
            log,
            largest_read: Arc::clone(&self.largest_read),
        })
    }
}

impl StorageProvider for MeasuredProvider {
    fn open(&self, name: &LogName) -> Result<Arc<dyn Storage>, StorageError> {
        Ok(self.measured(self.logs.open(name)?))
    }
    fn existing(&self, name: &LogName) -> Result<Option<Arc<dyn Storage>>, StorageError> {
        Ok(self.logs.existing(name)?.map(|log| self.measured(log)))
    }
    fn list(&self) -> Result<Vec<LogName>, StorageError> {
        self.logs.list()
    }
}

#[tokio::test]
async fn fork_and_merge_read_their_source_in_pages_bounded_by_bytes() {
    const PAGE_BYTES: usize = 64 * 1024;
    let largest_read = Arc::new(AtomicUsize::new(0));
    let provider = Arc::new(MeasuredProvider {
        logs: InMemoryProvider::new(),
        largest_read: Arc::clone(&largest_read),
    });
    let config = {
        let mut git_config = GitServerConfig::default();
        git_config.max_page_bytes = PAGE_BYTES;
        git_config
    };
    let server = common::start_with(Arc::clone(&provider) as _, config, &["r"]).await;
    // 64 events of 1,000 zeros: about 32 KiB each decoded, 2 MiB in all.
    let events: Vec<Event> = (0..64)
        .map(|i| Event::new(format!("e{i}"), "t", json!(vec![0u8; 1000]), i))
        .collect();
    let event_bytes = events.iter().map(Event::decoded_len).max().unwrap_or(0);
    let main = provider
        .open(&LogName::Branch {
            repo: Name::new("r").expect("valid"),
            branch: Name::new("main").expect("valid"),
        })
        .expect("main");
    main.append(events).await.expect("append");
    // A page may pass the budget by the event that fills it.
    let bound = PAGE_BYTES + event_bytes;
    let http = common::http();

    largest_read.store(0, Ordering::SeqCst);
    let (status, body) = common::call(
        http.post(server.url("/git/r/branches"))
            .json(&json!({"name": "copy", "from": "main"})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    // Before the check's own read (through the same provider).
    let fork_read = largest_read.load(Ordering::SeqCst);
    assert_eq!(common::branch_events(&server, "r", "copy").len(), 64);
    assert!(
        fork_read <= bound,
        "one read of the fork's copy held {fork_read} bytes, more than {bound}"
    );

    let (status, body) = common::call(
        http.post(server.url("/git/r/branches"))
            .json(&json!({"name": "empty", "from": "main", "at": 0})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    largest_read.store(0, Ordering::SeqCst);
    let (status, body) = common::call(
        http.post(server.url("/git/r/merge"))
            .json(&json!({"into": "empty", "from": "copy"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["appended"], json!(64), "{body}");
    let merge_read = largest_read.load(Ordering::SeqCst);
    assert_eq!(common::branch_events(&server, "r", "empty").len(), 64);
    assert!(
        merge_read <= bound,
        "one read of the merge held {merge_read} bytes, more than {bound}"
    );
}
