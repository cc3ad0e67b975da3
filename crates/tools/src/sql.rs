//! The `sql` tool: one SQL query (Apache DataFusion) over CSV, Parquet and JSON tables taken
//! from upstream artifacts, named artifacts or local files; the result is stored as a table
//! artifact.
//!
//! The tool runs queries only: DDL (`CREATE EXTERNAL TABLE`), DML (`INSERT`, `COPY TO`) and
//! session statements (`SET`) are refused, so a query cannot read or write files other than
//! the tables the task declares or inherits from its upstream tasks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arches_core::ports::{Tool, ToolContext, ToolError};
use arches_core::records::{ColumnMeta, NewArtifact, TableMeta};
use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::Schema;
use datafusion::arrow::json::writer::JsonArray;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::common::TableReference;
use datafusion::error::DataFusionError;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::parquet::arrow::AsyncArrowWriter;
use datafusion::prelude::{
    CsvReadOptions, DataFrame, JsonReadOptions, ParquetReadOptions, SQLOptions, SessionConfig,
    SessionContext,
};
use datafusion::sql::parser::DFParser;
use datafusion::sql::resolve::resolve_table_references;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{
    artifact_json, parse_inputs, resolve_artifact_reference, store_error, upstream_task_artifacts,
    ArtifactHandle,
};
use crate::media_type;

/// Preview rows returned when `preview_rows` is not given.
pub const PREVIEW_ROWS_DEFAULT: u64 = 20;
/// Most preview rows a query may ask for; the preview travels in the task's outputs, which
/// the engine stores and sends to clients.
pub const PREVIEW_ROWS_MAX: u64 = 1000;
/// Memory a query may use before DataFusion spills or fails, unless configured.
pub const MEMORY_LIMIT_BYTES_DEFAULT: usize = 2 * 1024 * 1024 * 1024;
/// Longest excerpt of the query quoted in an error message.
const QUERY_IN_ERROR_CHARS_MAX: usize = 2000;
/// Bytes read from a JSON file to tell an array of objects from newline-delimited JSON.
const JSON_SNIFF_BYTES: usize = 4096;

/// The `sql` tool.
///
/// Inputs:
/// - `query` (string, required): one SQL query (DataFusion dialect).
/// - `tables` (object, optional): alias → source, where a source is an upstream task id
///   (string; all its table artifacts), `{"path": "<local file>", "format"?: "csv" | "parquet"
///   | "json"}` (a relative path is resolved against the process's current directory; the
///   format defaults to the file's extension), or `{"artifact": "<upstream task id | artifact
///   id | name[@version]>", "format"?: ...}`. A JSON file holds either newline-delimited
///   objects or one array of objects; the tool tells them apart by the first byte.
/// - `output` (object, optional): `{"name"?: artifact name (default: the task id), "format"?:
///   "parquet" (default) | "csv"}`.
/// - `preview_rows` (integer, optional): rows returned in `preview`, default 20, at most 1000.
///
/// Besides `tables`, every direct upstream task whose outputs hold table artifacts (media
/// types `text/csv`, `application/vnd.apache.parquet`, `application/x-ndjson`,
/// `application/json`) is a table named after the task id with `-` replaced by `_`; a fan-out
/// upstream is one table over all its items' artifacts. Such tables are read only when the
/// query names them.
///
/// Outputs: `{"artifact": <ArtifactRecord>, "rows": n, "schema": [{"name", "data_type",
/// "nullable"}], "preview": [<row as a JSON object>, ...]}`.
///
/// Errors: syntax and planning errors (unknown table or column, type errors) are permanent
/// and quote the query; a missing input file names its path; I/O errors while reading inputs
/// may be retried.
#[derive(Clone, Debug)]
pub struct SqlTool {
    memory_limit_bytes: usize,
}

impl SqlTool {
    /// The tool with a memory limit of [`MEMORY_LIMIT_BYTES_DEFAULT`] per query.
    pub fn new() -> Self {
        Self {
            memory_limit_bytes: MEMORY_LIMIT_BYTES_DEFAULT,
        }
    }

