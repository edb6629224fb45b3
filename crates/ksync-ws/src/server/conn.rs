//! One task per connection: reads the client's messages, forwards publishes to the room, and
//! writes what the room queued for it (shared frames) plus its own catch-up.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::stream::SplitStream;
use futures_util::{SinkExt, StreamExt};
use ksync_core::{Access, Event, EventLimits, Grant, Name, PROTOCOL_VERSION, ResourceKind};
use tokio::time::{Instant, MissedTickBehavior, interval_at, timeout};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::Instrument as _;

use super::outbox::{Outbox, Sink, frame_message};
use super::publish::{self, Read, checked_publish, incoming};
use super::room::{
    EVENTS_ENTRY_OVERHEAD, EVENTS_FRAME_OVERHEAD, Frame, Member, PublishCommand, RoomLink,
    Subscribed,
};
use super::socket::{Fragmented, Progress, Reading, Socket};
use super::{ConnectionSlot, RelayError, Shared};
use crate::progress::unless_stalled;
use crate::protocol::{
    self, CLIENT_TYPES, ClientMessage, DecodeError, Hello, Publish, ServerMessage, SnapshotPage,
    Welcome, close, code,
};

pub(crate) struct Connection {
    pub(crate) shared: Arc<Shared>,
    pub(crate) socket: Socket,
    pub(crate) room: Name,
    pub(crate) grant: Grant,
    /// The room joined (replaced when the room closed before the connection joined it).
    pub(crate) member: Member,
    pub(crate) id: u64,
    pub(crate) _slot: ConnectionSlot,
}

type Stream = Reading<SplitStream<Socket>>;

/// Why the connection loop ended.
enum End {
    /// Close with this code and reason (best effort).
    Close(u16, String),
    /// The peer is gone or the socket failed: just drop it.
    Drop,
}

/// The connection task's writes. The socket's write half lives in the [`Outbox`] it shares
/// with the room (which writes the room's frames directly when it can); the task takes it for
/// each of its own messages and, when it gives it back, first writes whatever the room queued
/// meanwhile.
///
/// A write ends the connection when the socket takes no byte of it for `write_timeout`, not
/// when it takes longer than that in all: a catch-up page (up to `max_message_size`) to a
/// subscriber on a slow link takes as long as the link needs (bounded as a whole, a 1 MiB page
/// at 50 KB/s was cut off at 10 s, and again on every reconnection).
struct Writer {
    outbox: Arc<Outbox>,
    compression: bool,
    write_timeout: std::time::Duration,
    /// When the socket last took bytes (the room's direct writes count too).
    progress: Arc<Progress>,
}

impl Writer {
    async fn send(&mut self, message: Message) -> Result<(), End> {
        let mut sink = self.outbox.take_sink().ok_or(End::Drop)?;
        match unless_stalled(
            self.write_timeout,
            || self.progress.last_write(),
            sink.send(message),
        )
        .await
        {
            Some(Ok(())) => self.give_back(sink).await,
            _ => Err(End::Drop),
        }
    }

    /// Returns the sink to the outbox, after writing (with one flush per round) what the room
    /// queued while it was taken, or flushing what a direct write of the room left unflushed.
    async fn give_back(&mut self, mut sink: Sink) -> Result<(), End> {
        loop {
            let frames = match self.outbox.put_back(sink) {
                Ok(()) => return Ok(()),
                Err((back, frames)) => {
                    sink = back;
                    frames
                }
            };
            let compression = self.compression;
            let write = async {
                for frame in &frames {
                    sink.feed(frame_message(frame, compression)).await?;
                }
                sink.flush().await
            };
            match unless_stalled(self.write_timeout, || self.progress.last_write(), write).await {
                Some(Ok(())) => {}
                _ => return Err(End::Drop),
            }
        }
    }

    /// Writes what the room left for this connection (after a notification).
    async fn serve_room(&mut self) -> Result<(), End> {
        let sink = self.outbox.take_sink().ok_or(End::Drop)?;
        self.give_back(sink).await
    }

    fn frame_message(&self, frame: &Frame) -> Message {
        frame_message(frame, self.compression)
    }

    async fn message(&mut self, message: &ServerMessage, batch: bool) -> Result<(), End> {
        let frame = Frame::encode(message, batch);
        let message = self.frame_message(&frame);
        self.send(message).await
    }

