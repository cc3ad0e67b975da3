//! Time-based one-time passwords (TOTP, RFC 6238) for two-step sign-in, and recovery codes.
//!
//! The parameters are those every authenticator app supports: HMAC-SHA-1, 6 digits, a 30 s
//! step (RFC 6238 section 5.2 recommends 30 s) and a 160-bit secret (RFC 4226 section 4
//! recommends 160 bits). A code is accepted for the current step and one step either side, to
//! absorb clock drift and typing time (RFC 6238 section 5.2 recommends at most one step of
//! "network delay"), and **never twice**: the caller stores the step each successful code
//! matched and passes it back, and a code for that step or an earlier one is refused as a
//! replay (RFC 6238 section 5.2: "the verifier MUST NOT accept the second attempt of the OTP
//! after the successful validation has been issued for the first OTP").
//!
//! The HOTP arithmetic comes from the `totp-rs` crate. This module must never log a secret,
//! a code or a recovery code.

use arches_core::Timestamp;
use rand::rngs::OsRng;
use rand::{Rng, RngCore, TryRngCore};
use subtle::ConstantTimeEq;
use totp_rs::{Algorithm, Secret, Totp};

use crate::opaque::hash_token;

/// The length of a generated secret in bytes: 20 (160 bits, RFC 4226 section 4).
pub const SECRET_BYTES: usize = 20;
/// The digits of a code: 6.
pub const DIGITS: u8 = 6;
/// The length of a time step in seconds: 30 (RFC 6238 section 5.2).
pub const STEP_SECONDS: u64 = 30;
/// How many steps either side of the current one are accepted: 1 (RFC 6238 section 5.2).
pub const SKEW_STEPS: u64 = 1;

/// The number of recovery codes a user gets by default: 10 (the usual count, as GitHub and
/// Google give).
pub const RECOVERY_CODES_DEFAULT: usize = 10;
/// The most recovery codes [`generate_recovery_codes`] makes at once.
pub const RECOVERY_CODES_MAX: usize = 32;

/// The characters of recovery codes: lowercase letters and digits without the look-alikes
/// `0 o 1 i l` (31 characters, so 12 of them carry about 59 bits).
const RECOVERY_ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyz23456789";
/// Characters in a recovery code, written as three groups of four.
const RECOVERY_CODE_CHARS: usize = 12;
/// The longest input [`normalize_recovery_code`] looks at, in characters.
const RECOVERY_INPUT_CHARS_MAX: usize = 64;
/// The longest code input [`verify`] looks at, in bytes (digits plus some spaces).
const CODE_INPUT_BYTES_MAX: usize = 16;

/// Why a one-time code or a TOTP secret was refused. Messages are lowercase and never contain
/// the secret or the code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TotpError {
    /// The code does not match the current step or one step either side (or is not 6 digits).
    #[error("invalid one-time code")]
    InvalidCode,
    /// The code matches, but for a step already used: a replay.
    #[error("one-time code was already used")]
    Replayed,
    /// A stored secret is not valid base32 or is shorter than 128 bits.
    #[error("invalid totp secret: {0}")]
    InvalidSecret(String),
    /// The issuer or account name cannot go into an otpauth URI (for example it holds a `:`).
    #[error("invalid totp label: {0}")]
    InvalidLabel(String),
    /// The QR code could not be drawn. Holds the reason.
    #[error("could not draw the qr code: {0}")]
    Qr(String),
}

/// A TOTP shared secret.
///
/// Store it encrypted or at least access-controlled: unlike a password hash, the server needs
/// the secret itself to check codes.
#[derive(Clone, PartialEq, Eq)]
pub struct TotpSecret {
    bytes: Vec<u8>,
}

impl std::fmt::Debug for TotpSecret {
    /// Never shows the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TotpSecret(..)")
    }
}

impl TotpSecret {
    /// A new random 160-bit secret from the operating system's random source.
    ///
    /// # Panics
    /// Only if the operating system has no random source (see [`crate::opaque::generate`]).
    pub fn generate() -> Self {
        let mut bytes = vec![0u8; SECRET_BYTES];
        OsRng.unwrap_err().fill_bytes(&mut bytes);
        Self { bytes }
    }

