//! `GitSyncClient`: offline-first pull/push sync with a repository service over HTTP.

use std::fmt;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use ksync_core::{
    Auth, BoxFuture, Conflict, ConflictResolver, Direction, Event, EventLimits, Filter, Ingested,
    MeterTotals, Metrics, MetricsMeter, Middleware, Name, Notification, NotificationKind, Notifier,
    Pipeline, PullPushClient, PullResult, PushResult, Replica, Resolution, Status, SyncClient,
    SyncError, debug_log, resolve,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::GitError;
use crate::gzip::gzip;
use crate::upload::{self, Upload};
use crate::wire::{
    BranchInfo, CreateBranchRequest, DEFAULT_BRANCH, DEFAULT_BUSY_ATTEMPTS,
    DEFAULT_MAX_RESPONSE_BYTES, DEFAULT_PAGE, DEFAULT_PUSH_BATCH, DEFAULT_PUSH_BATCH_BYTES,
    ErrorBody, MAX_BUSY_WAIT, MAX_BUSY_WAIT_TOTAL, MergeRequest, MergeResponse, PROTOCOL_HEADER,
    PullResponse, PushResponse, RepoInfo, from_json, write_event,
};

/// Replica metadata: the checked-out branch.
const HEAD_META: &str = "git.head";
/// Replica metadata: which branch each range of the local log belongs to (see [`Segments`]).
const SEGMENTS_META: &str = "git.segments";
/// Local events examined per storage read while looking for pending events.
const SCAN_PAGE: usize = 4096;
/// Most events a pull reserves room for up front.
const RESERVE_MAX: usize = 1 << 18;
/// Request bodies at least this large are gzip-compressed when compression is on.
const COMPRESS_MIN_BYTES: usize = 1024;
/// Wait when a busy answer gives no usable `Retry-After` (as the service's own `busy` asks).
const DEFAULT_BUSY_WAIT: Duration = Duration::from_secs(1);
/// Most collisions one `merge` call settles (and returns); past it the call ends with
/// [`GitError::MergeUnfinished`], and the next `merge` goes on where it stopped.
pub const MERGE_MAX_CONFLICTS: usize = 100_000;

/// Reports transfer progress: how many events of a pull or push are done, of how many (an
/// estimate for pushes). Called on the task doing the transfer; keep it quick.
pub type ProgressFn = Arc<dyn Fn(Progress) + Send + Sync>;

/// One progress report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Pull or push.
    pub phase: Phase,
    /// Events transferred so far in this operation.
    pub done: u64,
    /// Events expected in this operation (for pushes an upper bound).
    pub total: u64,
}

/// What is being transferred.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Receiving (pull, clone).
    Pull,
    /// Sending (push, merge resolutions).
    Push,
}

/// What [`GitSyncClient::merge`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MergeResult {
    /// Events of `from` appended to `into` on the server.
    pub appended: u64,
    /// Events `into` already held.
    pub duplicates: u64,
    /// Collisions: `ours` is `into`'s revision, `theirs` is `from`'s.
    pub conflicts: Vec<Conflict>,
    /// The revisions written (here, then pushed to `into`) to settle the conflicts.
    pub resolutions: Vec<Event>,
    /// `into`'s version after the merge and the resolutions.
    pub server_version: u64,
}

/// What one merge works with (see `GitSyncClient::merge_branches`).
struct MergeKeys {
    /// The branch merged into.
    into: Name,
    /// The checked-out branch, whose segment resumes after the resolutions.
    head: String,
    /// The replica metadata key that says resolutions are owed to `into`.
    owed: String,
    /// The replica metadata key of the id of the merge page being asked for.
    merge_id: String,
}

/// Where this client stands locally (no network): see [`GitSyncClient::local_status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalStatus {
    /// The checked-out branch.
    pub branch: String,
    /// The branch version pulled up to.
    pub pulled_version: u64,
    /// Local events of this branch not yet acknowledged by the server.
    pub pending_events: u64,
    /// Events in the local log (all branches).
    pub local_events: u64,
}

/// Builds a [`GitSyncClient`]; defaults are the spec's.
#[derive(Debug, Clone)]
pub struct GitSyncClientBuilder {
    url: String,
    auth: Option<Auth>,
    branch: Option<String>,
    pull_interval: Duration,
    compression: bool,
    connect_timeout: Duration,
    request_timeout: Duration,
    page_size: usize,
    push_batch: usize,
    push_batch_bytes: usize,
    create_repo_if_missing: bool,
    max_response_bytes: usize,
    busy_attempts: u32,
    debug: bool,
    filter: Option<Filter>,
    /// PEM root certificates trusted for `https://` besides the system's.
    tls_roots_pem: Vec<Vec<u8>>,
}

impl GitSyncClientBuilder {
    /// The spec's `filter`: which events are pushed and which pulled ones are taken in
    /// (a predicate or `Filter::PublicOnly`). Default none. It sees events as the application
    /// made them: before the outgoing middleware, after the incoming one. An event it keeps
    /// home stays in the local log and is never pushed; a pulled one it refuses is skipped.
    pub fn filter(mut self, filter: Filter) -> Self {
        self.filter = Some(filter);
        self
    }

    /// Also trusts the root certificates in `pem` (one or more `CERTIFICATE` blocks) for
    /// `https://`, besides the system's: a private CA, or a self-signed server certificate.
    /// Can be called more than once. `build` refuses PEM without a certificate.
    pub fn tls_root_certificates_pem(mut self, pem: impl AsRef<[u8]>) -> Self {
        self.tls_roots_pem.push(pem.as_ref().to_vec());
        self
    }

    /// Credentials (`Auth::jwt`, `Auth::api_key` or a plain bearer `Auth::token`). Default none.
    /// `build` refuses credentials that cannot go in an HTTP header (control characters).
    pub fn auth(mut self, auth: Auth) -> Self {
        self.auth = Some(auth);
        self
    }

    /// The branch to check out (default `main`, or the branch the local storage last had
    /// checked out). Setting it explicitly checks it out.
    pub fn branch(mut self, branch: impl Into<String>) -> Self {
        self.branch = Some(branch.into());
        self
    }

    /// Pull on this period (default zero: off). Auto-pull starts by itself, as the spec's
    /// example expects (it never calls `connect()`): when the client is attached to a replica
    /// inside a Tokio runtime (`KSync`'s builder does that), or else at the client's first
    /// `pull`, `push` or `sync`; `connect()` starts it as well (again). The first auto-pull
    /// comes one period after the start. A failed pull is reported (`error` notification) and
    /// tried again on the next tick, except a refusal of the credentials (401/403,
    /// [`SyncError::Auth`]), which stops auto-pull; after that, or after `disconnect()`, only
    /// `connect()` starts it again.
    pub fn pull_interval(mut self, interval: Duration) -> Self {
        self.pull_interval = interval;
        self
    }

    /// gzip request bodies and accept gzip responses (default true).
    pub fn compression(mut self, on: bool) -> Self {
        self.compression = on;
        self
    }

    /// Longest wait for a TCP (and TLS) connection (default 10 s). `build` refuses zero or
    /// more than [`ksync_core::MAX_CONFIG_DURATION`] (a day).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Longest time a request may make no progress (default 60 s): sending its body, the
    /// connection must take some of it within this of the start and of the last part taken;
    /// then the answer must begin within this of the last part (plus as long again as the
    /// body took to be taken, at most this more: what the connection still buffers of it
    /// crosses the link first), and each part of its body come within this of the last. A
    /// stalled server gives [`SyncError::Timeout`]. A request or an answer whose
    /// bytes keep moving takes as long as the link needs: bounded as a whole, a large pull
    /// page (up to 8 MiB) or push batch (up to 4 MiB) over a slow link was cut off and sent
    /// again, for good. `build` refuses zero or more than
    /// [`ksync_core::MAX_CONFIG_DURATION`] (a day).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Events asked for per pull request (default 1000; the server may cap it).
    pub fn page_size(mut self, events: usize) -> Self {
        self.page_size = events.max(1);
        self
    }

    /// Most events sent per push request (default [`DEFAULT_PUSH_BATCH`], 10,000).
    pub fn push_batch_size(mut self, events: usize) -> Self {
        self.push_batch = events.max(1);
        self
    }

    /// Most bytes of encoded events sent per push request (default
    /// [`DEFAULT_PUSH_BATCH_BYTES`], 4 MiB): keep it under the service's body limit. A single
    /// event larger than this is sent alone.
    pub fn push_batch_bytes(mut self, bytes: usize) -> Self {
        self.push_batch_bytes = bytes.max(1);
        self
    }

    /// Whether `pull`, `push` (so `sync`) and `connect` create the repository when the service
    /// answers 404 `repo_not_found`, then try once more (default true). The spec's flow
    /// (`new GitSyncClient({url})`, then `pull()` / `push()`) has no step that creates the
    /// repository, and the service serves none it was not asked to create. Creating needs
    /// write access: a read-only credential gets [`SyncError::Auth`] (the service's 403) and
    /// nothing is created. Off: those calls fail with the typed 404 ([`GitError::code`]
    /// `repo_not_found`), and only [`GitSyncClient::create_repo`] creates. `clone` and the
    /// branch calls never create (a mistyped URL must not make a repository).
    pub fn create_repo_if_missing(mut self, on: bool) -> Self {
        self.create_repo_if_missing = on;
        self
    }

    /// Most bytes of one answer this client reads, after gzip decoding (default
    /// [`DEFAULT_MAX_RESPONSE_BYTES`], 64 MiB). Answers are read in chunks and the read stops
    /// at the limit with [`GitError::ResponseTooLarge`], so a hostile server or a gzip bomb
    /// cannot exhaust memory. The service's pull pages stay under 8 MiB unless one event alone
    /// is larger: keep this above the largest event the service accepts.
    pub fn max_response_bytes(mut self, bytes: usize) -> Self {
        self.max_response_bytes = bytes.max(1);
        self
    }

    /// Most times one request is sent while the service answers that it is busy (default
    /// [`DEFAULT_BUSY_ATTEMPTS`](crate::wire::DEFAULT_BUSY_ATTEMPTS), 5; 1 never retries). A 503, or a 429 with `Retry-After`, is
    /// sent again after the `Retry-After` seconds it gives (1 s when absent or not a number
    /// of seconds, at most [`MAX_BUSY_WAIT`](crate::wire::MAX_BUSY_WAIT), plus up to 250 ms of jitter so that clients
    /// turned away together do not come back together), for at most [`MAX_BUSY_WAIT_TOTAL`](crate::wire::MAX_BUSY_WAIT_TOTAL)
    /// of waits in all; then the call fails with [`GitError::Server`] naming the status. Every
    /// request of this client may be repeated: pulls read, pushes are deduplicated by the
    /// service, branch creations name their fork point, merges carry their `mergeId`.
    pub fn busy_attempts(mut self, attempts: u32) -> Self {
        self.busy_attempts = attempts.max(1);
        self
    }

    /// The spec's `debug`: log every request (method, URL, status, bytes, round trip) and
    /// every pull and push at `debug` level (target `ksync_git::client`) instead of `trace`.
    /// Default false.
    pub fn debug(mut self, on: bool) -> Self {
        self.debug = on;
        self
    }

    /// Checks the options and makes the client. No network traffic happens here.
    pub fn build(self) -> Result<GitSyncClient, SyncError> {
        let url = repo_url(&self.url).map_err(GitError::into_sync)?;
        // The other transports' rule: a zero timeout failed every request with a timeout.
        // (`pull_interval` is not a timeout: zero turns auto-pull off.)
        for (field, value) in [
            ("request_timeout", self.request_timeout),
            ("connect_timeout", self.connect_timeout),
        ] {
            ksync_core::check_config_duration(field, value).map_err(SyncError::Config)?;
        }
        Auth::check_sendable(self.auth.as_ref())?;
        if let Some(branch) = &self.branch {
            branch_name(branch)?;
        }
        let mut roots = Vec::new();
        for pem in &self.tls_roots_pem {
            let certificates = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| {
                SyncError::Config(format!("reading the PEM root certificates: {e}"))
            })?;
            if certificates.is_empty() {
                return Err(SyncError::Config(
                    "no CERTIFICATE block in the PEM root certificates".into(),
                ));
            }
            roots.extend(certificates);
        }
        let client = reqwest::Client::builder()
            .tls_certs_merge(roots)
            .connect_timeout(self.connect_timeout)
            // No reqwest timeout: theirs count from the request's start, whatever its upload
            // does; `Http::attempt` times the request by its progress (see `request_timeout`).
            .gzip(self.compression)
            .tcp_nodelay(true)
            .build()
            .map_err(|source| {
                GitError::Http {
                    url: url.clone(),
                    source,
                }
                .into_sync()
            })?;
        Ok(GitSyncClient {
            inner: Arc::new(Inner {
                http: Http {
                    client,
                    auth: Arc::new(RwLock::new(self.auth)),
                    compression: self.compression,
                    request_timeout: self.request_timeout,
                    max_response_bytes: self.max_response_bytes,
                    busy_attempts: self.busy_attempts,
                    debug: self.debug,
                    meter: Arc::new(Meter::default()),
                },
                url: RwLock::new(url),
                branch: self.branch,
                pull_interval: self.pull_interval,
                page_size: self.page_size,
                push_batch: self.push_batch,
                push_batch_bytes: self.push_batch_bytes,
                create_repo_if_missing: self.create_repo_if_missing,
                pipeline: Pipeline::new(),
                filter: self.filter,
                notifier: Notifier::new(),
                replica: RwLock::new(None),
                resolver: RwLock::new(None),
                head: RwLock::new(None),
                attached_at: std::sync::atomic::AtomicU64::new(0),
                op: tokio::sync::Mutex::new(()),
                recording: tokio::sync::Mutex::new(None),
                owed: Owed::default(),
                auto_pull: Mutex::new(AutoPull {
                    task: None,
                    armed: !self.pull_interval.is_zero(),
                }),
                progress: RwLock::new(None),
            }),
        })
    }
}

