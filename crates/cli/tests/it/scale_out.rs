//! Scale-out fault injection: a scheduler (`arches run --no-workers`) and standalone workers
//! (`arches worker`) as real processes on the PostgreSQL server that
//! `ARCHES_TEST_POSTGRES_URL` names (`.ci/run` and `scripts/test` set it), each test on a
//! database of its own. Workers are killed with SIGKILL, stopped with SIGSTOP, and the
//! scheduler is killed; every run must finish with each task run's result recorded once.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sqlx::postgres::PgConnectOptions;
use sqlx::ConnectOptions;

use crate::{arches, json_of, pipeline_file, signup};

const URL_VARIABLE: &str = "ARCHES_TEST_POSTGRES_URL";

/// A database of its own on the test server, dropped when the test ends.
struct Db {
    server: PgConnectOptions,
    name: String,
    url: String,
    runtime: tokio::runtime::Runtime,
}

impl Db {
    fn create() -> Db {
        let base = std::env::var(URL_VARIABLE).unwrap_or_else(|_| {
            panic!(
                "{URL_VARIABLE} is not set: these tests need a PostgreSQL server (.ci/run sets it)"
            )
        });
        let server = PgConnectOptions::from_str(&base).expect("a PostgreSQL URL");
        let name = format!("arches_test_{}", uuid::Uuid::now_v7().simple());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut admin = server.connect().await.expect("the test server answers");
            sqlx::query(&format!("CREATE DATABASE \"{name}\""))
                .execute(&mut admin)
                .await
                .expect("create the test database");
        });
        let (prefix, _) = base.rsplit_once('/').expect("a URL with a database");
        let url = format!("{prefix}/{name}");
        Db {
            server,
            name,
            url,
            runtime,
        }
    }

    async fn connect(&self) -> sqlx::PgConnection {
        self.server
            .clone()
            .database(&self.name)
            .connect()
            .await
            .expect("the test database answers")
    }

    fn scalar(&self, sql: &str) -> i64 {
        self.runtime.block_on(async {
            let mut connection = self.connect().await;
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&mut connection)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
        })
    }

    /// Listens on a notification channel of the store (before the action it waits for).
    fn listen(&self, channel: &str) -> sqlx::postgres::PgListener {
        self.runtime.block_on(async {
            let mut listener = sqlx::postgres::PgListener::connect(&self.url)
                .await
                .expect("the test database answers");
            listener.listen(channel).await.expect("LISTEN");
            listener
        })
    }

    /// Waits for the next notification on `listener`, bounded, and closes it (inside the
    /// runtime it needs).
    fn await_notification(&self, mut listener: sqlx::postgres::PgListener, bound: Duration) {
        self.runtime.block_on(async move {
            tokio::time::timeout(bound, listener.recv())
                .await
                .unwrap_or_else(|_| panic!("no notification within {bound:?}"))
                .expect("the listener reads");
        });
    }

    fn text(&self, sql: &str) -> Vec<String> {
        self.runtime.block_on(async {
            let mut connection = self.connect().await;
            sqlx::query_scalar::<_, String>(sql)
                .fetch_all(&mut connection)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
        })
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        let server = self.server.clone();
        let name = self.name.clone();
        self.runtime.block_on(async move {
            if let Ok(mut admin) = server.connect().await {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .execute(&mut admin)
                    .await;
            }
        });
    }
}

