//! The PostgreSQL store: the storage port on a shared PostgreSQL database, for installations
//! that run several Arches processes against one store.
//!
//! It keeps the SQLite store's semantics exactly (the conformance suite runs against both),
//! with what a server database that several processes write at once requires:
//! - a commit is one transaction of one set-based statement per table (`INSERT … SELECT …
//!   FROM UNNEST(…)` of one array parameter per column), so its cost in round trips does not
//!   grow with the batch; the task runs it writes are locked (`FOR UPDATE`, in id order)
//!   before their fencing tokens are compared, so the stale writes it reports are exactly the
//!   ones it refused, whatever other processes commit meanwhile;
//! - the next version of a pipeline, artifact or tool name is chosen under a
//!   transaction-scoped advisory lock of that name, and log lines are appended under one
//!   advisory lock, so lines become visible in the order of their `seq` and a reader paging
//!   by `seq` never skips one;
//! - migrations run on a connection of their own under sqlx's migrator lock
//!   (`pg_advisory_lock` keyed by the database name, taken before the migrations table is
//!   even created), so processes that start together apply each migration once; a failed
//!   migration closes that connection, which releases the lock.
//!
//! This module must never hold a transaction open across anything but its own statements:
//! every batch is encoded before its transaction begins.

mod identity;
mod queue;
mod registry;
mod reviews;
mod rows;

pub use queue::{
    SchedulerNameLock, CLAIM_LIMIT_MAX, COMPLETIONS_CHANNEL, OFFERS_CHANNEL, TAKE_LIMIT_MAX,
};

use std::collections::{HashMap, HashSet};
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
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, Postgres};
use sqlx::types::Json;
use sqlx::{ConnectOptions, Connection, QueryBuilder};
use uuid::Uuid;

use crate::decode::state_counts;
use crate::error::{db, Error};
use crate::sqlite::{
    canonical, clamp_limit, cpu_work, stale_within_batch, LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX,
    LOG_LIMIT_DEFAULT, LOG_LIMIT_MAX,
};
use rows::*;

/// Connections of the pool, by default.
const CONNECTIONS_MAX: u32 = 8;

/// How long an operation waits for a free connection before failing with
/// [`StoreError::Unavailable`], by default.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// The connection pool's bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PgPoolSettings {
    /// Most connections open at once (each `LISTEN` of the task queue holds one more of its
    /// own). Default 8.
    pub max_connections: u32,
    /// How long an operation waits for a free connection (or for a new one to connect)
    /// before failing with [`StoreError::Unavailable`]. Default 5 s.
    pub acquire_timeout: Duration,
}

impl Default for PgPoolSettings {
    fn default() -> Self {
        Self {
            max_connections: CONNECTIONS_MAX,
            acquire_timeout: ACQUIRE_TIMEOUT,
        }
    }
}

/// The advisory lock that serializes log appends (an arbitrary constant, `"arches:logs"` in
/// ASCII, so that it is recognizable in `pg_locks`).
const LOG_APPEND_LOCK: i64 = 0x6172_6368_6573_6c67;

/// Seeds of `hashtextextended` for the advisory locks of pipeline, artifact and tool names,
/// so the same name locks different keys in the three tables.
const PIPELINE_NAME_LOCK_SEED: i64 = 1;
const ARTIFACT_NAME_LOCK_SEED: i64 = 2;
const TOOL_NAME_LOCK_SEED: i64 = 3;

/// Takes the transaction-scoped advisory lock of an org's name in one table.
const LOCK_NAME: &str = "SELECT pg_advisory_xact_lock(hashtextextended($1::text || '/' || $2, $3))";

