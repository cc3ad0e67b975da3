//! Text extraction: the documents an artifact holds, by format.
//!
//! - `text` and `markdown`: the whole content is one document (Markdown is kept as written:
//!   its marks carry little weight in an embedding and keep code readable in hits);
//! - `html`: the visible text (html2text, on html5ever), one document;
//! - `csv`: one document per row (the `csv` crate; the first line is the header);
//! - `json`: one document per element of a top-level array, else the value is one document;
//! - `jsonl`: one document per non-empty line.
//!
//! A row's text is its `text_field` when given (empty when the row has none there: callers
//! skip and count such rows), else every field as `name: value` lines.
//! A row's fields are also its metadata (scalars only; nested values are left out), so
//! labelled examples carry their label into the index.

use serde_json::{Map, Value};

/// The formats extraction understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TextFormat {
    /// Plain text.
    Text,
    /// Markdown, kept as written.
    Markdown,
    /// HTML: the visible text.
    Html,
    /// CSV with a header line: one document per row.
    Csv,
    /// JSON: one document per element of a top-level array.
    Json,
    /// JSON Lines: one document per line.
    Jsonl,
}

impl TextFormat {
    /// The format of an artifact from its media type, else from its name's extension;
    /// `None` when neither says (the task must name the format).
    pub fn detect(media_type: &str, name: &str) -> Option<Self> {
        let essence = media_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        let by_type = match essence.as_str() {
            "text/plain" => Some(Self::Text),
            "text/markdown" | "text/x-markdown" => Some(Self::Markdown),
            "text/html" | "application/xhtml+xml" => Some(Self::Html),
            "text/csv" => Some(Self::Csv),
            "application/json" => Some(Self::Json),
            "application/x-ndjson" | "application/jsonl" | "application/jsonlines" => {
                Some(Self::Jsonl)
            }
            _ => None,
        };
        by_type.or_else(|| {
            let extension = name.rsplit_once('.')?.1.to_ascii_lowercase();
            match extension.as_str() {
                "txt" | "text" | "log" => Some(Self::Text),
                "md" | "markdown" => Some(Self::Markdown),
                "html" | "htm" => Some(Self::Html),
                "csv" => Some(Self::Csv),
                "json" => Some(Self::Json),
                "jsonl" | "ndjson" => Some(Self::Jsonl),
                _ => None,
            }
        })
    }
}

/// One document found in an artifact.
#[derive(Clone, Debug, PartialEq)]
pub struct Document {
    /// Its place in the artifact: `None` for a whole-content document, the row (from 0) for
    /// rows.
    pub row: Option<usize>,
    /// Its text.
    pub text: String,
    /// The row's scalar fields (empty for whole-content documents).
    pub fields: Map<String, Value>,
}

/// The documents of `content` read as `format`, at most `max_documents` of them.
///
/// # Errors
/// A message naming the problem and where (the row or line), for content that is not valid
/// UTF-8, CSV or JSON, a `text_field` missing from a row, or more than `max_documents` rows.
pub fn extract(
    content: &[u8],
    format: TextFormat,
    text_field: Option<&str>,
    max_documents: usize,
) -> Result<Vec<Document>, String> {
    let whole = |text: String| {
        Ok(vec![Document {
            row: None,
            text,
            fields: Map::new(),
        }])
    };
    match format {
        TextFormat::Text | TextFormat::Markdown => whole(utf8(content)?.to_owned()),
        TextFormat::Html => {
            // A wide layout: the text is for an index, not a terminal.
            let text = html2text::from_read(content, 10_000)
                .map_err(|error| format!("cannot read the HTML: {error}"))?;
            whole(text)
        }
        TextFormat::Csv => csv_rows(content, text_field, max_documents),
        TextFormat::Json => {
            let value: Value = serde_json::from_slice(content)
                .map_err(|error| format!("invalid JSON: {error}"))?;
            match value {
                Value::Array(items) => {
                    if items.len() > max_documents {
                        return Err(too_many(items.len(), max_documents));
                    }
                    items
                        .into_iter()
                        .enumerate()
                        .map(|(row, item)| row_document(row, item, text_field))
                        .collect()
                }
                other => Ok(vec![row_document(0, other, text_field)?]),
            }
        }
        TextFormat::Jsonl => {
            let text = utf8(content)?;
            let mut documents = Vec::new();
            for (line_number, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                if documents.len() == max_documents {
                    return Err(too_many(documents.len() + 1, max_documents));
                }
                let value: Value = serde_json::from_str(line)
                    .map_err(|error| format!("line {}: invalid JSON: {error}", line_number + 1))?;
                documents.push(
                    row_document(documents.len(), value, text_field)
                        .map_err(|error| format!("line {}: {error}", line_number + 1))?,
                );
            }
            Ok(documents)
        }
    }
}

fn utf8(content: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(content).map_err(|error| {
        format!(
            "the content is not UTF-8 text (byte {})",
            error.valid_up_to()
        )
    })
}

fn too_many(got: usize, max: usize) -> String {
    format!("more than {max} rows (at least {got}): split the data into smaller artifacts")
}

