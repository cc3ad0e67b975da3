//! Helpers shared by the built-in tools: input parsing, store error mapping, artifact
//! references and paths.
//!
//! An artifact reference is resolved only against what a tool can see: the outputs of its
//! direct upstream tasks (`ToolContext::upstream`) and artifact ids through the artifact port.
//! The artifact port has no lookup by name, so `<name>[@version]` is matched against the
//! artifacts of the upstream outputs.

use std::path::{Component, Path, PathBuf};

use arches_core::ids::ArtifactId;
use arches_core::ports::{StoreError, ToolContext, ToolError};
use arches_core::records::ArtifactRecord;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Parses a tool's inputs; a mismatch is a permanent error naming the tool and the field.
pub(crate) fn parse_inputs<T: DeserializeOwned>(tool: &str, inputs: Value) -> Result<T, ToolError> {
    serde_json::from_value(inputs)
        .map_err(|error| ToolError::permanent(format!("invalid {tool} inputs: {error}")))
}

/// Maps an error of the artifact port: an unreachable or full store may recover, anything
/// else will not.
pub(crate) fn store_error(what: &str, error: StoreError) -> ToolError {
    let message = format!("{what}: {error}");
    match error {
        StoreError::Unavailable(_) | StoreError::DiskFull(_) | StoreError::Backend(_) => {
            ToolError::transient(message)
        }
        StoreError::Conflict(_) | StoreError::NotFound(_) | StoreError::Corrupt(_) => {
            ToolError::permanent(message)
        }
    }
}

/// An artifact record as JSON, the shape tools put under `"artifact"` in their outputs.
pub(crate) fn artifact_json(record: &ArtifactRecord) -> Result<Value, ToolError> {
    serde_json::to_value(record)
        .map_err(|error| ToolError::permanent(format!("cannot serialize artifact record: {error}")))
}

/// What a tool needs to know of an artifact it reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ArtifactHandle {
    /// The version's id.
    pub id: ArtifactId,
    /// The artifact's name.
    pub name: String,
    /// The version, when the record carried it.
    pub version: Option<u32>,
    /// The media type; `application/octet-stream` when the record lacked it.
    pub media_type: String,
}

impl ArtifactHandle {
    fn from_json(value: &Value) -> Option<Self> {
        let id = value.get("id")?.as_str()?.parse().ok()?;
        Some(Self {
            id,
            name: value
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            version: value
                .get("version")
                .and_then(Value::as_u64)
                .and_then(|v| u32::try_from(v).ok()),
            media_type: value
                .get("media_type")
                .and_then(Value::as_str)
                .unwrap_or(crate::media_type::OCTET_STREAM)
                .to_owned(),
        })
    }

    fn from_record(record: &ArtifactRecord) -> Self {
        Self {
            id: record.id,
            name: record.meta.name.clone(),
            version: Some(record.version),
            media_type: record.meta.media_type.clone(),
        }
    }

    /// `name@version`, or the id when the record had no name.
    pub fn label(&self) -> String {
        match (self.name.is_empty(), self.version) {
            (true, _) => self.id.to_string(),
            (false, Some(version)) => format!("{}@{version}", self.name),
            (false, None) => self.name.clone(),
        }
    }
}

/// The artifacts of one task's outputs: the `"artifact"` object and the `"artifacts"` array
/// at the top of the outputs; for a fan-out (an array of item outputs), those of every item
/// in order.
pub(crate) fn artifacts_in_outputs(outputs: &Value) -> Vec<ArtifactHandle> {
    let mut found = Vec::new();
    collect_handles(outputs, &mut found);
    found
}

fn collect_handles(outputs: &Value, found: &mut Vec<ArtifactHandle>) {
    match outputs {
        Value::Array(items) => items.iter().for_each(|item| collect_handles(item, found)),
        Value::Object(map) => {
            if let Some(handle) = map.get("artifact").and_then(ArtifactHandle::from_json) {
                found.push(handle);
            }
            if let Some(Value::Array(list)) = map.get("artifacts") {
                found.extend(list.iter().filter_map(ArtifactHandle::from_json));
            }
        }
        _ => {}
    }
}

/// The artifacts of a direct upstream task; an error names the known upstream tasks when
/// `task` is not one of them.
pub(crate) fn upstream_task_artifacts(
    context: &ToolContext,
    task: &str,
) -> Result<Vec<ArtifactHandle>, ToolError> {
    match context.upstream.get(task) {
        Some(outputs) => Ok(artifacts_in_outputs(outputs)),
        None => Err(ToolError::permanent(format!(
            "{task:?} is not a direct upstream task (upstream tasks: {})",
            upstream_list(context)
        ))),
    }
}

