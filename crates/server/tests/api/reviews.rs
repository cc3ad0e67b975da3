//! The validation queue over HTTP: a routed result waits, reviewers list, claim and decide
//! it (exactly one decision wins), the run continues, and the calibration is served.

use std::time::Duration;

use arches_core::events::DomainEvent;
use arches_core::identity::Role;
use arches_engine::bus::{BusEvent, Delivery};
use futures::StreamExt;
use reqwest::Method;
use serde_json::{json, Value};

use crate::common::TestServer;

/// An `echo` task routed by confidence: its result (its inputs) carries the confidence of
/// the run's param, then `after` uses it.
const ROUTED: &str = "\
name: routed
params:
  confidence: {type: number}
tasks:
  - id: label
    tool: echo
    with:
      answer: cat
      confidence: \"{{ params.confidence }}\"
    review: {low: 0.7, high: 0.9, audit_rate: 0}
  - id: after
    tool: echo
    with: {label: \"{{ tasks.label.outputs.answer }}\"}
";

async fn create(server: &TestServer, token: &str, yaml: &str) {
    let (status, body) = server
        .send_yaml(token, Method::POST, "/api/v1/pipelines", yaml)
        .await;
    assert_eq!(status, 201, "{body}");
}

/// Triggers a run and waits (on the bus, no polling) until its result enters the queue;
/// returns the run id.
async fn run_until_review(server: &TestServer, token: &str, confidence: f64) -> String {
    let mut events = server.state.bus.subscribe(None);
    let (status, run) = server
        .post(
            token,
            "/api/v1/runs",
            &json!({"pipeline": "routed", "params": {"confidence": confidence}}),
        )
        .await;
    assert_eq!(status, 201, "{run}");
    let run_id = run["id"].as_str().unwrap().to_owned();
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match events.next().await {
                Some(Delivery::Event(e)) => {
                    if let BusEvent::Domain(DomainEvent::ReviewRequested { run_id: r, .. }) =
                        &e.event
                    {
                        if r.to_string() == run_id {
                            break;
                        }
                    }
                }
                Some(_) => {}
                None => panic!("the event stream ended"),
            }
        }
    })
    .await
    .expect("the result enters the queue");
    run_id
}

fn only_item(page: &Value) -> Value {
    let items = page["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "{page}");
    items[0].clone()
}

#[tokio::test]
async fn a_waiting_result_is_listed_claimed_decided_once_and_its_run_continues() {
    let server = TestServer::start().await;
    let ana = server.token_for(Role::Editor).await;
    let bo = server.token_for(Role::Editor).await;
    let viewer = server.token_for(Role::Viewer).await;
    create(&server, &ana, ROUTED).await;
    let run_id = run_until_review(&server, &ana, 0.4).await;

    // Listed with its preview, for viewers too.
    let (status, page) = server
        .get(&viewer, &format!("/api/v1/reviews?run_id={run_id}"))
        .await;
    assert_eq!(status, 200, "{page}");
    let item = only_item(&page);
    assert_eq!(item["kind"], "confidence");
    assert_eq!(item["state"], "open");
    assert_eq!(item["task"], "label");
    assert_eq!(item["confidence"], json!(0.4));
    assert_eq!(
        item["proposed"],
        json!({"answer": "cat", "confidence": 0.4})
    );
    assert_eq!(item["inputs"]["answer"], "cat");
    assert_eq!(item["thresholds"]["low"], json!(0.7));
    let id = item["id"].as_str().unwrap().to_owned();
    let (status, shown) = server.get(&viewer, &format!("/api/v1/reviews/{id}")).await;
    assert_eq!((status, &shown["id"]), (200, &json!(id)));
    let (status, _) = server.get(&ana, "/api/v1/reviews?min_confidence=0.5").await;
    assert_eq!(status, 200);
    let (_, none) = server
        .get(
            &ana,
            &format!("/api/v1/reviews?run_id={run_id}&min_confidence=0.5"),
        )
        .await;
    assert!(none["items"].as_array().unwrap().is_empty());

    // A viewer may not decide; bad input is named.
    let decision = format!("/api/v1/reviews/{id}/decision");
    let (status, _) = server
        .post(&viewer, &decision, &json!({"verdict": "approve"}))
        .await;
    assert_eq!(status, 403);
    let (status, body) = server
        .post(&ana, &decision, &json!({"verdict": "maybe"}))
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["message"].as_str().unwrap().contains("verdict"));
    let (status, _) = server.get(&ana, "/api/v1/reviews?state=bogus").await;
    assert_eq!(status, 400);
    let (status, _) = server
        .post(
            &ana,
            &format!("/api/v1/reviews/{}/decision", arches_core::ReviewId::new()),
            &json!({"verdict": "approve"}),
        )
        .await;
    assert_eq!(status, 404);

    // Ana claims it: Bo can neither claim nor decide it while the claim holds.
    let claim = format!("/api/v1/reviews/{id}/claim");
    let (status, claimed) = server.post(&ana, &claim, &json!({"ttl_secs": 600})).await;
    assert_eq!(status, 200, "{claimed}");
    assert!(claimed["claimed_by"].is_string());
    let (status, body) = server.post(&bo, &claim, &json!({})).await;
    assert_eq!(status, 409, "{body}");
    let (status, _) = server
        .post(&bo, &decision, &json!({"verdict": "reject"}))
        .await;
    assert_eq!(status, 409);

    // Ana approves with an edit; the run continues with it.
    let (status, decided) = server
        .post(
            &ana,
            &decision,
            &json!({"verdict": "approve", "output": {"answer": "dog", "confidence": 1.0}, "comment": "ears"}),
        )
        .await;
    assert_eq!(status, 200, "{decided}");
    assert_eq!(decided["state"], "approved");
    assert_eq!(decided["votes"][0]["comment"], "ears");
    assert_eq!(server.finished(&run_id).await, "succeeded");
    let (_, task_runs) = server
        .get(&ana, &format!("/api/v1/runs/{run_id}/task-runs"))
        .await;
    let after = task_runs["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["task_id"] == "after")
        .cloned()
        .expect("the downstream task ran");
    assert_eq!(after["outputs"]["label"], "dog");

    // A decided item answers 409 to any later decision.
    let (status, _) = server
        .post(&ana, &decision, &json!({"verdict": "reject"}))
        .await;
    assert_eq!(status, 409);
}

#[tokio::test]
async fn concurrent_decisions_on_one_item_leave_exactly_one_winner() {
    let server = TestServer::start().await;
    let ana = server.token_for(Role::Editor).await;
    let bo = server.token_for(Role::Editor).await;
    create(&server, &ana, ROUTED).await;
    let run_id = run_until_review(&server, &ana, 0.2).await;
    let (_, page) = server
        .get(&ana, &format!("/api/v1/reviews?run_id={run_id}"))
        .await;
    let id = only_item(&page)["id"].as_str().unwrap().to_owned();
    let decision = format!("/api/v1/reviews/{id}/decision");
    let approve = json!({"verdict": "approve"});
    let reject = json!({"verdict": "reject", "comment": "no"});
    let (a, b) = tokio::join!(
        server.post(&ana, &decision, &approve),
        server.post(&bo, &decision, &reject),
    );
    let mut statuses = [a.0, b.0];
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 409], "{a:?} {b:?}");
    let winner = if a.0 == 200 { &a.1 } else { &b.1 };
    let expected = if winner["state"] == "approved" {
        "succeeded"
    } else {
        "failed"
    };
    assert_eq!(server.finished(&run_id).await, expected);
    let (_, item) = server.get(&ana, &format!("/api/v1/reviews/{id}")).await;
    assert_eq!(item["votes"].as_array().unwrap().len(), 1, "{item}");

    // The calibration of the routed task is served, and its decision counted in metrics.
    let (status, calibration) = server
        .get(&ana, "/api/v1/reviews/calibration?pipeline=routed")
        .await;
    assert_eq!(status, 200, "{calibration}");
    assert_eq!(calibration[0]["task"], "label");
    assert_eq!(calibration[0]["fixed"]["low"], json!(0.7));
    assert_eq!(calibration[0]["thresholds"]["calibrated"], json!(false));
    assert_eq!(calibration[0]["feedback"], json!(1.0));
    let (status, _) = server
        .get(
            &ana,
            "/api/v1/reviews/calibration?pipeline=routed&task=after",
        )
        .await;
    assert_eq!(status, 404, "`after` is not routed");
    let metrics = server
        .client
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("arches_review_decisions_total{state=\"approved\"} 1")
            || metrics.contains("arches_review_decisions_total{state=\"rejected\"} 1"),
        "{metrics}"
    );
}

