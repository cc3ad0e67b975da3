//! The OpenAI-compatible adapter of the [`EmbeddingProvider`] port: `POST {base_url}/embeddings`
//! as OpenAI, vLLM, llama.cpp's server, Ollama (`/v1`) and text-embeddings-inference speak it,
//! sent through the `http` tool's request path ([`HttpTool`]) exactly as the chat adapter
//! ([`super::openai::OpenAiProvider`]) is: allowed hosts, a circuit breaker per `host:port`,
//! retries with backoff on connection errors, timeouts, 408, 429 and 5xx (honouring
//! `Retry-After`), and a bounded response body. The API key goes only to `base_url`, as a
//! bearer token, and is masked (`***`) in every message.
//!
//! Sent: `{"model": …, "input": [texts…], "encoding_format": "float"}`. Read:
//! `data[].embedding` (numbers) with `data[].index`, `model`, and `usage.prompt_tokens`.
//!
//! The answer is checked before it is returned: one vector per text (no more, no fewer), the
//! indices a permutation of `0..n` (vectors are put in the order of the texts by `index`,
//! whatever order the server sent them in; a server that sends no index at all is read in
//! array order), every vector of the configured dimension with finite components and not
//! all zero; vectors are then L2-normalised (servers do not all normalise). A 2xx answer that
//! fails a check is a permanent error ([`EmbeddingError::Permanent`]), as is a 4xx; transient
//! failures left after the retries, or an open circuit, are [`EmbeddingError::Unavailable`].

use std::sync::Arc;
use std::time::Duration;

use arches_core::embedding::{
    check_batch, l2_normalize, EmbeddingError, EmbeddingProvider, Embeddings,
    DEFAULT_MAX_TEXT_BYTES,
};
use arches_core::ports::{LogSink, ToolError};
use arches_core::records::LogStream;
use arches_core::retry::RetryPolicy;
use async_trait::async_trait;
use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use reqwest::Url;
use serde_json::{json, Value};

use super::openai::{error_message, quote};
use super::ApiKey;
use crate::http::{HttpTool, JsonPost};

/// Default [`EmbeddingSettings::max_batch`]: 256 texts per request (OpenAI takes 2,048;
/// local servers are slower, and a smaller batch keeps one request's time bounded).
pub const DEFAULT_EMBEDDING_MAX_BATCH: usize = 256;
/// Default [`EmbeddingSettings::max_body_bytes`]: 32 MiB, room for 256 vectors of 3,072
/// components written as JSON floats (about 20 bytes each).
pub const DEFAULT_EMBEDDING_MAX_BODY_BYTES: u64 = 32 * 1024 * 1024;
/// Default [`EmbeddingSettings::timeout`] of one request: 60 s.
pub const DEFAULT_EMBEDDING_TIMEOUT: Duration = Duration::from_secs(60);

/// Settings of one [`OpenAiEmbeddings`] provider.
#[derive(Clone, Debug)]
pub struct EmbeddingSettings {
    /// The API's base URL, up to and including its version (for example
    /// `http://127.0.0.1:11434/v1`); `/embeddings` is appended.
    pub base_url: String,
    /// The model's name as the server knows it (for example `nomic-embed-text`).
    pub model: String,
    /// Components of the model's vectors (for example 768 for nomic-embed-text, 1,536 for
    /// text-embedding-3-small); an answer of another dimension is refused.
    pub dimension: usize,
    /// Sent as `Authorization: Bearer <key>` when set; never printed.
    pub api_key: Option<ApiKey>,
    /// Most texts per request ([`EmbeddingProvider::max_batch`]).
    pub max_batch: usize,
    /// Largest text, in bytes ([`EmbeddingProvider::max_text_bytes`]).
    pub max_text_bytes: usize,
    /// Timeout of one HTTP attempt (connect, send, read the whole answer).
    pub timeout: Duration,
    /// Largest response body read, in bytes.
    pub max_body_bytes: u64,
    /// Retries of transient failures.
    pub retry: RetryPolicy,
}

