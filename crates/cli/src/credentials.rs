//! The credentials `arches login` saves: `credentials.json` in the config directory
//! (`$ARCHES_CONFIG_DIR`, else `$XDG_CONFIG_HOME/arches`, else `~/.config/arches`), one login
//! session per server URL, and the default server (the last one logged in to).
//!
//! The file holds secrets: it is created with mode 0600 in a directory of mode 0700, and
//! always replaced whole (a temporary file renamed over it), so no reader sees half a file.
//! Changes are made under an exclusive lock of `credentials.lock` beside it, so that
//! concurrent `arches` processes neither lose each other's updates nor both spend the same
//! refresh token (which would make the server revoke the session).
//!
//! This module never prints a token, and `Debug` of a saved session hides them.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use arches_client::{SessionTokens, TokenResponse};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

/// Largest credentials file read, in bytes: it holds a few tokens per server.
const FILE_BYTES_MAX: u64 = 1 << 20;

/// What the file holds.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Saved {
    /// The server commands use when none is given (the last one logged in to).
    #[serde(default)]
    pub default_server: Option<String>,
    /// Login sessions by normalized server URL.
    #[serde(default)]
    pub servers: BTreeMap<String, SavedSession>,
}

/// A login session on one server.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedSession {
    /// The JWT access token.
    pub access_token: String,
    /// The single-use refresh token.
    pub refresh_token: String,
    /// When the access token expires, in seconds since the Unix epoch (computed from the
    /// server's `expires_in` when saved).
    pub access_expires_at: u64,
    /// The account's email.
    pub email: String,
    /// The org the session acts in (its slug).
    pub org: String,
    /// The role there.
    pub role: String,
}

impl fmt::Debug for SavedSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SavedSession")
            .field("access_expires_at", &self.access_expires_at)
            .field("email", &self.email)
            .field("org", &self.org)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

impl SavedSession {
    /// The session of a login or refresh answer, at `now` (seconds since the epoch).
    pub fn from_answer(tokens: &TokenResponse, now: u64) -> Self {
        SavedSession {
            access_token: tokens.access_token.clone(),
            refresh_token: tokens.refresh_token.clone(),
            access_expires_at: now.saturating_add(tokens.expires_in),
            email: tokens.user.email.clone(),
            org: tokens.org.slug.clone(),
            role: tokens.role.clone(),
        }
    }

    /// The tokens, for the client.
    pub fn tokens(&self) -> SessionTokens {
        SessionTokens {
            access_token: self.access_token.clone(),
            refresh_token: self.refresh_token.clone(),
        }
    }
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The credentials file of this user.
#[derive(Clone, Debug)]
pub struct Store {
    dir: PathBuf,
}

/// The store while this process holds its lock; dropped, it releases it.
pub struct Locked {
    store: Store,
    _lock: Flock<std::fs::File>,
}

impl Store {
    /// The store in the config directory named by the environment.
    ///
    /// # Errors
    /// When neither `ARCHES_CONFIG_DIR`, `XDG_CONFIG_HOME` nor `HOME` is set.
    pub fn locate() -> anyhow::Result<Self> {
        let non_empty = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        let dir = if let Some(dir) = non_empty("ARCHES_CONFIG_DIR") {
            PathBuf::from(dir)
        } else if let Some(config) = non_empty("XDG_CONFIG_HOME") {
            PathBuf::from(config).join("arches")
        } else if let Some(home) = non_empty("HOME") {
            PathBuf::from(home).join(".config").join("arches")
        } else {
            anyhow::bail!("cannot tell where to keep credentials: set ARCHES_CONFIG_DIR (or HOME)");
        };
        Ok(Store { dir })
    }

    /// The store in `dir` (for tests).
    #[cfg(test)]
    pub fn in_dir(dir: &Path) -> Self {
        Store {
            dir: dir.to_path_buf(),
        }
    }

    /// The credentials file.
    pub fn path(&self) -> PathBuf {
        self.dir.join("credentials.json")
    }

