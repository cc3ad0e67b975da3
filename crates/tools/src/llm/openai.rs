//! The OpenAI-compatible adapter of the [`LlmProvider`] port: `POST {base_url}/chat/completions`
//! as OpenAI, vLLM, llama.cpp's server and Ollama (`/v1`) speak it, sent through the `http`
//! tool's request path ([`HttpTool`]): allowed hosts, a circuit breaker per `host:port`,
//! retries with backoff on connection errors, timeouts, 408, 429 and 5xx (honouring
//! `Retry-After`), and a bounded response body.
//!
//! What is sent: `model`, `messages`, `temperature` and `max_tokens` when set, `stream`
//! (with `stream_options.include_usage` when streaming), `logprobs` and `top_logprobs` when
//! asked, and `response_format`: `{type: "json_schema", json_schema: {name, schema, strict}}`
//! or `{type: "json_object"}`. With functions offered: `tools` (`[{type: "function",
//! function: {name, description, parameters}}]`) and `tool_choice` (`auto`, `none`,
//! `required` or `{type: "function", function: {name}}`); assistant messages carry their
//! `tool_calls` (`[{id, type: "function", function: {name, arguments}}]`, `content` null
//! when empty) and tool messages their `tool_call_id`.
//!
//! Differences between servers, and how they are handled:
//! - a server that refuses `json_schema` (400 or 422) is asked again, once, with
//!   `{type: "json_object"}`, and the provider remembers it for its later requests;
//!   servers that ignore the format answer free text, which the caller checks;
//! - `usage` and `logprobs` may be missing or `null`: they come back as `None`;
//! - a server asked to stream may answer one JSON document instead: both are read;
//! - tool calls come in `choices[0].message.tool_calls`, their `arguments` as JSON text (an
//!   object, as some servers send it, is written back as text); a call without an id gets
//!   `call_<index>`; one without a function name is a malformed answer. Streamed, they come
//!   as deltas under `delta.tool_calls[]` keyed by `index` (the id and name once, the
//!   arguments in pieces), assembled here; at most [`TOOL_CALLS_MAX`] calls per answer;
//! - a stream ends with `data: [DONE]`; one that ends without it but after a
//!   `finish_reason` is accepted, one that ends before either, or carries an `error`
//!   chunk, is a transient failure ([`LlmErrorKind::Unavailable`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arches_core::llm::{
    ChatMessage, ChatRequest, ChatResponse, ChatRole, LlmError, LlmErrorKind, LlmProvider,
    ResponseFormat, TokenLogprob, TokenUsage, ToolCall, ToolChoice,
};
use arches_core::ports::{LogSink, ToolError};
use arches_core::retry::RetryPolicy;
use async_trait::async_trait;
use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use reqwest::Url;
use serde_json::{json, Map, Value};

use super::ApiKey;
use crate::http::{HttpTool, JsonPost};

/// Bytes of an error body quoted in an error message.
const ERROR_QUOTE_BYTES: usize = 512;

/// Most tool calls read from one answer; an answer with more is malformed.
pub const TOOL_CALLS_MAX: usize = 64;

/// Settings of one [`OpenAiProvider`].
#[derive(Clone, Debug)]
pub struct OpenAiSettings {
    /// The API's base URL, up to and including its version (for example
    /// `http://127.0.0.1:11434/v1`); `/chat/completions` is appended.
    pub base_url: String,
    /// Sent as `Authorization: Bearer <key>` when set.
    pub api_key: Option<ApiKey>,
    /// Timeout of one HTTP attempt (connect, send, read the whole answer).
    pub timeout: Duration,
    /// Largest response body read, in bytes.
    pub max_body_bytes: u64,
    /// Retries of transient failures.
    pub retry: RetryPolicy,
}

/// An OpenAI-compatible chat-completions provider on the `http` tool's request path.
pub struct OpenAiProvider {
    http: Arc<HttpTool>,
    endpoint: Url,
    settings: OpenAiSettings,
    /// Set once the server refused a `json_schema` response format.
    schema_refused: AtomicBool,
}

