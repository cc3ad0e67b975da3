//! Confidence routing, the validation queue's items, and calibration from reviewers'
//! decisions.
//!
//! **Routing.** A task whose tool is an AI tool ([`AI_TOOLS`]), or that declares `review:`,
//! has a [`ReviewPolicy`]. When an attempt succeeds, the confidence its outputs carry (the
//! field [`ReviewPolicy::confidence`], a number in [0, 1]) is compared with the task's
//! [`Thresholds`]: at or above `high` the result is applied; from `low` up to `high` it is
//! applied and a *notice* item (non-blocking) asks a reviewer to look at it; below `low`, or
//! when the outputs carry no valid confidence, the task run waits in the validation queue
//! (state `awaiting_review`) until a reviewer approves, edits or rejects it. A share of the
//! results above `high` ([`ReviewPolicy::audit_rate`], chosen by a hash of the task run id so
//! a restart decides the same) also gets a non-blocking *audit* item: without them the
//! reviewers would only ever see uncertain results and calibration could not tell how good
//! the confident ones are.
//!
//! **The `approval` tool** is an explicit human gate on the same queue ([`ApprovalRequest`]):
//! assignees, a quorum of approvers, an expiry with a configured outcome.
//!
//! **Calibration.** Every decision on a confidence item is feedback: approved as proposed
//! means the result was right, edited or rejected means it was not. [`calibrate`] fits the
//! observed probability of approval as a non-decreasing function of the raw confidence
//! (isotonic regression by pool-adjacent-violators: Barlow, Bartholomew, Bremner & Brunk,
//! *Statistical Inference under Order Restrictions*, 1972; as used for classifier
//! calibration by Zadrozny & Elkan, KDD 2002) and picks the lowest `low` whose auto-applied
//! results (confidence ≥ `low`) reach the target precision on the feedback, each point
//! weighted by the inverse of the chance it had to be reviewed (Horvitz & Thompson, 1952),
//! so that sampled audits stand for all the confident results.
//!
//! Nothing here does I/O: the engine stores the items and reads the feedback.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::{OrgId, ReviewId, RunId, TaskId, TaskRunId};
use crate::time::Timestamp;

/// Tools whose results carry a confidence and are routed by default.
pub const AI_TOOLS: &[&str] = &["llm", "agent", "classify"];

/// The name of the human-gate tool.
pub const APPROVAL_TOOL: &str = "approval";

/// Default `low` threshold: below it a result waits for a reviewer.
pub const DEFAULT_LOW: f64 = 0.7;
/// Default `high` threshold: at or above it a result is applied without notice.
pub const DEFAULT_HIGH: f64 = 0.9;
/// Default precision the calibrated `low` must hold for auto-applied results.
pub const DEFAULT_TARGET_PRECISION: f64 = 0.95;
/// Default share of results above `high` that get a non-blocking audit item.
pub const DEFAULT_AUDIT_RATE: f64 = 0.05;
/// Fewest decisions (feedback points, whatever their weight) before calibrated thresholds
/// replace the fixed ones.
pub const CALIBRATION_MIN_FEEDBACK: f64 = 30.0;
/// Least weight of the results at or above a candidate `low` before their precision is
/// judged: a single wrong answer at the very top must not rule every threshold out.
pub const CALIBRATION_SUFFIX_MIN_WEIGHT: f64 = 10.0;
/// The z-score of the one-sided lower confidence bound a calibrated `low` must hold the
/// target precision with (z = 1: about 84 % confidence), so that a small or lucky sample of
/// feedback does not open the gate.
pub const CALIBRATION_Z: f64 = 1.0;
/// Most feedback points a calibration reads (the most recent ones).
pub const CALIBRATION_FEEDBACK_MAX: usize = 10_000;
/// Most rejections of one task run's results under `on_reject: retry` before a rejection
/// fails it.
pub const REVIEW_ROUNDS_MAX: u32 = 5;
/// Longest reviewer comment kept, in bytes.
pub const COMMENT_BYTES_MAX: usize = 4096;
/// Most assignees of one approval, and the largest quorum.
pub const ASSIGNEES_MAX: usize = 50;
/// Longest rationale kept on an item, in bytes.
pub const RATIONALE_BYTES_MAX: usize = 8192;

