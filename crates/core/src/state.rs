//! The state machines of runs, task runs and attempts.
//!
//! Every transition the engine makes is checked here; an illegal one is a bug and is refused
//! with [`IllegalTransition`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Error for a state change that the state machine does not allow.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("illegal {machine} transition from {from} to {to}")]
pub struct IllegalTransition {
    /// `run` or `task run`.
    pub machine: &'static str,
    /// The current state.
    pub from: &'static str,
    /// The requested state.
    pub to: &'static str,
}

/// Error for a state name that is not known.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown state {0:?}")]
pub struct UnknownState(pub String);

macro_rules! state_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            /// The state's stable name, as stored and shown.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            /// Every state, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownState;
            fn from_str(s: &str) -> Result<Self, UnknownState> {
                match s { $($text => Ok($name::$variant),)+ other => Err(UnknownState(other.to_owned())) }
            }
        }
    };
}

state_enum!(
    /// The state of a run.
    RunState {
        /// Created, not started.
        Queued => "queued",
        /// Started; some task runs are not finished.
        Running => "running",
        /// Every task run succeeded or was skipped.
        Succeeded => "succeeded",
        /// A task run failed for good.
        Failed => "failed",
        /// Cancelled by a user.
        Cancelled => "cancelled",
    }
);

impl RunState {
    /// Whether the run is over.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunState::Succeeded | RunState::Failed | RunState::Cancelled
        )
    }

    /// Checks a transition.
    ///
    /// # Errors
    /// [`IllegalTransition`] unless the run moves forward: queued → running → a terminal
    /// state, or queued → cancelled/failed. A failed or cancelled run may be resumed
    /// (→ running) by a retry from the failed tasks.
    pub fn check(self, to: RunState) -> Result<(), IllegalTransition> {
        use RunState::*;
        let ok = matches!(
            (self, to),
            (Queued, Running)
                | (Queued, Cancelled)
                | (Queued, Failed)
                | (Running, Succeeded)
                | (Running, Failed)
                | (Running, Cancelled)
                | (Failed, Running)
                | (Cancelled, Running)
        );
        if ok {
            Ok(())
        } else {
            Err(IllegalTransition {
                machine: "run",
                from: self.as_str(),
                to: to.as_str(),
            })
        }
    }
}

state_enum!(
    /// The state of a task run.
    TaskRunState {
        /// Waiting for its dependencies.
        Pending => "pending",
        /// Ready, waiting for a worker.
        Queued => "queued",
        /// Leased by a worker and executing (for a fan-out parent: its items are running).
        Running => "running",
        /// An attempt failed and the next one waits for its backoff delay.
        WaitingToRetry => "waiting_to_retry",
        /// Its result (or its `approval` gate) waits in the validation queue for a
        /// reviewer's decision; it holds no lease and no worker slot.
        AwaitingReview => "awaiting_review",
        /// Finished with outputs.
        Succeeded => "succeeded",
        /// Finished without outputs, for good.
        Failed => "failed",
        /// Not run: its condition was false, or an upstream task failed or was cancelled.
        Skipped => "skipped",
        /// Stopped by a cancel.
        Cancelled => "cancelled",
    }
);

impl TaskRunState {
    /// Whether the task run is over.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskRunState::Succeeded
                | TaskRunState::Failed
                | TaskRunState::Skipped
                | TaskRunState::Cancelled
        )
    }

    /// Checks a transition.
    ///
    /// # Errors
    /// [`IllegalTransition`] for anything outside
    /// pending → queued | running (fan-out parent) | skipped | cancelled | failed,
    /// queued → running | cancelled | skipped | failed,
    /// running → succeeded | failed | waiting_to_retry | queued (lease lost) | cancelled,
    /// waiting_to_retry → queued | cancelled,
    /// running → awaiting_review,
    /// awaiting_review → succeeded | failed | skipped | queued (rejected, to retry) | cancelled,
    /// and failed | cancelled | skipped → pending (a retry of the run from its failed tasks).
    pub fn check(self, to: TaskRunState) -> Result<(), IllegalTransition> {
        use TaskRunState::*;
        let ok = matches!(
            (self, to),
            (Pending, Queued)
                | (Pending, Running)
                | (Pending, Skipped)
                | (Pending, Cancelled)
                | (Pending, Failed)
                | (Queued, Running)
                | (Queued, Cancelled)
                | (Queued, Skipped)
                | (Queued, Failed)
                | (Running, Succeeded)
                | (Running, Failed)
                | (Running, WaitingToRetry)
                | (Running, Queued)
                | (Running, Cancelled)
                | (WaitingToRetry, Queued)
                | (WaitingToRetry, Cancelled)
                | (Running, AwaitingReview)
                | (AwaitingReview, Succeeded)
                | (AwaitingReview, Failed)
                | (AwaitingReview, Skipped)
                | (AwaitingReview, Queued)
                | (AwaitingReview, Cancelled)
                | (Failed, Pending)
                | (Cancelled, Pending)
                | (Skipped, Pending)
        );
        if ok {
            Ok(())
        } else {
            Err(IllegalTransition {
                machine: "task run",
                from: self.as_str(),
                to: to.as_str(),
            })
        }
    }
}

state_enum!(
    /// How one attempt of a task run ended.
    AttemptState {
        /// Still executing.
        Running => "running",
        /// The tool returned outputs.
        Succeeded => "succeeded",
        /// The tool returned an error.
        Failed => "failed",
        /// The attempt ran past the task's timeout and was stopped.
        TimedOut => "timed_out",
        /// The worker stopped heartbeating and its lease expired; the task went back to the
        /// queue.
        LeaseExpired => "lease_expired",
        /// Stopped by a cancel.
        Cancelled => "cancelled",
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_succeeded_task_run_cannot_run_again() {
        assert!(TaskRunState::Succeeded
            .check(TaskRunState::Running)
            .is_err());
        assert!(TaskRunState::Succeeded
            .check(TaskRunState::Pending)
            .is_err());
        assert!(TaskRunState::Queued.check(TaskRunState::Running).is_ok());
    }

    #[test]
    fn states_round_trip_through_their_names() {
        for state in TaskRunState::ALL {
            assert_eq!(state.as_str().parse::<TaskRunState>().unwrap(), *state);
        }
        for state in RunState::ALL {
            assert_eq!(state.as_str().parse::<RunState>().unwrap(), *state);
        }
        assert!("bogus".parse::<RunState>().is_err());
    }
}
