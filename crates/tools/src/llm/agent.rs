//! The `agent` tool: an OpenAI-compatible chat model that calls other Arches tools (function
//! calling) until it answers, within a step budget and a token budget.
//!
//! What one attempt does:
//! 1. checks the inputs and the `llm` tool's policy (model, base URL and its allowed host, as
//!    the `llm` tool does), and looks every name of `tools` up in the engine's registry
//!    ([`ToolContext::tools`]: built-in tools, then the org's registered tools). A name no
//!    registry knows, `agent` and `approval` are refused before anything is sent. Each tool
//!    is offered to the model as a function: its name with characters other than
//!    `[A-Za-z0-9_-]` replaced by `_` (`geocode@2` is `geocode_2`), its description, and its
//!    input schema as the parameters;
//! 2. loops: asks the model (one **step**), and for each tool call of its answer (at most
//!    [`CALLS_PER_STEP_MAX`]) parses the arguments, checks them against the tool's input
//!    schema, and executes the tool with the attempt's context (same org, run, artifacts and
//!    log; a working directory of its own under the attempt's). Whatever goes wrong with a
//!    call — a function that is not offered, arguments that are not JSON or break the
//!    schema, the tool's own failure — goes back to the model as the call's result
//!    (`{"error": …}`), so it can correct itself; it never fails the task. Results are JSON
//!    text cut at [`TOOL_RESULT_BYTES_MAX`]. The loop ends when the model answers without
//!    calling tools;
//! 3. with an `output_schema`, checks the answer as the `llm` tool does (JSON, a Markdown
//!    fence removed) and asks for one repair (tools still offered, `tool_choice: none`; the
//!    repair may exceed the step budget), then fails permanently naming the violations;
//! 4. computes the confidence of the final answer as the `llm` tool does
//!    ([`super::confidence`]): the answer's token log-probabilities when the server gave them,
//!    else agreement among `samples` answers to the final request (`tool_choice: none`; the
//!    modal answer is returned; drawn only while the token budget lasts), else none.
//!
//! Budgets: `max_steps` model requests in the loop (default [`DEFAULT_MAX_STEPS`], at most
//! [`STEPS_MAX`]) and `max_tokens` tokens over every request of the attempt (default
//! [`DEFAULT_MAX_TOKENS`]; tokens as the server reports them, estimated at one per
//! [`BYTES_PER_TOKEN_ESTIMATE`] bytes of text sent and received when it does not). Both are
//! checked before each step: a model that still calls tools when one is spent fails the
//! attempt permanently with an error naming the budget (the step that crosses the token
//! budget is the last one; its answer, if final, is accepted).
//!
//! The transcript: every step is written to the task's log as it happens (`agent: ` and one
//! JSON object: the model's message, its tool calls and usage; each call's arguments and
//! result), and returned in the outputs as `transcript`, the same objects with texts cut at
//! [`TRANSCRIPT_TEXT_BYTES_MAX`] and at most [`TRANSCRIPT_BYTES_MAX`] in all (later entries
//! are then counted in a final `{"type": "truncated", "dropped": n}`).
//!
//! Outputs: `answer` (JSON with an `output_schema`, else text), `confidence` (in [0, 1] or
//! `null`), `confidence_method` (`logprobs`, `agreement` or `none`), `samples`, `usage`
//! (summed as the server reported it, `null` when a response lacked it), `tokens_used` (what
//! the budget counted), `steps`, `tool_calls`, `requests`, `model`, `transcript`, `prompt`,
//! `repaired`, and `cost_usd` when the policy prices the model and usage is known.
//!
//! Failures: the provider unavailable is retryable, as is a tool that cannot be looked up for
//! a transient reason; inputs, policy, an unknown tool, a spent budget, a malformed answer
//! (for example a tool call without a function name) and an answer that stays invalid are
//! permanent.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use arches_core::llm::{
    ChatMessage, ChatRequest, ChatResponse, ChatRole, LlmProvider, ResponseFormat, ToolCall,
    ToolChoice, ToolDefinition,
};
use arches_core::pipeline::model::optional_duration;
use arches_core::pipeline::validate::schema_violations;
use arches_core::ports::{LogSink, Tool, ToolContext, ToolError};
use arches_core::records::LogStream;
use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::openai::OpenAiProvider;
use super::{
    by_agreement, tool_error, usage_json, Checker, LlmTool, DEFAULT_SAMPLES, SAMPLES_MAX,
    SAMPLE_TEMPERATURE,
};
use crate::common::parse_inputs;

