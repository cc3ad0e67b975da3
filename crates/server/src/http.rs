//! The HTTP stack around the API routes, graceful shutdown and serving.
//!
//! [`apply_layers`] wraps a router in the cross-cutting layers, outermost first:
//!
//! 1. **request id** ([`crate::telemetry::request_id`]): every response, even a 429 or a
//!    timeout, carries `x-request-id`, and a 500 can name it.
//! 2. **client IP** ([`resolve_client_ip`]): the TCP peer, or the last `X-Forwarded-For`
//!    entry when `http.trust_forwarded_for` is set.
//! 3. **trace context and request log** ([`crate::telemetry::trace_requests`]).
//! 4. **metrics** ([`crate::metrics::record_http_metrics`]): sees every final status.
//! 5. **CORS** (off when `http.cors_allowed_origins` is empty): outside the layers below so
//!    that preflights are answered without spending tokens and a 429, 503 or 500 still
//!    carries the CORS headers a browser needs to read it. A refused origin gets no
//!    `Access-Control-*` header at all.
//! 6. **panic guard**: a panicking handler becomes a 500 in the JSON shape.
//! 7. **per-IP rate limit** ([`crate::ratelimit::limit_per_ip`]): 429 before any work.
//! 8. **request timeout**: 503 `unavailable` after `http.request_timeout_secs`. 503 and not
//!    408, because 408 tells the client it was too slow to send its request, while here the
//!    server was too slow to answer. Only the wait for response headers is bounded, so
//!    server-sent event streams are not cut.
//! 9. **body limit**: 413 `payload_too_large` past `http.body_limit_bytes`, early from
//!    `Content-Length`, else while the body is read.
//! 10. **error normalization** ([`crate::error::normalize_error_bodies`]): a non-JSON error
//!     response from a library gets the JSON shape.
//!
//! The layers are added with `Router::layer`, which wraps every route, so the matched
//! route template is known to the log and metrics layers.

use std::future::{Future, IntoFuture};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequestParts, Request, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::request::Parts;
use axum::http::Method;
use axum::middleware::{from_fn, from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::config::{HttpConfig, ServerConfig};
use crate::error::{normalize_error_bodies, ApiError};
use crate::metrics::{record_http_metrics, Metrics};
use crate::ratelimit::{limit_per_ip, RateLimiter};
use crate::telemetry::{request_id, trace_requests, REQUEST_ID_HEADER, TRACEPARENT_HEADER};

/// How long browsers may cache a CORS preflight answer, in seconds (10 minutes, Chromium's
/// cap is 2 hours; short enough for a config change to reach users soon).
pub const CORS_MAX_AGE_SECS: u64 = 600;

/// Wraps `router` in the server's layers, in the order documented on this module. Call it
/// once, on the complete router (after [`crate::error::with_api_fallbacks`]).
pub fn apply_layers(
    router: Router,
    config: &ServerConfig,
    metrics: Metrics,
    limiter: Arc<RateLimiter>,
) -> Router {
    let http = &config.http;
    let body_limit_bytes = http.body_limit_bytes;
    let timeout = Duration::from_secs(http.request_timeout_secs);

    // `Router::layer` makes the last layer added the outermost: read bottom-up.
    let router = router
        .layer(from_fn(normalize_error_bodies))
        // Axum extractors otherwise cap bodies at their own default of 2 MB.
        .layer(DefaultBodyLimit::max(body_limit_bytes))
        .layer(from_fn_with_state(body_limit_bytes, limit_body))
        .layer(from_fn_with_state(timeout, limit_time))
        .layer(from_fn_with_state(limiter, limit_per_ip))
        .layer(CatchPanicLayer::custom(panic_response));
    let router = match cors_layer(http) {
        Some(cors) => router
            .layer(cors)
            .layer(from_fn(strip_cors_headers_for_refused_origins)),
        None => router,
    };
    router
        .layer(from_fn_with_state(metrics, record_http_metrics))
        .layer(from_fn(trace_requests))
        .layer(from_fn_with_state(
            http.trust_forwarded_for,
            resolve_client_ip,
        ))
        .layer(from_fn(request_id))
}

/// The client's IP address, as resolved by [`resolve_client_ip`]. Use it for audit events
/// ("from where") and rate limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientIp(pub IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = ApiError;

    /// Fails with a 500 if neither [`resolve_client_ip`] nor connect info gave an IP (the
    /// server was started without `into_make_service_with_connect_info`, a bug).
    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<ClientIp>()
            .copied()
            .or_else(|| {
                parts
                    .extensions
                    .get::<ConnectInfo<SocketAddr>>()
                    .map(|info| ClientIp(info.0.ip()))
            })
            .ok_or_else(|| ApiError::internal("no client address: serve with connect info"))
    }
}

