//! Tests of the `agent` tool against the scripted OpenAI-compatible server of `llm.rs`: the
//! model's tool calls are scripted replies, the tools it calls are real (`echo`, `shell`, and
//! `add`, a small tool of this module with a strict schema).

use std::collections::BTreeMap;
use std::sync::Arc;

use arches_core::ports::{Tool, ToolContext, ToolError, ToolRegistry};
use arches_core::records::LogStream;
use arches_tools::{AgentTool, EchoTool, LlmTool, ShellTool};
use async_trait::async_trait;
use serde_json::{json, Value};

use super::llm::{clock, completion, http, policy, start, Reply, WAIT};
use super::Harness;

/// `add`: `{a, b}` integers → `{sum}`.
struct AddTool;

#[async_trait]
impl Tool for AddTool {
    fn name(&self) -> &str {
        "add"
    }

    fn description(&self) -> &str {
        "adds two integers"
    }

    fn needs_work_dir(&self) -> bool {
        false
    }

    fn input_schema(&self) -> Value {
        json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["a", "b"],
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}
        })
    }

    async fn execute(&self, context: ToolContext, inputs: Value) -> Result<Value, ToolError> {
        let sum = inputs["a"].as_i64().unwrap_or(0) + inputs["b"].as_i64().unwrap_or(0);
        context
            .logs
            .write(LogStream::Stdout, &format!("sum {sum}"))
            .await;
        Ok(json!({ "sum": sum }))
    }
}

fn registry() -> Arc<ToolRegistry> {
    let mut registry = ToolRegistry::new();
    registry.register(Arc::new(AddTool));
    registry.register(Arc::new(EchoTool::new()));
    registry.register(Arc::new(ShellTool::new()));
    Arc::new(registry)
}

fn agent(base: &str) -> AgentTool {
    AgentTool::new(Arc::new(LlmTool::new(policy(base), http(clock()))))
}

/// An answer calling tools: `(id, name, arguments)` each, with usage when given.
pub(crate) fn calls(calls: &[(&str, &str, &str)], usage: Option<(u64, u64)>) -> Reply {
    let calls: Vec<Value> = calls
        .iter()
        .map(|(id, name, arguments)| {
            json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}})
        })
        .collect();
    let mut body = json!({
        "id": "chatcmpl-2",
        "object": "chat.completion",
        "model": "test-model-2024",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": null, "tool_calls": calls},
            "finish_reason": "tool_calls",
        }],
    });
    if let Some((prompt, completion)) = usage {
        body["usage"] = json!({
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        });
    }
    Reply::Json(200, body)
}

