//! Integration tests of the built-in tools against the real SQLite store and local artifact
//! store.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arches_core::ids::{OrgId, RunId, TaskId, TaskRunId};
use arches_core::ports::{ArtifactStore, LogSink, Tool, ToolContext, ToolError};
use arches_core::records::{Durability, LogStream, NewArtifact};
use arches_store::{LocalArtifactStore, SqliteStore};
use arches_tools::{builtin_registry, EchoTool, FileTool, NoopTool, ShellTool, SqlTool};
use async_trait::async_trait;
use serde_json::{json, Value};
use tempfile::TempDir;

#[path = "tools/agent.rs"]
mod agent;
#[path = "tools/embeddings.rs"]
mod embeddings;
#[path = "tools/llm.rs"]
mod llm;
#[path = "tools/mcp.rs"]
mod mcp;
#[path = "tools/search.rs"]
mod search;
#[path = "tools/wasm.rs"]
mod wasm;

const PENGUINS_CSV: &str = "/work/shared/data/penguins.csv";

/// Log lines kept in memory.
#[derive(Default)]
struct MemoryLogs {
    lines: Mutex<Vec<(LogStream, String)>>,
}

#[async_trait]
impl LogSink for MemoryLogs {
    async fn write(&self, stream: LogStream, text: &str) {
        self.lines.lock().unwrap().push((stream, text.to_owned()));
    }
}

impl MemoryLogs {
    fn of(&self, stream: LogStream) -> Vec<String> {
        let lines = self.lines.lock().unwrap();
        lines
            .iter()
            .filter(|(s, _)| *s == stream)
            .map(|(_, text)| text.clone())
            .collect()
    }
}

/// A fresh store, artifact store and log for one test.
struct Harness {
    dir: TempDir,
    artifacts: Arc<LocalArtifactStore>,
    logs: Arc<MemoryLogs>,
}

impl Harness {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("arches.db"), Durability::Normal)
            .await
            .unwrap();
        let artifacts =
            LocalArtifactStore::new(&dir.path().join("artifacts"), Arc::new(store)).unwrap();
        Self {
            dir,
            artifacts: Arc::new(artifacts),
            logs: Arc::new(MemoryLogs::default()),
        }
    }

    /// A context for task `task` with these upstream outputs and a fresh working directory.
    fn context(&self, task: &str, upstream: BTreeMap<String, Value>) -> ToolContext {
        let work_dir = tempfile::tempdir_in(self.dir.path()).unwrap().keep();
        ToolContext {
            org_id: OrgId::DEFAULT,
            run_id: RunId::new(),
            task_run_id: TaskRunId::new(),
            task_id: TaskId::parse(task).unwrap(),
            attempt: 1,
            item: None,
            upstream,
            work_dir,
            artifacts: self.artifacts.clone(),
            logs: self.logs.clone(),
            review_comment: None,
            tools: Arc::new(arches_core::ports::ToolRegistry::new()),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Stores bytes as an artifact and returns the outputs of a task that produced it.
    async fn upstream_output(&self, name: &str, media_type: &str, content: &[u8]) -> Value {
        let record = self
            .artifacts
            .put_bytes(content.to_vec(), new_artifact(name, media_type))
            .await
            .unwrap();
        json!({ "artifact": record })
    }

    async fn read_artifact(&self, outputs: &Value) -> Vec<u8> {
        let id = outputs["artifact"]["id"].as_str().unwrap().parse().unwrap();
        self.artifacts.read(id, 1 << 20).await.unwrap()
    }
}

fn new_artifact(name: &str, media_type: &str) -> NewArtifact {
    NewArtifact {
        org_id: OrgId::DEFAULT,
        name: name.to_owned(),
        media_type: media_type.to_owned(),
        table: None,
        produced_by: None,
        inputs: Vec::new(),
    }
}

fn upstream(entries: &[(&str, Value)]) -> BTreeMap<String, Value> {
    entries
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

async fn penguins_upstream(harness: &Harness) -> Value {
    let content = std::fs::read(PENGUINS_CSV).unwrap();
    harness
        .upstream_output("penguins", "text/csv", &content)
        .await
}

fn species_counts(preview: &Value) -> Vec<(String, i64)> {
    preview
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            (
                row["species"].as_str().unwrap().to_owned(),
                row["n"].as_i64().unwrap(),
            )
        })
        .collect()
}

fn expected_species() -> Vec<(String, i64)> {
    vec![
        ("Adelie".to_owned(), 152),
        ("Chinstrap".to_owned(), 68),
        ("Gentoo".to_owned(), 124),
    ]
}

// ---------------------------------------------------------------------------------------
// sql

#[tokio::test]
async fn sql_counts_the_penguins_of_an_upstream_csv_artifact() {
    let harness = Harness::new().await;
    let upstream_outputs = penguins_upstream(&harness).await;
    let context = harness.context(
        "count",
        upstream(&[("load-penguins", upstream_outputs.clone())]),
    );

    let outputs = SqlTool::new()
        .execute(
            context,
            json!({"query": "SELECT count(*) AS n FROM load_penguins"}),
        )
        .await
        .unwrap();

    assert_eq!(outputs["rows"], json!(1));
    assert_eq!(outputs["preview"], json!([{"n": 344}]));
    assert_eq!(outputs["schema"][0]["name"], "n");
    assert_eq!(outputs["schema"][0]["data_type"], "Int64");
    let artifact = &outputs["artifact"];
    assert_eq!(artifact["name"], "count");
    assert_eq!(artifact["media_type"], "application/vnd.apache.parquet");
    assert_eq!(artifact["table"]["rows"], json!(1));
    assert_eq!(
        artifact["inputs"],
        json!([upstream_outputs["artifact"]["id"]])
    );
    assert!(harness.read_artifact(&outputs).await.starts_with(b"PAR1"));
}

