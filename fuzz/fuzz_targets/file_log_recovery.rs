//! File-log recovery: any bytes after a valid header (and any bytes at all) either open, with
//! a report that is consistent with the file, or are refused with a typed error. Never a
//! panic, and a refused file is left untouched.
#![no_main]

use std::sync::OnceLock;

use ksync_core::Storage;
use ksync_storage_file::FileStorage;
use ksync_storage_file::format::{FORMAT_VERSION, HEADER_LEN, MAGIC};
use libfuzzer_sys::fuzz_target;

fn dir() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("tempdir"))
}

fuzz_target!(|data: &[u8]| {
    let path = dir().path().join("fuzz.log");
    // Half the inputs get a valid header, so recovery itself is reached.
    let mut bytes = Vec::with_capacity(HEADER_LEN + data.len());
    if data.first().is_some_and(|b| b & 1 == 0) {
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&[0; 4]);
        bytes.extend_from_slice(&data[1..]);
    } else {
        bytes.extend_from_slice(data);
    }
    std::fs::write(&path, &bytes).expect("write");
    match FileStorage::open(&path) {
        Ok(storage) => {
            let report = storage.recovery().clone();
            // An empty file becomes a log: it gains the header.
            assert!(report.valid_len <= bytes.len().max(HEADER_LEN) as u64);
            let all = storage.read_since(0, usize::MAX).expect("read");
            assert_eq!(all.len() as u64, storage.len());
            for (i, s) in all.iter().enumerate() {
                assert_eq!(s.seq, i as u64 + 1);
            }
        }
        Err(_) => {
            if !bytes.is_empty() {
                assert_eq!(
                    std::fs::read(&path).expect("read"),
                    bytes,
                    "a refused log was changed"
                );
            }
        }
    }
    let _ = std::fs::remove_file(&path);
});
