//! gzip for request and response bodies, with a bound on what a decompressed body may grow to.

// Decoding (`gunzip`, `accepts_gzip`) serves only the repository service; a client-only build
// (`ksync` with `git` but not `server`) compiles it without using it.
#![cfg_attr(not(feature = "server"), allow(dead_code))]

use std::io::{Read, Write};

use flate2::Compression;
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;

/// Why a gzip body could not be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum GunzipError {
    /// The decompressed body is larger than the limit (a "zip bomb" or just too much).
    #[error("decompressed body exceeds {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// Not valid gzip.
    #[error("invalid gzip body: {0}")]
    Corrupt(#[source] std::io::Error),
}

/// Compresses `bytes`. The fast level: on the links this runs over, CPU is the bottleneck
/// long before bandwidth.
pub(crate) fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(
        Vec::with_capacity(bytes.len() / 4 + 64),
        Compression::fast(),
    );
    // Writing into a Vec cannot fail.
    let _ = encoder.write_all(bytes);
    encoder.finish().unwrap_or_default()
}

/// Decompresses `bytes`, refusing to produce more than `limit` bytes.
///
/// Every byte must belong to a gzip member: several members are one body (RFC 1952), and
/// anything else after the first member is corruption, not something to ignore (a single
/// member decoder stops at the first trailer and would accept whatever follows).
pub(crate) fn gunzip(bytes: &[u8], limit: usize) -> Result<Vec<u8>, GunzipError> {
    let mut out = Vec::with_capacity(bytes.len().saturating_mul(4).min(limit));
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    MultiGzDecoder::new(bytes)
        .take(cap)
        .read_to_end(&mut out)
        .map_err(GunzipError::Corrupt)?;
    if out.len() > limit {
        return Err(GunzipError::TooLarge { limit });
    }
    Ok(out)
}

/// Whether an `Accept-Encoding` value admits gzip (`gzip` or `*`, not with `q=0`).
pub(crate) fn accepts_gzip(accept_encoding: &str) -> bool {
    accept_encoding.split(',').any(|part| {
        let mut it = part.split(';');
        let coding = it.next().unwrap_or("").trim();
        let refused = it.any(|p| {
            let p = p.trim();
            p == "q=0" || p == "q=0.0" || p == "q=0.00" || p == "q=0.000"
        });
        (coding.eq_ignore_ascii_case("gzip") || coding == "*") && !refused
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_limit() {
        let data = b"hello hello hello hello".repeat(100);
        let packed = gzip(&data);
        assert!(packed.len() < data.len());
        assert_eq!(gunzip(&packed, data.len()).expect("fits"), data);
        assert!(matches!(
            gunzip(&packed, data.len() - 1),
            Err(GunzipError::TooLarge { .. })
        ));
        assert!(matches!(
            gunzip(b"not gzip", 100),
            Err(GunzipError::Corrupt(_))
        ));
        // Two members are one body; bytes after a member that start no member are refused.
        let mut two = gzip(b"hello ");
        two.extend_from_slice(&gzip(b"world"));
        assert_eq!(gunzip(&two, 100).expect("two members"), b"hello world");
        let mut trailing = gzip(b"hello");
        trailing.extend_from_slice(b"garbage!");
        assert!(matches!(
            gunzip(&trailing, 100),
            Err(GunzipError::Corrupt(_))
        ));
    }

    #[test]
    fn accept_encoding_parsing() {
        assert!(accepts_gzip("gzip"));
        assert!(accepts_gzip("br, gzip;q=0.5"));
        assert!(accepts_gzip("*"));
        assert!(!accepts_gzip("gzip;q=0"));
        assert!(!accepts_gzip("identity"));
        assert!(!accepts_gzip(""));
    }
}
