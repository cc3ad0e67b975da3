//! The validation queue: AI results below their task's `low` threshold, results applied
//! with a notice, and `approval` gates wait here for reviewers (see
//! `arches_core::review`). Reviewers list and filter items, claim one, and approve it
//! (possibly with an edited result) or reject it; exactly one decision wins per item (a
//! later one gets 409). The calibration of each routed task — the thresholds it is routed
//! by now, the precision reached on the reviewers' feedback and the queue volume saved
//! against the fixed thresholds — is served here and exported as metrics.

use std::time::Duration;

use arches_core::identity::Permission;
use arches_core::pipeline::TaskDef;
use arches_core::records::{ClaimOutcome, ReviewFilter};
use arches_core::review::{
    calibrate, CalibrationReport, ReviewItem, ReviewKind, ReviewState, Verdict, Vote,
    CALIBRATION_FEEDBACK_MAX,
};
use arches_core::{ReviewId, TaskId};
use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::api::runs::{build_pipeline, engine, stored_pipeline};
use crate::api::{parse_run_id, rfc3339, AuditTarget, Page};
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use crate::principal::Principal;
use crate::state::AppState;

/// Default claim length.
pub const CLAIM_TTL_DEFAULT: Duration = Duration::from_secs(15 * 60);
/// Longest claim.
pub const CLAIM_TTL_MAX: Duration = Duration::from_secs(24 * 3600);
/// Default and largest page of items.
const PAGE_DEFAULT: u32 = 50;
const PAGE_MAX: u32 = 500;

/// The OpenAPI paths of this module.
#[derive(OpenApi)]
#[openapi(
    paths(list_reviews, get_review, claim_review, decide_review, calibration),
    components(schemas(ReviewView, VoteView, ClaimRequest, DecisionRequest, CalibrationView))
)]
pub struct ReviewsApi;

/// The routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/reviews", get(list_reviews))
        .route("/api/v1/reviews/calibration", get(calibration))
        .route("/api/v1/reviews/{id}", get(get_review))
        .route("/api/v1/reviews/{id}/claim", post(claim_review))
        .route("/api/v1/reviews/{id}/decision", post(decide_review))
}

/// One vote on an item.
#[derive(Debug, Serialize, ToSchema)]
pub struct VoteView {
    /// The reviewer's user id (`system` for an expiry).
    pub reviewer: String,
    /// The reviewer's email, when known.
    pub email: Option<String>,
    /// `approve` or `reject`.
    pub verdict: String,
    /// The edited result, when approved with changes.
    pub edited: Option<Value>,
    /// The comment.
    pub comment: Option<String>,
    /// When (RFC 3339).
    pub at: String,
}

/// An item of the validation queue, with its preview.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReviewView {
    /// The item's id.
    pub id: String,
    /// `confidence` (its task run waits), `notice` (applied; the decision is feedback) or
    /// `approval` (a human gate).
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
    /// The fan-out index, for fan-out items.
    pub index: Option<u32>,
    /// The tool.
    pub tool: String,
    /// The attempt that produced the result.
    pub attempt: u32,
    /// The task run's inputs.
    pub inputs: Value,
    /// The proposed result (`null` for approvals).
    pub proposed: Value,
    /// The result's raw confidence.
    pub confidence: Option<f64>,
    /// The model's rationale, when the task's policy names a field for it.
    pub rationale: Option<String>,
    /// The thresholds the result was routed by: `{low, high, calibrated}`.
    pub thresholds: Option<Value>,
    /// Approvals: what the approvers are asked.
    pub message: Option<String>,
    /// Approvals: who may vote (anyone allowed to decide when empty).
    pub assignees: Vec<String>,
    /// Approvals needed.
    pub quorum: u32,
    /// Approvals so far.
    pub approvals: u32,
    /// When it expires (RFC 3339).
    pub expires_at: Option<String>,
    /// Votes so far.
    pub votes: Vec<VoteView>,
    /// Who holds the item for review.
    pub claimed_by: Option<String>,
    /// Until when (RFC 3339).
    pub claim_expires_at: Option<String>,
    /// When it was created (RFC 3339).
    pub created_at: String,
    /// When it was decided (RFC 3339).
    pub decided_at: Option<String>,
    /// Seconds it has waited (until its decision, or until now).
    pub age_secs: f64,
}

