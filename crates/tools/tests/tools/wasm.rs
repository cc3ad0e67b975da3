//! Tests of the `wasm` tool, with modules written in WAT (a module of the `tools` test
//! binary, sharing its harness).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use arches_core::ports::{Tool, ToolError};
use arches_core::records::LogStream;
use arches_tools::wasm::*;
use serde_json::{json, Value};

use super::{Harness, MemoryLogs};

/// WASI imports, one memory of 4 pages and helpers shared by the test modules.
///
/// Memory layout: 0..16 scratch (iovec at 0, count at 8), 16..512 results of WASI calls,
/// 512..1024 string constants of each module, 1024.. the output buffer built by `$byte`,
/// `$str` and `$num` and written by `$flush`, 65536.. stdin as read by `$read_stdin`.
const PRELUDE: &str = r#"
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $environ_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $environ_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "sock_accept" (func $sock_accept (param i32 i32 i32) (result i32)))
  (memory (export "memory") 4)
  (global $out (mut i32) (i32.const 1024))
  (func $write (param $fd i32) (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))))
  (func $byte (param $b i32)
    (i32.store8 (global.get $out) (local.get $b))
    (global.set $out (i32.add (global.get $out) (i32.const 1))))
  (func $str (param $ptr i32) (param $len i32)
    (memory.copy (global.get $out) (local.get $ptr) (local.get $len))
    (global.set $out (i32.add (global.get $out) (local.get $len))))
  (func $num (param $v i64) (local $start i32) (local $end i32) (local $t i32)
    (local.set $start (global.get $out))
    (loop $digits
      (call $byte (i32.add (i32.const 48) (i32.wrap_i64 (i64.rem_u (local.get $v) (i64.const 10)))))
      (local.set $v (i64.div_u (local.get $v) (i64.const 10)))
      (br_if $digits (i64.ne (local.get $v) (i64.const 0))))
    (local.set $end (i32.sub (global.get $out) (i32.const 1)))
    (block $done
      (loop $reverse
        (br_if $done (i32.ge_u (local.get $start) (local.get $end)))
        (local.set $t (i32.load8_u (local.get $start)))
        (i32.store8 (local.get $start) (i32.load8_u (local.get $end)))
        (i32.store8 (local.get $end) (local.get $t))
        (local.set $start (i32.add (local.get $start) (i32.const 1)))
        (local.set $end (i32.sub (local.get $end) (i32.const 1)))
        (br $reverse))))
  (func $flush (param $fd i32)
    (call $write (local.get $fd) (i32.const 1024) (i32.sub (global.get $out) (i32.const 1024)))
    (global.set $out (i32.const 1024)))
  (func $read_stdin (result i32) (local $len i32)
    (block $done
      (loop $more
        (br_if $done (i32.gt_u (local.get $len) (i32.const 131072)))
        (i32.store (i32.const 0) (i32.add (i32.const 65536) (local.get $len)))
        (i32.store (i32.const 4) (i32.const 65536))
        (br_if $done (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
        (br_if $done (i32.eqz (i32.load (i32.const 8))))
        (local.set $len (i32.add (local.get $len) (i32.load (i32.const 8))))
        (br $more)))
    (local.get $len))
"#;

fn module(body: &str) -> String {
    format!("(module {PRELUDE} {body})")
}

/// Copies stdin to stdout (the fixture `tests/wasm/echo.wat`).
fn echo_wat() -> String {
    include_str!("../../tests/wasm/echo.wat").to_owned()
}

/// Reads a number n (the digits of stdin) and prints `{"fib": fib(n)}`, iteratively (the
/// fixture `tests/wasm/fib.wat`).
fn fib_wat() -> String {
    include_str!("../../tests/wasm/fib.wat").to_owned()
}

/// Stdin is a JSON string naming a path: tries `path_open` of it on fd 3 (the first
/// preopen, if any), counts the environment (and writes it to stderr, one variable a line),
/// tries `sock_accept` on fd 3, and prints the errnos and the count.
fn probe_wat() -> String {
    module(
        r#"(data (i32.const 512) "{\"path_open\": ")
           (data (i32.const 544) ", \"environ\": ")
           (data (i32.const 576) ", \"sock_accept\": ")
           (func (export "_start")
             (local $len i32) (local $size i32) (local $i i32)
             (local.set $len (call $read_stdin))
             (call $str (i32.const 512) (i32.const 14))
             (call $num (i64.extend_i32_u
               (call $path_open (i32.const 3) (i32.const 0) (i32.const 65537)
                 (i32.sub (local.get $len) (i32.const 2))
                 (i32.const 0) (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 16))))
             (drop (call $environ_sizes_get (i32.const 20) (i32.const 24)))
             (local.set $size (i32.load (i32.const 24)))
             (call $str (i32.const 544) (i32.const 13))
             (call $num (i64.extend_i32_u (i32.load (i32.const 20))))
             (drop (call $environ_get (i32.const 30000) (i32.const 40000)))
             (block $done
               (loop $next
                 (br_if $done (i32.ge_u (local.get $i) (local.get $size)))
                 (if (i32.eqz (i32.load8_u (i32.add (i32.const 40000) (local.get $i))))
                   (then (i32.store8 (i32.add (i32.const 40000) (local.get $i)) (i32.const 10))))
                 (local.set $i (i32.add (local.get $i) (i32.const 1)))
                 (br $next)))
             (call $write (i32.const 2) (i32.const 40000) (local.get $size))
             (call $str (i32.const 576) (i32.const 17))
             (call $num (i64.extend_i32_u (call $sock_accept (i32.const 3) (i32.const 0) (i32.const 16))))
             (call $byte (i32.const 125))
             (call $flush (i32.const 1)))"#,
    )
}

/// Stdin is a JSON string naming a path: creates (or truncates) that file under fd 3 (the
/// first preopen) and writes `hello` to it; prints `{"errno": <errno of path_open>}`.
fn writer_wat() -> String {
    module(
        r#"(data (i32.const 512) "{\"errno\": ")
           (data (i32.const 544) "hello")
           (func (export "_start")
             (local $len i32) (local $errno i32)
             (local.set $len (call $read_stdin))
             (local.set $errno
               (call $path_open (i32.const 3) (i32.const 0) (i32.const 65537)
                 (i32.sub (local.get $len) (i32.const 2))
                 (i32.const 9) (i64.const 64) (i64.const 0) (i32.const 0) (i32.const 16)))
             (if (i32.eqz (local.get $errno))
               (then (call $write (i32.load (i32.const 16)) (i32.const 544) (i32.const 5))))
             (call $str (i32.const 512) (i32.const 10))
             (call $num (i64.extend_i32_u (local.get $errno)))
             (call $byte (i32.const 125))
             (call $flush (i32.const 1)))"#,
    )
}

const LOOP_WAT: &str = r#"(module (func (export "_start") (loop $spin (br $spin))))"#;

impl Harness {
    /// Writes a module file and returns its path.
    fn file(&self, name: &str, content: &str) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        path.to_str().unwrap().to_owned()
    }

    async fn run(&self, tool: &WasmTool, inputs: Value) -> Result<Value, ToolError> {
        tool.execute(self.context("wasm_task", BTreeMap::new()), inputs)
            .await
    }
}

async fn call(tool: &WasmTool, wat: &str, input: Value) -> Result<Value, ToolError> {
    call_with(
        tool,
        wat,
        input,
        &WasmLimits::default(),
        &WasmGrants::default(),
    )
    .await
}

async fn call_with(
    tool: &WasmTool,
    wat: &str,
    input: Value,
    limits: &WasmLimits,
    grants: &WasmGrants,
) -> Result<Value, ToolError> {
    let logs = MemoryLogs::default();
    tool.call(wat.as_bytes(), &input, limits, grants, &logs)
        .await
}

fn limits_cpu(ms: u64) -> WasmLimits {
    WasmLimits {
        cpu: Duration::from_millis(ms),
        ..WasmLimits::default()
    }
}

#[tokio::test]
async fn echo_returns_its_input_through_the_tool() {
    let harness = Harness::new().await;
    let tool = WasmTool::new();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/wasm/echo.wat");
    let input = json!({"name": "penguin", "sizes": [1, 2.5, null], "nested": {"ok": true}});
    let outputs = harness
        .run(&tool, json!({"module": path, "input": input}))
        .await
        .unwrap();
    assert_eq!(outputs, json!({ "output": input }));
    // The default input is {}.
    let outputs = harness.run(&tool, json!({"module": path})).await.unwrap();
    assert_eq!(outputs, json!({"output": {}}));
}

#[tokio::test]
async fn echo_from_a_wasm_binary_file() {
    let harness = Harness::new().await;
    let tool = WasmTool::new();
    let binary = wat::parse_str(echo_wat()).unwrap();
    let path = harness.dir.path().join("echo.wasm");
    std::fs::write(&path, binary).unwrap();
    let outputs = harness
        .run(&tool, json!({"module": path, "input": [1, "two"]}))
        .await
        .unwrap();
    assert_eq!(outputs, json!({"output": [1, "two"]}));
}

#[tokio::test]
async fn fibonacci_prints_json() {
    let tool = WasmTool::new();
    let fib = fib_wat();
    assert_eq!(
        call(&tool, &fib, json!(0)).await.unwrap(),
        json!({"fib": 0})
    );
    assert_eq!(
        call(&tool, &fib, json!(1)).await.unwrap(),
        json!({"fib": 1})
    );
    assert_eq!(
        call(&tool, &fib, json!(10)).await.unwrap(),
        json!({"fib": 55})
    );
    assert_eq!(
        call(&tool, &fib, json!(90)).await.unwrap(),
        json!({"fib": 2_880_067_194_370_816_120_u64})
    );
}

#[tokio::test]
async fn an_infinite_loop_is_stopped_within_its_cpu_budget() {
    let tool = WasmTool::new();
    // Compiled ahead, so that the measured time is the run alone.
    tool.prepare(LOOP_WAT.as_bytes()).await.unwrap();
    let started = Instant::now();
    let error = call_with(
        &tool,
        LOOP_WAT,
        json!({}),
        &limits_cpu(200),
        &WasmGrants::default(),
    )
    .await
    .unwrap_err();
    let elapsed = started.elapsed();
    println!("a 200 ms CPU budget stopped the loop after {elapsed:?}");
    assert_eq!(
        error.message,
        "the module ran past its CPU budget of 200 ms"
    );
    assert!(!error.retryable);
    // The budget is checked at every epoch tick (1 ms). The allowance of 25 ms covers that
    // tick, the ticker thread waking late on a loaded machine, instantiation and the
    // scheduler's turns between yields (time not counted as CPU), with headroom for a
    // 2-core machine busy with other builds.
    let bound = Duration::from_millis(200).mul_f64(1.1) + Duration::from_millis(25);
    assert!(
        elapsed <= bound,
        "stopped after {elapsed:?}, bound {bound:?}"
    );
}

#[tokio::test]
async fn an_infinite_loop_is_stopped_by_the_wall_clock_timeout() {
    let harness = Harness::new().await;
    let tool = WasmTool::new();
    let path = harness.file("loop.wat", LOOP_WAT);
    let error = harness
        .run(
            &tool,
            json!({"module": path, "timeout": "100ms", "cpu_ms": 60_000}),
        )
        .await
        .unwrap_err();
    assert_eq!(error.message, "the module ran past its timeout of 100ms");
    assert!(error.retryable);
    let error = harness
        .run(&tool, json!({"module": path, "timeout": 0.05}))
        .await
        .unwrap_err();
    assert!(error.message.contains("ran past its timeout"), "{error}");
}

#[tokio::test(flavor = "current_thread")]
async fn other_calls_keep_their_latency_while_a_loop_runs() {
    let tool = WasmTool::new();
    let fib = fib_wat();
    tool.prepare(LOOP_WAT.as_bytes()).await.unwrap();
    tool.prepare(fib.as_bytes()).await.unwrap();
    let spinner = tool.clone();
    let started = Instant::now();
    let spinning = tokio::spawn(async move {
        call_with(
            &spinner,
            LOOP_WAT,
            json!({}),
            &limits_cpu(5_000),
            &WasmGrants::default(),
        )
        .await
    });
    // Let the loop start on this single-threaded runtime.
    tokio::task::yield_now().await;
    let output = call(&tool, &fib, json!(30)).await.unwrap();
    assert_eq!(output, json!({"fib": 832_040}));
    assert!(
        !spinning.is_finished(),
        "the loop ended before the fibonacci call"
    );
    assert!(started.elapsed() < Duration::from_millis(5_000));
    // Dropping the loop's future (what the engine does on cancel) stops it.
    spinning.abort();
    assert!(spinning.await.unwrap_err().is_cancelled());
}

#[tokio::test]
async fn a_memory_bomb_is_denied() {
    let tool = WasmTool::new();
    let bomb = r#"(module (memory 1)
        (func (export "_start") (loop $grow (drop (memory.grow (i32.const 16))) (br $grow))))"#;
    let error = call(&tool, bomb, json!({})).await.unwrap_err();
    assert_eq!(error.message, "memory limit of 64 MiB exceeded");
    assert!(!error.retryable);

    let huge = r#"(module (memory 2048) (func (export "_start")))"#;
    let limits = WasmLimits {
        memory_bytes: 64 * 1024 * 1024,
        ..WasmLimits::default()
    };
    let error = call_with(&tool, huge, json!({}), &limits, &WasmGrants::default())
        .await
        .unwrap_err();
    assert_eq!(error.message, "memory limit of 64 MiB exceeded");
    // The same module fits under a higher cap, set through the tool's inputs.
    let harness = Harness::new().await;
    let path = harness.file("huge.wat", huge);
    let error = harness
        .run(&tool, json!({"module": path, "memory_mb": 200}))
        .await
        .unwrap_err();
    assert!(error.message.contains("wrote nothing to stdout"), "{error}");
    let error = harness
        .run(&tool, json!({"module": path, "memory_mb": 100}))
        .await
        .unwrap_err();
    assert_eq!(error.message, "memory limit of 100 MiB exceeded");
}

