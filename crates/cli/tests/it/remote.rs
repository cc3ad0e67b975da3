//! The CLI against a real `arches serve`: log in, apply a pipeline, trigger and watch runs,
//! read logs and download an artifact, all through the `arches` binary as a user would; and
//! the errors of a refused token and of a server that is not there.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, ExitStatus, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use crate::{repo_root, start_server};

const EMAIL: &str = "owner@example.test";
const PASSWORD: &str = "correct horse battery staple 42";

/// A running `arches serve`, killed when dropped (also when a test fails half-way).
struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `arches serve` on a free loopback port with its home in `home`; its base URL is
/// read from the line it prints once it listens.
fn start(home: &Path) -> Server {
    let (child, base) = start_server(home);
    Server { child, base }
}

/// What an `arches` command did.
struct Outcome {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn assert_success(&self) -> &Self {
        assert!(
            self.status.success(),
            "{:?}\nstdout:\n{}\nstderr:\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }

    fn assert_clear_failure(&self) -> &Self {
        assert!(!self.status.success(), "{}", self.stdout);
        assert_eq!(self.status.code(), Some(1), "{}", self.stderr);
        assert!(self.stderr.starts_with("error: "), "{}", self.stderr);
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
        self
    }
}

/// Runs `arches ARGS` as a user of the config directory `config` (no home, server or token
/// from the environment), with `stdin` piped in, bounded in time.
async fn arches(config: &Path, args: &[&str], stdin: Option<&str>) -> Outcome {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_arches"));
    command
        .current_dir(repo_root())
        .args(args)
        .env("ARCHES_CONFIG_DIR", config)
        .env_remove("ARCHES_HOME")
        .env_remove("ARCHES_SERVER")
        .env_remove("ARCHES_TOKEN")
        .env_remove("ARCHES_LOG")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().expect("arches starts");
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(text.as_bytes())
            .await
            .expect("stdin written");
    }
    let output = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("arches {args:?} finishes within two minutes"))
        .expect("arches runs");
    Outcome {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The id in the summary's last line, `run <id> <state> in <duration>`.
fn summary_run_id(stdout: &str, state: &str) -> String {
    stdout
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix("run ")?;
            let (id, tail) = rest.split_once(' ')?;
            tail.starts_with(&format!("{state} in "))
                .then(|| id.to_owned())
        })
        .unwrap_or_else(|| panic!("a summary line `run <id> {state} in …`:\n{stdout}"))
}

