//! The `noop` and `echo` tools: no work at all, for engine benchmarks and tests of retries.

use arches_core::ports::{Tool, ToolContext, ToolError};
use arches_core::records::LogStream;
use async_trait::async_trait;
use serde_json::{json, Map, Value};

/// Longest log line `echo` writes; the engine bounds lines too, this keeps the tool cheap.
const ECHO_LOG_BYTES_MAX: usize = 64 * 1024;

/// The `noop` tool: accepts any object and returns `{}` at once, without logging. Engine
/// benchmarks measure the engine with it, so it does as little as possible.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoopTool;

impl NoopTool {
    /// The tool.
    pub fn new() -> Self {
        Self
    }
}

#[async_trait]
impl Tool for NoopTool {
    fn name(&self) -> &str {
        "noop"
    }

    fn description(&self) -> &str {
        "do nothing and return an empty object"
    }

    fn needs_work_dir(&self) -> bool {
        false
    }

    fn input_schema(&self) -> Value {
        json!({"type": "object"})
    }

    async fn execute(&self, _context: ToolContext, _inputs: Value) -> Result<Value, ToolError> {
        // An empty map does not allocate.
        Ok(Value::Object(Map::new()))
    }
}

/// The `echo` tool: returns its inputs object as its outputs and logs it as one JSON line.
///
/// Inputs: any object. Two keys change the behaviour:
/// - `fail` (string): the attempt fails with this message (retryable);
/// - `fail_times` (integer ≥ 0): only attempts up to this number fail (with `fail` as the
///   message, or `echo failed on attempt N`); later attempts succeed. Without `fail_times`,
///   `fail` fails every attempt.
///
/// Outputs: the inputs object, unchanged.
#[derive(Clone, Copy, Debug, Default)]
pub struct EchoTool;

impl EchoTool {
    /// The tool.
    pub fn new() -> Self {
        Self
    }
}

#[async_trait]
impl Tool for EchoTool {
    fn name(&self) -> &str {
        "echo"
    }

    fn description(&self) -> &str {
        "return the inputs as outputs; fail on demand to exercise retries"
    }

    fn needs_work_dir(&self) -> bool {
        false
    }

    fn input_schema(&self) -> Value {
        json!({
            "type": "object",
            "properties": {
                "fail": {"type": "string", "description": "fail with this message (retryable)"},
                "fail_times": {"type": "integer", "minimum": 0, "description": "fail only attempts up to this number"}
            }
        })
    }

    async fn execute(&self, context: ToolContext, inputs: Value) -> Result<Value, ToolError> {
        let Value::Object(map) = inputs else {
            return Err(ToolError::permanent(
                "invalid echo inputs: expected an object",
            ));
        };
        let fail = match map.get("fail") {
            None | Some(Value::Null) => None,
            Some(Value::String(message)) => Some(message.as_str()),
            Some(_) => {
                return Err(ToolError::permanent(
                    "invalid echo inputs: fail must be a string",
                ))
            }
        };
        let fail_times = match map.get("fail_times") {
            None | Some(Value::Null) => None,
            Some(value) => Some(value.as_u64().ok_or_else(|| {
                ToolError::permanent(
                    "invalid echo inputs: fail_times must be a non-negative integer",
                )
            })?),
        };
        let fails = match (fail, fail_times) {
            (_, Some(times)) => u64::from(context.attempt) <= times,
            (Some(_), None) => true,
            (None, None) => false,
        };
        if fails {
            let message = match fail {
                Some(message) => message.to_owned(),
                None => format!("echo failed on attempt {}", context.attempt),
            };
            return Err(ToolError::transient(message));
        }
        let outputs = Value::Object(map);
        let mut line = outputs.to_string();
        if line.len() > ECHO_LOG_BYTES_MAX {
            let mut cut = ECHO_LOG_BYTES_MAX;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
        }
        context.logs.write(LogStream::Stdout, &line).await;
        Ok(outputs)
    }
}

/// The `approval` tool: a human gate. It checks its inputs and describes the gate; the
/// engine then parks the task run in the validation queue (state `awaiting_review`) until
/// `quorum` assignees approve, one rejects (the task run fails), or it expires (see
/// [`arches_core::review`]). Its outputs once approved: `approved` (true), `approvers`,
/// `comments`, `expired`.
///
/// Inputs: `message` (text shown to the approvers), `assignees` (user ids or emails; anyone
/// allowed to decide when absent), `quorum` (approvals needed, default 1), `expires_in`
/// (`"24h"` or seconds), `on_expiry` (`approve` | `reject`, default `reject`).
#[derive(Clone, Copy, Debug, Default)]
pub struct ApprovalTool;

impl ApprovalTool {
    /// The tool.
    pub fn new() -> Self {
        Self
    }
}

#[async_trait]
impl Tool for ApprovalTool {
    fn name(&self) -> &str {
        arches_core::review::APPROVAL_TOOL
    }

    fn description(&self) -> &str {
        "wait for human approval in the validation queue (assignees, quorum, expiry)"
    }

    fn needs_work_dir(&self) -> bool {
        false
    }

    fn input_schema(&self) -> Value {
        json!({
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "message": {"type": "string", "description": "what the approvers are asked"},
                "assignees": {"type": "array", "items": {"type": "string"}, "maxItems": arches_core::review::ASSIGNEES_MAX,
                              "description": "user ids or emails allowed to vote; anyone allowed to decide when absent"},
                "quorum": {"type": "integer", "minimum": 1, "maximum": arches_core::review::ASSIGNEES_MAX,
                           "description": "approvals needed (default 1)"},
                "expires_in": {"type": ["string", "number"], "description": "how long the gate stays open, e.g. \"24h\""},
                "on_expiry": {"enum": ["approve", "reject"], "description": "what an expiry does (default reject)"}
            }
        })
    }

    async fn execute(&self, _context: ToolContext, inputs: Value) -> Result<Value, ToolError> {
        let request = arches_core::review::ApprovalRequest::from_inputs(&inputs)
            .map_err(ToolError::permanent)?;
        serde_json::to_value(request).map_err(|e| ToolError::permanent(format!("approval: {e}")))
    }
}
