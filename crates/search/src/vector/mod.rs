//! The embedded vector index: [`HnswIndex`] implements [`VectorIndex`] with one HNSW graph
//! per `(org, collection)`, persisted under `<root>/<org>/<collection>/` (see `store.rs` for
//! the files and their crash safety).

mod collection;
mod hnsw;
mod store;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use arches_core::search::{
    validate_batch, validate_id, validate_k, validate_vector, CollectionName, MetadataFilter,
    SearchError, VectorHit, VectorIndex, VectorItem,
};
use arches_core::OrgId;
use async_trait::async_trait;

pub use collection::{dot, normalized, Collection, HnswParams};
pub use hnsw::Graph;
pub use store::disk_usage;
use store::StoredCollection;

/// Options of an [`HnswIndex`].
#[derive(Clone, Debug)]
pub struct HnswIndexOptions {
    /// Graph parameters of new collections (`ef_search` applies to every collection).
    pub params: HnswParams,
    /// Most collections open at once in this process (default 4,096); opening another is
    /// refused with [`SearchError::InvalidArgument`].
    pub max_open_collections: usize,
    /// A collection's log is folded into a new snapshot once it passes this many bytes
    /// (default 64 MiB): replaying it at the next open re-inserts its items.
    pub checkpoint_log_bytes: u64,
}

impl Default for HnswIndexOptions {
    fn default() -> Self {
        Self {
            params: HnswParams::default(),
            max_open_collections: 4096,
            checkpoint_log_bytes: 64 << 20,
        }
    }
}

type Shared = Arc<RwLock<StoredCollection>>;

/// The embedded HNSW vector index over a directory.
///
/// Each `(org, collection)` has its own graph and files, so tenants never share a graph.
/// Collections are loaded on first use and kept in memory (vectors, metadata and graph).
/// Every write is logged and synced before it returns; work runs on tokio's blocking pool
/// and HNSW inserts on rayon's pool.
pub struct HnswIndex {
    root: PathBuf,
    options: HnswIndexOptions,
    open: tokio::sync::Mutex<HashMap<(OrgId, CollectionName), Shared>>,
}

fn poisoned() -> SearchError {
    SearchError::Storage("a vector collection's lock is poisoned by an earlier panic".into())
}

fn join_error(error: tokio::task::JoinError) -> SearchError {
    SearchError::Storage(format!("a vector index task failed: {error}"))
}

fn not_found(collection: &CollectionName) -> SearchError {
    SearchError::CollectionNotFound {
        collection: collection.to_string(),
    }
}

impl HnswIndex {
    /// An index over `root` (created if missing).
    ///
    /// Errors: [`SearchError::InvalidArgument`] for bad parameters, storage errors.
    pub fn open(root: impl Into<PathBuf>, options: HnswIndexOptions) -> Result<Self, SearchError> {
        options.params.validate()?;
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(|e| store::io_error("cannot create", &root, e))?;
        Ok(Self {
            root,
            options,
            open: tokio::sync::Mutex::new(HashMap::new()),
        })
    }

    /// The directory of a collection.
    pub fn collection_dir(&self, org: OrgId, collection: &CollectionName) -> PathBuf {
        self.root
            .join(org.0.simple().to_string())
            .join(collection.as_str())
    }

    /// The open collection, loading it from disk; with `create_dim`, a missing collection is
    /// created with that dimension. `None` when it does not exist.
    async fn collection(
        &self,
        org: OrgId,
        collection: &CollectionName,
        create_dim: Option<usize>,
    ) -> Result<Option<Shared>, SearchError> {
        let key = (org, collection.clone());
        let mut open = self.open.lock().await;
        if let Some(shared) = open.get(&key) {
            return Ok(Some(shared.clone()));
        }
        if open.len() >= self.options.max_open_collections {
            return Err(SearchError::InvalidArgument(format!(
                "more than {} vector collections open",
                self.options.max_open_collections
            )));
        }
        let dir = self.collection_dir(org, collection);
        let params = self.options.params;
        let loaded =
            tokio::task::spawn_blocking(move || match StoredCollection::open(&dir, params)? {
                Some(stored) => Ok(Some(stored)),
                None => match create_dim {
                    Some(dim) => StoredCollection::create(&dir, dim, params).map(Some),
                    None => Ok(None),
                },
            })
            .await
            .map_err(join_error)??;
        Ok(loaded.map(|stored| {
            let shared = Arc::new(RwLock::new(stored));
            open.insert(key, shared.clone());
            shared
        }))
    }

    /// Writes a fresh snapshot of every open collection (their logs become empty), so the
    /// next open reads no log. Call before a planned shutdown to make restarts fast.
    ///
    /// Errors: storage.
    pub async fn checkpoint_all(&self) -> Result<(), SearchError> {
        let open: Vec<Shared> = self.open.lock().await.values().cloned().collect();
        tokio::task::spawn_blocking(move || {
            for shared in open {
                let mut stored = shared.write().map_err(|_| poisoned())?;
                if !stored.dropped {
                    stored.checkpoint()?;
                }
            }
            Ok(())
        })
        .await
        .map_err(join_error)?
    }