impl std::fmt::Debug for OpenAiProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiProvider")
            .field("endpoint", &self.endpoint.as_str())
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl OpenAiProvider {
    /// A provider for `settings.base_url`, sending through `http`.
    ///
    /// # Errors
    /// The base URL is not an absolute `http://` URL with a host, or carries a query,
    /// fragment or user info (credentials go in the API key).
    pub fn new(http: Arc<HttpTool>, settings: OpenAiSettings) -> Result<Self, LlmError> {
        let endpoint = endpoint(&settings.base_url)?;
        Ok(Self {
            http,
            endpoint,
            settings,
            schema_refused: AtomicBool::new(false),
        })
    }

    /// `{base_url}/chat/completions`.
    pub fn endpoint(&self) -> &Url {
        &self.endpoint
    }

    /// The request's JSON body, with `format` as the response format.
    fn body(&self, request: &ChatRequest, format: &ResponseFormat) -> Value {
        let messages: Vec<Value> = request.messages.iter().map(message_json).collect();
        let mut body = Map::new();
        body.insert("model".into(), json!(request.model));
        body.insert("messages".into(), Value::Array(messages));
        if let Some(temperature) = request.temperature {
            body.insert("temperature".into(), json!(temperature));
        }
        if let Some(max_tokens) = request.max_tokens {
            body.insert("max_tokens".into(), json!(max_tokens));
        }
        body.insert("stream".into(), json!(request.stream));
        if request.stream {
            body.insert("stream_options".into(), json!({"include_usage": true}));
        }
        if request.logprobs {
            body.insert("logprobs".into(), json!(true));
            if let Some(top) = request.top_logprobs {
                body.insert("top_logprobs".into(), json!(top));
            }
        }
        if !request.tools.is_empty() {
            let tools: Vec<Value> = request
                .tools
                .iter()
                .map(|tool| {
                    json!({
                        "type": "function",
                        "function": {
                            "name": tool.name,
                            "description": tool.description,
                            "parameters": tool.parameters,
                        }
                    })
                })
                .collect();
            body.insert("tools".into(), Value::Array(tools));
            if let Some(choice) = &request.tool_choice {
                let choice = match choice {
                    ToolChoice::Auto => json!("auto"),
                    ToolChoice::None => json!("none"),
                    ToolChoice::Required => json!("required"),
                    ToolChoice::Function(name) => {
                        json!({"type": "function", "function": {"name": name}})
                    }
                };
                body.insert("tool_choice".into(), choice);
            }
        }
        match format {
            ResponseFormat::Text => {}
            ResponseFormat::JsonObject => {
                body.insert("response_format".into(), json!({"type": "json_object"}));
            }
            ResponseFormat::JsonSchema {
                name,
                schema,
                strict,
            } => {
                body.insert(
                    "response_format".into(),
                    json!({
                        "type": "json_schema",
                        "json_schema": {"name": name, "schema": schema, "strict": strict}
                    }),
                );
            }
        }
        Value::Object(body)
    }

    /// One POST of `body`; the reply's status and body.
    async fn post(&self, body: &Value, logs: &dyn LogSink) -> Result<(u16, Vec<u8>), LlmError> {
        let encoded = serde_json::to_vec(body).map_err(|error| {
            LlmError::new(
                LlmErrorKind::Refused,
                format!("cannot encode the request: {error}"),
            )
        })?;
        let mut headers = HeaderMap::new();
        if let Some(key) = &self.settings.api_key {
            let value =
                HeaderValue::from_str(&format!("Bearer {}", key.expose())).map_err(|_| {
                    LlmError::new(
                        LlmErrorKind::Refused,
                        "the API key holds characters a header cannot carry",
                    )
                })?;
            let mut value = value;
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
            .post_json(post, logs)
            .await
            .map_err(|error| self.transport_error(error))?;
        Ok((reply.status, reply.body))
    }

    fn transport_error(&self, error: ToolError) -> LlmError {
        let kind = if error.retryable {
            LlmErrorKind::Unavailable
        } else {
            LlmErrorKind::Refused
        };
        LlmError::new(kind, self.mask(&error.message))
    }

    /// `text` with the API key masked.
    fn mask(&self, text: &str) -> String {
        match &self.settings.api_key {
            Some(key) if !key.expose().is_empty() => text.replace(key.expose(), "***"),
            _ => text.to_owned(),
        }
    }

    /// The error of a refused request (a 4xx): its status and the server's explanation.
    fn refusal(&self, status: u16, body: &[u8]) -> LlmError {
        let explanation = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|value| error_message(&value))
            .unwrap_or_else(|| quote(body));
        LlmError::new(
            LlmErrorKind::Refused,
            self.mask(&format!(
                "POST {}: status {status}: {explanation}",
                self.endpoint
            )),
        )
    }

    fn malformed(&self, message: impl std::fmt::Display) -> LlmError {
        LlmError::new(
            LlmErrorKind::Malformed,
            self.mask(&format!("POST {}: {message}", self.endpoint)),
        )
    }
}