/// What happens to a task run whose result a reviewer rejects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnReject {
    /// The task run fails (and the run with it, unless something downstream copes).
    #[default]
    Fail,
    /// The task run is skipped and its dependents are skipped too; a skipped fan-out item
    /// is dropped from its parent's outputs (`null`) without failing the parent.
    Skip,
    /// The task runs again, its tool given the reviewer's comment (at most
    /// [`REVIEW_ROUNDS_MAX`] rejections, then the rejection fails it).
    Retry,
}

/// A task's routing policy (`review:` in the pipeline). Every field has a default, so an AI
/// task without `review:` is routed with [`ReviewPolicy::default`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReviewPolicy {
    /// Below this confidence the result waits for a reviewer. In [0, 1].
    pub low: f64,
    /// At or above this confidence the result is applied without notice. In [`low`, 1].
    pub high: f64,
    /// The output field holding the confidence (keys joined by dots reach into objects).
    pub confidence: String,
    /// The output field holding the model's rationale, shown to reviewers, if any (keys
    /// joined by dots reach into objects: `answer.why`).
    pub rationale: Option<String>,
    /// What a rejection does.
    pub on_reject: OnReject,
    /// Whether thresholds follow the calibration once there is enough feedback.
    pub calibrate: bool,
    /// Precision that calibrated thresholds hold for auto-applied results. In (0.5, 1).
    pub target_precision: f64,
    /// Share of results at or above `high` that also get a non-blocking audit item. In [0, 1].
    pub audit_rate: f64,
}

impl Default for ReviewPolicy {
    fn default() -> Self {
        Self {
            low: DEFAULT_LOW,
            high: DEFAULT_HIGH,
            confidence: "confidence".into(),
            rationale: None,
            on_reject: OnReject::Fail,
            calibrate: true,
            target_precision: DEFAULT_TARGET_PRECISION,
            audit_rate: DEFAULT_AUDIT_RATE,
        }
    }
}

impl ReviewPolicy {
    /// The problems of the policy, each as (field, message); empty when it is valid.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let unit = |x: f64| x.is_finite() && (0.0..=1.0).contains(&x);
        if !unit(self.low) {
            out.push(("low", format!("must be in [0, 1], got {}", self.low)));
        }
        if !unit(self.high) {
            out.push(("high", format!("must be in [0, 1], got {}", self.high)));
        } else if unit(self.low) && self.high < self.low {
            out.push((
                "high",
                format!("must be at least `low` ({}), got {}", self.low, self.high),
            ));
        }
        if self.confidence.trim().is_empty() {
            out.push(("confidence", "must name an output field".into()));
        }
        if !(self.target_precision.is_finite()
            && self.target_precision > 0.5
            && self.target_precision < 1.0)
        {
            out.push((
                "target_precision",
                format!("must be in (0.5, 1), got {}", self.target_precision),
            ));
        }
        if !unit(self.audit_rate) {
            out.push((
                "audit_rate",
                format!("must be in [0, 1], got {}", self.audit_rate),
            ));
        }
        out
    }

    /// The fixed thresholds of the policy.
    pub fn fixed(&self) -> Thresholds {
        Thresholds {
            low: self.low,
            high: self.high,
            calibrated: false,
        }
    }
}

/// The thresholds a result is routed by.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    /// Below: the result waits for a reviewer.
    pub low: f64,
    /// At or above: applied without notice.
    pub high: f64,
    /// Whether they come from a calibration (rather than the policy's fixed values).
    pub calibrated: bool,
}

/// Where a result goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Route {
    /// Applied.
    Apply,
    /// Applied, and a reviewer is asked to look at it (a non-blocking item).
    Notify,
    /// Waits in the validation queue.
    Queue,
}

/// Routes a result of `confidence` (`None`: the outputs carry no valid confidence, which is
/// routed to the queue).
pub fn route(confidence: Option<f64>, thresholds: &Thresholds) -> Route {
    match confidence {
        Some(c) if c >= thresholds.high => Route::Apply,
        Some(c) if c >= thresholds.low => Route::Notify,
        _ => Route::Queue,
    }
}

/// The value at `path` in a result: a top-level key, or keys joined by dots
/// (`answer.why`).
pub fn field_of<'a>(outputs: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .try_fold(outputs, |value, key| value.get(key))
}

