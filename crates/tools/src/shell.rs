//! The `shell` tool: runs a command in the attempt's working directory, in its own process
//! group, with a scrubbed environment, streaming its output to the task's log.
//!
//! The tool must never leave processes behind: when the attempt's future is dropped (timeout,
//! cancel, shutdown) a guard kills the whole process group, and when the command exits the
//! processes it left in its group are killed too. A process that moves itself to another
//! group or session (`setsid`) escapes this; containing it needs cgroups.
//!
//! Commands run in a sandbox when the worker allows it (see [`sandbox`]): resource limits
//! applied with util-linux `prlimit`, and new network and mount namespaces entered with
//! `unshare`. Both helpers `exec` the command, so it keeps the process group the tool
//! created and the group kill above still reaches everything it started.

pub mod sandbox;

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};

use arches_core::ports::{LogSink, Tool, ToolContext, ToolError};
use arches_core::records::{LogStream, NewArtifact};
use async_trait::async_trait;
use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::common::{
    artifact_json, copy_artifact_to, parse_inputs, relative_path, resolve_single_artifact,
    store_error, upstream_task_artifacts,
};
use crate::media_type;

pub use sandbox::{process_exits_before, Limits, Namespaces, Sandbox, SandboxLevel};

/// Longest line logged; the rest of a longer line is dropped.
pub const LOG_LINE_BYTES_MAX: usize = 64 * 1024;
/// Most lines logged per stream (stdout, stderr) and attempt.
pub const LOG_LINES_MAX: usize = 10_000;
/// Most bytes logged per stream and attempt.
pub const LOG_BYTES_MAX: usize = 10 * 1024 * 1024;
/// Stderr lines quoted in the error of a failed command.
pub const STDERR_TAIL_LINES_MAX: usize = 20;
/// Largest output file (`ARCHES_OUTPUT`) read back.
pub const OUTPUT_FILE_BYTES_MAX: u64 = 16 * 1024 * 1024;
/// Name of the output file in the working directory.
pub const OUTPUT_FILE_NAME: &str = "arches-output.json";
/// Bytes of the end of stderr kept for the error message.
const STDERR_TAIL_BYTES_MAX: usize = 16 * 1024;
/// Size of one read from a pipe.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Variables of the worker's environment a command inherits; everything else is scrubbed.
const INHERITED_VARIABLES: [&str; 4] = ["PATH", "HOME", "LANG", "TMPDIR"];
/// `PATH` when the worker has none.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// The `shell` tool.
///
/// Inputs (exactly one of `command` and `argv`):
/// - `command` (string): run with `/bin/sh -c`.
/// - `argv` (array of strings, at least one): a program and its arguments, run directly; the
///   program is looked up in `PATH`.
/// - `env` (object, string → string): variables added to the environment. The environment
///   is otherwise scrubbed: only `PATH`, `HOME`, `LANG` and `TMPDIR` are inherited from the
///   worker, and the tool sets `ARCHES_OUTPUT`, `ARCHES_WORK_DIR`, `ARCHES_RUN_ID`,
///   `ARCHES_TASK_ID`, `ARCHES_TASK_RUN_ID`, `ARCHES_ATTEMPT` and, for fan-out items,
///   `ARCHES_ITEM` (JSON), which take precedence over declared variables of the same name.
///   The worker's own `ARCHES_*` variables are not passed on: they configure the server and
///   may hold secrets.
/// - `files` (object): relative file name → content placed in the working directory before
///   the command starts: an upstream task id (string; its one artifact), `{"artifact":
///   "<upstream task id | artifact id | name[@version]>"}`, or any other JSON value, written
///   as a JSON file.
/// - `collect` (array of `{"path", "name"?, "media_type"?}`): files (relative to the working
///   directory) stored as artifacts after the command succeeds; the name defaults to
///   `<task id>/<path>` and the media type to one inferred from the extension.
/// - `stdin` (string): written to the command's standard input, which is then closed; without
///   it standard input is empty.
/// - `limits` (object): resource limits, each optional: `cpu_secs` (RLIMIT_CPU, 1 to one
///   week; SIGXCPU at the limit, SIGKILL a second later), `memory_mb` (RLIMIT_AS, address
///   space, 16 MiB to 16 TiB), `open_files` (RLIMIT_NOFILE, 8 to 1,048,576) and `processes`
///   (RLIMIT_NPROC, 1 to 4,194,304). Defaults: `open_files` 1024 (or the worker's lower hard
///   limit); the others stay as the worker has them. CPU time is not limited by default
///   because the task's timeout bounds wall time, and address space is not because programs
///   that reserve large address spaces (JVMs, Go) would fail under any small default.
///   RLIMIT_NPROC counts every process and thread of the command's real user id on the whole
///   system (the worker's own threads and other tasks' processes included) and the kernel
///   does not enforce it for root or a process with `CAP_SYS_RESOURCE`/`CAP_SYS_ADMIN`, so
///   it has no default and, for a worker running as root, is set but not enforced.
/// - `network` (boolean, default false): when the worker supports namespaces, `false` runs
///   the command in a new network namespace (only a loopback interface, down: no network);
///   `true` keeps the worker's network. Either way the command gets a private mount namespace.
///
/// Sandbox rules (probed once per process, see [`Sandbox::probe`] and
/// [`ShellTool::sandbox_level`]): limits are applied through `prlimit`; without it an attempt
/// whose task sets `limits` fails permanently, and other attempts run without the default
/// limits (one warning logged per process). Namespaces are entered with `unshare --net
/// --mount` (plus `--user --map-root-user` for a worker not running as root); when the probe
/// fails, one warning is logged per process (`shell sandbox: Linux namespaces unavailable
/// (<reason>); commands run without network isolation`) and commands run in the worker's
/// namespaces. For `argv`, the program is looked up in `PATH` (the command's) before the
/// wrappers run, so a missing program is still reported as `command not found`.
///
/// The command runs in the working directory. Its stdout and stderr are logged line by line
/// while it runs (lossy UTF-8, lines cut at 64 KiB, at most 10,000 lines and 10 MiB per
/// stream, then one `output truncated` system line).
///
/// Outputs: the JSON object the command wrote to the file named by `ARCHES_OUTPUT`, if any,
/// with `"exit_code": 0` and `"artifacts": [<ArtifactRecord>, ...]` (the collected files) set
/// by the tool.
///
/// Errors: `command exited with status N` with the last stderr lines, retryable (with the
/// task's limits named when it set some, and `SIGXCPU: the CPU time limit of N s was
/// reached` for a command the CPU limit ended); `command
/// not found: X` (exit status 127 of `sh`, or a missing `argv` program), permanent; an
/// output file that is not a JSON object, or a declared file to collect that is missing,
/// permanent.
#[derive(Clone, Debug)]
pub struct ShellTool {
    sandbox: Sandbox,
}

