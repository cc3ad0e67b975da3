//! Passwords: the policy a new password must meet, and Argon2id hashing.
//!
//! The policy follows NIST SP 800-63B section 5.1.1.2: a length floor and ceiling counted in
//! characters, no composition rules, and a refusal of passwords that are among the most common
//! or equal to the account's own identifiers.
//!
//! Hashing uses Argon2id (RFC 9106) with the OWASP Password Storage Cheat Sheet minimum as the
//! default. Both checking the policy and hashing are CPU bound (hashing takes tens of
//! milliseconds by design): async callers must run them in `tokio::task::spawn_blocking`.
//!
//! This module must never log or echo a password, nor put one in an error.

use std::sync::OnceLock;

use argon2::password_hash::{PasswordHash, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use rand::rngs::OsRng;
use rand::TryRngCore;

use crate::AuthError;

/// The longest password, in bytes, that [`PasswordHasher`] accepts.
///
/// The policy's ceiling is 128 characters, at most 512 bytes of UTF-8; this bound keeps the
/// hasher's input bounded even when a caller skips the policy (for example at sign-in).
pub const PASSWORD_BYTES_MAX: usize = 1024;

/// The highest rank in the common-password list that [`PasswordPolicy::check`] refuses.
///
/// The list is the "passwords" frequency dictionary that the `zxcvbn` crate embeds (the
/// dictionary of Dropbox's zxcvbn, built from leaked password corpora, most common first).
pub const COMMON_PASSWORD_RANK_MAX: usize = 10_000;

/// Why the policy refused a password. Messages are lowercase and never contain the password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PasswordError {
    /// The password has fewer than `min` characters (Unicode scalar values).
    #[error("password must have at least {min} characters")]
    TooShort {
        /// The floor in characters.
        min: usize,
    },
    /// The password has more than `max` characters (Unicode scalar values).
    #[error("password must have at most {max} characters")]
    TooLong {
        /// The ceiling in characters.
        max: usize,
    },
    /// The password is among the most common passwords (compared case-insensitively), see
    /// [`COMMON_PASSWORD_RANK_MAX`].
    #[error("password is too common")]
    Common,
    /// The password equals the account's email address, its local part, or its user name
    /// (compared case-insensitively).
    #[error("password must not be the same as the email address or user name")]
    SameAsContext,
}

/// The rules a new password must meet (NIST SP 800-63B section 5.1.1.2).
///
/// Lengths count characters (Unicode scalar values), not bytes, so that a passphrase in any
/// script gets the same allowance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PasswordPolicy {
    /// Fewest characters; default 8, the NIST SP 800-63B floor for user-chosen passwords.
    pub min_chars: usize,
    /// Most characters; default 128, above the NIST floor of 64 for the maximum and well below
    /// [`PASSWORD_BYTES_MAX`].
    pub max_chars: usize,
}

impl Default for PasswordPolicy {
    fn default() -> Self {
        Self {
            min_chars: 8,
            max_chars: 128,
        }
    }
}

impl PasswordPolicy {
    /// Checks a new password against the policy.
    ///
    /// `context` holds the identifiers of the account (email address, user name); the password
    /// must not equal any of them, nor the local part of an email address, case-insensitively.
    ///
    /// The common-password test runs `zxcvbn` and refuses the password when zxcvbn's best
    /// explanation of the whole password is a single entry of its "passwords" dictionary with a
    /// rank of at most [`COMMON_PASSWORD_RANK_MAX`], or when zxcvbn estimates it would fall
    /// within that many guesses in any case (for example `12345678` as a sequence). It costs a
    /// few milliseconds: run it off the async executor.
    ///
    /// # Errors
    /// The first rule broken, in this order: [`PasswordError::TooShort`],
    /// [`PasswordError::TooLong`], [`PasswordError::SameAsContext`], [`PasswordError::Common`].
    pub fn check(&self, password: &str, context: &[&str]) -> Result<(), PasswordError> {
        let chars = password.chars().count();
        if chars < self.min_chars {
            return Err(PasswordError::TooShort {
                min: self.min_chars,
            });
        }
        if chars > self.max_chars {
            return Err(PasswordError::TooLong {
                max: self.max_chars,
            });
        }
        if equals_context(password, context) {
            return Err(PasswordError::SameAsContext);
        }
        if is_common(password) {
            return Err(PasswordError::Common);
        }
        Ok(())
    }
}

