//! Full-text search over run logs (`GET /api/v1/logs/search`) against a real server: a real
//! run's shell task logs, found by their words, filtered, scoped by org, with its bad
//! parameters named, and described in the OpenAPI document.

use arches_core::identity::{OrgRecord, Role};
use arches_core::OrgId;
use reqwest::Method;
use serde_json::{json, Value};

use crate::common::TestServer;

const CHATTY: &str = r#"
name: chatty
tasks:
  - id: fetch
    tool: shell
    with:
      command: "echo 'fetching rows from warehouse-7'; echo 'ERROR: Connection_Refused by db-host' >&2; echo done"
  - id: report
    tool: shell
    depends_on: [fetch]
    with:
      command: "echo 'report built from warehouse rows'"
"#;

fn texts(body: &Value) -> Vec<String> {
    body["hits"]
        .as_array()
        .unwrap_or_else(|| panic!("hits: {body}"))
        .iter()
        .map(|hit| hit["text"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test]
async fn a_runs_task_logs_are_found_by_their_words_within_the_org_only() {
    let server = TestServer::start().await;
    let editor = server.token_for(Role::Editor).await;
    let viewer = server.token_for(Role::Viewer).await;
    let (status, body) = server
        .send_yaml(&editor, Method::POST, "/api/v1/pipelines", CHATTY)
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, run) = server
        .post(&editor, "/api/v1/runs", &json!({"pipeline": "chatty"}))
        .await;
    assert_eq!(status, 201, "{run}");
    let run_id = run["id"].as_str().unwrap().to_owned();
    assert_eq!(server.finished(&run_id).await, "succeeded");

    // A viewer may read logs, so a viewer may search them.
    let (status, body) = server
        .get(&viewer, "/api/v1/logs/search?q=connection_refused")
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(texts(&body), vec!["ERROR: Connection_Refused by db-host"]);
    let hit = &body["hits"][0];
    assert_eq!(hit["run_id"], run_id.as_str());
    assert_eq!(hit["task_id"], "fetch");
    assert_eq!(hit["stream"], "stderr");
    assert_eq!(hit["attempt"], 1);
    assert!(hit["score"].as_f64().is_some(), "{hit}");
    assert!(hit["seq"].as_i64().is_some_and(|seq| seq > 0), "{hit}");
    assert!(
        hit["task_run_id"].is_string() && hit["at"].is_string(),
        "{hit}"
    );

    let (_, body) = server
        .get(&viewer, "/api/v1/logs/search?q=warehouse%20rows")
        .await;
    let mut found = texts(&body);
    found.sort();
    assert_eq!(
        found,
        vec![
            "fetching rows from warehouse-7",
            "report built from warehouse rows"
        ],
        "every word, in any order"
    );
    let (_, body) = server
        .get(&viewer, "/api/v1/logs/search?q=%22warehouse%20rows%22")
        .await;
    assert_eq!(
        texts(&body),
        vec!["report built from warehouse rows"],
        "a quoted phrase"
    );
    let (_, body) = server
        .get(
            &viewer,
            &format!(
                "/api/v1/logs/search?q=warehouse&run_id={run_id}&task=fetch&stream=stdout&limit=5"
            ),
        )
        .await;
    assert_eq!(texts(&body), vec!["fetching rows from warehouse-7"]);
    let (_, body) = server
        .get(
            &viewer,
            "/api/v1/logs/search?q=warehouse&since=2999-01-01T00:00:00Z",
        )
        .await;
    assert_eq!(texts(&body), Vec::<String>::new());
    let (status, body) = server
        .get(
            &viewer,
            "/api/v1/logs/search?q=%22%20OR%20NEAR(%20*%20-x%20%27%20%5C",
        )
        .await;
    assert_eq!(status, 200, "operators are plain words: {body}");

    // Bad parameters are 400s that name the parameter.
    for (query, parameter) in [
        ("", "q"),
        ("q=", "q"),
        ("q=%22*%22", "q"),
        ("q=x&limit=0", "limit"),
        ("q=x&limit=1001", "limit"),
        ("q=x&stream=debug", "stream"),
        ("q=x&task=Not%20A%20Task", "task"),
        ("q=x&since=yesterday", "since"),
    ] {
        let (status, body) = server
            .get(&viewer, &format!("/api/v1/logs/search?{query}"))
            .await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["details"]["parameter"], parameter, "{query}: {body}");
    }

    // Another org sees none of these lines, and its members cannot name the run.
    let other = OrgId::new();
    let (_, owner) = server.token_in(OrgId::DEFAULT, Role::Viewer).await;
    server
        .state
        .identity
        .create_org(
            &OrgRecord {
                id: other,
                slug: "elsewhere".into(),
                name: "Elsewhere".into(),
                created_at: server.state.clock.now(),
            },
            owner,
        )
        .await
        .unwrap();
    let stranger = server.token_in(other, Role::Editor).await.0;
    let (status, body) = server
        .get(&stranger, "/api/v1/logs/search?q=warehouse")
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(texts(&body), Vec::<String>::new());
    let (status, _) = server
        .get(
            &stranger,
            &format!("/api/v1/logs/search?q=warehouse&run_id={run_id}"),
        )
        .await;
    assert_eq!(status, 404, "another org's run does not exist for this org");

    let (status, doc) = server.get(&viewer, "/api/v1/openapi.json").await;
    assert_eq!(status, 200);
    let operation = &doc["paths"]["/api/v1/logs/search"]["get"];
    assert!(operation.is_object(), "the route is documented");
    let parameters: Vec<&str> = operation["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    for name in ["q", "run_id", "task", "stream", "since", "until", "limit"] {
        assert!(parameters.contains(&name), "{name} in {parameters:?}");
    }
    assert!(doc["components"]["schemas"]["LogHitView"].is_object());
}
