//! The client's own storage failing, or held up, in the middle of a pull or a push: what was
//! stored (here or on the server) is reported once, also when the pull or push fails or is
//! cut short.

use crate::common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ksync_core::{
    AutoSync, BoxFuture, Event, InMemoryStorage, KSync, MergeOutcome, PullPushClient, Storage,
    StorageError, Stored, SyncClient,
};
use ksync_git::GitSyncClient;
use ksync_testkit::{FailAppend, MetaHook};
use serde_json::json;

use common::{Server, branch_events, call, http, start};

/// A pull brings a new event `y` and a revision of `x` that conflicts with ours. Writing the
/// revision that settles the conflict fails, after `y` was stored: the pull fails, but `y`
/// is reported (`event` and `sync`) all the same, as the next pull finds it a duplicate and
/// reports it no more. That next pull settles the conflict.
#[tokio::test]
async fn a_pull_whose_resolution_cannot_be_written_reports_what_it_stored() {
    let server = theirs_on_main().await;

    let storage = Arc::new(FailAppend::new(
        Arc::new(InMemoryStorage::new()),
        // The revision settling the conflict over `x`.
        |events| events.iter().any(|e| e.id == "x" && e.version == 2),
    ));
    let ksync = ksync_testkit::ksync_over(storage.clone(), common::client(&server.repo_url("r")))
        .await
        .expect("ksync");
    let replica = ksync.replica();
    replica
        .record_local(Event::new("x", "t", json!("mine"), 1).with_origin(replica.id()))
        .await
        .expect("local");
    let events = ksync_testkit::EventRecorder::new(ksync.client().notifier());
    let synced = ksync_testkit::SyncRecorder::new(ksync.client().notifier());

    let err = ksync
        .client()
        .pull()
        .await
        .expect_err("the resolution failed");
    assert!(storage.failed(), "the fault was met: {err}");
    let pulled = ksync.client().pull().await.expect("the second pull");
    assert_eq!(pulled.conflicts.len(), 1, "the second pull settles x");
    assert_eq!(
        replica
            .storage()
            .latest("x")
            .expect("read")
            .expect("x")
            .event
            .version,
        2
    );
    assert_eq!(events.ids(), ["y"], "y reported once");
    assert_eq!(synced.ids(), ["y"], "y synced once");
}

/// A storage whose first append of `x` version 2 (the revision settling a conflict over
/// `x`) waits until `open` is notified: a slow disk, long enough for the pull to be cut
/// short meanwhile.
struct Gate {
    log: InMemoryStorage,
    reached: AtomicBool,
    open: tokio::sync::Notify,
}

impl Storage for Gate {
    fn append(&self, events: Vec<Event>) -> BoxFuture<'_, Result<MergeOutcome, StorageError>> {
        Box::pin(async move {
            if events.iter().any(|e| e.id == "x" && e.version == 2)
                && !self.reached.swap(true, Ordering::SeqCst)
            {
                self.open.notified().await;
            }
            self.log.append(events).await
        })
    }
    fn read_since(&self, after: u64, limit: usize) -> Result<Vec<Stored>, StorageError> {
        self.log.read_since(after, limit)
    }
    fn remove_meta(&self, key: &str) -> BoxFuture<'_, Result<(), StorageError>> {
        self.log.remove_meta(key)
    }
    ksync_testkit::storage_pass_through!(log);
}

