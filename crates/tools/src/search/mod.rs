//! Search in pipelines: the `embed`, `search`, `dedup`, `classify` and `memory` tools, and
//! [`SearchServices`], which they and the server's `/api/v1/search` share.
//!
//! [`SearchServices`] holds three ports of `arches-core`: an [`EmbeddingProvider`] (the local
//! all-MiniLM-L6-v2 of `arches-embed`, or an OpenAI-compatible endpoint), a [`VectorIndex`]
//! (the embedded HNSW index of `arches-search`) and a [`TextIndex`] (SQLite FTS5 or
//! PostgreSQL full text). Every indexed chunk goes into both indexes under the same id, with
//! its text kept in the metadata under [`TEXT_KEY`], so any hit (vector, text or fused)
//! shows its text. Hybrid search fuses both rankings by reciprocal rank fusion
//! ([`arches_search::HybridSearch`]).
//!
//! Everything is per org and per collection: a tool indexes into and reads from its run's
//! org only.

mod chunk;
pub mod eval;
mod extract;
mod tools;

use std::sync::Arc;

use arches_core::embedding::{EmbeddingError, EmbeddingProvider};
use arches_core::ports::ToolError;
use arches_core::search::{
    CollectionName, Metadata, MetadataFilter, SearchError, TextDocument, TextIndex, VectorHit,
    VectorIndex, VectorItem, MAX_BATCH,
};
use arches_core::OrgId;
use arches_search::HybridSearch;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use chunk::{
    chunk_text, DEFAULT_CHUNK_CHARS, DEFAULT_OVERLAP_CHARS, MAX_CHUNK_CHARS, MIN_CHUNK_CHARS,
};
pub use extract::{extract, Document, TextFormat};
pub use tools::{ClassifyTool, DedupTool, EmbedTool, MemoryTool, SearchTool};

/// The metadata key holding an indexed chunk's text.
pub const TEXT_KEY: &str = "text";
/// Weight of the vector ranking in hybrid search.
pub const HYBRID_VECTOR_WEIGHT: f64 = 1.0;
/// Weight of the full-text ranking in hybrid search: a quarter of the vector ranking's. On
/// the Rust book's labelled heading queries (chapters 4–10, BENCHMARKS.md §6) equal weights
/// gave recall@10 0.771 (below vector search alone, 0.862), text weight 0.75 gave 0.807,
/// 0.5 gave 0.817 and 0.25 gave 0.881 (MRR 0.584 against 0.561 for vectors alone).
pub const HYBRID_TEXT_WEIGHT: f64 = 0.25;
/// Most texts embedded per call to the provider (bounded again by the provider's own
/// `max_batch`).
pub const EMBED_BATCH_MAX: usize = 256;

/// Why a search-service call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The embedding provider failed.
    #[error(transparent)]
    Embedding(#[from] EmbeddingError),
    /// An index refused the call or failed.
    #[error(transparent)]
    Index(#[from] SearchError),
}

impl Error {
    /// Whether a later try may succeed: an unavailable provider, or index storage.
    pub fn retryable(&self) -> bool {
        match self {
            Error::Embedding(error) => error.retryable(),
            Error::Index(error) => matches!(error, SearchError::Storage(_)),
        }
    }

    /// Whether the caller's input is at fault (bad names, ids, filters, sizes, `k`).
    pub fn is_bad_input(&self) -> bool {
        match self {
            Error::Embedding(error) => error.is_bad_input(),
            Error::Index(error) => !matches!(
                error,
                SearchError::Storage(_)
                    | SearchError::Corrupt { .. }
                    | SearchError::CollectionNotFound { .. }
            ),
        }
    }

    /// The error as a tool error: retryable when [`Error::retryable`], prefixed by `what`.
    pub fn to_tool_error(&self, what: &str) -> ToolError {
        let message = format!("{what}: {self}");
        if self.retryable() {
            ToolError::transient(message)
        } else {
            ToolError::permanent(message)
        }
    }
}

/// How a query is matched.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SearchMode {
    /// Both rankings fused by reciprocal rank fusion (the default).
    #[default]
    Hybrid,
    /// Cosine similarity of embeddings only.
    Vector,
    /// Full-text relevance only (BM25 on SQLite, `ts_rank_cd` on PostgreSQL): a plain query
    /// matches any of its words; quotes, `or` and `-word` give the web-search syntax.
    Text,
}

