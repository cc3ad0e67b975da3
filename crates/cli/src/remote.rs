//! The commands against a server: `login` and `logout`, `pipelines …`, and the `runs …`,
//! `artifacts …` and `cancel` commands when a server is given (`--server`, `ARCHES_SERVER`,
//! or the default that `arches login` saved).
//!
//! Everything goes through the typed client (`arches-client`); this module adds the prompts,
//! the saved credentials (see `credentials`), the display (the same tables and progress as
//! local mode) and the hints of errors. It never prints a token.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use arches_client::{
    base_url_text, parse_base_url, ApplyChange, Artifact, ArtifactsQuery, Client, ClientError,
    Credentials, Event, EventKind, EventsQuery, FollowedLog, LoginOutcome, LogsQuery, MfaCode, Run,
    RunsQuery, TaskRun, TokenResponse, TransportKind,
};
use arches_core::events::DomainEvent;
use arches_core::pipeline::PipelineDef;
use arches_core::{ArtifactId, OrgId, RunId, RunState, TaskRunId, TaskRunState, Timestamp};
use clap::{Args, Subcommand};
use futures::StreamExt;
use serde_json::{Map, Value};
use tokio::sync::broadcast;

use crate::credentials::{self, SavedSession, Store};
use crate::inspect::{self, ArtifactRow, ArtifactsCommand, RunsCommand, TaskRow};
use crate::{app, progress, run};

/// A saved access token this close to expiring (seconds) is refreshed before the command
/// starts, under the credentials lock, so that parallel `arches` processes refresh once.
const REFRESH_AHEAD_SECS: u64 = 60;
/// Reconnections of a watch whose event stream broke, before giving up.
const WATCH_RECONNECTS_MAX: u32 = 5;
/// Log lines asked for per page.
const LOGS_PAGE: u32 = 5000;
/// Largest page of runs the server gives.
const RUNS_PAGE_MAX: u32 = 500;
/// Tries of a TOTP code at a terminal.
const MFA_TRIES_MAX: u32 = 3;

/// Where commands go, from the global flags.
#[derive(Debug)]
pub struct Connection {
    /// `--server` / `ARCHES_SERVER`.
    pub server: Option<String>,
    /// `--token` / `ARCHES_TOKEN`.
    pub token: Option<String>,
    /// Whether the default server saved by `arches login` applies when no server is given
    /// (not with `--local`, nor when `--home` / `ARCHES_HOME` chose a local home).
    pub use_saved_default: bool,
}

/// A connected client and the server's normalized URL.
pub struct Remote {
    pub(crate) client: Client,
    pub(crate) server: String,
}

/// `arches login`.
#[derive(Args, Debug)]
pub struct LoginArgs {
    /// The account's email address (asked for when not given).
    #[arg(long)]
    email: Option<String>,
    /// Read the password from the first line of standard input (and, when the account has
    /// two-factor authentication, the code from the second) instead of the terminal.
    #[arg(long)]
    password_stdin: bool,
    /// The org to act in (its id); the user's first org by default.
    #[arg(long)]
    org: Option<OrgId>,
}

/// `arches pipelines …` (server only).
#[derive(Subcommand, Debug)]
pub enum PipelinesCommand {
    /// Save a pipeline file on the server: version 1 of a new name, or a new version when it
    /// changed. The server validates it; problems are printed with line and column.
    Apply {
        /// The pipeline file (YAML or JSON).
        file: PathBuf,
    },
    /// List the pipelines (latest version of each).
    List {
        /// Also list archived pipelines.
        #[arg(long)]
        archived: bool,
    },
    /// Show a pipeline's latest (or given) version and its definition.
    Show {
        /// The pipeline's name.
        name: String,
        /// The version; the latest by default.
        #[arg(long)]
        version: Option<u32>,
    },
}

// ---------------------------------------------------------------------------------------
// Connecting.

