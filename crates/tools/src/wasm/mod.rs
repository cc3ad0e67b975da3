//! The `wasm` tool: runs a WASI preview 1 module (a "command" exporting `_start`) with one
//! JSON document on its stdin and takes one JSON document from its stdout.
//!
//! Sandbox: the module sees nothing of the host but what the task grants: no sockets, no
//! environment variables, no filesystem and no arguments beyond the module's name. `allow`
//! grants named environment variables (copied from the worker's environment) and host
//! directories, preopened read-only or read-write under the same path in the guest. Clocks
//! and random numbers are always available.
//!
//! Limits, per call:
//! - CPU: the time the call spends being polled (running wasm code or WASI host calls), in
//!   milliseconds, enforced with epoch interruption. One engine-wide ticker thread advances
//!   the epoch every [`EPOCH_TICK`] (1 ms); at every tick a running module yields to the
//!   tokio scheduler (so other tasks on the same worker keep their latency) and is trapped
//!   once its budget is spent. The budget is thus enforced to within about one tick.
//! - wall clock: a `timeout` around the whole call (compilation excluded), by default
//!   [`DEFAULT_WALL_PER_CPU`] times the CPU budget.
//! - memory: linear memories plus tables (8 bytes per table element) are capped by a
//!   [`wasmtime::ResourceLimiter`]; growing past the cap, or declaring an initial memory
//!   above it, traps with `memory limit of N MiB exceeded`.
//! - output: stdout is capped at [`STDOUT_BYTES_MAX`] (a module writing more fails once it
//!   ends); stderr at [`STDERR_BYTES_MAX`] (the rest is dropped and a system log line says
//!   so). Writes past a cap never fail inside the module: the excess is dropped.
//!   Stderr is logged line by line once the module has ended (also when it failed or ran
//!   past its limits), not while it runs.
//!
//! Compiled modules are cached by the SHA-256 of their bytes (at most
//! [`MODULE_CACHE_ENTRIES`], least recently used evicted first) as pre-instantiated
//! [`wasmtime::InstancePre`] against one [`wasmtime::Linker`] built when the tool is created:
//! a warm call only builds a WASI context and a store and instantiates.
//!
//! Cancellation: the call is an ordinary future; dropping it (the engine's timeout, cancel
//! or shutdown) unwinds the module at its next epoch tick or host call and frees its store.
//! The ticker thread (one per tool, shared by its clones) ticks only while a module runs: with
//! no call in progress it is parked and costs no wake-ups. It stops when the last clone of
//! the tool is dropped.

mod pipe;

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arches_core::pipeline::format_duration;
use arches_core::ports::{LogSink, Tool, ToolContext, ToolError};
use arches_core::records::LogStream;
use arches_core::tooldef::Sandbox;
use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use wasmtime::{
    Config, Engine, InstancePre, Linker, Module, ResourceLimiter, Store, Trap, UpdateDeadline,
};
use wasmtime_wasi::p1::{self, WasiP1Ctx};
use wasmtime_wasi::p2::pipe::MemoryInputPipe;

use pipe::CappedPipe;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};

use crate::common::{absolute_path, parse_inputs};
use crate::registered::Mask;

/// Interval of the epoch ticker: the granularity of CPU budgets and of yields to tokio.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);
/// Compiled modules kept in the cache of one tool.
pub const MODULE_CACHE_ENTRIES: usize = 64;
/// Largest stdout read back (16 MiB); a module writing more fails.
pub const STDOUT_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Largest stderr kept (1 MiB); the rest is dropped.
pub const STDERR_BYTES_MAX: usize = 1024 * 1024;
/// Longest stderr line logged (64 KiB); the rest of a longer line is dropped.
pub const LOG_LINE_BYTES_MAX: usize = 64 * 1024;
/// Most stderr lines logged per call.
pub const LOG_LINES_MAX: usize = 10_000;
/// Largest module file read (256 MiB).
pub const MODULE_FILE_BYTES_MAX: u64 = 256 * 1024 * 1024;
/// Default cap on linear memory plus tables, in MiB.
pub const DEFAULT_MEMORY_MB: u64 = 64;
/// Largest `memory_mb` accepted (4 GiB, the 32-bit address space).
pub const MEMORY_MB_MAX: u64 = 4096;
/// Default CPU budget of a call, in milliseconds (60 s).
pub const DEFAULT_CPU_MS: u64 = 60_000;
/// Largest `cpu_ms` accepted (24 h).
pub const CPU_MS_MAX: u64 = 24 * 3600 * 1000;
/// Stderr lines quoted in the error of a module that failed.
const STDERR_TAIL_LINES_MAX: usize = 10;
/// Characters of stdout quoted in the error when it is not JSON.
const STDOUT_QUOTE_CHARS: usize = 200;
/// Bytes one table element counts against the memory cap.
const TABLE_ELEMENT_BYTES: u64 = 8;

/// Without a `timeout` input, a task's wall-clock deadline is this many times its CPU
/// budget: a module may wait (sleep, poll) but not indefinitely.
pub const DEFAULT_WALL_PER_CPU: u32 = 10;

/// Limits of one call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WasmLimits {
    /// CPU budget: time spent running the module (wasm code and WASI calls), measured while
    /// the call is polled and enforced at every [`EPOCH_TICK`].
    pub cpu: Duration,
    /// Wall-clock deadline of the call (instantiation and run; compilation excluded);
    /// `None` for none.
    pub timeout: Option<Duration>,
    /// Cap on linear memory plus tables, in bytes.
    pub memory_bytes: u64,
}

impl Default for WasmLimits {
    /// [`DEFAULT_CPU_MS`], no wall-clock deadline, [`DEFAULT_MEMORY_MB`].
    fn default() -> Self {
        Self {
            cpu: Duration::from_millis(DEFAULT_CPU_MS),
            timeout: None,
            memory_bytes: DEFAULT_MEMORY_MB * 1024 * 1024,
        }
    }
}

