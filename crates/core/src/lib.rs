//! # arches-core
//!
//! The domain core of Arches: ids, the pipeline model and its validation, the DAG, templates,
//! the state machines of runs and task runs, the retry policy, domain events, and the ports
//! (traits) through which the engine reaches storage, artifacts and tools, and tools reach
//! LLM providers ([`llm::LlmProvider`]).
//!
//! Architecture invariant: this crate does no I/O and depends on no runtime, database, or
//! HTTP crate. Time comes in through [`time::Clock`], randomness as arguments.

pub mod embedding;
pub mod events;
pub mod execution;
pub mod identity;
pub mod ids;
pub mod llm;
pub mod log_search;
pub mod pipeline;
pub mod ports;
pub mod records;
pub mod retry;
pub mod review;
pub mod search;
pub mod state;
pub mod time;
pub mod tooldef;

pub use ids::{
    ApiKeyId, ArtifactId, InvitationId, OrgId, PipelineName, ReviewId, RunId, SecretName,
    SessionId, TaskId, TaskRunId, ToolName, UserId,
};
pub use state::{AttemptState, RunState, TaskRunState};
pub use time::{Clock, ManualClock, SystemClock, Timestamp};
