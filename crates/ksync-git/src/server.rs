//! The repository service: repositories with branches, pull, push, branch and merge, as an
//! axum [`Router`] (feature `server`).
//!
//! Every branch is one log from the [`StorageProvider`] under [`LogName::Branch`], with its own
//! sequence numbers (the `serverVersion`). A branch forked from another at version `v` starts
//! with a copy of that branch's first `v` events (same order, same sequence numbers), so every
//! branch is a self-contained log and pulls never have to follow fork chains. The fork point is
//! kept in the branch's metadata (`git.branch`) and reported by the branch endpoints.
//!
//! Request handling order: names are validated first (400, before any storage is touched),
//! then credentials (401/403), then existence (404), then the body (413/503/400; see
//! `GitServerConfig::body_memory_bytes` for the 503).

use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use http_body_util::BodyExt as _;
use ksync_core::{
    Access, AppendOutcome, AuthError, Authenticator, ClientId, ClientPlace, Conflict, Credentials,
    Event, EventLimits, Grant, LogName, Name, PerClientCounts, ResourceKind, Storage, StorageError,
    StorageProvider, Stored,
};
use serde::{Deserialize, Serialize};

use crate::decoded::decoded_bound;
use crate::gzip::{GunzipError, accepts_gzip, gunzip, gzip};
use crate::wire::{
    BranchInfo, CreateBranchRequest, DEFAULT_BRANCH, DEFAULT_PAGE, DEFAULT_PAGE_BYTES, ErrorBody,
    ErrorDetail, MergeConflict, MergeRequest, MergeResponse, PROTOCOL_HEADER, PushRequest,
    PushResponse, RejectedEvent, RepoInfo, from_json, write_event,
};

/// Metadata key of a branch's fork record; a log without it is not (yet) a branch.
const BRANCH_META: &str = "git.branch";
/// Metadata key prefix of `into`'s merge cursor per `from` branch.
const MERGED_META_PREFIX: &str = "git.merged.";
/// Prefix of the metadata key (in `into`'s log) of the last merge answer from a branch (see
/// [`MergeAnswer`]).
const MERGE_ANSWER_META_PREFIX: &str = "git.merge-answer.";
/// Prefix of the metadata key (in `into`'s log) of the merge with a `mergeId` under way from
/// a branch: `"<mergeId> <into's length before it>"`, written before it appends anything.
/// A merge whose answer was not kept (a storage failure, a crash between its appends and its
/// answer) is retried under the same id and meets what it stored as duplicates: those at
/// sequence numbers past that length are counted as appended, as the first try would have.
const MERGE_PENDING_META_PREFIX: &str = "git.merge-pending.";

/// The last merge of a pair of branches, kept so that a client that lost the answer and
/// retries with the same `mergeId` gets it again: its collisions are past the merge cursor and
/// would never be reported otherwise. Collisions are kept as keys; the revisions are read
/// again from both logs when the answer is replayed.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MergeAnswer {
    merge_id: String,
    appended: u64,
    duplicates: u64,
    server_version: u64,
    from_version: u64,
    /// `(id, version)` of each colliding revision.
    conflicts: Vec<(String, u64)>,
    /// The answer's `next` (none in answers kept before merges were paged).
    #[serde(default)]
    next: Option<u64>,
}

impl MergeAnswer {
    /// The answer as it was given, from the revisions in `into` (ours) and `from` (theirs).
    fn replay(&self, into: &dyn Storage, from: &dyn Storage) -> Result<MergeResponse, ApiError> {
        let mut body = MergeResponse {
            appended: self.appended,
            duplicates: self.duplicates,
            server_version: self.server_version,
            from_version: self.from_version,
            next: self.next,
            ..MergeResponse::default()
        };
        for (id, version) in &self.conflicts {
            // Logs only grow: both revisions are still there.
            let (Some(ours), Some(theirs)) = (into.get(id, *version)?, from.get(id, *version)?)
            else {
                continue;
            };
            let latest_version = into.latest(id)?.map_or(*version, |l| l.event.version);
            body.conflicts.push(MergeConflict {
                conflict: Conflict::concurrent_edit(ours.event, theirs.event),
                latest_version,
            });
        }
        Ok(body)
    }
}

/// A `mergeId` as the protocol allows it.
fn valid_merge_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}
/// Events copied or merged per storage append.
const COPY_PAGE: usize = 10_000;

/// Limits of the service.
///
/// `#[non_exhaustive]`: limits are added over time, so it is not built field by field outside
/// this crate; start from the defaults and set what you change:
///
/// ```
/// let mut config = ksync_git::server::GitServerConfig::default();
/// config.max_branches_per_repo = 100;
/// # let _ = config;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct GitServerConfig {
    /// Largest request body accepted, after gzip decompression (413 beyond). Default 16 MiB.
    pub max_body_bytes: usize,
    /// Events per pull page when the client gives no `limit`. Default 1000.
    pub default_page: usize,
    /// Largest `limit` honoured; larger ones are cut to it. Default 10,000 (0 counts as 1). Also the most
    /// collisions in one merge answer (the rest come with the next merge, see
    /// [`MergeResponse::next`](crate::wire::MergeResponse::next)).
    pub max_page: usize,
    /// Most bytes of encoded events in one pull page (default [`DEFAULT_PAGE_BYTES`], 8 MiB):
    /// a page ends before the event that would take it past this, unless that event is the
    /// page's first (an event larger than the budget goes alone), and `next` says where the
    /// rest starts. Without it a page could hold `max_page` events of up to the body limit
    /// each: gigabytes built in memory for one answer. A merge answer's collisions (both
    /// revisions each) are cut the same way; without it one answer held every collision of
    /// the branch, past what a client reads (`max_response_bytes`, 64 MiB), and the client
    /// asked for it again forever. A fork's copy and a merge read their source in pages of
    /// about this many bytes decoded ([`Event::decoded_len`]), as they hold each page decoded.
    pub max_page_bytes: usize,
    /// Responses at least this large are gzip-compressed for clients that accept gzip.
    /// Default 1 KiB.
    pub compress_min_bytes: usize,
    /// Most branch logs this service keeps open (default 256). Past it the least recently
    /// used one the service does not use at that moment is released to the provider (a file
    /// log then closes: its file handle, writer thread and index go; the next request
    /// replays it). Without it every repository and branch ever touched stayed in memory.
    pub max_open_branches: usize,
    /// Most memory that the bodies of the requests being handled (pushes, merges, branch
    /// creations) may take at once, decoded, in the measure of
    /// [`Event::decoded_len`](ksync_core::Event::decoded_len) (as the WebSocket relay's
    /// `room_queue_bytes`); default 256 MiB. A body's JSON decodes larger than it is (a
    /// `[0,0,...]` of 16 MiB is 256 MiB of `Value`s), and `max_body_bytes` bounds only the
    /// JSON. A body holds its bytes as they arrive; before it is decoded its JSON is walked for
    /// a bound of what it decodes into (no values are built), which it holds too while it is
    /// decoded, then what it measures decoded until its answer is ready. A body whose bound is larger than the
    /// whole budget is refused with 413 `payload_too_large`; one that does not fit beside the
    /// others in flight gets 503 `busy` with `Retry-After: 1` (load shedding: nothing waits).
    /// At most 4 GiB - 1 (a semaphore's permits, one a byte); more counts as that.
    pub body_memory_bytes: usize,
    /// Most branches one repository may have, `main` included (default 1,000). Creating one
    /// more is refused with 409 `too_many_branches` and creates nothing (asking again for a
    /// branch that exists, at its fork point, still answers it). A fork copies its source's
    /// events up to the fork point: without a cap, one small request after another multiplied
    /// a repository's disk use by as many branches as a writer cared to ask for.
    pub max_branches_per_repo: usize,
    /// Most pushes of one client handled at once (default 64, a quarter of `ksync serve`'s
    /// 256 repository requests at once; 0 counts as 1). A client is its credentials' subject
    /// (`Grant::subject`: an API key's name, a JWT's `sub`) seen from one IP address when the
    /// authenticator requires credentials, else its IP address alone (the address is known
    /// when served with connect info; without it only the subject, or without auth only the
    /// service-wide bounds, apply). A push past it is refused before its body is read with
    /// 429 `too_many_pushes` and `Retry-After: 1`, which `GitSyncClient` waits out and sends
    /// again; its place is given back when its answer is ready or the request is dropped.
    /// One `GitSyncClient` pushes one request at a time.
    pub max_pushes_per_client: usize,
    /// Most merges and branch creations of one client handled at once, together (default 16;
    /// 0 counts as 1); a client as for `max_pushes_per_client`. Each may copy many events
    /// between branches, and waits its turn behind others into the same branch (merges) or
    /// in the service (branch creations), holding one of `ksync serve`'s repository request
    /// places meanwhile: without it one client's merges or forks could take them all and
    /// every other client's requests were answered 503 `busy`. One more is refused before its
    /// body is read with 429 `too_many_merges` and `Retry-After: 1` (`GitSyncClient` waits
    /// and sends it again); nothing of it is done. One `GitSyncClient` sends one at a time.
    pub max_merges_per_client: usize,
}

