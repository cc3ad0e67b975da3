//! Short-lived access tokens: JSON Web Tokens (RFC 7519) signed with HMAC-SHA-256 (HS256).
//!
//! An access token proves, for a few minutes, who the caller is and in which organization and
//! role it acts. It is stateless: the server checks it without a store look-up, which is why
//! it must be short-lived and why long-lived sessions use opaque refresh tokens instead
//! ([`crate::opaque`]).
//!
//! Exactly one algorithm is accepted, HS256; tokens naming `none`, another HMAC or any
//! public-key algorithm are refused before their signature is looked at (RFC 8725, "JSON Web
//! Token Best Current Practices", sections 2.1 and 3.1). The issuer, the audience, the token
//! type and the validity window are all checked, the window against the `now` the caller
//! passes, never against the wall clock.
//!
//! This module must never log a token or the signing key.

use std::fmt;

use arches_core::Timestamp;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// The value of the `typ` claim of an access token.
pub const ACCESS_TOKEN_TYPE: &str = "access";

/// The fewest bytes of HMAC key [`TokenIssuer::new`] accepts: 32 bytes (256 bits), the output
/// size of SHA-256, as RFC 7518 section 3.2 requires for HS256.
pub const SECRET_BYTES_MIN: usize = 32;

/// The default lifetime of an access token: 900 s (15 minutes), the usual short lifetime that
/// bounds how long a stolen token stays useful (OWASP JSON Web Token Cheat Sheet).
pub const DEFAULT_TTL_SECONDS: u64 = 900;

/// The clock skew tolerated when checking `exp` and `nbf`: 30 s, so that servers whose clocks
/// differ by a few seconds accept each other's tokens (RFC 7519 sections 4.1.4 and 4.1.5 allow
/// "some small leeway").
pub const LEEWAY_SECONDS: u64 = 30;

/// The longest token [`TokenIssuer::verify`] will parse, in bytes; a real access token is about
/// 400 bytes, so anything past 8 KiB is refused as malformed before it is decoded.
pub const TOKEN_BYTES_MAX: usize = 8 * 1024;

/// The claims of an access token, as carried in its payload.
///
/// Times are NumericDate values: whole seconds since the Unix epoch (RFC 7519 section 2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    /// The user id (RFC 7519 `sub`).
    pub sub: String,
    /// The id of the organization the user acts in.
    pub org: String,
    /// The user's role in that organization, for example `admin`.
    pub role: String,
    /// The id of the session (refresh-token family) the token was issued for, so that revoking
    /// a session can be checked where it matters.
    pub sid: String,
    /// The token type, always [`ACCESS_TOKEN_TYPE`].
    pub typ: String,
    /// The issuer (RFC 7519 `iss`).
    pub iss: String,
    /// The audience (RFC 7519 `aud`), a single string.
    pub aud: String,
    /// Issued at, seconds since the epoch (RFC 7519 `iat`).
    pub iat: u64,
    /// Not before, seconds since the epoch (RFC 7519 `nbf`); equal to `iat`.
    pub nbf: u64,
    /// Expiry, seconds since the epoch (RFC 7519 `exp`): `iat` plus the issuer's lifetime.
    pub exp: u64,
    /// A unique token id (RFC 7519 `jti`): a random UUID in hyphenated form.
    pub jti: String,
}

/// Who an access token is issued to: the fields of [`AccessClaims`] that the caller chooses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessSubject {
    /// The user id, becomes `sub`.
    pub user_id: String,
    /// The organization id, becomes `org`.
    pub org_id: String,
    /// The role in that organization, becomes `role`.
    pub role: String,
    /// The session id, becomes `sid`.
    pub session_id: String,
}

/// Why an access token was refused or could not be made.
///
/// Messages are lowercase and never contain the token. A server answers every verification
/// error with the same 401; the variants exist for logs and tests.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The signing key is shorter than [`SECRET_BYTES_MIN`] bytes.
    #[error("the token signing key must have at least {min_bytes} bytes")]
    SecretTooShort {
        /// The floor in bytes.
        min_bytes: usize,
    },
    /// The token is not a well-formed JWT with the expected claims (or is longer than
    /// [`TOKEN_BYTES_MAX`]).
    #[error("malformed access token")]
    Malformed,
    /// The token names an algorithm other than HS256 (for example `none`, HS512 or RS256).
    #[error("access token algorithm is not hs256")]
    WrongAlgorithm,
    /// The signature does not match: the token was altered or signed with another key.
    #[error("access token signature is invalid")]
    BadSignature,
    /// The `iss` claim is not this issuer.
    #[error("access token issuer is not accepted")]
    WrongIssuer,
    /// The `aud` claim is not this audience.
    #[error("access token audience is not accepted")]
    WrongAudience,
    /// The `typ` claim is not [`ACCESS_TOKEN_TYPE`].
    #[error("token is not an access token")]
    WrongType,
    /// `exp` is more than [`LEEWAY_SECONDS`] before `now`.
    #[error("access token has expired")]
    Expired,
    /// `nbf` is more than [`LEEWAY_SECONDS`] after `now`.
    #[error("access token is not valid yet")]
    NotYetValid,
    /// Signing failed inside the JWT library. Holds its reason.
    #[error("could not sign the access token: {0}")]
    Signing(String),
}

