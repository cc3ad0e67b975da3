//! The validation queue on SQLite: listings, claims, notice decisions and feedback. Items
//! are written by the commit script ([`UPSERT_REVIEWS`]).

use arches_core::ids::{OrgId, ReviewId, TaskId};
use arches_core::ports::StoreResult;
use arches_core::records::{ClaimOutcome, ReviewFilter};
use arches_core::review::{FeedbackPoint, ReviewItem};
use arches_core::Timestamp;
use sqlx::{QueryBuilder, Row, Sqlite};

use super::{clamp_limit, SqliteStore};
use crate::error::db;
use crate::reviews::{
    decode_review, encode_reviews, feedback_point, refusal, REVIEW_LIMIT_DEFAULT, REVIEW_LIMIT_MAX,
};

/// Inserts the batch's items, or updates those still open (a decided item is never
/// overwritten); claims are left as stored. One parameter: [`encode_reviews`]'s array.
pub(super) const UPSERT_REVIEWS: &str = "
INSERT INTO review_items (id, org_id, run_id, task_run_id, pipeline_name, task_id, tool, kind,
                          state, confidence, feedback, weight, created_at, decided_at, body)
WITH batch (key, r) AS MATERIALIZED (SELECT key, jsonb(value) FROM json_each(?))
SELECT r ->> '$.id', r ->> '$.org_id', r ->> '$.run_id', r ->> '$.task_run_id',
       r ->> '$.pipeline_name', r ->> '$.task_id', r ->> '$.tool', r ->> '$.kind',
       r ->> '$.state', r ->> '$.confidence', r ->> '$.feedback', r ->> '$.weight',
       r ->> '$.created_at', r ->> '$.decided_at', json(r -> '$.body')
FROM batch WHERE true ORDER BY key
ON CONFLICT (id) DO UPDATE SET
    state = excluded.state,
    feedback = excluded.feedback,
    decided_at = excluded.decided_at,
    body = excluded.body
WHERE review_items.state = 'open'";

pub(super) fn encode(items: &[ReviewItem]) -> StoreResult<String> {
    encode_reviews(items)
}

const COLUMNS: &str = "body, claimed_by, claim_expires_at";

fn from_row(row: &sqlx::sqlite::SqliteRow) -> StoreResult<ReviewItem> {
    let body: String = row.try_get(0).map_err(db)?;
    decode_review(
        &body,
        row.try_get(1).map_err(db)?,
        row.try_get(2).map_err(db)?,
    )
}

impl SqliteStore {
    pub(crate) async fn review_items_impl(
        &self,
        filter: &ReviewFilter,
    ) -> StoreResult<Vec<ReviewItem>> {
        let mut query =
            QueryBuilder::<Sqlite>::new(format!("SELECT {COLUMNS} FROM review_items WHERE true"));
        if let Some(org) = filter.org_id {
            query.push(" AND org_id = ").push_bind(org.to_string());
        }
        if let Some(run) = filter.run_id {
            query.push(" AND run_id = ").push_bind(run.to_string());
        }
        if let Some(state) = filter.state {
            query.push(" AND state = ").push_bind(state.as_str());
        }
        if let Some(kind) = filter.kind {
            query.push(" AND kind = ").push_bind(kind.as_str());
        }
        if let Some(name) = &filter.pipeline_name {
            query.push(" AND pipeline_name = ").push_bind(name.clone());
        }
        if let Some(task) = &filter.task_id {
            query.push(" AND task_id = ").push_bind(task.clone());
        }
        if let Some(tool) = &filter.tool {
            query.push(" AND tool = ").push_bind(tool.clone());
        }
        if let Some(min) = filter.min_confidence {
            query.push(" AND confidence >= ").push_bind(min);
        }
        if let Some(max) = filter.max_confidence {
            query.push(" AND confidence < ").push_bind(max);
        }
        if let Some(before) = filter.created_before {
            query
                .push(" AND created_at < ")
                .push_bind(before.as_micros());
        }
        if let Some(after) = filter.after {
            query.push(" AND id > ").push_bind(after.to_string());
        }
        query.push(" ORDER BY id LIMIT ").push_bind(clamp_limit(
            filter.limit,
            REVIEW_LIMIT_DEFAULT,
            REVIEW_LIMIT_MAX,
        ));
        let rows = query.build().fetch_all(&self.reader).await.map_err(db)?;
        rows.iter().map(from_row).collect()
    }

