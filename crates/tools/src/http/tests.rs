//! Tests of the `http` tool against a real axum server on 127.0.0.1. Time of the breakers
//! and rate limits is driven by a `ManualClock`; in-tool backoff delays are 1 ms.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::sync::Mutex;

use arches_core::ids::{ArtifactId, OrgId, RunId, TaskId, TaskRunId};
use arches_core::ports::{ArtifactStore, LogSink, StoreError, StoreResult};
use arches_core::records::{ArtifactRecord, NewArtifact};
use arches_core::time::ManualClock;
use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap as AxumHeaders, StatusCode as AxumStatus};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};

use super::*;

/// The test server's counters and switches.
#[derive(Default)]
struct ServerState {
    /// Requests received, every route.
    hits: AtomicU32,
    /// 503 answers `/flaky` still gives before it answers 200.
    flaky_failures_left: AtomicU32,
    /// The status `/status` answers with.
    status: AtomicU16,
    /// The port, for redirects.
    port: AtomicU16,
    /// Notified when `/hang` is entered.
    hang_entered: tokio::sync::Notify,
    /// Notified when the handler of `/hang` is dropped (the client went away).
    hang_dropped: tokio::sync::Notify,
}

/// Notifies `hang_dropped` when dropped.
struct DropSignal(Arc<ServerState>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        self.0.hang_dropped.notify_one();
    }
}

struct Server {
    state: Arc<ServerState>,
    base: String,
    port: u16,
}

impl Server {
    fn hits(&self) -> u32 {
        self.state.hits.load(Ordering::SeqCst)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

async fn json_route(State(state): State<Arc<ServerState>>) -> Response {
    state.hits.fetch_add(1, Ordering::SeqCst);
    (
        [("x-custom", "yes")],
        Json(json!({"hello": "world", "n": 1})),
    )
        .into_response()
}

async fn echo_route(
    State(state): State<Arc<ServerState>>,
    RawQuery(query): RawQuery,
    headers: AxumHeaders,
    body: String,
) -> Response {
    state.hits.fetch_add(1, Ordering::SeqCst);
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    Json(json!({
        "body": body,
        "query": query,
        "x_test": header("x-test"),
        "content_type": header("content-type"),
    }))
    .into_response()
}

async fn flaky_route(State(state): State<Arc<ServerState>>) -> Response {
    state.hits.fetch_add(1, Ordering::SeqCst);
    let left = state.flaky_failures_left.load(Ordering::SeqCst);
    if left > 0 {
        state.flaky_failures_left.store(left - 1, Ordering::SeqCst);
        // An hour: the tool must cap it by retry.max_delay.
        return (
            AxumStatus::SERVICE_UNAVAILABLE,
            [("retry-after", "3600")],
            "busy",
        )
            .into_response();
    }
    "recovered".into_response()
}

async fn missing_route(State(state): State<Arc<ServerState>>) -> Response {
    state.hits.fetch_add(1, Ordering::SeqCst);
    (AxumStatus::NOT_FOUND, "no such thing here").into_response()
}

async fn status_route(State(state): State<Arc<ServerState>>) -> Response {
    state.hits.fetch_add(1, Ordering::SeqCst);
    let status = AxumStatus::from_u16(state.status.load(Ordering::SeqCst))
        .unwrap_or(AxumStatus::INTERNAL_SERVER_ERROR);
    (status, "status route").into_response()
}

async fn big_route(State(state): State<Arc<ServerState>>) -> Response {
    state.hits.fetch_add(1, Ordering::SeqCst);
    "x".repeat(4096).into_response()
}

async fn big_stream_route(State(state): State<Arc<ServerState>>) -> Response {
    state.hits.fetch_add(1, Ordering::SeqCst);
    // Chunked, without a content-length: the limit must be found while streaming.
    let chunks = (0..8).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b'y'; 512])));
    Body::from_stream(futures::stream::iter(chunks)).into_response()
}

async fn hang_route(State(state): State<Arc<ServerState>>) -> Response {
    state.hits.fetch_add(1, Ordering::SeqCst);
    let _signal = DropSignal(state.clone());
    state.hang_entered.notify_one();
    std::future::pending::<()>().await;
    "never".into_response()
}

async fn redirect_route(State(state): State<Arc<ServerState>>) -> Response {
    state.hits.fetch_add(1, Ordering::SeqCst);
    let port = state.port.load(Ordering::SeqCst);
    (
        AxumStatus::FOUND,
        [("location", format!("http://localhost:{port}/json"))],
    )
        .into_response()
}

