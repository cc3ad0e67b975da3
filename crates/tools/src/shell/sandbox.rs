//! The shell tool's sandbox: resource limits and Linux namespaces.
//!
//! The workspace denies `unsafe` code, so nothing runs between `fork` and `exec` (no
//! `pre_exec`). Instead the command is wrapped with two util-linux programs that both set
//! their part up and then `exec` the next program, so the command keeps the pid, process
//! group and session the tool gave the wrapper (killing the group still kills everything):
//!
//! ```text
//! prlimit --cpu=S:H --as=B:B --nofile=N:N --nproc=P:P -- unshare --net --mount -- <program> <args>
//! ```
//!
//! Both are looked up in the worker's `PATH` and probed once per process; see
//! [`Sandbox::probe`] for the rules when they are missing or do not work.

use std::path::{Path, PathBuf};
use std::process::{Command as StdCommand, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::resource::{getrlimit, Resource};
use serde_json::{Map, Value};
use tokio::process::Command;

use arches_core::ports::ToolError;

/// Default `open_files` (RLIMIT_NOFILE) when the task sets none and `prlimit` is available;
/// lowered to the worker's own hard limit when that is smaller.
pub const DEFAULT_OPEN_FILES: u64 = 1024;
/// Largest `cpu_secs` accepted: one week.
pub const CPU_SECS_MAX: u64 = 7 * 24 * 3600;
/// Smallest `memory_mb` accepted; below it even `/bin/sh` may fail to start.
pub const MEMORY_MB_MIN: u64 = 16;
/// Largest `memory_mb` accepted: 16 TiB.
pub const MEMORY_MB_MAX: u64 = 16 * 1024 * 1024;
/// Smallest `open_files` accepted: the three standard streams and a few more.
pub const OPEN_FILES_MIN: u64 = 8;
/// Largest `open_files` accepted: Linux's default `fs.nr_open`.
pub const OPEN_FILES_MAX: u64 = 1024 * 1024;
/// Largest `processes` accepted.
pub const PROCESSES_MAX: u64 = 4 * 1024 * 1024;
/// How long a probe of a helper may take before it counts as not working.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Resource limits of one command; `None` leaves the limit the worker has (or the default).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// CPU seconds (RLIMIT_CPU). The kernel sends SIGXCPU at this many seconds and SIGKILL
    /// one second later.
    pub cpu_secs: Option<u64>,
    /// Address space in MiB (RLIMIT_AS): allocations beyond it fail.
    pub memory_mb: Option<u64>,
    /// Open file descriptors (RLIMIT_NOFILE).
    pub open_files: Option<u64>,
    /// Processes and threads of the command's real user id, counted over the whole system
    /// (RLIMIT_NPROC); not enforced for root (or any process with `CAP_SYS_RESOURCE` or
    /// `CAP_SYS_ADMIN`).
    pub processes: Option<u64>,
}

impl Limits {
    /// Parses the `limits` input: an object with optional `cpu_secs`, `memory_mb`,
    /// `open_files` and `processes`, each an integer within its bounds. Errors name the field
    /// (`limits.cpu_secs: ...`).
    pub fn from_input(value: &Value) -> Result<Self, ToolError> {
        let Value::Object(map) = value else {
            return Err(ToolError::permanent("limits: must be an object"));
        };
        if let Some(unknown) = map.keys().find(|key| {
            !matches!(
                key.as_str(),
                "cpu_secs" | "memory_mb" | "open_files" | "processes"
            )
        }) {
            return Err(ToolError::permanent(format!(
                "limits.{unknown}: unknown limit; known are cpu_secs, memory_mb, open_files and processes"
            )));
        }
        Ok(Self {
            cpu_secs: bounded(map, "cpu_secs", 1, CPU_SECS_MAX)?,
            memory_mb: bounded(map, "memory_mb", MEMORY_MB_MIN, MEMORY_MB_MAX)?,
            open_files: bounded(map, "open_files", OPEN_FILES_MIN, OPEN_FILES_MAX)?,
            processes: bounded(map, "processes", 1, PROCESSES_MAX)?,
        })
    }

