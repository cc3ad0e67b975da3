//! # arches-tools
//!
//! The built-in tools of Arches: `sql` (Apache DataFusion over CSV, Parquet and JSON
//! artifacts), `shell` (a process in its own group with a scrubbed environment), `file`
//! (local files in and out of the artifact store), `noop` and `echo`.
//!
//! Every tool implements [`arches_core::ports::Tool`] and reaches the outside world only
//! through its [`arches_core::ports::ToolContext`]: the attempt's working directory, the
//! artifact port and the log sink. A tool that stores an artifact returns its record under
//! `"artifact"` (or a list under `"artifacts"`) in its outputs; downstream tools find their
//! inputs there.
//!
//! Architecture invariant: a tool never outlives its attempt. The engine stops an attempt by
//! dropping the future of [`arches_core::ports::Tool::execute`]; every tool releases what it
//! started when dropped (the shell tool kills its process group, DataFusion aborts its
//! tasks). Tools never touch the store's tables: the artifact port is their only storage.

mod basic;
mod common;
pub mod file;
pub mod media_type;
pub mod shell;
pub mod sql;

use std::sync::Arc;

use arches_core::ports::ToolRegistry;

pub use basic::{EchoTool, NoopTool};
pub use file::FileTool;
pub use shell::ShellTool;
pub use sql::SqlTool;

/// A registry holding every built-in tool: `echo`, `file`, `noop`, `shell` and `sql`.
pub fn builtin_registry() -> ToolRegistry {
    let mut registry = ToolRegistry::new();
    registry.register(Arc::new(EchoTool::new()));
    registry.register(Arc::new(FileTool::new()));
    registry.register(Arc::new(NoopTool::new()));
    registry.register(Arc::new(ShellTool::new()));
    registry.register(Arc::new(SqlTool::new()));
    registry
}