async fn start_server() -> Server {
    let state = Arc::new(ServerState::default());
    let app = Router::new()
        .route("/json", get(json_route))
        .route("/echo", post(echo_route))
        .route("/flaky", get(flaky_route))
        .route("/missing", get(missing_route))
        .route("/status", any(status_route))
        .route("/big", get(big_route))
        .route("/big-stream", get(big_stream_route))
        .route("/hang", get(hang_route))
        .route("/redirect", get(redirect_route))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    state.port.store(port, Ordering::SeqCst);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Server {
        state,
        base: format!("http://127.0.0.1:{port}"),
        port,
    }
}

/// Log lines kept in memory.
#[derive(Default)]
struct MemoryLogs(Mutex<Vec<String>>);

#[async_trait]
impl LogSink for MemoryLogs {
    async fn write(&self, _stream: LogStream, text: &str) {
        self.0.lock().unwrap().push(text.to_owned());
    }
}

/// The http tool never touches artifacts.
struct NoArtifacts;

#[async_trait]
impl ArtifactStore for NoArtifacts {
    async fn put_file(&self, _: &Path, _: NewArtifact) -> StoreResult<ArtifactRecord> {
        Err(StoreError::Backend("no artifacts in these tests".into()))
    }
    async fn put_bytes(&self, _: Vec<u8>, _: NewArtifact) -> StoreResult<ArtifactRecord> {
        Err(StoreError::Backend("no artifacts in these tests".into()))
    }
    async fn get(&self, _: ArtifactId) -> StoreResult<ArtifactRecord> {
        Err(StoreError::Backend("no artifacts in these tests".into()))
    }
    async fn local_path(&self, _: ArtifactId) -> StoreResult<PathBuf> {
        Err(StoreError::Backend("no artifacts in these tests".into()))
    }
    async fn read(&self, _: ArtifactId, _: u64) -> StoreResult<Vec<u8>> {
        Err(StoreError::Backend("no artifacts in these tests".into()))
    }
}

fn context(logs: Arc<MemoryLogs>) -> ToolContext {
    ToolContext {
        org_id: OrgId::DEFAULT,
        run_id: RunId::new(),
        task_run_id: TaskRunId::new(),
        task_id: TaskId::parse("call").unwrap(),
        attempt: 1,
        item: None,
        upstream: BTreeMap::new(),
        work_dir: PathBuf::from("/nonexistent"),
        artifacts: Arc::new(NoArtifacts),
        logs,
        review_comment: None,
        tools: Arc::new(arches_core::ports::ToolRegistry::new()),
    }
}

/// A policy allowing 127.0.0.1, with a manual clock, breaker threshold 3 and no rate limit.
fn policy(clock: &Arc<ManualClock>) -> HttpPolicy {
    HttpPolicy {
        allowed_hosts: vec!["127.0.0.1".to_owned()],
        breaker: BreakerSettings {
            failure_threshold: 3,
            cool_down: Duration::from_secs(30),
        },
        rate_limit: None,
        clock: clock.clone(),
        ..HttpPolicy::default()
    }
}

fn manual_clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(Timestamp(1_700_000_000_000_000)))
}

fn fast_retry(max_attempts: u32) -> Value {
    json!({"max_attempts": max_attempts, "initial_delay": "1ms", "max_delay": "1ms"})
}

async fn call(tool: &HttpTool, inputs: Value) -> Result<Value, ToolError> {
    tool.execute(context(Arc::new(MemoryLogs::default())), inputs)
        .await
}

