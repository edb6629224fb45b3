//! The git-like commands, run as real `ksync` processes against a repository service on
//! 127.0.0.1:0.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;
use std::sync::Arc;

use ksync_core::{
    AuthError, Authenticator, Credentials, Event, Grant, InMemoryProvider, LogName, Name,
    StorageProvider,
};
use ksync_git::server::GitServer;
use serde_json::json;

/// Token `t0k` may do everything; nothing else gets in.
struct OneToken;

impl Authenticator for OneToken {
    fn authenticate(&self, c: &Credentials) -> Result<Grant, AuthError> {
        match c.bearer.as_deref() {
            Some("t0k") => Ok(Grant::anonymous()),
            Some(_) => Err(AuthError::Invalid("unknown token".into())),
            None => Err(AuthError::Missing),
        }
    }
}

struct Service {
    addr: SocketAddr,
    provider: Arc<InMemoryProvider>,
}

impl Service {
    fn url(&self, repo: &str) -> String {
        format!("http://{}/git/{repo}", self.addr)
    }

    fn branch(&self, branch: &str) -> Vec<Event> {
        self.provider
            .existing(&LogName::Branch {
                repo: Name::new("notes").expect("valid"),
                branch: Name::new(branch).expect("valid"),
            })
            .expect("provider")
            .expect("branch")
            .read_since(0, usize::MAX)
            .expect("read")
            .into_iter()
            .map(|s| s.event)
            .collect()
    }
}

async fn service() -> Service {
    let provider = Arc::new(InMemoryProvider::new());
    let git = GitServer::new(provider.clone(), Arc::new(OneToken));
    git.create_repo(&Name::new("notes").expect("valid"))
        .await
        .expect("repo");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = git.router();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Service { addr, provider }
}

/// Runs `ksync args..` in `dir` with the token in the environment.
async fn ksync(dir: &Path, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_ksync"))
        .args(args)
        .current_dir(dir)
        .env("KSYNC_TOKEN", "t0k")
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("run ksync")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exit code")
}

