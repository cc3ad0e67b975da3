//! The shared task queue on PostgreSQL ([`TaskQueue`]): offers written in the scheduler's
//! commit, claims taken in one statement (`UPDATE … WHERE task_run_id IN (SELECT … FOR
//! UPDATE SKIP LOCKED LIMIT n) RETURNING …`), completions stored and announced in one
//! statement, and wake-ups by `LISTEN`/`NOTIFY`.
//!
//! No transaction is held open while a task runs: a claim is one autocommitted statement,
//! and the claim's token (`claim`) is what later renewals and the completion are checked
//! against.
//!
//! # Relaxed commits of the workers' statements
//!
//! Under [`Durability::Normal`], the statements of the workers and of the completion feeder
//! (claims, renewals, reports, takes) commit with `synchronous_commit = off`, set for their
//! own transaction only (`set_config(…, true)` inside the statement, so it costs no round
//! trip): they return once their WAL is written to the server's buffers, without waiting
//! for its flush to disk, which costs a disk sync each (milliseconds on a virtual disk) and
//! was most of a task's overhead. The scheduler's commit, which records completions and
//! leases and answers callers, keeps the session's setting (synchronous), and so does every
//! other statement. Why a database crash that loses the last relaxed commits is harmless:
//!
//! - PostgreSQL applies WAL in one order and a synchronous commit flushes all WAL before its
//!   own record, so what survives a crash is a prefix: a relaxed commit is lost only if no
//!   synchronous commit after it was acknowledged, and never half-applied.
//! - The scheduler records a completion only in its own (synchronous) commit, and only after
//!   it read the stored report: that commit comes after the report in WAL order, so a
//!   recorded completion's report is never lost. What a user or caller was told stays.
//! - A lost claim, renewal or report leaves the offer as it was before it: unclaimed (any
//!   worker claims it again), or claimed with an earlier claim token or expiry (it expires
//!   and is taken over). The worker that ran it either loses its next renewal (its claim
//!   token no longer matches, so it stops) or has already reported and forgotten it. Either
//!   way the task may run again — at-least-once execution, as after a worker's crash — and
//!   its completion is still fenced by the claim token the store holds, so at most one
//!   report per lease is stored and applied.
//! - A lost take only leaves completions marked untaken, as a restarted feeder makes them
//!   anyway. A completion the scheduler took and applies after the crash although its row
//!   was lost is the report of the lease it holds, so applying it is right; the commit that
//!   applies it deletes completions by sequence number *and* task run, because a sequence
//!   number handed out by a lost transaction may be handed out again after the crash.
//!
//! Under [`Durability::Full`] every statement commits synchronously.

use std::time::Duration;

use arches_core::execution::{Assignment, AttemptOutcome};
use arches_core::ids::{RunId, TaskRunId};
use arches_core::ports::{QueueListener, QueueTopic, StoreError, StoreResult, TaskQueue};
use arches_core::records::{
    ClaimBatch, ClaimedTask, Durability, QueuedCompletion, TaskCompletion, TaskOffer, WriteBatch,
};
use arches_core::time::Timestamp;
use async_trait::async_trait;
use sqlx::postgres::{PgListener, PgRow};
use sqlx::types::Json;
use sqlx::{Postgres, Row, Transaction};
use uuid::Uuid;

use super::rows::token;
use super::PgStore;
use crate::error::db;

/// The channel that announces new (or handed-back) offers; the payload is empty.
pub const OFFERS_CHANNEL: &str = "arches_offers";

/// The channel that announces stored completions; the payload is the owner's name.
pub const COMPLETIONS_CHANNEL: &str = "arches_completions";

/// Most offers one claim takes, whatever the caller asks.
pub const CLAIM_LIMIT_MAX: usize = 1_000;

/// Most completions one take returns, whatever the caller asks.
pub const TAKE_LIMIT_MAX: usize = 10_000;

