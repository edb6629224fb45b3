//! A subscriber's outgoing side, shared by its connection task and its room.
//!
//! The room writes each frame straight into the subscriber's socket when nothing else is
//! waiting to go out (the common case): a non-blocking write from the task committing (the
//! publisher's connection task, or the room's task for queued publishes), so one published
//! event costs no task wake-up per subscriber. Only when that write cannot finish at
//! once (the socket's send buffer is full, the connection task is using the socket, or it has
//! not finished its catch-up yet) does the frame wait in the bounded queue here, and the
//! connection task is woken to write it. Order is kept: the room writes directly only while
//! the queue is empty and nothing is left unflushed.

use std::collections::VecDeque;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::Sink as _;
use futures_util::stream::SplitSink;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

use super::room::Frame;
use super::socket::{Fragmented, Socket};

/// The write half of a connection's WebSocket.
/// A write half that sends large messages as several frames (see `socket`). Boxed: it is
/// moved in and out of the outbox around every write of the connection task.
pub(crate) type Sink = Box<Fragmented<SplitSink<Socket, Message>>>;

/// The message for `frame` on a connection (deflated event batches of at least
/// `DEFLATE_MIN_BYTES` when it compresses).
pub(crate) fn frame_message(frame: &Frame, compression: bool) -> Message {
    if compression && frame.batch && frame.text.len() >= crate::protocol::DEFLATE_MIN_BYTES {
        Message::Binary(frame.deflated())
    } else {
        super::socket::text(frame.text.clone().into())
    }
}

/// Wakes the connection task. A separate allocation from [`Outbox`]: the socket keeps the
/// waker of its last pending write, and the socket lives in the outbox, so waking through the
/// outbox itself would make a reference cycle.
struct ConnWaker(Notify);

impl Wake for ConnWaker {
    fn wake(self: Arc<Self>) {
        self.0.notify_one();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.notify_one();
    }
}

/// The relay-wide budget of bytes of frames waiting for subscribers: queued in outboxes, or
/// taken from one by its connection task and not yet written (`RelayConfig::
/// subscriber_queues_total_bytes`). Each frame counts once however many subscribers hold it
/// (the room shares one `Arc<Frame>` among them), so a big room's fan-out costs what it
/// really holds. Without it each subscriber's bound (`subscriber_queue_bytes`) still let
/// the queues of slow subscribers in many rooms add up to that times the open rooms (64 MiB
/// × 4,096 at the defaults). Overflow policy: a delivery that would pass it is refused like
/// a full queue (the subscriber is closed with 4008 and resumes from its cursor), and the
/// refused subscriber's queue is dropped at once, so its memory comes back before its socket
/// drains; only while nothing is held does one delivery go in whatever its size.
pub(crate) struct QueueBudget {
    limit: usize,
    /// Bytes held: each held frame's cost once (while its `Frame::holds` is above 0) plus
    /// each hold's. Frames' `holds` change only under this lock.
    used: Mutex<usize>,
}

impl QueueBudget {
    pub(crate) fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: Mutex::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, usize> {
        self.used.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a hold on each of `frames`, or none (`None`) when the frames not held yet would
    /// pass the limit.
    fn charge(self: &Arc<Self>, frames: &[Arc<Frame>]) -> Option<Vec<Charged>> {
        let mut used = self.lock();
        let added: usize = frames
            .iter()
            .filter(|frame| frame.holds.load(Ordering::Relaxed) == 0)
            .map(|frame| frame_cost(frame))
            .sum::<usize>()
            + frames.len() * HOLD_COST;
        if *used > 0 && used.saturating_add(added) > self.limit {
            return None;
        }
        *used = used.saturating_add(added);
        for frame in frames {
            frame.holds.fetch_add(1, Ordering::Relaxed);
        }
        drop(used);
        Some(
            frames
                .iter()
                .map(|frame| Charged {
                    frame: Arc::clone(frame),
                    budget: Arc::clone(self),
                })
                .collect(),
        )
    }

    fn release(&self, frame: &Frame) {
        let mut used = self.lock();
        let mut freed = HOLD_COST;
        if frame.holds.fetch_sub(1, Ordering::Relaxed) == 1 {
            freed += frame_cost(frame);
        }
        *used = used.saturating_sub(freed);
    }
}

/// What a frame held by anyone costs besides its JSON: the `Frame` and its `Arc` (a budget of
/// tiny frames, acks of one event, would otherwise hold millions of them for free).
const FRAME_COST: usize = 128;

/// What each hold costs: its place in a queue (a [`Charged`]).
const HOLD_COST: usize = std::mem::size_of::<Charged>();

fn frame_cost(frame: &Frame) -> usize {
    frame.text.len() + FRAME_COST
}

/// A frame held for a subscriber, counted in the [`QueueBudget`] until dropped (written, or
/// the queue dropped).
pub(crate) struct Charged {
    frame: Arc<Frame>,
    budget: Arc<QueueBudget>,
}

impl Deref for Charged {
    type Target = Frame;

