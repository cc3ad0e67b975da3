//! The `http` tool: one HTTP request (`http` or `https`, TLS by rustls trusting the Mozilla
//! roots, the system's and [`HttpPolicy::root_certificates`]) with bounded retries, a circuit
//! breaker and a rate limit per host, and a bounded response body.
//!
//! Order of checks for each task attempt: inputs, URL scheme (`http` or `https`), allowed
//! hosts; then for each in-tool attempt: the host's circuit breaker
//! (see the `breaker` submodule), the host's rate limit, the request itself. Nothing reaches the network
//! before the host is known to be allowed.
//!
//! Cancellation: the engine stops an attempt by dropping the future of
//! [`Tool::execute`]; dropping it drops the `reqwest` future, which closes the connection,
//! and hands a half-open breaker's probe to the next request.

mod breaker;
mod post;

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arches_core::pipeline::model::optional_duration;
use arches_core::ports::{LogSink, Tool, ToolContext, ToolError};
use arches_core::records::LogStream;
use arches_core::retry::RetryPolicy;
use arches_core::time::{Clock, SystemClock, Timestamp};
use async_trait::async_trait;
use bytes::Bytes;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::DashMapStateStore;
use governor::Quota;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::common::parse_inputs;

pub use breaker::{BreakerSettings, BreakerState};
use breaker::{Breakers, Outcome, Refusal};
pub(crate) use post::JsonPost;

/// Default timeout of one request (connect, send, and read the whole response): 30 s.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default bound of a response body: 16 MiB.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 16 * 1024 * 1024;
/// Default cap of `retry.max_attempts`: 10.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 10;
/// Bytes of an unexpected response's body quoted in the error.
pub const ERROR_BODY_BYTES: usize = 512;
/// Most redirects followed (each must stay on an allowed host).
pub const REDIRECTS_MAX: usize = 10;
/// Default `retry.max_attempts`.
const DEFAULT_RETRY_ATTEMPTS: u32 = 3;
/// Default `retry.initial_delay`.
const DEFAULT_RETRY_INITIAL_DELAY: Duration = Duration::from_millis(500);
/// Default `retry.max_delay`.
const DEFAULT_RETRY_MAX_DELAY: Duration = Duration::from_secs(10);
/// Statuses retried (and, but for 408, counted as failures by the breaker).
const RETRYABLE_STATUSES: [u16; 6] = [408, 429, 500, 502, 503, 504];
/// Methods the tool sends.
pub(crate) const METHODS: [&str; 6] = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"];

/// A per-host rate limit: a token bucket (GCRA, from `governor`) of `burst` requests
/// refilled at `per_second` requests per second.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Sustained requests per second per host; at least 1.
    pub per_second: NonZeroU32,
    /// Requests that may be sent at once after a quiet period; at least 1.
    pub burst: NonZeroU32,
}

/// What the `http` tool may do; set by the operator, not by pipelines.
#[derive(Clone)]
pub struct HttpPolicy {
    /// Hosts requests may go to. Patterns (case-insensitive): `host` (any port),
    /// `host:port`, `*.suffix` (any subdomain of `suffix`, not `suffix` itself; may carry a
    /// `:port`), `*` (any host). IPv6 addresses are written in brackets: `[::1]:8080`.
    /// Empty: no host is allowed. Redirects are followed only to allowed hosts.
    pub allowed_hosts: Vec<String>,
    /// The circuit breakers, one per `host:port`.
    pub breaker: BreakerSettings,
    /// The rate limit per `host:port`; `None` for none. A request waits for a token, at most
    /// for its timeout; when the wait would be longer it fails at once (retryable).
    pub rate_limit: Option<RateLimit>,
    /// Timeout of one request when the inputs give none.
    pub default_timeout: Duration,
    /// Largest response body read, in bytes; a longer body fails the attempt.
    pub max_body_bytes: u64,
    /// Largest `retry.max_attempts` the inputs may ask for.
    pub max_attempts: u32,
    /// The clock of the breakers' cool-downs and of the rate limit's buckets. With a manual
    /// clock, a rate-limit wait ends only when the clock is moved (else at the timeout).
    pub clock: Arc<dyn Clock>,
    /// PEM bundles of certificate authorities trusted for `https` besides the built-in
    /// Mozilla roots and the system's (an internal CA in front of a self-hosted model, say).
    pub root_certificates: Vec<Vec<u8>>,
}

impl std::fmt::Debug for HttpPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpPolicy")
            .field("allowed_hosts", &self.allowed_hosts)
            .field("breaker", &self.breaker)
            .field("rate_limit", &self.rate_limit)
            .field("default_timeout", &self.default_timeout)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_attempts", &self.max_attempts)
            .field("root_certificates", &self.root_certificates.len())
            .finish_non_exhaustive()
    }
}

