//! Prometheus metrics: one [`Metrics`] per app, holding its own `prometheus-client`
//! [`Registry`] (no global recorder, so tests and several apps in one process stay
//! independent).
//!
//! HTTP metrics are recorded by the [`record_http_metrics`] middleware; engine gauges and
//! counters are set by the server through the setter methods. Label values must come from
//! bounded sets: the route is the axum route template (or `unmatched`), never the raw path.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::header::{self, HeaderValue};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tokio::time::Instant;

use crate::telemetry::route_label;

/// Upper bounds of the request duration histogram buckets, in seconds: from 0.5 ms (a
/// cached read) to 10 s (beyond that the request timeout is near), roughly 1-2.5-5 per
/// decade as in the Prometheus client defaults.
pub const HTTP_DURATION_BUCKETS_SECS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The content type of [`Metrics::render`] output (OpenMetrics text 1.0.0).
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    method: &'static str,
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabels {
    host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScopeLabels {
    scope: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabels {
    org: String,
    pipeline: String,
    task: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShareLabels {
    org: String,
    pipeline: String,
    task: String,
    thresholds: &'static str,
}

type RatioGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

type HistogramFamily = Family<HttpLabels, Histogram, fn() -> Histogram>;

fn http_duration_histogram() -> Histogram {
    Histogram::new(HTTP_DURATION_BUCKETS_SECS)
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    http_requests: Family<HttpLabels, Counter>,
    http_request_duration: HistogramFamily,
    runs: Family<StateLabels, Gauge>,
    task_runs: Family<StateLabels, Gauge>,
    queue_depth: Gauge,
    worker_slots_busy: Gauge,
    lease_expiries: Counter,
    audit_events: Family<OutcomeLabels, Counter>,
    rate_limited: Family<ScopeLabels, Counter>,
    http_tool_breaker: Family<HostLabels, Gauge>,
    review_decisions: Family<StateLabels, Counter>,
    review_queue_share: Family<ShareLabels, RatioGauge>,
    review_precision: Family<TaskLabels, RatioGauge>,
}

/// The server's metrics. Cheap to clone (an `Arc` inside); all clones share one registry.
///
/// Series (`_total` is added to counters by the encoder):
///
/// | name | type | labels |
/// | --- | --- | --- |
/// | `arches_http_requests_total` | counter | method, route, status |
/// | `arches_http_request_duration_seconds` | histogram ([`HTTP_DURATION_BUCKETS_SECS`]) | method, route, status |
/// | `arches_runs` | gauge | state |
/// | `arches_task_runs` | gauge | state |
/// | `arches_queue_depth` | gauge | |
/// | `arches_worker_slots_busy` | gauge | |
/// | `arches_lease_expiries_total` | counter | |
/// | `arches_audit_events_total` | counter | outcome |
/// | `arches_rate_limited_total` | counter | scope |
/// | `arches_http_tool_breaker_state` | gauge (0 closed, 1 open, 2 half-open) | host |
/// | `arches_review_decisions_total` | counter | state (approved, rejected, …) |
/// | `arches_review_queue_share` | gauge (0 to 1) | org, pipeline, task, thresholds (current, fixed) |
/// | `arches_review_precision` | gauge (0 to 1) | org, pipeline, task |
#[derive(Clone, Debug)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Metrics in a fresh registry.
    pub fn new() -> Self {
        Self::with_registry(Registry::default())
    }

    /// Registers the server's metrics into `registry`, which may already hold metrics of
    /// other components; all of them are rendered together.
    pub fn with_registry(mut registry: Registry) -> Self {
        let http_requests = Family::<HttpLabels, Counter>::default();
        let http_request_duration =
            HistogramFamily::new_with_constructor(http_duration_histogram as fn() -> Histogram);
        let runs = Family::<StateLabels, Gauge>::default();
        let task_runs = Family::<StateLabels, Gauge>::default();
        let queue_depth = Gauge::default();
        let worker_slots_busy = Gauge::default();
        let lease_expiries = Counter::default();
        let audit_events = Family::<OutcomeLabels, Counter>::default();
        let rate_limited = Family::<ScopeLabels, Counter>::default();
        let http_tool_breaker = Family::<HostLabels, Gauge>::default();
        let review_decisions = Family::<StateLabels, Counter>::default();
        let review_queue_share = Family::<ShareLabels, RatioGauge>::default();
        let review_precision = Family::<TaskLabels, RatioGauge>::default();

        registry.register(
            "arches_http_requests",
            "HTTP requests answered, by method, route template and status",
            http_requests.clone(),
        );
        registry.register_with_unit(
            "arches_http_request_duration",
            "Time from receiving a request to its response headers",
            Unit::Seconds,
            http_request_duration.clone(),
        );
        registry.register(
            "arches_runs",
            "Runs by state, as last reported by the engine",
            runs.clone(),
        );
        registry.register(
            "arches_task_runs",
            "Task runs by state, as last reported by the engine",
            task_runs.clone(),
        );
        registry.register(
            "arches_queue_depth",
            "Task runs ready and waiting for a worker slot",
            queue_depth.clone(),
        );
        registry.register(
            "arches_worker_slots_busy",
            "Worker slots executing a task run",
            worker_slots_busy.clone(),
        );
        registry.register(
            "arches_lease_expiries",
            "Task leases that expired and were handed to another worker",
            lease_expiries.clone(),
        );
        registry.register(
            "arches_audit_events",
            "Audit events recorded, by outcome",
            audit_events.clone(),
        );
        registry.register(
            "arches_rate_limited",
            "Requests refused by a rate limit, by scope",
            rate_limited.clone(),
        );
        registry.register(
            "arches_http_tool_breaker_state",
            "Circuit breaker of the http tool per host: 0 closed, 1 open, 2 half-open",
            http_tool_breaker.clone(),
        );
        registry.register(
            "arches_review_decisions",
            "Decisions on validation-queue items, by the state they left the item in",
            review_decisions.clone(),
        );
        registry.register(
            "arches_review_queue_share",
            "Estimated share of a routed task's results that wait for a reviewer, under its \
             current thresholds (calibrated once there is enough feedback) and its fixed ones, \
             from the reviewers' feedback",
            review_queue_share.clone(),
        );
        registry.register(
            "arches_review_precision",
            "Estimated precision of a routed task's auto-applied results, from the reviewers' \
             feedback",
            review_precision.clone(),
        );

        Metrics {
            inner: Arc::new(Inner {
                registry,
                http_requests,
                http_request_duration,
                runs,
                task_runs,
                queue_depth,
                worker_slots_busy,
                lease_expiries,
                audit_events,
                rate_limited,
                http_tool_breaker,
                review_decisions,
                review_queue_share,
                review_precision,
            }),
        }
    }

    /// Counts one answered request and observes its duration. `route` is the route
    /// template or [`crate::telemetry::UNMATCHED_ROUTE`]; an unusual method is counted as
    /// `other`.
    pub fn observe_http_request(
        &self,
        method: &Method,
        route: &str,
        status: StatusCode,
        duration: Duration,
    ) {
        let labels = HttpLabels {
            method: method_label(method),
            route: route.to_owned(),
            status: status.as_u16(),
        };
        self.inner.http_requests.get_or_create(&labels).inc();
        self.inner
            .http_request_duration
            .get_or_create(&labels)
            .observe(duration.as_secs_f64());
    }

    /// Sets `arches_runs{state}` to `count`. `state` is a run state name (a bounded set).
    pub fn set_runs(&self, state: &str, count: i64) {
        self.inner
            .runs
            .get_or_create(&state_labels(state))
            .set(count);
    }

    /// Sets `arches_task_runs{state}` to `count`. `state` is a task run state name.
    pub fn set_task_runs(&self, state: &str, count: i64) {
        self.inner
            .task_runs
            .get_or_create(&state_labels(state))
            .set(count);
    }

    /// Sets `arches_http_tool_breaker_state{host}` to `value` (0 closed, 1 open, 2
    /// half-open). Hosts are the ones the tool contacted, which its allowed hosts bound.
    pub fn set_http_tool_breaker(&self, host: &str, value: i64) {
        self.inner
            .http_tool_breaker
            .get_or_create(&HostLabels {
                host: host.to_owned(),
            })
            .set(value);
    }

    /// Adds one to `arches_review_decisions_total{state}`.
    pub fn inc_review_decisions(&self, state: &str) {
        self.inner
            .review_decisions
            .get_or_create(&StateLabels {
                state: state.to_owned(),
            })
            .inc();
    }

    /// Sets a routed task's calibration gauges: `arches_review_queue_share` under the
    /// current and the fixed thresholds, and `arches_review_precision` (each when known).
    pub fn set_review_calibration(
        &self,
        org: &str,
        pipeline: &str,
        task: &str,
        queue_share: Option<f64>,
        fixed_queue_share: Option<f64>,
        precision: Option<f64>,
    ) {
        let share = |thresholds: &'static str| ShareLabels {
            org: org.to_owned(),
            pipeline: pipeline.to_owned(),
            task: task.to_owned(),
            thresholds,
        };
        if let Some(v) = queue_share {
            self.inner
                .review_queue_share
                .get_or_create(&share("current"))
                .set(v);
        }
        if let Some(v) = fixed_queue_share {
            self.inner
                .review_queue_share
                .get_or_create(&share("fixed"))
                .set(v);
        }
        if let Some(v) = precision {
            self.inner
                .review_precision
                .get_or_create(&TaskLabels {
                    org: org.to_owned(),
                    pipeline: pipeline.to_owned(),
                    task: task.to_owned(),
                })
                .set(v);
        }
    }

    /// Sets `arches_queue_depth` to `count` task runs.
    pub fn set_queue_depth(&self, count: i64) {
        self.inner.queue_depth.set(count);
    }

    /// Sets `arches_worker_slots_busy` to `count` slots.
    pub fn set_worker_slots_busy(&self, count: i64) {
        self.inner.worker_slots_busy.set(count);
    }

    /// Adds `count` to `arches_lease_expiries_total`.
    pub fn inc_lease_expiries(&self, count: u64) {
        self.inner.lease_expiries.inc_by(count);
    }

    /// Adds one to `arches_audit_events_total{outcome}`; `outcome` is e.g. `success`,
    /// `denied` or `failure` (a bounded set).
    pub fn inc_audit_events(&self, outcome: &str) {
        self.inner
            .audit_events
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// Adds one to `arches_rate_limited_total{scope}`; `scope` is `ip`, `user` or
    /// `api_key`.
    pub fn inc_rate_limited(&self, scope: &str) {
        self.inner
            .rate_limited
            .get_or_create(&ScopeLabels {
                scope: scope.to_owned(),
            })
            .inc();
    }

    /// Every metric in the OpenMetrics text format ([`OPENMETRICS_CONTENT_TYPE`]), ending in
    /// `# EOF`.
    pub fn render(&self) -> String {
        let mut text = String::new();
        if let Err(error) =
            prometheus_client::encoding::text::encode(&mut text, &self.inner.registry)
        {
            // Writing to a String cannot fail; a failure would be a bug in an encoder.
            tracing::error!(%error, "encoding metrics failed");
        }
        text
    }

    /// The rendered metrics as an HTTP response with the OpenMetrics content type.
    pub fn response(&self) -> Response {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(OPENMETRICS_CONTENT_TYPE),
            )],
            self.render(),
        )
            .into_response()
    }

    /// A router serving `GET /metrics`; merge it into the app (it needs no state).
    pub fn routes<S>(&self) -> Router<S>
    where
        S: Clone + Send + Sync + 'static,
    {
        let metrics = self.clone();
        Router::new().route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move { metrics.response() }
            }),
        )
    }
}