    fn deref(&self) -> &Frame {
        &self.frame
    }
}

impl Drop for Charged {
    fn drop(&mut self) {
        self.budget.release(&self.frame);
    }
}

/// Why the room could not hand a frame over.
pub(crate) enum Refused {
    /// The queue holds `capacity` frames or `capacity_bytes` bytes: the slow-consumer policy
    /// applies.
    Full,
    /// The connection ended.
    Gone,
}

/// See the module docs.
pub(crate) struct Outbox {
    state: Mutex<State>,
    conn: Arc<ConnWaker>,
    /// Wakes the connection task (through `conn`); given to the socket by the room's writes, so
    /// a write left pending wakes the connection task to finish it.
    waker: Waker,
    /// Most frames queued. Overflow policy: [`Outbox::deliver`] refuses with
    /// [`Refused::Full`] and the room drops the subscriber (close 4008, resume from the
    /// cursor); see `RelayConfig::subscriber_queue`.
    capacity: usize,
    /// Most bytes queued (frames' JSON). Same overflow policy, except that an empty queue takes
    /// whatever one delivery brings; see `RelayConfig::subscriber_queue_bytes`.
    capacity_bytes: usize,
    /// The relay-wide bound on queued frames (see [`QueueBudget`]).
    budget: Arc<QueueBudget>,
}

struct State {
    /// The socket's write half while nobody is writing through it. The connection task takes
    /// it for its own writes (the room then queues); the room writes through it in place and
    /// never awaits. `None` for good once a write failed or the connection ended.
    sink: Option<Sink>,
    /// The connection finished its catch-up: the room may write directly, and queued frames
    /// are written after the connection task's own messages.
    live: bool,
    /// The connection asked for deflated event batches.
    compression: bool,
    /// Frames waiting for the connection task, oldest first; at most `capacity`.
    queue: VecDeque<Charged>,
    /// Bytes of the frames in `queue`.
    queued_bytes: usize,
    /// A direct write left bytes in the sink's buffer: the connection task must flush them
    /// before anything else is written directly.
    unflushed: bool,
    /// Why the room stopped sending (the first reason is kept).
    closed: Option<(u16, &'static str)>,
    /// The connection task ended: nothing more is delivered.
    gone: bool,
}

/// What a direct write achieved.
enum Direct {
    /// Every frame written and flushed.
    Done,
    /// The first `n` frames are in the sink, not all flushed; the rest must be queued.
    Partial(usize),
    /// The socket failed.
    Failed,
}

impl Outbox {
    /// An outbox owning `sink`, queueing at most `capacity` frames and `capacity_bytes`
    /// bytes, and only while `budget` allows.
    pub(crate) fn new(
        sink: Sink,
        capacity: usize,
        capacity_bytes: usize,
        budget: Arc<QueueBudget>,
    ) -> Arc<Self> {
        let conn = Arc::new(ConnWaker(Notify::new()));
        Arc::new(Self {
            state: Mutex::new(State {
                sink: Some(sink),
                live: false,
                compression: false,
                queue: VecDeque::new(),
                queued_bytes: 0,
                unflushed: false,
                closed: None,
                gone: false,
            }),
            waker: Waker::from(Arc::clone(&conn)),
            conn,
            capacity,
            capacity_bytes,
            budget,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wake_conn(&self) {
        self.conn.0.notify_one();
    }

    // ----- the room's side -----

    /// Hands `frames` (in order) to the connection: written into its socket now when nothing
    /// is waiting before them, queued otherwise. Never waits.
    pub(crate) fn deliver(&self, frames: &[Arc<Frame>]) -> Result<(), Refused> {
        let mut state = self.lock();
        let state = &mut *state;
        if state.gone {
            return Err(Refused::Gone);
        }
        let mut rest = frames;
        if state.live
            && state.queue.is_empty()
            && !state.unflushed
            && let Some(sink) = state.sink.as_mut()
        {
            let mut cx = Context::from_waker(&self.waker);
            match write_now(sink, frames, state.compression, &mut cx) {
                Direct::Done => return Ok(()),
                Direct::Partial(written) => {
                    state.unflushed = true;
                    rest = &frames[written..];
                    self.wake_conn();
                }
                Direct::Failed => {
                    // The connection task finds the sink gone and ends the connection.
                    state.sink = None;
                    self.wake_conn();
                    return Ok(());
                }
            }
        }
        if rest.is_empty() {
            return Ok(());
        }
        let bytes: usize = rest.iter().map(|frame| frame.text.len()).sum();
        if state.queue.len() + rest.len() > self.capacity
            || (!state.queue.is_empty()
                && state.queued_bytes.saturating_add(bytes) > self.capacity_bytes)
        {
            return Err(Refused::Full);
        }
        let Some(charged) = self.budget.charge(rest) else {
            // Over the relay-wide budget: this subscriber is closed (4008) and what it holds
            // is given back now, not once its socket drains (up to the write timeout). What
            // it was already sent is a prefix, so it resumes from its cursor without a gap.
            state.queue.clear();
            state.queued_bytes = 0;
            return Err(Refused::Full);
        };
        if state.queue.is_empty() {
            self.wake_conn();
        }
        state.queue.extend(charged);
        state.queued_bytes += bytes;
        Ok(())
    }

    /// Tells the connection why nothing more will come (the first reason is kept); it closes
    /// with it once it has written what was queued.
    pub(crate) fn close(&self, code: u16, reason: &'static str) {
        let mut state = self.lock();
        state.closed.get_or_insert((code, reason));
        drop(state);
        self.wake_conn();
    }

    // ----- the connection task's side -----

    /// Resolves when the room queued frames, left a write unflushed, or closed.
    pub(crate) async fn notified(&self) {
        self.conn.0.notified().await;
    }

    /// Sets whether event batches go out deflated (before the connection goes live).
    pub(crate) fn set_compression(&self, compression: bool) {
        self.lock().compression = compression;
    }

    /// Takes the sink for the connection task's own writes (`None`: a write failed).
    pub(crate) fn take_sink(&self) -> Option<Sink> {
        self.lock().sink.take()
    }

    /// Gives the sink back after the connection task's writes, unless (live) frames were
    /// queued meanwhile or a direct write is unflushed: then the sink comes back with those
    /// frames (possibly none, just to flush), to write and flush before trying again.
    pub(crate) fn put_back(&self, sink: Sink) -> Result<(), (Sink, VecDeque<Charged>)> {
        let mut state = self.lock();
        if state.live && (state.unflushed || !state.queue.is_empty()) {
            state.unflushed = false;
            state.queued_bytes = 0;
            return Err((sink, std::mem::take(&mut state.queue)));
        }
        state.sink = Some(sink);
        Ok(())
    }

    /// The catch-up is done: from now on the room writes directly. The caller writes what was
    /// queued meanwhile (take the sink, then [`put_back`](Self::put_back)).
    pub(crate) fn go_live(&self) {
        self.lock().live = true;
        self.wake_conn();
    }

    /// Why the room stopped sending, once everything it handed over is written (until then
    /// `None`: the connection task is woken again for the rest).
    pub(crate) fn closed(&self) -> Option<(u16, &'static str)> {
        let state = self.lock();
        if state.queue.is_empty() && !state.unflushed {
            state.closed
        } else {
            None
        }
    }

    /// Why the room stopped sending, as soon as it did (frames may still be queued): a
    /// catch-up stops there, the client resumes from its cursor.
    pub(crate) fn close_reason(&self) -> Option<(u16, &'static str)> {
        self.lock().closed
    }

    /// The connection ended: drop the socket's write half now (the room may hold the outbox a
    /// little longer) and refuse further frames.
    pub(crate) fn leave(&self) {
        let mut state = self.lock();
        state.gone = true;
        state.queue.clear();
        state.queued_bytes = 0;
        let sink = state.sink.take();
        drop(state);
        drop(sink);
    }
}

/// Writes `frames` into `sink` and flushes, without waiting.
fn write_now(
    sink: &mut Sink,
    frames: &[Arc<Frame>],
    compression: bool,
    cx: &mut Context<'_>,
) -> Direct {
    let mut sink = Pin::new(&mut **sink);
    for (written, frame) in frames.iter().enumerate() {
        match sink.as_mut().poll_ready(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(_)) => return Direct::Failed,
            Poll::Pending => return Direct::Partial(written),
        }
        if sink
            .as_mut()
            .start_send(frame_message(frame, compression))
            .is_err()
        {
            return Direct::Failed;
        }
    }
    match sink.as_mut().poll_flush(cx) {
        Poll::Ready(Ok(())) => Direct::Done,
        Poll::Ready(Err(_)) => Direct::Failed,
        Poll::Pending => Direct::Partial(frames.len()),
    }
}