    async fn close(&mut self, code: u16, reason: String) {
        let Some(mut sink) = self.outbox.take_sink() else {
            return;
        };
        let frame = CloseFrame {
            code: code.into(),
            reason: reason.into(),
        };
        let close = async {
            if sink.send(Message::Close(Some(frame))).await.is_err() {
                // The client closed first: tungstenite refuses our close frame and has queued
                // the echo of the client's (RFC 6455 5.5.1), which a flush writes. Without it
                // the client saw its close answered by a dropped socket.
                let _ = sink.flush().await;
            }
        };
        let _ = timeout(self.write_timeout, close).await;
    }
}

/// Ends the connection's side of the outbox however the task ends (the room may keep the
/// outbox until it reads the unsubscribe, the socket must not wait for that).
struct Leave(Arc<Outbox>);

impl Drop for Leave {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// The connection's task: a plain function that sets up and returns the future, so the
/// task holds each part of `connection` once. (An `async fn` keeps its argument in the
/// future beside the locals moved out of it, and every idle connection's task would carry
/// both; see `Relay::upgrade` for the same reason one level up.)
pub(crate) fn serve(connection: Connection) -> impl Future<Output = ()> + Send {
    let Connection {
        shared,
        socket,
        room,
        grant,
        mut member,
        id,
        _slot: slot,
    } = connection;
    let progress = socket.get_ref().progress();
    let (sink, stream) = socket.split();
    let mut stream = Reading::new(stream, Arc::clone(&progress));
    let sink = Box::new(Fragmented::new(sink));
    // Bounded: see RelayConfig::subscriber_queue for the overflow policy.
    let outbox = Outbox::new(
        sink,
        shared.config.subscriber_queue,
        shared.config.subscriber_queue_bytes,
        Arc::clone(&shared.queue_budget),
    );
    let leave = Leave(Arc::clone(&outbox));
    let mut writer = Writer {
        outbox,
        compression: false,
        write_timeout: shared.config.write_timeout,
        progress,
    };
    // Instrumented, not entered: an entered span's guard held across an await would stay
    // entered on the worker thread while other tasks run there.
    let span = tracing::debug_span!("ws_conn", conn = id, room = %room, subject = %grant.subject);
    async move {
        let end = match run(
            &shared,
            &mut writer,
            &mut stream,
            &room,
            &grant,
            &mut member.link,
            id,
        )
        .await
        {
            Ok(()) => End::Close(close::NORMAL, String::new()),
            Err(end) => end,
        };
        // Leaves the room (before the close handshake, which may take a while).
        drop(member);
        if let End::Close(code, reason) = end {
            tracing::debug!(code, %reason, "closing connection");
            writer.close(code, reason).await;
        }
        // The socket's halves go before the outbox is left and the slot freed, as the locals
        // of the `async fn` this was did.
        drop(writer);
        drop(stream);
        drop(leave);
        drop(slot);
    }
    .instrument(span)
}

async fn run(
    shared: &Arc<Shared>,
    writer: &mut Writer,
    stream: &mut Stream,
    room: &Name,
    grant: &Grant,
    room_link: &mut RoomLink,
    id: u64,
) -> Result<(), End> {
    let config = &shared.config;
    // A connection must not outlive its credentials (a JWT's `exp`), from the upgrade on:
    // watched here while waiting for `hello`, between catch-up pages (`catch_up_goes_on`) and
    // then live. Boxed, and only for credentials that expire: every idle connection would
    // carry a timer otherwise.
    let mut expiry = expiry_timer(grant);
    // A shutdown closes a connection still waiting for its `hello` at once (1001), as it
    // closes the joined ones: it would otherwise hold the shutdown up until the timeout.
    let handshake = async {
        let mut shutdown = shared.shutdown.subscribe();
        tokio::select! {
            read = timeout(config.handshake_timeout, read_hello(writer, stream)) => Ok(read),
            _ = shutdown.wait_for(|stopping| *stopping) => Err(going_away()),
            () = expired(&mut expiry) => Err(credentials_expired()),
        }
    };
    let hello = match Box::pin(handshake).await? {
        Ok(hello) => hello?,
        Err(_) => {
            return Err(End::Close(
                close::HANDSHAKE_TIMEOUT,
                "no hello within the handshake timeout".into(),
            ));
        }
    };
    writer.compression = hello.compression;
    writer.outbox.set_compression(hello.compression);

    // Join the room: from here on the room queues every new batch for us (and writes them
    // directly once we are live, after the catch-up).
    // A join waits for the room's commit in progress (on a slow disk, as long as its append
    // takes): a shutdown (1001) or the credentials' end (4401) ends that wait, as they end
    // every other wait of a connection. Dropping the join is safe: it changes nothing before
    // it has the room's lock, and nothing it awaits once it has it.
    let joined = {
        let mut shutdown = shared.shutdown.subscribe();
        tokio::select! {
            joined = Box::pin(join(shared, writer, room, room_link, id, hello.state)) => joined,
            _ = shutdown.wait_for(|stopping| *stopping) => Err(going_away()),
            () = expired(&mut expiry) => Err(credentials_expired()),
        }
    };
    let Subscribed {
        server_version,
        snapshot,
    } = joined?;
    // Expired while joining (which may wait for a closing room): no welcome, no catch-up.
    check_expiry(grant)?;
    let room_link = &*room_link;
    // Boxed, the message with it: inline, this one-off wait would be the largest state of
    // the future every idle connection's task carries.
    Box::pin(async {
        let welcome = ServerMessage::Welcome(Welcome {
            protocol: PROTOCOL_VERSION,
            room: room.to_string(),
            server_version,
            compression: hello.compression,
            heartbeat_ms: u64::try_from(config.heartbeat.as_millis()).unwrap_or(u64::MAX),
            max_message_size: config.max_message_size,
            log_id: Some(room_link.log_id().to_owned()),
        });
        writer.message(&welcome, false).await
    })
    .await?;
    // Boxed (here and below): these futures are large and short-lived; kept inline they would
    // make every idle connection's task carry their size.
    Box::pin(catch_up(
        shared,
        writer,
        room_link,
        grant,
        &hello,
        server_version,
        snapshot,
    ))
    .await?;

    writer.outbox.go_live();

    let mut shutdown = shared.shutdown.subscribe();
    let mut shutting_down = *shutdown.borrow();
    let mut ping = interval_at(Instant::now() + config.heartbeat, config.heartbeat);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Bytes read from the client when the last ping went out; `None` before the first ping
    // and once a message came since (see the tick branch).
    let mut read_at_ping = None;
    // A message being received at the last tick (see `Reading::unfinished`).
    let mut unfinished = None;
    // Heartbeat ticks since the drain began (see the tick branch).
    let mut drain_ticks = 0u32;
    // The two waits below live across iterations: made anew for every message, each would
    // register with (and then leave) its `Notify` once per message read.
    let outbox = Arc::clone(&writer.outbox);
    let mut room_notified = std::pin::pin!(outbox.notified());
    let mut shutdown_changed = std::pin::pin!(shutdown.changed());
    let mut burst = Burst::default();
    let reader = Reader {
        shared,
        room,
        grant,
        room_link,
        id,
    };
    loop {
        tokio::select! {
            () = expired(&mut expiry) => return Err(credentials_expired()),
            () = &mut room_notified => {
                room_notified.set(outbox.notified());
                writer.serve_room().await?;
                if let Some((code, reason)) = writer.outbox.closed() {
                    return Err(End::Close(code, reason.into()));
                }
            },
            message = stream.next(), if !shutting_down => {
                read_at_ping = None;
                if Box::pin(reader.burst(writer, stream, message, &mut burst)).await? {
                    return Ok(());
                }
            },
            _ = ping.tick() => {
                if shutting_down {
                    // No heartbeat check once shutting down: nothing is read then, so nothing
                    // could count (a room slower to close than a heartbeat ended the
                    // connection with 4009 instead of its 1001). The room closes us with 1001
                    // once the drain reaches it; if it has not by the second tick (a drain its
                    // caller abandoned at a timeout never reaches the rest of the rooms) we
                    // close with 1001 ourselves, so no connection stays open for good. Nothing
                    // is lost: the client sends again what was not acknowledged.
                    drain_ticks += 1;
                    if drain_ticks >= 2 {
                        return Err(going_away());
                    }
                    continue;
                }
                // The expiry timer runs on the monotonic clock, set from the wall clock at
                // the upgrade: a suspended host (or a step of the wall clock) leaves it behind
                // the credentials' end, by up to the suspend's length. Checked against the
                // wall clock once a heartbeat, such a connection ends by the next one.
                check_expiry(reader.grant)?;
                // What already waits in the socket counts, read now: after a stall of this
                // loop (a slow append or write) it may be there while the tick is due too,
                // and `select!` picks among ready branches at random. (Not `biased`: a
                // client that keeps sending would starve the room's frames.) Cancel-safe: a
                // message is either returned or stays buffered.
                if let Some(message) = futures_util::FutureExt::now_or_never(stream.next()) {
                    read_at_ping = None;
                    if Box::pin(reader.burst(writer, stream, message, &mut burst)).await? {
                        return Ok(());
                    }
                }
                // One liveness rule. The client is alive if anything came from it since the
                // last ping, a message or a byte of one: its pong waits in TCP behind the
                // rest of a message sent as one frame (what kSync's clients and browsers
                // send), and a large publish on a link slower than a heartbeat, cut off, would
                // be sent again, and again. A client that sent nothing at all (stopped, or its
                // link died) is closed at the next tick.
                if let Some(at_ping) = read_at_ping
                    && stream.bytes_read() == at_ping
                {
                    return Err(End::Close(close::HEARTBEAT_TIMEOUT, "nothing from the client since the last ping".into()));
                }
                // A message being received is held by tungstenite until it ends, up to
                // `max_message_size`: one that never ends would be held for the connection's
                // life. One with no byte more of it since the last tick is closed (a client
                // that answers pings between its fragments is alive, its message is not);
                // one that keeps coming, however slowly, is let finish.
                let now = stream.unfinished();
                if let (Some(now), Some(before)) = (now, unfinished)
                    && now.stalled_since(&before)
                {
                    return Err(End::Close(close::HEARTBEAT_TIMEOUT, "a message stalled for a heartbeat".into()));
                }
                unfinished = now;
                // Boxed: a send's future inline would be the largest state of the loop's
                // future, which every idle connection's task carries; a ping is one a heartbeat.
                Box::pin(writer.send(Message::Ping(bytes::Bytes::new()))).await?;
                read_at_ping = Some(stream.bytes_read());
            },
            changed = &mut shutdown_changed, if !shutting_down => {
                // Stop reading; keep writing until the room closes our queue.
                let _ = changed;
                shutting_down = true;
            },
        }
    }
}

/// Subscribes to the room. A room that closed (idle) before it took this connection in
/// refuses it: the connection joins the room opened anew from its log (the relay opens it only
/// after the old one made its last commit, so nothing is missed).
async fn join(
    shared: &Arc<Shared>,
    writer: &Writer,
    room: &Name,
    room_link: &mut RoomLink,
    id: u64,
    state: bool,
) -> Result<Subscribed, End> {
    // Each attempt finds the room closed only when every other connection left it meanwhile:
    // a few suffice.
    const ATTEMPTS: usize = 8;
    for _ in 0..ATTEMPTS {
        let answer = room_link
            .subscribe(id, state, Arc::clone(&writer.outbox))
            .await
            .ok();
        match answer {
            Some(Ok(subscribed)) => return Ok(subscribed),
            Some(Err(e)) => {
                tracing::error!(error = %e, "joining room failed");
                return Err(End::Close(close::INTERNAL, "storage failed".into()));
            }
            None if *shared.shutdown.borrow() => return Err(going_away()),
            None => {
                *room_link = match shared.room(room).await {
                    Ok(link) => link,
                    Err(RelayError::ShuttingDown) => return Err(going_away()),
                    Err(e) => {
                        tracing::error!(error = %e, "reopening room failed");
                        return Err(End::Close(close::INTERNAL, "storage failed".into()));
                    }
                };
            }
        }
    }
    Err(going_away())
}

/// Publishes read in one go (see [`Reader::burst`]), committed together. Bounded: a burst
/// ends (is committed) once it holds `RelayConfig::max_batch_events` events or publishes, or
/// `RelayConfig::max_message_size` bytes of JSON; the rest stays unread until then.
#[derive(Default)]
struct Burst {
    publishes: Vec<PublishCommand>,
    /// Events gathered, counting an empty publish as one.
    events: usize,
    /// Bytes of the gathered messages.
    bytes: usize,
}

impl Burst {
    fn full(&self, config: &super::RelayConfig) -> bool {
        self.events >= config.max_batch_events || self.bytes >= config.max_message_size
    }
}

/// What reading a connection's messages needs.
struct Reader<'a> {
    shared: &'a Shared,
    room: &'a Name,
    grant: &'a Grant,
    room_link: &'a RoomLink,
    id: u64,
}

