//! Ports: what the domain needs from the outside world, as traits. Adapters implement them
//! (the SQLite store and the local artifact store in `arches-store`, the built-in tools in
//! `arches-tools`); the engine uses only these traits.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use crate::ids::{ArtifactId, OrgId, ReviewId, RunId, SecretName, TaskId, TaskRunId, ToolName};
use crate::log_search::{LogHit, LogSearch};
use crate::pipeline::PipelineDef;
use crate::records::*;
use crate::review::{FeedbackPoint, ReviewItem};
use crate::time::Timestamp;
use crate::tooldef::{StoredSecret, StoredTool};

/// Errors of the storage and artifact ports.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or opened; the operation may succeed later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The disk is full; nothing of the operation was stored.
    #[error("store is out of disk space: {0}")]
    DiskFull(String),
    /// A uniqueness or consistency rule refused the write.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The thing asked for does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// Stored data could not be decoded.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// Any other failure of the backend.
    #[error("store error: {0}")]
    Backend(String),
}

/// Shorthand for results of the ports.
pub type StoreResult<T> = Result<T, StoreError>;

/// The storage port: durable state of pipelines, runs, task runs, attempts, logs and
/// artifact metadata. Every backend passes the conformance suite in `arches-store`.
///
/// Rules every backend keeps (the suite checks them):
/// - a write replaces the whole row: `None` clears a field, and `Some(Value::Null)` stays
///   distinct from `None`;
/// - a task run must belong to a stored run, and an attempt to a stored task run; a batch
///   that breaks this fails whole with [`StoreError::Conflict`] and stores nothing;
/// - fencing tokens are stored as signed 64-bit integers: a token above `i64::MAX` is refused;
/// - a `limit` of 0 in a filter means the backend's default page size.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The durability mode commits run under.
    fn durability(&self) -> Durability;

    /// Saves a pipeline definition in an org and returns its version. Saving a definition
    /// identical to a stored version of the same name returns that version.
    async fn save_pipeline(
        &self,
        org: OrgId,
        definition: &PipelineDef,
    ) -> StoreResult<StoredPipeline>;

    /// A stored pipeline version.
    async fn pipeline(
        &self,
        org: OrgId,
        name: &str,
        version: u32,
    ) -> StoreResult<Option<StoredPipeline>>;

    /// The latest version of each pipeline of an org, by name; archived ones only with
    /// `include_archived`.
    async fn pipelines(
        &self,
        org: OrgId,
        include_archived: bool,
    ) -> StoreResult<Vec<StoredPipeline>>;

    /// Every version of a pipeline, newest first; empty if the name is unknown.
    async fn pipeline_versions(&self, org: OrgId, name: &str) -> StoreResult<Vec<StoredPipeline>>;

    /// Archives a pipeline name at `at`, or restores it with `None`. `false` if the org has
    /// no pipeline of that name.
    async fn set_pipeline_archived(
        &self,
        org: OrgId,
        name: &str,
        at: Option<Timestamp>,
    ) -> StoreResult<bool>;

    /// Applies a batch atomically: all of it or nothing. Task-run writes that carry an older
    /// fencing token than the stored row are skipped and reported.
    ///
    /// An error, or a call abandoned by its caller, leaves the batch's outcome unknown:
    /// nothing of it or all of it may be stored (a database may apply a commit whose reply
    /// never arrived, or a statement whose client went away), never a part. A caller that
    /// keeps state in memory must therefore read the store back before acting on it again,
    /// as the engine does when it is rebuilt after a failed commit.
    async fn commit(&self, batch: &WriteBatch) -> StoreResult<CommitReport>;

    /// One run.
    async fn run(&self, id: RunId) -> StoreResult<Option<RunRecord>>;

    /// Runs, newest first.
    async fn runs(&self, filter: &RunFilter) -> StoreResult<Vec<RunRecord>>;

    /// Every task run of a run, in creation order.
    async fn task_runs(&self, run_id: RunId) -> StoreResult<Vec<TaskRunRecord>>;

    /// Every attempt of a run's task runs, by task run then attempt number.
    async fn attempts(&self, run_id: RunId) -> StoreResult<Vec<AttemptRecord>>;

    /// Appends log lines.
    async fn append_logs(&self, lines: &[NewLogLine]) -> StoreResult<()>;

    /// Reads log lines in order.
    async fn logs(&self, query: &LogQuery) -> StoreResult<Vec<LogLine>>;

    /// Searches an org's log lines by full text (the syntax of
    /// [`LogSearchQuery`](crate::log_search::LogSearchQuery)): every
    /// term must match; hits by relevance, the best first, then the newest first; at most
    /// `search.limit` hits (see [`LogSearch::limit`]). Lines are indexed in the transaction
    /// that appends them, so a search sees every line [`Store::logs`] would.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] or [`StoreError::Backend`] when the store fails; never
    /// an error caused by the query's text.
    async fn search_logs(&self, search: &LogSearch) -> StoreResult<Vec<LogHit>>;

    /// Stores artifact metadata for content already in the blob store, assigning the next
    /// version of its name.
    async fn insert_artifact(
        &self,
        digest: &str,
        size_bytes: u64,
        meta: &NewArtifact,
    ) -> StoreResult<ArtifactRecord>;

    /// One artifact version.
    async fn artifact(&self, id: ArtifactId) -> StoreResult<Option<ArtifactRecord>>;

    /// The given version of a name, or its latest.
    async fn artifact_by_name(
        &self,
        org: OrgId,
        name: &str,
        version: Option<u32>,
    ) -> StoreResult<Option<ArtifactRecord>>;

    /// Artifact versions, newest first.
    async fn artifacts(&self, filter: &ArtifactFilter) -> StoreResult<Vec<ArtifactRecord>>;

    /// How many runs, task runs and ended attempts are in each state (every org), for
    /// metrics. A full count: meant for a scrape every few seconds, not per request.
    async fn state_counts(&self) -> StoreResult<StateCounts>;

    /// Registers a version of an org's tool: `manifest` is the canonical JSON of a
    /// [`crate::tooldef::ToolManifest`] named `name`. Versions count 1, 2, 3… per name;
    /// a manifest identical to a stored version of the name returns that version.
    async fn save_tool(
        &self,
        org: OrgId,
        name: &ToolName,
        manifest: &Value,
    ) -> StoreResult<StoredTool>;

    /// One version of an org's tool, or its latest version with `None`.
    async fn tool(
        &self,
        org: OrgId,
        name: &str,
        version: Option<u32>,
    ) -> StoreResult<Option<StoredTool>>;

    /// The latest version of each of an org's tools, by name.
    async fn tools(&self, org: OrgId) -> StoreResult<Vec<StoredTool>>;

    /// Every version of an org's tool, newest first; empty if the name is unknown.
    async fn tool_versions(&self, org: OrgId, name: &str) -> StoreResult<Vec<StoredTool>>;

    /// Sets a secret's sealed value: creates it at version 1, or replaces the value of an
    /// existing one and adds 1 to its version. The store never sees the clear value.
    async fn put_secret(
        &self,
        org: OrgId,
        name: &SecretName,
        key_id: &str,
        nonce: &[u8],
        ciphertext: &[u8],
    ) -> StoreResult<StoredSecret>;

    /// One secret of an org.
    async fn secret(&self, org: OrgId, name: &str) -> StoreResult<Option<StoredSecret>>;

    /// The secrets of one org (or of every org, for key rotation), by org and name.
    async fn secrets(&self, org: Option<OrgId>) -> StoreResult<Vec<StoredSecret>>;

    /// Replaces the key id, nonce and ciphertext of `secret` (same org, name, version and
    /// `updated_at`: the row as it was read) after it was sealed again under another master
    /// key; its version and `updated_at` stay. `false` when the secret is gone or was set
    /// meanwhile, even deleted and set again at the same version (a new value won).
    async fn reseal_secret(&self, secret: &StoredSecret) -> StoreResult<bool>;

    /// Deletes a secret; `false` if the org has none of that name.
    async fn delete_secret(&self, org: OrgId, name: &str) -> StoreResult<bool>;

    /// Validation-queue items matching `filter`, oldest first (items are written by
    /// [`Store::commit`] through [`WriteBatch::reviews`]).
    async fn review_items(&self, filter: &ReviewFilter) -> StoreResult<Vec<ReviewItem>>;

    /// One item, with its claim.
    async fn review_item(&self, id: ReviewId) -> StoreResult<Option<ReviewItem>>;

    /// Claims an open item for `reviewer` until `until`, unless another reviewer's claim
    /// holds at `now`. A reviewer may renew their own claim.
    async fn claim_review(
        &self,
        id: ReviewId,
        reviewer: &str,
        until: Timestamp,
        now: Timestamp,
    ) -> StoreResult<ClaimOutcome>;

    /// Records `reviewer`'s decision on a non-blocking item (a notice: its result was
    /// applied, the decision is feedback): stores `item` (state, votes, decision time) only
    /// if the stored item is still open and no other reviewer's claim holds at `now`.
    /// `false` when another decision won or another reviewer holds the item.
    async fn decide_notice(
        &self,
        item: &ReviewItem,
        reviewer: &str,
        now: Timestamp,
    ) -> StoreResult<bool>;

    /// The most recent `limit` decided confidence results of a task (approved as proposed
    /// or not), for its calibration.
    async fn review_feedback(
        &self,
        org: OrgId,
        pipeline: &str,
        task: &TaskId,
        limit: usize,
    ) -> StoreResult<Vec<FeedbackPoint>>;
}