fn upstream_list(context: &ToolContext) -> String {
    if context.upstream.is_empty() {
        return "none".to_owned();
    }
    context
        .upstream
        .keys()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Resolves an artifact reference: an upstream task id (its artifacts), an artifact id, or
/// `<name>[@version]` matched against the artifacts of the upstream outputs (the latest
/// version there when no version is given).
pub(crate) async fn resolve_artifact_reference(
    context: &ToolContext,
    reference: &str,
) -> Result<Vec<ArtifactHandle>, ToolError> {
    if let Some(outputs) = context.upstream.get(reference) {
        let found = artifacts_in_outputs(outputs);
        if found.is_empty() {
            return Err(ToolError::permanent(format!(
                "upstream task {reference:?} has no artifact in its outputs"
            )));
        }
        return Ok(found);
    }
    if let Ok(id) = reference.parse::<ArtifactId>() {
        let record = context
            .artifacts
            .get(id)
            .await
            .map_err(|error| store_error(&format!("cannot read artifact {id}"), error))?;
        return Ok(vec![ArtifactHandle::from_record(&record)]);
    }
    let (name, version) = match reference.rsplit_once('@') {
        Some((name, version)) => match version.parse::<u32>() {
            Ok(version) => (name, Some(version)),
            Err(_) => (reference, None),
        },
        None => (reference, None),
    };
    let candidates = context
        .upstream
        .values()
        .flat_map(artifacts_in_outputs)
        .filter(|handle| handle.name == name && (version.is_none() || handle.version == version));
    match candidates.max_by_key(|handle| handle.version) {
        Some(handle) => Ok(vec![handle]),
        None => Err(ToolError::permanent(format!(
            "artifact {reference:?} is neither an upstream task, an artifact id, nor the name of an \
             artifact in the outputs of the upstream tasks ({})",
            upstream_list(context)
        ))),
    }
}

/// Like [`resolve_artifact_reference`], but exactly one artifact must match.
pub(crate) async fn resolve_single_artifact(
    context: &ToolContext,
    reference: &str,
) -> Result<ArtifactHandle, ToolError> {
    let mut found = resolve_artifact_reference(context, reference).await?;
    if found.len() == 1 {
        return Ok(found.remove(0));
    }
    let labels: Vec<String> = found.iter().map(ArtifactHandle::label).collect();
    Err(ToolError::permanent(format!(
        "{reference:?} holds {} artifacts ({}); name one as <name>[@version]",
        found.len(),
        labels.join(", ")
    )))
}

/// A path inside a working directory: relative, without `..`. Scripts and tools must not
/// place or collect files outside the attempt's directory through a declared name.
pub(crate) fn relative_path(what: &str, value: &str) -> Result<PathBuf, ToolError> {
    let path = Path::new(value);
    let mut normal = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => normal.push(part),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(ToolError::permanent(format!(
                    "{what} {value:?} must be a relative path inside the working directory"
                )));
            }
        }
    }
    if normal.as_os_str().is_empty() {
        return Err(ToolError::permanent(format!(
            "{what} {value:?} names no file"
        )));
    }
    Ok(normal)
}

/// A path made absolute against the process's current directory.
pub(crate) fn absolute_path(value: &str) -> Result<PathBuf, ToolError> {
    std::path::absolute(value)
        .map_err(|error| ToolError::permanent(format!("cannot resolve path {value:?}: {error}")))
}

/// Copies an artifact's content to `destination`, creating parent directories; returns the
/// number of bytes copied. The content is copied, never linked: a script that edits its copy
/// must not change the stored blob.
pub(crate) async fn copy_artifact_to(
    context: &ToolContext,
    artifact: &ArtifactHandle,
    destination: &Path,
) -> Result<u64, ToolError> {
    let source = context
        .artifacts
        .local_path(artifact.id)
        .await
        .map_err(|error| {
            store_error(&format!("cannot read artifact {}", artifact.label()), error)
        })?;
    if let Some(parent) = destination.parent() {
        tokio::fs::create_dir_all(parent).await.map_err(|error| {
            ToolError::permanent(format!(
                "cannot create directory {}: {error}",
                parent.display()
            ))
        })?;
    }
    // tokio::fs::copy runs the copy on the blocking pool.
    tokio::fs::copy(&source, destination)
        .await
        .map_err(|error| {
            ToolError::permanent(format!(
                "cannot copy artifact {} to {}: {error}",
                artifact.label(),
                destination.display()
            ))
        })
}