#[tokio::test]
async fn sql_groups_penguins_from_a_local_path_into_a_csv_artifact() {
    let harness = Harness::new().await;
    let context = harness.context("by-species", BTreeMap::new());

    let outputs = SqlTool::new()
        .execute(
            context,
            json!({
                "query": "SELECT species, count(*) AS n FROM penguins GROUP BY species ORDER BY species",
                "tables": {"penguins": {"path": PENGUINS_CSV}},
                "output": {"name": "penguins/by-species", "format": "csv"}
            }),
        )
        .await
        .unwrap();

    assert_eq!(outputs["rows"], json!(3));
    assert_eq!(species_counts(&outputs["preview"]), expected_species());
    assert_eq!(
        outputs["schema"],
        json!([
            {"name": "species", "data_type": "Utf8", "nullable": true},
            {"name": "n", "data_type": "Int64", "nullable": false}
        ])
    );
    assert_eq!(outputs["artifact"]["name"], "penguins/by-species");
    assert_eq!(outputs["artifact"]["media_type"], "text/csv");
    let content = harness.read_artifact(&outputs).await;
    assert_eq!(
        String::from_utf8(content).unwrap(),
        "species,n\nAdelie,152\nChinstrap,68\nGentoo,124\n"
    );
}

#[tokio::test]
async fn sql_reads_the_parquet_result_of_an_upstream_sql_task() {
    let harness = Harness::new().await;
    let load = harness.context(
        "load",
        upstream(&[("raw", penguins_upstream(&harness).await)]),
    );
    let loaded = SqlTool::new()
        .execute(
            load,
            json!({"query": "SELECT * FROM raw", "preview_rows": 2}),
        )
        .await
        .unwrap();
    assert_eq!(loaded["rows"], json!(344));
    assert_eq!(loaded["preview"].as_array().unwrap().len(), 2);

    let count = harness.context("count", upstream(&[("load", loaded)]));
    let outputs = SqlTool::new()
        .execute(
            count,
            json!({"query": "SELECT species, count(*) AS n FROM load GROUP BY species ORDER BY n DESC"}),
        )
        .await
        .unwrap();

    let mut counts = species_counts(&outputs["preview"]);
    assert_eq!(counts[0], ("Adelie".to_owned(), 152));
    counts.sort();
    assert_eq!(counts, expected_species());
}

