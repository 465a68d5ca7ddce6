//! The admin API, on loopback peers only: what the pool is doing and why, and a manual override.
//!
//! - `GET /admin/status`: workers, queue by class, signals, the current decision and its reason,
//!   memory budget, reservations and process RSS, the policy in force.
//! - `GET /admin/events`: recent worker and scaling events, oldest first.
//! - `POST /admin/scale` `{"workers": N, "ttl_s": T}`: hold N workers for T seconds.
//! - `GET` / `PUT /admin/config`: the live policy (the `[policy]` table as JSON), validated and
//!   applied at the next tick without a restart.
//! - `GET /metrics`: Prometheus text format (requests by outcome, tokens, latency and TTFT
//!   histograms, queue depth by class, workers by state, memory, scaling events).

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tidepool_core::memory::process_rss_bytes;
use tidepool_core::policy::PolicyConfig;
use tidepool_core::pool::WorkerState;
use tidepool_core::queue::Class;

use crate::error::{ApiError, ApiJson};
use crate::AppState;

/// Refuses admin calls from anything but a loopback peer (the server may be shared on the LAN).
pub async fn loopback_only(
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if !peer.ip().is_loopback() {
        return Err(ApiError::forbidden(
            "The admin API answers only on this machine (loopback).",
        ));
    }
    Ok(next.run(req).await)
}

fn pool_error() -> ApiError {
    ApiError::unavailable(
        "The worker pool is not running yet (the model is loading).",
        5,
    )
}

/// GET /admin/status
pub async fn status(State(app): State<AppState>) -> Result<Json<Value>, ApiError> {
    let scaler = app.autoscaler.get().ok_or_else(pool_error)?;
    let pool = scaler.pool();
    let (decision, signals) = scaler.last();
    let (budget, reserved) = pool.memory();
    let queue: serde_json::Map<String, Value> = Class::ALL
        .iter()
        .map(|&c| (c.as_str().to_string(), json!(pool.queue_depth(c))))
        .collect();
    Ok(Json(json!({
        "model": app.service.model_name(),
        "workers": pool.workers(),
        "queue": queue,
        "in_flight": app.service.in_flight(),
        "signals": signals,
        "decision": decision,
        "memory": {
            "budget_bytes": budget,
            "reserved_bytes": reserved,
            "process_rss_bytes": process_rss_bytes(),
        },
        "policy": scaler.config(),
    })))
}

/// GET /admin/events
pub async fn events(State(app): State<AppState>) -> Result<Json<Value>, ApiError> {
    let scaler = app.autoscaler.get().ok_or_else(pool_error)?;
    Ok(Json(json!({ "events": scaler.pool().events() })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleRequest {
    workers: usize,
    #[serde(default = "default_ttl")]
    ttl_s: f64,
}

fn default_ttl() -> f64 {
    600.0
}

/// POST /admin/scale
pub async fn scale(
    State(app): State<AppState>,
    ApiJson(req): ApiJson<ScaleRequest>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if !(req.ttl_s.is_finite() && req.ttl_s > 0.0) {
        return Err(ApiError::invalid_param(
            "ttl_s",
            "`ttl_s` must be a positive number of seconds",
        ));
    }
    if req.workers > 64 {
        return Err(ApiError::invalid_param(
            "workers",
            "`workers` must be at most 64",
        ));
    }
    let scaler = app.autoscaler.get().ok_or_else(pool_error)?;
    let decision = scaler.set_override(req.workers, Duration::from_secs_f64(req.ttl_s));
    Ok((StatusCode::ACCEPTED, Json(json!({ "decision": decision }))))
}

/// GET /admin/config
pub async fn get_config(State(app): State<AppState>) -> Result<Json<Value>, ApiError> {
    let scaler = app.autoscaler.get().ok_or_else(pool_error)?;
    Ok(Json(json!({ "policy": scaler.config() })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigUpdate {
    policy: PolicyConfig,
}

/// PUT /admin/config `{"policy": {...}}`: the whole policy; omitted fields take their defaults.
pub async fn put_config(
    State(app): State<AppState>,
    ApiJson(update): ApiJson<ConfigUpdate>,
) -> Result<Json<Value>, ApiError> {
    let scaler = app.autoscaler.get().ok_or_else(pool_error)?;
    update
        .policy
        .validate()
        .map_err(|(key, message)| ApiError::invalid_param(&key, format!("`{key}` {message}")))?;
    scaler.set_config(update.policy);
    Ok(Json(json!({ "policy": scaler.config() })))
}

/// GET /metrics: Prometheus text format.
pub async fn metrics(State(app): State<AppState>) -> Response {
    use std::fmt::Write;
    let mut out = String::new();
    app.service.metrics.render(&mut out);
    app.gateway.render_metrics(&mut out);
    let gauge = |out: &mut String, name: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    };
    gauge(
        &mut out,
        "tidepool_in_flight",
        "Generations running or waiting.",
    );
    let _ = writeln!(out, "tidepool_in_flight {}", app.service.in_flight());
    gauge(
        &mut out,
        "tidepool_process_resident_bytes",
        "Resident memory of the process.",
    );
    let _ = writeln!(
        out,
        "tidepool_process_resident_bytes {}",
        process_rss_bytes()
    );
    if let Some(scaler) = app.autoscaler.get() {
        let pool = scaler.pool();
        gauge(
            &mut out,
            "tidepool_queue_depth",
            "Requests waiting for a slot, by class.",
        );
        for c in Class::ALL {
            let _ = writeln!(
                out,
                "tidepool_queue_depth{{class=\"{c}\"}} {}",
                pool.queue_depth(c)
            );
        }
        gauge(&mut out, "tidepool_workers", "Workers by state.");
        let workers = pool.workers();
        for (state, name) in [
            (WorkerState::Loading, "loading"),
            (WorkerState::Ready, "ready"),
            (WorkerState::Draining, "draining"),
        ] {
            let n = workers.iter().filter(|w| w.state == state).count();
            let _ = writeln!(out, "tidepool_workers{{state=\"{name}\"}} {n}");
        }
        let (budget, reserved) = pool.memory();
        gauge(
            &mut out,
            "tidepool_memory_budget_bytes",
            "What workers may reserve in all.",
        );
        let _ = writeln!(out, "tidepool_memory_budget_bytes {budget}");
        gauge(
            &mut out,
            "tidepool_memory_reserved_bytes",
            "What running workers reserve.",
        );
        let _ = writeln!(out, "tidepool_memory_reserved_bytes {reserved}");
        let _ = writeln!(
            out,
            "# HELP tidepool_pool_events_total Worker and scaling events since start.\n# TYPE tidepool_pool_events_total counter\ntidepool_pool_events_total {}",
            pool.events_total()
        );
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}
