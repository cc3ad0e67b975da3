//! The audit trail of the caller's org: who did what, when, from where, and how it ended;
//! newest first, with filters and a cursor.

use arches_core::identity::{AuditEventRecord, AuditFilter, AuditOutcome, Permission};
use arches_core::UserId;
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::api::{parse_time, rfc3339, Page};
use crate::error::{ApiError, ApiQuery};
use crate::principal::Principal;
use crate::state::AppState;

/// The OpenAPI paths of this module.
#[derive(OpenApi)]
#[openapi(paths(list_audit_events), components(schemas(AuditEventView)))]
pub struct AuditApi;

/// The routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new().route("/api/v1/audit-events", get(list_audit_events))
}

/// The default page size.
const LIMIT_DEFAULT: u32 = 100;
/// The largest page size.
const LIMIT_MAX: u32 = 500;

/// Filters and cursor of the audit trail.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListAuditEvents {
    /// Only events of this acting user (id).
    pub actor: Option<String>,
    /// Only actions starting with this prefix (`auth.` or `auth.login`).
    pub action: Option<String>,
    /// Only this outcome: `success`, `denied` or `failure`.
    pub outcome: Option<String>,
    /// Only events at or after this RFC 3339 time.
    pub since: Option<String>,
    /// Only events before this RFC 3339 time.
    pub until: Option<String>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Page size: 1 to 500, default 100.
    pub limit: Option<u32>,
}

/// One audit event.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditEventView {
    /// Position in the trail (increasing).
    pub seq: i64,
    /// When (RFC 3339).
    pub at: String,
    /// The acting user.
    pub actor_user_id: Option<String>,
    /// The API key used, if any.
    pub actor_api_key_id: Option<String>,
    /// `<resource>.<verb>`.
    pub action: String,
    /// The target's kind.
    pub target_kind: Option<String>,
    /// The target's id or name.
    pub target_id: Option<String>,
    /// The client's IP address.
    pub ip: Option<String>,
    /// The request id.
    pub request_id: Option<String>,
    /// `success`, `denied` or `failure`.
    pub outcome: String,
    /// The HTTP status answered.
    pub status: Option<u16>,
    /// Extra facts.
    #[schema(value_type = Object)]
    pub details: Value,
}

impl From<AuditEventRecord> for AuditEventView {
    fn from(record: AuditEventRecord) -> Self {
        let event = record.event;
        AuditEventView {
            seq: record.seq,
            at: rfc3339(event.at),
            actor_user_id: event.actor_user_id.map(|u| u.to_string()),
            actor_api_key_id: event.actor_api_key_id.map(|k| k.to_string()),
            action: event.action,
            target_kind: event.target_kind,
            target_id: event.target_id,
            ip: event.ip,
            request_id: event.request_id,
            outcome: event.outcome.as_str().to_owned(),
            status: event.status,
            details: event.details,
        }
    }
}

fn bad_parameter(parameter: &str, message: String) -> ApiError {
    ApiError::bad_request(message).with_detail("parameter", parameter)
}

/// The audit trail of the caller's org, newest first. Needs `audit_read`.
#[utoipa::path(get, path = "/api/v1/audit-events", tag = "audit", params(ListAuditEvents),
    responses((status = 200, body = Page<AuditEventView>), (status = 400, body = crate::error::ApiErrorBody),
        (status = 403, body = crate::error::ApiErrorBody)))]
pub async fn list_audit_events(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(query): ApiQuery<ListAuditEvents>,
) -> Result<Json<Page<AuditEventView>>, ApiError> {
    principal.require(Permission::AuditRead)?;
    let limit = query.limit.unwrap_or(LIMIT_DEFAULT);
    if !(1..=LIMIT_MAX).contains(&limit) {
        return Err(bad_parameter(
            "limit",
            format!("limit must be 1 to {LIMIT_MAX}"),
        ));
    }
    let actor_user_id = query
        .actor
        .as_deref()
        .map(|a| {
            a.parse::<UserId>()
                .map_err(|_| bad_parameter("actor", "actor must be a user id".to_owned()))
        })
        .transpose()?;
    let outcome = query
        .outcome
        .as_deref()
        .map(|o| {
            o.parse::<AuditOutcome>()
                .map_err(|e| bad_parameter("outcome", e))
        })
        .transpose()?;
    let before_seq = query
        .cursor
        .as_deref()
        .map(|c| {
            c.parse::<i64>()
                .map_err(|_| bad_parameter("cursor", "malformed cursor".to_owned()))
        })
        .transpose()?;
    let filter = AuditFilter {
        org_id: Some(principal.org_id),
        actor_user_id,
        action_prefix: query.action.filter(|a| !a.is_empty()),
        outcome,
        since: query
            .since
            .as_deref()
            .map(|t| parse_time("since", t))
            .transpose()?,
        until: query
            .until
            .as_deref()
            .map(|t| parse_time("until", t))
            .transpose()?,
        before_seq,
        limit: limit + 1,
    };
    let mut events = state.identity.audit_events(&filter).await?;
    let next_cursor = if events.len() > limit as usize {
        events.truncate(limit as usize);
        events.last().map(|e| e.seq.to_string())
    } else {
        None
    };
    Ok(Json(Page {
        items: events.into_iter().map(AuditEventView::from).collect(),
        next_cursor,
    }))
}
