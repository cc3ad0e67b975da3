//! The calling user's account: profile, password, login sessions, personal API keys and
//! two-factor authentication (TOTP with recovery codes).

use arches_auth::opaque::generate_api_key;
use arches_auth::throttle::normalize_account_key;
use arches_auth::totp::{self, TotpSecret};
use arches_core::identity::{ApiKeyRecord, Role, SessionRecord, UserRecord};
use arches_core::{ApiKeyId, OrgId, SessionId};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{OpenApi, ToSchema};

use crate::api::auth::{
    after_secs, blocking, check_and_hash, check_display_name, check_totp, field_error,
    password_matches, require_session, OrgView, UserView,
};
use crate::api::{rfc3339, AuditTarget};
use crate::audit::AuditAction;
use crate::error::{ApiError, ApiJson, ApiPath, ErrorCode};
use crate::http::ClientIp;
use crate::principal::Principal;
use crate::state::AppState;

/// The OpenAPI paths of this module.
#[derive(OpenApi)]
#[openapi(
    paths(
        get_account,
        update_account,
        change_password,
        list_sessions,
        revoke_session,
        revoke_other_sessions,
        create_api_key,
        list_api_keys,
        revoke_api_key,
        totp_enroll,
        totp_confirm,
        totp_disable
    ),
    components(schemas(
        AccountView,
        Membership,
        UpdateAccount,
        ChangePassword,
        SessionView,
        Revoked,
        CreateApiKey,
        CreatedApiKey,
        ApiKeyView,
        TotpEnrollment,
        TotpConfirm,
        RecoveryCodes,
        TotpDisable
    ))
)]
pub struct AccountApi;

/// The routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/account", get(get_account).patch(update_account))
        .route("/api/v1/account/password", post(change_password))
        .route("/api/v1/account/sessions", get(list_sessions))
        .route("/api/v1/account/sessions/{id}", delete(revoke_session))
        .route(
            "/api/v1/account/sessions/revoke-others",
            post(revoke_other_sessions),
        )
        .route(
            "/api/v1/account/api-keys",
            get(list_api_keys).post(create_api_key),
        )
        .route("/api/v1/account/api-keys/{id}", delete(revoke_api_key))
        .route("/api/v1/account/totp/enroll", post(totp_enroll))
        .route("/api/v1/account/totp/confirm", post(totp_confirm))
        .route("/api/v1/account/totp/disable", post(totp_disable))
}

/// The issuer shown by authenticator apps.
const TOTP_ISSUER: &str = "Arches";
/// The longest API key name, in characters.
const KEY_NAME_CHARS_MAX: usize = 100;
/// The longest API key lifetime, in days.
const KEY_DAYS_MAX: u32 = 3650;

/// A membership of the calling user.
#[derive(Debug, Serialize, ToSchema)]
pub struct Membership {
    /// The org.
    pub org: OrgView,
    /// The user's role there.
    pub role: String,
}

/// The calling user, their orgs, and the org and role the request acts with.
#[derive(Debug, Serialize, ToSchema)]
pub struct AccountView {
    /// The user.
    pub user: UserView,
    /// Every org the user belongs to, with the role there.
    pub orgs: Vec<Membership>,
    /// The org the request acts in.
    pub current_org: Option<OrgView>,
    /// The effective role there (for an API key, the lower of the key's and the user's).
    pub role: String,
    /// The login session of the request, if authenticated by an access token.
    pub session_id: Option<String>,
    /// The API key of the request, if authenticated by one.
    pub api_key_id: Option<String>,
    /// How many unused recovery codes are left (when TOTP is enabled).
    pub recovery_codes_left: Option<u32>,
}

/// A profile change.
#[derive(Debug, Deserialize, ToSchema)]
pub struct UpdateAccount {
    /// The new display name.
    pub display_name: String,
}

/// A password change.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ChangePassword {
    /// The current password.
    pub current_password: String,
    /// The new password.
    pub new_password: String,
}