#[async_trait]
impl LlmProvider for OpenAiProvider {
    async fn chat(
        &self,
        request: &ChatRequest,
        logs: &dyn LogSink,
    ) -> Result<ChatResponse, LlmError> {
        let wants_schema = matches!(request.response_format, ResponseFormat::JsonSchema { .. });
        let mut format = if wants_schema && self.schema_refused.load(Ordering::Relaxed) {
            ResponseFormat::JsonObject
        } else {
            request.response_format.clone()
        };
        let (status, body) = loop {
            let (status, body) = self.post(&self.body(request, &format), logs).await?;
            if (200..300).contains(&status) {
                break (status, body);
            }
            if matches!(format, ResponseFormat::JsonSchema { .. }) && matches!(status, 400 | 422) {
                // Servers without schema-constrained decoding refuse the format: ask for
                // any JSON instead; the caller checks the schema.
                logs.write(
                    arches_core::records::LogStream::System,
                    &format!(
                        "the server refused response_format json_schema ({}); asking for json_object",
                        self.refusal(status, &body).message
                    ),
                )
                .await;
                self.schema_refused.store(true, Ordering::Relaxed);
                format = ResponseFormat::JsonObject;
                continue;
            }
            return Err(self.refusal(status, &body));
        };
        debug_assert!((200..300).contains(&status));
        let mut response = parse_answer(&body, request).map_err(|message| match message {
            Unread::Transient(message) => LlmError::new(
                LlmErrorKind::Unavailable,
                self.mask(&format!("POST {}: {message}", self.endpoint)),
            ),
            Unread::Malformed(message) => self.malformed(message),
        })?;
        response.format_used = format.kind();
        Ok(response)
    }
}

/// One message on the wire.
fn message_json(message: &ChatMessage) -> Value {
    let mut out = Map::new();
    out.insert("role".into(), json!(message.role.as_str()));
    if message.role == ChatRole::Assistant && !message.tool_calls.is_empty() {
        let calls: Vec<Value> = message
            .tool_calls
            .iter()
            .map(|call| {
                json!({
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                })
            })
            .collect();
        let content = if message.content.is_empty() {
            Value::Null
        } else {
            json!(message.content)
        };
        out.insert("content".into(), content);
        out.insert("tool_calls".into(), Value::Array(calls));
    } else {
        out.insert("content".into(), json!(message.content));
    }
    if let Some(id) = &message.tool_call_id {
        out.insert("tool_call_id".into(), json!(id));
    }
    Value::Object(out)
}

