//! `arches serve` as a real process: sign up, create a pipeline, start a run, kill the server
//! with SIGKILL in the middle of the run, start it again on the same home, and watch the run
//! finish; then stop it with SIGTERM and see it exit cleanly.

use std::time::Duration;

use futures::StreamExt;
use serde_json::json;

use crate::{json_of, signup, start_server};

const SLOW: &str = "name: slow\ntasks:\n  - id: wait\n    tool: shell\n    with:\n      command: \"echo started; sleep 3; echo done\"\n  - id: after\n    tool: echo\n    depends_on: [wait]\n    with:\n      ok: true\n";

/// Waits for the run to reach a terminal state: subscribes to its events first, then reads
/// its state, so the end cannot slip between the two.
async fn run_end(client: &reqwest::Client, base: &str, token: &str, run_id: &str) -> String {
    let events = client
        .get(format!("{base}/api/v1/events?run_id={run_id}&kinds=run"))
        .bearer_auth(token)
        .send()
        .await
        .expect("the event stream opens");
    let (_, run) = json_of(
        client
            .get(format!("{base}/api/v1/runs/{run_id}"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    let state = run["state"].as_str().unwrap_or_default().to_owned();
    if ["succeeded", "failed", "cancelled"].contains(&state.as_str()) {
        return state;
    }
    let mut stream = events.bytes_stream();
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let chunk = stream.next().await.expect("open").expect("readable");
            text.push_str(&String::from_utf8_lossy(&chunk));
            for state in ["succeeded", "failed", "cancelled"] {
                if text.contains(&format!("\"state\":\"{state}\"")) {
                    return state.to_owned();
                }
            }
        }
    })
    .await
    .expect("the run ends within a minute")
}

#[tokio::test]
async fn a_run_survives_a_killed_server_and_the_server_stops_cleanly_on_sigterm() {
    let home = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let (mut server, base) = start_server(home.path());

    let token = signup(&client, &base).await;

    let (status, created) = json_of(
        client
            .post(format!("{base}/api/v1/pipelines"))
            .bearer_auth(&token)
            .header("content-type", "application/yaml")
            .body(SLOW)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 201, "{created}");

    // Watch the run's log lines, start it, and kill the server once the task has started.
    let logs = client
        .get(format!("{base}/api/v1/events?kinds=log"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let (status, run) = json_of(
        client
            .post(format!("{base}/api/v1/runs"))
            .bearer_auth(&token)
            .json(&json!({"pipeline": "slow"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 201, "{run}");
    let run_id = run["id"].as_str().unwrap().to_owned();
    let mut logs = logs.bytes_stream();
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while !text.contains("started") {
            let chunk = logs.next().await.expect("open").expect("readable");
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .expect("the task starts");
    server.kill().expect("SIGKILL");
    server.wait().expect("the server is gone");

    // The same home again: the run is resumed and finishes; the interrupted attempt is
    // recorded as a lost lease.
    let (mut server, base) = start_server(home.path());
    assert_eq!(run_end(&client, &base, &token, &run_id).await, "succeeded");
    let (_, task_runs) = json_of(
        client
            .get(format!("{base}/api/v1/runs/{run_id}/task-runs"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    let wait = &task_runs["items"][0];
    assert_eq!(wait["task_id"], "wait");
    let attempts: Vec<&str> = wait["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["state"].as_str().unwrap())
        .collect();
    assert_eq!(attempts, vec!["lease_expired", "succeeded"]);

    // SIGTERM: a graceful stop, exit status 0.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let status = server.wait().expect("the server exits");
    assert!(status.success(), "{status:?}");
}