#[tokio::test]
async fn the_cli_logs_in_applies_a_pipeline_and_follows_its_runs_on_a_server() {
    let home = tempfile::tempdir().unwrap();
    let config = tempfile::tempdir().unwrap();
    let config = config.path();
    let server = start(home.path());
    let base = server.base.as_str();
    let http = reqwest::Client::new();

    let signup = http
        .post(format!("{base}/api/v1/auth/signup"))
        .json(&json!({"email": EMAIL, "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(signup.status(), 201);

    // Log in once; later commands use the saved session and default server.
    let login = arches(
        config,
        &[
            "login",
            "--server",
            base,
            "--email",
            EMAIL,
            "--password-stdin",
        ],
        Some(&format!("{PASSWORD}\n")),
    )
    .await;
    login.assert_success();
    assert!(
        login
            .stdout
            .contains(&format!("logged in to {base} as {EMAIL}")),
        "{}",
        login.stdout
    );
    let saved = config.join("credentials.json");
    let mode = std::fs::metadata(&saved).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(
        !login.stdout.contains("eyJ") && !login.stderr.contains("eyJ"),
        "no token is printed"
    );

    let apply = arches(
        config,
        &["pipelines", "apply", "examples/penguins/pipeline.yaml"],
        None,
    )
    .await;
    apply.assert_success();
    assert!(
        apply.stdout.contains("pipeline penguins version 1 created"),
        "{}",
        apply.stdout
    );
    let again = arches(
        config,
        &["pipelines", "apply", "examples/penguins/pipeline.yaml"],
        None,
    )
    .await;
    assert!(
        again.stdout.contains("version 1 unchanged"),
        "{}",
        again.stdout
    );

    // Trigger and watch: the live display, then the summary, and exit 0 for a success.
    let watched = arches(config, &["runs", "trigger", "penguins", "--watch"], None).await;
    watched.assert_success();
    let run_id = summary_run_id(&watched.stdout, "succeeded");
    assert!(
        watched.stdout.contains("penguins/report.md"),
        "{}",
        watched.stdout
    );
    assert!(
        watched.stderr.contains("succeeded  report"),
        "{}",
        watched.stderr
    );

    // The task's output, stored and followed.
    let logs = arches(config, &["runs", "logs", &run_id, "report"], None).await;
    logs.assert_success();
    assert!(
        logs.stdout.contains("report #1 stdout | # Palmer penguins"),
        "{}",
        logs.stdout
    );
    let followed = arches(config, &["runs", "logs", &run_id, "--follow"], None).await;
    followed.assert_success();
    assert!(
        followed.stdout.contains("# Palmer penguins"),
        "{}",
        followed.stdout
    );

    let listed = arches(config, &["runs", "list"], None).await;
    listed.assert_success();
    assert!(listed.stdout.contains(&run_id), "{}", listed.stdout);

    // The artifact, downloaded: the same bytes as the server serves.
    let out = tempfile::tempdir().unwrap();
    let file = out.path().join("report.md");
    let get = arches(
        config,
        &[
            "artifacts",
            "get",
            "penguins/report.md",
            "-o",
            file.to_str().unwrap(),
        ],
        None,
    )
    .await;
    get.assert_success();
    let token = login_token(&http, base).await;
    let list: Value = http
        .get(format!("{base}/api/v1/artifacts?name=penguins/report.md"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = list["items"][0]["id"].as_str().expect("the artifact's id");
    let served = http
        .get(format!("{base}/api/v1/artifacts/{id}/content"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(std::fs::read(&file).unwrap(), served.to_vec());
    assert!(served.starts_with(b"# Palmer penguins"));

    // A run that fails: the watch says so and exits non-zero.
    let failed = arches(
        config,
        &[
            "runs",
            "trigger",
            "penguins",
            "-p",
            "data_dir=/nonexistent",
            "--watch",
            "--quiet",
        ],
        None,
    )
    .await;
    assert_eq!(failed.status.code(), Some(1), "{}", failed.stderr);
    summary_run_id(&failed.stdout, "failed");

    // A refused token: a clear error with a hint, no panic.
    let refused = arches(config, &["runs", "list", "--token", "not-a-token"], None).await;
    refused.assert_clear_failure();
    assert!(refused.stderr.contains("HTTP 401"), "{}", refused.stderr);
    assert!(
        refused.stderr.contains("arches login"),
        "{}",
        refused.stderr
    );

    // Logged out, the saved session is gone and the server refuses its token.
    let logout = arches(config, &["logout"], None).await;
    logout.assert_success();
    let after = arches(config, &["runs", "list", "--server", base], None).await;
    after.assert_clear_failure();
    assert!(after.stderr.contains("not logged in"), "{}", after.stderr);
}

/// A fresh login over HTTP, for the test's own requests.
async fn login_token(http: &reqwest::Client, base: &str) -> String {
    let answer: Value = http
        .post(format!("{base}/api/v1/auth/login"))
        .json(&json!({"email": EMAIL, "password": PASSWORD}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    answer["access_token"]
        .as_str()
        .expect("an access token")
        .to_owned()
}

#[tokio::test]
async fn a_server_that_is_not_there_is_a_clear_error_not_a_panic() {
    let config = tempfile::tempdir().unwrap();
    // A port that was free a moment ago and has no listener now.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = format!("127.0.0.1:{port}");
    let listed = arches(
        config.path(),
        &["runs", "list", "--server", &server, "--token", "ak_x"],
        None,
    )
    .await;
    listed.assert_clear_failure();
    assert!(
        listed
            .stderr
            .contains(&format!("cannot connect to http://{server}/api/v1/runs")),
        "{}",
        listed.stderr
    );
    let login = arches(
        config.path(),
        &[
            "login",
            "--server",
            &server,
            "--email",
            EMAIL,
            "--password-stdin",
        ],
        Some(&format!("{PASSWORD}\n")),
    )
    .await;
    login.assert_clear_failure();
    assert!(
        login.stderr.contains("cannot connect to"),
        "{}",
        login.stderr
    );
    assert!(!config.path().join("credentials.json").exists());
    // Without a server, the server-only commands say how to give one.
    let local = arches(
        config.path(),
        &["runs", "watch", "01a1ffbf-79eb-74e8-b28a-3b451fb0593c"],
        None,
    )
    .await;
    local.assert_clear_failure();
    assert!(local.stderr.contains("--server"), "{}", local.stderr);
}

#[tokio::test]
async fn the_cli_registers_a_wasm_tool_runs_it_and_keeps_secrets_out_of_sight() {
    let home = tempfile::tempdir().unwrap();
    let config = tempfile::tempdir().unwrap();
    let config = config.path();

    // A master key from `arches secrets keygen`, which needs no server.
    let keygen = arches(config, &["secrets", "keygen", "--id", "k9"], None).await;
    keygen.assert_success();
    let key = keygen.stdout.trim().to_owned();
    assert!(key.starts_with("k9:") && key.len() > 40, "{key}");

    let (child, base) =
        crate::start_server_with(home.path(), &[("ARCHES_SECRETS__KEYS", key.as_str())]);
    let server = Server { child, base };
    let base = server.base.as_str();
    let http = reqwest::Client::new();
    let signup = http
        .post(format!("{base}/api/v1/auth/signup"))
        .json(&json!({"email": EMAIL, "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(signup.status(), 201);
    arches(
        config,
        &[
            "login",
            "--server",
            base,
            "--email",
            EMAIL,
            "--password-stdin",
        ],
        Some(&format!("{PASSWORD}\n")),
    )
    .await
    .assert_success();

    // Register: the module file named in the manifest is uploaded first.
    let register = arches(
        config,
        &["tools", "register", "examples/tools/fib.tool.yaml"],
        None,
    )
    .await;
    register.assert_success();
    assert!(
        register.stdout.contains("tool fib version 1 registered"),
        "{}",
        register.stdout
    );
    assert!(
        register.stderr.contains("uploaded module"),
        "{}",
        register.stderr
    );
    let list = arches(config, &["tools", "list"], None).await;
    list.assert_success();
    let cells = |line: &str| -> Vec<String> {
        line.split(['│', '┆'])
            .map(|cell| cell.trim().to_owned())
            .filter(|cell| !cell.is_empty())
            .collect()
    };
    let fib_row = list
        .stdout
        .lines()
        .map(cells)
        .find(|row| row.first().is_some_and(|name| name == "fib"))
        .unwrap_or_else(|| panic!("a row for fib:\n{}", list.stdout));
    assert_eq!(fib_row[..4], ["fib", "wasm", "1", "wasm"], "{fib_row:?}");
    assert!(list.stdout.contains("shell"), "{}", list.stdout);
    let show = arches(config, &["tools", "show", "fib"], None).await;
    show.assert_success();
    assert!(show.stdout.contains("tool        fib@1"), "{}", show.stdout);
    assert!(show.stdout.contains("\"cpu_ms\": 2000"), "{}", show.stdout);

    // A manifest with problems: each printed with its pointer, exit code 2.
    let bad = config.join("bad.tool.yaml");
    std::fs::write(
        &bad,
        "name: shell\nimplementation:\n  http: {url: \"ftp://example.test/x\"}\n",
    )
    .unwrap();
    let refused = arches(config, &["tools", "register", bad.to_str().unwrap()], None).await;
    assert_eq!(refused.status.code(), Some(2), "{}", refused.stderr);
    assert!(refused.stderr.contains("/name: "), "{}", refused.stderr);
    assert!(
        refused.stderr.contains("/implementation/http/url: "),
        "{}",
        refused.stderr
    );

    // A pipeline naming the tool runs it in its WASM sandbox.
    arches(
        config,
        &["pipelines", "apply", "examples/tools/pipeline.yaml"],
        None,
    )
    .await
    .assert_success();
    let shown = arches(config, &["pipelines", "show", "tool-fib"], None).await;
    assert!(shown.stdout.contains("fib@1"), "{}", shown.stdout);
    let watched = arches(
        config,
        &["runs", "trigger", "tool-fib", "--param", "n=20", "--watch"],
        None,
    )
    .await;
    watched.assert_success();
    let run_id = summary_run_id(&watched.stdout, "succeeded");
    let token = login_token(&http, base).await;
    let task_runs: Value = http
        .get(format!("{base}/api/v1/runs/{run_id}/task-runs"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let report = task_runs["items"]
        .as_array()
        .unwrap_or_else(|| panic!("a page of task runs: {task_runs}"))
        .iter()
        .find(|t| t["task_id"] == "report")
        .expect("the report task run");
    assert_eq!(report["outputs"]["fib"], json!(6765), "{report}");

    // Secrets: the value goes in on stdin and never comes back.
    let value = "tok-8f2c9e1d-never-printed";
    let set = arches(
        config,
        &["secrets", "set", "API_TOKEN"],
        Some(&format!("{value}\n")),
    )
    .await;
    set.assert_success();
    assert!(
        set.stdout
            .contains("secret API_TOKEN version 1 sealed with key k9"),
        "{}",
        set.stdout
    );
    let listed = arches(config, &["secrets", "list"], None).await;
    listed.assert_success();
    assert!(listed.stdout.contains("API_TOKEN"), "{}", listed.stdout);
    assert!(!listed.stdout.contains(value), "{}", listed.stdout);
    let rotated = arches(config, &["secrets", "rotate"], None).await;
    rotated.assert_success();
    assert!(
        rotated.stdout.contains("0 re-sealed, 1 already were"),
        "{}",
        rotated.stdout
    );
    arches(config, &["secrets", "delete", "API_TOKEN"], None)
        .await
        .assert_success();
    let gone = arches(config, &["secrets", "delete", "API_TOKEN"], None).await;
    gone.assert_clear_failure();
}
