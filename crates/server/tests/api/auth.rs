//! Identity end to end: sign-up, login, throttling, refresh rotation, logout, sessions,
//! API keys, TOTP, password reset, email verification, orgs, members, invitations and the
//! audit trail.

use std::time::Duration;

use arches_auth::opaque;
use arches_auth::totp::TotpSecret;
use arches_core::identity::{InvitationRecord, OneTimeTokenRecord, OrgRecord, Role, TokenPurpose};
use arches_core::{InvitationId, OrgId, UserId};
use reqwest::Method;
use serde_json::{json, Value};

use crate::common::{status_and_json, TestServer};

const PASSWORD: &str = "correct horse battery staple";

/// Sends `body` (JSON) with `method` to `path`, with a bearer token when given; returns
/// the status, the JSON body and the `Retry-After` header.
async fn send(
    server: &TestServer,
    method: Method,
    token: Option<&str>,
    path: &str,
    body: Option<Value>,
) -> (u16, Value, Option<String>) {
    let mut request = server
        .client
        .request(method, server.url(path))
        .header("user-agent", "arches-tests/1.0");
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("answered");
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (status, json) = status_and_json(response).await;
    (status, json, retry_after)
}

async fn anon(server: &TestServer, path: &str, body: Value) -> (u16, Value) {
    let (status, json, _) = send(server, Method::POST, None, path, Some(body)).await;
    (status, json)
}

async fn signup(server: &TestServer, email: &str) -> Value {
    let (status, body) = anon(
        server,
        "/api/v1/auth/signup",
        json!({ "email": email, "password": PASSWORD, "display_name": "Tester" }),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    body
}

async fn login(server: &TestServer, email: &str, password: &str) -> (u16, Value) {
    anon(
        server,
        "/api/v1/auth/login",
        json!({ "email": email, "password": password }),
    )
    .await
}

fn access(body: &Value) -> String {
    body["access_token"]
        .as_str()
        .expect("access_token")
        .to_owned()
}

fn user_id(body: &Value) -> String {
    body["user"]["id"].as_str().expect("user.id").to_owned()
}

#[tokio::test]
async fn the_first_signup_owns_the_default_org_and_later_ones_are_viewers() {
    let server = TestServer::start().await;
    let first = signup(&server, "  Ada@Example.TEST ").await;
    assert_eq!(first["role"], "owner");
    assert_eq!(first["token_type"], "Bearer");
    assert_eq!(first["user"]["email"], "ada@example.test");
    assert_eq!(first["org"]["id"], OrgId::DEFAULT.to_string());
    assert!(first["refresh_token"].as_str().unwrap().starts_with("art_"));
    let (status, me) = server.get(&access(&first), "/api/v1/account").await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["role"], "owner");
    assert_eq!(me["orgs"][0]["role"], "owner");

    let second = signup(&server, "bob@example.test").await;
    assert_eq!(second["role"], "viewer");

    let (status, body) = anon(
        &server,
        "/api/v1/auth/signup",
        json!({ "email": "bob@example.test", "password": PASSWORD }),
    )
    .await;
    assert_eq!(status, 409, "{body}");
}

