//! The run state machine: how a run and its task runs move, given what happens to them.
//!
//! [`RunExecution`] holds one run in memory and applies events to it: the run starts, a
//! worker leases a task run, an attempt completes or fails, a lease expires, a retry comes
//! due, a user cancels. Each call changes states through the checked transitions of
//! [`crate::state`] and records what changed; [`RunExecution::take_changes`] hands the
//! changed rows and the domain events to the engine, which commits them in one transaction.
//! Because readiness is decided inside the same call that records a completion, dependents
//! become ready in the same transaction that records it.
//!
//! **Saga compensation.** When every task is terminal and one failed (not when the run is
//! cancelled: a cancel stops everything at once, compensations included), a run whose
//! succeeded tasks declare `compensate` does not end yet: it creates one pending task run
//! per such task, under the task id `<id>__compensate`
//! ([`crate::pipeline::compensation_task_id`]), and runs them one at a time, the task that
//! finished last first (ties: the later in topological order first). Each is leased,
//! retried (its own `retry`), timed out and recorded like any task run; a compensation that
//! fails for good does not stop the next. When all are terminal the run ends `failed`, its
//! error counting the compensations and their failures. The order is not stored: a restore
//! derives it again from the compensated tasks' rows, and finished compensations stay
//! finished. A compensated run cannot be retried ([`RunExecution::retry_failed`]).
//!
//! This module must never do I/O, read the clock or draw random numbers: the caller passes
//! the time and a random number for jitter, so every step is reproducible in tests.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::events::DomainEvent;
use crate::ids::{OrgId, ReviewId, RunId, TaskId, TaskRunId};
use crate::pipeline::{compensation_task_id, Pipeline, TaskDef, Templates};
use crate::records::{AttemptRecord, RunRecord, TaskRunRecord};
use crate::retry::RetryPolicy;
use crate::review::{
    self, ApprovalRequest, OnReject, ReviewItem, ReviewKind, ReviewPolicy, ReviewState, Thresholds,
    Verdict, Vote,
};
use crate::state::{AttemptState, RunState, TaskRunState};
use crate::time::Timestamp;

/// Bounds the state machine enforces.
#[derive(Clone, Debug, PartialEq)]
pub struct ExecutionLimits {
    /// Leases that may expire on one task run before it fails; expiries do not use up the
    /// retry policy (the worker died, not the task), but a task that kills its worker every
    /// time must not loop for ever.
    pub lease_expiries_max: u32,
    /// Largest serialized outputs of one task run, in bytes; larger results belong in an
    /// artifact.
    pub outputs_bytes_max: usize,
    /// Most items one fan-out may spawn.
    pub fan_out_items_max: usize,
}

impl Default for ExecutionLimits {
    fn default() -> Self {
        Self {
            lease_expiries_max: 5,
            outputs_bytes_max: 1 << 20,
            fan_out_items_max: 100_000,
        }
    }
}

/// Why an event from a worker was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Rejection {
    /// The task run is not part of this run.
    #[error("unknown task run {0}")]
    UnknownTaskRun(TaskRunId),
    /// The event carries a fencing token other than the current lease's: it comes from a
    /// worker whose lease expired and was handed to another.
    #[error("stale lease on task run {task_run_id}: token {given}, current {current}")]
    StaleLease {
        /// The task run.
        task_run_id: TaskRunId,
        /// The token the event carried.
        given: u64,
        /// The current token.
        current: u64,
    },
    /// The task run is not in a state that accepts the event.
    #[error("task run {task_run_id} is {state}, not {expected}")]
    WrongState {
        /// The task run.
        task_run_id: TaskRunId,
        /// Its state.
        state: TaskRunState,
        /// The state the event needs.
        expected: TaskRunState,
    },
}

/// Why a decision on a validation-queue item was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReviewRefusal {
    /// No open item of this run has the id (it may belong to a finished run).
    #[error("review {0} is not waiting in this run")]
    Unknown(ReviewId),
    /// The item was decided already: exactly one decision wins.
    #[error("review {id} is already {state}")]
    Decided {
        /// The item.
        id: ReviewId,
        /// Its state.
        state: &'static str,
    },
    /// The approval names assignees and the reviewer is not one of them.
    #[error("{reviewer} is not among the assignees of review {id}")]
    NotAssignee {
        /// The item.
        id: ReviewId,
        /// Who tried.
        reviewer: String,
    },
    /// The reviewer voted on this approval already.
    #[error("{reviewer} already voted on review {id}")]
    AlreadyVoted {
        /// The item.
        id: ReviewId,
        /// Who tried.
        reviewer: String,
    },
    /// The decision is malformed (an edit of an approval, an edited result too large or not
    /// an object, a comment too long).
    #[error("{0}")]
    Invalid(String),
}

/// How an attempt ended, as the worker reports it. Serialized (`{"succeeded": outputs}`,
/// `{"failed": {"message", "retryable"}}`, `{"timed_out": {"timeout": {"secs", "nanos"}}}`)
/// when a standalone worker reports through the store's task queue.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    /// The tool returned outputs (a JSON value, normally an object).
    Succeeded(Value),
    /// The tool failed.
    Failed {
        /// What went wrong.
        message: String,
        /// Whether the retry policy applies.
        retryable: bool,
    },
    /// The attempt ran past the task's timeout and was stopped; the retry policy applies.
    TimedOut {
        /// The timeout that was exceeded.
        timeout: Duration,
    },
}

/// A task run handed to a worker: everything needed to execute one attempt. Serialized as
/// JSON when it is offered on the store's task queue to standalone workers.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Assignment {
    /// The run's org.
    pub org_id: OrgId,
    /// The run.
    pub run_id: RunId,
    /// The task run.
    pub task_run_id: TaskRunId,
    /// The task.
    pub task_id: TaskId,
    /// The tool's name.
    pub tool: String,
    /// The attempt number (1-based).
    pub attempt: u32,
    /// The lease's fencing token; completions and heartbeats must carry it.
    pub fencing_token: u64,
    /// When the lease expires unless extended.
    pub lease_expires_at: Timestamp,
    /// The rendered inputs.
    pub inputs: Value,
    /// The fan-out item.
    pub item: Option<Value>,
    /// Outputs of the direct upstream tasks, by task id.
    pub upstream: BTreeMap<String, Value>,
    /// The task's timeout.
    pub timeout: Option<Duration>,
    /// When a reviewer rejected the previous result and the task's `on_reject` is `retry`:
    /// the reviewer's comment, for the tool to take into account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub review_comment: Option<String>,
}

/// A moment at which the engine must look at a task run again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Wakeup {
    /// Check whether the lease with this token has expired.
    LeaseExpiry {
        /// When.
        at: Timestamp,
        /// The task run.
        task_run_id: TaskRunId,
        /// The lease's token at the time the wakeup was set.
        fencing_token: u64,
    },
    /// A task run waiting to retry becomes due.
    RetryDue {
        /// When.
        at: Timestamp,
        /// The task run.
        task_run_id: TaskRunId,
    },
    /// An approval waiting in the validation queue expires.
    ReviewExpiry {
        /// When.
        at: Timestamp,
        /// The task run.
        task_run_id: TaskRunId,
    },
}

impl Wakeup {
    /// When the wakeup is due.
    pub fn at(&self) -> Timestamp {
        match self {
            Wakeup::LeaseExpiry { at, .. }
            | Wakeup::RetryDue { at, .. }
            | Wakeup::ReviewExpiry { at, .. } => *at,
        }
    }
}

/// The changes made since the last [`RunExecution::take_changes`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Changes {
    /// The run row, if it changed.
    pub run: Option<RunRecord>,
    /// Changed task runs.
    pub task_runs: Vec<TaskRunRecord>,
    /// New or changed attempts.
    pub attempts: Vec<AttemptRecord>,
    /// Events to publish once the changes are committed.
    pub events: Vec<DomainEvent>,
    /// Wakeups to schedule.
    pub wakeups: Vec<Wakeup>,
    /// Validation-queue items created or decided.
    pub reviews: Vec<ReviewItem>,
}

/// A task and its task runs: the parent (index `None`) and, for a fan-out, its items.
#[derive(Clone, Debug, Default)]
struct Node {
    parent: usize,
    children: Vec<usize>,
    children_terminal: usize,
}

