//! Drawing a pipeline's DAG as text, Graphviz DOT or Mermaid, so a user sees the graph before
//! it runs.
//!
//! Every format lists tasks in the DAG's topological order (stable by written order) and
//! edges from a dependency to its dependent, so the output is deterministic and diffable.
//! Rendering never fails and never looks at tools or data.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use super::{Pipeline, TaskDef};
use crate::ids::TaskId;

/// An output format of [`render`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GraphFormat {
    /// Tasks grouped by depth level, one line each: `id (tool) <- dependencies [for_each] [if]`.
    Text,
    /// A Graphviz `digraph`.
    Dot,
    /// A Mermaid `flowchart TD`.
    Mermaid,
}

/// A graph format name that is not `text`, `dot` or `mermaid`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown graph format {0:?}: use text, dot or mermaid")]
pub struct UnknownGraphFormat(pub String);

impl FromStr for GraphFormat {
    type Err = UnknownGraphFormat;

    fn from_str(text: &str) -> Result<Self, UnknownGraphFormat> {
        match text.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(GraphFormat::Text),
            "dot" => Ok(GraphFormat::Dot),
            "mermaid" => Ok(GraphFormat::Mermaid),
            _ => Err(UnknownGraphFormat(text.to_owned())),
        }
    }
}

impl fmt::Display for GraphFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GraphFormat::Text => "text",
            GraphFormat::Dot => "dot",
            GraphFormat::Mermaid => "mermaid",
        })
    }
}

/// Renders the pipeline's DAG in `format`. The output ends with a newline.
pub fn render(pipeline: &Pipeline, format: GraphFormat) -> String {
    let graph = Graph::new(pipeline);
    match format {
        GraphFormat::Text => graph.text(),
        GraphFormat::Dot => graph.dot(),
        GraphFormat::Mermaid => graph.mermaid(),
    }
}

/// The facts every format draws from.
struct Graph<'a> {
    pipeline: &'a Pipeline,
    /// Tasks in topological order, with their definitions.
    tasks: Vec<&'a TaskDef>,
    /// Dependencies of each task, in the order the tasks are written.
    dependencies: BTreeMap<&'a TaskId, Vec<&'a TaskId>>,
}

impl<'a> Graph<'a> {
    fn new(pipeline: &'a Pipeline) -> Self {
        let written: BTreeMap<&TaskId, usize> = pipeline
            .def
            .tasks
            .iter()
            .enumerate()
            .map(|(i, t)| (&t.id, i))
            .collect();
        let tasks: Vec<&TaskDef> = pipeline
            .dag
            .topological_order()
            .iter()
            .filter_map(|id| pipeline.task(id))
            .collect();
        let dependencies = tasks
            .iter()
            .map(|task| {
                let mut deps: Vec<&TaskId> = pipeline.dag.dependencies(&task.id).collect();
                deps.sort_by_key(|d| written.get(d).copied().unwrap_or(usize::MAX));
                (&task.id, deps)
            })
            .collect();
        Self {
            pipeline,
            tasks,
            dependencies,
        }
    }

    fn dependencies(&self, id: &TaskId) -> &[&'a TaskId] {
        self.dependencies.get(id).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The depth of each task: 0 without dependencies, else one more than its deepest
    /// dependency. The topological order visits dependencies first.
    fn levels(&self) -> Vec<Vec<&'a TaskDef>> {
        let mut depth: BTreeMap<&TaskId, usize> = BTreeMap::new();
        let mut levels: Vec<Vec<&TaskDef>> = Vec::new();
        for task in &self.tasks {
            let level = self
                .dependencies(&task.id)
                .iter()
                .filter_map(|d| depth.get(d))
                .map(|d| d + 1)
                .max()
                .unwrap_or(0);
            depth.insert(&task.id, level);
            if levels.len() <= level {
                levels.resize_with(level + 1, Vec::new);
            }
            levels[level].push(task);
        }
        levels
    }

    fn marks(task: &TaskDef) -> String {
        let mut out = String::new();
        if task.for_each.is_some() {
            out.push_str(" [for_each]");
        }
        if task.condition.is_some() {
            out.push_str(" [if]");
        }
        out
    }

    fn text(&self) -> String {
        let levels = self.levels();
        let count = |n: usize, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
        let mut out = format!(
            "pipeline {}: {}, {}\n",
            self.pipeline.def.name,
            count(self.tasks.len(), "task"),
            count(levels.len(), "level")
        );
        for (level, tasks) in levels.iter().enumerate() {
            out.push_str(&format!("level {level}\n"));
            for task in tasks {
                out.push_str(&format!("  {} ({})", task.id, task.tool));
                let deps = self.dependencies(&task.id);
                if !deps.is_empty() {
                    let names: Vec<&str> = deps.iter().map(|d| d.as_str()).collect();
                    out.push_str(&format!(" <- {}", names.join(", ")));
                }
                out.push_str(&Self::marks(task));
                out.push('\n');
            }
        }
        out
    }

    fn dot(&self) -> String {
        let mut out = format!(
            "digraph {} {{\n",
            dot_quote(self.pipeline.def.name.as_str())
        );
        out.push_str("  rankdir=TB;\n  node [shape=box];\n");
        for task in &self.tasks {
            let label = format!("{}\n({}){}", task.id, task.tool, Self::marks(task));
            let mut attributes = vec![format!("label={}", dot_quote(&label))];
            if task.for_each.is_some() {
                attributes.push("peripheries=2".to_owned());
            }
            if task.condition.is_some() {
                attributes.push("style=dashed".to_owned());
            }
            out.push_str(&format!(
                "  {} [{}];\n",
                dot_quote(task.id.as_str()),
                attributes.join(", ")
            ));
        }
        for task in &self.tasks {
            for dep in self.dependencies(&task.id) {
                out.push_str(&format!(
                    "  {} -> {};\n",
                    dot_quote(dep.as_str()),
                    dot_quote(task.id.as_str())
                ));
            }
        }
        out.push_str("}\n");
        out
    }

