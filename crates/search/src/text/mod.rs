//! Full-text indexes: [`SqliteTextIndex`] (SQLite FTS5, BM25) and [`PgTextIndex`]
//! (PostgreSQL `tsvector` with a GIN index), both behind
//! [`arches_core::search::TextIndex`].

mod postgres;
mod query;
mod sqlite;

use std::collections::HashMap;

use arches_core::search::{
    encode_metadata, validate_batch, validate_id, validate_k, SearchError, TextDocument,
    MAX_QUERY_BYTES, MAX_TEXT_BYTES,
};

pub use postgres::PgTextIndex;
pub use sqlite::SqliteTextIndex;

/// A validated document: NUL characters replaced by spaces (PostgreSQL text cannot hold
/// them), metadata encoded.
pub(crate) struct CheckedDocument {
    pub(crate) id: String,
    pub(crate) text: String,
    pub(crate) metadata: String,
}

/// Validates a batch of documents; repeated ids keep the last (in the position of the first).
pub(crate) fn check_documents(
    documents: Vec<TextDocument>,
) -> Result<Vec<CheckedDocument>, SearchError> {
    validate_batch(documents.len())?;
    let mut checked: Vec<CheckedDocument> = Vec::with_capacity(documents.len());
    let mut position: HashMap<String, usize> = HashMap::new();
    for document in documents {
        validate_id(&document.id)?;
        if document.text.len() > MAX_TEXT_BYTES {
            return Err(SearchError::TextTooLarge {
                id: document.id,
                bytes: document.text.len(),
                max: MAX_TEXT_BYTES,
            });
        }
        let metadata = encode_metadata(&document.id, &document.metadata)?;
        let text = if document.text.contains('\0') {
            document.text.replace('\0', " ")
        } else {
            document.text
        };
        let entry = CheckedDocument {
            id: document.id,
            text,
            metadata,
        };
        match position.get(&entry.id) {
            Some(&i) => checked[i] = entry,
            None => {
                position.insert(entry.id.clone(), checked.len());
                checked.push(entry);
            }
        }
    }
    Ok(checked)
}

/// Validates the ids of a delete.
pub(crate) fn check_ids(ids: &[String]) -> Result<(), SearchError> {
    validate_batch(ids.len())?;
    ids.iter().try_for_each(|id| validate_id(id))
}

/// Validates the arguments of a search; returns the query with NUL characters (which
/// PostgreSQL text cannot hold) replaced by spaces.
pub(crate) fn check_search(query: &str, k: usize) -> Result<String, SearchError> {
    validate_k(k)?;
    if query.len() > MAX_QUERY_BYTES {
        return Err(SearchError::InvalidQuery(format!(
            "the query is {} bytes (at most {MAX_QUERY_BYTES})",
            query.len()
        )));
    }
    Ok(query.replace('\0', " "))
}

pub(crate) fn corrupt_metadata(error: serde_json::Error) -> SearchError {
    SearchError::Corrupt {
        what: "text index metadata".to_owned(),
        reason: error.to_string(),
    }
}