    /// Sets the memory a single query may use, in bytes.
    pub fn with_memory_limit_bytes(mut self, memory_limit_bytes: usize) -> Self {
        self.memory_limit_bytes = memory_limit_bytes;
        self
    }

    fn session(&self) -> Result<SessionContext, ToolError> {
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(self.memory_limit_bytes, 1.0)
            .build_arc()
            .map_err(|error| {
                ToolError::permanent(format!("cannot configure the query runtime: {error}"))
            })?;
        Ok(SessionContext::new_with_config_rt(
            SessionConfig::new(),
            runtime,
        ))
    }
}

impl Default for SqlTool {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SqlInputs {
    query: String,
    #[serde(default)]
    tables: BTreeMap<String, Value>,
    #[serde(default)]
    output: OutputSpec,
    preview_rows: Option<u64>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutputSpec {
    name: Option<String>,
    #[serde(default)]
    format: OutputFormat,
}

#[derive(Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum OutputFormat {
    #[default]
    Parquet,
    Csv,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSource {
    path: String,
    format: Option<DeclaredFormat>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ArtifactSource {
    artifact: String,
    format: Option<DeclaredFormat>,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum DeclaredFormat {
    Csv,
    Parquet,
    Json,
}

/// How DataFusion reads one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TableFormat {
    /// CSV with a header line.
    Csv,
    /// Parquet.
    Parquet,
    /// One JSON object per line.
    NdJson,
    /// One JSON array of objects.
    JsonArray,
}

impl TableFormat {
    /// The format of a table media type; `application/json` needs a look at the content.
    pub(crate) async fn of_media_type(media_type: &str, path: &Path) -> Option<Self> {
        let essence = media_type.split(';').next().unwrap_or_default().trim();
        match essence {
            media_type::CSV => Some(Self::Csv),
            media_type::PARQUET => Some(Self::Parquet),
            media_type::NDJSON => Some(Self::NdJson),
            media_type::JSON => Some(Self::sniff_json(path).await),
            _ => None,
        }
    }

    async fn of_declared(declared: DeclaredFormat, path: &Path) -> Self {
        match declared {
            DeclaredFormat::Csv => Self::Csv,
            DeclaredFormat::Parquet => Self::Parquet,
            DeclaredFormat::Json => Self::sniff_json(path).await,
        }
    }

    /// An array when the first non-blank byte is `[`, newline-delimited otherwise. A file
    /// that cannot be read is left to DataFusion, whose error then names it.
    async fn sniff_json(path: &Path) -> Self {
        let mut head = vec![0u8; JSON_SNIFF_BYTES];
        let read = match tokio::fs::File::open(path).await {
            Ok(mut file) => file.read(&mut head).await.unwrap_or(0),
            Err(_) => 0,
        };
        match head[..read].iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'[') => Self::JsonArray,
            _ => Self::NdJson,
        }
    }
}

/// One file of a table.
#[derive(Clone, Debug)]
pub(crate) struct TableFile {
    pub path: PathBuf,
    pub format: TableFormat,
}

/// Reads files as one DataFrame: files of one format through one listing table (their
/// schemas merged), several formats united by column name.
pub(crate) async fn read_files(
    session: &SessionContext,
    files: &[TableFile],
) -> Result<DataFrame, DataFusionError> {
    let mut groups: Vec<(TableFormat, Vec<String>)> = Vec::new();
    for file in files {
        let path = file.path.to_str().ok_or_else(|| {
            DataFusionError::Plan(format!("path {} is not valid UTF-8", file.path.display()))
        })?;
        match groups.iter_mut().find(|(format, _)| *format == file.format) {
            Some((_, paths)) => paths.push(path.to_owned()),
            None => groups.push((file.format, vec![path.to_owned()])),
        }
    }
    let mut frame: Option<DataFrame> = None;
    for (format, paths) in groups {
        // Artifacts are stored without a file extension: accept any.
        let next = match format {
            TableFormat::Csv => {
                session
                    .read_csv(paths, CsvReadOptions::new().file_extension(""))
                    .await?
            }
            TableFormat::Parquet => {
                session
                    .read_parquet(paths, ParquetReadOptions::new().file_extension(""))
                    .await?
            }
            TableFormat::NdJson => {
                session
                    .read_json(paths, JsonReadOptions::default().file_extension(""))
                    .await?
            }
            TableFormat::JsonArray => {
                let options = JsonReadOptions::default()
                    .file_extension("")
                    .newline_delimited(false);
                session.read_json(paths, options).await?
            }
        };
        frame = Some(match frame {
            None => next,
            Some(frame) => frame.union_by_name(next)?,
        });
    }
    frame.ok_or_else(|| DataFusionError::Plan("a table needs at least one file".to_owned()))
}

/// Row count and columns of a table file.
pub(crate) async fn inspect_table(
    path: &Path,
    format: TableFormat,
) -> Result<TableMeta, DataFusionError> {
    let session = SessionContext::new();
    let file = TableFile {
        path: path.to_owned(),
        format,
    };
    let frame = read_files(&session, &[file]).await?;
    let columns = columns_of(frame.schema().as_arrow());
    let rows = frame.count().await? as u64;
    Ok(TableMeta { rows, columns })
}

fn columns_of(schema: &Schema) -> Vec<ColumnMeta> {
    schema
        .fields()
        .iter()
        .map(|field| ColumnMeta {
            name: field.name().clone(),
            data_type: field.data_type().to_string(),
            nullable: field.is_nullable(),
        })
        .collect()
}

/// The files a source declared under `tables` stands for.
async fn declared_table_files(
    context: &ToolContext,
    alias: &str,
    source: &Value,
) -> Result<Vec<TableFile>, ToolError> {
    match source {
        Value::String(task) => {
            let artifacts = upstream_task_artifacts(context, task)
                .map_err(|error| table_error(alias, error))?;
            let files = artifact_table_files(context, &artifacts, None).await?;
            if files.is_empty() {
                return Err(ToolError::permanent(format!(
                    "table {alias}: upstream task {task:?} has no table artifact in its outputs"
                )));
            }
            Ok(files)
        }
        Value::Object(map) if map.contains_key("path") => {
            let source: FileSource =
                parse_inputs("sql", source.clone()).map_err(|error| table_error(alias, error))?;
            let path = crate::common::absolute_path(&source.path)?;
            match tokio::fs::metadata(&path).await {
                Ok(meta) if meta.is_file() => {}
                Ok(_) => {
                    return Err(ToolError::permanent(format!(
                        "table {alias}: input path {} is not a file",
                        path.display()
                    )))
                }
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                    return Err(ToolError::permanent(format!(
                        "table {alias}: input file not found: {}",
                        path.display()
                    )))
                }
                Err(error) => {
                    return Err(ToolError::permanent(format!(
                        "table {alias}: cannot read input file {}: {error}",
                        path.display()
                    )))
                }
            }
            let format = match source.format {
                Some(declared) => TableFormat::of_declared(declared, &path).await,
                None => {
                    let inferred = media_type::for_path(&path);
                    TableFormat::of_media_type(inferred, &path)
                        .await
                        .ok_or_else(|| {
                            ToolError::permanent(format!(
                                "table {alias}: cannot tell the format of {} from its extension; \
                             set format to csv, parquet or json",
                                path.display()
                            ))
                        })?
                }
            };
            Ok(vec![TableFile { path, format }])
        }
        Value::Object(map) if map.contains_key("artifact") => {
            let source: ArtifactSource =
                parse_inputs("sql", source.clone()).map_err(|error| table_error(alias, error))?;
            let artifacts = resolve_artifact_reference(context, &source.artifact)
                .await
                .map_err(|error| table_error(alias, error))?;
            let files = artifact_table_files(context, &artifacts, source.format).await?;
            if files.is_empty() {
                return Err(ToolError::permanent(format!(
                    "table {alias}: artifact {:?} is not a table (csv, parquet or json); set format",
                    source.artifact
                )));
            }
            Ok(files)
        }
        _ => Err(ToolError::permanent(format!(
            "table {alias}: give an upstream task id, {{\"path\": ...}} or {{\"artifact\": ...}}"
        ))),
    }
}