/// The storage port on a PostgreSQL database.
///
/// Cheap to clone: clones share the connection pool.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    durability: Durability,
    clock: Arc<dyn Clock>,
    database: String,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("database", &self.database)
            .field("durability", &self.durability)
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://user:password@host:port/database`) and
    /// applies the embedded migrations; see [`PgStore::connect_with`].
    ///
    /// # Errors
    /// [`Error::Connect`] when the URL is malformed or the database cannot be reached, and
    /// [`Error::MigrateDatabase`] when a migration fails.
    pub async fn connect(url: &str, durability: Durability) -> Result<PgStore, Error> {
        Self::connect_pooled(url, durability, PgPoolSettings::default()).await
    }

    /// [`PgStore::connect`] with the pool bounds `pool`.
    ///
    /// # Errors
    /// As [`PgStore::connect`].
    pub async fn connect_pooled(
        url: &str,
        durability: Durability,
        pool: PgPoolSettings,
    ) -> Result<PgStore, Error> {
        let options = PgConnectOptions::from_str(url).map_err(|source| Error::Connect {
            database: "(malformed url)".to_owned(),
            source,
        })?;
        Self::connect_with_pool(options, durability, pool).await
    }

    /// Connects with `options` and applies the embedded migrations.
    ///
    /// [`Durability::Full`] sets `synchronous_commit = on` on every connection: a commit
    /// returns once its WAL is flushed (and, with synchronous replication, replicated).
    /// [`Durability::Normal`] leaves the server's setting alone. A weaker setting (`off`,
    /// which matches SQLite's NORMAL) is a server-side decision for its operator.
    ///
    /// # Errors
    /// [`Error::Connect`] when the database cannot be reached, and [`Error::MigrateDatabase`]
    /// when a migration fails.
    pub async fn connect_with(
        options: PgConnectOptions,
        durability: Durability,
    ) -> Result<PgStore, Error> {
        Self::connect_with_pool(options, durability, PgPoolSettings::default()).await
    }

    /// Connects with `options` and the pool bounds `pool`, and applies the embedded
    /// migrations; see [`PgStore::connect_with`].
    ///
    /// # Errors
    /// As [`PgStore::connect_with`].
    pub async fn connect_with_pool(
        options: PgConnectOptions,
        durability: Durability,
        pool: PgPoolSettings,
    ) -> Result<PgStore, Error> {
        let settings = pool;
        let database = options
            .get_database()
            .unwrap_or_else(|| options.get_username())
            .to_owned();
        let options = match durability {
            Durability::Full => options.options([("synchronous_commit", "on")]),
            Durability::Normal => options,
        };
        let connect_error = |source| Error::Connect {
            database: database.clone(),
            source,
        };

        // Migrations run on a connection of their own: sqlx's migrator holds a session-level
        // advisory lock and does not release it when a migration fails, so that connection
        // is closed (or dropped) afterwards rather than returned to a pool.
        let mut migrator = options.connect().await.map_err(connect_error)?;
        let migrated = sqlx::migrate!("./migrations_pg")
            .run(&mut migrator)
            .await
            .map_err(|source| Error::MigrateDatabase {
                database: database.clone(),
                source,
            });
        if let Err(error) = migrator.close().await {
            tracing::warn!(%error, "cannot close the migration connection cleanly");
        }
        migrated?;

        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections.max(1))
            .acquire_timeout(settings.acquire_timeout)
            .connect_with(options)
            .await
            .map_err(connect_error)?;
        tracing::debug!(
            database = %database,
            durability = durability.as_str(),
            "store opened"
        );
        Ok(PgStore {
            pool,
            durability,
            clock: Arc::new(SystemClock),
            database,
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

    /// The connection pool, for read-only queries (diagnostics, tests). Writes belong to the
    /// store.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The database's name.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// The version of the last embedded migration applied (its number in
    /// `migrations_pg/`).
    ///
    /// # Errors
    /// [`StoreError`] when the database cannot be read.
    pub async fn schema_version(&self) -> StoreResult<i64> {
        sqlx::query_scalar("SELECT COALESCE(max(version), 0) FROM _sqlx_migrations WHERE success")
            .fetch_one(&self.pool)
            .await
            .map_err(crate::error::db)
    }

    /// Closes the pool, waiting for connections in use to be returned. Operations after this
    /// fail with [`StoreError::Unavailable`].
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

const UPSERT_RUNS: &str = "
INSERT INTO runs (id, org_id, pipeline_name, pipeline_version, params, state, error, owner,
                  created_at, started_at, finished_at)
SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::bigint[], $5::jsonb[],
                     $6::text[], $7::text[], $8::text[], $9::bigint[], $10::bigint[],
                     $11::bigint[])
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

/// Locks the stored rows of the batch's task runs, in id order so that two commits sharing
/// task runs cannot deadlock, and reads their fencing tokens.
const LOCK_TASK_RUNS: &str = "
SELECT id, fencing_token FROM task_runs WHERE id = ANY($1) ORDER BY id FOR UPDATE";

/// The identity of a task run (run, task, fan-out index, creation time) never changes after
/// its insert, so the update leaves those columns out, as in SQLite. The guard refuses a
/// write below the stored token; the rows were locked and checked before, so it refuses
/// exactly the writes reported stale.
const UPSERT_TASK_RUNS: &str = "
INSERT INTO task_runs (id, run_id, task_id, item_index, fan_out, state, attempt,
                       lease_expiries, fencing_token, item, inputs, outputs, error,
                       lease_owner, lease_expires_at, ready_at, created_at, queued_at,
                       started_at, finished_at)
SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::bigint[], $5::bigint[],
                     $6::text[], $7::bigint[], $8::bigint[], $9::bigint[], $10::jsonb[],
                     $11::jsonb[], $12::jsonb[], $13::text[], $14::text[], $15::bigint[],
                     $16::bigint[], $17::bigint[], $18::bigint[], $19::bigint[],
                     $20::bigint[])
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

const UPSERT_ATTEMPTS: &str = "
INSERT INTO attempts (task_run_id, attempt, run_id, fencing_token, worker, state,
                      started_at, finished_at, error)
SELECT * FROM UNNEST($1::uuid[], $2::bigint[], $3::uuid[], $4::bigint[], $5::text[],
                     $6::text[], $7::bigint[], $8::bigint[], $9::text[])
ON CONFLICT (task_run_id, attempt) DO UPDATE SET
    run_id = excluded.run_id,
    fencing_token = excluded.fencing_token,
    worker = excluded.worker,
    state = excluded.state,
    started_at = excluded.started_at,
    finished_at = excluded.finished_at,
    error = excluded.error";

