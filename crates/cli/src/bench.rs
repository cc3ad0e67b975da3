//! `arches bench`: the engine's benchmarks, measured from the engine's own timestamps
//! (task-run start and finish times recorded by the scheduler and workers), on a fresh
//! store in a temporary directory. See BENCHMARKS.md for the figures and the machine.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use arches_core::execution::{ExecutionLimits, NewRun, RunExecution};
use arches_core::pipeline::{Pipeline, PipelineDef, Templates};
use arches_core::ports::{ArtifactStore, Store};
use arches_core::records::Durability;
use arches_core::{Clock, OrgId, RunId, RunState, SystemClock};
use arches_engine::{Engine, EngineOptions};
use arches_store::{LocalArtifactStore, SqliteStore};
use clap::Subcommand;
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// A chain of sequential `noop` tasks: the engine's per-task overhead, from the end of
    /// task N to the start of task N+1.
    Chain {
        /// Standalone worker processes (`arches worker`) on the PostgreSQL store of
        /// --database-url; 0: the engine's in-process workers on a SQLite file.
        #[arg(long, default_value_t = 0)]
        queue_workers: usize,
        /// Tasks in the chain.
        #[arg(long, default_value_t = 40)]
        tasks: usize,
        /// Runs measured (the median of their medians is reported).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Store durability.
        #[arg(long = "sync", default_value = "normal")]
        sync: Durability,
    },
    /// A 1 → N → 1 fan-out of `noop` tasks: task runs per second, end to end.
    Fanout {
        /// Standalone worker processes (`arches worker`) on the PostgreSQL store of
        /// --database-url; 0: the engine's in-process workers on a SQLite file.
        #[arg(long, default_value_t = 0)]
        queue_workers: usize,
        /// Items of the fan-out.
        #[arg(long, default_value_t = 10_000)]
        width: usize,
        /// Runs measured.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Store durability.
        #[arg(long = "sync", default_value = "normal")]
        sync: Durability,
        /// Worker slots (task runs executing at once).
        #[arg(long)]
        workers: Option<usize>,
        /// Most scheduler commands per commit (group commit).
        #[arg(long)]
        batch: Option<usize>,
    },
    /// Enqueue-to-start latency at a sustained rate: one-task runs (`noop`) submitted at
    /// `rate` per second for `seconds`; the latency of each is its task run's start less the
    /// moment it was queued, both as the engine recorded them.
    Latency {
        /// Standalone worker processes on the PostgreSQL store of --database-url; 0: the
        /// engine's in-process workers on a SQLite file.
        #[arg(long, default_value_t = 0)]
        queue_workers: usize,
        /// Task runs per second.
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        /// Seconds of load.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Worker slots (per worker process with --queue-workers).
        #[arg(long)]
        workers: Option<usize>,
        /// Store durability.
        #[arg(long = "sync", default_value = "normal")]
        sync: Durability,
    },
    /// The queries an idle cluster sends: a scheduler and `--queue-workers` standalone
    /// workers on the PostgreSQL store of --database-url, idle for `seconds` after one run;
    /// transactions counted by the server (`pg_stat_database`).
    Idle {
        /// Standalone worker processes.
        #[arg(long, default_value_t = 2)]
        queue_workers: usize,
        /// Seconds observed.
        #[arg(long, default_value_t = 120)]
        seconds: u64,
    },
    /// Sandboxed WASM tasks (examples/wasm/fib.wat, recursive Fibonacci): a chain of `tasks`
    /// wasm tasks computing fib(`n`), and the per-task overhead above the module's own
    /// compute time (measured by calling the warm module directly).
    Wasm {
        /// Tasks in the chain.
        #[arg(long, default_value_t = 40)]
        tasks: usize,
        /// The Fibonacci number each task computes.
        #[arg(long, default_value_t = 33)]
        n: u32,
        /// Runs measured (the median of their medians is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Store durability.
        #[arg(long = "sync", default_value = "normal")]
        sync: Durability,
    },
    /// The HTTP API under load: an in-process server on a loopback port and keep-alive
    /// connections sending one request back to back (see `bench_api`).
    Api {
        /// The request measured.
        #[arg(long, value_enum, default_value = "get-run")]
        scenario: crate::bench_api::ApiScenario,
        /// Concurrent keep-alive connections.
        #[arg(long, default_value_t = 32)]
        connections: usize,
        /// Seconds measured.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Seconds of warm-up before measuring.
        #[arg(long, default_value_t = 2.0)]
        warmup: f64,
        /// Store durability.
        #[arg(long = "sync", default_value = "normal")]
        sync: Durability,
    },
}

