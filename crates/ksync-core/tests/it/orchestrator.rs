//! `KSync`, `Replica` and `Notifier` as an application uses them, over a minimal in-process
//! client: what must hold whatever the transport.
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use ksync_core::{
    AutoSync, BoxFuture, Conflict, Event, InMemoryStorage, InvalidEvent, KSync, Notification,
    Notifier, PullPushClient, PullResult, PushResult, Replica, Resolution, SyncClient, SyncError,
};
use serde_json::json;

/// Sends nothing while disconnected (the events wait in the replica), records what it sends.
#[derive(Default)]
struct RecordingClient {
    notifier: Notifier,
    connected: AtomicBool,
    /// Sends fail with a protocol error (as a server refusing them would).
    refuse_sends: AtomicBool,
    sent: Mutex<Vec<Event>>,
    /// Pushes asked of it (auto-sync).
    pushes: AtomicUsize,
}

impl PullPushClient for RecordingClient {
    fn pull(&self) -> BoxFuture<'_, Result<PullResult, SyncError>> {
        Box::pin(async { Ok(PullResult::default()) })
    }
    fn push(&self) -> BoxFuture<'_, Result<PushResult, SyncError>> {
        Box::pin(async move {
            self.pushes.fetch_add(1, Ordering::SeqCst);
            Ok(PushResult::default())
        })
    }
}

impl SyncClient for RecordingClient {
    fn connect(&self) -> BoxFuture<'_, Result<(), SyncError>> {
        Box::pin(async move {
            self.connected.store(true, Ordering::SeqCst);
            Ok(())
        })
    }
    fn disconnect(&self) -> BoxFuture<'_, Result<(), SyncError>> {
        Box::pin(async move {
            self.connected.store(false, Ordering::SeqCst);
            Ok(())
        })
    }
    fn send(&self, event: Event) -> BoxFuture<'_, Result<(), SyncError>> {
        Box::pin(async move {
            if !self.connected.load(Ordering::SeqCst) {
                return Err(SyncError::NotConnected);
            }
            if self.refuse_sends.load(Ordering::SeqCst) {
                return Err(SyncError::Protocol("refused".into()));
            }
            self.sent.lock().unwrap().push(event);
            Ok(())
        })
    }
    fn notifier(&self) -> &Notifier {
        &self.notifier
    }
}

async fn ksync() -> KSync<RecordingClient> {
    KSync::builder()
        .storage(Arc::new(InMemoryStorage::new()))
        .sync_client(Arc::new(RecordingClient::default()))
        .build()
        .await
        .unwrap()
}

#[tokio::test]
async fn events_every_server_would_refuse_are_refused_before_they_are_stored() {
    let ksync = ksync().await;
    ksync.connect().await.unwrap();
    let empty_type = ksync.emit("", json!(1)).await;
    assert!(
        matches!(
            empty_type,
            Err(SyncError::InvalidEvent(InvalidEvent::EmptyType))
        ),
        "{empty_type:?}"
    );
    let empty_id = ksync.update("", "t", json!(1)).await;
    assert!(
        matches!(
            empty_id,
            Err(SyncError::InvalidEvent(InvalidEvent::EmptyId))
        ),
        "{empty_id:?}"
    );
    let long_id = ksync.update(&"x".repeat(257), "t", json!(1)).await;
    assert!(
        matches!(
            long_id,
            Err(SyncError::InvalidEvent(InvalidEvent::IdTooLong {
                len: 257,
                ..
            }))
        ),
        "{long_id:?}"
    );
    let long_type = ksync.emit("t".repeat(300), json!(1)).await;
    assert!(
        matches!(
            long_type,
            Err(SyncError::InvalidEvent(InvalidEvent::TypeTooLong { .. }))
        ),
        "{long_type:?}"
    );
    // `update` checks its data too (it checked only `id` and `type`: data too deep or too
    // large was stored, and then refused by every server and peer, for ever).
    let mut deep = json!(1);
    for _ in 0..=ksync_core::MAX_DATA_DEPTH {
        deep = json!([deep]);
    }
    let too_deep = ksync.update("deep", "t", deep).await;
    assert!(
        matches!(
            too_deep,
            Err(SyncError::InvalidEvent(InvalidEvent::DataTooDeep { .. }))
        ),
        "{too_deep:?}"
    );
    let huge = json!("x".repeat(ksync_core::MAX_EVENT_JSON_BYTES));
    let too_large = ksync.update("huge", "t", huge).await;
    assert!(
        matches!(
            too_large,
            Err(SyncError::InvalidEvent(InvalidEvent::TooLarge { .. }))
        ),
        "{too_large:?}"
    );
    // Nothing was stored (it would wait in the log, refused by every server, forever) and
    // nothing was sent.
    assert_eq!(ksync.replica().storage().len(), 0);
    assert!(ksync.client().sent.lock().unwrap().is_empty());
    // At the limits, and with ids a file system or URL would not like, all is well.
    for id in ["x".repeat(256), "../a/b\\c".into(), "日本語 🎉".into()] {
        let first = ksync.update(&id, "t", json!(1)).await.unwrap();
        let second = ksync.update(&id, "t", json!(2)).await.unwrap();
        assert_eq!((first.version, second.version), (1, 2));
        assert_eq!(ksync.state().unwrap()[&id].data, json!(2));
    }
}

