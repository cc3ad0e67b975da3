//! `arches`: run, validate and inspect data and AI pipelines.
//!
//! Local mode: the store is an embedded SQLite file under the home directory (`./.arches`
//! by default, `ARCHES_HOME` or `--home` to change it) and the workers run in this process.
//!
//! Remote mode: with a server (`--server`, `ARCHES_SERVER`, or the default `arches login`
//! saved), `runs …`, `artifacts …`, `cancel` and `pipelines …` act on the server instead,
//! through `arches-client` (see `remote`).

/// Writes a line to standard output; a closed pipe (`arches runs list | head`) is not an
/// error worth a panic, so write errors are ignored.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// Writes text to standard output without a newline, ignoring a closed pipe.
macro_rules! out_raw {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($arg)*);
    }};
}

/// Writes a status line to standard error, ignoring a closed pipe.
macro_rules! status {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod app;
mod bench;
mod bench_api;
mod credentials;
mod inspect;
mod logs;
mod owner;
mod progress;
mod remote;
mod reviews;
mod run;
mod search;
mod serve;
mod tools;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;

use arches_core::records::Durability;
use clap::{Parser, Subcommand};

/// Command-line interface of Arches.
#[derive(Parser, Debug)]
#[command(
    name = "arches",
    version,
    about = "Run data and AI pipelines: DAGs of tasks on a durable engine"
)]
struct Cli {
    /// Data directory: the SQLite store, artifacts and working directories.
    #[arg(long, global = true, env = "ARCHES_HOME", default_value = ".arches")]
    home: PathBuf,
    /// Store durability: `normal` (SQLite synchronous=NORMAL) or `full` (synchronous=FULL).
    #[arg(
        long,
        global = true,
        env = "ARCHES_DURABILITY",
        default_value = "normal"
    )]
    durability: Durability,
    /// Log filter for diagnostics on stderr (tracing env-filter syntax).
    #[arg(long, global = true, env = "ARCHES_LOG", default_value = "warn")]
    log: String,
    /// An Arches server (`http://host:port`): `runs`, `artifacts`, `cancel` and `pipelines`
    /// then act on it instead of the local home. Without it, the server `arches login` saved
    /// is used, unless --local or --home / ARCHES_HOME is given.
    #[arg(long, global = true, env = "ARCHES_SERVER")]
    server: Option<String>,
    /// An API key (`ak_…`) or access token for the server, instead of the session saved by
    /// `arches login`.
    #[arg(long, global = true, env = "ARCHES_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Use the local home even when a server is set (ARCHES_SERVER) or saved by
    /// `arches login`.
    #[arg(long, global = true)]
    local: bool,
    /// A PostgreSQL store (`postgres://user@host:5432/db`) instead of the SQLite file under
    /// the home (artifacts and working directories stay under the home). Needed by
    /// `arches worker` and `arches run --no-workers`, which share it with other processes.
    #[arg(
        long,
        global = true,
        env = "ARCHES_DATABASE_URL",
        hide_env_values = true
    )]
    database_url: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate a pipeline, run it with a live progress display, and print a summary.
    Run(run::RunArgs),
    /// Finish a run whose process died (for example killed with SIGKILL), without re-running
    /// the task runs that had succeeded.
    Resume(run::ResumeArgs),
    /// Cancel a run: running tasks are stopped and the rest skipped.
    Cancel(run::CancelArgs),
    /// Check a pipeline file and report every problem with its line and column.
    Validate {
        /// The pipeline file (YAML or JSON).
        file: PathBuf,
    },
    /// Draw a pipeline's DAG.
    Graph {
        /// The pipeline file (YAML or JSON).
        file: PathBuf,
        /// Output format: text, dot or mermaid.
        #[arg(long, default_value = "text")]
        format: String,
    },
    /// Inspect runs; with a server also trigger, watch and retry them.
    #[command(subcommand)]
    Runs(inspect::RunsCommand),
    /// Inspect and download artifacts.
    #[command(subcommand)]
    Artifacts(inspect::ArtifactsCommand),
    /// Save and list pipelines on a server.
    #[command(subcommand)]
    Pipelines(remote::PipelinesCommand),
    /// The validation queue on a server: list, show, claim, approve (or edit and approve),
    /// reject; and the calibration of routed tasks.
    #[command(subcommand)]
    Reviews(reviews::ReviewsCommand),
    /// Search a collection the `embed` tool indexed: hybrid (vector and full text), vector
    /// or full-text; on a server, or in the local home.
    Search(search::SearchArgs),
    /// Search the task log lines of runs by full text: every word or "quoted phrase" must
    /// be in the line; best matches first. On a server (the org's runs), or in the local home.
    SearchLogs(logs::SearchLogsArgs),
    /// Log in to a server and save the session (in the config directory, mode 0600) as the
    /// default server of the commands that follow.
    Login(remote::LoginArgs),
    /// End the session on a server and forget its saved credentials.
    Logout,
    /// List and show tools; with a server, register the org's own (WASM modules and HTTP
    /// endpoints). `arches tools` alone lists them.
    Tools {
        #[command(subcommand)]
        command: Option<tools::ToolsCommand>,
    },
    /// The org's secrets on a server: set (from standard input), list, delete, rotate; and
    /// `keygen` for a new master key.
    #[command(subcommand)]
    Secrets(tools::SecretsCommand),
    /// Apply the embedded database migrations and report the schema version: to the SQLite
    /// store under --home, or to a PostgreSQL database. Safe when several processes run it at
    /// once (the migrator holds a database lock); every store also migrates when it opens.
    Migrate,
    /// A standalone worker on a PostgreSQL store (--database-url): claims the task runs that
    /// schedulers offer (`arches run --no-workers`, or `arches serve` with
    /// `workers.mode = "queue"`), runs them, and on SIGTERM or Ctrl-C stops claiming, lets
    /// its attempts finish within --drain-grace and hands the rest back.
    Worker(worker::WorkerArgs),
    /// Measure the engine (see BENCHMARKS.md).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Serve the REST API, live events and the web of accounts and organizations, with
    /// in-process workers.
    Serve(serve::ServeArgs),
}

