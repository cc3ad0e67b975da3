//! [`PgTextIndex`]: full-text search on PostgreSQL for the scale-out deployment.
//!
//! One table, `search_text_documents`, keyed by `(org_id, collection, id)`, with a stored
//! generated `tsvector` (`to_tsvector('english', body)`) under a GIN index, and the metadata
//! as `jsonb` under a GIN index (`jsonb_path_ops`) for filters. Every statement names the org
//! and the collection, so tenants never see each other's rows. Queries go through
//! `websearch_to_tsquery`, which accepts any user text (quotes, `or`, `-`) without syntax
//! errors.

use std::str::FromStr;
use std::time::Duration;

use arches_core::search::{
    CollectionName, MetadataFilter, SearchError, TextDocument, TextHit, TextIndex, SNIPPET_CLOSE,
    SNIPPET_OPEN,
};
use arches_core::OrgId;
use async_trait::async_trait;
use serde_json::{Map, Value};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::Row;

use super::{check_documents, check_ids, check_search, corrupt_metadata};

/// Connections of the pool.
const MAX_CONNECTIONS: u32 = 8;
/// How long to wait for a pooled connection.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);
/// The text search configuration (English stemming and stop words).
const CONFIG: &str = "english";
/// Advisory lock key serialising schema creation across processes (an arbitrary constant:
/// "arches search" in ASCII, truncated to 63 bits).
const SCHEMA_LOCK: i64 = 0x6172_6368_6573_7365;

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS search_text_documents (
        org_id uuid NOT NULL,
        collection text NOT NULL,
        id text NOT NULL,
        body text NOT NULL,
        metadata jsonb NOT NULL,
        tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', body)) STORED,
        PRIMARY KEY (org_id, collection, id)
    )",
    "CREATE INDEX IF NOT EXISTS search_text_documents_tsv
        ON search_text_documents USING GIN (tsv)",
    "CREATE INDEX IF NOT EXISTS search_text_documents_metadata
        ON search_text_documents USING GIN (metadata jsonb_path_ops)",
];

fn storage(error: sqlx::Error) -> SearchError {
    SearchError::Storage(format!("PostgreSQL text index: {error}"))
}

/// The full-text index on PostgreSQL.
///
/// Scores are `ts_rank_cd(tsv, query, 32)` (cover density, Clarke, Cormack & Tudhope 2000,
/// scaled to `rank / (rank + 1)`): PostgreSQL has no BM25, so scores are not comparable with
/// [`super::SqliteTextIndex`]'s; rankings are what [`crate::HybridSearch`] fuses.
pub struct PgTextIndex {
    pool: PgPool,
}

