//! Login throttling, held in memory: slows password guessing against one account and from one
//! client address (OWASP Authentication Cheat Sheet, "Protect Against Automated Attacks";
//! NIST SP 800-63B section 5.2.2, "Rate Limiting").
//!
//! Failures are counted per account key and per client address within a window. Reaching the
//! limit locks that key for a while; each further lockout of the same key doubles the time, up
//! to a ceiling. A success clears the account's count but not the address's, so one valid
//! account does not let an attacker reset the address limit.
//!
//! **The throttle must never reveal whether an account exists.** The account key is what the
//! user typed (normalize it with [`normalize_account_key`]), whether or not an account has that
//! email: unknown accounts are counted, locked and answered exactly like known ones.
//!
//! Memory is bounded: at most `keys_max` entries per kind of key. When full, expired entries go
//! first, then the least recently touched tenth. That eviction can unlock a key early under a
//! flood of distinct keys; the per-address limit and the cost of such a flood keep that
//! acceptable for a single server. State is lost on restart and not shared between servers.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use arches_core::Timestamp;
use sha2::{Digest, Sha256};

/// Keys longer than this many bytes are stored as their SHA-256 so that an entry stays small;
/// 320 bytes holds any valid email address (RFC 5321 section 4.5.3.1 limits a path to 256).
const KEY_BYTES_MAX: usize = 320;

/// Too many failed attempts: try again after `retry_after_secs` seconds (the value of an HTTP
/// `Retry-After` header, RFC 9110 section 10.2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many failed attempts, retry after {retry_after_secs} s")]
pub struct Throttled {
    /// Whole seconds until the lock ends, rounded up, at least 1.
    pub retry_after_secs: u64,
}

/// The limits of a [`LoginThrottle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleConfig {
    /// Failures of one account key within `window` that lock it; default 5.
    pub account_failures_max: u32,
    /// Failures from one client address within `window` that lock it; default 20, higher
    /// because several people may share an address.
    pub ip_failures_max: u32,
    /// How long failures and lockout history are remembered after the last failure or the end
    /// of the last lockout, whichever is later; default 15 minutes.
    pub window: Duration,
    /// The first lockout; default 1 minute. Each further lockout of the same key doubles it.
    pub lockout_base: Duration,
    /// The longest lockout; default 15 minutes.
    pub lockout_max: Duration,
    /// The most entries kept per kind of key (accounts, addresses); default 100 000.
    pub keys_max: usize,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        Self {
            account_failures_max: 5,
            ip_failures_max: 20,
            window: Duration::from_secs(15 * 60),
            lockout_base: Duration::from_secs(60),
            lockout_max: Duration::from_secs(15 * 60),
            keys_max: 100_000,
        }
    }
}

/// The canonical account key of what the user typed as email: trimmed and lowercased
/// (Unicode lowercase), so that `Ada@Example.com ` and `ada@example.com` share one counter.
pub fn normalize_account_key(typed: &str) -> String {
    typed.trim().to_lowercase()
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Failures since the last lockout (or since the entry was created).
    failures: u32,
    /// Lockouts so far; the next lockout lasts `lockout_base * 2^lockouts`.
    lockouts: u32,
    locked_until: Option<Timestamp>,
    last_failure: Timestamp,
}

impl Entry {
    /// Whether the entry has no effect any more: not locked, and neither a failure nor the end
    /// of a lockout within the window. Counting from the end of the lockout keeps the doubling
    /// going for an attacker who waits out each lockout and tries again.
    fn is_expired(&self, now: Timestamp, window: Duration) -> bool {
        let locked = self.locked_until.is_some_and(|until| until > now);
        let last_activity = self
            .locked_until
            .map_or(self.last_failure, |until| until.max(self.last_failure));
        !locked && now.since(last_activity) >= window
    }
}

#[derive(Debug)]
struct Table {
    entries: HashMap<String, Entry>,
}

impl Table {
    fn new() -> Self {
        Self {
            entries: HashMap::new(),
        }
    }

    fn locked_for(&self, key: &str, now: Timestamp) -> Option<Duration> {
        let until = self.entries.get(key)?.locked_until?;
        (until > now).then(|| until.since(now))
    }

