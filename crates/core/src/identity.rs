//! The identity domain: organizations, users, memberships with roles, the permission table,
//! sessions (refresh-token families), API keys, invitations, one-time tokens and the audit
//! trail, with the [`IdentityStore`] port that keeps them.
//!
//! Secrets never reach this module in plain text: passwords arrive as PHC strings
//! (Argon2id), and refresh tokens, API keys, invitation and one-time tokens and recovery
//! codes as hex SHA-256 digests of high-entropy random values (see `arches-auth`).

use std::fmt;
use std::str::FromStr;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::{ApiKeyId, InvitationId, OrgId, SessionId, UserId};
use crate::ports::StoreResult;
use crate::time::Timestamp;

/// A role in an organization. Roles are ordered: each one holds every permission of the
/// roles below it (`Viewer < Editor < Admin < Owner`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads pipelines, runs, artifacts and the member list.
    Viewer,
    /// Also writes pipelines, triggers, cancels and retries runs, stores artifacts.
    Editor,
    /// Also manages members, invitations and settings, and reads the audit trail.
    Admin,
    /// Everything, including granting the owner role; an org keeps at least one owner.
    Owner,
}

impl Role {
    /// Every role, lowest first.
    pub const ALL: [Role; 4] = [Role::Viewer, Role::Editor, Role::Admin, Role::Owner];

    /// The role's stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Editor => "editor",
            Role::Admin => "admin",
            Role::Owner => "owner",
        }
    }

    /// Whether the role holds a permission: the one permission table of Arches
    /// ([`Permission::minimum_role`]).
    pub fn allows(self, permission: Permission) -> bool {
        self >= permission.minimum_role()
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role {s:?}; use viewer, editor, admin or owner"))
    }
}

/// What a request may do in an organization. Every API endpoint names exactly one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Permission {
    /// List and read pipelines and their versions.
    PipelineRead,
    /// Create, update (new version) and archive pipelines.
    PipelineWrite,
    /// List and read runs, task runs, attempts and logs.
    RunRead,
    /// Trigger runs.
    RunTrigger,
    /// Cancel and retry runs.
    RunControl,
    /// List, read and download artifacts and their lineage.
    ArtifactRead,
    /// List the org's members.
    MemberRead,
    /// Invite members, change their roles (up to admin), remove them.
    MemberManage,
    /// Grant or take away the owner role.
    OwnerManage,
    /// Rename the organization and change its settings.
    OrgManage,
    /// Read the audit trail.
    AuditRead,
    /// Upload artifacts (a WASM module for a tool, a data file).
    ArtifactWrite,
    /// List and read the org's registered tools.
    ToolRead,
    /// Register tools (and new versions of them): a registration grants capabilities
    /// (hosts, directories, secrets), so it is an admin's.
    ToolRegister,
    /// List the org's secrets (names and metadata; values are never shown).
    SecretRead,
    /// Set, delete and re-seal secrets.
    SecretWrite,
    /// List and read the validation queue and the calibration of routed tasks.
    ReviewRead,
    /// Claim, approve, edit and reject items of the validation queue.
    ReviewDecide,
}

impl Permission {
    /// Every permission.
    pub const ALL: [Permission; 18] = [
        Permission::PipelineRead,
        Permission::PipelineWrite,
        Permission::RunRead,
        Permission::RunTrigger,
        Permission::RunControl,
        Permission::ArtifactRead,
        Permission::MemberRead,
        Permission::MemberManage,
        Permission::OwnerManage,
        Permission::OrgManage,
        Permission::AuditRead,
        Permission::ArtifactWrite,
        Permission::ToolRead,
        Permission::ToolRegister,
        Permission::SecretRead,
        Permission::SecretWrite,
        Permission::ReviewRead,
        Permission::ReviewDecide,
    ];

