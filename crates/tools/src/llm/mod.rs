//! The `llm` tool: one prompt to an OpenAI-compatible chat model, an answer checked against
//! a JSON Schema (with one repair attempt), and a confidence in [0, 1].
//!
//! The provider is the org's own where it set one, else the installation's: an org names its
//! OpenAI-compatible API, its default model and its API key in its secrets
//! [`ORG_BASE_URL_SECRET`], [`ORG_MODEL_SECRET`] and [`ORG_API_KEY_SECRET`] (read on every
//! attempt through a [`SecretReader`], so a change applies to the next task run). The
//! installation's key is never sent to an org's base URL, nor an org's key to another org.
//!
//! What one attempt does:
//! 1. checks the inputs and the policy: the model and base URL (the org's settings, then the
//!    installation's; inputs override them only where [`LlmPolicy::allow_override`] says
//!    so), the base URL's host against
//!    the `http` tool's allowed hosts (nothing is sent otherwise), the output schema compiles;
//! 2. asks the provider ([`openai::OpenAiProvider`], on the `http` tool's request path:
//!    breaker, retries, timeouts) for an answer, with token log-probabilities and, given an
//!    `output_schema`, `response_format` `json_schema` plus the schema in the system message
//!    (for servers that ignore the format);
//! 3. with an `output_schema`: parses the answer as JSON (a Markdown code fence around it is
//!    removed) and checks it; on a failure sends the model its answer and the violations once
//!    and checks the corrected answer; a second failure is permanent and names the JSON
//!    pointers of the violations (under `/answer`);
//! 4. computes the confidence ([`confidence`]): from the answer's token log-probabilities when
//!    the server gave them, else by agreement among `samples` answers (the answer returned is
//!    then the modal one), else none (`samples: 1`).
//!
//! Outputs (stored with the task run): `answer` (the parsed JSON value, or the text without
//! an `output_schema`), `confidence` (a number in [0, 1], or `null` with method `none`),
//! `confidence_method` (`logprobs`, `agreement` or `none`), `samples` (answers compared: 1
//! unless by agreement), `usage` (`{prompt_tokens, completion_tokens, total_tokens}` summed
//! over every request of the attempt, or `null` when the server did not report it for all of
//! them), `requests` (chat requests sent), `model` (as the server named it), `prompt`,
//! `system` (as given, or `null`), `repaired`, `provider` (whose settings chose the base URL:
//! `org`, `installation` or `task`), and `cost_usd` when the policy prices the model and
//! usage is known.
//!
//! Failures: provider unavailable (after the request retries, or an open breaker) is
//! retryable; everything else (inputs, policy, a refused request, an answer that stays
//! invalid) is permanent. No message or output holds the API key.

pub mod agent;
pub mod confidence;
pub mod embeddings;
pub mod openai;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arches_core::ids::{OrgId, SecretName};
use arches_core::llm::{
    ChatMessage, ChatRequest, ChatResponse, ChatRole, LlmError, LlmProvider, ResponseFormat,
    TokenUsage,
};
use arches_core::pipeline::model::optional_duration;
use arches_core::ports::{LogSink, SecretReader, Tool, ToolContext, ToolError};
use arches_core::records::LogStream;
use arches_core::retry::RetryPolicy;
use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::common::parse_inputs;
use crate::http::HttpTool;
use openai::{OpenAiProvider, OpenAiSettings};

pub use embeddings::{EmbeddingSettings, OpenAiEmbeddings};

