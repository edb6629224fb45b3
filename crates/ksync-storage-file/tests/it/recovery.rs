//! Recovery: torn tails are cut and reported, damage in the middle is refused, foreign or
//! newer files are refused and left unchanged.

use std::fs;
use std::path::Path;

use ksync_core::{Event, Storage, StorageError};
use ksync_storage_file::format::{FORMAT_VERSION, HEADER_LEN};
use ksync_storage_file::{Durability, FileStorage};
use serde_json::json;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
}

fn event(i: usize) -> Event {
    Event::new(
        format!("ev-{i}"),
        "note",
        json!({"n": i, "text": "x".repeat(i % 7)}),
        1_700_000_000_000 + i as u64,
    )
}

/// Writes `n` events one append at a time; returns the file length after the header and
/// after each record (so `ends[k]` is where record k+1 ends).
fn write_log(path: &Path, n: usize) -> Vec<u64> {
    let rt = rt();
    let storage = FileStorage::builder(path)
        .durability(Durability::None)
        .open()
        .expect("open");
    let mut ends = vec![fs::metadata(path).expect("meta").len()];
    for i in 0..n {
        rt.block_on(storage.append(vec![event(i)])).expect("append");
        ends.push(fs::metadata(path).expect("meta").len());
    }
    ends
}

#[test]
fn truncation_at_every_offset_keeps_every_complete_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let full = dir.path().join("full.log");
    let ends = write_log(&full, 5);
    assert_eq!(ends[0], HEADER_LEN as u64);
    let bytes = fs::read(&full).expect("read");
    let rt = rt();
    for cut in HEADER_LEN..=bytes.len() {
        let path = dir.path().join(format!("cut-{cut}.log"));
        fs::write(&path, &bytes[..cut]).expect("write");
        let complete = ends.iter().filter(|&&e| e <= cut as u64).count() - 1;
        let last_good = ends[complete];
        let storage = FileStorage::open(&path)
            .unwrap_or_else(|e| panic!("reopen after cut at {cut} failed: {e}"));
        assert_eq!(storage.len(), complete as u64, "cut at {cut}");
        for (k, stored) in storage.read_since(0, 100).expect("read").iter().enumerate() {
            assert_eq!(stored.seq, k as u64 + 1);
            assert_eq!(stored.event, event(k));
        }
        let report = storage.recovery().clone();
        assert_eq!(report.events, complete as u64);
        assert_eq!(report.valid_len, last_good);
        if cut as u64 == last_good {
            assert_eq!(report.cut_tail, None, "cut at {cut} is a record boundary");
        } else {
            let tail = report.cut_tail.expect("torn tail reported");
            assert_eq!(tail.offset, last_good);
            assert_eq!(tail.bytes_cut, cut as u64 - last_good);
        }
        assert_eq!(fs::metadata(&path).expect("meta").len(), last_good);
        // The log goes on cleanly after the cut.
        let out = rt
            .block_on(storage.append(vec![event(99)]))
            .expect("append after recovery");
        assert_eq!(out.last_seq(), Some(complete as u64 + 1));
        drop(storage);
        let again = FileStorage::open(&path).expect("second reopen");
        assert_eq!(again.len(), complete as u64 + 1);
        assert_eq!(again.recovery().cut_tail, None);
        drop(again);
        fs::remove_file(&path).expect("rm");
    }
}