/// What a call may reach of the host; the default grants nothing. `Debug` shows the names of
/// `vars`, never their values.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct WasmGrants {
    /// Names of environment variables copied from the worker's environment; a name the
    /// worker does not have is skipped.
    pub env: Vec<String>,
    /// Host directories (absolute paths) preopened read-only under the same guest path.
    pub read_dirs: Vec<PathBuf>,
    /// Host directories (absolute paths) preopened read-write under the same guest path.
    pub write_dirs: Vec<PathBuf>,
    /// Environment variables set to these values (the secrets a registered tool is
    /// granted), after those copied by `env`. Their values are masked in the module's
    /// stderr lines and in errors quoting its output.
    pub vars: Vec<(String, String)>,
}

impl std::fmt::Debug for WasmGrants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let vars: Vec<&str> = self.vars.iter().map(|(name, _)| name.as_str()).collect();
        f.debug_struct("WasmGrants")
            .field("env", &self.env)
            .field("read_dirs", &self.read_dirs)
            .field("write_dirs", &self.write_dirs)
            .field("vars", &vars)
            .finish()
    }
}

/// What a server lets tasks grant modules through the `allow` input and load modules from
/// (`[tools.wasm]` of the configuration). Grants outside it are refused before the module
/// runs; capabilities of an org's registered tool are checked against it too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WasmPolicy {
    /// Worker directories a module may be granted read access to: a granted directory must
    /// be one of these or inside one, also once symbolic links are resolved. Empty: none.
    pub read_dirs: Vec<PathBuf>,
    /// Worker directories a module may be granted write access to (same rule).
    pub write_dirs: Vec<PathBuf>,
    /// Worker environment variables a module may be granted (`allow.env`); `*` for any.
    /// Empty: none. The server's own variables (`ARCHES_*`) are never granted.
    pub env: Vec<String>,
    /// Worker directories tasks may load module files from (the `module` input). Empty:
    /// none, so on a server the built-in `wasm` tool runs only modules under these
    /// directories, and orgs run their own as registered tools (stored as artifacts).
    pub module_dirs: Vec<PathBuf>,
}

/// Which directories of a [`WasmPolicy`] a path is checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirKind {
    /// `read_dirs`.
    Read,
    /// `write_dirs`.
    Write,
    /// `module_dirs`.
    Module,
}

impl DirKind {
    fn field(self) -> &'static str {
        match self {
            DirKind::Read => "read_dirs",
            DirKind::Write => "write_dirs",
            DirKind::Module => "module_dirs",
        }
    }
}

impl WasmPolicy {
    /// Everything may be granted: for local runs (`arches run`), where the pipeline's author
    /// is the worker's user.
    pub fn allow_all() -> Self {
        Self {
            read_dirs: vec![PathBuf::from("/")],
            write_dirs: vec![PathBuf::from("/")],
            env: vec!["*".to_owned()],
            module_dirs: vec![PathBuf::from("/")],
        }
    }

    /// Nothing may be granted: the server's default.
    pub fn deny_all() -> Self {
        Self {
            read_dirs: Vec::new(),
            write_dirs: Vec::new(),
            env: Vec::new(),
            module_dirs: Vec::new(),
        }
    }

    /// Problems of the policy itself (relative directories), one line each.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for kind in [DirKind::Read, DirKind::Write, DirKind::Module] {
            for dir in self.roots(kind) {
                if !dir.is_absolute() {
                    problems.push(format!(
                        "{}: {} must be an absolute path",
                        kind.field(),
                        dir.display()
                    ));
                }
            }
        }
        problems
    }

    fn roots(&self, kind: DirKind) -> &[PathBuf] {
        match kind {
            DirKind::Read => &self.read_dirs,
            DirKind::Write => &self.write_dirs,
            DirKind::Module => &self.module_dirs,
        }
    }

    /// Checks `grants` (`what` names where they come from in errors) without touching the
    /// filesystem: relative directories, `..` components, directories outside the policy
    /// and variables it does not allow are refused. Directories are checked again, resolved,
    /// when they are opened ([`WasmPolicy::confine`]).
    ///
    /// # Errors
    /// The first grant outside the policy, naming it (permanent).
    pub fn check(&self, grants: &WasmGrants, what: &str) -> Result<(), ToolError> {
        for (dirs, kind) in [
            (&grants.read_dirs, DirKind::Read),
            (&grants.write_dirs, DirKind::Write),
        ] {
            for dir in dirs {
                self.check_dir(dir, kind, what)?;
            }
        }
        for variable in &grants.env {
            if variable.starts_with("ARCHES_") {
                return Err(ToolError::permanent(format!(
                    "{what}.env: variable {variable:?} is the server's own configuration and is \
                     never granted"
                )));
            }
            if !self.env.iter().any(|v| v == "*" || v == variable) {
                return Err(ToolError::permanent(format!(
                    "{what}.env: variable {variable:?} is not among those this server lets \
                     modules be granted ([tools.wasm] env = {:?})",
                    self.env
                )));
            }
        }
        Ok(())
    }

    /// Checks one path lexically: absolute, without `..`, inside one of the policy's
    /// directories of `kind`.
    fn check_dir(&self, dir: &Path, kind: DirKind, what: &str) -> Result<(), ToolError> {
        let field = kind.field();
        if !dir.is_absolute() {
            return Err(ToolError::permanent(format!(
                "{what}.{field}: {} must be an absolute path",
                dir.display()
            )));
        }
        if dir
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(ToolError::permanent(format!(
                "{what}.{field}: {} must not contain `..`",
                dir.display()
            )));
        }
        if !self.roots(kind).iter().any(|root| dir.starts_with(root)) {
            return Err(self.outside(dir, kind, what));
        }
        Ok(())
    }

    fn outside(&self, dir: &Path, kind: DirKind, what: &str) -> ToolError {
        let field = kind.field();
        ToolError::permanent(format!(
            "{what}.{field}: {} is outside the directories this server allows \
             ([tools.wasm] {field} = {:?})",
            dir.display(),
            self.roots(kind)
        ))
    }

    /// `path` resolved (symbolic links followed), checked against the policy's directories
    /// of `kind` resolved the same way: what is really opened must be inside them.
    ///
    /// # Errors
    /// A path that cannot be resolved, or one that resolves outside the policy (a symbolic
    /// link pointing out of an allowed directory), naming it (permanent).
    pub fn confine(&self, path: &Path, kind: DirKind, what: &str) -> Result<PathBuf, ToolError> {
        self.check_dir(path, kind, what)?;
        let resolved = std::fs::canonicalize(path).map_err(|error| {
            ToolError::permanent(match kind {
                DirKind::Module => format!("cannot read module {}: {error}", path.display()),
                _ => format!(
                    "{what}.{}: cannot open {}: {error}",
                    kind.field(),
                    path.display()
                ),
            })
        })?;
        let inside = self
            .roots(kind)
            .iter()
            .any(|root| std::fs::canonicalize(root).is_ok_and(|root| resolved.starts_with(root)));
        if !inside {
            return Err(self.outside(path, kind, what));
        }
        Ok(resolved)
    }
}

