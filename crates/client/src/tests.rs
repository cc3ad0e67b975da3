//! The client against a small fake server on a loopback port: refresh on `token_expired`
//! (once, whatever the number of requests that met it), bounded error bodies, typed events,
//! checked downloads and clear transport errors.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arches_core::events::DomainEvent;
use arches_core::{OrgId, RunId, RunState, TaskId, TaskRunId, TaskRunState, Timestamp};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::*;

#[derive(Default)]
struct Fake {
    refreshes: AtomicUsize,
    run_id: Mutex<Option<RunId>>,
}

fn bearer(headers: &HeaderMap) -> String {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_owned()
}

fn error(status: StatusCode, code: &str) -> axum::response::Response {
    (
        status,
        Json(json!({"code": code, "message": code.replace('_', " "), "details": {}})),
    )
        .into_response()
}

fn run_json(id: RunId) -> Value {
    json!({
        "id": id, "pipeline": "p", "pipeline_version": 1, "params": {}, "state": "running",
        "error": null, "created_at": "2026-01-01T00:00:00.000000Z", "started_at": null,
        "finished_at": null, "duration_ms": null
    })
}

async fn refresh(
    State(fake): State<Arc<Fake>>,
    Json(body): Json<Value>,
) -> axum::response::Response {
    if body["refresh_token"] != "r1" {
        return error(StatusCode::UNAUTHORIZED, "unauthenticated");
    }
    fake.refreshes.fetch_add(1, Ordering::SeqCst);
    Json(token_answer()).into_response()
}

/// A login that always needs a second factor; the code 123456 passes.
async fn login(headers: HeaderMap, Json(body): Json<Value>) -> axum::response::Response {
    assert!(
        headers.get("authorization").is_none(),
        "a login carries no token"
    );
    if body["password"] != "pw" {
        return error(StatusCode::UNAUTHORIZED, "invalid_credentials");
    }
    (
        StatusCode::UNAUTHORIZED,
        Json(
            json!({"code": "mfa_required", "message": "a code is required",
            "details": {"mfa_token": "mfa_1", "expires_in": 300}}),
        ),
    )
        .into_response()
}

async fn login_mfa(Json(body): Json<Value>) -> axum::response::Response {
    if body["mfa_token"] != "mfa_1" || body["code"] != "123456" {
        return error(StatusCode::UNAUTHORIZED, "invalid_credentials");
    }
    Json(token_answer()).into_response()
}

fn token_answer() -> Value {
    json!({
        "access_token": "a2", "token_type": "Bearer", "expires_in": 900, "refresh_token": "r2",
        "user": {"id": uuid(), "email": "o@example.test", "display_name": "O",
                 "email_verified": false, "totp_enabled": false, "created_at": "2026-01-01T00:00:00Z"},
        "org": {"id": uuid(), "slug": "default", "name": "Default", "created_at": "2026-01-01T00:00:00Z"},
        "role": "owner"
    })
}

fn uuid() -> String {
    RunId::new().to_string()
}

async fn get_run(
    State(fake): State<Arc<Fake>>,
    headers: HeaderMap,
    Path(id): Path<RunId>,
) -> axum::response::Response {
    *fake.run_id.lock().unwrap() = Some(id);
    match bearer(&headers).as_str() {
        "a1" => error(StatusCode::UNAUTHORIZED, "token_expired"),
        "a2" | "ak_good" => Json(run_json(id)).into_response(),
        _ => error(StatusCode::UNAUTHORIZED, "unauthenticated"),
    }
}

async fn events() -> impl IntoResponse {
    let org_id = OrgId::DEFAULT;
    let run_id = RunId::new();
    let run = DomainEvent::RunStateChanged {
        org_id,
        run_id,
        state: RunState::Succeeded,
        at: Timestamp(5),
    };
    let task = DomainEvent::TaskRunStateChanged {
        org_id,
        run_id,
        task_run_id: TaskRunId::new(),
        task_id: TaskId::parse("load").unwrap(),
        index: None,
        state: TaskRunState::Running,
        attempt: 1,
        at: Timestamp(4),
    };
    let log = json!({"type": "log_line", "org_id": org_id, "run_id": run_id,
        "task_run_id": TaskRunId::new(), "task_id": "load", "attempt": 1, "stream": "stdout",
        "at": 4, "text": "hello"});
    let body = format!(
        ": keep-alive\n\nid: 1-1\nevent: task_run\ndata: {}\n\nid: 1-2\nevent: log\ndata: {log}\n\nevent: reset\ndata: {{\"reason\": \"missed\"}}\n\nid: 1-3\nevent: future_kind\ndata: {{}}\n\nid: 1-4\nevent: run\ndata: {}\n\n",
        serde_json::to_string(&task).unwrap(),
        serde_json::to_string(&run).unwrap(),
    );
    ([("content-type", "text/event-stream")], body)
}

