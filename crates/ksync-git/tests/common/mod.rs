//! Shared test fixtures: a real service on 127.0.0.1:0, a small authenticator, clients.

#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ksync_core::{
    AuthError, Authenticator, Credentials, Grant, InMemoryProvider, Name, StorageProvider,
};
use ksync_git::GitSyncClient;
use ksync_git::server::{GitServer, GitServerConfig};

/// Tokens: `writer` (everything), `reader` (read all), `scoped` (read+write repo `team`
/// only); API key `key-1` (everything). Anything else is invalid; nothing is missing.
pub struct TestAuth;

impl Authenticator for TestAuth {
    fn authenticate(&self, c: &Credentials) -> Result<Grant, AuthError> {
        let grant = |subject: &str, repos: Option<Vec<String>>, write: bool| Grant {
            subject: subject.into(),
            rooms: None,
            repos,
            read: true,
            write,
            expires_at: None,
        };
        match (c.bearer.as_deref(), c.api_key.as_deref()) {
            (Some("writer"), _) | (None, Some("key-1")) => Ok(grant("writer", None, true)),
            (Some("reader"), _) => Ok(grant("reader", None, false)),
            (Some("scoped"), _) => Ok(grant("scoped", Some(vec!["team".into()]), true)),
            (None, None) => Err(AuthError::Missing),
            _ => Err(AuthError::Invalid("unknown credential".into())),
        }
    }
}

/// A running service.
pub struct Server {
    pub addr: SocketAddr,
    pub service: GitServer,
    pub provider: Arc<dyn StorageProvider>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// The URL of repository `repo`.
    pub fn repo_url(&self, repo: &str) -> String {
        format!("http://{}/git/{repo}", self.addr)
    }

    /// `base` joined with `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `app` (a service's router, with any test layers) on an ephemeral loopback port, with
/// the peer address handlers see in production (the server's `ConnectInfo`).
pub async fn serve_router(app: axum::Router) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .expect("serve");
    });
    (addr, task)
}

/// Starts the service over `provider` on an ephemeral port, with repository `repo` created.
pub async fn start_with(
    provider: Arc<dyn StorageProvider>,
    config: GitServerConfig,
    repos: &[&str],
) -> Server {
    let service = GitServer::with_config(Arc::clone(&provider), Arc::new(TestAuth), config);
    for repo in repos {
        service
            .create_repo(&Name::new(repo).expect("valid"))
            .await
            .expect("create repo");
    }
    let app = service.router();
    let (addr, task) = serve_router(app).await;
    Server {
        addr,
        service,
        provider,
        task,
    }
}

/// Starts an in-memory service with repository `repo`.
pub async fn start(repos: &[&str]) -> Server {
    start_with(
        Arc::new(InMemoryProvider::new()),
        GitServerConfig::default(),
        repos,
    )
    .await
}

/// A client for `url` as `writer`, with short timeouts.
pub fn client(url: &str) -> GitSyncClient {
    GitSyncClient::builder(url)
        .auth(ksync_core::Auth::token("writer"))
        .request_timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

/// The events of a server branch, in order.
pub fn branch_events(server: &Server, repo: &str, branch: &str) -> Vec<ksync_core::Event> {
    let storage = server
        .provider
        .existing(&ksync_core::LogName::Branch {
            repo: Name::new(repo).expect("valid"),
            branch: Name::new(branch).expect("valid"),
        })
        .expect("provider")
        .expect("branch exists");
    storage
        .read_since(0, usize::MAX)
        .expect("read")
        .into_iter()
        .map(|s| s.event)
        .collect()
}

/// A plain HTTP client (no transparent gzip) with a 10 s timeout.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .gzip(false)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http")
}

/// Sends a request as `writer`; the status and the body, which must be JSON.
pub async fn call(req: reqwest::RequestBuilder) -> (u16, serde_json::Value) {
    let response = req
        .header("authorization", "Bearer writer")
        .send()
        .await
        .expect("send");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("answer {status} is not JSON ({e}): {text:?}"));
    (status, body)
}

/// The `error.code` of an error body.
pub fn code(body: &serde_json::Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<no code>")
}

/// One request the service got, as it arrived (before the service decoded it), with what the
/// service answered.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// The request's `Content-Encoding`.
    pub content_encoding: Option<String>,
    /// The request's `Accept-Encoding`.
    pub accept_encoding: Option<String>,
    /// The request body as sent.
    pub body: Vec<u8>,
    pub status: u16,
    /// The answer's `Content-Encoding`.
    pub response_encoding: Option<String>,
}

/// The requests a [`start_recording`] service got, in order.
pub type Requests = Arc<std::sync::Mutex<Vec<Seen>>>;

/// Like [`start`], with every request and its answer's encoding recorded.
pub async fn start_recording(repos: &[&str]) -> (Server, Requests) {
    use axum::extract::Request;
    use axum::middleware::Next;

    let provider: Arc<dyn StorageProvider> = Arc::new(InMemoryProvider::new());
    let service = GitServer::with_config(
        Arc::clone(&provider),
        Arc::new(TestAuth),
        GitServerConfig::default(),
    );
    for repo in repos {
        service
            .create_repo(&Name::new(repo).expect("valid"))
            .await
            .expect("create repo");
    }
    let requests = Requests::default();
    let record = {
        let requests = Arc::clone(&requests);
        move |req: Request, next: Next| {
            let requests = Arc::clone(&requests);
            async move {
                let header = |req: &Request, name| {
                    req.headers()
                        .get(name)
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                };
                let content_encoding = header(&req, axum::http::header::CONTENT_ENCODING);
                let accept_encoding = header(&req, axum::http::header::ACCEPT_ENCODING);
                let method = req.method().to_string();
                let path = req.uri().path().to_owned();
                let (parts, body) = req.into_parts();
                let body = axum::body::to_bytes(body, usize::MAX)
                    .await
                    .expect("request body");
                let response = next
                    .run(Request::from_parts(
                        parts,
                        axum::body::Body::from(body.clone()),
                    ))
                    .await;
                let response_encoding = response
                    .headers()
                    .get(axum::http::header::CONTENT_ENCODING)
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
                requests.lock().expect("lock").push(Seen {
                    method,
                    path,
                    content_encoding,
                    accept_encoding,
                    body: body.to_vec(),
                    status: response.status().as_u16(),
                    response_encoding,
                });
                response
            }
        }
    };
    let app = service.router().layer(axum::middleware::from_fn(record));
    let (addr, task) = serve_router(app).await;
    let server = Server {
        addr,
        service,
        provider,
        task,
    };
    (server, requests)
}

/// The recorded requests with `method` on `path`.
pub fn requests_to(requests: &Requests, method: &str, path: &str) -> Vec<Seen> {
    requests
        .lock()
        .expect("lock")
        .iter()
        .filter(|s| s.method == method && s.path == path)
        .cloned()
        .collect()
}
