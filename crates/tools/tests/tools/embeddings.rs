//! Tests of the OpenAI-compatible embeddings adapter against a scripted server (axum on
//! 127.0.0.1): each test scripts the server's replies to `POST /v1/embeddings`, in order, and
//! reads back the requests it received (a module of the `tools` test binary).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arches_core::embedding::{cosine, EmbeddingError, EmbeddingProvider};
use arches_core::retry::RetryPolicy;
use arches_core::time::{ManualClock, Timestamp};
use arches_tools::llm::{EmbeddingSettings, OpenAiEmbeddings};
use arches_tools::{ApiKey, BreakerSettings, BreakerState, HttpPolicy, HttpTool};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

/// What the server saw and what it will answer: scripted `(status, body)` replies in order,
/// then `fallback` (500 when `None`).
#[derive(Default)]
struct Script {
    replies: Mutex<VecDeque<(u16, Value)>>,
    fallback: Mutex<Option<(u16, Value)>>,
    requests: Mutex<Vec<(Value, Option<String>)>>,
}

impl Script {
    fn hits(&self) -> usize {
        self.requests.lock().unwrap().len()
    }
}

async fn embeddings(
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
    match next.or_else(|| script.fallback.lock().unwrap().clone()) {
        None => (StatusCode::INTERNAL_SERVER_ERROR, "script exhausted").into_response(),
        Some((status, body)) => (
            StatusCode::from_u16(status).unwrap(),
            [("content-type", "application/json")],
            body.to_string(),
        )
            .into_response(),
    }
}

/// A scripted server: its base URL (`http://127.0.0.1:<port>/v1`) and script.
async fn start(replies: Vec<(u16, Value)>) -> (String, Arc<Script>) {
    let script = Arc::new(Script {
        replies: Mutex::new(replies.into()),
        ..Script::default()
    });
    let app = Router::new()
        .route("/v1/embeddings", post(embeddings))
        .with_state(script.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://127.0.0.1:{port}/v1"), script)
}

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(Timestamp(1_700_000_000_000_000)))
}