/// Git-like, offline-first sync over HTTP: the spec's `GitSyncClient`.
///
/// **The URL** is the repository's URL: the service's mount point plus the repository name,
/// e.g. `http://localhost:8080/git/my-repo` for `ksync serve`. Requests go to
/// `{url}/branches/...` and `{url}/merge`.
///
/// **Local state** lives in the attached [`Replica`]'s storage (attached by [`KSync`], or an
/// in-memory one): the events, the checked-out branch, and per branch the server version pulled
/// up to and how far local events were pushed. Push sends, *then* records how far it got; a
/// process killed in between re-sends on restart and the server deduplicates by `(id,
/// version)`, so nothing is lost and nothing is stored twice.
///
/// **Branches** work as in git: server branches are the shared ones; this client has one
/// branch checked out, and `pull`/`push` talk to it. Each local event belongs to the branch
/// that was checked out when it was written, and is pushed only there. The local log is one
/// append-only log, so after a checkout it still holds what earlier branches brought; pulling
/// the new branch merges its events in (conflicts settled by the policy, like
/// `git checkout -m`). [`create_branch`](Self::create_branch) forks the checked-out branch on
/// the server at the version this client has pulled; [`merge`](Self::merge) merges on the
/// server and settles the reported conflicts here, pushing the resolutions to `into`.
///
/// **Conflicts**: without a handler last-write-wins applies (see [`ksync_core::lww_cmp`]);
/// [`on_conflict`](Self::on_conflict) (or `KSync::on_conflict`) chooses ours / theirs /
/// merged. Every conflict is reported in `PullResult::conflicts` and as a `conflict`
/// notification, and its resolution is a new revision that the next push sends. An event the
/// server refuses because it holds other content under the same `(id, version)` comes back in
/// `PushResult::rejected_events`; the next pull brings the server's revision and settles it.
/// So does an event too large for the service's body limit even alone (413): it stays local
/// and is not sent again, and the events after it are pushed.
///
/// [`KSync`]: ksync_core::KSync
///
/// ```no_run
/// # async fn demo() -> Result<(), ksync_core::SyncError> {
/// use std::sync::Arc;
/// use std::time::Duration;
/// use ksync_core::{Auth, AutoSync, InMemoryStorage, KSync};
/// use ksync_git::GitSyncClient;
///
/// let client = GitSyncClient::builder("http://localhost:8080/git/my-repo")
///     .auth(Auth::token("github-token"))
///     .branch("main")
///     .pull_interval(Duration::from_secs(60))
///     .build()?;
/// let ksync = KSync::builder()
///     .storage(Arc::new(InMemoryStorage::new()))
///     .sync_client(Arc::new(client))
///     .build()
///     .await?;
/// ksync.pull().await?;
/// ksync.emit("local_change", serde_json::json!({"data": "new data"})).await?;
/// ksync.push().await?;
/// ksync.enable_auto_sync(AutoSync {
///     push_interval: Duration::from_secs(30),
///     pull_interval: Duration::from_secs(60),
/// });
/// # Ok(()) }
/// ```
pub struct GitSyncClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: Http,
    url: RwLock<String>,
    branch: Option<String>,
    pull_interval: Duration,
    page_size: usize,
    push_batch: usize,
    push_batch_bytes: usize,
    create_repo_if_missing: bool,
    /// The `use(direction, ..)` chains: outgoing on what is pushed (the local log keeps events
    /// as made), incoming on what is pulled and on merge collisions, before they are stored.
    pipeline: Pipeline,
    filter: Option<Filter>,
    notifier: Notifier,
    replica: RwLock<Option<Replica>>,
    resolver: RwLock<Option<ConflictResolver>>,
    head: RwLock<Option<String>>,
    // The local sequence number from which events belong to this client's checked-out branch
    // when `ensure_head` has to (re)start its range: where the attached replica was handed to
    // us, or where a checkout or merge cut short in this process left the branch map giving
    // the range to another branch. 0 = unknown (the next event).
    attached_at: std::sync::atomic::AtomicU64,
    // One pull / push / merge / checkout at a time: they read and move the same cursors.
    // Taken through `lock_op`.
    op: tokio::sync::Mutex<()>,
    // An acknowledged push batch's cursor writes, on their own task while the push goes on,
    // or a pulled page being stored and reported. Kept here, not by the push or pull: one
    // cancelled meanwhile (a timeout, a dropped future) leaves them running, and the next
    // holder of the op lock awaits them before it reads or moves a cursor or the branch map,
    // so they cannot land after its writes (and undo them, or go to another branch).
    recording: tokio::sync::Mutex<Option<tokio::task::JoinHandle<Result<(), SyncError>>>>,
    /// Cursor writes a push could not make (see [`Owed`]).
    owed: Owed,
    auto_pull: Mutex<AutoPull>,
    progress: RwLock<Option<ProgressFn>>,
}

impl fmt::Debug for GitSyncClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GitSyncClient")
            .field("url", &self.url())
            .field("auth", &*read(&self.inner.http.auth))
            .field("pull_interval", &self.inner.pull_interval)
            .field("compression", &self.inner.http.compression)
            .finish_non_exhaustive()
    }
}

/// The auto-pull task, and whether it is still to start by itself (see
/// [`GitSyncClientBuilder::pull_interval`]). One lock for both, so a start by itself and a
/// `connect()` at the same moment cannot leave two tasks.
struct AutoPull {
    task: Option<tokio::task::JoinHandle<()>>,
    /// Set at build when a pull interval is given; cleared by the first start (by itself or by
    /// `connect()`) and by `disconnect()`: from then on only `connect()` starts it.
    armed: bool,
}

/// The branch argument of [`GitSyncClient::clone`], which the spec lets callers leave out
/// (`clone(url, branch?)`): a name (`&str`, `&String`, `String`) or an `Option<&str>`, where
/// `None` is the repository's default branch (`main`).
pub trait OptionalBranch {
    /// The branch named, if any.
    fn branch(&self) -> Option<&str>;
}

impl OptionalBranch for &str {
    fn branch(&self) -> Option<&str> {
        Some(self)
    }
}

impl OptionalBranch for &String {
    fn branch(&self) -> Option<&str> {
        Some(self.as_str())
    }
}

impl OptionalBranch for String {
    fn branch(&self) -> Option<&str> {
        Some(self.as_str())
    }
}

impl OptionalBranch for Option<&str> {
    fn branch(&self) -> Option<&str> {
        *self
    }
}

/// Which branch each range of the local log belongs to: `(first local seq, branch)` in
/// order. A checkout starts a new range at the next sequence number.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Segments(Vec<(u64, String)>);

impl Segments {
    fn branch_of(&self, seq: u64) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(start, _)| *start <= seq)
            .or(self.0.first())
            .map(|(_, b)| b.as_str())
    }

    fn start(&mut self, seq: u64, branch: &str) {
        if self.0.last().is_some_and(|(_, b)| b == branch) {
            return;
        }
        if let Some(last) = self.0.last_mut()
            && last.0 == seq
        {
            last.1 = branch.to_owned();
        } else {
            self.0.push((seq, branch.to_owned()));
        }
    }
}

fn branch_name(branch: &str) -> Result<Name, SyncError> {
    Name::new(branch).map_err(|e| SyncError::Config(format!("invalid branch name {branch:?}: {e}")))
}

/// Normalises a repository URL: `http(s)://host[:port]/.../{repo}` without a trailing slash.
fn repo_url(raw: &str) -> Result<String, GitError> {
    let invalid = |reason: &str| GitError::InvalidUrl {
        url: raw.to_owned(),
        reason: reason.to_owned(),
    };
    let parsed = reqwest::Url::parse(raw).map_err(|e| invalid(&e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid("the scheme must be http or https"));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(invalid("a repository URL has no query or fragment"));
    }
    let url = parsed.as_str().trim_end_matches('/').to_owned();
    let repo = url.rsplit('/').next().unwrap_or("");
    if url.len() <= parsed.origin().ascii_serialization().len() {
        return Err(invalid(
            "the URL must end with the repository name, e.g. http://host:8080/git/my-repo",
        ));
    }
    Name::new(repo).map_err(|e| invalid(&format!("repository name {repo:?}: {e}")))?;
    Ok(url)
}

impl GitSyncClient {
    /// Starts a builder for the repository at `url` (e.g. `http://localhost:8080/git/my-repo`).
    pub fn builder(url: impl Into<String>) -> GitSyncClientBuilder {
        GitSyncClientBuilder {
            url: url.into(),
            auth: None,
            branch: None,
            pull_interval: Duration::ZERO,
            compression: true,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            page_size: DEFAULT_PAGE,
            push_batch: DEFAULT_PUSH_BATCH,
            push_batch_bytes: DEFAULT_PUSH_BATCH_BYTES,
            create_repo_if_missing: true,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            busy_attempts: DEFAULT_BUSY_ATTEMPTS,
            debug: false,
            tls_roots_pem: Vec::new(),
            filter: None,
        }
    }

    /// The spec's `use(direction, middleware)`: adds a middleware to the `incoming` chain
    /// (pulled events and merge collisions, before they are stored or settled) or the
    /// `outgoing` one (pushed events; the local log keeps them as made), run in registration
    /// order. A middleware that fails on an event is an `error` notification: an outgoing
    /// event is then not pushed, an incoming one not taken in.
    pub fn use_middleware(&self, direction: Direction, middleware: impl Middleware) {
        self.inner.pipeline.use_middleware(direction, middleware);
    }

    /// Runs the filter and the `direction` chain on `event` (see [`Self::use_middleware`]);
    /// a failure is reported and counts as `None`.
    fn shape(&self, direction: Direction, event: Event) -> Option<Event> {
        match self
            .inner
            .pipeline
            .run_filtered(direction, self.inner.filter.as_ref(), event)
        {
            Ok(shaped) => shaped,
            Err(e) => {
                self.inner
                    .notifier
                    .emit(Notification::Error(Arc::new(e.into())));
                None
            }
        }
    }

    /// No filter and no middleware: events go as they are (hot paths skip copies).
    fn shapes_nothing(&self) -> bool {
        self.inner.filter.is_none() && self.inner.pipeline.is_empty()
    }

    /// Replaces the credentials (`None`: none) for the next requests, e.g. a fresh token after
    /// the service refused the old one (401: auto-pull stopped; call `connect()` to check the
    /// new ones and start it again). Refuses credentials that cannot go in an HTTP header, as
    /// the builder does.
    pub fn set_auth(&self, auth: Option<Auth>) -> Result<(), SyncError> {
        Auth::check_sendable(auth.as_ref())?;
        *write(&self.inner.http.auth) = auth;
        Ok(())
    }

    /// The repository URL.
    pub fn url(&self) -> String {
        read(&self.inner.url).clone()
    }

    /// The repository name (the URL's last segment).
    pub fn repo(&self) -> String {
        self.url().rsplit('/').next().unwrap_or("").to_owned()
    }

    /// The replica this client syncs (an in-memory one until one is attached).
    pub fn replica(&self) -> Replica {
        if let Some(r) = read(&self.inner.replica).as_ref() {
            return r.clone();
        }
        let mut slot = write(&self.inner.replica);
        slot.get_or_insert_with(|| {
            let replica = Replica::in_memory();
            if let Some(resolver) = read(&self.inner.resolver).clone() {
                replica.set_resolver(Some(resolver));
            }
            replica
        })
        .clone()
    }

    /// The checked-out branch.
    pub fn current_branch(&self) -> String {
        if let Some(head) = read(&self.inner.head).as_ref() {
            return head.clone();
        }
        let replica = self.replica();
        let stored = replica.storage().meta(HEAD_META).ok().flatten();
        self.inner
            .branch
            .clone()
            .or(stored)
            .unwrap_or_else(|| DEFAULT_BRANCH.to_owned())
    }

