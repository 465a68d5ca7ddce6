//! The Ollama-compatible API, beside the OpenAI one, so existing Ollama clients work unchanged:
//! `POST /api/generate`, `POST /api/chat` (NDJSON streams by default, one JSON body with
//! `"stream": false`), `POST /api/embed` and `POST /api/embeddings` ([`embed`]), `GET /api/tags`,
//! `GET /api/ps`, `POST /api/show`, `GET /api/version`.
//!
//! Errors are Ollama-shaped: `{"error": "..."}` with the HTTP status; a stream that fails part-way
//! ends with one `{"error": "..."}` line. `keep_alive` sets the served model's idle expiry (see
//! [`apply_keep_alive`]); it never rewrites the policy, and is ignored from the LAN.

pub mod embed;
pub mod types;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::{Stream, StreamExt};
use serde_json::{json, Value};
use tidepool_engine::request::{FinishReason, GenerationEvent, ToolCall, Usage};
use tidepool_engine::GenerationStream;
use tidepool_sched::pool::WorkerState;

use crate::error::ApiError;
use crate::guard::Peer;
use crate::openai::{collect, with_report};
use crate::selection::{model_and_profile, Selection};
use crate::AppState;
use tidepool_gateway::gateway::{Report, Submission};
use types::{
    ChatRequest, GenerateRequest, GenerationBody, KeepAlive, KeepAliveSetting, OllamaError,
    OllamaJson, ShowRequest,
};

/// The Ollama API version Tidepool's endpoints follow (clients sometimes check it).
pub const OLLAMA_API_VERSION: &str = "0.12.0";

/// A far-future expiry, as Ollama reports for models kept loaded indefinitely.
const FOREVER_UNIX: u64 = 11_000_000_000;

/// RFC 3339 UTC time with nanoseconds, as Ollama writes `created_at`.
pub fn rfc3339(t: SystemTime) -> String {
    match jiff::Timestamp::try_from(t) {
        Ok(ts) => format!("{ts:.9}"),
        Err(_) => "1970-01-01T00:00:00.000000000Z".into(),
    }
}

/// Resolves the request's `model` (Ollama names may carry a `:latest` tag, or `:PROFILE`) and the
/// task profile.
fn check_model(
    app: &AppState,
    model: Option<&str>,
    body_profile: Option<&str>,
    selection: &Selection,
) -> Result<(String, Option<String>), OllamaError> {
    let Some(m) = model.map(str::trim).filter(|m| !m.is_empty()) else {
        return Err(OllamaError::bad_request("model is required"));
    };
    model_and_profile(app, Some(m), body_profile, selection.profile.as_deref()).map_err(|e| {
        if e.status == axum::http::StatusCode::NOT_FOUND {
            OllamaError::not_found(format!(
                "model '{}' not found; this server serves '{}'",
                crate::error::truncate(m, 100),
                app.service.model_name()
            ))
        } else {
            e.into()
        }
    })
}

/// The request's selections (priority class, profile), with Ollama-shaped errors.
pub struct OllamaSelection(pub Selection);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for OllamaSelection {
    type Rejection = OllamaError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match Selection::from_request_parts(parts, state).await {
            Ok(s) => Ok(OllamaSelection(s)),
            Err(e) => Err(e.into()),
        }
    }
}

/// Applies a request's `keep_alive` as Ollama means it: the served model's idle expiry from now
/// on (`0` unloads it once idle, a negative value keeps it loaded, none restores the policy's
/// own idle rules). The configured policy is never rewritten and nothing is saved; a LAN peer's
/// `keep_alive` is ignored (a shared server's residency is its owner's to decide). No-op
/// without a pool.
pub fn apply_keep_alive(
    app: &AppState,
    keep_alive: &Option<KeepAlive>,
    peer: std::net::IpAddr,
) -> Result<(), OllamaError> {
    let setting = keep_alive.as_ref().map(KeepAlive::setting).transpose()?;
    if !crate::guard::is_loopback(peer) {
        if setting.is_some() {
            tracing::debug!(%peer, "keep_alive from a LAN peer ignored");
        }
        return Ok(());
    }
    if let Some(scaler) = app.autoscaler.get() {
        scaler.set_keep_alive(setting);
    }
    Ok(())
}

fn ns(d: Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

fn done_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Length => "length",
        FinishReason::Stop
        | FinishReason::StopSequence(_)
        | FinishReason::Cancelled
        | FinishReason::ToolCalls => "stop",
    }
}

