//! Who is calling: the [`Principal`] extractor authenticates a request by its bearer
//! credential — a JWT access token or a personal API key — and every handler asks it for the
//! one [`Permission`] its endpoint needs ([`Principal::require`]).
//!
//! Checks made on every request (not only when the token was issued):
//! - access token: signature, algorithm, `iss`, `aud`, `exp`, `nbf` and `typ`; then the
//!   session must still be active (logout and revocation take effect at once) and the user
//!   still a member of the org, with the role the store holds now (a role change takes effect
//!   at once, whatever the token says);
//! - API key: known, hash equal (constant time), not revoked, not expired; its role is the
//!   lower of the key's role and the owner's current role in the org;
//! - either way, the user's account must exist and not be disabled.
//!
//! Failures answer 401 with one message whatever the cause, so a probe learns nothing about
//! which part was wrong; the cause goes to the log.

use std::sync::{Arc, Mutex};

use arches_auth::opaque::{hashes_match, parse_api_key};
use arches_core::identity::{Permission, Role};
use arches_core::{ApiKeyId, OrgId, SessionId, Timestamp, UserId};
use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use crate::error::ApiError;
use crate::ratelimit::RateScope;
use crate::state::AppState;

/// A session's `last_seen_at` is written at most this often (microseconds): activity
/// tracking must not turn every read into a write.
pub const SESSION_TOUCH_INTERVAL_MICROS: i64 = 60 * 1_000_000;

/// An authenticated caller acting in one org.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The user.
    pub user_id: UserId,
    /// The org the request acts in; every query of the request is scoped by it.
    pub org_id: OrgId,
    /// The effective role in that org.
    pub role: Role,
    /// The login session, for token-authenticated requests.
    pub session_id: Option<SessionId>,
    /// The API key, for key-authenticated requests.
    pub api_key_id: Option<ApiKeyId>,
}

impl Principal {
    /// Allows the request if the principal's role holds `permission` (the permission table
    /// is [`Permission::minimum_role`]).
    ///
    /// # Errors
    /// 403 `forbidden` naming the permission.
    pub fn require(&self, permission: Permission) -> Result<(), ApiError> {
        if self.role.allows(permission) {
            Ok(())
        } else {
            Err(ApiError::forbidden(permission.as_str()))
        }
    }
}

/// How often a long-lived response (a server-sent event stream) checks that its caller still
/// has access.
pub const STREAM_ACCESS_CHECK: std::time::Duration = std::time::Duration::from_secs(5);

impl Principal {
    /// Whether this principal still has access now: its session is active (or its API key
    /// unrevoked and unexpired), its account exists and is enabled, and it is still a member
    /// of the org. A store error counts as no (fail closed: a client reconnects and resumes).
    pub async fn still_valid(&self, state: &AppState) -> bool {
        let now = state.clock.now();
        let identity = &state.identity;
        let credential_ok = match (self.session_id, self.api_key_id) {
            (Some(session), _) => matches!(
                identity.session(session).await,
                Ok(Some(s)) if s.user_id == self.user_id && s.is_active(now)
            ),
            (None, Some(key)) => matches!(
                identity.api_key(key).await,
                Ok(Some(k)) if k.revoked_at.is_none() && k.expires_at.is_none_or(|at| at > now)
            ),
            (None, None) => false,
        };
        credential_ok
            && matches!(
                identity.membership(self.org_id, self.user_id).await,
                Ok(Some(_))
            )
            && matches!(identity.user(self.user_id).await, Ok(Some(u)) if u.disabled_at.is_none())
    }

    /// Completes once this principal has lost access (checked every
    /// [`STREAM_ACCESS_CHECK`]); streams end with it, so a logout, a revoked key or a removal
    /// from the org also closes the caller's open event streams.
    pub async fn access_lost(self, state: AppState) {
        let mut tick = tokio::time::interval(STREAM_ACCESS_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            if !self.still_valid(&state).await {
                tracing::debug!(user = %self.user_id, "access lost; closing the stream");
                return;
            }
        }
    }
}

/// A slot the audit middleware puts in the request's extensions before the handler runs;
/// the [`Principal`] extractor fills it, so the audit event names the actor.
#[derive(Clone, Debug, Default)]
pub struct PrincipalSlot(pub Arc<Mutex<Option<Principal>>>);

impl PrincipalSlot {
    /// The principal recorded, if the request was authenticated.
    pub fn get(&self) -> Option<Principal> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, principal: &Principal) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(principal.clone());
    }
}

/// The bearer credential of a request: `Authorization: Bearer <token or key>`, or for API
/// keys also `X-API-Key: <key>`.
fn bearer(parts: &Parts) -> Option<&str> {
    if let Some(value) = parts.headers.get(AUTHORIZATION) {
        let text = value.to_str().ok()?;
        let (scheme, credential) = text.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| credential.trim());
    }
    parts
        .headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

