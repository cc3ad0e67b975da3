//! The one error type of the client: what the server refused (its `{code, message,
//! details}` body and HTTP status), what never reached it or never came back (transport),
//! and what came back in a shape the client does not understand (decoding).

use std::fmt;

use serde::Deserialize;
use serde_json::Value;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server answered with an error status; its body was the API's error shape (or, from
    /// something in front of the server, was made into it: see [`ApiError`]).
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The request did not complete: the server could not be reached, the connection broke,
    /// or a timeout ran out.
    #[error("{kind} {url}: {message}")]
    Transport {
        /// What went wrong, in broad terms.
        kind: TransportKind,
        /// The URL asked for.
        url: String,
        /// The innermost cause.
        message: String,
        /// The underlying error.
        #[source]
        source: reqwest::Error,
    },
    /// The server answered success, but the body was not what the API documents (or was
    /// larger than the client's bound).
    #[error("unexpected answer from {url}: {message}")]
    Decode {
        /// The URL asked for.
        url: String,
        /// What did not match.
        message: String,
    },
    /// The base URL or an argument cannot make a request URL.
    #[error("invalid server URL {url:?}: {message}")]
    InvalidUrl {
        /// The text given.
        url: String,
        /// Why it is refused.
        message: String,
    },
    /// A downloaded artifact did not match its metadata (size or SHA-256 digest); the
    /// partial file was removed.
    #[error("artifact {id} content does not match its metadata: {message}")]
    Integrity {
        /// The artifact.
        id: String,
        /// What differs.
        message: String,
    },
    /// Reading or writing a local file (a download's destination).
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done (`cannot write`…).
        action: &'static str,
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The same type under the name the CLI and the brief use.
pub use Error as ClientError;

impl Error {
    /// The HTTP status, for [`Error::Api`].
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api(api) => Some(api.status),
            _ => None,
        }
    }

    /// The API's stable error code (`not_found`, `token_expired`…), for [`Error::Api`].
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Api(api) => Some(&api.code),
            _ => None,
        }
    }

    /// Whether the server refused the credentials (HTTP 401): the caller should log in again
    /// or give another token.
    pub fn is_unauthenticated(&self) -> bool {
        self.status() == Some(401)
    }

    /// Whether the resource does not exist (or belongs to another org, which the server
    /// answers the same way).
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    pub(crate) fn transport(url: &str, source: reqwest::Error) -> Self {
        let kind = if source.is_timeout() {
            TransportKind::Timeout
        } else if source.is_connect() {
            TransportKind::Connect
        } else if source.is_body() || source.is_decode() {
            TransportKind::Body
        } else {
            TransportKind::Request
        };
        Error::Transport {
            kind,
            url: url.to_owned(),
            message: causes(&source),
            source,
        }
    }

    pub(crate) fn decode(url: &str, message: impl fmt::Display) -> Self {
        Error::Decode {
            url: url.to_owned(),
            message: message.to_string(),
        }
    }
}

/// The broad reason a request did not complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportKind {
    /// No connection could be made (refused, unreachable, name not resolved).
    Connect,
    /// A timeout ran out: the connect timeout, the request timeout, or the idle timeout of a
    /// stream.
    Timeout,
    /// The connection broke while the body was read.
    Body,
    /// Anything else while sending the request.
    Request,
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TransportKind::Connect => "cannot connect to",
            TransportKind::Timeout => "timed out waiting for",
            TransportKind::Body => "connection broken while reading",
            TransportKind::Request => "request failed:",
        })
    }
}

/// The innermost cause of an error chain, which says what happened ("Connection refused
/// (os error 111)") without the outer layers that repeat the URL or name the library's
/// stages.
fn causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut innermost = error;
    while let Some(cause) = innermost.source() {
        innermost = cause;
    }
    innermost.to_string()
}

/// An error answer of the API: `{"code": "...", "message": "...", "details": {...}}` with its
/// HTTP status.
///
/// A body that is not this shape (a proxy's HTML page, an empty body) becomes `code`
/// `http_<status>` with the start of the body, or the status's reason, as `message`.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{message} (HTTP {status}, {code})")]
pub struct ApiError {
    /// The HTTP status.
    pub status: u16,
    /// The stable code (`bad_request`, `validation_failed`, `unauthenticated`,
    /// `invalid_credentials`, `token_expired`, `mfa_required`, `forbidden`, `not_found`,
    /// `conflict`, `rate_limited`, `unavailable`, `internal`…).
    pub code: String,
    /// What went wrong, for people.
    pub message: String,
    /// Structured details (`diagnostics`, `parameter`, `mfa_token`, `retry_after_secs`…);
    /// an empty object when there are none.
    pub details: Value,
}

