//! Heartbeats after a stall: a loop held up (a blocking append, a slow middleware) while the
//! peer kept answering must not take the answer waiting in the socket for a dead peer.

use crate::common;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use ksync_core::{
    AllowAll, BoxFuture, Direction, Event, InMemoryStorage, LogName, MergeOutcome, Notification,
    Storage, StorageError, StorageProvider, Stored, SyncClient,
};
use ksync_ws::server::RelayConfig;
use ksync_ws::{WebSocketSyncClient, WsError};
use serde_json::json;

/// A second runtime, for the side that must keep answering while the test's own stalls.
fn other_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

/// The heartbeat failures notified (the client's own timeout, or the relay's close 4009).
fn heartbeat_failures(rec: &Recorder) -> Vec<String> {
    rec.all()
        .into_iter()
        .filter_map(|n| match n {
            Notification::Error(e) => match WsError::find(&e) {
                Some(w @ (WsError::HeartbeatTimeout(_) | WsError::Closed { code: 4009, .. })) => {
                    Some(w.to_string())
                }
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// A log whose appends block the calling thread (a slow disk on a synchronous path): the
/// relay's runtime stalls for each.
struct BlockingAppend {
    log: InMemoryStorage,
}

impl Storage for BlockingAppend {
    fn append(&self, events: Vec<Event>) -> BoxFuture<'_, Result<MergeOutcome, StorageError>> {
        std::thread::sleep(Duration::from_millis(250));
        self.log.append(events)
    }
    fn read_since(&self, after: u64, limit: usize) -> Result<Vec<Stored>, StorageError> {
        self.log.read_since(after, limit)
    }
    ksync_testkit::storage_pass_through!(log);
}

#[derive(Default)]
struct BlockingProvider {
    logs: Mutex<HashMap<LogName, Arc<BlockingAppend>>>,
}

impl StorageProvider for BlockingProvider {
    fn open(&self, name: &LogName) -> Result<Arc<dyn Storage>, StorageError> {
        let mut logs = self.logs.lock().expect("lock");
        let log = logs.entry(name.clone()).or_insert_with(|| {
            Arc::new(BlockingAppend {
                log: InMemoryStorage::default(),
            })
        });
        Ok(log.clone())
    }
    fn existing(&self, name: &LogName) -> Result<Option<Arc<dyn Storage>>, StorageError> {
        let logs = self.logs.lock().expect("lock");
        Ok(logs.get(name).map(|log| log.clone() as Arc<dyn Storage>))
    }
    fn list(&self) -> Result<Vec<LogName>, StorageError> {
        Ok(Vec::new())
    }
}

/// The relay's runtime stalls in another room's blocking appends, longer than its ping
/// interval, while an idle client (in another runtime) answers every ping at once: when the
/// loop comes back, the pong waits in the socket and the next ping is due. The relay closed
/// such clients with 4009 about every other ping (`select!` picked the tick or the read at
/// random).
#[tokio::test]
async fn a_pong_that_arrived_while_the_relay_stalled_counts() {
    let config = {
        let mut relay_config = RelayConfig::default();
        relay_config.heartbeat = Duration::from_millis(100);
        relay_config
    };
    let provider = Arc::new(BlockingProvider::default());
    let server = start_with(config, provider, Arc::new(AllowAll)).await;
    let clients = other_runtime();
    let (idle_url, busy_url) = (server.url(Some("idle")), server.url(Some("busy")));
    let (idle, rec) = clients
        .spawn(async move {
            let client = WebSocketSyncClient::builder(idle_url)
                .reconnect(false)
                .build()
                .expect("client");
            let rec = Recorder::attach(&client);
            client.connect().await.expect("connect");
            (client, rec)
        })
        .await
        .expect("idle client");
    let publisher = clients.spawn(async move {
        let client = WebSocketSyncClient::builder(busy_url)
            .build()
            .expect("client");
        client.connect().await.expect("connect");
        for n in 1..=1000u64 {
            let event = Event::new(format!("e{n}"), "test", json!({"n": n}), n);
            client.send(event).await.expect("send");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    // Dozens of pings, each after a stall.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let failures = heartbeat_failures(&rec);
    assert!(failures.is_empty(), "{failures:?}");
    assert!(idle.is_connected());
    publisher.abort();
    clients.shutdown_background();
    server.stop().await;
}

/// The client's loop stalls in a slow outgoing middleware (each send), longer than its
/// heartbeat timeout, while the relay (in another runtime) answers every ping at once: when
/// the loop comes back, the pong waits in the socket and the deadline has passed. The client
/// gave the connection up as dead about every other ping (`select!` picked the deadline or
/// the read at random).
#[tokio::test]
async fn a_pong_that_arrived_while_the_client_stalled_counts() {
    let relay = other_runtime();
    let server = relay
        .spawn(start(RelayConfig::default()))
        .await
        .expect("relay");
    let client = WebSocketSyncClient::builder(server.url(Some("r")))
        .heartbeat(Duration::from_millis(100))
        .heartbeat_timeout(Duration::from_millis(50))
        .reconnect(false)
        .build()
        .expect("client");
    client.use_middleware(Direction::Outgoing, |event: Event| {
        std::thread::sleep(Duration::from_millis(150));
        Some(event)
    });
    let rec = Recorder::attach(&client);
    client.connect().await.expect("connect");
    let sender = client.clone();
    let sending = tokio::spawn(async move {
        for n in 1..=1000u64 {
            let event = Event::new(format!("e{n}"), "test", json!({"n": n}), n);
            if sender.send(event).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    });
    // Dozens of pings, most after a stall.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let failures = heartbeat_failures(&rec);
    assert!(failures.is_empty(), "{failures:?}");
    assert!(client.is_connected());
    sending.abort();
    client.disconnect().await.expect("disconnect");
    relay.spawn(server.stop());
    relay.shutdown_background();
}