impl ReviewView {
    fn new(item: ReviewItem, now: arches_core::Timestamp) -> Self {
        let approvals = u32::try_from(item.approvals()).unwrap_or(u32::MAX);
        let age = item.decided_at.unwrap_or(now).since(item.created_at);
        Self {
            id: item.id.to_string(),
            kind: item.kind.as_str().to_owned(),
            state: item.state.as_str().to_owned(),
            run_id: item.run_id.to_string(),
            task_run_id: item.task_run_id.to_string(),
            pipeline: item.pipeline_name,
            task: item.task_id.to_string(),
            index: item.index,
            tool: item.tool,
            attempt: item.attempt,
            inputs: item.inputs,
            proposed: item.proposed,
            confidence: item.confidence,
            rationale: item.rationale,
            thresholds: item.thresholds.and_then(|t| serde_json::to_value(t).ok()),
            message: item.message,
            assignees: item.assignees,
            quorum: item.quorum,
            approvals,
            expires_at: item.expires_at.map(rfc3339),
            votes: item
                .votes
                .into_iter()
                .map(|v| VoteView {
                    reviewer: v.reviewer,
                    email: v.email,
                    verdict: match v.verdict {
                        Verdict::Approve => "approve",
                        Verdict::Reject => "reject",
                    }
                    .to_owned(),
                    edited: v.edited,
                    comment: v.comment,
                    at: rfc3339(v.at),
                })
                .collect(),
            claimed_by: item.claimed_by,
            claim_expires_at: item.claim_expires_at.map(rfc3339),
            created_at: rfc3339(item.created_at),
            decided_at: item.decided_at.map(rfc3339),
            age_secs: age.as_secs_f64(),
        }
    }
}

/// Filters of the queue's listing.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListReviews {
    /// `open` (the default), `approved`, `rejected`, `expired`, `cancelled` or `all`.
    pub state: Option<String>,
    /// `confidence`, `notice` or `approval`.
    pub kind: Option<String>,
    /// Only items of this pipeline.
    pub pipeline: Option<String>,
    /// Only items of this task.
    pub task: Option<String>,
    /// Only items of this tool.
    pub tool: Option<String>,
    /// Only items of this run.
    pub run_id: Option<String>,
    /// Only items whose confidence is at least this (0 to 1).
    pub min_confidence: Option<f64>,
    /// Only items whose confidence is below this (0 to 1).
    pub max_confidence: Option<f64>,
    /// Only items older than this (`"1h"`, `"30m"`, or seconds).
    pub older_than: Option<String>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Page size: 1 to 500, default 50.
    pub limit: Option<u32>,
}

fn parse_kind(text: &str) -> Result<ReviewKind, ApiError> {
    match text {
        "confidence" => Ok(ReviewKind::Confidence),
        "notice" => Ok(ReviewKind::Notice),
        "approval" => Ok(ReviewKind::Approval),
        other => Err(ApiError::bad_request(format!(
            "kind must be confidence, notice or approval, got {other:?}"
        ))
        .with_detail("parameter", "kind")),
    }
}

fn parse_unit(parameter: &str, value: Option<f64>) -> Result<Option<f64>, ApiError> {
    match value {
        Some(v) if !(v.is_finite() && (0.0..=1.0).contains(&v)) => Err(ApiError::bad_request(
            format!("{parameter} must be a number from 0 to 1, got {v}"),
        )
        .with_detail("parameter", parameter)),
        other => Ok(other),
    }
}

/// Lists the org's validation queue, oldest first.
#[utoipa::path(get, path = "/api/v1/reviews", tag = "reviews", params(ListReviews),
    responses((status = 200, body = Page<ReviewView>), (status = 400, body = crate::error::ApiErrorBody)))]
