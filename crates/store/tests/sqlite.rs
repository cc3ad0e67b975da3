//! The SQLite store against the storage port's conformance suite, one fresh database file per
//! test; then what is particular to SQLite (durability, migrations, concurrent reads) and to
//! the local artifact store.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arches_core::ids::{ArtifactId, OrgId, RunId, TaskId, TaskRunId};
use arches_core::log_search::{LogSearch, LogSearchQuery};
use arches_core::ports::{ArtifactStore, Store, StoreError};
use arches_core::records::{Durability, NewArtifact, RunRecord, TaskRunRecord, WriteBatch};
use arches_core::state::{RunState, TaskRunState};
use arches_core::time::Timestamp;
use arches_store::conformance::Fixture;
use arches_store::{LocalArtifactStore, SqliteStore};
use sha2::{Digest, Sha256};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::Connection;
use tempfile::TempDir;

/// Bound on any single wait of these tests; a healthy store answers in milliseconds.
const WAIT_MAX: Duration = Duration::from_secs(10);

async fn open(durability: Durability) -> (TempDir, SqliteStore) {
    let directory = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&directory.path().join("arches.db"), durability)
        .await
        .unwrap();
    (directory, store)
}

async fn sqlite_fixture() -> Fixture {
    let (directory, store) = open(Durability::Normal).await;
    Fixture::new(Arc::new(store), directory)
}

arches_store::conformance_tests!(sqlite_fixture());
arches_store::identity_conformance_tests!(async {
    let (directory, store) = open(Durability::Normal).await;
    arches_store::conformance_identity::IdentityFixture::new(Arc::new(store), directory)
});

#[tokio::test]
async fn the_durability_mode_is_reported_and_applied() {
    for (durability, synchronous) in [(Durability::Normal, 1_i64), (Durability::Full, 2)] {
        let (_directory, store) = open(durability).await;
        assert_eq!(store.durability(), durability);
        assert_eq!(Store::durability(&store), durability);
        let synchronous_of_writer = store.writer_pragma("synchronous").await.unwrap();
        assert_eq!(
            synchronous_of_writer,
            Some(synchronous.to_string()),
            "writer, {durability:?}"
        );
        let journal_of_writer = store.writer_pragma("journal_mode").await.unwrap();
        assert_eq!(journal_of_writer.as_deref(), Some("wal"));
        let foreign_keys_of_writer = store.writer_pragma("foreign_keys").await.unwrap();
        assert_eq!(foreign_keys_of_writer.as_deref(), Some("1"));
        let synchronous_of_readers: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(
            synchronous_of_readers, synchronous,
            "readers, {durability:?}"
        );
    }
}

#[tokio::test]
async fn opening_creates_missing_parent_directories() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory
        .path()
        .join("state")
        .join("nested")
        .join("arches.db");
    let store = SqliteStore::open(&path, Durability::Normal).await.unwrap();
    assert!(path.is_file());
    assert_eq!(store.path(), path);
}

#[tokio::test]
async fn reopening_a_database_keeps_its_data_and_applies_migrations_once() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("arches.db");
    let run = RunRecord {
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
    };
    let store = SqliteStore::open(&path, Durability::Full).await.unwrap();
    store
        .commit(&WriteBatch {
            runs: vec![run.clone()],
            ..WriteBatch::default()
        })
        .await
        .unwrap();
    let migrations: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
        .fetch_one(store.pool())
        .await
        .unwrap();
    store.close().await;

    let reopened = SqliteStore::open(&path, Durability::Normal).await.unwrap();
    assert_eq!(reopened.run(run.id).await.unwrap(), Some(run));
    let after: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
        .fetch_one(reopened.pool())
        .await
        .unwrap();
    assert_eq!(after, migrations, "no migration ran twice");
}

/// A database whose log lines were written before the log search migration finds them once
/// it is applied: the migration indexes the stored lines (FTS5 `rebuild`).
#[tokio::test]
async fn the_log_search_migration_indexes_lines_stored_before_it() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("arches.db");
    let run = RunRecord {
        org_id: OrgId::DEFAULT,
        id: RunId::new(),
        pipeline_name: "daily".into(),
        pipeline_version: 1,
        params: serde_json::json!({}),
        state: RunState::Running,
        error: None,
        owner: None,
        created_at: Timestamp(1),
        started_at: None,
        finished_at: None,
    };
    let store = SqliteStore::open(&path, Durability::Normal).await.unwrap();
    store
        .commit(&WriteBatch {
            runs: vec![run.clone()],
            ..WriteBatch::default()
        })
        .await
        .unwrap();
    store.close().await;

    // Take the database back to before the migration, then store a line there.
    let mut connection =
        SqliteConnection::connect_with(&SqliteConnectOptions::new().filename(&path))
            .await
            .unwrap();
    for statement in [
        "DROP TRIGGER logs_fts_insert",
        "DROP TRIGGER logs_fts_delete",
        "DROP TRIGGER logs_fts_update",
        "DROP TABLE logs_fts",
        "DELETE FROM _sqlx_migrations WHERE description = 'log search'",
    ] {
        sqlx::query(statement)
            .execute(&mut connection)
            .await
            .unwrap();
    }
    sqlx::query(
        "INSERT INTO logs (run_id, task_run_id, task_id, attempt, stream, at, text)
         VALUES (?1, ?2, 'extract', 1, 'stdout', 5, 'written before the index existed')",
    )
    .bind(run.id.to_string())
    .bind(TaskRunId::new().to_string())
    .execute(&mut connection)
    .await
    .unwrap();
    connection.close().await.unwrap();

    let reopened = SqliteStore::open(&path, Durability::Normal).await.unwrap();
    let hits = reopened
        .search_logs(&LogSearch {
            org_id: OrgId::DEFAULT,
            query: LogSearchQuery::parse("index existed").unwrap(),
            run_id: None,
            task_id: None,
            stream: None,
            since: None,
            until: None,
            limit: 0,
        })
        .await
        .unwrap();
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert_eq!(hits[0].line.line.text, "written before the index existed");
}

