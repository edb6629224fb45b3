//! Compaction at open: rewriting a log without its superseded metadata records.
//!
//! Metadata is rewritten often (cursors, P2P cursor slots, Git branch records) and every
//! `set_meta` / `remove_meta` appends a record, so a long-lived log grows with that churn.
//! Compaction runs while a log is opened, after replay and before its writer thread starts,
//! so nothing else writes the file meanwhile. It copies the header, every event record and
//! the latest record of each live key, as the raw bytes they are on disk and in file order
//! (the n-th event record stays event n), into `<log>.compact`, syncs it, renames it over the
//! log and syncs the directory. A crash before the rename leaves the log intact (the stale
//! `.compact` is deleted at the next open); after it, the compacted log is complete.
//!
//! The in-memory index from replay stays valid: it keeps events as copies of their bytes
//! and metadata as values, never file offsets.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use ksync_core::StorageError;

use crate::format::{Frame, HEADER_LEN, MAX_RECORD_LEN, RECORD_HEADER_LEN, RecordKind};
use crate::replay::{Compaction, Replayed};
use crate::storage::{io_err, sync_dir};

/// Buffer size of the copy, each way.
const COPY_BUFFER: usize = 1 << 20;

/// Where a log is compacted before it is renamed over the log: `<log>.compact`. (Not a
/// `.log` name, so a provider never lists it as a log.)
pub(crate) fn compact_path(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".compact");
    PathBuf::from(name)
}

/// Deletes a `.compact` left by a crash before its rename (the log is intact then). Called
/// with the log locked, so it is nobody's compaction in progress. Best effort: a file that
/// stays is truncated by the next compaction anyway.
pub(crate) fn remove_stale(log: &Path) {
    let stale = compact_path(log);
    match fs::remove_file(&stale) {
        Ok(()) => {
            tracing::info!(path = %stale.display(), "removed an unfinished compaction");
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %stale.display(), error = %e, "removing an unfinished compaction failed");
        }
    }
}

/// Whether a log of `valid_len` bytes whose metadata is `replayed`'s is worth compacting:
/// superseded metadata takes at least `min_bytes` and at least half the file.
pub(crate) fn worth_it(replayed: &Replayed, valid_len: u64, min_bytes: Option<u64>) -> bool {
    let Some(min_bytes) = min_bytes else {
        return false;
    };
    let superseded = replayed.meta_layout.superseded_bytes();
    superseded >= min_bytes && superseded >= valid_len / 2
}

/// Compacts the log at `log` (`old` being it, open and locked, `valid_len` bytes of records
/// all checked by replay). Returns the compacted log, open and locked, and what was done;
/// `None` when it did not: the log is a symbolic link, or compacting failed before the
/// rename (the log is untouched and still the one to use: worth a warning, not a refusal
/// to open). An error means the rename
/// happened but the directory could not be synced: appends to the new file could then be
/// lost to a crash that brings the old name back, so the log must not be used.
pub(crate) fn compact(
    log: &Path,
    old: &File,
    valid_len: u64,
    replayed: &Replayed,
) -> Result<Option<(File, Compaction)>, StorageError> {
    // Renaming over a symbolic link would replace the link, not the log it points to.
    if fs::symlink_metadata(log).is_ok_and(|m| m.file_type().is_symlink()) {
        tracing::info!(log = %log.display(), "not compacting a log opened through a symbolic link");
        return Ok(None);
    }
    let tmp = compact_path(log);
    let written = write_compacted(&tmp, old, valid_len, replayed).and_then(|(file, c)| {
        fs::rename(&tmp, log)
            .map_err(io_err(format!("renaming {} over the log", tmp.display())))?;
        Ok((file, c))
    });
    let (file, compaction) = match written {
        Ok(done) => done,
        Err(e) => {
            tracing::warn!(log = %log.display(), error = %e, "compacting the log failed; keeping it as it is");
            remove_stale(log);
            return Ok(None);
        }
    };
    let dir = match log.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    sync_dir(dir)?;
    tracing::info!(
        log = %log.display(),
        bytes_before = compaction.bytes_before,
        bytes_after = compaction.bytes_after,
        records_dropped = compaction.records_dropped,
        "compacted the log's superseded metadata"
    );
    Ok(Some((file, compaction)))
}