/// Sets `synchronous_commit` for the statement's own transaction to its parameter, or keeps
/// the session's setting when that is null: placed in a row every relaxed statement returns,
/// so it is evaluated before the statement's implicit commit. See the module documentation.
macro_rules! relaxed_commit {
    ($param:literal) => {
        concat!(
            "set_config('synchronous_commit', COALESCE(",
            $param,
            "::text, current_setting('synchronous_commit')), true)"
        )
    };
}

impl PgStore {
    /// The `synchronous_commit` of a relaxed queue statement (see the module documentation):
    /// `off` under [`Durability::Normal`]; `None`, the session's setting, under `Full`.
    fn relaxed_commit(&self) -> Option<&'static str> {
        match self.durability {
            Durability::Normal => Some("off"),
            Durability::Full => None,
        }
    }
}

/// Inserts offers (`$1`–`$8`, one array per column) for task runs stored with the offer's
/// token (the statement that writes them must come before, or the join names the rows it
/// wrote instead of `task_runs`), unless that token's completion is stored and not among
/// those applied with it (`$9` sequence numbers, `$10` their task runs). A higher token
/// replaces a stored offer and voids its claim; the same token only re-addresses it.
pub(super) const INSERT_OFFERS: &str = "INSERT INTO task_queue (task_run_id, run_id, org_id, fencing_token, owner, \
                 worker_tags, assignment, offered_at) \
             SELECT o.task_run_id, o.run_id, o.org_id, o.fencing_token, o.owner, \
                 CASE WHEN o.tags = '' THEN '{}'::text[] ELSE string_to_array(o.tags, chr(31)) END, \
                 o.assignment, o.offered_at \
             FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::bigint[], $5::text[], \
                 $6::text[], $7::jsonb[], $8::bigint[]) \
                 AS o(task_run_id, run_id, org_id, fencing_token, owner, tags, assignment, offered_at) \
             JOIN task_runs t ON t.id = o.task_run_id AND t.fencing_token = o.fencing_token \
             WHERE NOT EXISTS (SELECT 1 FROM task_completions c \
                 WHERE c.task_run_id = o.task_run_id AND c.fencing_token = o.fencing_token \
                     AND NOT EXISTS (SELECT 1 FROM UNNEST($9::bigint[], $10::uuid[]) \
                         AS d(seq, task_run_id) \
                         WHERE d.seq = c.seq AND d.task_run_id = c.task_run_id)) \
             ON CONFLICT (task_run_id) DO UPDATE SET \
                 owner = EXCLUDED.owner, \
                 fencing_token = EXCLUDED.fencing_token, \
                 worker_tags = EXCLUDED.worker_tags, assignment = EXCLUDED.assignment, \
                 offered_at = CASE WHEN task_queue.fencing_token < EXCLUDED.fencing_token \
                     THEN EXCLUDED.offered_at ELSE task_queue.offered_at END, \
                 claimed_by = CASE WHEN task_queue.fencing_token < EXCLUDED.fencing_token \
                     THEN NULL ELSE task_queue.claimed_by END, \
                 claim = CASE WHEN task_queue.fencing_token < EXCLUDED.fencing_token \
                     THEN task_queue.claim + 1 ELSE task_queue.claim END, \
                 claim_expires_at = CASE WHEN task_queue.fencing_token < EXCLUDED.fencing_token \
                     THEN NULL ELSE task_queue.claim_expires_at END, \
                 expiries = CASE WHEN task_queue.fencing_token < EXCLUDED.fencing_token \
                     THEN 0 ELSE task_queue.expiries END \
             WHERE task_queue.fencing_token <= EXCLUDED.fencing_token";

/// Deletes the completions a commit applies: `$1` sequence numbers, `$2` their task runs.
pub(super) const DELETE_APPLIED_COMPLETIONS: &str = "DELETE FROM task_completions c \
     USING UNNEST($1::bigint[], $2::uuid[]) AS d(seq, task_run_id) \
     WHERE c.seq = d.seq AND c.task_run_id = d.task_run_id";

/// Deletes withdrawn offers: `$1` their task runs.
pub(super) const DELETE_WITHDRAWN: &str =
    "DELETE FROM task_queue WHERE task_run_id = ANY($1::uuid[])";