/// A module compiled and pre-instantiated by [`WasmTool::prepare`]; cheap to clone. It
/// stays usable after the tool's cache evicted it.
#[derive(Clone)]
pub struct WasmModule {
    pre: InstancePre<StoreState>,
    sha256: [u8; 32],
}

impl WasmModule {
    /// SHA-256 of the bytes the module was prepared from, as 64 lowercase hex digits.
    pub fn sha256_hex(&self) -> String {
        self.sha256.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl std::fmt::Debug for WasmModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmModule")
            .field("sha256", &self.sha256_hex())
            .finish()
    }
}

/// The `wasm` tool.
///
/// Inputs:
/// - `module` (string, required): path of a `.wasm` binary or `.wat` text module, absolute
///   or relative to the worker's current directory. The module must be a WASI preview 1
///   command exporting `_start`.
/// - `input` (any JSON, default `{}`): written to the module's stdin as one JSON document.
/// - `timeout` (number of seconds, or a duration string such as `"500ms"`, `"30s"`):
///   wall-clock deadline of the call; by default [`DEFAULT_WALL_PER_CPU`] times `cpu_ms`.
/// - `cpu_ms` (integer, 1 ..= [`CPU_MS_MAX`], default [`DEFAULT_CPU_MS`]): CPU budget.
/// - `memory_mb` (integer, 1 ..= [`MEMORY_MB_MAX`], default [`DEFAULT_MEMORY_MB`]): cap on
///   linear memory plus tables.
/// - `allow` (object, default nothing): `env` (variable names), `read_dirs` and
///   `write_dirs` (absolute host directories); see [`WasmGrants`].
///
/// Outputs: `{"output": <the JSON document the module wrote to stdout>}`. Stderr lines go
/// to the task log.
///
/// Errors (all permanent unless said otherwise): a missing or unreadable module file, or one
/// that is neither wasm nor WAT, naming the path; a module that imports something other than
/// WASI preview 1 or lacks `_start`; `the module ran past its CPU budget of N ms`; `the
/// module ran past its timeout of D` (retryable); `memory limit of N MiB exceeded`; `the
/// module exited with code N` (retryable, like a failed shell command) with the last stderr
/// lines; `the module trapped: <trap>`; stdout above [`STDOUT_BYTES_MAX`]; stdout that is not
/// one JSON document, quoting its start.
#[derive(Clone)]
pub struct WasmTool {
    runtime: Arc<Runtime>,
    policy: Arc<WasmPolicy>,
}

/// What the tool shares between calls.
struct Runtime {
    engine: Engine,
    linker: Linker<StoreState>,
    cache: Mutex<ModuleCache>,
    /// Module files already read, by path: their size and modification time when read, and
    /// the SHA-256 of their bytes. A file unchanged since is not read and hashed again.
    files: Mutex<HashMap<PathBuf, FileStamp>>,
    compilations: AtomicU64,
    /// Ticks while calls run; stopped and joined when the runtime is dropped.
    ticker: Ticker,
}

/// The thread advancing the engine's epoch every [`EPOCH_TICK`] while at least one module
/// runs; parked otherwise.
struct Ticker {
    stop: Arc<AtomicBool>,
    /// Calls in progress ([`Ticker::running`] guards).
    active: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl Ticker {
    fn start(engine: Engine) -> Result<Self, ToolError> {
        let stop = Arc::new(AtomicBool::new(false));
        let active = Arc::new(AtomicUsize::new(0));
        let (flag, calls) = (stop.clone(), active.clone());
        let thread = std::thread::Builder::new()
            .name("arches-wasm-epoch".to_owned())
            .spawn(move || {
                let mut start = Instant::now();
                let mut ticks: u128 = 0;
                while !flag.load(Ordering::Acquire) {
                    if calls.load(Ordering::Acquire) == 0 {
                        // Woken by the next call (or by `Drop`); a spurious wake-up just
                        // loops. Time spent parked is not ticked.
                        std::thread::park();
                        start = Instant::now();
                        ticks = 0;
                        continue;
                    }
                    std::thread::sleep(EPOCH_TICK);
                    // Catch up on late wake-ups so that the epoch follows the clock.
                    let due = start.elapsed().as_nanos() / EPOCH_TICK.as_nanos();
                    while ticks < due {
                        engine.increment_epoch();
                        ticks += 1;
                    }
                }
            })
            .map_err(|error| {
                ToolError::transient(format!("cannot start the wasm epoch ticker: {error}"))
            })?;
        Ok(Self {
            stop,
            active,
            thread: Some(thread),
        })
    }

    /// Keeps the ticker ticking until the guard is dropped.
    fn running(&self) -> TickerGuard<'_> {
        if self.active.fetch_add(1, Ordering::AcqRel) == 0 {
            if let Some(thread) = &self.thread {
                thread.thread().unpark();
            }
        }
        TickerGuard(self)
    }
}

