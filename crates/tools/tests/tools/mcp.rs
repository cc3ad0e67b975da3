//! Registered `mcp` tools against a real MCP server (rmcp's streamable HTTP server on
//! 127.0.0.1), called directly, listed, checked on registration, and called by an agent
//! through the registry.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arches_core::ids::{OrgId, SecretName};
use arches_core::ports::{SecretReader, Tool, ToolError, ToolRegistry, ToolResolver};
use arches_core::time::Timestamp;
use arches_core::tooldef::{StoredTool, ToolManifest};
use arches_tools::mcp::list_tools;
use arches_tools::{
    check_manifest, AgentTool, Executors, HttpPolicy, LlmTool, RegisteredTool, WasmPolicy,
    RESERVED_TOOL_NAMES,
};
use async_trait::async_trait;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, ListToolsResult,
    PaginatedRequestParams, ServerCapabilities, ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, RoleServer, ServerHandler};
use serde_json::{json, Value};

use super::llm::{clock, completion, http, policy, start, WAIT};
use super::Harness;

/// An MCP server with `add` (structured content) and `fail` (an error result); it records
/// the `Authorization` header of each call it sees.
#[derive(Clone, Default)]
struct Calculator {
    seen: Arc<Mutex<Vec<Option<String>>>>,
}

impl ServerHandler for Calculator {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let schema = json!({
            "type": "object",
            "required": ["a", "b"],
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}
        });
        let Value::Object(schema) = schema else {
            unreachable!("a literal object")
        };
        Ok(ListToolsResult::with_all_items(vec![
            rmcp::model::Tool::new("add", "adds two integers", Arc::new(schema.clone())),
            rmcp::model::Tool::new("fail", "always fails", Arc::new(schema)),
        ]))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let authorization = context
            .extensions
            .get::<axum::http::request::Parts>()
            .and_then(|parts| parts.headers.get("authorization"))
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        self.seen.lock().unwrap().push(authorization);
        let arguments = request.arguments.unwrap_or_default();
        let number = |name: &str| arguments.get(name).and_then(Value::as_i64).unwrap_or(0);
        Ok(match &*request.name {
            "add" => CallToolResult::structured(json!({"sum": number("a") + number("b")})),
            _ => CallToolResult::error(vec![ContentBlock::text("the calculator is broken")]),
        }
        .into())
    }
}

/// Serves `server` at `http://127.0.0.1:<port>/mcp`.
async fn serve(server: Calculator) -> String {
    let service: StreamableHttpService<Calculator, LocalSessionManager> =
        StreamableHttpService::new(
            move || Ok(server.clone()),
            Default::default(),
            StreamableHttpServerConfig::default().with_sse_keep_alive(None),
        );
    let router = axum::Router::new().nest_service("/mcp", service);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    format!("http://{address}/mcp")
}

/// Secrets of the tests: `MCP_TOKEN` only.
struct Secrets;

#[async_trait]
impl SecretReader for Secrets {
    async fn reveal_set(
        &self,
        _org: OrgId,
        names: &[SecretName],
    ) -> Result<Vec<Option<String>>, ToolError> {
        Ok(names
            .iter()
            .map(|name| (name.as_str() == "MCP_TOKEN").then(|| "mcp-secret-token".to_owned()))
            .collect())
    }
}

fn executors() -> Executors {
    Executors::new(HttpPolicy::allowing(["127.0.0.1"]), WasmPolicy::deny_all())
}

fn manifest(url: &str, tool: &str) -> ToolManifest {
    serde_json::from_value(json!({
        "name": "calc",
        "description": "the calculator's add",
        "input_schema": {
            "type": "object", "required": ["a", "b"], "additionalProperties": false,
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}
        },
        "implementation": {"mcp": {
            "url": url, "tool": tool,
            "headers": {"Authorization": "Bearer {{ secrets.MCP_TOKEN }}"}
        }},
        "capabilities": {"hosts": ["127.0.0.1"], "secrets": ["MCP_TOKEN"], "timeout": "10s"}
    }))
    .unwrap()
}

fn registered(manifest: &ToolManifest) -> Arc<RegisteredTool> {
    let stored = StoredTool {
        org_id: OrgId::DEFAULT,
        name: manifest.name.as_str().to_owned(),
        version: 1,
        digest: "test".to_owned(),
        manifest: serde_json::to_value(manifest).unwrap(),
        created_at: Timestamp(0),
    };
    Arc::new(RegisteredTool::new(&stored, executors(), Arc::new(Secrets)).unwrap())
}

