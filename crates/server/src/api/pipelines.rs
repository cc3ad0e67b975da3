//! Pipelines: create from YAML or JSON, update (a new version), list, get, get a version,
//! validate without saving, archive and restore.

use arches_core::identity::Permission;
use arches_core::pipeline::{validate, Diagnostic, Pipeline};
use arches_core::records::StoredPipeline;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::{IntoParams, ToSchema};

use crate::api::{rfc3339, AuditTarget, Page};
use crate::error::{ApiError, ApiPath, ApiQuery, ErrorCode};
use crate::principal::Principal;
use crate::state::AppState;

/// Longest pipeline source accepted, in bytes.
pub const SOURCE_BYTES_MAX: usize = 1024 * 1024;

/// A stored pipeline version.
#[derive(Debug, Serialize, ToSchema)]
pub struct PipelineVersion {
    /// The pipeline's name, unique in the org.
    pub name: String,
    /// 1, 2, 3… in the order versions were saved.
    pub version: u32,
    /// SHA-256 (hex) of the canonical JSON definition.
    pub digest: String,
    /// When this version was saved (RFC 3339).
    pub created_at: String,
    /// When the pipeline was archived (RFC 3339), if it is.
    pub archived_at: Option<String>,
    /// The definition as canonical JSON (dependencies implied by templates and tools are
    /// written out in `depends_on`).
    #[schema(value_type = Object)]
    pub definition: Value,
}

impl From<StoredPipeline> for PipelineVersion {
    fn from(stored: StoredPipeline) -> Self {
        Self {
            name: stored.name,
            version: stored.version,
            digest: stored.digest,
            created_at: rfc3339(stored.created_at),
            archived_at: stored.archived_at.map(rfc3339),
            definition: stored.definition,
        }
    }
}

/// The result of validating a pipeline source.
#[derive(Debug, Serialize, ToSchema)]
pub struct ValidationReport {
    /// Whether the source is a valid pipeline.
    pub valid: bool,
    /// The pipeline's name, when it could be read.
    pub name: Option<String>,
    /// Every problem found, each with a stable code, line and column, JSON pointer and hint.
    #[schema(value_type = Vec<Object>)]
    pub diagnostics: Vec<Diagnostic>,
}

/// Filters of the pipeline list.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListPipelines {
    /// Also list archived pipelines.
    #[serde(default)]
    pub include_archived: bool,
}

/// Reads a pipeline source from a request body: YAML (`application/yaml`, `text/yaml`) or
/// JSON (`application/json`); without a content type, YAML (a superset of JSON).
fn source_text(headers: &HeaderMap, body: &Bytes) -> Result<(String, String), ApiError> {
    if body.len() > SOURCE_BYTES_MAX {
        return Err(ApiError::payload_too_large(Some(SOURCE_BYTES_MAX)));
    }
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/yaml")
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let file = match content_type.as_str() {
        "application/json" => "pipeline.json",
        "application/yaml" | "application/x-yaml" | "text/yaml" | "text/x-yaml" | "text/plain" => {
            "pipeline.yaml"
        }
        other => {
            return Err(
                ApiError::unsupported_media_type("application/yaml or application/json")
                    .with_detail("content_type", other.to_owned()),
            )
        }
    };
    let text = String::from_utf8(body.to_vec())
        .map_err(|e| ApiError::bad_request(format!("the pipeline source is not UTF-8: {e}")))?;
    Ok((file.to_owned(), text))
}

/// Validates a source against the built-in tools and the org's registered ones, and pins
/// the registered tools it names to their current versions (`name` → `name@version`).
async fn check(
    state: &AppState,
    principal: &Principal,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Pipeline, ApiError> {
    let (file, text) = source_text(headers, body)?;
    let catalog = crate::api::tools::org_catalog(state, principal, &file, &text).await?;
    let mut pipeline = validate::validate(&file, &text, &catalog).map_err(|diagnostics| {
        ApiError::new(
            ErrorCode::ValidationFailed,
            format!(
                "the pipeline has {} problem(s); see details.diagnostics",
                diagnostics.len()
            ),
        )
        .with_details(json!({ "diagnostics": diagnostics }))
    })?;
    catalog.pin(std::sync::Arc::make_mut(&mut pipeline.def));
    Ok(pipeline)
}

/// Validates a pipeline source without saving it.
#[utoipa::path(post, path = "/api/v1/pipelines/validate", tag = "pipelines",
    request_body(content = String, content_type = "application/yaml", description = "Pipeline source, YAML or JSON"),
    responses((status = 200, body = ValidationReport), (status = 415, body = crate::error::ApiErrorBody)))]
