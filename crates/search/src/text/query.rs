//! User query text to an SQLite FTS5 query, in the spirit of PostgreSQL's
//! `websearch_to_tsquery`: words are ANDed, `"quoted words"` are phrases, `or` between terms
//! is OR, a leading `-` excludes a term. Every term is emitted as an FTS5 string (between
//! double quotes, which cannot occur inside it), so no user character is ever FTS5 syntax.

/// One term: a word or a phrase of words.
#[derive(Debug, Clone, PartialEq)]
struct Term {
    words: Vec<String>,
    negated: bool,
}

/// Words of `text`: maximal runs of alphanumeric characters (Unicode), as FTS5's
/// `unicode61` tokenizer sees them (it also splits on everything else).
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The FTS5 query for `input`, or `None` when it has no word to search for (empty,
/// punctuation only, or only excluded terms).
pub(crate) fn to_fts5(input: &str) -> Option<String> {
    // Groups of ANDed terms, ORed together.
    let mut groups: Vec<Vec<Term>> = vec![Vec::new()];
    let mut rest = input;
    let mut pending_or = false;
    while !rest.is_empty() {
        rest = rest.trim_start();
        if rest.is_empty() {
            break;
        }
        let negated = rest.starts_with('-');
        let body = if negated { &rest[1..] } else { rest };
        let (chunk, tail, phrase) = if let Some(after) = body.strip_prefix('"') {
            match after.find('"') {
                Some(end) => (&after[..end], &after[end + 1..], true),
                None => (after, "", true),
            }
        } else {
            let end = body.find(char::is_whitespace).unwrap_or(body.len());
            (&body[..end], &body[end..], false)
        };
        rest = tail;
        if !phrase && !negated && chunk.eq_ignore_ascii_case("or") {
            pending_or = true;
            continue;
        }
        let ws = words(chunk);
        if ws.is_empty() {
            continue;
        }
        // A chunk such as "foo-bar" or "e.g." splits into several words: it is searched as a
        // phrase, as the tokenizer indexed them next to each other.
        let term = Term { words: ws, negated };
        if pending_or && groups.last().is_some_and(|g| !g.is_empty()) {
            groups.push(Vec::new());
        }
        pending_or = false;
        if let Some(group) = groups.last_mut() {
            group.push(term);
        }
    }
    let rendered: Vec<String> = groups
        .iter()
        .filter_map(|group| {
            let positive: Vec<String> = group.iter().filter(|t| !t.negated).map(render).collect();
            if positive.is_empty() {
                return None;
            }
            let mut query = positive.join(" AND ");
            for t in group.iter().filter(|t| t.negated) {
                query = format!("({query}) NOT {}", render(t));
            }
            Some(format!("({query})"))
        })
        .collect();
    if rendered.is_empty() {
        None
    } else {
        Some(rendered.join(" OR "))
    }
}

fn render(term: &Term) -> String {
    // Words hold only alphanumeric characters: no double quote to escape.
    format!("\"{}\"", term.words.join(" "))
}

#[cfg(test)]
mod tests {
    use super::to_fts5;

    #[test]
    fn words_are_anded_and_quoted() {
        assert_eq!(to_fts5("cat dog").unwrap(), r#"("cat" AND "dog")"#);
        assert_eq!(
            to_fts5(r#"AND OR NOT "near(" * ^ : cat"#).unwrap(),
            r#"("AND") OR ("NOT" AND "near" AND "cat")"#
        );
    }

    #[test]
    fn phrases_negation_and_or() {
        assert_eq!(
            to_fts5(r#""big cat" -dog"#).unwrap(),
            r#"(("big cat") NOT "dog")"#
        );
        assert_eq!(to_fts5("cat or dog").unwrap(), r#"("cat") OR ("dog")"#);
        assert_eq!(to_fts5("e-mail").unwrap(), r#"("e mail")"#);
        assert_eq!(
            to_fts5(r#"unterminated "quote here"#).unwrap(),
            r#"("unterminated" AND "quote here")"#
        );
    }

    #[test]
    fn nothing_to_search_is_none() {
        for q in ["", "   ", "!!! ??? ***", "-cat", "\"\"", "or", "- -"] {
            assert_eq!(to_fts5(q), None, "{q:?}");
        }
    }
}