/// A call in progress; see [`Ticker::running`].
struct TickerGuard<'a>(&'a Ticker);

impl Drop for TickerGuard<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

/// Compiled modules by SHA-256 of their bytes, least recently used evicted first.
#[derive(Default)]
struct ModuleCache {
    entries: HashMap<[u8; 32], CacheEntry>,
    clock: u64,
}

struct CacheEntry {
    pre: InstancePre<StoreState>,
    last_used: u64,
}

impl ModuleCache {
    fn get(&mut self, key: &[u8; 32]) -> Option<InstancePre<StoreState>> {
        self.clock += 1;
        let clock = self.clock;
        self.entries.get_mut(key).map(|entry| {
            entry.last_used = clock;
            entry.pre.clone()
        })
    }

    fn insert(&mut self, key: [u8; 32], pre: InstancePre<StoreState>) {
        self.clock += 1;
        if self.entries.len() >= MODULE_CACHE_ENTRIES && !self.entries.contains_key(&key) {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, entry)| entry.last_used)
                .map(|(key, _)| *key);
            if let Some(oldest) = oldest {
                self.entries.remove(&oldest);
            }
        }
        self.entries.insert(
            key,
            CacheEntry {
                pre,
                last_used: self.clock,
            },
        );
    }
}

/// The data of one call's store.
struct StoreState {
    wasi: WasiP1Ctx,
    limiter: MemoryLimiter,
}

/// Why a call was stopped by the host, shared with the store's callbacks.
#[derive(Default)]
struct Verdict {
    cpu_spent: AtomicBool,
    memory_denied: AtomicBool,
}

/// Caps linear memories plus tables of one store.
struct MemoryLimiter {
    limit_bytes: u64,
    used_bytes: u64,
    verdict: Arc<Verdict>,
}

/// The error a denied growth traps with.
#[derive(Debug, thiserror::Error)]
#[error("memory limit of {} MiB exceeded", mib(*.limit_bytes))]
struct MemoryLimitExceeded {
    limit_bytes: u64,
}

/// The error the epoch callback traps with once the CPU budget is spent.
#[derive(Debug, thiserror::Error)]
#[error("CPU budget spent")]
struct CpuBudgetSpent;

fn mib(bytes: u64) -> u64 {
    bytes / (1024 * 1024)
}

impl MemoryLimiter {
    fn grow(&mut self, current: u64, desired: u64) -> wasmtime::Result<bool> {
        let added = desired.saturating_sub(current);
        let total = self.used_bytes.saturating_add(added);
        if total > self.limit_bytes {
            self.verdict.memory_denied.store(true, Ordering::SeqCst);
            return Err(wasmtime::Error::new(MemoryLimitExceeded {
                limit_bytes: self.limit_bytes,
            }));
        }
        self.used_bytes = total;
        Ok(true)
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.grow(current as u64, desired as u64)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.grow(
            (current as u64).saturating_mul(TABLE_ELEMENT_BYTES),
            (desired as u64).saturating_mul(TABLE_ELEMENT_BYTES),
        )
    }
}

/// Time a call spent being polled: finished polls plus the one under way.
#[derive(Default)]
struct CpuMeter {
    state: Mutex<(Duration, Option<Instant>)>,
}

impl CpuMeter {
    fn begin(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.1 = Some(Instant::now());
    }

    fn end(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(start) = state.1.take() {
            state.0 += start.elapsed();
        }
    }

    fn spent(&self) -> Duration {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.0 + state.1.map(|start| start.elapsed()).unwrap_or_default()
    }
}

/// A future whose polls are timed by a [`CpuMeter`].
struct Metered<'a, T> {
    inner: Pin<Box<dyn Future<Output = T> + Send + 'a>>,
    meter: Arc<CpuMeter>,
}

impl<T> Future for Metered<'_, T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        self.meter.begin();
        let result = self.inner.as_mut().poll(cx);
        self.meter.end();
        result
    }
}

impl Default for WasmTool {
    /// Same as [`WasmTool::new`].
    fn default() -> Self {
        Self::new()
    }
}

impl WasmTool {
    /// The tool, with its engine, linker, empty cache and epoch ticker thread.
    ///
    /// # Panics
    /// When the wasmtime engine cannot be configured on this platform or the ticker thread
    /// cannot start; [`WasmTool::try_new`] reports these instead.
    pub fn new() -> Self {
        match Self::try_new() {
            Ok(tool) => tool,
            Err(error) => panic!("cannot create the wasm tool: {error}"),
        }
    }