pub async fn validate_pipeline(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<ValidationReport>, ApiError> {
    principal.require(Permission::PipelineRead)?;
    let (file, text) = source_text(&headers, &body)?;
    let catalog = crate::api::tools::org_catalog(&state, &principal, &file, &text).await?;
    Ok(Json(match validate::validate(&file, &text, &catalog) {
        Ok(pipeline) => ValidationReport {
            valid: true,
            name: Some(pipeline.def.name.to_string()),
            diagnostics: Vec::new(),
        },
        Err(diagnostics) => ValidationReport {
            valid: false,
            name: None,
            diagnostics,
        },
    }))
}

/// Creates a pipeline (version 1). The name must be new in the org; saving the same
/// definition again is idempotent.
#[utoipa::path(post, path = "/api/v1/pipelines", tag = "pipelines",
    request_body(content = String, content_type = "application/yaml", description = "Pipeline source, YAML or JSON"),
    responses((status = 201, body = PipelineVersion), (status = 409, body = crate::error::ApiErrorBody),
        (status = 422, body = crate::error::ApiErrorBody)))]
pub async fn create_pipeline(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, AuditTarget, Json<PipelineVersion>), ApiError> {
    principal.require(Permission::PipelineWrite)?;
    let pipeline = check(&state, &principal, &headers, &body).await?;
    let name = pipeline.def.name.to_string();
    let existing = state
        .store
        .pipeline_versions(principal.org_id, &name)
        .await?;
    let stored = state
        .store
        .save_pipeline(principal.org_id, &pipeline.def)
        .await?;
    if !existing.is_empty() && existing.iter().all(|v| v.version != stored.version) {
        // Saved as a new version of an existing name: that is an update, which has its own
        // endpoint; the version stays (saving is idempotent), but say so.
        return Err(ApiError::conflict(format!(
            "pipeline {name:?} exists; update it with PUT /api/v1/pipelines/{name}"
        ))
        .with_detail("version", stored.version));
    }
    Ok((
        StatusCode::CREATED,
        AuditTarget::new("pipeline", &name),
        Json(stored.into()),
    ))
}

/// Saves a new version of a pipeline. The source's name must be the path's.
#[utoipa::path(put, path = "/api/v1/pipelines/{name}", tag = "pipelines",
    params(("name" = String, Path, description = "Pipeline name")),
    request_body(content = String, content_type = "application/yaml", description = "Pipeline source, YAML or JSON"),
    responses((status = 200, body = PipelineVersion), (status = 422, body = crate::error::ApiErrorBody)))]
pub async fn update_pipeline(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(AuditTarget, Json<PipelineVersion>), ApiError> {
    principal.require(Permission::PipelineWrite)?;
    let pipeline = check(&state, &principal, &headers, &body).await?;
    if pipeline.def.name.as_str() != name {
        return Err(ApiError::new(
            ErrorCode::ValidationFailed,
            "the pipeline's name differs from the name in the path",
        )
        .with_details(json!({
            "pointer": "/name",
            "expected": name,
            "found": pipeline.def.name.as_str(),
        })));
    }
    let stored = state
        .store
        .save_pipeline(principal.org_id, &pipeline.def)
        .await?;
    Ok((AuditTarget::new("pipeline", &name), Json(stored.into())))
}

/// Lists the latest version of each pipeline, by name.
#[utoipa::path(get, path = "/api/v1/pipelines", tag = "pipelines", params(ListPipelines),
    responses((status = 200, body = Page<PipelineVersion>)))]
pub async fn list_pipelines(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(query): ApiQuery<ListPipelines>,
) -> Result<Json<Page<PipelineVersion>>, ApiError> {
    principal.require(Permission::PipelineRead)?;
    let items = state
        .store
        .pipelines(principal.org_id, query.include_archived)
        .await?;
    Ok(Json(Page {
        items: items.into_iter().map(Into::into).collect(),
        next_cursor: None,
    }))
}

