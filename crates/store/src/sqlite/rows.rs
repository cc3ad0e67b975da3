//! Rows in and out of SQLite: records encoded as the JSON arrays that the set-based statements
//! expand with `json_each`, and rows decoded back into records.
//!
//! JSON values of the records (params, items, inputs, outputs) travel as strings inside the
//! batch document, so `->>` hands SQLite their text unchanged; `None` travels as JSON `null`
//! and is stored as SQL `NULL`, while `Some(Value::Null)` is stored as the text `null`.

use arches_core::ids::{RunId, TaskId, TaskRunId};
use arches_core::ports::{StoreError, StoreResult};
use arches_core::records::*;
use arches_core::state::{AttemptState, RunState, TaskRunState};
use arches_core::time::Timestamp;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use sqlx::sqlite::SqliteRow;
use sqlx::{Decode, Row, Sqlite, Type};

use super::parse_text;
use crate::error::db;

/// Encodes a value as JSON text.
pub(super) fn to_json<T: Serialize + ?Sized>(value: &T) -> StoreResult<String> {
    serde_json::to_string(value)
        .map_err(|e| StoreError::Backend(format!("cannot encode json: {e}")))
}

fn optional_json(value: Option<&Value>) -> StoreResult<Option<String>> {
    value.map(to_json).transpose()
}

fn micros(at: Option<Timestamp>) -> Option<i64> {
    at.map(Timestamp::as_micros)
}

/// SQLite integers are signed; a fencing token above `i64::MAX` cannot be stored or compared.
fn token(value: u64) -> StoreResult<i64> {
    i64::try_from(value).map_err(|_| {
        StoreError::Conflict(format!(
            "fencing token {value} is above the largest storable value"
        ))
    })
}

#[derive(Serialize)]
struct RunRow<'a> {
    id: RunId,
    pipeline_name: &'a str,
    pipeline_version: u32,
    params: String,
    state: &'static str,
    error: Option<&'a str>,
    owner: Option<&'a str>,
    created_at: i64,
    started_at: Option<i64>,
    finished_at: Option<i64>,
}

/// The batch's runs as one JSON array.
pub(super) fn encode_runs(runs: &[RunRecord]) -> StoreResult<String> {
    let rows = runs
        .iter()
        .map(|run| {
            Ok(RunRow {
                id: run.id,
                pipeline_name: &run.pipeline_name,
                pipeline_version: run.pipeline_version,
                params: to_json(&run.params)?,
                state: run.state.as_str(),
                error: run.error.as_deref(),
                owner: run.owner.as_deref(),
                created_at: run.created_at.as_micros(),
                started_at: micros(run.started_at),
                finished_at: micros(run.finished_at),
            })
        })
        .collect::<StoreResult<Vec<_>>>()?;
    to_json(&rows)
}

#[derive(Serialize)]
struct TaskRunRow<'a> {
    id: TaskRunId,
    run_id: RunId,
    task_id: &'a str,
    index: Option<u32>,
    fan_out: Option<u32>,
    state: &'static str,
    attempt: u32,
    lease_expiries: u32,
    fencing_token: i64,
    item: Option<String>,
    inputs: Option<String>,
    outputs: Option<String>,
    error: Option<&'a str>,
    lease_owner: Option<&'a str>,
    lease_expires_at: Option<i64>,
    ready_at: Option<i64>,
    created_at: i64,
    queued_at: Option<i64>,
    started_at: Option<i64>,
    finished_at: Option<i64>,
}

/// The batch's task runs as one JSON array, and their `[id, fencing token]` pairs as another
/// for the stale-write check.
pub(super) struct EncodedTaskRuns {
    /// Every field of every task run.
    pub rows: String,
    /// `[[id, token], …]`.
    pub tokens: String,
}

/// Encodes the batch's task runs.
pub(super) fn encode_task_runs(task_runs: &[TaskRunRecord]) -> StoreResult<EncodedTaskRuns> {
    let mut tokens = Vec::with_capacity(task_runs.len());
    let rows = task_runs
        .iter()
        .map(|task_run| {
            let fencing_token = token(task_run.fencing_token)?;
            tokens.push((task_run.id, fencing_token));
            Ok(TaskRunRow {
                id: task_run.id,
                run_id: task_run.run_id,
                task_id: task_run.task_id.as_str(),
                index: task_run.index,
                fan_out: task_run.fan_out,
                state: task_run.state.as_str(),
                attempt: task_run.attempt,
                lease_expiries: task_run.lease_expiries,
                fencing_token,
                item: optional_json(task_run.item.as_ref())?,
                inputs: optional_json(task_run.inputs.as_ref())?,
                outputs: optional_json(task_run.outputs.as_ref())?,
                error: task_run.error.as_deref(),
                lease_owner: task_run.lease_owner.as_deref(),
                lease_expires_at: micros(task_run.lease_expires_at),
                ready_at: micros(task_run.ready_at),
                created_at: task_run.created_at.as_micros(),
                queued_at: micros(task_run.queued_at),
                started_at: micros(task_run.started_at),
                finished_at: micros(task_run.finished_at),
            })
        })
        .collect::<StoreResult<Vec<_>>>()?;
    Ok(EncodedTaskRuns {
        rows: to_json(&rows)?,
        tokens: to_json(&tokens)?,
    })
}