impl Reader<'_> {
    /// Handles `first` and every further message already readable without waiting: plain
    /// publishes are gathered and committed together (one append, one frame to the others, as
    /// the room's queue would group them), anything else is handled in turn after the
    /// publishes before it are committed, so answers keep the order of the messages. `true`
    /// when the client closed.
    async fn burst(
        &self,
        writer: &mut Writer,
        stream: &mut Stream,
        first: Option<Result<Message, WsError>>,
        burst: &mut Burst,
    ) -> Result<bool, End> {
        let mut next = first;
        let result = loop {
            let message = match next {
                None => break Err(End::Drop),
                Some(Err(e)) => break Err(read_error(&e)),
                Some(Ok(m)) => m,
            };
            match self.message(writer, message, burst).await {
                Ok(false) => {}
                other => break other,
            }
            if burst.full(&self.shared.config) {
                break Ok(false);
            }
            // Cancel-safe: a message is either returned or stays in the stream's buffer.
            match futures_util::FutureExt::now_or_never(stream.next()) {
                Some(message) => next = message,
                None => break Ok(false),
            }
        };
        // Publishes read before an error or a close are committed and acknowledged first.
        self.commit(burst).await?;
        result
    }

    /// One message: a plain publish joins `burst`; anything else is handled after the
    /// publishes gathered so far are committed. `true` for a close.
    async fn message(
        &self,
        writer: &mut Writer,
        message: Message,
        burst: &mut Burst,
    ) -> Result<bool, End> {
        let inflated;
        // The JSON, and the same as `str` when it is valid UTF-8: tungstenite checked text
        // frames already, an inflated frame is checked here, once.
        let (text, utf8): (&[u8], Option<&str>) = match &message {
            Message::Text(t) => (t.as_bytes(), Some(t.as_str())),
            Message::Binary(b) => {
                if !writer.compression {
                    self.commit(burst).await?;
                    let why = "binary frame without negotiated compression";
                    return Err(bad_binary(writer, why).await);
                }
                match protocol::inflate(b, self.shared.config.max_message_size) {
                    Ok(json) => {
                        inflated = json;
                        (&inflated, std::str::from_utf8(&inflated).ok())
                    }
                    Err(e) => {
                        self.commit(burst).await?;
                        return Err(bad_binary(writer, &e.to_string()).await);
                    }
                }
            }
            // (`Frame` is never read: tungstenite reassembles fragments.)
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => return Ok(false),
            Message::Close(_) => return Ok(true),
        };
        let limits = EventLimits::default();
        let max_results = self.shared.config.max_message_size;
        if let Some(Read { reference, items }) =
            utf8.and_then(|json| publish::read(json, &limits, max_results))
        {
            if !self
                .grant
                .allows(ResourceKind::Room, self.room.as_str(), Access::Write)
            {
                self.commit(burst).await?;
                refuse_write(writer, reference).await?;
                return Ok(false);
            }
            let items = match items {
                Ok(items) => items,
                Err(why) => {
                    self.commit(burst).await?;
                    refuse_publish(writer, reference, why).await?;
                    return Ok(false);
                }
            };
            burst.events += items.len().max(1);
            burst.bytes += text.len();
            burst
                .publishes
                .push(PublishCommand::new(self.id, reference, items, text.len()));
            return Ok(false);
        }
        self.commit(burst).await?;
        let (room, grant, link, id) = (self.room, self.grant, self.room_link, self.id);
        Box::pin(handle(writer, text, room, grant, link, id, max_results)).await?;
        Ok(false)
    }

    /// Commits the gathered publishes (if any).
    async fn commit(&self, burst: &mut Burst) -> Result<(), End> {
        if burst.publishes.is_empty() {
            return Ok(());
        }
        burst.events = 0;
        burst.bytes = 0;
        self.room_link
            .publish(&mut burst.publishes)
            .await
            .map_err(|_| going_away())
    }
}

