//! Search against a real server: a pipeline's `embed` task indexes real data with the local
//! model (`ARCHES_TEST_MINILM_DIR`), `/api/v1/search` finds it in every mode within the
//! caller's org only, bad queries get 400, and a `classify` task's confidence is routed like
//! any AI result.

use std::path::PathBuf;

use arches_core::identity::{OrgRecord, Role};
use arches_core::OrgId;
use arches_server::config::ServerConfig;
use reqwest::Method;
use serde_json::{json, Value};

use crate::common::TestServer;

fn model_dir() -> PathBuf {
    match std::env::var_os("ARCHES_TEST_MINILM_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => panic!(
            "ARCHES_TEST_MINILM_DIR is not set: run `export ARCHES_TEST_MINILM_DIR=\"$(scripts/fetch-model)\"`"
        ),
    }
}

fn configure(config: &mut ServerConfig) {
    config.search.model_dir = Some(model_dir());
}

const PIPELINE: &str = "
name: index-weather
tasks:
  - id: index
    tool: embed
    with:
      collection: weather
      texts:
        - {id: rain, text: 'Heavy rain all day with flooding in the streets', metadata: {kind: wet}}
        - {id: sun, text: 'A clear blue sky and warm sunshine until the evening', metadata: {kind: dry}}
        - {id: snow, text: 'Snowfall covered the city and the roads froze overnight', metadata: {kind: wet}}
        - {id: fog, text: 'Dense fog over the bay reduced visibility at dawn', metadata: {kind: dry}}
  - id: label
    tool: classify
    depends_on: [index]
    with:
      collection: weather
      label_field: kind
      k: 2
      text: 'a drizzle soaked the garden'
    review: {low: 0.2, high: 0.3, audit_rate: 0}
";

#[tokio::test]
async fn an_embed_task_indexes_and_the_search_api_finds_it_in_the_callers_org_only() {
    let server = TestServer::start_with(configure).await;
    let editor = server.token_for(Role::Editor).await;
    let (status, body) = server
        .send_yaml(&editor, Method::POST, "/api/v1/pipelines", PIPELINE)
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, run) = server
        .post(
            &editor,
            "/api/v1/runs",
            &json!({"pipeline": "index-weather"}),
        )
        .await;
    assert_eq!(status, 201, "{run}");
    let run_id = run["id"].as_str().unwrap();
    assert_eq!(server.finished(run_id).await, "succeeded");
    let (_, task_runs) = server
        .get(&editor, &format!("/api/v1/runs/{run_id}/task-runs"))
        .await;
    let label = task_runs["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["task_id"] == "label")
        .unwrap_or_else(|| panic!("{task_runs}"));
    assert_eq!(label["outputs"]["label"], "wet", "{label}");
    let confidence = label["outputs"]["confidence"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&confidence));

    let viewer = server.token_for(Role::Viewer).await;
    for mode in ["hybrid", "vector", "text"] {
        let q = if mode == "text" {
            "sunshine"
        } else {
            "a bright and cloudless day"
        };
        let (status, found) = server
            .get(
                &viewer,
                &format!(
                    "/api/v1/search?collection=weather&q={}&k=2&mode={mode}",
                    urlencode(q)
                ),
            )
            .await;
        assert_eq!(status, 200, "{found}");
        assert_eq!(found["mode"], mode);
        assert_eq!(found["model"], "all-MiniLM-L6-v2");
        assert_eq!(found["hits"][0]["id"], "sun", "{mode}: {found}");
        assert!(found["hits"][0]["text"]
            .as_str()
            .unwrap()
            .contains("sunshine"));
    }
    let filter = urlencode(r#"{"kind":"wet"}"#);
    let (_, found) = server
        .get(
            &viewer,
            &format!("/api/v1/search?collection=weather&q=sunshine&mode=vector&filter={filter}"),
        )
        .await;
    let ids: Vec<&str> = found["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{found}");
    assert!(ids.contains(&"rain") && ids.contains(&"snow"), "{found}");

    // Another org's member finds nothing in this org's collection.
    let other = OrgId::new();
    let (_, founder) = server.token_in(OrgId::DEFAULT, Role::Viewer).await;
    server
        .state
        .identity
        .create_org(
            &OrgRecord {
                id: other,
                slug: "other".into(),
                name: "Other".into(),
                created_at: server.state.clock.now(),
            },
            founder,
        )
        .await
        .unwrap();
    let (outsider, _) = server.token_in(other, Role::Editor).await;
    let (status, found) = server
        .get(&outsider, "/api/v1/search?collection=weather&q=rain")
        .await;
    assert_eq!(status, 200, "{found}");
    assert_eq!(found["hits"], json!([]));

    // Bad requests name their cause.
    for (query, expected) in [
        ("collection=Bad%20Name&q=x", "invalid collection name"),
        ("collection=weather&q=x&mode=fuzzy", "mode \"fuzzy\""),
        ("collection=weather&q=x&k=0", "k 0 is outside"),
        (
            "collection=weather&q=x&filter=%7Bnope",
            "filter is not JSON",
        ),
        ("collection=weather&q=%20", "the query is empty"),
    ] {
        let (status, body) = server
            .get(&viewer, &format!("/api/v1/search?{query}"))
            .await;
        assert_eq!(status, 400, "{query}: {body}");
        assert!(
            body["message"].as_str().unwrap().contains(expected),
            "{query}: {body}"
        );
    }
    let (status, _) = server
        .get("not-a-token", "/api/v1/search?collection=weather&q=x")
        .await;
    assert_eq!(status, 401);
    server.stop().await;
}

#[tokio::test]
async fn search_answers_503_when_it_is_turned_off() {
    let server = TestServer::start_with(|config| config.search.enabled = false).await;
    let viewer = server.token_for(Role::Viewer).await;
    let (status, body): (u16, Value) = server
        .get(&viewer, "/api/v1/search?collection=weather&q=rain")
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "unavailable");
    server.stop().await;
}

fn urlencode(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}
