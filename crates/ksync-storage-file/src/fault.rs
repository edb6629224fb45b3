//! A seam for reliability tests: make the writer's `write` or `fdatasync` fail on demand.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

/// An injected write failure: `written` bytes of the buffer reach the file (a torn write),
/// then the write fails with `error`.
#[derive(Debug)]
pub struct WriteFault {
    /// Bytes written before the failure (clamped to the buffer length).
    pub written: usize,
    /// The error the write reports, e.g. `io::Error::from_raw_os_error(28)` (ENOSPC).
    pub error: io::Error,
}

/// Hooks called by a [`FileStorage`](crate::FileStorage) writer thread before each write and
/// each sync. Production code passes none; tests use it to simulate EIO, ENOSPC or torn writes.
///
/// Whatever a hook makes fail, the appends of that group return an error and none of their
/// events is acknowledged or becomes visible. After a failed write the writer cuts the file
/// back to its last durable length and carries on; after a failed sync it stops (a failed
/// `fsync` leaves the page cache in an unknown state) and later calls get
/// [`StorageError::Closed`](ksync_core::StorageError::Closed) until the log is reopened (it
/// cuts the file back to the end of its last acknowledged group and unlocks it, so a reopen
/// finds exactly what was acknowledged; see
/// [`FileStorage::is_closed`](crate::FileStorage::is_closed)).
pub trait FaultHook: Send + Sync + 'static {
    /// Called before writing a group of `len` bytes.
    fn before_write(&self, len: usize) -> Result<(), WriteFault> {
        let _ = len;
        Ok(())
    }

    /// Called before each `fdatasync`.
    fn before_sync(&self) -> io::Result<()> {
        Ok(())
    }
}

impl fmt::Debug for dyn FaultHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FaultHook")
    }
}

/// A [`FaultHook`] that fails the next `fdatasync` with EIO once [`arm`](Self::arm)ed, as a
/// disk does on a transient error; every other write and sync goes through.
#[derive(Debug, Default)]
pub struct FailNextSync(AtomicBool);

impl FailNextSync {
    /// Makes the next sync fail (once).
    pub fn arm(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl FaultHook for FailNextSync {
    fn before_sync(&self) -> io::Result<()> {
        if self.0.swap(false, Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(5)); // EIO
        }
        Ok(())
    }
}