/// The statistics Ollama puts on the last object of a response.
fn stats(v: &mut Value, usage: &Usage, finish: FinishReason, started: Instant, report: &Report) {
    if let Some(t) = crate::report::truncation_json(report) {
        v[crate::report::TRUNCATION_FIELD] = t;
    }
    if let Some(l) = crate::report::label_json(report) {
        v[crate::report::LABEL_FIELD] = l;
    }
    v["done"] = json!(true);
    v["done_reason"] = json!(done_reason(finish));
    v["total_duration"] = json!(ns(started.elapsed()));
    v["load_duration"] = json!(0);
    v["prompt_eval_count"] = json!(usage.prompt_tokens);
    v["prompt_eval_duration"] = json!(ns(usage.time_to_first_token));
    v["eval_count"] = json!(usage.completion_tokens);
    v["eval_duration"] = json!(ns(usage
        .total_time
        .saturating_sub(usage.time_to_first_token)));
}

fn tool_calls_json(calls: &[ToolCall]) -> Value {
    Value::Array(
        calls
            .iter()
            .map(|c| {
                let args: Value = serde_json::from_str(&c.arguments)
                    .unwrap_or_else(|_| Value::String(c.arguments.clone()));
                json!({"function": {"name": c.name, "arguments": args}})
            })
            .collect(),
    )
}

/// Which endpoint shapes the objects.
#[derive(Clone, Copy)]
enum Shape {
    Generate,
    Chat,
}

impl Shape {
    fn object(self, model: &str, text: &str, calls: &[ToolCall]) -> Value {
        let mut v = json!({"model": model, "created_at": rfc3339(SystemTime::now())});
        match self {
            Shape::Generate => v["response"] = json!(text),
            Shape::Chat => {
                v["message"] = json!({"role": "assistant", "content": text});
                if !calls.is_empty() {
                    v["message"]["tool_calls"] = tool_calls_json(calls);
                }
            }
        }
        v["done"] = json!(false);
        v
    }
}

fn ndjson(stream: impl Stream<Item = Value> + Send + 'static) -> Response {
    let body = Body::from_stream(stream.map(|v| {
        let mut line = v.to_string();
        line.push('\n');
        Ok::<_, std::convert::Infallible>(bytes::Bytes::from(line))
    }));
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    resp
}

/// Streams a generation as NDJSON objects; the last has `done: true` and the statistics.
fn stream_response(
    stream: GenerationStream,
    shape: Shape,
    model: String,
    started: Instant,
    report: Report,
) -> Response {
    let lines = stream.filter_map(move |ev| {
        let out = match ev {
            GenerationEvent::Text(t) if t.is_empty() => None,
            GenerationEvent::Text(t) => Some(shape.object(&model, &t, &[])),
            GenerationEvent::ToolCalls(c) => Some(shape.object(&model, "", &c)),
            GenerationEvent::Done {
                finish_reason,
                usage,
            } => {
                let mut v = shape.object(&model, "", &[]);
                stats(&mut v, &usage, finish_reason, started, &report);
                Some(v)
            }
            GenerationEvent::Error(e) => {
                Some(OllamaError::from(crate::error::generation_failed(&e)).to_json())
            }
        };
        futures::future::ready(out)
    });
    ndjson(lines)
}

/// Runs one request: NDJSON stream or one JSON body.
async fn respond(
    app: &AppState,
    submission: Submission,
    stream: bool,
    shape: Shape,
    model: String,
    keep_alive: &Option<KeepAlive>,
    peer: std::net::IpAddr,
) -> Result<Response, OllamaError> {
    let started = Instant::now();
    // A bad keep_alive is refused before anything runs.
    if let Some(k) = keep_alive {
        k.setting()?;
    }
    let answer = app
        .gateway
        .submit(submission)
        .await
        .map_err(ApiError::from)?;
    let (events, report) = (answer.stream, answer.report);
    apply_keep_alive(app, keep_alive, peer)?;
    if stream {
        let resp = stream_response(events, shape, model, started, report.clone());
        return Ok(with_report(resp, &report));
    }
    let out = collect(events).await?;
    let mut v = shape.object(&model, &out.text, &out.tool_calls);
    stats(
        &mut v,
        &out.usage,
        out.finish.unwrap_or(FinishReason::Stop),
        started,
        &report,
    );
    Ok(with_report(Json(v).into_response(), &report))
}