    fn mermaid(&self) -> String {
        let ids = mermaid_ids(self.tasks.iter().map(|t| &t.id));
        let mut out = String::from("flowchart TD\n");
        for task in &self.tasks {
            let label = format!("{} ({}){}", task.id, task.tool, Self::marks(task));
            out.push_str(&format!(
                "  {}[\"{}\"]\n",
                ids[&task.id],
                mermaid_escape(&label)
            ));
        }
        for task in &self.tasks {
            for dep in self.dependencies(&task.id) {
                out.push_str(&format!("  {} --> {}\n", ids[dep], ids[&task.id]));
            }
        }
        out
    }
}

/// A DOT quoted string: `"` and `\` escaped, newlines as DOT's `\n` line break.
fn dot_quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Mermaid's entity codes for the characters that would end or confuse a quoted label.
fn mermaid_escape(text: &str) -> String {
    text.replace('"', "#quot;")
        .replace('<', "#lt;")
        .replace('>', "#gt;")
}

/// Mermaid node ids: letters, digits and `_` only (a `-` could read as part of an arrow), not
/// a keyword such as `end` (which closes a subgraph and breaks the chart), and unique after
/// the replacement; clashes get a numeric suffix.
fn mermaid_ids<'a>(ids: impl Iterator<Item = &'a TaskId>) -> BTreeMap<&'a TaskId, String> {
    const RESERVED: &[&str] = &[
        "end",
        "graph",
        "flowchart",
        "subgraph",
        "style",
        "class",
        "classdef",
        "click",
        "linkstyle",
        "direction",
        "default",
    ];
    let mut used = BTreeSet::new();
    let mut out = BTreeMap::new();
    for id in ids {
        let base: String = id
            .as_str()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let mut candidate = if RESERVED.contains(&base.to_ascii_lowercase().as_str()) {
            format!("{base}_")
        } else {
            base.clone()
        };
        let mut suffix = 2;
        while used.contains(&candidate) {
            candidate = format!("{base}_{suffix}");
            suffix += 1;
        }
        used.insert(candidate.clone());
        out.insert(id, candidate);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::PipelineDef;
    use serde_json::json;

    fn diamond() -> Pipeline {
        let def: PipelineDef = serde_json::from_value(json!({
            "name": "diamond",
            "tasks": [
                {"id": "load", "tool": "sql"},
                {"id": "by-species", "tool": "sql", "for_each": "{{ tasks.load.outputs.species }}"},
                {"id": "end", "tool": "http", "depends_on": ["load"], "if": "params.notify"},
                {"id": "report", "tool": "llm", "depends_on": ["end", "by-species"]}
            ]
        }))
        .unwrap();
        Pipeline::build(def).unwrap()
    }

    #[test]
    fn text_groups_tasks_by_level_with_dependencies_and_marks() {
        assert_eq!(
            render(&diamond(), GraphFormat::Text),
            "\
pipeline diamond: 4 tasks, 3 levels
level 0
  load (sql)
level 1
  by-species (sql) <- load [for_each]
  end (http) <- load [if]
level 2
  report (llm) <- by-species, end
"
        );
    }

    #[test]
    fn dot_is_a_digraph_with_quoted_ids_and_tools_in_labels() {
        assert_eq!(
            render(&diamond(), GraphFormat::Dot),
            r#"digraph "diamond" {
  rankdir=TB;
  node [shape=box];
  "load" [label="load\n(sql)"];
  "by-species" [label="by-species\n(sql) [for_each]", peripheries=2];
  "end" [label="end\n(http) [if]", style=dashed];
  "report" [label="report\n(llm)"];
  "load" -> "by-species";
  "load" -> "end";
  "by-species" -> "report";
  "end" -> "report";
}
"#
        );
    }

    #[test]
    fn mermaid_is_a_flowchart_with_sanitized_ids() {
        assert_eq!(
            render(&diamond(), GraphFormat::Mermaid),
            r#"flowchart TD
  load["load (sql)"]
  by_species["by-species (sql) [for_each]"]
  end_["end (http) [if]"]
  report["report (llm)"]
  load --> by_species
  load --> end_
  by_species --> report
  end_ --> report
"#
        );
    }

    #[test]
    fn mermaid_ids_that_clash_after_sanitizing_get_a_suffix() {
        let a = TaskId::parse("a-b").unwrap();
        let b = TaskId::parse("a_b").unwrap();
        let ids = mermaid_ids([&a, &b].into_iter());
        assert_eq!((ids[&a].as_str(), ids[&b].as_str()), ("a_b", "a_b_2"));
    }

    #[test]
    fn formats_parse_from_their_names() {
        assert_eq!("dot".parse::<GraphFormat>(), Ok(GraphFormat::Dot));
        assert_eq!("Mermaid".parse::<GraphFormat>(), Ok(GraphFormat::Mermaid));
        assert_eq!("text".parse::<GraphFormat>(), Ok(GraphFormat::Text));
        assert!("png".parse::<GraphFormat>().is_err());
    }
}