impl Default for GitServerConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 16 * 1024 * 1024,
            default_page: DEFAULT_PAGE,
            max_page: 10_000,
            max_page_bytes: DEFAULT_PAGE_BYTES,
            compress_min_bytes: 1024,
            max_open_branches: 256,
            body_memory_bytes: 256 * 1024 * 1024,
            max_branches_per_repo: 1000,
            max_pushes_per_client: 64,
            max_merges_per_client: 16,
        }
    }
}

/// The repository service. Cheap to clone; [`GitServer::router`] gives the axum routes under
/// `/git`.
///
/// ```
/// use std::sync::Arc;
/// use ksync_core::{AllowAll, InMemoryProvider};
/// use ksync_git::server::GitServer;
/// let service = GitServer::new(Arc::new(InMemoryProvider::new()), Arc::new(AllowAll));
/// let app: axum::Router = service.router();
/// # let _ = app;
/// ```
#[derive(Clone)]
pub struct GitServer {
    inner: Arc<Inner>,
}

struct Inner {
    provider: Arc<dyn StorageProvider>,
    auth: Arc<dyn Authenticator>,
    config: GitServerConfig,
    // Creating repositories and branches is check-then-write; one at a time keeps it atomic.
    create_lock: tokio::sync::Mutex<()>,
    /// Branch logs this service opened, least recently used first (see
    /// `GitServerConfig::max_open_branches`).
    open_logs: std::sync::Mutex<std::collections::VecDeque<LogName>>,
    /// One permit per byte of `GitServerConfig::body_memory_bytes`, held by the bodies of the
    /// requests in flight (as the WebSocket relay's `room_queue_bytes`).
    body_memory: Arc<Semaphore>,
    /// Pushes in flight per client (`GitServerConfig::max_pushes_per_client`).
    pushes: Arc<PerClientCounts>,
    /// Merges and branch creations in flight per client
    /// (`GitServerConfig::max_merges_per_client`).
    merges: Arc<PerClientCounts>,
    /// Merges into a branch go one at a time (see [`GitServer::merge_lock`]).
    merge_locks: Box<[tokio::sync::Mutex<()>]>,
}

/// Stripes of [`Inner::merge_locks`].
const MERGE_LOCK_STRIPES: usize = 64;

/// A request's share of `Inner::body_memory`, given back when it is dropped.
struct BodyShare {
    memory: Arc<Semaphore>,
    /// The whole budget (the semaphore's permits).
    limit: usize,
    held: Option<OwnedSemaphorePermit>,
}

impl BodyShare {
    fn held(&self) -> usize {
        self.held
            .as_ref()
            .map_or(0, OwnedSemaphorePermit::num_permits)
    }

    /// Takes `bytes` more: 413 when this body alone would pass the whole budget, 503 `busy`
    /// when it does not fit now beside the other requests' bodies (nothing waits).
    fn grow(&mut self, bytes: usize) -> Result<(), ApiError> {
        let wanted = self.held().saturating_add(bytes);
        if wanted > self.limit {
            return Err(ApiError::too_large_decoded(wanted, self.limit));
        }
        // `wanted` is within the budget, which fits a u32 (see `body_memory_permits`).
        let bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
        let more = Arc::clone(&self.memory)
            .try_acquire_many_owned(bytes)
            .map_err(|_| {
                ApiError::busy("too many large request bodies at once; retry shortly".into())
            })?;
        match &mut self.held {
            Some(held) => held.merge(more),
            None => self.held = Some(more),
        }
        Ok(())
    }

    /// Gives back what the request holds past `bytes`.
    fn shrink_to(&mut self, bytes: usize) {
        if let Some(held) = &mut self.held {
            let freed = held.num_permits().saturating_sub(bytes);
            drop(held.split(freed));
        }
    }
}

/// The budget of body memory as semaphore permits: `try_acquire_many` counts in u32.
fn body_memory_permits(bytes: usize) -> usize {
    bytes.min(u32::MAX as usize)
}

/// What a decoded body holds, in the measure of [`Event::decoded_len`](ksync_core::Event::decoded_len).
trait DecodedLen {
    fn decoded_len(&self) -> usize;
}

impl DecodedLen for PushRequest {
    fn decoded_len(&self) -> usize {
        let spare = self.events.capacity() - self.events.len();
        std::mem::size_of::<Self>()
            + self.events.iter().map(Event::decoded_len).sum::<usize>()
            + spare * std::mem::size_of::<Event>()
            + self.log_id.as_ref().map_or(0, String::len)
    }
}

impl DecodedLen for MergeRequest {
    fn decoded_len(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.into.len()
            + self.from.len()
            + self.merge_id.as_ref().map_or(0, String::len)
    }
}

impl DecodedLen for CreateBranchRequest {
    fn decoded_len(&self) -> usize {
        std::mem::size_of::<Self>() + self.name.len() + self.from.as_ref().map_or(0, String::len)
    }
}

impl std::fmt::Debug for GitServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitServer")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// Errors of [`GitServer`]'s own methods (the HTTP handlers turn them into status codes).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The repository does not exist.
    #[error("repository {0:?} not found")]
    RepoNotFound(String),
    /// The branch does not exist.
    #[error("branch {0:?} not found")]
    BranchNotFound(String),
    /// The storage failed.
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
}

/// A branch's log and its fork record.
type BranchLog = (Arc<dyn Storage>, ForkRecord);

/// A branch's record (`git.branch` in its log's metadata), written once when the branch is
/// made. A field this build does not know is a newer service's (it may restrict the branch):
/// the branch is refused (500, the record named) rather than served as if it were absent.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ForkRecord {
    forked_from: Option<String>,
    forked_at: Option<u64>,
    /// The branch log's id (`BranchInfo::log_id`), made with the branch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    log_id: Option<String>,
}

/// A new branch log's id: random, so that a branch made again never takes an old one's.
fn new_log_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// 409 `branch_reset` when the client's cursors count in another log than the branch's
/// (`given`: the `logId` it sent). Without it a client whose branch was made again pulls from
/// its old cursor, skipping the new branch's first events, once the branch has grown past it.
fn check_log(branch: &Name, record: &ForkRecord, given: Option<&str>) -> Result<(), ApiError> {
    match (given, record.log_id.as_deref()) {
        (Some(given), Some(ours)) if given != ours => Err(ApiError::new(
            StatusCode::CONFLICT,
            "branch_reset",
            format!(
                "branch \"{branch}\" is another log ({ours}) than the one this client synced \
                 with ({given}): it was reset or made again; clone it again"
            ),
        )),
        _ => Ok(()),
    }
}

impl GitServer {
    /// A service over `provider`, checking credentials with `auth`, with default limits.
    pub fn new(provider: Arc<dyn StorageProvider>, auth: Arc<dyn Authenticator>) -> Self {
        Self::with_config(provider, auth, GitServerConfig::default())
    }

    /// A service with explicit limits.
    pub fn with_config(
        provider: Arc<dyn StorageProvider>,
        auth: Arc<dyn Authenticator>,
        mut config: GitServerConfig,
    ) -> Self {
        // A page of nothing would stall every pull and merge (and `clamp(1, 0)` panics).
        config.max_page = config.max_page.max(1);
        let body_memory = Arc::new(Semaphore::new(body_memory_permits(
            config.body_memory_bytes,
        )));
        let pushes = PerClientCounts::new(config.max_pushes_per_client);
        let merges = PerClientCounts::new(config.max_merges_per_client);
        Self {
            inner: Arc::new(Inner {
                provider,
                auth,
                config,
                create_lock: tokio::sync::Mutex::new(()),
                open_logs: std::sync::Mutex::new(std::collections::VecDeque::new()),
                body_memory,
                pushes,
                merges,
                merge_locks: (0..MERGE_LOCK_STRIPES)
                    .map(|_| tokio::sync::Mutex::new(()))
                    .collect(),
            }),
        }
    }

    /// The lock a merge into `into` of `repo` holds from its first read of `into`'s merge
    /// records to its answer. Two merges into one branch at once both began at the same
    /// length of it and took each other's appends for their own (a pair's events and
    /// collisions reported twice, the collisions then settled by both clients). Striped:
    /// bounded, nothing to clean up; merges into branches sharing a stripe wait their turn.
    fn merge_lock(&self, repo: &Name, into: &Name) -> &tokio::sync::Mutex<()> {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::hash::DefaultHasher::new();
        (repo.as_str(), into.as_str()).hash(&mut hasher);
        let stripes = &self.inner.merge_locks;
        // The modulo keeps it below the stripes' count, a usize.
        &stripes[(hasher.finish() % stripes.len() as u64) as usize]
    }

