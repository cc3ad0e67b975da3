//! Tests of the `llm` tool against a scripted OpenAI-compatible server (axum on
//! 127.0.0.1): each test scripts the server's replies to `POST /v1/chat/completions`, in
//! order, and reads back the requests it received (a module of the `tools` test binary,
//! sharing its harness).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arches_core::ids::{OrgId, SecretName};
use arches_core::llm::{ChatMessage, ChatRequest, ChatRole, LlmErrorKind, LlmProvider};
use arches_core::ports::{SecretReader, Tool, ToolError};
use arches_core::records::LogStream;
use arches_core::retry::RetryPolicy;
use arches_core::time::{ManualClock, Timestamp};
use arches_tools::llm::openai::{OpenAiProvider, OpenAiSettings};
use arches_tools::{
    builtin_registry, ApiKey, BreakerSettings, BreakerState, HttpPolicy, HttpTool, LlmPolicy,
    LlmTool, ModelPrice, ORG_API_KEY_SECRET, ORG_BASE_URL_SECRET, ORG_MODEL_SECRET,
};
use async_trait::async_trait;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::Harness;

/// A bound on every wait of these tests.
pub(crate) const WAIT: Duration = Duration::from_secs(20);

/// One scripted reply.
#[derive(Clone)]
pub(crate) enum Reply {
    /// A status and a JSON body.
    Json(u16, Value),
    /// 200 with `text/event-stream`: each string is sent as `data: <string>\n\n`.
    Stream(Vec<String>),
    /// Never answers.
    Hang,
}

/// What the server saw and what it will answer.
#[derive(Default)]
pub(crate) struct Script {
    pub(crate) replies: Mutex<VecDeque<Reply>>,
    /// Answered once the scripted replies are spent; 500 when `None`.
    pub(crate) fallback: Mutex<Option<Reply>>,
    requests: Mutex<Vec<(Value, Option<String>)>>,
}

impl Script {
    pub(crate) fn requests(&self) -> Vec<Value> {
        let seen = self.requests.lock().unwrap();
        seen.iter().map(|(body, _)| body.clone()).collect()
    }

    fn authorizations(&self) -> Vec<Option<String>> {
        let seen = self.requests.lock().unwrap();
        seen.iter().map(|(_, auth)| auth.clone()).collect()
    }

    pub(crate) fn hits(&self) -> usize {
        self.requests.lock().unwrap().len()
    }
}

async fn completions(
    State(script): State<Arc<Script>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let auth = headers
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    script.requests.lock().unwrap().push((body, auth));
    let next = script.replies.lock().unwrap().pop_front();
    let reply = next.or_else(|| script.fallback.lock().unwrap().clone());
    match reply {
        None => (StatusCode::INTERNAL_SERVER_ERROR, "script exhausted").into_response(),
        Some(Reply::Json(status, body)) => (
            StatusCode::from_u16(status).unwrap(),
            [("content-type", "application/json")],
            body.to_string(),
        )
            .into_response(),
        Some(Reply::Stream(events)) => {
            let text: String = events
                .iter()
                .map(|event| format!("data: {event}\n\n"))
                .collect();
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from(text))
                .unwrap()
        }
        Some(Reply::Hang) => std::future::pending().await,
    }
}

/// A scripted server: its base URL (`http://127.0.0.1:<port>/v1`) and script.
pub(crate) async fn start(replies: Vec<Reply>) -> (String, Arc<Script>) {
    let script = Arc::new(Script {
        replies: Mutex::new(replies.into()),
        ..Script::default()
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(completions))
        .with_state(script.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://127.0.0.1:{port}/v1"), script)
}

/// An http tool allowed to reach 127.0.0.1, without rate limit, its breakers on `clock`
/// (opening after 2 failures, cooling down for a minute).
pub(crate) fn http(clock: Arc<ManualClock>) -> Arc<HttpTool> {
    Arc::new(HttpTool::new(HttpPolicy {
        rate_limit: None,
        breaker: BreakerSettings {
            failure_threshold: 2,
            cool_down: Duration::from_secs(60),
        },
        clock,
        ..HttpPolicy::allowing(["127.0.0.1"])
    }))
}

pub(crate) fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(Timestamp(1_700_000_000_000_000)))
}