fn csv_rows(
    content: &[u8],
    text_field: Option<&str>,
    max_documents: usize,
) -> Result<Vec<Document>, String> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(false)
        .from_reader(content);
    let headers: Vec<String> = reader
        .headers()
        .map_err(|error| format!("cannot read the CSV header: {error}"))?
        .iter()
        .map(str::to_owned)
        .collect();
    if let Some(field) = text_field {
        if !headers.iter().any(|h| h == field) {
            return Err(format!(
                "text_field {field:?} is not a column (columns: {})",
                headers.join(", ")
            ));
        }
    }
    let mut documents = Vec::new();
    for (row, record) in reader.records().enumerate() {
        if row == max_documents {
            return Err(too_many(row + 1, max_documents));
        }
        // The header is line 1.
        let record = record.map_err(|error| format!("CSV row {}: {error}", row + 1))?;
        let mut fields = Map::new();
        for (name, value) in headers.iter().zip(record.iter()) {
            fields.insert(name.clone(), csv_value(value));
        }
        documents.push(fields_document(row, fields, text_field)?);
    }
    Ok(documents)
}

/// A CSV cell as JSON: numbers stay numbers (so a filter `{"year": 2014}` matches), `NA` and
/// the empty cell are null, anything else is text.
fn csv_value(cell: &str) -> Value {
    if cell.is_empty() || cell == "NA" {
        return Value::Null;
    }
    if let Ok(integer) = cell.parse::<i64>() {
        return Value::from(integer);
    }
    match cell.parse::<f64>() {
        Ok(number) if number.is_finite() => Value::from(number),
        _ => Value::String(cell.to_owned()),
    }
}

fn row_document(row: usize, value: Value, text_field: Option<&str>) -> Result<Document, String> {
    match value {
        Value::Object(map) => {
            let fields: Map<String, Value> = map
                .into_iter()
                .filter(|(_, v)| !v.is_object() && !v.is_array())
                .collect();
            fields_document(row, fields, text_field)
        }
        Value::String(text) if text_field.is_none() => Ok(Document {
            row: Some(row),
            text,
            fields: Map::new(),
        }),
        other => match text_field {
            Some(field) => Err(format!(
                "row {row}: expected an object with the text field {field:?}"
            )),
            None => Ok(Document {
                row: Some(row),
                text: other.to_string(),
                fields: Map::new(),
            }),
        },
    }
}

fn fields_document(
    row: usize,
    fields: Map<String, Value>,
    text_field: Option<&str>,
) -> Result<Document, String> {
    let text = match text_field {
        Some(field) => match fields.get(field) {
            Some(Value::String(text)) => text.clone(),
            // An empty cell: the row has no text (the caller skips it and counts it).
            Some(Value::Null) | None => String::new(),
            Some(other) => other.to_string(),
        },
        None => fields
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(name, value)| match value {
                Value::String(text) => format!("{name}: {text}"),
                other => format!("{name}: {other}"),
            })
            .collect::<Vec<_>>()
            .join("\n"),
    };
    Ok(Document {
        row: Some(row),
        text,
        fields,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn formats_are_detected_by_media_type_then_extension() {
        assert_eq!(TextFormat::detect("text/csv", "x"), Some(TextFormat::Csv));
        assert_eq!(
            TextFormat::detect("text/html; charset=utf-8", "x"),
            Some(TextFormat::Html)
        );
        assert_eq!(
            TextFormat::detect("application/octet-stream", "notes.md"),
            Some(TextFormat::Markdown)
        );
        assert_eq!(
            TextFormat::detect("application/octet-stream", "a.bin"),
            None
        );
    }

    #[test]
    fn csv_rows_become_documents_with_typed_fields() {
        let csv = b"species,island,bill_length_mm\nAdelie,Torgersen,39.1\nGentoo,Biscoe,NA\n";
        let docs = extract(csv, TextFormat::Csv, None, 10).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].row, Some(0));
        assert_eq!(docs[0].fields["bill_length_mm"], json!(39.1));
        assert_eq!(docs[1].fields["bill_length_mm"], Value::Null);
        assert_eq!(
            docs[0].text,
            "bill_length_mm: 39.1\nisland: Torgersen\nspecies: Adelie"
        );
        let by_field = extract(csv, TextFormat::Csv, Some("island"), 10).unwrap();
        assert_eq!(by_field[1].text, "Biscoe");
        let error = extract(csv, TextFormat::Csv, Some("beak"), 10).unwrap_err();
        assert!(error.contains("\"beak\" is not a column"), "{error}");
        let error = extract(csv, TextFormat::Csv, None, 1).unwrap_err();
        assert!(error.contains("more than 1 rows"), "{error}");
    }

    #[test]
    fn json_and_jsonl_rows_and_html_text() {
        let docs = extract(
            br#"[{"text": "a", "label": "x", "nested": {"k": 1}}, {"text": "b", "label": "y"}]"#,
            TextFormat::Json,
            Some("text"),
            10,
        )
        .unwrap();
        assert_eq!(docs[1].text, "b");
        assert_eq!(docs[0].fields.get("nested"), None);
        let error = extract(b"{\"a\":1}\nnot json\n", TextFormat::Jsonl, None, 10).unwrap_err();
        assert!(error.starts_with("line 2: invalid JSON"), "{error}");
        let html = extract(
            b"<html><head><title>t</title><style>p{}</style></head><body><h1>Penguins</h1><p>They <b>swim</b>.</p></body></html>",
            TextFormat::Html,
            None,
            10,
        )
        .unwrap();
        assert!(html[0].text.contains("Penguins"), "{}", html[0].text);
        assert!(html[0].text.contains("swim"), "{}", html[0].text);
        assert!(!html[0].text.contains("<b>"), "{}", html[0].text);
        let error = extract(&[0xff, 0xfe], TextFormat::Text, None, 10).unwrap_err();
        assert!(error.contains("not UTF-8"), "{error}");
    }
}
