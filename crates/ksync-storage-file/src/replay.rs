//! Reopening a log: replay every record into a [`LogIndex`], and recover from a torn tail.
//!
//! Replay is a two-stage pipeline so a reopen of a million events stays well under a second:
//! a decoder thread reads the file in big chunks, checks framing and checksums and decodes
//! payloads; the calling thread inserts the decoded records into the index. The two halves cost
//! about the same, so on two cores the pipeline nearly halves the wall time.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::mpsc::{SyncSender, sync_channel};

use ksync_core::{LogIndex, StorageError};

use crate::format::{Frame, HEADER_LEN, Record, decode, parse_frame};

/// Bytes read from the file at a time during replay.
const READ_CHUNK: usize = 8 << 20;
/// Records per batch handed from the decoder thread to the indexing thread.
const BATCH: usize = 4096;
/// Batches in flight between the two replay threads. The channel is bounded: the decoder waits
/// when the indexer is behind, which caps replay memory at a few batches.
const BATCHES_IN_FLIGHT: usize = 4;

/// What reopening a log found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecoveryReport {
    /// Events replayed.
    pub events: u64,
    /// Metadata records replayed (several may set the same key; the latest wins).
    pub meta_records: u64,
    /// Length of the log after recovery, in bytes (header included).
    pub valid_len: u64,
    /// The torn or damaged tail that was cut off, if any.
    pub cut_tail: Option<TailCut>,
}

/// A tail cut off during recovery: the final record was incomplete or damaged and no valid
/// record followed it (the signature of a write interrupted by a crash).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TailCut {
    /// Byte offset where the bad record started; the file now ends here.
    pub offset: u64,
    /// How many bytes were removed.
    pub bytes_cut: u64,
    /// What was wrong with the first bad record.
    pub reason: String,
}

/// The result of replaying a log file.
#[derive(Debug)]
pub(crate) struct Replayed {
    pub(crate) log: LogIndex,
    pub(crate) meta: HashMap<String, String>,
    pub(crate) report: RecoveryReport,
}

/// How the decoder thread stopped.
enum DecodeEnd {
    /// Every byte up to the end was a good record.
    Clean,
    /// The record at `offset` is incomplete or fails its checksum.
    Bad { offset: u64, reason: &'static str },
    /// The indexing side hung up (it found an error of its own).
    Stopped,
}

type Batch = Vec<(u64, Record)>;

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StorageError {
    let context = context.into();
    move |source| StorageError::Io { context, source }
}

/// Replays `path`, whose header was already checked and which is `file_len` bytes long.
/// Does not change the file; the caller cuts the tail if [`RecoveryReport::cut_tail`] says so.
pub(crate) fn replay(path: &Path, file_len: u64) -> Result<Replayed, StorageError> {
    let file = File::open(path).map_err(io_err(format!("opening {}", path.display())))?;
    let (tx, rx) = sync_channel::<Batch>(BATCHES_IN_FLIGHT);
    let mut log = LogIndex::new();
    let mut meta = HashMap::new();
    let mut meta_records = 0u64;
    let (indexed, decoded) = std::thread::scope(|scope| {
        let decoder = scope.spawn(move || decode_file(file, HEADER_LEN as u64, file_len, tx));
        let mut indexed: Result<(), StorageError> = Ok(());
        'batches: for batch in rx.iter() {
            for (offset, record) in batch {
                match record {
                    Record::Event(event) => {
                        if !log.push(event) {
                            indexed = Err(StorageError::Corrupt {
                                offset,
                                reason: "the same (id, version) is stored twice".into(),
                            });
                            break 'batches;
                        }
                    }
                    Record::Meta(key, value) => {
                        meta_records += 1;
                        meta.insert(key, value);
                    }
                }
            }
        }
        // Dropping the receiver makes a still-running decoder stop at its next send.
        drop(rx);
        let decoded = decoder
            .join()
            .unwrap_or_else(|_| Err(StorageError::Codec("log decoder thread panicked".into())));
        (indexed, decoded)
    });
    indexed?;
    let mut report = RecoveryReport {
        events: log.len(),
        meta_records,
        valid_len: file_len,
        cut_tail: None,
    };
    match decoded? {
        DecodeEnd::Clean => {}
        DecodeEnd::Stopped => {
            return Err(StorageError::Codec(
                "log decoder stopped before the end".into(),
            ));
        }
        DecodeEnd::Bad { offset, reason } => {
            if let Some(next) = next_valid_record(path, offset, file_len)? {
                return Err(StorageError::Corrupt {
                    offset,
                    reason: format!(
                        "{reason}, but a valid record follows at offset {next}; refusing to drop it"
                    ),
                });
            }
            report.valid_len = offset;
            report.cut_tail = Some(TailCut {
                offset,
                bytes_cut: file_len - offset,
                reason: reason.into(),
            });
        }
    }
    Ok(Replayed { log, meta, report })
}

