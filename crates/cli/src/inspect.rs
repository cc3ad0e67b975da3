//! `arches runs …` and `arches artifacts …`: read-only views of the store, and the tables and
//! formats that the same commands against a server (`remote`) share.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use arches_core::ports::Store;
use arches_core::records::{
    ArtifactFilter, ArtifactRecord, LogQuery, LogStream, Producer, RunFilter, RunRecord,
    TaskRunRecord,
};
use arches_core::{ArtifactId, OrgId, RunId, RunState, TaskId, TaskRunState, Timestamp};
use clap::Subcommand;
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};

use crate::app::Home;

/// Largest artifact `artifacts cat` prints, in bytes.
const CAT_BYTES_MAX: u64 = 256 << 20;
/// Fan-out items listed one by one in a summary; the rest are counted.
const ITEMS_SHOWN_MAX: usize = 10;

#[derive(Subcommand, Debug)]
pub enum RunsCommand {
    /// List runs, newest first.
    List {
        /// Only runs of this pipeline.
        #[arg(long)]
        pipeline: Option<String>,
        /// Only runs in this state (queued, running, succeeded, failed, cancelled).
        #[arg(long)]
        state: Option<RunState>,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Show a run and its task runs: states, attempts, durations.
    Show {
        /// The run.
        run_id: RunId,
        /// List every fan-out item.
        #[arg(long)]
        items: bool,
    },
    /// Print a run's task logs.
    Logs {
        /// The run.
        run_id: RunId,
        /// Only this task.
        #[arg(value_parser = parse_task_id)]
        task: Option<TaskId>,
        /// Keep printing new lines until the run ends (server only).
        #[arg(long, short)]
        follow: bool,
    },
    /// Start a run of a pipeline saved on the server (`arches pipelines apply`); prints the
    /// run's id (server only; locally, use `arches run FILE`).
    Trigger {
        /// The pipeline's name.
        pipeline: String,
        /// A param value, `name=value`; repeat for several. Values are converted to the
        /// declared type (arrays and objects as JSON).
        #[arg(long = "param", short = 'p', value_name = "NAME=VALUE")]
        params: Vec<String>,
        /// The pipeline version; the latest by default.
        #[arg(long)]
        version: Option<u32>,
        /// Then watch the run as `arches runs watch` does.
        #[arg(long)]
        watch: bool,
        /// With --watch: no live progress, only the summary.
        #[arg(long)]
        quiet: bool,
    },
    /// Follow a run live until it ends, then print its summary; exits 0 only if it succeeded
    /// (server only).
    Watch {
        /// The run.
        run_id: RunId,
        /// No live progress, only the summary.
        #[arg(long)]
        quiet: bool,
    },
    /// Retry a failed or cancelled run from its failed tasks (server only).
    Retry {
        /// The run.
        run_id: RunId,
        /// Then watch the run as `arches runs watch` does.
        #[arg(long)]
        watch: bool,
        /// With --watch: no live progress, only the summary.
        #[arg(long)]
        quiet: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum ArtifactsCommand {
    /// List artifact versions, newest first.
    List {
        /// Only versions of this name.
        #[arg(long)]
        name: Option<String>,
        /// Only artifacts produced by this run.
        #[arg(long)]
        run: Option<RunId>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Show an artifact's metadata and lineage (by id, `name` or `name@version`).
    Show {
        /// Id, name or name@version.
        artifact: String,
    },
    /// Write an artifact's content to standard output.
    Cat {
        /// Id, name or name@version.
        artifact: String,
    },
    /// Copy an artifact's content to a file.
    Get {
        /// Id, name or name@version.
        artifact: String,
        /// Destination file; by default the last part of the artifact's name, in the current
        /// directory.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

fn parse_task_id(text: &str) -> Result<TaskId, String> {
    TaskId::parse(text).map_err(|e| e.to_string())
}

pub fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED);
    table.set_header(header.to_vec());
    table
}

pub fn time(at: Timestamp) -> String {
    chrono::DateTime::from_timestamp_micros(at.as_micros())
        .map(|t| {
            t.with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M:%S")
                .to_string()
        })
        .unwrap_or_else(|| "?".into())
}

/// A timestamp from the RFC 3339 text a server sends.
pub fn parse_rfc3339(text: &str) -> Option<Timestamp> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| Timestamp(t.timestamp_micros()))
}

pub fn duration(start: Option<Timestamp>, end: Option<Timestamp>) -> String {
    match (start, end) {
        (Some(start), Some(end)) => {
            let d = end.since(start);
            if d.as_secs() >= 60 {
                format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60)
            } else if d.as_millis() >= 1000 {
                format!("{:.2}s", d.as_secs_f64())
            } else {
                format!("{:.1}ms", d.as_secs_f64() * 1000.0)
            }
        }
        _ => "-".into(),
    }
}

pub fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

fn truncate(text: &str, max: usize) -> String {
    let one_line = text.replace('\n', " ");
    if one_line.chars().count() <= max {
        one_line
    } else {
        format!("{}…", one_line.chars().take(max).collect::<String>())
    }
}

/// A task run as the tables show it, read from the local store or from a server.
pub struct TaskRow {
    pub task_id: TaskId,
    pub index: Option<u32>,
    pub fan_out: Option<u32>,
    pub state: TaskRunState,
    pub attempt: u32,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    pub error: Option<String>,
    pub outputs: Option<serde_json::Value>,
}

impl From<&TaskRunRecord> for TaskRow {
    fn from(task_run: &TaskRunRecord) -> Self {
        TaskRow {
            task_id: task_run.task_id.clone(),
            index: task_run.index,
            fan_out: task_run.fan_out,
            state: task_run.state,
            attempt: task_run.attempt,
            started_at: task_run.started_at,
            finished_at: task_run.finished_at,
            error: task_run.error.clone(),
            outputs: task_run.outputs.clone(),
        }
    }
}

/// A short description of a task run's result for tables.
fn detail(task_run: &TaskRow) -> String {
    if let Some(error) = &task_run.error {
        return truncate(error, 100);
    }
    let Some(outputs) = &task_run.outputs else {
        return String::new();
    };
    if let Some(n) = task_run.fan_out {
        return format!("{n} items");
    }
    let mut parts = Vec::new();
    if let Some(artifact) = outputs.get("artifact") {
        let name = artifact.get("name").and_then(|v| v.as_str()).unwrap_or("?");
        let version = artifact
            .get("version")
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        parts.push(format!("artifact {name}@{version}"));
    }
    if let Some(rows) = outputs.get("rows").and_then(|v| v.as_u64()) {
        parts.push(format!("{rows} rows"));
    }
    if let Some(list) = outputs.get("artifacts").and_then(|v| v.as_array()) {
        for artifact in list {
            let name = artifact.get("name").and_then(|v| v.as_str()).unwrap_or("?");
            let version = artifact
                .get("version")
                .and_then(|v| v.as_u64())
                .unwrap_or(0);
            parts.push(format!("artifact {name}@{version}"));
        }
    }
    if parts.is_empty() {
        truncate(&outputs.to_string(), 60)
    } else {
        parts.join(", ")
    }
}

/// The task table of a run: one row per task, fan-out items collapsed unless `items`.
pub fn task_table(task_runs: &[TaskRow], items: bool) -> Table {
    let mut table = table(&["TASK", "STATE", "ATTEMPTS", "DURATION", "DETAIL"]);
    let mut shown_items: BTreeMap<TaskId, usize> = BTreeMap::new();
    let mut hidden_items: BTreeMap<TaskId, usize> = BTreeMap::new();
    for task_run in task_runs {
        let name = match task_run.index {
            Some(i) => format!("  {}[{i}]", task_run.task_id),
            None => task_run.task_id.to_string(),
        };
        if task_run.index.is_some() && !items {
            let shown = shown_items.entry(task_run.task_id.clone()).or_default();
            let interesting = task_run.state != TaskRunState::Succeeded;
            if *shown >= ITEMS_SHOWN_MAX || !interesting {
                *hidden_items.entry(task_run.task_id.clone()).or_default() += 1;
                continue;
            }
            *shown += 1;
        }
        let attempts = if task_run.fan_out.is_some() {
            "-".to_owned()
        } else {
            task_run.attempt.to_string()
        };
        table.add_row(vec![
            name,
            task_run.state.to_string(),
            attempts,
            duration(task_run.started_at, task_run.finished_at),
            detail(task_run),
        ]);
    }
    for (task, hidden) in hidden_items {
        let shown = shown_items.get(&task).copied().unwrap_or(0);
        let what = if shown == 0 {
            format!("{hidden} items succeeded (--items to list them)")
        } else {
            format!("{hidden} more items (--items to list them)")
        };
        table.add_row(vec![
            format!("  {task}[…]"),
            String::new(),
            String::new(),
            String::new(),
            what,
        ]);
    }
    table
}

async fn store_task_table(store: &dyn Store, run_id: RunId, items: bool) -> anyhow::Result<Table> {
    let task_runs = store.task_runs(run_id).await?;
    let rows: Vec<TaskRow> = task_runs.iter().map(TaskRow::from).collect();
    Ok(task_table(&rows, items))
}

/// The end of a run summary, after its tables: `run <id> <state> in <duration>` and its
/// error.
pub fn print_run_outcome(
    run_id: RunId,
    state: RunState,
    started_at: Option<Timestamp>,
    finished_at: Option<Timestamp>,
    error: Option<&str>,
) {
    out!(
        "run {} {} in {}",
        run_id,
        state,
        duration(started_at, finished_at)
    );
    if let Some(error) = error {
        out!("error: {error}");
    }
}

/// Prints the end-of-run summary.
pub async fn print_run_summary(store: &dyn Store, run: &RunRecord) -> anyhow::Result<()> {
    out!("{}", store_task_table(store, run.id, false).await?);
    let artifacts = store
        .artifacts(&ArtifactFilter {
            run_id: Some(run.id),
            limit: 100,
            ..ArtifactFilter::default()
        })
        .await?;
    if !artifacts.is_empty() {
        let rows: Vec<ArtifactRow> = artifacts.iter().map(ArtifactRow::from).collect();
        out!("{}", artifact_table(&rows));
    }
    print_run_outcome(
        run.id,
        run.state,
        run.started_at.or(Some(run.created_at)),
        run.finished_at,
        run.error.as_deref(),
    );
    Ok(())
}

/// An artifact version as the tables show it, read from the local store or from a server.
pub struct ArtifactRow {
    pub name: String,
    pub version: u32,
    pub media_type: String,
    pub size_bytes: u64,
    pub rows: Option<u64>,
    pub produced_by: Option<Producer>,
    pub id: ArtifactId,
}

impl From<&ArtifactRecord> for ArtifactRow {
    fn from(artifact: &ArtifactRecord) -> Self {
        ArtifactRow {
            name: artifact.meta.name.clone(),
            version: artifact.version,
            media_type: artifact.meta.media_type.clone(),
            size_bytes: artifact.size_bytes,
            rows: artifact.meta.table.as_ref().map(|t| t.rows),
            produced_by: artifact.meta.produced_by.clone(),
            id: artifact.id,
        }
    }
}

pub fn artifact_table(artifacts: &[ArtifactRow]) -> Table {
    let mut table = table(&[
        "ARTIFACT",
        "VERSION",
        "TYPE",
        "SIZE",
        "ROWS",
        "PRODUCED BY",
        "ID",
    ]);
    for artifact in artifacts {
        let produced = artifact
            .produced_by
            .as_ref()
            .map(|p| format!("{} (attempt {})", p.task_id, p.attempt))
            .unwrap_or_default();
        table.add_row(vec![
            artifact.name.clone(),
            artifact.version.to_string(),
            artifact.media_type.clone(),
            bytes(artifact.size_bytes),
            artifact.rows.map(|r| r.to_string()).unwrap_or_default(),
            produced,
            artifact.id.to_string(),
        ]);
    }
    table
}

/// The `runs` commands that need a server, named for the error of local mode.
fn server_only(command: &RunsCommand) -> Option<&'static str> {
    match command {
        RunsCommand::Trigger { .. } => Some("arches runs trigger"),
        RunsCommand::Watch { .. } => Some("arches runs watch"),
        RunsCommand::Retry { .. } => Some("arches runs retry"),
        RunsCommand::Logs { follow: true, .. } => Some("arches runs logs --follow"),
        _ => None,
    }
}

