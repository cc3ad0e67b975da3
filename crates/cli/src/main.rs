//! `arches`: run, validate and inspect data and AI pipelines.
//!
//! Local mode: the store is an embedded SQLite file under the home directory (`./.arches`
//! by default, `ARCHES_HOME` or `--home` to change it) and the workers run in this process.

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
mod inspect;
mod owner;
mod progress;
mod run;
mod serve;

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
    /// Inspect runs.
    #[command(subcommand)]
    Runs(inspect::RunsCommand),
    /// Inspect artifacts.
    #[command(subcommand)]
    Artifacts(inspect::ArtifactsCommand),
    /// List the registered tools.
    Tools,
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
        Command::Serve(args) => return serve::serve(home_given.then_some(cli.home), args).await,
        command => command,
    };
    let home = app::Home::new(cli.home, cli.durability);
    match command {
        Command::Run(args) => run::run(&home, args).await,
        Command::Resume(args) => run::resume(&home, args).await,
        Command::Cancel(args) => run::cancel(&home, args).await,
        Command::Validate { file } => app::validate_command(&file),
        Command::Graph { file, format } => app::graph_command(&file, &format),
        Command::Runs(command) => inspect::runs(&home, command).await,
        Command::Artifacts(command) => inspect::artifacts(&home, command).await,
        Command::Tools => app::tools_command(),
        Command::Bench(command) => bench::bench(command).await,
        Command::Serve(args) => serve::serve(Some(home.root.clone()), args).await,
    }
}
