//! Full-text search over the task log lines of the caller's org's runs
//! (`GET /api/v1/logs/search`).
//!
//! A route of its own rather than a parameter of `GET /api/v1/runs/{id}/logs`: a search spans
//! every run of the org (a run is an optional filter), ranks by relevance instead of paging by
//! position, and its hits name their run. It reads the same lines as that route, so it asks
//! for the same permission, [`Permission::RunRead`].

use arches_core::identity::Permission;
use arches_core::log_search::{
    LogHit, LogSearch, LogSearchQuery, LOG_SEARCH_LIMIT_DEFAULT, LOG_SEARCH_LIMIT_MAX,
};
use arches_core::records::LogStream;
use arches_core::TaskId;
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::api::runs::org_run;
use crate::api::{parse_time, rfc3339};
use crate::error::{ApiError, ApiQuery};
use crate::principal::Principal;
use crate::state::AppState;

/// The log search API's OpenAPI paths.
#[derive(OpenApi)]
#[openapi(paths(search_logs), components(schemas(LogSearchResults, LogHitView)))]
pub struct LogsApi;

/// The routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new().route("/api/v1/logs/search", get(search_logs))
}

/// What to search for, and where.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogSearchParams {
    /// The query (required, at most 1,000 characters and 32 words): every term must be in
    /// the line. A term is a word, or a phrase in double quotes whose words must be
    /// adjacent; words are letters and digits, matched whole and case-insensitively, and any
    /// other character separates them (`connection_refused` is the phrase
    /// `"connection refused"`). There are no operators: `OR`, `NOT`, `NEAR`, `*` and `-`
    /// are plain text. A quote left open runs to the end.
    pub q: Option<String>,
    /// Only lines of this run (an id of the caller's org; 404 otherwise).
    pub run_id: Option<String>,
    /// Only lines of this task (all its task runs and fan-out items).
    pub task: Option<String>,
    /// Only lines of this stream: `stdout`, `stderr` or `system`.
    pub stream: Option<String>,
    /// Only lines written at or after this RFC 3339 time.
    pub since: Option<String>,
    /// Only lines written before this RFC 3339 time.
    pub until: Option<String>,
    /// Hits wanted: 1 to 1,000, default 100.
    pub limit: Option<u32>,
}

/// A log line that matched.
#[derive(Debug, Serialize, ToSchema)]
pub struct LogHitView {
    /// Relevance, higher is better; comparable only between hits of one search (BM25 on
    /// SQLite, `ts_rank` on PostgreSQL).
    pub score: f64,
    /// The run.
    pub run_id: String,
    /// Position in the store's log: a cursor of `GET /api/v1/runs/{id}/logs`.
    pub seq: i64,
    /// The task.
    pub task_id: Option<String>,
    /// The task run.
    pub task_run_id: String,
    /// The attempt.
    pub attempt: u32,
    /// `stdout`, `stderr` or `system`.
    pub stream: String,
    /// RFC 3339 time.
    pub at: String,
    /// The whole line.
    pub text: String,
}

impl From<LogHit> for LogHitView {
    fn from(hit: LogHit) -> Self {
        let LogHit { line, score } = hit;
        Self {
            score,
            run_id: line.line.run_id.to_string(),
            seq: line.seq,
            task_id: line.task_id.map(|t| t.to_string()),
            task_run_id: line.line.task_run_id.to_string(),
            attempt: line.line.attempt,
            stream: line.line.stream.as_str().to_owned(),
            at: rfc3339(line.line.at),
            text: line.line.text,
        }
    }
}

/// The hits of a log search.
#[derive(Debug, Serialize, ToSchema)]
pub struct LogSearchResults {
    /// Best first; lines of equal relevance newest first.
    pub hits: Vec<LogHitView>,
}

fn bad_parameter(parameter: &str, message: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!("{parameter}: {message}")).with_detail("parameter", parameter)
}

/// Searches the task log lines of the caller's org's runs by full text.
#[utoipa::path(get, path = "/api/v1/logs/search", tag = "runs", params(LogSearchParams),
    responses((status = 200, body = LogSearchResults),
        (status = 400, body = crate::error::ApiErrorBody, description = "A bad parameter, named in `details.parameter`"),
        (status = 404, body = crate::error::ApiErrorBody, description = "`run_id` names no run of the org")))]
pub async fn search_logs(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(params): ApiQuery<LogSearchParams>,
) -> Result<Json<LogSearchResults>, ApiError> {
    principal.require(Permission::RunRead)?;
    let text = params
        .q
        .as_deref()
        .ok_or_else(|| bad_parameter("q", "the query is required"))?;
    let query = LogSearchQuery::parse(text).map_err(|error| bad_parameter("q", error))?;
    let task_id = params
        .task
        .as_deref()
        .map(|task| TaskId::parse(task).map_err(|error| bad_parameter("task", error)))
        .transpose()?;
    let stream = params
        .stream
        .as_deref()
        .map(|name| {
            LogStream::parse(name).ok_or_else(|| {
                bad_parameter(
                    "stream",
                    format!("{name:?} is not stdout, stderr or system"),
                )
            })
        })
        .transpose()?;
    let since = params
        .since
        .as_deref()
        .map(|t| parse_time("since", t))
        .transpose()?;
    let until = params
        .until
        .as_deref()
        .map(|t| parse_time("until", t))
        .transpose()?;
    let limit = params.limit.unwrap_or(LOG_SEARCH_LIMIT_DEFAULT);
    if !(1..=LOG_SEARCH_LIMIT_MAX).contains(&limit) {
        return Err(bad_parameter(
            "limit",
            format!("{limit} is outside 1..={LOG_SEARCH_LIMIT_MAX}"),
        ));
    }
    let run_id = match params.run_id.as_deref() {
        None => None,
        Some(id) => Some(org_run(&state, &principal, id).await?.id),
    };
    let hits = state
        .store
        .search_logs(&LogSearch {
            org_id: principal.org_id,
            query,
            run_id,
            task_id,
            stream,
            since,
            until,
            limit,
        })
        .await?;
    Ok(Json(LogSearchResults {
        hits: hits.into_iter().map(LogHitView::from).collect(),
    }))
}
