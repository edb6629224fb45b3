//! The spec's "Custom Sync Client": implement [`SyncClient`] yourself and drive it with
//! [`KSync`].
//!
//! `BusSyncClient` syncs replicas in one process through a `Bus`: a tiny relay that keeps a
//! log (an [`InMemoryStorage`]) and forwards each new event to every other connected member,
//! like the WebSocket server does over the network. It shows the whole contract a transport
//! keeps:
//! - `connect`: catch up on what the relay has (through [`Replica::ingest`], which
//!   deduplicates and settles conflicts), then send what was emitted while offline
//!   ([`Replica::pending`]), remembering progress in named cursors;
//! - `send`: run the outgoing middleware, then deliver;
//! - received events: incoming middleware, `ingest`, then `event`/`sync`/`conflict`
//!   notifications ([`ksync::Ingested::notify`]);
//! - `on`/`off`: provided by the trait through the client's [`Notifier`] (the spec's
//!   `eventHandlers` map).
//!
//! Run: `cargo run -p ksync --example custom_sync_client` (no server needed).
//! Its tests (`cargo test -p ksync --example custom_sync_client`) drive two clients through
//! `KSync`: live delivery, offline catch-up, conflict settlement, middleware, `on`/`off`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ksync::{
    AppendOutcome, BoxFuture, Direction, Event, InMemoryStorage, KSync, Middleware,
    MiddlewareError, Notification, Notifier, Pipeline, Replica, Status, Storage, SyncClient,
    SyncError,
};
use tokio::sync::mpsc;

/// Capacity of each member's inbox. Overflow policy: the relay waits for room (backpressure),
/// so a slow member slows the senders down and nothing is dropped.
const INBOX_CAPACITY: usize = 256;
/// Events per page when catching up or sending pending events.
const PAGE: usize = 256;
/// Cursor names in the replica's storage.
const RECEIVED_CURSOR: &str = "bus/received";
const SENT_CURSOR: &str = "bus/sent";

/// A member id and its inbox.
type Inbox = (u64, mpsc::Sender<Event>);

/// The relay: a log plus the inboxes of the connected members.
#[derive(Clone, Default)]
pub struct Bus {
    log: Arc<InMemoryStorage>,
    members: Arc<Mutex<Vec<Inbox>>>,
    next_member: Arc<AtomicU64>,
}

impl Bus {
    fn join(&self) -> (u64, mpsc::Receiver<Event>) {
        let id = self.next_member.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(INBOX_CAPACITY);
        self.lock().push((id, tx));
        (id, rx)
    }