    /// The permission table: the lowest role that holds each permission.
    pub fn minimum_role(self) -> Role {
        use Permission::*;
        match self {
            PipelineRead | RunRead | ArtifactRead | MemberRead | ToolRead | ReviewRead => {
                Role::Viewer
            }
            PipelineWrite | RunTrigger | RunControl | ArtifactWrite | SecretRead | ReviewDecide => {
                Role::Editor
            }
            MemberManage | OrgManage | AuditRead | ToolRegister | SecretWrite => Role::Admin,
            OwnerManage => Role::Owner,
        }
    }

    /// The permission's stable name.
    pub fn as_str(self) -> &'static str {
        use Permission::*;
        match self {
            PipelineRead => "pipeline_read",
            PipelineWrite => "pipeline_write",
            RunRead => "run_read",
            RunTrigger => "run_trigger",
            RunControl => "run_control",
            ArtifactRead => "artifact_read",
            MemberRead => "member_read",
            MemberManage => "member_manage",
            OwnerManage => "owner_manage",
            OrgManage => "org_manage",
            AuditRead => "audit_read",
            ArtifactWrite => "artifact_write",
            ToolRead => "tool_read",
            ToolRegister => "tool_register",
            SecretRead => "secret_read",
            SecretWrite => "secret_write",
            ReviewRead => "review_read",
            ReviewDecide => "review_decide",
        }
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An organization.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OrgRecord {
    /// Its id ([`OrgId::DEFAULT`] for the single-tenant default org).
    pub id: OrgId,
    /// A unique, URL-safe short name (`[a-z0-9-]`, 1 to 64 characters).
    pub slug: String,
    /// The display name.
    pub name: String,
    /// When it was created.
    pub created_at: Timestamp,
}

/// A user account.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UserRecord {
    /// Its id.
    pub id: UserId,
    /// The email, trimmed and lowercased; unique.
    pub email: String,
    /// The name shown in the UI.
    pub display_name: String,
    /// The Argon2id hash, as a PHC string.
    pub password_hash: String,
    /// When the email was verified.
    pub email_verified_at: Option<Timestamp>,
    /// The base32 TOTP secret, once enrolment started.
    pub totp_secret: Option<String>,
    /// When TOTP enrolment was confirmed with a valid code; from then on login needs a code.
    pub totp_enabled_at: Option<Timestamp>,
    /// The last TOTP time step accepted (RFC 6238), to refuse a replayed code.
    pub totp_last_step: Option<u64>,
    /// When the account was created.
    pub created_at: Timestamp,
    /// When the account was disabled; a disabled account cannot log in.
    pub disabled_at: Option<Timestamp>,
}

/// A user's membership of an organization.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MembershipRecord {
    /// The org.
    pub org_id: OrgId,
    /// The user.
    pub user_id: UserId,
    /// The user's role there.
    pub role: Role,
    /// When the user joined.
    pub created_at: Timestamp,
}

/// How a new user joins an organization when the account is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Join {
    /// The org.
    pub org_id: OrgId,
    /// The role granted.
    pub role: Role,
    /// Grant [`Role::Owner`] instead when the org has no member yet (the first user of a
    /// single-tenant installation). Decided atomically with the insert.
    pub owner_if_first: bool,
}

/// A login session: one refresh-token family on one device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Its id (the access token's `sid`).
    pub id: SessionId,
    /// The user.
    pub user_id: UserId,
    /// The org the session acts in.
    pub org_id: OrgId,
    /// The client's `User-Agent`, cut to 512 bytes.
    pub user_agent: Option<String>,
    /// The client's IP address at login.
    pub ip: Option<String>,
    /// The IP address of the last request.
    pub last_ip: Option<String>,
    /// When the user logged in.
    pub created_at: Timestamp,
    /// When the session was last used (login, refresh, or an authenticated request).
    pub last_seen_at: Timestamp,
    /// The absolute expiry: no refresh extends it.
    pub expires_at: Timestamp,
    /// When it was revoked (logout, revocation, or reuse of a rotated refresh token).
    pub revoked_at: Option<Timestamp>,
    /// Why: `logout`, `revoked`, `refresh_token_reuse`, `password_changed`…
    pub revoked_reason: Option<String>,
}

