//! Runs: trigger with params, list with filters and cursor pagination, get, cancel, retry
//! from the failed tasks, task runs with their attempts, and task logs (paged, or tailed as
//! server-sent events).

use std::collections::{BTreeMap, HashSet};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use arches_core::execution::{ExecutionLimits, NewRun, RunExecution};
use arches_core::identity::Permission;
use arches_core::pipeline::validate::check_params;
use arches_core::pipeline::{Pipeline, PipelineDef, Templates};
use arches_core::records::{
    AttemptRecord, LogLine, LogQuery, RunFilter, RunRecord, StoredPipeline, TaskRunRecord,
};
use arches_core::{RunId, RunState, TaskId, TaskRunId};
use arches_engine::bus::{BusEvent, Delivery};
use arches_engine::SchedulerHandle;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{self, Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use utoipa::{IntoParams, ToSchema};

use crate::api::{parse_time, rfc3339, AuditTarget, Page};
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery, ErrorCode};
use crate::principal::Principal;
use crate::state::AppState;
use crate::supervisor::EngineSlot;

/// Default and largest page of runs.
const RUNS_PAGE_DEFAULT: u32 = 50;
const RUNS_PAGE_MAX: u32 = 500;
/// Default and largest page of log lines.
const LOGS_PAGE_DEFAULT: u32 = 1000;
const LOGS_PAGE_MAX: u32 = 10_000;

/// A run.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunView {
    /// The run's id (UUIDv7).
    pub id: String,
    /// The pipeline's name.
    pub pipeline: String,
    /// The pipeline version it executes.
    pub pipeline_version: u32,
    /// The params after defaults.
    #[schema(value_type = Object)]
    pub params: Value,
    /// `queued`, `running`, `succeeded`, `failed` or `cancelled`.
    pub state: String,
    /// Why it failed.
    pub error: Option<String>,
    /// RFC 3339 times.
    pub created_at: String,
    /// When it started.
    pub started_at: Option<String>,
    /// When it finished.
    pub finished_at: Option<String>,
    /// Wall-clock duration so far or in all, in milliseconds, once started.
    pub duration_ms: Option<i64>,
}

impl RunView {
    fn new(run: RunRecord, now: arches_core::Timestamp) -> Self {
        let duration_ms = run.started_at.map(|start| {
            (run.finished_at.unwrap_or(now).as_micros() - start.as_micros()).max(0) / 1000
        });
        Self {
            id: run.id.to_string(),
            pipeline: run.pipeline_name,
            pipeline_version: run.pipeline_version,
            params: run.params,
            state: run.state.to_string(),
            error: run.error,
            created_at: rfc3339(run.created_at),
            started_at: run.started_at.map(rfc3339),
            finished_at: run.finished_at.map(rfc3339),
            duration_ms,
        }
    }
}

/// What to run.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TriggerRun {
    /// The pipeline's name.
    pub pipeline: String,
    /// The version; the latest by default.
    pub version: Option<u32>,
    /// Params by name; declared defaults fill the rest.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub params: Map<String, Value>,
}

/// Filters and cursor of the run list.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListRuns {
    /// Only runs of this pipeline.
    pub pipeline: Option<String>,
    /// Only runs in this state.
    pub state: Option<String>,
    /// Only runs created at or after this RFC 3339 time.
    pub created_after: Option<String>,
    /// Only runs created before this RFC 3339 time.
    pub created_before: Option<String>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Page size: 1 to 500, default 50.
    pub limit: Option<u32>,
}

/// One attempt of a task run.
#[derive(Debug, Serialize, ToSchema)]
pub struct AttemptView {
    /// 1-based.
    pub attempt: u32,
    /// `running`, `succeeded`, `failed`, `timed_out`, `lease_expired`, `cancelled`…
    pub state: String,
    /// The worker that ran it.
    pub worker: String,
    /// RFC 3339 times.
    pub started_at: String,
    /// When it ended.
    pub finished_at: Option<String>,
    /// Its error.
    pub error: Option<String>,
}

/// A task run with its attempts.
#[derive(Debug, Serialize, ToSchema)]
pub struct TaskRunView {
    /// The task run's id.
    pub id: String,
    /// The task.
    pub task_id: String,
    /// The fan-out index, for fan-out items.
    pub index: Option<u32>,
    /// How many items a fan-out parent spawned.
    pub fan_out: Option<u32>,
    /// Its state.
    pub state: String,
    /// The current or last attempt number.
    pub attempt: u32,
    /// Rendered inputs.
    #[schema(value_type = Option<Object>)]
    pub inputs: Option<Value>,
    /// Outputs.
    #[schema(value_type = Option<Object>)]
    pub outputs: Option<Value>,
    /// Error.
    pub error: Option<String>,
    /// RFC 3339 times.
    pub created_at: String,
    /// When it started.
    pub started_at: Option<String>,
    /// When it finished.
    pub finished_at: Option<String>,
    /// Its ended attempts, and the running one.
    pub attempts: Vec<AttemptView>,
}