#[tokio::test]
async fn a_read_does_not_wait_for_an_open_write_transaction() {
    let (_directory, store) = open(Durability::Normal).await;
    let run = RunRecord {
        org_id: OrgId::DEFAULT,
        id: RunId::new(),
        pipeline_name: "daily".into(),
        pipeline_version: 1,
        params: serde_json::json!({}),
        state: RunState::Queued,
        error: None,
        owner: None,
        created_at: Timestamp(1),
        started_at: None,
        finished_at: None,
    };
    store
        .commit(&WriteBatch {
            runs: vec![run.clone()],
            ..WriteBatch::default()
        })
        .await
        .unwrap();

    // Another connection takes the write lock and leaves its change uncommitted.
    let mut other =
        SqliteConnection::connect_with(&SqliteConnectOptions::new().filename(store.path()))
            .await
            .unwrap();
    let mut write = other.begin_with("BEGIN IMMEDIATE").await.unwrap();
    sqlx::query("UPDATE runs SET state = 'running' WHERE id = ?1")
        .bind(run.id.to_string())
        .execute(&mut *write)
        .await
        .unwrap();
    let seen = tokio::time::timeout(WAIT_MAX, store.run(run.id))
        .await
        .expect("the read does not wait for the writer")
        .unwrap();
    assert_eq!(
        seen,
        Some(run.clone()),
        "the read sees the last committed state"
    );
    write.rollback().await.unwrap();
}

fn queued_run() -> RunRecord {
    RunRecord {
        org_id: OrgId::DEFAULT,
        id: RunId::new(),
        pipeline_name: "daily".into(),
        pipeline_version: 1,
        params: serde_json::json!({}),
        state: RunState::Queued,
        error: None,
        owner: None,
        created_at: Timestamp(1),
        started_at: None,
        finished_at: None,
    }
}

fn pending_task_run(run_id: RunId, index: u32) -> TaskRunRecord {
    TaskRunRecord {
        id: TaskRunId::new(),
        run_id,
        task_id: TaskId::parse("each").unwrap(),
        index: Some(index),
        fan_out: None,
        state: TaskRunState::Pending,
        attempt: 0,
        lease_expiries: 0,
        fencing_token: 0,
        item: Some(serde_json::json!(index)),
        inputs: None,
        outputs: None,
        error: None,
        lease_owner: None,
        lease_expires_at: None,
        ready_at: None,
        created_at: Timestamp(i64::from(index)),
        queued_at: None,
        started_at: None,
        finished_at: None,
    }
}

#[tokio::test]
async fn a_commit_abandoned_by_its_caller_is_all_or_nothing_and_the_next_one_goes_through() {
    let (_directory, store) = open(Durability::Normal).await;
    for orphaned in [false, true] {
        let run = queued_run();
        // An orphaned batch fails half-way on its last statement, inside its transaction.
        let owner = if orphaned { RunId::new() } else { run.id };
        let batch = WriteBatch {
            runs: vec![run.clone()],
            task_runs: (0..1_000).map(|i| pending_task_run(owner, i)).collect(),
            attempts: vec![],
            ..WriteBatch::default()
        };
        // Whether the caller gives up before or after the connection's thread has run the
        // batch, the batch is stored whole or not at all.
        let _ = tokio::time::timeout(Duration::ZERO, store.commit(&batch)).await;

        let next = queued_run();
        let written = WriteBatch {
            runs: vec![next.clone()],
            ..WriteBatch::default()
        };
        tokio::time::timeout(WAIT_MAX, store.commit(&written))
            .await
            .expect("the next commit does not wait for the abandoned one")
            .unwrap();
        assert_eq!(store.run(next.id).await.unwrap(), Some(next));
        let stored_run = store.run(run.id).await.unwrap();
        let stored_task_runs = store.task_runs(run.id).await.unwrap();
        if orphaned {
            assert_eq!(stored_run, None);
        } else {
            let whole = stored_run == Some(run.clone()) && stored_task_runs == batch.task_runs;
            let nothing = stored_run.is_none() && stored_task_runs.is_empty();
            assert!(whole || nothing, "the abandoned commit was stored in part");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_batch_round_trips_on_a_multi_thread_runtime() {
    // Large batches are encoded and decoded inside `block_in_place`, which only a multi-thread
    // runtime allows; the conformance suite runs on the current-thread runtime.
    let (_directory, store) = open(Durability::Normal).await;
    let run = queued_run();
    let batch = WriteBatch {
        runs: vec![run.clone()],
        task_runs: (0..2_000).map(|i| pending_task_run(run.id, i)).collect(),
        attempts: vec![],
        ..WriteBatch::default()
    };
    store.commit(&batch).await.unwrap();
    assert_eq!(store.task_runs(run.id).await.unwrap(), batch.task_runs);
}

fn artifact(name: &str) -> NewArtifact {
    NewArtifact {
        org_id: OrgId::DEFAULT,
        name: name.into(),
        media_type: "text/csv".into(),
        table: None,
        produced_by: None,
        inputs: vec![],
    }
}

fn files_under(directory: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(directory).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(files_under(&path));
        } else {
            found.push(path);
        }
    }
    found
}

async fn artifact_store() -> (TempDir, LocalArtifactStore) {
    let directory = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&directory.path().join("arches.db"), Durability::Normal)
        .await
        .unwrap();
    let artifacts =
        LocalArtifactStore::new(&directory.path().join("artifacts"), Arc::new(store)).unwrap();
    (directory, artifacts)
}