/// The artifact port: content-addressed blobs (SHA-256) with versioned, named metadata and
/// lineage.
#[async_trait]
pub trait ArtifactStore: Send + Sync + 'static {
    /// Stores the content of a local file.
    async fn put_file(&self, source: &Path, meta: NewArtifact) -> StoreResult<ArtifactRecord>;

    /// Stores bytes.
    async fn put_bytes(&self, content: Vec<u8>, meta: NewArtifact) -> StoreResult<ArtifactRecord>;

    /// An artifact's metadata.
    async fn get(&self, id: ArtifactId) -> StoreResult<ArtifactRecord>;

    /// A path on the local filesystem holding the artifact's content, to be read only; for a
    /// remote backend the content is first copied into a local cache.
    async fn local_path(&self, id: ArtifactId) -> StoreResult<PathBuf>;

    /// The whole content; refused with [`StoreError::Conflict`] above `limit_bytes`.
    async fn read(&self, id: ArtifactId, limit_bytes: u64) -> StoreResult<Vec<u8>>;
}

/// An error of a tool. `retryable` tells the engine whether the retry policy applies.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{message}")]
pub struct ToolError {
    /// What went wrong, naming the cause and where.
    pub message: String,
    /// Whether another attempt may succeed (a network error) or not (a SQL syntax error).
    pub retryable: bool,
}

