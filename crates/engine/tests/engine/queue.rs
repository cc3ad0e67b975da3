//! The store's task queue with standalone workers, on the PostgreSQL server that
//! `ARCHES_TEST_POSTGRES_URL` names (`.ci/run` and `scripts/test` set it): a scheduler with
//! `Dispatching::TaskQueue` stepped by hand with a manual clock while the test claims,
//! renews, hands back and completes as the workers; then the whole engine with two
//! `QueueWorker`s. Each test has a database of its own, dropped at its end.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arches_core::execution::{AttemptOutcome, RunExecution};
use arches_core::pipeline::Pipeline;
use arches_core::ports::{Store, TaskQueue, Tool, ToolContext, ToolError, ToolRegistry};
use arches_core::records::{Durability, TaskCompletion};
use arches_core::{Clock, ManualClock, RunId, RunState, SystemClock, TaskRunState};
use arches_engine::{
    Command, Dispatching, Engine, EngineOptions, FailPoints, LogWriter, QueueWorker,
    QueueWorkerOptions, Scheduler,
};
use arches_store::{LocalArtifactStore, PgStore};
use async_trait::async_trait;
use serde_json::{json, Value};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::{new_run, pipeline, T0};

const URL_VARIABLE: &str = "ARCHES_TEST_POSTGRES_URL";
const OWNER: &str = "scheduler-a";
const TTL: Duration = Duration::from_secs(10);
/// Bound on waiting for the live engine; far above what the tests need.
const WAIT: Duration = Duration::from_secs(60);

/// A fresh database on the test server, dropped by [`TestDb::drop_database`].
struct TestDb {
    server: PgConnectOptions,
    name: String,
    store: Arc<PgStore>,
}

impl TestDb {
    async fn create() -> TestDb {
        let url = std::env::var(URL_VARIABLE).unwrap_or_else(|_| {
            panic!(
                "{URL_VARIABLE} is not set: these tests need a PostgreSQL server (.ci/run sets it)"
            )
        });
        let server = PgConnectOptions::from_str(&url).expect("a PostgreSQL URL");
        let name = format!("arches_test_{}", uuid::Uuid::now_v7().simple());
        let mut admin = server.connect().await.expect("the test server answers");
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .await
            .expect("create the test database");
        admin.close().await.expect("close");
        let store = PgStore::connect_with(server.clone().database(&name), Durability::Normal)
            .await
            .expect("the store connects and migrates");
        TestDb {
            server,
            name,
            store: Arc::new(store),
        }
    }

    async fn drop_database(self) {
        self.store.close().await;
        let mut admin = self
            .server
            .connect()
            .await
            .expect("the test server answers");
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            self.name
        ))
        .execute(&mut admin)
        .await
        .expect("drop the test database");
    }
}

/// A scheduler on the task queue, stepped by hand.
struct QueueHarness {
    db: TestDb,
    clock: Arc<ManualClock>,
    scheduler: Scheduler,
    options: EngineOptions,
}

impl QueueHarness {
    async fn new() -> Self {
        let db = TestDb::create().await;
        let clock = Arc::new(ManualClock::new(T0));
        let mut options = EngineOptions::new(std::env::temp_dir().join("arches-queue-tests"));
        options.worker_id = OWNER.into();
        options.worker_slots = 8;
        options.dispatching = Dispatching::TaskQueue;
        let (scheduler, _dispatches) = Scheduler::new(
            options.clone(),
            db.store.clone(),
            clock.clone(),
            FailPoints::default(),
        );
        QueueHarness {
            db,
            clock,
            scheduler,
            options,
        }
    }

    fn queue(&self) -> &PgStore {
        &self.db.store
    }

    async fn step(&mut self) {
        self.scheduler.step().await.expect("the step commits");
    }

    async fn submit(&mut self, execution: RunExecution) -> RunId {
        let (reply, mut answer) = oneshot::channel();
        self.scheduler
            .handle()
            .send(Command::Submit {
                execution: Box::new(execution),
                reply,
            })
            .await
            .expect("the scheduler takes commands");
        self.step().await;
        answer
            .try_recv()
            .expect("answered")
            .expect("the submit succeeds")
    }