/// A server whose `r` `main` holds `y` (new here) and `x` version 1 from replica `them`.
async fn theirs_on_main() -> Server {
    let server = start(&["r"]).await;
    let (status, body) = call(
        http()
            .post(server.url("/git/r/branches/main/events"))
            .json(&json!({"baseVersion": 0, "events": [
                {"id": "y", "type": "t", "data": "new", "timestamp": 2, "version": 1, "origin": "them"},
                {"id": "x", "type": "t", "data": "theirs", "timestamp": 2, "version": 1, "origin": "them"},
            ]})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    server
}

/// A replica cut short in a pull, as `pull_held_at_the_resolution` leaves it.
struct HeldPull {
    ksync: KSync<GitSyncClient>,
    storage: Arc<Gate>,
    /// The `event` notifications, from before the pull.
    events: ksync_testkit::EventRecorder,
}

/// A replica over a [`Gate`] holding another `x` version 1, whose auto-sync pull of
/// `theirs_on_main` stored `y` and now waits to write the revision settling `x`; then
/// `disconnect` stops auto-sync, cutting that pull short. The gate is still closed.
async fn pull_held_at_the_resolution(server: &Server) -> HeldPull {
    let storage = Arc::new(Gate {
        log: InMemoryStorage::new(),
        reached: AtomicBool::new(false),
        open: tokio::sync::Notify::new(),
    });
    let ksync = ksync_testkit::ksync_over(storage.clone(), common::client(&server.repo_url("r")))
        .await
        .expect("ksync");
    // Before the pull: it reports events only when somebody listens.
    let events = ksync_testkit::EventRecorder::new(ksync.client().notifier());
    // Held here already, from a third replica.
    ksync
        .replica()
        .ingest(vec![
            Event::new("x", "t", json!("elsewhere"), 1).with_origin("other"),
        ])
        .await
        .expect("held");
    ksync.enable_auto_sync(AutoSync {
        push_interval: std::time::Duration::ZERO,
        pull_interval: std::time::Duration::from_secs(3600),
    });
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !storage.reached.load(Ordering::SeqCst) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pull never wrote the resolution"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    ksync.disconnect().await.expect("disconnect");
    HeldPull {
        ksync,
        storage,
        events,
    }
}

/// An auto-sync pull stops (`disconnect`) while it waits for the storage to write the
/// revision settling a conflict, after the page's new event `y` was stored. The page is
/// stored and settled all the same, `y` reported, and the page's cursor recorded: the next
/// pull does not bring it again (it found `y` a duplicate and reported it no more).
#[tokio::test]
async fn a_pull_cut_short_while_settling_a_conflict_reports_what_it_stored() {
    let server = theirs_on_main().await;
    let HeldPull {
        ksync,
        storage,
        events,
    } = pull_held_at_the_resolution(&server).await;
    storage.open.notify_one();

    let pulled = ksync.client().pull().await.expect("the next pull");
    assert!(
        pulled.conflicts.is_empty() && pulled.new_events.is_empty(),
        "pulled again: {pulled:?}"
    );
    let x = ksync
        .replica()
        .storage()
        .latest("x")
        .expect("read")
        .expect("x");
    assert_eq!(x.event.version, 2, "settled by the pull cut short");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while events.ids().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(events.ids(), ["y"], "y reported once");
}

/// A push whose batch the server took but whose cursor cannot be recorded (a full disk)
/// succeeds: the service holds the batch, which it reports (result and `sync`) once, with an
/// error notification that says so. The write is owed, and made before the next push, which
/// sends nothing again. The push failed, and the next one sent the batch again (the service
/// found it duplicates) and reported it a second time.
#[tokio::test]
async fn a_push_whose_cursor_cannot_be_recorded_succeeds_and_reports_its_batch_once() {
    let server = start(&["r"]).await;
    // The first write of a push cursor fails (a full disk), once.
    let storage = Arc::new(MetaHook::new(
        Arc::new(InMemoryStorage::new()),
        MetaHook::fail_once(|key| key.contains("pushed")),
    ));
    let ksync = ksync_testkit::ksync_over(storage.clone(), common::client(&server.repo_url("r")))
        .await
        .expect("ksync");
    let synced = ksync_testkit::SyncRecorder::new(ksync.client().notifier());
    let errors = ksync_testkit::ErrorRecorder::new(ksync.client().notifier());
    let event = ksync.emit("t", json!(1)).await.expect("emit");
    let pushed = ksync
        .client()
        .push()
        .await
        .expect("the service took the batch");
    assert_eq!(pushed.pushed_events, std::slice::from_ref(&event));
    assert_eq!(pushed.server_version, 1);
    assert_eq!(synced.ids(), std::slice::from_ref(&event.id), "synced once");
    let errors = errors.messages();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("the service stored the pushed events")
            && errors[0].contains("storage IO failed"),
        "{errors:?}"
    );

    let again = ksync.client().push().await.expect("the next push");
    assert!(again.pushed_events.is_empty(), "sent again: {again:?}");
    assert_eq!(
        synced.ids(),
        std::slice::from_ref(&event.id),
        "still synced once"
    );
    assert_eq!(branch_events(&server, "r", "main"), [event]);
    // Written by then: a client starting over this storage has nothing to push.
    let restarted = ksync_testkit::ksync_over(storage, common::client(&server.repo_url("r")))
        .await
        .expect("ksync");
    assert_eq!(
        restarted
            .client()
            .local_status()
            .expect("status")
            .pending_events,
        0
    );
}

/// A pull cut short while the storage settles a conflict (as above), then a checkout of
/// another branch: the pull's storing, which goes on by itself, ends before the checkout
/// hands the log over, so the revision it writes is the pulled branch's. Landed after the
/// checkout, it was the other branch's, and its next push sent it there.
#[tokio::test]
async fn a_checkout_after_a_pull_cut_short_waits_for_what_it_stores() {
    let server = theirs_on_main().await;
    let (status, body) = call(
        http()
            .post(server.url("/git/r/branches"))
            .json(&json!({"name": "b", "from": "main"})),
    )
    .await;
    assert!(status == 200 || status == 201, "{status} {body}");
    let HeldPull { ksync, storage, .. } = pull_held_at_the_resolution(&server).await;
    let client = Arc::clone(ksync.client());
    let mut checkout = tokio::spawn(async move { client.checkout("b").await });
    // Not an assertion: only gives a checkout that does not wait the time to finish first.
    let done = tokio::time::timeout(std::time::Duration::from_secs(1), &mut checkout).await;
    storage.open.notify_one();
    match done {
        Ok(joined) => joined.expect("joined").expect("checkout"),
        Err(_) => checkout.await.expect("joined").expect("checkout"),
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while ksync
        .replica()
        .storage()
        .latest("x")
        .ok()
        .flatten()
        .is_none_or(|x| x.event.version != 2)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the resolution is never stored"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    ksync.client().push().await.expect("push b");
    let on_b: Vec<(String, u64)> = branch_events(&server, "r", "b")
        .into_iter()
        .map(|e| (e.id, e.version))
        .collect();
    assert!(
        !on_b.contains(&("x".to_owned(), 2)),
        "main's resolution was pushed to b: {on_b:?}"
    );
}

/// The `since` of every pull request a [`paged_service`] got.
type Pulled = Arc<std::sync::Mutex<Vec<u64>>>;

/// An in-memory service with repository `r` whose pages hold two events, holding `e0` to
/// `e5` on `main`, recording the `since` of every pull; and its URL.
async fn paged_service(pulled: Pulled) -> (tokio::task::JoinHandle<()>, String) {
    use axum::extract::Request;
    use axum::middleware::Next;

    let config = {
        let mut git_config = ksync_git::server::GitServerConfig::default();
        git_config.max_page = 2;
        git_config
    };
    let service = ksync_git::server::GitServer::with_config(
        Arc::new(ksync_core::InMemoryProvider::new()),
        Arc::new(common::TestAuth),
        config,
    );
    service
        .create_repo(&ksync_core::Name::new("r").expect("name"))
        .await
        .expect("repo");
    let record = move |req: Request, next: Next| {
        let pulled = Arc::clone(&pulled);
        async move {
            if req.method() == axum::http::Method::GET && req.uri().path().ends_with("/events") {
                let since = req
                    .uri()
                    .query()
                    .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("since=")))
                    .and_then(|s| s.parse::<u64>().ok());
                pulled.lock().expect("lock").extend(since);
            }
            next.run(req).await
        }
    };
    let app = service.router().layer(axum::middleware::from_fn(record));
    let (addr, task) = common::serve_router(app).await;
    let url = format!("http://{addr}/git/r");
    let writer = common::client(&url);
    for n in 0..6 {
        writer
            .send(Event::new(format!("e{n}"), "t", json!(n), 1))
            .await
            .expect("send");
    }
    writer.push().await.expect("push");
    (task, url)
}