/// The base URL when neither the policy nor the environment names one: Ollama's
/// OpenAI-compatible API on this machine.
pub const DEFAULT_BASE_URL: &str = "http://127.0.0.1:11434/v1";
/// The org secret naming the org's own OpenAI-compatible API, up to its version (for example
/// `https://api.openai.com/v1`); its host must still be among the `http` tool's allowed
/// hosts. When it is set, the installation's provider, model and key are not used for the
/// org.
pub const ORG_BASE_URL_SECRET: &str = "LLM_BASE_URL";
/// The org secret naming the org's default model (for its own provider, or for the
/// installation's when it sets no base URL).
pub const ORG_MODEL_SECRET: &str = "LLM_MODEL";
/// The org secret holding the org's API key: sent as a bearer token to the org's base URL,
/// or to the installation's when the org sets none (in place of the installation's key).
pub const ORG_API_KEY_SECRET: &str = "LLM_API_KEY";
/// Default timeout of one request to the provider: 120 s (local models are slow).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// Default bound of a provider's response body: 8 MiB (log-probabilities make answers large).
pub const DEFAULT_MAX_OUTPUT_BYTES: u64 = 8 * 1024 * 1024;
/// Default number of answers compared when the confidence comes from agreement.
pub const DEFAULT_SAMPLES: u32 = 3;
/// Most answers an attempt may compare.
pub const SAMPLES_MAX: u32 = 10;
/// Temperature of the extra samples when the task asks for 0 (at 0 they would repeat the
/// first answer and always agree).
pub const SAMPLE_TEMPERATURE: f64 = 1.0;
/// Violations listed in a repair request and in the final error.
const VIOLATIONS_LISTED: usize = 10;
/// Characters of an invalid answer quoted in the final error.
const ANSWER_QUOTE_CHARS: usize = 300;

/// An API key: sent to the provider, never printed (its `Debug` shows `ApiKey(***)`), never
/// in an error or an output.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key.
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// The key in clear, for the request header.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

/// The price of a model, in US dollars per million tokens.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
pub struct ModelPrice {
    /// Dollars per 1,000,000 prompt tokens.
    pub input_per_million: f64,
    /// Dollars per 1,000,000 answer tokens.
    pub output_per_million: f64,
}

impl ModelPrice {
    /// The cost of `usage`, in dollars:
    /// `prompt_tokens · input_per_million / 10⁶ + completion_tokens · output_per_million / 10⁶`.
    pub fn cost_usd(&self, usage: &TokenUsage) -> f64 {
        usage.prompt_tokens as f64 * self.input_per_million / 1e6
            + usage.completion_tokens as f64 * self.output_per_million / 1e6
    }
}

/// What the `llm` tool may do; set by the operator, not by pipelines.
#[derive(Clone, Debug)]
pub struct LlmPolicy {
    /// The installation's OpenAI-compatible base URL, up to its version (for example
    /// `http://127.0.0.1:11434/v1`); its host must be among the `http` tool's allowed hosts.
    /// `None`: no installation provider; an org's tasks then need the org's
    /// [`ORG_BASE_URL_SECRET`] (or, where overrides are allowed, a `base_url` of their own).
    pub base_url: Option<String>,
    /// The model when the task names none; `None`: tasks must name one.
    pub model: Option<String>,
    /// Sent as a bearer token; never printed.
    pub api_key: Option<ApiKey>,
    /// Whether a task's `model` and `base_url` may replace the defaults (a task may always
    /// repeat them). A task's base URL gets no API key unless it is the default one.
    pub allow_override: bool,
    /// Prices by model name; a model without one gets no `cost_usd`.
    pub prices: BTreeMap<String, ModelPrice>,
    /// Timeout of one request when the task gives none.
    pub timeout: Duration,
    /// Largest response body read from the provider, in bytes.
    pub max_output_bytes: u64,
    /// Retries of one request's transient failures (connection errors, timeouts, 408, 429,
    /// 5xx), within the attempt; the task's own retry policy comes on top.
    pub retry: RetryPolicy,
}