impl Default for HttpPolicy {
    /// No host allowed; breaker 5 failures / 30 s; 10 requests/s per host with a burst of
    /// 20; 30 s timeout; 16 MiB bodies; at most 10 attempts; the system clock.
    fn default() -> Self {
        Self {
            allowed_hosts: Vec::new(),
            breaker: BreakerSettings::default(),
            rate_limit: Some(RateLimit {
                per_second: NonZeroU32::new(10).unwrap_or(NonZeroU32::MIN),
                burst: NonZeroU32::new(20).unwrap_or(NonZeroU32::MIN),
            }),
            default_timeout: DEFAULT_TIMEOUT,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            clock: Arc::new(SystemClock),
            root_certificates: Vec::new(),
        }
    }
}

impl HttpPolicy {
    /// The default policy with every host allowed (`allowed_hosts = ["*"]`): for a local,
    /// single-user CLI where pipelines are trusted. A server should list its hosts instead.
    pub fn allow_all() -> Self {
        Self {
            allowed_hosts: vec!["*".to_owned()],
            ..Self::default()
        }
    }

    /// The default policy allowing these host patterns.
    pub fn allowing<I: IntoIterator<Item = S>, S: Into<String>>(hosts: I) -> Self {
        Self {
            allowed_hosts: hosts.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// Problems with the policy, as messages (empty when it is usable): malformed host
    /// patterns, a zero timeout, body limit or attempt cap.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for pattern in &self.allowed_hosts {
            if HostPattern::parse(pattern).is_none() {
                out.push(format!(
                    "allowed host {pattern:?} is not host, host:port, *.suffix or *"
                ));
            }
        }
        if self.default_timeout.is_zero() {
            out.push("default_timeout must be positive".to_owned());
        }
        if self.max_body_bytes == 0 {
            out.push("max_body_bytes must be positive".to_owned());
        }
        if self.max_attempts == 0 {
            out.push("max_attempts must be at least 1".to_owned());
        }
        for (index, pem) in self.root_certificates.iter().enumerate() {
            match reqwest::Certificate::from_pem_bundle(pem) {
                Ok(certificates) if !certificates.is_empty() => {}
                Ok(_) => out.push(format!(
                    "root certificate bundle {index} holds no PEM certificate"
                )),
                Err(error) => out.push(format!(
                    "root certificate bundle {index} is not PEM certificates: {error}"
                )),
            }
        }
        out
    }
}

/// One allowed-host pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
enum HostPattern {
    Any,
    Exact { host: String, port: Option<u16> },
    Suffix { suffix: String, port: Option<u16> },
}

impl HostPattern {
    fn parse(pattern: &str) -> Option<Self> {
        let pattern = pattern.trim().to_ascii_lowercase();
        if pattern == "*" {
            return Some(Self::Any);
        }
        let (host, port) = split_port(&pattern)?;
        if host.is_empty() || host.contains(['/', '@', '?', '#', ' ']) {
            return None;
        }
        match host.strip_prefix("*.") {
            Some(suffix) if !suffix.is_empty() && !suffix.contains('*') => Some(Self::Suffix {
                suffix: suffix.to_owned(),
                port,
            }),
            Some(_) => None,
            None if host.contains('*') => None,
            None => Some(Self::Exact {
                host: host.to_owned(),
                port,
            }),
        }
    }

    fn matches(&self, host: &str, port: u16) -> bool {
        match self {
            Self::Any => true,
            Self::Exact { host: h, port: p } => h == host && p.is_none_or(|p| p == port),
            Self::Suffix { suffix, port: p } => {
                host.len() > suffix.len() + 1
                    && host.ends_with(suffix.as_str())
                    && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
                    && p.is_none_or(|p| p == port)
            }
        }
    }
}

/// `host` and an optional port from `host[:port]` (IPv6 in brackets). `None` when the port
/// is not a number.
fn split_port(text: &str) -> Option<(&str, Option<u16>)> {
    let colon = match text.rfind(':') {
        Some(colon) => colon,
        None => return Some((text, None)),
    };
    let host = &text[..colon];
    if host.contains(':') && !host.ends_with(']') {
        // A bare IPv6 address without brackets: no port.
        return Some((text, None));
    }
    let port = text[colon + 1..].parse::<u16>().ok()?;
    Some((host, Some(port)))
}

/// The allowed-host list, parsed; malformed patterns never match.
#[derive(Clone, Debug)]
struct AllowedHosts(Vec<HostPattern>);

impl AllowedHosts {
    fn new(patterns: &[String]) -> Self {
        Self(
            patterns
                .iter()
                .filter_map(|p| HostPattern::parse(p))
                .collect(),
        )
    }

    fn allows(&self, url: &Url) -> bool {
        let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
            return false;
        };
        let host = host.to_ascii_lowercase();
        self.0.iter().any(|pattern| pattern.matches(&host, port))
    }
}