impl SearchMode {
    /// The mode named `name` (`hybrid`, `vector` or `text`).
    ///
    /// # Errors
    /// A message naming the unknown mode.
    pub fn parse(name: &str) -> Result<Self, String> {
        match name {
            "hybrid" => Ok(SearchMode::Hybrid),
            "vector" => Ok(SearchMode::Vector),
            "text" => Ok(SearchMode::Text),
            other => Err(format!("mode {other:?} is not hybrid, vector or text")),
        }
    }

    /// The mode's name: `hybrid`, `vector` or `text`.
    pub fn as_str(self) -> &'static str {
        match self {
            SearchMode::Hybrid => "hybrid",
            SearchMode::Vector => "vector",
            SearchMode::Text => "text",
        }
    }
}

/// One passage to index: an id unique in its collection, its text, and its metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct Passage {
    /// The id (1–256 bytes); indexing an existing id replaces it.
    pub id: String,
    /// The text (embedded and indexed for full text).
    pub text: String,
    /// Metadata, kept with the passage (its text is added under [`TEXT_KEY`]).
    pub metadata: Metadata,
}

/// One result of [`SearchServices::search`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SearchHit {
    /// The passage's id.
    pub id: String,
    /// The ranking score: the fused RRF score (hybrid), the cosine similarity (vector) or
    /// the text relevance (text); higher is better, comparable within one result list.
    pub score: f64,
    /// The passage's text.
    pub text: Option<String>,
    /// The passage's metadata, without its text.
    pub metadata: Metadata,
    /// Cosine similarity to the query, when the vector ranking holds the passage.
    pub similarity: Option<f32>,
    /// An excerpt with the matched words between « and », when the text ranking holds it.
    pub snippet: Option<String>,
}

/// What [`SearchServices::index`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct IndexReport {
    /// Passages written to both indexes.
    pub passages: usize,
    /// Tokens the embedding model read, when it reports them.
    pub tokens: Option<u64>,
}

/// The embedding provider and the two indexes, shared by the search tools and the API.
pub struct SearchServices {
    embedder: Arc<dyn EmbeddingProvider>,
    vectors: Arc<dyn VectorIndex>,
    text: Arc<dyn TextIndex>,
    hybrid: HybridSearch,
}

impl std::fmt::Debug for SearchServices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SearchServices")
            .field("model", &self.embedder.model())
            .finish_non_exhaustive()
    }
}

impl SearchServices {
    /// The services over these ports.
    pub fn new(
        embedder: Arc<dyn EmbeddingProvider>,
        vectors: Arc<dyn VectorIndex>,
        text: Arc<dyn TextIndex>,
    ) -> Self {
        let mut hybrid = HybridSearch::new(vectors.clone(), text.clone());
        hybrid.vector_weight = HYBRID_VECTOR_WEIGHT;
        hybrid.text_weight = HYBRID_TEXT_WEIGHT;
        Self {
            embedder,
            vectors,
            text,
            hybrid,
        }
    }

    /// These services with other weights of the two rankings in hybrid search
    /// (`Σ weight / (60 + rank)`); the default is [`HYBRID_VECTOR_WEIGHT`] and
    /// [`HYBRID_TEXT_WEIGHT`].
    pub fn with_hybrid_weights(mut self, vector_weight: f64, text_weight: f64) -> Self {
        self.hybrid.vector_weight = vector_weight;
        self.hybrid.text_weight = text_weight;
        self
    }

    /// The embedding model's name.
    pub fn model(&self) -> &str {
        self.embedder.model()
    }

    /// Components of the embeddings.
    pub fn dimension(&self) -> usize {
        self.embedder.dimension()
    }