/// The remote target of a command, or `None` for local mode.
///
/// # Errors
/// A server is given (or saved as default) but its URL is invalid, or there are no
/// credentials for it, or refreshing the saved session failed.
pub async fn connect(connection: &Connection) -> anyhow::Result<Option<Remote>> {
    let server = match &connection.server {
        Some(server) => server.clone(),
        None if connection.use_saved_default => {
            let store = Store::locate()?;
            match store.load()?.default_server {
                Some(server) => server,
                None => return Ok(None),
            }
        }
        None => return Ok(None),
    };
    let key = server_key(&server)?;
    if let Some(token) = &connection.token {
        let client = Client::new(&key, Credentials::Token(token.clone()))?;
        return Ok(Some(Remote {
            client,
            server: key,
        }));
    }
    let store = Store::locate()?;
    let saved = store.load()?;
    if credentials::too_open(&store.path()) {
        status!(
            "warning: {} can be read by other users; run `chmod 600` on it",
            store.path().display()
        );
    }
    let session = saved.servers.get(&key).cloned().with_context(|| {
        format!(
            "not logged in to {key}: run `arches login --server {key}`, or pass an API key with --token (or ARCHES_TOKEN)"
        )
    })?;
    let session = refresh_ahead(&store, &key, session).await?;
    let client = Client::new(&key, Credentials::Session(session.tokens()))?;
    // A refresh during the command (a long watch) saves the new pair at once: the old
    // refresh token no longer works. The write is small and happens about once per access
    // token lifetime, so it is done in place.
    let listener_store = store.clone();
    let listener_key = key.clone();
    client.on_session_rotated(move |tokens: &TokenResponse| {
        let saved = listener_store.update(|saved| {
            saved.servers.insert(
                listener_key.clone(),
                SavedSession::from_answer(tokens, credentials::now_secs()),
            );
        });
        if let Err(error) = saved {
            status!("warning: cannot save the refreshed session: {error:#}");
        }
    });
    Ok(Some(Remote {
        client,
        server: key,
    }))
}

/// The remote target of a server-only command.
///
/// # Errors
/// As [`connect`], and when no server is given.
pub async fn connect_required(connection: &Connection, what: &str) -> anyhow::Result<Remote> {
    connect(connection)
        .await?
        .ok_or_else(|| inspect::needs_server(what))
}

fn server_key(server: &str) -> anyhow::Result<String> {
    Ok(base_url_text(&parse_base_url(server)?))
}

/// Refreshes a saved session that is about to expire, holding the credentials lock: if
/// another process refreshed it meanwhile, its tokens are used instead of spending the same
/// refresh token twice (which the server answers by revoking the session).
async fn refresh_ahead(
    store: &Store,
    key: &str,
    session: SavedSession,
) -> anyhow::Result<SavedSession> {
    if session.access_expires_at > credentials::now_secs() + REFRESH_AHEAD_SECS {
        return Ok(session);
    }
    let locked = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.lock())
            .await
            .context("the credentials lock task failed")??
    };
    let mut saved = locked.load()?;
    let current = saved
        .servers
        .get(key)
        .cloned()
        .with_context(|| format!("not logged in to {key} any more"))?;
    if current.access_expires_at > credentials::now_secs() + REFRESH_AHEAD_SECS {
        return Ok(current);
    }
    let client = Client::new(key, Credentials::Session(current.tokens()))?;
    match client.refresh().await {
        Ok(tokens) => {
            let fresh = SavedSession::from_answer(&tokens, credentials::now_secs());
            saved.servers.insert(key.to_owned(), fresh.clone());
            locked.save(&saved)?;
            Ok(fresh)
        }
        Err(error) if error.is_unauthenticated() => Err(anyhow::anyhow!(
            "the saved session for {key} has ended; log in again with `arches login --server {key}`"
        )),
        Err(error) => Err(explain(error, key)),
    }
}

/// A client error with a hint of what to do, for the user.
fn explain(error: ClientError, server: &str) -> anyhow::Error {
    let hint = match &error {
        ClientError::Api(api) if api.status == 401 => Some(format!(
            "log in again with `arches login --server {server}`, or check --token / ARCHES_TOKEN"
        )),
        ClientError::Transport {
            kind: TransportKind::Connect,
            ..
        } => Some(format!(
            "is an Arches server (`arches serve`) running at {server}?"
        )),
        _ => None,
    };
    // The error's text already holds its causes; the chain would repeat them.
    match hint {
        Some(hint) => anyhow::anyhow!("{error}\n  hint: {hint}"),
        None => anyhow::anyhow!("{error}"),
    }
}

impl Remote {
    pub(crate) fn fail(&self, error: ClientError) -> anyhow::Error {
        explain(error, &self.server)
    }
}

// ---------------------------------------------------------------------------------------
// Login and logout.

