//! Templates in task inputs, conditions and fan-out lists, on minijinja.
//!
//! A string that is exactly one expression, `"{{ tasks.load.outputs.rows }}"`, yields the
//! expression's native JSON value (a number, a list…); any other string containing `{{` or
//! `{%` renders to a string. Undefined names are errors (strict mode), so a typo fails the
//! task with the name instead of rendering an empty string.
//!
//! The context is `params`, `tasks.<id>.outputs`, `item` and `index` (fan-out items) and
//! `run.id`.

use std::collections::BTreeSet;

use minijinja::{Environment, UndefinedBehavior};
use serde_json::Value;

/// Errors of rendering.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{message}")]
pub struct TemplateError {
    /// What failed, with the template text.
    pub message: String,
}

impl TemplateError {
    fn new(text: &str, err: minijinja::Error) -> Self {
        let mut message = format!("template {text:?}: {}", err.kind());
        if let Some(detail) = err.detail() {
            message.push_str(": ");
            message.push_str(detail);
        }
        Self { message }
    }
}

/// A template engine configured the Arches way. Cheap to share behind an `Arc`.
pub struct Templates {
    env: Environment<'static>,
}

impl Default for Templates {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Templates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Templates")
    }
}

/// Whether a string holds template syntax.
pub fn is_template(text: &str) -> bool {
    text.contains("{{") || text.contains("{%")
}

/// Whether any string inside `value` holds template syntax.
pub fn has_templates(value: &Value) -> bool {
    match value {
        Value::String(text) => is_template(text),
        Value::Array(items) => items.iter().any(has_templates),
        Value::Object(map) => map.values().any(has_templates),
        _ => false,
    }
}

/// The expression of a string that is exactly `{{ expr }}`.
fn whole_expression(text: &str) -> Option<&str> {
    let inner = text.trim().strip_prefix("{{")?.strip_suffix("}}")?;
    if inner.contains("{{") || inner.contains("}}") || inner.contains("{%") {
        None
    } else {
        Some(inner.trim())
    }
}

/// The expression of a condition, with or without `{{ }}`.
fn condition_expression(text: &str) -> &str {
    whole_expression(text).unwrap_or(text.trim())
}

impl Templates {
    /// A strict environment with minijinja's built-in filters and tests.
    pub fn new() -> Self {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        Self { env }
    }

    /// Renders every string inside `value` against `context`.
    ///
    /// # Errors
    /// [`TemplateError`] naming the template that failed.
    pub fn render_value(
        &self,
        value: &Value,
        context: &minijinja::Value,
    ) -> Result<Value, TemplateError> {
        match value {
            Value::String(text) if is_template(text) => self.render_string(text, context),
            Value::Array(items) => items
                .iter()
                .map(|v| self.render_value(v, context))
                .collect::<Result<_, _>>()
                .map(Value::Array),
            Value::Object(map) => map
                .iter()
                .map(|(k, v)| Ok((k.clone(), self.render_value(v, context)?)))
                .collect::<Result<serde_json::Map<_, _>, _>>()
                .map(Value::Object),
            other => Ok(other.clone()),
        }
    }

    fn render_string(
        &self,
        text: &str,
        context: &minijinja::Value,
    ) -> Result<Value, TemplateError> {
        if let Some(expr) = whole_expression(text) {
            let compiled = self
                .env
                .compile_expression(expr)
                .map_err(|e| TemplateError::new(text, e))?;
            let out = compiled
                .eval(context)
                .map_err(|e| TemplateError::new(text, e))?;
            if out.is_undefined() {
                return Err(TemplateError {
                    message: format!("template {text:?} is undefined"),
                });
            }
            return serde_json::to_value(&out).map_err(|e| TemplateError {
                message: format!("template {text:?}: {e}"),
            });
        }
        self.env
            .render_str(text, context)
            .map(Value::String)
            .map_err(|e| TemplateError::new(text, e))
    }