    fn record_failure(&mut self, key: String, now: Timestamp, limit: u32, config: &ThrottleConfig) {
        if !self.entries.contains_key(&key) {
            self.make_room(now, config);
        }
        let entry = self.entries.entry(key).or_insert(Entry {
            failures: 0,
            lockouts: 0,
            locked_until: None,
            last_failure: now,
        });
        if entry.is_expired(now, config.window) {
            *entry = Entry {
                failures: 0,
                lockouts: 0,
                locked_until: None,
                last_failure: now,
            };
        }
        entry.last_failure = now;
        entry.failures = entry.failures.saturating_add(1);
        if entry.failures >= limit {
            let lockout = lockout_duration(entry.lockouts, config);
            entry.locked_until = Some(now.plus(lockout));
            entry.lockouts = entry.lockouts.saturating_add(1);
            entry.failures = 0;
        }
    }

    /// Keeps the table under `keys_max` before one insertion. When full, drops expired entries
    /// and then, if less than a tenth of the room is free, the least recently failed entries
    /// until a tenth is free. Each pass costs O(n) and frees at least n/10 slots, so the cost
    /// per insertion stays O(1) amortized.
    fn make_room(&mut self, now: Timestamp, config: &ThrottleConfig) {
        let keys_max = config.keys_max.max(1);
        if self.entries.len() < keys_max {
            return;
        }
        self.entries
            .retain(|_, entry| !entry.is_expired(now, config.window));
        let target = keys_max - (keys_max / 10).max(1);
        if self.entries.len() <= target {
            return;
        }
        let evict = self.entries.len() - target;
        let mut by_age: Vec<(Timestamp, String)> = self
            .entries
            .iter()
            .map(|(key, entry)| (entry.last_failure, key.clone()))
            .collect();
        by_age.select_nth_unstable_by_key(evict - 1, |(last_failure, _)| *last_failure);
        for (_, key) in by_age.into_iter().take(evict) {
            self.entries.remove(&key);
        }
    }
}

/// `lockout_base * 2^lockouts`, at most `lockout_max`.
fn lockout_duration(lockouts: u32, config: &ThrottleConfig) -> Duration {
    let factor = 1u32.checked_shl(lockouts.min(31)).unwrap_or(u32::MAX);
    config
        .lockout_base
        .checked_mul(factor)
        .unwrap_or(config.lockout_max)
        .min(config.lockout_max)
}

fn stored_key(key: &str) -> String {
    if key.len() <= KEY_BYTES_MAX {
        key.to_owned()
    } else {
        format!("sha256:{}", hex::encode(Sha256::digest(key.as_bytes())))
    }
}

#[derive(Debug)]
struct State {
    accounts: Table,
    addresses: Table,
}

/// Counts failed sign-ins per account key and per client address, and locks them.
///
/// Thread-safe; share it behind an `Arc`. Every method takes `now`, so tests drive time by hand.
/// Each call holds one mutex for microseconds (except a rare O(`keys_max`) eviction).
#[derive(Debug)]
pub struct LoginThrottle {
    config: ThrottleConfig,
    state: Mutex<State>,
}

impl LoginThrottle {
    /// A throttle with the given limits.
    pub fn new(config: ThrottleConfig) -> Self {
        Self {
            config,
            state: Mutex::new(State {
                accounts: Table::new(),
                addresses: Table::new(),
            }),
        }
    }