/// Log paging and tailing.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// Only this task's lines.
    pub task: Option<String>,
    /// Only lines after this sequence number (the `next_cursor` of the previous page).
    pub cursor: Option<i64>,
    /// Page size: 1 to 10,000, default 1,000.
    pub limit: Option<u32>,
    /// Tail: answer with server-sent events — the stored lines, then new lines live — until
    /// the run ends.
    #[serde(default)]
    pub follow: bool,
}

/// A log line.
#[derive(Debug, Serialize, ToSchema)]
pub struct LogLineView {
    /// Position in the store's log; a cursor.
    pub seq: Option<i64>,
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
    /// The line.
    pub text: String,
}

impl From<LogLine> for LogLineView {
    fn from(line: LogLine) -> Self {
        Self {
            seq: Some(line.seq),
            task_id: line.task_id.map(|t| t.to_string()),
            task_run_id: line.line.task_run_id.to_string(),
            attempt: line.line.attempt,
            stream: line.line.stream.as_str().to_owned(),
            at: rfc3339(line.line.at),
            text: line.line.text,
        }
    }
}

pub(crate) fn engine(state: &AppState) -> Result<SchedulerHandle, ApiError> {
    state
        .engine
        .as_ref()
        .map(EngineSlot::handle)
        .ok_or_else(|| {
            ApiError::unavailable(
                "this server runs no workers (--no-workers); runs cannot start here",
            )
            .with_retry_after(30)
        })
}

/// A run of the principal's org, or 404.
pub(crate) async fn org_run(
    state: &AppState,
    principal: &Principal,
    id: &str,
) -> Result<RunRecord, ApiError> {
    let run_id: RunId = id.parse().map_err(|_| ApiError::not_found("run", id))?;
    state
        .store
        .run(run_id)
        .await?
        .filter(|run| run.org_id == principal.org_id)
        .ok_or_else(|| ApiError::not_found("run", id))
}

pub(crate) async fn stored_pipeline(
    state: &AppState,
    principal: &Principal,
    name: &str,
    version: Option<u32>,
) -> Result<StoredPipeline, ApiError> {
    let stored = match version {
        Some(version) => {
            state
                .store
                .pipeline(principal.org_id, name, version)
                .await?
        }
        None => state
            .store
            .pipeline_versions(principal.org_id, name)
            .await?
            .into_iter()
            .next(),
    };
    stored.ok_or_else(|| match version {
        Some(v) => ApiError::not_found("pipeline version", format!("{name}@{v}")),
        None => ApiError::not_found("pipeline", name),
    })
}

pub(crate) fn build_pipeline(stored: &StoredPipeline) -> Result<Pipeline, ApiError> {
    let def: PipelineDef = serde_json::from_value(stored.definition.clone()).map_err(|e| {
        ApiError::internal(format!(
            "stored pipeline {} is unreadable: {e}",
            stored.name
        ))
    })?;
    Pipeline::build(def)
        .map_err(|e| ApiError::internal(format!("stored pipeline {}: {e}", stored.name)))
}

/// Starts a run of a pipeline with params.
#[utoipa::path(post, path = "/api/v1/runs", tag = "runs", request_body = TriggerRun,
    responses((status = 201, body = RunView), (status = 404, body = crate::error::ApiErrorBody),
        (status = 409, body = crate::error::ApiErrorBody), (status = 422, body = crate::error::ApiErrorBody)))]
pub async fn trigger_run(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(request): ApiJson<TriggerRun>,
) -> Result<(StatusCode, AuditTarget, Json<RunView>), ApiError> {
    principal.require(Permission::RunTrigger)?;
    let engine = engine(&state)?;
    let stored = stored_pipeline(&state, &principal, &request.pipeline, request.version).await?;
    if stored.archived_at.is_some() {
        return Err(ApiError::conflict(format!(
            "pipeline {:?} is archived; unarchive it to run it",
            stored.name
        )));
    }
    let pipeline = build_pipeline(&stored)?;
    let params = check_params(&pipeline.def, &request.params).map_err(|problems| {
        ApiError::new(ErrorCode::ValidationFailed, problems.join("; "))
            .with_details(json!({ "params": problems }))
    })?;
    let now = state.clock.now();
    let execution = RunExecution::create(
        NewRun {
            id: RunId::new(),
            org_id: principal.org_id,
            pipeline_version: stored.version,
            params,
        },
        pipeline,
        Arc::new(Templates::new()),
        ExecutionLimits::default(),
        now,
    );
    let run_id = engine.submit(execution).await?;
    let run = state
        .store
        .run(run_id)
        .await?
        .ok_or_else(|| ApiError::internal(format!("run {run_id} was not stored")))?;
    Ok((
        StatusCode::CREATED,
        AuditTarget::new("run", run_id),
        Json(RunView::new(run, state.clock.now())),
    ))
}

