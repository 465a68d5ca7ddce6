//! LAN sharing: off by default (loopback only). On, the server also listens on this machine's LAN
//! addresses, and every request from a non-loopback peer must stay under a per-address rate
//! limit (failed attempts included, with a backoff after repeated wrong tokens) and carry
//! `Authorization: Bearer <token>` (compared in constant time). The admin API and the dashboard
//! are never served to the LAN. Sharing toggles at run time: LAN listeners are started and
//! stopped without touching the loopback one. A generated token is written to a file only its
//! user can read, never to stdout; the admin API shows it only to the dashboard's own origin.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::Response;
use axum::Json;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tokio::sync::oneshot;

use crate::error::{ApiError, ApiJson};
use crate::guard::{canonical, is_loopback};
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

/// Whether `headers` carry the token: `Authorization: Bearer <expected>`, or `x-api-key:
/// <expected>` as the Anthropic SDKs send it. Compared in constant time.
pub fn bearer_matches(headers: &HeaderMap, expected: &str) -> bool {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        });
    let api_key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
    let Some(given) = bearer.or(api_key) else {
        return false;
    };
    // ct_eq is constant-time for equal lengths; a length mismatch reveals only the length.
    given.trim().as_bytes().ct_eq(expected.as_bytes()).into()
}

/// Per-address limits for LAN peers: a token bucket of `per_minute` requests (governor's keyed
/// limiter) that every request takes from, refused ones included, and a backoff for failed
/// authentication: after [`FREE_FAILURES`] wrong or missing tokens an address waits 2, 4, 8 …
/// seconds (at most [`MAX_BACKOFF_S`]) before it may try again, so guessing the token is slow
/// whatever the rate. A right token clears the address's failures.
pub struct RateLimiter {
    per_minute: u32,
    limiter: governor::DefaultKeyedRateLimiter<IpAddr>,
    failures: HashMap<IpAddr, Failures>,
}

/// Wrong tokens an address may send before backoff starts.
pub const FREE_FAILURES: u32 = 5;
/// The longest backoff after failed authentication.
pub const MAX_BACKOFF_S: u64 = 300;
/// Addresses remembered before the least recent are forgotten.
const MAX_TRACKED: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    /// No attempt is looked at before this.
    blocked_until: Option<Instant>,
    last: Instant,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("per_minute", &self.per_minute)
            .field("failing_addresses", &self.failures.len())
            .finish()
    }
}

impl RateLimiter {
    pub fn new(per_minute: u32) -> RateLimiter {
        let per_minute = per_minute.max(1);
        let quota =
            governor::Quota::per_minute(std::num::NonZeroU32::new(per_minute).expect("at least 1"));
        RateLimiter {
            per_minute,
            limiter: governor::RateLimiter::keyed(quota),
            failures: HashMap::new(),
        }
    }

    pub fn per_minute(&self) -> u32 {
        self.per_minute
    }

    /// Whether `ip` may make a request at `now`: `Err(seconds)` to wait when it is backing off
    /// after failed authentication or over its rate. Every call takes one request from the
    /// bucket.
    pub fn check(&mut self, ip: IpAddr, now: Instant) -> Result<(), u64> {
        if let Some(until) = self.failures.get(&ip).and_then(|f| f.blocked_until) {
            if until > now {
                return Err(until.duration_since(now).as_secs_f64().ceil().max(1.0) as u64);
            }
        }
        if self.limiter.len() > MAX_TRACKED {
            self.limiter.retain_recent();
        }
        match self.limiter.check_key(&ip) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                use governor::clock::Clock;
                let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
                Err(wait.as_secs_f64().ceil().max(1.0) as u64)
            }
        }
    }

    /// Records a failed authentication from `ip`; returns the backoff it now has, in seconds.
    pub fn failed(&mut self, ip: IpAddr, now: Instant) -> Option<u64> {
        if self.failures.len() >= MAX_TRACKED && !self.failures.contains_key(&ip) {
            self.failures
                .retain(|_, f| f.blocked_until.is_some_and(|u| u > now));
            if self.failures.len() >= MAX_TRACKED {
                if let Some(oldest) = self
                    .failures
                    .iter()
                    .min_by_key(|(_, f)| f.last)
                    .map(|(k, _)| *k)
                {
                    self.failures.remove(&oldest);
                }
            }
        }
        let f = self.failures.entry(ip).or_insert(Failures {
            count: 0,
            blocked_until: None,
            last: now,
        });
        f.count = f.count.saturating_add(1);
        f.last = now;
        if f.count <= FREE_FAILURES {
            return None;
        }
        let exp = (f.count - FREE_FAILURES).min(16);
        let backoff = (1u64 << exp).min(MAX_BACKOFF_S);
        f.blocked_until = Some(now + std::time::Duration::from_secs(backoff));
        Some(backoff)
    }

    /// A right token: the address's failures are forgotten.
    pub fn succeeded(&mut self, ip: IpAddr) {
        self.failures.remove(&ip);
    }
}

