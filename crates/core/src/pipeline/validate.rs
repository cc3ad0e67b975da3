//! Validation of pipeline definitions: every problem at once, each with a stable code, the
//! line and column, the JSON Pointer of the offending value and a hint.
//!
//! [`validate`] reads the text ([`super::source`]) and checks what the reading cannot:
//! tools and their input schemas (from a [`ToolCatalog`]), dependencies, the DAG, template
//! syntax and references, param defaults, retry policies, timeouts and fan-out lists.
//! Validation never runs a tool and never renders a template with data: a template's value is
//! only known at run time, so schema errors on template strings are left to the run.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::{Map, Value};

use super::source::{
    self, closest, describe, diagnostic, key_diagnostic, pointer_push, sort_diagnostics,
    suggestion, SourceMap,
};
use super::template::{is_template, Templates};
use super::{
    task_dependencies, Dag, DagError, Diagnostic, Pipeline, PipelineDef, TaskDef, ToolCatalog,
};
use crate::ids::TaskId;

/// Top-level names a template may read, besides `item` and `index` in fan-out tasks.
const CONTEXT_NAMES: &[&str] = &["params", "tasks", "run"];
/// Fan-out names.
const ITEM_NAMES: &[&str] = &["item", "index"];
/// What `tasks.<id>` holds in the template context.
const TASK_CONTEXT_FIELDS: &[&str] = &["outputs", "state"];
/// What `run` holds in the template context.
const RUN_CONTEXT_FIELDS: &[&str] = &["id", "pipeline"];
/// minijinja's global functions, which templates may call.
const TEMPLATE_GLOBALS: &[&str] = &["range", "dict", "debug", "namespace"];

/// Reads and validates a pipeline.
///
/// # Errors
/// Every problem found, sorted by line and column: the reading problems of
/// [`source::parse_pipeline`] together with those of [`validate_def`]. When the text does not
/// parse at all, the one parse error.
pub fn validate(
    file: &str,
    text: &str,
    catalog: &dyn ToolCatalog,
) -> Result<Pipeline, Vec<Diagnostic>> {
    let (value, map) = source::parse_document(file, text)?;
    let mut reading = source::read_pipeline(file, &value, &map);
    super::complete_dependencies(&mut reading.def, catalog);
    let mut diagnostics = reading.diagnostics;
    let context = Context {
        file,
        map: Some(&map),
        task_sources: reading.task_sources,
        unreadable_tasks: reading.unreadable_tasks,
        unreadable_params: reading.unreadable_params,
        check_empty: reading.tasks_listed,
        catalog,
    };
    diagnostics.extend(context.check(&reading.def));
    if diagnostics.is_empty() {
        // The reading mirrors the serde model; deserializing the whole value makes sure that
        // nothing it accepted is something the model refuses.
        match serde_json::from_value::<PipelineDef>(value) {
            Ok(mut def) => {
                super::complete_dependencies(&mut def, catalog);
                match Pipeline::build(def) {
                    Ok(pipeline) => return Ok(pipeline),
                    Err(err) => diagnostics.push(diagnostic(
                        "cycle",
                        err.to_string(),
                        file,
                        Some(&map),
                        "/tasks",
                        None,
                    )),
                }
            }
            Err(err) => diagnostics.push(diagnostic(
                "invalid_value",
                err.to_string(),
                file,
                Some(&map),
                "",
                None,
            )),
        }
    }
    sort_diagnostics(&mut diagnostics);
    Err(diagnostics)
}

/// Checks a definition that is already in memory (from the API, or read by
/// [`source::parse_pipeline`]). With the [`SourceMap`] of its text, diagnostics carry lines
/// and columns; without it, only pointers.
///
/// Returns every problem found, sorted by position; empty when the definition is valid.
pub fn validate_def(
    def: &PipelineDef,
    map: Option<&SourceMap>,
    file: &str,
    catalog: &dyn ToolCatalog,
) -> Vec<Diagnostic> {
    let context = Context {
        file,
        map,
        task_sources: (0..def.tasks.len()).collect(),
        unreadable_tasks: BTreeSet::new(),
        unreadable_params: BTreeSet::new(),
        check_empty: true,
        catalog,
    };
    let mut diagnostics = context.check(def);
    sort_diagnostics(&mut diagnostics);
    diagnostics
}

/// Checks the params a run is given against the pipeline's declarations and applies the
/// defaults.
///
/// # Errors
/// One message per problem, each naming the param: an unknown name (with a "did you mean"),
/// a required param (one without a default) that is missing, or a value of the wrong type.
pub fn check_params(def: &PipelineDef, given: &Map<String, Value>) -> Result<Value, Vec<String>> {
    let mut problems = Vec::new();
    let declared: Vec<&str> = def.params.keys().map(String::as_str).collect();
    for name in given.keys().filter(|name| !def.params.contains_key(*name)) {
        let hint = match closest(name, declared.iter().copied()) {
            Some(best) => format!("; did you mean `{best}`?"),
            None if declared.is_empty() => "; the pipeline declares no params".to_owned(),
            None => format!("; declared params: {}", declared.join(", ")),
        };
        problems.push(format!("unknown param `{name}`{hint}"));
    }
    let mut out = Map::new();
    for (name, param) in &def.params {
        match given.get(name).or(param.default.as_ref()) {
            Some(value) if param.param_type.accepts(value) => {
                out.insert(name.clone(), value.clone());
            }
            Some(value) => problems.push(format!(
                "param `{name}` must be {}, got {}",
                with_article(param.param_type.as_str()),
                describe(value)
            )),
            None => problems.push(format!(
                "param `{name}` is required ({}) and was not given",
                param.param_type.as_str()
            )),
        }
    }
    if problems.is_empty() {
        Ok(Value::Object(out))
    } else {
        Err(problems)
    }
}

fn with_article(word: &str) -> String {
    match word.chars().next() {
        Some('a' | 'e' | 'i' | 'o' | 'u') => format!("an {word}"),
        _ => format!("a {word}"),
    }
}

/// What the checks need besides the definition.
struct Context<'a> {
    file: &'a str,
    map: Option<&'a SourceMap>,
    /// For each task of the definition, its index in the written `tasks` list.
    task_sources: Vec<usize>,
    /// Ids of written tasks that could not be read; they exist for reference checks.
    unreadable_tasks: BTreeSet<String>,
    /// Names of declared params that could not be read.
    unreadable_params: BTreeSet<String>,
    /// Whether to report an empty task list (not when `tasks` itself is missing or broken,
    /// which is reported already).
    check_empty: bool,
    catalog: &'a dyn ToolCatalog,
}

/// One template of a task, where it is written and how it is read.
struct TemplateSite {
    pointer: String,
    text: String,
    is_condition: bool,
    /// Whether the template may read `item` and `index`: only the inputs of a fan-out task
    /// are rendered once per item; its `if` and `for_each` are evaluated before the fan-out.
    item_allowed: bool,
    /// Whether the template is in the task's `compensate`, which may read the task itself.
    compensation: bool,
}