    /// A place among the pushes in flight of the client behind `grant` from `peer` (`peer`
    /// alone without auth), or 429 `too_many_pushes`. `None`: clients cannot be told apart.
    fn push_place(
        &self,
        grant: &Grant,
        peer: Option<SocketAddr>,
    ) -> Result<Option<ClientPlace>, ApiError> {
        self.place(&self.inner.pushes, grant, peer, "too_many_pushes", "pushes")
    }

    /// A place among the merges and branch creations in flight of the client, as
    /// [`push_place`](Self::push_place), or 429 `too_many_merges`.
    fn merge_place(
        &self,
        grant: &Grant,
        peer: Option<SocketAddr>,
    ) -> Result<Option<ClientPlace>, ApiError> {
        let what = "merges and branch creations";
        self.place(&self.inner.merges, grant, peer, "too_many_merges", what)
    }

    fn place(
        &self,
        counts: &Arc<PerClientCounts>,
        grant: &Grant,
        peer: Option<SocketAddr>,
        code: &'static str,
        what: &str,
    ) -> Result<Option<ClientPlace>, ApiError> {
        let Some(client) = ClientId::new(grant, self.inner.auth.required(), peer.map(|p| p.ip()))
        else {
            return Ok(None);
        };
        let Some(place) = counts.take(client.clone()) else {
            let cap = counts.cap();
            tracing::info!(%client, cap, "git: {what} refused: the client has {cap} in flight");
            return Err(ApiError {
                retry_after: Some("1"),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    code,
                    format!("too many {what} in flight for this client (at most {cap})"),
                )
            });
        };
        Ok(Some(place))
    }

    /// The routes, all under `/git/{repo}` (see `docs/PROTOCOL.md`). Merge it into the
    /// server's router; serve with `into_make_service_with_connect_info::<SocketAddr>()` so
    /// failed logins are counted per client address.
    pub fn router(&self) -> Router {
        // Every answer under `/git` is a JSON error body when it is an error, also for a path
        // or a method the service does not have (axum's own 404 and 405 have empty bodies).
        let routes = Router::new()
            .route(
                "/git/{repo}",
                get(repo_info).put(create_repo).fallback(no_method),
            )
            .route(
                "/git/{repo}/branches",
                get(list_branches).post(create_branch).fallback(no_method),
            )
            .route(
                "/git/{repo}/branches/{branch}",
                get(branch_info).fallback(no_method),
            )
            .route(
                "/git/{repo}/branches/{branch}/events",
                get(pull).post(push).fallback(no_method),
            )
            .route("/git/{repo}/merge", post(merge).fallback(no_method))
            .route("/git/{repo}/{*rest}", any(no_path))
            .with_state(self.clone());
        routes.layer(axum::middleware::from_fn(protocol_version))
    }

    /// Creates repository `repo` with an empty `main` branch. Returns `false` when it already
    /// existed (nothing changes then). For servers that create repositories from their config.
    pub async fn create_repo(&self, repo: &Name) -> Result<bool, ServerError> {
        let _guard = self.inner.create_lock.lock().await;
        let main = branch_log(repo, &default_branch());
        let storage = {
            let main = main.clone();
            self.off_workers(move |s| s.inner.provider.open(&main))
                .await?
        };
        self.used(&main);
        if storage.meta(BRANCH_META)?.is_some() {
            return Ok(false);
        }
        let record = ForkRecord {
            log_id: Some(new_log_id()),
            ..ForkRecord::default()
        };
        let record =
            serde_json::to_string(&record).map_err(|e| StorageError::Codec(e.to_string()))?;
        storage.set_meta(BRANCH_META, &record).await?;
        Ok(true)
    }

    /// Notes that `name` was just opened (or used): it becomes the most recently used, and the
    /// least recently used logs past `max_open_branches` are released, except those still in
    /// use (a request holds them), which are tried again at the next calls. The list may pass
    /// the bound by the logs in use (bounded by the requests in flight), or, with a provider
    /// that never closes a log (in memory), hold every branch (as that provider does).
    fn used(&self, name: &LogName) {
        let mut open = self
            .inner
            .open_logs
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(at) = open.iter().position(|n| n == name) {
            open.remove(at);
        }
        open.push_back(name.clone());
        let mut excess = open
            .len()
            .saturating_sub(self.inner.config.max_open_branches);
        let mut at = 0;
        // A few tries per call: logs in use, or a provider that keeps every log (in memory),
        // must not make every request walk the whole list.
        let mut tries = 8;
        // Never the one just used (last): its caller holds it.
        while excess > 0 && tries > 0 && at + 1 < open.len() {
            tries -= 1;
            let Some(candidate) = open.get(at).cloned() else {
                break;
            };
            self.inner.provider.release(&candidate);
            if self.inner.provider.opened(&candidate).is_none() {
                open.remove(at);
                excess -= 1;
            } else {
                at += 1;
            }
        }
    }

    /// The names of the branch logs of `repo` that the provider holds.
    fn branch_names(&self, repo: &Name) -> Result<Vec<Name>, ServerError> {
        Ok(self
            .inner
            .provider
            .list()?
            .into_iter()
            .filter_map(|name| match name {
                LogName::Branch { repo: r, branch } if &r == repo => Some(branch),
                _ => None,
            })
            .collect())
    }

    /// The repository's branches, sorted by name.
    pub fn branches(&self, repo: &Name) -> Result<Vec<BranchInfo>, ServerError> {
        if self.branch(repo, &default_branch())?.is_none() {
            return Err(ServerError::RepoNotFound(repo.to_string()));
        }
        let mut out = Vec::new();
        for branch in self.branch_names(repo)? {
            if let Some((storage, record)) = self.branch(repo, &branch)? {
                out.push(info(&branch, storage.as_ref(), record));
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Runs `work` on the blocking pool. Use it for anything that may open a branch log, or
    /// reads a page of one: a log not open is replayed as it opens (about 3 s a million events
    /// from disk), a page is up to `max_page_bytes` read from disk, and on a runtime worker
    /// that held up every other request and WebSocket room scheduled there (a listing of 1,000
    /// branches past `max_open_branches`: ~2 s, measured on a real server).
    async fn off_workers<T, E>(
        &self,
        work: impl FnOnce(&GitServer) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StorageError> + Send + 'static,
    {
        let service = self.clone();
        on_blocking_pool(move || work(&service)).await
    }

    /// [`branches`](Self::branches), off the runtime's workers (it opens every branch log).
    async fn branches_off_workers(&self, repo: &Name) -> Result<Vec<BranchInfo>, ServerError> {
        let repo = repo.clone();
        self.off_workers(move |s| s.branches(&repo)).await
    }

    fn branch(&self, repo: &Name, branch: &Name) -> Result<Option<BranchLog>, StorageError> {
        let name = branch_log(repo, branch);
        let Some(storage) = self.inner.provider.existing(&name)? else {
            return Ok(None);
        };
        self.used(&name);
        // A log without its record is a branch whose creation did not finish.
        let Some(raw) = storage.meta(BRANCH_META)? else {
            return Ok(None);
        };
        let record = serde_json::from_str(&raw).map_err(|e| {
            StorageError::Format(format!(
                "branch record of {repo}/{branch} (damaged, or written by a newer ksync): {e}"
            ))
        })?;
        Ok(Some((storage, record)))
    }

    /// The branch's storage, or 404 (repository or branch, whichever is missing); opened off
    /// the runtime's workers (see [`off_workers`](Self::off_workers)).
    async fn existing_branch(&self, repo: &Name, branch: &Name) -> Result<BranchLog, ApiError> {
        let (repo, branch) = (repo.clone(), branch.clone());
        self.off_workers(move |s| s.existing_branch_now(&repo, &branch))
            .await
    }

    /// [`existing_branch`](Self::existing_branch) on the calling thread.
    fn existing_branch_now(&self, repo: &Name, branch: &Name) -> Result<BranchLog, ApiError> {
        if let Some(found) = self.branch(repo, branch)? {
            return Ok(found);
        }
        if branch.as_str() != DEFAULT_BRANCH && self.branch(repo, &default_branch())?.is_some() {
            Err(ApiError::branch_not_found(repo, branch))
        } else {
            Err(ApiError::repo_not_found(repo))
        }
    }

    fn authorize(
        &self,
        headers: &HeaderMap,
        peer: Option<SocketAddr>,
        repo: &Name,
        access: Access,
    ) -> Result<Grant, ApiError> {
        let credentials = credentials(headers);
        let grant = self
            .inner
            .auth
            .authenticate_peer(&credentials, peer.map(|p| p.ip()))
            .map_err(ApiError::auth)?;
        if !grant.allows(ResourceKind::Repo, repo.as_str(), access) {
            tracing::debug!(subject = %grant.subject, %repo, ?access, "git: access refused");
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "{} may not {} repository \"{repo}\"",
                    grant.subject,
                    match access {
                        Access::Read => "read",
                        Access::Write => "write",
                    }
                ),
            ));
        }
        Ok(grant)
    }

    /// Reads, decompresses (when `Content-Encoding: gzip`) and parses a JSON body, with the
    /// request's share of the body memory (`GitServerConfig::body_memory_bytes`), to be held
    /// as long as the body is.
    async fn body<T: serde::de::DeserializeOwned + DecodedLen>(
        &self,
        req: Request,
    ) -> Result<(T, BodyShare), ApiError> {
        let limit = self.inner.config.max_body_bytes;
        let gzipped = match req.headers().get(header::CONTENT_ENCODING) {
            None => false,
            Some(v) if v.as_bytes().eq_ignore_ascii_case(b"gzip") => true,
            Some(v) if v.as_bytes().eq_ignore_ascii_case(b"identity") => false,
            Some(v) => {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_encoding",
                    format!(
                        "Content-Encoding {:?} is not supported (use gzip or none)",
                        String::from_utf8_lossy(v.as_bytes())
                    ),
                ));
            }
        };
        // The body counts against the budget as it arrives, not only once read: bodies being
        // received were up to `max_git_requests` × `max_body_bytes` (4 GiB by default).
        let mut share = self.body_share();
        let mut raw = Vec::new();
        let mut incoming = req.into_body();
        while let Some(frame) = incoming.frame().await {
            let frame = frame.map_err(|e| body_error(&e, limit))?;
            let Ok(data) = frame.into_data() else {
                // Trailers: nothing to read.
                continue;
            };
            if raw.len().saturating_add(data.len()) > limit {
                return Err(ApiError::too_large(limit));
            }
            share.grow(data.len())?;
            raw.extend_from_slice(&data);
        }
        let unpacked;
        let plain: &[u8] = if gzipped {
            unpacked = gunzip(&raw, limit).map_err(|e| match e {
                GunzipError::TooLarge { .. } => ApiError::too_large(limit),
                GunzipError::Corrupt(e) => {
                    ApiError::new(StatusCode::BAD_REQUEST, "malformed_body", e.to_string())
                }
            })?;
            &unpacked
        } else {
            &raw
        };
        // The text (and its gzip form) is held while it is decoded, beside the values.
        let unpacked_len = if gzipped { plain.len() } else { 0 };
        let malformed = |e: serde_json::Error| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed_body",
                format!("request body is not valid JSON for this endpoint: {e}"),
            )
        };
        share.grow(unpacked_len.saturating_add(decoded_bound(plain).map_err(malformed)?))?;
        let body: T = from_json(plain).map_err(malformed)?;
        share.shrink_to(body.decoded_len());
        Ok((body, share))
    }

    /// An empty share of the body memory, for one request's body to grow.
    fn body_share(&self) -> BodyShare {
        BodyShare {
            memory: Arc::clone(&self.inner.body_memory),
            limit: body_memory_permits(self.inner.config.body_memory_bytes),
            held: None,
        }
    }

    fn respond<T: Serialize>(&self, status: StatusCode, headers: &HeaderMap, body: &T) -> Response {
        match serde_json::to_vec(body) {
            Ok(json) => self.respond_json(status, headers, json),
            Err(e) => ApiError::internal(e.to_string()).into_response(),
        }
    }

    /// Answers with an already encoded JSON body (gzip-compressed when the client accepts it
    /// and it is large enough).
    fn respond_json(&self, status: StatusCode, headers: &HeaderMap, json: Vec<u8>) -> Response {
        let gzip_ok = headers
            .get(header::ACCEPT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .is_some_and(accepts_gzip);
        let mut response = if gzip_ok && json.len() >= self.inner.config.compress_min_bytes {
            let mut r = Response::new(Body::from(gzip(&json)));
            r.headers_mut()
                .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            r
        } else {
            Response::new(Body::from(json))
        };
        *response.status_mut() = status;
        let h = response.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
        response
    }
}