/// An http tool allowed to reach 127.0.0.1, without rate limit, its breakers on `clock`
/// (opening after 2 failures, cooling down for a minute).
fn http(clock: Arc<ManualClock>) -> Arc<HttpTool> {
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

/// Model `embed-model` of 3 components, key `sk-embed-key`, 2 tries per request without
/// delay.
fn settings(base_url: &str) -> EmbeddingSettings {
    EmbeddingSettings {
        api_key: Some(ApiKey::new("sk-embed-key")),
        timeout: Duration::from_secs(10),
        retry: RetryPolicy {
            max_attempts: 2,
            initial_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(1),
            multiplier: 1.0,
            jitter: 0.0,
        },
        ..EmbeddingSettings::new(base_url, "embed-model", 3)
    }
}

fn provider(base_url: &str) -> OpenAiEmbeddings {
    OpenAiEmbeddings::new(http(clock()), settings(base_url)).unwrap()
}

/// An answer with `(index, vector)` items in the order given.
fn answer(items: &[(u64, [f64; 3])], prompt_tokens: Option<u64>) -> (u16, Value) {
    let data: Vec<Value> = items
        .iter()
        .map(|(index, vector)| json!({"object": "embedding", "index": index, "embedding": vector}))
        .collect();
    let mut body = json!({"object": "list", "data": data, "model": "embed-model-v2"});
    if let Some(tokens) = prompt_tokens {
        body["usage"] = json!({"prompt_tokens": tokens, "total_tokens": tokens});
    }
    (200, body)
}

fn texts(items: &[&str]) -> Vec<String> {
    items.iter().map(|text| text.to_string()).collect()
}

#[tokio::test]
async fn vectors_come_back_normalised_in_order_with_usage() {
    let (base, script) = start(vec![answer(
        &[(0, [3.0, 4.0, 0.0]), (1, [0.0, 0.0, 2.0])],
        Some(7),
    )])
    .await;
    let provider = provider(&base);
    assert_eq!(provider.endpoint().path(), "/v1/embeddings");
    let out = provider.embed(&texts(&["first", "second"])).await.unwrap();
    assert_eq!(out.vectors, vec![vec![0.6, 0.8, 0.0], vec![0.0, 0.0, 1.0]]);
    assert_eq!(out.model, "embed-model-v2");
    assert_eq!(out.dimension, 3);
    assert_eq!(out.tokens, Some(7));
    let (body, auth) = script.requests.lock().unwrap()[0].clone();
    assert_eq!(
        body,
        json!({"model": "embed-model", "input": ["first", "second"], "encoding_format": "float"})
    );
    assert_eq!(auth.as_deref(), Some("Bearer sk-embed-key"));
}

#[tokio::test]
async fn out_of_order_indices_are_put_in_the_order_of_the_texts() {
    let (base, _script) = start(vec![
        answer(
            &[
                (2, [0.0, 0.0, 1.0]),
                (0, [1.0, 0.0, 0.0]),
                (1, [0.0, 1.0, 0.0]),
            ],
            None,
        ),
        // An index twice, and one out of range.
        answer(&[(0, [1.0, 0.0, 0.0]), (0, [0.0, 1.0, 0.0])], None),
        answer(&[(0, [1.0, 0.0, 0.0]), (5, [0.0, 1.0, 0.0])], None),
    ])
    .await;
    let provider = provider(&base);
    let out = provider.embed(&texts(&["a", "b", "c"])).await.unwrap();
    assert_eq!(out.tokens, None);
    for (i, vector) in out.vectors.iter().enumerate() {
        let mut expected = vec![0.0f32; 3];
        expected[i] = 1.0;
        assert_eq!(vector, &expected);
    }
    let error = provider.embed(&texts(&["a", "b"])).await.unwrap_err();
    assert!(error.to_string().contains("answered twice"), "{error}");
    let error = provider.embed(&texts(&["a", "b"])).await.unwrap_err();
    assert!(error.to_string().contains("index 5"), "{error}");
}

#[tokio::test]
async fn a_wrong_count_dimension_or_number_is_a_permanent_error() {
    let (base, script) = start(vec![
        answer(&[(0, [1.0, 0.0, 0.0])], None),
        (
            200,
            json!({"data": [{"index": 0, "embedding": [1.0, 2.0]}]}),
        ),
        (
            200,
            json!({"data": [{"index": 0, "embedding": [1.0, "x", 2.0]}]}),
        ),
        (
            200,
            json!({"data": [{"index": 0, "embedding": [0.0, 0.0, 0.0]}]}),
        ),
        (200, json!({"data": [{"index": 0, "embedding": "AAAA"}]})),
        (200, json!({"error": {"message": "model not loaded"}})),
    ])
    .await;
    let provider = provider(&base);
    let cases = [
        (texts(&["a", "b"]), "1 embeddings for 2 texts"),
        (texts(&["a"]), "2 components, not the model's 3"),
        (texts(&["a"]), "not a finite number"),
        (texts(&["a"]), "all zeros"),
        (texts(&["a"]), "is a string"),
        (texts(&["a"]), "model not loaded"),
    ];
    for (input, expected) in cases {
        let error = provider.embed(&input).await.unwrap_err();
        assert!(matches!(error, EmbeddingError::Permanent(_)), "{error:?}");
        assert!(!error.retryable());
        assert!(error.to_string().contains(expected), "{error} / {expected}");
    }
    // Nothing is retried: one request per call.
    assert_eq!(script.hits(), 6);
}

#[tokio::test]
async fn bad_input_is_refused_before_sending() {
    let (base, script) = start(Vec::new()).await;
    let provider = OpenAiEmbeddings::new(
        http(clock()),
        EmbeddingSettings {
            max_batch: 2,
            max_text_bytes: 10,
            ..settings(&base)
        },
    )
    .unwrap();
    assert_eq!(
        provider.embed(&[]).await.unwrap_err(),
        EmbeddingError::EmptyBatch
    );
    assert!(matches!(
        provider.embed(&texts(&["a", "b", "c"])).await.unwrap_err(),
        EmbeddingError::BatchTooLarge { got: 3, max: 2 }
    ));
    assert!(matches!(
        provider
            .embed(&texts(&["a", "much too long"]))
            .await
            .unwrap_err(),
        EmbeddingError::TextTooLong { index: 1, .. }
    ));
    assert_eq!(script.hits(), 0);

    // A host the http tool does not allow: refused before sending.
    let elsewhere = OpenAiEmbeddings::new(
        Arc::new(HttpTool::new(HttpPolicy::allowing(["embed.internal"]))),
        settings(&base),
    )
    .unwrap();
    let error = elsewhere.embed(&texts(&["a"])).await.unwrap_err();
    assert!(matches!(error, EmbeddingError::Permanent(_)), "{error:?}");
    assert!(error.to_string().contains("allowed hosts"), "{error}");
    assert_eq!(script.hits(), 0);
}

#[tokio::test]
async fn a_failing_server_is_retried_then_its_circuit_opens() {
    let (base, script) = start(Vec::new()).await;
    *script.fallback.lock().unwrap() = Some((500, json!({"error": {"message": "overloaded"}})));
    let clock = clock();
    let http = http(clock.clone());
    let provider = OpenAiEmbeddings::new(http.clone(), settings(&base)).unwrap();

    let error = provider.embed(&texts(&["a"])).await.unwrap_err();
    assert!(error.retryable(), "{error:?}");
    assert!(error.to_string().contains("500"), "{error}");
    assert_eq!(script.hits(), 2, "one try and one retry");
    assert_eq!(http.breaker_states()[0].1, BreakerState::Open);

    // Open: refused without a request.
    let error = provider.embed(&texts(&["a"])).await.unwrap_err();
    assert!(error.retryable());
    assert!(error.to_string().contains("circuit open"), "{error}");
    assert_eq!(script.hits(), 2);

    // After the cool-down a probe goes through and, answered, closes the circuit.
    *script.fallback.lock().unwrap() = Some(answer(&[(0, [0.0, 2.0, 0.0])], Some(1)));
    clock.advance(Duration::from_secs(61));
    let out = provider.embed(&texts(&["a"])).await.unwrap();
    assert!((cosine(&out.vectors[0], &[0.0, 1.0, 0.0]) - 1.0).abs() < 1e-6);
    assert_eq!(http.breaker_states()[0].1, BreakerState::Closed);
}

#[tokio::test]
async fn a_refusal_is_permanent_and_never_shows_the_key() {
    let (base, _script) = start(vec![(
        401,
        json!({"error": {"message": "Incorrect API key provided: sk-embed-key"}}),
    )])
    .await;
    let provider = provider(&base);
    let error = provider.embed(&texts(&["a"])).await.unwrap_err();
    assert!(matches!(error, EmbeddingError::Permanent(_)), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("status 401"), "{message}");
    assert!(!message.contains("sk-embed-key"), "{message}");
    assert!(message.contains("***"), "{message}");
    assert!(!format!("{provider:?}").contains("sk-embed-key"));
}
