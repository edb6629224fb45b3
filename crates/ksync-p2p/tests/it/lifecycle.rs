//! Stopping and dropping a client end its node: the port is released, peers see it go, and
//! a stopped client starts again.

use crate::common;

use std::sync::Arc;

use common::*;

async fn port_is_free(port: u16) -> bool {
    tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_client_releases_its_port_and_its_peers_see_it_go() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = peer(dir.path(), "a").await;
    let b = peer(dir.path(), "b").await;
    link(&a, &b).await;
    let port = port_of(&a);
    // Dropped without stop (e.g. the application dropped its KSync).
    drop(a);
    let b2 = Arc::clone(&b);
    wait_until(10, "b sees a gone", move || b2.connected_peers().is_empty()).await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !port_is_free(port).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dropped client still listens on {port}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_client_releases_its_port_and_starts_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = peer(dir.path(), "a").await;
    let b = peer(dir.path(), "b").await;
    link(&a, &b).await;
    let port = port_of(&a);
    a.stop().await.expect("stop");
    assert!(a.connected_peers().is_empty());
    assert!(a.listen_addrs().is_empty());
    assert!(
        port_is_free(port).await,
        "stop returned with the port still bound"
    );
    a.start().await.expect("start again");
    link(&a, &b).await;
    a.broadcast(event("a", 1)).await.expect("broadcast");
    wait_until(10, "b gets the event", || keys(&b).len() == 1).await;
}

/// Listening on every interface (the default), `start` returns with an address for each, so
/// what an application prints right away (`ksync peer` does) includes the ones other hosts
/// can reach, not only loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_returns_with_an_address_per_interface() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = builder(dir.path(), "a")
        .listen_host(ksync_p2p::DEFAULT_LISTEN_HOST)
        .build()
        .expect("build");
    a.start().await.expect("start");
    let mut at_start = a.listen_addrs();
    at_start.sort();
    // Give interfaces reported late every chance to show up before comparing.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let mut settled = a.listen_addrs();
    settled.sort();
    assert!(!at_start.is_empty());
    assert_eq!(at_start, settled, "addresses reported after start returned");
}
