//! FileStorage behaviour: concurrency, metadata, durability modes, locking, fault injection,
//! oversized events, and the provider.

use std::fs;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use ksync_core::{
    AppendOutcome, Event, LogKind, LogName, Name, Storage, StorageError, StorageProvider, Stored,
};
use ksync_storage_file::format::MAX_RECORD_LEN;
use ksync_storage_file::{
    Durability, FaultHook, FileProvider, FileStorage, FileStorageOptions, StoreLimits, WriteFault,
};
use serde_json::json;

fn ev(id: &str, n: u64) -> Event {
    Event::new(id, "t", json!({"n": n}), n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_all_land_gap_free() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("c.log");
    let storage = Arc::new(FileStorage::open(&path).expect("open"));
    let tasks: Vec<_> = (0..32)
        .map(|t| {
            let storage = Arc::clone(&storage);
            tokio::spawn(async move {
                let mut mine = Vec::new();
                for i in 0..15u64 {
                    let id = format!("t{t}-{i}");
                    let out = storage.append(vec![ev(&id, i)]).await.expect("append");
                    assert_eq!(out.appended.len(), 1);
                    mine.push((id, out.last_seq().expect("seq")));
                }
                mine
            })
        })
        .collect();
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.expect("task"));
    }
    let mut seqs: Vec<u64> = acked.iter().map(|(_, s)| *s).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=32 * 15).collect::<Vec<u64>>());
    assert_eq!(storage.len(), 32 * 15);
    drop(storage);
    let reopened = FileStorage::open(&path).expect("reopen");
    for (id, seq) in acked {
        assert_eq!(reopened.get(&id, 1).expect("get").map(|s| s.seq), Some(seq));
    }
}

/// Appenders racing on shared revisions, so that duplicates and conflicts meet groups that
/// are still syncing: every answer must agree with the log, and the log with its reopen.
/// `tasks` appenders each make `steps` appends of `batch` events drawn from `ids` ids.
async fn race(tasks: u64, steps: u64, batch: u64, ids: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("race.log");
    let storage = Arc::new(
        FileStorage::builder(&path)
            .syncs_in_flight(3)
            .open()
            .expect("open"),
    );
    let tasks: Vec<_> = (0..tasks)
        .map(|t| {
            let storage = Arc::clone(&storage);
            tokio::spawn(async move {
                let mut answers = Vec::new();
                for i in 0..steps {
                    // Three tasks offer each revision at the same step, one of them with
                    // other content: duplicates and conflicts of revisions still syncing.
                    let events: Vec<Event> = (0..batch)
                        .map(|k| {
                            let id = format!("r{}", ((t / 3) * 31 + i * 7 + k * 13) % ids);
                            let version = 1 + (t / 3 + i + k) % 2;
                            Event::new(&id, "t", json!({"c": u64::from(t % 3 == 2)}), 1)
                                .with_version(version)
                        })
                        .collect();
                    let out = if i % 2 == 0 {
                        let out = storage.append(events.clone()).await.expect("append");
                        // The answer carries exactly the appended events, with their seqs.
                        let expected: Vec<Stored> = events
                            .iter()
                            .zip(&out.outcomes)
                            .filter_map(|(e, o)| match o {
                                AppendOutcome::Appended { seq } => Some(Stored {
                                    seq: *seq,
                                    event: e.clone(),
                                }),
                                _ => None,
                            })
                            .collect();
                        assert_eq!(out.appended, expected);
                        out.outcomes
                    } else {
                        storage
                            .append_summary(events.clone())
                            .await
                            .expect("append")
                            .outcomes
                    };
                    assert_eq!(out.len(), events.len());
                    answers.extend(events.into_iter().zip(out));
                }
                answers
            })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.extend(t.await.expect("task"));
    }
    let log = storage.read_since(0, usize::MAX).expect("read");
    assert_eq!(
        log.iter().map(|s| s.seq).collect::<Vec<_>>(),
        (1..=log.len() as u64).collect::<Vec<_>>()
    );
    let mut revisions: Vec<_> = log.iter().map(|s| (&s.event.id, s.event.version)).collect();
    revisions.sort_unstable();
    revisions.dedup();
    assert_eq!(revisions.len(), log.len(), "a revision is stored twice");
    let appended = answers
        .iter()
        .filter(|(_, o)| matches!(o, AppendOutcome::Appended { .. }))
        .count();
    assert_eq!(appended, log.len());
    for (event, outcome) in &answers {
        let stored = storage
            .get(&event.id, event.version)
            .expect("get")
            .expect("every revision offered is stored in some content");
        match outcome {
            AppendOutcome::Appended { seq } => {
                assert_eq!((stored.seq, &stored.event), (*seq, event));
            }
            AppendOutcome::Duplicate { seq } => {
                assert_eq!(stored.seq, *seq);
                assert!(stored.event.same_content(event));
            }
            AppendOutcome::Conflict(conflict) => {
                assert_eq!(&conflict.ours, &stored.event);
                assert_eq!(&conflict.theirs, event);
                assert!(!stored.event.same_content(event));
            }
        }
    }
    drop(storage);
    let reopened = FileStorage::open(&path).expect("reopen");
    assert_eq!(reopened.read_since(0, usize::MAX).expect("read"), log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_single_event_appends_agree_with_the_log() {
    race(24, 20, 1, 60).await;
}

/// Big batches, many of them meeting groups in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_batches_agree_with_the_log() {
    race(9, 6, 120, 700).await;
}

/// The state as positions in the log, from the index of a file log (events kept as their
/// encoded records, ids read from them): the latest version of every id, in id order, as
/// `state()` has them, before and after a reopen.
#[tokio::test]
async fn state_seqs_name_the_state_in_id_order_before_and_after_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s.log");
    let ev = |id: &str, version: u64| ev(id, version).with_version(version);
    let check = |storage: &FileStorage| {
        let seqs = storage.state_seqs().expect("state seqs");
        let read: Vec<(String, u64)> = seqs
            .iter()
            .map(|&seq| {
                let page = storage.read_since(seq - 1, 1).expect("read");
                (page[0].event.id.clone(), page[0].event.version)
            })
            .collect();
        let state: Vec<(String, u64)> = storage
            .state()
            .expect("state")
            .into_iter()
            .map(|(id, e)| (id, e.version))
            .collect();
        assert_eq!(read, state);
        assert_eq!(
            read,
            [
                ("a\"q".to_owned(), 1),
                ("b".to_owned(), 3),
                ("c".to_owned(), 2),
                ("\u{e9}".to_owned(), 1)
            ]
        );
    };
    {
        let storage = FileStorage::open(&path).expect("open");
        storage
            .append(vec![ev("c", 1), ev("b", 1), ev("\u{e9}", 1)])
            .await
            .expect("append");
        storage
            .append(vec![ev("b", 3), ev("a\"q", 1), ev("c", 2), ev("b", 2)])
            .await
            .expect("append");
        check(&storage);
    }
    check(&FileStorage::open(&path).expect("reopen"));
}

#[tokio::test]
async fn meta_survives_reopen_latest_wins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("m.log");
    {
        let storage = FileStorage::open(&path).expect("open");
        storage.set_meta("cursor", "1").await.expect("meta");
        storage.append(vec![ev("a", 1)]).await.expect("append");
        storage.set_meta("cursor", "2").await.expect("meta");
        storage.set_meta("replica", "r-1").await.expect("meta");
        assert_eq!(storage.meta("cursor").expect("meta").as_deref(), Some("2"));
    }
    let storage = FileStorage::open(&path).expect("reopen");
    assert_eq!(storage.meta("cursor").expect("meta").as_deref(), Some("2"));
    assert_eq!(
        storage.meta("replica").expect("meta").as_deref(),
        Some("r-1")
    );
    assert_eq!(storage.meta("other").expect("meta"), None);
    assert_eq!(storage.recovery().meta_records, 3);
    assert_eq!(storage.len(), 1);
}

