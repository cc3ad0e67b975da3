//! Sign-up, login (with an optional second factor), token refresh, logout, email
//! verification and password reset: the anonymous side of identity.
//!
//! Nothing here reveals whether an account exists: login answers one `invalid_credentials`
//! for an unknown email, a wrong password and a disabled account (spending the same hashing
//! work), and a password-reset request always answers 202.

use std::sync::Arc;

use arches_auth::jwt::AccessSubject;
use arches_auth::mail::MailMessage;
use arches_auth::opaque::{
    self, EMAIL_VERIFICATION_PREFIX, PASSWORD_RESET_PREFIX, REFRESH_TOKEN_PREFIX,
};
use arches_auth::throttle::normalize_account_key;
use arches_auth::totp::{self, TotpSecret};
use arches_core::identity::{
    Join, OneTimeTokenRecord, OrgRecord, RefreshOutcome, RefreshTokenRecord, Role, SessionRecord,
    TokenPurpose, UserRecord,
};
use arches_core::ports::StoreError;
use arches_core::{OrgId, SessionId, Timestamp, UserId};
use axum::extract::State;
use axum::http::header::USER_AGENT;
use axum::http::{Extensions, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{OpenApi, ToSchema};

use crate::api::{rfc3339, AuditTarget};
use crate::audit::AuditAction;
use crate::error::{ApiError, ApiJson, ErrorCode};
use crate::http::ClientIp;
use crate::principal::{Principal, PrincipalSlot};
use crate::state::{AppState, AuthServices};

/// The OpenAPI paths of this module.
#[derive(OpenApi)]
#[openapi(
    paths(
        signup,
        login,
        login_mfa,
        refresh,
        logout,
        verify_email,
        resend_verification,
        forgot_password,
        reset_password
    ),
    components(schemas(
        SignupRequest,
        LoginRequest,
        MfaRequest,
        RefreshRequest,
        VerifyEmailRequest,
        ForgotPasswordRequest,
        ResetPasswordRequest,
        TokenResponse,
        VerificationRequired,
        UserView,
        OrgView,
        Accepted
    ))
)]
pub struct AuthApi;

/// The routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/auth/signup", post(signup))
        .route("/api/v1/auth/login", post(login))
        .route("/api/v1/auth/login/mfa", post(login_mfa))
        .route("/api/v1/auth/refresh", post(refresh))
        .route("/api/v1/auth/logout", post(logout))
        .route("/api/v1/auth/verify-email", post(verify_email))
        .route(
            "/api/v1/auth/verify-email/resend",
            post(resend_verification),
        )
        .route("/api/v1/auth/password/forgot", post(forgot_password))
        .route("/api/v1/auth/password/reset", post(reset_password))
}

/// How long an email-verification link is valid: 24 hours.
pub const EMAIL_VERIFICATION_TTL_SECS: u64 = 24 * 60 * 60;
/// How long a password-reset link is valid: 1 hour.
pub const PASSWORD_RESET_TTL_SECS: u64 = 60 * 60;
/// How long the second step of a login may wait: 5 minutes.
pub const MFA_CHALLENGE_TTL_SECS: u64 = 5 * 60;
/// The prefix of MFA challenge tokens.
const MFA_CHALLENGE_PREFIX: &str = "amf";
/// The longest `User-Agent` kept with a session, in bytes.
const USER_AGENT_BYTES_MAX: usize = 512;
/// The longest display name, in characters.
pub(crate) const DISPLAY_NAME_CHARS_MAX: usize = 100;
/// The longest email address, in bytes (RFC 5321).
const EMAIL_BYTES_MAX: usize = 254;

// ---------------------------------------------------------------------------------------
// Views shared with the account and org modules.

/// A user account as shown to its owner.
#[derive(Debug, Serialize, ToSchema)]
pub struct UserView {
    /// The user id.
    pub id: String,
    /// The email, lowercased.
    pub email: String,
    /// The name shown in the UI.
    pub display_name: String,
    /// Whether the email address is verified.
    pub email_verified: bool,
    /// Whether login needs a TOTP code.
    pub totp_enabled: bool,
    /// When the account was created (RFC 3339).
    pub created_at: String,
}

impl From<&UserRecord> for UserView {
    fn from(user: &UserRecord) -> Self {
        UserView {
            id: user.id.to_string(),
            email: user.email.clone(),
            display_name: user.display_name.clone(),
            email_verified: user.email_verified_at.is_some(),
            totp_enabled: user.totp_enabled_at.is_some(),
            created_at: rfc3339(user.created_at),
        }
    }
}

/// An organization.
#[derive(Debug, Serialize, ToSchema)]
pub struct OrgView {
    /// The org id.
    pub id: String,
    /// The unique short name.
    pub slug: String,
    /// The display name.
    pub name: String,
    /// When it was created (RFC 3339).
    pub created_at: String,
}