#[test]
fn damage_before_valid_records_is_refused_and_nothing_is_cut() {
    let dir = tempfile::tempdir().expect("tempdir");
    let full = dir.path().join("full.log");
    let ends = write_log(&full, 4);
    let bytes = fs::read(&full).expect("read");
    // Every byte of records 1..=3 (record 4 is the tail, whose damage is a torn tail).
    for pos in HEADER_LEN..ends[3] as usize {
        let damaged_record = ends.iter().filter(|&&e| e <= pos as u64).count() - 1;
        let record_start = ends[damaged_record];
        let path = dir.path().join(format!("bad-{pos}.log"));
        let mut bad = bytes.clone();
        bad[pos] ^= 0x5a;
        fs::write(&path, &bad).expect("write");
        match FileStorage::open(&path) {
            Err(StorageError::Corrupt { offset, reason }) => {
                assert_eq!(offset, record_start, "flip at {pos}: {reason}");
            }
            other => panic!("flip at {pos}: expected Corrupt, got {other:?}"),
        }
        assert_eq!(
            fs::read(&path).expect("read"),
            bad,
            "file changed (flip at {pos})"
        );
        fs::remove_file(&path).expect("rm");
    }
}

#[test]
fn damage_in_the_last_record_is_a_torn_tail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("log");
    let ends = write_log(&path, 3);
    let mut bytes = fs::read(&path).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&path, &bytes).expect("write");
    let storage = FileStorage::open(&path).expect("open");
    assert_eq!(storage.len(), 2);
    let tail = storage.recovery().cut_tail.clone().expect("tail");
    assert_eq!(tail.offset, ends[2]);
    assert_eq!(tail.bytes_cut, ends[3] - ends[2]);
}

/// A metadata removal (tombstone) written last and cut anywhere inside: the cut tail is
/// reported and dropped like any torn record, so the key is back as it was before the
/// removal (never half-removed, never a refused log); whole, the removal holds after reopen.
#[test]
fn a_torn_meta_removal_is_cut_like_any_torn_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let full = dir.path().join("full.log");
    let rt = rt();
    let (before_removal, end) = {
        let storage = FileStorage::builder(&full)
            .durability(Durability::None)
            .open()
            .expect("open");
        rt.block_on(storage.append(vec![event(0)])).expect("append");
        rt.block_on(storage.set_meta("cursor/p2p/gone", "7"))
            .expect("meta");
        rt.block_on(storage.set_meta("kept", "1")).expect("meta");
        let before_removal = fs::metadata(&full).expect("meta").len();
        rt.block_on(storage.remove_meta("cursor/p2p/gone"))
            .expect("remove");
        assert_eq!(storage.meta("cursor/p2p/gone").expect("meta"), None);
        (before_removal, fs::metadata(&full).expect("meta").len())
    };
    assert!(end > before_removal, "the removal is a record");
    let whole = FileStorage::open(&full).expect("reopen");
    assert_eq!(whole.meta("cursor/p2p/gone").expect("meta"), None);
    assert_eq!(whole.meta("kept").expect("meta").as_deref(), Some("1"));
    assert_eq!(whole.recovery().cut_tail, None);
    assert_eq!(whole.recovery().meta_records, 3);
    drop(whole);
    let bytes = fs::read(&full).expect("read");
    for cut in before_removal as usize..bytes.len() {
        let path = dir.path().join(format!("cut-{cut}.log"));
        fs::write(&path, &bytes[..cut]).expect("write");
        let storage = FileStorage::open(&path)
            .unwrap_or_else(|e| panic!("reopen after cut at {cut} failed: {e}"));
        let report = storage.recovery().clone();
        assert_eq!(report.valid_len, before_removal, "cut at {cut}");
        assert_eq!(report.meta_records, 2, "cut at {cut}");
        if cut as u64 == before_removal {
            assert_eq!(report.cut_tail, None);
        } else {
            let tail = report.cut_tail.expect("torn tail reported");
            assert_eq!(tail.offset, before_removal);
            assert_eq!(tail.bytes_cut, cut as u64 - before_removal);
        }
        assert_eq!(
            storage.meta("cursor/p2p/gone").expect("meta").as_deref(),
            Some("7"),
            "cut at {cut}: the torn removal did not happen"
        );
        assert_eq!(storage.len(), 1);
        assert_eq!(fs::metadata(&path).expect("meta").len(), before_removal);
        drop(storage);
        fs::remove_file(&path).expect("rm");
    }
    // Damaged with a valid record after it: refused, nothing cut (as for every record).
    let path = dir.path().join("damaged.log");
    fs::write(&path, &bytes).expect("write");
    {
        let storage = FileStorage::open(&path).expect("open");
        rt.block_on(storage.set_meta("after", "x")).expect("meta");
    }
    let mut bad = fs::read(&path).expect("read");
    assert!(bad.len() as u64 > end);
    bad[before_removal as usize + 12] ^= 0x20;
    fs::write(&path, &bad).expect("write");
    match FileStorage::open(&path) {
        Err(StorageError::Corrupt { offset, .. }) => assert_eq!(offset, before_removal),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(fs::read(&path).expect("read"), bad, "nothing cut");
}