/// A timer for when `grant`'s credentials expire (none for credentials without an expiry).
fn expiry_timer(grant: &Grant) -> Option<Pin<Box<tokio::time::Sleep>>> {
    grant.expires_at.map(|at| {
        let left = at
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        Box::pin(tokio::time::sleep(left))
    })
}

/// Resolves when `timer` fires (never without one).
async fn expired(timer: &mut Option<Pin<Box<tokio::time::Sleep>>>) {
    match timer {
        Some(timer) => timer.await,
        None => std::future::pending().await,
    }
}

/// Whether `grant`'s credentials have expired by now (for the steps that wait on a write
/// rather than on the timer: the catch-up).
fn check_expiry(grant: &Grant) -> Result<(), End> {
    if grant.expired_at(std::time::SystemTime::now()) {
        return Err(credentials_expired());
    }
    Ok(())
}

fn credentials_expired() -> End {
    tracing::info!("credentials expired; closing the connection");
    End::Close(close::CREDENTIALS_EXPIRED, "credentials expired".into())
}

fn going_away() -> End {
    End::Close(close::GOING_AWAY, "server shutting down".into())
}

async fn bad_binary(writer: &mut Writer, why: &str) -> End {
    let _ = writer
        .message(&ServerMessage::error(code::BAD_BINARY, why, None), false)
        .await;
    End::Close(close::UNSUPPORTED_DATA, why.into())
}