impl ToolError {
    /// An error another attempt may not fix.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
        }
    }

    /// An error another attempt may fix.
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
        }
    }
}

/// Where a tool writes its log lines. Lines are bounded by the engine (length and count per
/// attempt); writing waits when the log writer is behind.
#[async_trait]
pub trait LogSink: Send + Sync {
    /// Appends one line (without its line ending).
    async fn write(&self, stream: LogStream, text: &str);
}

/// What a tool sees of the run while it executes one attempt.
#[derive(Clone)]
pub struct ToolContext {
    /// The org the run belongs to; artifacts the tool stores belong to it too.
    pub org_id: OrgId,
    /// The run.
    pub run_id: RunId,
    /// The task run.
    pub task_run_id: TaskRunId,
    /// The task.
    pub task_id: TaskId,
    /// The attempt number (1-based).
    pub attempt: u32,
    /// The fan-out item, for fan-out items.
    pub item: Option<Value>,
    /// Outputs of the task's upstream tasks (direct dependencies), by task id. A fan-out
    /// upstream gives an array of its items' outputs.
    pub upstream: BTreeMap<String, Value>,
    /// A fresh, empty working directory for this attempt, removed afterwards.
    pub work_dir: PathBuf,
    /// The artifact store.
    pub artifacts: Arc<dyn ArtifactStore>,
    /// The task's log.
    pub logs: Arc<dyn LogSink>,
    /// When a reviewer rejected the previous result and asked for another attempt: their
    /// comment (the `llm` tool adds it to the conversation).
    pub review_comment: Option<String>,
    /// The tools of the engine executing the attempt (built-in ones and, through its
    /// resolver, the org's registered ones): what the `agent` tool looks up the tools it may
    /// call in. Shared, so a context costs one reference count; an empty registry where no
    /// engine runs the tool (tests).
    pub tools: Arc<ToolRegistry>,
}

