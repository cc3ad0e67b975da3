//! Organizations: the caller's orgs, creating one (multi-tenant servers), switching the org
//! a session acts in, members and their roles, and invitations.

use arches_auth::mail::MailMessage;
use arches_auth::opaque::{self, INVITATION_PREFIX};
use arches_core::identity::{InvitationError, InvitationRecord, OrgRecord, Permission, Role};
use arches_core::ports::StoreError;
use arches_core::{InvitationId, OrgId, UserId};
use axum::extract::State;
use axum::http::{Extensions, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{OpenApi, ToSchema};

use crate::api::auth::{
    after_secs, field_error, issue_access, normalize_email, personal_slug, record_actor,
    require_session, send_mail, OrgView,
};
use crate::api::{rfc3339, AuditTarget};
use crate::audit::AuditAction;
use crate::error::{ApiError, ApiJson, ApiPath, ErrorCode};
use crate::principal::Principal;
use crate::state::AppState;

/// The OpenAPI paths of this module.
#[derive(OpenApi)]
#[openapi(
    paths(
        list_orgs,
        create_org,
        switch_org,
        list_members,
        change_role,
        remove_member,
        create_invitation,
        list_invitations,
        revoke_invitation,
        accept_invitation
    ),
    components(schemas(
        MyOrg,
        CreateOrg,
        SwitchOrg,
        Switched,
        MemberView,
        ChangeRole,
        CreateInvitation,
        InvitationView,
        AcceptInvitation,
        InvitationAccepted
    ))
)]
pub struct OrgsApi;

/// The routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/orgs", get(list_orgs).post(create_org))
        .route("/api/v1/orgs/switch", post(switch_org))
        .route("/api/v1/orgs/current/members", get(list_members))
        .route(
            "/api/v1/orgs/current/members/{user_id}",
            patch(change_role).delete(remove_member),
        )
        .route(
            "/api/v1/orgs/current/invitations",
            get(list_invitations).post(create_invitation),
        )
        .route(
            "/api/v1/orgs/current/invitations/{id}",
            axum::routing::delete(revoke_invitation),
        )
        .route("/api/v1/invitations/accept", post(accept_invitation))
}

/// How long an invitation is valid: 7 days.
pub const INVITATION_TTL_SECS: u64 = 7 * 24 * 60 * 60;
/// The longest org name, in characters.
const ORG_NAME_CHARS_MAX: usize = 100;

/// An org of the caller.
#[derive(Debug, Serialize, ToSchema)]
pub struct MyOrg {
    /// The org.
    #[serde(flatten)]
    pub org: OrgView,
    /// The caller's role there.
    pub role: String,
    /// Whether the request acts in it.
    pub current: bool,
}

/// A new org.
#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateOrg {
    /// The display name, 1 to 100 characters.
    pub name: String,
    /// The short name (`[a-z0-9-]`, 1 to 64 characters); derived from the name when absent.
    #[serde(default)]
    pub slug: Option<String>,
}

/// The org to switch to.
#[derive(Debug, Deserialize, ToSchema)]
pub struct SwitchOrg {
    /// An org the user belongs to.
    #[schema(value_type = String)]
    pub org_id: OrgId,
}

/// A new access token acting in another org (the session and refresh token stay).
#[derive(Debug, Serialize, ToSchema)]
pub struct Switched {
    /// The access token.
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: &'static str,
    /// Seconds until it expires.
    pub expires_in: u64,
    /// The org.
    pub org: OrgView,
    /// The user's role there.
    pub role: String,
}

/// A member of the org.
#[derive(Debug, Serialize, ToSchema)]
pub struct MemberView {
    /// The user id.
    pub user_id: String,
    /// The email.
    pub email: String,
    /// The display name.
    pub display_name: String,
    /// The role.
    pub role: String,
    /// When they joined (RFC 3339).
    pub joined_at: String,
}

/// A role change.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ChangeRole {
    /// The new role.
    #[schema(value_type = String)]
    pub role: Role,
}

/// An invitation to send.
#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateInvitation {
    /// The email to invite.
    pub email: String,
    /// The role granted on acceptance; default `viewer`.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub role: Option<Role>,
}