/// A removed key reads as absent at once and after a reopen; a key set again after its
/// removal holds the new value; a removal and a set of the same key in one write group
/// apply in the order they were asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_meta_stays_removed_after_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("m.log");
    {
        let storage = FileStorage::open(&path).expect("open");
        for key in ["gone", "back", "kept", "raced"] {
            storage.set_meta(key, "1").await.expect("meta");
        }
        storage.remove_meta("gone").await.expect("remove");
        storage.remove_meta("back").await.expect("remove");
        storage.set_meta("back", "2").await.expect("meta");
        storage
            .remove_meta("never-set")
            .await
            .expect("absent is fine");
        // Queued back to back (most often one write group): the removal comes second and
        // wins.
        let (set, removed) =
            tokio::join!(storage.set_meta("raced", "3"), storage.remove_meta("raced"));
        set.expect("meta");
        removed.expect("remove");
        assert_eq!(storage.meta("gone").expect("meta"), None);
        assert_eq!(storage.meta("raced").expect("meta"), None);
    }
    let storage = FileStorage::open(&path).expect("reopen");
    assert_eq!(storage.meta("gone").expect("meta"), None);
    assert_eq!(storage.meta("raced").expect("meta"), None);
    assert_eq!(storage.meta("never-set").expect("meta"), None);
    assert_eq!(storage.meta("back").expect("meta").as_deref(), Some("2"));
    assert_eq!(storage.meta("kept").expect("meta").as_deref(), Some("1"));
    assert_eq!(storage.recovery().meta_records, 10);
    assert_eq!(storage.recovery().cut_tail, None);
}

#[tokio::test]
async fn every_durability_mode_persists() {
    for durability in [
        Durability::EveryAppend,
        Durability::GroupCommit,
        Durability::None,
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("d.log");
        {
            let storage = FileStorage::builder(&path)
                .durability(durability)
                .open()
                .expect("open");
            assert_eq!(storage.durability(), durability);
            let out = storage
                .append(vec![ev("a", 1), ev("b", 2), ev("a", 1)])
                .await
                .expect("append");
            assert_eq!(out.appended.len(), 2);
            assert_eq!(out.duplicates, 1);
            storage.flush().await.expect("flush");
        }
        let storage = FileStorage::open(&path).expect("reopen");
        assert_eq!(storage.len(), 2, "{durability:?}");
    }
}

#[tokio::test]
async fn a_second_open_of_the_same_file_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("l.log");
    let first = FileStorage::open(&path).expect("open");
    assert!(matches!(
        FileStorage::open(&path),
        Err(StorageError::Io { .. })
    ));
    drop(first);
    FileStorage::open(&path).expect("open after close");
}