impl SessionRecord {
    /// Whether the session may still be used at `now`.
    pub fn is_active(&self, now: Timestamp) -> bool {
        self.revoked_at.is_none() && now < self.expires_at
    }
}

/// One refresh token of a session's family. Only its hash is stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RefreshTokenRecord {
    /// Hex SHA-256 of the token.
    pub hash: String,
    /// The session (family) it belongs to.
    pub session_id: SessionId,
    /// When it was issued.
    pub created_at: Timestamp,
    /// When it was exchanged for the next one; a second use is a reuse.
    pub used_at: Option<Timestamp>,
}

/// What presenting a refresh token did.
#[derive(Clone, Debug, PartialEq)]
pub enum RefreshOutcome {
    /// The token was current: it is now used, the new one is stored, and the session's
    /// `last_seen_at` is `now`.
    Rotated(SessionRecord),
    /// The token had already been used: the whole family (session) is now revoked with
    /// reason `refresh_token_reuse`.
    Reused(SessionId),
    /// The session is revoked or past its absolute expiry.
    Inactive(SessionId),
    /// No such token.
    Unknown,
}

/// A personal API key, scoped to an org and a role. Only its hash is stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    /// Its id (also the visible part of the key).
    pub id: ApiKeyId,
    /// The user who owns it; the key never exceeds the user's current role in the org.
    pub user_id: UserId,
    /// The org it acts in.
    pub org_id: OrgId,
    /// A label.
    pub name: String,
    /// The role it acts with.
    pub role: Role,
    /// Hex SHA-256 of the whole key.
    pub hash: String,
    /// When it was created.
    pub created_at: Timestamp,
    /// When it stops working, if ever.
    pub expires_at: Option<Timestamp>,
    /// When it was last used.
    pub last_used_at: Option<Timestamp>,
    /// When it was revoked.
    pub revoked_at: Option<Timestamp>,
}

/// An invitation to join an org with a role.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InvitationRecord {
    /// Its id.
    pub id: InvitationId,
    /// The org.
    pub org_id: OrgId,
    /// The invited email, lowercased.
    pub email: String,
    /// The role granted on acceptance.
    pub role: Role,
    /// Hex SHA-256 of the invitation token.
    pub token_hash: String,
    /// Who invited.
    pub invited_by: UserId,
    /// When.
    pub created_at: Timestamp,
    /// When it stops being valid.
    pub expires_at: Timestamp,
    /// When it was accepted.
    pub accepted_at: Option<Timestamp>,
    /// Who accepted it.
    pub accepted_by: Option<UserId>,
    /// When it was revoked.
    pub revoked_at: Option<Timestamp>,
}

/// Why an invitation could not be accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvitationError {
    /// No invitation has this token.
    #[error("no such invitation")]
    Unknown,
    /// It was accepted already.
    #[error("the invitation was already accepted")]
    AlreadyAccepted,
    /// It was revoked or has expired.
    #[error("the invitation has expired or was revoked")]
    Expired,
}

/// What a one-time token is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenPurpose {
    /// Proves the user reads the account's email.
    EmailVerification,
    /// Allows setting a new password.
    PasswordReset,
    /// Finishes a login after the password, by a TOTP or recovery code.
    MfaChallenge,
}

impl TokenPurpose {
    /// The purpose's stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenPurpose::EmailVerification => "email_verification",
            TokenPurpose::PasswordReset => "password_reset",
            TokenPurpose::MfaChallenge => "mfa_challenge",
        }
    }
}

impl FromStr for TokenPurpose {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "email_verification" => Ok(TokenPurpose::EmailVerification),
            "password_reset" => Ok(TokenPurpose::PasswordReset),
            "mfa_challenge" => Ok(TokenPurpose::MfaChallenge),
            other => Err(format!("unknown token purpose {other:?}")),
        }
    }
}