#[tokio::test]
async fn get_parses_json_and_post_sends_body_headers_and_query() {
    let server = start_server().await;
    let tool = HttpTool::new(policy(&manual_clock()));
    let logs = Arc::new(MemoryLogs::default());

    let out = tool
        .execute(context(logs.clone()), json!({"url": server.url("/json")}))
        .await
        .unwrap();
    assert_eq!(out["status"], 200);
    assert_eq!(out["body"], json!({"hello": "world", "n": 1}));
    assert_eq!(out["headers"]["x-custom"], "yes");
    assert_eq!(out["headers"]["content-type"], "application/json");
    assert_eq!(out["attempts"], 1);

    let out = tool
        .execute(
            context(logs.clone()),
            json!({"method": "HEAD", "url": server.url("/json")}),
        )
        .await
        .unwrap();
    assert_eq!(out["status"], 200);
    assert_eq!(out["body"], Value::Null);

    let out = tool
        .execute(
            context(logs.clone()),
            json!({
                "method": "POST",
                "url": server.url("/echo"),
                "headers": {"X-Test": "42"},
                "query": {"token": "secret-value", "page": 2, "all": true},
                "body": {"a": [1, 2]}
            }),
        )
        .await
        .unwrap();
    assert_eq!(out["status"], 200);
    assert_eq!(
        serde_json::from_str::<Value>(out["body"]["body"].as_str().unwrap()).unwrap(),
        json!({"a": [1, 2]})
    );
    assert_eq!(out["body"]["x_test"], "42");
    assert_eq!(out["body"]["content_type"], "application/json");
    assert_eq!(out["body"]["query"], "all=true&page=2&token=secret-value");

    let out = tool
        .execute(
            context(logs.clone()),
            json!({"method": "POST", "url": server.url("/echo"), "body_text": "plain words"}),
        )
        .await
        .unwrap();
    assert_eq!(out["body"]["body"], "plain words");
    assert_eq!(out["body"]["content_type"], "text/plain; charset=utf-8");
    assert_eq!(server.hits(), 4);

    // One line per attempt, without the query string.
    let lines = logs.0.lock().unwrap().clone();
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert!(lines[0].starts_with(&format!("GET {}/json -> 200 in ", server.base)));
    assert!(lines[0].ends_with("ms (attempt 1/3)"), "{}", lines[0]);
    assert!(lines.iter().all(|line| !line.contains("secret")));
}

#[tokio::test]
async fn retries_503_until_success_capping_retry_after() {
    let server = start_server().await;
    server.state.flaky_failures_left.store(2, Ordering::SeqCst);
    let tool = HttpTool::new(policy(&manual_clock()));
    let logs = Arc::new(MemoryLogs::default());

    // Retry-After says an hour; max_delay (1 ms) caps it, or this test would not end.
    let out = tool
        .execute(
            context(logs.clone()),
            json!({"url": server.url("/flaky"), "retry": fast_retry(3)}),
        )
        .await
        .unwrap();
    assert_eq!(out["status"], 200);
    assert_eq!(out["body"], "recovered");
    assert_eq!(out["attempts"], 3);
    assert_eq!(server.hits(), 3);
    let lines = logs.0.lock().unwrap().clone();
    assert!(lines[0].contains("-> 503 in"), "{lines:?}");
    assert!(lines[2].contains("-> 200 in"), "{lines:?}");

    // Attempts spent: a transient error naming the status.
    server.state.flaky_failures_left.store(5, Ordering::SeqCst);
    let error = call(
        &tool,
        json!({"url": server.url("/flaky"), "retry": fast_retry(2)}),
    )
    .await
    .unwrap_err();
    assert!(error.retryable);
    assert!(error.message.contains("503"), "{}", error.message);
    assert!(
        error.message.contains("after 2 attempts"),
        "{}",
        error.message
    );
    assert_eq!(server.hits(), 5);
}

#[test]
fn retry_after_is_capped_and_backoff_is_used_without_it() {
    let policy = RetryPolicy {
        max_attempts: 5,
        initial_delay: Duration::from_millis(100),
        max_delay: Duration::from_secs(10),
        multiplier: 2.0,
        jitter: 0.5,
    };
    assert_eq!(
        retry_delay(&policy, 1, Some(Duration::from_secs(3600)), 0.3),
        Duration::from_secs(10)
    );
    assert_eq!(
        retry_delay(&policy, 1, Some(Duration::from_secs(2)), 0.3),
        Duration::from_secs(2)
    );
    assert_eq!(
        retry_delay(&policy, 2, None, 0.0),
        Duration::from_millis(200)
    );
    assert_eq!(
        retry_delay(&policy, 2, None, 1.0),
        Duration::from_millis(100)
    );
}

