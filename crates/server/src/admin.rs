//! The admin API, on loopback peers only (the router's local group, [`crate::guard`]): what the
//! pool is doing and why, and a manual override.
//!
//! - `GET /admin/status`: workers, queue by class, signals, the current decision and its reason,
//!   memory budget, reservations and process RSS, the policy in force.
//! - `GET /admin/events`: recent worker and scaling events, oldest first.
//! - `POST /admin/scale` `{"workers": N, "ttl_s": T}`: hold N workers for T seconds.
//! - `GET` / `PUT /admin/config`: the live policy (the `[policy]` table as JSON), validated and
//!   applied at the next tick without a restart.
//! - `GET /metrics`: Prometheus text format (requests by outcome, tokens, latency and TTFT
//!   histograms, queue depth by class, workers by state, memory, scaling events).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use serde::Deserialize;
use serde_json::{json, Value};
use tidepool_control::autoscale::Autoscaler;
use tidepool_control::policy::PolicyConfig;
use tidepool_control::power::PowerConfig;
use tidepool_sched::memory::process_rss_bytes;
use tidepool_sched::queue::Class;

use crate::error::{ApiError, ApiJson};
use crate::listen::ConnGate;
use crate::AppState;

fn pool_error() -> ApiError {
    ApiError::unavailable(
        "The worker pool is not running yet (the model is loading).",
        5,
    )
}

/// GET /admin/status
pub async fn status(State(app): State<AppState>) -> Result<Json<Value>, ApiError> {
    let scaler = app.autoscaler.get().ok_or_else(pool_error)?;
    let pool = scaler.pool().ok_or_else(pool_error)?;
    let (decision, signals) = scaler.last();
    let (machine, power) = scaler.machine();
    let (budget, reserved) = pool.memory();
    let queue: serde_json::Map<String, Value> = Class::ALL
        .iter()
        .map(|&c| (c.as_str().to_string(), json!(pool.queue_depth(c))))
        .collect();
    let context = pool.context_sizing();
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
            // Of which weights that several workers share.
            "shared_weights_bytes": pool.shared_weights(),
            "process_rss_bytes": process_rss_bytes(),
        },
        // What the pool was measured to serve at each number of running sequences (what the
        // policy sizes it by).
        "throughput": pool
            .throughput()
            .points()
            .iter()
            .map(|&(n, r)| json!({"sequences": n, "requests_per_s": r}))
            .collect::<Vec<_>>(),
        // How much service times vary (variance over squared mean; `null` until measured):
        // the policy's queue model waits less for regular ones.
        "service_time_scv": pool.throughput().service_scv,
        // The most sequences the pool runs at once (`null`: every free slot), and why.
        "sequence_cap": pool.sequence_cap().map(|(n, why)| json!({"sequences": n, "reason": why})),
        // Tokens of context per slot a new worker gets (`next`, from what recent requests
        // needed), between `min` and `max` (`[pool] min_context_tokens`, `context_tokens`).
        "context_tokens": {"min": context.0, "max": context.1, "next": context.2},
        // CPU time the process has used, seconds (user + system, every thread).
        "process_cpu_s": tidepool_sched::memory::process_cpu_seconds(),
        "policy": scaler.config(),
        "machine": machine,
        "power": power,
        "cpu_cores_in_use": scaler.cpu_cores(),
        "shedding": app.service.scheduler().shedding(),
        // The model's idle expiry from a request's keep_alive (`null`: the policy's rules).
        "keep_alive": scaler.keep_alive().map(|k| match k {
            tidepool_control::autoscale::KeepAlive::Unload => json!("unload"),
            tidepool_control::autoscale::KeepAlive::Forever => json!("forever"),
            tidepool_control::autoscale::KeepAlive::For(d) => json!(d.as_secs_f64()),
        }),
        "health": {
            "degraded": pool.degraded(),
            "engine_deaths": pool.deaths(),
        },
    })))
}

