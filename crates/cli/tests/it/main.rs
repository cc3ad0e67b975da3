//! End-to-end tests of the `arches` binary: real processes, a real SQLite file, real data.
//! One test binary for the whole CLI (see STYLE.md).

mod bad_input;
mod penguins;
mod resume;
mod serve;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root, where the examples live.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

/// An `arches` command with its home in `home`, run from the repository root.
pub fn arches(home: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_arches"));
    command
        .current_dir(repo_root())
        .env("ARCHES_HOME", home)
        .env_remove("ARCHES_LOG");
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