/// Refuses requests announcing another protocol version; stamps ours on every answer, the
/// refusal too: it is the one a client of another version reads to learn which one we speak.
async fn protocol_version(req: Request, next: axum::middleware::Next) -> Response {
    let ours = ksync_core::PROTOCOL_VERSION.to_string();
    let mut response = match req.headers().get(PROTOCOL_HEADER) {
        Some(theirs) if theirs.as_bytes() != ours.as_bytes() => ApiError::new(
            StatusCode::BAD_REQUEST,
            "unsupported_protocol",
            format!(
                "this server speaks protocol version {ours}, the request announces {:?}",
                String::from_utf8_lossy(theirs.as_bytes())
            ),
        )
        .into_response(),
        _ => next.run(req).await,
    };
    if let Ok(value) = HeaderValue::from_str(&ours) {
        response.headers_mut().insert(PROTOCOL_HEADER, value);
    }
    response
}

fn default_branch() -> Name {
    // A constant that satisfies the name rules.
    Name::new(DEFAULT_BRANCH).unwrap_or_else(|_| unreachable!("\"main\" is a valid name"))
}

fn branch_log(repo: &Name, branch: &Name) -> LogName {
    LogName::Branch {
        repo: repo.clone(),
        branch: branch.clone(),
    }
}

fn info(name: &Name, storage: &dyn Storage, record: ForkRecord) -> BranchInfo {
    BranchInfo {
        name: name.to_string(),
        server_version: storage.len(),
        forked_from: record.forked_from,
        forked_at: record.forked_at,
        log_id: record.log_id,
    }
}

/// Credentials from `Authorization: Bearer ..` and `X-Api-Key: ..`.
fn credentials(headers: &HeaderMap) -> Credentials {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim().to_owned())
        })
        .filter(|t| !t.is_empty());
    let api_key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_owned())
        .filter(|k| !k.is_empty());
    Credentials { bearer, api_key }
}

fn peer_of(req: &Request) -> Option<SocketAddr> {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
}

/// An error response: `{"error":{"code","message"}}` with its status.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// The `WWW-Authenticate` challenge of a 401 (RFC 9110 11.6.1 requires one).
    challenge: Option<String>,
    /// The `Retry-After` of a 503 `busy`.
    retry_after: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            challenge: None,
            retry_after: None,
        }
    }

    /// 503 `busy` with `Retry-After: 1`, as the server's load shedding of repository requests
    /// answers (`ksync-server`'s `max_git_requests`), so clients handle both alike.
    fn busy(message: String) -> Self {
        Self {
            retry_after: Some("1"),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "busy", message)
        }
    }

    fn repo_not_found(repo: &Name) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "repo_not_found",
            format!("repository \"{repo}\" does not exist"),
        )
    }

    fn branch_not_found(repo: &Name, branch: &Name) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "branch_not_found",
            format!("branch \"{branch}\" does not exist in repository \"{repo}\""),
        )
    }

    fn body_incomplete() -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_incomplete",
            "the request body stopped arriving before it was complete",
        )
    }

    fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body exceeds the limit of {limit} bytes; push smaller batches"),
        )
    }

    /// 413 for a body that would decode to more than all bodies in flight may take.
    fn too_large_decoded(bytes: usize, limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "request body would take up to {bytes} bytes decoded, more than the {limit} \
                 the server allows all bodies in flight; push smaller batches"
            ),
        )
    }

    fn internal(message: String) -> Self {
        tracing::error!(%message, "git: internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    fn auth(e: AuthError) -> Self {
        let status = match e {
            AuthError::Forbidden(_) => StatusCode::FORBIDDEN,
            AuthError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            _ => StatusCode::UNAUTHORIZED,
        };
        let code = match status {
            StatusCode::FORBIDDEN => "forbidden",
            StatusCode::TOO_MANY_REQUESTS => "rate_limited",
            _ => "unauthorized",
        };
        Self {
            challenge: e.www_authenticate(),
            ..Self::new(status, code, e.to_string())
        }
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        match e {
            // The client's to change (another name), not the service's failure.
            StorageError::NameClash { .. } => {
                ApiError::new(StatusCode::CONFLICT, "name_taken", e.to_string())
            }
            // A new repository past the provider's cap on stored ones: nothing was created.
            StorageError::TooManyLogs { max, .. } => ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "too_many_repos",
                format!("too many repositories stored (at most {max})"),
            ),
            // The operator's to fix, the client's to retry later; unlike a failing disk.
            e if e.is_storage_full() => {
                tracing::error!(error = %e, "storage full");
                ApiError::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "storage_full",
                    "the server's storage is full; retry later",
                )
            }
            e => ApiError::internal(format!("storage: {e}")),
        }
    }
}