fn equals_context(password: &str, context: &[&str]) -> bool {
    let password = password.to_lowercase();
    context.iter().any(|item| {
        let item = item.trim().to_lowercase();
        if item.is_empty() {
            return false;
        }
        if password == item {
            return true;
        }
        match item.split_once('@') {
            Some((local, _domain)) => !local.is_empty() && password == local,
            None => false,
        }
    })
}

fn is_common(password: &str) -> bool {
    let entropy = zxcvbn::zxcvbn(password, &[]);
    let whole_password_is_common_entry = entropy.sequence().iter().any(|found| {
        let covers_all = found.i == 0 && found.j + 1 == password.chars().count();
        covers_all
            && matches!(
                &found.pattern,
                zxcvbn::matching::patterns::MatchPattern::Dictionary(entry)
                    if is_passwords_dictionary(entry)
                        && entry.rank <= COMMON_PASSWORD_RANK_MAX
                        && !entry.reversed
                        && !entry.l33t
            )
    });
    whole_password_is_common_entry || entropy.guesses() <= COMMON_PASSWORD_RANK_MAX as u64
}

/// zxcvbn does not export the type of `dictionary_name`, only its `Debug` form, which is the
/// variant name: "Passwords" for the leaked-password frequency list.
fn is_passwords_dictionary(entry: &zxcvbn::matching::patterns::DictionaryPattern) -> bool {
    format!("{:?}", entry.dictionary_name) == "Passwords"
}

/// Argon2id cost parameters.
///
/// The default is the OWASP Password Storage Cheat Sheet minimum for Argon2id:
/// m = 19 456 KiB (19 MiB), t = 2, p = 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashParams {
    /// Memory cost in KiB.
    pub memory_kib: u32,
    /// Number of passes over the memory.
    pub iterations: u32,
    /// Degree of parallelism (lanes).
    pub parallelism: u32,
}

impl Default for HashParams {
    fn default() -> Self {
        Self {
            memory_kib: 19_456,
            iterations: 2,
            parallelism: 1,
        }
    }
}

/// The equally strong Argon2id configurations of the OWASP Password Storage Cheat Sheet, as
/// `(memory KiB, passes)` with one lane each.
const OWASP_ARGON2ID_MINIMUMS: [(u32, u32); 5] = [
    (47_104, 1),
    (19_456, 2),
    (12_288, 3),
    (9_216, 4),
    (7_168, 5),
];

/// Limits on the parameters read from a stored hash, so that a corrupted or hostile row cannot
/// make one verification take gigabytes or minutes.
const STORED_MEMORY_KIB_MAX: u32 = 1_048_576;
const STORED_ITERATIONS_MAX: u32 = 64;
const STORED_PARALLELISM_MAX: u32 = 64;

/// The salt length in bytes; RFC 9106 section 3.1 recommends 16.
const SALT_BYTES: usize = 16;

impl HashParams {
    /// Whether these parameters meet at least one row of the OWASP Password Storage Cheat
    /// Sheet's Argon2id table (more memory or more passes than a row is also fine).
    pub fn meets_owasp_minimum(&self) -> bool {
        self.parallelism >= 1
            && OWASP_ARGON2ID_MINIMUMS.iter().any(|&(memory_kib, passes)| {
                self.memory_kib >= memory_kib && self.iterations >= passes
            })
    }

    fn to_argon2(self) -> Result<Params, AuthError> {
        Params::new(self.memory_kib, self.iterations, self.parallelism, None)
            .map_err(|error| AuthError::InvalidHashParams(error.to_string()))
    }
}

/// Hashes and verifies passwords with Argon2id (RFC 9106), producing PHC strings such as
/// `$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>`.
///
/// Every method is CPU heavy (tens of milliseconds with the default parameters): async callers
/// must run it in `tokio::task::spawn_blocking`. The hasher is cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct PasswordHasher {
    params: HashParams,
    argon2: Argon2<'static>,
    /// A hash of a fixed password made with `params`, for [`PasswordHasher::verify_dummy`].
    dummy_phc: OnceLock<String>,
}

impl PasswordHasher {
    /// A hasher with the given parameters.
    ///
    /// Computes one hash up front (for [`PasswordHasher::verify_dummy`]), so construction costs
    /// as much as one [`PasswordHasher::hash`].
    ///
    /// # Errors
    /// [`AuthError::WeakHashParams`] when the parameters are below the OWASP minimum (see
    /// [`HashParams::meets_owasp_minimum`]); [`AuthError::InvalidHashParams`] when Argon2
    /// refuses them (for example more than 2^24 - 1 lanes).
    pub fn new(params: HashParams) -> Result<Self, AuthError> {
        if !params.meets_owasp_minimum() {
            return Err(AuthError::WeakHashParams {
                memory_kib: params.memory_kib,
                iterations: params.iterations,
                parallelism: params.parallelism,
            });
        }
        Self::build(params)
    }

