//! A circuit breaker per host, after Michael T. Nygard, *Release It!* (2nd ed., Pragmatic
//! Bookshelf, 2018), chapter "Stability Patterns: Circuit Breaker", and Martin Fowler,
//! "CircuitBreaker" (martinfowler.com/bliki/CircuitBreaker.html, 2014).
//!
//! States and transitions:
//! - **closed**: requests pass; each failure (connection error, timeout, 5xx, 429) adds to a
//!   count of consecutive failures, any other outcome resets it. At `failure_threshold`
//!   consecutive failures the breaker opens.
//! - **open**: requests are refused at once, without touching the network, until the
//!   cool-down has passed since the breaker opened.
//! - **half-open**: once the cool-down is over, one request (the probe) passes; others are
//!   refused while it is in flight. A probe that succeeds closes the breaker; a probe that
//!   fails opens it again with a fresh cool-down. A probe whose future is dropped (the
//!   attempt was cancelled) gives its turn to the next request.
//!
//! Time comes from a [`Clock`], so tests drive the cool-down with a `ManualClock`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arches_core::time::{Clock, Timestamp};

/// Most hosts a breaker table remembers; past it, closed hosts without failures are forgotten.
const HOSTS_MAX: usize = 10_000;

/// The state of a host's circuit breaker, as reported by
/// [`HttpTool::breaker_states`](super::HttpTool::breaker_states).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BreakerState {
    /// Requests pass.
    Closed,
    /// Requests are refused until the cool-down ends.
    Open,
    /// The cool-down is over: the next request is a probe.
    HalfOpen,
}

impl BreakerState {
    /// The state's name: `closed`, `open` or `half_open`.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    /// The state as a gauge value for metrics: closed 0, open 1, half-open 2.
    pub fn gauge_value(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }
}

/// Settings of the circuit breakers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Consecutive failures that open a closed breaker; at least 1 (0 is read as 1).
    pub failure_threshold: u32,
    /// How long an open breaker refuses requests before it lets a probe through.
    pub cool_down: Duration,
}

impl Default for BreakerSettings {
    /// 5 consecutive failures, 30 s cool-down.
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            cool_down: Duration::from_secs(30),
        }
    }
}

/// The stored state of one host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Circuit {
    Closed { failures: u32 },
    Open { until: Timestamp },
    HalfOpen { probing: bool },
}

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The breaker is open until this instant.
    Open { until: Timestamp },
    /// The breaker is half-open and its probe is in flight.
    ProbeInFlight,
}

/// What a request learned about the host's health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The host answered sanely (any status but 5xx and 429).
    Success,
    /// A connection error, a timeout, a 5xx or a 429.
    Failure,
}

/// The circuit breakers of every host.
pub(crate) struct Breakers {
    settings: BreakerSettings,
    clock: Arc<dyn Clock>,
    circuits: Arc<Mutex<HashMap<String, Circuit>>>,
}

