//! The identity port on PostgreSQL: organizations, users, memberships, sessions with their
//! refresh tokens, API keys, one-time tokens, recovery codes, invitations and the audit trail
//! (tables of migration `0003_identity.sql`), with the SQLite store's semantics.
//!
//! SQLite serializes every write on its one writer connection; here several processes write
//! at once under `READ COMMITTED`, so every check-and-set is one transaction that first locks
//! the row its rule is about, or is one conditional statement (which PostgreSQL re-checks on
//! the newest version of a row a concurrent writer changed). Of two concurrent callers,
//! exactly one wins:
//! - every change of an org's memberships (a signup joining it, adding, re-roling or removing
//!   a member, accepting an invitation) locks the org's row first (`FOR NO KEY UPDATE`, which
//!   does not hold back the foreign-key checks of other tables), so "no member yet" and "the
//!   last owner" are decided on the org's committed memberships;
//! - a refresh rotation locks its session (the token family) before reading whether the
//!   presented token is used, so of two presentations of one token one rotates and the other
//!   is a reuse;
//! - accepting an invitation locks the invitation, the TOTP step and a recovery-code
//!   replacement lock the user;
//! - consuming a one-time token or a recovery code, and every revocation, is one `UPDATE`
//!   conditional on the row's state.
//!
//! Constraint violations are mapped by kind as in SQLite: a unique violation is
//! [`StoreError::Conflict`] with a message naming what is duplicated, and a foreign-key
//! violation (a user, org or session that does not exist) is [`StoreError::NotFound`]. An
//! update of a row that does not exist is `NotFound` too; a revocation or consumption that
//! finds nothing to act on answers `false` or `None` instead, as the port documents.
//!
//! This module must never store a secret in plain text: it only ever sees hashes.

use std::fmt::Display;
use std::str::FromStr;

use arches_core::identity::*;
use arches_core::ids::{ApiKeyId, InvitationId, OrgId, SessionId, UserId};
use arches_core::ports::{StoreError, StoreResult};
use arches_core::time::Timestamp;
use async_trait::async_trait;
use serde_json::Value;
use sqlx::postgres::{PgConnection, PgExecutor, PgRow, Postgres};
use sqlx::types::Json;
use sqlx::QueryBuilder;
use uuid::Uuid;

use super::rows::column;
use super::PgStore;
use crate::decode::parse_text;
use crate::error::db;
use crate::sqlite::{clamp_limit, cpu_work};

/// Limit of [`IdentityStore::audit_events`] when the filter gives 0 (as in SQLite).
const AUDIT_LIMIT_DEFAULT: u32 = 50;
/// Most audit events one listing returns (as in SQLite).
const AUDIT_LIMIT_MAX: u32 = 1_000;

/// The advisory lock that serializes audit appends (an arbitrary constant, `"archesau"` in
/// ASCII, so that it is recognizable in `pg_locks`).
const AUDIT_APPEND_LOCK: i64 = 0x6172_6368_6573_6175;

/// Why a member's sessions end when the member is removed from the org they act in.
const REASON_MEMBER_REMOVED: &str = "member_removed";
/// Why a session ends when one of its used refresh tokens is presented again.
const REASON_REFRESH_TOKEN_REUSE: &str = "refresh_token_reuse";

const ORG_COLUMNS: &str = "id, slug, name, created_at";

const USER_COLUMNS: &str = "id, email, display_name, password_hash, email_verified_at, \
     totp_secret, totp_enabled_at, totp_last_step, created_at, disabled_at";

const SESSION_COLUMNS: &str = "id, user_id, org_id, user_agent, ip, last_ip, created_at, \
     last_seen_at, expires_at, revoked_at, revoked_reason";

const API_KEY_COLUMNS: &str = "id, user_id, org_id, name, role, hash, created_at, expires_at, \
     last_used_at, revoked_at";

const INVITATION_COLUMNS: &str = "id, org_id, email, role, token_hash, invited_by, created_at, \
     expires_at, accepted_at, accepted_by, revoked_at";

const AUDIT_COLUMNS: &str = "seq, org_id, actor_user_id, actor_api_key_id, action, target_kind, \
     target_id, at, ip, request_id, outcome, status, details";

/// Locks an org's row for a change of its memberships; `false` when there is no such org.
const LOCK_ORG: &str = "SELECT 1 FROM orgs WHERE id = $1 FOR NO KEY UPDATE";

/// Maps a failed write: a unique violation becomes [`StoreError::Conflict`] with `duplicate`,
/// a foreign-key violation [`StoreError::NotFound`] with `missing`, anything else goes
/// through [`db`].
fn refused(
    duplicate: &'static str,
    missing: &'static str,
) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |error| match &error {
        sqlx::Error::Database(database) if database.is_unique_violation() => {
            StoreError::Conflict(duplicate.to_owned())
        }
        _ => refers_to_nothing(missing)(error),
    }
}

/// Maps a failed write that cannot break a uniqueness rule: a foreign-key violation becomes
/// [`StoreError::NotFound`] with `missing`, anything else goes through [`db`].
fn refers_to_nothing(missing: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |error| match &error {
        sqlx::Error::Database(database) if database.is_foreign_key_violation() => {
            StoreError::NotFound(missing.to_owned())
        }
        _ => db(error),
    }
}

/// A TOTP step as PostgreSQL's signed `bigint`; real steps (30 s since 1970) are far below
/// the limit, so a larger one is refused rather than wrapped.
fn totp_step(step: u64) -> StoreResult<i64> {
    i64::try_from(step).map_err(|_| {
        StoreError::Conflict(format!(
            "totp step {step} is above the largest storable value"
        ))
    })
}

