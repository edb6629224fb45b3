//! The spec's `connectToPeer('peer-123')`: peers announce their `peerId` when they connect,
//! and `connect_to_peer` takes it for a peer this node has met (also after it restarted).

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use ksync_core::{Notification, NotificationKind, SyncError};
use ksync_p2p::P2PError;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_peer_takes_the_spec_peer_id_of_a_peer_met_before() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = peer(dir.path(), "a").await;
    let b = peer(dir.path(), "peer-123").await;
    let b_id = b.local_peer_id();
    let err = a.connect_to_peer("peer-123").await.expect_err("never met");
    assert!(
        matches!(&err, P2PError::UnknownPeer(name) if name == "peer-123"),
        "{err:?}"
    );
    assert!(matches!(
        a.connect_to_peer("not a name").await,
        Err(P2PError::InvalidTarget(_))
    ));

    link(&a, &b).await;
    // The name arrives with identify, just after the connection.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match a.connect_to_peer("peer-123").await {
            Ok(peer) => {
                assert_eq!(peer, b_id);
                break;
            }
            Err(P2PError::UnknownPeer(_)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("connecting by name: {e}"),
        }
    }

    // It goes away and comes back on the same address: the name still reaches it.
    let port = b.listen_addrs()[0]
        .iter()
        .find_map(|p| match p {
            libp2p::multiaddr::Protocol::Tcp(port) => Some(port),
            _ => None,
        })
        .expect("tcp port");
    b.stop().await.expect("stop");
    drop(b);
    let a2 = Arc::clone(&a);
    wait_until(10, "a sees b gone", move || a2.connected_peers().is_empty()).await;
    let b = builder(dir.path(), "peer-123")
        .port(port)
        .build()
        .expect("build");
    b.start().await.expect("restart on the same port");
    assert_eq!(
        a.connect_to_peer("peer-123").await.expect("by name again"),
        b_id
    );
    assert_eq!(a.connected_peers(), vec![b_id]);
}

/// A second peer announcing a name a connected peer holds does not take it over: the name
/// still reaches the first, and the newcomer is blamed (`PeerMisbehaved`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_a_connected_peer_holds_is_not_taken_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Another key directory: the impostor has its own key under the same name.
    let other = tempfile::tempdir().expect("tempdir");
    let a = peer(dir.path(), "a").await;
    let alice = peer(dir.path(), "alice").await;
    let impostor = peer(other.path(), "alice").await;
    assert_ne!(alice.local_peer_id(), impostor.local_peer_id());
    let blamed = Arc::new(Mutex::new(Vec::new()));
    let b = Arc::clone(&blamed);
    let _sub = a.notifier().on_kind(NotificationKind::Error, move |n| {
        if let Notification::Error(e) = n
            && let SyncError::Transport(source) = e.as_ref()
            && let Some(P2PError::PeerMisbehaved { peer, reason }) =
                source.downcast_ref::<P2PError>()
        {
            b.lock().expect("lock").push((*peer, reason.clone()));
        }
    });
    link(&a, &alice).await;
    // The name arrives with identify, just after the connection.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match a.connect_to_peer("alice").await {
            Ok(peer) => {
                assert_eq!(peer, alice.local_peer_id());
                break;
            }
            Err(P2PError::UnknownPeer(_)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("connecting by name: {e}"),
        }
    }
    link(&impostor, &a).await;
    let seen = Arc::clone(&blamed);
    wait_until(10, "the impostor is blamed", move || {
        !seen.lock().expect("lock").is_empty()
    })
    .await;
    let (peer, reason) = blamed.lock().expect("lock")[0].clone();
    assert_eq!(peer, impostor.local_peer_id());
    assert!(reason.contains("\"alice\""), "{reason}");
    assert_eq!(
        a.connect_to_peer("alice").await.expect("by name"),
        alice.local_peer_id()
    );
}

/// A spec `peerId` that also reads as a libp2p peer id is refused by `build`:
/// `connect_to_peer` takes such a target for a libp2p id, so that peer could never be reached
/// by its name.
#[test]
fn a_peer_name_that_reads_as_a_libp2p_peer_id_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let libp2p_id = libp2p::PeerId::random().to_string();
    let Err(err) = builder(dir.path(), &libp2p_id).build() else {
        panic!("{libp2p_id} was taken as a peer name");
    };
    assert!(
        matches!(&err, P2PError::Config(reason) if reason.contains("libp2p peer id")),
        "{err:?}"
    );
    builder(dir.path(), "peer-123")
        .build()
        .expect("an ordinary name");
}