#[tokio::test]
async fn not_found_fails_at_once_without_retry() {
    let server = start_server().await;
    let tool = HttpTool::new(policy(&manual_clock()));
    let error = call(
        &tool,
        json!({"url": server.url("/missing"), "retry": fast_retry(5)}),
    )
    .await
    .unwrap_err();
    assert!(!error.retryable);
    assert!(error.message.contains("404"), "{}", error.message);
    assert!(
        error.message.contains("no such thing here"),
        "{}",
        error.message
    );
    assert_eq!(server.hits(), 1);

    // An expected 404 succeeds.
    let out = call(
        &tool,
        json!({"url": server.url("/missing"), "expect_status": [404]}),
    )
    .await
    .unwrap();
    assert_eq!(out["status"], 404);
    assert_eq!(out["body"], "no such thing here");
    // A 4xx does not count against the host.
    assert_eq!(tool.breaker_states()[0].1, BreakerState::Closed);
}

#[tokio::test]
async fn a_host_not_allowed_is_refused_before_any_request() {
    let server = start_server().await;
    let tool = HttpTool::new(policy(&manual_clock()));
    let url = format!("http://localhost:{}/json", server.port);
    let error = call(&tool, json!({"url": url})).await.unwrap_err();
    assert!(!error.retryable);
    assert_eq!(
        error.message,
        "host localhost is not in the tool's allowed hosts"
    );

    let nobody = HttpTool::new(HttpPolicy {
        allowed_hosts: Vec::new(),
        ..policy(&manual_clock())
    });
    let error = call(&nobody, json!({"url": server.url("/json")}))
        .await
        .unwrap_err();
    assert!(error.message.contains("not in the tool's allowed hosts"));

    // A redirect to a host that is not allowed is refused too.
    let error = call(&tool, json!({"url": server.url("/redirect")}))
        .await
        .unwrap_err();
    assert!(!error.retryable);
    assert!(
        error
            .message
            .contains("host localhost is not in the tool's allowed hosts"),
        "{}",
        error.message
    );
    assert_eq!(server.hits(), 1, "only the redirecting request arrived");
}

#[test]
fn host_patterns_match_hosts_ports_and_suffixes() {
    let hosts = AllowedHosts::new(&[
        "api.example.com".to_owned(),
        "127.0.0.1:8080".to_owned(),
        "*.Internal.net".to_owned(),
        "[::1]:9000".to_owned(),
        "bad:port".to_owned(),
    ]);
    let allows = |url: &str| hosts.allows(&Url::parse(url).unwrap());
    assert!(allows("http://api.example.com/x"));
    assert!(allows("http://API.example.com:81/x"));
    assert!(!allows("http://example.com/x"));
    assert!(allows("http://127.0.0.1:8080/"));
    assert!(!allows("http://127.0.0.1/"));
    assert!(allows("http://a.b.internal.net/"));
    assert!(!allows("http://internal.net/"));
    assert!(!allows("http://evilinternal.net/"));
    assert!(allows("http://[::1]:9000/"));
    assert!(!allows("http://[::1]:9001/"));
    assert!(HostPattern::parse("bad:port").is_none());
    assert!(HttpPolicy::allowing(["bad:port"]).problems()[0].contains("bad:port"));
    assert!(HttpPolicy::allow_all().problems().is_empty());
    assert!(AllowedHosts::new(&["*".to_owned()]).allows(&Url::parse("http://any.where/").unwrap()));
}

/// A TLS server on 127.0.0.1 with a fresh self-signed certificate for `127.0.0.1`: it
/// answers every HTTP/1.1 request with `{"tls": true}` and closes. Its `https://` base URL,
/// its certificate (PEM) and how many requests it answered.
async fn start_tls_server() -> (String, String, Arc<AtomicU32>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;

    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let pem = certified.cert.pem();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![certified.cert.der().clone()], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let answered = Arc::new(AtomicU32::new(0));
    let count = answered.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let count = count.clone();
            tokio::spawn(async move {
                // A client that does not trust the certificate ends the handshake.
                let Ok(mut stream) = acceptor.accept(socket).await else {
                    return;
                };
                let mut request = Vec::new();
                let mut buffer = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 65_536 {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buffer[..n]),
                    }
                }
                let body = r#"{"tls": true}"#;
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                count.fetch_add(1, Ordering::SeqCst);
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (format!("https://127.0.0.1:{port}"), pem, answered)
}