#[tokio::test]
async fn nothing_is_granted_by_default() {
    let tool = WasmTool::new();
    let output = call(&tool, &probe_wat(), json!("/etc/passwd"))
        .await
        .unwrap();
    // No preopen: fd 3 does not exist (EBADF = 8), for files and sockets alike.
    assert_eq!(
        output,
        json!({"path_open": 8, "environ": 0, "sock_accept": 8})
    );
}

#[tokio::test]
async fn granted_variables_and_directories_are_visible() {
    let harness = Harness::new().await;
    let tool = WasmTool::new();
    let shared = tempfile::tempdir().unwrap();
    std::fs::write(shared.path().join("hello.txt"), "hi").unwrap();
    assert!(std::env::var("PATH").is_ok(), "the tests need PATH set");
    let path = harness.file("probe.wat", &probe_wat());
    let outputs = harness
        .run(
            &tool,
            json!({
                "module": path,
                "input": "hello.txt",
                "allow": {
                    "env": ["PATH", "WASM_TEST_SURELY_UNSET_VARIABLE"],
                    "read_dirs": [shared.path()]
                }
            }),
        )
        .await
        .unwrap();
    let output = &outputs["output"];
    assert_eq!(output["path_open"], 0, "{output}");
    assert_eq!(output["environ"], 1, "{output}");
    // fd 3 is the preopened directory, not a socket.
    assert_ne!(output["sock_accept"], 0, "{output}");
    let stderr = harness.logs.of(LogStream::Stderr);
    assert!(
        stderr.iter().any(|line| line.starts_with("PATH=")),
        "{stderr:?}"
    );
    // A file outside the directory stays out of reach.
    let outputs = harness
        .run(
            &tool,
            json!({"module": path, "input": "../../etc/passwd", "allow": {"read_dirs": [shared.path()]}}),
        )
        .await
        .unwrap();
    assert_ne!(outputs["output"]["path_open"], 0, "{outputs}");
    // Relative directories are refused.
    let error = harness
        .run(
            &tool,
            json!({"module": path, "input": "x", "allow": {"write_dirs": ["relative"]}}),
        )
        .await
        .unwrap_err();
    assert!(
        error.message.contains("must be an absolute path"),
        "{error}"
    );
}