#[tokio::test]
async fn an_oversized_event_is_refused_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = FileStorage::open(dir.path().join("big.log")).expect("open");
    let huge = Event::new("big", "t", json!("x".repeat(MAX_RECORD_LEN + 1)), 1);
    let (big, small) = tokio::join!(
        storage.append(vec![huge]),
        storage.append(vec![ev("small", 1)])
    );
    assert!(matches!(big, Err(StorageError::Codec(_))));
    assert_eq!(small.expect("small append").last_seq(), Some(1));
    assert_eq!(storage.len(), 1);
    assert!(storage.get("big", 1).expect("get").is_none());
}

/// Every event `Event::validate` accepts encodes, however deep its data: the file's encoding
/// has the same nesting limit, so a valid event received from a peer is never refused here.
#[tokio::test]
async fn data_as_deep_as_validation_allows_is_stored_and_read_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("deep.log");
    let mut data = json!("innermost");
    for level in 0..ksync_core::MAX_DATA_DEPTH {
        data = if level % 2 == 0 {
            json!([data])
        } else {
            json!({ "k": data })
        };
    }
    let deep = Event::new("deep", "t", data, 1);
    deep.validate(&ksync_core::EventLimits::default())
        .expect("valid");
    {
        let storage = FileStorage::open(&path).expect("open");
        let stored = storage.append(vec![deep.clone()]).await.expect("append");
        assert_eq!(stored.last_seq(), Some(1));
    }
    let storage = FileStorage::open(&path).expect("reopen");
    let read = storage.get("deep", 1).expect("get").expect("stored");
    assert_eq!(read.event, deep);
}

#[derive(Default)]
struct Faults {
    fail_next_write: AtomicBool,
    fail_next_sync: AtomicBool,
    syncs: AtomicUsize,
}

impl FaultHook for Faults {
    fn before_write(&self, len: usize) -> Result<(), WriteFault> {
        if self.fail_next_write.swap(false, Ordering::SeqCst) {
            return Err(WriteFault {
                written: len / 2,
                error: io::Error::from_raw_os_error(28), // ENOSPC
            });
        }
        Ok(())
    }

    fn before_sync(&self) -> io::Result<()> {
        self.syncs.fetch_add(1, Ordering::SeqCst);
        if self.fail_next_sync.swap(false, Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(5)); // EIO
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_failed_write_acknowledges_nothing_and_the_log_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("w.log");
    let faults = Arc::new(Faults::default());
    {
        let storage = FileStorage::builder(&path)
            .fault_hook(faults.clone())
            .open()
            .expect("open");
        storage.append(vec![ev("a", 1)]).await.expect("append");
        faults.fail_next_write.store(true, Ordering::SeqCst);
        let err = storage
            .append(vec![ev("b", 2), ev("c", 3)])
            .await
            .expect_err("write fails");
        match err {
            StorageError::Io { source, .. } => assert_eq!(source.raw_os_error(), Some(28)),
            other => panic!("expected Io, got {other:?}"),
        }
        assert_eq!(storage.len(), 1);
        assert!(storage.get("b", 1).expect("get").is_none());
        // The writer cut the torn half away and goes on.
        let out = storage
            .append(vec![ev("d", 4)])
            .await
            .expect("append after ENOSPC");
        assert_eq!(out.last_seq(), Some(2));
    }
    let storage = FileStorage::open(&path).expect("reopen");
    assert_eq!(storage.recovery().cut_tail, None);
    let ids: Vec<String> = storage
        .read_since(0, 10)
        .expect("read")
        .into_iter()
        .map(|s| s.event.id)
        .collect();
    assert_eq!(ids, ["a", "d"]);
}

#[tokio::test]
async fn a_failed_sync_acknowledges_nothing_and_closes_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s.log");
    let faults = Arc::new(Faults::default());
    {
        let storage = FileStorage::builder(&path)
            .fault_hook(faults.clone())
            .open()
            .expect("open");
        storage.append(vec![ev("a", 1)]).await.expect("append");
        assert_eq!(faults.syncs.load(Ordering::SeqCst), 1);
        faults.fail_next_sync.store(true, Ordering::SeqCst);
        let err = storage
            .append(vec![ev("b", 2)])
            .await
            .expect_err("sync fails");
        assert!(
            matches!(err, StorageError::Io { ref source, .. } if source.raw_os_error() == Some(5))
        );
        assert_eq!(storage.len(), 1);
        assert!(storage.get("b", 1).expect("get").is_none());
        assert!(matches!(
            storage.append(vec![ev("c", 3)]).await,
            Err(StorageError::Closed)
        ));
        assert!(matches!(
            storage.set_meta("k", "v").await,
            Err(StorageError::Closed)
        ));
        assert_eq!(storage.len(), 1);
    }
    // A reopen replays what is really on disk; "a" was acknowledged and is there.
    let storage = FileStorage::open(&path).expect("reopen");
    assert!(storage.get("a", 1).expect("get").is_some());
    assert!(storage.get("c", 1).expect("get").is_none());
}