#[tokio::test]
async fn the_artifact_store_dedups_identical_content_and_versions_by_name() {
    let (directory, artifacts) = artifact_store().await;
    let content = b"species,mass\nadelie,3750\n".to_vec();
    let digest = hex::encode(Sha256::digest(&content));

    let first = artifacts
        .put_bytes(content.clone(), artifact("penguins"))
        .await
        .unwrap();
    let second = artifacts
        .put_bytes(content.clone(), artifact("penguins"))
        .await
        .unwrap();
    let source = directory.path().join("penguins.csv");
    std::fs::write(&source, &content).unwrap();
    let third = artifacts
        .put_file(&source, artifact("penguins"))
        .await
        .unwrap();
    let other_name = artifacts
        .put_file(&source, artifact("birds"))
        .await
        .unwrap();

    assert_eq!(
        (
            first.version,
            second.version,
            third.version,
            other_name.version
        ),
        (1, 2, 3, 1)
    );
    for record in [&first, &second, &third, &other_name] {
        assert_eq!(record.digest, digest);
        assert_eq!(record.size_bytes, content.len() as u64);
    }
    let blobs = files_under(artifacts.root());
    assert_eq!(blobs.len(), 1, "one blob for identical content: {blobs:?}");

    let path = artifacts.local_path(third.id).await.unwrap();
    assert_eq!(path, blobs[0]);
    assert!(path.ends_with(Path::new("sha256").join(&digest[..2]).join(&digest)));
    assert_eq!(std::fs::read(&path).unwrap(), content);
    assert_eq!(artifacts.read(first.id, 1024).await.unwrap(), content);
    assert_eq!(artifacts.get(second.id).await.unwrap(), second);
}

#[tokio::test]
async fn a_file_larger_than_one_upload_part_is_stored_whole() {
    let (directory, artifacts) = artifact_store().await;
    let content: Vec<u8> = (0..9 * 1024 * 1024 + 123)
        .map(|i| (i % 251) as u8)
        .collect();
    let source = directory.path().join("large.bin");
    std::fs::write(&source, &content).unwrap();

    let record = artifacts
        .put_file(&source, artifact("large"))
        .await
        .unwrap();
    assert_eq!(record.digest, hex::encode(Sha256::digest(&content)));
    assert_eq!(record.size_bytes, content.len() as u64);
    let stored = std::fs::read(artifacts.local_path(record.id).await.unwrap()).unwrap();
    assert!(stored == content, "the stored blob equals the file");
    assert_eq!(
        files_under(artifacts.root()).len(),
        1,
        "no staging file is left behind"
    );
}

#[tokio::test]
async fn reading_an_artifact_refuses_content_above_the_limit() {
    let (_directory, artifacts) = artifact_store().await;
    let record = artifacts
        .put_bytes(vec![7; 100], artifact("sevens"))
        .await
        .unwrap();

    let refused = artifacts.read(record.id, 99).await.unwrap_err();
    match refused {
        StoreError::Conflict(message) => {
            assert_eq!(message, "artifact is 100 bytes, above the limit of 99")
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(artifacts.read(record.id, 100).await.unwrap(), vec![7; 100]);
}

#[tokio::test]
async fn unknown_artifacts_and_missing_source_files_are_not_found() {
    let (directory, artifacts) = artifact_store().await;
    let unknown = ArtifactId::new();
    assert!(matches!(
        artifacts.get(unknown).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        artifacts.local_path(unknown).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        artifacts.read(unknown, 10).await,
        Err(StoreError::NotFound(_))
    ));
    let missing = directory.path().join("missing.csv");
    let result = artifacts.put_file(&missing, artifact("missing")).await;
    assert!(
        matches!(result, Err(StoreError::NotFound(_))),
        "got {result:?}"
    );
}
