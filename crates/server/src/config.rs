//! Server configuration: one [`ServerConfig`] merged from layered sources.
//!
//! Sources, from lowest to highest precedence:
//!
//! 1. built-in defaults (the `Default` impls below, every field has one);
//! 2. an `arches.toml` file (see [`ServerConfig::documented_example`]);
//! 3. `ARCHES_*` environment variables, nested with `__`
//!    (`ARCHES_AUTH__JWT_SECRET` sets `auth.jwt_secret`, `ARCHES_LISTEN` sets `listen`);
//! 4. command-line flags, passed as [`ConfigOverrides`].
//!
//! Every value is validated after merging; an error names the key and the source that set
//! it (`http.body_limit_bytes: must be > 0 (from environment variable
//! ARCHES_HTTP__BODY_LIMIT_BYTES)`).
//!
//! This module must never log or print a secret: [`Secret`] redacts itself in `Debug`,
//! `Display` and `Serialize`, and its deserializer accepts any scalar so that a type error
//! never echoes the value.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The file read when `arches serve` is given no `--config`: `arches.toml` in the current
/// directory. A missing default file is not an error; a missing explicit file is.
pub const DEFAULT_CONFIG_FILE: &str = "arches.toml";

/// The prefix of the environment variables read by [`ServerConfig::load`].
pub const ENV_PREFIX: &str = "ARCHES_";

/// The separator between nested keys in an environment variable name
/// (`ARCHES_HTTP__BODY_LIMIT_BYTES` is `http.body_limit_bytes`).
pub const ENV_NESTING_SEPARATOR: &str = "__";

/// The minimum length of `auth.jwt_secret`, in bytes: HS256 keys shorter than the 256-bit
/// hash output weaken the MAC (RFC 7518, section 3.2).
pub const JWT_SECRET_MIN_BYTES: usize = 32;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A config file was named explicitly (`--config`) but does not exist.
    #[error("config file {} does not exist", path.display())]
    FileNotFound {
        /// The path that was given.
        path: PathBuf,
    },
    /// A source could not be parsed, or a value has the wrong type or an unknown key; the
    /// message names the key and the source. A TOML syntax error names the line and column
    /// but does not quote the line, which may hold a secret.
    #[error("invalid configuration: {}", without_source_snippets(&.0.to_string()))]
    Parse(Box<figment::Error>),
    /// Values parsed but break a rule; one entry per broken rule.
    #[error("invalid configuration:\n{}", format_invalid(.0))]
    Invalid(Vec<InvalidValue>),
}

/// Drops the quoted source lines of a parser message (`2 | key = value` and the `|` and `^`
/// lines around it).
fn without_source_snippets(message: &str) -> String {
    message
        .lines()
        .filter(|line| {
            let trimmed = line.trim_start();
            let after_number = trimmed.trim_start_matches(|c: char| c.is_ascii_digit());
            !(trimmed.starts_with('|') || after_number.trim_start().starts_with('|'))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn format_invalid(values: &[InvalidValue]) -> String {
    values
        .iter()
        .map(|value| format!("  {value}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl From<figment::Error> for ConfigError {
    fn from(error: figment::Error) -> Self {
        ConfigError::Parse(Box::new(error))
    }
}

/// One value that breaks a validation rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidValue {
    /// The dotted key, e.g. `http.body_limit_bytes`.
    pub key: String,
    /// Where the value came from: `default`, `TOML file arches.toml`,
    /// `environment variable ARCHES_HTTP__BODY_LIMIT_BYTES` or `command-line flag --listen`.
    pub source: String,
    /// What is wrong, lowercase, e.g. `must be > 0`.
    pub message: String,
}

impl fmt::Display for InvalidValue {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "{}: {} (from {})",
            self.key, self.message, self.source
        )
    }
}

/// A secret string (a signing key, a password). `Debug`, `Display` and `Serialize` print
/// `[redacted]`; read the value with [`Secret::expose`] only where it is used.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The text printed in place of the value.
    pub const REDACTED: &'static str = "[redacted]";

    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret value. Never log or print it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(Self::REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(Self::REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(Self::REDACTED)
    }
}

impl<'de> Deserialize<'de> for Secret {
    /// Accepts a string, or an integer, float or boolean (a secret such as `12345` written
    /// without quotes), so that a type error never quotes the secret back.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SecretVisitor;

        impl serde::de::Visitor<'_> for SecretVisitor {
            type Value = Secret;

            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str("a string")
            }

            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Secret, E> {
                Ok(Secret::new(value))
            }

            fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<Secret, E> {
                Ok(Secret::new(value.to_string()))
            }

            fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<Secret, E> {
                Ok(Secret::new(value.to_string()))
            }

            fn visit_f64<E: serde::de::Error>(self, value: f64) -> Result<Secret, E> {
                Ok(Secret::new(value.to_string()))
            }

            fn visit_bool<E: serde::de::Error>(self, value: bool) -> Result<Secret, E> {
                Ok(Secret::new(value.to_string()))
            }
        }

        deserializer.deserialize_any(SecretVisitor)
    }
}

/// The whole server configuration. Every field has a default, so an empty file is valid.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// The socket address the HTTP server binds. Default `127.0.0.1:8080` (loopback only,
    /// so a fresh install is not exposed on the network).
    pub listen: SocketAddr,
    /// The data directory: the SQLite store, local artifacts and keys. Default `.arches`,
    /// relative to the working directory.
    pub home: PathBuf,
    /// The URL users reach the server at, used in emailed links and OAuth redirects; no
    /// trailing slash. Default `http://127.0.0.1:8080`.
    pub public_url: String,
    /// Whether many organizations share this server (sign-up creates an org). Default
    /// `false`: one organization.
    pub multi_tenant: bool,
    /// The in-process worker pool.
    pub workers: WorkerConfig,
    /// Where state is kept: the SQLite file under `home` (the default) or a PostgreSQL
    /// database that several processes share.
    pub store: StoreConfig,
    /// Where live events travel: this process only, or NATS JetStream between replicas and
    /// workers.
    pub events: EventsConfig,
    /// How hard the store flushes before acknowledging a write.
    pub durability: Durability,
    /// Tokens and sessions.
    pub auth: AuthConfig,
    /// HTTP limits, timeouts and CORS.
    pub http: HttpConfig,
    /// Request rate limits per client IP, user and API key.
    pub rate_limits: RateLimitConfig,
    /// Outgoing mail (verification, password reset, invitations); `None` disables mail.
    pub smtp: Option<SmtpConfig>,
    /// Log output.
    pub log: LogConfig,
    /// Settings of built-in tools.
    pub tools: ToolsConfig,
    /// The master keys that seal org secrets at rest.
    pub secrets: SecretsConfig,
    /// Embeddings and the vector and full-text indexes of the search tools and
    /// `/api/v1/search`.
    pub search: SearchConfig,
}

/// Embeddings and search indexes (`[search]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SearchConfig {
    /// Whether the `embed`, `search`, `dedup`, `classify` and `memory` tools and
    /// `/api/v1/search` are offered. Default `true`.
    pub enabled: bool,
    /// The local embedding model's directory (all-MiniLM-L6-v2, as `scripts/fetch-model`
    /// installs it). Default `$ARCHES_MODEL_DIR/all-MiniLM-L6-v2`, else
    /// `~/.cache/arches/models/all-MiniLM-L6-v2`. Loaded on first use; a missing model
    /// fails the task naming the file. Ignored with `embedding_base_url`.
    pub model_dir: Option<PathBuf>,
    /// An OpenAI-compatible embeddings API instead of the local model (for example
    /// `http://127.0.0.1:11434/v1`); its host must be in `[tools.http] allowed_hosts`.
    pub embedding_base_url: Option<String>,
    /// The model at `embedding_base_url`.
    pub embedding_model: Option<String>,
    /// Components of that model's vectors (for example 768).
    pub embedding_dimension: Option<usize>,
    /// The key of `embedding_base_url` (`ARCHES_SEARCH__EMBEDDING_API_KEY`).
    pub embedding_api_key: Option<Secret>,
    /// The vector index's directory. Default `<home>/search/vectors`. The embedded index
    /// belongs to one process: on PostgreSQL with standalone workers, the tools index on the
    /// worker that runs them (see the README).
    pub index_dir: Option<PathBuf>,
}

