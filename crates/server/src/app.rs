//! Assembly: from a [`ServerConfig`] to a running server — the SQLite store (both ports),
//! the artifact store, the event bus, the engine with its in-process workers, the auth
//! services, and the router with its layers.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arches_auth::jwt::TokenIssuer;
use arches_auth::mail::{LogMailer, Mailer, SmtpConfig as MailSmtpConfig, SmtpMailer, SmtpTls};
use arches_auth::password::{PasswordHasher, PasswordPolicy};
use arches_auth::throttle::{LoginThrottle, ThrottleConfig};
use arches_core::identity::IdentityStore;
use arches_core::ports::{Store, TaskQueue, ToolRegistry};
use arches_core::records::Durability as StoreDurability;
use arches_core::{Clock, SystemClock};
use arches_engine::{Engine, EngineOptions, EventBus, FailPoints, InProcessBus};
use arches_store::{LocalArtifactStore, PgStore, SqliteStore};
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::config::{Durability, ServerConfig, SmtpTls as ConfigTls};
use crate::metrics::Metrics;
use crate::ratelimit::RateLimiter;
use crate::state::{AppState, AuthServices};
use crate::supervisor::{EngineFactory, EngineSlot};

/// Events kept for resuming live streams (`Last-Event-ID`).
pub const EVENT_REPLAY_MAX: usize = 16_384;
/// How far a live stream may fall behind before it gets a `reset` event.
pub const EVENT_LIVE_CAPACITY: usize = 8_192;

/// Options that only tests change.
#[derive(Clone, Debug, Default)]
pub struct BuildOptions {
    /// Use cheap Argon2 parameters (tests only: hashing at the OWASP minimum costs ~50 ms).
    pub insecure_fast_hashing: bool,
    /// Use this clock instead of the system's.
    pub clock: Option<Arc<dyn ClockDebug>>,
    /// Failure points armed into every engine the server builds (tests of recovery).
    pub failpoints: Option<FailPoints>,
}

/// A [`Clock`] that can be debug-printed (for [`BuildOptions`]).
pub trait ClockDebug: Clock + std::fmt::Debug {}
impl<T: Clock + std::fmt::Debug> ClockDebug for T {}

/// A built server: its state, its router (layered, ready to serve) and its engine.
pub struct Built {
    /// What handlers share.
    pub state: AppState,
    /// The router with every layer.
    pub router: Router,
    /// The engine, to run beside the HTTP server (absent with workers disabled).
    pub engine: Option<Engine>,
    /// Builds a replacement when the engine stops on a store failure (absent with workers
    /// disabled); see [`crate::supervisor`].
    pub engine_factory: Option<EngineFactory>,
    /// The store, to close on shutdown.
    pub store: OpenedStore,
    /// The scheduler's hold on its name on a shared store, kept while the server runs.
    pub scheduler_name: Option<arches_store::postgres::SchedulerNameLock>,
}

/// The store a server opened: the SQLite file under its home, or a shared PostgreSQL
/// database.
#[derive(Clone, Debug)]
pub enum OpenedStore {
    /// `home/arches.db`.
    Sqlite(SqliteStore),
    /// `store.database_url`.
    Postgres(PgStore),
}

impl OpenedStore {
    /// Opens the store the configuration names (migrating it).
    ///
    /// # Errors
    /// [`BuildError::Store`] when it cannot be opened or migrated.
    pub async fn open(config: &ServerConfig) -> Result<OpenedStore, BuildError> {
        let durability = match config.durability {
            Durability::Normal => StoreDurability::Normal,
            Durability::Full => StoreDurability::Full,
        };
        Ok(match &config.store.database_url {
            Some(url) => OpenedStore::Postgres(
                PgStore::connect_pooled(url.expose(), durability, config.store.pool()).await?,
            ),
            None => OpenedStore::Sqlite(
                SqliteStore::open(&config.home.join("arches.db"), durability).await?,
            ),
        })
    }

    /// Both ports of the store.
    pub fn ports(&self) -> (Arc<dyn Store>, Arc<dyn IdentityStore>) {
        match self {
            OpenedStore::Sqlite(store) => {
                let store = Arc::new(store.clone());
                (store.clone(), store)
            }
            OpenedStore::Postgres(store) => {
                let store = Arc::new(store.clone());
                (store.clone(), store)
            }
        }
    }

