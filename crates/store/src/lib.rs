//! # arches-store
//!
//! Storage adapters of Arches: [`SqliteStore`], the embedded SQLite implementation of the
//! storage port [`arches_core::ports::Store`], [`PgStore`], its PostgreSQL implementation for
//! several processes sharing one store, and [`LocalArtifactStore`], content-addressed
//! blobs on the local filesystem behind [`arches_core::ports::ArtifactStore`]. The
//! [`conformance`] suite states what every backend of the storage port must do; the
//! [`conformance_tests!`] macro runs it against a backend.
//!
//! Architecture invariant: this is the only crate that knows SQL. It holds no domain rules
//! beyond what the port documents (versioning, fencing of task-run writes); the engine decides
//! what to write.

mod artifacts;
pub mod conformance;
pub mod conformance_identity;
mod decode;
mod error;
pub mod postgres;
mod reviews;
mod sqlite;

pub use artifacts::LocalArtifactStore;
pub use error::Error;
pub use postgres::{PgPoolSettings, PgStore};
pub use sqlite::SqliteStore;