impl From<ServerError> for ApiError {
    fn from(e: ServerError) -> Self {
        match e {
            ServerError::RepoNotFound(r) => ApiError::new(
                StatusCode::NOT_FOUND,
                "repo_not_found",
                format!("repository {r:?} does not exist"),
            ),
            ServerError::BranchNotFound(b) => ApiError::new(
                StatusCode::NOT_FOUND,
                "branch_not_found",
                format!("branch {b:?} does not exist"),
            ),
            ServerError::Storage(e) => e.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
            },
        };
        let json = serde_json::to_vec(&body).unwrap_or_default();
        let mut response = Response::new(Body::from(json));
        *response.status_mut() = self.status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(challenge) = self.challenge.and_then(|c| HeaderValue::from_str(&c).ok()) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, challenge);
        }
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static(seconds));
        }
        response
    }
}

fn name(kind: &str, raw: &str) -> Result<Name, ApiError> {
    Name::new(raw).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_name",
            format!("invalid {kind} name {raw:?}: {e}"),
        )
    })
}

/// Validates the `{repo}/{branch}` of a request path (400 before anything else is looked at).
fn repo_path(path: Result<Path<String>, PathRejection>) -> Result<Name, ApiError> {
    let Path(repo) = path.map_err(path_error)?;
    name("repository", &repo)
}

fn branch_path(
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<(Name, Name), ApiError> {
    let Path((repo, branch)) = path.map_err(path_error)?;
    Ok((name("repository", &repo)?, name("branch", &branch)?))
}

fn path_error(e: PathRejection) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_path", e.body_text())
}

/// `?since=N&limit=M`, both optional non-negative integers.
/// `since`, `limit` and `logId` of a pull.
fn pull_query(query: Option<&str>) -> Result<(u64, Option<usize>, Option<String>), ApiError> {
    let mut since = 0;
    let mut limit = None;
    let mut log_id = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let bad = || {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed_query",
                format!("{key}={value:?} is not a non-negative integer"),
            )
        };
        match key {
            "since" => since = value.parse().map_err(|_| bad())?,
            // Any larger limit is cut to the cap anyway, also one too large for a `usize`.
            "limit" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                limit = Some(value.parse().unwrap_or(usize::MAX));
            }
            "limit" => return Err(bad()),
            // Ids are made of `[0-9a-f]`: nothing to decode.
            "logId" => log_id = Some(value.to_owned()),
            _ => {}
        }
    }
    Ok((since, limit, log_id))
}

type Handled = Result<Response, ApiError>;

/// A path under `/git/{repo}/` that is none of the service's endpoints.
async fn no_path(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!(
            "no endpoint {} (see the Git-like HTTP section of PROTOCOL.md)",
            req.uri().path()
        ),
    )
}

/// An endpoint asked with a method it does not have.
async fn no_method(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} does not answer {}", req.uri().path(), req.method()),
    )
}

async fn create_repo(
    State(s): State<GitServer>,
    path: Result<Path<String>, PathRejection>,
    req: Request,
) -> Handled {
    let repo = repo_path(path)?;
    let grant = s.authorize(req.headers(), peer_of(&req), &repo, Access::Write)?;
    let created = s.create_repo(&repo).await?;
    if created {
        tracing::info!(%repo, subject = %grant.subject, "git: repository created");
    }
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let body = RepoInfo {
        repo: repo.to_string(),
        default_branch: DEFAULT_BRANCH.into(),
        branches: s.branches_off_workers(&repo).await?,
    };
    Ok(s.respond(status, req.headers(), &body))
}

async fn repo_info(
    State(s): State<GitServer>,
    path: Result<Path<String>, PathRejection>,
    req: Request,
) -> Handled {
    let repo = repo_path(path)?;
    s.authorize(req.headers(), peer_of(&req), &repo, Access::Read)?;
    let body = RepoInfo {
        repo: repo.to_string(),
        default_branch: DEFAULT_BRANCH.into(),
        branches: s.branches_off_workers(&repo).await?,
    };
    Ok(s.respond(StatusCode::OK, req.headers(), &body))
}

#[derive(Serialize)]
struct BranchList {
    branches: Vec<BranchInfo>,
}

async fn list_branches(
    State(s): State<GitServer>,
    path: Result<Path<String>, PathRejection>,
    req: Request,
) -> Handled {
    let repo = repo_path(path)?;
    s.authorize(req.headers(), peer_of(&req), &repo, Access::Read)?;
    let body = BranchList {
        branches: s.branches_off_workers(&repo).await?,
    };
    Ok(s.respond(StatusCode::OK, req.headers(), &body))
}

async fn branch_info(
    State(s): State<GitServer>,
    path: Result<Path<(String, String)>, PathRejection>,
    req: Request,
) -> Handled {
    let (repo, branch) = branch_path(path)?;
    s.authorize(req.headers(), peer_of(&req), &repo, Access::Read)?;
    let (storage, record) = s.existing_branch(&repo, &branch).await?;
    let body = info(&branch, storage.as_ref(), record);
    Ok(s.respond(StatusCode::OK, req.headers(), &body))
}

async fn create_branch(
    State(s): State<GitServer>,
    path: Result<Path<String>, PathRejection>,
    req: Request,
) -> Handled {
    let repo = repo_path(path)?;
    let headers = req.headers().clone();
    let grant = s.authorize(&headers, peer_of(&req), &repo, Access::Write)?;
    // Before the body is read, as for pushes.
    let _place = s.merge_place(&grant, peer_of(&req))?;
    let (request, _body_memory) = s.body::<CreateBranchRequest>(req).await?;
    let new = name("branch", &request.name)?;
    let from = name("branch", request.from.as_deref().unwrap_or(DEFAULT_BRANCH))?;
    let _guard = s.inner.create_lock.lock().await;
    let (source, _) = s.existing_branch(&repo, &from).await?;
    let head = source.len();
    let at = request.at.unwrap_or(head);
    if at > head {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "version_ahead",
            format!("cannot fork \"{from}\" at version {at}: it is at version {head}"),
        ));
    }
    let found = {
        let (repo, new) = (repo.clone(), new.clone());
        s.off_workers(move |s| s.branch(&repo, &new)).await?
    };
    if let Some((storage, record)) = found {
        if record.forked_from.as_deref() == Some(from.as_str()) && record.forked_at == Some(at) {
            let body = info(&new, storage.as_ref(), record);
            return Ok(s.respond(StatusCode::OK, &headers, &body));
        }
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "branch_exists",
            format!("branch \"{new}\" already exists in repository \"{repo}\""),
        ));
    }
    let target_name = branch_log(&repo, &new);
    // Logs and not finished branches are counted: a log whose creation did not finish holds
    // its copy on disk too. Its own (a retry finishing it) is not one more.
    let branches = s
        .branch_names(&repo)?
        .into_iter()
        .filter(|branch| *branch != new)
        .count();
    let max = s.inner.config.max_branches_per_repo;
    if branches >= max {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "too_many_branches",
            format!("repository \"{repo}\" has {branches} branches, the most it may have ({max})"),
        ));
    }
    let target = {
        let name = target_name.clone();
        s.off_workers(move |s| s.inner.provider.open(&name)).await?
    };
    s.used(&target_name);
    // Copy the prefix. Re-running after a crash is safe: the copy deduplicates, and the branch
    // exists only once its record is written.
    let mut copied = target.len();
    while copied < at {
        let want = usize::try_from(at - copied)
            .unwrap_or(COPY_PAGE)
            .min(COPY_PAGE);
        let page =
            read_page_off_workers(&source, copied, want, s.inner.config.max_page_bytes).await?;
        let Some(last) = page.last() else { break };
        copied = last.seq;
        target
            .append(page.into_iter().map(|s| s.event).collect())
            .await?;
    }
    let record = ForkRecord {
        forked_from: Some(from.to_string()),
        forked_at: Some(at),
        log_id: Some(new_log_id()),
    };
    let raw = serde_json::to_string(&record).map_err(|e| ApiError::internal(e.to_string()))?;
    target.set_meta(BRANCH_META, &raw).await?;
    tracing::info!(%repo, branch = %new, %from, at, subject = %grant.subject, "git: branch created");
    let body = info(&new, target.as_ref(), record);
    Ok(s.respond(StatusCode::CREATED, &headers, &body))
}