/// `{base_url}/chat/completions`, checked.
pub(crate) fn endpoint(base_url: &str) -> Result<Url, LlmError> {
    let refuse = |why: &str| {
        LlmError::new(
            LlmErrorKind::Refused,
            format!("base_url {base_url:?} {why}"),
        )
    };
    let url =
        Url::parse(base_url.trim()).map_err(|error| refuse(&format!("is not a URL: {error}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(refuse("must be an http:// or https:// URL"));
    }
    if url.host_str().is_none() {
        return Err(refuse("has no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(refuse("must not carry a query or fragment"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(refuse(
            "must not carry user info; give the key as the API key",
        ));
    }
    let path = url.path().trim_end_matches('/');
    let mut endpoint = url.clone();
    endpoint.set_path(&format!("{path}/chat/completions"));
    Ok(endpoint)
}

/// The server's explanation in an error document: `error.message`, `error` as text, or
/// `message`.
pub(super) fn error_message(value: &Value) -> Option<String> {
    match value.get("error") {
        Some(Value::Object(error)) => error
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .or_else(|| Some(Value::Object(error.clone()).to_string())),
        Some(Value::String(text)) => Some(text.clone()),
        _ => value
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_owned),
    }
}

/// The first bytes of a body, as text.
pub(super) fn quote(body: &[u8]) -> String {
    let end = body.len().min(ERROR_QUOTE_BYTES);
    let mut text = String::from_utf8_lossy(&body[..end]).trim().to_owned();
    if body.len() > ERROR_QUOTE_BYTES {
        text.push_str(" …");
    }
    if text.is_empty() {
        "(empty body)".to_owned()
    } else {
        text
    }
}

/// Why a 2xx body could not be read.
enum Unread {
    /// A stream that ended early (the connection dropped) or carried a server error:
    /// transient.
    Transient(String),
    /// Not a chat completion.
    Malformed(String),
}

/// Reads a 2xx body: one chat completion, or a stream of `data:` chunks.
fn parse_answer(body: &[u8], request: &ChatRequest) -> Result<ChatResponse, Unread> {
    let first = body.iter().find(|byte| !byte.is_ascii_whitespace());
    if first == Some(&b'{') {
        let value: Value = serde_json::from_slice(body).map_err(|error| {
            Unread::Malformed(format!("the answer is not JSON: {error}: {}", quote(body)))
        })?;
        return parse_completion(&value, request).map_err(Unread::Malformed);
    }
    parse_stream(body, request)
}

/// One non-streamed chat completion.
fn parse_completion(value: &Value, request: &ChatRequest) -> Result<ChatResponse, String> {
    if let Some(message) = error_message(value).filter(|_| value.get("error").is_some()) {
        return Err(format!("the server answered an error: {message}"));
    }
    let choice = value
        .get("choices")
        .and_then(Value::as_array)
        .and_then(|choices| choices.first())
        .ok_or_else(|| "the answer has no choices[0]".to_owned())?;
    let message = choice
        .get("message")
        .ok_or_else(|| "the answer has no choices[0].message".to_owned())?;
    let tool_calls = match message.get("tool_calls") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(calls)) => tool_calls_of(calls)?,
        Some(other) => {
            return Err(format!(
                "choices[0].message.tool_calls is not an array: {}",
                quote(other.to_string().as_bytes())
            ))
        }
    };
    let content = match message.get("content") {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Null) | None => match message.get("refusal").and_then(Value::as_str) {
            Some(refusal) => return Err(format!("the model refused: {refusal}")),
            None => String::new(),
        },
        Some(other) => return Err(format!("choices[0].message.content is not text: {other}")),
    };
    Ok(ChatResponse {
        tool_calls,
        content,
        model: model_of(value, request),
        usage: value.get("usage").and_then(usage_of),
        logprobs: choice
            .get("logprobs")
            .and_then(logprobs_of)
            .filter(|tokens| !tokens.is_empty()),
        finish_reason: choice
            .get("finish_reason")
            .and_then(Value::as_str)
            .map(str::to_owned),
        format_used: request.response_format.kind(),
    })
}

/// The tool calls of a non-streamed answer.
fn tool_calls_of(calls: &[Value]) -> Result<Vec<ToolCall>, String> {
    if calls.len() > TOOL_CALLS_MAX {
        return Err(format!(
            "the answer holds {} tool calls, more than {TOOL_CALLS_MAX}",
            calls.len()
        ));
    }
    calls
        .iter()
        .enumerate()
        .map(|(index, call)| {
            let where_ = format!("choices[0].message.tool_calls[{index}]");
            let function = call
                .get("function")
                .filter(|function| function.is_object())
                .ok_or_else(|| format!("{where_} has no function object"))?;
            let name = function
                .get("name")
                .and_then(Value::as_str)
                .filter(|name| !name.is_empty())
                .ok_or_else(|| format!("{where_}.function has no name"))?;
            Ok(ToolCall {
                id: call_id(call.get("id"), index),
                name: name.to_owned(),
                arguments: arguments_text(function.get("arguments")),
            })
        })
        .collect()
}

/// A call's id, or `call_<index>` when the server gave none.
fn call_id(id: Option<&Value>, index: usize) -> String {
    id.and_then(Value::as_str)
        .filter(|id| !id.is_empty())
        .map_or_else(|| format!("call_{index}"), str::to_owned)
}