/// An invitation (never its token, which only the invited address receives).
#[derive(Debug, Serialize, ToSchema)]
pub struct InvitationView {
    /// The invitation id.
    pub id: String,
    /// The invited email.
    pub email: String,
    /// The role granted on acceptance.
    pub role: String,
    /// Who invited.
    pub invited_by: String,
    /// When (RFC 3339).
    pub created_at: String,
    /// When it stops being valid (RFC 3339).
    pub expires_at: String,
    /// `pending`, `accepted`, `revoked` or `expired`.
    pub status: &'static str,
    /// When it was accepted (RFC 3339).
    pub accepted_at: Option<String>,
}

impl InvitationView {
    fn new(invitation: &InvitationRecord, now: arches_core::Timestamp) -> Self {
        let status = if invitation.accepted_at.is_some() {
            "accepted"
        } else if invitation.revoked_at.is_some() {
            "revoked"
        } else if invitation.expires_at <= now {
            "expired"
        } else {
            "pending"
        };
        InvitationView {
            id: invitation.id.to_string(),
            email: invitation.email.clone(),
            role: invitation.role.to_string(),
            invited_by: invitation.invited_by.to_string(),
            created_at: rfc3339(invitation.created_at),
            expires_at: rfc3339(invitation.expires_at),
            status,
            accepted_at: invitation.accepted_at.map(rfc3339),
        }
    }
}

/// An invitation to accept.
#[derive(Debug, Deserialize, ToSchema)]
pub struct AcceptInvitation {
    /// The token of the emailed link.
    pub token: String,
}

/// The membership an accepted invitation gave.
#[derive(Debug, Serialize, ToSchema)]
pub struct InvitationAccepted {
    /// The org joined.
    pub org: OrgView,
    /// The role there.
    pub role: String,
}

/// The caller's orgs with their role in each.
#[utoipa::path(get, path = "/api/v1/orgs", tag = "orgs",
    responses((status = 200, body = Vec<MyOrg>)))]
pub async fn list_orgs(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Json<Vec<MyOrg>>, ApiError> {
    let orgs = state.identity.orgs_of_user(principal.user_id).await?;
    Ok(Json(
        orgs.iter()
            .map(|(org, role)| MyOrg {
                org: OrgView::from(org),
                role: role.to_string(),
                current: org.id == principal.org_id,
            })
            .collect(),
    ))
}

fn valid_slug(slug: &str) -> bool {
    (1..=64).contains(&slug.len())
        && slug
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Creates an org whose owner is the caller. Only on a multi-tenant server.
#[utoipa::path(post, path = "/api/v1/orgs", tag = "orgs", request_body = CreateOrg,
    responses((status = 201, body = MyOrg),
        (status = 403, body = crate::error::ApiErrorBody, description = "Single-tenant server"),
        (status = 409, body = crate::error::ApiErrorBody, description = "The slug is taken")))]
pub async fn create_org(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(body): ApiJson<CreateOrg>,
) -> Result<Response, ApiError> {
    if !state.config.multi_tenant {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "this server has one organization; creating organizations needs multi_tenant = true",
        )
        .with_detail("reason", "single_tenant"));
    }
    let name = body.name.trim().to_owned();
    if name.is_empty() || name.chars().count() > ORG_NAME_CHARS_MAX {
        return Err(field_error(
            "name",
            format!("must have 1 to {ORG_NAME_CHARS_MAX} characters"),
        ));
    }
    let slug = match body.slug {
        Some(slug) if valid_slug(&slug) => slug,
        Some(_) => {
            return Err(field_error(
                "slug",
                "must have 1 to 64 characters among a-z, 0-9 and -",
            ))
        }
        None => personal_slug(&name),
    };
    let org = OrgRecord {
        id: OrgId::new(),
        slug,
        name,
        created_at: state.clock.now(),
    };
    state
        .identity
        .create_org(&org, principal.user_id)
        .await
        .map_err(|e| match e {
            StoreError::Conflict(_) => {
                ApiError::conflict("an org with this slug exists").with_detail("field", "slug")
            }
            other => other.into(),
        })?;
    Ok((
        StatusCode::CREATED,
        AuditTarget::new("org", org.id),
        Json(MyOrg {
            org: OrgView::from(&org),
            role: Role::Owner.to_string(),
            current: false,
        }),
    )
        .into_response())
}

