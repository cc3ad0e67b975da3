//! Tests of the engine: the scheduler driven step by step with a manual clock (the test acts
//! as the worker), and the whole engine with its worker pool and real tools. Every test uses a
//! real SQLite file in its own temporary directory.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arches_core::execution::{Assignment, AttemptOutcome, ExecutionLimits, NewRun, RunExecution};
use arches_core::pipeline::{Pipeline, PipelineDef, Templates};
use arches_core::ports::{Store, Tool, ToolContext, ToolError, ToolRegistry};
use arches_core::records::{AttemptRecord, Durability, RunRecord, TaskRunRecord};
use arches_core::OrgId;
use arches_core::{
    AttemptState, Clock, ManualClock, RunId, RunState, SystemClock, TaskRunId, TaskRunState,
    Timestamp,
};
use arches_engine::{
    Command, Dispatch, Engine, EngineOptions, Error, FailPoints, Scheduler, SchedulerHandle,
    StepReport,
};
use arches_store::{LocalArtifactStore, SqliteStore};
use async_trait::async_trait;
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

#[path = "engine/queue.rs"]
mod queue;
#[path = "engine/reviews.rs"]
mod reviews;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

const T0: Timestamp = Timestamp(1_700_000_000_000_000);
const LEASE_TTL: Duration = Duration::from_secs(30);

fn pipeline(definition: Value) -> Pipeline {
    let def: PipelineDef = serde_json::from_value(definition).expect("a valid pipeline definition");
    Pipeline::build(def).expect("a valid DAG")
}

fn new_run(pipeline: &Pipeline, params: Value, now: Timestamp) -> RunExecution {
    RunExecution::create(
        NewRun {
            id: RunId::new(),
            org_id: OrgId::DEFAULT,
            pipeline_version: 1,
            params,
        },
        pipeline.clone(),
        Arc::new(Templates::new()),
        ExecutionLimits::default(),
        now,
    )
}

fn ok(outputs: Value) -> AttemptOutcome {
    AttemptOutcome::Succeeded(outputs)
}

fn retryable(message: &str) -> AttemptOutcome {
    AttemptOutcome::Failed {
        message: message.into(),
        retryable: true,
    }
}

fn permanent(message: &str) -> AttemptOutcome {
    AttemptOutcome::Failed {
        message: message.into(),
        retryable: false,
    }
}

/// The task ids leased by a step, sorted.
fn leased(report: &StepReport) -> Vec<String> {
    let mut ids: Vec<String> = report
        .assignments
        .iter()
        .map(|a| a.task_id.to_string())
        .collect();
    ids.sort();
    ids
}

fn assignment<'a>(report: &'a StepReport, task: &str) -> &'a Assignment {
    report
        .assignments
        .iter()
        .find(|a| a.task_id.as_str() == task)
        .unwrap_or_else(|| panic!("task {task} was not leased; leased: {:?}", leased(report)))
}

/// A scheduler on a real SQLite file, a manual clock, and the dispatch receiver the test
/// reads as the worker.
struct Harness {
    dir: TempDir,
    store: Arc<SqliteStore>,
    clock: Arc<ManualClock>,
    failpoints: FailPoints,
    options: EngineOptions,
    scheduler: Scheduler,
    dispatches: mpsc::UnboundedReceiver<Dispatch>,
}

impl Harness {
    async fn new() -> Self {
        Self::with_slots(8).await
    }

    async fn with_slots(worker_slots: usize) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = Arc::new(
            SqliteStore::open(&dir.path().join("arches.db"), Durability::Normal)
                .await
                .expect("the store opens"),
        );
        let clock = Arc::new(ManualClock::new(T0));
        let mut options = EngineOptions::new(dir.path().join("work"));
        options.worker_id = "test-worker".into();
        options.worker_slots = worker_slots;
        options.lease_ttl = LEASE_TTL;
        let failpoints = FailPoints::default();
        let (scheduler, dispatches) = Scheduler::new(
            options.clone(),
            store.clone(),
            clock.clone(),
            failpoints.clone(),
        );
        Harness {
            dir,
            store,
            clock,
            failpoints,
            options,
            scheduler,
            dispatches,
        }
    }

    fn db_path(&self) -> PathBuf {
        self.dir.path().join("arches.db")
    }

    fn now(&self) -> Timestamp {
        self.clock.now()
    }

    async fn step(&mut self) -> StepReport {
        self.scheduler.step().await.expect("the step commits")
    }

    async fn send(&self, command: Command) {
        self.scheduler
            .handle()
            .send(command)
            .await
            .expect("the scheduler takes commands");
    }

    /// Submits a run and steps once; the submit is answered by that step.
    async fn submit(&mut self, pipeline: &Pipeline, params: Value) -> (RunId, StepReport) {
        let execution = new_run(pipeline, params, self.now());
        let (reply, mut answer) = oneshot::channel();
        self.send(Command::Submit {
            execution: Box::new(execution),
            reply,
        })
        .await;
        let report = self.step().await;
        let run_id = answer
            .try_recv()
            .expect("the step answers the submit")
            .expect("the submit succeeds");
        assert_eq!(report.commands, 1);
        (run_id, report)
    }

    /// Reports an attempt's outcome as the worker holding `assignment`, and steps once.
    async fn complete(&mut self, assignment: &Assignment, outcome: AttemptOutcome) -> StepReport {
        self.send_completion(assignment, outcome).await;
        self.step().await
    }

    async fn send_completion(&self, assignment: &Assignment, outcome: AttemptOutcome) {
        let now = self.now();
        self.send(Command::Completed {
            run_id: assignment.run_id,
            task_run_id: assignment.task_run_id,
            fencing_token: assignment.fencing_token,
            outcome,
            executed_at: now,
            finished_at: now,
            queued: None,
        })
        .await;
    }

    async fn heartbeat(&mut self, assignment: &Assignment) -> StepReport {
        self.send(Command::Heartbeat {
            run_id: assignment.run_id,
            task_run_id: assignment.task_run_id,
            fencing_token: assignment.fencing_token,
        })
        .await;
        self.step().await
    }

    /// Everything dispatched since the last call.
    fn dispatched(&mut self) -> Vec<Dispatch> {
        let mut out = Vec::new();
        while let Ok(dispatch) = self.dispatches.try_recv() {
            out.push(dispatch);
        }
        out
    }

    /// Stops dispatched since the last call (leases dispatched are dropped).
    fn stops(&mut self) -> Vec<(TaskRunId, u64)> {
        self.dispatched()
            .into_iter()
            .filter_map(|d| match d {
                Dispatch::Stop(id, token) => Some((id, token)),
                Dispatch::Run(_) => None,
            })
            .collect()
    }

    async fn stored_run(&self, run_id: RunId) -> RunRecord {
        self.store
            .run(run_id)
            .await
            .expect("the store reads")
            .expect("the run is stored")
    }

    async fn stored_task_runs(&self, run_id: RunId) -> Vec<TaskRunRecord> {
        self.store.task_runs(run_id).await.expect("the store reads")
    }

    /// The stored task run of a task (the parent, for a fan-out).
    async fn stored_task(&self, run_id: RunId, task: &str) -> TaskRunRecord {
        self.stored_task_runs(run_id)
            .await
            .into_iter()
            .find(|t| t.task_id.as_str() == task && t.index.is_none())
            .unwrap_or_else(|| panic!("task {task} has no stored task run"))
    }

    /// The stored states of the tasks (fan-out parents, not items), by task id.
    async fn stored_states(&self, run_id: RunId) -> BTreeMap<String, TaskRunState> {
        self.stored_task_runs(run_id)
            .await
            .into_iter()
            .filter(|t| t.index.is_none())
            .map(|t| (t.task_id.to_string(), t.state))
            .collect()
    }

    async fn stored_attempts(&self, run_id: RunId, task_run_id: TaskRunId) -> Vec<AttemptRecord> {
        self.store
            .attempts(run_id)
            .await
            .expect("the store reads")
            .into_iter()
            .filter(|a| a.task_run_id == task_run_id)
            .collect()
    }

    async fn attempt_states(&self, run_id: RunId, task_run_id: TaskRunId) -> Vec<AttemptState> {
        self.stored_attempts(run_id, task_run_id)
            .await
            .iter()
            .map(|a| a.state)
            .collect()
    }

    /// The store holds exactly what the scheduler holds in memory for an active run.
    async fn assert_store_matches_memory(&self, run_id: RunId) {
        let execution = self.scheduler.execution(run_id).expect("the run is active");
        let mut memory = execution.task_runs().to_vec();
        memory.sort_by_key(|t| t.id);
        let mut stored = self.stored_task_runs(run_id).await;
        stored.sort_by_key(|t| t.id);
        assert_eq!(stored, memory, "stored task runs differ from memory");
        assert_eq!(
            &self.stored_run(run_id).await,
            execution.run(),
            "stored run differs from memory"
        );
    }

    /// A new process on the same database file: a fresh store connection and scheduler.
    async fn restart(&mut self) {
        let store = Arc::new(
            SqliteStore::open(&self.db_path(), Durability::Normal)
                .await
                .expect("the store reopens"),
        );
        let failpoints = FailPoints::default();
        let (scheduler, dispatches) = Scheduler::new(
            self.options.clone(),
            store.clone(),
            self.clock.clone(),
            failpoints.clone(),
        );
        // Dropping the old scheduler and its receiver is the crash.
        self.scheduler = scheduler;
        self.dispatches = dispatches;
        self.failpoints = failpoints;
        let old = std::mem::replace(&mut self.store, store);
        old.close().await;
    }

    /// Restores a run from the store as a restarted process does, reclaims the leases the
    /// dead process held, and resumes it. Returns the number of reclaimed leases and the
    /// report of the step that applied the resume.
    async fn resume(&mut self, run_id: RunId, pipeline: &Pipeline) -> (usize, StepReport) {
        let run = self.stored_run(run_id).await;
        let task_runs = self.stored_task_runs(run_id).await;
        let attempts = self.store.attempts(run_id).await.expect("the store reads");
        let mut execution = RunExecution::restore(
            run,
            pipeline.clone(),
            Arc::new(Templates::new()),
            ExecutionLimits::default(),
            task_runs,
            attempts,
        );
        let reclaimed = execution.reclaim_leases(self.now());
        let (reply, mut answer) = oneshot::channel();
        self.send(Command::Resume {
            execution: Box::new(execution),
            reply,
        })
        .await;
        let report = self.step().await;
        assert_eq!(
            answer
                .try_recv()
                .expect("the step answers the resume")
                .expect("the resume succeeds"),
            run_id
        );
        (reclaimed, report)
    }
}

