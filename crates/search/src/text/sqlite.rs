//! [`SqliteTextIndex`]: full-text search on SQLite FTS5 (bundled by `libsqlite3-sys`, which
//! compiles SQLite with `SQLITE_ENABLE_FTS5`).
//!
//! Each `(org, collection)` has two tables of its own, so BM25's statistics (document
//! frequencies, mean length) are the collection's alone and no query can reach another
//! tenant's rows: `"d_<org>_<collection>"` (rowid, id, metadata JSON) and the FTS5 table
//! `"f_<org>_<collection>"` (the text; same rowid), tokenised by `porter unicode61
//! remove_diacritics 2` (Unicode words, diacritics folded, English Porter stemming). Table
//! names are built only from the org's UUID (hex) and a validated collection name
//! (`[a-z0-9_-]`), and are quoted.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use arches_core::search::{
    CollectionName, Condition, MetadataFilter, SearchError, TextDocument, TextHit, TextIndex,
    SNIPPET_CLOSE, SNIPPET_OPEN,
};
use arches_core::OrgId;
use async_trait::async_trait;
use serde_json::Value;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::Row;

use super::{check_documents, check_ids, check_search, corrupt_metadata, query::to_fts5};

/// How long a statement waits for another connection's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections of the pool.
const MAX_CONNECTIONS: u32 = 4;
/// Tokens around each match in a snippet (FTS5 `snippet()`'s last argument, at most 64).
const SNIPPET_TOKENS: i64 = 16;

fn storage(error: sqlx::Error) -> SearchError {
    SearchError::Storage(format!("SQLite text index: {error}"))
}

/// A value bound to a filter's placeholder.
enum Bind {
    Text(String),
    Real(f64),
}

/// The full-text index on an SQLite file.
///
/// Scores are FTS5's `bm25()` negated, so higher is better (Robertson & Zaragoza, "The
/// Probabilistic Relevance Framework: BM25 and Beyond", 2009; FTS5 uses k1 = 1.2, b = 0.75).
pub struct SqliteTextIndex {
    pool: SqlitePool,
}

impl SqliteTextIndex {
    /// Opens (creating if missing) the index file at `path`, in WAL mode.
    ///
    /// Errors: storage (cannot open, or this SQLite lacks FTS5).
    pub async fn open(path: &Path) -> Result<Self, SearchError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(BUSY_TIMEOUT);
        Self::open_with(options).await
    }

    /// Opens the index with explicit connection options (tests use in-memory databases
    /// with `SqliteConnectOptions::from_str("sqlite::memory:")`, one connection).
    ///
    /// Errors: storage.
    pub async fn open_with(options: SqliteConnectOptions) -> Result<Self, SearchError> {
        let in_memory = options.get_filename().as_os_str() == ":memory:";
        let pool = SqlitePoolOptions::new()
            .max_connections(if in_memory { 1 } else { MAX_CONNECTIONS })
            .min_connections(usize::from(in_memory) as u32)
            .idle_timeout(if in_memory {
                None
            } else {
                Some(Duration::from_secs(600))
            })
            .max_lifetime(if in_memory {
                None
            } else {
                Some(Duration::from_secs(3600))
            })
            .connect_with(options)
            .await
            .map_err(storage)?;
        // Refuse early when FTS5 is missing.
        let fts5: i64 = sqlx::query_scalar("SELECT sqlite_compileoption_used('ENABLE_FTS5')")
            .fetch_one(&pool)
            .await
            .map_err(storage)?;
        if fts5 != 1 {
            return Err(SearchError::Storage(
                "this SQLite library was built without FTS5".to_owned(),
            ));
        }
        Ok(Self { pool })
    }

    /// An in-memory index (one connection), for tests and throwaway use.
    ///
    /// Errors: storage.
    pub async fn in_memory() -> Result<Self, SearchError> {
        let options = SqliteConnectOptions::from_str("sqlite::memory:").map_err(storage)?;
        Self::open_with(options).await
    }

    fn tables(org: OrgId, collection: &CollectionName) -> (String, String) {
        let tag = format!("{}_{}", org.0.simple(), collection.as_str());
        (format!("\"d_{tag}\""), format!("\"f_{tag}\""))
    }

    async fn exists(&self, org: OrgId, collection: &CollectionName) -> Result<bool, SearchError> {
        let name = format!("d_{}_{}", org.0.simple(), collection.as_str());
        let found: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?")
                .bind(name)
                .fetch_optional(&self.pool)
                .await
                .map_err(storage)?;
        Ok(found.is_some())
    }
}

