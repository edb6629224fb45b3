//! A peer that lies in catch-up: a raw libp2p swarm speaks `/ksync/sync/1` (CBOR, the
//! message shapes of docs/PROTOCOL.md) and answers an honest peer's requests with pages that
//! do not advance, log ids that change on every answer, or many copies of one revision. The
//! honest peer refuses each with a typed error, stops asking, and loses nothing.

use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::raw::*;
use common::*;
use futures_util::StreamExt;
use ksync_core::{Event, Notification, NotificationKind, Subscription, SyncError};
use ksync_p2p::{Multiaddr, P2PError, P2PSyncClient, PeerId};
use libp2p::request_response;
use libp2p::swarm::SwarmEvent;
use serde_json::json;

/// The lying peer: answers every request with `answer`, counting `Keys` requests.
struct Liar {
    addr: Multiaddr,
    keys_requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Liar {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn liar(mut answer: impl FnMut(&Request) -> Response + Send + 'static) -> Liar {
    sometimes_silent_liar(move |request| Some(answer(request))).await
}

/// A liar that holds one event, `liar-1` at seq 1: `keys` answers each `Keys` request (given
/// the request's `after` and the page listing that event), and a `Fetch` gets the event.
async fn liar_holding_one(
    mut keys: impl FnMut(u64, Vec<Entry>) -> Response + Send + 'static,
) -> Liar {
    let held = event("liar", 1);
    let page = vec![entry(1, &held, digest(&held))];
    liar(move |request| match request {
        Request::Keys { after, .. } => keys(*after, page.clone()),
        Request::Fetch { .. } => Response::Events {
            events: vec![held.clone()],
            too_large: Vec::new(),
        },
    })
    .await
}

/// An honest peer of log `log_id` holding `held` at seqs 1, 2, ...: `Keys` pages list them
/// with their digests, `Fetch` gives those asked for.
async fn honest_peer(log_id: u64, held: Vec<Event>) -> Liar {
    let page: Vec<Entry> = held
        .iter()
        .zip(1..)
        .map(|(e, seq)| entry(seq, e, digest(e)))
        .collect();
    let len = held.len() as u64;
    liar(move |request| match request {
        Request::Keys { after, .. } => Response::Keys {
            log_id,
            len,
            entries: page.iter().filter(|e| e.seq > *after).cloned().collect(),
            through: Some(len),
        },
        Request::Fetch { keys, .. } => Response::Events {
            events: held
                .iter()
                .filter(|e| keys.contains(&e.key()))
                .cloned()
                .collect(),
            too_large: Vec::new(),
        },
    })
    .await
}

/// A liar that leaves a request unanswered (holding it open) where `answer` gives `None`.
async fn sometimes_silent_liar(
    mut answer: impl FnMut(&Request) -> Option<Response> + Send + 'static,
) -> Liar {
    let (mut swarm, addr) = raw_peer().await;
    let keys_requests = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&keys_requests);
    let task = tokio::spawn(async move {
        let mut unanswered = Vec::new();
        loop {
            if let SwarmEvent::Behaviour(request_response::Event::Message {
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            }) = swarm.select_next_some().await
            {
                if matches!(request, Request::Keys { .. }) {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
                match answer(&request) {
                    Some(response) => {
                        let _ = swarm.behaviour_mut().send_response(channel, response);
                    }
                    None => unanswered.push(channel),
                }
            }
        }
    });
    Liar {
        addr,
        keys_requests,
        task,
    }
}

/// An honest peer that runs catch-up only on connecting (no periodic round during the test).
async fn honest(dir: &std::path::Path, name: &str) -> Arc<P2PSyncClient> {
    let client = builder(dir, name)
        .anti_entropy_interval(Duration::from_secs(3600))
        .build()
        .expect("build");
    client.start().await.expect("start");
    Arc::new(client)
}

/// Collects the peers the `error` notifications blame with `PeerMisbehaved`, and counts the
/// `conflict` notifications.
struct Watch {
    blamed: Arc<Mutex<Vec<(PeerId, String)>>>,
    conflicts: Arc<AtomicUsize>,
    _subs: [Subscription; 2],
}

impl Watch {
    fn new(p: &P2PSyncClient) -> Self {
        let blamed = Arc::new(Mutex::new(Vec::new()));
        let b = Arc::clone(&blamed);
        let errors = p.notifier().on_kind(NotificationKind::Error, move |n| {
            if let Notification::Error(e) = n
                && let SyncError::Transport(source) = e.as_ref()
                && let Some(P2PError::PeerMisbehaved { peer, reason }) =
                    source.downcast_ref::<P2PError>()
            {
                b.lock().expect("lock").push((*peer, reason.clone()));
            }
        });
        let conflicts = Arc::new(AtomicUsize::new(0));
        let c = Arc::clone(&conflicts);
        let conflict_sub = p.notifier().on_kind(NotificationKind::Conflict, move |_| {
            c.fetch_add(1, Ordering::SeqCst);
        });
        Self {
            blamed,
            conflicts,
            _subs: [errors, conflict_sub],
        }
    }

    fn blamed(&self) -> Vec<(PeerId, String)> {
        self.blamed.lock().expect("lock").clone()
    }
}

fn peer_of(addr: &Multiaddr) -> PeerId {
    addr.iter()
        .find_map(|p| match p {
            libp2p::multiaddr::Protocol::P2p(peer) => Some(peer),
            _ => None,
        })
        .expect("a /p2p/ address")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_that_does_not_advance_is_refused_not_asked_for_forever() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = honest(dir.path(), "a").await;
    let watch = Watch::new(&a);
    let held = event("liar", 1);
    // Whatever cursor it is asked from, the liar answers with its first page again.
    let liar = liar_holding_one(|_, page| Response::Keys {
        log_id: 7,
        len: 1,
        entries: page,
        through: None,
    })
    .await;
    a.connect_to_peer(&liar.addr.to_string())
        .await
        .expect("connect");
    // The event it did hold is kept; the round ends: one page, then the refused repeat.
    let id = held.id.clone();
    wait_until(10, "the held event arrives", || {
        keys(&a).contains(&(id.clone(), 1))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let asked = liar.keys_requests.load(Ordering::SeqCst);
    assert!(asked <= 3, "asked the liar {asked} times for keys");
    wait_until(10, "the liar is blamed", || !watch.blamed().is_empty()).await;
    let blamed = watch.blamed();
    assert_eq!(blamed[0].0, peer_of(&liar.addr));
    assert!(blamed[0].1.contains("seq 1"), "{}", blamed[0].1);
    // The next round (here asked for at once) tries again, once.
    a.sync_now().await.expect("sync");
    wait_until(10, "blamed again", || watch.blamed().len() >= 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let asked_again = liar.keys_requests.load(Ordering::SeqCst);
    assert!(asked_again <= asked + 2, "asked {asked_again} times");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_id_that_changes_on_every_answer_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = honest(dir.path(), "a").await;
    let watch = Watch::new(&a);
    let mut log_id = 0u64;
    // Honest-looking pages, but a new log id each time: each would restart the walk at 0.
    let liar = liar_holding_one(move |after, page| {
        log_id += 1;
        Response::Keys {
            log_id,
            len: 1,
            entries: if after == 0 { page } else { Vec::new() },
            through: None,
        }
    })
    .await;
    a.connect_to_peer(&liar.addr.to_string())
        .await
        .expect("connect");
    wait_until(10, "the held event arrives", || {
        keys(&a).contains(&("liar-1".to_owned(), 1))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let asked = liar.keys_requests.load(Ordering::SeqCst);
    assert!(asked <= 4, "asked the liar {asked} times for keys");
    wait_until(10, "the liar is blamed", || !watch.blamed().is_empty()).await;
    assert!(
        watch.blamed()[0].1.contains("log id changed"),
        "{:?}",
        watch.blamed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_copies_of_one_revision_count_once_and_unasked_events_are_skipped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = honest(dir.path(), "a").await;
    let watch = Watch::new(&a);
    // We hold a large revision; the liar claims another content for it and answers the fetch
    // with hundreds of different tiny copies, plus an event nobody asked for.
    let ours = Event::new("shared", "t", json!("x".repeat(32 * 1024)), 1).with_origin("a");
    a.broadcast(ours.clone()).await.expect("broadcast");
    let theirs = |n: usize| Event::new("shared", "t", json!(n), 2).with_origin("liar");
    let hash = digest(&theirs(0));
    let liar = liar(move |request| match request {
        Request::Keys { after, .. } => Response::Keys {
            log_id: 9,
            len: 1,
            entries: if *after == 0 {
                vec![Entry {
                    seq: 1,
                    id: "shared".into(),
                    version: 1,
                    hash,
                }]
            } else {
                Vec::new()
            },
            through: None,
        },
        Request::Fetch { .. } => Response::Events {
            events: (0..300).map(theirs).chain([event("unasked", 1)]).collect(),
            too_large: Vec::new(),
        },
    })
    .await;
    a.connect_to_peer(&liar.addr.to_string())
        .await
        .expect("connect");
    wait_until(10, "the conflict is settled", || {
        watch.conflicts.load(Ordering::SeqCst) >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        watch.conflicts.load(Ordering::SeqCst),
        1,
        "one conflict, not one per copy"
    );
    wait_until(10, "the liar is blamed", || !watch.blamed().is_empty()).await;
    let reason = watch.blamed()[0].1.clone();
    assert!(
        reason.contains("1 events not asked for") && reason.contains("299 repeated"),
        "{reason}"
    );
    let held = keys(&a);
    assert!(held.contains(&("shared".to_owned(), 1)), "ours is kept");
    assert!(!held.iter().any(|(id, _)| id == "unasked-1"));
}

/// Answers a reader cannot take (over the 16 MiB response limit, or not a message of the
/// protocol) end the round with a typed error; what the peer already holds stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_answers_are_reported_and_lose_nothing() {
    for oversized in [true, false] {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = honest(dir.path(), "a").await;
        a.broadcast(event("a", 1)).await.expect("stored");
        let watch = Watch::new(&a);
        let liar = liar(move |_| {
            if oversized {
                let huge = "k".repeat(20 * 1024);
                Response::Keys {
                    log_id: 1,
                    len: 1024,
                    entries: (1..=1024)
                        .map(|seq| Entry {
                            seq,
                            id: format!("{huge}{seq}"),
                            version: 1,
                            hash: 0,
                        })
                        .collect(),
                    through: None,
                }
            } else {
                Response::Bogus(7)
            }
        })
        .await;
        a.connect_to_peer(&liar.addr.to_string())
            .await
            .expect("connect");
        // 20 MiB written and refused through Noise in a debug build, beside the crate's other
        // tests in one binary: seconds of CPU; the bound only ends a run that would hang.
        wait_until(60, "the unreadable answer is reported", || {
            !watch.blamed().is_empty()
        })
        .await;
        let (peer, reason) = watch.blamed()[0].clone();
        assert_eq!(peer, peer_of(&liar.addr));
        assert!(reason.contains("could not be read"), "{reason}");
        assert_eq!(keys(&a).len(), 1, "what a held is kept");
        assert!(liar.keys_requests.load(Ordering::SeqCst) >= 1);
    }
}

/// A peer that lists what others hold and never sends it: the honest peer's session, which
/// leaves keys being fetched elsewhere to that fetch, fetches them itself after a short wait
/// instead of waiting for the liar's request to time out (30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_sends_what_it_lists_does_not_hold_up_catch_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = peer(dir.path(), "b").await;
    let events: Vec<Event> = (0..50).map(|n| event("b", n)).collect();
    for e in &events {
        b.broadcast(e.clone()).await.expect("stored");
    }
    let page: Vec<Entry> = events
        .iter()
        .zip(1..)
        .map(|(e, seq)| entry(seq, e, digest(e)))
        .collect();
    let liar = sometimes_silent_liar(move |request| match request {
        Request::Keys { after: 0, .. } => Some(Response::Keys {
            log_id: 3,
            len: page.len() as u64,
            entries: page.clone(),
            through: None,
        }),
        Request::Keys { .. } => Some(Response::Keys {
            log_id: 3,
            len: page.len() as u64,
            entries: Vec::new(),
            through: None,
        }),
        Request::Fetch { .. } => None,
    })
    .await;
    let a = Arc::new(
        builder(dir.path(), "a")
            .anti_entropy_interval(Duration::from_secs(3600))
            .request_timeout(Duration::from_secs(30))
            .build()
            .expect("build"),
    );
    a.start().await.expect("start");
    a.connect_to_peer(&liar.addr.to_string())
        .await
        .expect("connect");
    wait_until(10, "a asks the liar for the events", || {
        liar.keys_requests.load(Ordering::SeqCst) >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    link(&a, &b).await;
    wait_until(10, "a gets b's events from b", || keys(&a).len() == 50).await;
}

/// A page's `through` (where it ends, past events kept home) must lie between its last entry
/// and the log's length: one past the log would move the cursor past events not yet written,
/// one before its entries would have the same page asked for again. Either is refused before
/// anything of the page is fetched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_that_ends_past_its_log_or_before_its_entries_is_refused() {
    for (through, said) in [(5, "a log of 1 events"), (0, "ends at seq 0")] {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = honest(dir.path(), "a").await;
        let watch = Watch::new(&a);
        let liar = liar_holding_one(move |_, page| Response::Keys {
            log_id: 4,
            len: 1,
            entries: page,
            through: Some(through),
        })
        .await;
        a.connect_to_peer(&liar.addr.to_string())
            .await
            .expect("connect");
        wait_until(10, "the liar is blamed", || !watch.blamed().is_empty()).await;
        let (peer, reason) = watch.blamed()[0].clone();
        assert_eq!(peer, peer_of(&liar.addr));
        assert!(reason.contains(said), "{reason}");
        assert!(keys(&a).is_empty(), "nothing of a refused page is fetched");
    }
}

/// An honest peer that runs catch-up only on connecting, on a log file at `path`.
async fn honest_on_file(dir: &std::path::Path, path: &std::path::Path) -> Arc<P2PSyncClient> {
    honest_on_file_capped(dir, path, ksync_p2p::DEFAULT_MAX_PEER_CURSORS).await
}

/// [`honest_on_file`] keeping cursors for at most `max_peer_cursors` peers.
async fn honest_on_file_capped(
    dir: &std::path::Path,
    path: &std::path::Path,
    max_peer_cursors: usize,
) -> Arc<P2PSyncClient> {
    let storage: Arc<dyn ksync_core::Storage> =
        Arc::new(ksync_storage_file::FileStorage::open(path).expect("open the log"));
    let replica = ksync_core::Replica::open(storage).await.expect("replica");
    let client = builder(dir, "a")
        .anti_entropy_interval(Duration::from_secs(3600))
        .max_peer_cursors(max_peer_cursors)
        .replica(replica)
        .build()
        .expect("build");
    client.start().await.expect("start");
    Arc::new(client)
}

fn file_len(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).expect("the log file").len()
}

/// Waits until the liar has been asked for `n` pages, then a little longer, and returns how
/// many it was asked for in all (so a test sees that the asking stopped at `n`).
async fn asked_after(liar: &Liar, n: usize) -> usize {
    let counter = Arc::clone(&liar.keys_requests);
    wait_until(20, "the liar is asked for its pages", || {
        counter.load(Ordering::SeqCst) >= n
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    liar.keys_requests.load(Ordering::SeqCst)
}

/// A peer that says its log is endless and moves each page on by one sequence number: no
/// honest responder ends a page short of its log's end with fewer than `limit` keys and fewer
/// than `limit` sequence numbers covered, so the first such page is refused (a typed error),
/// the round ends and nothing is stored for it, instead of a cursor record per page forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_log_walked_one_seq_at_a_time_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("a.log");
    let a = honest_on_file(dir.path(), &path).await;
    let watch = Watch::new(&a);
    let liar = liar(|request| match request {
        Request::Keys { after, .. } => Response::Keys {
            log_id: 5,
            len: u64::MAX,
            entries: Vec::new(),
            through: Some(after + 1),
        },
        Request::Fetch { .. } => Response::Events {
            events: Vec::new(),
            too_large: Vec::new(),
        },
    })
    .await;
    let before = file_len(&path);
    a.connect_to_peer(&liar.addr.to_string())
        .await
        .expect("connect");
    wait_until(10, "the liar is blamed", || !watch.blamed().is_empty()).await;
    let (peer, reason) = watch.blamed()[0].clone();
    assert_eq!(peer, peer_of(&liar.addr));
    assert!(reason.contains("short of its log"), "{reason}");
    assert_eq!(asked_after(&liar, 1).await, 1, "one page, refused");
    assert_eq!(stored_cursor(&a, &peer), None, "no cursor is stored");
    assert_eq!(file_len(&path), before, "nothing stored for a refused page");
}

/// A peer whose log grows by a full page with every answer (each page its log's end): the
/// round takes the pages the first answer's length called for plus a slack (8 + 16), then
/// ends without blame; the next round walks on from where it stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_outgrows_the_walk_is_left_to_the_next_round() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = honest(dir.path(), "a").await;
    let watch = Watch::new(&a);
    let afters = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&afters);
    let liar = liar(move |request| match request {
        Request::Keys { after, .. } => {
            seen.lock().expect("lock").push(*after);
            Response::Keys {
                log_id: 6,
                len: after + 8192,
                entries: Vec::new(),
                through: Some(after + 8192),
            }
        }
        Request::Fetch { .. } => Response::Events {
            events: Vec::new(),
            too_large: Vec::new(),
        },
    })
    .await;
    a.connect_to_peer(&liar.addr.to_string())
        .await
        .expect("connect");
    assert_eq!(
        asked_after(&liar, 24).await,
        24,
        "8 pages needed + 16 slack"
    );
    let peer = peer_of(&liar.addr);
    assert_eq!(
        stored_cursor(&a, &peer),
        Some((24 * 8192, 6)),
        "stored at the round's end"
    );
    a.sync_now().await.expect("sync");
    assert_eq!(asked_after(&liar, 48).await, 48);
    assert_eq!(afters.lock().expect("lock")[24], 24 * 8192, "walks on");
    assert!(watch.blamed().is_empty(), "{:?}", watch.blamed());
}

/// A peer that says its log is endless (`len = u64::MAX`) and answers with honest-looking
/// empty pages, each covering 8,192 sequence numbers: one round asks it for at most 1,024
/// pages, and stores its cursor every 64 pages and at the end, not once per page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_walks_an_endless_log_for_a_bounded_number_of_pages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("a.log");
    let a = honest_on_file(dir.path(), &path).await;
    let watch = Watch::new(&a);
    let liar = liar(|request| match request {
        Request::Keys { after, .. } => Response::Keys {
            log_id: 8,
            len: u64::MAX,
            entries: Vec::new(),
            through: Some(after + 8192),
        },
        Request::Fetch { .. } => Response::Events {
            events: Vec::new(),
            too_large: Vec::new(),
        },
    })
    .await;
    let before = file_len(&path);
    a.connect_to_peer(&liar.addr.to_string())
        .await
        .expect("connect");
    assert_eq!(asked_after(&liar, 1024).await, 1024);
    let peer = peer_of(&liar.addr);
    assert_eq!(stored_cursor(&a, &peer), Some((1024 * 8192, 8)));
    // A cursor record names the peer (52 characters), the cursor, the log id and a use
    // stamp: one per page would grow the file by well over 50 KiB; one every 64 pages (17 in
    // all) by a few KiB.
    let grown = file_len(&path) - before;
    assert!(grown < 1024 * 16, "the log file grew by {grown} bytes");
    assert!(watch.blamed().is_empty(), "{:?}", watch.blamed());
}

/// The catch-up cursor and log id `p` stored for `peer`.
fn stored_cursor(p: &P2PSyncClient, peer: &PeerId) -> Option<(u64, u64)> {
    ksync_p2p::stored_peer_cursor(&**p.replica().storage(), peer).expect("meta")
}

/// Cursors are stored only when they change: a peer with an empty log leaves no record at
/// all, and rounds that find nothing new write nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursors_are_stored_only_when_they_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("a.log");
    let a = honest_on_file(dir.path(), &path).await;
    let empty = liar(|_| Response::Keys {
        log_id: 11,
        len: 0,
        entries: Vec::new(),
        through: Some(0),
    })
    .await;
    let holding = liar_holding_one(|after, page| Response::Keys {
        log_id: 12,
        len: 1,
        entries: if after == 0 { page } else { Vec::new() },
        through: Some(1),
    })
    .await;
    // Each request after a `sync_now` comes once the round before it has ended (and stored
    // what it would store).
    let rounds = |liar: &Liar, from: usize| {
        let a = Arc::clone(&a);
        let counter = Arc::clone(&liar.keys_requests);
        async move {
            for n in from..from + 2 {
                a.sync_now().await.expect("sync");
                let c = Arc::clone(&counter);
                wait_until(10, "the next round", move || c.load(Ordering::SeqCst) > n).await;
            }
        }
    };
    a.connect_to_peer(&empty.addr.to_string())
        .await
        .expect("connect");
    rounds(&empty, 1).await;
    assert_eq!(stored_cursor(&a, &peer_of(&empty.addr)), None);

    a.connect_to_peer(&holding.addr.to_string())
        .await
        .expect("connect");
    let counter = Arc::clone(&holding.keys_requests);
    wait_until(10, "the first round", || {
        counter.load(Ordering::SeqCst) >= 2
    })
    .await;
    rounds(&holding, 2).await;
    let peer = peer_of(&holding.addr);
    assert_eq!(stored_cursor(&a, &peer), Some((1, 12)));
    let size = file_len(&path);
    rounds(&holding, 4).await;
    assert_eq!(
        file_len(&path),
        size,
        "rounds with nothing new store nothing"
    );
}

/// A peer whose log holds one event of its own, `<name>-1`, in log `log_id`: records the
/// `after` of every `Keys` request and counts `Fetch` requests.
struct Holder {
    liar: Liar,
    afters: Arc<Mutex<Vec<u64>>>,
    fetches: Arc<AtomicUsize>,
}

async fn holder(name: &str, log_id: u64) -> Holder {
    let held = event(name, 1);
    let page = vec![entry(1, &held, digest(&held))];
    let afters = Arc::new(Mutex::new(Vec::new()));
    let fetches = Arc::new(AtomicUsize::new(0));
    let (seen, fetched) = (Arc::clone(&afters), Arc::clone(&fetches));
    let liar = liar(move |request| match request {
        Request::Keys { after, .. } => {
            seen.lock().expect("lock").push(*after);
            Response::Keys {
                log_id,
                len: 1,
                entries: if *after == 0 {
                    page.clone()
                } else {
                    Vec::new()
                },
                through: Some(1),
            }
        }
        Request::Fetch { .. } => {
            fetched.fetch_add(1, Ordering::SeqCst);
            Response::Events {
                events: vec![held.clone()],
                too_large: Vec::new(),
            }
        }
    })
    .await;
    Holder {
        liar,
        afters,
        fetches,
    }
}

/// Connects `a` to `h` (of log `log_id`) and waits until the cursor past its event is stored.
async fn walk_holder(a: &P2PSyncClient, h: &Holder, log_id: u64) {
    a.connect_to_peer(&h.liar.addr.to_string())
        .await
        .expect("connect");
    let peer = peer_of(&h.liar.addr);
    wait_until(10, "the holder's cursor is stored", || {
        stored_cursor(a, &peer) == Some((1, log_id))
    })
    .await;
}

/// More peers than `max_peer_cursors` (2 here) leave at most 2 cursor records, in the log
/// file and after restarts: each new peer's cursor takes the least recently used peer's
/// record. The evicted peer is walked from 0 at its next session, which fetches nothing we
/// hold (no event stored twice, none lost) and stores its cursor again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_peers_than_the_cursor_cap_keep_cap_cursors_and_the_evicted_walks_from_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("a.log");
    let start_a = || honest_on_file_capped(dir.path(), &path, 2);
    let holders = [
        holder("h0", 20).await,
        holder("h1", 21).await,
        holder("h2", 22).await,
    ];
    let peers: Vec<PeerId> = holders.iter().map(|h| peer_of(&h.liar.addr)).collect();
    let slot_records = |a: &P2PSyncClient| {
        let replica = a.replica();
        (0..8)
            .filter(|i| {
                let key = format!("p2p/cursor-slot/{i}");
                replica.storage().meta(&key).expect("meta").is_some()
            })
            .count()
    };
    // One session per run of `a`, so the order of use is the order of the runs.
    for (n, h) in holders.iter().enumerate() {
        let a = start_a().await;
        walk_holder(&a, h, 20 + n as u64).await;
        assert_eq!(h.fetches.load(Ordering::SeqCst), 1, "its event fetched");
        assert_eq!(slot_records(&a), (n + 1).min(2));
        a.stop().await.expect("stop");
        drop(a);
    }
    let a = start_a().await;
    assert_eq!(slot_records(&a), 2, "at most the cap, after a restart too");
    assert_eq!(
        stored_cursor(&a, &peers[0]),
        None,
        "the least recently used"
    );
    assert_eq!(stored_cursor(&a, &peers[1]), Some((1, 21)));
    assert_eq!(stored_cursor(&a, &peers[2]), Some((1, 22)));
    assert_eq!(a.replica().storage().len(), 3);

    // The evicted peer again: walked from 0, nothing fetched twice, its cursor back (the
    // least recently used, h1's, goes).
    holders[0].afters.lock().expect("lock").clear();
    walk_holder(&a, &holders[0], 20).await;
    assert_eq!(holders[0].afters.lock().expect("lock")[0], 0, "from 0");
    assert_eq!(
        holders[0].fetches.load(Ordering::SeqCst),
        1,
        "what we hold is not fetched again"
    );
    assert_eq!(a.replica().storage().len(), 3, "no event stored twice");
    assert_eq!(stored_cursor(&a, &peers[1]), None);
    assert_eq!(stored_cursor(&a, &peers[2]), Some((1, 22)));
    assert_eq!(slot_records(&a), 2);
    // A peer kept in a slot resumes from its cursor.
    holders[2].afters.lock().expect("lock").clear();
    a.connect_to_peer(&holders[2].liar.addr.to_string())
        .await
        .expect("connect");
    let afters = Arc::clone(&holders[2].afters);
    wait_until(10, "the kept holder is asked", || {
        !afters.lock().expect("lock").is_empty()
    })
    .await;
    assert_eq!(
        holders[2].afters.lock().expect("lock")[0],
        1,
        "from its cursor"
    );
    assert_eq!(holders[2].fetches.load(Ordering::SeqCst), 1);
}

/// A cursor slot this version cannot read (here as a newer version might write one: with a
/// field more) is left as it is, across restarts: not taken by a peer, not the one evicted,
/// not tidied away by a lower cap. The cap counts only the records this version writes, so
/// the peers met keep their cursors in the other slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_slot_this_version_cannot_read_is_left_as_it_is() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("a.log");
    let newer = format!("{} 5 7 3 newer-field", PeerId::random());
    {
        let storage = ksync_storage_file::FileStorage::open(&path).expect("open the log");
        ksync_core::Storage::set_meta(&storage, "p2p/cursor-slot/0", &newer)
            .await
            .expect("meta");
    }
    let holders = [holder("h0", 40).await, holder("h1", 41).await];
    let peers: Vec<PeerId> = holders.iter().map(|h| peer_of(&h.liar.addr)).collect();
    let slot_0 = |a: &P2PSyncClient| {
        let replica = a.replica();
        let kept = replica.storage().meta("p2p/cursor-slot/0").expect("meta");
        assert_eq!(kept.as_deref(), Some(newer.as_str()), "the unreadable slot");
    };
    // One run per holder, with a cap of 2: both cursors are stored, beside the slot.
    for (n, h) in holders.iter().enumerate() {
        let a = honest_on_file_capped(dir.path(), &path, 2).await;
        slot_0(&a);
        walk_holder(&a, h, 40 + n as u64).await;
        slot_0(&a);
        a.stop().await.expect("stop");
    }
    // A cap of 1: the cursor beyond it goes, the unreadable slot stays.
    let a = honest_on_file_capped(dir.path(), &path, 1).await;
    slot_0(&a);
    assert_eq!(stored_cursor(&a, &peers[0]), Some((1, 40)));
    assert_eq!(stored_cursor(&a, &peers[1]), None, "beyond the cap");
    // Full: a new peer's cursor takes the least recently used peer's slot, not that one.
    walk_holder(&a, &holders[1], 41).await;
    assert_eq!(stored_cursor(&a, &peers[0]), None, "evicted");
    slot_0(&a);
    assert_eq!(a.replica().storage().len(), 2, "each holder's event once");
}

/// A cursor stored before the cursor slots (`cursor/p2p/<peer>` and its log id) is used,
/// moved into a slot at the next store and its old records removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_of_the_old_layout_is_used_and_moved_into_a_slot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("a.log");
    let h = holder("h", 30).await;
    let peer = peer_of(&h.liar.addr);
    {
        let storage: Arc<dyn ksync_core::Storage> =
            Arc::new(ksync_storage_file::FileStorage::open(&path).expect("open the log"));
        let replica = ksync_core::Replica::open(storage).await.expect("replica");
        // As if we had walked the whole log before (its event came by gossip).
        replica.ingest(vec![event("h", 1)]).await.expect("ingest");
        replica
            .set_cursor(&format!("p2p/{peer}"), 1)
            .await
            .expect("cursor");
        replica
            .set_cursor(&format!("p2p/{peer}/log-id"), 30)
            .await
            .expect("log id");
    }
    let a = honest_on_file(dir.path(), &path).await;
    a.connect_to_peer(&h.liar.addr.to_string())
        .await
        .expect("connect");
    let afters = Arc::clone(&h.afters);
    wait_until(10, "the holder is asked", || {
        !afters.lock().expect("lock").is_empty()
    })
    .await;
    assert_eq!(h.afters.lock().expect("lock")[0], 1, "from the old cursor");
    // Moved at the round's end (or at the stop, whichever comes first).
    a.stop().await.expect("stop");
    let replica = a.replica();
    let storage = replica.storage();
    assert_eq!(stored_cursor(&a, &peer), Some((1, 30)));
    for key in [
        format!("cursor/p2p/{peer}"),
        format!("cursor/p2p/{peer}/log-id"),
    ] {
        assert_eq!(storage.meta(&key).expect("meta"), None, "{key} removed");
    }
    assert_eq!(h.fetches.load(Ordering::SeqCst), 0);
}

/// A log whose appends fail while `failing` is set (as a full disk's would); everything else
/// is an in-memory log's.
struct FailingStorage {
    log: ksync_core::InMemoryStorage,
    failing: Arc<std::sync::atomic::AtomicBool>,
}

impl ksync_core::Storage for FailingStorage {
    fn append(
        &self,
        events: Vec<Event>,
    ) -> ksync_core::BoxFuture<'_, Result<ksync_core::MergeOutcome, ksync_core::StorageError>> {
        if self.failing.load(Ordering::SeqCst) {
            return Box::pin(async {
                Err(ksync_core::StorageError::Io {
                    context: "appending".into(),
                    source: std::io::Error::other("disk full"),
                })
            });
        }
        self.log.append(events)
    }
    fn read_since(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<ksync_core::Stored>, ksync_core::StorageError> {
        self.log.read_since(after, limit)
    }
    fn get(
        &self,
        id: &str,
        version: u64,
    ) -> Result<Option<ksync_core::Stored>, ksync_core::StorageError> {
        self.log.get(id, version)
    }
    fn latest(&self, id: &str) -> Result<Option<ksync_core::Stored>, ksync_core::StorageError> {
        self.log.latest(id)
    }
    fn len(&self) -> u64 {
        self.log.len()
    }
    fn state(&self) -> Result<std::collections::BTreeMap<String, Event>, ksync_core::StorageError> {
        self.log.state()
    }
    fn meta(&self, key: &str) -> Result<Option<String>, ksync_core::StorageError> {
        self.log.meta(key)
    }
    fn set_meta(
        &self,
        key: &str,
        value: &str,
    ) -> ksync_core::BoxFuture<'_, Result<(), ksync_core::StorageError>> {
        self.log.set_meta(key, value)
    }
    fn remove_meta(
        &self,
        key: &str,
    ) -> ksync_core::BoxFuture<'_, Result<(), ksync_core::StorageError>> {
        self.log.remove_meta(key)
    }
}

