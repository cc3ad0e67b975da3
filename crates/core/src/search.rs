//! The search ports: a vector index ([`VectorIndex`]), a full-text index ([`TextIndex`]),
//! the metadata filter both accept ([`MetadataFilter`]), their errors ([`SearchError`]) and
//! the bounds every backend enforces, plus reciprocal rank fusion
//! ([`reciprocal_rank_fusion`]) to combine their rankings.
//!
//! Every index is scoped by `(org, collection)`: an org never sees another org's items, and
//! collections of one org are independent (a vector collection has one dimension, fixed by
//! its first upsert). Backends live in `arches-search`; this module does no I/O.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::ids::OrgId;

/// Largest vector dimension accepted (4096 covers every common embedding model; OpenAI's
/// `text-embedding-3-large` has 3072).
pub const MAX_DIMENSION: usize = 4096;
/// Largest `k` (number of hits) of one search.
pub const MAX_K: usize = 1000;
/// Most items (vectors, documents or ids) in one upsert, index or delete call.
pub const MAX_BATCH: usize = 10_000;
/// Largest metadata of one item, in bytes of its compact JSON encoding (16 KiB).
pub const MAX_METADATA_BYTES: usize = 16 * 1024;
/// Largest text of one document, in UTF-8 bytes (1 MiB).
pub const MAX_TEXT_BYTES: usize = 1024 * 1024;
/// Longest item id, in UTF-8 bytes.
pub const MAX_ID_BYTES: usize = 256;
/// Longest full-text query, in UTF-8 bytes.
pub const MAX_QUERY_BYTES: usize = 4096;
/// Most conditions (keys) in one [`MetadataFilter`].
pub const MAX_FILTER_CONDITIONS: usize = 32;
/// Most values of one `key in [values]` condition.
pub const MAX_FILTER_VALUES: usize = 256;
/// Longest collection name, in characters (all ASCII).
pub const MAX_COLLECTION_NAME: usize = 64;
/// Longest filter key, in characters (all ASCII).
pub const MAX_FILTER_KEY: usize = 64;
/// The `k` constant of reciprocal rank fusion recommended by its authors (Cormack, Clarke &
/// Büttcher, SIGIR 2009): each list contributes `1 / (k + rank)`.
pub const RRF_K: f64 = 60.0;

/// The metadata of an item: a JSON object whose top-level keys filters can test.
pub type Metadata = Map<String, Value>;