fn assert_refused_unchanged(path: &Path, what: &str) {
    let before = fs::read(path).expect("read");
    match FileStorage::open(path) {
        Err(StorageError::Format(msg)) => assert!(!msg.is_empty()),
        other => panic!("{what}: expected a Format error, got {other:?}"),
    }
    assert_eq!(
        fs::read(path).expect("read"),
        before,
        "{what}: file changed"
    );
}

#[test]
fn foreign_and_newer_files_are_refused_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("x");

    fs::write(
        &path,
        br#"[{"id":"1","type":"t","data":{},"timestamp":1,"version":1}]"#,
    )
    .expect("write");
    assert_refused_unchanged(&path, "a JSON file");

    fs::write(&path, b"KSYNC").expect("write");
    assert_refused_unchanged(&path, "a short file");

    let mut newer = Vec::from(*b"KSYNCLOG");
    newer.extend_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    newer.extend_from_slice(&[0; 4]);
    newer.extend_from_slice(b"records of the future");
    fs::write(&path, &newer).expect("write");
    assert_refused_unchanged(&path, "a newer format version");

    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..50 {
        let len = 1 + (round * 37) % 3000;
        let random: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed >> 24) as u8
            })
            .collect();
        fs::write(&path, &random).expect("write");
        assert_refused_unchanged(&path, "random bytes");
    }
}

#[test]
fn random_records_after_a_good_header_never_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let template = dir.path().join("template");
    write_log(&template, 0);
    let header = fs::read(&template).expect("read");
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for round in 0..200 {
        let path = dir.path().join(format!("r{round}"));
        let mut bytes = header.clone();
        let len = (round * 13) % 500;
        bytes.extend((0..len).map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            // Small numbers make plausible lengths, which exercises the scanner.
            if seed.is_multiple_of(3) {
                0
            } else {
                (seed >> 40) as u8
            }
        }));
        fs::write(&path, &bytes).expect("write");
        match FileStorage::open(&path) {
            Ok(storage) => {
                assert_eq!(storage.len(), 0);
                assert_eq!(storage.recovery().valid_len, HEADER_LEN as u64);
            }
            Err(StorageError::Corrupt { .. }) => {
                assert_eq!(fs::read(&path).expect("read"), bytes);
            }
            Err(other) => panic!("unexpected error {other:?}"),
        }
    }
}

#[test]
fn empty_file_becomes_a_log_and_missing_dir_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("touched");
    fs::write(&path, b"").expect("touch");
    let storage = FileStorage::open(&path).expect("open empty");
    assert_eq!(storage.len(), 0);
    drop(storage);
    assert_eq!(fs::metadata(&path).expect("meta").len(), HEADER_LEN as u64);
    assert!(matches!(
        FileStorage::open(dir.path().join("no/such/dir/log")),
        Err(StorageError::Io { .. })
    ));
}

