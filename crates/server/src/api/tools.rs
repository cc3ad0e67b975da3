//! Tools and secrets: the built-in and registered tools of the org, registration of WASM
//! modules and HTTP endpoints with their schemas and capabilities, module upload (as an
//! artifact), and the org's secrets (set, list without values, delete, re-seal).

use arches_core::identity::Permission;
use arches_core::records::NewArtifact;
use arches_core::tooldef::{
    StoredSecret, StoredTool, ToolImplementation, ToolManifest, SECRET_VALUE_MAX_BYTES,
    SECRET_VALUE_MIN_BYTES,
};
use arches_core::SecretName;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::api::artifacts::ArtifactView;
use crate::api::{rfc3339, AuditTarget};
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use crate::principal::Principal;
use crate::registry::{open_secret, secret_aad, OrgCatalog};
use crate::state::AppState;

/// Longest manifest accepted, in bytes.
pub const MANIFEST_BYTES_MAX: usize = 64 * 1024;

/// Most tool names one org may register (versions of a name do not count).
pub const TOOLS_PER_ORG_MAX: usize = 500;

/// Most secrets one org may hold.
pub const SECRETS_PER_ORG_MAX: usize = 1000;

/// The OpenAPI paths of this module.
#[derive(OpenApi)]
#[openapi(
    paths(
        list_tools,
        register_tool,
        get_tool,
        list_tool_versions,
        get_tool_version,
        upload_artifact,
        list_secrets,
        set_secret,
        delete_secret,
        rotate_secrets
    ),
    components(schemas(ToolView, SecretView, SetSecret, RotationReport))
)]
pub struct ToolsApi;

/// The routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/tools", get(list_tools).post(register_tool))
        .route("/api/v1/tools/{name}", get(get_tool))
        .route("/api/v1/tools/{name}/versions", get(list_tool_versions))
        .route(
            "/api/v1/tools/{name}/versions/{version}",
            get(get_tool_version),
        )
        .route("/api/v1/secrets", get(list_secrets))
        .route("/api/v1/secrets/rotate", post(rotate_secrets))
        .route(
            "/api/v1/secrets/{name}",
            put(set_secret).delete(delete_secret),
        )
}

/// A tool: built in (`kind: builtin`, no version) or registered by the org (`wasm` or
/// `http`, with its version and manifest).
#[derive(Debug, Serialize, ToSchema)]
pub struct ToolView {
    /// The name pipelines use.
    pub name: String,
    /// `builtin`, `wasm`, `http` or `mcp`.
    pub kind: String,
    /// The registered version (absent for built-in tools).
    pub version: Option<u32>,
    /// `name@version` as stored pipelines name it (the name for built-in tools).
    pub reference: String,
    /// One line.
    pub description: String,
    /// The sandboxes the tool runs code in (`wasm`, `process`); empty for tools that run
    /// only the worker's own code.
    pub sandboxes: Vec<String>,
    /// JSON Schema of the inputs.
    #[schema(value_type = Object)]
    pub input_schema: Value,
    /// JSON Schema of the outputs (registered tools).
    #[schema(value_type = Option<Object>)]
    pub output_schema: Option<Value>,
    /// What it may touch (registered tools).
    #[schema(value_type = Option<Object>)]
    pub capabilities: Option<Value>,
    /// How it runs (registered tools): `{"wasm": {"module": id}}` or `{"http": {...}}`.
    #[schema(value_type = Option<Object>)]
    pub implementation: Option<Value>,
    /// SHA-256 (hex) of the canonical manifest (registered tools).
    pub digest: Option<String>,
    /// When this version was registered (RFC 3339).
    pub created_at: Option<String>,
}

