//! `arches tools …` and `arches secrets …`: the tool registry and the org's secrets.
//!
//! Listing and showing tools works locally (the built-in tools of this binary) and against
//! a server (built-in and the org's registered tools); registering tools and everything about
//! secrets needs a server.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use arches_client::ClientError;
use clap::Subcommand;
use serde_json::Value;

use crate::remote::{shown_time, Remote};

/// Largest manifest file read, in bytes.
const MANIFEST_FILE_BYTES_MAX: u64 = 256 * 1024;
/// Largest module file uploaded, in bytes.
const MODULE_FILE_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// Largest secret value read from standard input, in bytes.
const SECRET_STDIN_BYTES_MAX: u64 = 64 * 1024;

/// `arches tools`.
#[derive(Subcommand, Debug)]
pub enum ToolsCommand {
    /// List the tools: built-in ones, and with a server the org's registered ones.
    List,
    /// Show a tool: its description, sandboxes, schemas and, for a registered tool, its
    /// capabilities and versions.
    Show {
        /// The tool's name.
        name: String,
    },
    /// Register a tool on the server from its manifest (YAML or JSON): a WASM module or an
    /// HTTP endpoint with its JSON Schemas and capabilities. A `wasm` manifest may name its
    /// module by file path (relative to the manifest): the file is uploaded as an artifact
    /// first and the manifest registered with the artifact's id.
    Register {
        /// The manifest file.
        manifest: PathBuf,
    },
}

/// `arches secrets`.
#[derive(Subcommand, Debug)]
pub enum SecretsCommand {
    /// List the org's secrets: names, versions and the key that sealed them; never values.
    List,
    /// Set a secret. The value is read from standard input (one trailing newline removed)
    /// or from an environment variable, never from the command line, where it would be seen
    /// in the process list and the shell history.
    Set {
        /// The secret's name, as tools' capabilities list it.
        name: String,
        /// Read the value from this environment variable instead of standard input.
        #[arg(long)]
        from_env: Option<String>,
    },
    /// Delete a secret.
    Delete {
        /// The secret's name.
        name: String,
    },
    /// Seal every secret of the org under the server's active master key (after a new key
    /// was put first in `[secrets] keys`), so that old keys can be removed.
    Rotate,
    /// Print a new random master key (`id:base64`) for `[secrets] keys`. Needs no server.
    Keygen {
        /// The key's id.
        #[arg(long, default_value = "k1")]
        id: String,
    },
}

/// Runs `arches tools …`, on `remote` when given.
///
/// # Errors
/// Unreadable files, and the server's errors explained.
pub async fn tools(remote: Option<&Remote>, command: ToolsCommand) -> anyhow::Result<ExitCode> {
    match (command, remote) {
        (ToolsCommand::List, None) => list_local(),
        (ToolsCommand::Show { name }, None) => show_local(&name),
        (ToolsCommand::Register { .. }, None) => {
            anyhow::bail!("arches tools register needs a server: pass --server or run arches login")
        }
        (ToolsCommand::List, Some(remote)) => {
            let tools = remote
                .client
                .list_tools()
                .await
                .map_err(|e| remote.fail(e))?;
            let mut table =
                crate::inspect::table(&["TOOL", "KIND", "VERSION", "SANDBOX", "DESCRIPTION"]);
            for tool in tools {
                table.add_row(vec![
                    tool.name,
                    tool.kind,
                    tool.version.map(|v| v.to_string()).unwrap_or_default(),
                    tool.sandboxes.join(","),
                    tool.description,
                ]);
            }
            out!("{table}");
            Ok(ExitCode::SUCCESS)
        }
        (ToolsCommand::Show { name }, Some(remote)) => {
            let tool = remote
                .client
                .get_tool(&name)
                .await
                .map_err(|e| remote.fail(e))?;
            out!("tool        {}", tool.reference);
            out!("kind        {}", tool.kind);
            out!("description {}", tool.description);
            out!("sandboxes   {}", tool.sandboxes.join(", "));
            if let Some(created) = &tool.created_at {
                out!("registered  {}", shown_time(created));
            }
            print_json("input schema", &tool.input_schema);
            for (label, value) in [
                ("output schema", &tool.output_schema),
                ("implementation", &tool.implementation),
                ("capabilities", &tool.capabilities),
            ] {
                if let Some(value) = value {
                    print_json(label, value);
                }
            }
            if tool.version.is_some() {
                let versions = remote
                    .client
                    .tool_versions(&name)
                    .await
                    .map_err(|e| remote.fail(e))?;
                let list: Vec<String> = versions
                    .iter()
                    .filter_map(|v| v.version.map(|n| n.to_string()))
                    .collect();
                out!("versions    {}", list.join(", "));
            }
            Ok(ExitCode::SUCCESS)
        }
        (ToolsCommand::Register { manifest }, Some(remote)) => register(remote, &manifest).await,
    }
}