pub async fn list_reviews(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(query): ApiQuery<ListReviews>,
) -> Result<Json<Page<ReviewView>>, ApiError> {
    principal.require(Permission::ReviewRead)?;
    let now = state.clock.now();
    let review_state = match query.state.as_deref() {
        None => Some(ReviewState::Open),
        Some("all") => None,
        Some(text) => Some(ReviewState::parse(text).ok_or_else(|| {
            ApiError::bad_request(format!(
                "state must be open, approved, rejected, expired, cancelled or all, got {text:?}"
            ))
            .with_detail("parameter", "state")
        })?),
    };
    let created_before = match &query.older_than {
        None => None,
        Some(text) => {
            let age = arches_core::time::parse_duration(text).map_err(|e| {
                ApiError::bad_request(format!("older_than: {e}"))
                    .with_detail("parameter", "older_than")
            })?;
            Some(arches_core::Timestamp(now.as_micros().saturating_sub(
                i64::try_from(age.as_micros()).unwrap_or(i64::MAX),
            )))
        }
    };
    let after = match &query.cursor {
        None => None,
        Some(text) => Some(text.parse::<ReviewId>().map_err(|_| {
            ApiError::bad_request(format!("malformed cursor {text:?}"))
                .with_detail("parameter", "cursor")
        })?),
    };
    let limit = query.limit.unwrap_or(PAGE_DEFAULT).clamp(1, PAGE_MAX);
    let filter = ReviewFilter {
        org_id: Some(principal.org_id),
        run_id: query.run_id.as_deref().map(parse_run_id).transpose()?,
        state: review_state,
        kind: query.kind.as_deref().map(parse_kind).transpose()?,
        pipeline_name: query.pipeline.clone(),
        task_id: query.task.clone(),
        tool: query.tool.clone(),
        min_confidence: parse_unit("min_confidence", query.min_confidence)?,
        max_confidence: parse_unit("max_confidence", query.max_confidence)?,
        created_before,
        after,
        limit: limit + 1,
    };
    let mut items = state.store.review_items(&filter).await?;
    let next_cursor = if items.len() > limit as usize {
        items.truncate(limit as usize);
        items.last().map(|item| item.id.to_string())
    } else {
        None
    };
    Ok(Json(Page {
        items: items
            .into_iter()
            .map(|item| ReviewView::new(item, now))
            .collect(),
        next_cursor,
    }))
}

/// An item of the principal's org, or 404.
async fn org_review(
    state: &AppState,
    principal: &Principal,
    id: &str,
) -> Result<ReviewItem, ApiError> {
    let review_id: ReviewId = id.parse().map_err(|_| ApiError::not_found("review", id))?;
    state
        .store
        .review_item(review_id)
        .await?
        .filter(|item| item.org_id == principal.org_id)
        .ok_or_else(|| ApiError::not_found("review", id))
}

/// One item, with its preview and votes.
#[utoipa::path(get, path = "/api/v1/reviews/{id}", tag = "reviews",
    params(("id" = String, Path, description = "Review id")),
    responses((status = 200, body = ReviewView), (status = 404, body = crate::error::ApiErrorBody)))]
pub async fn get_review(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ReviewView>, ApiError> {
    principal.require(Permission::ReviewRead)?;
    let item = org_review(&state, &principal, &id).await?;
    Ok(Json(ReviewView::new(item, state.clock.now())))
}

/// A claim's length.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClaimRequest {
    /// How long to hold the item, in seconds: 1 to 86,400, default 900.
    pub ttl_secs: Option<u64>,
}

/// Claims an item so that other reviewers leave it alone while the claim holds (their
/// claims and decisions get 409); claiming again renews one's own claim.
#[utoipa::path(post, path = "/api/v1/reviews/{id}/claim", tag = "reviews",
    params(("id" = String, Path, description = "Review id")), request_body = ClaimRequest,
    responses((status = 200, body = ReviewView), (status = 404, body = crate::error::ApiErrorBody),
        (status = 409, body = crate::error::ApiErrorBody)))]