    /// Whether no limit is set.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// The limits set, as `name=value` pairs for messages.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(secs) = self.cpu_secs {
            parts.push(format!("cpu_secs={secs}"));
        }
        if let Some(mb) = self.memory_mb {
            parts.push(format!("memory_mb={mb}"));
        }
        if let Some(files) = self.open_files {
            parts.push(format!("open_files={files}"));
        }
        if let Some(processes) = self.processes {
            parts.push(format!("processes={processes}"));
        }
        parts.join(", ")
    }

    /// The JSON schema of the `limits` input.
    pub(crate) fn schema() -> Value {
        serde_json::json!({
            "type": "object",
            "additionalProperties": false,
            "description": "resource limits of the command, applied with util-linux prlimit",
            "properties": {
                "cpu_secs": {
                    "type": "integer", "minimum": 1, "maximum": CPU_SECS_MAX,
                    "description": "CPU seconds (RLIMIT_CPU): SIGXCPU at the limit, SIGKILL one second later"
                },
                "memory_mb": {
                    "type": "integer", "minimum": MEMORY_MB_MIN, "maximum": MEMORY_MB_MAX,
                    "description": "address space in MiB (RLIMIT_AS); default: the worker's"
                },
                "open_files": {
                    "type": "integer", "minimum": OPEN_FILES_MIN, "maximum": OPEN_FILES_MAX,
                    "description": "open file descriptors (RLIMIT_NOFILE); default 1024"
                },
                "processes": {
                    "type": "integer", "minimum": 1, "maximum": PROCESSES_MAX,
                    "description": "processes of the user id, system-wide (RLIMIT_NPROC); not enforced for root"
                }
            }
        })
    }
}

fn bounded(
    map: &Map<String, Value>,
    name: &str,
    min: u64,
    max: u64,
) -> Result<Option<u64>, ToolError> {
    let Some(value) = map.get(name) else {
        return Ok(None);
    };
    match value.as_u64() {
        Some(number) if (min..=max).contains(&number) => Ok(Some(number)),
        _ => Err(ToolError::permanent(format!(
            "limits.{name}: must be an integer from {min} to {max}, got {value}"
        ))),
    }
}

/// Whether commands run in their own network and mount namespaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Namespaces {
    /// Commands run in new network and mount namespaces, entered with `unshare` at this path;
    /// `user` when an unprivileged worker also needs a user namespace (the command then runs
    /// as root of that namespace, mapped to the worker's user).
    Available {
        /// The `unshare` program.
        unshare: PathBuf,
        /// Whether a user namespace is created too.
        user: bool,
    },
    /// Commands run in the worker's namespaces, for this reason.
    Unavailable {
        /// Why the probe failed.
        reason: String,
    },
}

/// What the sandbox enforces, as reported by [`crate::ShellTool::sandbox_level`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SandboxLevel {
    /// Resource limits are applied (`prlimit` was found and works).
    pub resource_limits: bool,
    /// Commands run without network (unless the task sets `network: true`) and in a private
    /// mount namespace.
    pub network_isolation: bool,
}

/// The helpers the shell tool wraps commands with, as found by a probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sandbox {
    prlimit: Result<PathBuf, String>,
    namespaces: Namespaces,
}