impl Default for ShellTool {
    fn default() -> Self {
        Self::new()
    }
}

impl ShellTool {
    /// The tool, with the sandbox this process supports ([`Sandbox::detected`], probed once).
    pub fn new() -> Self {
        Self::with_sandbox(Sandbox::detected().clone())
    }

    /// The tool with the given sandbox, for example one from [`Sandbox::probe_with`].
    pub fn with_sandbox(sandbox: Sandbox) -> Self {
        Self { sandbox }
    }

    /// What the sandbox enforces on this worker.
    pub fn sandbox_level(&self) -> SandboxLevel {
        self.sandbox.level()
    }

    /// The sandbox.
    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShellInputs {
    command: Option<String>,
    argv: Option<Vec<String>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    files: BTreeMap<String, Value>,
    #[serde(default)]
    collect: Vec<CollectSpec>,
    stdin: Option<String>,
    limits: Option<Value>,
    #[serde(default)]
    network: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CollectSpec {
    path: String,
    name: Option<String>,
    media_type: Option<String>,
}

/// What runs: a shell command line or a program with arguments.
enum Invocation {
    Shell(String),
    Program(Vec<String>),
}

impl Invocation {
    fn from_inputs(inputs: &mut ShellInputs) -> Result<Self, ToolError> {
        match (inputs.command.take(), inputs.argv.take()) {
            (Some(command), None) => Ok(Self::Shell(command)),
            (None, Some(argv)) if !argv.is_empty() => Ok(Self::Program(argv)),
            (None, Some(_)) => Err(ToolError::permanent("argv needs at least the program")),
            (Some(_), Some(_)) => Err(ToolError::permanent(
                "give either command or argv, not both",
            )),
            (None, None) => Err(ToolError::permanent("give command or argv")),
        }
    }

    /// The command in the sandbox; the program of `argv` is looked up in `search_path` (the
    /// command's `PATH`) first, so that a wrapper never reports a missing program.
    fn command(
        &self,
        sandbox: &Sandbox,
        limits: Option<Limits>,
        network: bool,
        search_path: &OsStr,
        work_dir: &Path,
    ) -> Result<Command, ToolError> {
        Ok(match self {
            Self::Shell(line) => sandbox.command(
                Path::new("/bin/sh"),
                &["-c".to_owned(), line.clone()],
                limits,
                network,
            ),
            Self::Program(argv) => {
                let program = resolve_program(&argv[0], search_path, work_dir)?;
                sandbox.command(&program, &argv[1..], limits, network)
            }
        })
    }

    fn program(&self) -> &str {
        match self {
            Self::Shell(_) => "/bin/sh",
            Self::Program(argv) => &argv[0],
        }
    }

    /// The command `sh` did not find: from its message on stderr (`sh: 1: foo: not found`
    /// from dash, `bash: line 1: foo: command not found` from bash), else the first word.
    fn missing_command(&self, stderr_tail: &[String]) -> String {
        for line in stderr_tail.iter().rev() {
            let line = line.trim_end();
            let head = line
                .strip_suffix(": command not found")
                .or_else(|| line.strip_suffix(": not found"));
            if let Some(head) = head {
                let name = head.rsplit(": ").next().unwrap_or(head).trim();
                if !name.is_empty() {
                    return name.to_owned();
                }
            }
        }
        match self {
            Self::Shell(line) => line
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned(),
            Self::Program(argv) => argv[0].clone(),
        }
    }
}

/// The executable file `execvp` would run for `name`: a name with a slash is a path
/// (relative to the working directory), any other is looked up in `search_path`.
fn resolve_program(name: &str, search_path: &OsStr, work_dir: &Path) -> Result<PathBuf, ToolError> {
    let not_executable = || ToolError::permanent(format!("command is not executable: {name}"));
    if name.contains('/') {
        let path = work_dir.join(name);
        return match std::fs::metadata(&path) {
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                Err(ToolError::permanent(format!("command not found: {name}")))
            }
            _ if sandbox::is_executable(&path) => Ok(path),
            _ => Err(not_executable()),
        };
    }
    let mut seen_file = false;
    for dir in std::env::split_paths(search_path) {
        let candidate = work_dir.join(dir).join(name);
        if sandbox::is_executable(&candidate) {
            return Ok(candidate);
        }
        seen_file |= candidate.is_file();
    }
    if seen_file {
        Err(not_executable())
    } else {
        Err(ToolError::permanent(format!("command not found: {name}")))
    }
}

/// The child and its process group; kills the group when dropped before the child exited.
struct ProcessGroup {
    child: Option<Child>,
    group: Pid,
    exited: bool,
}

impl ProcessGroup {
    fn new(child: Child) -> Result<Self, ToolError> {
        let pid = child
            .id()
            .ok_or_else(|| ToolError::transient("the command exited before it could be watched"))?;
        let group = i32::try_from(pid)
            .map(Pid::from_raw)
            .map_err(|_| ToolError::transient(format!("process id {pid} is out of range")))?;
        Ok(Self {
            child: Some(child),
            group,
            exited: false,
        })
    }