    /// Takes the stored completions as the feeder does and applies them, one step each.
    async fn apply_completions(&mut self) -> usize {
        let taken = self
            .queue()
            .take_completions(OWNER, 100)
            .await
            .expect("completions are taken");
        let count = taken.len();
        for completion in taken {
            self.scheduler
                .handle()
                .send(Command::from_queued(completion))
                .await
                .expect("the scheduler takes commands");
            self.step().await;
        }
        count
    }

    /// The run as a restarted process reads it from the store.
    async fn restore(&self, run_id: RunId, pipeline: &Pipeline) -> RunExecution {
        let store = &self.db.store;
        RunExecution::restore(
            store.run(run_id).await.unwrap().unwrap(),
            pipeline.clone(),
            Arc::new(arches_core::pipeline::Templates::new()),
            arches_core::execution::ExecutionLimits::default(),
            store.task_runs(run_id).await.unwrap(),
            store.attempts(run_id).await.unwrap(),
        )
    }

    async fn pending_completions(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM task_completions")
            .fetch_one(self.db.store.pool())
            .await
            .expect("count completions")
    }

    async fn offers(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM task_queue")
            .fetch_one(self.db.store.pool())
            .await
            .expect("count offers")
    }
}

fn single(worker_tags: &[&str]) -> Pipeline {
    pipeline(json!({
        "name": "single",
        "tasks": [{"id": "a", "tool": "echo", "with": {"x": 1}, "worker_tags": worker_tags}],
    }))
}

/// Two independent `echo` tasks.
fn pair() -> Pipeline {
    pipeline(json!({
        "name": "pair",
        "tasks": [
            {"id": "a", "tool": "echo", "with": {"n": 1}},
            {"id": "b", "tool": "echo", "with": {"n": 2}},
        ],
    }))
}

fn succeeded(outputs: Value) -> AttemptOutcome {
    AttemptOutcome::Succeeded(outputs)
}

fn completion(
    task_run: arches_core::TaskRunId,
    claim: u64,
    worker: &str,
    at: arches_core::Timestamp,
    outputs: Value,
) -> TaskCompletion {
    TaskCompletion {
        task_run_id: task_run,
        claim,
        worker: worker.into(),
        outcome: succeeded(outputs),
        executed_at: at,
        finished_at: at,
    }
}