fn table_error(alias: &str, error: ToolError) -> ToolError {
    ToolError {
        message: format!("table {alias}: {}", error.message),
        retryable: error.retryable,
    }
}

/// Local files of the table artifacts among `artifacts`; with a declared format every
/// artifact is read in that format.
async fn artifact_table_files(
    context: &ToolContext,
    artifacts: &[ArtifactHandle],
    declared: Option<DeclaredFormat>,
) -> Result<Vec<TableFile>, ToolError> {
    let mut files = Vec::new();
    for artifact in artifacts {
        if declared.is_none() && !media_type::is_table(&artifact.media_type) {
            continue;
        }
        let path = context
            .artifacts
            .local_path(artifact.id)
            .await
            .map_err(|error| {
                store_error(&format!("cannot read artifact {}", artifact.label()), error)
            })?;
        let format = match declared {
            Some(declared) => TableFormat::of_declared(declared, &path).await,
            None => match TableFormat::of_media_type(&artifact.media_type, &path).await {
                Some(format) => format,
                None => continue,
            },
        };
        files.push(TableFile { path, format });
    }
    Ok(files)
}

/// The query, shortened for an error message.
fn quoted_query(query: &str) -> String {
    let query = query.trim();
    match query.char_indices().nth(QUERY_IN_ERROR_CHARS_MAX) {
        Some((cut, _)) => format!("{}…", &query[..cut]),
        None => query.to_owned(),
    }
}