// ---------------------------------------------------------------------------------------
// DAG order and the consistency of store and memory
// ---------------------------------------------------------------------------------------

fn diamond() -> Pipeline {
    pipeline(json!({
        "name": "diamond",
        "tasks": [
            {"id": "a", "tool": "echo", "with": {"n": 1}},
            {"id": "b", "tool": "echo", "depends_on": ["a"]},
            {"id": "c", "tool": "echo", "depends_on": ["a"]},
            {"id": "d", "tool": "echo", "depends_on": ["b", "c"], "with": {"sum": "{{ tasks.b.outputs.n + tasks.c.outputs.n }}"}},
        ]
    }))
}

#[tokio::test]
async fn a_diamond_runs_each_task_once_its_dependencies_succeeded_and_the_store_follows_every_step()
{
    let mut h = Harness::new().await;
    let (run_id, report) = h.submit(&diamond(), json!({})).await;
    assert_eq!(leased(&report), ["a"]);
    let a = report.assignments[0].clone();
    assert_eq!((a.attempt, a.fencing_token), (1, 1));
    assert_eq!(a.inputs, json!({"n": 1}));
    h.assert_store_matches_memory(run_id).await;
    assert_eq!(h.stored_run(run_id).await.state, RunState::Running);
    assert_eq!(
        h.stored_states(run_id).await,
        BTreeMap::from([
            ("a".into(), TaskRunState::Running),
            ("b".into(), TaskRunState::Pending),
            ("c".into(), TaskRunState::Pending),
            ("d".into(), TaskRunState::Pending),
        ])
    );

    // a's completion and the readiness of b and c are one commit: the step that records a
    // also queues and leases b and c.
    let report = h.complete(&a, ok(json!({"n": 1}))).await;
    assert_eq!(leased(&report), ["b", "c"]);
    assert_eq!(report.task_runs_written, 3);
    let states = h.stored_states(run_id).await;
    assert_eq!(states["a"], TaskRunState::Succeeded);
    assert_eq!(states["b"], TaskRunState::Running);
    assert_eq!(states["c"], TaskRunState::Running);
    assert_eq!(states["d"], TaskRunState::Pending);
    h.assert_store_matches_memory(run_id).await;
    let b = assignment(&report, "b").clone();
    let c = assignment(&report, "c").clone();
    assert_eq!(
        b.upstream,
        BTreeMap::from([("a".to_owned(), json!({"n": 1}))])
    );

    // d waits for both b and c.
    let report = h.complete(&b, ok(json!({"n": 2}))).await;
    assert!(report.assignments.is_empty(), "d must wait for c");
    assert_eq!(h.stored_states(run_id).await["d"], TaskRunState::Pending);
    h.assert_store_matches_memory(run_id).await;

    let report = h.complete(&c, ok(json!({"n": 3}))).await;
    assert_eq!(leased(&report), ["d"]);
    let d = report.assignments[0].clone();
    assert_eq!(d.inputs, json!({"sum": 5}));
    assert_eq!(d.upstream.keys().collect::<Vec<_>>(), ["b", "c"]);
    h.assert_store_matches_memory(run_id).await;

    h.complete(&d, ok(json!({"done": true}))).await;
    assert!(
        h.scheduler.execution(run_id).is_none(),
        "a finished run leaves the scheduler"
    );
    let run = h.stored_run(run_id).await;
    assert_eq!(run.state, RunState::Succeeded);
    assert_eq!(run.error, None);
    assert!(run.finished_at.is_some());
    let task_runs = h.stored_task_runs(run_id).await;
    assert_eq!(task_runs.len(), 4);
    assert!(task_runs
        .iter()
        .all(|t| t.state == TaskRunState::Succeeded && t.attempt == 1));
    let attempts = h.store.attempts(run_id).await.unwrap();
    assert_eq!(attempts.len(), 4);
    assert!(attempts
        .iter()
        .all(|a| a.state == AttemptState::Succeeded && a.worker == "test-worker"));
    assert_eq!(
        h.stored_task(run_id, "d").await.outputs,
        Some(json!({"done": true}))
    );
}