#[derive(Serialize)]
struct AttemptRow<'a> {
    task_run_id: TaskRunId,
    attempt: u32,
    run_id: RunId,
    fencing_token: i64,
    worker: &'a str,
    state: &'static str,
    started_at: i64,
    finished_at: Option<i64>,
    error: Option<&'a str>,
}

/// The batch's attempts as one JSON array.
pub(super) fn encode_attempts(attempts: &[AttemptRecord]) -> StoreResult<String> {
    let rows = attempts
        .iter()
        .map(|attempt| {
            Ok(AttemptRow {
                task_run_id: attempt.task_run_id,
                attempt: attempt.attempt,
                run_id: attempt.run_id,
                fencing_token: token(attempt.fencing_token)?,
                worker: &attempt.worker,
                state: attempt.state.as_str(),
                started_at: attempt.started_at.as_micros(),
                finished_at: micros(attempt.finished_at),
                error: attempt.error.as_deref(),
            })
        })
        .collect::<StoreResult<Vec<_>>>()?;
    to_json(&rows)
}

#[derive(Serialize)]
struct LogRow<'a> {
    run_id: RunId,
    task_run_id: TaskRunId,
    attempt: u32,
    stream: &'static str,
    at: i64,
    text: &'a str,
}

/// Log lines as one JSON array.
pub(super) fn encode_logs(lines: &[NewLogLine]) -> StoreResult<String> {
    let rows: Vec<LogRow<'_>> = lines
        .iter()
        .map(|line| LogRow {
            run_id: line.run_id,
            task_run_id: line.task_run_id,
            attempt: line.attempt,
            stream: line.stream.as_str(),
            at: line.at.as_micros(),
            text: &line.text,
        })
        .collect();
    to_json(&rows)
}

/// One column of a row; a value of the wrong type is corrupt data.
fn column<'r, T>(row: &'r SqliteRow, name: &str) -> StoreResult<T>
where
    T: Decode<'r, Sqlite> + Type<Sqlite>,
{
    row.try_get(name).map_err(db)
}

/// An integer column that must fit a `u32`.
pub(super) fn to_u32(value: i64, column: &str) -> StoreResult<u32> {
    u32::try_from(value)
        .map_err(|_| StoreError::Corrupt(format!("{column} holds {value}, out of range")))
}

fn to_u64(value: i64, column: &str) -> StoreResult<u64> {
    u64::try_from(value)
        .map_err(|_| StoreError::Corrupt(format!("{column} holds {value}, out of range")))
}

fn u32_column(row: &SqliteRow, name: &str) -> StoreResult<u32> {
    to_u32(column(row, name)?, name)
}

fn optional_u32_column(row: &SqliteRow, name: &str) -> StoreResult<Option<u32>> {
    column::<Option<i64>>(row, name)?
        .map(|v| to_u32(v, name))
        .transpose()
}

fn parsed_column<T: std::str::FromStr>(row: &SqliteRow, name: &str) -> StoreResult<T>
where
    T::Err: std::fmt::Display,
{
    let text: &str = column(row, name)?;
    parse_text(text, name)
}

fn json_text<T: DeserializeOwned>(text: &str, name: &str) -> StoreResult<T> {
    serde_json::from_str(text)
        .map_err(|e| StoreError::Corrupt(format!("{name} holds invalid json: {e}")))
}

fn json_column<T: DeserializeOwned>(row: &SqliteRow, name: &str) -> StoreResult<T> {
    let text: &str = column(row, name)?;
    json_text(text, name)
}

fn optional_json_column<T: DeserializeOwned>(
    row: &SqliteRow,
    name: &str,
) -> StoreResult<Option<T>> {
    column::<Option<&str>>(row, name)?
        .map(|text| json_text(text, name))
        .transpose()
}

fn timestamp_column(row: &SqliteRow, name: &str) -> StoreResult<Timestamp> {
    Ok(Timestamp(column(row, name)?))
}

fn optional_timestamp_column(row: &SqliteRow, name: &str) -> StoreResult<Option<Timestamp>> {
    Ok(column::<Option<i64>>(row, name)?.map(Timestamp))
}

fn task_id_text(text: &str, name: &str) -> StoreResult<TaskId> {
    TaskId::parse(text).map_err(|e| StoreError::Corrupt(format!("{name} holds {text:?}: {e}")))
}

/// A `pipelines` row.
pub(super) fn pipeline_from_row(row: &SqliteRow) -> StoreResult<StoredPipeline> {
    Ok(StoredPipeline {
        name: column(row, "name")?,
        version: u32_column(row, "version")?,
        digest: column(row, "digest")?,
        definition: json_column(row, "definition")?,
        created_at: timestamp_column(row, "created_at")?,
    })
}