async fn versions(
    state: &AppState,
    principal: &Principal,
    name: &str,
) -> Result<Vec<StoredPipeline>, ApiError> {
    principal.require(Permission::PipelineRead)?;
    let versions = state
        .store
        .pipeline_versions(principal.org_id, name)
        .await?;
    if versions.is_empty() {
        return Err(ApiError::not_found("pipeline", name));
    }
    Ok(versions)
}

/// The latest version of a pipeline.
#[utoipa::path(get, path = "/api/v1/pipelines/{name}", tag = "pipelines",
    params(("name" = String, Path, description = "Pipeline name")),
    responses((status = 200, body = PipelineVersion), (status = 404, body = crate::error::ApiErrorBody)))]
pub async fn get_pipeline(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<PipelineVersion>, ApiError> {
    let mut versions = versions(&state, &principal, &name).await?;
    Ok(Json(versions.swap_remove(0).into()))
}

/// Every version of a pipeline, newest first.
#[utoipa::path(get, path = "/api/v1/pipelines/{name}/versions", tag = "pipelines",
    params(("name" = String, Path, description = "Pipeline name")),
    responses((status = 200, body = Page<PipelineVersion>), (status = 404, body = crate::error::ApiErrorBody)))]
pub async fn list_versions(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Page<PipelineVersion>>, ApiError> {
    let versions = versions(&state, &principal, &name).await?;
    Ok(Json(Page {
        items: versions.into_iter().map(Into::into).collect(),
        next_cursor: None,
    }))
}

/// One version of a pipeline.
#[utoipa::path(get, path = "/api/v1/pipelines/{name}/versions/{version}", tag = "pipelines",
    params(("name" = String, Path, description = "Pipeline name"), ("version" = u32, Path, description = "Version")),
    responses((status = 200, body = PipelineVersion), (status = 404, body = crate::error::ApiErrorBody)))]
pub async fn get_version(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath((name, version)): ApiPath<(String, u32)>,
) -> Result<Json<PipelineVersion>, ApiError> {
    principal.require(Permission::PipelineRead)?;
    let stored = state
        .store
        .pipeline(principal.org_id, &name, version)
        .await?
        .ok_or_else(|| ApiError::not_found("pipeline version", format!("{name}@{version}")))?;
    Ok(Json(stored.into()))
}

/// Archives a pipeline: hidden from lists, and no new runs. Runs already made are kept.
#[utoipa::path(post, path = "/api/v1/pipelines/{name}/archive", tag = "pipelines",
    params(("name" = String, Path, description = "Pipeline name")),
    responses((status = 200, body = PipelineVersion), (status = 404, body = crate::error::ApiErrorBody)))]
pub async fn archive_pipeline(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(name): ApiPath<String>,
) -> Result<(AuditTarget, Json<PipelineVersion>), ApiError> {
    set_archived(state, principal, name, true).await
}

/// Restores an archived pipeline.
#[utoipa::path(post, path = "/api/v1/pipelines/{name}/unarchive", tag = "pipelines",
    params(("name" = String, Path, description = "Pipeline name")),
    responses((status = 200, body = PipelineVersion), (status = 404, body = crate::error::ApiErrorBody)))]
pub async fn unarchive_pipeline(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(name): ApiPath<String>,
) -> Result<(AuditTarget, Json<PipelineVersion>), ApiError> {
    set_archived(state, principal, name, false).await
}

async fn set_archived(
    state: AppState,
    principal: Principal,
    name: String,
    archived: bool,
) -> Result<(AuditTarget, Json<PipelineVersion>), ApiError> {
    principal.require(Permission::PipelineWrite)?;
    let at = archived.then(|| state.clock.now());
    if !state
        .store
        .set_pipeline_archived(principal.org_id, &name, at)
        .await?
    {
        return Err(ApiError::not_found("pipeline", &name));
    }
    let mut versions = versions(&state, &principal, &name).await?;
    Ok((
        AuditTarget::new("pipeline", &name),
        Json(versions.swap_remove(0).into()),
    ))
}
