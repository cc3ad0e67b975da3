//! Media types the built-in tools read and write, and the inference of a media type from a
//! file name.
//!
//! Artifacts are stored content-addressed without a file extension, so the media type is the
//! only record of an artifact's format; tools that read tables decide how to parse a file
//! from it.

use std::path::Path;

/// Comma-separated values with a header line.
pub const CSV: &str = "text/csv";
/// Apache Parquet.
pub const PARQUET: &str = "application/vnd.apache.parquet";
/// JSON: one document, or (for tables) an array of objects.
pub const JSON: &str = "application/json";
/// Newline-delimited JSON: one object per line.
pub const NDJSON: &str = "application/x-ndjson";
/// Markdown text.
pub const MARKDOWN: &str = "text/markdown";
/// Plain text.
pub const TEXT: &str = "text/plain";
/// Bytes of unknown format.
pub const OCTET_STREAM: &str = "application/octet-stream";

/// The media type of a file, inferred from its extension (case-insensitive): `csv`, `parquet`
/// (or `pq`), `json`, `ndjson` (or `jsonl`), `md`, `txt`; anything else is
/// [`OCTET_STREAM`].
pub fn for_path(path: &Path) -> &'static str {
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match extension.as_deref() {
        Some("csv") => CSV,
        Some("parquet" | "pq") => PARQUET,
        Some("json") => JSON,
        Some("ndjson" | "jsonl") => NDJSON,
        Some("md" | "markdown") => MARKDOWN,
        Some("txt" | "log") => TEXT,
        _ => OCTET_STREAM,
    }
}

/// Whether artifacts of this media type can be read as a table by the `sql` tool.
pub fn is_table(media_type: &str) -> bool {
    // Parameters such as `; charset=utf-8` do not change the format.
    let essence = media_type.split(';').next().unwrap_or_default().trim();
    matches!(essence, CSV | PARQUET | JSON | NDJSON)
}

/// Whether a `Content-Type` value names JSON: `application/json` or any `application/*+json`
/// (RFC 6839 structured syntax suffix), parameters and case ignored.
pub fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}