#[tokio::test]
async fn sql_reads_a_fan_out_upstream_as_one_table() {
    let harness = Harness::new().await;
    let first = harness
        .upstream_output("part", "text/csv", b"id,label\n1,a\n2,b\n")
        .await;
    let second = harness
        .upstream_output("part", "text/csv", b"id,label\n3,c\n")
        .await;
    let third = harness
        .upstream_output("part", "application/json", br#"[{"id": 4, "label": "d"}]"#)
        .await;
    let context = harness.context(
        "merge",
        upstream(&[("split-parts", json!([first, second, third]))]),
    );

    let outputs = SqlTool::new()
        .execute(
            context,
            json!({"query": "SELECT sum(id) AS total, count(*) AS n FROM split_parts"}),
        )
        .await
        .unwrap();

    assert_eq!(outputs["preview"], json!([{"total": 10, "n": 4}]));
    assert_eq!(outputs["artifact"]["inputs"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn a_sql_syntax_error_is_permanent_and_quotes_the_query() {
    let harness = Harness::new().await;
    let context = harness.context("broken", BTreeMap::new());
    let query = "SELEC species FROM penguins";

    let error = SqlTool::new()
        .execute(
            context,
            json!({"query": query, "tables": {"penguins": {"path": PENGUINS_CSV}}}),
        )
        .await
        .unwrap_err();

    assert!(!error.retryable);
    assert!(
        error.message.starts_with("sql syntax error"),
        "{}",
        error.message
    );
    assert!(error.message.contains(query), "{}", error.message);
}

#[tokio::test]
async fn an_unknown_column_is_a_permanent_error_naming_the_column() {
    let harness = Harness::new().await;
    let context = harness.context(
        "broken",
        upstream(&[("penguins", penguins_upstream(&harness).await)]),
    );

    let error = SqlTool::new()
        .execute(context, json!({"query": "SELECT wingspan FROM penguins"}))
        .await
        .unwrap_err();

    assert!(!error.retryable);
    assert!(
        error.message.starts_with("sql planning error"),
        "{}",
        error.message
    );
    assert!(error.message.contains("wingspan"), "{}", error.message);
}

#[tokio::test]
async fn an_unknown_table_is_a_permanent_error_naming_the_table() {
    let harness = Harness::new().await;
    let context = harness.context("broken", BTreeMap::new());

    let error = SqlTool::new()
        .execute(context, json!({"query": "SELECT * FROM nowhere"}))
        .await
        .unwrap_err();

    assert!(!error.retryable);
    assert!(error.message.contains("nowhere"), "{}", error.message);
}

#[tokio::test]
async fn a_missing_sql_input_file_is_a_permanent_error_naming_the_path() {
    let harness = Harness::new().await;
    let context = harness.context("broken", BTreeMap::new());
    let missing = harness.path("absent/penguins.csv");

    let error = SqlTool::new()
        .execute(
            context,
            json!({"query": "SELECT 1", "tables": {"penguins": {"path": missing}}}),
        )
        .await
        .unwrap_err();

    assert!(!error.retryable);
    assert!(
        error.message.contains("input file not found"),
        "{}",
        error.message
    );
    assert!(
        error.message.contains(missing.to_str().unwrap()),
        "{}",
        error.message
    );
}

#[tokio::test]
async fn sql_refuses_statements_that_write_files() {
    let harness = Harness::new().await;
    let context = harness.context("copy", BTreeMap::new());
    let target = harness.path("copied.csv");
    let query = format!(
        "COPY (SELECT 1 AS x) TO '{}' STORED AS CSV",
        target.display()
    );

    let error = SqlTool::new()
        .execute(context, json!({ "query": query }))
        .await
        .unwrap_err();

    assert!(!error.retryable);
    assert!(!target.exists());
}

// ---------------------------------------------------------------------------------------
// shell

async fn run_shell(harness: &Harness, inputs: Value) -> Result<Value, ToolError> {
    ShellTool::new()
        .execute(harness.context("script", BTreeMap::new()), inputs)
        .await
}

#[tokio::test]
async fn shell_outputs_come_from_the_arches_output_file() {
    let harness = Harness::new().await;

    let outputs = run_shell(
        &harness,
        json!({"command": r#"printf '{"answer": 42, "exit_code": 9}' > "$ARCHES_OUTPUT""#}),
    )
    .await
    .unwrap();

    assert_eq!(
        outputs,
        json!({"answer": 42, "exit_code": 0, "artifacts": []})
    );
}

#[tokio::test]
async fn invalid_json_in_the_output_file_is_a_permanent_error_naming_the_file() {
    let harness = Harness::new().await;

    let error = run_shell(
        &harness,
        json!({"command": r#"echo '{"answer":' > "$ARCHES_OUTPUT""#}),
    )
    .await
    .unwrap_err();

    assert!(!error.retryable);
    assert!(
        error.message.contains("arches-output.json"),
        "{}",
        error.message
    );
    assert!(
        error.message.contains("not valid json"),
        "{}",
        error.message
    );
}

#[tokio::test]
async fn shell_scrubs_the_environment_but_passes_declared_variables() {
    let harness = Harness::new().await;
    std::env::set_var("TOOLS_TEST_PARENT_SECRET", "leaked");
    std::env::set_var("ARCHES_TOOLS_TEST_PARENT_SECRET", "leaked");

    run_shell(
        &harness,
        json!({
            "command": r#"echo "${TOOLS_TEST_PARENT_SECRET-unset} ${ARCHES_TOOLS_TEST_PARENT_SECRET-unset} $GREETING $ARCHES_TASK_ID $ARCHES_ATTEMPT""#,
            "env": {"GREETING": "hello there"}
        }),
    )
    .await
    .unwrap();

    assert_eq!(
        harness.logs.of(LogStream::Stdout),
        vec!["unset unset hello there script 1".to_owned()]
    );
}

#[tokio::test]
async fn shell_logs_stdout_and_stderr_lines_and_reads_stdin() {
    let harness = Harness::new().await;

    run_shell(
        &harness,
        json!({"command": "printf 'one\\r\\ntwo\\n'; cat; echo oops >&2", "stdin": "from stdin"}),
    )
    .await
    .unwrap();

    assert_eq!(
        harness.logs.of(LogStream::Stdout),
        vec!["one", "two", "from stdin"]
    );
    assert_eq!(harness.logs.of(LogStream::Stderr), vec!["oops"]);
}

#[tokio::test]
async fn non_utf8_output_is_logged_lossily() {
    let harness = Harness::new().await;

    run_shell(&harness, json!({"argv": ["printf", "caf\\351\\nok"]}))
        .await
        .unwrap();

    assert_eq!(
        harness.logs.of(LogStream::Stdout),
        vec!["caf\u{FFFD}", "ok"]
    );
}

#[tokio::test]
async fn huge_output_is_truncated_in_the_log_but_the_command_succeeds() {
    let harness = Harness::new().await;

    let outputs = run_shell(&harness, json!({"command": "yes | head -c 50000000"}))
        .await
        .unwrap();

    assert_eq!(outputs["exit_code"], json!(0));
    let stdout = harness.logs.of(LogStream::Stdout);
    assert_eq!(stdout.len(), 10_000);
    assert!(stdout.iter().all(|line| line == "y"));
    // 10,000 lines of "y\n" were logged; everything after them is counted.
    assert_eq!(
        harness.logs.of(LogStream::System),
        vec!["output truncated: 49980000 more bytes of stdout".to_owned()]
    );
}

#[tokio::test]
async fn a_very_long_line_is_cut_at_64_kib() {
    let harness = Harness::new().await;

    run_shell(
        &harness,
        json!({"command": "head -c 200000 /dev/zero | tr '\\0' x; echo; echo next"}),
    )
    .await
    .unwrap();

    let stdout = harness.logs.of(LogStream::Stdout);
    assert_eq!(stdout.len(), 2);
    assert_eq!(stdout[0].len(), 64 * 1024);
    assert_eq!(stdout[1], "next");
}

#[tokio::test]
async fn a_missing_command_is_a_permanent_command_not_found_error() {
    let harness = Harness::new().await;

    let error = run_shell(&harness, json!({"command": "no-such-command-xyz --flag"}))
        .await
        .unwrap_err();
    assert_eq!(
        error,
        ToolError::permanent("command not found: no-such-command-xyz")
    );

    let error = run_shell(&harness, json!({"argv": ["no-such-program-xyz", "arg"]}))
        .await
        .unwrap_err();
    assert_eq!(
        error,
        ToolError::permanent("command not found: no-such-program-xyz")
    );
}

#[tokio::test]
async fn a_failing_command_reports_its_status_and_the_stderr_tail() {
    let harness = Harness::new().await;

    let error = run_shell(
        &harness,
        json!({"command": "i=1; while [ $i -le 30 ]; do echo \"line $i\" >&2; i=$((i+1)); done; exit 3"}),
    )
    .await
    .unwrap_err();

    assert!(error.retryable);
    let mut lines = error.message.lines();
    assert_eq!(
        lines.next(),
        Some("command exited with status 3; last stderr lines:")
    );
    let tail: Vec<&str> = lines.collect();
    let expected: Vec<String> = (11..=30).map(|i| format!("line {i}")).collect();
    assert_eq!(tail, expected);
}

#[tokio::test]
async fn collected_files_become_artifacts() {
    let harness = Harness::new().await;

    let outputs = run_shell(
        &harness,
        json!({
            "command": "mkdir -p out && printf 'a,b\\n1,2\\n' > out/result.csv && echo notes > notes.md",
            "collect": [
                {"path": "out/result.csv"},
                {"path": "notes.md", "name": "notes", "media_type": "text/plain"}
            ]
        }),
    )
    .await
    .unwrap();

    let artifacts = outputs["artifacts"].as_array().unwrap();
    assert_eq!(artifacts.len(), 2);
    assert_eq!(artifacts[0]["name"], "script/out/result.csv");
    assert_eq!(artifacts[0]["media_type"], "text/csv");
    assert_eq!(artifacts[1]["name"], "notes");
    assert_eq!(artifacts[1]["media_type"], "text/plain");
    let id = artifacts[0]["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        harness.artifacts.read(id, 1024).await.unwrap(),
        b"a,b\n1,2\n"
    );
}

#[tokio::test]
async fn a_missing_collected_file_is_a_permanent_error_naming_it() {
    let harness = Harness::new().await;

    let error = run_shell(
        &harness,
        json!({"command": "true", "collect": [{"path": "out/never-written.csv"}]}),
    )
    .await
    .unwrap_err();

    assert_eq!(
        error,
        ToolError::permanent("collected file not found: out/never-written.csv")
    );
}

#[tokio::test]
async fn shell_files_hold_upstream_artifacts_and_json_values() {
    let harness = Harness::new().await;
    let extract = harness.upstream_output("rows", "text/csv", b"x\n1\n").await;
    let context = harness.context("script", upstream(&[("extract", extract)]));

    ShellTool::new()
        .execute(
            context,
            json!({
                "command": "cat input/rows.csv; tr -d ' \\n' < params.json; echo",
                "files": {"input/rows.csv": "extract", "params.json": {"limit": 5}}
            }),
        )
        .await
        .unwrap();

    assert_eq!(
        harness.logs.of(LogStream::Stdout),
        vec!["x", "1", r#"{"limit":5}"#]
    );
}

/// Whether a process has ended: gone from `/proc`, or a zombie. A killed grandchild is
/// re-parented to PID 1, which in some containers never reaps it; as a zombie it is dead.
fn process_has_ended(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
    }
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[tokio::test]
async fn dropping_the_execute_future_kills_the_whole_process_group() {
    let harness = Harness::new().await;
    let context = harness.context("sleeper", BTreeMap::new());
    let work_dir = context.work_dir.clone();
    let tool = ShellTool::new();
    let script = "sleep 30 & echo $! > grandchild.tmp && mv grandchild.tmp grandchild.pid; \
                  echo $$ > child.tmp && mv child.tmp child.pid; sleep 30";
    // Boxed so that dropping it drops the future itself, not a pinned reference to it.
    let mut execution = Box::pin(tool.execute(context, json!({ "command": script })));

    // Drive the command until it has written both pids, bounded by 5 s.
    let deadline = Instant::now() + Duration::from_secs(5);
    let (child, grandchild) = loop {
        tokio::select! {
            result = execution.as_mut() => panic!("the command ended early: {result:?}"),
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
        if let (Some(child), Some(grandchild)) = (
            read_pid(&work_dir.join("child.pid")),
            read_pid(&work_dir.join("grandchild.pid")),
        ) {
            break (child, grandchild);
        }
        assert!(
            Instant::now() < deadline,
            "the script did not write its pids within 5 s"
        );
    };
    assert!(!process_has_ended(child));
    assert!(!process_has_ended(grandchild));

    // What the engine does on timeout or cancel.
    drop(execution);

    let deadline = Instant::now() + Duration::from_secs(5);
    while !(process_has_ended(child) && process_has_ended(grandchild)) {
        assert!(
            Instant::now() < deadline,
            "processes {child} and {grandchild} still run after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn background_jobs_are_killed_when_the_command_exits() {
    let harness = Harness::new().await;
    let context = harness.context("leaver", BTreeMap::new());
    let work_dir = context.work_dir.clone();

    // Without the kill the call would wait 30 s: the background job holds stdout open.
    ShellTool::new()
        .execute(context, json!({"command": "sleep 30 & echo $! > job.pid"}))
        .await
        .unwrap();

    let job = read_pid(&work_dir.join("job.pid")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !process_has_ended(job) {
        assert!(
            Instant::now() < deadline,
            "background job {job} still runs after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------
// file

#[tokio::test]
async fn the_file_tool_stores_a_local_file_and_writes_it_back_out() {
    let harness = Harness::new().await;
    let stored = FileTool::new()
        .execute(
            harness.context("import", BTreeMap::new()),
            json!({"path": PENGUINS_CSV}),
        )
        .await
        .unwrap();
    let artifact = &stored["artifact"];
    assert_eq!(artifact["name"], "penguins.csv");
    assert_eq!(artifact["media_type"], "text/csv");
    assert_eq!(artifact["table"]["rows"], json!(344));
    assert_eq!(artifact["table"]["columns"].as_array().unwrap().len(), 8);
    assert_eq!(artifact["table"]["columns"][0]["name"], "species");

    let destination = harness.path("exported/nested/penguins.csv");
    let context = harness.context("export", upstream(&[("import", stored)]));
    let written = FileTool::new()
        .execute(context, json!({"artifact": "import", "to": destination}))
        .await
        .unwrap();

    let original = std::fs::read(PENGUINS_CSV).unwrap();
    assert_eq!(written["path"], json!(destination));
    assert_eq!(written["size_bytes"], json!(original.len()));
    assert_eq!(std::fs::read(&destination).unwrap(), original);
}

#[tokio::test]
async fn the_file_tool_names_a_missing_path() {
    let harness = Harness::new().await;
    let missing = harness.path("nowhere/data.csv");

    let error = FileTool::new()
        .execute(
            harness.context("import", BTreeMap::new()),
            json!({"path": missing}),
        )
        .await
        .unwrap_err();

    assert_eq!(
        error,
        ToolError::permanent(format!("file not found: {}", missing.display()))
    );
}

// ---------------------------------------------------------------------------------------
// noop, echo and the registry

#[tokio::test]
async fn noop_returns_an_empty_object() {
    let harness = Harness::new().await;
    let outputs = NoopTool::new()
        .execute(
            harness.context("noop", BTreeMap::new()),
            json!({"anything": 1}),
        )
        .await
        .unwrap();
    assert_eq!(outputs, json!({}));
}

#[tokio::test]
async fn echo_fails_the_first_attempts_then_returns_its_inputs() {
    let harness = Harness::new().await;
    let inputs = json!({"fail": "flaky", "fail_times": 2, "value": [1, 2]});
    for attempt in 1..=3 {
        let mut context = harness.context("echo", BTreeMap::new());
        context.attempt = attempt;
        let result = EchoTool::new().execute(context, inputs.clone()).await;
        if attempt <= 2 {
            assert_eq!(result, Err(ToolError::transient("flaky")));
        } else {
            assert_eq!(result, Ok(inputs.clone()));
        }
    }
    assert_eq!(harness.logs.of(LogStream::Stdout), vec![inputs.to_string()]);
}

#[test]
fn the_builtin_registry_holds_every_tool_with_a_strict_schema() {
    let registry = builtin_registry();
    assert_eq!(
        registry.names().collect::<Vec<_>>(),
        vec!["agent", "approval", "echo", "file", "http", "llm", "noop", "shell", "sql", "wasm"]
    );
    for name in ["agent", "approval", "sql", "shell", "http", "llm", "wasm"] {
        let schema = registry.get(name).unwrap().input_schema();
        assert_eq!(schema["additionalProperties"], json!(false), "{name}");
    }
    let file = registry.get("file").unwrap().input_schema();
    for shape in file["oneOf"].as_array().unwrap() {
        assert_eq!(shape["additionalProperties"], json!(false));
    }
}

#[test]
fn tools_name_the_upstream_tasks_their_inputs_read() {
    let registry = builtin_registry();
    let tasks = ["load-penguins", "weather", "extract", "unrelated"];
    let sql = registry.get("sql").unwrap();
    let inputs = json!({
        "query": "WITH w AS (SELECT * FROM weather) \
                  SELECT * FROM load_penguins p JOIN w ON p.year = {{ params.year }} \
                  JOIN extra ON true JOIN cte_free ON true",
        "tables": {"extra": "extract", "cte_free": {"path": "x.csv"}}
    });
    let mut found = sql.implied_dependencies(&inputs, &tasks);
    found.sort();
    assert_eq!(found, vec!["extract", "load-penguins", "weather"]);

    let shell = registry.get("shell").unwrap();
    let inputs = json!({"command": "true", "files": {"a.csv": "extract", "b.json": {"x": 1}}});
    assert_eq!(shell.implied_dependencies(&inputs, &tasks), vec!["extract"]);

    let file = registry.get("file").unwrap();
    let inputs = json!({"artifact": "weather", "to": "out.csv"});
    assert_eq!(file.implied_dependencies(&inputs, &tasks), vec!["weather"]);
    assert!(!registry.get("noop").unwrap().needs_work_dir());
}

// ---------------------------------------------------------------------------------------
// shell sandbox: resource limits, namespaces, no orphans

/// The soft and hard values of a limit in `/proc/self/limits` as the command printed it.
fn limit_line(lines: &[String], name: &str) -> (String, String) {
    let line = lines
        .iter()
        .find(|line| line.starts_with(name))
        .unwrap_or_else(|| panic!("no {name:?} in {lines:?}"));
    let mut values = line[name.len()..].split_whitespace();
    (
        values.next().unwrap().to_owned(),
        values.next().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn shell_limits_are_set_on_the_command_itself() {
    let harness = Harness::new().await;
    assert!(
        ShellTool::new().sandbox_level().resource_limits,
        "util-linux prlimit is installed on the test machines"
    );

    run_shell(
        &harness,
        json!({
            "command": "cat /proc/self/limits",
            "limits": {"cpu_secs": 5, "memory_mb": 64, "open_files": 16, "processes": 100}
        }),
    )
    .await
    .unwrap();

    let lines = harness.logs.of(LogStream::Stdout);
    let pair = |soft: &str, hard: &str| (soft.to_owned(), hard.to_owned());
    assert_eq!(limit_line(&lines, "Max cpu time"), pair("5", "6"));
    assert_eq!(
        limit_line(&lines, "Max address space"),
        pair("67108864", "67108864")
    );
    assert_eq!(limit_line(&lines, "Max open files"), pair("16", "16"));
    assert_eq!(limit_line(&lines, "Max processes"), pair("100", "100"));
}

#[tokio::test]
async fn shell_applies_a_default_open_files_limit_and_nothing_else() {
    let harness = Harness::new().await;

    run_shell(&harness, json!({"command": "cat /proc/self/limits"}))
        .await
        .unwrap();

    let lines = harness.logs.of(LogStream::Stdout);
    let (worker_soft, worker_hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    let expected = 1024.min(worker_hard).to_string();
    assert!(worker_soft > 0);
    assert_eq!(
        limit_line(&lines, "Max open files"),
        (expected.clone(), expected)
    );
    assert_eq!(
        limit_line(&lines, "Max cpu time"),
        ("unlimited".to_owned(), "unlimited".to_owned())
    );
}

#[tokio::test]
async fn a_busy_loop_is_ended_by_the_cpu_limit_which_the_error_names() {
    let harness = Harness::new().await;
    let started = Instant::now();

    let error = run_shell(
        &harness,
        json!({"command": "while :; do :; done", "limits": {"cpu_secs": 1}}),
    )
    .await
    .unwrap_err();

    // One CPU second; the wall time allows for a machine busy with other builds.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    assert!(error.retryable);
    assert_eq!(
        error.message,
        "command was killed by signal 24 (SIGXCPU: the CPU time limit of 1 s was reached) \
         (task limits: cpu_secs=1)"
    );
}

#[tokio::test]
async fn the_open_files_limit_stops_a_command_opening_more_files() {
    let harness = Harness::new().await;
    // `paste` opens every file before reading any.
    let command = "for i in $(seq 32); do echo $i > f$i; done; paste $(seq -f f%g 32)";

    let error = run_shell(
        &harness,
        json!({"command": command, "limits": {"open_files": 16}}),
    )
    .await
    .unwrap_err();
    assert!(
        error
            .message
            .starts_with("command exited with status 1 (task limits: open_files=16)"),
        "{}",
        error.message
    );
    assert!(
        error.message.contains("Too many open files"),
        "{}",
        error.message
    );

    // The same command within a larger limit succeeds.
    run_shell(
        &harness,
        json!({"command": command, "limits": {"open_files": 64}}),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn the_memory_limit_stops_a_command_allocating_more() {
    let harness = Harness::new().await;
    // awk builds a 100 MB string.
    let command = r#"awk 'BEGIN { s = sprintf("%100000000s", ""); print length(s) }'"#;

    let error = run_shell(
        &harness,
        json!({"command": command, "limits": {"memory_mb": 64}}),
    )
    .await
    .unwrap_err();
    assert!(
        error.message.contains("(task limits: memory_mb=64)"),
        "{}",
        error.message
    );
    assert!(
        error.message.contains("memory"),
        "awk names the failed allocation: {}",
        error.message
    );

    run_shell(
        &harness,
        json!({"command": command, "limits": {"memory_mb": 1024}}),
    )
    .await
    .unwrap();
    assert_eq!(harness.logs.of(LogStream::Stdout), vec!["100000000"]);
}

#[tokio::test]
async fn the_processes_limit_is_set_but_only_enforced_for_a_user_other_than_root() {
    let harness = Harness::new().await;

    let result = run_shell(
        &harness,
        json!({"command": "(true) && echo forked", "limits": {"processes": 1}}),
    )
    .await;

    if arches_tools::shell::sandbox::effective_uid() == Some(0) {
        // RLIMIT_NPROC does not apply to root: documented, not a sandbox.
        result.unwrap();
        assert_eq!(harness.logs.of(LogStream::Stdout), vec!["forked"]);
    } else {
        let error = result.unwrap_err();
        assert!(
            error.message.contains("(task limits: processes=1)"),
            "{}",
            error.message
        );
    }
}

#[tokio::test]
async fn bad_limits_are_permanent_errors_naming_the_field() {
    let harness = Harness::new().await;
    let cases = [
        (json!({"cpu_secs": -1}), "limits.cpu_secs: must be an integer from 1 to 604800, got -1"),
        (json!({"cpu_secs": 0}), "limits.cpu_secs: must be an integer from 1 to 604800, got 0"),
        (json!({"cpu_secs": 1.5}), "limits.cpu_secs: must be an integer from 1 to 604800, got 1.5"),
        (
            json!({"memory_mb": 1_000_000_000_000_u64}),
            "limits.memory_mb: must be an integer from 16 to 16777216, got 1000000000000",
        ),
        (
            json!({"open_files": "many"}),
            "limits.open_files: must be an integer from 8 to 1048576, got \"many\"",
        ),
        (
            json!({"processes": 0}),
            "limits.processes: must be an integer from 1 to 4194304, got 0",
        ),
        (
            json!({"threads": 4}),
            "limits.threads: unknown limit; known are cpu_secs, memory_mb, open_files and processes",
        ),
        (json!([1]), "limits: must be an object"),
    ];
    for (limits, message) in cases {
        let error = run_shell(&harness, json!({"command": "true", "limits": limits}))
            .await
            .unwrap_err();
        assert_eq!(error, ToolError::permanent(message));
    }

    let schema = ShellTool::new().input_schema();
    let limits = &schema["properties"]["limits"];
    assert_eq!(limits["additionalProperties"], json!(false));
    assert_eq!(limits["properties"]["cpu_secs"]["minimum"], json!(1));
    assert_eq!(schema["properties"]["network"]["type"], json!("boolean"));
}

/// The network interfaces in a `/proc/net/dev` listing.
fn interfaces<S: AsRef<str>>(lines: &[S]) -> Vec<String> {
    let mut names: Vec<String> = lines
        .iter()
        .skip(2)
        .filter_map(|line| line.as_ref().split(':').next())
        .map(|name| name.trim().to_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn commands_run_without_network_when_namespaces_are_available() {
    let harness = Harness::new().await;
    let tool = ShellTool::new();
    let worker_net = std::fs::read_link("/proc/self/ns/net").unwrap();
    let worker_interfaces = interfaces(
        &std::fs::read_to_string("/proc/net/dev")
            .unwrap()
            .lines()
            .collect::<Vec<_>>(),
    );
    let command = "readlink /proc/self/ns/net; cat /proc/net/dev";

    tool.execute(
        harness.context("isolated", BTreeMap::new()),
        json!({ "command": command }),
    )
    .await
    .unwrap();
    let isolated = harness.logs.of(LogStream::Stdout);
    harness.logs.lines.lock().unwrap().clear();
    tool.execute(
        harness.context("networked", BTreeMap::new()),
        json!({ "command": command, "network": true }),
    )
    .await
    .unwrap();
    let networked = harness.logs.of(LogStream::Stdout);

    assert_eq!(networked[0], worker_net.to_str().unwrap());
    assert_eq!(interfaces(&networked[1..]), worker_interfaces);
    if tool.sandbox_level().network_isolation {
        // A fresh network namespace: only a loopback interface.
        assert_ne!(isolated[0], worker_net.to_str().unwrap());
        assert_eq!(interfaces(&isolated[1..]), vec!["lo"]);
        assert!(tool
            .sandbox()
            .warnings()
            .iter()
            .all(|w| !w.contains("namespaces")));
    } else {
        // The degraded level: the worker's network, and the warning logged once says so.
        assert_eq!(isolated, networked);
        assert!(
            tool.sandbox().warnings().iter().any(|warning| warning
                .starts_with("shell sandbox: Linux namespaces unavailable (")
                && warning.ends_with("); commands run without network isolation")),
            "{:?}",
            tool.sandbox().warnings()
        );
    }
}

#[tokio::test]
async fn without_working_helpers_the_sandbox_degrades_as_documented() {
    let harness = Harness::new().await;
    let sandbox = arches_tools::shell::Sandbox::probe_with(None, Some(PathBuf::from("/bin/false")));
    let tool = ShellTool::with_sandbox(sandbox);

    assert_eq!(
        tool.sandbox_level(),
        arches_tools::shell::SandboxLevel {
            resource_limits: false,
            network_isolation: false
        }
    );
    let warnings = tool.sandbox().warnings();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert_eq!(
        warnings[0],
        "shell sandbox: resource limits unavailable (util-linux prlimit not found in PATH); \
         tasks that set limits fail, others run without the default limits"
    );
    assert!(
        warnings[1].starts_with("shell sandbox: Linux namespaces unavailable (/bin/false --")
            && warnings[1]
                .ends_with("failed with exit status: 1); commands run without network isolation"),
        "{}",
        warnings[1]
    );

    // Limits asked for explicitly cannot be honoured: the attempt fails.
    let error = tool
        .execute(
            harness.context("limited", BTreeMap::new()),
            json!({"command": "true", "limits": {"cpu_secs": 1}}),
        )
        .await
        .unwrap_err();
    assert_eq!(
        error,
        ToolError::permanent("limits cannot be applied: util-linux prlimit not found in PATH")
    );

    // Without limits the command runs, in the worker's network namespace and limits.
    tool.execute(
        harness.context("plain", BTreeMap::new()),
        json!({"command": "readlink /proc/self/ns/net; grep 'Max open files' /proc/self/limits"}),
    )
    .await
    .unwrap();
    let stdout = harness.logs.of(LogStream::Stdout);
    let worker_net = std::fs::read_link("/proc/self/ns/net").unwrap();
    assert_eq!(stdout[0], worker_net.to_str().unwrap());
    let (soft, _) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    assert_eq!(
        limit_line(&stdout[1..], "Max open files").0,
        soft.to_string()
    );
}

/// A log that signals when the command printed `started`.
#[derive(Default)]
struct StartedLogs {
    started: tokio::sync::Notify,
}

#[async_trait]
impl LogSink for StartedLogs {
    async fn write(&self, stream: LogStream, text: &str) {
        if stream == LogStream::Stdout && text == "started" {
            self.started.notify_one();
        }
    }
}

/// Pids of live processes whose environment holds `needle`.
fn processes_with_environment(needle: &[u8]) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if environ
            .split(|&b| b == 0)
            .any(|variable| variable == needle)
            && !process_has_ended(pid)
        {
            found.push(pid);
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_shell_timeouts_leave_no_orphan_processes() {
    use futures::StreamExt;

    let harness = Harness::new().await;
    let tool = ShellTool::new();
    let marker = format!("SHELL_ORPHAN_MARKER={}", RunId::new());
    let (name, value) = marker.split_once('=').unwrap();
    let inputs = json!({
        // A background child and a foreground one, both in the command's group.
        "command": "sleep 1000 & echo started; sleep 1000",
        "env": {name: value}
    });

    // The scan sees a running command: the shell at least (its background child may be
    // in the middle of its exec, when its environment cannot be read).
    let mut context = harness.context("sleeper", BTreeMap::new());
    let logs = Arc::new(StartedLogs::default());
    context.logs = logs.clone();
    let mut execution = Box::pin(tool.execute(context, inputs.clone()));
    tokio::select! {
        result = execution.as_mut() => panic!("the command ended: {result:?}"),
        () = logs.started.notified() => {}
    }
    let running = processes_with_environment(marker.as_bytes());
    assert!(!running.is_empty(), "{running:?}");
    drop(execution);

    let started = Instant::now();
    futures::stream::iter(0..1000)
        .map(|_| {
            let mut context = harness.context("sleeper", BTreeMap::new());
            let logs = Arc::new(StartedLogs::default());
            context.logs = logs.clone();
            let execution = tool.execute(context, inputs.clone());
            async move {
                let mut execution = Box::pin(execution);
                let started = async {
                    tokio::select! {
                        result = execution.as_mut() => panic!("the command ended: {result:?}"),
                        () = logs.started.notified() => {}
                    }
                };
                tokio::time::timeout(Duration::from_secs(20), started)
                    .await
                    .expect("the command starts within 20 s");
                // What the engine does on timeout.
                drop(execution);
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    let elapsed = started.elapsed();

    // SIGKILL was sent to every group before its future was gone; the processes end as soon
    // as the kernel delivers it. Bounded final check.
    let deadline = Instant::now() + Duration::from_secs(10);
    let needle = marker.as_bytes().to_vec();
    let left = tokio::task::spawn_blocking(move || {
        processes_with_environment(&needle)
            .into_iter()
            .filter(|&pid| !arches_tools::shell::process_exits_before(pid, deadline))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert!(
        left.is_empty(),
        "{} marked processes still run 10 s after the last drop: {left:?}",
        left.len()
    );
    eprintln!(
        "1000 shell timeouts took {elapsed:?} (sandbox {:?}), all processes gone after {:?}",
        tool.sandbox_level(),
        started.elapsed()
    );
}

#[tokio::test]
async fn the_wrappers_exec_the_command_which_leads_its_process_group() {
    let harness = Harness::new().await;

    // Limits and namespaces both in force here: prlimit and unshare are in the chain.
    run_shell(
        &harness,
        json!({
            "command": "set -- $(cat /proc/$$/stat); echo \"$1 $5 $6\"",
            "limits": {"cpu_secs": 60}
        }),
    )
    .await
    .unwrap();

    let stdout = harness.logs.of(LogStream::Stdout);
    let fields: Vec<i32> = stdout[0]
        .split(' ')
        .map(|field| field.parse().unwrap())
        .collect();
    let (pid, group, session) = (fields[0], fields[1], fields[2]);
    // The spawned process (the first wrapper) became the shell: it leads the group the
    // tool created, so killing the group reaches everything the command starts.
    assert_eq!(pid, group);
    // No wrapper started a new session.
    assert_ne!(session, pid);
}