/// Why a search operation failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SearchError {
    /// A vector's length differs from the collection's dimension.
    #[error("vector dimension mismatch: the collection has dimension {expected}, got {got}{}", id_suffix(.id))]
    DimensionMismatch {
        /// The collection's dimension.
        expected: usize,
        /// The length of the offending vector.
        got: usize,
        /// The offending item, when the vector is an item's (not a query).
        id: Option<String>,
    },
    /// A vector of length 0 or above [`MAX_DIMENSION`].
    #[error("vector dimension {got} is out of range 1..={max}")]
    InvalidDimension {
        /// The length given.
        got: usize,
        /// [`MAX_DIMENSION`].
        max: usize,
    },
    /// A vector holds a NaN or an infinity, or is all zeros (it has no direction).
    #[error("vector{} is not usable: {reason}", id_suffix(.id))]
    VectorNotFinite {
        /// The offending item, when the vector is an item's.
        id: Option<String>,
        /// What is wrong with it.
        reason: String,
    },
    /// A collection name outside 1–64 characters of `[a-z0-9_-]`.
    #[error("invalid collection name {name:?}: {reason}")]
    InvalidCollectionName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An item id that is empty, too long or holds control characters.
    #[error("invalid item id {id:?}: {reason}")]
    InvalidId {
        /// The id given (cut to 64 characters).
        id: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// More items in one call than [`MAX_BATCH`].
    #[error("too many items in one call: {got} (at most {max})")]
    TooManyItems {
        /// The number of items given.
        got: usize,
        /// [`MAX_BATCH`].
        max: usize,
    },
    /// An item's metadata encodes to more than [`MAX_METADATA_BYTES`].
    #[error("metadata of item {id:?} is {bytes} bytes (at most {max})")]
    MetadataTooLarge {
        /// The item.
        id: String,
        /// Its metadata's encoded size.
        bytes: usize,
        /// [`MAX_METADATA_BYTES`].
        max: usize,
    },
    /// A document's text is longer than [`MAX_TEXT_BYTES`].
    #[error("text of document {id:?} is {bytes} bytes (at most {max})")]
    TextTooLarge {
        /// The document.
        id: String,
        /// Its text's size in UTF-8 bytes.
        bytes: usize,
        /// [`MAX_TEXT_BYTES`].
        max: usize,
    },
    /// `k` is 0 or above [`MAX_K`].
    #[error("k = {k} is out of range 1..={max}")]
    InvalidK {
        /// The `k` given.
        k: usize,
        /// [`MAX_K`].
        max: usize,
    },
    /// A metadata filter that cannot be used (see [`MetadataFilter`]).
    #[error("invalid metadata filter: {0}")]
    InvalidFilter(String),
    /// A full-text query that cannot be used (too long, or with no searchable word).
    #[error("invalid query: {0}")]
    InvalidQuery(String),
    /// Any other argument out of its documented range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The collection does not exist in this org.
    #[error("collection {collection:?} not found")]
    CollectionNotFound {
        /// The collection's name.
        collection: String,
    },
    /// The storage beneath the index failed (I/O, database); the operation may be retried.
    #[error("search storage failed: {0}")]
    Storage(String),
    /// Stored index data is damaged or of an unknown format.
    #[error("search index data is corrupt ({what}): {reason}")]
    Corrupt {
        /// Which file or table.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
}

fn id_suffix(id: &Option<String>) -> String {
    match id {
        Some(id) => format!(" (item {id:?})"),
        None => String::new(),
    }
}

/// The name of a collection: 1–64 characters of `[a-z0-9_-]`, so it is safe as a directory
/// name and in SQL identifiers' values.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct CollectionName(String);

impl CollectionName {
    /// Validates `name`.
    ///
    /// Errors: [`SearchError::InvalidCollectionName`] naming the rule it breaks.
    pub fn new(name: &str) -> Result<Self, SearchError> {
        let bad = |reason| SearchError::InvalidCollectionName {
            name: truncate(name, 80),
            reason,
        };
        if name.is_empty() {
            return Err(bad("it is empty"));
        }
        if name.len() > MAX_COLLECTION_NAME {
            return Err(bad("it is longer than 64 characters"));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        {
            return Err(bad("only a-z, 0-9, '_' and '-' are allowed"));
        }
        Ok(Self(name.to_owned()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CollectionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for CollectionName {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        CollectionName::new(&name).map_err(serde::de::Error::custom)
    }
}

fn truncate(text: &str, chars: usize) -> String {
    text.chars().take(chars).collect()
}

/// Checks an item id: 1–[`MAX_ID_BYTES`] bytes, no control characters.
///
/// Errors: [`SearchError::InvalidId`].
pub fn validate_id(id: &str) -> Result<(), SearchError> {
    let bad = |reason| SearchError::InvalidId {
        id: truncate(id, 64),
        reason,
    };
    if id.is_empty() {
        return Err(bad("it is empty"));
    }
    if id.len() > MAX_ID_BYTES {
        return Err(bad("it is longer than 256 bytes"));
    }
    if id.chars().any(char::is_control) {
        return Err(bad("it holds control characters"));
    }
    Ok(())
}

/// Checks an item's metadata size against [`MAX_METADATA_BYTES`] and returns its compact
/// JSON encoding.
///
/// Errors: [`SearchError::MetadataTooLarge`].
pub fn encode_metadata(id: &str, metadata: &Metadata) -> Result<String, SearchError> {
    // Encoding a map of JSON values cannot fail (keys are strings).
    let encoded = serde_json::to_string(metadata).unwrap_or_else(|_| "{}".to_owned());
    if encoded.len() > MAX_METADATA_BYTES {
        return Err(SearchError::MetadataTooLarge {
            id: id.to_owned(),
            bytes: encoded.len(),
            max: MAX_METADATA_BYTES,
        });
    }
    Ok(encoded)
}

/// Checks `k` against `1..=`[`MAX_K`].
///
/// Errors: [`SearchError::InvalidK`].
pub fn validate_k(k: usize) -> Result<(), SearchError> {
    if k == 0 || k > MAX_K {
        return Err(SearchError::InvalidK { k, max: MAX_K });
    }
    Ok(())
}

/// Checks the size of a batch against [`MAX_BATCH`].
///
/// Errors: [`SearchError::TooManyItems`].
pub fn validate_batch(len: usize) -> Result<(), SearchError> {
    if len > MAX_BATCH {
        return Err(SearchError::TooManyItems {
            got: len,
            max: MAX_BATCH,
        });
    }
    Ok(())
}

/// Checks a vector: length in `1..=`[`MAX_DIMENSION`], every component finite, not all
/// zeros. `id` names the item in errors (`None` for a query).
///
/// Errors: [`SearchError::InvalidDimension`], [`SearchError::VectorNotFinite`].
pub fn validate_vector(id: Option<&str>, vector: &[f32]) -> Result<(), SearchError> {
    if vector.is_empty() || vector.len() > MAX_DIMENSION {
        return Err(SearchError::InvalidDimension {
            got: vector.len(),
            max: MAX_DIMENSION,
        });
    }
    if let Some(index) = vector.iter().position(|x| !x.is_finite()) {
        return Err(SearchError::VectorNotFinite {
            id: id.map(str::to_owned),
            reason: format!("component {index} is {}", vector[index]),
        });
    }
    let norm2: f64 = vector.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
    if norm2 == 0.0 || !norm2.is_finite() {
        return Err(SearchError::VectorNotFinite {
            id: id.map(str::to_owned),
            reason: "its norm is zero or overflows, so it has no direction".to_owned(),
        });
    }
    Ok(())
}

/// One vector to store: `vector` has the collection's dimension (any non-zero norm: indexes
/// L2-normalise it), `metadata` at most [`MAX_METADATA_BYTES`] encoded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VectorItem {
    /// The item's id within its collection (1–[`MAX_ID_BYTES`] bytes); an upsert of an
    /// existing id replaces it.
    pub id: String,
    /// The embedding.
    pub vector: Vec<f32>,
    /// Free-form metadata that filters test and hits return.
    #[serde(default)]
    pub metadata: Metadata,
}

/// One result of a vector search.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VectorHit {
    /// The item's id.
    pub id: String,
    /// Cosine similarity of the query and the item, in `[-1, 1]` (1 = same direction).
    pub score: f32,
    /// The item's metadata.
    pub metadata: Metadata,
}

/// One document to index for full-text search.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TextDocument {
    /// The document's id within its collection (1–[`MAX_ID_BYTES`] bytes); indexing an
    /// existing id replaces it.
    pub id: String,
    /// The text, at most [`MAX_TEXT_BYTES`].
    pub text: String,
    /// Free-form metadata that filters test and hits return.
    #[serde(default)]
    pub metadata: Metadata,
}

/// One result of a full-text search.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TextHit {
    /// The document's id.
    pub id: String,
    /// Relevance, higher is better; comparable only within one result list (the SQLite
    /// backend gives BM25, the PostgreSQL one `ts_rank_cd`: see each backend).
    pub score: f64,
    /// An excerpt around the matched terms, with matches between [`SNIPPET_OPEN`] and
    /// [`SNIPPET_CLOSE`], when the backend makes one.
    pub snippet: Option<String>,
    /// The document's metadata.
    pub metadata: Metadata,
}

/// Marks the start of a matched term in [`TextHit::snippet`].
pub const SNIPPET_OPEN: &str = "«";
/// Marks the end of a matched term in [`TextHit::snippet`].
pub const SNIPPET_CLOSE: &str = "»";

/// One condition of a [`MetadataFilter`] on a top-level metadata key.
#[derive(Clone, Debug, PartialEq)]
pub enum Condition {
    /// `metadata[key] == value`.
    Eq(Value),
    /// `metadata[key]` equals one of the values.
    In(Vec<Value>),
}

impl Condition {
    /// The values the key may take.
    pub fn values(&self) -> &[Value] {
        match self {
            Condition::Eq(value) => std::slice::from_ref(value),
            Condition::In(values) => values,
        }
    }
}

/// A conjunction of conditions on top-level metadata keys: every key must hold one of its
/// values. Written in JSON as an object, a scalar meaning `key == value` and an array
/// `key in [values]`: `{"lang": "en", "source": ["a", "b"]}`. The empty filter matches
/// everything.
///
/// Values are strings, finite numbers or booleans; numbers compare numerically (`1` equals
/// `1.0`), and a value never equals one of another type. An item without the key does not
/// match. Keys are 1–[`MAX_FILTER_KEY`] characters of `[A-Za-z0-9_-]`; at most
/// [`MAX_FILTER_CONDITIONS`] keys and [`MAX_FILTER_VALUES`] values per key.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MetadataFilter {
    conditions: BTreeMap<String, Condition>,
}