impl ToolView {
    fn registered(stored: &StoredTool) -> Result<Self, ApiError> {
        let manifest = stored.decode().map_err(ApiError::internal)?;
        let sandboxes = match manifest.implementation {
            ToolImplementation::Wasm { .. } => vec!["wasm".to_owned()],
            ToolImplementation::Http { .. } | ToolImplementation::Mcp { .. } => Vec::new(),
        };
        Ok(Self {
            name: stored.name.clone(),
            kind: manifest.implementation.kind().to_owned(),
            version: Some(stored.version),
            reference: stored.reference(),
            description: manifest.description.clone(),
            sandboxes,
            input_schema: manifest.input_schema.clone(),
            output_schema: Some(manifest.output_schema.clone()),
            capabilities: serde_json::to_value(&manifest.capabilities).ok(),
            implementation: serde_json::to_value(&manifest.implementation).ok(),
            digest: Some(stored.digest.clone()),
            created_at: Some(rfc3339(stored.created_at)),
        })
    }

    fn builtin(tool: &dyn arches_core::ports::Tool) -> Self {
        Self {
            name: tool.name().to_owned(),
            kind: "builtin".to_owned(),
            version: None,
            reference: tool.name().to_owned(),
            description: tool.description().to_owned(),
            sandboxes: tool
                .sandboxes()
                .iter()
                .map(|s| s.as_str().to_owned())
                .collect(),
            input_schema: tool.input_schema(),
            output_schema: None,
            capabilities: None,
            implementation: None,
            digest: None,
            created_at: None,
        }
    }
}

/// Lists the built-in tools and the latest version of each of the org's registered tools,
/// by name.
#[utoipa::path(get, path = "/api/v1/tools", tag = "tools",
    responses((status = 200, body = Vec<ToolView>)))]
pub async fn list_tools(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Json<Vec<ToolView>>, ApiError> {
    principal.require(Permission::ToolRead)?;
    let mut views: Vec<ToolView> = state
        .tools
        .tools()
        .map(|tool| ToolView::builtin(tool.as_ref()))
        .collect();
    for stored in state.store.tools(principal.org_id).await? {
        views.push(ToolView::registered(&stored)?);
    }
    views.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(views))
}

/// Reads a manifest from a request body: JSON, or YAML (the default).
fn read_manifest(headers: &HeaderMap, body: &Bytes) -> Result<ToolManifest, ApiError> {
    if body.len() > MANIFEST_BYTES_MAX {
        return Err(ApiError::payload_too_large(Some(MANIFEST_BYTES_MAX)));
    }
    let text = std::str::from_utf8(body)
        .map_err(|e| ApiError::bad_request(format!("the manifest is not UTF-8: {e}")))?;
    let json_body = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("application/json"));
    let value: Value = if json_body {
        serde_json::from_str(text)
            .map_err(|e| ApiError::bad_request(format!("the manifest is not valid JSON: {e}")))?
    } else {
        let (value, _map) = arches_core::pipeline::source::parse_document("tool.yaml", text)
            .map_err(|d| {
                ApiError::bad_request("the manifest is not valid YAML or JSON")
                    .with_details(json!({ "diagnostics": d }))
            })?;
        value
    };
    serde_path_to_error::deserialize::<_, ToolManifest>(&value).map_err(|error| {
        let pointer = pointer_of(error.path());
        ApiError::validation(json!({
            "problems": [{"pointer": pointer, "message": error.inner().to_string()}]
        }))
    })
}

/// The JSON pointer of a serde path.
fn pointer_of(path: &serde_path_to_error::Path) -> String {
    let mut pointer = String::new();
    for segment in path.iter() {
        match segment {
            serde_path_to_error::Segment::Seq { index } => {
                pointer.push('/');
                pointer.push_str(&index.to_string());
            }
            serde_path_to_error::Segment::Map { key } => {
                pointer.push('/');
                pointer.push_str(&key.replace('~', "~0").replace('/', "~1"));
            }
            _ => {}
        }
    }
    pointer
}

