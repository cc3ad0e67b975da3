//! The persisted shapes of runs, task runs, attempts, logs, pipelines and artifacts.
//!
//! These are the rows the storage port reads and writes; the engine builds them through the
//! state machines in [`crate::execution`].

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::{ArtifactId, OrgId, RunId, TaskId, TaskRunId};
use crate::state::{AttemptState, RunState, TaskRunState};
use crate::time::Timestamp;

/// A stored pipeline version. Saving the same definition twice yields the same version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredPipeline {
    /// The org the pipeline belongs to; names are unique per org.
    pub org_id: OrgId,
    /// The pipeline's name.
    pub name: String,
    /// 1, 2, 3… per name, in the order versions were saved.
    pub version: u32,
    /// SHA-256 (hex) of the canonical JSON of the definition.
    pub digest: String,
    /// The definition, as canonical JSON of [`crate::pipeline::PipelineDef`].
    pub definition: Value,
    /// When this version was first saved.
    pub created_at: Timestamp,
    /// When the pipeline (every version of the name) was archived: hidden from lists, and
    /// no new runs.
    #[serde(default)]
    pub archived_at: Option<Timestamp>,
}

/// One run of a pipeline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The run's id.
    pub id: RunId,
    /// The org the run belongs to (its pipeline's org).
    pub org_id: OrgId,
    /// The pipeline's name.
    pub pipeline_name: String,
    /// The pipeline version the run executes.
    pub pipeline_version: u32,
    /// The params after defaults, as a JSON object.
    pub params: Value,
    /// The run's state.
    pub state: RunState,
    /// Why the run failed, if it did.
    pub error: Option<String>,
    /// Which process drives the run (for example `pid:1234@host`); used to refuse a resume
    /// while the owner still lives.
    pub owner: Option<String>,
    /// When the run was created.
    pub created_at: Timestamp,
    /// When it started.
    pub started_at: Option<Timestamp>,
    /// When it reached a terminal state.
    pub finished_at: Option<Timestamp>,
}

/// One task run: a task of a run, or one item of a fan-out (`index` is then set, and the
/// fan-out's parent task run has `index = None` and `fan_out = Some(n)`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskRunRecord {
    /// The task run's id.
    pub id: TaskRunId,
    /// The run it belongs to.
    pub run_id: RunId,
    /// The task it executes.
    pub task_id: TaskId,
    /// Position in the fan-out list, for fan-out items.
    pub index: Option<u32>,
    /// For a fan-out parent: how many items it spawned.
    pub fan_out: Option<u32>,
    /// The task run's state.
    pub state: TaskRunState,
    /// The number of the current or last attempt (1-based; 0 before the first).
    pub attempt: u32,
    /// Attempts lost to an expired lease; they do not use up the retry policy but are
    /// bounded by the engine.
    pub lease_expiries: u32,
    /// Incremented at every lease; a completion or heartbeat must carry the current value.
    pub fencing_token: u64,
    /// The fan-out item, for fan-out items.
    pub item: Option<Value>,
    /// The rendered inputs, set when the task run is queued.
    pub inputs: Option<Value>,
    /// The tool's outputs, when succeeded (for a fan-out parent: the items' outputs in order).
    pub outputs: Option<Value>,
    /// Why it failed or was skipped.
    pub error: Option<String>,
    /// The worker holding the lease, while running.
    pub lease_owner: Option<String>,
    /// When the lease runs out unless a heartbeat extends it.
    pub lease_expires_at: Option<Timestamp>,
    /// When a task run waiting to retry becomes queued again.
    pub ready_at: Option<Timestamp>,
    /// When it was created.
    pub created_at: Timestamp,
    /// When it was last queued.
    pub queued_at: Option<Timestamp>,
    /// When its last attempt started.
    pub started_at: Option<Timestamp>,
    /// When it reached a terminal state.
    pub finished_at: Option<Timestamp>,
}

impl TaskRunRecord {
    /// A new pending task run with no attempt yet: the parent of a task (`index` `None`) or
    /// one fan-out item (`index` and `item` set).
    pub fn pending(
        run_id: RunId,
        task_id: TaskId,
        index: Option<u32>,
        item: Option<Value>,
        now: Timestamp,
    ) -> Self {
        Self {
            id: TaskRunId::new(),
            run_id,
            task_id,
            index,
            fan_out: None,
            state: TaskRunState::Pending,
            attempt: 0,
            lease_expiries: 0,
            fencing_token: 0,
            item,
            inputs: None,
            outputs: None,
            error: None,
            lease_owner: None,
            lease_expires_at: None,
            ready_at: None,
            created_at: now,
            queued_at: None,
            started_at: None,
            finished_at: None,
        }
    }
}

