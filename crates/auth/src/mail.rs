//! The mail port: how the server sends verification, password-reset and invitation messages.
//!
//! [`Mailer`] is the port; three backends implement it:
//!
//! - [`LogMailer`], the development default: writes each message as one `tracing` event with
//!   target `arches::mail`, so that verification and reset links appear in the server log.
//! - [`SmtpMailer`], for production: SMTP submission (RFC 5321, RFC 6409) through `lettre`, as
//!   plain SMTP, STARTTLS (RFC 3207) or implicit TLS (RFC 8314), with optional credentials.
//! - [`MemoryMailer`], for tests: keeps the last messages in memory so a test can read a link.
//!
//! Messages are plain text only. This module must never log SMTP credentials; only the
//! [`LogMailer`] logs message bodies, on purpose.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use lettre::message::header::ContentType;
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

/// The largest message body, in bytes, that a mailer accepts: 1 MiB, far above any
/// notification and well under common server limits (RFC 1870 SIZE is usually 10 MiB or more).
pub const BODY_BYTES_MAX: usize = 1024 * 1024;

/// The longest subject, in characters: 998, the line-length limit of RFC 5322 section 2.1.1.
pub const SUBJECT_CHARS_MAX: usize = 998;

/// A plain-text message to one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailMessage {
    /// The recipient's address, for example `ada@example.com` or `Ada <ada@example.com>`.
    pub to: String,
    /// The subject, one line.
    pub subject: String,
    /// The body, plain UTF-8 text, at most [`BODY_BYTES_MAX`] bytes.
    pub text_body: String,
}

/// Why a message could not be sent. Messages are lowercase and never contain credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MailError {
    /// An address (recipient or configured sender) is not a valid mailbox.
    #[error("invalid mail address {address:?}: {reason}")]
    InvalidAddress {
        /// The address as given.
        address: String,
        /// The parser's reason.
        reason: String,
    },
    /// The message cannot be built: a multi-line or overlong subject, an overlong body.
    #[error("invalid mail message: {0}")]
    InvalidMessage(String),
    /// The configuration cannot be used (for example a username without a password).
    #[error("invalid smtp configuration: {0}")]
    InvalidConfig(String),
    /// The SMTP server could not be reached or the connection broke.
    #[error("could not reach the smtp server {server}: {reason}")]
    Connection {
        /// `host:port`.
        server: String,
        /// What went wrong, for example "connection refused".
        reason: String,
    },
    /// The TLS handshake with the SMTP server failed (for example an untrusted certificate).
    #[error("tls with the smtp server {server} failed: {reason}")]
    Tls {
        /// `host:port`.
        server: String,
        /// The TLS library's reason.
        reason: String,
    },
    /// The SMTP server did not answer within the configured timeout.
    #[error("the smtp server {server} did not answer in time")]
    Timeout {
        /// `host:port`.
        server: String,
    },
    /// The SMTP server refused the message. `permanent` is true for a 5xx reply (do not retry
    /// as is), false for a 4xx reply (retry later), RFC 5321 section 4.2.1.
    #[error("the smtp server refused the message: {reply}")]
    Rejected {
        /// Whether the refusal is permanent (5xx).
        permanent: bool,
        /// The server's reply text.
        reply: String,
    },
}

/// The mail port: sends one message.
///
/// Implementations must be cheap to share (`Arc<dyn Mailer>`) and must not block the async
/// executor.
#[async_trait]
pub trait Mailer: Send + Sync {
    /// Sends `message`.
    ///
    /// # Errors
    /// A [`MailError`] saying whether the message, the configuration or the server is at fault.
    async fn send(&self, message: &MailMessage) -> Result<(), MailError>;
}

