//! Assembly of the search services (`[search]`): the embedding provider, the embedded HNSW
//! vector index and the full-text index (SQLite FTS5 beside a SQLite store, PostgreSQL full
//! text on a PostgreSQL store), shared by the search tools and `/api/v1/search`.
//!
//! The local model is loaded on first use, not at start: a server that never embeds pays
//! nothing (87 MiB of weights, a second of loading), and a missing model fails only the
//! tasks and requests that need it, naming the file and how to install it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arches_core::embedding::{EmbeddingError, EmbeddingProvider, Embeddings};
use arches_core::search::{
    CollectionName, MetadataFilter, SearchError, TextDocument, TextHit, TextIndex, VectorHit,
    VectorIndex, VectorItem,
};
use arches_core::OrgId;
use arches_embed::{MiniLmEmbedder, MiniLmOptions, MINILM_DIR_NAME, MINILM_MODEL_NAME};
use arches_search::{HnswIndex, HnswIndexOptions, PgTextIndex, SqliteTextIndex};
use arches_tools::search::SearchServices;
use async_trait::async_trait;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::app::BuildError;
use crate::config::ServerConfig;

/// Components of all-MiniLM-L6-v2's vectors (its `hidden_size`), known before it loads.
pub const MINILM_DIMENSION: usize = 384;

/// The default directory of the local model: `$ARCHES_MODEL_DIR/all-MiniLM-L6-v2`, else
/// `~/.cache/arches/models/all-MiniLM-L6-v2` (where `scripts/fetch-model` puts it).
pub fn default_model_dir() -> PathBuf {
    let models = std::env::var_os("ARCHES_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
            home.join(".cache").join("arches").join("models")
        });
    models.join(MINILM_DIR_NAME)
}

/// all-MiniLM-L6-v2, loaded from `dir` by the first call that embeds.
pub struct LazyMiniLm {
    dir: PathBuf,
    loaded: tokio::sync::OnceCell<MiniLmEmbedder>,
}

impl LazyMiniLm {
    /// The model in `dir`, not loaded yet.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            loaded: tokio::sync::OnceCell::new(),
        }
    }

    async fn embedder(&self) -> Result<&MiniLmEmbedder, EmbeddingError> {
        self.loaded
            .get_or_try_init(|| async {
                let dir = self.dir.clone();
                tokio::task::spawn_blocking(move || MiniLmEmbedder::load(&dir, MiniLmOptions::default()))
                    .await
                    .map_err(|error| EmbeddingError::Unavailable(format!("model loading stopped: {error}")))?
                    .map_err(|error| match error {
                        EmbeddingError::ModelLoad { file, reason } => EmbeddingError::ModelLoad {
                            file,
                            reason: format!(
                                "{reason} (install the model with scripts/fetch-model, or set [search] model_dir)"
                            ),
                        },
                        other => other,
                    })
            })
            .await
    }
}

#[async_trait]
impl EmbeddingProvider for LazyMiniLm {
    fn model(&self) -> &str {
        MINILM_MODEL_NAME
    }

    fn dimension(&self) -> usize {
        MINILM_DIMENSION
    }

    fn max_batch(&self) -> usize {
        arches_embed::DEFAULT_MAX_BATCH
    }

    fn max_text_bytes(&self) -> usize {
        arches_core::embedding::DEFAULT_MAX_TEXT_BYTES
    }

    async fn embed(&self, texts: &[String]) -> Result<Embeddings, EmbeddingError> {
        self.embedder().await?.embed(texts).await
    }
}

/// The search services of a server, worker or local run, `None` when `[search] enabled` is
/// false. Nothing is opened here: the model, the vector index (and its directory's lock) and
/// the text index open on first use, so a process that never searches pays nothing, and a
/// problem (a missing model, an index directory another process holds, an unreachable
/// database) fails the tasks and requests that need them, naming the cause.
///
/// # Errors
/// [`BuildError::Config`] for an incomplete embeddings endpoint.
pub fn services(
    config: &ServerConfig,
    home: &Path,
    http: Arc<arches_tools::HttpTool>,
) -> Result<Option<Arc<SearchServices>>, BuildError> {
    let search = &config.search;
    if !search.enabled {
        return Ok(None);
    }
    let embedder: Arc<dyn EmbeddingProvider> = match &search.embedding_base_url {
        Some(base_url) => {
            let (Some(model), Some(dimension)) =
                (&search.embedding_model, search.embedding_dimension)
            else {
                return Err(BuildError::Config(
                    "search.embedding_base_url needs search.embedding_model and search.embedding_dimension"
                        .to_owned(),
                ));
            };
            let mut settings = arches_tools::llm::EmbeddingSettings::new(
                base_url.clone(),
                model.clone(),
                dimension,
            );
            settings.api_key = search
                .embedding_api_key
                .as_ref()
                .map(|key| arches_tools::ApiKey::new(key.expose()));
            Arc::new(
                arches_tools::llm::OpenAiEmbeddings::new(http, settings)
                    .map_err(|error| BuildError::Config(format!("search: {error}")))?,
            )
        }
        None => Arc::new(LazyMiniLm::new(
            search.model_dir.clone().unwrap_or_else(default_model_dir),
        )),
    };
    let index_dir = search
        .index_dir
        .clone()
        .unwrap_or_else(|| home.join("search").join("vectors"));
    let text = match &config.store.database_url {
        Some(url) => TextBackend::Postgres(url.expose().to_owned()),
        None => TextBackend::Sqlite(home.join("search").join("text.db")),
    };
    Ok(Some(Arc::new(SearchServices::new(
        embedder,
        Arc::new(LazyVectorIndex {
            dir: index_dir,
            opened: tokio::sync::OnceCell::new(),
        }),
        Arc::new(LazyTextIndex {
            backend: text,
            opened: tokio::sync::OnceCell::new(),
        }),
    ))))
}

