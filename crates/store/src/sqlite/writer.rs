//! The single writer connection, and write scripts: a whole write transaction sent to the
//! connection's thread as one multi-statement query.
//!
//! Every sqlx call on a SQLite connection is a round trip to the thread that owns it; an idle
//! thread takes tens to hundreds of microseconds to wake, which is more than a small commit
//! costs SQLite itself. A script (`BEGIN IMMEDIATE; …; COMMIT;`) pays that once instead of
//! once per statement plus twice for the transaction.
//!
//! The price is that sqlx does not know about the transaction. A script that stops half-way
//! (a statement fails, or the caller stops waiting while the connection's thread goes on)
//! may leave it open, so the connection is marked in doubt until the script is known to have
//! finished, and the next write first rolls back whatever is left.

use arches_core::ports::StoreResult;
use sqlx::sqlite::{SqliteArguments, SqliteConnection};

use super::BEGIN_WRITE;
use crate::error::db;

/// SQLite's generic error code, which `ROLLBACK` returns when no transaction is open.
const SQLITE_ERROR: &str = "1";

/// The writer connection and whether a script may have left a transaction open on it.
pub(super) struct Writer {
    /// The connection; use it only after [`Writer::settle`].
    pub(super) connection: SqliteConnection,
    in_doubt: bool,
}

impl Writer {
    pub(super) fn new(connection: SqliteConnection) -> Self {
        Self {
            connection,
            in_doubt: false,
        }
    }

    /// Rolls back a transaction that an unfinished script may have left open.
    pub(super) async fn settle(&mut self) -> StoreResult<()> {
        if !self.in_doubt {
            return Ok(());
        }
        match sqlx::query("ROLLBACK").execute(&mut self.connection).await {
            Ok(_) => tracing::debug!("rolled back a write left unfinished"),
            // "cannot rollback - no transaction is active": the script had finished.
            Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some(SQLITE_ERROR) => {}
            Err(error) => return Err(db(error)),
        }
        self.in_doubt = false;
        Ok(())
    }

    /// Runs `statements` in one `BEGIN IMMEDIATE … COMMIT` transaction, in one round trip.
    /// The statements take anonymous parameters (`?`) only, bound from `args` in order across
    /// all of them. Returns the first column of every row the statements return, as text.
    ///
    /// A script whose text varies from call to call is not `persistent`: caching its prepared
    /// statements would only evict the ones that repeat.
    pub(super) async fn run_script<'q, S: AsRef<str>>(
        &mut self,
        statements: &[S],
        args: SqliteArguments<'q>,
        persistent: bool,
    ) -> StoreResult<Vec<String>> {
        let mut script = String::with_capacity(
            statements
                .iter()
                .map(|s| s.as_ref().len() + 1)
                .sum::<usize>()
                + 32,
        );
        script.push_str(BEGIN_WRITE);
        script.push(';');
        for statement in statements {
            script.push_str(statement.as_ref());
            script.push(';');
        }
        script.push_str("COMMIT;");

        self.settle().await?;
        self.in_doubt = true;
        let query = sqlx::query_scalar_with::<_, String, _>(&script, args).persistent(persistent);
        match query.fetch_all(&mut self.connection).await {
            Ok(rows) => {
                self.in_doubt = false;
                Ok(rows)
            }
            Err(error) => {
                // The failed statement stopped the script inside its transaction; roll it back
                // now so the error leaves nothing behind. Should that fail too, the connection
                // stays in doubt and the next write tries again.
                if let Err(rollback) = self.settle().await {
                    tracing::warn!(error = %rollback, "cannot roll back a failed write");
                }
                Err(db(error))
            }
        }
    }
}