/// The policy of these tests: the scripted server, model `test-model`, key `sk-test-key`,
/// 2 tries per request without delay, a price for `test-model`.
pub(crate) fn policy(base_url: &str) -> LlmPolicy {
    LlmPolicy {
        base_url: Some(base_url.to_owned()),
        model: Some("test-model".to_owned()),
        api_key: Some(ApiKey::new("sk-test-key")),
        prices: BTreeMap::from([(
            "test-model".to_owned(),
            ModelPrice {
                input_per_million: 1.0,
                output_per_million: 2.0,
            },
        )]),
        timeout: Duration::from_secs(10),
        retry: RetryPolicy {
            max_attempts: 2,
            initial_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(1),
            multiplier: 1.0,
            jitter: 0.0,
        },
        ..LlmPolicy::default()
    }
}

fn tool(base_url: &str) -> LlmTool {
    LlmTool::new(policy(base_url), http(clock()))
}

/// A chat completion answering `content`, with token log-probabilities and usage when given.
pub(crate) fn completion(
    content: &str,
    logprobs: Option<&[f64]>,
    usage: Option<(u64, u64)>,
) -> Reply {
    let mut choice = json!({
        "index": 0,
        "message": {"role": "assistant", "content": content},
        "finish_reason": "stop",
    });
    if let Some(values) = logprobs {
        let tokens: Vec<Value> = values
            .iter()
            .enumerate()
            .map(|(i, lp)| json!({"token": format!("t{i}"), "logprob": lp, "top_logprobs": []}))
            .collect();
        choice["logprobs"] = json!({"content": tokens});
    } else {
        choice["logprobs"] = Value::Null;
    }
    let mut body = json!({
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "test-model-2024",
        "choices": [choice],
    });
    if let Some((prompt, completion)) = usage {
        body["usage"] = json!({
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        });
    }
    Reply::Json(200, body)
}

fn label_schema() -> Value {
    json!({
        "type": "object",
        "required": ["label", "score"],
        "additionalProperties": false,
        "properties": {
            "label": {"enum": ["spam", "ham"]},
            "score": {"type": "number", "minimum": 0, "maximum": 1}
        }
    })
}

