//! Pipelines: the definition model, reading it from YAML or JSON with positions, validation,
//! the DAG, templates and graph rendering.

pub mod dag;
pub mod graph;
pub mod model;
pub mod source;
pub mod template;
pub mod validate;

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use serde_json::Value;

pub use dag::{Dag, DagError};
pub use model::*;
pub use template::{TemplateError, Templates};

use crate::ids::TaskId;

/// What validation needs to know of the tools: their names and input schemas.
pub trait ToolCatalog {
    /// The JSON Schema of a tool's inputs, or `None` when no tool has that name.
    fn input_schema(&self, tool: &str) -> Option<Value>;
    /// Every tool name, for hints.
    fn tool_names(&self) -> Vec<String>;

    /// The upstream tasks a task's inputs name for its tool (for example the tables a `sql`
    /// query reads); they become dependencies of the task. `task_ids` are the pipeline's
    /// task ids; the answer holds only some of them.
    fn implied_dependencies(
        &self,
        _tool: &str,
        _inputs: &Value,
        _task_ids: &[&str],
    ) -> Vec<String> {
        Vec::new()
    }

    /// The sandboxes a tool runs its code in, strongest first ([`crate::tooldef::Sandbox`]);
    /// empty for tools that run only the worker's own code (`sql`, `http`, `noop`…).
    fn sandboxes(&self, _tool: &str) -> Vec<crate::tooldef::Sandbox> {
        Vec::new()
    }
}

/// Adds to each task's `depends_on` the tasks its tool says its inputs read
/// ([`ToolCatalog::implied_dependencies`]), so that the stored definition names every
/// dependency explicitly. Returns how many were added.
pub fn complete_dependencies(def: &mut PipelineDef, catalog: &dyn ToolCatalog) -> usize {
    let ids: Vec<String> = def.tasks.iter().map(|t| t.id.to_string()).collect();
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let mut added = 0;
    for task in &mut def.tasks {
        let inputs = Value::Object(task.inputs.clone());
        for name in catalog.implied_dependencies(&task.tool, &inputs, &id_refs) {
            let Ok(id) = TaskId::parse(name) else {
                continue;
            };
            if id != task.id && !task.depends_on.contains(&id) {
                task.depends_on.push(id);
                added += 1;
            }
        }
    }
    added
}

/// One problem found in a pipeline definition.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Diagnostic {
    /// Stable code, for example `unknown_tool`, `cycle`, `duplicate_task_id`.
    pub code: &'static str,
    /// What is wrong.
    pub message: String,
    /// The file (or source name) it is in.
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<u32>,
    /// 1-based column, when known.
    pub column: Option<u32>,
    /// JSON Pointer of the offending value, for example `/tasks/2/depends_on/0`.
    pub pointer: String,
    /// How to fix it.
    pub hint: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        write!(f, ": error[{}]: {}", self.code, self.message)?;
        if !self.pointer.is_empty() {
            write!(f, " (at {})", self.pointer)?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

/// A pipeline whose DAG is known: the definition plus the dependencies of every task
/// (`depends_on` together with the tasks its templates read through `tasks.<id>`).
#[derive(Clone, Debug)]
pub struct Pipeline {
    /// The definition.
    pub def: Arc<PipelineDef>,
    /// The DAG.
    pub dag: Arc<Dag>,
}

impl Pipeline {
    /// Builds the DAG of a definition. This does not validate tools or schemas: use
    /// [`validate::validate`] for the full check with positions.
    ///
    /// # Errors
    /// [`DagError`] for an unknown dependency or a cycle; template syntax errors are
    /// ignored here (they fail the task that renders them).
    pub fn build(def: PipelineDef) -> Result<Pipeline, DagError> {
        let templates = Templates::new();
        let tasks: Vec<(TaskId, BTreeSet<TaskId>)> = def
            .tasks
            .iter()
            .map(|task| (task.id.clone(), task_dependencies(task, &templates)))
            .collect();
        let dag = Dag::build(&tasks)?;
        Ok(Pipeline {
            def: Arc::new(def),
            dag: Arc::new(dag),
        })
    }

    /// The definition of a task.
    pub fn task(&self, id: &TaskId) -> Option<&TaskDef> {
        self.def.task(id.as_str())
    }
}

/// A task's dependencies: `depends_on` plus the tasks read by its templates (`with`, `if`,
/// `for_each` and the `with` of its `compensate`). References to ids that are not valid task ids are left to validation.
pub fn task_dependencies(task: &TaskDef, templates: &Templates) -> BTreeSet<TaskId> {
    let mut deps: BTreeSet<TaskId> = task.depends_on.iter().cloned().collect();
    let mut strings = Vec::new();
    for value in task.inputs.values() {
        template::template_strings(value, &mut strings);
    }
    if let Some(for_each) = &task.for_each {
        template::template_strings(for_each, &mut strings);
    }
    if let Some(compensate) = &task.compensate {
        for value in compensate.inputs.values() {
            template::template_strings(value, &mut strings);
        }
    }
    let mut refs = BTreeSet::new();
    for text in &strings {
        if let Ok(found) = templates.references(text, false) {
            refs.extend(found);
        }
    }
    if let Some(condition) = &task.condition {
        if let Ok(found) = templates.references(condition, true) {
            refs.extend(found);
        }
    }
    for id in template::referenced_tasks(&refs) {
        if let Ok(id) = TaskId::parse(id) {
            if id != task.id {
                deps.insert(id);
            }
        }
    }
    deps
}
