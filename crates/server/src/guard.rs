//! The one guard in front of every route: who may ask what, decided from the peer address, the
//! `Host` and `Origin` headers and the content type, before any handler runs.
//!
//! - **Peers.** One predicate, [`is_loopback`], says whether a peer is this machine (IPv4-mapped
//!   IPv6 addresses included, so `--host ::` treats `::ffff:127.0.0.1` as loopback everywhere).
//!   Other peers are LAN peers: [`crate::sharing`] authenticates them before anything else.
//! - **Host.** A loopback peer must name a local host with the server's port: `localhost`,
//!   `127.0.0.1` or `[::1]`, plus the names a user adds (`server.allowed_hosts`, for a proxy of
//!   their own). Anything else is a page under a rebound DNS name (`evil.example` resolving to
//!   127.0.0.1), refused with 403.
//! - **Origin.** A request that carries an `Origin` (every browser sends one on a cross-site
//!   request and on every POST) must carry an allowed one: the server's own (the dashboard, and
//!   the tray window, which loads the dashboard from the server) or one the user configures
//!   (`server.allowed_origins` / `TIDEPOOL_ORIGINS`, as `OLLAMA_ORIGINS` does) for the public API.
//!   Requests without an `Origin` are not browsers (curl, the SDKs) and are served, including a
//!   `curl -d` with its form content type.
//! - **Local routes** (admin API, metrics, dashboard) are refused to LAN peers whatever their
//!   token, accept only the server's own origin, and a request that changes state there must be
//!   `application/json`: a cross-site form or `text/plain` POST (which a browser sends without a
//!   preflight) never reaches a handler.
//!
//! The router applies [`guard`] to everything and [`local_only`] as a `route_layer` on the local
//! group, so the set of local routes is the router's own, not a second list.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::Response;

use crate::error::ApiError;
use crate::AppState;

/// Whether `ip` is this machine: IPv4 or IPv6 loopback, also written as an IPv4-mapped IPv6
/// address (`::ffff:127.0.0.1`, what a dual-stack `::` listener reports for IPv4 peers).
pub fn is_loopback(ip: IpAddr) -> bool {
    canonical(ip).is_loopback()
}

/// `ip` with an IPv4-mapped IPv6 address turned into the IPv4 address it maps.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The guard's settings.
#[derive(Debug, Clone, Default)]
pub struct GuardConfig {
    /// Host names beyond `localhost`, `127.0.0.1` and `[::1]` that loopback peers may send
    /// (lower case, without a port).
    pub extra_hosts: Vec<String>,
    /// Origins allowed on the public API (`/v1`, `/api`) besides the server's own: exact
    /// (`https://app.example`) or with a trailing `*` (`chrome-extension://*`).
    pub api_origins: Vec<String>,
}

/// The guard with the port it learns once the server listens.
#[derive(Debug, Default)]
pub struct Guard {
    config: GuardConfig,
    port: OnceLock<u16>,
}

/// Why a request was refused, before it is put in the API's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The `Host` header names something other than this machine (DNS rebinding).
    ForeignHost(String),
    /// The `Origin` is not one this route accepts.
    ForeignOrigin(String),
    /// A state-changing local request that is not `application/json`.
    NotJson,
    /// A LAN peer on a local-only route.
    LocalOnly,
}

impl Refusal {
    fn into_error(self) -> ApiError {
        match self {
            Refusal::ForeignHost(h) => ApiError::forbidden(format!(
                "Host `{}` is not this server: requests from this machine must address it as localhost, 127.0.0.1 or [::1] with its port (add other names with server.allowed_hosts).",
                crate::error::truncate(&h, 100)
            )),
            Refusal::ForeignOrigin(o) => ApiError::forbidden(format!(
                "Origin `{}` may not use this server: a web page can reach it only from an origin listed in server.allowed_origins (or TIDEPOOL_ORIGINS).",
                crate::error::truncate(&o, 100)
            )),
            Refusal::NotJson => ApiError {
                code: Some("unsupported_media_type"),
                ..ApiError::with_status(
                    axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "invalid_request_error",
                    "This admin request changes the server's state and must be sent as `Content-Type: application/json`.",
                )
            },
            Refusal::LocalOnly => ApiError::forbidden(
                "The admin API and the dashboard answer only on this machine (loopback).",
            ),
        }
    }
}

