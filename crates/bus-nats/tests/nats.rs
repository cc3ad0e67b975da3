//! The NATS JetStream event bus against a real NATS server with JetStream, at the URL in
//! `ARCHES_TEST_NATS_URL` (`.ci/run` and `scripts/test` set it to this machine's server).
//! Each test uses its own stream and subject prefix and deletes its stream at the end.

use std::time::{Duration, Instant};

use arches_bus_nats::{NatsBus, NatsBusOptions};
use arches_core::events::DomainEvent;
use arches_core::records::LogStream;
use arches_core::{OrgId, RunId, RunState, TaskId, TaskRunId, TaskRunState, Timestamp};
use arches_engine::bus::{BusEvent, Delivery, EventBus, EventId, LogEvent, LogLineEvent};
use futures::stream::{BoxStream, StreamExt};

/// The longest any expected delivery may take.
const WAIT: Duration = Duration::from_secs(15);

fn nats_url() -> String {
    std::env::var("ARCHES_TEST_NATS_URL").unwrap_or_else(|_| {
        panic!(
            "ARCHES_TEST_NATS_URL is not set: these tests need a NATS server with JetStream \
             (for example ARCHES_TEST_NATS_URL=nats://127.0.0.1:4222; .ci/run and scripts/test \
             set it)"
        )
    })
}

/// A test's own stream and subject prefix; deletes the stream when dropped, even when the
/// test fails.
struct TestStream {
    url: String,
    name: String,
    prefix: String,
}

impl TestStream {
    fn new() -> Self {
        let id = uuid::Uuid::now_v7().simple().to_string();
        Self {
            url: nats_url(),
            name: format!("ARCHES_TEST_{id}"),
            prefix: format!("arches-test.{id}"),
        }
    }

    fn options(&self) -> NatsBusOptions {
        NatsBusOptions {
            stream_name: self.name.clone(),
            subject_prefix: self.prefix.clone(),
            storage: arches_bus_nats::Storage::Memory,
            max_age: Duration::from_secs(600),
            ..Default::default()
        }
    }

    async fn connect(&self, options: NatsBusOptions) -> NatsBus {
        NatsBus::connect(&self.url, options)
            .await
            .unwrap_or_else(|e| panic!("connecting the bus: {e}"))
    }
}

impl Drop for TestStream {
    fn drop(&mut self) {
        let url = self.url.clone();
        let name = self.name.clone();
        // Its own thread and runtime: Drop cannot await, and may run outside a runtime.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async {
                if let Ok(client) = async_nats::connect(url.as_str()).await {
                    let _ = async_nats::jetstream::new(client)
                        .delete_stream(&name)
                        .await;
                }
            });
        })
        .join();
    }
}

fn run_event(org_id: OrgId, state: RunState) -> BusEvent {
    BusEvent::Domain(DomainEvent::RunStateChanged {
        org_id,
        run_id: RunId::new(),
        state,
        at: Timestamp(1),
    })
}

fn task_run_event(org_id: OrgId) -> BusEvent {
    BusEvent::Domain(DomainEvent::TaskRunStateChanged {
        org_id,
        run_id: RunId::new(),
        task_run_id: TaskRunId::new(),
        task_id: TaskId::parse("load").unwrap(),
        index: None,
        state: TaskRunState::Succeeded,
        attempt: 1,
        at: Timestamp(2),
    })
}

fn log_event(org_id: OrgId, text: &str) -> BusEvent {
    BusEvent::Log(LogLineEvent {
        line: LogEvent {
            org_id,
            run_id: RunId::new(),
            task_run_id: TaskRunId::new(),
            task_id: TaskId::parse("load").unwrap(),
            attempt: 1,
            stream: LogStream::Stdout,
            at: Timestamp(3),
            text: text.to_owned(),
        },
    })
}

