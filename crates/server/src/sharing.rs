//! LAN sharing: off by default (loopback only). On, the server also listens on this machine's LAN
//! addresses, and every request from a non-loopback peer must carry `Authorization: Bearer
//! <token>` (compared in constant time) and stay under a per-address rate limit. The admin API
//! and the dashboard are never served to the LAN. Sharing toggles at run time: LAN listeners are
//! started and stopped without touching the loopback one.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Instant;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tokio::sync::oneshot;

use crate::error::{ApiError, ApiJson};
use crate::{AppState, HttpConfig};

/// A new random token: 32 bytes from the OS's CSPRNG, hex-encoded.
pub fn generate_token() -> String {
    use rand::TryRngCore;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .expect("the OS random number generator failed");
    hex::encode(bytes)
}

/// Whether `headers` carry `Authorization: Bearer <expected>`, compared in constant time.
pub fn bearer_matches(headers: &HeaderMap, expected: &str) -> bool {
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
    else {
        return false;
    };
    // ct_eq is constant-time for equal lengths; a length mismatch reveals only the length.
    given.trim().as_bytes().ct_eq(expected.as_bytes()).into()
}

/// Per-address token buckets: `per_minute` requests, refilled continuously.
#[derive(Debug)]
pub struct RateLimiter {
    per_minute: u32,
    buckets: HashMap<IpAddr, (f64, Instant)>,
}

/// Addresses remembered before idle full buckets are dropped.
const MAX_TRACKED: usize = 4096;

impl RateLimiter {
    pub fn new(per_minute: u32) -> RateLimiter {
        RateLimiter {
            per_minute: per_minute.max(1),
            buckets: HashMap::new(),
        }
    }

    /// Takes one request for `ip` at `now`; `Err(seconds)` to wait when over the limit.
    pub fn check(&mut self, ip: IpAddr, now: Instant) -> Result<(), u64> {
        let cap = f64::from(self.per_minute);
        let per_s = cap / 60.0;
        if self.buckets.len() >= MAX_TRACKED {
            self.buckets.retain(|_, (tokens, at)| {
                *tokens + now.saturating_duration_since(*at).as_secs_f64() * per_s < cap
            });
        }
        let (tokens, at) = self.buckets.entry(ip).or_insert((cap, now));
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * per_s).min(cap);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / per_s).ceil().max(1.0) as u64)
        }
    }
}

/// What the admin API and the dashboard show.
#[derive(Debug, Clone, Serialize)]
pub struct SharingStatus {
    pub enabled: bool,
    /// URLs other machines use (one per LAN address).
    pub urls: Vec<String>,
    pub token: Option<String>,
    pub rate_per_minute: u32,
}

struct Inner {
    enabled: bool,
    token: Option<String>,
    limiter: RateLimiter,
    /// The loopback listener's address, once serving.
    local: Option<SocketAddr>,
    http: HttpConfig,
    /// LAN listeners started at run time, and how to stop each.
    listeners: Vec<(SocketAddr, oneshot::Sender<()>)>,
}

/// The sharing switch and its state.
pub struct Sharing {
    inner: Mutex<Inner>,
}