#[tokio::test]
async fn a_panicking_handler_neither_reaches_the_caller_nor_starves_other_handlers() {
    let ksync = ksync().await;
    ksync.connect().await.unwrap();
    ksync.client().refuse_sends.store(true, Ordering::SeqCst);
    let _bad = ksync
        .on("error", |_| panic!("a bug in the application's handler"))
        .unwrap();
    let later = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&later);
    let _good = ksync
        .on("error", move |_| {
            seen.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
    let mut stream = ksync.notifications();
    // The send fails after the event is stored; `emit` reports that as an `error` notification
    // and returns the stored event. The panicking handler must not turn that into a panic in
    // `emit` (or, on a transport's task, kill the connection).
    let event = ksync.emit("t", json!(1)).await.unwrap();
    assert_eq!(ksync.state().unwrap()[&event.id], event);
    assert_eq!(
        later.load(Ordering::SeqCst),
        1,
        "the next handler still ran"
    );
    assert!(matches!(
        stream.recv().await.unwrap(),
        Notification::Error(e) if matches!(*e, SyncError::Protocol(_))
    ));
    // The handler stays registered: each later notification is delivered the same way.
    ksync.emit("t", json!(2)).await.unwrap();
    assert_eq!(later.load(Ordering::SeqCst), 2);
}

fn replica_with(
    id: &str,
    resolver: impl Fn(&Conflict) -> Resolution + Send + Sync + 'static,
) -> Replica {
    let replica = Replica::with_id(Arc::new(InMemoryStorage::new()), id);
    replica.set_resolver(Some(Arc::new(resolver)));
    replica
}

fn log(replica: &Replica) -> Vec<Event> {
    let stored = replica.storage().read_since(0, usize::MAX).unwrap();
    stored.into_iter().map(|s| s.event).collect()
}

/// Two replicas edit `x` at once, then exchange their whole logs at the same moment (as P2P
/// peers gossiping do), round after round until a round brings nothing new. Returns how many
/// rounds that took (at most `max_rounds`) and the two final revisions of `x`.
async fn concurrent_edit_then_exchange(
    a: &Replica,
    b: &Replica,
    max_rounds: usize,
) -> (usize, Event, Event) {
    a.record_local(Event::new("x", "t", json!("a's edit"), 10).with_origin(a.id()))
        .await
        .unwrap();
    b.record_local(Event::new("x", "t", json!("b's edit"), 20).with_origin(b.id()))
        .await
        .unwrap();
    let mut rounds = 0;
    while rounds < max_rounds {
        rounds += 1;
        let (from_a, from_b) = (log(a), log(b));
        let at_b = b.ingest(from_a).await.unwrap();
        let at_a = a.ingest(from_b).await.unwrap();
        if at_a.appended.len()
            + at_a.resolutions.len()
            + at_b.appended.len()
            + at_b.resolutions.len()
            == 0
        {
            break;
        }
    }
    let latest = |r: &Replica| r.storage().latest("x").unwrap().unwrap().event;
    (rounds, latest(a), latest(b))
}

#[tokio::test]
async fn replicas_that_both_keep_their_own_side_still_converge() {
    type Policy = fn(&Conflict) -> Resolution;
    let policies: [(&str, Policy); 3] = [
        ("ours", |_| Resolution::Ours),
        ("theirs", |_| Resolution::Theirs),
        // Not deterministic across replicas: each merges with its own side first.
        ("merged, ours first", |c| {
            Resolution::Merged(Event::new(
                "ignored",
                "merged",
                json!([c.ours.data, c.theirs.data]),
                c.ours.timestamp,
            ))
        }),
    ];
    for (name, policy) in policies {
        let a = replica_with("a", policy);
        let b = replica_with("b", policy);
        let (rounds, at_a, at_b) = concurrent_edit_then_exchange(&a, &b, 10).await;
        assert!(
            rounds < 10,
            "{name}: still exchanging new revisions after {rounds} rounds"
        );
        assert!(
            at_a.same_content(&at_b) && at_a.version == at_b.version,
            "{name}: a holds {at_a:?}, b holds {at_b:?}"
        );
        assert_eq!(a.storage().state().unwrap().len(), 1);
    }
}

#[tokio::test]
async fn a_panicking_conflict_callback_settles_by_last_write_wins_on_every_replica() {
    let calls = Arc::new(AtomicUsize::new(0));
    let panicking = |calls: &Arc<AtomicUsize>| {
        let calls = Arc::clone(calls);
        move |_: &Conflict| -> Resolution {
            calls.fetch_add(1, Ordering::SeqCst);
            panic!("a bug in the application's conflict callback")
        }
    };
    let a = replica_with("a", panicking(&calls));
    let b = replica_with("b", panicking(&calls));
    let (_, at_a, at_b) = concurrent_edit_then_exchange(&a, &b, 10).await;
    assert!(calls.load(Ordering::SeqCst) >= 2, "the callback was asked");
    // Both settled (the ingest did not panic half-way, leaving the conflict unsettled), the
    // same way: the later edit.
    assert_eq!((at_a.version, &at_a.data), (2, &json!("b's edit")));
    assert!(at_a.same_content(&at_b) && at_a.version == at_b.version);
}

#[tokio::test]
async fn the_highest_version_neither_overflows_nor_leaves_the_valid_range() {
    let ksync = ksync().await;
    let top = Event::new("x", "t", json!("theirs"), 5)
        .with_version(ksync_core::MAX_EVENT_INTEGER)
        .with_origin("peer");
    let ingested = ksync.replica().ingest(vec![top.clone()]).await.unwrap();
    assert_eq!(ingested.appended.len(), 1);
    // No revision can come after it: a local update is refused with a typed error...
    let update = ksync.update("x", "t", json!("mine")).await;
    assert!(matches!(update, Err(SyncError::Rejected(_))), "{update:?}");
    // ... and a conflict at that version is reported but cannot be settled by a new revision.
    let other = Event::new("x", "t", json!("another"), 9)
        .with_version(ksync_core::MAX_EVENT_INTEGER)
        .with_origin("elsewhere");
    let ingested = ksync.replica().ingest(vec![other]).await.unwrap();
    assert_eq!(ingested.conflicts.len(), 1);
    assert!(ingested.resolutions.is_empty());
    let stored = ksync.replica().storage().read_since(0, usize::MAX).unwrap();
    assert!(
        stored
            .iter()
            .all(|s| (1..=ksync_core::MAX_EVENT_INTEGER).contains(&s.event.version)),
        "{stored:?}"
    );
    assert_eq!(ksync.state().unwrap()["x"], top);
}

#[tokio::test]
async fn a_merged_resolution_that_is_no_valid_event_is_not_written() {
    // The callback's event has another id and version (both replaced) and an empty type
    // (which no server accepts): last-write-wins settles it instead, the same on both sides.
    let merge_badly = |c: &Conflict| {
        Resolution::Merged(
            Event::new("other-id", "", json!("merged"), c.ours.timestamp).with_version(99),
        )
    };
    let a = replica_with("a", merge_badly);
    let b = replica_with("b", merge_badly);
    let (_, at_a, at_b) = concurrent_edit_then_exchange(&a, &b, 10).await;
    assert_eq!(
        (at_a.id.as_str(), at_a.version, &at_a.data),
        ("x", 2, &json!("b's edit"))
    );
    assert!(at_a.same_content(&at_b) && at_a.version == at_b.version);
    for replica in [&a, &b] {
        assert!(log(replica).iter().all(|e| !e.event_type.is_empty()));
    }
}

#[tokio::test]
async fn a_handler_can_unsubscribe_itself_and_subscribe_others() {
    let ksync = Arc::new(ksync().await);
    let calls = Arc::new(AtomicUsize::new(0));
    let slot: Arc<Mutex<Option<ksync_core::Subscription>>> = Arc::default();
    let later: Arc<Mutex<Vec<ksync_core::Subscription>>> = Arc::default();
    let (c, s, l, k) = (
        Arc::clone(&calls),
        Arc::clone(&slot),
        Arc::clone(&later),
        Arc::downgrade(&ksync),
    );
    let once = ksync
        .on("connected", move |_| {
            c.fetch_add(1, Ordering::SeqCst);
            // Inside the handler, while the notification is being delivered: no deadlock.
            if let Some(own) = s.lock().unwrap().take() {
                assert!(own.unsubscribe());
            }
            if let Some(ksync) = k.upgrade() {
                let c = Arc::clone(&c);
                l.lock().unwrap().push(
                    ksync
                        .on("connected", move |_| {
                            c.fetch_add(100, Ordering::SeqCst);
                        })
                        .unwrap(),
                );
            }
        })
        .unwrap();
    *slot.lock().unwrap() = Some(once);
    let hub = ksync.client().notifier().clone();
    hub.emit(Notification::Connected);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the new handler starts with the next one"
    );
    hub.emit(Notification::Connected);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        101,
        "the first ran once, the second once"
    );
    // An unknown name is a typed error, not a silent no-op.
    assert!(matches!(
        ksync.on("conflicts", |_| {}),
        Err(SyncError::UnknownNotification(name)) if name == "conflicts"
    ));
}

