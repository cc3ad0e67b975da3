//! The test server: `arches_server::app` built on a temporary home with cheap password
//! hashing, served on 127.0.0.1:0, and helpers to act as a user of a given role.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arches_core::identity::{
    IdentityStore, MembershipRecord, RefreshTokenRecord, Role, SessionRecord, UserRecord,
};
use arches_core::{OrgId, RunId, SessionId, Timestamp, UserId};
use arches_server::app::{self, BuildOptions};
use arches_server::config::ServerConfig;
use arches_server::state::AppState;
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A running server.
pub struct TestServer {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// The server's shared state (stores, bus, auth services).
    pub state: AppState,
    /// An HTTP client.
    pub client: reqwest::Client,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
    _home: Option<tempfile::TempDir>,
}

impl TestServer {
    /// A server with default settings (single tenant, workers on).
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    /// A server whose configuration `adjust` changes first.
    pub async fn start_with(adjust: impl FnOnce(&mut ServerConfig)) -> TestServer {
        Self::start_built_with(adjust, BuildOptions::default()).await
    }

    /// A server whose configuration `adjust` changes first, built with `options` (cheap
    /// password hashing is always on).
    pub async fn start_built_with(
        adjust: impl FnOnce(&mut ServerConfig),
        options: BuildOptions,
    ) -> TestServer {
        let home = tempfile::tempdir().expect("a temporary home");
        Self::start_in(home, adjust, options).await
    }

