//! [`CachingIdentityStore`]: the identity port with a short-lived read cache in front of the
//! lookups every authenticated request makes (its session or API key, its user, its
//! membership), so that a request costs one store query for its own work instead of three
//! more for authentication.
//!
//! Invariants:
//! - every write through this store (revoking a session, changing a role, removing a member,
//!   revoking a key, rotating a refresh token…) empties the cache when it ends — also when
//!   it fails or its future is dropped half-way — so on this replica a revocation takes
//!   effect for the very next request;
//! - a read that raced with a write never stores what it read (a generation counter taken
//!   before the read must still hold, checked under the cache's lock, when it stores);
//! - an entry lives at most [`IDENTITY_CACHE_TTL`], which bounds how long another replica
//!   sharing the database (the scale-out setup) may still accept a session revoked
//!   elsewhere;
//! - at most [`IDENTITY_CACHE_MAX_ENTRIES`] entries per kind; when full, the cache is
//!   emptied rather than grown.
//!
//! Appending to the audit trail does not touch the cache: it changes no session, membership
//! or key.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arches_core::identity::{
    ApiKeyRecord, AuditEventRecord, AuditFilter, IdentityStore, InvitationError, InvitationRecord,
    Join, MembershipRecord, NewAuditEvent, OneTimeTokenRecord, OrgRecord, RefreshOutcome,
    RefreshTokenRecord, Role, SessionRecord, TokenPurpose, UserRecord,
};
use arches_core::ports::StoreResult;
use arches_core::{ApiKeyId, InvitationId, OrgId, SessionId, Timestamp, UserId};
use async_trait::async_trait;

/// How long a cached session, membership or API key is used before it is read again.
pub const IDENTITY_CACHE_TTL: Duration = Duration::from_secs(1);

/// Most entries of each kind kept.
pub const IDENTITY_CACHE_MAX_ENTRIES: usize = 100_000;

/// One kind of cached lookup.
struct Entries<K, V> {
    map: Mutex<HashMap<K, (Option<V>, Instant)>>,
}

impl<K: Eq + Hash, V: Clone> Entries<K, V> {
    fn new() -> Self {
        Entries {
            map: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, (Option<V>, Instant)>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cached answer (which may be "none") if it is fresh.
    fn get(&self, key: &K) -> Option<Option<V>> {
        let map = self.lock();
        let (value, at) = map.get(key)?;
        (at.elapsed() < IDENTITY_CACHE_TTL).then(|| value.clone())
    }

    /// Stores `value` unless a write happened since `generation` was read: the check is
    /// made under the map's lock, and writers bump the generation before they take it to
    /// clear, so a stale value is either refused here or removed by that clear.
    fn put(&self, key: K, value: Option<V>, generation: &AtomicU64, seen: u64) {
        let mut map = self.lock();
        if generation.load(Ordering::SeqCst) != seen {
            return;
        }
        if map.len() >= IDENTITY_CACHE_MAX_ENTRIES {
            map.clear();
        }
        map.insert(key, (value, Instant::now()));
    }

    fn clear(&self) {
        self.lock().clear();
    }
}

/// The identity port with a read cache; see the module docs for its rules.
pub struct CachingIdentityStore {
    inner: Arc<dyn IdentityStore>,
    generation: AtomicU64,
    sessions: Entries<SessionId, SessionRecord>,
    users: Entries<UserId, UserRecord>,
    memberships: Entries<(OrgId, UserId), MembershipRecord>,
    api_keys: Entries<ApiKeyId, ApiKeyRecord>,
}

impl CachingIdentityStore {
    /// A cache in front of `inner`.
    pub fn new(inner: Arc<dyn IdentityStore>) -> Self {
        CachingIdentityStore {
            inner,
            generation: AtomicU64::new(0),
            sessions: Entries::new(),
            users: Entries::new(),
            memberships: Entries::new(),
            api_keys: Entries::new(),
        }
    }

    /// Forgets everything; called after every write.
    fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.sessions.clear();
        self.users.clear();
        self.memberships.clear();
        self.api_keys.clear();
    }

    /// Runs a write, then empties the cache — also when the write failed (it may have
    /// changed something before failing) and when the caller drops the future half-way (the
    /// store may have committed already): the guard empties the cache on drop.
    async fn write<T>(&self, result: impl std::future::Future<Output = T>) -> T {
        struct Invalidate<'a>(&'a CachingIdentityStore);
        impl Drop for Invalidate<'_> {
            fn drop(&mut self) {
                self.0.invalidate();
            }
        }
        let _guard = Invalidate(self);
        result.await
    }

    /// A cached read: the fresh entry, or the store's answer, kept only if no write
    /// happened meanwhile.
    async fn read<K: Eq + Hash + Clone, V: Clone>(
        &self,
        entries: &Entries<K, V>,
        key: K,
        load: impl std::future::Future<Output = StoreResult<Option<V>>>,
    ) -> StoreResult<Option<V>> {
        if let Some(hit) = entries.get(&key) {
            return Ok(hit);
        }
        let generation = self.generation.load(Ordering::SeqCst);
        let value = load.await?;
        entries.put(key, value.clone(), &self.generation, generation);
        Ok(value)
    }
}