    /// A hasher with the OWASP minimum parameters ([`HashParams::default`]).
    ///
    /// # Errors
    /// As [`PasswordHasher::new`]; does not fail in practice.
    pub fn owasp_default() -> Result<Self, AuthError> {
        Self::new(HashParams::default())
    }

    /// A hasher with the given memory cost in KiB, passes and lanes.
    ///
    /// # Errors
    /// As [`PasswordHasher::new`].
    pub fn with_params(
        memory_kib: u32,
        iterations: u32,
        parallelism: u32,
    ) -> Result<Self, AuthError> {
        Self::new(HashParams {
            memory_kib,
            iterations,
            parallelism,
        })
    }

    /// A deliberately weak hasher (m = 8 KiB, t = 1, p = 1) so that tests run fast.
    ///
    /// **Never use it outside tests**: such hashes fall to a brute-force attack quickly.
    pub fn insecure_for_tests() -> Self {
        let params = HashParams {
            memory_kib: 8,
            iterations: 1,
            parallelism: 1,
        };
        Self {
            params,
            argon2: Argon2::new(
                Algorithm::Argon2id,
                Version::V0x13,
                Params::new(8, 1, 1, None).unwrap_or_default(),
            ),
            dummy_phc: OnceLock::new(),
        }
    }

    fn build(params: HashParams) -> Result<Self, AuthError> {
        let hasher = Self {
            params,
            argon2: Argon2::new(Algorithm::Argon2id, Version::V0x13, params.to_argon2()?),
            dummy_phc: OnceLock::new(),
        };
        let dummy = hasher.hash("arches-dummy-password-for-unknown-accounts")?;
        // Ignoring the result is right: the cell was empty, it was created just above.
        let _ = hasher.dummy_phc.set(dummy);
        Ok(hasher)
    }

    /// The parameters new hashes are made with.
    pub fn params(&self) -> HashParams {
        self.params
    }

    /// Hashes `password` with a fresh random 16-byte salt from the operating system.
    ///
    /// Returns a PHC string of about 97 characters.
    ///
    /// # Errors
    /// [`AuthError::PasswordTooLong`] past [`PASSWORD_BYTES_MAX`] bytes;
    /// [`AuthError::Hashing`] when the OS random source or Argon2 fails.
    pub fn hash(&self, password: &str) -> Result<String, AuthError> {
        check_length(password)?;
        let mut salt = [0u8; SALT_BYTES];
        OsRng
            .try_fill_bytes(&mut salt)
            .map_err(|error| AuthError::Hashing(format!("os random source: {error}")))?;
        let salt =
            SaltString::encode_b64(&salt).map_err(|error| AuthError::Hashing(error.to_string()))?;
        let hash = argon2::PasswordHasher::hash_password(&self.argon2, password.as_bytes(), &salt)
            .map_err(|error| AuthError::Hashing(error.to_string()))?;
        Ok(hash.to_string())
    }

    /// Verifies `password` against a stored PHC string, with the parameters recorded in it
    /// (so hashes made with older parameters still verify; see
    /// [`PasswordHasher::needs_rehash`]). The comparison is constant-time.
    ///
    /// Returns `Ok(false)` for a wrong password.
    ///
    /// # Errors
    /// [`AuthError::MalformedHash`] when `phc` is not an Argon2 PHC string with a salt and a
    /// hash, or its parameters exceed 1 GiB of memory, 64 passes or 64 lanes;
    /// [`AuthError::PasswordTooLong`] past [`PASSWORD_BYTES_MAX`] bytes;
    /// [`AuthError::Hashing`] when Argon2 fails.
    pub fn verify(&self, password: &str, phc: &str) -> Result<bool, AuthError> {
        check_length(password)?;
        let parsed = parse_phc(phc)?;
        match self.argon2.verify_password(password.as_bytes(), &parsed) {
            Ok(()) => Ok(true),
            Err(argon2::password_hash::Error::Password) => Ok(false),
            Err(error) => Err(AuthError::Hashing(error.to_string())),
        }
    }