    /// A secret from its raw bytes.
    ///
    /// # Errors
    /// [`TotpError::InvalidSecret`] when shorter than 16 bytes (128 bits, the RFC 4226
    /// section 4 minimum).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, TotpError> {
        if bytes.len() < 16 {
            return Err(TotpError::InvalidSecret("shorter than 128 bits".into()));
        }
        Ok(Self { bytes })
    }

    /// A secret from its base32 text (RFC 4648, as [`TotpSecret::to_base32`] writes it);
    /// case, spaces and `=` padding are ignored.
    ///
    /// # Errors
    /// [`TotpError::InvalidSecret`] when the text is not base32 or decodes to fewer than 16
    /// bytes.
    pub fn from_base32(text: &str) -> Result<Self, TotpError> {
        let cleaned: String = text
            .chars()
            .filter(|c| !c.is_whitespace() && *c != '=')
            .map(|c| c.to_ascii_uppercase())
            .collect();
        let secret = Secret::try_from_base32(&cleaned)
            .map_err(|_| TotpError::InvalidSecret("not base32".into()))?;
        Self::from_bytes(secret.as_bytes().to_vec())
    }

    /// The secret as unpadded RFC 4648 base32 (32 characters for 160 bits), the form users
    /// type into an authenticator app and the form to store.
    pub fn to_base32(&self) -> String {
        Secret::from(self.bytes.clone()).to_base32()
    }

    /// The raw secret bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    fn totp(&self, issuer: Option<&str>, account: &str) -> Result<Totp, TotpError> {
        let builder = totp_rs::Builder::new()
            .with_algorithm(Algorithm::SHA1)
            .with_digits(DIGITS)
            .with_skew(0)
            .with_step_duration(STEP_SECONDS)
            .with_secret(self.bytes.clone())
            .with_account_name(account)
            .with_issuer(issuer);
        builder.build().map_err(|error| match error {
            totp_rs::TotpError::SecretTooShort { .. } => {
                TotpError::InvalidSecret("shorter than 128 bits".into())
            }
            other => TotpError::InvalidLabel(other.to_string()),
        })
    }

    /// The `otpauth://totp/…` URI (Google Authenticator "Key Uri Format") that authenticator
    /// apps read from a QR code, for example
    /// `otpauth://totp/Arches:ada%40example.com?secret=…&issuer=Arches`.
    ///
    /// # Errors
    /// [`TotpError::InvalidLabel`] when `issuer` or `account` holds a `:` or `account` is
    /// empty.
    pub fn otpauth_uri(&self, issuer: &str, account: &str) -> Result<String, TotpError> {
        if account.is_empty() {
            return Err(TotpError::InvalidLabel("empty account name".into()));
        }
        self.totp(Some(issuer), account)?
            .to_url()
            .map_err(|error| TotpError::InvalidLabel(error.to_string()))
    }

    /// The QR code of [`TotpSecret::otpauth_uri`] as a PNG, base64-encoded (standard alphabet,
    /// padded), ready for `<img src="data:image/png;base64,…">`. Drawing takes a few
    /// milliseconds.
    ///
    /// # Errors
    /// As [`TotpSecret::otpauth_uri`], and [`TotpError::Qr`] when the URI is too long to encode.
    pub fn qr_png_base64(&self, issuer: &str, account: &str) -> Result<String, TotpError> {
        if account.is_empty() {
            return Err(TotpError::InvalidLabel("empty account name".into()));
        }
        self.totp(Some(issuer), account)?
            .to_qr_base64()
            .map_err(|error| TotpError::Qr(error.to_string()))
    }

    /// The 6-digit code for the step that contains `now` (for tests and tools; users' apps
    /// compute it).
    pub fn code_at(&self, now: Timestamp) -> Result<String, TotpError> {
        Ok(self.code_for_step(&self.totp(None, "")?, step_of(now)))
    }

    fn code_for_step(&self, totp: &Totp, step: u64) -> String {
        totp.generate(step.saturating_mul(STEP_SECONDS)).to_string()
    }
}

