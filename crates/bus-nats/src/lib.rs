//! An [`EventBus`] on NATS JetStream, shared by several processes: an event published by any
//! of them (a worker attached to replica B) reaches the subscribers of every other (a browser
//! watching replica A's server-sent events).
//!
//! # Layout on NATS
//!
//! One JetStream stream (default [`DEFAULT_STREAM_NAME`]) holds the subjects
//! `<prefix>.<org_id>.<kind>` (prefix default [`DEFAULT_SUBJECT_PREFIX`], `kind` is
//! [`BusEvent::kind`]: `run`, `task_run` or `log`), so one org's events can be consumed or
//! permissioned apart. Each message's payload is the event's JSON (the same shape the
//! server-sent events carry). The stream is bounded by message count, age and bytes and
//! discards the oldest messages first.
//!
//! # Event ids
//!
//! An [`EventId`] is `(epoch, seq)`: `seq` is the JetStream stream sequence (1, 2, 3… shared
//! by every process on the stream) and `epoch` is the stream's creation time in microseconds
//! since the Unix epoch, so a deleted and recreated stream (whose sequences start again at 1)
//! gives other ids, and a cursor from before it yields [`Delivery::Gap`].
//!
//! # How it differs from [`InProcessBus`](arches_engine::bus::InProcessBus)
//!
//! - [`EventBus::publish`] only queues: a background task publishes to JetStream and awaits
//!   the acks, so events become visible to subscribers a network round trip later. When the
//!   queue is full (NATS is slow or unreachable) events are dropped and counted
//!   ([`NatsBus::stats`]); subscribers then see no gap for them, since they never got a
//!   sequence. [`NatsBus::flush`] waits for everything queued.
//! - Live subscribers (`subscribe(None)`) share one JetStream consumer per bus (started
//!   after the stream's last message at connect time), fed into a broadcast channel joined
//!   at subscription time, as in `InProcessBus`: every event published (by any process) after
//!   `subscribe` returns is delivered, so "subscribe, then read the store" leaves no hole.
//!   Unlike `InProcessBus`, an event published just before `subscribe` but not yet received
//!   from NATS may be delivered too (a duplicate of what the store read shows, never a loss).
//!   A live subscriber more than [`NatsBusOptions::live_capacity`] events behind gets a gap.
//! - Resuming subscribers (`subscribe(Some(after))`) each get their own ephemeral ordered
//!   JetStream consumer starting after `after` (the same gap rules as `InProcessBus`: another
//!   epoch or a cursor older than the oldest kept message gives a gap, then every kept
//!   message; a cursor ahead of the stream gives a gap, then live events). Its first
//!   deliveries come once the consumer is created, a round trip after the first poll.
//! - Events from one bus reach the stream in publish order, except that an event whose
//!   publishing failed and was retried lands after the ones sent behind it.
//! - Events dropped from the stream by its limits while a subscriber is behind show as
//!   [`Delivery::Gap`] (the stream sequence jumps), as does a recreated stream noticed by the
//!   periodic stream check ([`NatsBusOptions::stream_check_interval`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arches_engine::bus::{BusEvent, Delivery, Envelope, EventBus, EventId};
use async_nats::jetstream::{self, consumer, stream};
use futures::stream::{BoxStream, StreamExt};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// `url` without the credentials it may hold (`nats://user:password@host` →
/// `nats://***@host`), for error messages.
pub fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme + 3 => {
            format!("{}***{}", &url[..scheme + 3], &url[at..])
        }
        (None, Some(at)) => format!("***{}", &url[at..]),
        _ => url.to_owned(),
    }
}

/// The default JetStream stream name.
pub const DEFAULT_STREAM_NAME: &str = "ARCHES_EVENTS";

/// The default subject prefix: events go to `arches.events.<org_id>.<kind>`.
pub const DEFAULT_SUBJECT_PREFIX: &str = "arches.events";

/// How many queued events the background publisher sends before awaiting their acks.
const PUBLISH_BATCH: usize = 256;

/// Attempts per event before the publisher gives up on it (counted in
/// [`PublishStats::failed`]). Retries carry the same `Nats-Msg-Id`, so JetStream stores an
/// event at most once within the stream's duplicate window.
const PUBLISH_ATTEMPTS: u32 = 3;