/// A DataFusion error as a tool error. Only I/O failures may go away on another attempt; a
/// query that fails to parse, plan or run over the same inputs fails again.
/// `what` opens the message, for example `sql syntax error`.
fn query_error(what: &str, error: DataFusionError, query: &str) -> ToolError {
    let retryable = matches!(
        error.find_root(),
        DataFusionError::IoError(_) | DataFusionError::ObjectStore(_)
    );
    ToolError {
        message: format!(
            "{what}: {}\nquery: {}",
            error.strip_backtrace(),
            quoted_query(query)
        ),
        retryable,
    }
}

/// Writes result batches to the output file as they arrive.
enum ResultWriter {
    Parquet(Box<AsyncArrowWriter<tokio::fs::File>>),
    Csv {
        file: tokio::fs::File,
        header_written: bool,
        buffer: Vec<u8>,
    },
}

impl ResultWriter {
    async fn create(
        path: &Path,
        format: OutputFormat,
        schema: Arc<Schema>,
    ) -> Result<Self, ToolError> {
        let file = tokio::fs::File::create(path).await.map_err(|error| {
            ToolError::permanent(format!(
                "cannot create result file {}: {error}",
                path.display()
            ))
        })?;
        Ok(match format {
            OutputFormat::Parquet => {
                let writer = AsyncArrowWriter::try_new(file, schema, None).map_err(|error| {
                    ToolError::permanent(format!("cannot write parquet result: {error}"))
                })?;
                Self::Parquet(Box::new(writer))
            }
            OutputFormat::Csv => Self::Csv {
                file,
                header_written: false,
                buffer: Vec::new(),
            },
        })
    }

    async fn write(&mut self, batch: &RecordBatch) -> Result<(), ToolError> {
        match self {
            Self::Parquet(writer) => writer.write(batch).await.map_err(|error| {
                ToolError::permanent(format!("cannot write parquet result: {error}"))
            }),
            Self::Csv {
                file,
                header_written,
                buffer,
            } => {
                buffer.clear();
                let mut writer = datafusion::arrow::csv::WriterBuilder::new()
                    .with_header(!*header_written)
                    .build(&mut *buffer);
                writer.write(batch).map_err(|error| {
                    ToolError::permanent(format!("cannot write csv result: {error}"))
                })?;
                drop(writer);
                *header_written = true;
                file.write_all(buffer).await.map_err(|error| {
                    ToolError::transient(format!("cannot write csv result: {error}"))
                })
            }
        }
    }