/// The answer to a request with no prompt: the model is (un)loaded, nothing generated.
fn load_only(model: &str, shape: Shape, ka: &Option<KeepAlive>) -> Response {
    let unload = ka
        .as_ref()
        .and_then(|k| k.setting().ok())
        .is_some_and(|s| s == KeepAliveSetting::Unload);
    let mut v = shape.object(model, "", &[]);
    v["done"] = json!(true);
    v["done_reason"] = json!(if unload { "unload" } else { "load" });
    Json(v).into_response()
}

/// POST /api/generate
pub async fn generate(
    State(app): State<AppState>,
    Peer(peer): Peer,
    OllamaSelection(selection): OllamaSelection,
    OllamaJson(req): OllamaJson<GenerateRequest>,
) -> Result<Response, OllamaError> {
    serve_body(&app, peer, selection, &req, Shape::Generate).await
}

/// POST /api/chat
pub async fn chat(
    State(app): State<AppState>,
    Peer(peer): Peer,
    OllamaSelection(selection): OllamaSelection,
    OllamaJson(req): OllamaJson<ChatRequest>,
) -> Result<Response, OllamaError> {
    serve_body(&app, peer, selection, &req, Shape::Chat).await
}

/// Either endpoint: a load-only body loads (or unloads) the model; any other is generated.
async fn serve_body(
    app: &AppState,
    peer: std::net::IpAddr,
    selection: Selection,
    req: &impl GenerationBody,
    shape: Shape,
) -> Result<Response, OllamaError> {
    let (model, profile) = check_model(app, req.model(), req.profile(), &selection)?;
    if req.is_load_only() {
        apply_keep_alive(app, req.keep_alive(), peer)?;
        return Ok(load_only(&model, shape, req.keep_alive()));
    }
    let generation = req.to_generation()?;
    respond(
        app,
        Submission {
            request: generation,
            class: selection.class,
            profile,
        },
        req.is_stream(),
        shape,
        model,
        req.keep_alive(),
        peer,
    )
    .await
}

/// What the loaded engine says about the model, if one is running.
fn engine_info(app: &AppState) -> Option<tidepool_engine::EngineInfo> {
    app.service.engine().ok().map(|e| e.info().clone())
}

fn details(info: Option<&tidepool_engine::EngineInfo>) -> Value {
    let family = info.map(|i| i.gguf.shape.arch.clone()).unwrap_or_default();
    let quant = info
        .and_then(|i| {
            i.gguf
                .tensor_types
                .iter()
                .max_by_key(|(_, n)| **n)
                .map(|(t, _)| t.to_uppercase())
        })
        .unwrap_or_default();
    json!({
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family],
        "parameter_size": "",
        "quantization_level": quant,
    })
}

/// A stable 64-hex-digit digest of the served model (its name and weight bytes).
fn digest(name: &str, info: Option<&tidepool_engine::EngineInfo>) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    if let Some(i) = info {
        h.update(i.gguf.tensor_bytes.to_le_bytes());
    }
    hex_string(&h.finalize())
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn modified_at(app: &AppState) -> String {
    rfc3339(UNIX_EPOCH + Duration::from_secs(app.started_unix))
}

/// GET /api/tags: the served model.
pub async fn tags(State(app): State<AppState>) -> Json<Value> {
    let info = engine_info(&app);
    let name = app.service.model_name();
    Json(json!({"models": [{
        "name": name,
        "model": name,
        "modified_at": modified_at(&app),
        "size": info.as_ref().map_or(0, |i| i.gguf.tensor_bytes),
        "digest": digest(&name, info.as_ref()),
        "details": details(info.as_ref()),
    }]}))
}