impl EmbeddingSettings {
    /// Settings for `model` (of `dimension` components) at `base_url`, without a key, with
    /// the defaults above and 3 tries per request (0.5 s backoff doubling to 10 s, jitter
    /// 0.5).
    pub fn new(base_url: impl Into<String>, model: impl Into<String>, dimension: usize) -> Self {
        Self {
            base_url: base_url.into(),
            model: model.into(),
            dimension,
            api_key: None,
            max_batch: DEFAULT_EMBEDDING_MAX_BATCH,
            max_text_bytes: DEFAULT_MAX_TEXT_BYTES,
            timeout: DEFAULT_EMBEDDING_TIMEOUT,
            max_body_bytes: DEFAULT_EMBEDDING_MAX_BODY_BYTES,
            retry: RetryPolicy {
                max_attempts: 3,
                initial_delay: Duration::from_millis(500),
                max_delay: Duration::from_secs(10),
                multiplier: 2.0,
                jitter: 0.5,
            },
        }
    }
}

/// Logs nowhere but `tracing` (debug), when the caller gives no sink.
struct TracingLogs;

#[async_trait]
impl LogSink for TracingLogs {
    async fn write(&self, _stream: LogStream, text: &str) {
        tracing::debug!(target: "arches_tools::embeddings", "{text}");
    }
}

/// An OpenAI-compatible embeddings provider on the `http` tool's request path.
pub struct OpenAiEmbeddings {
    http: Arc<HttpTool>,
    endpoint: Url,
    settings: EmbeddingSettings,
    logs: Arc<dyn LogSink>,
}

