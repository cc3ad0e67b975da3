//! The executor of an org's registered tools ([`arches_core::tooldef`]): a WASM module run
//! by the `wasm` tool's runtime, an HTTP endpoint called through the `http` tool, or a tool
//! of an MCP server called with the MCP client ([`crate::mcp`]), each confined to the
//! capabilities of its registration.
//!
//! What a registered tool does on every attempt:
//! 1. checks the inputs against its input schema (fields named by JSON pointer);
//! 2. reads the clear values of the secrets its capabilities name, and nothing else;
//! 3. runs: a module with exactly the capabilities' grants (directories, the secrets as
//!    environment variables, CPU, memory and time), a request to its URL with the header
//!    templates rendered over the secrets, only to the capabilities' hosts (redirects too),
//!    or an MCP `tools/call` to its URL with those headers (no redirects);
//! 4. checks the result against its output schema;
//! 5. masks every secret value in its log lines, its outputs and its error messages.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arches_core::pipeline::format_duration;
use arches_core::pipeline::validate::schema_violations;
use arches_core::ports::{LogSink, SecretReader, Tool, ToolContext, ToolError};
use arches_core::records::LogStream;
use arches_core::tooldef::{
    Capabilities, Sandbox, StoredTool, ToolImplementation, ToolManifest, CPU_MS_MAX, MEMORY_MB_MAX,
    SECRETS_PER_TOOL_MAX, SECRET_VALUE_MIN_BYTES,
};
use async_trait::async_trait;
use serde_json::{json, Value};

use crate::common::store_error;
use crate::http::{HttpPolicy, HttpTool, METHODS, RESERVED_HEADERS};
use crate::wasm::{
    WasmGrants, WasmLimits, WasmTool, DEFAULT_CPU_MS, DEFAULT_MEMORY_MB, DEFAULT_WALL_PER_CPU,
};

/// What replaces a secret's value in logs, outputs and errors.
pub const MASK: &str = "***";

/// The shortest start of a value masked at the end of a text (a text cut inside a value);
/// shorter starts are too common to mask.
const CUT_VALUE_MIN_BYTES: usize = 8;

/// The runtimes registered tools execute on: the server's `wasm` tool (absent where wasmtime
/// cannot start) and its `http` tool (shared breakers and rate limits).
#[derive(Clone)]
pub struct Executors {
    /// Runs modules; its [`crate::wasm::WasmPolicy`] bounds the directories a tool's
    /// capabilities may grant.
    pub wasm: Option<WasmTool>,
    /// Sends requests; its policy's allowed hosts bound the hosts a tool's capabilities name.
    pub http: Arc<HttpTool>,
    /// The `llm` tool, sending through `http`; `None` (not registered) unless set with
    /// [`Executors::with_llm`].
    pub llm: Option<Arc<crate::llm::LlmTool>>,
    /// The embedding provider and indexes of the search tools; `None` (not registered)
    /// unless set with [`Executors::with_search`].
    pub search: Option<Arc<crate::search::SearchServices>>,
}

/// A problem of a manifest: where (a JSON pointer into the manifest) and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestProblem {
    /// For example `/capabilities/hosts/0`.
    pub pointer: String,
    /// What is wrong, naming the value.
    pub message: String,
}

impl std::fmt::Display for ManifestProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.pointer, self.message)
    }
}

