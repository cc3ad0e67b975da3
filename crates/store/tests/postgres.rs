//! The PostgreSQL store against the storage port's conformance suite, each test on a fresh
//! database of the server that `ARCHES_TEST_POSTGRES_URL` names (for example
//! `postgres://postgres@127.0.0.1:5432/test`; `.ci/run` sets it). Without that variable the
//! tests fail: they are part of the suite, not optional.
//!
//! Each test creates `arches_test_<uuid>` (a UUIDv7 in simple form, so its name tells when it
//! was made), and drops it when the test ends. A test process that dies leaves its databases
//! behind; the first test of each process drops those older than an hour.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arches_core::ids::{OrgId, RunId, TaskId, TaskRunId};
use arches_core::ports::Store;
use arches_core::records::{
    AppliedCompletion, Durability, NewArtifact, RunRecord, TaskRunRecord, WriteBatch,
};
use arches_core::state::RunState;
use arches_core::time::Timestamp;
use arches_store::conformance::Fixture;
use arches_store::conformance_identity::IdentityFixture;
use arches_store::PgStore;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection};
use uuid::Uuid;

/// The variable naming the test server.
const URL_VARIABLE: &str = "ARCHES_TEST_POSTGRES_URL";

/// Prefix of the databases these tests create.
const DATABASE_PREFIX: &str = "arches_test_";

/// Age after which a test database left behind is dropped.
const STALE_AFTER: Duration = Duration::from_secs(60 * 60);

/// Whether this process has swept stale test databases yet.
static SWEPT: AtomicBool = AtomicBool::new(false);

fn server_options() -> PgConnectOptions {
    let url = std::env::var(URL_VARIABLE).unwrap_or_else(|_| {
        panic!(
            "{URL_VARIABLE} is not set: these tests need a PostgreSQL server, for example \
             {URL_VARIABLE}=postgres://postgres@127.0.0.1:5432/test (.ci/run sets it)"
        )
    });
    PgConnectOptions::from_str(&url)
        .unwrap_or_else(|error| panic!("{URL_VARIABLE} is not a PostgreSQL URL: {error}"))
}

async fn admin_connection(options: &PgConnectOptions) -> PgConnection {
    options
        .connect()
        .await
        .unwrap_or_else(|error| panic!("cannot connect to the server of {URL_VARIABLE}: {error}"))
}

/// When a test database was created, from the UUIDv7 in its name.
fn created_at(database: &str) -> Option<SystemTime> {
    let uuid = Uuid::try_parse(database.strip_prefix(DATABASE_PREFIX)?).ok()?;
    let (seconds, nanos) = uuid.get_timestamp()?.to_unix();
    Some(UNIX_EPOCH + Duration::new(seconds, nanos))
}

/// Drops the test databases left behind more than [`STALE_AFTER`] ago.
async fn sweep_stale_databases(admin: &mut PgConnection) {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT datname FROM pg_database WHERE datname LIKE 'arches\\_test\\_%'",
    )
    .fetch_all(&mut *admin)
    .await
    .expect("list test databases");
    let now = SystemTime::now();
    for name in names {
        let stale = created_at(&name)
            .and_then(|at| now.duration_since(at).ok())
            .is_some_and(|age| age > STALE_AFTER);
        if stale {
            // Another test process may be dropping it too.
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .execute(&mut *admin)
                .await;
        }
    }
}

/// A fresh database, dropped when this is dropped.
struct TestDatabase {
    admin_options: PgConnectOptions,
    name: String,
}

impl TestDatabase {
    async fn create() -> (TestDatabase, PgConnectOptions) {
        let admin_options = server_options();
        let mut admin = admin_connection(&admin_options).await;
        if !SWEPT.swap(true, Ordering::SeqCst) {
            sweep_stale_databases(&mut admin).await;
        }
        let name = format!("{DATABASE_PREFIX}{}", Uuid::now_v7().simple());
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .await
            .unwrap_or_else(|error| panic!("cannot create database {name}: {error}"));
        let _ = admin.close().await;
        let options = admin_options.clone().database(&name);
        (
            TestDatabase {
                admin_options,
                name,
            },
            options,
        )
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // `Drop` cannot await, and the test's runtime may be the current-thread one that is
        // running this drop; a thread of its own with its own runtime does the work. The
        // store's pool may still hold connections, hence `FORCE`.
        let options = self.admin_options.clone();
        let statement = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut admin = options.connect().await?;
                sqlx::query(&statement).execute(&mut admin).await?;
                admin.close().await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!(
                "cannot drop test database {}; a later run sweeps it",
                self.name
            );
        }
    }
}

async fn open(durability: Durability) -> (TestDatabase, PgStore) {
    let (database, options) = TestDatabase::create().await;
    let store = PgStore::connect_with(options, durability)
        .await
        .unwrap_or_else(|error| panic!("cannot open the store: {error}"));
    (database, store)
}

