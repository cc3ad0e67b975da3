//! Cutting a text into overlapping chunks for embedding.
//!
//! A sentence-embedding model reads a bounded window (all-MiniLM-L6-v2: 256 word pieces,
//! about 1,000 characters of English), so long documents are indexed as chunks of at most
//! `chunk_chars` characters. Consecutive chunks share about `overlap_chars` characters, so a
//! passage cut at a chunk boundary is still whole in one of the two chunks (the usual
//! "sliding window with overlap" of retrieval-augmented generation pipelines). Cuts fall on
//! whitespace where there is some in the last fifth of the window, so words stay whole.

/// Default chunk length, in characters: about the 256-token window of all-MiniLM-L6-v2.
pub const DEFAULT_CHUNK_CHARS: usize = 1000;
/// Default overlap of consecutive chunks, in characters.
pub const DEFAULT_OVERLAP_CHARS: usize = 200;
/// Shortest chunk length a task may ask for.
pub const MIN_CHUNK_CHARS: usize = 100;
/// Longest chunk length a task may ask for: the chunk's text is kept in the index's metadata,
/// which holds at most 16 KiB per item (4,000 characters of 4 bytes at most).
pub const MAX_CHUNK_CHARS: usize = 4000;

/// Cuts `text` into chunks of at most `chunk_chars` characters overlapping by about
/// `overlap_chars` (which must be below `chunk_chars`; callers check). Whitespace-only text
/// gives no chunk; leading and trailing whitespace of each chunk is trimmed.
pub fn chunk_text(text: &str, chunk_chars: usize, overlap_chars: usize) -> Vec<String> {
    debug_assert!(chunk_chars > 0 && overlap_chars < chunk_chars);
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut chunks = Vec::new();
    let mut start = 0usize;
    while start < chars.len() {
        let mut end = (start + chunk_chars).min(chars.len());
        if end < chars.len() {
            // Prefer a cut on whitespace in the last fifth of the window.
            let floor = end - chunk_chars / 5;
            if let Some(cut) = (floor..end).rev().find(|&i| chars[i].1.is_whitespace()) {
                if cut > start {
                    end = cut;
                }
            }
        }
        let from = chars[start].0;
        let to = chars.get(end).map_or(text.len(), |(offset, _)| *offset);
        let chunk = text[from..to].trim();
        if !chunk.is_empty() {
            chunks.push(chunk.to_owned());
        }
        if end >= chars.len() {
            break;
        }
        // Step back by the overlap, to the start of a word where one is near.
        let mut next = end.saturating_sub(overlap_chars).max(start + 1);
        let limit = (next + overlap_chars / 2).min(end);
        if let Some(word) = (next..limit).find(|&i| i > 0 && chars[i - 1].1.is_whitespace()) {
            next = word;
        }
        start = next;
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_text_is_one_chunk() {
        assert_eq!(chunk_text("  hello world  ", 100, 20), vec!["hello world"]);
        assert!(chunk_text(" \n\t ", 100, 20).is_empty());
    }

    #[test]
    fn chunks_are_bounded_overlap_and_cover_the_text() {
        let words: Vec<String> = (0..400).map(|i| format!("word{i}")).collect();
        let text = words.join(" ");
        let chunks = chunk_text(&text, 200, 50);
        assert!(chunks.len() > 10);
        for chunk in &chunks {
            assert!(chunk.chars().count() <= 200, "{chunk}");
            // Words stay whole: every piece is a full word of the text.
            for piece in chunk.split(' ') {
                assert!(words.iter().any(|w| w == piece), "cut word {piece:?}");
            }
        }
        for pair in chunks.windows(2) {
            let last_of_first = pair[0].split(' ').next_back().unwrap();
            assert!(
                pair[1].contains(last_of_first),
                "no overlap between {:?} and {:?}",
                pair[0],
                pair[1]
            );
        }
        for word in &words {
            assert!(chunks.iter().any(|c| c.split(' ').any(|p| p == word)));
        }
    }

    #[test]
    fn text_without_whitespace_is_cut_at_the_bound_and_multibyte_characters_stay_whole() {
        let text = "é".repeat(450);
        let chunks = chunk_text(&text, 200, 50);
        assert!(chunks.iter().all(|c| c.chars().count() <= 200));
        assert_eq!(chunks[0].chars().count(), 200);
        assert!(chunks.len() >= 3);
    }
}