impl Default for SearchConfig {
    fn default() -> Self {
        SearchConfig {
            enabled: true,
            model_dir: None,
            embedding_base_url: None,
            embedding_model: None,
            embedding_dimension: None,
            embedding_api_key: None,
            index_dir: None,
        }
    }
}

/// The master keys of org secrets (`[secrets]`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecretsConfig {
    /// Master keys as `id:base64` of 32 random bytes (`arches secrets keygen` prints one),
    /// comma-separated from the environment (`ARCHES_SECRETS__KEYS`). The first seals new
    /// values; every listed key opens. To rotate: put a new key first, call
    /// `POST /api/v1/secrets/rotate` (or `arches secrets rotate`), then drop the old key.
    /// Empty (the default): secrets cannot be set or read, and tools naming secrets fail.
    pub keys: Option<Secret>,
}

impl SecretsConfig {
    /// The keyring, `None` without keys.
    ///
    /// # Errors
    /// A malformed key list, naming the key's position (never its bytes).
    pub fn keyring(&self) -> Result<Option<arches_auth::sealing::Keyring>, String> {
        match &self.keys {
            None => Ok(None),
            Some(keys) if keys.expose().trim().is_empty() => Ok(None),
            Some(keys) => arches_auth::sealing::Keyring::parse_list(keys.expose())
                .map(Some)
                .map_err(|error| error.to_string()),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            home: PathBuf::from(".arches"),
            public_url: "http://127.0.0.1:8080".to_owned(),
            multi_tenant: false,
            workers: WorkerConfig::default(),
            store: StoreConfig::default(),
            events: EventsConfig::default(),
            durability: Durability::default(),
            auth: AuthConfig::default(),
            http: HttpConfig::default(),
            rate_limits: RateLimitConfig::default(),
            smtp: None,
            log: LogConfig::default(),
            tools: ToolsConfig::default(),
            secrets: SecretsConfig::default(),
            search: SearchConfig::default(),
        }
    }
}

/// Settings of built-in tools (`[tools]`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ToolsConfig {
    /// The `http` tool (`[tools.http]`).
    pub http: HttpToolConfig,
    /// The `wasm` tool (`[tools.wasm]`).
    pub wasm: WasmToolConfig,
    /// The `shell` tool (`[tools.shell]`).
    pub shell: ShellToolConfig,
    /// The `llm` tool (`[tools.llm]`).
    pub llm: LlmToolConfig,
}

/// The `llm` tool (`[tools.llm]`): the installation's OpenAI-compatible provider (Ollama,
/// vLLM, llama.cpp's server, or a gateway to a hosted one). An org may name its own provider,
/// default model and key in its secrets `LLM_BASE_URL`, `LLM_MODEL` and `LLM_API_KEY`
/// (its base URL's host must be in `[tools.http] allowed_hosts` too); without `base_url` here
/// only orgs that did so can use the `llm` and `agent` tools.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LlmToolConfig {
    /// The provider's base URL up to its API version, for example
    /// `http://127.0.0.1:11434/v1`; its host must also be in `[tools.http] allowed_hosts`.
    pub base_url: Option<String>,
    /// The model when a task names none.
    pub model: Option<String>,
    /// The provider's API key (`ARCHES_TOOLS__LLM__API_KEY`), sent only to `base_url`.
    pub api_key: Option<Secret>,
    /// Whether a task may name another model or base URL (within the allowed hosts; it
    /// gets no key). Default `false` on a server.
    pub allow_override: bool,
    /// Seconds one request may take. Default 120.
    pub timeout_secs: u64,
}

impl Default for LlmToolConfig {
    fn default() -> Self {
        LlmToolConfig {
            base_url: None,
            model: None,
            api_key: None,
            allow_override: false,
            timeout_secs: 120,
        }
    }
}

/// The `shell` tool (`[tools.shell]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShellToolConfig {
    /// Whether pipelines may run shell commands. Default `true`. Commands run as the
    /// server's user (in the process sandbox): turn it off on a server shared by orgs that
    /// do not trust each other, where only the WASM sandbox should run their code.
    pub enabled: bool,
}

impl Default for ShellToolConfig {
    fn default() -> Self {
        ShellToolConfig { enabled: true }
    }
}

/// The `wasm` tool (`[tools.wasm]`): what tasks and registered tools may grant modules.
/// Everything is denied by default; a grant outside these lists fails the task before the
/// module runs (and a registration naming one is refused).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WasmToolConfig {
    /// Absolute worker directories (and what is inside them) modules may be granted read
    /// access to. Comma-separated from the environment.
    #[serde(deserialize_with = "string_or_list")]
    pub read_dirs: Vec<String>,
    /// Absolute worker directories modules may be granted write access to.
    #[serde(deserialize_with = "string_or_list")]
    pub write_dirs: Vec<String>,
    /// Worker environment variables modules may be granted (`allow.env`); `*` for any.
    /// The server's own `ARCHES_*` variables are never granted.
    #[serde(deserialize_with = "string_or_list")]
    pub env: Vec<String>,
    /// Absolute worker directories tasks may load module files from (the built-in `wasm`
    /// tool's `module` input). Empty: none; orgs run their modules as registered tools.
    #[serde(deserialize_with = "string_or_list")]
    pub module_dirs: Vec<String>,
}

/// The `http` tool (`[tools.http]`): where pipelines may send requests, and the per-host
/// circuit breaker and rate limit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpToolConfig {
    /// Host patterns the tool may reach: `host` (any port), `host:port`, `*.suffix`, or `*`
    /// for any host. Default empty: no host, so a server does not reach its own network
    /// (cloud metadata, internal services) until an operator says which hosts are fine. From
    /// the environment, one comma-separated string
    /// (`ARCHES_TOOLS__HTTP__ALLOWED_HOSTS=api.example.com,*.corp.example`).
    #[serde(deserialize_with = "string_or_list")]
    pub allowed_hosts: Vec<String>,
    /// Sustained requests per second to one host (`host:port`). Default 10; 0 turns the
    /// limit off.
    pub per_host_per_sec: u32,
    /// Requests one host may get at once before the sustained rate applies. Default 20.
    pub per_host_burst: u32,
    /// Consecutive failures (connection errors, timeouts, 5xx, 429) that open a host's
    /// circuit. Default 5.
    pub breaker_failures: u32,
    /// Seconds an open circuit refuses requests before one probe is let through. Default 30.
    pub breaker_cool_down_secs: u64,
    /// Time one request may take when the task sets no `timeout`, seconds. Default 30.
    pub timeout_secs: u64,
    /// Largest response body read, bytes. Default 16 MiB.
    pub body_limit_bytes: u64,
    /// A PEM file of certificate authorities trusted for `https` besides the built-in
    /// Mozilla roots and the system's (the `http`, `llm` and `agent` tools and registered
    /// HTTP tools). Default none.
    pub ca_file: Option<PathBuf>,
}

impl Default for HttpToolConfig {
    fn default() -> Self {
        HttpToolConfig {
            allowed_hosts: Vec::new(),
            per_host_per_sec: 10,
            per_host_burst: 20,
            breaker_failures: 5,
            breaker_cool_down_secs: 30,
            timeout_secs: 30,
            body_limit_bytes: 16 * 1024 * 1024,
            ca_file: None,
        }
    }
}

/// The in-process worker pool (`[workers]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Whether this process runs task runs itself. Default `true`. `false` (`--no-workers`)
    /// on a PostgreSQL store: this replica's scheduler offers its task runs on the store's
    /// task queue to standalone workers (`arches worker`); on SQLite: an API-only process
    /// that starts no run.
    pub enabled: bool,
    /// How many task runs execute at once; `None` (the default) means one per CPU core. With
    /// standalone workers: how many offers this scheduler keeps outstanding (default 4,096).
    pub slots: Option<usize>,
    /// This server's scheduler on the task queue: the owner of the runs it drives and the
    /// address of their completions. Must be unique per replica and the same after a
    /// restart (so the restarted replica finds its runs). Default `serve@<hostname>`.
    pub scheduler_id: Option<String>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            enabled: true,
            slots: None,
            scheduler_id: None,
        }
    }
}

