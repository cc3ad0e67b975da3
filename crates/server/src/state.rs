//! The state every handler shares: the ports (stores, event bus, engine), the auth
//! services, the limiter, the metrics and the configuration.

use std::sync::Arc;

use arches_auth::jwt::TokenIssuer;
use arches_auth::mail::Mailer;
use arches_auth::password::{PasswordHasher, PasswordPolicy};
use arches_auth::throttle::LoginThrottle;
use arches_core::identity::IdentityStore;
use arches_core::ports::{ArtifactStore, Store, ToolRegistry};
use arches_core::Clock;
use arches_engine::EventBus;

use crate::config::ServerConfig;
use crate::metrics::Metrics;
use crate::ratelimit::RateLimiter;
use crate::supervisor::EngineSlot;

/// What handlers share. Cheap to clone (everything is behind an `Arc`).
#[derive(Clone)]
pub struct AppState {
    /// The merged configuration.
    pub config: Arc<ServerConfig>,
    /// Pipelines, runs, task runs, logs and artifact metadata.
    pub store: Arc<dyn Store>,
    /// Users, orgs, sessions, API keys, invitations and the audit trail.
    pub identity: Arc<dyn IdentityStore>,
    /// Artifact contents.
    pub artifacts: Arc<dyn ArtifactStore>,
    /// Live events.
    pub bus: Arc<dyn EventBus>,
    /// The engine driving runs in this process; `None` for an API-only replica
    /// (`--no-workers`), which refuses to start runs with 503. The supervisor replaces the
    /// handle when it rebuilds the engine after a store failure.
    pub engine: Option<EngineSlot>,
    /// Names and checks of the tools known to this server, for validation.
    pub tools: Arc<ToolRegistry>,
    /// The `http` tool every engine of this server uses (one circuit breaker and rate limit
    /// per host, kept across engine rebuilds), for its metrics.
    pub http_tool: Arc<arches_tools::HttpTool>,
    /// The `http` and `wasm` tools the org's registered tools run on (checked against when a
    /// tool is registered).
    pub executors: arches_tools::Executors,
    /// The master keys of org secrets; `None` when none is configured.
    pub keyring: Option<Arc<arches_auth::sealing::Keyring>>,
    /// Auth services.
    pub auth: Arc<AuthServices>,
    /// Per-IP, per-user and per-key request limits.
    pub limiter: Arc<RateLimiter>,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Lease expiries already added to the `arches_lease_expiries_total` counter (the
    /// store's count of attempts that ended `lease_expired` is the source).
    pub lease_expiries_reported: Arc<std::sync::atomic::AtomicU64>,
}

/// The authentication services.
pub struct AuthServices {
    /// Argon2id password hashing.
    pub hasher: PasswordHasher,
    /// Password rules.
    pub policy: PasswordPolicy,
    /// Access tokens.
    pub tokens: TokenIssuer,
    /// Login throttling.
    pub throttle: LoginThrottle,
    /// Sign-in attempts for one account key run one at a time (see [`AttemptLocks`]).
    pub attempts: AttemptLocks,
    /// Outgoing mail (verification, reset, invitations).
    pub mailer: Arc<dyn Mailer>,
}

/// Serializes sign-in attempts per account key, so that the throttle's check sees every
/// earlier attempt's outcome: without it, N parallel guesses would all pass the check before
/// any failure is counted. Keys are spread over [`AttemptLocks::STRIPES`] async mutexes by
/// hash (two accounts sharing a stripe only wait for each other; a password check costs tens
/// of milliseconds, so the stripes never bound throughput below what the CPU does anyway).
pub struct AttemptLocks {
    stripes: Vec<tokio::sync::Mutex<()>>,
}

impl AttemptLocks {
    /// Number of stripes.
    pub const STRIPES: usize = 256;

    /// The lock of `account_key`'s stripe.
    pub fn of(&self, account_key: &str) -> &tokio::sync::Mutex<()> {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        account_key.hash(&mut hasher);
        let index = (hasher.finish() % Self::STRIPES as u64) as usize;
        &self.stripes[index]
    }
}

impl Default for AttemptLocks {
    fn default() -> Self {
        AttemptLocks {
            stripes: (0..Self::STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        }
    }
}
