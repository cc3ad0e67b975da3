//! A typed async client of the Arches server's REST API (`/api/v1`): login and sessions
//! (with the access token refreshed once, automatically, when the server says it expired),
//! pipelines, runs, task runs, logs (paged and followed), live events and artifacts.
//!
//! ```text
//! let client = Client::new("http://127.0.0.1:8080", Credentials::Token(key))?;
//! let run = client.trigger_run("penguins", None, &Map::new()).await?;
//! let mut events = client.events(&EventsQuery { run_id: Some(run.id), ..Default::default() }).await?;
//! ```
//!
//! Every request has a timeout ([`ClientOptions::request_timeout`]) except the streams
//! (events, followed logs, artifact downloads), which instead fail when the connection stays
//! silent for [`ClientOptions::idle_timeout`] (the server sends keep-alives every 15 seconds).
//! Bodies are read with bounds: error bodies, JSON answers and single events each have a
//! size limit, so a broken or hostile peer cannot make the client buffer without end.
//!
//! The client never logs or prints tokens; `Debug` of credentials hides them.

mod error;
pub mod sse;
mod types;

use std::fmt;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arches_core::events::DomainEvent;
use arches_core::{ArtifactId, OrgId, RunId, RunState, TaskId};
use bytes::Bytes;
use futures::stream::{Stream, StreamExt, TryStreamExt};
use reqwest::header::{HeaderValue, ACCEPT, CONTENT_TYPE};
use reqwest::{RequestBuilder, Response, Url};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

pub use error::{ApiError, ClientError, Diagnostic, Error, TransportKind};
pub use types::*;

/// A stream of items or errors, boxed so it can be stored and passed around.
pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Error>> + Send>>;

/// How the client authenticates.
#[derive(Clone, PartialEq, Eq, Default)]
pub enum Credentials {
    /// No credentials: only login works.
    #[default]
    None,
    /// A bearer token used as is and never refreshed: a personal API key (`ak_…`) or an
    /// access token obtained elsewhere.
    Token(String),
    /// A login session: the access token is sent, and the refresh token exchanged for a new
    /// pair when the server answers `token_expired`.
    Session(SessionTokens),
}

impl fmt::Debug for Credentials {
    /// Never prints a secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Credentials::None => "None",
            Credentials::Token(_) => "Token(..)",
            Credentials::Session(_) => "Session(..)",
        })
    }
}

/// The two tokens of a login session. The refresh token works once: each refresh answers a
/// new pair, which replaces this one (see [`Client::on_session_rotated`]).
#[derive(Clone, PartialEq, Eq)]
pub struct SessionTokens {
    /// The JWT sent as `Authorization: Bearer …`.
    pub access_token: String,
    /// The single-use token that gets the next pair.
    pub refresh_token: String,
}

impl fmt::Debug for SessionTokens {
    /// Never prints the tokens.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionTokens { .. }")
    }
}

impl From<&TokenResponse> for SessionTokens {
    fn from(tokens: &TokenResponse) -> Self {
        SessionTokens {
            access_token: tokens.access_token.clone(),
            refresh_token: tokens.refresh_token.clone(),
        }
    }
}

/// Bounds of a client. Every field has a default (see [`ClientOptions::default`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientOptions {
    /// Longest wait for a TCP connection (default 10 s).
    pub connect_timeout: Duration,
    /// Longest time for a whole request and its answer, streams excepted (default 30 s).
    pub request_timeout: Duration,
    /// Longest silence on any connection, streams included (default 60 s; the server's
    /// streams send a keep-alive every 15 s).
    pub idle_timeout: Duration,
    /// Largest error body read, in bytes; the rest is dropped (default 64 KiB).
    pub error_body_bytes_max: usize,
    /// Largest JSON answer read, in bytes (default 64 MiB).
    pub response_bytes_max: usize,
    /// Largest single server-sent event, in bytes (default 4 MiB).
    pub event_bytes_max: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            error_body_bytes_max: 64 << 10,
            response_bytes_max: 64 << 20,
            event_bytes_max: 4 << 20,
        }
    }
}

/// Called with the new session each time the client logs in or refreshes, so the caller can
/// persist its tokens (the previous refresh token no longer works).
pub type SessionListener = Arc<dyn Fn(&TokenResponse) + Send + Sync>;

/// A client of one server. Cheap to clone: clones share the connection pool, the credentials
/// and the refresh.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    base: Url,
    options: ClientOptions,
    credentials: Mutex<Credentials>,
    /// Held while refreshing, so that concurrent requests that all met `token_expired`
    /// refresh once: presenting a used refresh token makes the server revoke the session.
    refresh: tokio::sync::Mutex<()>,
    listener: Mutex<Option<SessionListener>>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.inner.base.as_str())
            .finish_non_exhaustive()
    }
}

/// Parses and normalizes a server's base URL: `http` or `https` (TLS by rustls, trusting the
/// built-in Mozilla roots and the system's), no query or fragment, no trailing slash; a bare
/// `host:port` gets `http://`.
///
/// # Errors
/// [`Error::InvalidUrl`] naming the problem.
pub fn parse_base_url(text: &str) -> Result<Url, Error> {
    let trimmed = text.trim();
    let invalid = |message: &str| Error::InvalidUrl {
        url: text.to_owned(),
        message: message.to_owned(),
    };
    if trimmed.is_empty() {
        return Err(invalid("empty"));
    }
    let with_scheme = if trimmed.contains("://") {
        trimmed.to_owned()
    } else {
        format!("http://{trimmed}")
    };
    let mut url = Url::parse(&with_scheme).map_err(|e| invalid(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid("the scheme must be http or https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid("a server URL has no query or fragment"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(
            "credentials do not go in the URL; use a token or log in",
        ));
    }
    let path = url.path().trim_end_matches('/').to_owned();
    url.set_path(&path);
    Ok(url)
}

