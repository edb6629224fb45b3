//! The relay's end of the WebSocket: the upgrade completed on tokio-tungstenite (axum's
//! `WebSocketUpgrade` still checks the request and picks the subprotocol), and the write half
//! that sends a large message as several frames.
//!
//! Why not axum's `WebSocket`: tungstenite copies each frame whole into the connection's write
//! buffer and keeps that buffer's capacity for the connection's life, and axum's `Message`
//! cannot send one message as several frames. One publish of `max_message_size` left a buffer
//! of that size on every subscriber that received it (800 subscribers, one 900 KB event:
//! +690 MiB, for good). Sent in fragments (standard WebSocket fragmentation, RFC 6455 5.4,
//! which every client reassembles), a connection's buffer holds at most `write_buffer_size`
//! plus one fragment.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use axum::body::Body;
use axum::extract::ws::WebSocketUpgrade;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Version, header};
use axum::response::Response;
use bytes::Bytes;
use futures_util::FutureExt as _;
use futures_util::future::OptionFuture;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error, Message};

/// An upgraded connection.
pub(crate) type Socket = WebSocketStream<Counted<TokioIo<hyper::upgrade::Upgraded>>>;

/// Messages longer than this go as several frames of at most this many bytes. Small enough
/// that the write buffer a connection keeps is small (10,000 connections × ~2 fragments), large
/// enough that a 1 MiB message costs 64 writes per subscriber, not hundreds; the many small
/// messages of the hot path (event batches of a few hundred bytes) go as one frame, as before.
pub(crate) const FRAGMENT_BYTES: usize = 16 * 1024;

/// What the request carried for completing its upgrade, taken before axum's extractor (which
/// checks the request and takes hyper's upgrade for itself; ours is a clone of the same
/// one-shot, the extractor's is dropped unused).
pub(crate) struct Pending {
    on_upgrade: Option<OnUpgrade>,
    /// `Sec-WebSocket-Key` for HTTP/1.1 (HTTP/2's extended CONNECT has none).
    key: Option<HeaderValue>,
}

impl Pending {
    pub(crate) fn new(
        version: Version,
        headers: &HeaderMap,
        extensions: &http::Extensions,
    ) -> Self {
        Pending {
            on_upgrade: extensions.get::<OnUpgrade>().cloned(),
            key: (version <= Version::HTTP_11)
                .then(|| headers.get(header::SEC_WEBSOCKET_KEY).cloned())
                .flatten(),
        }
    }

    /// Answers the upgrade `ws` (checked, its subprotocol chosen) and runs `serve` on the
    /// socket once the upgrade completes. The response is axum's: 101 with the accept key on
    /// HTTP/1.1, 200 on HTTP/2, the chosen subprotocol echoed. `serve` is dropped unrun when
    /// the upgrade never completes.
    pub(crate) fn accept<F, Fut>(
        self,
        ws: &WebSocketUpgrade,
        config: WebSocketConfig,
        serve: F,
    ) -> Response
    where
        F: FnOnce(Socket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Some(on_upgrade) = self.on_upgrade else {
            // Not reached: axum's extractor refused a request without it (426).
            return empty(StatusCode::UPGRADE_REQUIRED);
        };
        let socket = async move {
            let upgraded = on_upgrade.await.ok()?;
            let io = Counted {
                io: TokioIo::new(upgraded),
                read: Arc::new(AtomicU64::new(0)),
            };
            Some(WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await)
        };
        // Chained, not one `async` block: a coroutine keeps its captures (`serve`, the
        // config) for its whole life, a `Then` drops the first stage once the second runs,
        // so the connection's task holds only the connection's future.
        tokio::spawn(
            socket
                .then(move |socket| OptionFuture::from(socket.map(serve)))
                .map(|_: Option<()>| ()),
        );
        let mut response = match &self.key {
            Some(key) => {
                let accept =
                    tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
                let mut response = empty(StatusCode::SWITCHING_PROTOCOLS);
                let headers = response.headers_mut();
                headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
                if let Ok(accept) = HeaderValue::from_str(&accept) {
                    headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
                }
                response
            }
            // HTTP/2 (RFC 8441): a 2xx with an empty body.
            None => empty(StatusCode::OK),
        };
        if let Some(protocol) = ws.selected_protocol() {
            response
                .headers_mut()
                .insert(header::SEC_WEBSOCKET_PROTOCOL, protocol.clone());
        }
        response
    }
}

fn empty(status: StatusCode) -> Response {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = status;
    response
}

/// A text message of `json`, UTF-8 already (the relay's own encoding, kept in frames as
/// axum's `Utf8Bytes`): the frame tungstenite makes of a `Message::Text`, without checking the
/// bytes again for each subscriber.
pub(crate) fn text(json: Bytes) -> Message {
    Message::Frame(Frame::message(json, OpCode::Data(Data::Text), true))
}

/// A write half that sends a text or binary message longer than [`FRAGMENT_BYTES`] as a
/// fragmented message: its first frame (fin unset), continuation frames, the last with fin.
/// The fragments are slices of the message's shared bytes (no copy); the next message is
/// taken only once the last fragment of this one is written to the socket's buffer (control
/// frames tungstenite adds meanwhile, such as a pong, may go between fragments, as RFC 6455
/// allows). Anything shorter goes on as it is.
pub(crate) struct Fragmented<S> {
    inner: S,
    /// What is left of a message being sent in fragments.
    rest: Bytes,
}