/// Live events (`[events]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    /// A NATS server with JetStream (`nats://host:4222`) that carries run, task-run and log
    /// events between API replicas and workers, so a client of any replica sees everything.
    /// None (the default): events stay in this process.
    pub nats_url: Option<Secret>,
    /// The JetStream stream. Default `ARCHES_EVENTS`.
    pub stream: String,
    /// Subjects are `<subject_prefix>.<org id>.<run|task_run|log>`. Default `arches.events`.
    pub subject_prefix: String,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            nats_url: None,
            stream: "ARCHES_EVENTS".to_owned(),
            subject_prefix: "arches.events".to_owned(),
        }
    }
}

/// The store (`[store]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// A PostgreSQL database (`postgres://user:password@host:5432/db`) instead of the SQLite
    /// file under `home`; prefer `ARCHES_STORE__DATABASE_URL` to keep a password out of
    /// files. Artifacts stay under `home`, which every replica and worker must share.
    pub database_url: Option<Secret>,
    /// Most connections of the PostgreSQL pool (each task-queue listener holds one more).
    /// Default 16.
    pub max_connections: u32,
    /// How long a request waits for a PostgreSQL connection before it gets 503, in seconds.
    /// Default 5.
    pub acquire_timeout_secs: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            database_url: None,
            max_connections: 16,
            acquire_timeout_secs: 5,
        }
    }
}

impl StoreConfig {
    /// The PostgreSQL pool bounds.
    pub fn pool(&self) -> arches_store::PgPoolSettings {
        arches_store::PgPoolSettings {
            max_connections: self.max_connections,
            acquire_timeout: std::time::Duration::from_secs(self.acquire_timeout_secs),
        }
    }
}

/// How hard the store flushes before acknowledging a write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Survives a crash of the process; the last transactions may be lost if the machine
    /// loses power (SQLite `synchronous = NORMAL` in WAL mode). The default.
    #[default]
    Normal,
    /// Survives power loss: every commit is flushed to disk (SQLite `synchronous = FULL`).
    Full,
}

/// Tokens and sessions (`[auth]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// The HS256 key that signs access tokens, at least [`JWT_SECRET_MIN_BYTES`] bytes.
    /// `None` (the default) leaves the choice to the auth layer; set it so that tokens
    /// survive restarts and are valid across replicas.
    pub jwt_secret: Option<Secret>,
    /// The `iss` claim of issued tokens. Default `arches`.
    pub issuer: String,
    /// The `aud` claim of issued tokens. Default `arches-api`.
    pub audience: String,
    /// Lifetime of an access token, in seconds. Default 900 (15 minutes).
    pub access_ttl_secs: u64,
    /// Lifetime of a refresh token, in seconds; longer than `access_ttl_secs`. Default
    /// 2,592,000 (30 days).
    pub refresh_ttl_secs: u64,
    /// Whether a user must verify their email address before logging in. Default `false`.
    pub require_email_verification: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            jwt_secret: None,
            issuer: "arches".to_owned(),
            audience: "arches-api".to_owned(),
            access_ttl_secs: 900,
            refresh_ttl_secs: 30 * 24 * 60 * 60,
            require_email_verification: false,
        }
    }
}

/// HTTP limits, timeouts and CORS (`[http]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// The largest request body accepted, in bytes; larger bodies get 413. Default
    /// 10,485,760 (10 MiB).
    pub body_limit_bytes: usize,
    /// How long a handler may take to produce a response, in seconds; then the request gets
    /// 503. Streaming bodies (server-sent events) are not cut once their headers are sent.
    /// Default 60.
    pub request_timeout_secs: u64,
    /// Origins allowed to call the API from a browser, e.g. `https://arches.example.com`.
    /// Empty (the default) turns CORS off. `["*"]` allows any origin, without credentials;
    /// listed origins may send credentials. In an environment variable, a comma-separated
    /// list is accepted.
    #[serde(deserialize_with = "string_or_list")]
    pub cors_allowed_origins: Vec<String>,
    /// How long in-flight requests may finish after SIGINT or SIGTERM, in seconds. Default 30.
    pub shutdown_grace_secs: u64,
    /// Whether to take the client IP from the last `X-Forwarded-For` entry (set by one
    /// trusted reverse proxy) instead of the TCP peer. Default `false`: the header is
    /// client-controlled and would let anyone dodge the per-IP rate limit.
    pub trust_forwarded_for: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            body_limit_bytes: 10 * 1024 * 1024,
            request_timeout_secs: 60,
            cors_allowed_origins: Vec::new(),
            shutdown_grace_secs: 30,
            trust_forwarded_for: false,
        }
    }
}

/// Token-bucket rate limits (`[rate_limits]`). A `*_per_sec` of 0 turns that scope off.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained requests per second per client IP (IPv6: per /64 network). Default 50.
    pub per_ip_per_sec: u32,
    /// Requests a client IP may send at once before the sustained rate applies. Default 100.
    pub per_ip_burst: u32,
    /// Sustained requests per second per authenticated user. Default 20.
    pub per_user_per_sec: u32,
    /// Burst per authenticated user. Default 60.
    pub per_user_burst: u32,
    /// Sustained requests per second per API key. Default 50.
    pub per_api_key_per_sec: u32,
    /// Burst per API key. Default 100.
    pub per_api_key_burst: u32,
    /// The most keys one scope tracks before idle keys are dropped; bounds memory at about
    /// 100 bytes per key. Default 100,000.
    pub keys_max: usize,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            per_ip_per_sec: 50,
            per_ip_burst: 100,
            per_user_per_sec: 20,
            per_user_burst: 60,
            per_api_key_per_sec: 50,
            per_api_key_burst: 100,
            keys_max: 100_000,
        }
    }
}

/// Outgoing mail (`[smtp]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpConfig {
    /// The SMTP server host name. Required.
    pub host: String,
    /// The SMTP server port. Default 587 (submission with STARTTLS).
    #[serde(default = "default_smtp_port")]
    pub port: u16,
    /// The login user name; `None` sends without authentication.
    #[serde(default)]
    pub username: Option<String>,
    /// The login password; requires `username`.
    #[serde(default)]
    pub password: Option<Secret>,
    /// The sender address, e.g. `Arches <arches@example.com>`. Required.
    pub from: String,
    /// How the connection is encrypted.
    #[serde(default)]
    pub tls: SmtpTls,
}

fn default_smtp_port() -> u16 {
    587
}

/// How the SMTP connection is encrypted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SmtpTls {
    /// Plain connection upgraded with STARTTLS (port 587). The default.
    #[default]
    Starttls,
    /// TLS from the first byte (port 465).
    Tls,
    /// No encryption; only for a relay on the same host or a test server.
    None,
}

/// Log output (`[log]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Line format. Default `json`.
    pub format: LogFormat,
    /// A `tracing` filter: a level (`info`) or directives (`info,arches_engine=debug`).
    /// `RUST_LOG`, when set, takes precedence. Default `info`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Json,
            level: "info".to_owned(),
        }
    }
}

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One JSON object per line, for log collectors. The default.
    #[default]
    Json,
    /// Human-readable lines, for a terminal.
    Text,
}

impl LogFormat {
    /// The config spelling: `json` or `text`.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Json => "json",
            LogFormat::Text => "text",
        }
    }
}

/// Values given on the command line; each `Some` wins over every other source.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigOverrides {
    /// `--listen`: sets `listen`.
    pub listen: Option<SocketAddr>,
    /// `--home`: sets `home`.
    pub home: Option<PathBuf>,
    /// `--public-url`: sets `public_url`.
    pub public_url: Option<String>,
    /// `--multi-tenant`: sets `multi_tenant`.
    pub multi_tenant: Option<bool>,
    /// `--no-workers` (as `Some(false)`): sets `workers.enabled`.
    pub workers_enabled: Option<bool>,
    /// `--worker-slots`: sets `workers.slots`.
    pub worker_slots: Option<usize>,
    /// `--log-format`: sets `log.format`.
    pub log_format: Option<LogFormat>,
    /// `--log-level`: sets `log.level`.
    pub log_level: Option<String>,
    /// `--database-url`: sets `store.database_url`.
    pub database_url: Option<String>,
}