/// Runs the agent with the registry of this module; its outputs (or error) and the harness
/// (whose log holds the attempt's lines).
async fn run(tool: &AgentTool, inputs: Value) -> (Result<Value, ToolError>, Harness) {
    let harness = Harness::new().await;
    let mut context = harness.context("research", BTreeMap::new());
    context.tools = registry();
    let result = tokio::time::timeout(WAIT, tool.execute(context, inputs))
        .await
        .expect("the agent finished within the bound");
    (result, harness)
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[tokio::test]
async fn an_agent_calls_a_tool_and_answers_with_its_transcript_in_outputs_and_logs() {
    let (base, script) = start(vec![
        calls(&[("call_1", "add", r#"{"a": 2, "b": 3}"#)], Some((100, 20))),
        completion("The sum is 5.", Some(&[0.9f64.ln(), 0.0]), Some((150, 5))),
    ])
    .await;

    let (result, harness) = run(
        &agent(&base),
        json!({"prompt": "What is 2 + 3?", "system": "Use the tools.", "tools": ["add", "echo"]}),
    )
    .await;
    let outputs = result.unwrap();

    assert_eq!(outputs["answer"], "The sum is 5.");
    assert_eq!(outputs["steps"], 2);
    assert_eq!(outputs["tool_calls"], 1);
    assert_eq!(outputs["requests"], 2);
    assert_eq!(outputs["model"], "test-model-2024");
    assert_eq!(outputs["confidence_method"], "logprobs");
    assert!(close(
        outputs["confidence"].as_f64().unwrap(),
        0.9f64.sqrt()
    ));
    assert_eq!(
        outputs["usage"],
        json!({"prompt_tokens": 250, "completion_tokens": 25, "total_tokens": 275})
    );
    assert_eq!(outputs["tokens_used"], 275);
    // 250 · 1 $/M + 25 · 2 $/M.
    assert!(close(outputs["cost_usd"].as_f64().unwrap(), 300e-6));

    let transcript = outputs["transcript"].as_array().unwrap();
    assert_eq!(transcript.len(), 3, "{transcript:?}");
    assert_eq!(transcript[0]["type"], "model");
    assert_eq!(transcript[0]["tool_calls"][0]["name"], "add");
    assert_eq!(transcript[0]["usage"]["total_tokens"], 120);
    assert_eq!(transcript[1]["type"], "tool");
    assert_eq!(transcript[1]["tool"], "add");
    assert_eq!(transcript[1]["ok"], true);
    assert_eq!(transcript[1]["result"], r#"{"sum":5}"#);
    assert_eq!(transcript[2]["content"], "The sum is 5.");

    // Every step is in the log, as the same objects, and the tool's own lines are there too.
    let lines = harness.logs.of(LogStream::System);
    let steps: Vec<Value> = lines
        .iter()
        .filter_map(|line| line.strip_prefix("agent: "))
        .filter_map(|text| serde_json::from_str(text).ok())
        .collect();
    assert_eq!(&steps, transcript, "{lines:?}");
    assert_eq!(
        harness.logs.of(LogStream::Stdout),
        vec!["agent call 1 add: sum 5".to_owned()]
    );

    let requests = script.requests();
    let first = &requests[0];
    let functions: Vec<&str> = first["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|tool| tool["function"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(functions, ["add", "echo"]);
    assert_eq!(first["tools"][0]["type"], "function");
    assert_eq!(
        first["tools"][0]["function"]["description"],
        "adds two integers"
    );
    assert_eq!(
        first["tools"][0]["function"]["parameters"]["required"],
        json!(["a", "b"])
    );
    assert_eq!(first["tool_choice"], "auto");
    let messages = requests[1]["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 4);
    assert_eq!(messages[0]["role"], "system");
    assert_eq!(messages[1]["content"], "What is 2 + 3?");
    assert_eq!(
        messages[2],
        json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 2, \"b\": 3}"}}
        ]})
    );
    assert_eq!(
        messages[3],
        json!({"role": "tool", "tool_call_id": "call_1", "content": "{\"sum\":5}"})
    );
}

#[tokio::test]
async fn arguments_that_break_the_schema_go_back_to_the_model_and_it_recovers() {
    let (base, script) = start(vec![
        calls(&[("c1", "add", r#"{"a": "two", "b": 2}"#)], None),
        calls(&[("c2", "add", r#"{"a": 2, "b": 2}"#)], None),
        completion("4", Some(&[-0.1]), None),
    ])
    .await;
    let (result, _harness) =
        run(&agent(&base), json!({"prompt": "2 + 2?", "tools": ["add"]})).await;
    let outputs = result.unwrap();
    assert_eq!(outputs["answer"], "4");
    assert_eq!(outputs["steps"], 3);
    let transcript = outputs["transcript"].as_array().unwrap();
    assert_eq!(transcript[1]["ok"], false);
    let refused = transcript[1]["result"].as_str().unwrap();
    assert!(refused.contains("/arguments/a"), "{refused}");
    assert_eq!(transcript[3]["ok"], true);
    // The model saw the violation as the call's result.
    let seen = &script.requests()[1]["messages"][2];
    assert_eq!(seen["tool_call_id"], "c1");
    assert!(
        seen["content"].as_str().unwrap().contains("/arguments/a"),
        "{seen}"
    );
    // Usage was not reported: it is null, and the budget counted an estimate.
    assert_eq!(outputs["usage"], Value::Null);
    assert!(outputs["tokens_used"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn malformed_tool_call_arguments_go_back_to_the_model() {
    let (base, script) = start(vec![
        calls(&[("c1", "add", r#"{"a": 2, "b": "#)], None),
        completion("I could not add.", Some(&[-0.1]), None),
    ])
    .await;
    let (result, _harness) =
        run(&agent(&base), json!({"prompt": "2 + 2?", "tools": ["add"]})).await;
    let outputs = result.unwrap();
    assert_eq!(outputs["answer"], "I could not add.");
    let seen = script.requests()[1]["messages"][2]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(seen.contains("not valid JSON"), "{seen}");
}

#[tokio::test]
async fn a_tool_not_listed_is_refused_to_the_model_and_never_runs() {
    let (base, script) = start(vec![
        calls(
            &[("c1", "shell", r#"{"command": "echo pwned"}"#)],
            Some((10, 5)),
        ),
        completion("done", Some(&[-0.1]), Some((10, 5))),
    ])
    .await;
    let (result, harness) = run(&agent(&base), json!({"prompt": "hi", "tools": ["echo"]})).await;
    let outputs = result.unwrap();
    let transcript = outputs["transcript"].as_array().unwrap();
    assert_eq!(transcript[1]["ok"], false);
    assert_eq!(transcript[1]["tool"], Value::Null);
    let refused = script.requests()[1]["messages"][2]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(refused.contains("not available to this agent"), "{refused}");
    assert!(refused.contains("echo"), "{refused}");
    assert!(harness.logs.of(LogStream::Stdout).is_empty());
    // Only the listed tool was offered.
    assert_eq!(script.requests()[0]["tools"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn agent_approval_and_unknown_tools_are_refused_before_any_request() {
    let (base, script) = start(Vec::new()).await;
    for (tools, expected) in [
        (json!(["echo", "agent"]), "cannot call the `agent` tool"),
        (json!(["approval"]), "cannot call the `approval` tool"),
        (json!(["nope"]), "unknown tool `nope`"),
    ] {
        let (result, _harness) = run(&agent(&base), json!({"prompt": "hi", "tools": tools})).await;
        let error = result.unwrap_err();
        assert!(!error.retryable);
        assert!(error.message.contains(expected), "{}", error.message);
    }
    assert_eq!(script.hits(), 0);
}

#[tokio::test]
async fn the_step_budget_ends_a_model_that_keeps_calling_tools() {
    let (base, script) = start(Vec::new()).await;
    *script.fallback.lock().unwrap() = Some(calls(&[("c", "echo", r#"{"x": 1}"#)], Some((10, 1))));
    let (result, harness) = run(
        &agent(&base),
        json!({"prompt": "loop", "tools": ["echo"], "max_steps": 3}),
    )
    .await;
    let error = result.unwrap_err();
    assert!(!error.retryable);
    assert!(
        error.message.contains("step budget exhausted"),
        "{}",
        error.message
    );
    assert!(error.message.contains("max_steps 3"), "{}", error.message);
    assert_eq!(script.hits(), 3);
    // The steps taken are in the log although the attempt failed.
    let logged = harness
        .logs
        .of(LogStream::System)
        .iter()
        .filter(|line| line.starts_with("agent: {"))
        .count();
    assert_eq!(logged, 6);
}

#[tokio::test]
async fn the_token_budget_ends_the_loop_naming_it() {
    let (base, script) = start(Vec::new()).await;
    *script.fallback.lock().unwrap() =
        Some(calls(&[("c", "echo", r#"{"x": 1}"#)], Some((500, 100))));
    let (result, _harness) = run(
        &agent(&base),
        json!({"prompt": "loop", "tools": ["echo"], "max_tokens": 1000}),
    )
    .await;
    let error = result.unwrap_err();
    assert!(!error.retryable);
    assert!(
        error.message.contains("token budget exhausted"),
        "{}",
        error.message
    );
    assert!(
        error
            .message
            .contains("1200 tokens used of max_tokens 1000"),
        "{}",
        error.message
    );
    assert_eq!(script.hits(), 2);
}

#[tokio::test]
async fn a_tool_call_without_a_function_name_is_a_malformed_answer() {
    let (base, _script) = start(vec![Reply::Json(
        200,
        json!({"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": null,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"arguments": "{}"}}]
        }}]}),
    )])
    .await;
    let (result, _harness) = run(&agent(&base), json!({"prompt": "hi", "tools": ["echo"]})).await;
    let error = result.unwrap_err();
    assert!(!error.retryable);
    assert!(
        error.message.contains("tool_calls[0].function has no name"),
        "{}",
        error.message
    );
}

#[tokio::test]
async fn streamed_tool_call_deltas_are_assembled() {
    let chunk = |delta: Value, finish: Option<&str>| {
        json!({"model": "streamer", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
            .to_string()
    };
    let (base, script) = start(vec![
        Reply::Stream(vec![
            chunk(json!({"role": "assistant", "content": null, "tool_calls": [
                {"index": 0, "id": "s1", "type": "function", "function": {"name": "add", "arguments": ""}}
            ]}), None),
            chunk(json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"a\": 40,"}}]}), None),
            chunk(json!({"tool_calls": [
                {"index": 0, "function": {"arguments": " \"b\": 2}"}},
                {"index": 1, "id": "s2", "function": {"name": "echo", "arguments": "{}"}}
            ]}), None),
            chunk(json!({}), Some("tool_calls")),
            "[DONE]".to_owned(),
        ]),
        Reply::Stream(vec![
            json!({"model": "streamer", "choices": [{"index": 0, "delta": {"content": "42"},
                   "logprobs": {"content": [{"token": "42", "logprob": -0.05}]}, "finish_reason": "stop"}]})
            .to_string(),
            "[DONE]".to_owned(),
        ]),
    ])
    .await;
    let (result, _harness) = run(
        &agent(&base),
        json!({"prompt": "40 + 2?", "tools": ["add", "echo"], "stream": true}),
    )
    .await;
    let outputs = result.unwrap();
    assert_eq!(outputs["answer"], "42");
    assert_eq!(outputs["tool_calls"], 2);
    assert!(close(
        outputs["confidence"].as_f64().unwrap(),
        (-0.05f64).exp()
    ));
    let messages = script.requests()[1]["messages"].as_array().unwrap().clone();
    assert_eq!(
        messages[1]["tool_calls"][0]["function"],
        json!({"name": "add", "arguments": "{\"a\": 40, \"b\": 2}"})
    );
    assert_eq!(messages[1]["tool_calls"][1]["id"], "s2");
    assert_eq!(messages[2]["content"], r#"{"sum":42}"#);
    assert_eq!(messages[3]["tool_call_id"], "s2");
}

#[tokio::test]
async fn the_final_answer_is_checked_against_output_schema_and_repaired_once() {
    let schema = json!({
        "type": "object", "required": ["sum"], "additionalProperties": false,
        "properties": {"sum": {"type": "integer"}}
    });
    let (base, script) = start(vec![
        calls(&[("c1", "add", r#"{"a": 1, "b": 1}"#)], None),
        completion("The sum is 2", Some(&[-0.1]), None),
        completion(r#"{"sum": 2}"#, Some(&[-0.2]), None),
    ])
    .await;
    let (result, _harness) = run(
        &agent(&base),
        json!({"prompt": "1 + 1?", "tools": ["add"], "output_schema": schema}),
    )
    .await;
    let outputs = result.unwrap();
    assert_eq!(outputs["answer"], json!({"sum": 2}));
    assert_eq!(outputs["repaired"], true);
    assert_eq!(outputs["requests"], 3);
    assert!(close(
        outputs["confidence"].as_f64().unwrap(),
        (-0.2f64).exp()
    ));
    let requests = script.requests();
    let system = requests[0]["messages"][0]["content"].as_str().unwrap();
    assert!(system.contains("JSON Schema"), "{system}");
    assert_eq!(requests[2]["tool_choice"], "none");
    let asked = requests[2]["messages"].as_array().unwrap().last().unwrap()["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(asked.contains("not JSON"), "{asked}");

    // An answer that stays invalid fails, naming the violation.
    let (base, _script) = start(vec![
        completion(r#"{"sum": "two"}"#, None, None),
        completion(r#"{"sum": "two"}"#, None, None),
    ])
    .await;
    let (result, _harness) = run(
        &agent(&base),
        json!({"prompt": "1 + 1?", "tools": [], "output_schema": schema}),
    )
    .await;
    let error = result.unwrap_err();
    assert!(!error.retryable);
    assert!(error.message.contains("/answer/sum"), "{}", error.message);
}

#[tokio::test]
async fn without_logprobs_the_confidence_is_the_agreement_of_samples() {
    let (base, script) = start(vec![
        calls(&[("c1", "add", r#"{"a": 1, "b": 2}"#)], Some((10, 2))),
        completion("3", None, Some((20, 1))),
        completion("3", None, Some((20, 1))),
        completion("three", None, Some((20, 1))),
    ])
    .await;
    let (result, _harness) = run(
        &agent(&base),
        json!({"prompt": "1 + 2?", "tools": ["add"], "temperature": 0}),
    )
    .await;
    let outputs = result.unwrap();
    assert_eq!(outputs["answer"], "3");
    assert_eq!(outputs["confidence_method"], "agreement");
    assert!(close(outputs["confidence"].as_f64().unwrap(), 2.0 / 3.0));
    assert_eq!(outputs["samples"], 3);
    assert_eq!(outputs["requests"], 4);
    assert_eq!(outputs["usage"]["total_tokens"], 75);
    let requests = script.requests();
    for sample in &requests[2..] {
        assert_eq!(sample["tool_choice"], "none");
        assert_eq!(sample["temperature"], 1.0);
        // The sample answers the same conversation, tool result included.
        assert_eq!(sample["messages"][2]["tool_call_id"], "c1");
    }
}