async fn postgres_fixture() -> Fixture {
    let (database, store) = open(Durability::Normal).await;
    Fixture::new(Arc::new(store), database)
}

arches_store::conformance_tests!(postgres_fixture());

async fn postgres_identity_fixture() -> IdentityFixture {
    let (database, store) = open(Durability::Normal).await;
    IdentityFixture::new(Arc::new(store), database)
}

arches_store::identity_conformance_tests!(postgres_identity_fixture());

fn queued_run() -> RunRecord {
    RunRecord {
        org_id: OrgId::DEFAULT,
        id: RunId::new(),
        pipeline_name: "daily".into(),
        pipeline_version: 1,
        params: serde_json::json!({"limit": 3}),
        state: RunState::Queued,
        error: None,
        owner: None,
        created_at: Timestamp(1),
        started_at: None,
        finished_at: None,
    }
}

#[tokio::test]
async fn stores_opened_at_once_on_a_new_database_apply_each_migration_once() {
    let (database, options) = TestDatabase::create().await;
    let opened = futures::future::join_all(
        (0..4).map(|_| PgStore::connect_with(options.clone(), Durability::Normal)),
    )
    .await;
    let stores: Vec<PgStore> = opened
        .into_iter()
        .map(|store| store.expect("every concurrent open succeeds"))
        .collect();
    let migrations: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
        .fetch_one(stores[0].pool())
        .await
        .unwrap();
    let embedded = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations_pg"))
        .unwrap()
        .count();
    assert_eq!(migrations, embedded as i64);

    let run = queued_run();
    stores[1]
        .commit(&WriteBatch {
            runs: vec![run.clone()],
            ..WriteBatch::default()
        })
        .await
        .unwrap();
    assert_eq!(stores[3].run(run.id).await.unwrap(), Some(run));
    for store in &stores {
        store.close().await;
    }
    drop(database);
}

#[tokio::test]
async fn full_durability_sets_synchronous_commit_on() {
    let (_database, store) = open(Durability::Full).await;
    assert_eq!(Store::durability(&store), Durability::Full);
    let setting: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(setting, "on");
}

