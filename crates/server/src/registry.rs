//! The org side of tools: the tools an org registered (resolved for the engine's workers and
//! offered to pipeline validation beside the built-in ones) and the org's secrets (sealed
//! with the configured master keys, opened only for the tools whose capabilities name them).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use arches_auth::sealing::{Keyring, SealingError};
use arches_core::pipeline::{PipelineDef, ToolCatalog};
use arches_core::ports::{
    SecretReader, Store, StoreError, Tool, ToolError, ToolRegistry, ToolResolver,
};
use arches_core::tooldef::{
    Sandbox, StoredSecret, ToolImplementation, ToolManifest, ToolReference,
};
use arches_core::{OrgId, SecretName};
use arches_tools::{Executors, RegisteredTool};
use async_trait::async_trait;
use serde_json::Value;

/// Most registered tool versions a resolver keeps built (versions never change, so an entry
/// is never stale; the oldest is dropped past this).
pub const RESOLVED_TOOLS_MAX: usize = 256;

/// Most distinct tool names one pipeline source is searched for.
pub const REFERENCES_MAX: usize = 1_000;

/// The tool names a pipeline source's tasks and compensations write (`tool:`), distinct,
/// at most [`REFERENCES_MAX`]; empty when the source does not parse (validation reports
/// why).
pub fn tool_references(file: &str, text: &str) -> Vec<String> {
    let Ok((value, _)) = arches_core::pipeline::source::parse_document(file, text) else {
        return Vec::new();
    };
    let mut names = std::collections::BTreeSet::new();
    for task in value
        .get("tasks")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        for pointer in ["/tool", "/compensate/tool"] {
            if let Some(name) = task.pointer(pointer).and_then(Value::as_str) {
                if names.len() < REFERENCES_MAX {
                    names.insert(name.to_owned());
                }
            }
        }
    }
    names.into_iter().collect()
}

/// The associated data a secret is sealed with: its org and name, so that a ciphertext
/// copied to another org or name does not open.
pub fn secret_aad(org: OrgId, name: &str) -> Vec<u8> {
    format!("arches-secret/v1/{org}/{name}").into_bytes()
}

/// Opens a stored secret.
///
/// # Errors
/// The keyring's: an unconfigured key, a tampered row, a value that is not UTF-8.
pub fn open_secret(keyring: &Keyring, secret: &StoredSecret) -> Result<String, SealingError> {
    let clear = keyring.open(
        &secret.key_id,
        &secret.nonce,
        &secret.ciphertext,
        &secret_aad(secret.org_id, secret.name.as_str()),
    )?;
    String::from_utf8(clear.to_vec()).map_err(|_| SealingError::Tampered)
}

/// Reads secrets from the store and opens them with the keyring.
pub struct SealedSecrets {
    store: Arc<dyn Store>,
    keyring: Option<Arc<Keyring>>,
}

impl SealedSecrets {
    /// Secrets of `store`, opened with `keyring` (`None`: no master key configured, every
    /// secret read fails saying so).
    pub fn new(store: Arc<dyn Store>, keyring: Option<Arc<Keyring>>) -> Self {
        Self { store, keyring }
    }
}

fn tool_store_error(what: &str, error: StoreError) -> ToolError {
    let message = format!("{what}: {error}");
    match error {
        StoreError::Unavailable(_) | StoreError::DiskFull(_) | StoreError::Backend(_) => {
            ToolError::transient(message)
        }
        _ => ToolError::permanent(message),
    }
}

#[async_trait]
impl SecretReader for SealedSecrets {
    async fn reveal(&self, org: OrgId, names: &[SecretName]) -> Result<Vec<String>, ToolError> {
        if self.keyring.is_none() {
            return Err(ToolError::permanent(
                "this server has no master key for secrets ([secrets] keys), so none can be read",
            ));
        }
        arches_core::ports::every_secret_set(names, self.reveal_set(org, names).await?)
    }

    async fn reveal_set(
        &self,
        org: OrgId,
        names: &[SecretName],
    ) -> Result<Vec<Option<String>>, ToolError> {
        // Without a master key no secret could have been stored.
        let Some(keyring) = &self.keyring else {
            return Ok(vec![None; names.len()]);
        };
        let mut values = Vec::with_capacity(names.len());
        for name in names {
            let secret = self
                .store
                .secret(org, name.as_str())
                .await
                .map_err(|error| tool_store_error(&format!("cannot read secret {name}"), error))?;
            let value = match secret {
                Some(secret) => Some(
                    open_secret(keyring, &secret)
                        .map_err(|error| ToolError::permanent(format!("secret {name}: {error}")))?,
                ),
                None => None,
            };
            values.push(value);
        }
        Ok(values)
    }
}

/// Resolves `name@version` (or `name`, the latest) to an org's registered tool, built once
/// per version.
pub struct OrgTools {
    store: Arc<dyn Store>,
    executors: Executors,
    secrets: Arc<dyn SecretReader>,
    built: Mutex<BuiltTools>,
}

#[derive(Default)]
struct BuiltTools {
    by_version: HashMap<(OrgId, String, u32), Arc<RegisteredTool>>,
    order: VecDeque<(OrgId, String, u32)>,
}

impl OrgTools {
    /// A resolver reading registrations from `store`, running them on `executors`, with
    /// secrets from `secrets`.
    pub fn new(
        store: Arc<dyn Store>,
        executors: Executors,
        secrets: Arc<dyn SecretReader>,
    ) -> Self {
        Self {
            store,
            executors,
            secrets,
            built: Mutex::default(),
        }
    }