/// `NotFound` when an update touched no row.
fn found(rows_affected: u64, what: impl Display) -> StoreResult<()> {
    if rows_affected == 0 {
        Err(StoreError::NotFound(what.to_string()))
    } else {
        Ok(())
    }
}

fn micros(at: Option<Timestamp>) -> Option<i64> {
    at.map(Timestamp::as_micros)
}

// --- decoding ---

fn uuid_column(row: &PgRow, name: &str) -> StoreResult<Uuid> {
    column(row, name)
}

fn optional_uuid_column(row: &PgRow, name: &str) -> StoreResult<Option<Uuid>> {
    column(row, name)
}

fn parsed_column<T: FromStr>(row: &PgRow, name: &str) -> StoreResult<T>
where
    T::Err: Display,
{
    parse_text(column::<&str>(row, name)?, name)
}

fn timestamp_column(row: &PgRow, name: &str) -> StoreResult<Timestamp> {
    Ok(Timestamp(column(row, name)?))
}

fn optional_timestamp_column(row: &PgRow, name: &str) -> StoreResult<Option<Timestamp>> {
    Ok(column::<Option<i64>>(row, name)?.map(Timestamp))
}

fn org_from_row(row: &PgRow) -> StoreResult<OrgRecord> {
    Ok(OrgRecord {
        id: OrgId(uuid_column(row, "id")?),
        slug: column(row, "slug")?,
        name: column(row, "name")?,
        created_at: timestamp_column(row, "created_at")?,
    })
}

fn user_from_row(row: &PgRow) -> StoreResult<UserRecord> {
    let totp_last_step = column::<Option<i64>>(row, "totp_last_step")?
        .map(|step| {
            u64::try_from(step).map_err(|_| {
                StoreError::Corrupt(format!("totp_last_step holds {step}, out of range"))
            })
        })
        .transpose()?;
    Ok(UserRecord {
        id: UserId(uuid_column(row, "id")?),
        email: column(row, "email")?,
        display_name: column(row, "display_name")?,
        password_hash: column(row, "password_hash")?,
        email_verified_at: optional_timestamp_column(row, "email_verified_at")?,
        totp_secret: column(row, "totp_secret")?,
        totp_enabled_at: optional_timestamp_column(row, "totp_enabled_at")?,
        totp_last_step,
        created_at: timestamp_column(row, "created_at")?,
        disabled_at: optional_timestamp_column(row, "disabled_at")?,
    })
}

/// A membership; `created_at` names the column of its join time, which a query joining
/// `users` renames.
fn membership_from_row(row: &PgRow, created_at: &str) -> StoreResult<MembershipRecord> {
    Ok(MembershipRecord {
        org_id: OrgId(uuid_column(row, "org_id")?),
        user_id: UserId(uuid_column(row, "user_id")?),
        role: parsed_column(row, "role")?,
        created_at: timestamp_column(row, created_at)?,
    })
}

fn session_from_row(row: &PgRow) -> StoreResult<SessionRecord> {
    Ok(SessionRecord {
        id: SessionId(uuid_column(row, "id")?),
        user_id: UserId(uuid_column(row, "user_id")?),
        org_id: OrgId(uuid_column(row, "org_id")?),
        user_agent: column(row, "user_agent")?,
        ip: column(row, "ip")?,
        last_ip: column(row, "last_ip")?,
        created_at: timestamp_column(row, "created_at")?,
        last_seen_at: timestamp_column(row, "last_seen_at")?,
        expires_at: timestamp_column(row, "expires_at")?,
        revoked_at: optional_timestamp_column(row, "revoked_at")?,
        revoked_reason: column(row, "revoked_reason")?,
    })
}

fn api_key_from_row(row: &PgRow) -> StoreResult<ApiKeyRecord> {
    Ok(ApiKeyRecord {
        id: ApiKeyId(uuid_column(row, "id")?),
        user_id: UserId(uuid_column(row, "user_id")?),
        org_id: OrgId(uuid_column(row, "org_id")?),
        name: column(row, "name")?,
        role: parsed_column(row, "role")?,
        hash: column(row, "hash")?,
        created_at: timestamp_column(row, "created_at")?,
        expires_at: optional_timestamp_column(row, "expires_at")?,
        last_used_at: optional_timestamp_column(row, "last_used_at")?,
        revoked_at: optional_timestamp_column(row, "revoked_at")?,
    })
}

fn one_time_token_from_row(row: &PgRow) -> StoreResult<OneTimeTokenRecord> {
    Ok(OneTimeTokenRecord {
        hash: column(row, "hash")?,
        user_id: UserId(uuid_column(row, "user_id")?),
        purpose: parsed_column(row, "purpose")?,
        created_at: timestamp_column(row, "created_at")?,
        expires_at: timestamp_column(row, "expires_at")?,
        used_at: optional_timestamp_column(row, "used_at")?,
    })
}

fn invitation_from_row(row: &PgRow) -> StoreResult<InvitationRecord> {
    Ok(InvitationRecord {
        id: InvitationId(uuid_column(row, "id")?),
        org_id: OrgId(uuid_column(row, "org_id")?),
        email: column(row, "email")?,
        role: parsed_column(row, "role")?,
        token_hash: column(row, "token_hash")?,
        invited_by: UserId(uuid_column(row, "invited_by")?),
        created_at: timestamp_column(row, "created_at")?,
        expires_at: timestamp_column(row, "expires_at")?,
        accepted_at: optional_timestamp_column(row, "accepted_at")?,
        accepted_by: optional_uuid_column(row, "accepted_by")?.map(UserId),
        revoked_at: optional_timestamp_column(row, "revoked_at")?,
    })
}