impl ToolContext {
    /// Who produced an artifact stored now: this run, task run, task and attempt.
    pub fn producer(&self) -> Producer {
        Producer {
            run_id: self.run_id,
            task_run_id: self.task_run_id,
            task_id: self.task_id.clone(),
            attempt: self.attempt,
        }
    }

    /// Artifact ids found anywhere in the upstream outputs (under an `"artifact"` object with
    /// an `"id"`, or an `"artifacts"` array of such objects): the lineage inputs of whatever
    /// this attempt stores.
    pub fn upstream_artifacts(&self) -> Vec<ArtifactId> {
        let mut found = Vec::new();
        for value in self.upstream.values() {
            collect_artifact_ids(value, &mut found);
        }
        found.sort();
        found.dedup();
        found
    }
}

fn collect_artifact_ids(value: &Value, found: &mut Vec<ArtifactId>) {
    match value {
        Value::Object(map) => {
            if let Some(id) = map
                .get("id")
                .and_then(Value::as_str)
                .and_then(|s| s.parse().ok())
            {
                if map.contains_key("digest") {
                    found.push(id);
                }
            }
            for child in map.values() {
                collect_artifact_ids(child, found);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_artifact_ids(v, found)),
        _ => {}
    }
}

/// A tool: executes one attempt of a task.
///
/// Cancellation contract: the engine stops an attempt (timeout, cancel, shutdown) by dropping
/// the future returned by [`Tool::execute`]. A tool must therefore release everything it
/// started when dropped; a tool that spawns processes kills their whole process group.
#[async_trait]
pub trait Tool: Send + Sync + 'static {
    /// The registered name, for example `sql`.
    fn name(&self) -> &str;

    /// One line for listings.
    fn description(&self) -> &str;

    /// JSON Schema (draft 2020-12) of the `with` inputs.
    fn input_schema(&self) -> Value;

    /// The upstream tasks the inputs name (for example the tables a query reads), among the
    /// pipeline's `task_ids`; validation makes them dependencies of the task.
    fn implied_dependencies(&self, _inputs: &Value, _task_ids: &[&str]) -> Vec<String> {
        Vec::new()
    }

    /// Whether an attempt needs its working directory created; tools that touch no files
    /// (`noop`, `echo`) say no and save two filesystem calls per attempt.
    fn needs_work_dir(&self) -> bool {
        true
    }

    /// The sandboxes the tool runs its code in, strongest first; empty for tools that run
    /// only the worker's own code. A task's `sandbox: wasm | process` is checked against it.
    fn sandboxes(&self) -> &'static [crate::tooldef::Sandbox] {
        &[]
    }

    /// Executes one attempt with rendered inputs; returns the outputs (a JSON object).
    ///
    /// # Errors
    /// [`ToolError`] naming the cause; `retryable` decides whether the retry policy applies.
    async fn execute(&self, context: ToolContext, inputs: Value) -> Result<Value, ToolError>;
}

/// Finds the tools an org registered (`name@version`, as stored pipeline definitions name
/// them) when an attempt needs one that is not built in.
#[async_trait]
pub trait ToolResolver: Send + Sync + 'static {
    /// The executor of `reference` in `org`, or `None` when the org has no such tool.
    ///
    /// # Errors
    /// The registration cannot be read or no longer builds (a transient store error is
    /// retryable).
    async fn resolve(
        &self,
        org: OrgId,
        reference: &str,
    ) -> Result<Option<Arc<dyn Tool>>, ToolError>;
}

/// The clear values of an org's secrets, for the tools whose capabilities name them.
#[async_trait]
pub trait SecretReader: Send + Sync + 'static {
    /// The values of `names` in `org`, in the same order.
    ///
    /// # Errors
    /// A secret that is not set (permanent, naming it), one that no configured master key
    /// opens (permanent), or a store failure (retryable).
    async fn reveal(&self, org: OrgId, names: &[SecretName]) -> Result<Vec<String>, ToolError> {
        every_secret_set(names, self.reveal_set(org, names).await?)
    }

    /// The values of those of `names` that are set in `org`, in the same order (`None` for
    /// one that is not): for settings an org may give or leave to the installation, such as
    /// its own LLM provider. No secret is set anywhere when the installation has no master
    /// key.
    ///
    /// # Errors
    /// A secret that is set but no configured master key opens (permanent), or a store
    /// failure (retryable).
    async fn reveal_set(
        &self,
        org: OrgId,
        names: &[SecretName],
    ) -> Result<Vec<Option<String>>, ToolError>;
}