/// One attempt of a task run. The engine writes an attempt's row when the attempt ends; while
/// it runs, it is described by its task run (attempt number, fencing token, lease owner,
/// start time).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// The task run.
    pub task_run_id: TaskRunId,
    /// The run.
    pub run_id: RunId,
    /// 1-based attempt number.
    pub attempt: u32,
    /// The fencing token of the lease this attempt ran under.
    pub fencing_token: u64,
    /// The worker that ran it.
    pub worker: String,
    /// How it ended.
    pub state: AttemptState,
    /// When the worker leased it.
    pub started_at: Timestamp,
    /// When it ended.
    pub finished_at: Option<Timestamp>,
    /// The error, if it failed.
    pub error: Option<String>,
}

/// An atomic group of writes: all of it is stored, or none.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WriteBatch {
    /// Runs to insert or replace.
    pub runs: Vec<RunRecord>,
    /// Task runs to insert or replace. A write whose fencing token is lower than the stored
    /// one is not applied (it comes from a stale lease) and is reported.
    pub task_runs: Vec<TaskRunRecord>,
    /// Attempts to insert or replace, keyed by (task run, attempt).
    pub attempts: Vec<AttemptRecord>,
    /// Leases offered on the shared task queue, for standalone workers to claim (only
    /// stores with a [`crate::ports::TaskQueue`]; others refuse a batch that has any). An
    /// offer replaces a stored offer of the same task run only when its fencing token is
    /// higher; one with the same token is left as it is (with its claim), and none is made
    /// when that token's completion is already stored.
    pub offers: Vec<TaskOffer>,
    /// Offers to take back (the run was cancelled); a worker holding one loses its claim.
    pub withdrawn: Vec<TaskRunId>,
    /// Completions that this batch applies: deleted with it.
    pub completions_done: Vec<AppliedCompletion>,
    /// Validation-queue items to insert, or to update while the stored one is still open
    /// (a decided item is never overwritten). Claims are kept as stored.
    pub reviews: Vec<crate::review::ReviewItem>,
}

impl WriteBatch {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
            && self.task_runs.is_empty()
            && self.attempts.is_empty()
            && self.reviews.is_empty()
            && !self.uses_task_queue()
    }

    /// Whether the batch writes to the shared task queue.
    pub fn uses_task_queue(&self) -> bool {
        !self.offers.is_empty() || !self.withdrawn.is_empty() || !self.completions_done.is_empty()
    }
}

/// A lease offered on the store's task queue: the scheduler that drives the run has leased
/// the task run (fencing token `assignment.fencing_token`) and waits for a standalone
/// worker to claim and execute it.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskOffer {
    /// What to execute.
    pub assignment: crate::execution::Assignment,
    /// The scheduler that drives the run and receives the completion.
    pub owner: String,
    /// Tags a worker must advertise to claim it.
    pub worker_tags: Vec<String>,
    /// When it was offered; claims take the oldest first.
    pub offered_at: Timestamp,
    /// Offered again by a scheduler that resumed the run (possibly under another name): the
    /// completions already stored for the lease are handed to this owner.
    pub resumed: bool,
}

/// An offer a worker claimed: it holds it until `expires_at` unless it renews the claim.
#[derive(Clone, Debug, PartialEq)]
pub struct ClaimedTask {
    /// What to execute.
    pub assignment: crate::execution::Assignment,
    /// The claim's own fencing token: 1 for the first claim of the offer, higher after an
    /// earlier claim expired or was handed back. Renewals and the completion must carry it.
    pub claim: u64,
    /// When the claim expires unless renewed.
    pub expires_at: Timestamp,
    /// How many earlier claims of this offer expired (their workers died or stalled while
    /// running it); hand-backs do not count.
    pub expiries: u32,
}

/// What one [`crate::ports::TaskQueue::claim`] took.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClaimBatch {
    /// The claims, oldest offer first.
    pub tasks: Vec<ClaimedTask>,
    /// When the earliest live claim of another worker, on an offer this worker could run,
    /// expires (`None` when there is none).
    pub next_expiry: Option<Timestamp>,
}