/// Switches the org the session acts in and answers an access token for it. The refresh
/// token stays valid and now refreshes into that org.
#[utoipa::path(post, path = "/api/v1/orgs/switch", tag = "orgs", request_body = SwitchOrg,
    responses((status = 200, body = Switched), (status = 404, body = crate::error::ApiErrorBody, description = "Not a member")))]
pub async fn switch_org(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(body): ApiJson<SwitchOrg>,
) -> Result<(AuditTarget, Json<Switched>), ApiError> {
    let session = require_session(&principal)?;
    let membership = state
        .identity
        .membership(body.org_id, principal.user_id)
        .await?
        .ok_or_else(|| ApiError::not_found("org", body.org_id))?;
    let org = state
        .identity
        .org(body.org_id)
        .await?
        .ok_or_else(|| ApiError::not_found("org", body.org_id))?;
    state.identity.set_session_org(session, org.id).await?;
    let access = issue_access(
        &state,
        principal.user_id,
        org.id,
        membership.role,
        session,
        state.clock.now(),
    )?;
    Ok((
        AuditTarget::new("org", org.id),
        Json(Switched {
            access_token: access,
            token_type: "Bearer",
            expires_in: state.auth.tokens.ttl_seconds(),
            org: OrgView::from(&org),
            role: membership.role.to_string(),
        }),
    ))
}

/// The members of the current org, by join time.
#[utoipa::path(get, path = "/api/v1/orgs/current/members", tag = "orgs",
    responses((status = 200, body = Vec<MemberView>), (status = 403, body = crate::error::ApiErrorBody)))]
pub async fn list_members(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Json<Vec<MemberView>>, ApiError> {
    principal.require(Permission::MemberRead)?;
    let members = state.identity.members(principal.org_id).await?;
    Ok(Json(
        members
            .iter()
            .map(|(m, u)| MemberView {
                user_id: u.id.to_string(),
                email: u.email.clone(),
                display_name: u.display_name.clone(),
                role: m.role.to_string(),
                joined_at: rfc3339(m.created_at),
            })
            .collect(),
    ))
}

fn last_owner() -> ApiError {
    ApiError::conflict("an organization keeps at least one owner; make someone else owner first")
}

/// Changes a member's role. Needs `member_manage`; granting or taking away `owner` needs
/// `owner_manage`. Nobody changes their own role, and the last owner stays owner.
#[utoipa::path(patch, path = "/api/v1/orgs/current/members/{user_id}", tag = "orgs",
    params(("user_id" = String, Path, description = "The member's user id")),
    request_body = ChangeRole,
    responses((status = 200, body = MemberView), (status = 403, body = crate::error::ApiErrorBody),
        (status = 404, body = crate::error::ApiErrorBody),
        (status = 409, body = crate::error::ApiErrorBody, description = "It would leave the org without an owner")))]
pub async fn change_role(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(user_id): ApiPath<UserId>,
    ApiJson(body): ApiJson<ChangeRole>,
) -> Result<Response, ApiError> {
    principal.require(Permission::MemberManage)?;
    let org = principal.org_id;
    let members = state.identity.members(org).await?;
    let (membership, user) = members
        .iter()
        .find(|(m, _)| m.user_id == user_id)
        .cloned()
        .ok_or_else(|| ApiError::not_found("member", user_id))?;
    if user_id == principal.user_id {
        let owners = members
            .iter()
            .filter(|(m, _)| m.role == Role::Owner)
            .count();
        if membership.role == Role::Owner && body.role != Role::Owner && owners <= 1 {
            return Err(last_owner());
        }
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "you cannot change your own role; ask another admin or owner",
        ));
    }
    if membership.role == Role::Owner || body.role == Role::Owner {
        principal.require(Permission::OwnerManage)?;
    }
    if membership.role != body.role {
        state
            .identity
            .set_role(org, user_id, body.role)
            .await
            .map_err(|e| match e {
                StoreError::Conflict(_) => last_owner(),
                other => other.into(),
            })?;
    }
    Ok((
        AuditAction {
            action: "member.role_change",
            details: json!({
                "user_id": user_id.to_string(),
                "from": membership.role.as_str(),
                "to": body.role.as_str(),
            }),
        },
        AuditTarget::new("user", user_id),
        Json(MemberView {
            user_id: user.id.to_string(),
            email: user.email.clone(),
            display_name: user.display_name.clone(),
            role: body.role.to_string(),
            joined_at: rfc3339(membership.created_at),
        }),
    )
        .into_response())
}