/// Events a catch-up round received but could not store (the storage failed) are not
/// counted as held: the round ends with the cursor before them, and once the storage works
/// again the next round fetches every one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_the_storage_failed_to_store_are_fetched_again_by_the_next_round() {
    let dir = tempfile::tempdir().expect("tempdir");
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let storage: Arc<dyn ksync_core::Storage> = Arc::new(FailingStorage {
        log: ksync_core::InMemoryStorage::new(),
        failing: Arc::clone(&failing),
    });
    let replica = ksync_core::Replica::open(storage).await.expect("replica");
    let a = Arc::new(
        builder(dir.path(), "a")
            .anti_entropy_interval(Duration::from_secs(3600))
            .replica(replica)
            .build()
            .expect("build"),
    );
    a.start().await.expect("start");
    let storage_errors = Arc::new(AtomicUsize::new(0));
    let errors = Arc::clone(&storage_errors);
    let _sub = a.notifier().on_kind(NotificationKind::Error, move |n| {
        if let Notification::Error(e) = n
            && matches!(e.as_ref(), SyncError::Storage(_))
        {
            errors.fetch_add(1, Ordering::SeqCst);
        }
    });
    // An honest raw peer (no gossip: only catch-up can deliver) holding five events.
    let held: Vec<Event> = (1..=5).map(|n| event("h", n)).collect();
    let h = honest_peer(40, held).await;
    a.connect_to_peer(&h.addr.to_string())
        .await
        .expect("connect");
    wait_until(10, "storing the fetched events fails", || {
        storage_errors.load(Ordering::SeqCst) >= 1
    })
    .await;
    assert!(keys(&a).is_empty());
    // The failed answer is handled (and the round over) before the node takes this command.
    failing.store(false, Ordering::SeqCst);
    a.sync_now().await.expect("sync");
    wait_until(10, "the next round stores every event", || {
        keys(&a).len() == 5
    })
    .await;
    let peer = peer_of(&h.addr);
    wait_until(10, "the cursor is stored past them", || {
        stored_cursor(&a, &peer) == Some((5, 40))
    })
    .await;
}