#[tokio::test]
async fn clone_emit_push_pull_log_status() {
    let svc = service().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let url = svc.url("notes");

    let out = ksync(tmp.path(), &["clone", &url]).await;
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(
        text(&out).contains("Cloned notes (branch main)"),
        "{}",
        text(&out)
    );
    let a = tmp.path().join("notes");
    assert!(a.join(".ksync/config.json").is_file());

    let out = ksync(&a, &["emit", "user_created", r#"{"name":"John"}"#]).await;
    assert_eq!(code(&out), 0, "{}", text(&out));
    let out = ksync(&a, &["emit", "user_created", "{not json"]).await;
    assert_eq!(code(&out), 2, "bad JSON is a usage error: {}", text(&out));

    let out = ksync(&a, &["status"]).await;
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(text(&out).contains("1 to push"), "{}", text(&out));

    let out = ksync(&a, &["push"]).await;
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(
        text(&out).contains("Pushed 1 event(s) to main"),
        "{}",
        text(&out)
    );
    assert_eq!(svc.branch("main").len(), 1);
    let out = ksync(&a, &["push"]).await;
    assert!(text(&out).contains("Nothing to push"), "{}", text(&out));

    // A second working copy sees it.
    let out = ksync(tmp.path(), &["clone", &url, "copy"]).await;
    assert_eq!(code(&out), 0, "{}", text(&out));
    let b = tmp.path().join("copy");
    let out = ksync(&b, &["log"]).await;
    assert!(text(&out).contains("user_created"), "{}", text(&out));
    assert!(text(&out).contains("John"), "{}", text(&out));
    let out = ksync(&b, &["emit", "note", r#""from b""#]).await;
    assert_eq!(code(&out), 0, "{}", text(&out));
    let out = ksync(&b, &["sync"]).await;
    assert_eq!(code(&out), 0, "{}", text(&out));
    let out = ksync(&a, &["pull"]).await;
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(
        text(&out).contains("Pulled 1 new event(s)"),
        "{}",
        text(&out)
    );
    let out = ksync(&a, &["pull"]).await;
    assert!(text(&out).contains("Already up to date"), "{}", text(&out));
    // Commands work from a subdirectory, as in git.
    let sub = a.join("sub");
    std::fs::create_dir(&sub).expect("mkdir");
    let out = ksync(&sub, &["status"]).await;
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(
        text(&out).contains("Up to date with the server (version 2)"),
        "{}",
        text(&out)
    );
}

#[tokio::test]
async fn branches_checkout_and_merge() {
    let svc = service().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = ksync(tmp.path(), &["clone", &svc.url("notes"), "wd"]).await;
    assert_eq!(code(&out), 0, "{}", text(&out));
    let wd = tmp.path().join("wd");
    assert_eq!(code(&ksync(&wd, &["emit", "t", "1"]).await), 0);
    assert_eq!(code(&ksync(&wd, &["push"]).await), 0);

    let out = ksync(&wd, &["branch", "feature"]).await;
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(
        text(&out).contains("Created branch feature from main at version 1"),
        "{}",
        text(&out)
    );
    let out = ksync(&wd, &["branch"]).await;
    assert!(text(&out).contains("  feature"), "{}", text(&out));
    assert!(text(&out).contains("* main"), "{}", text(&out));
    let out = ksync(&wd, &["checkout", "feature"]).await;
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_eq!(code(&ksync(&wd, &["emit", "t", "2"]).await), 0);
    assert_eq!(code(&ksync(&wd, &["push"]).await), 0);
    assert_eq!(
        (svc.branch("main").len(), svc.branch("feature").len()),
        (1, 2)
    );

    let out = ksync(&wd, &["checkout", "main"]).await;
    assert_eq!(code(&out), 0, "{}", text(&out));
    let out = ksync(&wd, &["merge", "feature"]).await;
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(
        text(&out).contains("Merged feature into main: 1 new event(s)"),
        "{}",
        text(&out)
    );
    assert_eq!(svc.branch("main").len(), 2);
    let out = ksync(&wd, &["checkout", "nope"]).await;
    assert_eq!(code(&out), 5, "unknown branch: {}", text(&out));
    let out = ksync(&wd, &["checkout", "../x"]).await;
    assert_eq!(code(&out), 2, "invalid name: {}", text(&out));
}

#[tokio::test]
async fn refused_events_and_failures_have_exit_codes() {
    let svc = service().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let url = svc.url("notes");

    // Not a working directory.
    let out = ksync(tmp.path(), &["pull"]).await;
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(
        text(&out).contains("not a ksync working directory"),
        "{}",
        text(&out)
    );
    // Unknown repository: exit 5, nothing left behind.
    let out = ksync(tmp.path(), &["clone", &svc.url("missing")]).await;
    assert_eq!(code(&out), 5, "{}", text(&out));
    assert!(!tmp.path().join("missing").exists());
    // `--create` makes it.
    let out = ksync(tmp.path(), &["clone", "--create", &svc.url("fresh")]).await;
    assert_eq!(code(&out), 0, "{}", text(&out));
    // What a clone killed before it wrote its config leaves (an empty `.ksync`) does not stop
    // the next clone; a working directory does.
    std::fs::create_dir_all(tmp.path().join("interrupted/.ksync")).expect("mkdir");
    let out = ksync(tmp.path(), &["clone", &url, "interrupted"]).await;
    assert_eq!(code(&out), 0, "{}", text(&out));
    let out = ksync(tmp.path(), &["clone", &url, "interrupted"]).await;
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(
        text(&out).contains("already a ksync working directory"),
        "{}",
        text(&out)
    );
    // Refused credentials: exit 4.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_ksync"))
        .args(["clone", &url, "denied"])
        .current_dir(tmp.path())
        .env("KSYNC_TOKEN", "wrong")
        .output()
        .await
        .expect("run");
    assert_eq!(code(&out), 4, "{}", text(&out));
    // A token in the environment and an API key on the command line: neither silently wins
    // (usage, exit 2, nothing cloned).
    let out = ksync(tmp.path(), &["clone", "--api-key", "k3y", &url, "both"]).await;
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(text(&out).contains("give one"), "{}", text(&out));
    assert!(!tmp.path().join("both").exists());
    // Nobody listening: exit 3.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let out = ksync(
        tmp.path(),
        &["clone", &format!("http://{closed}/git/notes"), "down"],
    )
    .await;
    assert_eq!(code(&out), 3, "{}", text(&out));

    // The server holds other content under an event's (id, version): push exits 6.
    let out = ksync(tmp.path(), &["clone", &url, "wd"]).await;
    assert_eq!(code(&out), 0, "{}", text(&out));
    let wd = tmp.path().join("wd");
    let out = ksync(&wd, &["emit", "doc", r#""mine""#]).await;
    let id = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .expect("id")
        .to_owned();
    let theirs = Event::new(&id, "doc", json!("theirs"), 1);
    let pushed = reqwest::Client::new()
        .post(format!("{url}/branches/main/events"))
        .bearer_auth("t0k")
        .json(&json!({"baseVersion": 0, "events": [theirs]}))
        .send()
        .await
        .expect("push");
    assert!(pushed.status().is_success());
    let out = ksync(&wd, &["push"]).await;
    assert_eq!(code(&out), 6, "{}", text(&out));
    assert!(text(&out).contains("refused"), "{}", text(&out));
    // Pulling settles it (last write wins), and the resolution goes out.
    let out = ksync(&wd, &["pull"]).await;
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(text(&out).contains("1 conflict(s)"), "{}", text(&out));
    let out = ksync(&wd, &["push"]).await;
    assert_eq!(code(&out), 0, "{}", text(&out));
    let main = svc.branch("main");
    let latest = main
        .iter()
        .filter(|e| e.id == id)
        .max_by_key(|e| e.version)
        .expect("doc");
    assert_eq!(latest.version, 2);
}

#[tokio::test]
async fn an_event_the_server_would_refuse_is_refused_by_emit_and_never_waits_to_be_pushed() {
    let svc = service().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = ksync(tmp.path(), &["clone", &svc.url("notes"), "wd"]).await;
    assert_eq!(code(&out), 0, "{}", text(&out));
    let wd = tmp.path().join("wd");
    let long_type = "t".repeat(257);
    for (event_type, why) in [
        ("", "event type is empty"),
        (long_type.as_str(), "257 bytes"),
    ] {
        let out = ksync(&wd, &["emit", event_type, "{}"]).await;
        assert_eq!(code(&out), 2, "a usage error: {}", text(&out));
        assert!(text(&out).contains(why), "{}", text(&out));
    }
    // Nothing was recorded: no push is refused over it, again and again.
    let out = ksync(&wd, &["push"]).await;
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(text(&out).contains("Nothing to push"), "{}", text(&out));
    assert!(svc.branch("main").is_empty());
}

/// What a newer ksync left in `.ksync` is refused with the file named, never read in part:
/// a config field this build does not know, a log of a newer format version.
#[tokio::test]
async fn a_working_directory_of_a_newer_ksync_is_refused() {
    let svc = service().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = ksync(tmp.path(), &["clone", "--create", &svc.url("newer")]).await;
    assert_eq!(code(&out), 0, "{}", text(&out));
    let wd = tmp.path().join("newer");
    let config = wd.join(".ksync/config.json");
    let original = std::fs::read(&config).expect("read config");

    let mut newer: serde_json::Value = serde_json::from_slice(&original).expect("config JSON");
    newer["encryption"] = serde_json::json!({"key": "from a newer ksync"});
    let newer = serde_json::to_vec(&newer).expect("encode");
    std::fs::write(&config, &newer).expect("write config");
    let out = ksync(&wd, &["log"]).await;
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(text(&out).contains("config.json"), "{}", text(&out));
    assert!(text(&out).contains("encryption"), "{}", text(&out));
    assert_eq!(
        std::fs::read(&config).expect("read"),
        newer,
        "config left alone"
    );

    std::fs::write(&config, &original).expect("restore config");
    let log = wd.join(".ksync/events.log");
    let mut bytes = std::fs::read(&log).expect("read log");
    bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
    std::fs::write(&log, &bytes).expect("write log");
    let out = ksync(&wd, &["log"]).await;
    assert_ne!(code(&out), 0, "{}", text(&out));
    assert!(text(&out).contains("events.log"), "{}", text(&out));
    assert!(text(&out).contains("version 2"), "{}", text(&out));
    assert_eq!(std::fs::read(&log).expect("read"), bytes, "log left alone");
}

/// `--timeout` past a day is a usage error naming the flag (the Git client refuses a request
/// timeout past a day); 0 still means the shortest, 1 s.
#[tokio::test]
async fn a_timeout_past_a_day_is_a_usage_error() {
    let svc = service().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let url = svc.url("notes");
    let out = ksync(tmp.path(), &["clone", "--timeout", "86401", &url, "late"]).await;
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(text(&out).contains("--timeout"), "{}", text(&out));
    assert!(!tmp.path().join("late").exists());
    for secs in ["0", "86400"] {
        let dir = format!("in-bounds-{secs}");
        let out = ksync(tmp.path(), &["clone", "--timeout", secs, &url, &dir]).await;
        assert_eq!(code(&out), 0, "--timeout {secs}: {}", text(&out));
    }
}

/// A `ksync push` killed after the server stored its batch, before the working directory
/// recorded it (its `.ksync` as it was before the push): the next push finds the batch on
/// the server right after the version pulled, and `ksync status` then says up to date. The
/// status said "Behind the server by 1" for the copy's own event until the next pull, which
/// then found nothing new.
#[tokio::test]
async fn status_after_a_push_killed_before_it_was_recorded() {
    let svc = service().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = ksync(tmp.path(), &["clone", &svc.url("notes"), "wd"]).await;
    assert_eq!(code(&out), 0, "{}", text(&out));
    let wd = tmp.path().join("wd");
    assert_eq!(code(&ksync(&wd, &["emit", "t", "1"]).await), 0);
    let before = tmp.path().join("before");
    std::fs::create_dir(&before).expect("mkdir");
    for file in ["config.json", "events.log"] {
        std::fs::copy(wd.join(".ksync").join(file), before.join(file)).expect("copy");
    }
    assert_eq!(code(&ksync(&wd, &["push"]).await), 0);
    assert_eq!(svc.branch("main").len(), 1);
    for file in ["config.json", "events.log"] {
        std::fs::copy(before.join(file), wd.join(".ksync").join(file)).expect("restore");
    }

    let out = ksync(&wd, &["push"]).await;
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_eq!(svc.branch("main").len(), 1, "stored once");
    let out = ksync(&wd, &["status"]).await;
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(text(&out).contains("0 to push"), "{}", text(&out));
    assert!(
        text(&out).contains("Up to date with the server (version 1)"),
        "{}",
        text(&out)
    );
}
