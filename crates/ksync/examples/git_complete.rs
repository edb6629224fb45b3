//! The spec's Git "Complete Example": `KSync` with `FileStorage` and a `GitSyncClient`
//! (token auth, branch `main`, pull every minute); manual pull/emit/push, then auto-sync.
//!
//! Needs a server: `cargo run --release -p ksync-cli -- serve`, then
//! `cargo run -p ksync --features git --example git_complete`. Events are kept in
//! `./local-events` (run it twice: the second run finds the first run's events on disk). The
//! client presents `KSYNC_TOKEN` (default `github-token`, which a server without authentication
//! accepts).

mod common;

use std::sync::Arc;
use std::time::Duration;

use ksync::{Auth, AutoSync, FileStorage, GitSyncClient, KSync};
use serde_json::json;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::require_server().await;
    let url = common::git_url("my-repo");

    let ksync = KSync::builder()
        .storage(Arc::new(FileStorage::open("./local-events")?))
        .sync_client(Arc::new(
            GitSyncClient::builder(url.as_str())
                .auth(Auth::token(common::secret("KSYNC_TOKEN", "github-token")))
                .branch("main")
                .pull_interval(Duration::from_secs(60)) // pull every minute
                .build()?,
        ))
        .build()
        .await?;

    // Manual sync operations. (The first one creates `my-repo` on the server when it does not
    // exist yet: `create_repo_if_missing`, on by default.)
    let pulled = ksync.pull().await?; // get latest changes
    println!("pulled {} new events", pulled.new_events.len());
    ksync
        .emit("local_change", json!({"data": "new data"}))
        .await?;
    let pushed = ksync.push().await?; // send changes to server
    println!("pushed {} events", pushed.pushed_events.len());

    // Auto-sync mode: push every 30 seconds, pull every minute. (Shortened here so the
    // example finishes: push every 300 ms, pull every 500 ms, for 2 seconds.)
    ksync.enable_auto_sync(AutoSync {
        push_interval: Duration::from_millis(300),
        pull_interval: Duration::from_millis(500),
    });
    ksync
        .emit("local_change", json!({"data": "sent by auto-sync"}))
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ksync.disable_auto_sync();

    println!(
        "local log: {} events; server branch main at version {}",
        ksync.events_since(0, usize::MAX)?.len(),
        ksync.client().branch_info("main").await?.server_version
    );
    Ok(())
}