/// A standalone worker process, its stderr in a file of the test directory.
fn start_worker(home: &Path, url: &str, log: &Path, extra: &[&str]) -> Child {
    arches(home)
        .env("ARCHES_LOG", "arches_engine=info,warn")
        .args(["--database-url", url, "worker", "--slots", "8"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("a worker log file"))
        .spawn()
        .expect("the worker starts")
}

/// Starts `arches run --no-workers --quiet FILE` (or the command in `args`) and returns the
/// process and the run id from its first line of stderr.
fn start_scheduler(home: &Path, db: &Db, args: &[&str]) -> (Child, String) {
    let mut child = arches(home)
        .args(["--database-url", &db.url])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the scheduler starts");
    let mut line = String::new();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    stderr.read_line(&mut line).unwrap();
    let run_id = line
        .strip_prefix("run ")
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    // Keep reading stderr so the process never blocks on a full pipe.
    std::thread::spawn(move || for _ in stderr.lines() {});
    (child, run_id)
}

/// Waits for a process to exit within `bound`, killing it (and failing) past it.
fn wait_bounded(child: &mut Child, bound: Duration, what: &str) -> std::process::ExitStatus {
    let pid = Pid::from_raw(child.id() as i32);
    let (done, exited) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let _ = done.send(child.wait());
        });
        match exited.recv_timeout(bound) {
            Ok(status) => status.expect("the process is waited for"),
            Err(_) => {
                let _ = kill(pid, Signal::SIGKILL);
                panic!("{what} did not exit within {bound:?}");
            }
        }
    })
}

/// Waits for `child` on a thread of its own: its exit status arrives on the receiver.
fn exit_of(mut child: Child) -> std::sync::mpsc::Receiver<std::process::ExitStatus> {
    let (done, exited) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        if let Ok(status) = child.wait() {
            let _ = done.send(status);
        }
    });
    exited
}

/// Stops a process with SIGTERM and checks that it exits cleanly, bounded.
fn stop_cleanly(mut child: Child, what: &str) -> std::process::ExitStatus {
    signal(&child, Signal::SIGTERM);
    let status = wait_bounded(&mut child, Duration::from_secs(30), what);
    assert!(status.success(), "{what}: {status:?}");
    status
}

fn signal(child: &Child, signal: Signal) {
    kill(Pid::from_raw(child.id() as i32), signal).expect("the process takes the signal");
}

/// Stops a worker with SIGTERM (it drains and hands back) and checks it exits cleanly.
fn stop_worker(child: Child, log: &Path) {
    stop_cleanly(child, "a worker after SIGTERM");
    let text = std::fs::read_to_string(log).unwrap_or_default();
    assert!(text.contains("arches worker stopped"), "{text}");
}

/// A tiny deterministic generator (xorshift64*), so a failing schedule can be replayed from
/// the seed the test prints.
struct Shuffle(u64);

impl Shuffle {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// `count` distinct indices below `n`.
    fn pick(&mut self, n: usize, count: usize) -> Vec<usize> {
        let mut all: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            all.swap(i, j);
        }
        all.truncate(count);
        all
    }
}

