//! The front door of the engine room: what the HTTP layer calls. It knows which model is served,
//! whether it is loaded yet, and hands each request to an engine.
//!
//! Every generation it starts runs in its own task, which owns the worker slot and feeds the
//! client through a bounded queue ([`OUTPUT_QUEUE`] events): the slot is released when the
//! generation ends or fails, not when the HTTP transport drops. A client that goes away cancels
//! the generation at once; one that stops reading (the queue stays full for the write timeout)
//! has its generation cancelled and its slot freed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

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

/// Events a generation may run ahead of its client before it waits for it to read.
pub const OUTPUT_QUEUE: usize = 64;

/// How long a generation waits for a client that stopped reading, by default.
pub const DEFAULT_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

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
    Loading {
        detail: String,
        seconds: f64,
    },
    Ready,
    /// Served by a pool that has no healthy worker since one died (a replacement is loading).
    Degraded {
        reason: String,
    },
    Failed {
        error: String,
    },
}

/// The service: one served model (for now, one engine).
pub struct Service {
    /// The name clients send as `"model"`, and other names accepted for the same model (catalog
    /// variant id, file stem).
    served: RwLock<(String, Vec<String>)>,
    state: RwLock<ModelState>,
    shutting_down: std::sync::atomic::AtomicBool,
    in_flight: Arc<InFlight>,
    /// Requests submitted since start, and when the last one came (load signals).
    arrivals: std::sync::atomic::AtomicU64,
    last_arrival: parking_lot::Mutex<Option<Instant>>,
    /// How long a pooled request may wait for a slot.
    queue_deadline: RwLock<std::time::Duration>,
    /// Why batch-class requests are refused now (critical heat), if they are.
    shedding: RwLock<Option<String>>,
    /// How long a generation waits for a client that stopped reading.
    write_timeout: RwLock<std::time::Duration>,
    pub metrics: Arc<Metrics>,
}

/// Generations submitted and not yet delivered, and a way to wait for them to end.
#[derive(Default)]
struct InFlight {
    count: AtomicUsize,
    changed: tokio::sync::Notify,
}

/// Counts a generation as running from submission until its client has it all (or left).
struct InFlightGuard(Arc<InFlight>);

