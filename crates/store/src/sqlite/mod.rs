//! The embedded SQLite store: one file, WAL journal, one writer connection and a small pool of
//! readers.
//!
//! Every write goes through the single writer connection, held behind a mutex, in `BEGIN
//! IMMEDIATE` transactions, so writers of this process never meet `SQLITE_BUSY`; readers use
//! their own connections and, thanks to WAL, never wait for a write in progress. Batches are
//! written with set-based statements: task runs and attempts as multi-row `INSERT … VALUES`
//! upserts of bound parameters, runs and log lines as one JSON array that SQLite's `json_each`
//! expands, and the whole transaction goes to the connection's thread as one script, so a
//! commit costs one round trip whatever its size.
//!
//! This module must never hold a transaction open across anything but its own statements.

mod identity;
mod registry;
mod reviews;
mod rows;
mod writer;

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use arches_core::ids::{ArtifactId, OrgId, RunId, SecretName, TaskId, TaskRunId, ToolName};
use arches_core::log_search::{
    LogHit, LogSearch, LogSearchQuery, LOG_SEARCH_LIMIT_DEFAULT, LOG_SEARCH_LIMIT_MAX,
};
use arches_core::pipeline::PipelineDef;
use arches_core::ports::{Store, StoreError, StoreResult};
use arches_core::records::*;
use arches_core::time::{Clock, SystemClock, Timestamp};
use arches_core::tooldef::{StoredSecret, StoredTool};
use async_trait::async_trait;
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection, QueryBuilder, Sqlite};
use tokio::sync::{MappedMutexGuard, Mutex, MutexGuard};

use crate::decode::{parse_text, state_counts};
use crate::error::{db, Error};
use rows::*;
use writer::Writer;

/// How long a connection waits for a lock held by another connection (another process on
/// the same file, or a checkpoint) before failing with [`StoreError::Unavailable`].
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections of the read pool.
const READ_CONNECTIONS_MAX: u32 = 4;

/// Limit of [`Store::runs`] and [`Store::artifacts`] when the filter gives 0.
pub(crate) const LIST_LIMIT_DEFAULT: u32 = 100;
/// Most runs or artifacts one listing returns.
pub(crate) const LIST_LIMIT_MAX: u32 = 1_000;
/// Limit of [`Store::logs`] when the query gives 0.
pub(crate) const LOG_LIMIT_DEFAULT: u32 = 1_000;
/// Most log lines one read returns.
pub(crate) const LOG_LIMIT_MAX: u32 = 10_000;

/// The statement that opens every write transaction. `IMMEDIATE` takes the write lock at once,
/// so a transaction that reads before it writes cannot fail half-way on a lock upgrade when
/// another process shares the file.
const BEGIN_WRITE: &str = "BEGIN IMMEDIATE";

