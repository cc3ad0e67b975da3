//! The scheduler: the single writer of the runs it drives.
//!
//! It takes commands from a bounded inbox (submit, resume, cancel, a worker's completion or
//! heartbeat, a watch) and timer wakeups (lease expiry, retry due), applies them to the
//! in-memory [`RunExecution`]s, leases queued task runs to free worker slots, commits every
//! change of the batch in one store transaction, and only then hands the leases to the
//! workers, publishes the events and answers the callers.
//!
//! Tests drive it with [`Scheduler::step`], one input at a time, with a manual clock.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::Arc;

use arches_core::events::DomainEvent;
use arches_core::execution::{Assignment, AttemptOutcome, RunExecution, Wakeup};
use arches_core::ports::Store;
use arches_core::records::{RunRecord, TaskOffer, WriteBatch};
use arches_core::review::{
    calibrate, FeedbackPoint, ReviewItem, Thresholds, Vote, CALIBRATION_FEEDBACK_MAX,
};
use arches_core::{Clock, OrgId, ReviewId, RunId, TaskId, TaskRunId, Timestamp};
use rand::Rng;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::bus::{BusEvent, EventBus};
use crate::{Dispatching, EngineOptions, Error, FailPoints};

/// An input of the scheduler.
#[derive(Debug)]
pub enum Command {
    /// Start a new run (created with [`RunExecution::create`]).
    Submit {
        /// The run.
        execution: Box<RunExecution>,
        /// Answered once the run's rows are committed.
        reply: oneshot::Sender<Result<RunId, Error>>,
    },
    /// Continue a run restored from the store (with [`RunExecution::restore`]).
    Resume {
        /// The run.
        execution: Box<RunExecution>,
        /// Answered once the resumed state is committed.
        reply: oneshot::Sender<Result<RunId, Error>>,
    },
    /// Cancel a run.
    Cancel {
        /// The run.
        run_id: RunId,
        /// Recorded on the task runs it stops.
        reason: String,
        /// Answered once the cancel is committed.
        reply: oneshot::Sender<Result<(), Error>>,
    },
    /// A worker finished an attempt.
    Completed {
        /// The run.
        run_id: RunId,
        /// The task run.
        task_run_id: TaskRunId,
        /// The lease's fencing token.
        fencing_token: u64,
        /// How it ended.
        outcome: AttemptOutcome,
        /// When the tool started executing.
        executed_at: Timestamp,
        /// When it ended.
        finished_at: Timestamp,
        /// For a completion taken from the store's task queue: its stored row (deleted in
        /// the commit that applies it) and the worker that executed the attempt.
        queued: Option<QueuedOrigin>,
    },
    /// A worker still holds a lease.
    Heartbeat {
        /// The run.
        run_id: RunId,
        /// The task run.
        task_run_id: TaskRunId,
        /// The lease's fencing token.
        fencing_token: u64,
    },
    /// A reviewer's vote on an open blocking item of the validation queue.
    Decide {
        /// The run.
        run_id: RunId,
        /// The item.
        review_id: ReviewId,
        /// The vote.
        vote: Vote,
        /// Answered once the vote is committed, with the item as it is then.
        reply: oneshot::Sender<Result<ReviewItem, Error>>,
    },
    /// Feedback on a task's results was stored outside the scheduler (a decision on a
    /// notice): fit its calibration again.
    Recalibrate {
        /// The org.
        org_id: OrgId,
        /// The pipeline.
        pipeline: String,
        /// The task.
        task_id: TaskId,
    },
    /// Answer with the run's record once it is finished.
    Watch {
        /// The run.
        run_id: RunId,
        /// Answered when the run is over (at once if it already is).
        reply: oneshot::Sender<Result<RunRecord, Error>>,
    },
}

