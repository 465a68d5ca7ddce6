//! The Anthropic Messages API, so the `anthropic` SDKs and Claude-Code-style tools can use a
//! local model: `POST /v1/messages` (one JSON message, or with `"stream": true` Anthropic's
//! event sequence: `message_start`, `content_block_start`/`_delta`/`_stop` per text or
//! `tool_use` block, `message_delta` with the stop reason and usage, `message_stop`) and
//! `POST /v1/messages/count_tokens`.
//!
//! Errors are Anthropic-shaped (`{"type": "error", "error": {"type", "message"}}`); a stream
//! that fails part-way ends with an `error` event. A LAN client may send its token as
//! `x-api-key` (what the SDKs send) as well as a bearer token; `anthropic-version` and
//! `anthropic-beta` are accepted and not needed.

pub mod types;

use std::convert::Infallible;

use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::{Stream, StreamExt};
use serde_json::{json, Value};
use tidepool_engine::request::{FinishReason, GenerationEvent, GenerationRequest, ToolCall, Usage};
use tidepool_engine::GenerationStream;
use tidepool_gateway::gateway::Submission;

use crate::openai::{collect, new_item_id, with_report};
use crate::selection::{model_and_profile, Selection};
use crate::AppState;
use types::{AnthropicError, AnthropicJson, MessagesRequest};

/// The request's selections, with Anthropic-shaped errors.
pub struct AnthropicSelection(pub Selection);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for AnthropicSelection {
    type Rejection = AnthropicError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        Selection::from_request_parts(parts, state)
            .await
            .map(AnthropicSelection)
            .map_err(AnthropicError)
    }
}

/// `stop_reason` and `stop_sequence` of a finished message.
fn stop_of(finish: FinishReason, stops: &[String]) -> (&'static str, Value) {
    match finish {
        FinishReason::Length => ("max_tokens", Value::Null),
        FinishReason::ToolCalls => ("tool_use", Value::Null),
        FinishReason::StopSequence(i) => match stops.get(i as usize) {
            Some(s) => ("stop_sequence", Value::String(s.clone())),
            None => ("end_turn", Value::Null),
        },
        FinishReason::Stop | FinishReason::Cancelled => ("end_turn", Value::Null),
    }
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "input_tokens": u.prompt_tokens,
        "output_tokens": u.completion_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    })
}

/// A tool call's arguments as the `input` object (a call the engine made always parses; if one
/// ever does not, its text is kept rather than lost).
fn input_of(call: &ToolCall) -> Value {
    match serde_json::from_str::<Value>(&call.arguments) {
        Ok(v @ Value::Object(_)) => v,
        _ => json!({"arguments": call.arguments}),
    }
}

fn tool_use_block(call: &ToolCall) -> Value {
    json!({"type": "tool_use", "id": call.id, "name": call.name, "input": input_of(call)})
}

/// POST /v1/messages
pub async fn messages(
    State(app): State<AppState>,
    AnthropicSelection(selection): AnthropicSelection,
    AnthropicJson(req): AnthropicJson<MessagesRequest>,
) -> Result<Response, AnthropicError> {
    let (model, profile) = model_and_profile(
        &app,
        req.model.as_deref(),
        None,
        selection.profile.as_deref(),
    )?;
    let generation = req.to_generation()?;
    let stops = req.stops().to_vec();
    let id = new_item_id("msg");
    if !req.generates() {
        let input_tokens = app.gateway.count_tokens(&generation).await?;
        let usage = Usage {
            prompt_tokens: input_tokens,
            ..Usage::default()
        };
        return Ok(Json(json!({
            "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": "max_tokens", "stop_sequence": null, "usage": usage_json(&usage),
        }))
        .into_response());
    }
    // The stream's first event carries the prompt's size: counted before the generation, on
    // the request as sent (a profile's system prompt is added later, and shows in the final
    // usage).
    let counted = if req.is_stream() && profile.is_none() {
        app.gateway.count_tokens(&generation).await.ok()
    } else {
        None
    };
    let answer = app
        .gateway
        .submit(Submission {
            request: generation,
            class: selection.class,
            profile,
        })
        .await?;
    let (stream, report) = (answer.stream, answer.report);
    if req.is_stream() {
        let events = message_sse(stream, id, model, stops, counted.unwrap_or(0));
        return Ok(with_report(Sse::new(events).into_response(), &report));
    }
    let out = collect(stream).await?;
    let finish = out.finish.unwrap_or(FinishReason::Stop);
    let mut content = Vec::new();
    if !out.text.is_empty() || out.tool_calls.is_empty() {
        content.push(json!({"type": "text", "text": out.text}));
    }
    content.extend(out.tool_calls.iter().map(tool_use_block));
    let (stop_reason, stop_sequence) = stop_of(finish, &stops);
    let body = json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": usage_json(&out.usage),
    });
    Ok(with_report(Json(body).into_response(), &report))
}