/// Checks a manifest before it is registered: every problem at once, in manifest order.
///
/// `reserved` are the built-in tool names, which an org tool cannot take; `executors` bound
/// what capabilities may grant (the `wasm` tool's policy for directories).
pub fn check_manifest(
    manifest: &ToolManifest,
    reserved: &[&str],
    executors: &Executors,
) -> Vec<ManifestProblem> {
    let mut problems = Vec::new();
    let mut problem = |pointer: &str, message: String| {
        problems.push(ManifestProblem {
            pointer: pointer.to_owned(),
            message,
        })
    };
    if reserved.contains(&manifest.name.as_str()) {
        problem(
            "/name",
            format!(
                "`{}` is a built-in tool; registered tools need another name",
                manifest.name
            ),
        );
    }
    if serde_json::to_string(manifest).is_ok_and(|text| text.contains("\\u0000")) {
        problem("", "must not contain NUL characters".to_owned());
    }
    if manifest.description.len() > 1000 {
        problem("/description", "must be at most 1000 bytes".to_owned());
    }
    match jsonschema::validator_for(&manifest.input_schema) {
        Err(error) => problem("/input_schema", format!("not a valid JSON Schema: {error}")),
        Ok(_) if manifest.input_schema.get("type") != Some(&json!("object")) => problem(
            "/input_schema",
            "must describe an object (`type: object`): a task's `with` is one".to_owned(),
        ),
        Ok(_) => {}
    }
    if let Err(error) = jsonschema::validator_for(&manifest.output_schema) {
        problem(
            "/output_schema",
            format!("not a valid JSON Schema: {error}"),
        );
    }
    let caps = &manifest.capabilities;
    for pattern in HttpPolicy::allowing(caps.hosts.iter().cloned()).problems() {
        problem("/capabilities/hosts", pattern);
    }
    if caps.secrets.len() > SECRETS_PER_TOOL_MAX {
        problem(
            "/capabilities/secrets",
            format!("at most {SECRETS_PER_TOOL_MAX} secrets"),
        );
    }
    let mut seen = std::collections::BTreeSet::new();
    for (index, name) in caps.secrets.iter().enumerate() {
        if !seen.insert(name.as_str()) {
            problem(
                &format!("/capabilities/secrets/{index}"),
                format!("secret `{name}` is listed twice"),
            );
        }
    }
    if let Some(timeout) = caps.timeout {
        if timeout.is_zero() {
            problem("/capabilities/timeout", "must be positive".to_owned());
        }
    }
    match &manifest.implementation {
        ToolImplementation::Wasm { .. } => {
            if !caps.hosts.is_empty() {
                problem(
                    "/capabilities/hosts",
                    "a wasm tool cannot reach hosts: WASI preview 1 gives modules no sockets"
                        .to_owned(),
                );
            }
            if let Some(memory) = caps.memory_mb {
                if !(1..=MEMORY_MB_MAX).contains(&memory) {
                    problem(
                        "/capabilities/memory_mb",
                        format!("{memory} must be between 1 and {MEMORY_MB_MAX}"),
                    );
                }
            }
            if let Some(cpu) = caps.cpu_ms {
                if !(1..=CPU_MS_MAX).contains(&cpu) {
                    problem(
                        "/capabilities/cpu_ms",
                        format!("{cpu} must be between 1 and {CPU_MS_MAX}"),
                    );
                }
            }
            let grants = wasm_grants(caps, Vec::new());
            for (dirs, field) in [
                (&grants.read_dirs, "read_paths"),
                (&grants.write_dirs, "write_paths"),
            ] {
                for (index, dir) in dirs.iter().enumerate() {
                    if !dir.is_absolute() {
                        problem(
                            &format!("/capabilities/{field}/{index}"),
                            format!("{} must be an absolute path", dir.display()),
                        );
                    }
                }
            }
            match &executors.wasm {
                None => problem(
                    "/implementation/wasm",
                    "the wasm runtime is unavailable on this server".to_owned(),
                ),
                Some(wasm) => {
                    if let Err(error) = wasm.policy().check(&grants, "capabilities") {
                        problem("/capabilities", error.message);
                    }
                }
            }
        }
        ToolImplementation::Http {
            url,
            method,
            headers,
        } => {
            for (pointer, message) in wasm_only_problems("http", caps) {
                problem(&pointer, message);
            }
            if !METHODS.contains(&method.as_str()) {
                problem(
                    "/implementation/http/method",
                    format!(
                        "unknown method {method:?}; use one of {}",
                        METHODS.join(", ")
                    ),
                );
            }
            for (pointer, message) in endpoint_problems("http", url, headers, caps, executors) {
                problem(&pointer, message);
            }
        }
        ToolImplementation::Mcp { url, tool, headers } => {
            for (pointer, message) in wasm_only_problems("mcp", caps) {
                problem(&pointer, message);
            }
            if tool.trim().is_empty() || tool.len() > 128 {
                problem(
                    "/implementation/mcp/tool",
                    "must name the server's tool (1 to 128 bytes)".to_owned(),
                );
            }
            for (pointer, message) in endpoint_problems("mcp", url, headers, caps, executors) {
                problem(&pointer, message);
            }
        }
    }
    problems
}

/// Capabilities that apply to wasm tools only, given to an `http` or `mcp` tool (`kind`), as
/// `(pointer, message)`.
fn wasm_only_problems(kind: &str, caps: &Capabilities) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    for (field, present) in [
        ("read_paths", !caps.read_paths.is_empty()),
        ("write_paths", !caps.write_paths.is_empty()),
        ("memory_mb", caps.memory_mb.is_some()),
        ("cpu_ms", caps.cpu_ms.is_some()),
    ] {
        if present {
            problems.push((
                format!("/capabilities/{field}"),
                format!("applies to wasm tools only; an {kind} tool runs no code here"),
            ));
        }
    }
    problems
}

