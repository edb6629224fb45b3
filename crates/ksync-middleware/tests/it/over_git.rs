//! The middlewares and the filter on `GitSyncClient` against a real repository service on
//! 127.0.0.1:0: what a push sends goes through the outgoing chain (the local log keeps events
//! as made), what a pull brings and what a merge reports through the incoming one, and the
//! filter sees events as the application made them.

use std::sync::Arc;

use ksync_core::{
    AllowAll, Direction, Filter, InMemoryProvider, InMemoryStorage, KSync, LogName, Name, Storage,
    StorageProvider,
};
use ksync_git::GitSyncClient;
use ksync_git::server::GitServer;
use ksync_middleware::{Decrypt, Encrypt, FieldCipher};
use serde_json::json;

/// A service with repository `r` on 127.0.0.1:0; its provider, to look at the branches.
async fn service() -> (String, Arc<InMemoryProvider>, tokio::task::JoinHandle<()>) {
    let provider = Arc::new(InMemoryProvider::new());
    let service = GitServer::new(
        Arc::clone(&provider) as Arc<dyn StorageProvider>,
        Arc::new(AllowAll),
    );
    service
        .create_repo(&Name::new("r").expect("name"))
        .await
        .expect("repo");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = service.router();
    let task = tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .await
        .expect("serve");
    });
    (format!("http://{addr}/git/r"), provider, task)
}

fn branch(provider: &InMemoryProvider, name: &str) -> Arc<dyn Storage> {
    provider
        .existing(&LogName::Branch {
            repo: Name::new("r").expect("name"),
            branch: Name::new(name).expect("name"),
        })
        .expect("provider")
        .expect("branch")
}

async fn replica(client: GitSyncClient, id: &str) -> KSync<GitSyncClient> {
    KSync::builder()
        .storage(Arc::new(InMemoryStorage::new()))
        .sync_client(Arc::new(client))
        .replica_id(id)
        .build()
        .await
        .expect("ksync")
}

/// Encrypted on the server, plain on both replicas; the private event never leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_are_encrypted_pulls_decrypted_and_the_filter_keeps_private_events_home() {
    let (url, provider, task) = service().await;
    let cipher = FieldCipher::from_key([9; 32]);
    let alice = replica(
        GitSyncClient::builder(&url)
            .filter(Filter::PublicOnly)
            .build()
            .expect("client"),
        "alice",
    )
    .await;
    alice
        .client()
        .use_middleware(Direction::Outgoing, Encrypt::new(cipher.clone()));
    let private = alice
        .emit("note", json!({"private": true, "text": "diary"}))
        .await
        .expect("emit");
    let public = alice
        .emit("note", json!({"text": "hello"}))
        .await
        .expect("emit");
    let pushed = alice.push().await.expect("push");
    assert_eq!(pushed.pushed_events.len(), 1, "{pushed:?}");
    // The local log keeps events as made.
    assert_eq!(
        alice.state().expect("state")[&public.id].data,
        json!({"text": "hello"})
    );

    let main = branch(&provider, "main");
    let on_server = main.read_since(0, 10).expect("read");
    assert_eq!(on_server.len(), 1, "only the public event went out");
    assert_eq!(on_server[0].event.id, public.id);
    let raw = on_server[0].event.data.to_string();
    assert!(!raw.contains("hello"), "stored encrypted: {raw}");

    let bob = replica(GitSyncClient::builder(&url).build().expect("client"), "bob").await;
    bob.client()
        .use_middleware(Direction::Incoming, Decrypt::new(cipher));
    bob.pull().await.expect("pull");
    let state = bob.state().expect("state");
    assert_eq!(state[&public.id].data, json!({"text": "hello"}));
    assert!(!state.contains_key(&private.id));

    // Without the key, the pull refuses the event (an error notification), stores nothing.
    let eve = replica(GitSyncClient::builder(&url).build().expect("client"), "eve").await;
    eve.client().use_middleware(
        Direction::Incoming,
        Decrypt::new(FieldCipher::from_key([1; 32])),
    );
    eve.pull().await.expect("pull");
    assert!(eve.state().expect("state").is_empty());
    task.abort();
}

/// A merge collision between two encrypted branches is settled on the plain revisions, and
/// the resolution goes out encrypted once: both replicas end with the same plain document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_collisions_are_settled_on_decrypted_revisions() {
    let (url, provider, task) = service().await;
    let cipher = FieldCipher::from_key([5; 32]);
    let encrypting = |client: &GitSyncClient| {
        client.use_middleware(Direction::Outgoing, Encrypt::new(cipher.clone()));
        client.use_middleware(Direction::Incoming, Decrypt::new(cipher.clone()));
    };
    let a = replica(GitSyncClient::builder(&url).build().expect("client"), "a").await;
    encrypting(a.client());
    a.client().create_branch("feature").await.expect("branch");
    let b = replica(GitSyncClient::builder(&url).build().expect("client"), "b").await;
    encrypting(b.client());
    // The same revision of "doc" on both branches, with other content.
    a.client().checkout("feature").await.expect("checkout");
    a.update("doc", "t", json!({"text": "feature text"}))
        .await
        .expect("update");
    a.push().await.expect("push");
    b.update("doc", "t", json!({"text": "main text"}))
        .await
        .expect("update");
    b.push().await.expect("push");

    let merged = a.client().merge("main", "feature").await.expect("merge");
    assert_eq!(merged.conflicts.len(), 1, "{merged:?}");
    let conflict = &merged.conflicts[0];
    assert_eq!(
        conflict.ours.data,
        json!({"text": "main text"}),
        "decrypted"
    );
    assert_eq!(conflict.theirs.data, json!({"text": "feature text"}));
    assert_eq!(merged.resolutions.len(), 1);
    let resolved = merged.resolutions[0].data.clone();
    b.pull().await.expect("pull");
    assert_eq!(b.state().expect("state")["doc"].data, resolved);
    // On the server the resolution is encrypted, once: Decrypt gave plain JSON above.
    let main = branch(&provider, "main");
    let latest = main.latest("doc").expect("read").expect("doc").event;
    assert!(!latest.data.to_string().contains("text"), "{}", latest.data);
    task.abort();
}