fn event(name: &'static str, data: Value) -> Result<Event, Infallible> {
    Ok(Event::default().event(name).data(data.to_string()))
}

/// The stream of one message: Anthropic's events, blocks numbered in order (text, then each
/// tool call as its own block).
fn message_sse(
    stream: GenerationStream,
    id: String,
    model: String,
    stops: Vec<String>,
    input_tokens: u32,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let start = json!({
        "type": "message_start",
        "message": {
            "id": id, "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": input_tokens, "output_tokens": 0,
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
        },
    });
    let head = futures::stream::iter([
        event("message_start", start),
        event("ping", json!({"type": "ping"})),
    ]);
    // The index of the next block, and whether a text block is open.
    let mut next_index = 0usize;
    let mut text_open = false;
    let mut ended = false;
    let body = stream.flat_map(move |ev| {
        let mut out: Vec<Result<Event, Infallible>> = Vec::new();
        let open_text = |index: usize| {
            event(
                "content_block_start",
                json!({"type": "content_block_start", "index": index,
                       "content_block": {"type": "text", "text": ""}}),
            )
        };
        let close_text = |out: &mut Vec<_>, next_index: &mut usize, text_open: &mut bool| {
            if *text_open {
                out.push(event(
                    "content_block_stop",
                    json!({"type": "content_block_stop", "index": *next_index}),
                ));
                *next_index += 1;
                *text_open = false;
            }
        };
        match ev {
            _ if ended => {}
            GenerationEvent::Text(t) => {
                if !text_open {
                    out.push(open_text(next_index));
                    text_open = true;
                }
                out.push(event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": next_index,
                           "delta": {"type": "text_delta", "text": t}}),
                ));
            }
            GenerationEvent::ToolCalls(calls) => {
                close_text(&mut out, &mut next_index, &mut text_open);
                for c in calls {
                    let index = next_index;
                    next_index += 1;
                    out.push(event(
                        "content_block_start",
                        json!({"type": "content_block_start", "index": index,
                               "content_block": {"type": "tool_use", "id": c.id, "name": c.name, "input": {}}}),
                    ));
                    out.push(event(
                        "content_block_delta",
                        json!({"type": "content_block_delta", "index": index,
                               "delta": {"type": "input_json_delta", "partial_json": input_of(&c).to_string()}}),
                    ));
                    out.push(event(
                        "content_block_stop",
                        json!({"type": "content_block_stop", "index": index}),
                    ));
                }
            }
            GenerationEvent::Done {
                finish_reason,
                usage,
            } => {
                if next_index == 0 && !text_open {
                    // Every message has at least one block, even an empty answer.
                    out.push(open_text(next_index));
                    text_open = true;
                }
                close_text(&mut out, &mut next_index, &mut text_open);
                let (stop_reason, stop_sequence) = stop_of(finish_reason, &stops);
                out.push(event(
                    "message_delta",
                    json!({"type": "message_delta",
                           "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                           "usage": usage_json(&usage)}),
                ));
                out.push(event("message_stop", json!({"type": "message_stop"})));
                ended = true;
            }
            GenerationEvent::Error(e) => {
                let err = AnthropicError(crate::error::generation_failed(&e));
                out.push(event("error", err.to_json()));
                ended = true;
            }
        }
        futures::stream::iter(out)
    });
    head.chain(body)
}

/// POST /v1/messages/count_tokens: the prompt's tokens once rendered, tools included.
pub async fn count_tokens(
    State(app): State<AppState>,
    AnthropicJson(req): AnthropicJson<MessagesRequest>,
) -> Result<Response, AnthropicError> {
    model_and_profile(&app, req.model.as_deref(), None, None)?;
    let (tools, _) = req.to_tools()?;
    let request = GenerationRequest {
        tools,
        ..GenerationRequest::chat(req.to_messages()?)
    };
    let n = app.gateway.count_tokens(&request).await?;
    Ok(Json(json!({"input_tokens": n})).into_response())
}