    fn leave(&self, member: u64) {
        self.lock().retain(|(id, _)| *id != member);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Inbox>> {
        self.members.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores `event` in the relay's log and forwards it to every other member if it is new.
    /// Other content under the same `(id, version)` is refused, as a server would.
    async fn publish(&self, from: u64, event: Event) -> Result<(), SyncError> {
        let outcome = self.log.append(vec![event.clone()]).await?;
        match outcome.outcomes.first() {
            Some(AppendOutcome::Appended { .. }) => {}
            Some(AppendOutcome::Duplicate { .. }) => return Ok(()),
            Some(AppendOutcome::Conflict(c)) => {
                return Err(SyncError::Rejected(format!(
                    "the relay holds other content for {:?} version {}",
                    c.ours.id, c.ours.version
                )));
            }
            // Core always answers one outcome per event; nothing to forward otherwise.
            _ => return Ok(()),
        }
        let inboxes: Vec<_> = self
            .lock()
            .iter()
            .filter(|(id, _)| *id != from)
            .map(|(_, tx)| tx.clone())
            .collect();
        for inbox in inboxes {
            // A member that left meanwhile has a closed inbox; it catches up on reconnect.
            let _ = inbox.send(event.clone()).await;
        }
        Ok(())
    }
}

/// The custom client. One per replica.
pub struct BusSyncClient {
    bus: Bus,
    notifier: Notifier,
    pipeline: Pipeline,
    replica: Mutex<Replica>,
    member: tokio::sync::Mutex<Option<Member>>,
}

struct Member {
    id: u64,
    task: tokio::task::JoinHandle<()>,
}

impl BusSyncClient {
    /// A client of `bus`. `KSync` attaches its replica; alone, it uses a fresh in-memory one.
    pub fn new(bus: Bus) -> Self {
        Self {
            bus,
            notifier: Notifier::new(),
            pipeline: Pipeline::new(),
            replica: Mutex::new(Replica::in_memory()),
            member: tokio::sync::Mutex::new(None),
        }
    }

    /// The spec's `syncClient.use('incoming' | 'outgoing', middleware)`.
    pub fn use_middleware(
        &self,
        direction: &str,
        middleware: impl Middleware,
    ) -> Result<(), MiddlewareError> {
        self.pipeline.use_middleware(direction.parse()?, middleware);
        Ok(())
    }

    fn replica(&self) -> Replica {
        self.replica
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn publish(&self, member: u64, event: Event) -> Result<(), SyncError> {
        match self.pipeline.run(Direction::Outgoing, event)? {
            Some(event) => self.bus.publish(member, event).await,
            None => Ok(()), // filtered out by middleware
        }
    }

    /// Ingests what the relay logged since our cursor.
    async fn catch_up(&self) -> Result<(), SyncError> {
        let replica = self.replica();
        loop {
            let after = replica.cursor(RECEIVED_CURSOR)?;
            let page = self.bus.log.read_since(after, PAGE)?;
            let Some(last) = page.last().map(|s| s.seq) else {
                return Ok(());
            };
            let events = page.into_iter().map(|s| s.event).collect();
            receive(&replica, &self.pipeline, &self.notifier, events).await?;
            replica.set_cursor(RECEIVED_CURSOR, last).await?;
        }
    }

    /// Sends our events after the sent cursor. At least once: events already sent live are
    /// sent again here after a reconnect, and the relay drops the duplicates.
    async fn send_pending(&self, member: u64) -> Result<(), SyncError> {
        let replica = self.replica();
        loop {
            let after = replica.cursor(SENT_CURSOR)?;
            let page = replica.pending(after, PAGE)?;
            let Some(last) = page.last().map(|s| s.seq) else {
                return Ok(());
            };
            for stored in page {
                match self.publish(member, stored.event).await {
                    // Refused because the relay holds other content: the catch-up already
                    // settled that conflict with a newer revision, which is pending too.
                    Ok(()) | Err(SyncError::Rejected(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            replica.set_cursor(SENT_CURSOR, last).await?;
        }
    }
}

/// Incoming middleware, then the replica (dedup, conflicts), then notifications.
async fn receive(
    replica: &Replica,
    pipeline: &Pipeline,
    notifier: &Notifier,
    events: Vec<Event>,
) -> Result<(), SyncError> {
    let mut accepted = Vec::with_capacity(events.len());
    for event in events {
        match pipeline.run(Direction::Incoming, event) {
            Ok(Some(event)) => accepted.push(event),
            Ok(None) => {}
            // One bad event must not stop the others; report it.
            Err(e) => notifier.emit(Notification::Error(Arc::new(e.into()))),
        }
    }
    match replica.ingest(accepted).await {
        Ok(ingested) => ingested.notify(notifier),
        Err(e) => {
            // Part of the batch may be stored before the failure: report it now, as the
            // batch received again finds those events duplicates and never reports them.
            if let Some(stored) = e.ingested() {
                stored.notify(notifier);
            }
            return Err(e);
        }
    }
    Ok(())
}

impl SyncClient for BusSyncClient {
    fn connect(&self) -> BoxFuture<'_, Result<(), SyncError>> {
        Box::pin(async move {
            let mut member = self.member.lock().await;
            if member.is_some() {
                return Ok(());
            }
            self.notifier.emit(Notification::Status(Status::Syncing));
            let (id, mut inbox) = self.bus.join();
            // Catch up after joining, so nothing published in between is missed (what
            // arrives twice is deduplicated by the replica).
            self.catch_up().await?;
            self.send_pending(id).await?;
            let (replica, pipeline, notifier) =
                (self.replica(), self.pipeline.clone(), self.notifier.clone());
            let task = tokio::spawn(async move {
                while let Some(event) = inbox.recv().await {
                    if let Err(e) = receive(&replica, &pipeline, &notifier, vec![event]).await {
                        notifier.emit(Notification::Error(Arc::new(e)));
                    }
                }
            });
            *member = Some(Member { id, task });
            self.notifier.emit(Notification::Connected);
            self.notifier.emit(Notification::Status(Status::Idle));
            Ok(())
        })
    }

    fn disconnect(&self) -> BoxFuture<'_, Result<(), SyncError>> {
        Box::pin(async move {
            if let Some(member) = self.member.lock().await.take() {
                self.bus.leave(member.id);
                member.task.abort();
                self.notifier.emit(Notification::Disconnected);
            }
            Ok(())
        })
    }

    fn send(&self, event: Event) -> BoxFuture<'_, Result<(), SyncError>> {
        Box::pin(async move {
            let member = self.member.lock().await.as_ref().map(|m| m.id);
            let Some(member) = member else {
                // KSync keeps the event in storage; `connect` sends it.
                return Err(SyncError::NotConnected);
            };
            self.publish(member, event).await
        })
    }

    fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    fn attach(&self, replica: Replica) {
        *self.replica.lock().unwrap_or_else(|p| p.into_inner()) = replica;
    }
}

async fn ksync_on(bus: &Bus) -> Result<KSync<BusSyncClient>, SyncError> {
    KSync::builder()
        .storage(Arc::new(InMemoryStorage::new()))
        .sync_client(Arc::new(BusSyncClient::new(bus.clone())))
        .build()
        .await
}

#[tokio::main]
async fn main() -> Result<(), SyncError> {
    let bus = Bus::default();
    let alice = ksync_on(&bus).await?;
    let bob = ksync_on(&bus).await?;

    let _sub = bob.on("event", |n| {
        if let Notification::Event(event) = n {
            println!("bob received {} {}", event.event_type, event.data);
        }
    })?;
    let mut bob_events = bob.notifications();

    alice.connect().await?;
    bob.connect().await?;
    alice
        .emit(
            "user_action",
            serde_json::json!({"action": "click", "button": "submit"}),
        )
        .await?;
    // Wait until bob has it (the relay delivers on a task).
    bob_events
        .next_of(ksync::NotificationKind::Event)
        .await
        .map_err(|e| SyncError::Protocol(e.to_string()))?;

    // Offline work on bob goes out when he reconnects.
    bob.disconnect().await?;
    bob.emit("note", serde_json::json!({"text": "written offline"}))
        .await?;
    let mut alice_events = alice.notifications();
    bob.connect().await?;
    alice_events
        .next_of(ksync::NotificationKind::Event)
        .await
        .map_err(|e| SyncError::Protocol(e.to_string()))?;

    println!(
        "alice holds {} events, bob holds {}",
        alice.state()?.len(),
        bob.state()?.len()
    );
    alice.disconnect().await?;
    bob.disconnect().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ksync::{Conflict, NotificationKind, Resolution};
    use serde_json::json;
    use std::time::Duration;

    /// Waits (bounded) until `f` holds; the relay delivers on tasks.
    async fn until(mut f: impl FnMut() -> bool) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while !f() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("condition reached within 5 s");
    }

    fn same_state(a: &KSync<BusSyncClient>, b: &KSync<BusSyncClient>) -> bool {
        let (sa, sb) = (a.state().expect("state"), b.state().expect("state"));
        sa.len() == sb.len()
            && sa.iter().all(|(id, e)| {
                sb.get(id)
                    .is_some_and(|f| f.version == e.version && f.same_content(e))
            })
    }

    /// A storage whose appends of `x` version 2 (the revision settling a conflict over `x`)
    /// fail, as a full disk's would.
    struct RefusesX2(InMemoryStorage);

    impl Storage for RefusesX2 {
        fn append(
            &self,
            events: Vec<Event>,
        ) -> BoxFuture<'_, Result<ksync::MergeOutcome, ksync::StorageError>> {
            if events.iter().any(|e| e.id == "x" && e.version == 2) {
                return Box::pin(async {
                    Err(ksync::StorageError::Io {
                        context: "appending".into(),
                        source: std::io::Error::other("disk full"),
                    })
                });
            }
            self.0.append(events)
        }
        fn read_since(
            &self,
            after: u64,
            limit: usize,
        ) -> Result<Vec<ksync::Stored>, ksync::StorageError> {
            self.0.read_since(after, limit)
        }
        fn get(
            &self,
            id: &str,
            version: u64,
        ) -> Result<Option<ksync::Stored>, ksync::StorageError> {
            self.0.get(id, version)
        }
        fn latest(&self, id: &str) -> Result<Option<ksync::Stored>, ksync::StorageError> {
            self.0.latest(id)
        }
        fn len(&self) -> u64 {
            self.0.len()
        }
        fn state(&self) -> Result<std::collections::BTreeMap<String, Event>, ksync::StorageError> {
            self.0.state()
        }
        fn meta(&self, key: &str) -> Result<Option<String>, ksync::StorageError> {
            self.0.meta(key)
        }
        fn set_meta(
            &self,
            key: &str,
            value: &str,
        ) -> BoxFuture<'_, Result<(), ksync::StorageError>> {
            self.0.set_meta(key, value)
        }
    }

    /// A received batch whose conflict's resolution cannot be written fails, but the new
    /// event stored before the failure is reported: received again, it is a duplicate.
    #[tokio::test]
    async fn events_stored_before_a_failed_resolution_are_reported() {
        let replica = Replica::with_id(Arc::new(RefusesX2(InMemoryStorage::new())), "me");
        replica
            .record_local(Event::new("x", "t", json!("mine"), 1).with_origin("me"))
            .await
            .expect("local");
        let notifier = Notifier::new();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        let _sub = notifier.on_kind(NotificationKind::Event, move |n| {
            if let Notification::Event(e) = n {
                sink.lock().expect("lock").push(e.id.clone());
            }
        });
        let batch = vec![
            Event::new("y", "t", json!("new"), 2).with_origin("them"),
            Event::new("x", "t", json!("theirs"), 2).with_origin("them"),
        ];
        let err = receive(&replica, &Pipeline::new(), &notifier, batch.clone()).await;
        assert!(err.is_err(), "the resolution failed");
        assert_eq!(*seen.lock().expect("lock"), ["y"]);
        let _ = receive(&replica, &Pipeline::new(), &notifier, batch).await;
        assert_eq!(*seen.lock().expect("lock"), ["y"], "reported once");
    }

    #[tokio::test]
    async fn live_delivery_and_offline_catch_up_through_ksync() {
        let bus = Bus::default();
        let a = ksync_on(&bus).await.expect("a");
        let b = ksync_on(&bus).await.expect("b");
        let mut b_stream = b.notifications();
        a.connect().await.expect("connect a");
        b.connect().await.expect("connect b");

        let sent = a.emit("chat", json!({"text": "hi"})).await.expect("emit");
        let got = b_stream
            .next_of(NotificationKind::Event)
            .await
            .expect("event");
        match got {
            Notification::Event(e) => {
                assert_eq!(e, sent);
                assert_eq!(e.origin.as_deref(), Some(a.replica().id()));
            }
            other => panic!("unexpected {other:?}"),
        }

        // b offline: a's events and b's own both wait, then meet on reconnect.
        b.disconnect().await.expect("disconnect");
        let from_a = a
            .emit("chat", json!({"text": "while b was away"}))
            .await
            .expect("emit");
        let from_b = b
            .emit("chat", json!({"text": "b offline"}))
            .await
            .expect("stored offline");
        assert!(!a.state().expect("state").contains_key(&from_b.id));
        b.connect().await.expect("reconnect");
        assert!(
            b.state().expect("state").contains_key(&from_a.id),
            "caught up on connect"
        );
        until(|| a.state().expect("state").contains_key(&from_b.id)).await;
        assert!(same_state(&a, &b));
        assert_eq!(a.state().expect("state").len(), 3);

        // Reconnecting again sends b's events again; everyone deduplicates.
        b.disconnect().await.expect("disconnect");
        b.connect().await.expect("reconnect");
        assert_eq!(bus.log.len(), 3);
    }

    #[tokio::test]
    async fn conflicts_are_settled_by_the_policy_and_converge() {
        let bus = Bus::default();
        let a = ksync_on(&bus).await.expect("a");
        let b = ksync_on(&bus).await.expect("b");
        let conflicts = Arc::new(Mutex::new(Vec::<Conflict>::new()));
        let seen = Arc::clone(&conflicts);
        let _sub = b
            .on("conflict", move |n| {
                if let Notification::Conflict(c) = n {
                    seen.lock().expect("lock").push(c.clone());
                }
            })
            .expect("known name");
        // The spec's handler: take theirs for concurrent edits.
        b.on_conflict(|_c: &Conflict| Resolution::Theirs);

        // Both write revision 1 of the same record while apart.
        a.replica()
            .record_local(
                Event::new("doc", "edit", json!("from a"), 10).with_origin(a.replica().id()),
            )
            .await
            .expect("a");
        b.replica()
            .record_local(
                Event::new("doc", "edit", json!("from b"), 20).with_origin(b.replica().id()),
            )
            .await
            .expect("b");
        a.connect().await.expect("a");
        b.connect().await.expect("b");

        let conflict = conflicts
            .lock()
            .expect("lock")
            .first()
            .cloned()
            .expect("one conflict");
        assert_eq!(conflict.ours.data, json!("from b"));
        assert_eq!(conflict.theirs.data, json!("from a"));
        until(|| a.state().expect("state")["doc"].version == 2).await;
        assert!(same_state(&a, &b));
        assert_eq!(
            a.state().expect("state")["doc"].data,
            json!("from a"),
            "b took theirs"
        );
    }

    #[tokio::test]
    async fn middleware_and_on_off() {
        let bus = Bus::default();
        let a = ksync_on(&bus).await.expect("a");
        let b = ksync_on(&bus).await.expect("b");
        // Outgoing: keep drafts local; incoming: drop private events. (Middleware that
        // rewrites content on one side only would make replicas disagree about a revision;
        // transforms come in pairs, like encrypt/decrypt.)
        a.client()
            .use_middleware("outgoing", |e: Event| {
                (e.event_type != "draft").then_some(e)
            })
            .expect("direction");
        b.client()
            .use_middleware("incoming", ksync::Filter::PublicOnly)
            .expect("direction");
        assert!(a.client().use_middleware("sideways", Some).is_err());

        let hits = Arc::new(AtomicU64::new(0));
        let h = Arc::clone(&hits);
        let sub = b
            .client()
            .on(
                "event",
                Box::new(move |_| {
                    h.fetch_add(1, Ordering::SeqCst);
                }),
            )
            .expect("known");
        assert!(b.client().on("no-such-event", Box::new(|_| {})).is_err());

        a.connect().await.expect("a");
        b.connect().await.expect("b");
        let secret = a
            .emit("note", json!({"private": true}))
            .await
            .expect("emit");
        let draft = a
            .emit("draft", json!({"text": "not yet"}))
            .await
            .expect("emit");
        let public = a
            .emit("note", json!({"text": "hello"}))
            .await
            .expect("emit");
        until(|| b.state().expect("state").contains_key(&public.id)).await;
        let state = b.state().expect("state");
        assert_eq!(state[&public.id], public);
        assert!(!state.contains_key(&secret.id), "filtered on the way in");
        assert!(!state.contains_key(&draft.id), "filtered on the way out");
        assert!(bus.log.get(&draft.id, 1).expect("read").is_none());
        assert_eq!(hits.load(Ordering::SeqCst), 1);

        assert!(b.client().off("event", sub.id()).expect("known"));
        a.emit("note", json!({"text": "again"}))
            .await
            .expect("emit");
        until(|| b.state().expect("state").len() == 2).await;
        assert_eq!(hits.load(Ordering::SeqCst), 1, "handler removed");
    }
}