pub async fn claim_review(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
    body: axum::body::Bytes,
) -> Result<(AuditTarget, Json<ReviewView>), ApiError> {
    principal.require(Permission::ReviewDecide)?;
    // The body is optional: none (or empty) takes the default length.
    let request: ClaimRequest = if body.iter().all(u8::is_ascii_whitespace) {
        ClaimRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(format!("the claim body is not a valid claim: {e}"))
        })?
    };
    let ttl = match request.ttl_secs {
        None => CLAIM_TTL_DEFAULT,
        Some(secs) if (1..=CLAIM_TTL_MAX.as_secs()).contains(&secs) => Duration::from_secs(secs),
        Some(secs) => {
            return Err(ApiError::bad_request(format!(
                "ttl_secs must be from 1 to {}, got {secs}",
                CLAIM_TTL_MAX.as_secs()
            ))
            .with_detail("field", "ttl_secs"))
        }
    };
    let item = org_review(&state, &principal, &id).await?;
    let now = state.clock.now();
    let reviewer = principal.user_id.to_string();
    match state
        .store
        .claim_review(item.id, &reviewer, now.plus(ttl), now)
        .await?
    {
        ClaimOutcome::Claimed(item) => Ok((
            AuditTarget::new("review", item.id),
            Json(ReviewView::new(*item, now)),
        )),
        ClaimOutcome::Held { by, until } => Err(ApiError::conflict(format!(
            "review {} is claimed by user {by} until {}",
            item.id,
            rfc3339(until)
        ))),
        ClaimOutcome::Decided(state) => Err(ApiError::conflict(format!(
            "review {} is already {}",
            item.id,
            state.as_str()
        ))),
        ClaimOutcome::NotFound => Err(ApiError::not_found("review", &id)),
    }
}

/// A reviewer's decision.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DecisionRequest {
    /// `approve` or `reject`.
    pub verdict: String,
    /// The corrected result (a JSON object), to approve instead of the proposed one.
    pub output: Option<Value>,
    /// Why; a rejection's comment is given to the tool when the task's `on_reject` is
    /// `retry`. At most 4,096 bytes.
    pub comment: Option<String>,
}

/// Decides an item: approve (with an edited result, for a confidence item), or reject.
/// Exactly one decision wins: a decided item, or one another reviewer holds, answers 409.
/// Approving a confidence item continues its run with the (edited) result; rejecting it
/// follows the task's `on_reject`. An approval needs its quorum of approvers; one
/// rejection rejects it.
#[utoipa::path(post, path = "/api/v1/reviews/{id}/decision", tag = "reviews",
    params(("id" = String, Path, description = "Review id")), request_body = DecisionRequest,
    responses((status = 200, body = ReviewView), (status = 400, body = crate::error::ApiErrorBody),
        (status = 403, body = crate::error::ApiErrorBody), (status = 404, body = crate::error::ApiErrorBody),
        (status = 409, body = crate::error::ApiErrorBody)))]
pub async fn decide_review(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
    ApiJson(request): ApiJson<DecisionRequest>,
) -> Result<(AuditTarget, Json<ReviewView>), ApiError> {
    principal.require(Permission::ReviewDecide)?;
    let verdict = match request.verdict.as_str() {
        "approve" => Verdict::Approve,
        "reject" => Verdict::Reject,
        other => {
            return Err(ApiError::bad_request(format!(
                "verdict must be approve or reject, got {other:?}"
            ))
            .with_detail("field", "verdict"))
        }
    };
    let item = org_review(&state, &principal, &id).await?;
    let now = state.clock.now();
    let reviewer = principal.user_id.to_string();
    if item.state != ReviewState::Open {
        return Err(ApiError::conflict(format!(
            "review {} is already {}",
            item.id,
            item.state.as_str()
        )));
    }
    if let (Some(by), Some(until)) = (&item.claimed_by, item.claim_expires_at) {
        if by != &reviewer && until > now {
            return Err(ApiError::conflict(format!(
                "review {} is claimed by user {by} until {}",
                item.id,
                rfc3339(until)
            )));
        }
    }
    let email = state
        .identity
        .user(principal.user_id)
        .await?
        .map(|user| user.email);
    let vote = Vote {
        reviewer,
        email,
        verdict,
        edited: request.output,
        comment: request.comment.filter(|c| !c.trim().is_empty()),
        at: now,
    };
    let decided = if item.kind == ReviewKind::Notice {
        decide_notice(&state, item, vote).await?
    } else {
        match engine(&state)?.decide(item.run_id, item.id, vote).await {
            Ok(item) => item,
            Err(arches_engine::Error::Review(refusal)) => return Err(refusal_error(refusal)),
            Err(arches_engine::Error::UnknownRun(run)) => {
                return Err(ApiError::conflict(format!(
                    "run {run} is not driven by this server; decide on the server that runs it"
                )))
            }
            Err(other) => return Err(other.into()),
        }
    };
    state.metrics.inc_review_decisions(decided.state.as_str());
    if decided.feedback().is_some() {
        refresh_metrics(&state, &principal, &decided.pipeline_name, &decided.task_id).await;
    }
    Ok((
        AuditTarget::new("review", decided.id),
        Json(ReviewView::new(decided, now)),
    ))
}