    fn built(&self) -> std::sync::MutexGuard<'_, BuiltTools> {
        self.built
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl ToolResolver for OrgTools {
    async fn resolve(
        &self,
        org: OrgId,
        reference: &str,
    ) -> Result<Option<Arc<dyn Tool>>, ToolError> {
        let Some(reference) = ToolReference::parse(reference) else {
            return Ok(None);
        };
        if let Some(version) = reference.version {
            let key = (org, reference.name.clone(), version);
            if let Some(tool) = self.built().by_version.get(&key) {
                return Ok(Some(tool.clone()));
            }
        }
        let Some(stored) = self
            .store
            .tool(org, &reference.name, reference.version)
            .await
            .map_err(|error| tool_store_error("cannot read the tool registry", error))?
        else {
            return Ok(None);
        };
        let key = (org, stored.name.clone(), stored.version);
        if let Some(tool) = self.built().by_version.get(&key) {
            return Ok(Some(tool.clone()));
        }
        let tool = Arc::new(RegisteredTool::new(
            &stored,
            self.executors.clone(),
            self.secrets.clone(),
        )?);
        let mut built = self.built();
        if !built.by_version.contains_key(&key) {
            if built.order.len() >= RESOLVED_TOOLS_MAX {
                if let Some(oldest) = built.order.pop_front() {
                    built.by_version.remove(&oldest);
                }
            }
            built.order.push_back(key.clone());
            built.by_version.insert(key, tool.clone());
        }
        Ok(Some(tool))
    }
}

/// The tools a pipeline of one org may name: the built-in ones and the org's registered
/// ones, as `name` (latest) or `name@version`.
pub struct OrgCatalog<'a> {
    builtin: &'a ToolRegistry,
    /// Every loaded version by `name@version`, and the latest by `name`.
    registered: BTreeMap<String, (String, ToolManifest)>,
}

impl<'a> OrgCatalog<'a> {
    /// The built-in tools, the latest version of each of `org`'s registered tools (at most
    /// the org's tool count, which registration bounds), and the versions `references`
    /// pin (`name@version`, as a pipeline's tasks name them; see [`tool_references`]).
    ///
    /// # Errors
    /// The store's.
    pub async fn load(
        builtin: &'a ToolRegistry,
        store: &dyn Store,
        org: OrgId,
        references: &[String],
    ) -> Result<OrgCatalog<'a>, StoreError> {
        let mut registered = BTreeMap::new();
        for latest in store.tools(org).await? {
            if let Ok(manifest) = latest.decode() {
                registered.insert(latest.name.clone(), (latest.reference(), manifest));
            }
        }
        for reference in references {
            if builtin.get(reference).is_some() || registered.contains_key(reference) {
                continue;
            }
            let Some(ToolReference {
                name,
                version: Some(version),
            }) = ToolReference::parse(reference)
            else {
                continue;
            };
            if let Some(stored) = store.tool(org, &name, Some(version)).await? {
                if let Ok(manifest) = stored.decode() {
                    registered.insert(stored.reference(), (stored.reference(), manifest));
                }
            }
        }
        Ok(Self {
            builtin,
            registered,
        })
    }

    /// Rewrites every task (and compensation) naming a registered tool by `name` to its
    /// `name@version`, so that the stored pipeline keeps running the version it was validated
    /// against. Returns how many names were pinned.
    pub fn pin(&self, def: &mut PipelineDef) -> usize {
        let mut pinned = 0;
        let mut pin_one = |tool: &mut String| {
            if self.builtin.get(tool).is_some() || tool.contains('@') {
                return;
            }
            if let Some((reference, _)) = self.registered.get(tool.as_str()) {
                *tool = reference.clone();
                pinned += 1;
            }
        };
        for task in &mut def.tasks {
            pin_one(&mut task.tool);
            if let Some(compensate) = &mut task.compensate {
                pin_one(&mut compensate.tool);
            }
        }
        pinned
    }
}

impl ToolCatalog for OrgCatalog<'_> {
    fn input_schema(&self, tool: &str) -> Option<Value> {
        ToolCatalog::input_schema(self.builtin, tool).or_else(|| {
            self.registered
                .get(tool)
                .map(|(_, manifest)| manifest.input_schema.clone())
        })
    }

    fn tool_names(&self) -> Vec<String> {
        let mut names = ToolCatalog::tool_names(self.builtin);
        names.extend(
            self.registered
                .keys()
                .filter(|key| !key.contains('@'))
                .cloned(),
        );
        names
    }

    fn implied_dependencies(&self, tool: &str, inputs: &Value, task_ids: &[&str]) -> Vec<String> {
        ToolCatalog::implied_dependencies(self.builtin, tool, inputs, task_ids)
    }

    fn sandboxes(&self, tool: &str) -> Vec<Sandbox> {
        if self.builtin.get(tool).is_some() {
            return ToolCatalog::sandboxes(self.builtin, tool);
        }
        match self.registered.get(tool) {
            Some((_, manifest)) => match manifest.implementation {
                ToolImplementation::Wasm { .. } => vec![Sandbox::Wasm],
                ToolImplementation::Http { .. } | ToolImplementation::Mcp { .. } => Vec::new(),
            },
            None => Vec::new(),
        }
    }
}
