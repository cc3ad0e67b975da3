//! One vector collection in memory: the items (L2-normalised vectors, ids, metadata,
//! tombstones) and their HNSW graph (`hnsw.rs`), with filtered search and compaction. No
//! I/O: `store.rs` persists it.

use std::collections::HashMap;

use arches_core::search::{Metadata, MetadataFilter, SearchError, VectorItem};

use super::hnsw::Graph;

/// HNSW graph parameters (Malkov & Yashunin 2018, section 4): `m` links per node on upper
/// layers (`2m` on layer 0), `ef_construction` candidates kept while inserting,
/// `ef_search` candidates kept while searching (raised to `k` when smaller).
///
/// The defaults (`m` 16, `ef_construction` 100, `ef_search` 32) are those of the benchmark
/// (`examples/vector_bench.rs`): on 100,000 × 384 clustered vectors, `ef_search` 32 gave
/// recall@10 ≈ 0.97 (24 gave 0.94).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HnswParams {
    /// Links per node and layer, 4..=128.
    pub m: usize,
    /// Build-time beam width, 8..=2048.
    pub ef_construction: usize,
    /// Query-time beam width, 1..=10,000 (at least `k` is used).
    pub ef_search: usize,
}

impl Default for HnswParams {
    fn default() -> Self {
        Self {
            m: 16,
            ef_construction: 100,
            ef_search: 32,
        }
    }
}

impl HnswParams {
    /// Checks the documented ranges.
    ///
    /// Errors: [`SearchError::InvalidArgument`] naming the parameter.
    pub fn validate(&self) -> Result<(), SearchError> {
        let check = |name: &str, v: usize, lo: usize, hi: usize| {
            if v < lo || v > hi {
                Err(SearchError::InvalidArgument(format!(
                    "HNSW parameter {name} = {v} is out of range {lo}..={hi}"
                )))
            } else {
                Ok(())
            }
        };
        check("m", self.m, 4, 128)?;
        check("ef_construction", self.ef_construction, 8, 2048)?;
        check("ef_search", self.ef_search, 1, 10_000)
    }
}

/// Compaction (a graph rebuilt from the live items) happens once tombstones exceed this
/// share of the graph's nodes…
const COMPACT_TOMBSTONE_SHARE: f64 = 0.25;
/// …and this count, so small collections are not rebuilt at every delete.
const COMPACT_TOMBSTONES_MIN: usize = 64;

/// Filters passing at most this share of a sample of items are searched exactly (a scan of
/// the matching items) instead of through the graph, where such filters make the beam
/// search wander.
const EXACT_SCAN_SHARE: f64 = 0.02;
/// Items sampled to estimate a filter's selectivity.
const SELECTIVITY_SAMPLE: usize = 1024;
/// Collections of at most this many items are always searched exactly.
const EXACT_SCAN_MAX_ITEMS: usize = 2048;