    /// The tool, with its engine, linker, empty cache and epoch ticker thread.
    ///
    /// # Errors
    /// When the wasmtime engine cannot be configured on this platform or the ticker thread
    /// cannot start.
    pub fn try_new() -> Result<Self, ToolError> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        let engine = Engine::new(&config).map_err(|error| {
            ToolError::permanent(format!("cannot configure the wasm engine: {error}"))
        })?;
        let mut linker: Linker<StoreState> = Linker::new(&engine);
        p1::add_to_linker_async(&mut linker, |state: &mut StoreState| &mut state.wasi).map_err(
            |error| ToolError::permanent(format!("cannot link WASI preview 1: {error}")),
        )?;
        let ticker = Ticker::start(engine.clone())?;
        Ok(Self {
            runtime: Arc::new(Runtime {
                engine,
                linker,
                cache: Mutex::new(ModuleCache::default()),
                files: Mutex::default(),
                compilations: AtomicU64::new(0),
                ticker,
            }),
            policy: Arc::new(WasmPolicy::allow_all()),
        })
    }

    /// The same tool (sharing its engine and caches) under `policy`: the grants tasks may
    /// give modules. A new tool allows everything ([`WasmPolicy::allow_all`]).
    pub fn with_policy(&self, policy: WasmPolicy) -> Self {
        Self {
            runtime: self.runtime.clone(),
            policy: Arc::new(policy),
        }
    }

    /// The grants tasks may give modules.
    pub fn policy(&self) -> &WasmPolicy {
        &self.policy
    }

    /// Runs the module file at `path` (absolute; `.wasm` or `.wat`) like
    /// [`WasmTool::call`]. The file is read, hashed and compiled once; later calls find it in
    /// the cache while its size and modification time are unchanged.
    ///
    /// # Errors
    /// See [`WasmTool`]; grants outside the tool's [`WasmPolicy`] are refused.
    pub async fn call_file(
        &self,
        path: &Path,
        input: &Value,
        limits: &WasmLimits,
        grants: &WasmGrants,
        logs: &dyn LogSink,
    ) -> Result<Value, ToolError> {
        self.policy.check(grants, "capabilities")?;
        let name = format!("module {}", path.display());
        let argv0 = path
            .file_name()
            .map(|file| file.to_string_lossy().into_owned())
            .unwrap_or_else(|| "module".to_owned());
        let module = self.module_for_file(path, &name).await?;
        self.run(module.pre, &name, &argv0, input, limits, grants, logs)
            .await
    }

    /// Number of modules in the cache (at most [`MODULE_CACHE_ENTRIES`]).
    pub fn cached_modules(&self) -> usize {
        self.runtime.cache().entries.len()
    }

    /// Number of modules this tool compiled since it was created; a call that finds its
    /// module in the cache does not count.
    pub fn compilations(&self) -> u64 {
        self.runtime.compilations.load(Ordering::Relaxed)
    }

    /// Compiles a module (wasm binary or WAT text) and caches it, if not cached yet; returns
    /// a handle to run it with [`WasmTool::call_module`] without hashing its bytes again
    /// (for registering modules ahead of their first call).
    ///
    /// # Errors
    /// Bytes that are neither wasm nor WAT, a module that fails validation, or one that
    /// imports something other than WASI preview 1 (permanent).
    pub async fn prepare(&self, module: &[u8]) -> Result<WasmModule, ToolError> {
        self.instance_pre(module, "module").await
    }

    /// Runs a module prepared by [`WasmTool::prepare`] of this tool (or a clone of it), like
    /// [`WasmTool::call`].
    ///
    /// # Errors
    /// See [`WasmTool`]; every message names the cause. A module prepared by another tool
    /// is refused (permanent).
    pub async fn call_module(
        &self,
        module: &WasmModule,
        input: &Value,
        limits: &WasmLimits,
        grants: &WasmGrants,
        logs: &dyn LogSink,
    ) -> Result<Value, ToolError> {
        self.run(
            module.pre.clone(),
            "module",
            "module",
            input,
            limits,
            grants,
            logs,
        )
        .await
    }

    /// Runs a module (wasm binary or WAT text): writes `input` to its stdin as one JSON
    /// document, calls `_start` within `limits` and `grants`, forwards its stderr lines to
    /// `logs` and returns the JSON document it wrote to stdout.
    ///
    /// # Errors
    /// See [`WasmTool`]; every message names the cause.
    pub async fn call(
        &self,
        module: &[u8],
        input: &Value,
        limits: &WasmLimits,
        grants: &WasmGrants,
        logs: &dyn LogSink,
    ) -> Result<Value, ToolError> {
        self.call_named(module, "module", "module", input, limits, grants, logs)
            .await
    }

    /// [`WasmTool::call`] with the label errors name the module by and its `argv[0]`.
    #[allow(clippy::too_many_arguments)]
    async fn call_named(
        &self,
        module: &[u8],
        name: &str,
        argv0: &str,
        input: &Value,
        limits: &WasmLimits,
        grants: &WasmGrants,
        logs: &dyn LogSink,
    ) -> Result<Value, ToolError> {
        let module = self.instance_pre(module, name).await?;
        self.run(module.pre, name, argv0, input, limits, grants, logs)
            .await
    }

    /// Instantiates a pre-instantiated module in a fresh store and runs `_start`.
    #[allow(clippy::too_many_arguments)]
    async fn run(
        &self,
        pre: InstancePre<StoreState>,
        name: &str,
        argv0: &str,
        input: &Value,
        limits: &WasmLimits,
        grants: &WasmGrants,
        logs: &dyn LogSink,
    ) -> Result<Value, ToolError> {
        let stdin = serde_json::to_vec(input)
            .map_err(|error| ToolError::permanent(format!("cannot encode input: {error}")))?;
        let stdout = CappedPipe::new(STDOUT_BYTES_MAX);
        let stderr = CappedPipe::new(STDERR_BYTES_MAX);

        let mut builder = WasiCtxBuilder::new();
        builder
            .stdin(MemoryInputPipe::new(stdin))
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .arg(argv0);
        for variable in &grants.env {
            if variable.is_empty() || variable.contains(['=', '\0']) {
                return Err(ToolError::permanent(format!(
                    "allow.env: {variable:?} is not a valid variable name"
                )));
            }
            if variable.starts_with("ARCHES_") {
                return Err(ToolError::permanent(format!(
                    "allow.env: variable {variable:?} is the server's own configuration and is \
                     never granted"
                )));
            }
            if let Ok(value) = std::env::var(variable) {
                builder.env(variable, value);
            }
        }
        for (variable, value) in &grants.vars {
            builder.env(variable, value);
        }
        for (dirs, perms, kind) in [
            (&grants.read_dirs, FsPerms::ReadOnly, DirKind::Read),
            (&grants.write_dirs, FsPerms::ReadWrite, DirKind::Write),
        ] {
            for dir in dirs {
                // Resolved and checked as opened: a symbolic link inside an allowed
                // directory cannot lead the module out of it.
                let host = self.policy.confine(dir, kind, "allow")?;
                preopen(&mut builder, &host, dir, perms, kind)?;
            }
        }

        let verdict = Arc::new(Verdict::default());
        let mut store = Store::new(
            &self.runtime.engine,
            StoreState {
                wasi: builder.build_p1(),
                limiter: MemoryLimiter {
                    limit_bytes: limits.memory_bytes,
                    used_bytes: 0,
                    verdict: verdict.clone(),
                },
            },
        );
        store.limiter(|state: &mut StoreState| -> &mut dyn ResourceLimiter { &mut state.limiter });
        let meter = Arc::new(CpuMeter::default());
        {
            let meter = meter.clone();
            let verdict = verdict.clone();
            let budget = limits.cpu;
            store.epoch_deadline_callback(move |_| {
                if meter.spent() >= budget {
                    verdict.cpu_spent.store(true, Ordering::SeqCst);
                    return Err(wasmtime::Error::new(CpuBudgetSpent));
                }
                Ok(UpdateDeadline::Yield(1))
            });
        }
        store.set_epoch_deadline(1);

        let _ticking = self.runtime.ticker.running();
        let run = Metered {
            inner: Box::pin(async move {
                let instance = pre.instantiate_async(&mut store).await?;
                let start = instance
                    .get_typed_func::<(), ()>(&mut store, "_start")
                    .map_err(|_| wasmtime::Error::new(NoStart))?;
                start.call_async(&mut store, ()).await
            }),
            meter,
        };
        let result = match limits.timeout {
            Some(timeout) => tokio::time::timeout(timeout, run).await.ok(),
            None => Some(run.await),
        };

        // The granted secrets are masked before any line is cut or quoted.
        let values: Vec<String> = grants.vars.iter().map(|(_, v)| v.clone()).collect();
        let mask = Mask::new(&values);
        let stderr_tail =
            forward_stderr(&stderr.contents(), stderr.overflowed(), logs, &mask).await;
        let failure = |message: String, retryable: bool| {
            let message = if stderr_tail.is_empty() {
                message
            } else {
                format!("{message}; last stderr lines:\n{}", stderr_tail.join("\n"))
            };
            ToolError { message, retryable }
        };
        match result {
            None => {
                let timeout = limits.timeout.unwrap_or_default();
                return Err(failure(
                    format!(
                        "the module ran past its timeout of {}",
                        format_duration(timeout)
                    ),
                    true,
                ));
            }
            Some(Ok(())) => {}
            Some(Err(error)) => {
                if let Some(exit) = error.downcast_ref::<I32Exit>() {
                    if exit.0 != 0 {
                        return Err(failure(
                            format!("the module exited with code {}", exit.0),
                            true,
                        ));
                    }
                } else if verdict.cpu_spent.load(Ordering::SeqCst)
                    || error.downcast_ref::<CpuBudgetSpent>().is_some()
                {
                    return Err(failure(
                        format!(
                            "the module ran past its CPU budget of {} ms",
                            limits.cpu.as_millis()
                        ),
                        false,
                    ));
                } else if verdict.memory_denied.load(Ordering::SeqCst)
                    || error.downcast_ref::<MemoryLimitExceeded>().is_some()
                {
                    return Err(failure(
                        MemoryLimitExceeded {
                            limit_bytes: limits.memory_bytes,
                        }
                        .to_string(),
                        false,
                    ));
                } else if error.downcast_ref::<NoStart>().is_some() {
                    return Err(ToolError::permanent(format!(
                        "{name} exports no `_start` function; it must be a WASI command"
                    )));
                } else if let Some(trap) = error.downcast_ref::<Trap>() {
                    return Err(failure(format!("the module trapped: {trap}"), false));
                } else {
                    return Err(failure(
                        format!("the module failed: {}", error.root_cause()),
                        false,
                    ));
                }
            }
        }

        if stdout.overflowed() {
            return Err(ToolError::permanent(format!(
                "the module wrote more than {} MiB to stdout",
                mib(STDOUT_BYTES_MAX as u64)
            )));
        }
        parse_stdout(&stdout.contents(), &mask)
    }

    /// The compiled module of the file at `path`: from the caches when the file still has
    /// the size and modification time it had when last read (no read, no hash), otherwise
    /// read and hashed now, then found by its hash or compiled.
    async fn module_for_file(&self, path: &Path, name: &str) -> Result<WasmModule, ToolError> {
        let (len, modified) = module_metadata(path).await?;
        let known = modified.and_then(|modified| {
            let stamp = self.runtime.files().get(path).copied()?;
            (stamp.len == len && stamp.modified == modified).then_some(stamp.sha256)
        });
        if let Some(sha256) = known {
            if let Some(pre) = self.runtime.cache().get(&sha256) {
                return Ok(WasmModule { pre, sha256 });
            }
        }
        let bytes = tokio::fs::read(path).await.map_err(|error| {
            ToolError::permanent(format!("cannot read module {}: {error}", path.display()))
        })?;
        let module = self.instance_pre(&bytes, name).await?;
        if let Some(modified) = modified {
            let mut files = self.runtime.files();
            // Bounded like the module cache; the paths of a busy tool are few.
            if files.len() >= MODULE_CACHE_ENTRIES && !files.contains_key(path) {
                files.clear();
            }
            files.insert(
                path.to_path_buf(),
                FileStamp {
                    len,
                    modified,
                    sha256: module.sha256,
                },
            );
        }
        Ok(module)
    }

    /// The pre-instantiated module, from the cache or compiled now (on the blocking pool).
    async fn instance_pre(&self, module: &[u8], name: &str) -> Result<WasmModule, ToolError> {
        let mut key = [0u8; 32];
        key.copy_from_slice(&Sha256::digest(module));
        if let Some(pre) = self.runtime.cache().get(&key) {
            return Ok(WasmModule { pre, sha256: key });
        }
        let runtime = self.runtime.clone();
        let bytes = module.to_vec();
        let label = name.to_owned();
        let pre = tokio::task::spawn_blocking(move || runtime.compile(&bytes, &label))
            .await
            .map_err(|error| ToolError::transient(format!("cannot compile {name}: {error}")))??;
        self.runtime.cache().insert(key, pre.clone());
        Ok(WasmModule { pre, sha256: key })
    }
}