/// Errors of [`NatsBus`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The options are unusable (empty or malformed stream name or subject prefix, zero
    /// capacities or limits).
    #[error("invalid NATS event bus options: {0}")]
    InvalidOptions(String),
    /// No connection to the NATS server could be made.
    #[error("cannot connect to NATS at {url}: {message}")]
    Connect {
        /// The URL given to [`NatsBus::connect`].
        url: String,
        /// What the client reported.
        message: String,
    },
    /// The JetStream stream could not be created, updated or read (JetStream disabled on the
    /// server, a conflicting stream over the same subjects, no permission…).
    #[error("cannot set up the JetStream stream {stream:?} at {url}: {message}")]
    Stream {
        /// The URL given to [`NatsBus::connect`].
        url: String,
        /// The stream name.
        stream: String,
        /// What the server or client reported.
        message: String,
    },
    /// The bus was closed ([`NatsBus::close`]).
    #[error("the NATS event bus is closed")]
    Closed,
}

/// Where JetStream keeps the stream's messages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Storage {
    /// On disk: survives a NATS server restart.
    #[default]
    File,
    /// In memory: faster, lost when the server restarts (subscribers resuming afterwards get
    /// a gap, since the recreated stream has another epoch).
    Memory,
}

/// How [`NatsBus::connect`] sets up the stream and the bus. Every process sharing a stream
/// should use the same stream name, subject prefix and limits: the last process to start
/// applies its limits to the stream.
#[derive(Clone, Debug)]
pub struct NatsBusOptions {
    /// The JetStream stream name: letters, digits, `-` and `_` only. Default
    /// [`DEFAULT_STREAM_NAME`].
    pub stream_name: String,
    /// The subject prefix: dot-separated tokens without wildcards or spaces. Events are
    /// published to `<prefix>.<org_id>.<kind>`, and the stream holds `<prefix>.>`. Default
    /// [`DEFAULT_SUBJECT_PREFIX`].
    pub subject_prefix: String,
    /// The most messages the stream keeps; older ones are discarded first. Default 1,000,000.
    pub max_messages: i64,
    /// The oldest a message may get before JetStream discards it. Default 24 hours.
    pub max_age: Duration,
    /// The most bytes the stream keeps (payloads and headers). Default 1 GiB.
    pub max_bytes: i64,
    /// Where the stream keeps its messages. Default [`Storage::File`].
    pub storage: Storage,
    /// Copies of each message in a clustered JetStream (1 to 5). Default 1.
    pub replicas: usize,
    /// Events that [`EventBus::publish`] may queue for the background publisher; more are
    /// dropped and counted. Default 10,000.
    pub publish_queue: usize,
    /// How many events a live subscriber (`subscribe(None)`) may fall behind before it gets
    /// a [`Delivery::Gap`]. Default 1024.
    pub live_capacity: usize,
    /// How often the bus checks that its stream still exists (recreating it when it was
    /// deleted) and whether it was recreated (a new epoch: subscribers get a gap). Default
    /// 5 seconds.
    pub stream_check_interval: Duration,
    /// How long connecting to the server may take. Default 5 seconds.
    pub connect_timeout: Duration,
    /// The name this connection shows in the server's monitoring. Default `arches-bus`.
    pub connection_name: String,
}

impl Default for NatsBusOptions {
    fn default() -> Self {
        Self {
            stream_name: DEFAULT_STREAM_NAME.to_owned(),
            subject_prefix: DEFAULT_SUBJECT_PREFIX.to_owned(),
            max_messages: 1_000_000,
            max_age: Duration::from_secs(24 * 60 * 60),
            max_bytes: 1 << 30,
            storage: Storage::File,
            replicas: 1,
            publish_queue: 10_000,
            live_capacity: 1024,
            stream_check_interval: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            connection_name: "arches-bus".to_owned(),
        }
    }
}

