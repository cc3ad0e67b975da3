//! Persistence of one vector collection in its directory:
//!
//! ```text
//! <dir>/CURRENT                 the generation in use, as decimal text
//! <dir>/snap-<gen>/items.bin    ids, tombstones, metadata, normalised vectors and the HNSW
//!                               graph, with a CRC-32
//! <dir>/wal-<gen>.log           upserts and deletes since that snapshot
//! ```
//!
//! A snapshot is written to `snap-<gen>.tmp`, synced, renamed to `snap-<gen>`, and only then
//! does `CURRENT` (written to a temporary file, synced, renamed, directory synced) point at
//! it; a crash at any point leaves the previous generation and its log whole. Every change is
//! appended to the log as one record `[length u32][CRC-32 u32][payload]` and synced before
//! the call returns; a torn last record (a crash mid-append) fails its length or CRC check and
//! is cut off at the next open.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use arches_core::search::SearchError;

use super::collection::{Collection, HnswParams, Prepared, Slot};
use super::hnsw::Graph;
use crate::codec::{Reader, Writer};

const ITEMS_MAGIC: &[u8; 8] = b"ARCHVEC1";
const OP_UPSERT: u8 = 1;
const OP_DELETE: u8 = 2;
/// Largest log record accepted when reading: a full batch of the largest items is below it.
const MAX_RECORD_BYTES: usize = 1 << 30;

pub(crate) fn io_error(context: &str, path: &Path, error: std::io::Error) -> SearchError {
    SearchError::Storage(format!("{context} {}: {error}", path.display()))
}

/// A collection with its files.
pub(crate) struct StoredCollection {
    pub(crate) dir: PathBuf,
    pub(crate) collection: Collection,
    generation: u64,
    wal: File,
    wal_bytes: u64,
    /// Set by `drop_collection`; operations on a dropped collection answer not found.
    pub(crate) dropped: bool,
}

impl StoredCollection {
    /// Creates the directory and the first (empty) generation.
    pub(crate) fn create(dir: &Path, dim: usize, params: HnswParams) -> Result<Self, SearchError> {
        fs::create_dir_all(dir).map_err(|e| io_error("cannot create", dir, e))?;
        let collection = Collection::new(dim, params);
        write_snapshot(dir, 1, &collection)?;
        let wal = open_wal(dir, 1, true)?;
        Ok(Self {
            dir: dir.to_owned(),
            collection,
            generation: 1,
            wal,
            wal_bytes: 0,
            dropped: false,
        })
    }

    /// Opens the collection of `dir`, or `None` when there is none.
    pub(crate) fn open(dir: &Path, params: HnswParams) -> Result<Option<Self>, SearchError> {
        let current = dir.join("CURRENT");
        let text = match fs::read_to_string(&current) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error("cannot read", &current, e)),
        };
        let generation: u64 = text.trim().parse().map_err(|_| SearchError::Corrupt {
            what: current.display().to_string(),
            reason: format!("not a generation number: {:?}", text.trim()),
        })?;
        let mut collection = read_snapshot(dir, generation, params)?;
        let wal_path = wal_path(dir, generation);
        let wal_bytes = replay_wal(&wal_path, &mut collection)?;
        let wal = open_wal(dir, generation, false)?;
        let mut stored = Self {
            dir: dir.to_owned(),
            collection,
            generation,
            wal,
            wal_bytes,
            dropped: false,
        };
        if stored.collection.compact_if_needed() {
            stored.checkpoint()?;
        }
        Ok(Some(stored))
    }

    /// Logs and applies an upsert.
    pub(crate) fn upsert(
        &mut self,
        items: Vec<Prepared>,
        checkpoint_bytes: u64,
    ) -> Result<(), SearchError> {
        let mut w = Writer::default();
        w.u8(OP_UPSERT);
        w.u32(items.len() as u32);
        for item in &items {
            w.blob(item.id.as_bytes());
            w.blob(
                serde_json::to_string(&item.metadata)
                    .unwrap_or_else(|_| "{}".to_owned())
                    .as_bytes(),
            );
            w.f32s(&item.vector);
        }
        self.append(&w.bytes)?;
        let compacted = self.collection.apply_upsert(items);
        self.maybe_checkpoint(compacted, checkpoint_bytes)
    }

    /// Logs and applies a delete; returns how many items existed.
    pub(crate) fn delete(
        &mut self,
        ids: &[String],
        checkpoint_bytes: u64,
    ) -> Result<usize, SearchError> {
        let mut w = Writer::default();
        w.u8(OP_DELETE);
        w.u32(ids.len() as u32);
        for id in ids {
            w.blob(id.as_bytes());
        }
        self.append(&w.bytes)?;
        let (deleted, compacted) = self.collection.apply_delete(ids);
        self.maybe_checkpoint(compacted, checkpoint_bytes)?;
        Ok(deleted)
    }

    fn maybe_checkpoint(
        &mut self,
        compacted: bool,
        checkpoint_bytes: u64,
    ) -> Result<(), SearchError> {
        if compacted || self.wal_bytes > checkpoint_bytes {
            self.checkpoint()?;
        }
        Ok(())
    }

    fn append(&mut self, payload: &[u8]) -> Result<(), SearchError> {
        let path = wal_path(&self.dir, self.generation);
        let mut record = Vec::with_capacity(payload.len() + 8);
        record.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        record.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        record.extend_from_slice(payload);
        self.wal
            .write_all(&record)
            .and_then(|()| self.wal.sync_data())
            .map_err(|e| io_error("cannot append to", &path, e))?;
        self.wal_bytes += record.len() as u64;
        Ok(())
    }

    /// Writes the next generation's snapshot, switches to it and starts its empty log.
    pub(crate) fn checkpoint(&mut self) -> Result<(), SearchError> {
        let next = self.generation + 1;
        write_snapshot(&self.dir, next, &self.collection)?;
        let wal = open_wal(&self.dir, next, true)?;
        let old = self.generation;
        self.generation = next;
        self.wal = wal;
        self.wal_bytes = 0;
        // Best effort: leftovers of an old generation are ignored by `open`.
        let _ = fs::remove_dir_all(snapshot_dir(&self.dir, old));
        let _ = fs::remove_file(wal_path(&self.dir, old));
        Ok(())
    }
}