tokio::task_local! {
    /// The hosts one call may reach on top of the tool's own allow-list: the capabilities of
    /// a registered tool ([`HttpTool::execute_within`]). Read where the request is checked and
    /// where a redirect is followed; reqwest follows redirects inside the response future,
    /// which the calling task polls, so the scope covers them.
    static CALL_HOSTS: Arc<AllowedHosts>;
}

/// Whether host patterns (as in [`HttpPolicy::allowed_hosts`]) allow `url`'s host and port.
pub fn hosts_allow(patterns: &[String], url: &Url) -> bool {
    AllowedHosts::new(patterns).allows(url)
}

/// Whether the current call's narrower host list (if any) allows `url`.
fn call_allows(url: &Url) -> bool {
    CALL_HOSTS
        .try_with(|hosts| hosts.allows(url))
        .unwrap_or(true)
}

/// `host:port` of a URL, lowercase, the port explicit: the key of breakers and rate limits.
fn host_key(url: &Url) -> String {
    format!(
        "{}:{}",
        url.host_str().unwrap_or_default().to_ascii_lowercase(),
        url.port_or_known_default().unwrap_or(80)
    )
}

/// The URL as logged and quoted in errors: without user info, query and fragment, which may
/// hold secrets.
fn display_url(url: &Url) -> String {
    let mut shown = url.clone();
    shown.set_query(None);
    shown.set_fragment(None);
    let _ = shown.set_password(None);
    let _ = shown.set_username("");
    shown.to_string()
}

/// The arches clock read by `governor`, in nanoseconds since the epoch.
#[derive(Clone)]
struct LimiterClock(Arc<dyn Clock>);

impl governor::clock::Clock for LimiterClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        let micros = u64::try_from(self.0.now().as_micros()).unwrap_or(0);
        Nanos::from(Duration::from_micros(micros))
    }
}

type HostLimiter =
    governor::RateLimiter<String, DashMapStateStore<String>, LimiterClock, NoOpMiddleware<Nanos>>;

/// Most hosts the rate limiter keeps buckets for before it forgets full buckets.
const LIMITER_HOSTS_MAX: usize = 10_000;

/// The `http` tool.
///
/// Inputs:
/// - `url` (string, required): an `http://` or `https://` URL; the host must match the
///   policy's allowed hosts.
/// - `method` (string): `GET` (default), `POST`, `PUT`, `PATCH`, `DELETE` or `HEAD`.
/// - `headers` (object, name → string value).
/// - `query` (object, name → string, number or boolean): appended to the URL's query.
/// - `body` (any JSON but null): sent as JSON, with `content-type: application/json` unless
///   `headers` sets one; or `body_text` (string): sent as is, with `content-type:
///   text/plain; charset=utf-8` unless `headers` sets one. Not both.
/// - `timeout` (duration, `"30s"`, `"200ms"` or seconds): bound of one request, from
///   connecting until the whole body is read; default the policy's (30 s).
/// - `retry` (object): `max_attempts` (default 3, at most the policy's cap, 10),
///   `initial_delay` (default 500ms), `max_delay` (default 10s). The delay after attempt n
///   is exponential backoff with jitter ([`RetryPolicy::delay_after`], multiplier 2, jitter
///   0.5, after Brooker's "Exponential Backoff And Jitter"), or the response's
///   `Retry-After` in seconds when it has one, capped by `max_delay` (an HTTP-date
///   `Retry-After` is ignored).
/// - `expect_status` (array of integers 100–599): statuses that succeed; default any 2xx.
///
/// Retried: connection errors, timeouts, body read errors and statuses 408, 429, 500, 502,
/// 503, 504 (when not expected). Any other unexpected status fails at once. The circuit
/// breaker of the host counts connection errors, timeouts, 5xx and 429 as failures, whatever
/// `expect_status` says: it judges the host, not the task.
///
/// Outputs: `{"status": <u16>, "headers": {<lowercase name>: <value, repeated values joined
/// by ", ">}, "body": <parsed JSON when the content type is JSON (application/json or
/// */*+json; null when empty), else the text, lossily decoded>, "attempts": <n>}`.
///
/// Logs: one system line per attempt: method, URL without query, status or error, elapsed
/// milliseconds.
///
/// Errors (all name the method and URL without query):
/// - permanent: invalid inputs, unknown method, `https`/other schemes, host not allowed,
///   an unexpected status other than the retried ones (with the first 512 bytes of the
///   body), a body over the limit, a JSON body that does not parse, a redirect to a host
///   that is not allowed;
/// - transient (the engine's retry policy applies): the last retried cause once the attempts
///   are spent, an open circuit (`circuit open for host X until T`), a rate-limit wait
///   longer than the timeout.
pub struct HttpTool {
    hosts: Arc<AllowedHosts>,
    client: reqwest::Client,
    breakers: Breakers,
    limiter: Option<HostLimiter>,
    limiter_clock: LimiterClock,
    default_timeout: Duration,
    max_body_bytes: u64,
    max_attempts: u32,
}