    /// Spends the same work as [`PasswordHasher::verify`] against a fixed hash made with this
    /// hasher's parameters, and forgets the result.
    ///
    /// Call it when the account does not exist, so that the response time does not reveal
    /// whether an account exists (OWASP Authentication Cheat Sheet, "Authentication Responses").
    /// Passwords over [`PASSWORD_BYTES_MAX`] bytes return at once, as `verify` does.
    pub fn verify_dummy(&self, password: &str) {
        let dummy = self.dummy_phc.get_or_init(|| {
            self.hash("arches-dummy-password-for-unknown-accounts")
                .unwrap_or_default()
        });
        let _ = self.verify(password, dummy);
    }

    /// Whether a stored hash should be replaced by a fresh one at the next successful sign-in:
    /// it is not Argon2id version 19, or its memory cost, passes or lanes are below this
    /// hasher's. A malformed hash also needs rehashing.
    pub fn needs_rehash(&self, phc: &str) -> bool {
        let Ok(parsed) = parse_phc(phc) else {
            return true;
        };
        if parsed.algorithm != Algorithm::Argon2id.ident() || parsed.version != Some(0x13) {
            return true;
        }
        let Ok(stored) = Params::try_from(&parsed) else {
            return true;
        };
        stored.m_cost() < self.params.memory_kib
            || stored.t_cost() < self.params.iterations
            || stored.p_cost() < self.params.parallelism
    }
}

fn check_length(password: &str) -> Result<(), AuthError> {
    if password.len() > PASSWORD_BYTES_MAX {
        return Err(AuthError::PasswordTooLong {
            max_bytes: PASSWORD_BYTES_MAX,
        });
    }
    Ok(())
}