impl NatsBusOptions {
    fn validate(&self) -> Result<(), Error> {
        let bad = |message: String| Err(Error::InvalidOptions(message));
        let name = &self.stream_name;
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return bad(format!(
                "stream name {name:?}: use 1 or more of a-z, A-Z, 0-9, '-' and '_'"
            ));
        }
        let prefix = &self.subject_prefix;
        let token_ok = |t: &str| {
            !t.is_empty()
                && t != "*"
                && t != ">"
                && !t.chars().any(|c| c.is_whitespace() || c == '*' || c == '>')
        };
        if !prefix.split('.').all(token_ok) {
            return bad(format!(
                "subject prefix {prefix:?}: use dot-separated tokens without spaces or wildcards"
            ));
        }
        if self.max_messages <= 0 || self.max_bytes <= 0 || self.max_age.is_zero() {
            return bad(
                "max_messages, max_bytes and max_age must be positive: the stream is bounded"
                    .into(),
            );
        }
        if !(1..=5).contains(&self.replicas) {
            return bad(format!("replicas {}: use 1 to 5", self.replicas));
        }
        if self.publish_queue == 0 || self.live_capacity == 0 {
            return bad("publish_queue and live_capacity must be positive".into());
        }
        if self.stream_check_interval.is_zero() {
            return bad("stream_check_interval must be positive".into());
        }
        Ok(())
    }

    fn stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.stream_name.clone(),
            description: Some("Arches run, task-run and log events".to_owned()),
            subjects: vec![format!("{}.>", self.subject_prefix)],
            max_messages: self.max_messages,
            max_bytes: self.max_bytes,
            max_age: self.max_age,
            discard: stream::DiscardPolicy::Old,
            retention: stream::RetentionPolicy::Limits,
            storage: match self.storage {
                Storage::File => stream::StorageType::File,
                Storage::Memory => stream::StorageType::Memory,
            },
            num_replicas: self.replicas,
            // The server rejects a duplicate window longer than the maximum age.
            duplicate_window: Duration::from_secs(120).min(self.max_age),
            ..Default::default()
        }
    }
}

/// The subject of an event: `<prefix>.<org_id>.<kind>`.
pub fn subject_for(prefix: &str, event: &BusEvent) -> String {
    format!("{prefix}.{}.{}", event.org_id(), event.kind())
}

/// Counters of the publishing side of a [`NatsBus`], since it connected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PublishStats {
    /// Events JetStream acknowledged.
    pub published: u64,
    /// Events dropped because the publish queue was full or the bus closed.
    pub dropped: u64,
    /// Events that could not be encoded or whose publishing failed after retries.
    pub failed: u64,
}

#[derive(Default)]
struct Counters {
    published: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
}

enum Command {
    Event(BusEvent),
    /// Replies once everything queued before it was acknowledged (or failed).
    Flush(oneshot::Sender<()>),
    /// Like `Flush`, then the publisher stops.
    Stop(oneshot::Sender<()>),
}

/// What a subscription's consumer needs.
#[derive(Clone)]
struct Shared {
    context: jetstream::Context,
    stream_name: String,
    /// The epoch the periodic stream check last saw.
    epoch: watch::Receiver<u64>,
    /// Becomes `true` (or is dropped) when the bus closes: subscriptions end.
    shutdown: watch::Receiver<bool>,
}

/// The event bus on NATS JetStream. Cheap to share behind an `Arc<dyn EventBus>`; dropping
/// it stops its background tasks (events still queued are published by the publisher before
/// it exits) and ends its subscriptions.
pub struct NatsBus {
    shared: Shared,
    subject_prefix: String,
    queue: mpsc::Sender<Command>,
    queue_capacity: usize,
    counters: Arc<Counters>,
    /// Set while publish is dropping, so a burst of drops is logged once.
    dropping: AtomicBool,
    closed: AtomicBool,
    live: Mutex<Option<broadcast::Sender<Delivery>>>,
    shutdown: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    publisher: Mutex<Option<JoinHandle<()>>>,
}

