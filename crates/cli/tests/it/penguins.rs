use crate::{arches, output};

#[test]
fn the_penguins_pipeline_runs_end_to_end_and_its_artifacts_can_be_read() {
    let home = tempfile::tempdir().unwrap();
    let (run, stdout, stderr) =
        output(arches(home.path()).args(["run", "--quiet", "examples/penguins/pipeline.yaml"]));
    assert!(run.status.success(), "run failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("succeeded in"), "{stdout}");
    let run_id = stderr
        .lines()
        .find_map(|l| {
            l.strip_prefix("run ")
                .and_then(|r| r.split_whitespace().next())
        })
        .expect("run id printed")
        .to_owned();

    // The report holds the real figures: 342 birds with measurements, and both files agree.
    let (cat, report, _) =
        output(arches(home.path()).args(["artifacts", "cat", "penguins/report.md"]));
    assert!(cat.status.success());
    assert!(
        report.contains("342 birds with complete measurements, 342 rows after joining"),
        "{report}"
    );
    assert!(report.contains("| Gentoo | Biscoe | 123 |"), "{report}");
    assert!(report.contains("| Adelie | 151 | 151 | true |"), "{report}");
    assert!(
        report.contains("| Chinstrap | 68 | 68 | true |"),
        "{report}"
    );

    // Every task is listed with its state; the fan-out made one item per species.
    let (show, shown, _) = output(arches(home.path()).args(["runs", "show", &run_id, "--items"]));
    assert!(show.status.success());
    for task in [
        "load_raw",
        "clean",
        "by_species_island",
        "by_year_sex",
        "enriched",
        "crosscheck",
        "report",
    ] {
        assert!(
            shown
                .lines()
                .any(|l| l.contains(task) && l.contains("succeeded")),
            "{task} missing:\n{shown}"
        );
    }
    assert_eq!(shown.matches("profile[").count(), 3, "{shown}");

    // The shell step's stdout is in the task log.
    let (logs, logged, _) = output(arches(home.path()).args(["runs", "logs", &run_id, "report"]));
    assert!(logs.status.success());
    assert!(logged.contains("# Palmer penguins"), "{logged}");

    // Artifacts carry table metadata and lineage.
    let (show, artifact, _) =
        output(arches(home.path()).args(["artifacts", "show", "penguins/clean.parquet"]));
    assert!(show.status.success());
    let artifact: serde_json::Value = serde_json::from_str(&artifact).unwrap();
    assert_eq!(artifact["table"]["rows"], 342);
    assert_eq!(artifact["lineage"]["produced_by"]["task_id"], "clean");
    assert_eq!(artifact["lineage"]["inputs"][0]["name"], "penguins/raw.csv");

    // A second run makes new versions of the same names.
    let (again, _, _) =
        output(arches(home.path()).args(["run", "--quiet", "examples/penguins/pipeline.yaml"]));
    assert!(again.status.success());
    let (_, listed, _) =
        output(arches(home.path()).args(["artifacts", "list", "--name", "penguins/report.md"]));
    assert!(listed.contains("penguins/report.md ┆ 2"), "{listed}");
    let out = home.path().join("report-v1.md");
    let (get, _, _) = output(
        arches(home.path())
            .args(["artifacts", "get", "penguins/report.md@1", "--output"])
            .arg(&out),
    );
    assert!(get.status.success());
    assert!(std::fs::read_to_string(&out)
        .unwrap()
        .starts_with("# Palmer penguins"));
}

#[test]
fn the_pipeline_graph_renders_as_text_dot_and_mermaid() {
    let home = tempfile::tempdir().unwrap();
    let (dot, text, _) = output(arches(home.path()).args([
        "graph",
        "examples/penguins/pipeline.yaml",
        "--format",
        "dot",
    ]));
    assert!(dot.status.success());
    assert!(text.starts_with("digraph"), "{text}");
    assert!(text.contains("\"clean\" -> \"enriched\""), "{text}");
    let (mermaid, text, _) = output(arches(home.path()).args([
        "graph",
        "examples/penguins/pipeline.yaml",
        "--format",
        "mermaid",
    ]));
    assert!(mermaid.status.success());
    assert!(text.contains("clean --> enriched"), "{text}");
    let (plain, text, _) =
        output(arches(home.path()).args(["graph", "examples/penguins/pipeline.yaml"]));
    assert!(plain.status.success());
    assert!(text.contains("report"), "{text}");
}

#[test]
fn the_wasm_example_computes_fibonacci_numbers_in_the_sandbox() {
    let home = tempfile::tempdir().unwrap();
    let (run, stdout, stderr) = output(arches(home.path()).args([
        "run",
        "--quiet",
        "examples/wasm/pipeline.yaml",
        "-p",
        "n=30",
    ]));
    assert!(run.status.success(), "run failed:\n{stdout}\n{stderr}");
    // fib(30) = 832040, and the fan-out's fib(1..=5).
    assert!(stdout.contains(r#""fib":832040"#), "{stdout}");
    assert!(stdout.contains(r#""smaller":[1,1,2,3,5]"#), "{stdout}");
}