/// The decoder half of [`replay`]: reads `[start, end)` of `file`, sends decoded records.
fn decode_file(
    mut file: File,
    start: u64,
    end: u64,
    tx: SyncSender<Batch>,
) -> Result<DecodeEnd, StorageError> {
    file.seek(SeekFrom::Start(start))
        .map_err(io_err("seeking the log"))?;
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    // File offset of buf[0], and the next offset to read.
    let mut buf_offset = start;
    let mut read_offset = start;
    let mut batch: Batch = Vec::with_capacity(BATCH);
    loop {
        let mut pos = 0usize;
        let need = loop {
            match parse_frame(&buf[pos..]) {
                Frame::Good {
                    kind,
                    payload,
                    total,
                } => {
                    let offset = buf_offset + pos as u64;
                    // A good checksum rules out a torn write: an undecodable payload is damage
                    // (or another writer), never something to cut silently.
                    let record = decode(kind, payload)
                        .map_err(|reason| StorageError::Corrupt { offset, reason })?;
                    batch.push((offset, record));
                    pos += total;
                    if batch.len() >= BATCH {
                        let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
                        if tx.send(full).is_err() {
                            return Ok(DecodeEnd::Stopped);
                        }
                    }
                }
                Frame::Incomplete { need } => break need,
                Frame::Bad(reason) => {
                    if tx.send(batch).is_err() {
                        return Ok(DecodeEnd::Stopped);
                    }
                    return Ok(DecodeEnd::Bad {
                        offset: buf_offset + pos as u64,
                        reason,
                    });
                }
            }
        };
        if read_offset >= end {
            if tx.send(batch).is_err() {
                return Ok(DecodeEnd::Stopped);
            }
            if pos < buf.len() {
                return Ok(DecodeEnd::Bad {
                    offset: buf_offset + pos as u64,
                    reason: "incomplete record at the end of the file",
                });
            }
            return Ok(DecodeEnd::Clean);
        }
        buf.drain(..pos);
        buf_offset += pos as u64;
        let want = READ_CHUNK.max(need).saturating_sub(buf.len()) as u64;
        let take = want.min(end - read_offset);
        let got = (&mut file)
            .take(take)
            .read_to_end(&mut buf)
            .map_err(io_err("reading the log"))?;
        if got == 0 {
            // The file shrank under us: treat what is left as the end.
            read_offset = end;
        } else {
            read_offset += got as u64;
        }
    }
}

/// The offset of the first valid, decodable record that starts after `bad` (exclusive).
fn next_valid_record(path: &Path, bad: u64, end: u64) -> Result<Option<u64>, StorageError> {
    let mut file = File::open(path).map_err(io_err("reopening the log to scan its tail"))?;
    let from = bad + 1;
    if from >= end {
        return Ok(None);
    }
    file.seek(SeekFrom::Start(from))
        .map_err(io_err("seeking the log tail"))?;
    let mut rest = Vec::new();
    file.take(end - from)
        .read_to_end(&mut rest)
        .map_err(io_err("reading the log tail"))?;
    for i in 0..rest.len() {
        if let Frame::Good { kind, payload, .. } = parse_frame(&rest[i..])
            && decode(kind, payload).is_ok()
        {
            return Ok(Some(from + i as u64));
        }
    }
    Ok(None)
}