/// Standalone workers for a benchmark: `count` `arches worker` processes on the PostgreSQL
/// store at `url`, each with `slots` slots.
#[derive(Clone, Debug)]
pub(crate) struct QueueSetup {
    url: String,
    count: usize,
    slots: Option<usize>,
}

impl QueueSetup {
    /// `None` for 0 workers; an error without a database URL.
    fn new(url: Option<&str>, count: usize, slots: Option<usize>) -> anyhow::Result<Option<Self>> {
        if count == 0 {
            return Ok(None);
        }
        let url = url.context(
            "--queue-workers needs a PostgreSQL store: give --database-url (or ARCHES_DATABASE_URL)",
        )?;
        Ok(Some(QueueSetup {
            url: url.to_owned(),
            count,
            slots,
        }))
    }
}

struct Bench {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    handle: arches_engine::SchedulerHandle,
    shutdown: CancellationToken,
    engine: tokio::task::JoinHandle<Result<(), arches_engine::Error>>,
    options: EngineOptions,
    workers: Vec<std::process::Child>,
    pg: Option<arches_store::PgStore>,
}

impl Bench {
    async fn start(
        durability: Durability,
        workers: Option<usize>,
        batch: Option<usize>,
    ) -> anyhow::Result<Bench> {
        Self::start_with(durability, workers, batch, None).await
    }

    async fn start_with(
        durability: Durability,
        workers: Option<usize>,
        batch: Option<usize>,
        queue: Option<QueueSetup>,
    ) -> anyhow::Result<Bench> {
        let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
        let mut options = EngineOptions::new(dir.path().join("work"));
        if let Some(batch) = batch {
            options.batch_size_max = batch.max(1);
        }
        let Some(queue) = queue else {
            let store: Arc<dyn Store> =
                Arc::new(SqliteStore::open(&dir.path().join("arches.db"), durability).await?);
            let artifacts: Arc<dyn ArtifactStore> = Arc::new(LocalArtifactStore::new(
                &dir.path().join("artifacts"),
                store.clone(),
            )?);
            if let Some(workers) = workers {
                options.worker_slots = workers.max(1);
            }
            let engine = Engine::build(
                options.clone(),
                store.clone(),
                artifacts,
                arches_tools::builtin_registry(),
                Arc::new(SystemClock),
            );
            return Ok(Self::running(dir, store, engine, options, Vec::new(), None));
        };
        let pg = arches_store::PgStore::connect_pooled(
            &queue.url,
            durability,
            arches_store::PgPoolSettings {
                max_connections: 16,
                ..Default::default()
            },
        )
        .await
        .context("cannot open the PostgreSQL store")?;
        let store: Arc<dyn Store> = Arc::new(pg.clone());
        options.worker_id = format!("bench-scheduler-{}", std::process::id());
        options.worker_slots = QUEUE_OFFERS_MAX;
        let engine = Engine::build_on_queue(
            options.clone(),
            store.clone(),
            Arc::new(pg.clone()),
            Arc::new(SystemClock),
            None,
        );
        let exe = std::env::current_exe().context("cannot find this executable")?;
        let mut children = Vec::new();
        for i in 0..queue.count {
            let mut command = std::process::Command::new(&exe);
            command
                .args(["--database-url", &queue.url, "--home"])
                .arg(dir.path().join(format!("worker-{i}")))
                .args(["worker", "--id", &format!("bench-worker-{i}")])
                .env("ARCHES_LOG", "warn")
                .env_remove("ARCHES_STORE__DATABASE_URL")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null());
            if let Some(slots) = queue.slots {
                command.args(["--slots", &slots.to_string()]);
            }
            children.push(command.spawn().context("cannot start a worker process")?);
        }
        Ok(Self::running(
            dir,
            store,
            engine,
            options,
            children,
            Some(pg),
        ))
    }

    fn running(
        dir: tempfile::TempDir,
        store: Arc<dyn Store>,
        engine: Engine,
        options: EngineOptions,
        workers: Vec<std::process::Child>,
        pg: Option<arches_store::PgStore>,
    ) -> Bench {
        let handle = engine.handle();
        // Nothing to resume: fresh runs only.
        handle.mark_recovered();
        let shutdown = CancellationToken::new();
        let engine = tokio::spawn(engine.run(shutdown.clone()));
        Bench {
            _dir: dir,
            store,
            handle,
            shutdown,
            engine,
            options,
            workers,
            pg,
        }
    }

    /// Submits a run without waiting for it.
    async fn submit(&self, def: &PipelineDef, version: u32) -> anyhow::Result<RunId> {
        Ok(self
            .handle
            .submit(new_execution(def, version, json!({}))?)
            .await?)
    }

    async fn run(&self, def: &PipelineDef, params: serde_json::Value) -> anyhow::Result<RunId> {
        let version = self.store.save_pipeline(OrgId::DEFAULT, def).await?.version;
        let execution = new_execution(def, version, params)?;
        let run_id = self.handle.submit(execution).await?;
        let run = self.handle.wait(run_id).await?;
        anyhow::ensure!(
            run.state == RunState::Succeeded,
            "benchmark run {run_id} ended {}: {:?}",
            run.state,
            run.error
        );
        Ok(run_id)
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.engine.await.context("engine task")??;
        for mut worker in self.workers {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(worker.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = tokio::task::spawn_blocking(move || worker.wait()).await;
        }
        if let Some(pg) = self.pg {
            pg.close().await;
        }
        Ok(())
    }

    /// Where the benchmark runs, for its report.
    fn setting(&self) -> String {
        if self.workers.is_empty() {
            format!("in-process workers ({} slots)", self.options.worker_slots)
        } else {
            format!(
                "PostgreSQL task queue, {} standalone worker process(es)",
                self.workers.len()
            )
        }
    }
}

