//! A peer that lies in catch-up: a raw libp2p swarm speaks `/ksync/sync/1` (CBOR, the
//! message shapes of docs/PROTOCOL.md) and answers an honest peer's requests with pages that
//! do not advance, log ids that change on every answer, or many copies of one revision. The
//! honest peer refuses each with a typed error, stops asking, and loses nothing.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use ksync_core::{Event, Notification, NotificationKind, RevisionKey, Subscription, SyncError};
use ksync_p2p::{Multiaddr, P2PError, P2PSyncClient, PeerId};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{StreamProtocol, SwarmBuilder, noise, tcp, yamux};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Debug, Clone, Serialize, Deserialize)]
enum Request {
    Keys {
        network: String,
        after: u64,
        limit: u32,
    },
    Fetch {
        network: String,
        keys: Vec<RevisionKey>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    seq: u64,
    id: String,
    version: u64,
    hash: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum Response {
    Keys {
        log_id: u64,
        len: u64,
        entries: Vec<Entry>,
    },
    Events {
        events: Vec<Event>,
        too_large: Vec<RevisionKey>,
    },
    /// Not a message of the protocol.
    Bogus(u64),
}

/// PROTOCOL's catch-up digest: FNV-1a (64) of `type`, NUL, `timestamp` (8 bytes big-endian)
/// and `data` as compact JSON.
fn digest(event: &Event) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let data = serde_json::to_vec(&event.data).expect("encode");
    for b in event
        .event_type
        .as_bytes()
        .iter()
        .chain([0u8].iter())
        .chain(event.timestamp.to_be_bytes().iter())
        .chain(data.iter())
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn entry(seq: u64, event: &Event, hash: u64) -> Entry {
    Entry {
        seq,
        id: event.id.clone(),
        version: event.version,
        hash,
    }
}

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

/// A liar that leaves a request unanswered (holding it open) where `answer` gives `None`.
async fn sometimes_silent_liar(
    mut answer: impl FnMut(&Request) -> Option<Response> + Send + 'static,
) -> Liar {
    let mut swarm = SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .expect("tcp")
        .with_behaviour(|_| {
            // Room to send answers larger than any honest peer's.
            let codec = request_response::cbor::codec::Codec::<Request, Response>::default()
                .set_response_size_maximum(64 * 1024 * 1024);
            request_response::Behaviour::with_codec(
                codec,
                [(StreamProtocol::new("/ksync/sync/1"), ProtocolSupport::Full)],
                // Holds an unanswered request open as long as the requester waits.
                request_response::Config::default().with_request_timeout(Duration::from_secs(60)),
            )
        })
        .expect("behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    swarm
        .listen_on("/ip4/127.0.0.1/tcp/0".parse().expect("addr"))
        .expect("listen");
    let listen = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
            break address;
        }
    };
    let addr = listen.with(libp2p::multiaddr::Protocol::P2p(*swarm.local_peer_id()));
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
    let page = vec![entry(1, &held, digest(&held))];
    let served = held.clone();
    // Whatever cursor it is asked from, the liar answers with its first page again.
    let liar = liar(move |request| match request {
        Request::Keys { .. } => Response::Keys {
            log_id: 7,
            len: 1,
            entries: page.clone(),
        },
        Request::Fetch { .. } => Response::Events {
            events: vec![served.clone()],
            too_large: Vec::new(),
        },
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
    let held = event("liar", 1);
    let hash = digest(&held);
    let served = held.clone();
    let mut log_id = 0u64;
    // Honest-looking pages, but a new log id each time: each would restart the walk at 0.
    let liar = liar(move |request| match request {
        Request::Keys { after, .. } => {
            log_id += 1;
            Response::Keys {
                log_id,
                len: 1,
                entries: if *after == 0 {
                    vec![entry(1, &held, hash)]
                } else {
                    Vec::new()
                },
            }
        }
        Request::Fetch { .. } => Response::Events {
            events: vec![served.clone()],
            too_large: Vec::new(),
        },
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
                }
            } else {
                Response::Bogus(7)
            }
        })
        .await;
        a.connect_to_peer(&liar.addr.to_string())
            .await
            .expect("connect");
        wait_until(10, "the unreadable answer is reported", || {
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
        }),
        Request::Keys { .. } => Some(Response::Keys {
            log_id: 3,
            len: page.len() as u64,
            entries: Vec::new(),
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