impl From<&OrgRecord> for OrgView {
    fn from(org: &OrgRecord) -> Self {
        OrgView {
            id: org.id.to_string(),
            slug: org.slug.clone(),
            name: org.name.clone(),
            created_at: rfc3339(org.created_at),
        }
    }
}

/// The tokens of a new or refreshed session.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenResponse {
    /// A short-lived JWT to send as `Authorization: Bearer …`.
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: &'static str,
    /// Seconds until the access token expires.
    pub expires_in: u64,
    /// The single-use token that gets the next access token (`POST /api/v1/auth/refresh`).
    pub refresh_token: String,
    /// The user.
    pub user: UserView,
    /// The org the session acts in.
    pub org: OrgView,
    /// The user's role there.
    pub role: String,
}

/// The answer to a sign-up when the email must be verified before logging in.
#[derive(Debug, Serialize, ToSchema)]
pub struct VerificationRequired {
    /// Always `true`: follow the emailed link, then log in.
    pub verification_required: bool,
    /// The new account.
    pub user: UserView,
}

/// A request accepted for processing.
#[derive(Debug, Serialize, ToSchema)]
pub struct Accepted {
    /// Always `true`.
    pub accepted: bool,
}

// ---------------------------------------------------------------------------------------
// Requests.

/// A sign-up.
#[derive(Debug, Deserialize, ToSchema)]
pub struct SignupRequest {
    /// The email address (trimmed and lowercased).
    pub email: String,
    /// The password: 8 to 128 characters, not a common password, not the email.
    pub password: String,
    /// The name shown in the UI; defaults to the email's local part.
    #[serde(default)]
    pub display_name: Option<String>,
}

/// A login.
#[derive(Debug, Deserialize, ToSchema)]
pub struct LoginRequest {
    /// The email address.
    pub email: String,
    /// The password.
    pub password: String,
    /// The org to act in; defaults to the first org of the user.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub org_id: Option<OrgId>,
}

/// The second step of a login: the challenge token and a TOTP or recovery code.
#[derive(Debug, Deserialize, ToSchema)]
pub struct MfaRequest {
    /// `details.mfa_token` of the `mfa_required` answer.
    pub mfa_token: String,
    /// The 6-digit code of the authenticator app.
    #[serde(default)]
    pub code: Option<String>,
    /// One of the recovery codes (each works once).
    #[serde(default)]
    pub recovery_code: Option<String>,
    /// The org to act in; defaults to the first org of the user.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub org_id: Option<OrgId>,
}

/// A refresh.
#[derive(Debug, Deserialize, ToSchema)]
pub struct RefreshRequest {
    /// The current refresh token; it is used up by this request.
    pub refresh_token: String,
}

/// An email verification.
#[derive(Debug, Deserialize, ToSchema)]
pub struct VerifyEmailRequest {
    /// The token of the emailed link.
    pub token: String,
}

/// A password-reset request.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ForgotPasswordRequest {
    /// The account's email address.
    pub email: String,
}

/// A password reset.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ResetPasswordRequest {
    /// The token of the emailed link.
    pub token: String,
    /// The new password.
    pub new_password: String,
}

// ---------------------------------------------------------------------------------------
// Helpers shared with the account and org modules.

/// `now + secs`.
pub(crate) fn after_secs(now: Timestamp, secs: u64) -> Timestamp {
    now.plus(std::time::Duration::from_secs(secs))
}

/// An email address as stored: trimmed and lowercased, with one `@` between non-empty
/// parts.
///
/// # Errors
/// 422 with `details.field = "email"`.
pub(crate) fn normalize_email(text: &str) -> Result<String, ApiError> {
    let email = normalize_account_key(text);
    let valid = email.len() <= EMAIL_BYTES_MAX
        && !email.chars().any(|c| c.is_whitespace() || c.is_control())
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty() && !domain.is_empty() && !domain.contains('@')
        });
    if valid {
        Ok(email)
    } else {
        Err(field_error(
            "email",
            "must be an email address such as ada@example.com",
        ))
    }
}

/// 422 `validation_failed` naming the field and the reason.
pub(crate) fn field_error(field: &str, reason: impl Into<String>) -> ApiError {
    let reason = reason.into();
    ApiError::new(ErrorCode::ValidationFailed, format!("{field}: {reason}"))
        .with_details(json!({ "field": field, "reason": reason }))
}