#[test]
fn ten_thousand_task_runs_finish_once_each_while_workers_are_killed_every_two_seconds() {
    const TASKS: usize = 10_000;
    const WORKERS: usize = 4;
    let db = Db::create();
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let items: Vec<String> = (0..TASKS).map(|i| i.to_string()).collect();
    let file = pipeline_file(
        dir.path(),
        "fan.yaml",
        &format!(
            "name: chaos\ntasks:\n  - id: each\n    tool: echo\n    for_each: [{}]\n    \
             with: {{item: \"{{{{ item }}}}\"}}\n  \
             - id: total\n    tool: echo\n    depends_on: [each]\n    \
             with: {{count: \"{{{{ tasks.each.outputs | length }}}}\"}}\n",
            items.join(", ")
        ),
    );
    let worker_args = [
        "--claim-ttl",
        "2s",
        "--renew-interval",
        "500ms",
        "--sweep-interval",
        "5s",
        "--drain-grace",
        "5s",
    ];
    let log = |i: usize, generation: usize| dir.path().join(format!("worker-{i}-{generation}.log"));
    let mut generations = [0usize; WORKERS];
    let mut workers: Vec<Child> = (0..WORKERS)
        .map(|i| start_worker(home.path(), &db.url, &log(i, 0), &worker_args))
        .collect();
    let completions = db.listen(arches_store::postgres::COMPLETIONS_CHANNEL);
    let (mut run, run_id) = start_scheduler(
        home.path(),
        &db,
        &["run", "--no-workers", "--quiet", file.to_str().unwrap()],
    );
    let mut run_stdout = run.stdout.take().expect("stdout is piped");
    let run_exit = exit_of(run);

    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("kill schedule seed {seed}");
    let mut shuffle = Shuffle(seed);
    let started = Instant::now();
    // The kills begin once the workers are at work (their first report is stored).
    db.await_notification(completions, Duration::from_secs(60));
    let mut rounds_mid_run = 0;
    let status = loop {
        // The chaos schedule: every two seconds, unless the run ends first, three random
        // workers are killed and restarted (under new names; their claims expire and are
        // taken over).
        match run_exit.recv_timeout(Duration::from_secs(2)) {
            Ok(status) => break status,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(error) => panic!("the run's waiter is gone: {error}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the run did not finish within 10 minutes"
        );
        rounds_mid_run += 1;
        for i in shuffle.pick(WORKERS, 3) {
            signal(&workers[i], Signal::SIGKILL);
            let _ = workers[i].wait();
            generations[i] += 1;
            workers[i] = start_worker(home.path(), &db.url, &log(i, generations[i]), &worker_args);
        }
    };
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut run_stdout, &mut stdout).unwrap();
    assert!(status.success(), "run {run_id} ended {status:?}: {stdout}");
    assert!(
        rounds_mid_run >= 1,
        "no kill happened while the run was going"
    );
    eprintln!(
        "{TASKS} task runs in {:?} with {rounds_mid_run} kill rounds",
        started.elapsed()
    );

    let run_filter = format!("run_id = '{run_id}'");
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM task_runs WHERE {run_filter} AND task_id = 'each' \
             AND item_index IS NOT NULL AND state = 'succeeded'"
        )),
        TASKS as i64,
        "every task run succeeded"
    );
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM (SELECT task_run_id FROM attempts WHERE {run_filter} \
             AND state = 'succeeded' GROUP BY task_run_id HAVING count(*) > 1) AS d"
        )),
        0,
        "no task run has two recorded successes"
    );
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM attempts WHERE {run_filter} AND state = 'succeeded'"
        )),
        TASKS as i64 + 1,
        "one recorded success per task run"
    );
    assert_eq!(
        db.text(&format!(
            "SELECT outputs->>'count' FROM task_runs WHERE {run_filter} AND task_id = 'total'"
        )),
        vec![TASKS.to_string()]
    );
    assert_eq!(db.scalar("SELECT count(*) FROM task_queue"), 0);
    assert_eq!(db.scalar("SELECT count(*) FROM task_completions"), 0);

    for (i, worker) in workers.into_iter().enumerate() {
        stop_worker(worker, &log(i, generations[i]));
    }
}