    /// Stops this server and starts another on the same home (the same SQLite file and
    /// artifacts), with a configuration `adjust` changes first (the defaults of
    /// [`TestServer::start_with`] otherwise). Tokens issued before may not be valid after.
    pub async fn restart_with(mut self, adjust: impl FnOnce(&mut ServerConfig)) -> TestServer {
        let home = self._home.take().expect("a home");
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            task.await.expect("the server task ends cleanly");
        }
        drop(self);
        Self::start_in(home, adjust, BuildOptions::default()).await
    }

    async fn start_in(
        home: tempfile::TempDir,
        adjust: impl FnOnce(&mut ServerConfig),
        options: BuildOptions,
    ) -> TestServer {
        let mut config = ServerConfig {
            home: home.path().to_path_buf(),
            ..ServerConfig::default()
        };
        config.workers.slots = Some(4);
        // Generous limits: tests about limits set their own.
        config.rate_limits.per_ip_per_sec = 10_000;
        config.rate_limits.per_ip_burst = 10_000;
        config.rate_limits.per_user_per_sec = 10_000;
        config.rate_limits.per_user_burst = 10_000;
        adjust(&mut config);
        let built = app::build(
            config,
            BuildOptions {
                insecure_fast_hashing: true,
                ..options
            },
        )
        .await
        .expect("the server builds");
        let state = built.state.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let address: SocketAddr = listener.local_addr().expect("bound");
        let stop = CancellationToken::new();
        let signal = stop.clone();
        let task = tokio::spawn(async move {
            app::serve(built, listener, async move { signal.cancelled().await })
                .await
                .expect("the server runs");
        });
        TestServer {
            base: format!("http://{address}"),
            state,
            client: reqwest::Client::new(),
            stop,
            task: Some(task),
            _home: Some(home),
        }
    }

    /// The URL of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Creates a user with `role` in the default org and a session for them, straight
    /// through the identity store, and returns an access token.
    pub async fn token_for(&self, role: Role) -> String {
        self.token_in(OrgId::DEFAULT, role).await.0
    }

    /// As [`TestServer::token_for`] in `org`; returns the token and the user id.
    pub async fn token_in(&self, org: OrgId, role: Role) -> (String, UserId) {
        let identity: &Arc<dyn IdentityStore> = &self.state.identity;
        let now = self.state.clock.now();
        let user = UserRecord {
            id: UserId::new(),
            email: format!("{}@example.test", UserId::new()),
            display_name: format!("{role} user"),
            password_hash: "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA".into(),
            email_verified_at: Some(now),
            totp_secret: None,
            totp_enabled_at: None,
            totp_last_step: None,
            created_at: now,
            disabled_at: None,
        };
        identity.create_user(&user, None).await.expect("user");
        identity
            .add_member(&MembershipRecord {
                org_id: org,
                user_id: user.id,
                role,
                created_at: now,
            })
            .await
            .expect("membership");
        let token = self.session_token(user.id, org, role).await;
        (token, user.id)
    }

    /// A new login session of `user` in `org` with `role`, straight through the identity
    /// store; its access token.
    pub async fn session_token(&self, user: UserId, org: OrgId, role: Role) -> String {
        let now = self.state.clock.now();
        let session = SessionRecord {
            id: SessionId::new(),
            user_id: user,
            org_id: org,
            user_agent: Some("tests".into()),
            ip: Some("127.0.0.1".into()),
            last_ip: None,
            created_at: now,
            last_seen_at: now,
            expires_at: Timestamp(now.as_micros() + 3_600_000_000),
            revoked_at: None,
            revoked_reason: None,
        };
        self.state
            .identity
            .create_session(
                &session,
                &RefreshTokenRecord {
                    hash: arches_auth::opaque::generate(arches_auth::opaque::REFRESH_TOKEN_PREFIX)
                        .hash,
                    session_id: session.id,
                    created_at: now,
                    used_at: None,
                },
            )
            .await
            .expect("session");
        self.state
            .auth
            .tokens
            .issue(
                &arches_auth::jwt::AccessSubject {
                    user_id: user.to_string(),
                    org_id: org.to_string(),
                    role: role.to_string(),
                    session_id: session.id.to_string(),
                },
                now,
            )
            .expect("token")
    }

    /// Waits for a run to end through the engine (no polling, no sleeps); its state.
    pub async fn finished(&self, run_id: &str) -> String {
        let run_id: RunId = run_id.parse().expect("a run id");
        let engine = self.state.engine.as_ref().expect("workers are on").handle();
        let run = tokio::time::timeout(Duration::from_secs(60), engine.wait(run_id))
            .await
            .expect("the run ends within a minute")
            .expect("the run is known");
        run.state.to_string()
    }

    /// GET `path` with a bearer token; returns the status and the JSON body (`Null` when
    /// the body is not JSON).
    pub async fn get(&self, token: &str, path: &str) -> (u16, Value) {
        let response = self
            .client
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .expect("the request is answered");
        status_and_json(response).await
    }

    /// POST a JSON body to `path` with a bearer token.
    pub async fn post(&self, token: &str, path: &str, body: &Value) -> (u16, Value) {
        let response = self
            .client
            .post(self.url(path))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .expect("the request is answered");
        status_and_json(response).await
    }

    /// Sends a pipeline source (YAML) to `path` with `method`.
    pub async fn send_yaml(
        &self,
        token: &str,
        method: reqwest::Method,
        path: &str,
        yaml: &str,
    ) -> (u16, Value) {
        let response = self
            .client
            .request(method, self.url(path))
            .bearer_auth(token)
            .header("content-type", "application/yaml")
            .body(yaml.to_owned())
            .send()
            .await
            .expect("the request is answered");
        status_and_json(response).await
    }

    /// Sends `body` (JSON, when given) to `path` with `method` and a bearer token.
    pub async fn send(
        &self,
        token: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let mut request = self
            .client
            .request(method, self.url(path))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request.json(body);
        }
        status_and_json(request.send().await.expect("the request is answered")).await
    }

    /// POSTs raw bytes with `content_type` to `path` with a bearer token.
    pub async fn post_bytes(
        &self,
        token: &str,
        path: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> (u16, Value) {
        let response = self
            .client
            .post(self.url(path))
            .bearer_auth(token)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("the request is answered");
        status_and_json(response).await
    }

    /// Stops the server and waits for it (requests in flight finish, the engine stops,
    /// the store closes).
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            task.await.expect("the server task ends cleanly");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The status and JSON body of a response.
pub async fn status_and_json(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.expect("a body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}
