//! The crate's own error type, and how failures of SQLite, PostgreSQL, the filesystem and the
//! object store map onto the storage port's [`StoreError`].
//!
//! The mapping is what callers branch on: a full disk is [`StoreError::DiskFull`] wherever it
//! happens, a refused constraint is [`StoreError::Conflict`], a locked or unreachable database
//! is [`StoreError::Unavailable`], undecodable rows are [`StoreError::Corrupt`].

use std::io;
use std::path::PathBuf;

use arches_core::ports::StoreError;

/// Errors of opening the stores; every operation after that returns [`StoreError`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A directory for the database or the artifact root could not be created.
    #[error("cannot create directory {path}: {source}")]
    CreateDirectory {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The database could not be opened or configured.
    #[error("cannot open database {path}: {source}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// The cause.
        source: sqlx::Error,
    },
    /// The embedded migrations could not be applied.
    #[error("cannot migrate database {path}: {source}")]
    Migrate {
        /// The database file.
        path: PathBuf,
        /// The cause.
        source: sqlx::migrate::MigrateError,
    },
    /// The PostgreSQL database could not be reached or configured.
    #[error("cannot connect to database {database}: {source}")]
    Connect {
        /// The database's name (never the URL, which may carry a password).
        database: String,
        /// The cause.
        source: sqlx::Error,
    },
    /// The embedded migrations could not be applied to the PostgreSQL database.
    #[error("cannot migrate database {database}: {source}")]
    MigrateDatabase {
        /// The database's name.
        database: String,
        /// The cause.
        source: sqlx::migrate::MigrateError,
    },
    /// The artifact root could not be used as a blob store.
    #[error("cannot use artifact root {path}: {source}")]
    ArtifactRoot {
        /// The root directory.
        path: PathBuf,
        /// The cause.
        source: object_store::Error,
    },
}

impl From<Error> for StoreError {
    fn from(error: Error) -> Self {
        let message = error.to_string();
        match &error {
            Error::CreateDirectory { source, .. } if is_disk_full(source) => {
                StoreError::DiskFull(message)
            }
            Error::CreateDirectory { .. } => StoreError::Unavailable(message),
            Error::Open { source, .. } => match sqlx_error(source) {
                StoreError::DiskFull(_) => StoreError::DiskFull(message),
                StoreError::Corrupt(_) => StoreError::Corrupt(message),
                _ => StoreError::Unavailable(message),
            },
            Error::Connect { source, .. } => match sqlx_error(source) {
                StoreError::DiskFull(_) => StoreError::DiskFull(message),
                _ => StoreError::Unavailable(message),
            },
            Error::Migrate { source, .. } | Error::MigrateDatabase { source, .. } => match source {
                sqlx::migrate::MigrateError::Execute(inner) => match sqlx_error(inner) {
                    StoreError::DiskFull(_) => StoreError::DiskFull(message),
                    _ => StoreError::Backend(message),
                },
                _ => StoreError::Backend(message),
            },
            Error::ArtifactRoot { source, .. } => match object_store_error(source) {
                StoreError::DiskFull(_) => StoreError::DiskFull(message),
                _ => StoreError::Unavailable(message),
            },
        }
    }
}

/// SQLite primary result codes (<https://www.sqlite.org/rescode.html>); an extended code
/// carries its primary code in the low byte.
mod sqlite_code {
    pub const BUSY: i64 = 5;
    pub const LOCKED: i64 = 6;
    pub const CORRUPT: i64 = 11;
    pub const FULL: i64 = 13;
    pub const CANTOPEN: i64 = 14;
    pub const CONSTRAINT: i64 = 19;
    pub const NOTADB: i64 = 26;
}

/// Maps a sqlx error onto the port's error.
pub(crate) fn sqlx_error(error: &sqlx::Error) -> StoreError {
    match error {
        sqlx::Error::Database(database)
            if database
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .is_some() =>
        {
            postgres_error(database.code().as_deref(), database.message())
        }
        sqlx::Error::Database(database) => {
            let message = database.message().to_owned();
            let primary = database
                .code()
                .and_then(|code| code.parse::<i64>().ok())
                .map(|code| code & 0xff);
            match primary {
                Some(sqlite_code::FULL) => StoreError::DiskFull(message),
                Some(sqlite_code::CONSTRAINT) => StoreError::Conflict(message),
                Some(sqlite_code::BUSY | sqlite_code::LOCKED | sqlite_code::CANTOPEN) => {
                    StoreError::Unavailable(message)
                }
                Some(sqlite_code::CORRUPT | sqlite_code::NOTADB) => StoreError::Corrupt(message),
                _ => StoreError::Backend(message),
            }
        }
        // A lost or refused connection (a database restarting, a network cut) may come
        // back: unavailability, not a failure of the store.
        sqlx::Error::Io(source) if is_connection_lost(source) => {
            StoreError::Unavailable(source.to_string())
        }
        sqlx::Error::Io(source) => io_error(source),
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => {
            StoreError::Unavailable(error.to_string())
        }
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::TypeNotFound { .. } => StoreError::Corrupt(error.to_string()),
        other => StoreError::Backend(other.to_string()),
    }
}

