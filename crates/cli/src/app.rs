//! Opening the local home (store, artifacts, tools) and the commands that need no store.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use arches_core::pipeline::graph::{self, GraphFormat};
use arches_core::pipeline::{validate, Diagnostic, Pipeline};
use arches_core::ports::{ArtifactStore, Store, TaskQueue, ToolRegistry};
use arches_core::records::Durability;
use arches_store::{LocalArtifactStore, PgStore, SqliteStore};

/// Largest pipeline file read, in bytes.
const PIPELINE_FILE_BYTES_MAX: u64 = 4 << 20;

/// The data directory and how to open it.
pub struct Home {
    /// The directory.
    pub root: PathBuf,
    /// The store's durability mode.
    pub durability: Durability,
    /// A PostgreSQL store instead of the home's SQLite file.
    pub database_url: Option<String>,
}

/// An opened home.
pub struct Opened {
    pub store: Arc<dyn Store>,
    pub artifacts: Arc<dyn ArtifactStore>,
    /// The shared task queue, when the store is PostgreSQL.
    pub queue: Option<Arc<dyn TaskQueue>>,
}

impl Home {
    pub fn new(root: PathBuf, durability: Durability, database_url: Option<String>) -> Self {
        let root = std::path::absolute(&root).unwrap_or(root);
        Self {
            root,
            durability,
            database_url,
        }
    }

    /// Where the store is, for messages (never the URL, which may hold a password).
    pub fn store_name(&self) -> String {
        match &self.database_url {
            Some(_) => "PostgreSQL (--database-url)".to_owned(),
            None => self.root.display().to_string(),
        }
    }

    pub fn work_root(&self) -> PathBuf {
        self.root.join("work")
    }

    /// Opens (creating if needed) the store and the artifact store.
    pub async fn open(&self) -> anyhow::Result<Opened> {
        std::fs::create_dir_all(&self.root)
            .with_context(|| format!("cannot create home directory {}", self.root.display()))?;
        let (store, queue): (Arc<dyn Store>, Option<Arc<dyn TaskQueue>>) = match &self.database_url
        {
            Some(url) => {
                let pg = Arc::new(
                    PgStore::connect(url, self.durability)
                        .await
                        .context("cannot open the PostgreSQL store")?,
                );
                (pg.clone(), Some(pg))
            }
            None => {
                let db = self.root.join("arches.db");
                let store = SqliteStore::open(&db, self.durability)
                    .await
                    .with_context(|| format!("cannot open store {}", db.display()))?;
                (Arc::new(store), None)
            }
        };
        let artifacts: Arc<dyn ArtifactStore> = Arc::new(
            LocalArtifactStore::new(&self.root.join("artifacts"), store.clone())
                .context("cannot open the artifact store")?,
        );
        Ok(Opened {
            store,
            artifacts,
            queue,
        })
    }

    /// Opens an existing home; refuses to create one (for inspection commands).
    pub async fn open_existing(&self) -> anyhow::Result<Opened> {
        if self.database_url.is_none() && !self.root.join("arches.db").exists() {
            anyhow::bail!(
                "no Arches store in {} (run a pipeline first, or point --home / ARCHES_HOME at one)",
                self.root.display()
            );
        }
        self.open().await
    }
}

/// The tools this binary knows, for validation and listings: the search tools point at
/// the default home, which nothing here opens (they open their indexes on first use).
pub fn registry() -> ToolRegistry {
    registry_at(Path::new(".arches"), None)
}

/// The tools of a local run in `root`: the built-in ones (the `llm` tool from
/// `ARCHES_LLM_*`), with the search tools over the home's indexes (`<root>/search`) and the
/// local embedding model, opened on first use.
pub fn registry_at(root: &Path, database_url: Option<&str>) -> ToolRegistry {
    let mut executors = arches_tools::Executors::new(
        arches_tools::HttpPolicy::allow_all(),
        arches_tools::WasmPolicy::allow_all(),
    )
    .with_llm(arches_tools::LlmPolicy::from_env());
    match search_services(root, database_url, executors.http.clone()) {
        Ok(Some(services)) => executors = executors.with_search(services),
        Ok(None) => {}
        Err(error) => tracing::warn!(error = %error, "the search tools are unavailable"),
    }
    arches_tools::builtin_registry_with(&executors)
}

