//! Retrieval quality on a real corpus with a labelled query set: *The Rust Programming
//! Language* as the toolchain ships it (`$(rustc --print sysroot)/share/doc/rust/html/book`).
//!
//! The corpus: every chapter page (`ch*.html`) cut at its `<h2>`/`<h3>` headings into
//! sections; a section's body (without its heading) is indexed as passages of
//! [`DEFAULT_CHUNK_CHARS`] characters overlapping by [`DEFAULT_OVERLAP_CHARS`], each with
//! its section in the metadata. The labelled queries: each heading that is unique in the
//! corpus ("Summary" and the like are left out) and has at least two words, whose one
//! relevant document is its own section. This is the "title as query" construction of
//! known-item retrieval test sets (the heading was written by the author to name what the
//! section is about, and its words need not occur in the body).
//!
//! **recall@k** is the share of queries whose section has a passage among the first `k`
//! hits (each query has exactly one relevant section, so recall@k equals the hit rate at
//! k); **MRR** the mean of `1 / rank` of the first such passage (0 when absent).

use std::collections::HashMap;
use std::path::Path;

use arches_core::search::{CollectionName, Metadata, MetadataFilter};
use arches_core::OrgId;
use serde_json::Value;

use super::{
    chunk_text, Error, Passage, SearchMode, SearchServices, DEFAULT_CHUNK_CHARS,
    DEFAULT_OVERLAP_CHARS,
};

/// One section of the book.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Section {
    /// `<page>#<heading anchor>`.
    pub id: String,
    /// The heading's text.
    pub title: String,
    /// The body's visible text, without the heading.
    pub text: String,
}

/// One labelled query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelledQuery {
    /// The query text (a heading).
    pub text: String,
    /// The id of the one relevant section.
    pub relevant: String,
}

/// The sections of the chapter pages in `book_dir` (`ch*.html`, in file-name order) whose
/// file name starts with one of `prefixes` (every chapter when empty). Sections with fewer
/// than 200 characters of body are left out (they are headings over subsections).
///
/// # Errors
/// A message naming the directory or page that cannot be read.
pub fn book_sections(book_dir: &Path, prefixes: &[&str]) -> Result<Vec<Section>, String> {
    let mut pages: Vec<_> = std::fs::read_dir(book_dir)
        .map_err(|error| format!("cannot read {}: {error}", book_dir.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("ch") && name.ends_with(".html"))
        .filter(|name| prefixes.is_empty() || prefixes.iter().any(|p| name.starts_with(p)))
        .collect();
    pages.sort();
    let mut sections = Vec::new();
    for page in pages {
        let path = book_dir.join(&page);
        let html = std::fs::read_to_string(&path)
            .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
        let main = match (html.find("<main>"), html.rfind("</main>")) {
            (Some(start), Some(end)) if start < end => &html[start..end],
            _ => continue,
        };
        sections.extend(page_sections(&page, main));
    }
    Ok(sections)
}

/// Cuts a page's `<main>` at `<h2 id=…>` and `<h3 id=…>` headings.
fn page_sections(page: &str, main: &str) -> Vec<Section> {
    let mut starts: Vec<usize> = Vec::new();
    for tag in ["<h2 id=\"", "<h3 id=\""] {
        let mut from = 0;
        while let Some(found) = main[from..].find(tag) {
            starts.push(from + found);
            from += found + tag.len();
        }
    }
    starts.sort_unstable();
    let mut sections = Vec::new();
    for (index, &start) in starts.iter().enumerate() {
        let end = starts.get(index + 1).copied().unwrap_or(main.len());
        let block = &main[start..end];
        let Some(anchor_end) = block[8..].find('"').map(|i| i + 8) else {
            continue;
        };
        let anchor = &block[8..anchor_end];
        let Some(heading_end) = block.find("</h2>").or_else(|| block.find("</h3>")) else {
            continue;
        };
        let title = visible_text(&block[..heading_end]);
        let body = visible_text(&block[heading_end + 5..]);
        if title.is_empty() || body.chars().count() < 200 {
            continue;
        }
        sections.push(Section {
            id: format!("{page}#{anchor}"),
            title,
            text: body,
        });
    }
    sections
}

fn visible_text(html: &str) -> String {
    html2text::from_read(html.as_bytes(), 10_000)
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The labelled queries of `sections`: each title of at least two words that no other
/// section shares.
pub fn heading_queries(sections: &[Section]) -> Vec<LabelledQuery> {
    let mut count: HashMap<String, usize> = HashMap::new();
    for section in sections {
        *count.entry(section.title.to_lowercase()).or_default() += 1;
    }
    sections
        .iter()
        .filter(|s| count[&s.title.to_lowercase()] == 1 && s.title.split_whitespace().count() >= 2)
        .map(|s| LabelledQuery {
            text: s.title.clone(),
            relevant: s.id.clone(),
        })
        .collect()
}

/// Indexes `sections` into `collection` (passages `<section id>#<n>`, the section under
/// `section` in the metadata). Returns the number of passages.
///
/// # Errors
/// Embedding and index errors.
pub async fn index_sections(
    services: &SearchServices,
    org: OrgId,
    collection: &CollectionName,
    sections: &[Section],
) -> Result<usize, Error> {
    let mut passages = Vec::new();
    for section in sections {
        for (number, chunk) in chunk_text(&section.text, DEFAULT_CHUNK_CHARS, DEFAULT_OVERLAP_CHARS)
            .into_iter()
            .enumerate()
        {
            let mut metadata = Metadata::new();
            metadata.insert("section".to_owned(), Value::String(section.id.clone()));
            passages.push(Passage {
                id: format!("{}#{number}", section.id),
                text: chunk,
                metadata,
            });
        }
    }
    Ok(services.index(org, collection, passages).await?.passages)
}

/// Recall and MRR of one mode.
#[derive(Clone, Debug, PartialEq)]
pub struct RetrievalReport {
    /// The mode measured.
    pub mode: SearchMode,
    /// Queries asked.
    pub queries: usize,
    /// recall@k: the share of queries whose section is among the first `k` hits.
    pub recall: f64,
    /// Mean reciprocal rank of the relevant section within the first `k` hits.
    pub mrr: f64,
}

/// Asks every query in `mode` and measures recall@`k` and MRR.
///
/// # Errors
/// Search errors.
pub async fn evaluate(
    services: &SearchServices,
    org: OrgId,
    collection: &CollectionName,
    queries: &[LabelledQuery],
    k: usize,
    mode: SearchMode,
) -> Result<RetrievalReport, Error> {
    let mut found = 0usize;
    let mut reciprocal = 0.0f64;
    for query in queries {
        let hits = services
            .search(
                org,
                collection,
                &query.text,
                k,
                mode,
                &MetadataFilter::all(),
            )
            .await?;
        let rank = hits.iter().position(|hit| {
            hit.metadata.get("section").and_then(Value::as_str) == Some(query.relevant.as_str())
        });
        if let Some(rank) = rank {
            found += 1;
            reciprocal += 1.0 / (rank + 1) as f64;
        }
    }
    let n = queries.len().max(1) as f64;
    Ok(RetrievalReport {
        mode,
        queries: queries.len(),
        recall: found as f64 / n,
        mrr: reciprocal / n,
    })
}
