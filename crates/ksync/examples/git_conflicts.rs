//! The spec's conflict resolution: two replicas edit the same record offline; the one that
//! syncs second sees a `concurrent-edit` conflict and settles it.
//!
//! ```text
//! syncClient.on('conflict', (conflict) => {
//!   if (conflict.type === 'concurrent-edit') return conflict.theirs;  // use the server's
//!   return mergeEvents(conflict.ours, conflict.theirs);
//! });
//! ```
//!
//! In Rust the policy is a resolver (`on_conflict`) and `conflict` notifications report each
//! conflict. Run with `merge` as the first argument to merge both sides instead.
//!
//! Needs a server: `cargo run --release -p ksync-cli -- serve`, then
//! `cargo run -p ksync --features git --example git_conflicts [-- merge]`.

mod common;

use std::sync::Arc;

use ksync::{
    Conflict, ConflictKind, Event, GitSyncClient, InMemoryStorage, KSync, Notification, Resolution,
};
use serde_json::json;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::require_server().await;
    let repo = format!("examples-conflicts-{}", std::process::id());
    let url = common::git_url(&repo);
    let merge = std::env::args().nth(1).as_deref() == Some("merge");

    let laptop = replica(&url).await?;
    let phone = replica(&url).await?;

    // Conflict detected: log it. (Notifications report; the resolver decides.)
    let _sub = phone.on("conflict", |n| {
        if let Notification::Conflict(conflict) = n {
            println!(
                "Conflict detected: {}",
                serde_json::to_string(conflict).unwrap_or_default()
            );
        }
    })?;
    phone.on_conflict(move |conflict: &Conflict| {
        if !merge && conflict.kind == ConflictKind::ConcurrentEdit {
            // Auto-resolve: use the server's version.
            return Resolution::Theirs;
        }
        // Custom resolution logic.
        Resolution::Merged(merge_events(&conflict.ours, &conflict.theirs))
    });

    // Both start from the same shopping list...
    let list = laptop
        .update("list", "shopping_list", json!({"items": ["milk"]}))
        .await?;
    laptop.push().await?;
    phone.pull().await?;
    // ...and both add an item while offline.
    laptop
        .update(
            &list.id,
            "shopping_list",
            json!({"items": ["milk", "bread"]}),
        )
        .await?;
    phone
        .update(
            &list.id,
            "shopping_list",
            json!({"items": ["milk", "eggs"]}),
        )
        .await?;

    laptop.sync().await?;
    let result = phone.sync().await?; // sees the conflict, settles it, pushes the settlement
    println!("phone: {} conflict(s) settled", result.pull.conflicts.len());
    laptop.pull().await?;

    let (a, b) = (laptop.state()?, phone.state()?);
    println!("laptop: {}", a[&list.id].data);
    println!("phone:  {}", b[&list.id].data);
    assert_eq!(a[&list.id].data, b[&list.id].data, "both replicas agree");
    Ok(())
}

/// The union of both lists' items.
fn merge_events(ours: &Event, theirs: &Event) -> Event {
    let mut items: Vec<serde_json::Value> = Vec::new();
    for side in [ours, theirs] {
        for item in side.data["items"].as_array().into_iter().flatten() {
            if !items.contains(item) {
                items.push(item.clone());
            }
        }
    }
    Event::new(
        ours.id.clone(),
        ours.event_type.clone(),
        json!({ "items": items }),
        ours.timestamp.max(theirs.timestamp),
    )
}

async fn replica(url: &str) -> anyhow::Result<KSync<GitSyncClient>> {
    Ok(KSync::builder()
        .storage(Arc::new(InMemoryStorage::new()))
        .sync_client(Arc::new(GitSyncClient::builder(url).build()?))
        .build()
        .await?)
}