impl Sandbox {
    /// The sandbox of this process: probed on first use, with [`Sandbox::warnings`] logged
    /// then, once per process.
    pub fn detected() -> &'static Sandbox {
        static DETECTED: OnceLock<Sandbox> = OnceLock::new();
        DETECTED.get_or_init(|| {
            let sandbox = Self::probe();
            for warning in sandbox.warnings() {
                tracing::warn!("{warning}");
            }
            sandbox
        })
    }

    /// Looks `prlimit` and `unshare` up in the worker's `PATH` and probes them.
    ///
    /// Rules: without a working `prlimit`, an attempt whose task sets `limits` fails
    /// (permanently, naming the cause) and other attempts run without the default limits.
    /// Without working namespaces commands run in the worker's network and mount namespaces.
    /// Each degradation is one line of [`Sandbox::warnings`].
    pub fn probe() -> Self {
        Self::probe_with(find_in_path("prlimit"), find_in_path("unshare"))
    }

    /// Probes the given helpers; `None` is a helper not found in `PATH`.
    pub fn probe_with(prlimit: Option<PathBuf>, unshare: Option<PathBuf>) -> Self {
        let prlimit = match prlimit {
            None => Err("util-linux prlimit not found in PATH".to_owned()),
            Some(path) => {
                let probe = [
                    "--nofile=64:64".to_owned(),
                    "--".to_owned(),
                    "/bin/sh".to_owned(),
                    "-c".to_owned(),
                    ":".to_owned(),
                ];
                run_probe(&path, &probe).map(|()| path)
            }
        };
        let namespaces = match unshare {
            None => Namespaces::Unavailable {
                reason: "util-linux unshare not found in PATH".to_owned(),
            },
            Some(unshare) => {
                let user = effective_uid() != Some(0);
                let mut probe: Vec<String> = namespace_flags(user, false)
                    .iter()
                    .map(|flag| (*flag).to_owned())
                    .collect();
                probe.extend(["--", "/bin/sh", "-c", ":"].map(str::to_owned));
                match run_probe(&unshare, &probe) {
                    Ok(()) => Namespaces::Available { unshare, user },
                    Err(reason) => Namespaces::Unavailable { reason },
                }
            }
        };
        Self {
            prlimit,
            namespaces,
        }
    }

    /// What is enforced.
    pub fn level(&self) -> SandboxLevel {
        SandboxLevel {
            resource_limits: self.prlimit.is_ok(),
            network_isolation: matches!(self.namespaces, Namespaces::Available { .. }),
        }
    }

    /// The namespaces in force.
    pub fn namespaces(&self) -> &Namespaces {
        &self.namespaces
    }

    /// One line per degradation, as logged once per process by [`Sandbox::detected`].
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if let Err(reason) = &self.prlimit {
            warnings.push(format!(
                "shell sandbox: resource limits unavailable ({reason}); tasks that set limits fail, others run without the default limits"
            ));
        }
        if let Namespaces::Unavailable { reason } = &self.namespaces {
            warnings.push(format!(
                "shell sandbox: Linux namespaces unavailable ({reason}); commands run without network isolation"
            ));
        }
        warnings
    }

    /// The limits an attempt runs with: the task's, completed with the defaults, or an error
    /// when the task set limits that cannot be applied. `None` when no limit is applied.
    pub(crate) fn effective_limits(&self, requested: Limits) -> Result<Option<Limits>, ToolError> {
        if let Err(reason) = &self.prlimit {
            if requested.is_empty() {
                return Ok(None);
            }
            return Err(ToolError::permanent(format!(
                "limits cannot be applied: {reason}"
            )));
        }
        if effective_uid() != Some(0) {
            // Only a privileged process may raise a hard limit; say so before prlimit fails.
            // Values as set: cpu_secs gets one more second of hard limit, memory is in bytes.
            let wanted = [
                (
                    "cpu_secs",
                    Resource::RLIMIT_CPU,
                    requested.cpu_secs.map(|s| s + 1),
                    1,
                    "s",
                ),
                (
                    "memory_mb",
                    Resource::RLIMIT_AS,
                    requested.memory_mb,
                    1 << 20,
                    "MiB",
                ),
                (
                    "open_files",
                    Resource::RLIMIT_NOFILE,
                    requested.open_files,
                    1,
                    "files",
                ),
                (
                    "processes",
                    Resource::RLIMIT_NPROC,
                    requested.processes,
                    1,
                    "processes",
                ),
            ];
            for (name, resource, value, unit, unit_name) in wanted {
                let (Some(value), Ok((_, hard))) = (value, getrlimit(resource)) else {
                    continue;
                };
                if value.saturating_mul(unit) > hard {
                    return Err(ToolError::permanent(format!(
                        "limits.{name}: above the worker's hard limit of {} {unit_name}",
                        hard / unit
                    )));
                }
            }
        }
        let mut limits = requested;
        if limits.open_files.is_none() {
            let hard = getrlimit(Resource::RLIMIT_NOFILE)
                .map(|(_, hard)| hard)
                .unwrap_or(u64::MAX);
            limits.open_files = Some(DEFAULT_OPEN_FILES.min(hard));
        }
        Ok(Some(limits))
    }

    /// The command running `program` with `args` inside the sandbox.
    pub(crate) fn command(
        &self,
        program: &Path,
        args: &[String],
        limits: Option<Limits>,
        network: bool,
    ) -> Command {
        let mut argv: Vec<std::ffi::OsString> = Vec::new();
        if let (Ok(prlimit), Some(limits)) = (&self.prlimit, limits) {
            argv.push(prlimit.into());
            if let Some(secs) = limits.cpu_secs {
                // SIGXCPU at the soft limit names the cause; SIGKILL a second later ends a
                // command that ignores it.
                argv.push(format!("--cpu={secs}:{}", secs + 1).into());
            }
            if let Some(mb) = limits.memory_mb {
                let bytes = mb * 1024 * 1024;
                argv.push(format!("--as={bytes}:{bytes}").into());
            }
            if let Some(files) = limits.open_files {
                argv.push(format!("--nofile={files}:{files}").into());
            }
            if let Some(processes) = limits.processes {
                argv.push(format!("--nproc={processes}:{processes}").into());
            }
            argv.push("--".into());
        }
        if let Namespaces::Available { unshare, user } = &self.namespaces {
            argv.push(unshare.into());
            argv.extend(namespace_flags(*user, network).iter().map(Into::into));
            argv.push("--".into());
        }
        argv.push(program.into());
        argv.extend(args.iter().map(Into::into));
        let mut command = Command::new(&argv[0]);
        command.args(&argv[1..]);
        command
    }
}