/// A log stopped by a failed sync lets go of its file (cut back to its last good sync)
/// while it is still held, so that the file can be opened again at once; the reopened log
/// holds what was acknowledged, and nothing else.
#[tokio::test]
async fn a_log_a_failed_sync_closed_can_be_reopened_while_it_is_still_held() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("r.log");
    let faults = Arc::new(Faults::default());
    let closed = FileStorage::builder(&path)
        .fault_hook(faults.clone())
        .open()
        .expect("open");
    closed.append(vec![ev("a", 1)]).await.expect("append");
    assert!(!closed.is_closed());
    faults.fail_next_sync.store(true, Ordering::SeqCst);
    closed
        .append(vec![ev("b", 2)])
        .await
        .expect_err("sync fails");
    // Closed as soon as the failure is answered.
    assert!(closed.is_closed());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let reopened = loop {
        match FileStorage::open(&path) {
            Ok(storage) => break storage,
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            Err(e) => panic!("the closed log never let go of its file: {e}"),
        }
    };
    assert_eq!(
        reopened.recovery().cut_tail,
        None,
        "cut back before the reopen"
    );
    assert_eq!(reopened.len(), 1);
    assert!(reopened.get("b", 2).expect("get").is_none());
    reopened.append(vec![ev("b", 2)]).await.expect("append b");
    // The closed one still reads what it acknowledged, and writes nothing.
    assert_eq!(closed.len(), 1);
    assert!(matches!(
        closed.append(vec![ev("c", 3)]).await,
        Err(StorageError::Closed)
    ));
    drop(closed);
    drop(reopened);
    let storage = FileStorage::open(&path).expect("reopen");
    let ids: Vec<(String, u64)> = storage
        .read_since(0, 10)
        .expect("read")
        .into_iter()
        .map(|s| (s.event.id, s.seq))
        .collect();
    assert_eq!(ids, [("a".to_owned(), 1), ("b".to_owned(), 2)]);
}

/// The provider hands out a log a failed sync closed only until its file is free: then it
/// opens the file again, for rooms and branches alike (`open` and `existing`), even while
/// someone still holds the closed one. One failed sync no longer closes a log until restart.
#[tokio::test]
async fn the_provider_reopens_a_log_a_failed_sync_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let faults = Arc::new(Faults::default());
    let mut options = FileStorageOptions::default();
    options.fault_hook = Some(faults.clone());
    let provider = FileProvider::with_options(dir.path(), options).expect("provider");
    let room = LogName::Room(name("lobby"));
    let branch = LogName::Branch {
        repo: name("repo"),
        branch: name("main"),
    };
    for (log, by_existing) in [(room, false), (branch, true)] {
        let open = |log: &LogName| -> Arc<dyn Storage> {
            if by_existing {
                provider.existing(log).expect("existing").expect("present")
            } else {
                provider.open(log).expect("open")
            }
        };
        provider.open(&log).expect("create");
        let first = open(&log);
        first.append(vec![ev("a", 1)]).await.expect("append a");
        faults.fail_next_sync.store(true, Ordering::SeqCst);
        first
            .append(vec![ev("b", 2)])
            .await
            .expect_err("sync fails");
        assert!(matches!(
            first.append(vec![ev("b", 2)]).await,
            Err(StorageError::Closed)
        ));
        // `first` is still held (by a room, a request): the provider reopens the file all
        // the same, and hands the new log out from then on.
        let second = open(&log);
        assert!(!Arc::ptr_eq(&first, &second), "{log:?}");
        assert!(Arc::ptr_eq(&second, &open(&log)));
        assert_eq!(second.len(), 1, "{log:?}: b was never acknowledged");
        let out = second.append(vec![ev("b", 2)]).await.expect("append b");
        assert_eq!(out.last_seq(), Some(2));
        drop(first);
        assert_eq!(provider.known_len(&log), Some(2));
        provider.flush_all().await.expect("flush_all");
        drop(second);
        provider.close(&log);
        let ids: Vec<String> = open(&log)
            .read_since(0, 10)
            .expect("read")
            .into_iter()
            .map(|s| s.event.id)
            .collect();
        assert_eq!(ids, ["a", "b"], "{log:?}");
    }
}

fn name(s: &str) -> Name {
    Name::new(s).expect("valid name")
}

#[tokio::test]
async fn provider_lays_out_rooms_and_branches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let room = LogName::Room(name("lobby"));
    let branch = LogName::Branch {
        repo: name("my-repo"),
        branch: name("main"),
    };
    {
        let provider = FileProvider::new(dir.path()).expect("provider");
        assert!(provider.existing(&room).expect("existing").is_none());
        assert!(provider.list().expect("list").is_empty());
        let a = provider.open(&room).expect("open room");
        let b = provider.open(&room).expect("open room again");
        assert!(Arc::ptr_eq(&a, &b));
        a.append(vec![ev("x", 1)]).await.expect("append");
        let br = provider.open(&branch).expect("open branch");
        br.append(vec![ev("y", 1), ev("z", 2)])
            .await
            .expect("append");
        br.set_meta("forked-from", "main@0").await.expect("meta");
        provider.flush_all().await.expect("flush_all");
        assert!(dir.path().join("rooms/lobby.log").is_file());
        assert!(dir.path().join("repos/my-repo/main.log").is_file());
        assert_eq!(
            provider.list().expect("list"),
            vec![room.clone(), branch.clone()]
        );
    }
    // Stray files that are not logs of valid names are not listed.
    fs::write(dir.path().join("rooms/notes.txt"), b"x").expect("write");
    fs::write(dir.path().join("rooms/.hidden.log"), b"x").expect("write");
    let provider = FileProvider::new(dir.path()).expect("provider");
    assert_eq!(
        provider.list().expect("list"),
        vec![room.clone(), branch.clone()]
    );
    let room_log = provider
        .existing(&room)
        .expect("existing")
        .expect("present");
    assert_eq!(room_log.len(), 1);
    let branch_log = provider.open(&branch).expect("open");
    assert_eq!(branch_log.len(), 2);
    assert_eq!(
        branch_log.meta("forked-from").expect("meta").as_deref(),
        Some("main@0")
    );
    provider.close(&room);
    drop(room_log);
    let reopened = provider.open(&room).expect("reopen");
    assert_eq!(reopened.len(), 1);
}