    /// Waits for the child, then kills whatever it left running in its group (background
    /// jobs that would otherwise outlive the attempt and hold its output pipes open).
    async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        let status = match self.child.as_mut() {
            Some(child) => child.wait().await,
            None => Err(std::io::Error::other("the command was already waited for")),
        };
        // The group id cannot be reused while any process of the group lives; once the group
        // is empty the kill finds nothing (ESRCH). The window in which the pid could have
        // been handed to a new process group between the reap above and this call is a
        // few instructions long and would need the whole pid space to wrap around.
        self.kill();
        self.exited = true;
        status
    }

    fn kill(&self) {
        match killpg(self.group, Signal::SIGKILL) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(error) => {
                tracing::warn!(group = self.group.as_raw(), %error, "cannot kill process group")
            }
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if self.exited {
            return;
        }
        self.kill();
        // Reap the killed child so that it does not linger as a zombie. Without a runtime
        // (shutdown), tokio's own orphan reaping of a child dropped with `kill_on_drop`
        // takes over.
        if let Some(mut child) = self.child.take() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let _ = child.wait().await;
                });
            }
        }
    }
}

/// What remains of a stream once it has been logged.
struct StreamSummary {
    /// The last bytes, for stderr.
    tail: Vec<u8>,
    /// Whether `tail` lost its beginning.
    tail_cut: bool,
}

