//! Peers of another protocol version (docs/PROTOCOL.md, P2P: identify announces
//! `/ksync/1/<network>`, "a peer announcing another is disconnected"): a libp2p peer that
//! announces `/ksync/2/ksync` is hung up on and reported, with both versions named.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use ksync_core::{Notification, NotificationKind};
use libp2p::swarm::SwarmEvent;
use libp2p::{SwarmBuilder, identify, noise, tcp, yamux};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_announcing_another_protocol_version_is_disconnected_and_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = peer(dir.path(), "a").await;
    let errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let e2 = Arc::clone(&errors);
    let _sub = a.notifier().on_kind(NotificationKind::Error, move |n| {
        if let Notification::Error(e) = n {
            e2.lock().expect("lock").push(e.to_string());
        }
    });
    let mut swarm = SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .expect("tcp")
        .with_behaviour(|key| {
            identify::Behaviour::new(identify::Config::new("/ksync/2/ksync".into(), key.public()))
        })
        .expect("behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    let addr = a.addresses()[0].clone();
    swarm.dial(addr).expect("dial");
    // Ours reads the identify, hangs up and reports it.
    let mut closed = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while closed.is_none() && tokio::time::Instant::now() < deadline {
        let ev = tokio::time::timeout(Duration::from_secs(10), swarm.select_next_some())
            .await
            .expect("event");
        if let SwarmEvent::ConnectionClosed { cause, .. } = ev {
            closed = Some(format!("{cause:?}"));
        }
    }
    assert!(closed.is_some(), "the connection was not closed");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(a.connected_peers().is_empty());
    assert!(
        errors
            .lock()
            .expect("lock")
            .iter()
            .any(|e| e.contains("\"/ksync/2/ksync\"") && e.contains("\"/ksync/1/ksync\"")),
        "{:?}",
        errors.lock().expect("lock")
    );
}