impl NatsBus {
    /// Connects to the NATS server at `url` (one server, for example
    /// `nats://127.0.0.1:4222`; the client learns a cluster's other servers from it), creates the stream or updates its limits and
    /// subjects (safe when several processes start at once), and starts the background
    /// publisher, the live consumer and the periodic stream check. Must be called within a
    /// Tokio runtime.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidOptions`] for unusable options, [`Error::Connect`] when the server
    /// cannot be reached within [`NatsBusOptions::connect_timeout`], [`Error::Stream`] when
    /// the stream cannot be set up (JetStream disabled, a stream with the same name but other
    /// settings that cannot be updated, or another stream owning the subjects).
    pub async fn connect(url: &str, options: NatsBusOptions) -> Result<NatsBus, Error> {
        options.validate()?;
        let client = async_nats::ConnectOptions::new()
            .name(&options.connection_name)
            .connection_timeout(options.connect_timeout)
            .connect(url)
            .await
            .map_err(|e| Error::Connect {
                url: redacted(url),
                message: e.to_string(),
            })?;
        let context = jetstream::new(client.clone());
        let config = options.stream_config();
        let info = ensure_stream(&context, &config)
            .await
            .map_err(|message| Error::Stream {
                url: redacted(url),
                stream: options.stream_name.clone(),
                message,
            })?;
        let epoch = epoch_of(&info);
        let (epoch_tx, epoch_rx) = watch::channel(epoch);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let shared = Shared {
            context: context.clone(),
            stream_name: options.stream_name.clone(),
            epoch: epoch_rx,
            shutdown: shutdown_rx,
        };
        let counters = Arc::new(Counters::default());
        let (queue, queue_rx) = mpsc::channel(options.publish_queue);
        // Message ids for JetStream's duplicate detection: unique per bus instance and event.
        let instance = client.new_inbox().replace("_INBOX.", "");
        let publisher = tokio::spawn(run_publisher(
            context.clone(),
            options.subject_prefix.clone(),
            instance,
            queue_rx,
            counters.clone(),
        ));
        let (live, _) = broadcast::channel(options.live_capacity);
        // The live consumer starts after the stream's last message at connect time: every
        // event published afterwards reaches the live subscribers.
        let tail = Follower::new(
            shared.clone(),
            EventId {
                epoch,
                seq: info.state.last_sequence,
            },
        );
        let tail = tokio::spawn(run_tail(tail, live.clone()));
        let check = tokio::spawn(run_stream_check(
            context,
            config,
            options.stream_check_interval,
            epoch_tx,
            shared.shutdown.clone(),
        ));
        Ok(NatsBus {
            shared,
            subject_prefix: options.subject_prefix,
            queue,
            queue_capacity: options.publish_queue,
            counters,
            dropping: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            live: Mutex::new(Some(live)),
            shutdown: shutdown_tx,
            tasks: Mutex::new(vec![tail, check]),
            publisher: Mutex::new(Some(publisher)),
        })
    }

    /// The stream's current epoch as the bus last saw it: its creation time in microseconds
    /// since the Unix epoch (the `epoch` of the [`EventId`]s it hands out).
    pub fn epoch(&self) -> u64 {
        *self.shared.epoch.borrow()
    }

    /// The JetStream stream's name.
    pub fn stream_name(&self) -> &str {
        &self.shared.stream_name
    }

    /// The subject prefix: events go to `<prefix>.<org_id>.<kind>`.
    pub fn subject_prefix(&self) -> &str {
        &self.subject_prefix
    }

    /// The JetStream context the bus uses (for administration and tests).
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.shared.context
    }

    /// The publishing counters.
    pub fn stats(&self) -> PublishStats {
        PublishStats {
            published: self.counters.published.load(Ordering::Relaxed),
            dropped: self.counters.dropped.load(Ordering::Relaxed),
            failed: self.counters.failed.load(Ordering::Relaxed),
        }
    }

    /// Waits until every event queued before the call was acknowledged by JetStream or gave
    /// up on (see [`PublishStats::failed`]). Waits for room in the publish queue, so it must
    /// not be called where blocking matters.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] once the bus was closed.
    pub async fn flush(&self) -> Result<(), Error> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        let (reply, done) = oneshot::channel();
        self.queue
            .send(Command::Flush(reply))
            .await
            .map_err(|_| Error::Closed)?;
        done.await.map_err(|_| Error::Closed)
    }

    /// Publishes what is queued (as [`NatsBus::flush`]), then stops: later publishes are
    /// dropped and counted, subscriptions end, the background tasks stop.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] when the bus was already closed.
    pub async fn close(&self) -> Result<(), Error> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Err(Error::Closed);
        }
        let (reply, done) = oneshot::channel();
        if self.queue.send(Command::Stop(reply)).await.is_ok() {
            let _ = done.await;
        }
        let publisher = self
            .publisher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(publisher) = publisher {
            let _ = publisher.await;
        }
        self.stop();
        Ok(())
    }

    fn stop(&self) {
        let _ = self.shutdown.send(true);
        self.live.lock().unwrap_or_else(|e| e.into_inner()).take();
        for task in self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            task.abort();
        }
    }

    fn count_drop(&self, why: &str) {
        self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        if !self.dropping.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                stream = %self.shared.stream_name,
                capacity = self.queue_capacity,
                "event bus: {why}; dropping events until the publisher catches up"
            );
        }
    }
}