/// The SQL of `filter` over `d.metadata` (starting with ` AND`), and its values.
fn filter_sql(filter: &MetadataFilter) -> (String, Vec<Bind>) {
    let mut sql = String::new();
    let mut binds = Vec::new();
    for (key, condition) in filter.conditions() {
        // Keys are `[A-Za-z0-9_-]`: safe inside a quoted JSON path member.
        let path = format!("$.\"{key}\"");
        let values = match condition {
            Condition::Eq(v) => std::slice::from_ref(v),
            Condition::In(vs) => vs.as_slice(),
        };
        let mut alternatives = Vec::new();
        for value in values {
            match value {
                Value::String(s) => {
                    alternatives.push(
                        "(json_type(d.metadata, ?) = 'text' AND json_extract(d.metadata, ?) = ?)",
                    );
                    binds.push(Bind::Text(path.clone()));
                    binds.push(Bind::Text(path.clone()));
                    binds.push(Bind::Text(s.clone()));
                }
                Value::Number(n) => {
                    alternatives.push(
                        "(json_type(d.metadata, ?) IN ('integer', 'real') \
                         AND json_extract(d.metadata, ?) = ?)",
                    );
                    binds.push(Bind::Text(path.clone()));
                    binds.push(Bind::Text(path.clone()));
                    binds.push(Bind::Real(n.as_f64().unwrap_or(f64::NAN)));
                }
                Value::Bool(b) => {
                    alternatives.push("(json_type(d.metadata, ?) = ?)");
                    binds.push(Bind::Text(path.clone()));
                    binds.push(Bind::Text(if *b { "true" } else { "false" }.to_owned()));
                }
                // `MetadataFilter` admits no other value.
                _ => alternatives.push("0"),
            }
        }
        sql.push_str(" AND (");
        sql.push_str(&alternatives.join(" OR "));
        sql.push(')');
    }
    (sql, binds)
}