async fn pull(
    State(s): State<GitServer>,
    path: Result<Path<(String, String)>, PathRejection>,
    req: Request,
) -> Handled {
    let (repo, branch) = branch_path(path)?;
    let (since, limit, log_id) = pull_query(req.uri().query())?;
    s.authorize(req.headers(), peer_of(&req), &repo, Access::Read)?;
    let (storage, record) = s.existing_branch(&repo, &branch).await?;
    check_log(&branch, &record, log_id.as_deref())?;
    let server_version = storage.len();
    if since > server_version {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "version_ahead",
            format!(
                "since={since} is past branch \"{branch}\"'s version {server_version}: the \
                 branch was reset or recreated; clone it again"
            ),
        ));
    }
    let limit = limit
        .unwrap_or(s.inner.config.default_page)
        .clamp(1, s.inner.config.max_page);
    // No further than the version reported with the page, so the two agree.
    let count = usize::try_from(server_version - since).map_or(limit, |left| left.min(limit));
    let span = PageSpan {
        since,
        count,
        bytes: s.inner.config.max_page_bytes,
    };
    // Off the runtime's workers: a page is up to `max_page_bytes` read (from disk, for a file
    // log) and encoded, which held up every request and WebSocket room scheduled there.
    let log_id = record.log_id;
    let json = s
        .off_workers(move |_| pull_page(storage.as_ref(), span, server_version, log_id.as_deref()))
        .await?;
    Ok(s.respond_json(StatusCode::OK, req.headers(), json))
}

/// Events encoded per storage visit: the in-memory storage holds its lock while a visit runs,
/// so a page is encoded in slices that leave room for appends in between.
const ENCODE_SLICE: usize = 1000;
/// Events in a page's first visit, before their size is known: a visit reads (decodes, for a
/// file log) every event it covers, also those past the byte budget, so slices after it are
/// sized by the events seen so far.
const FIRST_SLICE: usize = 64;

/// Events in the first read of a fork's or a merge's page, before their size is known:
/// `read_since` returns every event it reads decoded (a 64-event first read of 1 MiB
/// `[0,0,...]` events, 16 MiB each decoded, held 1 GiB), so it starts with one.
const FIRST_COPY_READ: usize = 1;

/// How many events the next read of a page takes, after `read` events that measured `measured`
/// bytes: `first` before any size is known, then as many as the rest of `budget` holds at the
/// average size so far, plus one (the event that fills it).
fn sized_read(read: usize, measured: usize, budget: usize, first: usize) -> usize {
    match measured.checked_div(read) {
        Some(per_event) => budget.saturating_sub(measured) / per_event.max(1) + 1,
        None => first,
    }
}

/// The events after `after`: up to `count` of them, and about `budget` bytes of them decoded
/// ([`Event::decoded_len`], at least one event). One page of a
/// fork's copy or of a merge: those pages are held decoded (and appended whole), so they are
/// bounded by their memory rather than by their count, and read in slices sized as a pull
/// page's are.
fn read_page(
    storage: &dyn Storage,
    after: u64,
    count: usize,
    budget: usize,
) -> Result<Vec<Stored>, StorageError> {
    let mut page: Vec<Stored> = Vec::new();
    let mut measured: usize = 0;
    while page.len() < count && measured < budget {
        let fits = sized_read(page.len(), measured, budget, FIRST_COPY_READ);
        let want = (count - page.len()).min(fits);
        let slice = storage.read_since(page.last().map_or(after, |s| s.seq), want)?;
        let ended = slice.len() < want;
        measured = slice
            .iter()
            .fold(measured, |sum, s| sum.saturating_add(s.event.decoded_len()));
        page.extend(slice);
        if ended {
            break;
        }
    }
    Ok(page)
}

/// [`read_page`] on the blocking pool (as [`GitServer::off_workers`]): a page is up to
/// `budget` bytes read (from disk, for a file log) and decoded, which on a runtime worker held
/// up every request and WebSocket room scheduled there.
async fn read_page_off_workers(
    storage: &Arc<dyn Storage>,
    after: u64,
    count: usize,
    budget: usize,
) -> Result<Vec<Stored>, StorageError> {
    let storage = Arc::clone(storage);
    on_blocking_pool(move || read_page(storage.as_ref(), after, count, budget)).await
}

/// Runs storage `work` on the blocking pool (see [`GitServer::off_workers`]); a panic in it
/// is a storage error, not a panic of the request's task.
async fn on_blocking_pool<T, E>(
    work: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, E>
where
    T: Send + 'static,
    E: From<StorageError> + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|panicked| {
            Err(E::from(StorageError::Io {
                context: "storage work off the runtime's workers panicked".into(),
                source: std::io::Error::other(panicked.to_string()),
            }))
        })
}

/// Which events a pull page may hold: after `since`, up to `count` events and `bytes` of
/// encoded events (at least one event).
#[derive(Debug, Clone, Copy)]
struct PageSpan {
    since: u64,
    count: usize,
    bytes: usize,
}

/// A [`PullResponse`](crate::wire::PullResponse) of the events `span` allows, encoded straight
/// from the storage (no copies of the events).
fn pull_page(
    storage: &dyn Storage,
    span: PageSpan,
    server_version: u64,
    log_id: Option<&str>,
) -> Result<Vec<u8>, ApiError> {
    let PageSpan {
        since,
        count,
        bytes: budget,
    } = span;
    // ~200-300 bytes per typical event; the Vec grows past a wrong guess.
    let mut json = Vec::with_capacity((count.min(ENCODE_SLICE * 16) * 256).min(budget) + 96);
    json.extend_from_slice(b"{\"since\":");
    json.extend_from_slice(since.to_string().as_bytes());
    json.extend_from_slice(b",\"events\":[");
    let first = json.len();
    let mut read = 0;
    let mut failed = None;
    let mut full = false;
    while read < count && !full {
        let written = json.len() - first;
        let fits = sized_read(read, written, budget, FIRST_SLICE);
        let want = (count - read).min(ENCODE_SLICE).min(fits);
        let mut taken = 0;
        let visited = storage.visit_since(since + read as u64, want, &mut |_, event| {
            if failed.is_some() || full {
                return;
            }
            let mark = json.len();
            if json.len() > first {
                json.push(b',');
            }
            if let Err(e) = write_event(&mut json, event) {
                failed = Some(e);
                return;
            }
            if json.len() - first > budget && read + taken > 0 {
                // Over the budget: this event starts the next page.
                json.truncate(mark);
                full = true;
                return;
            }
            taken += 1;
        })?;
        if let Some(e) = failed {
            return Err(ApiError::internal(format!("encoding events: {e}")));
        }
        read += taken;
        if visited < want {
            break;
        }
    }
    let end = since + read as u64;
    json.extend_from_slice(b"],\"serverVersion\":");
    json.extend_from_slice(server_version.to_string().as_bytes());
    json.extend_from_slice(b",\"next\":");
    if end < server_version {
        json.extend_from_slice(end.to_string().as_bytes());
    } else {
        json.extend_from_slice(b"null");
    }
    if let Some(log_id) = log_id {
        json.extend_from_slice(b",\"logId\":");
        // Escaped like any string (ids made here are hex; older records may hold anything).
        serde_json::to_writer(&mut json, log_id)
            .map_err(|e| ApiError::internal(format!("encoding the log id: {e}")))?;
    }
    json.push(b'}');
    Ok(json)
}

async fn push(
    State(s): State<GitServer>,
    path: Result<Path<(String, String)>, PathRejection>,
    req: Request,
) -> Handled {
    let (repo, branch) = branch_path(path)?;
    let headers = req.headers().clone();
    let grant = s.authorize(&headers, peer_of(&req), &repo, Access::Write)?;
    // Before the body is read: a client's pushes wait for their bodies holding places.
    let _place = s.push_place(&grant, peer_of(&req))?;
    let (storage, record) = s.existing_branch(&repo, &branch).await?;
    let (request, _body_memory) = s.body::<PushRequest>(req).await?;
    check_log(&branch, &record, request.log_id.as_deref())?;
    for (index, event) in request.events.iter().enumerate() {
        // The event rules every part applies (no looser or stricter ones here: an event
        // another replica took and this service refused would stall its pushes for ever).
        event.validate(&EventLimits::default()).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_event",
                format!("event {index} ({:?}): {e}", event.id),
            )
        })?;
    }
    let before = storage.len();
    if request.base_version > before {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "version_ahead",
            format!(
                "baseVersion {} is past branch \"{branch}\"'s version {before}: the branch was \
                 reset or recreated; clone it again",
                request.base_version
            ),
        ));
    }
    let batch_len = request.events.len();
    // The events are not needed back: the storage may move them in rather than copy them.
    let outcome = storage.append_summary(request.events).await?;
    // The branch is what the client had plus its batch when every event sits right after
    // `baseVersion`, in order: stored now, or already (a push sent again after its answer was
    // lost, or by a client killed before it recorded the answer, which then counted its own
    // events as the server's for ever, until it pulled them).
    let in_place = batch_len > 0
        && outcome.outcomes.iter().enumerate().all(|(index, o)| {
            let seq = match o {
                AppendOutcome::Appended { seq } | AppendOutcome::Duplicate { seq } => *seq,
                AppendOutcome::Conflict(_) => return false,
            };
            (index as u64)
                .checked_add(1)
                .and_then(|n| request.base_version.checked_add(n))
                == Some(seq)
        });
    let fast_forward_to = in_place
        .then(|| request.base_version.checked_add(batch_len as u64))
        .flatten();
    let mut rejected = Vec::new();
    for (index, o) in outcome.outcomes.into_iter().enumerate() {
        if let AppendOutcome::Conflict(conflict) = o {
            rejected.push(RejectedEvent {
                index,
                conflict: *conflict,
            });
        }
    }
    let body = PushResponse {
        server_version: storage.len(),
        appended: outcome.appended as u64,
        duplicates: outcome.duplicates as u64,
        rejected,
        fast_forward_to,
        log_id: record.log_id,
    };
    tracing::debug!(%repo, %branch, appended = body.appended, duplicates = body.duplicates,
        rejected = body.rejected.len(), "git: push");
    Ok(s.respond(StatusCode::OK, &headers, &body))
}