/// GET /api/ps: one entry per running worker (each a loaded copy of the model), with the memory
/// it reserves and when it is expected to be unloaded.
pub async fn ps(State(app): State<AppState>) -> Json<Value> {
    let info = engine_info(&app);
    let name = app.service.model_name();
    let on_gpu = info
        .as_ref()
        .is_some_and(|i| !i.device.name.starts_with("cpu"));
    let context = info.as_ref().map_or(0, |i| i.max_sequence_length);
    let entry = |size: u64, expires_unix: u64, extra: Value| {
        let mut v = json!({
            "name": name,
            "model": name,
            "size": size,
            "digest": digest(&name, info.as_ref()),
            "details": details(info.as_ref()),
            "expires_at": rfc3339(UNIX_EPOCH + Duration::from_secs(expires_unix)),
            "size_vram": if on_gpu { size } else { 0 },
            "context_length": context,
        });
        v["tidepool"] = extra;
        v
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut models = Vec::new();
    match (app.service.pool(), app.autoscaler.get()) {
        (Some(pool), Some(scaler)) => {
            let cfg = scaler.config();
            let keep_alive = scaler.keep_alive().map(KeepAliveSetting::seconds);
            // Seconds until the last request is `ttl` old.
            let after_idle = |ttl: f64| {
                let idle = app
                    .service
                    .scheduler()
                    .idle_for()
                    .map_or(0.0, |d| d.as_secs_f64());
                now + (ttl - idle).clamp(0.0, 1e10) as u64
            };
            let mut workers: Vec<_> = pool
                .workers()
                .into_iter()
                .filter(|w| matches!(w.state, WorkerState::Ready | WorkerState::Loading))
                .collect();
            workers.sort_by_key(|w| w.id);
            for (rank, w) in workers.iter().enumerate() {
                // The first `min_workers` stay; with none kept, the pool empties `idle_ttl_s`
                // after the last request; workers above the floor go after the down window.
                let expires = if let Some(k) = keep_alive {
                    if k.is_finite() {
                        after_idle(k)
                    } else {
                        FOREVER_UNIX
                    }
                } else if rank < cfg.min_workers {
                    FOREVER_UNIX
                } else if cfg.min_workers == 0 && rank == 0 {
                    after_idle(cfg.idle_ttl_s)
                } else {
                    after_idle(cfg.down.stabilization_s)
                };
                let mut model = entry(
                    w.reserved_bytes,
                    expires.min(FOREVER_UNIX),
                    json!({"worker": w.id, "state": w.state, "slots_busy": w.slots_busy,
                           "slots_total": w.slots_total}),
                );
                // What this worker's slots hold (workers are sized by what requests need).
                model["context_length"] = json!(w.context_tokens);
                models.push(model);
            }
        }
        _ => {
            if let Some(i) = &info {
                models.push(entry(
                    i.gguf.tensor_bytes,
                    FOREVER_UNIX,
                    json!({"worker": 0, "state": "ready", "slots_total": i.max_sequences}),
                ));
            }
        }
    }
    Json(json!({ "models": models }))
}

/// POST /api/show
pub async fn show(
    State(app): State<AppState>,
    OllamaJson(req): OllamaJson<ShowRequest>,
) -> Result<Json<Value>, OllamaError> {
    let _ = req.verbose;
    let name = req.model.as_deref().or(req.name.as_deref());
    let (model, _) = check_model(&app, name, None, &Selection::default())?;
    let info = engine_info(&app);
    let mut model_info = serde_json::Map::new();
    if let Some(i) = &info {
        let arch = &i.gguf.shape.arch;
        model_info.insert("general.architecture".into(), json!(arch));
        model_info.insert(
            format!("{arch}.context_length"),
            json!(i.gguf.shape.context_length),
        );
        model_info.insert(format!("{arch}.block_count"), json!(i.gguf.shape.layers));
        model_info.insert(
            format!("{arch}.embedding_length"),
            json!(i.gguf.shape.hidden),
        );
        model_info.insert(
            format!("{arch}.attention.head_count_kv"),
            json!(i.gguf.shape.kv_heads),
        );
        model_info.insert(
            "tokenizer.ggml.vocab_size".into(),
            json!(i.gguf.shape.vocab),
        );
    }
    Ok(Json(json!({
        "modelfile": format!("# Served by Tidepool\nFROM {model}\n"),
        "parameters": "",
        // The model's own chat template (inside the GGUF) renders every prompt; Ollama's
        // Go-template dialect is not used.
        "template": "",
        "details": details(info.as_ref()),
        "model_info": model_info,
        "capabilities": ["completion", "tools"],
        "modified_at": modified_at(&app),
    })))
}

/// GET /api/version
pub async fn version() -> Json<Value> {
    Json(json!({"version": OLLAMA_API_VERSION, "tidepool": env!("CARGO_PKG_VERSION")}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
        let t = UNIX_EPOCH + Duration::new(1_709_251_199, 5);
        assert_eq!(rfc3339(t), "2024-02-29T23:59:59.000000005Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00.000000000Z");
    }
}