/// One run in memory. See the module documentation.
#[derive(Debug)]
pub struct RunExecution {
    run: RunRecord,
    pipeline: Pipeline,
    templates: Arc<Templates>,
    limits: ExecutionLimits,
    task_runs: Vec<TaskRunRecord>,
    by_id: HashMap<TaskRunId, usize>,
    nodes: HashMap<TaskId, Node>,
    queue: VecDeque<usize>,
    running: usize,
    /// Open attempts by task run index, while running.
    open_attempts: HashMap<usize, AttemptRecord>,
    run_dirty: bool,
    dirty: BTreeSet<usize>,
    attempts_out: Vec<AttemptRecord>,
    events: Vec<DomainEvent>,
    wakeups: Vec<Wakeup>,
    /// Attempts a task run had made when a retry of the run gave it a fresh retry budget,
    /// by task run index. Held in memory only: after a restart the budget counts every
    /// attempt, which can only mean fewer automatic retries, never more.
    retry_base: HashMap<usize, u32>,
    /// The compensation task runs (saga), by task run index, in the order they run: empty
    /// until the run reaches a failed end with succeeded tasks that declare `compensate`.
    compensations: Vec<usize>,
    /// Open blocking validation-queue items, by task run index (its task run is
    /// `awaiting_review`).
    reviews: HashMap<usize, ReviewItem>,
    /// Items created or decided since the last [`RunExecution::take_changes`].
    reviews_out: Vec<ReviewItem>,
    /// Thresholds that replace a task's fixed ones (from its calibration), by task.
    thresholds: HashMap<TaskId, Thresholds>,
    /// A rejecting reviewer's comment for the next attempt, by task run index (memory only:
    /// after a restart the retry runs without it).
    review_comments: HashMap<usize, String>,
    /// Rejections of each task run's results, by task run index, bounding `on_reject: retry`
    /// (memory only: a restart counts again, and every round needs a reviewer).
    rejections: HashMap<usize, u32>,
}

/// What identifies a new run before it starts.
#[derive(Clone, Debug, PartialEq)]
pub struct NewRun {
    /// The run's id.
    pub id: RunId,
    /// The org it belongs to (its pipeline's org).
    pub org_id: OrgId,
    /// The pipeline version it executes.
    pub pipeline_version: u32,
    /// The params after defaults, as a JSON object.
    pub params: Value,
}

impl RunExecution {
    /// A new run, queued, with one pending task run per task.
    ///
    /// `run.params` must already be checked against the pipeline's declarations (see
    /// [`crate::pipeline::validate::check_params`]).
    pub fn create(
        run: NewRun,
        pipeline: Pipeline,
        templates: Arc<Templates>,
        limits: ExecutionLimits,
        now: Timestamp,
    ) -> Self {
        let run_id = run.id;
        let run = RunRecord {
            id: run.id,
            org_id: run.org_id,
            pipeline_name: pipeline.def.name.to_string(),
            pipeline_version: run.pipeline_version,
            params: run.params,
            state: RunState::Queued,
            error: None,
            owner: None,
            created_at: now,
            started_at: None,
            finished_at: None,
        };
        let task_runs = pipeline
            .dag
            .topological_order()
            .iter()
            .map(|task_id| TaskRunRecord::pending(run_id, task_id.clone(), None, None, now))
            .collect();
        let mut execution = Self::assemble(run, pipeline, templates, limits, task_runs);
        execution.run_dirty = true;
        execution.dirty = (0..execution.task_runs.len()).collect();
        execution
    }

    /// Rebuilds a run from its stored rows, for example after a restart.
    ///
    /// Task runs that were running keep their leases; call
    /// [`RunExecution::reclaim_leases`] when the process that held them is known to be gone.
    pub fn restore(
        run: RunRecord,
        pipeline: Pipeline,
        templates: Arc<Templates>,
        limits: ExecutionLimits,
        task_runs: Vec<TaskRunRecord>,
        attempts: Vec<AttemptRecord>,
    ) -> Self {
        let mut execution = Self::assemble(run, pipeline, templates, limits, task_runs);
        // Attempts still running have no row of their own (only ended attempts are written):
        // rebuild them from their task runs. A running row, if a store holds one, wins.
        for attempt in attempts {
            if attempt.state == AttemptState::Running {
                if let Some(&i) = execution.by_id.get(&attempt.task_run_id) {
                    if execution.task_runs[i].attempt == attempt.attempt {
                        execution.open_attempts.insert(i, attempt);
                    }
                }
            }
        }
        for (i, task_run) in execution.task_runs.iter().enumerate() {
            if task_run.state == TaskRunState::Running
                && task_run.fan_out.is_none()
                && !execution.open_attempts.contains_key(&i)
            {
                execution.open_attempts.insert(
                    i,
                    AttemptRecord {
                        task_run_id: task_run.id,
                        run_id: task_run.run_id,
                        attempt: task_run.attempt,
                        fencing_token: task_run.fencing_token,
                        worker: task_run.lease_owner.clone().unwrap_or_default(),
                        state: AttemptState::Running,
                        started_at: task_run.started_at.unwrap_or(task_run.created_at),
                        finished_at: None,
                        error: None,
                    },
                );
            }
        }
        execution
    }

    fn assemble(
        run: RunRecord,
        pipeline: Pipeline,
        templates: Arc<Templates>,
        limits: ExecutionLimits,
        task_runs: Vec<TaskRunRecord>,
    ) -> Self {
        let mut by_id = HashMap::with_capacity(task_runs.len());
        let mut nodes: HashMap<TaskId, Node> = HashMap::new();
        let mut queue = VecDeque::new();
        let mut running = 0;
        let mut compensations = Vec::new();
        for (i, task_run) in task_runs.iter().enumerate() {
            by_id.insert(task_run.id, i);
            if task_run.state == TaskRunState::Queued {
                queue.push_back(i);
            }
            if task_run.state == TaskRunState::Running && task_run.fan_out.is_none() {
                running += 1;
            }
            if pipeline
                .def
                .compensated_task(task_run.task_id.as_str())
                .is_some()
            {
                compensations.push(i);
                continue;
            }
            let node = nodes.entry(task_run.task_id.clone()).or_default();
            match task_run.index {
                None => node.parent = i,
                Some(_) => {
                    node.children.push(i);
                    if task_run.state.is_terminal() {
                        node.children_terminal += 1;
                    }
                }
            }
        }
        for node in nodes.values_mut() {
            node.children.sort_by_key(|i| task_runs[*i].index);
        }
        let mut execution = Self {
            run,
            pipeline,
            templates,
            limits,
            task_runs,
            by_id,
            nodes,
            queue,
            running,
            open_attempts: HashMap::new(),
            run_dirty: false,
            dirty: BTreeSet::new(),
            attempts_out: Vec::new(),
            events: Vec::new(),
            wakeups: Vec::new(),
            retry_base: HashMap::new(),
            compensations: Vec::new(),
            reviews: HashMap::new(),
            reviews_out: Vec::new(),
            thresholds: HashMap::new(),
            review_comments: HashMap::new(),
            rejections: HashMap::new(),
        };
        // A restored run in its compensating phase: the order is derived again from the
        // compensated tasks' rows, so it is not stored.
        let mut keyed: Vec<(CompensationKey, usize)> = compensations
            .into_iter()
            .filter_map(|i| {
                let base = execution
                    .pipeline
                    .def
                    .compensated_task(execution.task_runs[i].task_id.as_str())?
                    .id
                    .clone();
                Some((execution.compensation_key(&base), i))
            })
            .collect();
        keyed.sort();
        execution.compensations = keyed.into_iter().map(|(_, i)| i).collect();
        execution
    }

    /// Retries a failed or cancelled run from its failed tasks: every failed, cancelled or
    /// skipped task run goes back to pending (fan-out items that did not succeed are queued
    /// again under their parent, which runs again; the items that succeeded keep their
    /// outputs), the run goes back to running, and the ready task runs are queued. Succeeded
    /// task runs and their outputs are kept. Attempt numbers keep counting up, and each task
    /// run retried gets a fresh retry budget. Returns how many task runs were reset (0, and
    /// nothing changes, when the run is not failed or cancelled, has nothing to retry, or
    /// was compensated).
    pub fn retry_failed(&mut self, now: Timestamp) -> usize {
        if !matches!(self.run.state, RunState::Failed | RunState::Cancelled) {
            return 0;
        }
        // Its succeeded tasks were undone: running only the failed ones again would build on
        // effects that no longer exist.
        if !self.compensations.is_empty() {
            return 0;
        }
        let retried = |state: TaskRunState| {
            matches!(
                state,
                TaskRunState::Failed | TaskRunState::Cancelled | TaskRunState::Skipped
            )
        };
        let mut reset = 0;
        let order: Vec<TaskId> = self.pipeline.dag.topological_order().to_vec();
        for task_id in &order {
            let node = &self.nodes[task_id];
            let parent = node.parent;
            if !retried(self.task_runs[parent].state) {
                continue;
            }
            let children = node.children.clone();
            if children.is_empty() {
                self.reset_task_run(parent, now, false);
                reset += 1;
                continue;
            }
            // An expanded fan-out: its parent runs again, and only its unfinished items.
            self.reset_task_run(parent, now, true);
            self.transition(parent, TaskRunState::Running, now);
            self.task_runs[parent].started_at = Some(now);
            reset += 1;
            for child in children {
                if retried(self.task_runs[child].state) {
                    self.reset_task_run(child, now, true);
                    if let Some(node) = self.nodes.get_mut(task_id) {
                        node.children_terminal = node.children_terminal.saturating_sub(1);
                    }
                    self.enqueue(child, now);
                    reset += 1;
                }
            }
        }
        if reset == 0 {
            return 0;
        }
        self.set_run_state(RunState::Running, now, None);
        self.run.finished_at = None;
        self.run.error = None;
        self.run_dirty = true;
        for task_id in order {
            self.try_ready(&task_id, now);
        }
        self.check_run_finished(now);
        reset
    }