impl Default for LlmPolicy {
    /// Ollama on this machine ([`DEFAULT_BASE_URL`]), no default model, no key, overrides
    /// allowed, no prices, 120 s per request, 8 MiB answers, 3 tries per request (0.5 s
    /// backoff doubling to 10 s, jitter 0.5).
    fn default() -> Self {
        Self {
            base_url: Some(DEFAULT_BASE_URL.to_owned()),
            model: None,
            api_key: None,
            allow_override: true,
            prices: BTreeMap::new(),
            timeout: DEFAULT_TIMEOUT,
            max_output_bytes: DEFAULT_MAX_OUTPUT_BYTES,
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

impl LlmPolicy {
    /// The cost in dollars of `usage` at the price of the model asked for, else of the model
    /// the server named; `None` without a price or without usage.
    pub(crate) fn cost_usd(
        &self,
        asked: &str,
        answered: &str,
        usage: Option<TokenUsage>,
    ) -> Option<f64> {
        let price = self
            .prices
            .get(asked)
            .or_else(|| self.prices.get(answered))?;
        Some(price.cost_usd(&usage?))
    }

    /// The default policy with `ARCHES_LLM_BASE_URL`, `ARCHES_LLM_MODEL` and
    /// `ARCHES_LLM_API_KEY` from the environment (empty values are ignored): for the local
    /// CLI.
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`LlmPolicy::from_env`] over any lookup of variables.
    pub fn from_vars(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let var = |name: &str| lookup(name).filter(|value| !value.trim().is_empty());
        let mut policy = Self::default();
        if let Some(base_url) = var("ARCHES_LLM_BASE_URL") {
            policy.base_url = Some(base_url.trim().to_owned());
        }
        policy.model = var("ARCHES_LLM_MODEL").map(|model| model.trim().to_owned());
        policy.api_key = var("ARCHES_LLM_API_KEY").map(|key| ApiKey::new(key.trim()));
        policy
    }

    /// Problems with the policy, as messages (empty when it is usable): a base URL that is
    /// not an `http://` URL, a zero timeout or body bound, a negative or non-finite price, a
    /// bad retry policy.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(Err(error)) = self.base_url.as_deref().map(openai::endpoint) {
            out.push(error.message);
        }
        if self.timeout.is_zero() {
            out.push("timeout must be positive".to_owned());
        }
        if self.max_output_bytes == 0 {
            out.push("max_output_bytes must be positive".to_owned());
        }
        for (model, price) in &self.prices {
            let fine = |value: f64| value.is_finite() && value >= 0.0;
            if !fine(price.input_per_million) || !fine(price.output_per_million) {
                out.push(format!(
                    "the price of model {model:?} must be finite and not negative"
                ));
            }
        }
        for (field, message) in self.retry.problems() {
            out.push(format!("retry.{field}: {message}"));
        }
        out
    }
}

/// Where the settings of one attempt's provider came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// The org's secrets.
    Org,
    /// The installation's policy.
    Installation,
}

/// The provider defaults of an org: its own settings where its secrets give them, else the
/// installation's.
struct Defaults {
    base_url: Option<String>,
    model: Option<String>,
    api_key: Option<ApiKey>,
    source: Source,
}

/// The org's secrets that choose its provider, in the order [`LlmTool::defaults`] reads them.
fn org_secret_names() -> [SecretName; 3] {
    [ORG_BASE_URL_SECRET, ORG_MODEL_SECRET, ORG_API_KEY_SECRET].map(|name| {
        SecretName::parse(name).unwrap_or_else(|_| unreachable!("{name} is a valid secret name"))
    })
}

/// The `llm` tool. Cheap to share; it holds the `http` tool whose breakers, rate limits and
/// allowed hosts its requests go through.
pub struct LlmTool {
    policy: LlmPolicy,
    http: Arc<HttpTool>,
    org_secrets: Option<Arc<dyn SecretReader>>,
}

impl std::fmt::Debug for LlmTool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmTool")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LlmInputs {
    prompt: String,
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    base_url: Option<String>,
    #[serde(default)]
    output_schema: Option<Value>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    samples: Option<u32>,
    #[serde(default, with = "optional_duration")]
    timeout: Option<Duration>,
    #[serde(default)]
    stream: bool,
}

/// Why an answer is not acceptable.
enum Rejection {
    /// Not JSON (the parser's message).
    NotJson(String),
    /// JSON breaking the schema: `pointer: message` lines, pointers under `/answer`.
    Violations(Vec<String>),
}

/// The answer and confidence by agreement among `answers` (the first is `answer`, the
/// others the extra samples): the modal answer and its share ([`confidence::agreement`]),
/// as `(answer, confidence, method, answers compared)`; method `none` when no vote is
/// possible.
pub(crate) fn by_agreement(
    answer: Value,
    answers: &[Option<Value>],
    samples: u32,
) -> (Value, Option<f64>, &'static str, u32) {
    match confidence::agreement(answers) {
        Some(vote) => {
            let modal = answers.get(vote.modal).cloned().flatten().unwrap_or(answer);
            (modal, Some(vote.confidence), "agreement", samples)
        }
        None => (answer, None, "none", 1),
    }
}