#[tokio::test]
async fn weak_passwords_and_bad_input_are_refused_naming_the_field() {
    let server = TestServer::start().await;
    for password in ["short", "password", "sam@example.test", "12345678"] {
        let (status, body) = anon(
            &server,
            "/api/v1/auth/signup",
            json!({ "email": "sam@example.test", "password": password }),
        )
        .await;
        assert_eq!(status, 422, "{password}: {body}");
        assert_eq!(body["code"], "validation_failed");
        assert_eq!(body["details"]["field"], "password", "{body}");
        assert!(body["details"]["reason"]
            .as_str()
            .unwrap()
            .contains("password"));
    }
    let (status, body) = anon(
        &server,
        "/api/v1/auth/signup",
        json!({ "email": "not-an-email", "password": PASSWORD }),
    )
    .await;
    assert_eq!(status, 422);
    assert_eq!(body["details"]["field"], "email");
    // Malformed JSON gets the standard error shape.
    let response = server
        .client
        .post(server.url("/api/v1/auth/login"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    let (status, body) = status_and_json(response).await;
    assert_eq!(status, 400);
    assert_eq!(body["code"], "bad_request");
}

#[tokio::test]
async fn login_works_and_failures_do_not_reveal_whether_the_account_exists() {
    let server = TestServer::start().await;
    signup(&server, "ada@example.test").await;
    let (status, body) = login(&server, "ADA@example.test", PASSWORD).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["expires_in"], 900);
    let (status, me) = server.get(&access(&body), "/api/v1/account").await;
    assert_eq!(status, 200);
    assert_eq!(me["user"]["email"], "ada@example.test");
    assert_eq!(me["current_org"]["id"], OrgId::DEFAULT.to_string());

    let wrong = login(&server, "ada@example.test", "not the password at all").await;
    let unknown = login(&server, "nobody@example.test", "not the password at all").await;
    assert_eq!(wrong.0, 401);
    assert_eq!(wrong, unknown);
    assert_eq!(wrong.1["code"], "invalid_credentials");
}

#[tokio::test]
async fn repeated_failures_are_throttled_with_retry_after() {
    let server = TestServer::start().await;
    signup(&server, "ada@example.test").await;
    for _ in 0..5 {
        let (status, _) = login(&server, "ada@example.test", "wrong password here").await;
        assert_eq!(status, 401);
    }
    // Locked now, even with the right password.
    let (status, body, retry_after) = send(
        &server,
        Method::POST,
        None,
        "/api/v1/auth/login",
        Some(json!({ "email": "Ada@example.test", "password": PASSWORD })),
    )
    .await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["code"], "rate_limited");
    let secs: u64 = retry_after.expect("Retry-After").parse().unwrap();
    assert!(secs >= 1);
}