fn snapshot_dir(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("snap-{generation}"))
}

fn wal_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("wal-{generation}.log"))
}

fn open_wal(dir: &Path, generation: u64, truncate: bool) -> Result<File, SearchError> {
    let path = wal_path(dir, generation);
    let mut options = OpenOptions::new();
    options.create(true);
    if truncate {
        options.write(true).truncate(true);
    } else {
        options.append(true);
    }
    options
        .open(&path)
        .map_err(|e| io_error("cannot open", &path, e))
}

fn sync_dir(dir: &Path) -> Result<(), SearchError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("cannot sync directory", dir, e))
}

/// Writes `snap-<generation>` and points `CURRENT` at it.
pub(crate) fn write_snapshot(
    dir: &Path,
    generation: u64,
    c: &Collection,
) -> Result<(), SearchError> {
    let final_dir = snapshot_dir(dir, generation);
    let tmp_dir = dir.join(format!("snap-{generation}.tmp"));
    let _ = fs::remove_dir_all(&tmp_dir);
    fs::create_dir_all(&tmp_dir).map_err(|e| io_error("cannot create", &tmp_dir, e))?;

    let mut w = Writer::default();
    w.bytes.extend_from_slice(ITEMS_MAGIC);
    w.u64(c.dim as u64);
    w.u64(c.slots.len() as u64);
    for (i, slot) in c.slots.iter().enumerate() {
        w.blob(slot.id.as_bytes());
        w.u8(u8::from(slot.deleted));
        w.blob(
            serde_json::to_string(&slot.metadata)
                .unwrap_or_else(|_| "{}".to_owned())
                .as_bytes(),
        );
        w.f32s(&c.vectors[i * c.dim..(i + 1) * c.dim]);
    }
    c.graph.encode(&mut w);
    let crc = crc32fast::hash(&w.bytes);
    w.u32(crc);
    let items = tmp_dir.join("items.bin");
    write_synced(&items, &w.bytes)?;
    sync_dir(&tmp_dir)?;
    let _ = fs::remove_dir_all(&final_dir);
    fs::rename(&tmp_dir, &final_dir).map_err(|e| io_error("cannot rename", &tmp_dir, e))?;
    let current_tmp = dir.join("CURRENT.tmp");
    write_synced(&current_tmp, format!("{generation}\n").as_bytes())?;
    fs::rename(&current_tmp, dir.join("CURRENT"))
        .map_err(|e| io_error("cannot rename", &current_tmp, e))?;
    sync_dir(dir)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), SearchError> {
    let mut file = File::create(path).map_err(|e| io_error("cannot create", path, e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| io_error("cannot write", path, e))
}

fn read_snapshot(
    dir: &Path,
    generation: u64,
    params: HnswParams,
) -> Result<Collection, SearchError> {
    let snap = snapshot_dir(dir, generation);
    let items_path = snap.join("items.bin");
    let mut bytes = Vec::new();
    File::open(&items_path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| io_error("cannot read", &items_path, e))?;
    let what = items_path.display().to_string();
    let corrupt = |reason: &str| SearchError::Corrupt {
        what: what.clone(),
        reason: reason.to_owned(),
    };
    if bytes.len() < ITEMS_MAGIC.len() + 4 || &bytes[..ITEMS_MAGIC.len()] != ITEMS_MAGIC {
        return Err(corrupt("not a vector snapshot (bad magic)"));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(body).to_le_bytes() != crc {
        return Err(corrupt("checksum mismatch"));
    }
    let mut r = Reader::new(&body[ITEMS_MAGIC.len()..], &what);
    let dim = r.u64()? as usize;
    if dim == 0 || dim > arches_core::search::MAX_DIMENSION {
        return Err(corrupt("dimension out of range"));
    }
    let count = r.u64()? as usize;
    if count > body.len() / (dim * 4).max(1) {
        return Err(corrupt("item count larger than the file"));
    }
    let mut slots = Vec::with_capacity(count);
    let mut vectors = Vec::with_capacity(count * dim);
    let mut collection = Collection::new(dim, params);
    for i in 0..count {
        let id = r.string()?;
        let deleted = r.u8()? == 1;
        let metadata = r.metadata()?;
        r.f32s(dim, &mut vectors)?;
        if deleted {
            collection.tombstones += 1;
        } else if collection.by_id.insert(id.clone(), i).is_some() {
            return Err(corrupt("an id is live twice"));
        }
        slots.push(Slot {
            id,
            metadata,
            deleted,
        });
    }
    collection.slots = slots;
    collection.vectors = vectors;
    let graph = Graph::decode(&mut r)?;
    if !r.is_empty() {
        return Err(corrupt("trailing bytes"));
    }
    if graph.len() != count {
        return Err(corrupt("the graph and the items disagree on the count"));
    }
    collection.params = HnswParams {
        m: graph.m(),
        ef_construction: graph.ef_construction(),
        ef_search: params.ef_search,
    };
    collection.graph = graph;
    Ok(collection)
}

/// Applies the log's whole records; cuts off a torn tail. Returns the log's length kept.
fn replay_wal(path: &Path, collection: &mut Collection) -> Result<u64, SearchError> {
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut bytes)
                .map_err(|e| io_error("cannot read", path, e))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_error("cannot read", path, e)),
    }
    let what = path.display().to_string();
    let mut at = 0usize;
    while bytes.len() - at >= 8 {
        let len =
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize;
        let crc = u32::from_le_bytes([bytes[at + 4], bytes[at + 5], bytes[at + 6], bytes[at + 7]]);
        if len > MAX_RECORD_BYTES || bytes.len() - at - 8 < len {
            break;
        }
        let payload = &bytes[at + 8..at + 8 + len];
        if crc32fast::hash(payload) != crc {
            break;
        }
        apply_record(payload, &what, collection)?;
        at += 8 + len;
    }
    if at < bytes.len() {
        tracing::warn!(path = %path.display(), kept = at, length = bytes.len(), "cutting a torn record off the vector log");
        OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|f| f.set_len(at as u64).and_then(|()| f.sync_all()))
            .map_err(|e| io_error("cannot truncate", path, e))?;
    }
    Ok(at as u64)
}

