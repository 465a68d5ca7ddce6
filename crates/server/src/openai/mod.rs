//! The OpenAI-compatible API: `/v1/chat/completions`, `/v1/completions`, `/v1/models`, the
//! Responses API ([`responses`]) and `/v1/embeddings` ([`embeddings`]).

pub mod embeddings;
pub mod responses;
pub mod types;

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::{Stream, StreamExt};
use serde_json::{json, Value};
use tidepool_engine::request::{FinishReason, GenerationEvent, ToolCall, Usage};
use tidepool_engine::GenerationStream;
use tidepool_gateway::gateway::{Report, Submission};

use crate::error::{ApiError, ApiJson};
use crate::selection::{model_and_profile, Selection};
use crate::AppState;
use types::{ChatCompletionRequest, CompletionRequest};

/// Shown as `system_fingerprint`.
pub const FINGERPRINT: &str = concat!("tidepool-", env!("CARGO_PKG_VERSION"));

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// An id in the newer APIs' form (`resp_…`, `msg_…`, `fc_…`: Responses and Anthropic).
pub(crate) fn new_item_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// Checks the request's `model` against the served one; a missing `model` means the served one.
pub(crate) fn check_model(app: &AppState, model: Option<&str>) -> Result<String, ApiError> {
    let served = app.service.model_name();
    match model {
        None | Some("") => Ok(served),
        Some(m) if app.service.serves(m) => Ok(served),
        Some(m) => Err(ApiError::model_not_found(m, &served)),
    }
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens(),
    })
}

fn tool_calls_json(calls: &[ToolCall], first_index: usize) -> Value {
    Value::Array(
        calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                json!({
                    "index": first_index + i,
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                })
            })
            .collect(),
    )
}

/// The whole output of one generation, collected.
#[derive(Default)]
pub(crate) struct Collected {
    pub text: String,
    pub tool_calls: Vec<ToolCall>,
    pub finish: Option<FinishReason>,
    pub usage: Usage,
}

/// Drains a stream into one result; an engine error becomes a 500.
pub(crate) async fn collect(mut stream: GenerationStream) -> Result<Collected, ApiError> {
    let mut out = Collected::default();
    while let Some(ev) = stream.next().await {
        match ev {
            GenerationEvent::Text(t) => out.text.push_str(&t),
            GenerationEvent::ToolCalls(c) => out.tool_calls.extend(c),
            GenerationEvent::Done {
                finish_reason,
                usage,
            } => {
                out.finish = Some(finish_reason);
                out.usage = usage;
            }
            GenerationEvent::Error(e) => return Err(crate::error::generation_failed(&e)),
        }
    }
    if out.finish.is_none() {
        return Err(ApiError::hidden(
            "The generation ended without a result",
            "the stream closed before its last event (the engine stopped, or the client stalled)",
        ));
    }
    Ok(out)
}

fn sse_data(v: &Value) -> Result<Event, Infallible> {
    Ok(Event::default().data(v.to_string()))
}

/// POST /v1/chat/completions
pub async fn chat_completions(
    State(app): State<AppState>,
    selection: Selection,
    ApiJson(req): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let (model, profile) = model_and_profile(
        &app,
        req.model.as_deref(),
        req.profile.as_deref(),
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
    let (stream, report) = (answer.stream, answer.report);
    let id = new_id("chatcmpl");
    let created = now_secs();
    if req.is_stream() {
        let events = chat_sse(stream, id, created, model, req.include_usage(), &report);
        return Ok(with_report(Sse::new(events).into_response(), &report));
    }
    let out = collect(stream).await?;
    let finish = out.finish.unwrap_or(FinishReason::Stop);
    let mut message = json!({"role": "assistant", "content": out.text});
    if !out.tool_calls.is_empty() {
        message["tool_calls"] = tool_calls_json(&out.tool_calls, 0);
        if out.text.is_empty() {
            message["content"] = Value::Null;
        }
    }
    Ok(Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": FINGERPRINT,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": finish.as_openai(),
        }],
        "usage": usage_with_report(&out.usage, &report),
    }))
    .into_response())
    .map(|r| with_report(r, &report))
}

/// `usage`, with the gateway's truncation report when there is one.
fn usage_with_report(u: &Usage, report: &Report) -> Value {
    let mut v = usage_json(u);
    if let Some(t) = crate::report::truncation_json(report) {
        v[crate::report::TRUNCATION_FIELD] = t;
    }
    if let Some(l) = crate::report::label_json(report) {
        v[crate::report::LABEL_FIELD] = l;
    }
    v
}

/// Adds the gateway's report (`x-tidepool-*` headers) to a response.
pub(crate) fn with_report(mut resp: Response, report: &Report) -> Response {
    crate::report::insert_headers(resp.headers_mut(), report);
    resp
}

fn chat_sse(
    stream: GenerationStream,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    report: &Report,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let report = report.clone();
    let chunk = move |delta: Value, finish: Option<&str>| {
        let mut c = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": FINGERPRINT,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        if include_usage {
            c["usage"] = Value::Null;
        }
        c
    };
    let role = chunk(json!({"role": "assistant", "content": ""}), None);
    let mut tool_index = 0usize;
    let body = stream.flat_map(move |ev| {
        let items: Vec<Value> = match ev {
            GenerationEvent::Text(t) => vec![chunk(json!({"content": t}), None)],
            GenerationEvent::ToolCalls(calls) => {
                let v = tool_calls_json(&calls, tool_index);
                tool_index += calls.len();
                vec![chunk(json!({"tool_calls": v}), None)]
            }
            GenerationEvent::Done {
                finish_reason,
                usage,
            } => {
                let mut v = vec![chunk(json!({}), Some(finish_reason.as_openai()))];
                if include_usage {
                    let mut last = chunk(json!({}), None);
                    last["choices"] = json!([]);
                    last["usage"] = usage_with_report(&usage, &report);
                    v.push(last);
                }
                v
            }
            GenerationEvent::Error(e) => {
                vec![crate::error::generation_failed(&e).to_json()]
            }
        };
        futures::stream::iter(items.into_iter().map(|v| sse_data(&v)))
    });
    futures::stream::once(async move { sse_data(&role) })
        .chain(body)
        .chain(futures::stream::once(async {
            Ok(Event::default().data("[DONE]"))
        }))
}