impl ConfigOverrides {
    /// The set values as `(dotted key, flag name, value)`.
    fn entries(&self) -> Vec<(&'static str, &'static str, Value)> {
        [
            (
                "listen",
                "--listen",
                self.listen.map(|address| Value::from(address.to_string())),
            ),
            (
                "home",
                "--home",
                // Config values are UTF-8 text, as in the file and the environment.
                self.home
                    .as_ref()
                    .map(|home| Value::from(home.to_string_lossy().into_owned())),
            ),
            (
                "public_url",
                "--public-url",
                self.public_url.clone().map(Value::from),
            ),
            (
                "multi_tenant",
                "--multi-tenant",
                self.multi_tenant.map(Value::from),
            ),
            (
                "workers.enabled",
                "--no-workers",
                self.workers_enabled.map(Value::from),
            ),
            (
                "workers.slots",
                "--worker-slots",
                self.worker_slots.map(Value::from),
            ),
            (
                "log.format",
                "--log-format",
                self.log_format.map(|format| Value::from(format.as_str())),
            ),
            (
                "log.level",
                "--log-level",
                self.log_level.clone().map(Value::from),
            ),
            (
                "store.database_url",
                "--database-url",
                self.database_url.clone().map(Value::from),
            ),
        ]
        .into_iter()
        .filter_map(|(key, flag, value)| Some((key, flag, value?)))
        .collect()
    }
}

impl Provider for ConfigOverrides {
    fn metadata(&self) -> Metadata {
        let flags: BTreeMap<&'static str, &'static str> = self
            .entries()
            .into_iter()
            .map(|(key, flag, _)| (key, flag))
            .collect();
        Metadata::named("command-line flag").interpolater(move |_profile, keys| {
            let key = keys.join(".");
            flags
                .get(key.as_str())
                .map_or(key, |flag| (*flag).to_owned())
        })
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        for (key, _flag, value) in self.entries() {
            merge_nested(&mut dict, key, value);
        }
        Ok(Profile::Default.collect(dict))
    }
}

/// `ARCHES_*` variables as a figment provider. The variables are passed in, not read here,
/// so tests never depend on the process environment.
#[derive(Clone, Debug, Default)]
pub struct EnvVars {
    vars: Vec<(String, String)>,
}

impl EnvVars {
    /// The `ARCHES_*` variables of this process.
    pub fn from_process() -> Self {
        Self::from_pairs(std::env::vars_os().filter_map(|(name, value)| {
            // Variables that are not valid UTF-8 cannot be ours; skip them silently.
            Some((name.into_string().ok()?, value.into_string().ok()?))
        }))
    }

    /// The `ARCHES_*` variables among `pairs` (name, value); other names are ignored.
    pub fn from_pairs<N, V>(pairs: impl IntoIterator<Item = (N, V)>) -> Self
    where
        N: Into<String>,
        V: Into<String>,
    {
        let vars = pairs
            .into_iter()
            .map(|(name, value)| (name.into(), value.into()))
            .filter(|(name, _)| env_key(name).is_some())
            .collect();
        EnvVars { vars }
    }
}

/// The dotted config key of an environment variable, or `None` if the variable is not one
/// of ours. Variables whose first segment is not a top-level key (such as `ARCHES_TOKEN`,
/// read by the CLI client) are ignored rather than rejected as unknown keys, and so is
/// `ARCHES_LOG` itself (the CLI's log filter; the server's settings are `ARCHES_LOG__LEVEL`
/// and `ARCHES_LOG__FORMAT`), so that `ARCHES_LOG=info arches worker` works.
fn env_key(name: &str) -> Option<String> {
    let rest = name
        .get(..ENV_PREFIX.len())
        .filter(|prefix| prefix.eq_ignore_ascii_case(ENV_PREFIX))
        .map(|_| &name[ENV_PREFIX.len()..])?;
    let key = rest
        .split(ENV_NESTING_SEPARATOR)
        .map(str::to_ascii_lowercase)
        .collect::<Vec<_>>()
        .join(".");
    let top_level = key.split('.').next().unwrap_or_default();
    (TOP_LEVEL_KEYS.contains(&top_level) && key != "log").then_some(key)
}

/// The top-level keys of [`ServerConfig`]; a test checks this list against the struct.
const TOP_LEVEL_KEYS: &[&str] = &[
    "listen",
    "home",
    "public_url",
    "multi_tenant",
    "workers",
    "store",
    "events",
    "durability",
    "auth",
    "http",
    "rate_limits",
    "smtp",
    "log",
    "tools",
    "secrets",
    "search",
];

impl Provider for EnvVars {
    fn metadata(&self) -> Metadata {
        Metadata::named("environment variable").interpolater(|_profile, keys| {
            format!(
                "{ENV_PREFIX}{}",
                keys.join(ENV_NESTING_SEPARATOR).to_ascii_uppercase()
            )
        })
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        for (name, raw) in &self.vars {
            let Some(key) = env_key(name) else { continue };
            // Values stay strings (numbers and booleans are converted while extracting), so a
            // secret such as `007` keeps its leading zero; only an explicit `[..]` or `{..}`
            // is parsed as a structure.
            let trimmed = raw.trim();
            let value = if trimmed.starts_with('[') || trimmed.starts_with('{') {
                trimmed
                    .parse::<Value>()
                    .unwrap_or_else(|never| match never {})
            } else {
                Value::from(raw.clone())
            };
            merge_nested(&mut dict, &key, value);
        }
        Ok(Profile::Default.collect(dict))
    }
}

/// Inserts `value` at the dotted `key` of `dict`, merging with dictionaries already there.
fn merge_nested(dict: &mut Dict, key: &str, value: Value) {
    match key.split_once('.') {
        None => {
            dict.insert(key.to_owned(), value);
        }
        Some((head, rest)) => {
            let entry = dict
                .entry(head.to_owned())
                .or_insert_with(|| Value::from(Dict::new()));
            if !matches!(entry, Value::Dict(..)) {
                *entry = Value::from(Dict::new());
            }
            if let Value::Dict(_, inner) = entry {
                merge_nested(inner, rest, value);
            }
        }
    }
}

/// Accepts a list of strings or one comma-separated string (handy in an environment
/// variable).
fn string_or_list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum StringOrList {
        One(String),
        Many(Vec<String>),
    }
    Ok(match StringOrList::deserialize(deserializer)? {
        StringOrList::One(text) => text
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(str::to_owned)
            .collect(),
        StringOrList::Many(items) => items,
    })
}

impl ServerConfig {
    /// Loads the configuration: defaults, then `file` (or [`DEFAULT_CONFIG_FILE`] when
    /// `None`, skipped if missing), then this process's `ARCHES_*` variables, then
    /// `overrides`; and validates it.
    ///
    /// # Errors
    ///
    /// [`ConfigError::FileNotFound`] if `file` is given and missing, [`ConfigError::Parse`]
    /// for syntax, type and unknown-key errors, [`ConfigError::Invalid`] for rule breaks.
    pub fn load(file: Option<&Path>, overrides: ConfigOverrides) -> Result<Self, ConfigError> {
        Self::load_from(Self::figment(file, EnvVars::from_process(), overrides)?)
    }

    /// The layered sources that [`ServerConfig::load`] reads, with the environment passed
    /// in. Use it with [`ServerConfig::load_from`] to load from a chosen environment.
    ///
    /// # Errors
    ///
    /// [`ConfigError::FileNotFound`] if `file` is given and missing.
    pub fn figment(
        file: Option<&Path>,
        env: EnvVars,
        overrides: ConfigOverrides,
    ) -> Result<Figment, ConfigError> {
        let mut figment = Figment::new();
        match file {
            Some(path) if !path.exists() => {
                return Err(ConfigError::FileNotFound {
                    path: path.to_owned(),
                })
            }
            Some(path) => figment = figment.merge(Toml::file_exact(path)),
            None => {
                let path = Path::new(DEFAULT_CONFIG_FILE);
                if path.exists() {
                    figment = figment.merge(Toml::file_exact(path));
                }
            }
        }
        Ok(figment.merge(env).merge(overrides))
    }