    /// One unit vector per text, in order, embedded in batches of at most
    /// [`EMBED_BATCH_MAX`] (and the provider's own bound). Also returns the tokens read,
    /// when the provider reports them for every batch.
    ///
    /// # Errors
    /// The provider's, naming the text at fault with its index in `texts`.
    pub async fn embed(&self, texts: &[String]) -> Result<(Vec<Vec<f32>>, Option<u64>), Error> {
        let batch = self.embedder.max_batch().clamp(1, EMBED_BATCH_MAX);
        let mut vectors = Vec::with_capacity(texts.len());
        let mut tokens = Some(0u64);
        for (number, part) in texts.chunks(batch).enumerate() {
            let embedded = self
                .embedder
                .embed(part)
                .await
                .map_err(|error| match error {
                    // Name the text by its place in the whole list, not in the batch.
                    EmbeddingError::TextTooLong { index, bytes, max } => {
                        EmbeddingError::TextTooLong {
                            index: number * batch + index,
                            bytes,
                            max,
                        }
                    }
                    other => other,
                })?;
            tokens = match (tokens, embedded.tokens) {
                (Some(sum), Some(more)) => Some(sum + more),
                _ => None,
            };
            vectors.extend(embedded.vectors);
        }
        Ok((vectors, tokens))
    }

    /// Embeds `passages` and writes them to both indexes of `collection` (the vector index
    /// first, then the text index, in batches of at most [`EMBED_BATCH_MAX`]). A passage
    /// indexed again under the same id replaces the earlier one, so indexing is idempotent
    /// and a retried attempt does not duplicate anything.
    ///
    /// # Errors
    /// Embedding or index errors; the batches written before the failure stay written.
    pub async fn index(
        &self,
        org: OrgId,
        collection: &CollectionName,
        passages: Vec<Passage>,
    ) -> Result<IndexReport, Error> {
        let mut report = IndexReport {
            passages: 0,
            tokens: Some(0),
        };
        let batch = EMBED_BATCH_MAX.min(MAX_BATCH);
        let mut passages = passages.into_iter().peekable();
        while passages.peek().is_some() {
            let part: Vec<Passage> = passages.by_ref().take(batch).collect();
            let texts: Vec<String> = part.iter().map(|p| p.text.clone()).collect();
            let (vectors, tokens) = self.embed(&texts).await?;
            report.tokens = match (report.tokens, tokens) {
                (Some(sum), Some(more)) => Some(sum + more),
                _ => None,
            };
            let mut items = Vec::with_capacity(part.len());
            let mut documents = Vec::with_capacity(part.len());
            for (passage, vector) in part.into_iter().zip(vectors) {
                let mut metadata = passage.metadata;
                metadata.insert(TEXT_KEY.to_owned(), Value::String(passage.text.clone()));
                items.push(VectorItem {
                    id: passage.id.clone(),
                    vector,
                    metadata: metadata.clone(),
                });
                documents.push(TextDocument {
                    id: passage.id,
                    text: passage.text,
                    metadata,
                });
            }
            let written = self.vectors.upsert(org, collection, items).await?;
            self.text.index(org, collection, documents).await?;
            report.passages += written;
        }
        Ok(report)
    }

    /// The `k` best passages of `collection` for `query` in `mode`, among those `filter`
    /// matches, best first. An unknown collection gives no hits.
    ///
    /// # Errors
    /// [`SearchError::InvalidK`], [`SearchError::InvalidQuery`], a query the embedder
    /// refuses, index failures.
    pub async fn search(
        &self,
        org: OrgId,
        collection: &CollectionName,
        query: &str,
        k: usize,
        mode: SearchMode,
        filter: &MetadataFilter,
    ) -> Result<Vec<SearchHit>, Error> {
        arches_core::search::validate_k(k)?;
        if query.trim().is_empty() {
            return Err(SearchError::InvalidQuery("the query is empty".to_owned()).into());
        }
        if query.len() > arches_core::search::MAX_QUERY_BYTES {
            return Err(SearchError::InvalidQuery(format!(
                "the query is {} bytes (at most {})",
                query.len(),
                arches_core::search::MAX_QUERY_BYTES
            ))
            .into());
        }
        let text_query = any_word_query(query);
        let hits = match mode {
            SearchMode::Text => self
                .text
                .search(org, collection, &text_query, k, filter)
                .await?
                .into_iter()
                .map(|hit| split_text(hit.id, hit.score, hit.metadata, None, hit.snippet))
                .collect(),
            SearchMode::Vector => {
                let vector = self.embed_query(query).await?;
                self.nearest(org, collection, &vector, k, filter)
                    .await?
                    .into_iter()
                    .map(|hit| {
                        let score = f64::from(hit.score);
                        split_text(hit.id, score, hit.metadata, Some(hit.score), None)
                    })
                    .collect()
            }
            SearchMode::Hybrid => {
                let vector = self.embed_query(query).await?;
                self.hybrid
                    .search(org, collection, &text_query, Some(&vector), k, filter)
                    .await?
                    .into_iter()
                    .map(|hit| {
                        split_text(
                            hit.id,
                            hit.score,
                            hit.metadata,
                            hit.vector_score,
                            hit.snippet,
                        )
                    })
                    .collect()
            }
        };
        Ok(hits)
    }

