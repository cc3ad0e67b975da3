//! Tools an org registers: a WASM module, an HTTP endpoint or a tool of an MCP server, with
//! JSON Schemas of its inputs
//! and outputs and the capabilities it is granted (hosts, paths, secrets, memory and time).
//!
//! A registered tool is versioned like a pipeline: registering a manifest under a name stores
//! version 1, 2, 3…; registering one identical to a stored version returns that version. A
//! pipeline names a registered tool as `name` (the latest version when the pipeline is saved,
//! which is then pinned into the stored definition as `name@version`) or `name@version`.
//!
//! The checks that need the tools' own rules (host patterns, schema compilation) live with the
//! executors in `arches-tools`; this module holds the model only.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::{ArtifactId, OrgId, SecretName, ToolName};
use crate::pipeline::optional_duration;
use crate::time::Timestamp;

/// The largest memory a registered tool may ask for, in MiB (4 GiB: a wasm32 module cannot
/// address more).
pub const MEMORY_MB_MAX: u32 = 4096;
/// The largest CPU budget a registered tool may ask for, in milliseconds (one hour).
pub const CPU_MS_MAX: u64 = 3_600_000;
/// The most secrets one tool may be granted.
pub const SECRETS_PER_TOOL_MAX: usize = 64;
/// The shortest secret value, in bytes: values are masked wherever they appear in a task's
/// logs, outputs and errors, and a shorter one would mask ordinary text.
pub const SECRET_VALUE_MIN_BYTES: usize = 4;
/// The longest secret value, in bytes.
pub const SECRET_VALUE_MAX_BYTES: usize = 65_536;

/// What an org registers: the tool's name, description, schemas, implementation and
/// capabilities.
///
/// ```yaml
/// name: geocode
/// description: Looks an address up
/// input_schema: {type: object, required: [address], properties: {address: {type: string}}}
/// output_schema: {type: object, required: [lat, lon]}
/// implementation:
///   http: {url: "http://geo.internal:8080/lookup", headers: {Authorization: "Bearer {{ secrets.GEO_KEY }}"}}
/// capabilities: {hosts: ["geo.internal:8080"], secrets: [GEO_KEY], timeout: 10s}
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolManifest {
    /// The name pipelines use; built-in tool names are reserved.
    pub name: ToolName,
    /// One line for listings.
    #[serde(default)]
    pub description: String,
    /// JSON Schema (draft 2020-12) of the inputs (`with`); an object schema. Any object when
    /// absent.
    #[serde(default = "any_object")]
    pub input_schema: Value,
    /// JSON Schema of the outputs; outputs that break it fail the attempt. Anything when
    /// absent.
    #[serde(default = "any_value")]
    pub output_schema: Value,
    /// What executes the tool.
    pub implementation: ToolImplementation,
    /// What the tool may touch; nothing by default.
    #[serde(default)]
    pub capabilities: Capabilities,
}

fn any_object() -> Value {
    serde_json::json!({"type": "object"})
}

fn any_value() -> Value {
    serde_json::json!({})
}

/// What executes a registered tool.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ToolImplementation {
    /// A WASI (preview 1) module stored as an artifact of the org: the inputs arrive as JSON
    /// on stdin, the outputs are the JSON the module writes on stdout.
    Wasm {
        /// The artifact holding the module (binary `.wasm` or text `.wat`).
        module: ArtifactId,
    },
    /// An HTTP endpoint: the inputs are sent as the JSON body, the JSON response body is the
    /// output. Header values are templates over `secrets` (the granted secrets only).
    Http {
        /// `http://host[:port]/path`; its host must be among the capabilities' hosts.
        url: String,
        /// The method; `POST` by default.
        #[serde(default = "default_method")]
        method: String,
        /// Request headers.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        headers: BTreeMap<String, String>,
    },
    /// One tool of a Model Context Protocol server, called over the streamable HTTP
    /// transport (`initialize`, then `tools/call`): the inputs are the call's arguments, the
    /// outputs its structured content (or its text content). Header values are templates over
    /// `secrets`, as for `http`.
    Mcp {
        /// The server's MCP endpoint, `http://host[:port]/path` (often `/mcp`); its host must
        /// be among the capabilities' hosts.
        url: String,
        /// The tool's name on that server.
        tool: String,
        /// Request headers (for example `Authorization`).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        headers: BTreeMap<String, String>,
    },
}

fn default_method() -> String {
    "POST".to_owned()
}

impl ToolImplementation {
    /// `wasm`, `http` or `mcp`.
    pub fn kind(&self) -> &'static str {
        match self {
            ToolImplementation::Wasm { .. } => "wasm",
            ToolImplementation::Http { .. } => "http",
            ToolImplementation::Mcp { .. } => "mcp",
        }
    }
}

