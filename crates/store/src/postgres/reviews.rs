//! The validation queue on PostgreSQL: listings, claims, notice decisions and feedback.
//! Items are written by the commit ([`UPSERT_REVIEWS`]).

use arches_core::ids::{OrgId, ReviewId, TaskId};
use arches_core::ports::StoreResult;
use arches_core::records::{ClaimOutcome, ReviewFilter};
use arches_core::review::{FeedbackPoint, ReviewItem};
use arches_core::Timestamp;
use sqlx::postgres::PgRow;
use sqlx::{Postgres, QueryBuilder, Row};

use super::PgStore;
use crate::error::db;
use crate::reviews::{
    decode_review, encode_reviews, feedback_point, refusal, REVIEW_LIMIT_DEFAULT, REVIEW_LIMIT_MAX,
};

/// Inserts the batch's items, or updates those still open (a decided item is never
/// overwritten); claims are left as stored. `$1`: [`encode_reviews`]'s array.
pub(super) const UPSERT_REVIEWS: &str = "
INSERT INTO review_items (id, org_id, run_id, task_run_id, pipeline_name, task_id, tool, kind,
                          state, confidence, feedback, weight, created_at, decided_at, body)
SELECT (r ->> 'id')::uuid, (r ->> 'org_id')::uuid, (r ->> 'run_id')::uuid,
       (r ->> 'task_run_id')::uuid, r ->> 'pipeline_name', r ->> 'task_id', r ->> 'tool',
       r ->> 'kind', r ->> 'state', (r ->> 'confidence')::float8, (r ->> 'feedback')::smallint,
       (r ->> 'weight')::float8, (r ->> 'created_at')::bigint, (r ->> 'decided_at')::bigint,
       r -> 'body'
FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS b (r, n)
ORDER BY n
ON CONFLICT (id) DO UPDATE SET
    state = excluded.state,
    feedback = excluded.feedback,
    decided_at = excluded.decided_at,
    body = excluded.body
WHERE review_items.state = 'open'";

pub(super) fn encode(items: &[ReviewItem]) -> StoreResult<String> {
    encode_reviews(items)
}

const COLUMNS: &str = "body::text, claimed_by, claim_expires_at";

fn from_row(row: &PgRow) -> StoreResult<ReviewItem> {
    let body: String = row.try_get(0).map_err(db)?;
    decode_review(
        &body,
        row.try_get(1).map_err(db)?,
        row.try_get(2).map_err(db)?,
    )
}

fn clamp(limit: u32) -> i64 {
    let limit = if limit == 0 {
        REVIEW_LIMIT_DEFAULT
    } else {
        limit
    };
    i64::from(limit.clamp(1, REVIEW_LIMIT_MAX))
}

impl PgStore {
    pub(crate) async fn review_items_impl(
        &self,
        filter: &ReviewFilter,
    ) -> StoreResult<Vec<ReviewItem>> {
        let mut query =
            QueryBuilder::<Postgres>::new(format!("SELECT {COLUMNS} FROM review_items WHERE true"));
        if let Some(org) = filter.org_id {
            query.push(" AND org_id = ").push_bind(org.0);
        }
        if let Some(run) = filter.run_id {
            query.push(" AND run_id = ").push_bind(run.0);
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
            query.push(" AND id > ").push_bind(after.0);
        }
        query
            .push(" ORDER BY id LIMIT ")
            .push_bind(clamp(filter.limit));
        let rows = query.build().fetch_all(&self.pool).await.map_err(db)?;
        rows.iter().map(from_row).collect()
    }

    pub(crate) async fn review_item_impl(&self, id: ReviewId) -> StoreResult<Option<ReviewItem>> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM review_items WHERE id = $1"))
            .bind(id.0)
            .fetch_optional(&self.pool)
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
        let claimed = sqlx::query(&format!(
            "UPDATE review_items SET claimed_by = $2, claim_expires_at = $3
             WHERE id = $1 AND state = 'open'
               AND (claimed_by IS NULL OR claimed_by = $2 OR claim_expires_at <= $4)
             RETURNING {COLUMNS}"
        ))
        .bind(id.0)
        .bind(reviewer)
        .bind(until.as_micros())
        .bind(now.as_micros())
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
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
        let done = sqlx::query(
            "UPDATE review_items AS t SET
                 state = r ->> 'state',
                 feedback = (r ->> 'feedback')::smallint,
                 decided_at = (r ->> 'decided_at')::bigint,
                 body = r -> 'body'
             FROM jsonb_array_elements($1::jsonb) AS b (r)
             WHERE t.id = $2 AND t.state = 'open' AND t.kind = 'notice'
               AND (t.claimed_by IS NULL OR t.claimed_by = $3 OR t.claim_expires_at <= $4)",
        )
        .bind(rows)
        .bind(item.id.0)
        .bind(reviewer)
        .bind(now.as_micros())
        .execute(&self.pool)
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
        let rows: Vec<(Option<f64>, i16, f64)> = sqlx::query_as(
            "SELECT confidence, feedback, weight FROM review_items
             WHERE org_id = $1 AND pipeline_name = $2 AND task_id = $3 AND feedback IS NOT NULL
             ORDER BY decided_at DESC LIMIT $4",
        )
        .bind(org.0)
        .bind(pipeline)
        .bind(task.as_str())
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        Ok(rows
            .into_iter()
            .filter_map(|(c, f, w)| feedback_point(c, i64::from(f), w))
            .collect())
    }
}