/// Removes a member (their sessions and API keys in the org stop working). Needs
/// `member_manage`, and `owner_manage` to remove an owner; a member may always leave. The
/// last owner cannot leave.
#[utoipa::path(delete, path = "/api/v1/orgs/current/members/{user_id}", tag = "orgs",
    params(("user_id" = String, Path, description = "The member's user id")),
    responses((status = 204, description = "Removed"), (status = 403, body = crate::error::ApiErrorBody),
        (status = 404, body = crate::error::ApiErrorBody),
        (status = 409, body = crate::error::ApiErrorBody, description = "It would leave the org without an owner")))]
pub async fn remove_member(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(user_id): ApiPath<UserId>,
) -> Result<Response, ApiError> {
    let org = principal.org_id;
    let leaving = user_id == principal.user_id;
    if !leaving {
        principal.require(Permission::MemberManage)?;
    }
    let membership = state
        .identity
        .membership(org, user_id)
        .await?
        .ok_or_else(|| ApiError::not_found("member", user_id))?;
    if membership.role == Role::Owner && !leaving {
        principal.require(Permission::OwnerManage)?;
    }
    state
        .identity
        .remove_member(org, user_id, state.clock.now())
        .await
        .map_err(|e| match e {
            StoreError::Conflict(_) => last_owner(),
            other => other.into(),
        })?;
    Ok((
        StatusCode::NO_CONTENT,
        AuditAction {
            action: "member.remove",
            details: json!({ "user_id": user_id.to_string(), "role": membership.role.as_str() }),
        },
        AuditTarget::new("user", user_id),
        (),
    )
        .into_response())
}

/// Invites an email to the current org with a role; the link is emailed and valid for 7
/// days. Needs `member_manage`, and `owner_manage` to invite an owner.
#[utoipa::path(post, path = "/api/v1/orgs/current/invitations", tag = "orgs",
    request_body = CreateInvitation,
    responses((status = 201, body = InvitationView), (status = 403, body = crate::error::ApiErrorBody),
        (status = 409, body = crate::error::ApiErrorBody, description = "Already a member"),
        (status = 422, body = crate::error::ApiErrorBody)))]
pub async fn create_invitation(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(body): ApiJson<CreateInvitation>,
) -> Result<Response, ApiError> {
    principal.require(Permission::MemberManage)?;
    let role = body.role.unwrap_or(Role::Viewer);
    if role == Role::Owner {
        principal.require(Permission::OwnerManage)?;
    }
    let email = normalize_email(&body.email)?;
    let org = state
        .identity
        .org(principal.org_id)
        .await?
        .ok_or_else(|| ApiError::not_found("org", principal.org_id))?;
    if state
        .identity
        .members(org.id)
        .await?
        .iter()
        .any(|(_, u)| u.email == email)
    {
        return Err(ApiError::conflict(format!(
            "{email} is already a member of this org"
        )));
    }
    let now = state.clock.now();
    let token = opaque::generate(INVITATION_PREFIX);
    let invitation = InvitationRecord {
        id: InvitationId::new(),
        org_id: org.id,
        email,
        role,
        token_hash: token.hash,
        invited_by: principal.user_id,
        created_at: now,
        expires_at: after_secs(now, INVITATION_TTL_SECS),
        accepted_at: None,
        accepted_by: None,
        revoked_at: None,
    };
    state.identity.create_invitation(&invitation).await?;
    let inviter = state
        .identity
        .user(principal.user_id)
        .await?
        .map(|u| u.display_name)
        .unwrap_or_else(|| "A member".to_owned());
    let link = format!(
        "{}/invitations/accept?token={}",
        state.config.public_url, token.plaintext
    );
    send_mail(
        &state,
        MailMessage {
            to: invitation.email.clone(),
            subject: format!("You are invited to {} on Arches", org.name),
            text_body: format!(
                "{inviter} invited you to join {} on Arches as {role}.\n\nAccept within 7 days by opening this link (sign up first with this email address if you have no account):\n\n{link}\n",
                org.name
            ),
        },
    );
    Ok((
        StatusCode::CREATED,
        AuditAction {
            action: "invitation.create",
            details: json!({ "invitation_id": invitation.id.to_string(), "email": invitation.email, "role": role.as_str() }),
        },
        AuditTarget::new("invitation", invitation.id),
        Json(InvitationView::new(&invitation, now)),
    )
        .into_response())
}