/// A log of several MiB (many replay chunks, and records bigger than a chunk) replays fully;
/// damage deep inside it is found at the right offset.
#[test]
fn large_logs_replay_across_chunks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("large.log");
    let rt = rt();
    let big_text = "b".repeat(3 << 20);
    let mut ends = Vec::new();
    {
        let storage = FileStorage::builder(&path)
            .durability(Durability::None)
            .open()
            .expect("open");
        for batch in 0..24u64 {
            let mut events: Vec<Event> = (0..1000)
                .map(|i| event((batch * 1000 + i) as usize))
                .collect();
            if batch % 8 == 3 {
                events.push(Event::new(
                    format!("big-{batch}"),
                    "big",
                    json!(big_text),
                    batch,
                ));
            }
            rt.block_on(storage.append(events)).expect("append");
            ends.push(fs::metadata(&path).expect("meta").len());
        }
    }
    let storage = FileStorage::open(&path).expect("reopen");
    assert_eq!(storage.len(), 24_000 + 3);
    assert_eq!(storage.recovery().cut_tail, None);
    assert_eq!(
        storage.get("ev-12345", 1).expect("get").map(|s| s.event),
        Some(event(12345))
    );
    let big = storage.get("big-11", 1).expect("get").expect("big present");
    assert_eq!(big.event.data, json!(big_text));
    let all = storage.read_since(0, usize::MAX).expect("read");
    assert!(all.iter().enumerate().all(|(i, s)| s.seq == i as u64 + 1));
    drop(storage);

    // Flip a byte of the first record of batch 18: in its length (seen by the reader stage)
    // and in its payload (seen by a decoder stage).
    let mut bytes = fs::read(&path).expect("read");
    let damaged = dir.path().join("damaged.log");
    for delta in [3usize, 20] {
        let target = ends[17] as usize + delta;
        bytes[target] ^= 0xff;
        fs::write(&damaged, &bytes).expect("write");
        match FileStorage::open(&damaged) {
            Err(StorageError::Corrupt { offset, .. }) => assert_eq!(offset, ends[17]),
            other => panic!("flip at +{delta}: expected Corrupt, got {other:?}"),
        }
        assert_eq!(fs::read(&damaged).expect("read"), bytes);
        bytes[target] ^= 0xff;
    }

    // Cut inside the last record: everything before it stays.
    bytes.truncate(bytes.len() - 7);
    fs::write(&damaged, &bytes).expect("write");
    let storage = FileStorage::open(&damaged).expect("open torn");
    assert_eq!(storage.len(), 24_000 + 3 - 1);
    assert_eq!(
        storage
            .recovery()
            .cut_tail
            .as_ref()
            .map(|t| t.bytes_cut > 0),
        Some(true)
    );
}

/// Damage followed by more than a scan window (two of the largest records) of bytes that
/// cannot start a record: the scan for a later valid record slides over it (it no longer
/// reads the whole tail at once) and still finds the records beyond, so the damage is
/// refused; with nothing valid beyond, it is a torn tail and cut.
#[test]
fn a_long_damaged_stretch_is_scanned_in_windows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("log");
    let ends = write_log(&path, 3);
    let bytes = fs::read(&path).expect("read");
    let garbage = vec![0xff_u8; 2 * (16 << 20) + (5 << 20) + 3];
    let at = usize::try_from(ends[1]).expect("offset");

    let mut refused = bytes[..at].to_vec();
    refused.extend_from_slice(&garbage);
    refused.extend_from_slice(&bytes[at..]);
    fs::write(&path, &refused).expect("write");
    match FileStorage::open(&path) {
        Err(StorageError::Corrupt { offset, .. }) => assert_eq!(offset, ends[1]),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(
        fs::read(&path).expect("read").len(),
        refused.len(),
        "left alone"
    );

    let mut torn = bytes[..at].to_vec();
    torn.extend_from_slice(&garbage);
    fs::write(&path, &torn).expect("write");
    let storage = FileStorage::open(&path).expect("open");
    assert_eq!(storage.len(), 1);
    let tail = storage.recovery().cut_tail.clone().expect("tail");
    assert_eq!(
        (tail.offset, tail.bytes_cut),
        (ends[1], garbage.len() as u64)
    );
}

