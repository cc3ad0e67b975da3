//! The REST API under `/api/v1`, its OpenAPI 3.1 document (generated from the handlers'
//! annotations by utoipa) and the interactive docs.
//!
//! Every endpoint authenticates with [`crate::principal::Principal`] and asks for exactly one
//! permission of the table in `arches_core::identity` (the sign-up and login endpoints are
//! the only anonymous ones). Every query is scoped by the principal's org: a resource of
//! another org answers 404, as if it did not exist.

pub mod account;
pub mod artifacts;
pub mod audit_log;
pub mod auth;
pub mod events;
pub mod logs;
pub mod orgs;
pub mod pipelines;
pub mod reviews;
pub mod runs;
pub mod search;
pub mod tools;

use arches_core::identity::Permission;
use arches_core::ports::StoreError;
use arches_core::{RunId, Timestamp};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, IntoResponseParts, ResponseParts};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::error::ApiError;
use crate::principal::Principal;
use crate::state::AppState;

/// A page of a list. `next_cursor`, when set, is passed back as `cursor` for the next page.
#[derive(Debug, Serialize, ToSchema)]
pub struct Page<T: ToSchema> {
    /// The items.
    pub items: Vec<T>,
    /// The cursor of the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// What a state-changing handler acted on, for its audit event: put in the response's
/// extensions, read by the audit middleware.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditTarget {
    /// The kind (`pipeline`, `run`, `user`…).
    pub kind: &'static str,
    /// The id or name.
    pub id: String,
}

impl AuditTarget {
    /// A target of `kind` named `id`.
    pub fn new(kind: &'static str, id: impl ToString) -> Self {
        Self {
            kind,
            id: id.to_string(),
        }
    }
}

impl IntoResponseParts for AuditTarget {
    type Error = std::convert::Infallible;

    fn into_response_parts(self, mut res: ResponseParts) -> Result<ResponseParts, Self::Error> {
        res.extensions_mut().insert(self);
        Ok(res)
    }
}

impl From<StoreError> for ApiError {
    /// Store failures: `NotFound` → 404, `Conflict` → 409, `Unavailable` → 503 with
    /// `Retry-After: 1`; anything else is a 500 whose cause is logged, never shown.
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound(what) => ApiError::new(
                crate::error::ErrorCode::NotFound,
                format!("not found: {what}"),
            ),
            StoreError::Conflict(message) => ApiError::conflict(message),
            StoreError::Unavailable(message) => {
                tracing::warn!(%message, "store unavailable");
                ApiError::unavailable("the store is unavailable; retry shortly").with_retry_after(1)
            }
            // Nothing of the write was stored, and space may come back (logs rotated,
            // artifacts removed): a retry can succeed, so this is 503 and not a 500.
            StoreError::DiskFull(message) => {
                tracing::error!(%message, "store out of disk space");
                ApiError::unavailable("the store is out of disk space; nothing was saved")
                    .with_retry_after(30)
            }
            other => ApiError::internal(other),
        }
    }
}

impl From<arches_engine::Error> for ApiError {
    /// Engine failures: a stopped engine is 503; a store error maps as above.
    fn from(error: arches_engine::Error) -> Self {
        match error {
            arches_engine::Error::Store(store) => store.into(),
            arches_engine::Error::Stopped => ApiError::unavailable(
                "the engine is not running (restarting after a store failure, or shutting down)",
            )
            .with_retry_after(1),
            arches_engine::Error::UnknownRun(run) => {
                ApiError::conflict(format!("run {run} is not active"))
            }
            other => ApiError::internal(other),
        }
    }
}

/// RFC 3339 text of a timestamp, in UTC with microseconds.
pub fn rfc3339(at: Timestamp) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_micros(at.as_micros())
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        .unwrap_or_else(|| at.as_micros().to_string())
}

/// Parses an RFC 3339 time given in a query parameter.
///
/// # Errors
/// 400 naming the parameter.
pub fn parse_time(parameter: &str, text: &str) -> Result<Timestamp, ApiError> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| Timestamp(t.timestamp_micros()))
        .map_err(|e| {
            ApiError::bad_request(format!(
                "{parameter} must be an RFC 3339 time such as 2026-01-31T12:00:00Z: {e}"
            ))
            .with_detail("parameter", parameter)
        })
}