    /// Extracts and validates a configuration from any figment (fields it lacks take their
    /// defaults). Strings are converted to numbers and booleans where a field needs one.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Parse`] or [`ConfigError::Invalid`], as for [`ServerConfig::load`].
    pub fn load_from(figment: Figment) -> Result<Self, ConfigError> {
        let config: ServerConfig = figment.extract_lossy()?;
        let problems = config.problems();
        if problems.is_empty() {
            return Ok(config);
        }
        Err(ConfigError::Invalid(
            problems
                .into_iter()
                .map(|(key, message)| InvalidValue {
                    source: source_of(&figment, &key),
                    key,
                    message,
                })
                .collect(),
        ))
    }

    /// Every broken rule as `(dotted key, message)`.
    fn problems(&self) -> Vec<(String, String)> {
        let mut problems: Vec<(String, String)> = Vec::new();
        let mut check = |ok: bool, key: &str, message: &str| {
            if !ok {
                problems.push((key.to_owned(), message.to_owned()));
            }
        };

        check(
            !self.home.as_os_str().is_empty(),
            "home",
            "must not be empty",
        );
        check(
            valid_base_url(&self.public_url),
            "public_url",
            "must be an http:// or https:// URL without a trailing slash",
        );
        check(
            self.workers.slots != Some(0),
            "workers.slots",
            "must be > 0",
        );
        check(
            self.workers.scheduler_id.as_deref().is_none_or(|id| {
                !id.trim().is_empty() && id.len() <= 200 && !id.starts_with("pid:")
            }),
            "workers.scheduler_id",
            "must be 1 to 200 characters, not starting with `pid:` (the CLI's own names)",
        );
        check(
            self.events.nats_url.as_ref().is_none_or(|url| {
                url.expose().starts_with("nats://") || url.expose().starts_with("tls://")
            }),
            "events.nats_url",
            "must be a nats:// URL",
        );
        check(
            !self.events.stream.is_empty()
                && self
                    .events
                    .stream
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
            "events.stream",
            "must be letters, digits, `_` or `-`",
        );
        check(
            !self.events.subject_prefix.is_empty()
                && !self.events.subject_prefix.contains(['*', '>', ' ']),
            "events.subject_prefix",
            "must be a NATS subject without wildcards or spaces",
        );
        if let Some(path) = &self.tools.http.ca_file {
            if let Err(error) = std::fs::read(path) {
                check(
                    false,
                    "tools.http.ca_file",
                    &format!("cannot read {}: {error}", path.display()),
                );
            }
        }
        for problem in self.llm_tool_policy().problems() {
            check(false, "tools.llm", &problem);
        }
        check(
            self.store.max_connections > 0,
            "store.max_connections",
            "must be > 0",
        );
        check(
            (1..=600).contains(&self.store.acquire_timeout_secs),
            "store.acquire_timeout_secs",
            "must be between 1 and 600",
        );
        check(
            self.store.database_url.as_ref().is_none_or(|url| {
                let url = url.expose();
                url.starts_with("postgres://") || url.starts_with("postgresql://")
            }),
            "store.database_url",
            "must be a postgres:// URL",
        );

        let auth = &self.auth;
        if let Some(secret) = &auth.jwt_secret {
            check(
                secret.expose().len() >= JWT_SECRET_MIN_BYTES,
                "auth.jwt_secret",
                "must be at least 32 bytes",
            );
        }
        check(
            !auth.issuer.trim().is_empty(),
            "auth.issuer",
            "must not be empty",
        );
        check(
            !auth.audience.trim().is_empty(),
            "auth.audience",
            "must not be empty",
        );
        check(
            auth.access_ttl_secs > 0,
            "auth.access_ttl_secs",
            "must be > 0",
        );
        check(
            auth.refresh_ttl_secs > auth.access_ttl_secs,
            "auth.refresh_ttl_secs",
            "must be > auth.access_ttl_secs",
        );

        let http = &self.http;
        check(
            http.body_limit_bytes > 0,
            "http.body_limit_bytes",
            "must be > 0",
        );
        check(
            http.request_timeout_secs > 0,
            "http.request_timeout_secs",
            "must be > 0",
        );
        let origins = &http.cors_allowed_origins;
        if origins.iter().any(|origin| origin == "*") {
            check(
                origins.len() == 1,
                "http.cors_allowed_origins",
                "\"*\" must be the only entry",
            );
        } else {
            for origin in origins {
                check(
                    valid_origin(origin),
                    "http.cors_allowed_origins",
                    &format!("{origin:?} is not an origin like https://arches.example.com"),
                );
            }
        }

        let limits = &self.rate_limits;
        for (scope, per_sec, burst) in [
            ("ip", limits.per_ip_per_sec, limits.per_ip_burst),
            ("user", limits.per_user_per_sec, limits.per_user_burst),
            (
                "api_key",
                limits.per_api_key_per_sec,
                limits.per_api_key_burst,
            ),
        ] {
            check(
                per_sec == 0 || burst > 0,
                &format!("rate_limits.per_{scope}_burst"),
                "must be > 0 when the rate is on",
            );
        }
        check(limits.keys_max > 0, "rate_limits.keys_max", "must be > 0");

        if let Some(smtp) = &self.smtp {
            check(
                !smtp.host.trim().is_empty(),
                "smtp.host",
                "must not be empty",
            );
            check(smtp.port > 0, "smtp.port", "must be > 0");
            check(
                smtp.from.contains('@'),
                "smtp.from",
                "must be an email address",
            );
            check(
                smtp.password.is_none() || smtp.username.is_some(),
                "smtp.password",
                "requires smtp.username",
            );
        }

        check(
            tracing_subscriber::EnvFilter::try_new(&self.log.level).is_ok(),
            "log.level",
            "must be a level (error, warn, info, debug, trace) or tracing filter directives",
        );

        let http = &self.tools.http;
        check(
            http.per_host_per_sec == 0 || http.per_host_burst > 0,
            "tools.http.per_host_burst",
            "must be > 0 when the rate is on",
        );
        check(
            http.breaker_failures > 0,
            "tools.http.breaker_failures",
            "must be > 0",
        );
        check(
            http.timeout_secs > 0,
            "tools.http.timeout_secs",
            "must be > 0",
        );
        check(
            http.body_limit_bytes > 0,
            "tools.http.body_limit_bytes",
            "must be > 0",
        );
        for problem in self.http_tool_policy().problems() {
            let key = if problem.starts_with("root certificate") {
                "tools.http.ca_file"
            } else {
                "tools.http.allowed_hosts"
            };
            check(false, key, &problem);
        }
        for problem in self.wasm_tool_policy().problems() {
            check(false, "tools.wasm", &problem);
        }
        if let Err(problem) = self.secrets.keyring() {
            check(false, "secrets.keys", &problem);
        }
        problems
    }

    /// The `wasm` tool's policy from `[tools.wasm]`.
    pub fn wasm_tool_policy(&self) -> arches_tools::WasmPolicy {
        let wasm = &self.tools.wasm;
        arches_tools::WasmPolicy {
            read_dirs: wasm.read_dirs.iter().map(PathBuf::from).collect(),
            write_dirs: wasm.write_dirs.iter().map(PathBuf::from).collect(),
            env: wasm.env.clone(),
            module_dirs: wasm.module_dirs.iter().map(PathBuf::from).collect(),
        }
    }

    /// The `llm` tool's policy: the installation's provider from `[tools.llm]` (none without
    /// `base_url`; orgs may then name their own in their secrets).
    pub fn llm_tool_policy(&self) -> arches_tools::LlmPolicy {
        let llm = &self.tools.llm;
        let mut policy = arches_tools::LlmPolicy {
            base_url: llm.base_url.clone(),
            model: llm.model.clone(),
            api_key: llm
                .api_key
                .as_ref()
                .map(|key| arches_tools::ApiKey::new(key.expose())),
            allow_override: llm.allow_override,
            ..arches_tools::LlmPolicy::default()
        };
        policy.timeout = std::time::Duration::from_secs(llm.timeout_secs.max(1));
        policy
    }