/// The task id comes from the line's task run when it is stored; a line of a task run not
/// (yet) stored keeps a null task id rather than being lost. Lines take their `seq` in batch
/// order.
const INSERT_LOGS: &str = "
INSERT INTO logs (run_id, task_run_id, task_id, attempt, stream, at, text)
SELECT l.run_id, l.task_run_id,
       (SELECT task_id FROM task_runs WHERE id = l.task_run_id),
       l.attempt, l.stream, l.at, l.text
FROM UNNEST($1::uuid[], $2::uuid[], $3::bigint[], $4::text[], $5::bigint[], $6::text[])
     WITH ORDINALITY AS l (run_id, task_run_id, attempt, stream, at, text, n)
ORDER BY l.n";

/// Pushes the tsquery of a log search: one `phraseto_tsquery('simple', …)` per term (a word
/// is a phrase of one), all joined by `&&`. The terms are bound, never spliced into the text.
fn push_tsquery(builder: &mut QueryBuilder<'_, Postgres>, query: &LogSearchQuery) {
    builder.push("(");
    for (i, phrase) in query.phrases().iter().enumerate() {
        if i > 0 {
            builder.push(" && ");
        }
        builder
            .push("phraseto_tsquery('simple'::regconfig, ")
            .push_bind(phrase.join(" "))
            .push(")");
    }
    builder.push(")");
}

/// Pipeline versions with their name's archive time.
const PIPELINE_SELECT: &str = "SELECT p.org_id, p.name, p.version, p.digest, p.definition, \
     p.created_at, a.archived_at FROM pipelines AS p \
     LEFT JOIN pipeline_archive AS a ON a.org_id = p.org_id AND a.name = p.name";

const RUN_COLUMNS: &str = "id, org_id, pipeline_name, pipeline_version, params, state, error, \
     owner, created_at, started_at, finished_at";

const TASK_RUN_COLUMNS: &str = "id, run_id, task_id, item_index, fan_out, state, attempt, \
     lease_expiries, fencing_token, item, inputs, outputs, error, lease_owner, \
     lease_expires_at, ready_at, created_at, queued_at, started_at, finished_at";

const ARTIFACT_COLUMNS: &str =
    "id, org_id, name, version, digest, size_bytes, media_type, table_meta, \
     run_id, task_run_id, task_id, attempt, inputs, created_at";

/// A batch's whole commit as one statement, for the common batches (see
/// [`fits_one_statement`]): one round trip instead of one per table, and an implicit
/// transaction. Data-modifying `WITH` queries all see the snapshot the statement started
/// with and run to completion; what each must see of another comes through `RETURNING`:
/// - the task runs are locked in id order (`locked`) before the upsert writes any of them,
///   since the upsert's source waits for the whole lock set (`count(*) FROM locked`);
/// - offers join the task-run rows the upsert returned (written with the offer's token)
///   instead of the table, which still shows the snapshot; every offer's task run is
///   written in the batch (the check of [`fits_one_statement`]), and a refused write is
///   not returned, so this is the rule of [`queue::INSERT_OFFERS`] exactly;
/// - the offers' `NOTIFY` goes out only if an offer was written, at commit;
/// - foreign keys are checked at the end of the statement, so a run, its task runs and
///   their offers may all be new.
///
/// Parameters: runs `$1`–`$11`, the task runs to lock `$12`, task runs `$13`–`$32`,
/// attempts `$33`–`$41`, offers `$42`–`$49`, applied completions `$50`–`$51`, withdrawn
/// offers `$52`, the offers' channel `$53`. Rows: the locked task runs' stored tokens, then
/// one row of the wake-up.
static ONE_STATEMENT_COMMIT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let task_runs = UPSERT_TASK_RUNS.replace(
        "\nON CONFLICT (id) DO UPDATE SET",
        "\nWHERE (SELECT count(*) FROM locked) >= 0\nON CONFLICT (id) DO UPDATE SET",
    );
    debug_assert_ne!(
        task_runs, UPSERT_TASK_RUNS,
        "the task-run upsert changed shape"
    );
    let offers = queue::INSERT_OFFERS.replace("JOIN task_runs t ON", "JOIN task_runs_written t ON");
    debug_assert_ne!(
        offers,
        queue::INSERT_OFFERS,
        "the offer insert changed shape"
    );
    format!(
        "WITH runs_written AS ({runs}), \
         locked AS ({lock}), \
         task_runs_written AS ({task_runs} RETURNING id, fencing_token), \
         attempts_written AS ({attempts}), \
         offered AS ({offers} RETURNING task_run_id), \
         done AS ({done}), \
         withdrawn AS ({withdrawn}), \
         woken AS (SELECT pg_notify($53, '') FROM (SELECT 1 FROM offered LIMIT 1) AS o) \
         SELECT id, fencing_token, NULL::bigint AS woken FROM locked \
         UNION ALL SELECT NULL, NULL, (SELECT count(*) FROM woken)",
        runs = shift_parameters(UPSERT_RUNS, 0),
        lock = shift_parameters(LOCK_TASK_RUNS, 11),
        task_runs = shift_parameters(&task_runs, 12),
        attempts = shift_parameters(UPSERT_ATTEMPTS, 32),
        offers = shift_parameters(&offers, 41),
        done = shift_parameters(queue::DELETE_APPLIED_COMPLETIONS, 49),
        withdrawn = shift_parameters(queue::DELETE_WITHDRAWN, 51),
    )
});