#[test]
fn a_test_database_name_tells_when_it_was_created() {
    let name = format!("{DATABASE_PREFIX}{}", Uuid::now_v7().simple());
    let age = SystemTime::now()
        .duration_since(created_at(&name).unwrap())
        .unwrap_or_default();
    assert!(age < Duration::from_secs(60));
    assert_eq!(created_at("arches_test_not_a_uuid"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_inserts_of_one_artifact_name_get_distinct_versions() {
    let (_database, store) = open(Durability::Normal).await;
    let meta = NewArtifact {
        org_id: OrgId::DEFAULT,
        name: "penguins".into(),
        media_type: "text/csv".into(),
        table: None,
        produced_by: None,
        inputs: vec![],
    };
    let inserted = futures::future::join_all((0..8).map(|_| {
        let store = store.clone();
        let meta = meta.clone();
        tokio::spawn(async move { store.insert_artifact("00", 1, &meta).await })
    }))
    .await;
    let mut versions: Vec<u32> = inserted
        .into_iter()
        .map(|result| result.unwrap().expect("every insert succeeds").version)
        .collect();
    versions.sort_unstable();
    assert_eq!(versions, (1..=8).collect::<Vec<u32>>());
}

#[tokio::test]
async fn a_commit_abandoned_by_its_caller_is_all_or_nothing_and_the_next_one_goes_through() {
    let (_database, store) = open(Durability::Normal).await;
    let run = queued_run();
    let task_runs: Vec<TaskRunRecord> = (0..1_000)
        .map(|i| {
            TaskRunRecord::pending(
                run.id,
                TaskId::parse("each").unwrap(),
                Some(i),
                Some(serde_json::json!(i)),
                Timestamp(i64::from(i)),
            )
        })
        .collect();
    let batch = WriteBatch {
        runs: vec![run.clone()],
        task_runs: task_runs.clone(),
        attempts: vec![],
        ..WriteBatch::default()
    };
    let _ = tokio::time::timeout(Duration::from_millis(1), store.commit(&batch)).await;

    let next = queued_run();
    tokio::time::timeout(
        Duration::from_secs(10),
        store.commit(&WriteBatch {
            runs: vec![next.clone()],
            ..WriteBatch::default()
        }),
    )
    .await
    .expect("the next commit does not wait for the abandoned one")
    .unwrap();
    assert_eq!(store.run(next.id).await.unwrap(), Some(next));
    // The abandoned commit is one statement that the server may still be applying (its
    // client went away, not the statement): two reads can straddle the moment it lands. A
    // read of the run before and after the task runs tells: the same run twice means the
    // task runs were read in that same state. Once it has landed it stays, so the second
    // round agrees with itself.
    for round in 0..2 {
        let before = store.run(run.id).await.unwrap();
        let stored_task_runs = store.task_runs(run.id).await.unwrap();
        let after = store.run(run.id).await.unwrap();
        if before != after {
            assert_eq!(round, 0, "the abandoned commit landed twice");
            continue;
        }
        let whole = after.as_ref() == Some(&run) && stored_task_runs == task_runs;
        let nothing = after.is_none() && stored_task_runs.is_empty();
        assert!(whole || nothing, "the abandoned commit was stored in part");
        return;
    }
    panic!("the run's row changed in both rounds of reads");
}

/// Of concurrent demotions of an org's two owners, processes apart, at most one goes through:
/// the org always keeps an owner (the last-owner rule is decided under the org's lock, not on
/// a snapshot each transaction reads on its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_demotions_of_two_owners_leave_one() {
    use arches_core::identity::{IdentityStore, MembershipRecord, OrgRecord, Role, UserRecord};
    use arches_core::ids::UserId;

    let (_database, store) = open(Durability::Normal).await;
    let person = |email: &str| UserRecord {
        id: UserId::new(),
        email: email.to_owned(),
        display_name: email.to_owned(),
        password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".to_owned(),
        email_verified_at: None,
        totp_secret: None,
        totp_enabled_at: None,
        totp_last_step: None,
        created_at: Timestamp(1),
        disabled_at: None,
    };
    for round in 0..8 {
        let (first, second) = (
            person(&format!("first{round}@example.com")),
            person(&format!("second{round}@example.com")),
        );
        store.create_user(&first, None).await.unwrap();
        store.create_user(&second, None).await.unwrap();
        let org = OrgRecord {
            id: OrgId::new(),
            slug: format!("org-{round}"),
            name: format!("Org {round}"),
            created_at: Timestamp(1),
        };
        store.create_org(&org, first.id).await.unwrap();
        store
            .add_member(&MembershipRecord {
                org_id: org.id,
                user_id: second.id,
                role: Role::Owner,
                created_at: Timestamp(2),
            })
            .await
            .unwrap();
        let demotions: Vec<_> = [first.id, second.id]
            .into_iter()
            .map(|user| {
                let store = store.clone();
                tokio::spawn(async move { store.set_role(org.id, user, Role::Admin).await })
            })
            .collect();
        let mut demoted = 0;
        for demotion in demotions {
            if demotion.await.unwrap().is_ok() {
                demoted += 1;
            }
        }
        assert_eq!(demoted, 1, "round {round}");
        let owners = store
            .members(org.id)
            .await
            .unwrap()
            .iter()
            .filter(|(membership, _)| membership.role == Role::Owner)
            .count();
        assert_eq!(owners, 1, "round {round}");
    }
}

/// Stores a worker's report of `task_run_id` directly (the task queue's completion table)
/// under the sequence number `seq`.
async fn store_report(store: &PgStore, seq: i64, task_run_id: Uuid) {
    sqlx::query(
        "INSERT INTO task_completions (seq, task_run_id, run_id, owner, fencing_token, worker, \
             claims, outcome, executed_at, finished_at) \
         VALUES ($1, $2, $3, 'scheduler', 1, 'worker', 1, '{\"succeeded\": null}', 1, 2)",
    )
    .bind(seq)
    .bind(task_run_id)
    .bind(Uuid::now_v7())
    .execute(store.pool())
    .await
    .unwrap();
}

async fn stored_reports(store: &PgStore) -> Vec<(i64, Uuid)> {
    sqlx::query_as("SELECT seq, task_run_id FROM task_completions ORDER BY seq")
        .fetch_all(store.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn an_applied_completion_is_deleted_only_with_its_own_task_run() {
    // A database crash may lose a report stored with a relaxed commit, and its sequence
    // number may then be handed to another report: the scheduler that applies the lost one
    // from memory must not delete the other.
    let (_database, store) = open(Durability::Normal).await;
    let (applied, other) = (TaskRunId::new(), TaskRunId::new());
    store_report(&store, 7, other.0).await;
    store_report(&store, 8, applied.0).await;
    store
        .commit(&WriteBatch {
            completions_done: vec![AppliedCompletion {
                seq: 7,
                task_run_id: applied,
            }],
            ..WriteBatch::default()
        })
        .await
        .unwrap();
    assert_eq!(
        stored_reports(&store).await,
        vec![(7, other.0), (8, applied.0)],
        "a sequence number of another task run is not deleted"
    );
    store
        .commit(&WriteBatch {
            completions_done: vec![AppliedCompletion {
                seq: 8,
                task_run_id: applied,
            }],
            ..WriteBatch::default()
        })
        .await
        .unwrap();
    assert_eq!(stored_reports(&store).await, vec![(7, other.0)]);
}
