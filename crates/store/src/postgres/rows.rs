//! Rows in and out of PostgreSQL: a batch's records split into one array per column, bound as
//! the parameters of `INSERT … SELECT … FROM UNNEST(…)` upserts (one statement and one round
//! trip per table, whatever the batch's size), and rows decoded back into records.
//!
//! JSON values of the records are `jsonb`: `None` is bound as SQL `NULL` and
//! `Some(Value::Null)` as the JSON `null`, so the two stay distinct. Timestamps are bound as
//! their microseconds and unsigned counts as `bigint`.

use arches_core::ids::{ArtifactId, OrgId, RunId, TaskRunId};
use arches_core::ports::{StoreError, StoreResult};
use arches_core::records::*;
use arches_core::state::{AttemptState, RunState, TaskRunState};
use arches_core::time::Timestamp;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sqlx::postgres::{PgRow, Postgres};
use sqlx::types::Json;
use sqlx::{Decode, Row, Type};
use uuid::Uuid;

use crate::decode::parse_text;
use crate::decode::{stream_text, task_id_text};
use crate::error::db;

/// `bigint` is signed; a fencing token above `i64::MAX` cannot be stored or compared.
pub(super) fn token(value: u64) -> StoreResult<i64> {
    i64::try_from(value).map_err(|_| {
        StoreError::Conflict(format!(
            "fencing token {value} is above the largest storable value"
        ))
    })
}

fn micros(at: Option<Timestamp>) -> Option<i64> {
    at.map(Timestamp::as_micros)
}

/// A JSON value as a `jsonb` parameter, without copying it.
fn json(value: Option<&Value>) -> Option<Json<&Value>> {
    value.map(Json)
}

/// The batch's runs, one array per column of the run upsert.
#[derive(Default)]
pub(super) struct RunColumns<'a> {
    pub id: Vec<Uuid>,
    pub org_id: Vec<Uuid>,
    pub pipeline_name: Vec<&'a str>,
    pub pipeline_version: Vec<i64>,
    pub params: Vec<Json<&'a Value>>,
    pub state: Vec<&'static str>,
    pub error: Vec<Option<&'a str>>,
    pub owner: Vec<Option<&'a str>>,
    pub created_at: Vec<i64>,
    pub started_at: Vec<Option<i64>>,
    pub finished_at: Vec<Option<i64>>,
}

impl<'a> RunColumns<'a> {
    pub(super) fn new(runs: &[&'a RunRecord]) -> Self {
        let mut columns = RunColumns::default();
        for run in runs {
            columns.id.push(run.id.0);
            columns.org_id.push(run.org_id.0);
            columns.pipeline_name.push(&run.pipeline_name);
            columns
                .pipeline_version
                .push(i64::from(run.pipeline_version));
            columns.params.push(Json(&run.params));
            columns.state.push(run.state.as_str());
            columns.error.push(run.error.as_deref());
            columns.owner.push(run.owner.as_deref());
            columns.created_at.push(run.created_at.as_micros());
            columns.started_at.push(micros(run.started_at));
            columns.finished_at.push(micros(run.finished_at));
        }
        columns
    }
}

/// The batch's task runs, one array per column of the task-run upsert.
#[derive(Default)]
pub(super) struct TaskRunColumns<'a> {
    pub id: Vec<Uuid>,
    pub run_id: Vec<Uuid>,
    pub task_id: Vec<&'a str>,
    pub item_index: Vec<Option<i64>>,
    pub fan_out: Vec<Option<i64>>,
    pub state: Vec<&'static str>,
    pub attempt: Vec<i64>,
    pub lease_expiries: Vec<i64>,
    pub fencing_token: Vec<i64>,
    pub item: Vec<Option<Json<&'a Value>>>,
    pub inputs: Vec<Option<Json<&'a Value>>>,
    pub outputs: Vec<Option<Json<&'a Value>>>,
    pub error: Vec<Option<&'a str>>,
    pub lease_owner: Vec<Option<&'a str>>,
    pub lease_expires_at: Vec<Option<i64>>,
    pub ready_at: Vec<Option<i64>>,
    pub created_at: Vec<i64>,
    pub queued_at: Vec<Option<i64>>,
    pub started_at: Vec<Option<i64>>,
    pub finished_at: Vec<Option<i64>>,
}