async fn run(tool: &LlmTool, inputs: Value) -> Result<Value, ToolError> {
    let harness = Harness::new().await;
    let context = harness.context("classify", BTreeMap::new());
    tokio::time::timeout(WAIT, tool.execute(context, inputs))
        .await
        .expect("the llm tool finished within the bound")
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[tokio::test]
async fn structured_output_with_logprobs_gives_a_logprob_confidence_usage_and_cost() {
    let logprobs = [0.9f64.ln(), 0.8f64.ln(), 0.0, 0.7f64.ln()];
    let (base, script) = start(vec![completion(
        r#"{"label": "spam", "score": 0.9}"#,
        Some(&logprobs),
        Some((120, 30)),
    )])
    .await;

    let outputs = run(
        &tool(&base),
        json!({
            "prompt": "Is this spam? WIN A PRIZE",
            "system": "You classify email.",
            "output_schema": label_schema(),
            "temperature": 0.2,
            "max_tokens": 50,
        }),
    )
    .await
    .unwrap();

    assert_eq!(outputs["answer"], json!({"label": "spam", "score": 0.9}));
    let expected = (0.9f64 * 0.8 * 1.0 * 0.7).powf(0.25);
    assert!(close(outputs["confidence"].as_f64().unwrap(), expected));
    assert_eq!(outputs["confidence_method"], "logprobs");
    assert_eq!(
        outputs["usage"],
        json!({"prompt_tokens": 120, "completion_tokens": 30, "total_tokens": 150})
    );
    // 120 · 1 $/M + 30 · 2 $/M.
    assert!(close(outputs["cost_usd"].as_f64().unwrap(), 180e-6));
    assert_eq!(outputs["model"], "test-model-2024");
    assert_eq!(outputs["prompt"], "Is this spam? WIN A PRIZE");
    assert_eq!(outputs["system"], "You classify email.");
    assert_eq!(outputs["repaired"], false);
    assert_eq!(outputs["requests"], 1);

    let requests = script.requests();
    assert_eq!(requests.len(), 1);
    let sent = &requests[0];
    assert_eq!(sent["model"], "test-model");
    assert_eq!(sent["temperature"], 0.2);
    assert_eq!(sent["max_tokens"], 50);
    assert_eq!(sent["stream"], false);
    assert_eq!(sent["logprobs"], true);
    assert_eq!(sent["top_logprobs"], 1);
    assert_eq!(sent["response_format"]["type"], "json_schema");
    assert_eq!(sent["response_format"]["json_schema"]["name"], "answer");
    assert_eq!(sent["response_format"]["json_schema"]["strict"], true);
    assert_eq!(
        sent["response_format"]["json_schema"]["schema"],
        label_schema()
    );
    let messages = sent["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["role"], "system");
    let system = messages[0]["content"].as_str().unwrap();
    assert!(system.starts_with("You classify email."), "{system}");
    assert!(system.contains("JSON Schema"), "{system}");
    assert_eq!(
        messages[1],
        json!({"role": "user", "content": "Is this spam? WIN A PRIZE"})
    );
    assert_eq!(
        script.authorizations(),
        vec![Some("Bearer sk-test-key".to_owned())]
    );
    // The key is in no output.
    assert!(!outputs.to_string().contains("sk-test-key"));
}

#[tokio::test]
async fn a_streamed_answer_is_collected_with_its_logprobs_and_usage() {
    let chunk = |delta: Value, logprob: Option<f64>, finish: Option<&str>| {
        let mut choice = json!({"index": 0, "delta": delta, "finish_reason": finish});
        if let Some(lp) = logprob {
            choice["logprobs"] = json!({"content": [{"token": "x", "logprob": lp}]});
        }
        json!({"id": "c", "object": "chat.completion.chunk", "model": "streamer", "choices": [choice]})
            .to_string()
    };
    let (base, script) =
        start(vec![Reply::Stream(vec![
        chunk(json!({"role": "assistant", "content": ""}), None, None),
        chunk(json!({"content": "{\"label\": \"ha"}), Some(0.5f64.ln()), None),
        chunk(json!({"content": "m\", \"score\": 0.25}"}), Some(0.0), None),
        chunk(json!({}), None, Some("stop")),
        json!({"id": "c", "object": "chat.completion.chunk", "model": "streamer", "choices": [],
               "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}})
        .to_string(),
        "[DONE]".to_owned(),
    ])])
        .await;

    let outputs = run(
        &tool(&base),
        json!({"prompt": "classify", "output_schema": label_schema(), "stream": true}),
    )
    .await
    .unwrap();

    assert_eq!(outputs["answer"], json!({"label": "ham", "score": 0.25}));
    assert_eq!(outputs["confidence_method"], "logprobs");
    assert!(close(
        outputs["confidence"].as_f64().unwrap(),
        0.5f64.sqrt()
    ));
    assert_eq!(outputs["usage"]["total_tokens"], 18);
    assert_eq!(outputs["model"], "streamer");
    let sent = &script.requests()[0];
    assert_eq!(sent["stream"], true);
    assert_eq!(sent["stream_options"], json!({"include_usage": true}));
}

#[tokio::test]
async fn a_stream_cut_before_its_end_is_a_transient_failure() {
    let (base, _script) = start(vec![Reply::Stream(vec![json!({
        "choices": [{"index": 0, "delta": {"content": "{\"la"}, "finish_reason": null}]
    })
    .to_string()])])
    .await;
    let error = run(&tool(&base), json!({"prompt": "classify", "stream": true}))
        .await
        .unwrap_err();
    assert!(error.retryable, "{error:?}");
    assert!(error.message.contains("[DONE]"), "{}", error.message);
}

#[tokio::test]
async fn without_logprobs_three_samples_vote_and_two_agreeing_give_two_thirds() {
    // The first answer is the odd one: the modal answer is returned.
    let (base, script) = start(vec![
        completion(r#"{"label": "ham", "score": 0.4}"#, None, Some((10, 5))),
        completion(r#"{"score": 0.9, "label": "spam"}"#, None, Some((10, 5))),
        completion(r#"{"label": "spam", "score": 0.9}"#, None, Some((10, 5))),
    ])
    .await;

    let outputs = run(
        &tool(&base),
        json!({"prompt": "classify", "output_schema": label_schema(), "temperature": 0}),
    )
    .await
    .unwrap();

    assert_eq!(outputs["confidence_method"], "agreement");
    let confidence = outputs["confidence"].as_f64().unwrap();
    assert!(close(confidence, 2.0 / 3.0), "{confidence}");
    assert_eq!(outputs["answer"], json!({"label": "spam", "score": 0.9}));
    assert_eq!(outputs["samples"], 3);
    assert_eq!(outputs["requests"], 3);
    assert_eq!(outputs["usage"]["total_tokens"], 45);

    let requests = script.requests();
    assert_eq!(requests.len(), 3);
    assert_eq!(requests[0]["logprobs"], true);
    assert_eq!(requests[0]["temperature"], 0.0);
    for sample in &requests[1..] {
        assert!(sample.get("logprobs").is_none(), "{sample}");
        // Samples at temperature 0 would repeat the first answer.
        assert_eq!(sample["temperature"], 1.0);
    }
}

#[tokio::test]
async fn one_sample_without_logprobs_has_no_confidence_and_missing_usage_is_null() {
    let (base, _script) = start(vec![completion("Paris.", None, None)]).await;
    let outputs = run(
        &tool(&base),
        json!({"prompt": "The capital of France?", "samples": 1}),
    )
    .await
    .unwrap();
    assert_eq!(outputs["answer"], "Paris.");
    assert_eq!(outputs["confidence"], Value::Null);
    assert_eq!(outputs["confidence_method"], "none");
    assert_eq!(outputs["usage"], Value::Null);
    assert!(outputs.get("cost_usd").is_none(), "{outputs}");
    assert_eq!(outputs["system"], Value::Null);
}

#[tokio::test]
async fn a_schema_violation_is_fixed_by_the_repair_attempt() {
    let (base, script) = start(vec![
        completion(r#"{"label": "maybe", "score": 0.5}"#, Some(&[-0.1]), None),
        completion(
            "```json\n{\"label\": \"ham\", \"score\": 0.5}\n```",
            Some(&[-0.2]),
            None,
        ),
    ])
    .await;

    let outputs = run(
        &tool(&base),
        json!({"prompt": "classify", "output_schema": label_schema()}),
    )
    .await
    .unwrap();

    assert_eq!(outputs["answer"], json!({"label": "ham", "score": 0.5}));
    assert_eq!(outputs["repaired"], true);
    assert_eq!(outputs["requests"], 2);
    // The confidence is the repaired answer's.
    assert!(close(
        outputs["confidence"].as_f64().unwrap(),
        (-0.2f64).exp()
    ));

    let repair = &script.requests()[1];
    let messages = repair["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 4);
    assert_eq!(
        messages[2],
        json!({"role": "assistant", "content": r#"{"label": "maybe", "score": 0.5}"#})
    );
    assert_eq!(messages[3]["role"], "user");
    let text = messages[3]["content"].as_str().unwrap();
    assert!(text.contains("/answer/label"), "{text}");
}

#[tokio::test]
async fn an_answer_that_is_not_json_is_repaired() {
    let (base, _script) = start(vec![
        completion("Sure! The label is spam.", Some(&[-0.1]), None),
        completion(r#"{"label": "spam", "score": 1}"#, Some(&[-0.1]), None),
    ])
    .await;
    let outputs = run(
        &tool(&base),
        json!({"prompt": "classify", "output_schema": label_schema()}),
    )
    .await
    .unwrap();
    assert_eq!(outputs["answer"], json!({"label": "spam", "score": 1}));
    assert_eq!(outputs["repaired"], true);
}

#[tokio::test]
async fn an_answer_that_stays_malformed_fails_permanently() {
    let (base, script) = start(vec![
        completion("Sure! The label is spam.", None, None),
        completion("I said: spam", None, None),
    ])
    .await;
    let error = run(
        &tool(&base),
        json!({"prompt": "classify", "output_schema": label_schema()}),
    )
    .await
    .unwrap_err();
    assert!(!error.retryable);
    assert!(
        error
            .message
            .contains("is not JSON after one repair attempt"),
        "{}",
        error.message
    );
    assert!(error.message.contains("I said: spam"), "{}", error.message);
    assert_eq!(script.hits(), 2);
}

#[tokio::test]
async fn a_violation_the_repair_does_not_fix_fails_naming_its_pointers() {
    let bad = r#"{"label": 3, "score": "high"}"#;
    let (base, script) = start(vec![
        completion(bad, None, None),
        completion(bad, None, None),
    ])
    .await;
    let error = run(
        &tool(&base),
        json!({"prompt": "classify", "output_schema": label_schema()}),
    )
    .await
    .unwrap_err();
    assert!(!error.retryable);
    assert!(
        error
            .message
            .contains("breaks output_schema after one repair attempt"),
        "{}",
        error.message
    );
    assert!(error.message.contains("/answer/label"), "{}", error.message);
    assert!(error.message.contains("/answer/score"), "{}", error.message);
    assert_eq!(script.hits(), 2);
}

#[tokio::test]
async fn a_server_without_json_schema_support_is_asked_for_json_object() {
    let (base, script) = start(vec![
        Reply::Json(
            400,
            json!({"error": {"message": "response_format.type json_schema is not supported", "type": "invalid_request_error"}}),
        ),
        completion(r#"{"label": "ham", "score": 0.1}"#, Some(&[-0.3]), None),
    ])
    .await;
    let outputs = run(
        &tool(&base),
        json!({"prompt": "classify", "output_schema": label_schema()}),
    )
    .await
    .unwrap();
    assert_eq!(outputs["answer"], json!({"label": "ham", "score": 0.1}));
    let requests = script.requests();
    assert_eq!(requests[0]["response_format"]["type"], "json_schema");
    assert_eq!(
        requests[1]["response_format"],
        json!({"type": "json_object"})
    );
}

#[tokio::test]
async fn a_hanging_provider_times_out_and_may_be_retried() {
    let (base, script) = start(vec![Reply::Hang, Reply::Hang]).await;
    let started = std::time::Instant::now();
    let error = run(&tool(&base), json!({"prompt": "hello", "timeout": "200ms"}))
        .await
        .unwrap_err();
    assert!(error.retryable, "{error:?}");
    assert!(
        error.message.contains("timed out after 200 ms"),
        "{}",
        error.message
    );
    assert!(
        error.message.contains("after 2 attempts"),
        "{}",
        error.message
    );
    assert_eq!(script.hits(), 2);
    assert!(started.elapsed() >= Duration::from_millis(400));
}

#[tokio::test]
async fn a_broken_provider_is_retried_then_its_circuit_opens_and_calls_fail_fast() {
    let (base, script) = start(Vec::new()).await;
    *script.fallback.lock().unwrap() = Some(Reply::Json(
        500,
        json!({"error": {"message": "model crashed"}}),
    ));
    let clock = clock();
    let http = http(clock.clone());
    let tool = LlmTool::new(policy(&base), http.clone());

    let error = run(&tool, json!({"prompt": "hello"})).await.unwrap_err();
    assert!(error.retryable);
    assert!(
        error.message.contains("unexpected status 500"),
        "{}",
        error.message
    );
    assert!(
        error.message.contains("after 2 attempts"),
        "{}",
        error.message
    );
    assert_eq!(script.hits(), 2);
    assert_eq!(http.breaker_states()[0].1, BreakerState::Open);

    // Open: refused without a request.
    let error = run(&tool, json!({"prompt": "hello"})).await.unwrap_err();
    assert!(error.retryable);
    assert!(error.message.contains("circuit open"), "{}", error.message);
    assert_eq!(script.hits(), 2);

    // After the cool-down a probe goes through and, answered, closes the circuit.
    *script.fallback.lock().unwrap() = Some(completion("hi", None, None));
    clock.advance(Duration::from_secs(61));
    let outputs = run(&tool, json!({"prompt": "hello", "samples": 1}))
        .await
        .unwrap();
    assert_eq!(outputs["answer"], "hi");
    assert_eq!(http.breaker_states()[0].1, BreakerState::Closed);
}

#[tokio::test]
async fn a_refusal_is_permanent_and_never_shows_the_key() {
    let (base, _script) = start(vec![Reply::Json(
        401,
        json!({"error": {"message": "Incorrect API key provided: sk-test-key"}}),
    )])
    .await;
    let error = run(&tool(&base), json!({"prompt": "hello"}))
        .await
        .unwrap_err();
    assert!(!error.retryable);
    assert!(error.message.contains("status 401"), "{}", error.message);
    assert!(!error.message.contains("sk-test-key"), "{}", error.message);
    assert!(error.message.contains("***"), "{}", error.message);
}

#[tokio::test]
async fn hosts_the_http_policy_does_not_allow_are_refused_before_sending() {
    let (base, script) = start(vec![completion("hi", None, None)]).await;
    let http = Arc::new(HttpTool::new(HttpPolicy::allowing(["llm.internal"])));
    let tool = LlmTool::new(policy(&base), http);
    let error = run(&tool, json!({"prompt": "hello"})).await.unwrap_err();
    assert!(!error.retryable);
    assert!(
        error
            .message
            .contains("not in the http tool's allowed hosts"),
        "{}",
        error.message
    );
    assert_eq!(script.hits(), 0);
}

#[tokio::test]
async fn overrides_follow_the_policy_and_other_providers_get_no_key() {
    let (base, script) = start(vec![completion("hi", None, None)]).await;
    let (other, other_script) = start(vec![completion("hello", None, None)]).await;

    // Overrides allowed: another base URL and model, without the default's key.
    let outputs = run(
        &tool(&base),
        json!({"prompt": "hi", "base_url": other, "model": "other-model", "samples": 1}),
    )
    .await
    .unwrap();
    assert_eq!(outputs["answer"], "hello");
    assert_eq!(other_script.requests()[0]["model"], "other-model");
    assert_eq!(other_script.authorizations(), vec![None]);
    assert_eq!(script.hits(), 0);

    // Overrides refused: naming the defaults is fine, anything else is not.
    let locked = LlmTool::new(
        LlmPolicy {
            allow_override: false,
            ..policy(&base)
        },
        http(clock()),
    );
    let error = run(&locked, json!({"prompt": "hi", "model": "other-model"}))
        .await
        .unwrap_err();
    assert!(error.message.contains("`model`"), "{}", error.message);
    let error = run(&locked, json!({"prompt": "hi", "base_url": other}))
        .await
        .unwrap_err();
    assert!(error.message.contains("`base_url`"), "{}", error.message);
    let outputs = run(
        &locked,
        json!({"prompt": "hi", "model": "test-model", "samples": 1}),
    )
    .await
    .unwrap();
    assert_eq!(outputs["answer"], "hi");
    assert_eq!(other_script.hits(), 1);
}

/// Org secrets of these tests: a map from (org, name) to value.
struct OrgSecrets(BTreeMap<(OrgId, String), String>);

#[async_trait]
impl SecretReader for OrgSecrets {
    async fn reveal_set(
        &self,
        org: OrgId,
        names: &[SecretName],
    ) -> Result<Vec<Option<String>>, ToolError> {
        Ok(names
            .iter()
            .map(|name| self.0.get(&(org, name.as_str().to_owned())).cloned())
            .collect())
    }
}

/// Runs `tool` for a task of `org`.
async fn run_in(tool: &LlmTool, org: OrgId, inputs: Value) -> Result<Value, ToolError> {
    let harness = Harness::new().await;
    let mut context = harness.context("classify", BTreeMap::new());
    context.org_id = org;
    tokio::time::timeout(WAIT, tool.execute(context, inputs))
        .await
        .expect("the llm tool finished within the bound")
}

#[tokio::test]
async fn each_org_uses_its_own_provider_model_and_key_and_no_key_crosses_over() {
    let (installation, installation_script) = start(vec![]).await;
    let (own, own_script) = start(vec![]).await;
    for script in [&installation_script, &own_script] {
        *script.fallback.lock().unwrap() = Some(completion("fine", None, None));
    }
    let (with_provider, with_key, keyless, plain) =
        (OrgId::new(), OrgId::new(), OrgId::new(), OrgId::new());
    let secret = |org: OrgId, name: &str, value: &str| ((org, name.to_owned()), value.to_owned());
    let secrets = OrgSecrets(BTreeMap::from([
        // Its own provider, model and key.
        secret(with_provider, ORG_BASE_URL_SECRET, &own),
        secret(with_provider, ORG_MODEL_SECRET, "org-model"),
        secret(with_provider, ORG_API_KEY_SECRET, "sk-org-key"),
        // The installation's provider with the org's own key and model.
        secret(with_key, ORG_API_KEY_SECRET, "sk-other-org-key"),
        secret(with_key, ORG_MODEL_SECRET, "their-model"),
        // Its own provider without a key: the installation's key must not follow.
        secret(keyless, ORG_BASE_URL_SECRET, &format!("{own}/")),
    ]));
    let tool = LlmTool::new(
        LlmPolicy {
            allow_override: false,
            ..policy(&installation)
        },
        http(clock()),
    )
    .with_org_secrets(Arc::new(secrets));
    let ask = json!({"prompt": "hi", "samples": 1});

    let outputs = run_in(&tool, with_provider, ask.clone()).await.unwrap();
    assert_eq!(outputs["provider"], "org");
    assert_eq!(own_script.requests()[0]["model"], "org-model");
    assert_eq!(
        own_script.authorizations(),
        vec![Some("Bearer sk-org-key".to_owned())]
    );

    let outputs = run_in(&tool, with_key, ask.clone()).await.unwrap();
    assert_eq!(outputs["provider"], "installation");
    assert_eq!(installation_script.requests()[0]["model"], "their-model");
    assert_eq!(
        installation_script.authorizations(),
        vec![Some("Bearer sk-other-org-key".to_owned())]
    );

    // An org's own base URL with no key of its own and no default model: the task names the
    // model (overrides are off, so naming the org's default base URL is all it may do).
    let error = run_in(&tool, keyless, ask.clone()).await.unwrap_err();
    assert!(!error.retryable);
    assert!(error.message.contains("LLM_MODEL"), "{}", error.message);
    let error = run_in(
        &tool,
        keyless,
        json!({"prompt": "hi", "samples": 1, "model": "test-model", "base_url": format!("{own}/")}),
    )
    .await
    .unwrap_err();
    assert!(error.message.contains("`model`"), "{}", error.message);
    let keyless_tool =
        LlmTool::new(policy(&installation), http(clock())).with_org_secrets(Arc::new(OrgSecrets(
            BTreeMap::from([secret(keyless, ORG_BASE_URL_SECRET, &own)]),
        )));
    let outputs = run_in(
        &keyless_tool,
        keyless,
        json!({"prompt": "hi", "samples": 1, "model": "m"}),
    )
    .await
    .unwrap();
    assert_eq!(outputs["provider"], "org");
    assert_eq!(own_script.authorizations()[1], None);

    // An org that set nothing gets the installation's provider, model and key.
    let outputs = run_in(&tool, plain, ask.clone()).await.unwrap();
    assert_eq!(outputs["provider"], "installation");
    assert_eq!(installation_script.requests()[1]["model"], "test-model");
    assert_eq!(
        installation_script.authorizations()[1],
        Some("Bearer sk-test-key".to_owned())
    );
    assert_eq!(own_script.hits(), 2);
    assert_eq!(installation_script.hits(), 2);
}

#[tokio::test]
async fn without_an_installation_provider_an_org_needs_its_own_and_bad_ones_are_named() {
    let (own, own_script) = start(vec![completion("fine", None, None)]).await;
    let (org, bare, broken) = (OrgId::new(), OrgId::new(), OrgId::new());
    let secrets = OrgSecrets(BTreeMap::from([
        ((org, ORG_BASE_URL_SECRET.to_owned()), own.clone()),
        ((org, ORG_MODEL_SECRET.to_owned()), "m".to_owned()),
        (
            (broken, ORG_BASE_URL_SECRET.to_owned()),
            "ftp://x/v1".to_owned(),
        ),
    ]));
    let tool = LlmTool::new(
        LlmPolicy {
            base_url: None,
            ..policy("http://127.0.0.1:9/v1")
        },
        http(clock()),
    )
    .with_org_secrets(Arc::new(secrets));
    let ask = json!({"prompt": "hi", "samples": 1});

    let error = run_in(&tool, bare, ask.clone()).await.unwrap_err();
    assert!(!error.retryable);
    assert!(
        error.message.contains("no LLM provider") && error.message.contains("LLM_BASE_URL"),
        "{}",
        error.message
    );
    let error = run_in(&tool, broken, ask.clone()).await.unwrap_err();
    assert!(
        error.message.contains("LLM_BASE_URL") && error.message.contains("http://"),
        "{}",
        error.message
    );
    let outputs = run_in(&tool, org, ask).await.unwrap();
    assert_eq!(outputs["answer"], "fine");
    assert_eq!(outputs["provider"], "org");
    assert_eq!(own_script.hits(), 1);
}

#[tokio::test]
async fn the_provider_port_answers_directly_through_the_adapter() {
    let (base, _script) = start(vec![
        completion("4", Some(&[-0.01]), Some((5, 1))),
        Reply::Json(200, json!({"unexpected": true})),
    ])
    .await;
    let provider = OpenAiProvider::new(
        http(clock()),
        OpenAiSettings {
            base_url: base,
            api_key: None,
            timeout: Duration::from_secs(10),
            max_body_bytes: 1 << 20,
            retry: RetryPolicy::none(),
        },
    )
    .unwrap();
    let harness = Harness::new().await;
    let request = ChatRequest::new(
        "test-model",
        vec![ChatMessage::new(ChatRole::User, "2 + 2?")],
    );
    let response = provider
        .chat(&request, harness.logs.as_ref())
        .await
        .unwrap();
    assert_eq!(response.content, "4");
    assert_eq!(response.usage.unwrap().total_tokens, 6);
    assert_eq!(response.logprobs.unwrap()[0].logprob, -0.01);
    assert_eq!(response.finish_reason.as_deref(), Some("stop"));
    // Each HTTP attempt is logged.
    let lines = harness.logs.of(LogStream::System);
    assert!(
        lines.iter().any(|line| line.contains("-> 200")),
        "{lines:?}"
    );

    let error = provider
        .chat(&request, harness.logs.as_ref())
        .await
        .unwrap_err();
    assert_eq!(error.kind, LlmErrorKind::Malformed);
    assert!(error.message.contains("choices[0]"), "{}", error.message);
}

#[test]
fn the_builtin_registry_has_the_llm_tool() {
    let registry = builtin_registry();
    let tool = registry.get("llm").expect("llm is registered");
    assert_eq!(tool.input_schema()["required"], json!(["prompt"]));
}
