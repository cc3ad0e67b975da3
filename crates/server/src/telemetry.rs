//! Logs, request ids and W3C trace context.
//!
//! - [`init_tracing`] installs the process-wide `tracing` subscriber (JSON or text).
//! - [`request_id`] gives every request a [`RequestId`]: the caller's `x-request-id` when it
//!   is a sane token, else a fresh UUIDv7; it is echoed in the response and readable by
//!   handlers (an extractor) and by [`crate::error::ApiError::internal`] (a task-local).
//! - [`trace_requests`] continues the caller's trace ([`TraceContext`], W3C Trace Context
//!   level 1) with a new span id, runs the request inside a `http_request` span carrying the
//!   ids, logs one line when the response is ready, and returns the server span's
//!   `traceparent`.
//!
//! Malformed `x-request-id` and `traceparent` headers are replaced, never rejected: tracing
//! must not make a request fail.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{FromRequestParts, MatchedPath, Request};
use axum::http::header::{HeaderMap, HeaderName, HeaderValue};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::Response;
use tracing::field::Empty;
use tracing::Instrument;
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};
use crate::error::{ApiError, ErrorCode};
use crate::http::ClientIp;

/// The request id header, read from requests and written on every response.
pub static REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// The W3C trace context header (<https://www.w3.org/TR/trace-context/#traceparent-header>).
pub static TRACEPARENT_HEADER: HeaderName = HeaderName::from_static("traceparent");

/// The longest incoming request id that is kept, in characters.
pub const REQUEST_ID_MAX_CHARS: usize = 128;

/// The route label of a request that matched no route. Raw paths are never used as labels
/// so that log and metric cardinality stays bounded.
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// Why [`init_tracing`] failed.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The log level is not a valid `tracing` filter.
    #[error("invalid log filter {filter:?}: {message}")]
    InvalidFilter {
        /// The filter text.
        filter: String,
        /// The parser's message.
        message: String,
    },
}

/// Installs the global `tracing` subscriber: JSON lines or text on stdout, filtered by
/// `RUST_LOG` when set, else by `config.level`. Returns `Ok(false)` without changing
/// anything if a subscriber is already installed (a second call, or a test harness).
///
/// # Errors
///
/// [`TelemetryError::InvalidFilter`] if the filter does not parse.
pub fn init_tracing(config: &LogConfig) -> Result<bool, TelemetryError> {
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .filter(|value| !value.trim().is_empty());
    let filter_text = from_env.unwrap_or_else(|| config.level.clone());
    let filter =
        EnvFilter::try_new(&filter_text).map_err(|error| TelemetryError::InvalidFilter {
            filter: filter_text.clone(),
            message: error.to_string(),
        })?;
    // Colours only on a terminal: a log redirected to a file or a collector stays plain text
    // that `grep ' ERROR '` finds.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let installed = match config.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init()
            .is_ok(),
        LogFormat::Text => builder.try_init().is_ok(),
    };
    Ok(installed)
}

tokio::task_local! {
    static CURRENT_REQUEST_ID: RequestId;
}

/// The id of one request: the caller's `x-request-id` if it is 1 to
/// [`REQUEST_ID_MAX_CHARS`] characters of `[A-Za-z0-9._-]`, else a UUIDv7.
///
/// Extract it in a handler (`request_id: RequestId`); it is also available as
/// [`RequestId::current`] while the request's future runs.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RequestId(Arc<str>);

impl RequestId {
    /// Accepts `text` if it is a sane token (see the type docs).
    pub fn parse(text: &str) -> Option<Self> {
        let sane = !text.is_empty()
            && text.len() <= REQUEST_ID_MAX_CHARS
            && text
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'));
        sane.then(|| RequestId(Arc::from(text)))
    }

    /// A new UUIDv7 id (time-ordered, so ids sort by arrival).
    pub fn generate() -> Self {
        RequestId(Arc::from(uuid::Uuid::now_v7().to_string()))
    }

    /// The id text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id of the request whose future is running on this task, if any. Work spawned
    /// onto another task does not inherit it.
    pub fn current() -> Option<RequestId> {
        CURRENT_REQUEST_ID.try_with(Clone::clone).ok()
    }

