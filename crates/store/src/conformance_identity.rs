//! The conformance suite of the identity port: what every [`IdentityStore`] backend must do.
//!
//! Each function takes a fresh store and panics when the backend breaks the contract. A
//! backend runs the whole suite with
//! [`identity_conformance_tests!`](crate::identity_conformance_tests), which expands into one
//! `#[tokio::test]` per function, each on its own database:
//!
//! ```ignore
//! arches_store::identity_conformance_tests!(async {
//!     let directory = tempfile::tempdir().unwrap();
//!     let store = SqliteStore::open(&directory.path().join("arches.db"), Durability::Normal)
//!         .await
//!         .unwrap();
//!     IdentityFixture::new(Arc::new(store), directory)
//! });
//! ```
//!
//! Besides the port's documentation, the suite pins down these rules:
//! - a fresh store holds the default org ([`OrgId::DEFAULT`], slug `default`) with no member;
//! - a refused write stores nothing (a signup with a duplicate email joins no org);
//! - an update of a row that does not exist (`rename_org`, `update_user`, `set_role`,
//!   `remove_member`, `touch_session`, `set_session_org`, `touch_api_key`) fails with
//!   [`StoreError::NotFound`];
//! - a session, one-time token or invitation is expired from its `expires_at` on;
//! - once a refresh token's reuse revoked its session, every token of the family is
//!   [`RefreshOutcome::Inactive`], and a reused or refused presentation stores no next token;
//! - removing a member revokes, at the given time, the sessions acting in that org and the
//!   API keys of that org, and only those;
//! - an accepted invitation adds a membership joined at the acceptance time; raising an
//!   existing membership keeps its join time.

use std::any::Any;
use std::sync::Arc;

use arches_core::identity::*;
use arches_core::ids::{ApiKeyId, InvitationId, OrgId, SessionId, UserId};
use arches_core::ports::StoreError;
use arches_core::time::Timestamp;
use serde_json::json;
use sha2::{Digest, Sha256};

/// An identity store under test, with whatever must live as long as it (a temporary
/// directory, a database to drop afterwards).
pub struct IdentityFixture {
    store: Arc<dyn IdentityStore>,
    _keep_alive: Box<dyn Any + Send>,
}

impl IdentityFixture {
    /// A fixture holding `store` and keeping `keep_alive` until the test ends.
    pub fn new(store: Arc<dyn IdentityStore>, keep_alive: impl Any + Send) -> Self {
        Self {
            store,
            _keep_alive: Box::new(keep_alive),
        }
    }

    /// The store under test.
    pub fn store(&self) -> Arc<dyn IdentityStore> {
        Arc::clone(&self.store)
    }
}

