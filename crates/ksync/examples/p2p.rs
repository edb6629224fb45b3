//! The spec's `P2PSyncClient`: `start`, `connectToPeer`, `broadcast`, and `KSync` over P2P.
//!
//! No server needed. Two peers run in this process: `my-unique-peer-id` with the spec's
//! options (mDNS discovery, encryption on: a private network keyed by a pre-shared key), and a
//! second peer that connects to it by address (`connect_to_peer`), since mDNS needs multicast,
//! which loopback does not carry. The spec listens on port 9000; pass a port as the first
//! argument to do the same (default 0: any free port).
//!
//! `cargo run -p ksync --features p2p --example p2p [-- 9000]`

use std::sync::Arc;
use std::time::Duration;

use ksync::p2p::NetworkKey;
use ksync::{DiscoveryMethod, Event, InMemoryStorage, KSync, P2PSyncClient};
use serde_json::json;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let port: u16 = match std::env::args().nth(1) {
        Some(p) => p.parse()?,
        None => 0,
    };
    // Identity keys are kept per peer id; a temporary folder keeps this example self-contained.
    let keys = tempfile::tempdir()?;
    // encryption: true — every peer of the network holds this key (share it like a password).
    let network_key = NetworkKey::generate();

    let sync_client = P2PSyncClient::builder("my-unique-peer-id", DiscoveryMethod::Mdns)
        .port(port)
        .listen_host([127, 0, 0, 1].into())
        .encryption(true)
        .network_key(network_key)
        .key_dir(keys.path())
        .build()?;
    let ksync = KSync::builder()
        .storage(Arc::new(InMemoryStorage::new()))
        .sync_client(Arc::new(sync_client))
        .build()
        .await?;

    // await ksync.start()
    ksync.start().await?;
    println!("P2P sync started on {:?}", ksync.client().addresses());

    // A second peer; it finds the first by address.
    let other = Arc::new(
        P2PSyncClient::builder("other-peer", DiscoveryMethod::Manual)
            .listen_host([127, 0, 0, 1].into())
            .encryption(true)
            .network_key(network_key)
            .key_dir(keys.path())
            .build()?,
    );
    other.start().await?;
    let address = ksync
        .client()
        .addresses()
        .first()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("the first peer has no address"))?;
    // await syncClient.connectToPeer('peer-123')  (a peer id or, as here, a full address)
    let connected = other.connect_to_peer(&address.to_string()).await?;
    println!("other-peer connected to {connected}");

    // Events automatically sync with discovered peers.
    let event = ksync
        .emit("peer_event", json!({"data": "hello peers"}))
        .await?;
    // broadcast(event) on a bare client stores and publishes it.
    other
        .broadcast(
            Event::new("greeting-1", "peer_event", json!({"data": "hello back"}), 1)
                .with_origin("other-peer"),
        )
        .await?;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let here = ksync.state()?;
        let there = other.replica().storage().state()?;
        if here.contains_key("greeting-1") && there.contains_key(&event.id) {
            println!("both peers hold both events");
            break;
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("peers did not sync within 15 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    other.stop().await?;
    ksync.disconnect().await?;
    Ok(())
}
