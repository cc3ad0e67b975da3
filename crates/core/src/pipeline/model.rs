//! The pipeline definition model: what a user writes in YAML or JSON.
//!
//! The model is plain data; [`crate::pipeline::parse`] reads it from text with source
//! positions and [`crate::pipeline::validate`] checks it.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::ids::{PipelineName, TaskId};
use crate::retry::RetryPolicy;
use crate::review::ReviewPolicy;

/// A pipeline: a named DAG of tasks with typed params.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineDef {
    /// The pipeline's name.
    pub name: PipelineName,
    /// Free text shown in listings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Typed params, by name; a run gives values or takes the defaults.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, ParamDef>,
    /// Most task runs of one run that may run at once; the engine's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    /// The tasks, in the order written.
    pub tasks: Vec<TaskDef>,
}

/// The declared type of a param.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamType {
    /// A UTF-8 string.
    String,
    /// A whole number (i64).
    Integer,
    /// Any JSON number.
    Number,
    /// `true` or `false`.
    Boolean,
    /// A JSON array.
    Array,
    /// A JSON object.
    Object,
}

impl ParamType {
    /// Whether `value` is of this type.
    pub fn accepts(self, value: &Value) -> bool {
        match self {
            ParamType::String => value.is_string(),
            ParamType::Integer => value.is_i64() || value.is_u64(),
            ParamType::Number => value.is_number(),
            ParamType::Boolean => value.is_boolean(),
            ParamType::Array => value.is_array(),
            ParamType::Object => value.is_object(),
        }
    }

    /// Converts a command-line text (`--param k=v`) into a value of this type.
    ///
    /// # Errors
    /// A message naming the expected type when the text does not convert.
    pub fn coerce(self, text: &str) -> Result<Value, String> {
        let parsed = match self {
            ParamType::String => return Ok(Value::String(text.to_owned())),
            ParamType::Integer => text.trim().parse::<i64>().ok().map(Value::from),
            ParamType::Number => text
                .trim()
                .parse::<f64>()
                .ok()
                .and_then(|n| serde_json::Number::from_f64(n).map(Value::Number)),
            ParamType::Boolean => match text.trim() {
                "true" => Some(Value::Bool(true)),
                "false" => Some(Value::Bool(false)),
                _ => None,
            },
            ParamType::Array | ParamType::Object => serde_json::from_str(text)
                .ok()
                .filter(|v: &Value| self.accepts(v)),
        };
        parsed.ok_or_else(|| format!("expected {}, got {text:?}", self.as_str()))
    }

    /// The type's name as written in a pipeline.
    pub fn as_str(self) -> &'static str {
        match self {
            ParamType::String => "string",
            ParamType::Integer => "integer",
            ParamType::Number => "number",
            ParamType::Boolean => "boolean",
            ParamType::Array => "array",
            ParamType::Object => "object",
        }
    }
}

/// A param declaration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamDef {
    /// The param's type.
    #[serde(rename = "type")]
    pub param_type: ParamType,
    /// The value used when a run gives none; a param without a default is required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<Value>,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// One task of a pipeline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskDef {
    /// Unique id within the pipeline.
    pub id: TaskId,
    /// The registered tool that executes it.
    pub tool: String,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Inputs of the tool; strings are minijinja templates over `params`, `tasks.<id>.outputs`,
    /// `item`, `index` and `run`.
    #[serde(
        default,
        rename = "with",
        skip_serializing_if = "serde_json::Map::is_empty"
    )]
    pub inputs: serde_json::Map<String, Value>,
    /// Tasks that must finish first. Tasks referenced from templates are dependencies too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<TaskId>,
    /// Retry policy; one attempt when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// Longest an attempt may run before it is stopped.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "optional_duration"
    )]
    pub timeout: Option<Duration>,
    /// A condition (minijinja expression, with or without `{{ }}`); the task is skipped when
    /// it is false.
    #[serde(default, rename = "if", skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    /// Fan-out: a list, or a template that yields a list; one task run per item, with the
    /// item in `item` and its position in `index`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_each: Option<Value>,
    /// Saga compensation: what undoes the task's effect. When the run fails after the task
    /// succeeded, the compensation runs (in reverse completion order with the other
    /// compensations) before the run ends `failed`. Not allowed on a fan-out task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensate: Option<CompensationDef>,
    /// The sandbox the task's code must run in. `auto` (the default) takes the strongest
    /// the tool offers, WASM first; `wasm` or `process` is a requirement validation checks
    /// against the tool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<SandboxChoice>,
    /// Tags a worker must advertise to run this task (for example `gpu`, `python`, a
    /// region). Only standalone workers (`arches worker --tag …`) advertise tags; a task
    /// with none runs on any worker. At most [`WORKER_TAGS_MAX`] tags, each of
    /// [`is_valid_worker_tag`] shape.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub worker_tags: Vec<String>,
    /// Confidence routing of the tool's results (see [`crate::review`]): AI tools
    /// ([`crate::review::AI_TOOLS`]) are routed with [`ReviewPolicy::default`] when it is
    /// absent; any other tool is routed only when it is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub review: Option<ReviewPolicy>,
}