/// Expands into a module `identity_conformance` of one `#[tokio::test]` per function of the
/// [identity conformance suite](crate::conformance_identity), each with a fresh store. The
/// module keeps the names apart from the storage suite's and lets `cargo test identity`
/// select the suite; it imports everything of the invoking module, so `$factory` may use
/// the helpers defined there.
///
/// `$factory` is an expression evaluating to a future of an
/// [`IdentityFixture`](crate::conformance_identity::IdentityFixture); it is evaluated once
/// per test. The calling crate needs `tokio` with the `macros` and `rt` features.
#[macro_export]
macro_rules! identity_conformance_tests {
    ($factory:expr) => {
        $crate::__identity_conformance_tests!(
            $factory;
            a_user_round_trips_and_a_duplicate_email_is_a_conflict,
            updating_a_user_replaces_every_field,
            the_first_member_of_an_org_becomes_owner_and_the_next_gets_the_given_role,
            without_owner_if_first_the_first_member_gets_the_given_role,
            a_signup_joining_an_unknown_org_stores_nothing,
            concurrent_first_signups_make_exactly_one_owner,
            creating_an_org_makes_its_creator_owner_and_slugs_are_unique,
            the_orgs_of_a_user_come_with_the_role_by_org_creation,
            the_last_owner_can_be_neither_demoted_nor_removed,
            removing_a_member_revokes_their_sessions_and_api_keys_in_that_org,
            sessions_are_listed_newest_first_and_active_only_leaves_out_revoked_and_expired,
            touching_a_session_records_activity_and_switching_moves_its_org,
            a_user_revokes_their_own_session_but_not_another_users,
            revoking_the_other_sessions_keeps_the_current_one,
            a_refresh_token_rotates_once_and_its_reuse_revokes_the_family,
            a_refresh_token_of_an_expired_or_revoked_session_is_inactive,
            concurrent_rotations_of_one_refresh_token_rotate_exactly_once,
            api_keys_are_created_listed_newest_first_touched_and_revoked,
            a_one_time_token_is_consumed_once_for_its_purpose_before_it_expires,
            concurrent_consumptions_of_a_one_time_token_succeed_once,
            recovery_codes_are_consumed_once_and_replaced_whole,
            a_totp_step_only_advances,
            an_invitation_is_accepted_once_and_adds_the_membership,
            expired_revoked_and_unknown_invitations_are_refused,
            accepting_an_invitation_raises_a_lower_role_and_never_lowers_one,
            concurrent_acceptances_of_an_invitation_succeed_once,
            audit_events_get_increasing_seqs_and_round_trip,
            audit_events_are_filtered_and_paged_newest_first,
            a_zero_audit_limit_returns_the_default_page,
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __identity_conformance_tests {
    ($factory:expr; $($name:ident),+ $(,)?) => {
        mod identity_conformance {
            #[allow(unused_imports)]
            use super::*;

            $(
                #[tokio::test]
                async fn $name() {
                    let fixture: $crate::conformance_identity::IdentityFixture = $factory.await;
                    $crate::conformance_identity::$name(fixture.store()).await;
                }
            )+
        }
    };
}

/// Far enough in the future that nothing in a test expires.
const NEVER: Timestamp = Timestamp(i64::MAX / 2);

/// The hex SHA-256 of a label: what the auth layer stores for a token, key or code.
fn digest(label: &str) -> String {
    hex::encode(Sha256::digest(label.as_bytes()))
}

fn user(email: &str, created_at: i64) -> UserRecord {
    UserRecord {
        id: UserId::new(),
        email: email.to_owned(),
        display_name: email.split('@').next().unwrap_or(email).to_owned(),
        password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo".to_owned(),
        email_verified_at: None,
        totp_secret: None,
        totp_enabled_at: None,
        totp_last_step: None,
        created_at: Timestamp(created_at),
        disabled_at: None,
    }
}

/// Stores a user who belongs to no org.
async fn stored_user(store: &dyn IdentityStore, email: &str, created_at: i64) -> UserRecord {
    let user = user(email, created_at);
    assert_eq!(store.create_user(&user, None).await.unwrap(), None);
    user
}

fn org(slug: &str, created_at: i64) -> OrgRecord {
    OrgRecord {
        id: OrgId::new(),
        slug: slug.to_owned(),
        name: slug.to_uppercase(),
        created_at: Timestamp(created_at),
    }
}

/// Stores an org and a user who owns it.
async fn org_with_owner(
    store: &dyn IdentityStore,
    slug: &str,
    created_at: i64,
) -> (OrgRecord, UserRecord) {
    let owner = stored_user(store, &format!("owner@{slug}.example"), created_at).await;
    let org = org(slug, created_at);
    store.create_org(&org, owner.id).await.unwrap();
    (org, owner)
}

async fn add_member(store: &dyn IdentityStore, org: OrgId, user: UserId, role: Role, at: i64) {
    store
        .add_member(&MembershipRecord {
            org_id: org,
            user_id: user,
            role,
            created_at: Timestamp(at),
        })
        .await
        .unwrap();
}

async fn role_of(store: &dyn IdentityStore, org: OrgId, user: UserId) -> Option<Role> {
    store
        .membership(org, user)
        .await
        .unwrap()
        .map(|membership| membership.role)
}

fn session(user: &UserRecord, org: OrgId, created_at: i64, expires_at: i64) -> SessionRecord {
    SessionRecord {
        id: SessionId::new(),
        user_id: user.id,
        org_id: org,
        user_agent: Some("Mozilla/5.0 (X11; Linux x86_64)".to_owned()),
        ip: Some("192.0.2.10".to_owned()),
        last_ip: Some("192.0.2.10".to_owned()),
        created_at: Timestamp(created_at),
        last_seen_at: Timestamp(created_at),
        expires_at: Timestamp(expires_at),
        revoked_at: None,
        revoked_reason: None,
    }
}

/// Stores a session with its first refresh token, the digest of `refresh_label`.
async fn stored_session(
    store: &dyn IdentityStore,
    session: SessionRecord,
    refresh_label: &str,
) -> SessionRecord {
    let refresh = RefreshTokenRecord {
        hash: digest(refresh_label),
        session_id: session.id,
        created_at: session.created_at,
        used_at: None,
    };
    store.create_session(&session, &refresh).await.unwrap();
    session
}

fn ids(sessions: &[SessionRecord]) -> Vec<SessionId> {
    sessions.iter().map(|session| session.id).collect()
}

fn api_key(user: &UserRecord, org: OrgId, label: &str, created_at: i64) -> ApiKeyRecord {
    ApiKeyRecord {
        id: ApiKeyId::new(),
        user_id: user.id,
        org_id: org,
        name: label.to_owned(),
        role: Role::Editor,
        hash: digest(label),
        created_at: Timestamp(created_at),
        expires_at: None,
        last_used_at: None,
        revoked_at: None,
    }
}

fn one_time_token(
    user: &UserRecord,
    label: &str,
    purpose: TokenPurpose,
    expires_at: i64,
) -> OneTimeTokenRecord {
    OneTimeTokenRecord {
        hash: digest(label),
        user_id: user.id,
        purpose,
        created_at: Timestamp(1_000),
        expires_at: Timestamp(expires_at),
        used_at: None,
    }
}

fn invitation(
    org: &OrgRecord,
    invited_by: &UserRecord,
    role: Role,
    label: &str,
    created_at: i64,
    expires_at: i64,
) -> InvitationRecord {
    InvitationRecord {
        id: InvitationId::new(),
        org_id: org.id,
        email: format!("{label}@invited.example"),
        role,
        token_hash: digest(label),
        invited_by: invited_by.id,
        created_at: Timestamp(created_at),
        expires_at: Timestamp(expires_at),
        accepted_at: None,
        accepted_by: None,
        revoked_at: None,
    }
}

fn audit(
    org: Option<OrgId>,
    actor: Option<UserId>,
    action: &str,
    outcome: AuditOutcome,
    at: i64,
) -> NewAuditEvent {
    NewAuditEvent {
        org_id: org,
        actor_user_id: actor,
        actor_api_key_id: None,
        action: action.to_owned(),
        target_kind: None,
        target_id: None,
        at: Timestamp(at),
        ip: None,
        request_id: None,
        outcome,
        status: None,
        details: json!({}),
    }
}

fn seqs(events: &[AuditEventRecord]) -> Vec<i64> {
    events.iter().map(|event| event.seq).collect()
}

fn assert_conflict<T: std::fmt::Debug>(result: Result<T, StoreError>, what: &str) {
    assert!(
        matches!(result, Err(StoreError::Conflict(_))),
        "{what}: expected a conflict, got {result:?}"
    );
}

fn assert_not_found<T: std::fmt::Debug>(result: Result<T, StoreError>, what: &str) {
    assert!(
        matches!(result, Err(StoreError::NotFound(_))),
        "{what}: expected not found, got {result:?}"
    );
}

// --- users ---

/// Every field of a user reads back by id and by email; a second user with the same email
/// is refused with a conflict and stores nothing.
pub async fn a_user_round_trips_and_a_duplicate_email_is_a_conflict(store: Arc<dyn IdentityStore>) {
    let mut alice = user("alice@example.com", 1_000);
    alice.email_verified_at = Some(Timestamp(1_500));
    alice.totp_secret = Some("JBSWY3DPEHPK3PXP".to_owned());
    alice.totp_enabled_at = Some(Timestamp(1_600));
    alice.totp_last_step = Some(57_000_000);
    alice.disabled_at = Some(Timestamp(1_700));
    assert_eq!(store.create_user(&alice, None).await.unwrap(), None);
    assert_eq!(store.user(alice.id).await.unwrap(), Some(alice.clone()));
    assert_eq!(
        store.user_by_email("alice@example.com").await.unwrap(),
        Some(alice.clone())
    );
    assert_eq!(store.user_by_email("bob@example.com").await.unwrap(), None);
    assert_eq!(store.user(UserId::new()).await.unwrap(), None);

    let twin = user("alice@example.com", 2_000);
    let join = Join {
        org_id: OrgId::DEFAULT,
        role: Role::Viewer,
        owner_if_first: true,
    };
    assert_conflict(
        store.create_user(&twin, Some(join)).await,
        "a duplicate email",
    );
    assert_eq!(store.user(twin.id).await.unwrap(), None);
    assert!(
        store.members(OrgId::DEFAULT).await.unwrap().is_empty(),
        "the refused signup joined no org"
    );
}

/// An update replaces every field, `None` clearing a stored value; an email taken by another
/// user is a conflict, and an unknown user is not found.
pub async fn updating_a_user_replaces_every_field(store: Arc<dyn IdentityStore>) {
    let mut alice = stored_user(&*store, "alice@example.com", 1_000).await;
    alice.email = "alice@example.org".to_owned();
    alice.display_name = "Alice Liddell".to_owned();
    alice.password_hash = "$argon2id$v=19$m=19456,t=2,p=1$bmV3c2FsdA$bmV3aGFzaA".to_owned();
    alice.email_verified_at = Some(Timestamp(2_000));
    alice.totp_secret = Some("KRSXG5CTMVRXEZLU".to_owned());
    alice.totp_enabled_at = Some(Timestamp(2_100));
    alice.totp_last_step = Some(7);
    alice.disabled_at = Some(Timestamp(2_200));
    store.update_user(&alice).await.unwrap();
    assert_eq!(store.user(alice.id).await.unwrap(), Some(alice.clone()));
    assert_eq!(
        store.user_by_email("alice@example.org").await.unwrap(),
        Some(alice.clone())
    );
    assert_eq!(
        store.user_by_email("alice@example.com").await.unwrap(),
        None
    );

    // The TOTP step never goes back: a copy read before a login used step 7 must not
    // reopen that code when it is written back.
    alice.totp_secret = None;
    alice.totp_enabled_at = None;
    alice.totp_last_step = None;
    alice.disabled_at = None;
    store.update_user(&alice).await.unwrap();
    alice.totp_last_step = Some(7);
    assert_eq!(store.user(alice.id).await.unwrap(), Some(alice.clone()));
    let mut stale = alice.clone();
    stale.totp_last_step = Some(3);
    store.update_user(&stale).await.unwrap();
    assert_eq!(store.user(alice.id).await.unwrap(), Some(alice.clone()));

    let bob = stored_user(&*store, "bob@example.com", 3_000).await;
    let mut taken = bob.clone();
    taken.email = alice.email.clone();
    assert_conflict(store.update_user(&taken).await, "an email taken by another");
    assert_eq!(store.user(bob.id).await.unwrap(), Some(bob));

    assert_not_found(
        store.update_user(&user("carol@example.com", 4_000)).await,
        "an unknown user",
    );
}

// --- memberships ---

/// With `owner_if_first`, the first user of an org with no member becomes its owner; the
/// next ones get the role asked for. Members are listed with their accounts by join time.
pub async fn the_first_member_of_an_org_becomes_owner_and_the_next_gets_the_given_role(
    store: Arc<dyn IdentityStore>,
) {
    let join = |role| {
        Some(Join {
            org_id: OrgId::DEFAULT,
            role,
            owner_if_first: true,
        })
    };
    let first = user("first@example.com", 1_000);
    let second = user("second@example.com", 2_000);
    let third = user("third@example.com", 3_000);
    assert_eq!(
        store.create_user(&first, join(Role::Viewer)).await.unwrap(),
        Some(Role::Owner)
    );
    assert_eq!(
        store
            .create_user(&second, join(Role::Editor))
            .await
            .unwrap(),
        Some(Role::Editor)
    );
    let no_owner_if_first = Some(Join {
        org_id: OrgId::DEFAULT,
        role: Role::Admin,
        owner_if_first: false,
    });
    assert_eq!(
        store.create_user(&third, no_owner_if_first).await.unwrap(),
        Some(Role::Admin)
    );

    assert_eq!(
        store.membership(OrgId::DEFAULT, first.id).await.unwrap(),
        Some(MembershipRecord {
            org_id: OrgId::DEFAULT,
            user_id: first.id,
            role: Role::Owner,
            created_at: first.created_at,
        })
    );
    let members = store.members(OrgId::DEFAULT).await.unwrap();
    let listed: Vec<(UserId, Role)> = members.iter().map(|(m, u)| (u.id, m.role)).collect();
    assert_eq!(
        listed,
        [
            (first.id, Role::Owner),
            (second.id, Role::Editor),
            (third.id, Role::Admin)
        ]
    );
    assert_eq!(members[1].1, second, "members come with their accounts");
    assert!(members.iter().all(|(m, u)| m.user_id == u.id));
}

/// Without `owner_if_first`, even the first member gets the role asked for; a later signup
/// with `owner_if_first` then finds a member and gets its role too.
pub async fn without_owner_if_first_the_first_member_gets_the_given_role(
    store: Arc<dyn IdentityStore>,
) {
    let first = user("first@example.com", 1_000);
    let joined = store
        .create_user(
            &first,
            Some(Join {
                org_id: OrgId::DEFAULT,
                role: Role::Viewer,
                owner_if_first: false,
            }),
        )
        .await
        .unwrap();
    assert_eq!(joined, Some(Role::Viewer));
    let second = user("second@example.com", 2_000);
    let joined = store
        .create_user(
            &second,
            Some(Join {
                org_id: OrgId::DEFAULT,
                role: Role::Editor,
                owner_if_first: true,
            }),
        )
        .await
        .unwrap();
    assert_eq!(joined, Some(Role::Editor));
    assert_eq!(
        role_of(&*store, OrgId::DEFAULT, first.id).await,
        Some(Role::Viewer)
    );
}

/// A signup that cannot join its org (the org does not exist) fails whole: no user is left.
pub async fn a_signup_joining_an_unknown_org_stores_nothing(store: Arc<dyn IdentityStore>) {
    let lost = user("lost@example.com", 1_000);
    let result = store
        .create_user(
            &lost,
            Some(Join {
                org_id: OrgId::new(),
                role: Role::Viewer,
                owner_if_first: true,
            }),
        )
        .await;
    assert!(result.is_err(), "joining an unknown org fails: {result:?}");
    assert_eq!(store.user(lost.id).await.unwrap(), None);
    assert_eq!(store.user_by_email("lost@example.com").await.unwrap(), None);
}

/// Of concurrent first signups to an empty org, exactly one becomes the owner.
pub async fn concurrent_first_signups_make_exactly_one_owner(store: Arc<dyn IdentityStore>) {
    let signups: Vec<_> = (0..4)
        .map(|i| {
            let store = Arc::clone(&store);
            let founder = user(&format!("founder{i}@example.com"), 1_000 + i);
            tokio::spawn(async move {
                store
                    .create_user(
                        &founder,
                        Some(Join {
                            org_id: OrgId::DEFAULT,
                            role: Role::Viewer,
                            owner_if_first: true,
                        }),
                    )
                    .await
            })
        })
        .collect();
    let mut roles = Vec::new();
    for signup in signups {
        roles.push(signup.await.unwrap().unwrap().expect("every signup joins"));
    }
    roles.sort();
    assert_eq!(
        roles,
        [Role::Viewer, Role::Viewer, Role::Viewer, Role::Owner]
    );
    let members = store.members(OrgId::DEFAULT).await.unwrap();
    let owners = members
        .iter()
        .filter(|(membership, _)| membership.role == Role::Owner)
        .count();
    assert_eq!((members.len(), owners), (4, 1));
}

/// Creating an org makes its creator the owner; slugs are unique; an org can be renamed.
pub async fn creating_an_org_makes_its_creator_owner_and_slugs_are_unique(
    store: Arc<dyn IdentityStore>,
) {
    let default = store
        .org(OrgId::DEFAULT)
        .await
        .unwrap()
        .expect("a fresh store holds the default org");
    assert_eq!(default.slug, "default");

    let alice = stored_user(&*store, "alice@example.com", 1_000).await;
    let acme = org("acme", 2_000);
    store.create_org(&acme, alice.id).await.unwrap();
    assert_eq!(store.org(acme.id).await.unwrap(), Some(acme.clone()));
    assert_eq!(role_of(&*store, acme.id, alice.id).await, Some(Role::Owner));
    assert_eq!(store.members(acme.id).await.unwrap().len(), 1);
    assert_eq!(store.org(OrgId::new()).await.unwrap(), None);

    let copycat = org("acme", 3_000);
    assert_conflict(
        store.create_org(&copycat, alice.id).await,
        "a duplicate slug",
    );
    assert_eq!(store.org(copycat.id).await.unwrap(), None);
    assert!(
        store.members(copycat.id).await.unwrap().is_empty(),
        "the refused org has no owner"
    );

    store.rename_org(acme.id, "Acme Corporation").await.unwrap();
    let renamed = store.org(acme.id).await.unwrap().unwrap();
    assert_eq!(
        (renamed.name.as_str(), renamed.slug.as_str()),
        ("Acme Corporation", "acme")
    );
    assert_not_found(
        store.rename_org(OrgId::new(), "Nobody").await,
        "renaming an unknown org",
    );
}

/// The orgs of a user are listed with the user's role there, oldest org first.
pub async fn the_orgs_of_a_user_come_with_the_role_by_org_creation(store: Arc<dyn IdentityStore>) {
    // The later org is created first, so the order shown is the creation time's.
    let (globex, _) = org_with_owner(&*store, "globex", 3_000).await;
    let alice = stored_user(&*store, "alice@example.com", 1_000).await;
    let acme = org("acme", 2_000);
    store.create_org(&acme, alice.id).await.unwrap();
    add_member(&*store, globex.id, alice.id, Role::Viewer, 4_000).await;

    assert_eq!(
        store.orgs_of_user(alice.id).await.unwrap(),
        [(acme, Role::Owner), (globex, Role::Viewer)]
    );
    assert!(store.orgs_of_user(UserId::new()).await.unwrap().is_empty());
}

/// An org keeps at least one owner: its last owner can be neither demoted nor removed, until
/// another member is made owner. Adding a member twice is a conflict; changing or removing
/// a non-member is not found.
pub async fn the_last_owner_can_be_neither_demoted_nor_removed(store: Arc<dyn IdentityStore>) {
    let (acme, owner) = org_with_owner(&*store, "acme", 1_000).await;
    assert_conflict(
        store.set_role(acme.id, owner.id, Role::Admin).await,
        "demoting the last owner",
    );
    assert_conflict(
        store
            .remove_member(acme.id, owner.id, Timestamp(2_000))
            .await,
        "removing the last owner",
    );
    assert_eq!(role_of(&*store, acme.id, owner.id).await, Some(Role::Owner));
    store
        .set_role(acme.id, owner.id, Role::Owner)
        .await
        .expect("keeping the owner role is allowed");

    let bob = stored_user(&*store, "bob@example.com", 1_500).await;
    add_member(&*store, acme.id, bob.id, Role::Editor, 2_000).await;
    let again = MembershipRecord {
        org_id: acme.id,
        user_id: bob.id,
        role: Role::Admin,
        created_at: Timestamp(2_500),
    };
    assert_conflict(store.add_member(&again).await, "adding a member twice");
    assert_eq!(role_of(&*store, acme.id, bob.id).await, Some(Role::Editor));

    store.set_role(acme.id, bob.id, Role::Owner).await.unwrap();
    store
        .set_role(acme.id, owner.id, Role::Admin)
        .await
        .unwrap();
    assert_eq!(role_of(&*store, acme.id, owner.id).await, Some(Role::Admin));
    assert_conflict(
        store.remove_member(acme.id, bob.id, Timestamp(3_000)).await,
        "removing the new last owner",
    );
    store
        .set_role(acme.id, owner.id, Role::Owner)
        .await
        .unwrap();
    store
        .remove_member(acme.id, bob.id, Timestamp(3_000))
        .await
        .unwrap();
    assert_eq!(store.membership(acme.id, bob.id).await.unwrap(), None);

    assert_not_found(
        store.set_role(acme.id, bob.id, Role::Viewer).await,
        "changing the role of a non-member",
    );
    assert_not_found(
        store.remove_member(acme.id, bob.id, Timestamp(4_000)).await,
        "removing a non-member",
    );
}

/// Removing a member revokes that user's sessions acting in the org and API keys of the
/// org, and nothing else.
pub async fn removing_a_member_revokes_their_sessions_and_api_keys_in_that_org(
    store: Arc<dyn IdentityStore>,
) {
    let (acme, owner) = org_with_owner(&*store, "acme", 1_000).await;
    let (globex, _) = org_with_owner(&*store, "globex", 1_100).await;
    let bob = stored_user(&*store, "bob@example.com", 1_200).await;
    add_member(&*store, acme.id, bob.id, Role::Editor, 1_300).await;
    add_member(&*store, globex.id, bob.id, Role::Viewer, 1_400).await;

    let in_acme = stored_session(&*store, session(&bob, acme.id, 2_000, NEVER.0), "b1").await;
    let in_globex = stored_session(&*store, session(&bob, globex.id, 2_100, NEVER.0), "b2").await;
    let owners = stored_session(&*store, session(&owner, acme.id, 2_200, NEVER.0), "o1").await;
    let key_acme = api_key(&bob, acme.id, "bob-acme", 2_300);
    let key_globex = api_key(&bob, globex.id, "bob-globex", 2_400);
    let owners_key = api_key(&owner, acme.id, "owner-acme", 2_500);
    for key in [&key_acme, &key_globex, &owners_key] {
        store.create_api_key(key).await.unwrap();
    }

    store
        .remove_member(acme.id, bob.id, Timestamp(5_000))
        .await
        .unwrap();
    assert_eq!(store.membership(acme.id, bob.id).await.unwrap(), None);
    assert_eq!(
        role_of(&*store, globex.id, bob.id).await,
        Some(Role::Viewer)
    );

    let revoked = store.session(in_acme.id).await.unwrap().unwrap();
    assert_eq!(revoked.revoked_at, Some(Timestamp(5_000)));
    assert!(
        revoked.revoked_reason.is_some(),
        "a revocation has a reason"
    );
    assert_eq!(store.session(in_globex.id).await.unwrap(), Some(in_globex));
    assert_eq!(store.session(owners.id).await.unwrap(), Some(owners));

    let key = store.api_key(key_acme.id).await.unwrap().unwrap();
    assert_eq!(key.revoked_at, Some(Timestamp(5_000)));
    assert_eq!(
        store.api_key(key_globex.id).await.unwrap(),
        Some(key_globex)
    );
    assert_eq!(
        store.api_key(owners_key.id).await.unwrap(),
        Some(owners_key)
    );
}

// --- sessions and refresh tokens ---

/// A user's sessions come newest first; `active_only` leaves out revoked sessions and those
/// expired at `now` (a session expires at its `expires_at`), and another user's never show.
pub async fn sessions_are_listed_newest_first_and_active_only_leaves_out_revoked_and_expired(
    store: Arc<dyn IdentityStore>,
) {
    let org = OrgId::DEFAULT;
    let alice = stored_user(&*store, "alice@example.com", 500).await;
    let bob = stored_user(&*store, "bob@example.com", 600).await;
    let old = stored_session(&*store, session(&alice, org, 1_000, 100_000), "a1").await;
    let expired = stored_session(&*store, session(&alice, org, 2_000, 5_000), "a2").await;
    let revoked = stored_session(&*store, session(&alice, org, 3_000, 100_000), "a3").await;
    let at_expiry = stored_session(&*store, session(&alice, org, 4_000, 10_000), "a4").await;
    let newest = stored_session(&*store, session(&alice, org, 5_000, 100_000), "a5").await;
    stored_session(&*store, session(&bob, org, 6_000, 100_000), "b1").await;
    assert!(store
        .revoke_session(alice.id, revoked.id, Timestamp(6_000), "logout")
        .await
        .unwrap());

    let now = Timestamp(10_000);
    let all = store.sessions_of_user(alice.id, false, now).await.unwrap();
    assert_eq!(
        ids(&all),
        [newest.id, at_expiry.id, revoked.id, expired.id, old.id]
    );
    let active = store.sessions_of_user(alice.id, true, now).await.unwrap();
    assert_eq!(ids(&active), [newest.id, old.id]);
    assert_eq!(active[1], old, "every field reads back");

    let stored = store.session(revoked.id).await.unwrap().unwrap();
    assert_eq!(stored.revoked_at, Some(Timestamp(6_000)));
    assert_eq!(stored.revoked_reason.as_deref(), Some("logout"));
    assert_eq!(store.session(SessionId::new()).await.unwrap(), None);
    assert!(store
        .sessions_of_user(UserId::new(), false, now)
        .await
        .unwrap()
        .is_empty());
}

/// Touching a session sets its last activity and last IP only; switching moves the org it
/// acts in. Both are not found for an unknown session.
pub async fn touching_a_session_records_activity_and_switching_moves_its_org(
    store: Arc<dyn IdentityStore>,
) {
    let (acme, alice) = org_with_owner(&*store, "acme", 500).await;
    let mut current = stored_session(
        &*store,
        session(&alice, OrgId::DEFAULT, 1_000, NEVER.0),
        "a1",
    )
    .await;

    store
        .touch_session(current.id, Timestamp(7_000), Some("198.51.100.7"))
        .await
        .unwrap();
    current.last_seen_at = Timestamp(7_000);
    current.last_ip = Some("198.51.100.7".to_owned());
    assert_eq!(
        store.session(current.id).await.unwrap(),
        Some(current.clone())
    );

    store.set_session_org(current.id, acme.id).await.unwrap();
    current.org_id = acme.id;
    assert_eq!(store.session(current.id).await.unwrap(), Some(current));

    assert_not_found(
        store
            .touch_session(SessionId::new(), Timestamp(8_000), None)
            .await,
        "touching an unknown session",
    );
    assert_not_found(
        store.set_session_org(SessionId::new(), acme.id).await,
        "switching an unknown session",
    );
}

/// A user revokes an active session of theirs once; another user's session, an unknown one
/// or one already revoked answers `false` and is left as it was.
pub async fn a_user_revokes_their_own_session_but_not_another_users(store: Arc<dyn IdentityStore>) {
    let org = OrgId::DEFAULT;
    let alice = stored_user(&*store, "alice@example.com", 500).await;
    let bob = stored_user(&*store, "bob@example.com", 600).await;
    let mine = stored_session(&*store, session(&alice, org, 1_000, NEVER.0), "a1").await;
    let theirs = stored_session(&*store, session(&bob, org, 1_100, NEVER.0), "b1").await;

    let revoked = store
        .revoke_session(alice.id, theirs.id, Timestamp(2_000), "revoked")
        .await
        .unwrap();
    assert!(!revoked, "another user's session is not revoked");
    assert_eq!(store.session(theirs.id).await.unwrap(), Some(theirs));

    assert!(store
        .revoke_session(alice.id, mine.id, Timestamp(2_000), "revoked")
        .await
        .unwrap());
    let again = store
        .revoke_session(alice.id, mine.id, Timestamp(3_000), "logout")
        .await
        .unwrap();
    assert!(!again, "a revoked session is not revoked again");
    let stored = store.session(mine.id).await.unwrap().unwrap();
    assert_eq!(
        (stored.revoked_at, stored.revoked_reason.as_deref()),
        (Some(Timestamp(2_000)), Some("revoked"))
    );
    assert!(!store
        .revoke_session(alice.id, SessionId::new(), Timestamp(3_000), "revoked")
        .await
        .unwrap());
}

/// Revoking every session of a user but `keep` counts the active ones it revoked; sessions
/// already ended keep their reason, and other users' sessions are untouched.
pub async fn revoking_the_other_sessions_keeps_the_current_one(store: Arc<dyn IdentityStore>) {
    let org = OrgId::DEFAULT;
    let alice = stored_user(&*store, "alice@example.com", 500).await;
    let bob = stored_user(&*store, "bob@example.com", 600).await;
    let current = stored_session(&*store, session(&alice, org, 1_000, NEVER.0), "a1").await;
    stored_session(&*store, session(&alice, org, 1_100, NEVER.0), "a2").await;
    stored_session(&*store, session(&alice, org, 1_200, NEVER.0), "a3").await;
    let logged_out = stored_session(&*store, session(&alice, org, 1_300, NEVER.0), "a4").await;
    stored_session(&*store, session(&alice, org, 1_400, 2_000), "a5").await;
    let bobs = stored_session(&*store, session(&bob, org, 1_500, NEVER.0), "b1").await;
    assert!(store
        .revoke_session(alice.id, logged_out.id, Timestamp(2_500), "logout")
        .await
        .unwrap());

    let now = Timestamp(3_000);
    let revoked = store
        .revoke_sessions_of_user(alice.id, Some(current.id), now, "password_changed")
        .await
        .unwrap();
    assert_eq!(revoked, 2);
    let active = store.sessions_of_user(alice.id, true, now).await.unwrap();
    assert_eq!(ids(&active), [current.id]);
    let stored = store.session(logged_out.id).await.unwrap().unwrap();
    assert_eq!(stored.revoked_reason.as_deref(), Some("logout"));
    let all = store.sessions_of_user(alice.id, false, now).await.unwrap();
    let password_changed = all
        .iter()
        .filter(|s| s.revoked_reason.as_deref() == Some("password_changed"))
        .count();
    assert_eq!(password_changed, 2);
    assert_eq!(store.session(bobs.id).await.unwrap(), Some(bobs));

    let revoked = store
        .revoke_sessions_of_user(alice.id, None, Timestamp(4_000), "revoked")
        .await
        .unwrap();
    assert_eq!(revoked, 1);
    assert!(store
        .sessions_of_user(alice.id, true, Timestamp(4_000))
        .await
        .unwrap()
        .is_empty());
}

/// A current refresh token rotates once; presenting a used one revokes the family with
/// reason `refresh_token_reuse`, after which even the newest token is inactive.
pub async fn a_refresh_token_rotates_once_and_its_reuse_revokes_the_family(
    store: Arc<dyn IdentityStore>,
) {
    let alice = stored_user(&*store, "alice@example.com", 500).await;
    let login = stored_session(
        &*store,
        session(&alice, OrgId::DEFAULT, 1_000, 1_000_000),
        "r1",
    )
    .await;

    let first = store
        .rotate_refresh_token(&digest("r1"), &digest("r2"), Timestamp(2_000))
        .await
        .unwrap();
    let mut expected = login.clone();
    expected.last_seen_at = Timestamp(2_000);
    assert_eq!(first, RefreshOutcome::Rotated(expected.clone()));
    assert_eq!(store.session(login.id).await.unwrap(), Some(expected));

    let second = store
        .rotate_refresh_token(&digest("r2"), &digest("r3"), Timestamp(3_000))
        .await
        .unwrap();
    assert!(
        matches!(&second, RefreshOutcome::Rotated(s) if s.id == login.id && s.last_seen_at == Timestamp(3_000)),
        "{second:?}"
    );

    let reuse = store
        .rotate_refresh_token(&digest("r1"), &digest("r4"), Timestamp(4_000))
        .await
        .unwrap();
    assert_eq!(reuse, RefreshOutcome::Reused(login.id));
    let revoked = store.session(login.id).await.unwrap().unwrap();
    assert_eq!(revoked.revoked_at, Some(Timestamp(4_000)));
    assert_eq!(
        revoked.revoked_reason.as_deref(),
        Some("refresh_token_reuse")
    );

    for presented in ["r3", "r2", "r1"] {
        let outcome = store
            .rotate_refresh_token(&digest(presented), &digest("r5"), Timestamp(5_000))
            .await
            .unwrap();
        assert_eq!(outcome, RefreshOutcome::Inactive(login.id), "{presented}");
    }
    let never_stored = store
        .rotate_refresh_token(&digest("r4"), &digest("r6"), Timestamp(5_000))
        .await
        .unwrap();
    assert_eq!(
        never_stored,
        RefreshOutcome::Unknown,
        "a reuse stores no next token"
    );
    let unknown = store
        .rotate_refresh_token(&digest("nobody"), &digest("r7"), Timestamp(5_000))
        .await
        .unwrap();
    assert_eq!(unknown, RefreshOutcome::Unknown);
}

/// A token of a session past its absolute expiry, or revoked, is inactive and rotates
/// nothing.
pub async fn a_refresh_token_of_an_expired_or_revoked_session_is_inactive(
    store: Arc<dyn IdentityStore>,
) {
    let alice = stored_user(&*store, "alice@example.com", 500).await;
    let short = stored_session(
        &*store,
        session(&alice, OrgId::DEFAULT, 1_000, 5_000),
        "short",
    )
    .await;
    let expired = store
        .rotate_refresh_token(&digest("short"), &digest("short-next"), Timestamp(5_000))
        .await
        .unwrap();
    assert_eq!(expired, RefreshOutcome::Inactive(short.id));
    let next = store
        .rotate_refresh_token(&digest("short-next"), &digest("x"), Timestamp(4_000))
        .await
        .unwrap();
    assert_eq!(next, RefreshOutcome::Unknown, "no next token was stored");
    let stored = store.session(short.id).await.unwrap().unwrap();
    assert_eq!(stored.last_seen_at, short.last_seen_at);

    let logged_out = stored_session(
        &*store,
        session(&alice, OrgId::DEFAULT, 1_000, NEVER.0),
        "out",
    )
    .await;
    assert!(store
        .revoke_session(alice.id, logged_out.id, Timestamp(2_000), "logout")
        .await
        .unwrap());
    let revoked = store
        .rotate_refresh_token(&digest("out"), &digest("out-next"), Timestamp(3_000))
        .await
        .unwrap();
    assert_eq!(revoked, RefreshOutcome::Inactive(logged_out.id));
    let stored = store.session(logged_out.id).await.unwrap().unwrap();
    assert_eq!(
        stored.revoked_reason.as_deref(),
        Some("logout"),
        "the reason of the revocation stays"
    );
}

/// Of two concurrent presentations of one token, one rotates and the other is a reuse.
pub async fn concurrent_rotations_of_one_refresh_token_rotate_exactly_once(
    store: Arc<dyn IdentityStore>,
) {
    let alice = stored_user(&*store, "alice@example.com", 500).await;
    let login = stored_session(
        &*store,
        session(&alice, OrgId::DEFAULT, 1_000, NEVER.0),
        "r1",
    )
    .await;
    let presentations: Vec<_> = ["next-a", "next-b"]
        .into_iter()
        .map(|next| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .rotate_refresh_token(&digest("r1"), &digest(next), Timestamp(2_000))
                    .await
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for presentation in presentations {
        outcomes.push(presentation.await.unwrap().unwrap());
    }
    let rotated = outcomes
        .iter()
        .filter(|o| matches!(o, RefreshOutcome::Rotated(_)))
        .count();
    let reused = outcomes
        .iter()
        .filter(|o| **o == RefreshOutcome::Reused(login.id))
        .count();
    assert_eq!((rotated, reused), (1, 1), "{outcomes:?}");
    let stored = store.session(login.id).await.unwrap().unwrap();
    assert_eq!(
        stored.revoked_reason.as_deref(),
        Some("refresh_token_reuse")
    );
}

// --- API keys ---

/// API keys read back whole, are listed newest first per user, record their last use, and
/// are revoked once and only by their owner.
pub async fn api_keys_are_created_listed_newest_first_touched_and_revoked(
    store: Arc<dyn IdentityStore>,
) {
    let org = OrgId::DEFAULT;
    let alice = stored_user(&*store, "alice@example.com", 500).await;
    let bob = stored_user(&*store, "bob@example.com", 600).await;
    let older = api_key(&alice, org, "ci", 1_000);
    let mut newer = api_key(&alice, org, "laptop", 2_000);
    newer.role = Role::Viewer;
    newer.expires_at = Some(Timestamp(1_000_000));
    let bobs = api_key(&bob, org, "bob", 1_500);
    for key in [&older, &newer, &bobs] {
        store.create_api_key(key).await.unwrap();
    }
    assert_eq!(store.api_key(newer.id).await.unwrap(), Some(newer.clone()));
    assert_eq!(store.api_key(ApiKeyId::new()).await.unwrap(), None);
    assert_eq!(
        store.api_keys_of_user(alice.id).await.unwrap(),
        [newer.clone(), older.clone()]
    );
    let mut twin = api_key(&alice, org, "twin", 3_000);
    twin.id = older.id;
    assert_conflict(store.create_api_key(&twin).await, "a duplicate key id");

    store
        .touch_api_key(older.id, Timestamp(3_000))
        .await
        .unwrap();
    let touched = store.api_key(older.id).await.unwrap().unwrap();
    assert_eq!(touched.last_used_at, Some(Timestamp(3_000)));
    assert_not_found(
        store.touch_api_key(ApiKeyId::new(), Timestamp(3_000)).await,
        "touching an unknown key",
    );

    assert!(!store
        .revoke_api_key(bob.id, older.id, Timestamp(4_000))
        .await
        .unwrap());
    assert!(store
        .revoke_api_key(alice.id, older.id, Timestamp(4_000))
        .await
        .unwrap());
    assert!(!store
        .revoke_api_key(alice.id, older.id, Timestamp(5_000))
        .await
        .unwrap());
    let revoked = store.api_key(older.id).await.unwrap().unwrap();
    assert_eq!(revoked.revoked_at, Some(Timestamp(4_000)));
    assert_eq!(store.api_key(bobs.id).await.unwrap(), Some(bobs));
}

// --- one-time tokens ---

/// A one-time token is consumed once, only for its purpose and before its expiry; a refused
/// consumption leaves it usable.
pub async fn a_one_time_token_is_consumed_once_for_its_purpose_before_it_expires(
    store: Arc<dyn IdentityStore>,
) {
    let alice = stored_user(&*store, "alice@example.com", 500).await;
    let reset = one_time_token(&alice, "reset", TokenPurpose::PasswordReset, 10_000);
    store.create_one_time_token(&reset).await.unwrap();
    assert_conflict(
        store.create_one_time_token(&reset).await,
        "a duplicate token",
    );

    let wrong_purpose = store
        .consume_one_time_token(
            &reset.hash,
            TokenPurpose::EmailVerification,
            Timestamp(2_000),
        )
        .await
        .unwrap();
    assert_eq!(wrong_purpose, None);
    let consumed = store
        .consume_one_time_token(&reset.hash, TokenPurpose::PasswordReset, Timestamp(2_000))
        .await
        .unwrap();
    let mut expected = reset.clone();
    expected.used_at = Some(Timestamp(2_000));
    assert_eq!(consumed, Some(expected));
    let again = store
        .consume_one_time_token(&reset.hash, TokenPurpose::PasswordReset, Timestamp(2_500))
        .await
        .unwrap();
    assert_eq!(again, None, "a token is consumed once");

    let verify = one_time_token(&alice, "verify", TokenPurpose::EmailVerification, 5_000);
    store.create_one_time_token(&verify).await.unwrap();
    let expired = store
        .consume_one_time_token(
            &verify.hash,
            TokenPurpose::EmailVerification,
            Timestamp(5_000),
        )
        .await
        .unwrap();
    assert_eq!(expired, None, "a token expires at its expiry");
    let in_time = store
        .consume_one_time_token(
            &verify.hash,
            TokenPurpose::EmailVerification,
            Timestamp(4_999),
        )
        .await
        .unwrap();
    assert!(in_time.is_some(), "the refused attempts did not consume it");

    let unknown = store
        .consume_one_time_token(&digest("nobody"), TokenPurpose::MfaChallenge, Timestamp(1))
        .await
        .unwrap();
    assert_eq!(unknown, None);
}

/// Of concurrent consumptions of one token, exactly one gets it.
pub async fn concurrent_consumptions_of_a_one_time_token_succeed_once(
    store: Arc<dyn IdentityStore>,
) {
    let alice = stored_user(&*store, "alice@example.com", 500).await;
    let challenge = one_time_token(&alice, "mfa", TokenPurpose::MfaChallenge, NEVER.0);
    store.create_one_time_token(&challenge).await.unwrap();
    let consumers: Vec<_> = (0..4)
        .map(|_| {
            let store = Arc::clone(&store);
            let hash = challenge.hash.clone();
            tokio::spawn(async move {
                store
                    .consume_one_time_token(&hash, TokenPurpose::MfaChallenge, Timestamp(2_000))
                    .await
            })
        })
        .collect();
    let mut winners = 0;
    for consumer in consumers {
        if consumer.await.unwrap().unwrap().is_some() {
            winners += 1;
        }
    }
    assert_eq!(winners, 1);
}

// --- recovery codes and TOTP ---

/// Recovery codes are consumed once each, only by their user; a replacement discards the
/// whole previous set.
pub async fn recovery_codes_are_consumed_once_and_replaced_whole(store: Arc<dyn IdentityStore>) {
    let alice = stored_user(&*store, "alice@example.com", 500).await;
    let bob = stored_user(&*store, "bob@example.com", 600).await;
    let codes: Vec<String> = ["c1", "c2", "c3"].into_iter().map(digest).collect();
    store
        .replace_recovery_codes(alice.id, &codes)
        .await
        .unwrap();
    assert_eq!(store.recovery_codes_left(alice.id).await.unwrap(), 3);
    assert_eq!(store.recovery_codes_left(bob.id).await.unwrap(), 0);

    let at = Timestamp(2_000);
    assert!(!store
        .consume_recovery_code(bob.id, &codes[1], at)
        .await
        .unwrap());
    assert!(store
        .consume_recovery_code(alice.id, &codes[1], at)
        .await
        .unwrap());
    assert!(!store
        .consume_recovery_code(alice.id, &codes[1], at)
        .await
        .unwrap());
    assert!(!store
        .consume_recovery_code(alice.id, &digest("guess"), at)
        .await
        .unwrap());
    assert_eq!(store.recovery_codes_left(alice.id).await.unwrap(), 2);

    let fresh: Vec<String> = ["c4", "c5"].into_iter().map(digest).collect();
    store
        .replace_recovery_codes(alice.id, &fresh)
        .await
        .unwrap();
    assert_eq!(store.recovery_codes_left(alice.id).await.unwrap(), 2);
    assert!(!store
        .consume_recovery_code(alice.id, &codes[0], at)
        .await
        .unwrap());
    assert!(store
        .consume_recovery_code(alice.id, &fresh[0], at)
        .await
        .unwrap());
    assert_eq!(store.recovery_codes_left(alice.id).await.unwrap(), 1);

    store.replace_recovery_codes(alice.id, &[]).await.unwrap();
    assert_eq!(store.recovery_codes_left(alice.id).await.unwrap(), 0);
}

/// A TOTP step is recorded only when above the last one: an equal or lower step is a replay.
pub async fn a_totp_step_only_advances(store: Arc<dyn IdentityStore>) {
    let alice = stored_user(&*store, "alice@example.com", 500).await;
    assert!(store.advance_totp_step(alice.id, 100).await.unwrap());
    assert!(!store.advance_totp_step(alice.id, 100).await.unwrap());
    assert!(!store.advance_totp_step(alice.id, 99).await.unwrap());
    assert!(store.advance_totp_step(alice.id, 101).await.unwrap());
    let stored = store.user(alice.id).await.unwrap().unwrap();
    assert_eq!(stored.totp_last_step, Some(101));
}

// --- invitations ---

/// Accepting an invitation adds the membership with the invited role and marks the
/// invitation accepted; a second acceptance is refused. Invitations are listed newest first.
pub async fn an_invitation_is_accepted_once_and_adds_the_membership(store: Arc<dyn IdentityStore>) {
    let (acme, owner) = org_with_owner(&*store, "acme", 500).await;
    let bob = stored_user(&*store, "bob@example.com", 600).await;
    let carol = stored_user(&*store, "carol@example.com", 700).await;
    let invited = invitation(&acme, &owner, Role::Editor, "bob", 1_000, 100_000);
    store.create_invitation(&invited).await.unwrap();
    assert_eq!(
        store
            .invitation_by_token(&invited.token_hash)
            .await
            .unwrap(),
        Some(invited.clone())
    );
    assert_eq!(
        store.invitation_by_token(&digest("nobody")).await.unwrap(),
        None
    );
    let mut twin = invitation(&acme, &owner, Role::Admin, "twin", 1_100, 100_000);
    twin.token_hash = invited.token_hash.clone();
    assert_conflict(
        store.create_invitation(&twin).await,
        "a duplicate invitation token",
    );

    let accepted = store
        .accept_invitation(&invited.token_hash, bob.id, Timestamp(3_000))
        .await
        .unwrap();
    let membership = MembershipRecord {
        org_id: acme.id,
        user_id: bob.id,
        role: Role::Editor,
        created_at: Timestamp(3_000),
    };
    assert_eq!(accepted, Ok(membership.clone()));
    assert_eq!(
        store.membership(acme.id, bob.id).await.unwrap(),
        Some(membership)
    );
    let stored = store
        .invitation_by_token(&invited.token_hash)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (stored.accepted_at, stored.accepted_by),
        (Some(Timestamp(3_000)), Some(bob.id))
    );

    let second = store
        .accept_invitation(&invited.token_hash, carol.id, Timestamp(4_000))
        .await
        .unwrap();
    assert_eq!(second, Err(InvitationError::AlreadyAccepted));
    assert_eq!(store.membership(acme.id, carol.id).await.unwrap(), None);
    assert!(
        !store
            .revoke_invitation(acme.id, invited.id, Timestamp(4_000))
            .await
            .unwrap(),
        "an accepted invitation is no longer pending"
    );

    let later = invitation(&acme, &owner, Role::Viewer, "later", 5_000, 100_000);
    store.create_invitation(&later).await.unwrap();
    let listed: Vec<InvitationId> = store
        .invitations(acme.id)
        .await
        .unwrap()
        .iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(listed, [later.id, invited.id]);
    assert!(store.invitations(OrgId::DEFAULT).await.unwrap().is_empty());
}

/// An expired or revoked invitation is refused as expired (an invitation expires at its
/// expiry), an unknown token as unknown; neither adds a membership. Only a pending
/// invitation of the org is revoked.
pub async fn expired_revoked_and_unknown_invitations_are_refused(store: Arc<dyn IdentityStore>) {
    let (acme, owner) = org_with_owner(&*store, "acme", 500).await;
    let bob = stored_user(&*store, "bob@example.com", 600).await;

    let expiring = invitation(&acme, &owner, Role::Editor, "expiring", 1_000, 5_000);
    store.create_invitation(&expiring).await.unwrap();
    let late = store
        .accept_invitation(&expiring.token_hash, bob.id, Timestamp(5_000))
        .await
        .unwrap();
    assert_eq!(late, Err(InvitationError::Expired));

    let revoked = invitation(&acme, &owner, Role::Editor, "revoked", 1_000, NEVER.0);
    store.create_invitation(&revoked).await.unwrap();
    assert!(
        !store
            .revoke_invitation(OrgId::DEFAULT, revoked.id, Timestamp(2_000))
            .await
            .unwrap(),
        "another org's invitation is not revoked"
    );
    assert!(store
        .revoke_invitation(acme.id, revoked.id, Timestamp(2_000))
        .await
        .unwrap());
    assert!(!store
        .revoke_invitation(acme.id, revoked.id, Timestamp(2_500))
        .await
        .unwrap());
    let stored = store
        .invitation_by_token(&revoked.token_hash)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.revoked_at, Some(Timestamp(2_000)));
    let refused = store
        .accept_invitation(&revoked.token_hash, bob.id, Timestamp(3_000))
        .await
        .unwrap();
    assert_eq!(refused, Err(InvitationError::Expired));

    let unknown = store
        .accept_invitation(&digest("nobody"), bob.id, Timestamp(3_000))
        .await
        .unwrap();
    assert_eq!(unknown, Err(InvitationError::Unknown));
    assert!(!store
        .revoke_invitation(acme.id, InvitationId::new(), Timestamp(3_000))
        .await
        .unwrap());

    assert_eq!(store.membership(acme.id, bob.id).await.unwrap(), None);
    let stored = store
        .invitation_by_token(&expiring.token_hash)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (stored.accepted_at, stored.accepted_by),
        (None, None),
        "a refused acceptance marks nothing"
    );
}

/// Accepting an invitation as a member raises a lower role to the invited one and never
/// lowers a higher one; the membership keeps its join time.
pub async fn accepting_an_invitation_raises_a_lower_role_and_never_lowers_one(
    store: Arc<dyn IdentityStore>,
) {
    let (acme, owner) = org_with_owner(&*store, "acme", 500).await;
    let bob = stored_user(&*store, "bob@example.com", 600).await;
    add_member(&*store, acme.id, bob.id, Role::Viewer, 1_000).await;

    let promotion = invitation(&acme, &owner, Role::Admin, "promotion", 2_000, NEVER.0);
    store.create_invitation(&promotion).await.unwrap();
    let raised = store
        .accept_invitation(&promotion.token_hash, bob.id, Timestamp(3_000))
        .await
        .unwrap();
    let admin = MembershipRecord {
        org_id: acme.id,
        user_id: bob.id,
        role: Role::Admin,
        created_at: Timestamp(1_000),
    };
    assert_eq!(raised, Ok(admin.clone()));
    assert_eq!(
        store.membership(acme.id, bob.id).await.unwrap(),
        Some(admin.clone())
    );

    let demotion = invitation(&acme, &owner, Role::Editor, "demotion", 4_000, NEVER.0);
    store.create_invitation(&demotion).await.unwrap();
    let kept = store
        .accept_invitation(&demotion.token_hash, bob.id, Timestamp(5_000))
        .await
        .unwrap();
    assert_eq!(kept, Ok(admin.clone()));
    assert_eq!(
        store.membership(acme.id, bob.id).await.unwrap(),
        Some(admin)
    );
    let stored = store
        .invitation_by_token(&demotion.token_hash)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        stored.accepted_by,
        Some(bob.id),
        "the invitation is used up"
    );
}

