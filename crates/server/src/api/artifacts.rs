//! Artifacts: list, metadata, download (with HTTP Range) and lineage.

use std::collections::{BTreeMap, VecDeque};

use arches_core::identity::Permission;
use arches_core::records::{ArtifactFilter, ArtifactRecord};
use arches_core::ArtifactId;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::{CONTENT_DISPOSITION, CONTENT_TYPE};
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tower::ServiceExt;
use tower_http::services::ServeFile;
use utoipa::{IntoParams, ToSchema};

use crate::api::{parse_run_id, rfc3339, Page};
use crate::error::{ApiError, ApiPath, ApiQuery};
use crate::principal::Principal;
use crate::state::AppState;

/// Most nodes a lineage answer holds.
pub const LINEAGE_NODES_MAX: usize = 200;
/// Default and largest page of artifacts.
const ARTIFACTS_PAGE_DEFAULT: u32 = 50;
const ARTIFACTS_PAGE_MAX: u32 = 1000;

/// An artifact version's metadata.
#[derive(Debug, Serialize, ToSchema)]
pub struct ArtifactView {
    /// Its id.
    pub id: String,
    /// Its name; versions count per name.
    pub name: String,
    /// 1, 2, 3…
    pub version: u32,
    /// SHA-256 of the content, hex.
    pub digest: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// IANA media type.
    pub media_type: String,
    /// Rows and columns, for tables.
    #[schema(value_type = Option<Object>)]
    pub table: Option<Value>,
    /// The run, task run, task and attempt that produced it.
    #[schema(value_type = Option<Object>)]
    pub produced_by: Option<Value>,
    /// The artifacts it was made from.
    pub inputs: Vec<String>,
    /// RFC 3339.
    pub created_at: String,
}

impl From<ArtifactRecord> for ArtifactView {
    fn from(a: ArtifactRecord) -> Self {
        Self {
            id: a.id.to_string(),
            name: a.meta.name,
            version: a.version,
            digest: a.digest,
            size_bytes: a.size_bytes,
            media_type: a.meta.media_type,
            table: a.meta.table.and_then(|t| serde_json::to_value(t).ok()),
            produced_by: a
                .meta
                .produced_by
                .and_then(|p| serde_json::to_value(p).ok()),
            inputs: a.meta.inputs.iter().map(ToString::to_string).collect(),
            created_at: rfc3339(a.created_at),
        }
    }
}

/// Filters of the artifact list.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListArtifacts {
    /// Only versions of this name.
    pub name: Option<String>,
    /// Only artifacts produced by this run.
    pub run_id: Option<String>,
    /// Page size: 1 to 1,000, default 50.
    pub limit: Option<u32>,
}

/// An artifact's lineage: it, and the artifacts it was made from, transitively.
#[derive(Debug, Serialize, ToSchema)]
pub struct Lineage {
    /// The artifact asked about.
    pub artifact: ArtifactView,
    /// Every upstream artifact, nearest first (at most 200).
    pub upstream: Vec<ArtifactView>,
    /// `[from, to]` pairs: `from` was an input of `to`.
    pub edges: Vec<[String; 2]>,
    /// Whether the walk stopped at the node bound.
    pub truncated: bool,
}

async fn org_artifact(
    state: &AppState,
    principal: &Principal,
    id: &str,
) -> Result<ArtifactRecord, ApiError> {
    let artifact_id: ArtifactId = id
        .parse()
        .map_err(|_| ApiError::not_found("artifact", id))?;
    state
        .store
        .artifact(artifact_id)
        .await?
        .filter(|a| a.meta.org_id == principal.org_id)
        .ok_or_else(|| ApiError::not_found("artifact", id))
}

/// Lists artifact versions, newest first.
#[utoipa::path(get, path = "/api/v1/artifacts", tag = "artifacts", params(ListArtifacts),
    responses((status = 200, body = Page<ArtifactView>)))]
pub async fn list_artifacts(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(query): ApiQuery<ListArtifacts>,
) -> Result<Json<Page<ArtifactView>>, ApiError> {
    principal.require(Permission::ArtifactRead)?;
    let run_id = query.run_id.as_deref().map(parse_run_id).transpose()?;
    let limit = query
        .limit
        .unwrap_or(ARTIFACTS_PAGE_DEFAULT)
        .clamp(1, ARTIFACTS_PAGE_MAX);
    let items = state
        .store
        .artifacts(&ArtifactFilter {
            org_id: Some(principal.org_id),
            name: query.name,
            run_id,
            limit,
        })
        .await?;
    Ok(Json(Page {
        items: items.into_iter().map(Into::into).collect(),
        next_cursor: None,
    }))
}

