//! `arches worker`: a standalone worker on a PostgreSQL store's task queue.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use arches_server::config::{ConfigOverrides, ServerConfig};
use arches_server::worker::{run_worker, WorkerSettings};
use clap::Args;

/// Flags of `arches worker`. The worker reads the server's configuration (`arches.toml`,
/// `ARCHES_*`) for its store, tools and secrets; these flags are its own.
#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// The configuration file (default `./arches.toml`, skipped when missing).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The worker's name, recorded on the attempts it runs (default
    /// `worker@<hostname>:<pid>`).
    #[arg(long)]
    id: Option<String>,
    /// Attempts at once (default `workers.slots`, or four per CPU core).
    #[arg(long)]
    slots: Option<usize>,
    /// A tag this worker advertises (`gpu`, `python`, `region:eu`); repeat or separate with
    /// commas. It claims only task runs whose `worker_tags` it all has.
    #[arg(long = "tag", value_delimiter = ',')]
    tags: Vec<String>,
    /// How long a claim lasts without renewal, for example `30s`.
    #[arg(long, value_parser = duration)]
    claim_ttl: Option<Duration>,
    /// How often claims are renewed (default a third of --claim-ttl, or 10s).
    #[arg(long, value_parser = duration)]
    renew_interval: Option<Duration>,
    /// The longest an idle worker goes without looking at the queue (default 60s).
    #[arg(long, value_parser = duration)]
    sweep_interval: Option<Duration>,
    /// On SIGTERM or Ctrl-C, how long running attempts may go on before they are stopped
    /// and handed back (default 30s).
    #[arg(long, value_parser = duration)]
    drain_grace: Option<Duration>,
}

fn duration(text: &str) -> Result<Duration, String> {
    arches_core::time::parse_duration(text)
}

/// Runs the worker until SIGTERM or SIGINT, then drains and prints what it did.
pub async fn worker(
    home: Option<PathBuf>,
    database_url: Option<String>,
    args: WorkerArgs,
) -> anyhow::Result<ExitCode> {
    let overrides = ConfigOverrides {
        home,
        database_url,
        ..ConfigOverrides::default()
    };
    let config = ServerConfig::load(args.config.as_deref(), overrides)
        .context("cannot load the configuration")?;
    let settings = WorkerSettings {
        id: args.id,
        slots: args.slots,
        tags: args.tags,
        claim_ttl: args.claim_ttl,
        renew_interval: args.renew_interval,
        sweep_interval: args.sweep_interval,
        drain_grace: args.drain_grace,
    };
    status!("arches worker starting (stop with SIGTERM or Ctrl-C)");
    let report = run_worker(config, settings, arches_server::http::shutdown_signal()).await?;
    status!(
        "arches worker stopped: {} claimed, {} finished, {} lost, {} handed back",
        report.claimed,
        report.finished,
        report.lost,
        report.handed_back
    );
    Ok(ExitCode::SUCCESS)
}