/// An `approval` gate of two assignees (user ids).
const GATED: &str = "\
name: gated
tasks:
  - id: gate
    tool: approval
    with:
      message: ship it?
      assignees: [\"{{ params.a }}\", \"{{ params.b }}\"]
      quorum: 2
  - id: ship
    tool: echo
    depends_on: [gate]
params:
  a: {type: string}
  b: {type: string}
";

#[tokio::test]
async fn an_approval_gate_needs_its_quorum_of_assignees() {
    let server = TestServer::start().await;
    let (ana, ana_id) = server
        .token_in(arches_core::OrgId::DEFAULT, Role::Editor)
        .await;
    let (bo, bo_id) = server
        .token_in(arches_core::OrgId::DEFAULT, Role::Editor)
        .await;
    let eve = server.token_for(Role::Admin).await;
    create(&server, &ana, GATED).await;
    let mut events = server.state.bus.subscribe(None);
    let (status, run) = server
        .post(
            &ana,
            "/api/v1/runs",
            &json!({"pipeline": "gated", "params": {"a": ana_id.to_string(), "b": bo_id.to_string()}}),
        )
        .await;
    assert_eq!(status, 201, "{run}");
    let run_id = run["id"].as_str().unwrap().to_owned();
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match events.next().await {
                Some(Delivery::Event(e)) => {
                    if matches!(
                        &e.event,
                        BusEvent::Domain(DomainEvent::ReviewRequested { .. })
                    ) {
                        break;
                    }
                }
                Some(_) => {}
                None => panic!("the event stream ended"),
            }
        }
    })
    .await
    .expect("the gate opens");
    let (_, page) = server.get(&ana, "/api/v1/reviews?kind=approval").await;
    let item = only_item(&page);
    assert_eq!(
        (item["quorum"].as_u64(), item["message"].as_str()),
        (Some(2), Some("ship it?"))
    );
    let decision = format!("/api/v1/reviews/{}/decision", item["id"].as_str().unwrap());
    let approve = json!({"verdict": "approve"});
    let (status, body) = server.post(&eve, &decision, &approve).await;
    assert_eq!(status, 403, "not an assignee: {body}");
    let (status, body) = server.post(&ana, &decision, &approve).await;
    assert_eq!(
        (status, body["state"].as_str(), body["approvals"].as_u64()),
        (200, Some("open"), Some(1))
    );
    let (status, _) = server.post(&ana, &decision, &approve).await;
    assert_eq!(status, 409, "one vote per approver");
    let (status, body) = server.post(&bo, &decision, &approve).await;
    assert_eq!((status, body["state"].as_str()), (200, Some("approved")));
    assert_eq!(server.finished(&run_id).await, "succeeded");
}