/// A catch-up answer brings a new event and a revision that conflicts with one held here;
/// writing the revision that settles the conflict fails after the new event was stored. The
/// new event is reported (`event`) all the same: the next round fetches the answer again and
/// finds it a duplicate, and reports it no more. That round settles the conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stored_before_a_failed_resolution_are_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = Arc::new(ksync_testkit::FailAppend::new(
        Arc::new(ksync_core::InMemoryStorage::new()),
        // The revision settling the conflict over `x`.
        |events| events.iter().any(|e| e.id == "x" && e.version == 2),
    ));
    let replica = ksync_core::Replica::open(storage.clone() as Arc<dyn ksync_core::Storage>)
        .await
        .expect("replica");
    replica
        .ingest(vec![
            Event::new("x", "t", json!("elsewhere"), 1).with_origin("other"),
        ])
        .await
        .expect("held");
    let a = Arc::new(
        builder(dir.path(), "a")
            .anti_entropy_interval(Duration::from_secs(3600))
            .replica(replica)
            .build()
            .expect("build"),
    );
    a.start().await.expect("start");
    let reported = ksync_testkit::EventRecorder::new(a.notifier());
    // An honest raw peer (no gossip: only catch-up can deliver) holding y and its x.
    let held = vec![
        Event::new("y", "t", json!("new"), 2).with_origin("them"),
        Event::new("x", "t", json!("theirs"), 2).with_origin("them"),
    ];
    let h = honest_peer(41, held).await;
    a.connect_to_peer(&h.addr.to_string())
        .await
        .expect("connect");
    wait_until(10, "writing the resolution fails", || storage.failed()).await;
    // The failed answer is handled (and the round over) before the node takes this command.
    a.sync_now().await.expect("sync");
    wait_until(10, "the next round settles x", || {
        a.replica()
            .storage()
            .latest("x")
            .ok()
            .flatten()
            .is_some_and(|x| x.event.version == 2)
    })
    .await;
    assert_eq!(reported.ids(), ["y"], "y reported once");
}