/// A one-time token (email verification, password reset, MFA challenge).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OneTimeTokenRecord {
    /// Hex SHA-256 of the token.
    pub hash: String,
    /// The user it acts for.
    pub user_id: UserId,
    /// What it is for; a token is accepted only for its purpose.
    pub purpose: TokenPurpose,
    /// When it was issued.
    pub created_at: Timestamp,
    /// When it stops being valid.
    pub expires_at: Timestamp,
    /// When it was consumed.
    pub used_at: Option<Timestamp>,
}

/// How an audited request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditOutcome {
    /// The change was made.
    Success,
    /// The request was refused by a permission check or authentication.
    Denied,
    /// The request failed (bad input, conflict, server error).
    Failure,
}

impl AuditOutcome {
    /// The outcome's stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditOutcome::Success => "success",
            AuditOutcome::Denied => "denied",
            AuditOutcome::Failure => "failure",
        }
    }
}

impl FromStr for AuditOutcome {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "success" => Ok(AuditOutcome::Success),
            "denied" => Ok(AuditOutcome::Denied),
            "failure" => Ok(AuditOutcome::Failure),
            other => Err(format!("unknown audit outcome {other:?}")),
        }
    }
}

/// An audit event to append. The trail is append-only: nothing updates or deletes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewAuditEvent {
    /// The org the action concerns; `None` for account-level actions before an org is
    /// known (a failed login, a signup).
    pub org_id: Option<OrgId>,
    /// The acting user, if authenticated.
    pub actor_user_id: Option<UserId>,
    /// The API key used, if any.
    pub actor_api_key_id: Option<ApiKeyId>,
    /// The action, `<resource>.<verb>` (for example `run.cancel`, `auth.login`).
    pub action: String,
    /// The kind of the target (`run`, `pipeline`, `user`…).
    pub target_kind: Option<String>,
    /// The target's id or name.
    pub target_id: Option<String>,
    /// When.
    pub at: Timestamp,
    /// The client's IP address.
    pub ip: Option<String>,
    /// The request id.
    pub request_id: Option<String>,
    /// How it ended.
    pub outcome: AuditOutcome,
    /// The HTTP status returned.
    pub status: Option<u16>,
    /// Extra facts (never secrets).
    pub details: Value,
}

/// A stored audit event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEventRecord {
    /// Position in the trail, increasing; the pagination cursor.
    pub seq: i64,
    /// The event.
    #[serde(flatten)]
    pub event: NewAuditEvent,
}

/// Which audit events to list, newest first.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AuditFilter {
    /// Only this org's events (the API always sets it).
    pub org_id: Option<OrgId>,
    /// Only this actor's.
    pub actor_user_id: Option<UserId>,
    /// Only actions starting with this prefix (`run.` or `run.cancel`).
    pub action_prefix: Option<String>,
    /// Only this outcome.
    pub outcome: Option<AuditOutcome>,
    /// Only events at or after.
    pub since: Option<Timestamp>,
    /// Only events before.
    pub until: Option<Timestamp>,
    /// Only events with `seq` below this (cursor).
    pub before_seq: Option<i64>,
    /// At most this many (0 = the backend's default page size).
    pub limit: u32,
}

