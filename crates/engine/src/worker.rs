//! The in-process worker pool: executes the attempts the scheduler leases, each in its own
//! tokio task, with heartbeats, the task's timeout, a fresh working directory, and a bounded
//! log. A stop (cancel, or a lease that is no longer ours) drops the tool's future, which
//! the tool contract says releases everything it started.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::sync::{Arc, Mutex};

use arches_core::execution::{Assignment, AttemptOutcome};
use arches_core::pipeline::validate::InputSchemas;
use arches_core::ports::{ArtifactStore, LogSink, TaskQueue, ToolContext, ToolRegistry};
use arches_core::records::{LogStream, TaskCompletion};
use arches_core::{Clock, RunId, TaskRunId};
use futures::FutureExt;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::logs::{AttemptLog, LogWriterHandle};
use crate::scheduler::{Command, Dispatch, SchedulerHandle};
use crate::EngineOptions;

pub(crate) type Running = Arc<Mutex<HashMap<TaskRunId, (u64, CancellationToken)>>>;

/// How far a completion that the store cannot take is retried: the delay doubles from
/// [`COMPLETE_RETRY_FIRST`] up to [`COMPLETE_RETRY_MAX_DELAY`], [`COMPLETE_TRIES_MAX`] tries
/// in all (about a minute and a half); after that the claim expires and another worker runs
/// the task again.
const COMPLETE_TRIES_MAX: u32 = 20;
const COMPLETE_RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(50);
const COMPLETE_RETRY_MAX_DELAY: std::time::Duration = std::time::Duration::from_secs(5);

/// Most completions stored in one statement.
const COMPLETION_BATCH_MAX: usize = 512;

/// Stores a worker's completions in batches: each call waits for its own result, and the
/// completions ready at the same moment go to the store in one statement
/// ([`TaskQueue::complete_many`]). Cheap to clone; the batching task ends when the last
/// clone is dropped.
#[derive(Clone)]
pub(crate) struct CompletionBatcher {
    sender: mpsc::Sender<(TaskCompletion, oneshot::Sender<Result<bool, String>>)>,
}

impl CompletionBatcher {
    /// A batcher on `queue`, holding at most `capacity` completions waiting.
    pub(crate) fn start(queue: Arc<dyn TaskQueue>, capacity: usize) -> Self {
        let (sender, mut receiver) = mpsc::channel::<(
            TaskCompletion,
            oneshot::Sender<Result<bool, String>>,
        )>(capacity.max(1));
        tokio::spawn(async move {
            while let Some(first) = receiver.recv().await {
                let mut batch = vec![first];
                while batch.len() < COMPLETION_BATCH_MAX {
                    match receiver.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                let (completions, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
                match queue.complete_many(&completions).await {
                    Ok(stored) => {
                        for (reply, stored) in replies.into_iter().zip(stored) {
                            let _ = reply.send(Ok(stored));
                        }
                    }
                    Err(error) => {
                        let message = error.to_string();
                        for reply in replies {
                            let _ = reply.send(Err(message.clone()));
                        }
                    }
                }
            }
        });
        Self { sender }
    }

    /// Stores one completion (in the next batch): whether it was stored.
    async fn complete(&self, completion: TaskCompletion) -> Result<bool, String> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .send((completion, reply))
            .await
            .map_err(|_| "the worker is stopping".to_owned())?;
        answer
            .await
            .map_err(|_| "the worker is stopping".to_owned())?
    }
}

/// Where an attempt reports.
#[derive(Clone)]
pub(crate) enum Reporter {
    /// To the scheduler of this process (heartbeats and the completion).
    Scheduler(SchedulerHandle),
    /// To the store's task queue, for an offer this worker claimed. Claims are renewed by
    /// the worker for all its attempts at once, so an attempt sends no heartbeat itself.
    Queue {
        /// The worker's completion batcher on the queue.
        batcher: CompletionBatcher,
        /// This worker.
        worker: String,
        /// The claim's token.
        claim: u64,
    },
}

/// Executes leased attempts in this process.
pub struct WorkerPool {
    options: EngineOptions,
    scheduler: SchedulerHandle,
    dispatches: mpsc::UnboundedReceiver<Dispatch>,
    tools: Arc<ToolRegistry>,
    /// The tools' input schemas, compiled once: rendered inputs are checked before a tool
    /// runs.
    schemas: Arc<InputSchemas>,
    artifacts: Arc<dyn ArtifactStore>,
    logs: LogWriterHandle,
    clock: Arc<dyn Clock>,
}

impl WorkerPool {
    /// A pool fed by `dispatches` that reports to `scheduler`.
    pub fn new(
        options: EngineOptions,
        scheduler: SchedulerHandle,
        dispatches: mpsc::UnboundedReceiver<Dispatch>,
        tools: Arc<ToolRegistry>,
        artifacts: Arc<dyn ArtifactStore>,
        logs: LogWriterHandle,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let schemas = Arc::new(InputSchemas::compile(tools.as_ref()));
        Self {
            options,
            scheduler,
            dispatches,
            tools,
            schemas,
            artifacts,
            logs,
            clock,
        }
    }

