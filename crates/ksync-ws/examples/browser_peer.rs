//! A `WebSocketSyncClient` driven line by line over stdin/stdout: the Rust side of the browser
//! tests (`cargo xtask browser`, `tests/browser/`), usable by any script.
//!
//! ```text
//! cargo run -p ksync-ws --example browser_peer -- ws://127.0.0.1:8080/ws/chat [--api-key KEY | --token JWT]
//! ```
//!
//! It needs a server there: `ksync serve --in-memory` (with `--api-key NAME=KEY` or
//! `KSYNC_JWT_SECRET` for the credential options to mean anything).
//!
//! Commands on stdin, one JSON object a line:
//! - `{"cmd":"send","event":{...}}`: send one event (the spec's shape);
//! - `{"cmd":"burst","count":N,"type":"t","prefix":"p","perSecond":R}`: send N generated events
//!   (ids `p-0`, `p-1`, ...), R per second (default: as fast as possible);
//! - `{"cmd":"quit"}` (or end of input): disconnect and exit.
//!
//! Reports on stdout, one JSON object a line: `{"kind":"connected"}`, `{"kind":"disconnected"}`,
//! `{"kind":"event","event":{...}}`, `{"kind":"sent","id":".."}`,
//! `{"kind":"burst-done","count":N}` (N sent: fewer than asked after an `error`), `{"kind":"error","message":".."}`.
//!
//! `browser_peer --append-to-log DATA_DIR ROOM EVENT_JSON...` instead appends the events (one
//! JSON object an argument: serde_json reads 127 levels, a list around them would cost one) to
//! ROOM's log under a server's `--data-dir` as an older relay stored them (no publish check),
//! prints `{"kind":"appended","count":N}` and exits: run it before the server starts.

use std::io::Write as _;
use std::time::Duration;

use ksync_core::{Auth, Event, LogName, Name, Notification, StorageProvider as _, SyncClient};
use ksync_storage_file::FileProvider;
use ksync_ws::WebSocketSyncClient;
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt as _;

fn report(value: &Value) {
    let mut out = std::io::stdout().lock();
    // A closed stdout means the driver is gone; the next stdin read ends the program.
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .ok_or("usage: browser_peer <ws-url> [--api-key KEY | --token JWT]")?;
    if url == "--append-to-log" {
        let usage = "usage: browser_peer --append-to-log DATA_DIR ROOM EVENT_JSON...";
        let dir = args.next().ok_or(usage)?;
        let room = args.next().ok_or(usage)?;
        let events = args
            .map(|arg| serde_json::from_str::<Event>(&arg))
            .collect::<Result<Vec<_>, _>>()?;
        let count = events.len();
        let log = FileProvider::new(dir)?.open(&LogName::Room(Name::new(&room)?))?;
        log.append(events).await?;
        report(&json!({"kind": "appended", "count": count}));
        return Ok(());
    }
    let mut builder = WebSocketSyncClient::builder(url.as_str())
        .reconnect(true)
        .reconnect_delay(Duration::from_millis(100), Duration::from_secs(2));
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        builder = match flag.as_str() {
            "--api-key" => builder.auth(Auth::api_key(value)),
            "--token" => builder.auth(Auth::jwt(value)),
            other => return Err(format!("unknown option {other}").into()),
        };
    }
    let client = builder.build()?;
    let _connected = client.on(
        "connected",
        Box::new(|_| report(&json!({"kind": "connected"}))),
    )?;
    let _disconnected = client.on(
        "disconnected",
        Box::new(|_| report(&json!({"kind": "disconnected"}))),
    )?;
    let _event = client.on(
        "event",
        Box::new(|n| {
            if let Notification::Event(event) = n {
                report(&json!({"kind": "event", "event": event}));
            }
        }),
    )?;
    let _error = client.on(
        "error",
        Box::new(|n| {
            if let Notification::Error(error) = n {
                report(&json!({"kind": "error", "message": error.to_string()}));
            }
        }),
    )?;
    // With reconnect on, a failed first attempt keeps retrying in the background.
    if let Err(error) = client.connect().await {
        report(&json!({"kind": "error", "message": error.to_string()}));
    }

    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let command: Value = match serde_json::from_str(&line) {
            Ok(command) => command,
            Err(error) => {
                report(&json!({"kind": "error", "message": format!("bad command: {error}")}));
                continue;
            }
        };
        match command["cmd"].as_str() {
            Some("send") => match serde_json::from_value::<Event>(command["event"].clone()) {
                Ok(event) => {
                    let id = event.id.clone();
                    match client.send(event).await {
                        Ok(()) => report(&json!({"kind": "sent", "id": id})),
                        Err(error) => {
                            report(&json!({"kind": "error", "message": error.to_string()}));
                        }
                    }
                }
                Err(error) => {
                    report(&json!({"kind": "error", "message": format!("bad event: {error}")}));
                }
            },
            Some("burst") => {
                let count = command["count"].as_u64().unwrap_or(1);
                let kind = command["type"].as_str().unwrap_or("load").to_owned();
                let prefix = command["prefix"].as_str().unwrap_or("burst").to_owned();
                let pause = command["perSecond"]
                    .as_f64()
                    .filter(|r| *r > 0.0)
                    .map(|r| Duration::from_secs_f64(1.0 / r));
                let mut sent = 0;
                for n in 0..count {
                    let event = Event::new(
                        format!("{prefix}-{n}"),
                        kind.as_str(),
                        json!({"n": n, "from": "rust"}),
                        now_millis(),
                    );
                    if let Err(error) = client.send(event).await {
                        report(&json!({"kind": "error", "message": error.to_string()}));
                        break;
                    }
                    sent += 1;
                    if let Some(pause) = pause {
                        tokio::time::sleep(pause).await;
                    }
                }
                // How many were handed to the client (fewer than asked after an error).
                report(&json!({"kind": "burst-done", "count": sent}));
            }
            Some("quit") => break,
            _ => report(&json!({"kind": "error", "message": "unknown command"})),
        }
    }
    client.disconnect().await?;
    Ok(())
}

fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