/// Reads the confidence from a result: the number at `field` ([`field_of`]), if it is in
/// [0, 1].
pub fn confidence_of(outputs: &Value, field: &str) -> Option<f64> {
    field_of(outputs, field)
        .and_then(Value::as_f64)
        .filter(|c| c.is_finite() && (0.0..=1.0).contains(c))
}

/// Whether the result of task run `id` is one of the `rate` share sampled for an audit: a
/// fixed hash of the id, so the choice does not depend on randomness or on a restart.
pub fn is_audited(id: TaskRunId, rate: f64) -> bool {
    if rate <= 0.0 {
        return false;
    }
    if rate >= 1.0 {
        return true;
    }
    // The low 32 bits of a UUIDv7 are random (`rand_b`, RFC 9562, 5.7; the bits above them
    // may hold the generator's counter): a uniform draw in [0, 1).
    let bits = id.0.as_u128() as u32;
    (f64::from(bits) / 4_294_967_296.0) < rate
}

/// What kind of item waits in the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReviewKind {
    /// An AI result below `low`: its task run waits for the decision.
    Confidence,
    /// An AI result that was applied (between `low` and `high`, or sampled above `high`):
    /// the decision is feedback only.
    Notice,
    /// The `approval` tool's human gate: its task run waits for a quorum of approvals.
    Approval,
}

impl ReviewKind {
    /// The kind's name.
    pub fn as_str(self) -> &'static str {
        match self {
            ReviewKind::Confidence => "confidence",
            ReviewKind::Notice => "notice",
            ReviewKind::Approval => "approval",
        }
    }

    /// Whether a task run waits for the item's decision.
    pub fn is_blocking(self) -> bool {
        !matches!(self, ReviewKind::Notice)
    }
}

/// An item's state. Exactly one decision moves an item out of `open`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReviewState {
    /// Waiting for a decision.
    Open,
    /// Approved (possibly with an edited result).
    Approved,
    /// Rejected.
    Rejected,
    /// Its expiry passed (approvals only); the configured outcome was applied.
    Expired,
    /// Its run was cancelled, or its task run moved on without it.
    Cancelled,
}

impl ReviewState {
    /// The state's name.
    pub fn as_str(self) -> &'static str {
        match self {
            ReviewState::Open => "open",
            ReviewState::Approved => "approved",
            ReviewState::Rejected => "rejected",
            ReviewState::Expired => "expired",
            ReviewState::Cancelled => "cancelled",
        }
    }

    /// Parses a state's name.
    pub fn parse(text: &str) -> Option<ReviewState> {
        [
            ReviewState::Open,
            ReviewState::Approved,
            ReviewState::Rejected,
            ReviewState::Expired,
            ReviewState::Cancelled,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }
}

impl From<Verdict> for ReviewState {
    fn from(verdict: Verdict) -> Self {
        match verdict {
            Verdict::Approve => ReviewState::Approved,
            Verdict::Reject => ReviewState::Rejected,
        }
    }
}

/// A reviewer's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Apply the result (the proposed one, or the reviewer's edit).
    Approve,
    /// Refuse it.
    Reject,
}

/// One reviewer's decision on an item, as recorded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Vote {
    /// The reviewer's user id (or `system` for an expiry).
    pub reviewer: String,
    /// The reviewer's email, when known (assignees may be named by email).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// The verdict.
    pub verdict: Verdict,
    /// The edited result, when the reviewer approved with changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edited: Option<Value>,
    /// The reviewer's comment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// When.
    pub at: Timestamp,
}

/// The settings of an `approval` task, from its rendered inputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApprovalRequest {
    /// What the approvers are asked.
    pub message: Option<String>,
    /// Who may vote: user ids or emails; anyone with the right to decide when empty.
    pub assignees: Vec<String>,
    /// Approvals needed. At least 1, at most the number of assignees when there are some.
    pub quorum: u32,
    /// How long the gate stays open.
    pub expires_in: Option<Duration>,
    /// What an expiry does.
    pub on_expiry: Verdict,
}

