//! Push bodies through the real repository service (`GitServer::router`), as raw or gzip
//! bodies: never a panic or a 5xx, and whatever was accepted is readable back.
#![no_main]

use std::io::Write as _;
use std::sync::{Arc, OnceLock};

use axum::body::Body;
use http::{Request, StatusCode};
use ksync_core::{AllowAll, InMemoryProvider};
use ksync_git::server::GitServer;
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt as _;

struct Fixture {
    rt: tokio::runtime::Runtime,
    router: axum::Router,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let server = GitServer::new(Arc::new(InMemoryProvider::new()), Arc::new(AllowAll));
        let router = server.router();
        rt.block_on(async {
            let create = Request::put("/git/fuzz")
                .header("x-ksync-protocol", "1")
                .body(Body::empty())
                .expect("request");
            let status = router
                .clone()
                .oneshot(create)
                .await
                .expect("infallible")
                .status();
            assert!(status.is_success(), "create repo: {status}");
        });
        Fixture { rt, router }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let (gzip, body) = match data.split_first() {
        Some((flag, rest)) => (flag & 1 == 1, rest),
        None => (false, data),
    };
    let mut request = Request::post("/git/fuzz/branches/main/events")
        .header("x-ksync-protocol", "1")
        .header("content-type", "application/json");
    let body = if gzip {
        request = request.header("content-encoding", "gzip");
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(body).expect("gzip into a Vec");
        encoder.finish().expect("gzip into a Vec")
    } else {
        body.to_vec()
    };
    let request = request.body(Body::from(body)).expect("request");
    let status =
        f.rt.block_on(f.router.clone().oneshot(request))
            .expect("infallible")
            .status();
    assert!(
        !status.is_server_error() || status == StatusCode::SERVICE_UNAVAILABLE,
        "a push body produced {status}"
    );
});