impl StreamSummary {
    /// The last lines, lossily decoded.
    fn last_lines(&self, count: usize) -> Vec<String> {
        let text = String::from_utf8_lossy(&self.tail);
        let mut lines: Vec<&str> = text.lines().collect();
        if self.tail_cut && !lines.is_empty() {
            // The first line is a fragment.
            lines.remove(0);
        }
        while lines.last().is_some_and(|line| line.trim().is_empty()) {
            lines.pop();
        }
        let start = lines.len().saturating_sub(count);
        lines[start..]
            .iter()
            .map(|line| (*line).to_owned())
            .collect()
    }
}

/// Splits a stream into lines and logs them within the bounds; after the bounds it keeps
/// draining the pipe, so that the child never blocks on a full pipe, and counts what it drops.
struct LineLogger<'a> {
    stream: LogStream,
    logs: &'a dyn LogSink,
    line: Vec<u8>,
    lines_logged: usize,
    bytes_logged: usize,
    dropped_bytes: u64,
    full: bool,
}

impl<'a> LineLogger<'a> {
    fn new(stream: LogStream, logs: &'a dyn LogSink) -> Self {
        Self {
            stream,
            logs,
            line: Vec::new(),
            lines_logged: 0,
            bytes_logged: 0,
            dropped_bytes: 0,
            full: false,
        }
    }

    async fn push(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() {
            if self.full {
                self.dropped_bytes += chunk.len() as u64;
                return;
            }
            match chunk.iter().position(|&b| b == b'\n') {
                Some(end) => {
                    self.append(&chunk[..end]);
                    self.emit().await;
                    chunk = &chunk[end + 1..];
                }
                None => {
                    self.append(chunk);
                    return;
                }
            }
        }
    }