/// A login session.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionView {
    /// The session id.
    pub id: String,
    /// The org the session acts in.
    pub org_id: String,
    /// The device's `User-Agent`.
    pub user_agent: Option<String>,
    /// The IP address at login.
    pub ip: Option<String>,
    /// The IP address of the last request.
    pub last_ip: Option<String>,
    /// When the user logged in (RFC 3339).
    pub created_at: String,
    /// When the session was last used (RFC 3339).
    pub last_seen_at: String,
    /// When the session ends whatever happens (RFC 3339).
    pub expires_at: String,
    /// Whether this is the session of the request.
    pub current: bool,
}

impl SessionView {
    fn new(session: &SessionRecord, current: Option<SessionId>) -> Self {
        SessionView {
            id: session.id.to_string(),
            org_id: session.org_id.to_string(),
            user_agent: session.user_agent.clone(),
            ip: session.ip.clone(),
            last_ip: session.last_ip.clone(),
            created_at: rfc3339(session.created_at),
            last_seen_at: rfc3339(session.last_seen_at),
            expires_at: rfc3339(session.expires_at),
            current: current == Some(session.id),
        }
    }
}

/// How many were revoked.
#[derive(Debug, Serialize, ToSchema)]
pub struct Revoked {
    /// The count.
    pub revoked: u32,
}

/// A new API key.
#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateApiKey {
    /// A label, 1 to 100 characters.
    pub name: String,
    /// The org the key acts in; defaults to the org of the request.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub org_id: Option<OrgId>,
    /// The key's role (`viewer`, `editor`, `admin`, `owner`), at most the user's role in the
    /// org; defaults to that role.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub role: Option<Role>,
    /// Days until the key stops working (1 to 3650); without it, it never expires.
    #[serde(default)]
    pub expires_in_days: Option<u32>,
}

/// An API key (never its secret).
#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyView {
    /// The key id (the visible part of the key, after `ak_`).
    pub id: String,
    /// The label.
    pub name: String,
    /// The org it acts in.
    pub org_id: String,
    /// Its role.
    pub role: String,
    /// When it was created (RFC 3339).
    pub created_at: String,
    /// When it stops working (RFC 3339), if ever.
    pub expires_at: Option<String>,
    /// When it was last used (RFC 3339).
    pub last_used_at: Option<String>,
    /// When it was revoked (RFC 3339).
    pub revoked_at: Option<String>,
}

impl From<&ApiKeyRecord> for ApiKeyView {
    fn from(key: &ApiKeyRecord) -> Self {
        ApiKeyView {
            id: key.id.to_string(),
            name: key.name.clone(),
            org_id: key.org_id.to_string(),
            role: key.role.to_string(),
            created_at: rfc3339(key.created_at),
            expires_at: key.expires_at.map(rfc3339),
            last_used_at: key.last_used_at.map(rfc3339),
            revoked_at: key.revoked_at.map(rfc3339),
        }
    }
}

/// A created API key with its secret, shown this once.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedApiKey {
    /// The whole key, `ak_…`: send it as `Authorization: Bearer …` or `X-API-Key`. It is
    /// not shown again.
    pub key: String,
    /// The key.
    #[serde(flatten)]
    pub api_key: ApiKeyView,
}

/// A started TOTP enrolment: show the QR code (or the secret) to the user's authenticator
/// app, then confirm with a code.
#[derive(Debug, Serialize, ToSchema)]
pub struct TotpEnrollment {
    /// The secret in base32, for typing into an app.
    pub secret: String,
    /// The `otpauth://` URI.
    pub otpauth_uri: String,
    /// The QR code of the URI, as a `data:image/png;base64,…` URI.
    pub qr_png: String,
}

/// A TOTP code.
#[derive(Debug, Deserialize, ToSchema)]
pub struct TotpConfirm {
    /// The 6-digit code shown by the app.
    pub code: String,
}

/// Recovery codes, shown this once.
#[derive(Debug, Serialize, ToSchema)]
pub struct RecoveryCodes {
    /// Each signs in once in place of a TOTP code.
    pub recovery_codes: Vec<String>,
}