/// Lists runs, newest first, with filters and a cursor.
#[utoipa::path(get, path = "/api/v1/runs", tag = "runs", params(ListRuns),
    responses((status = 200, body = Page<RunView>), (status = 400, body = crate::error::ApiErrorBody)))]
pub async fn list_runs(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(query): ApiQuery<ListRuns>,
) -> Result<Json<Page<RunView>>, ApiError> {
    principal.require(Permission::RunRead)?;
    let limit = query
        .limit
        .unwrap_or(RUNS_PAGE_DEFAULT)
        .clamp(1, RUNS_PAGE_MAX);
    let state_filter = query
        .state
        .as_deref()
        .map(|s| {
            s.parse::<RunState>().map_err(|_| {
                ApiError::bad_request(format!(
                    "unknown run state {s:?}; use queued, running, succeeded, failed or cancelled"
                ))
                .with_detail("parameter", "state")
            })
        })
        .transpose()?;
    let before = query
        .cursor
        .as_deref()
        .map(|c| {
            c.parse::<RunId>().map_err(|_| {
                ApiError::bad_request("malformed cursor").with_detail("parameter", "cursor")
            })
        })
        .transpose()?;
    let filter = RunFilter {
        org_id: Some(principal.org_id),
        pipeline_name: query.pipeline,
        state: state_filter,
        created_after: query
            .created_after
            .as_deref()
            .map(|t| parse_time("created_after", t))
            .transpose()?,
        created_before: query
            .created_before
            .as_deref()
            .map(|t| parse_time("created_before", t))
            .transpose()?,
        before,
        limit,
    };
    let runs = state.store.runs(&filter).await?;
    let next_cursor = (runs.len() == limit as usize)
        .then(|| runs.last().map(|r| r.id.to_string()))
        .flatten();
    let now = state.clock.now();
    Ok(Json(Page {
        items: runs.into_iter().map(|r| RunView::new(r, now)).collect(),
        next_cursor,
    }))
}

/// One run.
#[utoipa::path(get, path = "/api/v1/runs/{id}", tag = "runs",
    params(("id" = String, Path, description = "Run id")),
    responses((status = 200, body = RunView), (status = 404, body = crate::error::ApiErrorBody)))]
pub async fn get_run(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<RunView>, ApiError> {
    principal.require(Permission::RunRead)?;
    let run = org_run(&state, &principal, &id).await?;
    Ok(Json(RunView::new(run, state.clock.now())))
}

/// Cancels a run: running task runs are stopped, the rest skipped.
#[utoipa::path(post, path = "/api/v1/runs/{id}/cancel", tag = "runs",
    params(("id" = String, Path, description = "Run id")),
    responses((status = 200, body = RunView), (status = 404, body = crate::error::ApiErrorBody),
        (status = 409, body = crate::error::ApiErrorBody)))]
pub async fn cancel_run(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
) -> Result<(AuditTarget, Json<RunView>), ApiError> {
    principal.require(Permission::RunControl)?;
    let run = org_run(&state, &principal, &id).await?;
    if run.state.is_terminal() {
        return Err(ApiError::conflict(format!(
            "run {} already ended {}",
            run.id, run.state
        )));
    }
    engine(&state)?
        .cancel(run.id, &format!("cancelled by user {}", principal.user_id))
        .await?;
    let run = org_run(&state, &principal, &id).await?;
    Ok((
        AuditTarget::new("run", run.id),
        Json(RunView::new(run, state.clock.now())),
    ))
}

/// Retries a failed or cancelled run from its failed tasks: succeeded task runs keep their
/// outputs; failed, cancelled and skipped ones run again.
#[utoipa::path(post, path = "/api/v1/runs/{id}/retry", tag = "runs",
    params(("id" = String, Path, description = "Run id")),
    responses((status = 200, body = RunView), (status = 404, body = crate::error::ApiErrorBody),
        (status = 409, body = crate::error::ApiErrorBody)))]