    fn append(&mut self, bytes: &[u8]) {
        let room = LOG_LINE_BYTES_MAX.saturating_sub(self.line.len());
        self.line.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    async fn emit(&mut self) {
        let mut end = self.line.len();
        if self.line.last() == Some(&b'\r') {
            end -= 1;
        }
        if self.lines_logged >= LOG_LINES_MAX || self.bytes_logged + end > LOG_BYTES_MAX {
            self.full = true;
            self.dropped_bytes += self.line.len() as u64 + 1;
        } else {
            let text = String::from_utf8_lossy(&self.line[..end]);
            self.logs.write(self.stream, &text).await;
            self.lines_logged += 1;
            self.bytes_logged += end;
        }
        self.line.clear();
    }

    async fn finish(&mut self) {
        if !self.line.is_empty() && !self.full {
            self.emit().await;
        }
        if self.dropped_bytes > 0 {
            let message = format!(
                "output truncated: {} more bytes of {}",
                self.dropped_bytes,
                self.stream.as_str()
            );
            self.logs.write(LogStream::System, &message).await;
        }
    }
}

/// Logs a pipe until it closes; keeps its last bytes when `keep_tail` is set.
async fn pump(
    reader: Option<impl AsyncRead + Unpin>,
    stream: LogStream,
    logs: &dyn LogSink,
    keep_tail: bool,
) -> StreamSummary {
    let mut summary = StreamSummary {
        tail: Vec::new(),
        tail_cut: false,
    };
    let Some(mut reader) = reader else {
        return summary;
    };
    let mut logger = LineLogger::new(stream, logs);
    let mut buffer = vec![0u8; READ_CHUNK_BYTES];
    loop {
        let read = match reader.read(&mut buffer).await {
            Ok(0) => break,
            Ok(read) => read,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => {
                let message = format!("cannot read {}: {error}", stream.as_str());
                logs.write(LogStream::System, &message).await;
                break;
            }
        };
        let chunk = &buffer[..read];
        if keep_tail {
            summary.tail.extend_from_slice(chunk);
            if summary.tail.len() > 2 * STDERR_TAIL_BYTES_MAX {
                let cut = summary.tail.len() - STDERR_TAIL_BYTES_MAX;
                summary.tail.drain(..cut);
                summary.tail_cut = true;
            }
        }
        logger.push(chunk).await;
    }
    logger.finish().await;
    if summary.tail.len() > STDERR_TAIL_BYTES_MAX {
        let cut = summary.tail.len() - STDERR_TAIL_BYTES_MAX;
        summary.tail.drain(..cut);
        summary.tail_cut = true;
    }
    summary
}

/// The head of the error of a command killed by `signal`, naming the CPU limit when it is
/// the likely cause.
fn signal_message(signal: i32, cpu_secs: Option<u64>) -> String {
    let name = Signal::try_from(signal)
        .map(Signal::as_str)
        .unwrap_or("unknown signal");
    match (Signal::try_from(signal), cpu_secs) {
        (Ok(Signal::SIGXCPU), Some(secs)) => format!(
            "command was killed by signal {signal} (SIGXCPU: the CPU time limit of {secs} s was reached)"
        ),
        (Ok(Signal::SIGXCPU), None) => format!(
            "command was killed by signal {signal} (SIGXCPU: the worker's CPU time limit was reached)"
        ),
        (Ok(Signal::SIGKILL), Some(secs)) => format!(
            "command was killed by signal {signal} (SIGKILL; the CPU time limit of {secs} s may have been reached)"
        ),
        _ => format!("command was killed by signal {signal} ({name})"),
    }
}

/// Checks a declared variable: a name without `=` or NUL, a value without NUL.
fn check_variable(name: &str, value: &str) -> Result<(), ToolError> {
    if name.is_empty() || name.contains(['=', '\0']) {
        return Err(ToolError::permanent(format!(
            "env: {name:?} is not a valid variable name"
        )));
    }
    if value.contains('\0') {
        return Err(ToolError::permanent(format!(
            "env: the value of {name} contains a NUL byte"
        )));
    }
    Ok(())
}

/// Places the declared `files` in the working directory.
async fn place_files(
    context: &ToolContext,
    files: &BTreeMap<String, Value>,
) -> Result<(), ToolError> {
    for (name, value) in files {
        let destination = context.work_dir.join(relative_path("files:", name)?);
        let with_name = |error: ToolError| ToolError {
            message: format!("files: {name}: {}", error.message),
            retryable: error.retryable,
        };
        match value {
            Value::String(task) => {
                let artifacts = upstream_task_artifacts(context, task).map_err(with_name)?;
                match artifacts.as_slice() {
                    [artifact] => {
                        copy_artifact_to(context, artifact, &destination)
                            .await
                            .map_err(with_name)?;
                    }
                    _ => {
                        return Err(with_name(ToolError::permanent(format!(
                            "upstream task {task:?} holds {} artifacts; name one with {{\"artifact\": \"<name>[@version]\"}}",
                            artifacts.len()
                        ))))
                    }
                }
            }
            Value::Object(map) if map.len() == 1 && map.contains_key("artifact") => {
                let Some(reference) = map["artifact"].as_str() else {
                    return Err(with_name(ToolError::permanent("artifact must be a string")));
                };
                let artifact = resolve_single_artifact(context, reference)
                    .await
                    .map_err(with_name)?;
                copy_artifact_to(context, &artifact, &destination)
                    .await
                    .map_err(with_name)?;
            }
            other => {
                let content = serde_json::to_vec_pretty(other).map_err(|error| {
                    with_name(ToolError::permanent(format!("cannot encode json: {error}")))
                })?;
                if let Some(parent) = destination.parent() {
                    tokio::fs::create_dir_all(parent).await.map_err(|error| {
                        with_name(ToolError::permanent(format!(
                            "cannot create directory: {error}"
                        )))
                    })?;
                }
                tokio::fs::write(&destination, content)
                    .await
                    .map_err(|error| {
                        with_name(ToolError::permanent(format!("cannot write file: {error}")))
                    })?;
            }
        }
    }
    Ok(())
}

/// Reads the output file, if the command wrote one.
async fn read_output_file(path: &Path) -> Result<Map<String, Value>, ToolError> {
    let metadata = match tokio::fs::metadata(path).await {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Map::new()),
        Err(error) => {
            return Err(ToolError::permanent(format!(
                "cannot read output file {}: {error}",
                path.display()
            )))
        }
    };
    if metadata.len() > OUTPUT_FILE_BYTES_MAX {
        return Err(ToolError::permanent(format!(
            "output file {} holds {} bytes; at most {OUTPUT_FILE_BYTES_MAX} are read",
            path.display(),
            metadata.len()
        )));
    }
    let content = tokio::fs::read(path).await.map_err(|error| {
        ToolError::permanent(format!(
            "cannot read output file {}: {error}",
            path.display()
        ))
    })?;
    match serde_json::from_slice::<Value>(&content) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ToolError::permanent(format!(
            "output file {} must hold a json object",
            path.display()
        ))),
        Err(error) => Err(ToolError::permanent(format!(
            "output file {} is not valid json: {error}",
            path.display()
        ))),
    }
}

