//! A JSON `POST` sent by another tool of this crate (the `llm` tool's OpenAI-compatible
//! adapter) through the `http` tool's path: the same allowed hosts, circuit breakers, rate
//! limits, retries with backoff and `Retry-After`, timeouts and bounded bodies, so there is
//! one HTTP client stack.

use std::time::Duration;

use arches_core::ports::{LogSink, ToolError};
use arches_core::retry::RetryPolicy;
use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use reqwest::{Method, Url};

use super::{call_allows, display_url, Expect, HttpTool, Request, RETRYABLE_STATUSES};

/// A JSON `POST` to send.
pub(crate) struct JsonPost {
    /// An `http://` URL; its host must be allowed by the tool's policy.
    pub url: Url,
    /// Extra headers (for example `authorization`); `content-type` is set to JSON.
    pub headers: HeaderMap,
    /// The encoded JSON body.
    pub body: Bytes,
    /// Retries of connection errors, timeouts, 408, 429 and 5xx.
    pub retry: RetryPolicy,
    /// Timeout of one attempt (connect, send, read the whole response).
    pub timeout: Duration,
    /// Largest response body read, in bytes (also bounded by the tool's policy); a longer
    /// body fails permanently.
    pub max_body_bytes: u64,
}

/// The response of a [`JsonPost`]: any status the tool does not retry (2xx, and 4xx but 408
/// and 429), with its whole body.
pub(crate) struct Reply {
    /// The status.
    pub status: u16,
    /// The body, at most the post's `max_body_bytes`.
    pub body: Vec<u8>,
}

impl HttpTool {
    /// Sends `post`, writing a line per attempt to `logs`.
    ///
    /// # Errors
    /// Permanent: a URL that is not `http://` or `https://`, or whose host the policy (or the current
    /// registered tool's capabilities) does not allow, checked before anything is sent; a
    /// body over the limit; a 3xx or 1xx. Transient: retries spent on connection errors,
    /// timeouts, 408, 429 and 5xx, or an open circuit breaker.
    pub(crate) async fn post_json(
        &self,
        post: JsonPost,
        logs: &dyn LogSink,
    ) -> Result<Reply, ToolError> {
        let url = post.url;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ToolError::permanent(format!(
                "{}: only http:// and https:// URLs are supported",
                display_url(&url)
            )));
        }
        let Some(host) = url.host_str().map(str::to_owned) else {
            return Err(ToolError::permanent(format!(
                "url {} has no host",
                display_url(&url)
            )));
        };
        if !self.hosts.allows(&url) || !call_allows(&url) {
            return Err(ToolError::permanent(format!(
                "host {host} is not in the http tool's allowed hosts"
            )));
        }
        if post.retry.max_attempts == 0 || post.timeout.is_zero() {
            return Err(ToolError::permanent(
                "a request needs at least one attempt and a positive timeout",
            ));
        }
        let mut headers = post.headers;
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        // Every status the tool does not retry comes back to the caller, which reads 4xx
        // bodies (an OpenAI-compatible server explains a refusal there).
        let answered: Vec<u16> = (200..300)
            .chain(400..500)
            .filter(|status| !RETRYABLE_STATUSES.contains(status))
            .collect();
        let request = Request {
            method: Method::POST,
            url,
            headers,
            body: Some(post.body),
            expect: Expect::Listed(answered),
            max_body_bytes: post.max_body_bytes.clamp(1, self.max_body_bytes),
        };
        let what = format!("POST {}", display_url(&request.url));
        let (exchange, _attempts) = self
            .send(&request, &post.retry, post.timeout, logs, &what)
            .await?;
        Ok(Reply {
            status: exchange.status.as_u16(),
            body: exchange.body,
        })
    }
}