/// Token usage as output JSON: `{prompt_tokens, completion_tokens, total_tokens}`, or
/// `null` when the server did not report it.
pub(crate) fn usage_json(usage: Option<TokenUsage>) -> Value {
    usage.map_or(Value::Null, |usage| {
        json!({
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
        })
    })
}

/// The confidence from a response's token log-probabilities, when the server gave them
/// ([`confidence::from_logprobs`]).
pub(crate) fn logprobs_confidence(response: &ChatResponse) -> Option<f64> {
    let token_logprobs: Vec<f64> = response
        .logprobs
        .as_ref()?
        .iter()
        .map(|token| token.logprob)
        .collect();
    confidence::from_logprobs(&token_logprobs)
}

impl Rejection {
    /// The permanent error of an answer (`subject`, e.g. "the model's answer") that still
    /// fails after the one repair request, quoting the start of `content`.
    pub(crate) fn after_repair(&self, subject: &str, content: &str) -> ToolError {
        let what = match self {
            Rejection::NotJson(_) => "is not JSON",
            Rejection::Violations(_) => "breaks output_schema",
        };
        ToolError::permanent(format!(
            "{subject} {what} after one repair attempt: {}; the answer was: {}",
            self.listing(),
            excerpt(content)
        ))
    }

    /// The problems, listed for a message.
    fn listing(&self) -> String {
        match self {
            Rejection::NotJson(error) => format!("the answer is not JSON: {error}"),
            Rejection::Violations(lines) => {
                let mut text = lines
                    .iter()
                    .take(VIOLATIONS_LISTED)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; ");
                if lines.len() > VIOLATIONS_LISTED {
                    text.push_str(&format!(" (and {} more)", lines.len() - VIOLATIONS_LISTED));
                }
                text
            }
        }
    }
}

/// The answer checks of one attempt: the compiled output schema, if any.
struct Checker {
    validator: Option<jsonschema::Validator>,
}

impl Checker {
    /// The answer of `content`: the text without a schema, else the parsed, valid JSON.
    fn check(&self, content: &str) -> Result<Value, Rejection> {
        let Some(validator) = &self.validator else {
            return Ok(Value::String(content.to_owned()));
        };
        let value: Value = serde_json::from_str(strip_fence(content))
            .map_err(|error| Rejection::NotJson(error.to_string()))?;
        let violations: Vec<String> = validator
            .iter_errors(&value)
            .map(|error| format!("/answer{}: {error}", error.instance_path().as_str()))
            .collect();
        if violations.is_empty() {
            Ok(value)
        } else {
            Err(Rejection::Violations(violations))
        }
    }
}

/// `text` without a surrounding Markdown code fence (```` ```json … ``` ````), trimmed.
fn strip_fence(text: &str) -> &str {
    let trimmed = text.trim();
    let Some(rest) = trimmed.strip_prefix("```") else {
        return trimmed;
    };
    let Some(body) = rest.strip_suffix("```") else {
        return trimmed;
    };
    // Drop the info string (`json`) on the opening line.
    match body.split_once('\n') {
        Some((info, inner)) if !info.contains(['{', '[', '"']) => inner.trim(),
        _ => body.trim(),
    }
}

/// `text` cut to a few hundred characters, for an error.
fn excerpt(text: &str) -> String {
    let mut out: String = text.chars().take(ANSWER_QUOTE_CHARS).collect();
    if text.chars().count() > ANSWER_QUOTE_CHARS {
        out.push('…');
    }
    out
}

fn tool_error(error: LlmError) -> ToolError {
    if error.retryable() {
        ToolError::transient(error.message)
    } else {
        ToolError::permanent(error.message)
    }
}

/// Responses of one attempt, for the usage total.
#[derive(Default)]
struct Tally {
    requests: u32,
    usage: Option<TokenUsage>,
    usage_missing: bool,
}

