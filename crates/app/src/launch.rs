//! [`launch`]: bind, print the URL, load the model in the background (the API answers 503 with
//! the reason until it is ready), start the control loop, and serve until told to stop, then
//! drain. The composition root: the one place the crates are wired together.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tidepool_control::autoscale::Autoscaler;
use tidepool_control::signals::Machine;
use tidepool_gateway::service::Service;
use tidepool_models::catalog::Catalog;
use tidepool_models::model_source::{ModelSpec, ModelStore};
use tidepool_server::sharing::Sharing;
use tidepool_server::{AppState, HttpConfig};

use crate::config::Config;
use crate::serving::{load_model, served_names, Switcher};

/// How to launch, beyond the configuration: what tests change.
pub struct Launch {
    /// The machine the control loop reads (battery, heat, memory); the real one by default.
    pub machine: Machine,
    /// How often the control loop ticks.
    pub control_tick: Duration,
    /// Load the configured model (`false`: serve the API and the dashboard with no model, which
    /// answer 503 "loading" until one is switched in from the dashboard).
    pub load_model: bool,
}

impl Default for Launch {
    fn default() -> Self {
        Launch {
            machine: Machine::real(),
            control_tick: Duration::from_secs(1),
            load_model: true,
        }
    }
}

/// A server started by [`launch`].
pub struct Running {
    /// Where it listens (`http://127.0.0.1:8433`).
    pub url: String,
    /// Its shared state: the service, the autoscaler once the model is loaded, LAN sharing.
    pub state: AppState,
    /// The configuration it runs with (the LAN token filled in if one was generated).
    pub config: Config,
    /// An error from loading the model, if it fails.
    pub fatal: tokio::sync::mpsc::Receiver<anyhow::Error>,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    /// Graceful stop: refuse new requests, let running ones finish, close.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.server.await??;
        Ok(())
    }

    /// The service (the served model, its scheduler and pool).
    pub fn service(&self) -> &Arc<Service> {
        &self.state.service
    }
}

/// Binds the listener, starts serving at once (503 while loading) and loads the model in the
/// background; returns as soon as the server listens. What `tidepool serve`, the tray app and
/// the integration tests all call.
pub async fn launch(mut cfg: Config, opts: Launch) -> anyhow::Result<Running> {
    let explicit_model = cfg.model.id.is_some();
    let spec_text = cfg
        .model
        .id
        .clone()
        .unwrap_or_else(|| Catalog::builtin().default.clone());
    let spec = ModelSpec::parse(&spec_text);
    let (name, aliases) = served_names(&spec);
    let service = Service::new(name, aliases);

    let addr: SocketAddr = format!("{}:{}", cfg.server.host, cfg.server.port)
        .parse()
        .or_else(|_| {
            use std::net::ToSocketAddrs;
            (cfg.server.host.as_str(), cfg.server.port)
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or(())
        })
        .map_err(|_| anyhow::anyhow!("invalid --host `{}`", cfg.server.host))?;
    if !addr.ip().is_loopback() && cfg.server.lan_token.is_none() && !cfg.server.share_lan {
        anyhow::bail!(
            "refusing to listen on {addr} without a LAN token: other machines could use this \
             server. Set server.lan_token (or TIDEPOOL_LAN_TOKEN), or use --share-lan, which \
             generates one; to stay on this machine, use the default host 127.0.0.1"
        );
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    println!("Tidepool listening on http://{local}  (OpenAI API at http://{local}/v1)");

    let sharing_on = cfg.server.share_lan || !local.ip().is_loopback();
    let token_file = ModelStore::from_env().home.join("lan-token");
    let generated = sharing_on && cfg.server.lan_token.is_none();
    if generated {
        cfg.server.lan_token = Some(tidepool_server::sharing::generate_token());
    }
    let mut sharing = Sharing::new(
        sharing_on,
        cfg.server.lan_token.clone(),
        cfg.server.lan_rate_per_minute,
    );
    if generated || cfg.server.lan_token.is_none() {
        // A token Tidepool makes is kept where only this user can read it (never on stdout,
        // which often ends up in a world-readable log); the dashboard shows it too.
        sharing = sharing.with_token_file(token_file.clone());
    }
    if sharing_on {
        println!(
            "LAN sharing is on; LAN clients need the bearer token ({}).",
            if generated {
                format!("in {}, and in the dashboard", token_file.display())
            } else {
                "the one configured".to_string()
            }
        );
    }
    let mut state =
        AppState::with_gateway(service.clone(), cfg.gateway()).with_guard(guard_config(&cfg));
    state.switcher = Some(Arc::new(Switcher { cfg: cfg.clone() }));
    state.sharing = Arc::new(sharing);
    service.set_write_timeout(Duration::from_secs(cfg.server.write_timeout_s));
    let (fatal_tx, fatal_rx) = tokio::sync::mpsc::channel::<anyhow::Error>(1);
    if opts.load_model {
        let service = service.clone();
        let cfg = cfg.clone();
        let autoscaler = state.autoscaler.clone();
        tokio::spawn(async move {
            match load_model(&service, spec, explicit_model, &cfg).await {
                Ok(()) => {
                    let scaler = Autoscaler::new(
                        service.scheduler().clone(),
                        cfg.policy.clone(),
                        cfg.power.clone(),
                        opts.machine,
                    );
                    scaler.spawn(opts.control_tick);
                    let _ = autoscaler.set(scaler);
                }
                Err(e) => {
                    service.set_failed(format!("{e:#}"));
                    let _ = fatal_tx.send(e).await;
                }
            }
        });
    }

    let http = http_config(&cfg);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running_state = state.clone();
    let server = tokio::spawn(tidepool_server::serve(listener, state, http, async move {
        let _ = stop_rx.await;
    }));
    Ok(Running {
        url: format!("http://{local}"),
        state: running_state,
        config: cfg,
        fatal: fatal_rx,
        stop: stop_tx,
        server,
    })
}

/// The HTTP settings of `cfg`: body limit, drain deadline, connection limits and timeouts.
pub fn http_config(cfg: &Config) -> HttpConfig {
    let s = &cfg.server;
    HttpConfig {
        body_limit: s.body_limit_mib * 1024 * 1024,
        drain_timeout: Duration::from_secs(s.drain_timeout_s),
        connections: tidepool_server::listen::ConnLimits {
            header_timeout: Duration::from_secs(s.header_timeout_s),
            write_timeout: Duration::from_secs(s.write_timeout_s),
            max_local: s.max_connections,
            max_lan: s.max_lan_connections,
            max_per_lan_address: s.max_connections_per_lan_address,
        },
    }
}

/// The guard's settings: the configured host names and origins, plus `TIDEPOOL_ORIGINS`
/// (comma-separated, as `OLLAMA_ORIGINS`).
pub fn guard_config(cfg: &Config) -> tidepool_server::guard::GuardConfig {
    let mut origins = cfg.server.allowed_origins.clone();
    if let Ok(extra) = std::env::var("TIDEPOOL_ORIGINS") {
        origins.extend(
            extra
                .split(',')
                .map(str::trim)
                .filter(|o| !o.is_empty())
                .map(str::to_string),
        );
    }
    tidepool_server::guard::GuardConfig {
        extra_hosts: cfg
            .server
            .allowed_hosts
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect(),
        api_origins: origins,
    }
}