#[tokio::test]
async fn https_reaches_a_server_whose_authority_is_trusted_and_no_other() {
    let (base, pem, answered) = start_tls_server().await;
    let url = format!("{base}/x");

    // Its certificate is signed by no authority the client trusts: the handshake fails.
    let untrusting = HttpTool::new(policy(&manual_clock()));
    let error = call(&untrusting, json!({"url": url, "retry": fast_retry(1)}))
        .await
        .unwrap_err();
    assert!(error.message.contains("127.0.0.1"), "{}", error.message);
    assert_eq!(answered.load(Ordering::SeqCst), 0);

    // Trusting it as a root, the request goes through over TLS.
    let trusting = HttpTool::new(HttpPolicy {
        root_certificates: vec![pem.into_bytes()],
        ..policy(&manual_clock())
    });
    let out = call(&trusting, json!({"url": url})).await.unwrap();
    assert_eq!(out["status"], 200);
    assert_eq!(out["body"], json!({"tls": true}));
    assert_eq!(answered.load(Ordering::SeqCst), 1);

    // A bundle that is not PEM is a problem of the policy, named.
    let bad = HttpPolicy {
        root_certificates: vec![b"not a certificate".to_vec()],
        ..HttpPolicy::default()
    };
    assert!(
        bad.problems()
            .iter()
            .any(|problem| problem.contains("root certificate bundle 0")),
        "{:?}",
        bad.problems()
    );
}

#[tokio::test]
async fn schemes_other_than_http_and_https_are_refused_clearly() {
    let tool = HttpTool::new(HttpPolicy {
        clock: manual_clock(),
        ..HttpPolicy::allow_all()
    });
    let error = call(&tool, json!({"url": "ftp://example.com/x"}))
        .await
        .unwrap_err();
    assert!(!error.retryable);
    assert!(error.message.contains("scheme \"ftp\" is not supported"));
}

#[tokio::test]
async fn the_breaker_opens_probes_and_closes() {
    let server = start_server().await;
    server.state.status.store(503, Ordering::SeqCst);
    let clock = manual_clock();
    let tool = HttpTool::new(policy(&clock));
    let host = format!("127.0.0.1:{}", server.port);
    let url = server.url("/status");

    // Three failures in a row (the threshold) open the breaker.
    let error = call(&tool, json!({"url": url, "retry": fast_retry(3)}))
        .await
        .unwrap_err();
    assert!(error.retryable);
    assert_eq!(server.hits(), 3);
    assert_eq!(
        tool.breaker_states(),
        vec![(host.clone(), BreakerState::Open)]
    );

    // Open: refused at once, the server sees nothing.
    let error = call(&tool, json!({"url": url, "retry": fast_retry(3)}))
        .await
        .unwrap_err();
    assert!(error.retryable);
    assert!(
        error.message.contains(&format!(
            "circuit open for host {host} until 2023-11-14T22:13:50Z"
        )),
        "{}",
        error.message
    );
    assert_eq!(server.hits(), 3);

    // After the cool-down: half-open; one probe reaches the server, fails, and reopens it.
    clock.advance(Duration::from_secs(30));
    assert_eq!(
        tool.breaker_states(),
        vec![(host.clone(), BreakerState::HalfOpen)]
    );
    let error = call(&tool, json!({"url": url, "retry": fast_retry(3)}))
        .await
        .unwrap_err();
    assert_eq!(server.hits(), 4, "only the probe went out");
    assert!(error.message.contains("circuit open"), "{}", error.message);
    assert!(
        error
            .message
            .contains("(last error: unexpected status 503 Service Unavailable: status route)"),
        "{}",
        error.message
    );
    assert_eq!(
        tool.breaker_states(),
        vec![(host.clone(), BreakerState::Open)]
    );

    // Still open within the fresh cool-down.
    clock.advance(Duration::from_secs(29));
    assert!(call(&tool, json!({"url": url})).await.is_err());
    assert_eq!(server.hits(), 4);

    // The next probe succeeds: closed.
    clock.advance(Duration::from_secs(1));
    server.state.status.store(200, Ordering::SeqCst);
    let out = call(&tool, json!({"url": url})).await.unwrap();
    assert_eq!(out["status"], 200);
    assert_eq!(server.hits(), 5);
    assert_eq!(tool.breaker_states(), vec![(host, BreakerState::Closed)]);
}