/// Turning TOTP off.
#[derive(Debug, Deserialize, ToSchema)]
pub struct TotpDisable {
    /// The account password.
    pub password: String,
    /// A current TOTP code (or a recovery code).
    pub code: String,
}

async fn current_user(state: &AppState, principal: &Principal) -> Result<UserRecord, ApiError> {
    state
        .identity
        .user(principal.user_id)
        .await?
        .ok_or_else(|| ApiError::unauthenticated("missing, invalid or expired credentials"))
}

/// The calling user, their orgs and roles, and the org and role of the request.
#[utoipa::path(get, path = "/api/v1/account", tag = "account",
    responses((status = 200, body = AccountView), (status = 401, body = crate::error::ApiErrorBody)))]
pub async fn get_account(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Json<AccountView>, ApiError> {
    let user = current_user(&state, &principal).await?;
    let orgs = state.identity.orgs_of_user(user.id).await?;
    let current_org = orgs
        .iter()
        .find(|(org, _)| org.id == principal.org_id)
        .map(|(org, _)| OrgView::from(org));
    let recovery_codes_left = match user.totp_enabled_at {
        Some(_) => Some(state.identity.recovery_codes_left(user.id).await?),
        None => None,
    };
    Ok(Json(AccountView {
        user: UserView::from(&user),
        orgs: orgs
            .iter()
            .map(|(org, role)| Membership {
                org: OrgView::from(org),
                role: role.to_string(),
            })
            .collect(),
        current_org,
        role: principal.role.to_string(),
        session_id: principal.session_id.map(|s| s.to_string()),
        api_key_id: principal.api_key_id.map(|k| k.to_string()),
        recovery_codes_left,
    }))
}

/// Changes the display name.
#[utoipa::path(patch, path = "/api/v1/account", tag = "account", request_body = UpdateAccount,
    responses((status = 200, body = UserView), (status = 422, body = crate::error::ApiErrorBody)))]
pub async fn update_account(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(body): ApiJson<UpdateAccount>,
) -> Result<(AuditTarget, Json<UserView>), ApiError> {
    let name = check_display_name(&body.display_name)?;
    let mut user = current_user(&state, &principal).await?;
    user.display_name = name;
    state.identity.update_user(&user).await?;
    Ok((
        AuditTarget::new("user", user.id),
        Json(UserView::from(&user)),
    ))
}

/// Changes the password (the current one is required) and signs out every other session.
#[utoipa::path(post, path = "/api/v1/account/password", tag = "account", request_body = ChangePassword,
    responses((status = 204, description = "Changed"),
        (status = 422, body = crate::error::ApiErrorBody, description = "Wrong current password or refused new one (details.field)")))]
pub async fn change_password(
    State(state): State<AppState>,
    principal: Principal,
    ClientIp(ip): ClientIp,
    ApiJson(body): ApiJson<ChangePassword>,
) -> Result<Response, ApiError> {
    let session = require_session(&principal)?;
    let mut user = current_user(&state, &principal).await?;
    // Guessing the current password from a stolen session is throttled like a login.
    let key = normalize_account_key(&user.email);
    let ip = ip.to_string();
    let throttle = &state.auth.throttle;
    throttle
        .check(&key, &ip, state.clock.now())
        .map_err(|t| ApiError::rate_limited(t.retry_after_secs))?;
    if !password_matches(&state, body.current_password, &user).await? {
        throttle.record_failure(&key, &ip, state.clock.now());
        return Err(field_error(
            "current_password",
            "is not the current password",
        ));
    }
    user.password_hash = check_and_hash(
        &state,
        "new_password",
        body.new_password,
        user.email.clone(),
    )
    .await?;
    state.identity.update_user(&user).await?;
    let now = state.clock.now();
    let revoked = state
        .identity
        .revoke_sessions_of_user(user.id, Some(session), now, "password_changed")
        .await?;
    let action = AuditAction {
        action: "account.password_change",
        details: json!({ "sessions_revoked": revoked }),
    };
    Ok((
        StatusCode::NO_CONTENT,
        action,
        AuditTarget::new("user", user.id),
        (),
    )
        .into_response())
}