fn check_message(message: &MailMessage) -> Result<(), MailError> {
    if message.subject.contains(['\r', '\n']) {
        return Err(MailError::InvalidMessage(
            "the subject must be one line".into(),
        ));
    }
    if message.subject.chars().count() > SUBJECT_CHARS_MAX {
        return Err(MailError::InvalidMessage(format!(
            "the subject is longer than {SUBJECT_CHARS_MAX} characters"
        )));
    }
    if message.text_body.len() > BODY_BYTES_MAX {
        return Err(MailError::InvalidMessage(format!(
            "the body is larger than {BODY_BYTES_MAX} bytes"
        )));
    }
    Ok(())
}

fn parse_mailbox(address: &str) -> Result<Mailbox, MailError> {
    address
        .parse::<Mailbox>()
        .map_err(|error| MailError::InvalidAddress {
            address: address.to_owned(),
            reason: error.to_string(),
        })
}

/// The development mailer: writes each message as one `tracing::info!` event with target
/// `arches::mail` and the fields `to`, `subject` and `body`, and sends nothing.
///
/// This is the default so that a self-hosted server works without a mail server: the
/// verification and reset links can be copied from the log. Do not use it where logs are
/// readable by people who must not see those links.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogMailer;

#[async_trait]
impl Mailer for LogMailer {
    async fn send(&self, message: &MailMessage) -> Result<(), MailError> {
        check_message(message)?;
        tracing::info!(
            target: "arches::mail",
            to = %message.to,
            subject = %message.subject,
            body = %message.text_body,
            "mail message (log mailer, not sent)"
        );
        Ok(())
    }
}

/// A mailer for tests: keeps the last `capacity` messages in memory, oldest dropped first.
#[derive(Debug)]
pub struct MemoryMailer {
    capacity: usize,
    messages: Mutex<VecDeque<MailMessage>>,
}

impl MemoryMailer {
    /// A mailer keeping at most `capacity` messages (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            messages: Mutex::new(VecDeque::new()),
        }
    }

    /// The messages kept, oldest first.
    pub fn messages(&self) -> Vec<MailMessage> {
        let messages = self.messages.lock().unwrap_or_else(PoisonError::into_inner);
        messages.iter().cloned().collect()
    }

    /// The most recent message sent to `to`, if any.
    pub fn last_to(&self, to: &str) -> Option<MailMessage> {
        let messages = self.messages.lock().unwrap_or_else(PoisonError::into_inner);
        messages
            .iter()
            .rev()
            .find(|message| message.to == to)
            .cloned()
    }
}

impl Default for MemoryMailer {
    /// Keeps the last 100 messages.
    fn default() -> Self {
        Self::new(100)
    }
}

#[async_trait]
impl Mailer for MemoryMailer {
    async fn send(&self, message: &MailMessage) -> Result<(), MailError> {
        check_message(message)?;
        parse_mailbox(&message.to)?;
        let mut messages = self.messages.lock().unwrap_or_else(PoisonError::into_inner);
        if messages.len() >= self.capacity {
            messages.pop_front();
        }
        messages.push_back(message.clone());
        Ok(())
    }
}

/// How the SMTP connection is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SmtpTls {
    /// Plain SMTP, no encryption: only for a relay on the same host or a trusted network.
    None,
    /// Connect in plain text, then require STARTTLS (RFC 3207); refuse to go on without it.
    /// The usual choice on port 587.
    #[default]
    StartTls,
    /// TLS from the first byte (implicit TLS, RFC 8314); the usual choice on port 465.
    Tls,
}

/// Where and how to send mail.
#[derive(Clone, PartialEq, Eq)]
pub struct SmtpConfig {
    /// The server's host name (checked against its TLS certificate) or IP address.
    pub host: String,
    /// The server's port: usually 587 with [`SmtpTls::StartTls`], 465 with [`SmtpTls::Tls`],
    /// 25 for a local relay.
    pub port: u16,
    /// The user name for SMTP AUTH (RFC 4954), if the server requires it.
    pub username: Option<String>,
    /// The password for SMTP AUTH; required when `username` is set.
    pub password: Option<String>,
    /// The sender, for example `Arches <noreply@example.com>`.
    pub from: String,
    /// How the connection is protected.
    pub tls: SmtpTls,
    /// The timeout of each SMTP command, including connecting; default 10 s.
    pub timeout: Duration,
}