pub async fn retry_run(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
) -> Result<(AuditTarget, Json<RunView>), ApiError> {
    principal.require(Permission::RunControl)?;
    let engine = engine(&state)?;
    let run = org_run(&state, &principal, &id).await?;
    if !matches!(run.state, RunState::Failed | RunState::Cancelled) {
        return Err(ApiError::conflict(format!(
            "run {} is {}; only failed or cancelled runs can be retried",
            run.id, run.state
        )));
    }
    let stored = stored_pipeline(
        &state,
        &principal,
        &run.pipeline_name,
        Some(run.pipeline_version),
    )
    .await?;
    let pipeline = build_pipeline(&stored)?;
    let task_runs = state.store.task_runs(run.id).await?;
    let attempts = state.store.attempts(run.id).await?;
    let mut execution = RunExecution::restore(
        run,
        pipeline,
        Arc::new(Templates::new()),
        ExecutionLimits::default(),
        task_runs,
        attempts,
    );
    let now = state.clock.now();
    if execution.is_compensated() {
        return Err(ApiError::conflict(
            "the run was compensated (its succeeded tasks were undone), so it cannot be \
             retried; trigger a new run",
        ));
    }
    if execution.retry_failed(now) == 0 {
        return Err(ApiError::conflict(
            "the run has no failed task runs to retry",
        ));
    }
    let run_id = engine.resume(execution).await?;
    let run = org_run(&state, &principal, &run_id.to_string()).await?;
    Ok((
        AuditTarget::new("run", run_id),
        Json(RunView::new(run, now)),
    ))
}

/// The run's task runs with their attempts, in creation order.
#[utoipa::path(get, path = "/api/v1/runs/{id}/task-runs", tag = "runs",
    params(("id" = String, Path, description = "Run id")),
    responses((status = 200, body = Page<TaskRunView>), (status = 404, body = crate::error::ApiErrorBody)))]
pub async fn list_task_runs(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Page<TaskRunView>>, ApiError> {
    principal.require(Permission::RunRead)?;
    let run = org_run(&state, &principal, &id).await?;
    let task_runs = state.store.task_runs(run.id).await?;
    let mut attempts: BTreeMap<TaskRunId, Vec<AttemptRecord>> = BTreeMap::new();
    for attempt in state.store.attempts(run.id).await? {
        attempts
            .entry(attempt.task_run_id)
            .or_default()
            .push(attempt);
    }
    let items = task_runs
        .into_iter()
        .map(|t| {
            let own = attempts.remove(&t.id).unwrap_or_default();
            task_run_view(t, own)
        })
        .collect();
    Ok(Json(Page {
        items,
        next_cursor: None,
    }))
}

fn task_run_view(t: TaskRunRecord, ended: Vec<AttemptRecord>) -> TaskRunView {
    let mut attempts: Vec<AttemptView> = ended
        .into_iter()
        .map(|a| AttemptView {
            attempt: a.attempt,
            state: a.state.to_string(),
            worker: a.worker,
            started_at: rfc3339(a.started_at),
            finished_at: a.finished_at.map(rfc3339),
            error: a.error,
        })
        .collect();
    // The running attempt has no row of its own yet: it is described by its task run.
    if t.state == arches_core::TaskRunState::Running
        && t.fan_out.is_none()
        && attempts.iter().all(|a| a.attempt != t.attempt)
    {
        attempts.push(AttemptView {
            attempt: t.attempt,
            state: "running".to_owned(),
            worker: t.lease_owner.clone().unwrap_or_default(),
            started_at: rfc3339(t.started_at.unwrap_or(t.created_at)),
            finished_at: None,
            error: None,
        });
    }
    TaskRunView {
        id: t.id.to_string(),
        task_id: t.task_id.to_string(),
        index: t.index,
        fan_out: t.fan_out,
        state: t.state.to_string(),
        attempt: t.attempt,
        inputs: t.inputs,
        outputs: t.outputs,
        error: t.error,
        created_at: rfc3339(t.created_at),
        started_at: t.started_at.map(rfc3339),
        finished_at: t.finished_at.map(rfc3339),
        attempts,
    }
}

/// The run's task logs: a page of stored lines after `cursor`, or with `follow=true` a
/// server-sent event stream (`log` events, then `end` when the run is over).
#[utoipa::path(get, path = "/api/v1/runs/{id}/logs", tag = "runs",
    params(("id" = String, Path, description = "Run id"), LogsQuery),
    responses((status = 200, body = Page<LogLineView>, description = "A page of lines, or text/event-stream with follow=true"),
        (status = 404, body = crate::error::ApiErrorBody)))]