/// Records longer than replay's 1 MiB read chunk, cut or damaged: a cut anywhere keeps every
/// complete record before it, and damage inside a long record followed by valid ones is
/// refused at that record's start, as for short records.
#[test]
fn long_records_cut_or_damaged_recover_like_short_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let full = dir.path().join("full.log");
    // A long record first and two in a row: each starts a read chunk of its own.
    let sizes = [5 << 19, 10, 1_200_000, 3 << 20, 10, 3 << 20];
    let events: Vec<Event> = sizes
        .iter()
        .enumerate()
        .map(|(i, &len)| Event::new(format!("ev-{i}"), "t", json!("x".repeat(len)), 1))
        .collect();
    let rt = rt();
    let mut ends = vec![HEADER_LEN as u64];
    {
        let storage = FileStorage::builder(&full)
            .durability(Durability::None)
            .open()
            .expect("open");
        for event in &events {
            rt.block_on(storage.append(vec![event.clone()]))
                .expect("append");
            ends.push(fs::metadata(&full).expect("meta").len());
        }
    }
    let bytes = fs::read(&full).expect("read");
    let path = dir.path().join("cut.log");
    // Around every record boundary, and inside each long record.
    let mut cuts: Vec<u64> = ends
        .iter()
        .flat_map(|&end| [end.saturating_sub(1), end, end + 1])
        .chain(ends.windows(2).map(|w| (w[0] + w[1]) / 2))
        .filter(|&cut| cut >= HEADER_LEN as u64 && cut <= bytes.len() as u64)
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    for cut in cuts {
        fs::write(&path, &bytes[..cut as usize]).expect("write");
        let complete = ends.iter().filter(|&&e| e <= cut).count() - 1;
        let storage = FileStorage::open(&path)
            .unwrap_or_else(|e| panic!("reopen after cut at {cut} failed: {e}"));
        assert_eq!(storage.len(), complete as u64, "cut at {cut}");
        let read = storage.read_since(0, 10).expect("read");
        assert!(
            read.iter().map(|s| &s.event).eq(&events[..complete]),
            "cut at {cut}"
        );
        assert_eq!(storage.recovery().valid_len, ends[complete], "cut at {cut}");
    }
    // A flip in the middle of each long record but the last: valid records follow it.
    for record in [0, 2, 3] {
        let pos = ((ends[record] + ends[record + 1]) / 2) as usize;
        let mut bad = bytes.clone();
        bad[pos] ^= 0x5a;
        fs::write(&path, &bad).expect("write");
        match FileStorage::open(&path) {
            Err(StorageError::Corrupt { offset, .. }) => assert_eq!(offset, ends[record]),
            other => panic!("flip in record {record}: expected Corrupt, got {other:?}"),
        }
        assert_eq!(fs::read(&path).expect("read"), bad, "the file was changed");
    }
}