/// Writes the compacted log to `tmp` and syncs it; returns it open and locked.
fn write_compacted(
    tmp: &Path,
    old: &File,
    valid_len: u64,
    replayed: &Replayed,
) -> Result<(File, Compaction), StorageError> {
    let context = |what: &str| format!("{what} {}", tmp.display());
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(tmp)
        .map_err(io_err(context("creating")))?;
    // The log's mode (an operator's 0600 stays 0600 once the copy is the log).
    let mode = old
        .metadata()
        .map_err(io_err("reading the log's permissions"))?
        .permissions();
    file.set_permissions(mode)
        .map_err(io_err(context("setting the permissions of")))?;
    // Locked before it becomes the log, so it is never the log unlocked.
    file.try_lock().map_err(|e| StorageError::Io {
        context: context("locking"),
        source: io::Error::from(e),
    })?;

    // The live records' offsets in file order: the copy meets them in that order.
    let mut live: Vec<u64> = replayed
        .meta_layout
        .live
        .values()
        .map(|&(offset, _)| offset)
        .collect();
    live.sort_unstable();
    let mut live = live.into_iter().peekable();

    // A handle of its own (same open file, so the same locked inode) for buffered reading.
    let mut source = old
        .try_clone()
        .map_err(io_err("cloning the log's handle"))?;
    source
        .seek(SeekFrom::Start(0))
        .map_err(io_err("seeking the log"))?;
    let mut reader = BufReader::with_capacity(COPY_BUFFER, source.take(valid_len));
    let mut writer = BufWriter::with_capacity(COPY_BUFFER, &file);

    let mut header = [0u8; HEADER_LEN];
    reader
        .read_exact(&mut header)
        .map_err(io_err("reading the log header"))?;
    writer
        .write_all(&header)
        .map_err(io_err(context("writing")))?;
    let mut bytes_after = HEADER_LEN as u64;
    let mut events = 0u64;
    let mut dropped = 0u64;
    let mut offset = HEADER_LEN as u64;
    let mut record = Vec::new();
    while offset < valid_len {
        // Replay checked every record moments ago with the file locked; finding anything
        // else now (another writer ignoring the lock, failing storage) stops compaction.
        let changed = |reason: &str| StorageError::Corrupt {
            offset,
            reason: format!("{reason} while compacting (the log changed since replay)"),
        };
        record.resize(RECORD_HEADER_LEN, 0);
        reader
            .read_exact(&mut record)
            .map_err(io_err("reading the log"))?;
        let len = u32::from_le_bytes([record[0], record[1], record[2], record[3]]) as usize;
        if len > MAX_RECORD_LEN {
            return Err(changed("record length out of range"));
        }
        record.resize(RECORD_HEADER_LEN + len, 0);
        reader
            .read_exact(&mut record[RECORD_HEADER_LEN..])
            .map_err(io_err("reading the log"))?;
        let kind = match crate::format::parse_frame(&record) {
            Frame::Good { kind, .. } => RecordKind::from_byte(kind),
            Frame::Bad(reason) => return Err(changed(reason)),
            Frame::Incomplete => return Err(changed("incomplete record")),
        };
        let keep = match kind {
            Some(RecordKind::Event) => {
                events += 1;
                true
            }
            Some(RecordKind::Meta | RecordKind::MetaRemove) => {
                let is_live = live.next_if_eq(&offset).is_some();
                if !is_live {
                    dropped += 1;
                }
                is_live
            }
            None => return Err(changed("unknown record kind")),
        };
        if keep {
            writer
                .write_all(&record)
                .map_err(io_err(context("writing")))?;
            bytes_after += record.len() as u64;
        }
        offset += record.len() as u64;
    }
    if offset != valid_len || events != replayed.report.events || live.peek().is_some() {
        return Err(StorageError::Corrupt {
            offset,
            reason: "the log's records differ from what replay found".into(),
        });
    }
    writer.flush().map_err(io_err(context("writing")))?;
    drop(writer);
    file.sync_all().map_err(io_err(context("syncing")))?;
    Ok((
        file,
        Compaction {
            bytes_before: valid_len,
            bytes_after,
            records_dropped: dropped,
        },
    ))
}
