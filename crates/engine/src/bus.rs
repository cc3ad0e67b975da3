//! The event bus: how run and task-run state changes and task log lines reach live watchers
//! (the server's server-sent events), after they are committed.
//!
//! [`EventBus`] is the port; [`InProcessBus`] is the implementation for one process. A bus
//! numbers what it carries: an [`EventId`] is `(epoch, seq)`, where `seq` increases by one per
//! event and `epoch` names the bus instance, so a watcher can resume after the last event it
//! saw (`Last-Event-ID`) and learns of a gap — a restarted bus, or events that fell out of the
//! replay buffer — instead of silently missing events.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use arches_core::events::DomainEvent;
use arches_core::records::LogStream;
use arches_core::{OrgId, RunId, TaskId, TaskRunId, Timestamp};
use futures::stream::{self, BoxStream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;

/// A task log line as the bus carries it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogEvent {
    /// The run's org.
    pub org_id: OrgId,
    /// The run.
    pub run_id: RunId,
    /// The task run.
    pub task_run_id: TaskRunId,
    /// The task.
    pub task_id: TaskId,
    /// The attempt that wrote it.
    pub attempt: u32,
    /// The stream.
    pub stream: LogStream,
    /// When it was written.
    pub at: Timestamp,
    /// The line, without its line ending.
    pub text: String,
}

/// What travels on the bus.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BusEvent {
    /// A committed state change (`type` is `run_state_changed` or `task_run_state_changed`).
    Domain(DomainEvent),
    /// A task log line (`type` is `log_line`).
    Log(LogLineEvent),
}

/// A [`LogEvent`] tagged `"type": "log_line"` on the wire.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename = "log_line")]
pub struct LogLineEvent {
    /// The line.
    #[serde(flatten)]
    pub line: LogEvent,
}

impl BusEvent {
    /// The org the event belongs to.
    pub fn org_id(&self) -> OrgId {
        match self {
            BusEvent::Domain(DomainEvent::RunStateChanged { org_id, .. })
            | BusEvent::Domain(DomainEvent::TaskRunStateChanged { org_id, .. })
            | BusEvent::Domain(DomainEvent::ReviewRequested { org_id, .. })
            | BusEvent::Domain(DomainEvent::ReviewDecided { org_id, .. }) => *org_id,
            BusEvent::Log(log) => log.line.org_id,
        }
    }

    /// The run the event belongs to.
    pub fn run_id(&self) -> RunId {
        match self {
            BusEvent::Domain(DomainEvent::RunStateChanged { run_id, .. })
            | BusEvent::Domain(DomainEvent::TaskRunStateChanged { run_id, .. })
            | BusEvent::Domain(DomainEvent::ReviewRequested { run_id, .. })
            | BusEvent::Domain(DomainEvent::ReviewDecided { run_id, .. }) => *run_id,
            BusEvent::Log(log) => log.line.run_id,
        }
    }

    /// The event's kind: `run`, `task_run`, `review` or `log`.
    pub fn kind(&self) -> &'static str {
        match self {
            BusEvent::Domain(DomainEvent::RunStateChanged { .. }) => "run",
            BusEvent::Domain(DomainEvent::TaskRunStateChanged { .. }) => "task_run",
            BusEvent::Domain(DomainEvent::ReviewRequested { .. })
            | BusEvent::Domain(DomainEvent::ReviewDecided { .. }) => "review",
            BusEvent::Log(_) => "log",
        }
    }
}

/// The position of an event on a bus: `<epoch>-<seq>` as text (the SSE event id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId {
    /// Names the bus instance (its start time in microseconds for [`InProcessBus`]).
    pub epoch: u64,
    /// 1, 2, 3… per bus instance.
    pub seq: u64,
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.epoch, self.seq)
    }
}

impl FromStr for EventId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("malformed event id {s:?}: expected <epoch>-<seq>");
        let (epoch, seq) = s.trim().split_once('-').ok_or_else(bad)?;
        Ok(EventId {
            epoch: epoch.parse().map_err(|_| bad())?,
            seq: seq.parse().map_err(|_| bad())?,
        })
    }
}

