//! The text-index conformance suite on PostgreSQL, each test on a fresh database of the
//! server that `ARCHES_TEST_POSTGRES_URL` names (for example
//! `postgres://postgres@127.0.0.1:5432/test`; `.ci/run` sets it). Without that variable the
//! tests fail: they are part of the suite, not optional.
//!
//! Each test creates `arches_test_<uuid>` (the prefix the store's tests use, so their sweep
//! of databases left behind by killed runs covers these too) and drops it when it ends.

use std::str::FromStr;

use arches_core::search::TextIndex;
use arches_search::PgTextIndex;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};
use uuid::Uuid;

const URL_VARIABLE: &str = "ARCHES_TEST_POSTGRES_URL";

fn server_options() -> PgConnectOptions {
    let url = std::env::var(URL_VARIABLE).unwrap_or_else(|_| {
        panic!(
            "{URL_VARIABLE} is not set: these tests need a PostgreSQL server, for example \
             {URL_VARIABLE}=postgres://postgres@127.0.0.1:5432/test (.ci/run sets it)"
        )
    });
    PgConnectOptions::from_str(&url)
        .unwrap_or_else(|error| panic!("{URL_VARIABLE} is not a PostgreSQL URL: {error}"))
}

/// A fresh database, dropped (with `FORCE`, as the index's pool may hold connections) when
/// this is dropped.
pub struct Fixture {
    index: Option<PgTextIndex>,
    admin: PgConnectOptions,
    name: String,
}

impl Fixture {
    pub fn index(&self) -> &dyn TextIndex {
        self.index.as_ref().expect("the index lives until drop")
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Closing the pool would wait on connections of the test's runtime, which this drop
        // blocks: drop it, and let `FORCE` end its connections.
        drop(self.index.take());
        let options = self.admin.clone();
        let statement = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        // `Drop` cannot await and may run on the test's runtime: a thread of its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut admin = options.connect().await?;
                sqlx::query(&statement).execute(&mut admin).await?;
                admin.close().await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("cannot drop test database {}", self.name);
        }
    }
}

async fn fixture() -> Fixture {
    let admin = server_options();
    let mut connection = admin
        .connect()
        .await
        .unwrap_or_else(|error| panic!("cannot connect to the server of {URL_VARIABLE}: {error}"));
    let name = format!("arches_test_{}", Uuid::now_v7().simple());
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut connection)
        .await
        .unwrap_or_else(|error| panic!("cannot create database {name}: {error}"));
    let _ = connection.close().await;
    let mut fixture = Fixture {
        index: None,
        admin: admin.clone(),
        name: name.clone(),
    };
    let index = PgTextIndex::connect_with(admin.database(&name))
        .await
        .unwrap_or_else(|error| panic!("cannot open the text index: {error}"));
    fixture.index = Some(index);
    fixture
}

crate::text_conformance!(fixture().await);

#[tokio::test]
async fn two_indexes_opened_at_once_create_the_schema_once() {
    let fixture = fixture().await;
    let options = fixture.admin.clone().database(&fixture.name);
    let opened = futures_join(
        PgTextIndex::connect_with(options.clone()),
        PgTextIndex::connect_with(options),
    )
    .await;
    assert!(opened.0.is_ok() && opened.1.is_ok());
}

async fn futures_join<A: std::future::Future, B: std::future::Future>(
    a: A,
    b: B,
) -> (A::Output, B::Output) {
    tokio::join!(a, b)
}