/// Model requests of the loop when the task gives no `max_steps`.
pub const DEFAULT_MAX_STEPS: u32 = 10;
/// The largest `max_steps` a task may give.
pub const STEPS_MAX: u32 = 50;
/// The token budget when the task gives no `max_tokens`.
pub const DEFAULT_MAX_TOKENS: u64 = 50_000;
/// The largest `max_tokens` a task may give.
pub const TOKENS_MAX: u64 = 10_000_000;
/// The most tools one agent may be given.
pub const AGENT_TOOLS_MAX: usize = 32;
/// The most tool calls executed per step; further calls of the same answer are refused to
/// the model.
pub const CALLS_PER_STEP_MAX: usize = 16;
/// The longest tool result fed back to the model, in bytes of JSON text (cut beyond).
pub const TOOL_RESULT_BYTES_MAX: usize = 16 * 1024;
/// The longest text (message, arguments, result) in one transcript entry, in bytes.
pub const TRANSCRIPT_TEXT_BYTES_MAX: usize = 4 * 1024;
/// The largest transcript returned in the outputs, in bytes of JSON.
pub const TRANSCRIPT_BYTES_MAX: usize = 256 * 1024;
/// Bytes of text counted as one token when the server reports no usage (a common rule of
/// thumb for English text with BPE tokenizers; OpenAI's tokenizer guide says about 4).
pub const BYTES_PER_TOKEN_ESTIMATE: u64 = 4;
/// Tools an agent can never call: itself (unbounded recursion) and the human gate (an
/// attempt cannot wait for a reviewer).
pub const DENIED_TOOLS: [&str; 2] = ["agent", "approval"];
/// The longest function name servers accept.
const FUNCTION_NAME_BYTES_MAX: usize = 64;

/// The `agent` tool. Cheap to share; it asks through the `llm` tool's policy and `http` tool.
pub struct AgentTool {
    llm: Arc<LlmTool>,
}

impl std::fmt::Debug for AgentTool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentTool").field("llm", &self.llm).finish()
    }
}

