use crate::{arches, output, pipeline_file};

fn run_yaml(yaml: &str) -> (bool, String, String, tempfile::TempDir) {
    let home = tempfile::tempdir().unwrap();
    let file = pipeline_file(home.path(), "p.yaml", yaml);
    let (out, stdout, stderr) = output(arches(home.path()).arg("run").arg("--quiet").arg(&file));
    (out.status.success(), stdout, stderr, home)
}

#[test]
fn malformed_yaml_is_reported_with_its_line_and_column() {
    let home = tempfile::tempdir().unwrap();
    let file = pipeline_file(
        home.path(),
        "bad.yaml",
        "name: x\ntasks:\n  - id: a\n    tool: [noop\n",
    );
    let (out, _, stderr) = output(arches(home.path()).arg("validate").arg(&file));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("malformed_yaml"), "{stderr}");
    assert!(stderr.contains("bad.yaml:"), "{stderr}");
}

#[test]
fn every_validation_problem_is_reported_at_once() {
    let home = tempfile::tempdir().unwrap();
    let yaml = "name: x\ntasks:\n  - id: a\n    tool: sqll\n  - id: b\n    tool: noop\n    depends_on: [c]\n  - id: c\n    tool: noop\n    depends_on: [b]\n  - id: a\n    tool: noop\n";
    let file = pipeline_file(home.path(), "bad.yaml", yaml);
    let (out, _, stderr) = output(arches(home.path()).arg("validate").arg(&file));
    assert_eq!(out.status.code(), Some(2));
    for code in ["unknown_tool", "cycle", "duplicate_task_id"] {
        assert!(stderr.contains(code), "{code} missing:\n{stderr}");
    }
    assert!(stderr.contains("did you mean"), "{stderr}");
    // Nothing ran: no store was created.
    let (run, _, _) = output(arches(home.path()).arg("run").arg(&file));
    assert_eq!(run.status.code(), Some(2));
    assert!(!home.path().join("arches.db").exists());
}

#[test]
fn a_missing_input_file_fails_the_run_naming_the_path() {
    let (ok, stdout, _, _) = run_yaml("name: x\ntasks:\n  - id: load\n    tool: file\n    with:\n      path: /nonexistent/penguins.csv\n");
    assert!(!ok);
    assert!(stdout.contains("/nonexistent/penguins.csv"), "{stdout}");
}

#[test]
fn a_sql_syntax_error_fails_the_task_with_the_query() {
    let yaml = "name: x\ntasks:\n  - id: q\n    tool: sql\n    with:\n      query: SELEC 1\n";
    let (ok, stdout, _, _) = run_yaml(yaml);
    assert!(!ok);
    assert!(stdout.contains("syntax"), "{stdout}");
}

#[test]
fn a_command_that_does_not_exist_fails_clearly_and_the_run_stops_downstream() {
    let yaml = "name: x\ntasks:\n  - id: s\n    tool: shell\n    with:\n      command: definitely-not-a-command --flag\n  - id: after\n    tool: noop\n    depends_on: [s]\n";
    let (ok, stdout, _, _) = run_yaml(yaml);
    assert!(!ok);
    assert!(stdout.contains("command not found"), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("after") && l.contains("skipped")),
        "{stdout}"
    );
}

#[test]
fn non_utf8_and_huge_output_are_logged_safely() {
    let yaml = "name: x\ntasks:\n  - id: s\n    tool: shell\n    with:\n      command: \"printf 'caf\\\\351\\\\n'; head -c 30000000 /dev/zero | tr '\\\\0' 'a'; echo\"\n";
    let (ok, stdout, stderr, home) = run_yaml(yaml);
    assert!(ok, "{stdout}{stderr}");
    let run_id = stderr.split_whitespace().nth(1).unwrap().to_owned();
    let (_, logs, _) = output(arches(home.path()).args(["runs", "logs", &run_id]));
    assert!(
        logs.contains("caf\u{FFFD}"),
        "{}",
        &logs[..logs.len().min(300)]
    );
    assert!(
        logs.len() < 2_000_000,
        "huge output was not bounded: {} bytes",
        logs.len()
    );
}

#[test]
fn a_full_disk_fails_the_task_with_the_cause() {
    let yaml = "name: x\ntasks:\n  - id: s\n    tool: shell\n    with:\n      command: \"dd if=/dev/zero of=/dev/full bs=1k count=1\"\n";
    let (ok, stdout, _, _) = run_yaml(yaml);
    assert!(!ok);
    assert!(stdout.to_lowercase().contains("no space left"), "{stdout}");
}

#[test]
fn a_param_of_the_wrong_type_is_refused_before_running() {
    let home = tempfile::tempdir().unwrap();
    let file = pipeline_file(home.path(), "p.yaml", "name: x\nparams:\n  n:\n    type: integer\n    default: 1\ntasks:\n  - id: a\n    tool: noop\n");
    let (out, _, stderr) = output(
        arches(home.path())
            .arg("run")
            .arg(&file)
            .args(["--param", "n=abc"]),
    );
    assert!(!out.status.success());
    assert!(
        stderr.contains("param n") && stderr.contains("integer"),
        "{stderr}"
    );
    let (out, _, stderr) = output(
        arches(home.path())
            .arg("run")
            .arg(&file)
            .args(["--param", "zz=1"]),
    );
    assert!(!out.status.success());
    assert!(stderr.contains("unknown param"), "{stderr}");
}

#[test]
fn an_enormous_timeout_is_no_deadline_and_an_impossible_one_is_refused() {
    let (ok, stdout, stderr, _home) = run_yaml("name: x\ntasks:\n  - id: s\n    tool: shell\n    timeout: 1e19\n    with:\n      command: echo fine\n");
    assert!(ok, "{stdout}{stderr}");
    let (ok, _, stderr, _home) =
        run_yaml("name: x\ntasks:\n  - id: s\n    tool: noop\n    timeout: \"1e30\"\n");
    assert!(!ok);
    assert!(stderr.contains("too large"), "{stderr}");
}
