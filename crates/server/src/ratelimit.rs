//! Keyed token-bucket rate limits for three scopes: client IP, user and API key.
//!
//! Buckets are GCRA cells from `governor` (one per key, about 100 bytes). Memory is bounded
//! by `rate_limits.keys_max` per scope: past it, keys whose bucket is full again are
//! dropped, and if that frees less than a tenth of the room (a flood of distinct keys), the
//! scope starts afresh. Failing open for a moment is preferred over refusing every new
//! client.
//!
//! The per-IP limit runs as the [`limit_per_ip`] middleware; the user and API key scopes
//! are checked by the auth layer once it knows who is calling. This module never sleeps:
//! the clock is injectable ([`LimiterClock::Manual`]) so tests step time.

use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, FakeRelativeClock};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::DashMapStateStore;
use governor::Quota;

use crate::config::RateLimitConfig;
use crate::error::ApiError;
use crate::http::ClientIp;
use crate::metrics::Metrics;

/// Who a request is counted against.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RateScope {
    /// A client IP address. IPv6 addresses are counted per /64 network, since one host
    /// usually holds a whole /64; IPv4-mapped IPv6 addresses count as their IPv4 address.
    Ip(IpAddr),
    /// An authenticated user, by id.
    User(String),
    /// An API key, by key id (never the secret).
    ApiKey(String),
}

impl RateScope {
    /// The scope name used in errors and metrics: `ip`, `user` or `api_key`.
    pub fn name(&self) -> &'static str {
        match self {
            RateScope::Ip(_) => "ip",
            RateScope::User(_) => "user",
            RateScope::ApiKey(_) => "api_key",
        }
    }
}

/// A refused request: the bucket of `scope` is empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("rate limit exceeded for {scope}; retry after {retry_after_secs} s")]
pub struct RateLimited {
    /// The scope name: `ip`, `user` or `api_key`.
    pub scope: &'static str,
    /// Whole seconds until one request would be allowed, rounded up, at least 1.
    pub retry_after_secs: u64,
}

impl From<RateLimited> for ApiError {
    /// 429 `rate_limited` with `Retry-After` and `details.scope`.
    fn from(limited: RateLimited) -> Self {
        ApiError::rate_limited(limited.retry_after_secs).with_detail("scope", limited.scope)
    }
}

impl IntoResponse for RateLimited {
    fn into_response(self) -> Response {
        ApiError::from(self).into_response()
    }
}

/// A clock you can drive by hand, for tests.
#[derive(Clone, Debug, Default)]
pub struct ManualClock(FakeRelativeClock);

impl ManualClock {
    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.0.advance(by);
    }
}

/// The clock a [`RateLimiter`] reads.
#[derive(Clone, Debug)]
pub enum LimiterClock {
    /// Real monotonic time, counted from `start`.
    Monotonic {
        /// The instant that reads as zero.
        start: Instant,
    },
    /// Time that moves only when [`ManualClock::advance`] is called.
    Manual(ManualClock),
}

impl LimiterClock {
    /// Real monotonic time from now.
    pub fn monotonic() -> Self {
        LimiterClock::Monotonic {
            start: Instant::now(),
        }
    }
}

impl Clock for LimiterClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        match self {
            LimiterClock::Monotonic { start } => Nanos::from(start.elapsed()),
            LimiterClock::Manual(clock) => clock.0.now(),
        }
    }
}

type KeyedLimiter<K> =
    governor::RateLimiter<K, DashMapStateStore<K>, LimiterClock, NoOpMiddleware<Nanos>>;

/// The buckets of one scope. `None` when the scope is off (a rate of 0).
#[derive(Debug)]
struct ScopeBuckets<K: Hash + Eq + Clone> {
    quota: Quota,
    limiter: RwLock<Arc<KeyedLimiter<K>>>,
    compacting: Mutex<()>,
}