impl AgentTool {
    /// The agent on `llm`'s policy (provider, default model, key, overrides, prices) and
    /// `http` tool (allowed hosts, breakers, retries).
    pub fn new(llm: Arc<LlmTool>) -> Self {
        Self { llm }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentInputs {
    prompt: String,
    #[serde(default)]
    system: Option<String>,
    tools: Vec<String>,
    #[serde(default)]
    max_steps: Option<u32>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    output_schema: Option<Value>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    base_url: Option<String>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    samples: Option<u32>,
    #[serde(default, with = "optional_duration")]
    timeout: Option<Duration>,
    #[serde(default)]
    stream: bool,
}

/// A tool the model may call.
struct Callable {
    /// The tool's name in Arches (`echo`, `geocode@2`).
    name: String,
    tool: Arc<dyn Tool>,
    inputs: jsonschema::Validator,
}

/// The function name of a tool: `[A-Za-z0-9_-]` kept, anything else `_`, at most 64 bytes.
fn function_name(tool: &str) -> String {
    tool.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(FUNCTION_NAME_BYTES_MAX)
        .collect()
}

/// `text` cut at `max_bytes` (on a character boundary), saying how long it was.
fn bounded(text: &str, max_bytes: usize) -> String {
    if text.len() <= max_bytes {
        return text.to_owned();
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… (cut: {} bytes in all)", &text[..end], text.len())
}

/// The bounded transcript of an attempt.
#[derive(Default)]
struct Transcript {
    entries: Vec<Value>,
    bytes: usize,
    dropped: usize,
}

impl Transcript {
    /// Writes `entry` to the log and keeps it while the bound allows.
    async fn record(&mut self, entry: Value, logs: &dyn LogSink) {
        let text = entry.to_string();
        logs.write(LogStream::System, &format!("agent: {text}"))
            .await;
        if self.dropped == 0 && self.bytes + text.len() <= TRANSCRIPT_BYTES_MAX {
            self.bytes += text.len();
            self.entries.push(entry);
        } else {
            self.dropped += 1;
        }
    }

    fn finish(mut self) -> Vec<Value> {
        if self.dropped > 0 {
            self.entries
                .push(json!({"type": "truncated", "dropped": self.dropped}));
        }
        self.entries
    }
}

/// Tokens of an attempt: as reported, and as the budget counts them.
#[derive(Default)]
struct Budget {
    requests: u32,
    reported: Option<arches_core::llm::TokenUsage>,
    unreported: bool,
    used: u64,
}

impl Budget {
    /// Counts one response to `request`.
    fn add(&mut self, request: &ChatRequest, response: &ChatResponse) {
        self.requests += 1;
        match response.usage {
            Some(usage) => {
                self.reported = Some(self.reported.unwrap_or_default().plus(usage));
                self.used = self.used.saturating_add(usage.total_tokens);
            }
            None => {
                self.unreported = true;
                self.used = self.used.saturating_add(estimate(request, response));
            }
        }
    }

    /// The reported usage, when every response reported it.
    fn usage(&self) -> Option<arches_core::llm::TokenUsage> {
        self.reported.filter(|_| !self.unreported)
    }
}

/// Tokens of a request and its answer estimated from their bytes.
fn estimate(request: &ChatRequest, response: &ChatResponse) -> u64 {
    let sent: usize = request
        .messages
        .iter()
        .map(|message| {
            message.content.len()
                + message
                    .tool_calls
                    .iter()
                    .map(|call| call.name.len() + call.arguments.len())
                    .sum::<usize>()
        })
        .sum::<usize>()
        + request
            .tools
            .iter()
            .map(|tool| {
                tool.name.len() + tool.description.len() + tool.parameters.to_string().len()
            })
            .sum::<usize>();
    let received = response.content.len()
        + response
            .tool_calls
            .iter()
            .map(|call| call.name.len() + call.arguments.len())
            .sum::<usize>();
    ((sent + received) as u64).div_ceil(BYTES_PER_TOKEN_ESTIMATE)
}

/// A log sink that puts a prefix before each line of a called tool.
struct PrefixedLogs {
    inner: Arc<dyn LogSink>,
    prefix: String,
}

#[async_trait]
impl LogSink for PrefixedLogs {
    async fn write(&self, stream: LogStream, text: &str) {
        self.inner
            .write(stream, &format!("{}{text}", self.prefix))
            .await;
    }
}

/// The result of one tool call, as the model sees it.
struct CallResult {
    ok: bool,
    /// JSON text fed back to the model.
    text: String,
}

impl CallResult {
    fn error(message: impl Into<String>) -> Self {
        Self {
            ok: false,
            text: json!({ "error": message.into() }).to_string(),
        }
    }
}

impl AgentTool {
    /// Looks the task's tools up: the callables by function name, and their definitions.
    async fn callables(
        &self,
        context: &ToolContext,
        names: &[String],
    ) -> Result<(BTreeMap<String, Callable>, Vec<ToolDefinition>), ToolError> {
        if names.len() > AGENT_TOOLS_MAX {
            return Err(ToolError::permanent(format!(
                "tools lists {} tools; an agent may have at most {AGENT_TOOLS_MAX}",
                names.len()
            )));
        }
        let mut callables = BTreeMap::new();
        let mut definitions = Vec::new();
        let mut seen = BTreeSet::new();
        for (index, name) in names.iter().enumerate() {
            let name = name.trim();
            if !seen.insert(name.to_owned()) {
                continue;
            }
            let base = name.split('@').next().unwrap_or(name);
            if DENIED_TOOLS.contains(&base) {
                return Err(ToolError::permanent(format!(
                    "tools/{index}: an agent cannot call the `{base}` tool"
                )));
            }
            let tool = context
                .tools
                .resolve(context.org_id, name)
                .await
                .map_err(|error| ToolError {
                    message: format!("tools/{index}: cannot load tool `{name}`: {}", error.message),
                    retryable: error.retryable,
                })?
                .ok_or_else(|| {
                    ToolError::permanent(format!(
                        "tools/{index}: unknown tool `{name}` (neither built in nor registered by the org)"
                    ))
                })?;
            let schema = tool.input_schema();
            let inputs = jsonschema::validator_for(&schema).map_err(|error| {
                ToolError::permanent(format!(
                    "tools/{index}: the input schema of tool `{name}` does not compile: {error}"
                ))
            })?;
            let function = function_name(name);
            if callables.contains_key(&function) {
                return Err(ToolError::permanent(format!(
                    "tools/{index}: tool `{name}` has the same function name `{function}` as another tool"
                )));
            }
            definitions.push(ToolDefinition {
                name: function.clone(),
                description: tool.description().to_owned(),
                parameters: schema,
            });
            callables.insert(
                function,
                Callable {
                    name: name.to_owned(),
                    tool,
                    inputs,
                },
            );
        }
        Ok((callables, definitions))
    }

    /// Executes one tool call of the model (`number`: 1-based over the attempt).
    async fn call(
        &self,
        callables: &BTreeMap<String, Callable>,
        call: &ToolCall,
        context: &ToolContext,
        number: u32,
    ) -> CallResult {
        let Some(callable) = callables.get(&call.name) else {
            let offered: Vec<&str> = callables.keys().map(String::as_str).collect();
            return CallResult::error(format!(
                "tool `{}` is not available to this agent; the tools you may call are: {}",
                call.name,
                if offered.is_empty() {
                    "none".to_owned()
                } else {
                    offered.join(", ")
                }
            ));
        };
        let arguments: Value = match serde_json::from_str(&call.arguments) {
            Ok(value) => value,
            Err(error) => {
                return CallResult::error(format!(
                    "the arguments are not valid JSON ({error}); call `{}` again with a JSON \
                     object matching its parameters",
                    call.name
                ))
            }
        };
        if !arguments.is_object() {
            return CallResult::error(format!(
                "the arguments must be a JSON object matching the parameters of `{}`",
                call.name
            ));
        }
        if let Err(problems) = schema_violations(&callable.inputs, &arguments, "/arguments") {
            return CallResult::error(format!(
                "the arguments break the parameters' schema of `{}`: {problems}",
                call.name
            ));
        }
        let mut work_dir = context.work_dir.clone();
        if callable.tool.needs_work_dir() {
            work_dir = context.work_dir.join(format!("call-{number}"));
            if let Err(error) = tokio::fs::create_dir_all(&work_dir).await {
                return CallResult::error(format!(
                    "cannot create the working directory of the call: {error}"
                ));
            }
        }
        let child = ToolContext {
            work_dir,
            logs: Arc::new(PrefixedLogs {
                inner: context.logs.clone(),
                prefix: format!("agent call {number} {}: ", callable.name),
            }),
            ..context.clone()
        };
        match callable.tool.execute(child, arguments).await {
            Ok(outputs) => CallResult {
                ok: true,
                text: bounded(&outputs.to_string(), TOOL_RESULT_BYTES_MAX),
            },
            Err(error) => CallResult::error(bounded(&error.message, TOOL_RESULT_BYTES_MAX)),
        }
    }

    /// Answers of `samples` further requests like `request` without tool calls, for the
    /// agreement vote.
    async fn more_samples(
        &self,
        provider: &OpenAiProvider,
        request: &ChatRequest,
        samples: u32,
        checker: &Checker,
        logs: &dyn LogSink,
        budget: &mut Budget,
    ) -> Result<Vec<Option<Value>>, ToolError> {
        let mut request = request.clone();
        request.logprobs = false;
        request.top_logprobs = None;
        request.tool_choice = Some(ToolChoice::None);
        if request.temperature == Some(0.0) {
            request.temperature = Some(SAMPLE_TEMPERATURE);
        }
        let calls = (0..samples).map(|_| provider.chat(&request, logs));
        let results = futures::future::join_all(calls).await;
        let mut answers = Vec::with_capacity(results.len());
        for result in results {
            let response = result.map_err(tool_error)?;
            budget.add(&request, &response);
            answers.push(if response.tool_calls.is_empty() {
                checker.check(&response.content).ok()
            } else {
                None
            });
        }
        Ok(answers)
    }
}

#[async_trait]
impl Tool for AgentTool {
    fn name(&self) -> &str {
        "agent"
    }

    fn description(&self) -> &str {
        "an OpenAI-compatible chat model that calls the listed tools until it answers, within a step and token budget"
    }

    fn input_schema(&self) -> Value {
        json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["prompt", "tools"],
            "properties": {
                "prompt": {"type": "string", "minLength": 1, "description": "the task for the agent; templates are rendered first"},
                "system": {"type": "string", "description": "the system message"},
                "tools": {
                    "type": "array",
                    "items": {"type": "string", "minLength": 1},
                    "uniqueItems": true,
                    "maxItems": AGENT_TOOLS_MAX,
                    "description": "the tools the agent may call (built-in or the org's, as name or name@version); every other tool is denied, and never agent or approval"
                },
                "max_steps": {"type": "integer", "minimum": 1, "maximum": STEPS_MAX, "default": DEFAULT_MAX_STEPS, "description": "model requests before the agent must have answered"},
                "max_tokens": {"type": "integer", "minimum": 1, "maximum": TOKENS_MAX, "default": DEFAULT_MAX_TOKENS, "description": "tokens over every request of the attempt"},
                "output_schema": {"type": "object", "description": "a JSON Schema the final answer must satisfy; without it the answer is text"},
                "model": {"type": "string", "minLength": 1, "description": "the model; default the installation's"},
                "base_url": {"type": "string", "minLength": 1, "description": "an OpenAI-compatible API; default the installation's"},
                "temperature": {"type": "number", "minimum": 0, "maximum": 2},
                "samples": {"type": "integer", "minimum": 1, "maximum": SAMPLES_MAX, "default": DEFAULT_SAMPLES, "description": "answers compared for the confidence when the server gives no log-probabilities"},
                "timeout": {"type": ["string", "number"], "description": "per request, e.g. \"30s\", or seconds"},
                "stream": {"type": "boolean", "default": false, "description": "have the server stream its answers"}
            }
        })
    }

    async fn execute(&self, context: ToolContext, inputs: Value) -> Result<Value, ToolError> {
        let inputs: AgentInputs = parse_inputs("agent", inputs)?;
        let logs = context.logs.as_ref();

        // 1. Inputs, policy and tools; nothing is sent before all are known to be fine.
        if inputs.prompt.trim().is_empty() {
            return Err(ToolError::permanent("prompt must not be empty"));
        }
        let max_steps = inputs.max_steps.unwrap_or(DEFAULT_MAX_STEPS);
        if !(1..=STEPS_MAX).contains(&max_steps) {
            return Err(ToolError::permanent(format!(
                "max_steps must be between 1 and {STEPS_MAX}, got {max_steps}"
            )));
        }
        let max_tokens = inputs.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
        if !(1..=TOKENS_MAX).contains(&max_tokens) {
            return Err(ToolError::permanent(format!(
                "max_tokens must be between 1 and {TOKENS_MAX}, got {max_tokens}"
            )));
        }
        let samples = inputs.samples.unwrap_or(DEFAULT_SAMPLES);
        if !(1..=SAMPLES_MAX).contains(&samples) {
            return Err(ToolError::permanent(format!(
                "samples must be between 1 and {SAMPLES_MAX}, got {samples}"
            )));
        }
        if let Some(temperature) = inputs.temperature {
            if !(0.0..=2.0).contains(&temperature) {
                return Err(ToolError::permanent(format!(
                    "temperature must be between 0 and 2, got {temperature}"
                )));
            }
        }
        let checker = Checker {
            validator: match &inputs.output_schema {
                None => None,
                Some(schema) => Some(jsonschema::validator_for(schema).map_err(|error| {
                    ToolError::permanent(format!(
                        "output_schema is not a valid JSON Schema: {error}"
                    ))
                })?),
            },
        };
        let (model, provider, _source) = self
            .llm
            .provider_for(
                context.org_id,
                inputs.model.as_ref(),
                inputs.base_url.as_ref(),
                inputs.timeout,
            )
            .await?;
        let (callables, definitions) = self.callables(&context, &inputs.tools).await?;

        // 2. The loop.
        let mut messages = Vec::new();
        let mut system = inputs.system.clone().unwrap_or_default();
        if let Some(schema) = &inputs.output_schema {
            if !system.is_empty() {
                system.push_str("\n\n");
            }
            system.push_str(&format!(
                "When you have the final answer, reply with a single JSON value, and nothing \
                 else, that satisfies this JSON Schema:\n{schema}"
            ));
        }
        if !system.is_empty() {
            messages.push(ChatMessage::new(ChatRole::System, system));
        }
        let mut prompt = inputs.prompt.clone();
        if let Some(comment) = &context.review_comment {
            prompt.push_str(&format!(
                "\n\nA reviewer rejected an earlier answer to this request with this comment; \
                 take it into account:\n{comment}"
            ));
        }
        messages.push(ChatMessage::new(ChatRole::User, prompt));
        let mut request = ChatRequest {
            model: model.clone(),
            messages,
            temperature: inputs.temperature,
            max_tokens: None,
            response_format: ResponseFormat::Text,
            logprobs: true,
            top_logprobs: Some(1),
            stream: inputs.stream,
            tool_choice: (!definitions.is_empty()).then_some(ToolChoice::Auto),
            tools: definitions,
        };
        let mut transcript = Transcript::default();
        let mut budget = Budget::default();
        let mut steps = 0u32;
        let mut calls = 0u32;
        let final_response = loop {
            if steps >= max_steps {
                return Err(ToolError::permanent(format!(
                    "agent step budget exhausted: the model still called tools after \
                     max_steps {max_steps} requests ({} tokens used)",
                    budget.used
                )));
            }
            if budget.used >= max_tokens {
                return Err(ToolError::permanent(format!(
                    "agent token budget exhausted: {} tokens used of max_tokens {max_tokens} \
                     after {steps} steps, and the model still calls tools",
                    budget.used
                )));
            }
            steps += 1;
            let response = provider.chat(&request, logs).await.map_err(tool_error)?;
            budget.add(&request, &response);
            let called: Vec<Value> = response
                .tool_calls
                .iter()
                .map(|call| {
                    json!({
                        "id": call.id,
                        "name": call.name,
                        "arguments": bounded(&call.arguments, TRANSCRIPT_TEXT_BYTES_MAX),
                    })
                })
                .collect();
            transcript
                .record(
                    json!({
                        "step": steps,
                        "type": "model",
                        "content": bounded(&response.content, TRANSCRIPT_TEXT_BYTES_MAX),
                        "tool_calls": called,
                        "finish_reason": response.finish_reason,
                        "usage": usage_json(response.usage),
                        "tokens_used": budget.used,
                    }),
                    logs,
                )
                .await;
            if response.tool_calls.is_empty() {
                break response;
            }
            request.messages.push(ChatMessage::assistant(
                response.content.clone(),
                response.tool_calls.clone(),
            ));
            for (index, call) in response.tool_calls.iter().enumerate() {
                let result = if index >= CALLS_PER_STEP_MAX {
                    CallResult::error(format!(
                        "not executed: at most {CALLS_PER_STEP_MAX} tool calls are executed per \
                         answer; call it again in your next answer"
                    ))
                } else {
                    calls += 1;
                    self.call(&callables, call, &context, calls).await
                };
                transcript
                    .record(
                        json!({
                            "step": steps,
                            "type": "tool",
                            "id": call.id,
                            "name": call.name,
                            "tool": callables.get(&call.name).map(|callable| callable.name.clone()),
                            "ok": result.ok,
                            "result": bounded(&result.text, TRANSCRIPT_TEXT_BYTES_MAX),
                        }),
                        logs,
                    )
                    .await;
                request
                    .messages
                    .push(ChatMessage::tool_result(call.id.clone(), result.text));
            }
        };

        // 3. Check the answer, and repair once.
        let (answer, final_response, final_request, repaired) = match checker
            .check(&final_response.content)
        {
            Ok(answer) => (answer, final_response, request, false),
            Err(rejection) => {
                logs.write(
                    LogStream::System,
                    &format!("agent: asking for a repair: {}", rejection.listing()),
                )
                .await;
                let mut repair = request.clone();
                repair.messages.push(ChatMessage::new(
                    ChatRole::Assistant,
                    final_response.content.clone(),
                ));
                repair.messages.push(ChatMessage::new(
                    ChatRole::User,
                    format!(
                        "Your answer does not satisfy the required JSON Schema: {}.\nReply \
                             with only the corrected JSON value.",
                        rejection.listing()
                    ),
                ));
                if !repair.tools.is_empty() {
                    repair.tool_choice = Some(ToolChoice::None);
                }
                let second = provider.chat(&repair, logs).await.map_err(tool_error)?;
                budget.add(&repair, &second);
                transcript
                    .record(
                        json!({
                            "step": steps + 1,
                            "type": "repair",
                            "content": bounded(&second.content, TRANSCRIPT_TEXT_BYTES_MAX),
                            "usage": usage_json(second.usage),
                            "tokens_used": budget.used,
                        }),
                        logs,
                    )
                    .await;
                match checker.check(&second.content) {
                    Ok(answer) => (answer, second, repair, true),
                    Err(rejection) => {
                        return Err(rejection.after_repair("the agent's answer", &second.content))
                    }
                }
            }
        };

        // 4. The confidence.
        let by_logprobs = super::logprobs_confidence(&final_response);
        let (answer, confidence, method, compared) = match by_logprobs {
            Some(value) => (answer, Some(value), "logprobs", 1),
            None if samples > 1 && budget.used < max_tokens => {
                let mut answers = vec![Some(answer.clone())];
                answers.extend(
                    self.more_samples(
                        &provider,
                        &final_request,
                        samples - 1,
                        &checker,
                        logs,
                        &mut budget,
                    )
                    .await?,
                );
                by_agreement(answer, &answers, samples)
            }
            None => (answer, None, "none", 1),
        };

        let usage = budget.usage();
        let mut outputs = Map::new();
        outputs.insert("answer".into(), answer);
        outputs.insert("confidence".into(), json!(confidence));
        outputs.insert("confidence_method".into(), json!(method));
        outputs.insert("samples".into(), json!(compared));
        outputs.insert("usage".into(), usage_json(usage));
        outputs.insert("tokens_used".into(), json!(budget.used));
        outputs.insert("steps".into(), json!(steps));
        outputs.insert("tool_calls".into(), json!(calls));
        outputs.insert("requests".into(), json!(budget.requests));
        outputs.insert("model".into(), json!(final_response.model));
        outputs.insert("prompt".into(), json!(inputs.prompt));
        outputs.insert("repaired".into(), json!(repaired));
        if let Some(cost) = self
            .llm
            .policy
            .cost_usd(&model, &final_response.model, usage)
        {
            outputs.insert("cost_usd".into(), json!(cost));
        }
        let confidence_text = confidence.map_or_else(
            || "none".to_owned(),
            |value| format!("{value:.3} ({method})"),
        );
        logs.write(
            LogStream::System,
            &format!(
                "agent: model {}, {steps} steps, {calls} tool calls, {} tokens, confidence \
                 {confidence_text}{}",
                final_response.model,
                budget.used,
                if repaired { ", repaired" } else { "" }
            ),
        )
        .await;
        outputs.insert("transcript".into(), Value::Array(transcript.finish()));
        Ok(Value::Object(outputs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_names_keep_only_what_servers_accept() {
        assert_eq!(function_name("echo"), "echo");
        assert_eq!(function_name("geocode@2"), "geocode_2");
        assert_eq!(function_name("a.b c"), "a_b_c");
        assert_eq!(function_name(&"x".repeat(100)).len(), 64);
    }

    #[test]
    fn long_texts_are_cut_on_a_character_boundary() {
        assert_eq!(bounded("short", 10), "short");
        let cut = bounded("ééééé", 3);
        assert!(cut.starts_with("é…"), "{cut}");
        assert!(cut.ends_with("(cut: 10 bytes in all)"), "{cut}");
    }
}
