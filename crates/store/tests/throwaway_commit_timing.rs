//! Throwaway timing, not committed.
use std::sync::Arc;
use std::time::Instant;
use arches_core::ids::{RunId, TaskRunId, TaskId};
use arches_core::ports::Store;
use arches_core::records::*;
use arches_core::state::{RunState, TaskRunState};
use arches_core::time::Timestamp;
use arches_store::SqliteStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timing() {
    for durability in [Durability::Normal, Durability::Full] {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("a.db"), durability).await.unwrap());
    let run = RunRecord { id: RunId::new(), pipeline_name: "p".into(), pipeline_version: 1, params: serde_json::json!({"a":1}), state: RunState::Running, error: None, owner: None, created_at: Timestamp(1), started_at: None, finished_at: None };
    store.commit(&WriteBatch { runs: vec![run.clone()], ..Default::default() }).await.unwrap();
    let mk = |i: usize| TaskRunRecord { id: TaskRunId::new(), run_id: run.id, task_id: TaskId::parse("each").unwrap(), index: Some(i as u32), fan_out: None, state: TaskRunState::Queued, attempt: 0, lease_expiries: 0, fencing_token: 0, item: Some(serde_json::json!({"n": i, "name": "some item text"})), inputs: Some(serde_json::json!({"command": "echo hello", "n": i})), outputs: None, error: None, lease_owner: None, lease_expires_at: None, ready_at: None, created_at: Timestamp(i as i64), queued_at: Some(Timestamp(5)), started_at: None, finished_at: None };
    // 1,000-task-run batches: insert, then two updates.
    let mut times = Vec::new();
    for _ in 0..10 {
        let mut batch: Vec<TaskRunRecord> = (0..1000).map(mk).collect();
        for step in 0..3 {
            if step == 1 { for t in &mut batch { t.state = TaskRunState::Running; t.fencing_token = 1; t.lease_owner = Some("w".into()); } }
            if step == 2 { for t in &mut batch { t.state = TaskRunState::Succeeded; t.outputs = Some(serde_json::json!({"rows": 3})); } }
            let wb = WriteBatch { task_runs: batch.clone(), ..Default::default() };
            let start = Instant::now();
            store.commit(&wb).await.unwrap();
            times.push(start.elapsed());
        }
    }
    times.sort();
    println!("{durability:?}: 1000-task-run commit: min {:?} median {:?} max {:?}", times[0], times[times.len()/2], times[times.len()-1]);
    // 10,000 tasks x 3 states in batches of 1,000
    let mut all: Vec<TaskRunRecord> = (0..10_000).map(mk).collect();
    let start = Instant::now();
    for step in 0..3 {
        for chunk in all.chunks_mut(1000) {
            if step == 1 { for t in chunk.iter_mut() { t.state = TaskRunState::Running; t.fencing_token = 1; } }
            if step == 2 { for t in chunk.iter_mut() { t.state = TaskRunState::Succeeded; } }
            store.commit(&WriteBatch { task_runs: chunk.to_vec(), ..Default::default() }).await.unwrap();
        }
    }
    let elapsed = start.elapsed();
    println!("{durability:?}: 30,000 task-run writes in {:?} = {:.0}/s", elapsed, 30_000.0 / elapsed.as_secs_f64());
    // small batches of 1
    let start = Instant::now();
    for t in all.iter_mut().take(500) { t.fencing_token = 2; store.commit(&WriteBatch { task_runs: vec![t.clone()], ..Default::default() }).await.unwrap(); }
    println!("{durability:?}: single-row commit: {:?} each", start.elapsed() / 500);
    }
}