/// The active login sessions of the calling user, newest first; `current` marks the
/// session of the request.
#[utoipa::path(get, path = "/api/v1/account/sessions", tag = "account",
    responses((status = 200, body = Vec<SessionView>)))]
pub async fn list_sessions(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Json<Vec<SessionView>>, ApiError> {
    let sessions = state
        .identity
        .sessions_of_user(principal.user_id, true, state.clock.now())
        .await?;
    Ok(Json(
        sessions
            .iter()
            .map(|s| SessionView::new(s, principal.session_id))
            .collect(),
    ))
}

/// Revokes one of the calling user's sessions (signs that device out).
#[utoipa::path(delete, path = "/api/v1/account/sessions/{id}", tag = "account",
    params(("id" = String, Path, description = "Session id")),
    responses((status = 204, description = "Revoked"), (status = 404, body = crate::error::ApiErrorBody)))]
pub async fn revoke_session(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<SessionId>,
) -> Result<Response, ApiError> {
    let revoked = state
        .identity
        .revoke_session(principal.user_id, id, state.clock.now(), "revoked")
        .await?;
    if !revoked {
        return Err(ApiError::not_found("session", id));
    }
    Ok((
        StatusCode::NO_CONTENT,
        AuditAction {
            action: "session.revoke",
            details: json!({ "session_id": id.to_string() }),
        },
        AuditTarget::new("session", id),
        (),
    )
        .into_response())
}

/// Revokes every session of the calling user but the current one.
#[utoipa::path(post, path = "/api/v1/account/sessions/revoke-others", tag = "account",
    responses((status = 200, body = Revoked), (status = 400, body = crate::error::ApiErrorBody)))]
pub async fn revoke_other_sessions(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<(AuditAction, Json<Revoked>), ApiError> {
    let session = require_session(&principal)?;
    let revoked = state
        .identity
        .revoke_sessions_of_user(
            principal.user_id,
            Some(session),
            state.clock.now(),
            "revoked",
        )
        .await?;
    Ok((
        AuditAction {
            action: "session.revoke_others",
            details: json!({ "revoked": revoked }),
        },
        Json(Revoked { revoked }),
    ))
}

/// Creates a personal API key. Its role is at most the user's role in the key's org (and,
/// for a request made with an API key, at most that key's role, and expiring no later than
/// that key). The key text is answered this once.
#[utoipa::path(post, path = "/api/v1/account/api-keys", tag = "account", request_body = CreateApiKey,
    responses((status = 201, body = CreatedApiKey),
        (status = 403, body = crate::error::ApiErrorBody, description = "Role above the user's"),
        (status = 422, body = crate::error::ApiErrorBody)))]