/// A display name: trimmed, 1 to 100 characters, no control characters.
pub(crate) fn check_display_name(text: &str) -> Result<String, ApiError> {
    let name = text.trim();
    if name.is_empty() || name.chars().count() > DISPLAY_NAME_CHARS_MAX {
        return Err(field_error(
            "display_name",
            format!("must have 1 to {DISPLAY_NAME_CHARS_MAX} characters"),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(field_error(
            "display_name",
            "must not contain control characters",
        ));
    }
    Ok(name.to_owned())
}

/// Runs CPU-heavy auth work off the async executor.
pub(crate) async fn blocking<T: Send + 'static>(
    state: &AppState,
    work: impl FnOnce(&AuthServices) -> T + Send + 'static,
) -> Result<T, ApiError> {
    let auth: Arc<AuthServices> = state.auth.clone();
    tokio::task::spawn_blocking(move || work(&auth))
        .await
        .map_err(ApiError::internal)
}

/// Checks a new password against the policy (context: the email) and hashes it.
///
/// # Errors
/// 422 with `details.field = field` and the policy's reason.
pub(crate) async fn check_and_hash(
    state: &AppState,
    field: &'static str,
    password: String,
    email: String,
) -> Result<String, ApiError> {
    blocking(state, move |auth| {
        auth.policy
            .check(&password, &[email.as_str()])
            .map_err(|e| field_error(field, e.to_string()))?;
        auth.hasher.hash(&password).map_err(|e| match e {
            arches_auth::AuthError::PasswordTooLong { .. } => field_error(field, e.to_string()),
            other => ApiError::internal(other),
        })
    })
    .await?
}

/// Whether `password` matches the user's hash (false for a malformed hash, which is logged).
pub(crate) async fn password_matches(
    state: &AppState,
    password: String,
    user: &UserRecord,
) -> Result<bool, ApiError> {
    let phc = user.password_hash.clone();
    let id = user.id;
    blocking(state, move |auth| {
        match auth.hasher.verify(&password, &phc) {
            Ok(matches) => matches,
            Err(error) => {
                tracing::warn!(user = %id, %error, "password verification failed");
                false
            }
        }
    })
    .await
}

/// Records the authenticated actor of a request whose caller was anonymous (login,
/// sign-up, refresh) or acted in another org, so that its audit event names them.
pub(crate) fn record_actor(extensions: &Extensions, principal: Principal) {
    if let Some(slot) = extensions.get::<PrincipalSlot>() {
        *slot.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(principal);
    }
}

/// The session-bound principal, or 400 for an API key.
pub(crate) fn require_session(principal: &Principal) -> Result<SessionId, ApiError> {
    principal
        .session_id
        .ok_or_else(|| ApiError::bad_request("this endpoint needs a login session, not an API key"))
}

/// Issues an access token for a session.
pub(crate) fn issue_access(
    state: &AppState,
    user: UserId,
    org: OrgId,
    role: Role,
    session: SessionId,
    now: Timestamp,
) -> Result<String, ApiError> {
    state
        .auth
        .tokens
        .issue(
            &AccessSubject {
                user_id: user.to_string(),
                org_id: org.to_string(),
                role: role.to_string(),
                session_id: session.to_string(),
            },
            now,
        )
        .map_err(ApiError::internal)
}

/// The user's `User-Agent`, cut to 512 bytes on a character boundary.
fn user_agent(headers: &HeaderMap) -> Option<String> {
    let text = headers.get(USER_AGENT)?.to_str().ok()?;
    let mut end = text.len().min(USER_AGENT_BYTES_MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Some(text[..end].to_owned())
}

/// Sends a message in the background: a slow or failing mail server neither delays the
/// answer nor changes it. Failures are logged (without the message body).
pub(crate) fn send_mail(state: &AppState, message: MailMessage) {
    let mailer = state.auth.mailer.clone();
    tokio::spawn(async move {
        if let Err(error) = mailer.send(&message).await {
            tracing::warn!(%error, subject = %message.subject, "could not send mail");
        }
    });
}

/// Creates a one-time token for `user` and returns its plaintext.
async fn one_time_token(
    state: &AppState,
    user: UserId,
    purpose: TokenPurpose,
    prefix: &str,
    ttl_secs: u64,
) -> Result<String, ApiError> {
    let now = state.clock.now();
    let token = opaque::generate(prefix);
    state
        .identity
        .create_one_time_token(&OneTimeTokenRecord {
            hash: token.hash,
            user_id: user,
            purpose,
            created_at: now,
            expires_at: after_secs(now, ttl_secs),
            used_at: None,
        })
        .await?;
    Ok(token.plaintext)
}

/// Mails an email-verification link to the user.
pub(crate) async fn send_verification(state: &AppState, user: &UserRecord) -> Result<(), ApiError> {
    let token = one_time_token(
        state,
        user.id,
        TokenPurpose::EmailVerification,
        EMAIL_VERIFICATION_PREFIX,
        EMAIL_VERIFICATION_TTL_SECS,
    )
    .await?;
    let link = format!("{}/verify-email?token={token}", state.config.public_url);
    send_mail(
        state,
        MailMessage {
            to: user.email.clone(),
            subject: "Verify your email address for Arches".to_owned(),
            text_body: format!(
                "Hello {},\n\nConfirm your email address by opening this link within 24 hours:\n\n{link}\n\nIf you did not create an Arches account, ignore this message.\n",
                user.display_name
            ),
        },
    );
    Ok(())
}

/// Starts a session for a user who proved who they are: picks the org (the requested one if
/// a member, else the first), stores the session and its first refresh token, and issues
/// the tokens.
async fn start_session(
    state: &AppState,
    user: &UserRecord,
    requested: Option<OrgId>,
    headers: &HeaderMap,
    ip: &str,
) -> Result<(TokenResponse, Principal), ApiError> {
    let now = state.clock.now();
    let orgs = state.identity.orgs_of_user(user.id).await?;
    let (org, role) = requested
        .and_then(|id| orgs.iter().find(|(org, _)| org.id == id))
        .or_else(|| orgs.first())
        .cloned()
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::Forbidden,
                "the account belongs to no organization; ask for an invitation",
            )
        })?;
    let session = SessionRecord {
        id: SessionId::new(),
        user_id: user.id,
        org_id: org.id,
        user_agent: user_agent(headers),
        ip: Some(ip.to_owned()),
        last_ip: Some(ip.to_owned()),
        created_at: now,
        last_seen_at: now,
        expires_at: after_secs(now, state.config.auth.refresh_ttl_secs),
        revoked_at: None,
        revoked_reason: None,
    };
    let refresh = opaque::generate(REFRESH_TOKEN_PREFIX);
    state
        .identity
        .create_session(
            &session,
            &RefreshTokenRecord {
                hash: refresh.hash,
                session_id: session.id,
                created_at: now,
                used_at: None,
            },
        )
        .await?;
    let access = issue_access(state, user.id, org.id, role, session.id, now)?;
    let principal = Principal {
        user_id: user.id,
        org_id: org.id,
        role,
        session_id: Some(session.id),
        api_key_id: None,
    };
    Ok((
        TokenResponse {
            access_token: access,
            token_type: "Bearer",
            expires_in: state.auth.tokens.ttl_seconds(),
            refresh_token: refresh.plaintext,
            user: UserView::from(user),
            org: OrgView::from(&org),
            role: role.to_string(),
        },
        principal,
    ))
}