impl MetadataFilter {
    /// The filter that matches everything.
    pub fn all() -> Self {
        Self::default()
    }

    /// Adds `key == value`, replacing an earlier condition on `key`.
    ///
    /// Errors: [`SearchError::InvalidFilter`] for a bad key or value, or too many keys.
    pub fn equals(self, key: &str, value: impl Into<Value>) -> Result<Self, SearchError> {
        self.with(key, Condition::Eq(value.into()))
    }

    /// Adds `key in values`, replacing an earlier condition on `key`.
    ///
    /// Errors: [`SearchError::InvalidFilter`] for a bad key or value, no or too many values,
    /// or too many keys.
    pub fn one_of(self, key: &str, values: Vec<Value>) -> Result<Self, SearchError> {
        self.with(key, Condition::In(values))
    }

    fn with(mut self, key: &str, condition: Condition) -> Result<Self, SearchError> {
        validate_filter_key(key)?;
        match &condition {
            Condition::Eq(value) => validate_filter_value(key, value)?,
            Condition::In(values) => {
                if values.is_empty() {
                    return Err(SearchError::InvalidFilter(format!(
                        "key {key:?}: the list of values is empty"
                    )));
                }
                if values.len() > MAX_FILTER_VALUES {
                    return Err(SearchError::InvalidFilter(format!(
                        "key {key:?}: {} values (at most {MAX_FILTER_VALUES})",
                        values.len()
                    )));
                }
                for value in values {
                    validate_filter_value(key, value)?;
                }
            }
        }
        self.conditions.insert(key.to_owned(), condition);
        if self.conditions.len() > MAX_FILTER_CONDITIONS {
            return Err(SearchError::InvalidFilter(format!(
                "more than {MAX_FILTER_CONDITIONS} keys"
            )));
        }
        Ok(self)
    }