    async fn finish(mut self, schema: Arc<Schema>) -> Result<(), ToolError> {
        if let Self::Csv {
            header_written: false,
            ..
        } = self
        {
            // An empty result still gets its header line.
            self.write(&RecordBatch::new_empty(schema)).await?;
        }
        match self {
            Self::Parquet(writer) => writer.close().await.map(drop).map_err(|error| {
                ToolError::permanent(format!("cannot write parquet result: {error}"))
            }),
            Self::Csv { mut file, .. } => file
                .flush()
                .await
                .map_err(|error| ToolError::transient(format!("cannot write csv result: {error}"))),
        }
    }
}

/// Rows of batches as JSON objects. Arrow's JSON writer covers nearly every type; for the
/// rest each value is shown as Arrow displays it.
fn preview_json(batches: &[RecordBatch]) -> Vec<Value> {
    if batches.iter().all(|b| b.num_rows() == 0) {
        return Vec::new();
    }
    let mut writer = datafusion::arrow::json::WriterBuilder::new()
        .with_explicit_nulls(true)
        .build::<_, JsonArray>(Vec::new());
    let written = batches
        .iter()
        .try_for_each(|batch| writer.write(batch))
        .and_then(|()| writer.finish());
    if written.is_ok() {
        if let Ok(rows) = serde_json::from_slice::<Vec<Value>>(&writer.into_inner()) {
            return rows;
        }
    }
    let options = FormatOptions::default().with_null("null");
    let mut rows = Vec::new();
    for batch in batches {
        let schema = batch.schema();
        let formatters: Vec<Option<ArrayFormatter>> = batch
            .columns()
            .iter()
            .map(|column| ArrayFormatter::try_new(column.as_ref(), &options).ok())
            .collect();
        for row in 0..batch.num_rows() {
            let mut object = Map::new();
            for (field, (column, formatter)) in schema
                .fields()
                .iter()
                .zip(batch.columns().iter().zip(&formatters))
            {
                let value = match formatter {
                    _ if column.is_null(row) => Value::Null,
                    Some(formatter) => Value::String(formatter.value(row).to_string()),
                    None => Value::Null,
                };
                object.insert(field.name().clone(), value);
            }
            rows.push(Value::Object(object));
        }
    }
    rows
}

#[async_trait]
impl Tool for SqlTool {
    fn name(&self) -> &str {
        "sql"
    }

    fn description(&self) -> &str {
        "run a sql query (apache datafusion) over csv, parquet and json tables and store the result"
    }