/// CRC-32 (IEEE), bit by bit: the checksum records carry, computed here from the format's
/// description rather than with the crate's own code.
fn crc32(parts: &[&[u8]]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &byte in parts.iter().flat_map(|part| part.iter()) {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A record as the format frames it: `len u32 LE | crc32 u32 LE | kind u8 | payload`, the
/// checksum covering the length, the kind and the payload.
fn framed(kind: u8, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len())
        .expect("payload fits a u32")
        .to_le_bytes();
    let mut out = len.to_vec();
    out.extend_from_slice(&crc32(&[&len, &[kind], payload]).to_le_bytes());
    out.push(kind);
    out.extend_from_slice(payload);
    out
}

#[test]
fn a_whole_record_longer_than_this_build_reads_is_refused_not_cut() {
    use ksync_storage_file::format::MAX_RECORD_LEN;
    let dir = tempfile::tempdir().expect("tempdir");
    let template = dir.path().join("template.log");
    write_log(&template, 3);
    let good = fs::read(&template).expect("read");
    let long = vec![0x5au8; MAX_RECORD_LEN + 1];
    // A newer build with a larger limit wrote the last record, whole and well checksummed (an
    // event, or a kind this build does not know): refused, the file untouched.
    for kind in [1u8, 9] {
        let path = dir.path().join(format!("newer-{kind}.log"));
        let mut bytes = good.clone();
        bytes.extend_from_slice(&framed(kind, &long));
        fs::write(&path, &bytes).expect("write");
        match FileStorage::open(&path) {
            Err(StorageError::Format(msg)) => {
                assert!(msg.contains("newer"), "{msg}");
                assert!(
                    msg.contains(&good.len().to_string()),
                    "names the offset: {msg}"
                );
            }
            other => panic!("kind {kind}: expected a Format error, got {other:?}"),
        }
        assert!(
            fs::read(&path).expect("read") == bytes,
            "kind {kind}: file changed"
        );
    }
    // The same record torn (the file ends inside it) or with a bad checksum is a torn tail.
    let whole = framed(1, &long);
    let torn = whole[..whole.len() - 1].to_vec();
    let mut flipped = whole;
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    for (what, tail) in [("torn", &torn), ("bad checksum", &flipped)] {
        let path = dir.path().join("tail.log");
        let mut bytes = good.clone();
        bytes.extend_from_slice(tail);
        fs::write(&path, &bytes).expect("write");
        let storage = FileStorage::open(&path).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(storage.len(), 3, "{what}");
        assert_eq!(storage.recovery().valid_len, good.len() as u64, "{what}");
        drop(storage);
        assert_eq!(fs::read(&path).expect("read"), good, "{what}");
    }
}

#[test]
fn refusals_name_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("room-with-a-name.log");
    let mut newer = Vec::from(*b"KSYNCLOG");
    newer.extend_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    newer.extend_from_slice(&[0; 4]);
    fs::write(&path, &newer).expect("write");
    match FileStorage::open(&path) {
        Err(StorageError::Format(msg)) => {
            assert!(msg.contains("room-with-a-name.log"), "{msg}");
            assert!(
                msg.contains(&format!("version {}", FORMAT_VERSION + 1)),
                "{msg}"
            );
        }
        other => panic!("expected a Format error, got {other:?}"),
    }
    fs::remove_file(&path).expect("remove");
    write_log(&path, 2);
    let mut bytes = fs::read(&path).expect("read");
    bytes.extend_from_slice(&framed(9, b"a record kind from a newer build"));
    fs::write(&path, &bytes).expect("write");
    match FileStorage::open(&path) {
        Err(StorageError::Corrupt { reason, .. }) => {
            assert!(reason.contains("room-with-a-name.log"), "{reason}");
            assert!(reason.contains("kind 9"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(fs::read(&path).expect("read"), bytes, "file changed");
}

/// Damage in the last record this build reads, followed by a well-checksummed record of a kind
/// it does not know (a newer build's): not a torn tail, refused at the damage, nothing cut.
#[test]
fn damage_before_a_newer_kind_of_record_is_refused_not_cut() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("log");
    let ends = write_log(&path, 3);
    let mut bytes = fs::read(&path).expect("read");
    let last = usize::try_from(ends[3]).expect("offset") - 2;
    bytes[last] ^= 0x40;
    bytes.extend_from_slice(&framed(9, b"a record kind from a newer build"));
    fs::write(&path, &bytes).expect("write");
    match FileStorage::open(&path) {
        Err(StorageError::Corrupt { offset, reason }) => {
            assert_eq!(offset, ends[2], "{reason}");
            assert!(
                reason.contains(&ends[3].to_string()),
                "names what follows: {reason}"
            );
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(fs::read(&path).expect("read"), bytes, "nothing cut");
}
