//! Helpers for Tidepool's cross-crate tests: fixture models made once per test binary, and the
//! real server started in-process on an ephemeral port by the application's own
//! [`tidepool::launch`], as the binary and the tray app start it: the real pool, scheduler and
//! control loop on a real engine (the test engine, see [`test_engine`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tidepool::config::{Config, DeviceSetting};
use tidepool::Launch;
use tidepool_control::policy::{DownRules, PolicyConfig, UpRules};
use tidepool_control::power::PowerConfig;
use tidepool_control::signals::fake::FakeMachine;
use tidepool_engine::choice::{EngineKind, EngineSetting};
use tidepool_engine::{EngineConfig, EngineSpec};
use tidepool_gateway::answer_cache::CacheConfig;
use tidepool_gateway::gateway::GatewayConfig;
use tidepool_gateway::service::Service;
use tidepool_models::fixture::{write_fixture, FixtureOptions, FixtureShape};
use tidepool_models::model_source::LocalModel;
use tidepool_models::quant_plan::QuantScheme;
use tidepool_sched::ledger::Reservation;
use tidepool_sched::pool::{WorkerFactory, Workers};

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

/// The test engine's spec for `model` with `config`.
pub fn engine_spec(model: LocalModel, config: EngineConfig) -> EngineSpec {
    EngineSpec {
        kind: test_engine(),
        model,
        config,
        context_tokens: TEST_CONTEXT_TOKENS,
        threads: Some(TEST_THREADS),
    }
}

/// Pool workers of the test engine kind.
pub fn worker_factory(
    model: LocalModel,
    config: EngineConfig,
    reservation: Reservation,
) -> Arc<dyn WorkerFactory> {
    Arc::new(Workers {
        spec: engine_spec(model, config),
        reservation,
    })
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

/// Options for [`start_server`]: what the tests vary, mapped onto the configuration file the
/// server launches with.
#[derive(Clone)]
pub struct ServerOptions {
    /// The model; `None` starts the server without one (it answers 503 "loading").
    pub model: Option<PathBuf>,
    pub slots: usize,
    /// (queue capacity, queue deadline) of the pool.
    pub pool: Option<(usize, Duration)>,
    /// The policy; by default one worker, held (scale-up and -down windows of an hour), so the
    /// pool changes size only through `/admin/scale`.
    pub policy: Option<PolicyConfig>,
    /// The power config; the machine is always a [`FakeMachine`] (plugged in, 50 °C) that the
    /// test can drive through [`TestServer::machine`].
    pub power: PowerConfig,
    /// The request gateway (answer cache, ...). The default turns the answer cache off, so that
    /// tests of the engine see the engine; cache tests turn it on.
    pub gateway: GatewayConfig,
    /// Seconds shutdown waits for running requests.
    pub drain_timeout_s: u64,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            model: None,
            slots: 4,
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
            drain_timeout_s: 60,
        }
    }
}

/// The policy of a test server that names none: one worker, held.
pub fn held_policy() -> PolicyConfig {
    PolicyConfig {
        min_workers: 1,
        max_workers: 2,
        up: UpRules {
            window_s: 3600.0,
            ..UpRules::default()
        },
        down: DownRules {
            stabilization_s: 3600.0,
        },
        ..PolicyConfig::default()
    }
}

/// The configuration a test server launches with.
pub fn test_config(opts: &ServerOptions) -> Config {
    let mut cfg = Config::default();
    cfg.server.port = 0;
    cfg.server.drain_timeout_s = opts.drain_timeout_s;
    cfg.model.id = opts.model.as_ref().map(|p| p.display().to_string());
    cfg.model.device = DeviceSetting::Cpu;
    cfg.model.slots = Some(opts.slots);
    cfg.model.threads = Some(TEST_THREADS);
    cfg.model.engine = match test_engine() {
        EngineKind::MistralRs => EngineSetting::MistralRs,
        EngineKind::LlamaCpp => EngineSetting::LlamaCpp,
    };
    cfg.pool.context_tokens = u64::from(TEST_CONTEXT_TOKENS);
    if let Some((capacity, deadline)) = opts.pool {
        cfg.pool.queue_capacity = capacity;
        cfg.pool.queue_deadline_s = deadline.as_secs_f64();
    }
    cfg.policy = opts.policy.clone().unwrap_or_else(held_policy);
    cfg.power = opts.power.clone();
    let g = &opts.gateway;
    cfg.cache = g.cache.clone();
    cfg.context = g.context.clone();
    cfg.degraded = g.degraded.clone();
    cfg.profiles = g.profiles.clone();
    cfg.server.max_messages = g.max_messages;
    cfg
}