impl ApprovalRequest {
    /// Reads the `approval` tool's inputs: `message` (text), `assignees` (list of text),
    /// `quorum` (integer, default 1), `expires_in` (`"24h"` or seconds), `on_expiry`
    /// (`approve` | `reject`, default `reject`).
    ///
    /// # Errors
    /// A message naming the input at fault.
    pub fn from_inputs(inputs: &Value) -> Result<Self, String> {
        let empty = serde_json::Map::new();
        let map = inputs.as_object().unwrap_or(&empty);
        for key in map.keys() {
            if !["message", "assignees", "quorum", "expires_in", "on_expiry"]
                .contains(&key.as_str())
            {
                return Err(format!("approval: unknown input `{key}`"));
            }
        }
        let message = match map.get("message") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => return Err(format!("approval: `message` must be text, got {other}")),
        };
        let assignees = match map.get("assignees") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .filter(|s| !s.trim().is_empty())
                        .map(|s| s.trim().to_owned())
                        .ok_or_else(|| {
                            format!("approval: `assignees` must be a list of names, got {v}")
                        })
                })
                .collect::<Result<Vec<_>, _>>()?,
            Some(other) => {
                return Err(format!("approval: `assignees` must be a list, got {other}"))
            }
        };
        if assignees.len() > ASSIGNEES_MAX {
            return Err(format!(
                "approval: at most {ASSIGNEES_MAX} assignees, got {}",
                assignees.len()
            ));
        }
        let quorum = match map.get("quorum") {
            None | Some(Value::Null) => 1,
            Some(v) => v
                .as_u64()
                .filter(|q| (1..=ASSIGNEES_MAX as u64).contains(q))
                .ok_or_else(|| {
                    format!(
                        "approval: `quorum` must be an integer from 1 to {ASSIGNEES_MAX}, got {v}"
                    )
                })? as u32,
        };
        if !assignees.is_empty() && quorum as usize > assignees.len() {
            return Err(format!(
                "approval: `quorum` {quorum} is more than the {} assignees",
                assignees.len()
            ));
        }
        let expires_in = match map.get("expires_in") {
            None | Some(Value::Null) => None,
            Some(Value::String(text)) => Some(
                crate::time::parse_duration(text)
                    .map_err(|e| format!("approval: `expires_in`: {e}"))?,
            ),
            Some(Value::Number(n)) => Some(
                n.as_f64()
                    .filter(|s| *s > 0.0 && s.is_finite())
                    .and_then(|s| Duration::try_from_secs_f64(s).ok())
                    .ok_or_else(|| format!("approval: `expires_in` must be positive, got {n}"))?,
            ),
            Some(other) => {
                return Err(format!(
                    "approval: `expires_in` must be a duration such as \"24h\", got {other}"
                ))
            }
        };
        let on_expiry = match map.get("on_expiry").and_then(Value::as_str) {
            None => Verdict::Reject,
            Some("approve") => Verdict::Approve,
            Some("reject") => Verdict::Reject,
            Some(other) => {
                return Err(format!(
                    "approval: `on_expiry` must be `approve` or `reject`, got `{other}`"
                ))
            }
        };
        Ok(Self {
            message,
            assignees,
            quorum,
            expires_in,
            on_expiry,
        })
    }
}

/// One item of the validation queue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReviewItem {
    /// The item's id.
    pub id: ReviewId,
    /// The org.
    pub org_id: OrgId,
    /// The run.
    pub run_id: RunId,
    /// The task run the item is about.
    pub task_run_id: TaskRunId,
    /// Its task.
    pub task_id: TaskId,
    /// The fan-out index, for fan-out items.
    pub index: Option<u32>,
    /// The pipeline's name.
    pub pipeline_name: String,
    /// The tool that produced the result (or `approval`).
    pub tool: String,
    /// The kind.
    pub kind: ReviewKind,
    /// The state.
    pub state: ReviewState,
    /// The task run's attempt that produced the result (for approvals, the gate's).
    pub attempt: u32,
    /// The task run's rendered inputs.
    pub inputs: Value,
    /// The result proposed for approval (`null` for approvals).
    pub proposed: Value,
    /// The raw confidence of the result, when it carried one.
    pub confidence: Option<f64>,
    /// The model's rationale, when the policy names a field for it.
    pub rationale: Option<String>,
    /// The thresholds the result was routed by.
    pub thresholds: Option<Thresholds>,
    /// The chance the result had to get an item (1 for queued and notice-band results, the
    /// audit rate for sampled audits): feedback is weighted by its inverse.
    pub sample_rate: f64,
    /// Approvals: who may vote (empty: anyone allowed to decide).
    pub assignees: Vec<String>,
    /// Approvals needed (1 for confidence items).
    pub quorum: u32,
    /// Approvals: what the approvers are asked.
    pub message: Option<String>,
    /// When the item expires (approvals with `expires_in`).
    pub expires_at: Option<Timestamp>,
    /// What an expiry does.
    pub on_expiry: Option<Verdict>,
    /// The votes so far; the last one decided the item when it is no longer open.
    pub votes: Vec<Vote>,
    /// When it was created.
    pub created_at: Timestamp,
    /// When it was decided.
    pub decided_at: Option<Timestamp>,
    /// Who holds it for review (set through the store, not by the engine).
    #[serde(default)]
    pub claimed_by: Option<String>,
    /// Until when the claim holds.
    #[serde(default)]
    pub claim_expires_at: Option<Timestamp>,
}