/// Which routes a request is for, as far as the guard is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    /// `/v1`, `/api`, `/health`, and unknown paths.
    Public,
    /// Admin API, metrics and dashboard.
    Local,
}

impl Guard {
    pub fn new(config: GuardConfig) -> Guard {
        Guard {
            config,
            port: OnceLock::new(),
        }
    }

    /// Records the port the server listens on (the first call wins; LAN listeners share it).
    pub fn set_port(&self, port: u16) {
        let _ = self.port.set(port);
    }

    pub fn port(&self) -> Option<u16> {
        self.port.get().copied()
    }

    /// The origins the dashboard is served from: `http://` + each local host name + the port.
    pub fn own_origins(&self) -> Vec<String> {
        let Some(port) = self.port() else {
            return Vec::new();
        };
        ["localhost", "127.0.0.1", "[::1]"]
            .iter()
            .map(|h| h.to_string())
            .chain(self.config.extra_hosts.iter().cloned())
            .map(|h| format!("http://{h}:{port}"))
            .collect()
    }

    fn host_is_local(&self, host: &str) -> bool {
        let Some(port) = self.port() else {
            // Not listening yet (router tests): nothing to compare the port with.
            return true;
        };
        let host = host.trim().to_ascii_lowercase();
        let (name, given_port) = split_host_port(&host);
        let port_ok = match given_port {
            Some(p) => p == port,
            None => port == 80,
        };
        port_ok
            && (matches!(name, "localhost" | "127.0.0.1" | "[::1]")
                || self.config.extra_hosts.iter().any(|h| h == name))
    }

    fn origin_is_own(&self, origin: &str) -> bool {
        let origin = origin.trim_end_matches('/').to_ascii_lowercase();
        self.own_origins().contains(&origin)
    }

    /// Whether `origin` may use the public API: the server's own or a configured one.
    pub fn api_origin_allowed(&self, origin: &str) -> bool {
        if self.origin_is_own(origin) {
            return true;
        }
        let origin = origin.trim_end_matches('/').to_ascii_lowercase();
        self.config.api_origins.iter().any(|allowed| {
            let allowed = allowed.trim_end_matches('/').to_ascii_lowercase();
            match allowed.strip_suffix('*') {
                Some(prefix) => origin.starts_with(prefix),
                None => origin == allowed,
            }
        })
    }

    /// Whether this request carries the dashboard's own origin (what a secret needs).
    pub fn from_own_origin(&self, headers: &HeaderMap) -> bool {
        headers
            .get(header::ORIGIN)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|o| self.origin_is_own(o))
    }

    /// The decision for one request: `Ok` to serve it, else why not. Pure: everything it needs
    /// is in its arguments.
    pub fn check(
        &self,
        peer: IpAddr,
        kind: RouteKind,
        method: &Method,
        headers: &HeaderMap,
        authority: Option<&str>,
    ) -> Result<(), Refusal> {
        let loopback = is_loopback(peer);
        if kind == RouteKind::Local && !loopback {
            return Err(Refusal::LocalOnly);
        }
        if loopback {
            let host = headers
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .or(authority)
                .unwrap_or("");
            if !self.host_is_local(host) {
                return Err(Refusal::ForeignHost(host.to_string()));
            }
        }
        if let Some(origin) = headers.get(header::ORIGIN) {
            let text = origin.to_str().unwrap_or("");
            let ok = match kind {
                RouteKind::Public => self.api_origin_allowed(text),
                RouteKind::Local => self.origin_is_own(text),
            };
            if !ok {
                return Err(Refusal::ForeignOrigin(text.to_string()));
            }
        }
        if kind == RouteKind::Local && changes_state(method) && !is_json(headers) {
            return Err(Refusal::NotJson);
        }
        Ok(())
    }
}

/// `host[:port]` split; IPv6 literals keep their brackets.
fn split_host_port(host: &str) -> (&str, Option<u16>) {
    if let Some(end) = host.find(']') {
        let (name, rest) = host.split_at(end + 1);
        return (name, rest.strip_prefix(':').and_then(|p| p.parse().ok()));
    }
    match host.rsplit_once(':') {
        Some((name, port)) => (name, Some(port.parse().unwrap_or(0))),
        None => (host, None),
    }
}