/// Stores the declared files as artifacts.
async fn collect_files(
    context: &ToolContext,
    specs: &[CollectSpec],
) -> Result<Vec<Value>, ToolError> {
    let mut records = Vec::with_capacity(specs.len());
    for spec in specs {
        let relative = relative_path("collect:", &spec.path)?;
        let path: PathBuf = context.work_dir.join(&relative);
        match tokio::fs::metadata(&path).await {
            Ok(metadata) if metadata.is_file() => {}
            Ok(_) => {
                return Err(ToolError::permanent(format!(
                    "collected path {} is not a file",
                    spec.path
                )))
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Err(ToolError::permanent(format!(
                    "collected file not found: {}",
                    spec.path
                )))
            }
            Err(error) => {
                return Err(ToolError::permanent(format!(
                    "cannot read collected file {}: {error}",
                    spec.path
                )))
            }
        }
        let name = spec
            .name
            .clone()
            .unwrap_or_else(|| format!("{}/{}", context.task_id, relative.display()));
        let media_type = spec
            .media_type
            .clone()
            .unwrap_or_else(|| media_type::for_path(&relative).to_owned());
        let record = context
            .artifacts
            .put_file(
                &path,
                NewArtifact {
                    org_id: context.org_id,
                    name,
                    media_type,
                    table: None,
                    produced_by: Some(context.producer()),
                    inputs: context.upstream_artifacts(),
                },
            )
            .await
            .map_err(|error| {
                store_error(&format!("cannot store collected file {}", spec.path), error)
            })?;
        records.push(artifact_json(&record)?);
    }
    Ok(records)
}

#[async_trait]
impl Tool for ShellTool {
    fn name(&self) -> &str {
        "shell"
    }

    fn description(&self) -> &str {
        "run a command in its own process group with a scrubbed environment"
    }