impl Drop for NatsBus {
    fn drop(&mut self) {
        self.stop();
    }
}

impl EventBus for NatsBus {
    fn publish(&self, events: Vec<BusEvent>) {
        if self.closed.load(Ordering::Acquire) {
            for _ in &events {
                self.count_drop("the bus is closed");
            }
            return;
        }
        for event in events {
            match self.queue.try_send(Command::Event(event)) {
                Ok(()) => {
                    if self.dropping.load(Ordering::Relaxed)
                        && self.dropping.swap(false, Ordering::Relaxed)
                    {
                        tracing::info!(
                            stream = %self.shared.stream_name,
                            dropped_total = self.counters.dropped.load(Ordering::Relaxed),
                            "event bus: publishing again"
                        );
                    }
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.count_drop("the publish queue is full (NATS slow or unreachable)")
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.count_drop("the publisher stopped")
                }
            }
        }
    }

    fn subscribe(&self, after: Option<EventId>) -> BoxStream<'static, Delivery> {
        match after {
            None => {
                let receiver = self
                    .live
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_ref()
                    .map(broadcast::Sender::subscribe);
                let Some(receiver) = receiver else {
                    return futures::stream::empty().boxed();
                };
                futures::stream::unfold(receiver, |mut receiver| async move {
                    match receiver.recv().await {
                        Ok(delivery) => Some((delivery, receiver)),
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            Some((Delivery::Gap, receiver))
                        }
                        Err(broadcast::error::RecvError::Closed) => None,
                    }
                })
                .boxed()
            }
            Some(after) => Follower::new(self.shared.clone(), after).into_stream(),
        }
    }
}

/// The stream's epoch: its creation time in microseconds since the Unix epoch.
///
/// (`created` is `time::OffsetDateTime` with async-nats' default datetime backend.)
fn epoch_of(info: &stream::Info) -> u64 {
    u64::try_from(info.created.unix_timestamp_nanos() / 1000).unwrap_or(0)
}

/// Reads the stream's info, creating the stream or updating its settings. Creating is
/// idempotent on the server for equal settings; a concurrent creation with other settings
/// makes this retry as an update.
async fn ensure_stream(
    context: &jetstream::Context,
    config: &stream::Config,
) -> Result<stream::Info, String> {
    let mut last_error = String::new();
    for attempt in 0..3u64 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
        }
        match context.create_or_update_stream(config.clone()).await {
            Ok(info) => return Ok(info),
            Err(e) => last_error = e.to_string(),
        }
    }
    Err(last_error)
}

/// Reads the stream's info, recreating the stream when it is gone.
async fn check_stream(
    context: &jetstream::Context,
    config: &stream::Config,
) -> Result<stream::Info, String> {
    match context.get_stream(&config.name).await {
        Ok(stream) => Ok(stream.cached_info().clone()),
        Err(e) => match e.kind() {
            jetstream::context::GetStreamErrorKind::JetStream(_) => {
                tracing::warn!(stream = %config.name, "event bus: stream missing ({e}); recreating it");
                ensure_stream(context, config).await
            }
            _ => Err(e.to_string()),
        },
    }
}

