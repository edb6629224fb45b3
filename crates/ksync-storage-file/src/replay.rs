//! Reopening a log: replay every record into a [`LogIndex`], and recover from a torn tail.
//!
//! Replay is a pipeline: a reader thread reads the file in 1 MiB chunks and cuts them at
//! record boundaries (lengths only); decoder threads (one per core, at most 4) check
//! checksums and check that every record decodes, in parallel; the calling thread takes the
//! checked chunks back in file order and indexes them. Events are not decoded: the index keeps
//! each as a range of its chunk ([`ksync_core::EncodedEvent`]) and decodes it into each
//! read's copy, so a reopen allocates a few bytes per event instead of the whole event (a
//! million decoded events take over a gigabyte, and faulting that memory in cost more than
//! decoding), and reading the log does not bring that memory back.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use ksync_core::{EncodedEvent, EncodedKey, IdHasher, LogIndex, StorageError};

use crate::format::{
    CODEC, CheckedRecord, Frame, HEADER_LEN, MAX_RECORD_LEN, RECORD_HEADER_LEN, RecordKind, check,
    parse_frame,
};
use crate::storage::io_err;

/// Bytes the reader reads at a time (and about the size of one chunk of records).
const CHUNK: usize = 1 << 20;
/// Chunks queued per decoder, in and out. Every replay channel is bounded (senders wait),
/// which caps replay memory at a few MiB of raw chunks plus their decoded records.
const CHUNKS_IN_FLIGHT: usize = 2;
/// Most decoder threads.
const MAX_DECODERS: usize = 4;
/// Smallest plausible record on disk, used to size the index up front from the file length.
const TYPICAL_MIN_RECORD: u64 = 128;
/// Most events reserved for up front from the file's length: a sparse or hostile file claiming
/// terabytes must not make opening it allocate (or abort) for slots it will never fill. Past
/// this the index grows as records are read.
const MAX_RESERVED_EVENTS: u64 = 1 << 21;

/// What reopening a log found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecoveryReport {
    /// Events replayed.
    pub events: u64,
    /// Metadata records replayed, removals included (several may set or remove the same key;
    /// the latest wins).
    pub meta_records: u64,
    /// Length of the log after recovery, in bytes (header included).
    pub valid_len: u64,
    /// The torn or damaged tail that was cut off, if any.
    pub cut_tail: Option<TailCut>,
    /// The compaction this open did, if any (see
    /// [`FileStorageOptions::compaction_min_bytes`](crate::FileStorageOptions::compaction_min_bytes)).
    /// When there is one, `valid_len` is the compacted length.
    pub compacted: Option<Compaction>,
}

/// A compaction at open: the log was rewritten without its superseded metadata records.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Compaction {
    /// Length of the log before, in bytes (after any torn tail was cut).
    pub bytes_before: u64,
    /// Length of the compacted log, in bytes.
    pub bytes_after: u64,
    /// Metadata records left out: values overwritten later, removed keys, and removals.
    pub records_dropped: u64,
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
    /// Where the live metadata records are, for compaction.
    pub(crate) meta_layout: MetaLayout,
    pub(crate) report: RecoveryReport,
}

/// The metadata records of a replayed log, as compaction needs them.
#[derive(Debug, Default)]
pub(crate) struct MetaLayout {
    /// Bytes of every metadata record (sets and removals, headers included).
    pub(crate) total_bytes: u64,
    /// For each live key, the file offset and length of the record that set it last.
    pub(crate) live: HashMap<String, (u64, u64)>,
}

impl MetaLayout {
    /// Bytes of the metadata records that no longer matter: overwritten, removed, removals.
    pub(crate) fn superseded_bytes(&self) -> u64 {
        let live: u64 = self.live.values().map(|&(_, len)| len).sum();
        self.total_bytes.saturating_sub(live)
    }
}

