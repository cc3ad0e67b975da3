//! Validation-queue items as both backends store them: the whole item as JSON (`body`) and
//! the columns that listings filter by and calibration reads, encoded once here.

use std::collections::HashMap;

use arches_core::ports::{StoreError, StoreResult};
use arches_core::records::ClaimOutcome;
use arches_core::review::{FeedbackPoint, ReviewItem, ReviewState};
use arches_core::Timestamp;
use serde::Serialize;
use serde_json::Value;

/// One item as a row of the batch upsert (a JSON array of these is the statement's
/// parameter).
#[derive(Serialize)]
struct ReviewRow<'a> {
    id: String,
    org_id: String,
    run_id: String,
    task_run_id: String,
    pipeline_name: &'a str,
    task_id: &'a str,
    tool: &'a str,
    kind: &'a str,
    state: &'a str,
    confidence: Option<f64>,
    feedback: Option<i64>,
    weight: f64,
    created_at: i64,
    decided_at: Option<i64>,
    body: Value,
}

/// The batch's items as a JSON array of rows, the last write of an item winning (an
/// upsert may touch a row once per statement).
pub(crate) fn encode_reviews(items: &[ReviewItem]) -> StoreResult<String> {
    let mut last: HashMap<_, usize> = HashMap::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        last.insert(item.id, i);
    }
    let rows = items
        .iter()
        .enumerate()
        .filter(|(i, item)| last.get(&item.id) == Some(i))
        .map(|(_, item)| {
            let mut body = serde_json::to_value(item)
                .map_err(|e| StoreError::Backend(format!("review item does not encode: {e}")))?;
            // Claims live in their own columns only.
            if let Value::Object(map) = &mut body {
                map.remove("claimed_by");
                map.remove("claim_expires_at");
            }
            Ok(ReviewRow {
                id: item.id.to_string(),
                org_id: item.org_id.to_string(),
                run_id: item.run_id.to_string(),
                task_run_id: item.task_run_id.to_string(),
                pipeline_name: &item.pipeline_name,
                task_id: item.task_id.as_str(),
                tool: &item.tool,
                kind: item.kind.as_str(),
                state: item.state.as_str(),
                confidence: item.confidence.filter(|c| c.is_finite()),
                feedback: item.feedback().map(i64::from),
                weight: weight_of(item),
                created_at: item.created_at.as_micros(),
                decided_at: item.decided_at.map(Timestamp::as_micros),
                body,
            })
        })
        .collect::<StoreResult<Vec<_>>>()?;
    serde_json::to_string(&rows)
        .map_err(|e| StoreError::Backend(format!("review items do not encode: {e}")))
}

/// The inverse-probability weight of an item's feedback.
fn weight_of(item: &ReviewItem) -> f64 {
    if item.sample_rate.is_finite() && item.sample_rate > 0.0 {
        1.0 / item.sample_rate.min(1.0)
    } else {
        1.0
    }
}

/// An item from its stored body and claim columns.
pub(crate) fn decode_review(
    body: &str,
    claimed_by: Option<String>,
    claim_expires_at: Option<i64>,
) -> StoreResult<ReviewItem> {
    let mut item: ReviewItem = serde_json::from_str(body)
        .map_err(|e| StoreError::Corrupt(format!("review_items.body does not decode: {e}")))?;
    item.claimed_by = claimed_by;
    item.claim_expires_at = claim_expires_at.map(Timestamp);
    Ok(item)
}

/// A feedback point from its stored columns.
pub(crate) fn feedback_point(
    confidence: Option<f64>,
    feedback: i64,
    weight: f64,
) -> Option<FeedbackPoint> {
    Some(FeedbackPoint {
        confidence: confidence.filter(|c| c.is_finite())?,
        approved: feedback == 1,
        weight,
    })
}

/// The default and largest page of a review listing.
pub(crate) const REVIEW_LIMIT_DEFAULT: u32 = 100;
/// The largest page of a review listing.
pub(crate) const REVIEW_LIMIT_MAX: u32 = 1000;

/// Why a claim did not take, from the item as it is stored.
pub(crate) fn refusal(item: Option<ReviewItem>) -> ClaimOutcome {
    match item {
        None => ClaimOutcome::NotFound,
        Some(item) if item.state != ReviewState::Open => ClaimOutcome::Decided(item.state),
        Some(item) => ClaimOutcome::Held {
            by: item.claimed_by.unwrap_or_default(),
            until: item.claim_expires_at.unwrap_or_default(),
        },
    }
}
