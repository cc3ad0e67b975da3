//! The shapes the API answers with, as the client reads them. Ids and states are the core's
//! types; times are RFC 3339 text as the server sends them (UTC, microseconds).
//!
//! These mirror the server's views (`crates/server/src/api/*.rs`) without depending on the
//! server crate: unknown fields are ignored, so a newer server that adds fields still works.

use std::fmt;

use arches_core::events::DomainEvent;
use arches_core::records::{LogStream, Producer, TableMeta};
use arches_core::{
    ArtifactId, OrgId, RunId, RunState, TaskId, TaskRunId, TaskRunState, Timestamp, UserId,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A page of a list. Pass `next_cursor` back as the cursor of the next page; it is absent on
/// the last page.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Page<T> {
    /// The items.
    pub items: Vec<T>,
    /// The cursor of the next page.
    pub next_cursor: Option<String>,
}

/// A user account as shown to its owner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// The user id.
    pub id: UserId,
    /// The email, lowercased.
    pub email: String,
    /// The name shown in the UI.
    pub display_name: String,
    /// Whether the email address is verified.
    pub email_verified: bool,
    /// Whether login needs a TOTP code.
    pub totp_enabled: bool,
    /// When the account was created (RFC 3339).
    pub created_at: String,
}

/// An organization.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Org {
    /// The org id.
    pub id: OrgId,
    /// The unique short name.
    pub slug: String,
    /// The display name.
    pub name: String,
    /// When it was created (RFC 3339).
    pub created_at: String,
}

/// The tokens of a new or refreshed login session, with who it is for.
#[derive(Clone, PartialEq, Eq, Deserialize)]
pub struct TokenResponse {
    /// A short-lived JWT (15 minutes by default) sent as `Authorization: Bearer …`.
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds until the access token expires.
    pub expires_in: u64,
    /// The single-use token that gets the next access token.
    pub refresh_token: String,
    /// The user.
    pub user: User,
    /// The org the session acts in.
    pub org: Org,
    /// The user's role there (`viewer`, `editor`, `admin`, `owner`).
    pub role: String,
}

impl fmt::Debug for TokenResponse {
    /// Never prints the tokens.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenResponse")
            .field("expires_in", &self.expires_in)
            .field("user", &self.user)
            .field("org", &self.org)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// What a login with email and password answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoginOutcome {
    /// Logged in; the client now uses these tokens.
    LoggedIn(Box<TokenResponse>),
    /// The account has TOTP enabled: finish with [`crate::Client::login_mfa`] and this token
    /// and a code.
    MfaRequired {
        /// The challenge token (single use).
        mfa_token: String,
        /// Seconds the challenge stays valid, when the server says.
        expires_in: Option<u64>,
    },
}

/// The second factor of a login.
#[derive(Clone, PartialEq, Eq)]
pub enum MfaCode {
    /// The 6-digit code of the authenticator app.
    Totp(String),
    /// One of the recovery codes (each works once).
    Recovery(String),
}

impl fmt::Debug for MfaCode {
    /// Never prints the code.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MfaCode::Totp(_) => "Totp(..)",
            MfaCode::Recovery(_) => "Recovery(..)",
        })
    }
}

/// A stored pipeline version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PipelineVersion {
    /// The pipeline's name, unique in the org.
    pub name: String,
    /// 1, 2, 3… in the order versions were saved.
    pub version: u32,
    /// SHA-256 (hex) of the canonical JSON definition.
    pub digest: String,
    /// When this version was saved (RFC 3339).
    pub created_at: String,
    /// When the pipeline was archived (RFC 3339), if it is.
    pub archived_at: Option<String>,
    /// The definition as canonical JSON (an `arches_core::pipeline::PipelineDef`).
    pub definition: Value,
}

/// What [`crate::Client::apply_pipeline`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyChange {
    /// The name was new: version 1 was created.
    Created,
    /// The definition differed from the latest version: a new version was saved.
    Updated,
    /// The definition equals a saved version: nothing changed.
    Unchanged,
}

/// A run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// The run's id.
    pub id: RunId,
    /// The pipeline's name.
    pub pipeline: String,
    /// The pipeline version it executes.
    pub pipeline_version: u32,
    /// The params after defaults.
    pub params: Value,
    /// Its state.
    pub state: RunState,
    /// Why it failed.
    pub error: Option<String>,
    /// When it was created (RFC 3339).
    pub created_at: String,
    /// When it started (RFC 3339).
    pub started_at: Option<String>,
    /// When it finished (RFC 3339).
    pub finished_at: Option<String>,
    /// Wall-clock duration so far or in all, in milliseconds, once started.
    pub duration_ms: Option<i64>,
}

