//! End-to-end tests of the `arches` binary: real processes, a real SQLite file, real data.
//! One test binary for the whole CLI (see STYLE.md).

mod admin;
mod bad_input;
mod penguins;
mod remote;
mod resume;
mod scale_out;
mod serve;
mod triage;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// The repository root, where the examples live.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

/// An `arches` command with its home in `home`, run from the repository root, in local mode
/// whatever the environment says about servers.
pub fn arches(home: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_arches"));
    command
        .current_dir(repo_root())
        .env("ARCHES_HOME", home)
        .env_remove("ARCHES_SERVER")
        .env_remove("ARCHES_TOKEN")
        .env_remove("ARCHES_LOG")
        .env_remove("ARCHES_DATABASE_URL")
        .env_remove("ARCHES_STORE__DATABASE_URL");
    command
}

/// Runs a command and returns its output with stdout and stderr as text.
pub fn output(command: &mut Command) -> (Output, String, String) {
    let output = command.output().expect("arches runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output, stdout, stderr)
}

/// Writes a pipeline file into `dir` and returns its path.
pub fn pipeline_file(dir: &Path, name: &str, yaml: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, yaml).expect("pipeline written");
    path
}

/// Starts `arches serve` on a free loopback port; returns the process and its base URL, read
/// from the line it prints once it listens.
pub fn start_server(home: &Path) -> (Child, String) {
    start_server_with(home, &[])
}

/// [`start_server`] with extra environment variables (configuration such as
/// `ARCHES_SECRETS__KEYS`).
pub fn start_server_with(home: &Path, env: &[(&str, &str)]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_arches"))
        .current_dir(repo_root())
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "text"])
        .env("ARCHES_HOME", home)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("arches serve starts");
    let stderr = child.stderr.take().expect("stderr is piped");
    let mut lines = BufReader::new(stderr).lines();
    let base = loop {
        let line = lines
            .next()
            .expect("the server prints where it listens")
            .expect("stderr is text");
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest
                .split_whitespace()
                .next()
                .expect("an address")
                .to_owned();
        }
    };
    // Keep draining stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, base)
}

/// A response's status and JSON body (`null` when it has none).
pub async fn json_of(response: reqwest::Response) -> (u16, serde_json::Value) {
    let status = response.status().as_u16();
    (
        status,
        response.json().await.unwrap_or(serde_json::Value::Null),
    )
}

/// Signs the first account up on the server at `base`; its access token.
pub async fn signup(client: &reqwest::Client, base: &str) -> String {
    let (status, body) = json_of(
        client
            .post(format!("{base}/api/v1/auth/signup"))
            .json(&serde_json::json!({
                "email": "owner@example.test",
                "password": "correct horse battery staple",
                "display_name": "Owner"
            }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    body["access_token"].as_str().unwrap().to_owned()
}