/// Parses the run id given in the `run_id` query parameter.
///
/// # Errors
/// 400 naming the parameter.
pub fn parse_run_id(text: &str) -> Result<RunId, ApiError> {
    text.parse().map_err(|_| {
        ApiError::bad_request(format!("malformed run id {text:?}"))
            .with_detail("parameter", "run_id")
    })
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "Alive")))]
pub async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// Readiness: the store answers and its migrations are applied (the default org, written by
/// a migration, is readable).
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, description = "Ready"), (status = 503, body = crate::error::ApiErrorBody)))]
pub async fn readyz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let probe = async {
        state
            .store
            .runs(&arches_core::records::RunFilter {
                limit: 1,
                ..Default::default()
            })
            .await?;
        state.identity.org(arches_core::OrgId::DEFAULT).await
    };
    match probe.await {
        Ok(Some(_)) => Ok(Json(serde_json::json!({ "status": "ready" }))),
        Ok(None) => Err(ApiError::unavailable("migrations are not applied").with_retry_after(5)),
        Err(error) => {
            tracing::warn!(%error, "readiness probe failed");
            Err(ApiError::unavailable("the store is unavailable").with_retry_after(5))
        }
    }
}

/// Prometheus metrics (OpenMetrics text): the HTTP metrics, and the runs, task runs and
/// queue depth by state, counted in the store at scrape time. Unauthenticated, like most
/// scrape targets; it holds counts only.
pub async fn metrics(State(state): State<AppState>) -> axum::response::Response {
    for (host, breaker) in state.http_tool.breaker_states() {
        state
            .metrics
            .set_http_tool_breaker(&host, breaker.gauge_value());
    }
    match state.store.state_counts().await {
        Ok(counts) => {
            for run_state in arches_core::RunState::ALL {
                let n = counts
                    .runs
                    .iter()
                    .find(|(s, _)| s == run_state)
                    .map_or(0, |(_, n)| *n);
                state
                    .metrics
                    .set_runs(run_state.as_str(), i64::try_from(n).unwrap_or(i64::MAX));
            }
            let mut queued = 0;
            for task_state in arches_core::TaskRunState::ALL {
                let n = counts
                    .task_runs
                    .iter()
                    .find(|(s, _)| s == task_state)
                    .map_or(0, |(_, n)| *n);
                if *task_state == arches_core::TaskRunState::Queued {
                    queued = n;
                }
                state
                    .metrics
                    .set_task_runs(task_state.as_str(), i64::try_from(n).unwrap_or(i64::MAX));
            }
            state
                .metrics
                .set_queue_depth(i64::try_from(queued).unwrap_or(i64::MAX));
            let expired = counts
                .attempts
                .iter()
                .find(|(s, _)| *s == arches_core::AttemptState::LeaseExpired)
                .map_or(0, |(_, n)| *n);
            let before = state
                .lease_expiries_reported
                .fetch_max(expired, std::sync::atomic::Ordering::Relaxed);
            if expired > before {
                state.metrics.inc_lease_expiries(expired - before);
            }
        }
        Err(error) => tracing::warn!(%error, "cannot count runs for the metrics"),
    }
    state.metrics.response()
}

/// The permission table, as served to clients and the UI.
#[derive(Debug, Serialize, ToSchema)]
pub struct PermissionRow {
    /// The permission's name.
    pub permission: String,
    /// The lowest role holding it.
    pub minimum_role: String,
}

/// The permission table: which role holds which permission.
#[utoipa::path(get, path = "/api/v1/permissions", tag = "orgs",
    responses((status = 200, body = Vec<PermissionRow>)))]
pub async fn permissions(principal: Principal) -> Json<Vec<PermissionRow>> {
    let _ = principal;
    Json(
        Permission::ALL
            .into_iter()
            .map(|p| PermissionRow {
                permission: p.as_str().to_owned(),
                minimum_role: p.minimum_role().as_str().to_owned(),
            })
            .collect(),
    )
}

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT or API key (ak_…)")
                    .build(),
            ),
        );
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("x-api-key"))),
        );
    }
}

/// The OpenAPI document of the API.
#[derive(OpenApi)]
#[openapi(
    info(title = "Arches API", description = "Pipelines, runs, artifacts, tools, secrets, live events, accounts, organizations and the audit trail."),
    paths(
        healthz, readyz, permissions,
        pipelines::validate_pipeline, pipelines::create_pipeline, pipelines::update_pipeline,
        pipelines::list_pipelines, pipelines::get_pipeline, pipelines::list_versions,
        pipelines::get_version, pipelines::archive_pipeline, pipelines::unarchive_pipeline,
        runs::trigger_run, runs::list_runs, runs::get_run, runs::cancel_run, runs::retry_run,
        runs::list_task_runs, runs::run_logs,
        artifacts::list_artifacts, artifacts::get_artifact, artifacts::download_artifact,
        artifacts::artifact_lineage,
        events::stream_events,
    ),
    components(schemas(crate::error::ApiErrorBody, crate::error::ErrorCode)),
    modifiers(&SecuritySchemes),
    security(("bearer" = []), ("api_key" = [])),
    tags(
        (name = "pipelines"), (name = "runs"), (name = "artifacts"), (name = "events"),
        (name = "tools"), (name = "secrets"), (name = "reviews"), (name = "search"),
        (name = "auth"), (name = "account"), (name = "orgs"), (name = "audit"), (name = "health"),
    )
)]
pub struct ApiDoc;