/// An `Events` answer that calls keys too large which were never asked for is no progress:
/// the keys are ignored (the peer is blamed), the round ends instead of sending the same
/// `Fetch` forever, and nothing is remembered for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_large_keys_not_asked_for_do_not_keep_a_round_fetching() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = honest(dir.path(), "a").await;
    let watch = Watch::new(&a);
    let fetches = Arc::new(AtomicUsize::new(0));
    // Fetches seen when each `Keys` request came.
    let fetches_at_keys = Arc::new(Mutex::new(Vec::new()));
    let (f, at) = (Arc::clone(&fetches), Arc::clone(&fetches_at_keys));
    let wanted = event("liar", 1);
    let page = vec![entry(1, &wanted, digest(&wanted))];
    let liar = liar(move |request| match request {
        Request::Keys { after, .. } => {
            at.lock().expect("lock").push(f.load(Ordering::SeqCst));
            Response::Keys {
                log_id: 41,
                len: 1,
                entries: if *after == 0 {
                    page.clone()
                } else {
                    Vec::new()
                },
                through: Some(1),
            }
        }
        Request::Fetch { .. } => {
            f.fetch_add(1, Ordering::SeqCst);
            Response::Events {
                events: Vec::new(),
                too_large: (0..1000)
                    .map(|n| ksync_core::RevisionKey {
                        id: format!("bogus-{n}"),
                        version: 1,
                    })
                    .collect(),
            }
        }
    })
    .await;
    a.connect_to_peer(&liar.addr.to_string())
        .await
        .expect("connect");
    // A round asked for now starts only once the connect-time round has ended.
    a.sync_now().await.expect("sync");
    let at = Arc::clone(&fetches_at_keys);
    wait_until(10, "the next round", || at.lock().expect("lock").len() >= 2).await;
    assert_eq!(
        fetches_at_keys.lock().expect("lock")[1],
        1,
        "one fetch in the first round"
    );
    wait_until(10, "the liar is blamed", || !watch.blamed().is_empty()).await;
    let (peer, reason) = watch.blamed()[0].clone();
    assert_eq!(peer, peer_of(&liar.addr));
    assert!(
        reason.contains("1000 keys not asked for called too large"),
        "{reason}"
    );
    assert!(keys(&a).is_empty());
    assert_eq!(stored_cursor(&a, &peer), None, "the cursor did not move");
}