    /// Runs `future` with this id as [`RequestId::current`].
    pub async fn scope<F: Future>(self, future: F) -> F::Output {
        CURRENT_REQUEST_ID.scope(self, future).await
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for RequestId {
    type Rejection = ApiError;

    /// Fails with a 500 only if the [`request_id`] middleware is not installed (a bug).
    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<RequestId>()
            .cloned()
            .ok_or_else(|| ApiError::internal("the request id middleware is not installed"))
    }
}

/// Middleware: assigns the [`RequestId`] (request extension and task-local) and writes it
/// to the response's `x-request-id`.
pub async fn request_id(mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(&REQUEST_ID_HEADER)
        .and_then(|value| value.to_str().ok())
        .and_then(RequestId::parse)
        .unwrap_or_else(RequestId::generate);
    request.extensions_mut().insert(id.clone());
    let mut response = id.clone().scope(next.run(request)).await;
    if let Ok(value) = HeaderValue::from_str(id.as_str()) {
        response
            .headers_mut()
            .insert(REQUEST_ID_HEADER.clone(), value);
    }
    response
}

/// A W3C trace context (`traceparent`, version 00): a 16-byte trace id, the 8-byte id of a
/// span (the parent span when parsed from a request, this server's span when stored in the
/// request extensions), and the trace flags (bit 0: sampled).
///
/// Spec: <https://www.w3.org/TR/trace-context/#traceparent-header>.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceContext {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    flags: u8,
}

/// The `sampled` trace flag (bit 0).
const FLAG_SAMPLED: u8 = 0x01;

/// Length of a version-00 `traceparent` value: `2 + 1 + 32 + 1 + 16 + 1 + 2`.
const TRACEPARENT_LEN: usize = 55;

impl TraceContext {
    /// Parses a `traceparent` value; `None` if it is malformed, uses the forbidden version
    /// `ff`, has an all-zero trace or parent id, uses uppercase hex, or (version 00) has
    /// anything after the flags. A future version is read for its first four fields, as the
    /// spec requires, if what follows starts with `-`.
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim_matches([' ', '\t']);
        let bytes = value.as_bytes();
        if bytes.len() < TRACEPARENT_LEN {
            return None;
        }
        let version = parse_hex::<1>(&value[0..2])?[0];
        if version == 0xff {
            return None;
        }
        if version == 0 && bytes.len() != TRACEPARENT_LEN {
            return None;
        }
        if bytes.len() > TRACEPARENT_LEN && bytes[TRACEPARENT_LEN] != b'-' {
            return None;
        }
        if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return None;
        }
        let trace_id = parse_hex::<16>(&value[3..35])?;
        let span_id = parse_hex::<8>(&value[36..52])?;
        let flags = parse_hex::<1>(&value[53..55])?[0];
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceContext {
            trace_id,
            span_id,
            flags,
        })
    }

    /// The context of the first incoming `traceparent` header, if there is exactly one and
    /// it parses (several headers make the trace ambiguous, so they are all ignored).
    pub fn from_headers(headers: &HeaderMap) -> Option<Self> {
        let mut values = headers.get_all(&TRACEPARENT_HEADER).iter();
        let first = values.next()?;
        if values.next().is_some() {
            return None;
        }
        TraceContext::parse(first.to_str().ok()?)
    }

    /// A new trace: random trace and span ids, sampled.
    pub fn new_root() -> Self {
        TraceContext {
            trace_id: random_nonzero(),
            span_id: random_nonzero(),
            flags: FLAG_SAMPLED,
        }
    }

    /// A child span in the same trace: a new random span id, the same flags.
    pub fn child(&self) -> Self {
        TraceContext {
            trace_id: self.trace_id,
            span_id: random_nonzero(),
            flags: self.flags,
        }
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id(&self) -> String {
        to_hex(&self.trace_id)
    }

    /// The span id as 16 lowercase hex digits.
    pub fn span_id(&self) -> String {
        to_hex(&self.span_id)
    }

    /// The trace flags byte.
    pub fn flags(&self) -> u8 {
        self.flags
    }

    /// Whether the caller recorded this trace (flag bit 0).
    pub fn is_sampled(&self) -> bool {
        self.flags & FLAG_SAMPLED != 0
    }

    /// The `traceparent` value, version 00, e.g.
    /// `00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01`.
    pub fn to_traceparent(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            self.trace_id(),
            self.span_id(),
            self.flags
        )
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.to_traceparent())
    }
}

impl<S: Send + Sync> FromRequestParts<S> for TraceContext {
    type Rejection = ApiError;

    /// This server's span for the request (use [`TraceContext::to_traceparent`] to
    /// propagate it to outgoing calls). Fails with a 500 only if [`trace_requests`] is not
    /// installed (a bug).
    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<TraceContext>()
            .copied()
            .ok_or_else(|| ApiError::internal("the tracing middleware is not installed"))
    }
}