    fn input_schema(&self) -> Value {
        let format = json!({"type": "string", "enum": ["csv", "parquet", "json"]});
        json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["query"],
            "properties": {
                "query": {
                    "type": "string",
                    "minLength": 1,
                    "description": "one sql query (datafusion dialect); upstream tasks holding table artifacts are tables named after their id with '-' replaced by '_'"
                },
                "tables": {
                    "type": "object",
                    "description": "alias -> upstream task id, {path, format?} or {artifact, format?}",
                    "additionalProperties": {
                        "oneOf": [
                            {"type": "string", "minLength": 1},
                            {
                                "type": "object",
                                "additionalProperties": false,
                                "required": ["path"],
                                "properties": {
                                    "path": {"type": "string", "minLength": 1},
                                    "format": format
                                }
                            },
                            {
                                "type": "object",
                                "additionalProperties": false,
                                "required": ["artifact"],
                                "properties": {
                                    "artifact": {"type": "string", "minLength": 1},
                                    "format": format
                                }
                            }
                        ]
                    }
                },
                "output": {
                    "type": "object",
                    "additionalProperties": false,
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "format": {"type": "string", "enum": ["parquet", "csv"], "default": "parquet"}
                    }
                },
                "preview_rows": {
                    "type": "integer",
                    "minimum": 0,
                    "maximum": PREVIEW_ROWS_MAX,
                    "default": PREVIEW_ROWS_DEFAULT
                }
            }
        })
    }

    fn implied_dependencies(&self, inputs: &Value, task_ids: &[&str]) -> Vec<String> {
        sql_dependencies(inputs, task_ids)
    }

    async fn execute(&self, context: ToolContext, inputs: Value) -> Result<Value, ToolError> {
        let inputs: SqlInputs = parse_inputs("sql", inputs)?;
        let query = inputs.query.as_str();
        let preview_rows = inputs.preview_rows.unwrap_or(PREVIEW_ROWS_DEFAULT);
        if preview_rows > PREVIEW_ROWS_MAX {
            return Err(ToolError::permanent(format!(
                "preview_rows is {preview_rows}; at most {PREVIEW_ROWS_MAX} rows can be previewed"
            )));
        }
        let mut declared = BTreeMap::new();
        for (alias, source) in &inputs.tables {
            declared.insert(
                alias.clone(),
                declared_table_files(&context, alias, source).await?,
            );
        }

        let session = self.session()?;
        let state = session.state();
        let dialect = state.config().options().sql_parser.dialect;
        let statement = state
            .sql_to_statement(query, &dialect)
            .map_err(|error| query_error("sql syntax error", error, query))?;
        let references = state
            .resolve_table_references(&statement)
            .map_err(|error| query_error("sql planning error", error, query))?;
        // Register only the tables the query names, so that upstream tables it does not
        // read cost nothing and cannot fail it.
        for reference in references {
            if reference.schema().is_some() {
                continue;
            }
            let table = reference.table();
            let files = match lookup(&declared, table) {
                Some(files) => files.clone(),
                None => match upstream_table(&context, table) {
                    Some(task) => {
                        let artifacts = upstream_task_artifacts(&context, &task)?;
                        artifact_table_files(&context, &artifacts, None).await?
                    }
                    None => continue,
                },
            };
            if files.is_empty() {
                // Left to the planner, whose error names the missing table.
                continue;
            }
            let frame = read_files(&session, &files).await.map_err(|error| {
                query_error(&format!("cannot read table {table}"), error, query)
            })?;
            session
                .register_table(TableReference::bare(table), frame.into_view())
                .map_err(|error| query_error("sql planning error", error, query))?;
        }
        let state = session.state();
        let plan = state
            .statement_to_plan(statement)
            .await
            .map_err(|error| query_error("sql planning error", error, query))?;
        SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false)
            .verify_plan(&plan)
            .map_err(|error| query_error("sql planning error", error, query))?;
        let frame = session
            .execute_logical_plan(plan)
            .await
            .map_err(|error| query_error("sql planning error", error, query))?;
        let mut stream = frame
            .execute_stream()
            .await
            .map_err(|error| query_error("sql planning error", error, query))?;

        let schema = stream.schema();
        let (file_name, media) = match inputs.output.format {
            OutputFormat::Parquet => ("result.parquet", media_type::PARQUET),
            OutputFormat::Csv => ("result.csv", media_type::CSV),
        };
        let result_path = context.work_dir.join(file_name);
        let mut writer =
            ResultWriter::create(&result_path, inputs.output.format, schema.clone()).await?;
        let mut rows: u64 = 0;
        let mut preview: Vec<RecordBatch> = Vec::new();
        let mut preview_left = preview_rows as usize;
        while let Some(batch) = stream.next().await {
            let batch = batch.map_err(|error| query_error("sql execution error", error, query))?;
            rows += batch.num_rows() as u64;
            if preview_left > 0 && batch.num_rows() > 0 {
                let take = preview_left.min(batch.num_rows());
                preview.push(batch.slice(0, take));
                preview_left -= take;
            }
            writer.write(&batch).await?;
        }
        writer.finish(schema.clone()).await?;

        let columns = columns_of(&schema);
        let name = inputs
            .output
            .name
            .unwrap_or_else(|| context.task_id.to_string());
        let record = context
            .artifacts
            .put_file(
                &result_path,
                NewArtifact {
                    org_id: context.org_id,
                    name,
                    media_type: media.to_owned(),
                    table: Some(TableMeta {
                        rows,
                        columns: columns.clone(),
                    }),
                    produced_by: Some(context.producer()),
                    inputs: context.upstream_artifacts(),
                },
            )
            .await
            .map_err(|error| store_error("cannot store the query result", error))?;
        Ok(json!({
            "artifact": artifact_json(&record)?,
            "rows": rows,
            "schema": columns,
            "preview": preview_json(&preview),
        }))
    }
}

