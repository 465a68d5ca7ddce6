//! OpenAI's Responses API, stateless: `POST /v1/responses` (one response object, or with
//! `"stream": true` its typed events: `response.created`, `response.in_progress`, per output item
//! `response.output_item.added`, text deltas or function-call arguments, `…done` events, then
//! `response.completed` or `response.incomplete`) and `POST /v1/responses/input_tokens`.
//!
//! Nothing is stored: a response says `"store": false` whatever the request asked, and
//! `previous_response_id` / `conversation` are a 400 that says to send the conversation in
//! `input` (which is how the SDKs' function-calling round trips work anyway). Errors are
//! OpenAI-shaped, as on the rest of `/v1`.

use std::convert::Infallible;

use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tidepool_engine::request::{
    ChatMessage, FinishReason, GenerationEvent, GenerationRequest, OutputConstraint, Prompt, Role,
    ToolCall, ToolChoice, ToolSpec, Usage,
};
use tidepool_engine::GenerationStream;
use tidepool_gateway::gateway::Submission;

use super::types::SamplingFields;
use super::{collect, with_report};
use crate::error::{truncate, ApiError, ApiJson};
use crate::selection::{model_and_profile, Selection};
use crate::AppState;

/// `input`: a string (one user message) or a list of items.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum InputSpec {
    Text(String),
    Items(Vec<Value>),
}

#[derive(Debug, Deserialize)]
pub struct TextConfig {
    #[serde(default)]
    pub format: Option<Value>,
    /// `low` / `medium` / `high`: accepted, no effect.
    #[serde(default)]
    pub verbosity: Option<Value>,
}

/// `POST /v1/responses` (and `/v1/responses/input_tokens`).
#[derive(Debug, Deserialize)]
pub struct ResponsesRequest {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub input: Option<InputSpec>,
    #[serde(default)]
    pub instructions: Option<String>,
    #[serde(default)]
    pub max_output_tokens: Option<i64>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub text: Option<TextConfig>,
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    #[serde(default)]
    pub store: Option<bool>,
    #[serde(default)]
    pub previous_response_id: Option<String>,
    #[serde(default)]
    pub conversation: Option<Value>,
    #[serde(default)]
    pub metadata: Option<Value>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub top_logprobs: Option<i64>,
}

fn param(p: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid_param(p, message)
}

/// The text of an item's `content`: a string, or parts of type `input_text` / `output_text`
/// (`text` too).
fn content_text(content: &Value, path: &str) -> Result<String, ApiError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => {
            let mut out = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (p["type"].as_str(), p["text"].as_str()) {
                    (Some("input_text" | "output_text" | "text"), Some(t)) => out.push_str(t),
                    (Some("refusal"), _) => {
                        out.push_str(p["refusal"].as_str().unwrap_or_default())
                    }
                    (Some("input_text" | "output_text" | "text"), None) => {
                        return Err(param(
                            &format!("{path}[{j}].text"),
                            "A text part needs `text`.",
                        ))
                    }
                    (kind, _) => {
                        return Err(param(
                            &format!("{path}[{j}].type"),
                            format!(
                                "Content parts of type `{}` are not supported by this model; only text.",
                                truncate(kind.unwrap_or("(none)"), 40)
                            ),
                        ))
                    }
                }
            }
            Ok(out)
        }
        _ => Err(param(
            path,
            "`content` must be a string or a list of parts.",
        )),
    }
}

impl ResponsesRequest {
    fn is_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    fn check_stateless(&self) -> Result<(), ApiError> {
        if self.previous_response_id.is_some() {
            return Err(param(
                "previous_response_id",
                "`previous_response_id` is not supported: this server keeps no responses (it is stateless); send the whole conversation in `input`, earlier outputs included.",
            ));
        }
        if self.conversation.is_some() {
            return Err(param(
                "conversation",
                "`conversation` is not supported: this server keeps no conversations; send the whole conversation in `input`.",
            ));
        }
        Ok(())
    }