fn unauthenticated() -> ApiError {
    ApiError::unauthenticated("missing, invalid or expired credentials")
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if let Some(principal) = parts.extensions.get::<Principal>() {
            return Ok(principal.clone());
        }
        let credential = bearer(parts).ok_or_else(unauthenticated)?.to_owned();
        let now = state.clock.now();
        let principal = if credential.starts_with("ak_") {
            authenticate_key(state, &credential, now).await?
        } else {
            authenticate_token(state, &credential, now, parts).await?
        };
        let scope = match principal.api_key_id {
            Some(key) => RateScope::ApiKey(key.to_string()),
            None => RateScope::User(principal.user_id.to_string()),
        };
        state.limiter.check(&scope)?;
        if let Some(slot) = parts.extensions.get::<PrincipalSlot>() {
            slot.set(&principal);
        }
        parts.extensions.insert(principal.clone());
        Ok(principal)
    }
}

/// Refuses a user that no longer exists or whose account is disabled: a disabled account's
/// API keys and unexpired access tokens stop working at once.
async fn require_enabled_user(state: &AppState, user_id: UserId) -> Result<(), ApiError> {
    let user = state.identity.user(user_id).await.map_err(ApiError::from)?;
    match user {
        Some(user) if user.disabled_at.is_none() => Ok(()),
        _ => {
            tracing::debug!(user = %user_id, "unknown or disabled user");
            Err(unauthenticated())
        }
    }
}

async fn authenticate_key(
    state: &AppState,
    credential: &str,
    now: Timestamp,
) -> Result<Principal, ApiError> {
    let (id, hash) = parse_api_key(credential).map_err(|error| {
        tracing::debug!(%error, "malformed api key");
        unauthenticated()
    })?;
    let id = ApiKeyId(id);
    let key = state
        .identity
        .api_key(id)
        .await
        .map_err(ApiError::from)?
        .filter(|key| hashes_match(&key.hash, &hash))
        .ok_or_else(|| {
            tracing::debug!(key = %id, "unknown api key or wrong secret");
            unauthenticated()
        })?;
    if key.revoked_at.is_some() || key.expires_at.is_some_and(|at| at <= now) {
        tracing::debug!(key = %id, "revoked or expired api key");
        return Err(unauthenticated());
    }
    let membership = state
        .identity
        .membership(key.org_id, key.user_id)
        .await
        .map_err(ApiError::from)?
        .ok_or_else(|| {
            tracing::debug!(key = %id, "api key owner is no longer a member");
            unauthenticated()
        })?;
    require_enabled_user(state, key.user_id).await?;
    if key
        .last_used_at
        .is_none_or(|at| now.as_micros() - at.as_micros() >= SESSION_TOUCH_INTERVAL_MICROS)
    {
        state
            .identity
            .touch_api_key(id, now)
            .await
            .map_err(ApiError::from)?;
    }
    Ok(Principal {
        user_id: key.user_id,
        org_id: key.org_id,
        role: key.role.min(membership.role),
        session_id: None,
        api_key_id: Some(id),
    })
}

async fn authenticate_token(
    state: &AppState,
    credential: &str,
    now: Timestamp,
    parts: &Parts,
) -> Result<Principal, ApiError> {
    let claims = state.auth.tokens.verify(credential, now).map_err(|error| {
        tracing::debug!(%error, "access token refused");
        match error {
            arches_auth::jwt::TokenError::Expired => ApiError::token_expired(),
            _ => unauthenticated(),
        }
    })?;
    let parse = |text: &str| text.parse::<uuid::Uuid>().map_err(|_| unauthenticated());
    let user_id = UserId(parse(&claims.sub)?);
    let org_id = OrgId(parse(&claims.org)?);
    let session_id = SessionId(parse(&claims.sid)?);
    let session = state
        .identity
        .session(session_id)
        .await
        .map_err(ApiError::from)?
        .filter(|s| s.user_id == user_id && s.is_active(now))
        .ok_or_else(|| {
            tracing::debug!(session = %session_id, "session revoked or expired");
            unauthenticated()
        })?;
    let membership = state
        .identity
        .membership(org_id, user_id)
        .await
        .map_err(ApiError::from)?
        .ok_or_else(|| {
            tracing::debug!(user = %user_id, org = %org_id, "no longer a member");
            unauthenticated()
        })?;
    require_enabled_user(state, user_id).await?;
    if now.as_micros() - session.last_seen_at.as_micros() >= SESSION_TOUCH_INTERVAL_MICROS {
        let ip = parts
            .extensions
            .get::<crate::http::ClientIp>()
            .map(|ip| ip.0.to_string());
        state
            .identity
            .touch_session(session_id, now, ip.as_deref())
            .await
            .map_err(ApiError::from)?;
    }
    Ok(Principal {
        user_id,
        org_id,
        role: membership.role,
        session_id: Some(session_id),
        api_key_id: None,
    })
}