    /// The limits in force.
    pub fn config(&self) -> ThrottleConfig {
        self.config
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the tables inconsistent in a way that
        // matters (at worst one count is off), so a poisoned lock is used as it is.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a sign-in attempt for `account_key` from `ip` may go ahead at `now`.
    ///
    /// Call it before checking the password, for known and unknown accounts alike.
    ///
    /// # Errors
    /// [`Throttled`] when the account key or the address is locked, with the longer of the two
    /// remaining times.
    pub fn check(&self, account_key: &str, ip: &str, now: Timestamp) -> Result<(), Throttled> {
        let state = self.state();
        let account = state.accounts.locked_for(&stored_key(account_key), now);
        let address = state.addresses.locked_for(&stored_key(ip), now);
        match account.max(address) {
            None => Ok(()),
            Some(remaining) => Err(Throttled {
                retry_after_secs: remaining.as_micros().div_ceil(1_000_000).max(1) as u64,
            }),
        }
    }

    /// Counts a failed attempt (wrong password, unknown account, wrong second factor) for
    /// `account_key` and for `ip` at `now`, locking either when it reaches its limit.
    pub fn record_failure(&self, account_key: &str, ip: &str, now: Timestamp) {
        let mut state = self.state();
        let config = self.config;
        state.accounts.record_failure(
            stored_key(account_key),
            now,
            config.account_failures_max.max(1),
            &config,
        );
        state
            .addresses
            .record_failure(stored_key(ip), now, config.ip_failures_max.max(1), &config);
    }

    /// Clears the account key's failures and lockout history after a successful sign-in. The
    /// address's count is kept (see the module docs). `ip` and `now` are taken for symmetry and
    /// future use.
    pub fn record_success(&self, account_key: &str, _ip: &str, _now: Timestamp) {
        self.state()
            .accounts
            .entries
            .remove(&stored_key(account_key));
    }

    /// The number of account keys and of addresses held, for metrics and tests.
    pub fn tracked_keys(&self) -> (usize, usize) {
        let state = self.state();
        (state.accounts.entries.len(), state.addresses.entries.len())
    }
}

impl Default for LoginThrottle {
    fn default() -> Self {
        Self::new(ThrottleConfig::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const START: Timestamp = Timestamp(1_750_000_000_000_000);

    fn after(seconds: u64) -> Timestamp {
        START.plus(Duration::from_secs(seconds))
    }

    fn fail(throttle: &LoginThrottle, account: &str, ip: &str, times: u32, now: Timestamp) {
        for _ in 0..times {
            throttle.record_failure(account, ip, now);
        }
    }

    #[test]
    fn five_failures_lock_the_account_for_a_minute() {
        let throttle = LoginThrottle::default();
        fail(&throttle, "ada@example.com", "10.0.0.1", 4, START);
        assert_eq!(throttle.check("ada@example.com", "10.0.0.1", START), Ok(()));
        throttle.record_failure("ada@example.com", "10.0.0.1", START);
        assert_eq!(
            throttle.check("ada@example.com", "10.0.0.1", START),
            Err(Throttled {
                retry_after_secs: 60
            })
        );
        // From another address too: the lock is on the account.
        assert_eq!(
            throttle.check("ada@example.com", "10.0.0.2", after(59)),
            Err(Throttled {
                retry_after_secs: 1
            })
        );
        assert_eq!(
            throttle.check("ada@example.com", "10.0.0.2", after(60)),
            Ok(())
        );
        // Another account from the same address is not locked.
        assert_eq!(throttle.check("bob@example.com", "10.0.0.1", START), Ok(()));
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let throttle = LoginThrottle::default();
        fail(&throttle, "ada@example.com", "10.0.0.1", 5, START);
        let now = START.plus(Duration::from_millis(59_500));
        assert_eq!(
            throttle.check("ada@example.com", "10.0.0.1", now),
            Err(Throttled {
                retry_after_secs: 1
            })
        );
    }

    #[test]
    fn each_further_lockout_doubles_up_to_the_ceiling() {
        let throttle = LoginThrottle::default();
        let mut now = START;
        for expected_seconds in [60, 120, 240, 480, 900, 900] {
            fail(&throttle, "ada@example.com", "10.0.0.1", 5, now);
            assert_eq!(
                throttle.check("ada@example.com", "10.0.0.9", now),
                Err(Throttled {
                    retry_after_secs: expected_seconds
                })
            );
            now = now.plus(Duration::from_secs(expected_seconds));
            assert_eq!(throttle.check("ada@example.com", "10.0.0.9", now), Ok(()));
        }
    }

    #[test]
    fn failures_older_than_the_window_are_forgotten() {
        let throttle = LoginThrottle::default();
        fail(&throttle, "ada@example.com", "10.0.0.1", 4, START);
        // Fifteen minutes after the last failure the count starts over.
        fail(&throttle, "ada@example.com", "10.0.0.1", 4, after(15 * 60));
        assert_eq!(
            throttle.check("ada@example.com", "10.0.0.1", after(15 * 60)),
            Ok(())
        );
        // The lockout history is forgotten too: the next lockout is one minute again.
        fail(&throttle, "ada@example.com", "10.0.0.1", 1, after(15 * 60));
        assert_eq!(
            throttle.check("ada@example.com", "10.0.0.1", after(15 * 60)),
            Err(Throttled {
                retry_after_secs: 60
            })
        );
    }

    #[test]
    fn success_clears_the_account_but_not_the_address() {
        let config = ThrottleConfig {
            ip_failures_max: 6,
            ..ThrottleConfig::default()
        };
        let throttle = LoginThrottle::new(config);
        fail(&throttle, "ada@example.com", "10.0.0.1", 4, START);
        throttle.record_success("ada@example.com", "10.0.0.1", START);
        fail(&throttle, "ada@example.com", "10.0.0.1", 1, START);
        assert_eq!(throttle.check("ada@example.com", "10.0.0.1", START), Ok(()));
        // The address has 5 failures; the sixth locks it for every account.
        fail(&throttle, "bob@example.com", "10.0.0.1", 1, START);
        assert_eq!(
            throttle.check("carol@example.com", "10.0.0.1", START),
            Err(Throttled {
                retry_after_secs: 60
            })
        );
        assert_eq!(
            throttle.check("carol@example.com", "10.0.0.2", START),
            Ok(())
        );
    }

    #[test]
    fn twenty_failures_from_one_address_lock_it_across_accounts() {
        let throttle = LoginThrottle::default();
        for n in 0..19 {
            throttle.record_failure(&format!("user{n}@example.com"), "10.0.0.1", START);
        }
        assert_eq!(throttle.check("new@example.com", "10.0.0.1", START), Ok(()));
        throttle.record_failure("user19@example.com", "10.0.0.1", START);
        assert!(throttle
            .check("new@example.com", "10.0.0.1", START)
            .is_err());
    }

    #[test]
    fn unknown_and_known_accounts_are_throttled_alike() {
        // The throttle has no notion of existence: any typed key behaves the same.
        let throttle = LoginThrottle::default();
        fail(&throttle, "exists@example.com", "10.0.0.1", 5, START);
        fail(&throttle, "nobody@example.com", "10.0.0.2", 5, START);
        assert_eq!(
            throttle.check("exists@example.com", "10.0.0.3", START),
            throttle.check("nobody@example.com", "10.0.0.3", START)
        );
    }

    #[test]
    fn account_keys_are_normalized_by_the_helper() {
        assert_eq!(
            normalize_account_key("  Ada@Example.COM "),
            "ada@example.com"
        );
    }

    #[test]
    fn the_tables_never_exceed_keys_max() {
        let config = ThrottleConfig {
            keys_max: 50,
            ip_failures_max: 1_000,
            ..ThrottleConfig::default()
        };
        let throttle = LoginThrottle::new(config);
        for n in 0..500u64 {
            throttle.record_failure(
                &format!("user{n}@example.com"),
                &format!("10.0.{n}.1"),
                after(n),
            );
            let (accounts, addresses) = throttle.tracked_keys();
            assert!(accounts <= 50 && addresses <= 50, "{accounts} {addresses}");
        }
        // The most recent keys survive eviction.
        fail(&throttle, "user499@example.com", "10.0.0.1", 4, after(499));
        assert!(throttle
            .check("user499@example.com", "10.0.0.1", after(499))
            .is_err());
    }

    #[test]
    fn expired_entries_are_dropped_first_when_full() {
        let config = ThrottleConfig {
            keys_max: 10,
            ..ThrottleConfig::default()
        };
        let throttle = LoginThrottle::new(config);
        // Nine accounts failed at the start and one ten minutes later.
        for n in 0..9 {
            throttle.record_failure(&format!("stale{n}@example.com"), "10.0.0.1", START);
        }
        throttle.record_failure("recent@example.com", "10.0.0.1", after(10 * 60));
        // Sixteen minutes in, the nine have left the window; a new key makes room by dropping
        // them and keeps the recent one.
        throttle.record_failure("fresh@example.com", "10.0.0.2", after(16 * 60));
        assert_eq!(throttle.tracked_keys().0, 2);
        assert!(throttle
            .check("recent@example.com", "10.0.0.3", after(16 * 60))
            .is_ok());
    }

    #[test]
    fn overlong_keys_are_stored_hashed() {
        let throttle = LoginThrottle::default();
        let long = "a".repeat(10_000);
        fail(&throttle, &long, "10.0.0.1", 5, START);
        assert!(throttle.check(&long, "10.0.0.2", START).is_err());
        let state = throttle.state();
        assert!(state
            .accounts
            .entries
            .keys()
            .all(|key| key.len() <= KEY_BYTES_MAX));
    }
}