/// No lie: a peer whose log got shorter under the same log id (a backup restored) answers a
/// page past its end with its real `len` and `through` at the request's `after` (the form
/// PROTOCOL allows besides no `through`). The requester takes that for the end of a shorter
/// log, not a page past the log: it walks the log again from 0, fetches what was appended
/// since, and blames no one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_past_the_end_of_a_shorter_log_restarts_the_walk_without_blame() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = honest(dir.path(), "a").await;
    let watch = Watch::new(&a);
    let before: Vec<Event> = (1..=5).map(|n| event("h", n)).collect();
    let after_restore: Vec<Event> = before[..2]
        .iter()
        .cloned()
        .chain([event("new", 0), event("new", 1)])
        .collect();
    let restored = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let r = Arc::clone(&restored);
    let h = liar(move |request| {
        let log = if r.load(Ordering::SeqCst) {
            &after_restore
        } else {
            &before
        };
        let len = log.len() as u64;
        match request {
            Request::Keys { after, .. } if *after > len => Response::Keys {
                log_id: 60,
                len,
                entries: Vec::new(),
                through: Some(*after),
            },
            Request::Keys { after, .. } => Response::Keys {
                log_id: 60,
                len,
                entries: log
                    .iter()
                    .zip(1..)
                    .filter(|(_, seq)| seq > after)
                    .map(|(e, seq)| entry(seq, e, digest(e)))
                    .collect(),
                through: Some(len),
            },
            Request::Fetch { keys, .. } => Response::Events {
                events: log
                    .iter()
                    .filter(|e| keys.contains(&e.key()))
                    .cloned()
                    .collect(),
                too_large: Vec::new(),
            },
        }
    })
    .await;
    a.connect_to_peer(&h.addr.to_string())
        .await
        .expect("connect");
    let peer = peer_of(&h.addr);
    wait_until(10, "a walks the whole log", || {
        stored_cursor(&a, &peer) == Some((5, 60))
    })
    .await;
    restored.store(true, Ordering::SeqCst);
    a.sync_now().await.expect("sync");
    wait_until(10, "a gets what was appended after the restore", || {
        keys(&a).len() == 7
    })
    .await;
    wait_until(10, "the cursor is stored at the shorter log's end", || {
        stored_cursor(&a, &peer) == Some((4, 60))
    })
    .await;
    assert!(watch.blamed().is_empty(), "{:?}", watch.blamed());
}