/// A storage whose first append holding `e2` waits until `open` is notified.
struct GateE2 {
    log: InMemoryStorage,
    reached: tokio::sync::Notify,
    open: tokio::sync::Notify,
    passed: AtomicBool,
}

impl Storage for GateE2 {
    fn append(&self, events: Vec<Event>) -> BoxFuture<'_, Result<MergeOutcome, StorageError>> {
        Box::pin(async move {
            if events.iter().any(|e| e.id == "e2") && !self.passed.swap(true, Ordering::SeqCst) {
                self.reached.notify_one();
                self.open.notified().await;
            }
            self.log.append(events).await
        })
    }
    fn read_since(&self, after: u64, limit: usize) -> Result<Vec<Stored>, StorageError> {
        self.log.read_since(after, limit)
    }
    fn remove_meta(&self, key: &str) -> BoxFuture<'_, Result<(), StorageError>> {
        self.log.remove_meta(key)
    }
    ksync_testkit::storage_pass_through!(log);
}

/// A pull cut short (a caller's timeout, `disconnect` stopping auto-sync) while it stores its
/// second page: the page is stored all the same, and its cursor with it, so the next pull asks
/// for the third page only. The cursor was written by the pull itself, after the storing, so
/// the next pull asked for the second page again.
#[tokio::test]
async fn a_pull_cut_short_while_storing_a_page_resumes_after_it() {
    let pulled = Pulled::default();
    let (_service, url) = paged_service(Arc::clone(&pulled)).await;
    let storage = Arc::new(GateE2 {
        log: InMemoryStorage::new(),
        reached: tokio::sync::Notify::new(),
        open: tokio::sync::Notify::new(),
        passed: AtomicBool::new(false),
    });
    let ksync = ksync_testkit::ksync_over(storage.clone(), common::client(&url))
        .await
        .expect("ksync");
    let synced = ksync_testkit::SyncRecorder::new(ksync.client().notifier());
    let client = Arc::clone(ksync.client());
    let pull = tokio::spawn(async move { client.pull().await });
    storage.reached.notified().await;
    pull.abort();
    assert!(pull.await.is_err_and(|e| e.is_cancelled()), "cut short");
    storage.open.notify_one();
    pulled.lock().expect("lock").clear();

    let again = ksync.client().pull().await.expect("the next pull");
    assert_eq!(*pulled.lock().expect("lock"), [4], "asked for");
    let ids: Vec<&str> = again.new_events.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["e4", "e5"]);
    assert_eq!(
        synced.batches(),
        [["e0", "e1"], ["e2", "e3"], ["e4", "e5"]],
        "each page synced once"
    );
}

