//! Domain events: what the engine announces after a commit, for live displays and (later)
//! the event bus.

use serde::{Deserialize, Serialize};

use crate::ids::{OrgId, ReviewId, RunId, TaskId, TaskRunId};
use crate::review::{ReviewKind, ReviewState};
use crate::state::{RunState, TaskRunState};
use crate::time::Timestamp;

/// An event of the runs domain. Events are emitted only after the change they describe is
/// committed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DomainEvent {
    /// A run changed state.
    RunStateChanged {
        /// The run's org.
        org_id: OrgId,
        /// The run.
        run_id: RunId,
        /// Its new state.
        state: RunState,
        /// When.
        at: Timestamp,
    },
    /// A task run changed state.
    TaskRunStateChanged {
        /// The run's org.
        org_id: OrgId,
        /// The run.
        run_id: RunId,
        /// The task run.
        task_run_id: TaskRunId,
        /// The task.
        task_id: TaskId,
        /// The fan-out index, for fan-out items.
        index: Option<u32>,
        /// Its new state.
        state: TaskRunState,
        /// Its attempt number.
        attempt: u32,
        /// When.
        at: Timestamp,
    },
    /// A result (or an approval gate) entered the validation queue.
    ReviewRequested {
        /// The run's org.
        org_id: OrgId,
        /// The run.
        run_id: RunId,
        /// The task run.
        task_run_id: TaskRunId,
        /// The task.
        task_id: TaskId,
        /// The item.
        review_id: ReviewId,
        /// `confidence` (the task run waits), `notice` (applied; feedback welcome) or
        /// `approval` (a human gate).
        kind: ReviewKind,
        /// The result's raw confidence, when it carried one.
        confidence: Option<f64>,
        /// When.
        at: Timestamp,
    },
    /// An item of the validation queue was decided (or cancelled with its run).
    ReviewDecided {
        /// The run's org.
        org_id: OrgId,
        /// The run.
        run_id: RunId,
        /// The task run.
        task_run_id: TaskRunId,
        /// The task.
        task_id: TaskId,
        /// The item.
        review_id: ReviewId,
        /// Its new state.
        state: ReviewState,
        /// When.
        at: Timestamp,
    },
}