    /// Reads a filter from a JSON object (see the type's documentation).
    ///
    /// Errors: [`SearchError::InvalidFilter`] naming the key at fault.
    pub fn from_json(value: &Value) -> Result<Self, SearchError> {
        let Value::Object(object) = value else {
            return Err(SearchError::InvalidFilter(
                "a filter is a JSON object of key to value or list of values".to_owned(),
            ));
        };
        let mut filter = Self::default();
        for (key, value) in object {
            filter = match value {
                Value::Array(values) => filter.one_of(key, values.clone())?,
                value => filter.equals(key, value.clone())?,
            };
        }
        Ok(filter)
    }

    /// Whether the filter has no condition (matches everything).
    pub fn is_empty(&self) -> bool {
        self.conditions.is_empty()
    }

    /// The conditions, by key in ascending order.
    pub fn conditions(&self) -> impl Iterator<Item = (&str, &Condition)> {
        self.conditions.iter().map(|(k, c)| (k.as_str(), c))
    }

    /// Whether `metadata` satisfies every condition.
    pub fn matches(&self, metadata: &Metadata) -> bool {
        self.conditions.iter().all(|(key, condition)| {
            metadata.get(key).is_some_and(|actual| {
                condition
                    .values()
                    .iter()
                    .any(|wanted| values_equal(actual, wanted))
            })
        })
    }
}