    /// Back to pending with its results cleared; the attempt count and fencing token stay,
    /// and so do the rendered inputs and fan-out size with `keep_expansion` (fan-out items,
    /// and an expanded fan-out parent).
    fn reset_task_run(&mut self, i: usize, now: Timestamp, keep_expansion: bool) {
        self.transition(i, TaskRunState::Pending, now);
        let task_run = &mut self.task_runs[i];
        self.retry_base
            .insert(i, task_run.attempt.saturating_sub(task_run.lease_expiries));
        task_run.error = None;
        task_run.outputs = None;
        task_run.finished_at = None;
        task_run.ready_at = None;
        task_run.lease_owner = None;
        task_run.lease_expires_at = None;
        if !keep_expansion {
            task_run.inputs = None;
            task_run.fan_out = None;
        }
    }

    /// The run row as it stands.
    pub fn run(&self) -> &RunRecord {
        &self.run
    }

    /// The run's id.
    pub fn id(&self) -> RunId {
        self.run.id
    }

    /// The pipeline.
    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    /// Whether the run reached its compensating phase (saga): its succeeded tasks that
    /// declare `compensate` are being, or were, undone.
    pub fn is_compensated(&self) -> bool {
        !self.compensations.is_empty()
    }

    /// Every task run, parents first in topological order, then fan-out items and
    /// compensations as created (a restored run: as the store lists them).
    pub fn task_runs(&self) -> &[TaskRunRecord] {
        &self.task_runs
    }

    /// A task run by id.
    pub fn task_run(&self, id: TaskRunId) -> Option<&TaskRunRecord> {
        self.by_id.get(&id).map(|i| &self.task_runs[*i])
    }

    /// Task runs leased and executing (fan-out parents excluded).
    pub fn running_count(&self) -> usize {
        self.running
    }

    /// Whether a task run waits in the queue.
    pub fn has_queued(&mut self) -> bool {
        self.drop_stale_queue_head();
        !self.queue.is_empty()
    }

    /// The per-run concurrency limit the pipeline sets, if any.
    pub fn concurrency_limit(&self) -> Option<usize> {
        self.pipeline.def.concurrency.map(|c| c.max(1) as usize)
    }

    /// Whether the run is over.
    pub fn is_finished(&self) -> bool {
        self.run.state.is_terminal()
    }

    /// Sets the process that drives the run.
    pub fn set_owner(&mut self, owner: Option<String>) {
        if self.run.owner != owner {
            self.run.owner = owner;
            self.run_dirty = true;
        }
    }

    /// Starts a queued run, or continues a running one: marks it running and queues every
    /// task whose dependencies are met.
    pub fn start(&mut self, now: Timestamp) {
        if self.run.state == RunState::Queued {
            self.set_run_state(RunState::Running, now, None);
            self.run.started_at = Some(now);
        }
        if self.run.state == RunState::Running {
            let order: Vec<TaskId> = self.pipeline.dag.topological_order().to_vec();
            for task_id in order {
                self.try_ready(&task_id, now);
            }
            self.check_run_finished(now);
        }
    }

    /// Takes the next queued task run and leases it to `worker` until `now + lease_ttl`.
    /// Returns `None` when nothing is queued. The caller enforces concurrency limits.
    pub fn lease_next(
        &mut self,
        worker: &str,
        now: Timestamp,
        lease_ttl: Duration,
    ) -> Option<Assignment> {
        self.drop_stale_queue_head();
        let i = self.queue.pop_front()?;
        Some(self.lease_index(i, worker, now, lease_ttl))
    }

    fn drop_stale_queue_head(&mut self) {
        while let Some(&i) = self.queue.front() {
            if self.task_runs[i].state == TaskRunState::Queued {
                return;
            }
            self.queue.pop_front();
        }
    }

    fn lease_index(
        &mut self,
        i: usize,
        worker: &str,
        now: Timestamp,
        lease_ttl: Duration,
    ) -> Assignment {
        self.transition(i, TaskRunState::Running, now);
        let expires = now.plus(lease_ttl);
        let task_run = &mut self.task_runs[i];
        task_run.attempt += 1;
        task_run.fencing_token += 1;
        task_run.lease_owner = Some(worker.to_owned());
        task_run.lease_expires_at = Some(expires);
        task_run.started_at = Some(now);
        task_run.error = None;
        let attempt = AttemptRecord {
            task_run_id: task_run.id,
            run_id: task_run.run_id,
            attempt: task_run.attempt,
            fencing_token: task_run.fencing_token,
            worker: worker.to_owned(),
            state: AttemptState::Running,
            started_at: now,
            finished_at: None,
            error: None,
        };
        // The open attempt is not written now: the task-run row already records the attempt
        // number, token, worker and start, and [`RunExecution::restore`] rebuilds the open
        // attempt from it. The attempt row is written once, when the attempt ends, which
        // saves one row write per attempt on the hot path.
        self.open_attempts.insert(i, attempt);
        self.running += 1;
        let task_run = &self.task_runs[i];
        self.wakeups.push(Wakeup::LeaseExpiry {
            at: expires,
            task_run_id: task_run.id,
            fencing_token: task_run.fencing_token,
        });
        self.assignment_of(i, expires)
    }

    /// The assignment of the attempt task run `i` holds now (its current lease).
    fn assignment_of(&self, i: usize, expires: Timestamp) -> Assignment {
        let task_run = &self.task_runs[i];
        let (tool, timeout, upstream) = match self.pipeline.task(&task_run.task_id) {
            Some(task) => (
                task.tool.clone(),
                task.timeout,
                self.upstream_outputs(&task_run.task_id),
            ),
            None => {
                // A compensation: its tool, and the outputs of the task it undoes and of
                // that task's dependencies.
                let task = self
                    .pipeline
                    .def
                    .compensated_task(task_run.task_id.as_str())
                    .expect("task runs belong to pipeline tasks or their compensations");
                let compensate = task.compensate.as_ref().expect("a compensated task");
                let mut upstream = self.upstream_outputs(&task.id);
                let own = &self.task_runs[self.nodes[&task.id].parent];
                upstream.insert(
                    task.id.to_string(),
                    own.outputs.clone().unwrap_or(Value::Null),
                );
                (compensate.tool.clone(), compensate.timeout, upstream)
            }
        };
        Assignment {
            org_id: self.run.org_id,
            run_id: self.run.id,
            task_run_id: task_run.id,
            task_id: task_run.task_id.clone(),
            tool,
            attempt: task_run.attempt,
            fencing_token: task_run.fencing_token,
            lease_expires_at: expires,
            inputs: task_run.inputs.clone().unwrap_or_else(|| json!({})),
            item: task_run.item.clone(),
            upstream,
            timeout,
            review_comment: self.review_comments.get(&i).cloned(),
        }
    }

    fn check_lease(&self, id: TaskRunId, fencing_token: u64) -> Result<usize, Rejection> {
        let &i = self.by_id.get(&id).ok_or(Rejection::UnknownTaskRun(id))?;
        let task_run = &self.task_runs[i];
        if task_run.fencing_token != fencing_token {
            return Err(Rejection::StaleLease {
                task_run_id: id,
                given: fencing_token,
                current: task_run.fencing_token,
            });
        }
        if task_run.state != TaskRunState::Running || task_run.fan_out.is_some() {
            return Err(Rejection::WrongState {
                task_run_id: id,
                state: task_run.state,
                expected: TaskRunState::Running,
            });
        }
        Ok(i)
    }

    /// The assignments of the attempts running now (leased task runs, fan-out parents
    /// excepted), with their current fencing tokens: what a scheduler offers again on the
    /// store's task queue after a restart, so the workers that hold them can still report.
    pub fn running_assignments(&self) -> Vec<Assignment> {
        (0..self.task_runs.len())
            .filter(|&i| {
                self.task_runs[i].state == TaskRunState::Running
                    && self.task_runs[i].fan_out.is_none()
            })
            .map(|i| {
                let expires = self.task_runs[i]
                    .lease_expires_at
                    .unwrap_or(self.task_runs[i].created_at);
                self.assignment_of(i, expires)
            })
            .collect()
    }

    /// The worker tags the task of a task run requires; a compensation requires those of
    /// the task it undoes (its undo needs the same environment).
    pub fn worker_tags(&self, task_id: &TaskId) -> &[String] {
        match self.pipeline.task(task_id) {
            Some(task) => task.worker_tags.as_slice(),
            None => self
                .pipeline
                .def
                .compensated_task(task_id.as_str())
                .map(|task| task.worker_tags.as_slice())
                .unwrap_or(&[]),
        }
    }

