//! The catch-up protocol's codec: libp2p's CBOR codec, counting the bytes of every request
//! and answer it reads or writes, so that `metrics` bandwidth covers catch-up as well as
//! gossip.
//!
//! What is counted is each message's encoded CBOR as it goes over the protocol's stream
//! (below that, yamux and noise add their framing, which gossip bytes leave out too). The
//! codec runs on the connections' tasks, hence the shared atomic.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use libp2p::StreamProtocol;
use libp2p::futures::{AsyncRead, AsyncReadExt, AsyncWrite};
use libp2p::request_response::{self, cbor};

use crate::wire::{MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES, SyncRequest, SyncResponse};

type Cbor = cbor::codec::Codec<SyncRequest, SyncResponse>;

/// [`Cbor`], adding every byte it reads or writes to `bytes`. It owns the protocol's size
/// limits: a request read is at most [`MAX_REQUEST_BYTES`] (by the inner codec), an answer
/// at most [`MAX_RESPONSE_BYTES`] (here: answers are not read by the inner codec).
#[derive(Clone)]
pub(crate) struct CountingCodec {
    inner: Cbor,
    bytes: Arc<AtomicU64>,
}

impl CountingCodec {
    pub(crate) fn new(bytes: Arc<AtomicU64>) -> Self {
        Self {
            inner: Cbor::default().set_request_size_maximum(MAX_REQUEST_BYTES),
            bytes,
        }
    }
}

impl request_response::Codec for CountingCodec {
    type Protocol = StreamProtocol;
    type Request = SyncRequest;
    type Response = SyncResponse;

    async fn read_request<T>(
        &mut self,
        protocol: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<SyncRequest>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut io = Counted::new(io, &self.bytes);
        self.inner.read_request(protocol, &mut io).await
    }

    /// Read as libp2p's codec reads it (the whole answer, at most [`MAX_RESPONSE_BYTES`]),
    /// then decoded by [`decode_answer`].
    async fn read_response<T>(
        &mut self,
        _protocol: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<SyncResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut io = Counted::new(io, &self.bytes);
        let mut answer = Vec::new();
        (&mut io)
            .take(MAX_RESPONSE_BYTES)
            .read_to_end(&mut answer)
            .await?;
        decode_answer(&answer)
    }

    async fn write_request<T>(
        &mut self,
        protocol: &StreamProtocol,
        io: &mut T,
        request: SyncRequest,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let mut io = Counted::new(io, &self.bytes);
        self.inner.write_request(protocol, &mut io, request).await
    }

    async fn write_response<T>(
        &mut self,
        protocol: &StreamProtocol,
        io: &mut T,
        response: SyncResponse,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let mut io = Counted::new(io, &self.bytes);
        self.inner.write_response(protocol, &mut io, response).await
    }
}

/// Most nesting steps [`decode_answer`] takes: cbor4ii counts two per level of arrays and
/// maps, so this reads events whose data nests [`ksync_core::MAX_RECEIVED_DATA_DEPTH`] levels
/// in an answer (a few levels around each).
const MAX_ANSWER_STEPS: usize = 2 * ksync_core::received_json::MAX_RECEIVED_MESSAGE_DEPTH;

/// Decodes a catch-up answer. cbor4ii's own readers stop at 256 nesting steps, 125 levels of
/// an event's data in an `Events` answer: an event older builds stored deeper (they allowed
/// 128) failed every answer that carried it, so the asker never caught up on that answer's
/// events from anyone holding it. This reader allows [`MAX_ANSWER_STEPS`] (the recursion
/// stays within a few levels of cbor4ii's own).
pub(crate) fn decode_answer(answer: &[u8]) -> io::Result<SyncResponse> {
    let reader = DeepSlice {
        rest: answer,
        steps_left: MAX_ANSWER_STEPS,
    };
    serde::Deserialize::deserialize(&mut cbor4ii::serde::Deserializer::new(reader)).map_err(
        |e: cbor4ii::serde::DecodeError<Infallible>| {
            io::Error::new(io::ErrorKind::InvalidData, e.to_string())
        },
    )
}

/// cbor4ii's slice reader with a nesting budget of our choice.
struct DeepSlice<'a> {
    rest: &'a [u8],
    steps_left: usize,
}

