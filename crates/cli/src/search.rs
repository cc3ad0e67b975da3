//! `arches search`: the passages the `embed` tool indexed, found by hybrid, vector or
//! full-text search — on a server (`/api/v1/search`) or in the local home's indexes.

use std::process::ExitCode;

use anyhow::Context;
use arches_core::search::{CollectionName, MetadataFilter};
use arches_core::OrgId;
use arches_tools::search::SearchMode;
use clap::Args;
use serde_json::{json, Value};

use crate::app::Home;
use crate::remote::Remote;

/// Characters of a hit's text shown in the table.
const SHOWN_TEXT_CHARS: usize = 100;

/// `arches search`.
#[derive(Args, Debug)]
pub struct SearchArgs {
    /// The query text.
    pub query: String,
    /// The collection the `embed` tool indexed into.
    #[arg(long, short)]
    pub collection: String,
    /// Hits wanted (1 to 100).
    #[arg(long, short, default_value_t = 10)]
    pub k: usize,
    /// hybrid (vector and full text fused by reciprocal rank fusion), vector or text.
    #[arg(long, default_value = "hybrid")]
    pub mode: String,
    /// A metadata filter as JSON, e.g. '{"species":"Adelie","island":["Biscoe","Dream"]}'.
    #[arg(long)]
    pub filter: Option<String>,
    /// Print the hits as JSON lines.
    #[arg(long)]
    pub json: bool,
}

/// One hit as both paths give it.
struct Shown {
    id: String,
    score: f64,
    text: Option<String>,
    metadata: Value,
    similarity: Option<f32>,
}

/// `arches search` on a server, or locally without one.
pub async fn search(
    home: &Home,
    remote: Option<&Remote>,
    args: SearchArgs,
) -> anyhow::Result<ExitCode> {
    if !(1..=100).contains(&args.k) {
        anyhow::bail!("--k {} is outside 1..=100", args.k);
    }
    let hits = match remote {
        Some(remote) => {
            let results = remote
                .client
                .search(&arches_client::SearchQuery {
                    collection: args.collection.clone(),
                    q: args.query.clone(),
                    k: Some(args.k),
                    mode: Some(args.mode.clone()),
                    filter: args.filter.clone(),
                })
                .await?;
            results
                .hits
                .into_iter()
                .map(|hit| Shown {
                    id: hit.id,
                    score: hit.score,
                    text: hit.text,
                    metadata: hit.metadata,
                    similarity: hit.similarity,
                })
                .collect::<Vec<_>>()
        }
        None => local(home, &args).await?,
    };
    if args.json {
        for hit in &hits {
            out!(
                "{}",
                json!({"id": hit.id, "score": hit.score, "text": hit.text, "similarity": hit.similarity, "metadata": hit.metadata})
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    if hits.is_empty() {
        status!("no hits in {}", args.collection);
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = crate::inspect::table(&["#", "score", "id", "text"]);
    for (rank, hit) in hits.iter().enumerate() {
        let text: String = hit
            .text
            .as_deref()
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        let mut shown: String = text.chars().take(SHOWN_TEXT_CHARS).collect();
        if text.chars().count() > SHOWN_TEXT_CHARS {
            shown.push('…');
        }
        table.add_row(vec![
            (rank + 1).to_string(),
            format!("{:.4}", hit.score),
            hit.id.clone(),
            shown,
        ]);
    }
    out!("{table}");
    Ok(ExitCode::SUCCESS)
}

async fn local(home: &Home, args: &SearchArgs) -> anyhow::Result<Vec<Shown>> {
    let collection = CollectionName::new(&args.collection).context("--collection")?;
    let mode = SearchMode::parse(&args.mode).map_err(|error| anyhow::anyhow!("--{error}"))?;
    let filter = match &args.filter {
        None => MetadataFilter::all(),
        Some(text) => {
            let value: Value = serde_json::from_str(text).context("--filter is not JSON")?;
            MetadataFilter::from_json(&value).context("--filter")?
        }
    };
    let http = std::sync::Arc::new(arches_tools::HttpTool::new(
        arches_tools::HttpPolicy::allow_all(),
    ));
    let services = crate::app::search_services(&home.root, home.database_url.as_deref(), http)?
        .context("search is turned off")?;
    let hits = services
        .search(
            OrgId::DEFAULT,
            &collection,
            &args.query,
            args.k,
            mode,
            &filter,
        )
        .await?;
    Ok(hits
        .into_iter()
        .map(|hit| Shown {
            id: hit.id,
            score: hit.score,
            text: hit.text,
            metadata: Value::Object(hit.metadata),
            similarity: hit.similarity,
        })
        .collect())
}