    /// Records which worker executes the current attempt of a task run (a standalone
    /// worker that claimed it from the store's task queue, rather than the scheduler's own
    /// process). Ignored unless `fencing_token` is the current lease's.
    pub fn set_attempt_worker(&mut self, id: TaskRunId, fencing_token: u64, worker: &str) {
        let Ok(i) = self.check_lease(id, fencing_token) else {
            return;
        };
        if let Some(attempt) = self.open_attempts.get_mut(&i) {
            attempt.worker = worker.to_owned();
        }
    }

    /// Extends a lease to `now + lease_ttl`.
    ///
    /// # Errors
    /// [`Rejection::StaleLease`] when the token is not the current lease's; other rejections
    /// when the task run is not running.
    pub fn heartbeat(
        &mut self,
        id: TaskRunId,
        fencing_token: u64,
        now: Timestamp,
        lease_ttl: Duration,
    ) -> Result<(), Rejection> {
        let i = self.check_lease(id, fencing_token)?;
        let expires = now.plus(lease_ttl);
        self.task_runs[i].lease_expires_at = Some(expires);
        self.dirty.insert(i);
        self.wakeups.push(Wakeup::LeaseExpiry {
            at: expires,
            task_run_id: id,
            fencing_token,
        });
        Ok(())
    }

    /// Records how an attempt ended. A success stores the outputs; a failure either waits
    /// to retry (retryable, and the policy allows another attempt) or fails the task run.
    /// Dependents that become ready are queued in the same call.
    ///
    /// `executed_at` is when the worker began executing the tool (the attempt and task run
    /// start times are set to it, so they measure execution, not the lease); `now` is when
    /// the attempt ended. `random` is a uniform number in [0, 1) for the backoff jitter.
    ///
    /// # Errors
    /// [`Rejection::StaleLease`] when the token is not the current lease's (the late
    /// completion of a worker whose lease expired); other rejections when the task run is not
    /// running. A rejected completion changes nothing.
    pub fn complete(
        &mut self,
        id: TaskRunId,
        fencing_token: u64,
        outcome: AttemptOutcome,
        executed_at: Timestamp,
        now: Timestamp,
        random: f64,
    ) -> Result<(), Rejection> {
        let i = self.check_lease(id, fencing_token)?;
        self.running -= 1;
        self.task_runs[i].started_at = Some(executed_at);
        if let Some(attempt) = self.open_attempts.get_mut(&i) {
            attempt.started_at = executed_at;
        }
        let (attempt_state, error, retryable, outputs) = match outcome {
            AttemptOutcome::Succeeded(outputs) => {
                let size = serialized_size(&outputs);
                if size > self.limits.outputs_bytes_max {
                    let message = format!(
                        "outputs are {size} bytes, above the limit of {} bytes; store large results as an artifact",
                        self.limits.outputs_bytes_max
                    );
                    (AttemptState::Failed, Some(message), false, None)
                } else {
                    (AttemptState::Succeeded, None, false, Some(outputs))
                }
            }
            AttemptOutcome::Failed { message, retryable } => {
                (AttemptState::Failed, Some(message), retryable, None)
            }
            AttemptOutcome::TimedOut { timeout } => (
                AttemptState::TimedOut,
                Some(format!(
                    "timed out after {}",
                    crate::pipeline::format_duration(timeout)
                )),
                true,
                None,
            ),
        };
        self.close_attempt(i, attempt_state, error.clone(), now);
        {
            let task_run = &mut self.task_runs[i];
            task_run.lease_owner = None;
            task_run.lease_expires_at = None;
        }
        if let Some(outputs) = outputs {
            self.review_comments.remove(&i);
            self.apply_result(i, outputs, now);
            return Ok(());
        }
        let policy = self.retry_policy(&self.task_runs[i].task_id.clone());
        let counted = self.task_runs[i]
            .attempt
            .saturating_sub(self.task_runs[i].lease_expiries)
            .saturating_sub(self.retry_base.get(&i).copied().unwrap_or(0));
        if retryable && policy.allows_retry_after(counted) && self.run.state == RunState::Running {
            let ready_at = now.plus(policy.delay_after(counted, random));
            self.transition(i, TaskRunState::WaitingToRetry, now);
            self.task_runs[i].ready_at = Some(ready_at);
            self.task_runs[i].error = error;
            self.wakeups.push(Wakeup::RetryDue {
                at: ready_at,
                task_run_id: id,
            });
        } else {
            let message = error.unwrap_or_else(|| "failed".into());
            let message = if counted > 1 {
                format!("{message} (after {counted} attempts)")
            } else {
                message
            };
            self.finish(i, TaskRunState::Failed, Some(message), now);
        }
        Ok(())
    }

    /// Handles a lease-expiry wakeup: if the lease with this token is still held and has run
    /// out at `now`, the attempt is recorded as lost and the task run goes back to the queue
    /// (or fails once it has lost [`ExecutionLimits::lease_expiries_max`] leases). Returns
    /// whether the lease expired.
    pub fn expire_lease(&mut self, id: TaskRunId, fencing_token: u64, now: Timestamp) -> bool {
        let Ok(i) = self.check_lease(id, fencing_token) else {
            return false;
        };
        match self.task_runs[i].lease_expires_at {
            Some(expires) if expires <= now => {}
            _ => return false,
        }
        self.lose_lease(i, now, true);
        true
    }

    /// Treats every lease of this run as lost: used when the process that held them is gone
    /// (a restart after a crash). Returns how many task runs went back to the queue or failed.
    pub fn reclaim_leases(&mut self, now: Timestamp) -> usize {
        let held: Vec<usize> = (0..self.task_runs.len())
            .filter(|&i| {
                self.task_runs[i].state == TaskRunState::Running
                    && self.task_runs[i].fan_out.is_none()
            })
            .collect();
        for &i in &held {
            // A restart is not the task's fault: the attempt is recorded as lost, but it does
            // not count towards `lease_expiries_max` (each resume is a deliberate act).
            self.lose_lease(i, now, false);
        }
        held.len()
    }

    fn lose_lease(&mut self, i: usize, now: Timestamp, counts: bool) {
        self.running -= 1;
        self.close_attempt(
            i,
            AttemptState::LeaseExpired,
            Some("lease expired".into()),
            now,
        );
        let task_run = &mut self.task_runs[i];
        task_run.lease_owner = None;
        task_run.lease_expires_at = None;
        if counts {
            task_run.lease_expiries += 1;
        }
        if task_run.lease_expiries >= self.limits.lease_expiries_max {
            let message = format!(
                "lease expired {} times; the task may be crashing its worker",
                task_run.lease_expiries
            );
            self.finish(i, TaskRunState::Failed, Some(message), now);
        } else {
            self.enqueue(i, now);
        }
    }

    /// Handles a retry wakeup: a task run waiting to retry whose time has come is queued.
    /// Returns whether it was.
    pub fn retry_due(&mut self, id: TaskRunId, now: Timestamp) -> bool {
        let Some(&i) = self.by_id.get(&id) else {
            return false;
        };
        let task_run = &self.task_runs[i];
        if task_run.state != TaskRunState::WaitingToRetry
            || task_run.ready_at.is_some_and(|at| at > now)
        {
            return false;
        }
        self.task_runs[i].ready_at = None;
        self.enqueue(i, now);
        true
    }

    /// Cancels the run: task runs that are running are cancelled (their attempts too; the
    /// caller stops the workers, whose late completions are then refused), and every task
    /// run that has not started is skipped. Returns the task runs that were running, with
    /// their fencing tokens.
    pub fn cancel(&mut self, now: Timestamp, reason: &str) -> Vec<(TaskRunId, u64)> {
        if self.run.state.is_terminal() {
            return Vec::new();
        }
        let mut stopped = Vec::new();
        for i in 0..self.task_runs.len() {
            let state = self.task_runs[i].state;
            let is_parent = self.task_runs[i].fan_out.is_some();
            match state {
                TaskRunState::Running if !is_parent => {
                    self.running -= 1;
                    stopped.push((self.task_runs[i].id, self.task_runs[i].fencing_token));
                    self.close_attempt(i, AttemptState::Cancelled, Some(reason.to_owned()), now);
                    self.task_runs[i].lease_owner = None;
                    self.task_runs[i].lease_expires_at = None;
                    self.set_terminal(i, TaskRunState::Cancelled, Some(reason.to_owned()), now);
                }
                TaskRunState::WaitingToRetry => {
                    self.task_runs[i].ready_at = None;
                    self.set_terminal(i, TaskRunState::Cancelled, Some(reason.to_owned()), now);
                }
                TaskRunState::AwaitingReview => {
                    if let Some(mut item) = self.reviews.remove(&i) {
                        item.state = ReviewState::Cancelled;
                        item.decided_at = Some(now);
                        self.push_review_decided(&item, now);
                        self.reviews_out.push(item);
                    }
                    self.set_terminal(i, TaskRunState::Cancelled, Some(reason.to_owned()), now);
                }
                TaskRunState::Pending | TaskRunState::Queued => {
                    self.set_terminal(i, TaskRunState::Skipped, Some(reason.to_owned()), now);
                }
                _ => {}
            }
        }
        for i in 0..self.task_runs.len() {
            if self.task_runs[i].fan_out.is_some()
                && self.task_runs[i].state == TaskRunState::Running
            {
                self.set_terminal(i, TaskRunState::Cancelled, Some(reason.to_owned()), now);
            }
        }
        self.queue.clear();
        self.set_run_state(RunState::Cancelled, now, Some(reason.to_owned()));
        stopped
    }

