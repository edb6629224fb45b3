//! Ready middlewares for kSync clients: plug them into any client's `use(incoming | outgoing, ..)`
//! (a [`Pipeline`](ksync_core::Pipeline)) or into [`Pipeline::use_middleware`](ksync_core::Pipeline::use_middleware) directly.
//!
//! | middleware | what it does |
//! |---|---|
//! | [`Filter`] (from core) | predicate filters and the built-in `public-only` |
//! | [`TypeFilter`] | keeps or drops events by `type` (allow list or deny list) |
//! | [`Encrypt`] / [`Decrypt`] | authenticated encryption of `data` with ChaCha20-Poly1305 ([`FieldCipher`]) |
//! | [`Redact`] | replaces or removes named fields of `data` (`password`, `card.number`) |
//! | [`RateLimit`] | a token bucket with an explicit clock; drops or fails events over the rate |
//! | [`Tap`] | logs each event with `tracing` and keeps counters the app can read |
//!
//! Every middleware is cheap to clone and clones share state (the tap's counters, the rate
//! limiter's bucket), so one instance can be registered and still be read from the app.
//!
//! Failures are this crate's [`Error`], turned into
//! [`MiddlewareError::Failed`](ksync_core::MiddlewareError::Failed) (with the middleware's name
//! and the error's message) at the [`Middleware`](ksync_core::Middleware) boundary; the typed
//! error is available from the direct methods such as [`FieldCipher::decrypt_event`].
//!
//! ```
//! use ksync_core::{Direction, Event, Pipeline};
//! use ksync_middleware::{Decrypt, Encrypt, FieldCipher, Redact, Tap};
//! use serde_json::json;
//!
//! let cipher = FieldCipher::from_key([7; 32]);
//! let tap = Tap::new("outgoing");
//!
//! let sender = Pipeline::new();
//! sender.use_middleware(Direction::Outgoing, Redact::fields(["password"])?);
//! sender.use_middleware(Direction::Outgoing, Encrypt::new(cipher.clone()).only_types(["user_data"]));
//! sender.use_middleware(Direction::Outgoing, tap.clone());
//!
//! let receiver = Pipeline::new();
//! receiver.use_middleware(Direction::Incoming, Decrypt::new(cipher).only_types(["user_data"]));
//!
//! let event = Event::new("1", "user_data", json!({"name": "Ann", "password": "hunter2"}), 1);
//! let on_the_wire = sender.run(Direction::Outgoing, event)?.expect("kept");
//! assert_eq!(on_the_wire.data["enc"], "chacha20poly1305");
//! let received = receiver.run(Direction::Incoming, on_the_wire)?.expect("kept");
//! assert_eq!(received.data, json!({"name": "Ann", "password": "[redacted]"}));
//! assert_eq!(tap.stats().events, 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod encrypt;
mod error;
mod filter;
mod rate_limit;
mod redact;
mod tap;
mod types;

pub use encrypt::{
    CIPHER_NAME, Decrypt, Encrypt, FieldCipher, KdfParams, MAX_KDF_MEMORY_KIB, NonceMode,
};
pub use error::Error;
pub use filter::{Filter, TypeFilter};
pub use rate_limit::{Overflow, RateLimit, TokenBucket};
pub use redact::{REDACTED, Redact};
pub use tap::{MAX_TRACKED_TYPES, Tap, TapStats};