/// Lowercase hex only: the spec's HEXDIGLC.
fn parse_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let digits = text.as_bytes();
    if digits.len() != N * 2 {
        return None;
    }
    let nibble = |digit: u8| match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (index, pair) in digits.chunks_exact(2).enumerate() {
        out[index] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn random_nonzero<const N: usize>() -> [u8; N] {
    loop {
        let bytes: [u8; N] = rand::random();
        if bytes != [0; N] {
            return bytes;
        }
    }
}

/// The route template of a request (`/api/v1/runs/{id}`), or [`UNMATCHED_ROUTE`].
pub fn route_label(request: &Request) -> String {
    request.extensions().get::<MatchedPath>().map_or_else(
        || UNMATCHED_ROUTE.to_owned(),
        |path| path.as_str().to_owned(),
    )
}

/// Middleware: continues or starts the trace, runs the request in an `http_request` span
/// with `trace_id`, `span_id`, `parent_span_id`, `request_id`, `client_ip`, `method`,
/// `route`, then `status` and `latency_ms`; logs `request completed` (or `request failed`
/// at error level for a 5xx, with `error_code`); and sets the response `traceparent` to
/// this server's span. Expects [`request_id`] to run first.
pub async fn trace_requests(mut request: Request, next: Next) -> Response {
    let parent = TraceContext::from_headers(request.headers());
    let context = parent.map_or_else(TraceContext::new_root, |parent| parent.child());
    let request_id = request
        .extensions()
        .get::<RequestId>()
        .map(|id| id.as_str().to_owned());
    let client_ip = request.extensions().get::<ClientIp>().map(|ip| ip.0);
    let route = route_label(&request);
    let span = tracing::info_span!(
        "http_request",
        method = %request.method(),
        route = %route,
        request_id = request_id.as_deref().unwrap_or(""),
        trace_id = %context.trace_id(),
        span_id = %context.span_id(),
        parent_span_id = Empty,
        client_ip = Empty,
        status = Empty,
        latency_ms = Empty,
    );
    if let Some(parent) = parent {
        span.record("parent_span_id", parent.span_id());
    }
    if let Some(ip) = client_ip {
        span.record("client_ip", tracing::field::display(ip));
    }
    request.extensions_mut().insert(context);

    let started = Instant::now();
    let mut response = next.run(request).instrument(span.clone()).await;
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    let status = response.status().as_u16();
    span.record("status", status);
    span.record("latency_ms", latency_ms);
    let error_code = response
        .extensions()
        .get::<ErrorCode>()
        .map(|code| code.as_str());
    {
        let _entered = span.enter();
        if response.status().is_server_error() {
            tracing::error!(status, latency_ms, error_code, "request failed");
        } else {
            tracing::info!(status, latency_ms, error_code, "request completed");
        }
    }
    if let Ok(value) = HeaderValue::from_str(&context.to_traceparent()) {
        response
            .headers_mut()
            .insert(TRACEPARENT_HEADER.clone(), value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::routing::get;
    use axum::Router;
    use tower::ServiceExt;

    // Examples from the spec, section 3.2.2.
    const SPEC_SAMPLED: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const SPEC_NOT_SAMPLED: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";

    #[test]
    fn the_spec_examples_parse_and_format_back() {
        let context = TraceContext::parse(SPEC_SAMPLED).expect("valid");
        assert_eq!(context.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(context.span_id(), "00f067aa0ba902b7");
        assert!(context.is_sampled());
        assert_eq!(context.to_traceparent(), SPEC_SAMPLED);

        let context = TraceContext::parse(SPEC_NOT_SAMPLED).expect("valid");
        assert!(!context.is_sampled());
        assert_eq!(context.to_string(), SPEC_NOT_SAMPLED);
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        let invalid = [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            // All-zero trace id and parent id (section 3.2.2.3 and 3.2.2.4).
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // Version ff is forbidden.
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // Uppercase hex is not HEXDIGLC.
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            // Version 00 has nothing after the flags.
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            // Wrong delimiters and non-hex digits.
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "0-04bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // A future version must continue with a dash.
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ];
        for value in invalid {
            assert_eq!(TraceContext::parse(value), None, "{value:?}");
        }
    }

    #[test]
    fn a_future_version_is_read_for_its_known_fields() {
        let context = TraceContext::parse(
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-will-be-like",
        )
        .expect("future versions are forward compatible");
        assert_eq!(context.span_id(), "00f067aa0ba902b7");
        assert_eq!(context.to_traceparent(), SPEC_SAMPLED);
    }

    #[test]
    fn a_child_keeps_the_trace_and_flags_with_a_new_span() {
        let parent = TraceContext::parse(SPEC_NOT_SAMPLED).expect("valid");
        let child = parent.child();
        assert_eq!(child.trace_id(), parent.trace_id());
        assert_ne!(child.span_id(), parent.span_id());
        assert_eq!(child.flags(), parent.flags());
        let root = TraceContext::new_root();
        assert!(root.is_sampled());
        assert_eq!(TraceContext::parse(&root.to_traceparent()), Some(root));
    }

    #[test]
    fn request_ids_accept_only_sane_tokens() {
        assert!(RequestId::parse("abc-123_x.y").is_some());
        assert!(RequestId::parse(&"a".repeat(128)).is_some());
        for bad in ["", "has space", "semi;colon", "ünïcode", &"a".repeat(129)] {
            assert!(RequestId::parse(bad).is_none(), "{bad:?}");
        }
        let generated = RequestId::generate();
        assert_eq!(
            uuid::Uuid::parse_str(generated.as_str())
                .expect("a uuid")
                .get_version_num(),
            7
        );
    }

    fn traced_router() -> Router {
        Router::new()
            .route(
                "/runs/{id}",
                get(|id: RequestId, context: TraceContext| async move {
                    format!("{id} {}", context.trace_id())
                }),
            )
            .layer(axum::middleware::from_fn(trace_requests))
            .layer(axum::middleware::from_fn(request_id))
    }

    async fn call(router: Router, headers: &[(&str, &str)]) -> (HeaderMap, String) {
        let mut builder = Request::get("/runs/7");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let response = router
            .oneshot(builder.body(Body::empty()).expect("request"))
            .await
            .expect("infallible");
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("body");
        (headers, String::from_utf8(bytes.to_vec()).expect("utf-8"))
    }

    #[tokio::test]
    async fn a_sane_incoming_request_id_is_kept_and_echoed() {
        let (headers, body) = call(traced_router(), &[("x-request-id", "client-id-1")]).await;
        assert_eq!(headers["x-request-id"], "client-id-1");
        assert!(body.starts_with("client-id-1 "), "{body}");
    }

    #[tokio::test]
    async fn an_insane_incoming_request_id_is_replaced_by_a_uuid() {
        let (headers, body) = call(traced_router(), &[("x-request-id", "bad id!")]).await;
        let id = headers["x-request-id"].to_str().expect("ascii");
        assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
        assert!(body.starts_with(id));
    }

    #[tokio::test]
    async fn an_incoming_trace_is_continued_with_a_new_span() {
        let (headers, body) = call(traced_router(), &[("traceparent", SPEC_SAMPLED)]).await;
        let returned = headers["traceparent"].to_str().expect("ascii");
        let context = TraceContext::parse(returned).expect("valid traceparent");
        assert_eq!(context.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(context.span_id(), "00f067aa0ba902b7");
        assert!(body.ends_with("4bf92f3577b34da6a3ce929d0e0e4736"));
    }

    #[tokio::test]
    async fn a_malformed_trace_starts_a_new_one() {
        let (headers, _) = call(
            traced_router(),
            &[(
                "traceparent",
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            )],
        )
        .await;
        let context = TraceContext::parse(headers["traceparent"].to_str().expect("ascii"))
            .expect("valid traceparent");
        assert_ne!(context.trace_id(), "00000000000000000000000000000000");
    }

    #[test]
    fn init_tracing_rejects_a_bad_filter_and_tolerates_a_second_call() {
        let bad = LogConfig {
            level: "loud==".to_owned(),
            ..LogConfig::default()
        };
        // RUST_LOG, if the test runner sets it, takes precedence; only check when unset.
        if std::env::var_os("RUST_LOG").is_none() {
            assert!(init_tracing(&bad).is_err());
        }
        // Level `off` keeps the other tests of this binary quiet once this subscriber is
        // installed for the whole process.
        let config = LogConfig {
            level: "off".to_owned(),
            ..LogConfig::default()
        };
        let first = init_tracing(&config).expect("valid filter");
        let second = init_tracing(&config).expect("valid filter");
        assert!(
            !second,
            "a second call must not install again (first: {first})"
        );
    }
}