/// Registers a tool from its manifest (YAML or JSON): a new name at version 1, a changed
/// manifest as the next version; a manifest identical to a stored version returns that
/// version with 200. Every problem is reported at once with its JSON pointer in
/// `details.problems`.
#[utoipa::path(post, path = "/api/v1/tools", tag = "tools",
    request_body(content = String, content_type = "application/yaml", description = "Tool manifest, YAML or JSON"),
    responses((status = 201, body = ToolView), (status = 200, body = ToolView),
        (status = 422, body = crate::error::ApiErrorBody)))]
pub async fn register_tool(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, AuditTarget, Json<ToolView>), ApiError> {
    principal.require(Permission::ToolRegister)?;
    let manifest = read_manifest(&headers, &body)?;
    let mut reserved: Vec<&str> = state.tools.names().collect();
    reserved.extend(arches_tools::RESERVED_TOOL_NAMES);
    let mut problems: Vec<Value> =
        arches_tools::check_manifest(&manifest, &reserved, &state.executors)
            .into_iter()
            .map(|p| json!({"pointer": p.pointer, "message": p.message}))
            .collect();
    if let ToolImplementation::Wasm { module } = &manifest.implementation {
        if let Some(problem) = check_module(&state, &principal, *module).await? {
            problems.push(json!({"pointer": "/implementation/wasm/module", "message": problem}));
        }
    }
    if !problems.is_empty() {
        return Err(ApiError::new(
            crate::error::ErrorCode::ValidationFailed,
            format!(
                "the tool manifest has {} problem(s); see details.problems",
                problems.len()
            ),
        )
        .with_details(json!({ "problems": problems })));
    }
    let value = serde_json::to_value(&manifest).map_err(ApiError::internal)?;
    let existing = state
        .store
        .tool(principal.org_id, manifest.name.as_str(), None)
        .await?;
    if existing.is_none() && state.store.tools(principal.org_id).await?.len() >= TOOLS_PER_ORG_MAX {
        return Err(ApiError::conflict(format!(
            "the org has {TOOLS_PER_ORG_MAX} tools, the most it may register"
        )));
    }
    let stored = state
        .store
        .save_tool(principal.org_id, &manifest.name, &value)
        .await?;
    let new = existing.is_none_or(|e| e.version < stored.version);
    let status = if new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        AuditTarget::new("tool", stored.reference()),
        Json(ToolView::registered(&stored)?),
    ))
}

/// Checks a module artifact: the org's, and a module the wasm runtime compiles. `Some`
/// names the problem.
async fn check_module(
    state: &AppState,
    principal: &Principal,
    module: arches_core::ArtifactId,
) -> Result<Option<String>, ApiError> {
    let Some(record) = state
        .store
        .artifact(module)
        .await?
        .filter(|a| a.meta.org_id == principal.org_id)
    else {
        return Ok(Some(format!(
            "artifact {module} is not in this org; upload the module with POST /api/v1/artifacts first"
        )));
    };
    let Some(wasm) = &state.executors.wasm else {
        return Ok(None);
    };
    let limit = arches_tools::wasm::MODULE_FILE_BYTES_MAX;
    if record.size_bytes > limit {
        return Ok(Some(format!(
            "the module is {} bytes; at most {limit}",
            record.size_bytes
        )));
    }
    let bytes = state.artifacts.read(module, limit).await?;
    Ok(wasm.prepare(&bytes).await.err().map(|error| {
        format!(
            "artifact {module} is not a usable module: {}",
            error.message
        )
    }))
}

/// A built-in tool, or the latest version of a registered one.
#[utoipa::path(get, path = "/api/v1/tools/{name}", tag = "tools",
    params(("name" = String, Path, description = "Tool name")),
    responses((status = 200, body = ToolView), (status = 404, body = crate::error::ApiErrorBody)))]