impl Sharing {
    /// `enabled` takes effect once the server starts ([`crate::serve`]).
    pub fn new(enabled: bool, token: Option<String>, rate_per_minute: u32) -> Sharing {
        Sharing {
            inner: Mutex::new(Inner {
                enabled,
                token,
                limiter: RateLimiter::new(rate_per_minute),
                local: None,
                http: HttpConfig::default(),
                listeners: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn status(&self) -> SharingStatus {
        let inner = self.lock();
        let port = inner.local.map_or(0, |a| a.port());
        let urls = if inner.enabled {
            if inner.local.is_some_and(|a| a.ip().is_unspecified()) {
                lan_addresses()
                    .into_iter()
                    .map(|ip| url(SocketAddr::new(ip, port)))
                    .collect()
            } else {
                inner.listeners.iter().map(|(a, _)| url(*a)).collect()
            }
        } else {
            Vec::new()
        };
        SharingStatus {
            enabled: inner.enabled,
            urls,
            token: inner.token.clone(),
            rate_per_minute: inner.limiter.per_minute,
        }
    }

    /// Records the loopback listener (called by [`crate::serve`]) and starts LAN listeners if
    /// sharing is on.
    pub(crate) fn started(&self, app: &AppState, local: SocketAddr, http: HttpConfig) {
        let enabled = {
            let mut inner = self.lock();
            inner.local = Some(local);
            inner.http = http;
            inner.enabled
        };
        if enabled {
            if let Err(e) = self.set_enabled(app, true) {
                tracing::error!("LAN sharing could not start: {}", e.message);
            }
        }
    }

    /// Turns sharing on (listening on every LAN address; a token is generated if there is none)
    /// or off (LAN listeners stop; requests they are running finish).
    pub fn set_enabled(&self, app: &AppState, on: bool) -> Result<SharingStatus, ApiError> {
        let mut inner = self.lock();
        if !on {
            inner.enabled = false;
            for (addr, stop) in inner.listeners.drain(..) {
                let _ = stop.send(());
                tracing::info!("LAN sharing off: stopped listening on {addr}");
            }
            drop(inner);
            return Ok(self.status());
        }
        if inner.token.is_none() {
            inner.token = Some(generate_token());
        }
        inner.enabled = true;
        let Some(local) = inner.local else {
            // Not serving yet: listeners start with the server.
            drop(inner);
            return Ok(self.status());
        };
        if local.ip().is_unspecified() || !inner.listeners.is_empty() {
            // The main listener already takes LAN peers, or the LAN ones run.
            drop(inner);
            return Ok(self.status());
        }
        let mut errors = Vec::new();
        for ip in lan_addresses() {
            let addr = SocketAddr::new(ip, local.port());
            let std_listener = match std::net::TcpListener::bind(addr) {
                Ok(l) => l,
                Err(e) => {
                    errors.push(format!("{addr}: {e}"));
                    continue;
                }
            };
            let listener = std_listener
                .set_nonblocking(true)
                .and_then(|_| tokio::net::TcpListener::from_std(std_listener));
            let listener = match listener {
                Ok(l) => l,
                Err(e) => {
                    errors.push(format!("{addr}: {e}"));
                    continue;
                }
            };
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            let router = crate::router(app.clone(), &inner.http)
                .into_make_service_with_connect_info::<SocketAddr>();
            tokio::spawn(async move {
                let stopped = async move {
                    let _ = stop_rx.await;
                };
                if let Err(e) = axum::serve(listener, router)
                    .with_graceful_shutdown(stopped)
                    .await
                {
                    tracing::error!("LAN listener on {addr} failed: {e}");
                }
            });
            tracing::info!("LAN sharing on: listening on http://{addr} (bearer token required)");
            inner.listeners.push((addr, stop_tx));
        }
        if inner.listeners.is_empty() {
            inner.enabled = false;
            let why = if errors.is_empty() {
                "this machine has no LAN address".to_string()
            } else {
                errors.join("; ")
            };
            return Err(ApiError::unavailable(
                format!("LAN sharing could not start: {why}."),
                30,
            ));
        }
        drop(inner);
        Ok(self.status())
    }

    /// A new token; the old one stops working at once.
    pub fn rotate(&self) -> SharingStatus {
        self.lock().token = Some(generate_token());
        self.status()
    }

    pub fn set_rate(&self, per_minute: u32) {
        self.lock().limiter = RateLimiter::new(per_minute);
    }

    /// Stops the LAN listeners (server shutdown).
    pub(crate) fn stop_listeners(&self) {
        for (_, stop) in self.lock().listeners.drain(..) {
            let _ = stop.send(());
        }
    }

    /// The gate for a non-loopback peer.
    fn admit(&self, peer: IpAddr, headers: &HeaderMap, path: &str) -> Result<(), ApiError> {
        let mut inner = self.lock();
        let Some(token) = inner.token.clone().filter(|_| inner.enabled) else {
            return Err(ApiError::forbidden(
                "LAN sharing is off: this server answers only on this machine.",
            ));
        };
        if !bearer_matches(headers, &token) {
            return Err(ApiError::unauthorized(
                "A LAN client must send `Authorization: Bearer <token>` with the token shown in Tidepool's dashboard.",
            ));
        }
        if is_local_only(path) {
            return Err(ApiError::forbidden(
                "The admin API and the dashboard answer only on this machine (loopback).",
            ));
        }
        inner
            .limiter
            .check(peer, Instant::now())
            .map_err(|retry_after_s| {
                ApiError::rate_limited(
                    format!(
                        "Too many requests from {peer}: the limit is {} per minute.",
                        inner.limiter.per_minute
                    ),
                    retry_after_s,
                )
            })
    }
}

fn url(a: SocketAddr) -> String {
    format!("http://{a}")
}

/// Paths never served to the LAN.
fn is_local_only(path: &str) -> bool {
    path == "/" || path == "/metrics" || path.starts_with("/admin") || path.starts_with("/ui/")
}

/// This machine's LAN addresses: every interface address that is not loopback, and not an IPv6
/// link-local one (those need a scope to be reachable).
pub fn lan_addresses() -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .map(|i| i.ip())
        .filter(|ip| match ip {
            IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_unspecified(),
            IpAddr::V6(v6) => {
                !v6.is_loopback() && !v6.is_unspecified() && (v6.segments()[0] & 0xffc0) != 0xfe80
            }
        })
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// Middleware on every route: loopback peers pass; others must be let in by [`Sharing`].
pub async fn lan_guard(
    State(app): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    let ip = match peer.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    if ip.is_loopback() {
        return next.run(req).await;
    }
    match app.sharing.admit(ip, req.headers(), req.uri().path()) {
        Ok(()) => next.run(req).await,
        Err(e) => {
            tracing::debug!(%peer, path = req.uri().path(), "LAN request refused: {}", e.message);
            e.into_response()
        }
    }
}

/// GET /admin/sharing
pub async fn get(State(app): State<AppState>) -> Json<SharingStatus> {
    Json(app.sharing.status())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharingUpdate {
    enabled: bool,
    rate_per_minute: Option<u32>,
}

/// PUT /admin/sharing `{"enabled": bool, "rate_per_minute": n}`: applies at once.
pub async fn put(
    State(app): State<AppState>,
    ApiJson(update): ApiJson<SharingUpdate>,
) -> Result<Json<SharingStatus>, ApiError> {
    if let Some(r) = update.rate_per_minute {
        if r == 0 {
            return Err(ApiError::invalid_param(
                "rate_per_minute",
                "`rate_per_minute` must be at least 1",
            ));
        }
        app.sharing.set_rate(r);
    }
    Ok(Json(app.sharing.set_enabled(&app, update.enabled)?))
}

/// POST /admin/sharing/rotate: a new token.
pub async fn rotate(State(app): State<AppState>) -> Json<SharingStatus> {
    Json(app.sharing.rotate())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn tokens_are_random_and_long() {
        let (a, b) = (generate_token(), generate_token());
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn bearer_must_match_exactly() {
        let mut h = HeaderMap::new();
        assert!(!bearer_matches(&h, "secret-token-123456"));
        for (given, ok) in [
            ("Bearer secret-token-123456", true),
            ("bearer secret-token-123456", true),
            ("Bearer secret-token-12345", false),
            ("Bearer secret-token-1234567", false),
            ("Basic secret-token-123456", false),
            ("secret-token-123456", false),
            ("Bearer ", false),
        ] {
            h.insert(header::AUTHORIZATION, given.parse().unwrap());
            assert_eq!(bearer_matches(&h, "secret-token-123456"), ok, "{given}");
        }
    }

    #[test]
    fn rate_limit_per_address_with_refill() {
        let mut l = RateLimiter::new(60);
        let t0 = Instant::now();
        let a: IpAddr = "10.0.0.2".parse().unwrap();
        let b: IpAddr = "10.0.0.3".parse().unwrap();
        for _ in 0..60 {
            assert!(l.check(a, t0).is_ok());
        }
        assert_eq!(l.check(a, t0), Err(1));
        // Another address has its own budget.
        assert!(l.check(b, t0).is_ok());
        // One per second comes back.
        assert!(l.check(a, t0 + Duration::from_millis(1000)).is_ok());
        assert!(l.check(a, t0 + Duration::from_millis(1000)).is_err());
        let mut slow = RateLimiter::new(2);
        assert!(slow.check(a, t0).is_ok() && slow.check(a, t0).is_ok());
        assert_eq!(slow.check(a, t0), Err(30));
    }

    #[test]
    fn admin_and_dashboard_are_local_only() {
        for p in [
            "/",
            "/metrics",
            "/admin/status",
            "/admin/sharing",
            "/ui/app.js",
        ] {
            assert!(is_local_only(p), "{p}");
        }
        for p in ["/v1/models", "/v1/chat/completions", "/health", "/api/chat"] {
            assert!(!is_local_only(p), "{p}");
        }
    }
}