impl std::fmt::Debug for HttpTool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpTool")
            .field("hosts", &self.hosts)
            .field("default_timeout", &self.default_timeout)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_attempts", &self.max_attempts)
            .finish_non_exhaustive()
    }
}

impl HttpTool {
    /// The tool under `policy`. Malformed host patterns never match (see
    /// [`HttpPolicy::problems`]); zero limits are read as 1.
    ///
    /// The client connects directly: proxy variables of the environment are ignored, so the
    /// allowed hosts are where requests really go.
    pub fn new(policy: HttpPolicy) -> Self {
        let hosts = Arc::new(AllowedHosts::new(&policy.allowed_hosts));
        let redirect_hosts = hosts.clone();
        let redirects = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > REDIRECTS_MAX {
                let error = format!("more than {REDIRECTS_MAX} redirects");
                attempt.error(error)
            } else if !matches!(attempt.url().scheme(), "http" | "https") {
                let error = format!(
                    "redirect to {} refused: only http and https are supported",
                    display_url(attempt.url())
                );
                attempt.error(error)
            } else if attempt.url().scheme() == "http"
                && attempt
                    .previous()
                    .last()
                    .is_some_and(|previous| previous.scheme() == "https")
            {
                // Headers (keys among them) sent over TLS must not follow in clear text.
                let error = format!(
                    "redirect to {} refused: from https down to http",
                    display_url(attempt.url())
                );
                attempt.error(error)
            } else if !redirect_hosts.allows(attempt.url()) || !call_allows(attempt.url()) {
                let error = format!(
                    "redirect to {} refused: host {} is not in the tool's allowed hosts",
                    display_url(attempt.url()),
                    attempt.url().host_str().unwrap_or_default()
                );
                attempt.error(error)
            } else {
                attempt.follow()
            }
        });
        let mut builder = reqwest::Client::builder().redirect(redirects).no_proxy();
        for pem in &policy.root_certificates {
            // A bundle that does not parse is reported by `HttpPolicy::problems`.
            for certificate in reqwest::Certificate::from_pem_bundle(pem).unwrap_or_default() {
                builder = builder.add_root_certificate(certificate);
            }
        }
        let client = builder.build().unwrap_or_else(|error| {
            tracing::error!(%error, "the http tool's TLS client cannot start; using the defaults");
            reqwest::Client::default()
        });
        let limiter_clock = LimiterClock(policy.clock.clone());
        let limiter = policy.rate_limit.map(|limit| {
            HostLimiter::new(
                Quota::per_second(limit.per_second).allow_burst(limit.burst),
                DashMapStateStore::default(),
                limiter_clock.clone(),
            )
        });
        Self {
            hosts,
            client,
            breakers: Breakers::new(policy.breaker, policy.clock),
            limiter,
            limiter_clock,
            default_timeout: policy.default_timeout.max(Duration::from_millis(1)),
            max_body_bytes: policy.max_body_bytes.max(1),
            max_attempts: policy.max_attempts.max(1),
        }
    }

    /// Executes like [`Tool::execute`], allowed to reach only hosts that both the tool's
    /// policy and `hosts` (patterns as in [`HttpPolicy::allowed_hosts`]) allow, redirects
    /// included: for an org's registered tool, whose capabilities name its hosts. Breakers and
    /// rate limits are the tool's, shared with every other call.
    ///
    /// # Errors
    /// As [`Tool::execute`]; a host outside `hosts` is refused before anything is sent.
    pub async fn execute_within(
        &self,
        context: ToolContext,
        inputs: Value,
        hosts: &[String],
    ) -> Result<Value, ToolError> {
        let hosts = Arc::new(AllowedHosts::new(hosts));
        CALL_HOSTS.scope(hosts, self.execute(context, inputs)).await
    }

    /// Whether the tool's policy allows `url`'s host and port.
    pub fn allows(&self, url: &Url) -> bool {
        self.hosts.allows(url)
    }

    /// The state of the circuit breaker of every host contacted so far (`host:port`), sorted
    /// by host; for metrics ([`BreakerState::gauge_value`]).
    pub fn breaker_states(&self) -> Vec<(String, BreakerState)> {
        self.breakers.states()
    }

    /// Waits for a rate-limit token of `host`, at most `budget`.
    async fn wait_for_token(
        &self,
        host: &str,
        budget: Duration,
        what: &str,
    ) -> Result<(), ToolError> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        let deadline = Instant::now() + budget;
        let key = host.to_owned();
        loop {
            let result = limiter.check_key(&key);
            if limiter.len() > LIMITER_HOSTS_MAX {
                limiter.retain_recent();
            }
            let not_until = match result {
                Ok(()) => return Ok(()),
                Err(not_until) => not_until,
            };
            let wait = not_until.wait_time_from(governor::clock::Clock::now(&self.limiter_clock));
            if Instant::now() + wait > deadline {
                return Err(ToolError::transient(format!(
                    "{what}: rate limit of host {host}: the next request is allowed in {} ms, \
                     after the request timeout of {} ms",
                    wait.as_millis(),
                    budget.as_millis()
                )));
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// One request and its response, within `timeout`.
    async fn exchange(
        &self,
        request: &Request,
        timeout: Duration,
    ) -> Result<Exchange, AttemptError> {
        let send = async {
            let mut builder = self
                .client
                .request(request.method.clone(), request.url.clone())
                .headers(request.headers.clone());
            if let Some(body) = &request.body {
                builder = builder.body(body.clone());
            }
            let mut response = builder.send().await.map_err(AttemptError::Transport)?;
            let status = response.status();
            let headers = response.headers().clone();
            let expected = request.expect.accepts(status.as_u16());
            let limit = if expected {
                request.max_body_bytes
            } else {
                ERROR_BODY_BYTES as u64
            };
            if expected && request.method != Method::HEAD {
                if let Some(length) = response.content_length() {
                    if length > limit {
                        return Err(AttemptError::TooLarge { limit });
                    }
                }
            }
            let mut body = Vec::new();
            if request.method != Method::HEAD {
                while let Some(chunk) = response.chunk().await.map_err(AttemptError::Transport)? {
                    let room = usize::try_from(limit)
                        .unwrap_or(usize::MAX)
                        .saturating_sub(body.len());
                    if chunk.len() > room {
                        if expected {
                            return Err(AttemptError::TooLarge { limit });
                        }
                        body.extend_from_slice(&chunk[..room]);
                        break;
                    }
                    body.extend_from_slice(&chunk);
                }
            }
            Ok(Exchange {
                status,
                headers,
                body,
                expected,
            })
        };
        match tokio::time::timeout(timeout, send).await {
            Ok(result) => result,
            Err(_) => Err(AttemptError::Timeout(timeout)),
        }
    }
}

/// Headers a task may not set: `host` would send the request to another virtual host than
/// the allowed URL names (for example behind a shared reverse proxy), and the framing and
/// hop-by-hop headers belong to the connection, not to the task.
pub(crate) const RESERVED_HEADERS: [&str; 6] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
];

