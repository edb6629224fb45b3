//! kSync file storage: [`FileStorage`], an append-only, checksummed event log in one file, and
//! [`FileProvider`], one such log per room or branch under a data directory.
//!
//! - Appends go through a writer thread that writes, syncs (see [`Durability`]; group commit by
//!   default) and only then makes the events visible; an append that returned `Ok` is on disk.
//! - Reopening replays the log. A torn tail (a crash mid-write) is cut off at the last good
//!   record and reported in [`RecoveryReport`]; damage before valid records is refused with
//!   `StorageError::Corrupt`; a file that is not a kSync log, or of a newer format, is refused
//!   with `StorageError::Format` and left untouched.
//! - Reopening also compacts a log whose superseded metadata records (overwritten or removed
//!   keys) take much of it: see [`FileStorageOptions::compaction_min_bytes`].
//!
//! The format is described in [`mod@format`].

mod compact;
mod fault;
pub mod format;
mod provider;
mod replay;
mod storage;
mod value;

pub use fault::{FailNextSync, FaultHook, WriteFault};
pub use provider::{
    DATA_LAYOUT_VERSION, DEFAULT_MAX_REPOS, DEFAULT_MAX_ROOMS, FileProvider, StoreLimits,
};
pub use replay::{Compaction, RecoveryReport, TailCut};
pub use storage::{
    DEFAULT_COMPACTION_MIN_BYTES, DEFAULT_GROUP_COMMIT_WINDOW, DEFAULT_QUEUE_CAPACITY,
    DEFAULT_SYNCS_IN_FLIGHT, Durability, FileStorage, FileStorageBuilder, FileStorageOptions,
    write_file_durably,
};