    /// The `http` tool's policy from `[tools.http]`.
    pub fn http_tool_policy(&self) -> arches_tools::http::HttpPolicy {
        use std::num::NonZeroU32;
        let http = &self.tools.http;
        let mut policy = arches_tools::http::HttpPolicy::allowing(http.allowed_hosts.clone());
        policy.rate_limit = NonZeroU32::new(http.per_host_per_sec).map(|per_second| {
            arches_tools::http::RateLimit {
                per_second,
                burst: NonZeroU32::new(http.per_host_burst).unwrap_or(NonZeroU32::MIN),
            }
        });
        policy.breaker = arches_tools::http::BreakerSettings {
            failure_threshold: http.breaker_failures.max(1),
            cool_down: std::time::Duration::from_secs(http.breaker_cool_down_secs),
        };
        policy.default_timeout = std::time::Duration::from_secs(http.timeout_secs.max(1));
        policy.max_body_bytes = http.body_limit_bytes.max(1);
        // An unreadable file is reported by `validate`.
        policy.root_certificates = http
            .ca_file
            .as_ref()
            .and_then(|path| std::fs::read(path).ok())
            .into_iter()
            .collect();
        policy
    }

    /// A complete, commented `arches.toml` with every key at its default; it parses to
    /// `ServerConfig::default()` (a test checks this).
    pub fn documented_example() -> &'static str {
        DOCUMENTED_EXAMPLE
    }
}

/// Names the source of `key`: the provider that set it, or `default`.
fn source_of(figment: &Figment, key: &str) -> String {
    let Some(metadata) = figment.find_metadata(key) else {
        return "default".to_owned();
    };
    let keys: Vec<&str> = key.split('.').collect();
    match &metadata.source {
        Some(source) => format!("{} {source}", metadata.name),
        None => format!(
            "{} {}",
            metadata.name,
            metadata.interpolate(&Profile::Default, &keys)
        ),
    }
}

fn valid_base_url(url: &str) -> bool {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    matches!(rest, Some(rest) if !rest.is_empty() && !rest.starts_with('/'))
        && !url.ends_with('/')
        && !url.chars().any(char::is_whitespace)
}

/// An origin is `scheme://host[:port]`: no path, no trailing slash (RFC 6454, section 6.2).
fn valid_origin(origin: &str) -> bool {
    let Some(authority) = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
    else {
        return false;
    };
    !authority.is_empty()
        && !authority.contains(['/', '?', '#', '@'])
        && authority.is_ascii()
        && !authority
            .chars()
            .any(|c| c.is_ascii_whitespace() || c.is_ascii_control())
}

const DOCUMENTED_EXAMPLE: &str = r#"# arches.toml: configuration of `arches serve`.
#
# Every key is optional; the values below are the defaults. Precedence, lowest first:
# defaults, this file, ARCHES_* environment variables (nested keys joined with `__`, e.g.
# ARCHES_HTTP__BODY_LIMIT_BYTES=1048576 or ARCHES_AUTH__JWT_SECRET=...), command-line flags.

# Socket address the HTTP server binds. Loopback only by default; use 0.0.0.0:8080 to
# accept connections from other machines.
listen = "127.0.0.1:8080"

# Data directory: the SQLite store, local artifacts and keys.
home = ".arches"

# URL users reach the server at (used in emailed links and OAuth redirects); no trailing
# slash.
public_url = "http://127.0.0.1:8080"

# Whether many organizations share this server.
multi_tenant = false

# How hard the store flushes before acknowledging a write: "normal" survives a process
# crash, "full" also survives power loss (slower).
durability = "normal"

[workers]
# Run task runs in this process. false: with a PostgreSQL store, offer them to standalone
# workers (`arches worker`); with SQLite, an API-only process.
enabled = true
# Task runs executing at once; leave unset for one per CPU core.
# slots = 4
# This replica's scheduler name on the task queue: unique per replica, stable across
# restarts. Default serve@<hostname>.
# scheduler_id = "serve@api-1"

[events]
# A NATS server with JetStream carrying live events between replicas and workers; unset:
# events stay in this process.
# nats_url = "nats://127.0.0.1:4222"
stream = "ARCHES_EVENTS"
subject_prefix = "arches.events"

[store]
# A PostgreSQL database shared by replicas and workers, instead of the SQLite file under
# home. Prefer ARCHES_STORE__DATABASE_URL to keep a password out of files.
# database_url = "postgres://arches@db:5432/arches"
# Most connections of the PostgreSQL pool.
max_connections = 16
# Seconds a request waits for a connection before it gets 503.
acquire_timeout_secs = 5

[auth]
# HS256 key signing access tokens, at least 32 bytes. Prefer the environment variable
# ARCHES_AUTH__JWT_SECRET to keep it out of files. Set it so that tokens survive restarts.
# jwt_secret = "change-me-to-32-or-more-random-bytes"
# `iss` and `aud` claims of issued tokens.
issuer = "arches"
audience = "arches-api"
# Access token lifetime, seconds (15 minutes).
access_ttl_secs = 900
# Refresh token lifetime, seconds (30 days).
refresh_ttl_secs = 2592000
# Require a verified email address before login.
require_email_verification = false

[http]
# Largest request body, bytes (10 MiB); larger bodies get 413.
body_limit_bytes = 10485760
# Time a handler may take to respond, seconds; then 503.
request_timeout_secs = 60
# Browser origins allowed by CORS. Empty: CORS off. ["*"]: any origin, without
# credentials. Listed origins may send credentials.
cors_allowed_origins = []
# Time in-flight requests get to finish after SIGINT/SIGTERM, seconds.
shutdown_grace_secs = 30
# Take the client IP from the last X-Forwarded-For entry. Only behind one trusted reverse
# proxy: the header is otherwise client-controlled.
trust_forwarded_for = false

[rate_limits]
# Token buckets: sustained requests per second and burst size, per client IP (IPv6: per
# /64), per user and per API key. A rate of 0 turns that scope off.
per_ip_per_sec = 50
per_ip_burst = 100
per_user_per_sec = 20
per_user_burst = 60
per_api_key_per_sec = 50
per_api_key_burst = 100
# Most keys tracked per scope before idle ones are dropped (about 100 bytes each).
keys_max = 100000

# Outgoing mail (email verification, password reset, invitations). Without this section
# no mail is sent.
# [smtp]
# host = "smtp.example.com"
# port = 587
# username = "arches"
# password = "..."            # or ARCHES_SMTP__PASSWORD
# from = "Arches <arches@example.com>"
# tls = "starttls"            # "starttls" (587), "tls" (465) or "none"

[log]
# "json" (one object per line) or "text" (for a terminal).
format = "json"
# Level or tracing filter directives, e.g. "info,arches_engine=debug". RUST_LOG wins.
level = "info"

[tools.http]
# Hosts the `http` tool may reach: "host" (any port), "host:port", "*.suffix", or "*" for
# any. Empty: none (the server reaches nothing on its network until you list hosts).
allowed_hosts = []
# Per-host token bucket: sustained requests per second (0: off) and burst.
per_host_per_sec = 10
per_host_burst = 20
# Circuit breaker per host: consecutive failures that open it, and seconds it stays open
# before one probe request is let through.
breaker_failures = 5
breaker_cool_down_secs = 30
# Time one request may take when the task sets no timeout, seconds.
timeout_secs = 30
# Largest response body read, bytes (16 MiB).
body_limit_bytes = 16777216
# A PEM file of extra certificate authorities for https (besides the built-in Mozilla roots
# and the system's), e.g. an internal CA in front of a self-hosted model.
# ca_file = "/etc/arches/internal-ca.pem"

[tools.wasm]
# What tasks and registered tools may grant WASM modules; nothing by default. Absolute
# worker directories (and their contents) for read and for write access, and worker
# environment variables ("*" for any; ARCHES_* never).
read_dirs = []
write_dirs = []
env = []
# Directories the built-in `wasm` tool may load module files from (orgs run their own
# modules as registered tools, stored as artifacts).
module_dirs = []

[tools.shell]
# Whether pipelines may run shell commands. They run as the server's user (in the process
# sandbox): turn this off on a server shared by orgs that do not trust each other.
enabled = true

[tools.llm]
# The installation's OpenAI-compatible provider for the `llm` and `agent` tools; its host
# must be in [tools.http] allowed_hosts. An org may use its own instead, named in its
# secrets LLM_BASE_URL, LLM_MODEL and LLM_API_KEY; unset here, only such orgs have one.
# base_url = "http://127.0.0.1:11434/v1"
# model = "llama3.2"
# Prefer ARCHES_TOOLS__LLM__API_KEY for the key.
# Whether tasks may name another model or base URL.
allow_override = false
# Seconds one request may take.
timeout_secs = 120

