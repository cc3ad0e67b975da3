//! Retry policy: how many attempts a task gets and how long to wait between them.
//!
//! The delay is exponential backoff with "full jitter" as described by Marc Brooker,
//! "Exponential Backoff And Jitter", AWS Architecture Blog, 2015: the base delay
//! `min(max_delay, initial_delay * multiplier^(attempt-1))` is spread over
//! `[base * (1 - jitter), base]`, so `jitter = 1.0` is full jitter and `0.0` none.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Most attempts any retry policy may ask for.
pub const MAX_ATTEMPTS_LIMIT: u32 = 100;

/// A retry policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; 1 means no retry. At most 100.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Delay before the first retry.
    #[serde(
        default = "default_initial_delay",
        with = "crate::pipeline::model::optional_duration_required"
    )]
    pub initial_delay: Duration,
    /// Upper bound of any delay.
    #[serde(
        default = "default_max_delay",
        with = "crate::pipeline::model::optional_duration_required"
    )]
    pub max_delay: Duration,
    /// Growth factor per attempt, at least 1.
    #[serde(default = "default_multiplier")]
    pub multiplier: f64,
    /// Share of the delay that is randomised, in [0, 1].
    #[serde(default = "default_jitter")]
    pub jitter: f64,
}

fn default_max_attempts() -> u32 {
    3
}
fn default_initial_delay() -> Duration {
    Duration::from_secs(1)
}
fn default_max_delay() -> Duration {
    Duration::from_secs(60)
}
fn default_multiplier() -> f64 {
    2.0
}
fn default_jitter() -> f64 {
    0.5
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: default_max_attempts(),
            initial_delay: default_initial_delay(),
            max_delay: default_max_delay(),
            multiplier: default_multiplier(),
            jitter: default_jitter(),
        }
    }
}

impl RetryPolicy {
    /// A single attempt, no retry.
    pub fn none() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// Problems with the policy's numbers, as `(field, message)`.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.max_attempts == 0 || self.max_attempts > MAX_ATTEMPTS_LIMIT {
            out.push((
                "max_attempts",
                format!(
                    "must be between 1 and {MAX_ATTEMPTS_LIMIT}, got {}",
                    self.max_attempts
                ),
            ));
        }
        if !(self.multiplier >= 1.0 && self.multiplier.is_finite()) {
            out.push((
                "multiplier",
                format!("must be at least 1, got {}", self.multiplier),
            ));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            out.push((
                "jitter",
                format!("must be between 0 and 1, got {}", self.jitter),
            ));
        }
        if self.max_delay < self.initial_delay {
            out.push(("max_delay", "must not be shorter than initial_delay".into()));
        }
        out
    }

    /// Whether another attempt may follow attempt number `attempt` (1-based).
    pub fn allows_retry_after(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }

    /// The delay before the attempt that follows attempt number `attempt` (1-based), given a
    /// uniform random number `random` in [0, 1) supplied by the caller (the core draws no
    /// randomness itself).
    pub fn delay_after(&self, attempt: u32, random: f64) -> Duration {
        let exponent = attempt.saturating_sub(1).min(64) as i32;
        let base = self.initial_delay.as_secs_f64() * self.multiplier.powi(exponent);
        let base = base.min(self.max_delay.as_secs_f64());
        let spread = base * self.jitter.clamp(0.0, 1.0);
        let delay = base - spread * random.clamp(0.0, 1.0);
        Duration::from_secs_f64(delay.max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_exponentially_up_to_the_cap() {
        let policy = RetryPolicy {
            max_attempts: 10,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(500),
            multiplier: 2.0,
            jitter: 0.0,
        };
        assert_eq!(policy.delay_after(1, 0.7), Duration::from_millis(100));
        assert_eq!(policy.delay_after(2, 0.7), Duration::from_millis(200));
        assert_eq!(policy.delay_after(3, 0.7), Duration::from_millis(400));
        assert_eq!(policy.delay_after(4, 0.7), Duration::from_millis(500));
    }

    #[test]
    fn jitter_spreads_the_delay_below_the_base() {
        let policy = RetryPolicy {
            jitter: 1.0,
            ..RetryPolicy::default()
        };
        assert_eq!(policy.delay_after(1, 0.0), Duration::from_secs(1));
        assert_eq!(policy.delay_after(1, 0.5), Duration::from_millis(500));
        assert!(policy.delay_after(1, 0.999) < Duration::from_millis(2));
    }

    #[test]
    fn attempts_stop_at_the_maximum() {
        let policy = RetryPolicy {
            max_attempts: 2,
            ..RetryPolicy::default()
        };
        assert!(policy.allows_retry_after(1));
        assert!(!policy.allows_retry_after(2));
        assert!(!RetryPolicy {
            max_attempts: 0,
            ..RetryPolicy::default()
        }
        .problems()
        .is_empty());
    }
}