/// The error of a module without `_start`.
#[derive(Debug, thiserror::Error)]
#[error("no _start export")]
struct NoStart;

impl Runtime {
    fn cache(&self) -> std::sync::MutexGuard<'_, ModuleCache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn files(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, FileStamp>> {
        self.files.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn compile(&self, bytes: &[u8], name: &str) -> Result<InstancePre<StoreState>, ToolError> {
        let binary = wat::parse_bytes(bytes).map_err(|error| {
            ToolError::permanent(format!(
                "{name} is neither a wasm binary nor valid WAT text: {}",
                parse_error_without_source(&error.to_string())
            ))
        })?;
        let module = Module::from_binary(&self.engine, &binary).map_err(|error| {
            ToolError::permanent(format!(
                "{name} is not a valid wasm module: {}",
                error_chain(&error)
            ))
        })?;
        self.compilations.fetch_add(1, Ordering::Relaxed);
        self.linker.instantiate_pre(&module).map_err(|error| {
            ToolError::permanent(format!(
                "{name} cannot be linked (only WASI preview 1 imports are provided): {}",
                error_chain(&error)
            ))
        })
    }
}

/// A WAT parse error without the quoted source line: its message and position only. The
/// source may be any file a task named (a secret, the process environment), so none of it is
/// repeated.
fn parse_error_without_source(rendered: &str) -> String {
    let mut lines = rendered.lines();
    let message = lines.next().unwrap_or_default().to_owned();
    match lines.find_map(|line| line.trim_start().strip_prefix("--> ")) {
        Some(position) => format!("{message} (at {position})"),
        None => message,
    }
}