/// Of concurrent acceptances of one invitation, exactly one succeeds.
pub async fn concurrent_acceptances_of_an_invitation_succeed_once(store: Arc<dyn IdentityStore>) {
    let (acme, owner) = org_with_owner(&*store, "acme", 500).await;
    let invited = invitation(&acme, &owner, Role::Editor, "shared", 1_000, NEVER.0);
    store.create_invitation(&invited).await.unwrap();
    let mut users = Vec::new();
    for i in 0..4 {
        users.push(stored_user(&*store, &format!("user{i}@example.com"), 600 + i).await);
    }
    let acceptances: Vec<_> = users
        .iter()
        .map(|user| {
            let store = Arc::clone(&store);
            let (hash, user) = (invited.token_hash.clone(), user.id);
            tokio::spawn(
                async move { store.accept_invitation(&hash, user, Timestamp(2_000)).await },
            )
        })
        .collect();
    let mut accepted = 0;
    for acceptance in acceptances {
        match acceptance.await.unwrap().unwrap() {
            Ok(_) => accepted += 1,
            Err(refusal) => assert_eq!(refusal, InvitationError::AlreadyAccepted),
        }
    }
    assert_eq!(accepted, 1);
    assert_eq!(store.members(acme.id).await.unwrap().len(), 2);
}

