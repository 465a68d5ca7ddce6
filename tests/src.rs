//! Helpers for Tidepool's cross-crate tests: fixture models made once per test binary, and the
//! real server started in-process on an ephemeral port.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use tidepool_core::answer_cache::CacheConfig;
use tidepool_core::autoscale::Autoscaler;
use tidepool_core::engine::choice::EngineKind;
use tidepool_core::engine::mistral::{MistralEngine, MistralWorkers};
use tidepool_core::engine::{DevicePreference, Engine, EngineConfig};
use tidepool_core::fixture::{write_fixture, FixtureOptions, FixtureShape};
use tidepool_core::gateway::GatewayConfig;
use tidepool_core::ledger::Reservation;
use tidepool_core::model_source::{local_file, LocalModel};
use tidepool_core::policy::PolicyConfig;
use tidepool_core::pool::{Pool, WorkerFactory};
use tidepool_core::power::PowerConfig;
use tidepool_core::quant_plan::QuantScheme;
use tidepool_core::service::{ModelState, Service};
use tidepool_core::signals::fake::FakeMachine;
use tidepool_server::{AppState, HttpConfig};

/// Where test fixtures live (reused across runs; they are deterministic).
pub fn fixture_dir() -> PathBuf {
    let dir = std::env::temp_dir().join("tidepool-test-fixtures");
    std::fs::create_dir_all(&dir).expect("fixture dir");
    dir
}

/// The tiny Qwen2-architecture fixture (Q8_0), generated once.
pub fn tiny_fixture() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| named_fixture("tiny")).clone()
}

/// A fixture of a named [`FixtureShape`] (Q8_0), written once per machine: fixtures are
/// deterministic, so a file already there is reused.
pub fn named_fixture(size: &str) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap();
    let path = fixture_dir().join(format!("{size}-q8_0.gguf"));
    if !path.is_file() {
        // Written under another name first, so a test killed mid-write leaves no torn file.
        let partial = path.with_extension("partial");
        write_fixture(
            &FixtureOptions {
                shape: FixtureShape::named(size).unwrap(),
                quant: QuantScheme::Q8_0,
                seed: 1,
            },
            &partial,
            &|_, _| {},
        )
        .unwrap_or_else(|e| panic!("write the {size} fixture: {e}"));
        std::fs::rename(&partial, &path).expect("move the fixture into place");
    }
    path
}

/// The engine the integration tests run on: `TIDEPOOL_TEST_ENGINE` = `mistralrs` (the default)
/// or `llamacpp` (`scripts/test.sh` runs the tests once with each).
pub fn test_engine() -> EngineKind {
    match std::env::var("TIDEPOOL_TEST_ENGINE").as_deref() {
        Err(_) | Ok("") | Ok("mistralrs") => EngineKind::MistralRs,
        Ok("llamacpp") => {
            assert!(
                EngineKind::LlamaCpp.built(),
                "TIDEPOOL_TEST_ENGINE=llamacpp, but the tests were built without the llamacpp feature"
            );
            EngineKind::LlamaCpp
        }
        Ok(other) => panic!("TIDEPOOL_TEST_ENGINE={other}: expected mistralrs or llamacpp"),
    }
}

/// Tokens of context per slot the llama.cpp engine gets in tests (the pool's default).
pub const TEST_CONTEXT_TOKENS: u32 = 4096;

/// CPU threads per llama.cpp engine in tests: one. A test binary runs many servers at once, and
/// llama.cpp's threads wait for each other at every operation: more threads than free cores make
/// a tiny model hundreds of times slower (mistral.rs shares one thread pool across engines).
pub const TEST_THREADS: usize = 1;

/// One engine of the test engine kind.
pub async fn load_engine(local: &LocalModel, config: &EngineConfig) -> Arc<dyn Engine> {
    match test_engine() {
        EngineKind::MistralRs => Arc::new(
            MistralEngine::load(local, config)
                .await
                .expect("engine loads"),
        ),
        #[cfg(feature = "llamacpp")]
        EngineKind::LlamaCpp => Arc::new(
            tidepool_core::engine::llamacpp::LlamaCppEngine::load(
                local,
                config,
                TEST_CONTEXT_TOKENS,
                Some(TEST_THREADS),
            )
            .await
            .expect("engine loads"),
        ),
        #[cfg(not(feature = "llamacpp"))]
        EngineKind::LlamaCpp => unreachable!("test_engine() refuses llamacpp in this build"),
    }
}

/// Pool workers of the test engine kind.
pub fn worker_factory(
    model: LocalModel,
    config: EngineConfig,
    reservation: Reservation,
) -> Arc<dyn WorkerFactory> {
    match test_engine() {
        EngineKind::MistralRs => Arc::new(MistralWorkers {
            model,
            config,
            reservation,
        }),
        #[cfg(feature = "llamacpp")]
        EngineKind::LlamaCpp => Arc::new(tidepool_core::engine::llamacpp::LlamaCppWorkers {
            model,
            config,
            context_tokens: TEST_CONTEXT_TOKENS,
            threads: Some(TEST_THREADS),
            reservation,
        }),
        #[cfg(not(feature = "llamacpp"))]
        EngineKind::LlamaCpp => unreachable!("test_engine() refuses llamacpp in this build"),
    }
}