/// A slug from the email's local part and a short random suffix.
pub(crate) fn personal_slug(base: &str) -> String {
    let mut slug: String = base
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    slug = slug
        .split('-')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("-");
    slug.truncate(40);
    let slug = slug.trim_end_matches('-');
    let suffix: String = uuid::Uuid::new_v4().simple().to_string()[..6].to_owned();
    if slug.is_empty() {
        format!("org-{suffix}")
    } else {
        format!("{slug}-{suffix}")
    }
}

fn conflict_to_exists(error: StoreError) -> ApiError {
    match error {
        StoreError::Conflict(_) => {
            ApiError::conflict("an account with this email exists").with_detail("field", "email")
        }
        other => other.into(),
    }
}

// ---------------------------------------------------------------------------------------
// Handlers.

/// Creates an account. Single-tenant: the first account becomes the owner of the default
/// org, later ones join it as viewers. Multi-tenant: the account gets a personal org it
/// owns. A verification link is emailed. Answers the login tokens, or
/// `{verification_required: true}` when the server requires a verified email first.
#[utoipa::path(post, path = "/api/v1/auth/signup", tag = "auth", security(),
    request_body = SignupRequest,
    responses(
        (status = 201, body = TokenResponse, description = "Signed up and logged in"),
        (status = 201, body = VerificationRequired, description = "Signed up; verify the email to log in"),
        (status = 409, body = crate::error::ApiErrorBody, description = "The email has an account"),
        (status = 422, body = crate::error::ApiErrorBody, description = "Bad email, name or password (details.field)")))]