// --- audit trail ---

/// Appending returns increasing sequence numbers; every field reads back, newest first.
pub async fn audit_events_get_increasing_seqs_and_round_trip(store: Arc<dyn IdentityStore>) {
    let full = NewAuditEvent {
        org_id: Some(OrgId::new()),
        actor_user_id: Some(UserId::new()),
        actor_api_key_id: Some(ApiKeyId::new()),
        action: "run.cancel".to_owned(),
        target_kind: Some("run".to_owned()),
        target_id: Some("0190f3c5-7d2b-7c4e-9a31-5b6f1e2d3c4b".to_owned()),
        at: Timestamp(1_000),
        ip: Some("203.0.113.9".to_owned()),
        request_id: Some("req-42".to_owned()),
        outcome: AuditOutcome::Success,
        status: Some(202),
        details: json!({"reason": "superseded", "tasks": [1, 2], "nested": {"ok": true}}),
    };
    let minimal = NewAuditEvent {
        details: json!(null),
        ..audit(None, None, "auth.login", AuditOutcome::Denied, 2_000)
    };
    let first = store.append_audit(&full).await.unwrap();
    let second = store.append_audit(&minimal).await.unwrap();
    let third = store.append_audit(&minimal).await.unwrap();
    assert!(first < second && second < third, "{first} {second} {third}");

    let listed = store.audit_events(&AuditFilter::default()).await.unwrap();
    assert_eq!(
        listed,
        [
            AuditEventRecord {
                seq: third,
                event: minimal.clone()
            },
            AuditEventRecord {
                seq: second,
                event: minimal
            },
            AuditEventRecord {
                seq: first,
                event: full
            },
        ]
    );
}