pub async fn get_tool(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<ToolView>, ApiError> {
    principal.require(Permission::ToolRead)?;
    if let Some(tool) = state.tools.get(&name) {
        return Ok(Json(ToolView::builtin(tool.as_ref())));
    }
    let stored = state
        .store
        .tool(principal.org_id, &name, None)
        .await?
        .ok_or_else(|| ApiError::not_found("tool", &name))?;
    Ok(Json(ToolView::registered(&stored)?))
}

/// Every version of a registered tool, newest first.
#[utoipa::path(get, path = "/api/v1/tools/{name}/versions", tag = "tools",
    params(("name" = String, Path, description = "Tool name")),
    responses((status = 200, body = Vec<ToolView>), (status = 404, body = crate::error::ApiErrorBody)))]
pub async fn list_tool_versions(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Vec<ToolView>>, ApiError> {
    principal.require(Permission::ToolRead)?;
    let versions = state.store.tool_versions(principal.org_id, &name).await?;
    if versions.is_empty() {
        return Err(ApiError::not_found("tool", &name));
    }
    versions
        .iter()
        .map(ToolView::registered)
        .collect::<Result<Vec<_>, _>>()
        .map(Json)
}

/// One version of a registered tool.
#[utoipa::path(get, path = "/api/v1/tools/{name}/versions/{version}", tag = "tools",
    params(("name" = String, Path, description = "Tool name"), ("version" = u32, Path, description = "Version")),
    responses((status = 200, body = ToolView), (status = 404, body = crate::error::ApiErrorBody)))]
pub async fn get_tool_version(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath((name, version)): ApiPath<(String, u32)>,
) -> Result<Json<ToolView>, ApiError> {
    principal.require(Permission::ToolRead)?;
    let stored = state
        .store
        .tool(principal.org_id, &name, Some(version))
        .await?
        .ok_or_else(|| ApiError::not_found("tool", format!("{name}@{version}")))?;
    Ok(Json(ToolView::registered(&stored)?))
}

/// Where an uploaded artifact goes.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UploadArtifact {
    /// The artifact's name; versions count per name.
    pub name: String,
    /// Its media type; by default the request's `Content-Type`, else
    /// `application/octet-stream`.
    pub media_type: Option<String>,
}

/// Uploads an artifact (the raw request body, up to the server's body limit): a WASM
/// module to register as a tool, or a data file for pipelines. Returns its metadata; the
/// content is stored by SHA-256.
#[utoipa::path(post, path = "/api/v1/artifacts", tag = "artifacts", params(UploadArtifact),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, body = ArtifactView), (status = 422, body = crate::error::ApiErrorBody)))]
pub async fn upload_artifact(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(query): ApiQuery<UploadArtifact>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, AuditTarget, Json<ArtifactView>), ApiError> {
    principal.require(Permission::ArtifactWrite)?;
    let name = query.name.trim();
    if name.is_empty() || name.len() > 256 || name.contains(['/', '\\', '\0']) {
        return Err(ApiError::validation(json!({
            "fields": {"name": "must be 1 to 256 characters without / \\ or NUL"}
        })));
    }
    let media_type = query
        .media_type
        .or_else(|| {
            headers
                .get(axum::http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.split(';').next().unwrap_or(v).trim().to_owned())
        })
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| "application/octet-stream".to_owned());
    let record = state
        .artifacts
        .put_bytes(
            body.to_vec(),
            NewArtifact {
                org_id: principal.org_id,
                name: name.to_owned(),
                media_type,
                table: None,
                produced_by: None,
                inputs: Vec::new(),
            },
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        AuditTarget::new("artifact", record.id),
        Json(record.into()),
    ))
}

/// A secret as the API shows it: never its value.
#[derive(Debug, Serialize, ToSchema)]
pub struct SecretView {
    /// Its name.
    pub name: String,
    /// 1 when created, +1 on every new value.
    pub version: u32,
    /// The id of the master key that sealed it.
    pub key_id: String,
    /// When it was first set (RFC 3339).
    pub created_at: String,
    /// When its value last changed (RFC 3339).
    pub updated_at: String,
}

