//! The two ends of the store's task queue ([`TaskQueue`]):
//!
//! - [`QueueWorker`], the standalone worker (`arches worker`): claims offers whose worker
//!   tags it has, executes them like the in-process pool does (same [`Attempt`]), renews its
//!   claims in one statement per interval, reports each end to the store, and on shutdown
//!   stops claiming, lets its attempts finish within a grace period, and hands back the rest.
//! - [`CompletionFeeder`], beside a scheduler with [`Dispatching::TaskQueue`]: takes the
//!   completions stored for the scheduler's runs and hands them to its inbox.
//!
//! Both wait on the store's wake-ups (`LISTEN`/`NOTIFY` on PostgreSQL) and otherwise look at
//! the queue only once per `sweep_interval` (a safety net for a lost wake-up) — and, for a
//! worker, when another worker's claim it could take over expires. An idle cluster sends no
//! other queue query.
//!
//! [`Dispatching::TaskQueue`]: crate::Dispatching::TaskQueue

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arches_core::execution::AttemptOutcome;
use arches_core::pipeline::validate::InputSchemas;
use arches_core::pipeline::{is_valid_worker_tag, WORKER_TAGS_MAX};
use arches_core::ports::{ArtifactStore, QueueListener, QueueTopic, TaskQueue, ToolRegistry};
use arches_core::records::TaskCompletion;
use arches_core::{Clock, TaskRunId, Timestamp};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::scheduler::{Command, SchedulerHandle};
use crate::worker::{report_to_queue, Attempt, CompletionBatcher, Reporter, Running};
use crate::{EngineOptions, LogWriterHandle};

/// The first delay after the store failed; it doubles up to [`BACKOFF_MAX`].
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
/// The longest delay between tries while the store is unreachable.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Settings of a standalone worker. Every bound is named with its unit.
#[derive(Clone, Debug)]
pub struct QueueWorkerOptions {
    /// Attempts (working directories, log bounds) and this worker's id (`worker_id`) and
    /// slots (`worker_slots`: attempts at once).
    pub engine: EngineOptions,
    /// Tags this worker advertises: it claims only offers whose worker tags are all among
    /// them.
    pub tags: Vec<String>,
    /// How long a claim lasts without renewal.
    pub claim_ttl: Duration,
    /// How often the worker renews its claims (one statement for all); well below
    /// `claim_ttl`.
    pub renew_interval: Duration,
    /// The safety sweep: the longest an idle worker goes without looking at the queue.
    pub sweep_interval: Duration,
    /// On shutdown, how long attempts may run on before they are stopped and their claims
    /// handed back.
    pub drain_grace: Duration,
    /// Claims of one offer that may expire before a worker fails the task instead of running
    /// it again: a task that kills its worker every time must not loop for ever (the
    /// in-process engine's `lease_expiries_max`).
    pub claim_expiries_max: u32,
}

impl QueueWorkerOptions {
    /// Defaults: a 30 s claim renewed every 10 s, a sweep a minute, 30 s to drain.
    pub fn new(engine: EngineOptions) -> Self {
        Self {
            engine,
            tags: Vec::new(),
            claim_ttl: Duration::from_secs(30),
            renew_interval: Duration::from_secs(10),
            sweep_interval: Duration::from_secs(60),
            drain_grace: Duration::from_secs(30),
            claim_expiries_max: arches_core::execution::ExecutionLimits::default()
                .lease_expiries_max,
        }
    }

    /// Checks the tags and the timing.
    ///
    /// # Errors
    /// A message naming the bad tag or setting.
    pub fn check(&self) -> Result<(), String> {
        if self.tags.len() > WORKER_TAGS_MAX {
            return Err(format!(
                "{} worker tags given; at most {WORKER_TAGS_MAX} are allowed",
                self.tags.len()
            ));
        }
        if let Some(bad) = self.tags.iter().find(|tag| !is_valid_worker_tag(tag)) {
            return Err(format!(
                "worker tag {bad:?} is not valid: use 1 to 64 of a-z, 0-9, `-`, `_`, `.`, `:`, \
                 starting with a letter or digit"
            ));
        }
        if self.renew_interval.is_zero() || self.renew_interval >= self.claim_ttl {
            return Err(format!(
                "the claim renewal interval ({:?}) must be above zero and below the claim \
                 lifetime ({:?})",
                self.renew_interval, self.claim_ttl
            ));
        }
        if self.sweep_interval.is_zero() {
            return Err("the sweep interval must be above zero".into());
        }
        Ok(())
    }
}

