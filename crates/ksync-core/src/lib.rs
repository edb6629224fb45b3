//! kSync core: the event model, the merge and conflict rules, the storage and sync-client
//! traits, middleware, notifications and the [`KSync`] orchestrator.
//!
//! This crate does no network or file IO and never reads the clock by itself (time comes in
//! through [`Clock`]); transports (`ksync-ws`, `ksync-git`, `ksync-p2p`) move bytes and call
//! into it.

mod access;
mod auth;
mod backoff;
mod client;
mod clients;
mod clock;
mod conflict;
mod debug_log;
mod error;
mod event;
mod ksync;
mod log;
mod metrics;
mod middleware;
mod names;
mod notify;
pub mod received_json;
mod replica;
mod storage;

pub use access::{
    AUTH_REALM, Access, AllowAll, AuthError, Authenticator, Credentials, Grant, ResourceKind,
};
pub use auth::Auth;
pub use backoff::backoff_delay;
pub use client::{PullPushClient, PullResult, PushResult, SyncClient, SyncResult};
pub use clients::{ClientId, ClientPlace, PerClientCounts};
pub use clock::{Clock, MAX_CONFIG_DURATION, ManualClock, SystemClock, check_config_duration};
pub use conflict::{Conflict, ConflictKind, ConflictResolver, Resolution, lww_cmp, resolve};
pub use error::SyncError;
pub use event::{
    Event, EventLimits, InvalidEvent, MAX_DATA_DEPTH, MAX_EVENT_INTEGER, MAX_EVENT_JSON_BYTES,
    MAX_RECEIVED_DATA_DEPTH, MAX_WRAPPING_DEPTH, RevisionKey,
};
pub use ksync::{AutoSync, KSync, KSyncBuilder};
pub use log::{
    AppendOutcome, EncodedEvent, EncodedKey, EventCodec, IdHasher, KeyFn, LogIndex, MergeOutcome,
    MergePlan, MergeSummary, Stored,
};
pub use metrics::{MeterTotals, MetricsMeter};
pub use middleware::{Direction, Filter, Middleware, MiddlewareError, Pipeline};
pub use names::{InMemoryProvider, LogName, MAX_NAME_LEN, Name, NameError, StorageProvider};
pub use notify::{
    Handler, HandlerId, Metrics, Notification, NotificationKind, NotificationStream, Notifier,
    STREAM_CAPACITY, STREAM_CAPACITY_BYTES, Status, StreamError, Subscription,
};
pub use replica::{Forwarded, Ingested, REVISION_ATTEMPTS, Replica};
pub use storage::{BoxFuture, InMemoryStorage, LogKind, Storage, StorageError};

/// `tracing`, for [`debug_log!`]'s expansion in other crates.
#[doc(hidden)]
pub use tracing as __tracing;

/// Version of kSync's wire protocols (WebSocket messages, HTTP bodies, P2P messages). Peers
/// announce it; a peer with another major version is refused with a clear error.
pub const PROTOCOL_VERSION: u32 = 1;