/// The current org's invitations, newest first. Needs `member_manage`.
#[utoipa::path(get, path = "/api/v1/orgs/current/invitations", tag = "orgs",
    responses((status = 200, body = Vec<InvitationView>), (status = 403, body = crate::error::ApiErrorBody)))]
pub async fn list_invitations(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Json<Vec<InvitationView>>, ApiError> {
    principal.require(Permission::MemberManage)?;
    let now = state.clock.now();
    let invitations = state.identity.invitations(principal.org_id).await?;
    Ok(Json(
        invitations
            .iter()
            .map(|i| InvitationView::new(i, now))
            .collect(),
    ))
}

/// Revokes a pending invitation. Needs `member_manage`.
#[utoipa::path(delete, path = "/api/v1/orgs/current/invitations/{id}", tag = "orgs",
    params(("id" = String, Path, description = "Invitation id")),
    responses((status = 204, description = "Revoked"), (status = 404, body = crate::error::ApiErrorBody)))]
pub async fn revoke_invitation(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<InvitationId>,
) -> Result<Response, ApiError> {
    principal.require(Permission::MemberManage)?;
    if !state
        .identity
        .revoke_invitation(principal.org_id, id, state.clock.now())
        .await?
    {
        return Err(ApiError::not_found("invitation", id));
    }
    Ok((
        StatusCode::NO_CONTENT,
        AuditAction {
            action: "invitation.revoke",
            details: json!({ "invitation_id": id.to_string() }),
        },
        AuditTarget::new("invitation", id),
        (),
    )
        .into_response())
}

/// Accepts an invitation sent to the caller's email address: joins the org with the
/// invited role (or raises an existing membership to it).
#[utoipa::path(post, path = "/api/v1/invitations/accept", tag = "orgs", request_body = AcceptInvitation,
    responses((status = 200, body = InvitationAccepted),
        (status = 403, body = crate::error::ApiErrorBody, description = "Sent to another email"),
        (status = 404, body = crate::error::ApiErrorBody), (status = 409, body = crate::error::ApiErrorBody, description = "Already accepted"),
        (status = 410, body = crate::error::ApiErrorBody, description = "Expired or revoked")))]
pub async fn accept_invitation(
    State(state): State<AppState>,
    principal: Principal,
    extensions: Extensions,
    ApiJson(body): ApiJson<AcceptInvitation>,
) -> Result<Response, ApiError> {
    let hash = opaque::hash_token(&body.token);
    let unknown = || ApiError::new(ErrorCode::NotFound, "no such invitation");
    let invitation = state
        .identity
        .invitation_by_token(&hash)
        .await?
        .ok_or_else(unknown)?;
    let user = state
        .identity
        .user(principal.user_id)
        .await?
        .ok_or_else(unknown)?;
    if user.email != invitation.email {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "this invitation was sent to another email address",
        ));
    }
    let membership = match state
        .identity
        .accept_invitation(&hash, user.id, state.clock.now())
        .await?
    {
        Ok(membership) => membership,
        Err(InvitationError::Unknown) => return Err(unknown()),
        Err(InvitationError::AlreadyAccepted) => {
            return Err(ApiError::conflict("the invitation was already accepted"))
        }
        Err(InvitationError::Expired) => {
            return Err(ApiError::gone("the invitation has expired or was revoked"))
        }
    };
    let org = state
        .identity
        .org(invitation.org_id)
        .await?
        .ok_or_else(unknown)?;
    // The event belongs to the org joined.
    record_actor(
        &extensions,
        Principal {
            org_id: org.id,
            role: membership.role,
            ..principal
        },
    );
    Ok((
        AuditAction {
            action: "invitation.accept",
            details: json!({ "invitation_id": invitation.id.to_string(), "role": membership.role.as_str() }),
        },
        AuditTarget::new("invitation", invitation.id),
        Json(InvitationAccepted {
            org: OrgView::from(&org),
            role: membership.role.to_string(),
        }),
    )
        .into_response())
}