/// The identity storage port. Every backend passes the identity conformance tests in
/// `arches-store`.
///
/// Rules every backend keeps:
/// - emails and org slugs are unique: a duplicate insert fails with
///   [`crate::ports::StoreError::Conflict`];
/// - an org always keeps at least one owner: a role change or removal that would leave
///   none fails with `Conflict`;
/// - every check-and-set below (refresh rotation, token consumption, invitation
///   acceptance, TOTP step) is atomic, so of two concurrent callers exactly one wins.
#[async_trait]
pub trait IdentityStore: Send + Sync + 'static {
    // --- organizations ---

    /// Creates an org and makes `owner` its owner, atomically.
    async fn create_org(&self, org: &OrgRecord, owner: UserId) -> StoreResult<()>;
    /// One org.
    async fn org(&self, id: OrgId) -> StoreResult<Option<OrgRecord>>;
    /// Renames an org; `NotFound` if it does not exist.
    async fn rename_org(&self, id: OrgId, name: &str) -> StoreResult<()>;
    /// The orgs a user belongs to, with the user's role, by org creation.
    async fn orgs_of_user(&self, user: UserId) -> StoreResult<Vec<(OrgRecord, Role)>>;

    // --- users ---

    /// Creates a user and, with `join`, the membership, atomically; returns the role
    /// granted (see [`Join::owner_if_first`]).
    async fn create_user(&self, user: &UserRecord, join: Option<Join>)
        -> StoreResult<Option<Role>>;
    /// One user.
    async fn user(&self, id: UserId) -> StoreResult<Option<UserRecord>>;
    /// A user by (lowercased) email.
    async fn user_by_email(&self, email: &str) -> StoreResult<Option<UserRecord>>;
    /// Replaces a user's row (password, verification, TOTP fields, name, disabled), except
    /// that `totp_last_step` never decreases nor clears: the higher of the stored and the
    /// given step is kept, so writing back a copy read before a TOTP login cannot make its
    /// code usable again.
    async fn update_user(&self, user: &UserRecord) -> StoreResult<()>;
    /// Records TOTP step `step` as used if it is above the stored last step; `false` when
    /// it is not (a replay).
    async fn advance_totp_step(&self, user: UserId, step: u64) -> StoreResult<bool>;
    /// Replaces a user's recovery codes with these hashes.
    async fn replace_recovery_codes(&self, user: UserId, hashes: &[String]) -> StoreResult<()>;
    /// Consumes an unused recovery code; `false` if none matches.
    async fn consume_recovery_code(
        &self,
        user: UserId,
        hash: &str,
        now: Timestamp,
    ) -> StoreResult<bool>;
    /// How many unused recovery codes a user has left.
    async fn recovery_codes_left(&self, user: UserId) -> StoreResult<u32>;

    // --- memberships ---

    /// A user's membership of an org.
    async fn membership(&self, org: OrgId, user: UserId) -> StoreResult<Option<MembershipRecord>>;
    /// An org's members with their accounts, by join time.
    async fn members(&self, org: OrgId) -> StoreResult<Vec<(MembershipRecord, UserRecord)>>;
    /// Adds a membership; `Conflict` if the user is already a member.
    async fn add_member(&self, membership: &MembershipRecord) -> StoreResult<()>;
    /// Changes a member's role; `NotFound` if not a member, `Conflict` if it would leave
    /// the org without an owner.
    async fn set_role(&self, org: OrgId, user: UserId, role: Role) -> StoreResult<()>;
    /// Removes a member (and revokes the user's sessions and API keys in that org);
    /// `Conflict` if it would leave the org without an owner.
    async fn remove_member(&self, org: OrgId, user: UserId, now: Timestamp) -> StoreResult<()>;

    // --- sessions and refresh tokens ---

    /// Stores a new session with its first refresh token.
    async fn create_session(
        &self,
        session: &SessionRecord,
        refresh: &RefreshTokenRecord,
    ) -> StoreResult<()>;
    /// One session.
    async fn session(&self, id: SessionId) -> StoreResult<Option<SessionRecord>>;
    /// A user's sessions, newest first; `active_only` leaves out revoked and expired ones.
    async fn sessions_of_user(
        &self,
        user: UserId,
        active_only: bool,
        now: Timestamp,
    ) -> StoreResult<Vec<SessionRecord>>;
    /// Records activity on a session: `last_seen_at = at`, `last_ip = ip`.
    async fn touch_session(
        &self,
        id: SessionId,
        at: Timestamp,
        ip: Option<&str>,
    ) -> StoreResult<()>;
    /// Switches the org a session acts in.
    async fn set_session_org(&self, id: SessionId, org: OrgId) -> StoreResult<()>;
    /// Revokes one session; `false` if it was not active or not the user's.
    async fn revoke_session(
        &self,
        user: UserId,
        id: SessionId,
        at: Timestamp,
        reason: &str,
    ) -> StoreResult<bool>;
    /// Revokes every active session of a user except `keep`; returns how many.
    async fn revoke_sessions_of_user(
        &self,
        user: UserId,
        keep: Option<SessionId>,
        at: Timestamp,
        reason: &str,
    ) -> StoreResult<u32>;
    /// Presents a refresh token (by hash) and, if it is current and its session active,
    /// marks it used and stores `next_hash` as the family's new token. Atomic: of two
    /// concurrent presentations of one token, one rotates and the other is a reuse.
    async fn rotate_refresh_token(
        &self,
        presented_hash: &str,
        next_hash: &str,
        now: Timestamp,
    ) -> StoreResult<RefreshOutcome>;

    // --- API keys ---

    /// Stores a new API key.
    async fn create_api_key(&self, key: &ApiKeyRecord) -> StoreResult<()>;
    /// One API key.
    async fn api_key(&self, id: ApiKeyId) -> StoreResult<Option<ApiKeyRecord>>;
    /// A user's API keys, newest first.
    async fn api_keys_of_user(&self, user: UserId) -> StoreResult<Vec<ApiKeyRecord>>;
    /// Revokes a user's key; `false` if no such active key of that user.
    async fn revoke_api_key(&self, user: UserId, id: ApiKeyId, at: Timestamp) -> StoreResult<bool>;
    /// Records a use of a key.
    async fn touch_api_key(&self, id: ApiKeyId, at: Timestamp) -> StoreResult<()>;

    // --- one-time tokens ---

    /// Stores a one-time token.
    async fn create_one_time_token(&self, token: &OneTimeTokenRecord) -> StoreResult<()>;
    /// Consumes a token of this purpose if it is unused and unexpired at `now`; returns it,
    /// or `None`.
    async fn consume_one_time_token(
        &self,
        hash: &str,
        purpose: TokenPurpose,
        now: Timestamp,
    ) -> StoreResult<Option<OneTimeTokenRecord>>;

    // --- invitations ---

    /// Stores an invitation.
    async fn create_invitation(&self, invitation: &InvitationRecord) -> StoreResult<()>;
    /// An org's invitations, newest first.
    async fn invitations(&self, org: OrgId) -> StoreResult<Vec<InvitationRecord>>;
    /// An invitation by the hash of its token.
    async fn invitation_by_token(&self, token_hash: &str) -> StoreResult<Option<InvitationRecord>>;
    /// Accepts an invitation for `user` (adding the membership, or raising an existing
    /// membership to the invited role if that is higher), atomically.
    async fn accept_invitation(
        &self,
        token_hash: &str,
        user: UserId,
        now: Timestamp,
    ) -> StoreResult<Result<MembershipRecord, InvitationError>>;
    /// Revokes a pending invitation of an org; `false` if none.
    async fn revoke_invitation(
        &self,
        org: OrgId,
        id: InvitationId,
        at: Timestamp,
    ) -> StoreResult<bool>;

    // --- audit trail ---

    /// Appends an audit event; returns its sequence number.
    async fn append_audit(&self, event: &NewAuditEvent) -> StoreResult<i64>;
    /// Audit events, newest first.
    async fn audit_events(&self, filter: &AuditFilter) -> StoreResult<Vec<AuditEventRecord>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_hold_the_permissions_of_the_roles_below() {
        for permission in Permission::ALL {
            let minimum = permission.minimum_role();
            for role in Role::ALL {
                assert_eq!(
                    role.allows(permission),
                    role >= minimum,
                    "{role} {permission}"
                );
            }
        }
        assert!(!Role::Viewer.allows(Permission::RunTrigger));
        assert!(Role::Editor.allows(Permission::RunTrigger));
        assert!(!Role::Editor.allows(Permission::AuditRead));
        assert!(Role::Admin.allows(Permission::MemberManage));
        assert!(!Role::Admin.allows(Permission::OwnerManage));
        assert!(Role::Owner.allows(Permission::OwnerManage));
    }

    #[test]
    fn role_names_round_trip_and_unknown_names_are_explained() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>().unwrap(), role);
        }
        let err = "superuser".parse::<Role>().unwrap_err();
        assert!(err.contains("superuser") && err.contains("viewer"), "{err}");
    }
}
