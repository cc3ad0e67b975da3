//! Rows in and out of SQLite: runs and log lines encoded as the JSON arrays that the set-based
//! statements expand with `json_each`, task runs and attempts bound as the parameters of
//! multi-row upserts, and rows decoded back into records.
//!
//! JSON values of the records (params, items, inputs, outputs) are stored as their JSON text.
//! Inside a batch document they travel as strings, so `->>` hands SQLite their text unchanged;
//! as parameters they are bound as text. `None` is stored as SQL `NULL` (JSON `null` in a
//! document, a `NULL` parameter), while `Some(Value::Null)` is stored as the text `null`.

use arches_core::ids::{OrgId, RunId, TaskRunId};
use arches_core::ports::{StoreError, StoreResult};
use arches_core::records::*;
use arches_core::state::{AttemptState, RunState, TaskRunState};
use arches_core::time::Timestamp;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use sqlx::sqlite::{SqliteArguments, SqliteRow};
use sqlx::{Arguments, Decode, Encode, Row, Sqlite, Type};

use crate::decode::parse_text;
use crate::decode::{stream_text, task_id_text};
use crate::error::db;

/// Encodes a value as JSON text.
pub(super) fn to_json<T: Serialize + ?Sized>(value: &T) -> StoreResult<String> {
    serde_json::to_string(value)
        .map_err(|e| StoreError::Backend(format!("cannot encode json: {e}")))
}

fn optional_json(value: Option<&Value>) -> StoreResult<Option<String>> {
    value.map(to_json).transpose()
}

pub(super) fn micros(at: Option<Timestamp>) -> Option<i64> {
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
    org_id: OrgId,
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
                org_id: run.org_id,
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

/// Appends one bound parameter.
fn push<'q, T>(args: &mut SqliteArguments<'q>, value: T) -> StoreResult<()>
where
    T: Encode<'q, Sqlite> + Type<Sqlite> + 'q,
{
    args.add(value)
        .map_err(|e| StoreError::Backend(format!("cannot bind a parameter: {e}")))
}

/// Binds one JSON document, the parameter of a statement that expands it with `json_each`.
pub(super) fn bind_text(args: &mut SqliteArguments<'_>, text: String) -> StoreResult<()> {
    push(args, text)
}

/// Columns of one task run bound by [`bind_task_runs`], in `INSERT` column order.
pub(super) const TASK_RUN_PARAMS: usize = 20;

/// Binds every field of `task_runs`, row after row, in the column order of the task-run
/// upsert. `None` is bound as SQL `NULL`; a JSON value, `Some(Value::Null)` included, as
/// its JSON text.
pub(super) fn bind_task_runs<'q>(
    args: &mut SqliteArguments<'q>,
    task_runs: &'q [TaskRunRecord],
) -> StoreResult<()> {
    for task_run in task_runs {
        push(args, task_run.id.to_string())?;
        push(args, task_run.run_id.to_string())?;
        push(args, task_run.task_id.as_str())?;
        push(args, task_run.index.map(i64::from))?;
        push(args, task_run.fan_out.map(i64::from))?;
        push(args, task_run.state.as_str())?;
        push(args, i64::from(task_run.attempt))?;
        push(args, i64::from(task_run.lease_expiries))?;
        push(args, token(task_run.fencing_token)?)?;
        push(args, optional_json(task_run.item.as_ref())?)?;
        push(args, optional_json(task_run.inputs.as_ref())?)?;
        push(args, optional_json(task_run.outputs.as_ref())?)?;
        push(args, task_run.error.as_deref())?;
        push(args, task_run.lease_owner.as_deref())?;
        push(args, micros(task_run.lease_expires_at))?;
        push(args, micros(task_run.ready_at))?;
        push(args, task_run.created_at.as_micros())?;
        push(args, micros(task_run.queued_at))?;
        push(args, micros(task_run.started_at))?;
        push(args, micros(task_run.finished_at))?;
    }
    Ok(())
}

/// The `[[id, fencing token], …]` pairs of the batch's task runs, for the stale-write check.
pub(super) fn encode_task_run_tokens(task_runs: &[TaskRunRecord]) -> StoreResult<String> {
    let tokens = task_runs
        .iter()
        .map(|task_run| Ok((task_run.id, token(task_run.fencing_token)?)))
        .collect::<StoreResult<Vec<_>>>()?;
    to_json(&tokens)
}

/// Columns of one attempt bound by [`bind_attempts`], in `INSERT` column order.
pub(super) const ATTEMPT_PARAMS: usize = 9;

/// Binds every field of `attempts`, row after row, in the column order of the attempt upsert.
pub(super) fn bind_attempts<'q>(
    args: &mut SqliteArguments<'q>,
    attempts: &'q [AttemptRecord],
) -> StoreResult<()> {
    for attempt in attempts {
        push(args, attempt.task_run_id.to_string())?;
        push(args, i64::from(attempt.attempt))?;
        push(args, attempt.run_id.to_string())?;
        push(args, token(attempt.fencing_token)?)?;
        push(args, attempt.worker.as_str())?;
        push(args, attempt.state.as_str())?;
        push(args, attempt.started_at.as_micros())?;
        push(args, micros(attempt.finished_at))?;
        push(args, attempt.error.as_deref())?;
    }
    Ok(())
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
pub(super) fn column<'r, T>(row: &'r SqliteRow, name: &str) -> StoreResult<T>
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

pub(super) fn to_u64(value: i64, column: &str) -> StoreResult<u64> {
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

pub(super) fn parsed_column<T: std::str::FromStr>(row: &SqliteRow, name: &str) -> StoreResult<T>
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

pub(super) fn json_column<T: DeserializeOwned>(row: &SqliteRow, name: &str) -> StoreResult<T> {
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

pub(super) fn timestamp_column(row: &SqliteRow, name: &str) -> StoreResult<Timestamp> {
    Ok(Timestamp(column(row, name)?))
}

pub(super) fn optional_timestamp_column(
    row: &SqliteRow,
    name: &str,
) -> StoreResult<Option<Timestamp>> {
    Ok(column::<Option<i64>>(row, name)?.map(Timestamp))
}

/// A `pipelines` row.
pub(super) fn pipeline_from_row(row: &SqliteRow) -> StoreResult<StoredPipeline> {
    Ok(StoredPipeline {
        org_id: parsed_column(row, "org_id")?,
        name: column(row, "name")?,
        version: u32_column(row, "version")?,
        digest: column(row, "digest")?,
        definition: json_column(row, "definition")?,
        created_at: timestamp_column(row, "created_at")?,
        archived_at: optional_timestamp_column(row, "archived_at")?,
    })
}

/// A `runs` row.
pub(super) fn run_from_row(row: &SqliteRow) -> StoreResult<RunRecord> {
    Ok(RunRecord {
        id: parsed_column(row, "id")?,
        org_id: parsed_column(row, "org_id")?,
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
            org_id: parsed_column(row, "org_id")?,
            name: column(row, "name")?,
            media_type: column(row, "media_type")?,
            table: optional_json_column(row, "table_meta")?,
            produced_by,
            inputs: json_column(row, "inputs")?,
        },
    })
}
