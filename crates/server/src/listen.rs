//! Accepting connections, with the limits that hold before any request is read: a cap on open
//! connections (loopback and LAN counted apart, and per LAN address, so a LAN peer can never
//! starve this machine's clients), a header timeout (a connection that trickles its headers, or
//! idles between requests, is closed), and a write timeout (a client that stops reading is cut
//! off). On shutdown new requests get 503 while running ones finish within the drain deadline;
//! then the listener closes and whatever is still open is really closed.
//!
//! hyper serves each connection (HTTP/1.1 and HTTP/2); axum's own `serve` has none of these
//! limits, so the accept loop is here.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tower::ServiceExt;

use crate::guard::{canonical, is_loopback};

/// Connection limits and timeouts.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    /// A request's headers must arrive within this long (and an idle connection closes after it).
    pub header_timeout: Duration,
    /// A write to the client may wait this long for it to read; then the connection closes.
    pub write_timeout: Duration,
    /// Open connections from this machine.
    pub max_local: usize,
    /// Open connections from the LAN, all addresses together.
    pub max_lan: usize,
    /// Open connections from one LAN address.
    pub max_per_lan_address: usize,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            header_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
            max_local: 512,
            max_lan: 256,
            max_per_lan_address: 32,
        }
    }
}

/// The connection counts, shared by every listener of one server.
pub struct ConnGate {
    /// Connections closed because the client stopped reading for the write timeout.
    write_timeouts: std::sync::atomic::AtomicU64,
    limits: ConnLimits,
    local: Arc<Semaphore>,
    lan: Arc<Semaphore>,
    per_address: Mutex<HashMap<IpAddr, usize>>,
}

/// One admitted connection; dropping it frees its place.
pub struct ConnPermit {
    _permit: OwnedSemaphorePermit,
    lan: Option<(Arc<ConnGate>, IpAddr)>,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        if let Some((gate, ip)) = self.lan.take() {
            let mut map = gate.per_address.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = map.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&ip);
                }
            }
        }
    }
}

impl ConnGate {
    pub fn new(limits: ConnLimits) -> Arc<ConnGate> {
        Arc::new(ConnGate {
            write_timeouts: Default::default(),
            local: Arc::new(Semaphore::new(limits.max_local.max(1))),
            lan: Arc::new(Semaphore::new(limits.max_lan.max(1))),
            per_address: Mutex::new(HashMap::new()),
            limits,
        })
    }

    pub fn limits(&self) -> &ConnLimits {
        &self.limits
    }

    /// Connections cut off because their client stopped reading, since start.
    pub fn write_timeouts(&self) -> u64 {
        self.write_timeouts
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A place for a connection from `peer`, or `None` when its limit is reached.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<ConnPermit> {
        if is_loopback(peer) {
            let permit = self.local.clone().try_acquire_owned().ok()?;
            return Some(ConnPermit {
                _permit: permit,
                lan: None,
            });
        }
        let ip = canonical(peer);
        let permit = self.lan.clone().try_acquire_owned().ok()?;
        let mut map = self.per_address.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= self.limits.max_per_lan_address {
            return None;
        }
        *n += 1;
        Some(ConnPermit {
            _permit: permit,
            lan: Some((self.clone(), ip)),
        })
    }
}

/// Serves `router` on `listener` until `stop` resolves; then runs `drain` (which refuses new
/// requests and waits for running ones, up to its own deadline) while still accepting, so a new
/// client gets a clear 503 rather than a refused connection; then stops accepting, asks open
/// connections to close after their current response, and after `close_grace` closes the rest.
pub async fn serve_connections(
    listener: TcpListener,
    router: Router,
    gate: Arc<ConnGate>,
    stop: impl Future<Output = ()>,
    drain: impl Future<Output = ()>,
    close_grace: Duration,
) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(gate.limits.header_timeout)
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .max_concurrent_streams(64);
    let builder = Arc::new(builder);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut connections = JoinSet::new();
    tokio::pin!(stop);
    tokio::pin!(drain);
    let mut stopping = false;
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut stop, if !stopping => {
                stopping = true;
                continue;
            }
            _ = &mut drain, if stopping => break,
            // Reap finished connection tasks as they end, so the set stays small.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait a moment instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(permit) = gate.admit(peer.ip()) else {
            tracing::debug!(%peer, "connection refused: too many open connections");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let mut io = tokio_io_timeout::TimeoutStream::new(stream);
        io.set_write_timeout(Some(gate.limits.write_timeout));
        let io = TokioIo::new(Box::pin(io));
        let router = router.clone();
        let service =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                let router = router.clone();
                async move {
                    Ok::<_, Infallible>(router.oneshot(req).await.unwrap_or_else(|e| match e {}))
                }
            });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let counts = gate.clone();
        connections.spawn(async move {
            let _permit = permit;
            let conn = builder.serve_connection_with_upgrades(io, service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                if timed_out(e.as_ref()) {
                    counts
                        .write_timeouts
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(%peer, "a client stopped reading: connection closed");
                } else {
                    tracing::debug!(%peer, "connection ended: {e}");
                }
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(close_grace) => {
            tracing::warn!(
                open = connections.len(),
                "closing connections still open after the drain deadline"
            );
        }
    }
    connections.shutdown().await;
    Ok(())
}

/// Whether an error (or one of its causes) is an I/O timeout: the write timeout fired.
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Raises this process's open-file limit to its hard limit (a server needs one descriptor per
/// connection; many systems start processes at 1024).
pub fn raise_fd_limit() {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit only read and write the struct they are given.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
                lim.rlim_cur = lim.rlim_max;
                let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lan_connections_are_capped_per_address_and_never_take_loopback_places() {
        let gate = ConnGate::new(ConnLimits {
            max_local: 2,
            max_lan: 3,
            max_per_lan_address: 2,
            ..ConnLimits::default()
        });
        let a: IpAddr = "10.0.0.2".parse().unwrap();
        let b: IpAddr = "::ffff:10.0.0.3".parse().unwrap();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let a1 = gate.admit(a).unwrap();
        let _a2 = gate.admit(a).unwrap();
        assert!(gate.admit(a).is_none(), "per-address cap");
        let _b1 = gate.admit(b).unwrap();
        assert!(gate.admit("10.0.0.4".parse().unwrap()).is_none(), "LAN cap");
        // The LAN is full; this machine still gets in.
        let _l1 = gate.admit(lo).unwrap();
        let _l2 = gate.admit("::1".parse().unwrap()).unwrap();
        assert!(gate.admit(lo).is_none(), "loopback cap");
        drop(a1);
        assert!(
            gate.admit(a).is_some(),
            "a closed connection frees its place"
        );
    }
}