[secrets]
# Master keys sealing org secrets at rest (XChaCha20-Poly1305), "id:base64" of 32 random
# bytes, e.g. from `arches secrets keygen`; better from ARCHES_SECRETS__KEYS. The first
# seals, all open (rotation: new key first, `arches secrets rotate`, drop the old one).
# Without keys, secrets cannot be set. The form: keys set to "k2:<base64>,k1:<base64>".

[search]
# The embed, search, dedup, classify and memory tools and /api/v1/search.
enabled = true
# The local embedding model (scripts/fetch-model installs it); default
# $ARCHES_MODEL_DIR/all-MiniLM-L6-v2, else ~/.cache/arches/models/all-MiniLM-L6-v2.
# model_dir = "/var/lib/arches/models/all-MiniLM-L6-v2"
# Or an OpenAI-compatible embeddings API (its host in [tools.http] allowed_hosts):
# embedding_base_url = "http://127.0.0.1:11434/v1"
# embedding_model = "nomic-embed-text"
# embedding_dimension = 768
# Prefer ARCHES_SEARCH__EMBEDDING_API_KEY for its key.
# The vector index's directory; default <home>/search/vectors.
# index_dir = "/var/lib/arches/search/vectors"
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn load(
        toml: &str,
        env: &[(&str, &str)],
        overrides: ConfigOverrides,
    ) -> Result<ServerConfig, ConfigError> {
        let figment = Figment::new()
            .merge(Toml::string(toml))
            .merge(EnvVars::from_pairs(env.iter().copied()))
            .merge(overrides);
        ServerConfig::load_from(figment)
    }

    fn invalid(result: Result<ServerConfig, ConfigError>) -> Vec<InvalidValue> {
        match result {
            Err(ConfigError::Invalid(values)) => values,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn an_empty_configuration_gives_the_documented_defaults() {
        let config = load("", &[], ConfigOverrides::default()).expect("defaults are valid");
        assert_eq!(config, ServerConfig::default());
        assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.http.body_limit_bytes, 10 * 1024 * 1024);
        assert_eq!(config.auth.refresh_ttl_secs, 2_592_000);
        assert_eq!(config.log.format, LogFormat::Json);
    }

    #[test]
    fn the_documented_example_parses_to_the_defaults() {
        let config = load(
            ServerConfig::documented_example(),
            &[],
            ConfigOverrides::default(),
        )
        .expect("the example is valid");
        assert_eq!(config, ServerConfig::default());
    }

    #[test]
    fn the_documented_example_with_its_commented_keys_enabled_still_parses() {
        let uncommented = ServerConfig::documented_example()
            .lines()
            .map(|line| {
                // `ca_file` names a file that must exist, which a test machine lacks.
                line.strip_prefix("# ")
                    .filter(|rest| rest.starts_with('[') || rest.contains(" = "))
                    .filter(|rest| !rest.starts_with("ca_file"))
                    .unwrap_or(line)
            })
            .collect::<Vec<_>>()
            .join("\n");
        let config = load(&uncommented, &[], ConfigOverrides::default())
            .expect("the commented keys are valid");
        assert_eq!(config.workers.slots, Some(4));
        let smtp = config.smtp.expect("the smtp section is parsed");
        assert_eq!(smtp.tls, SmtpTls::Starttls);
        assert_eq!(smtp.port, 587);
    }

    #[test]
    fn later_sources_win_over_earlier_ones() {
        let toml =
            "listen = \"0.0.0.0:9000\"\nhome = \"/from/file\"\n[http]\nbody_limit_bytes = 1000\n";
        let env = [
            ("ARCHES_HOME", "/from/env"),
            ("ARCHES_HTTP__BODY_LIMIT_BYTES", "2000"),
            ("ARCHES_PUBLIC_URL", "https://arches.example.com"),
        ];
        let overrides = ConfigOverrides {
            public_url: Some("https://flag.example.com".to_owned()),
            worker_slots: Some(3),
            log_format: Some(LogFormat::Text),
            ..ConfigOverrides::default()
        };
        let config = load(toml, &env, overrides).expect("valid");
        assert_eq!(config.log.format, LogFormat::Text);
        assert_eq!(config.listen.to_string(), "0.0.0.0:9000");
        assert_eq!(config.home, PathBuf::from("/from/env"));
        assert_eq!(config.http.body_limit_bytes, 2000);
        assert_eq!(config.public_url, "https://flag.example.com");
        assert_eq!(config.workers.slots, Some(3));
    }

    #[test]
    fn environment_variables_nest_with_double_underscores_and_convert_types() {
        let env = [
            (
                "ARCHES_AUTH__JWT_SECRET",
                "0123456789abcdef0123456789abcdef",
            ),
            ("ARCHES_MULTI_TENANT", "true"),
            ("ARCHES_WORKERS__SLOTS", "8"),
            (
                "ARCHES_HTTP__CORS_ALLOWED_ORIGINS",
                "https://a.example.com, https://b.example.com",
            ),
            ("ARCHES_LOG__FORMAT", "text"),
            ("ARCHES_SMTP__HOST", "smtp.example.com"),
            ("ARCHES_SMTP__FROM", "arches@example.com"),
            ("ARCHES_SMTP__PASSWORD", "007"),
            ("ARCHES_SMTP__USERNAME", "arches"),
            // Not one of ours: read by the CLI client, so it must not be an unknown key.
            ("ARCHES_TOKEN", "abc"),
            ("HOME", "/root"),
        ];
        let config = load("", &env, ConfigOverrides::default()).expect("valid");
        let secret = config.auth.jwt_secret.as_ref().expect("secret set");
        assert_eq!(secret.expose(), "0123456789abcdef0123456789abcdef");
        assert!(config.multi_tenant);
        assert_eq!(config.workers.slots, Some(8));
        assert_eq!(
            config.http.cors_allowed_origins,
            vec!["https://a.example.com", "https://b.example.com"]
        );
        assert_eq!(config.log.format, LogFormat::Text);
        let smtp = config.smtp.expect("smtp set from the environment");
        assert_eq!(smtp.password.expect("password").expose(), "007");
    }

    #[test]
    fn the_http_tool_hosts_come_from_the_environment_and_bad_patterns_are_named() {
        let env = [(
            "ARCHES_TOOLS__HTTP__ALLOWED_HOSTS",
            "api.example.com, *.corp.example:8443",
        )];
        let config = load("", &env, ConfigOverrides::default()).expect("valid");
        assert_eq!(
            config.tools.http.allowed_hosts,
            vec!["api.example.com", "*.corp.example:8443"]
        );
        assert_eq!(
            config.http_tool_policy().allowed_hosts,
            config.tools.http.allowed_hosts
        );

        let values = invalid(load(
            "[tools.http]\nallowed_hosts = [\"http://with-a-scheme\"]\nbreaker_failures = 0",
            &[],
            ConfigOverrides::default(),
        ));
        let keys: Vec<&str> = values.iter().map(|v| v.key.as_str()).collect();
        assert!(keys.contains(&"tools.http.allowed_hosts"), "{values:?}");
        assert!(keys.contains(&"tools.http.breaker_failures"), "{values:?}");
    }

    #[test]
    fn master_keys_and_wasm_grants_are_read_from_the_environment_and_checked() {
        let (_, key1) = arches_auth::sealing::MasterKey::generate("k1").unwrap();
        let (_, key2) = arches_auth::sealing::MasterKey::generate("k2").unwrap();
        let keys = format!("{key2},{key1}");
        let env = [
            ("ARCHES_SECRETS__KEYS", keys.as_str()),
            ("ARCHES_TOOLS__WASM__READ_DIRS", "/srv/data, /opt/models"),
            ("ARCHES_TOOLS__WASM__ENV", "LANG"),
        ];
        let config = load("", &env, ConfigOverrides::default()).expect("valid");
        let keyring = config.secrets.keyring().unwrap().expect("a keyring");
        assert_eq!(keyring.active_key_id(), "k2");
        assert_eq!(keyring.key_ids().collect::<Vec<_>>(), ["k2", "k1"]);
        let policy = config.wasm_tool_policy();
        assert_eq!(
            policy.read_dirs,
            [PathBuf::from("/srv/data"), PathBuf::from("/opt/models")]
        );
        assert!(policy.write_dirs.is_empty());
        assert_eq!(policy.env, ["LANG"]);
        // Without keys: no keyring; the default policy grants nothing.
        let defaults = load("", &[], ConfigOverrides::default()).expect("valid");
        assert!(defaults.secrets.keyring().unwrap().is_none());
        assert_eq!(
            defaults.wasm_tool_policy(),
            arches_tools::WasmPolicy::deny_all()
        );

        // A malformed key is named by position, never quoted; a relative directory is named.
        let broken = format!("{key1},k2:not-base64!");
        let values = invalid(load(
            "[tools.wasm]\nwrite_dirs = [\"scratch\"]",
            &[("ARCHES_SECRETS__KEYS", broken.as_str())],
            ConfigOverrides::default(),
        ));
        let keys: Vec<&str> = values.iter().map(|v| v.key.as_str()).collect();
        assert!(keys.contains(&"secrets.keys"), "{values:?}");
        assert!(keys.contains(&"tools.wasm"), "{values:?}");
        let shown = format!("{values:?}");
        assert!(shown.contains("master key 2 is malformed"), "{shown}");
        assert!(!shown.contains("not-base64"), "{shown}");
        assert!(!shown.contains(&key1[3..]), "{shown}");
    }

    #[test]
    fn secrets_never_appear_in_debug_display_or_serialized_output() {
        let secret_text = "s3cr3t-s3cr3t-s3cr3t-s3cr3t-s3cr3t-42";
        let env = [
            ("ARCHES_AUTH__JWT_SECRET", secret_text),
            ("ARCHES_SMTP__HOST", "smtp.example.com"),
            ("ARCHES_SMTP__FROM", "arches@example.com"),
            ("ARCHES_SMTP__USERNAME", "arches"),
            ("ARCHES_SMTP__PASSWORD", secret_text),
        ];
        let config = load("", &env, ConfigOverrides::default()).expect("valid");
        let debug = format!("{config:?}");
        let pretty = format!("{config:#?}");
        let json = serde_json::to_string(&config).expect("serializable");
        for output in [&debug, &pretty, &json] {
            assert!(!output.contains(secret_text), "secret leaked: {output}");
            assert!(output.contains(Secret::REDACTED));
        }
        assert_eq!(Secret::new(secret_text).to_string(), Secret::REDACTED);
    }

    #[test]
    fn an_unquoted_numeric_secret_is_accepted_and_never_echoed() {
        let errors = invalid(load(
            "[auth]\njwt_secret = 1234567890123456789\n",
            &[],
            ConfigOverrides::default(),
        ));
        let text = errors[0].to_string();
        assert!(
            text.starts_with("auth.jwt_secret: must be at least 32 bytes"),
            "{text}"
        );
        assert!(!text.contains("1234567890123456789"), "{text}");
    }

    #[test]
    fn a_toml_syntax_error_does_not_quote_the_offending_line() {
        let error = load(
            "[auth]\njwt_secret = hunter2-unquoted-secret\n",
            &[],
            ConfigOverrides::default(),
        )
        .expect_err("a bare word is not TOML");
        let text = error.to_string();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("line 2"), "{text}");
    }

    #[test]
    fn a_rule_break_names_the_key_and_the_environment_variable_that_set_it() {
        let errors = invalid(load(
            "",
            &[("ARCHES_HTTP__BODY_LIMIT_BYTES", "0")],
            ConfigOverrides::default(),
        ));
        assert_eq!(errors.len(), 1);
        assert_eq!(
            errors[0].to_string(),
            "http.body_limit_bytes: must be > 0 (from environment variable ARCHES_HTTP__BODY_LIMIT_BYTES)"
        );
    }

    #[test]
    fn a_rule_break_names_the_file_and_the_flag_that_set_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("arches.toml");
        std::fs::write(&path, "[http]\nrequest_timeout_secs = 0\n").expect("write");
        let overrides = ConfigOverrides {
            worker_slots: Some(0),
            ..ConfigOverrides::default()
        };
        let figment = ServerConfig::figment(Some(&path), EnvVars::default(), overrides)
            .expect("the file exists");
        let errors = invalid(ServerConfig::load_from(figment));
        let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(messages.len(), 2, "{messages:?}");
        assert_eq!(
            messages[0],
            "workers.slots: must be > 0 (from command-line flag --worker-slots)"
        );
        assert!(
            messages[1].starts_with("http.request_timeout_secs: must be > 0 (from TOML file "),
            "{}",
            messages[1]
        );
        assert!(messages[1].contains("arches.toml"), "{}", messages[1]);
    }

    #[test]
    fn validation_reports_every_broken_rule_at_once() {
        let toml = r#"
            public_url = "ftp://example.com/"
            [auth]
            jwt_secret = "short"
            access_ttl_secs = 100
            refresh_ttl_secs = 100
            [http]
            cors_allowed_origins = ["*", "https://a.example.com"]
            [rate_limits]
            per_user_burst = 0
            [smtp]
            host = "smtp.example.com"
            from = "not-an-address"
            password = "p"
            [log]
            level = "loud=="
        "#;
        let keys: Vec<String> = invalid(load(toml, &[], ConfigOverrides::default()))
            .into_iter()
            .map(|value| value.key)
            .collect();
        assert_eq!(
            keys,
            [
                "public_url",
                "auth.jwt_secret",
                "auth.refresh_ttl_secs",
                "http.cors_allowed_origins",
                "rate_limits.per_user_burst",
                "smtp.from",
                "smtp.password",
                "log.level",
            ]
        );
    }

    #[test]
    fn a_short_secret_error_does_not_print_the_secret() {
        let errors = invalid(load(
            "",
            &[("ARCHES_AUTH__JWT_SECRET", "hunter2")],
            ConfigOverrides::default(),
        ));
        let text = errors[0].to_string();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("ARCHES_AUTH__JWT_SECRET"), "{text}");
    }

    #[test]
    fn cors_origins_must_be_bare_origins() {
        for bad in [
            "https://a.example.com/",
            "a.example.com",
            "https://a.example.com/app",
        ] {
            let toml = format!("[http]\ncors_allowed_origins = [{bad:?}]\n");
            let errors = invalid(load(&toml, &[], ConfigOverrides::default()));
            assert_eq!(errors[0].key, "http.cors_allowed_origins", "{bad}");
        }
        let ok = "[http]\ncors_allowed_origins = [\"http://localhost:5173\", \"https://a.example.com\"]\n";
        load(ok, &[], ConfigOverrides::default()).expect("bare origins are valid");
    }

    #[test]
    fn type_errors_and_unknown_keys_name_the_key_and_the_source() {
        let error = load(
            "",
            &[("ARCHES_HTTP__BODY_LIMIT_BYTES", "lots")],
            ConfigOverrides::default(),
        )
        .expect_err("not a number");
        let text = error.to_string();
        assert!(text.contains("ARCHES_HTTP__BODY_LIMIT_BYTES"), "{text}");

        let error = load(
            "[http]\nbody_limt_bytes = 1\n",
            &[],
            ConfigOverrides::default(),
        )
        .expect_err("a typo is an unknown key");
        let text = error.to_string();
        assert!(text.contains("body_limt_bytes"), "{text}");

        let error = load(
            "durability = \"sometimes\"\n",
            &[],
            ConfigOverrides::default(),
        )
        .expect_err("not a variant");
        assert!(error.to_string().contains("sometimes"), "{error}");
    }

    #[test]
    fn an_explicit_missing_file_is_an_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("missing.toml");
        let error =
            ServerConfig::figment(Some(&path), EnvVars::default(), ConfigOverrides::default())
                .expect_err("missing file");
        assert!(matches!(error, ConfigError::FileNotFound { .. }));
        assert!(error.to_string().contains("missing.toml"));
    }

    #[test]
    fn the_top_level_key_list_matches_the_struct() {
        let value = serde_json::to_value(ServerConfig::default()).expect("serializable");
        let mut keys: Vec<&str> = value
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        let mut expected = TOP_LEVEL_KEYS.to_vec();
        keys.sort_unstable();
        expected.sort_unstable();
        assert_eq!(keys, expected);
    }
}
