//! Text columns decoded the same way by every backend: a stored value that does not parse
//! is [`StoreError::Corrupt`], naming the column and the value.

use arches_core::ids::TaskId;
use arches_core::ports::{StoreError, StoreResult};
use arches_core::records::LogStream;

/// A task id stored in column `name`.
pub(crate) fn task_id_text(text: &str, name: &str) -> StoreResult<TaskId> {
    TaskId::parse(text).map_err(|e| StoreError::Corrupt(format!("{name} holds {text:?}: {e}")))
}

/// A log line's stream (`stdout`, `stderr` or `system`) stored in `logs.stream`.
pub(crate) fn stream_text(text: &str) -> StoreResult<LogStream> {
    match text {
        "stdout" => Ok(LogStream::Stdout),
        "stderr" => Ok(LogStream::Stderr),
        "system" => Ok(LogStream::System),
        other => Err(StoreError::Corrupt(format!("logs.stream holds {other:?}"))),
    }
}