fn apply_record(payload: &[u8], what: &str, c: &mut Collection) -> Result<(), SearchError> {
    let mut r = Reader::new(payload, what);
    match r.u8()? {
        OP_UPSERT => {
            let n = r.u32()? as usize;
            if n > arches_core::search::MAX_BATCH {
                return Err(r.corrupt("batch too large"));
            }
            let mut items = Vec::with_capacity(n);
            for _ in 0..n {
                let id = r.string()?;
                let metadata = r.metadata()?;
                let mut vector = Vec::with_capacity(c.dim);
                r.f32s(c.dim, &mut vector)?;
                items.push(Prepared {
                    id,
                    vector,
                    metadata,
                });
            }
            let _compacted = c.apply_upsert(items);
        }
        OP_DELETE => {
            let n = r.u32()? as usize;
            if n > arches_core::search::MAX_BATCH {
                return Err(r.corrupt("batch too large"));
            }
            let ids = (0..n).map(|_| r.string()).collect::<Result<Vec<_>, _>>()?;
            let _counts = c.apply_delete(&ids);
        }
        op => return Err(r.corrupt(format!("unknown record type {op}"))),
    }
    if !r.is_empty() {
        return Err(r.corrupt("trailing bytes in a record"));
    }
    Ok(())
}

/// Bytes of the files of `dir` (recursively): the collection's size on disk.
pub fn disk_usage(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(m) if m.is_dir() => disk_usage(&entry.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