impl Context<'_> {
    fn diagnostic(
        &self,
        code: &'static str,
        message: String,
        pointer: &str,
        hint: Option<String>,
    ) -> Diagnostic {
        diagnostic(code, message, self.file, self.map, pointer, hint)
    }

    fn task_pointer(&self, position: usize) -> String {
        format!(
            "/tasks/{}",
            self.task_sources.get(position).copied().unwrap_or(position)
        )
    }

    fn check(&self, def: &PipelineDef) -> Vec<Diagnostic> {
        let mut out = Vec::new();
        if self.check_empty && def.tasks.is_empty() && self.unreadable_tasks.is_empty() {
            out.push(self.diagnostic(
                "empty_pipeline",
                "the pipeline has no tasks".to_owned(),
                "/tasks",
                Some("add at least one task with an `id` and a `tool`".to_owned()),
            ));
        }
        if def.concurrency == Some(0) {
            out.push(self.diagnostic(
                "invalid_concurrency",
                "concurrency must be at least 1".to_owned(),
                "/concurrency",
                Some("leave `concurrency` out to use the engine's default".to_owned()),
            ));
        }
        self.check_params(def, &mut out);
        self.check_duplicates(def, &mut out);
        // Every task id written, sorted and without repeats, for membership and hints.
        let known: Vec<&str> = def
            .tasks
            .iter()
            .map(|t| t.id.as_str())
            .chain(self.unreadable_tasks.iter().map(String::as_str))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let templates = Templates::new();
        let mut tools = HashMap::new();
        for (position, task) in def.tasks.iter().enumerate() {
            let pointer = self.task_pointer(position);
            self.check_tool(&task.tool, &task.inputs, &pointer, &mut tools, &mut out);
            self.check_compensation(task, &pointer, &known, &mut tools, &mut out);
            self.check_dependencies(task, &pointer, &known, &mut out);
            self.check_templates(def, task, &pointer, &templates, &known, &mut out);
            self.check_policies(task, &pointer, &mut out);
        }
        self.check_cycle(def, &templates, &mut out);
        out
    }

    fn check_params(&self, def: &PipelineDef, out: &mut Vec<Diagnostic>) {
        for (name, param) in &def.params {
            let Some(default) = &param.default else {
                continue;
            };
            if !param.param_type.accepts(default) {
                let pointer = pointer_push(&pointer_push("/params", name), "default");
                out.push(self.diagnostic(
                    "param_type",
                    format!(
                        "the default of param `{name}` is {}, but the param is declared {}",
                        describe(default),
                        param.param_type.as_str()
                    ),
                    &pointer,
                    Some(format!(
                        "make the default {} or change the param's `type`",
                        with_article(param.param_type.as_str())
                    )),
                ));
            }
        }
    }

    fn check_duplicates(&self, def: &PipelineDef, out: &mut Vec<Diagnostic>) {
        let mut first: HashMap<&str, usize> = HashMap::new();
        for (position, task) in def.tasks.iter().enumerate() {
            match first.get(task.id.as_str()) {
                None => {
                    first.insert(task.id.as_str(), position);
                }
                Some(&earlier) => {
                    let earlier_pointer = format!("{}/id", self.task_pointer(earlier));
                    let place = match self.map.and_then(|m| m.locate(&earlier_pointer)) {
                        Some((line, _)) => format!("on line {line}"),
                        None => format!("at {earlier_pointer}"),
                    };
                    out.push(
                        self.diagnostic(
                            "duplicate_task_id",
                            format!("task id `{}` is already used by the task {place}", task.id),
                            &format!("{}/id", self.task_pointer(position)),
                            Some(
                                "task ids must be unique within a pipeline; rename one of the two"
                                    .to_owned(),
                            ),
                        ),
                    );
                }
            }
        }
    }

    /// Checks a `compensate`: its tool and inputs like a task's, its policies, that the task
    /// is not a fan-out, and that its task-run id (`<id>__compensate`) is free and valid.
    fn check_compensation(
        &self,
        task: &TaskDef,
        pointer: &str,
        known: &[&str],
        tools: &mut HashMap<String, Option<Tool>>,
        out: &mut Vec<Diagnostic>,
    ) {
        let Some(compensate) = &task.compensate else {
            return;
        };
        let compensate_pointer = format!("{pointer}/compensate");
        self.check_tool(
            &compensate.tool,
            &compensate.inputs,
            &compensate_pointer,
            tools,
            out,
        );
        self.check_retry_and_timeout(
            &task.id,
            compensate.retry.as_ref(),
            compensate.timeout,
            &compensate_pointer,
            out,
        );
        if task.for_each.is_some() {
            out.push(self.diagnostic(
                "compensate_fan_out",
                format!("task `{}` fans out with `for_each` and cannot have `compensate`", task.id),
                &compensate_pointer,
                Some("compensation undoes one task run; move the fan-out into its own task, or undo its items from a compensation of a task that follows or precedes it".to_owned()),
            ));
        }
        match super::compensation_task_id(&task.id) {
            None => out.push(self.diagnostic(
                "compensation_id",
                format!(
                    "task id `{}` is too long to have a compensation, recorded as `{}{}`",
                    task.id,
                    task.id,
                    super::COMPENSATION_SUFFIX
                ),
                &format!("{pointer}/id"),
                Some(format!(
                    "a task with `compensate` takes an id of at most {} characters",
                    128 - super::COMPENSATION_SUFFIX.len()
                )),
            )),
            Some(id) if known.contains(&id.as_str()) => out.push(self.diagnostic(
                "compensation_id",
                format!(
                    "task id `{id}` is reserved for the compensation of task `{}`",
                    task.id
                ),
                &format!("{pointer}/id"),
                Some(format!("rename the task `{id}`")),
            )),
            Some(_) => {}
        }
    }

    /// Checks a tool name and inputs against the catalog; `pointer` is the mapping that
    /// holds `tool` and `with` (a task or its `compensate`).
    fn check_tool(
        &self,
        tool_name: &str,
        task_inputs: &Map<String, Value>,
        pointer: &str,
        tools: &mut HashMap<String, Option<Tool>>,
        out: &mut Vec<Diagnostic>,
    ) {
        let tool = tools.entry(tool_name.to_owned()).or_insert_with(|| {
            self.catalog.input_schema(tool_name).map(|schema| {
                let validator = jsonschema::validator_for(&schema).map_err(|e| e.to_string());
                Tool { schema, validator }
            })
        });
        let Some(tool) = tool else {
            let mut names = self.catalog.tool_names();
            names.sort();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            out.push(self.diagnostic(
                "unknown_tool",
                format!("unknown tool `{}`", tool_name),
                &format!("{pointer}/tool"),
                Some(suggestion(tool_name, &names, "known tools")),
            ));
            return;
        };
        let validator = match &tool.validator {
            Ok(validator) => validator,
            Err(message) => {
                out.push(self.diagnostic(
                    "input_schema",
                    format!(
                        "the input schema of tool `{}` does not compile: {message}",
                        tool_name
                    ),
                    &format!("{pointer}/tool"),
                    Some("fix the tool's registration".to_owned()),
                ));
                return;
            }
        };
        let inputs = Value::Object(task_inputs.clone());
        let with = format!("{pointer}/with");
        let mut seen = BTreeSet::new();
        for error in validator.iter_errors(&inputs) {
            // A template's value is only known when the task runs.
            if matches!(error.instance().as_ref(), Value::String(text) if is_template(text)) {
                continue;
            }
            let location = error.instance_path().as_str().to_owned();
            let object_hint = schema_properties(&tool.schema, &location)
                .map(|p| format!("tool `{}` takes {p}", tool_name));
            let found = match error.kind() {
                jsonschema::error::ValidationErrorKind::AdditionalProperties { unexpected } => {
                    unexpected
                        .iter()
                        .map(|name| {
                            let field = pointer_push(&location, name);
                            let message =
                                format!("tool `{}` takes no input `{}`", tool_name, &field[1..]);
                            let known = schema_property_names(&tool.schema, &location);
                            let hint = match closest(name, known.iter().map(String::as_str)) {
                                Some(best) => Some(format!(
                                    "did you mean `{best}`? {}",
                                    object_hint.clone().unwrap_or_default()
                                )),
                                None => object_hint.clone(),
                            };
                            (true, format!("{with}{field}"), message, hint)
                        })
                        .collect()
                }
                jsonschema::error::ValidationErrorKind::Required { property } => {
                    let name = property
                        .as_str()
                        .map_or_else(|| property.to_string(), str::to_owned);
                    let field = pointer_push(&location, &name);
                    let message = format!("tool `{}` needs input `{}`", tool_name, &field[1..]);
                    vec![(
                        true,
                        format!("{with}{location}"),
                        message,
                        object_hint.clone(),
                    )]
                }
                _ => {
                    let message = match location.is_empty() {
                        false => format!(
                            "input `{}` of tool `{}`: {error}",
                            &location[1..],
                            tool_name
                        ),
                        true => format!("inputs of tool `{}`: {error}", tool_name),
                    };
                    let parent = location.rsplit_once('/').map_or("", |(parent, _)| parent);
                    let hint = schema_properties(&tool.schema, parent)
                        .map(|p| format!("tool `{}` takes {p}", tool_name));
                    vec![(
                        location.is_empty(),
                        format!("{with}{location}"),
                        message,
                        hint,
                    )]
                }
            };
            for (at_key, pointer, message, hint) in found {
                if !seen.insert((pointer.clone(), message.clone())) {
                    continue;
                }
                // Problems with the inputs as a whole, or with a field's name, point at the
                // key; problems with a value at the value.
                let diagnostic = if at_key {
                    key_diagnostic("input_schema", message, self.file, self.map, &pointer, hint)
                } else {
                    self.diagnostic("input_schema", message, &pointer, hint)
                };
                out.push(diagnostic);
            }
        }
    }

    fn check_dependencies(
        &self,
        task: &TaskDef,
        pointer: &str,
        known: &[&str],
        out: &mut Vec<Diagnostic>,
    ) {
        for (position, dependency) in task.depends_on.iter().enumerate() {
            let dependency_pointer = format!("{pointer}/depends_on/{position}");
            if *dependency == task.id {
                out.push(self.diagnostic(
                    "self_dependency",
                    format!("task `{}` depends on itself", task.id),
                    &dependency_pointer,
                    Some("remove it from `depends_on`".to_owned()),
                ));
            } else if !known.contains(&dependency.as_str()) {
                out.push(self.diagnostic(
                    "unknown_dependency",
                    format!("task `{}` depends on unknown task `{dependency}`", task.id),
                    &dependency_pointer,
                    Some(suggestion(dependency.as_str(), known, "tasks")),
                ));
            }
        }
    }

    fn check_templates(
        &self,
        def: &PipelineDef,
        task: &TaskDef,
        pointer: &str,
        templates: &Templates,
        known: &[&str],
        out: &mut Vec<Diagnostic>,
    ) {
        let params: Vec<&str> = def
            .params
            .keys()
            .map(String::as_str)
            .chain(self.unreadable_params.iter().map(String::as_str))
            .collect();
        for site in template_sites(task, pointer) {
            if let Err(err) = templates.check_syntax(&site.text, site.is_condition) {
                out.push(self.diagnostic(
                    "template_syntax",
                    err.message,
                    &site.pointer,
                    Some("templates use minijinja (Jinja2) syntax: `{{ params.name }}`, `{{ tasks.load.outputs.rows }}`".to_owned()),
                ));
                continue;
            }
            let Ok(references) = templates.references(&site.text, site.is_condition) else {
                continue;
            };
            let mut reported = BTreeSet::new();
            for reference in &references {
                let Some((code, message, hint)) =
                    self.check_reference(task, &site, reference, &params, known)
                else {
                    continue;
                };
                if reported.insert(message.clone()) {
                    out.push(self.diagnostic(code, message, &site.pointer, Some(hint)));
                }
            }
        }
    }

    /// A problem with one dotted name a template reads, as `(code, message, hint)`.
    fn check_reference(
        &self,
        task: &TaskDef,
        site: &TemplateSite,
        reference: &str,
        params: &[&str],
        known: &[&str],
    ) -> Option<(&'static str, String, String)> {
        let mut parts = reference.split('.');
        let root = parts.next().unwrap_or_default();
        let second = parts.next();
        let third = parts.next();
        match root {
            "params" => {
                let name = second?;
                if params.contains(&name) {
                    return None;
                }
                let hint = match closest(name, params.iter().copied()) {
                    Some(best) => format!("did you mean `params.{best}`?"),
                    None => format!(
                        "declare it under `params:`; {}",
                        suggestion(name, params, "declared params")
                    ),
                };
                Some((
                    "unknown_reference",
                    format!("`params.{name}` is not a declared param"),
                    hint,
                ))
            }
            "tasks" => {
                let id = second?;
                if id == task.id.as_str() && !site.compensation {
                    return Some((
                        "self_dependency",
                        format!(
                            "task `{}` reads its own outputs through `tasks.{id}`",
                            task.id
                        ),
                        "a task can read only the outputs of other tasks".to_owned(),
                    ));
                }
                if !known.contains(&id) {
                    let hint = match closest(id, known.iter().copied()) {
                        Some(best) => format!("did you mean `tasks.{best}`?"),
                        None => suggestion(id, known, "tasks"),
                    };
                    return Some((
                        "unknown_reference",
                        format!("`tasks.{id}` names no task"),
                        hint,
                    ));
                }
                let field = third?;
                if TASK_CONTEXT_FIELDS.contains(&field) {
                    return None;
                }
                let hint = match closest(field, TASK_CONTEXT_FIELDS.iter().copied()) {
                    Some(best) => format!("did you mean `tasks.{id}.{best}`?"),
                    None => "a task exposes `outputs` and `state`".to_owned(),
                };
                Some((
                    "unknown_reference",
                    format!("`tasks.{id}.{field}` does not exist"),
                    hint,
                ))
            }
            "run" => {
                let field = second?;
                if RUN_CONTEXT_FIELDS.contains(&field) {
                    return None;
                }
                let hint = suggestion(field, RUN_CONTEXT_FIELDS, "`run` holds");
                Some((
                    "unknown_reference",
                    format!("`run.{field}` does not exist"),
                    hint,
                ))
            }
            "item" | "index" if site.item_allowed => None,
            "item" | "index" => {
                let (message, hint) = if task.for_each.is_some() {
                    (
                        format!("`{root}` is defined only in `with`, not in `if` or `for_each`"),
                        "`if` and `for_each` are evaluated once, before the fan-out".to_owned(),
                    )
                } else {
                    (
                        format!("`{root}` is defined only in tasks with `for_each`"),
                        "add `for_each` to fan the task out over a list".to_owned(),
                    )
                };
                Some(("unknown_reference", message, hint))
            }
            name if TEMPLATE_GLOBALS.contains(&name) => None,
            name => {
                let mut allowed: Vec<&str> = CONTEXT_NAMES.to_vec();
                if site.item_allowed {
                    allowed.extend_from_slice(ITEM_NAMES);
                }
                let hint = match closest(name, allowed.iter().copied()) {
                    Some(best) => format!("did you mean `{best}`?"),
                    None => format!(
                        "templates read {}",
                        allowed
                            .iter()
                            .map(|n| format!("`{n}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                };
                Some((
                    "unknown_reference",
                    format!("unknown name `{name}` in template"),
                    hint,
                ))
            }
        }
    }

    fn check_policies(&self, task: &TaskDef, pointer: &str, out: &mut Vec<Diagnostic>) {
        self.check_retry_and_timeout(&task.id, task.retry.as_ref(), task.timeout, pointer, out);
        match &task.for_each {
            None | Some(Value::Array(_)) => {}
            Some(Value::String(text)) if is_template(text) => {}
            Some(other) => out.push(self.diagnostic(
                "for_each_type",
                format!("`for_each` must be a list or a template that yields one, got {}", describe(other)),
                &format!("{pointer}/for_each"),
                Some("write a list (`for_each: [a, b]`) or a template (`for_each: \"{{ tasks.load.outputs.rows }}\"`)".to_owned()),
            )),
        }
        self.check_sandbox(task, pointer, out);
        self.check_worker_tags(task, pointer, out);
        self.check_review(task, pointer, out);
    }

    /// Checks a task's `review:` policy: thresholds in range and ordered, and not on an
    /// `approval` task (which always waits for its approvers).
    fn check_review(&self, task: &TaskDef, pointer: &str, out: &mut Vec<Diagnostic>) {
        let Some(policy) = &task.review else {
            return;
        };
        if task.tool == crate::review::APPROVAL_TOOL {
            out.push(self.diagnostic(
                "review_on_approval",
                format!(
                    "task `{}` is an approval gate, which always waits for its approvers; \
                     `review` routes the results of other tools",
                    task.id
                ),
                &format!("{pointer}/review"),
                Some("remove `review`, and set `quorum`, `assignees` and `expires_in` under `with`".to_owned()),
            ));
        }
        for (field, message) in policy.problems() {
            out.push(self.diagnostic(
                "review_policy_invalid",
                format!("`review.{field}` of task `{}` {message}", task.id),
                &format!("{pointer}/review/{field}"),
                None,
            ));
        }
    }

    /// Checks a task's `worker_tags`: well-formed, at most
    /// [`crate::pipeline::WORKER_TAGS_MAX`].
    fn check_worker_tags(&self, task: &TaskDef, pointer: &str, out: &mut Vec<Diagnostic>) {
        use crate::pipeline::{is_valid_worker_tag, WORKER_TAGS_MAX};
        if task.worker_tags.len() > WORKER_TAGS_MAX {
            out.push(self.diagnostic(
                "worker_tags_too_many",
                format!(
                    "task `{}` requires {} worker tags; at most {WORKER_TAGS_MAX} are allowed",
                    task.id,
                    task.worker_tags.len()
                ),
                &format!("{pointer}/worker_tags"),
                None,
            ));
        }
        for (i, tag) in task.worker_tags.iter().enumerate() {
            if !is_valid_worker_tag(tag) {
                out.push(self.diagnostic(
                    "worker_tag_invalid",
                    format!("worker tag {tag:?} of task `{}` is not a valid tag", task.id),
                    &format!("{pointer}/worker_tags/{i}"),
                    Some("use 1 to 64 of a-z, 0-9, `-`, `_`, `.`, `:`, starting with a letter or digit (for example `gpu`, `region:eu-west`)".to_owned()),
                ));
            }
        }
    }

    /// Checks that a task's `sandbox: wasm | process` is one its tool runs in; an unknown
    /// tool is reported elsewhere.
    fn check_sandbox(&self, task: &TaskDef, pointer: &str, out: &mut Vec<Diagnostic>) {
        let wanted = match task.sandbox {
            None | Some(super::SandboxChoice::Auto) => return,
            Some(super::SandboxChoice::Wasm) => crate::tooldef::Sandbox::Wasm,
            Some(super::SandboxChoice::Process) => crate::tooldef::Sandbox::Process,
        };
        if self.catalog.input_schema(&task.tool).is_none() {
            return;
        }
        let offered = self.catalog.sandboxes(&task.tool);
        if offered.contains(&wanted) {
            return;
        }
        let runs_in = match offered.as_slice() {
            [] => "runs only the worker's own code, in no sandbox".to_owned(),
            [only] => format!("runs only in the {} sandbox", only.as_str()),
            many => format!(
                "runs in the {} sandboxes",
                many.iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(" and ")
            ),
        };
        out.push(self.diagnostic(
            "sandbox_unavailable",
            format!(
                "task `{}` requires the {} sandbox, but tool `{}` {runs_in}",
                task.id,
                wanted.as_str(),
                task.tool
            ),
            &format!("{pointer}/sandbox"),
            Some("use a tool that runs in that sandbox (`wasm` for WebAssembly, `shell` for a process), or `sandbox: auto`".to_owned()),
        ));
    }

    /// Checks a retry policy and a timeout written in the mapping at `pointer`.
    fn check_retry_and_timeout(
        &self,
        task_id: &TaskId,
        retry: Option<&crate::retry::RetryPolicy>,
        timeout: Option<std::time::Duration>,
        pointer: &str,
        out: &mut Vec<Diagnostic>,
    ) {
        if let Some(retry) = retry {
            for (field, problem) in retry.problems() {
                out.push(self.diagnostic(
                    "invalid_retry",
                    format!("retry `{field}` {problem}"),
                    &format!("{pointer}/retry/{field}"),
                    Some("see the retry policy's bounds: max_attempts 1 to 100, multiplier at least 1, jitter 0 to 1, max_delay not below initial_delay".to_owned()),
                ));
            }
        }
        if timeout.is_some_and(|t| t.is_zero()) {
            out.push(
                self.diagnostic(
                    "invalid_timeout",
                    format!("task `{task_id}` has a zero timeout"),
                    &format!("{pointer}/timeout"),
                    Some(
                        "use a positive duration such as \"30s\", or leave `timeout` out for none"
                            .to_owned(),
                    ),
                ),
            );
        }
    }

    fn check_cycle(&self, def: &PipelineDef, templates: &Templates, out: &mut Vec<Diagnostic>) {
        // Only the first task of each id, and only dependencies on tasks that exist: those
        // problems are reported on their own, and the DAG would stop at them.
        let mut seen = BTreeSet::new();
        let mut nodes: Vec<(TaskId, BTreeSet<TaskId>)> = Vec::new();
        let mut positions: BTreeMap<TaskId, usize> = BTreeMap::new();
        for (position, task) in def.tasks.iter().enumerate() {
            if !seen.insert(task.id.clone()) {
                continue;
            }
            positions.insert(task.id.clone(), position);
            let dependencies = task_dependencies(task, templates)
                .into_iter()
                .filter(|d| *d != task.id && def.task(d.as_str()).is_some())
                .collect();
            nodes.push((task.id.clone(), dependencies));
        }
        let Err(DagError::Cycle(cycle)) = Dag::build(&nodes) else {
            return;
        };
        let (Some(first), Some(previous)) = (
            cycle.first(),
            cycle.len().checked_sub(2).and_then(|i| cycle.get(i)),
        ) else {
            return;
        };
        let position = positions[first];
        let task = &def.tasks[position];
        let task_pointer = self.task_pointer(position);
        // The first task depends on the one before it on the cycle: point at that dependency,
        // written in `depends_on` or read by a template.
        let pointer = match task.depends_on.iter().position(|d| d == previous) {
            Some(index) => format!("{task_pointer}/depends_on/{index}"),
            None => template_sites(task, &task_pointer)
                .into_iter()
                .find(|site| {
                    templates
                        .references(&site.text, site.is_condition)
                        .is_ok_and(|refs| {
                            refs.iter().any(|r| {
                                r.split('.').nth(1) == Some(previous.as_str())
                                    && r.starts_with("tasks.")
                            })
                        })
                })
                .map_or_else(|| format!("{task_pointer}/depends_on"), |site| site.pointer),
        };
        out.push(self.diagnostic(
            "cycle",
            DagError::Cycle(cycle.clone()).to_string(),
            &pointer,
            Some("tasks cannot depend on each other in a circle; remove one of the dependencies (a read of `tasks.<id>` in a template is a dependency too)".to_owned()),
        ));
    }
}

/// Every template of a task: strings with template syntax in `with` and a literal
/// `for_each`, a `for_each` template, and the `if` condition (always an expression).
fn template_sites(task: &TaskDef, pointer: &str) -> Vec<TemplateSite> {
    fn walk(value: &Value, pointer: String, item_allowed: bool, out: &mut Vec<TemplateSite>) {
        match value {
            Value::String(text) if is_template(text) => {
                out.push(TemplateSite {
                    pointer,
                    text: text.clone(),
                    is_condition: false,
                    item_allowed,
                    compensation: false,
                });
            }
            Value::Array(items) => {
                for (index, item) in items.iter().enumerate() {
                    walk(item, format!("{pointer}/{index}"), item_allowed, out);
                }
            }
            Value::Object(map) => {
                for (key, item) in map {
                    walk(item, pointer_push(&pointer, key), item_allowed, out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    for (key, value) in &task.inputs {
        walk(
            value,
            pointer_push(&format!("{pointer}/with"), key),
            task.for_each.is_some(),
            &mut out,
        );
    }
    if let Some(condition) = &task.condition {
        out.push(TemplateSite {
            pointer: format!("{pointer}/if"),
            text: condition.clone(),
            is_condition: true,
            item_allowed: false,
            compensation: false,
        });
    }
    if let Some(for_each) = &task.for_each {
        walk(for_each, format!("{pointer}/for_each"), false, &mut out);
    }
    if let Some(compensate) = &task.compensate {
        let start = out.len();
        for (key, value) in &compensate.inputs {
            walk(
                value,
                pointer_push(&format!("{pointer}/compensate/with"), key),
                false,
                &mut out,
            );
        }
        for site in &mut out[start..] {
            site.compensation = true;
        }
    }
    out
}

/// A tool's input schema and its compiled validator (or why it does not compile).
struct Tool {
    schema: Value,
    validator: Result<jsonschema::Validator, String>,
}

/// The subschema that describes the value at `location` (a JSON Pointer into the inputs),
/// following `properties` and `items`; `None` when the schema does not say.
fn subschema<'a>(schema: &'a Value, location: &str) -> Option<&'a Value> {
    let mut current = schema;
    for token in location.split('/').skip(1) {
        let token = token.replace("~1", "/").replace("~0", "~");
        current = match current.get("properties").and_then(|p| p.get(&token)) {
            Some(next) => next,
            None => current.get("items")?,
        };
    }
    Some(current)
}

/// The property names the object at `location` takes, as the schema declares them.
fn schema_property_names(schema: &Value, location: &str) -> Vec<String> {
    subschema(schema, location)
        .and_then(|s| s.get("properties"))
        .and_then(Value::as_object)
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default()
}

/// The properties the object at `location` takes, for hints: "`a`, `b` (required)".
fn schema_properties(schema: &Value, location: &str) -> Option<String> {
    let object = subschema(schema, location)?;
    let properties = object.get("properties")?.as_object()?;
    let required: BTreeSet<&str> = object
        .get("required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let listed: Vec<String> = properties
        .keys()
        .map(|k| {
            if required.contains(k.as_str()) {
                format!("`{k}` (required)")
            } else {
                format!("`{k}`")
            }
        })
        .collect();
    Some(listed.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A catalog of test tools, each with an input schema.
    struct Catalog(BTreeMap<String, Value>);

    impl ToolCatalog for Catalog {
        fn input_schema(&self, tool: &str) -> Option<Value> {
            self.0.get(tool).cloned()
        }
        fn tool_names(&self) -> Vec<String> {
            self.0.keys().cloned().collect()
        }
        /// A `sql` task depends on every task id its query mentions as a word.
        fn implied_dependencies(
            &self,
            tool: &str,
            inputs: &Value,
            task_ids: &[&str],
        ) -> Vec<String> {
            let query = inputs.get("query").and_then(Value::as_str).unwrap_or("");
            if tool != "sql" {
                return Vec::new();
            }
            task_ids
                .iter()
                .filter(|id| {
                    query
                        .split(|c: char| !c.is_alphanumeric() && c != '_')
                        .any(|w| w == **id)
                })
                .map(|id| (*id).to_owned())
                .collect()
        }
    }

    #[test]
    fn dependencies_implied_by_a_tool_become_explicit_and_can_close_a_cycle() {
        let yaml = "name: p\ntasks:\n  - id: load\n    tool: sql\n    with: {query: SELECT 1}\n  - id: clean\n    tool: sql\n    with: {query: SELECT * FROM load}\n";
        let pipeline = validate("p.yaml", yaml, &catalog()).unwrap();
        let clean = pipeline.def.task("clean").unwrap();
        assert_eq!(clean.depends_on, [TaskId::parse("load").unwrap()]);
        assert_eq!(
            pipeline.dag.dependents(&TaskId::parse("load").unwrap()),
            [TaskId::parse("clean").unwrap()]
        );

        let cyclic = "name: p\ntasks:\n  - id: a\n    tool: sql\n    with: {query: SELECT * FROM b}\n  - id: b\n    tool: sql\n    with: {query: SELECT * FROM a}\n";
        let diagnostics = validate("p.yaml", cyclic, &catalog()).unwrap_err();
        assert!(
            diagnostics
                .iter()
                .any(|d| d.code == "cycle" && d.message.contains("a -> b -> a")),
            "{diagnostics:?}"
        );
    }

    fn catalog() -> Catalog {
        Catalog(BTreeMap::from([
            (
                "sql".to_owned(),
                json!({
                    "type": "object",
                    "properties": {"query": {"type": "string"}, "limit": {"type": "integer", "minimum": 1}},
                    "required": ["query"],
                    "additionalProperties": false
                }),
            ),
            (
                "http".to_owned(),
                json!({"type": "object", "properties": {"url": {"type": "string"}}, "required": ["url"]}),
            ),
            ("shell".to_owned(), json!({"type": "object"})),
        ]))
    }

    fn problems(text: &str) -> Vec<Diagnostic> {
        validate("p.yaml", text, &catalog()).unwrap_err()
    }

    fn summary(diagnostics: &[Diagnostic]) -> Vec<(&'static str, Option<u32>, Option<u32>, &str)> {
        diagnostics
            .iter()
            .map(|d| (d.code, d.line, d.column, d.pointer.as_str()))
            .collect()
    }

    #[test]
    fn a_valid_pipeline_builds_its_dag_with_template_dependencies() {
        let text = "\
name: penguins
params:
  year: {type: integer, default: 2008}
tasks:
  - id: load
    tool: sql
    with: {query: 'select * from penguins where year = {{ params.year }}'}
  - id: species
    tool: http
    for_each: '{{ tasks.load.outputs.species }}'
    with: {url: 'https://example.org/{{ item }}?n={{ index }}'}
  - id: report
    tool: shell
    if: tasks.species.state == 'succeeded' and run.id
";
        let pipeline = validate("p.yaml", text, &catalog()).unwrap();
        let order: Vec<&str> = pipeline
            .dag
            .topological_order()
            .iter()
            .map(TaskId::as_str)
            .collect();
        assert_eq!(order, ["load", "species", "report"]);
    }

    #[test]
    fn every_problem_is_reported_at_once_with_line_and_column() {
        let text = "\
name: p
params:
  year: {type: integer, default: 'twenty'}
tasks:
  - id: load
    tool: sqll
  - id: load
    tool: sql
    with:
      query: '{{ params.yaer }}'
      limit: 0
  - id: c
    tool: http
    depends_on: [lod, c]
    depends-on: [load]
    with: {url: '{{ tasks.nope.outputs }}'}
    timeout: 0s
    retry: {max_attempts: 0}
  - id: d
    tool: shell
    for_each: 3
    if: '{{ item > 1 }}'
";
        let found = problems(text);
        assert_eq!(
            summary(&found),
            [
                ("param_type", Some(3), Some(34), "/params/year/default"),
                ("unknown_tool", Some(6), Some(11), "/tasks/0/tool"),
                ("duplicate_task_id", Some(7), Some(9), "/tasks/1/id"),
                (
                    "unknown_reference",
                    Some(10),
                    Some(14),
                    "/tasks/1/with/query"
                ),
                ("input_schema", Some(11), Some(14), "/tasks/1/with/limit"),
                (
                    "unknown_dependency",
                    Some(14),
                    Some(18),
                    "/tasks/2/depends_on/0"
                ),
                (
                    "self_dependency",
                    Some(14),
                    Some(23),
                    "/tasks/2/depends_on/1"
                ),
                ("unknown_field", Some(15), Some(5), "/tasks/2/depends-on"),
                ("unknown_reference", Some(16), Some(17), "/tasks/2/with/url"),
                ("invalid_timeout", Some(17), Some(14), "/tasks/2/timeout"),
                (
                    "invalid_retry",
                    Some(18),
                    Some(27),
                    "/tasks/2/retry/max_attempts"
                ),
                ("for_each_type", Some(21), Some(15), "/tasks/3/for_each"),
                ("unknown_reference", Some(22), Some(9), "/tasks/3/if"),
            ]
        );
        let hint = |code: &str, pointer: &str| {
            found
                .iter()
                .find(|d| d.code == code && d.pointer == pointer)
                .and_then(|d| d.hint.clone())
                .unwrap()
        };
        assert_eq!(hint("unknown_tool", "/tasks/0/tool"), "did you mean `sql`?");
        assert_eq!(
            hint("unknown_dependency", "/tasks/2/depends_on/0"),
            "did you mean `load`?"
        );
        assert_eq!(
            hint("unknown_reference", "/tasks/1/with/query"),
            "did you mean `params.year`?"
        );
        assert!(found[2].message.contains("line 5"), "{}", found[2].message);
    }

    #[test]
    fn a_compensation_is_read_and_may_read_its_task_and_the_tasks_it_depends_on() {
        let text = "\
name: p
tasks:
  - id: load
    tool: shell
  - id: reserve
    tool: shell
    with: {seat: 12}
    compensate:
      tool: http
      with: {url: 'https://seats/{{ tasks.reserve.outputs.seat }}?from={{ tasks.load.outputs }}'}
      retry: {max_attempts: 3}
      timeout: 10s
";
        let pipeline = validate("p.yaml", text, &catalog()).unwrap();
        let reserve = pipeline.def.task("reserve").unwrap();
        let compensate = reserve.compensate.as_ref().unwrap();
        assert_eq!(compensate.tool, "http");
        assert_eq!(compensate.retry.as_ref().unwrap().max_attempts, 3);
        assert_eq!(compensate.timeout, Some(std::time::Duration::from_secs(10)));
        // A task its compensation reads is a dependency of the task.
        assert_eq!(
            pipeline
                .dag
                .dependencies(&reserve.id)
                .map(TaskId::as_str)
                .collect::<Vec<_>>(),
            ["load"]
        );
        assert_eq!(
            pipeline
                .def
                .compensated_task("reserve__compensate")
                .map(|t| t.id.as_str()),
            Some("reserve")
        );
        assert!(pipeline.def.compensated_task("load__compensate").is_none());
        assert!(pipeline.def.compensated_task("reserve").is_none());
        // The definition round-trips through its stored JSON.
        let stored = serde_json::to_value(&*pipeline.def).unwrap();
        assert_eq!(stored["tasks"][1]["compensate"]["tool"], "http");
        assert_eq!(stored["tasks"][1]["compensate"]["timeout"], "10s");
        let back: PipelineDef = serde_json::from_value(stored).unwrap();
        assert_eq!(back, *pipeline.def);
    }

    #[test]
    fn compensations_are_checked_like_tasks_with_positions() {
        let text = "\
name: p
tasks:
  - id: reserve
    tool: shell
    compensate:
      tool: shel
      with: {x: '{{ tasks.reserve.outputs.seat }}'}
  - id: charge
    tool: shell
    depends_on: [reserve]
    compensate:
      tool: http
      with:
        url: 42
        extra: '{{ tasks.nope.outputs }}'
      timeout: 0s
  - id: fan
    tool: shell
    for_each: [1, 2]
    compensate: {tool: shell, retries: 2}
  - id: charge__compensate
    tool: shell
";
        let found = problems(text);
        assert_eq!(
            summary(&found),
            [
                (
                    "unknown_tool",
                    Some(6),
                    Some(13),
                    "/tasks/0/compensate/tool"
                ),
                ("compensation_id", Some(8), Some(9), "/tasks/1/id"),
                (
                    "input_schema",
                    Some(14),
                    Some(14),
                    "/tasks/1/compensate/with/url"
                ),
                (
                    "unknown_reference",
                    Some(15),
                    Some(16),
                    "/tasks/1/compensate/with/extra"
                ),
                (
                    "invalid_timeout",
                    Some(16),
                    Some(16),
                    "/tasks/1/compensate/timeout"
                ),
                (
                    "unknown_field",
                    Some(20),
                    Some(31),
                    "/tasks/2/compensate/retries"
                ),
            ]
        );
        assert_eq!(found[0].hint.as_deref(), Some("did you mean `shell`?"));
        assert_eq!(
            found[1].message,
            "task id `charge__compensate` is reserved for the compensation of task `charge`"
        );
        assert_eq!(
            found[2].message,
            "input `url` of tool `http`: 42 is not of type \"string\""
        );
        assert_eq!(found[3].message, "`tasks.nope` names no task");
    }

    /// `shell` runs in a process, `wasm` in WebAssembly, `noop` in neither.
    struct SandboxCatalog;

    impl ToolCatalog for SandboxCatalog {
        fn input_schema(&self, tool: &str) -> Option<Value> {
            ["shell", "wasm", "noop"]
                .contains(&tool)
                .then(|| json!({"type": "object"}))
        }
        fn tool_names(&self) -> Vec<String> {
            vec!["noop".into(), "shell".into(), "wasm".into()]
        }
        fn sandboxes(&self, tool: &str) -> Vec<crate::tooldef::Sandbox> {
            match tool {
                "shell" => vec![crate::tooldef::Sandbox::Process],
                "wasm" => vec![crate::tooldef::Sandbox::Wasm],
                _ => Vec::new(),
            }
        }
    }

    #[test]
    fn a_sandbox_the_tool_does_not_offer_is_refused_with_its_position() {
        let text = "\
name: p
tasks:
  - id: script
    tool: shell
    with: {command: \"true\"}
    sandbox: wasm
  - id: module
    tool: wasm
    with: {module: m.wat}
    sandbox: wasm
  - id: anything
    tool: noop
    sandbox: auto
";
        let catalog = SandboxCatalog;
        let found = validate("p.yaml", text, &catalog).unwrap_err();
        assert_eq!(
            summary(&found),
            [("sandbox_unavailable", Some(6), Some(14), "/tasks/0/sandbox")]
        );
        assert!(
            found[0]
                .message
                .contains("runs only in the process sandbox"),
            "{}",
            found[0].message
        );
        let bad = validate(
            "p.yaml",
            "name: p\ntasks:\n  - id: a\n    tool: noop\n    sandbox: vm\n",
            &catalog,
        )
        .unwrap_err();
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert!(bad[0].message.contains("vm"), "{}", bad[0].message);
    }

    #[test]
    fn a_fan_out_cannot_be_compensated() {
        let text = "\
name: p
tasks:
  - id: fan
    tool: shell
    for_each: [1, 2]
    compensate: {tool: shell}
";
        let found = problems(text);
        assert_eq!(
            summary(&found),
            [(
                "compensate_fan_out",
                Some(6),
                Some(18),
                "/tasks/0/compensate"
            )]
        );
        assert!(
            found[0].message.contains("fans out"),
            "{}",
            found[0].message
        );
        let rendered = found[0].to_string();
        assert!(
            rendered.starts_with("p.yaml:6:18: error[compensate_fan_out]"),
            "{rendered}"
        );
    }

    #[test]
    fn a_cycle_is_reported_with_the_tasks_on_it() {
        let text = "\
name: p
tasks:
  - id: a
    tool: shell
    depends_on: [c]
  - id: b
    tool: shell
    with: {x: '{{ tasks.a.outputs }}'}
  - id: c
    tool: shell
    depends_on: [b]
  - id: d
    tool: shell
";
        let found = problems(text);
        assert_eq!(
            summary(&found),
            [("cycle", Some(5), Some(18), "/tasks/0/depends_on/0")]
        );
        assert_eq!(found[0].message, "dependency cycle: a -> b -> c -> a");
    }

    #[test]
    fn a_cycle_through_a_template_points_at_the_template() {
        let text = "\
name: p
tasks:
  - id: a
    tool: shell
    with: {x: '{{ tasks.b.outputs }}'}
  - id: b
    tool: shell
    depends_on: [a]
";
        let found = problems(text);
        assert_eq!(
            summary(&found),
            [("cycle", Some(5), Some(15), "/tasks/0/with/x")]
        );
        assert_eq!(found[0].message, "dependency cycle: a -> b -> a");
    }

    #[test]
    fn a_schema_error_names_the_offending_field_and_templates_are_left_to_the_run() {
        let text = "\
name: p
params:
  n: {type: integer, default: 5}
tasks:
  - id: load
    tool: sql
    with:
      limit: '{{ params.n }}'
      extra: 1
  - id: fetch
    tool: http
    with: {url: 42}
";
        let found = problems(text);
        assert_eq!(
            summary(&found),
            [
                ("input_schema", Some(7), Some(5), "/tasks/0/with"),
                ("input_schema", Some(9), Some(7), "/tasks/0/with/extra"),
                ("input_schema", Some(12), Some(17), "/tasks/1/with/url"),
            ]
        );
        assert_eq!(found[0].message, "tool `sql` needs input `query`");
        assert_eq!(
            found[0].hint.as_deref(),
            Some("tool `sql` takes `limit`, `query` (required)")
        );
        assert_eq!(found[1].message, "tool `sql` takes no input `extra`");
        assert_eq!(
            found[2].message,
            "input `url` of tool `http`: 42 is not of type \"string\""
        );
    }

    #[test]
    fn param_defaults_of_the_wrong_type_are_reported() {
        let text = "\
name: p
params:
  year: {type: integer, default: 2008.5}
  tags: {type: array, default: [a]}
  flag: {type: boolean, default: 'yes'}
tasks:
  - id: a
    tool: shell
";
        let found = problems(text);
        assert_eq!(
            summary(&found),
            [
                ("param_type", Some(3), Some(34), "/params/year/default"),
                ("param_type", Some(5), Some(34), "/params/flag/default"),
            ]
        );
        assert_eq!(
            found[1].message,
            "the default of param `flag` is a string (\"yes\"), but the param is declared boolean"
        );
    }

    #[test]
    fn template_syntax_errors_and_wrong_names_are_reported() {
        let text = "\
name: p
tasks:
  - id: a
    tool: shell
    with: {x: '{{ params.year ', y: '{{ tasks.a.outputs }}', z: '{{ tasks.b.output }}', w: '{{ foo }}'}
  - id: b
    tool: shell
    for_each: [1, 2]
    with: {x: '{{ item }} {{ run.nope }} {{ range(3) | list }}'}
";
        let found = problems(text);
        let codes: Vec<(&str, &str)> = found.iter().map(|d| (d.code, d.pointer.as_str())).collect();
        assert_eq!(
            codes,
            [
                ("template_syntax", "/tasks/0/with/x"),
                ("self_dependency", "/tasks/0/with/y"),
                ("unknown_reference", "/tasks/0/with/z"),
                ("unknown_reference", "/tasks/0/with/w"),
                ("unknown_reference", "/tasks/1/with/x"),
            ]
        );
        assert_eq!(
            found[2].hint.as_deref(),
            Some("did you mean `tasks.b.outputs`?")
        );
        assert_eq!(found[4].message, "`run.nope` does not exist");
    }

    #[test]
    fn an_empty_pipeline_is_reported() {
        assert_eq!(
            summary(&problems("name: p\ntasks: []\n")),
            [("empty_pipeline", Some(2), Some(8), "/tasks")]
        );
    }

    #[test]
    fn a_document_without_tasks_is_reported_once() {
        let found = problems("name: p\n");
        assert_eq!(summary(&found), [("missing_field", Some(1), Some(1), "")]);
        assert_eq!(found[0].message, "a pipeline needs a `tasks` field");
    }

    #[test]
    fn a_number_where_text_is_expected_suggests_quoting() {
        let found = problems("name: p\ntasks:\n  - id: a\n    tool: shell\n    description: 12\n");
        assert_eq!(
            summary(&found),
            [("invalid_type", Some(5), Some(18), "/tasks/0/description")]
        );
        assert_eq!(
            found[0].hint.as_deref(),
            Some("quote the value (`'...'`) to keep it text")
        );
    }

    #[test]
    fn malformed_text_gives_the_single_parse_error() {
        let found = problems("name: p\ntasks: [\n");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].code, "malformed_yaml");
    }

    #[test]
    fn a_definition_without_a_source_map_is_checked_with_pointers_only() {
        let def: PipelineDef = serde_json::from_value(json!({
            "name": "p",
            "tasks": [{"id": "a", "tool": "nope"}]
        }))
        .unwrap();
        let found = validate_def(&def, None, "api", &catalog());
        assert_eq!(
            summary(&found),
            [("unknown_tool", None, None, "/tasks/0/tool")]
        );
        assert_eq!(
            found[0].hint.as_deref(),
            Some("known tools: `http`, `shell`, `sql`")
        );
    }

    #[test]
    fn params_are_checked_and_defaults_applied() {
        let def: PipelineDef = serde_json::from_value(json!({
            "name": "p",
            "params": {
                "year": {"type": "integer", "default": 2008},
                "name": {"type": "string"},
                "limit": {"type": "number"}
            },
            "tasks": [{"id": "a", "tool": "shell"}]
        }))
        .unwrap();
        let given = json!({"name": "adelie", "limit": 2.5})
            .as_object()
            .cloned()
            .unwrap();
        assert_eq!(
            check_params(&def, &given).unwrap(),
            json!({"year": 2008, "name": "adelie", "limit": 2.5})
        );

        let given = json!({"yaer": 2009, "year": "2009"})
            .as_object()
            .cloned()
            .unwrap();
        let problems = check_params(&def, &given).unwrap_err();
        assert_eq!(
            problems,
            [
                "unknown param `yaer`; did you mean `year`?",
                "param `limit` is required (number) and was not given",
                "param `name` is required (string) and was not given",
                "param `year` must be an integer, got a string (\"2009\")",
            ]
        );
    }
}

/// Most schema violations one [`InputSchemas::check`] message lists.
const RENDERED_INPUT_ERRORS_MAX: usize = 5;

/// The compiled input schemas of a set of tools, to check a task's inputs again once its
/// templates are rendered, just before the tool runs (validation skips template strings,
/// whose values are only known then).
#[derive(Default)]
pub struct InputSchemas {
    validators: HashMap<String, Result<jsonschema::Validator, String>>,
}

impl std::fmt::Debug for InputSchemas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InputSchemas")
            .field("tools", &self.validators.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl InputSchemas {
    /// Compiles the input schema of every tool in `catalog`.
    pub fn compile(catalog: &dyn ToolCatalog) -> Self {
        let validators = catalog
            .tool_names()
            .into_iter()
            .filter_map(|name| {
                let schema = catalog.input_schema(&name)?;
                let validator = jsonschema::validator_for(&schema).map_err(|e| e.to_string());
                Some((name, validator))
            })
            .collect();
        Self { validators }
    }

    /// Checks rendered `inputs` against the schema of `tool`.
    ///
    /// # Errors
    /// One line naming each violated field as a JSON pointer under `with` (at most
    /// [`RENDERED_INPUT_ERRORS_MAX`], then how many more), or that the tool's schema does not
    /// compile. A tool without a schema here passes.
    pub fn check(&self, tool: &str, inputs: &Value) -> Result<(), String> {
        let Some(validator) = self.validators.get(tool) else {
            return Ok(());
        };
        let validator = validator.as_ref().map_err(|message| {
            format!("the input schema of tool `{tool}` does not compile: {message}")
        })?;
        schema_violations(validator, inputs, "/with").map_err(|problems| {
            format!("rendered inputs of tool `{tool}` break its schema: {problems}")
        })
    }
}

/// Checks `value` against a compiled schema.
///
/// # Errors
/// One line naming each violated field as a JSON pointer under `prefix` (for example
/// `/with/ms: "soon" is not of type "integer"`), at most [`RENDERED_INPUT_ERRORS_MAX`]
/// of them separated by `; `, then how many more.
pub fn schema_violations(
    validator: &jsonschema::Validator,
    value: &Value,
    prefix: &str,
) -> Result<(), String> {
    let mut problems = Vec::new();
    let mut more = 0usize;
    for error in validator.iter_errors(value) {
        if problems.len() == RENDERED_INPUT_ERRORS_MAX {
            more += 1;
            continue;
        }
        problems.push(format!(
            "{prefix}{}: {error}",
            error.instance_path().as_str()
        ));
    }
    if problems.is_empty() {
        return Ok(());
    }
    let mut message = problems.join("; ");
    if more > 0 {
        message.push_str(&format!(" (and {more} more)"));
    }
    Err(message)
}