/// The batch's offers, one array per column of the offer insert.
#[derive(Default)]
pub(super) struct OfferColumns<'a> {
    pub task_run_id: Vec<Uuid>,
    pub run_id: Vec<Uuid>,
    pub org_id: Vec<Uuid>,
    pub fencing_token: Vec<i64>,
    pub owner: Vec<&'a str>,
    /// Each offer's tags joined by the unit separator (U+001F): arrays of arrays do not
    /// UNNEST into rows.
    pub tags: Vec<String>,
    pub assignment: Vec<serde_json::Value>,
    pub offered_at: Vec<i64>,
}

impl<'a> OfferColumns<'a> {
    pub(super) fn new(offers: &'a [TaskOffer]) -> StoreResult<Self> {
        let mut columns = OfferColumns::default();
        for offer in offers {
            let a = &offer.assignment;
            columns.task_run_id.push(a.task_run_id.0);
            columns.run_id.push(a.run_id.0);
            columns.org_id.push(a.org_id.0);
            columns.fencing_token.push(token(a.fencing_token)?);
            columns.owner.push(&offer.owner);
            columns.tags.push(offer.worker_tags.join("\u{1f}"));
            columns
                .assignment
                .push(serde_json::to_value(a).map_err(|e| {
                    StoreError::Backend(format!(
                        "cannot encode the offer of {}: {e}",
                        a.task_run_id
                    ))
                })?);
            columns.offered_at.push(offer.offered_at.as_micros());
        }
        Ok(columns)
    }
}

/// Inserts the batch's offers (only for task runs stored with the offer's token, and not
/// when that token's completion is already stored; a stored offer is replaced by a higher
/// token, which voids its claim, and takes the owner of an offer with the same token, which
/// keeps its claim), hands the stored completions of those task runs to the new owner,
/// deletes withdrawn offers and applied completions, and notifies waiting workers. Runs
/// inside the commit's transaction.
pub(super) async fn write_queue_parts(
    tx: &mut Transaction<'_, Postgres>,
    batch: &WriteBatch,
) -> StoreResult<()> {
    let done_seqs: Vec<i64> = batch.completions_done.iter().map(|c| c.seq).collect();
    let done_task_runs: Vec<Uuid> = batch
        .completions_done
        .iter()
        .map(|c| c.task_run_id.0)
        .collect();
    if !batch.offers.is_empty() {
        let offers = OfferColumns::new(&batch.offers)?;
        let task_run_ids = &offers.task_run_id;
        if batch.offers.iter().any(|o| o.resumed) {
            // Offers made again wait for a worker's report of the same lease being stored
            // right now; the INSERT below, a statement of its own, then sees it (under READ
            // COMMITTED each statement reads the data committed before it starts).
            sqlx::query("SELECT 1 FROM task_queue WHERE task_run_id = ANY($1) FOR UPDATE")
                .bind(task_run_ids)
                .execute(&mut **tx)
                .await
                .map_err(db)?;
        }
        sqlx::query(INSERT_OFFERS)
            .bind(&offers.task_run_id)
            .bind(&offers.run_id)
            .bind(&offers.org_id)
            .bind(&offers.fencing_token)
            .bind(&offers.owner)
            .bind(&offers.tags)
            .bind(&offers.assignment)
            .bind(&offers.offered_at)
            // A completion this same batch applies does not stand in for the offer.
            .bind(&done_seqs)
            .bind(&done_task_runs)
            .execute(&mut **tx)
            .await
            .map_err(db)?;
    }
    let resumed: Vec<&TaskOffer> = batch.offers.iter().filter(|o| o.resumed).collect();
    if !resumed.is_empty() {
        // A scheduler that offers again a lease another scheduler offered (a resume under a
        // new name) receives its stored completions too.
        let ids: Vec<Uuid> = resumed.iter().map(|o| o.assignment.task_run_id.0).collect();
        let owners: Vec<String> = resumed.iter().map(|o| o.owner.clone()).collect();
        sqlx::query(
            "WITH moved AS ( \
                 UPDATE task_completions c SET owner = o.owner, taken = false \
                 FROM UNNEST($1::uuid[], $2::text[]) AS o(task_run_id, owner) \
                 WHERE c.task_run_id = o.task_run_id AND c.owner <> o.owner \
                 RETURNING c.owner) \
             SELECT pg_notify($3, owner) FROM (SELECT DISTINCT owner FROM moved) AS m",
        )
        .bind(&ids)
        .bind(&owners)
        .bind(COMPLETIONS_CHANNEL)
        .execute(&mut **tx)
        .await
        .map_err(db)?;
    }
    if !batch.withdrawn.is_empty() {
        let ids: Vec<Uuid> = batch.withdrawn.iter().map(|id| id.0).collect();
        sqlx::query(DELETE_WITHDRAWN)
            .bind(&ids)
            .execute(&mut **tx)
            .await
            .map_err(db)?;
    }
    if !batch.completions_done.is_empty() {
        sqlx::query(DELETE_APPLIED_COMPLETIONS)
            .bind(&done_seqs)
            .bind(&done_task_runs)
            .execute(&mut **tx)
            .await
            .map_err(db)?;
    }
    if !batch.offers.is_empty() {
        // Delivered at commit, and only if the transaction commits.
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(OFFERS_CHANNEL)
            .execute(&mut **tx)
            .await
            .map_err(db)?;
    }
    Ok(())
}