    /// Routes the task's results by `thresholds` instead of its policy's fixed ones (the
    /// engine sets them from the task's calibration).
    pub fn set_thresholds(&mut self, task_id: TaskId, thresholds: Thresholds) {
        self.thresholds.insert(task_id, thresholds);
    }

    /// The thresholds the task's results are routed by now, if they are routed.
    pub fn thresholds(&self, task_id: &TaskId) -> Option<Thresholds> {
        let policy = self.pipeline.task(task_id)?.review_policy()?;
        Some(
            self.thresholds
                .get(task_id)
                .copied()
                .unwrap_or_else(|| policy.fixed()),
        )
    }

    /// Gives a restored run its open validation-queue items (the store's items of the run
    /// in state `open`). Items of task runs that no longer await review are ignored.
    pub fn restore_reviews(&mut self, items: Vec<ReviewItem>) {
        for item in items {
            if item.state != ReviewState::Open || !item.kind.is_blocking() {
                continue;
            }
            let Some(&i) = self.by_id.get(&item.task_run_id) else {
                continue;
            };
            if self.task_runs[i].state == TaskRunState::AwaitingReview {
                self.reviews.insert(i, item);
            }
        }
    }

    /// The open blocking items of the run, in task-run order.
    pub fn open_reviews(&self) -> Vec<&ReviewItem> {
        let mut items: Vec<(usize, &ReviewItem)> =
            self.reviews.iter().map(|(i, item)| (*i, item)).collect();
        items.sort_by_key(|(i, _)| *i);
        items.into_iter().map(|(_, item)| item).collect()
    }

    /// Applies a reviewer's vote on an open blocking item of this run.
    ///
    /// A confidence item is decided by one vote: approve applies the proposed result (or
    /// `vote.edited`) and the task run succeeds; reject follows the task's `on_reject`
    /// (fail; skip; or run again with the comment, at most [`review::REVIEW_ROUNDS_MAX`]
    /// times). An approval counts votes: it succeeds when `quorum` reviewers approved, and a
    /// single rejection rejects it (it fails). Returns the item as it is after the vote.
    ///
    /// # Errors
    /// [`ReviewRefusal`]: no such open item here, decided already, a reviewer outside the
    /// assignees or voting twice, or a malformed decision. A refused vote changes nothing.
    pub fn decide(
        &mut self,
        id: ReviewId,
        vote: Vote,
        now: Timestamp,
    ) -> Result<ReviewItem, ReviewRefusal> {
        let Some(i) = self
            .reviews
            .iter()
            .find_map(|(i, item)| (item.id == id).then_some(*i))
        else {
            return Err(ReviewRefusal::Unknown(id));
        };
        let item = &self.reviews[&i];
        if item.state != ReviewState::Open {
            return Err(ReviewRefusal::Decided {
                id,
                state: item.state.as_str(),
            });
        }
        if vote
            .comment
            .as_ref()
            .is_some_and(|c| c.len() > review::COMMENT_BYTES_MAX)
        {
            return Err(ReviewRefusal::Invalid(format!(
                "the comment is longer than {} bytes",
                review::COMMENT_BYTES_MAX
            )));
        }
        if let Some(edited) = &vote.edited {
            if item.kind == ReviewKind::Approval {
                return Err(ReviewRefusal::Invalid(
                    "an approval has no result to edit; approve or reject it".into(),
                ));
            }
            if vote.verdict == Verdict::Reject {
                return Err(ReviewRefusal::Invalid(
                    "an edited result can only be approved".into(),
                ));
            }
            if !edited.is_object() {
                return Err(ReviewRefusal::Invalid(
                    "the edited result must be a JSON object, like the tool's outputs".into(),
                ));
            }
            let size = serialized_size(edited);
            if size > self.limits.outputs_bytes_max {
                return Err(ReviewRefusal::Invalid(format!(
                    "the edited result is {size} bytes, above the limit of {} bytes",
                    self.limits.outputs_bytes_max
                )));
            }
        }
        if item.kind == ReviewKind::Approval {
            if !item.assignees.is_empty()
                && !item.assignees.iter().any(|a| {
                    a == &vote.reviewer
                        || vote
                            .email
                            .as_ref()
                            .is_some_and(|e| a.eq_ignore_ascii_case(e))
                })
            {
                return Err(ReviewRefusal::NotAssignee {
                    id,
                    reviewer: vote.reviewer,
                });
            }
            if item.votes.iter().any(|v| v.reviewer == vote.reviewer) {
                return Err(ReviewRefusal::AlreadyVoted {
                    id,
                    reviewer: vote.reviewer,
                });
            }
        }
        let Some(mut item) = self.reviews.remove(&i) else {
            return Err(ReviewRefusal::Unknown(id));
        };
        let verdict = vote.verdict;
        item.votes.push(vote);
        let decided = match (item.kind, verdict) {
            (ReviewKind::Approval, Verdict::Approve) => item.approvals() >= item.quorum as usize,
            _ => true,
        };
        if !decided {
            // Not yet a quorum: the vote is recorded and the item stays open.
            self.reviews_out.push(item.clone());
            self.reviews.insert(i, item.clone());
            return Ok(item);
        }
        self.close_review(i, item, verdict, ReviewState::from(verdict), now)
    }

    /// Handles an expiry wakeup: an approval still open whose expiry has come is decided
    /// with its `on_expiry` verdict, by `system`. Returns whether it expired.
    pub fn expire_review(&mut self, task_run_id: TaskRunId, now: Timestamp) -> bool {
        let Some(&i) = self.by_id.get(&task_run_id) else {
            return false;
        };
        let due = self
            .reviews
            .get(&i)
            .and_then(|item| item.expires_at)
            .is_some_and(|at| at <= now);
        if !due {
            return false;
        }
        let Some(mut item) = self.reviews.remove(&i) else {
            return false;
        };
        let verdict = item.on_expiry.unwrap_or(Verdict::Reject);
        item.votes.push(Vote {
            reviewer: "system".into(),
            email: None,
            verdict,
            edited: None,
            comment: Some("the approval expired".into()),
            at: now,
        });
        let _ = self.close_review(i, item, verdict, ReviewState::Expired, now);
        true
    }

    fn close_review(
        &mut self,
        i: usize,
        mut item: ReviewItem,
        verdict: Verdict,
        state: ReviewState,
        now: Timestamp,
    ) -> Result<ReviewItem, ReviewRefusal> {
        item.state = state;
        item.decided_at = Some(now);
        self.push_review_decided(&item, now);
        self.reviews_out.push(item.clone());
        let last = item.votes.last().cloned();
        let by = last
            .as_ref()
            .map(|v| v.email.clone().unwrap_or_else(|| v.reviewer.clone()))
            .unwrap_or_else(|| "a reviewer".into());
        let comment = last.as_ref().and_then(|v| v.comment.clone());
        match verdict {
            Verdict::Approve => {
                let outputs = match item.kind {
                    ReviewKind::Approval => json!({
                        "approved": true,
                        "approvers": item.votes.iter()
                            .filter(|v| v.verdict == Verdict::Approve)
                            .map(|v| v.email.clone().unwrap_or_else(|| v.reviewer.clone()))
                            .collect::<Vec<_>>(),
                        "comments": item.votes.iter()
                            .filter_map(|v| v.comment.clone())
                            .collect::<Vec<_>>(),
                        "expired": state == ReviewState::Expired,
                    }),
                    _ => last
                        .and_then(|v| v.edited)
                        .unwrap_or_else(|| item.proposed.clone()),
                };
                self.task_runs[i].outputs = Some(outputs);
                self.finish(i, TaskRunState::Succeeded, None, now);
            }
            Verdict::Reject => {
                let mut message = if state == ReviewState::Expired {
                    "the approval expired".to_owned()
                } else {
                    format!("{REJECTED_PREFIX}{by}")
                };
                if let Some(comment) = &comment {
                    message.push_str(": ");
                    message.push_str(comment);
                }
                let on_reject = match item.kind {
                    ReviewKind::Approval => OnReject::Fail,
                    _ => self.policy_of(i).map(|p| p.on_reject).unwrap_or_default(),
                };
                let rounds = {
                    let count = self.rejections.entry(i).or_insert(0);
                    *count += 1;
                    *count
                };
                match on_reject {
                    OnReject::Retry
                        if rounds < review::REVIEW_ROUNDS_MAX
                            && self.run.state == RunState::Running =>
                    {
                        self.task_runs[i].error = Some(message.clone());
                        self.review_comments.insert(i, comment.unwrap_or(message));
                        self.enqueue(i, now);
                    }
                    OnReject::Skip => {
                        self.finish(i, TaskRunState::Skipped, Some(message), now);
                    }
                    OnReject::Retry => {
                        let message = format!(
                            "{message} (rejected {rounds} times; the retries on rejection are used up)"
                        );
                        self.finish(i, TaskRunState::Failed, Some(message), now);
                    }
                    OnReject::Fail => {
                        self.finish(i, TaskRunState::Failed, Some(message), now);
                    }
                }
            }
        }
        Ok(item)
    }