/// The error of a server-only command in local mode.
pub fn needs_server(what: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "`{what}` works against a server: pass --server URL (or set ARCHES_SERVER), or log in once with `arches login --server URL`"
    )
}

/// The file `artifacts get` writes when no `--output` is given: the last part of the
/// artifact's name, in the current directory.
pub fn default_output(name: &str) -> PathBuf {
    let last = name.rsplit('/').next().unwrap_or(name);
    if last.is_empty() || last == "." || last == ".." {
        PathBuf::from("artifact")
    } else {
        PathBuf::from(last)
    }
}

pub async fn runs(home: &Home, command: RunsCommand) -> anyhow::Result<ExitCode> {
    if let Some(what) = server_only(&command) {
        return Err(needs_server(what));
    }
    let opened = home.open_existing().await?;
    let store = &*opened.store;
    match command {
        RunsCommand::List {
            pipeline,
            state,
            limit,
        } => {
            let runs = store
                .runs(&RunFilter {
                    pipeline_name: pipeline,
                    state,
                    limit,
                    ..RunFilter::default()
                })
                .await?;
            let mut table = table(&["RUN", "PIPELINE", "VERSION", "STATE", "CREATED", "DURATION"]);
            for run in runs {
                table.add_row(vec![
                    run.id.to_string(),
                    run.pipeline_name.clone(),
                    run.pipeline_version.to_string(),
                    run.state.to_string(),
                    time(run.created_at),
                    duration(run.started_at, run.finished_at),
                ]);
            }
            out!("{table}");
        }
        RunsCommand::Show { run_id, items } => {
            let run = store
                .run(run_id)
                .await?
                .with_context(|| format!("no run {run_id}"))?;
            out!("run       {}", run.id);
            out!(
                "pipeline  {} (version {})",
                run.pipeline_name,
                run.pipeline_version
            );
            out!("state     {}", run.state);
            out!("created   {}", time(run.created_at));
            out!("duration  {}", duration(run.started_at, run.finished_at));
            out!("params    {}", run.params);
            if let Some(error) = &run.error {
                out!("error     {error}");
            }
            out!("{}", store_task_table(store, run_id, items).await?);
        }
        RunsCommand::Logs { run_id, task, .. } => {
            store
                .run(run_id)
                .await?
                .with_context(|| format!("no run {run_id}"))?;
            let task_runs = store.task_runs(run_id).await?;
            let labels: BTreeMap<_, _> = task_runs
                .iter()
                .map(|t| {
                    (
                        t.id,
                        t.index
                            .map(|i| format!("{}[{i}]", t.task_id))
                            .unwrap_or_else(|| t.task_id.to_string()),
                    )
                })
                .collect();
            let mut after = 0;
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            loop {
                let page = store
                    .logs(&LogQuery {
                        run_id,
                        task_id: task.clone(),
                        after_seq: after,
                        limit: 5000,
                    })
                    .await?;
                let Some(last) = page.last() else { break };
                after = last.seq;
                for line in &page {
                    let label = labels
                        .get(&line.line.task_run_id)
                        .map(String::as_str)
                        .unwrap_or("?");
                    writeln!(
                        out,
                        "{}",
                        log_line(label, line.line.attempt, line.line.stream, &line.line.text)
                    )?;
                }
            }
        }
        // Refused above with their own names; kept exhaustive for new variants.
        RunsCommand::Trigger { .. } | RunsCommand::Watch { .. } | RunsCommand::Retry { .. } => {
            return Err(needs_server("arches runs"))
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A task log line as `runs logs` prints it: `<task>[<index>] #<attempt> <stream> | <text>`.
pub fn log_line(label: &str, attempt: u32, stream: LogStream, text: &str) -> String {
    format!("{label} #{attempt} {:<6} | {text}", stream.as_str())
}

/// The name and optional version of an artifact reference by name: `name` or `name@version`.
pub(crate) fn artifact_name_and_version(reference: &str) -> anyhow::Result<(&str, Option<u32>)> {
    Ok(match reference.rsplit_once('@') {
        Some((name, version)) => (
            name,
            Some(
                version
                    .parse::<u32>()
                    .with_context(|| format!("bad version in {reference:?}; write name@3"))?,
            ),
        ),
        None => (reference, None),
    })
}

/// Resolves an artifact reference: an id, a name (latest version) or `name@version`.
async fn resolve(store: &dyn Store, reference: &str) -> anyhow::Result<ArtifactRecord> {
    if let Ok(id) = reference.parse::<ArtifactId>() {
        return store
            .artifact(id)
            .await?
            .with_context(|| format!("no artifact {id}"));
    }
    let (name, version) = artifact_name_and_version(reference)?;
    store
        .artifact_by_name(OrgId::DEFAULT, name, version)
        .await?
        .with_context(|| format!("no artifact named {reference:?}"))
}

pub async fn artifacts(home: &Home, command: ArtifactsCommand) -> anyhow::Result<ExitCode> {
    let opened = home.open_existing().await?;
    let store = &*opened.store;
    match command {
        ArtifactsCommand::List { name, run, limit } => {
            let list = store
                .artifacts(&ArtifactFilter {
                    name,
                    run_id: run,
                    limit,
                    ..ArtifactFilter::default()
                })
                .await?;
            let rows: Vec<ArtifactRow> = list.iter().map(ArtifactRow::from).collect();
            out!("{}", artifact_table(&rows));
        }
        ArtifactsCommand::Show { artifact } => {
            let record = resolve(store, &artifact).await?;
            let mut inputs = Vec::new();
            for id in &record.meta.inputs {
                let input = store.artifact(*id).await?;
                inputs.push(match input {
                    Some(a) => {
                        serde_json::json!({"id": a.id, "name": a.meta.name, "version": a.version})
                    }
                    None => serde_json::json!({"id": id, "missing": true}),
                });
            }
            let mut shown = serde_json::to_value(&record)?;
            shown["lineage"] =
                serde_json::json!({"produced_by": record.meta.produced_by, "inputs": inputs});
            out!("{}", serde_json::to_string_pretty(&shown)?);
        }
        ArtifactsCommand::Cat { artifact } => {
            let record = resolve(store, &artifact).await?;
            let content = opened.artifacts.read(record.id, CAT_BYTES_MAX).await?;
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            match out.write_all(&content) {
                Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => {}
                other => other?,
            }
        }
        ArtifactsCommand::Get { artifact, output } => {
            let record = resolve(store, &artifact).await?;
            let output = output.unwrap_or_else(|| default_output(&record.meta.name));
            let path = opened.artifacts.local_path(record.id).await?;
            if let Some(parent) = output.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("cannot create {}", parent.display()))?;
            }
            std::fs::copy(&path, &output)
                .with_context(|| format!("cannot write {}", output.display()))?;
            out!(
                "{} ({}) written to {}",
                record.meta.name,
                bytes(record.size_bytes),
                output.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