/// The values of [`SecretReader::reveal_set`] for `names`, each required: a permanent error
/// naming the first secret that is not set (and how to set it).
///
/// # Errors
/// The first of `names` whose value is `None`.
pub fn every_secret_set(
    names: &[SecretName],
    values: Vec<Option<String>>,
) -> Result<Vec<String>, ToolError> {
    names
        .iter()
        .zip(values)
        .map(|(name, value)| {
            value.ok_or_else(|| {
                ToolError::permanent(format!(
                    "secret {name} is not set in this org (set it with PUT /api/v1/secrets/{name})"
                ))
            })
        })
        .collect()
}

/// The tools known to an engine, by name, and the resolver of org tools.
#[derive(Clone, Default)]
pub struct ToolRegistry {
    tools: BTreeMap<String, Arc<dyn Tool>>,
    resolver: Option<Arc<dyn ToolResolver>>,
}

impl ToolRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a tool under its name, replacing any tool of that name.
    pub fn register(&mut self, tool: Arc<dyn Tool>) {
        self.tools.insert(tool.name().to_owned(), tool);
    }

    /// Removes the tool of that name (a tool a server's configuration turns off).
    pub fn unregister(&mut self, name: &str) -> Option<Arc<dyn Tool>> {
        self.tools.remove(name)
    }

    /// The tool of that name.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Tool>> {
        self.tools.get(name)
    }

    /// Registered names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tools.keys().map(String::as_str)
    }

    /// Every tool, sorted by name.
    pub fn tools(&self) -> impl Iterator<Item = &Arc<dyn Tool>> {
        self.tools.values()
    }

    /// Resolves the names no built-in tool has through `resolver` (the org tools of a
    /// server).
    pub fn set_resolver(&mut self, resolver: Arc<dyn ToolResolver>) {
        self.resolver = Some(resolver);
    }

    /// The tool an attempt of `org` runs: a built-in one of that name, or else the org's
    /// registered tool through the resolver. `Ok(None)` when neither knows the name.
    ///
    /// # Errors
    /// The resolver's.
    pub async fn resolve(
        &self,
        org: OrgId,
        name: &str,
    ) -> Result<Option<Arc<dyn Tool>>, ToolError> {
        if let Some(tool) = self.tools.get(name) {
            return Ok(Some(tool.clone()));
        }
        match &self.resolver {
            Some(resolver) => resolver.resolve(org, name).await,
            None => Ok(None),
        }
    }
}

impl crate::pipeline::ToolCatalog for ToolRegistry {
    fn input_schema(&self, tool: &str) -> Option<Value> {
        self.tools.get(tool).map(|t| t.input_schema())
    }

    fn tool_names(&self) -> Vec<String> {
        self.tools.keys().cloned().collect()
    }

    fn implied_dependencies(&self, tool: &str, inputs: &Value, task_ids: &[&str]) -> Vec<String> {
        self.tools
            .get(tool)
            .map(|t| t.implied_dependencies(inputs, task_ids))
            .unwrap_or_default()
    }

    fn sandboxes(&self, tool: &str) -> Vec<crate::tooldef::Sandbox> {
        self.tools
            .get(tool)
            .map(|t| t.sandboxes().to_vec())
            .unwrap_or_default()
    }
}

/// What a [`QueueListener`] waits for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueueTopic {
    /// New offers (or offers handed back): what idle workers wait for.
    Offers,
    /// Completions for the runs of one scheduler (its owner name).
    Completions(String),
}

/// Wake-ups of the task queue (on PostgreSQL, `LISTEN`/`NOTIFY`). A wake-up says "look at
/// the queue now"; it carries nothing, so a lost or extra one costs at most one query.
#[async_trait]
pub trait QueueListener: Send {
    /// Waits for the next wake-up. Also returns after the listener lost its connection and
    /// got it back (wake-ups sent meanwhile are lost, so the caller should look).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] while the store cannot be reached; call again to retry
    /// (the caller backs off).
    async fn next(&mut self) -> StoreResult<()>;
}

