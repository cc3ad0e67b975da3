//! Content-addressed artifact blobs on the local filesystem.
//!
//! A blob lives at `sha256/<first two hex digits>/<full hex digest>` under the root, written
//! through `object_store`'s [`LocalFileSystem`] so that a remote object store can take its
//! place with the same layout. The file name is the whole digest (not the rest after the
//! directory prefix) so that a blob copied out of the tree still names its content.
//!
//! Blobs are immutable: content whose blob exists is never written again, and a blob appears
//! at its address only once complete (the object store writes a staging file and renames it).
//! Metadata goes to the storage port after the blob is in place, so an artifact record never
//! points at missing content. This module never loads a file whole into memory to store it.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arches_core::ids::ArtifactId;
use arches_core::ports::{ArtifactStore, Store, StoreError, StoreResult};
use arches_core::records::{ArtifactRecord, Durability, NewArtifact};
use async_trait::async_trait;
use bytes::Bytes;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutPayload};
use sha2::{Digest, Sha256};

use crate::error::{io_error, object_store_error, Error};

/// Bytes read and uploaded at a time when storing a file: bounds the memory of a put whatever
/// the file's size. 8 MiB is above the 5 MiB minimum part size of S3 multipart uploads.
const FILE_PART_BYTES: usize = 8 * 1024 * 1024;

/// Content up to this size is hashed on the async thread; larger content is hashed on the
/// blocking pool (SHA-256 runs at roughly 0.5–2 GB/s, so 64 KiB stays well under the half
/// millisecond an async task may block).
const INLINE_HASH_BYTES_MAX: usize = 64 * 1024;

/// The artifact port on the local filesystem: blobs under a root directory, metadata in a
/// [`Store`].
#[derive(Clone)]
pub struct LocalArtifactStore {
    root: PathBuf,
    objects: Arc<LocalFileSystem>,
    store: Arc<dyn Store>,
}

impl std::fmt::Debug for LocalArtifactStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalArtifactStore")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

impl LocalArtifactStore {
    /// An artifact store keeping blobs under `root` (created if missing) and metadata in
    /// `store`.
    ///
    /// # Errors
    /// [`Error::CreateDirectory`] when `root` cannot be created, [`Error::ArtifactRoot`] when
    /// it cannot be used.
    pub fn new(root: &Path, store: Arc<dyn Store>) -> Result<Self, Error> {
        std::fs::create_dir_all(root).map_err(|source| Error::CreateDirectory {
            path: root.to_path_buf(),
            source,
        })?;
        let objects =
            LocalFileSystem::new_with_prefix(root).map_err(|source| Error::ArtifactRoot {
                path: root.to_path_buf(),
                source,
            })?;
        Ok(Self {
            root: root.to_path_buf(),
            objects: Arc::new(objects),
            store,
        })
    }

    /// The root directory of the blobs.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The object-store address of the blob with this SHA-256 digest (lowercase hex).
    fn blob_key(digest: &str) -> StoreResult<ObjectPath> {
        let valid = digest.len() == 64
            && digest
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !valid {
            return Err(StoreError::Corrupt(format!(
                "{digest:?} is not a sha-256 hex digest"
            )));
        }
        Ok(ObjectPath::from(format!(
            "sha256/{}/{digest}",
            &digest[..2]
        )))
    }

    async fn blob_exists(&self, key: &ObjectPath) -> StoreResult<bool> {
        match self.objects.head(key).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(error) => Err(object_store_error(&error)),
        }
    }

    /// In full durability, syncs a freshly written blob to disk before its metadata is
    /// committed, so that a committed artifact never outlives its content on power loss.
    async fn sync_blob(&self, key: &ObjectPath) -> StoreResult<()> {
        if self.store.durability() != Durability::Full {
            return Ok(());
        }
        let path = self
            .objects
            .path_to_filesystem(key)
            .map_err(|e| object_store_error(&e))?;
        tokio::task::spawn_blocking(move || {
            std::fs::File::open(&path)?.sync_all()?;
            match path.parent() {
                Some(directory) => std::fs::File::open(directory)?.sync_all(),
                None => Ok(()),
            }
        })
        .await
        .map_err(|e| StoreError::Backend(format!("blob sync task failed: {e}")))?
        .map_err(|e| io_error(&e))
    }

    /// Streams `source` into the blob at `key` part by part, hashing it again on the way; if
    /// the content no longer matches `digest` (the file changed since it was hashed) the
    /// upload is abandoned.
    async fn upload_file(&self, source: &Path, key: &ObjectPath, digest: &str) -> StoreResult<()> {
        let mut upload = self
            .objects
            .put_multipart(key)
            .await
            .map_err(|e| object_store_error(&e))?;
        let result = async {
            let mut file = open_source(source).await?;
            let mut hasher = Sha256::new();
            loop {
                let (returned_file, part, returned_hasher) =
                    tokio::task::spawn_blocking(move || {
                        let mut part = Vec::with_capacity(FILE_PART_BYTES);
                        let read = (&mut file)
                            .take(FILE_PART_BYTES as u64)
                            .read_to_end(&mut part);
                        hasher.update(&part);
                        read.map(|_| (file, part, hasher))
                    })
                    .await
                    .map_err(|e| StoreError::Backend(format!("file read task failed: {e}")))?
                    .map_err(|e| source_error(source, &e))?;
                file = returned_file;
                hasher = returned_hasher;
                if part.is_empty() {
                    break;
                }
                upload
                    .put_part(PutPayload::from(part))
                    .await
                    .map_err(|e| object_store_error(&e))?;
            }
            let uploaded = hex::encode(hasher.finalize());
            if uploaded != digest {
                return Err(StoreError::Conflict(format!(
                    "file {} changed while it was stored",
                    source.display()
                )));
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                upload
                    .complete()
                    .await
                    .map_err(|e| object_store_error(&e))?;
                Ok(())
            }
            Err(error) => {
                // The staging object is removed on a best-effort basis; the error that stopped
                // the upload is the one worth reporting.
                if let Err(abort) = upload.abort().await {
                    tracing::warn!(error = %abort, "cannot abort artifact upload");
                }
                Err(error)
            }
        }
    }

    async fn record(&self, id: ArtifactId) -> StoreResult<ArtifactRecord> {
        self.store
            .artifact(id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("artifact {id}")))
    }

    fn missing_blob(record: &ArtifactRecord) -> StoreError {
        StoreError::Corrupt(format!(
            "blob {} of artifact {} is missing",
            record.digest, record.id
        ))
    }
}