impl<S> Fragmented<S> {
    pub(crate) fn new(inner: S) -> Self {
        Fragmented {
            inner,
            rest: Bytes::new(),
        }
    }
}

impl<S: futures_util::Sink<Message, Error = Error> + Unpin> Fragmented<S> {
    /// Hands the rest of a fragmented message to the inner sink, a fragment each time it is
    /// ready.
    fn poll_rest(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        while !self.rest.is_empty() {
            ready!(Pin::new(&mut self.inner).poll_ready(cx))?;
            let fragment = self.rest.split_to(self.rest.len().min(FRAGMENT_BYTES));
            let fin = self.rest.is_empty();
            let frame = Frame::message(fragment, OpCode::Data(Data::Continue), fin);
            Pin::new(&mut self.inner).start_send(Message::Frame(frame))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: futures_util::Sink<Message, Error = Error> + Unpin> futures_util::Sink<Message>
    for Fragmented<S>
{
    type Error = Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        ready!(self.poll_rest(cx))?;
        Pin::new(&mut self.inner).poll_ready(cx)
    }

    fn start_send(mut self: Pin<&mut Self>, message: Message) -> Result<(), Error> {
        let (mut bytes, opcode) = match message {
            Message::Text(text) if text.len() > FRAGMENT_BYTES => {
                (Bytes::from(text), OpCode::Data(Data::Text))
            }
            Message::Binary(bytes) if bytes.len() > FRAGMENT_BYTES => {
                (bytes, OpCode::Data(Data::Binary))
            }
            // A whole text or binary message as a frame (see [`text`]).
            Message::Frame(frame)
                if frame.payload().len() > FRAGMENT_BYTES
                    && frame.header().is_final
                    && matches!(
                        frame.header().opcode,
                        OpCode::Data(Data::Text | Data::Binary)
                    ) =>
            {
                let opcode = frame.header().opcode;
                (frame.into_payload(), opcode)
            }
            other => return Pin::new(&mut self.inner).start_send(other),
        };
        let first = bytes.split_to(FRAGMENT_BYTES);
        Pin::new(&mut self.inner)
            .start_send(Message::Frame(Frame::message(first, opcode, false)))?;
        self.rest = bytes;
        Ok(())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        ready!(self.poll_rest(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        ready!(self.poll_rest(cx))?;
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

/// The socket under tungstenite, counting the bytes read from it (see [`Reading`]).
pub(crate) struct Counted<T> {
    io: T,
    read: Arc<AtomicU64>,
}

impl<T> Counted<T> {
    /// The count of bytes read, for the connection's [`Reading`].
    pub(crate) fn read_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.read)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.io).poll_read(cx, buf))?;
        let read = buf.filled().len().saturating_sub(before);
        self.read
            .fetch_add(u64::try_from(read).unwrap_or(u64::MAX), Ordering::Relaxed);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A control frame from a client on the wire: 2 bytes of header and a 4-byte mask (clients
/// must mask; their payload is at most 125 bytes, so no extended length) before the payload.
const CONTROL_FRAME_OVERHEAD: u64 = 6;

/// The read half, telling whether a message is being received: bytes were read that no
/// message returned so far accounts for. tungstenite assembles a message (up to
/// `max_message_size`) from its frames as they come and shows nothing until it is whole, so a
/// client could hold one half sent, answering pings, for the connection's life; the
/// connection closes it when one makes no progress from one heartbeat to the next (see
/// `conn.rs`).
///
/// A data message returned accounts for everything read so far (what was read with it and
/// belongs to the next message, at most a read's worth, is forgiven); a control frame for its
/// own length on the wire.
pub(crate) struct Reading<S> {
    inner: S,
    read: Arc<AtomicU64>,
    accounted: u64,
    /// Data messages returned so far.
    messages: u64,
}

impl<S> Reading<S> {
    pub(crate) fn new(inner: S, read: Arc<AtomicU64>) -> Self {
        Reading {
            inner,
            read,
            accounted: 0,
            messages: 0,
        }
    }

    /// `Some` while a message is being received.
    pub(crate) fn unfinished(&self) -> Option<Unfinished> {
        let read = self.read.load(Ordering::Relaxed);
        (read > self.accounted).then(|| Unfinished {
            after: self.messages,
            bytes: read - self.accounted,
        })
    }
}

/// A message being received (see [`Reading::unfinished`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Unfinished {
    /// The data messages returned before it.
    after: u64,
    /// Its bytes read so far (with, at most, a read's worth that came with the one before).
    bytes: u64,
}

impl Unfinished {
    /// Whether this is `earlier`'s message with nothing more of it read since.
    pub(crate) fn stalled_since(&self, earlier: &Unfinished) -> bool {
        self.after == earlier.after && self.bytes <= earlier.bytes
    }
}

impl<S: futures_util::Stream<Item = Result<Message, Error>> + Unpin> futures_util::Stream
    for Reading<S>
{
    type Item = Result<Message, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let next = ready!(Pin::new(&mut self.inner).poll_next(cx));
        let read = self.read.load(Ordering::Relaxed);
        match &next {
            Some(Ok(Message::Ping(payload) | Message::Pong(payload))) => {
                let length = u64::try_from(payload.len()).unwrap_or(u64::MAX);
                let frame = CONTROL_FRAME_OVERHEAD.saturating_add(length);
                self.accounted = self.accounted.saturating_add(frame).min(read);
            }
            Some(Ok(_)) => {
                self.accounted = read;
                self.messages += 1;
            }
            Some(Err(_)) | None => {}
        }
        Poll::Ready(next)
    }
}
