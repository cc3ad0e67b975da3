//! `arches migrate`.

use crate::{arches, output};

#[test]
fn migrate_creates_the_sqlite_store_reports_its_version_and_can_run_again() {
    let home = tempfile::tempdir().unwrap();
    let version = |stdout: &str| -> i64 {
        stdout
            .trim()
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no version in {stdout:?}"))
    };
    let (out, first, stderr) = output(arches(home.path()).arg("migrate"));
    assert!(out.status.success(), "{stderr}");
    assert!(
        first.contains("migrations applied, schema version"),
        "{first}"
    );
    assert!(version(&first) >= 1, "{first}");
    assert!(home.path().join("arches.db").exists());

    let (out, second, stderr) = output(arches(home.path()).arg("migrate"));
    assert!(out.status.success(), "{stderr}");
    assert_eq!(version(&second), version(&first));
}

#[test]
fn migrate_names_an_unreachable_postgres_database() {
    let home = tempfile::tempdir().unwrap();
    let (out, _, stderr) = output(arches(home.path()).args([
        "migrate",
        "--database-url",
        "postgres://nobody@127.0.0.1:1/nothing",
    ]));
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot migrate the PostgreSQL database"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
