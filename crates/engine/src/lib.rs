//! # arches-engine
//!
//! The durable engine: a [`Scheduler`] that owns every state change of the runs it drives
//! and commits them to the [`Store`] in batches, an in-process [`WorkerPool`] that executes
//! task runs with leases, heartbeats and timeouts, and a [`LogWriter`] that streams task
//! logs to the store.
//!
//! Architecture invariants:
//! - The scheduler is the only writer of runs, task runs and attempts. It decides with the
//!   pure state machine of `arches_core::execution`, commits, and only then dispatches
//!   leases and publishes events: nothing a worker or a watcher sees is uncommitted.
//! - Idle costs nothing: the scheduler sleeps on its inbox and on the next timer (lease
//!   expiry or retry), never polls.
//! - Every queue is bounded ([`EngineOptions`]).
//! - This crate knows the storage only through the `Store` port; it depends on no
//!   database crate.

pub mod bus;
mod failpoints;
mod logs;
mod queue;
mod scheduler;
mod worker;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arches_core::execution::{ExecutionLimits, Rejection};
use arches_core::ports::{ArtifactStore, Store, StoreError, TaskQueue, ToolRegistry};
use arches_core::{Clock, RunId};
use tokio_util::sync::CancellationToken;

pub use bus::{EventBus, InProcessBus};
pub use failpoints::FailPoints;
pub use logs::{LogWriter, LogWriterHandle};
// `Dispatch` is the item type of the receiver `Scheduler::new` returns; it must be nameable
// by the worker side (and by tests acting as the worker) to tell a lease from a stop.
pub use queue::{CompletionFeeder, QueueWorker, QueueWorkerOptions, QueueWorkerReport};
pub use scheduler::{Command, Dispatch, QueuedOrigin, Scheduler, SchedulerHandle, StepReport};
pub use worker::WorkerPool;

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store refused or failed a commit; the engine stops, and what was committed
    /// before stays consistent (`arches resume` continues from there).
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// A worker event was refused by the state machine.
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// A decision on a validation-queue item was refused.
    #[error(transparent)]
    Review(#[from] arches_core::execution::ReviewRefusal),
    /// The run is not driven by this engine.
    #[error("run {0} is not active in this engine")]
    UnknownRun(RunId),
    /// The run is already driven by this engine.
    #[error("run {0} is already active")]
    AlreadyActive(RunId),
    /// The engine has stopped.
    #[error("the engine has stopped")]
    Stopped,
    /// A failure point armed by a test fired.
    #[error("injected failure: {0}")]
    Injected(&'static str),
    /// A stored run cannot be rebuilt: its pipeline version is missing or unreadable.
    #[error("cannot restore run {run}: {reason}")]
    Restore {
        /// The run.
        run: RunId,
        /// Why.
        reason: String,
    },
}

/// Items read per page when a run's open validation-queue items are restored.
const REVIEW_PAGE: u32 = 500;

/// Rebuilds a stored run in memory (its pipeline version, task runs and open attempts), to
/// resume it after a restart or retry it from its failed tasks.
///
/// # Errors
/// [`Error::Store`] when the store fails; [`Error::Restore`] when the run's pipeline
/// version is missing or does not decode into a valid DAG.
pub async fn restore_run(
    store: &dyn Store,
    run: arches_core::records::RunRecord,
) -> Result<arches_core::execution::RunExecution, Error> {
    use arches_core::pipeline::{Pipeline, PipelineDef, Templates};
    let restore_error = |reason: String| Error::Restore {
        run: run.id,
        reason,
    };
    let stored = store
        .pipeline(run.org_id, &run.pipeline_name, run.pipeline_version)
        .await?
        .ok_or_else(|| {
            restore_error(format!(
                "pipeline {} version {} is missing from the store",
                run.pipeline_name, run.pipeline_version
            ))
        })?;
    let def: PipelineDef = serde_json::from_value(stored.definition).map_err(|e| {
        restore_error(format!(
            "stored pipeline {} version {} does not decode: {e}",
            run.pipeline_name, run.pipeline_version
        ))
    })?;
    let pipeline = Pipeline::build(def)
        .map_err(|e| restore_error(format!("stored pipeline is invalid: {e}")))?;
    let task_runs = store.task_runs(run.id).await?;
    let attempts = store.attempts(run.id).await?;
    // Every open item of the run, page by page (a listing is bounded).
    let mut reviews = Vec::new();
    loop {
        let page = store
            .review_items(&arches_core::records::ReviewFilter {
                run_id: Some(run.id),
                state: Some(arches_core::review::ReviewState::Open),
                after: reviews
                    .last()
                    .map(|item: &arches_core::review::ReviewItem| item.id),
                limit: REVIEW_PAGE,
                ..Default::default()
            })
            .await?;
        let full = page.len() >= REVIEW_PAGE as usize;
        reviews.extend(page);
        if !full {
            break;
        }
    }
    let mut execution = arches_core::execution::RunExecution::restore(
        run,
        pipeline,
        Arc::new(Templates::new()),
        ExecutionLimits::default(),
        task_runs,
        attempts,
    );
    execution.restore_reviews(reviews);
    Ok(execution)
}

/// Settings of the engine. Every bound is named with its unit.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// This process's worker id, recorded on leases and attempts.
    pub worker_id: String,
    /// Task runs executing at once in this process (the worker pool's slots).
    pub worker_slots: usize,
    /// How long a lease lasts without a heartbeat.
    pub lease_ttl: Duration,
    /// How often a worker heartbeats a lease; well below `lease_ttl`.
    pub heartbeat_interval: Duration,
    /// Most inbox commands applied in one commit (group commit).
    pub batch_size_max: usize,
    /// Capacity of the scheduler's inbox; senders wait when it is full.
    pub inbox_capacity: usize,
    /// Capacity of the domain-event broadcast; slow subscribers skip events.
    pub event_capacity: usize,
    /// Directory under which each attempt gets a fresh working directory.
    pub work_root: PathBuf,
    /// Bounds of the run state machine.
    pub limits: ExecutionLimits,
    /// Longest log line kept, in bytes; longer lines are cut.
    pub log_line_bytes_max: usize,
    /// Most log lines kept per attempt; later lines are counted and dropped.
    pub log_lines_per_attempt_max: u32,
    /// Capacity of the log channel, in lines.
    pub log_channel_capacity: usize,
    /// Where leased task runs go: this process's worker pool, or the store's task queue for
    /// standalone workers. With [`Dispatching::TaskQueue`], `worker_id` names the scheduler
    /// (the owner of its runs and the address of their completions: it must be stable
    /// across restarts and unique among the schedulers sharing the store), and
    /// `worker_slots` bounds the offers outstanding at once.
    pub dispatching: Dispatching,
}