#[tokio::test]
async fn an_expired_claim_is_taken_over_and_the_late_completion_of_the_first_worker_is_refused() {
    let mut h = QueueHarness::new().await;
    let run_id = h
        .submit(new_run(&single(&[]), json!({}), h.clock.now()))
        .await;
    assert_eq!(
        h.offers().await,
        1,
        "the lease is offered in the commit that records it"
    );
    assert_eq!(h.scheduler.in_flight(), 1);

    let now = h.clock.now();
    let first = h.queue().claim("worker-a", &[], 4, now, TTL).await.unwrap();
    assert_eq!(first.tasks.len(), 1);
    let held = &first.tasks[0];
    assert_eq!(held.claim, 1);
    assert_eq!(held.assignment.inputs, json!({"x": 1}));
    let task_run = held.assignment.task_run_id;

    // Held: another worker gets nothing, and learns when the claim expires.
    let other = h.queue().claim("worker-b", &[], 4, now, TTL).await.unwrap();
    assert!(other.tasks.is_empty());
    assert_eq!(other.next_expiry, Some(now.plus(TTL)));
    assert_eq!(
        h.queue()
            .renew("worker-a", &[(task_run, 1)], now, TTL)
            .await
            .unwrap(),
        vec![task_run]
    );

    // Worker A stops (SIGSTOP) past its claim; B takes the offer over with a higher token.
    h.clock.advance(TTL + TTL);
    let later = h.clock.now();
    let taken_over = h
        .queue()
        .claim("worker-b", &[], 4, later, TTL)
        .await
        .unwrap();
    assert_eq!(taken_over.tasks.len(), 1);
    assert_eq!(taken_over.tasks[0].claim, 2);
    assert_eq!(
        taken_over.tasks[0].expiries, 1,
        "the take-over counts one expired claim"
    );
    assert!(
        h.queue()
            .renew("worker-a", &[(task_run, 1)], later, TTL)
            .await
            .unwrap()
            .is_empty(),
        "A's renewal finds its claim lost"
    );
    // A resumes and reports late: refused, nothing stored.
    assert!(!h
        .queue()
        .complete(&completion(
            task_run,
            1,
            "worker-a",
            later,
            json!({"by": "a"})
        ))
        .await
        .unwrap());
    assert_eq!(h.pending_completions().await, 0);
    assert!(h
        .queue()
        .complete(&completion(
            task_run,
            2,
            "worker-b",
            later,
            json!({"by": "b"})
        ))
        .await
        .unwrap());
    // A retry of an accepted completion is refused too (the offer is gone).
    assert!(!h
        .queue()
        .complete(&completion(
            task_run,
            2,
            "worker-b",
            later,
            json!({"by": "b"})
        ))
        .await
        .unwrap());

    assert_eq!(h.apply_completions().await, 1);
    let run = h.db.store.run(run_id).await.unwrap().unwrap();
    assert_eq!(run.state, RunState::Succeeded);
    let task_runs = h.db.store.task_runs(run_id).await.unwrap();
    assert_eq!(task_runs[0].outputs, Some(json!({"by": "b"})));
    assert_eq!(
        task_runs[0].attempt, 1,
        "the take-over is the same attempt of the scheduler"
    );
    let attempts = h.db.store.attempts(run_id).await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(
        attempts[0].worker, "worker-b",
        "the attempt names the worker that ran it"
    );
    assert_eq!(
        h.pending_completions().await,
        0,
        "applied completions are deleted with the commit"
    );
    assert_eq!(h.offers().await, 0);
    assert_eq!(h.scheduler.in_flight(), 0);
    h.db.drop_database().await;
}

#[tokio::test]
async fn workers_claim_only_offers_whose_tags_they_have_and_claims_are_exclusive() {
    let mut h = QueueHarness::new().await;
    let gpu = h
        .submit(new_run(&single(&["gpu"]), json!({}), h.clock.now()))
        .await;
    let any = h
        .submit(new_run(&single(&[]), json!({}), h.clock.now()))
        .await;
    let now = h.clock.now();

    let plain = h.queue().claim("plain", &[], 10, now, TTL).await.unwrap();
    assert_eq!(plain.tasks.len(), 1);
    assert_eq!(plain.tasks[0].assignment.run_id, any);
    // The gpu offer is not the plain worker's to take over later either.
    assert_eq!(plain.next_expiry, None);

    let tags = vec!["python".to_owned(), "gpu".to_owned()];
    let gpu_worker = h
        .queue()
        .claim("gpu-box", &tags, 10, now, TTL)
        .await
        .unwrap();
    assert_eq!(gpu_worker.tasks.len(), 1);
    assert_eq!(gpu_worker.tasks[0].assignment.run_id, gpu);

    // Nothing is left: two workers never hold the same offer.
    assert!(h
        .queue()
        .claim("third", &tags, 10, now, TTL)
        .await
        .unwrap()
        .tasks
        .is_empty());
    h.db.drop_database().await;
}

#[tokio::test]
async fn a_claim_handed_back_is_claimable_at_once_and_its_old_token_is_void() {
    let mut h = QueueHarness::new().await;
    h.submit(new_run(&single(&[]), json!({}), h.clock.now()))
        .await;
    let now = h.clock.now();
    let held = h
        .queue()
        .claim("leaving", &[], 1, now, TTL)
        .await
        .unwrap()
        .tasks;
    let task_run = held[0].assignment.task_run_id;
    assert_eq!(
        h.queue()
            .release("leaving", &[(task_run, held[0].claim)])
            .await
            .unwrap(),
        1
    );
    let again = h
        .queue()
        .claim("staying", &[], 1, now, TTL)
        .await
        .unwrap()
        .tasks;
    assert_eq!(
        again.len(),
        1,
        "handed back, it does not wait for the claim to expire"
    );
    assert!(again[0].claim > held[0].claim);
    assert_eq!(again[0].expiries, 0, "a hand-back is not an expiry");
    assert!(!h
        .queue()
        .complete(&completion(
            task_run,
            held[0].claim,
            "leaving",
            now,
            json!({})
        ))
        .await
        .unwrap());
    h.db.drop_database().await;
}

