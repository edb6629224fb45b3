//! Compaction at open: a log whose superseded metadata records take much of it is rewritten
//! without them; everything else reads back the same, and a crash's leftovers are handled.

use std::fs;
use std::path::{Path, PathBuf};

use ksync_core::{Event, Storage, Stored};
use ksync_storage_file::FileStorage;
use serde_json::json;

/// Keys set once and never overwritten.
const KEPT: [&str; 3] = ["replica", "p2p/cursor-slot/0", "git.branch"];
/// How often the churned key is rewritten.
const REWRITES: u64 = 400;
/// Keys set and later removed.
const REMOVED: u64 = 20;

fn ev(id: &str, n: u64) -> Event {
    Event::new(id, "t", json!({ "n": n, "text": "x".repeat(40) }), n)
}

/// A cursor value about the size real ones take (~200 bytes).
fn cursor(i: u64) -> String {
    format!("{i:0>200}")
}

fn open(path: &Path, min_bytes: Option<u64>) -> FileStorage {
    FileStorage::builder(path)
        .compaction_min_bytes(min_bytes)
        .open()
        .expect("open")
}

fn compact_file(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".compact");
    PathBuf::from(name)
}

/// Writes a log with `events` events between heavy metadata churn, without compacting: the
/// churned key rewritten [`REWRITES`] times, [`KEPT`] set once, [`REMOVED`] keys set and
/// removed (one of them also removed twice). Returns the metadata records written.
async fn churned_log(path: &Path, events: u64) -> u64 {
    let storage = open(path, None);
    let mut records = 0;
    for (i, key) in KEPT.iter().enumerate() {
        storage.set_meta(key, &format!("v{i}")).await.expect("meta");
        records += 1;
    }
    for i in 0..REWRITES {
        if i % (REWRITES / events.max(1)).max(1) == 0 && storage.len() < events {
            let n = storage.len() + 1;
            storage
                .append(vec![ev(&format!("e{n}"), n)])
                .await
                .expect("append");
        }
        storage.set_meta("cursor", &cursor(i)).await.expect("meta");
        records += 1;
        if i < REMOVED {
            storage
                .set_meta(&format!("gone/{i}"), "x")
                .await
                .expect("meta");
            records += 1;
        }
    }
    for i in 0..REMOVED {
        storage.remove_meta(&format!("gone/{i}")).await.expect("rm");
        records += 1;
    }
    storage.remove_meta("gone/0").await.expect("rm");
    records += 1;
    while storage.len() < events {
        let n = storage.len() + 1;
        storage
            .append(vec![ev(&format!("e{n}"), n)])
            .await
            .expect("append");
    }
    records
}

fn all_events(storage: &FileStorage) -> Vec<Stored> {
    storage.read_since(0, usize::MAX).expect("read")
}