fn parse_phc(phc: &str) -> Result<PasswordHash<'_>, AuthError> {
    let parsed =
        PasswordHash::new(phc).map_err(|error| AuthError::MalformedHash(error.to_string()))?;
    if Algorithm::try_from(parsed.algorithm).is_err() {
        return Err(AuthError::MalformedHash("not an argon2 hash".into()));
    }
    if parsed.salt.is_none() || parsed.hash.is_none() {
        return Err(AuthError::MalformedHash("salt or hash missing".into()));
    }
    let params =
        Params::try_from(&parsed).map_err(|error| AuthError::MalformedHash(error.to_string()))?;
    if params.m_cost() > STORED_MEMORY_KIB_MAX
        || params.t_cost() > STORED_ITERATIONS_MAX
        || params.p_cost() > STORED_PARALLELISM_MAX
    {
        return Err(AuthError::MalformedHash(
            "parameters exceed the limits".into(),
        ));
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_common_passwords_are_refused() {
        let policy = PasswordPolicy::default();
        for password in ["password", "12345678", "qwertyuiop", "PassWord", "iloveyou"] {
            assert_eq!(
                policy.check(password, &[]),
                Err(PasswordError::Common),
                "{password}"
            );
        }
    }

    #[test]
    fn a_strong_random_phrase_is_accepted() {
        let policy = PasswordPolicy::default();
        assert_eq!(
            policy.check("correct-horse-battery-staple-Kq7!", &[]),
            Ok(())
        );
        assert_eq!(policy.check("tulip vortex gravel 93 mango", &[]), Ok(()));
    }

    #[test]
    fn length_is_counted_in_characters_not_bytes() {
        let policy = PasswordPolicy::default();
        // Seven characters, 21 bytes: too short although it has more than 8 bytes.
        assert_eq!(
            policy.check("日本語のパスワ", &[]),
            Err(PasswordError::TooShort { min: 8 })
        );
        // 128 three-byte characters (384 bytes) are within the 128-character ceiling.
        let long: String = "語".repeat(128);
        assert_ne!(
            policy.check(&long, &[]),
            Err(PasswordError::TooLong { max: 128 })
        );
        let too_long: String = "a".repeat(129);
        assert_eq!(
            policy.check(&too_long, &[]),
            Err(PasswordError::TooLong { max: 128 })
        );
    }

    #[test]
    fn a_password_equal_to_the_email_or_name_is_refused() {
        let policy = PasswordPolicy::default();
        let context = ["Ada.Lovelace@Example.com", "analytical-engine"];
        assert_eq!(
            policy.check("ada.lovelace@example.com", &context),
            Err(PasswordError::SameAsContext)
        );
        assert_eq!(
            policy.check("ADA.LOVELACE", &context),
            Err(PasswordError::SameAsContext)
        );
        assert_eq!(
            policy.check("Analytical-Engine", &context),
            Err(PasswordError::SameAsContext)
        );
        assert_eq!(
            policy.check("ada lovelace wrote the first program", &context),
            Ok(())
        );
    }

    #[test]
    fn the_default_parameters_are_the_owasp_minimum() {
        let params = HashParams::default();
        assert_eq!(
            (params.memory_kib, params.iterations, params.parallelism),
            (19_456, 2, 1)
        );
        assert!(params.meets_owasp_minimum());
        assert!(HashParams {
            memory_kib: 47_104,
            iterations: 1,
            parallelism: 1
        }
        .meets_owasp_minimum());
    }

    #[test]
    fn parameters_below_the_owasp_minimum_are_refused() {
        let error = PasswordHasher::with_params(4_096, 2, 1).unwrap_err();
        assert!(matches!(error, AuthError::WeakHashParams { .. }), "{error}");
        let error = PasswordHasher::with_params(19_456, 1, 1).unwrap_err();
        assert!(matches!(error, AuthError::WeakHashParams { .. }), "{error}");
        let error = PasswordHasher::with_params(19_456, 2, 0).unwrap_err();
        assert!(matches!(error, AuthError::WeakHashParams { .. }), "{error}");
    }

    #[test]
    fn a_hash_verifies_only_its_own_password() {
        let hasher = PasswordHasher::insecure_for_tests();
        let phc = hasher.hash("tulip vortex gravel").unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=8,t=1,p=1$"), "{phc}");
        assert!(hasher.verify("tulip vortex gravel", &phc).unwrap());
        assert!(!hasher.verify("tulip vortex grave1", &phc).unwrap());
        // A fresh salt each time.
        assert_ne!(phc, hasher.hash("tulip vortex gravel").unwrap());
    }

    #[test]
    fn the_owasp_default_hasher_hashes_and_verifies() {
        let hasher = PasswordHasher::owasp_default().unwrap();
        let phc = hasher.hash("tulip vortex gravel").unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(hasher.verify("tulip vortex gravel", &phc).unwrap());
        assert!(!hasher.needs_rehash(&phc));
        hasher.verify_dummy("anything");
    }

    #[test]
    fn a_malformed_hash_is_an_error_not_a_mismatch() {
        let hasher = PasswordHasher::insecure_for_tests();
        for phc in [
            "",
            "not a hash",
            "$argon2id$v=19$m=8,t=1,p=1$",
            "$pbkdf2-sha256$i=1000$c2FsdHNhbHQ$aGFzaGhhc2g",
            "$argon2id$v=19$m=4194304,t=1,p=1$c2FsdHNhbHRzYWx0c2FsdA$aGFzaGhhc2doYXNoaGFzaGhhc2doYXNoaGFzaGhhc2g",
        ] {
            let error = hasher.verify("password", phc).unwrap_err();
            assert!(matches!(error, AuthError::MalformedHash(_)), "{phc}: {error}");
        }
    }

    #[test]
    fn an_overlong_password_is_refused_before_hashing() {
        let hasher = PasswordHasher::insecure_for_tests();
        let long = "a".repeat(PASSWORD_BYTES_MAX + 1);
        assert!(matches!(
            hasher.hash(&long),
            Err(AuthError::PasswordTooLong { max_bytes: 1024 })
        ));
        let phc = hasher.hash("short").unwrap();
        assert!(matches!(
            hasher.verify(&long, &phc),
            Err(AuthError::PasswordTooLong { .. })
        ));
    }

    #[test]
    fn hashes_made_with_weaker_parameters_need_a_rehash() {
        let weak = PasswordHasher::insecure_for_tests();
        let strong = PasswordHasher::owasp_default().unwrap();
        let old = weak.hash("tulip vortex gravel").unwrap();
        assert!(strong.needs_rehash(&old));
        // The old hash still verifies with the stronger hasher.
        assert!(strong.verify("tulip vortex gravel", &old).unwrap());
        assert!(strong.needs_rehash("garbage"));
        assert!(!weak.needs_rehash(&old));
    }

    #[test]
    fn verify_dummy_spends_the_same_work_without_a_result() {
        let hasher = PasswordHasher::insecure_for_tests();
        hasher.verify_dummy("whatever the user typed");
        let dummy = hasher.dummy_phc.get().unwrap();
        assert!(dummy.starts_with("$argon2id$v=19$m=8,t=1,p=1$"));
    }
}