    /// The checked-out branch, how far it was pulled and how many local events wait for a
    /// push. Reads local state only.
    pub fn local_status(&self) -> Result<LocalStatus, SyncError> {
        let replica = self.replica();
        let branch = self.current_branch();
        let segments = self.segments(&replica)?;
        let owed = &self.inner.owed;
        let mut after = owed.cursor(&replica, &self.cursor_key(&branch, "pushed"))?;
        let mut pending_events = 0;
        loop {
            let (page, page_end) = replica.pending_page(after, SCAN_PAGE)?;
            if page.is_empty() {
                break;
            }
            after = page_end;
            for stored in &page {
                if segments.branch_of(stored.seq) == Some(branch.as_str()) {
                    pending_events += 1;
                }
            }
        }
        Ok(LocalStatus {
            pulled_version: owed.cursor(&replica, &self.cursor_key(&branch, "pulled"))?,
            branch,
            pending_events,
            local_events: replica.storage().len(),
        })
    }

    /// Sets how conflicts are settled (default last-write-wins). Conflicts are still reported.
    pub fn on_conflict(&self, resolver: impl Fn(&Conflict) -> Resolution + Send + Sync + 'static) {
        let resolver: ConflictResolver = Arc::new(resolver);
        *write(&self.inner.resolver) = Some(Arc::clone(&resolver));
        self.replica().set_resolver(Some(resolver));
    }

    /// Reports transfer progress to `progress` (e.g. a progress bar); `None` stops it.
    pub fn set_progress(&self, progress: Option<ProgressFn>) {
        *write(&self.inner.progress) = progress;
    }

    /// The repository and its branches.
    pub async fn repo_info(&self) -> Result<RepoInfo, SyncError> {
        let url = self.url();
        self.request(reqwest::Method::GET, &url, None::<&()>).await
    }

    /// Creates the repository on the server (with an empty `main`); fine if it exists.
    /// `pull`, `push` and `connect` call it themselves when the repository is missing, unless
    /// [`GitSyncClientBuilder::create_repo_if_missing`] is off.
    pub async fn create_repo(&self) -> Result<RepoInfo, SyncError> {
        let url = self.url();
        self.request(reqwest::Method::PUT, &url, None::<&()>).await
    }

    /// Runs `op`; when the service answers that the repository does not exist and
    /// `create_repo_if_missing` is on, creates it and runs `op` once more (a second
    /// `repo_not_found` is returned as it is: someone deleted it meanwhile, no loop).
    /// Safe to redo: a `repo_not_found` comes before anything was stored or any cursor moved.
    async fn creating_repo<T, F, Fut>(&self, op: F) -> Result<T, SyncError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, SyncError>>,
    {
        match op().await {
            Err(e) if self.inner.create_repo_if_missing && is_repo_not_found(&e) => {
                match self.create_repo().await {
                    Ok(info) => {
                        tracing::info!(repo = %info.repo, "git: repository did not exist; created it");
                    }
                    // Say why a write was asked for: the caller only pulled.
                    Err(SyncError::Auth(reason)) => {
                        return Err(SyncError::Auth(format!(
                            "repository {:?} does not exist, and creating it was refused: {reason}",
                            self.repo()
                        )));
                    }
                    Err(e) => return Err(e),
                }
                op().await
            }
            done => done,
        }
    }

    /// The server's branches, sorted by name.
    pub async fn list_branches(&self) -> Result<Vec<BranchInfo>, SyncError> {
        #[derive(Deserialize)]
        struct List {
            branches: Vec<BranchInfo>,
        }
        let url = format!("{}/branches", self.url());
        let list: List = self
            .request(reqwest::Method::GET, &url, None::<&()>)
            .await?;
        Ok(list.branches)
    }

    /// One server branch.
    pub async fn branch_info(&self, branch: &str) -> Result<BranchInfo, SyncError> {
        let branch = branch_name(branch)?;
        let url = format!("{}/branches/{branch}", self.url());
        self.request(reqwest::Method::GET, &url, None::<&()>).await
    }

    /// Creates `name` on the server, forked from the checked-out branch at the version this
    /// client has pulled (as `git branch` forks at the local `HEAD`). Local events not yet
    /// pushed stay with the branch they were written on. Does not check `name` out.
    pub async fn create_branch(&self, name: &str) -> Result<BranchInfo, SyncError> {
        let new = branch_name(name)?;
        let _op = self.lock_op().await?;
        let replica = self.replica();
        let head = self.current_branch();
        let pulled_version = replica.cursor(&self.cursor_key(&head, "pulled"))?;
        // As git branches from the local head, which has this client's pushed events: fork at
        // the version its last push reached when that is past the pulled one (a push that was
        // not a fast-forward leaves the pull cursor behind its own events). The fork may then
        // hold others' events this client has not pulled: the new branch's pull cursor stays
        // at the pulled version, so its first pull brings them (and its own back, as
        // duplicates).
        let acked = replica.cursor(&self.cursor_key(&head, "acked"))?;
        let at = pulled_version.max(acked);
        let url = format!("{}/branches", self.url());
        let body = CreateBranchRequest {
            name: new.to_string(),
            from: Some(head),
            at: Some(at),
        };
        let info: BranchInfo = self
            .request(reqwest::Method::POST, &url, Some(&body))
            .await?;
        // The new branch's first `pulled_version` events are the ones we already pulled.
        let pulled = self.cursor_key(new.as_str(), "pulled");
        if replica.cursor(&pulled)? < pulled_version {
            replica.set_cursor(&pulled, pulled_version).await?;
        }
        Ok(info)
    }

    /// Checks out `branch` (which must exist on the server): later pulls and pushes talk to
    /// it, and events written from now on belong to it.
    pub async fn checkout(&self, branch: &str) -> Result<BranchInfo, SyncError> {
        let info = self.branch_info(branch).await?;
        let _op = self.lock_op().await?;
        self.set_head(branch).await?;
        Ok(info)
    }

    /// Merges server branch `from` into `into`: the server appends to `into` what `from` has
    /// that `into` lacks and reports collisions; each collision is settled here by the
    /// conflict policy (`ours` = `into`'s revision, `theirs` = `from`'s), and the resolutions
    /// are pushed to `into`. A collision under an id that `into` already superseded with a
    /// newer revision is reported but not settled again. When `into` is checked out, it is
    /// pulled afterwards. When pushing the resolutions fails, the same `merge` again pushes
    /// them (the server reports a collision only once). The service answers a bounded number
    /// of collisions at a time (its `max_page` and `max_page_bytes`); the merge asks again
    /// until `from` is merged to its end (as it was when the merge started: what is pushed to
    /// `from` meanwhile is for the next merge), settling each answer's collisions (and
    /// notifying `conflict` for each) before asking for the next, and returns them all. One
    /// call settles at most [`MERGE_MAX_CONFLICTS`] collisions (past them it ends with
    /// [`GitError::MergeUnfinished`]; `merge` again goes on from there). An answer that says
    /// more remains without a collision, or without moving on, is refused
    /// ([`GitError::Protocol`]).
    pub async fn merge(&self, into: &str, from: &str) -> Result<MergeResult, SyncError> {
        // A merge moves events (and pushes, pulls): `syncing`, then `idle` or `error`.
        self.run(self.merge_branches(into, from)).await
    }

    async fn merge_branches(&self, into: &str, from: &str) -> Result<MergeResult, SyncError> {
        let into_name = branch_name(into)?;
        branch_name(from)?;
        let _op = self.lock_op().await?;
        let replica = self.replica();
        let url = format!("{}/merge", self.url());
        let keys = MergeKeys {
            // A map left to another branch by an earlier checkout or merge is taken back
            // first: this merge hands the map back to the head's range as it is now.
            head: self.ensure_head(&replica).await?,
            owed: self.cursor_key(into_name.as_str(), "merge-owed"),
            merge_id: self.cursor_key(into_name.as_str(), &format!("merge-id.{from}")),
            into: into_name,
        };
        let owes = replica.cursor(&keys.owed)? > 0;
        // How far `from` goes now: the merge asks for pages up to there (what is pushed to
        // `from` meanwhile is for the next merge), so a service that keeps saying more remains
        // cannot keep it asking.
        let from_end = self.branch_info(from).await?.server_version;
        let mut result = MergeResult::default();
        // An answer holds a bounded number of collisions (`next` set when more remain): each
        // page is settled before the next is asked for, so a lost answer loses nothing.
        let mut merged_to: Option<u64> = None;
        loop {
            let page = self.merge_page(&replica, &url, &keys, from).await?;
            let lie = |reason: String| {
                Err(GitError::Protocol {
                    url: url.clone(),
                    reason,
                }
                .into_sync())
            };
            let next = page.next;
            let from_version = page.from_version;
            // A page ends early only where it is full: with a collision at least, and where
            // it says it ends.
            if let Some(next) = next {
                if page.conflicts.is_empty() {
                    return lie(format!(
                        "a merge answer said more remains (next {next}) but held no collision"
                    ));
                }
                if next != from_version {
                    return lie(format!(
                        "a merge answer's next ({next}) is not its fromVersion ({from_version})"
                    ));
                }
            }
            // (A first page is always settled, whatever it holds: refusing it would refuse
            // it again at every merge.)
            if !result.conflicts.is_empty()
                && result.conflicts.len().saturating_add(page.conflicts.len()) > MERGE_MAX_CONFLICTS
            {
                // Before settling: this page is answered again to the next merge (same id).
                return Err(GitError::MergeUnfinished {
                    from: from.to_owned(),
                    limit: MERGE_MAX_CONFLICTS,
                }
                .into_sync());
            }
            // Counts from the server: saturating, whatever it says.
            result.appended = result.appended.saturating_add(page.appended);
            result.duplicates = result.duplicates.saturating_add(page.duplicates);
            result.server_version = page.server_version;
            self.settle_merge_page(&replica, &keys, page, &mut result)
                .await?;
            if next.is_none() {
                break;
            }
            // Every page moves on (a collision at least): one that does not would be asked for
            // again forever.
            if merged_to.is_some_and(|before| from_version <= before) {
                return lie(format!(
                    "a merge answer said more remains but did not move past version \
                     {from_version} of {from:?}"
                ));
            }
            merged_to = Some(from_version);
            if from_version >= from_end {
                // `from` is merged as far as it went when the merge started.
                break;
            }
        }
        if owes || !result.resolutions.is_empty() {
            let pushed = self.push_branch(&replica, keys.into.as_str()).await?;
            replica.set_cursor(&keys.owed, 0).await?;
            result.server_version = pushed.server_version;
        }
        if keys.head == keys.into.as_str() {
            let pulled = self.pull_branch(&replica, &keys.head).await?;
            result.server_version = pulled.server_version;
        }
        Ok(result)
    }

    /// Asks the service for the next page of a merge, under the merge's id (made and stored
    /// before it is first sent, forgotten once its answer is settled: a merge whose answer was
    /// lost is asked for again under the same id, and the service answers it again, since its
    /// collisions are past the merge cursor and would never be reported otherwise).
    async fn merge_page(
        &self,
        replica: &Replica,
        url: &str,
        keys: &MergeKeys,
        from: &str,
    ) -> Result<MergeResponse, SyncError> {
        let merge_id = match replica.storage().meta(&keys.merge_id)? {
            Some(id) if !id.is_empty() => id,
            _ => {
                let id = uuid::Uuid::new_v4().simple().to_string();
                replica.storage().set_meta(&keys.merge_id, &id).await?;
                id
            }
        };
        let body = MergeRequest {
            into: keys.into.to_string(),
            from: from.to_owned(),
            merge_id: Some(merge_id),
        };
        self.request(reqwest::Method::POST, url, Some(&body)).await
    }