/// Where a scheduler's leases go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Dispatching {
    /// To the [`WorkerPool`] of this process.
    #[default]
    InProcess,
    /// Offered on the store's task queue ([`arches_core::ports::TaskQueue`]), committed
    /// with the lease, for standalone workers ([`QueueWorker`]) to claim. The store's claim
    /// carries the worker's lease (renewals, expiry, take-over), so the scheduler sets no
    /// lease-expiry timers of its own for them.
    TaskQueue,
}

impl EngineOptions {
    /// Defaults for a process whose working directories live under `work_root`.
    pub fn new(work_root: PathBuf) -> Self {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        Self {
            worker_id: format!("pid{}", std::process::id()),
            worker_slots: (cores * 4).max(8),
            lease_ttl: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(10),
            batch_size_max: 1024,
            inbox_capacity: 8192,
            event_capacity: 8192,
            work_root,
            limits: ExecutionLimits::default(),
            log_line_bytes_max: 64 * 1024,
            log_lines_per_attempt_max: 20_000,
            log_channel_capacity: 8192,
            dispatching: Dispatching::InProcess,
        }
    }
}

/// The engine of one process: scheduler, worker pool and log writer, wired together — or,
/// on a shared store, the scheduler and the [`CompletionFeeder`] of its task queue, with the
/// work done by standalone [`QueueWorker`]s.
pub struct Engine {
    scheduler: Scheduler,
    pool: Option<WorkerPool>,
    log_writer: Option<LogWriter>,
    feeder: Option<CompletionFeeder>,
}

/// How often a scheduler on the task queue looks for completions without a wake-up.
pub const COMPLETION_SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Most completions a scheduler on the task queue takes per query.
pub const COMPLETION_BATCH_MAX: usize = 1024;