/// The storage port on an embedded SQLite database.
///
/// Cheap to clone: clones share the writer connection and the read pool.
#[derive(Clone)]
pub struct SqliteStore {
    /// The one connection that writes; `None` once the store is closed. A connection held
    /// here rather than a pool of one: acquiring from and returning to a pool costs more than
    /// a small commit itself.
    writer: Arc<Mutex<Option<Writer>>>,
    reader: SqlitePool,
    durability: Durability,
    clock: Arc<dyn Clock>,
    path: PathBuf,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .field("durability", &self.durability)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens the database at `path`, creating the file and its parent directory if missing,
    /// and applies the embedded migrations.
    ///
    /// The database runs in WAL mode with `synchronous` set by `durability` (NORMAL or FULL),
    /// foreign keys on and a busy timeout of 5 s.
    ///
    /// # Errors
    /// [`Error::CreateDirectory`] when the parent directory cannot be created,
    /// [`Error::Open`] when the database cannot be opened or configured, and
    /// [`Error::Migrate`] when a migration fails.
    pub async fn open(path: &Path, durability: Durability) -> Result<SqliteStore, Error> {
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|source| Error::CreateDirectory {
                    path: parent.to_path_buf(),
                    source,
                })?;
        }
        let synchronous = match durability {
            Durability::Normal => SqliteSynchronous::Normal,
            Durability::Full => SqliteSynchronous::Full,
        };
        let options = SqliteConnectOptions::new()
            .filename(path)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT)
            .synchronous(synchronous)
            // The batch statements materialize their rows in a temporary table; keep it in
            // memory rather than in a temporary file.
            .pragma("temp_store", "memory");
        let open_error = |source| Error::Open {
            path: path.to_path_buf(),
            source,
        };

        // The writer is opened first: it creates the file and switches it to WAL, which is a
        // property of the file that the readers then find. It stays open for the life of the
        // store, so the WAL and its index are never torn down under the readers.
        let mut writer = options
            .clone()
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .connect()
            .await
            .map_err(open_error)?;
        sqlx::migrate!("./migrations")
            .run(&mut writer)
            .await
            .map_err(|source| Error::Migrate {
                path: path.to_path_buf(),
                source,
            })?;
        let reader = SqlitePoolOptions::new()
            .max_connections(READ_CONNECTIONS_MAX)
            // A local SQLite connection does not drop like a network one; testing it before
            // every use would double the cost of a small read.
            .test_before_acquire(false)
            .connect_with(options)
            .await
            .map_err(open_error)?;
        tracing::debug!(path = %path.display(), durability = durability.as_str(), "store opened");
        Ok(SqliteStore {
            writer: Arc::new(Mutex::new(Some(Writer::new(writer)))),
            reader,
            durability,
            clock: Arc::new(SystemClock),
            path: path.to_path_buf(),
        })
    }

    /// Uses `clock` for the creation times the store assigns itself (of pipeline versions and
    /// artifacts); the system clock by default.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The durability mode commits run under.
    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// The read pool, for read-only queries (diagnostics, tests). Writes belong to the store:
    /// a write made through this pool waits for the store's writer and may fail with
    /// `SQLITE_BUSY` after the busy timeout.
    pub fn pool(&self) -> &SqlitePool {
        &self.reader
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The version of the last embedded migration applied (its number in `migrations/`).
    ///
    /// # Errors
    /// [`StoreError`] when the database cannot be read.
    pub async fn schema_version(&self) -> StoreResult<i64> {
        sqlx::query_scalar("SELECT COALESCE(max(version), 0) FROM _sqlx_migrations WHERE success")
            .fetch_one(&self.reader)
            .await
            .map_err(db)
    }

    /// Closes the writer and the read pool, waiting for a write in progress to finish and for
    /// connections in use to be returned. Writes after this fail with
    /// [`StoreError::Unavailable`].
    pub async fn close(&self) {
        if let Some(writer) = self.writer.lock().await.take() {
            if let Err(error) = writer.connection.close().await {
                tracing::warn!(%error, "cannot close the writer connection cleanly");
            }
        }
        self.reader.close().await;
    }

    /// The value of a pragma on the writer connection, as text, for diagnostics: for example
    /// `synchronous` reads `1` in [`Durability::Normal`] and `2` in [`Durability::Full`].
    ///
    /// # Errors
    /// [`StoreError::Conflict`] when `name` is not a pragma name (letters, digits and `_`),
    /// [`StoreError::Unavailable`] once the store is closed.
    pub async fn writer_pragma(&self, name: &str) -> StoreResult<Option<String>> {
        let valid =
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid {
            return Err(StoreError::Conflict(format!(
                "{name:?} is not a pragma name"
            )));
        }
        let mut writer = self.writer().await?;
        // A pragma's value is an integer or text depending on the pragma; read it as text.
        sqlx::query_scalar(&format!("SELECT CAST({name} AS TEXT) FROM pragma_{name}"))
            .fetch_optional(&mut writer.connection)
            .await
            .map_err(db)
    }

    /// The writer connection, once the writes before this one are done and anything they
    /// left unfinished is rolled back.
    async fn writer(&self) -> StoreResult<MappedMutexGuard<'_, Writer>> {
        let mut writer = MutexGuard::try_map(self.writer.lock().await, Option::as_mut)
            .map_err(|_| StoreError::Unavailable("the store is closed".to_owned()))?;
        writer.settle().await?;
        Ok(writer)
    }
}

// The JSON batch statements below (runs, logs) expand the batch's JSON array with `json_each`
// into a MATERIALIZED common table expression of one JSONB value per row: each row is parsed
// once and its fields are then read from the binary form. Reading them straight from
// `json_each`'s text would parse the row again for every field, which measured two to three
// times slower. Rows are applied in batch order (`ORDER BY key`), so the last write of a row in
// a batch wins. Task runs and attempts, the bulk of every batch, skip JSON altogether: their
// fields are bound parameters of multi-row `VALUES` upserts (see [`values_statements`]), since
// SQLite's JSON functions took about half the writer thread's time.

const UPSERT_RUNS: &str = "
INSERT INTO runs (id, org_id, pipeline_name, pipeline_version, params, state, error, owner,
                  created_at, started_at, finished_at)
WITH batch (key, r) AS MATERIALIZED (SELECT key, jsonb(value) FROM json_each(?))
SELECT r ->> '$.id', r ->> '$.org_id', r ->> '$.pipeline_name', r ->> '$.pipeline_version',
       r ->> '$.params', r ->> '$.state', r ->> '$.error', r ->> '$.owner',
       r ->> '$.created_at', r ->> '$.started_at', r ->> '$.finished_at'
FROM batch WHERE true ORDER BY key
ON CONFLICT (id) DO UPDATE SET
    org_id = excluded.org_id,
    pipeline_name = excluded.pipeline_name,
    pipeline_version = excluded.pipeline_version,
    params = excluded.params,
    state = excluded.state,
    error = excluded.error,
    owner = excluded.owner,
    created_at = excluded.created_at,
    started_at = excluded.started_at,
    finished_at = excluded.finished_at";

/// Ids of the batch's task runs whose stored fencing token is greater than the written one,
/// in batch order. The parameter is a JSON array of `[id, token]` pairs.
const STALE_TASK_RUNS: &str = "
SELECT t.id
FROM json_each(?) AS j JOIN task_runs AS t ON t.id = j.value ->> 0
WHERE t.fencing_token > j.value ->> 1
ORDER BY j.key";