/// Two `enable_auto_sync` calls at once leave one auto-sync task, which `disable_auto_sync`
/// stops: each used to stop nothing and store its task over the other's, which ran on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_sync_enabled_from_two_threads_at_once_is_one_task_that_stops() {
    let ksync = Arc::new(ksync().await);
    let intervals = AutoSync {
        push_interval: std::time::Duration::from_millis(1),
        pull_interval: std::time::Duration::ZERO,
    };
    let runtime = tokio::runtime::Handle::current();
    for round in 0..100 {
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let enablers: Vec<_> = (0..2)
            .map(|_| {
                let (ksync, barrier, runtime) =
                    (Arc::clone(&ksync), Arc::clone(&barrier), runtime.clone());
                std::thread::spawn(move || {
                    let _entered = runtime.enter();
                    barrier.wait();
                    ksync.enable_auto_sync(intervals);
                })
            })
            .collect();
        for enabler in enablers {
            enabler.join().unwrap();
        }
        ksync.disable_auto_sync();
        // Aborted tasks end at their next poll; then nothing pushes any more.
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        let pushes = ksync.client().pushes.load(Ordering::SeqCst);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(
            ksync.client().pushes.load(Ordering::SeqCst),
            pushes,
            "an auto-sync task ran on after disable_auto_sync (round {round})"
        );
    }
}