/// A push whose cursor write fails leaves it owed; a `send` of another replica's event stored
/// behind that cursor moves the owed cursor back, so that once the storage takes it (not at
/// the next push: that one fails with the typed error) a push sends the event. `send` wrote
/// the owed cursor first and failed with it, and the owed cursor, written by the next push,
/// skipped the event for good.
#[tokio::test]
async fn a_send_behind_an_owed_push_cursor_is_pushed() {
    let server = start(&["r"]).await;
    let failures = Arc::new(std::sync::atomic::AtomicUsize::new(2));
    let hook = {
        let failures = Arc::clone(&failures);
        move |key: &str| -> BoxFuture<'static, Result<(), StorageError>> {
            let fail = key.contains("pushed")
                && failures
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
            Box::pin(async move {
                if fail {
                    return Err(StorageError::Io {
                        context: "meta".into(),
                        source: std::io::Error::other("disk full"),
                    });
                }
                Ok(())
            })
        }
    };
    let storage = Arc::new(MetaHook::new(
        Arc::new(InMemoryStorage::new()),
        Arc::new(hook),
    ));
    let ksync = ksync_testkit::ksync_over(storage, common::client(&server.repo_url("r")))
        .await
        .expect("ksync");
    let foreign = Event::new("foreign", "t", json!(0), 1).with_origin("other");
    ksync
        .replica()
        .ingest(vec![foreign.clone()])
        .await
        .expect("ingest");
    ksync.emit("t", json!(1)).await.expect("emit");
    ksync
        .client()
        .push()
        .await
        .expect("push: its cursor is owed");
    // Handed over to be sent on: behind the owed cursor.
    ksync.client().send(foreign.clone()).await.expect("send");
    // The owed write fails once more: the next push sends nothing.
    let err = ksync
        .client()
        .push()
        .await
        .expect_err("the owed cursor is refused again");
    assert!(
        matches!(
            ksync_git::GitError::of(&err),
            Some(ksync_git::GitError::CursorNotRecorded { .. })
        ),
        "{err}"
    );
    assert_eq!(failures.load(Ordering::SeqCst), 0, "both faults were met");
    ksync.client().push().await.expect("push");
    assert!(
        branch_events(&server, "r", "main")
            .iter()
            .any(|e| e.id == "foreign"),
        "the forwarded event was pushed"
    );
}