/// A new run of version `version` of `def` with `params`, created now.
fn new_execution(
    def: &PipelineDef,
    version: u32,
    params: serde_json::Value,
) -> anyhow::Result<RunExecution> {
    let pipeline = Pipeline::build(def.clone()).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(RunExecution::create(
        NewRun {
            id: RunId::new(),
            org_id: OrgId::DEFAULT,
            pipeline_version: version,
            params,
        },
        pipeline,
        Arc::new(Templates::new()),
        ExecutionLimits::default(),
        SystemClock.now(),
    ))
}

/// Offers the benchmark's scheduler keeps outstanding on the task queue.
const QUEUE_OFFERS_MAX: usize = 16_384;

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    if values.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (values.len() - 1) as f64).round() as usize;
    values[rank.min(values.len() - 1)]
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown cpu".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cpu}, {cores} cores")
}

fn chain_def(tasks: usize) -> anyhow::Result<PipelineDef> {
    let list: Vec<_> = (0..tasks)
        .map(|i| {
            if i == 0 {
                json!({"id": format!("t{i}"), "tool": "noop"})
            } else {
                json!({"id": format!("t{i}"), "tool": "noop", "depends_on": [format!("t{}", i - 1)]})
            }
        })
        .collect();
    Ok(serde_json::from_value(
        json!({"name": "bench-chain", "tasks": list}),
    )?)
}

/// The benchmark's WASM module: recursive Fibonacci, reading n on stdin.
const FIB_WAT: &str = include_str!("../../../examples/wasm/fib.wat");

fn wasm_chain_def(tasks: usize, module: &std::path::Path, n: u32) -> anyhow::Result<PipelineDef> {
    let module = module.to_string_lossy();
    let list: Vec<_> = (0..tasks)
        .map(|i| {
            let mut task = json!({
                "id": format!("t{i}"),
                "tool": "wasm",
                "with": {"module": module, "input": n, "cpu_ms": 600_000},
            });
            if i > 0 {
                task["depends_on"] = json!([format!("t{}", i - 1)]);
            }
            task
        })
        .collect();
    Ok(serde_json::from_value(
        json!({"name": "bench-wasm-chain", "tasks": list}),
    )?)
}

