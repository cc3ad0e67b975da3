use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::{arches, output, pipeline_file};

/// Waits for a file to appear, bounded; the condition is the file, not a fixed delay.
fn await_file(path: &std::path::Path, bound: Duration) {
    let deadline = Instant::now() + bound;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not appear within {bound:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `arches run --quiet FILE` in the background and returns the process with the run id
/// from its first line. The process's stderr reader is dropped after that line, so its stderr
/// is a closed pipe from then on (which it must survive).
fn start_run(home: &std::path::Path, file: &std::path::Path) -> (std::process::Child, String) {
    let mut child = arches(home)
        .args(["run", "--quiet"])
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let run_id = line
        .strip_prefix("run ")
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    (child, run_id)
}

#[test]
fn a_run_killed_with_sigkill_is_finished_by_resume_without_rerunning_succeeded_tasks() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let yaml = format!(
        r#"
name: crash
tasks:
  - id: first
    tool: shell
    with:
      command: "echo ran >> {d}/first-runs"
  - id: second
    tool: shell
    depends_on: [first]
    with:
      command: "echo ran >> {d}/second-runs; if [ -f {d}/release ]; then echo released; else touch {d}/second-started; sleep 60; fi"
  - id: third
    tool: shell
    depends_on: [second]
    with:
      command: "echo ran >> {d}/third-runs"
"#
    );
    let file = pipeline_file(dir.path(), "crash.yaml", &yaml);
    let (mut child, run_id) = start_run(home.path(), &file);
    await_file(&dir.path().join("second-started"), Duration::from_secs(30));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    child.wait().unwrap();

    // The store shows the run as it stood: first succeeded, second running.
    let (_, shown, _) = output(arches(home.path()).args(["runs", "show", &run_id]));
    assert!(shown.contains("state     running"), "{shown}");
    assert!(
        shown
            .lines()
            .any(|l| l.contains("first") && l.contains("succeeded")),
        "{shown}"
    );

    std::fs::write(dir.path().join("release"), "").unwrap();
    let (resume, stdout, stderr) = output(arches(home.path()).args(["resume", "--quiet", &run_id]));
    assert!(resume.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("succeeded in"), "{stdout}");

    let runs = |name: &str| {
        std::fs::read_to_string(dir.path().join(name))
            .unwrap_or_default()
            .lines()
            .count()
    };
    assert_eq!(runs("first-runs"), 1, "a succeeded task ran again");
    assert_eq!(runs("second-runs"), 2, "the interrupted task runs again");
    assert_eq!(runs("third-runs"), 1);

    // The interrupted attempt is kept in the history as lost.
    let (_, shown, _) = output(arches(home.path()).args(["runs", "show", &run_id]));
    assert!(
        shown
            .lines()
            .any(|l| l.contains("second") && l.contains("succeeded") && l.contains(" 2 ")),
        "{shown}"
    );

    // Resuming a finished run changes nothing.
    let (again, stdout, _) = output(arches(home.path()).args(["resume", &run_id]));
    assert!(again.status.success());
    assert!(stdout.contains("already succeeded"), "{stdout}");
}

#[test]
fn cancelling_a_run_whose_process_died_records_it_in_the_store() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let yaml = format!(
        "name: stuck\ntasks:\n  - id: wait\n    tool: shell\n    with:\n      command: \"touch {d}/started; sleep 60\"\n  - id: after\n    tool: noop\n    depends_on: [wait]\n"
    );
    let file = pipeline_file(dir.path(), "stuck.yaml", &yaml);
    let (mut child, run_id) = start_run(home.path(), &file);
    await_file(&dir.path().join("started"), Duration::from_secs(30));
    child.kill().unwrap();
    child.wait().unwrap();

    let (cancel, stdout, stderr) = output(arches(home.path()).args(["cancel", &run_id]));
    assert!(cancel.status.success(), "{stdout}{stderr}");
    let (_, shown, _) = output(arches(home.path()).args(["runs", "show", &run_id]));
    assert!(shown.contains("state     cancelled"), "{shown}");
    assert!(
        shown
            .lines()
            .any(|l| l.contains("after") && l.contains("skipped")),
        "{shown}"
    );
}

#[test]
fn cancelling_a_live_run_stops_its_running_task_and_skips_the_rest() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let yaml = format!(
        "name: live\ntasks:\n  - id: wait\n    tool: shell\n    with:\n      command: \"echo $$ > {d}/pid; touch {d}/started; sleep 60\"\n  - id: after\n    tool: noop\n    depends_on: [wait]\n"
    );
    let file = pipeline_file(dir.path(), "live.yaml", &yaml);
    // After the first line the owner's stderr is a closed pipe when it reports the
    // interrupt: that must not kill it either.
    let (mut child, run_id) = start_run(home.path(), &file);
    await_file(&dir.path().join("started"), Duration::from_secs(30));
    let shell_pid: i32 = std::fs::read_to_string(dir.path().join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    let (cancel, stdout, stderr) = output(arches(home.path()).args(["cancel", &run_id]));
    assert!(cancel.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("asked process"), "{stdout}");

    // The owner cancels, records it, and exits with failure.
    let status = child.wait().unwrap();
    assert!(!status.success());
    let (_, shown, _) = output(arches(home.path()).args(["runs", "show", &run_id]));
    assert!(shown.contains("state     cancelled"), "{shown}");
    assert!(
        shown
            .lines()
            .any(|l| l.contains("wait") && l.contains("cancelled")),
        "{shown}"
    );
    assert!(
        shown
            .lines()
            .any(|l| l.contains("after") && l.contains("skipped")),
        "{shown}"
    );
    // The task's shell is gone with its process group.
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::path::Path::new(&format!("/proc/{shell_pid}")).exists() {
        let stat = std::fs::read_to_string(format!("/proc/{shell_pid}/stat")).unwrap_or_default();
        if stat.split_whitespace().nth(2) == Some("Z") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the task's shell {shell_pid} still runs"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