/// A named pipe the test reads: each line a task writes into it arrives on `lines`.
struct Fifo {
    path: std::path::PathBuf,
    lines: std::sync::mpsc::Receiver<String>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Fifo {
    fn create(path: std::path::PathBuf) -> Fifo {
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        let (send, lines) = std::sync::mpsc::channel();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (reader_path, reader_stop) = (path.clone(), stop.clone());
        std::thread::spawn(move || {
            // Each writer opens, writes its line and closes: open again for the next one.
            while !reader_stop.load(std::sync::atomic::Ordering::SeqCst) {
                let Ok(file) = std::fs::File::open(&reader_path) else {
                    return;
                };
                for line in BufReader::new(file).lines().map_while(Result::ok) {
                    if send.send(line).is_err() {
                        return;
                    }
                }
            }
        });
        Fifo { path, lines, stop }
    }

    /// The next line written, bounded.
    fn await_line(&self, bound: Duration) -> String {
        self.lines
            .recv_timeout(bound)
            .unwrap_or_else(|_| panic!("{} got no line within {bound:?}", self.path.display()))
    }
}

impl Drop for Fifo {
    fn drop(&mut self) {
        use std::os::unix::fs::OpenOptionsExt;
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wakes the reader waiting in `open` (a non-blocking open fails when none waits).
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
            .open(&self.path);
    }
}

#[test]
fn a_worker_stopped_past_its_claim_loses_the_task_to_another_and_its_late_result_is_refused() {
    let db = Db::create();
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let starts = Fifo::create(dir.path().join("starts"));
    let file = pipeline_file(
        dir.path(),
        "slow.yaml",
        &format!(
            "name: slow\ntasks:\n  - id: slow\n    tool: shell\n    with:\n      \
             command: \"echo started > {}; sleep 2; echo done\"\n",
            starts.path.display()
        ),
    );
    let claim = ["--claim-ttl", "1s", "--renew-interval", "250ms"];
    let log_a = dir.path().join("a.log");
    let log_b = dir.path().join("b.log");
    let a = start_worker(
        home.path(),
        &db.url,
        &log_a,
        &[&["--id", "worker-a"][..], &claim[..]].concat(),
    );
    let (mut run, run_id) = start_scheduler(
        home.path(),
        &db,
        &["run", "--no-workers", "--quiet", file.to_str().unwrap()],
    );
    // A runs the task; then A is frozen (SIGSTOP) and its claim runs out.
    starts.await_line(Duration::from_secs(30));
    signal(&a, Signal::SIGSTOP);
    let b = start_worker(
        home.path(),
        &db.url,
        &log_b,
        &[&["--id", "worker-b"][..], &claim[..]].concat(),
    );
    // B takes the task over once A's claim has expired, and runs it again.
    starts.await_line(Duration::from_secs(30));
    let status = wait_bounded(&mut run, Duration::from_secs(60), "the run");
    assert!(status.success(), "run {run_id} ended {status:?}");
    // A wakes up with a finished command and a claim that is no longer its own.
    signal(&a, Signal::SIGCONT);
    stop_worker(a, &log_a);
    let text_a = std::fs::read_to_string(&log_a).unwrap();
    assert!(
        text_a.contains("completion refused") || text_a.contains("claim lost"),
        "A's late report must be refused: {text_a}"
    );

    let run_filter = format!("run_id = '{run_id}'");
    assert_eq!(
        db.text(&format!(
            "SELECT worker FROM attempts WHERE {run_filter} AND state = 'succeeded'"
        )),
        vec!["worker-b".to_owned()],
        "the task's result is B's"
    );
    assert_eq!(
        db.scalar(&format!("SELECT count(*) FROM attempts WHERE {run_filter}")),
        1,
        "the take-over is not a second recorded attempt"
    );
    assert_eq!(db.scalar("SELECT count(*) FROM task_completions"), 0);
    stop_worker(b, &log_b);
}

#[test]
fn a_scheduler_killed_mid_run_is_resumed_and_the_workers_results_reach_the_new_one() {
    let db = Db::create();
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let items: Vec<String> = (0..300).map(|i| i.to_string()).collect();
    let file = pipeline_file(
        dir.path(),
        "fan.yaml",
        &format!(
            "name: resumed\ntasks:\n  - id: each\n    tool: echo\n    for_each: [{}]\n    \
             retry: {{max_attempts: 2, initial_delay: 2s, jitter: 0}}\n    \
             with: {{item: \"{{{{ item }}}}\", fail: first try, fail_times: 1}}\n",
            items.join(", ")
        ),
    );
    let logs: Vec<_> = (0..2)
        .map(|i| dir.path().join(format!("w{i}.log")))
        .collect();
    let workers: Vec<Child> = logs
        .iter()
        .map(|log| start_worker(home.path(), &db.url, log, &[]))
        .collect();
    let completions = db.listen(arches_store::postgres::COMPLETIONS_CHANNEL);
    let (mut run, run_id) = start_scheduler(
        home.path(),
        &db,
        &["run", "--no-workers", "--quiet", file.to_str().unwrap()],
    );
    // Once the workers have begun to report the first (failing) attempts, the scheduler
    // dies: offers are claimed, completions are stored for it, retries wait.
    db.await_notification(completions, Duration::from_secs(60));
    signal(&run, Signal::SIGKILL);
    let _ = run.wait();
    let mut resumed = arches(home.path())
        .args([
            "--database-url",
            &db.url,
            "resume",
            "--no-workers",
            "--quiet",
            &run_id,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_bounded(&mut resumed, Duration::from_secs(120), "the resumed run");
    let mut err = String::new();
    std::io::Read::read_to_string(resumed.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(status.success(), "resume ended {status:?}: {err}");

    let run_filter = format!("run_id = '{run_id}'");
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM task_runs WHERE {run_filter} AND item_index IS NOT NULL \
             AND state = 'succeeded'"
        )),
        300
    );
    assert_eq!(
        db.scalar(&format!(
            "SELECT count(*) FROM attempts WHERE {run_filter} AND state = 'succeeded'"
        )),
        300,
        "one recorded success per task run"
    );
    assert_eq!(db.scalar("SELECT count(*) FROM task_queue"), 0);
    assert_eq!(db.scalar("SELECT count(*) FROM task_completions"), 0);
    for (worker, log) in workers.into_iter().zip(&logs) {
        stop_worker(worker, log);
    }
}

// ---------------------------------------------------------------------------------------
// API replicas on the shared store, with NATS JetStream between them
// ---------------------------------------------------------------------------------------

const NATS_VARIABLE: &str = "ARCHES_TEST_NATS_URL";
const JWT_SECRET: &str = "replicas-share-this-signing-key-of-32-bytes-or-more";
const SLOW: &str = "name: slow\ntasks:\n  - id: wait\n    tool: shell\n    with:\n      command: \"echo started; sleep 2; echo done\"\n  - id: after\n    tool: echo\n    depends_on: [wait]\n    with:\n      waited: \"{{ tasks.wait.outputs.exit_code }}\"\n";

/// The events a test publishes: a stream and subjects of its own, deleted at its end.
struct NatsStream {
    url: String,
    name: String,
    prefix: String,
}

impl NatsStream {
    fn new() -> NatsStream {
        let url = std::env::var(NATS_VARIABLE).unwrap_or_else(|_| {
            panic!("{NATS_VARIABLE} is not set: these tests need NATS with JetStream (.ci/run sets it)")
        });
        let id = uuid::Uuid::now_v7().simple().to_string();
        NatsStream {
            url,
            name: format!("ARCHES_TEST_{id}"),
            prefix: format!("arches_test.{id}"),
        }
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("ARCHES_EVENTS__NATS_URL", self.url.clone()),
            ("ARCHES_EVENTS__STREAM", self.name.clone()),
            ("ARCHES_EVENTS__SUBJECT_PREFIX", self.prefix.clone()),
        ]
    }