#[tokio::test]
async fn a_cancel_withdraws_the_offers_and_the_holders_learn_it_at_their_next_renewal() {
    let mut h = QueueHarness::new().await;
    let run_id = h
        .submit(new_run(&single(&[]), json!({}), h.clock.now()))
        .await;
    let now = h.clock.now();
    let held = h.queue().claim("w", &[], 1, now, TTL).await.unwrap().tasks;
    let (reply, mut answer) = oneshot::channel();
    h.scheduler
        .handle()
        .send(Command::Cancel {
            run_id,
            reason: "no longer needed".into(),
            reply,
        })
        .await
        .unwrap();
    h.step().await;
    answer.try_recv().unwrap().unwrap();
    assert_eq!(h.offers().await, 0);
    assert_eq!(h.scheduler.in_flight(), 0);
    let task_run = held[0].assignment.task_run_id;
    assert!(h
        .queue()
        .renew("w", &[(task_run, 1)], now, TTL)
        .await
        .unwrap()
        .is_empty());
    assert!(!h
        .queue()
        .complete(&completion(task_run, 1, "w", now, json!({})))
        .await
        .unwrap());
    assert_eq!(
        h.db.store.run(run_id).await.unwrap().unwrap().state,
        RunState::Cancelled
    );
    h.db.drop_database().await;
}

#[tokio::test]
async fn a_restarted_scheduler_keeps_claims_and_applies_completions_stored_while_it_was_down() {
    let mut h = QueueHarness::new().await;
    let p = pair();
    let run_id = h.submit(new_run(&p, json!({}), h.clock.now())).await;
    let now = h.clock.now();
    let claimed = h.queue().claim("w", &[], 2, now, TTL).await.unwrap().tasks;
    assert_eq!(claimed.len(), 2);
    // One completion is stored and even taken by the old scheduler, which then dies
    // before its commit; the other task is still running on its worker.
    let (done, running) = (&claimed[0], &claimed[1]);
    assert!(h
        .queue()
        .complete(&completion(
            done.assignment.task_run_id,
            done.claim,
            "w",
            now,
            json!({"done": 1})
        ))
        .await
        .unwrap());
    assert_eq!(
        h.queue().take_completions(OWNER, 10).await.unwrap().len(),
        1
    );

    // The new scheduler (same owner name) resumes the run from the store.
    let (scheduler, _dispatches) = Scheduler::new(
        h.options.clone(),
        h.db.store.clone(),
        h.clock.clone(),
        FailPoints::default(),
    );
    h.scheduler = scheduler;
    let execution = h.restore(run_id, &p).await;
    let (reply, mut answer) = oneshot::channel();
    h.scheduler
        .handle()
        .send(Command::Resume {
            execution: Box::new(execution),
            reply,
        })
        .await
        .unwrap();
    h.step().await;
    answer.try_recv().unwrap().unwrap();
    assert_eq!(h.scheduler.in_flight(), 2, "both leases are still out");
    assert_eq!(
        h.offers().await,
        1,
        "no offer is made again for a stored completion"
    );
    assert_eq!(
        h.queue()
            .renew(
                "w",
                &[(running.assignment.task_run_id, running.claim)],
                now,
                TTL
            )
            .await
            .unwrap()
            .len(),
        1,
        "the running task's claim survived the restart"
    );

    assert_eq!(h.queue().untake_completions(OWNER).await.unwrap(), 1);
    assert_eq!(h.apply_completions().await, 1);
    assert!(h
        .queue()
        .complete(&completion(
            running.assignment.task_run_id,
            running.claim,
            "w",
            now,
            json!({"done": 2})
        ))
        .await
        .unwrap());
    assert_eq!(h.apply_completions().await, 1);
    let run = h.db.store.run(run_id).await.unwrap().unwrap();
    assert_eq!(run.state, RunState::Succeeded);
    let task_runs = h.db.store.task_runs(run_id).await.unwrap();
    assert!(task_runs
        .iter()
        .all(|t| t.state == TaskRunState::Succeeded && t.attempt == 1));
    h.db.drop_database().await;
}