impl Command {
    /// The completion a standalone worker stored on the task queue, as the scheduler's
    /// input.
    pub fn from_queued(completion: arches_core::records::QueuedCompletion) -> Command {
        Command::Completed {
            run_id: completion.run_id,
            task_run_id: completion.task_run_id,
            fencing_token: completion.fencing_token,
            outcome: completion.outcome,
            executed_at: completion.executed_at,
            finished_at: completion.finished_at,
            queued: Some(QueuedOrigin {
                seq: completion.seq,
                worker: completion.worker,
            }),
        }
    }
}

/// Where a completion from the store's task queue came from.
#[derive(Debug, Clone)]
pub struct QueuedOrigin {
    /// The stored completion's sequence number.
    pub seq: i64,
    /// The standalone worker that executed the attempt.
    pub worker: String,
}

/// What the scheduler sends the worker pool.
#[derive(Debug)]
pub enum Dispatch {
    /// Execute an attempt.
    Run(Box<Assignment>),
    /// Stop an attempt (cancelled run, or a lease that is no longer this worker's).
    Stop(TaskRunId, u64),
}

/// What one [`Scheduler::step`] did.
#[derive(Debug, Default)]
pub struct StepReport {
    /// Inbox commands applied.
    pub commands: usize,
    /// Wakeups that fired.
    pub wakeups: usize,
    /// Leases handed out, in order.
    pub assignments: Vec<Assignment>,
    /// Task-run rows written.
    pub task_runs_written: usize,
    /// Events published.
    pub events: Vec<DomainEvent>,
}

impl StepReport {
    /// Whether the step found nothing to do.
    pub fn is_idle(&self) -> bool {
        self.commands == 0
            && self.wakeups == 0
            && self.assignments.is_empty()
            && self.task_runs_written == 0
    }
}

/// A cheap, cloneable handle to the scheduler.
#[derive(Clone, Debug)]
pub struct SchedulerHandle {
    inbox: mpsc::Sender<Command>,
    events: broadcast::Sender<DomainEvent>,
    recovered: CancellationToken,
}

impl SchedulerHandle {
    /// Says that every run this scheduler owns and must resume has been resumed (or that
    /// there was none). On the task queue, the completions stored for this scheduler are
    /// taken only from then on: a completion of a run not yet resumed would otherwise be
    /// taken for one of a finished run and deleted. Call it once recovery is over (a
    /// process that resumes nothing calls it at once).
    pub fn mark_recovered(&self) {
        self.recovered.cancel();
    }

    /// Resolves once [`SchedulerHandle::mark_recovered`] was called.
    pub async fn recovered(&self) {
        self.recovered.cancelled().await;
    }

