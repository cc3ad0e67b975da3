//! Text columns decoded the same way by every backend: a stored value that does not parse
//! is [`StoreError::Corrupt`], naming the column and the value.

use std::fmt::Display;
use std::str::FromStr;

use arches_core::ids::{SecretName, TaskId};
use arches_core::ports::{StoreError, StoreResult};
use arches_core::records::LogStream;

/// A task id stored in column `name`.
pub(crate) fn task_id_text(text: &str, name: &str) -> StoreResult<TaskId> {
    TaskId::parse(text).map_err(|e| StoreError::Corrupt(format!("{name} holds {text:?}: {e}")))
}

/// A secret name stored in column `name` (`secrets.name`).
pub(crate) fn secret_name_text(text: &str, name: &str) -> StoreResult<SecretName> {
    SecretName::parse(text).map_err(|e| StoreError::Corrupt(format!("{name} holds {text:?}: {e}")))
}

/// A log line's stream (`stdout`, `stderr` or `system`) stored in `logs.stream`.
pub(crate) fn stream_text(text: &str) -> StoreResult<LogStream> {
    LogStream::parse(text).ok_or_else(|| StoreError::Corrupt(format!("logs.stream holds {text:?}")))
}

/// Parses stored text into a typed value, or reports the column as corrupt.
pub(crate) fn parse_text<T: FromStr>(text: &str, column: &str) -> StoreResult<T>
where
    T::Err: Display,
{
    text.parse()
        .map_err(|e| StoreError::Corrupt(format!("{column} holds {text:?}: {e}")))
}

/// `(state, count)` rows of `table` as typed states and counts (a negative count reads 0).
pub(crate) fn state_counts<T: FromStr>(
    rows: Vec<(String, i64)>,
    table: &str,
) -> StoreResult<Vec<(T, u64)>>
where
    T::Err: Display,
{
    let column = format!("{table}.state");
    rows.into_iter()
        .map(|(state, n)| {
            Ok((
                parse_text(&state, &column)?,
                u64::try_from(n).unwrap_or_default(),
            ))
        })
        .collect()
}
