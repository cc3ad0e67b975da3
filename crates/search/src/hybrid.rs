//! Hybrid search: a vector ranking and a full-text ranking of the same collection fused by
//! reciprocal rank fusion ([`arches_core::search::weighted_reciprocal_rank_fusion`]).

use std::collections::HashMap;
use std::sync::Arc;

use arches_core::search::{
    validate_k, weighted_reciprocal_rank_fusion, CollectionName, Metadata, MetadataFilter,
    SearchError, TextIndex, VectorIndex, MAX_K, RRF_K,
};
use arches_core::OrgId;

/// One fused result.
#[derive(Clone, Debug, PartialEq)]
pub struct HybridHit {
    /// The item's id (the same id in both indexes).
    pub id: String,
    /// The fused score `Σ w / (rrf_k + rank)`.
    pub score: f64,
    /// Rank (from 1) in the vector candidates, if there.
    pub vector_rank: Option<usize>,
    /// Cosine similarity, if among the vector candidates.
    pub vector_score: Option<f32>,
    /// Rank (from 1) in the text candidates, if there.
    pub text_rank: Option<usize>,
    /// Text relevance, if among the text candidates.
    pub text_score: Option<f64>,
    /// The text index's snippet, if among the text candidates.
    pub snippet: Option<String>,
    /// Metadata (from the vector index when both have the item).
    pub metadata: Metadata,
}

/// Searches a vector index and a text index and fuses their rankings by RRF (Cormack, Clarke
/// & Büttcher, SIGIR 2009).
pub struct HybridSearch {
    vectors: Arc<dyn VectorIndex>,
    text: Arc<dyn TextIndex>,
    /// RRF's `k` (default [`RRF_K`], 60).
    pub rrf_k: f64,
    /// Weight of the vector ranking (default 1).
    pub vector_weight: f64,
    /// Weight of the text ranking (default 1).
    pub text_weight: f64,
    /// Candidates fetched from each index per result wanted (default 4; at most
    /// [`MAX_K`] candidates in all).
    pub candidates_per_hit: usize,
}

impl HybridSearch {
    /// Hybrid search over the two indexes, with the defaults.
    pub fn new(vectors: Arc<dyn VectorIndex>, text: Arc<dyn TextIndex>) -> Self {
        Self {
            vectors,
            text,
            rrf_k: RRF_K,
            vector_weight: 1.0,
            text_weight: 1.0,
            candidates_per_hit: 4,
        }
    }

    /// The `k` best items of `collection` for the text `query` and, when given, its
    /// embedding `vector`, among those `filter` matches. A collection missing from the vector
    /// index contributes no candidates.
    ///
    /// Errors: those of both indexes' searches; [`SearchError::InvalidArgument`] for bad
    /// weights or `rrf_k`.
    pub async fn search(
        &self,
        org: OrgId,
        collection: &CollectionName,
        query: &str,
        vector: Option<&[f32]>,
        k: usize,
        filter: &MetadataFilter,
    ) -> Result<Vec<HybridHit>, SearchError> {
        validate_k(k)?;
        let candidates = k.saturating_mul(self.candidates_per_hit.max(1)).min(MAX_K);
        let text_search = self.text.search(org, collection, query, candidates, filter);
        let vector_search = async {
            match vector {
                Some(v) => match self
                    .vectors
                    .search(org, collection, v, candidates, filter)
                    .await
                {
                    Err(SearchError::CollectionNotFound { .. }) => Ok(Vec::new()),
                    other => other,
                },
                None => Ok(Vec::new()),
            }
        };
        let (text_hits, vector_hits) = tokio::join!(text_search, vector_search);
        let (text_hits, vector_hits) = (text_hits?, vector_hits?);
        let vector_ids: Vec<&str> = vector_hits.iter().map(|h| h.id.as_str()).collect();
        let text_ids: Vec<&str> = text_hits.iter().map(|h| h.id.as_str()).collect();
        let fused = weighted_reciprocal_rank_fusion(
            &[
                (&vector_ids[..], self.vector_weight),
                (&text_ids[..], self.text_weight),
            ],
            self.rrf_k,
        )?;
        let vector_by_id: HashMap<&str, (usize, &arches_core::search::VectorHit)> = vector_hits
            .iter()
            .enumerate()
            .map(|(i, h)| (h.id.as_str(), (i + 1, h)))
            .collect();
        let text_by_id: HashMap<&str, (usize, &arches_core::search::TextHit)> = text_hits
            .iter()
            .enumerate()
            .rev()
            .map(|(i, h)| (h.id.as_str(), (i + 1, h)))
            .collect();
        Ok(fused
            .into_iter()
            .take(k)
            .map(|f| {
                let v = vector_by_id.get(f.id.as_str());
                let t = text_by_id.get(f.id.as_str());
                let metadata = v
                    .map(|(_, h)| h.metadata.clone())
                    .or_else(|| t.map(|(_, h)| h.metadata.clone()))
                    .unwrap_or_default();
                HybridHit {
                    score: f.score,
                    vector_rank: v.map(|(r, _)| *r),
                    vector_score: v.map(|(_, h)| h.score),
                    text_rank: t.map(|(r, _)| *r),
                    text_score: t.map(|(_, h)| h.score),
                    snippet: t.and_then(|(_, h)| h.snippet.clone()),
                    metadata,
                    id: f.id,
                }
            })
            .collect())
    }
}