/// Counts executions per task run.
struct Counting {
    name: &'static str,
    seen: Mutex<HashMap<String, u32>>,
}

#[async_trait]
impl Tool for Counting {
    fn name(&self) -> &str {
        self.name
    }
    fn description(&self) -> &str {
        "counts its executions"
    }
    fn input_schema(&self) -> Value {
        json!({"type": "object"})
    }
    async fn execute(&self, context: ToolContext, inputs: Value) -> Result<Value, ToolError> {
        *self
            .seen
            .lock()
            .unwrap()
            .entry(context.task_run_id.to_string())
            .or_default() += 1;
        Ok(json!({"item": context.item, "inputs": inputs}))
    }
}

#[tokio::test]
async fn an_engine_on_the_queue_runs_a_fan_out_on_two_standalone_workers() {
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = db.store.clone();
    let queue: Arc<dyn TaskQueue> = db.store.clone();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let items: Vec<u32> = (0..300).collect();
    let p = pipeline(json!({
        "name": "fan",
        "tasks": [
            {"id": "each", "tool": "count", "for_each": items, "with": {"k": "v"}},
            {"id": "after", "tool": "count", "depends_on": ["each"]},
        ],
    }));
    let mut options = EngineOptions::new(dir.path().join("work"));
    options.worker_id = OWNER.into();
    options.worker_slots = 64;
    let engine = Engine::build_on_queue(options, store.clone(), queue.clone(), clock.clone(), None);
    let handle = engine.handle();
    handle.mark_recovered();
    let shutdown = CancellationToken::new();
    let engine_task = tokio::spawn(engine.run(shutdown.clone()));

    let counting = Arc::new(Counting {
        name: "count",
        seen: Mutex::new(HashMap::new()),
    });
    let artifacts =
        Arc::new(LocalArtifactStore::new(&dir.path().join("artifacts"), db.store.clone()).unwrap());
    let stop_workers = CancellationToken::new();
    let mut workers = Vec::new();
    let mut log_tasks = Vec::new();
    for name in ["w1", "w2"] {
        let mut tools = ToolRegistry::new();
        tools.register(counting.clone());
        let log_writer = LogWriter::new(store.clone(), 1024);
        let mut engine_options = EngineOptions::new(dir.path().join(name));
        engine_options.worker_id = name.into();
        engine_options.worker_slots = 8;
        let worker = QueueWorker::new(
            QueueWorkerOptions::new(engine_options),
            queue.clone(),
            Arc::new(tools),
            artifacts.clone(),
            log_writer.handle(),
            clock.clone(),
        );
        log_tasks.push(tokio::spawn(log_writer.run()));
        workers.push(tokio::spawn(worker.run(stop_workers.clone())));
    }

    let run_id = handle
        .submit(new_run(&p, json!({}), clock.now()))
        .await
        .expect("submitted");
    let run = tokio::time::timeout(WAIT, handle.wait(run_id))
        .await
        .expect("the run finishes in time")
        .expect("the run is watched");
    assert_eq!(run.state, RunState::Succeeded, "{:?}", run.error);

    stop_workers.cancel();
    let mut claimed = 0;
    for worker in workers {
        let report = worker.await.unwrap();
        assert_eq!(report.lost, 0);
        assert_eq!(report.handed_back, 0);
        claimed += report.claimed;
    }
    assert_eq!(claimed, 301, "every task run claimed once");
    let seen = counting.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 301);
    assert!(seen.values().all(|&n| n == 1), "no task ran twice");
    let attempts = store.attempts(run_id).await.unwrap();
    let mut by_worker: HashMap<String, usize> = HashMap::new();
    for attempt in &attempts {
        *by_worker.entry(attempt.worker.clone()).or_default() += 1;
    }
    assert_eq!(attempts.len(), 301);
    assert!(
        by_worker.keys().all(|w| w == "w1" || w == "w2"),
        "attempts name the workers: {by_worker:?}"
    );
    let after = store
        .task_runs(run_id)
        .await
        .unwrap()
        .into_iter()
        .find(|t| t.task_id.as_str() == "each" && t.index.is_none())
        .unwrap();
    assert_eq!(
        after.outputs.as_ref().unwrap().as_array().unwrap().len(),
        300
    );

    shutdown.cancel();
    engine_task.await.unwrap().unwrap();
    drop(handle);
    for task in log_tasks {
        task.await.unwrap();
    }
    db.drop_database().await;
}