/// Starts a server on 127.0.0.1:0 with [`tidepool::launch`], in a thread and runtime of its own
/// (the control loop ticks every 200 ms), and waits until its model is ready.
pub fn start_server(opts: ServerOptions) -> TestServer {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let machine = FakeMachine::new();
    let sources = machine.machine();
    let cfg = test_config(&opts);
    let with_model = opts.model.is_some();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let launch = Launch {
                machine: sources,
                control_tick: Duration::from_millis(200),
                load_model: with_model,
            };
            let running = tidepool::launch(cfg, launch)
                .await
                .expect("the server starts");
            let service = running.service().clone();
            if with_model {
                tokio::time::timeout(Duration::from_secs(120), service.wait_ready())
                    .await
                    .expect("the model loads within 2 minutes")
                    .expect("the model loads");
            }
            let addr: SocketAddr = running.url.trim_start_matches("http://").parse().unwrap();
            ready_tx.send((addr, service)).unwrap();
            let _ = stop_rx.await;
            running.stop().await.unwrap();
            let _ = done_tx.send(());
        });
    });
    let (addr, service) = ready_rx.recv().expect("server thread started");
    TestServer {
        addr,
        service,
        machine,
        stop: Mutex::new(Some(stop_tx)),
        done: Mutex::new(Some(done_rx)),
    }
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

/// Checks `value` against the subset of JSON Schema the tests' tool and output schemas use
/// (`type` object/string/integer/number/boolean/array, `properties`, `required`,
/// `additionalProperties: false`, `enum`, `minimum`/`maximum`, `items`); says what is wrong.
pub fn check_schema(schema: &serde_json::Value, value: &serde_json::Value) -> Result<(), String> {
    use serde_json::Value;
    if let Some(options) = schema.get("enum").and_then(Value::as_array) {
        if !options.contains(value) {
            return Err(format!("{value} is not one of {options:?}"));
        }
    }
    let kind = schema.get("type").and_then(Value::as_str);
    let ok = match kind {
        None => true,
        Some("object") => value.is_object(),
        Some("string") => value.is_string(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("number") => value.is_number(),
        Some("boolean") => value.is_boolean(),
        Some("array") => value.is_array(),
        Some("null") => value.is_null(),
        Some(other) => return Err(format!("the checker does not know type {other}")),
    };
    if !ok {
        return Err(format!("{value} is not of type {}", kind.unwrap_or("?")));
    }
    if let Some(n) = value.as_f64() {
        if schema["minimum"].as_f64().is_some_and(|m| n < m)
            || schema["maximum"].as_f64().is_some_and(|m| n > m)
        {
            return Err(format!("{n} is out of the schema's range"));
        }
    }
    if let (Some(items), Some(list)) = (schema.get("items"), value.as_array()) {
        for v in list {
            check_schema(items, v)?;
        }
    }
    if let Some(obj) = value.as_object() {
        let props = schema.get("properties").and_then(Value::as_object);
        for req in schema["required"].as_array().into_iter().flatten() {
            let key = req.as_str().unwrap_or_default();
            if !obj.contains_key(key) {
                return Err(format!("required property `{key}` is missing from {value}"));
            }
        }
        for (k, v) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(s) => check_schema(s, v).map_err(|e| format!("{k}: {e}"))?,
                None if schema["additionalProperties"] == Value::Bool(false) => {
                    return Err(format!("property `{k}` is not declared"))
                }
                None => {}
            }
        }
    }
    Ok(())
}

/// Three tools with different argument shapes, in OpenAI's request form, for the tool-call
/// tests of every API.
pub fn three_tools() -> Vec<(&'static str, serde_json::Value)> {
    use serde_json::json;
    vec![
        (
            "get_weather",
            json!({"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                   "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": false}),
        ),
        (
            "add",
            json!({"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                   "b": {"type": "integer", "minimum": 0, "maximum": 99}},
                   "required": ["a", "b"], "additionalProperties": false}),
        ),
        (
            "set_alarm",
            json!({"type": "object", "properties": {"on": {"type": "boolean"},
                   "label": {"type": "string", "enum": ["wake", "nap"]}},
                   "required": ["on"], "additionalProperties": false}),
        ),
    ]
}