    /// Evaluates a condition (with or without `{{ }}`) to its truth value.
    ///
    /// # Errors
    /// [`TemplateError`] when the expression does not compile or evaluate.
    pub fn condition(&self, text: &str, context: &minijinja::Value) -> Result<bool, TemplateError> {
        let compiled = self
            .env
            .compile_expression(condition_expression(text))
            .map_err(|e| TemplateError::new(text, e))?;
        compiled
            .eval(context)
            .map(|v| v.is_true())
            .map_err(|e| TemplateError::new(text, e))
    }

    /// Checks that a template or condition compiles.
    ///
    /// # Errors
    /// [`TemplateError`] with minijinja's syntax error.
    pub fn check_syntax(&self, text: &str, is_condition: bool) -> Result<(), TemplateError> {
        if is_condition {
            self.env
                .compile_expression(condition_expression(text))
                .map(|_| ())
                .map_err(|e| TemplateError::new(text, e))
        } else {
            self.env
                .template_from_str(text)
                .map(|_| ())
                .map_err(|e| TemplateError::new(text, e))
        }
    }

    /// The dotted names a template or condition reads, for example `tasks.load.outputs`
    /// and `params.year`.
    ///
    /// # Errors
    /// [`TemplateError`] with minijinja's syntax error.
    pub fn references(
        &self,
        text: &str,
        is_condition: bool,
    ) -> Result<BTreeSet<String>, TemplateError> {
        let names = if is_condition {
            self.env
                .compile_expression(condition_expression(text))
                .map_err(|e| TemplateError::new(text, e))?
                .undeclared_variables(true)
        } else {
            self.env
                .template_from_str(text)
                .map_err(|e| TemplateError::new(text, e))?
                .undeclared_variables(true)
        };
        Ok(names.into_iter().collect())
    }
}

/// The task ids a set of dotted references reads through `tasks.<id>`.
pub fn referenced_tasks(references: &BTreeSet<String>) -> BTreeSet<String> {
    references
        .iter()
        .filter_map(|r| r.strip_prefix("tasks."))
        .map(|rest| rest.split('.').next().unwrap_or(rest).to_owned())
        .collect()
}

/// Every string in `value` that holds template syntax.
pub fn template_strings(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(text) if is_template(text) => out.push(text.clone()),
        Value::Array(items) => items.iter().for_each(|v| template_strings(v, out)),
        Value::Object(map) => map.values().for_each(|v| template_strings(v, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx() -> minijinja::Value {
        minijinja::Value::from_serialize(json!({
            "params": {"year": 2008, "name": "adelie"},
            "tasks": {"load": {"outputs": {"rows": 344, "species": ["Adelie", "Gentoo"]}}},
        }))
    }

    #[test]
    fn a_whole_expression_keeps_its_json_type() {
        let t = Templates::new();
        assert_eq!(
            t.render_value(&json!("{{ tasks.load.outputs.rows }}"), &ctx())
                .unwrap(),
            json!(344)
        );
        assert_eq!(
            t.render_value(&json!("{{ tasks.load.outputs.species }}"), &ctx())
                .unwrap(),
            json!(["Adelie", "Gentoo"])
        );
    }

    #[test]
    fn mixed_text_renders_to_a_string() {
        let t = Templates::new();
        let out = t
            .render_value(&json!({"q": "year = {{ params.year }}", "n": 3}), &ctx())
            .unwrap();
        assert_eq!(out, json!({"q": "year = 2008", "n": 3}));
    }

    #[test]
    fn an_undefined_name_is_an_error_that_names_the_template() {
        let t = Templates::new();
        let err = t
            .render_value(&json!("{{ tasks.nope.outputs }}"), &ctx())
            .unwrap_err();
        assert!(
            err.message.contains("tasks.nope.outputs"),
            "{}",
            err.message
        );
    }

    #[test]
    fn conditions_work_with_and_without_braces() {
        let t = Templates::new();
        assert!(t.condition("params.year > 2007", &ctx()).unwrap());
        assert!(!t.condition("{{ params.year > 2009 }}", &ctx()).unwrap());
    }

    #[test]
    fn references_name_the_upstream_tasks() {
        let t = Templates::new();
        let refs = t
            .references("{{ tasks.load.outputs.rows }} and {{ params.year }}", false)
            .unwrap();
        assert_eq!(
            referenced_tasks(&refs),
            ["load".to_owned()].into_iter().collect()
        );
    }
}