/// What a worker reports when it finishes a claimed task.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskCompletion {
    /// The task run.
    pub task_run_id: TaskRunId,
    /// The claim's token ([`ClaimedTask::claim`]).
    pub claim: u64,
    /// The worker.
    pub worker: String,
    /// How the attempt ended.
    pub outcome: crate::execution::AttemptOutcome,
    /// When the tool started.
    pub executed_at: Timestamp,
    /// When it ended.
    pub finished_at: Timestamp,
}

/// A stored completion, waiting for the scheduler that owns its run.
#[derive(Clone, Debug, PartialEq)]
pub struct QueuedCompletion {
    /// Its position in the completions table (deleted by [`WriteBatch::completions_done`]).
    pub seq: i64,
    /// The run.
    pub run_id: RunId,
    /// The task run.
    pub task_run_id: TaskRunId,
    /// The scheduler's fencing token of the lease.
    pub fencing_token: u64,
    /// The worker that executed it.
    pub worker: String,
    /// How many claims the offer had (more than one: earlier workers lost theirs).
    pub claims: u64,
    /// How the attempt ended.
    pub outcome: crate::execution::AttemptOutcome,
    /// When the tool started.
    pub executed_at: Timestamp,
    /// When it ended.
    pub finished_at: Timestamp,
}

/// A stored completion ([`QueuedCompletion`]) that a commit applies, and so deletes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppliedCompletion {
    /// Its position in the completions table ([`QueuedCompletion::seq`]).
    pub seq: i64,
    /// Its task run: a row is deleted only if both match, since after a database crash
    /// that lost the report a sequence number may be handed out again to another one.
    pub task_run_id: TaskRunId,
}

/// What a commit did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommitReport {
    /// Task-run writes refused because their fencing token was older than the stored one.
    pub stale_task_runs: Vec<TaskRunId>,
}

/// Where a log line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    /// The tool's standard output.
    Stdout,
    /// The tool's standard error.
    Stderr,
    /// A line written by the engine or the tool itself.
    System,
}

impl LogStream {
    /// The stream's name.
    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
            LogStream::System => "system",
        }
    }

    /// The stream named `name` (`stdout`, `stderr` or `system`, as [`LogStream::as_str`]
    /// writes it); `None` for any other text.
    pub fn parse(name: &str) -> Option<Self> {
        [LogStream::Stdout, LogStream::Stderr, LogStream::System]
            .into_iter()
            .find(|stream| stream.as_str() == name)
    }
}

/// A log line to append.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewLogLine {
    /// The run.
    pub run_id: RunId,
    /// The task run.
    pub task_run_id: TaskRunId,
    /// The attempt that wrote it.
    pub attempt: u32,
    /// The stream.
    pub stream: LogStream,
    /// When it was written.
    pub at: Timestamp,
    /// The text, without its line ending; lossily decoded from bytes that were not UTF-8.
    pub text: String,
}

/// A stored log line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    /// Position in the store's log, increasing; a cursor for tailing.
    pub seq: i64,
    /// The task the line belongs to.
    pub task_id: Option<TaskId>,
    /// The line.
    #[serde(flatten)]
    pub line: NewLogLine,
}

/// Which log lines to read.
#[derive(Clone, Debug, PartialEq)]
pub struct LogQuery {
    /// The run.
    pub run_id: RunId,
    /// Only this task's lines (all its task runs).
    pub task_id: Option<TaskId>,
    /// Only lines after this sequence number.
    pub after_seq: i64,
    /// At most this many lines.
    pub limit: u32,
}

/// Which validation-queue items to list, oldest first.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReviewFilter {
    /// Only items of this org (the API always sets it).
    pub org_id: Option<OrgId>,
    /// Only items of this run.
    pub run_id: Option<RunId>,
    /// Only items in this state.
    pub state: Option<crate::review::ReviewState>,
    /// Only items of this kind.
    pub kind: Option<crate::review::ReviewKind>,
    /// Only items of this pipeline.
    pub pipeline_name: Option<String>,
    /// Only items of this task.
    pub task_id: Option<String>,
    /// Only items of this tool.
    pub tool: Option<String>,
    /// Only items whose confidence is at least this.
    pub min_confidence: Option<f64>,
    /// Only items whose confidence is below this.
    pub max_confidence: Option<f64>,
    /// Only items created before this time (older than an age).
    pub created_before: Option<Timestamp>,
    /// Only items after this one in the listing's order (cursor).
    pub after: Option<crate::ids::ReviewId>,
    /// At most this many.
    pub limit: u32,
}