fn decode_assignment(row: &PgRow) -> StoreResult<Assignment> {
    let Json(assignment): Json<Assignment> = row
        .try_get("assignment")
        .map_err(|e| StoreError::Corrupt(format!("a task-queue offer does not decode: {e}")))?;
    Ok(assignment)
}

fn claim_token(value: i64) -> StoreResult<u64> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt(format!("negative claim token {value}")))
}

fn pairs(claims: &[(TaskRunId, u64)]) -> StoreResult<(Vec<Uuid>, Vec<i64>)> {
    let mut ids = Vec::with_capacity(claims.len());
    let mut tokens = Vec::with_capacity(claims.len());
    for (id, claim) in claims {
        ids.push(id.0);
        tokens.push(token(*claim)?);
    }
    Ok((ids, tokens))
}

#[async_trait]
impl TaskQueue for PgStore {
    async fn claim(
        &self,
        worker: &str,
        tags: &[String],
        limit: usize,
        now: Timestamp,
        ttl: Duration,
    ) -> StoreResult<ClaimBatch> {
        let limit = limit.min(CLAIM_LIMIT_MAX);
        let expires = now.plus(ttl);
        // Expired claims of other workers first (their offers are the oldest), then
        // unclaimed offers by age, each through its own partial index; rows other workers are
        // claiming are skipped. An offer whose task run is no longer running under the
        // offer's token (cancelled, finished, or leased again by an engine that does not use
        // the queue) is never run: it is deleted when a claim reaches it.
        // The last row carries the next expiry (the CTE's SELECT sees the table as it was
        // before the UPDATE; live claims of others only, so an expired claim that does not
        // match this worker's tags never makes it wake at once, again and again).
        let rows = sqlx::query(concat!(
            "WITH expired AS ( \
                 SELECT q.task_run_id, (t.state = 'running' AND t.fencing_token = q.fencing_token) \
                     AS valid \
                 FROM task_queue q LEFT JOIN task_runs t ON t.id = q.task_run_id \
                 WHERE q.claimed_by IS NOT NULL AND q.claimed_by <> $1 \
                     AND q.claim_expires_at < $3 AND q.worker_tags <@ $4::text[] \
                 ORDER BY q.claim_expires_at LIMIT $5 FOR UPDATE OF q SKIP LOCKED), \
             fresh AS ( \
                 SELECT q.task_run_id, (t.state = 'running' AND t.fencing_token = q.fencing_token) \
                     AS valid \
                 FROM task_queue q LEFT JOIN task_runs t ON t.id = q.task_run_id \
                 WHERE q.claimed_by IS NULL AND q.worker_tags <@ $4::text[] \
                 ORDER BY q.offered_at, q.task_run_id LIMIT $5 FOR UPDATE OF q SKIP LOCKED), \
             picked AS ( \
                 SELECT task_run_id, valid FROM (SELECT task_run_id, valid FROM expired \
                     UNION ALL SELECT task_run_id, valid FROM fresh) AS p LIMIT $5), \
             stale AS ( \
                 DELETE FROM task_queue WHERE task_run_id IN \
                     (SELECT task_run_id FROM picked WHERE valid IS NOT TRUE) \
                 RETURNING task_run_id), \
             claimed AS ( \
                 UPDATE task_queue q SET claimed_by = $1, claim = q.claim + 1, \
                     claim_expires_at = $2, \
                     expiries = q.expiries + CASE WHEN q.claimed_by IS NULL THEN 0 ELSE 1 END \
                 WHERE q.task_run_id IN (SELECT task_run_id FROM picked WHERE valid) \
                 RETURNING q.claim, q.expiries, q.assignment) \
             SELECT claim, expiries, assignment, NULL::bigint AS next_expiry, \
                 NULL::text AS commit_mode FROM claimed \
             UNION ALL \
             SELECT NULL, NULL, NULL, (SELECT min(claim_expires_at) FROM task_queue \
                 WHERE claimed_by IS NOT NULL AND claimed_by <> $1 \
                     AND claim_expires_at >= $3 AND worker_tags <@ $4::text[]), \
                 ",
            relaxed_commit!("$6")
        ))
        .bind(worker)
        .bind(expires.as_micros())
        .bind(now.as_micros())
        .bind(tags)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .bind(self.relaxed_commit())
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        let mut batch = ClaimBatch::default();
        for row in &rows {
            let claim: Option<i64> = row.try_get("claim").map_err(db)?;
            match claim {
                Some(claim) => {
                    let expiries: Option<i64> = row.try_get("expiries").map_err(db)?;
                    batch.tasks.push(ClaimedTask {
                        assignment: decode_assignment(row)?,
                        claim: claim_token(claim)?,
                        expires_at: expires,
                        expiries: u32::try_from(expiries.unwrap_or(0)).unwrap_or(u32::MAX),
                    })
                }
                None => {
                    let next: Option<i64> = row.try_get("next_expiry").map_err(db)?;
                    batch.next_expiry = next.map(Timestamp);
                }
            }
        }
        Ok(batch)
    }