/// `arches login`: asks for the password (and a TOTP code when the account has one), logs
/// in, and saves the session as the default server's.
pub async fn login(connection: &Connection, args: LoginArgs) -> anyhow::Result<ExitCode> {
    let store = Store::locate()?;
    let server = match &connection.server {
        Some(server) => server.clone(),
        None => store.load()?.default_server.context(
            "which server? pass --server URL (or set ARCHES_SERVER), for example --server http://127.0.0.1:8080",
        )?,
    };
    let key = server_key(&server)?;
    let email = match args.email {
        Some(email) => email,
        None if args.password_stdin => {
            anyhow::bail!("--password-stdin needs --email (standard input holds the password)")
        }
        None => blocking(|| prompt_line("Email: ")).await?,
    };
    let password = if args.password_stdin {
        read_stdin_line("the password").await?
    } else {
        blocking(|| {
            rpassword::prompt_password("Password: ").map_err(|error| {
                anyhow::anyhow!(
                    "cannot read the password from a terminal ({error}); pipe it in with --password-stdin"
                )
            })
        })
        .await?
    };
    let client = Client::new(&key, Credentials::None)?;
    let tokens = match client
        .login(email.trim(), &password, args.org)
        .await
        .map_err(|e| explain_login(e, &key))?
    {
        LoginOutcome::LoggedIn(tokens) => *tokens,
        LoginOutcome::MfaRequired { mfa_token, .. } => {
            second_factor(&client, &key, mfa_token, args.password_stdin, args.org).await?
        }
    };
    let session = SavedSession::from_answer(&tokens, credentials::now_secs());
    let saved_key = key.clone();
    let path = store.path();
    blocking(move || {
        store.update(|saved| {
            saved.servers.insert(saved_key.clone(), session);
            saved.default_server = Some(saved_key);
        })
    })
    .await?;
    out!(
        "logged in to {key} as {} in org {} ({}); credentials saved in {}",
        tokens.user.email,
        tokens.org.name,
        tokens.role,
        path.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Login errors say what to check, not how to log in.
fn explain_login(error: ClientError, server: &str) -> anyhow::Error {
    if error.is_unauthenticated() {
        return anyhow::anyhow!("{error}");
    }
    explain(error, server)
}

/// The TOTP (or recovery) code step of a login: up to [`MFA_TRIES_MAX`] tries at a
/// terminal, one from standard input.
async fn second_factor(
    client: &Client,
    server: &str,
    mut mfa_token: String,
    from_stdin: bool,
    org: Option<OrgId>,
) -> anyhow::Result<TokenResponse> {
    let tries = if from_stdin { 1 } else { MFA_TRIES_MAX };
    for attempt in 1..=tries {
        let code = if from_stdin {
            read_stdin_line("the two-factor code").await?
        } else {
            blocking(|| {
                rpassword::prompt_password("Two-factor code (or a recovery code): ")
                    .map_err(|error| anyhow::anyhow!("cannot read the code: {error}"))
            })
            .await?
        };
        let compact: String = code.chars().filter(|c| !c.is_whitespace()).collect();
        let code = if compact.len() == 6 && compact.chars().all(|c| c.is_ascii_digit()) {
            MfaCode::Totp(compact)
        } else {
            MfaCode::Recovery(code.trim().to_owned())
        };
        match client.login_mfa(&mfa_token, &code, org).await {
            Ok(tokens) => return Ok(tokens),
            Err(ClientError::Api(api)) if api.code == "invalid_credentials" && attempt < tries => {
                status!("{}; try again", api.message);
                mfa_token = api
                    .detail_str("mfa_token")
                    .context("the server gave no new challenge; log in again")?
                    .to_owned();
            }
            Err(error) => return Err(explain_login(error, server)),
        }
    }
    anyhow::bail!("no valid two-factor code")
}

/// `arches logout`: ends the session on the server and forgets it.
pub async fn logout(connection: &Connection) -> anyhow::Result<ExitCode> {
    let store = Store::locate()?;
    let saved = store.load()?;
    let server = match (&connection.server, &saved.default_server) {
        (Some(server), _) | (None, Some(server)) => server.clone(),
        (None, None) => {
            out!("not logged in");
            return Ok(ExitCode::SUCCESS);
        }
    };
    let key = server_key(&server)?;
    let Some(session) = saved.servers.get(&key) else {
        out!("not logged in to {key}");
        return Ok(ExitCode::SUCCESS);
    };
    let client = Client::new(&key, Credentials::Session(session.tokens()))?;
    let ended = client.logout().await;
    let forget = key.clone();
    blocking(move || {
        store.update(|saved| {
            saved.servers.remove(&forget);
            if saved.default_server.as_deref() == Some(forget.as_str()) {
                saved.default_server = None;
            }
        })
    })
    .await?;
    match ended {
        Ok(()) => out!("logged out of {key}"),
        Err(error) if error.is_unauthenticated() => {
            out!("logged out of {key} (the session had already ended)")
        }
        Err(error) => {
            status!(
                "warning: cannot end the session on the server ({error}); the saved credentials are removed anyway"
            );
            out!("logged out of {key}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs blocking work (terminal prompts, the credentials lock) off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .context("a blocking task failed")?
}

fn prompt_line(prompt: &str) -> anyhow::Result<String> {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() {
        anyhow::bail!("no terminal to ask at: give --email");
    }
    eprint!("{prompt}");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let line = line.trim().to_owned();
    if line.is_empty() {
        anyhow::bail!("nothing entered");
    }
    Ok(line)
}

/// One line of standard input without its line ending (other whitespace is kept: it may be
/// part of a password).
async fn read_stdin_line(what: &'static str) -> anyhow::Result<String> {
    blocking(move || {
        let mut line = String::new();
        let read = std::io::stdin()
            .read_line(&mut line)
            .with_context(|| format!("cannot read {what} from standard input"))?;
        if read == 0 {
            anyhow::bail!("standard input ended before {what}");
        }
        let line = line
            .strip_suffix('\n')
            .map(|l| l.strip_suffix('\r').unwrap_or(l))
            .unwrap_or(&line)
            .to_owned();
        Ok(line)
    })
    .await
}

// ---------------------------------------------------------------------------------------
// Pipelines.

/// `arches pipelines …`.
pub async fn pipelines(remote: &Remote, command: PipelinesCommand) -> anyhow::Result<ExitCode> {
    let client = &remote.client;
    match command {
        PipelinesCommand::Apply { file } => {
            let source = app::read_pipeline_file(&file)?;
            match client.apply_pipeline(&source).await {
                Ok((pipeline, change)) => {
                    let what = match change {
                        ApplyChange::Created => "created",
                        ApplyChange::Updated => "updated",
                        ApplyChange::Unchanged => "unchanged",
                    };
                    out!(
                        "pipeline {} version {} {what} on {}",
                        pipeline.name,
                        pipeline.version,
                        remote.server
                    );
                }
                Err(ClientError::Api(api)) if !api.diagnostics().is_empty() => {
                    let diagnostics = api.diagnostics();
                    for diagnostic in &diagnostics {
                        status!("{}", diagnostic.render(&file.display().to_string()));
                    }
                    status!(
                        "{} problem{} found",
                        diagnostics.len(),
                        if diagnostics.len() == 1 { "" } else { "s" }
                    );
                    return Ok(ExitCode::from(2));
                }
                Err(error) => return Err(remote.fail(error)),
            }
        }
        PipelinesCommand::List { archived } => {
            let list = client
                .list_pipelines(archived)
                .await
                .map_err(|e| remote.fail(e))?;
            let mut table = inspect::table(&["PIPELINE", "VERSION", "TASKS", "SAVED", "ARCHIVED"]);
            for pipeline in list {
                let tasks = pipeline
                    .definition
                    .get("tasks")
                    .and_then(Value::as_array)
                    .map_or(0, Vec::len);
                table.add_row(vec![
                    pipeline.name.clone(),
                    pipeline.version.to_string(),
                    tasks.to_string(),
                    shown_time(&pipeline.created_at),
                    pipeline
                        .archived_at
                        .as_deref()
                        .map(shown_time)
                        .unwrap_or_default(),
                ]);
            }
            out!("{table}");
        }
        PipelinesCommand::Show { name, version } => {
            let pipeline = match version {
                Some(version) => client.get_pipeline_version(&name, version).await,
                None => client.get_pipeline(&name).await,
            }
            .map_err(|e| remote.fail(e))?;
            out!("pipeline  {}", pipeline.name);
            out!("version   {}", pipeline.version);
            out!("digest    {}", pipeline.digest);
            out!("saved     {}", shown_time(&pipeline.created_at));
            if let Some(archived) = &pipeline.archived_at {
                out!("archived  {}", shown_time(archived));
            }
            out!("{}", serde_json::to_string_pretty(&pipeline.definition)?);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A server time shown in local time, like the local commands show theirs.
pub(crate) fn shown_time(text: &str) -> String {
    inspect::parse_rfc3339(text)
        .map(inspect::time)
        .unwrap_or_else(|| text.to_owned())
}

fn timestamp(text: Option<&str>) -> Option<Timestamp> {
    text.and_then(inspect::parse_rfc3339)
}

// ---------------------------------------------------------------------------------------
// Runs.

/// `arches runs …` against a server.
pub async fn runs(remote: &Remote, command: RunsCommand) -> anyhow::Result<ExitCode> {
    let client = &remote.client;
    match command {
        RunsCommand::List {
            pipeline,
            state,
            limit,
        } => {
            let mut table =
                inspect::table(&["RUN", "PIPELINE", "VERSION", "STATE", "CREATED", "DURATION"]);
            let mut query = RunsQuery {
                pipeline,
                state,
                cursor: None,
                limit: None,
            };
            let mut left = limit;
            while left > 0 {
                query.limit = Some(left.min(RUNS_PAGE_MAX));
                let page = client.list_runs(&query).await.map_err(|e| remote.fail(e))?;
                left = left.saturating_sub(page.items.len() as u32);
                for run in &page.items {
                    table.add_row(vec![
                        run.id.to_string(),
                        run.pipeline.clone(),
                        run.pipeline_version.to_string(),
                        run.state.to_string(),
                        shown_time(&run.created_at),
                        inspect::duration(
                            timestamp(run.started_at.as_deref()),
                            timestamp(run.finished_at.as_deref()),
                        ),
                    ]);
                }
                match page.next_cursor {
                    Some(cursor) if !page.items.is_empty() => query.cursor = Some(cursor),
                    _ => break,
                }
            }
            out!("{table}");
        }
        RunsCommand::Show { run_id, items } => {
            let run = client.get_run(run_id).await.map_err(|e| remote.fail(e))?;
            let task_runs = client.task_runs(run_id).await.map_err(|e| remote.fail(e))?;
            out!("run       {}", run.id);
            out!(
                "pipeline  {} (version {})",
                run.pipeline,
                run.pipeline_version
            );
            out!("state     {}", run.state);
            out!("created   {}", shown_time(&run.created_at));
            out!(
                "duration  {}",
                inspect::duration(
                    timestamp(run.started_at.as_deref()),
                    timestamp(run.finished_at.as_deref())
                )
            );
            out!("params    {}", run.params);
            if let Some(error) = &run.error {
                out!("error     {error}");
            }
            out!("{}", inspect::task_table(&task_rows(&task_runs), items));
        }
        RunsCommand::Logs {
            run_id,
            task,
            follow,
        } => {
            if follow {
                follow_logs(remote, run_id, task).await?;
            } else {
                print_logs(remote, run_id, task).await?;
            }
        }
        RunsCommand::Trigger {
            pipeline,
            params,
            version,
            watch: then_watch,
            quiet,
        } => {
            let params = trigger_params(remote, &pipeline, version, &params).await?;
            let run = client
                .trigger_run(&pipeline, version, &params)
                .await
                .map_err(|e| remote.fail(e))?;
            status!(
                "run {} of {} (version {}) started on {}",
                run.id,
                run.pipeline,
                run.pipeline_version,
                remote.server
            );
            if then_watch {
                return watch(remote, run.id, quiet).await;
            }
            out!("{}", run.id);
        }
        RunsCommand::Watch { run_id, quiet } => return watch(remote, run_id, quiet).await,
        RunsCommand::Retry {
            run_id,
            watch: then_watch,
            quiet,
        } => {
            let run = client.retry_run(run_id).await.map_err(|e| remote.fail(e))?;
            status!("run {} retried from its failed tasks", run.id);
            if then_watch {
                return watch(remote, run.id, quiet).await;
            }
            out!("{}", run.id);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `arches cancel RUN_ID` against a server.
pub async fn cancel(remote: &Remote, run_id: RunId) -> anyhow::Result<ExitCode> {
    let run = remote
        .client
        .cancel_run(run_id)
        .await
        .map_err(|e| remote.fail(e))?;
    out!("run {} cancelled (now {})", run.id, run.state);
    Ok(ExitCode::SUCCESS)
}

/// The `name=value` params of a trigger, converted to the types the pipeline declares (as
/// `arches run` does); the server applies the defaults and checks the rest.
async fn trigger_params(
    remote: &Remote,
    pipeline: &str,
    version: Option<u32>,
    given: &[String],
) -> anyhow::Result<Map<String, Value>> {
    if given.is_empty() {
        return Ok(Map::new());
    }
    let stored = match version {
        Some(version) => remote.client.get_pipeline_version(pipeline, version).await,
        None => remote.client.get_pipeline(pipeline).await,
    }
    .map_err(|e| remote.fail(e))?;
    match serde_json::from_value::<PipelineDef>(stored.definition) {
        Ok(def) => run::coerce_params(&def, given),
        Err(error) => {
            // A definition this binary cannot read (a newer server): send the values as
            // JSON where they parse, else as text, and let the server judge.
            tracing::debug!(%error, "cannot read the pipeline definition; params sent as given");
            let mut values = Map::new();
            for text in given {
                let (name, raw) = text
                    .split_once('=')
                    .with_context(|| format!("param {text:?} must be written name=value"))?;
                let value =
                    serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_owned()));
                values.insert(name.to_owned(), value);
            }
            Ok(values)
        }
    }
}

fn task_rows(task_runs: &[TaskRun]) -> Vec<TaskRow> {
    task_runs
        .iter()
        .map(|t| TaskRow {
            task_id: t.task_id.clone(),
            index: t.index,
            fan_out: t.fan_out,
            state: t.state,
            attempt: t.attempt,
            started_at: timestamp(t.started_at.as_deref()),
            finished_at: timestamp(t.finished_at.as_deref()),
            error: t.error.clone(),
            outputs: t.outputs.clone(),
        })
        .collect()
}

fn artifact_row(artifact: &Artifact) -> ArtifactRow {
    ArtifactRow {
        name: artifact.name.clone(),
        version: artifact.version,
        media_type: artifact.media_type.clone(),
        size_bytes: artifact.size_bytes,
        rows: artifact.table.as_ref().map(|t| t.rows),
        produced_by: artifact.produced_by.clone(),
        id: artifact.id,
    }
}

/// Labels of task runs in logs: `task` or `task[index]`.
fn labels(task_runs: &[TaskRun]) -> HashMap<TaskRunId, String> {
    task_runs
        .iter()
        .map(|t| {
            let label = match t.index {
                Some(i) => format!("{}[{i}]", t.task_id),
                None => t.task_id.to_string(),
            };
            (t.id, label)
        })
        .collect()
}

async fn print_logs(
    remote: &Remote,
    run_id: RunId,
    task: Option<arches_core::TaskId>,
) -> anyhow::Result<()> {
    let client = &remote.client;
    let task_runs = client.task_runs(run_id).await.map_err(|e| remote.fail(e))?;
    let labels = labels(&task_runs);
    let mut query = LogsQuery {
        task,
        cursor: None,
        limit: Some(LOGS_PAGE),
    };
    let stdout = std::io::stdout();
    loop {
        let page = client
            .logs(run_id, &query)
            .await
            .map_err(|e| remote.fail(e))?;
        let mut out = stdout.lock();
        for line in &page.items {
            let label = labels
                .get(&line.task_run_id)
                .cloned()
                .or_else(|| line.task_id.as_ref().map(ToString::to_string))
                .unwrap_or_else(|| "?".to_owned());
            if let Err(error) = writeln!(
                out,
                "{}",
                inspect::log_line(&label, line.attempt, line.stream, &line.text)
            ) {
                if error.kind() == std::io::ErrorKind::BrokenPipe {
                    return Ok(());
                }
                return Err(error.into());
            }
        }
        let next = page.next_cursor.as_deref().and_then(|c| c.parse().ok());
        match next {
            Some(cursor) if !page.items.is_empty() => query.cursor = Some(cursor),
            _ => return Ok(()),
        }
    }
}

async fn follow_logs(
    remote: &Remote,
    run_id: RunId,
    task: Option<arches_core::TaskId>,
) -> anyhow::Result<()> {
    let client = &remote.client;
    let mut lines = client
        .follow_logs(run_id, task.as_ref())
        .await
        .map_err(|e| remote.fail(e))?;
    let mut labels = labels(&client.task_runs(run_id).await.map_err(|e| remote.fail(e))?);
    while let Some(item) = lines.next().await {
        match item.map_err(|e| remote.fail(e))? {
            FollowedLog::Line(line) => {
                if !labels.contains_key(&line.task_run_id) {
                    // A fan-out item created after the labels were read.
                    if let Ok(task_runs) = client.task_runs(run_id).await {
                        labels = self::labels(&task_runs);
                    }
                }
                let label = labels
                    .get(&line.task_run_id)
                    .cloned()
                    .or_else(|| line.task_id.as_ref().map(ToString::to_string))
                    .unwrap_or_else(|| "?".to_owned());
                out!(
                    "{}",
                    inspect::log_line(&label, line.attempt, line.stream, &line.text)
                );
            }
            FollowedLog::Reset { reason } => {
                status!("warning: some log lines were missed ({reason}); `arches runs logs {run_id}` shows them all");
            }
            FollowedLog::End { state } => {
                status!("run {run_id} {state}");
                break;
            }
        }
    }
    Ok(())
}

/// `arches runs watch`: the live progress display fed by the server's event stream, then the
/// run's summary. Exits 0 only if the run succeeded; Ctrl-C stops watching (the run goes on).
async fn watch(remote: &Remote, run_id: RunId, quiet: bool) -> anyhow::Result<ExitCode> {
    let client = &remote.client;
    let query = EventsQuery {
        run_id: Some(run_id),
        kinds: vec![EventKind::Run, EventKind::TaskRun],
        last_event_id: None,
    };
    // Subscribe first, then read the state: a change that lands in between is in both, and
    // none is lost.
    let mut events = client.events(&query).await.map_err(|e| remote.fail(e))?;
    let run = client.get_run(run_id).await.map_err(|e| remote.fail(e))?;
    if run.state.is_terminal() {
        return print_summary(remote, &run).await;
    }
    let task_runs = client.task_runs(run_id).await.map_err(|e| remote.fail(e))?;
    let (sender, receiver) = broadcast::channel(1024);
    let display = progress::Progress::start(receiver, run_id, task_runs.len(), quiet);
    seed(&sender, run_id, &task_runs);
    let mut last_event_id: Option<String> = None;
    let mut reconnects = 0;
    let outcome: anyhow::Result<bool> = async {
        loop {
            let item = tokio::select! {
                item = events.next() => item,
                signal = tokio::signal::ctrl_c() => {
                    signal.context("cannot listen for Ctrl-C")?;
                    return Ok(false);
                }
            };
            match item {
                Some(Ok(Event::State { id, event })) => {
                    reconnects = 0;
                    last_event_id = id.or(last_event_id.take());
                    let ended = matches!(
                        &event,
                        DomainEvent::RunStateChanged { run_id: r, state, .. }
                            if *r == run_id && state.is_terminal()
                    );
                    let _ = sender.send(event);
                    if ended {
                        return Ok(true);
                    }
                }
                Some(Ok(Event::Reset { .. })) => {
                    // Events were missed: read the state again.
                    let run = client.get_run(run_id).await.map_err(|e| remote.fail(e))?;
                    if run.state.is_terminal() {
                        return Ok(true);
                    }
                    let task_runs = client.task_runs(run_id).await.map_err(|e| remote.fail(e))?;
                    seed(&sender, run_id, &task_runs);
                }
                Some(Ok(Event::Log { .. })) => {}
                Some(Err(error)) if reconnects >= WATCH_RECONNECTS_MAX => {
                    return Err(remote.fail(error))
                }
                None if reconnects >= WATCH_RECONNECTS_MAX => {
                    anyhow::bail!("the server closed the event stream")
                }
                Some(Err(_)) | None => {
                    reconnects += 1;
                    // A pause before reconnecting, growing with each try, so a restarting
                    // server is not hammered; this waits for no condition.
                    tokio::time::sleep(Duration::from_secs(u64::from(reconnects))).await;
                    let Ok(stream) = client
                        .events(&EventsQuery {
                            last_event_id: last_event_id.clone(),
                            ..query.clone()
                        })
                        .await
                    else {
                        continue;
                    };
                    events = stream;
                    let run = client.get_run(run_id).await.map_err(|e| remote.fail(e))?;
                    if run.state.is_terminal() {
                        return Ok(true);
                    }
                }
            }
        }
    }
    .await;
    display.finish().await;
    match outcome {
        Ok(true) => {}
        Ok(false) => {
            status!("stopped watching run {run_id}; it goes on on the server");
            return Ok(ExitCode::from(130));
        }
        Err(error) => return Err(error),
    }
    let run = client.get_run(run_id).await.map_err(|e| remote.fail(e))?;
    print_summary(remote, &run).await
}

/// Tells the progress display the current state of each task run (as if it had seen the
/// events), for a watch that starts or resumes in the middle of a run.
fn seed(sender: &broadcast::Sender<DomainEvent>, run_id: RunId, task_runs: &[TaskRun]) {
    for task_run in task_runs {
        let event = |state: TaskRunState| DomainEvent::TaskRunStateChanged {
            // The display reads neither the org nor the time.
            org_id: OrgId::DEFAULT,
            run_id,
            task_run_id: task_run.id,
            task_id: task_run.task_id.clone(),
            index: task_run.index,
            state,
            attempt: task_run.attempt,
            at: Timestamp(0),
        };
        // The display takes pending → running for a fan-out parent; an ordinary task passes
        // through queued.
        if task_run.state == TaskRunState::Running && task_run.fan_out.is_none() {
            let _ = sender.send(event(TaskRunState::Queued));
        }
        let _ = sender.send(event(task_run.state));
    }
}

/// The end-of-run summary (as `arches run` prints it) and the exit code of the run's state.
async fn print_summary(remote: &Remote, run: &Run) -> anyhow::Result<ExitCode> {
    let client = &remote.client;
    let task_runs = client.task_runs(run.id).await.map_err(|e| remote.fail(e))?;
    out!("{}", inspect::task_table(&task_rows(&task_runs), false));
    let artifacts = client
        .list_artifacts(&ArtifactsQuery {
            run_id: Some(run.id),
            limit: Some(100),
            ..ArtifactsQuery::default()
        })
        .await
        .map_err(|e| remote.fail(e))?;
    if !artifacts.is_empty() {
        let rows: Vec<ArtifactRow> = artifacts.iter().map(artifact_row).collect();
        out!("{}", inspect::artifact_table(&rows));
    }
    inspect::print_run_outcome(
        run.id,
        run.state,
        timestamp(run.started_at.as_deref()).or_else(|| timestamp(Some(&run.created_at))),
        timestamp(run.finished_at.as_deref()),
        run.error.as_deref(),
    );
    Ok(match run.state {
        RunState::Succeeded => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    })
}

// ---------------------------------------------------------------------------------------
// Artifacts.

/// Resolves an artifact reference on the server: an id, a name (latest version) or
/// `name@version`.
async fn resolve(remote: &Remote, reference: &str) -> anyhow::Result<Artifact> {
    let client = &remote.client;
    if let Ok(id) = reference.parse::<ArtifactId>() {
        return client.get_artifact(id).await.map_err(|e| remote.fail(e));
    }
    let (name, version) = crate::inspect::artifact_name_and_version(reference)?;
    client
        .artifact_by_name(name, version)
        .await
        .map_err(|e| remote.fail(e))
}

/// `arches artifacts …` against a server.
pub async fn artifacts(remote: &Remote, command: ArtifactsCommand) -> anyhow::Result<ExitCode> {
    let client = &remote.client;
    match command {
        ArtifactsCommand::List { name, run, limit } => {
            let list = client
                .list_artifacts(&ArtifactsQuery {
                    name,
                    run_id: run,
                    limit: Some(limit),
                })
                .await
                .map_err(|e| remote.fail(e))?;
            let rows: Vec<ArtifactRow> = list.iter().map(artifact_row).collect();
            out!("{}", inspect::artifact_table(&rows));
        }
        ArtifactsCommand::Show { artifact } => {
            let artifact = resolve(remote, &artifact).await?;
            out!("{}", serde_json::to_string_pretty(&artifact)?);
        }
        ArtifactsCommand::Cat { artifact } => {
            let artifact = resolve(remote, &artifact).await?;
            let mut content = client
                .artifact_content(artifact.id)
                .await
                .map_err(|e| remote.fail(e))?;
            let stdout = std::io::stdout();
            while let Some(chunk) = content.next().await {
                let chunk = chunk.map_err(|e| remote.fail(e))?;
                match stdout.lock().write_all(&chunk) {
                    Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => break,
                    other => other?,
                }
            }
        }
        ArtifactsCommand::Get { artifact, output } => {
            let artifact = resolve(remote, &artifact).await?;
            let output = output.unwrap_or_else(|| inspect::default_output(&artifact.name));
            if let Some(parent) = output.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("cannot create {}", parent.display()))?;
            }
            client
                .download_artifact(&artifact, &output)
                .await
                .map_err(|e| remote.fail(e))?;
            out!(
                "{}@{} ({}) written to {}",
                artifact.name,
                artifact.version,
                inspect::bytes(artifact.size_bytes),
                output.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
