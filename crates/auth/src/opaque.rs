//! Opaque secret tokens: refresh tokens, email-verification, password-reset and invitation
//! tokens, and API keys.
//!
//! Each token is 32 random bytes from the operating system's random source (256 bits),
//! written as base64url without padding (RFC 4648 section 5) after a short prefix that says
//! what the token is for, for example `art_…` for a refresh token. The server stores only the
//! hex SHA-256 of the whole token text and gives the plaintext to the user once.
//!
//! A fast hash is right here, unlike for passwords: a token has 256 bits of entropy, so no
//! dictionary or brute-force attack on a leaked hash is feasible whatever the hash speed, and a
//! slow hash like Argon2 would only cost CPU on every request (OWASP Password Storage Cheat
//! Sheet: slow hashes exist to protect low-entropy human secrets). Hashing also makes the
//! database look-up by hash safe against timing attacks on the plaintext.
//!
//! This module must never log a plaintext token or key.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::rngs::OsRng;
use rand::{RngCore, TryRngCore};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::AuthError;

/// The number of random bytes in a token: 32 (256 bits).
pub const TOKEN_RANDOM_BYTES: usize = 32;

/// The length of the base64url text of [`TOKEN_RANDOM_BYTES`] bytes without padding: 43.
pub const TOKEN_SECRET_CHARS: usize = 43;

/// The prefix of refresh tokens (`art_…`: Arches refresh token).
pub const REFRESH_TOKEN_PREFIX: &str = "art";
/// The prefix of email-verification tokens (`aev_…`).
pub const EMAIL_VERIFICATION_PREFIX: &str = "aev";
/// The prefix of password-reset tokens (`apr_…`).
pub const PASSWORD_RESET_PREFIX: &str = "apr";
/// The prefix of invitation tokens (`ain_…`).
pub const INVITATION_PREFIX: &str = "ain";
/// The prefix of API keys (`ak_<id>_<secret>`).
pub const API_KEY_PREFIX: &str = "ak";

/// The longest text [`parse_api_key`] looks at; a real key has 79 characters.
const API_KEY_CHARS_MAX: usize = 128;

/// A freshly generated secret token.
///
/// Give `plaintext` to the user once; store only `hash`.
#[derive(Clone, PartialEq, Eq)]
pub struct OpaqueToken {
    /// `<prefix>_<43 base64url characters>`, for example `art_Qm9v…`.
    pub plaintext: String,
    /// The hex SHA-256 of `plaintext` (64 lowercase hex digits), see [`hash_token`].
    pub hash: String,
}

impl std::fmt::Debug for OpaqueToken {
    /// Shows the hash only, never the plaintext.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpaqueToken")
            .field("hash", &self.hash)
            .finish_non_exhaustive()
    }
}

/// Generates a token `<prefix>_<secret>` where the secret is [`TOKEN_RANDOM_BYTES`] bytes from
/// the operating system's random source, base64url without padding.
///
/// Use the prefix constants of this module ([`REFRESH_TOKEN_PREFIX`] and so on).
///
/// # Panics
/// Only if the operating system cannot provide random bytes at all, which leaves no safe way
/// to go on (`getrandom` blocks until the kernel's pool is ready, so this does not happen on a
/// running Linux system).
pub fn generate(prefix: &str) -> OpaqueToken {
    let plaintext = format!("{prefix}_{}", random_secret());
    let hash = hash_token(&plaintext);
    OpaqueToken { plaintext, hash }
}

/// The hex SHA-256 (64 lowercase hex digits) of a token's whole text, as stored.
pub fn hash_token(plaintext: &str) -> String {
    hex::encode(Sha256::digest(plaintext.as_bytes()))
}

/// Compares two hashes (or any two strings) in time that depends only on their lengths
/// (`subtle` crate), for checking a presented token's hash against a stored one.
pub fn hashes_match(left: &str, right: &str) -> bool {
    left.as_bytes().ct_eq(right.as_bytes()).into()
}

fn random_secret() -> String {
    let mut bytes = [0u8; TOKEN_RANDOM_BYTES];
    OsRng.unwrap_err().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A freshly generated API key.
///
/// The key text is `ak_<id as 32 hex digits>_<43 base64url characters>`: the id lets the
/// server find the key's row without a secret-dependent look-up, then the hash is compared
/// with [`hashes_match`]. Give `plaintext` to the user once; store `id` and `hash`.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKeySecret {
    /// The key's id, a UUIDv7 (time-ordered).
    pub id: Uuid,
    /// The whole key text, 79 characters.
    pub plaintext: String,
    /// The hex SHA-256 of `plaintext`, see [`hash_token`].
    pub hash: String,
}

impl std::fmt::Debug for ApiKeySecret {
    /// Shows the id and hash only, never the plaintext.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeySecret")
            .field("id", &self.id)
            .field("hash", &self.hash)
            .finish_non_exhaustive()
    }
}

/// Generates an API key with a new UUIDv7 id.
///
/// # Panics
/// As [`generate`]: only if the operating system has no random source.
pub fn generate_api_key() -> ApiKeySecret {
    let id = Uuid::now_v7();
    let plaintext = format!("{API_KEY_PREFIX}_{}_{}", id.simple(), random_secret());
    let hash = hash_token(&plaintext);
    ApiKeySecret {
        id,
        plaintext,
        hash,
    }
}

