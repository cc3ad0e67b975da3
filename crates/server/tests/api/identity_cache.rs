//! The identity read cache keeps every rule of the identity port: the whole identity
//! conformance suite runs against `CachingIdentityStore` over a real SQLite file (its tests
//! read, write, then read again, so a write that failed to empty the cache shows up as a
//! stale answer).

use std::sync::Arc;

use arches_core::records::Durability;
use arches_server::identity_cache::CachingIdentityStore;
use arches_store::SqliteStore;

arches_store::identity_conformance_tests!(async {
    let directory = tempfile::tempdir().expect("a temporary directory");
    let store = SqliteStore::open(&directory.path().join("arches.db"), Durability::Normal)
        .await
        .expect("the store opens");
    arches_store::conformance_identity::IdentityFixture::new(
        Arc::new(CachingIdentityStore::new(Arc::new(store))),
        directory,
    )
});