/// Names that differ only in case are one file where the file system ignores case (macOS's
/// and Windows' defaults): two rooms would share a log. The second is refused on every file
/// system; the first opens as before.
#[tokio::test]
async fn provider_refuses_a_name_that_differs_only_in_case_from_a_stored_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let provider = FileProvider::new(dir.path()).expect("provider");
    let room = |s: &str| LogName::Room(name(s));
    let branch = |repo: &str, branch: &str| LogName::Branch {
        repo: name(repo),
        branch: name(branch),
    };
    provider
        .open(&room("Notes"))
        .expect("open")
        .append(vec![ev("x", 1)])
        .await
        .expect("append");
    provider.open(&branch("Repo", "main")).expect("open branch");
    for (asked, requested, existing) in [
        (room("notes"), "notes", "Notes"),
        (room("NOTES"), "NOTES", "Notes"),
        (branch("repo", "main"), "repo", "Repo"),
        (branch("Repo", "MAIN"), "MAIN", "main"),
    ] {
        for result in [
            provider.open(&asked).map(|_| ()),
            provider.existing(&asked).map(|_| ()),
        ] {
            match result {
                Err(StorageError::NameClash {
                    requested: r,
                    existing: e,
                }) => assert_eq!((r.as_str(), e.as_str()), (requested, existing)),
                // `existing` of a name whose file is not there (a file system that keeps
                // case) finds nothing, and makes nothing.
                Ok(()) => assert!(!provider.path_of(&asked).is_file(), "{asked:?}"),
                Err(other) => panic!("{asked:?}: {other}"),
            }
        }
    }
    assert_eq!(
        provider.list().expect("list"),
        vec![room("Notes"), branch("Repo", "main")]
    );
    // The stored names open as before, also after a release.
    provider.release(&room("Notes"));
    assert_eq!(provider.open(&room("Notes")).expect("reopen").len(), 1);
    provider
        .open(&branch("Repo", "feature"))
        .expect("another branch of the same repository");
}

/// The names the case check compares with are listed once per directory, then kept up to
/// date by the provider itself: names stored before it started (by an earlier run, or by
/// hand) and names it made since are refused in another case, and a log deleted as empty
/// frees its name for any case.
#[tokio::test]
async fn provider_case_check_knows_stored_names_and_its_own_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let room = |s: &str| LogName::Room(name(s));
    let branch = |repo: &str, branch: &str| LogName::Branch {
        repo: name(repo),
        branch: name(branch),
    };
    {
        let provider = FileProvider::new(dir.path()).expect("provider");
        provider
            .open(&room("Notes"))
            .expect("open")
            .append(vec![ev("x", 1)])
            .await
            .expect("append");
        provider.open(&branch("Repo", "main")).expect("open branch");
    }
    fs::write(dir.path().join("rooms").join("Hand.log"), b"").expect("a log made by hand");
    let provider = FileProvider::new(dir.path()).expect("provider");
    let clash = |asked: &LogName| match provider.open(asked) {
        Err(StorageError::NameClash { existing, .. }) => existing,
        Err(other) => panic!("{asked:?}: {other}"),
        Ok(_) => panic!("{asked:?}: opened"),
    };
    assert_eq!(clash(&room("notes")), "Notes");
    assert_eq!(clash(&room("HAND")), "Hand");
    assert_eq!(clash(&branch("repo", "main")), "Repo");
    assert_eq!(clash(&branch("Repo", "Main")), "main");
    // Made by this provider, after it listed the directories.
    drop(provider.open(&room("Fresh")).expect("open"));
    drop(
        provider
            .open(&branch("New", "main"))
            .expect("new repository"),
    );
    assert_eq!(clash(&room("fresh")), "Fresh");
    assert_eq!(clash(&branch("NEW", "main")), "New");
    // Deleted (no events): the name is free again, in any case.
    provider.release_discarding_empty(&room("Fresh"));
    assert!(!provider.path_of(&room("Fresh")).exists());
    drop(
        provider
            .open(&room("fresh"))
            .expect("a deleted name, in another case"),
    );
    assert_eq!(clash(&room("FRESH")), "fresh");
    assert_eq!(provider.open(&room("Notes")).expect("reopen").len(), 1);
}

#[tokio::test]
async fn provider_options_reach_every_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let faults = Arc::new(Faults::default());
    let mut options = FileStorageOptions::default();
    options.durability = Durability::None;
    options.fault_hook = Some(faults.clone());
    let provider = FileProvider::with_options(dir.path(), options).expect("provider");
    let log = provider.open(&LogName::Room(name("r"))).expect("open");
    log.append(vec![ev("a", 1)]).await.expect("append");
    assert_eq!(
        faults.syncs.load(Ordering::SeqCst),
        0,
        "durability None does not sync"
    );
    provider.flush_all().await.expect("flush");
    assert_eq!(faults.syncs.load(Ordering::SeqCst), 1, "flush syncs");
}