    /// Sends a command, waiting while the inbox is full.
    ///
    /// # Errors
    /// [`Error::Stopped`] when the scheduler has stopped.
    pub async fn send(&self, command: Command) -> Result<(), Error> {
        self.inbox.send(command).await.map_err(|_| Error::Stopped)
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, Error>>) -> Command,
    ) -> Result<T, Error> {
        let (reply, answer) = oneshot::channel();
        self.send(make(reply)).await?;
        answer.await.map_err(|_| Error::Stopped)?
    }

    /// Starts a new run; returns once its rows are committed.
    ///
    /// # Errors
    /// [`Error::Stopped`], [`Error::AlreadyActive`], or the store's error.
    pub async fn submit(&self, execution: RunExecution) -> Result<RunId, Error> {
        self.call(|reply| Command::Submit {
            execution: Box::new(execution),
            reply,
        })
        .await
    }

    /// Continues a restored run.
    ///
    /// # Errors
    /// As [`SchedulerHandle::submit`].
    pub async fn resume(&self, execution: RunExecution) -> Result<RunId, Error> {
        self.call(|reply| Command::Resume {
            execution: Box::new(execution),
            reply,
        })
        .await
    }

    /// Cancels a run: running task runs are stopped and the rest skipped.
    ///
    /// # Errors
    /// [`Error::UnknownRun`] when this engine does not drive the run.
    pub async fn cancel(&self, run_id: RunId, reason: &str) -> Result<(), Error> {
        self.call(|reply| Command::Cancel {
            run_id,
            reason: reason.to_owned(),
            reply,
        })
        .await
    }

    /// Applies a reviewer's vote on an open blocking item of a run this engine drives;
    /// returns the item once the vote is committed.
    ///
    /// # Errors
    /// [`Error::UnknownRun`] when this engine does not drive the run; [`Error::Review`]
    /// when the vote is refused (decided already, not an assignee, …).
    pub async fn decide(
        &self,
        run_id: RunId,
        review_id: ReviewId,
        vote: Vote,
    ) -> Result<ReviewItem, Error> {
        self.call(|reply| Command::Decide {
            run_id,
            review_id,
            vote,
            reply,
        })
        .await
    }

    /// Says that feedback on a task's results was stored outside the scheduler (a decision
    /// on a notice), so its calibration is fitted again.
    ///
    /// # Errors
    /// [`Error::Stopped`].
    pub async fn recalibrate(
        &self,
        org_id: OrgId,
        pipeline: String,
        task_id: TaskId,
    ) -> Result<(), Error> {
        self.send(Command::Recalibrate {
            org_id,
            pipeline,
            task_id,
        })
        .await
    }

    /// Waits until the run is over and returns its record.
    ///
    /// # Errors
    /// [`Error::UnknownRun`] when the run exists nowhere; [`Error::Stopped`].
    pub async fn wait(&self, run_id: RunId) -> Result<RunRecord, Error> {
        self.call(|reply| Command::Watch { run_id, reply }).await
    }

    /// Subscribes to domain events published after each commit.
    pub fn subscribe(&self) -> broadcast::Receiver<DomainEvent> {
        self.events.subscribe()
    }
}

enum Reply {
    Run(oneshot::Sender<Result<RunId, Error>>, RunId),
    Done(oneshot::Sender<Result<(), Error>>),
    Decided(oneshot::Sender<Result<ReviewItem, Error>>, Box<ReviewItem>),
}

/// A task whose results are routed, as the calibration cache keys it.
type CalibrationKey = (OrgId, String, TaskId);

/// The scheduler. See the module documentation.
pub struct Scheduler {
    options: EngineOptions,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    failpoints: FailPoints,
    inbox: mpsc::Receiver<Command>,
    handle: SchedulerHandle,
    dispatch: mpsc::UnboundedSender<Dispatch>,
    runs: HashMap<RunId, RunExecution>,
    run_order: Vec<RunId>,
    round_robin: usize,
    wakeups: BinaryHeap<Reverse<(Timestamp, u64, RunId, Wakeup)>>,
    wakeup_seq: u64,
    in_flight: usize,
    /// With [`Dispatching::TaskQueue`]: the leases offered and not yet reported back, by
    /// task run and fencing token (`in_flight` counts the worker pool's leases otherwise).
    offered: HashSet<(TaskRunId, u64)>,
    /// Offers, withdrawals and applied completions for the next commit.
    queue_writes: WriteBatch,
    touched: HashSet<RunId>,
    replies: Vec<Reply>,
    stops: Vec<(TaskRunId, u64)>,
    waiters: HashMap<RunId, Vec<oneshot::Sender<Result<RunRecord, Error>>>>,
    /// Where committed events are published for live watchers, besides the handle's
    /// broadcast.
    bus: Option<Arc<dyn EventBus>>,
    /// Set when a flush failed: memory may hold changes the store does not, so the scheduler
    /// refuses to go on (a new one must be built from the store).
    poisoned: bool,
    /// The feedback of routed tasks (their decided results), read once per task and read
    /// again when a decision on one of their results is committed; each run's thresholds
    /// are fitted on it with the run's own policy.
    calibrations: HashMap<CalibrationKey, Arc<Vec<FeedbackPoint>>>,
}