/// Middleware (state: `http.trust_forwarded_for`): stores the [`ClientIp`] extension. The
/// IP is the TCP peer from `ConnectInfo<SocketAddr>`; when trusted, the last valid entry of
/// `X-Forwarded-For` wins instead (the one the trusted proxy appended; earlier entries are
/// written by the client and could be forged).
pub async fn resolve_client_ip(
    State(trust_forwarded_for): State<bool>,
    mut request: Request,
    next: Next,
) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0.ip());
    let forwarded = if trust_forwarded_for {
        last_forwarded_for(request.headers())
    } else {
        None
    };
    if let Some(ip) = forwarded.or(peer) {
        request.extensions_mut().insert(ClientIp(ip));
    }
    next.run(request).await
}

/// The last entry of the (possibly repeated) `X-Forwarded-For` header, if it is an IP
/// address (optionally with a port, IPv6 in brackets).
fn last_forwarded_for(headers: &HeaderMap) -> Option<IpAddr> {
    let last = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .rfind(|entry| !entry.is_empty())?;
    last.parse::<IpAddr>()
        .ok()
        .or_else(|| last.parse::<SocketAddr>().ok().map(|addr| addr.ip()))
}

/// Middleware (state: the limit in bytes): 413 at once when `Content-Length` is over the
/// limit; otherwise the body is wrapped so that reading past the limit fails, which the
/// body extractors turn into 413.
async fn limit_body(State(limit_bytes): State<usize>, request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit_bytes as u64) {
        return ApiError::payload_too_large(Some(limit_bytes)).into_response();
    }
    let request = request.map(|body| Body::new(http_body_util::Limited::new(body, limit_bytes)));
    next.run(request).await
}

/// Middleware (state: the timeout): 503 `unavailable` when the response headers are not
/// ready in time.
async fn limit_time(State(timeout): State<Duration>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(timeout_secs = timeout.as_secs(), "request timed out");
            ApiError::unavailable("the request timed out")
                .with_detail("timeout_secs", timeout.as_secs())
                .into_response()
        }
    }
}

fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)");
    ApiError::internal(format!("handler panicked: {message}")).into_response()
}

/// The CORS layer for `http.cors_allowed_origins`, or `None` when the list is empty.
/// `["*"]` allows any origin without credentials; listed origins may send credentials
/// (cookies, `Authorization`), which the CORS spec forbids with a wildcard.
pub fn cors_layer(http: &HttpConfig) -> Option<CorsLayer> {
    let origins = &http.cors_allowed_origins;
    if origins.is_empty() {
        return None;
    }
    let layer = CorsLayer::new()
        .allow_methods([
            Method::GET,
            Method::HEAD,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::ACCEPT,
            header::IF_MATCH,
            header::IF_NONE_MATCH,
            header::RANGE,
            REQUEST_ID_HEADER.clone(),
            TRACEPARENT_HEADER.clone(),
            HeaderName::from_static("idempotency-key"),
        ])
        .expose_headers([
            REQUEST_ID_HEADER.clone(),
            TRACEPARENT_HEADER.clone(),
            header::RETRY_AFTER,
            header::LOCATION,
            header::ETAG,
            header::CONTENT_RANGE,
        ])
        .max_age(Duration::from_secs(CORS_MAX_AGE_SECS));
    if origins.iter().any(|origin| origin == "*") {
        return Some(layer.allow_origin(AllowOrigin::any()));
    }
    let values: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|origin| match HeaderValue::from_str(origin) {
            Ok(value) => Some(value),
            Err(_) => {
                // Validation rejects such origins; skip rather than panic if one slips by.
                tracing::warn!(origin = %origin, "ignoring an invalid CORS origin");
                None
            }
        })
        .collect();
    Some(
        layer
            .allow_origin(AllowOrigin::list(values))
            .allow_credentials(true),
    )
}

