//! The crate's error type.

use std::time::Duration;

use ksync_core::MiddlewareError;

/// What went wrong in one of this crate's middlewares.
///
/// At the [`Middleware`](ksync_core::Middleware) boundary it becomes
/// [`MiddlewareError::Failed`] carrying the middleware's name and this error's message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Authentication of an encrypted `data` failed: the key is wrong, or the ciphertext, the
    /// nonce or the event's `id`/`version`/`type` were changed after encryption.
    #[error("decryption failed: wrong key, or the encrypted data or its event was tampered with")]
    Decrypt,
    /// Encryption failed (the plaintext is beyond what the cipher can take).
    #[error("encryption failed")]
    Encrypt,
    /// An event whose type is meant to be encrypted arrived with plain `data`.
    #[error("event {id:?} of type {event_type:?} should carry encrypted data but does not")]
    NotEncrypted {
        /// The event id.
        id: String,
        /// The event type.
        event_type: String,
    },
    /// The encrypted envelope is not `{"enc","nonce","ct"}` with base64 strings of the right size.
    #[error("malformed encrypted data: {0}")]
    Malformed(String),
    /// The envelope names a cipher this crate does not implement.
    #[error("unsupported cipher {0:?} (supported: \"chacha20poly1305\")")]
    UnsupportedCipher(String),
    /// The decrypted bytes are not JSON (only possible with a forged envelope under our key).
    #[error("decrypted data is not JSON")]
    Json(#[source] serde_json::Error),
    /// A raw key must be exactly 32 bytes.
    #[error("a ChaCha20-Poly1305 key is 32 bytes, got {0}")]
    KeyLength(usize),
    /// Deriving a key from a passphrase failed (empty passphrase, salt shorter than 8 bytes,
    /// bad or oversized parameters).
    #[error("passphrase key derivation failed: {0}")]
    Kdf(String),
    /// A redaction path is empty or has an empty segment (`a..b`).
    #[error("invalid field path {0:?}: use dot-separated non-empty names like \"card.number\"")]
    InvalidPath(String),
    /// A rate limit needs a burst of at least 1 and a non-zero refill interval.
    #[error("invalid rate limit: burst {burst}, one token every {refill_every:?}")]
    InvalidRate {
        /// Tokens the bucket holds when full.
        burst: u64,
        /// Time to earn one token.
        refill_every: Duration,
    },
    /// The rate limiter is out of tokens (policy [`Overflow::Error`](crate::Overflow::Error)).
    #[error("rate limit exceeded (burst {burst}, one event every {refill_every:?})")]
    RateLimited {
        /// Tokens the bucket holds when full.
        burst: u64,
        /// Time to earn one token.
        refill_every: Duration,
    },
}

impl Error {
    /// The core middleware error for this failure in the middleware called `name`.
    pub fn into_middleware_error(self, name: &str) -> MiddlewareError {
        MiddlewareError::Failed {
            name: name.to_owned(),
            reason: self.to_string(),
        }
    }
}