impl Breakers {
    pub(crate) fn new(settings: BreakerSettings, clock: Arc<dyn Clock>) -> Self {
        Self {
            settings,
            clock,
            circuits: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Circuit>> {
        // A poisoned lock means a panic elsewhere between two plain assignments; the map is
        // still consistent.
        self.circuits
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Asks to send one request to `host`: a permit, or why not.
    pub(crate) fn acquire(&self, host: &str) -> Result<Permit, Refusal> {
        let now = self.clock.now();
        let mut circuits = self.lock();
        if circuits.len() >= HOSTS_MAX && !circuits.contains_key(host) {
            circuits.retain(|_, circuit| *circuit != Circuit::Closed { failures: 0 });
        }
        let circuit = circuits
            .entry(host.to_owned())
            .or_insert(Circuit::Closed { failures: 0 });
        let probe = match *circuit {
            Circuit::Closed { .. } => false,
            Circuit::Open { until } if now < until => return Err(Refusal::Open { until }),
            Circuit::Open { .. } | Circuit::HalfOpen { probing: false } => {
                *circuit = Circuit::HalfOpen { probing: true };
                true
            }
            Circuit::HalfOpen { probing: true } => return Err(Refusal::ProbeInFlight),
        };
        Ok(Permit {
            circuits: self.circuits.clone(),
            host: host.to_owned(),
            probe,
            done: false,
        })
    }

    /// Records the outcome of a permitted request.
    pub(crate) fn record(&self, mut permit: Permit, outcome: Outcome) {
        permit.done = true;
        let now = self.clock.now();
        let mut circuits = self.lock();
        let circuit = circuits
            .entry(permit.host.clone())
            .or_insert(Circuit::Closed { failures: 0 });
        let threshold = self.settings.failure_threshold.max(1);
        let open = Circuit::Open {
            until: now.plus(self.settings.cool_down),
        };
        *circuit = match (*circuit, outcome) {
            // A request let through before the breaker opened proves nothing about the host
            // now; only the probe may close an open or half-open breaker.
            (state @ (Circuit::Open { .. } | Circuit::HalfOpen { .. }), Outcome::Success)
                if !permit.probe =>
            {
                state
            }
            (_, Outcome::Success) => Circuit::Closed { failures: 0 },
            (Circuit::HalfOpen { .. }, Outcome::Failure) => open,
            (Circuit::Closed { failures }, Outcome::Failure) => {
                let failures = failures.saturating_add(1);
                if failures >= threshold {
                    open
                } else {
                    Circuit::Closed { failures }
                }
            }
            // Another request opened it meanwhile; keep its cool-down.
            (state @ Circuit::Open { .. }, Outcome::Failure) => state,
        };
    }

    /// Every known host and its state, sorted by host. An open breaker whose cool-down is
    /// over reads as half-open: the next request will be its probe.
    pub(crate) fn states(&self) -> Vec<(String, BreakerState)> {
        let now = self.clock.now();
        let circuits = self.lock();
        let mut states: Vec<(String, BreakerState)> = circuits
            .iter()
            .map(|(host, circuit)| {
                let state = match *circuit {
                    Circuit::Closed { .. } => BreakerState::Closed,
                    Circuit::Open { until } if now < until => BreakerState::Open,
                    Circuit::Open { .. } | Circuit::HalfOpen { .. } => BreakerState::HalfOpen,
                };
                (host.clone(), state)
            })
            .collect();
        states.sort_by(|a, b| a.0.cmp(&b.0));
        states
    }
}

/// Leave to send one request. A probe permit dropped without an outcome (the attempt was
/// cancelled) hands the probe to the next request.
pub(crate) struct Permit {
    circuits: Arc<Mutex<HashMap<String, Circuit>>>,
    host: String,
    probe: bool,
    done: bool,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.done || !self.probe {
            return;
        }
        let mut circuits = self
            .circuits
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(circuit @ Circuit::HalfOpen { probing: true }) = circuits.get_mut(&self.host) {
            *circuit = Circuit::HalfOpen { probing: false };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arches_core::time::ManualClock;

    fn breakers(threshold: u32) -> (Breakers, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new(Timestamp(1_000_000)));
        let settings = BreakerSettings {
            failure_threshold: threshold,
            cool_down: Duration::from_secs(30),
        };
        (Breakers::new(settings, clock.clone()), clock)
    }

    #[test]
    fn a_dropped_probe_hands_its_turn_on() {
        let (breakers, clock) = breakers(1);
        let permit = breakers.acquire("h:80").unwrap();
        breakers.record(permit, Outcome::Failure);
        assert!(matches!(
            breakers.acquire("h:80"),
            Err(Refusal::Open { .. })
        ));
        clock.advance(Duration::from_secs(30));
        let probe = breakers.acquire("h:80").unwrap();
        assert!(matches!(
            breakers.acquire("h:80"),
            Err(Refusal::ProbeInFlight)
        ));
        drop(probe);
        let probe = breakers.acquire("h:80").unwrap();
        breakers.record(probe, Outcome::Success);
        assert_eq!(
            breakers.states(),
            vec![("h:80".to_owned(), BreakerState::Closed)]
        );
    }

    #[test]
    fn a_success_resets_the_count_of_consecutive_failures() {
        let (breakers, _clock) = breakers(2);
        let permit = breakers.acquire("h:80").unwrap();
        breakers.record(permit, Outcome::Failure);
        let permit = breakers.acquire("h:80").unwrap();
        breakers.record(permit, Outcome::Success);
        let permit = breakers.acquire("h:80").unwrap();
        breakers.record(permit, Outcome::Failure);
        assert_eq!(breakers.states()[0].1, BreakerState::Closed);
        let permit = breakers.acquire("h:80").unwrap();
        breakers.record(permit, Outcome::Failure);
        assert_eq!(breakers.states()[0].1, BreakerState::Open);
        assert_eq!(BreakerState::Open.gauge_value(), 1);
        assert_eq!(BreakerState::HalfOpen.as_str(), "half_open");
    }

    #[test]
    fn a_late_success_from_before_the_breaker_opened_does_not_close_it() {
        let (breakers, _clock) = breakers(1);
        let slow = breakers.acquire("h:80").unwrap();
        let failing = breakers.acquire("h:80").unwrap();
        breakers.record(failing, Outcome::Failure);
        assert_eq!(breakers.states()[0].1, BreakerState::Open);
        // The slow request was let through while the breaker was closed; its success is old
        // news and the breaker stays open until its probe says otherwise.
        breakers.record(slow, Outcome::Success);
        assert_eq!(breakers.states()[0].1, BreakerState::Open);
    }
}