async fn merge(
    State(s): State<GitServer>,
    path: Result<Path<String>, PathRejection>,
    req: Request,
) -> Handled {
    let repo = repo_path(path)?;
    let headers = req.headers().clone();
    let grant = s.authorize(&headers, peer_of(&req), &repo, Access::Write)?;
    // Before the body is read, as for pushes.
    let _place = s.merge_place(&grant, peer_of(&req))?;
    let (request, _body_memory) = s.body::<MergeRequest>(req).await?;
    let into_name = name("branch", &request.into)?;
    let from_name = name("branch", &request.from)?;
    if into_name == from_name {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "same_branch",
            format!("cannot merge branch \"{into_name}\" into itself"),
        ));
    }
    if let Some(id) = request.merge_id.as_deref()
        && !valid_merge_id(id)
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_body",
            "mergeId must be 1 to 64 letters, digits or '-'",
        ));
    }
    let _merging = s.merge_lock(&repo, &into_name).lock().await;
    let (into, _) = s.existing_branch(&repo, &into_name).await?;
    let (from, _) = s.existing_branch(&repo, &from_name).await?;
    let answer_key = format!("{MERGE_ANSWER_META_PREFIX}{from_name}");
    if let Some(id) = request.merge_id.as_deref()
        && let Some(raw) = into.meta(&answer_key)?
        && let Ok(last) = serde_json::from_str::<MergeAnswer>(&raw)
        && last.merge_id == id
    {
        tracing::info!(%repo, into = %into_name, from = %from_name, "git: merge answered again");
        let body = last.replay(into.as_ref(), from.as_ref())?;
        return Ok(s.respond(StatusCode::OK, &headers, &body));
    }
    let cursor_key = format!("{MERGED_META_PREFIX}{from_name}");
    let start = MergeCursor::parse(into.meta(&cursor_key)?.as_deref());
    // Where this merge (this `mergeId`) began storing, kept before it stores anything, so that
    // a retry after a lost answer counts what it stored as appended (see
    // `MERGE_PENDING_META_PREFIX`). Only for a merge that will read something: a no-op merge
    // writes nothing.
    let mut stored_after = None;
    if let Some(id) = request.merge_id.as_deref()
        && start.at < from.len()
    {
        let pending_key = format!("{MERGE_PENDING_META_PREFIX}{from_name}");
        let retried = into.meta(&pending_key)?.and_then(|raw| {
            let (pending, after) = raw.split_once(' ')?;
            (pending == id).then(|| after.parse::<u64>().ok())?
        });
        stored_after = Some(match retried {
            Some(after) => after,
            None => {
                let after = into.len();
                into.set_meta(&pending_key, &format!("{id} {after}"))
                    .await?;
                after
            }
        });
    }
    let limits = AnswerLimits {
        conflicts: s.inner.config.max_page,
        bytes: s.inner.config.max_page_bytes,
    };
    let (body, cursor) = merge_page(
        into.as_ref(),
        &from,
        MergeStart {
            cursor: start,
            stored_after,
        },
        limits,
        s.inner.config.max_page_bytes,
    )
    .await?;
    // A merge that read nothing writes nothing: metadata records are appended to the log (a
    // file log never compacts), so every no-op merge grew it. Its answer need not be kept
    // either: it reports no collision, so a retry that merges afresh loses none.
    let moved = cursor != start;
    // Before the cursor moves past the collisions: a crash in between leaves them to be
    // reported again by the next merge, never by none.
    if let Some(merge_id) = request.merge_id.filter(|_| moved) {
        let answer = MergeAnswer {
            merge_id,
            appended: body.appended,
            duplicates: body.duplicates,
            server_version: body.server_version,
            from_version: body.from_version,
            conflicts: body
                .conflicts
                .iter()
                .map(|c| (c.conflict.theirs.id.clone(), c.conflict.theirs.version))
                .collect(),
            next: body.next,
        };
        let raw = serde_json::to_string(&answer).map_err(|e| ApiError::internal(e.to_string()))?;
        into.set_meta(&answer_key, &raw).await?;
    }
    // The cursor is recorded after the events: a merge cut short is redone, and the redone part
    // deduplicates.
    if moved {
        into.set_meta(&cursor_key, &cursor.to_meta()).await?;
    }
    // Done: a retry under this id is answered from the answer kept above (or, had nothing
    // moved, stored nothing to count), so the pending record is dead weight in every replay.
    // A failure to remove it is a 500: the retry gets the kept answer.
    if stored_after.is_some() {
        into.remove_meta(&format!("{MERGE_PENDING_META_PREFIX}{from_name}"))
            .await?;
    }
    tracing::info!(%repo, into = %into_name, from = %from_name, appended = body.appended,
        conflicts = body.conflicts.len(), next = ?body.next, "git: merge");
    Ok(s.respond(StatusCode::OK, &headers, &body))
}

/// `into`'s merge cursor for one `from` branch (metadata `git.merged.<from>`): `from` is
/// merged up to `at`. Written as `at`, or `at until after upto` with a [`Carry`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct MergeCursor {
    at: u64,
    carry: Option<Carry>,
}

/// Events that a merge page stored past the collision it stopped before: a batch is appended
/// whole, and the page can end only where its answer is full, inside the batch. They are in
/// `into` at `(after, upto]`, and the next pages read them again from `from` (up to `until`),
/// where they are duplicates of what the merge itself stored, counted as appended then (they
/// were not counted before). Without it a merge's counts would depend on where its pages end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Carry {
    until: u64,
    after: u64,
    upto: u64,
}

impl MergeCursor {
    /// A record as [`MergeCursor::to_meta`] writes it; none, or an unreadable one, is the
    /// start (merging again from there only finds duplicates).
    fn parse(raw: Option<&str>) -> Self {
        let numbers: Option<Vec<u64>> =
            raw.and_then(|r| r.split(' ').map(|n| n.parse().ok()).collect());
        match numbers.as_deref() {
            Some(&[at]) => Self { at, carry: None },
            Some(&[at, until, after, upto]) => Self {
                at,
                carry: Some(Carry { until, after, upto }),
            },
            _ => Self::default(),
        }
    }

    fn to_meta(self) -> String {
        match self.carry {
            None => self.at.to_string(),
            Some(c) => format!("{} {} {} {}", self.at, c.until, c.after, c.upto),
        }
    }

    /// Whether `into`'s event at `seq` is one the merge stored before it was read again.
    fn carried(&self, seq: u64) -> bool {
        self.carry.is_some_and(|c| c.after < seq && seq <= c.upto)
    }
}

/// The JSON length of a merge answer's collision: both revisions and the text around them
/// (`{"conflict":{"type":"concurrent-edit","ours":..,"theirs":..},"latestVersion":N},`).
fn conflict_json_len(conflict: &Conflict) -> usize {
    conflict.ours.json_len() + conflict.theirs.json_len() + 96
}

/// Where a merge page starts: `into`'s merge cursor, and for a merge retried under the same
/// `mergeId` after its answer was not kept, `into`'s length before its first try (its
/// duplicates past it are what that try stored: counted as appended).
#[derive(Debug, Clone, Copy)]
struct MergeStart {
    cursor: MergeCursor,
    stored_after: Option<u64>,
}

/// How much one merge answer may hold.
#[derive(Debug, Clone, Copy)]
struct AnswerLimits {
    /// Collisions.
    conflicts: usize,
    /// Bytes of collisions, as JSON.
    bytes: usize,
}