    /// The routing policy of task run `i`'s task (none for compensations).
    fn policy_of(&self, i: usize) -> Option<ReviewPolicy> {
        self.pipeline
            .task(&self.task_runs[i].task_id)
            .and_then(TaskDef::review_policy)
    }

    /// Applies a successful attempt's outputs: an `approval` opens its gate; a routed
    /// task's result is applied, applied with a notice, or held for review; anything else
    /// succeeds.
    fn apply_result(&mut self, i: usize, outputs: Value, now: Timestamp) {
        // Only what routing needs is taken from the task (this runs on every success).
        let routing = self
            .pipeline
            .task(&self.task_runs[i].task_id)
            .and_then(|task| {
                if task.tool == review::APPROVAL_TOOL {
                    Some((task.tool.clone(), None))
                } else {
                    task.review_policy()
                        .map(|policy| (task.tool.clone(), Some(policy)))
                }
            });
        let Some((tool, policy)) = routing else {
            // Neither routed nor a gate (or a compensation): the task run succeeds.
            self.task_runs[i].outputs = Some(outputs);
            self.finish(i, TaskRunState::Succeeded, None, now);
            return;
        };
        let Some(policy) = policy else {
            let request = match serde_json::from_value::<ApprovalRequest>(outputs.clone()) {
                Ok(request) => request,
                Err(err) => {
                    let message =
                        format!("approval: the tool's outputs do not describe a gate: {err}");
                    self.finish(i, TaskRunState::Failed, Some(message), now);
                    return;
                }
            };
            let mut item = self.new_review(i, tool, ReviewKind::Approval, Value::Null, now);
            item.assignees = request.assignees;
            item.quorum = request.quorum.max(1);
            item.message = request.message;
            item.expires_at = request.expires_in.map(|d| now.plus(d));
            item.on_expiry = Some(request.on_expiry);
            self.hold_for_review(i, item, now);
            return;
        };
        let confidence = review::confidence_of(&outputs, &policy.confidence);
        let thresholds = self
            .thresholds
            .get(&self.task_runs[i].task_id)
            .copied()
            .unwrap_or_else(|| policy.fixed());
        let routed = review::route(confidence, &thresholds);
        let (kind, sample_rate) = match routed {
            review::Route::Queue => (Some(ReviewKind::Confidence), 1.0),
            review::Route::Notify => (Some(ReviewKind::Notice), 1.0),
            review::Route::Apply if review::is_audited(self.task_runs[i].id, policy.audit_rate) => {
                (Some(ReviewKind::Notice), policy.audit_rate)
            }
            review::Route::Apply => (None, 1.0),
        };
        let Some(kind) = kind else {
            self.task_runs[i].outputs = Some(outputs);
            self.finish(i, TaskRunState::Succeeded, None, now);
            return;
        };
        let mut item = self.new_review(i, tool, kind, outputs.clone(), now);
        item.confidence = confidence;
        item.thresholds = Some(thresholds);
        item.sample_rate = sample_rate;
        item.rationale = policy.rationale.as_ref().and_then(|field| {
            review::field_of(&outputs, field).map(|v| {
                let mut text = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                truncate_to(&mut text, review::RATIONALE_BYTES_MAX);
                text
            })
        });
        if kind == ReviewKind::Notice {
            self.push_review_requested(&item, now);
            self.reviews_out.push(item);
            self.task_runs[i].outputs = Some(outputs);
            self.finish(i, TaskRunState::Succeeded, None, now);
        } else {
            self.hold_for_review(i, item, now);
        }
    }

    fn new_review(
        &self,
        i: usize,
        tool: String,
        kind: ReviewKind,
        proposed: Value,
        now: Timestamp,
    ) -> ReviewItem {
        let task_run = &self.task_runs[i];
        ReviewItem {
            id: ReviewId::new(),
            org_id: self.run.org_id,
            run_id: self.run.id,
            task_run_id: task_run.id,
            task_id: task_run.task_id.clone(),
            index: task_run.index,
            pipeline_name: self.run.pipeline_name.clone(),
            tool,
            kind,
            state: ReviewState::Open,
            attempt: task_run.attempt,
            inputs: task_run.inputs.clone().unwrap_or(Value::Null),
            proposed,
            confidence: None,
            rationale: None,
            thresholds: None,
            sample_rate: 1.0,
            assignees: Vec::new(),
            quorum: 1,
            message: None,
            expires_at: None,
            on_expiry: None,
            votes: Vec::new(),
            created_at: now,
            decided_at: None,
            claimed_by: None,
            claim_expires_at: None,
        }
    }

    /// Parks task run `i` in the validation queue behind `item`.
    fn hold_for_review(&mut self, i: usize, item: ReviewItem, now: Timestamp) {
        self.transition(i, TaskRunState::AwaitingReview, now);
        if let Some(at) = item.expires_at {
            self.wakeups.push(Wakeup::ReviewExpiry {
                at,
                task_run_id: item.task_run_id,
            });
        }
        self.push_review_requested(&item, now);
        self.reviews_out.push(item.clone());
        self.reviews.insert(i, item);
    }

    fn push_review_requested(&mut self, item: &ReviewItem, now: Timestamp) {
        self.events.push(DomainEvent::ReviewRequested {
            org_id: item.org_id,
            run_id: item.run_id,
            task_run_id: item.task_run_id,
            task_id: item.task_id.clone(),
            review_id: item.id,
            kind: item.kind,
            confidence: item.confidence,
            at: now,
        });
    }

    fn push_review_decided(&mut self, item: &ReviewItem, now: Timestamp) {
        self.events.push(DomainEvent::ReviewDecided {
            org_id: item.org_id,
            run_id: item.run_id,
            task_run_id: item.task_run_id,
            task_id: item.task_id.clone(),
            review_id: item.id,
            state: item.state,
            at: now,
        });
    }

    /// Hands over what changed since the last call.
    pub fn take_changes(&mut self) -> Changes {
        let run = if self.run_dirty {
            Some(self.run.clone())
        } else {
            None
        };
        self.run_dirty = false;
        let dirty = std::mem::take(&mut self.dirty);
        Changes {
            run,
            task_runs: dirty
                .into_iter()
                .map(|i| self.task_runs[i].clone())
                .collect(),
            attempts: std::mem::take(&mut self.attempts_out),
            events: std::mem::take(&mut self.events),
            wakeups: std::mem::take(&mut self.wakeups),
            reviews: std::mem::take(&mut self.reviews_out),
        }
    }

    /// Every wakeup the current state needs (leases held, retries waiting); used after a
    /// restore to rebuild the engine's timers.
    pub fn pending_wakeups(&self) -> Vec<Wakeup> {
        self.task_runs
            .iter()
            .filter_map(|t| match (t.state, t.lease_expires_at, t.ready_at) {
                (TaskRunState::Running, Some(at), _) => Some(Wakeup::LeaseExpiry {
                    at,
                    task_run_id: t.id,
                    fencing_token: t.fencing_token,
                }),
                (TaskRunState::WaitingToRetry, _, Some(at)) => Some(Wakeup::RetryDue {
                    at,
                    task_run_id: t.id,
                }),
                _ => None,
            })
            .chain(self.reviews.values().filter_map(|item| {
                item.expires_at.map(|at| Wakeup::ReviewExpiry {
                    at,
                    task_run_id: item.task_run_id,
                })
            }))
            .collect()
    }

    // ---- internals ----

    fn retry_policy(&self, task_id: &TaskId) -> RetryPolicy {
        let retry = match self.pipeline.task(task_id) {
            Some(task) => task.retry.clone(),
            None => self
                .pipeline
                .def
                .compensated_task(task_id.as_str())
                .and_then(|t| t.compensate.as_ref())
                .and_then(|c| c.retry.clone()),
        };
        retry.unwrap_or_else(RetryPolicy::none)
    }

    fn close_attempt(
        &mut self,
        i: usize,
        state: AttemptState,
        error: Option<String>,
        now: Timestamp,
    ) {
        if let Some(mut attempt) = self.open_attempts.remove(&i) {
            attempt.state = state;
            attempt.finished_at = Some(now);
            attempt.error = error;
            self.attempts_out.push(attempt);
        }
    }

    fn transition(&mut self, i: usize, to: TaskRunState, now: Timestamp) {
        let task_run = &mut self.task_runs[i];
        if let Err(err) = task_run.state.check(to) {
            debug_assert!(false, "{err}");
            return;
        }
        task_run.state = to;
        self.dirty.insert(i);
        self.events.push(DomainEvent::TaskRunStateChanged {
            org_id: self.run.org_id,
            run_id: task_run.run_id,
            task_run_id: task_run.id,
            task_id: task_run.task_id.clone(),
            index: task_run.index,
            state: to,
            attempt: task_run.attempt,
            at: now,
        });
    }