pub async fn create_api_key(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(body): ApiJson<CreateApiKey>,
) -> Result<Response, ApiError> {
    let name = body.name.trim().to_owned();
    if name.is_empty() || name.chars().count() > KEY_NAME_CHARS_MAX {
        return Err(field_error(
            "name",
            format!("must have 1 to {KEY_NAME_CHARS_MAX} characters"),
        ));
    }
    if let Some(days) = body.expires_in_days {
        if days == 0 || days > KEY_DAYS_MAX {
            return Err(field_error(
                "expires_in_days",
                format!("must be 1 to {KEY_DAYS_MAX}"),
            ));
        }
    }
    let org = body.org_id.unwrap_or(principal.org_id);
    let membership = state
        .identity
        .membership(org, principal.user_id)
        .await?
        .ok_or_else(|| ApiError::not_found("org", org))?;
    let ceiling = if org == principal.org_id {
        membership.role.min(principal.role)
    } else if principal.api_key_id.is_some() {
        // A key acts in one org: it cannot mint keys for another.
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "an API key can create keys only for its own org",
        ));
    } else {
        membership.role
    };
    let role = body.role.unwrap_or(ceiling);
    if role > ceiling {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            format!("a key's role cannot exceed yours ({ceiling}) in the org"),
        )
        .with_detail("role", role.as_str())
        .with_detail("maximum", ceiling.as_str()));
    }
    let now = state.clock.now();
    let mut expires_at = body
        .expires_in_days
        .map(|days| after_secs(now, u64::from(days) * 86_400));
    if let Some(caller) = principal.api_key_id {
        // A key cannot mint a key that outlives it.
        let caller_expiry = state
            .identity
            .api_key(caller)
            .await?
            .and_then(|key| key.expires_at);
        if let Some(limit) = caller_expiry {
            expires_at = Some(expires_at.map_or(limit, |at| at.min(limit)));
        }
    }
    let secret = generate_api_key();
    let record = ApiKeyRecord {
        id: ApiKeyId(secret.id),
        user_id: principal.user_id,
        org_id: org,
        name,
        role,
        hash: secret.hash.clone(),
        created_at: now,
        expires_at,
        last_used_at: None,
        revoked_at: None,
    };
    state.identity.create_api_key(&record).await?;
    let action = AuditAction {
        action: "api_key.create",
        details: json!({ "api_key_id": record.id.to_string(), "org_id": org.to_string(), "role": role.as_str() }),
    };
    Ok((
        StatusCode::CREATED,
        action,
        AuditTarget::new("api_key", record.id),
        Json(CreatedApiKey {
            key: secret.plaintext,
            api_key: ApiKeyView::from(&record),
        }),
    )
        .into_response())
}

/// The calling user's API keys, newest first (never their secrets).
#[utoipa::path(get, path = "/api/v1/account/api-keys", tag = "account",
    responses((status = 200, body = Vec<ApiKeyView>)))]
pub async fn list_api_keys(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Json<Vec<ApiKeyView>>, ApiError> {
    let keys = state.identity.api_keys_of_user(principal.user_id).await?;
    Ok(Json(keys.iter().map(ApiKeyView::from).collect()))
}

/// Revokes one of the calling user's API keys; it stops working at once.
#[utoipa::path(delete, path = "/api/v1/account/api-keys/{id}", tag = "account",
    params(("id" = String, Path, description = "API key id")),
    responses((status = 204, description = "Revoked"), (status = 404, body = crate::error::ApiErrorBody)))]
pub async fn revoke_api_key(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<ApiKeyId>,
) -> Result<Response, ApiError> {
    if !state
        .identity
        .revoke_api_key(principal.user_id, id, state.clock.now())
        .await?
    {
        return Err(ApiError::not_found("api_key", id));
    }
    Ok((
        StatusCode::NO_CONTENT,
        AuditAction {
            action: "api_key.revoke",
            details: json!({ "api_key_id": id.to_string() }),
        },
        AuditTarget::new("api_key", id),
        (),
    )
        .into_response())
}

/// Starts TOTP enrolment: a new secret, its `otpauth://` URI and QR code. Login does not
/// need a code until the enrolment is confirmed.
#[utoipa::path(post, path = "/api/v1/account/totp/enroll", tag = "account",
    responses((status = 200, body = TotpEnrollment), (status = 409, body = crate::error::ApiErrorBody, description = "TOTP is already enabled")))]