    fn sandboxes(&self) -> &'static [arches_core::tooldef::Sandbox] {
        &[arches_core::tooldef::Sandbox::Process]
    }

    fn input_schema(&self) -> Value {
        json!({
            "type": "object",
            "additionalProperties": false,
            "oneOf": [
                {"required": ["command"], "not": {"required": ["argv"]}},
                {"required": ["argv"], "not": {"required": ["command"]}}
            ],
            "properties": {
                "command": {"type": "string", "minLength": 1, "description": "run with /bin/sh -c"},
                "argv": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"type": "string"},
                    "description": "program and arguments, run without a shell"
                },
                "env": {
                    "type": "object",
                    "additionalProperties": {"type": "string"},
                    "description": "variables added to the scrubbed environment"
                },
                "files": {
                    "type": "object",
                    "description": "relative file name -> upstream task id, {artifact} or any json value written as a json file"
                },
                "collect": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": false,
                        "required": ["path"],
                        "properties": {
                            "path": {"type": "string", "minLength": 1},
                            "name": {"type": "string", "minLength": 1},
                            "media_type": {"type": "string", "minLength": 1}
                        }
                    }
                },
                "stdin": {"type": "string"},
                "limits": Limits::schema(),
                "network": {
                    "type": "boolean",
                    "description": "keep the worker's network; by default the command runs without network when the worker supports namespaces"
                }
            }
        })
    }

    fn implied_dependencies(&self, inputs: &Value, task_ids: &[&str]) -> Vec<String> {
        let files = inputs.get("files").and_then(Value::as_object);
        let mut found: Vec<String> = Vec::new();
        for value in files.into_iter().flat_map(|f| f.values()) {
            let named = match value {
                Value::String(task) => Some(task.as_str()),
                Value::Object(map) => map.get("artifact").and_then(Value::as_str),
                _ => None,
            };
            if let Some(task) = named.filter(|task| task_ids.contains(task)) {
                if !found.iter().any(|t| t == task) {
                    found.push(task.to_owned());
                }
            }
        }
        found
    }

    async fn execute(&self, context: ToolContext, inputs: Value) -> Result<Value, ToolError> {
        let mut inputs: ShellInputs = parse_inputs("shell", inputs)?;
        let invocation = Invocation::from_inputs(&mut inputs)?;
        for (name, value) in &inputs.env {
            check_variable(name, value)?;
        }
        let requested = match &inputs.limits {
            Some(limits) => Limits::from_input(limits)?,
            None => Limits::default(),
        };
        let limits = self.sandbox.effective_limits(requested)?;
        let search_path: OsString = match inputs.env.get("PATH") {
            Some(path) => path.into(),
            None => std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into()),
        };
        let mut command = invocation.command(
            &self.sandbox,
            limits,
            inputs.network,
            &search_path,
            &context.work_dir,
        )?;
        place_files(&context, &inputs.files).await?;

        let output_path = context.work_dir.join(OUTPUT_FILE_NAME);
        command.env_clear();
        for name in INHERITED_VARIABLES {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        if std::env::var_os("PATH").is_none() {
            command.env("PATH", DEFAULT_PATH);
        }
        command.envs(&inputs.env);
        command
            .env("ARCHES_OUTPUT", &output_path)
            .env("ARCHES_WORK_DIR", &context.work_dir)
            .env("ARCHES_RUN_ID", context.run_id.to_string())
            .env("ARCHES_TASK_ID", context.task_id.as_str())
            .env("ARCHES_TASK_RUN_ID", context.task_run_id.to_string())
            .env("ARCHES_ATTEMPT", context.attempt.to_string());
        if let Some(item) = &context.item {
            command.env("ARCHES_ITEM", item.to_string());
        }
        command
            .current_dir(&context.work_dir)
            .process_group(0)
            .kill_on_drop(true)
            .stdin(if inputs.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());

        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Err(ToolError::permanent(format!(
                    "command not found: {}",
                    invocation.program()
                )))
            }
            Err(error) if error.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(ToolError::permanent(format!(
                    "command is not executable: {}",
                    invocation.program()
                )))
            }
            Err(error) => {
                return Err(ToolError::transient(format!(
                    "cannot start {}: {error}",
                    invocation.program()
                )))
            }
        };
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let stdin = child.stdin.take();
        let mut group = ProcessGroup::new(child)?;

        let logs = context.logs.as_ref();
        let feed = async {
            if let (Some(mut pipe), Some(text)) = (stdin, inputs.stdin.as_deref()) {
                // A command that does not read its input closes the pipe; that is no error.
                let _ = pipe.write_all(text.as_bytes()).await;
            }
        };
        let (status, _, err, ()) = tokio::join!(
            group.wait(),
            pump(stdout, LogStream::Stdout, logs, false),
            pump(stderr, LogStream::Stderr, logs, true),
            feed
        );
        drop(group);
        let status = status.map_err(|error| {
            ToolError::transient(format!("cannot wait for the command: {error}"))
        })?;

        match status.code() {
            Some(0) => {}
            Some(127) if matches!(invocation, Invocation::Shell(_)) => {
                let tail = err.last_lines(STDERR_TAIL_LINES_MAX);
                return Err(ToolError::permanent(format!(
                    "command not found: {}",
                    invocation.missing_command(&tail)
                )));
            }
            code => {
                let mut head = match (code, status.signal()) {
                    (Some(code), _) => format!("command exited with status {code}"),
                    (None, Some(signal)) => signal_message(signal, requested.cpu_secs),
                    (None, None) => "command ended without a status".to_owned(),
                };
                if !requested.is_empty() {
                    head.push_str(&format!(" (task limits: {})", requested.describe()));
                }
                logs.write(LogStream::System, &head).await;
                let tail = err.last_lines(STDERR_TAIL_LINES_MAX);
                let message = if tail.is_empty() {
                    head
                } else {
                    format!("{head}; last stderr lines:\n{}", tail.join("\n"))
                };
                return Err(ToolError::transient(message));
            }
        }

        let mut outputs = read_output_file(&output_path).await?;
        let artifacts = collect_files(&context, &inputs.collect).await?;
        outputs.insert("exit_code".to_owned(), json!(0));
        outputs.insert("artifacts".to_owned(), Value::Array(artifacts));
        Ok(Value::Object(outputs))
    }
}