impl ReviewItem {
    /// The item's outcome as feedback on the raw confidence: `Some(true)` approved as
    /// proposed, `Some(false)` edited or rejected, `None` not a decided confidence result.
    pub fn feedback(&self) -> Option<bool> {
        if self.kind == ReviewKind::Approval || self.confidence.is_none() {
            return None;
        }
        let last = self.votes.last()?;
        match self.state {
            ReviewState::Approved => Some(last.edited.is_none()),
            ReviewState::Rejected => Some(false),
            _ => None,
        }
    }

    /// Approvals so far.
    pub fn approvals(&self) -> usize {
        self.votes
            .iter()
            .filter(|v| v.verdict == Verdict::Approve)
            .count()
    }
}

/// One decided result, as calibration reads it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct FeedbackPoint {
    /// The raw confidence.
    pub confidence: f64,
    /// Approved as proposed.
    pub approved: bool,
    /// Inverse-probability weight (1 / the item's sample rate).
    pub weight: f64,
}

/// A fitted calibration: the observed approval probability as a non-decreasing step
/// function of the raw confidence.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Blocks of the isotonic fit, by increasing confidence: (lowest confidence of the
    /// block, highest, fitted probability).
    pub blocks: Vec<(f64, f64, f64)>,
    /// Total weight of the feedback.
    pub weight: f64,
}

impl Calibration {
    /// The calibrated probability of approval at raw confidence `c`: the value of the block
    /// holding `c`, or of the nearest block.
    pub fn probability(&self, c: f64) -> Option<f64> {
        let first = self.blocks.first()?;
        if c < first.0 {
            return Some(first.2);
        }
        self.blocks
            .iter()
            .rev()
            .find(|(lo, _, _)| *lo <= c)
            .map(|(_, _, p)| *p)
    }
}

/// Fits isotonic regression (pool adjacent violators) to weighted feedback.
pub fn isotonic_fit(points: &[FeedbackPoint]) -> Calibration {
    let mut sorted: Vec<FeedbackPoint> = points
        .iter()
        .copied()
        .filter(|p| p.confidence.is_finite() && p.weight.is_finite() && p.weight > 0.0)
        .collect();
    sorted.sort_by(|a, b| a.confidence.total_cmp(&b.confidence));
    // Blocks: (low, high, weighted sum of labels, weight).
    let mut blocks: Vec<(f64, f64, f64, f64)> = Vec::with_capacity(sorted.len());
    for p in &sorted {
        let y = if p.approved { p.weight } else { 0.0 };
        blocks.push((p.confidence, p.confidence, y, p.weight));
        while blocks.len() >= 2 {
            let n = blocks.len();
            let (a, b) = (blocks[n - 2], blocks[n - 1]);
            // Pool equal confidences too: a step function cannot split one x.
            if a.2 / a.3 >= b.2 / b.3 || a.1 == b.0 {
                blocks[n - 2] = (a.0, b.1, a.2 + b.2, a.3 + b.3);
                blocks.pop();
            } else {
                break;
            }
        }
    }
    let weight = blocks.iter().map(|b| b.3).sum();
    Calibration {
        blocks: blocks
            .into_iter()
            .map(|(lo, hi, y, w)| (lo, hi, y / w))
            .collect(),
        weight,
    }
}