/// A call's arguments as JSON text: the string the server sent, an object written as text,
/// `{}` when absent.
fn arguments_text(arguments: Option<&Value>) -> String {
    match arguments {
        None | Some(Value::Null) => "{}".to_owned(),
        Some(Value::String(text)) => text.clone(),
        Some(other) => other.to_string(),
    }
}

/// A tool call being assembled from stream deltas.
#[derive(Default)]
struct PartialCall {
    id: Option<String>,
    name: String,
    arguments: String,
}

/// Adds the `delta.tool_calls` of one chunk to `calls` (keyed by each delta's `index`, or
/// its position when the server sends none).
fn add_tool_call_deltas(deltas: &[Value], calls: &mut Vec<PartialCall>) -> Result<(), String> {
    for (position, delta) in deltas.iter().enumerate() {
        let index = match delta.get("index") {
            None | Some(Value::Null) => position,
            Some(index) => index
                .as_u64()
                .and_then(|index| usize::try_from(index).ok())
                .ok_or_else(|| format!("a streamed tool call has a bad index: {index}"))?,
        };
        if index >= TOOL_CALLS_MAX {
            return Err(format!(
                "a streamed tool call has index {index}; at most {TOOL_CALLS_MAX} calls are read"
            ));
        }
        if calls.len() <= index {
            calls.resize_with(index + 1, PartialCall::default);
        }
        let call = &mut calls[index];
        if let Some(id) = delta
            .get("id")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty())
        {
            call.id = Some(id.to_owned());
        }
        if let Some(function) = delta.get("function") {
            if let Some(name) = function.get("name").and_then(Value::as_str) {
                call.name.push_str(name);
            }
            match function.get("arguments") {
                None | Some(Value::Null) => {}
                Some(Value::String(piece)) => call.arguments.push_str(piece),
                Some(other) => call.arguments.push_str(&other.to_string()),
            }
        }
    }
    Ok(())
}

/// The assembled calls of a stream.
fn finish_tool_calls(calls: Vec<PartialCall>) -> Result<Vec<ToolCall>, String> {
    calls
        .into_iter()
        .enumerate()
        .map(|(index, call)| {
            if call.name.is_empty() {
                return Err(format!("streamed tool call {index} has no function name"));
            }
            Ok(ToolCall {
                id: call.id.unwrap_or_else(|| format!("call_{index}")),
                name: call.name,
                arguments: if call.arguments.trim().is_empty() {
                    "{}".to_owned()
                } else {
                    call.arguments
                },
            })
        })
        .collect()
}

/// A streamed completion: server-sent events whose `data:` are chunks, ending with
/// `data: [DONE]`.
fn parse_stream(body: &[u8], request: &ChatRequest) -> Result<ChatResponse, Unread> {
    let malformed = Unread::Malformed;
    let text =
        std::str::from_utf8(body).map_err(|_| malformed("the stream is not UTF-8".to_owned()))?;
    let mut content = String::new();
    let mut model = None;
    let mut usage = None;
    let mut logprobs: Option<Vec<TokenLogprob>> = None;
    let mut finish_reason = None;
    let mut calls: Vec<PartialCall> = Vec::new();
    let mut done = false;
    let mut chunks = 0usize;
    for data in sse_data(text) {
        if data.trim() == "[DONE]" {
            done = true;
            break;
        }
        let chunk: Value = serde_json::from_str(&data).map_err(|error| {
            malformed(format!(
                "a stream chunk is not JSON: {error}: {}",
                quote(data.as_bytes())
            ))
        })?;
        if let Some(message) = error_message(&chunk).filter(|_| chunk.get("error").is_some()) {
            return Err(Unread::Transient(format!(
                "the stream carried an error: {message}"
            )));
        }
        chunks += 1;
        if let Some(name) = chunk.get("model").and_then(Value::as_str) {
            model = Some(name.to_owned());
        }
        if let Some(found) = chunk.get("usage").and_then(usage_of) {
            usage = Some(found);
        }
        let Some(choice) = chunk
            .get("choices")
            .and_then(Value::as_array)
            .and_then(|choices| choices.first())
        else {
            continue;
        };
        if let Some(piece) = choice
            .get("delta")
            .and_then(|delta| delta.get("content"))
            .and_then(Value::as_str)
        {
            content.push_str(piece);
        }
        if let Some(deltas) = choice
            .get("delta")
            .and_then(|delta| delta.get("tool_calls"))
            .and_then(Value::as_array)
        {
            add_tool_call_deltas(deltas, &mut calls).map_err(malformed)?;
        }
        if let Some(tokens) = choice.get("logprobs").and_then(logprobs_of) {
            logprobs.get_or_insert_with(Vec::new).extend(tokens);
        }
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
            finish_reason = Some(reason.to_owned());
        }
    }
    if chunks == 0 && !done {
        return Err(malformed(format!(
            "the answer is neither a chat completion nor a stream: {}",
            quote(body)
        )));
    }
    if !done && finish_reason.is_none() {
        return Err(Unread::Transient(
            "the stream ended before `data: [DONE]` and without a finish_reason".to_owned(),
        ));
    }
    let tool_calls = finish_tool_calls(calls).map_err(malformed)?;
    Ok(ChatResponse {
        tool_calls,
        content,
        model: model.unwrap_or_else(|| request.model.clone()),
        usage,
        logprobs: logprobs.filter(|tokens| !tokens.is_empty()),
        finish_reason,
        format_used: request.response_format.kind(),
    })
}