/// `sql` with every parameter `$n` renumbered `$(n + by)`. The statements it is used on
/// hold no `$` but in parameters.
fn shift_parameters(sql: &str, by: usize) -> String {
    let mut shifted = String::with_capacity(sql.len() + 16);
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        shifted.push(c);
        if c != '$' {
            continue;
        }
        let mut number = String::new();
        while let Some(digit) = chars.next_if(char::is_ascii_digit) {
            number.push(digit);
        }
        match number.parse::<usize>() {
            Ok(n) => shifted.push_str(&(n + by).to_string()),
            Err(_) => shifted.push_str(&number),
        }
    }
    shifted
}

/// Whether [`ONE_STATEMENT_COMMIT`] can write `batch`: no review items (a statement of
/// their own), no offer made again on a resume (those wait for a report being stored, see
/// [`queue::write_queue_parts`]), no offer withdrawn in the same batch (one statement may
/// not write a row twice), and every offer's task run written in the batch.
fn fits_one_statement(batch: &WriteBatch) -> bool {
    if !batch.reviews.is_empty() || batch.offers.iter().any(|offer| offer.resumed) {
        return false;
    }
    if batch.offers.is_empty() {
        return true;
    }
    let written: HashSet<TaskRunId> = batch.task_runs.iter().map(|t| t.id).collect();
    let withdrawn: HashSet<&TaskRunId> = batch.withdrawn.iter().collect();
    batch.offers.iter().all(|offer| {
        let id = offer.assignment.task_run_id;
        written.contains(&id) && !withdrawn.contains(&id)
    })
}

/// The last write of each key, in the order each key first appears. A multi-row upsert may
/// not touch a row twice in PostgreSQL, and the last write of a row in a batch wins anyway.
fn last_write_per_key<T, K: std::hash::Hash + Eq>(writes: &[T], key: impl Fn(&T) -> K) -> Vec<&T> {
    let mut slot: HashMap<K, usize> = HashMap::with_capacity(writes.len());
    let mut chosen: Vec<&T> = Vec::with_capacity(writes.len());
    for write in writes {
        match slot.get(&key(write)) {
            Some(&i) => chosen[i] = write,
            None => {
                slot.insert(key(write), chosen.len());
                chosen.push(write);
            }
        }
    }
    chosen
}

/// The write of each task run that the batch leaves in place, in the order each task run
/// first appears: applied in order under the fencing rule, writes of one task run end with
/// the last one whose token is at least every earlier token of that task run in the batch
/// (the later ones with a lower token are refused, see [`stale_within_batch`]). Whether it
/// applies then depends only on the stored token, which the upsert's guard checks.
fn surviving_task_run_writes(task_runs: &[TaskRunRecord]) -> Vec<&TaskRunRecord> {
    let mut slot: HashMap<TaskRunId, usize> = HashMap::with_capacity(task_runs.len());
    let mut chosen: Vec<&TaskRunRecord> = Vec::with_capacity(task_runs.len());
    for task_run in task_runs {
        match slot.get(&task_run.id) {
            Some(&i) => {
                if task_run.fencing_token >= chosen[i].fencing_token {
                    chosen[i] = task_run;
                }
            }
            None => {
                slot.insert(task_run.id, chosen.len());
                chosen.push(task_run);
            }
        }
    }
    chosen
}

/// A batch's rows, as the column arrays of its statements.
struct EncodedBatch<'a> {
    runs: Option<RunColumns<'a>>,
    task_runs: Option<(Vec<Uuid>, TaskRunColumns<'a>)>,
    attempts: Option<AttemptColumns<'a>>,
}

fn encode_batch(batch: &WriteBatch) -> StoreResult<EncodedBatch<'_>> {
    // Every token is checked, refused writes included: an unstorable token fails the batch.
    for task_run in &batch.task_runs {
        token(task_run.fencing_token)?;
    }
    let runs = (!batch.runs.is_empty())
        .then(|| RunColumns::new(&last_write_per_key(&batch.runs, |run| run.id)));
    let task_runs = if batch.task_runs.is_empty() {
        None
    } else {
        let written = surviving_task_run_writes(&batch.task_runs);
        let mut ids: Vec<Uuid> = written.iter().map(|task_run| task_run.id.0).collect();
        ids.sort_unstable();
        Some((ids, TaskRunColumns::new(&written)?))
    };
    let attempts = if batch.attempts.is_empty() {
        None
    } else {
        let written = last_write_per_key(&batch.attempts, |attempt| {
            (attempt.task_run_id, attempt.attempt)
        });
        Some(AttemptColumns::new(&written)?)
    };
    Ok(EncodedBatch {
        runs,
        task_runs,
        attempts,
    })
}