/// What a registered tool may touch. Everything not listed is denied.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    /// Hosts the tool may reach (`host`, `host:port`, `*.suffix`, `*`); for an `http` or
    /// `mcp` tool.
    /// The server's `[tools.http]` allow-list still applies on top.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Directories of the worker a `wasm` tool may read (preopened read-only, at the same
    /// path). The server's `[tools.wasm]` allow-list still applies on top.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub read_paths: Vec<String>,
    /// Directories of the worker a `wasm` tool may read and write.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub write_paths: Vec<String>,
    /// The org's secrets the tool may read: environment variables of a `wasm` module,
    /// `secrets.<name>` in an `http` tool's header templates. Their values are masked in the
    /// task's logs, outputs and errors.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<SecretName>,
    /// Linear memory of a `wasm` module, in MiB (at most [`MEMORY_MB_MAX`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u32>,
    /// CPU budget of a `wasm` module per attempt, in milliseconds (at most [`CPU_MS_MAX`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_ms: Option<u64>,
    /// Wall-clock bound of one call (the task's own `timeout` still applies).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "optional_duration"
    )]
    pub timeout: Option<Duration>,
}

/// One stored version of a registered tool.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredTool {
    /// The org that registered it; names are unique per org.
    pub org_id: OrgId,
    /// The tool's name.
    pub name: String,
    /// 1, 2, 3… per name, in the order versions were registered.
    pub version: u32,
    /// SHA-256 (hex) of the canonical JSON of the manifest.
    pub digest: String,
    /// The manifest, as canonical JSON of [`ToolManifest`].
    pub manifest: Value,
    /// When this version was first registered.
    pub created_at: Timestamp,
}

impl StoredTool {
    /// The manifest, decoded.
    ///
    /// # Errors
    /// The stored JSON no longer decodes (written by an incompatible version).
    pub fn decode(&self) -> Result<ToolManifest, serde_json::Error> {
        serde_json::from_value(self.manifest.clone())
    }

    /// `name@version`: how a stored pipeline definition names this version.
    pub fn reference(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

/// A pipeline's reference to a registered tool: `name` (the latest version) or
/// `name@version`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolReference {
    /// The tool's name.
    pub name: String,
    /// The pinned version, if any.
    pub version: Option<u32>,
}

impl ToolReference {
    /// Splits `name@version`; `None` when the text after `@` is not a version number ≥ 1.
    pub fn parse(text: &str) -> Option<Self> {
        match text.split_once('@') {
            None => Some(Self {
                name: text.to_owned(),
                version: None,
            }),
            Some((name, version)) => {
                let version: u32 = version.parse().ok().filter(|v| *v >= 1)?;
                Some(Self {
                    name: name.to_owned(),
                    version: Some(version),
                })
            }
        }
    }
}

/// One stored secret of an org, sealed: the value is never stored in clear.
///
/// The ciphertext is XChaCha20-Poly1305 under the master key `key_id`, with the org and the
/// name as associated data, so a ciphertext moved to another org or name does not open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredSecret {
    /// The org it belongs to.
    pub org_id: OrgId,
    /// Its name, unique per org.
    pub name: SecretName,
    /// 1 when created, +1 on every new value (re-sealing under another key keeps it).
    pub version: u32,
    /// The id of the master key that sealed it.
    pub key_id: String,
    /// The nonce (24 bytes for XChaCha20-Poly1305).
    pub nonce: Vec<u8>,
    /// The sealed value with its authentication tag.
    pub ciphertext: Vec<u8>,
    /// When the name was first set.
    pub created_at: Timestamp,
    /// When the value last changed.
    pub updated_at: Timestamp,
}

/// The sandboxes code can run in, strongest first: the order `sandbox: auto` picks in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sandbox {
    /// A WebAssembly module on wasmtime: nothing granted by default, CPU, memory and time
    /// bounded.
    Wasm,
    /// An operating-system process with resource limits, its own session and process group,
    /// a scrubbed environment, and no network and private mounts where the kernel allows.
    Process,
}

impl Sandbox {
    /// `wasm` or `process`.
    pub fn as_str(self) -> &'static str {
        match self {
            Sandbox::Wasm => "wasm",
            Sandbox::Process => "process",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_read_from_yaml_shaped_json_with_defaults() {
        let manifest: ToolManifest = serde_json::from_value(serde_json::json!({
            "name": "geocode",
            "implementation": {"http": {"url": "http://geo:8080/lookup"}},
            "capabilities": {"hosts": ["geo:8080"], "secrets": ["GEO_KEY"], "timeout": "10s"}
        }))
        .unwrap();
        assert_eq!(manifest.input_schema, serde_json::json!({"type": "object"}));
        assert_eq!(manifest.capabilities.timeout, Some(Duration::from_secs(10)));
        match &manifest.implementation {
            ToolImplementation::Http { method, .. } => assert_eq!(method, "POST"),
            other => panic!("unexpected {other:?}"),
        }
        let bad = serde_json::from_value::<ToolManifest>(serde_json::json!({
            "name": "x",
            "implementation": {"wasm": {"module": "not-an-id"}},
        }));
        assert!(bad.is_err());
        let unknown = serde_json::from_value::<ToolManifest>(serde_json::json!({
            "name": "x",
            "implementation": {"http": {"url": "http://a"}},
            "capabilities": {"network": true}
        }));
        assert!(unknown.unwrap_err().to_string().contains("network"));
    }

    #[test]
    fn references_split_name_and_version() {
        assert_eq!(
            ToolReference::parse("geocode@3"),
            Some(ToolReference {
                name: "geocode".into(),
                version: Some(3)
            })
        );
        assert_eq!(ToolReference::parse("geocode").unwrap().version, None);
        assert_eq!(ToolReference::parse("geocode@0"), None);
        assert_eq!(ToolReference::parse("geocode@x"), None);
    }
}