/// Records a decision on a notice (its result was applied; the decision is feedback).
async fn decide_notice(
    state: &AppState,
    mut item: ReviewItem,
    vote: Vote,
) -> Result<ReviewItem, ApiError> {
    if let Some(edited) = &vote.edited {
        if vote.verdict == Verdict::Reject || !edited.is_object() {
            return Err(ApiError::bad_request(
                "an edited result must be a JSON object, and can only be approved",
            )
            .with_detail("field", "output"));
        }
    }
    if vote
        .comment
        .as_ref()
        .is_some_and(|c| c.len() > arches_core::review::COMMENT_BYTES_MAX)
    {
        return Err(ApiError::bad_request(format!(
            "the comment is longer than {} bytes",
            arches_core::review::COMMENT_BYTES_MAX
        ))
        .with_detail("field", "comment"));
    }
    if let Some(edited) = &vote.edited {
        let size = serde_json::to_vec(edited)
            .map(|b| b.len())
            .unwrap_or(usize::MAX);
        let max = arches_core::execution::ExecutionLimits::default().outputs_bytes_max;
        if size > max {
            return Err(ApiError::bad_request(format!(
                "the edited result is {size} bytes, above the limit of {max} bytes"
            ))
            .with_detail("field", "output"));
        }
    }
    let reviewer = vote.reviewer.clone();
    let now = vote.at;
    item.state = ReviewState::from(vote.verdict);
    item.decided_at = Some(vote.at);
    item.votes.push(vote);
    if !state.store.decide_notice(&item, &reviewer, now).await? {
        return Err(ApiError::conflict(format!(
            "review {} was decided, or claimed, by someone else meanwhile",
            item.id
        )));
    }
    if let Ok(engine) = engine(state) {
        let _ = engine
            .recalibrate(
                item.org_id,
                item.pipeline_name.clone(),
                item.task_id.clone(),
            )
            .await;
    }
    Ok(item)
}

fn refusal_error(refusal: arches_core::execution::ReviewRefusal) -> ApiError {
    use arches_core::execution::ReviewRefusal;
    match refusal {
        ReviewRefusal::NotAssignee { .. } => {
            ApiError::new(crate::error::ErrorCode::Forbidden, refusal.to_string())
        }
        ReviewRefusal::Invalid(message) => ApiError::bad_request(message),
        ReviewRefusal::Unknown(_)
        | ReviewRefusal::Decided { .. }
        | ReviewRefusal::AlreadyVoted { .. } => ApiError::conflict(refusal.to_string()),
    }
}

/// Which tasks' calibration to show.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CalibrationQuery {
    /// The pipeline (its latest version's routed tasks).
    pub pipeline: String,
    /// Only this task.
    pub task: Option<String>,
}

/// The calibration of one routed task.
#[derive(Debug, Serialize, ToSchema)]
pub struct CalibrationView {
    /// The pipeline.
    pub pipeline: String,
    /// The task.
    pub task: String,
    /// The thresholds its results are routed by now: `{low, high, calibrated}`.
    pub thresholds: Value,
    /// The policy's fixed thresholds.
    pub fixed: Value,
    /// The precision auto-applied results must hold.
    pub target_precision: f64,
    /// Weighted decided results read (audits weigh 1 / audit rate).
    pub feedback: f64,
    /// Estimated precision of the results applied under the current `low`.
    pub precision: Option<f64>,
    /// Estimated precision of the results the fixed `low` would apply.
    pub fixed_precision: Option<f64>,
    /// Estimated share of results queued under the current `low`.
    pub queue_share: Option<f64>,
    /// Estimated share of results the fixed `low` would queue.
    pub fixed_queue_share: Option<f64>,
    /// `fixed_queue_share - queue_share`: the share of results no longer waiting for a
    /// reviewer thanks to the calibration.
    pub queue_saved: Option<f64>,
    /// The isotonic fit: `[lowest confidence, highest, probability of approval]` blocks.
    pub blocks: Vec<[f64; 3]>,
}