/// Filters and cursor of [`crate::Client::list_runs`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RunsQuery {
    /// Only runs of this pipeline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<String>,
    /// Only runs in this state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<RunState>,
    /// The `next_cursor` of the previous page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    /// Page size: 1 to 500 (the server's default is 50).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// One attempt of a task run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// 1-based.
    pub attempt: u32,
    /// `running`, `succeeded`, `failed`, `timed_out`, `lease_expired`, `cancelled`…
    pub state: String,
    /// The worker that ran it.
    pub worker: String,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// When it ended (RFC 3339).
    pub finished_at: Option<String>,
    /// Its error.
    pub error: Option<String>,
}

/// A task run with its attempts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskRun {
    /// The task run's id.
    pub id: TaskRunId,
    /// The task.
    pub task_id: TaskId,
    /// The fan-out index, for fan-out items.
    pub index: Option<u32>,
    /// How many items a fan-out parent spawned.
    pub fan_out: Option<u32>,
    /// Its state.
    pub state: TaskRunState,
    /// The current or last attempt number.
    pub attempt: u32,
    /// Rendered inputs.
    pub inputs: Option<Value>,
    /// Outputs.
    pub outputs: Option<Value>,
    /// Error.
    pub error: Option<String>,
    /// When it was created (RFC 3339).
    pub created_at: String,
    /// When it started (RFC 3339).
    pub started_at: Option<String>,
    /// When it finished (RFC 3339).
    pub finished_at: Option<String>,
    /// Its ended attempts, and the running one.
    pub attempts: Vec<Attempt>,
}

/// Paging of [`crate::Client::logs`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LogsQuery {
    /// Only this task's lines.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskId>,
    /// Only lines after this sequence number (the `next_cursor` of the previous page).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cursor: Option<i64>,
    /// Page size: 1 to 10,000 (the server's default is 1,000).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// A stored or live task log line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// Position in the server's log, a cursor; absent on lines that arrived live.
    pub seq: Option<i64>,
    /// The task.
    pub task_id: Option<TaskId>,
    /// The task run.
    pub task_run_id: TaskRunId,
    /// The attempt that wrote it.
    pub attempt: u32,
    /// `stdout`, `stderr` or `system`.
    pub stream: LogStream,
    /// When it was written (RFC 3339).
    pub at: String,
    /// The line, without its line ending.
    pub text: String,
}

/// What [`crate::Client::search_logs`] looks for, and where. The query syntax: every term
/// must be in the line; a term is a word or a double-quoted phrase; words are letters and
/// digits, matched whole and case-insensitively; there are no operators.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LogSearchParams {
    /// The query text (at most 1,000 characters and 32 words).
    pub q: String,
    /// Only lines of this run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<RunId>,
    /// Only lines of this task.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskId>,
    /// Only lines of this stream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream: Option<LogStream>,
    /// Only lines written at or after this RFC 3339 time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// Only lines written before this RFC 3339 time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    /// Hits wanted: 1 to 1,000 (the server's default is 100).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// A log line that matched a search.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct LogHit {
    /// Relevance, higher is better; comparable only within one search.
    pub score: f64,
    /// The run.
    pub run_id: RunId,
    /// The line.
    #[serde(flatten)]
    pub line: LogLine,
}

/// The answer of [`crate::Client::search_logs`].
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct LogSearchResults {
    /// Best first; lines of equal relevance newest first.
    pub hits: Vec<LogHit>,
}

/// What [`crate::Client::follow_logs`] yields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FollowedLog {
    /// A line: the stored ones first, then new ones as they are written.
    Line(LogLine),
    /// Lines were missed (the watcher fell behind); page through the stored log to fill in.
    Reset {
        /// The server's explanation.
        reason: String,
    },
    /// The run is over; no more lines come and the stream ends.
    End {
        /// The run's final state.
        state: RunState,
    },
}

/// An artifact version's metadata.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Artifact {
    /// Its id.
    pub id: ArtifactId,
    /// Its name; versions count per name.
    pub name: String,
    /// 1, 2, 3…
    pub version: u32,
    /// SHA-256 of the content, hex.
    pub digest: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// IANA media type.
    pub media_type: String,
    /// Rows and columns, for tables.
    pub table: Option<TableMeta>,
    /// The run, task run, task and attempt that produced it.
    pub produced_by: Option<Producer>,
    /// The artifacts it was made from.
    pub inputs: Vec<ArtifactId>,
    /// When it was created (RFC 3339).
    pub created_at: String,
}