async fn run_stream_check(
    context: jetstream::Context,
    config: stream::Config,
    interval: Duration,
    epoch: watch::Sender<u64>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
        match check_stream(&context, &config).await {
            Ok(info) => {
                failing = false;
                let new = epoch_of(&info);
                epoch.send_if_modified(|current| {
                    let changed = *current != new;
                    if changed {
                        tracing::warn!(stream = %config.name, old = *current, new, "event bus: the stream was recreated");
                        *current = new;
                    }
                    changed
                });
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(stream = %config.name, "event bus: cannot check the stream: {e}");
                }
                failing = true;
            }
        }
    }
}

async fn run_tail(mut tail: Follower, live: broadcast::Sender<Delivery>) {
    while let Some(delivery) = tail.next().await {
        // No receiver is not an error: nobody is watching.
        let _ = live.send(delivery);
    }
}

async fn run_publisher(
    context: jetstream::Context,
    prefix: String,
    instance: String,
    mut queue: mpsc::Receiver<Command>,
    counters: Arc<Counters>,
) {
    let mut batch = Vec::with_capacity(PUBLISH_BATCH);
    let mut pending = Vec::new();
    let mut counter = 0u64;
    let mut degraded = false;
    loop {
        if queue.recv_many(&mut batch, PUBLISH_BATCH).await == 0 {
            break;
        }
        for command in batch.drain(..) {
            match command {
                Command::Event(event) => {
                    let payload = match serde_json::to_vec(&event) {
                        Ok(payload) => payload,
                        Err(e) => {
                            counters.failed.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!("event bus: cannot encode an event: {e}");
                            continue;
                        }
                    };
                    counter += 1;
                    let message = Outgoing {
                        subject: subject_for(&prefix, &event),
                        payload: payload.into(),
                        id: format!("{instance}-{counter}"),
                    };
                    let ack = send(&context, &message).await;
                    pending.push((message, ack));
                }
                Command::Flush(reply) => {
                    settle(&context, &mut pending, &counters, &mut degraded).await;
                    let _ = reply.send(());
                }
                Command::Stop(reply) => {
                    settle(&context, &mut pending, &counters, &mut degraded).await;
                    let _ = reply.send(());
                    return;
                }
            }
        }
        settle(&context, &mut pending, &counters, &mut degraded).await;
    }
    settle(&context, &mut pending, &counters, &mut degraded).await;
}

struct Outgoing {
    subject: String,
    payload: bytes::Bytes,
    id: String,
}

type AckResult = Result<jetstream::context::PublishAckFuture, jetstream::context::PublishError>;

async fn send(context: &jetstream::Context, message: &Outgoing) -> AckResult {
    context
        .send_publish(
            message.subject.clone(),
            jetstream::message::PublishMessage::build()
                .payload(message.payload.clone())
                .message_id(&message.id),
        )
        .await
}