/// Equality of filter values: numbers numerically, other scalars exactly, no cross-type
/// equality.
fn values_equal(actual: &Value, wanted: &Value) -> bool {
    match (actual, wanted) {
        (Value::Number(a), Value::Number(b)) => match (a.as_f64(), b.as_f64()) {
            (Some(a), Some(b)) => a == b,
            _ => a == b,
        },
        (Value::String(a), Value::String(b)) => a == b,
        (Value::Bool(a), Value::Bool(b)) => a == b,
        _ => false,
    }
}

fn validate_filter_key(key: &str) -> Result<(), SearchError> {
    if key.is_empty()
        || key.len() > MAX_FILTER_KEY
        || !key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(SearchError::InvalidFilter(format!(
            "key {:?} must be 1-{MAX_FILTER_KEY} characters of A-Z, a-z, 0-9, '_' and '-'",
            truncate(key, 80)
        )));
    }
    Ok(())
}

fn validate_filter_value(key: &str, value: &Value) -> Result<(), SearchError> {
    match value {
        Value::String(s) if s.len() <= MAX_METADATA_BYTES => Ok(()),
        Value::Bool(_) => Ok(()),
        Value::Number(n) if n.as_f64().is_some_and(f64::is_finite) => Ok(()),
        _ => Err(SearchError::InvalidFilter(format!(
            "key {key:?}: values are strings, finite numbers or booleans, got {}",
            truncate(&value.to_string(), 80)
        ))),
    }
}

impl<'de> Deserialize<'de> for MetadataFilter {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        MetadataFilter::from_json(&value).map_err(serde::de::Error::custom)
    }
}

impl Serialize for MetadataFilter {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let object: Map<String, Value> = self
            .conditions
            .iter()
            .map(|(key, condition)| {
                let value = match condition {
                    Condition::Eq(value) => value.clone(),
                    Condition::In(values) => Value::Array(values.clone()),
                };
                (key.clone(), value)
            })
            .collect();
        object.serialize(serializer)
    }
}

/// The vector index port: per `(org, collection)` sets of L2-normalised vectors with
/// metadata, searched by cosine similarity.
///
/// A collection comes into being with its first upsert, which fixes its dimension. Every
/// call validates its input against the bounds of this module before changing anything, so
/// a refused batch changes nothing.
#[async_trait]
pub trait VectorIndex: Send + Sync {
    /// Inserts or replaces `items` (at most [`MAX_BATCH`]; a repeated id in one batch: the
    /// last wins). Returns the number of items written.
    ///
    /// Errors: [`SearchError::TooManyItems`], [`SearchError::DimensionMismatch`],
    /// [`SearchError::InvalidDimension`], [`SearchError::VectorNotFinite`],
    /// [`SearchError::InvalidId`], [`SearchError::MetadataTooLarge`], storage errors.
    async fn upsert(
        &self,
        org: OrgId,
        collection: &CollectionName,
        items: Vec<VectorItem>,
    ) -> Result<usize, SearchError>;

    /// Deletes the items of these ids (at most [`MAX_BATCH`]); unknown ids are ignored.
    /// Returns the number of items deleted.
    ///
    /// Errors: [`SearchError::CollectionNotFound`], [`SearchError::TooManyItems`], storage.
    async fn delete(
        &self,
        org: OrgId,
        collection: &CollectionName,
        ids: &[String],
    ) -> Result<usize, SearchError>;

    /// The `k` (1..=[`MAX_K`]) items most similar to `query` among those `filter` matches,
    /// most similar first (ties by id). Fewer than `k` only when fewer items match.
    ///
    /// Errors: [`SearchError::CollectionNotFound`], [`SearchError::InvalidK`],
    /// [`SearchError::DimensionMismatch`], [`SearchError::VectorNotFinite`], storage.
    async fn search(
        &self,
        org: OrgId,
        collection: &CollectionName,
        query: &[f32],
        k: usize,
        filter: &MetadataFilter,
    ) -> Result<Vec<VectorHit>, SearchError>;

    /// The number of live items of the collection.
    ///
    /// Errors: [`SearchError::CollectionNotFound`], storage.
    async fn count(&self, org: OrgId, collection: &CollectionName) -> Result<usize, SearchError>;