async fn spawn() -> (String, Arc<Fake>) {
    let fake = Arc::new(Fake::default());
    let router = Router::new()
        .route("/api/v1/auth/refresh", post(refresh))
        .route("/api/v1/auth/login", post(login))
        .route("/api/v1/auth/login/mfa", post(login_mfa))
        .route("/api/v1/runs/{id}", get(get_run))
        .route(
            "/api/v1/runs",
            get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "x".repeat(1 << 20)) }),
        )
        .route("/api/v1/events", get(events))
        .route("/api/v1/artifacts/{id}/content", get(|| async { "hello" }))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    (base, fake)
}

fn session(access: &str, refresh: &str) -> Credentials {
    Credentials::Session(SessionTokens {
        access_token: access.to_owned(),
        refresh_token: refresh.to_owned(),
    })
}

#[tokio::test]
async fn an_expired_access_token_is_refreshed_once_for_concurrent_requests() {
    let (base, fake) = spawn().await;
    let client = Client::new(&base, session("a1", "r1")).unwrap();
    let seen: Arc<Mutex<Vec<SessionTokens>>> = Arc::default();
    let sink = seen.clone();
    client.on_session_rotated(move |tokens| sink.lock().unwrap().push(SessionTokens::from(tokens)));
    let calls = (0..5).map(|_| client.get_run(RunId::new()));
    for result in futures::future::join_all(calls).await {
        assert_eq!(
            result.expect("answered after the refresh").state,
            RunState::Running
        );
    }
    assert_eq!(fake.refreshes.load(Ordering::SeqCst), 1);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].access_token, "a2");
    assert_eq!(seen[0].refresh_token, "r2");
    assert_eq!(client.session_tokens(), Some(seen[0].clone()));
}

#[tokio::test]
async fn a_login_with_a_second_factor_ends_with_the_session_held_and_reported() {
    let (base, _) = spawn().await;
    let client = Client::new(&base, Credentials::None).unwrap();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let sink = seen.clone();
    client.on_session_rotated(move |tokens| sink.lock().unwrap().push(tokens.user.email.clone()));
    let error = client
        .login("o@example.test", "wrong", None)
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some("invalid_credentials"));
    let outcome = client.login("o@example.test", "pw", None).await.unwrap();
    let LoginOutcome::MfaRequired {
        mfa_token,
        expires_in,
    } = outcome
    else {
        panic!("a second factor is asked for: {outcome:?}")
    };
    assert_eq!((mfa_token.as_str(), expires_in), ("mfa_1", Some(300)));
    assert!(client.session_tokens().is_none());
    let tokens = client
        .login_mfa(&mfa_token, &MfaCode::Totp("123456".into()), None)
        .await
        .unwrap();
    assert_eq!(tokens.role, "owner");
    assert_eq!(client.session_tokens().unwrap().access_token, "a2");
    assert_eq!(*seen.lock().unwrap(), vec!["o@example.test".to_owned()]);
    // The session now answers.
    client.get_run(RunId::new()).await.unwrap();
}

#[tokio::test]
async fn a_static_token_is_never_refreshed_and_a_refused_one_says_so() {
    let (base, fake) = spawn().await;
    let client = Client::new(&base, Credentials::Token("a1".into())).unwrap();
    let error = client.get_run(RunId::new()).await.unwrap_err();
    assert_eq!(error.code(), Some("token_expired"));
    assert!(error.is_unauthenticated());
    assert_eq!(fake.refreshes.load(Ordering::SeqCst), 0);

    let client = Client::new(&base, Credentials::Token("ak_good".into())).unwrap();
    let id = RunId::new();
    assert_eq!(client.get_run(id).await.unwrap().id, id);
    assert_eq!(*fake.run_id.lock().unwrap(), Some(id));

    // A refresh token that no longer works ends in the refresh's own error.
    let client = Client::new(&base, session("a1", "used")).unwrap();
    let error = client.get_run(RunId::new()).await.unwrap_err();
    assert_eq!(error.code(), Some("unauthenticated"));
}