async fn task_report(
    state: &AppState,
    principal: &Principal,
    pipeline: &str,
    task: &TaskDef,
) -> Result<Option<(CalibrationReport, arches_core::review::ReviewPolicy)>, ApiError> {
    let Some(policy) = task.review_policy() else {
        return Ok(None);
    };
    let points = state
        .store
        .review_feedback(
            principal.org_id,
            pipeline,
            &task.id,
            CALIBRATION_FEEDBACK_MAX,
        )
        .await?;
    Ok(Some((calibrate(&policy, &points), policy)))
}

/// The calibration of a pipeline's routed tasks: thresholds now and fixed, precision on
/// the reviewers' feedback, and the queue volume saved. Also sets the
/// `arches_review_queue_share`, `arches_review_precision` gauges.
#[utoipa::path(get, path = "/api/v1/reviews/calibration", tag = "reviews", params(CalibrationQuery),
    responses((status = 200, body = Vec<CalibrationView>), (status = 404, body = crate::error::ApiErrorBody)))]
pub async fn calibration(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(query): ApiQuery<CalibrationQuery>,
) -> Result<Json<Vec<CalibrationView>>, ApiError> {
    principal.require(Permission::ReviewRead)?;
    let stored = stored_pipeline(&state, &principal, &query.pipeline, None).await?;
    let pipeline = build_pipeline(&stored)?;
    let mut views = Vec::new();
    for task in &pipeline.def.tasks {
        if query.task.as_deref().is_some_and(|t| t != task.id.as_str()) {
            continue;
        }
        let Some((report, policy)) = task_report(&state, &principal, &query.pipeline, task).await?
        else {
            continue;
        };
        set_gauges(
            &state,
            &principal,
            &query.pipeline,
            task.id.as_str(),
            &report,
        );
        views.push(CalibrationView {
            pipeline: query.pipeline.clone(),
            task: task.id.to_string(),
            thresholds: serde_json::to_value(report.thresholds).unwrap_or(Value::Null),
            fixed: serde_json::to_value(policy.fixed()).unwrap_or(Value::Null),
            target_precision: policy.target_precision,
            feedback: report.feedback,
            precision: report.precision,
            fixed_precision: report.fixed_precision,
            queue_share: report.queue_share,
            fixed_queue_share: report.fixed_queue_share,
            queue_saved: report
                .fixed_queue_share
                .zip(report.queue_share)
                .map(|(f, q)| f - q),
            blocks: report
                .calibration
                .map(|c| c.blocks.iter().map(|b| [b.0, b.1, b.2]).collect())
                .unwrap_or_default(),
        });
    }
    if let Some(task) = &query.task {
        if views.is_empty() {
            return Err(ApiError::not_found("routed task", task));
        }
    }
    Ok(Json(views))
}

fn set_gauges(
    state: &AppState,
    principal: &Principal,
    pipeline: &str,
    task: &str,
    report: &CalibrationReport,
) {
    let org = principal.org_id.to_string();
    state.metrics.set_review_calibration(
        &org,
        pipeline,
        task,
        report.queue_share,
        report.fixed_queue_share,
        report.precision,
    );
}

/// After a decision that is feedback: the task's calibration gauges follow.
async fn refresh_metrics(state: &AppState, principal: &Principal, pipeline: &str, task: &TaskId) {
    let Ok(stored) = stored_pipeline(state, principal, pipeline, None).await else {
        return;
    };
    let Ok(built) = build_pipeline(&stored) else {
        return;
    };
    let Some(def) = built.def.task(task.as_str()).cloned() else {
        return;
    };
    if let Ok(Some((report, _))) = task_report(state, principal, pipeline, &def).await {
        set_gauges(state, principal, pipeline, task.as_str(), &report);
    }
}