#[tokio::test]
async fn refresh_rotates_and_a_reused_token_revokes_the_family() {
    let server = TestServer::start().await;
    signup(&server, "ada@example.test").await;
    let (_, first) = login(&server, "ada@example.test", PASSWORD).await;
    let r1 = first["refresh_token"].as_str().unwrap().to_owned();
    let (status, second) = anon(
        &server,
        "/api/v1/auth/refresh",
        json!({ "refresh_token": r1 }),
    )
    .await;
    assert_eq!(status, 200, "{second}");
    let r2 = second["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(r1, r2);
    assert_eq!(second["role"], "owner");
    assert_eq!(server.get(&access(&second), "/api/v1/account").await.0, 200);

    // The old token again: refused, and the whole family is dead.
    let (status, body) = anon(
        &server,
        "/api/v1/auth/refresh",
        json!({ "refresh_token": r1 }),
    )
    .await;
    assert_eq!(status, 401, "{body}");
    let (status, _) = anon(
        &server,
        "/api/v1/auth/refresh",
        json!({ "refresh_token": r2 }),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(server.get(&access(&second), "/api/v1/account").await.0, 401);

    let (status, _) = anon(
        &server,
        "/api/v1/auth/refresh",
        json!({ "refresh_token": "art_unknown" }),
    )
    .await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn logout_refuses_the_access_token_at_once() {
    let server = TestServer::start().await;
    let body = signup(&server, "ada@example.test").await;
    let token = access(&body);
    let (status, _, _) = send(
        &server,
        Method::POST,
        Some(&token),
        "/api/v1/auth/logout",
        None,
    )
    .await;
    assert_eq!(status, 204);
    let (status, refused) = server.get(&token, "/api/v1/account").await;
    assert_eq!(status, 401, "{refused}");
    // The session's refresh token is dead too.
    let (status, _) = anon(
        &server,
        "/api/v1/auth/refresh",
        json!({ "refresh_token": body["refresh_token"] }),
    )
    .await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn sessions_are_listed_and_others_can_be_revoked() {
    let server = TestServer::start().await;
    signup(&server, "ada@example.test").await;
    let (_, a) = login(&server, "ada@example.test", PASSWORD).await;
    let (_, b) = login(&server, "ada@example.test", PASSWORD).await;
    let (status, sessions) = server.get(&access(&a), "/api/v1/account/sessions").await;
    assert_eq!(status, 200);
    let list = sessions.as_array().unwrap();
    assert_eq!(list.len(), 3, "{sessions}"); // signup + two logins
    assert_eq!(list.iter().filter(|s| s["current"] == true).count(), 1);
    let current = list.iter().find(|s| s["current"] == true).unwrap();
    assert_eq!(current["user_agent"], "arches-tests/1.0");
    assert_eq!(current["ip"], "127.0.0.1");
    assert!(current["last_seen_at"].is_string() && current["created_at"].is_string());

    let (status, body, _) = send(
        &server,
        Method::POST,
        Some(&access(&a)),
        "/api/v1/account/sessions/revoke-others",
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["revoked"], 2);
    let (_, sessions) = server.get(&access(&a), "/api/v1/account/sessions").await;
    let list = sessions.as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["current"], true);
    assert_eq!(server.get(&access(&b), "/api/v1/account").await.0, 401);

    // Revoking one session by id.
    let (_, c) = login(&server, "ada@example.test", PASSWORD).await;
    let (_, sessions) = server.get(&access(&c), "/api/v1/account/sessions").await;
    let other = sessions
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["current"] == false)
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/api/v1/account/sessions/{other}");
    let (status, _, _) = send(&server, Method::DELETE, Some(&access(&c)), &path, None).await;
    assert_eq!(status, 204);
    assert_eq!(server.get(&access(&a), "/api/v1/account").await.0, 401);
    let (status, _, _) = send(&server, Method::DELETE, Some(&access(&c)), &path, None).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn api_keys_are_shown_once_capped_by_role_and_revocable() {
    let server = TestServer::start().await;
    let owner = access(&signup(&server, "ada@example.test").await);
    let (status, created, _) = send(
        &server,
        Method::POST,
        Some(&owner),
        "/api/v1/account/api-keys",
        Some(json!({ "name": "ci", "role": "editor", "expires_in_days": 30 })),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let key = created["key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("ak_"));
    assert_eq!(created["role"], "editor");
    assert!(created["expires_at"].is_string());
    let id = created["id"].as_str().unwrap().to_owned();

    let (status, list) = server.get(&owner, "/api/v1/account/api-keys").await;
    assert_eq!(status, 200);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert!(!list.to_string().contains(&key));
    assert!(list[0].get("key").is_none());

    let (status, me) = server.get(&key, "/api/v1/account").await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["role"], "editor");
    assert_eq!(me["api_key_id"], id);
    assert_eq!(server.get(&key, "/api/v1/pipelines").await.0, 200);
    // The same key in X-API-Key.
    let response = server
        .client
        .get(server.url("/api/v1/account"))
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    // No session to log out of.
    let (status, _, _) = send(
        &server,
        Method::POST,
        Some(&key),
        "/api/v1/auth/logout",
        None,
    )
    .await;
    assert_eq!(status, 400);

    // A viewer cannot mint an editor key; a viewer key is fine.
    let viewer = server.token_for(Role::Viewer).await;
    let (status, body, _) = send(
        &server,
        Method::POST,
        Some(&viewer),
        "/api/v1/account/api-keys",
        Some(json!({ "name": "too strong", "role": "editor" })),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let (status, body, _) = send(
        &server,
        Method::POST,
        Some(&viewer),
        "/api/v1/account/api-keys",
        Some(json!({ "name": "mine" })),
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(body["role"], "viewer");

    // Revoked: refused at once.
    let path = format!("/api/v1/account/api-keys/{id}");
    let (status, _, _) = send(&server, Method::DELETE, Some(&owner), &path, None).await;
    assert_eq!(status, 204);
    assert_eq!(server.get(&key, "/api/v1/account").await.0, 401);
    let (_, list) = server.get(&owner, "/api/v1/account/api-keys").await;
    assert!(list[0]["revoked_at"].is_string());
    let (status, _, _) = send(&server, Method::DELETE, Some(&owner), &path, None).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn totp_enrolment_makes_login_need_a_code_used_once() {
    let server = TestServer::start().await;
    let token = access(&signup(&server, "ada@example.test").await);
    let (status, enrol, _) = send(
        &server,
        Method::POST,
        Some(&token),
        "/api/v1/account/totp/enroll",
        None,
    )
    .await;
    assert_eq!(status, 200, "{enrol}");
    assert!(enrol["otpauth_uri"]
        .as_str()
        .unwrap()
        .starts_with("otpauth://totp/"));
    assert!(enrol["qr_png"]
        .as_str()
        .unwrap()
        .starts_with("data:image/png;base64,"));
    let secret = TotpSecret::from_base32(enrol["secret"].as_str().unwrap()).unwrap();

    // Not enabled until confirmed: a wrong code is refused.
    let (status, body, _) = send(
        &server,
        Method::POST,
        Some(&token),
        "/api/v1/account/totp/confirm",
        Some(json!({ "code": "000000x" })),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    let now = server.state.clock.now();
    let (status, codes, _) = send(
        &server,
        Method::POST,
        Some(&token),
        "/api/v1/account/totp/confirm",
        Some(json!({ "code": secret.code_at(now).unwrap() })),
    )
    .await;
    assert_eq!(status, 200, "{codes}");
    let recovery: Vec<String> = codes["recovery_codes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(recovery.len(), 10);

    // The password alone is not enough.
    let (status, challenge) = login(&server, "ada@example.test", PASSWORD).await;
    assert_eq!(status, 401);
    assert_eq!(challenge["code"], "mfa_required");
    assert!(challenge.get("access_token").is_none());
    let mfa_token = challenge["details"]["mfa_token"]
        .as_str()
        .unwrap()
        .to_owned();

    // The next step's code (the confirming code's step is used up).
    let code = secret.code_at(now.plus(Duration::from_secs(30))).unwrap();
    let (status, tokens) = anon(
        &server,
        "/api/v1/auth/login/mfa",
        json!({ "mfa_token": mfa_token, "code": code }),
    )
    .await;
    assert_eq!(status, 200, "{tokens}");
    assert_eq!(server.get(&access(&tokens), "/api/v1/account").await.0, 200);
    // The challenge is single-use.
    let (status, _) = anon(
        &server,
        "/api/v1/auth/login/mfa",
        json!({ "mfa_token": mfa_token, "code": code }),
    )
    .await;
    assert_eq!(status, 401);

    // A replayed code is refused; the answer carries a fresh challenge.
    let (_, challenge) = login(&server, "ada@example.test", PASSWORD).await;
    let (status, refused) = anon(
        &server,
        "/api/v1/auth/login/mfa",
        json!({ "mfa_token": challenge["details"]["mfa_token"], "code": code }),
    )
    .await;
    assert_eq!(status, 401, "{refused}");
    assert_eq!(refused["code"], "invalid_credentials");
    // A recovery code works, once.
    let (status, tokens) = anon(
        &server,
        "/api/v1/auth/login/mfa",
        json!({ "mfa_token": refused["details"]["mfa_token"], "recovery_code": recovery[0].to_uppercase() }),
    )
    .await;
    assert_eq!(status, 200, "{tokens}");
    let (_, me) = server.get(&access(&tokens), "/api/v1/account").await;
    assert_eq!(me["recovery_codes_left"], 9);
    let (_, challenge) = login(&server, "ada@example.test", PASSWORD).await;
    let (status, _) = anon(
        &server,
        "/api/v1/auth/login/mfa",
        json!({ "mfa_token": challenge["details"]["mfa_token"], "recovery_code": recovery[0] }),
    )
    .await;
    assert_eq!(status, 401);

    // Disabling needs the password and a code; then the password is enough again.
    let (status, body, _) = send(
        &server,
        Method::POST,
        Some(&access(&tokens)),
        "/api/v1/account/totp/disable",
        Some(json!({ "password": "wrong password!!", "code": recovery[1] })),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["details"]["field"], "password");
    let (status, _, _) = send(
        &server,
        Method::POST,
        Some(&access(&tokens)),
        "/api/v1/account/totp/disable",
        Some(json!({ "password": PASSWORD, "code": recovery[1] })),
    )
    .await;
    assert_eq!(status, 204);
    assert_eq!(login(&server, "ada@example.test", PASSWORD).await.0, 200);
}

async fn insert_reset_token(server: &TestServer, user: &str) -> String {
    let plaintext = opaque::generate(opaque::PASSWORD_RESET_PREFIX).plaintext;
    let now = server.state.clock.now();
    server
        .state
        .identity
        .create_one_time_token(&OneTimeTokenRecord {
            hash: opaque::hash_token(&plaintext),
            user_id: user.parse::<UserId>().unwrap(),
            purpose: TokenPurpose::PasswordReset,
            created_at: now,
            expires_at: now.plus(Duration::from_secs(3600)),
            used_at: None,
        })
        .await
        .unwrap();
    plaintext
}

#[tokio::test]
async fn password_forgot_is_silent_and_reset_signs_out_everywhere() {
    let server = TestServer::start().await;
    let first = signup(&server, "ada@example.test").await;
    let known = anon(
        &server,
        "/api/v1/auth/password/forgot",
        json!({ "email": "ada@example.test" }),
    )
    .await;
    let unknown = anon(
        &server,
        "/api/v1/auth/password/forgot",
        json!({ "email": "nobody@example.test" }),
    )
    .await;
    assert_eq!(known.0, 202);
    assert_eq!(known, unknown);

    let token = insert_reset_token(&server, &user_id(&first)).await;
    // A refused password does not use up the link.
    let (status, body) = anon(
        &server,
        "/api/v1/auth/password/reset",
        json!({ "token": token, "new_password": "password" }),
    )
    .await;
    assert_eq!(status, 422);
    assert_eq!(body["details"]["field"], "new_password");
    let new_password = "a brand new passphrase 7";
    let (status, body) = anon(
        &server,
        "/api/v1/auth/password/reset",
        json!({ "token": token, "new_password": new_password }),
    )
    .await;
    assert_eq!(status, 204, "{body}");
    assert_eq!(server.get(&access(&first), "/api/v1/account").await.0, 401);
    assert_eq!(login(&server, "ada@example.test", PASSWORD).await.0, 401);
    assert_eq!(
        login(&server, "ada@example.test", new_password).await.0,
        200
    );
    let (status, _) = anon(
        &server,
        "/api/v1/auth/password/reset",
        json!({ "token": token, "new_password": "yet another passphrase 8" }),
    )
    .await;
    assert_eq!(status, 410);
}

#[tokio::test]
async fn changing_the_password_needs_the_current_one_and_keeps_only_this_session() {
    let server = TestServer::start().await;
    let first = signup(&server, "ada@example.test").await;
    let (_, second) = login(&server, "ada@example.test", PASSWORD).await;
    let (status, body, _) = send(
        &server,
        Method::POST,
        Some(&access(&second)),
        "/api/v1/account/password",
        Some(json!({ "current_password": "not it at all", "new_password": "another good passphrase" })),
    )
    .await;
    assert_eq!(status, 422);
    assert_eq!(body["details"]["field"], "current_password");
    let (status, _, _) = send(
        &server,
        Method::POST,
        Some(&access(&second)),
        "/api/v1/account/password",
        Some(json!({ "current_password": PASSWORD, "new_password": "another good passphrase" })),
    )
    .await;
    assert_eq!(status, 204);
    assert_eq!(server.get(&access(&first), "/api/v1/account").await.0, 401);
    assert_eq!(server.get(&access(&second), "/api/v1/account").await.0, 200);
    assert_eq!(
        login(&server, "ada@example.test", "another good passphrase")
            .await
            .0,
        200
    );
    // Display name.
    let (status, body, _) = send(
        &server,
        Method::PATCH,
        Some(&access(&second)),
        "/api/v1/account",
        Some(json!({ "display_name": "Ada L." })),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["display_name"], "Ada L.");
}

#[tokio::test]
async fn email_verification_can_be_required_before_login() {
    let server = TestServer::start_with(|c| c.auth.require_email_verification = true).await;
    let body = signup(&server, "ada@example.test").await;
    assert_eq!(body["verification_required"], true);
    assert!(body.get("access_token").is_none());
    let (status, refused) = login(&server, "ada@example.test", PASSWORD).await;
    assert_eq!(status, 403, "{refused}");

    let plaintext = opaque::generate(opaque::EMAIL_VERIFICATION_PREFIX).plaintext;
    let now = server.state.clock.now();
    server
        .state
        .identity
        .create_one_time_token(&OneTimeTokenRecord {
            hash: opaque::hash_token(&plaintext),
            user_id: user_id(&body).parse().unwrap(),
            purpose: TokenPurpose::EmailVerification,
            created_at: now,
            expires_at: now.plus(Duration::from_secs(3600)),
            used_at: None,
        })
        .await
        .unwrap();
    let (status, user) = anon(
        &server,
        "/api/v1/auth/verify-email",
        json!({ "token": plaintext }),
    )
    .await;
    assert_eq!(status, 200, "{user}");
    assert_eq!(user["email_verified"], true);
    let (status, _) = anon(
        &server,
        "/api/v1/auth/verify-email",
        json!({ "token": plaintext }),
    )
    .await;
    assert_eq!(status, 410);
    assert_eq!(login(&server, "ada@example.test", PASSWORD).await.0, 200);
}

async fn insert_invitation(server: &TestServer, email: &str, role: Role, by: &str) -> String {
    let plaintext = opaque::generate(opaque::INVITATION_PREFIX).plaintext;
    let now = server.state.clock.now();
    server
        .state
        .identity
        .create_invitation(&InvitationRecord {
            id: InvitationId::new(),
            org_id: OrgId::DEFAULT,
            email: email.to_owned(),
            role,
            token_hash: opaque::hash_token(&plaintext),
            invited_by: by.parse().unwrap(),
            created_at: now,
            expires_at: now.plus(Duration::from_secs(3600)),
            accepted_at: None,
            accepted_by: None,
            revoked_at: None,
        })
        .await
        .unwrap();
    plaintext
}

#[tokio::test]
async fn invitations_grant_the_invited_role_to_the_invited_email_only() {
    let server = TestServer::start().await;
    let owner_body = signup(&server, "ada@example.test").await;
    let owner = access(&owner_body);
    let (status, invitation, _) = send(
        &server,
        Method::POST,
        Some(&owner),
        "/api/v1/orgs/current/invitations",
        Some(json!({ "email": "Bob@Example.test", "role": "editor" })),
    )
    .await;
    assert_eq!(status, 201, "{invitation}");
    assert_eq!(invitation["email"], "bob@example.test");
    assert_eq!(invitation["status"], "pending");
    assert!(invitation.get("token").is_none());
    let (status, list) = server.get(&owner, "/api/v1/orgs/current/invitations").await;
    assert_eq!(status, 200);
    assert_eq!(list.as_array().unwrap().len(), 1);

    let bob = signup(&server, "bob@example.test").await;
    assert_eq!(bob["role"], "viewer");
    let carol = signup(&server, "carol@example.test").await;
    let token = insert_invitation(
        &server,
        "bob@example.test",
        Role::Editor,
        &user_id(&owner_body),
    )
    .await;
    let (status, body, _) = send(
        &server,
        Method::POST,
        Some(&access(&carol)),
        "/api/v1/invitations/accept",
        Some(json!({ "token": token })),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let (status, body, _) = send(
        &server,
        Method::POST,
        Some(&access(&bob)),
        "/api/v1/invitations/accept",
        Some(json!({ "token": token })),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["role"], "editor");
    let (_, me) = server.get(&access(&bob), "/api/v1/account").await;
    assert_eq!(me["role"], "editor");
    let (status, _, _) = send(
        &server,
        Method::POST,
        Some(&access(&bob)),
        "/api/v1/invitations/accept",
        Some(json!({ "token": token })),
    )
    .await;
    assert_eq!(status, 409);

    // An editor cannot invite; only owners invite owners.
    let (status, body, _) = send(
        &server,
        Method::POST,
        Some(&access(&bob)),
        "/api/v1/orgs/current/invitations",
        Some(json!({ "email": "dan@example.test" })),
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(body["details"]["permission"], "member_manage");
    let admin = server.token_for(Role::Admin).await;
    let (status, body, _) = send(
        &server,
        Method::POST,
        Some(&admin),
        "/api/v1/orgs/current/invitations",
        Some(json!({ "email": "dan@example.test", "role": "owner" })),
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(body["details"]["permission"], "owner_manage");

    // Revoking an invitation.
    let path = format!(
        "/api/v1/orgs/current/invitations/{}",
        invitation["id"].as_str().unwrap()
    );
    let (status, _, _) = send(&server, Method::DELETE, Some(&owner), &path, None).await;
    assert_eq!(status, 204);
    let (_, list) = server.get(&owner, "/api/v1/orgs/current/invitations").await;
    let revoked = list
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == invitation["id"])
        .unwrap();
    assert_eq!(revoked["status"], "revoked");
}

#[tokio::test]
async fn roles_change_within_the_rules_and_the_last_owner_stays() {
    let server = TestServer::start().await;
    let owner_body = signup(&server, "ada@example.test").await;
    let owner = access(&owner_body);
    let owner_id = user_id(&owner_body);
    let viewer_body = signup(&server, "bob@example.test").await;
    let viewer_id = user_id(&viewer_body);

    let own = format!("/api/v1/orgs/current/members/{owner_id}");
    let (status, body, _) = send(
        &server,
        Method::PATCH,
        Some(&owner),
        &own,
        Some(json!({ "role": "admin" })),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    let (status, body, _) = send(&server, Method::DELETE, Some(&owner), &own, None).await;
    assert_eq!(status, 409, "{body}");

    let (status, members) = server
        .get(&access(&viewer_body), "/api/v1/orgs/current/members")
        .await;
    assert_eq!(status, 200);
    assert_eq!(members.as_array().unwrap().len(), 2);

    let bob = format!("/api/v1/orgs/current/members/{viewer_id}");
    let (status, body, _) = send(
        &server,
        Method::PATCH,
        Some(&owner),
        &bob,
        Some(json!({ "role": "admin" })),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["role"], "admin");
    // The role change applies to bob's existing token at once.
    let (_, me) = server.get(&access(&viewer_body), "/api/v1/account").await;
    assert_eq!(me["role"], "admin");
    // Nobody changes their own role; an admin cannot touch an owner.
    let (status, _, _) = send(
        &server,
        Method::PATCH,
        Some(&access(&viewer_body)),
        &bob,
        Some(json!({ "role": "editor" })),
    )
    .await;
    assert_eq!(status, 403);
    let (status, body, _) = send(
        &server,
        Method::PATCH,
        Some(&access(&viewer_body)),
        &own,
        Some(json!({ "role": "viewer" })),
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(body["details"]["permission"], "owner_manage");
    // Two owners: one may now be demoted by the other.
    let (status, _, _) = send(
        &server,
        Method::PATCH,
        Some(&owner),
        &bob,
        Some(json!({ "role": "owner" })),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _, _) = send(
        &server,
        Method::PATCH,
        Some(&access(&viewer_body)),
        &own,
        Some(json!({ "role": "editor" })),
    )
    .await;
    assert_eq!(status, 200);
    // Removing a member stops their tokens.
    let (status, _, _) = send(
        &server,
        Method::DELETE,
        Some(&access(&viewer_body)),
        &own,
        None,
    )
    .await;
    assert_eq!(status, 204);
    assert_eq!(server.get(&owner, "/api/v1/account").await.0, 401);
}

#[tokio::test]
async fn orgs_are_created_only_in_multi_tenant_mode_and_sessions_switch_between_them() {
    let single = TestServer::start().await;
    let token = access(&signup(&single, "ada@example.test").await);
    let (status, body, _) = send(
        &single,
        Method::POST,
        Some(&token),
        "/api/v1/orgs",
        Some(json!({ "name": "Other" })),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(body["message"].as_str().unwrap().contains("multi_tenant"));

    let server = TestServer::start_with(|c| c.multi_tenant = true).await;
    let first = signup(&server, "ada.l@example.test").await;
    assert_eq!(first["role"], "owner");
    assert_ne!(first["org"]["id"], OrgId::DEFAULT.to_string());
    assert!(first["org"]["slug"].as_str().unwrap().starts_with("ada-l-"));
    let second = signup(&server, "bob@example.test").await;
    assert_eq!(second["role"], "owner");
    assert_ne!(second["org"]["id"], first["org"]["id"]);

    let token = access(&first);
    let (status, created, _) = send(
        &server,
        Method::POST,
        Some(&token),
        "/api/v1/orgs",
        Some(json!({ "name": "Research", "slug": "research" })),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let (status, orgs) = server.get(&token, "/api/v1/orgs").await;
    assert_eq!(status, 200);
    assert_eq!(orgs.as_array().unwrap().len(), 2);
    let (status, switched, _) = send(
        &server,
        Method::POST,
        Some(&token),
        "/api/v1/orgs/switch",
        Some(json!({ "org_id": created["id"] })),
    )
    .await;
    assert_eq!(status, 200, "{switched}");
    let (_, me) = server.get(&access(&switched), "/api/v1/account").await;
    assert_eq!(me["current_org"]["slug"], "research");
    // The refresh token now refreshes into the new org.
    let (_, refreshed) = anon(
        &server,
        "/api/v1/auth/refresh",
        json!({ "refresh_token": first["refresh_token"] }),
    )
    .await;
    assert_eq!(refreshed["org"]["slug"], "research");
    // Not a member of bob's org.
    let (status, _, _) = send(
        &server,
        Method::POST,
        Some(&access(&switched)),
        "/api/v1/orgs/switch",
        Some(json!({ "org_id": second["org"]["id"] })),
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn the_audit_trail_lists_the_orgs_events_newest_first_with_filters() {
    let server = TestServer::start().await;
    let owner_body = signup(&server, "ada@example.test").await;
    let owner = access(&owner_body);
    let owner_id = user_id(&owner_body);
    let (_, key, _) = send(
        &server,
        Method::POST,
        Some(&owner),
        "/api/v1/account/api-keys",
        Some(json!({ "name": "ci" })),
    )
    .await;
    let path = format!("/api/v1/account/api-keys/{}", key["id"].as_str().unwrap());
    send(&server, Method::DELETE, Some(&owner), &path, None).await;
    login(&server, "ada@example.test", "wrong password given").await;

    let (status, page) = server.get(&owner, "/api/v1/audit-events").await;
    assert_eq!(status, 200, "{page}");
    let items = page["items"].as_array().unwrap();
    let actions: Vec<&str> = items
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["api_key.revoke", "api_key.create", "auth.signup"],
        "{page}"
    );
    let seqs: Vec<i64> = items.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] > w[1]));
    for event in items {
        assert_eq!(event["actor_user_id"], owner_id.as_str());
        assert_eq!(event["outcome"], "success");
        assert_eq!(event["ip"], "127.0.0.1");
        assert!(event["request_id"].is_string(), "{event}");
    }
    assert_eq!(items[0]["target_kind"], "api_key");
    assert!(!page.to_string().contains(PASSWORD));
    assert!(!page.to_string().contains(key["key"].as_str().unwrap()));

    let (_, filtered) = server
        .get(&owner, "/api/v1/audit-events?action=api_key.&limit=1")
        .await;
    assert_eq!(filtered["items"].as_array().unwrap().len(), 1);
    assert_eq!(filtered["items"][0]["action"], "api_key.revoke");
    let cursor = filtered["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_owned();
    let (_, next) = server
        .get(
            &owner,
            &format!("/api/v1/audit-events?action=api_key.&limit=1&cursor={cursor}"),
        )
        .await;
    assert_eq!(next["items"][0]["action"], "api_key.create");
    assert!(next["next_cursor"].is_null());
    let (_, by_actor) = server
        .get(
            &owner,
            &format!("/api/v1/audit-events?actor={owner_id}&outcome=success"),
        )
        .await;
    assert_eq!(by_actor["items"].as_array().unwrap().len(), 3);
    let (status, _) = server
        .get(&owner, "/api/v1/audit-events?since=yesterday")
        .await;
    assert_eq!(status, 400);
    let (status, _) = server.get(&owner, "/api/v1/audit-events?limit=501").await;
    assert_eq!(status, 400);

    let viewer = server.token_for(Role::Viewer).await;
    let (status, body) = server.get(&viewer, "/api/v1/audit-events").await;
    assert_eq!(status, 403);
    assert_eq!(body["details"]["permission"], "audit_read");

    // Another org sees only its own events, and its events stay out of this one's.
    let now = server.state.clock.now();
    let other = OrgRecord {
        id: OrgId::new(),
        slug: "other".into(),
        name: "Other".into(),
        created_at: now,
    };
    server
        .state
        .identity
        .create_org(&other, owner_id.parse().unwrap())
        .await
        .unwrap();
    let (other_admin, _) = server.token_in(other.id, Role::Admin).await;
    let (status, _, _) = send(
        &server,
        Method::POST,
        Some(&other_admin),
        "/api/v1/account/api-keys",
        Some(json!({ "name": "elsewhere" })),
    )
    .await;
    assert_eq!(status, 201);
    let (_, theirs) = server.get(&other_admin, "/api/v1/audit-events").await;
    let their_actions: Vec<&str> = theirs["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(their_actions, ["api_key.create"]);
    let (_, ours) = server.get(&owner, "/api/v1/audit-events").await;
    assert_eq!(ours["items"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn the_openapi_document_lists_the_identity_endpoints() {
    let server = TestServer::start().await;
    let response = server
        .client
        .get(server.url("/api/v1/openapi.json"))
        .send()
        .await
        .unwrap();
    let (status, doc) = status_and_json(response).await;
    assert_eq!(status, 200);
    for path in [
        "/api/v1/auth/signup",
        "/api/v1/auth/login",
        "/api/v1/auth/login/mfa",
        "/api/v1/auth/refresh",
        "/api/v1/account/api-keys",
        "/api/v1/account/totp/enroll",
        "/api/v1/orgs/current/members/{user_id}",
        "/api/v1/invitations/accept",
        "/api/v1/audit-events",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} missing");
    }
}