impl<'de> cbor4ii::core::dec::Read<'de> for DeepSlice<'de> {
    type Error = Infallible;

    fn fill<'short>(
        &'short mut self,
        want: usize,
    ) -> Result<cbor4ii::core::dec::Reference<'de, 'short>, Infallible> {
        let len = self.rest.len().min(want);
        Ok(cbor4ii::core::dec::Reference::Long(&self.rest[..len]))
    }

    fn advance(&mut self, n: usize) {
        self.rest = &self.rest[self.rest.len().min(n)..];
    }

    fn step_in(&mut self) -> bool {
        match self.steps_left.checked_sub(1) {
            Some(left) => {
                self.steps_left = left;
                true
            }
            None => false,
        }
    }

    fn step_out(&mut self) {
        self.steps_left += 1;
    }
}

/// A stream that adds what passes through it to `bytes` as it goes (so a message cut short
/// still counts what did cross).
struct Counted<'a, T> {
    io: &'a mut T,
    bytes: &'a AtomicU64,
}

impl<'a, T> Counted<'a, T> {
    fn new(io: &'a mut T, bytes: &'a AtomicU64) -> Self {
        Self { io, bytes }
    }

    fn count(&self, poll: &Poll<io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = poll {
            self.bytes.fetch_add(*n as u64, Ordering::Relaxed);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut *self.io).poll_read(cx, buf);
        self.count(&poll);
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut *self.io).poll_write(cx, buf);
        self.count(&poll);
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use libp2p::futures::io::Cursor;
    use libp2p::request_response::Codec as _;

    use super::*;

    fn codec() -> (CountingCodec, Arc<AtomicU64>) {
        let bytes = Arc::new(AtomicU64::new(0));
        (CountingCodec::new(Arc::clone(&bytes)), bytes)
    }

    /// The codec itself holds requests to `MAX_REQUEST_BYTES` (libp2p's default is 1 MiB).
    #[tokio::test]
    async fn a_request_past_the_request_limit_is_refused() {
        let protocol = StreamProtocol::new(crate::wire::SYNC_PROTOCOL);
        let request = |len: usize| SyncRequest::Keys {
            network: "n".repeat(len),
            after: 0,
            limit: 1,
        };
        let limit = MAX_REQUEST_BYTES as usize;
        for (len, read) in [(limit - 64, true), (limit + 64, false)] {
            let (mut codec, _) = codec();
            let mut wire = Cursor::new(Vec::new());
            codec
                .write_request(&protocol, &mut wire, request(len))
                .await
                .expect("write");
            wire.set_position(0);
            let back = codec.read_request(&protocol, &mut wire).await;
            assert_eq!(back.is_ok(), read, "{len} bytes: {back:?}");
        }
    }

    #[tokio::test]
    async fn what_is_written_and_read_back_is_counted_both_ways() {
        let protocol = StreamProtocol::new(crate::wire::SYNC_PROTOCOL);
        let response = SyncResponse::Refused {
            reason: "x".repeat(1000),
            busy: false,
        };
        let (mut writer, written) = codec();
        let mut wire = Cursor::new(Vec::new());
        writer
            .write_response(&protocol, &mut wire, response)
            .await
            .expect("write");
        let sent = wire.get_ref().len() as u64;
        assert!(sent > 1000, "the reason alone is 1000 bytes: {sent}");
        assert_eq!(written.load(Ordering::Relaxed), sent);

        let (mut reader, read) = codec();
        wire.set_position(0);
        let back = reader
            .read_response(&protocol, &mut wire)
            .await
            .expect("read");
        assert!(matches!(back, SyncResponse::Refused { reason, .. } if reason.len() == 1000));
        assert_eq!(read.load(Ordering::Relaxed), sent);
    }

    /// An answer holding an event older builds stored as deep as they allowed is read (past
    /// cbor4ii's own 256 steps: it failed every answer carrying it); far deeper is refused.
    #[tokio::test]
    async fn an_answer_holding_the_deepest_data_older_builds_stored_is_read() {
        let protocol = StreamProtocol::new(crate::wire::SYNC_PROTOCOL);
        let answer = |levels: usize| SyncResponse::Events {
            events: vec![ksync_core::Event::new(
                "deep",
                "t",
                ksync_testkit::edge_data::nested(levels),
                1,
            )],
            too_large: Vec::new(),
        };
        for (levels, read) in [(ksync_core::MAX_RECEIVED_DATA_DEPTH, true), (200, false)] {
            let (mut codec, _) = codec();
            let mut wire = Cursor::new(Vec::new());
            codec
                .write_response(&protocol, &mut wire, answer(levels))
                .await
                .expect("write");
            wire.set_position(0);
            let back = codec.read_response(&protocol, &mut wire).await;
            match back {
                Ok(SyncResponse::Events { events, .. }) if read => {
                    assert_eq!(events[0].data, ksync_testkit::edge_data::nested(levels));
                }
                Err(e) if !read => assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}"),
                other => panic!("{levels} levels: {other:?}"),
            }
        }
    }
}