impl Scheduler {
    /// A scheduler and the receiving end of its dispatches (for the worker pool, or for a
    /// test acting as the worker). The dispatch channel is unbounded but holds at most
    /// `worker_slots` leases plus one stop per lease, because the scheduler never leases
    /// beyond its free slots.
    pub fn new(
        options: EngineOptions,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        failpoints: FailPoints,
    ) -> (Scheduler, mpsc::UnboundedReceiver<Dispatch>) {
        let (inbox_tx, inbox) = mpsc::channel(options.inbox_capacity.max(1));
        let (events, _) = broadcast::channel(options.event_capacity.max(1));
        let (dispatch, dispatch_rx) = mpsc::unbounded_channel();
        let scheduler = Scheduler {
            options,
            store,
            clock,
            failpoints,
            inbox,
            handle: SchedulerHandle {
                inbox: inbox_tx,
                events,
                recovered: CancellationToken::new(),
            },
            dispatch,
            runs: HashMap::new(),
            run_order: Vec::new(),
            round_robin: 0,
            wakeups: BinaryHeap::new(),
            wakeup_seq: 0,
            in_flight: 0,
            offered: HashSet::new(),
            queue_writes: WriteBatch::default(),
            touched: HashSet::new(),
            replies: Vec::new(),
            stops: Vec::new(),
            waiters: HashMap::new(),
            bus: None,
            poisoned: false,
            calibrations: HashMap::new(),
        };
        (scheduler, dispatch_rx)
    }

    /// Publishes committed events on `bus` too.
    pub fn set_event_bus(&mut self, bus: Arc<dyn EventBus>) {
        self.bus = Some(bus);
    }

    /// Replaces the failure points (tests).
    pub fn set_failpoints(&mut self, failpoints: FailPoints) {
        self.failpoints = failpoints;
    }

    /// A handle for callers and workers.
    pub fn handle(&self) -> SchedulerHandle {
        self.handle.clone()
    }

    /// Runs driven now.
    pub fn active_runs(&self) -> usize {
        self.runs.len()
    }

    /// A run driven now.
    pub fn execution(&self, run_id: RunId) -> Option<&RunExecution> {
        self.runs.get(&run_id)
    }

    /// Leases handed out (or offered on the task queue) and not yet reported back.
    pub fn in_flight(&self) -> usize {
        match self.options.dispatching {
            Dispatching::InProcess => self.in_flight,
            Dispatching::TaskQueue => self.offered.len(),
        }
    }

    fn queued(&self) -> bool {
        self.options.dispatching == Dispatching::TaskQueue
    }

    /// Offers a lease on the task queue (committed with the lease).
    fn offer(
        &mut self,
        assignment: &arches_core::execution::Assignment,
        now: Timestamp,
        resumed: bool,
    ) {
        let worker_tags = self
            .runs
            .get(&assignment.run_id)
            .map(|execution| execution.worker_tags(&assignment.task_id).to_vec())
            .unwrap_or_default();
        self.offered
            .insert((assignment.task_run_id, assignment.fencing_token));
        self.queue_writes.offers.push(TaskOffer {
            assignment: assignment.clone(),
            owner: self.options.worker_id.clone(),
            worker_tags,
            offered_at: now,
            resumed,
        });
    }

    /// When the next timer is due.
    pub fn next_wakeup_at(&self) -> Option<Timestamp> {
        self.wakeups.peek().map(|Reverse((at, ..))| *at)
    }

    /// Applies at most one inbox command, or else fires the due wakeups, then leases,
    /// commits, dispatches and publishes. Never waits.
    ///
    /// # Errors
    /// [`Error::Store`] when the commit fails, [`Error::Injected`] from a failure point.
    pub async fn step(&mut self) -> Result<StepReport, Error> {
        if self.poisoned {
            return Err(Error::Stopped);
        }
        let mut report = StepReport::default();
        match self.inbox.try_recv() {
            Ok(command) => {
                self.apply(command).await;
                report.commands = 1;
            }
            Err(_) => report.wakeups = self.fire_due_wakeups(),
        }
        if let Err(err) = self.flush(&mut report, true).await {
            // Memory has moved past the store; nothing after this may act on it.
            self.poisoned = true;
            return Err(err);
        }
        Ok(report)
    }