    /// Deletes the collection and everything in it. Returns whether it existed.
    ///
    /// Errors: storage.
    async fn drop_collection(
        &self,
        org: OrgId,
        collection: &CollectionName,
    ) -> Result<bool, SearchError>;
}

/// The full-text index port: per `(org, collection)` documents with metadata, searched by
/// words and ranked by relevance (BM25 where the backend has it).
///
/// A collection comes into being with its first indexed document. Queries are plain user
/// text: backends treat operator characters of their query syntax as text, never as
/// syntax errors.
#[async_trait]
pub trait TextIndex: Send + Sync {
    /// Indexes or replaces `documents` (at most [`MAX_BATCH`]; a repeated id: the last
    /// wins). Returns the number written.
    ///
    /// Errors: [`SearchError::TooManyItems`], [`SearchError::InvalidId`],
    /// [`SearchError::TextTooLarge`], [`SearchError::MetadataTooLarge`], storage.
    async fn index(
        &self,
        org: OrgId,
        collection: &CollectionName,
        documents: Vec<TextDocument>,
    ) -> Result<usize, SearchError>;

    /// Deletes the documents of these ids (at most [`MAX_BATCH`]); unknown ids are ignored.
    /// Returns the number deleted.
    ///
    /// Errors: [`SearchError::TooManyItems`], storage.
    async fn delete(
        &self,
        org: OrgId,
        collection: &CollectionName,
        ids: &[String],
    ) -> Result<usize, SearchError>;

    /// The `k` (1..=[`MAX_K`]) documents most relevant to `query` among those `filter`
    /// matches, best first (ties by id). A query with no searchable word (empty, only
    /// punctuation) gives no hits; an unknown collection gives no hits.
    ///
    /// Errors: [`SearchError::InvalidK`], [`SearchError::InvalidQuery`] (longer than
    /// [`MAX_QUERY_BYTES`]), storage.
    async fn search(
        &self,
        org: OrgId,
        collection: &CollectionName,
        query: &str,
        k: usize,
        filter: &MetadataFilter,
    ) -> Result<Vec<TextHit>, SearchError>;

    /// The number of documents of the collection (0 when it does not exist).
    ///
    /// Errors: storage.
    async fn count(&self, org: OrgId, collection: &CollectionName) -> Result<usize, SearchError>;

    /// Deletes the collection's documents. Returns whether it had any.
    ///
    /// Errors: storage.
    async fn drop_collection(
        &self,
        org: OrgId,
        collection: &CollectionName,
    ) -> Result<bool, SearchError>;
}

/// One id of a fused ranking.
#[derive(Clone, Debug, PartialEq)]
pub struct FusedHit {
    /// The id.
    pub id: String,
    /// `Σ weight_i / (k + rank_i)` over the lists that hold the id (rank from 1).
    pub score: f64,
    /// The best (smallest) rank the id has in any list, from 1.
    pub best_rank: usize,
}

/// Reciprocal rank fusion of ranked id lists, every list of weight 1: see
/// [`weighted_reciprocal_rank_fusion`].
///
/// Errors: [`SearchError::InvalidArgument`] for a `k` that is negative or not finite.
pub fn reciprocal_rank_fusion<S: AsRef<str>>(
    lists: &[&[S]],
    k: f64,
) -> Result<Vec<FusedHit>, SearchError> {
    let weighted: Vec<(&[S], f64)> = lists.iter().map(|list| (*list, 1.0)).collect();
    weighted_reciprocal_rank_fusion(&weighted, k)
}