/// The text of a normalized base URL, without a trailing slash (the key under which the CLI
/// saves credentials).
pub fn base_url_text(url: &Url) -> String {
    url.as_str().trim_end_matches('/').to_owned()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Timing {
    /// A request with an answer: bounded by the request timeout.
    Bounded,
    /// A stream: bounded only by the idle timeout.
    Stream,
}

impl Client {
    /// A client of the server at `base_url` (`http://host:port`, or a bare `host:port`) with
    /// the default options.
    ///
    /// # Errors
    /// [`Error::InvalidUrl`]; [`Error::Transport`] if the HTTP stack cannot start.
    pub fn new(base_url: &str, credentials: Credentials) -> Result<Self, Error> {
        Self::with_options(base_url, credentials, ClientOptions::default())
    }

    /// A client with explicit bounds.
    ///
    /// # Errors
    /// As [`Client::new`].
    pub fn with_options(
        base_url: &str,
        credentials: Credentials,
        options: ClientOptions,
    ) -> Result<Self, Error> {
        let base = parse_base_url(base_url)?;
        let http = reqwest::Client::builder()
            .connect_timeout(options.connect_timeout)
            .read_timeout(options.idle_timeout)
            .user_agent(concat!("arches-client/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::transport(base.as_str(), e))?;
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                base,
                options,
                credentials: Mutex::new(credentials),
                refresh: tokio::sync::Mutex::new(()),
                listener: Mutex::new(None),
            }),
        })
    }

    /// Calls `listener` with the new session after each login and refresh (not with the
    /// tokens given to [`Client::new`]). The listener runs inside the request: keep it short.
    pub fn on_session_rotated(&self, listener: impl Fn(&TokenResponse) + Send + Sync + 'static) {
        *lock(&self.inner.listener) = Some(Arc::new(listener));
    }

    /// The server's base URL, normalized (see [`parse_base_url`]).
    pub fn base_url(&self) -> &Url {
        &self.inner.base
    }

    /// The current credentials (after any refresh).
    pub fn credentials(&self) -> Credentials {
        lock(&self.inner.credentials).clone()
    }

    /// The current session's tokens, when the client holds a session.
    pub fn session_tokens(&self) -> Option<SessionTokens> {
        match &*lock(&self.inner.credentials) {
            Credentials::Session(tokens) => Some(tokens.clone()),
            _ => None,
        }
    }

    // -----------------------------------------------------------------------------------
    // Auth.

    /// Logs in with email and password (`POST /api/v1/auth/login`). On success the client
    /// holds the new session; when the account has TOTP enabled the answer is
    /// [`LoginOutcome::MfaRequired`].
    ///
    /// # Errors
    /// [`Error::Api`] `invalid_credentials` (401) for a wrong email or password,
    /// `rate_limited` (429) after repeated failures, `forbidden` (403) while the email is not
    /// verified; transport errors.
    pub async fn login(
        &self,
        email: &str,
        password: &str,
        org_id: Option<OrgId>,
    ) -> Result<LoginOutcome, Error> {
        let body = json!({ "email": email, "password": password, "org_id": org_id });
        let url = self.url(&["api", "v1", "auth", "login"], None)?;
        let response = self
            .execute(
                |http| http.post(url.clone()).json(&body),
                None,
                Timing::Bounded,
            )
            .await?;
        match self.answer::<TokenResponse>(&url, response).await {
            Ok(tokens) => {
                self.adopt(&tokens);
                Ok(LoginOutcome::LoggedIn(Box::new(tokens)))
            }
            Err(Error::Api(api)) if api.code == "mfa_required" => {
                let mfa_token = api
                    .detail_str("mfa_token")
                    .ok_or_else(|| Error::decode(url.as_str(), "mfa_required without mfa_token"))?
                    .to_owned();
                Ok(LoginOutcome::MfaRequired {
                    mfa_token,
                    expires_in: api.details.get("expires_in").and_then(Value::as_u64),
                })
            }
            Err(error) => Err(error),
        }
    }

    /// Finishes a login whose account has TOTP enabled (`POST /api/v1/auth/login/mfa`).
    ///
    /// # Errors
    /// [`Error::Api`] `invalid_credentials` (401) for a wrong or used code, whose
    /// `details.mfa_token` is a fresh challenge to try again with; `unauthenticated` (401)
    /// when the challenge expired (log in again).
    pub async fn login_mfa(
        &self,
        mfa_token: &str,
        code: &MfaCode,
        org_id: Option<OrgId>,
    ) -> Result<TokenResponse, Error> {
        let body = match code {
            MfaCode::Totp(code) => {
                json!({ "mfa_token": mfa_token, "code": code, "org_id": org_id })
            }
            MfaCode::Recovery(code) => {
                json!({ "mfa_token": mfa_token, "recovery_code": code, "org_id": org_id })
            }
        };
        self.obtain_tokens(&["api", "v1", "auth", "login", "mfa"], &body)
            .await
    }

    /// Exchanges the session's refresh token for a new pair now (`POST
    /// /api/v1/auth/refresh`); the client does this by itself when the server answers
    /// `token_expired`.
    ///
    /// # Errors
    /// [`Error::Api`] `unauthenticated` (401) when the refresh token is used, expired or its
    /// session revoked (log in again); [`Error::Decode`] when the client holds no session.
    pub async fn refresh(&self) -> Result<TokenResponse, Error> {
        let Some(tokens) = self.session_tokens() else {
            return Err(Error::decode(
                self.inner.base.as_str(),
                "no login session to refresh (the client holds an API key or nothing)",
            ));
        };
        let _held = self.inner.refresh.lock().await;
        self.refresh_with(&tokens.refresh_token).await
    }

    async fn refresh_with(&self, refresh_token: &str) -> Result<TokenResponse, Error> {
        let body = json!({ "refresh_token": refresh_token });
        self.obtain_tokens(&["api", "v1", "auth", "refresh"], &body)
            .await
    }

    /// Posts `body` without credentials to the endpoint at `segments` that answers a new
    /// token pair, and adopts the pair.
    async fn obtain_tokens(&self, segments: &[&str], body: &Value) -> Result<TokenResponse, Error> {
        let url = self.url(segments, None)?;
        let response = self
            .execute(
                |http| http.post(url.clone()).json(body),
                None,
                Timing::Bounded,
            )
            .await?;
        let tokens: TokenResponse = self.answer(&url, response).await?;
        self.adopt(&tokens);
        Ok(tokens)
    }

    /// Logs out (`POST /api/v1/auth/logout`): the session's tokens stop working at once. The
    /// client then holds no credentials.
    ///
    /// # Errors
    /// [`Error::Api`] `bad_request` (400) for an API key (revoke the key instead),
    /// `unauthenticated` (401) when the session already ended.
    pub async fn logout(&self) -> Result<(), Error> {
        let url = self.url(&["api", "v1", "auth", "logout"], None)?;
        self.send(|http| http.post(url.clone()), Timing::Bounded)
            .await?;
        *lock(&self.inner.credentials) = Credentials::None;
        Ok(())
    }

    // -----------------------------------------------------------------------------------
    // Tools and secrets.

    /// The built-in tools and the latest version of each of the org's registered tools.
    ///
    /// # Errors
    /// [`Error::Api`] `forbidden` (403) without `tool_read`.
    pub async fn list_tools(&self) -> Result<Vec<Tool>, Error> {
        let url = self.url(&["api", "v1", "tools"], None)?;
        self.get(&url).await
    }

    /// A built-in tool, or the latest version of a registered one.
    ///
    /// # Errors
    /// [`Error::Api`] `not_found` (404).
    pub async fn get_tool(&self, name: &str) -> Result<Tool, Error> {
        let url = self.url(&["api", "v1", "tools", name], None)?;
        self.get(&url).await
    }

    /// Every version of a registered tool, newest first.
    ///
    /// # Errors
    /// [`Error::Api`] `not_found` (404).
    pub async fn tool_versions(&self, name: &str) -> Result<Vec<Tool>, Error> {
        let url = self.url(&["api", "v1", "tools", name, "versions"], None)?;
        self.get(&url).await
    }

    /// Registers a tool from its manifest (YAML or JSON text): version 1 of a new name, the
    /// next version of a changed manifest, the stored version of an identical one.
    ///
    /// # Errors
    /// [`Error::Api`] `validation_failed` (422) with `details.problems` (`pointer`,
    /// `message`); `forbidden` (403) without `tool_register`.
    pub async fn register_tool(&self, manifest: &str) -> Result<Tool, Error> {
        let url = self.url(&["api", "v1", "tools"], None)?;
        let body = Bytes::copy_from_slice(manifest.as_bytes());
        self.call(
            &url,
            |http| {
                http.post(url.clone())
                    .header(CONTENT_TYPE, HeaderValue::from_static("application/yaml"))
                    .body(body.clone())
            },
            Timing::Bounded,
        )
        .await
    }

    /// Uploads `content` as an artifact named `name` (a WASM module to register, a data
    /// file); the server stores it by SHA-256.
    ///
    /// # Errors
    /// [`Error::Api`] `payload_too_large` (413) over the server's body limit, `forbidden`
    /// (403) without `artifact_write`.
    pub async fn upload_artifact(
        &self,
        name: &str,
        media_type: &str,
        content: Vec<u8>,
    ) -> Result<Artifact, Error> {
        let url = self.url(
            &["api", "v1", "artifacts"],
            Some(&[
                ("name", name.to_owned()),
                ("media_type", media_type.to_owned()),
            ]),
        )?;
        let body = Bytes::from(content);
        self.call(
            &url,
            |http| {
                http.post(url.clone())
                    .header(
                        CONTENT_TYPE,
                        HeaderValue::from_static("application/octet-stream"),
                    )
                    .body(body.clone())
            },
            Timing::Stream,
        )
        .await
    }

    /// The org's secrets (names and metadata, never values).
    ///
    /// # Errors
    /// [`Error::Api`] `forbidden` (403) without `secret_read`.
    pub async fn list_secrets(&self) -> Result<Vec<Secret>, Error> {
        let url = self.url(&["api", "v1", "secrets"], None)?;
        self.get(&url).await
    }

    /// Sets a secret's value (4 bytes to 64 KiB of text).
    ///
    /// # Errors
    /// [`Error::Api`] `validation_failed` (422) for a bad name or length, `conflict` (409)
    /// when the server has no master key, `forbidden` (403) without `secret_write`.
    pub async fn set_secret(&self, name: &str, value: &str) -> Result<Secret, Error> {
        let url = self.url(&["api", "v1", "secrets", name], None)?;
        let body = json!({ "value": value });
        self.call(
            &url,
            |http| http.put(url.clone()).json(&body),
            Timing::Bounded,
        )
        .await
    }

    /// Deletes a secret.
    ///
    /// # Errors
    /// [`Error::Api`] `not_found` (404).
    pub async fn delete_secret(&self, name: &str) -> Result<(), Error> {
        let url = self.url(&["api", "v1", "secrets", name], None)?;
        self.send(|http| http.delete(url.clone()), Timing::Bounded)
            .await?;
        Ok(())
    }

    /// Seals every secret of the org under the server's active master key.
    ///
    /// # Errors
    /// [`Error::Api`] `conflict` (409) when a secret cannot be opened or no key is set.
    pub async fn rotate_secrets(&self) -> Result<RotationReport, Error> {
        let url = self.url(&["api", "v1", "secrets", "rotate"], None)?;
        self.call(&url, |http| http.post(url.clone()), Timing::Bounded)
            .await
    }

    // -----------------------------------------------------------------------------------
    // The validation queue.

    /// A page of the validation queue, oldest first.
    ///
    /// # Errors
    /// [`Error::Api`] `bad_request` (400) for a bad filter; `forbidden` (403) without
    /// `review_read`.
    pub async fn list_reviews(&self, query: &ReviewsQuery) -> Result<Page<Review>, Error> {
        let url = self.url_with(&["api", "v1", "reviews"], query)?;
        self.get(&url).await
    }

    /// Searches a collection of the caller's org (`GET /api/v1/search`).
    ///
    /// # Errors
    /// [`Error::Api`] `bad_request` (400) for a bad collection name, mode, `k` or filter;
    /// `unavailable` (503) when the server has search turned off.
    pub async fn search(&self, query: &SearchQuery) -> Result<SearchResults, Error> {
        let url = self.url_with(&["api", "v1", "search"], query)?;
        self.get(&url).await
    }

    /// One item with its preview and votes.
    ///
    /// # Errors
    /// [`Error::Api`] `not_found` (404).
    pub async fn get_review(&self, id: &str) -> Result<Review, Error> {
        let url = self.url(&["api", "v1", "reviews", id], None)?;
        self.get(&url).await
    }

    /// Claims an item for `ttl_secs` (the server's default: 15 minutes).
    ///
    /// # Errors
    /// [`Error::Api`] `conflict` (409) when another reviewer holds it or it is decided.
    pub async fn claim_review(&self, id: &str, ttl_secs: Option<u64>) -> Result<Review, Error> {
        let url = self.url(&["api", "v1", "reviews", id, "claim"], None)?;
        let body = json!({ "ttl_secs": ttl_secs });
        self.call(
            &url,
            |http| http.post(url.clone()).json(&body),
            Timing::Bounded,
        )
        .await
    }

    /// Decides an item: `verdict` `approve` (with `output` to approve an edited result) or
    /// `reject`, with an optional comment.
    ///
    /// # Errors
    /// [`Error::Api`] `conflict` (409) when the item was decided (or claimed) by someone
    /// else; `forbidden` (403) for a reviewer outside an approval's assignees.
    pub async fn decide_review(
        &self,
        id: &str,
        verdict: &str,
        output: Option<&serde_json::Value>,
        comment: Option<&str>,
    ) -> Result<Review, Error> {
        let url = self.url(&["api", "v1", "reviews", id, "decision"], None)?;
        let body = json!({ "verdict": verdict, "output": output, "comment": comment });
        self.call(
            &url,
            |http| http.post(url.clone()).json(&body),
            Timing::Bounded,
        )
        .await
    }

    /// The calibration of a pipeline's routed tasks (or of one of them).
    ///
    /// # Errors
    /// [`Error::Api`] `not_found` (404) for an unknown pipeline or task.
    pub async fn calibration(
        &self,
        pipeline: &str,
        task: Option<&str>,
    ) -> Result<Vec<Calibration>, Error> {
        #[derive(serde::Serialize)]
        struct Query<'a> {
            pipeline: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            task: Option<&'a str>,
        }
        let url = self.url_with(
            &["api", "v1", "reviews", "calibration"],
            &Query { pipeline, task },
        )?;
        self.get(&url).await
    }

    // -----------------------------------------------------------------------------------
    // Pipelines.

    /// Saves a pipeline from its source (YAML or JSON text): version 1 when the name is new,
    /// a new version when the definition changed, nothing when it equals a saved version.
    /// The server validates it.
    ///
    /// # Errors
    /// [`Error::Api`] `validation_failed` (422) with `details.diagnostics`
    /// ([`ApiError::diagnostics`]); `forbidden` (403) without the `pipelines:write`
    /// permission; `payload_too_large` (413) over the server's 1 MiB.
    pub async fn apply_pipeline(
        &self,
        source: &str,
    ) -> Result<(PipelineVersion, ApplyChange), Error> {
        #[derive(Deserialize)]
        struct Report {
            valid: bool,
            name: Option<String>,
        }
        let source = Bytes::copy_from_slice(source.as_bytes());
        let yaml = HeaderValue::from_static("application/yaml");
        // Every request of an apply carries the source as its YAML body.
        let with_source = |request: RequestBuilder| {
            request
                .header(CONTENT_TYPE, yaml.clone())
                .body(source.clone())
        };
        let validate = self.url(&["api", "v1", "pipelines", "validate"], None)?;
        let report: Report = self
            .call(
                &validate,
                |http| with_source(http.post(validate.clone())),
                Timing::Bounded,
            )
            .await?;
        let create = self.url(&["api", "v1", "pipelines"], None)?;
        let post = |http: &reqwest::Client| with_source(http.post(create.clone()));
        let name = match (report.valid, report.name) {
            (true, Some(name)) => name,
            // The server's answer to the create carries the diagnostics in the usual shape.
            _ => {
                let created: PipelineVersion = self.call(&create, post, Timing::Bounded).await?;
                return Ok((created, ApplyChange::Created));
            }
        };
        let latest = match self.get_pipeline(&name).await {
            Ok(latest) => Some(latest),
            Err(error) if error.is_not_found() => None,
            Err(error) => return Err(error),
        };
        let Some(latest) = latest else {
            let created: PipelineVersion = self.call(&create, post, Timing::Bounded).await?;
            let change = if created.version == 1 {
                ApplyChange::Created
            } else {
                // Someone created it in between; the definition was saved as a version.
                ApplyChange::Updated
            };
            return Ok((created, change));
        };
        let update = self.url(&["api", "v1", "pipelines", &name], None)?;
        let saved: PipelineVersion = self
            .call(
                &update,
                |http| with_source(http.put(update.clone())),
                Timing::Bounded,
            )
            .await?;
        let change = if saved.version > latest.version {
            ApplyChange::Updated
        } else {
            ApplyChange::Unchanged
        };
        Ok((saved, change))
    }

    /// The latest version of each pipeline, by name.
    ///
    /// # Errors
    /// [`Error::Api`] `forbidden` (403) without `pipelines:read`.
    pub async fn list_pipelines(
        &self,
        include_archived: bool,
    ) -> Result<Vec<PipelineVersion>, Error> {
        let url = self.url(
            &["api", "v1", "pipelines"],
            Some(&[("include_archived", include_archived.to_string())]),
        )?;
        let page: Page<PipelineVersion> = self.get(&url).await?;
        Ok(page.items)
    }

    /// The latest version of a pipeline.
    ///
    /// # Errors
    /// [`Error::Api`] `not_found` (404).
    pub async fn get_pipeline(&self, name: &str) -> Result<PipelineVersion, Error> {
        let url = self.url(&["api", "v1", "pipelines", name], None)?;
        self.get(&url).await
    }

    /// One version of a pipeline.
    ///
    /// # Errors
    /// [`Error::Api`] `not_found` (404).
    pub async fn get_pipeline_version(
        &self,
        name: &str,
        version: u32,
    ) -> Result<PipelineVersion, Error> {
        let url = self.url(
            &[
                "api",
                "v1",
                "pipelines",
                name,
                "versions",
                &version.to_string(),
            ],
            None,
        )?;
        self.get(&url).await
    }

    // -----------------------------------------------------------------------------------
    // Runs.

    /// Starts a run of a pipeline (its latest version unless `version`), with params by name
    /// (declared defaults fill the rest).
    ///
    /// # Errors
    /// [`Error::Api`] `not_found` (404) for an unknown pipeline or version,
    /// `validation_failed` (422) for bad params (`details.params`), `conflict` (409) for an
    /// archived pipeline, `unavailable` (503) on a server that runs no workers.
    pub async fn trigger_run(
        &self,
        pipeline: &str,
        version: Option<u32>,
        params: &Map<String, Value>,
    ) -> Result<Run, Error> {
        let url = self.url(&["api", "v1", "runs"], None)?;
        let mut body = json!({ "pipeline": pipeline, "params": params });
        if let Some(version) = version {
            body["version"] = json!(version);
        }
        self.call(
            &url,
            |http| http.post(url.clone()).json(&body),
            Timing::Bounded,
        )
        .await
    }

    /// One run.
    ///
    /// # Errors
    /// [`Error::Api`] `not_found` (404).
    pub async fn get_run(&self, run_id: RunId) -> Result<Run, Error> {
        let url = self.url(&["api", "v1", "runs", &run_id.to_string()], None)?;
        self.get(&url).await
    }

    /// A page of runs, newest first.
    ///
    /// # Errors
    /// [`Error::Api`] `bad_request` (400) for a malformed cursor.
    pub async fn list_runs(&self, query: &RunsQuery) -> Result<Page<Run>, Error> {
        let url = self.url_with(&["api", "v1", "runs"], query)?;
        self.get(&url).await
    }

    /// Cancels a run: its running task runs are stopped, the rest skipped.
    ///
    /// # Errors
    /// [`Error::Api`] `not_found` (404), `conflict` (409) when the run already ended.
    pub async fn cancel_run(&self, run_id: RunId) -> Result<Run, Error> {
        let url = self.url(&["api", "v1", "runs", &run_id.to_string(), "cancel"], None)?;
        self.call(&url, |http| http.post(url.clone()), Timing::Bounded)
            .await
    }

    /// Retries a failed or cancelled run from its failed tasks.
    ///
    /// # Errors
    /// [`Error::Api`] `not_found` (404), `conflict` (409) when the run is not failed or
    /// cancelled, or has nothing to retry.
    pub async fn retry_run(&self, run_id: RunId) -> Result<Run, Error> {
        let url = self.url(&["api", "v1", "runs", &run_id.to_string(), "retry"], None)?;
        self.call(&url, |http| http.post(url.clone()), Timing::Bounded)
            .await
    }

    /// The run's task runs with their attempts, in creation order.
    ///
    /// # Errors
    /// [`Error::Api`] `not_found` (404).
    pub async fn task_runs(&self, run_id: RunId) -> Result<Vec<TaskRun>, Error> {
        let url = self.url(
            &["api", "v1", "runs", &run_id.to_string(), "task-runs"],
            None,
        )?;
        let page: Page<TaskRun> = self.get(&url).await?;
        Ok(page.items)
    }

    /// A page of the run's stored task log lines after `query.cursor`; the page's
    /// `next_cursor` is the last line's sequence number (absent on an empty page).
    ///
    /// # Errors
    /// [`Error::Api`] `not_found` (404), `bad_request` (400) for a malformed task id.
    pub async fn logs(&self, run_id: RunId, query: &LogsQuery) -> Result<Page<LogLine>, Error> {
        let url = self.url_with(&["api", "v1", "runs", &run_id.to_string(), "logs"], query)?;
        self.get(&url).await
    }

    /// Searches the task log lines of the org's runs by full text (`GET
    /// /api/v1/logs/search`): hits best first.
    ///
    /// # Errors
    /// [`Error::Api`] `bad_request` (400) for a query with no word or a bad filter (the
    /// parameter in its details), `not_found` (404) for a run of another org.
    pub async fn search_logs(&self, params: &LogSearchParams) -> Result<LogSearchResults, Error> {
        let url = self.url_with(&["api", "v1", "logs", "search"], params)?;
        self.get(&url).await
    }

    /// The run's task log lines, followed: the stored lines, then new ones as they are
    /// written, then [`FollowedLog::End`] when the run is over (at once for a run that
    /// already ended), after which the stream ends.
    ///
    /// # Errors
    /// Opening: as [`Client::logs`]. Items: [`Error::Transport`] when the connection breaks
    /// or stays silent past the idle timeout, [`Error::Decode`] for an unreadable event.
    pub async fn follow_logs(
        &self,
        run_id: RunId,
        task: Option<&TaskId>,
    ) -> Result<BoxStream<FollowedLog>, Error> {
        let mut query = vec![("follow", "true".to_owned())];
        if let Some(task) = task {
            query.push(("task", task.to_string()));
        }
        let url = self.url(
            &["api", "v1", "runs", &run_id.to_string(), "logs"],
            Some(&query),
        )?;
        let response = self
            .send(
                |http| http.get(url.clone()).header(ACCEPT, "text/event-stream"),
                Timing::Stream,
            )
            .await?;
        let source = url.to_string();
        let items = self.sse(&url, response).try_filter_map(move |event| {
            let source = source.clone();
            async move {
                Ok(match event.event.as_str() {
                    "log" => Some(FollowedLog::Line(
                        serde_json::from_str(&event.data)
                            .map_err(|e| Error::decode(&source, format!("log event: {e}")))?,
                    )),
                    "end" => {
                        #[derive(Deserialize)]
                        struct End {
                            state: RunState,
                        }
                        let end: End = serde_json::from_str(&event.data)
                            .map_err(|e| Error::decode(&source, format!("end event: {e}")))?;
                        Some(FollowedLog::End { state: end.state })
                    }
                    "reset" => Some(FollowedLog::Reset {
                        reason: reason_of(&event.data),
                    }),
                    // Kinds a newer server may add.
                    _ => None,
                })
            }
        });
        // Stop reading once the end was seen: the server closes the stream then anyway.
        let mut finished = false;
        let items = items.take_while(move |item| {
            let keep = !finished;
            finished = finished || matches!(item, Ok(FollowedLog::End { .. }));
            futures::future::ready(keep)
        });
        Ok(Box::pin(items))
    }

    // -----------------------------------------------------------------------------------
    // Live events.

    /// The live event stream (`GET /api/v1/events`): run and task-run state changes and task
    /// log lines of the caller's org, as they are committed. It does not end by itself; stop
    /// reading when done. Events missed while disconnected are replayed when resuming with
    /// `last_event_id`, or announced with [`Event::Reset`] when the server no longer has
    /// them.
    ///
    /// # Errors
    /// Opening: [`Error::Api`] `bad_request` (400) for a malformed event id. Items:
    /// [`Error::Transport`] when the connection breaks or stays silent past the idle timeout,
    /// [`Error::Decode`] for an unreadable event.
    pub async fn events(&self, query: &EventsQuery) -> Result<BoxStream<Event>, Error> {
        let mut params = Vec::new();
        if let Some(run_id) = query.run_id {
            params.push(("run_id", run_id.to_string()));
        }
        if !query.kinds.is_empty() {
            let kinds: Vec<&str> = query.kinds.iter().map(|k| k.as_str()).collect();
            params.push(("kinds", kinds.join(",")));
        }
        let url = self.url(&["api", "v1", "events"], Some(&params))?;
        let last = query.last_event_id.clone();
        let response = self
            .send(
                |http| {
                    let request = http.get(url.clone()).header(ACCEPT, "text/event-stream");
                    match &last {
                        Some(id) => request.header("last-event-id", id.as_str()),
                        None => request,
                    }
                },
                Timing::Stream,
            )
            .await?;
        let source = url.to_string();
        let events = self.sse(&url, response).try_filter_map(move |event| {
            let source = source.clone();
            async move {
                let id = event.id.clone();
                Ok(match event.event.as_str() {
                    "run" | "task_run" => Some(Event::State {
                        id,
                        event: serde_json::from_str::<DomainEvent>(&event.data).map_err(|e| {
                            Error::decode(&source, format!("{} event: {e}", event.event))
                        })?,
                    }),
                    "log" => Some(Event::Log {
                        id,
                        line: serde_json::from_str(&event.data)
                            .map_err(|e| Error::decode(&source, format!("log event: {e}")))?,
                    }),
                    "reset" => Some(Event::Reset {
                        reason: reason_of(&event.data),
                    }),
                    _ => None,
                })
            }
        });
        Ok(Box::pin(events))
    }

    // -----------------------------------------------------------------------------------
    // Artifacts.

    /// Artifact versions, newest first.
    ///
    /// # Errors
    /// [`Error::Api`] `bad_request` (400) for a malformed run id.
    pub async fn list_artifacts(&self, query: &ArtifactsQuery) -> Result<Vec<Artifact>, Error> {
        let url = self.url_with(&["api", "v1", "artifacts"], query)?;
        let page: Page<Artifact> = self.get(&url).await?;
        Ok(page.items)
    }

    /// One artifact's metadata.
    ///
    /// # Errors
    /// [`Error::Api`] `not_found` (404).
    pub async fn get_artifact(&self, id: ArtifactId) -> Result<Artifact, Error> {
        let url = self.url(&["api", "v1", "artifacts", &id.to_string()], None)?;
        self.get(&url).await
    }

    /// The latest version of the artifact named `name`, or version `version` of it.
    ///
    /// # Errors
    /// [`Error::Api`] `not_found` (404, made by the client) when there is none.
    pub async fn artifact_by_name(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<Artifact, Error> {
        // Versions are listed newest first; the largest page reaches back 1,000 versions.
        let list = self
            .list_artifacts(&ArtifactsQuery {
                name: Some(name.to_owned()),
                run_id: None,
                limit: Some(if version.is_some() { 1000 } else { 1 }),
            })
            .await?;
        list.into_iter()
            .find(|a| a.name == name && version.is_none_or(|v| a.version == v))
            .ok_or_else(|| {
                let what = match version {
                    Some(v) => format!("{name}@{v}"),
                    None => name.to_owned(),
                };
                Error::Api(ApiError {
                    status: 404,
                    code: "not_found".to_owned(),
                    message: format!("artifact {what} not found"),
                    details: json!({ "kind": "artifact", "id": what }),
                })
            })
    }

    /// The artifact's content as a stream of chunks.
    ///
    /// # Errors
    /// Opening: [`Error::Api`] `not_found` (404). Items: [`Error::Transport`].
    pub async fn artifact_content(&self, id: ArtifactId) -> Result<BoxStream<Bytes>, Error> {
        let url = self.url(
            &["api", "v1", "artifacts", &id.to_string(), "content"],
            None,
        )?;
        let response = self
            .send(|http| http.get(url.clone()), Timing::Stream)
            .await?;
        let source = url.to_string();
        Ok(Box::pin(
            response
                .bytes_stream()
                .map_err(move |e| Error::transport(&source, e)),
        ))
    }

    /// Downloads an artifact's content to `path`, streaming, and checks it against the
    /// metadata (size and SHA-256). The content goes to a temporary file beside `path`,
    /// renamed over it only when complete and correct, so `path` never holds a partial or
    /// corrupt file. Returns the bytes written.
    ///
    /// # Errors
    /// As [`Client::artifact_content`]; [`Error::Integrity`] when the content does not match
    /// the metadata; [`Error::Io`] when the file cannot be written.
    pub async fn download_artifact(&self, artifact: &Artifact, path: &Path) -> Result<u64, Error> {
        let io = |action: &'static str, path: &Path| {
            let path = path.display().to_string();
            move |source| Error::Io {
                action,
                path,
                source,
            }
        };
        let directory = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "artifact".to_owned());
        let partial = directory.join(format!(".{file_name}.{}.partial", std::process::id()));
        let mut content = self.artifact_content(artifact.id).await?;
        let mut file = tokio::fs::File::create(&partial)
            .await
            .map_err(io("cannot create", &partial))?;
        let mut hasher = Sha256::new();
        let mut written: u64 = 0;
        let outcome = async {
            while let Some(chunk) = content.next().await {
                let chunk = chunk?;
                written += chunk.len() as u64;
                if written > artifact.size_bytes {
                    return Err(Error::Integrity {
                        id: artifact.id.to_string(),
                        message: format!("more than its {} bytes", artifact.size_bytes),
                    });
                }
                hasher.update(&chunk);
                file.write_all(&chunk)
                    .await
                    .map_err(io("cannot write", &partial))?;
            }
            file.flush().await.map_err(io("cannot write", &partial))?;
            file.sync_all()
                .await
                .map_err(io("cannot write", &partial))?;
            if written != artifact.size_bytes {
                return Err(Error::Integrity {
                    id: artifact.id.to_string(),
                    message: format!("{written} bytes, expected {}", artifact.size_bytes),
                });
            }
            let digest = hex::encode(hasher.finalize());
            if !digest.eq_ignore_ascii_case(&artifact.digest) {
                return Err(Error::Integrity {
                    id: artifact.id.to_string(),
                    message: format!("SHA-256 {digest}, expected {}", artifact.digest),
                });
            }
            tokio::fs::rename(&partial, path)
                .await
                .map_err(io("cannot write", path))
        }
        .await;
        if outcome.is_err() {
            let _ = tokio::fs::remove_file(&partial).await;
        }
        outcome.map(|()| written)
    }

    // -----------------------------------------------------------------------------------
    // Plumbing.

    /// The URL of `segments` under the base, each segment percent-encoded, with `query`.
    fn url(&self, segments: &[&str], query: Option<&[(&str, String)]>) -> Result<Url, Error> {
        let mut url = self.inner.base.clone();
        {
            let mut path = url.path_segments_mut().map_err(|()| Error::InvalidUrl {
                url: self.inner.base.to_string(),
                message: "cannot be a base".to_owned(),
            })?;
            path.pop_if_empty();
            path.extend(segments);
        }
        if let Some(query) = query.filter(|q| !q.is_empty()) {
            url.query_pairs_mut()
                .extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
        }
        Ok(url)
    }

    /// The URL of `segments` with a serializable query (a struct of optional fields).
    fn url_with(&self, segments: &[&str], query: &impl serde::Serialize) -> Result<Url, Error> {
        let mut url = self.url(segments, None)?;
        let encoded = serde_json::to_value(query)
            .ok()
            .and_then(|v| v.as_object().cloned())
            .unwrap_or_default();
        if !encoded.is_empty() {
            let mut pairs = url.query_pairs_mut();
            for (key, value) in &encoded {
                let text = match value {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                pairs.append_pair(key, &text);
            }
        }
        Ok(url)
    }

    async fn get<T: DeserializeOwned>(&self, url: &Url) -> Result<T, Error> {
        self.call(url, |http| http.get(url.clone()), Timing::Bounded)
            .await
    }

    /// Sends a request (refreshing once if needed) and decodes a JSON answer.
    async fn call<T: DeserializeOwned>(
        &self,
        url: &Url,
        build: impl Fn(&reqwest::Client) -> RequestBuilder,
        timing: Timing,
    ) -> Result<T, Error> {
        let response = self.send(build, timing).await?;
        self.answer(url, response).await
    }

    /// Sends an authenticated request; on `401 token_expired` with a session, refreshes once
    /// and sends it again. Answers the response of a success status, or the API error.
    async fn send(
        &self,
        build: impl Fn(&reqwest::Client) -> RequestBuilder,
        timing: Timing,
    ) -> Result<Response, Error> {
        let credentials = self.credentials();
        let bearer = match &credentials {
            Credentials::None => None,
            Credentials::Token(token) => Some(token.clone()),
            Credentials::Session(tokens) => Some(tokens.access_token.clone()),
        };
        let response = self.execute(&build, bearer.as_deref(), timing).await?;
        if response.status().is_success() {
            return Ok(response);
        }
        let error = self.api_error(response).await;
        let Credentials::Session(used) = credentials else {
            return Err(error.into());
        };
        if error.status != 401 || error.code != "token_expired" {
            return Err(error.into());
        }
        let access = self.refreshed_after(&used).await?;
        let response = self.execute(&build, Some(&access), timing).await?;
        if response.status().is_success() {
            Ok(response)
        } else {
            Err(self.api_error(response).await.into())
        }
    }

    /// The access token to use after `used` was refused as expired: refreshes, unless
    /// another request already did while this one waited.
    async fn refreshed_after(&self, used: &SessionTokens) -> Result<String, Error> {
        let _held = self.inner.refresh.lock().await;
        if let Some(current) = self.session_tokens() {
            if current.access_token != used.access_token {
                return Ok(current.access_token);
            }
        }
        let tokens = self.refresh_with(&used.refresh_token).await?;
        Ok(tokens.access_token)
    }

    /// Sends one request with `bearer`; answers any response, or a transport error.
    async fn execute(
        &self,
        build: impl Fn(&reqwest::Client) -> RequestBuilder,
        bearer: Option<&str>,
        timing: Timing,
    ) -> Result<Response, Error> {
        let mut request = build(&self.inner.http);
        if let Some(bearer) = bearer {
            request = request.bearer_auth(bearer);
        }
        if timing == Timing::Bounded {
            request = request.timeout(self.inner.options.request_timeout);
        }
        let request = request
            .build()
            .map_err(|e| Error::transport(self.inner.base.as_str(), e))?;
        let url = request.url().to_string();
        self.inner
            .http
            .execute(request)
            .await
            .map_err(|e| Error::transport(&url, e))
    }

    /// The API error of a failed response, reading at most `error_body_bytes_max` of it.
    async fn api_error(&self, response: Response) -> ApiError {
        let status = response.status().as_u16();
        let body = read_bounded(response, self.inner.options.error_body_bytes_max)
            .await
            .map(|(body, _)| body)
            .unwrap_or_default();
        ApiError::from_body(status, &body)
    }

    /// Decodes a successful JSON answer, bounded by `response_bytes_max`.
    async fn answer<T: DeserializeOwned>(&self, url: &Url, response: Response) -> Result<T, Error> {
        if !response.status().is_success() {
            return Err(self.api_error(response).await.into());
        }
        let bound = self.inner.options.response_bytes_max;
        let (body, complete) = read_bounded(response, bound)
            .await
            .map_err(|e| Error::transport(url.as_str(), e))?;
        if !complete {
            return Err(Error::decode(
                url.as_str(),
                format!("the answer is larger than {bound} bytes"),
            ));
        }
        serde_json::from_slice(&body).map_err(|e| Error::decode(url.as_str(), e))
    }

    /// The server-sent events of a response.
    fn sse(&self, url: &Url, response: Response) -> BoxStream<sse::SseEvent> {
        let source = url.to_string();
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        if !content_type.starts_with("text/event-stream") {
            let error = Error::decode(
                &source,
                format!("expected text/event-stream, got {content_type:?}"),
            );
            return Box::pin(futures::stream::once(async move { Err(error) }));
        }
        let bytes_max = self.inner.options.event_bytes_max;
        Box::pin(sse::events(response.bytes_stream(), bytes_max).map_err(
            move |error| match error {
                sse::StreamError::Body(e) => Error::transport(&source, e),
                sse::StreamError::TooLarge(t) => Error::decode(
                    &source,
                    format!("an event is larger than {} bytes", t.bytes_max),
                ),
            },
        ))
    }

    /// Takes a new session's tokens and tells the listener.
    fn adopt(&self, tokens: &TokenResponse) {
        let session = SessionTokens::from(tokens);
        *lock(&self.inner.credentials) = Credentials::Session(session.clone());
        let listener = lock(&self.inner.listener).clone();
        if let Some(listener) = listener {
            listener(tokens);
        }
    }
}

/// Reads at most `bytes_max` bytes of a body; the flag says whether it was all of it.
async fn read_bounded(
    mut response: Response,
    bytes_max: usize,
) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = bytes_max - body.len();
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return Ok((body, false));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, true))
}

/// The `reason` of a reset event's payload, or the payload itself.
fn reason_of(data: &str) -> String {
    serde_json::from_str::<Value>(data)
        .ok()
        .and_then(|v| v.get("reason").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| data.to_owned())
}

/// Locks a std mutex, going on with the data if a panic poisoned it (the data are plain
/// values, always consistent).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests;