impl std::fmt::Debug for OpenAiEmbeddings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiEmbeddings")
            .field("endpoint", &self.endpoint.as_str())
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl OpenAiEmbeddings {
    /// A provider for `settings`, sending through `http` (whose allowed hosts must include
    /// the base URL's host; that is checked at each request, before anything is sent).
    ///
    /// # Errors
    /// [`EmbeddingError::Permanent`]: the base URL is not an absolute `http://` URL with a
    /// host, or carries a query, fragment or user info; an empty model; a zero dimension,
    /// batch bound, text bound, timeout or body bound; a retry policy without attempts.
    pub fn new(http: Arc<HttpTool>, settings: EmbeddingSettings) -> Result<Self, EmbeddingError> {
        let endpoint = endpoint(&settings.base_url)?;
        let refuse = |message: &str| Err(EmbeddingError::Permanent(message.to_owned()));
        if settings.model.trim().is_empty() {
            return refuse("the embedding model must be named");
        }
        if settings.dimension == 0 || settings.max_batch == 0 || settings.max_text_bytes == 0 {
            return refuse("dimension, max_batch and max_text_bytes must be positive");
        }
        if settings.timeout.is_zero() || settings.max_body_bytes == 0 {
            return refuse("timeout and max_body_bytes must be positive");
        }
        if settings.retry.max_attempts == 0 {
            return refuse("the retry policy needs at least one attempt");
        }
        Ok(Self {
            http,
            endpoint,
            settings,
            logs: Arc::new(TracingLogs),
        })
    }

    /// The provider writing a line per HTTP attempt to `logs` (default: `tracing` at debug
    /// level).
    pub fn with_logs(mut self, logs: Arc<dyn LogSink>) -> Self {
        self.logs = logs;
        self
    }

    /// `{base_url}/embeddings`.
    pub fn endpoint(&self) -> &Url {
        &self.endpoint
    }

    /// One POST of `texts`; the reply's status and body.
    async fn post(&self, texts: &[String]) -> Result<(u16, Vec<u8>), EmbeddingError> {
        let body = json!({
            "model": self.settings.model,
            "input": texts,
            "encoding_format": "float",
        });
        let encoded = serde_json::to_vec(&body).map_err(|error| {
            EmbeddingError::Permanent(format!("cannot encode the request: {error}"))
        })?;
        let mut headers = HeaderMap::new();
        if let Some(key) = &self.settings.api_key {
            let mut value =
                HeaderValue::from_str(&format!("Bearer {}", key.expose())).map_err(|_| {
                    EmbeddingError::Permanent(
                        "the API key holds characters a header cannot carry".to_owned(),
                    )
                })?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        let post = JsonPost {
            url: self.endpoint.clone(),
            headers,
            body: Bytes::from(encoded),
            retry: self.settings.retry.clone(),
            timeout: self.settings.timeout,
            max_body_bytes: self.settings.max_body_bytes,
        };
        let reply = self
            .http
            .post_json(post, self.logs.as_ref())
            .await
            .map_err(|error| self.transport_error(error))?;
        Ok((reply.status, reply.body))
    }

    fn transport_error(&self, error: ToolError) -> EmbeddingError {
        let message = self.mask(&error.message);
        if error.retryable {
            EmbeddingError::Unavailable(message)
        } else {
            EmbeddingError::Permanent(message)
        }
    }

    /// `text` with the API key masked.
    fn mask(&self, text: &str) -> String {
        match &self.settings.api_key {
            Some(key) if !key.expose().is_empty() => text.replace(key.expose(), "***"),
            _ => text.to_owned(),
        }
    }

    /// A permanent error about the answer, naming the endpoint.
    fn refused(&self, message: impl std::fmt::Display) -> EmbeddingError {
        EmbeddingError::Permanent(self.mask(&format!("POST {}: {message}", self.endpoint)))
    }

    /// The vectors of a 2xx `body` for `count` texts, in the texts' order, normalised; the
    /// model the server named; the prompt tokens it counted.
    fn parse(&self, body: &[u8], count: usize) -> Result<Embeddings, EmbeddingError> {
        let value: Value = serde_json::from_slice(body).map_err(|error| {
            self.refused(format!("the answer is not JSON: {error}: {}", quote(body)))
        })?;
        if let Some(message) = value.get("error").map(|_| error_message(&value)) {
            return Err(self.refused(format!(
                "the server answered an error: {}",
                message.unwrap_or_default()
            )));
        }
        let data = value
            .get("data")
            .and_then(Value::as_array)
            .ok_or_else(|| self.refused("the answer has no `data` array"))?;
        if data.len() != count {
            return Err(self.refused(format!(
                "the answer has {} embeddings for {count} texts",
                data.len()
            )));
        }
        let indexed = data
            .iter()
            .filter(|item| item.get("index").is_some())
            .count();
        if indexed != 0 && indexed != count {
            return Err(self.refused("some embeddings have an `index` and some do not"));
        }
        let mut vectors: Vec<Option<Vec<f32>>> = vec![None; count];
        for (position, item) in data.iter().enumerate() {
            let index = match item.get("index") {
                None => position,
                Some(index) => index
                    .as_u64()
                    .and_then(|index| usize::try_from(index).ok())
                    .filter(|index| *index < count)
                    .ok_or_else(|| {
                        self.refused(format!(
                            "data[{position}].index {index} is not an index of the {count} texts"
                        ))
                    })?,
            };
            if vectors[index].is_some() {
                return Err(self.refused(format!("index {index} is answered twice")));
            }
            let numbers = match item.get("embedding") {
                Some(Value::Array(numbers)) => numbers,
                Some(Value::String(_)) => {
                    return Err(self.refused(format!(
                        "data[{position}].embedding is a string (base64?), not the floats asked for"
                    )))
                }
                _ => return Err(self.refused(format!("data[{position}] has no `embedding` array"))),
            };
            if numbers.len() != self.settings.dimension {
                return Err(self.refused(format!(
                    "the embedding of text {index} has {} components, not the model's {}",
                    numbers.len(),
                    self.settings.dimension
                )));
            }
            let mut vector = Vec::with_capacity(numbers.len());
            for number in numbers {
                let x = number
                    .as_f64()
                    .map(|x| x as f32)
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| {
                        self.refused(format!(
                            "the embedding of text {index} holds {number}, not a finite number"
                        ))
                    })?;
                vector.push(x);
            }
            if l2_normalize(&mut vector) == 0.0 {
                return Err(self.refused(format!("the embedding of text {index} is all zeros")));
            }
            vectors[index] = Some(vector);
        }
        let vectors: Vec<Vec<f32>> = vectors.into_iter().flatten().collect();
        debug_assert_eq!(vectors.len(), count);
        Ok(Embeddings {
            vectors,
            model: value
                .get("model")
                .and_then(Value::as_str)
                .filter(|name| !name.is_empty())
                .map_or_else(|| self.settings.model.clone(), str::to_owned),
            dimension: self.settings.dimension,
            tokens: value
                .get("usage")
                .and_then(|usage| usage.get("prompt_tokens"))
                .and_then(Value::as_u64),
        })
    }
}