    async fn delete(&self) {
        if let Ok(client) = async_nats::connect(&self.url).await {
            let _ = async_nats::jetstream::new(client)
                .delete_stream(&self.name)
                .await;
        }
    }
}

/// Starts `arches serve` with `env` (shared store, events, scheduler name) on a free port.
fn start_replica(home: &Path, env: &[(&str, String)]) -> (Child, String) {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    crate::start_server_with(home, &env)
}

async fn create_pipeline(client: &reqwest::Client, base: &str, token: &str, yaml: &str) {
    let (status, body) = json_of(
        client
            .post(format!("{base}/api/v1/pipelines"))
            .bearer_auth(token)
            .header("content-type", "application/yaml")
            .body(yaml.to_owned())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 201, "{body}");
}

async fn trigger(client: &reqwest::Client, base: &str, token: &str, pipeline: &str) -> String {
    let (status, run) = json_of(
        client
            .post(format!("{base}/api/v1/runs"))
            .bearer_auth(token)
            .json(&serde_json::json!({ "pipeline": pipeline }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 201, "{run}");
    run["id"].as_str().unwrap().to_owned()
}

/// Reads a server-sent event stream until `text` appears in it, bounded.
async fn await_in_stream(response: reqwest::Response, needles: &[&str], bound: Duration) -> String {
    use futures::StreamExt;
    let mut stream = response.bytes_stream();
    let mut text = String::new();
    tokio::time::timeout(bound, async {
        while !needles.iter().all(|needle| text.contains(needle)) {
            let chunk = stream.next().await.expect("open").expect("readable");
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{needles:?} did not arrive within {bound:?}: {text}"));
    text
}

async fn open_events(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    query: &str,
) -> reqwest::Response {
    let response = client
        .get(format!("{base}/api/v1/events?{query}"))
        .bearer_auth(token)
        .send()
        .await
        .expect("the event stream opens");
    assert_eq!(response.status(), 200);
    response
}

#[test]
fn replicas_share_runs_and_live_events_and_a_killed_replica_finishes_its_runs_on_restart() {
    let db = Db::create();
    let nats = NatsStream::new();
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut common = nats.env();
    common.push(("ARCHES_STORE__DATABASE_URL", db.url.clone()));
    common.push(("ARCHES_WORKERS__ENABLED", "false".into()));
    common.push(("ARCHES_AUTH__JWT_SECRET", JWT_SECRET.into()));
    let replica = |name: &str| {
        let mut env = common.clone();
        env.push(("ARCHES_WORKERS__SCHEDULER_ID", name.to_owned()));
        start_replica(home.path(), &env)
    };
    let (a, base_a) = replica("replica-a");
    let (mut b, base_b) = replica("replica-b");
    let worker_log = dir.path().join("worker.log");
    let worker = {
        let mut command = arches(home.path());
        for (key, value) in nats.env() {
            command.env(key, value);
        }
        command
            .args(["--database-url", &db.url, "worker", "--id", "the-worker"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&worker_log).unwrap())
            .spawn()
            .unwrap()
    };

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = reqwest::Client::new();
    let (run_id, slow_id) = runtime.block_on(async {
        // An account made on A works on B (one identity store, one signing key).
        let token = signup(&client, &base_a).await;
        create_pipeline(&client, &base_b, &token, SLOW).await;

        // A client of A sees the run B started finish on the standalone worker.
        let events = open_events(&client, &base_a, &token, "kinds=run,log").await;
        let run_id = trigger(&client, &base_b, &token, "slow").await;
        await_in_stream(
            events,
            &[&run_id, "\"state\":\"succeeded\"", "started"],
            Duration::from_secs(60),
        )
        .await;

        // B is killed while its next run's task runs on the worker; restarted under its
        // name, it finishes the run from the worker's report, without running it again.
        let logs = open_events(&client, &base_a, &token, "kinds=log").await;
        let slow_id = trigger(&client, &base_b, &token, "slow").await;
        await_in_stream(logs, &[&slow_id, "started"], Duration::from_secs(60)).await;
        b.kill().unwrap();
        b.wait().unwrap();
        let (restarted, base_b) = replica("replica-b");
        b = restarted;
        let events = open_events(
            &client,
            &base_b,
            &token,
            &format!("run_id={slow_id}&kinds=run"),
        )
        .await;
        let (status, run) = json_of(
            client
                .get(format!("{base_b}/api/v1/runs/{slow_id}"))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 200, "{run}");
        if run["state"] != "succeeded" {
            await_in_stream(
                events,
                &["\"state\":\"succeeded\""],
                Duration::from_secs(60),
            )
            .await;
        }
        (run_id, slow_id)
    });

    for id in [&run_id, &slow_id] {
        assert_eq!(
            db.text(&format!("SELECT state FROM runs WHERE id = '{id}'")),
            vec!["succeeded".to_owned()]
        );
        assert_eq!(
            db.text(&format!(
                "SELECT worker FROM attempts WHERE run_id = '{id}' ORDER BY started_at"
            )),
            vec!["the-worker".to_owned(), "the-worker".to_owned()],
            "each task ran once, on the standalone worker"
        );
    }
    assert_eq!(
        db.text(&format!("SELECT owner FROM runs WHERE id = '{slow_id}'")),
        vec!["replica-b".to_owned()]
    );
    stop_worker(worker, &worker_log);
    for replica in [a, b] {
        stop_cleanly(replica, "a replica after SIGTERM");
    }
    runtime.block_on(nats.delete());
}

// ---------------------------------------------------------------------------------------
// A database outage
// ---------------------------------------------------------------------------------------

/// A TCP proxy in front of the PostgreSQL server: `cut` closes every connection through it
/// and refuses new ones until `restore`, as a restarting database does to its clients.
struct Proxy {
    port: u16,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Proxy {
    fn start(target: std::net::SocketAddr) -> Proxy {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let open: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>> = Default::default();
        let (accept_down, accept_open) = (down.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if accept_down.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = std::net::TcpStream::connect(target) else {
                    continue;
                };
                {
                    let mut open = accept_open.lock().unwrap();
                    open.push(client.try_clone().unwrap());
                    open.push(server.try_clone().unwrap());
                }
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Proxy { port, down, open }
    }

    fn cut(&self) {
        self.down.store(true, std::sync::atomic::Ordering::SeqCst);
        for stream in self.open.lock().unwrap().drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.down.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Sends a request again while it gets 503, after the `Retry-After` it names (bounded: 60
/// tries); any other answer is returned, and a 500 fails the test.
async fn retry_after<F, R>(send: F) -> reqwest::Response
where
    F: Fn() -> R,
    R: std::future::Future<Output = reqwest::Result<reqwest::Response>>,
{
    for _ in 0..60 {
        let response = send().await.expect("the server answers");
        assert_ne!(response.status().as_u16(), 500, "never a 500");
        if response.status().as_u16() != 503 {
            return response;
        }
        let wait: u64 = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .expect("a 503 says when to retry");
        tokio::time::sleep(Duration::from_secs(wait)).await;
    }
    panic!("still 503 after 60 tries");
}

#[test]
fn while_the_database_is_down_requests_get_503_and_the_run_finishes_once_it_is_back() {
    let db = Db::create();
    let proxy = Proxy::start("127.0.0.1:5432".parse().unwrap());
    // The same database, through the proxy.
    let (prefix, name) = db.url.rsplit_once('/').unwrap();
    let host_start = prefix.rfind('@').map_or(prefix.len(), |i| i + 1);
    let through = format!("{}127.0.0.1:{}/{name}", &prefix[..host_start], proxy.port);
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Live events through NATS, so the worker's log lines reach the server's streams.
    let nats = NatsStream::new();
    let mut env = nats.env();
    env.extend([
        ("ARCHES_STORE__DATABASE_URL", through.clone()),
        ("ARCHES_STORE__ACQUIRE_TIMEOUT_SECS", "2".to_owned()),
        ("ARCHES_WORKERS__ENABLED", "false".to_owned()),
        ("ARCHES_WORKERS__SCHEDULER_ID", "outage".to_owned()),
    ]);
    let (server, base) = start_replica(home.path(), &env);
    let worker_log = dir.path().join("worker.log");
    let worker = {
        let mut command = arches(home.path());
        for (key, value) in nats.env() {
            command.env(key, value);
        }
        command
            .env("ARCHES_LOG", "arches_engine=info,warn")
            .args(["--database-url", &through, "worker", "--claim-ttl", "30s"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&worker_log).unwrap())
            .spawn()
            .unwrap()
    };

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = reqwest::Client::new();
    let run_id = runtime.block_on(async {
        let token = signup(&client, &base).await;
        create_pipeline(&client, &base, &token, SLOW).await;
        let logs = open_events(&client, &base, &token, "kinds=log").await;
        let run_id = trigger(&client, &base, &token, "slow").await;
        await_in_stream(logs, &[&run_id, "started"], Duration::from_secs(60)).await;

        // The database goes away while the task runs.
        proxy.cut();
        let response = client
            .get(format!("{base}/api/v1/runs/{run_id}"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 503, "a request during the outage");
        assert!(response.headers().contains_key("retry-after"));
        let (_, body) = json_of(response).await;
        assert_eq!(body["code"], "unavailable", "{body}");
        // The task ends meanwhile; its report waits for the database.
        std::thread::sleep(Duration::from_secs(3));
        proxy.restore();

        // Back: a client that honours Retry-After gets through, and the run finishes.
        let events = retry_after(|| {
            client
                .get(format!("{base}/api/v1/events?run_id={run_id}&kinds=run"))
                .bearer_auth(&token)
                .send()
        })
        .await;
        let run = retry_after(|| {
            client
                .get(format!("{base}/api/v1/runs/{run_id}"))
                .bearer_auth(&token)
                .send()
        })
        .await;
        let (_, run) = json_of(run).await;
        if run["state"] != "succeeded" {
            await_in_stream(
                events,
                &["\"state\":\"succeeded\""],
                Duration::from_secs(90),
            )
            .await;
        }
        run_id
    });
    assert_eq!(
        db.text(&format!(
            "SELECT outputs->>'waited' FROM task_runs WHERE run_id = '{run_id}' AND task_id = 'after'"
        )),
        vec!["0".to_owned()]
    );
    stop_worker(worker, &worker_log);
    stop_cleanly(server, "the server after SIGTERM");
    runtime.block_on(nats.delete());
}

// ---------------------------------------------------------------------------------------
// The same on SQLite with in-process workers
// ---------------------------------------------------------------------------------------

/// Counts rows of the home's SQLite store (read-only, beside the running process).
fn sqlite_count(home: &Path, sql: &str) -> i64 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(home.join("arches.db"))
            .read_only(true);
        let mut connection = options.connect().await.expect("the store opens");
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(&mut connection)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    })
}

/// Reads the first line a process writes to its (piped) stderr: `run <id> started …` once
/// its run is committed and under way.
fn first_stderr_line(child: &mut Child) -> String {
    let mut line = String::new();
    BufReader::new(child.stderr.take().expect("stderr is piped"))
        .read_line(&mut line)
        .expect("stderr is readable");
    line
}

#[test]
fn on_sqlite_a_fan_out_killed_again_and_again_is_resumed_with_each_result_recorded_once() {
    const TASKS: usize = 10_000;
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let items: Vec<String> = (0..TASKS).map(|i| i.to_string()).collect();
    let file = pipeline_file(
        dir.path(),
        "fan.yaml",
        &format!(
            "name: chaos\ntasks:\n  - id: each\n    tool: echo\n    for_each: [{}]\n    \
             with: {{item: \"{{{{ item }}}}\"}}\n",
            items.join(", ")
        ),
    );
    let mut child = arches(home.path())
        .args(["run", "--quiet", "--workers", "16"])
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let line = first_stderr_line(&mut child);
    let run_id = line
        .strip_prefix("run ")
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    let succeeded =
        format!("SELECT count(*) FROM attempts WHERE run_id = '{run_id}' AND state = 'succeeded'");
    // Killed with SIGKILL as soon as the run (or its resume) is under way, three times; each
    // resume goes on from the store.
    let mut kills = 0;
    for _ in 0..3 {
        kills += 1;
        signal(&child, Signal::SIGKILL);
        let _ = child.wait();
        child = arches(home.path())
            .args(["resume", "--quiet", &run_id])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        first_stderr_line(&mut child);
    }
    let status = wait_bounded(&mut child, Duration::from_secs(300), "the last resume");
    assert!(status.success(), "{status:?}");
    eprintln!("{TASKS} task runs on SQLite, {kills} SIGKILLs mid-run");
    assert!(
        kills >= 2,
        "the run was killed only {kills} times before it finished"
    );
    let count = |sql: &str| sqlite_count(home.path(), sql);
    assert_eq!(
        count(&format!(
            "SELECT count(*) FROM task_runs WHERE run_id = '{run_id}' AND item_index IS NOT NULL \
             AND state = 'succeeded'"
        )),
        TASKS as i64
    );
    assert_eq!(
        count(&format!(
            "SELECT count(*) FROM (SELECT task_run_id FROM attempts WHERE run_id = '{run_id}' \
             AND state = 'succeeded' GROUP BY task_run_id HAVING count(*) > 1)"
        )),
        0,
        "no task run has two recorded successes"
    );
    assert_eq!(
        count(&succeeded),
        TASKS as i64,
        "one recorded success per task run"
    );
}