#[tokio::test]
async fn a_step_with_nothing_to_do_writes_nothing() {
    let mut h = Harness::new().await;
    let report = h.step().await;
    assert!(report.is_idle());
    let (_, _) = h.submit(&diamond(), json!({})).await;
    let report = h.step().await;
    assert!(
        report.is_idle(),
        "nothing is due until the worker reports: {report:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Leases and fencing
// ---------------------------------------------------------------------------------------

fn single(retry: Option<Value>) -> Pipeline {
    let mut task = json!({"id": "work", "tool": "echo"});
    if let Some(retry) = retry {
        task["retry"] = retry;
    }
    pipeline(json!({"name": "single", "tasks": [task]}))
}

#[tokio::test]
async fn a_stale_lease_cannot_complete_a_task() {
    let mut h = Harness::new().await;
    let (run_id, report) = h.submit(&single(None), json!({})).await;
    let first = report.assignments[0].clone();
    assert_eq!(first.lease_expires_at, T0.plus(LEASE_TTL));
    h.dispatched();

    // Nothing happens before the lease runs out.
    h.clock.advance(LEASE_TTL - Duration::from_millis(1));
    assert!(h.step().await.is_idle());

    // The expiry wakeup fires: the task goes back to the queue and is leased again, with a
    // higher fencing token, and the first worker is told to stop.
    h.clock.advance(Duration::from_millis(2));
    let report = h.step().await;
    assert_eq!(report.wakeups, 1);
    let second = assignment(&report, "work").clone();
    assert_eq!(second.task_run_id, first.task_run_id);
    assert_eq!((second.attempt, second.fencing_token), (2, 2));
    assert_eq!(h.stops(), [(first.task_run_id, 1)]);
    h.assert_store_matches_memory(run_id).await;
    let stored = h.stored_task(run_id, "work").await;
    assert_eq!(
        (stored.state, stored.fencing_token, stored.lease_expiries),
        (TaskRunState::Running, 2, 1)
    );

    // The first worker's late completion is rejected: nothing changes.
    let before = h.stored_task(run_id, "work").await;
    let report = h.complete(&first, ok(json!({"from": "first"}))).await;
    assert_eq!(report.task_runs_written, 0);
    assert_eq!(h.stored_task(run_id, "work").await, before);
    h.assert_store_matches_memory(run_id).await;

    // A heartbeat with the stale token is rejected too, and stops the zombie.
    let report = h.heartbeat(&first).await;
    assert_eq!(report.task_runs_written, 0);
    assert_eq!(h.stops(), [(first.task_run_id, 1)]);
    assert_eq!(h.stored_task(run_id, "work").await, before);

    // The second worker's completion wins.
    h.complete(&second, ok(json!({"from": "second"}))).await;
    assert_eq!(h.stored_run(run_id).await.state, RunState::Succeeded);
    let stored = h.stored_task(run_id, "work").await;
    assert_eq!(stored.state, TaskRunState::Succeeded);
    assert_eq!(stored.outputs, Some(json!({"from": "second"})));
    let attempts = h.stored_attempts(run_id, first.task_run_id).await;
    assert_eq!(
        attempts
            .iter()
            .map(|a| (a.attempt, a.fencing_token, a.state))
            .collect::<Vec<_>>(),
        [
            (1, 1, AttemptState::LeaseExpired),
            (2, 2, AttemptState::Succeeded)
        ]
    );
    assert_eq!(attempts[0].error.as_deref(), Some("lease expired"));
}

#[tokio::test]
async fn a_heartbeat_extends_the_lease() {
    let mut h = Harness::new().await;
    let (run_id, report) = h.submit(&single(None), json!({})).await;
    let lease = report.assignments[0].clone();

    h.clock.advance(Duration::from_secs(20));
    let report = h.heartbeat(&lease).await;
    assert_eq!(report.task_runs_written, 1);
    assert_eq!(
        h.stored_task(run_id, "work").await.lease_expires_at,
        Some(h.now().plus(LEASE_TTL))
    );
    h.assert_store_matches_memory(run_id).await;

    // Past the first expiry, before the extended one: the lease holds.
    h.clock.advance(Duration::from_secs(20));
    let report = h.step().await;
    assert!(report.assignments.is_empty());
    assert_eq!(report.task_runs_written, 0);
    assert!(h.stops().is_empty());

    h.complete(&lease, ok(json!({}))).await;
    assert_eq!(h.stored_run(run_id).await.state, RunState::Succeeded);
    assert_eq!(
        h.attempt_states(run_id, lease.task_run_id).await,
        [AttemptState::Succeeded]
    );
}

// ---------------------------------------------------------------------------------------
// Retries and timeouts
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn retries_follow_the_policy_and_wait_for_their_backoff() {
    let mut h = Harness::new().await;
    let retry = json!({"max_attempts": 3, "initial_delay": "1s", "jitter": 0});
    let (run_id, report) = h.submit(&single(Some(retry)), json!({})).await;
    let first = report.assignments[0].clone();

    let report = h.complete(&first, retryable("connection reset")).await;
    assert!(report.assignments.is_empty());
    let stored = h.stored_task(run_id, "work").await;
    assert_eq!(stored.state, TaskRunState::WaitingToRetry);
    assert_eq!(stored.ready_at, Some(T0.plus(Duration::from_secs(1))));
    assert_eq!(stored.error.as_deref(), Some("connection reset"));
    h.assert_store_matches_memory(run_id).await;

    // A step before ready_at does nothing.
    h.clock.advance(Duration::from_millis(999));
    let report = h.step().await;
    assert!(report.is_idle(), "{report:?}");
    assert_eq!(
        h.stored_task(run_id, "work").await.state,
        TaskRunState::WaitingToRetry
    );

    // At ready_at the task is queued and leased again.
    h.clock.advance(Duration::from_millis(1));
    let report = h.step().await;
    assert_eq!(report.wakeups, 1);
    let second = assignment(&report, "work").clone();
    assert_eq!((second.attempt, second.fencing_token), (2, 2));
    h.assert_store_matches_memory(run_id).await;

    // The second delay doubles (multiplier 2).
    h.complete(&second, retryable("connection reset")).await;
    let stored = h.stored_task(run_id, "work").await;
    assert_eq!(stored.state, TaskRunState::WaitingToRetry);
    assert_eq!(stored.ready_at, Some(h.now().plus(Duration::from_secs(2))));
    h.clock.advance(Duration::from_millis(1999));
    assert!(h.step().await.is_idle());
    h.clock.advance(Duration::from_millis(1));
    let report = h.step().await;
    let third = assignment(&report, "work").clone();
    assert_eq!(third.attempt, 3);

    h.complete(&third, ok(json!({"rows": 10}))).await;
    assert_eq!(h.stored_run(run_id).await.state, RunState::Succeeded);
    let stored = h.stored_task(run_id, "work").await;
    assert_eq!((stored.state, stored.attempt), (TaskRunState::Succeeded, 3));
    assert_eq!(stored.error, None);
    assert_eq!(stored.outputs, Some(json!({"rows": 10})));
    let attempts = h.stored_attempts(run_id, first.task_run_id).await;
    assert_eq!(
        attempts
            .iter()
            .map(|a| (a.attempt, a.state))
            .collect::<Vec<_>>(),
        [
            (1, AttemptState::Failed),
            (2, AttemptState::Failed),
            (3, AttemptState::Succeeded)
        ]
    );
    assert_eq!(attempts[0].error.as_deref(), Some("connection reset"));
}

#[tokio::test]
async fn a_non_retryable_failure_fails_the_task_at_once() {
    let mut h = Harness::new().await;
    let retry = json!({"max_attempts": 3, "initial_delay": "1s", "jitter": 0});
    let (run_id, report) = h.submit(&single(Some(retry)), json!({})).await;
    let lease = report.assignments[0].clone();

    let report = h
        .complete(&lease, permanent("syntax error at line 1"))
        .await;
    assert!(report.assignments.is_empty());
    let stored = h.stored_task(run_id, "work").await;
    assert_eq!((stored.state, stored.attempt), (TaskRunState::Failed, 1));
    assert_eq!(stored.error.as_deref(), Some("syntax error at line 1"));
    assert_eq!(
        h.attempt_states(run_id, lease.task_run_id).await,
        [AttemptState::Failed]
    );
    let run = h.stored_run(run_id).await;
    assert_eq!(run.state, RunState::Failed);
    assert_eq!(
        run.error.as_deref(),
        Some("task work failed: syntax error at line 1")
    );
}

#[tokio::test]
async fn exhausting_the_attempts_fails_the_task_skips_its_dependents_and_fails_the_run() {
    let mut h = Harness::new().await;
    let p = pipeline(json!({
        "name": "etl",
        "tasks": [
            {"id": "extract", "tool": "echo", "retry": {"max_attempts": 2, "initial_delay": "1s", "jitter": 0}},
            {"id": "load", "tool": "echo", "depends_on": ["extract"]},
            {"id": "report", "tool": "echo", "depends_on": ["load"]},
        ]
    }));
    let (run_id, report) = h.submit(&p, json!({})).await;
    let first = report.assignments[0].clone();
    h.complete(&first, retryable("timeout talking to the API"))
        .await;
    h.clock.advance(Duration::from_secs(1));
    let report = h.step().await;
    let second = assignment(&report, "extract").clone();
    let report = h
        .complete(&second, retryable("timeout talking to the API"))
        .await;
    assert!(report.assignments.is_empty(), "{:?}", report.assignments);

    let extract = h.stored_task(run_id, "extract").await;
    assert_eq!(extract.state, TaskRunState::Failed);
    assert_eq!(
        extract.error.as_deref(),
        Some("timeout talking to the API (after 2 attempts)")
    );
    let load = h.stored_task(run_id, "load").await;
    assert_eq!(load.state, TaskRunState::Skipped);
    assert_eq!(load.error.as_deref(), Some("upstream task extract failed"));
    let downstream = h.stored_task(run_id, "report").await;
    assert_eq!(downstream.state, TaskRunState::Skipped);
    assert_eq!(
        downstream.error.as_deref(),
        Some("upstream task load skipped")
    );
    assert_eq!(
        h.attempt_states(run_id, first.task_run_id).await,
        [AttemptState::Failed, AttemptState::Failed]
    );
    let run = h.stored_run(run_id).await;
    assert_eq!(run.state, RunState::Failed);
    let error = run.error.expect("a failed run says why");
    assert!(error.contains("task extract failed"), "{error}");
}

#[tokio::test]
async fn a_timed_out_attempt_is_recorded_and_retried_per_policy() {
    let mut h = Harness::new().await;
    let p = pipeline(json!({
        "name": "slow",
        "tasks": [{
            "id": "crunch", "tool": "echo", "timeout": "5s",
            "retry": {"max_attempts": 2, "initial_delay": "1s", "jitter": 0}
        }]
    }));
    let (run_id, report) = h.submit(&p, json!({})).await;
    let first = report.assignments[0].clone();
    assert_eq!(first.timeout, Some(Duration::from_secs(5)));

    h.clock.advance(Duration::from_secs(5));
    let timed_out = AttemptOutcome::TimedOut {
        timeout: Duration::from_secs(5),
    };
    h.complete(&first, timed_out.clone()).await;
    let stored = h.stored_task(run_id, "crunch").await;
    assert_eq!(stored.state, TaskRunState::WaitingToRetry);
    assert_eq!(stored.error.as_deref(), Some("timed out after 5s"));
    let attempts = h.stored_attempts(run_id, first.task_run_id).await;
    assert_eq!(attempts[0].state, AttemptState::TimedOut);
    assert_eq!(attempts[0].error.as_deref(), Some("timed out after 5s"));

    h.clock.advance(Duration::from_secs(1));
    let report = h.step().await;
    let second = assignment(&report, "crunch").clone();
    assert_eq!(second.attempt, 2);
    h.complete(&second, timed_out).await;

    let stored = h.stored_task(run_id, "crunch").await;
    assert_eq!(stored.state, TaskRunState::Failed);
    assert_eq!(
        stored.error.as_deref(),
        Some("timed out after 5s (after 2 attempts)")
    );
    assert_eq!(
        h.attempt_states(run_id, first.task_run_id).await,
        [AttemptState::TimedOut, AttemptState::TimedOut]
    );
    assert_eq!(h.stored_run(run_id).await.state, RunState::Failed);
}

// ---------------------------------------------------------------------------------------
// Cancel
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_cancel_stops_running_tasks_skips_the_rest_and_refuses_late_completions() {
    let mut h = Harness::with_slots(2).await;
    let p = pipeline(json!({
        "name": "cancellable",
        "tasks": [
            {"id": "a", "tool": "echo"},
            {"id": "b", "tool": "echo"},
            {"id": "e", "tool": "echo"},
            {"id": "c", "tool": "echo", "depends_on": ["a"]},
        ]
    }));
    let (run_id, report) = h.submit(&p, json!({})).await;
    assert_eq!(leased(&report), ["a", "b"], "two slots: e stays queued");
    let a = assignment(&report, "a").clone();
    let b = assignment(&report, "b").clone();
    assert_eq!(h.stored_states(run_id).await["e"], TaskRunState::Queued);
    h.dispatched();

    let (reply, mut answer) = oneshot::channel();
    h.send(Command::Cancel {
        run_id,
        reason: "cancelled by alice".into(),
        reply,
    })
    .await;
    let report = h.step().await;
    answer
        .try_recv()
        .expect("the step answers the cancel")
        .expect("the cancel succeeds");
    assert!(report.assignments.is_empty());

    let mut stops = h.stops();
    stops.sort();
    let mut expected = vec![
        (a.task_run_id, a.fencing_token),
        (b.task_run_id, b.fencing_token),
    ];
    expected.sort();
    assert_eq!(stops, expected, "each running attempt is told to stop");

    let run = h.stored_run(run_id).await;
    assert_eq!(run.state, RunState::Cancelled);
    assert_eq!(run.error.as_deref(), Some("cancelled by alice"));
    assert_eq!(
        h.stored_states(run_id).await,
        BTreeMap::from([
            ("a".into(), TaskRunState::Cancelled),
            ("b".into(), TaskRunState::Cancelled),
            ("c".into(), TaskRunState::Skipped),
            ("e".into(), TaskRunState::Skipped),
        ])
    );
    assert_eq!(
        h.attempt_states(run_id, a.task_run_id).await,
        [AttemptState::Cancelled]
    );
    assert_eq!(
        h.attempt_states(run_id, b.task_run_id).await,
        [AttemptState::Cancelled]
    );

    // The cancelled worker reports late: refused, nothing changes.
    let before = h.stored_task_runs(run_id).await;
    let report = h.complete(&a, ok(json!({"late": true}))).await;
    assert_eq!(report.task_runs_written, 0);
    assert_eq!(h.stored_task_runs(run_id).await, before);
    assert_eq!(h.stored_task(run_id, "a").await.outputs, None);
    assert_eq!(h.stored_run(run_id).await.state, RunState::Cancelled);
}

#[tokio::test]
async fn cancelling_a_run_the_scheduler_does_not_drive_is_refused() {
    let mut h = Harness::new().await;
    let (reply, mut answer) = oneshot::channel();
    let run_id = RunId::new();
    h.send(Command::Cancel {
        run_id,
        reason: "nope".into(),
        reply,
    })
    .await;
    h.step().await;
    let answer = answer.try_recv().expect("answered at once");
    assert!(
        matches!(answer, Err(Error::UnknownRun(id)) if id == run_id),
        "{answer:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Fan-out and conditions
// ---------------------------------------------------------------------------------------

fn greet_everyone() -> Pipeline {
    pipeline(json!({
        "name": "greetings",
        "params": {"names": {"type": "array"}},
        "tasks": [
            {"id": "greet", "tool": "echo", "for_each": "{{ params.names }}",
             "with": {"name": "{{ item }}", "position": "{{ index }}"}},
            {"id": "collect", "tool": "echo", "with": {"all": "{{ tasks.greet.outputs }}"}},
        ]
    }))
}

#[tokio::test]
async fn for_each_runs_one_task_run_per_param_item_and_gathers_outputs_in_order() {
    let mut h = Harness::new().await;
    let (run_id, report) = h
        .submit(&greet_everyone(), json!({"names": ["ada", "bob", "cy"]}))
        .await;
    assert_eq!(report.assignments.len(), 3);
    let mut items = report.assignments.clone();
    items.sort_by_key(|a| a.inputs["position"].as_u64());
    assert_eq!(
        items.iter().map(|a| a.inputs.clone()).collect::<Vec<_>>(),
        [
            json!({"name": "ada", "position": 0}),
            json!({"name": "bob", "position": 1}),
            json!({"name": "cy", "position": 2}),
        ]
    );
    assert_eq!(
        items.iter().map(|a| a.item.clone()).collect::<Vec<_>>(),
        [Some(json!("ada")), Some(json!("bob")), Some(json!("cy"))]
    );
    let parent = h.stored_task(run_id, "greet").await;
    assert_eq!(
        (parent.state, parent.fan_out),
        (TaskRunState::Running, Some(3))
    );
    assert_eq!(h.stored_task_runs(run_id).await.len(), 5);
    h.assert_store_matches_memory(run_id).await;

    // Items complete out of order; the outputs keep the list's order.
    for a in items.iter().rev() {
        let name = a.inputs["name"].as_str().unwrap().to_owned();
        let report = h
            .complete(a, ok(json!({"greeting": format!("hi {name}")})))
            .await;
        if a.inputs["position"] != json!(0) {
            assert!(
                report.assignments.is_empty(),
                "collect waits for every item"
            );
            h.assert_store_matches_memory(run_id).await;
        } else {
            let expected =
                json!([{"greeting": "hi ada"}, {"greeting": "hi bob"}, {"greeting": "hi cy"}]);
            let parent = h.stored_task(run_id, "greet").await;
            assert_eq!(parent.state, TaskRunState::Succeeded);
            assert_eq!(parent.outputs, Some(expected.clone()));
            let collect = assignment(&report, "collect").clone();
            assert_eq!(collect.inputs, json!({"all": expected.clone()}));
            assert_eq!(collect.upstream["greet"], expected);
            h.assert_store_matches_memory(run_id).await;
            h.complete(&collect, ok(json!({}))).await;
        }
    }
    assert_eq!(h.stored_run(run_id).await.state, RunState::Succeeded);
}

#[tokio::test]
async fn for_each_fans_out_over_an_upstream_output() {
    let mut h = Harness::new().await;
    let p = pipeline(json!({
        "name": "squares",
        "tasks": [
            {"id": "list", "tool": "echo"},
            {"id": "square", "tool": "echo", "for_each": "{{ tasks.list.outputs.items }}", "with": {"n": "{{ item * item }}"}},
            {"id": "total", "tool": "echo", "with": {"squares": "{{ tasks.square.outputs }}"}},
        ]
    }));
    let (run_id, report) = h.submit(&p, json!({})).await;
    let list = assignment(&report, "list").clone();
    let report = h.complete(&list, ok(json!({"items": [2, 3]}))).await;
    assert_eq!(leased(&report), ["square", "square"]);
    let mut squares = report.assignments.clone();
    squares.sort_by_key(|a| a.inputs["n"].as_u64());
    assert_eq!(squares[0].inputs, json!({"n": 4}));
    assert_eq!(squares[1].inputs, json!({"n": 9}));
    let mut last = StepReport::default();
    for a in &squares {
        let n = a.inputs["n"].clone();
        last = h.complete(a, ok(n)).await;
    }
    let square = h.stored_task(run_id, "square").await;
    assert_eq!(
        (square.state, square.outputs),
        (TaskRunState::Succeeded, Some(json!([4, 9])))
    );
    let total = assignment(&last, "total").clone();
    assert_eq!(total.inputs, json!({"squares": [4, 9]}));
    h.complete(&total, ok(json!({"sum": 13}))).await;
    assert_eq!(h.stored_run(run_id).await.state, RunState::Succeeded);
}

#[tokio::test]
async fn for_each_over_an_empty_list_succeeds_with_an_empty_array() {
    let mut h = Harness::new().await;
    let (run_id, report) = h.submit(&greet_everyone(), json!({"names": []})).await;
    // No item to run: the fan-out succeeds at once and its dependent is leased.
    assert_eq!(leased(&report), ["collect"]);
    let greet = h.stored_task(run_id, "greet").await;
    assert_eq!(
        (greet.state, greet.fan_out),
        (TaskRunState::Succeeded, Some(0))
    );
    assert_eq!(greet.outputs, Some(json!([])));
    assert_eq!(report.assignments[0].inputs, json!({"all": []}));
    h.assert_store_matches_memory(run_id).await;
    let collect = report.assignments[0].clone();
    h.complete(&collect, ok(json!({}))).await;
    assert_eq!(h.stored_run(run_id).await.state, RunState::Succeeded);
}

#[tokio::test]
async fn a_false_condition_skips_the_task_and_its_dependents_still_run() {
    let mut h = Harness::new().await;
    let p = pipeline(json!({
        "name": "conditional",
        "params": {"notify": {"type": "boolean", "default": false}},
        "tasks": [
            {"id": "notify", "tool": "echo", "if": "{{ params.notify }}"},
            {"id": "archive", "tool": "echo", "depends_on": ["notify"]},
        ]
    }));
    let (run_id, report) = h.submit(&p, json!({"notify": false})).await;
    assert_eq!(leased(&report), ["archive"]);
    let notify = h.stored_task(run_id, "notify").await;
    assert_eq!(notify.state, TaskRunState::Skipped);
    assert_eq!(
        notify.error.as_deref(),
        Some("condition is false: {{ params.notify }}")
    );
    assert!(h.stored_attempts(run_id, notify.id).await.is_empty());
    let archive = report.assignments[0].clone();
    assert_eq!(archive.upstream["notify"], Value::Null);
    h.complete(&archive, ok(json!({}))).await;
    assert_eq!(h.stored_run(run_id).await.state, RunState::Succeeded);

    // The same pipeline with the condition true runs both.
    let (_, report) = h.submit(&p, json!({"notify": true})).await;
    assert_eq!(leased(&report), ["notify"]);
}

#[tokio::test]
async fn skips_by_condition_let_dependents_run_through_several_levels() {
    let mut h = Harness::new().await;
    let p = pipeline(json!({
        "name": "gates",
        "tasks": [
            {"id": "prepare", "tool": "echo"},
            {"id": "gate", "tool": "echo", "depends_on": ["prepare"], "if": "false"},
            {"id": "inner", "tool": "echo", "depends_on": ["gate"], "if": "false"},
            {"id": "finish", "tool": "echo", "depends_on": ["inner", "prepare"]},
        ]
    }));
    let (run_id, report) = h.submit(&p, json!({})).await;
    let prepare = assignment(&report, "prepare").clone();
    let report = h.complete(&prepare, ok(json!({}))).await;
    assert_eq!(leased(&report), ["finish"]);
    let states = h.stored_states(run_id).await;
    assert_eq!(states["gate"], TaskRunState::Skipped);
    assert_eq!(states["inner"], TaskRunState::Skipped);
    let finish = report.assignments[0].clone();
    h.complete(&finish, ok(json!({}))).await;
    assert_eq!(h.stored_run(run_id).await.state, RunState::Succeeded);
}

// ---------------------------------------------------------------------------------------
// Concurrency
// ---------------------------------------------------------------------------------------

fn independent(count: usize, concurrency: Option<u32>) -> Pipeline {
    let tasks: Vec<Value> = (0..count)
        .map(|i| json!({"id": format!("t{i}"), "tool": "echo"}))
        .collect();
    let mut def = json!({"name": "wide", "tasks": tasks});
    if let Some(c) = concurrency {
        def["concurrency"] = json!(c);
    }
    pipeline(def)
}

#[tokio::test]
async fn worker_slots_bound_the_leases_in_flight() {
    let mut h = Harness::with_slots(2).await;
    let (run_id, first) = h.submit(&independent(4, None), json!({})).await;
    assert_eq!(first.assignments.len(), 2);
    assert_eq!(h.scheduler.in_flight(), 2);
    let states = h.stored_states(run_id).await;
    assert_eq!(
        states
            .values()
            .filter(|s| **s == TaskRunState::Running)
            .count(),
        2
    );
    assert_eq!(
        states
            .values()
            .filter(|s| **s == TaskRunState::Queued)
            .count(),
        2
    );

    // A second run waits for a free slot too.
    let (other, report) = h.submit(&independent(1, None), json!({})).await;
    assert!(report.assignments.is_empty());
    assert_eq!(h.stored_states(other).await["t0"], TaskRunState::Queued);

    let mut pending = first.assignments;
    let mut completed = 0;
    while let Some(lease) = pending.pop() {
        let report = h.complete(&lease, ok(json!({}))).await;
        completed += 1;
        assert!(
            report.assignments.len() <= 1,
            "one slot freed, at most one lease"
        );
        assert!(h.scheduler.in_flight() <= 2);
        pending.extend(report.assignments);
    }
    assert_eq!(completed, 5);
    assert_eq!(h.stored_run(run_id).await.state, RunState::Succeeded);
    assert_eq!(h.stored_run(other).await.state, RunState::Succeeded);
    assert_eq!(h.scheduler.in_flight(), 0);
}

#[tokio::test]
async fn a_pipeline_concurrency_of_one_runs_one_task_at_a_time() {
    let mut h = Harness::with_slots(8).await;
    let (run_id, report) = h.submit(&independent(3, Some(1)), json!({})).await;
    assert_eq!(report.assignments.len(), 1);
    let mut lease = report.assignments[0].clone();
    let mut seen = vec![lease.task_id.to_string()];
    loop {
        let states = h.stored_states(run_id).await;
        assert_eq!(
            states
                .values()
                .filter(|s| **s == TaskRunState::Running)
                .count(),
            1,
            "{states:?}"
        );
        let report = h.complete(&lease, ok(json!({}))).await;
        match report.assignments.as_slice() {
            [] => break,
            [next] => {
                seen.push(next.task_id.to_string());
                lease = next.clone();
            }
            more => panic!("leased {} at once with concurrency 1", more.len()),
        }
    }
    seen.sort();
    assert_eq!(seen, ["t0", "t1", "t2"]);
    assert_eq!(h.stored_run(run_id).await.state, RunState::Succeeded);
}

// ---------------------------------------------------------------------------------------
// Crash and resume
// ---------------------------------------------------------------------------------------

fn chain() -> Pipeline {
    pipeline(json!({
        "name": "chain",
        "tasks": [
            {"id": "a", "tool": "echo"},
            {"id": "b", "tool": "echo", "depends_on": ["a"]},
            {"id": "c", "tool": "echo", "depends_on": ["b"]},
        ]
    }))
}

#[tokio::test]
async fn a_crash_before_a_commit_loses_nothing_acknowledged_and_resume_reruns_only_the_running_task(
) {
    let mut h = Harness::new().await;
    let p = chain();
    let (run_id, report) = h.submit(&p, json!({})).await;
    let a = report.assignments[0].clone();
    let report = h.complete(&a, ok(json!({"a": 1}))).await;
    let b = assignment(&report, "b").clone();

    // The process dies while deciding what b's completion changes.
    h.failpoints.fail_before_commit(1);
    h.send_completion(&b, ok(json!({"b": 2}))).await;
    let crashed = h.scheduler.step().await;
    assert!(
        matches!(crashed, Err(Error::Injected("before commit"))),
        "{crashed:?}"
    );
    let states = h.stored_states(run_id).await;
    assert_eq!(states["a"], TaskRunState::Succeeded);
    assert_eq!(
        states["b"],
        TaskRunState::Running,
        "b's completion was never committed"
    );
    assert_eq!(states["c"], TaskRunState::Pending);

    h.restart().await;
    h.clock.advance(Duration::from_secs(1));
    let (reclaimed, report) = h.resume(run_id, &p).await;
    assert_eq!(reclaimed, 1);
    // a succeeded before the crash and is not leased again; b gets a new attempt.
    assert_eq!(leased(&report), ["b"]);
    let b2 = report.assignments[0].clone();
    assert_eq!(b2.task_run_id, b.task_run_id);
    assert_eq!((b2.attempt, b2.fencing_token), (2, 2));
    assert_eq!(b2.upstream["a"], json!({"a": 1}));
    h.assert_store_matches_memory(run_id).await;
    // Only ended attempts have rows; the running attempt 2 lives in the task-run row.
    assert_eq!(
        h.attempt_states(run_id, b.task_run_id).await,
        [AttemptState::LeaseExpired]
    );

    let report = h.complete(&b2, ok(json!({"b": 2}))).await;
    assert_eq!(leased(&report), ["c"]);
    let c = report.assignments[0].clone();
    let report = h.complete(&c, ok(json!({}))).await;
    assert!(report.assignments.is_empty());

    assert_eq!(h.stored_run(run_id).await.state, RunState::Succeeded);
    assert_eq!(
        h.attempt_states(run_id, a.task_run_id).await,
        [AttemptState::Succeeded]
    );
    assert_eq!(
        h.attempt_states(run_id, b.task_run_id).await,
        [AttemptState::LeaseExpired, AttemptState::Succeeded]
    );
    assert_eq!(
        h.attempt_states(run_id, c.task_run_id).await,
        [AttemptState::Succeeded]
    );
}

#[tokio::test]
async fn a_crash_after_a_commit_keeps_the_completion_and_resume_releases_the_undispatched_lease() {
    let mut h = Harness::new().await;
    let p = chain();
    let (run_id, report) = h.submit(&p, json!({})).await;
    let a = report.assignments[0].clone();
    let report = h.complete(&a, ok(json!({"a": 1}))).await;
    let b = assignment(&report, "b").clone();
    h.dispatched();

    // The process dies right after committing b's completion and c's lease, before it
    // dispatches the lease.
    h.failpoints.fail_after_commit(1);
    h.send_completion(&b, ok(json!({"b": 2}))).await;
    let crashed = h.scheduler.step().await;
    assert!(
        matches!(crashed, Err(Error::Injected("after commit"))),
        "{crashed:?}"
    );
    assert!(
        h.dispatched().is_empty(),
        "nothing is dispatched after a failed flush"
    );
    let states = h.stored_states(run_id).await;
    assert_eq!(states["b"], TaskRunState::Succeeded);
    assert_eq!(states["c"], TaskRunState::Running);
    let c1 = h.stored_task(run_id, "c").await;

    h.restart().await;
    let (reclaimed, report) = h.resume(run_id, &p).await;
    assert_eq!(reclaimed, 1);
    // Neither a nor b runs again: exactly-once recorded completion.
    assert_eq!(leased(&report), ["c"]);
    let c = report.assignments[0].clone();
    assert_eq!(c.task_run_id, c1.id);
    assert_eq!(c.attempt, 2);
    assert_eq!(c.upstream["b"], json!({"b": 2}));
    h.complete(&c, ok(json!({}))).await;

    assert_eq!(h.stored_run(run_id).await.state, RunState::Succeeded);
    assert_eq!(
        h.attempt_states(run_id, a.task_run_id).await,
        [AttemptState::Succeeded]
    );
    assert_eq!(
        h.attempt_states(run_id, b.task_run_id).await,
        [AttemptState::Succeeded]
    );
    assert_eq!(
        h.attempt_states(run_id, c.task_run_id).await,
        [AttemptState::LeaseExpired, AttemptState::Succeeded]
    );
}

#[tokio::test]
async fn a_fan_out_resumes_after_a_crash_without_rerunning_finished_items() {
    let mut h = Harness::new().await;
    let p = greet_everyone();
    let (run_id, report) = h.submit(&p, json!({"names": ["ada", "bob", "cy"]})).await;
    let mut items = report.assignments.clone();
    items.sort_by_key(|a| a.inputs["position"].as_u64());
    h.complete(&items[0], ok(json!("hi ada"))).await;
    h.failpoints.fail_after_commit(1);
    h.send_completion(&items[1], ok(json!("hi bob"))).await;
    let crashed = h.scheduler.step().await;
    assert!(
        matches!(crashed, Err(Error::Injected("after commit"))),
        "{crashed:?}"
    );

    h.restart().await;
    let (reclaimed, report) = h.resume(run_id, &p).await;
    assert_eq!(reclaimed, 1, "only cy's item was running");
    assert_eq!(report.assignments.len(), 1);
    let cy = report.assignments[0].clone();
    assert_eq!((cy.task_run_id, cy.attempt), (items[2].task_run_id, 2));
    assert_eq!(cy.inputs, json!({"name": "cy", "position": 2}));
    h.assert_store_matches_memory(run_id).await;

    let report = h.complete(&cy, ok(json!("hi cy"))).await;
    let collect = assignment(&report, "collect").clone();
    assert_eq!(
        collect.inputs,
        json!({"all": ["hi ada", "hi bob", "hi cy"]})
    );
    h.complete(&collect, ok(json!({}))).await;
    assert_eq!(h.stored_run(run_id).await.state, RunState::Succeeded);
    for (item, expected) in items.iter().zip([1, 1, 2]) {
        assert_eq!(
            h.stored_attempts(run_id, item.task_run_id).await.len(),
            expected
        );
    }
}

#[tokio::test]
async fn a_task_that_keeps_losing_its_lease_fails_after_the_limit() {
    let mut h = Harness::new().await;
    let (run_id, report) = h.submit(&single(None), json!({})).await;
    let task_run_id = report.assignments[0].task_run_id;
    let limit = ExecutionLimits::default().lease_expiries_max;
    for expiry in 1..=limit {
        h.clock.advance(LEASE_TTL);
        let report = h.step().await;
        assert_eq!(report.wakeups, 1);
        if expiry < limit {
            assert_eq!(assignment(&report, "work").attempt, expiry + 1);
        } else {
            assert!(report.assignments.is_empty());
        }
    }
    let work = h.stored_task(run_id, "work").await;
    assert_eq!(work.state, TaskRunState::Failed);
    assert_eq!(
        work.error.as_deref(),
        Some("lease expired 5 times; the task may be crashing its worker")
    );
    let states = h.attempt_states(run_id, task_run_id).await;
    assert_eq!(states, vec![AttemptState::LeaseExpired; limit as usize]);
    assert_eq!(h.stored_run(run_id).await.state, RunState::Failed);
}

#[tokio::test]
async fn a_watcher_is_answered_when_the_run_finishes() {
    let mut h = Harness::new().await;
    let (run_id, report) = h.submit(&single(None), json!({})).await;
    let lease = report.assignments[0].clone();
    let mut events = h.scheduler.handle().subscribe();

    let (reply, mut answer) = oneshot::channel();
    h.send(Command::Watch { run_id, reply }).await;
    h.step().await;
    assert!(answer.try_recv().is_err(), "the run is not over yet");

    let report = h.complete(&lease, ok(json!({}))).await;
    let run = answer
        .try_recv()
        .expect("answered by the step that finished the run")
        .expect("the run is known");
    assert_eq!(run.state, RunState::Succeeded);
    assert_eq!(run, h.stored_run(run_id).await);
    // The step's events are the ones published to subscribers.
    let mut published = Vec::new();
    while let Ok(event) = events.try_recv() {
        published.push(event);
    }
    assert_eq!(published, report.events);
    assert_eq!(
        published.len(),
        2,
        "the task run and the run succeeded: {published:?}"
    );

    // A finished run is answered from the store at once.
    let (reply, mut answer) = oneshot::channel();
    h.send(Command::Watch { run_id, reply }).await;
    h.step().await;
    assert_eq!(answer.try_recv().unwrap().unwrap(), run);
}

#[tokio::test]
async fn a_resumed_run_keeps_a_pending_retry_and_honours_its_backoff() {
    let mut h = Harness::new().await;
    let retry = json!({"max_attempts": 2, "initial_delay": "10s", "jitter": 0});
    let p = single(Some(retry));
    let (run_id, report) = h.submit(&p, json!({})).await;
    let first = report.assignments[0].clone();
    h.complete(&first, retryable("flaky")).await;
    assert_eq!(
        h.stored_task(run_id, "work").await.state,
        TaskRunState::WaitingToRetry
    );

    h.restart().await;
    let (reclaimed, report) = h.resume(run_id, &p).await;
    assert_eq!(reclaimed, 0);
    assert!(
        report.assignments.is_empty(),
        "the retry waits for its backoff after a restart too"
    );
    h.clock.advance(Duration::from_secs(10));
    let report = h.step().await;
    let second = assignment(&report, "work").clone();
    assert_eq!(second.attempt, 2);
    h.complete(&second, ok(json!({}))).await;
    assert_eq!(h.stored_run(run_id).await.state, RunState::Succeeded);
}

// ---------------------------------------------------------------------------------------
// Saga compensation
// ---------------------------------------------------------------------------------------

/// `a → b → c`; `a` and `b` declare a compensation that reads their outputs; `c` has
/// none. `b`'s compensation takes an optional retry policy.
fn saga(compensation_retry: Option<Value>) -> Pipeline {
    let mut b_compensate = json!({"tool": "echo", "with": {"release": "{{ tasks.b.outputs.seat }}", "order": "{{ tasks.a.outputs.order }}"}});
    if let Some(retry) = compensation_retry {
        b_compensate["retry"] = retry;
    }
    pipeline(json!({
        "name": "saga",
        "tasks": [
            {"id": "a", "tool": "echo",
             "compensate": {"tool": "echo", "with": {"cancel": "{{ tasks.a.outputs.order }}"}}},
            {"id": "b", "tool": "echo", "depends_on": ["a"], "compensate": b_compensate},
            {"id": "c", "tool": "echo", "depends_on": ["b"]},
        ]
    }))
}

/// Runs `a` and `b` of [`saga`] to success (one second apart) and fails `c` for good;
/// returns the run and the report of `c`'s completion.
async fn fail_after_a_and_b(h: &mut Harness, p: &Pipeline) -> (RunId, StepReport) {
    let (run_id, report) = h.submit(p, json!({})).await;
    let a = assignment(&report, "a").clone();
    h.clock.advance(Duration::from_secs(1));
    let report = h.complete(&a, ok(json!({"order": "o-1"}))).await;
    let b = assignment(&report, "b").clone();
    h.clock.advance(Duration::from_secs(1));
    let report = h.complete(&b, ok(json!({"seat": 12}))).await;
    let c = assignment(&report, "c").clone();
    h.clock.advance(Duration::from_secs(1));
    let report = h.complete(&c, permanent("payment declined")).await;
    (run_id, report)
}

#[tokio::test]
async fn a_failed_run_compensates_its_succeeded_tasks_in_reverse_completion_order() {
    let mut h = Harness::new().await;
    let p = saga(None);
    let (run_id, report) = fail_after_a_and_b(&mut h, &p).await;

    // The run does not end: it compensates b first (b finished last), one at a time.
    assert_eq!(leased(&report), ["b__compensate"]);
    let undo_b = report.assignments[0].clone();
    assert_eq!(undo_b.inputs, json!({"release": 12, "order": "o-1"}));
    assert_eq!(undo_b.upstream["b"], json!({"seat": 12}));
    assert_eq!(undo_b.upstream["a"], json!({"order": "o-1"}));
    assert_eq!(h.stored_run(run_id).await.state, RunState::Running);
    let states = h.stored_states(run_id).await;
    assert_eq!(states["c"], TaskRunState::Failed);
    assert_eq!(states["b__compensate"], TaskRunState::Running);
    // The whole plan is stored at once: a's compensation waits its turn.
    assert_eq!(states["a__compensate"], TaskRunState::Pending);
    h.assert_store_matches_memory(run_id).await;

    h.clock.advance(Duration::from_secs(1));
    let report = h.complete(&undo_b, ok(json!({}))).await;
    assert_eq!(leased(&report), ["a__compensate"]);
    let undo_a = report.assignments[0].clone();
    assert_eq!(undo_a.inputs, json!({"cancel": "o-1"}));
    assert_eq!(h.stored_run(run_id).await.state, RunState::Running);

    h.clock.advance(Duration::from_secs(1));
    let report = h.complete(&undo_a, ok(json!({}))).await;
    assert!(report.assignments.is_empty());

    let run = h.stored_run(run_id).await;
    assert_eq!(run.state, RunState::Failed);
    assert_eq!(
        run.error.as_deref(),
        Some("task c failed: payment declined; 2 compensations ran, 0 of them failed")
    );
    // Recorded like any task run, with their attempts; b was undone before a.
    let undo_b = h.stored_task(run_id, "b__compensate").await;
    let undo_a = h.stored_task(run_id, "a__compensate").await;
    assert_eq!(undo_b.state, TaskRunState::Succeeded);
    assert_eq!(undo_a.state, TaskRunState::Succeeded);
    assert!(undo_b.finished_at < undo_a.started_at);
    assert_eq!(
        h.attempt_states(run_id, undo_b.id).await,
        [AttemptState::Succeeded]
    );
    assert_eq!(
        h.attempt_states(run_id, undo_a.id).await,
        [AttemptState::Succeeded]
    );
    // The compensated tasks keep their own rows and outputs.
    assert_eq!(
        h.stored_task(run_id, "a").await.outputs,
        Some(json!({"order": "o-1"}))
    );
}

#[tokio::test]
async fn a_run_that_succeeds_runs_no_compensation() {
    let mut h = Harness::new().await;
    let p = saga(None);
    let (run_id, report) = h.submit(&p, json!({})).await;
    let a = assignment(&report, "a").clone();
    let report = h.complete(&a, ok(json!({"order": "o-1"}))).await;
    let b = assignment(&report, "b").clone();
    let report = h.complete(&b, ok(json!({"seat": 12}))).await;
    let c = assignment(&report, "c").clone();
    let report = h.complete(&c, ok(json!({}))).await;
    assert!(report.assignments.is_empty());

    let run = h.stored_run(run_id).await;
    assert_eq!(run.state, RunState::Succeeded);
    assert_eq!(run.error, None);
    let ids: Vec<String> = h
        .stored_task_runs(run_id)
        .await
        .iter()
        .map(|t| t.task_id.to_string())
        .collect();
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert!(
        ids.iter().all(|id| !id.ends_with("__compensate")),
        "{ids:?}"
    );
}

#[tokio::test]
async fn only_tasks_that_succeeded_are_compensated() {
    let mut h = Harness::new().await;
    // a succeeds, b fails, c never runs: all three declare a compensation.
    let undo = json!({"tool": "echo"});
    let p = pipeline(json!({
        "name": "partial",
        "tasks": [
            {"id": "a", "tool": "echo", "compensate": undo},
            {"id": "b", "tool": "echo", "depends_on": ["a"], "compensate": undo},
            {"id": "c", "tool": "echo", "depends_on": ["b"], "compensate": undo},
        ]
    }));
    let (run_id, report) = h.submit(&p, json!({})).await;
    let a = assignment(&report, "a").clone();
    let report = h.complete(&a, ok(json!({}))).await;
    let b = assignment(&report, "b").clone();
    let report = h.complete(&b, permanent("boom")).await;
    assert_eq!(leased(&report), ["a__compensate"]);
    let states = h.stored_states(run_id).await;
    assert_eq!(states["c"], TaskRunState::Skipped);
    assert!(!states.contains_key("b__compensate"), "{states:?}");
    assert!(!states.contains_key("c__compensate"), "{states:?}");

    let report = h
        .complete(&report.assignments[0].clone(), ok(json!({})))
        .await;
    assert!(report.assignments.is_empty());
    let run = h.stored_run(run_id).await;
    assert_eq!(run.state, RunState::Failed);
    assert_eq!(
        run.error.as_deref(),
        Some("task b failed: boom; 1 compensation ran, 0 of them failed")
    );
    assert_eq!(h.stored_task_runs(run_id).await.len(), 4);
}

#[tokio::test]
async fn a_failing_compensation_is_retried_per_its_policy_and_the_others_still_run() {
    let mut h = Harness::new().await;
    let p = saga(Some(
        json!({"max_attempts": 2, "initial_delay": "5s", "jitter": 0}),
    ));
    let (run_id, report) = fail_after_a_and_b(&mut h, &p).await;
    let first = assignment(&report, "b__compensate").clone();
    let report = h.complete(&first, retryable("seat service down")).await;
    assert!(
        report.assignments.is_empty(),
        "a waits for b's compensation"
    );
    assert_eq!(
        h.stored_task(run_id, "b__compensate").await.state,
        TaskRunState::WaitingToRetry
    );

    h.clock.advance(Duration::from_secs(5));
    let report = h.step().await;
    let second = assignment(&report, "b__compensate").clone();
    assert_eq!(second.attempt, 2);
    let report = h.complete(&second, retryable("seat service down")).await;
    // Out of attempts: b's compensation fails, and a's runs all the same.
    let undo_a = assignment(&report, "a__compensate").clone();
    let undo_b = h.stored_task(run_id, "b__compensate").await;
    assert_eq!(undo_b.state, TaskRunState::Failed);
    assert_eq!(
        undo_b.error.as_deref(),
        Some("seat service down (after 2 attempts)")
    );
    assert_eq!(
        h.attempt_states(run_id, undo_b.id).await,
        [AttemptState::Failed, AttemptState::Failed]
    );

    h.complete(&undo_a, ok(json!({}))).await;
    let run = h.stored_run(run_id).await;
    assert_eq!(run.state, RunState::Failed);
    assert_eq!(
        run.error.as_deref(),
        Some("task c failed: payment declined; 2 compensations ran, 1 of them failed")
    );
    assert_eq!(
        h.stored_task(run_id, "a__compensate").await.state,
        TaskRunState::Succeeded
    );
}

#[tokio::test]
async fn a_crash_while_compensating_resumes_only_the_remaining_compensations() {
    let mut h = Harness::new().await;
    let p = saga(None);
    let (run_id, report) = fail_after_a_and_b(&mut h, &p).await;
    let undo_b = assignment(&report, "b__compensate").clone();
    h.dispatched();

    // The process dies right after committing b's compensation and a's lease, before it
    // dispatches the lease.
    h.failpoints.fail_after_commit(1);
    h.send_completion(&undo_b, ok(json!({}))).await;
    let crashed = h.scheduler.step().await;
    assert!(
        matches!(crashed, Err(Error::Injected("after commit"))),
        "{crashed:?}"
    );
    let states = h.stored_states(run_id).await;
    assert_eq!(states["b__compensate"], TaskRunState::Succeeded);
    assert_eq!(states["a__compensate"], TaskRunState::Running);

    h.restart().await;
    h.clock.advance(Duration::from_secs(1));
    let (reclaimed, report) = h.resume(run_id, &p).await;
    assert_eq!(reclaimed, 1);
    // b's compensation is not run again; a's gets a new attempt.
    assert_eq!(leased(&report), ["a__compensate"]);
    let undo_a = report.assignments[0].clone();
    assert_eq!(undo_a.attempt, 2);
    assert_eq!(undo_a.inputs, json!({"cancel": "o-1"}));
    h.assert_store_matches_memory(run_id).await;

    h.complete(&undo_a, ok(json!({}))).await;
    let run = h.stored_run(run_id).await;
    assert_eq!(run.state, RunState::Failed);
    assert_eq!(
        run.error.as_deref(),
        Some("task c failed: payment declined; 2 compensations ran, 0 of them failed")
    );
    assert_eq!(
        h.attempt_states(run_id, undo_b.task_run_id).await,
        [AttemptState::Succeeded]
    );
    assert_eq!(
        h.attempt_states(run_id, undo_a.task_run_id).await,
        [AttemptState::LeaseExpired, AttemptState::Succeeded]
    );
}

#[tokio::test]
async fn a_crash_before_the_first_compensation_ends_resumes_it_then_the_rest_in_order() {
    let mut h = Harness::new().await;
    let p = saga(None);
    let (run_id, report) = fail_after_a_and_b(&mut h, &p).await;
    let undo_b = assignment(&report, "b__compensate").clone();

    // The process dies while recording b's compensation: it was never acknowledged.
    h.failpoints.fail_before_commit(1);
    h.send_completion(&undo_b, ok(json!({}))).await;
    let crashed = h.scheduler.step().await;
    assert!(
        matches!(crashed, Err(Error::Injected("before commit"))),
        "{crashed:?}"
    );

    h.restart().await;
    h.clock.advance(Duration::from_secs(1));
    let (reclaimed, report) = h.resume(run_id, &p).await;
    assert_eq!(reclaimed, 1);
    // The restored order is the same: b's compensation again, then a's.
    assert_eq!(leased(&report), ["b__compensate"]);
    let again = report.assignments[0].clone();
    assert_eq!(again.task_run_id, undo_b.task_run_id);
    assert_eq!(again.attempt, 2);
    let report = h.complete(&again, ok(json!({}))).await;
    let undo_a = assignment(&report, "a__compensate").clone();
    h.complete(&undo_a, ok(json!({}))).await;
    assert_eq!(h.stored_run(run_id).await.state, RunState::Failed);
}

#[tokio::test]
async fn a_compensated_run_is_not_retried() {
    let mut h = Harness::new().await;
    let p = saga(None);
    let (run_id, report) = fail_after_a_and_b(&mut h, &p).await;
    let report = h
        .complete(&assignment(&report, "b__compensate").clone(), ok(json!({})))
        .await;
    h.complete(&assignment(&report, "a__compensate").clone(), ok(json!({})))
        .await;
    let mut execution = RunExecution::restore(
        h.stored_run(run_id).await,
        p.clone(),
        Arc::new(Templates::new()),
        ExecutionLimits::default(),
        h.stored_task_runs(run_id).await,
        h.store.attempts(run_id).await.expect("the store reads"),
    );
    assert_eq!(execution.retry_failed(h.now()), 0);
    assert_eq!(execution.run().state, RunState::Failed);
}

// ---------------------------------------------------------------------------------------
// The whole engine: worker pool and real tools
// ---------------------------------------------------------------------------------------

/// What the test tools tell the test: how many executions are alive (their futures not yet
/// dropped) and the highest attempt number started.
struct Probe {
    live: watch::Sender<usize>,
    started: watch::Sender<u32>,
}

struct Alive(Arc<Probe>);

impl Alive {
    fn new(probe: &Arc<Probe>, attempt: u32) -> Self {
        probe.live.send_modify(|n| *n += 1);
        probe.started.send_modify(|a| *a = (*a).max(attempt));
        Alive(probe.clone())
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.live.send_modify(|n| *n -= 1);
    }
}

#[derive(Clone, Copy)]
enum Behaviour {
    /// Returns its inputs.
    Echo,
    /// Sleeps `inputs.ms` milliseconds, then returns its inputs.
    Sleep,
    /// Panics.
    Panic,
    /// Looks `inputs.tool` up in the context's registry and executes it with `inputs.with`,
    /// as the `agent` tool does with the tools it calls.
    Delegate,
}

struct TestTool {
    name: &'static str,
    behaviour: Behaviour,
    probe: Arc<Probe>,
}

#[async_trait]
impl Tool for TestTool {
    fn name(&self) -> &str {
        self.name
    }

    fn description(&self) -> &str {
        "a tool of the engine tests"
    }

    fn input_schema(&self) -> Value {
        match self.behaviour {
            Behaviour::Sleep => json!({
                "type": "object",
                "properties": {"ms": {"type": "integer", "minimum": 0}},
                "required": ["ms"],
            }),
            _ => json!({"type": "object"}),
        }
    }

    async fn execute(&self, context: ToolContext, inputs: Value) -> Result<Value, ToolError> {
        let _alive = Alive::new(&self.probe, context.attempt);
        match self.behaviour {
            Behaviour::Echo => Ok(inputs),
            Behaviour::Sleep => {
                let ms = inputs["ms"]
                    .as_u64()
                    .ok_or_else(|| ToolError::permanent("ms is required"))?;
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(inputs)
            }
            Behaviour::Panic => panic!("the test tool panics on purpose"),
            Behaviour::Delegate => {
                let name = inputs["tool"].as_str().unwrap_or_default();
                let tool = context
                    .tools
                    .resolve(context.org_id, name)
                    .await?
                    .ok_or_else(|| ToolError::permanent(format!("unknown tool {name:?}")))?;
                let with = inputs["with"].clone();
                let outputs = tool.execute(context, with).await?;
                Ok(json!({ "delegated": outputs }))
            }
        }
    }
}

/// Bound on waiting for anything the engine does; far above what the tests need.
const WAIT: Duration = Duration::from_secs(30);

struct LiveEngine {
    _dir: TempDir,
    store: Arc<SqliteStore>,
    handle: SchedulerHandle,
    probe: Arc<Probe>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), Error>>,
}

impl LiveEngine {
    async fn start(configure: impl FnOnce(&mut EngineOptions)) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = Arc::new(
            SqliteStore::open(&dir.path().join("arches.db"), Durability::Normal)
                .await
                .expect("the store opens"),
        );
        let artifacts = Arc::new(
            LocalArtifactStore::new(&dir.path().join("artifacts"), store.clone())
                .expect("the artifact store opens"),
        );
        let probe = Arc::new(Probe {
            live: watch::Sender::new(0),
            started: watch::Sender::new(0),
        });
        let mut tools = ToolRegistry::new();
        for (name, behaviour) in [
            ("echo", Behaviour::Echo),
            ("sleep", Behaviour::Sleep),
            ("panic", Behaviour::Panic),
            ("delegate", Behaviour::Delegate),
        ] {
            tools.register(Arc::new(TestTool {
                name,
                behaviour,
                probe: probe.clone(),
            }));
        }
        let mut options = EngineOptions::new(dir.path().join("work"));
        options.worker_slots = 4;
        configure(&mut options);
        let engine = Engine::build(
            options,
            store.clone(),
            artifacts,
            tools,
            Arc::new(SystemClock),
        );
        let handle = engine.handle();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(engine.run(shutdown.clone()));
        LiveEngine {
            _dir: dir,
            store,
            handle,
            probe,
            shutdown,
            task,
        }
    }

    async fn run_to_end(&self, pipeline: &Pipeline) -> RunRecord {
        let run_id = self.submit(pipeline).await;
        tokio::time::timeout(WAIT, self.handle.wait(run_id))
            .await
            .expect("the run ends in time")
            .expect("the engine reports the run")
    }

    async fn submit(&self, pipeline: &Pipeline) -> RunId {
        let execution = new_run(pipeline, json!({}), SystemClock.now());
        tokio::time::timeout(WAIT, self.handle.submit(execution))
            .await
            .expect("the submit is answered in time")
            .expect("the submit succeeds")
    }

    async fn task(&self, run_id: RunId, task: &str) -> TaskRunRecord {
        self.store
            .task_runs(run_id)
            .await
            .unwrap()
            .into_iter()
            .find(|t| t.task_id.as_str() == task && t.index.is_none())
            .unwrap_or_else(|| panic!("no task run of {task}"))
    }

    async fn attempt_states(&self, run_id: RunId, task_run_id: TaskRunId) -> Vec<AttemptState> {
        self.store
            .attempts(run_id)
            .await
            .unwrap()
            .into_iter()
            .filter(|a| a.task_run_id == task_run_id)
            .map(|a| a.state)
            .collect()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the engine stops in time");
        result
            .expect("the engine task does not panic")
            .expect("the engine stops cleanly");
    }
}

#[tokio::test]
async fn the_engine_runs_a_chain_of_real_tools_to_success() {
    let engine = LiveEngine::start(|_| {}).await;
    let p = pipeline(json!({
        "name": "chain",
        "tasks": [
            {"id": "a", "tool": "echo", "with": {"value": 1}},
            {"id": "b", "tool": "echo", "with": {"value": "{{ tasks.a.outputs.value + 1 }}"}},
            {"id": "c", "tool": "echo", "with": {"value": "{{ tasks.b.outputs.value * 10 }}"}},
        ]
    }));
    let run = engine.run_to_end(&p).await;
    assert_eq!(run.state, RunState::Succeeded, "{:?}", run.error);
    let c = engine.task(run.id, "c").await;
    assert_eq!(c.outputs, Some(json!({"value": 20})));
    for task in ["a", "b", "c"] {
        let t = engine.task(run.id, task).await;
        assert_eq!((t.state, t.attempt), (TaskRunState::Succeeded, 1), "{task}");
        assert_eq!(
            engine.attempt_states(run.id, t.id).await,
            [AttemptState::Succeeded]
        );
    }
    // Every execution has ended (its future dropped) by the time the run is over.
    assert_eq!(*engine.probe.live.borrow(), 0);
    engine.stop().await;
}

#[tokio::test]
async fn a_tool_finds_the_engine_registry_in_its_context_and_calls_another_tool() {
    // What the `agent` tool relies on: the worker pool puts its registry into every context.
    let engine = LiveEngine::start(|_| {}).await;
    let p = pipeline(json!({
        "name": "delegation",
        "tasks": [
            {"id": "a", "tool": "delegate", "with": {"tool": "echo", "with": {"value": 7}}},
        ]
    }));
    let run = engine.run_to_end(&p).await;
    assert_eq!(run.state, RunState::Succeeded, "{:?}", run.error);
    let a = engine.task(run.id, "a").await;
    assert_eq!(a.outputs, Some(json!({"delegated": {"value": 7}})));
    engine.stop().await;
}

#[tokio::test]
async fn rendered_inputs_that_break_the_tool_schema_fail_the_task_before_the_tool_runs() {
    let engine = LiveEngine::start(|_| {}).await;
    let p = pipeline(json!({
        "name": "bad-render",
        "tasks": [
            {"id": "a", "tool": "echo", "with": {"ms": "soon"}},
            // Validation cannot see this value: it is a template until the task runs.
            {"id": "b", "tool": "sleep", "with": {"ms": "{{ tasks.a.outputs.ms }}"},
             "retry": {"max_attempts": 3, "initial_delay": "1ms"}},
        ]
    }));
    let run = engine.run_to_end(&p).await;
    assert_eq!(run.state, RunState::Failed);
    let b = engine.task(run.id, "b").await;
    assert_eq!(b.state, TaskRunState::Failed);
    assert_eq!(b.attempt, 1, "a schema violation is not retried");
    let error = b.error.unwrap_or_default();
    assert!(
        error.contains("rendered inputs of tool `sleep` break its schema")
            && error.contains("/with/ms"),
        "{error}"
    );
    engine.stop().await;
}

#[tokio::test]
async fn a_tool_that_runs_past_its_timeout_is_timed_out_and_retried() {
    let engine = LiveEngine::start(|_| {}).await;
    let p = pipeline(json!({
        "name": "slow",
        "tasks": [{
            "id": "slow", "tool": "sleep", "with": {"ms": 60_000}, "timeout": "200ms",
            "retry": {"max_attempts": 2, "initial_delay": "10ms", "jitter": 0}
        }]
    }));
    let run = engine.run_to_end(&p).await;
    assert_eq!(run.state, RunState::Failed);
    let slow = engine.task(run.id, "slow").await;
    assert_eq!(slow.state, TaskRunState::Failed);
    assert_eq!(
        slow.error.as_deref(),
        Some("timed out after 200ms (after 2 attempts)")
    );
    assert_eq!(
        engine.attempt_states(run.id, slow.id).await,
        [AttemptState::TimedOut, AttemptState::TimedOut]
    );
    // The timed-out executions were dropped, not left running.
    tokio::time::timeout(WAIT, engine.probe.live.subscribe().wait_for(|n| *n == 0))
        .await
        .expect("the sleeping tools are dropped")
        .unwrap();
    engine.stop().await;
}

#[tokio::test]
async fn a_tool_that_panics_fails_its_task_without_crashing_the_engine() {
    let engine = LiveEngine::start(|_| {}).await;
    let p = pipeline(json!({
        "name": "boom",
        "tasks": [
            {"id": "boom", "tool": "panic", "retry": {"max_attempts": 3, "initial_delay": "10ms", "jitter": 0}},
            {"id": "after", "tool": "echo", "depends_on": ["boom"]},
        ]
    }));
    let run = engine.run_to_end(&p).await;
    assert_eq!(run.state, RunState::Failed);
    let boom = engine.task(run.id, "boom").await;
    assert_eq!(boom.state, TaskRunState::Failed);
    let error = boom.error.expect("the task says why");
    assert!(error.contains("panicked"), "{error}");
    assert!(error.contains("the test tool panics on purpose"), "{error}");
    // A panic is not retryable: one attempt.
    assert_eq!(
        engine.attempt_states(run.id, boom.id).await,
        [AttemptState::Failed]
    );
    assert_eq!(
        engine.task(run.id, "after").await.state,
        TaskRunState::Skipped
    );

    // The engine still runs pipelines.
    let ok =
        pipeline(json!({"name": "ok", "tasks": [{"id": "a", "tool": "echo", "with": {"x": 1}}]}));
    assert_eq!(engine.run_to_end(&ok).await.state, RunState::Succeeded);
    engine.stop().await;
}

#[tokio::test]
async fn heartbeats_keep_the_lease_of_a_long_attempt() {
    let engine = LiveEngine::start(|options| {
        // The attempt outlives its lease; only heartbeats keep it. A stall of the test
        // machine shorter than the lease minus one heartbeat (2.4 s) cannot fail it.
        options.lease_ttl = Duration::from_millis(2500);
        options.heartbeat_interval = Duration::from_millis(100);
    })
    .await;
    let p = pipeline(
        json!({"name": "long", "tasks": [{"id": "long", "tool": "sleep", "with": {"ms": 3500}}]}),
    );
    let run = engine.run_to_end(&p).await;
    assert_eq!(run.state, RunState::Succeeded, "{:?}", run.error);
    let long = engine.task(run.id, "long").await;
    assert_eq!(
        engine.attempt_states(run.id, long.id).await,
        [AttemptState::Succeeded]
    );
    engine.stop().await;
}

#[tokio::test]
async fn a_cancel_stops_the_attempt_that_took_over_an_expired_lease() {
    // Heartbeats far apart: every lease expires, and the task is leased again in the same
    // process while the first attempt is being stopped.
    let engine = LiveEngine::start(|options| {
        options.lease_ttl = Duration::from_secs(1);
        options.heartbeat_interval = Duration::from_secs(3600);
    })
    .await;
    let p = pipeline(
        json!({"name": "hang", "tasks": [{"id": "hang", "tool": "sleep", "with": {"ms": 120_000}}]}),
    );
    let run_id = engine.submit(&p).await;
    tokio::time::timeout(
        WAIT,
        engine
            .probe
            .started
            .subscribe()
            .wait_for(|attempt| *attempt >= 2),
    )
    .await
    .expect("the task is leased again after its lease expires")
    .unwrap();

    tokio::time::timeout(WAIT, engine.handle.cancel(run_id, "enough"))
        .await
        .expect("the cancel is answered in time")
        .expect("the cancel succeeds");
    tokio::time::timeout(
        Duration::from_secs(10),
        engine.probe.live.subscribe().wait_for(|n| *n == 0),
    )
    .await
    .expect("every attempt of the cancelled run is stopped")
    .unwrap();
    let run = engine.store.run(run_id).await.unwrap().unwrap();
    assert_eq!(run.state, RunState::Cancelled);
    let hang = engine.task(run_id, "hang").await;
    assert_eq!(hang.state, TaskRunState::Cancelled);
    let states = engine.attempt_states(run_id, hang.id).await;
    assert_eq!(states.last(), Some(&AttemptState::Cancelled));
    assert!(
        states[..states.len() - 1]
            .iter()
            .all(|s| *s == AttemptState::LeaseExpired),
        "{states:?}"
    );
    engine.stop().await;
}

/// A retry of a failed run runs again only what did not succeed: the failed fan-out item
/// (not its succeeded siblings, not the upstream task), then the parent gathers every item's
/// outputs and the skipped downstream task runs. The retried item gets a fresh retry budget
/// and its attempt numbers keep counting up.
#[tokio::test]
async fn a_retry_runs_only_the_task_runs_that_did_not_succeed() {
    let mut h = Harness::new().await;
    let p = pipeline(json!({
        "name": "retry",
        "tasks": [
            {"id": "a", "tool": "noop"},
            {"id": "b", "tool": "noop", "depends_on": ["a"], "for_each": [1, 2, 3]},
            {"id": "c", "tool": "noop", "depends_on": ["b"]}
        ]
    }));
    let (run_id, report) = h.submit(&p, json!({})).await;
    let a = assignment(&report, "a").clone();
    let report = h.complete(&a, ok(json!({"a": 1}))).await;
    let items = report.assignments.clone();
    assert_eq!(items.len(), 3);
    let item = |n: i64| {
        items
            .iter()
            .find(|i| i.item == Some(json!(n)))
            .expect("the item is leased")
            .clone()
    };
    h.complete(&item(1), ok(json!("one"))).await;
    h.complete(&item(2), permanent("boom")).await;
    h.complete(&item(3), ok(json!("three"))).await;
    let failed = h.store.run(run_id).await.unwrap().unwrap();
    assert_eq!(failed.state, RunState::Failed);
    assert_eq!(
        h.stored_task(run_id, "c").await.state,
        TaskRunState::Skipped
    );
    let a_before = h.stored_task(run_id, "a").await;

    let mut execution = RunExecution::restore(
        failed,
        p.clone(),
        Arc::new(Templates::new()),
        ExecutionLimits::default(),
        h.store.task_runs(run_id).await.unwrap(),
        h.store.attempts(run_id).await.unwrap(),
    );
    assert_eq!(
        execution.retry_failed(h.now()),
        3,
        "b, its failed item, and c"
    );
    let (reply, mut answer) = oneshot::channel();
    h.send(Command::Resume {
        execution: Box::new(execution),
        reply,
    })
    .await;
    let report = h.step().await;
    answer.try_recv().expect("answered").expect("resumed");
    assert_eq!(
        h.store.run(run_id).await.unwrap().unwrap().state,
        RunState::Running
    );
    assert_eq!(
        report.assignments.len(),
        1,
        "only the failed item runs again"
    );
    let again = report.assignments[0].clone();
    assert_eq!(again.item, Some(json!(2)));
    assert_eq!(again.attempt, 2, "attempt numbers keep counting");

    let report = h.complete(&again, ok(json!("two"))).await;
    let c = assignment(&report, "c").clone();
    assert_eq!(
        h.stored_task(run_id, "b").await.outputs,
        Some(json!(["one", "two", "three"]))
    );
    h.complete(&c, ok(json!({}))).await;
    let run = h.store.run(run_id).await.unwrap().unwrap();
    assert_eq!(run.state, RunState::Succeeded);
    assert_eq!(run.error, None);
    assert_eq!(
        h.stored_task(run_id, "a").await,
        a_before,
        "a is kept as it was"
    );
}

/// Only a failed or cancelled run can be retried, and one with nothing to retry is left as
/// it is.
#[tokio::test]
async fn a_retry_of_a_run_that_did_not_fail_changes_nothing() {
    let mut h = Harness::new().await;
    let p = pipeline(json!({"name": "ok", "tasks": [{"id": "a", "tool": "noop"}]}));
    let (run_id, report) = h.submit(&p, json!({})).await;
    let a = assignment(&report, "a").clone();
    h.complete(&a, ok(json!({}))).await;
    let run = h.store.run(run_id).await.unwrap().unwrap();
    assert_eq!(run.state, RunState::Succeeded);
    let mut execution = RunExecution::restore(
        run.clone(),
        p,
        Arc::new(Templates::new()),
        ExecutionLimits::default(),
        h.store.task_runs(run_id).await.unwrap(),
        h.store.attempts(run_id).await.unwrap(),
    );
    assert_eq!(execution.retry_failed(h.now()), 0);
    assert_eq!(execution.run(), &run);
    assert!(execution.take_changes().task_runs.is_empty());
}