/// Checks the metadata a [`churned_log`] leaves.
fn assert_churned_meta(storage: &FileStorage) {
    for (i, key) in KEPT.iter().enumerate() {
        assert_eq!(
            storage.meta(key).expect("meta"),
            Some(format!("v{i}")),
            "{key}"
        );
    }
    assert_eq!(
        storage.meta("cursor").expect("meta"),
        Some(cursor(REWRITES - 1))
    );
    for i in 0..REMOVED {
        assert_eq!(storage.meta(&format!("gone/{i}")).expect("meta"), None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_churned_log_compacts_at_reopen_and_reads_back_the_same() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("room.log");
    let meta_records = churned_log(&path, 50).await;
    let before_len = fs::metadata(&path).expect("stat").len();
    let events = {
        let storage = open(&path, None);
        assert_eq!(storage.recovery().compacted, None, "compaction is off");
        all_events(&storage)
    };
    assert_eq!(events.len(), 50);
    assert_eq!(fs::metadata(&path).expect("stat").len(), before_len);

    // An operator's mode on the log survives its compaction (the copy takes it).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let live_keys = KEPT.len() as u64 + 1;
    {
        let storage = open(&path, Some(1024));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).expect("stat").permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        }
        let done = storage
            .recovery()
            .compacted
            .clone()
            .expect("a churned log compacts");
        assert_eq!(done.bytes_before, before_len);
        assert_eq!(done.records_dropped, meta_records - live_keys);
        let after_len = fs::metadata(&path).expect("stat").len();
        assert_eq!(done.bytes_after, after_len);
        assert_eq!(storage.recovery().valid_len, after_len);
        assert!(
            after_len * 4 < before_len,
            "{after_len} bytes left of {before_len}"
        );
        assert!(!compact_file(&path).exists(), "the .compact was renamed");
        assert_eq!(all_events(&storage), events);
        assert_churned_meta(&storage);

        // Appends go on in the compacted file.
        let out = storage.append(vec![ev("late", 51)]).await.expect("append");
        assert_eq!(out.appended[0].seq, 51);
        storage.set_meta("cursor", "after").await.expect("meta");
        storage.remove_meta("replica").await.expect("rm");
        storage.set_meta("new", "n").await.expect("meta");
    }

    let storage = open(&path, Some(1024));
    assert_eq!(
        storage.recovery().compacted,
        None,
        "too little superseded to compact again"
    );
    // What the compacted file holds, plus the three records written after it.
    assert_eq!(storage.recovery().meta_records, live_keys + 3);
    assert_eq!(storage.len(), 51);
    let reread = all_events(&storage);
    assert_eq!(reread[..50], events[..]);
    assert_eq!(reread[50].seq, 51);
    assert_eq!(reread[50].event.id, "late");
    assert_eq!(
        storage.meta("cursor").expect("meta").as_deref(),
        Some("after")
    );
    assert_eq!(storage.meta("replica").expect("meta"), None);
    assert_eq!(storage.meta("new").expect("meta").as_deref(), Some("n"));
    assert_eq!(
        storage.meta("git.branch").expect("meta").as_deref(),
        Some("v2")
    );
    for i in 0..REMOVED {
        assert_eq!(storage.meta(&format!("gone/{i}")).expect("meta"), None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_under_the_threshold_is_left_byte_for_byte() {
    let dir = tempfile::tempdir().expect("tempdir");

    // Superseded metadata is most of the file but far below the default 1 MiB.
    let small = dir.path().join("small.log");
    churned_log(&small, 10).await;
    let original = fs::read(&small).expect("read");
    {
        let storage = FileStorage::open(&small).expect("open");
        assert_eq!(storage.recovery().compacted, None);
        assert_churned_meta(&storage);
    }
    assert_eq!(fs::read(&small).expect("read"), original);

    // Over a low byte threshold, but less than half the file: events dominate.
    let big = dir.path().join("big.log");
    {
        let storage = open(&big, None);
        for round in 0..20u64 {
            let batch = (0..20)
                .map(|i| {
                    let n = round * 20 + i + 1;
                    Event::new(format!("e{n}"), "t", json!({ "blob": "y".repeat(1000) }), n)
                })
                .collect();
            storage.append(batch).await.expect("append");
            storage
                .set_meta("cursor", &cursor(round))
                .await
                .expect("meta");
        }
    }
    let original = fs::read(&big).expect("read");
    {
        let storage = open(&big, Some(1024));
        assert_eq!(storage.recovery().compacted, None);
        assert_eq!(storage.len(), 400);
        assert_eq!(storage.meta("cursor").expect("meta"), Some(cursor(19)));
    }
    assert_eq!(fs::read(&big).expect("read"), original);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_compact_file_is_removed_and_the_log_opens_intact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("room.log");
    churned_log(&path, 30).await;
    let original = fs::read(&path).expect("read");
    let events = all_events(&open(&path, None));

    // A compaction that crashed while writing: the header and part of a record.
    let stale = compact_file(&path);
    let mut partial = original[..16].to_vec();
    partial.extend_from_slice(&original[16..16 + 20]);
    fs::write(&stale, &partial).expect("write stale");

    let storage = open(&path, None);
    assert!(!stale.exists(), "the stale .compact is deleted");
    assert_eq!(storage.recovery().compacted, None);
    assert_eq!(storage.recovery().cut_tail, None);
    assert_eq!(all_events(&storage), events);
    assert_churned_meta(&storage);
    drop(storage);
    assert_eq!(fs::read(&path).expect("read"), original);
}

/// The state a crash between syncing the `.compact` and renaming it leaves: a complete
/// compacted file beside the intact log. The log is the truth; the `.compact` goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complete_compact_beside_an_intact_log_opens_as_the_original() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("room.log");
    churned_log(&path, 30).await;
    let original = fs::read(&path).expect("read");

    // Make the complete compaction of this very log elsewhere.
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let copy = elsewhere.path().join("room.log");
    fs::copy(&path, &copy).expect("copy");
    let events = {
        let storage = open(&copy, Some(1024));
        assert!(storage.recovery().compacted.is_some());
        all_events(&storage)
    };
    let compacted = fs::read(&copy).expect("read");
    assert_ne!(compacted, original);
    fs::write(compact_file(&path), &compacted).expect("write .compact");

    let storage = open(&path, None);
    assert!(!compact_file(&path).exists());
    assert_eq!(all_events(&storage), events);
    assert_churned_meta(&storage);
    drop(storage);
    assert_eq!(fs::read(&path).expect("read"), original, "the original log");

    // And it still compacts (into the same bytes) when asked.
    let storage = open(&path, Some(1024));
    assert!(storage.recovery().compacted.is_some());
    drop(storage);
    assert_eq!(fs::read(&path).expect("read"), compacted);
}

/// A torn tail is cut first; compaction then copies only what replay kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_is_cut_before_compacting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("room.log");
    churned_log(&path, 30).await;
    let events = all_events(&open(&path, None));
    let good_len = fs::metadata(&path).expect("stat").len();
    // Half a record header: what a crash mid-append leaves.
    let mut bytes = fs::read(&path).expect("read");
    bytes.extend_from_slice(&[7, 0, 0]);
    fs::write(&path, &bytes).expect("write");

    let storage = open(&path, Some(1024));
    let cut = storage.recovery().cut_tail.clone().expect("a cut tail");
    assert_eq!(cut.offset, good_len);
    let done = storage.recovery().compacted.clone().expect("compacted");
    assert_eq!(done.bytes_before, good_len);
    assert_eq!(all_events(&storage), events);
    assert_churned_meta(&storage);
    drop(storage);
    let storage = open(&path, Some(1024));
    assert_eq!(storage.recovery().cut_tail, None);
    assert_eq!(storage.recovery().compacted, None);
    assert_eq!(all_events(&storage), events);
    assert_churned_meta(&storage);
}

/// Through a provider: the log compacts when it is opened again, and the provider's
/// remembered length of the closed log (its event count, which compaction keeps) still holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_log_compacts_when_reopened() {
    use ksync_core::{LogName, Name, StorageProvider};
    use ksync_storage_file::{FileProvider, FileStorageOptions};

    let dir = tempfile::tempdir().expect("tempdir");
    let mut options = FileStorageOptions::default();
    options.compaction_min_bytes = None;
    let room = LogName::Room(Name::new("lobby").expect("name"));
    let path = {
        let provider = FileProvider::with_options(dir.path(), options.clone()).expect("provider");
        let log = provider.open(&room).expect("open");
        for i in 0..REWRITES {
            if i % 10 == 0 {
                let n = log.len() + 1;
                log.append(vec![ev(&format!("e{n}"), n)])
                    .await
                    .expect("append");
            }
            log.set_meta("cursor", &cursor(i)).await.expect("meta");
        }
        provider.path_of(&room)
    };
    let before_len = fs::metadata(&path).expect("stat").len();

    options.compaction_min_bytes = Some(1024);
    let provider = FileProvider::with_options(dir.path(), options).expect("provider");
    let log = provider.open(&room).expect("open");
    assert_eq!(log.len(), REWRITES / 10);
    assert_eq!(
        log.meta("cursor").expect("meta"),
        Some(cursor(REWRITES - 1))
    );
    let after_len = fs::metadata(&path).expect("stat").len();
    assert!(after_len * 4 < before_len, "{after_len} of {before_len}");
    drop(log);
    provider.release(&room);
    assert!(provider.opened(&room).is_none(), "closed");
    assert_eq!(provider.known_len(&room), Some(REWRITES / 10));
    let names = provider.list().expect("list");
    assert_eq!(
        names,
        vec![room.clone()],
        "one log, and nothing else listed"
    );
    let log = provider.open(&room).expect("reopen");
    assert_eq!(log.len(), REWRITES / 10);
    assert_eq!(
        log.meta("cursor").expect("meta"),
        Some(cursor(REWRITES - 1))
    );
}