pub async fn signup(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    extensions: Extensions,
    headers: HeaderMap,
    ApiJson(body): ApiJson<SignupRequest>,
) -> Result<Response, ApiError> {
    let email = normalize_email(&body.email)?;
    let local = email.split('@').next().unwrap_or_default().to_owned();
    let display_name = check_display_name(body.display_name.as_deref().unwrap_or(&local))?;
    let password_hash = check_and_hash(&state, "password", body.password, email.clone()).await?;
    let now = state.clock.now();
    let user = UserRecord {
        id: UserId::new(),
        email,
        display_name,
        password_hash,
        email_verified_at: None,
        totp_secret: None,
        totp_enabled_at: None,
        totp_last_step: None,
        created_at: now,
        disabled_at: None,
    };
    if state.config.multi_tenant {
        state
            .identity
            .create_user(&user, None)
            .await
            .map_err(conflict_to_exists)?;
        let mut attempts = 0;
        loop {
            let org = OrgRecord {
                id: OrgId::new(),
                slug: personal_slug(&local),
                name: format!("{}'s organization", user.display_name),
                created_at: now,
            };
            match state.identity.create_org(&org, user.id).await {
                Ok(()) => break,
                Err(StoreError::Conflict(_)) if attempts < 3 => attempts += 1,
                Err(error) => return Err(error.into()),
            }
        }
    } else {
        state
            .identity
            .create_user(
                &user,
                Some(Join {
                    org_id: OrgId::DEFAULT,
                    role: Role::Viewer,
                    owner_if_first: true,
                }),
            )
            .await
            .map_err(conflict_to_exists)?;
    }
    if let Err(error) = send_verification(&state, &user).await {
        tracing::warn!(user = %user.id, %error, "could not send the verification mail");
    }
    let target = AuditTarget::new("user", user.id);
    if state.config.auth.require_email_verification {
        let action = AuditAction {
            action: "auth.signup",
            details: json!({ "user_id": user.id.to_string(), "verification_required": true }),
        };
        return Ok((
            StatusCode::CREATED,
            action,
            target,
            Json(VerificationRequired {
                verification_required: true,
                user: UserView::from(&user),
            }),
        )
            .into_response());
    }
    let (tokens, principal) = start_session(&state, &user, None, &headers, &ip.to_string()).await?;
    let action = AuditAction {
        action: "auth.signup",
        details: json!({ "user_id": user.id.to_string(), "role": tokens.role }),
    };
    record_actor(&extensions, principal);
    Ok((StatusCode::CREATED, action, target, Json(tokens)).into_response())
}

/// Logs in with email and password. Answers the same `invalid_credentials` for an unknown
/// email, a wrong password and a disabled account; `rate_limited` (with `Retry-After`)
/// after repeated failures; `mfa_required` with `details.mfa_token` when the account has
/// TOTP enabled (finish with `POST /api/v1/auth/login/mfa`).
#[utoipa::path(post, path = "/api/v1/auth/login", tag = "auth", security(),
    request_body = LoginRequest,
    responses(
        (status = 200, body = TokenResponse),
        (status = 401, body = crate::error::ApiErrorBody, description = "invalid_credentials, or mfa_required with details.mfa_token"),
        (status = 403, body = crate::error::ApiErrorBody, description = "The email is not verified yet"),
        (status = 429, body = crate::error::ApiErrorBody, description = "Too many failures; see Retry-After")))]
pub async fn login(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    extensions: Extensions,
    headers: HeaderMap,
    ApiJson(body): ApiJson<LoginRequest>,
) -> Result<Response, ApiError> {
    let key = normalize_account_key(&body.email);
    let ip = ip.to_string();
    let throttle = &state.auth.throttle;
    // One attempt per account at a time, so that the check below sees every earlier outcome.
    let _attempt = state.auth.attempts.of(&key).lock().await;
    throttle
        .check(&key, &ip, state.clock.now())
        .map_err(|t| ApiError::rate_limited(t.retry_after_secs))?;
    let user = state.identity.user_by_email(&key).await?;
    let password = body.password;
    let verified = match &user {
        Some(user) => {
            // A disabled account spends the same work and answers the same.
            let matches = password_matches(&state, password.clone(), user).await?;
            matches && user.disabled_at.is_none()
        }
        None => {
            let password = password.clone();
            blocking(&state, move |auth| auth.hasher.verify_dummy(&password)).await?;
            false
        }
    };
    let now = state.clock.now();
    let user = match (verified, user) {
        (true, Some(user)) => user,
        _ => {
            throttle.record_failure(&key, &ip, now);
            return Err(ApiError::invalid_credentials());
        }
    };
    throttle.record_success(&key, &ip, now);
    let user = rehash_if_needed(&state, user, password).await;
    if state.config.auth.require_email_verification && user.email_verified_at.is_none() {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "verify your email address first: follow the link we emailed you",
        )
        .with_detail("reason", "email_unverified"));
    }
    if user.totp_enabled_at.is_some() {
        let token = one_time_token(
            &state,
            user.id,
            TokenPurpose::MfaChallenge,
            MFA_CHALLENGE_PREFIX,
            MFA_CHALLENGE_TTL_SECS,
        )
        .await?;
        return Err(ApiError::mfa_required()
            .with_detail("mfa_token", token)
            .with_detail("expires_in", MFA_CHALLENGE_TTL_SECS));
    }
    let (tokens, principal) = start_session(&state, &user, body.org_id, &headers, &ip).await?;
    let action = AuditAction {
        action: "auth.login",
        details: json!({ "user_id": user.id.to_string(), "mfa": false }),
    };
    record_actor(&extensions, principal);
    Ok((action, AuditTarget::new("user", user.id), Json(tokens)).into_response())
}

