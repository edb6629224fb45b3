//! The spec's `GitSyncClient` methods: `pull`, `push`, `sync` and `clone`.
//!
//! Needs a server: `cargo run --release -p ksync-cli -- serve`, then
//! `cargo run -p ksync --features git --example git_pull_push`.

mod common;

use std::sync::Arc;

use ksync::{GitSyncClient, InMemoryStorage, KSync, PullPushClient};
use serde_json::json;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::require_server().await;
    let url = common::git_url("examples-pull-push");

    // new GitSyncClient({ url })  (branch 'main', compression on, no auto-pull: the defaults)
    let sync_client = GitSyncClient::builder(url.as_str()).build()?;
    let ksync = KSync::builder()
        .storage(Arc::new(InMemoryStorage::new()))
        .sync_client(Arc::new(sync_client))
        .build()
        .await?;
    let sync_client = ksync.client();

    // Events written locally wait for push.
    ksync
        .emit("todo_added", json!({"title": "write the report"}))
        .await?;

    // pull(): latest events from the server (creating the repository if it does not exist).
    let result = sync_client.pull().await?;
    println!("Pulled {} new events", result.new_events.len());
    println!("Conflicts: {}", result.conflicts.len());

    // push(): local events to the server.
    let result = sync_client.push().await?;
    println!("Pushed {} events", result.pushed_events.len());
    println!(
        "Rejected {} events; server version {}",
        result.rejected_events.len(),
        result.server_version
    );

    // sync(): pull + push.
    let result = sync_client.sync().await?;
    println!("Sync complete: {}", serde_json::to_string(&result)?);

    // clone(url, branch): a fresh replica gets everything on the branch.
    let fresh = KSync::builder()
        .storage(Arc::new(InMemoryStorage::new()))
        .sync_client(Arc::new(GitSyncClient::builder(url.as_str()).build()?))
        .build()
        .await?;
    // (`fresh.client()` is an `Arc`; name the client so `clone` is the spec's, not `Arc::clone`.)
    let fresh_client: &GitSyncClient = fresh.client();
    let cloned = fresh_client.clone(&url, "main").await?;
    println!(
        "Cloned {} events at server version {}",
        cloned.new_events.len(),
        cloned.server_version
    );
    Ok(())
}