/// Median wall time of calling the warm module directly, without the engine.
async fn wasm_compute_ms(module: &[u8], n: u32, calls: usize) -> anyhow::Result<f64> {
    struct NoLogs;
    #[async_trait::async_trait]
    impl arches_core::ports::LogSink for NoLogs {
        async fn write(&self, _stream: arches_core::records::LogStream, _text: &str) {}
    }
    let tool = arches_tools::WasmTool::try_new().map_err(|e| anyhow::anyhow!(e.message))?;
    let prepared = tool
        .prepare(module)
        .await
        .map_err(|e| anyhow::anyhow!(e.message))?;
    let limits = arches_tools::wasm::WasmLimits {
        cpu: Duration::from_secs(600),
        ..Default::default()
    };
    let grants = arches_tools::wasm::WasmGrants::default();
    let input = json!(n);
    let mut times = Vec::with_capacity(calls);
    for _ in 0..calls.max(1) + 1 {
        let started = Instant::now();
        tool.call_module(&prepared, &input, &limits, &grants, &NoLogs)
            .await
            .map_err(|e| anyhow::anyhow!(e.message))?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    // The first call warms the instance allocator and caches; it is not counted.
    Ok(median(&mut times[1..]))
}

fn fanout_def() -> anyhow::Result<PipelineDef> {
    Ok(serde_json::from_value(json!({
        "name": "bench-fanout",
        "params": {"width": {"type": "integer", "default": 10000}},
        "tasks": [
            {"id": "start", "tool": "noop"},
            {"id": "work", "tool": "noop", "depends_on": ["start"], "for_each": "{{ range(params.width) | list }}"},
            {"id": "end", "tool": "noop", "depends_on": ["work"]},
        ]
    }))?)
}

pub async fn bench(command: BenchCommand, database_url: Option<&str>) -> anyhow::Result<ExitCode> {
    match command {
        BenchCommand::Latency {
            queue_workers,
            rate,
            seconds,
            workers,
            sync,
        } => {
            anyhow::ensure!(
                rate > 0 && seconds > 0,
                "--rate and --seconds must be positive"
            );
            let queue = QueueSetup::new(database_url, queue_workers, workers)?;
            let bench = Bench::start_with(sync, workers, None, queue).await?;
            let def: PipelineDef = serde_json::from_value(
                json!({"name": "bench-latency", "tasks": [{"id": "t", "tool": "noop"}]}),
            )?;
            let version = bench
                .store
                .save_pipeline(OrgId::DEFAULT, &def)
                .await?
                .version;
            // Warm-up: the workers are up and the caches warm.
            let warm = bench.submit(&def, version).await?;
            bench.handle.wait(warm).await?;
            let total = u64::from(rate) * seconds;
            let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let started = Instant::now();
            let mut submits = tokio::task::JoinSet::new();
            for _ in 0..total {
                ticker.tick().await;
                let handle = bench.handle.clone();
                let def = def.clone();
                submits.spawn(async move {
                    let run_id = handle
                        .submit(new_execution(&def, version, json!({}))?)
                        .await?;
                    handle.wait(run_id).await?;
                    anyhow::Ok(run_id)
                });
            }
            let offered = started.elapsed();
            let mut run_ids = Vec::with_capacity(total as usize);
            while let Some(done) = submits.join_next().await {
                run_ids.push(done.context("a submit task failed")??);
            }
            let mut latencies = Vec::with_capacity(run_ids.len());
            for run_id in &run_ids {
                for task_run in bench.store.task_runs(*run_id).await? {
                    if let (Some(queued), Some(start)) = (task_run.queued_at, task_run.started_at) {
                        latencies.push(start.since(queued).as_secs_f64() * 1000.0);
                    }
                }
            }
            let setting = bench.setting();
            let store_durability = bench.store.durability();
            bench.stop().await?;
            out!(
                "enqueue-to-start latency, {total} one-task runs at {rate}/s offered ({:.0}/s achieved), {setting}, durability {}, machine: {}",
                total as f64 / offered.as_secs_f64(),
                store_durability.as_str(),
                machine()
            );
            out!(
                "latency (ms): p50 {:.3}, p90 {:.3}, p99 {:.3}, max {:.3}",
                percentile(&mut latencies, 50.0),
                percentile(&mut latencies, 90.0),
                percentile(&mut latencies, 99.0),
                latencies.iter().copied().fold(0.0, f64::max)
            );
        }
        BenchCommand::Idle {
            queue_workers,
            seconds,
        } => {
            let queue = QueueSetup::new(database_url, queue_workers.max(1), None)?;
            let bench = Bench::start_with(Durability::Normal, None, None, queue).await?;
            let def = chain_def(2)?;
            bench.run(&def, json!({})).await?;
            let pg = bench
                .pg
                .clone()
                .context("the idle benchmark needs PostgreSQL")?;
            // Let the last commits and the statistics settle before counting.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let count = || async {
                // Statistics are flushed at the end of transactions, at most about once a
                // second; the snapshot is cleared so each read sees the latest.
                sqlx::query("SELECT pg_stat_clear_snapshot()")
                    .execute(pg.pool())
                    .await?;
                sqlx::query_scalar::<_, i64>(
                    "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database \
                     WHERE datname = current_database()",
                )
                .fetch_one(pg.pool())
                .await
            };
            let before = count().await?;
            tokio::time::sleep(Duration::from_secs(seconds)).await;
            let after = count().await?;
            let setting = bench.setting();
            bench.stop().await?;
            // The two reads of the counter are transactions of their own (2 for `before`
            // until `after`'s read).
            let transactions = (after - before - 2).max(0);
            let sweeps = (queue_workers.max(1) as u64 + 1) * seconds / 60;
            out!(
                "idle for {seconds} s after one run, {setting} (sweep every 60 s per worker and scheduler), machine: {}",
                machine()
            );
            out!(
                "transactions on the database: {transactions} ({:.3}/s); the sweeps alone account for about {sweeps}",
                transactions as f64 / seconds as f64
            );
        }
        BenchCommand::Api {
            scenario,
            connections,
            seconds,
            warmup,
            sync,
        } => {
            let positive = |s: f64, what: &str| {
                Duration::try_from_secs_f64(s)
                    .map_err(|_| anyhow::anyhow!("--{what} must be a positive number of seconds"))
            };
            crate::bench_api::bench_api(crate::bench_api::ApiBenchSettings {
                scenario,
                connections,
                duration: positive(seconds, "seconds")?,
                warmup: positive(warmup, "warmup")?,
                durability: sync,
            })
            .await?;
        }
        BenchCommand::Chain {
            queue_workers,
            tasks,
            runs,
            sync,
        } => {
            anyhow::ensure!(tasks >= 2, "a chain needs at least 2 tasks");
            let queue = QueueSetup::new(database_url, queue_workers, None)?;
            let bench = Bench::start_with(sync, None, None, queue).await?;
            let def = chain_def(tasks)?;
            // One warm-up run so that the first measured run does not pay for cold caches.
            bench.run(&def, json!({})).await?;
            let mut run_medians = Vec::new();
            let mut all_gaps = Vec::new();
            for _ in 0..runs.max(1) {
                let run_id = bench.run(&def, json!({})).await?;
                let task_runs = bench.store.task_runs(run_id).await?;
                let mut ordered: Vec<_> = task_runs.iter().collect();
                ordered.sort_by_key(|t| t.task_id.as_str()[1..].parse::<usize>().unwrap_or(0));
                let mut gaps: Vec<f64> = ordered
                    .windows(2)
                    .filter_map(|w| {
                        Some(w[1].started_at?.since(w[0].finished_at?).as_secs_f64() * 1000.0)
                    })
                    .collect();
                all_gaps.extend(gaps.iter().copied());
                run_medians.push(median(&mut gaps));
            }
            let store_durability = bench.store.durability();
            let setting = bench.setting();
            bench.stop().await?;
            out!(
                "chain of {tasks} noop tasks, {runs} runs, {setting}, durability {}, machine: {}",
                store_durability.as_str(),
                machine()
            );
            out!(
                "per-run median overhead (ms): {}",
                run_medians
                    .iter()
                    .map(|m| format!("{m:.3}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            out!(
                "per-task overhead: median of run medians {:.3} ms, p90 {:.3} ms, max {:.3} ms",
                median(&mut run_medians.clone()),
                percentile(&mut all_gaps.clone(), 90.0),
                all_gaps.iter().copied().fold(0.0, f64::max)
            );
        }
        BenchCommand::Wasm {
            tasks,
            n,
            runs,
            sync,
        } => {
            anyhow::ensure!(tasks >= 2, "a chain needs at least 2 tasks");
            let bench = Bench::start(sync, None, None).await?;
            let module = bench._dir.path().join("fib.wat");
            std::fs::write(&module, FIB_WAT).context("cannot write the module")?;
            let compute = wasm_compute_ms(FIB_WAT.as_bytes(), n, 10).await?;
            let def = wasm_chain_def(tasks, &module, n)?;
            bench.run(&def, json!({})).await?;
            let mut run_medians = Vec::new();
            let mut all = Vec::new();
            let (mut inside, mut between) = (Vec::new(), Vec::new());
            for _ in 0..runs.max(1) {
                let run_id = bench.run(&def, json!({})).await?;
                let task_runs = bench.store.task_runs(run_id).await?;
                let mut ordered: Vec<_> = task_runs.iter().collect();
                ordered.sort_by_key(|t| t.task_id.as_str()[1..].parse::<usize>().unwrap_or(0));
                // Start of task N to start of task N+1: the task's whole cost (dispatch,
                // instantiation, compute, output, commit) plus the hand-over; less the
                // module's compute time, what the platform adds per task.
                let mut overheads: Vec<f64> = ordered
                    .windows(2)
                    .filter_map(|w| {
                        Some(
                            w[1].started_at?.since(w[0].started_at?).as_secs_f64() * 1000.0
                                - compute,
                        )
                    })
                    .collect();
                all.extend(overheads.iter().copied());
                run_medians.push(median(&mut overheads));
                // Where the time goes: inside the task run (started → finished, the tool's
                // call included) and between task runs (finished → the next started).
                inside.extend(ordered.iter().filter_map(|t| {
                    Some(t.finished_at?.since(t.started_at?).as_secs_f64() * 1000.0)
                }));
                between.extend(ordered.windows(2).filter_map(|w| {
                    Some(w[1].started_at?.since(w[0].finished_at?).as_secs_f64() * 1000.0)
                }));
            }
            let store_durability = bench.store.durability();
            bench.stop().await?;
            out!(
                "chain of {tasks} wasm tasks computing fib({n}) (recursive), {runs} runs, durability {}, machine: {}",
                store_durability.as_str(),
                machine()
            );
            out!("module compute alone (warm, direct call): median {compute:.3} ms");
            out!(
                "per-task overhead above compute: median of run medians {:.3} ms, p90 {:.3} ms",
                median(&mut run_medians.clone()),
                percentile(&mut all.clone(), 90.0),
            );
            out!(
                "of a task's time: started to finished median {:.3} ms, finished to the next started median {:.3} ms",
                median(&mut inside),
                median(&mut between),
            );
        }
        BenchCommand::Fanout {
            queue_workers,
            width,
            runs,
            sync,
            workers,
            batch,
        } => {
            let queue = QueueSetup::new(database_url, queue_workers, workers)?;
            let bench = Bench::start_with(sync, workers, batch, queue).await?;
            let def = fanout_def()?;
            bench.run(&def, json!({"width": 100})).await?;
            let mut rates = Vec::new();
            let mut walls = Vec::new();
            for _ in 0..runs.max(1) {
                let started = Instant::now();
                let run_id = bench.run(&def, json!({"width": width})).await?;
                let wall = started.elapsed();
                let run = bench.store.run(run_id).await?.context("run vanished")?;
                let elapsed = run
                    .finished_at
                    .zip(run.started_at)
                    .map(|(end, start)| end.since(start))
                    .unwrap_or(wall)
                    .max(Duration::from_micros(1));
                let task_runs = (width + 2) as f64;
                rates.push(task_runs / elapsed.as_secs_f64());
                walls.push(wall.as_secs_f64());
            }
            let store_durability = bench.store.durability();
            let options = bench.options.clone();
            let setting = bench.setting();
            bench.stop().await?;
            out!(
                "fan-out 1 -> {width} -> 1 noop tasks, {runs} runs, {setting}, durability {}, worker slots {}, batch max {}, machine: {}",
                store_durability.as_str(),
                options.worker_slots,
                options.batch_size_max,
                machine()
            );
            out!(
                "task runs/s per run: {}",
                rates
                    .iter()
                    .map(|r| format!("{r:.0}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            out!(
                "wall seconds per run (submit to wait): {}",
                walls
                    .iter()
                    .map(|w| format!("{w:.3}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            out!("median: {:.0} task runs/s", median(&mut rates));
        }
    }
    Ok(ExitCode::SUCCESS)
}