    /// Runs until `shutdown` is cancelled: waits for commands or the next timer, applies up
    /// to `batch_size_max` commands per commit.
    ///
    /// # Errors
    /// [`Error::Store`] when a commit fails; the scheduler stops at once so that memory and
    /// store never diverge further.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), Error> {
        loop {
            let delay = self.next_wakeup_at().map(|at| at.since(self.clock.now()));
            let command = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                command = self.inbox.recv() => match command {
                    Some(command) => Some(command),
                    None => break,
                },
                _ = sleep_opt(delay) => None,
            };
            let mut report = StepReport::default();
            if let Some(command) = command {
                self.apply(command).await;
                report.commands = 1;
                while report.commands < self.options.batch_size_max {
                    match self.inbox.try_recv() {
                        Ok(command) => {
                            self.apply(command).await;
                            report.commands += 1;
                        }
                        Err(_) => break,
                    }
                }
            }
            report.wakeups = self.fire_due_wakeups();
            self.flush(&mut report, false).await?;
        }
        info!(active_runs = self.runs.len(), "scheduler stopped");
        Ok(())
    }

    async fn apply(&mut self, command: Command) {
        let now = self.clock.now();
        match command {
            Command::Submit {
                mut execution,
                reply,
            }
            | Command::Resume {
                mut execution,
                reply,
            } => {
                let run_id = execution.id();
                if self.runs.contains_key(&run_id) {
                    let _ = reply.send(Err(Error::AlreadyActive(run_id)));
                    return;
                }
                execution.set_owner(Some(self.options.worker_id.clone()));
                self.load_thresholds(&mut execution).await;
                for wakeup in execution.pending_wakeups() {
                    if self.queued() && matches!(wakeup, Wakeup::LeaseExpiry { .. }) {
                        continue;
                    }
                    self.push_wakeup(run_id, wakeup);
                }
                execution.start(now);
                // A resumed run's leases are offered again with the same tokens: the store
                // keeps an offer (and its claim) that is still there, and makes none for a
                // lease whose completion is stored, so the workers that hold them report.
                let running = if self.queued() {
                    execution.running_assignments()
                } else {
                    Vec::new()
                };
                self.runs.insert(run_id, *execution);
                for assignment in &running {
                    self.offer(assignment, now, true);
                }
                self.run_order.push(run_id);
                self.touched.insert(run_id);
                self.replies.push(Reply::Run(reply, run_id));
            }
            Command::Cancel {
                run_id,
                reason,
                reply,
            } => match self.runs.get_mut(&run_id) {
                Some(execution) => {
                    let stopped = execution.cancel(now, &reason);
                    if self.options.dispatching == Dispatching::TaskQueue {
                        for (task_run_id, token) in stopped {
                            self.offered.remove(&(task_run_id, token));
                            self.queue_writes.withdrawn.push(task_run_id);
                        }
                    } else {
                        self.stops.extend(stopped);
                    }
                    self.touched.insert(run_id);
                    self.replies.push(Reply::Done(reply));
                }
                None => {
                    let _ = reply.send(Err(Error::UnknownRun(run_id)));
                }
            },
            Command::Completed {
                run_id,
                task_run_id,
                fencing_token,
                outcome,
                executed_at,
                finished_at,
                queued,
            } => {
                match &queued {
                    None => self.in_flight = self.in_flight.saturating_sub(1),
                    Some(origin) => {
                        self.offered.remove(&(task_run_id, fencing_token));
                        self.queue_writes.completions_done.push(
                            arches_core::records::AppliedCompletion {
                                seq: origin.seq,
                                task_run_id,
                            },
                        );
                    }
                }
                let Some(execution) = self.runs.get_mut(&run_id) else {
                    debug!(%run_id, %task_run_id, "completion for a run that is no longer active");
                    return;
                };
                if let Some(origin) = &queued {
                    execution.set_attempt_worker(task_run_id, fencing_token, &origin.worker);
                }
                let random: f64 = rand::rng().random();
                match execution.complete(
                    task_run_id,
                    fencing_token,
                    outcome,
                    executed_at,
                    finished_at,
                    random,
                ) {
                    Ok(()) => {
                        self.touched.insert(run_id);
                    }
                    Err(rejection) => {
                        warn!(%run_id, %task_run_id, fencing_token, %rejection, "completion rejected")
                    }
                }
            }
            Command::Heartbeat {
                run_id,
                task_run_id,
                fencing_token,
            } => {
                let Some(execution) = self.runs.get_mut(&run_id) else {
                    self.stops.push((task_run_id, fencing_token));
                    return;
                };
                match execution.heartbeat(task_run_id, fencing_token, now, self.options.lease_ttl) {
                    Ok(()) => {
                        self.touched.insert(run_id);
                    }
                    Err(rejection) => {
                        // The lease is no longer this attempt's: stop the zombie.
                        warn!(%run_id, %task_run_id, fencing_token, %rejection, "heartbeat rejected");
                        self.stops.push((task_run_id, fencing_token));
                    }
                }
            }
            Command::Decide {
                run_id,
                review_id,
                vote,
                reply,
            } => match self.runs.get_mut(&run_id) {
                Some(execution) => match execution.decide(review_id, vote, now) {
                    Ok(item) => {
                        self.touched.insert(run_id);
                        self.replies.push(Reply::Decided(reply, Box::new(item)));
                    }
                    Err(refusal) => {
                        let _ = reply.send(Err(Error::Review(refusal)));
                    }
                },
                None => {
                    let _ = reply.send(Err(Error::UnknownRun(run_id)));
                }
            },
            Command::Recalibrate {
                org_id,
                pipeline,
                task_id,
            } => {
                self.recalibrate(vec![(org_id, pipeline, task_id)]).await;
            }
            Command::Watch { run_id, reply } => {
                if self.runs.contains_key(&run_id) {
                    self.waiters.entry(run_id).or_default().push(reply);
                    return;
                }
                let answer = match self.store.run(run_id).await {
                    Ok(Some(run)) if run.state.is_terminal() => Ok(run),
                    Ok(_) => Err(Error::UnknownRun(run_id)),
                    Err(err) => Err(Error::Store(err)),
                };
                let _ = reply.send(answer);
            }
        }
    }

    fn push_wakeup(&mut self, run_id: RunId, wakeup: Wakeup) {
        self.wakeup_seq += 1;
        self.wakeups
            .push(Reverse((wakeup.at(), self.wakeup_seq, run_id, wakeup)));
    }

    fn fire_due_wakeups(&mut self) -> usize {
        let now = self.clock.now();
        let mut fired = 0;
        while let Some(Reverse((at, ..))) = self.wakeups.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((_, _, run_id, wakeup))) = self.wakeups.pop() else {
                break;
            };
            let Some(execution) = self.runs.get_mut(&run_id) else {
                continue;
            };
            let changed = match wakeup {
                Wakeup::LeaseExpiry {
                    task_run_id,
                    fencing_token,
                    ..
                } => {
                    let expired = execution.expire_lease(task_run_id, fencing_token, now);
                    if expired {
                        warn!(%run_id, %task_run_id, fencing_token, "lease expired");
                        // If the attempt still runs here, it is a zombie now.
                        self.stops.push((task_run_id, fencing_token));
                    }
                    expired
                }
                Wakeup::RetryDue { task_run_id, .. } => execution.retry_due(task_run_id, now),
                Wakeup::ReviewExpiry { task_run_id, .. } => {
                    execution.expire_review(task_run_id, now)
                }
            };
            if changed {
                fired += 1;
                self.touched.insert(run_id);
            }
        }
        fired
    }

    /// Leases queued task runs to free slots, round-robin over runs, within each run's
    /// concurrency limit.
    fn lease(&mut self, report: &mut StepReport) {
        let mut free = self.options.worker_slots.saturating_sub(self.in_flight());
        if free == 0 || self.run_order.is_empty() {
            return;
        }
        let now = self.clock.now();
        let count = self.run_order.len();
        let start = self.round_robin % count;
        self.round_robin = self.round_robin.wrapping_add(1);
        for offset in 0..count {
            if free == 0 {
                break;
            }
            let run_id = self.run_order[(start + offset) % count];
            let Some(execution) = self.runs.get_mut(&run_id) else {
                continue;
            };
            let limit = execution.concurrency_limit().unwrap_or(usize::MAX);
            while free > 0 && execution.running_count() < limit {
                let Some(assignment) =
                    execution.lease_next(&self.options.worker_id, now, self.options.lease_ttl)
                else {
                    break;
                };
                free -= 1;
                self.touched.insert(run_id);
                report.assignments.push(assignment);
            }
        }
        if self.queued() {
            for assignment in &report.assignments {
                self.offer(assignment, now, false);
            }
        } else {
            self.in_flight += report.assignments.len();
        }
    }

    async fn flush(
        &mut self,
        report: &mut StepReport,
        keep_assignments: bool,
    ) -> Result<(), Error> {
        self.lease(report);
        let mut batch = WriteBatch::default();
        let mut events = Vec::new();
        let mut wakeups = Vec::new();
        let mut finished = Vec::new();
        let queue_writes = std::mem::take(&mut self.queue_writes);
        batch.offers = queue_writes.offers;
        batch.withdrawn = queue_writes.withdrawn;
        batch.completions_done = queue_writes.completions_done;
        let queued = self.queued();
        for run_id in self.touched.drain() {
            let Some(execution) = self.runs.get_mut(&run_id) else {
                continue;
            };
            let changes = execution.take_changes();
            batch.runs.extend(changes.run);
            batch.task_runs.extend(changes.task_runs);
            batch.attempts.extend(changes.attempts);
            batch.reviews.extend(changes.reviews);
            events.extend(changes.events);
            // The task queue's claims carry the workers' leases: no lease timers here.
            wakeups.extend(
                changes
                    .wakeups
                    .into_iter()
                    .filter(|w| !(queued && matches!(w, Wakeup::LeaseExpiry { .. })))
                    .map(|w| (run_id, w)),
            );
            if execution.is_finished() {
                finished.push(run_id);
            }
        }
        if !batch.is_empty() {
            if self.failpoints.hit_before_commit() {
                return Err(Error::Injected("before commit"));
            }
            let committed = self.store.commit(&batch).await?;
            if !committed.stale_task_runs.is_empty() {
                warn!(
                    count = committed.stale_task_runs.len(),
                    "store refused stale task-run writes"
                );
                // Their offers were not made either (the store offers only task runs stored
                // with the offer's token): they must not hold slots. Another process drives
                // these runs now.
                let stale: HashSet<TaskRunId> = committed.stale_task_runs.iter().copied().collect();
                self.offered.retain(|(id, _)| !stale.contains(id));
            }
            if self.failpoints.hit_after_commit() {
                return Err(Error::Injected("after commit"));
            }
        }
        report.task_runs_written = batch.task_runs.len();
        for (run_id, wakeup) in wakeups {
            self.push_wakeup(run_id, wakeup);
        }
        for (task_run_id, token) in self.stops.drain(..) {
            let _ = self.dispatch.send(Dispatch::Stop(task_run_id, token));
        }
        let assignments = std::mem::take(&mut report.assignments);
        for assignment in assignments {
            if keep_assignments {
                report.assignments.push(assignment.clone());
            }
            if !queued {
                let _ = self.dispatch.send(Dispatch::Run(Box::new(assignment)));
            }
        }
        for event in &events {
            let _ = self.handle.events.send(event.clone());
        }
        if let Some(bus) = &self.bus {
            bus.publish(events.iter().cloned().map(BusEvent::Domain).collect());
        }
        report.events = events;
        for reply in self.replies.drain(..) {
            match reply {
                Reply::Run(reply, run_id) => {
                    let _ = reply.send(Ok(run_id));
                }
                Reply::Done(reply) => {
                    let _ = reply.send(Ok(()));
                }
                Reply::Decided(reply, item) => {
                    let _ = reply.send(Ok(*item));
                }
            }
        }
        self.refresh_calibrations(&batch.reviews).await;
        for run_id in finished {
            if let Some(execution) = self.runs.remove(&run_id) {
                self.run_order.retain(|id| *id != run_id);
                let run = execution.run().clone();
                info!(%run_id, state = %run.state, "run finished");
                for waiter in self.waiters.remove(&run_id).unwrap_or_default() {
                    let _ = waiter.send(Ok(run.clone()));
                }
            }
        }
        Ok(())
    }
}