/// Awaits the acks of the sent events (all at once, so their timeouts run together), then
/// resends the failed ones (same message ids, so JetStream stores each at most once) until
/// [`PUBLISH_ATTEMPTS`] rounds are done. After a round of sends that all failed, later
/// batches get one attempt only (`degraded`) until one succeeds again, so a flush during an
/// outage takes one ack timeout per batch rather than several.
async fn settle(
    context: &jetstream::Context,
    pending: &mut Vec<(Outgoing, AckResult)>,
    counters: &Counters,
    degraded: &mut bool,
) {
    let mut round: Vec<(Outgoing, AckResult)> = std::mem::take(pending);
    let mut attempt = 1;
    while !round.is_empty() {
        let results = futures::future::join_all(round.into_iter().map(|(message, ack)| async {
            let result = match ack {
                Ok(future) => future.await.map(|_| ()),
                Err(e) => Err(e),
            };
            (message, result)
        }))
        .await;
        let mut failed = Vec::new();
        let mut succeeded = false;
        for (message, result) in results {
            match result {
                Ok(()) => {
                    succeeded = true;
                    counters.published.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => failed.push((message, e)),
            }
        }
        if succeeded {
            *degraded = false;
        }
        let attempts = if *degraded { 1 } else { PUBLISH_ATTEMPTS };
        if failed.is_empty() {
            return;
        }
        if attempt >= attempts {
            counters
                .failed
                .fetch_add(failed.len() as u64, Ordering::Relaxed);
            let (message, e) = &failed[0];
            tracing::warn!(
                subject = %message.subject,
                count = failed.len(),
                "event bus: cannot publish events: {e}"
            );
            *degraded = !succeeded;
            return;
        }
        tracing::debug!(
            count = failed.len(),
            attempt,
            "event bus: publishing failed, retrying"
        );
        tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
        attempt += 1;
        round = Vec::with_capacity(failed.len());
        for (message, _) in failed {
            let ack = send(context, &message).await;
            round.push((message, ack));
        }
    }
}

/// Follows the stream from a cursor with an ephemeral ordered consumer, turning messages into
/// deliveries: a [`Delivery::Gap`] first when the cursor is from another epoch, older than
/// the oldest message kept, or ahead of the newest; a gap wherever the stream sequence jumps;
/// and a gap plus the new stream's messages when the stream is recreated. A failed consumer
/// is recreated from the last delivered event.
struct Follower {
    shared: Shared,
    /// The last event delivered (or the position resumed from).
    cursor: EventId,
    queue: VecDeque<Delivery>,
    messages: Option<consumer::pull::Ordered>,
    /// Consecutive failures to open a consumer, for the backoff.
    failures: u32,
}

/// Where to start, given a cursor and the stream's epoch and first and last sequences:
/// whether events were missed, and the first sequence to deliver.
fn plan(after: EventId, epoch: u64, first: u64, last: u64) -> (bool, u64) {
    let first = first.max(1);
    if after.epoch != epoch {
        (true, first)
    } else if after.seq > last {
        (true, last + 1)
    } else if after.seq + 1 < first {
        (true, first)
    } else {
        (false, after.seq + 1)
    }
}

enum Step {
    Shutdown,
    EpochChanged,
    /// Boxed: a message is large next to the other steps.
    Message(Box<Option<Result<jetstream::Message, consumer::pull::OrderedError>>>),
}

impl Follower {
    fn new(shared: Shared, cursor: EventId) -> Self {
        Self {
            shared,
            cursor,
            queue: VecDeque::new(),
            messages: None,
            failures: 0,
        }
    }

    fn into_stream(self) -> BoxStream<'static, Delivery> {
        futures::stream::unfold(self, |mut follower| async move {
            let delivery = follower.next().await?;
            Some((delivery, follower))
        })
        .boxed()
    }

    fn shut_down(&self) -> bool {
        *self.shared.shutdown.borrow() || self.shared.shutdown.has_changed().is_err()
    }

    async fn next(&mut self) -> Option<Delivery> {
        loop {
            if let Some(delivery) = self.queue.pop_front() {
                return Some(delivery);
            }
            if self.shut_down() {
                return None;
            }
            let Some(messages) = self.messages.as_mut() else {
                if self.failures > 0 {
                    let backoff = Duration::from_millis(100 << self.failures.min(6));
                    let mut shutdown = self.shared.shutdown.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => return None,
                    }
                }
                if let Err(e) = self.open().await {
                    self.failures += 1;
                    if self.failures == 1 {
                        tracing::warn!(stream = %self.shared.stream_name, "event bus: cannot follow the stream: {e}");
                    }
                }
                continue;
            };
            let shutdown = &mut self.shared.shutdown;
            let epoch = &mut self.shared.epoch;
            let step = tokio::select! {
                changed = shutdown.changed() => match changed {
                    Ok(()) => continue,
                    Err(_) => Step::Shutdown,
                },
                changed = epoch.changed() => match changed {
                    Ok(()) => Step::EpochChanged,
                    Err(_) => Step::Shutdown,
                },
                message = messages.next() => Step::Message(Box::new(message)),
            };
            match step {
                Step::Shutdown => return None,
                Step::EpochChanged => {
                    let epoch = *self.shared.epoch.borrow_and_update();
                    if epoch != self.cursor.epoch {
                        // Reopening sees the new epoch and reports the gap.
                        self.messages = None;
                    }
                }
                Step::Message(message) => match *message {
                    Some(Ok(message)) => self.accept(&message),
                    Some(Err(e)) => {
                        tracing::warn!(stream = %self.shared.stream_name, "event bus: consumer failed, recreating it: {e}");
                        self.messages = None;
                        self.failures += 1;
                    }
                    None => {
                        self.messages = None;
                        self.failures += 1;
                    }
                },
            }
        }
    }

    /// Reads the stream's state, queues a gap when events were missed, and creates the
    /// consumer.
    async fn open(&mut self) -> Result<(), String> {
        let stream = self
            .shared
            .context
            .get_stream(&self.shared.stream_name)
            .await
            .map_err(|e| e.to_string())?;
        let info = stream.cached_info();
        let epoch = epoch_of(info);
        let (gap, start) = plan(
            self.cursor,
            epoch,
            info.state.first_sequence,
            info.state.last_sequence,
        );
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                },
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        let messages = consumer.messages().await.map_err(|e| e.to_string())?;
        if gap {
            self.queue.push_back(Delivery::Gap);
        }
        self.cursor = EventId {
            epoch,
            seq: start - 1,
        };
        self.messages = Some(messages);
        self.failures = 0;
        Ok(())
    }

    fn accept(&mut self, message: &jetstream::Message) {
        let seq = match message.info() {
            Ok(info) => info.stream_sequence,
            Err(e) => {
                tracing::warn!(subject = %message.subject, "event bus: skipping a message without JetStream metadata: {e}");
                return;
            }
        };
        if seq <= self.cursor.seq {
            return;
        }
        if seq > self.cursor.seq + 1 {
            // Discarded by the stream's limits before this consumer got to them.
            self.queue.push_back(Delivery::Gap);
        }
        self.cursor.seq = seq;
        match serde_json::from_slice::<BusEvent>(&message.payload) {
            Ok(event) => self.queue.push_back(Delivery::Event(Arc::new(Envelope {
                id: self.cursor,
                event,
            }))),
            Err(e) => tracing::warn!(
                subject = %message.subject,
                seq,
                "event bus: skipping an undecodable event: {e}"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_reach_error_messages() {
        assert_eq!(
            redacted("nats://user:secret@host:4222"),
            "nats://***@host:4222"
        );
        assert_eq!(redacted("nats://token@host"), "nats://***@host");
        assert_eq!(redacted("nats://host:4222"), "nats://host:4222");
        let error = Error::Connect {
            url: redacted("tls://a:b@nats.example:4222"),
            message: "refused".into(),
        };
        assert!(!error.to_string().contains(":b@"), "{error}");
    }

    #[test]
    fn the_plan_matches_the_in_process_bus() {
        // Same epoch, within the kept messages: resume right after the cursor.
        assert_eq!(plan(EventId { epoch: 7, seq: 3 }, 7, 2, 5), (false, 4));
        // At the newest: nothing missed.
        assert_eq!(plan(EventId { epoch: 7, seq: 5 }, 7, 2, 5), (false, 6));
        // Just before the oldest kept: nothing missed.
        assert_eq!(plan(EventId { epoch: 7, seq: 1 }, 7, 2, 5), (false, 2));
        // Older than the oldest kept: a gap, then everything kept.
        assert_eq!(plan(EventId { epoch: 7, seq: 0 }, 7, 3, 5), (true, 3));
        // Another epoch: a gap, then everything kept.
        assert_eq!(plan(EventId { epoch: 6, seq: 3 }, 7, 3, 5), (true, 3));
        // Ahead of the newest: a gap, then live events.
        assert_eq!(plan(EventId { epoch: 7, seq: 9 }, 7, 3, 5), (true, 6));
        // A new, empty stream reports first 0 and last 0.
        assert_eq!(plan(EventId { epoch: 7, seq: 0 }, 7, 0, 0), (false, 1));
    }

    #[test]
    fn options_are_validated() {
        assert!(NatsBusOptions::default().validate().is_ok());
        let bad_name = NatsBusOptions {
            stream_name: "a.b".into(),
            ..Default::default()
        };
        assert!(bad_name.validate().is_err());
        let bad_prefix = NatsBusOptions {
            subject_prefix: "arches.*".into(),
            ..Default::default()
        };
        assert!(bad_prefix.validate().is_err());
        let unbounded = NatsBusOptions {
            max_messages: 0,
            ..Default::default()
        };
        assert!(unbounded.validate().is_err());
    }
}
