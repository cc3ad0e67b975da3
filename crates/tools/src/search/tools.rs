//! The tools over [`SearchServices`]: `embed`, `search`, `dedup`, `classify`, `memory`.

use std::collections::BTreeMap;
use std::sync::Arc;

use arches_core::ports::{Tool, ToolContext, ToolError};
use arches_core::records::LogStream;
use arches_core::search::{CollectionName, Metadata, MetadataFilter};
use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::extract::{extract, TextFormat};
use super::{
    chunk_text, Passage, SearchMode, SearchServices, DEFAULT_CHUNK_CHARS, DEFAULT_OVERLAP_CHARS,
    MAX_CHUNK_CHARS, MIN_CHUNK_CHARS,
};
use crate::common::{parse_inputs, resolve_artifact_reference, store_error};

/// Largest artifact the `embed` and `dedup` tools read: 64 MiB.
pub const ARTIFACT_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// Most documents (rows) one artifact may give.
pub const DOCUMENTS_MAX: usize = 100_000;
/// Most passages one `embed` attempt indexes.
pub const PASSAGES_MAX: usize = 100_000;
/// Most texts one `dedup` attempt compares (every text against every unique one).
pub const DEDUP_TEXTS_MAX: usize = 5_000;
/// Most texts one `classify` attempt labels.
pub const CLASSIFY_TEXTS_MAX: usize = 1_000;
/// Most hits a tool asks for.
pub const TOOL_K_MAX: usize = 100;

fn bad(tool: &str, message: impl std::fmt::Display) -> ToolError {
    ToolError::permanent(format!("invalid {tool} inputs: {message}"))
}

/// `k` when it is within 1..=[`TOOL_K_MAX`].
fn k_within(tool: &str, k: usize) -> Result<usize, ToolError> {
    if (1..=TOOL_K_MAX).contains(&k) {
        Ok(k)
    } else {
        Err(bad(tool, format!("k {k} is outside 1..={TOOL_K_MAX}")))
    }
}

fn collection(tool: &str, name: &str) -> Result<CollectionName, ToolError> {
    CollectionName::new(name).map_err(|error| bad(tool, format!("collection: {error}")))
}

fn filter(tool: &str, value: Option<&Value>) -> Result<MetadataFilter, ToolError> {
    match value {
        None | Some(Value::Null) => Ok(MetadataFilter::all()),
        Some(value) => {
            MetadataFilter::from_json(value).map_err(|error| bad(tool, format!("filter: {error}")))
        }
    }
}

/// The first 16 hex digits of the SHA-256 of `text`: the id of an inline text given
/// without one, so the same text indexed twice is one passage.
fn content_id(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    format!("sha256-{}", hex(&digest[..8]))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A text given inline: a string, or `{id?, text, metadata?}`.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum InlineText {
    Plain(String),
    Full {
        id: Option<String>,
        text: String,
        #[serde(default)]
        metadata: Metadata,
    },
}

/// A list of references, or one.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(one) => vec![one],
            OneOrMany::Many(many) => many,
        }
    }
}

/// A document to index or compare: a base id, its text and metadata.
struct Gathered {
    id: String,
    text: String,
    metadata: Metadata,
}

/// The documents of the inline `texts` and of the artifacts `source` names, in order, and
/// the ids of those without text (skipped: an empty text, a row with nothing in its
/// `text_field`).
async fn gather(
    tool: &str,
    context: &ToolContext,
    texts: Vec<InlineText>,
    source: Option<OneOrMany>,
    format: Option<TextFormat>,
    text_field: Option<&str>,
) -> Result<(Vec<Gathered>, Vec<String>), ToolError> {
    let mut gathered = Vec::new();
    let mut skipped = Vec::new();
    for (index, text) in texts.into_iter().enumerate() {
        let (id, text, metadata) = match text {
            InlineText::Plain(text) => (None, text, Metadata::new()),
            InlineText::Full { id, text, metadata } => (id, text, metadata),
        };
        let id = match id {
            Some(id) => {
                arches_core::search::validate_id(&id)
                    .map_err(|error| bad(tool, format!("texts[{index}]: {error}")))?;
                id
            }
            None => content_id(&text),
        };
        if text.trim().is_empty() {
            skipped.push(id);
            continue;
        }
        gathered.push(Gathered { id, text, metadata });
    }
    for reference in source.map(OneOrMany::into_vec).unwrap_or_default() {
        for artifact in resolve_artifact_reference(context, &reference).await? {
            let label = artifact.label();
            let format = match format.or_else(|| TextFormat::detect(&artifact.media_type, &artifact.name)) {
                Some(format) => format,
                None => {
                    return Err(bad(
                        tool,
                        format!(
                            "artifact {label} ({}) is of no known text format: set format to text, markdown, html, csv, json or jsonl",
                            artifact.media_type
                        ),
                    ))
                }
            };
            let content = context
                .artifacts
                .read(artifact.id, ARTIFACT_BYTES_MAX)
                .await
                .map_err(|error| match error {
                    arches_core::ports::StoreError::Conflict(_) => ToolError::permanent(format!(
                        "artifact {label} is larger than the {} MiB {tool} reads: split it",
                        ARTIFACT_BYTES_MAX >> 20
                    )),
                    other => store_error(&format!("cannot read artifact {label}"), other),
                })?;
            let documents = tokio::task::spawn_blocking({
                let text_field = text_field.map(str::to_owned);
                move || extract(&content, format, text_field.as_deref(), DOCUMENTS_MAX)
            })
            .await
            .map_err(|error| ToolError::permanent(format!("text extraction failed: {error}")))?
            .map_err(|error| ToolError::permanent(format!("artifact {label}: {error}")))?;
            for document in documents {
                if document.text.trim().is_empty() {
                    skipped.push(match document.row {
                        Some(row) => format!("{}/{row}", artifact.id),
                        None => artifact.id.to_string(),
                    });
                    continue;
                }
                let mut metadata = document.fields;
                metadata.insert("artifact".to_owned(), Value::String(label.clone()));
                metadata.insert(
                    "artifact_id".to_owned(),
                    Value::String(artifact.id.to_string()),
                );
                let id = match document.row {
                    Some(row) => {
                        metadata.insert("row".to_owned(), Value::from(row));
                        format!("{}/{row}", artifact.id)
                    }
                    None => artifact.id.to_string(),
                };
                gathered.push(Gathered {
                    id,
                    text: document.text,
                    metadata,
                });
            }
        }
    }
    Ok((gathered, skipped))
}