impl<'a> TaskRunColumns<'a> {
    pub(super) fn new(task_runs: &[&'a TaskRunRecord]) -> StoreResult<Self> {
        let mut columns = TaskRunColumns::default();
        for task_run in task_runs {
            columns.id.push(task_run.id.0);
            columns.run_id.push(task_run.run_id.0);
            columns.task_id.push(task_run.task_id.as_str());
            columns.item_index.push(task_run.index.map(i64::from));
            columns.fan_out.push(task_run.fan_out.map(i64::from));
            columns.state.push(task_run.state.as_str());
            columns.attempt.push(i64::from(task_run.attempt));
            columns
                .lease_expiries
                .push(i64::from(task_run.lease_expiries));
            columns.fencing_token.push(token(task_run.fencing_token)?);
            columns.item.push(json(task_run.item.as_ref()));
            columns.inputs.push(json(task_run.inputs.as_ref()));
            columns.outputs.push(json(task_run.outputs.as_ref()));
            columns.error.push(task_run.error.as_deref());
            columns.lease_owner.push(task_run.lease_owner.as_deref());
            columns
                .lease_expires_at
                .push(micros(task_run.lease_expires_at));
            columns.ready_at.push(micros(task_run.ready_at));
            columns.created_at.push(task_run.created_at.as_micros());
            columns.queued_at.push(micros(task_run.queued_at));
            columns.started_at.push(micros(task_run.started_at));
            columns.finished_at.push(micros(task_run.finished_at));
        }
        Ok(columns)
    }
}

/// The batch's attempts, one array per column of the attempt upsert.
#[derive(Default)]
pub(super) struct AttemptColumns<'a> {
    pub task_run_id: Vec<Uuid>,
    pub attempt: Vec<i64>,
    pub run_id: Vec<Uuid>,
    pub fencing_token: Vec<i64>,
    pub worker: Vec<&'a str>,
    pub state: Vec<&'static str>,
    pub started_at: Vec<i64>,
    pub finished_at: Vec<Option<i64>>,
    pub error: Vec<Option<&'a str>>,
}

impl<'a> AttemptColumns<'a> {
    pub(super) fn new(attempts: &[&'a AttemptRecord]) -> StoreResult<Self> {
        let mut columns = AttemptColumns::default();
        for attempt in attempts {
            columns.task_run_id.push(attempt.task_run_id.0);
            columns.attempt.push(i64::from(attempt.attempt));
            columns.run_id.push(attempt.run_id.0);
            columns.fencing_token.push(token(attempt.fencing_token)?);
            columns.worker.push(&attempt.worker);
            columns.state.push(attempt.state.as_str());
            columns.started_at.push(attempt.started_at.as_micros());
            columns.finished_at.push(micros(attempt.finished_at));
            columns.error.push(attempt.error.as_deref());
        }
        Ok(columns)
    }
}

/// Log lines, one array per column of the log insert.
#[derive(Default)]
pub(super) struct LogColumns<'a> {
    pub run_id: Vec<Uuid>,
    pub task_run_id: Vec<Uuid>,
    pub attempt: Vec<i64>,
    pub stream: Vec<&'static str>,
    pub at: Vec<i64>,
    pub text: Vec<&'a str>,
}

impl<'a> LogColumns<'a> {
    pub(super) fn new(lines: &'a [NewLogLine]) -> Self {
        let mut columns = LogColumns::default();
        for line in lines {
            columns.run_id.push(line.run_id.0);
            columns.task_run_id.push(line.task_run_id.0);
            columns.attempt.push(i64::from(line.attempt));
            columns.stream.push(line.stream.as_str());
            columns.at.push(line.at.as_micros());
            columns.text.push(&line.text);
        }
        columns
    }
}

/// One column of a row; a value of the wrong type is corrupt data.
pub(super) fn column<'r, T>(row: &'r PgRow, name: &str) -> StoreResult<T>
where
    T: Decode<'r, Postgres> + Type<Postgres>,
{
    row.try_get(name).map_err(db)
}

/// A `bigint` that must fit a `u32`.
pub(super) fn to_u32(value: i64, column: &str) -> StoreResult<u32> {
    u32::try_from(value)
        .map_err(|_| StoreError::Corrupt(format!("{column} holds {value}, out of range")))
}

fn to_u64(value: i64, column: &str) -> StoreResult<u64> {
    u64::try_from(value)
        .map_err(|_| StoreError::Corrupt(format!("{column} holds {value}, out of range")))
}

fn u32_column(row: &PgRow, name: &str) -> StoreResult<u32> {
    to_u32(column(row, name)?, name)
}

fn optional_u32_column(row: &PgRow, name: &str) -> StoreResult<Option<u32>> {
    column::<Option<i64>>(row, name)?
        .map(|v| to_u32(v, name))
        .transpose()
}

/// A `uuid` column as one of the id newtypes.
fn id_column<T>(row: &PgRow, name: &str, id: fn(Uuid) -> T) -> StoreResult<T> {
    Ok(id(column::<Uuid>(row, name)?))
}

fn parsed_column<T: std::str::FromStr>(row: &PgRow, name: &str) -> StoreResult<T>
where
    T::Err: std::fmt::Display,
{
    let text: &str = column(row, name)?;
    parse_text(text, name)
}