impl Tally {
    fn add(&mut self, response: &ChatResponse) {
        self.requests += 1;
        match response.usage {
            Some(usage) => {
                self.usage = Some(self.usage.unwrap_or_default().plus(usage));
            }
            None => self.usage_missing = true,
        }
    }

    /// The total, when every response reported its usage.
    fn total(&self) -> Option<TokenUsage> {
        self.usage.filter(|_| !self.usage_missing)
    }
}

impl LlmTool {
    /// The tool under `policy`, sending through `http` (whose allowed hosts bound the base
    /// URLs). Check the policy with [`LlmPolicy::problems`] first.
    pub fn new(policy: LlmPolicy, http: Arc<HttpTool>) -> Self {
        Self {
            policy,
            http,
            org_secrets: None,
        }
    }

    /// This tool, letting each org choose its own provider, default model and API key in
    /// its secrets ([`ORG_BASE_URL_SECRET`], [`ORG_MODEL_SECRET`], [`ORG_API_KEY_SECRET`])
    /// read from `secrets` on every attempt.
    pub fn with_org_secrets(mut self, secrets: Arc<dyn SecretReader>) -> Self {
        self.org_secrets = Some(secrets);
        self
    }

    /// The provider defaults of `org`: with an org base URL, the org's base URL, model and
    /// key only (the installation's key never goes to the org's host); without one, the
    /// installation's base URL with the org's model and key where it set them.
    ///
    /// # Errors
    /// The org's secrets cannot be read (a store failure is retryable, a secret no master
    /// key opens is permanent), or its base URL is not an `http(s)://` URL (permanent).
    async fn defaults(&self, org: OrgId) -> Result<Defaults, ToolError> {
        let installation = Defaults {
            base_url: self.policy.base_url.clone(),
            model: self.policy.model.clone(),
            api_key: self.policy.api_key.clone(),
            source: Source::Installation,
        };
        let Some(secrets) = &self.org_secrets else {
            return Ok(installation);
        };
        let values = secrets
            .reveal_set(org, &org_secret_names())
            .await
            .map_err(|error| ToolError {
                message: format!("cannot read the org's LLM settings: {}", error.message),
                ..error
            })?;
        let mut values = values.into_iter().map(|value| {
            value
                .map(|text| text.trim().to_owned())
                .filter(|text| !text.is_empty())
        });
        let (base_url, model, api_key) = (
            values.next().flatten(),
            values.next().flatten(),
            values.next().flatten().map(ApiKey::new),
        );
        Ok(match base_url {
            Some(base_url) => {
                if let Err(error) = openai::endpoint(&base_url) {
                    return Err(ToolError::permanent(format!(
                        "the org's secret {ORG_BASE_URL_SECRET}: {}",
                        error.message
                    )));
                }
                Defaults {
                    base_url: Some(base_url),
                    model,
                    api_key,
                    source: Source::Org,
                }
            }
            None => Defaults {
                model: model.or(installation.model),
                api_key: api_key.or(installation.api_key),
                ..installation
            },
        })
    }

    /// The tool's policy.
    pub fn policy(&self) -> &LlmPolicy {
        &self.policy
    }

    /// The value of an overridable setting: the task's if given (and allowed), else the
    /// policy's.
    fn choose(
        &self,
        what: &str,
        given: Option<&String>,
        default: Option<&String>,
    ) -> Result<Option<String>, ToolError> {
        match (given.map(|value| value.trim()), default) {
            (Some(given), Some(default)) if given == default.trim() => Ok(Some(given.to_owned())),
            (Some(given), _) if self.policy.allow_override => Ok(Some(given.to_owned())),
            (Some(_), _) => Err(ToolError::permanent(format!(
                "this installation does not let tasks choose the `{what}`; remove it from the task"
            ))),
            (None, default) => Ok(default.cloned()),
        }
    }

