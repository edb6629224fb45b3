//! One task per room: the only writer of the room's log. It batches queued publishes into one
//! storage append (group commit), acknowledges after the append returns (durable first when
//! the storage is durable), and fans each new batch out as one shared, encoded-once frame.

use std::sync::{Arc, OnceLock};

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use ksync_core::{AppendOutcome, Event, MergeOutcome, Name, Storage, Stored};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::RelayActivity;

use crate::protocol::{self, Ack, EventsBatch, PublishResult, ServerMessage, close};

/// One outgoing frame, encoded once and shared by every subscriber that receives it.
#[derive(Debug)]
pub(crate) struct Frame {
    /// The JSON text.
    pub(crate) text: Utf8Bytes,
    /// Whether the frame carries an event batch (sent deflated to compressing subscribers).
    pub(crate) batch: bool,
    /// The deflated JSON, made by the first compressing subscriber that needs it.
    deflated: OnceLock<Bytes>,
}

impl Frame {
    pub(crate) fn encode(message: &ServerMessage, batch: bool) -> Arc<Frame> {
        // Serialising our own message types cannot fail (string keys, no non-finite floats
        // that serde_json refuses are produced by us).
        let text = serde_json::to_string(message).unwrap_or_else(|e| {
            tracing::error!(error = %e, "encoding a server message failed");
            String::from(r#"{"type":"error","code":"internal","message":"encoding failed"}"#)
        });
        Arc::new(Frame {
            text: text.into(),
            batch,
            deflated: OnceLock::new(),
        })
    }

    pub(crate) fn deflated(&self) -> Bytes {
        self.deflated
            .get_or_init(|| Bytes::from(protocol::deflate(self.text.as_bytes())))
            .clone()
    }
}

/// Why the room stopped sending to a subscriber; read by its connection task when the queue
/// closes.
pub(crate) type CloseSlot = Arc<OnceLock<(u16, &'static str)>>;

pub(crate) struct Subscriber {
    conn: u64,
    queue: mpsc::Sender<Arc<Frame>>,
    closed: CloseSlot,
}

/// What a connection learns when it joins.
pub(crate) struct Subscribed {
    /// The last sequence number at the moment of joining: catch-up covers up to it, the live
    /// stream starts after it.
    pub(crate) server_version: u64,
    /// The latest version of every id as of `server_version`, when asked for.
    pub(crate) snapshot: Option<Vec<Event>>,
}

pub(crate) enum RoomCommand {
    Subscribe {
        conn: u64,
        state: bool,
        queue: mpsc::Sender<Arc<Frame>>,
        closed: CloseSlot,
        reply: oneshot::Sender<Result<Subscribed, String>>,
    },
    Unsubscribe {
        conn: u64,
    },
    Publish(PublishCommand),
    Shutdown {
        done: oneshot::Sender<()>,
    },
}

pub(crate) struct PublishCommand {
    pub(crate) conn: u64,
    pub(crate) reference: u64,
    /// Each published event, or why it is invalid.
    pub(crate) items: Vec<Result<Event, String>>,
}

pub(crate) struct Room {
    pub(crate) name: String,
    room: Name,
    /// Observers' feed (see `super::ACTIVITY_CAPACITY`).
    activity: broadcast::Sender<RelayActivity>,
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) rx: mpsc::Receiver<RoomCommand>,
    pub(crate) max_batch_events: usize,
    subs: Vec<Subscriber>,
    last_seq: u64,
}

impl Room {
    pub(crate) fn new(
        room: Name,
        storage: Arc<dyn Storage>,
        rx: mpsc::Receiver<RoomCommand>,
        max_batch_events: usize,
        activity: broadcast::Sender<RelayActivity>,
    ) -> Self {
        let last_seq = storage.len();
        Self {
            name: room.to_string(),
            room,
            activity,
            storage,
            rx,
            max_batch_events,
            subs: Vec::new(),
            last_seq,
        }
    }