/// What [`crate::ports::Store::claim_review`] did.
#[derive(Clone, Debug, PartialEq)]
pub enum ClaimOutcome {
    /// The reviewer holds the item now.
    Claimed(Box<crate::review::ReviewItem>),
    /// Another reviewer's claim holds.
    Held {
        /// Who holds it.
        by: String,
        /// Until when.
        until: Timestamp,
    },
    /// The item is decided already.
    Decided(crate::review::ReviewState),
    /// No such item.
    NotFound,
}

/// Which runs to list, newest first.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunFilter {
    /// Only runs of this org (the API always sets it; the local CLI sees every org).
    pub org_id: Option<OrgId>,
    /// Only runs of this pipeline.
    pub pipeline_name: Option<String>,
    /// Only runs in this state.
    pub state: Option<RunState>,
    /// Only runs created at or after this time.
    pub created_after: Option<Timestamp>,
    /// Only runs created before this time.
    pub created_before: Option<Timestamp>,
    /// Only runs created before this one (cursor).
    pub before: Option<RunId>,
    /// At most this many.
    pub limit: u32,
}

/// Metadata of a table artifact.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TableMeta {
    /// Number of rows.
    pub rows: u64,
    /// Columns in order.
    pub columns: Vec<ColumnMeta>,
}

/// A column of a table artifact.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ColumnMeta {
    /// Column name.
    pub name: String,
    /// Arrow data type, as displayed by Arrow (for example `Utf8`, `Float64`).
    pub data_type: String,
    /// Whether it may hold nulls.
    pub nullable: bool,
}

/// What produced an artifact.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Producer {
    /// The run.
    pub run_id: RunId,
    /// The task run.
    pub task_run_id: TaskRunId,
    /// The task.
    pub task_id: TaskId,
    /// The attempt.
    pub attempt: u32,
}

/// An artifact to store: its metadata before it has a version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewArtifact {
    /// The org the artifact belongs to; names are versioned per org.
    pub org_id: OrgId,
    /// A name, for example `penguins/clean`; each store under the same name is a new version.
    pub name: String,
    /// IANA media type, for example `text/csv`, `application/vnd.apache.parquet`.
    pub media_type: String,
    /// Row count and schema, for tables.
    pub table: Option<TableMeta>,
    /// What produced it.
    pub produced_by: Option<Producer>,
    /// The artifacts it was made from (lineage).
    pub inputs: Vec<ArtifactId>,
}

/// A stored artifact version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArtifactRecord {
    /// The version's id.
    pub id: ArtifactId,
    /// SHA-256 of the content, lowercase hex; the blob's address.
    pub digest: String,
    /// Size of the content in bytes.
    pub size_bytes: u64,
    /// 1, 2, 3… per name.
    pub version: u32,
    /// When it was stored.
    pub created_at: Timestamp,
    /// Name, media type, table metadata and lineage.
    #[serde(flatten)]
    pub meta: NewArtifact,
}

/// Which artifacts to list, newest first.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ArtifactFilter {
    /// Only this org's artifacts (the API always sets it).
    pub org_id: Option<OrgId>,
    /// Only versions of this name.
    pub name: Option<String>,
    /// Only artifacts produced by this run.
    pub run_id: Option<RunId>,
    /// At most this many.
    pub limit: u32,
}

/// How many runs, task runs and ended attempts the store holds in each state, for
/// metrics. States with none are absent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StateCounts {
    /// Runs by state.
    pub runs: Vec<(RunState, u64)>,
    /// Task runs by state.
    pub task_runs: Vec<(TaskRunState, u64)>,
    /// Ended attempts by how they ended.
    pub attempts: Vec<(AttemptState, u64)>,
}

/// The durability mode of a store: what a commit guarantees on power loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// SQLite `synchronous=NORMAL` in WAL mode: a commit survives a crash of the process;
    /// on power loss the last commits before the last checkpoint sync may be lost.
    Normal,
    /// SQLite `synchronous=FULL`: every commit is synced to disk before it returns.
    Full,
}

impl Durability {
    /// The mode's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::Normal => "normal",
            Durability::Full => "full",
        }
    }
}

impl std::str::FromStr for Durability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "normal" => Ok(Durability::Normal),
            "full" => Ok(Durability::Full),
            other => Err(format!("unknown durability {other:?}; use normal or full")),
        }
    }
}
