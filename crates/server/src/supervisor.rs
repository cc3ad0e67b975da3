//! Keeps the in-process engine running across store failures.
//!
//! The scheduler stops at its first failed commit: its memory may then hold changes the
//! store does not, and nothing may act on them (see `arches_engine::Scheduler::step`). A
//! server must not stay without an engine because the disk filled up for a moment or the
//! database was briefly unreachable, so the supervisor rebuilds it the way a restarted
//! process would: the stopped engine's worker pool stops every attempt it holds (their
//! leases stay in the store), a new engine is built from the configuration,
//! [`crate::app::recover_runs`] resumes every unfinished run from the store on it
//! (interrupted attempts are recorded `lease_expired` and run again, succeeded task runs are
//! kept), and only then does its handle replace the old one in [`EngineSlot`]. Nothing acknowledged is lost: a caller is answered
//! only after its change is committed, and a change that was not committed was not
//! acknowledged (its caller got 503 and may retry).
//!
//! Restarts back off exponentially from [`RESTART_DELAY_MIN`] to [`RESTART_DELAY_MAX`]; an
//! engine that ran for [`HEALTHY_RUN`] resets the delay. While no engine runs, requests
//! that need one get 503 with `Retry-After`.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use arches_engine::{Engine, SchedulerHandle};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::state::AppState;

/// First delay before rebuilding a stopped engine.
pub const RESTART_DELAY_MIN: Duration = Duration::from_millis(100);
/// Longest delay between two rebuilds.
pub const RESTART_DELAY_MAX: Duration = Duration::from_secs(30);
/// An engine that ran this long before it stopped restarts after [`RESTART_DELAY_MIN`]
/// again.
pub const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Builds a fresh engine from the server's configuration (same store, tools, bus and clock).
pub type EngineFactory = Arc<dyn Fn() -> Engine + Send + Sync>;

/// The handle of the engine running now, replaced when the supervisor rebuilds it. Cheap to
/// clone; clones share the slot.
#[derive(Clone)]
pub struct EngineSlot {
    current: Arc<RwLock<SchedulerHandle>>,
    generation: watch::Sender<u64>,
}

impl EngineSlot {
    /// A slot holding the first engine's handle, at generation 0.
    pub fn new(handle: SchedulerHandle) -> Self {
        Self {
            current: Arc::new(RwLock::new(handle)),
            generation: watch::Sender::new(0),
        }
    }

    /// The handle of the current engine. A handle taken before a rebuild answers
    /// `arches_engine::Error::Stopped`.
    pub fn handle(&self) -> SchedulerHandle {
        match self.current.read() {
            Ok(handle) => handle.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// How many times the engine was rebuilt and its unfinished runs resumed.
    pub fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    /// Waits until the engine has been rebuilt, with its unfinished runs resumed, at least
    /// `generation` times.
    pub async fn rebuilt(&self, generation: u64) {
        let mut receiver = self.generation.subscribe();
        // The sender lives in `self`, so the channel cannot close while this waits.
        let _ = receiver.wait_for(|now| *now >= generation).await;
    }

    fn replace(&self, handle: SchedulerHandle) {
        match self.current.write() {
            Ok(mut current) => *current = handle,
            Err(poisoned) => *poisoned.into_inner() = handle,
        }
    }

    fn rebuilt_and_recovered(&self) {
        self.generation.send_modify(|generation| *generation += 1);
    }
}

/// Watches `first` (the first engine, already running and stopped by a child token of
/// `stop`) until `stop` is cancelled, rebuilding the engine with `factory` whenever it stops
/// on an error or before `stop` (its runs could not be resumed).
pub async fn supervise(
    first: JoinHandle<Result<(), arches_engine::Error>>,
    factory: EngineFactory,
    state: AppState,
    stop: CancellationToken,
) {
    let Some(slot) = state.engine.clone() else {
        return;
    };
    let mut task = first;
    let mut started = Instant::now();
    let mut delay = RESTART_DELAY_MIN;
    loop {
        match task.await {
            Ok(Ok(())) if stop.is_cancelled() => return,
            Ok(Ok(())) => {
                tracing::warn!("the engine stopped: its runs could not be recovered");
            }
            Ok(Err(error)) => {
                tracing::error!(%error, "the engine stopped; rebuilding it from the store");
            }
            Err(error) => tracing::error!(%error, "the engine task failed; rebuilding it"),
        }
        if started.elapsed() >= HEALTHY_RUN {
            delay = RESTART_DELAY_MIN;
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(RESTART_DELAY_MAX);

        let engine = factory();
        let handle = engine.handle();
        let engine_stop = stop.child_token();
        started = Instant::now();
        task = tokio::spawn(engine.run(engine_stop.clone()));
        // Requests keep getting 503 from the stopped engine's handle until every unfinished
        // run is resumed on the new one, so none of them acts on a run being restored.
        match crate::app::recover_runs(&state, &handle).await {
            Ok(resumed) => {
                handle.mark_recovered();
                slot.replace(handle);
                slot.rebuilt_and_recovered();
                tracing::info!(
                    generation = slot.generation(),
                    runs = resumed,
                    "engine rebuilt; unfinished runs resumed"
                );
            }
            Err(error) => {
                // Runs left unresumed would wait for the next restart of the process; stop
                // this engine and try again after the delay instead.
                tracing::error!(%error, "cannot resume runs on the rebuilt engine");
                engine_stop.cancel();
            }
        }
    }
}