/// Where and why replay stopped before the end of the file.
#[derive(Debug)]
enum Stop {
    /// The record at `offset` is incomplete or fails its checksum: maybe a torn tail.
    Bad { offset: u64, reason: &'static str },
    /// Damage that is never a torn tail (a well-checksummed record that does not decode).
    Fatal(StorageError),
}

/// Raw bytes holding whole records, `base` being the file offset of `bytes[0]`.
struct Chunk {
    bytes: Vec<u8>,
    base: u64,
}

/// A checked chunk: its bytes, its records in order (file offset, and for an event the range
/// of its payload in `bytes`), and where checking stopped early, if it did.
struct Decoded {
    bytes: Arc<Vec<u8>>,
    records: Vec<(u64, Checked)>,
    stop: Option<Stop>,
}

/// A checked record of a chunk.
enum Checked {
    /// An event whose payload is `bytes[start..end]` of its chunk, and its key in the log.
    Event {
        start: usize,
        end: usize,
        key: EncodedKey,
    },
    /// A metadata entry, and the length of its record.
    Meta(String, String, u64),
    /// A metadata removal, and the length of its record.
    MetaRemove(String, u64),
}

/// Replays `path`, whose header was already checked and which is `file_len` bytes long.
/// Does not change the file; the caller cuts the tail if [`RecoveryReport::cut_tail`] says so.
pub(crate) fn replay(path: &Path, file_len: u64) -> Result<Replayed, StorageError> {
    let file = File::open(path).map_err(io_err(format!("opening {}", path.display())))?;
    // At least two, even on one core: the pipeline is the same on every machine (a second
    // decoder costs a thread), so the tests exercise the hand-over between decoders wherever
    // they run.
    let decoders = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(2, MAX_DECODERS);
    let mut log = LogIndex::with_codec(CODEC);
    let estimate = file_len.saturating_sub(HEADER_LEN as u64) / TYPICAL_MIN_RECORD;
    log.reserve(usize::try_from(estimate.min(MAX_RESERVED_EVENTS)).unwrap_or(0));
    let mut meta = HashMap::new();
    let mut meta_records = 0u64;
    let mut meta_layout = MetaLayout::default();

    let (index_stop, reader_result) = std::thread::scope(|scope| {
        let mut inputs = Vec::with_capacity(decoders);
        let mut outputs: Vec<Receiver<Decoded>> = Vec::with_capacity(decoders);
        for _ in 0..decoders {
            let (in_tx, in_rx) = sync_channel::<Chunk>(CHUNKS_IN_FLIGHT);
            let (out_tx, out_rx) = sync_channel::<Decoded>(CHUNKS_IN_FLIGHT);
            // Decoders key the records too, so the index thread (the pipeline's bottleneck)
            // neither parses nor hashes an event it has not seen before.
            let hasher = log.id_hasher();
            // Not `scope.spawn`, which panics when the process has no thread to give (a
            // thread or memory limit reached by many open logs): the open fails with an error
            // instead. Returning drops the inputs, so the decoders started end.
            let spawned = std::thread::Builder::new()
                .name("ksync-log-decode".into())
                .spawn_scoped(scope, move || decode_chunks(in_rx, out_tx, &hasher));
            if let Err(e) = spawned {
                return (Some(Stop::Fatal(spawn_failed(e))), Ok(None));
            }
            inputs.push(in_tx);
            outputs.push(out_rx);
        }
        let reader = match std::thread::Builder::new()
            .name("ksync-log-read".into())
            .spawn_scoped(scope, move || {
                read_chunks(file, HEADER_LEN as u64, file_len, inputs)
            }) {
            Ok(reader) => reader,
            Err(e) => return (Some(Stop::Fatal(spawn_failed(e))), Ok(None)),
        };

        // Take the chunks back in file order: chunk i went to decoder i % decoders.
        let mut stop = None;
        'chunks: for turn in 0usize.. {
            let Ok(decoded) = outputs[turn % decoders].recv() else {
                break;
            };
            for (offset, record) in decoded.records {
                match record {
                    Checked::Event { start, end, key } => {
                        let pushed = EncodedEvent::new(Arc::clone(&decoded.bytes), start..end)
                            .is_some_and(|encoded| log.push_encoded_keyed(encoded, key, None));
                        if !pushed {
                            // The record was checked, so its key reads: a repeat.
                            stop = Some(Stop::Fatal(StorageError::Corrupt {
                                offset,
                                reason: "the same (id, version) is stored twice".into(),
                            }));
                            break 'chunks;
                        }
                    }
                    Checked::Meta(key, value, len) => {
                        meta_records += 1;
                        meta_layout.total_bytes += len;
                        meta_layout.live.insert(key.clone(), (offset, len));
                        meta.insert(key, value);
                    }
                    Checked::MetaRemove(key, len) => {
                        meta_records += 1;
                        meta_layout.total_bytes += len;
                        meta_layout.live.remove(&key);
                        meta.remove(&key);
                    }
                }
            }
            if decoded.stop.is_some() {
                stop = decoded.stop;
                break;
            }
        }
        // Hanging up makes the decoders, then the reader, stop at their next send.
        drop(outputs);
        let reader_result = reader
            .join()
            .unwrap_or_else(|_| Err(StorageError::Codec("log reader thread panicked".into())));
        (stop, reader_result)
    });

