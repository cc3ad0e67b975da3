//! The LLM provider port: one chat completion, asked in the shape of the OpenAI-compatible
//! chat API (the lingua franca of OpenAI, vLLM, llama.cpp's server and Ollama) but with no
//! wire format here. Adapters (the OpenAI-compatible HTTP adapter in `arches-tools`) do the
//! I/O; tools such as `llm` and `agent` use only this trait.
//!
//! Function calling: a request may offer the model [`ToolDefinition`]s (a name, a
//! description and a JSON Schema of the arguments) and a [`ToolChoice`]; the model may answer
//! with [`ToolCall`]s instead of (or besides) text; the caller answers each call with a
//! [`ChatRole::Tool`] message naming the call's id, and asks again.
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
    /// The model's turn: an earlier answer (for a repair request, for example), possibly
    /// with the tool calls it asked for.
    Assistant,
    /// The result of one tool call, answering the call named by
    /// [`ChatMessage::tool_call_id`].
    Tool,
}

impl ChatRole {
    /// The role's name on the wire: `system`, `user`, `assistant` or `tool`.
    pub fn as_str(self) -> &'static str {
        match self {
            ChatRole::System => "system",
            ChatRole::User => "user",
            ChatRole::Assistant => "assistant",
            ChatRole::Tool => "tool",
        }
    }
}

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Who speaks.
    pub role: ChatRole,
    /// What is said, as plain text (may be empty for an assistant message that only calls
    /// tools).
    pub content: String,
    /// For an assistant message: the tool calls the model asked for, in order; empty
    /// otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// For a [`ChatRole::Tool`] message: the id of the call it answers; `None` otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A message of `role` saying `content`.
    pub fn new(role: ChatRole, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }

    /// The model's turn as it was answered: `content` and the `tool_calls` it asked for
    /// (sent back as the conversation goes on).
    pub fn assistant(content: impl Into<String>, tool_calls: Vec<ToolCall>) -> Self {
        Self {
            role: ChatRole::Assistant,
            content: content.into(),
            tool_calls,
            tool_call_id: None,
        }
    }

    /// The result of the tool call `call_id`, as text (usually JSON).
    pub fn tool_result(call_id: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: ChatRole::Tool,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: Some(call_id.into()),
        }
    }
}

/// A function the model may call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolDefinition {
    /// The function's name as the model sees it (OpenAI requires `^[a-zA-Z0-9_-]{1,64}$`).
    pub name: String,
    /// What the function does, for the model to choose it.
    pub description: String,
    /// JSON Schema of the arguments (an object schema).
    pub parameters: Value,
}

/// Whether and which functions the model may call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model decides (the default of servers when functions are offered).
    Auto,
    /// The model must not call functions: it answers with text.
    None,
    /// The model must call at least one function.
    Required,
    /// The model must call this function.
    Function(String),
}

/// One call of a function, as the model asked for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The call's id, which the [`ChatRole::Tool`] message answering it names.
    pub id: String,
    /// The function's name (one of the request's [`ToolDefinition`]s, if the model obeyed).
    pub name: String,
    /// The arguments as the model wrote them: JSON text, which may be malformed; callers
    /// parse it and tell the model when it is not JSON.
    pub arguments: String,
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
    /// Functions the model may call; none when empty (then nothing about tools is sent).
    pub tools: Vec<ToolDefinition>,
    /// Whether and which functions the model may call; `None`: the server's default (only
    /// sent with `tools`).
    pub tool_choice: Option<ToolChoice>,
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
            tools: Vec::new(),
            tool_choice: None,
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
    /// Why the model stopped (`stop`, `length`, `tool_calls`, …), when the server said.
    pub finish_reason: Option<String>,
    /// The tool calls the model asked for, in order (streamed calls assembled); empty when
    /// it answered with text only.
    pub tool_calls: Vec<ToolCall>,
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