#[tokio::test]
async fn a_task_whose_claims_keep_expiring_is_failed_by_the_next_worker_instead_of_run_again() {
    let mut h = QueueHarness::new().await;
    let run_id = h
        .submit(new_run(&single(&[]), json!({}), h.clock.now()))
        .await;
    // Five workers died holding it.
    sqlx::query("UPDATE task_queue SET expiries = 5")
        .execute(h.db.store.pool())
        .await
        .unwrap();
    let mut completions = h
        .queue()
        .listen(arches_core::ports::QueueTopic::Completions(OWNER.into()))
        .await
        .unwrap();
    let counting = Arc::new(Counting {
        name: "echo",
        seen: Mutex::new(HashMap::new()),
    });
    let mut tools = ToolRegistry::new();
    tools.register(counting.clone());
    let store: Arc<dyn Store> = h.db.store.clone();
    let log_writer = LogWriter::new(store.clone(), 64);
    let dir = tempfile::tempdir().unwrap();
    let mut engine_options = EngineOptions::new(dir.path().join("work"));
    engine_options.worker_id = "sixth".into();
    let worker = QueueWorker::new(
        QueueWorkerOptions::new(engine_options),
        h.db.store.clone(),
        Arc::new(tools),
        Arc::new(
            LocalArtifactStore::new(&dir.path().join("artifacts"), h.db.store.clone()).unwrap(),
        ),
        log_writer.handle(),
        Arc::new(SystemClock),
    );
    let stop = CancellationToken::new();
    let worker = tokio::spawn(worker.run(stop.clone()));
    tokio::time::timeout(WAIT, completions.next())
        .await
        .expect("the worker reports")
        .unwrap();
    assert_eq!(h.apply_completions().await, 1);
    stop.cancel();
    tokio::time::timeout(WAIT, worker)
        .await
        .expect("the stopped worker ends")
        .unwrap();
    let run = h.db.store.run(run_id).await.unwrap().unwrap();
    assert_eq!(run.state, RunState::Failed);
    let task_run = &h.db.store.task_runs(run_id).await.unwrap()[0];
    assert!(
        task_run
            .error
            .as_deref()
            .is_some_and(|e| e.contains("the task may be crashing its worker")),
        "{:?}",
        task_run.error
    );
    assert!(
        counting.seen.lock().unwrap().is_empty(),
        "the tool never ran"
    );
    h.db.drop_database().await;
}