/// Problems of the endpoint of an `http` or `mcp` tool (`kind`): the URL (http, no
/// credentials, a host among the capabilities' hosts and the server's allowed hosts) and the
/// header templates, as `(pointer, message)`.
fn endpoint_problems(
    kind: &str,
    url: &str,
    headers: &BTreeMap<String, String>,
    caps: &Capabilities,
    executors: &Executors,
) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    let mut problem = |pointer: &str, message: String| problems.push((pointer.to_owned(), message));
    let url_pointer = format!("/implementation/{kind}/url");
    match reqwest::Url::parse(url) {
        Err(error) => problem(&url_pointer, format!("{url:?} is not a valid URL: {error}")),
        // MCP's client speaks plain http only (its HTTP stack is built without TLS).
        Ok(parsed) if kind == "mcp" && parsed.scheme() != "http" => problem(
            &url_pointer,
            format!(
                "scheme {:?} is not supported for MCP servers; use http",
                parsed.scheme()
            ),
        ),
        Ok(parsed) if !matches!(parsed.scheme(), "http" | "https") => problem(
            &url_pointer,
            format!(
                "scheme {:?} is not supported; use http or https",
                parsed.scheme()
            ),
        ),
        Ok(parsed) if !parsed.username().is_empty() || parsed.password().is_some() => problem(
            &url_pointer,
            "must not hold credentials (user:password@); send them in a header templated \
             from a secret"
                .to_owned(),
        ),
        Ok(parsed) => {
            if parsed.host_str().is_none() {
                problem(&url_pointer, format!("{url:?} has no host"));
            } else if !crate::http::hosts_allow(&caps.hosts, &parsed) {
                problem(
                    "/capabilities/hosts",
                    format!(
                        "the url's host {} is not among the capabilities' hosts",
                        parsed.host_str().unwrap_or_default()
                    ),
                );
            } else if !executors.http.allows(&parsed) {
                problem(
                    &url_pointer,
                    format!(
                        "host {} is not in this server's allowed hosts ([tools.http] \
                         allowed_hosts)",
                        parsed.host_str().unwrap_or_default()
                    ),
                );
            }
        }
    }
    let secrets: BTreeMap<&str, &str> = caps
        .secrets
        .iter()
        .map(|name| (name.as_str(), "xxxx"))
        .collect();
    for (name, template) in headers {
        let pointer = format!("/implementation/{kind}/headers/{name}");
        let lower = name.to_ascii_lowercase();
        if RESERVED_HEADERS.contains(&lower.as_str()) {
            problem(&pointer, format!("header {name:?} is set by the tool"));
            continue;
        }
        if let Err(error) = render_header(template, &secrets) {
            problem(&pointer, error);
        }
    }
    problems
}

/// Renders a header template over `secrets` (strict: a secret that is not granted is an
/// error naming it).
fn render_header(template: &str, secrets: &BTreeMap<&str, &str>) -> Result<String, String> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.render_str(template, minijinja::context! { secrets => secrets })
        .map_err(|error| {
            let mut message = format!("template {template:?}: {error}");
            if error.kind() == minijinja::ErrorKind::UndefinedError {
                message.push_str(
                    " (only the secrets the capabilities list can be read, as secrets.<NAME>)",
                );
            }
            message
        })
}

/// The grants of a module: the capabilities' directories and the secrets as variables.
fn wasm_grants(caps: &Capabilities, vars: Vec<(String, String)>) -> WasmGrants {
    WasmGrants {
        env: Vec::new(),
        read_dirs: caps.read_paths.iter().map(PathBuf::from).collect(),
        write_dirs: caps.write_paths.iter().map(PathBuf::from).collect(),
        vars,
    }
}

/// Replaces secret values in text. Besides each value as it is, a mask knows each line of a
/// multi-line value (a PEM key is logged line by line) and the value as JSON and Rust
/// `Debug` escape it (quoted output); text that ends with the start of a value (a line cut
/// at a length bound; at least `CUT_VALUE_MIN_BYTES` = 8 bytes of it) has that end masked too. Values shorter than
/// [`SECRET_VALUE_MIN_BYTES`] are left out: they would mask ordinary text.
#[derive(Clone, Default)]
pub struct Mask {
    /// Longest first, so that a value containing another is masked whole.
    values: Vec<String>,
}

