//! Slow storage work in the service must not hold up its other requests: a repository with
//! more branches than the service keeps open (listing them reopens and replays the released
//! logs), a branch slow to open, and a slow read of a pull page.

use crate::common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use ksync_core::{InMemoryProvider, LogName, Name, Storage, StorageError, StorageProvider};
use ksync_git::server::{GitServer, GitServerConfig};
use serde_json::json;

/// An in-memory provider whose `existing` of one log waits until the test lets it go, as
/// the reopen of a released file log does while it replays (a listing of 1,000 branches,
/// past `max_open_branches`, spent ~2 s in them on a real server).
struct SlowOpen {
    inner: InMemoryProvider,
    slow: LogName,
    /// Whether the open of `slow` is slow yet (not while the test sets up).
    armed: AtomicBool,
    /// Told when the slow open starts.
    reached: Mutex<mpsc::Sender<()>>,
    /// Ends the slow open (a message, or the sender dropped); bounded by a timeout too.
    release: Mutex<mpsc::Receiver<()>>,
}

impl StorageProvider for SlowOpen {
    fn open(&self, name: &LogName) -> Result<Arc<dyn Storage>, StorageError> {
        self.inner.open(name)
    }

    fn existing(&self, name: &LogName) -> Result<Option<Arc<dyn Storage>>, StorageError> {
        if *name == self.slow && self.armed.load(Ordering::SeqCst) {
            let _ = self.reached.lock().expect("lock").send(());
            let _ = self
                .release
                .lock()
                .expect("lock")
                .recv_timeout(Duration::from_secs(30));
        }
        self.inner.existing(name)
    }

    fn list(&self) -> Result<Vec<LogName>, StorageError> {
        self.inner.list()
    }
}

/// The service on a runtime of its own with one thread, as a server whose workers are all
/// busy: work that blocks it leaves nothing to answer anything else.
fn serve_on_one_thread(
    provider: Arc<dyn StorageProvider>,
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let (addr_tx, addr_rx) = mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let service = GitServer::with_config(
                provider,
                Arc::new(common::TestAuth),
                GitServerConfig::default(),
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            addr_tx
                .send(listener.local_addr().expect("addr"))
                .expect("addr");
            let app = service
                .router()
                .into_make_service_with_connect_info::<SocketAddr>();
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stop_rx.await;
                })
                .await
                .expect("serve");
        });
    });
    (addr_rx.recv().expect("server address"), stop_tx)
}

/// While `slow_request` (a GET) is in the slow open of branch `big/b1`, another request is
/// answered; then `slow_request` is answered 200. Returns its body.
async fn another_request_is_answered_during(slow_request: &str) -> serde_json::Value {
    let (reached_tx, reached) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    let provider = Arc::new(SlowOpen {
        inner: InMemoryProvider::new(),
        slow: LogName::Branch {
            repo: Name::new("big").expect("name"),
            branch: Name::new("b1").expect("name"),
        },
        armed: AtomicBool::new(false),
        reached: Mutex::new(reached_tx),
        release: Mutex::new(release_rx),
    });
    let (addr, stop) = serve_on_one_thread(Arc::clone(&provider) as Arc<dyn StorageProvider>);
    let http = common::http();
    let url = |path: &str| format!("http://{addr}{path}");
    for repo in ["big", "small"] {
        let (status, body) = common::call(http.put(url(&format!("/git/{repo}")))).await;
        assert_eq!(status, 201, "{body}");
    }
    for branch in ["b0", "b1", "b2"] {
        let (status, body) = common::call(
            http.post(url("/git/big/branches"))
                .json(&json!({"name": branch})),
        )
        .await;
        assert_eq!(status, 201, "{body}");
    }
    provider.armed.store(true, Ordering::SeqCst);

    let slow = tokio::spawn(common::call(http.get(url(slow_request))));
    tokio::task::spawn_blocking(move || reached.recv_timeout(Duration::from_secs(10)))
        .await
        .expect("wait")
        .expect("the request reached the slow open");
    // Answered while the slow request is still in its slow open: the timeout only ends the
    // test if it is not (the server then waits for the release below).
    let other = tokio::time::timeout(
        Duration::from_secs(5),
        common::call(http.get(url("/git/small"))),
    )
    .await;
    let _ = release.send(());
    let (status, body) = other.expect("another request answered during the slow open");
    assert_eq!(status, 200, "{body}");
    let (status, body) = slow.await.expect("slow request");
    assert_eq!(status, 200, "{body}");
    let _ = stop.send(());
    body
}

/// A listing of a repository's branches opens every branch log (reopening and replaying the
/// ones released past `max_open_branches`): while one of those opens is slow, another request
/// is answered. The listing runs off the runtime's workers; on one, it held up every request
/// there (and, in `ksync serve`, every WebSocket room) for as long as it took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_branch_listing_does_not_hold_up_other_requests() {
    let body = another_request_is_answered_during("/git/big/branches").await;
    assert_eq!(body["branches"].as_array().map(Vec::len), Some(4));
}

/// The same for one branch: a pull of a branch whose log is not open replays it as it opens
/// (seconds for millions of events), which on a runtime worker held up every other request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_of_a_branch_slow_to_open_does_not_hold_up_other_requests() {
    let body = another_request_is_answered_during("/git/big/branches/b1/events?since=0").await;
    assert_eq!(body["events"].as_array().map(Vec::len), Some(0), "{body}");
}