impl From<&StoredSecret> for SecretView {
    fn from(secret: &StoredSecret) -> Self {
        Self {
            name: secret.name.to_string(),
            version: secret.version,
            key_id: secret.key_id.clone(),
            created_at: rfc3339(secret.created_at),
            updated_at: rfc3339(secret.updated_at),
        }
    }
}

/// A secret's new value.
#[derive(ToSchema)]
pub struct SetSecret {
    /// The value: UTF-8 text of 4 bytes to 64 KiB.
    pub value: String,
}

impl SetSecret {
    /// Reads `{"value": "…"}`; an error never quotes what was sent.
    fn read(body: Value) -> Result<Self, ApiError> {
        let refuse = || {
            ApiError::validation(
                json!({"fields": {"value": "the body must be {\"value\": \"<text>\"} and nothing else"}}),
            )
        };
        let Value::Object(mut map) = body else {
            return Err(refuse());
        };
        match (map.remove("value"), map.is_empty()) {
            (Some(Value::String(value)), true) => Ok(Self { value }),
            _ => Err(refuse()),
        }
    }
}

/// Lists the org's secrets by name, without their values.
#[utoipa::path(get, path = "/api/v1/secrets", tag = "secrets",
    responses((status = 200, body = Vec<SecretView>)))]
pub async fn list_secrets(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Json<Vec<SecretView>>, ApiError> {
    principal.require(Permission::SecretRead)?;
    let secrets = state.store.secrets(Some(principal.org_id)).await?;
    Ok(Json(secrets.iter().map(SecretView::from).collect()))
}

fn keyring(state: &AppState) -> Result<&arches_auth::sealing::Keyring, ApiError> {
    state.keyring.as_deref().ok_or_else(|| {
        ApiError::conflict(
            "this server has no master key for secrets; set [secrets] keys (ARCHES_SECRETS__KEYS)",
        )
    })
}

fn secret_name(name: &str) -> Result<SecretName, ApiError> {
    SecretName::parse(name)
        .map_err(|error| ApiError::validation(json!({"fields": {"name": error.to_string()}})))
}

/// Sets a secret's value (creating it, or replacing its value: version + 1), sealed with
/// the active master key. The value is never returned or logged.
#[utoipa::path(put, path = "/api/v1/secrets/{name}", tag = "secrets",
    params(("name" = String, Path, description = "Secret name")),
    request_body = SetSecret,
    responses((status = 200, body = SecretView), (status = 409, body = crate::error::ApiErrorBody),
        (status = 201, body = SecretView), (status = 422, body = crate::error::ApiErrorBody)))]
pub async fn set_secret(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(name): ApiPath<String>,
    ApiJson(body): ApiJson<Value>,
) -> Result<(StatusCode, AuditTarget, Json<SecretView>), ApiError> {
    principal.require(Permission::SecretWrite)?;
    let name = secret_name(&name)?;
    let body = SetSecret::read(body)?;
    let length = body.value.len();
    if !(SECRET_VALUE_MIN_BYTES..=SECRET_VALUE_MAX_BYTES).contains(&length) {
        return Err(ApiError::validation(json!({"fields": {"value": format!(
            "must be {SECRET_VALUE_MIN_BYTES} to {SECRET_VALUE_MAX_BYTES} bytes (shorter values \
             could not be masked in logs), got {length}"
        )}})));
    }
    let keyring = keyring(&state)?;
    if state
        .store
        .secret(principal.org_id, name.as_str())
        .await?
        .is_none()
        && state.store.secrets(Some(principal.org_id)).await?.len() >= SECRETS_PER_ORG_MAX
    {
        return Err(ApiError::conflict(format!(
            "the org has {SECRETS_PER_ORG_MAX} secrets, the most it may hold"
        )));
    }
    let sealed = keyring
        .seal(
            body.value.as_bytes(),
            &secret_aad(principal.org_id, name.as_str()),
        )
        .map_err(ApiError::internal)?;
    let stored = state
        .store
        .put_secret(
            principal.org_id,
            &name,
            &sealed.key_id,
            &sealed.nonce,
            &sealed.ciphertext,
        )
        .await?;
    let status = if stored.version == 1 {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        AuditTarget::new("secret", &name),
        Json(SecretView::from(&stored)),
    ))
}