/// Filters of [`crate::Client::list_artifacts`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ArtifactsQuery {
    /// Only versions of this name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Only artifacts produced by this run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<RunId>,
    /// Page size: 1 to 1,000 (the server's default is 50).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// The kinds of live events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// Run state changes.
    Run,
    /// Task-run state changes.
    TaskRun,
    /// Task log lines.
    Log,
}

impl EventKind {
    /// The kind's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Run => "run",
            EventKind::TaskRun => "task_run",
            EventKind::Log => "log",
        }
    }
}

/// Filters of [`crate::Client::events`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventsQuery {
    /// Only this run's events.
    pub run_id: Option<RunId>,
    /// Only these kinds; all when empty.
    pub kinds: Vec<EventKind>,
    /// Resume after this event id (sent as `Last-Event-ID`).
    pub last_event_id: Option<String>,
}

/// A task log line as the live event stream carries it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct LogEvent {
    /// The run's org.
    pub org_id: OrgId,
    /// The run.
    pub run_id: RunId,
    /// The task run.
    pub task_run_id: TaskRunId,
    /// The task.
    pub task_id: TaskId,
    /// The attempt that wrote it.
    pub attempt: u32,
    /// The stream.
    pub stream: LogStream,
    /// When it was written.
    pub at: Timestamp,
    /// The line.
    pub text: String,
}

/// One live event.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A committed run or task-run state change.
    State {
        /// The event's id, to resume after (`Last-Event-ID`).
        id: Option<String>,
        /// The change.
        event: DomainEvent,
    },
    /// A task log line.
    Log {
        /// The event's id, to resume after.
        id: Option<String>,
        /// The line.
        line: LogEvent,
    },
    /// Events were missed here (the server restarted, or this watcher fell behind): reload
    /// the state shown.
    Reset {
        /// The server's explanation.
        reason: String,
    },
}

impl Event {
    /// The event's id, for resuming after it.
    pub fn id(&self) -> Option<&str> {
        match self {
            Event::State { id, .. } | Event::Log { id, .. } => id.as_deref(),
            Event::Reset { .. } => None,
        }
    }
}

/// A tool as the server lists it: built in (`kind: builtin`) or registered by the org
/// (`wasm` or `http`, with a version and its manifest's parts).
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Tool {
    /// The name pipelines use.
    pub name: String,
    /// `builtin`, `wasm` or `http`.
    pub kind: String,
    /// The registered version (none for built-in tools).
    pub version: Option<u32>,
    /// `name@version`, as stored pipelines name it.
    pub reference: String,
    /// One line.
    pub description: String,
    /// The sandboxes it runs code in (`wasm`, `process`).
    #[serde(default)]
    pub sandboxes: Vec<String>,
    /// JSON Schema of the inputs.
    pub input_schema: Value,
    /// JSON Schema of the outputs (registered tools).
    pub output_schema: Option<Value>,
    /// Hosts, paths, secrets, memory and time it may use (registered tools).
    pub capabilities: Option<Value>,
    /// How it runs (registered tools).
    pub implementation: Option<Value>,
    /// SHA-256 of its canonical manifest (registered tools).
    pub digest: Option<String>,
    /// When this version was registered (RFC 3339).
    pub created_at: Option<String>,
}

/// An org secret's metadata; the server never returns values.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Secret {
    /// Its name.
    pub name: String,
    /// 1 when created, +1 on every new value.
    pub version: u32,
    /// The master key that sealed it.
    pub key_id: String,
    /// When it was first set (RFC 3339).
    pub created_at: String,
    /// When its value last changed (RFC 3339).
    pub updated_at: String,
}

/// What [`crate::Client::rotate_secrets`] did.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct RotationReport {
    /// The key every secret of the org is now sealed with.
    pub active_key_id: String,
    /// Secrets sealed again under it.
    pub resealed: u32,
    /// Secrets already under it.
    pub unchanged: u32,
    /// Secrets whose value changed during the rotation.
    pub skipped: u32,
    /// Secrets no configured key opens, by name.
    #[serde(default)]
    pub failed: Vec<String>,
}

/// One vote on a validation-queue item.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReviewVote {
    /// The reviewer's user id (`system` for an expiry).
    pub reviewer: String,
    /// The reviewer's email, when known.
    pub email: Option<String>,
    /// `approve` or `reject`.
    pub verdict: String,
    /// The edited result, when approved with changes.
    pub edited: Option<serde_json::Value>,
    /// The comment.
    pub comment: Option<String>,
    /// When (RFC 3339).
    pub at: String,
}

