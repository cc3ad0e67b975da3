//! # arches-tools
//!
//! The built-in tools of Arches: `sql` (Apache DataFusion over CSV, Parquet and JSON
//! artifacts), `shell` (a process in its own group with a scrubbed environment), `file`
//! (local files in and out of the artifact store), `http` (requests to allowed hosts with
//! retries, a circuit breaker and a rate limit per host), `wasm` (WASI modules on wasmtime
//! with nothing granted by default, CPU, memory and time bounded), `llm` (an
//! OpenAI-compatible chat model, the answer checked against a JSON Schema, with a
//! confidence), `agent` (that model calling the tools a task lists, within a step and token
//! budget), `embed`, `search`, `dedup`, `classify` and `memory` (embeddings, vector and
//! full-text search, when [`Executors::with_search`] gives them their services), `noop` and
//! `echo`.
//!
//! Every tool implements [`arches_core::ports::Tool`] and reaches the outside world only
//! through its [`arches_core::ports::ToolContext`]: the attempt's working directory, the
//! artifact port and the log sink. A tool that stores an artifact returns its record under
//! `"artifact"` (or a list under `"artifacts"`) in its outputs; downstream tools find their
//! inputs there.
//!
//! Architecture invariant: a tool never outlives its attempt. The engine stops an attempt by
//! dropping the future of [`arches_core::ports::Tool::execute`]; every tool releases what it
//! started when dropped (the shell tool kills its process group, DataFusion aborts its
//! tasks). Tools never touch the store's tables: the artifact port is their only storage.

mod basic;
mod common;
pub mod file;
pub mod http;
pub mod llm;
pub mod mcp;
pub mod media_type;
pub mod registered;
pub mod search;
pub mod shell;
pub mod sql;
pub mod wasm;

use std::sync::Arc;

use arches_core::ports::{SecretReader, ToolRegistry};

pub use basic::{ApprovalTool, EchoTool, NoopTool};
pub use file::FileTool;
pub use http::{BreakerSettings, BreakerState, HttpPolicy, HttpTool, RateLimit};
pub use llm::agent::AgentTool;
pub use llm::{
    ApiKey, LlmPolicy, LlmTool, ModelPrice, ORG_API_KEY_SECRET, ORG_BASE_URL_SECRET,
    ORG_MODEL_SECRET,
};
pub use registered::{check_manifest, Executors, ManifestProblem, RegisteredTool};
pub use shell::ShellTool;
pub use sql::SqlTool;
pub use wasm::{WasmPolicy, WasmTool};

/// The names of built-in tools, present and planned (`llm`, `agent`, `embed`, `search`,
/// `approval`, `pipeline`): an org cannot register a tool under one of them, whatever this
/// build registers.
pub const RESERVED_TOOL_NAMES: [&str; 16] = [
    "agent", "approval", "classify", "dedup", "echo", "embed", "file", "http", "llm", "memory",
    "noop", "pipeline", "search", "shell", "sql", "wasm",
];

/// A registry holding every built-in tool: `agent`, `approval`, `echo`, `file`, `http`,
/// `llm`, `noop`, `shell`, `sql` and `wasm`, with the `http` tool allowed to reach any host
/// ([`HttpPolicy::allow_all`]), the `wasm` tool allowed any grant ([`WasmPolicy::allow_all`])
/// and the `llm` tool configured from `ARCHES_LLM_BASE_URL`, `ARCHES_LLM_MODEL` and
/// `ARCHES_LLM_API_KEY` ([`LlmPolicy::from_env`]): for local runs, where pipelines already
/// run as the user on the user's own machine.
pub fn builtin_registry() -> ToolRegistry {
    builtin_registry_with(
        &Executors::new(HttpPolicy::allow_all(), WasmPolicy::allow_all())
            .with_llm(LlmPolicy::from_env()),
    )
}

/// Every built-in tool, with `executors`' `http`, `wasm` and `llm` tools (the last two when
/// present; the `agent` tool comes with the `llm` tool, on its policy): a server passes those it built from its configuration, keeps the `http` tool to
/// report its circuit breakers, and runs its org's registered tools on the same executors.
pub fn builtin_registry_with(executors: &Executors) -> ToolRegistry {
    let mut registry = ToolRegistry::new();
    registry.register(Arc::new(ApprovalTool::new()));
    registry.register(Arc::new(EchoTool::new()));
    registry.register(Arc::new(FileTool::new()));
    registry.register(executors.http.clone());
    registry.register(Arc::new(NoopTool::new()));
    registry.register(Arc::new(ShellTool::new()));
    registry.register(Arc::new(SqlTool::new()));
    if let Some(wasm) = &executors.wasm {
        registry.register(Arc::new(wasm.clone()));
    }
    if let Some(llm) = &executors.llm {
        registry.register(llm.clone());
        registry.register(Arc::new(AgentTool::new(llm.clone())));
    }
    if let Some(services) = &executors.search {
        registry.register(Arc::new(search::EmbedTool::new(services.clone())));
        registry.register(Arc::new(search::SearchTool::new(services.clone())));
        registry.register(Arc::new(search::DedupTool::new(services.clone())));
        registry.register(Arc::new(search::ClassifyTool::new(services.clone())));
        registry.register(Arc::new(search::MemoryTool::new(services.clone())));
    }
    registry
}

impl Executors {
    /// The `http` tool under `http` and the `wasm` tool under `wasm`. Where wasmtime cannot
    /// start (it needs executable memory), `wasm` is left out with an error in the log.
    pub fn new(http: HttpPolicy, wasm: WasmPolicy) -> Self {
        let wasm = match WasmTool::try_new() {
            Ok(tool) => Some(tool.with_policy(wasm)),
            Err(error) => {
                tracing::error!(error = %error.message, "the wasm tool is unavailable");
                None
            }
        };
        Self {
            wasm,
            http: Arc::new(HttpTool::new(http)),
            llm: None,
            search: None,
        }
    }

    /// These executors with the search tools (`embed`, `search`, `dedup`, `classify`,
    /// `memory`) over `services`.
    pub fn with_search(mut self, services: Arc<search::SearchServices>) -> Self {
        self.search = Some(services);
        self
    }

    /// These executors with the `llm` tool under `policy`, sending through their `http` tool
    /// (its allowed hosts, breakers and rate limits).
    pub fn with_llm(mut self, policy: LlmPolicy) -> Self {
        self.llm = Some(Arc::new(LlmTool::new(policy, self.http.clone())));
        self
    }

    /// These executors with the `llm` tool under `policy`, each org choosing its own
    /// provider, default model and API key in its secrets (`LLM_BASE_URL`, `LLM_MODEL`,
    /// `LLM_API_KEY`, read from `secrets`; see [`LlmTool::with_org_secrets`]); the `agent`
    /// tool asks through the same settings.
    pub fn with_org_llm(mut self, policy: LlmPolicy, secrets: Arc<dyn SecretReader>) -> Self {
        self.llm = Some(Arc::new(
            LlmTool::new(policy, self.http.clone()).with_org_secrets(secrets),
        ));
        self
    }
}