/// Replaces a hash made with weaker parameters than the hasher's, after a successful
/// login; a failure is logged and the login goes on.
async fn rehash_if_needed(state: &AppState, mut user: UserRecord, password: String) -> UserRecord {
    if !state.auth.hasher.needs_rehash(&user.password_hash) {
        return user;
    }
    match blocking(state, move |auth| auth.hasher.hash(&password)).await {
        Ok(Ok(hash)) => {
            let previous = std::mem::replace(&mut user.password_hash, hash);
            if let Err(error) = state.identity.update_user(&user).await {
                tracing::warn!(user = %user.id, %error, "could not store the rehashed password");
                user.password_hash = previous;
            }
        }
        Ok(Err(error)) => tracing::warn!(user = %user.id, %error, "could not rehash the password"),
        Err(error) => tracing::warn!(user = %user.id, %error, "could not rehash the password"),
    }
    user
}

/// Finishes a login whose account has TOTP enabled, with the challenge token and either a
/// TOTP code or a recovery code. A wrong code answers `invalid_credentials` with a fresh
/// `details.mfa_token`; failures count towards the login throttle.
#[utoipa::path(post, path = "/api/v1/auth/login/mfa", tag = "auth", security(),
    request_body = MfaRequest,
    responses(
        (status = 200, body = TokenResponse),
        (status = 401, body = crate::error::ApiErrorBody, description = "Invalid or expired challenge, or a wrong code"),
        (status = 429, body = crate::error::ApiErrorBody)))]
pub async fn login_mfa(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    extensions: Extensions,
    headers: HeaderMap,
    ApiJson(body): ApiJson<MfaRequest>,
) -> Result<Response, ApiError> {
    let ip = ip.to_string();
    if body.code.is_none() && body.recovery_code.is_none() {
        return Err(field_error("code", "give code or recovery_code"));
    }
    let now = state.clock.now();
    let challenge = state
        .identity
        .consume_one_time_token(
            &opaque::hash_token(&body.mfa_token),
            TokenPurpose::MfaChallenge,
            now,
        )
        .await?
        .ok_or_else(|| {
            ApiError::unauthenticated(
                "the sign-in challenge is invalid or has expired; log in again",
            )
        })?;
    let user = state
        .identity
        .user(challenge.user_id)
        .await?
        .filter(|u| u.disabled_at.is_none() && u.totp_enabled_at.is_some())
        .ok_or_else(ApiError::invalid_credentials)?;
    let key = normalize_account_key(&user.email);
    let throttle = &state.auth.throttle;
    let _attempt = state.auth.attempts.of(&key).lock().await;
    throttle
        .check(&key, &ip, now)
        .map_err(|t| ApiError::rate_limited(t.retry_after_secs))?;
    let method;
    let passed = if let Some(code) = &body.code {
        method = "totp";
        check_totp(&state, &user, code, now).await?
    } else {
        method = "recovery_code";
        let code = body.recovery_code.as_deref().unwrap_or_default();
        state
            .identity
            .consume_recovery_code(user.id, &totp::hash_recovery_code(code), now)
            .await?
    };
    if !passed {
        throttle.record_failure(&key, &ip, now);
        let token = one_time_token(
            &state,
            user.id,
            TokenPurpose::MfaChallenge,
            MFA_CHALLENGE_PREFIX,
            MFA_CHALLENGE_TTL_SECS,
        )
        .await?;
        return Err(ApiError::new(
            ErrorCode::InvalidCredentials,
            "invalid or already used code",
        )
        .with_detail("mfa_token", token));
    }
    throttle.record_success(&key, &ip, now);
    let (tokens, principal) = start_session(&state, &user, body.org_id, &headers, &ip).await?;
    let action = AuditAction {
        action: "auth.login",
        details: json!({ "user_id": user.id.to_string(), "mfa": method }),
    };
    record_actor(&extensions, principal);
    Ok((action, AuditTarget::new("user", user.id), Json(tokens)).into_response())
}

/// Checks a TOTP code of an enrolled user and records its step, so it works once.
pub(crate) async fn check_totp(
    state: &AppState,
    user: &UserRecord,
    code: &str,
    now: Timestamp,
) -> Result<bool, ApiError> {
    let Some(secret) = user.totp_secret.as_deref() else {
        return Ok(false);
    };
    let secret = TotpSecret::from_base32(secret).map_err(ApiError::internal)?;
    match totp::verify(&secret, code, now, user.totp_last_step) {
        Ok(step) => Ok(state.identity.advance_totp_step(user.id, step).await?),
        Err(_) => Ok(false),
    }
}

