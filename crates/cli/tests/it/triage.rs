//! The triage example end to end: `arches serve` with its `llm` tool pointed at a scripted
//! OpenAI-compatible server on a real socket, `examples/triage/pipeline.yaml` identifying
//! penguins from the real data set, the unsure answers waiting in the validation queue, and
//! a reviewer working the queue with `arches reviews` until the run succeeds.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use crate::{json_of, repo_root, start_server_with};

/// The scripted model's rule: deep short bills are Adelie, shallow ones Gentoo, both said
/// with 0.97 confidence; anything else is "Chinstrap" with 0.45. When a reviewer's comment
/// names a species (`It is a Chinstrap`), that species with 0.95.
fn answer(prompt: &str) -> (String, f64) {
    if let Some(rest) = prompt.split("It is a ").nth(1) {
        let species: String = rest.chars().take_while(|c| c.is_alphabetic()).collect();
        return (species, 0.95);
    }
    let words: Vec<&str> = prompt.split_whitespace().collect();
    let after = |word: &str| -> f64 {
        let i = words
            .iter()
            .position(|w| *w == word)
            .expect("the prompt names the bill");
        words[i + 1].parse().expect("a measure")
    };
    let (length, depth) = (after("bill"), after("and"));
    if depth >= 17.5 && length < 43.0 {
        ("Adelie".into(), 0.97)
    } else if depth < 16.0 {
        ("Gentoo".into(), 0.97)
    } else {
        ("Chinstrap".into(), 0.45)
    }
}