#[async_trait]
impl TextIndex for SqliteTextIndex {
    async fn index(
        &self,
        org: OrgId,
        collection: &CollectionName,
        documents: Vec<TextDocument>,
    ) -> Result<usize, SearchError> {
        let documents = check_documents(documents)?;
        if documents.is_empty() {
            return Ok(0);
        }
        let (d, f) = Self::tables(org, collection);
        let mut tx = self.pool.begin().await.map_err(storage)?;
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {d} (rowid INTEGER PRIMARY KEY, \
             id TEXT NOT NULL UNIQUE, metadata TEXT NOT NULL)"
        ))
        .execute(&mut *tx)
        .await
        .map_err(storage)?;
        sqlx::query(&format!(
            "CREATE VIRTUAL TABLE IF NOT EXISTS {f} USING fts5(text, \
             tokenize = 'porter unicode61 remove_diacritics 2')"
        ))
        .execute(&mut *tx)
        .await
        .map_err(storage)?;
        let upsert = format!(
            "INSERT INTO {d} (id, metadata) VALUES (?, ?) \
             ON CONFLICT (id) DO UPDATE SET metadata = excluded.metadata RETURNING rowid"
        );
        let remove = format!("DELETE FROM {f} WHERE rowid = ?");
        let insert = format!("INSERT INTO {f} (rowid, text) VALUES (?, ?)");
        for document in &documents {
            let rowid: i64 = sqlx::query_scalar(&upsert)
                .bind(&document.id)
                .bind(&document.metadata)
                .fetch_one(&mut *tx)
                .await
                .map_err(storage)?;
            sqlx::query(&remove)
                .bind(rowid)
                .execute(&mut *tx)
                .await
                .map_err(storage)?;
            sqlx::query(&insert)
                .bind(rowid)
                .bind(&document.text)
                .execute(&mut *tx)
                .await
                .map_err(storage)?;
        }
        tx.commit().await.map_err(storage)?;
        Ok(documents.len())
    }

    async fn delete(
        &self,
        org: OrgId,
        collection: &CollectionName,
        ids: &[String],
    ) -> Result<usize, SearchError> {
        check_ids(ids)?;
        if ids.is_empty() || !self.exists(org, collection).await? {
            return Ok(0);
        }
        let (d, f) = Self::tables(org, collection);
        let mut tx = self.pool.begin().await.map_err(storage)?;
        let mut deleted = 0;
        let remove_doc = format!("DELETE FROM {d} WHERE id = ? RETURNING rowid");
        let remove_text = format!("DELETE FROM {f} WHERE rowid = ?");
        for id in ids {
            let rowid: Option<i64> = sqlx::query_scalar(&remove_doc)
                .bind(id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(storage)?;
            if let Some(rowid) = rowid {
                sqlx::query(&remove_text)
                    .bind(rowid)
                    .execute(&mut *tx)
                    .await
                    .map_err(storage)?;
                deleted += 1;
            }
        }
        tx.commit().await.map_err(storage)?;
        Ok(deleted)
    }

    async fn search(
        &self,
        org: OrgId,
        collection: &CollectionName,
        query: &str,
        k: usize,
        filter: &MetadataFilter,
    ) -> Result<Vec<TextHit>, SearchError> {
        let query = check_search(query, k)?;
        let query = query.as_str();
        let Some(fts_query) = to_fts5(query) else {
            return Ok(Vec::new());
        };
        if !self.exists(org, collection).await? {
            return Ok(Vec::new());
        }
        let (d, f) = Self::tables(org, collection);
        let (filter_sql, binds) = filter_sql(filter);
        let sql = format!(
            "SELECT d.id AS id, -bm25({f}) AS score, \
             snippet({f}, 0, '{SNIPPET_OPEN}', '{SNIPPET_CLOSE}', '…', {SNIPPET_TOKENS}) AS snippet, \
             d.metadata AS metadata \
             FROM {f} JOIN {d} AS d ON d.rowid = {f}.rowid \
             WHERE {f} MATCH ?{filter_sql} \
             ORDER BY score DESC, d.id LIMIT ?"
        );
        let mut q = sqlx::query(&sql).bind(fts_query);
        for bind in binds {
            q = match bind {
                Bind::Text(s) => q.bind(s),
                Bind::Real(x) => q.bind(x),
            };
        }
        let rows = q
            .bind(k as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(storage)?;
        rows.into_iter()
            .map(|row| {
                let metadata: String = row.try_get("metadata").map_err(storage)?;
                Ok(TextHit {
                    id: row.try_get("id").map_err(storage)?,
                    score: row.try_get("score").map_err(storage)?,
                    snippet: row.try_get("snippet").map_err(storage)?,
                    metadata: serde_json::from_str(&metadata).map_err(corrupt_metadata)?,
                })
            })
            .collect()
    }

    async fn count(&self, org: OrgId, collection: &CollectionName) -> Result<usize, SearchError> {
        if !self.exists(org, collection).await? {
            return Ok(0);
        }
        let (d, _) = Self::tables(org, collection);
        let n: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {d}"))
            .fetch_one(&self.pool)
            .await
            .map_err(storage)?;
        Ok(n as usize)
    }

    async fn drop_collection(
        &self,
        org: OrgId,
        collection: &CollectionName,
    ) -> Result<bool, SearchError> {
        let had = self.count(org, collection).await? > 0;
        let (d, f) = Self::tables(org, collection);
        let mut tx = self.pool.begin().await.map_err(storage)?;
        for table in [d, f] {
            sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
                .execute(&mut *tx)
                .await
                .map_err(storage)?;
        }
        tx.commit().await.map_err(storage)?;
        Ok(had)
    }
}