#[derive(Deserialize)]
struct Body {
    code: String,
    message: String,
    #[serde(default)]
    details: Value,
}

/// Longest part of a non-API error body kept as the message, in characters.
const FOREIGN_MESSAGE_CHARS_MAX: usize = 300;

impl ApiError {
    /// Builds the error of a response with `status` and (already bounded) `body`.
    pub fn from_body(status: u16, body: &[u8]) -> Self {
        if let Ok(parsed) = serde_json::from_slice::<Body>(body) {
            return ApiError {
                status,
                code: parsed.code,
                message: parsed.message,
                details: if parsed.details.is_null() {
                    Value::Object(Default::default())
                } else {
                    parsed.details
                },
            };
        }
        let text = String::from_utf8_lossy(body);
        let text = text.trim();
        let message = if text.is_empty() {
            reqwest::StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("request failed")
                .to_ascii_lowercase()
        } else {
            let mut short: String = text.chars().take(FOREIGN_MESSAGE_CHARS_MAX).collect();
            if short.len() < text.len() {
                short.push('…');
            }
            short
        };
        ApiError {
            status,
            code: format!("http_{status}"),
            message,
            details: Value::Object(Default::default()),
        }
    }

    /// A string detail, such as `details.mfa_token`.
    pub fn detail_str(&self, name: &str) -> Option<&str> {
        self.details.get(name).and_then(Value::as_str)
    }

    /// The pipeline problems of a `validation_failed` answer (`details.diagnostics`), empty
    /// when there are none.
    pub fn diagnostics(&self) -> Vec<Diagnostic> {
        self.details
            .get("diagnostics")
            .and_then(|d| serde_json::from_value(d.clone()).ok())
            .unwrap_or_default()
    }
}

/// One problem of a pipeline source, as the server reports it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Diagnostic {
    /// Stable code, for example `unknown_tool`, `cycle`.
    pub code: String,
    /// What is wrong.
    pub message: String,
    /// The source name the server gave the text (`pipeline.yaml`).
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<u32>,
    /// 1-based column, when known.
    pub column: Option<u32>,
    /// JSON Pointer of the offending value.
    #[serde(default)]
    pub pointer: String,
    /// How to fix it.
    pub hint: Option<String>,
}

impl Diagnostic {
    /// The problem as `file:line:column: error[code]: message (at pointer)` with the hint on
    /// a second line, the way `arches validate` prints it, naming `file` as the source.
    pub fn render(&self, file: &str) -> String {
        let mut text = file.to_owned();
        if let Some(line) = self.line {
            text.push_str(&format!(":{line}"));
            if let Some(column) = self.column {
                text.push_str(&format!(":{column}"));
            }
        }
        text.push_str(&format!(": error[{}]: {}", self.code, self.message));
        if !self.pointer.is_empty() {
            text.push_str(&format!(" (at {})", self.pointer));
        }
        if let Some(hint) = &self.hint {
            text.push_str(&format!("\n  hint: {hint}"));
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_api_error_body_is_read_with_its_details() {
        let error = ApiError::from_body(
            401,
            br#"{"code":"mfa_required","message":"a code is required","details":{"mfa_token":"mfa_x"}}"#,
        );
        assert_eq!(error.code, "mfa_required");
        assert_eq!(error.detail_str("mfa_token"), Some("mfa_x"));
        assert_eq!(
            error.to_string(),
            "a code is required (HTTP 401, mfa_required)"
        );
    }

    #[test]
    fn a_foreign_error_body_keeps_its_status_and_a_short_message() {
        let error = ApiError::from_body(502, b"");
        assert_eq!(error.code, "http_502");
        assert_eq!(error.message, "bad gateway");
        let long = "<html>".repeat(200);
        let error = ApiError::from_body(500, long.as_bytes());
        assert!(error.message.chars().count() <= FOREIGN_MESSAGE_CHARS_MAX + 1);
        assert!(error.message.ends_with('…'));
    }

    #[test]
    fn diagnostics_render_like_the_local_validator() {
        let error = ApiError::from_body(
            422,
            br#"{"code":"validation_failed","message":"1 problem","details":{"diagnostics":[
                {"code":"unknown_tool","message":"no tool named nope","file":"pipeline.yaml",
                 "line":4,"column":11,"pointer":"/tasks/0/tool","hint":"see arches tools"}]}}"#,
        );
        let diagnostics = error.diagnostics();
        assert_eq!(diagnostics.len(), 1);
        assert_eq!(
            diagnostics[0].render("p.yaml"),
            "p.yaml:4:11: error[unknown_tool]: no tool named nope (at /tasks/0/tool)\n  hint: see arches tools"
        );
    }
}