    /// Executes dispatches until `shutdown`; then stops every attempt still running.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let running: Running = Arc::default();
        let mut tasks = JoinSet::new();
        // Which attempt each spawned task executes, so that one that unwinds outside the
        // tool's own future (which is caught) is still reported: otherwise its slot would
        // never come back and enough of them would stall the engine.
        let mut spawned: HashMap<tokio::task::Id, (RunId, TaskRunId, u64)> = HashMap::new();
        loop {
            let dispatch = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(joined) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                    self.joined(joined, &mut spawned, &running).await;
                    continue;
                }
                dispatch = self.dispatches.recv() => match dispatch {
                    Some(dispatch) => dispatch,
                    None => break,
                },
            };
            match dispatch {
                Dispatch::Run(assignment) => {
                    let stop = shutdown.child_token();
                    running
                        .lock()
                        .expect("the running map is never poisoned")
                        .insert(
                            assignment.task_run_id,
                            (assignment.fencing_token, stop.clone()),
                        );
                    let attempt = Attempt {
                        assignment: *assignment,
                        options: self.options.clone(),
                        reporter: Reporter::Scheduler(self.scheduler.clone()),
                        tools: self.tools.clone(),
                        schemas: self.schemas.clone(),
                        artifacts: self.artifacts.clone(),
                        logs: self.logs.clone(),
                        clock: self.clock.clone(),
                        running: running.clone(),
                    };
                    let identity = (
                        attempt.assignment.run_id,
                        attempt.assignment.task_run_id,
                        attempt.assignment.fencing_token,
                    );
                    let handle = tasks.spawn(attempt.execute(stop, shutdown.clone()));
                    spawned.insert(handle.id(), identity);
                }
                Dispatch::Stop(task_run_id, token) => {
                    let map = running.lock().expect("the running map is never poisoned");
                    if let Some((held, stop)) = map.get(&task_run_id) {
                        if *held == token {
                            stop.cancel();
                        }
                    }
                }
            }
        }
        for (_, (_, stop)) in running
            .lock()
            .expect("the running map is never poisoned")
            .iter()
        {
            stop.cancel();
        }
        while tasks.join_next().await.is_some() {}
    }

    /// Handles the end of an attempt's task: a task that panicked is reported as a failed
    /// attempt in its place.
    async fn joined(
        &self,
        joined: Result<(tokio::task::Id, ()), tokio::task::JoinError>,
        spawned: &mut HashMap<tokio::task::Id, (RunId, TaskRunId, u64)>,
        running: &Running,
    ) {
        let (id, panic) = match joined {
            Ok((id, ())) => (id, None),
            Err(error) => (error.id(), Some(error.to_string())),
        };
        let Some((run_id, task_run_id, fencing_token)) = spawned.remove(&id) else {
            return;
        };
        let Some(panic) = panic else { return };
        warn!(%run_id, %task_run_id, error = %panic, "attempt task panicked");
        {
            let mut map = running.lock().expect("the running map is never poisoned");
            if map
                .get(&task_run_id)
                .is_some_and(|(held, _)| *held == fencing_token)
            {
                map.remove(&task_run_id);
            }
        }
        let now = self.clock.now();
        let command = Command::Completed {
            run_id,
            task_run_id,
            fencing_token,
            outcome: AttemptOutcome::Failed {
                message: format!("worker panicked: {panic}"),
                retryable: false,
            },
            executed_at: now,
            finished_at: now,
            queued: None,
        };
        let _ = self.scheduler.send(command).await;
    }
}

/// One attempt of a leased (or claimed) task run, executed in its own tokio task.
pub(crate) struct Attempt {
    pub(crate) assignment: Assignment,
    pub(crate) options: EngineOptions,
    pub(crate) reporter: Reporter,
    pub(crate) tools: Arc<ToolRegistry>,
    pub(crate) schemas: Arc<InputSchemas>,
    pub(crate) artifacts: Arc<dyn ArtifactStore>,
    pub(crate) logs: LogWriterHandle,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) running: Running,
}