impl<K: Hash + Eq + Clone> ScopeBuckets<K> {
    fn new(per_sec: u32, burst: u32, clock: &LimiterClock) -> Option<Self> {
        let per_sec = NonZeroU32::new(per_sec)?;
        debug_assert!(burst > 0, "validated: burst > 0 when the rate is on");
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::per_second(per_sec).allow_burst(burst);
        Some(ScopeBuckets {
            quota,
            limiter: RwLock::new(Arc::new(KeyedLimiter::new(
                quota,
                DashMapStateStore::default(),
                clock.clone(),
            ))),
            compacting: Mutex::new(()),
        })
    }

    fn current(&self) -> Arc<KeyedLimiter<K>> {
        // A poisoned lock only means a panic elsewhere while swapping an Arc; the Arc is
        // still whole.
        self.limiter
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// `Err(wait)` when the bucket of `key` is empty.
    fn check(&self, key: &K, clock: &LimiterClock, keys_max: usize) -> Result<(), Duration> {
        let limiter = self.current();
        let result = limiter
            .check_key(key)
            .map_err(|not_until| not_until.wait_time_from(clock.now()));
        if limiter.len() > keys_max {
            self.compact(&limiter, clock, keys_max);
        }
        result
    }

    fn compact(&self, limiter: &Arc<KeyedLimiter<K>>, clock: &LimiterClock, keys_max: usize) {
        // One thread compacts; the others go on counting.
        let Ok(_guard) = self.compacting.try_lock() else {
            return;
        };
        limiter.retain_recent();
        limiter.shrink_to_fit();
        let kept = limiter.len();
        if kept > keys_max - keys_max / 10 {
            tracing::warn!(
                keys = kept,
                keys_max,
                "rate limit keys still over budget after dropping idle ones; starting afresh"
            );
            let fresh = Arc::new(KeyedLimiter::new(
                self.quota,
                DashMapStateStore::default(),
                clock.clone(),
            ));
            *self
                .limiter
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = fresh;
        }
    }

    fn len(&self) -> usize {
        self.current().len()
    }
}

/// Rate limits for the three scopes, from [`RateLimitConfig`]. Share it as
/// `Arc<RateLimiter>`.
#[derive(Debug)]
pub struct RateLimiter {
    ip: Option<ScopeBuckets<IpAddr>>,
    user: Option<ScopeBuckets<String>>,
    api_key: Option<ScopeBuckets<String>>,
    keys_max: usize,
    clock: LimiterClock,
    metrics: Option<Metrics>,
    warned_without_client_ip: AtomicBool,
}

impl RateLimiter {
    /// A limiter on real time.
    pub fn new(config: &RateLimitConfig) -> Self {
        Self::with_clock(config, LimiterClock::monotonic())
    }

    /// A limiter on `clock` (use [`LimiterClock::Manual`] in tests).
    pub fn with_clock(config: &RateLimitConfig, clock: LimiterClock) -> Self {
        debug_assert!(config.keys_max > 0, "validated: keys_max > 0");
        RateLimiter {
            ip: ScopeBuckets::new(config.per_ip_per_sec, config.per_ip_burst, &clock),
            user: ScopeBuckets::new(config.per_user_per_sec, config.per_user_burst, &clock),
            api_key: ScopeBuckets::new(
                config.per_api_key_per_sec,
                config.per_api_key_burst,
                &clock,
            ),
            keys_max: config.keys_max.max(1),
            clock,
            metrics: None,
            warned_without_client_ip: AtomicBool::new(false),
        }
    }

    /// Counts refusals in `arches_rate_limited_total{scope}`.
    #[must_use]
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Takes one token from the bucket of `scope`.
    ///
    /// # Errors
    ///
    /// [`RateLimited`] when the bucket is empty; nothing is taken then.
    pub fn check(&self, scope: &RateScope) -> Result<(), RateLimited> {
        let result = match scope {
            RateScope::Ip(ip) => self.ip.as_ref().map_or(Ok(()), |buckets| {
                buckets.check(&ip_key(*ip), &self.clock, self.keys_max)
            }),
            RateScope::User(id) => self.user.as_ref().map_or(Ok(()), |buckets| {
                buckets.check(id, &self.clock, self.keys_max)
            }),
            RateScope::ApiKey(id) => self.api_key.as_ref().map_or(Ok(()), |buckets| {
                buckets.check(id, &self.clock, self.keys_max)
            }),
        };
        result.map_err(|wait| {
            if let Some(metrics) = &self.metrics {
                metrics.inc_rate_limited(scope.name());
            }
            RateLimited {
                scope: scope.name(),
                retry_after_secs: retry_after_secs(wait),
            }
        })
    }