#[tokio::test]
async fn only_write_dirs_are_writable() {
    let tool = WasmTool::new();
    let dir = tempfile::tempdir().unwrap();
    let writer = writer_wat();
    let read_only = WasmGrants {
        read_dirs: vec![dir.path().to_path_buf()],
        ..WasmGrants::default()
    };
    let output = call_with(
        &tool,
        &writer,
        json!("out.txt"),
        &WasmLimits::default(),
        &read_only,
    )
    .await
    .unwrap();
    assert_ne!(output["errno"], 0, "{output}");
    assert!(!dir.path().join("out.txt").exists());
    let read_write = WasmGrants {
        write_dirs: vec![dir.path().to_path_buf()],
        ..WasmGrants::default()
    };
    let output = call_with(
        &tool,
        &writer,
        json!("out.txt"),
        &WasmLimits::default(),
        &read_write,
    )
    .await
    .unwrap();
    assert_eq!(output, json!({"errno": 0}));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("out.txt")).unwrap(),
        "hello"
    );
}

#[tokio::test]
async fn exit_codes() {
    let tool = WasmTool::new();
    let exit3 = module(
        r#"(data (i32.const 512) "bad thing happened\n")
           (func (export "_start")
             (call $write (i32.const 2) (i32.const 512) (i32.const 19))
             (call $proc_exit (i32.const 3)))"#,
    );
    let error = call(&tool, &exit3, json!({})).await.unwrap_err();
    assert_eq!(
        error.message,
        "the module exited with code 3; last stderr lines:\nbad thing happened"
    );
    let exit0 = module(
        r#"(data (i32.const 512) "{\"ok\": true}")
           (func (export "_start")
             (call $write (i32.const 1) (i32.const 512) (i32.const 12))
             (call $proc_exit (i32.const 0)))"#,
    );
    assert_eq!(
        call(&tool, &exit0, json!({})).await.unwrap(),
        json!({"ok": true})
    );
}