/// A peer answering a fetch busy (its answers in flight at its `max_catch_up_answer_bytes`,
/// or ours at our share of it) is not blamed: the round ends with the cursor in place, and
/// the next round fetches the event. (A kSync node answers an honest peer, one request at a
/// time, never busy, so a raw peer plays the busy one.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_answer_ends_the_round_without_blame_and_the_next_round_fetches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = honest(dir.path(), "a").await;
    let watch = Watch::new(&a);
    let held = event("liar", 1);
    let page = [entry(1, &held, digest(&held))];
    let fetches = Arc::new(AtomicUsize::new(0));
    let f = Arc::clone(&fetches);
    let event_held = held.clone();
    let busy_peer = liar(move |request| match request {
        Request::Keys { after, .. } => Response::Keys {
            log_id: 7,
            len: 1,
            entries: page.iter().filter(|e| e.seq > *after).cloned().collect(),
            through: Some(1),
        },
        Request::Fetch { .. } if f.fetch_add(1, Ordering::SeqCst) == 0 => Response::Refused {
            reason: "busy".into(),
            busy: true,
        },
        Request::Fetch { .. } => Response::Events {
            events: vec![event_held.clone()],
            too_large: Vec::new(),
        },
    })
    .await;
    a.connect_to_peer(&busy_peer.addr.to_string())
        .await
        .expect("connect");
    wait_until(10, "a asks and is answered busy", || {
        fetches.load(Ordering::SeqCst) >= 1
    })
    .await;
    assert!(keys(&a).is_empty(), "nothing came with the busy answer");
    // A round asked for while the first is ending may be folded into it: asked until done.
    let id = held.id.clone();
    wait_until(10, "the next round fetches the event", || {
        if keys(&a).contains(&(id.clone(), 1)) {
            return true;
        }
        let a = Arc::clone(&a);
        tokio::spawn(async move { a.sync_now().await });
        false
    })
    .await;
    assert!(watch.blamed().is_empty(), "{:?}", watch.blamed());
}