#[tokio::test]
async fn an_error_body_is_read_only_up_to_the_bound() {
    let (base, _) = spawn().await;
    let options = ClientOptions {
        error_body_bytes_max: 1000,
        ..ClientOptions::default()
    };
    let client = Client::with_options(&base, Credentials::None, options).unwrap();
    let error = client.list_runs(&RunsQuery::default()).await.unwrap_err();
    let Error::Api(api) = error else {
        panic!("an API error: {error}")
    };
    assert_eq!(api.status, 500);
    assert_eq!(api.code, "http_500");
    assert!(api.message.len() < 1000, "{}", api.message.len());
}

#[tokio::test]
async fn live_events_arrive_typed_with_their_ids_and_unknown_kinds_are_skipped() {
    let (base, _) = spawn().await;
    let client = Client::new(&base, Credentials::Token("ak_good".into())).unwrap();
    let events: Vec<Event> = client
        .events(&EventsQuery::default())
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(events.len(), 4, "{events:?}");
    assert!(matches!(
        &events[0],
        Event::State { id: Some(id), event: DomainEvent::TaskRunStateChanged { attempt: 1, .. } } if id == "1-1"
    ));
    assert!(matches!(&events[1], Event::Log { line, .. } if line.text == "hello"));
    assert_eq!(
        events[2],
        Event::Reset {
            reason: "missed".into()
        }
    );
    assert_eq!(events[3].id(), Some("1-4"));
}

#[tokio::test]
async fn a_download_is_checked_against_its_metadata_and_leaves_no_partial_file() {
    let (base, _) = spawn().await;
    let client = Client::new(&base, Credentials::Token("ak_good".into())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut artifact = Artifact {
        id: arches_core::ArtifactId::new(),
        name: "greeting.txt".into(),
        version: 1,
        digest: hex::encode(Sha256::digest(b"hello")),
        size_bytes: 5,
        media_type: "text/plain".into(),
        table: None,
        produced_by: None,
        inputs: vec![],
        created_at: "2026-01-01T00:00:00Z".into(),
    };
    let path = dir.path().join("out.txt");
    assert_eq!(client.download_artifact(&artifact, &path).await.unwrap(), 5);
    assert_eq!(std::fs::read(&path).unwrap(), b"hello");

    artifact.digest = hex::encode(Sha256::digest(b"other"));
    let bad = dir.path().join("bad.txt");
    let error = client.download_artifact(&artifact, &bad).await.unwrap_err();
    assert!(matches!(error, Error::Integrity { .. }), "{error}");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("out.txt")]);
}

#[tokio::test]
async fn a_closed_port_is_a_connect_error_naming_the_url() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let client = Client::new(&base, Credentials::None).unwrap();
    let error = client.get_run(RunId::new()).await.unwrap_err();
    assert!(
        matches!(
            error,
            Error::Transport {
                kind: TransportKind::Connect,
                ..
            }
        ),
        "{error:?}"
    );
    let text = error.to_string();
    assert!(
        text.starts_with(&format!("cannot connect to {base}/api/v1/runs/")),
        "{text}"
    );
}

#[test]
fn base_urls_are_normalized_and_bad_ones_refused() {
    let text = |s: &str| parse_base_url(s).map(|u| base_url_text(&u));
    assert_eq!(text("127.0.0.1:8080").unwrap(), "http://127.0.0.1:8080");
    assert_eq!(
        text("http://x.test/arches/").unwrap(),
        "http://x.test/arches"
    );
    assert_eq!(text("https://x.test/").unwrap(), "https://x.test");
    assert!(text("ftp://x.test").is_err());
    assert!(text("http://x.test/?a=1").is_err());
    assert!(text("http://user:pw@x.test").is_err());
    assert!(text(" ").is_err());
}

#[test]
fn request_urls_encode_segments_and_keep_a_base_path() {
    let client = Client::new("http://x.test/base/", Credentials::None).unwrap();
    let url = client
        .url(&["api", "v1", "pipelines", "a b/c"], None)
        .unwrap();
    assert_eq!(
        url.as_str(),
        "http://x.test/base/api/v1/pipelines/a%20b%2Fc"
    );
    let url = client
        .url_with(
            &["api", "v1", "runs"],
            &RunsQuery {
                state: Some(RunState::Failed),
                limit: Some(5),
                ..RunsQuery::default()
            },
        )
        .unwrap();
    let mut pairs: Vec<_> = url.query_pairs().collect();
    pairs.sort();
    assert_eq!(
        pairs,
        vec![
            ("limit".into(), "5".into()),
            ("state".into(), "failed".into())
        ]
    );
}

#[test]
fn debug_output_hides_secrets() {
    let text = format!("{:?}", session("secret-access", "secret-refresh"));
    assert!(!text.contains("secret"), "{text}");
}
