//! WebSocket messages as the relay reads them: text frames through `protocol::decode`, binary
//! frames through the bounded `inflate` first. Never a panic; an inflated frame never exceeds
//! the limit.
#![no_main]

use ksync_ws::protocol::{self, CLIENT_TYPES, ClientMessage, SERVER_TYPES, ServerMessage};
use libfuzzer_sys::fuzz_target;

const LIMIT: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let _ = protocol::decode::<ClientMessage>(data, CLIENT_TYPES);
    let _ = protocol::decode::<ServerMessage>(data, SERVER_TYPES);
    if let Ok(inflated) = protocol::inflate(data, LIMIT) {
        assert!(inflated.len() <= LIMIT);
        let _ = protocol::decode::<ClientMessage>(&inflated, CLIENT_TYPES);
    }
});