/// A request, ready to be sent once per attempt.
struct Request {
    method: Method,
    url: Url,
    headers: HeaderMap,
    body: Option<Bytes>,
    expect: Expect,
    /// Largest expected response body read, in bytes.
    max_body_bytes: u64,
}

/// Which statuses succeed.
enum Expect {
    Success,
    Listed(Vec<u16>),
}

impl Expect {
    fn accepts(&self, status: u16) -> bool {
        match self {
            Expect::Success => (200..300).contains(&status),
            Expect::Listed(list) => list.contains(&status),
        }
    }
}

/// A response read within the bounds.
struct Exchange {
    status: StatusCode,
    headers: HeaderMap,
    /// The whole body when expected, else its first bytes.
    body: Vec<u8>,
    expected: bool,
}

/// What went wrong with one attempt before a status could be judged.
enum AttemptError {
    Transport(reqwest::Error),
    Timeout(Duration),
    TooLarge { limit: u64 },
}

/// The verdict on one attempt.
struct Verdict {
    /// Error message (without the method and URL prefix), when the attempt failed.
    error: Option<String>,
    /// Whether another attempt may succeed.
    retryable: bool,
    /// What the breaker learns.
    outcome: Outcome,
    /// `Retry-After` of the response, in seconds.
    retry_after: Option<Duration>,
}

