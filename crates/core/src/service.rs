//! The front door of the engine room: what the HTTP layer calls. It knows which model is served,
//! whether it is loaded yet, and hands each request to an engine.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use std::time::Instant;

use serde::Serialize;
use thiserror::Error;

use crate::engine::{Engine, EngineError, GenerationStream};
use crate::metrics::{Metrics, Outcome};
use crate::pool::{AcquireError, Pool};
use crate::queue::Class;
use crate::request::{GenerationEvent, GenerationRequest, Prompt, ToolSpec};

/// What a shed request is told to wait before retrying: a machine cools over tens of seconds.
const SHED_RETRY_AFTER_S: u64 = 30;

/// Why a request could not be started.
#[derive(Debug, Error, Clone)]
pub enum SubmitError {
    /// The model is still loading, or failed to load (HTTP 503).
    #[error("{0}")]
    NotReady(String),
    /// The server is shutting down (HTTP 503).
    #[error("the server is shutting down")]
    ShuttingDown,
    /// Every worker is busy and the queue is full (HTTP 429).
    #[error("{message}")]
    Busy { message: String, retry_after_s: u64 },
    /// The machine is too hot and sheds this class of request (HTTP 503 with Retry-After).
    #[error("{message}")]
    Shed { message: String, retry_after_s: u64 },
    /// No worker freed a slot before the request's deadline (HTTP 503).
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl From<AcquireError> for SubmitError {
    fn from(e: AcquireError) -> Self {
        match e {
            AcquireError::QueueFull(f) => SubmitError::Busy {
                message: format!("The server is busy: {f}."),
                retry_after_s: f.retry_after_s,
            },
            AcquireError::DeadlineExceeded(_) => SubmitError::DeadlineExceeded(format!(
                "The request waited in the queue past its deadline: {e}."
            )),
            AcquireError::Stopped => SubmitError::ShuttingDown,
        }
    }
}

/// Where the served model stands.
#[derive(Clone)]
pub enum ModelState {
    Loading {
        since: Instant,
        detail: String,
    },
    /// One engine, every request straight to it (tests, benchmarks).
    Ready(Arc<dyn Engine>),
    /// The elastic pool: requests lease a slot on a worker, waiting in its queue if need be.
    Pooled(Arc<Pool>),
    Failed(String),
}

/// A serializable view of [`ModelState`].
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum ModelStatus {
    Loading { detail: String, seconds: f64 },
    Ready,
    Failed { error: String },
}

/// The service: one served model (for now, one engine).
pub struct Service {
    /// The name clients send as `"model"`, and other names accepted for the same model (catalog
    /// variant id, file stem).
    served: RwLock<(String, Vec<String>)>,
    state: RwLock<ModelState>,
    shutting_down: std::sync::atomic::AtomicBool,
    in_flight: Arc<AtomicUsize>,
    /// Requests submitted since start, and when the last one came (load signals).
    arrivals: std::sync::atomic::AtomicU64,
    last_arrival: std::sync::Mutex<Option<Instant>>,
    /// How long a pooled request may wait for a slot.
    queue_deadline: RwLock<std::time::Duration>,
    /// Why batch-class requests are refused now (critical heat), if they are.
    shedding: RwLock<Option<String>>,
    pub metrics: Arc<Metrics>,
}

/// Counts a generation as running from submission until its stream is dropped.
struct InFlightGuard(Arc<AtomicUsize>);

impl InFlightGuard {
    fn new(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        InFlightGuard(counter.clone())
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Service {
    pub fn new(model_name: impl Into<String>, aliases: Vec<String>) -> Arc<Service> {
        Arc::new(Service {
            served: RwLock::new((model_name.into(), aliases)),
            state: RwLock::new(ModelState::Loading {
                since: Instant::now(),
                detail: "starting".into(),
            }),
            shutting_down: Default::default(),
            in_flight: Default::default(),
            arrivals: Default::default(),
            last_arrival: Default::default(),
            queue_deadline: RwLock::new(std::time::Duration::from_secs(30)),
            shedding: RwLock::new(None),
            metrics: Default::default(),
        })
    }

    pub fn model_name(&self) -> String {
        self.served.read().unwrap().0.clone()
    }

    /// Changes the served model's name (a fallback model replaced the requested one).
    pub fn set_model_name(&self, name: impl Into<String>, aliases: Vec<String>) {
        *self.served.write().unwrap() = (name.into(), aliases);
    }

    /// Whether `name` refers to the served model.
    pub fn serves(&self, name: &str) -> bool {
        let served = self.served.read().unwrap();
        name == served.0 || served.1.iter().any(|a| a == name)
    }

    pub fn set_state(&self, state: ModelState) {
        *self.state.write().unwrap() = state;
    }

    /// Updates the detail of a model that is still loading (download progress, say).
    pub fn set_loading_detail(&self, detail: impl Into<String>) {
        let mut s = self.state.write().unwrap();
        if let ModelState::Loading { detail: d, .. } = &mut *s {
            *d = detail.into();
        }
    }

    pub fn status(&self) -> ModelStatus {
        match &*self.state.read().unwrap() {
            ModelState::Loading { since, detail } => ModelStatus::Loading {
                detail: detail.clone(),
                seconds: since.elapsed().as_secs_f64(),
            },
            ModelState::Ready(_) | ModelState::Pooled(_) => ModelStatus::Ready,
            ModelState::Failed(e) => ModelStatus::Failed { error: e.clone() },
        }
    }

    /// The pool, when the model is served by one.
    pub fn pool(&self) -> Option<Arc<Pool>> {
        match &*self.state.read().unwrap() {
            ModelState::Pooled(p) => Some(p.clone()),
            _ => None,
        }
    }

    pub fn set_queue_deadline(&self, d: std::time::Duration) {
        *self.queue_deadline.write().unwrap() = d;
    }

    /// Requests submitted so far (a counter; the autoscaler derives the rate).
    pub fn arrivals(&self) -> u64 {
        self.arrivals.load(Ordering::Relaxed)
    }

    /// Time since the last request arrived, if any did.
    pub fn idle_for(&self) -> Option<std::time::Duration> {
        self.last_arrival.lock().unwrap().map(|t| t.elapsed())
    }

    /// Where requests go: one engine, or the pool.
    fn backend(&self) -> Result<Backend, SubmitError> {
        match &*self.state.read().unwrap() {
            ModelState::Ready(e) => Ok(Backend::Engine(e.clone())),
            ModelState::Pooled(p) => Ok(Backend::Pool(p.clone())),
            ModelState::Loading { detail, .. } => Err(SubmitError::NotReady(format!(
                "the model `{}` is still loading ({detail})",
                self.model_name()
            ))),
            ModelState::Failed(e) => Err(SubmitError::NotReady(format!(
                "the model `{}` failed to load: {e}",
                self.model_name()
            ))),
        }
    }

    /// The ready engine, if any (a pooled model lends any Ready worker's).
    pub fn engine(&self) -> Result<Arc<dyn Engine>, SubmitError> {
        match self.backend()? {
            Backend::Engine(e) => Ok(e),
            Backend::Pool(p) => p.any_engine().ok_or_else(|| {
                SubmitError::NotReady("no worker is running yet; one is starting".into())
            }),
        }
    }

    /// Stops accepting new requests; running ones continue.
    pub fn begin_shutdown(&self) {
        self.shutting_down
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Starts a generation.
    pub async fn submit(
        &self,
        request: GenerationRequest,
    ) -> Result<GenerationStream, SubmitError> {
        self.submit_as(request, Class::Standard).await
    }

    /// Starts a generation in priority `class` (pooled models queue by class).
    pub async fn submit_as(
        &self,
        request: GenerationRequest,
        class: Class,
    ) -> Result<GenerationStream, SubmitError> {
        let started = Instant::now();
        let result = self.start(request, class).await;
        if let Err(e) = &result {
            self.record_refusal(e);
        }
        Ok(self.track(result?, started))
    }

    fn record_refusal(&self, e: &SubmitError) {
        match e {
            SubmitError::Busy { .. } => self.metrics.record(Outcome::QueueFull),
            SubmitError::DeadlineExceeded(_) => self.metrics.record(Outcome::Deadline),
            SubmitError::NotReady(_) | SubmitError::ShuttingDown | SubmitError::Shed { .. } => {
                self.metrics.record(Outcome::Unavailable)
            }
            SubmitError::Engine(EngineError::Invalid(_)) => self.metrics.record(Outcome::Invalid),
            SubmitError::Engine(_) => self.metrics.record(Outcome::Error),
        }
    }

    /// Takes one slot on one worker for generations run one after another
    /// ([`Service::submit_pinned`]): later ones reuse the KV cache of earlier ones' prompts
    /// through the engine's prefix cache, which a different worker would not have. The slot is
    /// held until the [`Pinned`] and every stream started on it are dropped.
    pub async fn pin(&self, class: Class) -> Result<Arc<Pinned>, SubmitError> {
        let result = async {
            if self.is_shutting_down() {
                return Err(SubmitError::ShuttingDown);
            }
            let backend = self.backend()?;
            self.arrivals.fetch_add(1, Ordering::Relaxed);
            *self.last_arrival.lock().unwrap() = Some(Instant::now());
            let guard = InFlightGuard::new(&self.in_flight);
            Ok(match backend {
                Backend::Engine(engine) => Pinned {
                    engine,
                    _guard: guard,
                    _lease: None,
                },
                Backend::Pool(pool) => {
                    let deadline = *self.queue_deadline.read().unwrap();
                    let lease = pool.acquire(class, deadline).await?;
                    Pinned {
                        engine: lease.engine().clone(),
                        _guard: guard,
                        _lease: Some(lease),
                    }
                }
            })
        }
        .await;
        if let Err(e) = &result {
            self.record_refusal(e);
        }
        Ok(Arc::new(result?))
    }

    /// Starts a generation on a pinned worker.
    pub async fn submit_pinned(
        &self,
        pinned: &Arc<Pinned>,
        request: GenerationRequest,
    ) -> Result<GenerationStream, SubmitError> {
        let started = Instant::now();
        let result = pinned
            .engine
            .generate(request)
            .await
            .map_err(SubmitError::from);
        if let Err(e) = &result {
            self.record_refusal(e);
        }
        let hold = pinned.clone();
        let stream = Box::pin(result?.map(move |event| {
            let _held = &hold;
            event
        }));
        Ok(self.track(stream, started))
    }

    /// Records how a started generation ends.
    fn track(&self, stream: GenerationStream, started: Instant) -> GenerationStream {
        let mut tracker = Tracker {
            metrics: self.metrics.clone(),
            started,
            first: None,
            ended: false,
        };
        Box::pin(stream.map(move |event| {
            tracker.see(&event);
            event
        }))
    }

    async fn start(
        &self,
        request: GenerationRequest,
        class: Class,
    ) -> Result<GenerationStream, SubmitError> {
        if self.is_shutting_down() {
            return Err(SubmitError::ShuttingDown);
        }
        if class == Class::Batch {
            if let Some(why) = self.shedding.read().unwrap().clone() {
                return Err(SubmitError::Shed {
                    message: format!("Batch requests are refused while the machine cools: {why}."),
                    retry_after_s: SHED_RETRY_AFTER_S,
                });
            }
        }
        let backend = self.backend()?;
        self.arrivals.fetch_add(1, Ordering::Relaxed);
        *self.last_arrival.lock().unwrap() = Some(Instant::now());
        let guard = InFlightGuard::new(&self.in_flight);
        let (stream, lease) = match backend {
            Backend::Engine(engine) => (engine.generate(request).await?, None),
            Backend::Pool(pool) => {
                let deadline = *self.queue_deadline.read().unwrap();
                let lease = pool.acquire(class, deadline).await?;
                (lease.engine().generate(request).await?, Some(lease))
            }
        };
        // The stream owns the slot: dropping it (finished, or the client left) frees both.
        Ok(Box::pin(stream.map(move |event| {
            let _running = (&guard, &lease);
            event
        })))
    }

    /// Refuses batch-class requests with `why` (`None`: accept them again). Other classes still
    /// queue as usual.
    pub fn set_shedding(&self, why: Option<String>) {
        *self.shedding.write().unwrap() = why;
    }

    pub fn shedding(&self) -> Option<String> {
        self.shedding.read().unwrap().clone()
    }

    /// Generations submitted and not yet finished (or dropped).
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Tokens `prompt` occupies once rendered (needs a running engine).
    pub async fn count_tokens(
        &self,
        prompt: &Prompt,
        tools: &[ToolSpec],
    ) -> Result<u32, SubmitError> {
        let engine = self.engine()?;
        Ok(engine.count_tokens(prompt, tools).await?)
    }
}

/// Records how one generation ends: finished, failed, or dropped early (cancelled).
struct Tracker {
    metrics: Arc<Metrics>,
    started: Instant,
    first: Option<Instant>,
    ended: bool,
}

impl Tracker {
    fn see(&mut self, event: &GenerationEvent) {
        match event {
            GenerationEvent::Text(_) | GenerationEvent::ToolCalls(_) => {
                self.first.get_or_insert_with(Instant::now);
            }
            GenerationEvent::Done { usage, .. } => {
                let now = Instant::now();
                self.metrics.finished(
                    usage.prompt_tokens,
                    usage.completion_tokens,
                    self.first.unwrap_or(now) - self.started,
                    now - self.started,
                );
                self.ended = true;
            }
            GenerationEvent::Error(_) => {
                self.metrics.record(Outcome::Error);
                self.ended = true;
            }
        }
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        if !self.ended {
            self.metrics.record(Outcome::Cancelled);
        }
    }
}

/// One worker slot held for a sequence of generations (see [`Service::pin`]).
pub struct Pinned {
    engine: Arc<dyn Engine>,
    _guard: InFlightGuard,
    _lease: Option<crate::pool::Lease>,
}

enum Backend {
    Engine(Arc<dyn Engine>),
    Pool(Arc<Pool>),
}