fn read_error(error: &WsError) -> End {
    // tungstenite reports an oversized message as a capacity error; the socket cannot be read
    // any further, but a close frame can still tell the client why.
    let text = error.to_string();
    if text.contains("Space limit exceeded") || text.contains("too long") {
        End::Close(close::TOO_BIG, "message too big".into())
    } else if text.contains("WebSocket protocol error") {
        // RFC 6455 7.1.7: fail the connection, with a close frame saying why when possible.
        End::Close(close::WEBSOCKET_PROTOCOL, "websocket protocol error".into())
    } else if text.contains("UTF-8") {
        End::Close(close::INVALID_DATA, "invalid UTF-8".into())
    } else {
        tracing::debug!(error = %text, "websocket read failed");
        End::Drop
    }
}

async fn read_hello(writer: &mut Writer, stream: &mut Stream) -> Result<Hello, End> {
    loop {
        let message = match stream.next().await {
            None => return Err(End::Drop),
            Some(Err(e)) => return Err(read_error(&e)),
            Some(Ok(m)) => m,
        };
        let text = match message {
            Message::Text(t) => t,
            Message::Binary(_) => {
                return Err(bad_binary(writer, "the first message must be a text hello").await);
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            // Answered with the echo of the client's close frame (see `Writer::close`).
            Message::Close(_) => return Err(End::Close(close::NORMAL, String::new())),
        };
        // The version first: the rest of a `hello` of another version need not decode as ours.
        if let Some(theirs) = protocol::hello_protocol(text.as_bytes())
            && theirs != u64::from(PROTOCOL_VERSION)
        {
            let message = format!(
                "protocol {theirs} is not supported; this server speaks {PROTOCOL_VERSION}"
            );
            writer
                .message(
                    &ServerMessage::error(code::UNSUPPORTED_PROTOCOL, &message, None),
                    false,
                )
                .await?;
            return Err(End::Close(close::UNSUPPORTED_PROTOCOL, message));
        }
        let why = match protocol::decode::<ClientMessage>(text.as_bytes(), CLIENT_TYPES) {
            Ok(ClientMessage::Hello(hello)) => return Ok(hello),
            Ok(ClientMessage::Publish(_) | ClientMessage::Ping(_)) => {
                "the first message must be hello".to_owned()
            }
            Err(e) => format!("the first message must be hello: {e}"),
        };
        writer
            .message(&ServerMessage::error(code::PROTOCOL, &why, None), false)
            .await?;
        return Err(End::Close(close::PROTOCOL_ERROR, why));
    }
}

async fn catch_up(
    shared: &Shared,
    writer: &mut Writer,
    room_link: &RoomLink,
    grant: &Grant,
    hello: &Hello,
    server_version: u64,
    snapshot: Option<super::room::Snapshot>,
) -> Result<(), End> {
    let page = shared.config.page_size;
    if let Some(state) = snapshot {
        // Pages are cut by their events' JSON, measured one event at a time, and only a page's
        // events are read out of the log: a page of `page_size` events copied and encoded
        // whole (then halved until it fit) held up to 512 events of up to 1 MiB each per
        // joiner, for as long as its socket was full.
        let limit = shared.config.max_message_size;
        let mut start = 0;
        while start < state.len() {
            catch_up_goes_on(shared, writer, grant)?;
            let mut bytes = SNAPSHOT_FRAME_OVERHEAD;
            let mut events = Vec::new();
            let end = state
                .visit(&**room_link.storage(), start, page, &mut |event| {
                    let entry = json_len(event) + 1;
                    if !events.is_empty() && bytes + entry > limit {
                        return false;
                    }
                    bytes += entry;
                    events.push(event.clone());
                    true
                })
                .map_err(|e| {
                    tracing::error!(error = %e, "reading room log for a snapshot failed");
                    End::Close(close::INTERNAL, "storage failed".into())
                })?;
            let page = ServerMessage::Snapshot(SnapshotPage {
                server_version,
                events,
                last: false,
            });
            // Only the encoded page waits for the socket, not its events' copy too.
            let frame = Frame::encode(&page, true);
            drop(page);
            let message = writer.frame_message(&frame);
            drop(frame);
            writer.send(message).await?;
            start = end;
        }
        // An explicit end marker keeps the paging rule simple for clients.
        let end = ServerMessage::Snapshot(SnapshotPage {
            server_version,
            events: Vec::new(),
            last: true,
        });
        return writer.message(&end, true).await;
    }
    let Some(since) = hello.since else {
        return Ok(());
    };
    if since > server_version {
        let message = format!(
            "cursor {since} is beyond this room's last sequence number {server_version}; continuing from {server_version}"
        );
        return writer
            .message(
                &ServerMessage::error(code::CURSOR_AHEAD, message, None),
                false,
            )
            .await;
    }
    let storage = room_link.storage();
    let limit = shared.config.max_message_size;
    let storage_failed = |e: &dyn std::fmt::Display| {
        tracing::error!(error = %e, "reading room log for catch-up failed");
        End::Close(close::INTERNAL, "storage failed".into())
    };
    // Each frame is encoded straight from the log, event by event, up to `limit` bytes (an
    // event larger than that goes alone): a page is never held decoded (512 events of up to
    // 1 MiB of JSON each, many times that as values). Events read per visit are sized by
    // those seen so far, so that large events are not decoded by the page only to be dropped.
    let mut want = page.min(CATCH_UP_FIRST_READ);
    let mut entries: Vec<(u64, Box<str>)> = Vec::new();
    let mut after = since;
    while after < server_version {
        catch_up_goes_on(shared, writer, grant)?;
        let left = usize::try_from(server_version - after).unwrap_or(usize::MAX);
        let (mut bytes, mut seen, mut seen_bytes) = (EVENTS_FRAME_OVERHEAD, 0usize, 0usize);
        let mut full = false;
        let mut unencodable = None;
        storage
            .visit_since(after, want.min(left), &mut |seq, event| {
                if full {
                    return;
                }
                let json = match serde_json::to_string(event) {
                    Ok(json) => json,
                    Err(e) => {
                        unencodable = Some(e);
                        full = true;
                        return;
                    }
                };
                seen += 1;
                seen_bytes += json.len();
                let entry = json.len() + EVENTS_ENTRY_OVERHEAD;
                if !entries.is_empty() && bytes + entry > limit {
                    full = true;
                    return;
                }
                bytes += entry;
                entries.push((seq, json.into_boxed_str()));
            })
            .map_err(|e| storage_failed(&e))?;
        if let Some(e) = unencodable {
            return Err(storage_failed(&e));
        }
        let Some(&(last, _)) = entries.last() else {
            break;
        };
        after = last;
        let frame = Frame::events(&entries);
        entries.clear();
        let message = writer.frame_message(&frame);
        writer.send(message).await?;
        let average = seen_bytes / seen.max(1) + EVENTS_ENTRY_OVERHEAD;
        want = (limit / average).clamp(1, page);
    }
    Ok(())
}

/// Events read by a catch-up's first visit of the log, before their size is known.
const CATCH_UP_FIRST_READ: usize = 64;

/// Whether a catch-up should send its next page: not once the relay shuts down (1001), the
/// room dropped this connection (e.g. 4008, its queue overflowed meanwhile) or the
/// credentials expired (4401, as documented: at that moment, not once a long history is
/// sent); the rest of a long history would hold the shutdown up, be sent for nothing, or be
/// sent to someone no longer allowed to read it. The client resumes from its cursor.
fn catch_up_goes_on(shared: &Shared, writer: &Writer, grant: &Grant) -> Result<(), End> {
    if *shared.shutdown.borrow() {
        return Err(going_away());
    }
    check_expiry(grant)?;
    match writer.outbox.close_reason() {
        Some((code, reason)) => Err(End::Close(code, reason.into())),
        None => Ok(()),
    }
}

/// A `snapshot` page's JSON besides its events and the commas between them: `{"type":
/// "snapshot","serverVersion":` with 20 digits, `,"events":[`, `],"last":false}`.
const SNAPSHOT_FRAME_OVERHEAD: usize = 96;

/// The length of `event`'s JSON, without building it.
fn json_len(event: &Event) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing into a counter cannot fail; an event that does not encode is not measured.
    let _ = serde_json::to_writer(&mut count, event);
    count.0
}