    /// The chat: `instructions` as the system message, then the input items in order
    /// (messages, earlier function calls as assistant tool calls, their outputs as tool turns).
    fn to_messages(&self) -> Result<Vec<ChatMessage>, ApiError> {
        let mut out: Vec<ChatMessage> = Vec::new();
        if let Some(i) = self.instructions.as_ref().filter(|i| !i.is_empty()) {
            out.push(ChatMessage::new(Role::System, i.clone()));
        }
        let items = match &self.input {
            None => return Err(param("input", "Missing required parameter: `input`.")),
            Some(InputSpec::Text(t)) => {
                out.push(ChatMessage::new(Role::User, t.clone()));
                return Ok(out);
            }
            Some(InputSpec::Items(items)) if items.is_empty() => {
                return Err(param("input", "`input` must not be an empty list."))
            }
            Some(InputSpec::Items(items)) => items,
        };
        for (i, item) in items.iter().enumerate() {
            let path = format!("input[{i}]");
            let kind = item["type"].as_str().unwrap_or("message");
            match kind {
                "message" => {
                    let role = match item["role"].as_str() {
                        Some("user") => Role::User,
                        Some("assistant") => Role::Assistant,
                        Some("system" | "developer") => Role::System,
                        other => {
                            return Err(param(
                                &format!("{path}.role"),
                                format!(
                                    "Invalid role `{}`; expected user, assistant, system or developer.",
                                    truncate(other.unwrap_or("(none)"), 40)
                                ),
                            ))
                        }
                    };
                    let text = content_text(&item["content"], &format!("{path}.content"))?;
                    out.push(ChatMessage::new(role, text));
                }
                "function_call" => {
                    let (Some(call_id), Some(name)) =
                        (item["call_id"].as_str(), item["name"].as_str())
                    else {
                        return Err(param(
                            &path,
                            "A `function_call` item needs `call_id` and `name`.",
                        ));
                    };
                    let call = ToolCall {
                        id: call_id.to_string(),
                        name: name.to_string(),
                        arguments: item["arguments"].as_str().unwrap_or("{}").to_string(),
                    };
                    // Parallel calls of one turn are one assistant message.
                    match out.last_mut() {
                        Some(m) if m.role == Role::Assistant && !m.tool_calls.is_empty() => {
                            m.tool_calls.push(call)
                        }
                        _ => out.push(ChatMessage {
                            tool_calls: vec![call],
                            ..ChatMessage::new(Role::Assistant, "")
                        }),
                    }
                }
                "function_call_output" => {
                    let Some(call_id) = item["call_id"].as_str() else {
                        return Err(param(&format!("{path}.call_id"), "Missing `call_id`."));
                    };
                    let output = content_text(&item["output"], &format!("{path}.output"))?;
                    out.push(ChatMessage {
                        tool_call_id: Some(call_id.to_string()),
                        ..ChatMessage::new(Role::Tool, output)
                    });
                }
                // Earlier reasoning is not part of what this model reads.
                "reasoning" => {}
                other => {
                    return Err(param(
                        &format!("{path}.type"),
                        format!(
                            "Input items of type `{}` are not supported; expected message, function_call or function_call_output.",
                            truncate(other, 40)
                        ),
                    ))
                }
            }
        }
        if out.iter().all(|m| m.role == Role::System) {
            return Err(param("input", "`input` has no message to answer."));
        }
        Ok(out)
    }

    fn to_tools(&self) -> Result<(Vec<ToolSpec>, ToolChoice), ApiError> {
        let mut tools = Vec::new();
        for (i, t) in self.tools.iter().flatten().enumerate() {
            match t["type"].as_str() {
                Some("function") => {}
                other => {
                    return Err(param(
                        &format!("tools[{i}].type"),
                        format!(
                            "Tool type `{}` is not available on a local model; only `function`.",
                            truncate(other.unwrap_or("(none)"), 40)
                        ),
                    ))
                }
            }
            let Some(name) = t["name"].as_str().filter(|n| !n.is_empty()) else {
                return Err(param(
                    &format!("tools[{i}].name"),
                    "Function tools need a `name`.",
                ));
            };
            let parameters = match &t["parameters"] {
                Value::Null => None,
                p @ Value::Object(_) => Some(p.clone()),
                _ => {
                    return Err(param(
                        &format!("tools[{i}].parameters"),
                        "`parameters` must be a JSON Schema object.",
                    ))
                }
            };
            tools.push(ToolSpec {
                name: name.to_string(),
                description: t["description"].as_str().map(str::to_string),
                parameters,
            });
        }
        let choice = match &self.tool_choice {
            None => ToolChoice::Auto,
            Some(Value::String(m)) => match m.as_str() {
                "auto" => ToolChoice::Auto,
                "none" => ToolChoice::None,
                "required" if !tools.is_empty() => ToolChoice::Required,
                "required" => {
                    return Err(param(
                        "tool_choice",
                        "`required` needs at least one tool in `tools`.",
                    ))
                }
                other => {
                    return Err(param(
                        "tool_choice",
                        format!(
                            "Invalid tool_choice `{}`; expected none, auto, required or a function.",
                            truncate(other, 40)
                        ),
                    ))
                }
            },
            Some(v) if v["type"] == "function" => {
                let name = v["name"].as_str().unwrap_or_default();
                if !tools.iter().any(|t| t.name == name) {
                    return Err(param(
                        "tool_choice.name",
                        format!("`{}` is not among the `tools` of this request.", truncate(name, 100)),
                    ));
                }
                ToolChoice::Function(name.to_string())
            }
            Some(_) => {
                return Err(param(
                    "tool_choice",
                    "Only `auto`, `none`, `required` and `{\"type\": \"function\", \"name\": ...}` are supported.",
                ))
            }
        };
        Ok((tools, choice))
    }