impl Scheduler {
    /// Gives a run the calibrated thresholds of its routed tasks, fitted with the run's own
    /// policy on the task's feedback (read from the store the first time a task is seen). A
    /// store error leaves the fixed thresholds.
    async fn load_thresholds(&mut self, execution: &mut RunExecution) {
        let org = execution.run().org_id;
        let pipeline = execution.run().pipeline_name.clone();
        let routed: Vec<(TaskId, arches_core::review::ReviewPolicy)> = execution
            .pipeline()
            .def
            .tasks
            .iter()
            .filter_map(|task| Some((task.id.clone(), task.review_policy()?)))
            .collect();
        for (task_id, policy) in routed {
            let key = (org, pipeline.clone(), task_id.clone());
            let points = match self.calibrations.get(&key) {
                Some(points) => points.clone(),
                None => match self
                    .store
                    .review_feedback(org, &pipeline, &task_id, CALIBRATION_FEEDBACK_MAX)
                    .await
                {
                    Ok(points) => {
                        let points = Arc::new(points);
                        self.calibrations.insert(key, points.clone());
                        points
                    }
                    Err(err) => {
                        warn!(%task_id, error = %err, "calibration feedback unreadable; fixed thresholds");
                        Arc::new(Vec::new())
                    }
                },
            };
            let thresholds: Thresholds = calibrate(&policy, &points).thresholds;
            execution.set_thresholds(task_id, thresholds);
        }
    }