/// A `runs` row.
pub(super) fn run_from_row(row: &SqliteRow) -> StoreResult<RunRecord> {
    Ok(RunRecord {
        id: parsed_column(row, "id")?,
        pipeline_name: column(row, "pipeline_name")?,
        pipeline_version: u32_column(row, "pipeline_version")?,
        params: json_column(row, "params")?,
        state: parsed_column::<RunState>(row, "state")?,
        error: column(row, "error")?,
        owner: column(row, "owner")?,
        created_at: timestamp_column(row, "created_at")?,
        started_at: optional_timestamp_column(row, "started_at")?,
        finished_at: optional_timestamp_column(row, "finished_at")?,
    })
}

/// A `task_runs` row.
pub(super) fn task_run_from_row(row: &SqliteRow) -> StoreResult<TaskRunRecord> {
    Ok(TaskRunRecord {
        id: parsed_column(row, "id")?,
        run_id: parsed_column(row, "run_id")?,
        task_id: task_id_text(column(row, "task_id")?, "task_id")?,
        index: optional_u32_column(row, "item_index")?,
        fan_out: optional_u32_column(row, "fan_out")?,
        state: parsed_column::<TaskRunState>(row, "state")?,
        attempt: u32_column(row, "attempt")?,
        lease_expiries: u32_column(row, "lease_expiries")?,
        fencing_token: to_u64(column(row, "fencing_token")?, "fencing_token")?,
        item: optional_json_column(row, "item")?,
        inputs: optional_json_column(row, "inputs")?,
        outputs: optional_json_column(row, "outputs")?,
        error: column(row, "error")?,
        lease_owner: column(row, "lease_owner")?,
        lease_expires_at: optional_timestamp_column(row, "lease_expires_at")?,
        ready_at: optional_timestamp_column(row, "ready_at")?,
        created_at: timestamp_column(row, "created_at")?,
        queued_at: optional_timestamp_column(row, "queued_at")?,
        started_at: optional_timestamp_column(row, "started_at")?,
        finished_at: optional_timestamp_column(row, "finished_at")?,
    })
}

/// An `attempts` row.
pub(super) fn attempt_from_row(row: &SqliteRow) -> StoreResult<AttemptRecord> {
    Ok(AttemptRecord {
        task_run_id: parsed_column(row, "task_run_id")?,
        run_id: parsed_column(row, "run_id")?,
        attempt: u32_column(row, "attempt")?,
        fencing_token: to_u64(column(row, "fencing_token")?, "fencing_token")?,
        worker: column(row, "worker")?,
        state: parsed_column::<AttemptState>(row, "state")?,
        started_at: timestamp_column(row, "started_at")?,
        finished_at: optional_timestamp_column(row, "finished_at")?,
        error: column(row, "error")?,
    })
}

fn stream_text(text: &str) -> StoreResult<LogStream> {
    match text {
        "stdout" => Ok(LogStream::Stdout),
        "stderr" => Ok(LogStream::Stderr),
        "system" => Ok(LogStream::System),
        other => Err(StoreError::Corrupt(format!("logs.stream holds {other:?}"))),
    }
}

/// A `logs` row.
pub(super) fn log_from_row(row: &SqliteRow) -> StoreResult<LogLine> {
    Ok(LogLine {
        seq: column(row, "seq")?,
        task_id: column::<Option<&str>>(row, "task_id")?
            .map(|text| task_id_text(text, "task_id"))
            .transpose()?,
        line: NewLogLine {
            run_id: parsed_column(row, "run_id")?,
            task_run_id: parsed_column(row, "task_run_id")?,
            attempt: u32_column(row, "attempt")?,
            stream: stream_text(column(row, "stream")?)?,
            at: timestamp_column(row, "at")?,
            text: column(row, "text")?,
        },
    })
}

/// An `artifacts` row.
pub(super) fn artifact_from_row(row: &SqliteRow) -> StoreResult<ArtifactRecord> {
    let produced_by = match column::<Option<&str>>(row, "run_id")? {
        None => None,
        Some(run_id) => Some(Producer {
            run_id: parse_text(run_id, "run_id")?,
            task_run_id: parsed_column(row, "task_run_id")?,
            task_id: task_id_text(column(row, "task_id")?, "task_id")?,
            attempt: u32_column(row, "attempt")?,
        }),
    };
    Ok(ArtifactRecord {
        id: parsed_column(row, "id")?,
        digest: column(row, "digest")?,
        size_bytes: to_u64(column(row, "size_bytes")?, "size_bytes")?,
        version: u32_column(row, "version")?,
        created_at: timestamp_column(row, "created_at")?,
        meta: NewArtifact {
            name: column(row, "name")?,
            media_type: column(row, "media_type")?,
            table: optional_json_column(row, "table_meta")?,
            produced_by,
            inputs: json_column(row, "inputs")?,
        },
    })
}