    async fn renew(
        &self,
        worker: &str,
        claims: &[(TaskRunId, u64)],
        now: Timestamp,
        ttl: Duration,
    ) -> StoreResult<Vec<TaskRunId>> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        let (ids, tokens) = pairs(claims)?;
        let (_, held): (String, Vec<Uuid>) = sqlx::query_as(concat!(
            "WITH renewed AS ( \
                 UPDATE task_queue q SET claim_expires_at = $1 \
                 FROM UNNEST($2::uuid[], $3::bigint[]) AS h(task_run_id, claim) \
                 WHERE q.task_run_id = h.task_run_id AND q.claim = h.claim \
                     AND q.claimed_by = $4 \
                 RETURNING q.task_run_id) \
             SELECT ",
            relaxed_commit!("$5"),
            ", ARRAY(SELECT task_run_id FROM renewed)"
        ))
        .bind(now.plus(ttl).as_micros())
        .bind(&ids)
        .bind(&tokens)
        .bind(worker)
        .bind(self.relaxed_commit())
        .fetch_one(&self.pool)
        .await
        .map_err(db)?;
        Ok(held.into_iter().map(TaskRunId).collect())
    }

    async fn complete(&self, completion: &TaskCompletion) -> StoreResult<bool> {
        let outcome = serde_json::to_value(&completion.outcome).map_err(|e| {
            StoreError::Backend(format!(
                "cannot encode the outcome of {}: {e}",
                completion.task_run_id
            ))
        })?;
        // One statement: the offer is deleted only if the claim is still this worker's, the
        // completion is stored only if it was, and the owner is woken in the same commit.
        let (_, stored): (String, i64) = sqlx::query_as(concat!(
            "WITH gone AS ( \
                 DELETE FROM task_queue WHERE task_run_id = $1 AND claim = $2 AND claimed_by = $3 \
                 RETURNING task_run_id, run_id, owner, fencing_token, claim), \
             stored AS ( \
                 INSERT INTO task_completions (task_run_id, run_id, owner, fencing_token, worker, \
                     claims, outcome, executed_at, finished_at) \
                 SELECT task_run_id, run_id, owner, fencing_token, $3, claim, $4, $5, $6 FROM gone \
                 RETURNING owner) \
             SELECT ",
            relaxed_commit!("$8"),
            ", (SELECT count(*) FROM stored, LATERAL (SELECT pg_notify($7, stored.owner)) AS n)"
        ))
        .bind(completion.task_run_id.0)
        .bind(token(completion.claim)?)
        .bind(&completion.worker)
        .bind(Json(outcome))
        .bind(completion.executed_at.as_micros())
        .bind(completion.finished_at.as_micros())
        .bind(COMPLETIONS_CHANNEL)
        .bind(self.relaxed_commit())
        .fetch_one(&self.pool)
        .await
        .map_err(db)?;
        Ok(stored > 0)
    }

    async fn complete_many(&self, completions: &[TaskCompletion]) -> StoreResult<Vec<bool>> {
        let Some(first) = completions.first() else {
            return Ok(Vec::new());
        };
        if completions.iter().any(|c| c.worker != first.worker) {
            return Err(StoreError::Conflict(
                "completions of one batch must come from one worker".into(),
            ));
        }
        let mut ids = Vec::with_capacity(completions.len());
        let mut claims = Vec::with_capacity(completions.len());
        let mut outcomes = Vec::with_capacity(completions.len());
        let mut executed = Vec::with_capacity(completions.len());
        let mut finished = Vec::with_capacity(completions.len());
        // A worker holds one claim per task run: a second report of one in the same batch
        // is not stored (it would store the lease's result twice).
        let mut seen = std::collections::HashSet::with_capacity(completions.len());
        let mut first_of = Vec::with_capacity(completions.len());
        for c in completions {
            first_of.push(seen.insert(c.task_run_id));
            if !first_of.last().copied().unwrap_or(false) {
                continue;
            }
            ids.push(c.task_run_id.0);
            claims.push(token(c.claim)?);
            outcomes.push(serde_json::to_value(&c.outcome).map_err(|e| {
                StoreError::Backend(format!(
                    "cannot encode the outcome of {}: {e}",
                    c.task_run_id
                ))
            })?);
            executed.push(c.executed_at.as_micros());
            finished.push(c.finished_at.as_micros());
        }
        // One statement: each offer is deleted only if its claim is still this worker's, a
        // completion stored only for those, and each owner woken once, in the same commit.
        let (_, stored, _): (String, Vec<Uuid>, i64) = sqlx::query_as(concat!(
            "WITH input AS ( \
                 SELECT * FROM UNNEST($1::uuid[], $2::bigint[], $3::jsonb[], $4::bigint[], \
                     $5::bigint[]) AS i(task_run_id, claim, outcome, executed_at, finished_at)), \
             gone AS ( \
                 DELETE FROM task_queue q USING input i \
                 WHERE q.task_run_id = i.task_run_id AND q.claim = i.claim \
                     AND q.claimed_by = $6 \
                 RETURNING q.task_run_id, q.run_id, q.owner, q.fencing_token, q.claim), \
             stored AS ( \
                 INSERT INTO task_completions (task_run_id, run_id, owner, fencing_token, \
                     worker, claims, outcome, executed_at, finished_at) \
                 SELECT g.task_run_id, g.run_id, g.owner, g.fencing_token, $6, g.claim, \
                     i.outcome, i.executed_at, i.finished_at \
                 FROM gone g JOIN input i ON i.task_run_id = g.task_run_id \
                 RETURNING task_run_id, owner), \
             woken AS ( \
                 SELECT pg_notify($7, owner) FROM (SELECT DISTINCT owner FROM stored) AS o) \
             SELECT ",
            relaxed_commit!("$8"),
            ", ARRAY(SELECT task_run_id FROM stored), (SELECT count(*) FROM woken)"
        ))
        .bind(&ids)
        .bind(&claims)
        .bind(&outcomes)
        .bind(&executed)
        .bind(&finished)
        .bind(&first.worker)
        .bind(COMPLETIONS_CHANNEL)
        .bind(self.relaxed_commit())
        .fetch_one(&self.pool)
        .await
        .map_err(db)?;
        let stored: std::collections::HashSet<Uuid> = stored.into_iter().collect();
        Ok(completions
            .iter()
            .zip(first_of)
            .map(|(c, first)| first && stored.contains(&c.task_run_id.0))
            .collect())
    }

    async fn release(&self, worker: &str, claims: &[(TaskRunId, u64)]) -> StoreResult<usize> {
        if claims.is_empty() {
            return Ok(0);
        }
        let (ids, tokens) = pairs(claims)?;
        let released: Option<i64> = sqlx::query_scalar(
            "WITH released AS ( \
                 UPDATE task_queue q SET claimed_by = NULL, claim = q.claim + 1, \
                     claim_expires_at = NULL \
                 FROM UNNEST($1::uuid[], $2::bigint[]) AS h(task_run_id, claim) \
                 WHERE q.task_run_id = h.task_run_id AND q.claim = h.claim AND q.claimed_by = $3 \
                 RETURNING q.task_run_id) \
             SELECT count(*) FROM released, LATERAL (SELECT pg_notify($4, '')) AS n",
        )
        .bind(&ids)
        .bind(&tokens)
        .bind(worker)
        .bind(OFFERS_CHANNEL)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        Ok(usize::try_from(released.unwrap_or(0)).unwrap_or(0))
    }

    async fn release_all(&self, worker: &str) -> StoreResult<usize> {
        let released: Option<i64> = sqlx::query_scalar(
            "WITH released AS ( \
                 UPDATE task_queue SET claimed_by = NULL, claim = claim + 1, \
                     claim_expires_at = NULL \
                 WHERE claimed_by = $1 RETURNING task_run_id) \
             SELECT count(*) FROM released, LATERAL (SELECT pg_notify($2, '')) AS n",
        )
        .bind(worker)
        .bind(OFFERS_CHANNEL)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        Ok(usize::try_from(released.unwrap_or(0)).unwrap_or(0))
    }

    async fn take_completions(
        &self,
        owner: &str,
        limit: usize,
    ) -> StoreResult<Vec<QueuedCompletion>> {
        let limit = limit.clamp(1, TAKE_LIMIT_MAX);
        // The last row only sets the commit's mode (its `seq` is null).
        let rows = sqlx::query(concat!(
            "WITH taken AS ( \
                 UPDATE task_completions c SET taken = true \
                 WHERE c.seq IN ( \
                     SELECT seq FROM task_completions WHERE owner = $1 AND NOT taken \
                     ORDER BY seq LIMIT $2 FOR UPDATE SKIP LOCKED) \
                 RETURNING c.seq, c.run_id, c.task_run_id, c.fencing_token, c.worker, c.claims, \
                     c.outcome, c.executed_at, c.finished_at) \
             SELECT seq, run_id, task_run_id, fencing_token, worker, claims, outcome, \
                 executed_at, finished_at, NULL::text AS commit_mode FROM taken \
             UNION ALL \
             SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, ",
            relaxed_commit!("$3")
        ))
        .bind(owner)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .bind(self.relaxed_commit())
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        let mut taken = Vec::with_capacity(rows.len());
        for row in &rows {
            let Some(seq): Option<i64> = row.try_get("seq").map_err(db)? else {
                continue;
            };
            let Json(outcome): Json<AttemptOutcome> = row.try_get("outcome").map_err(|e| {
                StoreError::Corrupt(format!(
                    "completion {seq}: the outcome does not decode: {e}"
                ))
            })?;
            taken.push(QueuedCompletion {
                seq,
                run_id: RunId(row.try_get("run_id").map_err(db)?),
                task_run_id: TaskRunId(row.try_get("task_run_id").map_err(db)?),
                fencing_token: claim_token(row.try_get("fencing_token").map_err(db)?)?,
                worker: row.try_get("worker").map_err(db)?,
                claims: claim_token(row.try_get("claims").map_err(db)?)?,
                outcome,
                executed_at: Timestamp(row.try_get("executed_at").map_err(db)?),
                finished_at: Timestamp(row.try_get("finished_at").map_err(db)?),
            });
        }
        taken.sort_by_key(|c| c.seq);
        Ok(taken)
    }

    async fn untake_completions(&self, owner: &str) -> StoreResult<u64> {
        let done =
            sqlx::query("UPDATE task_completions SET taken = false WHERE owner = $1 AND taken")
                .bind(owner)
                .execute(&self.pool)
                .await
                .map_err(db)?;
        Ok(done.rows_affected())
    }

    async fn listen(&self, topic: QueueTopic) -> StoreResult<Box<dyn QueueListener>> {
        let mut listener = PgListener::connect_with(&self.pool).await.map_err(db)?;
        let (channel, owner) = match topic {
            QueueTopic::Offers => (OFFERS_CHANNEL, None),
            QueueTopic::Completions(owner) => (COMPLETIONS_CHANNEL, Some(owner)),
        };
        listener.listen(channel).await.map_err(db)?;
        Ok(Box::new(PgQueueListener { listener, owner }))
    }
}

