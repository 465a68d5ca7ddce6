//! `tidepool serve`: the command line on top of the configuration file, then the application's
//! [`tidepool::launch`], until SIGINT/SIGTERM (then drain) or until the model fails to load.

use std::path::PathBuf;

use clap::Args;
use tidepool::config::{Config, DeviceSetting};
use tidepool_engine::choice::EngineSetting;

#[derive(Args, Clone)]
pub struct ServeArgs {
    /// Catalog id, variant id, or path to a .gguf file (default: the catalog default).
    #[arg(long)]
    model: Option<String>,
    /// Address to bind (loopback by default).
    #[arg(long)]
    host: Option<String>,
    /// Port to bind (default 8433; 0 picks a free one).
    #[arg(long)]
    port: Option<u16>,
    /// TOML configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Run on the CPU even if a GPU is available.
    #[arg(long)]
    cpu: bool,
    /// Also serve other machines on the LAN (a bearer token is required from them; one is
    /// generated unless server.lan_token or TIDEPOOL_LAN_TOKEN sets it).
    #[arg(long)]
    share_lan: bool,
    /// Power mode: performance, balanced, power-saver or auto (follows AC and battery).
    #[arg(long)]
    power_mode: Option<tidepool_control::power::PowerMode>,
    /// Concurrent sequences per worker [default: 2 on CPU, 8 on a GPU].
    #[arg(long)]
    slots: Option<usize>,
    /// Inference engine: auto (mistral.rs on a GPU, the faster one measured on the CPU),
    /// mistralrs or llamacpp [default: model.engine in the config, else auto].
    #[arg(long)]
    engine: Option<EngineSetting>,
}

/// `tidepool serve`: runs until SIGINT/SIGTERM (then drains) or until the model fails to load.
pub async fn run(a: ServeArgs) -> anyhow::Result<()> {
    let cfg = config_from_args(&a)?;
    let mut running = tidepool::launch(cfg, tidepool::Launch::default()).await?;
    // The loader drops its sender once the model is ready, so `recv` yields `None` then: only an
    // error it sent ends the server early.
    let fatal = tokio::select! {
        _ = tidepool_server::shutdown_signal() => None,
        Some(e) = running.fatal.recv() => Some(e),
    };
    running.stop().await?;
    match fatal {
        Some(e) => Err(e),
        None => {
            tracing::info!("stopped");
            Ok(())
        }
    }
}

/// The configuration `serve` runs with: the file, then the command line on top.
pub fn config_from_args(a: &ServeArgs) -> anyhow::Result<Config> {
    let mut cfg = match &a.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if let Some(m) = &a.model {
        cfg.model.id = Some(m.clone());
    }
    if let Some(h) = &a.host {
        cfg.server.host = h.clone();
    }
    if let Some(p) = a.port {
        cfg.server.port = p;
    }
    if a.cpu {
        cfg.model.device = DeviceSetting::Cpu;
    }
    if let Some(s) = a.slots {
        cfg.model.slots = Some(s);
    }
    if let Some(e) = a.engine {
        cfg.model.engine = e;
    }
    if let Some(m) = a.power_mode {
        cfg.power.mode = m;
    }
    if a.share_lan {
        cfg.server.share_lan = true;
    }
    if let Ok(t) = std::env::var("TIDEPOOL_LAN_TOKEN") {
        cfg.server.lan_token = Some(t);
    }
    cfg.validate("command line")?;
    Ok(cfg)
}