    fn constraint(&self) -> Result<OutputConstraint, ApiError> {
        let Some(format) = self.text.as_ref().and_then(|t| t.format.as_ref()) else {
            return Ok(OutputConstraint::None);
        };
        let _ = self.text.as_ref().map(|t| &t.verbosity);
        match format["type"].as_str() {
            Some("text") | None => Ok(OutputConstraint::None),
            Some("json_object") => Ok(OutputConstraint::JsonObject),
            Some("json_schema") => match &format["schema"] {
                s @ Value::Object(_) => Ok(OutputConstraint::JsonSchema(s.clone())),
                _ => Err(param(
                    "text.format.schema",
                    "`text.format.schema` must be a JSON Schema object.",
                )),
            },
            Some(other) => Err(param(
                "text.format.type",
                format!(
                    "Invalid format `{}`; expected text, json_object or json_schema.",
                    truncate(other, 40)
                ),
            )),
        }
    }

    fn to_generation(&self) -> Result<GenerationRequest, ApiError> {
        self.check_stateless()?;
        let prompt = Prompt::Chat(self.to_messages()?);
        let (tools, tool_choice) = self.to_tools()?;
        let constraint = self.constraint()?;
        if constraint != OutputConstraint::None
            && tool_choice != ToolChoice::None
            && !tools.is_empty()
        {
            return Err(param(
                "text.format",
                "A JSON `text.format` cannot be combined with `tools`.",
            ));
        }
        if self.top_logprobs.is_some_and(|n| n != 0) {
            return Err(param("top_logprobs", "`top_logprobs` is not supported."));
        }
        let sampling = SamplingFields {
            max_tokens: self.max_output_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
            ..SamplingFields::default()
        }
        .to_sampling()
        .map_err(|mut e| {
            if e.param.as_deref() == Some("max_tokens") {
                e.param = Some("max_output_tokens".into());
                e.message = e.message.replace("max_tokens", "max_output_tokens");
            }
            e
        })?;
        Ok(GenerationRequest {
            prompt,
            sampling,
            constraint,
            tools,
            tool_choice,
        })
    }

