//! Rebuilds the crate when a migration changes: `sqlx::migrate!` embeds the files at compile
//! time and cargo does not otherwise watch them.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rerun-if-changed=migrations_pg");
}