#[async_trait]
impl IdentityStore for CachingIdentityStore {
    async fn create_org(&self, org: &OrgRecord, owner: UserId) -> StoreResult<()> {
        self.write(self.inner.create_org(org, owner)).await
    }
    async fn org(&self, id: OrgId) -> StoreResult<Option<OrgRecord>> {
        self.inner.org(id).await
    }
    async fn rename_org(&self, id: OrgId, name: &str) -> StoreResult<()> {
        self.write(self.inner.rename_org(id, name)).await
    }
    async fn orgs_of_user(&self, user: UserId) -> StoreResult<Vec<(OrgRecord, Role)>> {
        self.inner.orgs_of_user(user).await
    }
    async fn create_user(
        &self,
        user: &UserRecord,
        join: Option<Join>,
    ) -> StoreResult<Option<Role>> {
        self.write(self.inner.create_user(user, join)).await
    }
    async fn user(&self, id: UserId) -> StoreResult<Option<UserRecord>> {
        self.read(&self.users, id, self.inner.user(id)).await
    }
    async fn user_by_email(&self, email: &str) -> StoreResult<Option<UserRecord>> {
        self.inner.user_by_email(email).await
    }
    async fn update_user(&self, user: &UserRecord) -> StoreResult<()> {
        self.write(self.inner.update_user(user)).await
    }
    async fn advance_totp_step(&self, user: UserId, step: u64) -> StoreResult<bool> {
        self.write(self.inner.advance_totp_step(user, step)).await
    }
    async fn replace_recovery_codes(&self, user: UserId, hashes: &[String]) -> StoreResult<()> {
        self.write(self.inner.replace_recovery_codes(user, hashes))
            .await
    }
    async fn consume_recovery_code(
        &self,
        user: UserId,
        hash: &str,
        now: Timestamp,
    ) -> StoreResult<bool> {
        self.write(self.inner.consume_recovery_code(user, hash, now))
            .await
    }
    async fn recovery_codes_left(&self, user: UserId) -> StoreResult<u32> {
        self.inner.recovery_codes_left(user).await
    }
    async fn membership(&self, org: OrgId, user: UserId) -> StoreResult<Option<MembershipRecord>> {
        self.read(
            &self.memberships,
            (org, user),
            self.inner.membership(org, user),
        )
        .await
    }
    async fn members(&self, org: OrgId) -> StoreResult<Vec<(MembershipRecord, UserRecord)>> {
        self.inner.members(org).await
    }
    async fn add_member(&self, membership: &MembershipRecord) -> StoreResult<()> {
        self.write(self.inner.add_member(membership)).await
    }
    async fn set_role(&self, org: OrgId, user: UserId, role: Role) -> StoreResult<()> {
        self.write(self.inner.set_role(org, user, role)).await
    }
    async fn remove_member(&self, org: OrgId, user: UserId, now: Timestamp) -> StoreResult<()> {
        self.write(self.inner.remove_member(org, user, now)).await
    }
    async fn create_session(
        &self,
        session: &SessionRecord,
        refresh: &RefreshTokenRecord,
    ) -> StoreResult<()> {
        self.write(self.inner.create_session(session, refresh))
            .await
    }
    async fn session(&self, id: SessionId) -> StoreResult<Option<SessionRecord>> {
        self.read(&self.sessions, id, self.inner.session(id)).await
    }
    async fn sessions_of_user(
        &self,
        user: UserId,
        active_only: bool,
        now: Timestamp,
    ) -> StoreResult<Vec<SessionRecord>> {
        self.inner.sessions_of_user(user, active_only, now).await
    }
    async fn touch_session(
        &self,
        id: SessionId,
        at: Timestamp,
        ip: Option<&str>,
    ) -> StoreResult<()> {
        self.write(self.inner.touch_session(id, at, ip)).await
    }
    async fn set_session_org(&self, id: SessionId, org: OrgId) -> StoreResult<()> {
        self.write(self.inner.set_session_org(id, org)).await
    }
    async fn revoke_session(
        &self,
        user: UserId,
        id: SessionId,
        at: Timestamp,
        reason: &str,
    ) -> StoreResult<bool> {
        self.write(self.inner.revoke_session(user, id, at, reason))
            .await
    }
    async fn revoke_sessions_of_user(
        &self,
        user: UserId,
        keep: Option<SessionId>,
        at: Timestamp,
        reason: &str,
    ) -> StoreResult<u32> {
        self.write(self.inner.revoke_sessions_of_user(user, keep, at, reason))
            .await
    }
    async fn rotate_refresh_token(
        &self,
        presented_hash: &str,
        next_hash: &str,
        now: Timestamp,
    ) -> StoreResult<RefreshOutcome> {
        self.write(
            self.inner
                .rotate_refresh_token(presented_hash, next_hash, now),
        )
        .await
    }
    async fn create_api_key(&self, key: &ApiKeyRecord) -> StoreResult<()> {
        self.write(self.inner.create_api_key(key)).await
    }
    async fn api_key(&self, id: ApiKeyId) -> StoreResult<Option<ApiKeyRecord>> {
        self.read(&self.api_keys, id, self.inner.api_key(id)).await
    }
    async fn api_keys_of_user(&self, user: UserId) -> StoreResult<Vec<ApiKeyRecord>> {
        self.inner.api_keys_of_user(user).await
    }
    async fn revoke_api_key(&self, user: UserId, id: ApiKeyId, at: Timestamp) -> StoreResult<bool> {
        self.write(self.inner.revoke_api_key(user, id, at)).await
    }
    async fn touch_api_key(&self, id: ApiKeyId, at: Timestamp) -> StoreResult<()> {
        self.write(self.inner.touch_api_key(id, at)).await
    }
    async fn create_one_time_token(&self, token: &OneTimeTokenRecord) -> StoreResult<()> {
        self.write(self.inner.create_one_time_token(token)).await
    }
    async fn consume_one_time_token(
        &self,
        hash: &str,
        purpose: TokenPurpose,
        now: Timestamp,
    ) -> StoreResult<Option<OneTimeTokenRecord>> {
        self.write(self.inner.consume_one_time_token(hash, purpose, now))
            .await
    }
    async fn create_invitation(&self, invitation: &InvitationRecord) -> StoreResult<()> {
        self.write(self.inner.create_invitation(invitation)).await
    }
    async fn invitations(&self, org: OrgId) -> StoreResult<Vec<InvitationRecord>> {
        self.inner.invitations(org).await
    }
    async fn invitation_by_token(&self, token_hash: &str) -> StoreResult<Option<InvitationRecord>> {
        self.inner.invitation_by_token(token_hash).await
    }
    async fn accept_invitation(
        &self,
        token_hash: &str,
        user: UserId,
        now: Timestamp,
    ) -> StoreResult<Result<MembershipRecord, InvitationError>> {
        self.write(self.inner.accept_invitation(token_hash, user, now))
            .await
    }
    async fn revoke_invitation(
        &self,
        org: OrgId,
        id: InvitationId,
        at: Timestamp,
    ) -> StoreResult<bool> {
        self.write(self.inner.revoke_invitation(org, id, at)).await
    }
    async fn append_audit(&self, event: &NewAuditEvent) -> StoreResult<i64> {
        self.inner.append_audit(event).await
    }
    async fn audit_events(&self, filter: &AuditFilter) -> StoreResult<Vec<AuditEventRecord>> {
        self.inner.audit_events(filter).await
    }
}