impl std::fmt::Debug for Mask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mask")
            .field("values", &self.values.len())
            .finish()
    }
}

impl Mask {
    /// A mask of these values.
    pub fn new(values: &[String]) -> Self {
        let mut forms = Vec::new();
        for value in values {
            forms.push(value.clone());
            forms.extend(value.lines().map(str::to_owned));
            if let Ok(json) = serde_json::to_string(value) {
                forms.push(json[1..json.len() - 1].to_owned());
            }
            let debug = format!("{value:?}");
            forms.push(debug[1..debug.len() - 1].to_owned());
        }
        let mut values: Vec<String> = forms
            .into_iter()
            .filter(|v| v.trim().len() >= SECRET_VALUE_MIN_BYTES)
            .collect();
        values.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        values.dedup();
        Self { values }
    }

    /// `text` with every value replaced by [`MASK`].
    pub fn text(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for value in &self.values {
            if out.contains(value.as_str()) {
                out = out.replace(value.as_str(), MASK);
            }
        }
        // A text cut inside a value ends with the value's start.
        for value in &self.values {
            let longest = (CUT_VALUE_MIN_BYTES..value.len())
                .rev()
                .filter(|end| value.is_char_boundary(*end))
                .find(|end| out.ends_with(&value[..*end]));
            if let Some(end) = longest {
                out.truncate(out.len() - end);
                out.push_str(MASK);
            }
        }
        out
    }

    /// Every string of a JSON value (object keys too) masked.
    pub fn json(&self, value: Value) -> Value {
        if self.values.is_empty() {
            return value;
        }
        match value {
            Value::String(text) => Value::String(self.text(&text)),
            Value::Array(items) => Value::Array(items.into_iter().map(|v| self.json(v)).collect()),
            Value::Object(map) => Value::Object(
                map.into_iter()
                    .map(|(k, v)| (self.text(&k), self.json(v)))
                    .collect(),
            ),
            other => other,
        }
    }
}

/// A log sink that masks secret values before the lines reach the task's log.
struct MaskedLogs {
    inner: Arc<dyn LogSink>,
    mask: Mask,
}

#[async_trait]
impl LogSink for MaskedLogs {
    async fn write(&self, stream: LogStream, text: &str) {
        self.inner.write(stream, &self.mask.text(text)).await;
    }
}

/// One version of an org's registered tool, ready to execute; built by a resolver from its
/// [`StoredTool`] and cached (versions never change).
pub struct RegisteredTool {
    reference: String,
    manifest: ToolManifest,
    inputs: jsonschema::Validator,
    outputs: jsonschema::Validator,
    executors: Executors,
    secrets: Arc<dyn SecretReader>,
}

impl std::fmt::Debug for RegisteredTool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisteredTool")
            .field("reference", &self.reference)
            .finish_non_exhaustive()
    }
}

impl RegisteredTool {
    /// The executor of `stored`, which runs on `executors` and reads its secrets from
    /// `secrets`.
    ///
    /// # Errors
    /// The stored manifest no longer decodes or its schemas no longer compile (permanent,
    /// naming the tool).
    pub fn new(
        stored: &StoredTool,
        executors: Executors,
        secrets: Arc<dyn SecretReader>,
    ) -> Result<Self, ToolError> {
        let reference = stored.reference();
        let manifest = stored.decode().map_err(|error| {
            ToolError::permanent(format!(
                "the registration of tool `{reference}` does not decode: {error}"
            ))
        })?;
        let compile = |schema: &Value, what: &str| {
            jsonschema::validator_for(schema).map_err(|error| {
                ToolError::permanent(format!(
                    "the {what} schema of tool `{reference}` does not compile: {error}"
                ))
            })
        };
        let inputs = compile(&manifest.input_schema, "input")?;
        let outputs = compile(&manifest.output_schema, "output")?;
        Ok(Self {
            reference,
            manifest,
            inputs,
            outputs,
            executors,
            secrets,
        })
    }