/// The RFC 6238 time step containing `now`: whole seconds since the epoch divided by 30.
/// Instants before 1970 are step 0.
pub fn step_of(now: Timestamp) -> u64 {
    u64::try_from(now.as_micros().div_euclid(1_000_000)).unwrap_or(0) / STEP_SECONDS
}

/// Checks a 6-digit code typed by the user at `now`.
///
/// Spaces in `code` are ignored ("123 456"). The code may match the step of `now` or one step
/// either side; a step at or before `last_used_step` is refused, so each code works once and
/// an older code cannot be used after a newer one. Returns the matched step: store it as the
/// new `last_used_step` (in the same transaction that accepts the sign-in).
///
/// Comparisons are constant-time. This takes microseconds; callers must still throttle
/// attempts (a 6-digit code falls to about 300 000 guesses on average).
///
/// # Errors
/// [`TotpError::Replayed`] when the code matches only steps at or before `last_used_step`;
/// [`TotpError::InvalidCode`] when it matches none or is not 6 digits;
/// [`TotpError::InvalidSecret`] when the secret is shorter than 128 bits.
pub fn verify(
    secret: &TotpSecret,
    code: &str,
    now: Timestamp,
    last_used_step: Option<u64>,
) -> Result<u64, TotpError> {
    if code.len() > CODE_INPUT_BYTES_MAX {
        return Err(TotpError::InvalidCode);
    }
    let code: String = code.chars().filter(|c| !c.is_whitespace()).collect();
    if code.len() != usize::from(DIGITS) || !code.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(TotpError::InvalidCode);
    }
    let totp = secret.totp(None, "")?;
    let current = step_of(now);
    let mut replayed = false;
    let mut accepted = None;
    // Every step of the window is computed whatever matches, so the time taken does not say
    // which step matched.
    for step in current.saturating_sub(SKEW_STEPS)..=current.saturating_add(SKEW_STEPS) {
        let expected = secret.code_for_step(&totp, step);
        let matches: bool = expected.as_bytes().ct_eq(code.as_bytes()).into();
        if !matches {
            continue;
        }
        if last_used_step.is_some_and(|last| step <= last) {
            replayed = true;
        } else if accepted.is_none() {
            accepted = Some(step);
        }
    }
    match accepted {
        Some(step) => Ok(step),
        None if replayed => Err(TotpError::Replayed),
        None => Err(TotpError::InvalidCode),
    }
}

/// A single-use recovery code, for signing in when the authenticator is lost.
///
/// Show `plaintext` to the user once; store `hash`, and delete it when the code is used.
#[derive(Clone, PartialEq, Eq)]
pub struct RecoveryCode {
    /// Three groups of four characters, for example `k7mq-2xhp-w9rt`: about 59 bits of
    /// randomness from the operating system (31-character alphabet without look-alikes).
    pub plaintext: String,
    /// The hex SHA-256 of the normalized code (see [`hash_recovery_code`]).
    pub hash: String,
}

impl std::fmt::Debug for RecoveryCode {
    /// Shows the hash only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecoveryCode")
            .field("hash", &self.hash)
            .finish_non_exhaustive()
    }
}

/// Generates `count` distinct recovery codes (use [`RECOVERY_CODES_DEFAULT`]); `count` is
/// capped at [`RECOVERY_CODES_MAX`].
///
/// About 59 bits per code with a fast hash is enough because codes are single-use and every
/// attempt is throttled online; an offline attack on a leaked hash still needs on the order of
/// 10^17 SHA-256 evaluations per code.
///
/// # Panics
/// Only if the operating system has no random source (see [`crate::opaque::generate`]).
pub fn generate_recovery_codes(count: usize) -> Vec<RecoveryCode> {
    let count = count.min(RECOVERY_CODES_MAX);
    let mut rng = OsRng.unwrap_err();
    let mut codes: Vec<RecoveryCode> = Vec::with_capacity(count);
    while codes.len() < count {
        let raw: String = (0..RECOVERY_CODE_CHARS)
            .map(|_| char::from(RECOVERY_ALPHABET[rng.random_range(0..RECOVERY_ALPHABET.len())]))
            .collect();
        let plaintext = format!("{}-{}-{}", &raw[0..4], &raw[4..8], &raw[8..12]);
        let hash = hash_recovery_code(&plaintext);
        if codes.iter().all(|code| code.hash != hash) {
            codes.push(RecoveryCode { plaintext, hash });
        }
    }
    codes
}

