//! Failure points: switches a test arms to make the scheduler fail at a chosen place, to
//! check that what was committed stays consistent and a restart resumes from it.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// Shared failure switches. Each counts down: armed with `n`, the `n`-th pass through the
/// point fails (1 = the next one). Zero means disarmed.
#[derive(Clone, Debug, Default)]
pub struct FailPoints {
    before_commit: Arc<AtomicU32>,
    after_commit: Arc<AtomicU32>,
}

impl FailPoints {
    /// Makes the `n`-th next commit fail before anything is written, as if the process
    /// died while deciding.
    pub fn fail_before_commit(&self, n: u32) {
        self.before_commit.store(n, Ordering::SeqCst);
    }

    /// Makes the scheduler stop right after the `n`-th next commit, before it dispatches
    /// leases or publishes events, as if the process died just after the write.
    pub fn fail_after_commit(&self, n: u32) {
        self.after_commit.store(n, Ordering::SeqCst);
    }

    pub(crate) fn hit_before_commit(&self) -> bool {
        hit(&self.before_commit)
    }

    pub(crate) fn hit_after_commit(&self) -> bool {
        hit(&self.after_commit)
    }
}

fn hit(counter: &AtomicU32) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            if n == 0 {
                None
            } else {
                Some(n - 1)
            }
        })
        .map(|previous| previous == 1)
        .unwrap_or(false)
}