    // The first problem in file order wins: the index side only saw records before the
    // reader's stop, so its own stop (if any) comes first.
    let stop = match index_stop {
        Some(stop) => Some(stop),
        None => reader_result?,
    };
    let mut report = RecoveryReport {
        events: log.len(),
        meta_records,
        valid_len: file_len,
        cut_tail: None,
        compacted: None,
    };
    match stop {
        None => {}
        Some(Stop::Fatal(e)) => return Err(e),
        Some(Stop::Bad { offset, reason }) => {
            refuse_whole_oversized_record(path, offset, file_len)?;
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
    Ok(Replayed {
        log,
        meta,
        meta_layout,
        report,
    })
}

fn spawn_failed(e: std::io::Error) -> StorageError {
    io_err("spawning a log replay thread")(e)
}

/// The reader stage: reads `[start, end)` of `file` and hands out chunks of whole records
/// round-robin. Returns where the records stop making sense by their lengths, if they do.
fn read_chunks(
    mut file: File,
    start: u64,
    end: u64,
    decoders: Vec<SyncSender<Chunk>>,
) -> Result<Option<Stop>, StorageError> {
    file.seek(SeekFrom::Start(start))
        .map_err(io_err("seeking the log"))?;
    let mut carry: Vec<u8> = Vec::new();
    let mut base = start;
    let mut read_offset = start;
    let mut need = RECORD_HEADER_LEN;
    let mut sent = 0usize;
    loop {
        let mut bytes = Vec::with_capacity(CHUNK.max(need) + RECORD_HEADER_LEN);
        bytes.append(&mut carry);
        // Fill to at least one chunk, or to the end of the file.
        while bytes.len() < CHUNK.max(need) && read_offset < end {
            let want = (CHUNK.max(need) - bytes.len()) as u64;
            let got = (&mut file)
                .take(want.min(end - read_offset))
                .read_to_end(&mut bytes)
                .map_err(io_err("reading the log"))?;
            if got == 0 {
                // The file shrank under us: what is left is the end.
                read_offset = end;
            }
            read_offset += got as u64;
        }
        // Cut at the last whole record, by lengths only (decoders check the checksums).
        let mut pos = 0usize;
        let mut stop = None;
        loop {
            let rest = &bytes[pos..];
            if rest.len() < RECORD_HEADER_LEN {
                need = RECORD_HEADER_LEN;
                break;
            }
            let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            if len > MAX_RECORD_LEN {
                stop = Some(Stop::Bad {
                    offset: base + pos as u64,
                    reason: "record length out of range",
                });
                break;
            }
            let total = RECORD_HEADER_LEN + len;
            if rest.len() < total {
                need = total;
                break;
            }
            pos += total;
        }
        let at_end = read_offset >= end;
        if stop.is_none() && at_end && pos < bytes.len() {
            stop = Some(Stop::Bad {
                offset: base + pos as u64,
                reason: "incomplete record at the end of the file",
            });
        }
        carry = bytes.split_off(pos);
        if !bytes.is_empty() {
            let chunk = Chunk { bytes, base };
            // Numbered by chunks sent, not by turns: a turn that only gathers part of a record
            // longer than a chunk sends nothing, and the index side takes chunk i from decoder
            // i % decoders (counting turns, everything after such a record went unread).
            if decoders[sent % decoders.len()].send(chunk).is_err() {
                return Ok(None); // the index side stopped first and has its reason
            }
            sent += 1;
        }
        base += pos as u64;
        if stop.is_some() || at_end {
            return Ok(stop);
        }
    }
}

/// A decoder stage: checks and decodes the chunks it is given, in order.
fn decode_chunks(chunks: Receiver<Chunk>, decoded: SyncSender<Decoded>, hasher: &IdHasher) {
    for chunk in chunks {
        let mut records = Vec::with_capacity(chunk.bytes.len() / TYPICAL_MIN_RECORD as usize);
        let mut pos = 0usize;
        let mut stop = None;
        while pos < chunk.bytes.len() {
            let offset = chunk.base + pos as u64;
            match parse_frame(&chunk.bytes[pos..]) {
                Frame::Good {
                    kind,
                    payload,
                    total,
                } => match check(kind, payload) {
                    Ok(record) => {
                        let record = match record {
                            CheckedRecord::Event(id, version) => Checked::Event {
                                start: pos + RECORD_HEADER_LEN,
                                end: pos + total,
                                key: hasher.key(id, version),
                            },
                            CheckedRecord::Meta(key, value) => {
                                Checked::Meta(key, value, total as u64)
                            }
                            CheckedRecord::MetaRemove(key) => {
                                Checked::MetaRemove(key, total as u64)
                            }
                        };
                        records.push((offset, record));
                        pos += total;
                    }
                    Err(reason) => {
                        // A good checksum rules out a torn write: this is damage (or another
                        // writer), never something to cut silently.
                        stop = Some(Stop::Fatal(StorageError::Corrupt { offset, reason }));
                        break;
                    }
                },
                Frame::Bad(reason) => {
                    stop = Some(Stop::Bad { offset, reason });
                    break;
                }
                // The reader cut at whole records, so this is a length the reader read
                // differently: treat it like any other bad record.
                Frame::Incomplete => {
                    stop = Some(Stop::Bad {
                        offset,
                        reason: "incomplete record",
                    });
                    break;
                }
            }
        }
        let done = stop.is_some();
        let bytes = Arc::new(chunk.bytes);
        if decoded
            .send(Decoded {
                bytes,
                records,
                stop,
            })
            .is_err()
            || done
        {
            return;
        }
    }
}

/// Refuses the record at `offset` if its length is past [`MAX_RECORD_LEN`] yet the file holds
/// all of it and its checksum is good: a newer kSync with a larger limit wrote it (a torn or
/// damaged length almost never checksums), and cutting it as a torn tail would destroy that
/// version's data. Otherwise (a length in range, a record the file does not hold whole, a bad
/// checksum) it returns `Ok` and the usual tail rules apply.
fn refuse_whole_oversized_record(path: &Path, offset: u64, end: u64) -> Result<(), StorageError> {
    let mut file = File::open(path).map_err(io_err("reopening the log to check a long record"))?;
    file.seek(SeekFrom::Start(offset))
        .map_err(io_err("seeking a long record"))?;
    let mut head = [0u8; RECORD_HEADER_LEN];
    if offset + RECORD_HEADER_LEN as u64 > end {
        return Ok(());
    }
    file.read_exact(&mut head)
        .map_err(io_err("reading a long record's header"))?;
    let len_bytes = [head[0], head[1], head[2], head[3]];
    let len = u64::from(u32::from_le_bytes(len_bytes));
    if len <= MAX_RECORD_LEN as u64 || offset + RECORD_HEADER_LEN as u64 + len > end {
        return Ok(());
    }
    // Hashed as it is read: the record may be up to 4 GiB.
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&len_bytes);
    hasher.update(&head[8..9]);
    let mut payload = (&mut file).take(len);
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = payload
            .read(&mut buf)
            .map_err(io_err("reading a long record"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    if payload.limit() > 0 {
        return Ok(()); // the file shrank under us: not a whole record
    }
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if hasher.finalize() != crc {
        return Ok(());
    }
    Err(StorageError::Format(format!(
        "the record at byte offset {offset} is {len} bytes, longer than this build reads \
         ({MAX_RECORD_LEN}), and its checksum is good: a newer kSync wrote it; refusing to cut it"
    )))
}

/// The longest a record can be on disk, header included.
const MAX_FRAME_LEN: usize = RECORD_HEADER_LEN + MAX_RECORD_LEN;

/// Bytes [`next_valid_record`] holds at once: a record starting anywhere in the first half fits
/// whole, so the scan never needs more than this, however long the damaged tail.
const SCAN_WINDOW: usize = 2 * MAX_FRAME_LEN;

/// The offset of the first valid record that starts after `bad` (exclusive): well checksummed,
/// and decodable if of a kind this build knows.
///
/// Reads the tail through a sliding window of [`SCAN_WINDOW`] bytes (reading it whole made
/// a log damaged early allocate its whole size), and computes a checksum only where the
/// length could start a record.
fn next_valid_record(path: &Path, bad: u64, end: u64) -> Result<Option<u64>, StorageError> {
    let mut file = File::open(path).map_err(io_err("reopening the log to scan its tail"))?;
    let from = bad + 1;
    if from >= end {
        return Ok(None);
    }
    file.seek(SeekFrom::Start(from))
        .map_err(io_err("seeking the log tail"))?;
    let mut tail = file.take(end - from);
    let mut window: Vec<u8> = Vec::new();
    // The file offset of `window[0]`.
    let mut window_at = from;
    loop {
        let wanted = SCAN_WINDOW - window.len();
        let read = (&mut tail)
            .take(wanted as u64)
            .read_to_end(&mut window)
            .map_err(io_err("reading the log tail"))?;
        let at_end = read < wanted;
        // Every start whose longest possible record is in the window (all of them at the end).
        let starts = if at_end {
            window.len()
        } else {
            window.len() - MAX_FRAME_LEN
        };
        for i in 0..starts {
            if could_start_record(&window[i..])
                && let Frame::Good { kind, payload, .. } = parse_frame(&window[i..])
                // A well-checksummed record of a kind this build does not know is a newer
                // build's: as much proof that the damage is no torn tail as one it reads
                // (cutting it would destroy that build's data).
                && (RecordKind::from_byte(kind).is_none() || check(kind, payload).is_ok())
            {
                return Ok(Some(window_at + i as u64));
            }
        }
        if at_end {
            return Ok(None);
        }
        window.drain(..starts);
        window_at += starts as u64;
    }
}

/// Whether `buf` could start a record: a length in range (cheap; the checksum decides). Any
/// kind: one this build does not know may be a newer build's record.
fn could_start_record(buf: &[u8]) -> bool {
    match buf {
        [l0, l1, l2, l3, _, _, _, _, _, ..] => {
            u32::from_le_bytes([*l0, *l1, *l2, *l3]) as usize <= MAX_RECORD_LEN
        }
        _ => false,
    }
}
