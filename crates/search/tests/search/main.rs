//! The integration tests of arches-search, in one binary: the HNSW vector index
//! (`vector`), the text-index conformance suite run against SQLite FTS5 and PostgreSQL
//! (`text`; the PostgreSQL half needs `ARCHES_TEST_POSTGRES_URL` and fails without it), and
//! hybrid search (`hybrid`).

mod hybrid;
mod pg;
mod text;
mod vector;