fn tool_error(what: &str, error: super::Error) -> ToolError {
    error.to_tool_error(what)
}

/// Every text-source property of the `embed` and `dedup` schemas.
fn source_properties() -> Value {
    json!({
        "texts": {
            "type": "array",
            "description": "texts given inline: strings, or {id?, text, metadata?} (an id defaults to the text's SHA-256)",
            "items": {
                "oneOf": [
                    {"type": "string"},
                    {
                        "type": "object",
                        "additionalProperties": false,
                        "required": ["text"],
                        "properties": {
                            "id": {"type": "string", "minLength": 1, "maxLength": 256},
                            "text": {"type": "string"},
                            "metadata": {"type": "object"}
                        }
                    }
                ]
            }
        },
        "source": {
            "description": "artifacts to read: upstream task ids, artifact ids or name[@version] of upstream artifacts",
            "oneOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "items": {"type": "string", "minLength": 1}}
            ]
        },
        "format": {"enum": ["text", "markdown", "html", "csv", "json", "jsonl"], "description": "how to read the artifacts; default from their media type or extension"},
        "text_field": {"type": "string", "minLength": 1, "description": "for csv/json rows: the field holding the text; default every field as 'name: value' lines"}
    })
}

fn implied_source_dependencies(inputs: &Value, task_ids: &[&str]) -> Vec<String> {
    let names: Vec<&str> = match inputs.get("source") {
        Some(Value::String(one)) => vec![one.as_str()],
        Some(Value::Array(many)) => many.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    names
        .into_iter()
        .filter(|name| task_ids.contains(name))
        .map(str::to_owned)
        .collect()
}

/// The `embed` tool: extracts text from artifacts (txt, Markdown, HTML, CSV and JSON rows)
/// or takes texts inline, cuts it into overlapping chunks, embeds them and indexes them in
/// an org's collection for vector and full-text search.
///
/// Inputs: `collection` (`[a-z0-9_-]{1,64}`), `texts` and/or `source` (see the schema),
/// `format`, `text_field`, `chunk_chars` (100–4,000, default 1,000), `overlap_chars`
/// (default 200, below half of `chunk_chars`), `metadata` (added to every passage).
///
/// A passage's id is its document's id (an inline text's `id` or content hash; an
/// artifact's id, with `/<row>` for rows), with `#<chunk>` when the document made several
/// chunks; indexing the same document again replaces its passages. Metadata: the given
/// `metadata`, a row's scalar fields, `artifact` (`name@version`), `artifact_id`, `row`,
/// `chunk`, `run_id`, `task`.
///
/// Outputs: `collection`, `documents`, `passages`, `skipped` (documents without text: an
/// empty text, a row with nothing in `text_field`), `model`, `dimension`, `tokens` (or
/// null).
///
/// Errors: bad inputs, an artifact of unknown format, over 64 MiB or with more than
/// 100,000 rows, more than 100,000 passages: permanent; the embedding provider unavailable
/// or index storage failing: retryable.
pub struct EmbedTool {
    services: Arc<SearchServices>,
}

impl EmbedTool {
    /// The tool over `services`.
    pub fn new(services: Arc<SearchServices>) -> Self {
        Self { services }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmbedInputs {
    collection: String,
    #[serde(default)]
    texts: Vec<InlineText>,
    source: Option<OneOrMany>,
    format: Option<TextFormat>,
    text_field: Option<String>,
    chunk_chars: Option<usize>,
    overlap_chars: Option<usize>,
    #[serde(default)]
    metadata: Metadata,
}

#[async_trait]
impl Tool for EmbedTool {
    fn name(&self) -> &str {
        "embed"
    }

    fn description(&self) -> &str {
        "extract text from artifacts or inputs, chunk, embed and index it in a collection"
    }

    fn input_schema(&self) -> Value {
        let mut properties = source_properties();
        let extra = json!({
            "collection": {"type": "string", "pattern": "^[a-z0-9_-]{1,64}$"},
            "chunk_chars": {"type": "integer", "minimum": MIN_CHUNK_CHARS, "maximum": MAX_CHUNK_CHARS, "default": DEFAULT_CHUNK_CHARS},
            "overlap_chars": {"type": "integer", "minimum": 0, "default": DEFAULT_OVERLAP_CHARS},
            "metadata": {"type": "object", "description": "added to every passage"}
        });
        merge(&mut properties, extra);
        json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["collection"],
            "anyOf": [{"required": ["texts"]}, {"required": ["source"]}],
            "properties": properties
        })
    }

    fn implied_dependencies(&self, inputs: &Value, task_ids: &[&str]) -> Vec<String> {
        implied_source_dependencies(inputs, task_ids)
    }

    async fn execute(&self, context: ToolContext, inputs: Value) -> Result<Value, ToolError> {
        let inputs: EmbedInputs = parse_inputs("embed", inputs)?;
        let collection = collection("embed", &inputs.collection)?;
        let chunk_chars = inputs.chunk_chars.unwrap_or(DEFAULT_CHUNK_CHARS);
        if !(MIN_CHUNK_CHARS..=MAX_CHUNK_CHARS).contains(&chunk_chars) {
            return Err(bad(
                "embed",
                format!(
                    "chunk_chars {chunk_chars} is outside {MIN_CHUNK_CHARS}..={MAX_CHUNK_CHARS}"
                ),
            ));
        }
        let overlap_chars = inputs
            .overlap_chars
            .unwrap_or(DEFAULT_OVERLAP_CHARS.min(chunk_chars / 4));
        if overlap_chars * 2 >= chunk_chars {
            return Err(bad(
                "embed",
                format!("overlap_chars {overlap_chars} must be below half of chunk_chars ({chunk_chars})"),
            ));
        }
        if inputs.texts.is_empty() && inputs.source.is_none() {
            return Err(bad("embed", "give texts or source"));
        }
        let (documents, skipped) = gather(
            "embed",
            &context,
            inputs.texts,
            inputs.source,
            inputs.format,
            inputs.text_field.as_deref(),
        )
        .await?;
        let document_count = documents.len();
        let mut passages = Vec::new();
        for document in documents {
            let chunks = chunk_text(&document.text, chunk_chars, overlap_chars);
            let several = chunks.len() > 1;
            for (number, chunk) in chunks.into_iter().enumerate() {
                if passages.len() == PASSAGES_MAX {
                    return Err(ToolError::permanent(format!(
                        "embed: more than {PASSAGES_MAX} passages in one task: split the input"
                    )));
                }
                let mut metadata = inputs.metadata.clone();
                metadata.extend(document.metadata.clone());
                metadata.insert("chunk".to_owned(), Value::from(number));
                metadata.insert(
                    "run_id".to_owned(),
                    Value::String(context.run_id.to_string()),
                );
                metadata.insert(
                    "task".to_owned(),
                    Value::String(context.task_id.as_str().to_owned()),
                );
                let id = if several {
                    format!("{}#{number}", document.id)
                } else {
                    document.id.clone()
                };
                passages.push(Passage {
                    id,
                    text: chunk,
                    metadata,
                });
            }
        }
        context
            .logs
            .write(
                LogStream::Stdout,
                &format!(
                    "embedding {} passages of {document_count} documents into {collection} with {}",
                    passages.len(),
                    self.services.model()
                ),
            )
            .await;
        let report = self
            .services
            .index(context.org_id, &collection, passages)
            .await
            .map_err(|error| tool_error(&format!("embed into {collection}"), error))?;
        Ok(json!({
            "collection": collection.as_str(),
            "documents": document_count,
            "passages": report.passages,
            "skipped": skipped.len(),
            "model": self.services.model(),
            "dimension": self.services.dimension(),
            "tokens": report.tokens,
        }))
    }
}

fn merge(into: &mut Value, from: Value) {
    if let (Value::Object(into), Value::Object(from)) = (into, from) {
        into.extend(from);
    }
}

/// The `search` tool: the best passages of a collection for a query.
///
/// Inputs: `collection`, `query`, `k` (1–100, default 5), `mode` (`hybrid` (default),
/// `vector` or `text`), `filter` (metadata equalities, e.g. `{"lang": "en", "source": ["a",
/// "b"]}`).
///
/// Outputs: `hits` (`[{id, score, text, metadata, similarity, snippet}]`, best first),
/// `count`, `collection`, `mode`. An unknown collection gives no hits.
pub struct SearchTool {
    services: Arc<SearchServices>,
}

impl SearchTool {
    /// The tool over `services`.
    pub fn new(services: Arc<SearchServices>) -> Self {
        Self { services }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchInputs {
    collection: String,
    query: String,
    k: Option<usize>,
    #[serde(default)]
    mode: SearchMode,
    filter: Option<Value>,
}

#[async_trait]
impl Tool for SearchTool {
    fn name(&self) -> &str {
        "search"
    }

    fn description(&self) -> &str {
        "find the passages of a collection most relevant to a query (hybrid, vector or full text)"
    }

    fn input_schema(&self) -> Value {
        json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["collection", "query"],
            "properties": {
                "collection": {"type": "string", "pattern": "^[a-z0-9_-]{1,64}$"},
                "query": {"type": "string", "minLength": 1, "maxLength": 4096},
                "k": {"type": "integer", "minimum": 1, "maximum": TOOL_K_MAX, "default": 5},
                "mode": {"enum": ["hybrid", "vector", "text"], "default": "hybrid"},
                "filter": {"type": "object", "description": "metadata field -> value, or a list of accepted values"}
            }
        })
    }

    async fn execute(&self, context: ToolContext, inputs: Value) -> Result<Value, ToolError> {
        let inputs: SearchInputs = parse_inputs("search", inputs)?;
        let collection = collection("search", &inputs.collection)?;
        let filter = filter("search", inputs.filter.as_ref())?;
        let k = k_within("search", inputs.k.unwrap_or(5))?;
        let hits = self
            .services
            .search(
                context.org_id,
                &collection,
                &inputs.query,
                k,
                inputs.mode,
                &filter,
            )
            .await
            .map_err(|error| tool_error(&format!("search {collection}"), error))?;
        context
            .logs
            .write(
                LogStream::Stdout,
                &format!(
                    "{} hits in {collection} ({})",
                    hits.len(),
                    inputs.mode.as_str()
                ),
            )
            .await;
        Ok(json!({
            "collection": collection.as_str(),
            "mode": inputs.mode.as_str(),
            "count": hits.len(),
            "hits": hits,
        }))
    }
}

/// The `dedup` tool: finds near-duplicate texts by the cosine similarity of their
/// embeddings.
///
/// Inputs: `texts` and/or `source` (as `embed`; each document is compared whole, as the
/// model reads it: all-MiniLM-L6-v2 reads its first 256 word pieces), `threshold` (cosine
/// similarity, 0–1, default 0.95), `collection` (optional: also compare each text with the
/// passages indexed there, its nearest one counting), `index` (with `collection`: add the
/// unique texts to it, default false).
///
/// In input order, a text is a duplicate of the first earlier unique text (or indexed
/// passage) whose similarity reaches the threshold; otherwise it is unique. At most 5,000
/// texts per attempt.
///
/// Outputs: `unique` (ids), `duplicates` (`[{id, duplicate_of, similarity}]`), `groups`
/// (`[[first id, duplicate ids…]]` for texts with duplicates), `count`, `unique_count`,
/// `skipped` (ids of the documents without text).
pub struct DedupTool {
    services: Arc<SearchServices>,
}

impl DedupTool {
    /// The tool over `services`.
    pub fn new(services: Arc<SearchServices>) -> Self {
        Self { services }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DedupInputs {
    #[serde(default)]
    texts: Vec<InlineText>,
    source: Option<OneOrMany>,
    format: Option<TextFormat>,
    text_field: Option<String>,
    threshold: Option<f64>,
    collection: Option<String>,
    #[serde(default)]
    index: bool,
}

#[async_trait]
impl Tool for DedupTool {
    fn name(&self) -> &str {
        "dedup"
    }

    fn description(&self) -> &str {
        "find near-duplicate texts by embedding similarity"
    }

    fn input_schema(&self) -> Value {
        let mut properties = source_properties();
        merge(
            &mut properties,
            json!({
                "threshold": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.95},
                "collection": {"type": "string", "pattern": "^[a-z0-9_-]{1,64}$", "description": "also compare with the passages indexed here"},
                "index": {"type": "boolean", "default": false, "description": "add the unique texts to collection"}
            }),
        );
        json!({
            "type": "object",
            "additionalProperties": false,
            "anyOf": [{"required": ["texts"]}, {"required": ["source"]}],
            "properties": properties
        })
    }

    fn implied_dependencies(&self, inputs: &Value, task_ids: &[&str]) -> Vec<String> {
        implied_source_dependencies(inputs, task_ids)
    }

    async fn execute(&self, context: ToolContext, inputs: Value) -> Result<Value, ToolError> {
        let inputs: DedupInputs = parse_inputs("dedup", inputs)?;
        let threshold = inputs.threshold.unwrap_or(0.95);
        if !(0.0..=1.0).contains(&threshold) {
            return Err(bad(
                "dedup",
                format!("threshold {threshold} is outside 0..=1"),
            ));
        }
        let collection = match &inputs.collection {
            Some(name) => Some(collection("dedup", name)?),
            None if inputs.index => {
                return Err(bad(
                    "dedup",
                    "index needs a collection to add the unique texts to",
                ))
            }
            None => None,
        };
        if inputs.texts.is_empty() && inputs.source.is_none() {
            return Err(bad("dedup", "give texts or source"));
        }
        let (documents, skipped) = gather(
            "dedup",
            &context,
            inputs.texts,
            inputs.source,
            inputs.format,
            inputs.text_field.as_deref(),
        )
        .await?;
        if documents.len() > DEDUP_TEXTS_MAX {
            return Err(ToolError::permanent(format!(
                "dedup: {} texts, over the bound of {DEDUP_TEXTS_MAX} per task: split the input",
                documents.len()
            )));
        }
        if documents.is_empty() {
            return Ok(
                json!({"unique": [], "duplicates": [], "groups": [], "count": 0, "unique_count": 0, "skipped": skipped}),
            );
        }
        let texts: Vec<String> = documents.iter().map(|d| d.text.clone()).collect();
        let (vectors, _) = self
            .services
            .embed(&texts)
            .await
            .map_err(|error| tool_error("dedup: embedding", error))?;
        // Indexed passages first: the nearest one above the threshold, per text.
        let mut indexed: Vec<Option<(String, f32)>> = vec![None; documents.len()];
        if let Some(collection) = &collection {
            for (slot, vector) in indexed.iter_mut().zip(&vectors) {
                let nearest = self
                    .services
                    .nearest(
                        context.org_id,
                        collection,
                        vector,
                        1,
                        &MetadataFilter::all(),
                    )
                    .await
                    .map_err(|error| tool_error(&format!("dedup: search {collection}"), error))?;
                if let Some(hit) = nearest.into_iter().next() {
                    if f64::from(hit.score) >= threshold {
                        *slot = Some((hit.id, hit.score));
                    }
                }
            }
        }
        let ids: Vec<String> = documents.iter().map(|d| d.id.clone()).collect();
        let outcome =
            tokio::task::spawn_blocking(move || greedy_dedup(&vectors, &indexed, threshold as f32))
                .await
                .map_err(|error| ToolError::permanent(format!("dedup failed: {error}")))?;
        let mut unique = Vec::new();
        let mut duplicates = Vec::new();
        let mut groups: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        for (index, verdict) in outcome.iter().enumerate() {
            match verdict {
                Verdict::Unique => unique.push(ids[index].clone()),
                Verdict::Of(first, similarity) => {
                    duplicates.push(json!({"id": ids[index], "duplicate_of": ids[*first], "similarity": similarity}));
                    groups
                        .entry(*first)
                        .or_insert_with(|| vec![ids[*first].clone()])
                        .push(ids[index].clone());
                }
                Verdict::Indexed(id, similarity) => {
                    duplicates.push(json!({"id": ids[index], "duplicate_of": id, "similarity": similarity, "indexed": true}));
                }
            }
        }
        if let (true, Some(collection)) = (inputs.index, &collection) {
            let passages: Vec<Passage> = documents
                .into_iter()
                .zip(&outcome)
                .filter(|(_, verdict)| matches!(verdict, Verdict::Unique))
                .map(|(document, _)| Passage {
                    id: document.id,
                    text: document.text,
                    metadata: document.metadata,
                })
                .collect();
            self.services
                .index(context.org_id, collection, passages)
                .await
                .map_err(|error| tool_error(&format!("dedup: index into {collection}"), error))?;
        }
        context
            .logs
            .write(
                LogStream::Stdout,
                &format!(
                    "{} texts, {} unique, {} duplicates (threshold {threshold})",
                    ids.len(),
                    unique.len(),
                    duplicates.len()
                ),
            )
            .await;
        Ok(json!({
            "count": ids.len(),
            "skipped": skipped,
            "unique_count": unique.len(),
            "unique": unique,
            "duplicates": duplicates,
            "groups": groups.into_values().collect::<Vec<_>>(),
        }))
    }
}

enum Verdict {
    Unique,
    /// A duplicate of the earlier text at this index, with the similarity.
    Of(usize, f32),
    /// A duplicate of an indexed passage.
    Indexed(String, f32),
}

/// In order: a text already matched to an indexed passage keeps it; else the first earlier
/// unique text at or above `threshold` makes it a duplicate; else it is unique. Vectors are
/// unit length, so the cosine is the dot product.
fn greedy_dedup(
    vectors: &[Vec<f32>],
    indexed: &[Option<(String, f32)>],
    threshold: f32,
) -> Vec<Verdict> {
    let mut verdicts = Vec::with_capacity(vectors.len());
    let mut uniques: Vec<usize> = Vec::new();
    for (index, vector) in vectors.iter().enumerate() {
        if let Some((id, similarity)) = &indexed[index] {
            verdicts.push(Verdict::Indexed(id.clone(), *similarity));
            continue;
        }
        let first = uniques.iter().find_map(|&earlier| {
            let similarity = arches_core::embedding::cosine(vector, &vectors[earlier]);
            (similarity >= threshold).then_some((earlier, similarity))
        });
        match first {
            Some((earlier, similarity)) => verdicts.push(Verdict::Of(earlier, similarity)),
            None => {
                uniques.push(index);
                verdicts.push(Verdict::Unique);
            }
        }
    }
    verdicts
}

/// The `classify` tool: labels texts by their `k` nearest labelled examples in a
/// collection (indexed with `embed`, the label in each passage's metadata).
///
/// Inputs: `collection`, `text` or `texts` (at most 1,000), `label_field` (default
/// `label`), `k` (1–100, default 10), `filter`.
///
/// The label is the one with the largest sum of similarities among the `k` nearest
/// examples that carry a label (a similarity-weighted k-nearest-neighbour vote; negative
/// similarities count 0). Its **confidence** is that label's share of the summed
/// similarities, in [0, 1]: 1 when every neighbour agrees. `classify` is an AI tool, so the
/// engine routes its result by this confidence (see the validation queue); for `texts` the
/// routed confidence is the lowest of the texts'.
///
/// Outputs for `text`: `label`, `confidence`, `scores` (label → share), `neighbors`
/// (`[{id, label, similarity}]`). For `texts`: `results` (one such object per text),
/// `labels`, and `confidence` (the lowest).
///
/// Errors: a collection with no labelled example near the text: permanent, naming the
/// collection and the field.
pub struct ClassifyTool {
    services: Arc<SearchServices>,
}

impl ClassifyTool {
    /// The tool over `services`.
    pub fn new(services: Arc<SearchServices>) -> Self {
        Self { services }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClassifyInputs {
    collection: String,
    text: Option<String>,
    texts: Option<Vec<String>>,
    label_field: Option<String>,
    k: Option<usize>,
    filter: Option<Value>,
}

#[async_trait]
impl Tool for ClassifyTool {
    fn name(&self) -> &str {
        "classify"
    }

    fn description(&self) -> &str {
        "label texts by their nearest labelled examples, with a confidence"
    }

    fn input_schema(&self) -> Value {
        json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["collection"],
            "oneOf": [{"required": ["text"]}, {"required": ["texts"]}],
            "properties": {
                "collection": {"type": "string", "pattern": "^[a-z0-9_-]{1,64}$"},
                "text": {"type": "string", "minLength": 1},
                "texts": {"type": "array", "minItems": 1, "maxItems": CLASSIFY_TEXTS_MAX, "items": {"type": "string", "minLength": 1}},
                "label_field": {"type": "string", "minLength": 1, "default": "label"},
                "k": {"type": "integer", "minimum": 1, "maximum": TOOL_K_MAX, "default": 10},
                "filter": {"type": "object"}
            }
        })
    }

    async fn execute(&self, context: ToolContext, inputs: Value) -> Result<Value, ToolError> {
        let inputs: ClassifyInputs = parse_inputs("classify", inputs)?;
        let collection = collection("classify", &inputs.collection)?;
        let filter = filter("classify", inputs.filter.as_ref())?;
        let label_field = inputs.label_field.as_deref().unwrap_or("label");
        let k = k_within("classify", inputs.k.unwrap_or(10))?;
        let (texts, single) = match (inputs.text, inputs.texts) {
            (Some(text), None) => (vec![text], true),
            (None, Some(texts)) if !texts.is_empty() => (texts, false),
            _ => {
                return Err(bad(
                    "classify",
                    "give exactly one of text or texts (not empty)",
                ))
            }
        };
        if texts.len() > CLASSIFY_TEXTS_MAX {
            return Err(bad(
                "classify",
                format!(
                    "{} texts, over the bound of {CLASSIFY_TEXTS_MAX}",
                    texts.len()
                ),
            ));
        }
        let (vectors, _) = self
            .services
            .embed(&texts)
            .await
            .map_err(|error| tool_error("classify: embedding", error))?;
        let mut results = Vec::with_capacity(texts.len());
        for (index, vector) in vectors.iter().enumerate() {
            let hits = self
                .services
                .nearest(context.org_id, &collection, vector, k, &filter)
                .await
                .map_err(|error| tool_error(&format!("classify: search {collection}"), error))?;
            let neighbors: Vec<(String, String, f32)> = hits
                .into_iter()
                .filter_map(|hit| {
                    let label = match hit.metadata.get(label_field)? {
                        Value::String(label) => label.clone(),
                        Value::Null => return None,
                        other => other.to_string(),
                    };
                    Some((hit.id, label, hit.score))
                })
                .collect();
            let vote = weighted_vote(&neighbors).ok_or_else(|| {
                ToolError::permanent(format!(
                    "classify: collection {collection} has no example with a {label_field:?} field near text {index}: index labelled examples with embed first"
                ))
            })?;
            results.push(json!({
                "label": vote.label,
                "confidence": vote.confidence,
                "scores": vote.scores,
                "neighbors": neighbors
                    .iter()
                    .map(|(id, label, similarity)| json!({"id": id, "label": label, "similarity": similarity}))
                    .collect::<Vec<_>>(),
            }));
        }
        let lowest = results
            .iter()
            .filter_map(|r| r["confidence"].as_f64())
            .fold(1.0f64, f64::min);
        context
            .logs
            .write(
                LogStream::Stdout,
                &format!(
                    "classified {} texts against {collection} (k {k}); lowest confidence {lowest:.3}",
                    results.len()
                ),
            )
            .await;
        if single {
            return Ok(results.into_iter().next().unwrap_or(Value::Null));
        }
        let labels: Vec<Value> = results.iter().map(|r| r["label"].clone()).collect();
        Ok(json!({"results": results, "labels": labels, "confidence": lowest}))
    }
}

/// The result of a similarity-weighted vote.
#[derive(Debug, PartialEq)]
struct Vote {
    label: String,
    confidence: f64,
    scores: BTreeMap<String, f64>,
}

/// The similarity-weighted k-nearest-neighbour vote (Dudani, "The Distance-Weighted
/// k-Nearest-Neighbor Rule", IEEE SMC 1976, with similarity as the weight): each label
/// scores the sum of its neighbours' similarities (negative ones count 0); shares are those
/// sums over their total. When every similarity is 0 or below, each neighbour counts 1.
/// Ties go to the label of the nearest neighbour among them. `None` without neighbours.
fn weighted_vote(neighbors: &[(String, String, f32)]) -> Option<Vote> {
    if neighbors.is_empty() {
        return None;
    }
    let positive: f64 = neighbors.iter().map(|n| f64::from(n.2.max(0.0))).sum();
    let weight = |similarity: f32| {
        if positive > 0.0 {
            f64::from(similarity.max(0.0))
        } else {
            1.0
        }
    };
    let total: f64 = neighbors.iter().map(|n| weight(n.2)).sum();
    let mut scores: BTreeMap<String, f64> = BTreeMap::new();
    for (_, label, similarity) in neighbors {
        *scores.entry(label.clone()).or_default() += weight(*similarity) / total;
    }
    // Neighbours come nearest first: the first label reaching the best score wins a tie.
    let best = scores.values().copied().fold(f64::MIN, f64::max);
    let label = neighbors
        .iter()
        .map(|n| &n.1)
        .find(|label| (scores[*label] - best).abs() < 1e-12)?
        .clone();
    Some(Vote {
        confidence: scores[&label].clamp(0.0, 1.0),
        label,
        scores,
    })
}

/// The `memory` tool: an agent's long-term memory, stored and recalled by meaning.
///
/// Inputs: `action` (`remember`, `recall` or `forget`), `agent` (the memory's owner:
/// `[a-z0-9_-]{1,50}`; its memories live in the collection `memory-<agent>` of the run's
/// org), `text` (remember), `metadata` (remember), `query` and `k` (recall: 1–100, default
/// 5), `ids` (forget).
///
/// A remembered text's id is its content hash, so remembering it again changes nothing.
///
/// Outputs: remember → `{id, agent}`; recall → `{memories: [{id, text, similarity,
/// metadata}], agent}`; forget → `{forgotten}`.
pub struct MemoryTool {
    services: Arc<SearchServices>,
}

impl MemoryTool {
    /// The tool over `services`.
    pub fn new(services: Arc<SearchServices>) -> Self {
        Self { services }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, tag = "action", rename_all = "lowercase")]
enum MemoryInputs {
    Remember {
        agent: String,
        text: String,
        #[serde(default)]
        metadata: Metadata,
    },
    Recall {
        agent: String,
        query: String,
        k: Option<usize>,
    },
    Forget {
        agent: String,
        ids: Vec<String>,
    },
}

/// The collection of an agent's memories.
fn memory_collection(agent: &str) -> Result<CollectionName, ToolError> {
    if agent.is_empty() || agent.len() > 50 {
        return Err(bad("memory", "agent must have 1 to 50 characters"));
    }
    collection("memory", &format!("memory-{agent}"))
}

#[async_trait]
impl Tool for MemoryTool {
    fn name(&self) -> &str {
        "memory"
    }

    fn description(&self) -> &str {
        "an agent's long-term memory: remember texts, recall them by meaning, forget them"
    }

    fn input_schema(&self) -> Value {
        let agent = json!({"type": "string", "pattern": "^[a-z0-9_-]{1,50}$"});
        json!({
            "type": "object",
            "required": ["action", "agent"],
            "oneOf": [
                {
                    "additionalProperties": false,
                    "required": ["text"],
                    "properties": {
                        "action": {"const": "remember"},
                        "agent": agent,
                        "text": {"type": "string", "minLength": 1},
                        "metadata": {"type": "object"}
                    }
                },
                {
                    "additionalProperties": false,
                    "required": ["query"],
                    "properties": {
                        "action": {"const": "recall"},
                        "agent": agent,
                        "query": {"type": "string", "minLength": 1, "maxLength": 4096},
                        "k": {"type": "integer", "minimum": 1, "maximum": TOOL_K_MAX, "default": 5}
                    }
                },
                {
                    "additionalProperties": false,
                    "required": ["ids"],
                    "properties": {
                        "action": {"const": "forget"},
                        "agent": agent,
                        "ids": {"type": "array", "maxItems": 1000, "items": {"type": "string", "minLength": 1}}
                    }
                }
            ]
        })
    }

    async fn execute(&self, context: ToolContext, inputs: Value) -> Result<Value, ToolError> {
        let inputs: MemoryInputs = parse_inputs("memory", inputs)?;
        match inputs {
            MemoryInputs::Remember {
                agent,
                text,
                mut metadata,
            } => {
                let collection = memory_collection(&agent)?;
                if text.trim().is_empty() {
                    return Err(bad("memory", "text is empty"));
                }
                let id = content_id(&text);
                metadata.insert(
                    "run_id".to_owned(),
                    Value::String(context.run_id.to_string()),
                );
                metadata.insert(
                    "task".to_owned(),
                    Value::String(context.task_id.as_str().to_owned()),
                );
                self.services
                    .index(
                        context.org_id,
                        &collection,
                        vec![Passage {
                            id: id.clone(),
                            text,
                            metadata,
                        }],
                    )
                    .await
                    .map_err(|error| tool_error("memory: remember", error))?;
                Ok(json!({"id": id, "agent": agent}))
            }
            MemoryInputs::Recall { agent, query, k } => {
                let collection = memory_collection(&agent)?;
                let k = k_within("memory", k.unwrap_or(5))?;
                let hits = self
                    .services
                    .search(
                        context.org_id,
                        &collection,
                        &query,
                        k,
                        SearchMode::Vector,
                        &MetadataFilter::all(),
                    )
                    .await
                    .map_err(|error| tool_error("memory: recall", error))?;
                let memories: Vec<Value> = hits
                    .into_iter()
                    .map(|hit| {
                        json!({"id": hit.id, "text": hit.text, "similarity": hit.similarity, "metadata": hit.metadata})
                    })
                    .collect();
                Ok(json!({"agent": agent, "memories": memories}))
            }
            MemoryInputs::Forget { agent, ids } => {
                let collection = memory_collection(&agent)?;
                let forgotten = self
                    .services
                    .delete(context.org_id, &collection, &ids)
                    .await
                    .map_err(|error| tool_error("memory: forget", error))?;
                Ok(json!({"agent": agent, "forgotten": forgotten}))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(id: &str, label: &str, similarity: f32) -> (String, String, f32) {
        (id.to_owned(), label.to_owned(), similarity)
    }

    #[test]
    fn the_vote_weights_labels_by_similarity() {
        let vote = weighted_vote(&[n("a", "x", 0.9), n("b", "y", 0.5), n("c", "y", 0.5)]).unwrap();
        assert_eq!(vote.label, "y");
        assert!((vote.confidence - 1.0 / 1.9).abs() < 1e-6, "{vote:?}");
        assert!((vote.scores["x"] - 0.9 / 1.9).abs() < 1e-6);
        let unanimous = weighted_vote(&[n("a", "x", 0.3), n("b", "x", 0.2)]).unwrap();
        assert_eq!(unanimous.confidence, 1.0);
        assert!(weighted_vote(&[]).is_none());
    }

    #[test]
    fn a_tie_goes_to_the_nearest_and_negative_similarities_count_nothing() {
        let tie = weighted_vote(&[n("a", "y", 0.5), n("b", "x", 0.5)]).unwrap();
        assert_eq!(tie.label, "y");
        let negative = weighted_vote(&[n("a", "x", -0.2), n("b", "y", 0.1)]).unwrap();
        assert_eq!(negative.label, "y");
        assert_eq!(negative.confidence, 1.0);
        let all_negative =
            weighted_vote(&[n("a", "x", -0.2), n("b", "y", -0.5), n("c", "y", -0.6)]).unwrap();
        assert_eq!(all_negative.label, "y");
    }

    #[test]
    fn greedy_dedup_keeps_the_first_of_each_group() {
        let v = |x: f32, y: f32| {
            let norm = (x * x + y * y).sqrt();
            vec![x / norm, y / norm]
        };
        let vectors = vec![
            v(1.0, 0.0),
            v(0.0, 1.0),
            v(1.0, 0.01),
            v(0.01, 1.0),
            v(1.0, 1.0),
        ];
        let indexed = vec![None, None, None, None, Some(("old".to_owned(), 0.99))];
        let verdicts = greedy_dedup(&vectors, &indexed, 0.95);
        assert!(matches!(verdicts[0], Verdict::Unique));
        assert!(matches!(verdicts[1], Verdict::Unique));
        assert!(matches!(verdicts[2], Verdict::Of(0, s) if s > 0.99));
        assert!(matches!(verdicts[3], Verdict::Of(1, _)));
        assert!(matches!(&verdicts[4], Verdict::Indexed(id, _) if id == "old"));
    }

    #[test]
    fn inline_ids_are_content_hashes() {
        assert_eq!(content_id("a"), content_id("a"));
        assert_ne!(content_id("a"), content_id("b"));
        assert!(content_id("a").starts_with("sha256-"));
        assert_eq!(content_id("a").len(), "sha256-".len() + 16);
    }
}
