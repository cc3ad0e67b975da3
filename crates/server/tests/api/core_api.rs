//! Pipelines, runs, artifacts, live events, health, the OpenAPI document, error shapes,
//! permissions and org isolation, against a real server.

use std::time::Duration;

use arches_core::identity::{AuditFilter, OrgRecord, Role};
use arches_core::{OrgId, RunId};
use futures::StreamExt;
use reqwest::Method;
use serde_json::{json, Value};

use crate::common::{status_and_json, TestServer};

const REPORT: &str = r#"
name: report
params:
  greeting:
    type: string
    default: hello
tasks:
  - id: write
    tool: shell
    with:
      command: "echo '{{ params.greeting }}, world' > out.txt; echo wrote the greeting"
      collect:
        - path: out.txt
          name: report/out.txt
          media_type: text/plain
  - id: shout
    tool: shell
    with:
      files:
        in.txt: write
      command: "tr a-z A-Z < in.txt > loud.txt"
      collect:
        - path: loud.txt
          name: report/loud.txt
          media_type: text/plain
"#;

const FLAKY: &str = r#"
name: flaky
params:
  fail_times:
    type: integer
    default: 1
tasks:
  - id: first
    tool: echo
    with:
      step: 1
  - id: second
    tool: echo
    depends_on: [first]
    with:
      fail: boom
      fail_times: "{{ params.fail_times }}"
  - id: third
    tool: echo
    depends_on: [second]
    with:
      step: 3
"#;

async fn create(server: &TestServer, token: &str, yaml: &str) -> Value {
    let (status, body) = server
        .send_yaml(token, Method::POST, "/api/v1/pipelines", yaml)
        .await;
    assert_eq!(status, 201, "{body}");
    body
}

#[tokio::test]
async fn health_openapi_and_docs_are_served() {
    let server = TestServer::start().await;
    let alive = server
        .client
        .get(server.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(alive.status(), 200);
    let ready = server
        .client
        .get(server.url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);

    let (status, doc) = status_and_json(
        server
            .client
            .get(server.url("/api/v1/openapi.json"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    for path in [
        "/api/v1/pipelines",
        "/api/v1/runs",
        "/api/v1/runs/{id}/retry",
        "/api/v1/artifacts/{id}/content",
        "/api/v1/events",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} is documented");
    }
    assert!(doc["components"]["schemas"].get("ApiErrorBody").is_some());

    let docs = server
        .client
        .get(server.url("/api/docs"))
        .send()
        .await
        .unwrap();
    assert_eq!(docs.status(), 200);
    assert!(docs.text().await.unwrap().contains("/api/v1/openapi.json"));
}

#[tokio::test]
async fn errors_have_one_json_shape() {
    let server = TestServer::start().await;
    let editor = server.token_for(Role::Editor).await;

    let (status, body) = server.get("", "/api/v1/runs").await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("unauthenticated"))
    );

    let (status, body) = server.get(&editor, "/api/v1/nowhere").await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));

    let (status, body) = server
        .get(&editor, &format!("/api/v1/runs/{}", RunId::new()))
        .await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));

    let malformed = server
        .client
        .post(server.url("/api/v1/runs"))
        .bearer_auth(&editor)
        .header("content-type", "application/json")
        .body("{\"pipeline\": ")
        .send()
        .await
        .unwrap();
    let (status, body) = status_and_json(malformed).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "bad_request");
    assert!(body["details"]["line"].is_number(), "{body}");

    let (status, body) = server
        .send_yaml(
            &editor,
            Method::POST,
            "/api/v1/pipelines",
            "name: broken\ntasks:\n  - id: a\n    tool: nope\n",
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["code"], "validation_failed");
    let diagnostic = &body["details"]["diagnostics"][0];
    assert_eq!(diagnostic["code"], "unknown_tool");
    assert_eq!(diagnostic["line"], 4);

    let (status, body) = server
        .post(&editor, "/api/v1/runs", &json!({"pipeline": "missing"}))
        .await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));
}

