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
use arches_engine::{EventBus, SchedulerHandle};

use crate::config::ServerConfig;
use crate::metrics::Metrics;
use crate::ratelimit::RateLimiter;

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
    /// (`--no-workers`), which refuses to start runs with 503.
    pub engine: Option<SchedulerHandle>,
    /// Names and checks of the tools known to this server, for validation.
    pub tools: Arc<ToolRegistry>,
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
    /// Outgoing mail (verification, reset, invitations).
    pub mailer: Arc<dyn Mailer>,
}