fn print_json(label: &str, value: &Value) {
    let text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    out!("{label}:");
    for line in text.lines() {
        out!("  {line}");
    }
}

fn list_local() -> anyhow::Result<ExitCode> {
    let registry = crate::app::registry();
    let mut table = crate::inspect::table(&["TOOL", "SANDBOX", "DESCRIPTION"]);
    for tool in registry.tools() {
        let sandboxes: Vec<&str> = tool.sandboxes().iter().map(|s| s.as_str()).collect();
        table.add_row(vec![
            tool.name().to_owned(),
            sandboxes.join(","),
            tool.description().to_owned(),
        ]);
    }
    out!("{table}");
    Ok(ExitCode::SUCCESS)
}

fn show_local(name: &str) -> anyhow::Result<ExitCode> {
    let registry = crate::app::registry();
    let Some(tool) = registry.get(name) else {
        let names: Vec<&str> = registry.names().collect();
        anyhow::bail!(
            "unknown tool {name:?}; the built-in tools are {} (registered tools live on a server: pass --server)",
            names.join(", ")
        );
    };
    out!("tool        {}", tool.name());
    out!("kind        builtin");
    out!("description {}", tool.description());
    let sandboxes: Vec<&str> = tool.sandboxes().iter().map(|s| s.as_str()).collect();
    out!("sandboxes   {}", sandboxes.join(", "));
    print_json("input schema", &tool.input_schema());
    Ok(ExitCode::SUCCESS)
}

fn read_bounded(path: &Path, limit: u64, what: &str) -> anyhow::Result<Vec<u8>> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("cannot read {what} {}", path.display()))?;
    if meta.len() > limit {
        anyhow::bail!(
            "{what} {} is {} bytes, above the limit of {limit}",
            path.display(),
            meta.len()
        );
    }
    std::fs::read(path).with_context(|| format!("cannot read {what} {}", path.display()))
}