/// The shared task queue of standalone workers (`arches worker`), on stores that several
/// processes share.
///
/// The protocol: a scheduler leases a task run as usual and commits, in the same
/// [`WriteBatch`], a [`TaskOffer`]. A worker claims offers (each claim gets a claim token
/// and an expiry), renews its claims while it runs them, and reports each end with
/// [`TaskQueue::complete`], which removes the offer and stores a [`QueuedCompletion`] for the
/// scheduler in one statement, only if the claim is still the worker's. A claim that expires
/// (a worker killed or stopped) can be claimed by another worker with a higher token, so the
/// late completion of the first one is refused. The scheduler takes its completions, applies
/// them, and deletes them in the commit that records them ([`WriteBatch::completions_done`]).
#[async_trait]
pub trait TaskQueue: Send + Sync + 'static {
    /// Claims up to `limit` offers for `worker`, oldest first: offers nobody holds, or whose
    /// claim expired before `now`, and whose worker tags are all among `tags`. Each claim
    /// expires at `now + ttl`. Offers other workers are claiming at the same moment are
    /// skipped, not waited for. In the same statement, the batch tells when the earliest
    /// live claim this worker could take over expires, so an idle worker sleeps until then
    /// (a dead worker's offers are taken over without polling).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the store cannot be reached; [`StoreError::Corrupt`]
    /// for an offer that does not decode.
    async fn claim(
        &self,
        worker: &str,
        tags: &[String],
        limit: usize,
        now: Timestamp,
        ttl: std::time::Duration,
    ) -> StoreResult<ClaimBatch>;

    /// Extends the claims `worker` still holds, given as `(task run, claim token)`, to
    /// `now + ttl`. Returns the task runs whose claims were extended; the others are lost
    /// (expired and claimed by another worker, or withdrawn) and must be stopped.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the store cannot be reached.
    async fn renew(
        &self,
        worker: &str,
        claims: &[(TaskRunId, u64)],
        now: Timestamp,
        ttl: std::time::Duration,
    ) -> StoreResult<Vec<TaskRunId>>;

    /// Reports the end of a claimed task: removes the offer and stores the completion for
    /// the run's scheduler (and wakes it), in one statement. Returns `false`, storing
    /// nothing, when the claim is no longer `worker`'s with this token.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the store cannot be reached (the caller retries:
    /// the claim token makes a retry safe).
    async fn complete(&self, completion: &TaskCompletion) -> StoreResult<bool>;

    /// [`TaskQueue::complete`] for several completions of one worker in one statement:
    /// whether each was stored, in order. A worker batches the reports that are ready at
    /// the same moment.
    ///
    /// # Errors
    /// As [`TaskQueue::complete`]; nothing is stored when it fails.
    async fn complete_many(&self, completions: &[TaskCompletion]) -> StoreResult<Vec<bool>>;

    /// Hands claims back unfinished (a worker shutting down): each becomes claimable at
    /// once by another worker, and this worker's token is void. Returns how many were
    /// still held.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the store cannot be reached.
    async fn release(&self, worker: &str, claims: &[(TaskRunId, u64)]) -> StoreResult<usize>;

    /// Hands back every claim held under `worker`'s name: a worker starting under the name
    /// of one that died (a stable `--id`) does not wait for their expiry. Returns how many.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the store cannot be reached.
    async fn release_all(&self, worker: &str) -> StoreResult<usize>;

    /// Takes up to `limit` stored completions for the runs `owner` drives, oldest first,
    /// marking them taken so a second call does not return them again. They stay stored
    /// until a commit lists them in [`WriteBatch::completions_done`].
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the store cannot be reached; [`StoreError::Corrupt`]
    /// when a stored outcome does not decode.
    async fn take_completions(
        &self,
        owner: &str,
        limit: usize,
    ) -> StoreResult<Vec<QueuedCompletion>>;

    /// Makes every completion of `owner` takeable again: a scheduler calls it when it
    /// starts, since the completions its previous incarnation took but never committed are
    /// still there. Returns how many.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the store cannot be reached.
    async fn untake_completions(&self, owner: &str) -> StoreResult<u64>;

    /// Starts listening for wake-ups on `topic`.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the store cannot be reached.
    async fn listen(&self, topic: QueueTopic) -> StoreResult<Box<dyn QueueListener>>;
}