impl Engine {
    /// Builds the engine; nothing runs until [`Engine::run`].
    pub fn build(
        options: EngineOptions,
        store: Arc<dyn Store>,
        artifacts: Arc<dyn ArtifactStore>,
        tools: ToolRegistry,
        clock: Arc<dyn Clock>,
    ) -> Engine {
        Self::build_with_bus(options, store, artifacts, tools, clock, None)
    }

    /// Builds the engine publishing committed state changes and task log lines on `bus`.
    pub fn build_with_bus(
        options: EngineOptions,
        store: Arc<dyn Store>,
        artifacts: Arc<dyn ArtifactStore>,
        tools: ToolRegistry,
        clock: Arc<dyn Clock>,
        bus: Option<Arc<dyn EventBus>>,
    ) -> Engine {
        let mut log_writer = LogWriter::new(store.clone(), options.log_channel_capacity);
        let (mut scheduler, assignments) =
            Scheduler::new(options.clone(), store, clock.clone(), FailPoints::default());
        if let Some(bus) = bus {
            log_writer = log_writer.with_event_bus(bus.clone());
            scheduler.set_event_bus(bus);
        }
        let pool = WorkerPool::new(
            options,
            scheduler.handle(),
            assignments,
            Arc::new(tools),
            artifacts,
            log_writer.handle(),
            clock,
        );
        Engine {
            scheduler,
            pool: Some(pool),
            log_writer: Some(log_writer),
            feeder: None,
        }
    }

    /// Builds a scheduler that offers its leases on `queue` (the same store as `store`) for
    /// standalone workers, with the feeder that brings their completions back. No task runs
    /// in this process. `options.worker_id` names the scheduler: stable across restarts and
    /// unique among the schedulers that share the store.
    pub fn build_on_queue(
        mut options: EngineOptions,
        store: Arc<dyn Store>,
        queue: Arc<dyn TaskQueue>,
        clock: Arc<dyn Clock>,
        bus: Option<Arc<dyn EventBus>>,
    ) -> Engine {
        options.dispatching = Dispatching::TaskQueue;
        let owner = options.worker_id.clone();
        let (mut scheduler, _dispatches) =
            Scheduler::new(options, store, clock, FailPoints::default());
        if let Some(bus) = bus {
            scheduler.set_event_bus(bus);
        }
        let feeder = CompletionFeeder::new(
            queue,
            owner,
            scheduler.handle(),
            COMPLETION_SWEEP_INTERVAL,
            COMPLETION_BATCH_MAX,
        );
        Engine {
            scheduler,
            pool: None,
            log_writer: None,
            feeder: Some(feeder),
        }
    }

    /// Arms the scheduler's failure points with `failpoints` (tests of recovery from a
    /// failed commit; the default never fires).
    pub fn set_failpoints(&mut self, failpoints: FailPoints) {
        self.scheduler.set_failpoints(failpoints);
    }

    /// A cheap handle to submit, resume, cancel and watch runs.
    pub fn handle(&self) -> SchedulerHandle {
        self.scheduler.handle()
    }

    /// Runs until `shutdown` is cancelled or the store fails. On shutdown, running
    /// attempts are stopped (their leases are simply not renewed; `arches resume` runs
    /// them again) and the logs are flushed.
    ///
    /// Whatever way the scheduler ends (shutdown, a failed commit, a panic), the worker pool
    /// has stopped every attempt it ran and the log writer has drained before this returns
    /// (or the panic resumes), so a new engine built afterwards never races an old attempt.
    ///
    /// # Errors
    /// [`Error::Store`] when a commit fails.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        use futures::FutureExt;
        let Engine {
            scheduler,
            pool,
            log_writer,
            feeder,
        } = self;
        let log_task = log_writer.map(|writer| tokio::spawn(writer.run()));
        let pool_shutdown = shutdown.child_token();
        let pool_task = pool.map(|pool| tokio::spawn(pool.run(pool_shutdown.clone())));
        let feeder_task = feeder.map(|feeder| tokio::spawn(feeder.run(pool_shutdown.clone())));
        let result = std::panic::AssertUnwindSafe(scheduler.run(shutdown))
            .catch_unwind()
            .await;
        pool_shutdown.cancel();
        if let Some(task) = pool_task {
            let _ = task.await;
        }
        if let Some(task) = feeder_task {
            let _ = task.await;
        }
        // The pool held the last log senders; the writer drains and ends.
        if let Some(task) = log_task {
            let _ = task.await;
        }
        match result {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}