/// The canonical form of a typed recovery code: lowercase, without spaces or dashes, and at
/// most its first 64 characters, so that "K7MQ 2XHP-w9rt" and "k7mq-2xhp-w9rt" are the same.
pub fn normalize_recovery_code(input: &str) -> String {
    input
        .chars()
        .take(RECOVERY_INPUT_CHARS_MAX)
        .filter(|c| !c.is_whitespace() && *c != '-')
        .flat_map(char::to_lowercase)
        .collect()
}

/// The hex SHA-256 of the normalized code, to compare with the stored hashes using
/// [`crate::opaque::hashes_match`].
pub fn hash_recovery_code(input: &str) -> String {
    hash_token(&normalize_recovery_code(input))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SHA-1 seed of RFC 6238 appendix B.
    fn rfc_secret() -> TotpSecret {
        TotpSecret::from_bytes(b"12345678901234567890".to_vec()).unwrap()
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp(seconds * 1_000_000)
    }

    #[test]
    fn codes_match_the_rfc_6238_test_vectors() {
        // RFC 6238 appendix B, SHA-1 column; 6 digits are the last 6 of the 8-digit values.
        let secret = rfc_secret();
        for (seconds, code) in [
            (59, "287082"),
            (1_111_111_109, "081804"),
            (1_111_111_111, "050471"),
            (1_234_567_890, "005924"),
            (2_000_000_000, "279037"),
        ] {
            assert_eq!(secret.code_at(at(seconds)).unwrap(), code, "T = {seconds}");
            assert_eq!(
                verify(&secret, code, at(seconds), None),
                Ok(seconds as u64 / 30)
            );
        }
    }

    #[test]
    fn one_step_of_skew_is_accepted_either_side_but_not_two() {
        let secret = rfc_secret();
        // 287082 is the code of step 1 (T = 30..59).
        assert_eq!(verify(&secret, "287082", at(60), None), Ok(1));
        assert_eq!(verify(&secret, "287082", at(89), None), Ok(1));
        assert_eq!(verify(&secret, "287082", at(29), None), Ok(1));
        assert_eq!(
            verify(&secret, "287082", at(90), None),
            Err(TotpError::InvalidCode)
        );
        let code_step_10 = secret.code_at(at(300)).unwrap();
        assert_eq!(
            verify(&secret, &code_step_10, at(240), None),
            Err(TotpError::InvalidCode)
        );
    }

    #[test]
    fn a_code_is_accepted_only_once() {
        let secret = rfc_secret();
        let step = verify(&secret, "287082", at(59), None).unwrap();
        assert_eq!(
            verify(&secret, "287082", at(59), Some(step)),
            Err(TotpError::Replayed)
        );
        assert_eq!(
            verify(&secret, "287082", at(65), Some(step)),
            Err(TotpError::Replayed)
        );
        // An older code after a newer one was used is a replay too.
        let newer = secret.code_at(at(60)).unwrap();
        let newer_step = verify(&secret, &newer, at(60), Some(step)).unwrap();
        assert_eq!(newer_step, 2);
        assert_eq!(
            verify(&secret, "287082", at(60), Some(newer_step)),
            Err(TotpError::Replayed)
        );
    }

    #[test]
    fn malformed_codes_are_invalid() {
        let secret = rfc_secret();
        for code in [
            "",
            "28708",
            "2870822",
            "28708a",
            "+87082",
            "２８７０８２",
            "287082 287082 28",
        ] {
            assert_eq!(
                verify(&secret, code, at(59), None),
                Err(TotpError::InvalidCode),
                "{code:?}"
            );
        }
        assert_eq!(verify(&secret, "287 082", at(59), None), Ok(1));
    }

    #[test]
    fn a_generated_secret_has_160_bits_and_round_trips_through_base32() {
        let secret = TotpSecret::generate();
        assert_eq!(secret.as_bytes().len(), 20);
        let text = secret.to_base32();
        assert_eq!(text.len(), 32);
        assert_eq!(TotpSecret::from_base32(&text).unwrap(), secret);
        assert_eq!(
            TotpSecret::from_base32(&text.to_lowercase()).unwrap(),
            secret
        );
        assert_ne!(TotpSecret::generate(), secret);
        assert_eq!(format!("{secret:?}"), "TotpSecret(..)");
    }

    #[test]
    fn bad_secrets_are_refused() {
        assert!(matches!(
            TotpSecret::from_base32("not base32 at all!"),
            Err(TotpError::InvalidSecret(_))
        ));
        assert!(matches!(
            TotpSecret::from_base32("GEZDGNBV"),
            Err(TotpError::InvalidSecret(_))
        ));
        assert!(matches!(
            TotpSecret::from_bytes(vec![0; 15]),
            Err(TotpError::InvalidSecret(_))
        ));
    }

    #[test]
    fn the_otpauth_uri_names_issuer_account_and_secret() {
        let secret = rfc_secret();
        let uri = secret.otpauth_uri("Arches", "ada@example.com").unwrap();
        assert!(
            uri.starts_with("otpauth://totp/Arches:ada%40example.com?"),
            "{uri}"
        );
        assert!(
            uri.contains("secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"),
            "{uri}"
        );
        assert!(uri.contains("issuer=Arches"), "{uri}");
        assert!(matches!(
            secret.otpauth_uri("Arches", "ada:lovelace"),
            Err(TotpError::InvalidLabel(_))
        ));
        assert!(matches!(
            secret.otpauth_uri("Arches", ""),
            Err(TotpError::InvalidLabel(_))
        ));
    }

    #[test]
    fn the_qr_code_is_a_base64_png() {
        use base64::Engine;
        let png = rfc_secret()
            .qr_png_base64("Arches", "ada@example.com")
            .unwrap();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png)
            .unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    }

    #[test]
    fn recovery_codes_are_distinct_grouped_and_hashed() {
        let codes = generate_recovery_codes(RECOVERY_CODES_DEFAULT);
        assert_eq!(codes.len(), 10);
        for code in &codes {
            let groups: Vec<&str> = code.plaintext.split('-').collect();
            assert_eq!(groups.len(), 3, "{}", code.plaintext);
            assert!(groups.iter().all(|group| group.len() == 4));
            assert!(code
                .plaintext
                .bytes()
                .all(|byte| byte == b'-' || RECOVERY_ALPHABET.contains(&byte)));
            assert_eq!(code.hash, hash_recovery_code(&code.plaintext));
        }
        let mut hashes: Vec<&str> = codes.iter().map(|code| code.hash.as_str()).collect();
        hashes.sort_unstable();
        hashes.dedup();
        assert_eq!(hashes.len(), 10);
        assert_eq!(generate_recovery_codes(1_000).len(), RECOVERY_CODES_MAX);
    }

    #[test]
    fn a_recovery_code_may_be_typed_loosely() {
        let codes = generate_recovery_codes(1);
        let code = &codes[0];
        let typed = format!(" {} ", code.plaintext.to_uppercase().replace('-', " "));
        assert_eq!(hash_recovery_code(&typed), code.hash);
        assert_eq!(normalize_recovery_code("K7MQ 2XHP-w9rt"), "k7mq2xhpw9rt");
        assert_ne!(
            hash_recovery_code("k7mq-2xhp-w9rs"),
            hash_recovery_code("k7mq-2xhp-w9rt")
        );
        assert_eq!(normalize_recovery_code(&"a".repeat(1_000)).len(), 64);
    }
}
