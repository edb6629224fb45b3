//! The client's documented schedules on tokio's paused clock, against real loopback sockets:
//! a busy service's requests sent again after `Retry-After` (1 s when absent or not seconds,
//! at most 30 s, plus up to 250 ms of jitter; at most `busy_attempts` sends and 60 s of waits;
//! a 429 without `Retry-After` not at all), and auto-pull once per `pull_interval`, the first
//! one period after the start. The clock is virtual: the bounds are exact up to what the
//! runtime's waits on the sockets add.

use crate::common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ksync_core::{Auth, InMemoryStorage, PullPushClient};
use ksync_git::{GitError, GitSyncClient};
use tokio::time::Instant;

/// Keeps a timer 1 ms away for the test's life. A paused clock jumps to the next timer
/// whenever the runtime waits with nothing ready, also while a loopback socket's bytes are
/// on their way: with this, each such wait moves it by at most 1 ms.
fn fine_clock() -> tokio::task::JoinHandle<()> {
    tokio::spawn(async {
        loop {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
}

/// Keeps the runtime busy, so the paused clock never moves by itself, only by
/// `tokio::time::advance` (the service opens its logs on blocking threads: waiting on those,
/// even a 1 ms timer would let the clock run).
fn hold_clock() -> tokio::task::JoinHandle<()> {
    tokio::spawn(async {
        loop {
            tokio::task::yield_now().await;
        }
    })
}

/// Lets the runtime run a while without moving the clock (see `hold_clock`).
async fn run_a_while() {
    for _ in 0..1000 {
        tokio::task::yield_now().await;
    }
}

/// What the waits on the sockets (1 ms each, see `fine_clock`) may add to a measured span.
const SLACK: Duration = Duration::from_millis(100);
/// The most jitter the client adds to a busy wait.
const JITTER: Duration = Duration::from_millis(250);

/// When each repository's requests came.
type Sends = Arc<Mutex<HashMap<String, Vec<Instant>>>>;

/// A service busy for every request, in the way the repository's name says.
async fn busy(State(sends): State<Sends>, request: Request) -> Response {
    let repo = request
        .uri()
        .path()
        .split('/')
        .nth(2)
        .unwrap_or("")
        .to_owned();
    sends
        .lock()
        .expect("lock")
        .entry(repo.clone())
        .or_default()
        .push(Instant::now());
    let (status, retry_after) = match repo.as_str() {
        "wait-25" => (StatusCode::SERVICE_UNAVAILABLE, Some("25")),
        "wait-an-hour" => (StatusCode::SERVICE_UNAVAILABLE, Some("3600")),
        "no-wait" => (StatusCode::SERVICE_UNAVAILABLE, None),
        "wait-until-a-date" => (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("Wed, 21 Oct 2015 07:28:00 GMT"),
        ),
        _ => (StatusCode::TOO_MANY_REQUESTS, None),
    };
    let mut response = (
        status,
        [("content-type", "application/json")],
        r#"{"error":{"code":"busy","message":"busy"}}"#,
    )
        .into_response();
    if let Some(value) = retry_after {
        response
            .headers_mut()
            .insert("retry-after", HeaderValue::from_static(value));
    }
    response
}

#[tokio::test(start_paused = true)]
async fn a_busy_service_is_asked_again_as_retry_after_says_within_the_bounds() {
    let _clock = fine_clock();
    let sends = Sends::default();
    let app = axum::Router::new()
        .fallback(busy)
        .with_state(Arc::clone(&sends));
    let (addr, _task) = common::serve_router(app).await;
    // (repository, busy_attempts, requests sent, wait between them)
    for (repo, attempts, sent, wait) in [
        // 25 s, 25 s, then 75 s of waits would pass the 60 s bound: three sends of five.
        ("wait-25", 5, 3, Duration::from_secs(25)),
        // An hour is cut to 30 s.
        ("wait-an-hour", 2, 2, Duration::from_secs(30)),
        // Absent, or a date: 1 s.
        ("no-wait", 5, 5, Duration::from_secs(1)),
        ("wait-until-a-date", 5, 5, Duration::from_secs(1)),
        // A 429 without `Retry-After` is not a load to wait out.
        ("too-many", 5, 1, Duration::ZERO),
    ] {
        let client = GitSyncClient::builder(format!("http://{addr}/git/{repo}"))
            .busy_attempts(attempts)
            .build()
            .expect("client");
        let error = client.pull().await.expect_err("the service stays busy");
        assert!(
            matches!(
                GitError::of(&error),
                Some(GitError::Server {
                    status: 503 | 429,
                    ..
                })
            ),
            "{repo}: {error}"
        );
        let at = sends
            .lock()
            .expect("lock")
            .get(repo)
            .cloned()
            .unwrap_or_default();
        assert_eq!(at.len(), sent, "{repo}: requests sent");
        for pair in at.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap >= wait && gap <= wait + JITTER + SLACK,
                "{repo}: sent again after {gap:?}, not {wait:?} plus jitter"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn auto_pull_pulls_once_a_period_from_the_start() {
    let _clock = hold_clock();
    let server = common::start(&["p"]).await;
    let pulls: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let seen = Arc::clone(&pulls);
    let record = move |request: Request, next: Next| {
        let seen = Arc::clone(&seen);
        async move {
            if request.method() == "GET" && request.uri().path().ends_with("/events") {
                seen.lock().expect("lock").push(Instant::now());
            }
            next.run(request).await
        }
    };
    let app = server
        .service
        .router()
        .layer(axum::middleware::from_fn(record));
    let (addr, _task) = common::serve_router(app).await;
    let period = Duration::from_secs(60);
    let client = GitSyncClient::builder(format!("http://{addr}/git/p"))
        .auth(Auth::token("writer"))
        .pull_interval(period)
        .build()
        .expect("client");
    let start = Instant::now();
    // Attaching starts auto-pull.
    let _ksync = ksync_testkit::ksync_over(Arc::new(InMemoryStorage::new()), client)
        .await
        .expect("ksync");
    run_a_while().await;
    let pulled = || pulls.lock().expect("lock").len();
    for n in 1..=3 {
        tokio::time::advance(period - Duration::from_millis(1)).await;
        run_a_while().await;
        assert_eq!(pulled(), n - 1, "a pull before its period");
        tokio::time::advance(Duration::from_millis(1)).await;
        let waiting = std::time::Instant::now();
        while pulled() < n {
            // Real time: the virtual clock stands still meanwhile.
            assert!(
                waiting.elapsed() < Duration::from_secs(10),
                "auto-pull {n} never came"
            );
            tokio::task::yield_now().await;
        }
        let at = pulls.lock().expect("lock")[n - 1];
        assert_eq!(at - start, period * n as u32, "auto-pull {n}");
    }
}

/// `KSync::enable_auto_sync` (the spec's `enableAutoSync({pushInterval, pullInterval})`):
/// a push and a pull at once, then each on its own period.
#[tokio::test(start_paused = true)]
async fn auto_sync_pushes_and_pulls_at_once_then_once_a_period_each() {
    let _clock = hold_clock();
    let server = common::start(&["s"]).await;
    let requests: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let seen = Arc::clone(&requests);
    let record = move |request: Request, next: Next| {
        let seen = Arc::clone(&seen);
        async move {
            let path = request.uri().path();
            let kind = match (request.method().as_str(), path) {
                ("GET", p) if p.ends_with("/events") => Some("pull"),
                ("POST", p) if p.ends_with("/events") => Some("push"),
                _ => None,
            };
            if let Some(kind) = kind {
                seen.lock()
                    .expect("lock")
                    .push((kind.to_owned(), Instant::now()));
            }
            next.run(request).await
        }
    };
    let app = server
        .service
        .router()
        .layer(axum::middleware::from_fn(record));
    let (addr, _task) = common::serve_router(app).await;
    let client = GitSyncClient::builder(format!("http://{addr}/git/s"))
        .auth(Auth::token("writer"))
        .build()
        .expect("client");
    let ksync = ksync_testkit::ksync_over(Arc::new(InMemoryStorage::new()), client)
        .await
        .expect("ksync");
    let start = Instant::now();
    let (push, pull) = (Duration::from_secs(30), Duration::from_secs(60));
    ksync.enable_auto_sync(ksync_core::AutoSync {
        push_interval: push,
        pull_interval: pull,
    });
    // Each tick emits an event first, so that every push has something to send.
    let mut n = 0;
    let mut emit = async || {
        n += 1;
        ksync
            .emit("note", serde_json::json!({ "n": n }))
            .await
            .expect("emit");
    };
    emit().await;
    let times = |kind: &str| -> Vec<Duration> {
        requests
            .lock()
            .expect("lock")
            .iter()
            .filter(|(k, _)| k == kind)
            .map(|(_, at)| *at - start)
            .collect()
    };
    let settle = async |pushes: usize, pulls: usize| {
        let waiting = std::time::Instant::now();
        while times("push").len() < pushes || times("pull").len() < pulls {
            assert!(
                waiting.elapsed() < Duration::from_secs(10),
                "pushes {:?}, pulls {:?}",
                times("push"),
                times("pull")
            );
            tokio::task::yield_now().await;
        }
        run_a_while().await;
    };
    settle(1, 1).await;
    for step in 1..=4u32 {
        emit().await;
        tokio::time::advance(push).await;
        settle(1 + step as usize, 1 + step as usize / 2).await;
    }
    let pushes: Vec<Duration> = (0..5).map(|i| push * i).collect();
    let pulls: Vec<Duration> = (0..3).map(|i| pull * i).collect();
    assert_eq!(times("push"), pushes);
    assert_eq!(times("pull"), pulls);
}
