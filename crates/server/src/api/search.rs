//! Search: the passages the `embed` tool indexed in the org's collections, found by hybrid
//! (vector + full text, fused by reciprocal rank fusion), vector or full-text search.
//!
//! Searching reads indexed artifact text, so it asks for [`Permission::ArtifactRead`].

use arches_core::identity::Permission;
use arches_core::search::{CollectionName, MetadataFilter};
use arches_tools::search::{SearchHit, SearchMode};
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::error::{ApiError, ApiQuery};
use crate::principal::Principal;
use crate::state::AppState;

/// Default number of hits.
const HITS_DEFAULT: usize = 10;
/// Most hits one request returns.
pub const HITS_MAX: usize = 100;

/// The search API's OpenAPI paths.
#[derive(OpenApi)]
#[openapi(paths(search), components(schemas(SearchResults, HitView)))]
pub struct SearchApi;

/// The routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new().route("/api/v1/search", get(search))
}

/// What to search.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SearchQuery {
    /// The collection (`[a-z0-9_-]{1,64}`), as the `embed` tool named it.
    pub collection: String,
    /// The query text (at most 4,096 bytes).
    pub q: String,
    /// Hits wanted: 1 to 100, default 10.
    pub k: Option<usize>,
    /// `hybrid` (default), `vector` or `text`.
    pub mode: Option<String>,
    /// A metadata filter as JSON: field → value, or a list of accepted values, for example
    /// `{"species":"Adelie","island":["Biscoe","Dream"]}`.
    pub filter: Option<String>,
}

/// One hit.
#[derive(Debug, Serialize, ToSchema)]
pub struct HitView {
    /// The passage's id.
    pub id: String,
    /// The ranking score, higher is better: the fused RRF score (hybrid), the cosine
    /// similarity (vector) or the text relevance (text).
    pub score: f64,
    /// The passage's text.
    pub text: Option<String>,
    /// Its metadata (artifact, row, chunk, run, task and the fields given at indexing).
    #[schema(value_type = Object)]
    pub metadata: Value,
    /// Cosine similarity to the query, when the vector ranking holds the passage.
    pub similarity: Option<f32>,
    /// An excerpt with the matched words between « and », when the text ranking holds it.
    pub snippet: Option<String>,
}

impl From<SearchHit> for HitView {
    fn from(hit: SearchHit) -> Self {
        Self {
            id: hit.id,
            score: hit.score,
            text: hit.text,
            metadata: Value::Object(hit.metadata),
            similarity: hit.similarity,
            snippet: hit.snippet,
        }
    }
}

/// The hits of a search.
#[derive(Debug, Serialize, ToSchema)]
pub struct SearchResults {
    /// The collection searched.
    pub collection: String,
    /// The mode used.
    pub mode: String,
    /// The embedding model of the collection's vectors.
    pub model: String,
    /// Best first.
    pub hits: Vec<HitView>,
}

/// Searches a collection of the caller's org. An unknown collection gives no hits.
#[utoipa::path(get, path = "/api/v1/search", tag = "search", params(SearchQuery),
    responses((status = 200, body = SearchResults), (status = 400, body = crate::error::ApiErrorBody),
        (status = 503, body = crate::error::ApiErrorBody)))]
pub async fn search(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(query): ApiQuery<SearchQuery>,
) -> Result<Json<SearchResults>, ApiError> {
    principal.require(Permission::ArtifactRead)?;
    let Some(services) = state.executors.search.clone() else {
        return Err(ApiError::unavailable(
            "search is off on this server ([search] enabled = false, or its index directory is in use by another process)",
        ));
    };
    let collection = CollectionName::new(&query.collection)
        .map_err(|error| ApiError::bad_request(format!("collection: {error}")))?;
    let mode = match query.mode.as_deref() {
        None => SearchMode::Hybrid,
        Some(name) => SearchMode::parse(name).map_err(ApiError::bad_request)?,
    };
    let k = query.k.unwrap_or(HITS_DEFAULT);
    if !(1..=HITS_MAX).contains(&k) {
        return Err(ApiError::bad_request(format!(
            "k {k} is outside 1..={HITS_MAX}"
        )));
    }
    let filter = match query.filter.as_deref() {
        None | Some("") => MetadataFilter::all(),
        Some(text) => {
            let value: Value = serde_json::from_str(text)
                .map_err(|error| ApiError::bad_request(format!("filter is not JSON: {error}")))?;
            MetadataFilter::from_json(&value)
                .map_err(|error| ApiError::bad_request(format!("filter: {error}")))?
        }
    };
    let hits = services
        .search(principal.org_id, &collection, &query.q, k, mode, &filter)
        .await
        .map_err(|error| {
            if error.is_bad_input() {
                ApiError::bad_request(error.to_string())
            } else if error.retryable() {
                ApiError::unavailable(format!("search is unavailable: {error}")).with_retry_after(5)
            } else {
                // A model that cannot load, a corrupt index: the operator's to fix, and the
                // message names the file, so it is logged rather than shown.
                ApiError::internal(error)
            }
        })?;
    Ok(Json(SearchResults {
        collection: collection.as_str().to_owned(),
        mode: mode.as_str().to_owned(),
        model: services.model().to_owned(),
        hits: hits.into_iter().map(Into::into).collect(),
    }))
}