    pub(crate) async fn run(mut self) {
        let mut deferred: Option<RoomCommand> = None;
        loop {
            let command = match deferred.take() {
                Some(c) => c,
                None => match self.rx.recv().await {
                    Some(c) => c,
                    None => break,
                },
            };
            match command {
                RoomCommand::Publish(first) => {
                    // Group commit: take every publish already queued (up to the limit) into
                    // one append. A non-publish command ends the batch and runs after it, so a
                    // subscriber joining now sees this batch in its catch-up, not twice.
                    let mut count = first.items.len();
                    let mut batch = vec![first];
                    while count < self.max_batch_events {
                        match self.rx.try_recv() {
                            Ok(RoomCommand::Publish(p)) => {
                                count += p.items.len();
                                batch.push(p);
                            }
                            Ok(other) => {
                                deferred = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.commit(batch).await;
                }
                RoomCommand::Subscribe {
                    conn,
                    state,
                    queue,
                    closed,
                    reply,
                } => {
                    let snapshot = if state {
                        match self.storage.state() {
                            Ok(map) => Some(map.into_values().collect()),
                            Err(e) => {
                                let _ = reply.send(Err(e.to_string()));
                                continue;
                            }
                        }
                    } else {
                        None
                    };
                    self.subs.push(Subscriber {
                        conn,
                        queue,
                        closed,
                    });
                    let _ = reply.send(Ok(Subscribed {
                        server_version: self.last_seq,
                        snapshot,
                    }));
                }
                RoomCommand::Unsubscribe { conn } => {
                    self.subs.retain(|s| s.conn != conn);
                }
                RoomCommand::Shutdown { done } => {
                    // Everything queued before the shutdown was committed above; make it
                    // durable, then let the connections flush and close.
                    if let Err(e) = self.storage.flush().await {
                        tracing::error!(room = %self.name, error = %e, "flushing the room log failed");
                    }
                    for sub in self.subs.drain(..) {
                        let _ = sub.closed.set((close::GOING_AWAY, "server shutting down"));
                    }
                    let _ = done.send(());
                    break;
                }
            }
        }
    }

    async fn commit(&mut self, batch: Vec<PublishCommand>) {
        let mut events = Vec::new();
        let mut plans = Vec::with_capacity(batch.len());
        for publish in batch {
            let mut slots = Vec::with_capacity(publish.items.len());
            for item in publish.items {
                match item {
                    Ok(event) => {
                        events.push(event);
                        slots.push(None);
                    }
                    Err(message) => slots.push(Some(message)),
                }
            }
            plans.push((publish.conn, publish.reference, slots));
        }
        let outcome = if events.is_empty() {
            Ok(MergeOutcome::default())
        } else {
            self.storage.append(events).await
        };
        let (outcomes, appended) = match outcome {
            Ok(out) => (out.outcomes, out.appended),
            Err(e) => {
                tracing::error!(room = %self.name, error = %e, "appending to the room log failed");
                let message = format!("storage failed: {e}");
                for (conn, reference, slots) in plans {
                    let results = slots
                        .into_iter()
                        .map(|slot| match slot {
                            Some(message) => PublishResult::Invalid { message },
                            None => PublishResult::Failed {
                                message: message.clone(),
                            },
                        })
                        .collect();
                    let ack = Frame::encode(
                        &ServerMessage::Ack(Ack {
                            reference,
                            results,
                            server_version: self.last_seq,
                        }),
                        false,
                    );
                    self.fan_out(conn, &[ack], None);
                }
                return;
            }
        };
        let mut outcomes = outcomes.into_iter();
        let mut appended = appended.into_iter();
        // Consecutive publishes of one connection become one run: one shared events frame for
        // everyone else, and that connection's acks, in order.
        let mut run: Option<(u64, Vec<Arc<Frame>>, Vec<Stored>)> = None;
        for (conn, reference, slots) in plans {
            let mut results = Vec::with_capacity(slots.len());
            let mut new: Vec<Stored> = Vec::new();
            for slot in slots {
                let result = match slot {
                    Some(message) => PublishResult::Invalid { message },
                    None => match outcomes.next() {
                        Some(AppendOutcome::Appended { seq }) => {
                            if let Some(stored) = appended.next() {
                                self.last_seq = stored.seq;
                                new.push(stored);
                            }
                            PublishResult::Stored { seq }
                        }
                        Some(AppendOutcome::Duplicate { seq }) => PublishResult::Duplicate { seq },
                        Some(AppendOutcome::Conflict(conflict)) => PublishResult::Conflict {
                            held: conflict.ours,
                        },
                        None => PublishResult::Failed {
                            message: "storage returned fewer outcomes than events".into(),
                        },
                    },
                };
                results.push(result);
            }
            let ack = Frame::encode(
                &ServerMessage::Ack(Ack {
                    reference,
                    results,
                    server_version: self.last_seq,
                }),
                false,
            );
            match &mut run {
                Some((current, acks, events)) if *current == conn => {
                    acks.push(ack);
                    events.extend(new);
                }
                _ => {
                    if let Some(done) = run.take() {
                        self.flush_run(done);
                    }
                    run = Some((conn, vec![ack], new));
                }
            }
        }
        if let Some(done) = run {
            self.flush_run(done);
        }
    }

    fn flush_run(&mut self, (conn, acks, new): (u64, Vec<Arc<Frame>>, Vec<Stored>)) {
        if !new.is_empty() && self.activity.receiver_count() > 0 {
            // Err: the last observer left meanwhile.
            let _ = self.activity.send(RelayActivity::Stored {
                room: self.room.clone(),
                events: new.clone().into(),
            });
        }
        let events = (!new.is_empty())
            .then(|| Frame::encode(&ServerMessage::Events(EventsBatch { events: new }), true));
        self.fan_out(conn, &acks, events);
    }

    /// The publisher gets its ack, everyone else the new events, at the same position in their
    /// streams, so every connection sees every sequence number in order exactly once.
    fn fan_out(&mut self, publisher: u64, acks: &[Arc<Frame>], events: Option<Arc<Frame>>) {
        let name = &self.name;
        self.subs.retain(|sub| {
            let result = if sub.conn == publisher {
                acks.iter()
                    .try_for_each(|ack| sub.queue.try_send(Arc::clone(ack)))
            } else {
                match &events {
                    Some(e) => sub.queue.try_send(Arc::clone(e)),
                    None => return true,
                }
            };
            match result {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    // Slow-consumer policy: drop the subscriber (never block the room or
                    // buffer without bound); its connection closes with 4008 and the client
                    // resumes from its cursor.
                    tracing::info!(room = %name, conn = sub.conn, "dropping a slow subscriber");
                    let _ = sub
                        .closed
                        .set((close::SLOW_CONSUMER, "too slow: resume from your cursor"));
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }
}