fn audit_from_row(row: &PgRow) -> StoreResult<AuditEventRecord> {
    let status = column::<Option<i32>>(row, "status")?
        .map(|status| {
            u16::try_from(status)
                .map_err(|_| StoreError::Corrupt(format!("status holds {status}, out of range")))
        })
        .transpose()?;
    Ok(AuditEventRecord {
        seq: column(row, "seq")?,
        event: NewAuditEvent {
            org_id: optional_uuid_column(row, "org_id")?.map(OrgId),
            actor_user_id: optional_uuid_column(row, "actor_user_id")?.map(UserId),
            actor_api_key_id: optional_uuid_column(row, "actor_api_key_id")?.map(ApiKeyId),
            action: column(row, "action")?,
            target_kind: column(row, "target_kind")?,
            target_id: column(row, "target_id")?,
            at: timestamp_column(row, "at")?,
            ip: column(row, "ip")?,
            request_id: column(row, "request_id")?,
            outcome: parsed_column(row, "outcome")?,
            status,
            details: column::<Value>(row, "details")?,
        },
    })
}

// --- statements shared by several operations ---

/// A user's membership of an org.
async fn membership_in<'e>(
    executor: impl PgExecutor<'e>,
    org: OrgId,
    user: UserId,
) -> StoreResult<Option<MembershipRecord>> {
    let row = sqlx::query(
        "SELECT org_id, user_id, role, created_at FROM memberships
         WHERE org_id = $1 AND user_id = $2",
    )
    .bind(org.0)
    .bind(user.0)
    .fetch_optional(executor)
    .await
    .map_err(db)?;
    row.as_ref()
        .map(|row| membership_from_row(row, "created_at"))
        .transpose()
}

/// Locks an org's row for a change of its memberships, until the transaction ends; `false`
/// when there is no such org.
async fn lock_org(connection: &mut PgConnection, org: OrgId) -> StoreResult<bool> {
    let locked = sqlx::query(LOCK_ORG)
        .bind(org.0)
        .fetch_optional(connection)
        .await
        .map_err(db)?;
    Ok(locked.is_some())
}

/// Refuses to take the owner role from `membership` when it is the org's last owner. The
/// caller holds the org's lock.
async fn keep_an_owner(
    connection: &mut PgConnection,
    membership: &MembershipRecord,
) -> StoreResult<()> {
    if membership.role != Role::Owner {
        return Ok(());
    }
    let owners: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM memberships WHERE org_id = $1 AND role = 'owner'")
            .bind(membership.org_id.0)
            .fetch_one(connection)
            .await
            .map_err(db)?;
    if owners <= 1 {
        return Err(StoreError::Conflict(
            "an organization keeps at least one owner".to_owned(),
        ));
    }
    Ok(())
}

#[async_trait]
impl IdentityStore for PgStore {
    // --- organizations ---