/// The identity of a task run (run, task, fan-out index, creation time) never changes after
/// its insert, so the update leaves those columns out: it writes less and spares SQLite the
/// foreign-key check of `run_id` on every state change.
/// Largest number of task-run and attempt rows whose commit script is kept prepared.
const PERSISTENT_SCRIPT_ROWS_MAX: usize = 8;

const UPSERT_TASK_RUNS_HEAD: &str = "
INSERT INTO task_runs (id, run_id, task_id, item_index, fan_out, state, attempt,
                       lease_expiries, fencing_token, item, inputs, outputs, error,
                       lease_owner, lease_expires_at, ready_at, created_at, queued_at,
                       started_at, finished_at)
VALUES ";

const UPSERT_TASK_RUNS_TAIL: &str = "
ON CONFLICT (id) DO UPDATE SET
    fan_out = excluded.fan_out,
    state = excluded.state,
    attempt = excluded.attempt,
    lease_expiries = excluded.lease_expiries,
    fencing_token = excluded.fencing_token,
    item = excluded.item,
    inputs = excluded.inputs,
    outputs = excluded.outputs,
    error = excluded.error,
    lease_owner = excluded.lease_owner,
    lease_expires_at = excluded.lease_expires_at,
    ready_at = excluded.ready_at,
    queued_at = excluded.queued_at,
    started_at = excluded.started_at,
    finished_at = excluded.finished_at
WHERE excluded.fencing_token >= task_runs.fencing_token";

const UPSERT_ATTEMPTS_HEAD: &str = "
INSERT INTO attempts (task_run_id, attempt, run_id, fencing_token, worker, state,
                      started_at, finished_at, error)
VALUES ";

const UPSERT_ATTEMPTS_TAIL: &str = "
ON CONFLICT (task_run_id, attempt) DO UPDATE SET
    run_id = excluded.run_id,
    fencing_token = excluded.fencing_token,
    worker = excluded.worker,
    state = excluded.state,
    started_at = excluded.started_at,
    finished_at = excluded.finished_at,
    error = excluded.error";

/// Most parameters one SQLite statement may take (`SQLITE_MAX_VARIABLE_NUMBER`).
const STATEMENT_PARAMS_MAX: usize = 32_766;

/// Multi-row upserts of `rows` rows of `params` bound parameters each: `head`, the rows as
/// `(?, …), …` and `tail`, split into as many statements as the parameter limit requires.
/// Rows are applied in order, statement after statement and row after row within one, so the
/// last write of a row in a batch wins (or is refused by the upsert's guard).
fn values_statements(head: &str, tail: &str, params: usize, rows: usize) -> Vec<String> {
    let chunk = STATEMENT_PARAMS_MAX / params;
    let mut row = String::with_capacity(params * 2 + 1);
    row.push('(');
    for i in 0..params {
        row.push_str(if i == 0 { "?" } else { ",?" });
    }
    row.push(')');
    let mut statements = Vec::with_capacity(rows.div_ceil(chunk));
    let mut left = rows;
    while left > 0 {
        let n = left.min(chunk);
        let mut statement = String::with_capacity(head.len() + tail.len() + n * (row.len() + 1));
        statement.push_str(head);
        for i in 0..n {
            if i > 0 {
                statement.push(',');
            }
            statement.push_str(&row);
        }
        statement.push_str(tail);
        statements.push(statement);
        left -= n;
    }
    statements
}

/// The task id comes from the line's task run when it is stored; a line of a task run not
/// (yet) stored keeps a null task id rather than being lost.
const INSERT_LOGS: &str = "
INSERT INTO logs (run_id, task_run_id, task_id, attempt, stream, at, text)
WITH batch (key, r) AS MATERIALIZED (SELECT key, jsonb(value) FROM json_each(?))
SELECT r ->> '$.run_id', r ->> '$.task_run_id',
       (SELECT task_id FROM task_runs WHERE id = r ->> '$.task_run_id'),
       r ->> '$.attempt', r ->> '$.stream', r ->> '$.at', r ->> '$.text'
FROM batch
ORDER BY key";

/// Pipeline versions with their name's archive time.
const PIPELINE_SELECT: &str = "SELECT p.org_id, p.name, p.version, p.digest, p.definition, \
     p.created_at, a.archived_at FROM pipelines AS p \
     LEFT JOIN pipeline_archive AS a ON a.org_id = p.org_id AND a.name = p.name";

const RUN_COLUMNS: &str =
    "id, org_id, pipeline_name, pipeline_version, params, state, error, owner, \
                           created_at, started_at, finished_at";

const TASK_RUN_COLUMNS: &str = "id, run_id, task_id, item_index, fan_out, state, attempt, \
     lease_expiries, fencing_token, item, inputs, outputs, error, lease_owner, \
     lease_expires_at, ready_at, created_at, queued_at, started_at, finished_at";

const ARTIFACT_COLUMNS: &str =
    "id, org_id, name, version, digest, size_bytes, media_type, table_meta, \
     run_id, task_run_id, task_id, attempt, inputs, created_at";

/// Rows encoded or decoded on the async thread at most; more go through
/// [`tokio::task::block_in_place`]. Encoding or decoding a row costs about a microsecond, so
/// this keeps a task from holding its thread for much more than the half millisecond async
/// code may block.
const INLINE_ROWS_MAX: usize = 512;