    fn enqueue(&mut self, i: usize, now: Timestamp) {
        self.transition(i, TaskRunState::Queued, now);
        self.task_runs[i].queued_at = Some(now);
        self.queue.push_back(i);
    }

    fn set_run_state(&mut self, to: RunState, now: Timestamp, error: Option<String>) {
        if self.run.state == to {
            return;
        }
        if let Err(err) = self.run.state.check(to) {
            debug_assert!(false, "{err}");
            return;
        }
        self.run.state = to;
        if to.is_terminal() {
            self.run.finished_at = Some(now);
            self.run.error = error;
        }
        self.run_dirty = true;
        self.events.push(DomainEvent::RunStateChanged {
            org_id: self.run.org_id,
            run_id: self.run.id,
            state: to,
            at: now,
        });
    }

    /// Moves a task run to a terminal state without propagating.
    fn set_terminal(&mut self, i: usize, to: TaskRunState, error: Option<String>, now: Timestamp) {
        self.transition(i, to, now);
        let task_run = &mut self.task_runs[i];
        task_run.finished_at = Some(now);
        if error.is_some() {
            task_run.error = error;
        }
        if let Some(task_id) = task_run.index.map(|_| task_run.task_id.clone()) {
            if let Some(node) = self.nodes.get_mut(&task_id) {
                node.children_terminal += 1;
            }
        }
    }

    /// Moves a task run to a terminal state and propagates: a fan-out item may finish its
    /// parent; a finished parent may ready its dependents; the run may finish.
    fn finish(&mut self, i: usize, to: TaskRunState, error: Option<String>, now: Timestamp) {
        self.set_terminal(i, to, error, now);
        if self.compensations.contains(&i) {
            // A compensation has no dependents: the next one starts, or the run ends.
            self.check_run_finished(now);
            return;
        }
        let mut finished_tasks = VecDeque::new();
        let task_id = self.task_runs[i].task_id.clone();
        if self.task_runs[i].index.is_some() {
            if self.finish_parent_if_done(&task_id, now) {
                finished_tasks.push_back(task_id);
            }
        } else {
            finished_tasks.push_back(task_id);
        }
        while let Some(done) = finished_tasks.pop_front() {
            let dependents: Vec<TaskId> = self.pipeline.dag.dependents(&done).to_vec();
            for dependent in dependents {
                if self.try_ready(&dependent, now) {
                    finished_tasks.push_back(dependent);
                }
            }
        }
        self.check_run_finished(now);
    }

    /// When every item of a fan-out is terminal, finishes the parent. Returns whether it did.
    fn finish_parent_if_done(&mut self, task_id: &TaskId, now: Timestamp) -> bool {
        let node = &self.nodes[task_id];
        if node.children_terminal < node.children.len() {
            return false;
        }
        let parent = node.parent;
        if self.task_runs[parent].state.is_terminal() {
            return false;
        }
        let children = node.children.clone();
        let mut failed = 0;
        let mut first_error = None;
        let mut outputs = Vec::with_capacity(children.len());
        for &c in &children {
            let child = &self.task_runs[c];
            // An item a reviewer rejected with `on_reject: skip` is dropped (`null`).
            if child.state != TaskRunState::Succeeded && !skipped_by_rejection(child) {
                failed += 1;
                if first_error.is_none() {
                    first_error = Some(format!(
                        "item {}: {}",
                        child.index.unwrap_or_default(),
                        child
                            .error
                            .clone()
                            .unwrap_or_else(|| child.state.to_string())
                    ));
                }
            }
            outputs.push(child.outputs.clone().unwrap_or(Value::Null));
        }
        self.task_runs[parent].outputs = Some(Value::Array(outputs));
        if failed == 0 {
            self.set_terminal(parent, TaskRunState::Succeeded, None, now);
        } else {
            let message = format!(
                "{failed} of {} items failed; first: {}",
                children.len(),
                first_error.unwrap_or_default()
            );
            self.set_terminal(parent, TaskRunState::Failed, Some(message), now);
        }
        true
    }

    /// If a pending task's dependencies are all terminal, decides what happens to it: skip it
    /// (an upstream failed, or its condition is false), fail it (a template error), fan it
    /// out, or queue it. Returns whether the task reached a terminal state at once.
    fn try_ready(&mut self, task_id: &TaskId, now: Timestamp) -> bool {
        if self.run.state != RunState::Running {
            return false;
        }
        let parent = self.nodes[task_id].parent;
        if self.task_runs[parent].state != TaskRunState::Pending {
            return false;
        }
        let mut blocked_by = None;
        for dep in self.pipeline.dag.dependencies(task_id) {
            let dep_state = self.task_runs[self.nodes[dep].parent].state;
            if !dep_state.is_terminal() {
                return false;
            }
            if blocked_by.is_none() && !self.lets_dependents_run(dep) {
                blocked_by = Some((dep.clone(), dep_state));
            }
        }
        if let Some((dep, state)) = blocked_by {
            self.set_terminal(
                parent,
                TaskRunState::Skipped,
                Some(format!("upstream task {dep} {state}")),
                now,
            );
            return true;
        }
        let task = self
            .pipeline
            .task(task_id)
            .expect("nodes belong to pipeline tasks")
            .clone();
        let context = self.template_context(&task);
        if let Some(condition) = &task.condition {
            match self.templates.condition(condition, &context) {
                Ok(true) => {}
                Ok(false) => {
                    self.set_terminal(
                        parent,
                        TaskRunState::Skipped,
                        Some(format!("condition is false: {condition}")),
                        now,
                    );
                    return true;
                }
                Err(err) => {
                    self.set_terminal(
                        parent,
                        TaskRunState::Failed,
                        Some(format!("condition: {err}")),
                        now,
                    );
                    return true;
                }
            }
        }
        match &task.for_each {
            None => match self
                .templates
                .render_value(&Value::Object(task.inputs.clone()), &context)
            {
                Ok(inputs) => {
                    self.task_runs[parent].inputs = Some(inputs);
                    self.enqueue(parent, now);
                    false
                }
                Err(err) => {
                    self.set_terminal(
                        parent,
                        TaskRunState::Failed,
                        Some(format!("inputs: {err}")),
                        now,
                    );
                    true
                }
            },
            Some(for_each) => self.fan_out(&task, parent, for_each, &context, now),
        }
    }

    /// Whether a finished task lets its dependents run. A task that succeeded does; so does
    /// one skipped because its condition was false. A task skipped because an upstream task
    /// failed or was cancelled does not: otherwise the failure would stop only one level down
    /// and the tasks below the skipped one would run. The state alone cannot tell the two
    /// skips apart, so this walks up through skipped tasks: a skip blocks when a failed or
    /// cancelled task lies above it (a skip by condition only happens once every dependency
    /// let it run). Linear in the skipped part of the upstream graph.
    fn lets_dependents_run(&self, task_id: &TaskId) -> bool {
        let mut seen = BTreeSet::new();
        let mut stack = vec![task_id];
        while let Some(task) = stack.pop() {
            match self.task_runs[self.nodes[task].parent].state {
                TaskRunState::Succeeded => {}
                TaskRunState::Skipped
                    if skipped_by_rejection(&self.task_runs[self.nodes[task].parent]) =>
                {
                    return false;
                }
                TaskRunState::Skipped => {
                    for dep in self.pipeline.dag.dependencies(task) {
                        if seen.insert(dep) {
                            stack.push(dep);
                        }
                    }
                }
                _ => return false,
            }
        }
        true
    }

