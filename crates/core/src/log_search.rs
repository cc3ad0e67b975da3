//! Full-text search over task log lines: the query syntax, the search request and its hits.
//!
//! # Query syntax
//!
//! A query is a list of terms, and a line matches when it contains **every** term (AND):
//!
//! - a bare word (`timeout`) matches that word, case-insensitively;
//! - a double-quoted phrase (`"connection refused"`) matches its words next to each other, in
//!   that order; a quote left open runs to the end of the query;
//! - punctuation is never an operator: every character that is not a letter or a digit
//!   separates words, so `connection_refused` or `host-1` is read as the phrase of its parts
//!   (`"connection refused"`, `"host 1"`), and `OR`, `NOT`, `NEAR`, `*`, `-`, `'` and `\`
//!   are plain text (a word `or` is looked up like any other).
//!
//! Stores index words the same way (letters and digits, everything else a separator, no
//! stemming, no stop words), so a term matches exactly the lines that contain its words.
//! Text with no word at all (empty, or only punctuation) is refused, as are queries longer
//! than [`LOG_SEARCH_QUERY_CHARS_MAX`] characters or with more than
//! [`LOG_SEARCH_WORDS_MAX`] words. Parsing never fails otherwise, so user input is never
//! handed to a store's own query language.

use serde::{Deserialize, Serialize};

use crate::ids::{OrgId, RunId, TaskId};
use crate::records::{LogLine, LogStream};
use crate::time::Timestamp;

/// Hits a search returns when its `limit` is 0.
pub const LOG_SEARCH_LIMIT_DEFAULT: u32 = 100;
/// Most hits one search returns; a larger `limit` is lowered to this.
pub const LOG_SEARCH_LIMIT_MAX: u32 = 1_000;
/// Longest query text, in characters.
pub const LOG_SEARCH_QUERY_CHARS_MAX: usize = 1_000;
/// Most words in one query (over all its terms).
pub const LOG_SEARCH_WORDS_MAX: usize = 32;

/// Why a query text was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LogSearchQueryError {
    /// The text holds no letter or digit.
    #[error("the query has no word to search for (letters and digits; punctuation only separates words)")]
    NoWords,
    /// The text is longer than [`LOG_SEARCH_QUERY_CHARS_MAX`] characters.
    #[error("the query is {chars} characters long; at most {max} are allowed")]
    TooLong {
        /// Characters of the text.
        chars: usize,
        /// The maximum.
        max: usize,
    },
    /// The text holds more than [`LOG_SEARCH_WORDS_MAX`] words.
    #[error("the query has {words} words; at most {max} are allowed")]
    TooManyWords {
        /// Words of the text.
        words: usize,
        /// The maximum.
        max: usize,
    },
}

/// A parsed log search query: terms that must all match, each a phrase of one or more
/// lowercase words made of letters and digits only (see the [module](self) for the syntax).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogSearchQuery {
    phrases: Vec<Vec<String>>,
}

impl LogSearchQuery {
    /// Parses query text.
    ///
    /// # Errors
    /// [`LogSearchQueryError`] when the text has no word, is too long, or has too many words.
    pub fn parse(text: &str) -> Result<Self, LogSearchQueryError> {
        let chars = text.chars().count();
        if chars > LOG_SEARCH_QUERY_CHARS_MAX {
            return Err(LogSearchQueryError::TooLong {
                chars,
                max: LOG_SEARCH_QUERY_CHARS_MAX,
            });
        }
        let mut phrases: Vec<Vec<String>> = Vec::new();
        let mut push = |phrase: Vec<String>| {
            if !phrase.is_empty() && !phrases.contains(&phrase) {
                phrases.push(phrase);
            }
        };
        // Between quotes at even positions: bare words; at odd positions: phrases. An
        // unbalanced quote leaves the last segment at an odd position: a phrase to the end.
        for (position, segment) in text.split('"').enumerate() {
            if position % 2 == 1 {
                push(words(segment));
            } else {
                for bare in segment.split_whitespace() {
                    push(words(bare));
                }
            }
        }
        let count: usize = phrases.iter().map(Vec::len).sum();
        if count == 0 {
            return Err(LogSearchQueryError::NoWords);
        }
        if count > LOG_SEARCH_WORDS_MAX {
            return Err(LogSearchQueryError::TooManyWords {
                words: count,
                max: LOG_SEARCH_WORDS_MAX,
            });
        }
        Ok(Self { phrases })
    }