    async fn run_wasm(
        &self,
        module: arches_core::ArtifactId,
        context: &ToolContext,
        inputs: &Value,
        vars: Vec<(String, String)>,
        logs: &dyn LogSink,
    ) -> Result<Value, ToolError> {
        let Some(wasm) = &self.executors.wasm else {
            return Err(ToolError::permanent(
                "the wasm runtime is unavailable on this worker",
            ));
        };
        let record = context.artifacts.get(module).await.map_err(|error| {
            store_error(&format!("cannot read module artifact {module}"), error)
        })?;
        if record.meta.org_id != context.org_id {
            return Err(ToolError::permanent(format!(
                "module artifact {module} does not belong to the run's org"
            )));
        }
        let path = context
            .artifacts
            .local_path(module)
            .await
            .map_err(|error| {
                store_error(&format!("cannot open module artifact {module}"), error)
            })?;
        let caps = &self.manifest.capabilities;
        let cpu = Duration::from_millis(caps.cpu_ms.unwrap_or(DEFAULT_CPU_MS));
        let memory_mb = caps.memory_mb.map_or(DEFAULT_MEMORY_MB, u64::from);
        let limits = WasmLimits {
            cpu,
            timeout: Some(caps.timeout.unwrap_or(cpu * DEFAULT_WALL_PER_CPU)),
            memory_bytes: memory_mb * 1024 * 1024,
        };
        let grants = wasm_grants(caps, vars);
        wasm.call_file(&path, inputs, &limits, &grants, logs).await
    }

    async fn run_http(
        &self,
        context: ToolContext,
        inputs: Value,
        secrets: BTreeMap<&str, &str>,
    ) -> Result<Value, ToolError> {
        let ToolImplementation::Http {
            url,
            method,
            headers,
        } = &self.manifest.implementation
        else {
            return Err(ToolError::permanent("not an http tool"));
        };
        let mut rendered = serde_json::Map::new();
        for (name, template) in headers {
            let value = render_header(template, &secrets).map_err(|error| {
                ToolError::permanent(format!(
                    "header {name:?} of tool `{}`: {error}",
                    self.reference
                ))
            })?;
            rendered.insert(name.clone(), Value::String(value));
        }
        let mut request = json!({
            "method": method,
            "url": url,
            "headers": rendered,
            "body": inputs,
        });
        if let Some(timeout) = self.manifest.capabilities.timeout {
            request["timeout"] = json!(format_duration(timeout));
        }
        // Headers carrying secrets go to the URL's own host only: a redirect elsewhere (even
        // to another host of the capabilities) is not followed.
        let mut hosts = self.manifest.capabilities.hosts.clone();
        if !secrets.is_empty() && !headers.is_empty() {
            if let Ok(parsed) = reqwest::Url::parse(url) {
                hosts = vec![format!(
                    "{}:{}",
                    parsed.host_str().unwrap_or_default(),
                    parsed.port_or_known_default().unwrap_or(80)
                )];
            }
        }
        let response = self
            .executors
            .http
            .execute_within(context, request, &hosts)
            .await?;
        Ok(response.get("body").cloned().unwrap_or(Value::Null))
    }
}

impl RegisteredTool {
    async fn run_mcp(
        &self,
        inputs: Value,
        secrets: BTreeMap<&str, &str>,
        logs: &dyn LogSink,
    ) -> Result<Value, ToolError> {
        let ToolImplementation::Mcp { url, tool, headers } = &self.manifest.implementation else {
            return Err(ToolError::permanent("not an mcp tool"));
        };
        // Checked on registration; checked again here since the server's allowed hosts may
        // have changed since.
        let parsed = reqwest::Url::parse(url).map_err(|error| {
            ToolError::permanent(format!("the url of tool `{}`: {error}", self.reference))
        })?;
        if !crate::http::hosts_allow(&self.manifest.capabilities.hosts, &parsed)
            || !self.executors.http.allows(&parsed)
        {
            return Err(ToolError::permanent(format!(
                "host {} of tool `{}` is not allowed (capabilities' hosts and [tools.http] \
                 allowed_hosts)",
                parsed.host_str().unwrap_or_default(),
                self.reference
            )));
        }
        let mut rendered = Vec::with_capacity(headers.len());
        for (name, template) in headers {
            let value = render_header(template, &secrets).map_err(|error| {
                ToolError::permanent(format!(
                    "header {name:?} of tool `{}`: {error}",
                    self.reference
                ))
            })?;
            rendered.push((name.clone(), value));
        }
        let call = crate::mcp::McpCall {
            url: url.clone(),
            tool: tool.clone(),
            headers: rendered,
            timeout: self
                .manifest
                .capabilities
                .timeout
                .unwrap_or(crate::mcp::DEFAULT_MCP_TIMEOUT),
        };
        let started = std::time::Instant::now();
        let result = crate::mcp::call_tool(&call, inputs).await;
        logs.write(
            LogStream::System,
            &format!(
                "mcp: tools/call {tool} at {url}: {} in {} ms",
                if result.is_ok() { "ok" } else { "failed" },
                started.elapsed().as_millis()
            ),
        )
        .await;
        result
    }
}

