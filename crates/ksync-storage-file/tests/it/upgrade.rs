//! Data an older kSync wrote, read by this one. `tests/fixtures/4aa2aa3/data` is a `ksync serve`
//! data directory written by the build of commit 4aa2aa3, from before the data directory named
//! its layout (`LAYOUT`); `expected.json` beside it is what that build served from it. The
//! fixture's README says how it was made and how to make it again. Each test works on a copy:
//! the fixture itself is never opened for writing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ksync_core::{Event, LogName, Name, Storage, StorageProvider, Stored};
use ksync_storage_file::FileProvider;
use serde_json::Value;

/// The fixture directory.
fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/4aa2aa3")
}

/// Every file under `dir` with its bytes, by path relative to `dir`.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).expect("read dir") {
            let entry = entry.expect("entry");
            if entry.file_type().expect("file type").is_dir() {
                walk(root, &entry.path(), out);
            } else {
                let relative = entry
                    .path()
                    .strip_prefix(root)
                    .expect("under root")
                    .to_owned();
                out.insert(relative, std::fs::read(entry.path()).expect("read file"));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// A log of the fixture: its name, the log id its owner (relay or Git service) keeps in its
/// metadata, and the events the old build served from it, in seq order.
struct ExpectedLog {
    name: LogName,
    log_id: String,
    events: Vec<Event>,
}

fn name(s: &str) -> Name {
    Name::new(s).expect("fixture name")
}

/// `expected.json`: rooms as the relay's catch-up from 0 served them (`seq`, `event`), branches
/// as a Git pull from 0 did (a page of events).
fn expected() -> Vec<ExpectedLog> {
    let raw = std::fs::read(fixture().join("expected.json")).expect("expected.json");
    let expected: Value = serde_json::from_slice(&raw).expect("expected.json is JSON");
    let mut logs = Vec::new();
    for (room, served) in expected["rooms"].as_object().expect("rooms") {
        let mut events = Vec::new();
        for (i, stored) in served["events"]
            .as_array()
            .expect("events")
            .iter()
            .enumerate()
        {
            assert_eq!(
                stored["seq"],
                i as u64 + 1,
                "the fixture's catch-up is gap-free"
            );
            events.push(serde_json::from_value(stored["event"].clone()).expect("an event"));
        }
        logs.push(ExpectedLog {
            name: LogName::Room(name(room)),
            log_id: served["logId"].as_str().expect("logId").to_owned(),
            events,
        });
    }
    for (branch, page) in expected["branches"].as_object().expect("branches") {
        assert!(page["next"].is_null(), "one page holds the whole branch");
        logs.push(ExpectedLog {
            name: LogName::Branch {
                repo: name("proj"),
                branch: name(branch),
            },
            log_id: page["logId"].as_str().expect("logId").to_owned(),
            events: serde_json::from_value(page["events"].clone()).expect("events"),
        });
    }
    logs
}

/// The log id the log's owner keeps: the relay's `relay.log-id`, or the Git service's branch
/// record (`git.branch`, JSON with `logId`).
fn stored_log_id(name: &LogName, storage: &dyn Storage) -> Option<String> {
    match name {
        LogName::Room(_) => storage.meta("relay.log-id").expect("meta"),
        LogName::Branch { .. } => {
            let record = storage.meta("git.branch").expect("meta")?;
            let record: Value = serde_json::from_str(&record).expect("branch record JSON");
            record["logId"].as_str().map(str::to_owned)
        }
    }
}

/// The whole point of an upgrade: this build opens an older build's data directory (one
/// without a `LAYOUT`, which is layout 1 and gets the marker), finds every log where it was,
/// and reads back exactly the events and log ids the older build served, rewriting none of
/// its files (so the older build can still open them: a downgrade).
#[tokio::test]
async fn a_data_directory_from_before_the_layout_marker_reads_as_it_was_written() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    ksync_testkit::copy_dir(&fixture().join("data"), &dir);
    assert!(
        !dir.join("LAYOUT").exists(),
        "the fixture predates the marker"
    );
    let before = files(&dir);
    let expected = expected();

    for round in ["first open", "second open"] {
        let provider = FileProvider::new(&dir).unwrap_or_else(|e| panic!("{round}: {e}"));
        assert_eq!(
            std::fs::read_to_string(dir.join("LAYOUT")).expect("LAYOUT written"),
            "ksync data directory layout 1\n",
            "{round}"
        );
        let mut names: Vec<LogName> = expected.iter().map(|log| log.name.clone()).collect();
        names.sort();
        assert_eq!(provider.list().expect("list"), names, "{round}");
        for log in &expected {
            let storage = provider.open(&log.name).expect("open");
            let stored = storage.read_since(0, usize::MAX).expect("read");
            let want: Vec<Stored> = log
                .events
                .iter()
                .enumerate()
                .map(|(i, event)| Stored {
                    seq: i as u64 + 1,
                    event: event.clone(),
                })
                .collect();
            assert_eq!(stored, want, "{round}: {:?}", log.name);
            assert_eq!(storage.len(), want.len() as u64, "{round}: {:?}", log.name);
            // Each event is found by its revision too (the index the old build's records
            // are keyed into), as a duplicate check does.
            for stored in &want {
                let found = storage.get(&stored.event.id, stored.event.version);
                assert_eq!(found.expect("get").as_ref(), Some(stored), "{round}");
            }
            assert_eq!(
                stored_log_id(&log.name, storage.as_ref()).as_deref(),
                Some(log.log_id.as_str()),
                "{round}: {:?}",
                log.name
            );
        }
        provider.flush_all().await.expect("flush");
    }

    // Reading wrote nothing into the old build's files: only the marker (and the lock) are new.
    let mut after = files(&dir);
    assert_eq!(
        after.remove(Path::new("LAYOUT")).as_deref(),
        Some(&b"ksync data directory layout 1\n"[..])
    );
    assert_eq!(after.remove(Path::new(".lock")).as_deref(), Some(&b""[..]));
    assert_eq!(after, before);
}

/// A directory a newer build laid out is refused as one (`StorageError::Format`, naming its
/// layout) before anything in it is probed, created or locked, whatever else it holds: a newer
/// layout need keep no `rooms/` or `repos/` directory, and may keep files under those names
/// (which also stop builds from before the marker, which never read it: they refuse a data
/// directory where a directory must be). This build said such a directory was not writable,
/// naming `rooms`, and wrote its lock file and probe files into it first.
#[test]
fn a_newer_layout_is_refused_as_one_before_anything_is_written() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    std::fs::write(dir.join("LAYOUT"), "ksync data directory layout 2\n").expect("marker");
    std::fs::write(dir.join("rooms"), "layout 2 keeps its logs elsewhere\n").expect("file");
    std::fs::create_dir_all(dir.join("logs/chat")).expect("a newer layout's directory");
    let before = files(dir);

    match FileProvider::new(dir) {
        Err(ksync_core::StorageError::Format(message)) => assert!(
            message.contains("has layout 2") && message.contains("newer kSync"),
            "{message}"
        ),
        other => panic!("expected the newer layout refused as one, got {other:?}"),
    }
    assert_eq!(
        files(dir),
        before,
        "nothing written into the newer directory"
    );
}