fn main() -> ExitCode {
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(err) => err.exit(),
    };
    // `serve` takes `--home` as an override of its configuration only when it was given
    // (on the command line or in ARCHES_HOME), so that `arches.toml` can set it.
    let home_given = matches!(
        matches.value_source("home"),
        Some(clap::parser::ValueSource::CommandLine | clap::parser::ValueSource::EnvVariable)
    );
    if let Command::Serve(_) = cli.command {
        // The server sets up its own (JSON by default) logging from its configuration.
        return block_on(dispatch(cli, home_given));
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    block_on(dispatch(cli, home_given))
}

fn block_on(work: impl std::future::Future<Output = anyhow::Result<ExitCode>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            status!("error: cannot start the async runtime: {err}");
            return ExitCode::from(70);
        }
    };
    match runtime.block_on(work) {
        Ok(code) => code,
        Err(err) => {
            status!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli, home_given: bool) -> anyhow::Result<ExitCode> {
    let command = match cli.command {
        Command::Serve(args) => {
            return serve::serve(home_given.then_some(cli.home), cli.database_url, args).await
        }
        Command::Worker(args) => {
            return worker::worker(home_given.then_some(cli.home), cli.database_url, args).await
        }
        command => command,
    };
    let home = app::Home::new(cli.home, cli.durability, cli.database_url);
    let connection = remote::Connection {
        server: if cli.local { None } else { cli.server },
        token: cli.token,
        use_saved_default: !cli.local && !home_given,
    };
    match command {
        Command::Run(args) => run::run(&home, args).await,
        Command::Resume(args) => run::resume(&home, args).await,
        Command::Cancel(args) => match remote::connect(&connection).await? {
            Some(server) => remote::cancel(&server, args.run_id).await,
            None => run::cancel(&home, args).await,
        },
        Command::Validate { file } => app::validate_command(&file),
        Command::Graph { file, format } => app::graph_command(&file, &format),
        Command::Runs(command) => match remote::connect(&connection).await? {
            Some(server) => remote::runs(&server, command).await,
            None => inspect::runs(&home, command).await,
        },
        Command::Artifacts(command) => match remote::connect(&connection).await? {
            Some(server) => remote::artifacts(&server, command).await,
            None => inspect::artifacts(&home, command).await,
        },
        Command::Pipelines(command) => {
            let server = remote::connect_required(&connection, "arches pipelines").await?;
            remote::pipelines(&server, command).await
        }
        Command::Reviews(command) => {
            let remote = remote::connect_required(&connection, "arches reviews").await?;
            reviews::reviews(&remote, command).await
        }
        Command::Search(args) => {
            let remote = remote::connect(&connection).await?;
            search::search(&home, remote.as_ref(), args).await
        }
        Command::SearchLogs(args) => {
            let remote = remote::connect(&connection).await?;
            logs::search_logs(&home, remote.as_ref(), args).await
        }
        Command::Login(args) => remote::login(&connection, args).await,
        Command::Logout => remote::logout(&connection).await,
        Command::Tools { command } => {
            let command = command.unwrap_or(tools::ToolsCommand::List);
            let remote = remote::connect(&connection).await?;
            tools::tools(remote.as_ref(), command).await
        }
        Command::Secrets(command) => {
            let remote = match command {
                tools::SecretsCommand::Keygen { .. } => None,
                _ => remote::connect(&connection).await?,
            };
            tools::secrets(remote.as_ref(), command).await
        }
        Command::Migrate => app::migrate(&home).await,
        Command::Worker(args) => {
            worker::worker(Some(home.root.clone()), home.database_url.clone(), args).await
        }
        Command::Bench(command) => bench::bench(command, home.database_url.as_deref()).await,
        Command::Serve(args) => {
            serve::serve(Some(home.root.clone()), home.database_url.clone(), args).await
        }
    }
}