/// A directory the logs go into that cannot be written (here a file where it must be, which
/// stops root too) is refused when the provider is made, naming it, before anything is
/// locked; a probe leaves nothing behind in a directory that can be written.
#[test]
fn provider_refuses_a_layout_it_cannot_write_in() {
    for blocked in ["rooms", "repos", "repos/notes"] {
        let dir = tempfile::tempdir().expect("tempdir");
        if let Some((parent, _)) = blocked.split_once('/') {
            fs::create_dir(dir.path().join(parent)).expect("mkdir");
        }
        let path = dir.path().join(blocked);
        fs::write(&path, b"not a directory").expect("write");
        match FileProvider::new(dir.path()) {
            Err(StorageError::Io { context, source }) => {
                assert_eq!(
                    context,
                    format!("data directory not writable: {}", path.display())
                );
                assert_eq!(source.kind(), io::ErrorKind::NotADirectory);
            }
            Err(other) => panic!("{blocked}: wrong error {other:?}"),
            Ok(_) => panic!("{blocked}: accepted"),
        }
        assert!(
            !dir.path().join(".lock").exists(),
            "{blocked}: locked anyway"
        );
        fs::remove_file(&path).expect("remove");
        fs::create_dir(&path).expect("mkdir");
        drop(FileProvider::new(dir.path()).expect("provider"));
        let left: Vec<_> = fs::read_dir(&path).expect("read").collect();
        assert!(left.is_empty(), "{blocked}: probe left behind: {left:?}");
    }
}

#[tokio::test]
async fn one_provider_per_data_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = FileProvider::new(dir.path()).expect("provider");
    first
        .open(&LogName::Room(name("r")))
        .expect("open")
        .append(vec![ev("a", 1)])
        .await
        .expect("append");
    match FileProvider::new(dir.path()) {
        Err(StorageError::Io { context, .. }) => {
            assert!(context.contains("in use"), "{context}");
        }
        other => panic!("a second provider on the directory: {other:?}"),
    }
    // The lock file is no log: nothing else is listed.
    assert_eq!(first.list().expect("list"), vec![LogName::Room(name("r"))]);
    drop(first);
    let again = FileProvider::new(dir.path()).expect("free again once dropped");
    let log = again.open(&LogName::Room(name("r"))).expect("open");
    assert_eq!(log.len(), 1);
}

/// `release` closes a log nobody else holds (its file lock is free again, the next `open`
/// reopens it with its history) and leaves a log in use alone.
#[tokio::test]
async fn release_closes_a_log_only_once_nobody_holds_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let provider = FileProvider::new(dir.path()).expect("provider");
    let room = LogName::Room(name("r"));
    let path = dir.path().join("rooms").join("r.log");
    assert_eq!(provider.known_len(&room), None, "never opened");
    let log = provider.open(&room).expect("open");
    log.append(vec![ev("a", 1)]).await.expect("append");
    assert_eq!(provider.known_len(&room), Some(1));
    // Held here: released in name only, the log stays open (its file stays locked).
    provider.release(&room);
    assert!(
        FileStorage::open(&path).is_err(),
        "still open by the provider"
    );
    log.append(vec![ev("b", 2)]).await.expect("still usable");
    assert!(Arc::ptr_eq(&provider.open(&room).expect("open"), &log));
    drop(log);
    provider.release(&room);
    // Closed: known by the length it had, and not opened again to tell.
    assert!(provider.opened(&room).is_none());
    assert_eq!(provider.known_len(&room), Some(2));
    let direct = FileStorage::open(&path).expect("closed: the file lock is free");
    assert_eq!(direct.len(), 2);
    drop(direct);
    let reopened = provider.open(&room).expect("reopen");
    assert_eq!(reopened.len(), 2);
    // A name the provider never opened: nothing to do.
    provider.release(&LogName::Room(name("other")));
}

/// `release_discarding_empty` deletes a log with no events that nobody holds (metadata and
/// all), and treats every other log as `release` does.
#[tokio::test]
async fn release_discarding_empty_deletes_only_empty_logs_nobody_holds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let provider = FileProvider::new(dir.path()).expect("provider");
    let (empty, held, written) = (
        LogName::Room(name("empty")),
        LogName::Room(name("held")),
        LogName::Room(name("written")),
    );
    let path = |n: &str| dir.path().join("rooms").join(format!("{n}.log"));
    // Metadata alone does not count as content.
    let log = provider.open(&empty).expect("open");
    log.set_meta("relay.log-id", "abc").await.expect("meta");
    drop(log);
    let held_log = provider.open(&held).expect("open");
    let log = provider.open(&written).expect("open");
    log.append(vec![ev("a", 1)]).await.expect("append");
    drop(log);
    for name in [&empty, &held, &written] {
        provider.release_discarding_empty(name);
    }
    assert!(!path("empty").exists(), "the empty log's file is deleted");
    assert_eq!(provider.known_len(&empty), None, "and forgotten");
    assert!(path("held").exists(), "a log still held stays");
    assert!(Arc::ptr_eq(&provider.open(&held).expect("open"), &held_log));
    assert_eq!(provider.known_len(&written), Some(1), "closed, not deleted");
    assert_eq!(
        provider.list().expect("list"),
        vec![held.clone(), written.clone()]
    );
    assert_eq!(provider.open(&written).expect("reopen").len(), 1);
    // Opened again after its deletion: a new, empty log.
    let again = provider.open(&empty).expect("open anew");
    assert_eq!(
        (again.len(), again.meta("relay.log-id").expect("meta")),
        (0, None)
    );
    drop(held_log);
    provider.release_discarding_empty(&held);
    assert!(!path("held").exists(), "deleted once let go");
}