    /// Settles one merge answer's collisions (reported as `conflict` notifications and in
    /// `result`; resolutions recorded locally on `into`, owed to the service until pushed),
    /// then forgets its id: the next page is a new merge.
    async fn settle_merge_page(
        &self,
        replica: &Replica,
        keys: &MergeKeys,
        page: MergeResponse,
        result: &mut MergeResult,
    ) -> Result<(), SyncError> {
        // Each settled collision's resolution, and whether it is new (to be recorded).
        let mut settled: Vec<(Event, bool)> = Vec::new();
        let segments = self.segments(replica)?;
        for mut found in page.conflicts {
            // Both sides as the application sees them (e.g. decrypted); a side the incoming
            // chain refuses leaves nothing to settle here.
            if !self.shapes_nothing() {
                let conflict = &mut found.conflict;
                let ours = self.shape(Direction::Incoming, conflict.ours.clone());
                let theirs = self.shape(Direction::Incoming, conflict.theirs.clone());
                let (Some(ours), Some(theirs)) = (ours, theirs) else {
                    result.conflicts.push(found.conflict);
                    continue;
                };
                conflict.ours = ours;
                conflict.theirs = theirs;
            }
            // A side that breaks the event rules (a lying service) is not one to resolve
            // from: its resolution would be refused by the storage, or by the service at every
            // push. Reported and left unsettled, as pulled events are skipped.
            let conflict = &found.conflict;
            if let Err(reason) = conflict
                .ours
                .check_received()
                .and_then(|()| conflict.theirs.check_received())
            {
                let url = format!("{}/merge", self.url());
                let error = GitError::Protocol { url, reason };
                self.inner
                    .notifier
                    .emit(Notification::Error(Arc::new(error.into_sync())));
                result.conflicts.push(found.conflict);
                continue;
            }
            self.inner
                .notifier
                .emit(Notification::Conflict(found.conflict.clone()));
            // `into` already holds a newer revision of this id: the collision is history (as in
            // `Replica::ingest`); settling it again would only add a revision.
            if found.latest_version > found.conflict.ours.version {
                result.conflicts.push(found.conflict);
                continue;
            }
            let held = replica.storage().latest(&found.conflict.ours.id)?;
            let local = held.as_ref().map_or(0, |l| l.event.version);
            let resolution = replica.resolution_for(&found.conflict);
            let mut event = resolve(&found.conflict, &resolution, replica.id());
            // This merge's answer asked for again after its resolutions were recorded (its id
            // outlived them: a crash, a failed write) brings the same collisions back. A
            // revision on `into` above what `into` has, with this content, is this one's
            // resolution, still owed: another would be one revision more of the same.
            if let Some(held) = held.filter(|held| {
                held.event.version > found.latest_version
                    && held.event.same_content(&event)
                    && segments.branch_of(held.seq) == Some(keys.into.as_str())
            }) {
                result.conflicts.push(found.conflict);
                settled.push((held.event, false));
                continue;
            }
            // A resolution goes above every revision of the id; at MAX_EVENT_INTEGER (the
            // highest valid version) there is no room: the collision is reported, left
            // unsettled, as `Replica::ingest` leaves it.
            let Some(above) = found
                .latest_version
                .max(local)
                .checked_add(1)
                .filter(|v| *v <= ksync_core::MAX_EVENT_INTEGER)
            else {
                result.conflicts.push(found.conflict);
                continue;
            };
            event.version = event.version.max(above);
            result.conflicts.push(found.conflict);
            settled.push((event, true));
        }
        // The resolutions to record (the others are held already).
        let resolutions: Vec<&Event> = settled
            .iter()
            .filter_map(|(event, new)| new.then_some(event))
            .collect();
        // The server's merge cursor has moved past these conflicts: a later merge will not
        // report them again. Until the resolutions are on `into`, a durable mark says they
        // are owed, so a merge retried after a failed push sends them.
        if !settled.is_empty() {
            replica.set_cursor(&keys.owed, 1).await?;
        }
        if !resolutions.is_empty() {
            let mut segments = segments;
            let next = replica.storage().len() + 1;
            segments.start(next, keys.into.as_str());
            self.save_segments(replica, &segments).await?;
            // From here the map gives `into` what comes next, the checked-out branch's events
            // too, until it is given back: should that not happen (a failed write, a cancelled
            // merge), `ensure_head` takes the range back after the resolutions.
            let resumes = next.saturating_add(resolutions.len() as u64);
            let resume_at = |seq| {
                self.inner
                    .attached_at
                    .store(seq, std::sync::atomic::Ordering::SeqCst);
            };
            resume_at(resumes);
            let mut recorded = Ok(());
            for event in &resolutions {
                if let Err(e) = replica.record_local((*event).clone()).await {
                    recorded = Err(e);
                    break;
                }
            }
            // Given back whatever happened to the resolutions (best effort when that failed).
            let back = replica.storage().len() + 1;
            segments.start(back, &keys.head);
            let saved = self.save_segments(replica, &segments).await;
            if saved.is_err() {
                resume_at(back);
            }
            recorded?;
            saved?;
        }
        result
            .resolutions
            .extend(settled.into_iter().map(|(event, _)| event));
        // Settled (the resolutions are recorded and owed): the next merge is a new one.
        replica.storage().set_meta(&keys.merge_id, "").await?;
        Ok(())
    }

    /// The spec's `clone(url, branch?)`: points this client at the repository `url`, checks out
    /// `branch` (a name, or `None`: the repository's default branch, `main`) and pulls all of it (from version 0, whatever was pulled before). It is also
    /// the way back after the service answered 409 `version_ahead` (the branch was reset):
    /// then this replica's own events of `branch` are pushed again by the next push.
    ///
    /// Through an `Arc` (as `KSync::client()` hands it out), `client.clone(..)` names
    /// `Arc::clone` first; call [`GitSyncClient::clone_repo`] there, or
    /// `GitSyncClient::clone(&client, url, branch)`.
    pub async fn clone(
        &self,
        url: &str,
        branch: impl OptionalBranch,
    ) -> Result<PullResult, SyncError> {
        self.clone_repo(url, branch).await
    }

    /// [`GitSyncClient::clone`] under a name that `Arc::clone` does not shadow:
    ///
    /// ```no_run
    /// # async fn demo(ksync: ksync_core::KSync<ksync_git::GitSyncClient>) -> Result<(), ksync_core::SyncError> {
    /// let cloned = ksync.client().clone_repo("http://127.0.0.1:8080/git/notes", "main").await?;
    /// println!("{} events", cloned.new_events.len());
    /// // The branch may be left out: the repository's default branch, `main`.
    /// ksync.client().clone_repo("http://127.0.0.1:8080/git/notes", None).await?;
    /// # Ok(()) }
    /// ```
    pub async fn clone_repo(
        &self,
        url: &str,
        branch: impl OptionalBranch,
    ) -> Result<PullResult, SyncError> {
        // A clone is a pull: `syncing`, then `idle` or `error`.
        self.run(self.clone_branch(url, branch.branch())).await
    }

    async fn clone_branch(&self, url: &str, branch: Option<&str>) -> Result<PullResult, SyncError> {
        let url = repo_url(url).map_err(GitError::into_sync)?;
        if let Some(branch) = branch {
            branch_name(branch)?;
        }
        let _op = self.lock_op().await?;
        // Checked before anything changes: a clone that fails (a mistyped URL, a missing
        // branch) leaves the client on its repository and branch.
        let info: RepoInfo = self
            .request(reqwest::Method::GET, &url, None::<&()>)
            .await?;
        // No branch named: the one the service calls the default (`main`).
        let branch = match branch {
            Some(branch) => branch.to_owned(),
            None => {
                branch_name(&info.default_branch)?;
                info.default_branch.clone()
            }
        };
        let branch = branch.as_str();
        if !info.branches.iter().any(|b| b.name == branch) {
            return Err(GitError::Server {
                url,
                status: 404,
                code: "branch_not_found".into(),
                message: format!("branch {branch:?} does not exist in {}", info.repo),
            }
            .into_sync());
        }
        *write(&self.inner.url) = url;
        self.set_head(branch).await?;
        let replica = self.replica();
        // A clone pulls the whole branch (what the replica holds deduplicates). From a
        // cursor past the branch's version the service answers 409 `version_ahead` ("the
        // branch was reset: clone again"), so a clone must not start there; and what this
        // replica pushed before the reset may be gone from the server: send it again too.
        let pulled = self.cursor_key(branch, "pulled");
        let found = info.branches.iter().find(|b| b.name == branch);
        let head = found.map_or(0, |b| b.server_version);
        let log_id = found.and_then(|b| b.log_id.as_deref());
        // Another branch log (the branch was made again) holds none of what we pushed to the
        // old one, even once it has grown past our cursors.
        let other_log = matches!(
            (self.known_log(&replica, branch)?, log_id),
            (Some(known), Some(now)) if known != now
        );
        if other_log || replica.cursor(&pulled)? > head {
            replica
                .set_cursor(&self.cursor_key(branch, "pushed"), 0)
                .await?;
        }
        replica.set_cursor(&pulled, 0).await?;
        // What a push reached counts in the old log too (and the clone pulls everything).
        replica
            .set_cursor(&self.cursor_key(branch, "acked"), 0)
            .await?;
        // Last: a crash before it leaves the old log named, and the next pull is refused
        // again rather than resumed from a cursor of the old log.
        replica
            .storage()
            .set_meta(&self.cursor_key(branch, "log"), log_id.unwrap_or(""))
            .await?;
        self.pull_branch(&replica, branch).await
    }

    fn cursor_key(&self, branch: &str, which: &str) -> String {
        format!("git:{}#{branch}:{which}", self.url())
    }

    fn segments(&self, replica: &Replica) -> Result<Segments, SyncError> {
        match replica.storage().meta(SEGMENTS_META)? {
            Some(raw) => serde_json::from_str(&raw).map_err(|e| {
                SyncError::Protocol(format!(
                    "local branch map {SEGMENTS_META:?} is damaged: {e}"
                ))
            }),
            None => Ok(Segments(vec![(1, self.current_branch())])),
        }
    }

    async fn save_segments(&self, replica: &Replica, segments: &Segments) -> Result<(), SyncError> {
        let raw = serde_json::to_string(segments)
            .map_err(|e| SyncError::Protocol(format!("encoding the branch map: {e}")))?;
        replica.storage().set_meta(SEGMENTS_META, &raw).await?;
        Ok(())
    }

    /// Makes `branch` the checked-out one, durably, from the next local event on. Caller
    /// holds the op lock.
    async fn set_head(&self, branch: &str) -> Result<(), SyncError> {
        let next = self.replica().storage().len() + 1;
        self.set_head_from(branch, next).await
    }

    /// Makes `branch` the checked-out one for local events from `seq` on.
    async fn set_head_from(&self, branch: &str, seq: u64) -> Result<(), SyncError> {
        let replica = self.replica();
        let mut segments = self.segments(&replica)?;
        let seq = seq.max(segments.0.last().map_or(1, |(start, _)| *start));
        segments.start(seq, branch);
        self.save_segments(&replica, &segments).await?;
        if let Err(e) = replica.storage().set_meta(HEAD_META, branch).await {
            // The map gives `branch` the events from `seq` on, but the head is still the
            // old one, whose events they are: `ensure_head` takes the range back from there.
            self.inner
                .attached_at
                .store(seq, std::sync::atomic::Ordering::SeqCst);
            return Err(e.into());
        }
        *write(&self.inner.head) = Some(branch.to_owned());
        Ok(())
    }