async fn register(remote: &Remote, manifest_path: &Path) -> anyhow::Result<ExitCode> {
    let bytes = read_bounded(manifest_path, MANIFEST_FILE_BYTES_MAX, "manifest")?;
    let text = String::from_utf8(bytes)
        .with_context(|| format!("manifest {} is not UTF-8", manifest_path.display()))?;
    let file = manifest_path.display().to_string();
    let (mut manifest, _) =
        arches_core::pipeline::source::parse_document(&file, &text).map_err(|diagnostics| {
            let lines: Vec<String> = diagnostics.iter().map(|d| d.to_string()).collect();
            anyhow::anyhow!("{}", lines.join("\n"))
        })?;
    let module = manifest
        .pointer("/implementation/wasm/module")
        .and_then(Value::as_str)
        .filter(|m| m.parse::<arches_core::ArtifactId>().is_err())
        .map(str::to_owned);
    if let Some(module) = module {
        let path = manifest_path
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(&module);
        let content = read_bounded(&path, MODULE_FILE_BYTES_MAX, "module")?;
        let name = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| module.clone());
        let media_type = if name.ends_with(".wat") {
            "text/plain"
        } else {
            "application/wasm"
        };
        let artifact = remote
            .client
            .upload_artifact(&name, media_type, content)
            .await
            .map_err(|e| remote.fail(e))?;
        status!(
            "uploaded module {} as artifact {} (version {})",
            path.display(),
            artifact.id,
            artifact.version
        );
        if let Some(slot) = manifest.pointer_mut("/implementation/wasm/module") {
            *slot = Value::String(artifact.id.to_string());
        }
    }
    let body = serde_json::to_string(&manifest)?;
    match remote.client.register_tool(&body).await {
        Ok(tool) => {
            out!(
                "tool {} version {} registered on {}",
                tool.name,
                tool.version.unwrap_or_default(),
                remote.server
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(ClientError::Api(api)) if api.details.get("problems").is_some() => {
            let problems = api.details["problems"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            for problem in &problems {
                status!(
                    "{file}: {}: {}",
                    problem["pointer"].as_str().unwrap_or_default(),
                    problem["message"].as_str().unwrap_or_default()
                );
            }
            status!(
                "{} problem{} found",
                problems.len(),
                if problems.len() == 1 { "" } else { "s" }
            );
            Ok(ExitCode::from(2))
        }
        Err(error) => Err(remote.fail(error)),
    }
}

/// Runs `arches secrets …`.
///
/// # Errors
/// No server (except for `keygen`), an unreadable value, and the server's errors explained.
pub async fn secrets(remote: Option<&Remote>, command: SecretsCommand) -> anyhow::Result<ExitCode> {
    if let SecretsCommand::Keygen { id } = &command {
        let (_, text) = arches_auth::sealing::MasterKey::generate(id)?;
        out!("{text}");
        return Ok(ExitCode::SUCCESS);
    }
    let Some(remote) = remote else {
        anyhow::bail!("arches secrets needs a server: pass --server or run arches login");
    };
    let client = &remote.client;
    match command {
        // Printed above, without a server.
        SecretsCommand::Keygen { .. } => {}
        SecretsCommand::List => {
            let secrets = client.list_secrets().await.map_err(|e| remote.fail(e))?;
            let mut table = crate::inspect::table(&["SECRET", "VERSION", "KEY", "UPDATED"]);
            for secret in secrets {
                table.add_row(vec![
                    secret.name,
                    secret.version.to_string(),
                    secret.key_id,
                    shown_time(&secret.updated_at),
                ]);
            }
            out!("{table}");
        }
        SecretsCommand::Set { name, from_env } => {
            let value = match from_env {
                Some(variable) => std::env::var(&variable)
                    .with_context(|| format!("environment variable {variable} is not set"))?,
                None => {
                    let mut text = String::new();
                    std::io::stdin()
                        .take(SECRET_STDIN_BYTES_MAX + 2)
                        .read_to_string(&mut text)
                        .context("cannot read the secret's value from standard input")?;
                    let trimmed = text
                        .strip_suffix('\n')
                        .map(|t| t.strip_suffix('\r').unwrap_or(t))
                        .unwrap_or(&text);
                    trimmed.to_owned()
                }
            };
            let secret = client
                .set_secret(&name, &value)
                .await
                .map_err(|e| remote.fail(e))?;
            out!(
                "secret {} version {} sealed with key {}",
                secret.name,
                secret.version,
                secret.key_id
            );
        }
        SecretsCommand::Delete { name } => {
            client
                .delete_secret(&name)
                .await
                .map_err(|e| remote.fail(e))?;
            out!("secret {name} deleted");
        }
        SecretsCommand::Rotate => {
            let report = client.rotate_secrets().await.map_err(|e| remote.fail(e))?;
            out!(
                "secrets sealed with key {}: {} re-sealed, {} already were, {} changed meanwhile",
                report.active_key_id,
                report.resealed,
                report.unchanged,
                report.skipped
            );
            if !report.failed.is_empty() {
                status!(
                    "no configured key opens {}: keep the old key until they are set again",
                    report.failed.join(", ")
                );
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