/// A log whose reads wait, once armed, until the test lets them go: a page read from a file
/// log whose pages are not cached (up to 8 MiB read and decoded) on a slow disk.
struct SlowReads {
    log: Arc<dyn Storage>,
    armed: Arc<AtomicBool>,
    reached: Arc<Mutex<mpsc::Sender<()>>>,
    release: Arc<Mutex<mpsc::Receiver<()>>>,
}

impl Storage for SlowReads {
    fn append(
        &self,
        events: Vec<ksync_core::Event>,
    ) -> ksync_core::BoxFuture<'_, Result<ksync_core::MergeOutcome, StorageError>> {
        self.log.append(events)
    }
    fn read_since(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<ksync_core::Stored>, StorageError> {
        if self.armed.swap(false, Ordering::SeqCst) {
            let _ = self.reached.lock().expect("lock").send(());
            let _ = self
                .release
                .lock()
                .expect("lock")
                .recv_timeout(Duration::from_secs(30));
        }
        self.log.read_since(after, limit)
    }
    fn get(&self, id: &str, version: u64) -> Result<Option<ksync_core::Stored>, StorageError> {
        self.log.get(id, version)
    }
    fn latest(&self, id: &str) -> Result<Option<ksync_core::Stored>, StorageError> {
        self.log.latest(id)
    }
    fn len(&self) -> u64 {
        self.log.len()
    }
    fn state(&self) -> Result<std::collections::BTreeMap<String, ksync_core::Event>, StorageError> {
        self.log.state()
    }
    fn meta(&self, key: &str) -> Result<Option<String>, StorageError> {
        self.log.meta(key)
    }
    fn set_meta(
        &self,
        key: &str,
        value: &str,
    ) -> ksync_core::BoxFuture<'_, Result<(), StorageError>> {
        self.log.set_meta(key, value)
    }
    fn remove_meta(&self, key: &str) -> ksync_core::BoxFuture<'_, Result<(), StorageError>> {
        self.log.remove_meta(key)
    }
}

/// An in-memory provider whose logs are [`SlowReads`] sharing one switch and one gate.
struct SlowReadsProvider {
    inner: InMemoryProvider,
    armed: Arc<AtomicBool>,
    reached: Arc<Mutex<mpsc::Sender<()>>>,
    release: Arc<Mutex<mpsc::Receiver<()>>>,
}

impl SlowReadsProvider {
    fn wrap(&self, log: Arc<dyn Storage>) -> Arc<dyn Storage> {
        Arc::new(SlowReads {
            log,
            armed: Arc::clone(&self.armed),
            reached: Arc::clone(&self.reached),
            release: Arc::clone(&self.release),
        })
    }
}

impl StorageProvider for SlowReadsProvider {
    fn open(&self, name: &LogName) -> Result<Arc<dyn Storage>, StorageError> {
        Ok(self.wrap(self.inner.open(name)?))
    }
    fn existing(&self, name: &LogName) -> Result<Option<Arc<dyn Storage>>, StorageError> {
        Ok(self.inner.existing(name)?.map(|log| self.wrap(log)))
    }
    fn list(&self) -> Result<Vec<LogName>, StorageError> {
        self.inner.list()
    }
}

/// A pull page is read from the branch log (up to 8 MiB, from disk for a file log): while
/// that read is slow, another request is answered. The read ran on the runtime worker once
/// the branch was open, holding up every request (and WebSocket room) scheduled there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_page_read_does_not_hold_up_other_requests() {
    let (reached_tx, reached) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    let armed = Arc::new(AtomicBool::new(false));
    let provider = Arc::new(SlowReadsProvider {
        inner: InMemoryProvider::new(),
        armed: Arc::clone(&armed),
        reached: Arc::new(Mutex::new(reached_tx)),
        release: Arc::new(Mutex::new(release_rx)),
    });
    let (addr, stop) = serve_on_one_thread(provider as Arc<dyn StorageProvider>);
    let http = common::http();
    let url = |path: &str| format!("http://{addr}{path}");
    for repo in ["big", "small"] {
        let (status, body) = common::call(http.put(url(&format!("/git/{repo}")))).await;
        assert_eq!(status, 201, "{body}");
    }
    let (status, body) = common::call(http.post(url("/git/big/branches/main/events")).json(
        &json!({"baseVersion": 0, "events": [
            {"id": "a", "type": "t", "data": 1, "timestamp": 1, "version": 1}
        ]}),
    ))
    .await;
    assert_eq!(status, 200, "{body}");
    armed.store(true, Ordering::SeqCst);

    let slow = tokio::spawn(common::call(
        http.get(url("/git/big/branches/main/events?since=0")),
    ));
    tokio::task::spawn_blocking(move || reached.recv_timeout(Duration::from_secs(10)))
        .await
        .expect("wait")
        .expect("the pull reached the slow read");
    // Answered while the pull is still in its slow read: the timeout only ends the test if
    // it is not (the server then waits for the release below).
    let other = tokio::time::timeout(
        Duration::from_secs(5),
        common::call(http.get(url("/git/small"))),
    )
    .await;
    let _ = release.send(());
    let (status, body) = other.expect("another request answered during the slow read");
    assert_eq!(status, 200, "{body}");
    let (status, body) = slow.await.expect("slow request");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["events"].as_array().map(Vec::len), Some(1), "{body}");
    let _ = stop.send(());
}