/// An event with its position.
#[derive(Clone, Debug, PartialEq)]
pub struct Envelope {
    /// Its position.
    pub id: EventId,
    /// The event.
    pub event: BusEvent,
}

/// What a subscription yields.
#[derive(Clone, Debug, PartialEq)]
pub enum Delivery {
    /// The next event.
    Event(Arc<Envelope>),
    /// Events were missed here (the cursor is older than the replay buffer, belongs to
    /// another bus instance, or the subscriber fell behind): the watcher should reload the
    /// state it shows.
    Gap,
}

/// The event-bus port.
pub trait EventBus: Send + Sync + 'static {
    /// Publishes events in order. Never blocks: a subscriber that falls behind gets a
    /// [`Delivery::Gap`].
    fn publish(&self, events: Vec<BusEvent>);

    /// Every event after `after` still held for replay, then live events. `None` starts
    /// with the live events.
    fn subscribe(&self, after: Option<EventId>) -> BoxStream<'static, Delivery>;
}

/// The bus of one process: a bounded replay buffer and a broadcast channel.
pub struct InProcessBus {
    epoch: u64,
    state: Mutex<BusState>,
    replay_max: usize,
}

struct BusState {
    next_seq: u64,
    replay: VecDeque<Arc<Envelope>>,
    live: broadcast::Sender<Arc<Envelope>>,
}

impl InProcessBus {
    /// A bus keeping the last `replay_max` events for resuming subscribers, whose live
    /// subscribers may fall `live_capacity` events behind before they get a gap. `epoch`
    /// names this instance (for example the process start time in microseconds).
    pub fn new(epoch: u64, replay_max: usize, live_capacity: usize) -> Self {
        let (live, _) = broadcast::channel(live_capacity.max(1));
        Self {
            epoch,
            state: Mutex::new(BusState {
                next_seq: 1,
                replay: VecDeque::with_capacity(replay_max.min(4096)),
                live,
            }),
            replay_max: replay_max.max(1),
        }
    }

    /// The id the next event will get.
    pub fn next_id(&self) -> EventId {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        EventId {
            epoch: self.epoch,
            seq: state.next_seq,
        }
    }
}

impl EventBus for InProcessBus {
    fn publish(&self, events: Vec<BusEvent>) {
        if events.is_empty() {
            return;
        }
        // Numbering, buffering and sending happen under one lock, so every subscriber sees
        // events in seq order and a new subscriber's replay and live parts neither overlap
        // nor leave a hole.
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for event in events {
            let envelope = Arc::new(Envelope {
                id: EventId {
                    epoch: self.epoch,
                    seq: state.next_seq,
                },
                event,
            });
            state.next_seq += 1;
            if state.replay.len() == self.replay_max {
                state.replay.pop_front();
            }
            state.replay.push_back(envelope.clone());
            let _ = state.live.send(envelope);
        }
    }

    fn subscribe(&self, after: Option<EventId>) -> BoxStream<'static, Delivery> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let live = BroadcastStream::new(state.live.subscribe());
        let mut head = Vec::new();
        if let Some(after) = after {
            let oldest = state.replay.front().map_or(state.next_seq, |e| e.id.seq);
            if after.epoch != self.epoch || after.seq + 1 < oldest || after.seq >= state.next_seq {
                head.push(Delivery::Gap);
            }
            let from = if after.epoch == self.epoch {
                after.seq
            } else {
                0
            };
            head.extend(
                state
                    .replay
                    .iter()
                    .filter(|e| e.id.seq > from)
                    .cloned()
                    .map(Delivery::Event),
            );
        }
        drop(state);
        let live = live.map(|item| match item {
            Ok(envelope) => Delivery::Event(envelope),
            Err(BroadcastStreamRecvError::Lagged(_)) => Delivery::Gap,
        });
        stream::iter(head).chain(live).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arches_core::RunState;