    /// After decisions on routed results were committed: fits their tasks' calibrations
    /// again and hands the new thresholds to the runs of those tasks.
    async fn refresh_calibrations(&mut self, written: &[ReviewItem]) {
        let keys: Vec<CalibrationKey> = written
            .iter()
            .filter(|item| item.feedback().is_some())
            .map(|item| {
                (
                    item.org_id,
                    item.pipeline_name.clone(),
                    item.task_id.clone(),
                )
            })
            .collect();
        self.recalibrate(keys).await;
    }

    /// Forgets the calibrations of `keys` and loads them again into the runs they route.
    async fn recalibrate(&mut self, keys: Vec<CalibrationKey>) {
        if keys.is_empty() {
            return;
        }
        let mut pipelines = HashSet::new();
        for key in keys {
            pipelines.insert((key.0, key.1.clone()));
            self.calibrations.remove(&key);
        }
        let ids: Vec<RunId> = self
            .runs
            .iter()
            .filter(|(_, e)| pipelines.contains(&(e.run().org_id, e.run().pipeline_name.clone())))
            .map(|(id, _)| *id)
            .collect();
        for run_id in ids {
            if let Some(mut execution) = self.runs.remove(&run_id) {
                self.load_thresholds(&mut execution).await;
                self.runs.insert(run_id, execution);
            }
        }
    }
}

async fn sleep_opt(delay: Option<std::time::Duration>) {
    match delay {
        Some(delay) => tokio::time::sleep(delay).await,
        None => std::future::pending().await,
    }
}