impl fmt::Debug for SmtpConfig {
    /// Shows everything but the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("from", &self.from)
            .field("tls", &self.tls)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl SmtpConfig {
    /// A configuration for `host:port` sending as `from`, with STARTTLS, no credentials and a
    /// 10 s timeout.
    pub fn new(host: impl Into<String>, port: u16, from: impl Into<String>) -> Self {
        Self {
            host: host.into(),
            port,
            username: None,
            password: None,
            from: from.into(),
            tls: SmtpTls::StartTls,
            timeout: Duration::from_secs(10),
        }
    }
}

/// The production mailer: SMTP submission through `lettre` on tokio, one connection per
/// message (notification volume does not warrant a pool).
pub struct SmtpMailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    server: String,
}

impl fmt::Debug for SmtpMailer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpMailer")
            .field("server", &self.server)
            .field("from", &self.from.to_string())
            .finish_non_exhaustive()
    }
}

impl SmtpMailer {
    /// A mailer for `config`. Does not connect yet; the first [`Mailer::send`] does.
    ///
    /// TLS certificates are checked against the Mozilla root store (`webpki-roots`).
    ///
    /// # Errors
    /// [`MailError::InvalidAddress`] when `from` is not a mailbox;
    /// [`MailError::InvalidConfig`] when a username comes without a password or the reverse,
    /// or the host is empty; [`MailError::Tls`] when TLS parameters cannot be made for `host`.
    pub fn new(config: SmtpConfig) -> Result<Self, MailError> {
        let from = parse_mailbox(&config.from)?;
        if config.host.trim().is_empty() {
            return Err(MailError::InvalidConfig("the host is empty".into()));
        }
        let server = format!("{}:{}", config.host, config.port);
        let tls = match config.tls {
            SmtpTls::None => Tls::None,
            SmtpTls::StartTls => Tls::Required(tls_parameters(&config.host, &server)?),
            SmtpTls::Tls => Tls::Wrapper(tls_parameters(&config.host, &server)?),
        };
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&config.host)
            .port(config.port)
            .tls(tls)
            .timeout(Some(config.timeout));
        match (config.username, config.password) {
            (Some(username), Some(password)) => {
                builder = builder.credentials(Credentials::new(username, password));
            }
            (None, None) => {}
            _ => {
                return Err(MailError::InvalidConfig(
                    "username and password must be given together".into(),
                ))
            }
        }
        Ok(Self {
            transport: builder.build(),
            from,
            server,
        })
    }

    fn map_error(&self, error: &lettre::transport::smtp::Error) -> MailError {
        let server = self.server.clone();
        if error.is_timeout() {
            return MailError::Timeout { server };
        }
        if error.is_permanent() || error.is_transient() {
            return MailError::Rejected {
                permanent: error.is_permanent(),
                reply: error.to_string(),
            };
        }
        if error.is_tls() {
            return MailError::Tls {
                server,
                reason: error_chain(error),
            };
        }
        MailError::Connection {
            server,
            reason: error_chain(error),
        }
    }
}

fn tls_parameters(host: &str, server: &str) -> Result<TlsParameters, MailError> {
    TlsParameters::new(host.to_owned()).map_err(|error| MailError::Tls {
        server: server.to_owned(),
        reason: error.to_string(),
    })
}

/// The error and its sources, lowercased, joined with ": ".
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text.to_lowercase()
}

