//! # arches-server
//!
//! The Arches server (`arches serve`): the HTTP API over the engine. This crate is the only
//! one that knows HTTP and JSON wire types; the domain crates know neither.
//!
//! This part is the cross-cutting foundation the API routes plug into:
//!
//! - [`config`]: [`config::ServerConfig`], merged from defaults, `arches.toml`,
//!   `ARCHES_*` environment variables and command-line flags, then validated.
//! - [`error`]: the one error shape `{code, message, details}`, [`error::ApiError`], and
//!   extractors whose rejections have that shape.
//! - [`telemetry`]: logging setup, request ids and W3C trace context.
//! - [`metrics`]: Prometheus metrics in a per-app registry.
//! - [`ratelimit`]: keyed token buckets per client IP, user and API key.
//! - [`http`]: the layer stack ([`http::apply_layers`]), graceful shutdown and serving.
//!
//! A route author builds a `Router` whose handlers return `Result<_, ApiError>` and take
//! [`error::ApiJson`], [`error::ApiPath`] and [`error::ApiQuery`], then calls
//! [`error::with_api_fallbacks`], [`http::apply_layers`] and [`http::serve`].

pub mod api;
pub mod app;
pub mod audit;
pub mod config;
pub mod error;
pub mod http;
pub mod identity_cache;
pub mod metrics;
pub mod principal;
pub mod ratelimit;
pub mod registry;
pub mod search;
pub mod state;
pub mod supervisor;
pub mod telemetry;
pub mod worker;