    pub(crate) async fn review_item_impl(&self, id: ReviewId) -> StoreResult<Option<ReviewItem>> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM review_items WHERE id = ?1"))
            .bind(id.to_string())
            .fetch_optional(&self.reader)
            .await
            .map_err(db)?;
        row.as_ref().map(from_row).transpose()
    }

    pub(crate) async fn claim_review_impl(
        &self,
        id: ReviewId,
        reviewer: &str,
        until: Timestamp,
        now: Timestamp,
    ) -> StoreResult<ClaimOutcome> {
        let claimed = {
            let mut writer = self.writer().await?;
            sqlx::query(&format!(
                "UPDATE review_items SET claimed_by = ?2, claim_expires_at = ?3
                 WHERE id = ?1 AND state = 'open'
                   AND (claimed_by IS NULL OR claimed_by = ?2 OR claim_expires_at <= ?4)
                 RETURNING {COLUMNS}"
            ))
            .bind(id.to_string())
            .bind(reviewer)
            .bind(until.as_micros())
            .bind(now.as_micros())
            .fetch_optional(&mut writer.connection)
            .await
            .map_err(db)?
        };
        if let Some(row) = claimed {
            return Ok(ClaimOutcome::Claimed(Box::new(from_row(&row)?)));
        }
        Ok(refusal(self.review_item_impl(id).await?))
    }

    pub(crate) async fn decide_notice_impl(
        &self,
        item: &ReviewItem,
        reviewer: &str,
        now: Timestamp,
    ) -> StoreResult<bool> {
        let rows = encode(std::slice::from_ref(item))?;
        let mut writer = self.writer().await?;
        let done = sqlx::query(
            "WITH r (v) AS (SELECT jsonb(value) FROM json_each(?1))
             UPDATE review_items SET
                 state = (SELECT v ->> '$.state' FROM r),
                 feedback = (SELECT v ->> '$.feedback' FROM r),
                 decided_at = (SELECT v ->> '$.decided_at' FROM r),
                 body = (SELECT json(v -> '$.body') FROM r)
             WHERE id = ?2 AND state = 'open' AND kind = 'notice'
               AND (claimed_by IS NULL OR claimed_by = ?3 OR claim_expires_at <= ?4)",
        )
        .bind(rows)
        .bind(item.id.to_string())
        .bind(reviewer)
        .bind(now.as_micros())
        .execute(&mut writer.connection)
        .await
        .map_err(db)?;
        Ok(done.rows_affected() == 1)
    }

    pub(crate) async fn review_feedback_impl(
        &self,
        org: OrgId,
        pipeline: &str,
        task: &TaskId,
        limit: usize,
    ) -> StoreResult<Vec<FeedbackPoint>> {
        let rows: Vec<(Option<f64>, i64, f64)> = sqlx::query_as(
            "SELECT confidence, feedback, weight FROM review_items
             WHERE org_id = ?1 AND pipeline_name = ?2 AND task_id = ?3 AND feedback IS NOT NULL
             ORDER BY decided_at DESC LIMIT ?4",
        )
        .bind(org.to_string())
        .bind(pipeline)
        .bind(task.as_str())
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.reader)
        .await
        .map_err(db)?;
        Ok(rows
            .into_iter()
            .filter_map(|(c, f, w)| feedback_point(c, f, w))
            .collect())
    }
}