/// The message of a `reqwest` error and its causes, without the URL (which may hold query
/// secrets).
fn transport_message(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut message = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

fn judge_error(error: AttemptError) -> Verdict {
    match error {
        AttemptError::Timeout(timeout) => Verdict {
            error: Some(format!("timed out after {} ms", timeout.as_millis())),
            retryable: true,
            outcome: Outcome::Failure,
            retry_after: None,
        },
        AttemptError::TooLarge { limit } => Verdict {
            error: Some(format!("response body exceeds the limit of {limit} bytes")),
            retryable: false,
            outcome: Outcome::Success,
            retry_after: None,
        },
        AttemptError::Transport(error) if error.is_redirect() || error.is_builder() => Verdict {
            error: Some(transport_message(error)),
            retryable: false,
            outcome: Outcome::Success,
            retry_after: None,
        },
        AttemptError::Transport(error) if error.is_timeout() => Verdict {
            error: Some(format!("timed out: {}", transport_message(error))),
            retryable: true,
            outcome: Outcome::Failure,
            retry_after: None,
        },
        AttemptError::Transport(error) => {
            let head = if error.is_connect() {
                "cannot connect"
            } else if error.is_body() || error.is_decode() {
                "cannot read the response body"
            } else {
                "request failed"
            };
            Verdict {
                error: Some(format!("{head}: {}", transport_message(error))),
                retryable: true,
                outcome: Outcome::Failure,
                retry_after: None,
            }
        }
    }
}

fn judge_exchange(exchange: &Exchange) -> Verdict {
    let status = exchange.status.as_u16();
    let outcome = if exchange.status.is_server_error() || status == 429 {
        Outcome::Failure
    } else {
        Outcome::Success
    };
    let retry_after = exchange
        .headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    if exchange.expected {
        return Verdict {
            error: None,
            retryable: false,
            outcome,
            retry_after,
        };
    }
    let body = String::from_utf8_lossy(&exchange.body);
    let body = body.trim();
    let mut message = format!("unexpected status {}", exchange.status);
    if !body.is_empty() {
        message.push_str(": ");
        message.push_str(body);
        if exchange.body.len() >= ERROR_BODY_BYTES {
            message.push_str(" …");
        }
    }
    Verdict {
        error: Some(message),
        retryable: RETRYABLE_STATUSES.contains(&status),
        outcome,
        retry_after,
    }
}

/// The delay before the attempt after `attempt` (1-based): the response's `Retry-After`
/// capped by `max_delay` when it gave one, else the policy's backoff for `random` in [0, 1).
fn retry_delay(
    policy: &RetryPolicy,
    attempt: u32,
    retry_after: Option<Duration>,
    random: f64,
) -> Duration {
    match retry_after {
        Some(after) => after.min(policy.max_delay),
        None => policy.delay_after(attempt, random),
    }
}

/// Formats a timestamp as RFC 3339 UTC with seconds, for example `2026-01-02T03:04:05Z`.
/// Days to civil date after Howard Hinnant, "chrono-Compatible Low-Level Date Algorithms"
/// (`civil_from_days`).
fn format_timestamp(at: Timestamp) -> String {
    let seconds = at.as_micros().div_euclid(1_000_000);
    let days = seconds.div_euclid(86_400);
    let of_day = seconds.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpInputs {
    #[serde(default)]
    method: Option<String>,
    url: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    query: BTreeMap<String, Value>,
    #[serde(default)]
    body: Option<Value>,
    #[serde(default)]
    body_text: Option<String>,
    #[serde(default, with = "optional_duration")]
    timeout: Option<Duration>,
    #[serde(default)]
    retry: Option<RetryInputs>,
    #[serde(default)]
    expect_status: Option<Vec<u16>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RetryInputs {
    #[serde(default)]
    max_attempts: Option<u32>,
    #[serde(default, with = "optional_duration")]
    initial_delay: Option<Duration>,
    #[serde(default, with = "optional_duration")]
    max_delay: Option<Duration>,
}

impl HttpTool {
    /// Checks the inputs and builds the request, the retry policy and the timeout; nothing
    /// is sent.
    fn prepare(&self, inputs: HttpInputs) -> Result<(Request, RetryPolicy, Duration), ToolError> {
        let method_name = inputs.method.as_deref().unwrap_or("GET");
        if !METHODS.contains(&method_name) {
            return Err(ToolError::permanent(format!(
                "unknown method {method_name:?}; use one of {}",
                METHODS.join(", ")
            )));
        }
        let method = Method::from_bytes(method_name.as_bytes())
            .map_err(|_| ToolError::permanent(format!("unknown method {method_name:?}")))?;

        let mut url = Url::parse(inputs.url.trim()).map_err(|error| {
            ToolError::permanent(format!("url {:?} is not a valid URL: {error}", inputs.url))
        })?;
        match url.scheme() {
            "http" | "https" => {}
            other => {
                return Err(ToolError::permanent(format!(
                    "url scheme {other:?} is not supported; use http or https"
                )))
            }
        }
        let Some(host) = url.host_str().map(str::to_owned) else {
            return Err(ToolError::permanent(format!(
                "url {} has no host",
                display_url(&url)
            )));
        };
        if !self.hosts.allows(&url) {
            return Err(ToolError::permanent(format!(
                "host {host} is not in the tool's allowed hosts"
            )));
        }
        if !call_allows(&url) {
            return Err(ToolError::permanent(format!(
                "host {host} is not among the hosts the tool's capabilities name"
            )));
        }

        if !inputs.query.is_empty() {
            let mut pairs = url.query_pairs_mut();
            for (name, value) in &inputs.query {
                let text = match value {
                    Value::String(text) => text.clone(),
                    Value::Number(number) => number.to_string(),
                    Value::Bool(flag) => flag.to_string(),
                    other => {
                        return Err(ToolError::permanent(format!(
                        "query parameter {name:?} must be a string, number or boolean, got {other}"
                    )))
                    }
                };
                pairs.append_pair(name, &text);
            }
        }

        let mut headers = HeaderMap::new();
        for (name, value) in &inputs.headers {
            let header = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| ToolError::permanent(format!("header name {name:?} is not valid")))?;
            if RESERVED_HEADERS.contains(&header.as_str()) {
                return Err(ToolError::permanent(format!(
                    "header {name:?} is set by the tool: `host` comes from the URL (so the \
                     allowed hosts decide where a request goes), and the framing headers from \
                     the body"
                )));
            }
            let value = HeaderValue::from_str(value).map_err(|_| {
                ToolError::permanent(format!(
                    "the value of header {name:?} holds characters a header cannot carry"
                ))
            })?;
            headers.append(header, value);
        }

        let body = match (inputs.body, inputs.body_text) {
            (Some(_), Some(_)) => {
                return Err(ToolError::permanent(
                    "give either body or body_text, not both",
                ))
            }
            (Some(value), None) => {
                let bytes = serde_json::to_vec(&value).map_err(|error| {
                    ToolError::permanent(format!("cannot encode the body as json: {error}"))
                })?;
                if !headers.contains_key(CONTENT_TYPE) {
                    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                }
                Some(Bytes::from(bytes))
            }
            (None, Some(text)) => {
                if !headers.contains_key(CONTENT_TYPE) {
                    headers.insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static("text/plain; charset=utf-8"),
                    );
                }
                Some(Bytes::from(text))
            }
            (None, None) => None,
        };

        let expect = match inputs.expect_status {
            None => Expect::Success,
            Some(list) if list.is_empty() => {
                return Err(ToolError::permanent(
                    "expect_status must list at least one status",
                ))
            }
            Some(list) => {
                if let Some(bad) = list.iter().find(|s| !(100..=599).contains(*s)) {
                    return Err(ToolError::permanent(format!(
                        "expect_status: {bad} is not an HTTP status (100-599)"
                    )));
                }
                Expect::Listed(list)
            }
        };

        let timeout = inputs.timeout.unwrap_or(self.default_timeout);
        if timeout.is_zero() {
            return Err(ToolError::permanent("timeout must be positive"));
        }

        let retry = inputs.retry.unwrap_or_default();
        let policy = RetryPolicy {
            max_attempts: retry.max_attempts.unwrap_or(DEFAULT_RETRY_ATTEMPTS),
            initial_delay: retry.initial_delay.unwrap_or(DEFAULT_RETRY_INITIAL_DELAY),
            max_delay: retry.max_delay.unwrap_or(DEFAULT_RETRY_MAX_DELAY),
            multiplier: 2.0,
            jitter: 0.5,
        };
        if policy.max_attempts == 0 || policy.max_attempts > self.max_attempts {
            return Err(ToolError::permanent(format!(
                "retry.max_attempts must be between 1 and {}, got {}",
                self.max_attempts, policy.max_attempts
            )));
        }
        // Only the initial delay was given: the cap grows to it.
        let policy = match (retry.max_delay, policy.max_delay < policy.initial_delay) {
            (None, true) => RetryPolicy {
                max_delay: policy.initial_delay,
                ..policy
            },
            (Some(_), true) => {
                return Err(ToolError::permanent(
                    "retry.max_delay must not be shorter than retry.initial_delay",
                ))
            }
            (_, false) => policy,
        };

        Ok((
            Request {
                method,
                url,
                headers,
                body,
                expect,
                max_body_bytes: self.max_body_bytes,
            },
            policy,
            timeout,
        ))
    }
}

/// The outputs of a successful exchange.
fn outputs(exchange: Exchange, attempts: u32, what: &str) -> Result<Value, ToolError> {
    let mut headers = Map::new();
    for (name, value) in &exchange.headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match headers.get_mut(name.as_str()) {
            Some(Value::String(existing)) => {
                existing.push_str(", ");
                existing.push_str(&value);
            }
            _ => {
                headers.insert(name.as_str().to_owned(), Value::String(value));
            }
        }
    }
    let is_json = exchange
        .headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(crate::media_type::is_json);
    let body = if is_json {
        if exchange.body.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(&exchange.body).map_err(|error| {
                ToolError::permanent(format!(
                    "{what}: the response says it is json but does not parse: {error}"
                ))
            })?
        }
    } else {
        Value::String(String::from_utf8_lossy(&exchange.body).into_owned())
    };
    Ok(json!({
        "status": exchange.status.as_u16(),
        "headers": headers,
        "body": body,
        "attempts": attempts,
    }))
}

