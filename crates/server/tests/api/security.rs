//! Security at the HTTP level: forged, expired and misdirected access tokens; two refreshes
//! racing with one refresh token; a walk of every documented route by an owner of one org
//! against the resources of another; and malformed input. Every refusal has the one JSON
//! error shape and none is a 500.

use std::collections::BTreeSet;
use std::time::Duration;

use arches_auth::jwt::{AccessClaims, TokenIssuer};
use arches_auth::opaque;
use arches_core::identity::{InvitationRecord, Role};
use arches_core::{InvitationId, OrgId, RunId, SessionId, UserId};
use futures::StreamExt;
use reqwest::Method;
use serde_json::{json, Value};

use crate::common::TestServer;

const PASSWORD: &str = "correct horse battery staple";

// ---------------------------------------------------------------------------------------
// Requests and the error shape.

/// A request body.
#[derive(Clone, Debug)]
enum Payload {
    None,
    Json(Value),
    Yaml(String),
    Raw(&'static str, Vec<u8>),
}

impl Payload {
    fn text(&self) -> String {
        match self {
            Payload::None => String::new(),
            Payload::Json(value) => value.to_string(),
            Payload::Yaml(text) => text.clone(),
            Payload::Raw(_, bytes) => String::from_utf8_lossy(bytes).into_owned(),
        }
    }
}

/// What came back.
#[derive(Debug)]
struct Answer {
    status: u16,
    content_type: String,
    allow: Option<String>,
    text: String,
    json: Value,
}

/// How long a server-sent event stream is read before it is judged.
const STREAM_READ: Duration = Duration::from_millis(750);

/// Sends a request; a server-sent event stream is read for [`STREAM_READ`].
async fn call(
    server: &TestServer,
    method: Method,
    path: &str,
    credential: Option<&str>,
    payload: &Payload,
    headers: &[(&str, &str)],
) -> Answer {
    let mut request = server.client.request(method, server.url(path));
    if let Some(credential) = credential {
        request = request.header("authorization", format!("Bearer {credential}"));
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request = match payload {
        Payload::None => request,
        Payload::Json(value) => request.json(value),
        Payload::Yaml(text) => request
            .header("content-type", "application/yaml")
            .body(text.clone()),
        Payload::Raw(content_type, bytes) => {
            let request = if content_type.is_empty() {
                request
            } else {
                request.header("content-type", *content_type)
            };
            request.body(bytes.clone())
        }
    };
    let response = request.send().await.expect("the request is answered");
    read(response).await
}

async fn read(response: reqwest::Response) -> Answer {
    let status = response.status().as_u16();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let content_type = header("content-type").unwrap_or_default();
    let allow = header("allow");
    let text = if content_type.starts_with("text/event-stream") {
        let mut stream = response.bytes_stream();
        let mut text = String::new();
        let _ = tokio::time::timeout(STREAM_READ, async {
            while let Some(Ok(chunk)) = stream.next().await {
                text.push_str(&String::from_utf8_lossy(&chunk));
            }
        })
        .await;
        text
    } else {
        response.text().await.expect("a body")
    };
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    Answer {
        status,
        content_type,
        allow,
        text,
        json,
    }
}

/// The codes an error status may carry.
fn codes_of(status: u16) -> &'static [&'static str] {
    match status {
        400 => &["bad_request"],
        401 => &[
            "unauthenticated",
            "token_expired",
            "invalid_credentials",
            "mfa_required",
        ],
        403 => &["forbidden"],
        404 => &["not_found"],
        405 => &["method_not_allowed"],
        409 => &["conflict"],
        410 => &["gone"],
        413 => &["payload_too_large"],
        415 => &["unsupported_media_type"],
        416 => &["range_not_satisfiable"],
        422 => &["validation_failed"],
        429 => &["rate_limited"],
        _ => &[],
    }
}

/// Not a 5xx; an error answers `{code, message, details}` as JSON with a code that fits
/// its status.
fn assert_shape(answer: &Answer, context: &str) {
    assert!(
        answer.status < 500,
        "{context}: answered {} {}",
        answer.status,
        answer.text
    );
    if answer.status < 400 {
        return;
    }
    assert!(
        answer.content_type.starts_with("application/json"),
        "{context}: a {} error is not JSON ({:?}): {}",
        answer.status,
        answer.content_type,
        answer.text
    );
    let body = &answer.json;
    let code = body["code"]
        .as_str()
        .unwrap_or_else(|| panic!("{context}: no code in {}", answer.text));
    assert!(
        body["message"].is_string() && body["details"].is_object(),
        "{context}: not the error shape: {}",
        answer.text
    );
    assert!(
        codes_of(answer.status).contains(&code),
        "{context}: code {code} with status {}",
        answer.status
    );
    let keys: BTreeSet<&str> = body
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    assert_eq!(
        keys,
        BTreeSet::from(["code", "details", "message"]),
        "{context}: {}",
        answer.text
    );
}

/// Asserts `status` and `code`, and the shape.
fn assert_error(answer: &Answer, status: u16, code: &str, context: &str) {
    assert_shape(answer, context);
    assert_eq!(
        (answer.status, answer.json["code"].as_str()),
        (status, Some(code)),
        "{context}: {}",
        answer.text
    );
}

async fn signup(server: &TestServer, email: &str, display_name: &str) -> Value {
    let answer = call(
        server,
        Method::POST,
        "/api/v1/auth/signup",
        None,
        &Payload::Json(
            json!({ "email": email, "password": PASSWORD, "display_name": display_name }),
        ),
        &[],
    )
    .await;
    assert_eq!(answer.status, 201, "{}", answer.text);
    answer.json
}

async fn login(server: &TestServer, email: &str) -> Value {
    let answer = call(
        server,
        Method::POST,
        "/api/v1/auth/login",
        None,
        &Payload::Json(json!({ "email": email, "password": PASSWORD })),
        &[],
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    answer.json
}

async fn refresh(server: &TestServer, token: &str) -> Answer {
    call(
        server,
        Method::POST,
        "/api/v1/auth/refresh",
        None,
        &Payload::Json(json!({ "refresh_token": token })),
        &[],
    )
    .await
}

fn text(value: &Value, pointer: &str) -> String {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no {pointer} in {value}"))
        .to_owned()
}

// ---------------------------------------------------------------------------------------
// 1. Access tokens.

/// Base64url without padding (RFC 7515 section 2).
fn b64url(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(char::from(TABLE[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

fn segment(value: &impl serde::Serialize) -> String {
    b64url(&serde_json::to_vec(value).expect("json"))
}

#[tokio::test]
async fn forged_expired_and_misdirected_access_tokens_get_401_in_the_error_shape() {
    let server = TestServer::start().await;
    let (token, _) = server.token_in(OrgId::DEFAULT, Role::Owner).await;
    let (other_token, _) = server.token_in(OrgId::DEFAULT, Role::Viewer).await;
    let now = server.state.clock.now();
    let issuer = &server.state.auth.tokens;
    let claims = issuer.verify(&token, now).expect("the real token verifies");
    let other_claims = issuer.verify(&other_token, now).expect("verifies");
    let seconds = u64::try_from(now.as_micros() / 1_000_000).expect("after 1970");
    let signed = |edit: &dyn Fn(&mut AccessClaims)| {
        let mut claims = claims.clone();
        edit(&mut claims);
        issuer.sign(&claims).expect("signs")
    };
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3);
    let (header, payload, signature) = (parts[0], parts[1], parts[2]);
    let with_header = |alg: &str, signature: &str| {
        format!(
            "{}.{payload}.{signature}",
            segment(&json!({ "alg": alg, "typ": "JWT" }))
        )
    };

    // A real refresh token, and a session that logged out.
    let ada = signup(&server, "ada@example.test", "Ada").await;
    let refresh_token = text(&ada, "/refresh_token");
    let logged_out = text(&ada, "/access_token");
    let answer = call(
        &server,
        Method::POST,
        "/api/v1/auth/logout",
        Some(&logged_out),
        &Payload::None,
        &[],
    )
    .await;
    assert_eq!(answer.status, 204, "{}", answer.text);

    let wrong_key = TokenIssuer::new(
        &[7u8; 64],
        claims.iss.clone(),
        claims.aud.clone(),
        issuer.ttl_seconds(),
    )
    .expect("an issuer")
    .sign(&claims)
    .expect("signs");
    let expired_wrong_key = TokenIssuer::new(
        &[7u8; 64],
        claims.iss.clone(),
        claims.aud.clone(),
        issuer.ttl_seconds(),
    )
    .expect("an issuer")
    .sign(&AccessClaims {
        iat: seconds - 7200,
        nbf: seconds - 7200,
        exp: seconds - 3600,
        ..claims.clone()
    })
    .expect("signs");

    let cases: Vec<(&str, String, &str)> = vec![
        (
            "alg none, no signature",
            with_header("none", ""),
            "unauthenticated",
        ),
        (
            "alg none, the real signature",
            with_header("none", signature),
            "unauthenticated",
        ),
        ("alg None", with_header("None", ""), "unauthenticated"),
        (
            "alg HS512 with the HS256 signature",
            with_header("HS512", signature),
            "unauthenticated",
        ),
        (
            "alg RS256 with the HS256 signature",
            with_header("RS256", signature),
            "unauthenticated",
        ),
        (
            "no signature",
            format!("{header}.{payload}."),
            "unauthenticated",
        ),
        (
            "two segments",
            format!("{header}.{payload}"),
            "unauthenticated",
        ),
        (
            "HS256 signed with another key",
            wrong_key,
            "unauthenticated",
        ),
        // Only an authentic token may learn that it expired.
        (
            "expired and signed with another key",
            expired_wrong_key,
            "unauthenticated",
        ),
        (
            "payload changed, signature kept",
            format!(
                "{header}.{}.{signature}",
                segment(&AccessClaims {
                    role: "owner".into(),
                    org: OrgId::new().to_string(),
                    ..claims.clone()
                })
            ),
            "unauthenticated",
        ),
        (
            "expired an hour ago",
            signed(&|c| {
                c.iat = seconds - 7200;
                c.nbf = seconds - 7200;
                c.exp = seconds - 3600;
            }),
            "token_expired",
        ),
        (
            "not valid for an hour",
            signed(&|c| {
                c.iat = seconds + 3600;
                c.nbf = seconds + 3600;
                c.exp = seconds + 7200;
            }),
            "unauthenticated",
        ),
        (
            "another audience",
            signed(&|c| c.aud = "another-api".into()),
            "unauthenticated",
        ),
        (
            "another issuer",
            signed(&|c| c.iss = "https://evil.example".into()),
            "unauthenticated",
        ),
        (
            "not an access token",
            signed(&|c| c.typ = "refresh".into()),
            "unauthenticated",
        ),
        (
            "another user's session",
            signed(&|c| c.sid = other_claims.sid.clone()),
            "unauthenticated",
        ),
        (
            "an unknown session",
            signed(&|c| c.sid = SessionId::new().to_string()),
            "unauthenticated",
        ),
        (
            "a subject that is no user id",
            signed(&|c| c.sub = "admin".into()),
            "unauthenticated",
        ),
        (
            "an unknown user",
            signed(&|c| c.sub = UserId::new().to_string()),
            "unauthenticated",
        ),
        (
            "an org the user is not in",
            signed(&|c| c.org = OrgId::new().to_string()),
            "unauthenticated",
        ),
        ("a refresh token", refresh_token.clone(), "unauthenticated"),
        (
            "a logged-out session",
            logged_out.clone(),
            "unauthenticated",
        ),
        ("garbage", "not-a-token".to_owned(), "unauthenticated"),
        (
            "an API key that does not exist",
            "ak_garbage".to_owned(),
            "unauthenticated",
        ),
        ("an empty credential", String::new(), "unauthenticated"),
        ("a 9 KiB token", "e".repeat(9 * 1024), "unauthenticated"),
    ];

    // The real token works: the refusals below are the token's doing.
    let answer = call(
        &server,
        Method::GET,
        "/api/v1/runs",
        Some(&token),
        &Payload::None,
        &[],
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text);

    let pipeline = "name: forged\ntasks:\n  - id: a\n    tool: noop\n";
    for (name, credential, code) in &cases {
        for (method, path, payload) in [
            (Method::GET, "/api/v1/runs", Payload::None),
            (Method::GET, "/api/v1/account", Payload::None),
            (
                Method::POST,
                "/api/v1/pipelines",
                Payload::Yaml(pipeline.to_owned()),
            ),
        ] {
            let context = format!("{name}: {method} {path}");
            let answer = call(&server, method, path, Some(credential), &payload, &[]).await;
            assert_error(&answer, 401, code, &context);
            if *code == "unauthenticated" {
                // One message whatever was wrong: a probe learns nothing.
                assert_eq!(
                    answer.json["message"], "missing, invalid or expired credentials",
                    "{context}"
                );
            }
        }
    }
    // Other schemes and no credential at all.
    for (name, value) in [
        ("basic", format!("Basic {}", b64url(b"ada:secret"))),
        ("the token without a scheme", token.clone()),
        ("the scheme twice", format!("Bearer Bearer {token}")),
    ] {
        let answer = call(
            &server,
            Method::GET,
            "/api/v1/runs",
            None,
            &Payload::None,
            &[("authorization", value.as_str())],
        )
        .await;
        assert_error(&answer, 401, "unauthenticated", name);
    }
    let not_text = reqwest::header::HeaderValue::from_bytes(b"Bearer \xff\xfe").unwrap();
    let response = server
        .client
        .get(server.url("/api/v1/runs"))
        .header("authorization", not_text)
        .send()
        .await
        .unwrap();
    assert_error(
        &read(response).await,
        401,
        "unauthenticated",
        "a header that is not text",
    );
    let answer = call(
        &server,
        Method::GET,
        "/api/v1/runs",
        None,
        &Payload::None,
        &[],
    )
    .await;
    assert_error(&answer, 401, "unauthenticated", "no credential");

    // Nothing forged got in.
    let answer = call(
        &server,
        Method::GET,
        "/api/v1/pipelines",
        Some(&token),
        &Payload::None,
        &[],
    )
    .await;
    assert_eq!(answer.json["items"], json!([]), "{}", answer.text);
}

// ---------------------------------------------------------------------------------------
// 2. Refresh races.

/// The documented rule (`RefreshOutcome`): a refresh token works once; presenting a used one
/// is a reuse, which revokes the whole family (the session). Of two simultaneous
/// presentations one rotates and the other is therefore a reuse: the family dies, and the
/// winner's new tokens die with it.
#[tokio::test]
async fn two_parallel_refreshes_of_one_token_rotate_once_and_the_reuse_revokes_the_family() {
    let server = TestServer::start().await;
    signup(&server, "ada@example.test", "Ada").await;
    for round in 0..4 {
        let session = login(&server, "ada@example.test").await;
        let access = text(&session, "/access_token");
        let token = text(&session, "/refresh_token");
        let account = call(
            &server,
            Method::GET,
            "/api/v1/account",
            Some(&access),
            &Payload::None,
            &[],
        )
        .await;
        let session_id: SessionId = text(&account.json, "/session_id")
            .parse()
            .expect("a session id");

        let (first, second) = tokio::join!(refresh(&server, &token), refresh(&server, &token));
        let mut statuses = [first.status, second.status];
        statuses.sort_unstable();
        assert_eq!(
            statuses,
            [200, 401],
            "round {round}: exactly one refresh succeeds: {} / {}",
            first.text,
            second.text
        );
        let (winner, loser) = if first.status == 200 {
            (first, second)
        } else {
            (second, first)
        };
        assert_error(&loser, 401, "unauthenticated", "the losing refresh");
        let next_refresh = text(&winner.json, "/refresh_token");
        let next_access = text(&winner.json, "/access_token");
        assert_ne!(next_refresh, token);

        let stored = server
            .state
            .identity
            .session(session_id)
            .await
            .unwrap()
            .expect("the session");
        assert!(stored.revoked_at.is_some(), "round {round}: {stored:?}");
        assert_eq!(
            stored.revoked_reason.as_deref(),
            Some("refresh_token_reuse"),
            "round {round}"
        );
        // The family is dead: the winner's new refresh token, its access token and the
        // first access token are all refused.
        let answer = refresh(&server, &next_refresh).await;
        assert_error(
            &answer,
            401,
            "unauthenticated",
            "the winner's refresh token",
        );
        for (name, credential) in [
            ("the winner's access token", &next_access),
            ("the first access token", &access),
        ] {
            let answer = call(
                &server,
                Method::GET,
                "/api/v1/account",
                Some(credential),
                &Payload::None,
                &[],
            )
            .await;
            assert_error(&answer, 401, "unauthenticated", name);
        }
        let answer = refresh(&server, &token).await;
        assert_error(
            &answer,
            401,
            "unauthenticated",
            "the first refresh token again",
        );
    }

    // Eight at once: still exactly one rotation.
    let session = login(&server, "ada@example.test").await;
    let token = text(&session, "/refresh_token");
    let answers = futures::future::join_all((0..8).map(|_| refresh(&server, &token))).await;
    let won: Vec<&Answer> = answers.iter().filter(|a| a.status == 200).collect();
    assert_eq!(
        won.len(),
        1,
        "{:?}",
        answers.iter().map(|a| a.status).collect::<Vec<_>>()
    );
    for answer in answers.iter().filter(|a| a.status != 200) {
        assert_error(answer, 401, "unauthenticated", "a losing refresh of eight");
    }
    let answer = refresh(&server, &text(&won[0].json, "/refresh_token")).await;
    assert_error(&answer, 401, "unauthenticated", "the winner of eight");

    // Without a race, a rotated token refreshes once and its successor keeps working.
    let session = login(&server, "ada@example.test").await;
    let answer = refresh(&server, &text(&session, "/refresh_token")).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let answer = refresh(&server, &text(&answer.json, "/refresh_token")).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
}

// ---------------------------------------------------------------------------------------
// 3. Tenant isolation.

const B_PIPELINE: &str = r#"
name: bsecret_pipeline
tasks:
  - id: bsecret_write
    tool: shell
    with:
      command: "echo bsecret-content > out.txt; echo bsecret-log-line"
      collect:
        - path: out.txt
          name: bsecret/out.txt
          media_type: text/plain
  - id: bsecret_copy
    tool: shell
    with:
      files:
        in.txt: bsecret_write
      command: "cp in.txt copy.txt"
      collect:
        - path: copy.txt
          name: bsecret/copy.txt
          media_type: text/plain
"#;

/// Org B as its owner sees it.
struct OrgB {
    owner_token: String,
    org_id: String,
    user_id: String,
    pipeline: String,
    run_id: String,
    artifact_id: String,
    api_key: String,
    api_key_id: String,
    invitation_id: String,
    invitation_token: String,
    session_id: String,
    first_event_id: String,
    /// An open item of B's validation queue.
    review_id: String,
    /// Every value that belongs to B: none may reach A unless A sent it.
    secrets: Vec<String>,
}

async fn as_b(server: &TestServer, b: &str, method: Method, path: &str, payload: Payload) -> Value {
    let answer = call(server, method.clone(), path, Some(b), &payload, &[]).await;
    assert!(
        (200..300).contains(&answer.status),
        "{method} {path}: {} {}",
        answer.status,
        answer.text
    );
    answer.json
}

async fn make_org_b(server: &TestServer) -> OrgB {
    let bob = signup(server, "bob@bsecret.example.test", "Bobsecret").await;
    let b = text(&bob, "/access_token");
    let mut secrets: Vec<String> = [
        "/user/id",
        "/user/email",
        "/org/id",
        "/org/slug",
        "/org/name",
        "/access_token",
        "/refresh_token",
    ]
    .iter()
    .map(|p| text(&bob, p))
    .collect();
    secrets.push("Bobsecret".into());

    let created = as_b(
        server,
        &b,
        Method::POST,
        "/api/v1/pipelines",
        Payload::Yaml(B_PIPELINE.into()),
    )
    .await;
    secrets.push(text(&created, "/digest"));
    for name in [
        "bsecret_pipeline",
        "bsecret_write",
        "bsecret_copy",
        "bsecret/out.txt",
        "bsecret/copy.txt",
        "bsecret-content",
        "bsecret-log-line",
    ] {
        secrets.push(name.into());
    }

    // Follow B's live events while the run goes, to learn the event ids.
    let events = server
        .client
        .get(server.url("/api/v1/events"))
        .bearer_auth(&b)
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 200);
    let mut events = events.bytes_stream();
    let run = as_b(
        server,
        &b,
        Method::POST,
        "/api/v1/runs",
        Payload::Json(json!({ "pipeline": "bsecret_pipeline" })),
    )
    .await;
    let run_id = text(&run, "/id");
    secrets.push(run_id.clone());
    let mut stream = String::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while !stream.contains("id: ") || !stream.contains("\n\n") {
            let chunk = events.next().await.expect("open").unwrap();
            stream.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .expect("B's run publishes events");
    drop(events);
    assert_eq!(server.finished(&run_id).await, "succeeded");
    let first_event_id = stream
        .lines()
        .find_map(|l| l.strip_prefix("id: "))
        .expect("events have ids")
        .to_owned();

    let task_runs = as_b(
        server,
        &b,
        Method::GET,
        &format!("/api/v1/runs/{run_id}/task-runs"),
        Payload::None,
    )
    .await;
    let task_runs = task_runs["items"].as_array().unwrap().clone();
    assert_eq!(task_runs.len(), 2);
    secrets.extend(task_runs.iter().map(|t| text(t, "/id")));
    let logs = as_b(
        server,
        &b,
        Method::GET,
        &format!("/api/v1/runs/{run_id}/logs"),
        Payload::None,
    )
    .await;
    assert!(logs.to_string().contains("bsecret-log-line"), "{logs}");
    let artifacts = as_b(
        server,
        &b,
        Method::GET,
        &format!("/api/v1/artifacts?run_id={run_id}"),
        Payload::None,
    )
    .await;
    let artifacts = artifacts["items"].as_array().unwrap().clone();
    assert_eq!(artifacts.len(), 2, "{artifacts:?}");
    for artifact in &artifacts {
        secrets.push(text(artifact, "/id"));
        secrets.push(text(artifact, "/digest"));
    }
    let artifact_id = text(
        artifacts
            .iter()
            .find(|a| a["name"] == "bsecret/copy.txt")
            .unwrap(),
        "/id",
    );

    let key = as_b(
        server,
        &b,
        Method::POST,
        "/api/v1/account/api-keys",
        Payload::Json(json!({ "name": "bsecret-key" })),
    )
    .await;
    let api_key = text(&key, "/key");
    let api_key_id = text(&key, "/id");
    secrets.extend([
        api_key.clone(),
        api_key_id.clone(),
        "bsecret-key".to_owned(),
    ]);

    let invitation = as_b(
        server,
        &b,
        Method::POST,
        "/api/v1/orgs/current/invitations",
        Payload::Json(json!({ "email": "carol@bsecret.example.test", "role": "editor" })),
    )
    .await;
    let invitation_id = text(&invitation, "/id");
    secrets.extend([
        invitation_id.clone(),
        "carol@bsecret.example.test".to_owned(),
    ]);
    // A second invitation whose token the test knows (the API only mails it).
    let invitation_token = opaque::generate(opaque::INVITATION_PREFIX).plaintext;
    let now = server.state.clock.now();
    let org_id = text(&bob, "/org/id");
    let user_id = text(&bob, "/user/id");
    let known = InvitationRecord {
        id: InvitationId::new(),
        org_id: org_id.parse().unwrap(),
        email: "dave@bsecret.example.test".to_owned(),
        role: Role::Admin,
        token_hash: opaque::hash_token(&invitation_token),
        invited_by: user_id.parse().unwrap(),
        created_at: now,
        expires_at: now.plus(Duration::from_secs(3600)),
        accepted_at: None,
        accepted_by: None,
        revoked_at: None,
    };
    server
        .state
        .identity
        .create_invitation(&known)
        .await
        .unwrap();
    secrets.extend([
        known.id.to_string(),
        known.email.clone(),
        invitation_token.clone(),
    ]);

    // A second session, from a login.
    let second = login(server, "bob@bsecret.example.test").await;
    secrets.extend([
        text(&second, "/access_token"),
        text(&second, "/refresh_token"),
    ]);
    let sessions = as_b(
        server,
        &b,
        Method::GET,
        "/api/v1/account/sessions",
        Payload::None,
    )
    .await;
    let sessions = sessions.as_array().unwrap().clone();
    assert_eq!(sessions.len(), 2);
    secrets.extend(sessions.iter().map(|s| text(s, "/id")));
    let session_id = text(
        sessions.iter().find(|s| s["current"] == false).unwrap(),
        "/id",
    );

    // A registered tool and a secret of B's.
    as_b(
        server,
        &b,
        Method::POST,
        "/api/v1/tools",
        Payload::Json(json!({
            "name": "bsecret_tool",
            "description": "bsecret tool description",
            "implementation": {"http": {"url": "http://127.0.0.1:9/bsecret-endpoint"}},
            "capabilities": {"hosts": ["127.0.0.1:9"]}
        })),
    )
    .await;
    as_b(
        server,
        &b,
        Method::PUT,
        "/api/v1/secrets/BSECRET_KEY",
        Payload::Json(json!({"value": "bsecret-value-0042"})),
    )
    .await;
    secrets.extend([
        "bsecret_tool".to_owned(),
        "bsecret-endpoint".to_owned(),
        "BSECRET_KEY".to_owned(),
        "bsecret-value-0042".to_owned(),
    ]);

    // An open notice on B's run, written as the engine writes items.
    let review = b_review_item(&org_id, &run_id, server.state.clock.now());
    server
        .state
        .store
        .commit(&arches_core::records::WriteBatch {
            reviews: vec![review.clone()],
            ..Default::default()
        })
        .await
        .expect("B's review item is stored");
    let review_id = review.id.to_string();
    secrets.push(review_id.clone());

    OrgB {
        review_id,
        owner_token: b,
        org_id,
        user_id,
        pipeline: "bsecret_pipeline".to_owned(),
        run_id,
        artifact_id,
        api_key,
        api_key_id,
        invitation_id,
        invitation_token,
        session_id,
        first_event_id,
        secrets,
    }
}

/// An open notice on B's run (task `bsecret_write`).
fn b_review_item(
    org_id: &str,
    run_id: &str,
    now: arches_core::Timestamp,
) -> arches_core::review::ReviewItem {
    use arches_core::review::{ReviewItem, ReviewKind, ReviewState};
    ReviewItem {
        id: arches_core::ReviewId::new(),
        org_id: org_id.parse().unwrap(),
        run_id: run_id.parse().unwrap(),
        task_run_id: arches_core::TaskRunId::new(),
        task_id: arches_core::TaskId::parse("bsecret_write").unwrap(),
        index: None,
        pipeline_name: "bsecret_pipeline".into(),
        tool: "shell".into(),
        kind: ReviewKind::Notice,
        state: ReviewState::Open,
        attempt: 1,
        inputs: json!({"bsecret": "bsecret-review-input"}),
        proposed: json!({"bsecret": "bsecret-review-output"}),
        confidence: Some(0.8),
        rationale: None,
        thresholds: None,
        sample_rate: 1.0,
        assignees: Vec::new(),
        quorum: 1,
        message: None,
        expires_at: None,
        on_expiry: None,
        votes: Vec::new(),
        created_at: now,
        decided_at: None,
        claimed_by: None,
        claim_expires_at: None,
    }
}

/// Everything of B that its owner can read, to compare before and after.
async fn snapshot(server: &TestServer, b: &OrgB) -> Vec<(String, Value)> {
    let mut snapshot = Vec::new();
    for path in [
        format!("/api/v1/pipelines/{}", b.pipeline),
        format!("/api/v1/pipelines/{}/versions", b.pipeline),
        "/api/v1/pipelines?include_archived=true".to_owned(),
        format!("/api/v1/runs/{}", b.run_id),
        "/api/v1/runs".to_owned(),
        format!("/api/v1/runs/{}/task-runs", b.run_id),
        format!("/api/v1/runs/{}/logs", b.run_id),
        "/api/v1/artifacts".to_owned(),
        format!("/api/v1/artifacts/{}/lineage", b.artifact_id),
        "/api/v1/orgs/current/members".to_owned(),
        "/api/v1/orgs".to_owned(),
        "/api/v1/tools/bsecret_tool/versions".to_owned(),
        "/api/v1/secrets".to_owned(),
    ] {
        let value = as_b(server, &b.owner_token, Method::GET, &path, Payload::None).await;
        snapshot.push((path, value));
    }
    // Time-dependent fields are left out.
    let mut keys = as_b(
        server,
        &b.owner_token,
        Method::GET,
        "/api/v1/account/api-keys",
        Payload::None,
    )
    .await;
    strip(&mut keys, &["last_used_at"]);
    snapshot.push(("api keys".to_owned(), keys));
    let invitations = as_b(
        server,
        &b.owner_token,
        Method::GET,
        "/api/v1/orgs/current/invitations",
        Payload::None,
    )
    .await;
    snapshot.push(("invitations".to_owned(), invitations));
    let mut sessions = as_b(
        server,
        &b.owner_token,
        Method::GET,
        "/api/v1/account/sessions",
        Payload::None,
    )
    .await;
    strip(&mut sessions, &["last_seen_at", "last_ip"]);
    snapshot.push(("sessions".to_owned(), sessions));
    let content = server
        .client
        .get(server.url(&format!("/api/v1/artifacts/{}/content", b.artifact_id)))
        .bearer_auth(&b.owner_token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    snapshot.push(("content".to_owned(), Value::String(content)));
    snapshot
}

/// Removes `fields` from every object in `value`.
fn strip(value: &mut Value, fields: &[&str]) {
    match value {
        Value::Object(map) => {
            for field in fields {
                map.remove(*field);
            }
            for v in map.values_mut() {
                strip(v, fields);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| strip(v, fields)),
        _ => {}
    }
}

/// B's value and a made-up value of the same kind for a path parameter, by route.
fn path_values(path: &str, param: &str, b: &OrgB) -> Option<(String, String)> {
    let uuid = || uuid::Uuid::now_v7().to_string();
    Some(match (param, path) {
        ("name", p) if p.starts_with("/api/v1/pipelines/") => {
            (b.pipeline.clone(), "no_such_pipeline".to_owned())
        }
        ("version", p) if p.starts_with("/api/v1/pipelines/") => ("1".to_owned(), "1".to_owned()),
        ("name", p) if p.starts_with("/api/v1/tools/") => {
            ("bsecret_tool".to_owned(), "no_such_tool".to_owned())
        }
        ("version", p) if p.starts_with("/api/v1/tools/") => ("1".to_owned(), "1".to_owned()),
        ("name", p) if p.starts_with("/api/v1/secrets/") => {
            ("BSECRET_KEY".to_owned(), "NO_SUCH_SECRET".to_owned())
        }
        ("id", p) if p.starts_with("/api/v1/runs/") => (b.run_id.clone(), uuid()),
        ("id", p) if p.starts_with("/api/v1/artifacts/") => (b.artifact_id.clone(), uuid()),
        ("id", p) if p.starts_with("/api/v1/account/sessions/") => (b.session_id.clone(), uuid()),
        ("id", p) if p.starts_with("/api/v1/account/api-keys/") => (b.api_key_id.clone(), uuid()),
        ("id", p) if p.starts_with("/api/v1/orgs/current/invitations/") => {
            (b.invitation_id.clone(), uuid())
        }
        ("user_id", p) if p.starts_with("/api/v1/orgs/current/members/") => {
            (b.user_id.clone(), uuid())
        }
        ("id", p) if p.starts_with("/api/v1/reviews/") => (b.review_id.clone(), uuid()),
        _ => return None,
    })
}

/// B's value for a query parameter, by route and name.
fn query_value(path: &str, param: &str, b: &OrgB) -> Option<String> {
    Some(match param {
        "cursor" if path == "/api/v1/runs" => b.run_id.clone(),
        "pipeline" => b.pipeline.clone(),
        "run_id" => b.run_id.clone(),
        "name" => "bsecret/out.txt".to_owned(),
        "actor" => b.user_id.clone(),
        "task" => "bsecret_write".to_owned(),
        _ => return None,
    })
}

/// The body sent with a route: one that names B's resources where the endpoint takes
/// them, else `{}`.
fn body_for(method: &str, path: &str, b: &OrgB) -> Payload {
    match (method, path) {
        ("get" | "delete", _) => Payload::None,
        ("post", "/api/v1/runs") => Payload::Json(json!({ "pipeline": b.pipeline })),
        ("post", "/api/v1/orgs/switch") => Payload::Json(json!({ "org_id": b.org_id })),
        ("post", "/api/v1/account/api-keys") => {
            Payload::Json(json!({ "name": "walk", "org_id": b.org_id, "role": "owner" }))
        }
        ("post", "/api/v1/invitations/accept") => {
            Payload::Json(json!({ "token": b.invitation_token }))
        }
        ("patch", "/api/v1/orgs/current/members/{user_id}") => {
            Payload::Json(json!({ "role": "viewer" }))
        }
        ("put", "/api/v1/pipelines/{name}") => Payload::Yaml(B_PIPELINE.to_owned()),
        ("put", "/api/v1/secrets/{name}") => Payload::Json(json!({"value": "alice-own-value"})),
        ("post", "/api/v1/reviews/{id}/decision") => Payload::Json(json!({"verdict": "approve"})),
        _ => Payload::Json(json!({})),
    }
}

/// The anonymous endpoints, not walked: they act on no org.
const ANONYMOUS: &[(&str, &str)] = &[
    ("post", "/api/v1/auth/signup"),
    ("post", "/api/v1/auth/login"),
    ("post", "/api/v1/auth/login/mfa"),
    ("post", "/api/v1/auth/refresh"),
    ("post", "/api/v1/auth/verify-email"),
    ("post", "/api/v1/auth/password/forgot"),
    ("post", "/api/v1/auth/password/reset"),
];

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

fn method_of(name: &str) -> Method {
    name.to_ascii_uppercase().parse().expect("a method")
}

/// Replaces both values of each pair in `text` by the pair's placeholder.
fn normalize(text: &str, pairs: &[(String, String)]) -> String {
    pairs
        .iter()
        .enumerate()
        .filter(|(_, (value, other))| value != other)
        .fold(text.to_owned(), |t, (i, (value, other))| {
            let placeholder = format!("<{i}>");
            t.replace(value.as_str(), &placeholder)
                .replace(other.as_str(), &placeholder)
        })
}

/// A credential of A's owner: a new login session each time (the walk logs out and
/// revokes sessions), or A's API key.
async fn credential(
    server: &TestServer,
    kind: &str,
    user: UserId,
    org: OrgId,
    key: &str,
) -> String {
    match kind {
        "session" => server.session_token(user, org, Role::Owner).await,
        _ => key.to_owned(),
    }
}

#[tokio::test]
async fn an_owner_of_one_org_can_neither_read_nor_change_anything_of_another_org_on_any_route() {
    let (_, key) = arches_auth::sealing::MasterKey::generate("k1").unwrap();
    let server = TestServer::start_with(|c| {
        c.multi_tenant = true;
        c.secrets.keys = Some(arches_server::config::Secret::new(key));
        c.tools.http.allowed_hosts = vec!["127.0.0.1:9".to_owned()];
    })
    .await;
    let alice = signup(&server, "alice@a.example.test", "Alice").await;
    let alice_user: UserId = text(&alice, "/user/id").parse().unwrap();
    let alice_org: OrgId = text(&alice, "/org/id").parse().unwrap();
    let b = make_org_b(&server).await;
    assert_ne!(alice_org.to_string(), b.org_id);
    // A has resources of its own, so its lists are not trivially empty.
    let alice_token = text(&alice, "/access_token");
    let own = call(
        &server,
        Method::POST,
        "/api/v1/pipelines",
        Some(&alice_token),
        &Payload::Yaml("name: alice_pipeline\ntasks:\n  - id: a\n    tool: noop\n".into()),
        &[],
    )
    .await;
    assert_eq!(own.status, 201, "{}", own.text);
    let own = call(
        &server,
        Method::POST,
        "/api/v1/runs",
        Some(&alice_token),
        &Payload::Json(json!({ "pipeline": "alice_pipeline" })),
        &[],
    )
    .await;
    assert_eq!(own.status, 201, "{}", own.text);
    server.finished(&text(&own.json, "/id")).await;
    let key = call(
        &server,
        Method::POST,
        "/api/v1/account/api-keys",
        Some(&alice_token),
        &Payload::Json(json!({ "name": "alice-key" })),
        &[],
    )
    .await;
    assert_eq!(key.status, 201, "{}", key.text);
    let alice_key = text(&key.json, "/key");

    let before = snapshot(&server, &b).await;

    let doc = call(
        &server,
        Method::GET,
        "/api/v1/openapi.json",
        None,
        &Payload::None,
        &[],
    )
    .await;
    assert_eq!(doc.status, 200);
    let paths = doc.json["paths"].as_object().expect("paths").clone();

    // The skip list is exactly the documented anonymous operations.
    let mut anonymous = BTreeSet::new();
    for (path, item) in &paths {
        for method in METHODS {
            if let Some(op) = item.get(method) {
                if op.get("security") == Some(&json!([])) {
                    anonymous.insert((method.to_owned(), path.clone()));
                }
            }
        }
    }
    let skipped: BTreeSet<(String, String)> = ANONYMOUS
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    assert_eq!(anonymous, skipped, "the anonymous operations");

    // Operations without path parameters first (so A's audit trail holds nothing of the
    // walk yet), then those with; the upsert last.
    let mut operations: Vec<(String, String, Value)> = Vec::new();
    for (path, item) in &paths {
        for method in METHODS {
            if let Some(op) = item.get(method) {
                if !skipped.contains(&(method.to_owned(), path.clone())) {
                    operations.push((method.to_owned(), path.clone(), op.clone()));
                }
            }
        }
    }
    operations.sort_by_key(|(m, p, _)| {
        (
            m == "put" && (p == "/api/v1/pipelines/{name}" || p == "/api/v1/secrets/{name}"),
            p.contains('{'),
        )
    });

    let mut walked: BTreeSet<String> = BTreeSet::new();
    let mut unmapped: Vec<String> = Vec::new();
    let mut checks = 0;
    for (method, path, op) in &operations {
        let payload = body_for(method, path, &b);
        let params: Vec<String> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(str::to_owned)
            .collect();
        let queries: Vec<(String, String)> = op["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["in"] == "query")
            .filter_map(|p| {
                let name = p["name"].as_str()?;
                query_value(path, name, &b).map(|v| (name.to_owned(), v))
            })
            .collect();
        let mut headers: Vec<(&str, String)> = Vec::new();
        if path == "/api/v1/events" {
            // Replay from the start of the bus: B's events are in its buffer.
            let epoch = b.first_event_id.split('-').next().unwrap();
            headers.push(("last-event-id", format!("{epoch}-0")));
        }
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let method_name = method.to_ascii_uppercase();

        if params.is_empty() {
            // No B in the path: whatever answers must hold nothing of B's that the request
            // did not name itself.
            let mut urls = vec![path.clone()];
            if !queries.is_empty() {
                let query: Vec<String> = queries.iter().map(|(n, v)| format!("{n}={v}")).collect();
                urls.push(format!("{path}?{}", query.join("&")));
            }
            for kind in ["session", "api key"] {
                for url in &urls {
                    let token = credential(&server, kind, alice_user, alice_org, &alice_key).await;
                    let answer = call(
                        &server,
                        method_of(method),
                        url,
                        Some(&token),
                        &payload,
                        &headers,
                    )
                    .await;
                    let context = format!("{kind}: {method_name} {url}: {}", answer.status);
                    assert_shape(&answer, &context);
                    let sent = format!("{url} {}", payload.text());
                    for secret in &b.secrets {
                        assert!(
                            sent.contains(secret.as_str())
                                || !answer.text.contains(secret.as_str()),
                            "{context}: B's {secret:?} leaked: {}",
                            answer.text
                        );
                    }
                    checks += 1;
                }
            }
            walked.insert(format!("{method} {path}"));
            continue;
        }

        let mut url = path.clone();
        let mut decoy = path.clone();
        let mut pairs = Vec::new();
        for param in &params {
            let (value, other) = path_values(path, param, &b).unwrap_or_else(|| {
                unmapped.push(format!("{method} {path} {{{param}}}"));
                (
                    uuid::Uuid::now_v7().to_string(),
                    uuid::Uuid::now_v7().to_string(),
                )
            });
            url = url.replace(&format!("{{{param}}}"), &value);
            decoy = decoy.replace(&format!("{{{param}}}"), &other);
            pairs.push((value, other));
        }
        for kind in ["session", "api key"] {
            let token = credential(&server, kind, alice_user, alice_org, &alice_key).await;
            let answer = call(
                &server,
                method_of(method),
                &url,
                Some(&token),
                &payload,
                &headers,
            )
            .await;
            let context = format!("{kind}: {method_name} {url}: {}", answer.status);
            assert_shape(&answer, &context);
            checks += 1;

            if method == "put" && path == "/api/v1/pipelines/{name}" {
                // PUT saves a version of the pipeline of that name in the caller's org,
                // creating it when there is none: A gets a version 1 of its own, and B's
                // history is untouched (the snapshot below). Walked last, so that A's own
                // copy cannot pass for a leak.
                let version = answer.json["version"].as_u64();
                assert!(
                    [403, 404].contains(&answer.status)
                        || (answer.status == 200 && version == Some(1)),
                    "{context}: {}",
                    answer.text
                );
                continue;
            }
            if method == "put" && path == "/api/v1/secrets/{name}" {
                // Likewise PUT sets A's own secret of that name: version 1 (then 2 for the
                // second credential) sealed for A's org, never B's (the snapshot below).
                let version = answer.json["version"].as_u64();
                assert!(
                    [403, 404].contains(&answer.status)
                        || ([200, 201].contains(&answer.status) && matches!(version, Some(1 | 2))),
                    "{context}: {}",
                    answer.text
                );
                continue;
            }
            assert!(
                [403, 404].contains(&answer.status),
                "{context}: B's resource was served or changed: {}",
                answer.text
            );
            // And B's resource answers exactly as one that does not exist.
            let token = credential(&server, kind, alice_user, alice_org, &alice_key).await;
            let other = call(
                &server,
                method_of(method),
                &decoy,
                Some(&token),
                &payload,
                &headers,
            )
            .await;
            assert_eq!(
                (other.status, normalize(&other.text, &pairs)),
                (answer.status, normalize(&answer.text, &pairs)),
                "{context}: B's resource answers unlike a missing one"
            );
            checks += 1;
        }
        walked.insert(format!("{method} {path}"));
    }
    assert!(checks > 50, "{checks} requests");
    assert!(!walked.is_empty());
    let with_parameters: BTreeSet<&String> = paths.keys().filter(|p| p.contains('{')).collect();
    for path in &with_parameters {
        assert!(
            walked.iter().any(|w| w.ends_with(&format!(" {path}"))),
            "{path} was not walked"
        );
    }
    assert!(
        unmapped.is_empty(),
        "parameters not mapped to B's resources: {unmapped:?}"
    );
    eprintln!("walked {} operations with {checks} requests", walked.len());

    // Nothing of B changed.
    let after = snapshot(&server, &b).await;
    let review = server
        .state
        .store
        .review_item(b.review_id.parse().unwrap())
        .await
        .unwrap()
        .expect("B's item is still there");
    assert_eq!(
        (review.state, review.claimed_by),
        (arches_core::review::ReviewState::Open, None),
        "A neither decided nor claimed B's item"
    );
    for ((path, before), (_, after)) in before.iter().zip(&after) {
        assert_eq!(before, after, "B's {path} changed");
    }
    let pipeline = as_b(
        &server,
        &b.owner_token,
        Method::GET,
        &format!("/api/v1/pipelines/{}", b.pipeline),
        Payload::None,
    )
    .await;
    assert!(pipeline["archived_at"].is_null(), "{pipeline}");
    assert_eq!(pipeline["version"], 1);
    let run = as_b(
        &server,
        &b.owner_token,
        Method::GET,
        &format!("/api/v1/runs/{}", b.run_id),
        Payload::None,
    )
    .await;
    assert_eq!(run["state"], "succeeded");
    let with_key = call(
        &server,
        Method::GET,
        "/api/v1/runs",
        Some(&b.api_key),
        &Payload::None,
        &[],
    )
    .await;
    assert_eq!(
        with_key.status, 200,
        "B's API key still works: {}",
        with_key.text
    );
    assert_eq!(with_key.json["items"][0]["id"], b.run_id.as_str());
    let session: SessionId = b.session_id.parse().unwrap();
    let stored = server
        .state
        .identity
        .session(session)
        .await
        .unwrap()
        .unwrap();
    assert!(stored.revoked_at.is_none(), "{stored:?}");
    // A's attempts are A's business: B's audit trail records none of them.
    let audit = as_b(
        &server,
        &b.owner_token,
        Method::GET,
        "/api/v1/audit-events?limit=500",
        Payload::None,
    )
    .await;
    assert!(
        !audit.to_string().contains(&alice_user.to_string()),
        "{audit}"
    );
    assert!(!audit["items"].as_array().unwrap().is_empty());
    // And A is still in A only.
    let orgs = call(
        &server,
        Method::GET,
        "/api/v1/orgs",
        Some(&alice_key),
        &Payload::None,
        &[],
    )
    .await;
    assert_eq!(orgs.json.as_array().map(Vec::len), Some(1), "{}", orgs.text);
}

// ---------------------------------------------------------------------------------------
// 4. Malformed input. (`core_api::errors_have_one_json_shape` covers no credential, an
// unknown route, an unknown run, malformed JSON with its position, an invalid pipeline and
// an unknown pipeline.)

const BODY_LIMIT: usize = 64 * 1024;

#[tokio::test]
async fn malformed_input_gets_a_4xx_in_the_error_shape_and_never_a_500() {
    let server = TestServer::start_with(|c| c.http.body_limit_bytes = BODY_LIMIT).await;
    let editor = server.token_for(Role::Owner).await;
    let report = "name: report\ntasks:\n  - id: a\n    tool: noop\n";
    let created = call(
        &server,
        Method::POST,
        "/api/v1/pipelines",
        Some(&editor),
        &Payload::Yaml(report.into()),
        &[],
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.text);

    let json = |value: Value| Payload::Json(value);
    let raw = |content_type: &'static str, bytes: &[u8]| Payload::Raw(content_type, bytes.to_vec());
    let nested = format!(
        "{{\"pipeline\": \"report\", \"params\": {{\"x\": {}{}}}}}",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let big_json = format!(
        "{{\"pipeline\": \"report\", \"params\": {{\"x\": \"{}\"}}}}",
        "x".repeat(BODY_LIMIT)
    );
    let big_yaml = format!("{report}# {}\n", "x".repeat(BODY_LIMIT));
    let run = RunId::new();
    let cases: Vec<(&str, Method, String, Payload, u16, &str)> = vec![
        // Trigger-run bodies.
        (
            "a number for the pipeline",
            Method::POST,
            "/api/v1/runs".into(),
            json(json!({ "pipeline": 5 })),
            422,
            "validation_failed",
        ),
        (
            "a list for params",
            Method::POST,
            "/api/v1/runs".into(),
            json(json!({ "pipeline": "report", "params": [] })),
            422,
            "validation_failed",
        ),
        (
            "a negative version",
            Method::POST,
            "/api/v1/runs".into(),
            json(json!({ "pipeline": "report", "version": -1 })),
            422,
            "validation_failed",
        ),
        (
            "a version past u32",
            Method::POST,
            "/api/v1/runs".into(),
            json(json!({ "pipeline": "report", "version": 4_294_967_296_u64 })),
            422,
            "validation_failed",
        ),
        (
            "an unknown field",
            Method::POST,
            "/api/v1/runs".into(),
            json(json!({ "pipeline": "report", "paramz": {} })),
            422,
            "validation_failed",
        ),
        (
            "no pipeline",
            Method::POST,
            "/api/v1/runs".into(),
            json(json!({})),
            422,
            "validation_failed",
        ),
        (
            "an array body",
            Method::POST,
            "/api/v1/runs".into(),
            json(json!([])),
            422,
            "validation_failed",
        ),
        (
            "a null body",
            Method::POST,
            "/api/v1/runs".into(),
            json(Value::Null),
            422,
            "validation_failed",
        ),
        (
            "an empty body",
            Method::POST,
            "/api/v1/runs".into(),
            raw("application/json", b""),
            400,
            "bad_request",
        ),
        (
            "trailing text",
            Method::POST,
            "/api/v1/runs".into(),
            raw("application/json", b"{\"pipeline\": \"report\"} and more"),
            400,
            "bad_request",
        ),
        (
            "invalid UTF-8",
            Method::POST,
            "/api/v1/runs".into(),
            raw("application/json", b"{\"pipeline\": \"\xff\xfe\"}"),
            400,
            "bad_request",
        ),
        (
            "nesting 10,000 deep",
            Method::POST,
            "/api/v1/runs".into(),
            raw("application/json", nested.as_bytes()),
            400,
            "bad_request",
        ),
        (
            "text/plain",
            Method::POST,
            "/api/v1/runs".into(),
            raw("text/plain", b"{\"pipeline\": \"report\"}"),
            415,
            "unsupported_media_type",
        ),
        (
            "no content type",
            Method::POST,
            "/api/v1/runs".into(),
            raw("", b"{\"pipeline\": \"report\"}"),
            415,
            "unsupported_media_type",
        ),
        (
            "a JSON body over the limit",
            Method::POST,
            "/api/v1/runs".into(),
            raw("application/json", big_json.as_bytes()),
            413,
            "payload_too_large",
        ),
        // Pipeline sources.
        (
            "an unknown pipeline field",
            Method::POST,
            "/api/v1/pipelines".into(),
            Payload::Yaml("name: p\nschedule: daily\ntasks:\n  - id: a\n    tool: noop\n".into()),
            422,
            "validation_failed",
        ),
        (
            "an unknown task field",
            Method::POST,
            "/api/v1/pipelines".into(),
            Payload::Yaml("name: p\ntasks:\n  - id: a\n    tool: noop\n    retrys: 2\n".into()),
            422,
            "validation_failed",
        ),
        (
            "a source that is not YAML",
            Method::POST,
            "/api/v1/pipelines".into(),
            Payload::Yaml("name: [unclosed\n  - : :".into()),
            422,
            "validation_failed",
        ),
        (
            "a JSON source of the wrong type",
            Method::POST,
            "/api/v1/pipelines".into(),
            json(json!(["name", "p"])),
            422,
            "validation_failed",
        ),
        (
            "a source that is not UTF-8",
            Method::POST,
            "/api/v1/pipelines".into(),
            raw("application/yaml", b"name: \xff\n"),
            400,
            "bad_request",
        ),
        (
            "an XML source",
            Method::POST,
            "/api/v1/pipelines".into(),
            raw("application/xml", b"<pipeline/>"),
            415,
            "unsupported_media_type",
        ),
        (
            "a source over the limit",
            Method::POST,
            "/api/v1/pipelines".into(),
            Payload::Yaml(big_yaml.clone()),
            413,
            "payload_too_large",
        ),
        (
            "a name unlike the path",
            Method::PUT,
            "/api/v1/pipelines/other".into(),
            Payload::Yaml(report.into()),
            422,
            "validation_failed",
        ),
        // Query strings.
        (
            "an invalid cursor",
            Method::GET,
            "/api/v1/runs?cursor=garbage".into(),
            Payload::None,
            400,
            "bad_request",
        ),
        (
            "a cursor that is no run id",
            Method::GET,
            "/api/v1/runs?cursor=1234".into(),
            Payload::None,
            400,
            "bad_request",
        ),
        (
            "a limit that is no number",
            Method::GET,
            "/api/v1/runs?limit=ten".into(),
            Payload::None,
            400,
            "bad_request",
        ),
        (
            "a negative limit",
            Method::GET,
            "/api/v1/runs?limit=-1".into(),
            Payload::None,
            400,
            "bad_request",
        ),
        (
            "a repeated parameter",
            Method::GET,
            "/api/v1/runs?limit=1&limit=2".into(),
            Payload::None,
            400,
            "bad_request",
        ),
        (
            "an unknown state",
            Method::GET,
            "/api/v1/runs?state=exploded".into(),
            Payload::None,
            400,
            "bad_request",
        ),
        (
            "a bad time",
            Method::GET,
            "/api/v1/runs?created_after=yesterday".into(),
            Payload::None,
            400,
            "bad_request",
        ),
        (
            "a bad log cursor",
            Method::GET,
            format!("/api/v1/runs/{run}/logs?cursor=abc"),
            Payload::None,
            400,
            "bad_request",
        ),
        (
            "a bad run id filter",
            Method::GET,
            "/api/v1/artifacts?run_id=nope".into(),
            Payload::None,
            400,
            "bad_request",
        ),
        (
            "a bad event filter",
            Method::GET,
            "/api/v1/events?run_id=nope".into(),
            Payload::None,
            400,
            "bad_request",
        ),
        (
            "a bad audit limit",
            Method::GET,
            "/api/v1/audit-events?limit=0".into(),
            Payload::None,
            400,
            "bad_request",
        ),
        (
            "a bad audit cursor",
            Method::GET,
            "/api/v1/audit-events?cursor=x".into(),
            Payload::None,
            400,
            "bad_request",
        ),
        (
            "a bad boolean",
            Method::GET,
            "/api/v1/pipelines?include_archived=maybe".into(),
            Payload::None,
            400,
            "bad_request",
        ),
        // Ids in paths.
        (
            "a run id that is no uuid",
            Method::GET,
            "/api/v1/runs/not-a-uuid".into(),
            Payload::None,
            404,
            "not_found",
        ),
        (
            "cancelling a run id that is no uuid",
            Method::POST,
            "/api/v1/runs/not-a-uuid/cancel".into(),
            json(json!({})),
            404,
            "not_found",
        ),
        (
            "an artifact id that is no uuid",
            Method::GET,
            "/api/v1/artifacts/not-a-uuid/content".into(),
            Payload::None,
            404,
            "not_found",
        ),
        (
            "a path that is not UTF-8",
            Method::GET,
            "/api/v1/runs/%FF%FE".into(),
            Payload::None,
            400,
            "bad_request",
        ),
        (
            "a session id that is no uuid",
            Method::DELETE,
            "/api/v1/account/sessions/not-a-uuid".into(),
            Payload::None,
            400,
            "bad_request",
        ),
        (
            "an API key id that is no uuid",
            Method::DELETE,
            "/api/v1/account/api-keys/not-a-uuid".into(),
            Payload::None,
            400,
            "bad_request",
        ),
        (
            "an invitation id that is no uuid",
            Method::DELETE,
            "/api/v1/orgs/current/invitations/not-a-uuid".into(),
            Payload::None,
            400,
            "bad_request",
        ),
        (
            "a member id that is no uuid",
            Method::PATCH,
            "/api/v1/orgs/current/members/not-a-uuid".into(),
            json(json!({ "role": "viewer" })),
            400,
            "bad_request",
        ),
        (
            "a version that is no number",
            Method::GET,
            "/api/v1/pipelines/report/versions/latest".into(),
            Payload::None,
            400,
            "bad_request",
        ),
        (
            "a version past u32",
            Method::GET,
            "/api/v1/pipelines/report/versions/4294967296".into(),
            Payload::None,
            400,
            "bad_request",
        ),
        (
            "an invalid pipeline name",
            Method::GET,
            "/api/v1/pipelines/no%20such%20name".into(),
            Payload::None,
            404,
            "not_found",
        ),
        // Other bodies.
        (
            "an unknown role",
            Method::POST,
            "/api/v1/orgs/current/invitations".into(),
            json(json!({ "email": "x@example.test", "role": "superuser" })),
            422,
            "validation_failed",
        ),
        (
            "a number for a token",
            Method::POST,
            "/api/v1/invitations/accept".into(),
            json(json!({ "token": 5 })),
            422,
            "validation_failed",
        ),
        (
            "an org id that is no uuid",
            Method::POST,
            "/api/v1/orgs/switch".into(),
            json(json!({ "org_id": "default" })),
            422,
            "validation_failed",
        ),
        (
            "a 10,000-character email",
            Method::POST,
            "/api/v1/auth/signup".into(),
            json(
                json!({ "email": format!("{}@example.test", "a".repeat(10_000)), "password": PASSWORD }),
            ),
            422,
            "validation_failed",
        ),
        (
            "a key that expires in -1 days",
            Method::POST,
            "/api/v1/account/api-keys".into(),
            json(json!({ "name": "k", "expires_in_days": -1 })),
            422,
            "validation_failed",
        ),
        // Routes and methods.
        (
            "a method the route has not",
            Method::DELETE,
            "/api/v1/runs".into(),
            Payload::None,
            405,
            "method_not_allowed",
        ),
        (
            "PUT on a run",
            Method::PUT,
            format!("/api/v1/runs/{run}"),
            json(json!({})),
            405,
            "method_not_allowed",
        ),
        (
            "POST on a probe",
            Method::POST,
            "/healthz".into(),
            Payload::None,
            405,
            "method_not_allowed",
        ),
        (
            "an unknown route",
            Method::GET,
            "/api/v1/runs/x/y/z".into(),
            Payload::None,
            404,
            "not_found",
        ),
        (
            "a trailing slash",
            Method::GET,
            "/api/v1/runs/".into(),
            Payload::None,
            404,
            "not_found",
        ),
        (
            "outside the API",
            Method::GET,
            "/nowhere".into(),
            Payload::None,
            404,
            "not_found",
        ),
        (
            "OPTIONS without CORS",
            Method::OPTIONS,
            "/api/v1/runs".into(),
            Payload::None,
            405,
            "method_not_allowed",
        ),
        (
            "a made-up method",
            Method::from_bytes(b"PURGE").unwrap(),
            "/api/v1/runs".into(),
            Payload::None,
            405,
            "method_not_allowed",
        ),
    ];
    for (name, method, path, payload, status, code) in &cases {
        let answer = call(&server, method.clone(), path, Some(&editor), payload, &[]).await;
        assert_error(&answer, *status, code, &format!("{name}: {method} {path}"));
        if *status == 405 {
            assert!(
                answer.allow.is_some(),
                "{name}: a 405 names the allowed methods"
            );
        }
    }

    // The details say what was wrong.
    let answer = call(
        &server,
        Method::POST,
        "/api/v1/runs",
        Some(&editor),
        &json(json!({ "pipeline": "report", "paramz": {} })),
        &[],
    )
    .await;
    assert!(
        answer.json["message"].as_str().unwrap().contains("paramz"),
        "{}",
        answer.text
    );
    let answer = call(
        &server,
        Method::POST,
        "/api/v1/runs",
        Some(&editor),
        &json(json!({ "pipeline": 5 })),
        &[],
    )
    .await;
    assert_eq!(
        answer.json["details"]["path"], "pipeline",
        "{}",
        answer.text
    );
    for (source, field) in [
        (
            "name: p\nschedule: daily\ntasks:\n  - id: a\n    tool: noop\n",
            "/schedule",
        ),
        (
            "name: p\ntasks:\n  - id: a\n    tool: noop\n    retrys: 2\n",
            "/tasks/0/retrys",
        ),
    ] {
        let answer = call(
            &server,
            Method::POST,
            "/api/v1/pipelines",
            Some(&editor),
            &Payload::Yaml(source.into()),
            &[],
        )
        .await;
        let diagnostics = answer.json["details"]["diagnostics"]
            .as_array()
            .expect("diagnostics")
            .clone();
        assert!(
            diagnostics
                .iter()
                .any(|d| d["code"] == "unknown_field" && d["pointer"] == field),
            "{field}: {}",
            answer.text
        );
    }
    let answer = call(
        &server,
        Method::POST,
        "/api/v1/runs",
        Some(&editor),
        &raw("application/json", b"{\"pipeline\": \"report\"} and more"),
        &[],
    )
    .await;
    assert!(
        answer.json["details"]["line"].is_number(),
        "{}",
        answer.text
    );
    let answer = call(
        &server,
        Method::POST,
        "/api/v1/runs",
        Some(&editor),
        &raw("application/json", big_json.as_bytes()),
        &[],
    )
    .await;
    assert_eq!(
        answer.json["details"]["limit_bytes"], BODY_LIMIT,
        "{}",
        answer.text
    );
    let answer = call(
        &server,
        Method::DELETE,
        "/api/v1/account/sessions/not-a-uuid",
        Some(&editor),
        &Payload::None,
        &[],
    )
    .await;
    assert_eq!(answer.json["details"]["parameter"], "id", "{}", answer.text);
    let answer = call(
        &server,
        Method::GET,
        "/api/v1/runs?cursor=garbage",
        Some(&editor),
        &Payload::None,
        &[],
    )
    .await;
    assert_eq!(
        answer.json["details"]["parameter"], "cursor",
        "{}",
        answer.text
    );

    // Fields a body does not define are not assigned: a sign-up cannot choose its role,
    // org or verification, an account update cannot change the email.
    let answer = call(
        &server,
        Method::POST,
        "/api/v1/auth/signup",
        None,
        &json(json!({
            "email": "mallory@example.test",
            "password": PASSWORD,
            "role": "owner",
            "org_id": OrgId::new().to_string(),
            "email_verified": true,
            "email_verified_at": "2020-01-01T00:00:00Z",
            "totp_enabled": true,
        })),
        &[],
    )
    .await;
    assert_eq!(answer.status, 201, "{}", answer.text);
    assert_eq!(answer.json["role"], "viewer", "{}", answer.text);
    assert_eq!(answer.json["org"]["id"], OrgId::DEFAULT.to_string());
    assert_eq!(answer.json["user"]["email_verified"], false);
    assert_eq!(answer.json["user"]["totp_enabled"], false);
    let mallory = text(&answer.json, "/access_token");
    let answer = call(
        &server,
        Method::PATCH,
        "/api/v1/account",
        Some(&mallory),
        &json(json!({ "display_name": "Mallory", "email": "ceo@example.test", "id": UserId::new().to_string() })),
        &[],
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(
        answer.json["email"], "mallory@example.test",
        "{}",
        answer.text
    );
    let answer = call(
        &server,
        Method::POST,
        "/api/v1/account/api-keys",
        Some(&mallory),
        &json(json!({ "name": "k", "role": "owner" })),
        &[],
    )
    .await;
    assert_error(
        &answer,
        403,
        "forbidden",
        "a viewer asking for an owner key",
    );

    // Bodies over the limit without a Content-Length are cut while read, with the same
    // answer.
    for (path, content_type, body) in [
        ("/api/v1/runs", "application/json", big_json),
        ("/api/v1/pipelines", "application/yaml", big_yaml),
    ] {
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> = body
            .into_bytes()
            .chunks(4096)
            .map(|c| Ok(c.to_vec()))
            .collect();
        let response = server
            .client
            .post(server.url(path))
            .bearer_auth(&editor)
            .header("content-type", content_type)
            .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
            .send()
            .await
            .unwrap();
        let answer = read(response).await;
        assert_error(
            &answer,
            413,
            "payload_too_large",
            &format!("chunked {path}"),
        );
    }

    // Nothing was created or run by any of it.
    let runs = call(
        &server,
        Method::GET,
        "/api/v1/runs",
        Some(&editor),
        &Payload::None,
        &[],
    )
    .await;
    assert_eq!(runs.json["items"], json!([]), "{}", runs.text);
    let pipelines = call(
        &server,
        Method::GET,
        "/api/v1/pipelines",
        Some(&editor),
        &Payload::None,
        &[],
    )
    .await;
    assert_eq!(
        pipelines.json["items"].as_array().map(Vec::len),
        Some(1),
        "{}",
        pipelines.text
    );
}

/// Parallel wrong passwords for one account: the throttle sees each outcome before the next
/// attempt is checked, so no more guesses than the limit are tried before the lockout.
#[tokio::test]
async fn parallel_guesses_for_one_account_are_throttled_at_the_limit() {
    let server = TestServer::start().await;
    signup(&server, "target@example.test", "Target").await;
    let payloads: Vec<Payload> = (0..20)
        .map(|i| {
            Payload::Json(
                json!({ "email": "target@example.test", "password": format!("wrong guess {i}") }),
            )
        })
        .collect();
    let guesses = payloads.iter().map(|payload| {
        call(
            &server,
            Method::POST,
            "/api/v1/auth/login",
            None,
            payload,
            &[],
        )
    });
    let answers = futures::future::join_all(guesses).await;
    let tried = answers.iter().filter(|a| a.status == 401).count();
    let throttled = answers.iter().filter(|a| a.status == 429).count();
    let limit = server.state.auth.throttle.config().account_failures_max as usize;
    assert_eq!(
        tried,
        limit,
        "{:?}",
        answers.iter().map(|a| a.status).collect::<Vec<_>>()
    );
    assert_eq!(tried + throttled, 20);
}

/// A disabled account's access token and API keys stop working at once.
#[tokio::test]
async fn a_disabled_account_loses_its_tokens_and_api_keys() {
    let server = TestServer::start().await;
    let (token, user_id) = server.token_in(OrgId::DEFAULT, Role::Editor).await;
    let key = call(
        &server,
        Method::POST,
        "/api/v1/account/api-keys",
        Some(&token),
        &Payload::Json(json!({ "name": "ci" })),
        &[],
    )
    .await;
    assert_eq!(key.status, 201, "{}", key.text);
    let key = text(&key.json, "/key");
    for credential in [&token, &key] {
        let answer = call(
            &server,
            Method::GET,
            "/api/v1/runs",
            Some(credential),
            &Payload::None,
            &[],
        )
        .await;
        assert_eq!(answer.status, 200, "{}", answer.text);
    }
    let identity = &server.state.identity;
    let mut user = identity.user(user_id).await.unwrap().expect("the user");
    user.disabled_at = Some(server.state.clock.now());
    identity.update_user(&user).await.unwrap();
    for credential in [&token, &key] {
        let answer = call(
            &server,
            Method::GET,
            "/api/v1/runs",
            Some(credential),
            &Payload::None,
            &[],
        )
        .await;
        assert_error(&answer, 401, "unauthenticated", "disabled account");
    }
}

/// An open event stream ends once its session is revoked: access is checked again while the
/// stream lives, not only when it opens.
#[tokio::test]
async fn an_open_event_stream_ends_when_its_session_is_revoked() {
    let server = TestServer::start().await;
    let (token, user_id) = server.token_in(OrgId::DEFAULT, Role::Viewer).await;
    let response = server
        .client
        .get(server.url("/api/v1/events"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("the stream opens");
    assert_eq!(response.status(), 200);
    let session = server
        .state
        .identity
        .sessions_of_user(user_id, true, server.state.clock.now())
        .await
        .unwrap()
        .remove(0);
    server
        .state
        .identity
        .revoke_session(user_id, session.id, server.state.clock.now(), "test")
        .await
        .unwrap();
    let mut stream = response.bytes_stream();
    let bound = arches_server::principal::STREAM_ACCESS_CHECK * 3;
    let ended = tokio::time::timeout(bound, async {
        while let Some(chunk) = stream.next().await {
            if chunk.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the stream still runs {bound:?} after the revocation"
    );
}