    /// The shared task queue (PostgreSQL only).
    pub fn task_queue(&self) -> Option<Arc<dyn TaskQueue>> {
        match self {
            OpenedStore::Sqlite(_) => None,
            OpenedStore::Postgres(store) => Some(Arc::new(store.clone())),
        }
    }

    /// Closes the connections.
    pub async fn close(&self) {
        match self {
            OpenedStore::Sqlite(store) => store.close().await,
            OpenedStore::Postgres(store) => store.close().await,
        }
    }
}

/// The event bus the configuration names: NATS JetStream (`events.nats_url`), shared by
/// replicas and workers, or this process's own.
///
/// # Errors
/// [`BuildError::Config`] when the NATS server cannot be reached or its stream set up.
pub async fn event_bus(
    config: &ServerConfig,
    clock: &dyn Clock,
) -> Result<Arc<dyn EventBus>, BuildError> {
    match &config.events.nats_url {
        Some(url) => {
            let options = arches_bus_nats::NatsBusOptions {
                stream_name: config.events.stream.clone(),
                subject_prefix: config.events.subject_prefix.clone(),
                live_capacity: EVENT_LIVE_CAPACITY,
                ..arches_bus_nats::NatsBusOptions::default()
            };
            let bus = arches_bus_nats::NatsBus::connect(url.expose(), options)
                .await
                .map_err(|e| BuildError::Config(format!("events.nats_url: {e}")))?;
            Ok(Arc::new(bus))
        }
        None => {
            let epoch = u64::try_from(clock.now().as_micros()).unwrap_or_default();
            Ok(Arc::new(InProcessBus::new(
                epoch,
                EVENT_REPLAY_MAX,
                EVENT_LIVE_CAPACITY,
            )))
        }
    }
}

/// This machine's host name (for default scheduler and worker names), `localhost` when
/// unknown.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// The name of this server's scheduler: `workers.scheduler_id`, or `serve@<hostname>` on a
/// shared store; `server:<pid>` on SQLite, which one process owns.
pub fn scheduler_id(config: &ServerConfig) -> String {
    match (&config.workers.scheduler_id, &config.store.database_url) {
        (Some(id), _) => id.clone(),
        (None, Some(_)) => format!("serve@{}", host_name()),
        (None, None) => format!("server:{}", std::process::id()),
    }
}

/// The tools of a server or standalone worker: the built-in ones with the configured
/// policies (`[tools.*]`), and the orgs' registered tools resolved from `store` with their
/// secrets opened by `keyring`.
pub fn tool_registry(
    config: &ServerConfig,
    store: Arc<dyn Store>,
    executors: &arches_tools::Executors,
    keyring: Option<Arc<arches_auth::sealing::Keyring>>,
) -> ToolRegistry {
    let mut tools = arches_tools::builtin_registry_with(executors);
    if !config.tools.shell.enabled {
        tools.unregister("shell");
    }
    let secrets = org_secrets(store.clone(), keyring);
    tools.set_resolver(Arc::new(crate::registry::OrgTools::new(
        store,
        executors.clone(),
        secrets,
    )));
    tools
}

/// The orgs' secrets in `store`, opened by `keyring` (`None`: no master key, so no org has
/// any): what registered tools and the `llm` tool's org settings read.
pub fn org_secrets(
    store: Arc<dyn Store>,
    keyring: Option<Arc<arches_auth::sealing::Keyring>>,
) -> Arc<dyn arches_core::ports::SecretReader> {
    Arc::new(crate::registry::SealedSecrets::new(store, keyring))
}

/// Errors of assembly.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The home directory or a key file could not be created or read.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] arches_store::Error),
    /// A setting is unusable.
    #[error("{0}")]
    Config(String),
}