/// Each filter narrows the listing, filters combine, `before_seq` pages back through the
/// trail and `limit` bounds a page; results are newest first.
pub async fn audit_events_are_filtered_and_paged_newest_first(store: Arc<dyn IdentityStore>) {
    let (acme, globex) = (OrgId::new(), OrgId::new());
    let (alice, bob) = (UserId::new(), UserId::new());
    use AuditOutcome::*;
    let events = [
        audit(Some(acme), Some(alice), "run.trigger", Success, 1_000),
        audit(Some(acme), Some(bob), "run.cancel", Denied, 2_000),
        audit(Some(globex), Some(alice), "runs.export", Success, 3_000),
        audit(Some(acme), Some(alice), "pipeline.write", Failure, 4_000),
        audit(None, None, "auth.login", Denied, 5_000),
        audit(Some(acme), Some(alice), "run.cancel", Success, 6_000),
    ];
    let mut appended = Vec::new();
    for event in &events {
        appended.push(store.append_audit(event).await.unwrap());
    }
    let seq = |i: usize| appended[i];
    let list = |filter: AuditFilter| {
        let store = Arc::clone(&store);
        async move { seqs(&store.audit_events(&filter).await.unwrap()) }
    };

    assert_eq!(
        list(AuditFilter::default()).await,
        [seq(5), seq(4), seq(3), seq(2), seq(1), seq(0)]
    );
    let by_org = AuditFilter {
        org_id: Some(acme),
        ..AuditFilter::default()
    };
    assert_eq!(list(by_org.clone()).await, [seq(5), seq(3), seq(1), seq(0)]);
    let by_actor = AuditFilter {
        actor_user_id: Some(alice),
        ..AuditFilter::default()
    };
    assert_eq!(list(by_actor).await, [seq(5), seq(3), seq(2), seq(0)]);
    let by_prefix = AuditFilter {
        action_prefix: Some("run.".to_owned()),
        ..AuditFilter::default()
    };
    assert_eq!(list(by_prefix).await, [seq(5), seq(1), seq(0)]);
    let by_action = AuditFilter {
        action_prefix: Some("run.cancel".to_owned()),
        ..AuditFilter::default()
    };
    assert_eq!(list(by_action).await, [seq(5), seq(1)]);
    let by_outcome = AuditFilter {
        outcome: Some(Denied),
        ..AuditFilter::default()
    };
    assert_eq!(list(by_outcome).await, [seq(4), seq(1)]);
    let by_time = AuditFilter {
        since: Some(Timestamp(2_000)),
        until: Some(Timestamp(5_000)),
        ..AuditFilter::default()
    };
    assert_eq!(
        list(by_time).await,
        [seq(3), seq(2), seq(1)],
        "since is inclusive, until exclusive"
    );
    let combined = AuditFilter {
        org_id: Some(acme),
        actor_user_id: Some(alice),
        outcome: Some(Success),
        ..AuditFilter::default()
    };
    assert_eq!(list(combined).await, [seq(5), seq(0)]);

    let first_page = AuditFilter {
        limit: 2,
        ..by_org.clone()
    };
    assert_eq!(list(first_page).await, [seq(5), seq(3)]);
    let second_page = AuditFilter {
        limit: 2,
        before_seq: Some(seq(3)),
        ..by_org.clone()
    };
    assert_eq!(list(second_page).await, [seq(1), seq(0)]);
    let past_the_end = AuditFilter {
        limit: 2,
        before_seq: Some(seq(0)),
        ..by_org
    };
    assert!(list(past_the_end).await.is_empty());
}

/// A limit of 0 returns the backend's default page, at least one event and fewer than all
/// when the trail is longer than that page (the SQLite store's is 50).
pub async fn a_zero_audit_limit_returns_the_default_page(store: Arc<dyn IdentityStore>) {
    const EVENTS: usize = 1_001;
    for i in 0..EVENTS {
        let event = audit(
            None,
            None,
            "auth.login",
            AuditOutcome::Failure,
            i64::try_from(i).unwrap(),
        );
        store.append_audit(&event).await.unwrap();
    }
    let page = store.audit_events(&AuditFilter::default()).await.unwrap();
    assert!(
        !page.is_empty() && page.len() < EVENTS,
        "a default page of {} events",
        page.len()
    );
    assert!(
        page.windows(2).all(|pair| pair[0].seq > pair[1].seq),
        "newest first"
    );
    let everything = AuditFilter {
        limit: u32::MAX,
        ..AuditFilter::default()
    };
    let bounded = store.audit_events(&everything).await.unwrap();
    assert!(
        bounded.len() < EVENTS,
        "a listing is bounded whatever the limit asked"
    );
}
