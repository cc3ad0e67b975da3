//! The org's tool registry and secrets against a real server: registering HTTP endpoints and
//! WASM modules as tools, running them in pipelines with their secrets masked, the problems
//! registration and pipeline validation report, the secrets API with key rotation across
//! restarts, and who may do what.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use arches_auth::sealing::MasterKey;
use arches_core::identity::Role;
use arches_server::config::{Secret, ServerConfig};
use reqwest::Method;
use serde_json::{json, Value};

use crate::common::TestServer;

/// The value of `GEO_KEY` in these tests.
const GEO_VALUE: &str = "s3cr3t-value-123";

/// A new master key's `id:base64` text.
fn master_key(id: &str) -> String {
    MasterKey::generate(id).expect("a master key").1
}

/// Sets the master keys (`id:base64`, comma-separated) and lets the `http` tool reach
/// 127.0.0.1 on any port.
fn configure(config: &mut ServerConfig, keys: Option<&str>) {
    config.secrets.keys = keys.map(Secret::new);
    config.tools.http.allowed_hosts = vec!["127.0.0.1".to_owned()];
}

/// An upstream on 127.0.0.1 answering `POST /greet {"name": n}` with
/// `{"greeting": "hi n", "auth": <its Authorization header>}`; the headers it received.
struct Greeter {
    address: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Greeter {
    async fn start() -> Greeter {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let app = axum::Router::new().route(
            "/greet",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, axum::Json(body): axum::Json<Value>| {
                    let record = record.clone();
                    async move {
                        let auth = headers
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned();
                        record.lock().unwrap().push(auth.clone());
                        axum::Json(json!({
                            "greeting": format!("hi {}", body["name"].as_str().unwrap_or("?")),
                            "auth": auth,
                        }))
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Greeter { address, seen }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    /// The manifest of tool `name`, calling this upstream with `secret` as a bearer token.
    fn manifest(&self, name: &str, secret: &str, description: &str) -> String {
        let port = self.address.port();
        format!(
            r#"
name: {name}
description: {description}
input_schema:
  type: object
  required: [name]
  properties:
    name: {{type: string}}
output_schema:
  type: object
  required: [greeting]
implementation:
  http:
    url: "http://127.0.0.1:{port}/greet"
    headers:
      Authorization: "Bearer {{{{ secrets.{secret} }}}}"
capabilities:
  hosts: ["127.0.0.1:{port}"]
  secrets: [{secret}]
  timeout: 10s
"#
        )
    }
}

/// A pipeline `name` with one task calling `tool` with `with: {name: world}`.
fn greet_pipeline(name: &str, tool: &str) -> String {
    format!(
        "name: {name}\ntasks:\n  - id: greet\n    tool: {tool}\n    retry:\n      max_attempts: 3\n    with:\n      name: world\n"
    )
}

async fn register(server: &TestServer, token: &str, manifest: &str) -> (u16, Value) {
    server
        .send_yaml(token, Method::POST, "/api/v1/tools", manifest)
        .await
}

async fn put_secret(server: &TestServer, token: &str, name: &str, value: &str) -> (u16, Value) {
    server
        .send(
            token,
            Method::PUT,
            &format!("/api/v1/secrets/{name}"),
            Some(&json!({ "value": value })),
        )
        .await
}

async fn create_pipeline(server: &TestServer, token: &str, yaml: &str) -> Value {
    let (status, body) = server
        .send_yaml(token, Method::POST, "/api/v1/pipelines", yaml)
        .await;
    assert_eq!(status, 201, "{body}");
    body
}

/// Triggers `pipeline`, waits for its end; its state and its task runs.
async fn run(server: &TestServer, token: &str, pipeline: &str) -> (String, Vec<Value>) {
    let (status, run) = server
        .post(token, "/api/v1/runs", &json!({ "pipeline": pipeline }))
        .await;
    assert_eq!(status, 201, "{run}");
    let run_id = run["id"].as_str().unwrap().to_owned();
    let state = server.finished(&run_id).await;
    let (status, task_runs) = server
        .get(token, &format!("/api/v1/runs/{run_id}/task-runs"))
        .await;
    assert_eq!(status, 200, "{task_runs}");
    (state, task_runs["items"].as_array().unwrap().clone())
}

/// The raw text of the run logs of every run of the org (all pages are small here).
async fn all_logs(server: &TestServer, token: &str) -> String {
    let (_, runs) = server.get(token, "/api/v1/runs").await;
    let mut text = String::new();
    for run in runs["items"].as_array().unwrap() {
        let id = run["id"].as_str().unwrap();
        let (status, logs) = server.get(token, &format!("/api/v1/runs/{id}/logs")).await;
        assert_eq!(status, 200, "{logs}");
        text.push_str(&logs.to_string());
    }
    text
}

/// The pointers of a 422's `details.problems`.
fn problem_pointers(body: &Value) -> Vec<String> {
    body["details"]["problems"]
        .as_array()
        .unwrap_or_else(|| panic!("no problems in {body}"))
        .iter()
        .map(|p| p["pointer"].as_str().unwrap().to_owned())
        .collect()
}

/// Uploads `content` as artifact `name`; its id.
async fn upload(server: &TestServer, token: &str, name: &str, content: &str) -> String {
    let (status, artifact) = server
        .post_bytes(
            token,
            &format!("/api/v1/artifacts?name={name}"),
            "text/plain",
            content.to_owned(),
        )
        .await;
    assert_eq!(status, 201, "{artifact}");
    assert_eq!(artifact["name"], name);
    assert_eq!(artifact["size_bytes"], content.len() as u64);
    artifact["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn an_http_tool_is_registered_pinned_and_run_with_its_secret_masked() {
    let greeter = Greeter::start().await;
    let keys = master_key("k1");
    let server = TestServer::start_with(|c| configure(c, Some(&keys))).await;
    let admin = server.token_for(Role::Admin).await;
    let editor = server.token_for(Role::Editor).await;

    let (status, secret) = put_secret(&server, &admin, "GEO_KEY", GEO_VALUE).await;
    assert_eq!(status, 201, "{secret}");
    let manifest = greeter.manifest("greeter", "GEO_KEY", "Greets someone");
    let (status, tool) = register(&server, &admin, &manifest).await;
    assert_eq!(status, 201, "{tool}");
    assert_eq!(tool["version"], 1);
    assert_eq!(tool["reference"], "greeter@1");
    assert_eq!(tool["kind"], "http");
    assert_eq!(tool["sandboxes"], json!([]));
    assert_eq!(tool["capabilities"]["secrets"], json!(["GEO_KEY"]));

    // Saving a pipeline pins the registered tool to its current version.
    let created = create_pipeline(&server, &editor, &greet_pipeline("greet", "greeter")).await;
    assert_eq!(created["definition"]["tasks"][0]["tool"], "greeter@1");

    let (state, task_runs) = run(&server, &editor, "greet").await;
    assert_eq!(state, "succeeded", "{task_runs:?}");
    let outputs = &task_runs[0]["outputs"];
    assert_eq!(outputs["greeting"], "hi world", "{outputs}");
    assert_eq!(
        outputs["auth"], "Bearer ***",
        "the secret is masked: {outputs}"
    );
    assert_eq!(
        greeter.seen(),
        vec![format!("Bearer {GEO_VALUE}")],
        "the endpoint received the real secret, once"
    );
    let logs = all_logs(&server, &editor).await;
    assert!(
        !logs.contains(GEO_VALUE),
        "the secret leaked to the logs: {logs}"
    );

    // A changed manifest is the next version; an identical one is the version it matches.
    let changed = greeter.manifest("greeter", "GEO_KEY", "Greets anyone");
    let (status, v2) = register(&server, &admin, &changed).await;
    assert_eq!((status, v2["version"].as_u64()), (201, Some(2)), "{v2}");
    let (status, again) = register(&server, &admin, &changed).await;
    assert_eq!(
        (status, again["version"].as_u64()),
        (200, Some(2)),
        "{again}"
    );
    assert_eq!(again["digest"], v2["digest"]);
    let (status, first) = register(&server, &admin, &manifest).await;
    assert_eq!(
        (status, first["version"].as_u64()),
        (200, Some(1)),
        "{first}"
    );
    assert_eq!(first["digest"], tool["digest"]);

    let (status, latest) = server.get(&editor, "/api/v1/tools/greeter").await;
    assert_eq!(
        (status, latest["version"].as_u64()),
        (200, Some(2)),
        "{latest}"
    );
    assert_eq!(latest["description"], "Greets anyone");
    let (_, versions) = server.get(&editor, "/api/v1/tools/greeter/versions").await;
    let numbers: Vec<u64> = versions
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, [2, 1], "newest first");
    let (status, v1) = server
        .get(&editor, "/api/v1/tools/greeter/versions/1")
        .await;
    assert_eq!(
        (status, v1["description"].as_str()),
        (200, Some("Greets someone"))
    );
    let (status, _) = server
        .get(&editor, "/api/v1/tools/greeter/versions/3")
        .await;
    assert_eq!(status, 404);
    let (_, list) = server.get(&editor, "/api/v1/tools").await;
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"greeter") && names.contains(&"shell"),
        "{names:?}"
    );

    // The stored pipeline still names version 1; a new pipeline pins version 2.
    let (_, stored) = server.get(&editor, "/api/v1/pipelines/greet").await;
    assert_eq!(
        stored["definition"]["tasks"][0]["tool"], "greeter@1",
        "{stored}"
    );
    let newer = create_pipeline(&server, &editor, &greet_pipeline("greet2", "greeter")).await;
    assert_eq!(newer["definition"]["tasks"][0]["tool"], "greeter@2");
}

/// Copies stdin (the inputs as JSON) to stdout.
const ECHO_WAT: &str = r#"
(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 4)
  (func (export "_start") (local $len i32)
    (block $done
      (loop $more
        (br_if $done (i32.gt_u (local.get $len) (i32.const 131072)))
        (i32.store (i32.const 0) (i32.add (i32.const 65536) (local.get $len)))
        (i32.store (i32.const 4) (i32.const 65536))
        (br_if $done (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
        (br_if $done (i32.eqz (i32.load (i32.const 8))))
        (local.set $len (i32.add (local.get $len) (i32.load (i32.const 8))))
        (br $more)))
    (i32.store (i32.const 0) (i32.const 65536))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
"#;

/// Prints `{"env": "<NAME=value;NAME=value;>"}` on stdout, and the same variables on stderr.
const ENV_WAT: &str = r#"
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $environ_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $environ_get (param i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 512) "{\"env\": \"")
  (data (i32.const 600) "\"}")
  (func $write (param $fd i32) (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))))
  (func (export "_start") (local $size i32) (local $i i32)
    (drop (call $environ_sizes_get (i32.const 20) (i32.const 24)))
    (local.set $size (i32.load (i32.const 24)))
    (drop (call $environ_get (i32.const 30000) (i32.const 40000)))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $size)))
        (if (i32.eqz (i32.load8_u (i32.add (i32.const 40000) (local.get $i))))
          (then (i32.store8 (i32.add (i32.const 40000) (local.get $i)) (i32.const 59))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (call $write (i32.const 2) (i32.const 40000) (local.get $size))
    (call $write (i32.const 1) (i32.const 512) (i32.const 9))
    (call $write (i32.const 1) (i32.const 40000) (local.get $size))
    (call $write (i32.const 1) (i32.const 600) (i32.const 2))))
"#;

#[tokio::test]
async fn a_wasm_tool_runs_an_uploaded_module_with_its_secret_masked() {
    let keys = master_key("k1");
    let server = TestServer::start_with(|c| configure(c, Some(&keys))).await;
    let admin = server.token_for(Role::Admin).await;
    let editor = server.token_for(Role::Editor).await;
    let token_value = "wasm-token-98765";
    assert_eq!(
        put_secret(&server, &admin, "TOKEN", token_value).await.0,
        201
    );

    let echo = upload(&server, &editor, "echo.wat", ECHO_WAT).await;
    let env = upload(&server, &editor, "env.wat", ENV_WAT).await;
    let (status, mirror) = register(
        &server,
        &admin,
        &format!(
            r#"
name: mirror
description: Returns its inputs
input_schema: {{type: object, required: [name], properties: {{name: {{type: string}}}}}}
output_schema: {{type: object, required: [name]}}
implementation: {{wasm: {{module: "{echo}"}}}}
capabilities: {{memory_mb: 16, cpu_ms: 2000}}
"#
        ),
    )
    .await;
    assert_eq!(status, 201, "{mirror}");
    assert_eq!(mirror["kind"], "wasm");
    assert_eq!(mirror["sandboxes"], json!(["wasm"]));
    assert_eq!(mirror["implementation"]["wasm"]["module"], echo.as_str());
    let (status, envdump) = register(
        &server,
        &admin,
        &format!(
            "name: envdump\noutput_schema: {{type: object, required: [env]}}\n\
             implementation: {{wasm: {{module: \"{env}\"}}}}\ncapabilities: {{secrets: [TOKEN]}}\n"
        ),
    )
    .await;
    assert_eq!(status, 201, "{envdump}");

    create_pipeline(
        &server,
        &editor,
        r#"
name: modules
tasks:
  - id: mirror
    tool: mirror
    sandbox: wasm
    with:
      name: world
      count: 3
  - id: env
    tool: envdump
    depends_on: [mirror]
"#,
    )
    .await;
    let (state, task_runs) = run(&server, &editor, "modules").await;
    assert_eq!(state, "succeeded", "{task_runs:?}");
    let by_id = |id: &str| {
        task_runs
            .iter()
            .find(|t| t["task_id"] == id)
            .unwrap_or_else(|| panic!("no task run {id} in {task_runs:?}"))
            .clone()
    };
    assert_eq!(
        by_id("mirror")["outputs"],
        json!({"name": "world", "count": 3})
    );
    let env_out = by_id("env")["outputs"]["env"]
        .as_str()
        .unwrap_or_else(|| panic!("no env output: {task_runs:?}"))
        .to_owned();
    assert!(env_out.contains("TOKEN=***"), "{env_out}");
    assert!(!env_out.contains(token_value), "{env_out}");
    let logs = all_logs(&server, &editor).await;
    assert!(
        !logs.contains(token_value),
        "the secret leaked to the logs: {logs}"
    );
    assert!(
        logs.contains("TOKEN=***"),
        "stderr is logged, masked: {logs}"
    );
}

#[tokio::test]
async fn registration_reports_every_problem_with_its_pointer() {
    let server = TestServer::start_with(|c| configure(c, None)).await;
    let admin = server.token_for(Role::Admin).await;

    let manifest = json!({
        "name": "shell",
        "input_schema": {"type": "string"},
        "implementation": {"http": {
            "url": "https://example.com/lookup",
            "headers": {"X-Key": "{{ secrets.OTHER_KEY }}"}
        }},
        "capabilities": {"hosts": ["example.com"], "secrets": ["GEO_KEY"]}
    });
    let (status, body) = server.post(&admin, "/api/v1/tools", &manifest).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (422, Some("validation_failed")),
        "{body}"
    );
    let pointers = problem_pointers(&body);
    for expected in [
        "/name",
        "/input_schema",
        "/implementation/http/url",
        "/implementation/http/headers/X-Key",
    ] {
        assert!(
            pointers.iter().any(|p| p == expected),
            "no {expected} in {body}"
        );
    }
    let header = body["details"]["problems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pointer"] == "/implementation/http/headers/X-Key")
        .unwrap();
    assert!(
        header["message"].as_str().unwrap().contains("OTHER_KEY"),
        "{header}"
    );
    let (_, tools) = server.get(&admin, "/api/v1/tools").await;
    assert!(
        tools
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["kind"] == "builtin"),
        "nothing was registered: {tools}"
    );

    // A module artifact that does not exist.
    let unknown = arches_core::ArtifactId::new();
    let (status, body) = register(
        &server,
        &admin,
        &format!("name: ghost\nimplementation: {{wasm: {{module: \"{unknown}\"}}}}\n"),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(problem_pointers(&body), ["/implementation/wasm/module"]);

    // An artifact that is not a module.
    let notes = upload(
        &server,
        &admin,
        "notes.txt",
        "these are notes, not a module",
    )
    .await;
    let (status, body) = register(
        &server,
        &admin,
        &format!("name: notes\nimplementation: {{wasm: {{module: \"{notes}\"}}}}\n"),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(problem_pointers(&body), ["/implementation/wasm/module"]);
    assert!(
        body["details"]["problems"][0]["message"]
            .as_str()
            .unwrap()
            .contains("not a usable module"),
        "{body}"
    );

    // An unknown field is named.
    let (status, body) = register(
        &server,
        &admin,
        "name: colourful\ncolour: red\nimplementation: {http: {url: \"http://127.0.0.1:9/\"}}\ncapabilities: {hosts: [\"127.0.0.1:9\"]}\n",
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert!(body.to_string().contains("colour"), "{body}");

    // A directory the server's [tools.wasm] does not allow (it allows none by default).
    let echo = upload(&server, &admin, "echo.wat", ECHO_WAT).await;
    let (status, body) = register(
        &server,
        &admin,
        &format!(
            "name: reader\nimplementation: {{wasm: {{module: \"{echo}\"}}}}\ncapabilities: {{read_paths: [/tmp]}}\n"
        ),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    let pointers = problem_pointers(&body);
    assert!(
        pointers.iter().all(|p| p.starts_with("/capabilities")),
        "{body}"
    );
    assert!(body.to_string().contains("/tmp"), "{body}");
    // The same module without the grant registers.
    let (status, body) = register(
        &server,
        &admin,
        &format!("name: reader\nimplementation: {{wasm: {{module: \"{echo}\"}}}}\n"),
    )
    .await;
    assert_eq!(status, 201, "{body}");
}

#[tokio::test]
async fn pipelines_are_validated_against_the_org_tools() {
    let greeter = Greeter::start().await;
    let server = TestServer::start_with(|c| configure(c, None)).await;
    let admin = server.token_for(Role::Admin).await;
    let editor = server.token_for(Role::Editor).await;
    let (status, body) = register(
        &server,
        &admin,
        &greeter.manifest("greeter", "GEO_KEY", "Greets"),
    )
    .await;
    assert_eq!(status, 201, "{body}");

    let diagnostics = |body: &Value| -> Vec<Value> {
        body["details"]["diagnostics"]
            .as_array()
            .unwrap_or_else(|| panic!("no diagnostics in {body}"))
            .clone()
    };

    let (status, body) = server
        .send_yaml(
            &editor,
            Method::POST,
            "/api/v1/pipelines",
            "name: bad-inputs\ntasks:\n  - id: greet\n    tool: greeter\n    with:\n      name: 5\n",
        )
        .await;
    assert_eq!(status, 422, "{body}");
    let found = diagnostics(&body);
    assert!(
        found.iter().any(|d| d["pointer"] == "/tasks/0/with/name"),
        "{body}"
    );

    let (status, body) = server
        .send_yaml(
            &editor,
            Method::POST,
            "/api/v1/pipelines",
            "name: typo\ntasks:\n  - id: greet\n    tool: greter\n    with:\n      name: x\n",
        )
        .await;
    assert_eq!(status, 422, "{body}");
    let unknown = diagnostics(&body)
        .into_iter()
        .find(|d| d["code"] == "unknown_tool")
        .unwrap_or_else(|| panic!("no unknown_tool in {body}"));
    assert_eq!(unknown["pointer"], "/tasks/0/tool");
    assert!(
        unknown["hint"]
            .as_str()
            .unwrap_or_default()
            .contains("greeter"),
        "{unknown}"
    );

    let (status, body) = server
        .send_yaml(
            &editor,
            Method::POST,
            "/api/v1/pipelines",
            "name: boxed\ntasks:\n  - id: greet\n    tool: greeter\n    sandbox: wasm\n    with:\n      name: x\n",
        )
        .await;
    assert_eq!(status, 422, "{body}");
    let sandbox = diagnostics(&body)
        .into_iter()
        .find(|d| d["code"] == "sandbox_unavailable")
        .unwrap_or_else(|| panic!("no sandbox_unavailable in {body}"));
    assert_eq!(sandbox["pointer"], "/tasks/0/sandbox");

    // The same through the validation endpoint, and a valid one passes.
    let (status, report) = server
        .send_yaml(
            &editor,
            Method::POST,
            "/api/v1/pipelines/validate",
            "name: boxed\ntasks:\n  - id: greet\n    tool: greeter\n    sandbox: wasm\n    with:\n      name: x\n",
        )
        .await;
    assert_eq!(
        (status, report["valid"].as_bool()),
        (200, Some(false)),
        "{report}"
    );
    let (status, report) = server
        .send_yaml(
            &editor,
            Method::POST,
            "/api/v1/pipelines/validate",
            "name: fine\ntasks:\n  - id: greet\n    tool: greeter@1\n    with:\n      name: x\n",
        )
        .await;
    assert_eq!(
        (status, report["valid"].as_bool()),
        (200, Some(true)),
        "{report}"
    );
    let (status, report) = server
        .send_yaml(
            &editor,
            Method::POST,
            "/api/v1/pipelines/validate",
            "name: later\ntasks:\n  - id: greet\n    tool: greeter@2\n    with:\n      name: x\n",
        )
        .await;
    assert_eq!(
        (status, report["valid"].as_bool()),
        (200, Some(false)),
        "{report}"
    );

    // Shell cannot run in WebAssembly either.
    let (status, body) = server
        .send_yaml(
            &editor,
            Method::POST,
            "/api/v1/pipelines",
            "name: script\ntasks:\n  - id: s\n    tool: shell\n    sandbox: wasm\n    with:\n      command: \"true\"\n",
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(
        diagnostics(&body)
            .iter()
            .any(|d| d["code"] == "sandbox_unavailable" && d["pointer"] == "/tasks/0/sandbox"),
        "{body}"
    );
}

#[tokio::test]
async fn secrets_are_set_listed_without_values_and_deleted() {
    let keys = master_key("k1");
    let server = TestServer::start_with(|c| configure(c, Some(&keys))).await;
    let admin = server.token_for(Role::Admin).await;

    let (status, created) = put_secret(&server, &admin, "API_TOKEN", GEO_VALUE).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(
        (
            created["name"].as_str(),
            created["version"].as_u64(),
            created["key_id"].as_str()
        ),
        (Some("API_TOKEN"), Some(1), Some("k1"))
    );
    assert!(!created.to_string().contains(GEO_VALUE));
    let (status, updated) = put_secret(&server, &admin, "API_TOKEN", "another-value-456").await;
    assert_eq!(
        (status, updated["version"].as_u64()),
        (200, Some(2)),
        "{updated}"
    );

    let response = server
        .client
        .get(server.url("/api/v1/secrets"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let raw = response.text().await.unwrap();
    assert!(
        !raw.contains(GEO_VALUE) && !raw.contains("another-value-456"),
        "{raw}"
    );
    let list: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["name"], "API_TOKEN");
    assert_eq!(list[0]["version"], 2);
    assert_eq!(list[0]["key_id"], "k1");
    assert!(list[0]["created_at"].is_string() && list[0]["updated_at"].is_string());

    let (status, body) = put_secret(&server, &admin, "API_TOKEN", "abc").await;
    assert_eq!(
        (status, body["code"].as_str()),
        (422, Some("validation_failed")),
        "{body}"
    );
    let (status, body) = put_secret(&server, &admin, "1bad name", "abcdef").await;
    assert_eq!(status, 422, "{body}");
    let (status, body) = put_secret(&server, &admin, "rotate", "abcdef").await;
    assert_eq!(
        (status, body["code"].as_str()),
        (405, Some("method_not_allowed")),
        "`rotate` is the rotation's route, not a secret: {body}"
    );
    // A body of the wrong shape is refused without quoting what was sent.
    for wrong in [
        json!("a-value-sent-bare-1"),
        json!({"value": 123_456_789}),
        json!({"value": "a-value-with-extra-2", "extra": 1}),
    ] {
        let (status, body) = server
            .send(
                &admin,
                Method::PUT,
                "/api/v1/secrets/API_TOKEN",
                Some(&wrong),
            )
            .await;
        assert_eq!(status, 422, "{body}");
        let text = body.to_string();
        for sent in ["a-value-sent-bare-1", "123456789", "a-value-with-extra-2"] {
            assert!(!text.contains(sent), "{text}");
        }
    }

    let (status, _) = server
        .send(&admin, Method::DELETE, "/api/v1/secrets/API_TOKEN", None)
        .await;
    assert_eq!(status, 204);
    let (status, body) = server
        .send(&admin, Method::DELETE, "/api/v1/secrets/API_TOKEN", None)
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("not_found")),
        "{body}"
    );
    let (_, list) = server.get(&admin, "/api/v1/secrets").await;
    assert_eq!(list, json!([]));
}

#[tokio::test]
async fn without_a_master_key_secrets_cannot_be_set_and_tools_needing_them_fail() {
    let greeter = Greeter::start().await;
    let server = TestServer::start_with(|c| configure(c, None)).await;
    let admin = server.token_for(Role::Admin).await;
    let (status, body) = put_secret(&server, &admin, "GEO_KEY", GEO_VALUE).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("conflict")),
        "{body}"
    );
    let (status, body) = server
        .post(&admin, "/api/v1/secrets/rotate", &json!({}))
        .await;
    assert_eq!(status, 409, "{body}");
    let (status, list) = server.get(&admin, "/api/v1/secrets").await;
    assert_eq!((status, list), (200, json!([])));

    let (status, body) = register(
        &server,
        &admin,
        &greeter.manifest("greeter", "GEO_KEY", "Greets"),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    create_pipeline(&server, &admin, &greet_pipeline("greet", "greeter")).await;
    let (state, task_runs) = run(&server, &admin, "greet").await;
    assert_eq!(state, "failed");
    let error = task_runs[0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("master key"), "{task_runs:?}");
    assert_eq!(task_runs[0]["attempts"].as_array().unwrap().len(), 1);
    assert!(greeter.seen().is_empty());
}

#[tokio::test]
async fn secrets_are_resealed_under_a_new_key_and_the_old_key_can_go() {
    let greeter = Greeter::start().await;
    let k1 = master_key("k1");
    let k2 = master_key("k2");
    let server = TestServer::start_with(|c| configure(c, Some(&k1))).await;
    let admin = server.token_for(Role::Admin).await;
    assert_eq!(
        put_secret(&server, &admin, "GEO_KEY", GEO_VALUE).await.0,
        201
    );
    assert_eq!(
        put_secret(&server, &admin, "OTHER_KEY", "other-value-789")
            .await
            .0,
        201
    );
    let (status, body) = register(
        &server,
        &admin,
        &greeter.manifest("greeter", "GEO_KEY", "Greets"),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    create_pipeline(&server, &admin, &greet_pipeline("greet", "greeter")).await;
    let (state, task_runs) = run(&server, &admin, "greet").await;
    assert_eq!(state, "succeeded", "{task_runs:?}");

    // k2 first: new values are sealed with it, k1 still opens; rotation re-seals both.
    let both = format!("{k2},{k1}");
    let server = server.restart_with(|c| configure(c, Some(&both))).await;
    let admin = server.token_for(Role::Admin).await;
    let (_, list) = server.get(&admin, "/api/v1/secrets").await;
    assert!(
        list.as_array().unwrap().iter().all(|s| s["key_id"] == "k1"),
        "{list}"
    );
    let (status, report) = server
        .post(&admin, "/api/v1/secrets/rotate", &json!({}))
        .await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(
        report,
        json!({"active_key_id": "k2", "resealed": 2, "unchanged": 0, "skipped": 0, "failed": []})
    );
    let (_, list) = server.get(&admin, "/api/v1/secrets").await;
    let list = list.as_array().unwrap().clone();
    assert_eq!(list.len(), 2);
    for secret in &list {
        assert_eq!(secret["key_id"], "k2", "{secret}");
        assert_eq!(
            secret["version"], 1,
            "re-sealing keeps the version: {secret}"
        );
    }

    // Only k2: the re-sealed secret still opens, the tool still runs with it.
    let server = server.restart_with(|c| configure(c, Some(&k2))).await;
    let admin = server.token_for(Role::Admin).await;
    let (state, task_runs) = run(&server, &admin, "greet").await;
    assert_eq!(state, "succeeded", "{task_runs:?}");
    assert_eq!(task_runs[0]["outputs"]["auth"], "Bearer ***");
    assert_eq!(
        greeter.seen(),
        vec![format!("Bearer {GEO_VALUE}"), format!("Bearer {GEO_VALUE}")]
    );
    let (status, report) = server
        .post(&admin, "/api/v1/secrets/rotate", &json!({}))
        .await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(
        (report["resealed"].as_u64(), report["unchanged"].as_u64()),
        (Some(0), Some(2))
    );
    server.stop().await;
}

#[tokio::test]
async fn tools_and_secrets_obey_the_roles() {
    let keys = master_key("k1");
    let server = TestServer::start_with(|c| configure(c, Some(&keys))).await;
    let viewer = server.token_for(Role::Viewer).await;
    let editor = server.token_for(Role::Editor).await;
    let manifest = "name: hello\nimplementation: {http: {url: \"http://127.0.0.1:9/\"}}\ncapabilities: {hosts: [\"127.0.0.1:9\"]}\n";

    let (status, list) = server.get(&viewer, "/api/v1/tools").await;
    assert_eq!(status, 200, "{list}");
    assert!(list
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["name"] == "shell"));
    let (status, body) = server.get(&viewer, "/api/v1/tools/shell").await;
    assert_eq!(
        (status, body["kind"].as_str()),
        (200, Some("builtin")),
        "{body}"
    );
    for token in [&viewer, &editor] {
        let (status, body) = register(&server, token, manifest).await;
        assert_eq!(status, 403, "{body}");
        assert_eq!(body["details"]["permission"], "tool_register");
    }
    let (status, body) = server.get(&viewer, "/api/v1/secrets").await;
    assert_eq!(
        (status, body["details"]["permission"].as_str()),
        (403, Some("secret_read"))
    );
    let (status, body) = server
        .post_bytes(
            &viewer,
            "/api/v1/artifacts?name=x.txt",
            "text/plain",
            "data",
        )
        .await;
    assert_eq!(
        (status, body["details"]["permission"].as_str()),
        (403, Some("artifact_write"))
    );

    let (status, body) = put_secret(&server, &editor, "x", "value-1234").await;
    assert_eq!(
        (status, body["details"]["permission"].as_str()),
        (403, Some("secret_write"))
    );
    let (status, body) = server
        .send(&editor, Method::DELETE, "/api/v1/secrets/x", None)
        .await;
    assert_eq!(
        (status, body["details"]["permission"].as_str()),
        (403, Some("secret_write"))
    );
    let (status, body) = server
        .post(&editor, "/api/v1/secrets/rotate", &json!({}))
        .await;
    assert_eq!(
        (status, body["details"]["permission"].as_str()),
        (403, Some("secret_write"))
    );
    let (status, list) = server.get(&editor, "/api/v1/secrets").await;
    assert_eq!((status, list), (200, json!([])));
    upload(&server, &editor, "data.txt", "some data").await;

    let admin = server.token_for(Role::Admin).await;
    let (status, body) = register(&server, &admin, manifest).await;
    assert_eq!(status, 201, "{body}");
}

#[tokio::test]
async fn a_tool_whose_secret_is_not_set_fails_naming_it_without_retrying() {
    let greeter = Greeter::start().await;
    let keys = master_key("k1");
    let server = TestServer::start_with(|c| configure(c, Some(&keys))).await;
    let admin = server.token_for(Role::Admin).await;
    let (status, body) = register(
        &server,
        &admin,
        &greeter.manifest("needy", "MISSING_KEY", "Needs a secret nobody set"),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    create_pipeline(&server, &admin, &greet_pipeline("needy", "needy")).await;
    let (state, task_runs) = run(&server, &admin, "needy").await;
    assert_eq!(state, "failed", "{task_runs:?}");
    let task_run = &task_runs[0];
    assert_eq!(task_run["state"], "failed");
    let error = task_run["error"].as_str().unwrap_or_default();
    assert!(error.contains("MISSING_KEY"), "{task_run}");
    assert_eq!(
        task_run["attempt"], 1,
        "a missing secret is not retried: {task_run}"
    );
    assert_eq!(
        task_run["attempts"].as_array().unwrap().len(),
        1,
        "{task_run}"
    );
    assert!(greeter.seen().is_empty(), "no request was sent");
}

#[tokio::test]
async fn a_server_without_the_shell_tool_refuses_shell_tasks_at_validation() {
    let server = TestServer::start_with(|c| c.tools.shell.enabled = false).await;
    let admin = server.token_for(Role::Admin).await;
    let (status, body) = server
        .send_yaml(
            &admin,
            Method::POST,
            "/api/v1/pipelines",
            "name: scripted\ntasks:\n  - id: run\n    tool: shell\n    with: {command: \"true\"}\n",
        )
        .await;
    assert_eq!(status, 422, "{body}");
    let diagnostic = &body["details"]["diagnostics"][0];
    assert_eq!(diagnostic["code"], "unknown_tool", "{body}");
    assert_eq!(diagnostic["pointer"], "/tasks/0/tool", "{body}");
    let (status, tools) = server.get(&admin, "/api/v1/tools").await;
    assert_eq!(status, 200);
    let names: Vec<&str> = tools
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert!(!names.contains(&"shell"), "{names:?}");
    assert!(names.contains(&"wasm"), "{names:?}");

    // This server allows no host ([tools.http] allowed_hosts is empty by default): an http
    // tool is refused at registration, not at its first run.
    let (status, body) = server
        .send_yaml(
            &admin,
            Method::POST,
            "/api/v1/tools",
            "name: lookup\nimplementation:\n  http: {url: \"http://10.0.0.7:8080/x\"}\ncapabilities: {hosts: [\"10.0.0.7:8080\"]}\n",
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(
        body["details"]["problems"][0]["pointer"], "/implementation/http/url",
        "{body}"
    );
    assert!(
        body["details"]["problems"][0]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("allowed_hosts"),
        "{body}"
    );
}

/// A chat-completions server on 127.0.0.1 answering `hello` with certain log-probabilities;
/// its base URL and the `(authorization, model)` of every request it received.
async fn chat_server() -> (String, Arc<Mutex<Vec<(String, String)>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, axum::Json(body): axum::Json<Value>| {
                let record = record.clone();
                async move {
                    let auth = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    let model = body["model"].as_str().unwrap_or_default().to_owned();
                    record.lock().unwrap().push((auth, model.clone()));
                    axum::Json(json!({
                        "id": "chatcmpl-1",
                        "object": "chat.completion",
                        "created": 1_700_000_000,
                        "model": model,
                        "choices": [{
                            "index": 0,
                            "message": {"role": "assistant", "content": "hello"},
                            "logprobs": {"content": [{"token": "hello", "logprob": 0.0, "top_logprobs": []}]},
                            "finish_reason": "stop"
                        }],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
                    }))
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{address}/v1"), seen)
}

/// With no installation provider, an org that names its own in its secrets runs `llm`
/// tasks against it with its own key and model; another org has no provider and its task
/// fails at once naming the secret to set.
#[tokio::test]
async fn an_org_runs_llm_tasks_on_the_provider_its_secrets_name() {
    let (base_url, seen) = chat_server().await;
    let keys = master_key("k1");
    let server = TestServer::start_with(|c| configure(c, Some(&keys))).await;
    let admin = server.token_for(Role::Admin).await;
    let pipeline = "name: ask\ntasks:\n  - id: ask\n    tool: llm\n    with:\n      prompt: say hello\n      samples: 1\n";

    // Another org, without settings: no provider.
    let now = server.state.clock.now();
    let other = arches_core::identity::OrgRecord {
        id: arches_core::OrgId::new(),
        slug: "other".into(),
        name: "Other".into(),
        created_at: now,
    };
    let (_, other_user) = server
        .token_in(arches_core::OrgId::DEFAULT, Role::Viewer)
        .await;
    server
        .state
        .identity
        .create_org(&other, other_user)
        .await
        .unwrap();
    let other_admin = server
        .session_token(other_user, other.id, Role::Owner)
        .await;
    create_pipeline(&server, &other_admin, pipeline).await;
    let (state, task_runs) = run(&server, &other_admin, "ask").await;
    assert_eq!(state, "failed", "{task_runs:?}");
    let error = task_runs[0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("LLM_BASE_URL"), "{error}");
    assert_eq!(task_runs[0]["attempts"].as_array().unwrap().len(), 1);

    for (name, value) in [
        ("LLM_BASE_URL", base_url.as_str()),
        ("LLM_MODEL", "org-model"),
        ("LLM_API_KEY", "sk-org-default"),
    ] {
        let (status, body) = put_secret(&server, &admin, name, value).await;
        assert!(status == 200 || status == 201, "{status} {body}");
    }
    create_pipeline(&server, &admin, pipeline).await;
    let (state, task_runs) = run(&server, &admin, "ask").await;
    assert_eq!(state, "succeeded", "{task_runs:?}");
    let outputs = &task_runs[0]["outputs"];
    assert_eq!(outputs["answer"], "hello", "{outputs}");
    assert_eq!(outputs["provider"], "org", "{outputs}");
    assert_eq!(outputs["model"], "org-model", "{outputs}");
    assert_eq!(
        seen.lock().unwrap().clone(),
        vec![("Bearer sk-org-default".to_owned(), "org-model".to_owned())]
    );
    // The key is in no output.
    assert!(!task_runs[0].to_string().contains("sk-org-default"));
}