/// A server running in its own thread and runtime for the rest of the test binary.
pub struct TestServer {
    pub addr: SocketAddr,
    pub service: Arc<Service>,
    /// The machine the control loop reads (a fake: set the battery and temperature).
    pub machine: FakeMachine,
    stop: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    done: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

impl TestServer {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Triggers graceful shutdown (as SIGTERM would).
    pub fn begin_stop(&self) {
        if let Some(tx) = self.stop.lock().unwrap().take() {
            let _ = tx.send(());
        }
    }

    /// Stops the server gracefully and asserts it stopped within `timeout_s` seconds.
    pub fn stop(&self, timeout_s: u64) {
        self.begin_stop();
        assert!(
            self.wait_stopped(std::time::Duration::from_secs(timeout_s)),
            "the server did not stop within {timeout_s} s"
        );
    }

    /// Waits until the server has stopped.
    pub fn wait_stopped(&self, timeout: std::time::Duration) -> bool {
        match self.done.lock().unwrap().take() {
            Some(rx) => rx.recv_timeout(timeout).is_ok(),
            None => true,
        }
    }
}

/// Options for [`start_server`].
#[derive(Clone)]
pub struct ServerOptions {
    pub model: Option<PathBuf>,
    pub slots: usize,
    pub http: HttpConfig,
    /// Serve through a worker pool of one worker, with this queue capacity and deadline,
    /// instead of straight from one engine.
    pub pool: Option<(usize, std::time::Duration)>,
    /// With `pool`: run the control loop with this policy, ticking every 200 ms.
    pub policy: Option<PolicyConfig>,
    /// With `pool`: the power config; the machine is always a [`FakeMachine`] (plugged in,
    /// 50 °C) that the test can drive through [`TestServer::machine`].
    pub power: PowerConfig,
    /// The request gateway (answer cache, ...). The default turns the answer cache off, so that
    /// tests of the engine see the engine; cache tests turn it on.
    pub gateway: GatewayConfig,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            model: None,
            slots: 4,
            http: HttpConfig::default(),
            pool: None,
            policy: None,
            power: PowerConfig::for_cores(4),
            gateway: GatewayConfig {
                cache: CacheConfig {
                    enabled: false,
                    ..CacheConfig::default()
                },
                ..GatewayConfig::default()
            },
        }
    }
}

/// Starts a server on 127.0.0.1:0. With `model: None` the model never loads (for 503 tests).
pub fn start_server(opts: ServerOptions) -> TestServer {
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let machine = FakeMachine::new();
    let sources = machine.machine();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let name = opts
                .model
                .as_deref()
                .map(model_name)
                .unwrap_or_else(|| "never-loads".into());
            let service = Service::new(name, Vec::new());
            let state = AppState::with_gateway(service.clone(), opts.gateway.clone());
            if let Some(path) = &opts.model {
                let local = local_file(path).expect("fixture exists");
                let config = EngineConfig {
                    device: DevicePreference::Cpu,
                    max_sequences: opts.slots,
                    prefix_cache_entries: 16,
                };
                match opts.pool {
                    None => {
                        let engine = load_engine(&local, &config).await;
                        service.set_state(ModelState::Ready(engine));
                    }
                    Some((queue, deadline)) => {
                        let factory = worker_factory(
                            local,
                            config,
                            Reservation {
                                weights: 1,
                                kv_cache: 0,
                                overhead: 0,
                            },
                        );
                        // The budget holds two workers; the control loop is not ticking, so
                        // the pool changes size only through /admin/scale.
                        let pool = Pool::new(factory, 2, queue);
                        let first = pool.add_worker("test").expect("fits");
                        pool.wait_ready(first).await.expect("the worker loads");
                        service.set_queue_deadline(deadline);
                        service.set_state(ModelState::Pooled(pool.clone()));
                        let ticking = opts.policy.is_some();
                        let policy = opts.policy.clone().unwrap_or(PolicyConfig {
                            max_workers: 2,
                            ..PolicyConfig::default()
                        });
                        let scaler = Autoscaler::new(
                            pool,
                            service.clone(),
                            policy,
                            opts.power.clone(),
                            sources,
                        );
                        if ticking {
                            scaler.spawn(std::time::Duration::from_millis(200));
                        }
                        let _ = state.autoscaler.set(scaler);
                    }
                }
            }
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addr_tx
                .send((listener.local_addr().unwrap(), service.clone()))
                .unwrap();
            tidepool_server::serve(listener, state, opts.http, async move {
                let _ = stop_rx.await;
            })
            .await
            .unwrap();
            let _ = done_tx.send(());
        });
    });
    let (addr, service) = addr_rx.recv().expect("server thread started");
    TestServer {
        addr,
        service,
        machine,
        stop: Mutex::new(Some(stop_tx)),
        done: Mutex::new(Some(done_rx)),
    }
}

fn model_name(p: &Path) -> String {
    p.file_stem().unwrap().to_string_lossy().into_owned()
}

/// The shared server on the tiny fixture, for tests that do not stop it.
pub fn shared_tiny_server() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        start_server(ServerOptions {
            model: Some(tiny_fixture()),
            ..Default::default()
        })
    })
}

/// GET `url`: the status and the JSON body (`Null` when the body is not JSON).
pub async fn get_json(url: String) -> (u16, serde_json::Value) {
    let r = reqwest::get(url).await.expect("the server answers");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

/// POST `body` as JSON to `url`: the status and the JSON body (`Null` when it is not JSON).
pub async fn post_json(url: String, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .post(url)
        .json(body)
        .send()
        .await
        .expect("the server answers");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}