/// The search services of a local home (see `arches_server::search::services`).
pub fn search_services(
    root: &Path,
    database_url: Option<&str>,
    http: Arc<arches_tools::HttpTool>,
) -> anyhow::Result<Option<Arc<arches_tools::search::SearchServices>>> {
    let mut config = arches_server::config::ServerConfig {
        home: root.to_path_buf(),
        ..Default::default()
    };
    config.store.database_url =
        database_url.map(|url| arches_server::config::Secret::new(url.to_owned()));
    Ok(arches_server::search::services(&config, root, http)?)
}

/// Reads a pipeline file with a size bound.
pub fn read_pipeline_file(file: &Path) -> anyhow::Result<String> {
    let meta = std::fs::metadata(file)
        .with_context(|| format!("cannot read pipeline file {}", file.display()))?;
    if meta.len() > PIPELINE_FILE_BYTES_MAX {
        anyhow::bail!(
            "pipeline file {} is {} bytes, above the limit of {PIPELINE_FILE_BYTES_MAX}",
            file.display(),
            meta.len()
        );
    }
    let bytes = std::fs::read(file)
        .with_context(|| format!("cannot read pipeline file {}", file.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "pipeline file {} is not UTF-8 (byte {})",
            file.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

/// Reads and validates a pipeline, or prints every problem.
pub fn load_pipeline(
    file: &Path,
    registry: &ToolRegistry,
) -> anyhow::Result<Result<Pipeline, Vec<Diagnostic>>> {
    let text = read_pipeline_file(file)?;
    Ok(validate::validate(
        &file.display().to_string(),
        &text,
        registry,
    ))
}

pub fn print_diagnostics(diagnostics: &[Diagnostic]) {
    for diagnostic in diagnostics {
        status!("{diagnostic}");
    }
    status!(
        "{} problem{} found",
        diagnostics.len(),
        if diagnostics.len() == 1 { "" } else { "s" }
    );
}

pub fn validate_command(file: &Path) -> anyhow::Result<ExitCode> {
    match load_pipeline(file, &registry())? {
        Ok(pipeline) => {
            out!(
                "{}: pipeline {} is valid ({} tasks)",
                file.display(),
                pipeline.def.name,
                pipeline.def.tasks.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(diagnostics) => {
            print_diagnostics(&diagnostics);
            Ok(ExitCode::from(2))
        }
    }
}

pub fn graph_command(file: &Path, format: &str) -> anyhow::Result<ExitCode> {
    let format: GraphFormat = format.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    match load_pipeline(file, &registry())? {
        Ok(pipeline) => {
            out_raw!("{}", graph::render(&pipeline, format));
            Ok(ExitCode::SUCCESS)
        }
        Err(diagnostics) => {
            print_diagnostics(&diagnostics);
            Ok(ExitCode::from(2))
        }
    }
}

/// `arches migrate`: applies the embedded migrations to the SQLite store under the home, or
/// to the PostgreSQL database of `--database-url`, and prints the schema version.
pub async fn migrate(home: &Home) -> anyhow::Result<ExitCode> {
    match home.database_url.as_deref() {
        Some(url) => {
            let store = arches_store::PgStore::connect(url, home.durability)
                .await
                .context("cannot migrate the PostgreSQL database")?;
            let version = store.schema_version().await?;
            out!(
                "PostgreSQL database {}: migrations applied, schema version {version}",
                store.database()
            );
            store.close().await;
        }
        None => {
            std::fs::create_dir_all(&home.root)
                .with_context(|| format!("cannot create home directory {}", home.root.display()))?;
            let db = home.root.join("arches.db");
            let store = SqliteStore::open(&db, home.durability)
                .await
                .with_context(|| format!("cannot migrate store {}", db.display()))?;
            let version = store.schema_version().await?;
            out!(
                "SQLite store {}: migrations applied, schema version {version}",
                db.display()
            );
            store.close().await;
        }
    }
    Ok(ExitCode::SUCCESS)
}