impl TaskDef {
    /// The routing policy of the task's results, if they are routed.
    pub fn review_policy(&self) -> Option<ReviewPolicy> {
        match &self.review {
            Some(policy) => Some(policy.clone()),
            None if crate::review::AI_TOOLS.contains(&self.tool.as_str()) => {
                Some(ReviewPolicy::default())
            }
            None => None,
        }
    }
}

/// Most `worker_tags` per task (and tags per worker).
pub const WORKER_TAGS_MAX: usize = 16;

/// Whether `tag` is a valid worker tag: 1 to 64 ASCII characters among lowercase letters,
/// digits, `-`, `_`, `.` and `:`, starting with a letter or a digit.
pub fn is_valid_worker_tag(tag: &str) -> bool {
    (1..=64).contains(&tag.len())
        && tag
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && tag.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.' | b':')
        })
}

/// A task's `sandbox` setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SandboxChoice {
    /// The strongest sandbox the tool offers ([`crate::tooldef::Sandbox`] order: WASM first).
    Auto,
    /// Only a WebAssembly sandbox.
    Wasm,
    /// An operating-system process sandbox.
    Process,
}

/// The compensation of a task: a tool run with its own inputs, retry policy and timeout.
///
/// Its task run is recorded under the task id [`compensation_task_id`] of the task it
/// compensates (`<id>__compensate`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompensationDef {
    /// The registered tool that executes it.
    pub tool: String,
    /// Inputs of the tool; strings are minijinja templates over `params`, `run` and
    /// `tasks.<id>` of the compensated task itself and of its dependencies (tasks read here
    /// become dependencies of the compensated task).
    #[serde(
        default,
        rename = "with",
        skip_serializing_if = "serde_json::Map::is_empty"
    )]
    pub inputs: serde_json::Map<String, Value>,
    /// Retry policy; one attempt when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// Longest an attempt may run before it is stopped.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "optional_duration"
    )]
    pub timeout: Option<Duration>,
}

/// What the id of a compensation task run ends with, after the compensated task's id.
pub const COMPENSATION_SUFFIX: &str = "__compensate";

/// The task id under which the compensation of `task` is recorded: `<task>__compensate`.
/// `None` when that id would be longer than a task id may be (validation refuses a
/// `compensate` on such a task).
pub fn compensation_task_id(task: &TaskId) -> Option<TaskId> {
    TaskId::parse(format!("{task}{COMPENSATION_SUFFIX}")).ok()
}

/// Serde for durations written as `"30s"`, `"500ms"`, `"1h30m"` or a number of seconds.
pub mod optional_duration {
    use super::*;

    /// Writes the duration as text, for example `"1.5s"`.
    pub fn serialize<S: Serializer>(
        value: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(duration) => serializer.serialize_str(&format_duration(*duration)),
            None => serializer.serialize_none(),
        }
    }

    /// Reads text or a number of seconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        let value = Option::<Value>::deserialize(deserializer)?;
        match value {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n
                .as_f64()
                .filter(|s| *s >= 0.0 && s.is_finite())
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
                .map(Some)
                .ok_or_else(|| {
                    serde::de::Error::custom("duration must be a positive number of seconds")
                }),
            Some(Value::String(text)) => crate::time::parse_duration(&text)
                .map(Some)
                .map_err(serde::de::Error::custom),
            Some(other) => Err(serde::de::Error::custom(format!(
                "expected a duration such as \"30s\", got {other}"
            ))),
        }
    }
}

/// Formats a duration the way [`crate::time::parse_duration`] reads it.
pub fn format_duration(duration: Duration) -> String {
    let ms = duration.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

impl PipelineDef {
    /// The task with this id.
    pub fn task(&self, id: &str) -> Option<&TaskDef> {
        self.tasks.iter().find(|t| t.id.as_str() == id)
    }

    /// The task whose compensation is recorded under `id` (see [`compensation_task_id`]):
    /// `None` when `id` is a task of the pipeline, or names no task with a `compensate`.
    pub fn compensated_task(&self, id: &str) -> Option<&TaskDef> {
        if self.task(id).is_some() {
            return None;
        }
        let base = id.strip_suffix(COMPENSATION_SUFFIX)?;
        self.task(base).filter(|t| t.compensate.is_some())
    }
}

/// Serde for a required duration written as text or seconds.
pub mod optional_duration_required {
    use super::*;

    /// Writes the duration as text.
    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format_duration(*value))
    }

    /// Reads text or a number of seconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        super::optional_duration::deserialize(deserializer)?
            .ok_or_else(|| serde::de::Error::custom("a duration is required"))
    }
}