/// The batch's refused task-run writes, reported as the SQLite store does: every write
/// below the token stored before the batch (`stored_tokens`, read under the rows' locks), in
/// batch order, then the writes below an earlier write of the same batch.
fn stale_report(batch: &WriteBatch, stored_tokens: &HashMap<Uuid, i64>) -> CommitReport {
    let mut stale_task_runs: Vec<TaskRunId> = batch
        .task_runs
        .iter()
        .filter(|task_run| {
            stored_tokens.get(&task_run.id.0).is_some_and(|&stored| {
                // Every token was checked to fit an i64 when the batch was encoded.
                i64::try_from(task_run.fencing_token).is_ok_and(|written| stored > written)
            })
        })
        .map(|task_run| task_run.id)
        .collect();
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
    CommitReport { stale_task_runs }
}

impl PgStore {
    /// Commits `batch` as [`ONE_STATEMENT_COMMIT`] (one round trip); returns the stored
    /// tokens of its task runs as they were before it.
    async fn commit_in_one_statement(
        &self,
        batch: &WriteBatch,
        encoded: &EncodedBatch<'_>,
    ) -> StoreResult<HashMap<Uuid, i64>> {
        let no_runs = RunColumns::default();
        let runs = encoded.runs.as_ref().unwrap_or(&no_runs);
        let no_task_runs = (Vec::new(), TaskRunColumns::default());
        let (ids, task_runs) = encoded.task_runs.as_ref().unwrap_or(&no_task_runs);
        let no_attempts = AttemptColumns::default();
        let attempts = encoded.attempts.as_ref().unwrap_or(&no_attempts);
        let offers = queue::OfferColumns::new(&batch.offers)?;
        let done_seqs: Vec<i64> = batch.completions_done.iter().map(|c| c.seq).collect();
        let done_task_runs: Vec<Uuid> = batch
            .completions_done
            .iter()
            .map(|c| c.task_run_id.0)
            .collect();
        let withdrawn: Vec<Uuid> = batch.withdrawn.iter().map(|id| id.0).collect();
        let rows: Vec<(Option<Uuid>, Option<i64>, Option<i64>)> =
            sqlx::query_as(ONE_STATEMENT_COMMIT.as_str())
                .bind(&runs.id)
                .bind(&runs.org_id)
                .bind(&runs.pipeline_name)
                .bind(&runs.pipeline_version)
                .bind(&runs.params)
                .bind(&runs.state)
                .bind(&runs.error)
                .bind(&runs.owner)
                .bind(&runs.created_at)
                .bind(&runs.started_at)
                .bind(&runs.finished_at)
                .bind(ids)
                .bind(&task_runs.id)
                .bind(&task_runs.run_id)
                .bind(&task_runs.task_id)
                .bind(&task_runs.item_index)
                .bind(&task_runs.fan_out)
                .bind(&task_runs.state)
                .bind(&task_runs.attempt)
                .bind(&task_runs.lease_expiries)
                .bind(&task_runs.fencing_token)
                .bind(&task_runs.item)
                .bind(&task_runs.inputs)
                .bind(&task_runs.outputs)
                .bind(&task_runs.error)
                .bind(&task_runs.lease_owner)
                .bind(&task_runs.lease_expires_at)
                .bind(&task_runs.ready_at)
                .bind(&task_runs.created_at)
                .bind(&task_runs.queued_at)
                .bind(&task_runs.started_at)
                .bind(&task_runs.finished_at)
                .bind(&attempts.task_run_id)
                .bind(&attempts.attempt)
                .bind(&attempts.run_id)
                .bind(&attempts.fencing_token)
                .bind(&attempts.worker)
                .bind(&attempts.state)
                .bind(&attempts.started_at)
                .bind(&attempts.finished_at)
                .bind(&attempts.error)
                .bind(&offers.task_run_id)
                .bind(&offers.run_id)
                .bind(&offers.org_id)
                .bind(&offers.fencing_token)
                .bind(&offers.owner)
                .bind(&offers.tags)
                .bind(&offers.assignment)
                .bind(&offers.offered_at)
                .bind(&done_seqs)
                .bind(&done_task_runs)
                .bind(&withdrawn)
                .bind(queue::OFFERS_CHANNEL)
                .fetch_all(&self.pool)
                .await
                .map_err(db)?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, token, _)| Some((id?, token?)))
            .collect())
    }

    /// Commits `batch` as one transaction of a statement per table; returns the stored
    /// tokens of its task runs as they were before it.
    async fn commit_in_statements(
        &self,
        batch: &WriteBatch,
        encoded: &EncodedBatch<'_>,
    ) -> StoreResult<HashMap<Uuid, i64>> {
        // Dropping the transaction before its commit (an error, or a caller that stops
        // waiting) rolls it back before the connection is used again.
        let mut tx = self.pool.begin().await.map_err(db)?;
        if let Some(runs) = &encoded.runs {
            sqlx::query(UPSERT_RUNS)
                .bind(&runs.id)
                .bind(&runs.org_id)
                .bind(&runs.pipeline_name)
                .bind(&runs.pipeline_version)
                .bind(&runs.params)
                .bind(&runs.state)
                .bind(&runs.error)
                .bind(&runs.owner)
                .bind(&runs.created_at)
                .bind(&runs.started_at)
                .bind(&runs.finished_at)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        let mut stored_tokens: HashMap<Uuid, i64> = HashMap::new();
        if let Some((ids, task_runs)) = &encoded.task_runs {
            let locked: Vec<(Uuid, i64)> = sqlx::query_as(LOCK_TASK_RUNS)
                .bind(ids)
                .fetch_all(&mut *tx)
                .await
                .map_err(db)?;
            stored_tokens.extend(locked);
            sqlx::query(UPSERT_TASK_RUNS)
                .bind(&task_runs.id)
                .bind(&task_runs.run_id)
                .bind(&task_runs.task_id)
                .bind(&task_runs.item_index)
                .bind(&task_runs.fan_out)
                .bind(&task_runs.state)
                .bind(&task_runs.attempt)
                .bind(&task_runs.lease_expiries)
                .bind(&task_runs.fencing_token)
                .bind(&task_runs.item)
                .bind(&task_runs.inputs)
                .bind(&task_runs.outputs)
                .bind(&task_runs.error)
                .bind(&task_runs.lease_owner)
                .bind(&task_runs.lease_expires_at)
                .bind(&task_runs.ready_at)
                .bind(&task_runs.created_at)
                .bind(&task_runs.queued_at)
                .bind(&task_runs.started_at)
                .bind(&task_runs.finished_at)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        if let Some(attempts) = &encoded.attempts {
            sqlx::query(UPSERT_ATTEMPTS)
                .bind(&attempts.task_run_id)
                .bind(&attempts.attempt)
                .bind(&attempts.run_id)
                .bind(&attempts.fencing_token)
                .bind(&attempts.worker)
                .bind(&attempts.state)
                .bind(&attempts.started_at)
                .bind(&attempts.finished_at)
                .bind(&attempts.error)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        if batch.uses_task_queue() {
            queue::write_queue_parts(&mut tx, batch).await?;
        }
        if !batch.reviews.is_empty() {
            sqlx::query(reviews::UPSERT_REVIEWS)
                .bind(reviews::encode(&batch.reviews)?)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        tx.commit().await.map_err(db)?;
        Ok(stored_tokens)
    }
}

#[async_trait]
impl Store for PgStore {
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
        let digest = hex::encode(Sha256::digest(value.to_string().as_bytes()));
        let name = definition.name.as_str();

        let mut tx = self.pool.begin().await.map_err(db)?;
        sqlx::query(LOCK_NAME)
            .bind(org.0)
            .bind(name)
            .bind(PIPELINE_NAME_LOCK_SEED)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        let existing: Option<(i64, i64)> = sqlx::query_as(
            "SELECT version, created_at FROM pipelines
             WHERE org_id = $1 AND name = $2 AND digest = $3",
        )
        .bind(org.0)
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
                     SELECT $1, $2, COALESCE(MAX(version), 0) + 1, $3, $4, $5
                     FROM pipelines WHERE org_id = $1 AND name = $2
                     RETURNING version",
                )
                .bind(org.0)
                .bind(name)
                .bind(&digest)
                .bind(Json(&value))
                .bind(created_at)
                .fetch_one(&mut *tx)
                .await
                .map_err(db)?;
                (version, created_at)
            }
        };
        let archived_at: Option<i64> = sqlx::query_scalar(
            "SELECT archived_at FROM pipeline_archive WHERE org_id = $1 AND name = $2",
        )
        .bind(org.0)
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
            created_at: Timestamp(created_at),
            archived_at: archived_at.map(Timestamp),
        })
    }

    async fn pipeline(
        &self,
        org: OrgId,
        name: &str,
        version: u32,
    ) -> StoreResult<Option<StoredPipeline>> {
        let row = sqlx::query(&format!(
            "{PIPELINE_SELECT} WHERE p.org_id = $1 AND p.name = $2 AND p.version = $3"
        ))
        .bind(org.0)
        .bind(name)
        .bind(i64::from(version))
        .fetch_optional(&self.pool)
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
            "{PIPELINE_SELECT} WHERE p.org_id = $1{archived}
               AND p.version = (SELECT MAX(version) FROM pipelines
                                WHERE org_id = p.org_id AND name = p.name)
             ORDER BY p.name"
        ))
        .bind(org.0)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        cpu_work(rows.len(), || rows.iter().map(pipeline_from_row).collect())
    }

    async fn pipeline_versions(&self, org: OrgId, name: &str) -> StoreResult<Vec<StoredPipeline>> {
        let rows = sqlx::query(&format!(
            "{PIPELINE_SELECT} WHERE p.org_id = $1 AND p.name = $2 ORDER BY p.version DESC"
        ))
        .bind(org.0)
        .bind(name)
        .fetch_all(&self.pool)
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
        let mut tx = self.pool.begin().await.map_err(db)?;
        let exists: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM pipelines WHERE org_id = $1 AND name = $2 LIMIT 1")
                .bind(org.0)
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
                    "INSERT INTO pipeline_archive (org_id, name, archived_at) VALUES ($1, $2, $3)
                     ON CONFLICT (org_id, name) DO NOTHING",
                )
                .bind(org.0)
                .bind(name)
                .bind(at.as_micros())
                .execute(&mut *tx)
                .await
                .map_err(db)?;
            }
            None => {
                sqlx::query("DELETE FROM pipeline_archive WHERE org_id = $1 AND name = $2")
                    .bind(org.0)
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
        let rows = batch.runs.len() + batch.task_runs.len() + batch.attempts.len();
        let encoded = cpu_work(rows, || encode_batch(batch))?;

        let stored_tokens = if fits_one_statement(batch) {
            self.commit_in_one_statement(batch, &encoded).await?
        } else {
            self.commit_in_statements(batch, &encoded).await?
        };
        Ok(stale_report(batch, &stored_tokens))
    }

    async fn run(&self, id: RunId) -> StoreResult<Option<RunRecord>> {
        let row = sqlx::query(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = $1"))
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        row.as_ref().map(run_from_row).transpose()
    }

    async fn runs(&self, filter: &RunFilter) -> StoreResult<Vec<RunRecord>> {
        // Built per filter rather than with `$n IS NULL OR …`, so that the planner sees only
        // the conditions actually given.
        let mut query =
            QueryBuilder::<Postgres>::new(format!("SELECT {RUN_COLUMNS} FROM runs WHERE true"));
        if let Some(org) = filter.org_id {
            query.push(" AND org_id = ").push_bind(org.0);
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
            query.push(" AND id < ").push_bind(before.0);
        }
        query
            .push(" ORDER BY id DESC LIMIT ")
            .push_bind(clamp_limit(
                filter.limit,
                LIST_LIMIT_DEFAULT,
                LIST_LIMIT_MAX,
            ));
        let rows = query.build().fetch_all(&self.pool).await.map_err(db)?;
        cpu_work(rows.len(), || rows.iter().map(run_from_row).collect())
    }

    async fn task_runs(&self, run_id: RunId) -> StoreResult<Vec<TaskRunRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {TASK_RUN_COLUMNS} FROM task_runs WHERE run_id = $1 ORDER BY created_at, id"
        ))
        .bind(run_id.0)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        cpu_work(rows.len(), || rows.iter().map(task_run_from_row).collect())
    }

    async fn attempts(&self, run_id: RunId) -> StoreResult<Vec<AttemptRecord>> {
        let rows = sqlx::query(
            "SELECT task_run_id, attempt, run_id, fencing_token, worker, state, started_at,
                    finished_at, error
             FROM attempts WHERE run_id = $1 ORDER BY task_run_id, attempt",
        )
        .bind(run_id.0)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        cpu_work(rows.len(), || rows.iter().map(attempt_from_row).collect())
    }

    async fn append_logs(&self, lines: &[NewLogLine]) -> StoreResult<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let columns = LogColumns::new(lines);
        let mut tx = self.pool.begin().await.map_err(db)?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(LOG_APPEND_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        sqlx::query(INSERT_LOGS)
            .bind(&columns.run_id)
            .bind(&columns.task_run_id)
            .bind(&columns.attempt)
            .bind(&columns.stream)
            .bind(&columns.at)
            .bind(&columns.text)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(())
    }

    async fn logs(&self, query: &LogQuery) -> StoreResult<Vec<LogLine>> {
        let mut builder = QueryBuilder::<Postgres>::new(
            "SELECT seq, run_id, task_run_id, task_id, attempt, stream, at, text FROM logs \
             WHERE run_id = ",
        );
        builder.push_bind(query.run_id.0);
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
        let rows = builder.build().fetch_all(&self.pool).await.map_err(db)?;
        cpu_work(rows.len(), || rows.iter().map(log_from_row).collect())
    }

    async fn search_logs(&self, search: &LogSearch) -> StoreResult<Vec<LogHit>> {
        // The words are matched through `arches_log_words`, the expression of the GIN index
        // (migrations_pg/0006_log_search.sql). `phraseto_tsquery` takes any text without error.
        let mut builder = QueryBuilder::<Postgres>::new(
            "SELECT l.seq, l.run_id, l.task_run_id, l.task_id, l.attempt, l.stream, l.at, \
                    l.text, ts_rank(arches_log_words(l.text), ",
        );
        push_tsquery(&mut builder, &search.query);
        builder.push(
            ")::float8 AS score \
             FROM logs AS l JOIN runs AS r ON r.id = l.run_id \
             WHERE arches_log_words(l.text) @@ ",
        );
        push_tsquery(&mut builder, &search.query);
        builder.push(" AND r.org_id = ").push_bind(search.org_id.0);
        if let Some(run_id) = search.run_id {
            builder.push(" AND l.run_id = ").push_bind(run_id.0);
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
            .push(" ORDER BY score DESC, l.seq DESC LIMIT ")
            .push_bind(clamp_limit(
                search.limit,
                LOG_SEARCH_LIMIT_DEFAULT,
                LOG_SEARCH_LIMIT_MAX,
            ));
        let rows = builder.build().fetch_all(&self.pool).await.map_err(db)?;
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
        let producer = meta.produced_by.as_ref();

        let mut tx = self.pool.begin().await.map_err(db)?;
        sqlx::query(LOCK_NAME)
            .bind(meta.org_id.0)
            .bind(&meta.name)
            .bind(ARTIFACT_NAME_LOCK_SEED)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        let version: i64 = sqlx::query_scalar(
            "INSERT INTO artifacts (id, org_id, name, version, digest, size_bytes, media_type,
                                    table_meta, run_id, task_run_id, task_id, attempt, inputs,
                                    created_at)
             SELECT $1, $13, $2, COALESCE(MAX(version), 0) + 1, $3, $4, $5, $6, $7, $8, $9, $10,
                    $11, $12
             FROM artifacts WHERE org_id = $13 AND name = $2
             RETURNING version",
        )
        .bind(id.0)
        .bind(&meta.name)
        .bind(digest)
        .bind(size)
        .bind(&meta.media_type)
        .bind(meta.table.as_ref().map(Json))
        .bind(producer.map(|p| p.run_id.0))
        .bind(producer.map(|p| p.task_run_id.0))
        .bind(producer.map(|p| p.task_id.as_str()))
        .bind(producer.map(|p| i64::from(p.attempt)))
        .bind(Json(&meta.inputs))
        .bind(created_at.as_micros())
        .bind(meta.org_id.0)
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
            "SELECT {ARTIFACT_COLUMNS} FROM artifacts WHERE id = $1"
        ))
        .bind(id.0)
        .fetch_optional(&self.pool)
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
        let mut query = QueryBuilder::<Postgres>::new(format!(
            "SELECT {ARTIFACT_COLUMNS} FROM artifacts WHERE org_id = "
        ));
        query.push_bind(org.0);
        query.push(" AND name = ").push_bind(name.to_owned());
        match version {
            Some(version) => {
                query.push(" AND version = ").push_bind(i64::from(version));
            }
            None => {
                query.push(" ORDER BY version DESC LIMIT 1");
            }
        }
        let row = query.build().fetch_optional(&self.pool).await.map_err(db)?;
        row.as_ref().map(artifact_from_row).transpose()
    }

    async fn artifacts(&self, filter: &ArtifactFilter) -> StoreResult<Vec<ArtifactRecord>> {
        let mut query = QueryBuilder::<Postgres>::new(format!(
            "SELECT {ARTIFACT_COLUMNS} FROM artifacts WHERE true"
        ));
        if let Some(org) = filter.org_id {
            query.push(" AND org_id = ").push_bind(org.0);
        }
        if let Some(name) = &filter.name {
            query.push(" AND name = ").push_bind(name.clone());
        }
        if let Some(run_id) = filter.run_id {
            query.push(" AND run_id = ").push_bind(run_id.0);
        }
        query
            .push(" ORDER BY id DESC LIMIT ")
            .push_bind(clamp_limit(
                filter.limit,
                LIST_LIMIT_DEFAULT,
                LIST_LIMIT_MAX,
            ));
        let rows = query.build().fetch_all(&self.pool).await.map_err(db)?;
        cpu_work(rows.len(), || rows.iter().map(artifact_from_row).collect())
    }

    async fn state_counts(&self) -> StoreResult<StateCounts> {
        async fn count<T: FromStr>(pool: &PgPool, table: &str) -> StoreResult<Vec<(T, u64)>>
        where
            T::Err: std::fmt::Display,
        {
            // Ordered by bytes, as SQLite orders text, whatever the database's collation.
            let rows = sqlx::query_as(&format!(
                "SELECT state, COUNT(*) FROM {table} GROUP BY state ORDER BY state COLLATE \"C\""
            ))
            .fetch_all(pool)
            .await
            .map_err(db)?;
            state_counts(rows, table)
        }
        Ok(StateCounts {
            runs: count(&self.pool, "runs").await?,
            task_runs: count(&self.pool, "task_runs").await?,
            attempts: count(&self.pool, "attempts").await?,
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
    use arches_core::ids::TaskId;

    fn write(id: TaskRunId, fencing_token: u64) -> TaskRunRecord {
        let mut record = TaskRunRecord::pending(
            RunId::new(),
            TaskId::parse("extract").unwrap(),
            None,
            None,
            Timestamp(0),
        );
        record.id = id;
        record.fencing_token = fencing_token;
        record
    }

    #[test]
    fn the_surviving_write_of_a_task_run_is_its_last_one_not_below_an_earlier_token() {
        let (a, b) = (TaskRunId::new(), TaskRunId::new());
        let writes = [
            write(a, 1),
            write(b, 0),
            write(a, 5),
            write(a, 2),
            write(b, 0),
        ];
        let chosen = surviving_task_run_writes(&writes);
        assert_eq!(chosen.len(), 2);
        assert!(std::ptr::eq(chosen[0], &writes[2]));
        assert!(std::ptr::eq(chosen[1], &writes[4]));
    }

    #[test]
    fn shifted_parameters_keep_their_order_and_everything_else() {
        assert_eq!(
            shift_parameters("a = $1 AND b = ANY($12::uuid[]) AND c = '$'", 41),
            "a = $42 AND b = ANY($53::uuid[]) AND c = '$'"
        );
    }

    #[test]
    fn the_last_write_of_each_key_wins_in_first_appearance_order() {
        let writes = [(1, "a"), (2, "b"), (1, "c")];
        let chosen = last_write_per_key(&writes, |w| w.0);
        assert_eq!(chosen, [&(1, "c"), &(2, "b")]);
    }
}
