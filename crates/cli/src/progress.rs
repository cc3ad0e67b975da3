//! The live progress display of `arches run`: one line of counts per state, and one line
//! per running task run (at most [`RUNNING_LINES_MAX`]). Without a terminal it prints one
//! plain line per finished task instead.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::Duration;

use arches_core::events::DomainEvent;
use arches_core::{RunId, TaskId, TaskRunId, TaskRunState};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;

/// Most running task runs shown with their own line.
const RUNNING_LINES_MAX: usize = 8;

pub struct Progress {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

struct Entry {
    task_id: TaskId,
    index: Option<u32>,
    state: TaskRunState,
    attempt: u32,
}

fn label(task_id: &TaskId, index: Option<u32>) -> String {
    match index {
        Some(i) => format!("{task_id}[{i}]"),
        None => task_id.to_string(),
    }
}

impl Progress {
    pub fn start(
        mut events: broadcast::Receiver<DomainEvent>,
        run_id: RunId,
        total_tasks: usize,
        quiet: bool,
    ) -> Self {
        let (stop, mut stopped) = oneshot::channel();
        let interactive = std::io::stderr().is_terminal() && !quiet;
        let task = tokio::spawn(async move {
            let multi = MultiProgress::with_draw_target(if interactive {
                ProgressDrawTarget::stderr_with_hz(10)
            } else {
                ProgressDrawTarget::hidden()
            });
            let header = multi.add(ProgressBar::new_spinner());
            header.set_style(
                ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
                    .expect("valid template"),
            );
            header.enable_steady_tick(Duration::from_millis(100));
            let line_style = ProgressStyle::with_template("  {spinner} {msg} {elapsed}")
                .expect("valid template");
            let mut entries: HashMap<TaskRunId, Entry> = HashMap::new();
            let mut lines: HashMap<TaskRunId, ProgressBar> = HashMap::new();
            let mut hidden_running = 0usize;
            loop {
                // Events already sent come before the stop: the last task's change and the
                // run's end often arrive together, and the display must show both.
                let event = tokio::select! {
                    biased;
                    event = events.recv() => match event {
                        Ok(event) => event,
                        Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(broadcast::error::RecvError::Closed) => break,
                    },
                    _ = &mut stopped => break,
                };
                let DomainEvent::TaskRunStateChanged {
                    run_id: event_run,
                    task_run_id,
                    task_id,
                    index,
                    state,
                    attempt,
                    ..
                } = event
                else {
                    continue;
                };
                if event_run != run_id {
                    continue;
                }
                if !interactive && !quiet && index.is_none() && state.is_terminal() {
                    status!("{:<10} {}", state.as_str(), task_id);
                }
                let entry = entries.entry(task_run_id).or_insert(Entry {
                    task_id,
                    index,
                    state: TaskRunState::Pending,
                    attempt,
                });
                // A fan-out parent goes from pending straight to running while its items run;
                // it gets no line of its own.
                let is_fan_out_parent = entry.index.is_none()
                    && entry.state == TaskRunState::Pending
                    && state == TaskRunState::Running;
                entry.state = state;
                entry.attempt = attempt;
                if state == TaskRunState::Running && !is_fan_out_parent {
                    if lines.len() < RUNNING_LINES_MAX {
                        let entry = &entries[&task_run_id];
                        let bar = multi.add(ProgressBar::new_spinner());
                        bar.set_style(line_style.clone());
                        let retry = if entry.attempt > 1 {
                            format!(" (attempt {})", entry.attempt)
                        } else {
                            String::new()
                        };
                        bar.set_message(format!("{}{retry}", label(&entry.task_id, entry.index)));
                        bar.enable_steady_tick(Duration::from_millis(100));
                        lines.insert(task_run_id, bar);
                    } else {
                        hidden_running += 1;
                    }
                } else if let Some(bar) = lines.remove(&task_run_id) {
                    bar.finish_and_clear();
                    multi.remove(&bar);
                } else if state != TaskRunState::Running
                    && hidden_running > 0
                    && state.is_terminal()
                {
                    hidden_running = hidden_running.saturating_sub(1);
                }
                let mut counts: Vec<(TaskRunState, usize)> =
                    TaskRunState::ALL.iter().map(|s| (*s, 0)).collect();
                for entry in entries.values() {
                    if let Some(slot) = counts.iter_mut().find(|(s, _)| *s == entry.state) {
                        slot.1 += 1;
                    }
                }
                let summary: Vec<String> = counts
                    .iter()
                    .filter(|(_, n)| *n > 0)
                    .map(|(s, n)| format!("{n} {s}"))
                    .collect();
                let more = if hidden_running > 0 {
                    format!(" (+{hidden_running} more running)")
                } else {
                    String::new()
                };
                header.set_message(format!(
                    "{} task runs ({} tasks): {}{more}",
                    entries.len().max(total_tasks),
                    total_tasks,
                    summary.join(" · ")
                ));
            }
            for (_, bar) in lines.drain() {
                bar.finish_and_clear();
            }
            header.finish_and_clear();
        });
        Progress { stop, task }
    }

    pub async fn finish(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}