    fn run_event(run_id: RunId, state: RunState) -> BusEvent {
        BusEvent::Domain(DomainEvent::RunStateChanged {
            org_id: OrgId::DEFAULT,
            run_id,
            state,
            at: Timestamp(1),
        })
    }

    fn seqs(deliveries: &[Delivery]) -> Vec<Option<u64>> {
        deliveries
            .iter()
            .map(|d| match d {
                Delivery::Event(e) => Some(e.id.seq),
                Delivery::Gap => None,
            })
            .collect()
    }

    async fn take(stream: &mut BoxStream<'static, Delivery>, n: usize) -> Vec<Delivery> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(stream.next().await.expect("the stream stays open"));
        }
        out
    }

    #[tokio::test]
    async fn a_resuming_subscriber_gets_the_missed_events_then_live_ones_in_order() {
        let bus = InProcessBus::new(7, 100, 100);
        let run = RunId::new();
        bus.publish(vec![
            run_event(run, RunState::Queued),
            run_event(run, RunState::Running),
        ]);
        let mut resumed = bus.subscribe(Some(EventId { epoch: 7, seq: 1 }));
        let mut live_only = bus.subscribe(None);
        bus.publish(vec![run_event(run, RunState::Succeeded)]);
        assert_eq!(seqs(&take(&mut resumed, 2).await), vec![Some(2), Some(3)]);
        assert_eq!(seqs(&take(&mut live_only, 1).await), vec![Some(3)]);
    }

    #[tokio::test]
    async fn a_cursor_older_than_the_buffer_or_from_another_epoch_reports_a_gap() {
        let bus = InProcessBus::new(7, 2, 100);
        let run = RunId::new();
        for _ in 0..4 {
            bus.publish(vec![run_event(run, RunState::Running)]);
        }
        let mut old = bus.subscribe(Some(EventId { epoch: 7, seq: 1 }));
        assert_eq!(seqs(&take(&mut old, 3).await), vec![None, Some(3), Some(4)]);
        let mut other_epoch = bus.subscribe(Some(EventId { epoch: 6, seq: 3 }));
        assert_eq!(
            seqs(&take(&mut other_epoch, 3).await),
            vec![None, Some(3), Some(4)]
        );
        let mut current = bus.subscribe(Some(EventId { epoch: 7, seq: 4 }));
        bus.publish(vec![run_event(run, RunState::Succeeded)]);
        assert_eq!(seqs(&take(&mut current, 1).await), vec![Some(5)]);
    }

    #[tokio::test]
    async fn a_subscriber_that_falls_behind_gets_a_gap_not_a_stall() {
        let bus = InProcessBus::new(1, 100, 2);
        let run = RunId::new();
        let mut slow = bus.subscribe(None);
        for _ in 0..5 {
            bus.publish(vec![run_event(run, RunState::Running)]);
        }
        let got = take(&mut slow, 3).await;
        assert_eq!(seqs(&got), vec![None, Some(4), Some(5)]);
    }

    #[test]
    fn event_ids_print_and_parse() {
        let id = EventId { epoch: 17, seq: 42 };
        assert_eq!(id.to_string().parse::<EventId>().unwrap(), id);
        let err = "42".parse::<EventId>().unwrap_err();
        assert!(err.contains("<epoch>-<seq>"), "{err}");
    }

    #[test]
    fn events_serialize_with_their_type() {
        let run = RunId::new();
        let json = serde_json::to_value(run_event(run, RunState::Running)).unwrap();
        assert_eq!(json["type"], "run_state_changed");
        let log = BusEvent::Log(LogLineEvent {
            line: LogEvent {
                org_id: OrgId::DEFAULT,
                run_id: run,
                task_run_id: TaskRunId::new(),
                task_id: TaskId::parse("load").unwrap(),
                attempt: 1,
                stream: LogStream::Stdout,
                at: Timestamp(5),
                text: "hello".into(),
            },
        });
        let json = serde_json::to_value(&log).unwrap();
        assert_eq!(json["type"], "log_line");
        assert_eq!(json["text"], "hello");
        assert_eq!(log.kind(), "log");
        assert_eq!(log.run_id(), run);
    }
}