/// GET /admin/events
pub async fn events(State(app): State<AppState>) -> Result<Json<Value>, ApiError> {
    let scaler = app.autoscaler.get().ok_or_else(pool_error)?;
    let pool = scaler.pool().ok_or_else(pool_error)?;
    Ok(Json(json!({ "events": pool.events() })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleRequest {
    workers: usize,
    #[serde(default = "default_ttl")]
    ttl_s: f64,
}

/// The longest manual override: a year.
pub const MAX_OVERRIDE_S: f64 = 365.0 * 86_400.0;

fn default_ttl() -> f64 {
    600.0
}

/// POST /admin/scale
pub async fn scale(
    State(app): State<AppState>,
    ApiJson(req): ApiJson<ScaleRequest>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if !(req.ttl_s > 0.0 && req.ttl_s <= MAX_OVERRIDE_S) {
        return Err(ApiError::invalid_param(
            "ttl_s",
            format!("`ttl_s` must be above 0 and at most {MAX_OVERRIDE_S} seconds (a year)"),
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
    Ok(Json(live_config(scaler)))
}

fn live_config(scaler: &Autoscaler) -> Value {
    json!({ "policy": scaler.config(), "power": scaler.power_config() })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigUpdate {
    policy: Option<PolicyConfig>,
    power: Option<PowerConfig>,
}

/// PUT /admin/config `{"policy": {...}, "power": {...}}`: either or both sections, each whole
/// (omitted fields take their defaults). Both are validated before either is applied.
pub async fn put_config(
    State(app): State<AppState>,
    ApiJson(update): ApiJson<ConfigUpdate>,
) -> Result<Json<Value>, ApiError> {
    let scaler = app.autoscaler.get().ok_or_else(pool_error)?;
    if update.policy.is_none() && update.power.is_none() {
        return Err(ApiError::bad_request(
            "Send `policy`, `power` or both: the sections to replace.",
        ));
    }
    let invalid = |(key, message): (String, String)| {
        ApiError::invalid_param(&key, format!("`{key}` {message}"))
    };
    if let Some(p) = &update.policy {
        p.validate().map_err(invalid)?;
    }
    if let Some(p) = &update.power {
        p.validate().map_err(invalid)?;
    }
    if let Some(p) = update.policy {
        scaler.set_config(p);
    }
    if let Some(p) = update.power {
        scaler.set_power_config(p);
    }
    Ok(Json(live_config(scaler)))
}

/// GET /metrics: the registry in the OpenMetrics text format (which Prometheus reads).
pub async fn metrics(State(app): State<AppState>) -> Response {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &app.registry) {
        return ApiError::hidden("The metrics could not be encoded", &e.to_string())
            .into_response();
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

/// Registers the server's own metrics: process memory and clients cut off by the write timeout.
pub fn register(
    connections: Arc<OnceLock<Arc<ConnGate>>>,
    registry: &mut prometheus_client::registry::Registry,
) {
    registry.register_collector(Box::new(ServerCollector(connections)));
}

struct ServerCollector(Arc<OnceLock<Arc<ConnGate>>>);

impl std::fmt::Debug for ServerCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerCollector")
    }
}

impl Collector for ServerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        tidepool_sched::metrics::encode_gauge(
            &mut encoder,
            "tidepool_process_resident_bytes",
            "Resident memory of the process.",
            process_rss_bytes() as i64,
        )?;
        let timeouts = self.0.get().map_or(0, |g| g.write_timeouts());
        tidepool_sched::metrics::encode_counter(
            &mut encoder,
            "tidepool_write_timeouts",
            "Connections closed because the client stopped reading.",
            timeouts,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use axum::body::Body;
    use axum::extract::ConnectInfo;
    use axum::http::{Request, StatusCode};
    use tidepool_gateway::service::Service;
    use tower::ServiceExt;

    use crate::{router, AppState, HttpConfig};

    /// Sends `path` through the full router as if it came from `peer`.
    async fn from_peer(peer: &str, path: &str) -> (StatusCode, serde_json::Value) {
        let app = router(
            AppState::new(Service::new("m", vec![])),
            &HttpConfig::default(),
        );
        let peer: SocketAddr = peer.parse().unwrap();
        let mut req = Request::get(path).body(Body::empty()).unwrap();
        req.extensions_mut().insert(ConnectInfo(peer));
        let resp = app.oneshot(req).await.unwrap();
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, serde_json::from_slice(&body).unwrap_or_default())
    }

    #[tokio::test]
    async fn admin_and_metrics_refuse_lan_peers() {
        for path in [
            "/admin/status",
            "/admin/events",
            "/admin/config",
            "/metrics",
        ] {
            for peer in ["192.168.1.20:5000", "[fe80::1]:5000", "10.0.0.7:1"] {
                let (status, body) = from_peer(peer, path).await;
                assert_eq!(status, StatusCode::FORBIDDEN, "{path} from {peer}");
                assert_eq!(body["error"]["type"], "permission_error", "{body}");
            }
        }
    }

    #[tokio::test]
    async fn admin_answers_loopback_peers() {
        // No pool yet: the loopback peer gets past the guard to the handler's own 503.
        for peer in ["127.0.0.1:5000", "[::1]:5000"] {
            let (status, _) = from_peer(peer, "/admin/status").await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{peer}");
        }
        let (status, _) = from_peer("127.0.0.1:1", "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        let (status, _) = from_peer("127.0.0.1:1", "/").await;
        assert_eq!(status, StatusCode::OK, "the dashboard");
    }
}