/// A scheduler's hold on its name: a session advisory lock on a connection of its own,
/// released when this is dropped (or the process dies, which closes the connection).
pub struct SchedulerNameLock {
    _connection: sqlx::PgConnection,
}

impl std::fmt::Debug for SchedulerNameLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchedulerNameLock").finish_non_exhaustive()
    }
}

/// Seed of `hashtextextended` for scheduler names (apart from the name locks of the store).
const SCHEDULER_NAME_LOCK_SEED: i64 = 4;

impl PgStore {
    /// Takes the name `owner` for a scheduler on the task queue, for as long as the returned
    /// lock lives: two schedulers under one name would take each other's completions.
    ///
    /// # Errors
    /// [`StoreError::Conflict`] when another process holds the name;
    /// [`StoreError::Unavailable`] when the store cannot be reached.
    pub async fn lock_scheduler_name(&self, owner: &str) -> StoreResult<SchedulerNameLock> {
        let mut connection = self.pool.acquire().await.map_err(db)?.detach();
        let taken: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, $2))")
                .bind(owner)
                .bind(SCHEDULER_NAME_LOCK_SEED)
                .fetch_one(&mut connection)
                .await
                .map_err(db)?;
        if !taken {
            return Err(StoreError::Conflict(format!(
                "another scheduler named {owner:?} is running on this database; give each \
                 server replica its own workers.scheduler_id"
            )));
        }
        Ok(SchedulerNameLock {
            _connection: connection,
        })
    }
}

/// A `LISTEN` on one channel, on a connection of its own (reconnected by sqlx after a loss).
struct PgQueueListener {
    listener: PgListener,
    /// For completions: only this owner's wake-ups count.
    owner: Option<String>,
}

#[async_trait]
impl QueueListener for PgQueueListener {
    async fn next(&mut self) -> StoreResult<()> {
        loop {
            // `try_recv` answers `None` once when the connection was lost (and reconnects on
            // the next call): notifications may have been missed, so that is a wake-up too.
            match self.listener.try_recv().await {
                Ok(None) => return Ok(()),
                Ok(Some(notification)) => match &self.owner {
                    Some(owner) if notification.payload() != owner => continue,
                    _ => return Ok(()),
                },
                Err(error) => {
                    return Err(match db(error) {
                        StoreError::Unavailable(message) => StoreError::Unavailable(message),
                        other => StoreError::Unavailable(other.to_string()),
                    })
                }
            }
        }
    }
}