/// Every event `Event::validate` accepts fits a record, however its size is made up: the
/// worst case is an array of short floats (`0.5,` is 4 bytes of JSON and 9 in the file), which
/// at the JSON limit needed more than the 16 MiB records once allowed.
#[tokio::test]
async fn an_event_at_the_json_size_limit_made_of_floats_is_stored_and_read_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("floats.log");
    let base = Event::new("floats", "t", json!([]), 1).json_len();
    // `[0.5,...,0.5]`: 3 bytes for the first float and 4 for each further one.
    let count = (ksync_core::MAX_EVENT_JSON_BYTES - base + 1) / 4;
    let floats = Event::new("floats", "t", json!(vec![0.5; count]), 1);
    assert!(floats.json_len() > ksync_core::MAX_EVENT_JSON_BYTES - 4);
    floats
        .validate(&ksync_core::EventLimits::default())
        .expect("valid");
    {
        let storage = FileStorage::open(&path).expect("open");
        let stored = storage.append(vec![floats.clone()]).await.expect("append");
        assert_eq!(stored.last_seq(), Some(1));
    }
    let storage = FileStorage::open(&path).expect("reopen");
    let read = storage.get("floats", 1).expect("get").expect("stored");
    assert_eq!(read.event, floats);
}

/// Events larger than the replay's 1 MiB read chunk, between small ones, all come back after a
/// reopen, in order. (The reader handed chunks to its decoders by turn, and a turn that only
/// gathered part of a long record sent nothing: on a machine with two or more cores, every
/// event from such a record on was silently missing after a restart.)
#[tokio::test]
async fn events_larger_than_a_read_chunk_survive_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("large.log");
    let mut written = Vec::new();
    {
        let storage = FileStorage::open(&path).expect("open");
        // Large events of 1.5, 3 and 5 MiB, one of them at the start, with runs of small
        // events between them of both parities.
        let plan: [(usize, usize); 5] =
            [(3 << 20, 1), (0, 3), (3 << 19, 2), (5 << 20, 1000), (0, 1)];
        for (round, (large, small)) in plan.into_iter().enumerate() {
            if large > 0 {
                let event = Event::new(format!("large-{round}"), "t", json!("x".repeat(large)), 1);
                storage
                    .append(vec![event.clone()])
                    .await
                    .expect("append large");
                written.push(event);
            }
            let batch: Vec<Event> = (0..small as u64)
                .map(|n| ev(&format!("small-{round}-{n}"), n + 1))
                .collect();
            storage.append(batch.clone()).await.expect("append small");
            written.extend(batch);
        }
    }
    let storage = FileStorage::open(&path).expect("reopen");
    assert_eq!(storage.recovery().cut_tail, None);
    assert_eq!(storage.len(), written.len() as u64);
    let read = storage.read_since(0, written.len()).expect("read");
    let read: Vec<Event> = read.into_iter().map(|stored| stored.event).collect();
    assert!(
        read == written,
        "the reopened log differs from what was written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_out_of_range_are_refused_or_bounded_not_a_dead_writer() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A window past a day was taken, and the writer thread died at its first wait
    // (`Instant + window` overflowed): every append after it failed as `Closed`.
    let past_a_day = ksync_core::MAX_CONFIG_DURATION + std::time::Duration::from_secs(1);
    for window in [past_a_day, std::time::Duration::MAX] {
        let refused = FileStorage::builder(dir.path().join("w.log"))
            .group_commit_window(window)
            .open();
        match refused {
            Err(StorageError::Config(message)) => {
                assert!(message.contains("group_commit_window"), "{message}");
            }
            other => panic!("a {window:?} window: {other:?}"),
        }
    }
    // A queue larger than a semaphore can count (it panicked at open) is as large as one.
    let storage = Arc::new(
        FileStorage::builder(dir.path().join("q.log"))
            .queue_capacity(usize::MAX)
            .group_commit_window(std::time::Duration::from_millis(1))
            .open()
            .expect("open"),
    );
    let appends: Vec<_> = (0..16)
        .map(|n| {
            let storage = Arc::clone(&storage);
            tokio::spawn(async move { storage.append(vec![ev(&format!("q{n}"), 1)]).await })
        })
        .collect();
    for append in appends {
        append.await.expect("task").expect("append");
    }
    assert_eq!(storage.len(), 16);
}