    /// Makes sure the checked-out branch is recorded (`git.head`) and owns the branch map's
    /// last range: the first time this client touches the storage, so that the map starts
    /// where this client started; and after a checkout or merge cut short (a crash or a
    /// failed write between the map and `git.head`, or before a merge gave the map back),
    /// which leaves the last range to another branch: events written on the checked-out
    /// branch would go to that one's pushes, never to their own. Caller holds the op lock.
    async fn ensure_head(&self, replica: &Replica) -> Result<String, SyncError> {
        let known = read(&self.inner.head).clone();
        let head = known.clone().unwrap_or_else(|| self.current_branch());
        let stored = replica.storage().meta(HEAD_META)?;
        let segments = self.segments(replica)?;
        let mapped = segments.0.last().map(|(_, branch)| branch.as_str());
        if stored.as_deref() != Some(head.as_str()) || mapped != Some(head.as_str()) {
            // Events written since the replica was attached (or since the cut) were made
            // with `head` in mind (e.g. `KSync::emit` before the first push).
            let from = match self
                .inner
                .attached_at
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                0 => replica.storage().len() + 1,
                seq => seq,
            };
            self.set_head_from(&head, from).await?;
        } else if known.is_none() {
            *write(&self.inner.head) = Some(head.clone());
        }
        Ok(head)
    }

    fn report(&self, phase: Phase, done: u64, total: u64) {
        if let Some(progress) = read(&self.inner.progress).as_ref() {
            progress(Progress { phase, done, total });
        }
    }

    fn pull_url(&self, branch: &str, since: u64, log_id: Option<&str>) -> String {
        let mut url = format!(
            "{}/branches/{branch}/events?since={since}&limit={}",
            self.url(),
            self.inner.page_size
        );
        // Ids as kSync makes them need no escaping; another service's odd ids go unchecked.
        if let Some(log_id) = log_id.filter(|id| id.bytes().all(|b| b.is_ascii_alphanumeric())) {
            url.push_str("&logId=");
            url.push_str(log_id);
        }
        url
    }

    /// The branch log this replica's cursors of `branch` count in (`BranchInfo::log_id`, as
    /// the service last named it), if known.
    fn known_log(&self, replica: &Replica, branch: &str) -> Result<Option<String>, SyncError> {
        let known = replica.storage().meta(&self.cursor_key(branch, "log"))?;
        Ok(known.filter(|id| !id.is_empty()))
    }

    /// Records the branch log the service named (`seen`) when none was known: from then on
    /// pulls and pushes name it, and the service refuses them (409 `branch_reset`) once the
    /// branch is another log. A differing `seen` cannot come: the service refused already.
    async fn learn_log(
        &self,
        replica: &Replica,
        branch: &str,
        known: &mut Option<String>,
        seen: Option<&str>,
    ) -> Result<(), SyncError> {
        if known.is_none()
            && let Some(seen) = seen
        {
            replica
                .storage()
                .set_meta(&self.cursor_key(branch, "log"), seen)
                .await?;
            *known = Some(seen.to_owned());
        }
        Ok(())
    }

    /// Fetches a pull page on its own task, so the next page travels while this one is stored.
    fn fetch_page(
        &self,
        branch: &str,
        since: u64,
        log_id: Option<&str>,
    ) -> tokio::task::JoinHandle<Result<PullResponse, SyncError>> {
        let http = self.inner.http.clone();
        let url = self.pull_url(branch, since, log_id);
        tokio::spawn(async move { http.call(reqwest::Method::GET, url, None).await })
    }

    async fn pull_branch(&self, replica: &Replica, branch: &str) -> Result<PullResult, SyncError> {
        let key = self.cursor_key(branch, "pulled");
        let mut since = self.inner.owed.cursor(replica, &key)?;
        let start = since;
        let mut result = PullResult::default();
        let wants_events = self.inner.notifier.wants(NotificationKind::Event);
        let wants_sync = self.inner.notifier.wants(NotificationKind::Sync);
        // Pages requested ahead: the server encodes the next ones while this one is decoded
        // and stored. Positions follow the size of the first full page.
        let mut known = self.known_log(replica, branch)?;
        let mut ahead = Prefetch::default();
        ahead.push(since, self.fetch_page(branch, since, known.as_deref()));
        let mut step: Option<u64> = None;
        while let Some(fetching) = ahead.pop() {
            let page = joined(fetching).await?;
            if page.since != since {
                return Err(GitError::Protocol {
                    url: self.pull_url(branch, since, known.as_deref()),
                    reason: format!(
                        "asked for events after {since}, got a page after {}",
                        page.since
                    ),
                }
                .into_sync());
            }
            let count = page.events.len() as u64;
            match page.next {
                None => ahead.cancel(),
                Some(n) if Some(n) == since.checked_add(count) && count > 0 => {
                    if ahead.first() != Some(n) {
                        // Not where the pages requested ahead start: ask again from `n`.
                        ahead.cancel();
                        ahead.push(n, self.fetch_page(branch, n, known.as_deref()));
                    }
                    let step = *step.get_or_insert(count);
                    while ahead.len() < PULL_AHEAD {
                        let at = ahead.last().unwrap_or(n).saturating_add(step);
                        if at >= page.server_version {
                            break;
                        }
                        ahead.push(at, self.fetch_page(branch, at, known.as_deref()));
                    }
                }
                Some(n) => {
                    return Err(GitError::Protocol {
                        url: self.pull_url(branch, since, known.as_deref()),
                        reason: format!(
                            "next page after {n}, expected {}",
                            since.saturating_add(count)
                        ),
                    }
                    .into_sync());
                }
            }
            self.learn_log(replica, branch, &mut known, page.log_id.as_deref())
                .await?;
            let mut events = if self.shapes_nothing() {
                page.events
            } else {
                page.events
                    .into_iter()
                    .filter_map(|event| self.shape(Direction::Incoming, event))
                    .collect()
            };
            // No storage may hold an event that breaks the event rules: taken in, it would be
            // stored as it is, or refused by the storage at every pull of this page. Skipped
            // (the cursor passes it) and reported.
            events.retain(|event| match event.check_received() {
                Ok(()) => true,
                Err(reason) => {
                    let error = GitError::Protocol {
                        url: self.pull_url(branch, since, known.as_deref()),
                        reason,
                    };
                    self.inner
                        .notifier
                        .emit(Notification::Error(Arc::new(error.into_sync())));
                    false
                }
            });
            // On its own task, reporting what it stored: a pull cut short (a `disconnect`
            // stopping auto-pull, a caller's timeout) while the storage settles a conflict
            // would otherwise leave the page's new events stored and never reported (the
            // next pull finds them duplicates). Kept where the op lock's next holder awaits
            // it (as a push's cursor writes): a checkout must not hand the log to another
            // branch before the resolutions this writes, which belong to this one.
            let (answer, answered) = tokio::sync::oneshot::channel();
            let ingesting = ingest_page(
                replica.clone(),
                self.inner.notifier.clone(),
                events,
                wants_events,
                wants_sync,
            );
            let end = since.saturating_add(count);
            let stored_to = (count > 0).then(|| (replica.clone(), key.clone()));
            let owed = self.inner.owed.clone();
            self.finish_recording().await?;
            self.start_recording(async move {
                let mut ingested = ingesting.await;
                // The page's cursor as soon as its events are stored, by the same task: a
                // pull cut short meanwhile (or failing on a later page) resumes after this
                // page instead of pulling it again. After the events: a crash in between
                // re-pulls the page, which deduplicates. Not after a partial store: its
                // conflicts are not all settled, and the next pull settles them.
                if let (Ok(_), Some((replica, key))) = (&ingested, stored_to) {
                    match replica.set_cursor(&key, end).await {
                        // A value owed from a push's fast-forward is behind it (the pull
                        // started there): written later, it would move the cursor back.
                        Ok(()) => owed.written(&key, end),
                        Err(e) => ingested = Err(e),
                    }
                }
                // Err: the pull was cut short; what was stored is reported already.
                let _ = answer.send(ingested);
                Ok(())
            })
            .await;
            self.finish_recording().await?;
            let ingested = answered
                .await
                .map_err(|_| SyncError::Protocol("storing a pulled page stopped".into()))??;
            since = end;
            if result.new_events.is_empty() {
                // Room for the whole pull at once rather than regrowing page after page;
                // bounded, as a pull may bring mostly events this replica already holds.
                let left = page.server_version.saturating_sub(since) + count;
                let room = usize::try_from(left).unwrap_or(usize::MAX).min(RESERVE_MAX);
                result.new_events.reserve(room.max(ingested.appended.len()));
            }
            result
                .new_events
                .extend(ingested.appended.into_iter().map(|s| s.event));
            result.conflicts.extend(ingested.conflicts);
            result.server_version = page.server_version.max(since);
            self.report(
                Phase::Pull,
                since - start,
                result.server_version.saturating_sub(start),
            );
        }
        Ok(result)
    }

    /// Local events of `branch` after `after`: up to one batch (at most `max_events` events
    /// and, unless one event alone is larger, `push_batch_bytes` of JSON), encoded as a JSON
    /// array while they are read, and the last sequence number examined (the push cursor may
    /// move there once the batch is acknowledged). Events that outgoing middleware made break
    /// the event rules are reported and set apart in `refused`, not encoded.
    fn pending_batch(
        &self,
        replica: &Replica,
        segments: &Segments,
        branch: &str,
        after: u64,
        max_events: usize,
    ) -> Result<PendingBatch, SyncError> {
        let mut events = Vec::new();
        let mut refused = Vec::new();
        let mut json = vec![b'['];
        let mut scanned = after;
        'scan: loop {
            // Read no more than the batch can still take (reads copy events), but not in
            // tiny steps when other branches' events are interleaved. (Other replicas'
            // events are scanned past where the storage keeps them, never copied.)
            let want = max_events.saturating_sub(events.len()).clamp(64, SCAN_PAGE);
            let (page, page_end) = replica.pending_page(scanned, want)?;
            if page.is_empty() {
                scanned = scanned.max(page_end);
                break;
            }
            let shapes_nothing = self.shapes_nothing();
            for stored in page {
                if segments.branch_of(stored.seq) == Some(branch) {
                    // The form it is pushed in (`None`: it stays home, for good).
                    let shaped = if shapes_nothing {
                        None
                    } else {
                        match self.shape(Direction::Outgoing, stored.event.clone()) {
                            Some(shaped) => Some(shaped),
                            None => {
                                scanned = stored.seq;
                                continue;
                            }
                        }
                    };
                    // The service refuses a whole batch holding an event that breaks the
                    // rules, at every push: this one goes no further, like an event the
                    // service refused (the cursor passes it once the batch is acknowledged).
                    if let Some(Err(reason)) = shaped
                        .as_ref()
                        .map(|shaped| shaped.validate(&EventLimits::default()))
                    {
                        let error = GitError::InvalidOutgoing {
                            id: stored.event.id.chars().take(64).collect(),
                            version: stored.event.version,
                            reason,
                        };
                        refused.push((stored.event, error));
                        scanned = stored.seq;
                        continue;
                    }
                    let mark = json.len();
                    if !events.is_empty() {
                        json.push(b',');
                    }
                    write_event(&mut json, shaped.as_ref().unwrap_or(&stored.event)).map_err(
                        |e| {
                            GitError::Protocol {
                                url: self.url(),
                                reason: format!("encoding event {:?}: {e}", stored.event.id),
                            }
                            .into_sync()
                        },
                    )?;
                    if !events.is_empty() && json.len() >= self.inner.push_batch_bytes {
                        // Over the byte budget: this event starts the next batch.
                        json.truncate(mark);
                        break 'scan;
                    }
                    events.push(stored.event);
                }
                scanned = stored.seq;
                if events.len() >= max_events {
                    break 'scan;
                }
            }
            scanned = scanned.max(page_end);
        }
        json.push(b']');
        Ok(PendingBatch {
            events,
            refused,
            json,
            end: scanned,
        })
    }

    /// Takes the op lock, once the cursor writes of a push cancelled meanwhile are done (see
    /// `Inner::recording`) and the cursor writes a push could not make are made (see
    /// [`Owed`]): while the storage refuses those, nothing goes on that reads a cursor.
    async fn lock_op(&self) -> Result<tokio::sync::MutexGuard<'_, ()>, SyncError> {
        let op = self.lock_op_owing().await;
        self.inner.owed.settle(&self.replica()).await?;
        Ok(op)
    }

    /// [`lock_op`](Self::lock_op) without writing the owed cursors: for `send`, which only
    /// moves a push cursor back (the owed value too, see [`Owed::lower`]).
    async fn lock_op_owing(&self) -> tokio::sync::MutexGuard<'_, ()> {
        let op = self.inner.op.lock().await;
        if let Err(e) = self.finish_recording().await {
            tracing::debug!(error = %e, "git: a cancelled pull's or push's cursor write failed");
        }
        op
    }

    /// Awaits the push cursor writes in progress, if any. Cancelled, it leaves them in place
    /// for the next holder of the op lock. Caller holds the op lock.
    async fn finish_recording(&self) -> Result<(), SyncError> {
        let mut slot = self.inner.recording.lock().await;
        let Some(task) = slot.as_mut() else {
            return Ok(());
        };
        let done = task.await;
        *slot = None;
        done.unwrap_or_else(|e| Err(SyncError::transport(e)))
    }

    /// Starts cursor writes on their own task (see `Inner::recording`); the previous ones are
    /// finished. Caller holds the op lock.
    async fn start_recording(
        &self,
        write: impl Future<Output = Result<(), SyncError>> + Send + 'static,
    ) {
        *self.inner.recording.lock().await = Some(tokio::spawn(write));
    }

    async fn push_branch(&self, replica: &Replica, branch: &str) -> Result<PushResult, SyncError> {
        // The last acknowledged batch's cursor writes, running while the next batch is read,
        // encoded and sent. Awaited before the next ones start (cursors only move forward)
        // and before returning, also on errors (a late write must not undo a later push's).
        let pushed = self.push_batches(replica, branch).await;
        let recorded = self.finish_recording().await;
        let result = pushed?;
        recorded?;
        Ok(result)
    }

    async fn push_batches(&self, replica: &Replica, branch: &str) -> Result<PushResult, SyncError> {
        let key = self.cursor_key(branch, "pushed");
        let pulled_key = self.cursor_key(branch, "pulled");
        let segments = self.segments(replica)?;
        let url = format!("{}/branches/{branch}/events", self.url());
        let owed = &self.inner.owed;
        let mut scanned = owed.cursor(replica, &key)?;
        let total = replica.storage().len().saturating_sub(scanned);
        let mut result = PushResult::default();
        let mut answered = false;
        // The pull cursor as this push moves it (it holds the op lock: nobody else does).
        let mut pulled = owed.cursor(replica, &pulled_key)?;
        let mut known = self.known_log(replica, branch)?;
        // At most one batch in flight while the next one is read and encoded. Batches are sent
        // one after the other, so the server applies them in log order.
        let mut in_flight: Option<InFlight> = None;
        let wants_sync = self.inner.notifier.wants(NotificationKind::Sync);
        // Most events per batch: halved for the rest of this push each time the service
        // answers a batch of several events 413 (it says to push smaller batches).
        let mut max_events = self.inner.push_batch;
        loop {
            let batch = self.pending_batch(replica, &segments, branch, scanned, max_events)?;
            let start = scanned;
            scanned = batch.end;
            if result.pushed_events.capacity() == 0 && !batch.events.is_empty() {
                // Room for the whole push at once rather than regrowing batch after batch.
                let room = usize::try_from(total).map_or(RESERVE_MAX, |t| t.min(RESERVE_MAX));
                result.pushed_events.reserve(room.max(batch.events.len()));
            }
            let mut acknowledged = None;
            if let Some(mut previous) = in_flight.take() {
                let before = result.pushed_events.len();
                let (previous_start, previous_len) = (previous.start, previous.events.len());
                let refused = std::mem::take(&mut previous.refused);
                let settled = match settle(previous, &mut pulled, &mut result).await? {
                    Settled::Acknowledged(settled) => {
                        // Taken: what the middleware made invalid in its stretch is rejected
                        // now, once (a batch answered 413 is read again, refusals and all).
                        self.reject_refused(refused, &mut result);
                        settled
                    }
                    Settled::TooLarge => {
                        // Sent again from its start in halves, down to one event (which a
                        // 413 then rejects, see `settle`). The batch just read was not sent:
                        // it is read again after them.
                        max_events = (previous_len / 2).max(1);
                        scanned = previous_start;
                        continue;
                    }
                };
                answered |= settled.answered;
                self.learn_log(replica, branch, &mut known, settled.log_id.as_deref())
                    .await?;
                // One `sync` per acknowledged batch (as a pull has one per page): a later
                // batch that fails must not hide the ones the server took. Sent once its
                // cursor is recorded (see `record`).
                let synced = (result.pushed_events.len() > before && wants_sync)
                    .then(|| result.pushed_events[before..].to_vec());
                acknowledged = Some((settled, synced));
                self.report(
                    Phase::Push,
                    (result.pushed_events.len() + result.rejected_events.len()) as u64,
                    total,
                );
            }
            if batch.events.is_empty() {
                // Nothing to send: what the middleware made invalid in it is rejected now.
                self.reject_refused(batch.refused, &mut result);
            } else {
                let http = self.inner.http.clone();
                let body = push_body(pulled, known.as_deref(), &batch.json);
                let target = url.clone();
                in_flight = Some(InFlight {
                    answer: tokio::spawn(async move {
                        http.call(reqwest::Method::POST, target, Some(body)).await
                    }),
                    events: batch.events,
                    refused: batch.refused,
                    start,
                    end: scanned,
                    base_version: pulled,
                });
            }
            if let Some((acknowledged, synced)) = acknowledged {
                self.finish_recording().await?;
                self.start_recording(record(
                    Recorder {
                        replica: replica.clone(),
                        owed: owed.clone(),
                        notifier: self.inner.notifier.clone(),
                    },
                    key.clone(),
                    pulled_key.clone(),
                    acknowledged,
                    synced,
                ))
                .await;
            }
            if in_flight.is_none() {
                self.finish_recording().await?;
                if scanned > owed.cursor(replica, &key)? {
                    // On its task too: a push cancelled here must not leave a write that
                    // lands after someone else's.
                    let recorder = Recorder {
                        replica: replica.clone(),
                        owed: owed.clone(),
                        notifier: self.inner.notifier.clone(),
                    };
                    let key = key.clone();
                    self.start_recording(async move {
                        recorder.write(&key, scanned).await;
                        Ok(())
                    })
                    .await;
                    self.finish_recording().await?;
                }
                break;
            }
        }
        if !answered {
            result.server_version = self.branch_info(branch).await?.server_version;
        }
        Ok(result)
    }

    /// Reports events outgoing middleware made break the event rules (an error notification
    /// each) and returns them among the push's rejected events.
    fn reject_refused(&self, refused: Vec<(Event, GitError)>, result: &mut PushResult) {
        for (event, error) in refused {
            tracing::warn!(error = %error, "git: an event was not pushed");
            self.inner
                .notifier
                .emit(Notification::Error(Arc::new(error.into_sync())));
            result.rejected_events.push(event);
        }
    }

    async fn request<B: Serialize, T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        url: &str,
        body: Option<&B>,
    ) -> Result<T, SyncError> {
        let json = body.map(|b| encode(url, b)).transpose()?;
        self.inner.http.call(method, url.to_owned(), json).await
    }

    async fn run<T>(&self, op: impl Future<Output = Result<T, SyncError>>) -> Result<T, SyncError> {
        self.inner
            .notifier
            .emit(Notification::Status(Status::Syncing));
        let result = op.await;
        let status = if result.is_ok() {
            Status::Idle
        } else {
            Status::Error
        };
        self.inner.notifier.emit(Notification::Status(status));
        let metrics = self.inner.http.meter.report();
        self.inner.notifier.emit(Notification::Metrics(metrics));
        result
    }

    /// Stops auto-pull; it no longer starts by itself (only `connect()` starts it).
    fn stop_auto_pull(&self) {
        let mut auto = lock(&self.inner.auto_pull);
        auto.armed = false;
        if let Some(task) = auto.task.take() {
            task.abort();
        }
    }

    /// Starts auto-pull (`connect()`), replacing a running one. Needs a Tokio runtime.
    fn start_auto_pull(&self) {
        if self.inner.pull_interval.is_zero() {
            return;
        }
        let mut auto = lock(&self.inner.auto_pull);
        auto.armed = false;
        if let Some(task) = auto.task.take() {
            task.abort();
        }
        auto.task = Some(spawn_auto_pull(
            Arc::downgrade(&self.inner),
            self.inner.pull_interval,
        ));
    }

    /// Starts auto-pull by itself the first time the client is attached or used, so a
    /// `pull_interval` works without `connect()` (the spec's example never calls it). Outside
    /// a Tokio runtime (an `attach` from plain code) it waits for the next chance.
    fn start_auto_pull_once(&self) {
        let mut auto = lock(&self.inner.auto_pull);
        if !auto.armed || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        auto.armed = false;
        auto.task = Some(spawn_auto_pull(
            Arc::downgrade(&self.inner),
            self.inner.pull_interval,
        ));
    }
}