/// The outcome of [`calibrate`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CalibrationReport {
    /// The thresholds to route by: calibrated when there was enough feedback and a `low`
    /// holding the target exists, else the policy's fixed ones.
    pub thresholds: Thresholds,
    /// The fit, when there was any feedback.
    pub calibration: Option<Calibration>,
    /// Weighted feedback points read.
    pub feedback: f64,
    /// Estimated precision of the results at or above the chosen `low` (weighted share
    /// approved as proposed), when feedback reaches there.
    pub precision: Option<f64>,
    /// Estimated share of results below the chosen `low` (the queue's volume).
    pub queue_share: Option<f64>,
    /// Estimated share of results below the fixed `low`.
    pub fixed_queue_share: Option<f64>,
    /// Estimated precision of the results at or above the fixed `low`.
    pub fixed_precision: Option<f64>,
}

/// The lower end of the Wilson score interval of a proportion `p` observed on `n` trials
/// (Wilson, *JASA* 22, 1927), at z-score `z`.
pub fn wilson_lower_bound(p: f64, n: f64, z: f64) -> f64 {
    if n <= 0.0 {
        return 0.0;
    }
    let z2 = z * z;
    let centre = p + z2 / (2.0 * n);
    let spread = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    (centre - spread) / (1.0 + z2 / n)
}

/// The upper end of the Wilson score interval (see [`wilson_lower_bound`]).
pub fn wilson_upper_bound(p: f64, n: f64, z: f64) -> f64 {
    if n <= 0.0 {
        return 1.0;
    }
    let z2 = z * z;
    let centre = p + z2 / (2.0 * n);
    let spread = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    (centre + spread) / (1.0 + z2 / n)
}