/// Issues and verifies HS256 access tokens for one issuer and one audience.
///
/// Cheap to share behind an `Arc`; signing and verifying take microseconds, so they may run on
/// the async executor.
pub struct TokenIssuer {
    encoding_key: EncodingKey,
    decoding_key: DecodingKey,
    validation: Validation,
    issuer: String,
    audience: String,
    ttl_seconds: u64,
}

impl fmt::Debug for TokenIssuer {
    /// Shows the issuer, audience and lifetime, never the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenIssuer")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("ttl_seconds", &self.ttl_seconds)
            .finish_non_exhaustive()
    }
}

impl TokenIssuer {
    /// An issuer signing with `secret` (at least [`SECRET_BYTES_MIN`] random bytes), writing
    /// `issuer` into `iss` and `audience` into `aud`, with tokens living `ttl_seconds`
    /// (see [`DEFAULT_TTL_SECONDS`]; a zero lifetime is raised to one second).
    ///
    /// # Errors
    /// [`TokenError::SecretTooShort`] when `secret` has fewer than 32 bytes.
    pub fn new(
        secret: &[u8],
        issuer: impl Into<String>,
        audience: impl Into<String>,
        ttl_seconds: u64,
    ) -> Result<Self, TokenError> {
        if secret.len() < SECRET_BYTES_MIN {
            return Err(TokenError::SecretTooShort {
                min_bytes: SECRET_BYTES_MIN,
            });
        }
        let issuer = issuer.into();
        let audience = audience.into();

        let mut validation = Validation::new(Algorithm::HS256);
        // Time is checked in `verify` against the caller's `now`; the library would read the
        // wall clock.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.leeway = 0;
        validation.validate_aud = true;
        validation.set_audience(&[audience.as_str()]);
        validation.set_issuer(&[issuer.as_str()]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);

        Ok(Self {
            encoding_key: EncodingKey::from_secret(secret),
            decoding_key: DecodingKey::from_secret(secret),
            validation,
            issuer,
            audience,
            ttl_seconds: ttl_seconds.max(1),
        })
    }

    /// The lifetime of the tokens this issuer makes, in seconds (the `expires_in` of a token
    /// response).
    pub fn ttl_seconds(&self) -> u64 {
        self.ttl_seconds
    }

    /// Makes the claims of a token for `subject` issued at `now`: `iat = nbf = now` in whole
    /// seconds, `exp = iat + ttl`, a fresh random `jti`.
    pub fn claims_for(&self, subject: &AccessSubject, now: Timestamp) -> AccessClaims {
        let issued_at = seconds(now);
        AccessClaims {
            sub: subject.user_id.clone(),
            org: subject.org_id.clone(),
            role: subject.role.clone(),
            sid: subject.session_id.clone(),
            typ: ACCESS_TOKEN_TYPE.to_owned(),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            iat: issued_at,
            nbf: issued_at,
            exp: issued_at.saturating_add(self.ttl_seconds),
            jti: uuid::Builder::from_random_bytes(rand::random())
                .into_uuid()
                .hyphenated()
                .to_string(),
        }
    }

    /// Issues a signed access token for `subject` at `now` (compact JWS form, about 400 bytes).
    ///
    /// # Errors
    /// [`TokenError::Signing`] if the JWT library fails, which does not happen with an HMAC key.
    pub fn issue(&self, subject: &AccessSubject, now: Timestamp) -> Result<String, TokenError> {
        self.sign(&self.claims_for(subject, now))
    }