/// What a worker did, reported when it stops.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueWorkerReport {
    /// Offers claimed.
    pub claimed: u64,
    /// Attempts that ran to their end (reported to the store, accepted or not).
    pub finished: u64,
    /// Claims lost while running (expired, taken over or withdrawn): those attempts were
    /// stopped.
    pub lost: u64,
    /// Claims handed back unfinished at shutdown.
    pub handed_back: u64,
}

/// A standalone worker on the store's task queue. See the module documentation.
pub struct QueueWorker {
    options: QueueWorkerOptions,
    queue: Arc<dyn TaskQueue>,
    tools: Arc<ToolRegistry>,
    schemas: Arc<InputSchemas>,
    artifacts: Arc<dyn ArtifactStore>,
    logs: LogWriterHandle,
    clock: Arc<dyn Clock>,
}

struct Held {
    claim: u64,
    stop: CancellationToken,
    /// Until when the store last confirmed the claim (its expiry at the claim or the last
    /// renewal): past it, while renewals fail, the attempt is stopped, since another worker
    /// may have taken the task over.
    confirmed_until: Timestamp,
}

impl QueueWorker {
    /// A worker claiming from `queue`, executing with `tools`, writing logs through `logs`
    /// (a [`crate::LogWriter`] on the same store, run beside the worker).
    pub fn new(
        options: QueueWorkerOptions,
        queue: Arc<dyn TaskQueue>,
        tools: Arc<ToolRegistry>,
        artifacts: Arc<dyn ArtifactStore>,
        logs: LogWriterHandle,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let schemas = Arc::new(InputSchemas::compile(tools.as_ref()));
        Self {
            options,
            queue,
            tools,
            schemas,
            artifacts,
            logs,
            clock,
        }
    }

