//! The conformance suite of the storage port: what every [`Store`] backend must do.
//!
//! Each function takes a fresh, empty store and panics when the backend breaks the contract.
//! A backend runs the whole suite with [`conformance_tests!`](crate::conformance_tests), which
//! expands into one `#[tokio::test]` per function, each on its own database:
//!
//! ```ignore
//! async fn fixture() -> arches_store::conformance::Fixture {
//!     let directory = tempfile::tempdir().unwrap();
//!     let store = SqliteStore::open(&directory.path().join("arches.db"), Durability::Normal)
//!         .await
//!         .unwrap();
//!     Fixture::new(Arc::new(store), directory)
//! }
//!
//! arches_store::conformance_tests!(fixture());
//! ```
//!
//! Besides the port's documentation, the suite pins down these rules: a task run must belong
//! to a stored run and an attempt to a stored task run (otherwise the commit fails with
//! [`StoreError::Conflict`] and stores nothing); a write replaces every field of its row, so a
//! `None` clears a stored value; `Some(Value::Null)` and `None` stay distinct; a log line of a
//! task run that is not stored is kept, with no task id.

use std::any::Any;
use std::sync::Arc;

use arches_core::ids::{ArtifactId, OrgId, RunId, SecretName, TaskId, TaskRunId, ToolName};
use arches_core::log_search::{LogSearch, LogSearchQuery};
use arches_core::pipeline::PipelineDef;
use arches_core::ports::{Store, StoreError};
use arches_core::records::*;
use arches_core::state::{AttemptState, RunState, TaskRunState};
use arches_core::time::Timestamp;
use arches_core::tooldef::StoredSecret;
use serde_json::{json, Value};

/// A store under test, with whatever must live as long as it (a temporary directory, a
/// database to drop afterwards).
pub struct Fixture {
    store: Arc<dyn Store>,
    _keep_alive: Box<dyn Any + Send>,
}

impl Fixture {
    /// A fixture holding `store` and keeping `keep_alive` until the test ends.
    pub fn new(store: Arc<dyn Store>, keep_alive: impl Any + Send) -> Self {
        Self {
            store,
            _keep_alive: Box::new(keep_alive),
        }
    }

    /// The store under test.
    pub fn store(&self) -> Arc<dyn Store> {
        Arc::clone(&self.store)
    }
}