/// A data directory names its layout (`LAYOUT`): a new one and one from before the marker
/// (layout 1) get it; one of a newer layout, or whose marker is damaged, is refused before
/// anything in it is opened, and left as it was.
#[tokio::test]
async fn a_data_directory_of_a_newer_layout_is_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let room = LogName::Room(Name::new("r").expect("name"));
    {
        let provider = FileProvider::new(dir.path()).expect("provider");
        provider
            .open(&room)
            .expect("open")
            .append(vec![ev("a", 1)])
            .await
            .expect("append");
        provider.flush_all().await.expect("flush");
    }
    let marker = dir.path().join("LAYOUT");
    assert_eq!(
        std::fs::read_to_string(&marker).expect("marker"),
        format!(
            "ksync data directory layout {}\n",
            ksync_storage_file::DATA_LAYOUT_VERSION
        )
    );

    // From before the marker: layout 1, named now, its logs read.
    std::fs::remove_file(&marker).expect("remove");
    {
        let provider = FileProvider::new(dir.path()).expect("provider");
        assert_eq!(provider.open(&room).expect("open").len(), 1);
    }
    assert!(marker.exists());

    for (written, expected) in [
        ("ksync data directory layout 2\n", "newer kSync"),
        ("ksync data directory layout two\n", "does not name"),
        ("", "does not name"),
    ] {
        std::fs::write(&marker, written).expect("write marker");
        match FileProvider::new(dir.path()) {
            Err(StorageError::Format(message)) => {
                assert!(message.contains(expected), "{written:?}: {message}");
                assert!(
                    message.contains(&dir.path().display().to_string()),
                    "{message}"
                );
            }
            Err(other) => panic!("{written:?}: {other}"),
            Ok(_) => panic!("{written:?}: opened"),
        }
        assert_eq!(std::fs::read_to_string(&marker).expect("marker"), written);
    }
}

/// Every room is a file and every repository a directory, kept until deleted by hand: past
/// `StoreLimits` a new one is refused (`TooManyLogs`) and nothing is created, while the
/// stored ones (also those from before the provider started) open and take events as
/// before, and a room deleted as empty frees its place.
#[tokio::test]
async fn provider_caps_the_rooms_and_repositories_it_creates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let room = |s: &str| LogName::Room(name(s));
    let branch = |repo: &str, branch: &str| LogName::Branch {
        repo: name(repo),
        branch: name(branch),
    };
    {
        let provider = FileProvider::new(dir.path()).expect("provider");
        provider.open(&room("a")).expect("open a");
        provider.open(&branch("r1", "main")).expect("open r1");
    }
    let provider = FileProvider::new(dir.path())
        .expect("provider")
        .with_limits(StoreLimits::new(2, 2));
    provider
        .open(&room("b"))
        .expect("the second room")
        .append(vec![ev("x", 1)])
        .await
        .expect("append");
    provider
        .open(&branch("r2", "main"))
        .expect("the second repository");
    match provider.open(&room("c")) {
        Err(StorageError::TooManyLogs {
            kind: LogKind::Rooms,
            max: 2,
        }) => {}
        other => panic!("a third room: {:?}", other.map(|_| ())),
    }
    match provider.open(&branch("r3", "main")) {
        Err(StorageError::TooManyLogs {
            kind: LogKind::Repos,
            max: 2,
        }) => {}
        other => panic!("a third repository: {:?}", other.map(|_| ())),
    }
    assert!(!dir.path().join("rooms").join("c.log").exists());
    assert!(!dir.path().join("repos").join("r3").exists());
    // What is stored stays usable: rooms, repositories and new branches of stored ones.
    provider
        .open(&room("a"))
        .expect("a stored room")
        .append(vec![ev("y", 1)])
        .await
        .expect("append");
    provider
        .open(&branch("r1", "feature"))
        .expect("a new branch of a stored repository");
    // A room deleted as empty (`a` was written to, so only an empty one would go) frees
    // its place.
    let empty = room("d");
    drop(provider);
    let provider = FileProvider::new(dir.path())
        .expect("provider")
        .with_limits(StoreLimits::new(3, 2));
    drop(provider.open(&empty).expect("the third room"));
    assert!(matches!(
        provider.open(&room("e")),
        Err(StorageError::TooManyLogs { .. })
    ));
    provider.release_discarding_empty(&empty);
    provider
        .open(&room("e"))
        .expect("the place of the deleted room");
}

/// A repository whose first log cannot be made (here: options every open refuses; in
/// production a full disk) leaves no directory behind: it would list no branch and count
/// toward `StoreLimits::max_repos` until removed by hand.
#[test]
fn a_repository_whose_first_log_failed_leaves_no_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut options = FileStorageOptions::default();
    options.group_commit_window = std::time::Duration::from_secs(2 * 86_400);
    let provider = FileProvider::with_options(dir.path(), options).expect("provider");
    let main = LogName::Branch {
        repo: name("r"),
        branch: name("main"),
    };
    assert!(matches!(provider.open(&main), Err(StorageError::Config(_))));
    assert!(!dir.path().join("repos").join("r").exists());
}

/// Data nested 128 levels, as the event rules allowed before `MAX_DATA_DEPTH` became 100
/// (an older build stored it), still reads back after a reopen: a file is never refused for
/// what it was allowed to hold.
#[tokio::test]
async fn data_as_deep_as_older_builds_stored_still_reads_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("old-deep.log");
    let mut data = json!(1);
    for _ in 0..128 {
        data = json!([data]);
    }
    let deep = Event::new("deep", "t", data, 1);
    {
        let storage = FileStorage::open(&path).expect("open");
        storage.append(vec![deep.clone()]).await.expect("append");
    }
    let storage = FileStorage::open(&path).expect("reopen");
    let read = storage.get("deep", 1).expect("get").expect("stored");
    assert_eq!(read.event, deep);
}