/// Chooses the thresholds of a task from its feedback; see the module documentation.
///
/// The calibrated `low` is the lowest raw confidence `t` among the feedback such that the
/// weighted share approved among the points at or above `t` reaches the target precision
/// with confidence (its Wilson lower bound at [`CALIBRATION_Z`] does), walking down from
/// the top and stopping where the share is confidently below the target (its Wilson upper
/// bound is), so that a stretch of lucky points below a bad one does not open the gate;
/// suffixes weighing less than [`CALIBRATION_SUFFIX_MIN_WEIGHT`] are not judged. The
/// calibrated `high` is `max(policy.high, low)`. With fewer than
/// [`CALIBRATION_MIN_FEEDBACK`] decisions, or with calibration off, the fixed thresholds
/// stand; with enough decisions and no `t` holding the target, `low` is 1 (every result
/// waits but those of full confidence).
///
/// The estimates assume every item is decided (notices and audits included): items left
/// undecided are missing at random at best, and a reviewer who decides only the easy ones
/// biases them.
pub fn calibrate(policy: &ReviewPolicy, points: &[FeedbackPoint]) -> CalibrationReport {
    let fixed = policy.fixed();
    let mut sorted: Vec<FeedbackPoint> = points
        .iter()
        .copied()
        .filter(|p| p.confidence.is_finite() && p.weight.is_finite() && p.weight > 0.0)
        .collect();
    sorted.sort_by(|a, b| a.confidence.total_cmp(&b.confidence));
    let total: f64 = sorted.iter().map(|p| p.weight).sum();
    let share_below = |t: f64| -> Option<f64> {
        (total > 0.0).then(|| {
            sorted
                .iter()
                .filter(|p| p.confidence < t)
                .map(|p| p.weight)
                .sum::<f64>()
                / total
        })
    };
    let precision_from = |t: f64| -> Option<f64> {
        let (yes, all) = sorted
            .iter()
            .filter(|p| p.confidence >= t)
            .fold((0.0, 0.0), |(y, a), p| {
                (y + if p.approved { p.weight } else { 0.0 }, a + p.weight)
            });
        (all > 0.0).then(|| yes / all)
    };
    let mut report = CalibrationReport {
        thresholds: fixed,
        calibration: (!sorted.is_empty()).then(|| isotonic_fit(&sorted)),
        feedback: total,
        precision: precision_from(fixed.low),
        queue_share: share_below(fixed.low),
        fixed_queue_share: share_below(fixed.low),
        fixed_precision: precision_from(fixed.low),
    };
    if !policy.calibrate || (sorted.len() as f64) < CALIBRATION_MIN_FEEDBACK {
        return report;
    }
    // Walk from the top: suffix precision at each distinct confidence.
    let mut chosen: Option<f64> = None;
    let (mut yes, mut all, mut squares) = (0.0, 0.0, 0.0);
    let mut i = sorted.len();
    while i > 0 {
        let c = sorted[i - 1].confidence;
        while i > 0 && sorted[i - 1].confidence == c {
            let p = sorted[i - 1];
            all += p.weight;
            squares += p.weight * p.weight;
            if p.approved {
                yes += p.weight;
            }
            i -= 1;
        }
        if all < CALIBRATION_SUFFIX_MIN_WEIGHT {
            continue;
        }
        // Weighted points count as their effective sample size (Kish, 1965).
        let n = all * all / squares;
        let precision = yes / all;
        if wilson_upper_bound(precision, n, CALIBRATION_Z) < policy.target_precision {
            // Confidently below the target from here down: no lower threshold holds it.
            break;
        }
        if wilson_lower_bound(precision, n, CALIBRATION_Z) >= policy.target_precision {
            chosen = Some(c);
        }
    }
    // With enough feedback and no threshold holding the target, every result waits but
    // those of full confidence: falling back to the fixed thresholds would apply more
    // results exactly when the feedback says they are not good enough.
    let low = chosen.unwrap_or(1.0);
    report.thresholds = Thresholds {
        low,
        high: policy.high.max(low),
        calibrated: true,
    };
    report.precision = precision_from(low);
    report.queue_share = share_below(low);
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(confidence: f64, approved: bool) -> FeedbackPoint {
        FeedbackPoint {
            confidence,
            approved,
            weight: 1.0,
        }
    }

    #[test]
    fn routing_follows_the_thresholds() {
        let t = ReviewPolicy::default().fixed();
        assert_eq!(route(Some(0.95), &t), Route::Apply);
        assert_eq!(route(Some(0.9), &t), Route::Apply);
        assert_eq!(route(Some(0.8), &t), Route::Notify);
        assert_eq!(route(Some(0.7), &t), Route::Notify);
        assert_eq!(route(Some(0.69), &t), Route::Queue);
        assert_eq!(route(None, &t), Route::Queue);
        assert_eq!(
            confidence_of(&serde_json::json!({"confidence": 1.5}), "confidence"),
            None
        );
        assert_eq!(
            confidence_of(&serde_json::json!({"c": 0.5}), "c"),
            Some(0.5)
        );
    }

    #[test]
    fn policy_problems_name_the_field() {
        let policy = ReviewPolicy {
            low: 0.9,
            high: 0.5,
            target_precision: 1.0,
            audit_rate: -1.0,
            ..ReviewPolicy::default()
        };
        let fields: Vec<&str> = policy.problems().iter().map(|(f, _)| *f).collect();
        assert_eq!(fields, ["high", "target_precision", "audit_rate"]);
        assert!(ReviewPolicy::default().problems().is_empty());
    }

    #[test]
    fn isotonic_fit_pools_violators() {
        let fit = isotonic_fit(&[
            point(0.1, false),
            point(0.2, true),
            point(0.3, false),
            point(0.4, true),
            point(0.5, true),
        ]);
        // (0.2 true, 0.3 false) violate the order and pool to 0.5.
        let values: Vec<f64> = fit.blocks.iter().map(|b| b.2).collect();
        assert_eq!(values, [0.0, 0.5, 1.0]);
        assert_eq!(fit.probability(0.25), Some(0.5));
        assert_eq!(fit.probability(0.05), Some(0.0));
        assert_eq!(fit.probability(0.9), Some(1.0));
        for pair in fit.blocks.windows(2) {
            assert!(pair[0].2 <= pair[1].2);
        }
    }

    #[test]
    fn calibration_lowers_low_when_results_are_better_than_their_confidence() {
        // An under-confident model: right 98 % of the time from 0.4 up, wrong below.
        let mut points = Vec::new();
        for i in 0..200 {
            let c = 0.4 + 0.6 * (i as f64 / 200.0);
            points.push(point(c, i % 50 != 0));
        }
        for i in 0..40 {
            points.push(point(0.1 + 0.25 * (i as f64 / 40.0), i % 3 == 0));
        }
        let report = calibrate(&ReviewPolicy::default(), &points);
        assert!(report.thresholds.calibrated);
        assert!(report.thresholds.low < 0.45, "{report:?}");
        assert!(report.precision.unwrap() >= 0.95);
        assert!(report.queue_share.unwrap() < report.fixed_queue_share.unwrap());
        assert_eq!(report.thresholds.high, 0.9);
    }

    #[test]
    fn calibration_raises_low_when_results_are_worse_than_their_confidence() {
        // An over-confident model: right only half the time below 0.85.
        let mut points = Vec::new();
        for i in 0..100 {
            let c = 0.5 + 0.35 * (i as f64 / 100.0);
            points.push(point(c, i % 2 == 0));
        }
        for i in 0..100 {
            points.push(point(0.86 + 0.14 * (i as f64 / 100.0), true));
        }
        let report = calibrate(&ReviewPolicy::default(), &points);
        assert!(report.thresholds.calibrated);
        // The fixed low (0.7) would apply results that are right 85 % of the time; the
        // calibrated one rises until the applied results reach 95 %.
        assert!(report.fixed_precision.unwrap() < 0.9, "{report:?}");
        assert!(report.thresholds.low > 0.8, "{report:?}");
        assert!(report.thresholds.high >= report.thresholds.low);
        assert!(report.precision.unwrap() >= 0.95);
        assert!(report.queue_share.unwrap() > report.fixed_queue_share.unwrap());
    }

    #[test]
    fn one_wrong_answer_at_the_top_does_not_rule_calibration_out_but_bad_results_queue_everything()
    {
        // 300 results right 99 % of the time from 0.3 up, the very top one wrong.
        let mut points: Vec<FeedbackPoint> = (0..300)
            .map(|i| point(0.3 + 0.6 * (i as f64 / 300.0), i % 100 != 50))
            .collect();
        points.push(point(0.95, false));
        let report = calibrate(&ReviewPolicy::default(), &points);
        assert!(report.thresholds.low < 0.5, "{report:?}");
        // A model right half of the time everywhere: nothing but certainty is applied.
        let bad: Vec<FeedbackPoint> = (0..200)
            .map(|i| point(0.5 + 0.49 * (i as f64 / 200.0), i % 2 == 0))
            .collect();
        let report = calibrate(&ReviewPolicy::default(), &bad);
        assert_eq!(
            (report.thresholds.low, report.thresholds.calibrated),
            (1.0, true)
        );
        assert_eq!(report.queue_share, Some(1.0));
    }

    #[test]
    fn too_little_feedback_keeps_the_fixed_thresholds() {
        let points: Vec<_> = (0..10).map(|i| point(i as f64 / 10.0, true)).collect();
        let report = calibrate(&ReviewPolicy::default(), &points);
        assert!(!report.thresholds.calibrated);
        assert_eq!(report.thresholds, ReviewPolicy::default().fixed());
        let off = ReviewPolicy {
            calibrate: false,
            ..ReviewPolicy::default()
        };
        let many: Vec<_> = (0..100).map(|i| point(i as f64 / 100.0, true)).collect();
        assert!(!calibrate(&off, &many).thresholds.calibrated);
    }

    #[test]
    fn audit_sampling_is_deterministic_and_near_its_rate() {
        let ids: Vec<TaskRunId> = (0..20_000).map(|_| TaskRunId::new()).collect();
        let picked = ids.iter().filter(|id| is_audited(**id, 0.05)).count();
        assert!((800..1200).contains(&picked), "{picked}");
        for id in ids.iter().take(100) {
            assert_eq!(is_audited(*id, 0.05), is_audited(*id, 0.05));
        }
        assert!(!is_audited(ids[0], 0.0));
        assert!(is_audited(ids[0], 1.0));
    }

    #[test]
    fn approval_inputs_are_checked() {
        let ok = ApprovalRequest::from_inputs(&serde_json::json!({
            "message": "ship it?", "assignees": ["a@x.io", "b@x.io"], "quorum": 2,
            "expires_in": "2h", "on_expiry": "approve"
        }))
        .unwrap();
        assert_eq!(ok.quorum, 2);
        assert_eq!(ok.expires_in, Some(Duration::from_secs(7200)));
        assert_eq!(ok.on_expiry, Verdict::Approve);
        let err =
            ApprovalRequest::from_inputs(&serde_json::json!({"assignees": ["a"], "quorum": 2}))
                .unwrap_err();
        assert!(err.contains("quorum"), "{err}");
        let err = ApprovalRequest::from_inputs(&serde_json::json!({"quorom": 2})).unwrap_err();
        assert!(err.contains("quorom"), "{err}");
    }
}