    /// The terms, each a non-empty phrase of non-empty lowercase words of letters and digits
    /// only; never empty.
    pub fn phrases(&self) -> &[Vec<String>] {
        &self.phrases
    }
}

/// The words of `text`: runs of letters and digits, lowercased.
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|word| !word.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// A full-text search of one org's log lines: hits by relevance, the best first, lines of
/// equal relevance the newest (highest `seq`) first.
#[derive(Clone, Debug, PartialEq)]
pub struct LogSearch {
    /// The org whose runs' lines are searched; lines of other orgs are never returned.
    pub org_id: OrgId,
    /// What to look for.
    pub query: LogSearchQuery,
    /// Only lines of this run.
    pub run_id: Option<RunId>,
    /// Only lines of this task (all its task runs and items).
    pub task_id: Option<TaskId>,
    /// Only lines of this stream.
    pub stream: Option<LogStream>,
    /// Only lines written at or after this time.
    pub since: Option<Timestamp>,
    /// Only lines written before this time.
    pub until: Option<Timestamp>,
    /// At most this many hits: 0 means [`LOG_SEARCH_LIMIT_DEFAULT`], and more than
    /// [`LOG_SEARCH_LIMIT_MAX`] means that maximum.
    pub limit: u32,
}

/// A log line that matched a search.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogHit {
    /// The line.
    #[serde(flatten)]
    pub line: LogLine,
    /// Relevance: higher is better. Backend-specific (BM25 on SQLite, `ts_rank` on
    /// PostgreSQL), so comparable only between hits of one search.
    pub score: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phrases(text: &str) -> Vec<Vec<String>> {
        LogSearchQuery::parse(text).unwrap().phrases().to_vec()
    }

    #[test]
    fn words_and_quoted_phrases_become_terms() {
        assert_eq!(phrases("Timeout  db"), vec![vec!["timeout"], vec!["db"]]);
        assert_eq!(
            phrases(r#"error "connection refused" x"#),
            vec![vec!["error"], vec!["connection", "refused"], vec!["x"]]
        );
        assert_eq!(
            phrases("connection_refused host-1"),
            vec![vec!["connection", "refused"], vec!["host", "1"]]
        );
        assert_eq!(phrases("a a A"), vec![vec!["a"]]);
        assert_eq!(
            phrases("Ünïcode ✓ данные"),
            vec![vec!["ünïcode"], vec!["данные"]]
        );
    }

    #[test]
    fn operators_and_unbalanced_quotes_are_plain_text() {
        assert_eq!(
            phrases(r#"a OR b NEAR(c) -d e* 'f' \g"#),
            vec![
                vec!["a"],
                vec!["or"],
                vec!["b"],
                vec!["near", "c"],
                vec!["d"],
                vec!["e"],
                vec!["f"],
                vec!["g"]
            ]
        );
        assert_eq!(
            phrases(r#"x "open phrase"#),
            vec![vec!["x"], vec!["open", "phrase"]]
        );
        assert_eq!(phrases(r#"""y"""#), vec![vec!["y"]]);
    }

    #[test]
    fn text_without_words_or_too_large_is_refused() {
        for text in ["", "   ", "\"", "* - ' \\ \"\" ()", "✓"] {
            assert_eq!(
                LogSearchQuery::parse(text),
                Err(LogSearchQueryError::NoWords),
                "{text:?}"
            );
        }
        let long = "a".repeat(LOG_SEARCH_QUERY_CHARS_MAX + 1);
        assert!(matches!(
            LogSearchQuery::parse(&long),
            Err(LogSearchQueryError::TooLong { .. })
        ));
        let many = (0..=LOG_SEARCH_WORDS_MAX)
            .map(|i| format!("w{i}"))
            .collect::<Vec<_>>()
            .join(" ");
        assert!(matches!(
            LogSearchQuery::parse(&many),
            Err(LogSearchQueryError::TooManyWords { .. })
        ));
    }
}