/// Middleware outside the CORS layer: when the origin was refused (no
/// `Access-Control-Allow-Origin`), removes the other `Access-Control-*` headers too, so a
/// refused origin learns nothing about the allowed methods, headers or credentials. `Vary`
/// stays, for caches.
async fn strip_cors_headers_for_refused_origins(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    if !headers.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN) {
        let names: Vec<HeaderName> = headers
            .keys()
            .filter(|name| name.as_str().starts_with("access-control-"))
            .cloned()
            .collect();
        for name in names {
            headers.remove(name);
        }
    }
    response
}

/// Resolves on SIGINT (Ctrl-C) or, on Unix, SIGTERM. If a handler cannot be installed the
/// error is logged and that signal is not awaited.
pub async fn shutdown_signal() {
    let interrupt = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut stream) => {
                stream.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();

    tokio::select! {
        () = interrupt => tracing::info!(signal = "SIGINT", "shutting down"),
        () = terminate => tracing::info!(signal = "SIGTERM", "shutting down"),
    }
}

/// Serves `router` on `listener` (with connect info, so the client IP is known) until
/// `shutdown` resolves; then stops accepting, lets in-flight requests finish for at most
/// `grace`, and returns. Pass [`shutdown_signal`] as `shutdown` in the binary.
///
/// # Errors
///
/// An I/O error from the listener.
pub async fn serve<F>(
    listener: tokio::net::TcpListener,
    router: Router,
    grace: Duration,
    shutdown: F,
) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let (shutdown_started, mut shutdown_seen) = tokio::sync::watch::channel(false);
    let signal = async move {
        shutdown.await;
        // The receiver lives until this function returns.
        let _ = shutdown_started.send(true);
    };
    let server = axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(signal)
    .into_future();
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => return result,
        _ = shutdown_seen.wait_for(|started| *started) => {}
    }
    match tokio::time::timeout(grace, server).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!(
                grace_secs = grace.as_secs(),
                "in-flight requests still running after the shutdown grace period; closing them"
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RateLimitConfig;
    use crate::error::{with_api_fallbacks, ApiJson};
    use crate::ratelimit::{LimiterClock, ManualClock};
    use axum::http::StatusCode;
    use axum::routing::{get, post};
    use serde_json::Value;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tower::ServiceExt;

    fn config(edit: impl FnOnce(&mut ServerConfig)) -> ServerConfig {
        let mut config = ServerConfig::default();
        edit(&mut config);
        config
    }

    fn app(config: &ServerConfig, metrics: Metrics) -> Router {
        let limiter = Arc::new(RateLimiter::with_clock(
            &config.rate_limits,
            LimiterClock::Manual(ManualClock::default()),
        ));
        let routes = Router::new()
            .route(
                "/api/v1/echo",
                post(|ApiJson(body): ApiJson<Value>| async move { ApiJson(body) }),
            )
            .route(
                "/api/v1/panic",
                get(|| async {
                    if true {
                        panic!("boom with a secret");
                    }
                    "unreachable"
                }),
            );
        apply_layers(with_api_fallbacks(routes), config, metrics, limiter)
    }

    fn with_peer(mut request: Request<Body>, peer: &str) -> Request<Body> {
        let addr: SocketAddr = peer.parse().expect("socket address");
        request.extensions_mut().insert(ConnectInfo(addr));
        request
    }

    async fn json_body(response: Response) -> Value {
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("body");
        serde_json::from_slice(&bytes).expect("a JSON body")
    }

    fn echo_request(body: String, declare_length: bool) -> Request<Body> {
        let mut builder =
            Request::post("/api/v1/echo").header(header::CONTENT_TYPE, "application/json");
        if declare_length {
            builder = builder.header(header::CONTENT_LENGTH, body.len());
        }
        with_peer(
            builder.body(Body::from(body)).expect("request"),
            "192.0.2.1:1000",
        )
    }

    #[tokio::test]
    async fn a_body_over_the_limit_gets_413_json_with_or_without_content_length() {
        let config = config(|config| config.http.body_limit_bytes = 16);
        let big = format!("{{\"text\": \"{}\"}}", "x".repeat(64));
        for declare_length in [true, false] {
            let response = app(&config, Metrics::new())
                .oneshot(echo_request(big.clone(), declare_length))
                .await
                .expect("infallible");
            assert_eq!(
                response.status(),
                StatusCode::PAYLOAD_TOO_LARGE,
                "declared: {declare_length}"
            );
            assert!(response.headers().contains_key("x-request-id"));
            let body = json_body(response).await;
            assert_eq!(body["code"], "payload_too_large");
        }
        let response = app(&config, Metrics::new())
            .oneshot(echo_request("{\"a\": 1}".to_owned(), true))
            .await
            .expect("infallible");
        assert_eq!(response.status(), StatusCode::OK);
    }

    fn preflight(origin: &str) -> Request<Body> {
        with_peer(
            Request::builder()
                .method(Method::OPTIONS)
                .uri("/api/v1/echo")
                .header(header::ORIGIN, origin)
                .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
                .header(
                    header::ACCESS_CONTROL_REQUEST_HEADERS,
                    "content-type,authorization",
                )
                .body(Body::empty())
                .expect("request"),
            "192.0.2.1:1000",
        )
    }

    #[tokio::test]
    async fn a_preflight_from_an_allowed_origin_gets_cors_headers_and_others_get_none() {
        let config = config(|config| {
            config.http.cors_allowed_origins = vec!["https://ui.example.com".to_owned()];
        });
        let response = app(&config, Metrics::new())
            .oneshot(preflight("https://ui.example.com"))
            .await
            .expect("infallible");
        assert!(response.status().is_success(), "{}", response.status());
        let headers = response.headers();
        assert_eq!(
            headers[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://ui.example.com"
        );
        assert_eq!(headers[header::ACCESS_CONTROL_ALLOW_CREDENTIALS], "true");
        let methods = headers[header::ACCESS_CONTROL_ALLOW_METHODS]
            .to_str()
            .expect("ascii");
        assert!(methods.contains("POST"), "{methods}");
        let allowed = headers[header::ACCESS_CONTROL_ALLOW_HEADERS]
            .to_str()
            .expect("ascii");
        assert!(
            allowed.contains("authorization") && allowed.contains("content-type"),
            "{allowed}"
        );

        let response = app(&config, Metrics::new())
            .oneshot(preflight("https://evil.example.com"))
            .await
            .expect("infallible");
        let cors_headers: Vec<&HeaderName> = response
            .headers()
            .keys()
            .filter(|name| name.as_str().starts_with("access-control-"))
            .collect();
        assert!(cors_headers.is_empty(), "{cors_headers:?}");
    }

    #[tokio::test]
    async fn cors_is_off_without_origins_and_a_wildcard_sends_no_credentials() {
        let response = app(&ServerConfig::default(), Metrics::new())
            .oneshot(preflight("https://ui.example.com"))
            .await
            .expect("infallible");
        assert!(!response
            .headers()
            .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN));

        let config = config(|config| config.http.cors_allowed_origins = vec!["*".to_owned()]);
        let response = app(&config, Metrics::new())
            .oneshot(preflight("https://anyone.example.com"))
            .await
            .expect("infallible");
        assert_eq!(response.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
        assert!(!response
            .headers()
            .contains_key(header::ACCESS_CONTROL_ALLOW_CREDENTIALS));
    }

    #[tokio::test]
    async fn a_handler_past_the_timeout_gets_503_json() {
        // The layer is driven directly with a 10 ms budget: the handler never finishes, so
        // the test waits for the timeout itself, not for a guessed delay.
        let router = Router::new()
            .route(
                "/slow",
                get(|| async {
                    std::future::pending::<()>().await;
                    "never"
                }),
            )
            .layer(from_fn_with_state(Duration::from_millis(10), limit_time));
        let response = router
            .oneshot(Request::get("/slow").body(Body::empty()).expect("request"))
            .await
            .expect("infallible");
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = json_body(response).await;
        assert_eq!(body["code"], "unavailable");
        assert_eq!(body["details"]["timeout_secs"], 0);
    }

    #[tokio::test]
    async fn a_panicking_handler_gets_a_500_without_internals() {
        let response = app(&ServerConfig::default(), Metrics::new())
            .oneshot(with_peer(
                Request::get("/api/v1/panic")
                    .body(Body::empty())
                    .expect("request"),
                "192.0.2.1:1000",
            ))
            .await
            .expect("infallible");
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let request_id = response.headers()["x-request-id"]
            .to_str()
            .expect("ascii")
            .to_owned();
        let body = json_body(response).await;
        assert_eq!(body["message"], "internal error");
        assert_eq!(body["details"]["request_id"], request_id.as_str());
        assert!(!body.to_string().contains("secret"));
    }

    #[tokio::test]
    async fn the_full_stack_rate_limits_tags_and_counts_requests() {
        let config = config(|config| {
            config.rate_limits = RateLimitConfig {
                per_ip_per_sec: 1,
                per_ip_burst: 1,
                ..RateLimitConfig::default()
            };
        });
        let metrics = Metrics::new();
        let router = app(&config, metrics.clone());
        let request = || {
            with_peer(
                Request::get("/api/v1/nothing-here")
                    .header(
                        "traceparent",
                        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                    )
                    .body(Body::empty())
                    .expect("request"),
                "192.0.2.1:1000",
            )
        };
        let response = router.clone().oneshot(request()).await.expect("infallible");
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let traceparent = response.headers()["traceparent"].to_str().expect("ascii");
        assert!(traceparent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));

        let response = router.oneshot(request()).await.expect("infallible");
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(response.headers().contains_key(header::RETRY_AFTER));
        assert!(response.headers().contains_key("x-request-id"));
        assert_eq!(json_body(response).await["code"], "rate_limited");

        let text = metrics.render();
        assert!(
            text.contains(
                r#"arches_http_requests_total{method="GET",route="unmatched",status="404"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"arches_http_requests_total{method="GET",route="unmatched",status="429"} 1"#
            ),
            "{text}"
        );
    }

    #[test]
    fn forwarded_for_is_read_from_the_last_entry_only() {
        let mut headers = HeaderMap::new();
        headers.append(
            "x-forwarded-for",
            HeaderValue::from_static("6.6.6.6, 10.0.0.1"),
        );
        headers.append("x-forwarded-for", HeaderValue::from_static("203.0.113.5"));
        assert_eq!(
            last_forwarded_for(&headers),
            Some("203.0.113.5".parse().expect("ip"))
        );
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            HeaderValue::from_static("[2001:db8::1]:443"),
        );
        assert_eq!(
            last_forwarded_for(&headers),
            Some("2001:db8::1".parse().expect("ip"))
        );
        headers.insert("x-forwarded-for", HeaderValue::from_static("garbage"));
        assert_eq!(last_forwarded_for(&headers), None);
    }

    #[tokio::test]
    async fn the_client_ip_ignores_forwarded_for_unless_trusted() {
        for (trusted, expected) in [(false, "192.0.2.1"), (true, "203.0.113.5")] {
            let router = Router::new()
                .route("/", get(|ip: ClientIp| async move { ip.0.to_string() }))
                .layer(from_fn_with_state(trusted, resolve_client_ip));
            let request = with_peer(
                Request::get("/")
                    .header("x-forwarded-for", "203.0.113.5")
                    .body(Body::empty())
                    .expect("request"),
                "192.0.2.1:1000",
            );
            let response = router.oneshot(request).await.expect("infallible");
            let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .expect("body");
            assert_eq!(
                String::from_utf8_lossy(&bytes),
                expected,
                "trusted: {trusted}"
            );
        }
    }

    #[tokio::test]
    async fn serve_answers_on_a_loopback_port_and_stops_on_shutdown() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("bound address");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let router = Router::new().route("/", get(|ip: ClientIp| async move { ip.0.to_string() }));
        let server = tokio::spawn(serve(listener, router, Duration::from_secs(5), async {
            let _ = stopped.await;
        }));

        let mut stream = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut reply = String::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut reply))
            .await
            .expect("a reply in time")
            .expect("read");
        assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
        assert!(
            reply.ends_with("127.0.0.1"),
            "the peer address is known: {reply}"
        );

        stop.send(()).expect("server waiting");
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("serve returns after shutdown")
            .expect("task not panicked")
            .expect("no I/O error");
    }
}