/// Runs CPU work over `rows` rows: inline when small, otherwise, on a multi-thread runtime,
/// inside `block_in_place` so that the runtime moves its other tasks to another thread. A
/// current-thread runtime (tests, tools) has no other thread to move them to and runs it
/// inline. Moving the work to the blocking pool instead would need a copy of the rows,
/// which costs as much as the work itself.
pub(crate) fn cpu_work<T>(rows: usize, work: impl FnOnce() -> T) -> T {
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|handle| handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if rows > INLINE_ROWS_MAX && multi_thread {
        tokio::task::block_in_place(work)
    } else {
        work()
    }
}

/// Clamps a listing limit: 0 takes the default, anything else is bounded to `1..=max`.
pub(crate) fn clamp_limit(limit: u32, default: u32, max: u32) -> i64 {
    let limit = if limit == 0 { default } else { limit };
    i64::from(limit.clamp(1, max))
}

/// The FTS5 query of a log search: each term as a quoted string (a phrase), the terms side by
/// side (FTS5's implicit AND). Words hold letters and digits only, so no quote needs escaping
/// and no FTS5 operator can appear.
fn fts5_query(query: &LogSearchQuery) -> String {
    let mut text = String::new();
    for phrase in query.phrases() {
        if !text.is_empty() {
            text.push(' ');
        }
        text.push('"');
        text.push_str(&phrase.join(" ").replace('"', "\"\""));
        text.push('"');
    }
    text
}

/// Task runs of the batch written after a write of the same id with a higher token in the same
/// batch: they are refused by the upsert guard like a write below the stored token.
pub(crate) fn stale_within_batch(task_runs: &[TaskRunRecord]) -> Vec<TaskRunId> {
    let mut highest: HashMap<TaskRunId, u64> = HashMap::with_capacity(task_runs.len());
    let mut stale = Vec::new();
    for task_run in task_runs {
        let entry = highest.entry(task_run.id).or_insert(task_run.fencing_token);
        if task_run.fencing_token < *entry {
            stale.push(task_run.id);
        } else {
            *entry = task_run.fencing_token;
        }
    }
    stale
}