impl InFlightGuard {
    fn new(counter: &Arc<InFlight>) -> Self {
        counter.count.fetch_add(1, Ordering::SeqCst);
        InFlightGuard(counter.clone())
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.notify_waiters();
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
            write_timeout: RwLock::new(DEFAULT_WRITE_TIMEOUT),
            metrics: Default::default(),
        })
    }

    pub fn model_name(&self) -> String {
        self.served.read().0.clone()
    }

    /// Changes the served model's name (a fallback model replaced the requested one).
    pub fn set_model_name(&self, name: impl Into<String>, aliases: Vec<String>) {
        *self.served.write() = (name.into(), aliases);
    }

    /// Whether `name` refers to the served model.
    pub fn serves(&self, name: &str) -> bool {
        let served = self.served.read();
        name == served.0 || served.1.iter().any(|a| a == name)
    }

    pub fn set_state(&self, state: ModelState) {
        *self.state.write() = state;
    }

    /// Updates the detail of a model that is still loading (download progress, say).
    pub fn set_loading_detail(&self, detail: impl Into<String>) {
        let mut s = self.state.write();
        if let ModelState::Loading { detail: d, .. } = &mut *s {
            *d = detail.into();
        }
    }

    pub fn status(&self) -> ModelStatus {
        match &*self.state.read() {
            ModelState::Loading { since, detail } => ModelStatus::Loading {
                detail: detail.clone(),
                seconds: since.elapsed().as_secs_f64(),
            },
            ModelState::Ready(_) => ModelStatus::Ready,
            ModelState::Pooled(p) => match p.degraded() {
                Some(reason) => ModelStatus::Degraded { reason },
                None => ModelStatus::Ready,
            },
            ModelState::Failed(e) => ModelStatus::Failed { error: e.clone() },
        }
    }

    /// The pool, when the model is served by one.
    pub fn pool(&self) -> Option<Arc<Pool>> {
        match &*self.state.read() {
            ModelState::Pooled(p) => Some(p.clone()),
            _ => None,
        }
    }

    /// How long a generation waits for a client that stopped reading before it is cancelled.
    pub fn set_write_timeout(&self, d: std::time::Duration) {
        *self.write_timeout.write() = d;
    }

    /// How long a pooled request may wait for a slot.
    pub fn queue_deadline(&self) -> std::time::Duration {
        *self.queue_deadline.read()
    }

    pub fn set_queue_deadline(&self, d: std::time::Duration) {
        *self.queue_deadline.write() = d;
    }

    /// Requests submitted so far (a counter; the autoscaler derives the rate).
    pub fn arrivals(&self) -> u64 {
        self.arrivals.load(Ordering::Relaxed)
    }

    /// Time since the last request arrived, if any did.
    pub fn idle_for(&self) -> Option<std::time::Duration> {
        self.last_arrival.lock().map(|t| t.elapsed())
    }

    /// Where requests go: one engine, or the pool.
    fn backend(&self) -> Result<Backend, SubmitError> {
        match &*self.state.read() {
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
        let (stream, guard) = result?;
        Ok(self.deliver(stream, guard, started))
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
            *self.last_arrival.lock() = Some(Instant::now());
            let guard = InFlightGuard::new(&self.in_flight);
            Ok(match backend {
                Backend::Engine(engine) => Pinned {
                    engine,
                    _guard: guard,
                    _lease: None,
                },
                Backend::Pool(pool) => {
                    let deadline = *self.queue_deadline.read();
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
        let guard = InFlightGuard::new(&self.in_flight);
        Ok(self.deliver(stream, guard, started))
    }

    /// Runs a started generation in its own task and hands the client the receiving end: the
    /// task owns the generation (and so its slot) until it ends, the client's side owns
    /// `guard`, so the server counts the request until the client has all of it.
    fn deliver(
        &self,
        stream: GenerationStream,
        guard: InFlightGuard,
        started: Instant,
    ) -> GenerationStream {
        let mut tracker = Tracker {
            metrics: self.metrics.clone(),
            started,
            first: None,
            ended: false,
        };
        let tracked = stream.map(move |event| {
            tracker.see(&event);
            event
        });
        let write_timeout = *self.write_timeout.read();
        let events = pump(Box::pin(tracked), write_timeout, self.metrics.clone());
        Box::pin(events.map(move |event| {
            let _counted = &guard;
            event
        }))
    }

    async fn start(
        &self,
        request: GenerationRequest,
        class: Class,
    ) -> Result<(GenerationStream, InFlightGuard), SubmitError> {
        if self.is_shutting_down() {
            return Err(SubmitError::ShuttingDown);
        }
        if class == Class::Batch {
            if let Some(why) = self.shedding.read().clone() {
                return Err(SubmitError::Shed {
                    message: format!("Batch requests are refused while the machine cools: {why}."),
                    retry_after_s: SHED_RETRY_AFTER_S,
                });
            }
        }
        let backend = self.backend()?;
        self.arrivals.fetch_add(1, Ordering::Relaxed);
        *self.last_arrival.lock() = Some(Instant::now());
        let guard = InFlightGuard::new(&self.in_flight);
        let deadline = self.queue_deadline();
        let (stream, lease) = match backend {
            Backend::Engine(engine) => (
                started_within(deadline, engine.generate(request)).await?,
                None,
            ),
            Backend::Pool(pool) => {
                let lease = pool.acquire(class, deadline).await?;
                (
                    started_within(deadline, lease.engine().generate(request)).await?,
                    Some(lease),
                )
            }
        };
        // The stream owns the slot: dropping it (the generation ended, or was cancelled) frees it.
        let stream: GenerationStream = Box::pin(stream.map(move |event| {
            let _running = &lease;
            event
        }));
        Ok((stream, guard))
    }

    /// Refuses batch-class requests with `why` (`None`: accept them again). Other classes still
    /// queue as usual.
    pub fn set_shedding(&self, why: Option<String>) {
        *self.shedding.write() = why;
    }

    pub fn shedding(&self) -> Option<String> {
        self.shedding.read().clone()
    }

    /// Generations submitted and not yet finished (or dropped).
    pub fn in_flight(&self) -> usize {
        self.in_flight.count.load(Ordering::SeqCst)
    }

    /// Waits until no generation is in flight, or `timeout` passes; returns how many still are.
    pub async fn wait_idle(&self, timeout: std::time::Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Registered before the check, so a change between the two is not missed.
            let changed = self.in_flight.changed.notified();
            let n = self.in_flight();
            if n == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.in_flight();
            }
        }
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

/// Waits for an engine to start a generation (render the prompt, tokenize it, admit it) for at
/// most `deadline`.
async fn started_within(
    deadline: std::time::Duration,
    start: impl std::future::Future<Output = Result<GenerationStream, EngineError>>,
) -> Result<GenerationStream, SubmitError> {
    match tokio::time::timeout(deadline, start).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(SubmitError::DeadlineExceeded(format!(
            "The engine did not start the generation within {:.0} s.",
            deadline.as_secs_f64()
        ))),
    }
}

/// Runs `stream` in its own task, feeding a bounded queue: the task ends (dropping the
/// generation, which frees its slot) when the generation ends, when the receiver is dropped (the
/// client went away: the generation is cancelled), or when the queue stays full for
/// `write_timeout` (the client stopped reading: cancelled too).
fn pump(
    mut stream: GenerationStream,
    write_timeout: std::time::Duration,
    metrics: Arc<Metrics>,
) -> GenerationStream {
    let (tx, rx) = tokio::sync::mpsc::channel(OUTPUT_QUEUE);
    tokio::spawn(async move {
        while let Some(event) = stream.next().await {
            let last = matches!(
                event,
                GenerationEvent::Done { .. } | GenerationEvent::Error(_)
            );
            match tokio::time::timeout(write_timeout, tx.send(event)).await {
                Ok(Ok(())) => {}
                // The client went away: dropping the stream cancels the generation.
                Ok(Err(_)) => return,
                Err(_) => {
                    tracing::warn!(
                        write_timeout_s = write_timeout.as_secs_f64(),
                        "a client stopped reading its answer: generation cancelled, slot freed"
                    );
                    metrics.stalled.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            if last {
                return;
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
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