#[async_trait]
impl Tool for HttpTool {
    fn name(&self) -> &str {
        "http"
    }

    fn description(&self) -> &str {
        "send an http request to an allowed host, with retries, a circuit breaker and a rate limit"
    }

    fn needs_work_dir(&self) -> bool {
        false
    }

    fn input_schema(&self) -> Value {
        let duration = json!({
            "type": ["string", "number"],
            "description": "a duration such as \"500ms\", \"30s\", \"1m\", or seconds"
        });
        json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["url"],
            "not": {"required": ["body", "body_text"]},
            "properties": {
                "method": {"type": "string", "enum": METHODS, "default": "GET"},
                "url": {"type": "string", "minLength": 1, "description": "an http:// or https:// URL on an allowed host"},
                "headers": {
                    "type": "object",
                    "additionalProperties": {"type": "string"}
                },
                "query": {
                    "type": "object",
                    "additionalProperties": {"type": ["string", "number", "boolean"]},
                    "description": "parameters appended to the URL's query"
                },
                "body": {"description": "any json value, sent as application/json"},
                "body_text": {"type": "string", "description": "sent as text/plain unless headers set a content-type"},
                "timeout": duration,
                "retry": {
                    "type": "object",
                    "additionalProperties": false,
                    "properties": {
                        "max_attempts": {"type": "integer", "minimum": 1, "maximum": self.max_attempts, "default": DEFAULT_RETRY_ATTEMPTS},
                        "initial_delay": duration,
                        "max_delay": duration
                    }
                },
                "expect_status": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"type": "integer", "minimum": 100, "maximum": 599},
                    "description": "statuses that succeed; default any 2xx"
                }
            }
        })
    }

    async fn execute(&self, context: ToolContext, inputs: Value) -> Result<Value, ToolError> {
        let inputs: HttpInputs = parse_inputs("http", inputs)?;
        let (request, policy, timeout) = self.prepare(inputs)?;
        let what = format!("{} {}", request.method, display_url(&request.url));
        let (exchange, attempts) = self
            .send(&request, &policy, timeout, context.logs.as_ref(), &what)
            .await?;
        outputs(exchange, attempts, &what)
    }
}

