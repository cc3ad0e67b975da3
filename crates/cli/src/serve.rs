//! `arches serve`: the HTTP API, the live events and the in-process workers in one process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use arches_server::app::{self, BuildOptions};
use arches_server::config::{ConfigOverrides, LogFormat, ServerConfig};
use clap::Args;

/// Flags of `arches serve`. Each overrides the same setting of `arches.toml` and of the
/// `ARCHES_*` environment (see the README's configuration section).
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The configuration file (default `./arches.toml`, skipped when missing).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The address to listen on, for example `0.0.0.0:8080`.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// The URL users reach the server at (for links in emails).
    #[arg(long)]
    public_url: Option<String>,
    /// Let users create organizations (otherwise one default organization).
    #[arg(long)]
    multi_tenant: bool,
    /// Run no task here: with a PostgreSQL store (--database-url), offer them to
    /// standalone workers (`arches worker`); with SQLite, an API-only process.
    #[arg(long)]
    no_workers: bool,
    /// Task runs executing at once in this process.
    #[arg(long)]
    worker_slots: Option<usize>,
    /// Log format: json or text.
    #[arg(long, value_parser = ["json", "text"])]
    log_format: Option<String>,
    /// Print the documented example configuration and exit.
    #[arg(long)]
    print_config_example: bool,
}

/// Runs the server until SIGINT or SIGTERM.
pub async fn serve(
    home: Option<PathBuf>,
    database_url: Option<String>,
    args: ServeArgs,
) -> anyhow::Result<ExitCode> {
    if args.print_config_example {
        out!("{}", ServerConfig::documented_example());
        return Ok(ExitCode::SUCCESS);
    }
    let overrides = ConfigOverrides {
        listen: args.listen,
        home,
        public_url: args.public_url,
        multi_tenant: args.multi_tenant.then_some(true),
        workers_enabled: args.no_workers.then_some(false),
        worker_slots: args.worker_slots,
        log_format: args.log_format.as_deref().map(|f| match f {
            "text" => LogFormat::Text,
            _ => LogFormat::Json,
        }),
        log_level: None,
        database_url,
    };
    let config = ServerConfig::load(args.config.as_deref(), overrides)
        .context("cannot load the configuration")?;
    arches_server::telemetry::init_tracing(&config.log).context("cannot set up logging")?;
    let listen = config.listen;
    let built = app::build(config, BuildOptions::default())
        .await
        .context("cannot start the server")?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let bound = listener.local_addr().unwrap_or(listen);
    tracing::info!(address = %bound, "arches server listening");
    status!("arches server listening on http://{bound} (API docs at /api/docs)");
    app::serve(built, listener, arches_server::http::shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}