/// Handles one message that [`publish::read`] does not read as a publish: decoded in full, so
/// that anything but a publish gets its precise answer, and a publish only the full decoder
/// reads is still stored.
async fn handle(
    writer: &mut Writer,
    text: &[u8],
    room: &Name,
    grant: &Grant,
    room_link: &RoomLink,
    id: u64,
    max_results: usize,
) -> Result<(), End> {
    let Some(publish) = Box::pin(decode_other(writer, text)).await? else {
        return Ok(());
    };
    if !grant.allows(ResourceKind::Room, room.as_str(), Access::Write) {
        return refuse_write(writer, publish.reference).await;
    }
    let limits = EventLimits::default();
    let items = publish
        .events
        .into_iter()
        .map(|value| incoming(&value.to_string(), &limits))
        .collect();
    let items = match checked_publish(publish.reference, items, max_results).items {
        Ok(items) => items,
        Err(why) => return refuse_publish(writer, publish.reference, why).await,
    };
    let mut publishes = vec![PublishCommand::new(
        id,
        publish.reference,
        items,
        text.len(),
    )];
    room_link
        .publish(&mut publishes)
        .await
        .map_err(|_| going_away())
}

/// Tells a client that its publish was refused whole (see `publish::AckBudget`); the
/// connection stays open.
async fn refuse_publish(writer: &mut Writer, reference: u64, why: String) -> Result<(), End> {
    tracing::info!("publish refused: its ack would be too large");
    writer
        .message(
            &ServerMessage::error(code::BAD_MESSAGE, why, Some(reference)),
            false,
        )
        .await
}