/// A `send` of an event stored behind the push cursor whose moving back the storage refuses
/// (the value is owed): `local_status` counts from there, as the next push sends. It read the stored cursor, past the event, and said nothing was
/// pending until the next operation wrote the owed value.
#[tokio::test]
async fn local_status_counts_an_event_behind_an_owed_push_cursor() {
    let server = start(&["r"]).await;
    let armed = Arc::new(AtomicBool::new(false));
    let hook = {
        let armed = Arc::clone(&armed);
        move |key: &str| -> BoxFuture<'static, Result<(), StorageError>> {
            let fail = key.contains("pushed") && armed.swap(false, Ordering::SeqCst);
            Box::pin(async move {
                if fail {
                    return Err(StorageError::Io {
                        context: "meta".into(),
                        source: std::io::Error::other("disk full"),
                    });
                }
                Ok(())
            })
        }
    };
    let storage = Arc::new(MetaHook::new(
        Arc::new(InMemoryStorage::new()),
        Arc::new(hook),
    ));
    let ksync = ksync_testkit::ksync_over(storage, common::client(&server.repo_url("r")))
        .await
        .expect("ksync");
    let foreign = Event::new("foreign", "t", json!(0), 1).with_origin("other");
    ksync
        .replica()
        .ingest(vec![foreign.clone()])
        .await
        .expect("ingest");
    ksync.emit("t", json!(1)).await.expect("emit");
    ksync.client().push().await.expect("push");
    assert_eq!(
        ksync
            .client()
            .local_status()
            .expect("status")
            .pending_events,
        0
    );
    armed.store(true, Ordering::SeqCst);
    let err = ksync
        .client()
        .send(foreign.clone())
        .await
        .expect_err("moving the push cursor back is refused");
    assert!(
        matches!(
            ksync_git::GitError::of(&err),
            Some(ksync_git::GitError::CursorNotRecorded { .. })
        ),
        "{err}"
    );
    // From the owed cursor, as the next push goes (and as when the write succeeds): the
    // forwarded event and the one after it, which the service then finds it holds.
    assert_eq!(
        ksync
            .client()
            .local_status()
            .expect("status")
            .pending_events,
        2,
        "the forwarded event waits for a push"
    );
    let pushed = ksync.client().push().await.expect("push");
    assert_eq!(pushed.pushed_events.len(), 2, "{pushed:?}");
    assert!(
        branch_events(&server, "r", "main")
            .iter()
            .any(|e| e.id == "foreign"),
        "the forwarded event was pushed"
    );
    assert_eq!(
        ksync
            .client()
            .local_status()
            .expect("status")
            .pending_events,
        0
    );
}

/// A merge whose resolution push fast-forwards the pull cursor, a write the storage refuses
/// (owed), and whose pull of `into` then brings an event pushed meanwhile: the pull cursor
/// is where that pull got, in `local_status` and for the next pull. The owed value, behind
/// it, stayed owed and was written by the next operation, moving the cursor back.
#[tokio::test]
async fn a_pull_past_an_owed_pull_cursor_settles_it() {
    let server = start(&["r"]).await;
    let http = http();
    let push = |branch: &str, event: serde_json::Value| {
        http.post(server.url(&format!("/git/r/branches/{branch}/events")))
            .json(&json!({"baseVersion": 0, "events": [event]}))
    };
    let (status, body) = call(
        http.post(server.url("/git/r/branches"))
            .json(&json!({"name": "feature", "at": 0})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let x = |data: &str, timestamp: u64| json!({"id": "x", "type": "t", "data": data, "timestamp": timestamp, "version": 1});
    assert_eq!(call(push("main", x("main", 1))).await.0, 200);
    // Later: the merge settles the collision with `feature`'s, a revision pushed to main.
    assert_eq!(call(push("feature", x("feature", 2))).await.0, 200);

    let armed = Arc::new(AtomicBool::new(false));
    let hook = {
        let armed = Arc::clone(&armed);
        let other = push(
            "main",
            json!({"id": "other", "type": "t", "data": 0, "timestamp": 1, "version": 1}),
        );
        let other = std::sync::Mutex::new(Some(other));
        move |key: &str| -> BoxFuture<'static, Result<(), StorageError>> {
            let fail = key.contains("pulled") && armed.swap(false, Ordering::SeqCst);
            let other = fail
                .then(|| other.lock().unwrap_or_else(|p| p.into_inner()).take())
                .flatten();
            Box::pin(async move {
                if let Some(other) = other {
                    // Someone pushes to main meanwhile; then the write fails.
                    assert_eq!(call(other).await.0, 200);
                }
                if fail {
                    return Err(StorageError::Io {
                        context: "meta".into(),
                        source: std::io::Error::other("disk full"),
                    });
                }
                Ok(())
            })
        }
    };
    let storage = Arc::new(MetaHook::new(
        Arc::new(InMemoryStorage::new()),
        Arc::new(hook),
    ));
    let ksync = ksync_testkit::ksync_over(storage, common::client(&server.repo_url("r")))
        .await
        .expect("ksync");
    ksync.client().pull().await.expect("pull");
    armed.store(true, Ordering::SeqCst);
    let merged = ksync
        .client()
        .merge("main", "feature")
        .await
        .expect("merge");
    assert_eq!(merged.resolutions.len(), 1, "{merged:?}");
    assert!(!armed.load(Ordering::SeqCst), "the fault was met");
    assert_eq!(branch_events(&server, "r", "main").len(), 3);
    let status = ksync.client().local_status().expect("status");
    assert_eq!(status.pulled_version, 3, "{status:?}");
    // The next operation writes nothing older.
    ksync.client().push().await.expect("push");
    assert_eq!(
        ksync
            .client()
            .local_status()
            .expect("status")
            .pulled_version,
        3
    );
}