fn changes_state(m: &Method) -> bool {
    !matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Whether the body is declared JSON (`application/json`, any parameters, or `+json`).
pub fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|t| t.trim().to_ascii_lowercase())
        .is_some_and(|t| t == "application/json" || t.ends_with("+json"))
}

/// The peer's address, for handlers (loopback when the router runs without connection info).
pub struct Peer(pub IpAddr);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Peer(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| canonical(c.0.ip()))
                .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
        ))
    }
}

fn peer_of(req: &Request) -> IpAddr {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        // Without connection info (in-process router tests) the caller is this process.
        .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST))
}

async fn run(app: &AppState, kind: RouteKind, req: Request, next: Next) -> Response {
    let peer = peer_of(&req);
    let authority = req.uri().authority().map(|a| a.as_str().to_string());
    match app.guard.check(
        peer,
        kind,
        req.method(),
        req.headers(),
        authority.as_deref(),
    ) {
        Ok(()) => next.run(req).await,
        Err(why) => {
            tracing::debug!(%peer, path = req.uri().path(), ?why, "request refused by the guard");
            crate::error::in_shape_for(req.uri().path(), why.into_error())
        }
    }
}

/// Middleware on every route: Host and Origin checks for the public API.
pub async fn guard(State(app): State<AppState>, req: Request, next: Next) -> Response {
    run(&app, RouteKind::Public, req, next).await
}

/// `route_layer` of the local routes: loopback only, own origin only, JSON for changes.
pub async fn local_only(State(app): State<AppState>, req: Request, next: Next) -> Response {
    run(&app, RouteKind::Local, req, next).await
}

/// Whether `path` is in the public API's namespaces (`/v1`, `/api`), the only ones a web page of
/// another origin may be allowed to call.
pub fn is_api_path(path: &str) -> bool {
    path.starts_with("/v1/") || path.starts_with("/api/")
}