pub async fn run_logs(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<LogsQuery>,
) -> Result<Response, ApiError> {
    principal.require(Permission::RunRead)?;
    let run = org_run(&state, &principal, &id).await?;
    let task_id = query
        .task
        .as_deref()
        .map(|t| {
            TaskId::parse(t)
                .map_err(|e| ApiError::bad_request(e.to_string()).with_detail("parameter", "task"))
        })
        .transpose()?;
    let limit = query
        .limit
        .unwrap_or(LOGS_PAGE_DEFAULT)
        .clamp(1, LOGS_PAGE_MAX);
    let log_query = LogQuery {
        run_id: run.id,
        task_id: task_id.clone(),
        after_seq: query.cursor.unwrap_or(0),
        limit,
    };
    if !query.follow {
        let lines = state.store.logs(&log_query).await?;
        let next_cursor = lines.last().map(|l| l.seq.to_string());
        return Ok(Json(Page {
            items: lines.into_iter().map(LogLineView::from).collect::<Vec<_>>(),
            next_cursor,
        })
        .into_response());
    }
    // Subscribe before reading the store, so no line falls between the two; lines seen in
    // both are sent once.
    let live = state.bus.subscribe(None);
    let stored = state.store.logs(&log_query).await?;
    let seen: HashSet<(TaskRunId, u32, i64, String)> = stored
        .iter()
        .map(|l| {
            (
                l.line.task_run_id,
                l.line.attempt,
                l.line.at.as_micros(),
                l.line.text.clone(),
            )
        })
        .collect();
    // Read the run again after subscribing: had it ended between the first read and the
    // subscription, its end would never come from the bus.
    let run = org_run(&state, &principal, &id).await?;
    let ended = run.state.is_terminal();
    let head = stream::iter(
        stored
            .into_iter()
            .map(|line| sse_json("log", &LogLineView::from(line)))
            .collect::<Vec<_>>(),
    );
    let run_id = run.id;
    let tail: std::pin::Pin<Box<dyn Stream<Item = Event> + Send>> = if ended {
        Box::pin(stream::iter(vec![sse_json(
            "end",
            &json!({ "state": run.state }),
        )]))
    } else {
        Box::pin(follow_logs(live, run_id, task_id, seen))
    };
    let events = head
        .chain(tail)
        .take_until(Box::pin(principal.clone().access_lost(state.clone())))
        .map(Ok::<_, Infallible>);
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

fn follow_logs(
    live: futures::stream::BoxStream<'static, Delivery>,
    run_id: RunId,
    task_id: Option<TaskId>,
    seen: HashSet<(TaskRunId, u32, i64, String)>,
) -> impl Stream<Item = Event> + Send {
    stream::unfold((live, seen, false), move |(mut live, seen, done)| {
        let task_id = task_id.clone();
        async move {
            if done {
                return None;
            }
            loop {
                let delivery = live.next().await?;
                let envelope = match delivery {
                    Delivery::Gap => {
                        return Some((
                            sse_json(
                                "reset",
                                &json!({ "reason": "events were missed; reload the log page" }),
                            ),
                            // The missed events may include the run's end: stop here, and the
                            // client reloads from its last cursor.
                            (live, seen, true),
                        ));
                    }
                    Delivery::Event(envelope) => envelope,
                };
                if envelope.event.run_id() != run_id {
                    continue;
                }
                match &envelope.event {
                    BusEvent::Log(log) => {
                        let line = &log.line;
                        if task_id.as_ref().is_some_and(|t| *t != line.task_id) {
                            continue;
                        }
                        let key = (
                            line.task_run_id,
                            line.attempt,
                            line.at.as_micros(),
                            line.text.clone(),
                        );
                        if seen.contains(&key) {
                            continue;
                        }
                        let view = LogLineView {
                            seq: None,
                            task_id: Some(line.task_id.to_string()),
                            task_run_id: line.task_run_id.to_string(),
                            attempt: line.attempt,
                            stream: line.stream.as_str().to_owned(),
                            at: rfc3339(line.at),
                            text: line.text.clone(),
                        };
                        return Some((sse_json("log", &view), (live, seen, false)));
                    }
                    BusEvent::Domain(arches_core::events::DomainEvent::RunStateChanged {
                        state,
                        ..
                    }) if state.is_terminal() => {
                        return Some((
                            sse_json("end", &json!({ "state": state })),
                            (live, seen, true),
                        ));
                    }
                    BusEvent::Domain(_) => continue,
                }
            }
        }
    })
}

/// One server-sent event with a JSON payload.
pub(crate) fn sse_json(kind: &str, payload: &impl Serialize) -> Event {
    Event::default()
        .event(kind)
        .json_data(payload)
        .unwrap_or_else(|_| Event::default().event(kind).data("{}"))
}