#[tokio::test]
async fn the_rate_limit_refuses_a_wait_longer_than_the_timeout() {
    let server = start_server().await;
    let clock = manual_clock();
    let tool = HttpTool::new(HttpPolicy {
        rate_limit: Some(RateLimit {
            per_second: NonZeroU32::MIN,
            burst: NonZeroU32::MIN,
        }),
        ..policy(&clock)
    });
    let inputs =
        json!({"url": server.url("/json"), "timeout": "200ms", "retry": {"max_attempts": 1}});
    call(&tool, inputs.clone()).await.unwrap();
    // The bucket refills in 1 s, longer than the 200 ms timeout: refused at once.
    let error = call(&tool, inputs.clone()).await.unwrap_err();
    assert!(error.retryable);
    assert!(
        error.message.contains(&format!(
            "rate limit of host 127.0.0.1:{}: the next request is allowed in 1000 ms",
            server.port
        )),
        "{}",
        error.message
    );
    assert_eq!(server.hits(), 1);
    clock.advance(Duration::from_secs(1));
    call(&tool, inputs).await.unwrap();
    assert_eq!(server.hits(), 2);
}

#[tokio::test]
async fn the_rate_limit_waits_when_the_wait_fits_in_the_timeout() {
    let server = start_server().await;
    // Real time: 1000 requests/s, burst 1, so the second request waits about 1 ms.
    let tool = HttpTool::new(HttpPolicy {
        allowed_hosts: vec!["127.0.0.1".to_owned()],
        rate_limit: Some(RateLimit {
            per_second: NonZeroU32::new(1000).unwrap(),
            burst: NonZeroU32::MIN,
        }),
        ..HttpPolicy::default()
    });
    let inputs = json!({"url": server.url("/json"), "timeout": "10s"});
    call(&tool, inputs.clone()).await.unwrap();
    call(&tool, inputs).await.unwrap();
    assert_eq!(server.hits(), 2);
}

#[tokio::test]
async fn a_body_over_the_limit_fails_clearly() {
    let server = start_server().await;
    let tool = HttpTool::new(HttpPolicy {
        max_body_bytes: 1000,
        ..policy(&manual_clock())
    });
    for path in ["/big", "/big-stream"] {
        let error = call(
            &tool,
            json!({"url": server.url(path), "retry": fast_retry(3)}),
        )
        .await
        .unwrap_err();
        assert!(!error.retryable);
        assert_eq!(
            error.message,
            format!(
                "GET {}: response body exceeds the limit of 1000 bytes",
                server.url(path)
            )
        );
    }
    assert_eq!(server.hits(), 2);
}

