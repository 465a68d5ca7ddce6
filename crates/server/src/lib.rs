//! Tidepool's HTTP face, over axum: the OpenAI-, Anthropic- and Ollama-compatible APIs, `/health`,
//! and graceful shutdown.
//!
//! Every request passes one guard ([`guard`]: peer, Host, Origin, content type) and the LAN's
//! token check ([`sharing`]); connections are accepted with limits and timeouts ([`listen`]).
//!
//! The server holds no inference logic: every request becomes a [`GenerationRequest`] handed to
//! the gateway's [`Service`].
//!
//! [`GenerationRequest`]: tidepool_engine::request::GenerationRequest

pub mod admin;
pub mod anthropic;
pub mod dashboard;
pub mod error;
pub mod guard;
pub mod listen;
pub mod models;
pub mod ollama;
pub mod openai;
pub mod report;
pub mod selection;
pub mod sharing;

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tidepool_control::autoscale::Autoscaler;
use tidepool_gateway::gateway::{Gateway, GatewayConfig};
use tidepool_gateway::service::{ModelStatus, Service};

use error::ApiError;
use guard::{Guard, GuardConfig};
use listen::{ConnGate, ConnLimits};

/// HTTP settings.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Largest accepted request body.
    pub body_limit: usize,
    /// How long shutdown waits for running requests before closing anyway.
    pub drain_timeout: Duration,
    /// Connection limits, header and write timeouts.
    pub connections: ConnLimits,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            body_limit: 4 * 1024 * 1024,
            drain_timeout: Duration::from_secs(60),
            connections: ConnLimits::default(),
        }
    }
}

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    pub service: Arc<Service>,
    pub started_unix: u64,
    /// The pool's control loop, once the model is loaded into a pool.
    pub autoscaler: Arc<OnceLock<Arc<Autoscaler>>>,
    /// LAN sharing: off unless switched on.
    pub sharing: Arc<sharing::Sharing>,
    /// Model downloads started from the dashboard.
    pub downloads: Arc<models::Downloads>,
    /// How to switch the served model (set by the front end that loads models), and the last
    /// switch.
    pub switcher: Option<Arc<dyn models::ModelSwitcher>>,
    pub switch: Arc<std::sync::Mutex<Option<models::Switch>>>,
    /// Task profiles, answer cache, degraded mode and the long-input policy, in front of the
    /// service.
    pub gateway: Arc<Gateway>,
    /// Host, Origin and content-type rules (see [`guard`]).
    pub guard: Arc<Guard>,
    /// Open connections, shared by the loopback and the LAN listeners.
    pub connections: Arc<OnceLock<Arc<ConnGate>>>,
    /// The one metrics registry every part records into; `/metrics` encodes it.
    pub registry: Arc<prometheus_client::registry::Registry>,
}

impl AppState {
    /// The state with the default gateway settings.
    pub fn new(service: Arc<Service>) -> Self {
        Self::with_gateway(service, GatewayConfig::default())
    }

    /// The state with these gateway settings (from the configuration file).
    pub fn with_gateway(service: Arc<Service>, gateway: GatewayConfig) -> Self {
        let gateway = Gateway::new(service.clone(), gateway);
        let autoscaler: Arc<OnceLock<Arc<Autoscaler>>> = Default::default();
        let connections: Arc<OnceLock<Arc<ConnGate>>> = Default::default();
        let mut registry = prometheus_client::registry::Registry::default();
        service.scheduler().register(&mut registry);
        gateway.register(&mut registry);
        tidepool_control::autoscale::register(autoscaler.clone(), &mut registry);
        admin::register(connections.clone(), &mut registry);
        AppState {
            gateway,
            service,
            autoscaler,
            sharing: Arc::new(sharing::Sharing::new(false, None, 100)),
            downloads: Default::default(),
            switcher: None,
            switch: Default::default(),
            guard: Arc::new(Guard::new(GuardConfig::default())),
            connections,
            registry: Arc::new(registry),
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }

    /// The same state with these guard settings (extra host names, allowed origins).
    pub fn with_guard(mut self, config: GuardConfig) -> Self {
        self.guard = Arc::new(Guard::new(config));
        self
    }
}

/// The full router. Two groups: the public API (OpenAI, Ollama, health) and the local routes
/// (admin API, metrics, dashboard), loopback only and own-origin only by their `route_layer`.
/// The CORS policy allows the configured origins on `/v1` and `/api` only. Around both, outermost first: a panic becomes an
/// API-shaped 500; a LAN peer is authenticated and rate limited ([`sharing::lan_guard`]); the
/// Host and Origin rules ([`guard::guard`]); new requests get 503 once shutdown has begun.
pub fn router(state: AppState, cfg: &HttpConfig) -> Router {
    let public = Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/responses", post(openai::responses::create))
        .route(
            "/v1/responses/input_tokens",
            post(openai::responses::input_tokens),
        )
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .route("/v1/embeddings", post(openai::embeddings::create))
        .route("/v1/models", get(openai::list_models))
        .route("/v1/models/{id}", get(openai::get_model))
        .route("/health", get(health))
        .route("/api/generate", post(ollama::generate))
        .route("/api/chat", post(ollama::chat))
        .route("/api/embed", post(ollama::embed::embed))
        .route("/api/embeddings", post(ollama::embed::embeddings))
        .route("/api/tags", get(ollama::tags))
        .route("/api/ps", get(ollama::ps))
        .route("/api/show", post(ollama::show))
        .route("/api/version", get(ollama::version));
    let local = Router::new()
        .route("/admin/status", get(admin::status))
        .route("/admin/events", get(admin::events))
        .route("/admin/scale", post(admin::scale))
        .route(
            "/admin/config",
            get(admin::get_config).put(admin::put_config),
        )
        .route("/metrics", get(admin::metrics))
        .route("/admin/sharing", get(sharing::get).put(sharing::put))
        .route("/admin/sharing/token", post(sharing::reveal_token))
        .route("/admin/sharing/rotate", post(sharing::rotate))
        .route("/admin/models", get(models::list))
        .route("/admin/models/pull", post(models::pull))
        .route("/admin/model", axum::routing::put(models::switch))
        .route("/", get(dashboard::asset))
        .route("/ui/{*path}", get(dashboard::asset))
        .route("/css/{*path}", get(dashboard::asset))
        .route("/js/{*path}", get(dashboard::asset))
        .route("/vendor/{*path}", get(dashboard::asset))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            guard::local_only,
        ));
    Router::new()
        .merge(public)
        .merge(local)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(cfg.body_limit))
        // Answers preflights before routing (a route has no OPTIONS method of its own).
        .layer(guard::api_cors(state.guard.clone()))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            refuse_while_shutting_down,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), guard::guard))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            sharing::lan_guard,
        ))
        .layer(middleware::from_fn(error::panics_in_shape))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            error::panic_response,
        ))
        .with_state(state)
}