#[async_trait]
impl Mailer for SmtpMailer {
    async fn send(&self, message: &MailMessage) -> Result<(), MailError> {
        check_message(message)?;
        let to = parse_mailbox(&message.to)?;
        let email = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(message.subject.clone())
            .header(ContentType::TEXT_PLAIN)
            .body(message.text_body.clone())
            .map_err(|error| MailError::InvalidMessage(error.to_string()))?;
        self.transport
            .send(email)
            .await
            .map_err(|error| self.map_error(&error))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;
    use tokio::sync::oneshot;

    use super::*;

    /// What the stand-in server received.
    #[derive(Debug, Default)]
    struct Received {
        mail_from: String,
        rcpt_to: Vec<String>,
        data: String,
    }

    /// The most bytes the stand-in server reads from one connection.
    const CAPTURE_BYTES_MAX: usize = 64 * 1024;

    /// A tiny SMTP server (RFC 5321 section 4.3.2 happy path) on 127.0.0.1:0 that accepts one
    /// connection and reports what it received when the client leaves.
    async fn spawn_smtp_stand_in() -> (u16, oneshot::Receiver<io::Result<Received>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (report, received) = oneshot::channel();
        tokio::spawn(async move {
            let result = async {
                let (socket, _) = listener.accept().await?;
                let (reader, mut writer) = socket.into_split();
                let mut reader = BufReader::new(reader);
                let mut received = Received::default();
                let mut total = 0usize;
                let mut in_data = false;
                writer.write_all(b"220 stand-in ESMTP ready\r\n").await?;
                loop {
                    let mut line = String::new();
                    let read = reader.read_line(&mut line).await?;
                    total += read;
                    if read == 0 || total > CAPTURE_BYTES_MAX {
                        break;
                    }
                    let line = line.trim_end_matches(['\r', '\n']);
                    if in_data {
                        if line == "." {
                            in_data = false;
                            writer.write_all(b"250 2.0.0 queued\r\n").await?;
                        } else {
                            // Undo dot-stuffing (RFC 5321 section 4.5.2).
                            let line = line.strip_prefix('.').unwrap_or(line);
                            received.data.push_str(line);
                            received.data.push('\n');
                        }
                        continue;
                    }
                    let upper = line.to_ascii_uppercase();
                    if upper.starts_with("EHLO") || upper.starts_with("HELO") {
                        writer.write_all(b"250 stand-in\r\n").await?;
                    } else if upper.starts_with("MAIL FROM:") {
                        received.mail_from = line["MAIL FROM:".len()..].to_owned();
                        writer.write_all(b"250 2.1.0 ok\r\n").await?;
                    } else if upper.starts_with("RCPT TO:") {
                        received.rcpt_to.push(line["RCPT TO:".len()..].to_owned());
                        writer.write_all(b"250 2.1.5 ok\r\n").await?;
                    } else if upper == "DATA" {
                        in_data = true;
                        writer
                            .write_all(b"354 end data with <CR><LF>.<CR><LF>\r\n")
                            .await?;
                    } else if upper == "QUIT" {
                        writer.write_all(b"221 2.0.0 bye\r\n").await?;
                        break;
                    } else if upper == "RSET" || upper == "NOOP" {
                        writer.write_all(b"250 ok\r\n").await?;
                    } else {
                        writer.write_all(b"502 5.5.1 not implemented\r\n").await?;
                    }
                }
                Ok(received)
            }
            .await;
            let _ = report.send(result);
        });
        (port, received)
    }

    fn plain_config(port: u16) -> SmtpConfig {
        SmtpConfig {
            tls: SmtpTls::None,
            timeout: Duration::from_secs(5),
            ..SmtpConfig::new("127.0.0.1", port, "Arches <noreply@arches.test>")
        }
    }

    fn message() -> MailMessage {
        MailMessage {
            to: "ada@example.com".into(),
            subject: "Verify your email address".into(),
            text_body: "Open this link to verify your address:\nhttps://arches.test/verify?token=aev_abc\n.a line starting with a dot\n".into(),
        }
    }

    #[tokio::test]
    async fn smtp_delivers_recipient_subject_and_body_to_a_real_socket() {
        let (port, received) = spawn_smtp_stand_in().await;
        let mailer = SmtpMailer::new(plain_config(port)).unwrap();
        mailer.send(&message()).await.unwrap();

        let received = tokio::time::timeout(Duration::from_secs(10), received)
            .await
            .expect("the stand-in server reports within 10 s")
            .unwrap()
            .unwrap();
        assert_eq!(received.mail_from, "<noreply@arches.test>");
        assert_eq!(received.rcpt_to, vec!["<ada@example.com>".to_owned()]);
        assert!(
            received.data.contains("To: ada@example.com"),
            "{}",
            received.data
        );
        assert!(
            received.data.contains("From: Arches <noreply@arches.test>"),
            "{}",
            received.data
        );
        assert!(
            received.data.contains("Subject: Verify your email address"),
            "{}",
            received.data
        );
        assert!(
            received
                .data
                .contains("https://arches.test/verify?token=aev_abc"),
            "{}",
            received.data
        );
        assert!(
            received.data.contains("\n.a line starting with a dot\n"),
            "{}",
            received.data
        );
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_clear_connection_error() {
        // Bind then drop a listener so the port is very likely closed.
        let port = {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            listener.local_addr().unwrap().port()
        };
        let mailer = SmtpMailer::new(plain_config(port)).unwrap();
        let error = mailer.send(&message()).await.unwrap_err();
        match &error {
            MailError::Connection { server, reason } => {
                assert_eq!(server, &format!("127.0.0.1:{port}"));
                assert!(reason.contains("refused"), "{reason}");
            }
            other => panic!("expected a connection error, got {other:?}"),
        }
        assert!(error
            .to_string()
            .starts_with("could not reach the smtp server 127.0.0.1:"));
    }

    #[tokio::test]
    async fn bad_addresses_and_subjects_are_refused_before_connecting() {
        let mailer = SmtpMailer::new(plain_config(9)).unwrap();
        let mut bad_recipient = message();
        bad_recipient.to = "not an address".into();
        assert!(matches!(
            mailer.send(&bad_recipient).await,
            Err(MailError::InvalidAddress { .. })
        ));
        let mut injected = message();
        injected.subject = "hello\r\nBcc: victim@example.com".into();
        assert!(matches!(
            mailer.send(&injected).await,
            Err(MailError::InvalidMessage(_))
        ));
        let config = SmtpConfig {
            from: "nobody".into(),
            ..plain_config(9)
        };
        assert!(matches!(
            SmtpMailer::new(config),
            Err(MailError::InvalidAddress { .. })
        ));
        let config = SmtpConfig {
            username: Some("user".into()),
            ..plain_config(9)
        };
        assert!(matches!(
            SmtpMailer::new(config),
            Err(MailError::InvalidConfig(_))
        ));
    }

    #[test]
    fn tls_modes_build_and_the_password_stays_out_of_debug() {
        for tls in [SmtpTls::StartTls, SmtpTls::Tls] {
            let config = SmtpConfig {
                username: Some("mailer".into()),
                password: Some("hunter2-secret".into()),
                tls,
                ..SmtpConfig::new("smtp.example.com", 587, "noreply@example.com")
            };
            assert!(!format!("{config:?}").contains("hunter2-secret"));
            let mailer = SmtpMailer::new(config).unwrap();
            assert!(!format!("{mailer:?}").contains("hunter2-secret"));
        }
    }

    /// A `tracing` writer that appends to a shared buffer.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn the_log_mailer_writes_one_event_with_the_whole_message() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);

        LogMailer.send(&message()).await.unwrap();

        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.matches("arches::mail").count(), 1, "{text}");
        assert!(text.contains("to=ada@example.com"), "{text}");
        assert!(text.contains("subject=Verify your email address"), "{text}");
        assert!(
            text.contains("https://arches.test/verify?token=aev_abc"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn the_memory_mailer_keeps_the_last_messages() {
        let mailer = MemoryMailer::new(2);
        for n in 0..3 {
            let mut message = message();
            message.subject = format!("message {n}");
            mailer.send(&message).await.unwrap();
        }
        let subjects: Vec<String> = mailer.messages().into_iter().map(|m| m.subject).collect();
        assert_eq!(subjects, ["message 1", "message 2"]);
        assert_eq!(
            mailer.last_to("ada@example.com").unwrap().subject,
            "message 2"
        );
        assert!(mailer.last_to("bob@example.com").is_none());
    }
}