/// Stores a pulled page and reports what it stored: `conflict`s, then (when somebody listens)
/// an `event` per new event and one `sync`. A failure after part of the page was stored
/// ([`SyncError::PartlyIngested`]) reports that part before it is returned: pulling the page
/// again finds those events duplicates. The cursor stays before the page then, as its
/// conflicts are not all settled, and the next pull settles them.
async fn ingest_page(
    replica: Replica,
    notifier: Notifier,
    events: Vec<Event>,
    wants_events: bool,
    wants_sync: bool,
) -> Result<Ingested, SyncError> {
    let report = |stored: &Ingested| {
        for conflict in &stored.conflicts {
            notifier.emit(Notification::Conflict(conflict.clone()));
        }
        // Notifications cost a copy of every event: only when somebody listens.
        if wants_events {
            for stored in &stored.appended {
                notifier.emit(Notification::Event(stored.event.clone()));
            }
        }
        if wants_sync && !stored.appended.is_empty() {
            notifier.emit(Notification::Sync(stored.new_events()));
        }
    };
    match replica.ingest(events).await {
        Ok(ingested) => {
            report(&ingested);
            Ok(ingested)
        }
        Err(e) => {
            if let Some(stored) = e.ingested() {
                report(stored);
            }
            Err(e)
        }
    }
}

/// Waits for a push batch's answer and takes its results: pushed and rejected events into
/// `result`, and a fast-forward of `pulled` when the branch is now exactly what was pulled plus
/// this batch (no need to pull it back). The cursors are made durable afterwards (see
/// [`record`]). A 413 for a batch of several events takes nothing ([`Settled::TooLarge`]).
async fn settle(
    batch: InFlight,
    pulled: &mut u64,
    result: &mut PushResult,
) -> Result<Settled, SyncError> {
    let answer: PushResponse = match joined(batch.answer).await {
        Ok(answer) => answer,
        Err(e) if GitError::of(&e).and_then(GitError::status) == Some(413) => {
            if batch.events.len() > 1 {
                // The service asks for smaller batches: sending this one again would get
                // the same answer at every push.
                tracing::debug!(error = %e, events = batch.events.len(),
                    "git: a push batch was too large; sending it again in smaller ones");
                return Ok(Settled::TooLarge);
            }
            // One event alone over the service's body limit: no retry can ever send it, and
            // failing on it would hold back every event after it. It is refused like a
            // collision (kept here, reported in `rejected_events`, not sent again).
            tracing::warn!(error = %e, "git: an event larger than the service accepts was not pushed");
            result.rejected_events.extend(batch.events);
            return Ok(Settled::Acknowledged(Acknowledged {
                end: batch.end,
                log_id: None,
                fast_forward_to: None,
                answered: false,
            }));
        }
        Err(e) => return Err(e),
    };
    // A fast-forward is to exactly what the client had plus this batch (see PROTOCOL.md):
    // any other version is not one, and trusting it would move the pull cursor past events
    // never pulled (or to u64::MAX, overflowing the next pull's arithmetic).
    let fast_forward_end = batch.base_version.checked_add(batch.events.len() as u64);
    let mut rejected = vec![false; batch.events.len()];
    for r in &answer.rejected {
        if let Some(slot) = rejected.get_mut(r.index) {
            *slot = true;
        }
    }
    for (event, refused) in batch.events.into_iter().zip(rejected) {
        if refused {
            result.rejected_events.push(event);
        } else {
            result.pushed_events.push(event);
        }
    }
    result.server_version = answer.server_version;
    let fast_forward_to = answer.fast_forward_to.filter(|&version| {
        version > batch.base_version
            && Some(version) == fast_forward_end
            && answer.rejected.is_empty()
            && *pulled == batch.base_version
    });
    if let Some(version) = fast_forward_to {
        *pulled = version;
    }
    Ok(Settled::Acknowledged(Acknowledged {
        end: batch.end,
        log_id: answer.log_id,
        fast_forward_to,
        answered: true,
    }))
}

/// How a push batch's answer was taken.
enum Settled {
    /// The service took it (or refused its one event for good).
    Acknowledged(Acknowledged),
    /// 413 for a batch of several events: nothing of it was taken; smaller batches may go.
    TooLarge,
}

/// One push batch as read from the local log: the events (kept for the result), the same
/// events as a JSON array, and the last local sequence number examined.
struct PendingBatch {
    events: Vec<Event>,
    /// Events of this stretch of the log that outgoing middleware made invalid, and why: not
    /// sent, rejected once the batch is taken.
    refused: Vec<(Event, GitError)>,
    json: Vec<u8>,
    end: u64,
}

/// Makes an acknowledged batch's cursors durable: a fast-forward of the pull cursor (a crash
/// before that pulls the batch back, which deduplicates here), *then* the push cursor (a crash
/// before that re-sends the batch, which the server deduplicates). In that order, so a crash
/// between them reads as "these events to push, up to date", which the next push makes true;
/// the other way round it read as "nothing to push, behind the server by our own events"
/// until the next pull. A pull cursor write that fails leaves the push cursor owed too, so it
/// cannot land first either ([`Owed::settle`] writes in key order, `pulled` before `pushed`).
/// Then the batch's `sync` (`synced`), if anyone listens.
async fn record(
    recorder: Recorder,
    key: String,
    pulled_key: String,
    acknowledged: Acknowledged,
    synced: Option<Vec<Event>>,
) -> Result<(), SyncError> {
    let pulled = match acknowledged.fast_forward_to {
        Some(version) => recorder.write(&pulled_key, version).await,
        None => true,
    };
    if pulled {
        recorder.write(&key, acknowledged.end).await;
    } else {
        recorder.owed.owe(&key, acknowledged.end);
    }
    // The batch's `sync` once its cursors are written, or owed (a failed write is retried
    // before this client sends anything again): either way the batch is not sent, nor
    // reported, again by this process.
    if let Some(events) = synced {
        recorder.notifier.emit(Notification::Sync(events));
    }
    Ok(())
}

/// Writes the cursors of what the service took (see [`record`]).
struct Recorder {
    replica: Replica,
    owed: Owed,
    notifier: Notifier,
}

impl Recorder {
    /// Writes `key`, telling whether it was written; a failure is reported (an `error`
    /// notification) and the value stays owed: the push that got this far succeeds all the
    /// same.
    async fn write(&self, key: &str, value: u64) -> bool {
        match self.owed.write(&self.replica, key, value).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "git: a push cursor was not recorded");
                self.notifier.emit(Notification::Error(Arc::new(e)));
                false
            }
        }
    }
}