/// One artifact's metadata.
#[utoipa::path(get, path = "/api/v1/artifacts/{id}", tag = "artifacts",
    params(("id" = String, Path, description = "Artifact id")),
    responses((status = 200, body = ArtifactView), (status = 404, body = crate::error::ApiErrorBody)))]
pub async fn get_artifact(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ArtifactView>, ApiError> {
    principal.require(Permission::ArtifactRead)?;
    Ok(Json(org_artifact(&state, &principal, &id).await?.into()))
}

/// The artifact's content. Honours `Range` (206 Partial Content, 416 when unsatisfiable)
/// and conditional requests; the `Content-Type` is the artifact's media type.
#[utoipa::path(get, path = "/api/v1/artifacts/{id}/content", tag = "artifacts",
    params(("id" = String, Path, description = "Artifact id")),
    responses((status = 200, description = "The content"), (status = 206, description = "A range of the content"),
        (status = 404, body = crate::error::ApiErrorBody), (status = 416, body = crate::error::ApiErrorBody)))]
pub async fn download_artifact(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
    request: Request,
) -> Result<Response, ApiError> {
    principal.require(Permission::ArtifactRead)?;
    let artifact = org_artifact(&state, &principal, &id).await?;
    let path = state.artifacts.local_path(artifact.id).await?;
    let mime = artifact
        .meta
        .media_type
        .parse::<HeaderValue>()
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    let response = ServeFile::new(path)
        .oneshot(request)
        .await
        .map_err(ApiError::internal)?;
    let status = response.status();
    if status == axum::http::StatusCode::RANGE_NOT_SATISFIABLE {
        return Err(ApiError::range_not_satisfiable(format!(
            "the range is outside the artifact's {} bytes",
            artifact.size_bytes
        )));
    }
    let mut response = response.map(Body::new).into_response();
    if status.is_success() {
        let file_name: String = artifact
            .meta
            .name
            .rsplit('/')
            .next()
            .unwrap_or("artifact")
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            .collect();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, mime);
        if let Ok(value) = HeaderValue::from_str(&format!(
            "attachment; filename=\"{file_name}-v{}\"",
            artifact.version
        )) {
            headers.insert(CONTENT_DISPOSITION, value);
        }
    }
    Ok(response)
}

/// The artifact's lineage: the artifacts it was made from, transitively (breadth first, at
/// most 200).
#[utoipa::path(get, path = "/api/v1/artifacts/{id}/lineage", tag = "artifacts",
    params(("id" = String, Path, description = "Artifact id")),
    responses((status = 200, body = Lineage), (status = 404, body = crate::error::ApiErrorBody)))]
pub async fn artifact_lineage(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Lineage>, ApiError> {
    principal.require(Permission::ArtifactRead)?;
    let artifact = org_artifact(&state, &principal, &id).await?;
    let mut seen: BTreeMap<ArtifactId, ArtifactRecord> = BTreeMap::new();
    let mut order = Vec::new();
    let mut edges = Vec::new();
    let mut queue: VecDeque<ArtifactRecord> = VecDeque::from([artifact.clone()]);
    let mut truncated = false;
    while let Some(node) = queue.pop_front() {
        for input in &node.meta.inputs {
            edges.push([input.to_string(), node.id.to_string()]);
            if seen.contains_key(input) || *input == artifact.id {
                continue;
            }
            if seen.len() >= LINEAGE_NODES_MAX {
                truncated = true;
                continue;
            }
            if let Some(upstream) = state
                .store
                .artifact(*input)
                .await?
                .filter(|a| a.meta.org_id == principal.org_id)
            {
                seen.insert(*input, upstream.clone());
                order.push(*input);
                queue.push_back(upstream);
            }
        }
    }
    Ok(Json(Lineage {
        artifact: artifact.into(),
        upstream: order
            .into_iter()
            .filter_map(|id| seen.remove(&id))
            .map(Into::into)
            .collect(),
        edges,
        truncated,
    }))
}