fn typed_json<T: DeserializeOwned>(value: Value, name: &str) -> StoreResult<T> {
    serde_json::from_value(value)
        .map_err(|e| StoreError::Corrupt(format!("{name} holds unexpected json: {e}")))
}

fn timestamp_column(row: &PgRow, name: &str) -> StoreResult<Timestamp> {
    Ok(Timestamp(column(row, name)?))
}

fn optional_timestamp_column(row: &PgRow, name: &str) -> StoreResult<Option<Timestamp>> {
    Ok(column::<Option<i64>>(row, name)?.map(Timestamp))
}

/// A `pipelines` row joined with its name's archive time.
pub(super) fn pipeline_from_row(row: &PgRow) -> StoreResult<StoredPipeline> {
    Ok(StoredPipeline {
        org_id: id_column(row, "org_id", OrgId)?,
        name: column(row, "name")?,
        version: u32_column(row, "version")?,
        digest: column(row, "digest")?,
        definition: column(row, "definition")?,
        created_at: timestamp_column(row, "created_at")?,
        archived_at: optional_timestamp_column(row, "archived_at")?,
    })
}

/// A `runs` row.
pub(super) fn run_from_row(row: &PgRow) -> StoreResult<RunRecord> {
    Ok(RunRecord {
        id: id_column(row, "id", RunId)?,
        org_id: id_column(row, "org_id", OrgId)?,
        pipeline_name: column(row, "pipeline_name")?,
        pipeline_version: u32_column(row, "pipeline_version")?,
        params: column(row, "params")?,
        state: parsed_column::<RunState>(row, "state")?,
        error: column(row, "error")?,
        owner: column(row, "owner")?,
        created_at: timestamp_column(row, "created_at")?,
        started_at: optional_timestamp_column(row, "started_at")?,
        finished_at: optional_timestamp_column(row, "finished_at")?,
    })
}

/// A `task_runs` row.
pub(super) fn task_run_from_row(row: &PgRow) -> StoreResult<TaskRunRecord> {
    Ok(TaskRunRecord {
        id: id_column(row, "id", TaskRunId)?,
        run_id: id_column(row, "run_id", RunId)?,
        task_id: task_id_text(column(row, "task_id")?, "task_id")?,
        index: optional_u32_column(row, "item_index")?,
        fan_out: optional_u32_column(row, "fan_out")?,
        state: parsed_column::<TaskRunState>(row, "state")?,
        attempt: u32_column(row, "attempt")?,
        lease_expiries: u32_column(row, "lease_expiries")?,
        fencing_token: to_u64(column(row, "fencing_token")?, "fencing_token")?,
        item: column(row, "item")?,
        inputs: column(row, "inputs")?,
        outputs: column(row, "outputs")?,
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
pub(super) fn attempt_from_row(row: &PgRow) -> StoreResult<AttemptRecord> {
    Ok(AttemptRecord {
        task_run_id: id_column(row, "task_run_id", TaskRunId)?,
        run_id: id_column(row, "run_id", RunId)?,
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
pub(super) fn log_from_row(row: &PgRow) -> StoreResult<LogLine> {
    Ok(LogLine {
        seq: column(row, "seq")?,
        task_id: column::<Option<&str>>(row, "task_id")?
            .map(|text| task_id_text(text, "task_id"))
            .transpose()?,
        line: NewLogLine {
            run_id: id_column(row, "run_id", RunId)?,
            task_run_id: id_column(row, "task_run_id", TaskRunId)?,
            attempt: u32_column(row, "attempt")?,
            stream: stream_text(column(row, "stream")?)?,
            at: timestamp_column(row, "at")?,
            text: column(row, "text")?,
        },
    })
}

/// An `artifacts` row.
pub(super) fn artifact_from_row(row: &PgRow) -> StoreResult<ArtifactRecord> {
    let produced_by = match column::<Option<Uuid>>(row, "run_id")? {
        None => None,
        Some(run_id) => Some(Producer {
            run_id: RunId(run_id),
            task_run_id: id_column(row, "task_run_id", TaskRunId)?,
            task_id: task_id_text(column(row, "task_id")?, "task_id")?,
            attempt: u32_column(row, "attempt")?,
        }),
    };
    let table = column::<Option<Value>>(row, "table_meta")?
        .map(|value| typed_json(value, "table_meta"))
        .transpose()?;
    Ok(ArtifactRecord {
        id: id_column(row, "id", ArtifactId)?,
        digest: column(row, "digest")?,
        size_bytes: to_u64(column(row, "size_bytes")?, "size_bytes")?,
        version: u32_column(row, "version")?,
        created_at: timestamp_column(row, "created_at")?,
        meta: NewArtifact {
            org_id: id_column(row, "org_id", OrgId)?,
            name: column(row, "name")?,
            media_type: column(row, "media_type")?,
            table,
            produced_by,
            inputs: typed_json(column(row, "inputs")?, "inputs")?,
        },
    })
}