impl Attempt {
    pub(crate) async fn execute(self, stop: CancellationToken, shutdown: CancellationToken) {
        let a = &self.assignment;
        let executed_at = self.clock.now();
        let log = Arc::new(AttemptLog {
            writer: self.logs.clone(),
            clock: self.clock.clone(),
            org_id: a.org_id,
            task_id: a.task_id.clone(),
            run_id: a.run_id,
            task_run_id: a.task_run_id,
            attempt: a.attempt,
            line_bytes_max: self.options.log_line_bytes_max,
            lines_max: self.options.log_lines_per_attempt_max,
            written: AtomicU32::new(0),
            dropped: AtomicU64::new(0),
        });
        let work_dir = self
            .options
            .work_root
            .join(a.run_id.to_string())
            .join(format!("{}.{}.{}", a.task_id, a.task_run_id, a.attempt));
        // Validation skipped template strings; their rendered values are checked now.
        // (An org's registered tool checks its own schema when it executes.)
        let checked = self.schemas.check(&a.tool, &a.inputs);
        let resolved = self.tools.resolve(a.org_id, &a.tool).await;
        let outcome = match (resolved, checked) {
            (Err(error), _) => Some(AttemptOutcome::Failed {
                message: format!("cannot load tool {:?}: {}", a.tool, error.message),
                retryable: error.retryable,
            }),
            (Ok(None), _) => Some(AttemptOutcome::Failed {
                message: format!("unknown tool {:?}", a.tool),
                retryable: false,
            }),
            (Ok(Some(_)), Err(message)) => Some(AttemptOutcome::Failed {
                message,
                retryable: false,
            }),
            (Ok(Some(tool)), Ok(())) => {
                let mut prepared = Ok(());
                if tool.needs_work_dir() {
                    prepared = tokio::fs::create_dir_all(&work_dir).await;
                }
                match prepared {
                    Err(err) => Some(AttemptOutcome::Failed {
                        message: format!(
                            "cannot create working directory {}: {err}",
                            work_dir.display()
                        ),
                        retryable: true,
                    }),
                    Ok(()) => {
                        let context = ToolContext {
                            org_id: a.org_id,
                            run_id: a.run_id,
                            task_run_id: a.task_run_id,
                            task_id: a.task_id.clone(),
                            attempt: a.attempt,
                            item: a.item.clone(),
                            upstream: a.upstream.clone(),
                            work_dir: work_dir.clone(),
                            artifacts: self.artifacts.clone(),
                            logs: log.clone(),
                            review_comment: a.review_comment.clone(),
                            tools: self.tools.clone(),
                        };
                        let execution = AssertUnwindSafe(tool.execute(context, a.inputs.clone()))
                            .catch_unwind();
                        let outcome = self.supervise(execution, &stop, &log).await;
                        if tool.needs_work_dir() {
                            remove_dir(work_dir).await;
                        }
                        outcome
                    }
                }
            }
        };
        log.finish().await;
        {
            // Remove our entry only if it is still ours: when our lease expired, the scheduler
            // stopped us and leased the task run again, and the new attempt's entry (a higher
            // token) replaced ours under the same id. Removing it would make the new attempt
            // unstoppable by a cancel or by its own lease expiry.
            let mut running = self
                .running
                .lock()
                .expect("the running map is never poisoned");
            if running
                .get(&a.task_run_id)
                .is_some_and(|(held, _)| *held == a.fencing_token)
            {
                running.remove(&a.task_run_id);
            }
        }
        let scheduler = match &self.reporter {
            Reporter::Scheduler(scheduler) => scheduler,
            Reporter::Queue {
                batcher,
                worker,
                claim,
            } => {
                // Stopped (claim lost, withdrawn or handed back at shutdown): nothing to say;
                // the claim's new holder, or the scheduler's withdrawal, decides.
                let Some(outcome) = outcome else { return };
                let completion = TaskCompletion {
                    task_run_id: a.task_run_id,
                    claim: *claim,
                    worker: worker.clone(),
                    outcome,
                    executed_at,
                    finished_at: self.clock.now(),
                };
                report_to_queue(batcher, completion).await;
                return;
            }
        };
        let outcome = match outcome {
            Some(outcome) => outcome,
            // Stopped by shutdown: say nothing. The lease stays as committed and is reclaimed
            // by `arches resume`; reporting a failure here would fail the task for good.
            None if shutdown.is_cancelled() => return,
            // Stopped by a cancel or a lost lease: the state machine refuses this report (the
            // task run is no longer running under this token); it only frees the slot.
            None => AttemptOutcome::Failed {
                message: "stopped".into(),
                retryable: false,
            },
        };
        let command = Command::Completed {
            run_id: a.run_id,
            task_run_id: a.task_run_id,
            fencing_token: a.fencing_token,
            outcome,
            executed_at,
            finished_at: self.clock.now(),
            queued: None,
        };
        if scheduler.send(command).await.is_err() {
            debug!(task_run_id = %a.task_run_id, "scheduler gone; completion not reported");
        }
    }

