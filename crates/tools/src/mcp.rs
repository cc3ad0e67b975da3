//! The Model Context Protocol client of registered `mcp` tools: one tool of an MCP server,
//! called over the streamable HTTP transport with the `rmcp` crate.
//!
//! Each call is one short session: `initialize` (and `notifications/initialized`), one
//! `tools/call`, then the session is closed. That costs two more requests than a kept
//! session, but no state outlives an attempt, a server restart costs nothing, and a dropped
//! attempt (timeout, cancel) drops the session with it.
//!
//! What a call may reach: the URL only (a registered tool's capabilities and the server's
//! `[tools.http]` allowed hosts are checked on registration and again before each call);
//! redirects are never followed; the whole call is bounded by a timeout; a response (JSON or
//! one server-sent event) is read up to [`MCP_RESPONSE_BYTES_MAX`].
//!
//! The result: a tool's `structuredContent` when it gives one (an object is the outputs,
//! anything else is `{"output": value}`), else `{"text": …, "content": [...]}` with its text
//! blocks joined by newlines and every block as MCP sent it. A result with `isError: true`
//! is a permanent failure quoting the text; a server that cannot be reached, times out or
//! breaks the protocol is a transient one.

use std::collections::HashMap;
use std::time::Duration;

use arches_core::ports::ToolError;
use reqwest::header::{HeaderName, HeaderValue};
use rmcp::model::{CallToolRequestParams, ClientConfig};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::ServiceExt;
use serde_json::{json, Map, Value};

/// The largest response read from an MCP server, in bytes (one JSON document or one event).
pub const MCP_RESPONSE_BYTES_MAX: usize = 8 * 1024 * 1024;
/// The bound of one call (session set-up included) when the tool's capabilities give no
/// `timeout`.
pub const DEFAULT_MCP_TIMEOUT: Duration = Duration::from_secs(60);
/// Characters of an MCP error result quoted in the failure.
const ERROR_QUOTE_CHARS: usize = 2000;

/// One call of a tool on an MCP server.
#[derive(Clone, Debug)]
pub struct McpCall {
    /// The server's endpoint (`http://host:port/mcp`).
    pub url: String,
    /// The tool's name on the server.
    pub tool: String,
    /// Extra request headers (already rendered), sent with every request of the session.
    pub headers: Vec<(String, String)>,
    /// Bound of the whole call.
    pub timeout: Duration,
}

/// A tool an MCP server lists (`tools/list`).
#[derive(Clone, Debug, PartialEq)]
pub struct McpToolInfo {
    /// The tool's name on the server.
    pub name: String,
    /// Its description, empty when the server gives none.
    pub description: String,
    /// JSON Schema of its arguments.
    pub input_schema: Value,
}

type Client = rmcp::service::RunningService<rmcp::RoleClient, ClientConfig>;

/// Opens a session with the server of `url`.
async fn connect(
    url: &str,
    headers: &[(String, String)],
    timeout: Duration,
) -> Result<Client, ToolError> {
    let mut custom = HashMap::new();
    for (name, value) in headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| ToolError::permanent(format!("{name:?} is not a valid header name")))?;
        let mut value = HeaderValue::from_str(value).map_err(|_| {
            ToolError::permanent(format!(
                "the value of header {name} holds characters a header cannot carry"
            ))
        })?;
        value.set_sensitive(true);
        custom.insert(name, value);
    }
    let http = reqwest013::Client::builder()
        .redirect(reqwest013::redirect::Policy::none())
        .connect_timeout(timeout)
        .build()
        .map_err(|error| ToolError::permanent(format!("cannot build the MCP client: {error}")))?;
    let config = StreamableHttpClientTransportConfig::with_uri(url.to_owned())
        .custom_headers(custom)
        .control_request_timeout(timeout)
        .max_sse_event_size(MCP_RESPONSE_BYTES_MAX)
        .max_json_response_size(MCP_RESPONSE_BYTES_MAX);
    let transport = StreamableHttpClientTransport::with_client(http, config);
    ClientConfig::default()
        .serve(transport)
        .await
        .map_err(|error| {
            ToolError::transient(format!("MCP server {url}: initialize failed: {error}"))
        })
}

/// Calls `call.tool` with `arguments` (a JSON object).
///
/// # Errors
/// Transient: the server cannot be reached, the session fails, the call times out.
/// Permanent: a bad header, arguments that are not an object, a result flagged `isError`.
pub async fn call_tool(call: &McpCall, arguments: Value) -> Result<Value, ToolError> {
    let Value::Object(arguments) = arguments else {
        return Err(ToolError::permanent(
            "the arguments of an MCP tool must be a JSON object",
        ));
    };
    let work = async {
        let client = connect(&call.url, &call.headers, call.timeout).await?;
        let result = client
            .call_tool(CallToolRequestParams::new(call.tool.clone()).with_arguments(arguments))
            .await;
        // Close the session whatever the outcome; a failure to close changes nothing.
        let _ = client.cancel().await;
        result.map_err(|error| {
            ToolError::transient(format!(
                "MCP server {}: tools/call {} failed: {error}",
                call.url, call.tool
            ))
        })
    };
    let result = tokio::time::timeout(call.timeout, work)
        .await
        .map_err(|_| {
            ToolError::transient(format!(
                "MCP server {}: tools/call {} timed out after {} ms",
                call.url,
                call.tool,
                call.timeout.as_millis()
            ))
        })??;
    let texts: Vec<String> = result
        .content
        .iter()
        .filter_map(|block| block.as_text().map(|text| text.text.clone()))
        .collect();
    let text = texts.join("\n");
    if result.is_error == Some(true) {
        let quoted: String = text.chars().take(ERROR_QUOTE_CHARS).collect();
        return Err(ToolError::permanent(format!(
            "MCP tool {} answered an error: {quoted}",
            call.tool
        )));
    }
    Ok(match result.structured_content {
        Some(Value::Object(map)) => Value::Object(map),
        Some(other) => json!({ "output": other }),
        None => {
            let content = serde_json::to_value(&result.content).unwrap_or(Value::Null);
            let mut outputs = Map::new();
            outputs.insert("text".into(), Value::String(text));
            outputs.insert("content".into(), content);
            Value::Object(outputs)
        }
    })
}

/// The tools the server of `url` lists (every page), for registering them.
///
/// # Errors
/// As [`call_tool`]'s transport errors.
pub async fn list_tools(
    url: &str,
    headers: &[(String, String)],
    timeout: Duration,
) -> Result<Vec<McpToolInfo>, ToolError> {
    let work = async {
        let client = connect(url, headers, timeout).await?;
        let tools = client.list_all_tools().await;
        let _ = client.cancel().await;
        tools.map_err(|error| {
            ToolError::transient(format!("MCP server {url}: tools/list failed: {error}"))
        })
    };
    let tools = tokio::time::timeout(timeout, work).await.map_err(|_| {
        ToolError::transient(format!(
            "MCP server {url}: tools/list timed out after {} ms",
            timeout.as_millis()
        ))
    })??;
    Ok(tools
        .into_iter()
        .map(|tool| McpToolInfo {
            name: tool.name.to_string(),
            description: tool.description.map(|d| d.to_string()).unwrap_or_default(),
            input_schema: Value::Object((*tool.input_schema).clone()),
        })
        .collect())
}