    /// The model and a provider for a task's `model`, `base_url` and `timeout` in `org`
    /// (each the org's or installation's default, [`LlmTool::defaults`], unless given and
    /// allowed), the base URL's host checked against the `http` tool's allowed hosts, and
    /// where the base URL came from (`org`, `installation` or `task`): what the `llm` and
    /// `agent` tools ask through. A task's own base URL gets no key.
    ///
    /// # Errors
    /// Permanent: an override the policy refuses, no model, no provider, a bad base URL, a
    /// zero timeout, a host that is not allowed. The org's settings unreadable: see
    /// [`LlmTool::defaults`].
    async fn provider_for(
        &self,
        org: OrgId,
        model: Option<&String>,
        base_url: Option<&String>,
        timeout: Option<Duration>,
    ) -> Result<(String, OpenAiProvider, &'static str), ToolError> {
        let defaults = self.defaults(org).await?;
        let base_url = self
            .choose("base_url", base_url, defaults.base_url.as_ref())?
            .ok_or_else(|| {
                ToolError::permanent(format!(
                    "no LLM provider: set the org's secret {ORG_BASE_URL_SECRET} (PUT \
                     /api/v1/secrets/{ORG_BASE_URL_SECRET}) or the installation's \
                     [tools.llm] base_url"
                ))
            })?;
        let model = self
            .choose("model", model, defaults.model.as_ref())?
            .filter(|model| !model.is_empty())
            .ok_or_else(|| {
                ToolError::permanent(format!(
                    "no model: give `model`, or set the org's secret {ORG_MODEL_SECRET} or the \
                     installation's default model (ARCHES_LLM_MODEL for local runs)"
                ))
            })?;
        let same = |default: &Option<String>| {
            default
                .as_deref()
                .map(|url| url.trim().trim_end_matches('/'))
                == Some(base_url.trim().trim_end_matches('/'))
        };
        let (api_key, source) = if same(&defaults.base_url) {
            let source = match defaults.source {
                Source::Org => "org",
                Source::Installation => "installation",
            };
            (defaults.api_key, source)
        } else {
            (None, "task")
        };
        let timeout = timeout.unwrap_or(self.policy.timeout);
        if timeout.is_zero() {
            return Err(ToolError::permanent("timeout must be positive"));
        }
        let settings = OpenAiSettings {
            base_url,
            api_key,
            timeout,
            max_body_bytes: self.policy.max_output_bytes.max(1),
            retry: self.policy.retry.clone(),
        };
        let provider = OpenAiProvider::new(self.http.clone(), settings).map_err(tool_error)?;
        if !self.http.allows(provider.endpoint()) {
            return Err(ToolError::permanent(format!(
                "the host of base_url {} is not in the http tool's allowed hosts",
                provider.endpoint().host_str().unwrap_or_default()
            )));
        }
        Ok((model, provider, source))
    }

    /// Answers of `samples` further requests (no repair), for the agreement vote.
    async fn more_samples(
        &self,
        provider: &OpenAiProvider,
        request: &ChatRequest,
        samples: u32,
        checker: &Checker,
        logs: &dyn LogSink,
        tally: &mut Tally,
    ) -> Result<Vec<Option<Value>>, ToolError> {
        let mut request = request.clone();
        request.logprobs = false;
        request.top_logprobs = None;
        if request.temperature == Some(0.0) {
            request.temperature = Some(SAMPLE_TEMPERATURE);
        }
        let calls = (0..samples).map(|_| provider.chat(&request, logs));
        let results = futures::future::join_all(calls).await;
        let mut answers = Vec::with_capacity(results.len());
        for result in results {
            let response = result.map_err(tool_error)?;
            tally.add(&response);
            answers.push(checker.check(&response.content).ok());
        }
        Ok(answers)
    }
}

#[async_trait]
impl Tool for LlmTool {
    fn name(&self) -> &str {
        "llm"
    }

    fn description(&self) -> &str {
        "ask an OpenAI-compatible chat model; the answer checked against a JSON Schema, with a confidence"
    }

    fn needs_work_dir(&self) -> bool {
        false
    }