    /// What is saved; nothing when the file does not exist.
    ///
    /// # Errors
    /// When the file cannot be read or is not the expected JSON.
    pub fn load(&self) -> anyhow::Result<Saved> {
        let path = self.path();
        let file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Saved::default())
            }
            Err(error) => {
                return Err(error).with_context(|| format!("cannot read {}", path.display()))
            }
        };
        let mut text = String::new();
        file.take(FILE_BYTES_MAX)
            .read_to_string(&mut text)
            .with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a credentials file; remove it and log in again",
                path.display()
            )
        })
    }

    /// Takes the exclusive lock, waiting for another process to release it. This blocks:
    /// call it from `spawn_blocking` or where a short wait is acceptable.
    ///
    /// # Errors
    /// When the directory or the lock file cannot be created.
    pub fn lock(&self) -> anyhow::Result<Locked> {
        self.create_dir()?;
        let path = self.dir.join("credentials.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| errno)
            .with_context(|| format!("cannot lock {}", path.display()))?;
        Ok(Locked {
            store: self.clone(),
            _lock: lock,
        })
    }

    /// Reads, changes with `change` and writes back the file, under the lock.
    ///
    /// # Errors
    /// As [`Store::lock`], [`Store::load`] and [`Locked::save`].
    pub fn update<R>(&self, change: impl FnOnce(&mut Saved) -> R) -> anyhow::Result<R> {
        let locked = self.lock()?;
        let mut saved = locked.load()?;
        let result = change(&mut saved);
        locked.save(&saved)?;
        Ok(result)
    }

    fn create_dir(&self) -> anyhow::Result<()> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))
    }
}

impl Locked {
    /// What is saved (read under the lock).
    ///
    /// # Errors
    /// As [`Store::load`].
    pub fn load(&self) -> anyhow::Result<Saved> {
        self.store.load()
    }

    /// Replaces the file with `saved`: written to a temporary file of mode 0600, synced,
    /// and renamed over the old one.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn save(&self, saved: &Saved) -> anyhow::Result<()> {
        let path = self.store.path();
        let temporary = self
            .store
            .dir
            .join(format!(".credentials.json.{}.tmp", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(&temporary)?;
            // An existing file of a looser mode keeps it through open(): set it.
            file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            let text = serde_json::to_string_pretty(saved).map_err(std::io::Error::other)?;
            file.write_all(text.as_bytes())?;
            file.write_all(b"\n")?;
            file.sync_all()?;
            std::fs::rename(&temporary, &path)
        };
        write().map_err(|error| {
            let _ = std::fs::remove_file(&temporary);
            anyhow::Error::new(error).context(format!("cannot write {}", path.display()))
        })
    }
}

/// Whether `path` can be read by others than its owner (a warning is worth printing).
pub fn too_open(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o077 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(access: &str) -> SavedSession {
        SavedSession {
            access_token: access.into(),
            refresh_token: "r".into(),
            access_expires_at: 10,
            email: "o@example.test".into(),
            org: "default".into(),
            role: "owner".into(),
        }
    }

    #[test]
    fn sessions_are_saved_by_server_with_owner_only_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::in_dir(&dir.path().join("config"));
        assert!(store.load().unwrap().servers.is_empty());
        store
            .update(|saved| {
                saved.servers.insert("http://a".into(), session("a1"));
                saved.default_server = Some("http://a".into());
            })
            .unwrap();
        store
            .update(|saved| saved.servers.insert("http://b".into(), session("b1")))
            .unwrap();
        let saved = store.load().unwrap();
        assert_eq!(saved.default_server.as_deref(), Some("http://a"));
        assert_eq!(saved.servers["http://a"].access_token, "a1");
        assert_eq!(saved.servers["http://b"].access_token, "b1");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&store.path()), 0o600);
        assert_eq!(mode(&dir.path().join("config")), 0o700);
        assert!(!too_open(&store.path()));
        // Nothing temporary is left behind.
        let names: Vec<String> = std::fs::read_dir(dir.path().join("config"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn debug_output_hides_the_tokens() {
        let text = format!("{:?}", session("secret-access"));
        assert!(!text.contains("secret"), "{text}");
    }
}