/// Reciprocal rank fusion (Cormack, Clarke & Büttcher, "Reciprocal Rank Fusion outperforms
/// Condorcet and individual Rank Learning Methods", SIGIR 2009): each id scores
/// `Σ_i w_i / (k + rank_i(id))` over the lists `i` that hold it, ranks counted from 1; the
/// paper's `k` is 60 ([`RRF_K`]). Weights generalise the paper's unweighted sum (weight 1).
///
/// Each list is best first; an id repeated within a list counts at its first rank. The result
/// is sorted by score descending; ties by best rank in any list ascending, then by id
/// ascending, so the order is deterministic.
///
/// Errors: [`SearchError::InvalidArgument`] for a `k` that is negative or not finite, or a
/// weight that is negative or not finite.
pub fn weighted_reciprocal_rank_fusion<S: AsRef<str>>(
    lists: &[(&[S], f64)],
    k: f64,
) -> Result<Vec<FusedHit>, SearchError> {
    if !k.is_finite() || k < 0.0 {
        return Err(SearchError::InvalidArgument(format!(
            "the RRF constant k must be finite and >= 0, got {k}"
        )));
    }
    let mut fused: HashMap<&str, FusedHit> = HashMap::new();
    for (list, weight) in lists {
        if !weight.is_finite() || *weight < 0.0 {
            return Err(SearchError::InvalidArgument(format!(
                "RRF weights must be finite and >= 0, got {weight}"
            )));
        }
        let mut seen: std::collections::HashSet<&str> = std::collections::HashSet::new();
        let mut rank = 0usize;
        for id in list.iter() {
            let id = id.as_ref();
            if !seen.insert(id) {
                continue;
            }
            rank += 1;
            let contribution = weight / (k + rank as f64);
            let entry = fused.entry(id).or_insert_with(|| FusedHit {
                id: id.to_owned(),
                score: 0.0,
                best_rank: rank,
            });
            entry.score += contribution;
            entry.best_rank = entry.best_rank.min(rank);
        }
    }
    let mut hits: Vec<FusedHit> = fused.into_values().collect();
    hits.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(a.best_rank.cmp(&b.best_rank))
            .then_with(|| a.id.cmp(&b.id))
    });
    Ok(hits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ids(hits: &[FusedHit]) -> Vec<&str> {
        hits.iter().map(|h| h.id.as_str()).collect()
    }

    #[test]
    fn rrf_scores_follow_the_formula() {
        let a = ["x", "y", "z"];
        let b = ["y", "w"];
        let hits = reciprocal_rank_fusion(&[&a[..], &b[..]], 60.0).unwrap();
        assert_eq!(ids(&hits), ["y", "x", "w", "z"]);
        let y = 1.0 / 62.0 + 1.0 / 61.0;
        assert!((hits[0].score - y).abs() < 1e-12);
        assert!((hits[1].score - 1.0 / 61.0).abs() < 1e-12);
        assert_eq!(hits[0].best_rank, 1);
    }

    #[test]
    fn rrf_ties_break_by_best_rank_then_id() {
        // "b" and "a" each appear at rank 1 of one list and nowhere else: equal scores,
        // equal best ranks, so id order decides.
        let l1 = ["b"];
        let l2 = ["a"];
        let hits = reciprocal_rank_fusion(&[&l1[..], &l2[..]], 60.0).unwrap();
        assert_eq!(ids(&hits), ["a", "b"]);
        // Reversing the input order gives the same output.
        let again = reciprocal_rank_fusion(&[&l2[..], &l1[..]], 60.0).unwrap();
        assert_eq!(hits, again);
    }

    #[test]
    fn rrf_counts_a_repeated_id_once_per_list() {
        let l = ["a", "a", "b"];
        let hits = reciprocal_rank_fusion(&[&l[..]], 60.0).unwrap();
        assert_eq!(ids(&hits), ["a", "b"]);
        assert!((hits[1].score - 1.0 / 62.0).abs() < 1e-12);
    }

    #[test]
    fn rrf_weights_scale_contributions() {
        let l1 = ["a"];
        let l2 = ["b"];
        let hits =
            weighted_reciprocal_rank_fusion(&[(&l1[..], 1.0), (&l2[..], 2.0)], 60.0).unwrap();
        assert_eq!(ids(&hits), ["b", "a"]);
        assert!((hits[0].score - 2.0 / 61.0).abs() < 1e-12);
        let zero = weighted_reciprocal_rank_fusion(&[(&l1[..], 0.0)], 60.0).unwrap();
        assert_eq!(zero[0].score, 0.0);
    }

    #[test]
    fn rrf_refuses_bad_constants() {
        let l = ["a"];
        assert!(reciprocal_rank_fusion(&[&l[..]], f64::NAN).is_err());
        assert!(reciprocal_rank_fusion(&[&l[..]], -1.0).is_err());
        assert!(weighted_reciprocal_rank_fusion(&[(&l[..], f64::INFINITY)], 60.0).is_err());
        let empty: Vec<FusedHit> = reciprocal_rank_fusion::<&str>(&[], 60.0).unwrap();
        assert!(empty.is_empty());
    }

    #[test]
    fn collection_names_are_validated() {
        assert!(CollectionName::new("docs_v2-en").is_ok());
        assert!(CollectionName::new(&"a".repeat(64)).is_ok());
        for bad in ["", "Docs", "a b", "../x", "é", &"a".repeat(65)] {
            let error = CollectionName::new(bad).unwrap_err();
            assert!(
                matches!(error, SearchError::InvalidCollectionName { .. }),
                "{bad:?}"
            );
        }
        let parsed: Result<CollectionName, _> = serde_json::from_value(json!("UP"));
        assert!(parsed.is_err());
    }

    #[test]
    fn filters_parse_from_json_and_match() {
        let filter: MetadataFilter =
            serde_json::from_value(json!({"lang": "en", "source": ["a", "b"], "n": 1})).unwrap();
        let meta = |v: Value| v.as_object().unwrap().clone();
        assert!(filter.matches(&meta(
            json!({"lang": "en", "source": "b", "n": 1.0, "x": 2})
        )));
        assert!(!filter.matches(&meta(json!({"lang": "en", "source": "c", "n": 1}))));
        assert!(!filter.matches(&meta(json!({"lang": "en", "n": 1}))));
        assert!(!filter.matches(&meta(json!({"lang": "en", "source": "a", "n": "1"}))));
        assert!(MetadataFilter::all().matches(&Metadata::new()));
        // Round trip.
        let back: MetadataFilter =
            serde_json::from_value(serde_json::to_value(&filter).unwrap()).unwrap();
        assert_eq!(back, filter);
    }

    #[test]
    fn bad_filters_are_refused_with_the_key() {
        for bad in [
            json!(["lang"]),
            json!({"lang": null}),
            json!({"lang": {"a": 1}}),
            json!({"lang": []}),
            json!({"la ng": "en"}),
            json!({"lang": [["en"]]}),
        ] {
            let error = MetadataFilter::from_json(&bad).unwrap_err();
            assert!(matches!(error, SearchError::InvalidFilter(_)), "{bad}");
        }
        let many: Map<String, Value> = (0..=MAX_FILTER_CONDITIONS)
            .map(|i| (format!("k{i}"), json!(1)))
            .collect();
        assert!(MetadataFilter::from_json(&Value::Object(many)).is_err());
    }

    #[test]
    fn vectors_ids_and_bounds_are_validated() {
        assert!(validate_vector(None, &[1.0, 0.0]).is_ok());
        assert!(matches!(
            validate_vector(Some("a"), &[f32::NAN]),
            Err(SearchError::VectorNotFinite { .. })
        ));
        assert!(matches!(
            validate_vector(None, &[0.0, 0.0]),
            Err(SearchError::VectorNotFinite { .. })
        ));
        assert!(matches!(
            validate_vector(None, &[]),
            Err(SearchError::InvalidDimension { .. })
        ));
        assert!(validate_vector(None, &vec![1.0; MAX_DIMENSION + 1]).is_err());
        assert!(validate_id("a").is_ok());
        assert!(validate_id("").is_err());
        assert!(validate_id("a\nb").is_err());
        assert!(validate_id(&"x".repeat(MAX_ID_BYTES + 1)).is_err());
        assert!(validate_k(0).is_err());
        assert!(validate_k(MAX_K).is_ok());
        assert!(validate_k(MAX_K + 1).is_err());
        assert!(validate_batch(MAX_BATCH + 1).is_err());
        let big: Metadata = [("t".to_owned(), json!("x".repeat(MAX_METADATA_BYTES)))]
            .into_iter()
            .collect();
        assert!(matches!(
            encode_metadata("a", &big),
            Err(SearchError::MetadataTooLarge { .. })
        ));
        let message = SearchError::DimensionMismatch {
            expected: 384,
            got: 3,
            id: Some("a".into()),
        }
        .to_string();
        assert!(message.contains("384") && message.contains('3') && message.contains("\"a\""));
    }
}
