//! The LLM provider port: one chat completion, asked in the shape of the OpenAI-compatible
//! chat API (the lingua franca of OpenAI, vLLM, llama.cpp's server and Ollama) but with no
//! wire format here. Adapters (the OpenAI-compatible HTTP adapter in `arches-tools`) do the
//! I/O; tools such as `llm` and, later, `agent` use only this trait.
//!
//! What a provider may not give: token usage and token log-probabilities are optional in
//! every server's answer, so they are `Option`s here, and callers treat their absence as
//! "unknown", never as zero.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ports::LogSink;

/// Who speaks a chat message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChatRole {
    /// Instructions that frame the conversation.
    System,
    /// The user's turn: the prompt.
    User,
    /// The model's turn: an earlier answer (for a repair request, for example).
    Assistant,
}

impl ChatRole {
    /// The role's name on the wire: `system`, `user` or `assistant`.
    pub fn as_str(self) -> &'static str {
        match self {
            ChatRole::System => "system",
            ChatRole::User => "user",
            ChatRole::Assistant => "assistant",
        }
    }
}

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Who speaks.
    pub role: ChatRole,
    /// What is said, as plain text.
    pub content: String,
}

impl ChatMessage {
    /// A message of `role` saying `content`.
    pub fn new(role: ChatRole, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

/// The form the answer must take.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum ResponseFormat {
    /// Free text.
    #[default]
    Text,
    /// Any JSON value (the server is asked for JSON without a schema).
    JsonObject,
    /// JSON satisfying a JSON Schema. A provider whose server refuses schemas may fall back to
    /// [`ResponseFormat::JsonObject`] and says so in [`ChatResponse::format_used`]; callers
    /// check the answer against the schema themselves either way.
    JsonSchema {
        /// A name for the schema (letters, digits, `_` and `-`; some servers require one).
        name: String,
        /// The JSON Schema the answer must satisfy.
        schema: Value,
        /// Whether the server should enforce the schema strictly where it can.
        strict: bool,
    },
}

impl ResponseFormat {
    /// The format's kind: `text`, `json_object` or `json_schema`.
    pub fn kind(&self) -> &'static str {
        match self {
            ResponseFormat::Text => "text",
            ResponseFormat::JsonObject => "json_object",
            ResponseFormat::JsonSchema { .. } => "json_schema",
        }
    }
}

/// One chat completion asked of a provider.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatRequest {
    /// The model's name as the provider knows it (for example `llama3.2:1b`, `gpt-4o-mini`).
    pub model: String,
    /// The conversation so far, oldest first; it ends with the turn to answer.
    pub messages: Vec<ChatMessage>,
    /// Sampling temperature (0 to 2; `None`: the server's default).
    pub temperature: Option<f64>,
    /// Most tokens the answer may have (`None`: the server's default).
    pub max_tokens: Option<u32>,
    /// The form the answer must take.
    pub response_format: ResponseFormat,
    /// Ask for the log-probability of each answer token. Servers that cannot give them
    /// answer without them ([`ChatResponse::logprobs`] is `None`).
    pub logprobs: bool,
    /// With `logprobs`, how many alternatives per token to ask for (0 to 20).
    pub top_logprobs: Option<u8>,
    /// Ask the server to stream the answer; the provider collects it, so the response is the
    /// same either way.
    pub stream: bool,
}

impl ChatRequest {
    /// A request of `model` for `messages`, with every option at the server's default, free
    /// text, no log-probabilities and no streaming.
    pub fn new(model: impl Into<String>, messages: Vec<ChatMessage>) -> Self {
        Self {
            model: model.into(),
            messages,
            temperature: None,
            max_tokens: None,
            response_format: ResponseFormat::Text,
            logprobs: false,
            top_logprobs: None,
            stream: false,
        }
    }
}

/// Tokens counted by the provider for one or more completions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUsage {
    /// Tokens of the prompt (every message sent).
    pub prompt_tokens: u64,
    /// Tokens of the answer.
    pub completion_tokens: u64,
    /// Their sum, as the server reported it (or computed when it did not).
    pub total_tokens: u64,
}

impl TokenUsage {
    /// The sum of two counts (saturating).
    pub fn plus(self, other: TokenUsage) -> TokenUsage {
        TokenUsage {
            prompt_tokens: self.prompt_tokens.saturating_add(other.prompt_tokens),
            completion_tokens: self
                .completion_tokens
                .saturating_add(other.completion_tokens),
            total_tokens: self.total_tokens.saturating_add(other.total_tokens),
        }
    }
}

/// One answer token and its log-probability (natural logarithm, so at most 0).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    /// The token's text.
    pub token: String,
    /// `ln p(token)`, at most 0.
    pub logprob: f64,
}

/// The answer of one chat completion.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatResponse {
    /// The answer's text (the first choice's message content); empty when the model said
    /// nothing.
    pub content: String,
    /// The model as the server names it (may differ from the one asked for, for example a
    /// dated version); the requested name when the server does not say.
    pub model: String,
    /// Tokens counted, when the server reported them.
    pub usage: Option<TokenUsage>,
    /// The log-probability of each answer token, in order, when asked for and given.
    pub logprobs: Option<Vec<TokenLogprob>>,
    /// Why the model stopped (`stop`, `length`, …), when the server said.
    pub finish_reason: Option<String>,
    /// The response format the server was finally asked for: the request's, or
    /// `json_object` when the server refused a schema and the provider fell back.
    pub format_used: &'static str,
}

/// Why a completion failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LlmErrorKind {
    /// The provider could not be reached or answered with a transient failure (connection
    /// error, timeout, 408, 429, 5xx after retries, an open circuit breaker): a later try may
    /// succeed.
    Unavailable,
    /// The provider refused the request (a 4xx other than 408 and 429: a bad request, an
    /// unknown model, a wrong API key) or it is not allowed (host not allowed).
    Refused,
    /// The provider answered 2xx with something that is not a chat completion.
    Malformed,
}

/// A failed completion. Messages never hold the API key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct LlmError {
    /// The kind of failure.
    pub kind: LlmErrorKind,
    /// What went wrong, naming the provider's URL (without credentials) and the cause.
    pub message: String,
}

impl LlmError {
    /// An error of `kind` saying `message`.
    pub fn new(kind: LlmErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// Whether a later try may succeed (only [`LlmErrorKind::Unavailable`]).
    pub fn retryable(&self) -> bool {
        self.kind == LlmErrorKind::Unavailable
    }
}

/// The LLM provider port: chat completions.
///
/// Retries, timeouts and circuit breaking of transient failures are the adapter's; a
/// returned [`LlmErrorKind::Unavailable`] error means they are spent.
#[async_trait]
pub trait LlmProvider: Send + Sync {
    /// Completes `request`, writing a line per HTTP attempt (or the adapter's equivalent) to
    /// `logs`.
    ///
    /// # Errors
    /// [`LlmError`]: the provider unavailable, refusing, or answering malformed responses.
    async fn chat(
        &self,
        request: &ChatRequest,
        logs: &dyn LogSink,
    ) -> Result<ChatResponse, LlmError>;
}