/// The flags of `unshare`: never `--fork`, so that `unshare` execs the command itself.
fn namespace_flags(user: bool, network: bool) -> &'static [&'static str] {
    match (user, network) {
        (false, false) => &["--net", "--mount"],
        (false, true) => &["--mount"],
        (true, false) => &["--user", "--map-root-user", "--net", "--mount"],
        (true, true) => &["--user", "--map-root-user", "--mount"],
    }
}

/// Runs a helper once; `Err` names how it failed.
fn run_probe(program: &Path, args: &[String]) -> Result<(), String> {
    let line = format!("{} {}", program.display(), args.join(" "));
    let mut child = StdCommand::new(program)
        .args(args)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| format!("cannot run {line}: {error}"))?;
    let deadline = Instant::now() + PROBE_TIMEOUT;
    let exited = i32::try_from(child.id()).is_ok_and(|pid| process_exits_before(pid, deadline));
    let status = match child.try_wait() {
        Ok(Some(status)) => status,
        Ok(None) => {
            let _ = child.kill();
            let _ = child.wait();
            let why = if exited {
                "cannot be waited for"
            } else {
                "did not finish"
            };
            return Err(format!("{line} {why} within {PROBE_TIMEOUT:?}"));
        }
        Err(error) => return Err(format!("cannot wait for {line}: {error}")),
    };
    if status.success() {
        return Ok(());
    }
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        use std::io::Read;
        let _ = pipe.read_to_string(&mut stderr);
    }
    let stderr = stderr.lines().last().unwrap_or_default().trim().to_owned();
    if stderr.is_empty() {
        Err(format!("{line} failed with {status}"))
    } else {
        Err(format!("{line} failed with {status}: {stderr}"))
    }
}

/// Waits for process `pid` to exit, until `deadline` at the latest, on a pidfd (which the
/// kernel makes readable when the process exits; no polling); whether it has. A process
/// already gone (no pidfd can be opened for it) has. The process need not be a child of
/// this one; a child still has to be reaped by its owner.
pub fn process_exits_before(pid: i32, deadline: Instant) -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    use rustix::process::{pidfd_open, Pid, PidfdFlags};
    let Some(pid) = Pid::from_raw(pid) else {
        return true;
    };
    let Ok(pidfd) = pidfd_open(pid, PidfdFlags::empty()) else {
        return true;
    };
    let left = deadline.saturating_duration_since(Instant::now());
    let timeout = Timespec {
        tv_sec: i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(left.subsec_nanos()),
    };
    let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
    matches!(poll(&mut fds, Some(&timeout)), Ok(ready) if ready > 0)
}

/// The worker's effective user id, from `/proc/self/status` (nix's `user` feature is not
/// enabled in this workspace).
pub fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// An executable file named `name` in the worker's `PATH`.
fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| super::DEFAULT_PATH.into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

/// Whether `path` is a regular file someone may execute.
pub(crate) fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|metadata| metadata.is_file() && metadata.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}
