//! The audit trail of requests: every state-changing request (any method but GET, HEAD and
//! OPTIONS) writes one append-only audit event — actor, org, action, target, time, IP,
//! request id and outcome — after its response is decided.
//!
//! The action is named from the route (`POST /api/v1/runs/{id}/cancel` → `runs.cancel`),
//! unless the handler names it with an [`AuditAction`] in the response's extensions; the
//! target comes from an [`crate::api::AuditTarget`] the handler returns, or else from the
//! route's path parameters. The actor is whoever the [`crate::principal::Principal`]
//! extractor authenticated (through the [`PrincipalSlot`]); an anonymous request (a failed
//! login, a sign-up) is recorded without one.

use arches_core::identity::{AuditOutcome, NewAuditEvent};
use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use serde_json::{json, Value};

use crate::api::AuditTarget;
use crate::http::ClientIp;
use crate::principal::PrincipalSlot;
use crate::state::AppState;
use crate::telemetry::RequestId;

/// An action name chosen by the handler (for example `auth.login`), overriding the one
/// derived from the route; with details to record (never secrets).
#[derive(Clone, Debug, PartialEq)]
pub struct AuditAction {
    /// `<resource>.<verb>`.
    pub action: &'static str,
    /// Extra facts.
    pub details: Value,
}

impl axum::response::IntoResponseParts for AuditAction {
    type Error = std::convert::Infallible;

    fn into_response_parts(
        self,
        mut res: axum::response::ResponseParts,
    ) -> Result<axum::response::ResponseParts, Self::Error> {
        res.extensions_mut().insert(self);
        Ok(res)
    }
}

/// The action derived from a route (handlers may name it instead with [`AuditAction`]):
/// - `/collection` → `collection.create|update|delete` by method (`POST /api/v1/runs` →
///   `runs.create`);
/// - `/a/b` with both literal → `a.b` (`POST /api/v1/auth/login` → `auth.login`);
/// - `/resource/{id}/verb` → `resource.verb` (`POST /api/v1/runs/{id}/cancel` →
///   `runs.cancel`);
/// - `…/resource/{id}` → `resource.update|delete|create` by method.
pub fn action_of(method: &Method, route: &str) -> String {
    let segments: Vec<&str> = route
        .trim_start_matches("/api/v1/")
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let is_param = |s: &str| s.starts_with('{');
    let verb = match *method {
        Method::POST => "create",
        Method::PUT | Method::PATCH => "update",
        Method::DELETE => "delete",
        _ => "read",
    };
    let Some(&last) = segments.last() else {
        return format!("api.{verb}");
    };
    if is_param(last) {
        let resource = segments
            .iter()
            .rev()
            .find(|s| !is_param(s))
            .copied()
            .unwrap_or("api");
        return format!("{resource}.{verb}");
    }
    match segments.len() {
        1 => format!("{last}.{verb}"),
        n => {
            let previous = segments[n - 2];
            if is_param(previous) {
                let resource = segments[..n - 1]
                    .iter()
                    .rev()
                    .find(|s| !is_param(s))
                    .copied()
                    .unwrap_or("api");
                format!("{resource}.{last}")
            } else {
                format!("{previous}.{last}")
            }
        }
    }
}

/// Middleware writing the audit event of each state-changing request.
pub async fn audit_requests(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let method = request.method().clone();
    if matches!(method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(request).await;
    }
    let slot = PrincipalSlot::default();
    request.extensions_mut().insert(slot.clone());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let ip = request
        .extensions()
        .get::<ClientIp>()
        .map(|ip| ip.0.to_string());
    let request_id = request
        .extensions()
        .get::<RequestId>()
        .map(|id| id.as_str().to_owned());
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;

    let Some(route) = route else {
        // Unrouted (404/405 fallbacks): nothing changed.
        return response;
    };
    let status = response.status();
    let outcome = if status.is_success() || status.is_redirection() {
        AuditOutcome::Success
    } else if status.as_u16() == 401 || status.as_u16() == 403 {
        AuditOutcome::Denied
    } else {
        AuditOutcome::Failure
    };
    let principal = slot.get();
    let named = response.extensions().get::<AuditAction>().cloned();
    let target = response.extensions().get::<AuditTarget>().cloned();
    let (target_kind, target_id) = match target {
        Some(t) => (Some(t.kind.to_owned()), Some(t.id)),
        None => path_target(&route, &path),
    };
    let event = NewAuditEvent {
        org_id: principal.as_ref().map(|p| p.org_id),
        actor_user_id: principal.as_ref().map(|p| p.user_id),
        actor_api_key_id: principal.as_ref().and_then(|p| p.api_key_id),
        action: named
            .as_ref()
            .map(|a| a.action.to_owned())
            .unwrap_or_else(|| action_of(&method, &route)),
        target_kind,
        target_id,
        at: state.clock.now(),
        ip,
        request_id,
        outcome,
        status: Some(status.as_u16()),
        details: named
            .map(|a| a.details)
            .filter(|d| !d.is_null())
            .unwrap_or_else(|| json!({ "method": method.as_str(), "route": route })),
    };
    state.metrics.inc_audit_events(outcome.as_str());
    if let Err(error) = state.identity.append_audit(&event).await {
        // The change is made; losing its audit record is logged loudly rather than
        // turning a success into an error.
        tracing::error!(%error, action = %event.action, "could not write the audit event");
    }
    response
}

/// The first path parameter of the route, as `(kind, value)`: for
/// `/api/v1/runs/{id}/cancel` and `/api/v1/runs/0191…/cancel`, `("runs", "0191…")`.
fn path_target(route: &str, path: &str) -> (Option<String>, Option<String>) {
    let route_segments = route.split('/');
    let path_segments: Vec<&str> = path.split('/').collect();
    let mut previous = None;
    for (i, segment) in route_segments.enumerate() {
        if segment.starts_with('{') {
            return (
                previous.map(|p: &str| p.to_owned()),
                path_segments.get(i).map(|s| (*s).to_owned()),
            );
        }
        previous = Some(segment);
    }
    (None, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_are_named_from_routes() {
        let cases = [
            (Method::POST, "/api/v1/pipelines", "pipelines.create"),
            (Method::PUT, "/api/v1/pipelines/{name}", "pipelines.update"),
            (
                Method::POST,
                "/api/v1/pipelines/{name}/archive",
                "pipelines.archive",
            ),
            (
                Method::POST,
                "/api/v1/pipelines/validate",
                "pipelines.validate",
            ),
            (Method::POST, "/api/v1/runs", "runs.create"),
            (Method::POST, "/api/v1/runs/{id}/cancel", "runs.cancel"),
            (Method::POST, "/api/v1/auth/login", "auth.login"),
            (
                Method::DELETE,
                "/api/v1/account/sessions/{id}",
                "sessions.delete",
            ),
            (Method::POST, "/api/v1/orgs/{org}/members", "orgs.members"),
        ];
        for (method, route, expected) in cases {
            assert_eq!(action_of(&method, route), expected, "{method} {route}");
        }
    }

    #[test]
    fn the_target_is_the_first_path_parameter() {
        assert_eq!(
            path_target("/api/v1/runs/{id}/cancel", "/api/v1/runs/abc/cancel"),
            (Some("runs".to_owned()), Some("abc".to_owned()))
        );
        assert_eq!(path_target("/api/v1/runs", "/api/v1/runs"), (None, None));
    }
}