/// Exchanges a refresh token for a new access token and a new refresh token. Each refresh
/// token works once: presenting a used one revokes the whole session (it was stolen or
/// leaked) and answers 401.
#[utoipa::path(post, path = "/api/v1/auth/refresh", tag = "auth", security(),
    request_body = RefreshRequest,
    responses((status = 200, body = TokenResponse), (status = 401, body = crate::error::ApiErrorBody)))]
pub async fn refresh(
    State(state): State<AppState>,
    extensions: Extensions,
    ApiJson(body): ApiJson<RefreshRequest>,
) -> Result<Response, ApiError> {
    let now = state.clock.now();
    let next = opaque::generate(REFRESH_TOKEN_PREFIX);
    let refused = || ApiError::unauthenticated("the refresh token is invalid, used or expired");
    let outcome = state
        .identity
        .rotate_refresh_token(&opaque::hash_token(&body.refresh_token), &next.hash, now)
        .await?;
    let session = match outcome {
        RefreshOutcome::Rotated(session) => session,
        RefreshOutcome::Reused(session) => {
            tracing::warn!(%session, "refresh token reused: the session is revoked");
            return Err(refused());
        }
        RefreshOutcome::Inactive(session) => {
            tracing::debug!(%session, "refresh of an inactive session");
            return Err(refused());
        }
        RefreshOutcome::Unknown => return Err(refused()),
    };
    let user = state
        .identity
        .user(session.user_id)
        .await?
        .filter(|u| u.disabled_at.is_none())
        .ok_or_else(refused)?;
    let membership = state
        .identity
        .membership(session.org_id, session.user_id)
        .await?
        .ok_or_else(refused)?;
    let org = state
        .identity
        .org(session.org_id)
        .await?
        .ok_or_else(refused)?;
    let access = issue_access(&state, user.id, org.id, membership.role, session.id, now)?;
    record_actor(
        &extensions,
        Principal {
            user_id: user.id,
            org_id: org.id,
            role: membership.role,
            session_id: Some(session.id),
            api_key_id: None,
        },
    );
    let action = AuditAction {
        action: "auth.refresh",
        details: json!({ "session_id": session.id.to_string() }),
    };
    Ok((
        action,
        AuditTarget::new("session", session.id),
        Json(TokenResponse {
            access_token: access,
            token_type: "Bearer",
            expires_in: state.auth.tokens.ttl_seconds(),
            refresh_token: next.plaintext,
            user: UserView::from(&user),
            org: OrgView::from(&org),
            role: membership.role.to_string(),
        }),
    )
        .into_response())
}

/// Logs out: revokes the current session, so its access and refresh tokens stop working at
/// once. Not for API keys (revoke the key instead).
#[utoipa::path(post, path = "/api/v1/auth/logout", tag = "auth",
    responses((status = 204, description = "Logged out"), (status = 400, body = crate::error::ApiErrorBody),
        (status = 401, body = crate::error::ApiErrorBody)))]
pub async fn logout(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Response, ApiError> {
    let session = principal.session_id.ok_or_else(|| {
        ApiError::bad_request("an API key has no session to log out of; revoke the key instead")
    })?;
    state
        .identity
        .revoke_session(principal.user_id, session, state.clock.now(), "logout")
        .await?;
    let action = AuditAction {
        action: "auth.logout",
        details: json!({ "session_id": session.to_string() }),
    };
    Ok((
        StatusCode::NO_CONTENT,
        action,
        AuditTarget::new("session", session),
        (),
    )
        .into_response())
}

/// Verifies the account's email address with the token of the emailed link.
#[utoipa::path(post, path = "/api/v1/auth/verify-email", tag = "auth", security(),
    request_body = VerifyEmailRequest,
    responses((status = 200, body = UserView), (status = 410, body = crate::error::ApiErrorBody, description = "Invalid, used or expired link")))]
pub async fn verify_email(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<VerifyEmailRequest>,
) -> Result<Response, ApiError> {
    let now = state.clock.now();
    let token = state
        .identity
        .consume_one_time_token(
            &opaque::hash_token(&body.token),
            TokenPurpose::EmailVerification,
            now,
        )
        .await?
        .ok_or_else(|| ApiError::gone("the verification link is invalid, used or expired"))?;
    let mut user = state
        .identity
        .user(token.user_id)
        .await?
        .ok_or_else(|| ApiError::gone("the verification link is invalid, used or expired"))?;
    if user.email_verified_at.is_none() {
        user.email_verified_at = Some(now);
        state.identity.update_user(&user).await?;
    }
    let action = AuditAction {
        action: "auth.verify_email",
        details: json!({ "user_id": user.id.to_string() }),
    };
    Ok((
        action,
        AuditTarget::new("user", user.id),
        Json(UserView::from(&user)),
    )
        .into_response())
}