#[async_trait]
impl Tool for RegisteredTool {
    fn name(&self) -> &str {
        &self.reference
    }

    fn description(&self) -> &str {
        &self.manifest.description
    }

    fn input_schema(&self) -> Value {
        self.manifest.input_schema.clone()
    }

    fn needs_work_dir(&self) -> bool {
        false
    }

    fn sandboxes(&self) -> &'static [Sandbox] {
        match self.manifest.implementation {
            ToolImplementation::Wasm { .. } => &[Sandbox::Wasm],
            ToolImplementation::Http { .. } | ToolImplementation::Mcp { .. } => &[],
        }
    }

    async fn execute(&self, context: ToolContext, inputs: Value) -> Result<Value, ToolError> {
        schema_violations(&self.inputs, &inputs, "/with").map_err(|problems| {
            ToolError::permanent(format!(
                "inputs of tool `{}` break its schema: {problems}",
                self.reference
            ))
        })?;
        let names = &self.manifest.capabilities.secrets;
        let values = if names.is_empty() {
            Vec::new()
        } else {
            self.secrets.reveal(context.org_id, names).await?
        };
        let mask = Mask::new(&values);
        let logs: Arc<dyn LogSink> = Arc::new(MaskedLogs {
            inner: context.logs.clone(),
            mask: mask.clone(),
        });
        let result = match &self.manifest.implementation {
            ToolImplementation::Wasm { module } => {
                let vars = names
                    .iter()
                    .map(|name| name.to_string())
                    .zip(values.iter().cloned())
                    .collect();
                self.run_wasm(*module, &context, &inputs, vars, logs.as_ref())
                    .await
            }
            ToolImplementation::Http { .. } => {
                let secrets = names
                    .iter()
                    .map(|name| name.as_str())
                    .zip(values.iter().map(String::as_str))
                    .collect();
                let context = ToolContext { logs, ..context };
                self.run_http(context, inputs, secrets).await
            }
            ToolImplementation::Mcp { .. } => {
                let secrets = names
                    .iter()
                    .map(|name| name.as_str())
                    .zip(values.iter().map(String::as_str))
                    .collect();
                self.run_mcp(inputs, secrets, logs.as_ref()).await
            }
        };
        let document = result.map_err(|error| ToolError {
            message: mask.text(&error.message),
            retryable: error.retryable,
        })?;
        schema_violations(&self.outputs, &document, "outputs").map_err(|problems| {
            ToolError::permanent(mask.text(&format!(
                "the result of tool `{}` breaks its output schema: {problems}",
                self.reference
            )))
        })?;
        Ok(match mask.json(document) {
            Value::Object(map) => Value::Object(map),
            other => json!({ "output": other }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_catch_lines_escaped_forms_and_cut_ends_of_values() {
        let pem = "-----BEGIN KEY-----\nMIIEvQIBADANBgkqhkiG\n-----END KEY-----".to_owned();
        let json = r#"{"client_secret": "abc-123-xyz"}"#.to_owned();
        let mask = Mask::new(&[pem, json.clone()]);
        // Logged line by line.
        assert_eq!(mask.text("MIIEvQIBADANBgkqhkiG"), MASK);
        // Quoted with escapes.
        let quoted = format!("stdout starts with: {json:?}");
        assert_eq!(
            mask.text(&quoted),
            format!("stdout starts with: \"{MASK}\"")
        );
        let escaped = serde_json::to_string(&json).unwrap();
        assert_eq!(mask.text(&escaped), format!("\"{MASK}\""));
        // Cut at a length bound.
        assert_eq!(mask.text("error: MIIEvQIBAD"), format!("error: {MASK}"));
        assert_eq!(
            mask.text("ends with MII"),
            "ends with MII",
            "short starts stay"
        );
        assert!(!format!("{mask:?}").contains("MII"));
    }

    #[test]
    fn masks_replace_longest_values_first_and_skip_short_ones() {
        let mask = Mask::new(&["abc".into(), "token-1".into(), "token-12".into()]);
        assert_eq!(mask.text("a token-12 and token-1 abc"), "a *** and *** abc");
        let json = mask.json(json!({"k token-1": ["token-12", 3, {"x": "token-1!"}]}));
        assert_eq!(json, json!({"k ***": ["***", 3, {"x": "***!"}]}));
    }
}