/// Builds the server from its configuration.
///
/// # Errors
/// [`BuildError`] when the home directory, the store or a key cannot be set up.
pub async fn build(config: ServerConfig, options: BuildOptions) -> Result<Built, BuildError> {
    let home = config.home.clone();
    std::fs::create_dir_all(&home).map_err(|source| BuildError::Io {
        path: home.clone(),
        source,
    })?;
    let clock: Arc<dyn Clock> = match options.clock {
        Some(clock) => Arc::new(ClockAdapter(clock)),
        None => Arc::new(SystemClock),
    };
    let opened = OpenedStore::open(&config).await?;
    let (store, identity) = opened.ports();
    let artifacts = Arc::new(
        LocalArtifactStore::new(&home.join("artifacts"), store.clone())
            .map_err(BuildError::Store)?,
    );
    let bus = event_bus(&config, clock.as_ref()).await?;
    let keyring = config
        .secrets
        .keyring()
        .map_err(|e| BuildError::Config(format!("secrets.keys: {e}")))?
        .map(Arc::new);
    let mut executors =
        arches_tools::Executors::new(config.http_tool_policy(), config.wasm_tool_policy());
    executors = executors.with_org_llm(
        config.llm_tool_policy(),
        org_secrets(store.clone(), keyring.clone()),
    );
    if let Some(search) = crate::search::services(&config, &home, executors.http.clone())? {
        executors = executors.with_search(search);
    }
    let http_tool = executors.http.clone();
    let tools = tool_registry(&config, store.clone(), &executors, keyring.clone());

    // With workers: the engine runs task runs here. Without, on PostgreSQL: the scheduler
    // offers them to standalone workers on the store's task queue. Without, on SQLite: no
    // engine (an API-only process).
    let queue = if config.workers.enabled {
        None
    } else {
        opened.task_queue()
    };
    // On a shared store a scheduler's name is its address: one process per name.
    let scheduler_name = match (&opened, config.workers.enabled || queue.is_some()) {
        (OpenedStore::Postgres(pg), true) => Some(
            pg.lock_scheduler_name(&scheduler_id(&config))
                .await
                .map_err(|e| BuildError::Config(format!("workers.scheduler_id: {e}")))?,
        ),
        _ => None,
    };
    let engine_factory: Option<EngineFactory> = if config.workers.enabled || queue.is_some() {
        let mut engine_options = EngineOptions::new(home.join("work"));
        engine_options.worker_id = scheduler_id(&config);
        match (config.workers.slots, &queue) {
            (Some(slots), _) => engine_options.worker_slots = slots.max(1),
            (None, Some(_)) => engine_options.worker_slots = QUEUE_OFFERS_MAX_DEFAULT,
            (None, None) => {}
        }
        let store = store.clone();
        let artifacts = artifacts.clone();
        let clock = clock.clone();
        let bus = bus.clone();
        let tools = tools.clone();
        let failpoints = options.failpoints.clone();
        Some(Arc::new(move || {
            let mut engine = match &queue {
                Some(queue) => Engine::build_on_queue(
                    engine_options.clone(),
                    store.clone(),
                    queue.clone(),
                    clock.clone(),
                    Some(bus.clone()),
                ),
                None => Engine::build_with_bus(
                    engine_options.clone(),
                    store.clone(),
                    artifacts.clone(),
                    tools.clone(),
                    clock.clone(),
                    Some(bus.clone()),
                ),
            };
            if let Some(failpoints) = &failpoints {
                engine.set_failpoints(failpoints.clone());
            }
            engine
        }))
    } else {
        None
    };
    let engine = engine_factory.as_ref().map(|factory| factory());

    let secret = jwt_secret(&config, &home)?;
    let tokens = TokenIssuer::new(
        &secret,
        config.auth.issuer.clone(),
        config.auth.audience.clone(),
        config.auth.access_ttl_secs,
    )
    .map_err(|e| BuildError::Config(format!("auth.jwt_secret: {e}")))?;
    let hasher = if options.insecure_fast_hashing {
        PasswordHasher::insecure_for_tests()
    } else {
        PasswordHasher::owasp_default().map_err(|e| BuildError::Config(e.to_string()))?
    };
    let mailer: Arc<dyn Mailer> = match &config.smtp {
        None => Arc::new(LogMailer),
        Some(smtp) => {
            let mut mail = MailSmtpConfig::new(smtp.host.clone(), smtp.port, smtp.from.clone());
            mail.username = smtp.username.clone();
            mail.password = smtp.password.as_ref().map(|p| p.expose().to_owned());
            mail.tls = match smtp.tls {
                ConfigTls::None => SmtpTls::None,
                ConfigTls::Starttls => SmtpTls::StartTls,
                ConfigTls::Tls => SmtpTls::Tls,
            };
            Arc::new(SmtpMailer::new(mail).map_err(|e| BuildError::Config(format!("smtp: {e}")))?)
        }
    };
    let metrics = Metrics::new();
    let limiter = Arc::new(RateLimiter::new(&config.rate_limits).with_metrics(metrics.clone()));
    let state = AppState {
        config: Arc::new(config),
        store: store.clone(),
        identity: Arc::new(crate::identity_cache::CachingIdentityStore::new(identity)),
        artifacts,
        bus,
        engine: engine
            .as_ref()
            .map(|engine| EngineSlot::new(engine.handle())),
        tools: Arc::new(tools),
        http_tool,
        executors,
        keyring,
        auth: Arc::new(AuthServices {
            hasher,
            policy: PasswordPolicy::default(),
            tokens,
            throttle: LoginThrottle::new(ThrottleConfig::default()),
            attempts: crate::state::AttemptLocks::default(),
            mailer,
        }),
        limiter: limiter.clone(),
        metrics: metrics.clone(),
        clock,
        lease_expiries_reported: Arc::default(),
    };
    let router = router(state.clone());
    Ok(Built {
        state,
        router,
        engine,
        engine_factory,
        store: opened,
        scheduler_name,
    })
}