/// Expands into one `#[tokio::test]` per function of the [conformance
/// suite](crate::conformance), each with a fresh store.
///
/// `$factory` is an expression evaluating to a future of a
/// [`Fixture`](crate::conformance::Fixture); it is evaluated once per test. The calling crate
/// needs `tokio` with the `macros` and `rt` features.
#[macro_export]
macro_rules! conformance_tests {
    ($factory:expr) => {
        $crate::__conformance_tests!(
            $factory;
            saving_the_same_pipeline_twice_returns_the_same_version,
            a_changed_pipeline_gets_the_next_version_of_its_name,
            a_commit_round_trips_every_field_of_runs_task_runs_and_attempts,
            a_later_write_replaces_every_field_of_a_row,
            an_empty_batch_commits_nothing,
            a_failed_commit_stores_nothing,
            a_stale_fencing_token_cannot_overwrite_a_task_run,
            an_equal_or_higher_fencing_token_overwrites_a_task_run,
            writes_of_one_task_run_within_a_batch_apply_in_order,
            runs_are_listed_newest_first_with_filters_and_a_cursor,
            logs_are_read_in_order_after_a_cursor_by_task_and_up_to_a_limit,
            log_search_matches_every_word_and_phrase_best_first_then_newest,
            log_search_is_scoped_by_org_and_filters_by_run_task_stream_and_time,
            log_search_takes_any_text_and_bounds_its_limit,
            artifacts_get_versions_per_name_and_are_found_by_id_name_and_filter,
            a_batch_of_ten_thousand_task_runs_round_trips,
            pipelines_are_named_per_org_listed_by_latest_version_and_archived,
            runs_and_artifacts_are_scoped_by_org_and_runs_filter_by_creation_time,
            state_counts_count_runs_task_runs_and_attempts_by_state,
            tools_get_versions_per_name_and_identical_manifests_return_the_stored_version,
            secrets_are_set_replaced_resealed_listed_and_deleted_per_org,
            review_items_are_listed_claimed_decided_once_and_read_as_feedback,
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_tests {
    ($factory:expr; $($name:ident),+ $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                let fixture: $crate::conformance::Fixture = $factory.await;
                $crate::conformance::$name(fixture.store()).await;
            }
        )+
    };
}

fn task(id: &str) -> TaskId {
    TaskId::parse(id).expect("test task ids follow the naming rule")
}

fn pipeline(name: &str, command: &str) -> PipelineDef {
    serde_json::from_value(json!({
        "name": name,
        "description": "conformance pipeline",
        "params": {"limit": {"type": "integer", "default": 10}},
        "tasks": [
            {"id": "extract", "tool": "shell", "with": {"command": command, "env": {"B": "2", "A": "1"}}},
            {"id": "load", "tool": "sql", "depends_on": ["extract"], "timeout": "30s"}
        ]
    }))
    .expect("the conformance pipeline is valid")
}

/// A run with only its required fields.
fn run(pipeline_name: &str, state: RunState, created_at: i64) -> RunRecord {
    RunRecord {
        org_id: OrgId::DEFAULT,
        id: RunId::new(),
        pipeline_name: pipeline_name.to_owned(),
        pipeline_version: 1,
        params: json!({}),
        state,
        error: None,
        owner: None,
        created_at: Timestamp(created_at),
        started_at: None,
        finished_at: None,
    }
}

/// A task run with only its required fields.
fn task_run(run: &RunRecord, task_id: &str, fencing_token: u64, created_at: i64) -> TaskRunRecord {
    TaskRunRecord {
        id: TaskRunId::new(),
        run_id: run.id,
        task_id: task(task_id),
        index: None,
        fan_out: None,
        state: TaskRunState::Pending,
        attempt: 0,
        lease_expiries: 0,
        fencing_token,
        item: None,
        inputs: None,
        outputs: None,
        error: None,
        lease_owner: None,
        lease_expires_at: None,
        ready_at: None,
        created_at: Timestamp(created_at),
        queued_at: None,
        started_at: None,
        finished_at: None,
    }
}

fn attempt(task_run: &TaskRunRecord, number: u32) -> AttemptRecord {
    AttemptRecord {
        task_run_id: task_run.id,
        run_id: task_run.run_id,
        attempt: number,
        fencing_token: task_run.fencing_token,
        worker: "worker-1".to_owned(),
        state: AttemptState::Running,
        started_at: Timestamp(1_700_000_000_000_000),
        finished_at: None,
        error: None,
    }
}

async fn commit(store: &dyn Store, batch: WriteBatch) -> CommitReport {
    store.commit(&batch).await.expect("the commit succeeds")
}

/// Saving a definition twice returns the first version, with its digest and creation time.
pub async fn saving_the_same_pipeline_twice_returns_the_same_version(store: Arc<dyn Store>) {
    let definition = pipeline("daily", "echo one");
    let first = store
        .save_pipeline(OrgId::DEFAULT, &definition)
        .await
        .unwrap();
    assert_eq!(first.name, "daily");
    assert_eq!(first.version, 1);
    assert_eq!(first.digest.len(), 64, "the digest is sha-256 in hex");
    assert!(first
        .digest
        .bytes()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    assert_eq!(first.definition, serde_json::to_value(&definition).unwrap());

    let again = store
        .save_pipeline(OrgId::DEFAULT, &definition)
        .await
        .unwrap();
    assert_eq!(again, first);
    assert_eq!(
        store.pipeline(OrgId::DEFAULT, "daily", 1).await.unwrap(),
        Some(first.clone())
    );
    let read_back: PipelineDef = serde_json::from_value(first.definition).unwrap();
    assert_eq!(read_back, definition);
}

/// A changed definition is the next version of its name; versions count per name.
pub async fn a_changed_pipeline_gets_the_next_version_of_its_name(store: Arc<dyn Store>) {
    let first = store
        .save_pipeline(OrgId::DEFAULT, &pipeline("daily", "echo one"))
        .await
        .unwrap();
    let second = store
        .save_pipeline(OrgId::DEFAULT, &pipeline("daily", "echo two"))
        .await
        .unwrap();
    let other = store
        .save_pipeline(OrgId::DEFAULT, &pipeline("weekly", "echo one"))
        .await
        .unwrap();
    assert_eq!((first.version, second.version, other.version), (1, 2, 1));
    assert_ne!(first.digest, second.digest);
    assert_ne!(
        first.digest, other.digest,
        "the name is part of the definition"
    );

    let resaved = store
        .save_pipeline(OrgId::DEFAULT, &pipeline("daily", "echo one"))
        .await
        .unwrap();
    assert_eq!(resaved.version, 1, "an older definition keeps its version");
    let third = store
        .save_pipeline(OrgId::DEFAULT, &pipeline("daily", "echo three"))
        .await
        .unwrap();
    assert_eq!(third.version, 3);

    let stored = store
        .pipeline(OrgId::DEFAULT, "daily", 2)
        .await
        .unwrap()
        .expect("version 2 exists");
    assert_eq!(stored, second);
    assert_eq!(
        store.pipeline(OrgId::DEFAULT, "daily", 4).await.unwrap(),
        None
    );
    assert_eq!(
        store.pipeline(OrgId::DEFAULT, "missing", 1).await.unwrap(),
        None
    );
}

/// Every field of runs, task runs and attempts reads back as written, `Some` and `None` alike,
/// JSON values included.
pub async fn a_commit_round_trips_every_field_of_runs_task_runs_and_attempts(
    store: Arc<dyn Store>,
) {
    let full_run = RunRecord {
        org_id: OrgId::DEFAULT,
        id: RunId::new(),
        pipeline_name: "daily".to_owned(),
        pipeline_version: 7,
        params: json!({"limit": 10, "names": ["a", "b"], "nested": {"x": null, "ratio": 0.5}}),
        state: RunState::Failed,
        error: Some("task load failed: ünïcode ✓".to_owned()),
        owner: Some("pid:1234@host".to_owned()),
        created_at: Timestamp(1_700_000_000_000_001),
        started_at: Some(Timestamp(1_700_000_000_000_002)),
        finished_at: Some(Timestamp(1_700_000_000_000_003)),
    };
    let bare_run = run("weekly", RunState::Queued, 1_700_000_000_000_004);

    let full_task_run = TaskRunRecord {
        id: TaskRunId::new(),
        run_id: full_run.id,
        task_id: task("extract"),
        index: Some(3),
        fan_out: Some(12),
        state: TaskRunState::WaitingToRetry,
        attempt: 2,
        lease_expiries: 1,
        fencing_token: 9,
        item: Some(Value::Null),
        inputs: Some(
            json!({"command": "echo \"quoted\"\n", "n": -1, "big": 9_007_199_254_740_993_u64}),
        ),
        outputs: Some(json!([1, "two", {"three": 3.25}, [], {}])),
        error: Some("exit status 1".to_owned()),
        lease_owner: Some("worker-7".to_owned()),
        lease_expires_at: Some(Timestamp(1_700_000_000_000_010)),
        ready_at: Some(Timestamp(1_700_000_000_000_011)),
        created_at: Timestamp(1_700_000_000_000_005),
        queued_at: Some(Timestamp(1_700_000_000_000_006)),
        started_at: Some(Timestamp(1_700_000_000_000_007)),
        finished_at: Some(Timestamp(-1)),
    };
    let mut item_task_run = task_run(&full_run, "load", 0, 1_700_000_000_000_006);
    item_task_run.item = Some(json!("a string item"));
    let bare_task_run = task_run(&bare_run, "only", 0, 1_700_000_000_000_007);

    let full_attempt = AttemptRecord {
        task_run_id: full_task_run.id,
        run_id: full_run.id,
        attempt: 2,
        fencing_token: 9,
        worker: "worker-7".to_owned(),
        state: AttemptState::TimedOut,
        started_at: Timestamp(1_700_000_000_000_020),
        finished_at: Some(Timestamp(1_700_000_000_000_021)),
        error: Some("timed out after 30s".to_owned()),
    };
    let first_attempt = attempt(&full_task_run, 1);

    let report = commit(
        &*store,
        WriteBatch {
            runs: vec![full_run.clone(), bare_run.clone()],
            task_runs: vec![
                full_task_run.clone(),
                item_task_run.clone(),
                bare_task_run.clone(),
            ],
            attempts: vec![full_attempt.clone(), first_attempt.clone()],
            ..WriteBatch::default()
        },
    )
    .await;
    assert!(report.stale_task_runs.is_empty());

    assert_eq!(
        store.run(full_run.id).await.unwrap(),
        Some(full_run.clone())
    );
    assert_eq!(
        store.run(bare_run.id).await.unwrap(),
        Some(bare_run.clone())
    );
    assert_eq!(
        store.task_runs(full_run.id).await.unwrap(),
        vec![full_task_run.clone(), item_task_run],
        "task runs come in creation order"
    );
    assert_eq!(
        store.task_runs(bare_run.id).await.unwrap(),
        vec![bare_task_run]
    );
    assert_eq!(
        store.attempts(full_run.id).await.unwrap(),
        vec![first_attempt, full_attempt],
        "attempts come by task run, then attempt number"
    );
    assert_eq!(store.attempts(bare_run.id).await.unwrap(), vec![]);
    assert_eq!(store.run(RunId::new()).await.unwrap(), None);
    assert_eq!(store.task_runs(RunId::new()).await.unwrap(), vec![]);
}

/// A second write of a row replaces all of it: fields written as `None` are cleared.
pub async fn a_later_write_replaces_every_field_of_a_row(store: Arc<dyn Store>) {
    let mut stored_run = run("daily", RunState::Running, 1);
    stored_run.owner = Some("pid:1@host".to_owned());
    stored_run.started_at = Some(Timestamp(2));
    let mut stored_task_run = task_run(&stored_run, "extract", 1, 3);
    stored_task_run.state = TaskRunState::Running;
    stored_task_run.lease_owner = Some("worker-1".to_owned());
    stored_task_run.lease_expires_at = Some(Timestamp(100));
    stored_task_run.inputs = Some(json!({"a": 1}));
    let mut stored_attempt = attempt(&stored_task_run, 1);
    commit(
        &*store,
        WriteBatch {
            runs: vec![stored_run.clone()],
            task_runs: vec![stored_task_run.clone()],
            attempts: vec![stored_attempt.clone()],
            ..WriteBatch::default()
        },
    )
    .await;

    stored_run.state = RunState::Succeeded;
    stored_run.owner = None;
    stored_run.finished_at = Some(Timestamp(9));
    stored_task_run.state = TaskRunState::Succeeded;
    stored_task_run.lease_owner = None;
    stored_task_run.lease_expires_at = None;
    stored_task_run.inputs = None;
    stored_task_run.outputs = Some(json!({"rows": 3}));
    stored_attempt.state = AttemptState::Succeeded;
    stored_attempt.finished_at = Some(Timestamp(8));
    commit(
        &*store,
        WriteBatch {
            runs: vec![stored_run.clone()],
            task_runs: vec![stored_task_run.clone()],
            attempts: vec![stored_attempt.clone()],
            ..WriteBatch::default()
        },
    )
    .await;

    assert_eq!(
        store.run(stored_run.id).await.unwrap(),
        Some(stored_run.clone())
    );
    assert_eq!(
        store.task_runs(stored_run.id).await.unwrap(),
        vec![stored_task_run]
    );
    assert_eq!(
        store.attempts(stored_run.id).await.unwrap(),
        vec![stored_attempt]
    );
}

/// An empty batch succeeds and reports nothing.
pub async fn an_empty_batch_commits_nothing(store: Arc<dyn Store>) {
    let report = commit(&*store, WriteBatch::default()).await;
    assert_eq!(report, CommitReport::default());
    let runs = store.runs(&RunFilter::default()).await.unwrap();
    assert!(runs.is_empty());
}

/// A batch that breaks a rule stores none of its writes.
pub async fn a_failed_commit_stores_nothing(store: Arc<dyn Store>) {
    let stored_run = run("daily", RunState::Queued, 1);
    commit(
        &*store,
        WriteBatch {
            runs: vec![stored_run.clone()],
            ..WriteBatch::default()
        },
    )
    .await;

    let mut changed_run = stored_run.clone();
    changed_run.state = RunState::Running;
    let new_run = run("daily", RunState::Queued, 2);
    let orphan = task_run(&run("ghost", RunState::Queued, 3), "lost", 0, 3);
    let result = store
        .commit(&WriteBatch {
            runs: vec![changed_run, new_run.clone()],
            task_runs: vec![task_run(&new_run, "fine", 0, 4), orphan],
            attempts: vec![],
            ..WriteBatch::default()
        })
        .await;
    assert!(
        matches!(result, Err(StoreError::Conflict(_))),
        "a task run of an unknown run is a conflict, got {result:?}"
    );
    assert_eq!(store.run(new_run.id).await.unwrap(), None);
    assert_eq!(store.task_runs(new_run.id).await.unwrap(), vec![]);
    assert_eq!(
        store.run(stored_run.id).await.unwrap(),
        Some(stored_run.clone())
    );

    let stored_task_run = task_run(&stored_run, "extract", 0, 5);
    let orphan_attempt = attempt(&task_run(&stored_run, "never_stored", 0, 6), 1);
    let result = store
        .commit(&WriteBatch {
            runs: vec![],
            task_runs: vec![stored_task_run],
            attempts: vec![orphan_attempt],
            ..WriteBatch::default()
        })
        .await;
    assert!(
        matches!(result, Err(StoreError::Conflict(_))),
        "an attempt of an unknown task run is a conflict, got {result:?}"
    );
    assert_eq!(store.task_runs(stored_run.id).await.unwrap(), vec![]);

    let stored_task_run = task_run(&stored_run, "extract", 0, 7);
    commit(
        &*store,
        WriteBatch {
            task_runs: vec![stored_task_run.clone()],
            ..WriteBatch::default()
        },
    )
    .await;
    assert_eq!(
        store.task_runs(stored_run.id).await.unwrap(),
        vec![stored_task_run],
        "a failed commit leaves the store writable"
    );
}

/// A task-run write with a lower fencing token than the stored one is not applied and is
/// reported; the rest of the batch applies.
pub async fn a_stale_fencing_token_cannot_overwrite_a_task_run(store: Arc<dyn Store>) {
    let stored_run = run("daily", RunState::Running, 1);
    let mut leased = task_run(&stored_run, "extract", 3, 2);
    leased.state = TaskRunState::Running;
    leased.lease_owner = Some("worker-new".to_owned());
    let other = task_run(&stored_run, "load", 0, 3);
    commit(
        &*store,
        WriteBatch {
            runs: vec![stored_run.clone()],
            task_runs: vec![leased.clone(), other.clone()],
            attempts: vec![],
            ..WriteBatch::default()
        },
    )
    .await;

    let mut stale = leased.clone();
    stale.fencing_token = 2;
    stale.state = TaskRunState::Succeeded;
    stale.lease_owner = Some("worker-old".to_owned());
    let mut queued = other.clone();
    queued.state = TaskRunState::Queued;
    let mut finished_run = stored_run.clone();
    finished_run.state = RunState::Succeeded;
    let report = commit(
        &*store,
        WriteBatch {
            runs: vec![finished_run.clone()],
            task_runs: vec![stale, queued.clone()],
            attempts: vec![attempt(&leased, 1)],
            ..WriteBatch::default()
        },
    )
    .await;
    assert_eq!(report.stale_task_runs, vec![leased.id]);
    assert_eq!(
        store.task_runs(stored_run.id).await.unwrap(),
        vec![leased, queued]
    );
    assert_eq!(store.run(stored_run.id).await.unwrap(), Some(finished_run));
}

/// A task-run write with the stored fencing token or a higher one applies.
pub async fn an_equal_or_higher_fencing_token_overwrites_a_task_run(store: Arc<dyn Store>) {
    let stored_run = run("daily", RunState::Running, 1);
    let mut current = task_run(&stored_run, "extract", 3, 2);
    current.state = TaskRunState::Running;
    commit(
        &*store,
        WriteBatch {
            runs: vec![stored_run.clone()],
            task_runs: vec![current.clone()],
            attempts: vec![],
            ..WriteBatch::default()
        },
    )
    .await;

    current.outputs = Some(json!({"progress": 1}));
    let report = commit(
        &*store,
        WriteBatch {
            task_runs: vec![current.clone()],
            ..WriteBatch::default()
        },
    )
    .await;
    assert!(report.stale_task_runs.is_empty(), "an equal token applies");
    assert_eq!(
        store.task_runs(stored_run.id).await.unwrap(),
        vec![current.clone()]
    );

    current.fencing_token = 4;
    current.state = TaskRunState::Succeeded;
    let report = commit(
        &*store,
        WriteBatch {
            task_runs: vec![current.clone()],
            ..WriteBatch::default()
        },
    )
    .await;
    assert!(report.stale_task_runs.is_empty(), "a higher token applies");
    assert_eq!(store.task_runs(stored_run.id).await.unwrap(), vec![current]);
}

/// Writes of the same task run in one batch apply in order, under the same fencing rule.
pub async fn writes_of_one_task_run_within_a_batch_apply_in_order(store: Arc<dyn Store>) {
    let stored_run = run("daily", RunState::Running, 1);
    let mut queued = task_run(&stored_run, "extract", 0, 2);
    queued.state = TaskRunState::Queued;
    let mut running = queued.clone();
    running.state = TaskRunState::Running;
    running.fencing_token = 1;
    let mut succeeded = running.clone();
    succeeded.state = TaskRunState::Succeeded;
    let report = commit(
        &*store,
        WriteBatch {
            runs: vec![stored_run.clone()],
            task_runs: vec![queued, running.clone(), succeeded.clone()],
            attempts: vec![],
            ..WriteBatch::default()
        },
    )
    .await;
    assert!(report.stale_task_runs.is_empty());
    assert_eq!(
        store.task_runs(stored_run.id).await.unwrap(),
        vec![succeeded.clone()]
    );

    let mut newer = succeeded.clone();
    newer.fencing_token = 5;
    newer.state = TaskRunState::Failed;
    let mut older = succeeded.clone();
    older.fencing_token = 2;
    let report = commit(
        &*store,
        WriteBatch {
            task_runs: vec![newer.clone(), older],
            ..WriteBatch::default()
        },
    )
    .await;
    assert_eq!(report.stale_task_runs, vec![newer.id]);
    assert_eq!(store.task_runs(stored_run.id).await.unwrap(), vec![newer]);
}

/// Runs list newest first, filtered by pipeline and state, after a cursor, up to a limit.
pub async fn runs_are_listed_newest_first_with_filters_and_a_cursor(store: Arc<dyn Store>) {
    let runs: Vec<RunRecord> = [
        ("daily", RunState::Succeeded),
        ("weekly", RunState::Failed),
        ("daily", RunState::Failed),
        ("daily", RunState::Running),
        ("weekly", RunState::Succeeded),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (name, state))| run(name, state, 1_000 + i as i64))
    .collect();
    commit(
        &*store,
        WriteBatch {
            runs: runs.clone(),
            ..WriteBatch::default()
        },
    )
    .await;
    let newest_first: Vec<RunRecord> = runs.iter().rev().cloned().collect();
    let ids = |found: Vec<RunRecord>| found.into_iter().map(|r| r.id).collect::<Vec<_>>();

    let all = store.runs(&RunFilter::default()).await.unwrap();
    assert_eq!(all, newest_first, "a zero limit lists up to the default");

    let daily = store
        .runs(&RunFilter {
            pipeline_name: Some("daily".into()),
            ..RunFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(ids(daily), vec![runs[3].id, runs[2].id, runs[0].id]);

    let failed = store
        .runs(&RunFilter {
            state: Some(RunState::Failed),
            ..RunFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(ids(failed), vec![runs[2].id, runs[1].id]);

    let daily_failed = store
        .runs(&RunFilter {
            pipeline_name: Some("daily".into()),
            state: Some(RunState::Failed),
            ..RunFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(ids(daily_failed), vec![runs[2].id]);

    let first_page = store
        .runs(&RunFilter {
            limit: 2,
            ..RunFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(ids(first_page.clone()), vec![runs[4].id, runs[3].id]);
    let second_page = store
        .runs(&RunFilter {
            before: Some(first_page[1].id),
            limit: 2,
            ..RunFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(ids(second_page.clone()), vec![runs[2].id, runs[1].id]);
    let last_page = store
        .runs(&RunFilter {
            before: Some(second_page[1].id),
            limit: 2,
            ..RunFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(ids(last_page), vec![runs[0].id]);

    let none = store
        .runs(&RunFilter {
            pipeline_name: Some("missing".into()),
            ..RunFilter::default()
        })
        .await
        .unwrap();
    assert!(none.is_empty());
}

/// Log lines read back in order with their task, after a cursor, for one task, up to a
/// limit, and only for the run asked.
pub async fn logs_are_read_in_order_after_a_cursor_by_task_and_up_to_a_limit(
    store: Arc<dyn Store>,
) {
    let stored_run = run("daily", RunState::Running, 1);
    let other_run = run("daily", RunState::Running, 2);
    let extract = task_run(&stored_run, "extract", 0, 3);
    let mut extract_item = task_run(&stored_run, "extract", 0, 4);
    extract_item.index = Some(0);
    let load = task_run(&stored_run, "load", 0, 5);
    let elsewhere = task_run(&other_run, "extract", 0, 6);
    commit(
        &*store,
        WriteBatch {
            runs: vec![stored_run.clone(), other_run.clone()],
            task_runs: vec![
                extract.clone(),
                extract_item.clone(),
                load.clone(),
                elsewhere.clone(),
            ],
            attempts: vec![],
            ..WriteBatch::default()
        },
    )
    .await;

    let line = |task_run: &TaskRunRecord, stream: LogStream, at: i64, text: &str| NewLogLine {
        run_id: task_run.run_id,
        task_run_id: task_run.id,
        attempt: 1,
        stream,
        at: Timestamp(at),
        text: text.to_owned(),
    };
    let first_lines = vec![
        line(&extract, LogStream::Stdout, 10, "reading 3 files"),
        line(&load, LogStream::Stderr, 11, "warning: \"quoted\" ✓"),
        line(&elsewhere, LogStream::Stdout, 12, "another run"),
        line(&extract_item, LogStream::System, 13, ""),
    ];
    let second_lines = vec![line(&load, LogStream::Stdout, 14, "loaded")];
    store.append_logs(&first_lines).await.unwrap();
    store.append_logs(&second_lines).await.unwrap();
    store.append_logs(&[]).await.unwrap();

    let query = LogQuery {
        run_id: stored_run.id,
        task_id: None,
        after_seq: 0,
        limit: 100,
    };
    let all = store.logs(&query).await.unwrap();
    let texts = |found: &[LogLine]| {
        found
            .iter()
            .map(|l| l.line.text.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        texts(&all),
        vec!["reading 3 files", "warning: \"quoted\" ✓", "", "loaded"]
    );
    assert!(
        all.windows(2).all(|pair| pair[0].seq < pair[1].seq),
        "seq increases"
    );
    assert_eq!(all[0].line, first_lines[0]);
    assert_eq!(all[1].line, first_lines[1]);
    assert_eq!(all[2].line, first_lines[3]);
    assert_eq!(all[3].line, second_lines[0]);
    let task_ids: Vec<Option<TaskId>> = all.iter().map(|l| l.task_id.clone()).collect();
    assert_eq!(
        task_ids,
        vec![
            Some(task("extract")),
            Some(task("load")),
            Some(task("extract")),
            Some(task("load"))
        ]
    );

    let after = store
        .logs(&LogQuery {
            after_seq: all[1].seq,
            ..query.clone()
        })
        .await
        .unwrap();
    assert_eq!(after, all[2..].to_vec());
    let limited = store
        .logs(&LogQuery {
            limit: 2,
            ..query.clone()
        })
        .await
        .unwrap();
    assert_eq!(limited, all[..2].to_vec());
    let extract_only = store
        .logs(&LogQuery {
            task_id: Some(task("extract")),
            ..query.clone()
        })
        .await
        .unwrap();
    assert_eq!(
        extract_only,
        vec![all[0].clone(), all[2].clone()],
        "a task's lines span all its task runs"
    );
    let tail = store
        .logs(&LogQuery {
            after_seq: all[3].seq,
            ..query.clone()
        })
        .await
        .unwrap();
    assert!(tail.is_empty());

    let unknown_task_run = NewLogLine {
        task_run_id: TaskRunId::new(),
        ..line(&extract, LogStream::System, 15, "early")
    };
    store
        .append_logs(std::slice::from_ref(&unknown_task_run))
        .await
        .unwrap();
    let tail = store
        .logs(&LogQuery {
            after_seq: all[3].seq,
            ..query
        })
        .await
        .unwrap();
    assert_eq!(tail.len(), 1);
    assert_eq!(
        tail[0].task_id, None,
        "a line of a task run not stored has no task id"
    );
    assert_eq!(tail[0].line, unknown_task_run);
}

/// Two runs of one org (the second with a `load` task) and one run of another org, each
/// with task runs, for the log search tests; returns the task runs `extract` and `load` of
/// the first run, `extract` of the second and `extract` of the other org's run.
async fn log_search_fixture(
    store: &dyn Store,
) -> (TaskRunRecord, TaskRunRecord, TaskRunRecord, TaskRunRecord) {
    let first = run("daily", RunState::Running, 1);
    let second = run("daily", RunState::Running, 2);
    let foreign = RunRecord {
        org_id: OrgId::new(),
        ..run("daily", RunState::Running, 3)
    };
    let extract = task_run(&first, "extract", 0, 4);
    let load = task_run(&first, "load", 0, 5);
    let second_extract = task_run(&second, "extract", 0, 6);
    let foreign_extract = task_run(&foreign, "extract", 0, 7);
    commit(
        store,
        WriteBatch {
            runs: vec![first, second, foreign],
            task_runs: vec![
                extract.clone(),
                load.clone(),
                second_extract.clone(),
                foreign_extract.clone(),
            ],
            ..WriteBatch::default()
        },
    )
    .await;
    (extract, load, second_extract, foreign_extract)
}

fn log_line(task_run: &TaskRunRecord, stream: LogStream, at: i64, text: &str) -> NewLogLine {
    NewLogLine {
        run_id: task_run.run_id,
        task_run_id: task_run.id,
        attempt: 1,
        stream,
        at: Timestamp(at),
        text: text.to_owned(),
    }
}

fn log_search(org_id: OrgId, query: &str) -> LogSearch {
    LogSearch {
        org_id,
        query: LogSearchQuery::parse(query).expect("the test query parses"),
        run_id: None,
        task_id: None,
        stream: None,
        since: None,
        until: None,
        limit: 0,
    }
}

async fn search_texts(store: &dyn Store, search: &LogSearch) -> Vec<String> {
    store
        .search_logs(search)
        .await
        .expect("the search succeeds")
        .into_iter()
        .map(|hit| hit.line.line.text)
        .collect()
}

/// A search matches lines holding every term, words case-insensitively and quoted phrases
/// as adjacent words, wherever punctuation splits them; hits come best first (higher score),
/// and lines of equal relevance newest first. Each hit carries the whole stored line.
pub async fn log_search_matches_every_word_and_phrase_best_first_then_newest(
    store: Arc<dyn Store>,
) {
    let (extract, load, _, _) = log_search_fixture(&*store).await;
    let lines = [
        log_line(
            &extract,
            LogStream::Stdout,
            10,
            "reading 3 files from s3://bucket/in",
        ),
        log_line(
            &extract,
            LogStream::Stderr,
            11,
            "ERROR: Connection_Refused by host-1.example.com",
        ),
        log_line(
            &load,
            LogStream::Stderr,
            12,
            "error: connection was refused, retrying",
        ),
        log_line(&load, LogStream::Stdout, 13, "timeout timeout timeout"),
        log_line(
            &load,
            LogStream::Stdout,
            14,
            "a much longer line that mentions one timeout among many other words of no interest",
        ),
        log_line(&extract, LogStream::System, 15, "attempt ended"),
        log_line(&load, LogStream::System, 16, "attempt ended"),
    ];
    store.append_logs(&lines[..3]).await.unwrap();
    store.append_logs(&lines[3..]).await.unwrap();
    let org = OrgId::DEFAULT;

    assert_eq!(
        search_texts(&*store, &log_search(org, "error refused"))
            .await
            .len(),
        2,
        "every word, in any order, case-insensitively"
    );
    assert_eq!(
        search_texts(&*store, &log_search(org, "\"connection refused\"")).await,
        vec!["ERROR: Connection_Refused by host-1.example.com"],
        "a phrase needs its words side by side"
    );
    assert_eq!(
        search_texts(&*store, &log_search(org, "connection_refused")).await,
        vec!["ERROR: Connection_Refused by host-1.example.com"],
        "punctuation inside a word makes a phrase"
    );
    assert_eq!(
        search_texts(&*store, &log_search(org, "example host")).await,
        vec!["ERROR: Connection_Refused by host-1.example.com"],
        "a host name is split into its words"
    );
    assert_eq!(
        search_texts(&*store, &log_search(org, "s3 bucket")).await,
        vec!["reading 3 files from s3://bucket/in"]
    );
    assert!(search_texts(&*store, &log_search(org, "error nothing"))
        .await
        .is_empty());
    assert!(
        search_texts(&*store, &log_search(org, "time"))
            .await
            .is_empty(),
        "whole words"
    );

    let hits = store
        .search_logs(&log_search(org, "timeout"))
        .await
        .unwrap();
    assert_eq!(hits.len(), 2);
    assert_eq!(hits[0].line.line, lines[3], "the better match first");
    assert_eq!(hits[1].line.line, lines[4]);
    assert!(hits[0].score > hits[1].score, "scores: {hits:?}");
    assert_eq!(hits[0].line.task_id, Some(task("load")));
    assert!(hits[0].line.seq > 0);

    let ties = store
        .search_logs(&log_search(org, "attempt ended"))
        .await
        .unwrap();
    assert_eq!(ties.len(), 2);
    assert_eq!(
        ties[0].line.line, lines[6],
        "equal relevance: the newest first"
    );
    assert_eq!(ties[1].line.line, lines[5]);
    assert!(ties[0].line.seq > ties[1].line.seq);
}

/// A search returns only lines of the org's runs, and narrows to a run, a task, a stream and
/// a time range `[since, until)`.
pub async fn log_search_is_scoped_by_org_and_filters_by_run_task_stream_and_time(
    store: Arc<dyn Store>,
) {
    let (extract, load, second_extract, foreign_extract) = log_search_fixture(&*store).await;
    store
        .append_logs(&[
            log_line(&extract, LogStream::Stdout, 10, "needle extract stdout"),
            log_line(&load, LogStream::Stderr, 11, "needle load stderr"),
            log_line(&second_extract, LogStream::Stdout, 12, "needle second run"),
            log_line(&foreign_extract, LogStream::Stdout, 13, "needle other org"),
        ])
        .await
        .unwrap();
    let org = OrgId::DEFAULT;
    let mut all = search_texts(&*store, &log_search(org, "needle")).await;
    all.sort();
    assert_eq!(
        all,
        vec![
            "needle extract stdout",
            "needle load stderr",
            "needle second run"
        ],
        "another org's lines are never returned"
    );
    let foreign_org = store
        .run(foreign_extract.run_id)
        .await
        .unwrap()
        .unwrap()
        .org_id;
    assert_eq!(
        search_texts(&*store, &log_search(foreign_org, "needle")).await,
        vec!["needle other org"]
    );
    assert!(search_texts(&*store, &log_search(OrgId::new(), "needle"))
        .await
        .is_empty());
    assert!(
        search_texts(
            &*store,
            &LogSearch {
                run_id: Some(foreign_extract.run_id),
                ..log_search(org, "needle")
            }
        )
        .await
        .is_empty(),
        "a run of another org is not searched even when named"
    );

    let by_run = LogSearch {
        run_id: Some(extract.run_id),
        ..log_search(org, "needle")
    };
    let mut texts = search_texts(&*store, &by_run).await;
    texts.sort();
    assert_eq!(texts, vec!["needle extract stdout", "needle load stderr"]);
    let by_task = LogSearch {
        task_id: Some(task("extract")),
        ..log_search(org, "needle")
    };
    let mut texts = search_texts(&*store, &by_task).await;
    texts.sort();
    assert_eq!(texts, vec!["needle extract stdout", "needle second run"]);
    let by_run_and_task = LogSearch {
        run_id: Some(extract.run_id),
        ..by_task.clone()
    };
    assert_eq!(
        search_texts(&*store, &by_run_and_task).await,
        vec!["needle extract stdout"]
    );
    let by_stream = LogSearch {
        stream: Some(LogStream::Stderr),
        ..log_search(org, "needle")
    };
    assert_eq!(
        search_texts(&*store, &by_stream).await,
        vec!["needle load stderr"]
    );
    let by_time = LogSearch {
        since: Some(Timestamp(11)),
        until: Some(Timestamp(12)),
        ..log_search(org, "needle")
    };
    assert_eq!(
        search_texts(&*store, &by_time).await,
        vec!["needle load stderr"],
        "since is inclusive, until exclusive"
    );
}

/// Query text is parsed before it reaches a store, and whatever it holds (quotes, FTS5 or
/// tsquery operators, backslashes) the search either answers or the parser refuses it with
/// a reason; the store never fails on it. The limit is 100 by default, 1,000 at most.
pub async fn log_search_takes_any_text_and_bounds_its_limit(store: Arc<dyn Store>) {
    let (extract, _, _, _) = log_search_fixture(&*store).await;
    let hostile =
        "a \"quoted\" OR NEAR(x, y) -minus * star 'apostrophe' back\\slash AND NOT : ^ {col} !";
    store
        .append_logs(&[log_line(&extract, LogStream::Stdout, 10, hostile)])
        .await
        .unwrap();
    for text in [
        "\"",
        "\"unbalanced",
        "*",
        "NEAR(",
        "NEAR(x, y)",
        "OR",
        "a OR",
        "-",
        "-minus",
        "'",
        "'apostrophe'",
        "\\",
        "back\\slash",
        "star*",
        "col:star",
        "{col}",
        "AND NOT",
        "!",
        "^a",
        "a & b | !c <-> d",
        "\u{0}",
        hostile,
    ] {
        match LogSearchQuery::parse(text) {
            Ok(query) => {
                let search = LogSearch {
                    query,
                    ..log_search(OrgId::DEFAULT, "x")
                };
                if let Err(error) = store.search_logs(&search).await {
                    panic!("{text:?}: the store failed: {error}");
                }
            }
            Err(error) => assert!(!error.to_string().is_empty(), "{text:?}"),
        }
    }
    assert_eq!(
        search_texts(&*store, &log_search(OrgId::DEFAULT, hostile)).await,
        vec![hostile],
        "a line matches a query of its own text"
    );
    assert_eq!(
        search_texts(&*store, &log_search(OrgId::DEFAULT, "OR NEAR not")).await,
        vec![hostile],
        "operators are words"
    );

    let lines: Vec<NewLogLine> = (0..1_005)
        .map(|i| {
            log_line(
                &extract,
                LogStream::Stdout,
                100 + i,
                &format!("many line {i}"),
            )
        })
        .collect();
    store.append_logs(&lines).await.unwrap();
    let count = |limit: u32| {
        let store = Arc::clone(&store);
        async move {
            store
                .search_logs(&LogSearch {
                    limit,
                    ..log_search(OrgId::DEFAULT, "many")
                })
                .await
                .unwrap()
                .len()
        }
    };
    assert_eq!(count(0).await, 100, "the default limit");
    assert_eq!(count(7).await, 7);
    assert_eq!(count(5_000).await, 1_000, "the largest limit");
}

/// Artifacts get versions 1, 2, 3… per name and are found by id, by name (a version or the
/// latest) and by filter, newest first.
pub async fn artifacts_get_versions_per_name_and_are_found_by_id_name_and_filter(
    store: Arc<dyn Store>,
) {
    let producing_run = run("daily", RunState::Running, 1);
    let producer = Producer {
        run_id: producing_run.id,
        task_run_id: TaskRunId::new(),
        task_id: task("clean"),
        attempt: 2,
    };
    let table_meta = TableMeta {
        rows: 344,
        columns: vec![
            ColumnMeta {
                name: "species".into(),
                data_type: "Utf8".into(),
                nullable: false,
            },
            ColumnMeta {
                name: "mass".into(),
                data_type: "Float64".into(),
                nullable: true,
            },
        ],
    };
    let raw = NewArtifact {
        org_id: OrgId::DEFAULT,
        name: "penguins/raw".into(),
        media_type: "text/csv".into(),
        table: None,
        produced_by: None,
        inputs: vec![],
    };
    let digest_a = "a".repeat(64);
    let digest_b = "b".repeat(64);
    let raw_v1 = store.insert_artifact(&digest_a, 10, &raw).await.unwrap();
    let raw_v2 = store
        .insert_artifact(&digest_b, u64::from(u32::MAX) + 1, &raw)
        .await
        .unwrap();
    let clean = NewArtifact {
        org_id: OrgId::DEFAULT,
        name: "penguins/clean".into(),
        media_type: "application/vnd.apache.parquet".into(),
        table: Some(table_meta),
        produced_by: Some(producer),
        inputs: vec![raw_v1.id, raw_v2.id],
    };
    let clean_v1 = store.insert_artifact(&digest_a, 10, &clean).await.unwrap();
    let raw_v3 = store.insert_artifact(&digest_a, 10, &raw).await.unwrap();

    assert_eq!(
        (
            raw_v1.version,
            raw_v2.version,
            raw_v3.version,
            clean_v1.version
        ),
        (1, 2, 3, 1)
    );
    assert_eq!(raw_v2.size_bytes, u64::from(u32::MAX) + 1);
    assert_eq!(clean_v1.meta, clean);
    assert_eq!(clean_v1.digest, digest_a);

    assert_eq!(
        store.artifact(clean_v1.id).await.unwrap(),
        Some(clean_v1.clone())
    );
    assert_eq!(
        store.artifact(raw_v2.id).await.unwrap(),
        Some(raw_v2.clone())
    );
    assert_eq!(store.artifact(ArtifactId::new()).await.unwrap(), None);

    assert_eq!(
        store
            .artifact_by_name(OrgId::DEFAULT, "penguins/raw", None)
            .await
            .unwrap(),
        Some(raw_v3.clone())
    );
    assert_eq!(
        store
            .artifact_by_name(OrgId::DEFAULT, "penguins/raw", Some(2))
            .await
            .unwrap(),
        Some(raw_v2.clone())
    );
    assert_eq!(
        store
            .artifact_by_name(OrgId::DEFAULT, "penguins/raw", Some(4))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .artifact_by_name(OrgId::DEFAULT, "missing", None)
            .await
            .unwrap(),
        None
    );

    let all = store.artifacts(&ArtifactFilter::default()).await.unwrap();
    assert_eq!(
        all,
        vec![
            raw_v3.clone(),
            clean_v1.clone(),
            raw_v2.clone(),
            raw_v1.clone()
        ]
    );
    let raw_only = store
        .artifacts(&ArtifactFilter {
            name: Some("penguins/raw".into()),
            ..ArtifactFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(raw_only, vec![raw_v3.clone(), raw_v2, raw_v1]);
    let by_run = store
        .artifacts(&ArtifactFilter {
            run_id: Some(producing_run.id),
            ..ArtifactFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(by_run, vec![clean_v1]);
    let limited = store
        .artifacts(&ArtifactFilter {
            limit: 1,
            ..ArtifactFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(limited, vec![raw_v3]);
}

/// How many task runs the large-batch test writes at once.
const LARGE_BATCH_TASK_RUNS: usize = 10_000;

/// One batch of 10,000 task runs commits and reads back whole, then moves through its next
/// state in a second batch of the same size.
pub async fn a_batch_of_ten_thousand_task_runs_round_trips(store: Arc<dyn Store>) {
    let stored_run = run("fan_out", RunState::Running, 1);
    let mut task_runs: Vec<TaskRunRecord> = (0..LARGE_BATCH_TASK_RUNS)
        .map(|i| {
            let mut item = task_run(&stored_run, "each", 0, 1_000 + i as i64);
            item.index = Some(i as u32);
            item.item = Some(json!({"n": i}));
            item
        })
        .collect();
    commit(
        &*store,
        WriteBatch {
            runs: vec![stored_run.clone()],
            task_runs: task_runs.clone(),
            attempts: vec![],
            ..WriteBatch::default()
        },
    )
    .await;
    assert_eq!(store.task_runs(stored_run.id).await.unwrap(), task_runs);

    for (i, item) in task_runs.iter_mut().enumerate() {
        item.state = TaskRunState::Succeeded;
        item.fencing_token = 1;
        item.outputs = Some(json!({"square": i * i}));
    }
    let report = commit(
        &*store,
        WriteBatch {
            task_runs: task_runs.clone(),
            ..WriteBatch::default()
        },
    )
    .await;
    assert!(report.stale_task_runs.is_empty());
    assert_eq!(store.task_runs(stored_run.id).await.unwrap(), task_runs);
}

/// Pipeline names are per org; a list shows each name's latest version, archived names only
/// when asked; archiving applies to every version and can be undone.
pub async fn pipelines_are_named_per_org_listed_by_latest_version_and_archived(
    store: Arc<dyn Store>,
) {
    let other = OrgId::new();
    let a1 = store
        .save_pipeline(OrgId::DEFAULT, &pipeline("daily", "echo one"))
        .await
        .unwrap();
    let a2 = store
        .save_pipeline(OrgId::DEFAULT, &pipeline("daily", "echo two"))
        .await
        .unwrap();
    let b1 = store
        .save_pipeline(other, &pipeline("daily", "echo two"))
        .await
        .unwrap();
    let weekly = store
        .save_pipeline(OrgId::DEFAULT, &pipeline("weekly", "echo one"))
        .await
        .unwrap();
    assert_eq!((a1.version, a2.version, b1.version), (1, 2, 1));
    assert_eq!(b1.org_id, other);
    assert_eq!(
        store.pipeline(other, "daily", 2).await.unwrap(),
        None,
        "another org's versions are not visible"
    );
    assert_eq!(store.pipeline(other, "weekly", 1).await.unwrap(), None);

    let listed = store.pipelines(OrgId::DEFAULT, false).await.unwrap();
    assert_eq!(listed, vec![a2.clone(), weekly.clone()]);
    assert_eq!(
        store.pipelines(other, false).await.unwrap(),
        vec![b1.clone()]
    );
    let versions = store
        .pipeline_versions(OrgId::DEFAULT, "daily")
        .await
        .unwrap();
    assert_eq!(versions, vec![a2.clone(), a1.clone()]);
    assert!(store
        .pipeline_versions(other, "weekly")
        .await
        .unwrap()
        .is_empty());

    let at = Timestamp(1_700_000_000_000_000);
    assert!(store
        .set_pipeline_archived(OrgId::DEFAULT, "daily", Some(at))
        .await
        .unwrap());
    assert!(!store
        .set_pipeline_archived(other, "weekly", Some(at))
        .await
        .unwrap());
    assert_eq!(
        store.pipelines(OrgId::DEFAULT, false).await.unwrap(),
        vec![weekly.clone()]
    );
    let with_archived = store.pipelines(OrgId::DEFAULT, true).await.unwrap();
    assert_eq!(with_archived.len(), 2);
    assert_eq!(with_archived[0].archived_at, Some(at));
    let archived_v1 = store
        .pipeline(OrgId::DEFAULT, "daily", 1)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        archived_v1.archived_at,
        Some(at),
        "every version is archived"
    );
    assert_eq!(
        store.pipelines(other, false).await.unwrap(),
        vec![b1],
        "archiving is per org"
    );

    assert!(store
        .set_pipeline_archived(OrgId::DEFAULT, "daily", None)
        .await
        .unwrap());
    assert_eq!(
        store.pipelines(OrgId::DEFAULT, false).await.unwrap(),
        vec![a2, weekly]
    );
}

/// Runs and artifacts carry their org; filters by org see only that org's rows, artifact
/// versions count per org and name, and runs filter by a creation-time range.
pub async fn runs_and_artifacts_are_scoped_by_org_and_runs_filter_by_creation_time(
    store: Arc<dyn Store>,
) {
    let other = OrgId::new();
    let mut runs = Vec::new();
    for (i, org) in [OrgId::DEFAULT, other, OrgId::DEFAULT, other]
        .into_iter()
        .enumerate()
    {
        let mut record = run("daily", RunState::Queued, 1_000 * (i as i64 + 1));
        record.org_id = org;
        runs.push(record);
    }
    commit(
        store.as_ref(),
        WriteBatch {
            runs: runs.clone(),
            ..WriteBatch::default()
        },
    )
    .await;
    assert_eq!(store.run(runs[1].id).await.unwrap().unwrap().org_id, other);
    let ids = |list: Vec<RunRecord>| list.into_iter().map(|r| r.id).collect::<Vec<_>>();
    let of_other = store
        .runs(&RunFilter {
            org_id: Some(other),
            ..RunFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(ids(of_other), vec![runs[3].id, runs[1].id]);
    let in_range = store
        .runs(&RunFilter {
            org_id: Some(OrgId::DEFAULT),
            created_after: Some(Timestamp(1_000)),
            created_before: Some(Timestamp(3_000)),
            ..RunFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(
        ids(in_range),
        vec![runs[0].id],
        "after is inclusive, before is not"
    );
    let everything = store.runs(&RunFilter::default()).await.unwrap();
    assert_eq!(everything.len(), 4, "no org filter sees every org");

    let meta = |org: OrgId| NewArtifact {
        org_id: org,
        name: "report".into(),
        media_type: "text/markdown".into(),
        table: None,
        produced_by: None,
        inputs: vec![],
    };
    let digest = "c".repeat(64);
    let mine = store
        .insert_artifact(&digest, 3, &meta(OrgId::DEFAULT))
        .await
        .unwrap();
    let theirs = store
        .insert_artifact(&digest, 3, &meta(other))
        .await
        .unwrap();
    let mine_again = store
        .insert_artifact(&digest, 3, &meta(OrgId::DEFAULT))
        .await
        .unwrap();
    assert_eq!(
        (mine.version, theirs.version, mine_again.version),
        (1, 1, 2)
    );
    assert_eq!(
        store
            .artifact(theirs.id)
            .await
            .unwrap()
            .unwrap()
            .meta
            .org_id,
        other
    );
    assert_eq!(
        store
            .artifact_by_name(other, "report", None)
            .await
            .unwrap()
            .map(|a| a.id),
        Some(theirs.id)
    );
    assert_eq!(
        store
            .artifact_by_name(other, "report", Some(2))
            .await
            .unwrap(),
        None
    );
    let listed = store
        .artifacts(&ArtifactFilter {
            org_id: Some(OrgId::DEFAULT),
            ..ArtifactFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(
        listed.into_iter().map(|a| a.id).collect::<Vec<_>>(),
        vec![mine_again.id, mine.id]
    );
}

/// State counts see every row by its state, and nothing when the store is empty.
pub async fn state_counts_count_runs_task_runs_and_attempts_by_state(store: Arc<dyn Store>) {
    assert_eq!(store.state_counts().await.unwrap(), StateCounts::default());
    let done = run("daily", RunState::Succeeded, 1);
    let going = run("daily", RunState::Running, 2);
    let queued = run("daily", RunState::Running, 3);
    let mut a = task_run(&done, "a", 1, 1);
    a.state = TaskRunState::Succeeded;
    let mut b = task_run(&going, "b", 1, 2);
    b.state = TaskRunState::Queued;
    let mut c = task_run(&queued, "c", 1, 3);
    c.state = TaskRunState::Queued;
    commit(
        store.as_ref(),
        WriteBatch {
            runs: vec![done, going, queued],
            task_runs: vec![a.clone(), b, c],
            attempts: vec![AttemptRecord {
                task_run_id: a.id,
                run_id: a.run_id,
                attempt: 1,
                fencing_token: 1,
                worker: "w".into(),
                state: AttemptState::LeaseExpired,
                started_at: Timestamp(1),
                finished_at: Some(Timestamp(2)),
                error: None,
            }],
            ..WriteBatch::default()
        },
    )
    .await;
    let counts = store.state_counts().await.unwrap();
    assert_eq!(
        counts.runs,
        vec![(RunState::Running, 2), (RunState::Succeeded, 1)]
    );
    assert_eq!(
        counts.task_runs,
        vec![(TaskRunState::Queued, 2), (TaskRunState::Succeeded, 1)]
    );
    assert_eq!(counts.attempts, vec![(AttemptState::LeaseExpired, 1)]);
}

/// A registered tool's manifest, as the canonical JSON a caller passes (keys deliberately out
/// of order: the store canonicalizes before it digests).
fn tool_manifest(name: &str, url: &str) -> Value {
    json!({
        "name": name,
        "description": "Looks an address up — «géocodage» 🌍",
        "implementation": {"http": {
            "url": url,
            "method": "POST",
            "headers": {"Authorization": "Bearer {{ secrets.GEO_KEY }}", "Accept": "application/json"}
        }},
        "input_schema": {
            "type": "object",
            "required": ["address"],
            "properties": {"address": {"type": "string", "minLength": 1}, "limit": {"type": "integer", "maximum": 50}}
        },
        "output_schema": {"type": "object", "required": ["lat", "lon"]},
        "capabilities": {"hosts": ["geo:8080", "*.geo.internal"], "secrets": ["GEO_KEY"], "timeout": "10s"}
    })
}

fn tool_name(name: &str) -> ToolName {
    ToolName::parse(name).expect("test tool names follow the naming rule")
}

fn secret_name(name: &str) -> SecretName {
    SecretName::parse(name).expect("test secret names follow the naming rule")
}

/// Tool names are versioned per org like pipelines: an identical manifest returns the stored
/// version, a changed one the next; lookups by version or latest, listings by name, and the
/// manifest round-trips exactly.
pub async fn tools_get_versions_per_name_and_identical_manifests_return_the_stored_version(
    store: Arc<dyn Store>,
) {
    let org = OrgId::DEFAULT;
    let other = OrgId::new();
    let geocode = tool_name("geocode");
    let v1_manifest = tool_manifest("geocode", "http://geo:8080/x");
    let v1 = store.save_tool(org, &geocode, &v1_manifest).await.unwrap();
    assert_eq!(v1.org_id, org);
    assert_eq!(v1.name, "geocode");
    assert_eq!(v1.version, 1);
    assert_eq!(v1.digest.len(), 64, "the digest is sha-256 in hex");
    assert!(v1
        .digest
        .bytes()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    assert_eq!(v1.manifest, v1_manifest);

    let again = store.save_tool(org, &geocode, &v1_manifest).await.unwrap();
    assert_eq!(
        again, v1,
        "an identical manifest returns the stored version"
    );

    let v2_manifest = tool_manifest("geocode", "http://geo:8080/y");
    let v2 = store.save_tool(org, &geocode, &v2_manifest).await.unwrap();
    assert_eq!(v2.version, 2);
    assert_ne!(v2.digest, v1.digest);
    assert!(v2.created_at >= v1.created_at);
    assert_eq!(v2.manifest, v2_manifest);

    // Saving the first manifest again after a newer one still returns version 1.
    let back = store.save_tool(org, &geocode, &v1_manifest).await.unwrap();
    assert_eq!(back, v1);

    assert_eq!(
        store.tool(org, "geocode", None).await.unwrap(),
        Some(v2.clone())
    );
    assert_eq!(
        store.tool(org, "geocode", Some(1)).await.unwrap(),
        Some(v1.clone())
    );
    assert_eq!(
        store.tool(org, "geocode", Some(2)).await.unwrap(),
        Some(v2.clone())
    );
    assert_eq!(store.tool(org, "geocode", Some(3)).await.unwrap(), None);
    assert_eq!(
        store.tool_versions(org, "geocode").await.unwrap(),
        vec![v2.clone(), v1.clone()],
        "versions are listed newest first"
    );
    assert_eq!(store.tool(org, "nope", None).await.unwrap(), None);
    assert_eq!(store.tool(org, "nope", Some(1)).await.unwrap(), None);
    assert!(store.tool_versions(org, "nope").await.unwrap().is_empty());

    // Every kind of JSON value comes back exactly: nesting, arrays, unicode, numbers, null.
    let wasm_manifest = json!({
        "name": "Aa_wasm",
        "description": "ünïcödé \"quoted\" \\ back\tslash 日本語",
        "implementation": {"wasm": {"module": "0191d2a4-7a4e-7cc1-8a34-5d1f4b6a9e01"}},
        "input_schema": {"type": "object", "properties": {"deep": {"type": "array", "items": [
            {"type": "number", "minimum": -1.5, "maximum": 1e10},
            {"type": "null"},
            {"enum": [true, false, null, 0, 18446744073709551615u64, -9007199254740993i64, "", [], {}]}
        ]}}},
        "capabilities": {"read_paths": ["/data/in"], "memory_mb": 64, "cpu_ms": 5000}
    });
    let wasm = store
        .save_tool(org, &tool_name("Aa_wasm"), &wasm_manifest)
        .await
        .unwrap();
    assert_eq!(wasm.version, 1);
    assert_eq!(wasm.manifest, wasm_manifest);
    assert_eq!(
        store
            .tool(org, "Aa_wasm", None)
            .await
            .unwrap()
            .unwrap()
            .manifest,
        wasm_manifest,
        "the manifest round-trips exactly"
    );

    let zeta = store
        .save_tool(
            org,
            &tool_name("zeta"),
            &tool_manifest("zeta", "http://z:1/"),
        )
        .await
        .unwrap();
    assert_eq!(
        store.tools(org).await.unwrap(),
        vec![wasm.clone(), v2.clone(), zeta.clone()],
        "the latest version of each name, by name (bytewise: uppercase first)"
    );

    // Another org sees none of them, and numbers its own versions of the same name.
    assert!(store.tools(other).await.unwrap().is_empty());
    assert_eq!(store.tool(other, "geocode", None).await.unwrap(), None);
    assert!(store
        .tool_versions(other, "geocode")
        .await
        .unwrap()
        .is_empty());
    let theirs = store
        .save_tool(other, &geocode, &v2_manifest)
        .await
        .unwrap();
    assert_eq!(theirs.org_id, other);
    assert_eq!(theirs.version, 1);
    assert_eq!(
        theirs.digest, v2.digest,
        "the digest depends on the manifest only"
    );
    assert_eq!(store.tools(other).await.unwrap(), vec![theirs]);
    assert_eq!(
        store.tool_versions(org, "geocode").await.unwrap(),
        vec![v2, v1],
        "the other org's save leaves this org's versions alone"
    );
}

/// Secrets are per org: set at version 1, replaced at the next version with their creation
/// time kept, re-sealed only at their current version, listed per org or across orgs, and
/// deleted once.
pub async fn secrets_are_set_replaced_resealed_listed_and_deleted_per_org(store: Arc<dyn Store>) {
    let org = OrgId::DEFAULT;
    let other = OrgId::new();
    let geo_key = secret_name("GEO_KEY");
    let nonce: Vec<u8> = (0u8..24).collect();
    let ciphertext: Vec<u8> = vec![0, 0, 0xff, 0x00, 0x7f, 0x80, 0, 1, 2, 3, 0xfe, 0];

    let first = store
        .put_secret(org, &geo_key, "master-1", &nonce, &ciphertext)
        .await
        .unwrap();
    assert_eq!(first.org_id, org);
    assert_eq!(first.name, geo_key);
    assert_eq!(first.version, 1);
    assert_eq!(first.key_id, "master-1");
    assert_eq!(first.nonce, nonce);
    assert_eq!(first.ciphertext, ciphertext);
    assert_eq!(first.created_at, first.updated_at);
    assert_eq!(
        store.secret(org, "GEO_KEY").await.unwrap(),
        Some(first.clone()),
        "the sealed bytes round-trip exactly, zero bytes included"
    );
    assert_eq!(
        store.secret(org, "geo_key").await.unwrap(),
        None,
        "names are case-sensitive"
    );

    let nonce2 = vec![7u8; 24];
    let ciphertext2 = vec![0u8; 40];
    let second = store
        .put_secret(org, &geo_key, "master-1", &nonce2, &ciphertext2)
        .await
        .unwrap();
    assert_eq!(second.version, 2);
    assert_eq!(
        second.created_at, first.created_at,
        "a new value keeps the creation time"
    );
    assert!(second.updated_at >= first.updated_at);
    assert_eq!(
        (second.nonce.as_slice(), second.ciphertext.as_slice()),
        (&nonce2[..], &ciphertext2[..])
    );
    assert_eq!(
        store.secret(org, "GEO_KEY").await.unwrap(),
        Some(second.clone())
    );

    // Re-sealing at the current version replaces the sealed value and keeps the rest.
    let resealed = StoredSecret {
        key_id: "master-2".to_owned(),
        nonce: vec![9u8; 24],
        ciphertext: vec![1, 0, 2, 0, 3],
        ..second.clone()
    };
    assert!(store.reseal_secret(&resealed).await.unwrap());
    let stored = store.secret(org, "GEO_KEY").await.unwrap().unwrap();
    assert_eq!(stored, resealed);
    assert_eq!(stored.version, 2, "re-sealing keeps the version");
    assert_eq!(
        stored.updated_at, second.updated_at,
        "re-sealing keeps updated_at"
    );

    // A re-seal prepared from a version that a new value replaced changes nothing.
    let stale = StoredSecret {
        key_id: "master-3".to_owned(),
        nonce: vec![3u8; 24],
        ciphertext: vec![3, 3, 3],
        ..first.clone()
    };
    assert!(!store.reseal_secret(&stale).await.unwrap());
    assert_eq!(
        store.secret(org, "GEO_KEY").await.unwrap(),
        Some(resealed.clone())
    );
    let gone = StoredSecret {
        name: secret_name("MISSING"),
        ..resealed.clone()
    };
    assert!(!store.reseal_secret(&gone).await.unwrap());
    assert_eq!(store.secret(org, "MISSING").await.unwrap(), None);

    // Listings: one org by name, every org by org then name.
    let a_token = store
        .put_secret(org, &secret_name("A_TOKEN"), "master-2", &[1; 24], b"a")
        .await
        .unwrap();
    let z_pass = store
        .put_secret(org, &secret_name("z_pass"), "master-2", &[2; 24], b"z")
        .await
        .unwrap();
    let theirs = store
        .put_secret(other, &geo_key, "master-2", &[4; 24], b"theirs")
        .await
        .unwrap();
    assert_eq!(theirs.version, 1, "versions count per org");
    assert_eq!(
        store.secrets(Some(org)).await.unwrap(),
        vec![a_token.clone(), resealed.clone(), z_pass.clone()]
    );
    assert_eq!(
        store.secrets(Some(other)).await.unwrap(),
        vec![theirs.clone()]
    );
    let mut everything = vec![a_token, resealed.clone(), z_pass, theirs.clone()];
    everything.sort_by(|a, b| {
        (a.org_id.to_string(), a.name.as_str()).cmp(&(b.org_id.to_string(), b.name.as_str()))
    });
    assert_eq!(store.secrets(None).await.unwrap(), everything);
    assert!(store.secrets(Some(OrgId::new())).await.unwrap().is_empty());

    // Deleting removes one org's secret once, and leaves the other org's alone.
    assert!(store.delete_secret(org, "GEO_KEY").await.unwrap());
    assert!(!store.delete_secret(org, "GEO_KEY").await.unwrap());
    assert_eq!(store.secret(org, "GEO_KEY").await.unwrap(), None);
    assert!(!store.reseal_secret(&resealed).await.unwrap());
    assert_eq!(store.secret(other, "GEO_KEY").await.unwrap(), Some(theirs));
    assert!(!store.delete_secret(other, "NOPE").await.unwrap());

    // A name set again after its deletion starts over at version 1.
    let reborn = store
        .put_secret(org, &geo_key, "master-2", &nonce, &ciphertext)
        .await
        .unwrap();
    assert_eq!(reborn.version, 1);
    assert_eq!(reborn.created_at, reborn.updated_at);
    // A rotation that read the first value (version 1 too) cannot write it back over the
    // new one: the row it read is gone.
    assert!(
        reborn.updated_at > first.updated_at,
        "the store's clock moves"
    );
    let late = StoredSecret {
        key_id: "master-9".to_owned(),
        ..first.clone()
    };
    assert!(!store.reseal_secret(&late).await.unwrap());
    assert_eq!(store.secret(org, "GEO_KEY").await.unwrap(), Some(reborn));
}

fn review_item(
    run: &RunRecord,
    task_run: &TaskRunRecord,
    kind: arches_core::review::ReviewKind,
    confidence: Option<f64>,
    created_at: i64,
) -> arches_core::review::ReviewItem {
    arches_core::review::ReviewItem {
        id: arches_core::ReviewId::new(),
        org_id: run.org_id,
        run_id: run.id,
        task_run_id: task_run.id,
        task_id: task_run.task_id.clone(),
        index: None,
        pipeline_name: run.pipeline_name.clone(),
        tool: "llm".to_owned(),
        kind,
        state: arches_core::review::ReviewState::Open,
        attempt: 1,
        inputs: json!({"prompt": "ünïcode ✓ \"quoted\""}),
        proposed: json!({"answer": "cat", "confidence": confidence}),
        confidence,
        rationale: Some("whiskers".to_owned()),
        thresholds: Some(arches_core::review::Thresholds {
            low: 0.7,
            high: 0.9,
            calibrated: false,
        }),
        sample_rate: 1.0,
        assignees: vec!["ana@example.org".to_owned()],
        quorum: 1,
        message: None,
        expires_at: Some(Timestamp(created_at + 3_600_000_000)),
        on_expiry: Some(arches_core::review::Verdict::Reject),
        votes: Vec::new(),
        created_at: Timestamp(created_at),
        decided_at: None,
        claimed_by: None,
        claim_expires_at: None,
    }
}

/// Items written by commits round-trip and are listed oldest first with filters and a
/// cursor; a claim holds against other reviewers until it expires; a decided item is never
/// overwritten (neither by a later commit nor by a second notice decision); decided
/// confidence results are read back as weighted feedback, most recent first.
pub async fn review_items_are_listed_claimed_decided_once_and_read_as_feedback(
    store: Arc<dyn Store>,
) {
    use arches_core::records::{ClaimOutcome, ReviewFilter};
    use arches_core::review::{ReviewKind, ReviewState, Verdict, Vote};
    let r = run("classify", RunState::Running, 1_700_000_000_000_000);
    let t = task_run(&r, "label", 1, 1_700_000_000_000_000);
    let blocking = review_item(
        &r,
        &t,
        ReviewKind::Confidence,
        Some(0.42),
        1_700_000_000_000_001,
    );
    let notice = review_item(&r, &t, ReviewKind::Notice, Some(0.8), 1_700_000_000_000_002);
    let mut audit = review_item(
        &r,
        &t,
        ReviewKind::Notice,
        Some(0.97),
        1_700_000_000_000_003,
    );
    audit.sample_rate = 0.25;
    let mut other_org = run("classify", RunState::Running, 1_700_000_000_000_000);
    other_org.org_id = OrgId::new();
    let other_task_run = task_run(&other_org, "label", 1, 1_700_000_000_000_000);
    let foreign = review_item(
        &other_org,
        &other_task_run,
        ReviewKind::Confidence,
        None,
        1_700_000_000_000_004,
    );
    commit(
        store.as_ref(),
        WriteBatch {
            runs: vec![r.clone(), other_org.clone()],
            task_runs: vec![t.clone(), other_task_run.clone()],
            reviews: vec![
                blocking.clone(),
                notice.clone(),
                audit.clone(),
                foreign.clone(),
            ],
            ..Default::default()
        },
    )
    .await;

    // Round trip and listing.
    let read = store
        .review_item(blocking.id)
        .await
        .unwrap()
        .expect("stored");
    assert_eq!(read, blocking);
    let ours = |filter: ReviewFilter| ReviewFilter {
        org_id: Some(OrgId::DEFAULT),
        ..filter
    };
    let all = store
        .review_items(&ours(ReviewFilter::default()))
        .await
        .unwrap();
    assert_eq!(
        all.iter().map(|i| i.id).collect::<Vec<_>>(),
        [blocking.id, notice.id, audit.id],
        "oldest first, the other org's item left out"
    );
    let page = store
        .review_items(&ours(ReviewFilter {
            after: Some(blocking.id),
            limit: 1,
            ..Default::default()
        }))
        .await
        .unwrap();
    assert_eq!(page.iter().map(|i| i.id).collect::<Vec<_>>(), [notice.id]);
    let filtered = store
        .review_items(&ours(ReviewFilter {
            kind: Some(ReviewKind::Notice),
            min_confidence: Some(0.9),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert_eq!(
        filtered.iter().map(|i| i.id).collect::<Vec<_>>(),
        [audit.id]
    );
    let old = store
        .review_items(&ours(ReviewFilter {
            created_before: Some(Timestamp(1_700_000_000_000_002)),
            max_confidence: Some(0.5),
            pipeline_name: Some("classify".into()),
            task_id: Some("label".into()),
            tool: Some("llm".into()),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert_eq!(old.iter().map(|i| i.id).collect::<Vec<_>>(), [blocking.id]);

    // Claims: one reviewer at a time until the claim expires; renewing one's own is fine.
    let now = Timestamp(1_700_000_000_100_000);
    let until = Timestamp(1_700_000_000_200_000);
    match store
        .claim_review(blocking.id, "ana", until, now)
        .await
        .unwrap()
    {
        ClaimOutcome::Claimed(item) => {
            assert_eq!(item.claimed_by.as_deref(), Some("ana"));
            assert_eq!(item.claim_expires_at, Some(until));
        }
        other => panic!("the claim takes: {other:?}"),
    }
    assert_eq!(
        store
            .claim_review(blocking.id, "bo", until, now)
            .await
            .unwrap(),
        ClaimOutcome::Held {
            by: "ana".into(),
            until
        }
    );
    assert!(matches!(
        store
            .claim_review(blocking.id, "ana", Timestamp(until.0 + 1), now)
            .await
            .unwrap(),
        ClaimOutcome::Claimed(_)
    ));
    assert!(matches!(
        store
            .claim_review(
                blocking.id,
                "bo",
                Timestamp(until.0 + 100),
                Timestamp(until.0 + 1)
            )
            .await
            .unwrap(),
        ClaimOutcome::Claimed(_)
    ));
    assert_eq!(
        store
            .claim_review(arches_core::ReviewId::new(), "bo", until, now)
            .await
            .unwrap(),
        ClaimOutcome::NotFound
    );

    // A commit that decides the item keeps the claim columns; a later commit of the open
    // item does not undo the decision.
    let mut decided = blocking.clone();
    decided.state = ReviewState::Approved;
    decided.decided_at = Some(Timestamp(1_700_000_000_300_000));
    decided.votes.push(Vote {
        reviewer: "bo".into(),
        email: None,
        verdict: Verdict::Approve,
        edited: None,
        comment: Some("fine".into()),
        at: Timestamp(1_700_000_000_300_000),
    });
    for item in [decided.clone(), blocking.clone()] {
        commit(
            store.as_ref(),
            WriteBatch {
                reviews: vec![item],
                ..Default::default()
            },
        )
        .await;
    }
    let read = store.review_item(blocking.id).await.unwrap().unwrap();
    assert_eq!(read.state, ReviewState::Approved);
    assert_eq!(read.votes, decided.votes);
    assert_eq!(read.claimed_by.as_deref(), Some("bo"));
    assert_eq!(
        store
            .claim_review(blocking.id, "cy", until, Timestamp(until.0 + 1_000_000))
            .await
            .unwrap(),
        ClaimOutcome::Decided(ReviewState::Approved)
    );

    // A notice is decided once; a second decision (or one on a blocking item) is refused.
    let mut rejected = notice.clone();
    rejected.state = ReviewState::Rejected;
    rejected.decided_at = Some(Timestamp(1_700_000_000_400_000));
    rejected.votes.push(Vote {
        reviewer: "ana".into(),
        email: None,
        verdict: Verdict::Reject,
        edited: None,
        comment: None,
        at: Timestamp(1_700_000_000_400_000),
    });
    assert!(store
        .decide_notice(&rejected, "ana", Timestamp(1_700_000_000_400_000))
        .await
        .unwrap());
    let mut again = notice.clone();
    again.state = ReviewState::Approved;
    again.decided_at = Some(Timestamp(1_700_000_000_500_000));
    assert!(!store
        .decide_notice(&again, "bo", Timestamp(1_700_000_000_500_000))
        .await
        .unwrap());
    assert_eq!(
        store.review_item(notice.id).await.unwrap().unwrap().state,
        ReviewState::Rejected
    );
    let mut not_a_notice = foreign.clone();
    not_a_notice.state = ReviewState::Approved;
    assert!(!store
        .decide_notice(&not_a_notice, "ana", Timestamp(1_700_000_000_500_000))
        .await
        .unwrap());

    // A notice another reviewer holds is not decided by someone else.
    assert!(matches!(
        store
            .claim_review(
                audit.id,
                "cy",
                Timestamp(1_700_000_001_000_000),
                Timestamp(1_700_000_000_550_000)
            )
            .await
            .unwrap(),
        ClaimOutcome::Claimed(_)
    ));
    let mut sniped = audit.clone();
    sniped.state = ReviewState::Rejected;
    assert!(!store
        .decide_notice(&sniped, "ana", Timestamp(1_700_000_000_560_000))
        .await
        .unwrap());

    // Feedback: decided confidence results, most recent first, audits weighted.
    let mut approved_audit = audit.clone();
    approved_audit.state = ReviewState::Approved;
    approved_audit.decided_at = Some(Timestamp(1_700_000_000_600_000));
    approved_audit.votes.push(Vote {
        reviewer: "ana".into(),
        email: None,
        verdict: Verdict::Approve,
        edited: None,
        comment: None,
        at: Timestamp(1_700_000_000_600_000),
    });
    assert!(store
        .decide_notice(&approved_audit, "cy", Timestamp(1_700_000_000_600_000))
        .await
        .unwrap());
    let feedback = store
        .review_feedback(OrgId::DEFAULT, "classify", &task("label"), 10)
        .await
        .unwrap();
    let points: Vec<(f64, bool, f64)> = feedback
        .iter()
        .map(|p| (p.confidence, p.approved, p.weight))
        .collect();
    assert_eq!(
        points,
        [(0.97, true, 4.0), (0.8, false, 1.0), (0.42, true, 1.0)]
    );
    assert_eq!(
        store
            .review_feedback(OrgId::DEFAULT, "classify", &task("label"), 1)
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(store
        .review_feedback(other_org.org_id, "classify", &task("label"), 10)
        .await
        .unwrap()
        .is_empty());
}
