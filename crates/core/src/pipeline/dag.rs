//! The DAG of a pipeline: dependencies, dependents and a topological order.
//!
//! The order is Kahn's algorithm (A. B. Kahn, "Topological sorting of large networks",
//! CACM 5(11), 1962) with ties broken by the order tasks are written, so it is stable.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::ids::TaskId;

/// A directed acyclic graph of tasks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dag {
    order: Vec<TaskId>,
    dependencies: BTreeMap<TaskId, BTreeSet<TaskId>>,
    dependents: BTreeMap<TaskId, Vec<TaskId>>,
}

/// Errors of DAG construction.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DagError {
    /// The tasks form a cycle; the tasks on it in order, the first repeated at the end.
    #[error("dependency cycle: {}", .0.iter().map(TaskId::as_str).collect::<Vec<_>>().join(" -> "))]
    Cycle(Vec<TaskId>),
    /// A dependency names no task.
    #[error("task {task} depends on unknown task {dependency}")]
    UnknownDependency {
        /// The task.
        task: TaskId,
        /// The missing dependency.
        dependency: TaskId,
    },
}

impl Dag {
    /// Builds the DAG from tasks in written order, each with its dependencies.
    ///
    /// # Errors
    /// [`DagError::UnknownDependency`] or [`DagError::Cycle`] (one cycle, named in order).
    pub fn build(tasks: &[(TaskId, BTreeSet<TaskId>)]) -> Result<Dag, DagError> {
        let position: BTreeMap<&TaskId, usize> = tasks
            .iter()
            .enumerate()
            .map(|(i, (id, _))| (id, i))
            .collect();
        let mut dependents: BTreeMap<TaskId, Vec<TaskId>> = tasks
            .iter()
            .map(|(id, _)| (id.clone(), Vec::new()))
            .collect();
        for (id, deps) in tasks {
            for dep in deps {
                match dependents.get_mut(dep) {
                    Some(list) => list.push(id.clone()),
                    None => {
                        return Err(DagError::UnknownDependency {
                            task: id.clone(),
                            dependency: dep.clone(),
                        })
                    }
                }
            }
        }
        let mut indegree: Vec<usize> = tasks.iter().map(|(_, deps)| deps.len()).collect();
        let mut ready: VecDeque<usize> = (0..tasks.len()).filter(|i| indegree[*i] == 0).collect();
        let mut order = Vec::with_capacity(tasks.len());
        while let Some(i) = ready.pop_front() {
            let id = &tasks[i].0;
            order.push(id.clone());
            let mut next: Vec<usize> = dependents[id].iter().map(|d| position[d]).collect();
            next.sort_unstable();
            for j in next {
                indegree[j] -= 1;
                if indegree[j] == 0 {
                    ready.push_back(j);
                }
            }
        }
        if order.len() < tasks.len() {
            let remaining: BTreeSet<&TaskId> = tasks
                .iter()
                .enumerate()
                .filter(|(i, _)| indegree[*i] > 0)
                .map(|(_, (id, _))| id)
                .collect();
            return Err(DagError::Cycle(find_cycle(tasks, &remaining)));
        }
        Ok(Dag {
            order,
            dependencies: tasks.iter().cloned().collect(),
            dependents,
        })
    }

    /// Task ids in a topological order (dependencies first), stable by written order.
    pub fn topological_order(&self) -> &[TaskId] {
        &self.order
    }

    /// The direct dependencies of a task.
    pub fn dependencies(&self, id: &TaskId) -> impl Iterator<Item = &TaskId> {
        self.dependencies.get(id).into_iter().flatten()
    }

    /// The tasks that depend directly on a task.
    pub fn dependents(&self, id: &TaskId) -> &[TaskId] {
        self.dependents.get(id).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Number of tasks.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether there are no tasks.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// Walks dependencies from the first task left with unmet dependencies until a task repeats.
fn find_cycle(tasks: &[(TaskId, BTreeSet<TaskId>)], remaining: &BTreeSet<&TaskId>) -> Vec<TaskId> {
    let deps: BTreeMap<&TaskId, &BTreeSet<TaskId>> = tasks.iter().map(|(id, d)| (id, d)).collect();
    let start = tasks
        .iter()
        .map(|(id, _)| id)
        .find(|id| remaining.contains(id));
    let Some(mut current) = start else {
        return Vec::new();
    };
    let mut path: Vec<&TaskId> = Vec::new();
    loop {
        if let Some(at) = path.iter().position(|id| *id == current) {
            let mut cycle: Vec<TaskId> = path[at..].iter().map(|id| (*id).clone()).collect();
            cycle.reverse();
            // Start at the task written first, so the message is stable.
            let first = (0..cycle.len())
                .min_by_key(|i| tasks.iter().position(|(id, _)| *id == cycle[*i]))
                .unwrap_or(0);
            cycle.rotate_left(first);
            cycle.push(cycle[0].clone());
            return cycle;
        }
        path.push(current);
        match deps[current].iter().find(|d| remaining.contains(d)) {
            Some(next) => current = next,
            None => return path.iter().map(|id| (*id).clone()).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(id: &str) -> TaskId {
        TaskId::parse(id).unwrap()
    }

    fn tasks(spec: &[(&str, &[&str])]) -> Vec<(TaskId, BTreeSet<TaskId>)> {
        spec.iter()
            .map(|(id, deps)| (t(id), deps.iter().map(|d| t(d)).collect()))
            .collect()
    }

    #[test]
    fn the_order_puts_dependencies_first_and_keeps_written_order() {
        let dag = Dag::build(&tasks(&[
            ("c", &["a"]),
            ("a", &[]),
            ("b", &[]),
            ("d", &["c", "b"]),
        ]))
        .unwrap();
        let order: Vec<&str> = dag.topological_order().iter().map(TaskId::as_str).collect();
        assert_eq!(order, ["a", "b", "c", "d"]);
        assert_eq!(dag.dependents(&t("a")), &[t("c")]);
    }

    #[test]
    fn a_cycle_is_named_in_order() {
        let err = Dag::build(&tasks(&[
            ("a", &["c"]),
            ("b", &["a"]),
            ("c", &["b"]),
            ("d", &[]),
        ]))
        .unwrap_err();
        assert_eq!(err.to_string(), "dependency cycle: a -> b -> c -> a");
    }

    #[test]
    fn an_unknown_dependency_is_refused() {
        let err = Dag::build(&tasks(&[("a", &["zz"])])).unwrap_err();
        assert!(matches!(err, DagError::UnknownDependency { .. }));
    }
}