    /// Drives the tool's future with heartbeats, the timeout and the stop signal. `None`
    /// when stopped.
    async fn supervise<F>(
        &self,
        execution: F,
        stop: &CancellationToken,
        log: &AttemptLog,
    ) -> Option<AttemptOutcome>
    where
        F: std::future::Future<
            Output = std::thread::Result<Result<serde_json::Value, arches_core::ports::ToolError>>,
        >,
    {
        let a = &self.assignment;
        let mut execution = std::pin::pin!(execution);
        // A timeout too large to add to the clock means no deadline, not a panic.
        let deadline = a
            .timeout
            .and_then(|t| tokio::time::Instant::now().checked_add(t));
        // The first heartbeat is due one interval after the start. (Not `interval`, whose
        // first tick is "now": awaiting it waits for the timer driver's next millisecond,
        // up to a millisecond added to every attempt.)
        let period = self
            .options
            .heartbeat_interval
            .max(std::time::Duration::from_millis(1));
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return None,
                result = &mut execution => {
                    return Some(match result {
                        Ok(Ok(outputs)) => AttemptOutcome::Succeeded(outputs),
                        Ok(Err(err)) => AttemptOutcome::Failed { message: err.message, retryable: err.retryable },
                        Err(panic) => {
                            let message = panic
                                .downcast_ref::<String>()
                                .cloned()
                                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                                .unwrap_or_else(|| "unknown panic".into());
                            warn!(tool = %a.tool, task_run_id = %a.task_run_id, %message, "tool panicked");
                            AttemptOutcome::Failed { message: format!("tool {} panicked: {message}", a.tool), retryable: false }
                        }
                    });
                }
                _ = sleep_until_opt(deadline) => {
                    let timeout = a.timeout.unwrap_or_default();
                    log.write(LogStream::System, &format!("attempt stopped: timed out after {timeout:?}")).await;
                    return Some(AttemptOutcome::TimedOut { timeout });
                }
                _ = heartbeat.tick(), if matches!(self.reporter, Reporter::Scheduler(_)) => {
                    let command = Command::Heartbeat {
                        run_id: a.run_id,
                        task_run_id: a.task_run_id,
                        fencing_token: a.fencing_token,
                    };
                    if let Reporter::Scheduler(scheduler) = &self.reporter {
                        if scheduler.send(command).await.is_err() {
                            return None;
                        }
                    }
                }
            }
        }
    }
}

/// Stores a claimed task's completion, retrying while the store is unreachable (bounded:
/// [`COMPLETE_TRIES_MAX`]). A refusal (the claim is no longer ours) ends it at once.
pub(crate) async fn report_to_queue(batcher: &CompletionBatcher, completion: TaskCompletion) {
    let mut delay = COMPLETE_RETRY_FIRST;
    for attempt in 1..=COMPLETE_TRIES_MAX {
        match batcher.complete(completion.clone()).await {
            Ok(true) => return,
            Ok(false) if attempt > 1 => {
                // An earlier try may have been stored before its answer was lost.
                info!(task_run_id = %completion.task_run_id, claim = completion.claim,
                    "completion not stored on a retry: an earlier try was, or the claim was lost");
                return;
            }
            Ok(false) => {
                warn!(task_run_id = %completion.task_run_id, claim = completion.claim,
                    "completion refused: the claim is no longer this worker's");
                return;
            }
            Err(error) if attempt < COMPLETE_TRIES_MAX => {
                warn!(task_run_id = %completion.task_run_id, %error, attempt,
                    "cannot store the completion; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(COMPLETE_RETRY_MAX_DELAY);
            }
            Err(error) => {
                warn!(task_run_id = %completion.task_run_id, %error,
                    "cannot store the completion; giving up (the claim will expire and the task run again)");
            }
        }
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

async fn remove_dir(dir: PathBuf) {
    if let Err(err) = tokio::fs::remove_dir_all(&dir).await {
        if err.kind() != std::io::ErrorKind::NotFound {
            warn!(dir = %dir.display(), error = %err, "could not remove working directory");
        }
    }
}