/// The embedded HNSW index under `dir`, opened (and its directory locked) on first use.
struct LazyVectorIndex {
    dir: PathBuf,
    opened: tokio::sync::OnceCell<LockedIndex>,
}

impl LazyVectorIndex {
    async fn index(&self) -> Result<&HnswIndex, SearchError> {
        let locked = self
            .opened
            .get_or_try_init(|| async {
                let dir = self.dir.clone();
                tokio::task::spawn_blocking(move || open_locked(&dir))
                    .await
                    .map_err(|error| {
                        SearchError::Storage(format!("opening the vector index stopped: {error}"))
                    })?
            })
            .await?;
        Ok(&locked.index)
    }
}

fn open_locked(dir: &Path) -> Result<LockedIndex, SearchError> {
    let storage = |what: &str, error: &dyn std::fmt::Display| {
        SearchError::Storage(format!("{what} {}: {error}", dir.display()))
    };
    std::fs::create_dir_all(dir).map_err(|error| storage("cannot create", &error))?;
    let lock = match lock_index_dir(dir) {
        Ok(Some(lock)) => lock,
        Ok(None) => {
            return Err(SearchError::Storage(format!(
                "the vector index {} is in use by another process: give each process its own [search] index_dir",
                dir.display()
            )))
        }
        Err(error) => return Err(storage("cannot lock", &error)),
    };
    let index = HnswIndex::open(dir, HnswIndexOptions::default())?;
    Ok(LockedIndex { index, _lock: lock })
}

/// Where full text is indexed.
enum TextBackend {
    /// An SQLite file of its own beside the store.
    Sqlite(PathBuf),
    /// The store's PostgreSQL database (the URL).
    Postgres(String),
}

/// The full-text index, opened on first use.
struct LazyTextIndex {
    backend: TextBackend,
    opened: tokio::sync::OnceCell<Box<dyn TextIndex>>,
}

impl LazyTextIndex {
    async fn opened(&self) -> Result<&dyn TextIndex, SearchError> {
        let opened = self
            .opened
            .get_or_try_init(|| async {
                let index: Box<dyn TextIndex> = match &self.backend {
                    TextBackend::Sqlite(path) => {
                        if let Some(parent) = path.parent() {
                            std::fs::create_dir_all(parent).map_err(|error| {
                                SearchError::Storage(format!(
                                    "cannot create {}: {error}",
                                    parent.display()
                                ))
                            })?;
                        }
                        Box::new(SqliteTextIndex::open(path).await?)
                    }
                    TextBackend::Postgres(url) => Box::new(PgTextIndex::connect(url).await?),
                };
                Ok::<_, SearchError>(index)
            })
            .await?;
        Ok(&**opened)
    }
}

#[async_trait]
impl TextIndex for LazyTextIndex {
    async fn index(
        &self,
        org: OrgId,
        collection: &CollectionName,
        documents: Vec<TextDocument>,
    ) -> Result<usize, SearchError> {
        self.opened().await?.index(org, collection, documents).await
    }

    async fn delete(
        &self,
        org: OrgId,
        collection: &CollectionName,
        ids: &[String],
    ) -> Result<usize, SearchError> {
        self.opened().await?.delete(org, collection, ids).await
    }

    async fn search(
        &self,
        org: OrgId,
        collection: &CollectionName,
        query: &str,
        k: usize,
        filter: &MetadataFilter,
    ) -> Result<Vec<TextHit>, SearchError> {
        self.opened()
            .await?
            .search(org, collection, query, k, filter)
            .await
    }

    async fn count(&self, org: OrgId, collection: &CollectionName) -> Result<usize, SearchError> {
        self.opened().await?.count(org, collection).await
    }

    async fn drop_collection(
        &self,
        org: OrgId,
        collection: &CollectionName,
    ) -> Result<bool, SearchError> {
        self.opened().await?.drop_collection(org, collection).await
    }
}

/// Takes the exclusive lock of an index directory (`<dir>/.lock`, `flock`): the embedded
/// index's log and snapshots have one writer, so a second process on the same directory
/// would corrupt them. `None` when another process holds it.
fn lock_index_dir(dir: &Path) -> std::io::Result<Option<Flock<std::fs::File>>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(".lock"))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, errno)) => Err(std::io::Error::from(errno)),
    }
}

/// The HNSW index with its directory's lock, held as long as the index lives.
struct LockedIndex {
    index: HnswIndex,
    _lock: Flock<std::fs::File>,
}

#[async_trait]
impl VectorIndex for LazyVectorIndex {
    async fn upsert(
        &self,
        org: OrgId,
        collection: &CollectionName,
        items: Vec<VectorItem>,
    ) -> Result<usize, SearchError> {
        self.index().await?.upsert(org, collection, items).await
    }

    async fn delete(
        &self,
        org: OrgId,
        collection: &CollectionName,
        ids: &[String],
    ) -> Result<usize, SearchError> {
        self.index().await?.delete(org, collection, ids).await
    }

    async fn search(
        &self,
        org: OrgId,
        collection: &CollectionName,
        query: &[f32],
        k: usize,
        filter: &MetadataFilter,
    ) -> Result<Vec<VectorHit>, SearchError> {
        self.index()
            .await?
            .search(org, collection, query, k, filter)
            .await
    }

    async fn count(&self, org: OrgId, collection: &CollectionName) -> Result<usize, SearchError> {
        self.index().await?.count(org, collection).await
    }

    async fn drop_collection(
        &self,
        org: OrgId,
        collection: &CollectionName,
    ) -> Result<bool, SearchError> {
        self.index().await?.drop_collection(org, collection).await
    }
}