/// An item of the validation queue (`GET /api/v1/reviews/{id}`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Review {
    /// The item's id.
    pub id: String,
    /// `confidence`, `notice` or `approval`.
    pub kind: String,
    /// `open`, `approved`, `rejected`, `expired` or `cancelled`.
    pub state: String,
    /// The run.
    pub run_id: String,
    /// The task run.
    pub task_run_id: String,
    /// The pipeline.
    pub pipeline: String,
    /// The task.
    pub task: String,
    /// The fan-out index.
    pub index: Option<u32>,
    /// The tool.
    pub tool: String,
    /// The attempt that produced the result.
    pub attempt: u32,
    /// The task run's inputs.
    pub inputs: serde_json::Value,
    /// The proposed result.
    pub proposed: serde_json::Value,
    /// The raw confidence.
    pub confidence: Option<f64>,
    /// The model's rationale.
    pub rationale: Option<String>,
    /// The thresholds the result was routed by.
    pub thresholds: Option<serde_json::Value>,
    /// Approvals: what the approvers are asked.
    pub message: Option<String>,
    /// Approvals: who may vote.
    pub assignees: Vec<String>,
    /// Approvals needed.
    pub quorum: u32,
    /// Approvals so far.
    pub approvals: u32,
    /// When it expires (RFC 3339).
    pub expires_at: Option<String>,
    /// Votes so far.
    pub votes: Vec<ReviewVote>,
    /// Who holds it.
    pub claimed_by: Option<String>,
    /// Until when.
    pub claim_expires_at: Option<String>,
    /// When it was created (RFC 3339).
    pub created_at: String,
    /// When it was decided (RFC 3339).
    pub decided_at: Option<String>,
    /// Seconds it has waited.
    pub age_secs: f64,
}

/// Filters and cursor of [`crate::Client::list_reviews`].
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ReviewsQuery {
    /// `open` (the server's default), `approved`, `rejected`, `expired`, `cancelled`, `all`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// `confidence`, `notice` or `approval`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Only items of this pipeline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<String>,
    /// Only items of this task.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// Only items of this tool.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    /// Only items of this run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// Only items whose confidence is at least this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_confidence: Option<f64>,
    /// Only items whose confidence is below this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_confidence: Option<f64>,
    /// Only items older than this (`"1h"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub older_than: Option<String>,
    /// The `next_cursor` of the previous page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    /// Page size: 1 to 500.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// The calibration of one routed task (`GET /api/v1/reviews/calibration`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// The pipeline.
    pub pipeline: String,
    /// The task.
    pub task: String,
    /// The thresholds now: `{low, high, calibrated}`.
    pub thresholds: serde_json::Value,
    /// The policy's fixed thresholds.
    pub fixed: serde_json::Value,
    /// The precision auto-applied results must hold.
    pub target_precision: f64,
    /// Weighted decided results read.
    pub feedback: f64,
    /// Estimated precision under the current `low`.
    pub precision: Option<f64>,
    /// Estimated precision under the fixed `low`.
    pub fixed_precision: Option<f64>,
    /// Estimated share queued under the current `low`.
    pub queue_share: Option<f64>,
    /// Estimated share queued under the fixed `low`.
    pub fixed_queue_share: Option<f64>,
    /// The share no longer queued thanks to calibration.
    pub queue_saved: Option<f64>,
    /// The isotonic fit's blocks.
    pub blocks: Vec<[f64; 3]>,
}

/// What [`crate::Client::search`] looks for.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SearchQuery {
    /// The collection.
    pub collection: String,
    /// The query text.
    pub q: String,
    /// Hits wanted (the server's default: 10; at most 100).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub k: Option<usize>,
    /// `hybrid` (the server's default), `vector` or `text`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// A metadata filter as JSON text, e.g. `{"species":"Adelie"}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
}

/// One hit of a search.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct SearchHit {
    /// The passage's id.
    pub id: String,
    /// The ranking score, higher is better.
    pub score: f64,
    /// The passage's text.
    #[serde(default)]
    pub text: Option<String>,
    /// Its metadata.
    #[serde(default)]
    pub metadata: Value,
    /// Cosine similarity to the query, when the vector ranking holds it.
    #[serde(default)]
    pub similarity: Option<f32>,
    /// A text excerpt with the matched words between « and ».
    #[serde(default)]
    pub snippet: Option<String>,
}

/// The answer of [`crate::Client::search`].
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct SearchResults {
    /// The collection searched.
    pub collection: String,
    /// The mode used.
    pub mode: String,
    /// The embedding model.
    #[serde(default)]
    pub model: String,
    /// Best first.
    pub hits: Vec<SearchHit>,
}
