//! The `file` tool: brings a local file into the artifact store, or writes an artifact out to
//! a local path.
//!
//! Relative paths are resolved against the current directory of the process that runs the
//! tool: for `arches run` that is the directory the command was started in (the pipeline
//! runner sets it); on a server worker it is the worker's directory, so pipelines meant for
//! servers should use absolute paths.

use std::path::Path;

use arches_core::ports::{Tool, ToolContext, ToolError};
use arches_core::records::{LogStream, NewArtifact, TableMeta};
use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::common::{
    absolute_path, artifact_json, copy_artifact_to, parse_inputs, resolve_single_artifact,
    store_error,
};
use crate::media_type;
use crate::sql::{inspect_table, TableFormat};

/// The `file` tool.
///
/// Inputs, one of two shapes:
/// - store: `{"path": "<local file>", "name"?: "<artifact name>", "media_type"?: "<override>"}`
///   stores the file as an artifact. The name defaults to the file's name; the media type is
///   inferred from the extension (`csv`, `parquet`, `json`, `ndjson`/`jsonl`, `md`, `txt`, else
///   `application/octet-stream`). For CSV, Parquet and NDJSON files the row count and columns
///   are recorded when the file can be read as a table. Outputs `{"artifact":
///   <ArtifactRecord>}`.
/// - fetch: `{"artifact": "<upstream task id | artifact id | name[@version]>", "to": "<local
///   path>"}` writes the artifact's content to `to`, creating parent directories and
///   replacing an existing file. Outputs `{"path": "<absolute path>", "size_bytes": n}`.
///
/// Relative paths are resolved against the process's current directory.
///
/// Errors: a missing file names its path (permanent); an artifact reference that matches
/// nothing or several artifacts is permanent.
#[derive(Clone, Debug, Default)]
pub struct FileTool;

impl FileTool {
    /// The tool.
    pub fn new() -> Self {
        Self
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreInputs {
    path: String,
    name: Option<String>,
    media_type: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FetchInputs {
    artifact: String,
    to: String,
}

async fn store(context: &ToolContext, inputs: StoreInputs) -> Result<Value, ToolError> {
    let path = absolute_path(&inputs.path)?;
    match tokio::fs::metadata(&path).await {
        Ok(metadata) if metadata.is_file() => {}
        Ok(_) => {
            return Err(ToolError::permanent(format!(
                "not a file: {}",
                path.display()
            )))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(ToolError::permanent(format!(
                "file not found: {}",
                path.display()
            )))
        }
        Err(error) => {
            return Err(ToolError::permanent(format!(
                "cannot read file {}: {error}",
                path.display()
            )))
        }
    }
    let media_type = inputs
        .media_type
        .unwrap_or_else(|| media_type::for_path(&path).to_owned());
    let name = match inputs.name {
        Some(name) => name,
        None => path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| context.task_id.to_string()),
    };
    let table = table_meta(context, &path, &media_type).await;
    let record = context
        .artifacts
        .put_file(
            &path,
            NewArtifact {
                org_id: context.org_id,
                name,
                media_type,
                table,
                produced_by: Some(context.producer()),
                inputs: context.upstream_artifacts(),
            },
        )
        .await
        .map_err(|error| store_error(&format!("cannot store {}", path.display()), error))?;
    Ok(json!({ "artifact": artifact_json(&record)? }))
}

/// Row count and columns of a table file; a file that does not read as a table is stored
/// without them, and a system log line says why.
async fn table_meta(context: &ToolContext, path: &Path, media_type: &str) -> Option<TableMeta> {
    // A JSON document is not necessarily a table: only formats that are tables by
    // definition are inspected.
    let format = match media_type {
        media_type::CSV | media_type::PARQUET | media_type::NDJSON => {
            TableFormat::of_media_type(media_type, path).await?
        }
        _ => return None,
    };
    match inspect_table(path, format).await {
        Ok(meta) => Some(meta),
        Err(error) => {
            let message = format!(
                "cannot read {} as a table, storing it without row count and columns: {}",
                path.display(),
                error.strip_backtrace()
            );
            context.logs.write(LogStream::System, &message).await;
            None
        }
    }
}

async fn fetch(context: &ToolContext, inputs: FetchInputs) -> Result<Value, ToolError> {
    let artifact = resolve_single_artifact(context, &inputs.artifact).await?;
    let destination = absolute_path(&inputs.to)?;
    let size_bytes = copy_artifact_to(context, &artifact, &destination).await?;
    Ok(json!({
        "path": destination.to_string_lossy(),
        "size_bytes": size_bytes,
    }))
}

#[async_trait]
impl Tool for FileTool {
    fn name(&self) -> &str {
        "file"
    }

    fn description(&self) -> &str {
        "store a local file as an artifact, or write an artifact to a local path"
    }

    fn input_schema(&self) -> Value {
        json!({
            "type": "object",
            "oneOf": [
                {
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["path"],
                    "properties": {
                        "path": {"type": "string", "minLength": 1, "description": "local file to store; relative to the process's current directory"},
                        "name": {"type": "string", "minLength": 1, "description": "artifact name; defaults to the file's name"},
                        "media_type": {"type": "string", "minLength": 1, "description": "overrides the media type inferred from the extension"}
                    }
                },
                {
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["artifact", "to"],
                    "properties": {
                        "artifact": {"type": "string", "minLength": 1, "description": "upstream task id, artifact id or name[@version] of an upstream artifact"},
                        "to": {"type": "string", "minLength": 1, "description": "local destination path; relative to the process's current directory"}
                    }
                }
            ]
        })
    }

    fn implied_dependencies(&self, inputs: &Value, task_ids: &[&str]) -> Vec<String> {
        match inputs.get("artifact").and_then(Value::as_str) {
            Some(task) if task_ids.contains(&task) => vec![task.to_owned()],
            _ => Vec::new(),
        }
    }

    async fn execute(&self, context: ToolContext, inputs: Value) -> Result<Value, ToolError> {
        if inputs.get("path").is_some() {
            store(&context, parse_inputs("file", inputs)?).await
        } else if inputs.get("artifact").is_some() {
            fetch(&context, parse_inputs("file", inputs)?).await
        } else {
            Err(ToolError::permanent(
                "invalid file inputs: give either path (to store a file) or artifact and to (to write one out)",
            ))
        }
    }
}