    /// The request's settings as a response object echoes them.
    fn echo(&self) -> Value {
        let tool_choice = self.tool_choice.clone().unwrap_or(json!("auto"));
        json!({
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "temperature": self.temperature.unwrap_or(1.0),
            "top_p": self.top_p.unwrap_or(1.0),
            "tools": self.tools.clone().unwrap_or_default(),
            "tool_choice": tool_choice,
            "parallel_tool_calls": self.parallel_tool_calls.unwrap_or(true),
            "text": {"format": self.text.as_ref().and_then(|t| t.format.clone()).unwrap_or(json!({"type": "text"}))},
            "metadata": self.metadata.clone().unwrap_or(json!({})),
            "store": false,
            "previous_response_id": null,
            "reasoning": {"effort": null, "summary": null},
            "truncation": "disabled",
            "user": null,
            "background": false,
            "service_tier": "default",
        })
    }
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.total_tokens(),
    })
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({
        "type": "message", "id": id, "status": status, "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    })
}

fn call_item(call: &ToolCall, status: &str) -> Value {
    json!({
        "type": "function_call", "id": super::new_item_id("fc"),
        "call_id": call.id, "name": call.name, "arguments": call.arguments, "status": status,
    })
}

/// The response object: the request's echo, then what happened.
struct Draft {
    base: Value,
}

impl Draft {
    fn new(req: &ResponsesRequest, model: &str) -> Draft {
        let mut base = req.echo();
        base["id"] = json!(super::new_item_id("resp"));
        base["object"] = json!("response");
        base["created_at"] = json!(super::now_secs());
        base["model"] = json!(model);
        base["output"] = json!([]);
        base["status"] = json!("in_progress");
        base["error"] = Value::Null;
        base["incomplete_details"] = Value::Null;
        base["usage"] = Value::Null;
        Draft { base }
    }

    fn finished(&self, output: Vec<Value>, finish: FinishReason, usage: &Usage) -> Value {
        let mut r = self.base.clone();
        r["output"] = Value::Array(output);
        r["usage"] = usage_json(usage);
        if finish == FinishReason::Length {
            r["status"] = json!("incomplete");
            r["incomplete_details"] = json!({"reason": "max_output_tokens"});
        } else {
            r["status"] = json!("completed");
            r["completed_at"] = json!(super::now_secs());
        }
        r
    }
}

/// POST /v1/responses
pub async fn create(
    State(app): State<AppState>,
    selection: Selection,
    ApiJson(req): ApiJson<ResponsesRequest>,
) -> Result<Response, ApiError> {
    let (model, profile) = model_and_profile(
        &app,
        req.model.as_deref(),
        None,
        selection.profile.as_deref(),
    )?;
    let generation = req.to_generation()?;
    let answer = app
        .gateway
        .submit(Submission {
            request: generation,
            class: selection.class,
            profile,
        })
        .await?;
    let draft = Draft::new(&req, &model);
    if req.is_stream() {
        let events = response_sse(answer.stream, draft);
        return Ok(with_report(
            Sse::new(events).into_response(),
            &answer.report,
        ));
    }
    let out = collect(answer.stream).await?;
    let finish = out.finish.unwrap_or(FinishReason::Stop);
    let status = if finish == FinishReason::Length {
        "incomplete"
    } else {
        "completed"
    };
    let mut output = Vec::new();
    if !out.text.is_empty() || out.tool_calls.is_empty() {
        let id = super::new_item_id("msg");
        output.push(message_item(&id, &out.text, status));
    }
    output.extend(out.tool_calls.iter().map(|c| call_item(c, "completed")));
    Ok(with_report(
        Json(draft.finished(output, finish, &out.usage)).into_response(),
        &answer.report,
    ))
}

/// The typed events of one streamed response, numbered in order.
fn response_sse(
    stream: GenerationStream,
    draft: Draft,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let mut seq = 0u64;
    let mut emit = move |kind: &str, mut data: Value| -> Result<Event, Infallible> {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(seq);
        seq += 1;
        Ok(Event::default().event(kind).data(data.to_string()))
    };
    let head = vec![
        emit("response.created", json!({"response": draft.base})),
        emit("response.in_progress", json!({"response": draft.base})),
    ];
    let msg_id = super::new_item_id("msg");
    let mut text = String::new();
    let mut text_open = false;
    let mut output: Vec<Value> = Vec::new();
    let mut ended = false;
    let body = stream.flat_map(move |ev| {
        let mut out = Vec::new();
        // The message item and its one text part, opened before the first delta (or, for an
        // empty answer, at the end) and closed before a call or at the end.
        let open_text = |out: &mut Vec<_>,
                         emit: &mut dyn FnMut(&str, Value) -> Result<Event, Infallible>,
                         index: usize| {
            let mut item = message_item(&msg_id, "", "in_progress");
            item["content"] = json!([]);
            out.push(emit("response.output_item.added", json!({"output_index": index, "item": item})));
            out.push(emit("response.content_part.added", json!({"item_id": msg_id, "output_index": index, "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}})));
        };
        let close_text = |out: &mut Vec<_>,
                          emit: &mut dyn FnMut(&str, Value) -> Result<Event, Infallible>,
                          output: &mut Vec<Value>,
                          text: &str,
                          status: &str| {
            let index = output.len();
            let part = json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []});
            out.push(emit("response.output_text.done", json!({"item_id": msg_id, "output_index": index, "content_index": 0, "text": text, "logprobs": []})));
            out.push(emit("response.content_part.done", json!({"item_id": msg_id, "output_index": index, "content_index": 0, "part": part})));
            let item = message_item(&msg_id, text, status);
            out.push(emit("response.output_item.done", json!({"output_index": index, "item": item})));
            output.push(item);
        };
        match ev {
            _ if ended => {}
            GenerationEvent::Text(t) => {
                if !text_open {
                    open_text(&mut out, &mut emit, output.len());
                    text_open = true;
                }
                out.push(emit("response.output_text.delta", json!({"item_id": msg_id, "output_index": output.len(), "content_index": 0, "delta": t, "logprobs": []})));
                text.push_str(&t);
            }
            GenerationEvent::ToolCalls(calls) => {
                if text_open {
                    close_text(&mut out, &mut emit, &mut output, &text, "completed");
                    text_open = false;
                }
                for c in calls {
                    let index = output.len();
                    let done = call_item(&c, "completed");
                    let mut added = done.clone();
                    added["status"] = json!("in_progress");
                    added["arguments"] = json!("");
                    let id = done["id"].clone();
                    out.push(emit("response.output_item.added", json!({"output_index": index, "item": added})));
                    out.push(emit("response.function_call_arguments.delta", json!({"item_id": id, "output_index": index, "delta": c.arguments})));
                    out.push(emit("response.function_call_arguments.done", json!({"item_id": id, "output_index": index, "name": c.name, "arguments": c.arguments})));
                    out.push(emit("response.output_item.done", json!({"output_index": index, "item": done})));
                    output.push(done);
                }
            }
            GenerationEvent::Done { finish_reason, usage } => {
                let status = if finish_reason == FinishReason::Length { "incomplete" } else { "completed" };
                if text_open || output.is_empty() {
                    if !text_open {
                        open_text(&mut out, &mut emit, output.len());
                    }
                    close_text(&mut out, &mut emit, &mut output, &text, status);
                    text_open = false;
                }
                let response = draft.finished(std::mem::take(&mut output), finish_reason, &usage);
                let kind = if status == "incomplete" { "response.incomplete" } else { "response.completed" };
                out.push(emit(kind, json!({"response": response})));
                ended = true;
            }
            GenerationEvent::Error(e) => {
                let err = crate::error::generation_failed(&e);
                out.push(emit("error", json!({"code": err.code, "message": err.message, "param": err.param})));
                ended = true;
            }
        }
        futures::stream::iter(out)
    });
    futures::stream::iter(head).chain(body)
}

/// POST /v1/responses/input_tokens: the input's tokens once rendered, tools included.
pub async fn input_tokens(
    State(app): State<AppState>,
    ApiJson(req): ApiJson<ResponsesRequest>,
) -> Result<Response, ApiError> {
    model_and_profile(&app, req.model.as_deref(), None, None)?;
    req.check_stateless()?;
    let (tools, _) = req.to_tools()?;
    let request = GenerationRequest {
        tools,
        ..GenerationRequest::chat(req.to_messages()?)
    };
    let n = app.gateway.count_tokens(&request).await?;
    Ok(Json(json!({"object": "response.input_tokens", "input_tokens": n})).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: Value) -> ResponsesRequest {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn items_become_the_chat_in_order() {
        let g = req(json!({
            "instructions": "be brief", "max_output_tokens": 30,
            "input": [
                {"role": "user", "content": "Weather in Paris?"},
                {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
                {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": "{\"city\":\"Rome\"}"},
                {"type": "function_call_output", "call_id": "c1", "output": "21 C"},
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "and?"}]}],
            "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
            "tool_choice": "required"
        }))
        .to_generation()
        .unwrap();
        let Prompt::Chat(m) = &g.prompt else { panic!() };
        let roles: Vec<Role> = m.iter().map(|m| m.role).collect();
        assert_eq!(
            roles,
            [
                Role::System,
                Role::User,
                Role::Assistant,
                Role::Tool,
                Role::User
            ]
        );
        assert_eq!(m[2].tool_calls.len(), 2);
        assert_eq!(m[3].tool_call_id.as_deref(), Some("c1"));
        assert_eq!(g.tool_choice, ToolChoice::Required);
        assert_eq!(g.sampling.max_tokens, Some(30));
    }

    #[test]
    fn what_it_cannot_do_is_a_named_400() {
        let e = |v: Value| req(v).to_generation().unwrap_err().param;
        assert_eq!(
            e(json!({"input": "x", "previous_response_id": "resp_1"})).as_deref(),
            Some("previous_response_id")
        );
        assert_eq!(
            e(json!({"input": "x", "max_output_tokens": 0})).as_deref(),
            Some("max_output_tokens")
        );
        assert_eq!(
            e(json!({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}))
                .as_deref(),
            Some("input[0].content[0].type")
        );
        assert_eq!(
            e(json!({"input": "x", "tools": [{"type": "web_search"}]})).as_deref(),
            Some("tools[0].type")
        );
        assert_eq!(
            e(json!({"input": "x", "text": {"format": {"type": "xml"}}})).as_deref(),
            Some("text.format.type")
        );
        assert_eq!(e(json!({})).as_deref(), Some("input"));
    }
}