/// The API router with the audit middleware, the fallbacks and every layer of
/// [`crate::http::apply_layers`].
pub fn router(state: AppState) -> Router {
    let api = crate::api::router()
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::audit::audit_requests,
        ))
        .with_state(state.clone());
    let api = crate::error::with_api_fallbacks(api);
    crate::http::apply_layers(
        api,
        &state.config,
        state.metrics.clone(),
        state.limiter.clone(),
    )
}

/// The signing key of access tokens: `auth.jwt_secret` when set, else a random 64-byte key
/// kept in `<home>/jwt.key` (created with mode 0600 on first start, so tokens survive
/// restarts).
fn jwt_secret(config: &ServerConfig, home: &Path) -> Result<Vec<u8>, BuildError> {
    if let Some(secret) = &config.auth.jwt_secret {
        return Ok(secret.expose().as_bytes().to_vec());
    }
    let path = home.join("jwt.key");
    let io = |source| BuildError::Io {
        path: path.clone(),
        source,
    };
    match std::fs::read(&path) {
        Ok(bytes) if bytes.len() >= 32 => Ok(bytes),
        Ok(_) => Err(BuildError::Config(format!(
            "{} holds fewer than 32 bytes; delete it to make a new key",
            path.display()
        ))),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let mut key = vec![0u8; 64];
            rand::fill(&mut key[..]);
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(io)?;
            file.write_all(&key).map_err(io)?;
            file.sync_all().map_err(io)?;
            Ok(key)
        }
        Err(error) => Err(io(error)),
    }
}

#[derive(Debug)]
struct ClockAdapter(Arc<dyn ClockDebug>);

impl Clock for ClockAdapter {
    fn now(&self) -> arches_core::Timestamp {
        self.0.now()
    }
}

/// Most runs resumed at start.
pub const RECOVER_RUNS_MAX: usize = 10_000;

/// Offers a scheduler on the task queue keeps outstanding, unless `workers.slots` says.
pub const QUEUE_OFFERS_MAX_DEFAULT: usize = 4_096;