#[tokio::test]
async fn a_registered_mcp_tool_calls_the_server_with_its_secret_header() {
    let server = Calculator::default();
    let url = serve(server.clone()).await;
    let manifest = manifest(&url, "add");
    assert_eq!(
        check_manifest(&manifest, &RESERVED_TOOL_NAMES, &executors()),
        Vec::new()
    );
    let tool = registered(&manifest);
    let harness = Harness::new().await;
    let outputs = tokio::time::timeout(
        WAIT,
        tool.execute(
            harness.context("calc", BTreeMap::new()),
            json!({"a": 2, "b": 40}),
        ),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(outputs, json!({"sum": 42}));
    assert_eq!(
        *server.seen.lock().unwrap(),
        vec![Some("Bearer mcp-secret-token".to_owned())]
    );
    let lines = harness.logs.of(arches_core::records::LogStream::System);
    assert!(
        lines
            .iter()
            .any(|line| line.contains("tools/call add") && line.contains(": ok")),
        "{lines:?}"
    );

    // Inputs breaking the manifest's schema never reach the server.
    let error = tool
        .execute(
            harness.context("calc", BTreeMap::new()),
            json!({"a": "x", "b": 1}),
        )
        .await
        .unwrap_err();
    assert!(error.message.contains("/with/a"), "{}", error.message);
    assert_eq!(server.seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn an_mcp_error_result_fails_the_call_permanently_and_a_dead_server_transiently() {
    let url = serve(Calculator::default()).await;
    let harness = Harness::new().await;
    let error = registered(&manifest(&url, "fail"))
        .execute(
            harness.context("calc", BTreeMap::new()),
            json!({"a": 1, "b": 1}),
        )
        .await
        .unwrap_err();
    assert!(!error.retryable);
    assert!(
        error.message.contains("the calculator is broken"),
        "{}",
        error.message
    );

    // Nothing listens on a port just released.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}/mcp", listener.local_addr().unwrap());
    drop(listener);
    let error = registered(&manifest(&dead, "add"))
        .execute(
            harness.context("calc", BTreeMap::new()),
            json!({"a": 1, "b": 1}),
        )
        .await
        .unwrap_err();
    assert!(error.retryable, "{error:?}");
    assert!(error.message.contains("MCP server"), "{}", error.message);
    assert!(!error.message.contains("mcp-secret-token"));
}

#[tokio::test]
async fn mcp_manifests_are_checked_against_hosts_and_the_server_lists_its_tools() {
    let url = serve(Calculator::default()).await;
    let mut outside = manifest("http://elsewhere.example:8080/mcp", "add");
    outside.capabilities.hosts = vec!["elsewhere.example:8080".to_owned()];
    let problems = check_manifest(&outside, &RESERVED_TOOL_NAMES, &executors());
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].pointer, "/implementation/mcp/url");
    assert!(
        problems[0].message.contains("allowed hosts"),
        "{problems:?}"
    );

    let mut unlisted = manifest(&url, "");
    unlisted.capabilities.hosts = vec!["other".to_owned()];
    let pointers: Vec<String> = check_manifest(&unlisted, &RESERVED_TOOL_NAMES, &executors())
        .into_iter()
        .map(|problem| problem.pointer)
        .collect();
    assert_eq!(
        pointers,
        ["/implementation/mcp/tool", "/capabilities/hosts"]
    );

    let tools = list_tools(&url, &[], Duration::from_secs(10))
        .await
        .unwrap();
    let names: Vec<&str> = tools.iter().map(|tool| tool.name.as_str()).collect();
    assert_eq!(names, ["add", "fail"]);
    assert_eq!(tools[0].input_schema["required"], json!(["a", "b"]));
}

/// The org's registered tools of a test: `calc` (any version) is the MCP tool.
struct OrgTools(Arc<RegisteredTool>);

#[async_trait]
impl ToolResolver for OrgTools {
    async fn resolve(
        &self,
        _org: OrgId,
        reference: &str,
    ) -> Result<Option<Arc<dyn Tool>>, ToolError> {
        Ok((reference.split('@').next() == Some("calc")).then(|| self.0.clone() as Arc<dyn Tool>))
    }
}

#[tokio::test]
async fn an_agent_calls_a_registered_mcp_tool_through_the_registry() {
    let server = Calculator::default();
    let url = serve(server.clone()).await;
    let (base, script) = start(vec![
        super::agent::calls(&[("c1", "calc_1", r#"{"a": 20, "b": 22}"#)], Some((50, 10))),
        completion("42", Some(&[-0.01]), Some((80, 1))),
    ])
    .await;
    let mut registry = ToolRegistry::new();
    registry.set_resolver(Arc::new(OrgTools(registered(&manifest(&url, "add")))));
    let agent = AgentTool::new(Arc::new(LlmTool::new(policy(&base), http(clock()))));
    let harness = Harness::new().await;
    let mut context = harness.context("research", BTreeMap::new());
    context.tools = Arc::new(registry);
    let outputs = tokio::time::timeout(
        WAIT,
        agent.execute(context, json!({"prompt": "20 + 22?", "tools": ["calc@1"]})),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(outputs["answer"], "42");
    let transcript = outputs["transcript"].as_array().unwrap();
    assert_eq!(transcript[1]["tool"], "calc@1");
    assert_eq!(transcript[1]["result"], r#"{"sum":42}"#);
    assert_eq!(server.seen.lock().unwrap().len(), 1);
    // The function offered is the tool's name made acceptable to servers.
    assert_eq!(
        script.requests()[0]["tools"][0]["function"]["name"],
        "calc_1"
    );
}
