//! `arches run`, `arches resume` and `arches cancel`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use arches_core::execution::{ExecutionLimits, NewRun, RunExecution};
use arches_core::pipeline::{validate, PipelineDef, Templates};
use arches_core::ports::Store;
use arches_core::records::{RunRecord, WriteBatch};
use arches_core::{Clock, OrgId, RunId, RunState, SystemClock};
use arches_engine::{Engine, EngineOptions, SchedulerHandle};
use clap::Args;
use tokio_util::sync::CancellationToken;

use crate::app::{self, Home, Opened};
use crate::{inspect, owner, progress};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The pipeline file (YAML or JSON).
    file: PathBuf,
    /// A param value, `name=value`; repeat for several. Values are converted to the declared
    /// type (arrays and objects as JSON).
    #[arg(long = "param", short = 'p', value_name = "NAME=VALUE")]
    params: Vec<String>,
    /// No live progress display, only the summary.
    #[arg(long)]
    quiet: bool,
    /// Task runs executing at once in this process.
    #[arg(long)]
    workers: Option<usize>,
    /// Run no task here: offer them on the PostgreSQL store's task queue (--database-url)
    /// for standalone workers (`arches worker`), and drive the run from their completions.
    #[arg(long, conflicts_with = "workers")]
    no_workers: bool,
}

#[derive(Args, Debug)]
pub struct ResumeArgs {
    /// The run to finish.
    run_id: RunId,
    /// Resume even if the process that drove the run still seems alive.
    #[arg(long)]
    force: bool,
    /// No live progress display, only the summary.
    #[arg(long)]
    quiet: bool,
    /// As `arches run --no-workers`: standalone workers run the tasks.
    #[arg(long)]
    no_workers: bool,
}

#[derive(Args, Debug)]
pub struct CancelArgs {
    /// The run to cancel.
    pub run_id: RunId,
}

fn engine_options(home: &Home, workers: Option<usize>) -> EngineOptions {
    let mut options = EngineOptions::new(home.work_root());
    options.worker_id = owner::this_process();
    if let Some(workers) = workers {
        options.worker_slots = workers.max(1);
    }
    options
}

pub async fn run(home: &Home, args: RunArgs) -> anyhow::Result<ExitCode> {
    let registry = app::registry();
    let pipeline = match app::load_pipeline(&args.file, &registry)? {
        Ok(pipeline) => pipeline,
        Err(diagnostics) => {
            app::print_diagnostics(&diagnostics);
            return Ok(ExitCode::from(2));
        }
    };
    let params = parse_params(&pipeline.def, &args.params)?;
    let opened = home.open().await?;
    if args.no_workers && opened.queue.is_none() {
        anyhow::bail!(
            "--no-workers needs a store that standalone workers share: give a PostgreSQL \
             store with --database-url (or ARCHES_DATABASE_URL)"
        );
    }
    let stored = opened
        .store
        .save_pipeline(OrgId::DEFAULT, &pipeline.def)
        .await
        .context("cannot save the pipeline")?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let execution = RunExecution::create(
        NewRun {
            id: RunId::new(),
            org_id: OrgId::DEFAULT,
            pipeline_version: stored.version,
            params,
        },
        pipeline,
        Arc::new(Templates::new()),
        ExecutionLimits::default(),
        clock.now(),
    );
    let options = engine_options(home, args.workers);
    drive(
        home,
        opened,
        options,
        clock,
        Submission::New(Box::new(execution)),
        args.quiet,
        args.no_workers,
    )
    .await
}