/// The canonical JSON of a value: objects with their keys sorted, whatever the `serde_json`
/// features of the build (`preserve_order` would otherwise keep insertion order and change the
/// digest of the same definition between builds).
pub(crate) fn canonical(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k, canonical(v)))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.into_iter().map(canonical).collect()),
        other => other,
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn durability(&self) -> Durability {
        self.durability
    }

    async fn save_pipeline(
        &self,
        org: OrgId,
        definition: &PipelineDef,
    ) -> StoreResult<StoredPipeline> {
        let value = serde_json::to_value(definition)
            .map_err(|e| StoreError::Backend(format!("cannot encode pipeline definition: {e}")))?;
        let value = canonical(value);
        let text = value.to_string();
        let digest = hex::encode(Sha256::digest(text.as_bytes()));
        let name = definition.name.as_str();

        let mut writer = self.writer().await?;
        let mut tx = writer
            .connection
            .begin_with(BEGIN_WRITE)
            .await
            .map_err(db)?;
        let org_text = org.to_string();
        let existing: Option<(i64, i64)> = sqlx::query_as(
            "SELECT version, created_at FROM pipelines
             WHERE org_id = ?1 AND name = ?2 AND digest = ?3",
        )
        .bind(&org_text)
        .bind(name)
        .bind(&digest)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?;
        let (version, created_at) = match existing {
            Some(found) => found,
            None => {
                let created_at = self.clock.now().as_micros();
                let version: i64 = sqlx::query_scalar(
                    "INSERT INTO pipelines (org_id, name, version, digest, definition, created_at)
                     SELECT ?1, ?2, COALESCE(MAX(version), 0) + 1, ?3, ?4, ?5
                     FROM pipelines WHERE org_id = ?1 AND name = ?2
                     RETURNING version",
                )
                .bind(&org_text)
                .bind(name)
                .bind(&digest)
                .bind(&text)
                .bind(created_at)
                .fetch_one(&mut *tx)
                .await
                .map_err(db)?;
                (version, created_at)
            }
        };
        let archived_at: Option<i64> = sqlx::query_scalar(
            "SELECT archived_at FROM pipeline_archive WHERE org_id = ?1 AND name = ?2",
        )
        .bind(&org_text)
        .bind(name)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(StoredPipeline {
            org_id: org,
            name: name.to_owned(),
            version: to_u32(version, "pipelines.version")?,
            digest,
            definition: value,
            created_at: arches_core::Timestamp(created_at),
            archived_at: archived_at.map(arches_core::Timestamp),
        })
    }

    async fn pipeline(
        &self,
        org: OrgId,
        name: &str,
        version: u32,
    ) -> StoreResult<Option<StoredPipeline>> {
        let row = sqlx::query(&format!(
            "{PIPELINE_SELECT} WHERE p.org_id = ?1 AND p.name = ?2 AND p.version = ?3"
        ))
        .bind(org.to_string())
        .bind(name)
        .bind(i64::from(version))
        .fetch_optional(&self.reader)
        .await
        .map_err(db)?;
        row.as_ref().map(pipeline_from_row).transpose()
    }

    async fn pipelines(
        &self,
        org: OrgId,
        include_archived: bool,
    ) -> StoreResult<Vec<StoredPipeline>> {
        let archived = if include_archived {
            ""
        } else {
            " AND a.archived_at IS NULL"
        };
        let rows = sqlx::query(&format!(
            "{PIPELINE_SELECT} WHERE p.org_id = ?1{archived}
               AND p.version = (SELECT MAX(version) FROM pipelines
                                WHERE org_id = p.org_id AND name = p.name)
             ORDER BY p.name"
        ))
        .bind(org.to_string())
        .fetch_all(&self.reader)
        .await
        .map_err(db)?;
        cpu_work(rows.len(), || rows.iter().map(pipeline_from_row).collect())
    }

    async fn pipeline_versions(&self, org: OrgId, name: &str) -> StoreResult<Vec<StoredPipeline>> {
        let rows = sqlx::query(&format!(
            "{PIPELINE_SELECT} WHERE p.org_id = ?1 AND p.name = ?2 ORDER BY p.version DESC"
        ))
        .bind(org.to_string())
        .bind(name)
        .fetch_all(&self.reader)
        .await
        .map_err(db)?;
        cpu_work(rows.len(), || rows.iter().map(pipeline_from_row).collect())
    }

    async fn set_pipeline_archived(
        &self,
        org: OrgId,
        name: &str,
        at: Option<Timestamp>,
    ) -> StoreResult<bool> {
        let org_text = org.to_string();
        let mut writer = self.writer().await?;
        let mut tx = writer
            .connection
            .begin_with(BEGIN_WRITE)
            .await
            .map_err(db)?;
        let exists: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM pipelines WHERE org_id = ?1 AND name = ?2 LIMIT 1")
                .bind(&org_text)
                .bind(name)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db)?;
        if exists.is_none() {
            return Ok(false);
        }
        match at {
            Some(at) => {
                sqlx::query(
                    "INSERT INTO pipeline_archive (org_id, name, archived_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (org_id, name) DO NOTHING",
                )
                .bind(&org_text)
                .bind(name)
                .bind(at.as_micros())
                .execute(&mut *tx)
                .await
                .map_err(db)?;
            }
            None => {
                sqlx::query("DELETE FROM pipeline_archive WHERE org_id = ?1 AND name = ?2")
                    .bind(&org_text)
                    .bind(name)
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
            }
        }
        tx.commit().await.map_err(db)?;
        Ok(true)
    }

    async fn commit(&self, batch: &WriteBatch) -> StoreResult<CommitReport> {
        if batch.is_empty() {
            return Ok(CommitReport::default());
        }
        if batch.uses_task_queue() {
            return Err(StoreError::Conflict(
                "the SQLite store has no shared task queue for standalone workers; \
                 use a PostgreSQL store (`--database-url`) to run `arches worker`"
                    .into(),
            ));
        }
        let rows =
            batch.runs.len() + batch.task_runs.len() + batch.attempts.len() + batch.reviews.len();
        // A part that is empty contributes no statement. Only the stale-token check returns
        // rows, and it runs before the task-run upsert in the same transaction.
        let (statements, args) = cpu_work(rows, || {
            let mut statements: Vec<Cow<'static, str>> = Vec::with_capacity(8);
            let mut args = SqliteArguments::default();
            if !batch.runs.is_empty() {
                statements.push(Cow::Borrowed(UPSERT_RUNS));
                bind_text(&mut args, encode_runs(&batch.runs)?)?;
            }
            if !batch.task_runs.is_empty() {
                statements.push(Cow::Borrowed(STALE_TASK_RUNS));
                bind_text(&mut args, encode_task_run_tokens(&batch.task_runs)?)?;
                statements.extend(
                    values_statements(
                        UPSERT_TASK_RUNS_HEAD,
                        UPSERT_TASK_RUNS_TAIL,
                        TASK_RUN_PARAMS,
                        batch.task_runs.len(),
                    )
                    .into_iter()
                    .map(Cow::Owned),
                );
                bind_task_runs(&mut args, &batch.task_runs)?;
            }
            if !batch.attempts.is_empty() {
                statements.extend(
                    values_statements(
                        UPSERT_ATTEMPTS_HEAD,
                        UPSERT_ATTEMPTS_TAIL,
                        ATTEMPT_PARAMS,
                        batch.attempts.len(),
                    )
                    .into_iter()
                    .map(Cow::Owned),
                );
                bind_attempts(&mut args, &batch.attempts)?;
            }
            if !batch.reviews.is_empty() {
                statements.push(Cow::Borrowed(reviews::UPSERT_REVIEWS));
                bind_text(&mut args, reviews::encode(&batch.reviews)?)?;
            }
            StoreResult::Ok((statements, args))
        })?;
        // A script's text depends on how many rows it carries. Small batches (a chain of
        // tasks commits one or two rows at a time) repeat the same few texts, so keeping
        // their prepared statements saves SQLite a parse per commit; large batches vary too
        // much to be worth a place in the statement cache.
        let persistent = batch.task_runs.len() + batch.attempts.len() <= PERSISTENT_SCRIPT_ROWS_MAX;
        let stored_higher = self
            .writer()
            .await?
            .run_script(&statements, args, persistent)
            .await?;

        let mut stale_task_runs = stored_higher
            .iter()
            .map(|id| parse_text::<TaskRunId>(id, "task_runs.id"))
            .collect::<StoreResult<Vec<_>>>()?;
        for id in stale_within_batch(&batch.task_runs) {
            if !stale_task_runs.contains(&id) {
                stale_task_runs.push(id);
            }
        }
        if !stale_task_runs.is_empty() {
            tracing::debug!(
                count = stale_task_runs.len(),
                "stale task-run writes refused"
            );
        }
        Ok(CommitReport { stale_task_runs })
    }

    async fn run(&self, id: RunId) -> StoreResult<Option<RunRecord>> {
        let row = sqlx::query(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1"))
            .bind(id.to_string())
            .fetch_optional(&self.reader)
            .await
            .map_err(db)?;
        row.as_ref().map(run_from_row).transpose()
    }

    async fn runs(&self, filter: &RunFilter) -> StoreResult<Vec<RunRecord>> {
        // Built per filter rather than with `?n IS NULL OR …` so that SQLite can pick the
        // index matching the filters actually given.
        let mut query =
            QueryBuilder::<Sqlite>::new(format!("SELECT {RUN_COLUMNS} FROM runs WHERE true"));
        if let Some(org) = filter.org_id {
            query.push(" AND org_id = ").push_bind(org.to_string());
        }
        if let Some(after) = filter.created_after {
            query
                .push(" AND created_at >= ")
                .push_bind(after.as_micros());
        }
        if let Some(before) = filter.created_before {
            query
                .push(" AND created_at < ")
                .push_bind(before.as_micros());
        }
        if let Some(name) = &filter.pipeline_name {
            query.push(" AND pipeline_name = ").push_bind(name.clone());
        }
        if let Some(state) = filter.state {
            query.push(" AND state = ").push_bind(state.as_str());
        }
        if let Some(before) = filter.before {
            query.push(" AND id < ").push_bind(before.to_string());
        }
        query
            .push(" ORDER BY id DESC LIMIT ")
            .push_bind(clamp_limit(
                filter.limit,
                LIST_LIMIT_DEFAULT,
                LIST_LIMIT_MAX,
            ));
        let rows = query.build().fetch_all(&self.reader).await.map_err(db)?;
        cpu_work(rows.len(), || rows.iter().map(run_from_row).collect())
    }

    async fn task_runs(&self, run_id: RunId) -> StoreResult<Vec<TaskRunRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {TASK_RUN_COLUMNS} FROM task_runs WHERE run_id = ?1 ORDER BY created_at, id"
        ))
        .bind(run_id.to_string())
        .fetch_all(&self.reader)
        .await
        .map_err(db)?;
        cpu_work(rows.len(), || rows.iter().map(task_run_from_row).collect())
    }

    async fn attempts(&self, run_id: RunId) -> StoreResult<Vec<AttemptRecord>> {
        let rows = sqlx::query(
            "SELECT task_run_id, attempt, run_id, fencing_token, worker, state, started_at,
                    finished_at, error
             FROM attempts WHERE run_id = ?1 ORDER BY task_run_id, attempt",
        )
        .bind(run_id.to_string())
        .fetch_all(&self.reader)
        .await
        .map_err(db)?;
        cpu_work(rows.len(), || rows.iter().map(attempt_from_row).collect())
    }

    async fn append_logs(&self, lines: &[NewLogLine]) -> StoreResult<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut args = SqliteArguments::default();
        bind_text(&mut args, encode_logs(lines)?)?;
        self.writer()
            .await?
            .run_script(&[INSERT_LOGS], args, true)
            .await?;
        Ok(())
    }

    async fn logs(&self, query: &LogQuery) -> StoreResult<Vec<LogLine>> {
        let mut builder = QueryBuilder::<Sqlite>::new(
            "SELECT seq, run_id, task_run_id, task_id, attempt, stream, at, text FROM logs WHERE run_id = ",
        );
        builder.push_bind(query.run_id.to_string());
        builder.push(" AND seq > ").push_bind(query.after_seq);
        if let Some(task_id) = &query.task_id {
            builder
                .push(" AND task_id = ")
                .push_bind(task_id.as_str().to_owned());
        }
        builder.push(" ORDER BY seq LIMIT ").push_bind(clamp_limit(
            query.limit,
            LOG_LIMIT_DEFAULT,
            LOG_LIMIT_MAX,
        ));
        let rows = builder.build().fetch_all(&self.reader).await.map_err(db)?;
        cpu_work(rows.len(), || rows.iter().map(log_from_row).collect())
    }

    async fn search_logs(&self, search: &LogSearch) -> StoreResult<Vec<LogHit>> {
        // `bm25()` is lower for better matches; the score is its negation so that higher is
        // better on every backend.
        let mut builder = QueryBuilder::<Sqlite>::new(
            "SELECT l.seq, l.run_id, l.task_run_id, l.task_id, l.attempt, l.stream, l.at, \
                    l.text, -bm25(logs_fts) AS score \
             FROM logs_fts \
             JOIN logs AS l ON l.seq = logs_fts.rowid \
             JOIN runs AS r ON r.id = l.run_id \
             WHERE logs_fts MATCH ",
        );
        builder.push_bind(fts5_query(&search.query));
        builder
            .push(" AND r.org_id = ")
            .push_bind(search.org_id.to_string());
        if let Some(run_id) = search.run_id {
            builder
                .push(" AND l.run_id = ")
                .push_bind(run_id.to_string());
        }
        if let Some(task_id) = &search.task_id {
            builder
                .push(" AND l.task_id = ")
                .push_bind(task_id.as_str().to_owned());
        }
        if let Some(stream) = search.stream {
            builder.push(" AND l.stream = ").push_bind(stream.as_str());
        }
        if let Some(since) = search.since {
            builder.push(" AND l.at >= ").push_bind(since.as_micros());
        }
        if let Some(until) = search.until {
            builder.push(" AND l.at < ").push_bind(until.as_micros());
        }
        builder
            .push(" ORDER BY bm25(logs_fts), l.seq DESC LIMIT ")
            .push_bind(clamp_limit(
                search.limit,
                LOG_SEARCH_LIMIT_DEFAULT,
                LOG_SEARCH_LIMIT_MAX,
            ));
        let rows = builder.build().fetch_all(&self.reader).await.map_err(db)?;
        cpu_work(rows.len(), || {
            rows.iter()
                .map(|row| {
                    Ok(LogHit {
                        line: log_from_row(row)?,
                        score: column(row, "score")?,
                    })
                })
                .collect()
        })
    }

    async fn insert_artifact(
        &self,
        digest: &str,
        size_bytes: u64,
        meta: &NewArtifact,
    ) -> StoreResult<ArtifactRecord> {
        let id = ArtifactId::new();
        let created_at = self.clock.now();
        let size = i64::try_from(size_bytes).map_err(|_| {
            StoreError::Conflict(format!("artifact size {size_bytes} is out of range"))
        })?;
        let table_meta = meta.table.as_ref().map(to_json).transpose()?;
        let inputs = to_json(&meta.inputs)?;
        let producer = meta.produced_by.as_ref();

        let mut writer = self.writer().await?;
        let mut tx = writer
            .connection
            .begin_with(BEGIN_WRITE)
            .await
            .map_err(db)?;
        let version: i64 = sqlx::query_scalar(
            "INSERT INTO artifacts (id, org_id, name, version, digest, size_bytes, media_type,
                                    table_meta, run_id, task_run_id, task_id, attempt, inputs,
                                    created_at)
             SELECT ?1, ?13, ?2, COALESCE(MAX(version), 0) + 1, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10,
                    ?11, ?12
             FROM artifacts WHERE org_id = ?13 AND name = ?2
             RETURNING version",
        )
        .bind(id.to_string())
        .bind(&meta.name)
        .bind(digest)
        .bind(size)
        .bind(&meta.media_type)
        .bind(table_meta)
        .bind(producer.map(|p| p.run_id.to_string()))
        .bind(producer.map(|p| p.task_run_id.to_string()))
        .bind(producer.map(|p| p.task_id.as_str().to_owned()))
        .bind(producer.map(|p| i64::from(p.attempt)))
        .bind(inputs)
        .bind(created_at.as_micros())
        .bind(meta.org_id.to_string())
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(ArtifactRecord {
            id,
            digest: digest.to_owned(),
            size_bytes,
            version: to_u32(version, "artifacts.version")?,
            created_at,
            meta: meta.clone(),
        })
    }

    async fn artifact(&self, id: ArtifactId) -> StoreResult<Option<ArtifactRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {ARTIFACT_COLUMNS} FROM artifacts WHERE id = ?1"
        ))
        .bind(id.to_string())
        .fetch_optional(&self.reader)
        .await
        .map_err(db)?;
        row.as_ref().map(artifact_from_row).transpose()
    }

    async fn artifact_by_name(
        &self,
        org: OrgId,
        name: &str,
        version: Option<u32>,
    ) -> StoreResult<Option<ArtifactRecord>> {
        let mut query = QueryBuilder::<Sqlite>::new(format!(
            "SELECT {ARTIFACT_COLUMNS} FROM artifacts WHERE org_id = "
        ));
        query.push_bind(org.to_string());
        query.push(" AND name = ").push_bind(name.to_owned());
        match version {
            Some(version) => {
                query.push(" AND version = ").push_bind(i64::from(version));
            }
            None => {
                query.push(" ORDER BY version DESC LIMIT 1");
            }
        }
        let row = query
            .build()
            .fetch_optional(&self.reader)
            .await
            .map_err(db)?;
        row.as_ref().map(artifact_from_row).transpose()
    }

    async fn artifacts(&self, filter: &ArtifactFilter) -> StoreResult<Vec<ArtifactRecord>> {
        let mut query = QueryBuilder::<Sqlite>::new(format!(
            "SELECT {ARTIFACT_COLUMNS} FROM artifacts WHERE true"
        ));
        if let Some(org) = filter.org_id {
            query.push(" AND org_id = ").push_bind(org.to_string());
        }
        if let Some(name) = &filter.name {
            query.push(" AND name = ").push_bind(name.clone());
        }
        if let Some(run_id) = filter.run_id {
            query.push(" AND run_id = ").push_bind(run_id.to_string());
        }
        query
            .push(" ORDER BY id DESC LIMIT ")
            .push_bind(clamp_limit(
                filter.limit,
                LIST_LIMIT_DEFAULT,
                LIST_LIMIT_MAX,
            ));
        let rows = query.build().fetch_all(&self.reader).await.map_err(db)?;
        cpu_work(rows.len(), || rows.iter().map(artifact_from_row).collect())
    }

    async fn state_counts(&self) -> StoreResult<StateCounts> {
        async fn count<T: FromStr>(reader: &SqlitePool, table: &str) -> StoreResult<Vec<(T, u64)>>
        where
            T::Err: std::fmt::Display,
        {
            let rows = sqlx::query_as(&format!(
                "SELECT state, COUNT(*) FROM {table} GROUP BY state ORDER BY state"
            ))
            .fetch_all(reader)
            .await
            .map_err(db)?;
            state_counts(rows, table)
        }
        Ok(StateCounts {
            runs: count(&self.reader, "runs").await?,
            task_runs: count(&self.reader, "task_runs").await?,
            attempts: count(&self.reader, "attempts").await?,
        })
    }

    async fn save_tool(
        &self,
        org: OrgId,
        name: &ToolName,
        manifest: &Value,
    ) -> StoreResult<StoredTool> {
        self.save_tool_impl(org, name, manifest).await
    }

    async fn tool(
        &self,
        org: OrgId,
        name: &str,
        version: Option<u32>,
    ) -> StoreResult<Option<StoredTool>> {
        self.tool_impl(org, name, version).await
    }

    async fn tools(&self, org: OrgId) -> StoreResult<Vec<StoredTool>> {
        self.tools_impl(org).await
    }

    async fn tool_versions(&self, org: OrgId, name: &str) -> StoreResult<Vec<StoredTool>> {
        self.tool_versions_impl(org, name).await
    }

    async fn put_secret(
        &self,
        org: OrgId,
        name: &SecretName,
        key_id: &str,
        nonce: &[u8],
        ciphertext: &[u8],
    ) -> StoreResult<StoredSecret> {
        self.put_secret_impl(org, name, key_id, nonce, ciphertext)
            .await
    }

    async fn secret(&self, org: OrgId, name: &str) -> StoreResult<Option<StoredSecret>> {
        self.secret_impl(org, name).await
    }

    async fn secrets(&self, org: Option<OrgId>) -> StoreResult<Vec<StoredSecret>> {
        self.secrets_impl(org).await
    }

    async fn reseal_secret(&self, secret: &StoredSecret) -> StoreResult<bool> {
        self.reseal_secret_impl(secret).await
    }

    async fn delete_secret(&self, org: OrgId, name: &str) -> StoreResult<bool> {
        self.delete_secret_impl(org, name).await
    }

    async fn review_items(
        &self,
        filter: &ReviewFilter,
    ) -> StoreResult<Vec<arches_core::review::ReviewItem>> {
        self.review_items_impl(filter).await
    }

    async fn review_item(
        &self,
        id: arches_core::ReviewId,
    ) -> StoreResult<Option<arches_core::review::ReviewItem>> {
        self.review_item_impl(id).await
    }

    async fn claim_review(
        &self,
        id: arches_core::ReviewId,
        reviewer: &str,
        until: Timestamp,
        now: Timestamp,
    ) -> StoreResult<ClaimOutcome> {
        self.claim_review_impl(id, reviewer, until, now).await
    }

    async fn decide_notice(
        &self,
        item: &arches_core::review::ReviewItem,
        reviewer: &str,
        now: Timestamp,
    ) -> StoreResult<bool> {
        self.decide_notice_impl(item, reviewer, now).await
    }

    async fn review_feedback(
        &self,
        org: OrgId,
        pipeline: &str,
        task: &TaskId,
        limit: usize,
    ) -> StoreResult<Vec<arches_core::review::FeedbackPoint>> {
        self.review_feedback_impl(org, pipeline, task, limit).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_sorts_keys_at_every_depth() {
        let value = serde_json::json!({"b": 1, "a": {"d": [{"z": 1, "y": 2}], "c": null}});
        assert_eq!(
            canonical(value).to_string(),
            r#"{"a":{"c":null,"d":[{"y":2,"z":1}]},"b":1}"#
        );
    }

    #[test]
    fn values_statements_stay_under_the_parameter_limit() {
        assert!(values_statements("H", "T", 3, 0).is_empty());
        assert_eq!(values_statements("H ", " T", 3, 2), ["H (?,?,?),(?,?,?) T"]);
        let statements = values_statements("", "", TASK_RUN_PARAMS, 10_000);
        let params: Vec<usize> = statements.iter().map(|s| s.matches('?').count()).collect();
        assert!(params.iter().all(|&n| n <= STATEMENT_PARAMS_MAX));
        assert_eq!(params.iter().sum::<usize>(), 10_000 * TASK_RUN_PARAMS);
    }

    #[test]
    fn limits_default_at_zero_and_stay_in_bounds() {
        assert_eq!(clamp_limit(0, 100, 1000), 100);
        assert_eq!(clamp_limit(5, 100, 1000), 5);
        assert_eq!(clamp_limit(50_000, 100, 1000), 1000);
    }
}
