//! Live events: server-sent events of run and task-run state changes and task log lines,
//! filtered by org (always), run and kind, resumable with `Last-Event-ID`.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::time::Duration;

use arches_core::identity::Permission;
use arches_engine::bus::{Delivery, EventId};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::StreamExt;
use serde::Deserialize;
use serde_json::json;
use utoipa::IntoParams;

use crate::api::parse_run_id;
use crate::error::{ApiError, ApiQuery};
use crate::principal::Principal;
use crate::state::AppState;

/// Event stream filters.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Only this run's events.
    pub run_id: Option<String>,
    /// Comma-separated kinds among `run`, `task_run`, `review` and `log` (default: all).
    pub kinds: Option<String>,
    /// Resume after this event id (the `Last-Event-ID` header wins when both are given).
    pub last_event_id: Option<String>,
}

/// A server-sent event stream. Each event has an `id` (`<epoch>-<seq>`, resumable with
/// `Last-Event-ID`), a kind in `event` (`run`, `task_run`, `log`, or `reset` when events were
/// missed and the client should reload its state) and a JSON payload in `data`.
#[utoipa::path(get, path = "/api/v1/events", tag = "events", params(EventsQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id")),
    responses((status = 200, description = "text/event-stream"), (status = 400, body = crate::error::ApiErrorBody)))]
pub async fn stream_events(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<EventsQuery>,
) -> Result<Response, ApiError> {
    principal.require(Permission::RunRead)?;
    let run_id = query.run_id.as_deref().map(parse_run_id).transpose()?;
    let kinds: Option<BTreeSet<String>> = match query.kinds.as_deref() {
        None | Some("") => None,
        Some(text) => {
            let kinds: BTreeSet<String> = text.split(',').map(|k| k.trim().to_owned()).collect();
            if let Some(bad) = kinds
                .iter()
                .find(|k| !matches!(k.as_str(), "run" | "task_run" | "review" | "log"))
            {
                return Err(ApiError::bad_request(format!(
                    "unknown event kind {bad:?}; use run, task_run, review or log"
                ))
                .with_detail("parameter", "kinds"));
            }
            Some(kinds)
        }
    };
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or(query.last_event_id);
    let after = last
        .as_deref()
        .map(|text| {
            text.parse::<EventId>()
                .map_err(|e| ApiError::bad_request(e).with_detail("parameter", "Last-Event-ID"))
        })
        .transpose()?;
    let org_id = principal.org_id;
    let events = state
        .bus
        .subscribe(after)
        .filter_map(move |delivery| {
            let kinds = kinds.clone();
            async move {
                match delivery {
                    Delivery::Gap => Some(
                        Event::default()
                            .event("reset")
                            .data(json!({ "reason": "events were missed; reload" }).to_string()),
                    ),
                    Delivery::Event(envelope) => {
                        let event = &envelope.event;
                        let wanted = event.org_id() == org_id
                            && run_id.is_none_or(|r| r == event.run_id())
                            && kinds.as_ref().is_none_or(|k| k.contains(event.kind()));
                        wanted.then(|| {
                            Event::default()
                                .id(envelope.id.to_string())
                                .event(event.kind())
                                .json_data(event)
                                .unwrap_or_else(|_| Event::default().event(event.kind()))
                        })
                    }
                }
            }
        })
        .take_until(Box::pin(principal.clone().access_lost(state.clone())))
        .map(Ok::<_, Infallible>);
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}