    /// Drops keys whose bucket is full again, in every scope. Checks do this on their own
    /// past `keys_max`; call it periodically to give memory back sooner.
    pub fn retain_recent(&self) {
        if let Some(buckets) = &self.ip {
            buckets.current().retain_recent();
        }
        if let Some(buckets) = &self.user {
            buckets.current().retain_recent();
        }
        if let Some(buckets) = &self.api_key {
            buckets.current().retain_recent();
        }
    }

    /// The number of keys tracked per scope, as `(ip, user, api_key)`.
    pub fn key_counts(&self) -> (usize, usize, usize) {
        (
            self.ip.as_ref().map_or(0, ScopeBuckets::len),
            self.user.as_ref().map_or(0, ScopeBuckets::len),
            self.api_key.as_ref().map_or(0, ScopeBuckets::len),
        )
    }
}

/// The key an IP is counted under: IPv4 as is, IPv4-mapped IPv6 as IPv4, other IPv6 by
/// its /64 prefix.
fn ip_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
    }
}

/// Whole seconds, rounded up, at least 1 (a `Retry-After: 0` would invite a retry storm).
fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

/// Middleware: refuses a request with 429 `rate_limited` (and `Retry-After`) when its
/// client IP's bucket is empty. The IP is the [`ClientIp`] extension set by
/// [`crate::http::resolve_client_ip`], else the TCP peer from `ConnectInfo`; with neither
/// (the server was not started with connect info) the request passes and a warning is
/// logged once.
pub async fn limit_per_ip(
    State(limiter): State<Arc<RateLimiter>>,
    request: Request,
    next: Next,
) -> Response {
    let ip = request
        .extensions()
        .get::<ClientIp>()
        .map(|client| client.0)
        .or_else(|| {
            request
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map(|info| info.0.ip())
        });
    match ip {
        Some(ip) => {
            if let Err(limited) = limiter.check(&RateScope::Ip(ip)) {
                return limited.into_response();
            }
        }
        None => {
            if !limiter
                .warned_without_client_ip
                .swap(true, Ordering::Relaxed)
            {
                tracing::warn!(
                    "no client IP on the request (serve with connect info); per-IP rate limit skipped"
                );
            }
        }
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{header, StatusCode};
    use axum::routing::get;
    use axum::Router;
    use tower::ServiceExt;

    fn tiny_config() -> RateLimitConfig {
        RateLimitConfig {
            per_ip_per_sec: 1,
            per_ip_burst: 2,
            per_user_per_sec: 1,
            per_user_burst: 1,
            per_api_key_per_sec: 0,
            per_api_key_burst: 0,
            keys_max: 1000,
        }
    }

    fn manual_limiter(config: &RateLimitConfig) -> (RateLimiter, ManualClock) {
        let clock = ManualClock::default();
        let limiter = RateLimiter::with_clock(config, LimiterClock::Manual(clock.clone()));
        (limiter, clock)
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("an IP")
    }

    #[test]
    fn a_burst_is_allowed_then_refused_until_a_token_returns() {
        let (limiter, clock) = manual_limiter(&tiny_config());
        let scope = RateScope::Ip(ip("192.0.2.1"));
        assert!(limiter.check(&scope).is_ok());
        assert!(limiter.check(&scope).is_ok());
        let refused = limiter.check(&scope).expect_err("burst of 2 spent");
        assert_eq!(
            refused,
            RateLimited {
                scope: "ip",
                retry_after_secs: 1
            }
        );
        clock.advance(Duration::from_millis(999));
        assert!(limiter.check(&scope).is_err());
        clock.advance(Duration::from_millis(1));
        assert!(limiter.check(&scope).is_ok());
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let config = RateLimitConfig {
            per_user_per_sec: 1,
            per_user_burst: 1,
            ..tiny_config()
        };
        let (limiter, clock) = manual_limiter(&config);
        let scope = RateScope::User("u1".to_owned());
        limiter.check(&scope).expect("first");
        clock.advance(Duration::from_millis(100));
        assert_eq!(
            limiter.check(&scope).expect_err("empty").retry_after_secs,
            1
        );
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }

    #[test]
    fn scopes_and_keys_are_independent_and_a_zero_rate_turns_a_scope_off() {
        let (limiter, _clock) = manual_limiter(&tiny_config());
        let user = RateScope::User("u1".to_owned());
        limiter.check(&user).expect("first");
        assert_eq!(limiter.check(&user).expect_err("burst of 1").scope, "user");
        limiter
            .check(&RateScope::User("u2".to_owned()))
            .expect("another user has its own bucket");
        limiter
            .check(&RateScope::Ip(ip("192.0.2.1")))
            .expect("the IP scope is separate");
        for _ in 0..100 {
            limiter
                .check(&RateScope::ApiKey("k".to_owned()))
                .expect("api key scope is off");
        }
    }

    #[test]
    fn ipv6_clients_share_a_bucket_per_64_and_mapped_ipv4_is_ipv4() {
        assert_eq!(ip_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(ip_key(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        let (limiter, _clock) = manual_limiter(&tiny_config());
        limiter.check(&RateScope::Ip(ip("2001:db8::1"))).expect("1");
        limiter.check(&RateScope::Ip(ip("2001:db8::2"))).expect("2");
        assert!(limiter.check(&RateScope::Ip(ip("2001:db8::3"))).is_err());
    }

    #[test]
    fn memory_stays_bounded_under_a_flood_of_keys() {
        let config = RateLimitConfig {
            keys_max: 50,
            ..tiny_config()
        };
        let (limiter, clock) = manual_limiter(&config);
        for n in 0..200u32 {
            let _ = limiter.check(&RateScope::User(format!("user-{n}")));
        }
        assert!(limiter.key_counts().1 <= 51, "{:?}", limiter.key_counts());

        // Once buckets refill, idle keys are dropped.
        clock.advance(Duration::from_secs(10));
        limiter.retain_recent();
        assert_eq!(limiter.key_counts().1, 0);
    }

    #[test]
    fn a_refusal_converts_into_the_api_error_and_is_counted() {
        let metrics = Metrics::new();
        let (limiter, _clock) = manual_limiter(&tiny_config());
        let limiter = limiter.with_metrics(metrics.clone());
        let scope = RateScope::User("u1".to_owned());
        limiter.check(&scope).expect("first");
        let error = ApiError::from(limiter.check(&scope).expect_err("refused"));
        assert_eq!(error.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(error.retry_after_secs, Some(1));
        assert_eq!(error.details["scope"], "user");
        assert!(metrics
            .render()
            .contains(r#"arches_rate_limited_total{scope="user"} 1"#));
    }

    fn request_from(peer: &str) -> Request<Body> {
        let mut request = Request::get("/").body(Body::empty()).expect("request");
        let addr: SocketAddr = peer.parse().expect("socket address");
        request.extensions_mut().insert(ConnectInfo(addr));
        request
    }

    #[tokio::test]
    async fn the_middleware_answers_429_with_retry_after_per_ip() {
        let (limiter, _clock) = manual_limiter(&tiny_config());
        let router = Router::new().route("/", get(|| async { "ok" })).layer(
            axum::middleware::from_fn_with_state(Arc::new(limiter), limit_per_ip),
        );
        for _ in 0..2 {
            let response = router
                .clone()
                .oneshot(request_from("192.0.2.1:5000"))
                .await
                .expect("infallible");
            assert_eq!(response.status(), StatusCode::OK);
        }
        let response = router
            .clone()
            .oneshot(request_from("192.0.2.1:5001"))
            .await
            .expect("infallible");
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("body");
        let body: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(body["code"], "rate_limited");
        assert_eq!(body["details"]["scope"], "ip");

        let response = router
            .oneshot(request_from("198.51.100.9:5000"))
            .await
            .expect("infallible");
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "another IP is independent"
        );
    }
}
