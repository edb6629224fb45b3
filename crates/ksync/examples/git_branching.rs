//! The spec's branching: `createBranch`, `checkout`, `merge`, `listBranches`.
//!
//! Needs a server: `cargo run --release -p ksync-cli -- serve`, then
//! `cargo run -p ksync --features git --example git_branching`.

mod common;

use std::sync::Arc;

use ksync::{GitSyncClient, InMemoryStorage, KSync};
use serde_json::json;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::require_server().await;
    let repo = format!("examples-branching-{}", std::process::id());
    let url = common::git_url(&repo);

    let ksync = KSync::builder()
        .storage(Arc::new(InMemoryStorage::new()))
        .sync_client(Arc::new(GitSyncClient::builder(url.as_str()).build()?))
        .build()
        .await?;
    let sync_client = ksync.client();
    ksync.emit("page_created", json!({"title": "Home"})).await?;
    ksync.push().await?;

    // Create a new branch.
    sync_client.create_branch("feature-branch").await?;
    // Switch branches.
    sync_client.checkout("feature-branch").await?;
    ksync
        .emit("page_created", json!({"title": "Pricing (draft)"}))
        .await?;
    ksync.push().await?;

    // Merge branches: what feature-branch has that main lacks goes into main.
    let merged = sync_client.merge("main", "feature-branch").await?;
    println!(
        "merged {} event(s) into main ({} conflicts)",
        merged.appended,
        merged.conflicts.len()
    );

    // List branches.
    let branches = sync_client.list_branches().await?;
    for branch in &branches {
        println!("{branch:?}");
    }
    sync_client.checkout("main").await?;
    ksync.pull().await?;
    println!("main now holds {} pages", ksync.state()?.len());
    Ok(())
}