/// Cursor writes that failed after the service had taken what they record (a push batch's
/// push cursor and fast-forwarded pull cursor, how far a push reached): the values, by key.
/// The push that met the failure succeeds (the service holds its events), and the next
/// holder of the op lock writes them first (`lock_op`), so that nothing is sent or reported
/// again meanwhile. One entry per cursor key, the highest value owed: bounded by the keys
/// this client writes (three per branch).
#[derive(Clone, Default)]
struct Owed(Arc<Mutex<std::collections::BTreeMap<String, u64>>>);

impl Owed {
    /// `key` as owed, or as stored when nothing is owed: an owed value is what the next
    /// [`settle`](Self::settle) writes, whether further (a push's failed write) or behind (a
    /// `send` that moved it back, see [`lower`](Self::lower)).
    fn cursor(&self, replica: &Replica, key: &str) -> Result<u64, SyncError> {
        if let Some(&owed) = lock(&self.0).get(key) {
            return Ok(owed);
        }
        replica.cursor(key)
    }

    /// Writes `key`; a failure leaves `value` owed ([`GitError::CursorNotRecorded`]).
    async fn write(&self, replica: &Replica, key: &str, value: u64) -> Result<(), SyncError> {
        match replica.set_cursor(key, value).await {
            Ok(()) => {
                let mut owed = lock(&self.0);
                if owed.get(key).is_some_and(|&owed| owed <= value) {
                    owed.remove(key);
                }
                Ok(())
            }
            Err(source) => {
                let mut owed = lock(&self.0);
                let slot = owed.entry(key.to_owned()).or_insert(value);
                *slot = (*slot).max(value);
                Err(GitError::CursorNotRecorded {
                    cursor: key.to_owned(),
                    source: Box::new(source),
                }
                .into_sync())
            }
        }
    }

    /// Leaves `value` owed for `key` without writing it (it must not land before another
    /// owed write, see [`record`]).
    fn owe(&self, key: &str, value: u64) {
        let mut owed = lock(&self.0);
        let slot = owed.entry(key.to_owned()).or_insert(value);
        *slot = (*slot).max(value);
    }

    /// `key` was written as `value` otherwise (a pulled page's cursor): an owed value not
    /// past it is settled.
    fn written(&self, key: &str, value: u64) {
        let mut owed = lock(&self.0);
        if owed.get(key).is_some_and(|&owed| owed <= value) {
            owed.remove(key);
        }
    }

    /// Moves an owed `key` back to `value` if it is further (see `send`).
    fn lower(&self, key: &str, value: u64) {
        if let Some(owed) = lock(&self.0).get_mut(key) {
            *owed = (*owed).min(value);
        }
    }

    /// Writes every owed cursor; the first failure is returned (they stay owed).
    async fn settle(&self, replica: &Replica) -> Result<(), SyncError> {
        let owed: Vec<(String, u64)> = lock(&self.0)
            .iter()
            .map(|(key, value)| (key.clone(), *value))
            .collect();
        for (key, value) in owed {
            self.write(replica, &key, value).await?;
        }
        Ok(())
    }
}

/// What an acknowledged push batch moves the cursors to.
struct Acknowledged {
    /// The push cursor.
    end: u64,
    /// The branch log the service named.
    log_id: Option<String>,
    /// The pull cursor, when the batch was a fast-forward.
    fast_forward_to: Option<u64>,
    /// Whether the service stored the batch (and told its version).
    answered: bool,
}

/// Pull pages requested at once (the one awaited and the ones after it).
const PULL_AHEAD: usize = 2;

type PageTask = tokio::task::JoinHandle<Result<PullResponse, SyncError>>;

/// Pull pages requested ahead, in order, each with the `since` it was asked for. Dropping it
/// (an error, a cancelled pull) cancels the requests.
#[derive(Default)]
struct Prefetch(std::collections::VecDeque<(u64, PageTask)>);

impl Prefetch {
    fn push(&mut self, since: u64, task: PageTask) {
        self.0.push_back((since, task));
    }

    fn pop(&mut self) -> Option<PageTask> {
        self.0.pop_front().map(|(_, task)| task)
    }

    fn first(&self) -> Option<u64> {
        self.0.front().map(|(since, _)| *since)
    }

    fn last(&self) -> Option<u64> {
        self.0.back().map(|(since, _)| *since)
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn cancel(&mut self) {
        for (_, task) in self.0.drain(..) {
            task.abort();
        }
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// A push batch on its way.
struct InFlight {
    answer: tokio::task::JoinHandle<Result<PushResponse, SyncError>>,
    events: Vec<Event>,
    /// Its stretch's events the middleware made invalid (see [`PendingBatch::refused`]).
    refused: Vec<(Event, GitError)>,
    /// The push cursor before this batch (where it is read again from, in smaller batches,
    /// after a 413).
    start: u64,
    /// The push cursor once this batch is acknowledged.
    end: u64,
    base_version: u64,
}

/// The result of a request task (a task that panicked or was cancelled is a transport error).
async fn joined<T>(task: tokio::task::JoinHandle<Result<T, SyncError>>) -> Result<T, SyncError> {
    task.await.unwrap_or_else(|e| Err(SyncError::transport(e)))
}

/// The HTTP side of a client: owned and cheap to clone, so a request can run on its own task
/// while the caller works on the previous answer.
#[derive(Clone)]
struct Http {
    client: reqwest::Client,
    /// Shared by the clones a request takes, so that `set_auth` reaches them all.
    auth: Arc<RwLock<Option<Auth>>>,
    compression: bool,
    /// See [`GitSyncClientBuilder::request_timeout`].
    request_timeout: Duration,
    /// Most bytes of one answer read (see [`GitSyncClientBuilder::max_response_bytes`]).
    max_response_bytes: usize,
    /// See [`GitSyncClientBuilder::busy_attempts`].
    busy_attempts: u32,
    /// See [`GitSyncClientBuilder::debug`].
    debug: bool,
    /// Traffic since the last `metrics` notification.
    meter: Arc<Meter>,
}

/// Target of this file's [`debug_log!`] lines, fixed because users filter on it.
const LOG_TARGET: &str = "ksync_git::client";

/// What the client did since its last `metrics` notification (one is sent after every pull,
/// push, sync, merge and clone: this client has no connection to report on in between).
#[derive(Debug)]
struct Meter(Mutex<Metered>);

#[derive(Debug)]
struct Metered {
    /// Since the client was built: events pulled or pushed, bytes of requests and answers,
    /// requests and their round trips.
    totals: MeterTotals,
    meter: MetricsMeter,
    /// When the current period began.
    since: std::time::Instant,
}

impl Default for Meter {
    fn default() -> Self {
        Self(Mutex::new(Metered {
            totals: MeterTotals::default(),
            meter: MetricsMeter::default(),
            since: std::time::Instant::now(),
        }))
    }
}

impl Meter {
    fn events(&self, n: usize) {
        let mut m = lock(&self.0);
        m.totals.events = m.totals.events.saturating_add(n as u64);
    }

    fn request(&self, bytes: usize, round_trip: Duration) {
        let mut m = lock(&self.0);
        m.totals.bytes = m.totals.bytes.saturating_add(bytes as u64);
        m.totals.add_round_trip(round_trip);
    }

    /// The figures since the last report, and a new period from now.
    fn report(&self) -> Metrics {
        let mut m = lock(&self.0);
        let now = std::time::Instant::now();
        let elapsed = now.duration_since(m.since);
        m.since = now;
        let totals = m.totals;
        m.meter.report(totals, elapsed)
    }
}

impl Http {
    /// Sends `json` (already encoded) and decodes the answer, or the service's error body.
    /// Sent again while the service answers that it is busy (see
    /// [`GitSyncClientBuilder::busy_attempts`]).
    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        url: String,
        json: Option<Vec<u8>>,
    ) -> Result<T, SyncError> {
        // Compressed once: a retry sends the same bytes (`Bytes` clones share them).
        let body = json.map(|json| {
            let sent = json.len();
            if self.compression && sent >= COMPRESS_MIN_BYTES {
                (bytes::Bytes::from(gzip(&json)), true, sent)
            } else {
                (bytes::Bytes::from(json), false, sent)
            }
        });
        let mut attempt = 1;
        let mut waited = Duration::ZERO;
        loop {
            let (error, wait) = match self.attempt(method.clone(), &url, body.clone()).await {
                Attempt::Done(result) => return result,
                Attempt::Busy { error, wait } => (error, wait),
            };
            if attempt >= self.busy_attempts || waited + wait > MAX_BUSY_WAIT_TOTAL {
                return Err(error);
            }
            let wait = wait + jitter();
            debug_log!(self.debug, target: LOG_TARGET, %method, %url, attempt, wait_ms = wait.as_millis() as u64, error = %error, "service busy: retrying");
            tokio::time::sleep(wait).await;
            waited += wait;
            attempt += 1;
        }
    }

    /// One sending of a request: its decoded answer or error, or that the service is busy.
    async fn attempt<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        url: &str,
        body: Option<(bytes::Bytes, bool, usize)>,
    ) -> Attempt<T> {
        let url = url.to_owned();
        let started = std::time::Instant::now();
        let progress = upload::Progress::start();
        let sent = body.as_ref().map_or(0, |(_, _, sent)| *sent);
        debug_log!(self.debug, target: LOG_TARGET, %method, %url, bytes = sent, "request");
        let mut request = self
            .client
            .request(method, &url)
            .header(PROTOCOL_HEADER, ksync_core::PROTOCOL_VERSION.to_string());
        if let Some((name, value)) = read(&self.auth).as_ref().map(Auth::header) {
            request = request.header(name, value);
        }
        if let Some((bytes, gzipped, _)) = body {
            request = request.header(reqwest::header::CONTENT_TYPE, "application/json");
            if gzipped {
                request = request.header(reqwest::header::CONTENT_ENCODING, "gzip");
            }
            request = request.body(reqwest::Body::wrap(Upload::new(bytes, progress.clone())));
        }
        let http = |source| {
            GitError::Http {
                url: url.clone(),
                source,
            }
            .into_sync()
        };
        let response = match progress
            .unless_stalled(self.request_timeout, request.send())
            .await
        {
            Some(Ok(response)) => response,
            Some(Err(e)) => return Attempt::Done(Err(http(e))),
            None => return Attempt::Done(Err(self.timed_out(&url))),
        };
        // A service that announces another protocol version is refused, whatever it answered
        // (one that announces none, e.g. behind a proxy that drops the header, is trusted).
        if let Some(theirs) = response.headers().get(PROTOCOL_HEADER) {
            let ours = ksync_core::PROTOCOL_VERSION.to_string();
            if theirs.as_bytes() != ours.as_bytes() {
                return Attempt::Done(Err(GitError::UnsupportedProtocol {
                    url,
                    theirs: String::from_utf8_lossy(theirs.as_bytes()).into_owned(),
                }
                .into_sync()));
            }
        }
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .map(|v| {
                // Seconds; an HTTP date (or anything else) gets the default wait.
                v.to_str()
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map_or(DEFAULT_BUSY_WAIT, |s| {
                        Duration::from_secs(s).min(MAX_BUSY_WAIT)
                    })
            });
        // Busy: 503 (the service sheds load before doing anything), or 429 that says when to
        // come back (one without `Retry-After` is not a load the client can wait out).
        let busy = match status.as_u16() {
            503 => Some(retry_after.unwrap_or(DEFAULT_BUSY_WAIT)),
            429 => retry_after,
            _ => None,
        };
        let bytes = match self.read_body(&url, response).await {
            Ok(bytes) => bytes,
            Err(e) => return Attempt::Done(Err(e)),
        };
        let round_trip = started.elapsed();
        // Bytes as the application sees them (before gzip one way, after it the other).
        self.meter.request(sent + bytes.len(), round_trip);
        debug_log!(self.debug, target: LOG_TARGET, %url, status = status.as_u16(), bytes = bytes.len(), ms = round_trip.as_secs_f64() * 1000.0, "answer");
        if !status.is_success() {
            let (code, message) = match from_json::<ErrorBody>(&bytes) {
                Ok(body) => (body.error.code, body.error.message),
                Err(_) => (
                    "http_error".to_owned(),
                    String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned(),
                ),
            };
            let error = GitError::Server {
                url,
                status: status.as_u16(),
                code,
                message,
            }
            .into_sync();
            return match busy {
                Some(wait) => Attempt::Busy { error, wait },
                None => Attempt::Done(Err(error)),
            };
        }
        Attempt::Done(from_json(&bytes).map_err(|e| {
            GitError::Protocol {
                url,
                reason: format!("undecodable answer: {e}"),
            }
            .into_sync()
        }))
    }
}

/// What one sending of a request came to.
enum Attempt<T> {
    /// An answer, or an error a retry would not change.
    Done(Result<T, SyncError>),
    /// The service is busy (`error` is its answer): worth sending again after `wait`.
    Busy { error: SyncError, wait: Duration },
}

/// Up to 250 ms, so that clients turned away at once do not all come back at once.
fn jitter() -> Duration {
    Duration::from_millis(rand::random_range(0..=250))
}

/// Whether `error` is the service's 404 `repo_not_found`.
fn is_repo_not_found(error: &SyncError) -> bool {
    GitError::of(error).and_then(GitError::code) == Some("repo_not_found")
}

impl Http {
    /// A request that made no progress for `request_timeout`.
    fn timed_out(&self, url: &str) -> SyncError {
        SyncError::Timeout(format!(
            "request to {url}: nothing sent or received for {} ms (request_timeout)",
            self.request_timeout.as_millis()
        ))
    }

