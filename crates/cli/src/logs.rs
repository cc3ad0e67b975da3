//! `arches search-logs`: full-text search over the task log lines of runs — on a server
//! (`/api/v1/logs/search`, the caller's org) or in the local home's store.

use std::process::ExitCode;

use anyhow::Context;
use arches_core::log_search::{LogSearch, LogSearchQuery, LOG_SEARCH_LIMIT_MAX};
use arches_core::records::LogStream;
use arches_core::{OrgId, RunId, TaskId};
use clap::Args;
use serde_json::json;

use crate::app::Home;
use crate::inspect::{parse_rfc3339, time};
use crate::remote::Remote;

/// Characters of a line shown in the table.
const SHOWN_TEXT_CHARS: usize = 120;

/// `arches search-logs`.
#[derive(Args, Debug)]
pub struct SearchLogsArgs {
    /// The query: every term must be in the line; a term is a word or a "quoted phrase";
    /// words are letters and digits, matched whole and case-insensitively; no operators.
    pub query: String,
    /// Only lines of this run.
    #[arg(long)]
    pub run: Option<RunId>,
    /// Only lines of this task.
    #[arg(long)]
    pub task: Option<String>,
    /// Only lines of this stream: stdout, stderr or system.
    #[arg(long)]
    pub stream: Option<String>,
    /// Only lines written at or after this RFC 3339 time.
    #[arg(long)]
    pub since: Option<String>,
    /// Only lines written before this RFC 3339 time.
    #[arg(long)]
    pub until: Option<String>,
    /// Hits wanted (1 to 1,000).
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
    /// Print the hits as JSON lines.
    #[arg(long)]
    pub json: bool,
}

/// One hit as both paths give it.
struct Shown {
    score: f64,
    run_id: String,
    task_id: Option<String>,
    attempt: u32,
    stream: &'static str,
    at: String,
    text: String,
}

fn stream(name: &str) -> anyhow::Result<LogStream> {
    LogStream::parse(name)
        .ok_or_else(|| anyhow::anyhow!("--stream {name:?} is not stdout, stderr or system"))
}

/// `arches search-logs` on a server, or locally without one.
pub async fn search_logs(
    home: &Home,
    remote: Option<&Remote>,
    args: SearchLogsArgs,
) -> anyhow::Result<ExitCode> {
    if !(1..=LOG_SEARCH_LIMIT_MAX).contains(&args.limit) {
        anyhow::bail!(
            "--limit {} is outside 1..={LOG_SEARCH_LIMIT_MAX}",
            args.limit
        );
    }
    let query = LogSearchQuery::parse(&args.query).context("the query")?;
    let task = args
        .task
        .as_deref()
        .map(TaskId::parse)
        .transpose()
        .context("--task")?;
    let stream = args.stream.as_deref().map(stream).transpose()?;
    let hits = match remote {
        Some(remote) => remote
            .client
            .search_logs(&arches_client::LogSearchParams {
                q: args.query.clone(),
                run_id: args.run,
                task,
                stream,
                since: args.since.clone(),
                until: args.until.clone(),
                limit: Some(args.limit),
            })
            .await?
            .hits
            .into_iter()
            .map(|hit| Shown {
                score: hit.score,
                run_id: hit.run_id.to_string(),
                task_id: hit.line.task_id.map(|t| t.to_string()),
                attempt: hit.line.attempt,
                stream: hit.line.stream.as_str(),
                at: parse_rfc3339(&hit.line.at).map_or(hit.line.at, time),
                text: hit.line.text,
            })
            .collect::<Vec<_>>(),
        None => {
            let moment = |flag: &str, text: &Option<String>| {
                text.as_deref()
                    .map(|t| {
                        parse_rfc3339(t).with_context(|| {
                            format!("--{flag} {t:?} is not an RFC 3339 time such as 2026-01-31T12:00:00Z")
                        })
                    })
                    .transpose()
            };
            let search = LogSearch {
                org_id: OrgId::DEFAULT,
                query,
                run_id: args.run,
                task_id: task,
                stream,
                since: moment("since", &args.since)?,
                until: moment("until", &args.until)?,
                limit: args.limit,
            };
            let opened = home.open_existing().await?;
            opened
                .store
                .search_logs(&search)
                .await?
                .into_iter()
                .map(|hit| Shown {
                    score: hit.score,
                    run_id: hit.line.line.run_id.to_string(),
                    task_id: hit.line.task_id.map(|t| t.to_string()),
                    attempt: hit.line.line.attempt,
                    stream: hit.line.line.stream.as_str(),
                    at: time(hit.line.line.at),
                    text: hit.line.line.text,
                })
                .collect()
        }
    };
    if args.json {
        for hit in &hits {
            out!(
                "{}",
                json!({"score": hit.score, "run_id": hit.run_id, "task_id": hit.task_id,
                       "attempt": hit.attempt, "stream": hit.stream, "at": hit.at, "text": hit.text})
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    if hits.is_empty() {
        status!("no log line matches");
        return Ok(ExitCode::SUCCESS);
    }
    let mut table =
        crate::inspect::table(&["score", "run", "task", "attempt", "stream", "at", "text"]);
    for hit in &hits {
        let mut shown: String = hit.text.chars().take(SHOWN_TEXT_CHARS).collect();
        if hit.text.chars().count() > SHOWN_TEXT_CHARS {
            shown.push('…');
        }
        table.add_row(vec![
            format!("{:.3e}", hit.score),
            hit.run_id.clone(),
            hit.task_id.clone().unwrap_or_default(),
            hit.attempt.to_string(),
            hit.stream.to_owned(),
            hit.at.clone(),
            shown,
        ]);
    }
    out!("{table}");
    Ok(ExitCode::SUCCESS)
}