/// What the admin API and the dashboard show.
#[derive(Debug, Clone, Serialize)]
pub struct SharingStatus {
    pub enabled: bool,
    /// URLs other machines use (one per LAN address).
    pub urls: Vec<String>,
    /// The token, only to the dashboard's own origin (and in-process callers such as the tray).
    pub token: Option<String>,
    /// Whether a token exists (also when it is not shown).
    pub token_set: bool,
    /// Where the token is written (mode 0600), when it has a file.
    pub token_file: Option<String>,
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
    /// Where a generated or rotated token is written for the user.
    token_file: Option<PathBuf>,
}

/// The sharing switch and its state.
pub struct Sharing {
    inner: Mutex<Inner>,
}

/// Writes `token` to `path`, readable by this user only (0600), replacing the file atomically.
pub fn write_token_file(path: &Path, token: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let partial = path.with_extension("partial");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    {
        use std::io::Write;
        let mut f = opts.open(&partial)?;
        // An existing file keeps its old mode through open(); make sure it is 0600.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        }
        writeln!(f, "{token}")?;
        f.sync_all()?;
    }
    std::fs::rename(&partial, path)
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
                token_file: None,
            }),
        }
    }

    /// Keeps the token in `path` (0600) from now on: written now if there is one, and on every
    /// change.
    pub fn with_token_file(self, path: PathBuf) -> Sharing {
        {
            let mut inner = self.lock();
            inner.token_file = Some(path);
            Self::save_token(&inner);
        }
        self
    }

    fn save_token(inner: &Inner) {
        if let (Some(path), Some(token)) = (&inner.token_file, &inner.token) {
            match write_token_file(path, token) {
                Ok(()) => tracing::info!(
                    "the LAN token is in {} (readable by you only)",
                    path.display()
                ),
                Err(e) => {
                    tracing::warn!("could not write the LAN token to {}: {e}", path.display())
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The token, for in-process callers (the tray app).
    pub fn token(&self) -> Option<String> {
        self.lock().token.clone()
    }

    /// The state, with the token (`reveal`) or without it.
    pub fn status_with(&self, reveal: bool) -> SharingStatus {
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
            token: inner.token.clone().filter(|_| reveal),
            token_set: inner.token.is_some(),
            token_file: inner.token_file.as_ref().map(|p| p.display().to_string()),
            rate_per_minute: inner.limiter.per_minute(),
        }
    }

    /// The state with the token (for in-process callers).
    pub fn status(&self) -> SharingStatus {
        self.status_with(true)
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
            Self::save_token(&inner);
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
        let gate = app
            .connections
            .get_or_init(|| crate::listen::ConnGate::new(inner.http.connections.clone()))
            .clone();
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
            let router = crate::router(app.clone(), &inner.http);
            let gate = gate.clone();
            tokio::spawn(async move {
                let stopped = async move {
                    let _ = stop_rx.await;
                };
                let served = crate::listen::serve_connections(
                    listener,
                    router,
                    gate,
                    stopped,
                    std::future::ready(()),
                    std::time::Duration::from_secs(2),
                );
                if let Err(e) = served.await {
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
        {
            let mut inner = self.lock();
            inner.token = Some(generate_token());
            Self::save_token(&inner);
        }
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

    /// The gate for a non-loopback peer: its backoff and rate first (every attempt counts,
    /// failed ones included), then its token.
    fn admit(&self, peer: IpAddr, headers: &HeaderMap) -> Result<(), ApiError> {
        let mut inner = self.lock();
        let Some(token) = inner.token.clone().filter(|_| inner.enabled) else {
            return Err(ApiError::forbidden(
                "LAN sharing is off: this server answers only on this machine.",
            ));
        };
        let now = Instant::now();
        if let Err(retry_after_s) = inner.limiter.check(peer, now) {
            return Err(ApiError::rate_limited(
                format!(
                    "Too many requests from {peer} (the limit is {} per minute, and failed \
                     authentication backs off); retry in {retry_after_s} s.",
                    inner.limiter.per_minute()
                ),
                retry_after_s,
            ));
        }
        if !bearer_matches(headers, &token) {
            let backoff = inner.limiter.failed(peer, now);
            if let Some(s) = backoff {
                tracing::warn!(%peer, backoff_s = s, "repeated wrong LAN tokens: backing off");
            }
            return Err(ApiError::unauthorized(
                "A LAN client must send `Authorization: Bearer <token>` (or `x-api-key: <token>`) with the token shown in Tidepool's dashboard.",
            ));
        }
        inner.limiter.succeeded(peer);
        Ok(())
    }
}

fn url(a: SocketAddr) -> String {
    format!("http://{a}")
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

/// Middleware on every route: loopback peers pass; others must be let in by [`Sharing`]. The
/// local routes refuse LAN peers by their own `route_layer` ([`crate::guard::local_only`]).
pub async fn lan_guard(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    if is_loopback(peer) {
        return next.run(req).await;
    }
    let ip = canonical(peer);
    match app.sharing.admit(ip, req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => {
            tracing::debug!(%peer, path = req.uri().path(), "LAN request refused: {}", e.message);
            crate::error::in_shape_for(req.uri().path(), e)
        }
    }
}

/// GET /admin/sharing: the token only to the dashboard's own origin (a browser's same-origin
/// GET carries no Origin, so the dashboard reads it with POST /admin/sharing/token).
pub async fn get(State(app): State<AppState>, headers: HeaderMap) -> Json<SharingStatus> {
    Json(app.sharing.status_with(app.guard.from_own_origin(&headers)))
}

/// POST /admin/sharing/token: the token, to the dashboard's own origin only.
pub async fn reveal_token(
    State(app): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    if !app.guard.from_own_origin(&headers) {
        return Err(ApiError::forbidden(
            "The LAN token is shown only in Tidepool's dashboard (or read it from the token file).",
        ));
    }
    Ok(Json(serde_json::json!({ "token": app.sharing.token() })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharingUpdate {
    enabled: bool,
    rate_per_minute: Option<u32>,
}

/// The largest accepted `rate_per_minute`.
pub const MAX_RATE_PER_MINUTE: u32 = 1_000_000;

/// PUT /admin/sharing `{"enabled": bool, "rate_per_minute": n}`: applies at once.
pub async fn put(
    State(app): State<AppState>,
    headers: HeaderMap,
    ApiJson(update): ApiJson<SharingUpdate>,
) -> Result<Json<SharingStatus>, ApiError> {
    if let Some(r) = update.rate_per_minute {
        if !(1..=MAX_RATE_PER_MINUTE).contains(&r) {
            return Err(ApiError::invalid_param(
                "rate_per_minute",
                format!("`rate_per_minute` must be between 1 and {MAX_RATE_PER_MINUTE}"),
            ));
        }
        app.sharing.set_rate(r);
    }
    app.sharing.set_enabled(&app, update.enabled)?;
    Ok(Json(
        app.sharing.status_with(app.guard.from_own_origin(&headers)),
    ))
}

/// POST /admin/sharing/rotate: a new token.
pub async fn rotate(State(app): State<AppState>, headers: HeaderMap) -> Json<SharingStatus> {
    app.sharing.rotate();
    Json(app.sharing.status_with(app.guard.from_own_origin(&headers)))
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
    fn rate_limit_per_address() {
        let mut l = RateLimiter::new(60);
        let t0 = Instant::now();
        let a: IpAddr = "10.0.0.2".parse().unwrap();
        let b: IpAddr = "10.0.0.3".parse().unwrap();
        for _ in 0..60 {
            assert!(l.check(a, t0).is_ok());
        }
        assert!(l.check(a, t0).is_err());
        // Another address has its own budget.
        assert!(l.check(b, t0).is_ok());
        let mut slow = RateLimiter::new(2);
        assert!(slow.check(a, t0).is_ok() && slow.check(a, t0).is_ok());
        let wait = slow.check(a, t0).unwrap_err();
        assert!((1..=30).contains(&wait), "{wait}");
    }

    #[test]
    fn failed_authentication_backs_off_and_a_right_token_clears_it() {
        let mut l = RateLimiter::new(1000);
        let t0 = Instant::now();
        let a: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..FREE_FAILURES {
            assert!(l.check(a, t0).is_ok());
            assert_eq!(l.failed(a, t0), None);
        }
        assert_eq!(l.failed(a, t0), Some(2));
        assert_eq!(l.check(a, t0), Err(2));
        assert_eq!(l.check(a, t0 + Duration::from_millis(500)), Err(2));
        let t1 = t0 + Duration::from_secs(2);
        assert!(l.check(a, t1).is_ok());
        assert_eq!(l.failed(a, t1), Some(4));
        for _ in 0..20 {
            l.failed(a, t1);
        }
        assert_eq!(l.check(a, t1), Err(MAX_BACKOFF_S));
        l.succeeded(a);
        assert!(l.check(a, t1).is_ok());
    }

    #[test]
    fn the_token_file_is_private() {
        let dir = std::env::temp_dir().join(format!("tidepool-token-{}", std::process::id()));
        let path = dir.join("lan-token");
        write_token_file(&path, "abc").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap().trim(), "abc");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}
