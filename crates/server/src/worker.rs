//! The standalone worker (`arches worker`): a process that executes the task runs that
//! schedulers offer on a PostgreSQL store's task queue, with the same tools, policies
//! (`[tools.*]`) and org secrets (`[secrets]`) as the server, and writes their logs and
//! artifacts as the server's own workers do (artifacts under `home`, which replicas and
//! workers share).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arches_core::ports::{ArtifactStore, TaskQueue};
use arches_core::{Clock, SystemClock};
use arches_engine::{EngineOptions, LogWriter, QueueWorker, QueueWorkerOptions, QueueWorkerReport};
use arches_store::LocalArtifactStore;
use tokio_util::sync::CancellationToken;

use crate::app::{tool_registry, OpenedStore};
use crate::config::ServerConfig;

/// Settings of one worker process, besides the server configuration it shares.
#[derive(Clone, Debug, Default)]
pub struct WorkerSettings {
    /// The worker's name on the queue (recorded on the attempts it runs). Default
    /// `worker@<hostname>:<pid>`.
    pub id: Option<String>,
    /// Attempts at once; default: `workers.slots`, or four per CPU core.
    pub slots: Option<usize>,
    /// The tags it advertises (`gpu`, `python`, `region:eu`): it claims only task runs whose
    /// `worker_tags` are all among them.
    pub tags: Vec<String>,
    /// How long a claim lasts without renewal (default 30 s).
    pub claim_ttl: Option<Duration>,
    /// How often claims are renewed (default 10 s; below the claim's lifetime).
    pub renew_interval: Option<Duration>,
    /// The longest an idle worker goes without looking at the queue (default 60 s).
    pub sweep_interval: Option<Duration>,
    /// On SIGTERM, how long running attempts may go on before they are stopped and their
    /// claims handed back (default 30 s).
    pub drain_grace: Option<Duration>,
}

/// Runs a worker until `stop` resolves (SIGTERM or SIGINT for `arches worker`), then
/// drains. Returns what it did.
///
/// # Errors
/// When the configuration names no PostgreSQL store (`store.database_url`), the store
/// cannot be opened, or a setting is out of range.
pub async fn run_worker(
    config: ServerConfig,
    settings: WorkerSettings,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<QueueWorkerReport> {
    if config.store.database_url.is_none() {
        anyhow::bail!(
            "a standalone worker needs the PostgreSQL store the schedulers share: set \
             store.database_url (ARCHES_STORE__DATABASE_URL) or pass --database-url"
        );
    }
    std::fs::create_dir_all(&config.home)
        .with_context(|| format!("cannot create home directory {}", config.home.display()))?;
    let opened = OpenedStore::open(&config)
        .await
        .context("cannot open the store")?;
    let (store, _) = opened.ports();
    let queue: Arc<dyn TaskQueue> = opened.task_queue().context("the store has no task queue")?;
    let artifacts: Arc<dyn ArtifactStore> = Arc::new(
        LocalArtifactStore::new(&config.home.join("artifacts"), store.clone())
            .context("cannot open the artifact store")?,
    );
    let keyring = config
        .secrets
        .keyring()
        .map_err(|e| anyhow::anyhow!("secrets.keys: {e}"))?
        .map(Arc::new);
    let mut executors =
        arches_tools::Executors::new(config.http_tool_policy(), config.wasm_tool_policy());
    executors = executors.with_org_llm(
        config.llm_tool_policy(),
        crate::app::org_secrets(store.clone(), keyring.clone()),
    );
    if let Some(search) =
        crate::search::services(&config, &config.home, executors.http.clone()).context("search")?
    {
        executors = executors.with_search(search);
    }
    let tools = tool_registry(&config, store.clone(), &executors, keyring);

    let mut engine = EngineOptions::new(config.home.join("work"));
    engine.worker_id = settings
        .id
        .clone()
        .unwrap_or_else(|| format!("worker@{}:{}", crate::app::host_name(), std::process::id()));
    if let Some(slots) = settings.slots.or(config.workers.slots) {
        engine.worker_slots = slots.max(1);
    }
    let mut options = QueueWorkerOptions::new(engine);
    options.tags = settings.tags.clone();
    if let Some(ttl) = settings.claim_ttl {
        options.claim_ttl = ttl;
    }
    if let Some(interval) = settings.renew_interval {
        options.renew_interval = interval;
    } else if settings.claim_ttl.is_some() {
        options.renew_interval = options.claim_ttl / 3;
    }
    if let Some(interval) = settings.sweep_interval {
        options.sweep_interval = interval;
    }
    if let Some(grace) = settings.drain_grace {
        options.drain_grace = grace;
    }
    options.check().map_err(anyhow::Error::msg)?;

    let clock: Arc<dyn Clock> = Arc::new(SystemClock);

    // Log lines go to the store and, with NATS, to every replica's live streams.
    let mut log_writer = LogWriter::new(store.clone(), options.engine.log_channel_capacity);
    if config.events.nats_url.is_some() {
        let bus = crate::app::event_bus(&config, clock.as_ref())
            .await
            .context("cannot reach the event bus")?;
        log_writer = log_writer.with_event_bus(bus);
    }
    let worker = QueueWorker::new(
        options,
        queue,
        Arc::new(tools),
        artifacts,
        log_writer.handle(),
        clock,
    );
    let log_task = tokio::spawn(log_writer.run());
    let stop_claiming = CancellationToken::new();
    let signal = stop_claiming.clone();
    tokio::spawn(async move {
        stop.await;
        signal.cancel();
    });
    let report = worker.run(stop_claiming).await;
    // The worker held the last log senders: the writer drains what is left and ends.
    let _ = log_task.await;
    opened.close().await;
    Ok(report)
}