/// Resumes on `engine` the runs a previous server process (or a stopped engine) left queued
/// or running: their interrupted attempts are recorded `lease_expired` and run again,
/// succeeded task runs are kept. Runs owned by a CLI process (`pid:…`) are left to
/// `arches resume`. On a PostgreSQL store only the runs this replica's scheduler owns are
/// resumed, and with standalone workers their leases are kept (offered again, so the
/// workers holding them report to this scheduler). Returns how many runs were resumed.
///
/// Callers make sure no request reaches `engine` until this returns (the first engine
/// before the HTTP server starts, a rebuilt one before its handle enters the
/// [`EngineSlot`]), so the run records read here are not overtaken by a cancel or a finish.
///
/// # Errors
/// The store's error, or [`arches_engine::Error::Stopped`]; a run that cannot be restored
/// or that the engine refuses is logged and skipped.
pub async fn recover_runs(
    state: &AppState,
    engine: &arches_engine::SchedulerHandle,
) -> Result<usize, arches_engine::Error> {
    use arches_core::records::RunFilter;
    use arches_core::RunState;
    // On a shared store, each replica resumes only the runs its scheduler owns; with
    // standalone workers the leases stay with the workers that claimed them.
    let shared = state.config.store.database_url.is_some();
    let queued = shared && !state.config.workers.enabled;
    let me = scheduler_id(&state.config);
    let mut resumed = 0;
    for run_state in [RunState::Running, RunState::Queued] {
        let mut before = None;
        loop {
            let page = state
                .store
                .runs(&RunFilter {
                    state: Some(run_state),
                    before,
                    limit: 500,
                    ..RunFilter::default()
                })
                .await?;
            let Some(last) = page.last() else { break };
            before = Some(last.id);
            for run in page {
                if resumed >= RECOVER_RUNS_MAX {
                    tracing::warn!(
                        max = RECOVER_RUNS_MAX,
                        "more unfinished runs than resumed at start"
                    );
                    return Ok(resumed);
                }
                if run.owner.as_deref().is_some_and(|o| o.starts_with("pid:")) {
                    continue;
                }
                if shared && run.owner.as_deref() != Some(me.as_str()) {
                    continue;
                }
                match arches_engine::restore_run(state.store.as_ref(), run).await {
                    Ok(mut execution) => {
                        if !queued {
                            execution.reclaim_leases(state.clock.now());
                        }
                        match engine.resume(execution).await {
                            Ok(_) => resumed += 1,
                            Err(arches_engine::Error::AlreadyActive(_)) => {}
                            Err(
                                error @ (arches_engine::Error::Stopped
                                | arches_engine::Error::Store(_)),
                            ) => return Err(error),
                            Err(error) => {
                                tracing::error!(%error, "cannot resume run; skipped");
                            }
                        }
                    }
                    Err(arches_engine::Error::Restore { run, reason }) => {
                        tracing::error!(%run, %reason, "cannot resume run");
                    }
                    Err(error) => return Err(error),
                }
            }
        }
    }
    Ok(resumed)
}

/// Runs a built server on `listener` until `shutdown` resolves: the HTTP server stops taking
/// connections and lets requests in flight finish (within `http.shutdown_grace_secs`), then
/// the engine stops — attempts still running are stopped and their leases left to expire,
/// so a restart runs them again — and the store is closed.
///
/// # Errors
/// The HTTP server's I/O error, or the engine's store error.
pub async fn serve(
    built: Built,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let Built {
        state,
        router,
        engine,
        engine_factory,
        store,
        scheduler_name,
    } = built;
    let stop = CancellationToken::new();
    let first_stop = stop.child_token();
    let first_handle = engine.as_ref().map(Engine::handle);
    let engine_task = engine.map(|engine| tokio::spawn(engine.run(first_stop.clone())));
    if let Some(handle) = &first_handle {
        match recover_runs(&state, handle).await {
            Ok(n) => {
                handle.mark_recovered();
                if n > 0 {
                    tracing::info!(runs = n, "resumed runs left unfinished by the last stop");
                }
            }
            Err(error) => {
                // The supervisor rebuilds the engine and tries again.
                tracing::error!(%error, "cannot resume unfinished runs");
                first_stop.cancel();
            }
        }
    }
    let supervisor = engine_task.zip(engine_factory).map(|(task, factory)| {
        tokio::spawn(crate::supervisor::supervise(
            task,
            factory,
            state.clone(),
            stop.clone(),
        ))
    });
    let grace = Duration::from_secs(state.config.http.shutdown_grace_secs);
    let result = crate::http::serve(listener, router, grace, shutdown).await;
    stop.cancel();
    if let Some(supervisor) = supervisor {
        if let Err(error) = supervisor.await {
            tracing::error!(%error, "the engine supervisor failed");
        }
    }
    drop(scheduler_name);
    store.close().await;
    result.map_err(Into::into)
}
