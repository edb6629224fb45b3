//! The spec's WebSocket authentication variants: a JWT or an API key.
//!
//! Against a server that checks credentials:
//!
//! ```sh
//! KSYNC_API_KEYS=demo=your-api-key KSYNC_JWT_SECRET=<32+ byte secret> \
//!     cargo run --release -p ksync-cli -- serve
//! KSYNC_API_KEY=your-api-key cargo run -p ksync --example websocket_auth -- apikey
//! KSYNC_JWT=<an HS256 JWT signed with that secret> cargo run -p ksync --example websocket_auth -- jwt
//! ```
//!
//! The JWT needs an `exp` claim (the server refuses tokens without one), e.g. with PyJWT
//! (`pip install pyjwt`):
//! `python3 -c 'import jwt,time; print(jwt.encode({"sub": "me", "exp": int(time.time()) + 3600}, "<the secret>", algorithm="HS256"))'`.
//!
//! A server started without authentication lets every client in, whatever it presents.
//! Refused credentials are an error from `connect` (the client does not retry them).

mod common;

use ksync::{Auth, SyncClient, WebSocketSyncClient};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::require_server().await;
    let url = common::ws_url("examples");
    let which = std::env::args().nth(1).unwrap_or_else(|| "jwt".to_owned());

    let sync_client = match which.as_str() {
        // auth: { type: 'jwt', token: 'your-jwt-token' }
        "jwt" => WebSocketSyncClient::builder(url.as_str())
            .auth(Auth::jwt(common::secret("KSYNC_JWT", "your-jwt-token")))
            .build()?,
        // auth: { type: 'apikey', key: 'your-api-key' }
        "apikey" => WebSocketSyncClient::builder(url.as_str())
            .auth(Auth::api_key(common::secret(
                "KSYNC_API_KEY",
                "your-api-key",
            )))
            .build()?,
        other => anyhow::bail!("unknown auth variant {other:?}: use `jwt` or `apikey`"),
    };

    match sync_client.connect().await {
        Ok(()) => println!("connected with {which} credentials"),
        Err(e) => {
            println!("the server refused the {which} credentials: {e}");
            return Err(e.into());
        }
    }
    sync_client.disconnect().await?;
    Ok(())
}