impl HttpTool {
    /// Sends a checked request (its host allowed) with the tool's breaker, rate limit and
    /// `policy`'s retries, writing a line per attempt to `logs`; `what` (method and URL)
    /// starts every line and error. The exchange of the first attempt that is not retried,
    /// with the number of attempts made.
    async fn send(
        &self,
        request: &Request,
        policy: &RetryPolicy,
        timeout: Duration,
        logs: &dyn LogSink,
        what: &str,
    ) -> Result<(Exchange, u32), ToolError> {
        let host = host_key(&request.url);
        let mut attempt = 1;
        let mut last_error: Option<String> = None;
        loop {
            // The rate-limit token first: a half-open breaker's probe must not be held while
            // it waits for one (other requests are refused meanwhile).
            self.wait_for_token(&host, timeout, what).await?;
            let permit = match self.breakers.acquire(&host) {
                Ok(permit) => permit,
                Err(refusal) => {
                    let mut message = match refusal {
                        Refusal::Open { until } => format!(
                            "{what}: circuit open for host {host} until {}",
                            format_timestamp(until)
                        ),
                        Refusal::ProbeInFlight => format!(
                            "{what}: circuit half-open for host {host}: a probe request is in flight"
                        ),
                    };
                    if let Some(last) = &last_error {
                        message.push_str(&format!(" (last error: {last})"));
                    }
                    return Err(ToolError::transient(message));
                }
            };
            let started = Instant::now();
            let result = self.exchange(request, timeout).await;
            let elapsed = started.elapsed().as_millis();
            let (verdict, exchange) = match result {
                Ok(exchange) => (judge_exchange(&exchange), Some(exchange)),
                Err(error) => (judge_error(error), None),
            };
            self.breakers.record(permit, verdict.outcome);
            let result_text = match (&exchange, &verdict.error) {
                (Some(exchange), _) => exchange.status.as_u16().to_string(),
                (None, Some(error)) => error.clone(),
                (None, None) => "no response".to_owned(),
            };
            let line = format!(
                "{what} -> {result_text} in {elapsed} ms (attempt {attempt}/{})",
                policy.max_attempts
            );
            logs.write(LogStream::System, &line).await;

            let Some(error) = verdict.error else {
                return match exchange {
                    Some(exchange) => Ok((exchange, attempt)),
                    None => Err(ToolError::permanent(format!("{what}: no response"))),
                };
            };
            if !verdict.retryable {
                return Err(ToolError::permanent(format!("{what}: {error}")));
            }
            if !policy.allows_retry_after(attempt) {
                let tries = if attempt == 1 {
                    "1 attempt".to_owned()
                } else {
                    format!("{attempt} attempts")
                };
                return Err(ToolError::transient(format!(
                    "{what}: {error} (after {tries})"
                )));
            }
            last_error = Some(error);
            let delay = retry_delay(policy, attempt, verdict.retry_after, rand::random());
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }
}

#[cfg(test)]
mod tests;