/// Deletes a secret. Tools naming it fail until it is set again.
#[utoipa::path(delete, path = "/api/v1/secrets/{name}", tag = "secrets",
    params(("name" = String, Path, description = "Secret name")),
    responses((status = 204), (status = 404, body = crate::error::ApiErrorBody)))]
pub async fn delete_secret(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(name): ApiPath<String>,
) -> Result<(AuditTarget, StatusCode), ApiError> {
    principal.require(Permission::SecretWrite)?;
    if !state.store.delete_secret(principal.org_id, &name).await? {
        return Err(ApiError::not_found("secret", &name));
    }
    Ok((AuditTarget::new("secret", &name), StatusCode::NO_CONTENT))
}

/// What a rotation did.
#[derive(Debug, Serialize, ToSchema)]
pub struct RotationReport {
    /// The key every secret of the org is now sealed with.
    pub active_key_id: String,
    /// Secrets sealed again under the active key.
    pub resealed: u32,
    /// Secrets already under it.
    pub unchanged: u32,
    /// Secrets whose value changed while the rotation ran (they are sealed under the active
    /// key by that change).
    pub skipped: u32,
    /// Secrets that no configured key opens (sealed under a key that was removed, or
    /// tampered with), by name: they stay as they are and cannot be read until set again.
    pub failed: Vec<String>,
}

/// Seals every secret of the org under the active master key (the first of `[secrets]
/// keys`), so that older keys can then be removed from the configuration.
#[utoipa::path(post, path = "/api/v1/secrets/rotate", tag = "secrets",
    responses((status = 200, body = RotationReport), (status = 409, body = crate::error::ApiErrorBody)))]
pub async fn rotate_secrets(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<(AuditTarget, Json<RotationReport>), ApiError> {
    principal.require(Permission::SecretWrite)?;
    let keyring = keyring(&state)?;
    let active = keyring.active_key_id().to_owned();
    let mut report = RotationReport {
        active_key_id: active.clone(),
        resealed: 0,
        unchanged: 0,
        skipped: 0,
        failed: Vec::new(),
    };
    for secret in state.store.secrets(Some(principal.org_id)).await? {
        if secret.key_id == active {
            report.unchanged += 1;
            continue;
        }
        let clear = match open_secret(keyring, &secret) {
            Ok(clear) => clear,
            Err(error) => {
                tracing::warn!(secret = %secret.name, %error, "a secret cannot be opened for rotation");
                report.failed.push(secret.name.to_string());
                continue;
            }
        };
        let sealed = keyring
            .seal(
                clear.as_bytes(),
                &secret_aad(secret.org_id, secret.name.as_str()),
            )
            .map_err(ApiError::internal)?;
        let resealed = StoredSecret {
            key_id: sealed.key_id,
            nonce: sealed.nonce,
            ciphertext: sealed.ciphertext,
            ..secret
        };
        if state.store.reseal_secret(&resealed).await? {
            report.resealed += 1;
        } else {
            report.skipped += 1;
        }
    }
    Ok((AuditTarget::new("secrets", &active), Json(report)))
}

/// Loads the org's catalog for validating the pipeline source `text` (read from `file`).
///
/// # Errors
/// The store's.
pub async fn org_catalog<'a>(
    state: &'a AppState,
    principal: &Principal,
    file: &str,
    text: &str,
) -> Result<OrgCatalog<'a>, ApiError> {
    let references = crate::registry::tool_references(file, text);
    Ok(OrgCatalog::load(
        state.tools.as_ref(),
        state.store.as_ref(),
        principal.org_id,
        &references,
    )
    .await?)
}