    fn input_schema(&self) -> Value {
        json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["prompt"],
            "properties": {
                "prompt": {"type": "string", "minLength": 1, "description": "the user message; templates are rendered first"},
                "system": {"type": "string", "description": "the system message"},
                "model": {"type": "string", "minLength": 1, "description": "the model; default the installation's"},
                "base_url": {"type": "string", "minLength": 1, "description": "an OpenAI-compatible API, e.g. http://127.0.0.1:11434/v1; default the installation's"},
                "output_schema": {"type": "object", "description": "a JSON Schema the answer must satisfy; without it the answer is text"},
                "temperature": {"type": "number", "minimum": 0, "maximum": 2},
                "max_tokens": {"type": "integer", "minimum": 1},
                "samples": {"type": "integer", "minimum": 1, "maximum": SAMPLES_MAX, "default": DEFAULT_SAMPLES, "description": "answers compared for the confidence when the server gives no log-probabilities"},
                "timeout": {"type": ["string", "number"], "description": "per request, e.g. \"30s\", or seconds"},
                "stream": {"type": "boolean", "default": false, "description": "have the server stream the answer (collected before it is checked)"}
            }
        })
    }

    async fn execute(&self, context: ToolContext, inputs: Value) -> Result<Value, ToolError> {
        let inputs: LlmInputs = parse_inputs("llm", inputs)?;
        let logs = context.logs.as_ref();

        // 1. Inputs and policy; nothing is sent before the host is known to be allowed.
        if inputs.prompt.trim().is_empty() {
            return Err(ToolError::permanent("prompt must not be empty"));
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
        let (model, provider, source) = self
            .provider_for(
                context.org_id,
                inputs.model.as_ref(),
                inputs.base_url.as_ref(),
                inputs.timeout,
            )
            .await?;

        // 2. The first answer.
        let mut messages = Vec::new();
        let mut system = inputs.system.clone().unwrap_or_default();
        let response_format = match &inputs.output_schema {
            Some(schema) => {
                if !system.is_empty() {
                    system.push_str("\n\n");
                }
                system.push_str(&format!(
                    "Answer with a single JSON value, and nothing else, that satisfies this \
                     JSON Schema:\n{schema}"
                ));
                ResponseFormat::JsonSchema {
                    name: "answer".to_owned(),
                    schema: schema.clone(),
                    strict: true,
                }
            }
            None => ResponseFormat::Text,
        };
        if !system.is_empty() {
            messages.push(ChatMessage::new(ChatRole::System, system));
        }
        let mut prompt = inputs.prompt.clone();
        if let Some(comment) = &context.review_comment {
            // A reviewer rejected the previous answer and asked for another attempt.
            prompt.push_str(&format!(
                "\n\nA reviewer rejected an earlier answer to this request with this comment; \
                 take it into account:\n{comment}"
            ));
        }
        messages.push(ChatMessage::new(ChatRole::User, prompt));
        let request = ChatRequest {
            model: model.clone(),
            messages,
            temperature: inputs.temperature,
            max_tokens: inputs.max_tokens,
            response_format,
            logprobs: true,
            top_logprobs: Some(1),
            stream: inputs.stream,
            tools: Vec::new(),
            tool_choice: None,
        };
        let mut tally = Tally::default();
        let first = provider.chat(&request, logs).await.map_err(tool_error)?;
        tally.add(&first);

        // 3. Check, and repair once.
        let (answer, final_response, repaired) = match checker.check(&first.content) {
            Ok(answer) => (answer, first, false),
            Err(rejection) => {
                logs.write(
                    LogStream::System,
                    &format!("llm: asking for a repair: {}", rejection.listing()),
                )
                .await;
                let mut repair = request.clone();
                repair
                    .messages
                    .push(ChatMessage::new(ChatRole::Assistant, first.content.clone()));
                repair.messages.push(ChatMessage::new(
                    ChatRole::User,
                    format!(
                        "Your answer does not satisfy the required JSON Schema: {}.\nReply \
                         with only the corrected JSON value.",
                        rejection.listing()
                    ),
                ));
                let second = provider.chat(&repair, logs).await.map_err(tool_error)?;
                tally.add(&second);
                match checker.check(&second.content) {
                    Ok(answer) => (answer, second, true),
                    Err(rejection) => {
                        return Err(rejection.after_repair("the model's answer", &second.content))
                    }
                }
            }
        };

        // 4. The confidence.
        let by_logprobs = logprobs_confidence(&final_response);
        let (answer, confidence, method, compared) = match by_logprobs {
            Some(value) => (answer, Some(value), "logprobs", 1),
            None if samples > 1 => {
                let mut answers = vec![Some(answer.clone())];
                answers.extend(
                    self.more_samples(&provider, &request, samples - 1, &checker, logs, &mut tally)
                        .await?,
                );
                by_agreement(answer, &answers, samples)
            }
            None => (answer, None, "none", 1),
        };

        let usage = tally.total();
        let mut outputs = Map::new();
        outputs.insert("answer".into(), answer);
        outputs.insert("confidence".into(), json!(confidence));
        outputs.insert("confidence_method".into(), json!(method));
        outputs.insert("samples".into(), json!(compared));
        outputs.insert("usage".into(), usage_json(usage));
        outputs.insert("requests".into(), json!(tally.requests));
        outputs.insert("model".into(), json!(final_response.model));
        outputs.insert("prompt".into(), json!(inputs.prompt));
        outputs.insert("system".into(), json!(inputs.system));
        outputs.insert("repaired".into(), json!(repaired));
        outputs.insert("provider".into(), json!(source));
        if let Some(cost) = self.policy.cost_usd(&model, &final_response.model, usage) {
            outputs.insert("cost_usd".into(), json!(cost));
        }
        let tokens = usage.map_or_else(
            || "usage not reported".to_owned(),
            |usage| {
                format!(
                    "{} prompt + {} answer tokens",
                    usage.prompt_tokens, usage.completion_tokens
                )
            },
        );
        let confidence_text = confidence.map_or_else(
            || "none".to_owned(),
            |value| format!("{value:.3} ({method})"),
        );
        logs.write(
            LogStream::System,
            &format!(
                "llm: model {}, confidence {confidence_text}, {tokens}, {} requests{}",
                final_response.model,
                tally.requests,
                if repaired { ", repaired" } else { "" }
            ),
        )
        .await;
        Ok(Value::Object(outputs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fences_are_stripped() {
        assert_eq!(strip_fence("```json\n{\"a\": 1}\n```"), "{\"a\": 1}");
        assert_eq!(strip_fence("```\n[1]\n```"), "[1]");
        assert_eq!(strip_fence("  {\"a\": 1} "), "{\"a\": 1}");
        assert_eq!(strip_fence("```{\"a\": 1}```"), "{\"a\": 1}");
    }

    #[test]
    fn the_api_key_stays_out_of_debug_output() {
        let policy = LlmPolicy {
            api_key: Some(ApiKey::new("sk-secret-123")),
            ..LlmPolicy::default()
        };
        let text = format!("{policy:?}");
        assert!(!text.contains("sk-secret-123"), "{text}");
        assert!(text.contains("ApiKey(***)"));
    }

    #[test]
    fn env_vars_set_the_policy() {
        let vars = |name: &str| match name {
            "ARCHES_LLM_BASE_URL" => Some("http://vllm:8000/v1".to_owned()),
            "ARCHES_LLM_MODEL" => Some("qwen".to_owned()),
            "ARCHES_LLM_API_KEY" => Some(String::new()),
            _ => None,
        };
        let policy = LlmPolicy::from_vars(vars);
        assert_eq!(policy.base_url.as_deref(), Some("http://vllm:8000/v1"));
        assert_eq!(policy.model.as_deref(), Some("qwen"));
        assert!(policy.api_key.is_none());
        assert!(policy.problems().is_empty(), "{:?}", policy.problems());
        let bad = LlmPolicy {
            base_url: Some("ftp://api.openai.com/v1".to_owned()),
            ..LlmPolicy::default()
        };
        assert_eq!(bad.problems().len(), 1);
    }

    #[test]
    fn prices_are_per_million_tokens() {
        let price = ModelPrice {
            input_per_million: 0.15,
            output_per_million: 0.6,
        };
        let usage = TokenUsage {
            prompt_tokens: 1_000_000,
            completion_tokens: 500_000,
            total_tokens: 1_500_000,
        };
        assert!((price.cost_usd(&usage) - 0.45).abs() < 1e-12);
    }
}