#[async_trait]
impl EmbeddingProvider for OpenAiEmbeddings {
    fn model(&self) -> &str {
        &self.settings.model
    }

    fn dimension(&self) -> usize {
        self.settings.dimension
    }

    fn max_batch(&self) -> usize {
        self.settings.max_batch
    }

    fn max_text_bytes(&self) -> usize {
        self.settings.max_text_bytes
    }

    /// One request of all `texts` (at most [`EmbeddingSettings::max_batch`]).
    async fn embed(&self, texts: &[String]) -> Result<Embeddings, EmbeddingError> {
        check_batch(texts, self.settings.max_batch, self.settings.max_text_bytes)?;
        let (status, body) = self.post(texts).await?;
        if !(200..300).contains(&status) {
            let explanation = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|value| error_message(&value))
                .unwrap_or_else(|| quote(&body));
            return Err(self.refused(format!("status {status}: {explanation}")));
        }
        self.parse(&body, texts.len())
    }
}

/// `{base_url}/embeddings`, checked as the chat adapter checks its base URL.
pub(crate) fn endpoint(base_url: &str) -> Result<Url, EmbeddingError> {
    let mut url = super::openai::endpoint(base_url)
        .map_err(|error| EmbeddingError::Permanent(error.message))?;
    let base = url
        .path()
        .strip_suffix("/chat/completions")
        .unwrap_or_default()
        .to_owned();
    url.set_path(&format!("{base}/embeddings"));
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_append_embeddings() {
        assert_eq!(
            endpoint("http://127.0.0.1:11434/v1").unwrap().as_str(),
            "http://127.0.0.1:11434/v1/embeddings"
        );
        assert_eq!(
            endpoint("http://tei:8080/").unwrap().as_str(),
            "http://tei:8080/embeddings"
        );
        assert_eq!(
            endpoint("https://api.openai.com/v1").unwrap().as_str(),
            "https://api.openai.com/v1/embeddings"
        );
        assert!(endpoint("ftp://api.openai.com/v1").is_err());
        assert!(endpoint("http://user:pw@host/v1").is_err());
    }

    #[test]
    fn settings_are_checked() {
        let http = Arc::new(HttpTool::new(crate::http::HttpPolicy::allowing(["x"])));
        let ok = EmbeddingSettings::new("http://x/v1", "m", 4);
        assert!(OpenAiEmbeddings::new(http.clone(), ok.clone()).is_ok());
        let bad = EmbeddingSettings {
            dimension: 0,
            ..ok.clone()
        };
        assert!(OpenAiEmbeddings::new(http.clone(), bad).is_err());
        let bad = EmbeddingSettings {
            model: " ".into(),
            ..ok
        };
        assert!(OpenAiEmbeddings::new(http, bad).is_err());
    }
}