/// Every message of an error's chain, joined.
fn error_chain(error: &wasmtime::Error) -> String {
    error
        .chain()
        .map(|cause| cause.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

/// Preopens the resolved host directory `host` under the guest path `guest` (the path the
/// task named).
fn preopen(
    builder: &mut WasiCtxBuilder,
    host: &Path,
    guest: &Path,
    perms: FsPerms,
    kind: DirKind,
) -> Result<(), ToolError> {
    let what = format!("allow.{}", kind.field());
    let guest = guest.to_str().ok_or_else(|| {
        ToolError::permanent(format!("{what}: {} is not valid UTF-8", guest.display()))
    })?;
    builder.preopened_dir(host, guest, perms).map_err(|error| {
        ToolError::permanent(format!(
            "{what}: cannot open directory {}: {}",
            host.display(),
            error_chain(&error)
        ))
    })?;
    Ok(())
}

/// Logs stderr line by line within the bounds; returns its last lines for error messages.
async fn forward_stderr(
    stderr: &[u8],
    overflowed: bool,
    logs: &dyn LogSink,
    mask: &Mask,
) -> Vec<String> {
    if stderr.is_empty() {
        return Vec::new();
    }
    let text = mask.text(&String::from_utf8_lossy(stderr));
    let mut logged = 0usize;
    let mut dropped_lines = 0usize;
    for line in text.lines() {
        if logged >= LOG_LINES_MAX {
            dropped_lines += 1;
            continue;
        }
        let mut end = line.len().min(LOG_LINE_BYTES_MAX);
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        logs.write(LogStream::Stderr, &line[..end]).await;
        logged += 1;
    }
    if dropped_lines > 0 {
        let message = format!("stderr truncated: {dropped_lines} more lines");
        logs.write(LogStream::System, &message).await;
    }
    if overflowed {
        let message = format!(
            "stderr truncated: only the first {} MiB were kept",
            mib(STDERR_BYTES_MAX as u64)
        );
        logs.write(LogStream::System, &message).await;
    }
    let lines: Vec<&str> = text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .collect();
    let start = lines.len().saturating_sub(STDERR_TAIL_LINES_MAX);
    lines[start..]
        .iter()
        .map(|line| line.chars().take(500).collect())
        .collect()
}

/// The one JSON document of stdout.
fn parse_stdout(stdout: &[u8], mask: &Mask) -> Result<Value, ToolError> {
    if stdout.iter().all(u8::is_ascii_whitespace) {
        return Err(ToolError::permanent(
            "the module wrote nothing to stdout; it must write one JSON document",
        ));
    }
    serde_json::from_slice(stdout).map_err(|error| {
        let text = mask.text(&String::from_utf8_lossy(stdout));
        let mut quote: String = text.chars().take(STDOUT_QUOTE_CHARS).collect();
        if quote.len() < text.len() {
            quote.push('…');
        }
        ToolError::permanent(format!(
            "the module's stdout is not one JSON document ({error}); stdout starts with: {quote:?}"
        ))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WasmInputs {
    module: String,
    #[serde(default = "empty_object")]
    input: Value,
    timeout: Option<Value>,
    cpu_ms: Option<u64>,
    memory_mb: Option<u64>,
    #[serde(default)]
    allow: AllowInputs,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AllowInputs {
    #[serde(default)]
    env: Vec<String>,
    #[serde(default)]
    read_dirs: Vec<String>,
    #[serde(default)]
    write_dirs: Vec<String>,
}

fn empty_object() -> Value {
    Value::Object(serde_json::Map::new())
}

impl WasmInputs {
    fn limits(&self) -> Result<WasmLimits, ToolError> {
        let timeout = match &self.timeout {
            None | Some(Value::Null) => None,
            Some(Value::Number(seconds)) => {
                let seconds = seconds.as_f64().unwrap_or(-1.0);
                Some(
                    Duration::try_from_secs_f64(seconds)
                        .ok()
                        .filter(|d| !d.is_zero())
                        .ok_or_else(|| {
                            ToolError::permanent(format!(
                                "invalid wasm inputs: timeout {seconds} must be a positive number of seconds"
                            ))
                        })?,
                )
            }
            Some(Value::String(text)) => {
                let duration = arches_core::time::parse_duration(text).map_err(|error| {
                    ToolError::permanent(format!("invalid wasm inputs: timeout: {error}"))
                })?;
                if duration.is_zero() {
                    return Err(ToolError::permanent(
                        "invalid wasm inputs: timeout must be positive",
                    ));
                }
                Some(duration)
            }
            Some(_) => {
                return Err(ToolError::permanent(
                    "invalid wasm inputs: timeout must be a number of seconds or a duration such as \"30s\"",
                ))
            }
        };
        let cpu_ms = self.cpu_ms.unwrap_or(DEFAULT_CPU_MS);
        if !(1..=CPU_MS_MAX).contains(&cpu_ms) {
            return Err(ToolError::permanent(format!(
                "invalid wasm inputs: cpu_ms {cpu_ms} must be between 1 and {CPU_MS_MAX}"
            )));
        }
        let memory_mb = self.memory_mb.unwrap_or(DEFAULT_MEMORY_MB);
        if !(1..=MEMORY_MB_MAX).contains(&memory_mb) {
            return Err(ToolError::permanent(format!(
                "invalid wasm inputs: memory_mb {memory_mb} must be between 1 and {MEMORY_MB_MAX}"
            )));
        }
        let cpu = Duration::from_millis(cpu_ms);
        Ok(WasmLimits {
            cpu,
            // A module waiting (WASI `poll_oneoff`) spends no CPU budget; without a timeout of
            // its own the wall clock is still bounded, so it cannot hold a worker slot forever.
            timeout: Some(timeout.unwrap_or(cpu * DEFAULT_WALL_PER_CPU)),
            memory_bytes: memory_mb * 1024 * 1024,
        })
    }

    fn grants(&self) -> WasmGrants {
        WasmGrants {
            env: self.allow.env.clone(),
            read_dirs: self.allow.read_dirs.iter().map(PathBuf::from).collect(),
            write_dirs: self.allow.write_dirs.iter().map(PathBuf::from).collect(),
            vars: Vec::new(),
        }
    }
}

/// What identified a module file when it was read: its size, modification time and the
/// SHA-256 of its bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: std::time::SystemTime,
    sha256: [u8; 32],
}

/// The size and modification time of a module file within [`MODULE_FILE_BYTES_MAX`].
async fn module_metadata(path: &Path) -> Result<(u64, Option<std::time::SystemTime>), ToolError> {
    let metadata = tokio::fs::metadata(path).await.map_err(|error| {
        ToolError::permanent(format!("cannot read module {}: {error}", path.display()))
    })?;
    if !metadata.is_file() {
        return Err(ToolError::permanent(format!(
            "module {} is not a file",
            path.display()
        )));
    }
    if metadata.len() > MODULE_FILE_BYTES_MAX {
        return Err(ToolError::permanent(format!(
            "module {} holds {} bytes; at most {MODULE_FILE_BYTES_MAX} are read",
            path.display(),
            metadata.len()
        )));
    }
    Ok((metadata.len(), metadata.modified().ok()))
}

#[async_trait]
impl Tool for WasmTool {
    fn name(&self) -> &str {
        "wasm"
    }

    fn description(&self) -> &str {
        "run a sandboxed WASI module with JSON on stdin and stdout"
    }

    fn needs_work_dir(&self) -> bool {
        false
    }

    fn sandboxes(&self) -> &'static [Sandbox] {
        &[Sandbox::Wasm]
    }

    fn input_schema(&self) -> Value {
        let dirs = json!({
            "type": "array",
            "items": {"type": "string", "minLength": 1},
            "description": "absolute host directories, preopened under the same guest path"
        });
        json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["module"],
            "properties": {
                "module": {
                    "type": "string",
                    "minLength": 1,
                    "description": "path of a .wasm or .wat WASI preview 1 command"
                },
                "input": {"description": "any JSON, written to the module's stdin; default {}"},
                "timeout": {
                    "oneOf": [
                        {"type": "number", "exclusiveMinimum": 0},
                        {"type": "string", "minLength": 1}
                    ],
                    "description": "wall-clock deadline: seconds, or a duration such as \"500ms\" or \"30s\""
                },
                "cpu_ms": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": CPU_MS_MAX,
                    "description": format!("CPU budget in milliseconds; default {DEFAULT_CPU_MS}")
                },
                "memory_mb": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": MEMORY_MB_MAX,
                    "description": format!("cap on linear memory plus tables in MiB; default {DEFAULT_MEMORY_MB}")
                },
                "allow": {
                    "type": "object",
                    "additionalProperties": false,
                    "description": "what the module may reach; nothing by default",
                    "properties": {
                        "env": {
                            "type": "array",
                            "items": {"type": "string", "minLength": 1},
                            "description": "names of environment variables copied from the worker"
                        },
                        "read_dirs": dirs.clone(),
                        "write_dirs": dirs
                    }
                }
            }
        })
    }

    async fn execute(&self, context: ToolContext, inputs: Value) -> Result<Value, ToolError> {
        let inputs: WasmInputs = parse_inputs("wasm", inputs)?;
        let limits = inputs.limits()?;
        let grants = inputs.grants();
        self.policy.check(&grants, "allow")?;
        let path = absolute_path(&inputs.module)?;
        let path = self.policy.confine(&path, DirKind::Module, "inputs")?;
        let output = self
            .call_file(
                &path,
                &inputs.input,
                &limits,
                &grants,
                context.logs.as_ref(),
            )
            .await?;
        Ok(json!({ "output": output }))
    }
}