impl PgTextIndex {
    /// Connects to `url` (`postgres://…`) and creates the schema if missing.
    ///
    /// Errors: [`SearchError::InvalidArgument`] for a malformed URL, storage.
    pub async fn connect(url: &str) -> Result<Self, SearchError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| SearchError::InvalidArgument(format!("bad PostgreSQL URL: {e}")))?;
        Self::connect_with(options).await
    }

    /// Connects with explicit options and creates the schema if missing (under an advisory
    /// lock, so processes starting together do not race).
    ///
    /// Errors: storage.
    pub async fn connect_with(options: PgConnectOptions) -> Result<Self, SearchError> {
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(storage)?;
        let mut tx = pool.begin().await.map_err(storage)?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(SCHEMA_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(storage)?;
        for statement in SCHEMA {
            sqlx::query(statement)
                .execute(&mut *tx)
                .await
                .map_err(storage)?;
        }
        tx.commit().await.map_err(storage)?;
        Ok(Self { pool })
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// The filter as SQL (starting with ` AND`) over parameters from `first`, and the values:
/// each key becomes `metadata @> ANY($n::jsonb[])` over `{key: value}` objects, so jsonb's
/// equality decides (numbers numerically, no cross-type equality).
fn filter_sql(filter: &MetadataFilter, first: usize) -> (String, Vec<Vec<String>>) {
    let mut sql = String::new();
    let mut binds = Vec::new();
    for (n, (key, condition)) in filter.conditions().enumerate() {
        sql.push_str(&format!(
            " AND metadata @> ANY(${}::text[]::jsonb[])",
            first + n
        ));
        binds.push(
            condition
                .values()
                .iter()
                .map(|value| {
                    let mut object = Map::new();
                    object.insert(key.to_owned(), value.clone());
                    Value::Object(object).to_string()
                })
                .collect(),
        );
    }
    (sql, binds)
}

#[async_trait]
impl TextIndex for PgTextIndex {
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
        let mut ids = Vec::with_capacity(documents.len());
        let mut bodies = Vec::with_capacity(documents.len());
        let mut metadata = Vec::with_capacity(documents.len());
        for d in documents {
            ids.push(d.id);
            bodies.push(d.text);
            metadata.push(d.metadata);
        }
        let n = ids.len();
        sqlx::query(
            "INSERT INTO search_text_documents (org_id, collection, id, body, metadata)
             SELECT $1, $2, u.id, u.body, u.metadata::jsonb
             FROM UNNEST($3::text[], $4::text[], $5::text[]) AS u(id, body, metadata)
             ON CONFLICT (org_id, collection, id)
             DO UPDATE SET body = excluded.body, metadata = excluded.metadata",
        )
        .bind(org.0)
        .bind(collection.as_str())
        .bind(ids)
        .bind(bodies)
        .bind(metadata)
        .execute(&self.pool)
        .await
        .map_err(storage)?;
        Ok(n)
    }

    async fn delete(
        &self,
        org: OrgId,
        collection: &CollectionName,
        ids: &[String],
    ) -> Result<usize, SearchError> {
        check_ids(ids)?;
        if ids.is_empty() {
            return Ok(0);
        }
        let done = sqlx::query(
            "DELETE FROM search_text_documents
             WHERE org_id = $1 AND collection = $2 AND id = ANY($3)",
        )
        .bind(org.0)
        .bind(collection.as_str())
        .bind(ids)
        .execute(&self.pool)
        .await
        .map_err(storage)?;
        Ok(done.rows_affected() as usize)
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
        if query.trim().is_empty() {
            return Ok(Vec::new());
        }
        let (filter_sql, binds) = filter_sql(filter, 5);
        // The inner query ranks with the GIN index; headlines (costly) only for the top k.
        let sql = format!(
            "SELECT t.id, t.score, \
                    ts_headline('{CONFIG}', t.body, t.q, \
                        'StartSel=\"{SNIPPET_OPEN}\", StopSel=\"{SNIPPET_CLOSE}\", \
                         MaxWords=24, MinWords=8, MaxFragments=1') AS snippet, \
                    t.metadata::text AS metadata \
             FROM (SELECT id, body, metadata, q, ts_rank_cd(tsv, q, 32)::float8 AS score \
                   FROM search_text_documents, websearch_to_tsquery('{CONFIG}', $3) AS q \
                   WHERE org_id = $1 AND collection = $2 AND tsv @@ q{filter_sql} \
                   ORDER BY score DESC, id LIMIT $4) AS t \
             ORDER BY t.score DESC, t.id"
        );
        let mut q = sqlx::query(&sql)
            .bind(org.0)
            .bind(collection.as_str())
            .bind(query)
            .bind(k as i64);
        for values in binds {
            q = q.bind(values);
        }
        let rows = q.fetch_all(&self.pool).await.map_err(storage)?;
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
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM search_text_documents WHERE org_id = $1 AND collection = $2",
        )
        .bind(org.0)
        .bind(collection.as_str())
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
        let done =
            sqlx::query("DELETE FROM search_text_documents WHERE org_id = $1 AND collection = $2")
                .bind(org.0)
                .bind(collection.as_str())
                .execute(&self.pool)
                .await
                .map_err(storage)?;
        Ok(done.rows_affected() > 0)
    }
}