#[tokio::test]
async fn a_server_that_never_answers_times_out() {
    let server = start_server().await;
    let tool = HttpTool::new(policy(&manual_clock()));
    let error = call(
        &tool,
        json!({"url": server.url("/hang"), "timeout": "200ms", "retry": {"max_attempts": 1}}),
    )
    .await
    .unwrap_err();
    assert!(error.retryable);
    assert!(
        error.message.contains("timed out after 200 ms"),
        "{}",
        error.message
    );
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn dropping_the_future_aborts_the_request() {
    let server = start_server().await;
    let tool = Arc::new(HttpTool::new(policy(&manual_clock())));
    let url = server.url("/hang");
    let task = tokio::spawn({
        let tool = tool.clone();
        async move { call(&tool, json!({"url": url, "timeout": "1h"})).await }
    });
    server.state.hang_entered.notified().await;
    task.abort();
    // The connection closes, so the server drops its handler; bounded so a regression fails
    // instead of hanging.
    tokio::time::timeout(
        Duration::from_secs(10),
        server.state.hang_dropped.notified(),
    )
    .await
    .expect("the server saw the request aborted");
    assert!(task.await.unwrap_err().is_cancelled());
}

#[tokio::test]
async fn a_refused_connection_is_retried_then_transient() {
    // Bind a port, then free it: nothing listens there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let tool = HttpTool::new(policy(&manual_clock()));
    let logs = Arc::new(MemoryLogs::default());
    let error = tool
        .execute(
            context(logs.clone()),
            json!({"url": format!("http://127.0.0.1:{port}/"), "retry": fast_retry(2)}),
        )
        .await
        .unwrap_err();
    assert!(error.retryable);
    assert!(
        error.message.contains("cannot connect"),
        "{}",
        error.message
    );
    assert_eq!(logs.0.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn the_schema_is_strict_and_bad_inputs_are_refused() {
    let tool = HttpTool::new(policy(&manual_clock()));
    let schema = tool.input_schema();
    assert_eq!(schema["type"], "object");
    assert_eq!(schema["additionalProperties"], false);
    assert_eq!(schema["required"], json!(["url"]));
    assert_eq!(schema["properties"]["retry"]["additionalProperties"], false);
    assert_eq!(tool.name(), "http");

    let cases = [
        (
            json!({"url": "http://127.0.0.1/", "method": 5}),
            "invalid http inputs",
        ),
        (
            json!({"url": "http://127.0.0.1/", "method": "FETCH"}),
            "unknown method \"FETCH\"; use one of GET, POST, PUT, PATCH, DELETE, HEAD",
        ),
        (
            json!({"url": "http://127.0.0.1/", "verb": "GET"}),
            "unknown field `verb`",
        ),
        (json!({"url": "not a url"}), "is not a valid URL"),
        (
            json!({"url": "http://127.0.0.1/", "body": 1, "body_text": "x"}),
            "give either body or body_text, not both",
        ),
        (
            json!({"url": "http://127.0.0.1/", "retry": {"max_attempts": 11}}),
            "retry.max_attempts must be between 1 and 10, got 11",
        ),
        (
            json!({"url": "http://127.0.0.1/", "expect_status": [700]}),
            "expect_status: 700 is not an HTTP status",
        ),
        (
            json!({"url": "http://127.0.0.1/", "timeout": "soon"}),
            "invalid http inputs",
        ),
        (
            json!({"url": "http://127.0.0.1/", "headers": {"bad name": "x"}}),
            "header name \"bad name\" is not valid",
        ),
        // A `Host` header would reach a virtual host the allowed URL does not name.
        (
            json!({"url": "http://127.0.0.1/", "headers": {"Host": "internal-admin"}}),
            "header \"Host\" is set by the tool",
        ),
        (
            json!({"url": "http://127.0.0.1/", "headers": {"transfer-encoding": "chunked"}}),
            "is set by the tool",
        ),
    ];
    for (inputs, expected) in cases {
        let error = call(&tool, inputs.clone()).await.unwrap_err();
        assert!(!error.retryable, "{inputs}");
        assert!(
            error.message.contains(expected),
            "{inputs}: {}",
            error.message
        );
    }
}

#[test]
fn timestamps_format_as_rfc3339() {
    assert_eq!(format_timestamp(Timestamp(0)), "1970-01-01T00:00:00Z");
    assert_eq!(
        format_timestamp(Timestamp(1_700_000_000_000_000)),
        "2023-11-14T22:13:20Z"
    );
    assert_eq!(
        format_timestamp(Timestamp(951_782_400_000_000)),
        "2000-02-29T00:00:00Z"
    );
}

#[tokio::test]
async fn a_call_within_capabilities_reaches_only_their_hosts_redirects_included() {
    let server = start_server().await;
    let tool = HttpTool::new(HttpPolicy {
        allowed_hosts: vec!["*".to_owned()],
        ..policy(&manual_clock())
    });
    let logs = Arc::new(MemoryLogs::default());
    let own = vec![format!("127.0.0.1:{}", server.port)];

    // The capabilities' host is reached.
    let answer = tool
        .execute_within(
            context(logs.clone()),
            json!({"url": server.url("/json")}),
            &own,
        )
        .await
        .unwrap();
    assert_eq!(answer["status"], 200, "{answer}");
    assert_eq!(server.hits(), 1);

    // Another host, though the tool's own policy allows every host, is refused before
    // anything is sent.
    let error = tool
        .execute_within(
            context(logs.clone()),
            json!({"url": format!("http://localhost:{}/json", server.port)}),
            &own,
        )
        .await
        .unwrap_err();
    assert!(!error.retryable);
    assert_eq!(
        error.message,
        "host localhost is not among the hosts the tool's capabilities name"
    );
    assert_eq!(server.hits(), 1, "nothing was sent");

    // A redirect from the capabilities' host to another host is not followed.
    let error = tool
        .execute_within(
            context(logs.clone()),
            json!({"url": server.url("/redirect")}),
            &own,
        )
        .await
        .unwrap_err();
    assert!(
        error.message.contains("redirect to http://localhost:"),
        "{}",
        error.message
    );
    assert_eq!(server.hits(), 2, "only the redirecting request arrived");

    // Outside `execute_within`, the same tool follows that redirect (the narrowing is per
    // call, not left behind).
    let answer = call(&tool, json!({"url": server.url("/redirect")}))
        .await
        .unwrap();
    assert_eq!(answer["status"], 200, "{answer}");
    assert_eq!(server.hits(), 4);
}