#[tokio::test]
async fn a_restarted_scheduler_takes_no_completion_before_its_runs_are_resumed() {
    let mut h = QueueHarness::new().await;
    let p = pair();
    let run_id = h.submit(new_run(&p, json!({}), h.clock.now())).await;
    let now = h.clock.now();
    let claimed = h.queue().claim("w", &[], 2, now, TTL).await.unwrap().tasks;
    let (done, running) = (&claimed[0], &claimed[1]);
    // While the scheduler is down, a worker stores a's result.
    assert!(h
        .queue()
        .complete(&completion(
            done.assignment.task_run_id,
            done.claim,
            "w",
            now,
            json!({"done": 1})
        ))
        .await
        .unwrap());

    // The new scheduler runs with its feeder at once, and resumes the run only after
    // reading it from the store: the feeder must wait for that.
    let (scheduler, _dispatches) = Scheduler::new(
        h.options.clone(),
        h.db.store.clone(),
        h.clock.clone(),
        FailPoints::default(),
    );
    let handle = scheduler.handle();
    let shutdown = CancellationToken::new();
    let feeder = arches_engine::CompletionFeeder::new(
        h.db.store.clone(),
        OWNER.into(),
        handle.clone(),
        Duration::from_secs(60),
        100,
    );
    let feeder = tokio::spawn(feeder.run(shutdown.clone()));
    let scheduler = tokio::spawn(scheduler.run(shutdown.clone()));
    let execution = h.restore(run_id, &p).await;
    handle.resume(execution).await.unwrap();
    handle.mark_recovered();
    assert!(h
        .queue()
        .complete(&completion(
            running.assignment.task_run_id,
            running.claim,
            "w",
            now,
            json!({"done": 2})
        ))
        .await
        .unwrap());
    let run = tokio::time::timeout(WAIT, handle.wait(run_id))
        .await
        .expect("the run finishes")
        .unwrap();
    assert_eq!(run.state, RunState::Succeeded);
    assert_eq!(
        h.db.store.attempts(run_id).await.unwrap().len(),
        2,
        "each task ran once"
    );
    assert_eq!(h.pending_completions().await, 0);
    assert_eq!(h.offers().await, 0);
    shutdown.cancel();
    scheduler.await.unwrap().unwrap();
    feeder.await.unwrap();
    h.db.drop_database().await;
}

#[tokio::test]
async fn an_offer_whose_task_run_moved_on_without_the_queue_is_never_run_and_is_cleared() {
    let mut h = QueueHarness::new().await;
    let p = single(&[]);
    let run_id = h.submit(new_run(&p, json!({}), h.clock.now())).await;
    assert_eq!(h.offers().await, 1);
    // A process that does not use the queue cancels the run in the store (an older CLI,
    // or a resume with in-process workers re-leasing it), leaving the offer behind.
    let mut execution = h.restore(run_id, &p).await;
    execution.cancel(h.clock.now(), "elsewhere");
    let changes = execution.take_changes();
    h.db.store
        .commit(&arches_core::records::WriteBatch {
            runs: changes.run.into_iter().collect(),
            task_runs: changes.task_runs,
            attempts: changes.attempts,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(h.offers().await, 1, "left behind");
    let claimed = h
        .queue()
        .claim("w", &[], 4, h.clock.now(), TTL)
        .await
        .unwrap();
    assert!(claimed.tasks.is_empty(), "a cancelled task run is not run");
    assert_eq!(h.offers().await, 0, "and its offer is cleared");
    h.db.drop_database().await;
}

#[tokio::test]
async fn completions_stored_in_one_batch_are_each_fenced_by_their_own_claim() {
    let mut h = QueueHarness::new().await;
    let p = pipeline(json!({
        "name": "trio",
        "tasks": [
            {"id": "a", "tool": "echo"},
            {"id": "b", "tool": "echo"},
            {"id": "c", "tool": "echo"},
        ],
    }));
    let run_id = h.submit(new_run(&p, json!({}), h.clock.now())).await;
    let now = h.clock.now();
    let claimed = h.queue().claim("w", &[], 3, now, TTL).await.unwrap().tasks;
    assert_eq!(claimed.len(), 3);
    let report = |i: usize, claim: u64| {
        completion(
            claimed[i].assignment.task_run_id,
            claim,
            "w",
            now,
            json!({"i": i}),
        )
    };
    let stored = h
        .queue()
        .complete_many(&[
            report(0, claimed[0].claim),
            report(1, claimed[1].claim + 7),
            report(2, claimed[2].claim),
            report(0, claimed[0].claim),
        ])
        .await
        .unwrap();
    assert_eq!(
        stored,
        vec![true, false, true, false],
        "a stale claim and a second report of one lease are not stored"
    );
    assert_eq!(h.pending_completions().await, 2);
    assert_eq!(h.offers().await, 1, "b's offer is still held");
    let stored = h
        .queue()
        .complete_many(&[report(1, claimed[1].claim)])
        .await
        .unwrap();
    assert_eq!(stored, vec![true]);
    assert_eq!(h.apply_completions().await, 3);
    assert_eq!(
        h.db.store.run(run_id).await.unwrap().unwrap().state,
        RunState::Succeeded
    );
    h.db.drop_database().await;
}