/// Splits a presented API key into its id and the hash of the whole key, checking its shape.
///
/// Surrounding whitespace is ignored. Returns `(id, hex SHA-256 of the key)`; look the row up
/// by id, then compare its stored hash with [`hashes_match`].
///
/// # Errors
/// [`AuthError::MalformedApiKey`] naming what is wrong (missing `ak_` prefix, bad id, bad
/// secret, too long); the message never echoes the key.
pub fn parse_api_key(text: &str) -> Result<(Uuid, String), AuthError> {
    let text = text.trim();
    if text.len() > API_KEY_CHARS_MAX {
        return Err(AuthError::MalformedApiKey("too long"));
    }
    let rest = text
        .strip_prefix(API_KEY_PREFIX)
        .and_then(|rest| rest.strip_prefix('_'))
        .ok_or(AuthError::MalformedApiKey("missing the ak_ prefix"))?;
    let (id_text, secret) = rest
        .split_once('_')
        .ok_or(AuthError::MalformedApiKey("missing the secret part"))?;
    if id_text.len() != 32
        || !id_text
            .bytes()
            .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
    {
        return Err(AuthError::MalformedApiKey(
            "the id is not 32 lowercase hex digits",
        ));
    }
    let id = Uuid::try_parse(id_text)
        .map_err(|_| AuthError::MalformedApiKey("the id is not 32 lowercase hex digits"))?;
    let secret_is_well_formed = secret.len() == TOKEN_SECRET_CHARS
        && URL_SAFE_NO_PAD
            .decode(secret)
            .is_ok_and(|bytes| bytes.len() == TOKEN_RANDOM_BYTES);
    if !secret_is_well_formed {
        return Err(AuthError::MalformedApiKey(
            "the secret is not 43 base64url characters",
        ));
    }
    Ok((id, hash_token(text)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_has_its_prefix_and_256_random_bits() {
        let token = generate(REFRESH_TOKEN_PREFIX);
        let secret = token.plaintext.strip_prefix("art_").unwrap();
        assert_eq!(secret.len(), TOKEN_SECRET_CHARS);
        assert_eq!(URL_SAFE_NO_PAD.decode(secret).unwrap().len(), 32);
        assert_eq!(token.hash, hash_token(&token.plaintext));
        assert_eq!(token.hash.len(), 64);
        assert_ne!(generate(REFRESH_TOKEN_PREFIX), token);
    }

    #[test]
    fn the_hash_is_the_hex_sha256_of_the_text() {
        // SHA-256("abc"), FIPS 180-2 appendix B.1.
        assert_eq!(
            hash_token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn hashes_match_compares_exactly() {
        let token = generate(PASSWORD_RESET_PREFIX);
        assert!(hashes_match(&token.hash, &hash_token(&token.plaintext)));
        assert!(!hashes_match(&token.hash, &hash_token("apr_other")));
        assert!(!hashes_match(&token.hash, ""));
    }

    #[test]
    fn the_debug_form_hides_the_plaintext() {
        let token = generate(INVITATION_PREFIX);
        assert!(!format!("{token:?}").contains(&token.plaintext));
        let key = generate_api_key();
        assert!(!format!("{key:?}").contains(&key.plaintext));
    }

    #[test]
    fn an_api_key_round_trips_to_its_id_and_hash() {
        let key = generate_api_key();
        assert_eq!(key.plaintext.len(), 79);
        assert!(key.plaintext.starts_with("ak_"));
        let (id, hash) = parse_api_key(&key.plaintext).unwrap();
        assert_eq!(id, key.id);
        assert_eq!(hash, key.hash);
        let (id, hash) = parse_api_key(&format!("  {}\n", key.plaintext)).unwrap();
        assert_eq!((id, hash), (key.id, key.hash));
    }

    #[test]
    fn a_tampered_secret_gives_another_hash() {
        let key = generate_api_key();
        // Change the first character of the secret (the last one also carries padding bits).
        let first = &key.plaintext[36..37];
        let replacement = if first == "A" { "B" } else { "A" };
        let tampered = format!(
            "{}{replacement}{}",
            &key.plaintext[..36],
            &key.plaintext[37..]
        );
        let (id, hash) = parse_api_key(&tampered).unwrap();
        assert_eq!(id, key.id);
        assert!(!hashes_match(&hash, &key.hash));
    }

    #[test]
    fn malformed_api_keys_are_refused_with_a_reason() {
        let key = generate_api_key();
        let secret = &key.plaintext[36..];
        let id = key.id.simple().to_string();
        let cases = [
            (String::new(), "missing the ak_ prefix"),
            (format!("xk_{id}_{secret}"), "missing the ak_ prefix"),
            (format!("ak{id}_{secret}"), "missing the ak_ prefix"),
            (format!("ak_{id}"), "missing the secret part"),
            (
                format!("ak_{}_{secret}", id.to_uppercase()),
                "the id is not 32 lowercase hex digits",
            ),
            (
                format!("ak_{}_{secret}", &id[..31]),
                "the id is not 32 lowercase hex digits",
            ),
            (
                format!("ak_{id}_{}", &secret[..42]),
                "the secret is not 43 base64url characters",
            ),
            (
                format!("ak_{id}_{}+", &secret[..42]),
                "the secret is not 43 base64url characters",
            ),
            ("ak_".repeat(50), "too long"),
        ];
        for (text, reason) in cases {
            match parse_api_key(&text) {
                Err(AuthError::MalformedApiKey(found)) => assert_eq!(found, reason, "{text}"),
                other => panic!("{text}: expected a malformed key, got {other:?}"),
            }
        }
    }
}