    /// Reads an answer's body (gzip already decoded by reqwest, so a bomb is counted as it
    /// inflates) in chunks, each within `request_timeout` of the last, up to
    /// `max_response_bytes`; past it the read stops (the connection is dropped) with
    /// [`GitError::ResponseTooLarge`].
    async fn read_body(
        &self,
        url: &str,
        mut response: reqwest::Response,
    ) -> Result<Vec<u8>, SyncError> {
        let limit = self.max_response_bytes;
        let too_large = || {
            GitError::ResponseTooLarge {
                url: url.to_owned(),
                limit,
            }
            .into_sync()
        };
        // A declared length (absent when reqwest decodes gzip) refuses early, and sizes the
        // buffer: never past the limit nor `MAX_BODY_RESERVE`, whatever the server claims (a
        // claim of 2^63 bytes under a limit that high panicked; the rest grows as it arrives).
        let declared = response.content_length().unwrap_or(0);
        if declared > limit as u64 {
            return Err(too_large());
        }
        let reserve = usize::try_from(declared)
            .unwrap_or(limit)
            .min(MAX_BODY_RESERVE);
        let mut body = Vec::with_capacity(reserve);
        loop {
            let chunk = tokio::time::timeout(self.request_timeout, response.chunk())
                .await
                .map_err(|_| self.timed_out(url))?
                .map_err(|source| {
                    GitError::Http {
                        url: url.to_owned(),
                        source,
                    }
                    .into_sync()
                })?;
            let Some(chunk) = chunk else { break };
            if chunk.len() > limit - body.len() {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

/// Most bytes an answer's buffer takes before they arrive (see `read_body`).
const MAX_BODY_RESERVE: usize = 8 << 20;

fn encode<B: Serialize + ?Sized>(url: &str, body: &B) -> Result<Vec<u8>, SyncError> {
    serde_json::to_vec(body).map_err(|e| {
        GitError::Protocol {
            url: url.to_owned(),
            reason: format!("encoding the request: {e}"),
        }
        .into_sync()
    })
}

/// A push body with its events already encoded: `baseVersion` is only known when the previous
/// batch is answered, and the events are encoded while it is in flight.
fn push_body(base_version: u64, log_id: Option<&str>, events_json: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(events_json.len() + 80);
    body.extend_from_slice(b"{\"baseVersion\":");
    body.extend_from_slice(base_version.to_string().as_bytes());
    if let Some(log_id) = log_id {
        body.extend_from_slice(b",\"logId\":");
        // A string always encodes.
        let _ = serde_json::to_writer(&mut body, log_id);
    }
    body.extend_from_slice(b",\"events\":");
    body.extend_from_slice(events_json);
    body.push(b'}');
    body
}

fn spawn_auto_pull(inner: Weak<Inner>, period: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate; whatever started auto-pull (connect(), attach before
        // the app's own first pull, a pull or push) just talked to the server or is about to.
        interval.tick().await;
        loop {
            interval.tick().await;
            let Some(inner) = inner.upgrade() else { break };
            let client = GitSyncClient { inner };
            match client.pull().await {
                Ok(_) => {}
                // The credentials are the builder's: refused once, refused on every tick.
                // Stop rather than knock forever (and feed the server's failed-login count);
                // `connect()` starts auto-pull again.
                Err(e @ SyncError::Auth(_)) => {
                    tracing::warn!(error = %e, "git: auto-pull refused; auto-pull stopped");
                    client.inner.notifier.emit(Notification::Error(Arc::new(e)));
                    break;
                }
                // A service of another protocol version answers every tick the same way:
                // reported once, as refused credentials are; `connect()` starts it again.
                Err(e) if GitError::of(&e).is_some_and(GitError::is_unsupported_protocol) => {
                    tracing::warn!(error = %e, "git: the service speaks another protocol version; auto-pull stopped");
                    client.inner.notifier.emit(Notification::Error(Arc::new(e)));
                    break;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "git: auto-pull failed");
                    client.inner.notifier.emit(Notification::Error(Arc::new(e)));
                }
            }
        }
    })
}

impl SyncClient for GitSyncClient {
    /// Checks that the repository answers (and the credentials work; a missing repository is
    /// created unless [`GitSyncClientBuilder::create_repo_if_missing`] is off), then starts
    /// auto-pull (again) when `pull_interval` is set. Reports `connected` and the status `connected` (the
    /// spec's statuses), or the status `error` when the check fails.
    fn connect(&self) -> BoxFuture<'_, Result<(), SyncError>> {
        Box::pin(async move {
            let checked = async {
                self.creating_repo(|| self.repo_info()).await?;
                let _op = self.lock_op().await?;
                let replica = self.replica();
                self.ensure_head(&replica).await
            };
            if let Err(e) = checked.await {
                self.inner
                    .notifier
                    .emit(Notification::Status(Status::Error));
                return Err(e);
            }
            self.stop_auto_pull();
            self.inner.notifier.emit(Notification::Connected);
            self.inner
                .notifier
                .emit(Notification::Status(Status::Connected));
            // After the notifications: the first auto-pull's `syncing` comes after them.
            self.start_auto_pull();
            Ok(())
        })
    }

    /// Stops auto-pull (until the next `connect()`). Pending events stay pending.
    fn disconnect(&self) -> BoxFuture<'_, Result<(), SyncError>> {
        Box::pin(async move {
            self.stop_auto_pull();
            self.inner.notifier.emit(Notification::Disconnected);
            Ok(())
        })
    }

    /// Stores `event` locally (once; `KSync::emit` already did) on the checked-out branch; the
    /// next `push` sends it. An event without `origin` gets this replica's id; another
    /// replica's event (a bridge) is pushed with its origin. An event that breaks the event
    /// rules ([`Event::validate`]) is refused with [`SyncError::InvalidEvent`] and not stored:
    /// the service would refuse every push batch holding it, and nothing after it would go.
    fn send(&self, event: Event) -> BoxFuture<'_, Result<(), SyncError>> {
        Box::pin(async move {
            event.validate(&EventLimits::default())?;
            let replica = self.replica();
            let forwarded = replica.forward(event).await?;
            // A collision was settled as for a pulled event: reported as one is.
            for conflict in forwarded.conflicts {
                self.inner.notifier.emit(Notification::Conflict(conflict));
            }
            let Some(seq) = forwarded.marked else {
                return Ok(());
            };
            // It was already stored, perhaps behind its branch's push cursor: move the cursor
            // back so the next push looks again (what goes twice, the server drops as
            // duplicates). Under the op lock, so a push in progress cannot undo it (nor the
            // cursor writes of a cancelled one: `lock_op` awaits them first). A cursor owed is
            // moved back too, whether or not the storage takes it now: written later as it
            // was, it would skip this event.
            let _op = self.lock_op_owing().await;
            let segments = self.segments(&replica)?;
            if let Some(branch) = segments.branch_of(seq) {
                let key = self.cursor_key(branch, "pushed");
                let back = seq.saturating_sub(1);
                self.inner.owed.lower(&key, back);
                if replica.cursor(&key)? >= seq {
                    self.inner.owed.write(&replica, &key, back).await?;
                }
            }
            Ok(())
        })
    }

    fn notifier(&self) -> &Notifier {
        &self.inner.notifier
    }

    fn attach(&self, replica: Replica) {
        if let Some(resolver) = read(&self.inner.resolver).clone() {
            replica.set_resolver(Some(resolver));
        }
        self.inner.attached_at.store(
            replica.storage().len() + 1,
            std::sync::atomic::Ordering::SeqCst,
        );
        *write(&self.inner.replica) = Some(replica);
        *write(&self.inner.head) = None;
        // `KSync` attaches as it is built: the spec's `pullInterval` runs from there on.
        self.start_auto_pull_once();
    }
}

impl PullPushClient for GitSyncClient {
    /// Refused credentials, and a service of another protocol version
    /// ([`GitError::is_unsupported_protocol`]): either answers every try alike.
    fn is_final_error(&self, error: &SyncError) -> bool {
        matches!(error, SyncError::Auth(_))
            || GitError::of(error).is_some_and(GitError::is_unsupported_protocol)
    }

    /// Pulls the checked-out branch from the version pulled last, page by page.
    fn pull(&self) -> BoxFuture<'_, Result<PullResult, SyncError>> {
        Box::pin(self.run(async move {
            self.start_auto_pull_once();
            let _op = self.lock_op().await?;
            let replica = self.replica();
            let head = self.ensure_head(&replica).await?;
            let pulled = self
                .creating_repo(|| self.pull_branch(&replica, &head))
                .await?;
            self.inner.http.meter.events(pulled.new_events.len());
            debug_log!(self.inner.http.debug, target: LOG_TARGET, branch = %head, events = pulled.new_events.len(), server_version = pulled.server_version, "pulled");
            Ok(pulled)
        }))
    }

    /// Pushes the checked-out branch's local events that the server has not acknowledged.
    fn push(&self) -> BoxFuture<'_, Result<PushResult, SyncError>> {
        Box::pin(self.run(async move {
            self.start_auto_pull_once();
            let _op = self.lock_op().await?;
            let replica = self.replica();
            let head = self.ensure_head(&replica).await?;
            let pushed = self
                .creating_repo(|| self.push_branch(&replica, &head))
                .await?;
            if !pushed.pushed_events.is_empty() {
                // Where this client's own events reach on the server (see `create_branch`).
                let acked = self.cursor_key(&head, "acked");
                let owed = &self.inner.owed;
                if owed.cursor(&replica, &acked)? < pushed.server_version {
                    Recorder {
                        replica: replica.clone(),
                        owed: owed.clone(),
                        notifier: self.inner.notifier.clone(),
                    }
                    .write(&acked, pushed.server_version)
                    .await;
                }
            }
            self.inner.http.meter.events(pushed.pushed_events.len());
            debug_log!(self.inner.http.debug, target: LOG_TARGET, branch = %head, events = pushed.pushed_events.len(), rejected = pushed.rejected_events.len(), server_version = pushed.server_version, "pushed");
            Ok(pushed)
        }))
    }
}

impl Drop for GitSyncClient {
    fn drop(&mut self) {
        // The auto-pull task holds only a weak reference; the last client stops it.
        if Arc::strong_count(&self.inner) == 1 {
            self.stop_auto_pull();
        }
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

fn lock<T>(lock: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    lock.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_urls() {
        assert_eq!(
            repo_url("http://h:8080/git/my-repo/").expect("ok"),
            "http://h:8080/git/my-repo"
        );
        assert_eq!(
            repo_url("https://sync.example.com/my-repo").expect("ok"),
            "https://sync.example.com/my-repo"
        );
        for bad in [
            "ftp://h/r",
            "http://h",
            "http://h/",
            "http://h/git/..",
            "http://h/r?x=1",
            "not a url",
        ] {
            assert!(repo_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn push_body_is_a_push_request() {
        let events = vec![Event::new("a", "t", serde_json::json!({"x": 1}), 5)];
        let json = encode("u", &events).expect("encode");
        let request: crate::wire::PushRequest =
            serde_json::from_slice(&push_body(42, None, &json)).expect("a valid PushRequest");
        assert_eq!((request.base_version, request.events), (42, events.clone()));
        let request: crate::wire::PushRequest =
            serde_json::from_slice(&push_body(7, Some("a\"1"), &json)).expect("with a log id");
        assert_eq!(request.log_id.as_deref(), Some("a\"1"));
    }

    #[test]
    fn segments_map_sequence_numbers_to_branches() {
        let mut s = Segments(vec![(1, "main".into())]);
        s.start(5, "feature");
        s.start(5, "other");
        s.start(9, "other");
        s.start(12, "main");
        assert_eq!(s.branch_of(1), Some("main"));
        assert_eq!(s.branch_of(4), Some("main"));
        assert_eq!(s.branch_of(5), Some("other"));
        assert_eq!(s.branch_of(11), Some("other"));
        assert_eq!(s.branch_of(12), Some("main"));
        assert_eq!(s.0.len(), 3);
    }
}