pub async fn totp_enroll(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Response, ApiError> {
    require_session(&principal)?;
    let mut user = current_user(&state, &principal).await?;
    if user.totp_enabled_at.is_some() {
        return Err(ApiError::conflict(
            "two-factor authentication is already enabled; disable it first",
        ));
    }
    let secret = TotpSecret::generate();
    let email = user.email.clone();
    let base32 = secret.to_base32();
    let drawn = blocking(&state, move |_| {
        let uri = secret.otpauth_uri(TOTP_ISSUER, &email)?;
        let png = secret.qr_png_base64(TOTP_ISSUER, &email)?;
        Ok::<_, totp::TotpError>((uri, png))
    })
    .await?
    .map_err(ApiError::internal)?;
    user.totp_secret = Some(base32.clone());
    user.totp_last_step = None;
    state.identity.update_user(&user).await?;
    Ok((
        AuditAction {
            action: "account.totp_enroll",
            details: json!({}),
        },
        AuditTarget::new("user", user.id),
        Json(TotpEnrollment {
            secret: base32,
            otpauth_uri: drawn.0,
            qr_png: format!("data:image/png;base64,{}", drawn.1),
        }),
    )
        .into_response())
}

/// Confirms TOTP enrolment with a code from the app: from now on login needs a code.
/// Answers ten recovery codes, shown this once.
#[utoipa::path(post, path = "/api/v1/account/totp/confirm", tag = "account", request_body = TotpConfirm,
    responses((status = 200, body = RecoveryCodes),
        (status = 409, body = crate::error::ApiErrorBody, description = "No enrolment started, or already enabled"),
        (status = 422, body = crate::error::ApiErrorBody, description = "Wrong code")))]
pub async fn totp_confirm(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(body): ApiJson<TotpConfirm>,
) -> Result<Response, ApiError> {
    require_session(&principal)?;
    let mut user = current_user(&state, &principal).await?;
    if user.totp_enabled_at.is_some() {
        return Err(ApiError::conflict(
            "two-factor authentication is already enabled",
        ));
    }
    if user.totp_secret.is_none() {
        return Err(ApiError::conflict(
            "start with POST /api/v1/account/totp/enroll",
        ));
    }
    let now = state.clock.now();
    if !check_totp(&state, &user, &body.code, now).await? {
        return Err(field_error("code", "the code is wrong or expired"));
    }
    // Re-read: the accepted step was recorded by the store.
    user = current_user(&state, &principal).await?;
    user.totp_enabled_at = Some(now);
    state.identity.update_user(&user).await?;
    let codes = totp::generate_recovery_codes(totp::RECOVERY_CODES_DEFAULT);
    let hashes: Vec<String> = codes.iter().map(|c| c.hash.clone()).collect();
    state
        .identity
        .replace_recovery_codes(user.id, &hashes)
        .await?;
    Ok((
        AuditAction {
            action: "account.totp_enable",
            details: json!({}),
        },
        AuditTarget::new("user", user.id),
        Json(RecoveryCodes {
            recovery_codes: codes.into_iter().map(|c| c.plaintext).collect(),
        }),
    )
        .into_response())
}

/// Turns TOTP off; needs the password and a current code (or a recovery code).
#[utoipa::path(post, path = "/api/v1/account/totp/disable", tag = "account", request_body = TotpDisable,
    responses((status = 204, description = "Disabled"),
        (status = 409, body = crate::error::ApiErrorBody, description = "TOTP is not enabled"),
        (status = 422, body = crate::error::ApiErrorBody, description = "Wrong password or code (details.field)")))]
pub async fn totp_disable(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(body): ApiJson<TotpDisable>,
) -> Result<Response, ApiError> {
    require_session(&principal)?;
    let user = current_user(&state, &principal).await?;
    if user.totp_enabled_at.is_none() {
        return Err(ApiError::conflict(
            "two-factor authentication is not enabled",
        ));
    }
    if !password_matches(&state, body.password, &user).await? {
        return Err(field_error("password", "is not the current password"));
    }
    let now = state.clock.now();
    let code_ok = check_totp(&state, &user, &body.code, now).await?
        || state
            .identity
            .consume_recovery_code(user.id, &totp::hash_recovery_code(&body.code), now)
            .await?;
    if !code_ok {
        return Err(field_error("code", "the code is wrong or already used"));
    }
    let mut user = current_user(&state, &principal).await?;
    user.totp_secret = None;
    user.totp_enabled_at = None;
    state.identity.update_user(&user).await?;
    state.identity.replace_recovery_codes(user.id, &[]).await?;
    Ok((
        StatusCode::NO_CONTENT,
        AuditAction {
            action: "account.totp_disable",
            details: json!({}),
        },
        AuditTarget::new("user", user.id),
        (),
    )
        .into_response())
}