    fn fan_out(
        &mut self,
        task: &TaskDef,
        parent: usize,
        for_each: &Value,
        context: &minijinja::Value,
        now: Timestamp,
    ) -> bool {
        let items = match self.templates.render_value(for_each, context) {
            Ok(Value::Array(items)) => items,
            Ok(other) => {
                let kind = match other {
                    Value::Null => "null",
                    Value::Bool(_) => "a boolean",
                    Value::Number(_) => "a number",
                    Value::String(_) => "a string",
                    Value::Object(_) => "an object",
                    Value::Array(_) => "an array",
                };
                let message = format!("for_each must yield a list, got {kind}");
                self.set_terminal(parent, TaskRunState::Failed, Some(message), now);
                return true;
            }
            Err(err) => {
                self.set_terminal(
                    parent,
                    TaskRunState::Failed,
                    Some(format!("for_each: {err}")),
                    now,
                );
                return true;
            }
        };
        if items.len() > self.limits.fan_out_items_max {
            let message = format!(
                "for_each yields {} items, above the limit of {}",
                items.len(),
                self.limits.fan_out_items_max
            );
            self.set_terminal(parent, TaskRunState::Failed, Some(message), now);
            return true;
        }
        self.task_runs[parent].fan_out = Some(items.len() as u32);
        if items.is_empty() {
            // Pending → succeeded is not a legal transition: the fan-out starts and finishes
            // at once. (Going straight to succeeded was refused by `transition`, which left
            // the parent pending and the run stuck for ever in release builds.)
            self.transition(parent, TaskRunState::Running, now);
            self.task_runs[parent].started_at = Some(now);
            self.task_runs[parent].outputs = Some(Value::Array(Vec::new()));
            self.set_terminal(parent, TaskRunState::Succeeded, None, now);
            return true;
        }
        self.transition(parent, TaskRunState::Running, now);
        self.task_runs[parent].started_at = Some(now);
        let inputs = Value::Object(task.inputs.clone());
        let templated = crate::pipeline::template::has_templates(&inputs);
        let run_id = self.run.id;
        for (index, item) in items.into_iter().enumerate() {
            let rendered = if templated {
                let item_context = minijinja::context! { item => minijinja::Value::from_serialize(&item), index => index, ..context.clone() };
                self.templates.render_value(&inputs, &item_context)
            } else {
                Ok(inputs.clone())
            };
            let i = self.task_runs.len();
            self.task_runs.push(TaskRunRecord::pending(
                run_id,
                task.id.clone(),
                Some(index as u32),
                Some(item),
                now,
            ));
            self.by_id.insert(self.task_runs[i].id, i);
            self.nodes
                .get_mut(&task.id)
                .expect("node exists")
                .children
                .push(i);
            self.dirty.insert(i);
            match rendered {
                Ok(inputs) => {
                    self.task_runs[i].inputs = Some(inputs);
                    self.enqueue(i, now);
                }
                Err(err) => {
                    self.set_terminal(i, TaskRunState::Failed, Some(format!("inputs: {err}")), now)
                }
            }
        }
        // Items that failed to render may already complete the fan-out.
        self.finish_parent_if_done(&task.id, now)
    }

    /// Outputs of a task's direct dependencies, by task id.
    fn upstream_outputs(&self, task_id: &TaskId) -> BTreeMap<String, Value> {
        self.pipeline
            .dag
            .dependencies(task_id)
            .map(|dep| {
                let parent = &self.task_runs[self.nodes[dep].parent];
                (
                    dep.to_string(),
                    parent.outputs.clone().unwrap_or(Value::Null),
                )
            })
            .collect()
    }

    fn template_context(&self, task: &TaskDef) -> minijinja::Value {
        self.context_of(task, false)
    }

    /// The template context of a task: its dependencies under `tasks`, and the task itself
    /// too with `include_self` (for its compensation).
    fn context_of(&self, task: &TaskDef, include_self: bool) -> minijinja::Value {
        let mut tasks = serde_json::Map::new();
        let own = include_self.then_some(&task.id);
        for dep in self.pipeline.dag.dependencies(&task.id).chain(own) {
            let parent = &self.task_runs[self.nodes[dep].parent];
            tasks.insert(
                dep.to_string(),
                json!({
                    "outputs": parent.outputs.clone().unwrap_or(Value::Null),
                    "state": parent.state.as_str(),
                }),
            );
        }
        let context = json!({
            "params": self.run.params,
            "tasks": tasks,
            "run": {"id": self.run.id.to_string(), "pipeline": self.run.pipeline_name},
        });
        minijinja::Value::from_serialize(&context)
    }

    fn check_run_finished(&mut self, now: Timestamp) {
        if self.run.state != RunState::Running {
            return;
        }
        let mut failed: Option<String> = None;
        for task_id in self.pipeline.dag.topological_order() {
            let parent = &self.task_runs[self.nodes[task_id].parent];
            if !parent.state.is_terminal() {
                return;
            }
            if matches!(parent.state, TaskRunState::Failed | TaskRunState::Cancelled)
                && failed.is_none()
            {
                failed = Some(format!(
                    "task {} {}: {}",
                    parent.task_id,
                    parent.state,
                    parent.error.clone().unwrap_or_default()
                ));
            }
        }
        let Some(message) = failed else {
            self.set_run_state(RunState::Succeeded, now, None);
            return;
        };
        if self.compensations.is_empty() {
            self.begin_compensation(now);
        }
        if self.advance_compensation(now) {
            return;
        }
        let message = if self.compensations.is_empty() {
            message
        } else {
            let failed = self
                .compensations
                .iter()
                .filter(|&&i| self.task_runs[i].state != TaskRunState::Succeeded)
                .count();
            format!(
                "{message}; {} compensation{} ran, {failed} of them failed",
                self.compensations.len(),
                if self.compensations.len() == 1 {
                    ""
                } else {
                    "s"
                }
            )
        };
        self.set_run_state(RunState::Failed, now, Some(message));
    }

    /// Where a compensation of `task` comes in the compensating phase: the latest finished
    /// first, and among tasks finished at the same time the latest in topological order
    /// first (so a task is undone before the tasks it depends on, even when both finished in
    /// the same instant).
    fn compensation_key(&self, task: &TaskId) -> CompensationKey {
        let finished_at = self.task_runs[self.nodes[task].parent].finished_at;
        let position = self
            .pipeline
            .dag
            .topological_order()
            .iter()
            .position(|t| t == task)
            .unwrap_or_default();
        (Reverse(finished_at), Reverse(position))
    }

    /// Enters the compensating phase: one pending compensation task run for every task
    /// that succeeded and declares `compensate` (fan-outs excluded: validation refuses
    /// them), ordered by [`RunExecution::compensation_key`]. All are created at once, so the
    /// store holds the whole plan; [`RunExecution::advance_compensation`] starts them one
    /// at a time.
    fn begin_compensation(&mut self, now: Timestamp) {
        let mut keyed: Vec<(CompensationKey, TaskId, TaskId)> = Vec::new();
        for task in &self.pipeline.def.tasks {
            if task.compensate.is_none() || task.for_each.is_some() {
                continue;
            }
            let Some(node) = self.nodes.get(&task.id) else {
                continue;
            };
            if self.task_runs[node.parent].state != TaskRunState::Succeeded {
                continue;
            }
            let Some(id) = compensation_task_id(&task.id) else {
                continue;
            };
            keyed.push((self.compensation_key(&task.id), task.id.clone(), id));
        }
        keyed.sort();
        let run_id = self.run.id;
        for (_, _, id) in keyed {
            let i = self.task_runs.len();
            self.task_runs
                .push(TaskRunRecord::pending(run_id, id, None, None, now));
            self.by_id.insert(self.task_runs[i].id, i);
            self.dirty.insert(i);
            self.compensations.push(i);
        }
    }

    /// Moves the compensating phase on: when no compensation is queued, running or waiting
    /// to retry, the next pending one is rendered and queued (one whose inputs do not
    /// render fails, and the next is tried). A failed compensation does not stop the
    /// others. Returns whether a compensation is still under way.
    fn advance_compensation(&mut self, now: Timestamp) -> bool {
        for position in 0..self.compensations.len() {
            let i = self.compensations[position];
            match self.task_runs[i].state {
                state if state.is_terminal() => continue,
                TaskRunState::Pending => {}
                _ => return true,
            }
            let task = self
                .pipeline
                .def
                .compensated_task(self.task_runs[i].task_id.as_str())
                .expect("compensation task runs belong to compensated tasks")
                .clone();
            let compensate = task.compensate.as_ref().expect("a compensated task");
            let context = self.context_of(&task, true);
            match self
                .templates
                .render_value(&Value::Object(compensate.inputs.clone()), &context)
            {
                Ok(inputs) => {
                    self.task_runs[i].inputs = Some(inputs);
                    self.enqueue(i, now);
                    return true;
                }
                Err(err) => {
                    self.set_terminal(i, TaskRunState::Failed, Some(format!("inputs: {err}")), now);
                }
            }
        }
        false
    }
}

/// The order of a compensation: see [`RunExecution::compensation_key`].
type CompensationKey = (Reverse<Option<Timestamp>>, Reverse<usize>);

/// The length in bytes of a value's JSON text, counted without building the text: every
/// completion is measured against [`ExecutionLimits::outputs_bytes_max`], so this is on the
/// hot path.
/// How the error of a task run rejected by a reviewer begins.
const REJECTED_PREFIX: &str = "rejected by ";

/// Whether a task run was skipped because a reviewer rejected its result (`on_reject:
/// skip`): unlike a skip by condition, it stops its dependents (they are skipped too), and
/// as a fan-out item it is dropped from its parent's outputs (`null`) without failing it.
fn skipped_by_rejection(task_run: &TaskRunRecord) -> bool {
    task_run.state == TaskRunState::Skipped
        && task_run
            .error
            .as_deref()
            .is_some_and(|e| e.starts_with(REJECTED_PREFIX))
}

/// Cuts `text` to at most `max` bytes, at a character boundary.
fn truncate_to(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}

fn serialized_size(value: &Value) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    match serde_json::to_writer(&mut counter, value) {
        Ok(()) => counter.0,
        Err(_) => usize::MAX,
    }
}