/// Emails a new verification link to the calling user.
#[utoipa::path(post, path = "/api/v1/auth/verify-email/resend", tag = "auth",
    responses((status = 202, body = Accepted), (status = 409, body = crate::error::ApiErrorBody, description = "Already verified")))]
pub async fn resend_verification(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Response, ApiError> {
    let user = state
        .identity
        .user(principal.user_id)
        .await?
        .ok_or_else(|| ApiError::not_found("user", principal.user_id))?;
    if user.email_verified_at.is_some() {
        return Err(ApiError::conflict("the email address is already verified"));
    }
    send_verification(&state, &user).await?;
    Ok((StatusCode::ACCEPTED, Json(Accepted { accepted: true })).into_response())
}

/// Asks for a password-reset link. Always answers 202, whether or not an account has this
/// email; if one has, a link valid for one hour is emailed.
#[utoipa::path(post, path = "/api/v1/auth/password/forgot", tag = "auth", security(),
    request_body = ForgotPasswordRequest,
    responses((status = 202, body = Accepted)))]
pub async fn forgot_password(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<ForgotPasswordRequest>,
) -> Result<Response, ApiError> {
    let email = normalize_account_key(&body.email);
    // In the background: the answer's timing must not depend on whether the account
    // exists.
    let background = state.clone();
    tokio::spawn(async move {
        let state = background;
        let user = match state.identity.user_by_email(&email).await {
            Ok(Some(user)) if user.disabled_at.is_none() => user,
            Ok(_) => return,
            Err(error) => {
                tracing::warn!(%error, "password reset: could not read the account");
                return;
            }
        };
        let token = match one_time_token(
            &state,
            user.id,
            TokenPurpose::PasswordReset,
            PASSWORD_RESET_PREFIX,
            PASSWORD_RESET_TTL_SECS,
        )
        .await
        {
            Ok(token) => token,
            Err(error) => {
                tracing::warn!(%error, "password reset: could not store the token");
                return;
            }
        };
        let link = format!("{}/reset-password?token={token}", state.config.public_url);
        send_mail(
            &state,
            MailMessage {
                to: user.email.clone(),
                subject: "Reset your Arches password".to_owned(),
                text_body: format!(
                    "Hello {},\n\nSet a new password by opening this link within one hour:\n\n{link}\n\nIf you did not ask for this, ignore this message: your password is unchanged.\n",
                    user.display_name
                ),
            },
        );
    });
    Ok((StatusCode::ACCEPTED, Json(Accepted { accepted: true })).into_response())
}

/// Sets a new password with the token of a reset link, and signs the account out
/// everywhere (every session is revoked).
#[utoipa::path(post, path = "/api/v1/auth/password/reset", tag = "auth", security(),
    request_body = ResetPasswordRequest,
    responses((status = 204, description = "Password changed"),
        (status = 410, body = crate::error::ApiErrorBody, description = "Invalid, used or expired link"),
        (status = 422, body = crate::error::ApiErrorBody, description = "Password refused (details.field)")))]
pub async fn reset_password(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<ResetPasswordRequest>,
) -> Result<Response, ApiError> {
    // The rules that need no account first, so a refused password does not use up the link.
    let candidate = body.new_password.clone();
    blocking(&state, move |auth| auth.policy.check(&candidate, &[]))
        .await?
        .map_err(|e| field_error("new_password", e.to_string()))?;
    let now = state.clock.now();
    let gone = || ApiError::gone("the reset link is invalid, used or expired");
    let token = state
        .identity
        .consume_one_time_token(
            &opaque::hash_token(&body.token),
            TokenPurpose::PasswordReset,
            now,
        )
        .await?
        .ok_or_else(gone)?;
    let mut user = state.identity.user(token.user_id).await?.ok_or_else(gone)?;
    user.password_hash = check_and_hash(
        &state,
        "new_password",
        body.new_password,
        user.email.clone(),
    )
    .await?;
    // Following the emailed link proves the address too.
    user.email_verified_at.get_or_insert(now);
    state.identity.update_user(&user).await?;
    let revoked = state
        .identity
        .revoke_sessions_of_user(user.id, None, now, "password_reset")
        .await?;
    state
        .auth
        .throttle
        .record_success(&normalize_account_key(&user.email), "", now);
    let action = AuditAction {
        action: "auth.password_reset",
        details: json!({ "user_id": user.id.to_string(), "sessions_revoked": revoked }),
    };
    Ok((
        StatusCode::NO_CONTENT,
        action,
        AuditTarget::new("user", user.id),
        (),
    )
        .into_response())
}