#[tokio::test]
async fn traps_are_reported() {
    let tool = WasmTool::new();
    let trap = r#"(module (func (export "_start") unreachable))"#;
    let error = call(&tool, trap, json!({})).await.unwrap_err();
    assert!(error.message.starts_with("the module trapped: "), "{error}");
    assert!(error.message.contains("unreachable"), "{error}");
}

#[tokio::test]
async fn stdout_must_be_one_bounded_json_document() {
    let tool = WasmTool::new();
    let not_json = module(
        r#"(data (i32.const 512) "not json")
           (func (export "_start") (call $write (i32.const 1) (i32.const 512) (i32.const 8)))"#,
    );
    let error = call(&tool, &not_json, json!({})).await.unwrap_err();
    assert!(!error.retryable);
    assert!(
        error
            .message
            .starts_with("the module's stdout is not one JSON document ("),
        "{error}"
    );
    assert!(
        error.message.ends_with("stdout starts with: \"not json\""),
        "{error}"
    );

    let silent = r#"(module (func (export "_start")))"#;
    let error = call(&tool, silent, json!({})).await.unwrap_err();
    assert!(error.message.contains("wrote nothing to stdout"), "{error}");

    // 17 MiB in one write, from a memory of 300 pages.
    let flood = r#"(module
        (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
        (memory (export "memory") 300)
        (func (export "_start")
          (i32.store (i32.const 0) (i32.const 64))
          (i32.store (i32.const 4) (i32.const 17825792))
          (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#;
    let error = call(&tool, flood, json!({})).await.unwrap_err();
    assert_eq!(error.message, "the module wrote more than 16 MiB to stdout");

    // A WASI module must export its memory; the error names what is missing.
    let unexported = flood.replace(r#"(memory (export "memory") 300)"#, "(memory 1)");
    let error = call(&tool, &unexported, json!({})).await.unwrap_err();
    assert_eq!(
        error.message,
        "the module failed: missing required memory export"
    );
}

#[tokio::test]
async fn compiled_modules_are_cached() {
    let tool = WasmTool::new();
    let echo = echo_wat();
    assert_eq!(call(&tool, &echo, json!(1)).await.unwrap(), json!(1));
    assert_eq!((tool.compilations(), tool.cached_modules()), (1, 1));
    assert_eq!(call(&tool, &echo, json!(2)).await.unwrap(), json!(2));
    assert_eq!((tool.compilations(), tool.cached_modules()), (1, 1));
    // The cache is bounded: the least recently used module goes first.
    for n in 0..MODULE_CACHE_ENTRIES {
        let wat = format!(r#"(module (func (export "_start") (drop (i32.const {n}))))"#);
        tool.prepare(wat.as_bytes()).await.unwrap();
    }
    assert_eq!(tool.cached_modules(), MODULE_CACHE_ENTRIES);
    let compiled = tool.compilations();
    assert_eq!(call(&tool, &echo, json!(3)).await.unwrap(), json!(3));
    assert_eq!(tool.compilations(), compiled + 1, "echo was evicted");
}

#[tokio::test]
async fn bad_modules_are_refused_with_the_cause() {
    let harness = Harness::new().await;
    let tool = WasmTool::new();
    let missing = harness.dir.path().join("missing.wasm");
    let error = harness
        .run(&tool, json!({"module": missing}))
        .await
        .unwrap_err();
    assert!(!error.retryable);
    assert!(
        error
            .message
            .starts_with(&format!("cannot read module {}: ", missing.display())),
        "{error}"
    );

    let path = harness.file("text.wasm", "hello, I am not a module");
    let error = harness
        .run(&tool, json!({"module": path}))
        .await
        .unwrap_err();
    assert!(
        error.message.starts_with(&format!(
            "module {path} is neither a wasm binary nor valid WAT text: "
        )),
        "{error}"
    );

    let foreign = r#"(module (import "env" "f" (func)) (func (export "_start")))"#;
    let error = call(&tool, foreign, json!({})).await.unwrap_err();
    assert!(error.message.contains("cannot be linked"), "{error}");
    assert!(error.message.contains("env"), "{error}");

    let no_start = r#"(module (func (export "main")))"#;
    let error = call(&tool, no_start, json!({})).await.unwrap_err();
    assert_eq!(
        error.message,
        "module exports no `_start` function; it must be a WASI command"
    );
}

#[tokio::test]
async fn bad_inputs_are_refused() {
    let harness = Harness::new().await;
    let tool = WasmTool::new();
    let path = harness.file("echo.wat", &echo_wat());
    for (inputs, expected) in [
        (json!({}), "missing field `module`"),
        (json!({"module": path, "extra": 1}), "unknown field `extra`"),
        (
            json!({"module": path, "cpu_ms": 0}),
            "cpu_ms 0 must be between",
        ),
        (
            json!({"module": path, "memory_mb": 5000}),
            "memory_mb 5000 must be between",
        ),
        (json!({"module": path, "timeout": "soon"}), "timeout:"),
        (json!({"module": path, "timeout": 0}), "timeout"),
        (
            json!({"module": path, "allow": {"net": true}}),
            "unknown field `net`",
        ),
        (
            json!({"module": path, "allow": {"env": ["A=B"]}}),
            "not a valid variable name",
        ),
    ] {
        let error = harness.run(&tool, inputs.clone()).await.unwrap_err();
        assert!(error.message.contains(expected), "{inputs}: {error}");
        assert!(!error.retryable);
    }
    let schema = tool.input_schema();
    assert_eq!(schema["additionalProperties"], false);
    assert_eq!(schema["required"], json!(["module"]));
}

/// Not a timing assertion: prints what a warm call costs, for `--nocapture` runs.
#[tokio::test]
async fn warm_call_cost() {
    let tool = WasmTool::new();
    let echo = echo_wat();
    let logs = MemoryLogs::default();
    let (limits, grants) = (WasmLimits::default(), WasmGrants::default());
    let input = json!({"x": 1});
    tool.call(echo.as_bytes(), &input, &limits, &grants, &logs)
        .await
        .unwrap();
    let rounds = 200u32;
    let started = Instant::now();
    for _ in 0..rounds {
        tool.call(echo.as_bytes(), &input, &limits, &grants, &logs)
            .await
            .unwrap();
    }
    println!("warm echo call: {:?}", started.elapsed() / rounds);
    let prepared = tool.prepare(echo.as_bytes()).await.unwrap();
    let started = Instant::now();
    for _ in 0..rounds {
        tool.call_module(&prepared, &input, &limits, &grants, &logs)
            .await
            .unwrap();
    }
    println!(
        "warm echo call of a prepared module: {:?}",
        started.elapsed() / rounds
    );
    assert_eq!(tool.compilations(), 1);
    assert_eq!(prepared.sha256_hex().len(), 64);
}

#[tokio::test]
async fn stderr_past_its_cap_is_dropped_without_failing_the_module() {
    let tool = WasmTool::new();
    // 2 MiB to stderr in one write (the cap is 1 MiB); exit code 9 if the write fails; then
    // `{}` on stdout.
    let noisy = r#"(module
        (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
        (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
        (memory (export "memory") 40)
        (data (i32.const 16) "{}")
        (func (export "_start")
          (i32.store (i32.const 0) (i32.const 64))
          (i32.store (i32.const 4) (i32.const 2097152))
          (if (call $fd_write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8))
            (then (call $proc_exit (i32.const 9))))
          (i32.store (i32.const 0) (i32.const 16))
          (i32.store (i32.const 4) (i32.const 2))
          (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#;
    let logs = MemoryLogs::default();
    let output = tool
        .call(
            noisy.as_bytes(),
            &json!({}),
            &WasmLimits::default(),
            &WasmGrants::default(),
            &logs,
        )
        .await
        .expect("the module runs to the end");
    assert_eq!(output, json!({}));
    let system = logs.of(LogStream::System);
    assert!(
        system
            .iter()
            .any(|line| line.contains("stderr truncated: only the first 1 MiB")),
        "{system:?}"
    );
}

#[tokio::test]
async fn grants_outside_the_server_policy_are_refused_before_the_module_runs() {
    let harness = Harness::new().await;
    let allowed = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let path = harness.file("probe.wat", &probe_wat());
    let modules = std::path::Path::new(&path).parent().unwrap().to_path_buf();
    let tool = WasmTool::new().with_policy(WasmPolicy {
        read_dirs: vec![allowed.path().to_path_buf()],
        write_dirs: Vec::new(),
        env: vec!["*".to_owned()],
        module_dirs: vec![modules],
    });
    let escape = allowed.path().join("..").join(
        outside
            .path()
            .file_name()
            .expect("a temporary directory has a name"),
    );
    // A symbolic link inside the allowed directory that points out of it.
    std::os::unix::fs::symlink(outside.path(), allowed.path().join("link")).unwrap();
    for (allow, expected) in [
        (json!({"read_dirs": [outside.path()]}), "allow.read_dirs: "),
        (json!({"read_dirs": [escape]}), "must not contain `..`"),
        (
            json!({"read_dirs": [allowed.path().join("link")]}),
            "is outside the directories",
        ),
        (
            json!({"write_dirs": [allowed.path()]}),
            "allow.write_dirs: ",
        ),
        (
            json!({"env": ["ARCHES_SECRETS__KEYS"]}),
            "the server's own configuration",
        ),
    ] {
        let error = harness
            .run(
                &tool,
                json!({"module": path, "input": "x", "allow": allow.clone()}),
            )
            .await
            .unwrap_err();
        assert!(!error.retryable);
        assert!(error.message.contains(expected), "{allow}: {error}");
    }
    // Module files load only from the policy's module directories.
    std::fs::write(outside.path().join("m.wat"), probe_wat()).unwrap();
    let error = harness
        .run(
            &tool,
            json!({"module": outside.path().join("m.wat"), "input": "x"}),
        )
        .await
        .unwrap_err();
    assert!(error.message.starts_with("inputs.module_dirs: "), "{error}");
    // Inside the policy (a subdirectory of an allowed one counts), the module runs.
    let inner = allowed.path().join("inner");
    std::fs::create_dir(&inner).unwrap();
    std::fs::write(inner.join("hello.txt"), "hi").unwrap();
    let outputs = harness
        .run(
            &tool,
            json!({
                "module": path,
                "input": "hello.txt",
                "allow": {"read_dirs": [inner], "env": ["PATH"]}
            }),
        )
        .await
        .unwrap();
    assert_eq!(outputs["output"]["path_open"], 0, "{outputs}");
    // A policy of relative directories is reported.
    let problems = WasmPolicy {
        read_dirs: vec!["data".into()],
        ..WasmPolicy::deny_all()
    }
    .problems();
    assert_eq!(problems, ["read_dirs: data must be an absolute path"]);
}

#[tokio::test]
async fn a_file_that_is_not_a_module_is_refused_without_quoting_it() {
    let harness = Harness::new().await;
    let tool = WasmTool::new();
    let path = harness.file("secret.txt", "TOKEN=do-not-repeat-me\n");
    let error = harness
        .run(&tool, json!({"module": path, "input": "x"}))
        .await
        .unwrap_err();
    assert!(
        error
            .message
            .contains("is neither a wasm binary nor valid WAT text"),
        "{error}"
    );
    assert!(!error.message.contains("do-not-repeat-me"), "{error}");
}

#[tokio::test]
async fn set_variables_reach_the_module_without_the_worker_environment() {
    let tool = WasmTool::new();
    let grants = WasmGrants {
        vars: vec![("API_TOKEN".to_owned(), "tok-123456".to_owned())],
        ..WasmGrants::default()
    };
    let logs = MemoryLogs::default();
    let output = tool
        .call(
            probe_wat().as_bytes(),
            &json!("none"),
            &WasmLimits::default(),
            &grants,
            &logs,
        )
        .await
        .unwrap();
    assert_eq!(output["environ"], 1, "{output}");
    // The module sees the value; its stderr line reaches the log with the value masked.
    let stderr = logs.of(LogStream::Stderr);
    assert_eq!(stderr, ["API_TOKEN=***"], "{stderr:?}");
}