    async fn create_org(&self, org: &OrgRecord, owner: UserId) -> StoreResult<()> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        sqlx::query("INSERT INTO orgs (id, slug, name, created_at) VALUES ($1, $2, $3, $4)")
            .bind(org.id.0)
            .bind(&org.slug)
            .bind(&org.name)
            .bind(org.created_at.as_micros())
            .execute(&mut *tx)
            .await
            .map_err(refused(
                "an organization with this id or slug already exists",
                "no such organization",
            ))?;
        sqlx::query(
            "INSERT INTO memberships (org_id, user_id, role, created_at)
             VALUES ($1, $2, 'owner', $3)",
        )
        .bind(org.id.0)
        .bind(owner.0)
        .bind(org.created_at.as_micros())
        .execute(&mut *tx)
        .await
        .map_err(refers_to_nothing("no such user"))?;
        tx.commit().await.map_err(db)
    }

    async fn org(&self, id: OrgId) -> StoreResult<Option<OrgRecord>> {
        let row = sqlx::query(&format!("SELECT {ORG_COLUMNS} FROM orgs WHERE id = $1"))
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        row.as_ref().map(org_from_row).transpose()
    }

    async fn rename_org(&self, id: OrgId, name: &str) -> StoreResult<()> {
        let done = sqlx::query("UPDATE orgs SET name = $2 WHERE id = $1")
            .bind(id.0)
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        found(done.rows_affected(), format_args!("organization {id}"))
    }

    async fn orgs_of_user(&self, user: UserId) -> StoreResult<Vec<(OrgRecord, Role)>> {
        let rows = sqlx::query(
            "SELECT o.id, o.slug, o.name, o.created_at, m.role
             FROM memberships AS m JOIN orgs AS o ON o.id = m.org_id
             WHERE m.user_id = $1
             ORDER BY o.created_at, o.id",
        )
        .bind(user.0)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter()
            .map(|row| Ok((org_from_row(row)?, parsed_column(row, "role")?)))
            .collect()
    }

    // --- users ---

    async fn create_user(
        &self,
        user: &UserRecord,
        join: Option<Join>,
    ) -> StoreResult<Option<Role>> {
        let totp_last_step = user.totp_last_step.map(totp_step).transpose()?;
        let mut tx = self.pool.begin().await.map_err(db)?;
        sqlx::query(&format!(
            "INSERT INTO users ({USER_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
        ))
        .bind(user.id.0)
        .bind(&user.email)
        .bind(&user.display_name)
        .bind(&user.password_hash)
        .bind(micros(user.email_verified_at))
        .bind(user.totp_secret.as_deref())
        .bind(micros(user.totp_enabled_at))
        .bind(totp_last_step)
        .bind(user.created_at.as_micros())
        .bind(micros(user.disabled_at))
        .execute(&mut *tx)
        .await
        .map_err(refused(
            "a user with this email already exists",
            "no such user",
        ))?;
        let granted = match join {
            None => None,
            Some(join) => {
                // The org's lock makes "no member yet" and the insert one step: of two first
                // signups, the second waits for the first and then sees its row. Without the
                // org, the insert below fails on its foreign key.
                lock_org(&mut tx, join.org_id).await?;
                let role: String = sqlx::query_scalar(
                    "INSERT INTO memberships (org_id, user_id, role, created_at)
                     SELECT $1, $2,
                            CASE WHEN $3 AND NOT EXISTS
                                     (SELECT 1 FROM memberships WHERE org_id = $1)
                                 THEN 'owner' ELSE $4 END,
                            $5
                     RETURNING role",
                )
                .bind(join.org_id.0)
                .bind(user.id.0)
                .bind(join.owner_if_first)
                .bind(join.role.as_str())
                .bind(user.created_at.as_micros())
                .fetch_one(&mut *tx)
                .await
                .map_err(refused(
                    "the user is already a member of this organization",
                    "no such organization",
                ))?;
                Some(parse_text::<Role>(&role, "role")?)
            }
        };
        tx.commit().await.map_err(db)?;
        Ok(granted)
    }

    async fn user(&self, id: UserId) -> StoreResult<Option<UserRecord>> {
        let row = sqlx::query(&format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1"))
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        row.as_ref().map(user_from_row).transpose()
    }

    async fn user_by_email(&self, email: &str) -> StoreResult<Option<UserRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {USER_COLUMNS} FROM users WHERE email = $1"
        ))
        .bind(email)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.as_ref().map(user_from_row).transpose()
    }

    async fn update_user(&self, user: &UserRecord) -> StoreResult<()> {
        let totp_last_step = user.totp_last_step.map(totp_step).transpose()?;
        // `GREATEST` ignores nulls: the step is cleared only when neither is set, and the
        // update's row lock orders it against a concurrent `advance_totp_step`.
        let done = sqlx::query(
            "UPDATE users SET email = $2, display_name = $3, password_hash = $4,
                              email_verified_at = $5, totp_secret = $6, totp_enabled_at = $7,
                              totp_last_step = GREATEST(totp_last_step, $8),
                              created_at = $9, disabled_at = $10
             WHERE id = $1",
        )
        .bind(user.id.0)
        .bind(&user.email)
        .bind(&user.display_name)
        .bind(&user.password_hash)
        .bind(micros(user.email_verified_at))
        .bind(user.totp_secret.as_deref())
        .bind(micros(user.totp_enabled_at))
        .bind(totp_last_step)
        .bind(user.created_at.as_micros())
        .bind(micros(user.disabled_at))
        .execute(&self.pool)
        .await
        .map_err(refused(
            "a user with this email already exists",
            "no such user",
        ))?;
        found(done.rows_affected(), format_args!("user {}", user.id))
    }

    async fn advance_totp_step(&self, user: UserId, step: u64) -> StoreResult<bool> {
        let step = totp_step(step)?;
        let mut tx = self.pool.begin().await.map_err(db)?;
        let last: Option<Option<i64>> =
            sqlx::query_scalar("SELECT totp_last_step FROM users WHERE id = $1 FOR NO KEY UPDATE")
                .bind(user.0)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db)?;
        let Some(last) = last else {
            tx.rollback().await.map_err(db)?;
            return Err(StoreError::NotFound(format!("user {user}")));
        };
        if last.is_some_and(|last| step <= last) {
            tx.rollback().await.map_err(db)?;
            return Ok(false);
        }
        sqlx::query("UPDATE users SET totp_last_step = $2 WHERE id = $1")
            .bind(user.0)
            .bind(step)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(true)
    }

    async fn replace_recovery_codes(&self, user: UserId, hashes: &[String]) -> StoreResult<()> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        // The user's lock orders concurrent replacements, so one set replaces the other whole
        // rather than the two merging. Without the user, a non-empty set fails on its foreign
        // key below, as in SQLite.
        sqlx::query("SELECT 1 FROM users WHERE id = $1 FOR NO KEY UPDATE")
            .bind(user.0)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
        sqlx::query("DELETE FROM recovery_codes WHERE user_id = $1")
            .bind(user.0)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        // A hash given twice is one code.
        sqlx::query(
            "INSERT INTO recovery_codes (user_id, hash)
             SELECT $1, hash FROM UNNEST($2::text[]) AS h (hash)
             ON CONFLICT (user_id, hash) DO NOTHING",
        )
        .bind(user.0)
        .bind(hashes)
        .execute(&mut *tx)
        .await
        .map_err(refers_to_nothing("no such user"))?;
        tx.commit().await.map_err(db)
    }

    async fn consume_recovery_code(
        &self,
        user: UserId,
        hash: &str,
        now: Timestamp,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE recovery_codes SET used_at = $3
             WHERE user_id = $1 AND hash = $2 AND used_at IS NULL",
        )
        .bind(user.0)
        .bind(hash)
        .bind(now.as_micros())
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(done.rows_affected() == 1)
    }

    async fn recovery_codes_left(&self, user: UserId) -> StoreResult<u32> {
        let left: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM recovery_codes WHERE user_id = $1 AND used_at IS NULL",
        )
        .bind(user.0)
        .fetch_one(&self.pool)
        .await
        .map_err(db)?;
        u32::try_from(left)
            .map_err(|_| StoreError::Corrupt(format!("recovery code count {left} out of range")))
    }

    // --- memberships ---

    async fn membership(&self, org: OrgId, user: UserId) -> StoreResult<Option<MembershipRecord>> {
        membership_in(&self.pool, org, user).await
    }

    async fn members(&self, org: OrgId) -> StoreResult<Vec<(MembershipRecord, UserRecord)>> {
        let rows = sqlx::query(
            "SELECT m.org_id, m.user_id, m.role, m.created_at AS joined_at,
                    u.id, u.email, u.display_name, u.password_hash, u.email_verified_at,
                    u.totp_secret, u.totp_enabled_at, u.totp_last_step, u.created_at,
                    u.disabled_at
             FROM memberships AS m JOIN users AS u ON u.id = m.user_id
             WHERE m.org_id = $1
             ORDER BY m.created_at, m.user_id",
        )
        .bind(org.0)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        cpu_work(rows.len(), || {
            rows.iter()
                .map(|row| Ok((membership_from_row(row, "joined_at")?, user_from_row(row)?)))
                .collect()
        })
    }

    async fn add_member(&self, membership: &MembershipRecord) -> StoreResult<()> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        // Without the org, the insert fails on its foreign key.
        lock_org(&mut tx, membership.org_id).await?;
        sqlx::query(
            "INSERT INTO memberships (org_id, user_id, role, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(membership.org_id.0)
        .bind(membership.user_id.0)
        .bind(membership.role.as_str())
        .bind(membership.created_at.as_micros())
        .execute(&mut *tx)
        .await
        .map_err(refused(
            "the user is already a member of this organization",
            "no such organization or user",
        ))?;
        tx.commit().await.map_err(db)
    }

    async fn set_role(&self, org: OrgId, user: UserId, role: Role) -> StoreResult<()> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        lock_org(&mut tx, org).await?;
        let membership = membership_in(&mut *tx, org, user)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("user {user} in organization {org}")))?;
        if role != Role::Owner {
            keep_an_owner(&mut tx, &membership).await?;
        }
        sqlx::query("UPDATE memberships SET role = $3 WHERE org_id = $1 AND user_id = $2")
            .bind(org.0)
            .bind(user.0)
            .bind(role.as_str())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)
    }

    async fn remove_member(&self, org: OrgId, user: UserId, now: Timestamp) -> StoreResult<()> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        lock_org(&mut tx, org).await?;
        let membership = membership_in(&mut *tx, org, user)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("user {user} in organization {org}")))?;
        keep_an_owner(&mut tx, &membership).await?;
        sqlx::query("DELETE FROM memberships WHERE org_id = $1 AND user_id = $2")
            .bind(org.0)
            .bind(user.0)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        sqlx::query(
            "UPDATE sessions SET revoked_at = $3, revoked_reason = $4
             WHERE org_id = $1 AND user_id = $2 AND revoked_at IS NULL",
        )
        .bind(org.0)
        .bind(user.0)
        .bind(now.as_micros())
        .bind(REASON_MEMBER_REMOVED)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        sqlx::query(
            "UPDATE api_keys SET revoked_at = $3
             WHERE org_id = $1 AND user_id = $2 AND revoked_at IS NULL",
        )
        .bind(org.0)
        .bind(user.0)
        .bind(now.as_micros())
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)
    }

    // --- sessions and refresh tokens ---

    async fn create_session(
        &self,
        session: &SessionRecord,
        refresh: &RefreshTokenRecord,
    ) -> StoreResult<()> {
        if refresh.session_id != session.id {
            return Err(StoreError::Conflict(format!(
                "the refresh token belongs to session {}, not {}",
                refresh.session_id, session.id
            )));
        }
        let mut tx = self.pool.begin().await.map_err(db)?;
        sqlx::query(&format!(
            "INSERT INTO sessions ({SESSION_COLUMNS})
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        ))
        .bind(session.id.0)
        .bind(session.user_id.0)
        .bind(session.org_id.0)
        .bind(session.user_agent.as_deref())
        .bind(session.ip.as_deref())
        .bind(session.last_ip.as_deref())
        .bind(session.created_at.as_micros())
        .bind(session.last_seen_at.as_micros())
        .bind(session.expires_at.as_micros())
        .bind(micros(session.revoked_at))
        .bind(session.revoked_reason.as_deref())
        .execute(&mut *tx)
        .await
        .map_err(refused(
            "a session with this id already exists",
            "no such user or organization",
        ))?;
        sqlx::query(
            "INSERT INTO refresh_tokens (hash, session_id, created_at, used_at)
             VALUES ($1, $2, $3, $4)",
        )
        .bind(&refresh.hash)
        .bind(refresh.session_id.0)
        .bind(refresh.created_at.as_micros())
        .bind(micros(refresh.used_at))
        .execute(&mut *tx)
        .await
        .map_err(refused(
            "this refresh token already exists",
            "no such session",
        ))?;
        tx.commit().await.map_err(db)
    }

    async fn session(&self, id: SessionId) -> StoreResult<Option<SessionRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {SESSION_COLUMNS} FROM sessions WHERE id = $1"
        ))
        .bind(id.0)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.as_ref().map(session_from_row).transpose()
    }

    async fn sessions_of_user(
        &self,
        user: UserId,
        active_only: bool,
        now: Timestamp,
    ) -> StoreResult<Vec<SessionRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {SESSION_COLUMNS} FROM sessions
             WHERE user_id = $1 AND (NOT $2 OR (revoked_at IS NULL AND expires_at > $3))
             ORDER BY created_at DESC, id DESC"
        ))
        .bind(user.0)
        .bind(active_only)
        .bind(now.as_micros())
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        cpu_work(rows.len(), || rows.iter().map(session_from_row).collect())
    }

    async fn touch_session(
        &self,
        id: SessionId,
        at: Timestamp,
        ip: Option<&str>,
    ) -> StoreResult<()> {
        let done = sqlx::query("UPDATE sessions SET last_seen_at = $2, last_ip = $3 WHERE id = $1")
            .bind(id.0)
            .bind(at.as_micros())
            .bind(ip)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        found(done.rows_affected(), format_args!("session {id}"))
    }

    async fn set_session_org(&self, id: SessionId, org: OrgId) -> StoreResult<()> {
        let done = sqlx::query("UPDATE sessions SET org_id = $2 WHERE id = $1")
            .bind(id.0)
            .bind(org.0)
            .execute(&self.pool)
            .await
            .map_err(refers_to_nothing("no such organization"))?;
        found(done.rows_affected(), format_args!("session {id}"))
    }

    async fn revoke_session(
        &self,
        user: UserId,
        id: SessionId,
        at: Timestamp,
        reason: &str,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE sessions SET revoked_at = $3, revoked_reason = $4
             WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL AND expires_at > $3",
        )
        .bind(id.0)
        .bind(user.0)
        .bind(at.as_micros())
        .bind(reason)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(done.rows_affected() == 1)
    }

    async fn revoke_sessions_of_user(
        &self,
        user: UserId,
        keep: Option<SessionId>,
        at: Timestamp,
        reason: &str,
    ) -> StoreResult<u32> {
        let done = sqlx::query(
            "UPDATE sessions SET revoked_at = $3, revoked_reason = $4
             WHERE user_id = $1 AND revoked_at IS NULL AND expires_at > $3
               AND ($2::uuid IS NULL OR id <> $2)",
        )
        .bind(user.0)
        .bind(keep.map(|id| id.0))
        .bind(at.as_micros())
        .bind(reason)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        // One user's sessions number far below `u32::MAX`; saturate rather than fail after
        // the revocation is committed.
        Ok(u32::try_from(done.rows_affected()).unwrap_or(u32::MAX))
    }

    async fn rotate_refresh_token(
        &self,
        presented_hash: &str,
        next_hash: &str,
        now: Timestamp,
    ) -> StoreResult<RefreshOutcome> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        // A token's session never changes, so it can be read before the family's lock.
        let family: Option<Uuid> =
            sqlx::query_scalar("SELECT session_id FROM refresh_tokens WHERE hash = $1")
                .bind(presented_hash)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db)?;
        let Some(family) = family else {
            tx.rollback().await.map_err(db)?;
            return Ok(RefreshOutcome::Unknown);
        };
        // The session's lock is the family's: every rotation of its tokens holds it, so the
        // token's state read after it is the one the last rotation committed.
        let row = sqlx::query(&format!(
            "SELECT {SESSION_COLUMNS} FROM sessions WHERE id = $1 FOR NO KEY UPDATE"
        ))
        .bind(family)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?;
        let Some(row) = row else {
            tx.rollback().await.map_err(db)?;
            return Ok(RefreshOutcome::Unknown);
        };
        let mut session = session_from_row(&row)?;
        let used_at: Option<Option<i64>> =
            sqlx::query_scalar("SELECT used_at FROM refresh_tokens WHERE hash = $1")
                .bind(presented_hash)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db)?;
        let Some(used_at) = used_at else {
            tx.rollback().await.map_err(db)?;
            return Ok(RefreshOutcome::Unknown);
        };
        // A dead family stays dead whichever of its tokens is presented; only a live one
        // needs revoking on reuse.
        if !session.is_active(now) {
            tx.rollback().await.map_err(db)?;
            return Ok(RefreshOutcome::Inactive(session.id));
        }
        if used_at.is_some() {
            sqlx::query("UPDATE sessions SET revoked_at = $2, revoked_reason = $3 WHERE id = $1")
                .bind(session.id.0)
                .bind(now.as_micros())
                .bind(REASON_REFRESH_TOKEN_REUSE)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
            tx.commit().await.map_err(db)?;
            tracing::warn!(session_id = %session.id, "refresh token reused; session revoked");
            return Ok(RefreshOutcome::Reused(session.id));
        }
        sqlx::query("UPDATE refresh_tokens SET used_at = $2 WHERE hash = $1")
            .bind(presented_hash)
            .bind(now.as_micros())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        sqlx::query(
            "INSERT INTO refresh_tokens (hash, session_id, created_at, used_at)
             VALUES ($1, $2, $3, NULL)",
        )
        .bind(next_hash)
        .bind(session.id.0)
        .bind(now.as_micros())
        .execute(&mut *tx)
        .await
        .map_err(refused(
            "this refresh token already exists",
            "no such session",
        ))?;
        sqlx::query("UPDATE sessions SET last_seen_at = $2 WHERE id = $1")
            .bind(session.id.0)
            .bind(now.as_micros())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        session.last_seen_at = now;
        Ok(RefreshOutcome::Rotated(session))
    }

    // --- API keys ---

    async fn create_api_key(&self, key: &ApiKeyRecord) -> StoreResult<()> {
        sqlx::query(&format!(
            "INSERT INTO api_keys ({API_KEY_COLUMNS})
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
        ))
        .bind(key.id.0)
        .bind(key.user_id.0)
        .bind(key.org_id.0)
        .bind(&key.name)
        .bind(key.role.as_str())
        .bind(&key.hash)
        .bind(key.created_at.as_micros())
        .bind(micros(key.expires_at))
        .bind(micros(key.last_used_at))
        .bind(micros(key.revoked_at))
        .execute(&self.pool)
        .await
        .map_err(refused(
            "an api key with this id or hash already exists",
            "no such user or organization",
        ))?;
        Ok(())
    }

    async fn api_key(&self, id: ApiKeyId) -> StoreResult<Option<ApiKeyRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {API_KEY_COLUMNS} FROM api_keys WHERE id = $1"
        ))
        .bind(id.0)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.as_ref().map(api_key_from_row).transpose()
    }

    async fn api_keys_of_user(&self, user: UserId) -> StoreResult<Vec<ApiKeyRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {API_KEY_COLUMNS} FROM api_keys WHERE user_id = $1
             ORDER BY created_at DESC, id DESC"
        ))
        .bind(user.0)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        cpu_work(rows.len(), || rows.iter().map(api_key_from_row).collect())
    }

    async fn revoke_api_key(&self, user: UserId, id: ApiKeyId, at: Timestamp) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE api_keys SET revoked_at = $3
             WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL
               AND (expires_at IS NULL OR expires_at > $3)",
        )
        .bind(id.0)
        .bind(user.0)
        .bind(at.as_micros())
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(done.rows_affected() == 1)
    }

    async fn touch_api_key(&self, id: ApiKeyId, at: Timestamp) -> StoreResult<()> {
        let done = sqlx::query("UPDATE api_keys SET last_used_at = $2 WHERE id = $1")
            .bind(id.0)
            .bind(at.as_micros())
            .execute(&self.pool)
            .await
            .map_err(db)?;
        found(done.rows_affected(), format_args!("api key {id}"))
    }

    // --- one-time tokens ---

    async fn create_one_time_token(&self, token: &OneTimeTokenRecord) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO one_time_tokens (hash, user_id, purpose, created_at, expires_at, used_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&token.hash)
        .bind(token.user_id.0)
        .bind(token.purpose.as_str())
        .bind(token.created_at.as_micros())
        .bind(token.expires_at.as_micros())
        .bind(micros(token.used_at))
        .execute(&self.pool)
        .await
        .map_err(refused(
            "this one-time token already exists",
            "no such user",
        ))?;
        Ok(())
    }

    async fn consume_one_time_token(
        &self,
        hash: &str,
        purpose: TokenPurpose,
        now: Timestamp,
    ) -> StoreResult<Option<OneTimeTokenRecord>> {
        // One statement: the check and the mark cannot be separated by another consumer, and
        // a consumer that waited for another's mark re-checks the marked row.
        let row = sqlx::query(
            "UPDATE one_time_tokens SET used_at = $3
             WHERE hash = $1 AND purpose = $2 AND used_at IS NULL AND expires_at > $3
             RETURNING hash, user_id, purpose, created_at, expires_at, used_at",
        )
        .bind(hash)
        .bind(purpose.as_str())
        .bind(now.as_micros())
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.as_ref().map(one_time_token_from_row).transpose()
    }

    // --- invitations ---

    async fn create_invitation(&self, invitation: &InvitationRecord) -> StoreResult<()> {
        sqlx::query(&format!(
            "INSERT INTO invitations ({INVITATION_COLUMNS})
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        ))
        .bind(invitation.id.0)
        .bind(invitation.org_id.0)
        .bind(&invitation.email)
        .bind(invitation.role.as_str())
        .bind(&invitation.token_hash)
        .bind(invitation.invited_by.0)
        .bind(invitation.created_at.as_micros())
        .bind(invitation.expires_at.as_micros())
        .bind(micros(invitation.accepted_at))
        .bind(invitation.accepted_by.map(|id| id.0))
        .bind(micros(invitation.revoked_at))
        .execute(&self.pool)
        .await
        .map_err(refused(
            "an invitation with this id or token already exists",
            "no such organization or user",
        ))?;
        Ok(())
    }

    async fn invitations(&self, org: OrgId) -> StoreResult<Vec<InvitationRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {INVITATION_COLUMNS} FROM invitations WHERE org_id = $1
             ORDER BY created_at DESC, id DESC"
        ))
        .bind(org.0)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        cpu_work(rows.len(), || {
            rows.iter().map(invitation_from_row).collect()
        })
    }

    async fn invitation_by_token(&self, token_hash: &str) -> StoreResult<Option<InvitationRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {INVITATION_COLUMNS} FROM invitations WHERE token_hash = $1"
        ))
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.as_ref().map(invitation_from_row).transpose()
    }

    async fn accept_invitation(
        &self,
        token_hash: &str,
        user: UserId,
        now: Timestamp,
    ) -> StoreResult<Result<MembershipRecord, InvitationError>> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        // The invitation's lock makes the check and the mark one step: a second acceptance
        // waits for the first and then reads the accepted row.
        let row = sqlx::query(&format!(
            "SELECT {INVITATION_COLUMNS} FROM invitations WHERE token_hash = $1
             FOR NO KEY UPDATE"
        ))
        .bind(token_hash)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?;
        let acceptable = match row.as_ref().map(invitation_from_row).transpose()? {
            None => Err(InvitationError::Unknown),
            Some(found) if found.accepted_at.is_some() => Err(InvitationError::AlreadyAccepted),
            Some(found) if found.revoked_at.is_some() || now >= found.expires_at => {
                Err(InvitationError::Expired)
            }
            Some(found) => Ok(found),
        };
        let invitation = match acceptable {
            Ok(invitation) => invitation,
            Err(refusal) => {
                tx.rollback().await.map_err(db)?;
                return Ok(Err(refusal));
            }
        };
        // The org's lock, after the invitation's (no operation takes them the other way
        // round), orders this change of memberships with the others.
        lock_org(&mut tx, invitation.org_id).await?;
        let existing = membership_in(&mut *tx, invitation.org_id, user).await?;
        let membership = match existing {
            // An invitation only ever raises a role: accepting one for a lower role keeps
            // the higher one.
            Some(existing) if existing.role >= invitation.role => existing,
            Some(existing) => {
                sqlx::query("UPDATE memberships SET role = $3 WHERE org_id = $1 AND user_id = $2")
                    .bind(invitation.org_id.0)
                    .bind(user.0)
                    .bind(invitation.role.as_str())
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
                MembershipRecord {
                    role: invitation.role,
                    ..existing
                }
            }
            None => {
                let membership = MembershipRecord {
                    org_id: invitation.org_id,
                    user_id: user,
                    role: invitation.role,
                    created_at: now,
                };
                sqlx::query(
                    "INSERT INTO memberships (org_id, user_id, role, created_at)
                     VALUES ($1, $2, $3, $4)",
                )
                .bind(membership.org_id.0)
                .bind(membership.user_id.0)
                .bind(membership.role.as_str())
                .bind(membership.created_at.as_micros())
                .execute(&mut *tx)
                .await
                .map_err(refers_to_nothing("no such user"))?;
                membership
            }
        };
        sqlx::query("UPDATE invitations SET accepted_at = $2, accepted_by = $3 WHERE id = $1")
            .bind(invitation.id.0)
            .bind(now.as_micros())
            .bind(user.0)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(Ok(membership))
    }

    async fn revoke_invitation(
        &self,
        org: OrgId,
        id: InvitationId,
        at: Timestamp,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE invitations SET revoked_at = $3
             WHERE id = $1 AND org_id = $2 AND accepted_at IS NULL AND revoked_at IS NULL",
        )
        .bind(id.0)
        .bind(org.0)
        .bind(at.as_micros())
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(done.rows_affected() == 1)
    }

    // --- audit trail ---

    async fn append_audit(&self, event: &NewAuditEvent) -> StoreResult<i64> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        // Appends are serialized so that events become visible in `seq` order, as on SQLite's
        // one writer: a reader paging by `seq` never skips one committed late.
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(AUDIT_APPEND_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        let seq: i64 = sqlx::query_scalar(
            "INSERT INTO audit_events (org_id, actor_user_id, actor_api_key_id, action,
                                       target_kind, target_id, at, ip, request_id, outcome,
                                       status, details)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
             RETURNING seq",
        )
        .bind(event.org_id.map(|id| id.0))
        .bind(event.actor_user_id.map(|id| id.0))
        .bind(event.actor_api_key_id.map(|id| id.0))
        .bind(&event.action)
        .bind(event.target_kind.as_deref())
        .bind(event.target_id.as_deref())
        .bind(event.at.as_micros())
        .bind(event.ip.as_deref())
        .bind(event.request_id.as_deref())
        .bind(event.outcome.as_str())
        .bind(event.status.map(i32::from))
        .bind(Json(&event.details))
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(seq)
    }

    async fn audit_events(&self, filter: &AuditFilter) -> StoreResult<Vec<AuditEventRecord>> {
        // Built per filter rather than with `$n IS NULL OR …` so that the planner can pick
        // the index matching the filters actually given.
        let mut query = QueryBuilder::<Postgres>::new(format!(
            "SELECT {AUDIT_COLUMNS} FROM audit_events WHERE true"
        ));
        if let Some(org) = filter.org_id {
            query.push(" AND org_id = ").push_bind(org.0);
        }
        if let Some(actor) = filter.actor_user_id {
            query.push(" AND actor_user_id = ").push_bind(actor.0);
        }
        if let Some(prefix) = &filter.action_prefix {
            // A comparison of the leading characters rather than `LIKE`, whose wildcards
            // (`_`) occur in action names.
            query
                .push(" AND starts_with(action, ")
                .push_bind(prefix.clone())
                .push(")");
        }
        if let Some(outcome) = filter.outcome {
            query.push(" AND outcome = ").push_bind(outcome.as_str());
        }
        if let Some(since) = filter.since {
            query.push(" AND at >= ").push_bind(since.as_micros());
        }
        if let Some(until) = filter.until {
            query.push(" AND at < ").push_bind(until.as_micros());
        }
        if let Some(before) = filter.before_seq {
            query.push(" AND seq < ").push_bind(before);
        }
        query
            .push(" ORDER BY seq DESC LIMIT ")
            .push_bind(clamp_limit(
                filter.limit,
                AUDIT_LIMIT_DEFAULT,
                AUDIT_LIMIT_MAX,
            ));
        let rows = query.build().fetch_all(&self.pool).await.map_err(db)?;
        cpu_work(rows.len(), || rows.iter().map(audit_from_row).collect())
    }
}