/// One page of a merge of `from` into `into` from `cursor`: appends what `into` lacks until
/// `from`'s end, or until the answer is full (it ends before the collision that would take it
/// past either limit, unless that is its first). `from` is read in batches of about
/// `read_budget` bytes decoded (see [`read_page`]). Returns the answer (`next` set when it
/// ended early) and the cursor to record.
async fn merge_page(
    into: &dyn Storage,
    from: &Arc<dyn Storage>,
    start: MergeStart,
    limits: AnswerLimits,
    read_budget: usize,
) -> Result<(MergeResponse, MergeCursor), ApiError> {
    let mut cursor = start.cursor;
    let stored_before = |seq: u64| start.stored_after.is_some_and(|after| seq > after);
    let target = from.len();
    let mut body = MergeResponse::default();
    let mut bytes: usize = 0;
    while cursor.at < target && body.next.is_none() {
        // While events stored past an earlier page's end are read again, batches end where
        // they do: there every event of `from` is in `into` (or collides), so no batch there
        // appends anything, and a page that ends there leaves a single carry.
        let end = match cursor.carry {
            Some(carry) if carry.until > cursor.at => carry.until.min(target),
            _ => target,
        };
        let want = usize::try_from(end - cursor.at)
            .unwrap_or(COPY_PAGE)
            .min(COPY_PAGE);
        let batch = read_page_off_workers(from, cursor.at, want, read_budget).await?;
        let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
            break;
        };
        let (first, last) = (first.seq, last.seq);
        let outcome = into
            .append_summary(batch.into_iter().map(|s| s.event).collect())
            .await?;
        let mut outcomes = outcome.outcomes.into_iter().enumerate();
        let mut cut = None;
        for (index, o) in outcomes.by_ref() {
            match o {
                AppendOutcome::Appended { .. } => body.appended += 1,
                AppendOutcome::Duplicate { seq } if cursor.carried(seq) || stored_before(seq) => {
                    body.appended += 1
                }
                AppendOutcome::Duplicate { .. } => body.duplicates += 1,
                AppendOutcome::Conflict(conflict) => {
                    let len = conflict_json_len(&conflict);
                    let full = body.conflicts.len() >= limits.conflicts
                        || bytes.saturating_add(len) > limits.bytes;
                    if full && !body.conflicts.is_empty() {
                        cut = Some(index as u64);
                        break;
                    }
                    bytes += len;
                    let latest_version = into
                        .latest(&conflict.ours.id)?
                        .map_or(conflict.ours.version, |l| l.event.version);
                    body.conflicts.push(MergeConflict {
                        conflict: *conflict,
                        latest_version,
                    });
                }
            }
        }
        let Some(index) = cut else {
            cursor.at = last;
            if cursor.carry.is_some_and(|c| c.until <= cursor.at) {
                cursor.carry = None;
            }
            continue;
        };
        // The page ends before the collision that did not fit; what the batch stored past it
        // is carried (see `Carry`).
        cursor.at = first + index - 1;
        body.next = Some(cursor.at);
        let stored: Vec<u64> = outcomes
            .filter_map(|(_, o)| match o {
                AppendOutcome::Appended { seq } => Some(seq),
                _ => None,
            })
            .collect();
        if let (Some(&low), Some(&high)) = (stored.first(), stored.last()) {
            // Appends are in order and alone on the log: the stored events are `low..=high`.
            let fresh = Carry {
                until: last,
                after: low - 1,
                upto: high,
            };
            // A batch that stores something starts past any carry's `until` (see above), so an
            // older carry is gone by then; should one not be, both are kept as one range.
            cursor.carry = Some(match cursor.carry {
                Some(old) => Carry {
                    until: old.until.max(fresh.until),
                    after: old.after.min(fresh.after),
                    upto: old.upto.max(fresh.upto),
                },
                None => fresh,
            });
        }
    }
    body.server_version = into.len();
    body.from_version = cursor.at;
    Ok((body, cursor))
}

/// Why a request body could not be read: over `limit` (413), or it stopped arriving (408:
/// the server's body timeout, or the client went away mid-body).
fn body_error(error: &axum::Error, limit: usize) -> ApiError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if e.is::<http_body_util::LengthLimitError>() {
            return ApiError::too_large(limit);
        }
        cause = e.source();
    }
    ApiError::body_incomplete()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_from_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer  abc "),
        );
        h.insert("x-api-key", HeaderValue::from_static("k1"));
        let c = credentials(&h);
        assert_eq!(c.bearer.as_deref(), Some("abc"));
        assert_eq!(c.api_key.as_deref(), Some("k1"));
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic dXNlcg=="),
        );
        assert!(credentials(&h).is_empty());
    }

    #[tokio::test]
    async fn encoded_pages_are_pull_responses() {
        use ksync_core::{Event, InMemoryStorage};
        let storage = InMemoryStorage::new();
        let events: Vec<Event> = (0..2500)
            .map(|i| Event::new(format!("e{i}"), "t", serde_json::json!({"i": i}), i))
            .collect();
        storage.append(events.clone()).await.expect("append");
        for (since, count, next) in [(0, 2500, None), (10, 1200, Some(1210)), (2400, 500, None)] {
            let span = PageSpan {
                since,
                count,
                bytes: usize::MAX,
            };
            let body = pull_page(&storage, span, 2500, Some("a\"b")).expect("encode");
            let page: crate::wire::PullResponse =
                serde_json::from_slice(&body).expect("a PullResponse");
            let from = usize::try_from(since).expect("small");
            let read = usize::try_from(next.unwrap_or(2500) - since).expect("small");
            assert_eq!(page.events, events[from..from + read]);
            assert_eq!(
                (page.since, page.server_version, page.next),
                (since, 2500, next)
            );
            assert_eq!(page.log_id.as_deref(), Some("a\"b"));
        }
        let span = PageSpan {
            since: 2500,
            count: 10,
            bytes: usize::MAX,
        };
        let body = pull_page(&storage, span, 2500, None).expect("encode");
        assert_eq!(
            body,
            br#"{"since":2500,"events":[],"serverVersion":2500,"next":null}"#
        );
    }

    /// A page stops before the event that would take its events past the byte budget, and
    /// holds at least one event, however large.
    #[tokio::test]
    async fn pages_stop_at_the_byte_budget() {
        use ksync_core::{Event, InMemoryStorage};
        let storage = InMemoryStorage::new();
        let mut events: Vec<Event> = (0..300)
            .map(|i| Event::new(format!("e{i}"), "t", serde_json::json!("x".repeat(100)), 1))
            .collect();
        events[150] = Event::new("big", "t", serde_json::json!("y".repeat(5000)), 1);
        storage.append(events.clone()).await.expect("append");
        let budget = 1000;
        let mut since = 0;
        let mut got = Vec::new();
        while since < 300 {
            let span = PageSpan {
                since,
                count: 1000,
                bytes: budget,
            };
            let body = pull_page(&storage, span, 300, None).expect("encode");
            let page: crate::wire::PullResponse =
                serde_json::from_slice(&body).expect("a PullResponse");
            let n = page.events.len();
            assert!(n >= 1);
            let events_json = serde_json::to_vec(&page.events).expect("json").len();
            assert!(
                events_json <= budget + 2 || n == 1,
                "{events_json} bytes in {n}"
            );
            let end = since + n as u64;
            assert_eq!(page.next, (end < 300).then_some(end));
            // Not cut short: the next event would not have fitted.
            if let Some(next) = page.next {
                let mut more = page.events.clone();
                more.push(events[usize::try_from(next).expect("small")].clone());
                assert!(serde_json::to_vec(&more).expect("json").len() > budget + 2);
            }
            since += n as u64;
            got.extend(page.events);
        }
        assert_eq!(got, events);
    }

    #[test]
    fn merge_cursors_are_written_and_read_back() {
        let plain = MergeCursor {
            at: 12,
            carry: None,
        };
        let carried = MergeCursor {
            at: 12,
            carry: Some(Carry {
                until: 40,
                after: 100,
                upto: 128,
            }),
        };
        for cursor in [MergeCursor::default(), plain, carried] {
            assert_eq!(MergeCursor::parse(Some(&cursor.to_meta())), cursor);
        }
        // Written before merges were paged: a plain number.
        assert_eq!(MergeCursor::parse(Some("12")), plain);
        for unreadable in [
            None,
            Some(""),
            Some("x"),
            Some("1 2"),
            Some("-1"),
            Some("1 2 3 4 5"),
        ] {
            assert_eq!(MergeCursor::parse(unreadable), MergeCursor::default());
        }
        assert!(carried.carried(101) && carried.carried(128));
        assert!(!carried.carried(100) && !carried.carried(129) && !plain.carried(101));
    }

    #[test]
    fn query_parsing() {
        assert_eq!(pull_query(None).expect("ok"), (0, None, None));
        assert_eq!(
            pull_query(Some("since=5&limit=10&x=y&logId=ab12")).expect("ok"),
            (5, Some(10), Some("ab12".to_owned()))
        );
        assert!(pull_query(Some("since=-1")).is_err());
        assert!(pull_query(Some("limit=abc")).is_err());
        assert!(pull_query(Some("limit=")).is_err());
        assert!(pull_query(Some("limit=+5")).is_err());
        assert_eq!(
            pull_query(Some("limit=99999999999999999999999")).expect("capped later"),
            (0, Some(usize::MAX), None)
        );
    }
}