/// GET /health: 200 when the model is ready, 503 with the reason otherwise.
async fn health(State(app): State<AppState>) -> Response {
    let model = app.service.model_name();
    if app.service.is_shutting_down() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "shutting_down", "model": model, "reason": "the server is shutting down"})),
        )
            .into_response();
    }
    match app.service.status() {
        ModelStatus::Ready => Json(json!({"status": "ok", "model": model})).into_response(),
        ModelStatus::Loading { detail, seconds } => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "status": "loading",
                "model": model,
                "reason": format!("loading the model: {detail}"),
                "seconds": seconds,
            })),
        )
            .into_response(),
        ModelStatus::Degraded { reason } => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "degraded", "model": model, "reason": reason})),
        )
            .into_response(),
        ModelStatus::Failed { error } => (
            StatusCode::SERVICE_UNAVAILABLE,
            // The first line: a backtrace or a long cause chain stays in the log.
            Json(json!({"status": "failed", "model": model,
                        "reason": error::truncate(error.lines().next().unwrap_or(""), 300)})),
        )
            .into_response(),
    }
}

async fn not_found(uri: Uri) -> Response {
    error::in_shape_for(
        uri.path(),
        ApiError::not_found(format!("Unknown route: {}", uri.path())),
    )
}

async fn method_not_allowed(req: Request) -> Response {
    error::in_shape_for(
        req.uri().path(),
        ApiError::method_not_allowed(format!(
            "Method {} is not allowed on {}",
            req.method(),
            req.uri().path()
        )),
    )
}

/// Once shutdown has begun, new requests get 503 (health still answers, with its own 503).
async fn refuse_while_shutting_down(
    State(app): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    if app.service.is_shutting_down() && req.uri().path() != "/health" {
        return error::in_shape_for(
            req.uri().path(),
            ApiError::unavailable("The server is shutting down.", 5),
        );
    }
    next.run(req).await
}

/// Serves until `shutdown` resolves, then refuses new requests (503), waits up to
/// `drain_timeout` for running generations to finish, and closes every connection.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    cfg: HttpConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    listen::raise_fd_limit();
    let service = state.service.clone();
    let sharing = state.sharing.clone();
    let gate = state
        .connections
        .get_or_init(|| ConnGate::new(cfg.connections.clone()))
        .clone();
    if let Ok(local) = listener.local_addr() {
        state.guard.set_port(local.port());
        sharing.started(&state, local, cfg.clone());
    }
    let autoscaler = state.autoscaler.clone();
    let app = router(state, &cfg);
    let drain_timeout = cfg.drain_timeout;
    let drained = async move {
        service.begin_shutdown();
        if let Some(a) = autoscaler.get() {
            a.stop();
        }
        sharing.stop_listeners();
        let left = service.wait_idle(drain_timeout).await;
        if left > 0 {
            tracing::warn!(
                in_flight = left,
                "drain timeout reached; closing with requests still running"
            );
        }
    };
    listen::serve_connections(
        listener,
        app,
        gate,
        shutdown,
        drained,
        Duration::from_secs(2),
    )
    .await
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received; finishing running requests"),
        _ = term => tracing::info!("SIGTERM received; finishing running requests"),
    }
}