    /// The `k` nearest passages to `vector`; an unknown collection gives none.
    ///
    /// # Errors
    /// The vector index's.
    pub async fn nearest(
        &self,
        org: OrgId,
        collection: &CollectionName,
        vector: &[f32],
        k: usize,
        filter: &MetadataFilter,
    ) -> Result<Vec<VectorHit>, Error> {
        match self
            .vectors
            .search(org, collection, vector, k, filter)
            .await
        {
            Err(SearchError::CollectionNotFound { .. }) => Ok(Vec::new()),
            other => Ok(other?),
        }
    }

    /// Passages in `collection` (0 when it does not exist).
    ///
    /// # Errors
    /// The text index's.
    pub async fn count(&self, org: OrgId, collection: &CollectionName) -> Result<usize, Error> {
        Ok(self.text.count(org, collection).await?)
    }

    /// Deletes the passages of `ids` from both indexes; returns how many the vector index
    /// held.
    ///
    /// # Errors
    /// The indexes'.
    pub async fn delete(
        &self,
        org: OrgId,
        collection: &CollectionName,
        ids: &[String],
    ) -> Result<usize, Error> {
        let deleted = match self.vectors.delete(org, collection, ids).await {
            Err(SearchError::CollectionNotFound { .. }) => 0,
            other => other?,
        };
        self.text.delete(org, collection, ids).await?;
        Ok(deleted)
    }

    async fn embed_query(&self, query: &str) -> Result<Vec<f32>, Error> {
        let (mut vectors, _) = self.embed(&[query.to_owned()]).await?;
        vectors.pop().ok_or_else(|| {
            Error::Embedding(EmbeddingError::Permanent(
                "the provider returned no vector for the query".to_owned(),
            ))
        })
    }
}

/// The full-text query for `query`: a plain query (no `"phrase"`, no `-word`, no `or`)
/// matches passages holding any of its words, ranked by relevance (BM25 on SQLite), as
/// retrieval rankings do; with any of those operators the query keeps the web-search syntax
/// of the text index (words ANDed, phrases, `or`, exclusions). Requiring every word of a
/// plain query would lose every passage that words a heading's idea differently: on the
/// Rust book's heading queries (BENCHMARKS.md §6) full-text recall@10 was 0.046 with every
/// word required and 0.716 with any.
fn any_word_query(query: &str) -> std::borrow::Cow<'_, str> {
    let words: Vec<&str> = query.split_whitespace().collect();
    let has_syntax = query.contains('"')
        || words
            .iter()
            .any(|word| word.starts_with('-') || word.eq_ignore_ascii_case("or"));
    if has_syntax || words.len() < 2 {
        return std::borrow::Cow::Borrowed(query);
    }
    std::borrow::Cow::Owned(words.join(" or "))
}

fn split_text(
    id: String,
    score: f64,
    mut metadata: Metadata,
    similarity: Option<f32>,
    snippet: Option<String>,
) -> SearchHit {
    let text = match metadata.remove(TEXT_KEY) {
        Some(Value::String(text)) => Some(text),
        _ => None,
    };
    SearchHit {
        id,
        score,
        text,
        metadata,
        similarity,
        snippet,
    }
}

#[cfg(test)]
mod tests {
    use super::any_word_query;

    #[test]
    fn plain_queries_match_any_word_and_operators_keep_their_syntax() {
        assert_eq!(any_word_query("stack and heap"), "stack or and or heap");
        assert_eq!(any_word_query("heap"), "heap");
        assert_eq!(any_word_query("\"the heap\" stack"), "\"the heap\" stack");
        assert_eq!(any_word_query("stack -heap"), "stack -heap");
        assert_eq!(any_word_query("stack OR heap"), "stack OR heap");
    }
}