pub async fn resume(home: &Home, args: ResumeArgs) -> anyhow::Result<ExitCode> {
    let opened = home.open_existing().await?;
    let run = stored_run(&*opened.store, args.run_id).await?;
    if run.state.is_terminal() {
        out!("run {} is already {}", run.id, run.state);
        return Ok(exit_code(&run));
    }
    if let Some(pid) = run.owner.as_deref().and_then(owner::live_pid) {
        if !args.force {
            anyhow::bail!(
                "run {} is still driven by process {pid}; stop it first, or pass --force if you are sure it is not",
                run.id
            );
        }
    }
    if let Some(scheduler) = run.owner.as_deref().filter(|o| !o.starts_with("pid:")) {
        if !args.force {
            anyhow::bail!(
                "run {} is driven by the scheduler {scheduler:?} (a server); restart that server to \
                 finish it, or pass --force if it is gone for good",
                run.id
            );
        }
    }
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let mut execution = restore(&*opened.store, run).await?;
    if args.no_workers {
        if opened.queue.is_none() {
            anyhow::bail!(
                "--no-workers needs a store that standalone workers share: give a PostgreSQL \
                 store with --database-url (or ARCHES_DATABASE_URL)"
            );
        }
        // The leases stay with the workers that claimed them (their claims carry on in the
        // store); the scheduler offers them again under its own name.
    } else {
        let reclaimed = execution.reclaim_leases(clock.now());
        if reclaimed > 0 {
            status!("{reclaimed} task run(s) were running when the run stopped; they run again");
        }
    }
    let options = engine_options(home, None);
    drive(
        home,
        opened,
        options,
        clock,
        Submission::Resume(Box::new(execution)),
        args.quiet,
        args.no_workers,
    )
    .await
}

pub async fn cancel(home: &Home, args: CancelArgs) -> anyhow::Result<ExitCode> {
    let opened = home.open_existing().await?;
    let run = stored_run(&*opened.store, args.run_id).await?;
    if run.state.is_terminal() {
        anyhow::bail!("run {} is already {}", run.id, run.state);
    }
    if let Some(scheduler) = run.owner.as_deref().filter(|o| !o.starts_with("pid:")) {
        anyhow::bail!(
            "run {} is driven by the scheduler {scheduler:?} (a server): cancel it through the \
             server (`arches --server URL cancel {}`)",
            run.id,
            run.id
        );
    }
    if let Some(pid) = run.owner.as_deref().and_then(owner::live_pid) {
        // The owning process cancels on SIGINT: it stops its running tasks and records it.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGINT,
        )
        .with_context(|| format!("cannot signal process {pid}"))?;
        out!(
            "asked process {pid}, which drives run {}, to cancel it",
            run.id
        );
        return Ok(ExitCode::SUCCESS);
    }
    // Nobody drives the run: cancel it in the store directly.
    let mut execution = restore(&*opened.store, run).await?;
    let now = SystemClock.now();
    let stopped = execution.cancel(now, "cancelled by user");
    let changes = execution.take_changes();
    let batch = WriteBatch {
        runs: changes.run.into_iter().collect(),
        task_runs: changes.task_runs,
        attempts: changes.attempts,
        // Its waiting validation-queue items are closed with it.
        reviews: changes.reviews,
        // On a shared store, workers holding its task runs lose them at their next renewal.
        withdrawn: if opened.queue.is_some() {
            stopped.into_iter().map(|(id, _)| id).collect()
        } else {
            Vec::new()
        },
        ..WriteBatch::default()
    };
    opened.store.commit(&batch).await?;
    out!("run {} cancelled", execution.id());
    Ok(ExitCode::SUCCESS)
}

/// A stored run, or an error naming the id.
async fn stored_run(store: &dyn Store, run_id: RunId) -> anyhow::Result<RunRecord> {
    store
        .run(run_id)
        .await?
        .with_context(|| format!("no run {run_id}"))
}

/// Rebuilds a run from the store.
pub async fn restore(store: &dyn Store, run: RunRecord) -> anyhow::Result<RunExecution> {
    Ok(arches_engine::restore_run(store, run).await?)
}

enum Submission {
    New(Box<RunExecution>),
    Resume(Box<RunExecution>),
}