/// The `data` of each server-sent event (WHATWG HTML, "Server-sent events", §9.2.6
/// "Interpreting an event stream"): `data:` lines of an event joined by `\n`, events ended
/// by a blank line or the end of the text; comments and other fields ignored.
fn sse_data(text: &str) -> Vec<String> {
    let mut events = Vec::new();
    let mut data: Option<String> = None;
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            if let Some(event) = data.take() {
                events.push(event);
            }
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        if field == "data" {
            match &mut data {
                Some(event) => {
                    event.push('\n');
                    event.push_str(value);
                }
                None => data = Some(value.to_owned()),
            }
        }
    }
    if let Some(event) = data {
        events.push(event);
    }
    events
}

fn model_of(value: &Value, request: &ChatRequest) -> String {
    value
        .get("model")
        .and_then(Value::as_str)
        .filter(|name| !name.is_empty())
        .map_or_else(|| request.model.clone(), str::to_owned)
}

/// `usage` when it has the token counts; `total_tokens` computed when missing.
fn usage_of(value: &Value) -> Option<TokenUsage> {
    let prompt_tokens = value.get("prompt_tokens")?.as_u64()?;
    let completion_tokens = value.get("completion_tokens")?.as_u64()?;
    let total_tokens = value
        .get("total_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(prompt_tokens.saturating_add(completion_tokens));
    Some(TokenUsage {
        prompt_tokens,
        completion_tokens,
        total_tokens,
    })
}

/// `logprobs.content[].{token, logprob}`; `None` when absent or not in that shape.
fn logprobs_of(value: &Value) -> Option<Vec<TokenLogprob>> {
    let items = value.get("content")?.as_array()?;
    items
        .iter()
        .map(|item| {
            Some(TokenLogprob {
                token: item
                    .get("token")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                logprob: item.get("logprob")?.as_f64()?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_append_chat_completions() {
        assert_eq!(
            endpoint("http://127.0.0.1:11434/v1").unwrap().as_str(),
            "http://127.0.0.1:11434/v1/chat/completions"
        );
        assert_eq!(
            endpoint("http://vllm:8000/v1/").unwrap().as_str(),
            "http://vllm:8000/v1/chat/completions"
        );
        assert_eq!(
            endpoint("https://api.openai.com/v1").unwrap().as_str(),
            "https://api.openai.com/v1/chat/completions"
        );
        assert!(endpoint("ftp://api.openai.com/v1").is_err());
        assert!(endpoint("http://user:pw@host/v1").is_err());
        assert!(endpoint("not a url").is_err());
    }

    #[test]
    fn event_streams_split_into_data() {
        let text =
            ": comment\r\ndata: {\"a\":1}\r\n\r\nevent: x\ndata: one\ndata: two\n\ndata: [DONE]";
        assert_eq!(sse_data(text), vec!["{\"a\":1}", "one\ntwo", "[DONE]"]);
    }

    #[test]
    fn usage_without_a_total_is_summed() {
        let usage = usage_of(&json!({"prompt_tokens": 3, "completion_tokens": 4})).unwrap();
        assert_eq!(usage.total_tokens, 7);
        assert_eq!(usage_of(&json!({"prompt_tokens": 3})), None);
    }
}