/// Serves chat completions on `listener` by [`answer`], one request per connection, and
/// records every prompt.
async fn scripted_llm(listener: TcpListener, prompts: Arc<Mutex<Vec<String>>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let prompts = prompts.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stream);
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                let line = line.trim_end();
                if line.is_empty() {
                    break;
                }
                if let Some((name, value)) = line.split_once(':') {
                    if name.eq_ignore_ascii_case("content-length") {
                        length = value.trim().parse().unwrap_or(0);
                    }
                }
            }
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).await.is_err() {
                return;
            }
            let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let prompt = request["messages"]
                .as_array()
                .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
                .and_then(|m| m["content"].as_str())
                .unwrap_or_default()
                .to_owned();
            prompts.lock().unwrap().push(prompt.clone());
            let (species, confidence) = answer(&prompt);
            let content = json!({"species": species, "why": format!("bill shape of a {species}")});
            let reply = json!({
                "id": "chatcmpl-triage",
                "object": "chat.completion",
                "created": 1_700_000_000,
                "model": "scripted-biologist",
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": content.to_string()},
                    "logprobs": {"content": [{"token": species, "logprob": f64::ln(confidence), "top_logprobs": []}]},
                    "finish_reason": "stop"
                }],
                "usage": {"prompt_tokens": 60, "completion_tokens": 12, "total_tokens": 72}
            })
            .to_string();
            let mut stream = reader.into_inner();
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                reply.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(reply.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// The birds of the example's sample (every 29th with both bill measures), with their
/// labelled species and the scripted answer.
fn sample() -> Vec<(usize, String, (String, f64))> {
    let text = std::fs::read_to_string(repo_root().join("examples/penguins/data/penguins.csv"))
        .expect("the data set");
    let mut lines = text.lines();
    lines.next();
    lines
        .filter_map(|line| {
            let f: Vec<&str> = line.split(',').collect();
            let (length, depth): (f64, f64) = (f[2].parse().ok()?, f[3].parse().ok()?);
            Some((f[0].to_owned(), length, depth))
        })
        .enumerate()
        .filter(|(i, _)| (i + 1) % 29 == 1)
        .map(|(i, (species, length, depth))| {
            let prompt = format!("bill {length} mm long and {depth} mm deep");
            (i + 1, species, answer(&prompt))
        })
        .collect()
}

/// Runs `arches ARGS` against the server with a token; its stdout.
async fn arches(base: &str, token: &str, config: &std::path::Path, args: &[&str]) -> String {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_arches"))
        .current_dir(repo_root())
        .args(args)
        .env("ARCHES_SERVER", base)
        .env("ARCHES_TOKEN", token)
        .env("ARCHES_CONFIG_DIR", config)
        .env_remove("ARCHES_HOME")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), output)
        .await
        .expect("arches finishes within two minutes")
        .expect("arches runs");
    assert!(
        output.status.success(),
        "arches {args:?}: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn a_reviewer_works_the_triage_queue_with_the_cli_until_the_run_succeeds() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let llm = format!("http://{}/v1", listener.local_addr().unwrap());
    let prompts = Arc::new(Mutex::new(Vec::new()));
    tokio::spawn(scripted_llm(listener, prompts.clone()));
    let home = tempfile::tempdir().unwrap();
    let config = tempfile::tempdir().unwrap();
    let (mut server, base) = start_server_with(
        home.path(),
        &[
            ("ARCHES_TOOLS__LLM__BASE_URL", llm.as_str()),
            ("ARCHES_TOOLS__LLM__MODEL", "scripted-biologist"),
            ("ARCHES_TOOLS__HTTP__ALLOWED_HOSTS", "127.0.0.1"),
        ],
    );
    let http = reqwest::Client::new();
    let token = crate::signup(&http, &base).await;
    let cli = |args: &'static [&'static str]| arches(&base, &token, config.path(), args);

    let birds = sample();
    let unsure: Vec<&(usize, String, (String, f64))> =
        birds.iter().filter(|(_, _, (_, c))| *c < 0.7).collect();
    assert!(
        unsure.len() >= 3,
        "the sample holds unsure answers: {birds:?}"
    );
    assert!(unsure.iter().any(|(_, truth, (said, _))| truth != said));
    // The last unsure bird whose answer is right gets a rejection with a hint.
    let hinted = unsure
        .iter()
        .rev()
        .find(|(_, truth, (said, _))| truth == said)
        .map(|(n, _, _)| *n)
        .expect("a right but unsure answer");

    cli(&["pipelines", "apply", "examples/triage/pipeline.yaml"]).await;
    let mut events = http
        .get(format!("{base}/api/v1/events?kinds=review"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .bytes_stream();
    let run_id = cli(&["runs", "trigger", "triage"]).await.trim().to_owned();

    // Every unsure answer enters the queue (its task run waits); the sure ones are applied.
    let mut seen = String::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while seen.matches("\"kind\":\"confidence\"").count() < unsure.len() {
            let chunk = events.next().await.expect("the stream stays open").unwrap();
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .expect("the unsure answers enter the queue");
    let listed = arches(
        &base,
        &token,
        config.path(),
        &[
            "reviews",
            "list",
            "--pipeline",
            "triage",
            "--kind",
            "confidence",
            "--json",
        ],
    )
    .await;
    let items: Vec<Value> = listed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(items.len(), unsure.len(), "{listed}");
    let table = arches(
        &base,
        &token,
        config.path(),
        &["reviews", "list", "--pipeline", "triage"],
    )
    .await;
    assert!(table.contains("0.450"), "{table}");

    // The reviewer looks at each: the preview shows the question, the answer and the why.
    for item in &items {
        let id = item["id"].as_str().unwrap();
        let shown: Value = serde_json::from_str(
            &arches(&base, &token, config.path(), &["reviews", "show", id]).await,
        )
        .unwrap();
        let prompt = shown["inputs"]["prompt"].as_str().unwrap();
        let number: usize = prompt
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .expect("the prompt names the bird");
        let (_, truth, (said, _)) = unsure
            .iter()
            .find(|(n, _, _)| *n == number)
            .expect("an unsure bird");
        assert_eq!(shown["proposed"]["answer"]["species"], json!(said));
        assert_eq!(shown["rationale"], json!(format!("bill shape of a {said}")));
        assert!(shown["inputs"]["prompt"]
            .as_str()
            .unwrap()
            .contains("Which species"));
        arches(&base, &token, config.path(), &["reviews", "claim", id]).await;
        if truth != said {
            // Wrong: the reviewer corrects it.
            let mut fixed = shown["proposed"].clone();
            fixed["answer"]["species"] = json!(truth);
            let file = home.path().join(format!("{id}.json"));
            std::fs::write(&file, fixed.to_string()).unwrap();
            let out = arches(
                &base,
                &token,
                config.path(),
                &["reviews", "approve", id, "--edit", file.to_str().unwrap()],
            )
            .await;
            assert!(out.contains("is approved"), "{out}");
        } else if number == hinted {
            // Right, but the reviewer asks again with a hint: the question runs again.
            let comment = format!("It is a {truth}, look at the bill depth");
            let out = arches(
                &base,
                &token,
                config.path(),
                &["reviews", "reject", id, "--comment", &comment],
            )
            .await;
            assert!(out.contains("is rejected"), "{out}");
        } else {
            let out = arches(&base, &token, config.path(), &["reviews", "approve", id]).await;
            assert!(out.contains("is approved"), "{out}");
        }
    }

    // The run finishes with every bird identified right.
    let watched = arches(&base, &token, config.path(), &["runs", "watch", &run_id]).await;
    assert!(watched.contains("succeeded"), "{watched}");
    let (status, task_runs) = json_of(
        http.get(format!("{base}/api/v1/runs/{run_id}/task-runs"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    let tally = task_runs["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["task_id"] == "tally")
        .expect("the tally ran");
    let truths: Vec<&str> = birds.iter().map(|(_, s, _)| s.as_str()).collect();
    assert_eq!(tally["outputs"]["species"], json!(truths));
    assert!(
        prompts
            .lock()
            .unwrap()
            .iter()
            .any(|p| p.contains("A reviewer rejected")),
        "the rejected question was asked again with the reviewer's comment"
    );
    let calibration = arches(
        &base,
        &token,
        config.path(),
        &["reviews", "calibration", "triage"],
    )
    .await;
    assert!(calibration.contains("identify"), "{calibration}");
    let _ = server.kill();
    let _ = server.wait();
}
