//! # arches-auth
//!
//! Authentication primitives of the Arches server: pure logic and well-kept crypto libraries,
//! used by the HTTP server to sign people in and keep them signed in.
//!
//! | module | what it holds |
//! | --- | --- |
//! | [`password`] | the password policy and Argon2id hashing ([`PasswordPolicy`], [`PasswordHasher`]) |
//! | [`jwt`] | short-lived HS256 access tokens ([`TokenIssuer`], [`AccessClaims`]) |
//! | [`opaque`] | high-entropy secrets: refresh, verification, reset and invitation tokens, API keys |
//! | [`totp`] | RFC 6238 one-time codes with replay refusal, and recovery codes |
//! | [`throttle`] | in-memory login throttling per account key and per client address |
//! | [`sealing`] | XChaCha20-Poly1305 sealing of organization secrets at rest under a master-key [`sealing::Keyring`] |
//! | [`mail`] | the mail port ([`Mailer`]) with a log backend and an SMTP backend |
//!
//! **Architecture Invariant:** this crate knows no HTTP framework, no database and no store. It
//! never reads the wall clock: every function that depends on time takes `now` as an
//! [`arches_core::Timestamp`], so tests drive time by hand. The only I/O it does is the SMTP
//! connection of [`SmtpMailer`] and the log line of [`LogMailer`].
//!
//! **Architecture Invariant:** nothing here reveals whether an account exists. The throttle
//! keys on what the user typed, and [`PasswordHasher::verify_dummy`] spends the same work for
//! an unknown account as [`PasswordHasher::verify`] does for a known one.
//!
//! Password hashing and the password policy are CPU heavy (tens of milliseconds); async callers
//! must run them in `tokio::task::spawn_blocking`.

pub mod jwt;
pub mod mail;
pub mod opaque;
pub mod password;
pub mod sealing;
pub mod throttle;
pub mod totp;

pub use jwt::{AccessClaims, AccessSubject, TokenError, TokenIssuer};
pub use mail::{
    LogMailer, MailError, MailMessage, Mailer, MemoryMailer, SmtpConfig, SmtpMailer, SmtpTls,
};
pub use opaque::{
    generate, generate_api_key, hash_token, hashes_match, parse_api_key, ApiKeySecret, OpaqueToken,
};
pub use password::{PasswordError, PasswordHasher, PasswordPolicy};
pub use throttle::{LoginThrottle, ThrottleConfig, Throttled};
pub use totp::{RecoveryCode, TotpError, TotpSecret};

/// The error of the hashing and key-parsing primitives, and the umbrella over the errors of
/// every module so that callers may use `?` across modules.
///
/// Messages are lowercase and never contain a secret (no password, token or key text).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A stored password hash is not a PHC string this crate can read (for example
    /// `$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>`). Holds the parser's reason.
    #[error("malformed password hash: {0}")]
    MalformedHash(String),
    /// Argon2 parameters are below the OWASP minimum (see [`password::HashParams`]).
    #[error(
        "argon2 parameters m={memory_kib} KiB, t={iterations}, p={parallelism} are below the owasp minimum"
    )]
    WeakHashParams {
        /// Memory cost in KiB.
        memory_kib: u32,
        /// Number of passes.
        iterations: u32,
        /// Degree of parallelism (lanes).
        parallelism: u32,
    },
    /// Argon2 parameters the library refuses (for example `p = 0`). Holds its reason.
    #[error("invalid argon2 parameters: {0}")]
    InvalidHashParams(String),
    /// A password longer than [`password::PASSWORD_BYTES_MAX`] bytes was given to the hasher.
    #[error("password is longer than {max_bytes} bytes")]
    PasswordTooLong {
        /// The limit in bytes.
        max_bytes: usize,
    },
    /// The Argon2 computation itself failed. Holds the library's reason.
    #[error("password hashing failed: {0}")]
    Hashing(String),
    /// An API key does not have the shape `ak_<32 hex digits>_<43 base64url characters>`.
    /// Holds what is wrong, without echoing the key.
    #[error("malformed api key: {0}")]
    MalformedApiKey(&'static str),
    /// The password policy refused a password.
    #[error(transparent)]
    Password(#[from] PasswordError),
    /// An access token was refused or could not be issued.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// A one-time code was refused or a TOTP secret is unusable.
    #[error(transparent)]
    Totp(#[from] TotpError),
    /// Too many failed sign-in attempts.
    #[error(transparent)]
    Throttled(#[from] Throttled),
    /// A message could not be sent.
    #[error(transparent)]
    Mail(#[from] MailError),
}