fn state_labels(state: &str) -> StateLabels {
    StateLabels {
        state: state.to_owned(),
    }
}

/// Standard methods keep their name; anything else is `other`, so a client cannot create
/// series by inventing methods.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// Middleware: records `arches_http_requests_total` and
/// `arches_http_request_duration_seconds` for every response, labelled with the route
/// template. Add it with `axum::middleware::from_fn_with_state(metrics, record_http_metrics)`
/// through `Router::layer`, so that the matched route is known.
pub async fn record_http_metrics(
    State(metrics): State<Metrics>,
    request: Request,
    next: Next,
) -> Response {
    let method = request.method().clone();
    let route = route_label(&request);
    let started = Instant::now();
    let response = next.run(request).await;
    metrics.observe_http_request(&method, &route, response.status(), started.elapsed());
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use tower::ServiceExt;

    #[tokio::test]
    async fn a_request_through_the_layer_shows_up_with_its_route_template_and_status() {
        let metrics = Metrics::new();
        let router = Router::new()
            .route("/api/v1/runs/{id}", get(|| async { "run" }))
            .layer(axum::middleware::from_fn_with_state(
                metrics.clone(),
                record_http_metrics,
            ));
        for uri in ["/api/v1/runs/1", "/api/v1/runs/2", "/secret/raw/path"] {
            let response = router
                .clone()
                .oneshot(Request::get(uri).body(Body::empty()).expect("request"))
                .await
                .expect("infallible");
            drop(response);
        }
        let text = metrics.render();
        assert!(
            text.contains(
                r#"arches_http_requests_total{method="GET",route="/api/v1/runs/{id}",status="200"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"arches_http_requests_total{method="GET",route="unmatched",status="404"} 1"#
            ),
            "{text}"
        );
        assert!(!text.contains("/secret/raw/path"), "{text}");
        assert!(
            text.contains("# UNIT arches_http_request_duration_seconds seconds"),
            "{text}"
        );
        assert!(
            text.contains(
                r#"arches_http_request_duration_seconds_bucket{le="0.0005",method="GET",route="/api/v1/runs/{id}",status="200"}"#
            ),
            "{text}"
        );
        assert!(text.trim_end().ends_with("# EOF"));
    }

    #[test]
    fn engine_gauges_and_counters_render() {
        let metrics = Metrics::new();
        metrics.set_runs("running", 3);
        metrics.set_task_runs("queued", 5);
        metrics.set_queue_depth(5);
        metrics.set_worker_slots_busy(2);
        metrics.inc_lease_expiries(4);
        metrics.inc_audit_events("denied");
        metrics.inc_rate_limited("ip");
        let text = metrics.render();
        for line in [
            r#"arches_runs{state="running"} 3"#,
            r#"arches_task_runs{state="queued"} 5"#,
            "arches_queue_depth 5",
            "arches_worker_slots_busy 2",
            "arches_lease_expiries_total 4",
            r#"arches_audit_events_total{outcome="denied"} 1"#,
            r#"arches_rate_limited_total{scope="ip"} 1"#,
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[tokio::test]
    async fn two_apps_keep_separate_registries_and_the_route_serves_openmetrics() {
        let first = Metrics::new();
        let second = Metrics::new();
        first.inc_lease_expiries(1);
        assert!(second.render().contains("arches_lease_expiries_total 0"));

        let response = first
            .routes::<()>()
            .oneshot(
                Request::get("/metrics")
                    .body(Body::empty())
                    .expect("request"),
            )
            .await
            .expect("infallible");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            OPENMETRICS_CONTENT_TYPE
        );
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("body");
        assert!(String::from_utf8_lossy(&bytes).contains("arches_lease_expiries_total 1"));
    }

    #[test]
    fn invented_methods_share_one_label() {
        let method = Method::from_bytes(b"BREW").expect("a valid token");
        assert_eq!(method_label(&method), "other");
    }
}