/// Maps a PostgreSQL error, by its SQLSTATE
/// (<https://www.postgresql.org/docs/current/errcodes-appendix.html>), onto the port's error:
/// integrity violations (class 23) are conflicts; a full disk (53100) is a full disk; lost
/// connections (class 08), shutdowns (57P01 to 57P03), too many connections (53300), lock and
/// serialization failures (class 40, 55P03) may succeed later and are unavailability; data
/// corruption (XX001, XX002) is corrupt data.
fn postgres_error(code: Option<&str>, message: &str) -> StoreError {
    let message = message.to_owned();
    let Some(code) = code else {
        return StoreError::Backend(message);
    };
    match code {
        "53100" => StoreError::DiskFull(message),
        "53300" | "55P03" | "57P01" | "57P02" | "57P03" => StoreError::Unavailable(message),
        "XX001" | "XX002" => StoreError::Corrupt(message),
        _ if code.starts_with("23") => StoreError::Conflict(message),
        _ if code.starts_with("08") || code.starts_with("40") => StoreError::Unavailable(message),
        _ => StoreError::Backend(message),
    }
}

/// Maps a sqlx error onto the port's error, by value; for `map_err`.
pub(crate) fn db(error: sqlx::Error) -> StoreError {
    sqlx_error(&error)
}

/// `ENOSPC` on Linux and macOS; `ErrorKind::StorageFull` covers it on recent toolchains, the
/// raw code covers errors built from a raw OS error before that kind existed.
const ENOSPC: i32 = 28;
/// `EDQUOT` on Linux: a disk quota is exhausted, which is a full disk for this user.
const EDQUOT: i32 = 122;

/// Whether an I/O error means the disk (or the user's quota) is full.
pub(crate) fn is_disk_full(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::StorageFull
        || error.kind() == io::ErrorKind::QuotaExceeded
        || matches!(error.raw_os_error(), Some(ENOSPC | EDQUOT))
}

/// Whether an I/O error is a connection that was refused, reset or cut.
fn is_connection_lost(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NotConnected
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::TimedOut
            | io::ErrorKind::UnexpectedEof
    )
}

/// Maps an I/O error onto the port's error.
pub(crate) fn io_error(error: &io::Error) -> StoreError {
    if is_disk_full(error) {
        StoreError::DiskFull(error.to_string())
    } else {
        StoreError::Backend(error.to_string())
    }
}

/// Maps an object-store error onto the port's error, looking through its causes for the
/// I/O error of a full disk.
pub(crate) fn object_store_error(error: &object_store::Error) -> StoreError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = cause {
        if let Some(io) = current.downcast_ref::<io::Error>() {
            if is_disk_full(io) {
                return StoreError::DiskFull(error.to_string());
            }
        }
        cause = current.source();
    }
    match error {
        object_store::Error::NotFound { .. } => StoreError::NotFound(error.to_string()),
        object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. } => {
            StoreError::Conflict(error.to_string())
        }
        _ => StoreError::Backend(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_under_the_object_store_maps_to_disk_full() {
        let error = object_store::Error::Generic {
            store: "LocalFileSystem",
            source: Box::new(io::Error::from_raw_os_error(ENOSPC)),
        };
        assert!(matches!(
            object_store_error(&error),
            StoreError::DiskFull(_)
        ));
        let error = io::Error::from(io::ErrorKind::StorageFull);
        assert!(matches!(io_error(&error), StoreError::DiskFull(_)));
        let error = io::Error::from(io::ErrorKind::PermissionDenied);
        assert!(matches!(io_error(&error), StoreError::Backend(_)));
    }

    #[test]
    fn postgres_states_map_by_class() {
        assert!(matches!(
            postgres_error(Some("23503"), "fk"),
            StoreError::Conflict(_)
        ));
        assert!(matches!(
            postgres_error(Some("53100"), "full"),
            StoreError::DiskFull(_)
        ));
        assert!(matches!(
            postgres_error(Some("40P01"), "deadlock"),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(
            postgres_error(Some("42P01"), "no table"),
            StoreError::Backend(_)
        ));
    }

    #[test]
    fn pool_exhaustion_maps_to_unavailable() {
        assert!(matches!(
            sqlx_error(&sqlx::Error::PoolTimedOut),
            StoreError::Unavailable(_)
        ));
    }
}