    /// Bytes on disk of a collection's files (0 when it does not exist).
    pub fn disk_usage(&self, org: OrgId, collection: &CollectionName) -> u64 {
        disk_usage(&self.collection_dir(org, collection))
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

#[async_trait]
impl VectorIndex for HnswIndex {
    async fn upsert(
        &self,
        org: OrgId,
        collection: &CollectionName,
        items: Vec<VectorItem>,
    ) -> Result<usize, SearchError> {
        validate_batch(items.len())?;
        let Some(first) = items.first() else {
            return Ok(0);
        };
        validate_vector(Some(&first.id), &first.vector)?;
        let shared = self
            .collection(org, collection, Some(first.vector.len()))
            .await?
            .ok_or_else(|| not_found(collection))?;
        let checkpoint = self.options.checkpoint_log_bytes;
        let collection = collection.clone();
        tokio::task::spawn_blocking(move || {
            let dim = shared.read().map_err(|_| poisoned())?.collection.dim();
            let n = items.len();
            let prepared = Collection::prepare(dim, items)?;
            let mut stored = shared.write().map_err(|_| poisoned())?;
            if stored.dropped {
                return Err(not_found(&collection));
            }
            stored.upsert(prepared, checkpoint)?;
            Ok(n)
        })
        .await
        .map_err(join_error)?
    }

    async fn delete(
        &self,
        org: OrgId,
        collection: &CollectionName,
        ids: &[String],
    ) -> Result<usize, SearchError> {
        validate_batch(ids.len())?;
        for id in ids {
            validate_id(id)?;
        }
        let shared = self
            .collection(org, collection, None)
            .await?
            .ok_or_else(|| not_found(collection))?;
        let checkpoint = self.options.checkpoint_log_bytes;
        let ids = ids.to_vec();
        let collection = collection.clone();
        tokio::task::spawn_blocking(move || {
            let mut stored = shared.write().map_err(|_| poisoned())?;
            if stored.dropped {
                return Err(not_found(&collection));
            }
            stored.delete(&ids, checkpoint)
        })
        .await
        .map_err(join_error)?
    }

    async fn search(
        &self,
        org: OrgId,
        collection: &CollectionName,
        query: &[f32],
        k: usize,
        filter: &MetadataFilter,
    ) -> Result<Vec<VectorHit>, SearchError> {
        validate_k(k)?;
        validate_vector(None, query)?;
        let shared = self
            .collection(org, collection, None)
            .await?
            .ok_or_else(|| not_found(collection))?;
        let query = normalized(query);
        let filter = filter.clone();
        let collection = collection.clone();
        tokio::task::spawn_blocking(move || {
            let stored = shared.read().map_err(|_| poisoned())?;
            if stored.dropped {
                return Err(not_found(&collection));
            }
            let c = &stored.collection;
            if query.len() != c.dim() {
                return Err(SearchError::DimensionMismatch {
                    expected: c.dim(),
                    got: query.len(),
                    id: None,
                });
            }
            Ok(c.search_slots(&query, k, &filter, None)
                .into_iter()
                .map(|(slot, score)| {
                    let slot = c.slot(slot);
                    VectorHit {
                        id: slot.id.clone(),
                        score: score.clamp(-1.0, 1.0),
                        metadata: slot.metadata.clone(),
                    }
                })
                .collect())
        })
        .await
        .map_err(join_error)?
    }

    async fn count(&self, org: OrgId, collection: &CollectionName) -> Result<usize, SearchError> {
        let shared = self
            .collection(org, collection, None)
            .await?
            .ok_or_else(|| not_found(collection))?;
        let stored = shared.read().map_err(|_| poisoned())?;
        if stored.dropped {
            return Err(not_found(collection));
        }
        Ok(stored.collection.len())
    }

    async fn drop_collection(
        &self,
        org: OrgId,
        collection: &CollectionName,
    ) -> Result<bool, SearchError> {
        let shared = self.collection(org, collection, None).await?;
        let key = (org, collection.clone());
        let Some(shared) = shared else {
            return Ok(false);
        };
        let mut open = self.open.lock().await;
        tokio::task::spawn_blocking(move || {
            let mut stored = shared.write().map_err(|_| poisoned())?;
            stored.dropped = true;
            std::fs::remove_dir_all(&stored.dir)
                .map_err(|e| store::io_error("cannot remove", &stored.dir, e))
        })
        .await
        .map_err(join_error)??;
        open.remove(&key);
        Ok(true)
    }
}

/// Writes `collection` as generation 1 of a collection directory `dir` (the benchmark's
/// way to measure the size on disk).
pub(crate) fn write_snapshot_for_bench(
    dir: &Path,
    collection: &Collection,
) -> Result<(), SearchError> {
    std::fs::create_dir_all(dir).map_err(|e| store::io_error("cannot create", dir, e))?;
    store::write_snapshot(dir, 1, collection)
}

/// Opens the collection of `dir` (the benchmark's reload measurement).
pub(crate) fn reload_for_bench(dir: &Path, params: HnswParams) -> Result<Collection, SearchError> {
    StoredCollection::open(dir, params)?
        .map(|stored| stored.collection)
        .ok_or_else(|| SearchError::Storage(format!("no collection in {}", dir.display())))
}
