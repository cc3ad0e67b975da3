//! Retrieval quality and query speed of the search services on *The Rust Programming
//! Language* (see `arches_tools::search::eval` for the corpus and the labelled queries):
//! recall@k and MRR of full-text, vector and hybrid search.
//!
//! ```sh
//! cargo run --release -p arches-tools --example retrieval_bench -- \
//!     --model-dir "$(scripts/fetch-model)" \
//!     --book "$(rustc --print sysroot)/share/doc/rust/html/book" [--k 10] [--prefix ch04-]
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use arches_core::search::CollectionName;
use arches_core::OrgId;
use arches_embed::{MiniLmEmbedder, MiniLmOptions};
use arches_search::{HnswIndex, HnswIndexOptions, SqliteTextIndex};
use arches_tools::search::eval::{book_sections, evaluate, heading_queries, index_sections};
use arches_tools::search::{SearchMode, SearchServices};

struct Args {
    model_dir: PathBuf,
    book: PathBuf,
    k: usize,
    prefixes: Vec<String>,
}

fn args() -> Result<Args, String> {
    let mut model_dir = None;
    let mut book = None;
    let mut k = 10;
    let mut prefixes = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--model-dir" => model_dir = Some(PathBuf::from(value()?)),
            "--book" => book = Some(PathBuf::from(value()?)),
            "--k" => k = value()?.parse().map_err(|e| format!("--k: {e}"))?,
            "--prefix" => prefixes.push(value()?),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        model_dir: model_dir.ok_or("--model-dir is required")?,
        book: book.ok_or("--book is required")?,
        k,
        prefixes,
    })
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let args = args()?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let embedder = MiniLmEmbedder::load(&args.model_dir, MiniLmOptions::default())
        .map_err(|e| e.to_string())?;
    let vectors = HnswIndex::open(dir.path().join("vectors"), HnswIndexOptions::default())
        .map_err(|e| e.to_string())?;
    let text = SqliteTextIndex::open(&dir.path().join("text.db"))
        .await
        .map_err(|e| e.to_string())?;
    let services = SearchServices::new(Arc::new(embedder), Arc::new(vectors), Arc::new(text));
    let prefixes: Vec<&str> = args.prefixes.iter().map(String::as_str).collect();
    let sections = book_sections(&args.book, &prefixes)?;
    let queries = heading_queries(&sections);
    let collection = CollectionName::new("book").map_err(|e| e.to_string())?;
    let started = Instant::now();
    let passages = index_sections(&services, OrgId::DEFAULT, &collection, &sections)
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "corpus: {} sections, {passages} passages, indexed in {:.1} s; {} labelled queries",
        sections.len(),
        started.elapsed().as_secs_f64(),
        queries.len()
    );
    for mode in [SearchMode::Text, SearchMode::Vector, SearchMode::Hybrid] {
        let started = Instant::now();
        let report = evaluate(
            &services,
            OrgId::DEFAULT,
            &collection,
            &queries,
            args.k,
            mode,
        )
        .await
        .map_err(|e| e.to_string())?;
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "{:>6}: recall@{} {:.3}  MRR {:.3}  {:.1} ms per query (embedding included)",
            mode.as_str(),
            args.k,
            report.recall,
            report.mrr,
            seconds * 1000.0 / report.queries.max(1) as f64
        );
    }
    Ok(())
}