/// Runs the engine until the run is over, with progress, Ctrl-C as cancel, and a summary.
async fn drive(
    home: &Home,
    opened: Opened,
    options: EngineOptions,
    clock: Arc<dyn Clock>,
    submission: Submission,
    quiet: bool,
    no_workers: bool,
) -> anyhow::Result<ExitCode> {
    let engine = match (&opened.queue, no_workers) {
        (Some(queue), true) => {
            Engine::build_on_queue(options, opened.store.clone(), queue.clone(), clock, None)
        }
        _ => Engine::build(
            options,
            opened.store.clone(),
            opened.artifacts.clone(),
            app::registry_at(&home.root, home.database_url.as_deref()),
            clock,
        ),
    };
    let handle = engine.handle();
    let shutdown = CancellationToken::new();
    let engine_task = tokio::spawn(engine.run(shutdown.clone()));
    let events = handle.subscribe();
    let (run_id, total_tasks) = match submission {
        Submission::New(execution) => {
            let tasks = execution.task_runs().len();
            (handle.submit(*execution).await?, tasks)
        }
        Submission::Resume(execution) => {
            let tasks = execution.task_runs().len();
            (handle.resume(*execution).await?, tasks)
        }
    };
    // This process drives this one run: recovery is over once it is submitted or resumed.
    handle.mark_recovered();
    status!(
        "run {run_id} started (store {}, durability {}{})",
        home.store_name(),
        home.durability.as_str(),
        if no_workers {
            ", tasks offered to standalone workers"
        } else {
            ""
        }
    );
    let display = progress::Progress::start(events, run_id, total_tasks, quiet);
    let outcome = wait_with_interrupt(&handle, run_id).await;
    display.finish().await;
    shutdown.cancel();
    let engine_result = engine_task.await.context("engine task failed")?;
    let run = match (outcome, engine_result) {
        (Ok(run), _) => run,
        (Err(err), Err(engine_err)) => {
            return Err(anyhow::anyhow!(engine_err)).context(err.to_string())
        }
        (Err(err), Ok(())) => return Err(err),
    };
    inspect::print_run_summary(&*opened.store, &run).await?;
    Ok(exit_code(&run))
}

async fn wait_with_interrupt(handle: &SchedulerHandle, run_id: RunId) -> anyhow::Result<RunRecord> {
    let wait = handle.wait(run_id);
    tokio::pin!(wait);
    let mut interrupted = false;
    loop {
        tokio::select! {
            result = &mut wait => return result.map_err(|e| anyhow::anyhow!("run {run_id}: {e}")),
            signal = tokio::signal::ctrl_c(), if !interrupted => {
                signal.context("cannot listen for Ctrl-C")?;
                interrupted = true;
                status!("interrupted: cancelling run {run_id}");
                handle.cancel(run_id, "cancelled by user (interrupt)").await.ok();
            }
        }
    }
}

fn exit_code(run: &RunRecord) -> ExitCode {
    match run.state {
        RunState::Succeeded => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}

/// Parses `name=value` params against the pipeline's declarations and applies defaults.
fn parse_params(def: &PipelineDef, given: &[String]) -> anyhow::Result<serde_json::Value> {
    let values = coerce_params(def, given)?;
    validate::check_params(def, &values)
        .map_err(|problems| anyhow::anyhow!("bad params: {}", problems.join("; ")))
}

/// Converts `name=value` params to the types the pipeline declares (no defaults).
pub fn coerce_params(
    def: &PipelineDef,
    given: &[String],
) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let mut values = serde_json::Map::new();
    for text in given {
        let (name, raw) = text
            .split_once('=')
            .with_context(|| format!("param {text:?} must be written name=value"))?;
        let declared = def.params.get(name).with_context(|| {
            format!(
                "unknown param {name:?}; the pipeline declares: {}",
                def.params.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })?;
        let value = declared
            .param_type
            .coerce(raw)
            .map_err(|e| anyhow::anyhow!("param {name}: {e}"))?;
        values.insert(name.to_owned(), value);
    }
    Ok(values)
}