    /// Claims and executes until `stop_claiming` is cancelled; then lets the attempts still
    /// running finish within `drain_grace`, stops the rest and hands their claims back.
    /// While the store is unreachable it backs off (up to 5 s between tries) and goes on.
    pub async fn run(self, stop_claiming: CancellationToken) -> QueueWorkerReport {
        let worker = self.options.engine.worker_id.clone();
        let slots = self.options.engine.worker_slots.max(1);
        let running: Running = Arc::default();
        let mut held: HashMap<TaskRunId, Held> = HashMap::new();
        let mut tasks: JoinSet<TaskRunId> = JoinSet::new();
        // Which task run each spawned task runs, so that one that panics outside the tool
        // (whose own panics are caught) still frees its slot and hands its claim back.
        let mut spawned: HashMap<tokio::task::Id, TaskRunId> = HashMap::new();
        let mut report = QueueWorkerReport::default();
        let mut listener: Option<Box<dyn QueueListener>> = None;
        let mut backoff = BACKOFF_FIRST;
        let attempts_stop = CancellationToken::new();
        let batcher = CompletionBatcher::start(self.queue.clone(), slots);
        // Look at the queue now (at start, after a wake-up, a freed slot or a timer).
        let mut look = true;
        // When to look again without a wake-up: the sweep, or an expiring claim.
        let mut next_look = tokio::time::Instant::now() + self.options.sweep_interval;
        let mut renew = tokio::time::interval_at(
            tokio::time::Instant::now() + self.options.renew_interval,
            self.options.renew_interval,
        );
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        info!(%worker, slots, tags = ?self.options.tags, "worker started");
        // Claims left under this name by an earlier process go back to the queue at once.
        match self.queue.release_all(&worker).await {
            Ok(0) => {}
            Ok(count) => {
                info!(%worker, count, "claims of an earlier process of this name handed back")
            }
            Err(error) => {
                warn!(%error, "cannot hand back earlier claims of this name; they will expire")
            }
        }
        loop {
            if listener.is_none() {
                match self.queue.listen(QueueTopic::Offers).await {
                    Ok(l) => {
                        listener = Some(l);
                        look = true;
                    }
                    Err(error) => {
                        warn!(%error, "cannot listen for offers; retrying");
                        next_look = tokio::time::Instant::now() + backoff;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
            }
            let free = slots.saturating_sub(held.len());
            if look && free > 0 && !stop_claiming.is_cancelled() {
                look = false;
                let now = self.clock.now();
                match self
                    .queue
                    .claim(
                        &worker,
                        &self.options.tags,
                        free,
                        now,
                        self.options.claim_ttl,
                    )
                    .await
                {
                    Ok(batch) => {
                        backoff = BACKOFF_FIRST;
                        let full = batch.tasks.len() == free;
                        for claimed in batch.tasks {
                            report.claimed += 1;
                            let stop = attempts_stop.child_token();
                            let a = claimed.assignment;
                            let task_run_id = a.task_run_id;
                            held.insert(
                                task_run_id,
                                Held {
                                    claim: claimed.claim,
                                    stop: stop.clone(),
                                    confirmed_until: claimed.expires_at,
                                },
                            );
                            if claimed.expiries >= self.options.claim_expiries_max.max(1) {
                                // Its workers keep dying while they run it: fail it rather
                                // than run it again (bounded, like lease expiries in-process).
                                let completion = TaskCompletion {
                                    task_run_id,
                                    claim: claimed.claim,
                                    worker: worker.clone(),
                                    outcome: AttemptOutcome::Failed {
                                        message: format!(
                                            "the claims of {} workers expired while they ran it; \
                                             the task may be crashing its worker",
                                            claimed.expiries
                                        ),
                                        retryable: false,
                                    },
                                    executed_at: now,
                                    finished_at: now,
                                };
                                let batcher = batcher.clone();
                                let handle = tasks.spawn(async move {
                                    report_to_queue(&batcher, completion).await;
                                    task_run_id
                                });
                                spawned.insert(handle.id(), task_run_id);
                                continue;
                            }
                            running
                                .lock()
                                .expect("the running map is never poisoned")
                                .insert(task_run_id, (a.fencing_token, stop.clone()));
                            let attempt = Attempt {
                                assignment: a,
                                options: self.options.engine.clone(),
                                reporter: Reporter::Queue {
                                    batcher: batcher.clone(),
                                    worker: worker.clone(),
                                    claim: claimed.claim,
                                },
                                tools: self.tools.clone(),
                                schemas: self.schemas.clone(),
                                artifacts: self.artifacts.clone(),
                                logs: self.logs.clone(),
                                clock: self.clock.clone(),
                                running: running.clone(),
                            };
                            let shutdown = attempts_stop.clone();
                            let handle = tasks.spawn(async move {
                                attempt.execute(stop, shutdown).await;
                                task_run_id
                            });
                            spawned.insert(handle.id(), task_run_id);
                        }
                        // A full batch: more may be waiting.
                        look = full;
                        next_look = self.next_look(batch.next_expiry, now);
                    }
                    Err(error) => {
                        warn!(%error, "cannot claim offers; retrying");
                        next_look = tokio::time::Instant::now() + backoff;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
                if look {
                    continue;
                }
            }
            tokio::select! {
                biased;
                _ = stop_claiming.cancelled() => break,
                Some(joined) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                    // Every attempt that has ended frees its slot before the next claim, so
                    // claims go in batches.
                    let mut next = Some(joined);
                    while let Some(joined) = next {
                        self.joined(&worker, joined, &mut spawned, &mut held, &running).await;
                        report.finished += 1;
                        next = tasks.try_join_next_with_id();
                    }
                    look = true;
                }
                _ = renew.tick(), if !held.is_empty() => {
                    report.lost += self.renew(&worker, &mut held, &running).await;
                }
                woken = wait_listener(&mut listener) => {
                    if let Err(error) = woken {
                        warn!(%error, "lost the offers listener; listening again");
                        listener = None;
                    }
                    look = true;
                }
                _ = tokio::time::sleep_until(next_look) => {
                    look = true;
                    next_look = tokio::time::Instant::now() + self.options.sweep_interval;
                }
            }
        }

        // Draining: no new claims; attempts still running get the grace period.
        info!(%worker, running = held.len(), "worker stopping: no new claims");
        let deadline = tokio::time::Instant::now() + self.options.drain_grace;
        while !tasks.is_empty() {
            tokio::select! {
                Some(joined) = tasks.join_next_with_id() => {
                    self.joined(&worker, joined, &mut spawned, &mut held, &running).await;
                    report.finished += 1;
                }
                _ = renew.tick() => {
                    report.lost += self.renew(&worker, &mut held, &running).await;
                }
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        let unfinished: Vec<(TaskRunId, u64)> = held.iter().map(|(id, h)| (*id, h.claim)).collect();
        attempts_stop.cancel();
        while let Some(joined) = tasks.join_next_with_id().await {
            if let Err(error) = joined {
                spawned.remove(&error.id());
            }
        }
        if !unfinished.is_empty() {
            match self.queue.release(&worker, &unfinished).await {
                Ok(count) => report.handed_back += count as u64,
                Err(error) => {
                    warn!(%error, count = unfinished.len(), "cannot hand claims back; they will expire")
                }
            }
        }
        info!(%worker, ?report, "worker stopped");
        report
    }

    /// Frees the slot of a spawned task that ended. One that panicked (outside the tool,
    /// whose panics are reported as failures) hands its claim back, so the task runs again
    /// elsewhere rather than wait for a claim this worker would renew for ever.
    async fn joined(
        &self,
        worker: &str,
        joined: Result<(tokio::task::Id, TaskRunId), tokio::task::JoinError>,
        spawned: &mut HashMap<tokio::task::Id, TaskRunId>,
        held: &mut HashMap<TaskRunId, Held>,
        running: &Running,
    ) {
        let (id, panicked) = match joined {
            Ok((id, _)) => (id, None),
            Err(error) => (error.id(), Some(error.to_string())),
        };
        let Some(task_run_id) = spawned.remove(&id) else {
            return;
        };
        let Some(h) = held.remove(&task_run_id) else {
            return;
        };
        if let Some(panic) = panicked {
            warn!(%task_run_id, %panic, "an attempt's task panicked; handing its claim back");
            running
                .lock()
                .expect("the running map is never poisoned")
                .remove(&task_run_id);
            if let Err(error) = self.queue.release(worker, &[(task_run_id, h.claim)]).await {
                warn!(%error, %task_run_id, "cannot hand the claim back; it will expire");
            }
        }
    }

    /// When to look at the queue next without a wake-up: the sweep, or just after the
    /// earliest claim this worker could take over expires.
    fn next_look(&self, next_expiry: Option<Timestamp>, now: Timestamp) -> tokio::time::Instant {
        let sweep = self.options.sweep_interval;
        let wait = match next_expiry {
            Some(at) => at
                .since(now)
                .saturating_add(Duration::from_millis(1))
                .min(sweep),
            None => sweep,
        };
        tokio::time::Instant::now() + wait
    }

    /// Renews every claim held; stops the attempts whose claims are lost. Returns how many
    /// were lost. An attempt that has already reported (no longer in `running`) is not
    /// lost: its offer is gone because its completion is stored.
    async fn renew(
        &self,
        worker: &str,
        held: &mut HashMap<TaskRunId, Held>,
        running: &Running,
    ) -> u64 {
        let claims: Vec<(TaskRunId, u64)> = held.iter().map(|(id, h)| (*id, h.claim)).collect();
        let now = self.clock.now();
        let renewed = self
            .queue
            .renew(worker, &claims, now, self.options.claim_ttl)
            .await;
        let still_running = running.lock().expect("the running map is never poisoned");
        let mut lost = 0;
        match renewed {
            Ok(kept) => {
                let kept: std::collections::HashSet<TaskRunId> = kept.into_iter().collect();
                for (id, h) in held.iter_mut() {
                    if kept.contains(id) {
                        h.confirmed_until = now.plus(self.options.claim_ttl);
                    } else if still_running.contains_key(id) && !h.stop.is_cancelled() {
                        warn!(task_run_id = %id, claim = h.claim, "claim lost; stopping the attempt");
                        h.stop.cancel();
                        lost += 1;
                    }
                }
            }
            Err(error) => {
                // Claims the store confirmed until a moment now past may already be another
                // worker's: their attempts stop; the others run on, and the next tick tries
                // again.
                warn!(%error, "cannot renew claims");
                for (id, h) in held.iter() {
                    if h.confirmed_until <= now
                        && still_running.contains_key(id)
                        && !h.stop.is_cancelled()
                    {
                        warn!(task_run_id = %id, claim = h.claim, "claim expired unconfirmed; stopping the attempt");
                        h.stop.cancel();
                        lost += 1;
                    }
                }
            }
        }
        lost
    }
}

async fn wait_listener(
    listener: &mut Option<Box<dyn QueueListener>>,
) -> Result<(), arches_core::ports::StoreError> {
    match listener {
        Some(listener) => listener.next().await,
        None => std::future::pending().await,
    }
}

/// Takes the completions stored for one scheduler's runs and hands them to its inbox. See
/// the module documentation.
pub struct CompletionFeeder {
    queue: Arc<dyn TaskQueue>,
    owner: String,
    scheduler: SchedulerHandle,
    sweep_interval: Duration,
    batch_max: usize,
}

impl CompletionFeeder {
    /// A feeder for the scheduler named `owner` (its `worker_id`), taking up to `batch_max`
    /// completions per query, looking at least once per `sweep_interval`.
    pub fn new(
        queue: Arc<dyn TaskQueue>,
        owner: String,
        scheduler: SchedulerHandle,
        sweep_interval: Duration,
        batch_max: usize,
    ) -> Self {
        Self {
            queue,
            owner,
            scheduler,
            sweep_interval,
            batch_max: batch_max.max(1),
        }
    }

    /// Feeds until `shutdown` or until the scheduler stops. Waits until the scheduler's
    /// runs are resumed ([`SchedulerHandle::mark_recovered`]); then makes the completions an
    /// earlier incarnation of this scheduler took (and never committed) takeable again.
    pub async fn run(self, shutdown: CancellationToken) {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = self.scheduler.recovered() => {}
        }
        let mut backoff = BACKOFF_FIRST;
        let mut untaken = false;
        let mut listener: Option<Box<dyn QueueListener>> = None;
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let mut wait = self.sweep_interval;
            if !untaken {
                match self.queue.untake_completions(&self.owner).await {
                    Ok(count) => {
                        untaken = true;
                        if count > 0 {
                            info!(owner = %self.owner, count, "completions taken before a restart are taken again");
                        }
                    }
                    Err(error) => {
                        warn!(%error, "cannot reset taken completions; retrying");
                        wait = backoff;
                    }
                }
            }
            if untaken && listener.is_none() {
                match self
                    .queue
                    .listen(QueueTopic::Completions(self.owner.clone()))
                    .await
                {
                    Ok(l) => {
                        listener = Some(l);
                    }
                    Err(error) => {
                        warn!(%error, "cannot listen for completions; retrying");
                        wait = backoff;
                    }
                }
            }
            if untaken {
                match self
                    .queue
                    .take_completions(&self.owner, self.batch_max)
                    .await
                {
                    Ok(taken) => {
                        backoff = BACKOFF_FIRST;
                        let full = taken.len() == self.batch_max;
                        for completion in taken {
                            let command = Command::from_queued(completion);
                            if self.scheduler.send(command).await.is_err() {
                                debug!("scheduler gone; the feeder stops");
                                return;
                            }
                        }
                        if full {
                            continue;
                        }
                    }
                    Err(error) => {
                        warn!(%error, "cannot take completions; retrying");
                        wait = backoff;
                    }
                }
            }
            if wait != self.sweep_interval {
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                woken = wait_listener(&mut listener) => {
                    if let Err(error) = woken {
                        warn!(%error, "lost the completions listener; listening again");
                        listener = None;
                    }
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}