    /// Signs arbitrary access claims with this issuer's key and HS256.
    ///
    /// For tests and for re-issuing; [`TokenIssuer::issue`] is the normal way in.
    ///
    /// # Errors
    /// [`TokenError::Signing`] if the JWT library fails.
    pub fn sign(&self, claims: &AccessClaims) -> Result<String, TokenError> {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding_key)
            .map_err(|error| TokenError::Signing(error.to_string()))
    }

    /// Verifies a token and returns its claims.
    ///
    /// Checks, in order: the size and shape, the algorithm (HS256 only), the signature, the
    /// presence of `exp`, `nbf`, `iss`, `aud` and `sub`, the issuer, the audience, the type,
    /// then `now` against `nbf` and `exp` with [`LEEWAY_SECONDS`] of leeway either side.
    /// Time errors are thus only reported for authentic tokens.
    ///
    /// # Errors
    /// One [`TokenError`] variant per failed check (never `SecretTooShort` or `Signing`).
    pub fn verify(&self, token: &str, now: Timestamp) -> Result<AccessClaims, TokenError> {
        if token.len() > TOKEN_BYTES_MAX {
            return Err(TokenError::Malformed);
        }
        let claims =
            jsonwebtoken::decode::<AccessClaims>(token, &self.decoding_key, &self.validation)
                .map_err(|error| map_error(error.kind()))?
                .claims;
        if claims.typ != ACCESS_TOKEN_TYPE {
            return Err(TokenError::WrongType);
        }
        let now = seconds(now);
        if claims.nbf > now.saturating_add(LEEWAY_SECONDS) {
            return Err(TokenError::NotYetValid);
        }
        if claims.exp.saturating_add(LEEWAY_SECONDS) < now {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

/// Whole seconds since the epoch; instants before 1970 count as 0.
fn seconds(now: Timestamp) -> u64 {
    u64::try_from(now.as_micros().div_euclid(1_000_000)).unwrap_or(0)
}

fn map_error(kind: &ErrorKind) -> TokenError {
    match kind {
        ErrorKind::InvalidSignature => TokenError::BadSignature,
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => TokenError::WrongAlgorithm,
        ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
        ErrorKind::InvalidAudience => TokenError::WrongAudience,
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
        _ => TokenError::Malformed,
    }
}

#[cfg(test)]
mod tests {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;

    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const NOW_SECONDS: i64 = 1_750_000_000;

    fn at(seconds: i64) -> Timestamp {
        Timestamp(seconds * 1_000_000)
    }

    fn issuer() -> TokenIssuer {
        TokenIssuer::new(
            SECRET,
            "https://arches.test",
            "arches-api",
            DEFAULT_TTL_SECONDS,
        )
        .unwrap()
    }

    fn subject() -> AccessSubject {
        AccessSubject {
            user_id: "user-1".into(),
            org_id: "org-1".into(),
            role: "admin".into(),
            session_id: "session-1".into(),
        }
    }

    fn encode_segment(value: &serde_json::Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap())
    }

    #[test]
    fn an_issued_token_verifies_with_its_claims() {
        let issuer = issuer();
        let token = issuer.issue(&subject(), at(NOW_SECONDS)).unwrap();
        let claims = issuer.verify(&token, at(NOW_SECONDS + 10)).unwrap();
        assert_eq!(claims.sub, "user-1");
        assert_eq!(claims.org, "org-1");
        assert_eq!(claims.role, "admin");
        assert_eq!(claims.sid, "session-1");
        assert_eq!(claims.typ, "access");
        assert_eq!(claims.iss, "https://arches.test");
        assert_eq!(claims.aud, "arches-api");
        assert_eq!(claims.iat, NOW_SECONDS as u64);
        assert_eq!(claims.nbf, NOW_SECONDS as u64);
        assert_eq!(claims.exp, NOW_SECONDS as u64 + 900);
        assert_eq!(claims.jti.len(), 36);
        let other = issuer.issue(&subject(), at(NOW_SECONDS)).unwrap();
        assert_ne!(
            claims.jti,
            issuer.verify(&other, at(NOW_SECONDS)).unwrap().jti
        );
    }

    #[test]
    fn a_short_secret_is_refused() {
        let error = TokenIssuer::new(&SECRET[..31], "i", "a", 900).unwrap_err();
        assert_eq!(error, TokenError::SecretTooShort { min_bytes: 32 });
    }

    #[test]
    fn a_token_expires_after_its_lifetime_plus_the_leeway() {
        let issuer = issuer();
        let token = issuer.issue(&subject(), at(NOW_SECONDS)).unwrap();
        let last_second = NOW_SECONDS + 900 + 30;
        assert!(issuer.verify(&token, at(last_second)).is_ok());
        assert_eq!(
            issuer.verify(&token, at(last_second + 1)),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn a_token_from_the_future_is_not_yet_valid() {
        let issuer = issuer();
        let token = issuer.issue(&subject(), at(NOW_SECONDS)).unwrap();
        assert!(issuer.verify(&token, at(NOW_SECONDS - 30)).is_ok());
        assert_eq!(
            issuer.verify(&token, at(NOW_SECONDS - 31)),
            Err(TokenError::NotYetValid)
        );
    }

    #[test]
    fn a_token_of_another_type_is_refused() {
        let issuer = issuer();
        let mut claims = issuer.claims_for(&subject(), at(NOW_SECONDS));
        claims.typ = "refresh".into();
        let token = issuer.sign(&claims).unwrap();
        assert_eq!(
            issuer.verify(&token, at(NOW_SECONDS)),
            Err(TokenError::WrongType)
        );
    }

    #[test]
    fn a_token_for_another_issuer_or_audience_is_refused() {
        let ours = issuer();
        let other_issuer =
            TokenIssuer::new(SECRET, "https://elsewhere.test", "arches-api", 900).unwrap();
        let token = other_issuer.issue(&subject(), at(NOW_SECONDS)).unwrap();
        assert_eq!(
            ours.verify(&token, at(NOW_SECONDS)),
            Err(TokenError::WrongIssuer)
        );
        let other_audience =
            TokenIssuer::new(SECRET, "https://arches.test", "billing-api", 900).unwrap();
        let token = other_audience.issue(&subject(), at(NOW_SECONDS)).unwrap();
        assert_eq!(
            ours.verify(&token, at(NOW_SECONDS)),
            Err(TokenError::WrongAudience)
        );
    }

    #[test]
    fn a_token_signed_with_another_key_or_altered_is_refused() {
        let issuer = issuer();
        let stranger = TokenIssuer::new(
            b"another-secret-that-is-32-bytes!",
            "https://arches.test",
            "arches-api",
            900,
        )
        .unwrap();
        let token = stranger.issue(&subject(), at(NOW_SECONDS)).unwrap();
        assert_eq!(
            issuer.verify(&token, at(NOW_SECONDS)),
            Err(TokenError::BadSignature)
        );

        // Raise the role in the payload and keep the original signature.
        let token = issuer.issue(&subject(), at(NOW_SECONDS)).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        let mut claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        claims["role"] = "owner".into();
        let forged = format!("{}.{}.{}", parts[0], encode_segment(&claims), parts[2]);
        assert_eq!(
            issuer.verify(&forged, at(NOW_SECONDS)),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn tokens_naming_other_algorithms_are_refused() {
        let issuer = issuer();
        let claims = issuer.claims_for(&subject(), at(NOW_SECONDS));
        let payload = encode_segment(&serde_json::to_value(&claims).unwrap());

        // alg "none" with an empty signature (RFC 8725 section 2.1).
        let none = format!(
            "{}.{payload}.",
            encode_segment(&serde_json::json!({"alg": "none", "typ": "JWT"}))
        );
        let error = issuer.verify(&none, at(NOW_SECONDS)).unwrap_err();
        assert!(
            matches!(error, TokenError::WrongAlgorithm | TokenError::Malformed),
            "{error:?}"
        );

        // HS512 with the very same key.
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert_eq!(
            issuer.verify(&hs512, at(NOW_SECONDS)),
            Err(TokenError::WrongAlgorithm)
        );

        // RS256 header (the key-confusion attack) with any signature.
        let rs256 = format!(
            "{}.{payload}.{}",
            encode_segment(&serde_json::json!({"alg": "RS256", "typ": "JWT"})),
            URL_SAFE_NO_PAD.encode([7u8; 256])
        );
        assert_eq!(
            issuer.verify(&rs256, at(NOW_SECONDS)),
            Err(TokenError::WrongAlgorithm)
        );
    }

    #[test]
    fn garbage_and_oversized_tokens_are_malformed() {
        let issuer = issuer();
        for token in ["", "abc", "a.b.c", "a.b", "....."] {
            assert_eq!(
                issuer.verify(token, at(NOW_SECONDS)),
                Err(TokenError::Malformed),
                "{token:?}"
            );
        }
        let huge = "a".repeat(TOKEN_BYTES_MAX + 1);
        assert_eq!(
            issuer.verify(&huge, at(NOW_SECONDS)),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn a_token_without_required_claims_is_malformed() {
        let issuer = issuer();
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": "user-1", "typ": "access"}),
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert_eq!(
            issuer.verify(&token, at(NOW_SECONDS)),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn the_debug_form_hides_the_key() {
        let text = format!("{:?}", issuer());
        assert!(!text.contains("0123456789abcdef"), "{text}");
        assert!(text.contains("arches-api"));
    }
}
