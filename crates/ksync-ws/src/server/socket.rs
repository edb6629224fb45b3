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

use crate::progress::Stamp;

/// An upgraded connection. `Counted` also stamps the bytes the socket takes: the connection's
/// writes are bounded by "no byte taken for `write_timeout`" (see `progress`).
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
            let io = Counted::new(TokioIo::new(upgraded));
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

/// The socket under tungstenite, counting the bytes read from it and following the client's
/// frames in them (see [`Reading`]), and stamping when it last took bytes to write (one
/// pass-through for both: each is an `Arc` and a layer on every idle connection).
pub(crate) struct Counted<T> {
    io: T,
    frames: Frames,
    progress: Arc<Progress>,
}

impl<T> Counted<T> {
    pub(crate) fn new(io: T) -> Self {
        Counted {
            io,
            frames: Frames::default(),
            progress: Arc::default(),
        }
    }

    /// What was read, for the connection's [`Reading`], and when bytes were last taken, for
    /// its writer.
    pub(crate) fn progress(&self) -> Arc<Progress> {
        Arc::clone(&self.progress)
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
        let this = &mut *self;
        let read = buf.filled().get(before..).unwrap_or_default();
        this.frames.feed(read);
        let progress = &this.progress;
        let length = u64::try_from(read.len()).unwrap_or(u64::MAX);
        progress.read.fetch_add(length, Ordering::Relaxed);
        progress
            .messages
            .store(this.frames.messages, Ordering::Relaxed);
        progress
            .partial
            .store(this.frames.partial, Ordering::Relaxed);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write(cx, buf);
        self.progress.written.after_write(written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.progress.written.after_write(written)
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

/// What the read side has seen of the client, written by [`Counted`] as it reads, read by
/// the connection's [`Reading`] (the same task: relaxed loads see every store); and when
/// the socket last took bytes to write, for the connection's writes' timeout.
#[derive(Default)]
pub(crate) struct Progress {
    /// Bytes read in all.
    read: AtomicU64,
    /// Data messages whose last byte was read.
    messages: AtomicU64,
    /// Bytes read of the data message being received (its frames, not the control frames
    /// between them); 0 between messages.
    partial: AtomicU64,
    /// When the socket last took bytes to write (its creation before any); the room's direct
    /// writes count too.
    written: Stamp,
}

impl Progress {
    /// When the socket last took bytes to write, for `progress::unless_stalled`.
    pub(crate) fn last_write(&self) -> tokio::time::Instant {
        self.written.at()
    }
}

/// Where the bytes read stand in the client's frames, from their headers as they are on the
/// wire: a length may come in any of its three forms (tungstenite reads a small one written
/// in the 16- or 64-bit form too), so no header size is assumed. Only the framing is
/// followed; tungstenite checks the frames and fails the connection on a bad one.
#[derive(Default)]
struct Frames {
    /// The header being read: 2 bytes, up to 8 of extended length, 4 of mask.
    head: [u8; 14],
    head_len: u8,
    /// Payload bytes of the current frame still to come.
    left: u64,
    /// Whether the current frame is a control frame (never part of a message).
    control: bool,
    /// Whether the current frame is a data frame that ends its message.
    last: bool,
    /// Bytes of the data message being received so far; 0 between messages.
    partial: u64,
    /// Data messages whose last byte was read.
    messages: u64,
}

impl Frames {
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.left > 0 {
                let n =
                    usize::try_from(self.left).map_or(bytes.len(), |left| left.min(bytes.len()));
                let (payload, rest) = bytes.split_at(n);
                bytes = rest;
                let n = u64::try_from(payload.len()).unwrap_or(u64::MAX);
                self.left = self.left.saturating_sub(n);
                if !self.control {
                    self.partial = self.partial.saturating_add(n);
                }
                if self.left == 0 {
                    self.frame_read();
                }
                continue;
            }
            let Some((&byte, rest)) = bytes.split_first() else {
                break;
            };
            bytes = rest;
            if let Some(slot) = self.head.get_mut(usize::from(self.head_len)) {
                *slot = byte;
            }
            self.head_len = self.head_len.saturating_add(1);
            if self.head_len == 1 {
                // Opcodes 0x8 to 0xF are control frames.
                self.control = byte & 0x08 != 0;
                self.last = byte & 0x80 != 0;
            }
            if !self.control {
                self.partial = self.partial.saturating_add(1);
            }
            if let Some(length) = self.header_length() {
                self.head_len = 0;
                self.left = length;
                if length == 0 {
                    self.frame_read();
                }
            }
        }
    }

    /// The payload length, once the header is whole.
    fn header_length(&self) -> Option<u64> {
        let second = *self.head.get(1).filter(|_| self.head_len >= 2)?;
        let extended = match second & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if second & 0x80 != 0 { 4 } else { 0 };
        if usize::from(self.head_len) < 2 + extended + mask {
            return None;
        }
        let length = self.head.get(2..2 + extended)?.iter();
        Some(match extended {
            0 => u64::from(second & 0x7f),
            _ => length.fold(0, |length, &byte| length << 8 | u64::from(byte)),
        })
    }

    /// The current frame was read to its end.
    fn frame_read(&mut self) {
        if !self.control && self.last {
            self.messages = self.messages.saturating_add(1);
            self.partial = 0;
        }
    }
}

/// The read half, telling whether a message is being received (bytes of a data message were
/// read and not its last) and whether anything was read at all. tungstenite assembles a
/// message (up to `max_message_size`) from its frames as they come and shows nothing until
/// it is whole, so a client could hold one half sent, answering pings, for the connection's
/// life; the connection closes it when one makes no progress from one heartbeat to the next
/// (see `conn.rs`). Counted from the frames on the wire (see [`Frames`]), not from the
/// messages tungstenite returns: a control frame's header is as long as it is.
pub(crate) struct Reading<S> {
    inner: S,
    progress: Arc<Progress>,
}

impl<S> Reading<S> {
    pub(crate) fn new(inner: S, progress: Arc<Progress>) -> Self {
        Reading { inner, progress }
    }

    /// `Some` while a message is being received.
    pub(crate) fn unfinished(&self) -> Option<Unfinished> {
        let bytes = self.progress.partial.load(Ordering::Relaxed);
        (bytes > 0).then(|| Unfinished {
            after: self.progress.messages.load(Ordering::Relaxed),
            bytes,
        })
    }

    /// Bytes read from the client so far, of anything.
    pub(crate) fn bytes_read(&self) -> u64 {
        self.progress.read.load(Ordering::Relaxed)
    }
}

/// A message being received (see [`Reading::unfinished`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Unfinished {
    /// The data messages read before it.
    after: u64,
    /// Its bytes read so far.
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
        Pin::new(&mut self.inner).poll_next(cx)
    }
}