/// The CORS policy: exactly the allowed origins, on the public API's paths only, with the
/// methods and headers the API uses; nothing cross-origin elsewhere.
pub fn api_cors(guard: Arc<Guard>) -> tower_http::cors::CorsLayer {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    CorsLayer::new()
        .allow_origin(AllowOrigin::predicate(
            move |origin: &HeaderValue, parts: &axum::http::request::Parts| {
                is_api_path(parts.uri.path())
                    && origin.to_str().is_ok_and(|o| guard.api_origin_allowed(o))
            },
        ))
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers([
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            // What the Anthropic SDKs send.
            header::HeaderName::from_static("x-api-key"),
            header::HeaderName::from_static("anthropic-version"),
            header::HeaderName::from_static("anthropic-beta"),
            header::HeaderName::from_static(crate::selection::PRIORITY_HEADER),
            header::HeaderName::from_static(crate::selection::PROFILE_HEADER),
        ])
        .expose_headers(crate::report::HEADER_NAMES.map(header::HeaderName::from_static))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(port: u16) -> Guard {
        let g = Guard::new(GuardConfig {
            extra_hosts: vec!["tidepool.lan".into()],
            api_origins: vec!["https://app.example".into(), "chrome-extension://*".into()],
        });
        g.set_port(port);
        g
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    const LO: &str = "127.0.0.1";

    fn check(
        g: &Guard,
        peer: &str,
        kind: RouteKind,
        m: Method,
        h: &[(&str, &str)],
    ) -> Result<(), Refusal> {
        g.check(peer.parse().unwrap(), kind, &m, &headers(h), None)
    }

    #[test]
    fn loopback_includes_ipv4_mapped_addresses() {
        for ip in ["127.0.0.1", "127.8.9.1", "::1", "::ffff:127.0.0.1"] {
            assert!(is_loopback(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["10.0.0.2", "::ffff:10.0.0.2", "fe80::1", "0.0.0.0"] {
            assert!(!is_loopback(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn loopback_peers_must_name_a_local_host_with_the_port() {
        let g = guard(8433);
        for host in [
            "127.0.0.1:8433",
            "localhost:8433",
            "[::1]:8433",
            "LOCALHOST:8433",
            "tidepool.lan:8433",
        ] {
            assert_eq!(
                check(&g, LO, RouteKind::Public, Method::GET, &[("host", host)]),
                Ok(()),
                "{host}"
            );
        }
        for host in [
            "evil.example:8433",
            "127.0.0.1:9999",
            "localhost",
            "",
            "127.0.0.1.evil.example:8433",
            "[::1]",
        ] {
            assert!(
                matches!(
                    check(&g, LO, RouteKind::Public, Method::GET, &[("host", host)]),
                    Err(Refusal::ForeignHost(_))
                ),
                "{host}"
            );
        }
        // IPv4-mapped loopback peers are held to the same rule.
        assert!(check(
            &g,
            "::ffff:127.0.0.1",
            RouteKind::Local,
            Method::GET,
            &[("host", "evil.example:8433")]
        )
        .is_err());
        // A LAN peer is authenticated by its token, not its Host.
        assert_eq!(
            check(
                &g,
                "10.0.0.2",
                RouteKind::Public,
                Method::GET,
                &[("host", "10.0.0.1:8433")]
            ),
            Ok(())
        );
    }

    #[test]
    fn origins_public_api_and_local_routes() {
        let g = guard(8433);
        let host = ("host", "127.0.0.1:8433");
        // No Origin: curl and the SDKs, whatever the content type.
        assert_eq!(
            check(
                &g,
                LO,
                RouteKind::Public,
                Method::POST,
                &[host, ("content-type", "application/x-www-form-urlencoded")]
            ),
            Ok(())
        );
        for origin in [
            "http://127.0.0.1:8433",
            "http://localhost:8433",
            "https://app.example",
            "chrome-extension://abc",
        ] {
            assert_eq!(
                check(
                    &g,
                    LO,
                    RouteKind::Public,
                    Method::POST,
                    &[host, ("origin", origin)]
                ),
                Ok(()),
                "{origin}"
            );
        }
        for origin in [
            "http://evil.example",
            "null",
            "http://127.0.0.1:9999",
            "https://app.example.evil",
        ] {
            assert!(
                matches!(
                    check(
                        &g,
                        LO,
                        RouteKind::Public,
                        Method::POST,
                        &[host, ("origin", origin), ("content-type", "text/plain")]
                    ),
                    Err(Refusal::ForeignOrigin(_))
                ),
                "{origin}"
            );
        }
        // Local routes take only the server's own origin, and JSON for changes.
        let json = ("content-type", "application/json");
        assert_eq!(
            check(
                &g,
                LO,
                RouteKind::Local,
                Method::PUT,
                &[host, json, ("origin", "http://127.0.0.1:8433")]
            ),
            Ok(())
        );
        assert!(check(
            &g,
            LO,
            RouteKind::Local,
            Method::PUT,
            &[host, json, ("origin", "https://app.example")]
        )
        .is_err());
        assert_eq!(
            check(
                &g,
                LO,
                RouteKind::Local,
                Method::POST,
                &[host, ("content-type", "text/plain")]
            ),
            Err(Refusal::NotJson)
        );
        assert_eq!(
            check(&g, LO, RouteKind::Local, Method::POST, &[host]),
            Err(Refusal::NotJson)
        );
        assert_eq!(
            check(
                &g,
                LO,
                RouteKind::Local,
                Method::POST,
                &[host, ("content-type", "application/json; charset=utf-8")]
            ),
            Ok(())
        );
        assert_eq!(
            check(&g, LO, RouteKind::Local, Method::GET, &[host]),
            Ok(())
        );
        assert_eq!(
            check(&g, "192.168.1.9", RouteKind::Local, Method::GET, &[host]),
            Err(Refusal::LocalOnly)
        );
    }

    #[test]
    fn host_ports_split() {
        assert_eq!(split_host_port("[::1]:80"), ("[::1]", Some(80)));
        assert_eq!(split_host_port("[::1]"), ("[::1]", None));
        assert_eq!(split_host_port("a:b"), ("a", Some(0)));
        assert_eq!(split_host_port("localhost"), ("localhost", None));
    }
}