/// Tells a client without the write right that nothing was stored (the connection stays open).
async fn refuse_write(writer: &mut Writer, reference: u64) -> Result<(), End> {
    tracing::info!("publish refused: no write right");
    writer
        .message(
            &ServerMessage::error(
                code::FORBIDDEN,
                "not allowed to write to this room; nothing was stored",
                Some(reference),
            ),
            false,
        )
        .await
}

/// Decodes a message that is not a plain publish: a publish the fast path could not read, or
/// anything else (answered with an error; `Ok(None)`).
async fn decode_other(writer: &mut Writer, text: &[u8]) -> Result<Option<Publish>, End> {
    let answer = match protocol::decode::<ClientMessage>(text, CLIENT_TYPES) {
        Ok(ClientMessage::Publish(p)) => return Ok(Some(p)),
        Ok(ClientMessage::Hello(_)) => {
            ServerMessage::error(code::PROTOCOL, "hello was already received", None)
        }
        Ok(ClientMessage::Ping(ping)) => ServerMessage::Pong(ping),
        Err(DecodeError::UnknownType(kind)) => ServerMessage::error(
            code::UNKNOWN_TYPE,
            format!(
                "unknown message type {kind:?} (known: {})",
                CLIENT_TYPES.join(", ")
            ),
            None,
        ),
        Err(e) => ServerMessage::error(code::BAD_MESSAGE, e.to_string(), None),
    };
    writer.message(&answer, false).await?;
    Ok(None)
}