/// A declared table by alias: exactly, or as SQL folds an unquoted name to lowercase.
fn lookup<'a>(
    declared: &'a BTreeMap<String, Vec<TableFile>>,
    table: &str,
) -> Option<&'a Vec<TableFile>> {
    declared.get(table).or_else(|| {
        declared
            .iter()
            .find(|(alias, _)| alias.to_lowercase() == table)
            .map(|(_, files)| files)
    })
}

/// The task a table name stands for: its id with `-` replaced by `_`, compared exactly or
/// folded to lowercase (as SQL folds unquoted names).
fn task_for_table<'a>(tasks: impl Iterator<Item = &'a str>, table: &str) -> Option<&'a str> {
    let names: Vec<(String, &str)> = tasks.map(|task| (task.replace('-', "_"), task)).collect();
    names
        .iter()
        .find(|(name, _)| name == table)
        .or_else(|| names.iter().find(|(name, _)| name.to_lowercase() == table))
        .map(|(_, task)| *task)
}

/// The upstream task a table name of the query stands for.
fn upstream_table(context: &ToolContext, table: &str) -> Option<String> {
    task_for_table(context.upstream.keys().map(String::as_str), table).map(str::to_owned)
}

/// The unqualified table names a query reads, or none when it does not parse. Template
/// expressions (`{{ ... }}`) are read as `NULL` and template tags (`{% ... %}`, `{# ... #}`)
/// are dropped, since dependencies are worked out before the inputs are rendered.
fn query_tables(query: &str) -> Vec<String> {
    let query = without_templates(query);
    let Ok(statements) = DFParser::parse_sql(&query) else {
        return Vec::new();
    };
    let mut tables = Vec::new();
    for statement in &statements {
        if let Ok((references, _)) = resolve_table_references(statement, true) {
            tables.extend(
                references
                    .iter()
                    .filter(|reference| reference.schema().is_none())
                    .map(|reference| reference.table().to_owned()),
            );
        }
    }
    tables
}

fn without_templates(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('{') {
        let (close, replacement) = match rest[start..].chars().nth(1) {
            Some('{') => ("}}", "NULL"),
            Some('%') => ("%}", ""),
            Some('#') => ("#}", ""),
            _ => {
                out.push_str(&rest[..=start]);
                rest = &rest[start + 1..];
                continue;
            }
        };
        out.push_str(&rest[..start]);
        match rest[start + 2..].find(close) {
            Some(end) => {
                out.push_str(replacement);
                rest = &rest[start + 2 + end + close.len()..];
            }
            None => {
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// The tasks the `sql` inputs read: upstream task ids under `tables`, and tables of the query
/// that stand for a task and are not declared under `tables`.
fn sql_dependencies(inputs: &Value, task_ids: &[&str]) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    let mut add = |task: &str| {
        if !found.iter().any(|t| t == task) {
            found.push(task.to_owned());
        }
    };
    let tables = inputs.get("tables").and_then(Value::as_object);
    for source in tables.into_iter().flat_map(|t| t.values()) {
        let named = match source {
            Value::String(task) => Some(task.as_str()),
            Value::Object(map) => map.get("artifact").and_then(Value::as_str),
            _ => None,
        };
        if let Some(task) = named.filter(|task| task_ids.contains(task)) {
            add(task);
        }
    }
    let declared = |table: &str| {
        tables.is_some_and(|t| {
            t.keys()
                .any(|alias| alias == table || alias.to_lowercase() == table)
        })
    };
    if let Some(query) = inputs.get("query").and_then(Value::as_str) {
        for table in query_tables(query) {
            if declared(&table) {
                continue;
            }
            if let Some(task) = task_for_table(task_ids.iter().copied(), &table) {
                add(task);
            }
        }
    }
    found
}