/// The whole OpenAPI document: this module's paths and those of the auth, account, org and
/// audit modules.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.merge(auth::AuthApi::openapi());
    doc.merge(account::AccountApi::openapi());
    doc.merge(orgs::OrgsApi::openapi());
    doc.merge(audit_log::AuditApi::openapi());
    doc.merge(tools::ToolsApi::openapi());
    doc.merge(reviews::ReviewsApi::openapi());
    doc.merge(search::SearchApi::openapi());
    doc.merge(logs::LogsApi::openapi());
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    add_default_error_responses(&mut doc);
    doc
}

/// Gives every operation a `default` response with the one error shape
/// ([`crate::error::ApiErrorBody`]): any status an operation does not list (400 for a bad
/// body, 401, 403, 413, 415, 429, 503…) is still documented, as the table of stable codes in
/// `crate::error` can answer it on any route.
fn add_default_error_responses(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
    let response = ResponseBuilder::new()
        .description("An error: `{code, message, details}` with a stable `code`")
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ApiErrorBody")))
                .build(),
        )
        .build();
    for item in doc.paths.paths.values_mut() {
        for operation in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
            &mut item.head,
            &mut item.options,
            &mut item.trace,
        ]
        .into_iter()
        .flatten()
        {
            operation
                .responses
                .responses
                .entry("default".to_owned())
                .or_insert_with(|| RefOr::T(response.clone()));
        }
    }
}

async fn openapi_json() -> impl IntoResponse {
    Json(openapi())
}

/// A self-contained docs page: the OpenAPI document rendered as an explorable, searchable
/// list of endpoints with a "try it" form, using only inline script (the server may have no
/// internet access, so nothing is loaded from a CDN).
async fn docs() -> Html<&'static str> {
    Html(include_str!("docs.html"))
}

/// Every route of the API (not yet layered).
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/api/v1/openapi.json", get(openapi_json))
        .route("/api/docs", get(docs))
        .route("/api/v1/permissions", get(permissions))
        .route("/metrics", get(metrics))
        .route(
            "/api/v1/pipelines",
            get(pipelines::list_pipelines).post(pipelines::create_pipeline),
        )
        .route(
            "/api/v1/pipelines/validate",
            post(pipelines::validate_pipeline),
        )
        .route(
            "/api/v1/pipelines/{name}",
            get(pipelines::get_pipeline).put(pipelines::update_pipeline),
        )
        .route(
            "/api/v1/pipelines/{name}/versions",
            get(pipelines::list_versions),
        )
        .route(
            "/api/v1/pipelines/{name}/versions/{version}",
            get(pipelines::get_version),
        )
        .route(
            "/api/v1/pipelines/{name}/archive",
            post(pipelines::archive_pipeline),
        )
        .route(
            "/api/v1/pipelines/{name}/unarchive",
            post(pipelines::unarchive_pipeline),
        )
        .route("/api/v1/runs", get(runs::list_runs).post(runs::trigger_run))
        .route("/api/v1/runs/{id}", get(runs::get_run))
        .route("/api/v1/runs/{id}/cancel", post(runs::cancel_run))
        .route("/api/v1/runs/{id}/retry", post(runs::retry_run))
        .route("/api/v1/runs/{id}/task-runs", get(runs::list_task_runs))
        .route("/api/v1/runs/{id}/logs", get(runs::run_logs))
        .route(
            "/api/v1/artifacts",
            get(artifacts::list_artifacts).post(tools::upload_artifact),
        )
        .route("/api/v1/artifacts/{id}", get(artifacts::get_artifact))
        .route(
            "/api/v1/artifacts/{id}/content",
            get(artifacts::download_artifact),
        )
        .route(
            "/api/v1/artifacts/{id}/lineage",
            get(artifacts::artifact_lineage),
        )
        .route("/api/v1/events", get(events::stream_events))
        .merge(auth::routes())
        .merge(account::routes())
        .merge(orgs::routes())
        .merge(audit_log::routes())
        .merge(tools::routes())
        .merge(reviews::routes())
        .merge(search::routes())
        .merge(logs::routes())
}

/// 204 No Content, for handlers that return nothing.
pub fn no_content() -> StatusCode {
    StatusCode::NO_CONTENT
}