#[tokio::test]
async fn pipelines_are_created_versioned_listed_validated_and_archived() {
    let server = TestServer::start().await;
    let editor = server.token_for(Role::Editor).await;
    let viewer = server.token_for(Role::Viewer).await;

    let created = create(&server, &editor, REPORT).await;
    assert_eq!(
        (created["name"].as_str(), created["version"].as_u64()),
        (Some("report"), Some(1))
    );
    // The stored definition names the dependency the shell task's files imply.
    assert_eq!(
        created["definition"]["tasks"][1]["depends_on"],
        json!(["write"])
    );

    let (status, _) = server
        .send_yaml(
            &editor,
            Method::POST,
            "/api/v1/pipelines",
            &REPORT.replace("hello", "hi"),
        )
        .await;
    assert_eq!(status, 409, "creating an existing name is a conflict");
    let (status, updated) = server
        .send_yaml(
            &editor,
            Method::PUT,
            "/api/v1/pipelines/report",
            &REPORT.replace("hello", "hi"),
        )
        .await;
    assert_eq!((status, updated["version"].as_u64()), (200, Some(2)));
    let (status, body) = server
        .send_yaml(&editor, Method::PUT, "/api/v1/pipelines/other", REPORT)
        .await;
    assert_eq!(status, 422, "{body}");

    let (_, list) = server.get(&viewer, "/api/v1/pipelines").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert_eq!(list["items"][0]["version"], 2);
    let (_, versions) = server
        .get(&viewer, "/api/v1/pipelines/report/versions")
        .await;
    assert_eq!(versions["items"].as_array().unwrap().len(), 2);
    let (status, v1) = server
        .get(&viewer, "/api/v1/pipelines/report/versions/1")
        .await;
    assert_eq!(
        (status, v1["digest"].clone()),
        (200, created["digest"].clone())
    );

    let (status, report) = server
        .send_yaml(
            &viewer,
            Method::POST,
            "/api/v1/pipelines/validate",
            "name: x\ntasks: []\n",
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(report["valid"], false);
    assert!(!report["diagnostics"].as_array().unwrap().is_empty());

    let (status, body) = server
        .send_yaml(&viewer, Method::POST, "/api/v1/pipelines", REPORT)
        .await;
    assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")));

    let (status, archived) = server
        .post(&editor, "/api/v1/pipelines/report/archive", &json!({}))
        .await;
    assert_eq!(status, 200);
    assert!(archived["archived_at"].is_string());
    let (_, list) = server.get(&viewer, "/api/v1/pipelines").await;
    assert!(list["items"].as_array().unwrap().is_empty());
    let (status, _) = server
        .post(&editor, "/api/v1/runs", &json!({"pipeline": "report"}))
        .await;
    assert_eq!(status, 409, "an archived pipeline does not run");
    let (status, _) = server
        .post(&editor, "/api/v1/pipelines/report/unarchive", &json!({}))
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_run_is_triggered_followed_and_its_task_runs_logs_and_artifacts_are_served() {
    let server = TestServer::start().await;
    let editor = server.token_for(Role::Editor).await;
    create(&server, &editor, REPORT).await;

    let (status, body) = server
        .post(
            &editor,
            "/api/v1/runs",
            &json!({"pipeline": "report", "params": {"greting": "x"}}),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("did you mean"),
        "{body}"
    );

    // Subscribe to the live events before triggering, then follow the run to its end.
    let events = server
        .client
        .get(server.url("/api/v1/events?kinds=run"))
        .bearer_auth(&editor)
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 200);
    let mut events = events.bytes_stream();

    let (status, run) = server
        .post(
            &editor,
            "/api/v1/runs",
            &json!({"pipeline": "report", "params": {"greeting": "howdy"}}),
        )
        .await;
    assert_eq!(status, 201, "{run}");
    let run_id = run["id"].as_str().unwrap().to_owned();
    assert_eq!(run["params"]["greeting"], "howdy");

    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while !text.contains("\"state\":\"succeeded\"") {
            let chunk = events.next().await.expect("the stream stays open").unwrap();
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .expect("the run succeeds within a minute");
    assert!(text.contains(&run_id), "{text}");
    assert!(text.contains("event: run"), "{text}");
    assert!(
        text.contains("id: "),
        "events carry ids for Last-Event-ID: {text}"
    );
    assert_eq!(server.finished(&run_id).await, "succeeded");

    let (status, got) = server.get(&editor, &format!("/api/v1/runs/{run_id}")).await;
    assert_eq!((status, got["state"].as_str()), (200, Some("succeeded")));
    let (_, list) = server
        .get(&editor, "/api/v1/runs?pipeline=report&state=succeeded")
        .await;
    assert_eq!(list["items"][0]["id"], run_id.as_str());

    let (_, task_runs) = server
        .get(&editor, &format!("/api/v1/runs/{run_id}/task-runs"))
        .await;
    let task_runs = task_runs["items"].as_array().unwrap().clone();
    assert_eq!(task_runs.len(), 2);
    assert_eq!(task_runs[0]["task_id"], "write");
    assert_eq!(task_runs[0]["attempts"][0]["state"], "succeeded");

    let (_, logs) = server
        .get(&editor, &format!("/api/v1/runs/{run_id}/logs?task=write"))
        .await;
    let lines: Vec<&str> = logs["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["text"].as_str())
        .collect();
    assert!(lines.contains(&"wrote the greeting"), "{lines:?}");

    let (_, artifacts) = server
        .get(&editor, &format!("/api/v1/artifacts?run_id={run_id}"))
        .await;
    let artifacts = artifacts["items"].as_array().unwrap().clone();
    let loud = artifacts
        .iter()
        .find(|a| a["name"] == "report/loud.txt")
        .expect("the collected artifact is listed");
    let loud_id = loud["id"].as_str().unwrap();
    let content = server
        .client
        .get(server.url(&format!("/api/v1/artifacts/{loud_id}/content")))
        .bearer_auth(&editor)
        .send()
        .await
        .unwrap();
    assert_eq!(content.status(), 200);
    assert_eq!(content.headers()["content-type"], "text/plain");
    assert_eq!(content.text().await.unwrap(), "HOWDY, WORLD\n");
    let range = server
        .client
        .get(server.url(&format!("/api/v1/artifacts/{loud_id}/content")))
        .bearer_auth(&editor)
        .header("range", "bytes=0-4")
        .send()
        .await
        .unwrap();
    assert_eq!(range.status(), 206);
    assert_eq!(range.text().await.unwrap(), "HOWDY");
    let (status, body) = status_and_json(
        server
            .client
            .get(server.url(&format!("/api/v1/artifacts/{loud_id}/content")))
            .bearer_auth(&editor)
            .header("range", "bytes=500-600")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (416, Some("range_not_satisfiable"))
    );

    let (_, lineage) = server
        .get(&editor, &format!("/api/v1/artifacts/{loud_id}/lineage"))
        .await;
    assert_eq!(lineage["upstream"][0]["name"], "report/out.txt");
    assert_eq!(lineage["edges"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_failed_run_is_retried_from_its_failed_tasks_and_succeeded_tasks_are_kept() {
    let server = TestServer::start().await;
    let editor = server.token_for(Role::Editor).await;
    create(&server, &editor, FLAKY).await;
    let (_, run) = server
        .post(&editor, "/api/v1/runs", &json!({"pipeline": "flaky"}))
        .await;
    let run_id = run["id"].as_str().unwrap().to_owned();
    assert_eq!(server.finished(&run_id).await, "failed");
    let (_, before) = server
        .get(&editor, &format!("/api/v1/runs/{run_id}/task-runs"))
        .await;
    let first_before = before["items"][0].clone();
    assert_eq!(before["items"][1]["state"], "failed");
    assert_eq!(before["items"][2]["state"], "skipped");

    let (status, retried) = server
        .post(&editor, &format!("/api/v1/runs/{run_id}/retry"), &json!({}))
        .await;
    assert_eq!(status, 200, "{retried}");
    assert_eq!(server.finished(&run_id).await, "succeeded");
    let (_, after) = server
        .get(&editor, &format!("/api/v1/runs/{run_id}/task-runs"))
        .await;
    assert_eq!(
        after["items"][0], first_before,
        "the succeeded task run is kept as it was"
    );
    assert_eq!(after["items"][1]["state"], "succeeded");
    assert_eq!(
        after["items"][1]["attempt"], 2,
        "attempt numbers keep counting"
    );
    assert_eq!(after["items"][2]["state"], "succeeded");

    let (status, _) = server
        .post(&editor, &format!("/api/v1/runs/{run_id}/retry"), &json!({}))
        .await;
    assert_eq!(status, 409, "a succeeded run is not retried");
}

#[tokio::test]
async fn a_running_run_is_cancelled() {
    let server = TestServer::start().await;
    let editor = server.token_for(Role::Editor).await;
    create(
        &server,
        &editor,
        "name: slow\ntasks:\n  - id: wait\n    tool: shell\n    with:\n      command: \"echo started; sleep 30\"\n",
    )
    .await;
    let mut events = server.state.bus.subscribe(None);
    let (_, run) = server
        .post(&editor, "/api/v1/runs", &json!({"pipeline": "slow"}))
        .await;
    let run_id = run["id"].as_str().unwrap().to_owned();
    // Wait until the task is running (its first log line is published).
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Some(arches_engine::bus::Delivery::Event(e)) = events.next().await {
                if e.event.kind() == "log" && e.event.run_id().to_string() == run_id {
                    break;
                }
            }
        }
    })
    .await
    .expect("the task starts");
    let viewer = server.token_for(Role::Viewer).await;
    let (status, _) = server
        .post(
            &viewer,
            &format!("/api/v1/runs/{run_id}/cancel"),
            &json!({}),
        )
        .await;
    assert_eq!(status, 403, "a viewer cannot cancel");
    let (status, cancelled) = server
        .post(
            &editor,
            &format!("/api/v1/runs/{run_id}/cancel"),
            &json!({}),
        )
        .await;
    assert_eq!(status, 200, "{cancelled}");
    assert_eq!(server.finished(&run_id).await, "cancelled");
    let (status, _) = server
        .post(
            &editor,
            &format!("/api/v1/runs/{run_id}/cancel"),
            &json!({}),
        )
        .await;
    assert_eq!(status, 409, "an ended run cannot be cancelled again");
}

#[tokio::test]
async fn live_events_resume_after_the_last_event_id() {
    let server = TestServer::start().await;
    let editor = server.token_for(Role::Editor).await;
    create(&server, &editor, FLAKY).await;
    let live = server
        .client
        .get(server.url("/api/v1/events?kinds=run"))
        .bearer_auth(&editor)
        .send()
        .await
        .unwrap();
    let mut live = live.bytes_stream();
    let (_, run) = server
        .post(
            &editor,
            "/api/v1/runs",
            &json!({"pipeline": "flaky", "params": {"fail_times": 0}}),
        )
        .await;
    let run_id = run["id"].as_str().unwrap().to_owned();
    // The first event's id, then the watcher goes away.
    let mut text = String::new();
    let first = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let chunk = live.next().await.unwrap().unwrap();
            text.push_str(&String::from_utf8_lossy(&chunk));
            if let Some(line) = text.lines().find(|l| l.starts_with("id: ")) {
                if text.contains("\n\n") {
                    return line.trim_start_matches("id: ").to_owned();
                }
            }
        }
    })
    .await
    .expect("a first event");
    drop(live);
    assert_eq!(server.finished(&run_id).await, "succeeded");

    // Resuming replays what came after, in order, once each.
    let response = server
        .client
        .get(server.url(&format!("/api/v1/events?run_id={run_id}&kinds=run")))
        .bearer_auth(&editor)
        .header("last-event-id", &first)
        .send()
        .await
        .unwrap();
    let mut stream = response.bytes_stream();
    let mut replay = String::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while !replay.contains("\"state\":\"succeeded\"") {
            let chunk = stream.next().await.unwrap().unwrap();
            replay.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .expect("the replay reaches the end of the run");
    assert!(
        !replay.contains(&format!("id: {first}\n")),
        "the last seen event is not replayed: {replay}"
    );
    assert!(
        !replay.contains("\"state\":\"running\""),
        "the first event (the run starting) was seen before: {replay}"
    );
    assert_eq!(replay.matches("\"state\":\"succeeded\"").count(), 1);

    let (status, body) = server.get(&editor, "/api/v1/events?kinds=nonsense").await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = server
        .get(&editor, "/api/v1/events?last_event_id=garbage")
        .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn orgs_are_isolated_and_writes_are_audited() {
    let server = TestServer::start().await;
    let editor = server.token_for(Role::Editor).await;
    create(&server, &editor, FLAKY).await;
    let (_, run) = server
        .post(
            &editor,
            "/api/v1/runs",
            &json!({"pipeline": "flaky", "params": {"fail_times": 0}}),
        )
        .await;
    let run_id = run["id"].as_str().unwrap().to_owned();
    server.finished(&run_id).await;

    let other = OrgId::new();
    let now = server.state.clock.now();
    let stranger = {
        // A second org with its own owner.
        let (_, user) = server.token_in(OrgId::DEFAULT, Role::Viewer).await;
        server
            .state
            .identity
            .create_org(
                &OrgRecord {
                    id: other,
                    slug: "other".into(),
                    name: "Other".into(),
                    created_at: now,
                },
                user,
            )
            .await
            .unwrap();
        server.token_in(other, Role::Editor).await.0
    };
    let (status, _) = server
        .get(&stranger, &format!("/api/v1/runs/{run_id}"))
        .await;
    assert_eq!(status, 404, "another org's run does not exist for this org");
    let (_, runs) = server.get(&stranger, "/api/v1/runs").await;
    assert!(runs["items"].as_array().unwrap().is_empty());
    let (_, pipelines) = server.get(&stranger, "/api/v1/pipelines").await;
    assert!(pipelines["items"].as_array().unwrap().is_empty());
    let (status, _) = server
        .post(&stranger, "/api/v1/runs", &json!({"pipeline": "flaky"}))
        .await;
    assert_eq!(status, 404);

    let events = server
        .state
        .identity
        .audit_events(&AuditFilter {
            org_id: Some(OrgId::DEFAULT),
            ..AuditFilter::default()
        })
        .await
        .unwrap();
    let actions: Vec<&str> = events.iter().map(|e| e.event.action.as_str()).collect();
    assert!(actions.contains(&"pipelines.create"), "{actions:?}");
    assert!(actions.contains(&"runs.create"), "{actions:?}");
    let run_event = events
        .iter()
        .find(|e| e.event.action == "runs.create")
        .unwrap();
    assert_eq!(run_event.event.target_id.as_deref(), Some(run_id.as_str()));
    assert_eq!(run_event.event.outcome.as_str(), "success");
    assert!(run_event.event.request_id.is_some());
    assert_eq!(run_event.event.ip.as_deref(), Some("127.0.0.1"));
    let denied = server
        .state
        .identity
        .audit_events(&AuditFilter {
            org_id: Some(other),
            ..AuditFilter::default()
        })
        .await
        .unwrap();
    assert!(
        denied
            .iter()
            .any(|e| e.event.action == "runs.create" && e.event.outcome.as_str() == "failure"),
        "{denied:?}"
    );
}

/// A failed commit stops the scheduler; the supervisor rebuilds the engine from the store,
/// the interrupted run finishes, a trigger whose commit failed is refused with 503 and
/// leaves nothing behind, and triggers work again afterwards.
#[tokio::test]
async fn the_engine_is_rebuilt_after_a_failed_commit_and_runs_finish() {
    let failpoints = arches_engine::FailPoints::default();
    let server = TestServer::start_built_with(
        |_| {},
        arches_server::app::BuildOptions {
            failpoints: Some(failpoints.clone()),
            ..Default::default()
        },
    )
    .await;
    let slot = server.state.engine.clone().expect("workers are on");
    let editor = server.token_for(Role::Editor).await;
    create(&server, &editor, FLAKY).await;
    let trigger = json!({"pipeline": "flaky", "params": {"fail_times": 0}});

    // The trigger's commit answers the caller; the scheduler stops right after the next one,
    // in the middle of the run (three tasks in a chain need more than two commits).
    failpoints.fail_after_commit(2);
    let (status, run) = server.post(&editor, "/api/v1/runs", &trigger).await;
    assert_eq!(status, 201, "{run}");
    let run_id = run["id"].as_str().unwrap().to_owned();
    tokio::time::timeout(Duration::from_secs(30), slot.rebuilt(1))
        .await
        .expect("the engine is rebuilt");
    assert_eq!(server.finished(&run_id).await, "succeeded");
    let (_, task_runs) = server
        .get(&editor, &format!("/api/v1/runs/{run_id}/task-runs"))
        .await;
    let states: Vec<&str> = task_runs["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["succeeded", "succeeded", "succeeded"]);

    // A commit that fails before writing: the caller gets 503 with Retry-After, and no run
    // is stored.
    failpoints.fail_before_commit(1);
    let response = server
        .client
        .post(server.url("/api/v1/runs"))
        .bearer_auth(&editor)
        .json(&trigger)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "unavailable", "{body}");
    tokio::time::timeout(Duration::from_secs(30), slot.rebuilt(2))
        .await
        .expect("the engine is rebuilt again");
    let (_, runs) = server.get(&editor, "/api/v1/runs").await;
    assert_eq!(
        runs["items"].as_array().unwrap().len(),
        1,
        "the refused trigger left no run: {runs}"
    );

    let (status, run) = server.post(&editor, "/api/v1/runs", &trigger).await;
    assert_eq!(status, 201, "{run}");
    assert_eq!(
        server.finished(run["id"].as_str().unwrap()).await,
        "succeeded"
    );
    assert_eq!(slot.generation(), 2);
}

/// The `http` tool reaches only the hosts `[tools.http] allowed_hosts` lists, and its
/// per-host circuit breaker shows on `/metrics`.
#[tokio::test]
async fn the_http_tool_obeys_the_allowed_hosts_and_its_breaker_is_a_metric() {
    // A real upstream that always fails.
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_address = upstream.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/flaky",
        axum::routing::get(|| async { (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "down") }),
    );
    tokio::spawn(async move { axum::serve(upstream, app).await });

    let server = TestServer::start_with(|config| {
        config.tools.http.allowed_hosts = vec![format!("127.0.0.1:{}", upstream_address.port())];
        config.tools.http.breaker_failures = 1;
    })
    .await;
    let editor = server.token_for(Role::Editor).await;
    create(
        &server,
        &editor,
        r#"
name: calls
params:
  url:
    type: string
tasks:
  - id: call
    tool: http
    with:
      url: "{{ params.url }}"
      retry:
        max_attempts: 1
"#,
    )
    .await;

    let trigger = |url: String| json!({"pipeline": "calls", "params": {"url": url}});
    let (_, run) = server
        .post(
            &editor,
            "/api/v1/runs",
            &trigger(format!("http://{upstream_address}/flaky")),
        )
        .await;
    let run_id = run["id"].as_str().unwrap().to_owned();
    assert_eq!(server.finished(&run_id).await, "failed");
    let (_, task_runs) = server
        .get(&editor, &format!("/api/v1/runs/{run_id}/task-runs"))
        .await;
    let error = task_runs["items"][0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("500"), "{task_runs}");

    let metrics = server
        .client
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = format!(
        "arches_http_tool_breaker_state{{host=\"127.0.0.1:{}\"}} 1",
        upstream_address.port()
    );
    assert!(metrics.contains(&series), "no {series} in:\n{metrics}");

    // Another port of the same machine is not listed: refused before any request.
    let (_, run) = server
        .post(
            &editor,
            "/api/v1/runs",
            &trigger("http://127.0.0.1:9/".to_owned()),
        )
        .await;
    let run_id = run["id"].as_str().unwrap().to_owned();
    assert_eq!(server.finished(&run_id).await, "failed");
    let (_, task_runs) = server
        .get(&editor, &format!("/api/v1/runs/{run_id}/task-runs"))
        .await;
    let error = task_runs["items"][0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("not in the tool's allowed hosts"),
        "{task_runs}"
    );
}

/// A failed run undoes its succeeded tasks (saga); the compensations are task runs of the
/// API like any other, and a compensated run is not retried.
#[tokio::test]
async fn a_failed_run_is_compensated_and_cannot_be_retried() {
    let server = TestServer::start().await;
    let editor = server.token_for(Role::Editor).await;
    create(
        &server,
        &editor,
        r#"
name: booking
tasks:
  - id: reserve
    tool: echo
    with:
      seat: 12
    compensate:
      tool: echo
      with:
        release: "{{ tasks.reserve.outputs.seat }}"
  - id: pay
    tool: echo
    depends_on: [reserve]
    with:
      fail: card declined
"#,
    )
    .await;
    let (_, run) = server
        .post(&editor, "/api/v1/runs", &json!({"pipeline": "booking"}))
        .await;
    let run_id = run["id"].as_str().unwrap().to_owned();
    assert_eq!(server.finished(&run_id).await, "failed");
    let (_, run) = server.get(&editor, &format!("/api/v1/runs/{run_id}")).await;
    assert!(
        run["error"]
            .as_str()
            .unwrap_or_default()
            .contains("1 compensation ran"),
        "{run}"
    );
    let (_, task_runs) = server
        .get(&editor, &format!("/api/v1/runs/{run_id}/task-runs"))
        .await;
    let undo = task_runs["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["task_id"] == "reserve__compensate")
        .unwrap_or_else(|| panic!("no compensation in {task_runs}"));
    assert_eq!(undo["state"], "succeeded");
    assert_eq!(undo["outputs"]["release"], 12);

    let (status, body) = server
        .post(&editor, &format!("/api/v1/runs/{run_id}/retry"), &json!({}))
        .await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("compensated"),
        "{body}"
    );
}
