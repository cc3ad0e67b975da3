//! `arches reviews`: the validation queue of a server — list and filter items, show one
//! with its preview, claim it, approve (possibly with an edited result) or reject it, and
//! show the calibration of a pipeline's routed tasks.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use arches_client::ReviewsQuery;
use clap::Subcommand;

use crate::remote::{shown_time, Remote};

/// Largest edited result read from a file, in bytes (the engine's outputs bound).
const EDITED_BYTES_MAX: u64 = 1 << 20;

/// `arches reviews …`.
#[derive(Subcommand, Debug)]
pub enum ReviewsCommand {
    /// List the queue, oldest first (open items unless --state says otherwise).
    List {
        /// open, approved, rejected, expired, cancelled or all.
        #[arg(long)]
        state: Option<String>,
        /// confidence, notice or approval.
        #[arg(long)]
        kind: Option<String>,
        /// Only items of this pipeline.
        #[arg(long)]
        pipeline: Option<String>,
        /// Only items of this task.
        #[arg(long)]
        task: Option<String>,
        /// Only items of this tool.
        #[arg(long)]
        tool: Option<String>,
        /// Only items whose confidence is at least this.
        #[arg(long)]
        min_confidence: Option<f64>,
        /// Only items whose confidence is below this.
        #[arg(long)]
        max_confidence: Option<f64>,
        /// Only items older than this (`1h`, `30m`).
        #[arg(long)]
        older_than: Option<String>,
        /// At most this many (1 to 500).
        #[arg(long)]
        limit: Option<u32>,
        /// Print the items as JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Show one item: inputs, proposed result, rationale, confidence, votes (as JSON).
    Show {
        /// The item's id.
        id: String,
    },
    /// Hold an item while you review it (others get 409 until the claim ends).
    Claim {
        /// The item's id.
        id: String,
        /// How long, in seconds (default 900).
        #[arg(long)]
        ttl: Option<u64>,
    },
    /// Approve an item: its run continues with the proposed result, or with yours.
    Approve {
        /// The item's id.
        id: String,
        /// A corrected result: a file holding a JSON object (`-` for standard input).
        #[arg(long)]
        edit: Option<PathBuf>,
        /// A comment.
        #[arg(long)]
        comment: Option<String>,
    },
    /// Reject an item: its task fails, is skipped, or runs again with your comment,
    /// as the task's `on_reject` says.
    Reject {
        /// The item's id.
        id: String,
        /// Why (given to the tool when the task runs again).
        #[arg(long)]
        comment: Option<String>,
    },
    /// The calibration of a pipeline's routed tasks: thresholds, precision, queue saved.
    Calibration {
        /// The pipeline.
        pipeline: String,
        /// Only this task.
        #[arg(long)]
        task: Option<String>,
    },
}

/// Runs `arches reviews …` on `remote`.
///
/// # Errors
/// An unreadable edit file, and the server's errors explained.
pub async fn reviews(remote: &Remote, command: ReviewsCommand) -> anyhow::Result<ExitCode> {
    let client = &remote.client;
    match command {
        ReviewsCommand::List {
            state,
            kind,
            pipeline,
            task,
            tool,
            min_confidence,
            max_confidence,
            older_than,
            limit,
            json,
        } => {
            let query = ReviewsQuery {
                state,
                kind,
                pipeline,
                task,
                tool,
                min_confidence,
                max_confidence,
                older_than,
                limit,
                ..Default::default()
            };
            let page = client
                .list_reviews(&query)
                .await
                .map_err(|e| remote.fail(e))?;
            if json {
                for item in &page.items {
                    out!("{}", serde_json::to_string(item)?);
                }
            } else {
                let mut table = crate::inspect::table(&[
                    "ID",
                    "KIND",
                    "STATE",
                    "PIPELINE",
                    "TASK",
                    "CONFIDENCE",
                    "CREATED",
                    "CLAIMED BY",
                ]);
                for item in &page.items {
                    table.add_row(vec![
                        item.id.clone(),
                        item.kind.clone(),
                        item.state.clone(),
                        item.pipeline.clone(),
                        match item.index {
                            Some(i) => format!("{}[{i}]", item.task),
                            None => item.task.clone(),
                        },
                        item.confidence
                            .map(|c| format!("{c:.3}"))
                            .unwrap_or_else(|| "-".into()),
                        shown_time(&item.created_at),
                        item.claimed_by.clone().unwrap_or_default(),
                    ]);
                }
                out!("{table}");
            }
            if page.next_cursor.is_some() {
                status!("more items wait: narrow the filters or raise --limit");
            }
        }
        ReviewsCommand::Show { id } => {
            let item = client.get_review(&id).await.map_err(|e| remote.fail(e))?;
            out!("{}", serde_json::to_string_pretty(&item)?);
        }
        ReviewsCommand::Claim { id, ttl } => {
            let item = client
                .claim_review(&id, ttl)
                .await
                .map_err(|e| remote.fail(e))?;
            out!(
                "review {} claimed until {}",
                item.id,
                item.claim_expires_at
                    .as_deref()
                    .map(shown_time)
                    .unwrap_or_default()
            );
        }
        ReviewsCommand::Approve { id, edit, comment } => {
            let edited = match edit {
                None => None,
                Some(path) => Some(read_edit(&path)?),
            };
            let item = client
                .decide_review(&id, "approve", edited.as_ref(), comment.as_deref())
                .await
                .map_err(|e| remote.fail(e))?;
            out!("review {} {}", item.id, decided(&item));
        }
        ReviewsCommand::Reject { id, comment } => {
            let item = client
                .decide_review(&id, "reject", None, comment.as_deref())
                .await
                .map_err(|e| remote.fail(e))?;
            out!("review {} {}", item.id, decided(&item));
        }
        ReviewsCommand::Calibration { pipeline, task } => {
            let reports = client
                .calibration(&pipeline, task.as_deref())
                .await
                .map_err(|e| remote.fail(e))?;
            let mut table = crate::inspect::table(&[
                "TASK",
                "LOW",
                "HIGH",
                "CALIBRATED",
                "FEEDBACK",
                "PRECISION",
                "QUEUED",
                "QUEUED (FIXED)",
                "SAVED",
            ]);
            let pct = |v: Option<f64>| {
                v.map(|v| format!("{:.1}%", v * 100.0))
                    .unwrap_or_else(|| "-".into())
            };
            for r in reports {
                table.add_row(vec![
                    r.task,
                    format!("{:.3}", r.thresholds["low"].as_f64().unwrap_or_default()),
                    format!("{:.3}", r.thresholds["high"].as_f64().unwrap_or_default()),
                    r.thresholds["calibrated"]
                        .as_bool()
                        .unwrap_or_default()
                        .to_string(),
                    format!("{:.0}", r.feedback),
                    pct(r.precision),
                    pct(r.queue_share),
                    pct(r.fixed_queue_share),
                    pct(r.queue_saved),
                ]);
            }
            out!("{table}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn decided(item: &arches_client::Review) -> String {
    if item.state == "open" {
        format!(
            "has {} of {} approvals; it waits for more",
            item.approvals, item.quorum
        )
    } else {
        format!("is {}", item.state)
    }
}

fn read_edit(path: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    use std::io::Read as _;
    let mut text = String::new();
    if path.as_os_str() == "-" {
        std::io::stdin()
            .take(EDITED_BYTES_MAX + 1)
            .read_to_string(&mut text)
            .context("cannot read the edited result from standard input")?;
    } else {
        std::fs::File::open(path)
            .with_context(|| format!("cannot open {}", path.display()))?
            .take(EDITED_BYTES_MAX + 1)
            .read_to_string(&mut text)
            .with_context(|| format!("cannot read {}", path.display()))?;
    }
    if text.len() as u64 > EDITED_BYTES_MAX {
        anyhow::bail!("the edited result is larger than {EDITED_BYTES_MAX} bytes");
    }
    let value: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: the edited result is not JSON", path.display()))?;
    if !value.is_object() {
        anyhow::bail!(
            "{}: the edited result must be a JSON object",
            path.display()
        );
    }
    Ok(value)
}