/// POST /v1/completions
pub async fn completions(
    State(app): State<AppState>,
    selection: Selection,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let (model, profile) = model_and_profile(
        &app,
        req.model.as_deref(),
        None,
        selection.profile.as_deref(),
    )?;
    if profile.is_some() {
        return Err(ApiError::invalid_param(
            "profile",
            "Task profiles apply to chat requests (/v1/chat/completions), not text completions.",
        ));
    }
    let class = selection.class;
    let generations = req.to_generations()?;
    // Each prompt starts when a slot is free and is read from the moment it starts, so a list
    // longer than the free slots queues its tail behind its head instead of deadlocking on it.
    let id = new_id("cmpl");
    let created = now_secs();
    if req.is_stream() {
        let mut gens = generations.into_iter();
        let first = gens.next().ok_or_else(|| {
            ApiError::invalid_param("prompt", "`prompt` must not be an empty list.")
        })?;
        // The first prompt is started before the response, so a refusal is an HTTP error.
        let answer = app.gateway.submit(Submission::new(first, class)).await?;
        let report = answer.report;
        let mut streams = vec![answer.stream];
        for g in gens {
            let gateway = app.gateway.clone();
            let later = futures::stream::once(async move {
                match gateway.submit(Submission::new(g, class)).await {
                    Ok(a) => a.stream,
                    Err(e) => {
                        let e = ApiError::from(e);
                        let failed: GenerationStream =
                            Box::pin(futures::stream::iter([GenerationEvent::Error(e.message)]));
                        failed
                    }
                }
            })
            .flatten();
            streams.push(Box::pin(later));
        }
        let events = completion_sse(streams, id, created, model, req.include_usage());
        return Ok(with_report(Sse::new(events).into_response(), &report));
    }
    let runs = generations.into_iter().map(|g| {
        let gateway = app.gateway.clone();
        async move {
            let answer = gateway.submit(Submission::new(g, class)).await?;
            let out = collect(answer.stream).await?;
            Ok::<_, ApiError>((out, answer.report))
        }
    });
    let results = futures::future::join_all(runs).await;
    let mut choices = Vec::new();
    let mut usage = Usage::default();
    let mut reports = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        let (out, report) = r?;
        reports.push(report);
        usage.prompt_tokens += out.usage.prompt_tokens;
        usage.completion_tokens += out.usage.completion_tokens;
        choices.push(json!({
            "index": i,
            "text": out.text,
            "logprobs": null,
            "finish_reason": out.finish.unwrap_or(FinishReason::Stop).as_openai(),
        }));
    }
    let report = crate::report::merge(&reports);
    Ok(Json(json!({
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": FINGERPRINT,
        "choices": choices,
        "usage": usage_json(&usage),
    }))
    .into_response())
    .map(|r| with_report(r, &report))
}

fn completion_sse(
    streams: Vec<futures::stream::BoxStream<'static, GenerationEvent>>,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let n = streams.len();
    let tagged = futures::stream::select_all(
        streams
            .into_iter()
            .enumerate()
            .map(|(i, s)| s.map(move |ev| (i, ev)).boxed()),
    );
    let base = move |choices: Value| {
        json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
        })
    };
    let mut total = Usage::default();
    let mut done = 0usize;
    let body = tagged.flat_map(move |(i, ev)| {
        let items: Vec<Value> = match ev {
            GenerationEvent::Text(t) => vec![base(
                json!([{"index": i, "text": t, "logprobs": null, "finish_reason": null}]),
            )],
            GenerationEvent::ToolCalls(_) => Vec::new(),
            GenerationEvent::Done {
                finish_reason,
                usage,
            } => {
                total.prompt_tokens += usage.prompt_tokens;
                total.completion_tokens += usage.completion_tokens;
                done += 1;
                let mut v = vec![base(json!([{
                    "index": i, "text": "", "logprobs": null,
                    "finish_reason": finish_reason.as_openai()
                }]))];
                if include_usage && done == n {
                    let mut last = base(json!([]));
                    last["usage"] = usage_json(&total);
                    v.push(last);
                }
                v
            }
            GenerationEvent::Error(e) => {
                vec![crate::error::generation_failed(&e).to_json()]
            }
        };
        futures::stream::iter(items.into_iter().map(|v| sse_data(&v)))
    });
    body.chain(futures::stream::once(async {
        Ok(Event::default().data("[DONE]"))
    }))
}

fn model_json(app: &AppState) -> Value {
    json!({
        "id": app.service.model_name(),
        "object": "model",
        "created": app.started_unix,
        "owned_by": "tidepool",
    })
}

/// GET /v1/models
pub async fn list_models(State(app): State<AppState>) -> Json<Value> {
    Json(json!({"object": "list", "data": [model_json(&app)]}))
}

/// GET /v1/models/{id}
pub async fn get_model(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    check_model(&app, Some(&id))?;
    Ok(Json(model_json(&app)))
}