/// The next `n` deliveries, each within [`WAIT`].
async fn take(stream: &mut BoxStream<'static, Delivery>, n: usize) -> Vec<Delivery> {
    let mut out = Vec::new();
    for i in 0..n {
        let next = tokio::time::timeout(WAIT, stream.next())
            .await
            .unwrap_or_else(|_| panic!("delivery {i} of {n} did not come within {WAIT:?}"));
        out.push(next.expect("the subscription stays open"));
    }
    out
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

fn events(deliveries: &[Delivery]) -> Vec<BusEvent> {
    deliveries
        .iter()
        .map(|d| match d {
            Delivery::Event(e) => e.event.clone(),
            Delivery::Gap => panic!("unexpected gap in {deliveries:?}"),
        })
        .collect()
}

#[tokio::test]
async fn events_published_on_one_replica_reach_the_subscribers_of_another_in_order() {
    let test = TestStream::new();
    let a = test.connect(test.options()).await;
    let b = test.connect(test.options()).await;
    assert_eq!(a.epoch(), b.epoch(), "one stream, one epoch");
    let mut on_b = b.subscribe(None);
    let mut on_a = a.subscribe(None);
    let org = OrgId::new();
    let published = vec![
        run_event(org, RunState::Queued),
        task_run_event(org),
        log_event(org, "hello"),
        run_event(OrgId::DEFAULT, RunState::Succeeded),
    ];
    a.publish(published.clone());
    a.flush().await.unwrap();
    let got = take(&mut on_b, 4).await;
    assert_eq!(events(&got), published);
    assert_eq!(seqs(&got), vec![Some(1), Some(2), Some(3), Some(4)]);
    for delivery in &got {
        let Delivery::Event(envelope) = delivery else {
            unreachable!()
        };
        assert_eq!(envelope.id.epoch, a.epoch());
        let text = envelope.id.to_string();
        assert_eq!(text.parse::<EventId>().unwrap(), envelope.id, "{text}");
    }
    // The publishing replica's own subscribers see the same ids.
    assert_eq!(take(&mut on_a, 4).await, got);
    // And the other way round.
    b.publish(vec![run_event(org, RunState::Running)]);
    assert_eq!(seqs(&take(&mut on_a, 1).await), vec![Some(5)]);
    assert_eq!(seqs(&take(&mut on_b, 1).await), vec![Some(5)]);
    assert_eq!(a.stats().published, 4);
    assert_eq!(a.stats().dropped, 0);
    a.close().await.unwrap();
    b.close().await.unwrap();
    // A closed bus's subscriptions end.
    assert!(tokio::time::timeout(WAIT, on_a.next())
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn resuming_after_an_id_gets_exactly_the_events_after_it() {
    let test = TestStream::new();
    let a = test.connect(test.options()).await;
    let b = test.connect(test.options()).await;
    let org = OrgId::new();
    let published: Vec<BusEvent> = (0..5).map(|_| run_event(org, RunState::Running)).collect();
    a.publish(published.clone());
    a.flush().await.unwrap();
    let after = EventId {
        epoch: a.epoch(),
        seq: 2,
    };
    let mut resumed = b.subscribe(Some(after));
    let got = take(&mut resumed, 3).await;
    assert_eq!(seqs(&got), vec![Some(3), Some(4), Some(5)]);
    assert_eq!(events(&got), published[2..].to_vec());
    // Then live events, with no gap and nothing repeated.
    let next = run_event(org, RunState::Succeeded);
    a.publish(vec![next.clone()]);
    let got = take(&mut resumed, 1).await;
    assert_eq!(seqs(&got), vec![Some(6)]);
    assert_eq!(events(&got), vec![next]);
    // Resuming at the newest event gets only what comes next.
    let mut current = b.subscribe(Some(EventId {
        epoch: a.epoch(),
        seq: 6,
    }));
    a.publish(vec![run_event(org, RunState::Failed)]);
    assert_eq!(seqs(&take(&mut current, 1).await), vec![Some(7)]);
    a.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test]
async fn a_cursor_from_another_epoch_or_ahead_of_the_stream_gets_a_gap_first() {
    let test = TestStream::new();
    let bus = test.connect(test.options()).await;
    let org = OrgId::new();
    bus.publish(vec![
        run_event(org, RunState::Queued),
        run_event(org, RunState::Running),
    ]);
    bus.flush().await.unwrap();
    // As the in-process bus: a gap, then every event still kept.
    let mut other_epoch = bus.subscribe(Some(EventId {
        epoch: bus.epoch() - 1,
        seq: 2,
    }));
    assert_eq!(
        seqs(&take(&mut other_epoch, 3).await),
        vec![None, Some(1), Some(2)]
    );
    // A cursor ahead of the stream: a gap, then live events.
    let mut ahead = bus.subscribe(Some(EventId {
        epoch: bus.epoch(),
        seq: 99,
    }));
    assert_eq!(seqs(&take(&mut ahead, 1).await), vec![None]);
    bus.publish(vec![run_event(org, RunState::Succeeded)]);
    assert_eq!(seqs(&take(&mut ahead, 1).await), vec![Some(3)]);
    assert_eq!(seqs(&take(&mut other_epoch, 1).await), vec![Some(3)]);
    bus.close().await.unwrap();
}

#[tokio::test]
async fn a_cursor_older_than_the_kept_messages_gets_a_gap() {
    let test = TestStream::new();
    let options = NatsBusOptions {
        max_messages: 3,
        ..test.options()
    };
    let bus = test.connect(options).await;
    let org = OrgId::new();
    bus.publish((0..6).map(|_| run_event(org, RunState::Running)).collect());
    bus.flush().await.unwrap();
    assert_eq!(bus.stats().published, 6);
    // Events 1 to 3 were discarded by the limit: a gap, then what is kept.
    let mut old = bus.subscribe(Some(EventId {
        epoch: bus.epoch(),
        seq: 1,
    }));
    assert_eq!(
        seqs(&take(&mut old, 4).await),
        vec![None, Some(4), Some(5), Some(6)]
    );
    // Right before the oldest kept one: no gap.
    let mut edge = bus.subscribe(Some(EventId {
        epoch: bus.epoch(),
        seq: 3,
    }));
    assert_eq!(
        seqs(&take(&mut edge, 3).await),
        vec![Some(4), Some(5), Some(6)]
    );
    bus.close().await.unwrap();
}

/// `#[tokio::test]` runs on one thread: while the test publishes without awaiting, the
/// background publisher cannot run at all — the slowest possible NATS. Publishing must still
/// return at once, dropping and counting what does not fit the queue.
#[tokio::test]
async fn publish_never_blocks_when_the_publisher_cannot_keep_up_and_counts_drops() {
    let test = TestStream::new();
    let options = NatsBusOptions {
        publish_queue: 4,
        ..test.options()
    };
    let bus = test.connect(options).await;
    let org = OrgId::new();
    let started = Instant::now();
    for _ in 0..1000 {
        bus.publish(vec![run_event(org, RunState::Running)]);
    }
    bus.publish((0..1000).map(|_| log_event(org, "x")).collect());
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(2),
        "publishing 2000 events took {elapsed:?}"
    );
    assert_eq!(bus.stats().dropped, 1996);
    bus.flush().await.unwrap();
    assert_eq!(bus.stats().published, 4);
    assert_eq!(bus.stats().failed, 0);
    // What got in is on the stream, in order.
    let mut all = bus.subscribe(Some(EventId {
        epoch: bus.epoch(),
        seq: 0,
    }));
    assert_eq!(
        seqs(&take(&mut all, 4).await),
        vec![Some(1), Some(2), Some(3), Some(4)]
    );
    // Once the queue drains, publishing works again.
    bus.publish(vec![run_event(org, RunState::Succeeded)]);
    bus.flush().await.unwrap();
    assert_eq!(seqs(&take(&mut all, 1).await), vec![Some(5)]);
    assert_eq!(bus.stats().dropped, 1996);
    // A closed bus drops too, without blocking.
    bus.close().await.unwrap();
    bus.publish(vec![run_event(org, RunState::Succeeded)]);
    assert_eq!(bus.stats().dropped, 1997);
}

#[tokio::test]
async fn events_are_published_on_per_org_subjects() {
    let test = TestStream::new();
    let bus = test.connect(test.options()).await;
    let (org1, org2) = (OrgId::new(), OrgId::new());
    let published = [
        run_event(org1, RunState::Running),
        task_run_event(org2),
        log_event(org1, "line"),
    ];
    bus.publish(published.to_vec());
    bus.flush().await.unwrap();
    let stream = bus.jetstream().get_stream(&test.name).await.unwrap();
    let mut subjects = Vec::new();
    for seq in 1..=3 {
        let message = stream.get_raw_message(seq).await.unwrap();
        subjects.push(message.subject.to_string());
    }
    assert_eq!(
        subjects,
        vec![
            format!("{}.{org1}.run", test.prefix),
            format!("{}.{org2}.task_run", test.prefix),
            format!("{}.{org1}.log", test.prefix),
        ]
    );
    for (event, subject) in published.iter().zip(&subjects) {
        assert_eq!(
            &arches_bus_nats::subject_for(bus.subject_prefix(), event),
            subject
        );
    }
    bus.close().await.unwrap();
}

#[tokio::test]
async fn undecodable_messages_are_skipped() {
    let test = TestStream::new();
    let bus = test.connect(test.options()).await;
    let mut live = bus.subscribe(None);
    let org = OrgId::new();
    bus.jetstream()
        .publish(format!("{}.{org}.run", test.prefix), "not json".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let good = run_event(org, RunState::Running);
    bus.publish(vec![good.clone()]);
    let got = take(&mut live, 1).await;
    assert_eq!(seqs(&got), vec![Some(2)]);
    assert_eq!(events(&got), vec![good]);
    bus.close().await.unwrap();
}

#[tokio::test]
async fn a_recreated_stream_gives_live_and_resuming_subscribers_a_gap() {
    let test = TestStream::new();
    let options = NatsBusOptions {
        stream_check_interval: Duration::from_millis(100),
        ..test.options()
    };
    let bus = test.connect(options).await;
    let old_epoch = bus.epoch();
    let mut live = bus.subscribe(None);
    let org = OrgId::new();
    bus.publish(vec![
        run_event(org, RunState::Queued),
        run_event(org, RunState::Running),
    ]);
    assert_eq!(seqs(&take(&mut live, 2).await), vec![Some(1), Some(2)]);
    let mut resumed = bus.subscribe(Some(EventId {
        epoch: old_epoch,
        seq: 1,
    }));
    assert_eq!(seqs(&take(&mut resumed, 1).await), vec![Some(2)]);
    // Someone deletes the stream: the bus recreates it (a new epoch), and both
    // subscriptions learn that events may have been missed.
    bus.jetstream().delete_stream(&test.name).await.unwrap();
    assert_eq!(seqs(&take(&mut live, 1).await), vec![None]);
    assert_eq!(seqs(&take(&mut resumed, 1).await), vec![None]);
    assert_ne!(bus.epoch(), old_epoch);
    bus.publish(vec![run_event(org, RunState::Succeeded)]);
    for subscription in [&mut live, &mut resumed] {
        let got = take(subscription, 1).await;
        let Delivery::Event(envelope) = &got[0] else {
            panic!("expected an event, got {got:?}")
        };
        assert_eq!(
            envelope.id,
            EventId {
                epoch: bus.epoch(),
                seq: 1
            }
        );
    }
    bus.close().await.unwrap();
}

#[tokio::test]
async fn connecting_to_an_unreachable_server_names_the_url() {
    let options = NatsBusOptions {
        connect_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    // A port on this machine where nothing listens.
    let url = "nats://127.0.0.1:1";
    let error = NatsBus::connect(url, options)
        .await
        .err()
        .expect("an error");
    let text = error.to_string();
    assert!(text.contains(url), "{text}");
}

#[tokio::test]
async fn events_that_cannot_be_published_are_counted_and_flush_returns() {
    let test = TestStream::new();
    // No stream check during the test: the stream stays deleted.
    let options = NatsBusOptions {
        stream_check_interval: Duration::from_secs(3600),
        ..test.options()
    };
    let bus = test.connect(options).await;
    bus.jetstream().delete_stream(&test.name).await.unwrap();
    let org = OrgId::new();
    bus.publish(vec![
        run_event(org, RunState::Queued),
        run_event(org, RunState::Running),
    ]);
    tokio::time::timeout(WAIT, bus.flush())
        .await
        .expect("flush returns once the retries are spent")
        .unwrap();
    let stats = bus.stats();
    assert_eq!((stats.published, stats.failed, stats.dropped), (0, 2, 0));
    bus.close().await.unwrap();
}