/// The dot product, with eight independent accumulators so the compiler vectorises it.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let chunks_a = a.chunks_exact(8);
    let chunks_b = b.chunks_exact(8);
    let tail: f32 = chunks_a
        .remainder()
        .iter()
        .zip(chunks_b.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (ca, cb) in chunks_a.zip(chunks_b) {
        for i in 0..8 {
            acc[i] += ca[i] * cb[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `v / |v|`. The caller has checked that `v` is finite and not zero.
pub fn normalized(v: &[f32]) -> Vec<f32> {
    let norm = v
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt();
    v.iter().map(|&x| (f64::from(x) / norm) as f32).collect()
}

/// A new empty graph of these parameters.
pub(crate) fn new_graph(params: &HnswParams) -> Graph {
    Graph::new(params.m, params.ef_construction)
}

/// One item: its normalised vector lives in [`Collection::vectors`] at `slot * dim`.
#[derive(Clone, Debug)]
pub(crate) struct Slot {
    pub(crate) id: String,
    pub(crate) metadata: Metadata,
    pub(crate) deleted: bool,
}

/// A collection's items and graph. Slot `i` is the graph's data id `i`.
pub struct Collection {
    pub(crate) dim: usize,
    pub(crate) params: HnswParams,
    pub(crate) slots: Vec<Slot>,
    /// `slots.len() * dim` normalised components.
    pub(crate) vectors: Vec<f32>,
    pub(crate) by_id: HashMap<String, usize>,
    pub(crate) graph: Graph,
    pub(crate) tombstones: usize,
}

/// One normalised item ready to insert.
pub(crate) struct Prepared {
    pub(crate) id: String,
    pub(crate) vector: Vec<f32>,
    pub(crate) metadata: Metadata,
}

impl Collection {
    /// An empty collection of dimension `dim`.
    pub fn new(dim: usize, params: HnswParams) -> Self {
        Self {
            dim,
            params,
            slots: Vec::new(),
            vectors: Vec::new(),
            by_id: HashMap::new(),
            graph: new_graph(&params),
            tombstones: 0,
        }
    }

    /// The collection's dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The number of live items.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether no item is live.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Approximate bytes of memory of the graph's links.
    pub fn graph_memory_bytes(&self) -> usize {
        self.graph.memory_bytes()
    }

    /// The graph parameters.
    pub fn params(&self) -> HnswParams {
        self.params
    }

    /// Sets the query-time beam width (1..=10,000).
    ///
    /// Errors: [`SearchError::InvalidArgument`].
    pub fn set_ef_search(&mut self, ef_search: usize) -> Result<(), SearchError> {
        let params = HnswParams {
            ef_search,
            ..self.params
        };
        params.validate()?;
        self.params = params;
        Ok(())
    }

    /// Validates and normalises `items` against this collection's dimension.
    pub(crate) fn prepare(
        dim: usize,
        items: Vec<VectorItem>,
    ) -> Result<Vec<Prepared>, SearchError> {
        arches_core::search::validate_batch(items.len())?;
        let mut prepared = Vec::with_capacity(items.len());
        for item in items {
            arches_core::search::validate_id(&item.id)?;
            if item.vector.len() != dim {
                return Err(SearchError::DimensionMismatch {
                    expected: dim,
                    got: item.vector.len(),
                    id: Some(item.id),
                });
            }
            arches_core::search::validate_vector(Some(&item.id), &item.vector)?;
            arches_core::search::encode_metadata(&item.id, &item.metadata)?;
            prepared.push(Prepared {
                vector: normalized(&item.vector),
                id: item.id,
                metadata: item.metadata,
            });
        }
        Ok(prepared)
    }

    /// Inserts or replaces already prepared items (a replaced item's old node becomes a
    /// tombstone). Returns whether this compacted the collection.
    pub(crate) fn apply_upsert(&mut self, items: Vec<Prepared>) -> bool {
        // The last of repeated ids wins.
        let mut last: HashMap<&str, usize> = HashMap::new();
        for (i, item) in items.iter().enumerate() {
            last.insert(item.id.as_str(), i);
        }
        let keep: Vec<bool> = (0..items.len())
            .map(|i| last.get(items[i].id.as_str()) == Some(&i))
            .collect();
        let first_new = self.slots.len();
        for (item, keep) in items.into_iter().zip(keep) {
            if !keep {
                continue;
            }
            if let Some(old) = self.by_id.remove(&item.id) {
                self.slots[old].deleted = true;
                self.tombstones += 1;
            }
            let slot = self.slots.len();
            self.vectors.extend_from_slice(&item.vector);
            self.by_id.insert(item.id.clone(), slot);
            self.slots.push(Slot {
                id: item.id,
                metadata: item.metadata,
                deleted: false,
            });
        }
        for slot in first_new..self.slots.len() {
            self.graph.insert(slot as u32, &self.vectors, self.dim);
        }
        self.compact_if_needed()
    }

    /// Deletes the items of `ids`; returns how many existed and whether this compacted the
    /// collection.
    pub(crate) fn apply_delete(&mut self, ids: &[String]) -> (usize, bool) {
        let mut deleted = 0;
        for id in ids {
            if let Some(slot) = self.by_id.remove(id) {
                self.slots[slot].deleted = true;
                self.tombstones += 1;
                deleted += 1;
            }
        }
        (deleted, self.compact_if_needed())
    }

    /// Rebuilds the graph from the live items when tombstones pass the thresholds.
    /// Returns whether it did.
    pub(crate) fn compact_if_needed(&mut self) -> bool {
        let share = self.tombstones as f64 / self.slots.len().max(1) as f64;
        if self.tombstones >= COMPACT_TOMBSTONES_MIN && share > COMPACT_TOMBSTONE_SHARE {
            self.compact();
            true
        } else {
            false
        }
    }

    /// Drops tombstones: live items get fresh slots and a freshly built graph.
    pub fn compact(&mut self) {
        let dim = self.dim;
        let mut slots = Vec::with_capacity(self.by_id.len());
        let mut vectors = Vec::with_capacity(self.by_id.len() * dim);
        let mut by_id = HashMap::with_capacity(self.by_id.len());
        for (old, slot) in std::mem::take(&mut self.slots).into_iter().enumerate() {
            if slot.deleted {
                continue;
            }
            by_id.insert(slot.id.clone(), slots.len());
            vectors.extend_from_slice(&self.vectors[old * dim..(old + 1) * dim]);
            slots.push(slot);
        }
        self.slots = slots;
        self.vectors = vectors;
        self.by_id = by_id;
        self.tombstones = 0;
        self.graph = Self::build_graph(&self.params, dim, &self.vectors, &self.slots);
    }

    /// A graph of every slot (deleted ones too, so node numbers are slots).
    pub(crate) fn build_graph(
        params: &HnswParams,
        dim: usize,
        vectors: &[f32],
        slots: &[Slot],
    ) -> Graph {
        let mut graph = new_graph(params);
        for slot in 0..slots.len() {
            graph.insert(slot as u32, vectors, dim);
        }
        graph
    }

    fn vector(&self, slot: usize) -> &[f32] {
        &self.vectors[slot * self.dim..(slot + 1) * self.dim]
    }

    /// Whether `slot` is live and matches `filter`.
    fn admits(&self, slot: usize, filter: &MetadataFilter) -> bool {
        self.slots
            .get(slot)
            .is_some_and(|s| !s.deleted && filter.matches(&s.metadata))
    }

    /// The `k` live items most similar to `query` that match `filter`, as `(slot, cosine
    /// similarity)`, best first, ties by id. `query` must be normalised and of this
    /// collection's dimension; `ef` overrides the beam width.
    ///
    /// Returns `min(k, matching items)` hits: when the graph search finds fewer, the beam
    /// is widened (×4, three times) and then the matching items are scanned exactly.
    pub fn search_slots(
        &self,
        query: &[f32],
        k: usize,
        filter: &MetadataFilter,
        ef: Option<usize>,
    ) -> Vec<(usize, f32)> {
        let live = self.len();
        if live == 0 || k == 0 {
            return Vec::new();
        }
        let ef = ef.unwrap_or(self.params.ef_search).max(k);
        if live <= EXACT_SCAN_MAX_ITEMS || (!filter.is_empty() && self.is_selective(filter)) {
            return self.exact(query, k, filter);
        }
        let unfiltered = filter.is_empty() && self.tombstones == 0;
        let want = k.min(live);
        let mut ef = ef;
        for _round in 0..4 {
            let admit = |node: u32| self.admits(node as usize, filter);
            let neighbours = if unfiltered {
                self.graph.search(query, ef, &self.vectors, self.dim, None)
            } else {
                self.graph
                    .search(query, ef, &self.vectors, self.dim, Some(&admit))
            };
            let mut hits: Vec<(usize, f32)> = neighbours
                .iter()
                .map(|&(_, node)| node as usize)
                .filter(|&slot| self.admits(slot, filter))
                .map(|slot| (slot, dot(query, self.vector(slot))))
                .collect();
            if hits.len() >= want {
                self.sort_hits(&mut hits);
                hits.truncate(k);
                return hits;
            }
            if ef >= live {
                break;
            }
            ef = ef.saturating_mul(4).min(live.max(k));
        }
        // Fewer than k found: either fewer match, or the graph missed them.
        self.exact(query, k, filter)
    }

    /// Whether `filter` passes at most [`EXACT_SCAN_SHARE`] of a strided sample of slots.
    fn is_selective(&self, filter: &MetadataFilter) -> bool {
        let n = self.slots.len();
        let step = (n / SELECTIVITY_SAMPLE).max(1);
        let mut sampled = 0usize;
        let mut passed = 0usize;
        let mut slot = 0;
        while slot < n {
            if !self.slots[slot].deleted {
                sampled += 1;
                if filter.matches(&self.slots[slot].metadata) {
                    passed += 1;
                }
            }
            slot += step;
        }
        sampled == 0 || (passed as f64) <= EXACT_SCAN_SHARE * sampled as f64
    }

    /// Brute force over the live slots that match `filter`.
    pub fn exact(&self, query: &[f32], k: usize, filter: &MetadataFilter) -> Vec<(usize, f32)> {
        let mut hits: Vec<(usize, f32)> = (0..self.slots.len())
            .filter(|&slot| self.admits(slot, filter))
            .map(|slot| (slot, dot(query, self.vector(slot))))
            .collect();
        self.sort_hits(&mut hits);
        hits.truncate(k);
        hits
    }

    fn sort_hits(&self, hits: &mut [(usize, f32)]) {
        hits.sort_by(|a, b| {
            b.1.total_cmp(&a.1)
                .then_with(|| self.slots[a.0].id.cmp(&self.slots[b.0].id))
        });
    }

    /// The id and metadata of a slot.
    pub(crate) fn slot(&self, slot: usize) -> &Slot {
        &self.slots[slot]
    }

    /// Builds a collection from already normalised items in one go (the benchmark's path):
    /// `vectors` holds `ids.len() * dim` components.
    ///
    /// Errors: [`SearchError::InvalidArgument`] when the lengths disagree or parameters
    /// are out of range.
    pub fn build(
        dim: usize,
        params: HnswParams,
        ids: Vec<String>,
        vectors: Vec<f32>,
    ) -> Result<Self, SearchError> {
        params.validate()?;
        if dim == 0 || vectors.len() != ids.len() * dim {
            return Err(SearchError::InvalidArgument(format!(
                "{} components for {} ids of dimension {dim}",
                vectors.len(),
                ids.len()
            )));
        }
        let slots: Vec<Slot> = ids
            .into_iter()
            .map(|id| Slot {
                id,
                metadata: Metadata::new(),
                deleted: false,
            })
            .collect();
        let by_id = slots
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.clone(), i))
            .collect();
        let graph = Self::build_graph(&params, dim, &vectors, &slots);
        Ok(Self {
            dim,
            params,
            slots,
            vectors,
            by_id,
            graph,
            tombstones: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_the_naive_sum() {
        let a: Vec<f32> = (0..19).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..19).map(|i| 1.0 - i as f32 * 0.1).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - naive).abs() < 1e-4);
        let n = normalized(&[3.0, 4.0]);
        assert!((n[0] - 0.6).abs() < 1e-7 && (n[1] - 0.8).abs() < 1e-7);
    }

    #[test]
    fn params_are_checked() {
        assert!(HnswParams::default().validate().is_ok());
        let bad = HnswParams {
            m: 1,
            ..HnswParams::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(SearchError::InvalidArgument(message)) if message.contains("m = 1")
        ));
    }
}
