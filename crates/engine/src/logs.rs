//! The log writer: task log lines go through a bounded channel to one task that appends
//! them to the store in batches.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use arches_core::ports::{LogSink, Store};
use arches_core::records::{LogStream, NewLogLine};
use arches_core::{Clock, OrgId, RunId, TaskId, TaskRunId};

use crate::bus::{BusEvent, EventBus, LogEvent, LogLineEvent};
use async_trait::async_trait;
use tokio::sync::mpsc;
use tracing::warn;

/// Most lines appended in one store call.
const LOG_BATCH_MAX: usize = 1024;

/// Appends log lines to the store in batches until every sender is gone.
pub struct LogWriter {
    store: Arc<dyn Store>,
    lines: mpsc::Receiver<NewLogLine>,
    sender: Option<mpsc::Sender<NewLogLine>>,
    bus: Option<Arc<dyn EventBus>>,
}

/// A cheap handle to send lines to the [`LogWriter`] (and, with a bus, to live watchers).
#[derive(Clone)]
pub struct LogWriterHandle {
    lines: mpsc::Sender<NewLogLine>,
    bus: Option<Arc<dyn EventBus>>,
}

impl std::fmt::Debug for LogWriterHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogWriterHandle")
            .field("bus", &self.bus.is_some())
            .finish_non_exhaustive()
    }
}

impl LogWriter {
    /// A writer whose channel holds at most `capacity` lines.
    pub fn new(store: Arc<dyn Store>, capacity: usize) -> Self {
        let (sender, lines) = mpsc::channel(capacity.max(1));
        Self {
            store,
            lines,
            sender: Some(sender),
            bus: None,
        }
    }

    /// Also publishes every line on `bus` as it is written (before it is stored: a live
    /// tail must not wait for the batch).
    pub fn with_event_bus(mut self, bus: Arc<dyn EventBus>) -> Self {
        self.bus = Some(bus);
        self
    }

    /// A handle for senders.
    pub fn handle(&self) -> LogWriterHandle {
        LogWriterHandle {
            lines: self
                .sender
                .clone()
                .expect("handles are taken before the writer runs"),
            bus: self.bus.clone(),
        }
    }

    /// Appends lines until every handle is dropped. A failed append is logged and its lines
    /// are dropped: task logs must never stop the engine.
    pub async fn run(mut self) {
        self.sender = None;
        let mut batch = Vec::with_capacity(LOG_BATCH_MAX);
        while let Some(line) = self.lines.recv().await {
            batch.push(line);
            while batch.len() < LOG_BATCH_MAX {
                match self.lines.try_recv() {
                    Ok(line) => batch.push(line),
                    Err(_) => break,
                }
            }
            if let Err(err) = self.store.append_logs(&batch).await {
                warn!(lines = batch.len(), error = %err, "could not store task log lines");
            }
            batch.clear();
        }
    }
}

/// The log of one attempt: bounds line length and count, then forwards to the writer.
pub(crate) struct AttemptLog {
    pub(crate) writer: LogWriterHandle,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) org_id: OrgId,
    pub(crate) task_id: TaskId,
    pub(crate) run_id: RunId,
    pub(crate) task_run_id: TaskRunId,
    pub(crate) attempt: u32,
    pub(crate) line_bytes_max: usize,
    pub(crate) lines_max: u32,
    pub(crate) written: AtomicU32,
    pub(crate) dropped: AtomicU64,
}

impl AttemptLog {
    async fn send(&self, stream: LogStream, text: String) {
        let line = NewLogLine {
            run_id: self.run_id,
            task_run_id: self.task_run_id,
            attempt: self.attempt,
            stream,
            at: self.clock.now(),
            text,
        };
        if let Some(bus) = &self.writer.bus {
            bus.publish(vec![BusEvent::Log(LogLineEvent {
                line: LogEvent {
                    org_id: self.org_id,
                    run_id: line.run_id,
                    task_run_id: line.task_run_id,
                    task_id: self.task_id.clone(),
                    attempt: line.attempt,
                    stream: line.stream,
                    at: line.at,
                    text: line.text.clone(),
                },
            })]);
        }
        // The writer lives as long as the engine; a closed channel means shutdown.
        let _ = self.writer.lines.send(line).await;
    }

    /// Writes the closing line about dropped lines, if any were dropped.
    pub(crate) async fn finish(&self) {
        let dropped = self.dropped.load(Ordering::Relaxed);
        if dropped > 0 {
            let text = format!(
                "log truncated: {dropped} more lines were not kept (limit {} lines per attempt)",
                self.lines_max
            );
            self.send(LogStream::System, text).await;
        }
    }
}

#[async_trait]
impl LogSink for AttemptLog {
    async fn write(&self, stream: LogStream, text: &str) {
        if self.written.fetch_add(1, Ordering::Relaxed) >= self.lines_max {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let text = if text.len() > self.line_bytes_max {
            let mut cut = self.line_bytes_max;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            format!(
                "{}… [line cut at {} bytes]",
                &text[..cut],
                self.line_bytes_max
            )
        } else {
            text.to_owned()
        };
        self.send(stream, text).await;
    }
}