/// Maps an I/O error on the source file of a put.
fn source_error(source: &Path, error: &std::io::Error) -> StoreError {
    if error.kind() == std::io::ErrorKind::NotFound {
        StoreError::NotFound(format!("file {}", source.display()))
    } else {
        match io_error(error) {
            StoreError::DiskFull(message) => StoreError::DiskFull(message),
            _ => StoreError::Backend(format!("cannot read {}: {error}", source.display())),
        }
    }
}

async fn open_source(source: &Path) -> StoreResult<std::fs::File> {
    let path = source.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::File::open(path))
        .await
        .map_err(|e| StoreError::Backend(format!("file open task failed: {e}")))?
        .map_err(|e| source_error(source, &e))
}

/// SHA-256 (lowercase hex) and size of a file, read in parts on the blocking pool.
async fn hash_file(source: &Path) -> StoreResult<(String, u64)> {
    let path = source.to_path_buf();
    tokio::task::spawn_blocking(move || -> std::io::Result<(String, u64)> {
        let mut file = std::fs::File::open(&path)?;
        let mut hasher = Sha256::new();
        let mut buffer = vec![0_u8; 1024 * 1024];
        let mut size = 0_u64;
        loop {
            let read = match file.read(&mut buffer) {
                Ok(0) => break,
                Ok(read) => read,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            hasher.update(&buffer[..read]);
            size += read as u64;
        }
        Ok((hex::encode(hasher.finalize()), size))
    })
    .await
    .map_err(|e| StoreError::Backend(format!("file hash task failed: {e}")))?
    .map_err(|e| source_error(source, &e))
}

#[async_trait]
impl ArtifactStore for LocalArtifactStore {
    async fn put_file(&self, source: &Path, meta: NewArtifact) -> StoreResult<ArtifactRecord> {
        let (digest, size_bytes) = hash_file(source).await?;
        let key = Self::blob_key(&digest)?;
        if !self.blob_exists(&key).await? {
            self.upload_file(source, &key, &digest).await?;
            self.sync_blob(&key).await?;
        }
        self.store.insert_artifact(&digest, size_bytes, &meta).await
    }

    async fn put_bytes(&self, content: Vec<u8>, meta: NewArtifact) -> StoreResult<ArtifactRecord> {
        let content = Bytes::from(content);
        let digest = if content.len() <= INLINE_HASH_BYTES_MAX {
            hex::encode(Sha256::digest(&content))
        } else {
            let shared = content.clone();
            tokio::task::spawn_blocking(move || hex::encode(Sha256::digest(&shared)))
                .await
                .map_err(|e| StoreError::Backend(format!("hash task failed: {e}")))?
        };
        let size_bytes = content.len() as u64;
        let key = Self::blob_key(&digest)?;
        if !self.blob_exists(&key).await? {
            self.objects
                .put(&key, PutPayload::from(content))
                .await
                .map_err(|e| object_store_error(&e))?;
            self.sync_blob(&key).await?;
        }
        self.store.insert_artifact(&digest, size_bytes, &meta).await
    }

    async fn get(&self, id: ArtifactId) -> StoreResult<ArtifactRecord> {
        self.record(id).await
    }

    async fn local_path(&self, id: ArtifactId) -> StoreResult<PathBuf> {
        let record = self.record(id).await?;
        let key = Self::blob_key(&record.digest)?;
        if !self.blob_exists(&key).await? {
            return Err(Self::missing_blob(&record));
        }
        self.objects
            .path_to_filesystem(&key)
            .map_err(|e| object_store_error(&e))
    }

    async fn read(&self, id: ArtifactId, limit_bytes: u64) -> StoreResult<Vec<u8>> {
        let record = self.record(id).await?;
        if record.size_bytes > limit_bytes {
            return Err(StoreError::Conflict(format!(
                "artifact is {} bytes, above the limit of {limit_bytes}",
                record.size_bytes
            )));
        }
        let key = Self::blob_key(&record.digest)?;
        let content = match self.objects.get(&key).await {
            Ok(found) => found.bytes().await.map_err(|e| object_store_error(&e))?,
            Err(object_store::Error::NotFound { .. }) => return Err(Self::missing_blob(&record)),
            Err(error) => return Err(object_store_error(&error)),
        };
        if content.len() as u64 != record.size_bytes {
            return Err(StoreError::Corrupt(format!(
                "blob {} is {} bytes, its artifact record says {}",
                record.digest,
                content.len(),
                record.size_bytes
            )));
        }
        Ok(content.into())
    }
}
