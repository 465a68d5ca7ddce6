//! The front door of the engine room: what the HTTP layer calls. It knows which model is served
//! and whether it is loaded yet, and starts each generation on a slot the [`Scheduler`] leases.
//!
//! Every generation it starts runs in its own task, which owns the worker slot and feeds the
//! client through a bounded queue ([`OUTPUT_QUEUE`] events): the slot is released when the
//! generation ends or fails, not when the HTTP transport drops. A client that goes away cancels
//! the generation at once; one that stops reading (the queue stays full for the write timeout)
//! has its generation cancelled and its slot freed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use parking_lot::RwLock;
use serde::Serialize;
use thiserror::Error;
use tidepool_engine::embed::{EmbedRequest, Embeddings};
use tidepool_engine::request::{GenerationEvent, GenerationRequest, Prompt, ToolSpec};
use tidepool_engine::{Engine, EngineError, GenerationStream};
use tidepool_sched::metrics::{Metrics, Outcome};
use tidepool_sched::pool::{AcquireError, Lease, Pool};
use tidepool_sched::queue::Class;
use tidepool_sched::scheduler::{AdmitError, InFlightGuard, Scheduler};

/// How many times a generation is started again on another worker when its worker's engine
/// was gone before it started ([`Service::submit_as`]).
const RESTARTS_AFTER_ENGINE_LOSS: usize = 2;

/// What a shed request is told to wait before retrying: a machine cools over tens of seconds.
const SHED_RETRY_AFTER_S: u64 = 30;

/// Events a generation may run ahead of its client before it waits for it to read.
pub const OUTPUT_QUEUE: usize = 64;

/// How long a generation waits for a client that stopped reading, by default.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

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

impl From<AdmitError> for SubmitError {
    fn from(e: AdmitError) -> Self {
        match e {
            AdmitError::NoPool => {
                SubmitError::NotReady("no worker is running yet; one is starting".into())
            }
            AdmitError::Shed(why) => SubmitError::Shed {
                message: format!("Batch requests are refused while the machine cools: {why}."),
                retry_after_s: SHED_RETRY_AFTER_S,
            },
            AdmitError::Acquire(AcquireError::QueueFull(f)) => SubmitError::Busy {
                message: format!("The server is busy: {f}."),
                retry_after_s: f.retry_after_s,
            },
            AdmitError::Acquire(e @ AcquireError::DeadlineExceeded(_)) => {
                SubmitError::DeadlineExceeded(format!(
                    "The request waited in the queue past its deadline: {e}."
                ))
            }
            AdmitError::Acquire(AcquireError::Stopped) => SubmitError::ShuttingDown,
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
    /// Served by the scheduler's pool.
    Ready,
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

/// The service: the served model and the scheduler that runs it.
pub struct Service {
    /// The name clients send as `"model"`, and other names accepted for the same model (catalog
    /// variant id, file stem).
    served: RwLock<(String, Vec<String>)>,
    state: RwLock<ModelState>,
    shutting_down: AtomicBool,
    /// The live pool, admission and the request counts.
    scheduler: Arc<Scheduler>,
    /// How long a generation waits for a client that stopped reading.
    write_timeout: RwLock<Duration>,
    /// Woken when the model's state changes.
    state_changed: tokio::sync::Notify,
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
            scheduler: Scheduler::new(),
            write_timeout: RwLock::new(DEFAULT_WRITE_TIMEOUT),
            state_changed: tokio::sync::Notify::new(),
        })
    }

    /// Waits until the model is served (`Ok`) or has failed to load (`Err` with why).
    pub async fn wait_ready(&self) -> Result<(), String> {
        loop {
            // Registered before the check, so a change between the two is not missed.
            let changed = self.state_changed.notified();
            match &*self.state.read() {
                ModelState::Ready => return Ok(()),
                ModelState::Failed(e) => return Err(e.clone()),
                ModelState::Loading { .. } => {}
            }
            changed.await;
        }
    }

    /// The scheduler (the control loop steers its pool and reads its counts).
    pub fn scheduler(&self) -> &Arc<Scheduler> {
        &self.scheduler
    }

    /// The request metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.scheduler.metrics
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

    /// Serves from `pool` from now on; returns the previous pool, which the caller drains.
    pub fn serve_pool(&self, pool: Arc<Pool>) -> Option<Arc<Pool>> {
        let old = self.scheduler.set_pool(pool);
        *self.state.write() = ModelState::Ready;
        self.state_changed.notify_waiters();
        old
    }

    /// The model failed to load.
    pub fn set_failed(&self, why: impl Into<String>) {
        *self.state.write() = ModelState::Failed(why.into());
        self.state_changed.notify_waiters();
    }

    /// Updates the detail of a model that is still loading (download progress, say).
    pub fn set_loading_detail(&self, detail: impl Into<String>) {
        if let ModelState::Loading { detail: d, .. } = &mut *self.state.write() {
            *d = detail.into();
        }
    }

    pub fn status(&self) -> ModelStatus {
        match &*self.state.read() {
            ModelState::Loading { since, detail } => ModelStatus::Loading {
                detail: detail.clone(),
                seconds: since.elapsed().as_secs_f64(),
            },
            ModelState::Ready => match self.pool().and_then(|p| p.degraded()) {
                Some(reason) => ModelStatus::Degraded { reason },
                None => ModelStatus::Ready,
            },
            ModelState::Failed(e) => ModelStatus::Failed { error: e.clone() },
        }
    }

    /// The live pool, once the model is served.
    pub fn pool(&self) -> Option<Arc<Pool>> {
        self.scheduler.pool()
    }

    /// How long a generation waits for a client that stopped reading before it is cancelled.
    pub fn set_write_timeout(&self, d: Duration) {
        *self.write_timeout.write() = d;
    }

    /// How long a request may wait for a slot.
    pub fn queue_deadline(&self) -> Duration {
        self.scheduler.queue_deadline()
    }

    pub fn set_queue_deadline(&self, d: Duration) {
        self.scheduler.set_queue_deadline(d);
    }

    /// Why requests cannot run now, if the model is not ready.
    fn ready(&self) -> Result<(), SubmitError> {
        if self.is_shutting_down() {
            return Err(SubmitError::ShuttingDown);
        }
        match &*self.state.read() {
            ModelState::Ready => Ok(()),
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

    /// Some Ready worker's engine (for work that needs no slot, like counting tokens).
    pub fn engine(&self) -> Result<Arc<dyn Engine>, SubmitError> {
        self.ready()?;
        self.pool().and_then(|p| p.any_engine()).ok_or_else(|| {
            SubmitError::NotReady("no worker is running yet; one is starting".into())
        })
    }

    /// Stops accepting new requests; running ones continue.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Starts a generation.
    pub async fn submit(
        &self,
        request: GenerationRequest,
    ) -> Result<GenerationStream, SubmitError> {
        self.submit_as(request, Class::Standard).await
    }

    /// Starts a generation in priority `class`.
    pub async fn submit_as(
        &self,
        request: GenerationRequest,
        class: Class,
    ) -> Result<GenerationStream, SubmitError> {
        let started = Instant::now();
        let result = async {
            let need = crate::context_fit::tokens_needed(&request);
            let (lease, guard, stream) = self.start(class, need, request).await?;
            // The stream owns the slot: dropping it (the generation ended, or was cancelled)
            // frees it.
            let mut lease = lease;
            let stream: GenerationStream = Box::pin(stream.map(move |event| {
                if let GenerationEvent::Done { usage, .. } = &event {
                    lease.completed(usage.completion_tokens.into());
                }
                event
            }));
            Ok((stream, guard))
        }
        .await;
        if let Err(e) = &result {
            self.record_refusal(e);
        }
        let (stream, guard) = result?;
        Ok(self.deliver(stream, guard, started))
    }

    /// Admits a generation and starts it on a leased slot. When the worker's engine turns out
    /// to be gone before the generation started (it died after the lease was taken, as a
    /// mistral.rs engine thread can), nothing was generated: the slot goes back, which takes the
    /// dead worker out and starts its replacement, and the generation is started again on
    /// another worker, at most [`RESTARTS_AFTER_ENGINE_LOSS`] times.
    async fn start(
        &self,
        class: Class,
        need: u32,
        request: GenerationRequest,
    ) -> Result<(Lease, InFlightGuard, GenerationStream), SubmitError> {
        let mut restarts = 0;
        loop {
            let (lease, guard) = self.admit(class, need).await?;
            let started = started_within(
                self.queue_deadline(),
                lease.engine().generate(request.clone()),
            )
            .await;
            match started {
                Ok(stream) => return Ok((lease, guard, stream)),
                Err(SubmitError::Engine(EngineError::Unavailable(why)))
                    if restarts < RESTARTS_AFTER_ENGINE_LOSS =>
                {
                    restarts += 1;
                    tracing::warn!(
                        "worker {}'s engine is gone before the generation started ({why}); \
                         starting it again on another worker",
                        lease.worker()
                    );
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Admission, the same for every generation: the model must be ready, the request is
    /// counted, and a slot whose context holds `need` tokens is leased within the deadline.
    async fn admit(&self, class: Class, need: u32) -> Result<(Lease, InFlightGuard), SubmitError> {
        self.ready()?;
        let guard = self.scheduler.admit();
        let lease = self.scheduler.lease(class, need).await?;
        Ok((lease, guard))
    }

    /// The most tokens one request may use, prompt and answer together: the largest context a
    /// worker gets per slot, within the model's own limit (`None` before a worker has loaded).
    pub fn context_limit(&self) -> Option<u64> {
        let engine = self.engine().ok()?;
        let model = engine.info().gguf.shape.context_length;
        let pool = self.pool().map(|p| u64::from(p.max_context()));
        Some(match pool {
            Some(p) if model > 0 => p.min(model),
            Some(p) => p,
            None => engine.info().max_sequence_length as u64,
        })
    }

    fn record_refusal(&self, e: &SubmitError) {
        let m = self.metrics();
        match e {
            SubmitError::Busy { .. } => m.record(Outcome::QueueFull),
            SubmitError::DeadlineExceeded(_) => m.record(Outcome::Deadline),
            SubmitError::NotReady(_) | SubmitError::ShuttingDown | SubmitError::Shed { .. } => {
                m.record(Outcome::Unavailable)
            }
            SubmitError::Engine(EngineError::Invalid(_)) => m.record(Outcome::Invalid),
            SubmitError::Engine(_) => m.record(Outcome::Error),
        }
    }

    /// Takes one slot on one worker for generations run one after another
    /// ([`Service::submit_pinned`]), each of which needs at most `need` tokens of context:
    /// later ones reuse the KV cache of earlier ones' prompts through the engine's prefix
    /// cache, which a different worker would not have. The slot is held until the [`Pinned`]
    /// and every stream started on it are dropped.
    pub async fn pin(&self, class: Class, need: u32) -> Result<Arc<Pinned>, SubmitError> {
        let result = self.admit(class, need).await;
        if let Err(e) = &result {
            self.record_refusal(e);
        }
        let (lease, guard) = result?;
        Ok(Arc::new(Pinned {
            engine: lease.engine().clone(),
            _guard: guard,
            _lease: lease,
        }))
    }

    /// Starts a generation on a pinned worker.
    pub async fn submit_pinned(
        &self,
        pinned: &Arc<Pinned>,
        request: GenerationRequest,
    ) -> Result<GenerationStream, SubmitError> {
        let started = Instant::now();
        let result = started_within(self.queue_deadline(), pinned.engine.generate(request)).await;
        if let Err(e) = &result {
            self.record_refusal(e);
        }
        let hold = pinned.clone();
        let stream = Box::pin(result?.map(move |event| {
            let _held = &hold;
            event
        }));
        let guard = self.scheduler.count_in_flight();
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
        let metrics = self.metrics().clone();
        let mut tracker = Tracker {
            metrics: metrics.clone(),
            started,
            first: None,
            ended: false,
        };
        let tracked = stream.map(move |event| {
            tracker.see(&event);
            event
        });
        let events = pump(Box::pin(tracked), *self.write_timeout.read(), metrics);
        Box::pin(events.map(move |event| {
            let _counted = &guard;
            event
        }))
    }

    /// Requests in flight (admitted, not yet delivered).
    pub fn in_flight(&self) -> usize {
        self.scheduler.in_flight()
    }

    /// Waits until no request is in flight, or `timeout` passes; returns how many still are.
    pub async fn wait_idle(&self, timeout: Duration) -> usize {
        self.scheduler.wait_idle(timeout).await
    }

    /// Tokens `prompt` occupies once rendered (needs a running engine).
    pub async fn count_tokens(
        &self,
        prompt: &Prompt,
        tools: &[ToolSpec],
    ) -> Result<u32, SubmitError> {
        // An engine found gone is taken out of the pool and another one asked, as in
        // [`Service::start`].
        let mut restarts = 0;
        loop {
            let engine = self.engine()?;
            match engine.count_tokens(prompt, tools).await {
                Err(EngineError::Unavailable(why)) if restarts < RESTARTS_AFTER_ENGINE_LOSS => {
                    restarts += 1;
                    tracing::warn!("an engine is gone ({why}); counting tokens on another");
                    if let Some(pool) = self.pool() {
                        pool.check_health();
                    }
                }
                r => return Ok(r?),
            }
        }
    }

    /// Embeds `request` on a leased slot: embedding is compute like a prompt's prefill, so it
    /// queues, counts and sheds like a generation. When the picked worker's engine turns out to
    /// be gone, nothing was computed: the slot goes back (the pool replaces the worker) and the
    /// request runs on another, at most [`RESTARTS_AFTER_ENGINE_LOSS`] times.
    pub async fn embed(
        &self,
        class: Class,
        request: EmbedRequest,
    ) -> Result<Embeddings, SubmitError> {
        let result = async {
            let mut restarts = 0;
            loop {
                let (lease, _counted) = self.admit(class, 1).await?;
                match lease.engine().embed(request.clone()).await {
                    Err(EngineError::Unavailable(why)) if restarts < RESTARTS_AFTER_ENGINE_LOSS => {
                        restarts += 1;
                        tracing::warn!(
                            "worker {}'s engine is gone ({why}); embedding on another worker",
                            lease.worker()
                        );
                    }
                    r => return Ok::<_, SubmitError>(r?),
                }
            }
        }
        .await;
        match &result {
            Ok(_) => self.metrics().record(Outcome::Ok),
            Err(e) => self.record_refusal(e),
        }
        result
    }
}

/// Waits for an engine to start a generation (render the prompt, tokenize it, admit it) for at
/// most `deadline`.
async fn started_within(
    deadline: Duration,
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
    write_timeout: Duration,
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
    _lease: Lease,
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_engine::request::Sampling;
    use tidepool_sched::fake::FakeWorkers;

    fn hello() -> GenerationRequest {
        GenerationRequest {
            prompt: Prompt::Text("hello".into()),
            sampling: Sampling {
                max_tokens: Some(3),
                ..Default::default()
            },
            ..GenerationRequest::chat(Vec::new())
        }
    }

    /// A service on a pool of `workers` Ready fake workers.
    async fn serving(workers: usize) -> (Arc<FakeWorkers>, Arc<Pool>, Arc<Service>) {
        let kept = FakeWorkers::new(2, 3);
        let pool = Pool::new(kept.clone(), 10, 8);
        for _ in 0..workers {
            let id = pool.add_worker("test").unwrap();
            pool.wait_ready(id).await.unwrap();
        }
        let service = Service::new("fake", vec![]);
        service.serve_pool(pool.clone());
        (kept, pool, service)
    }

    #[tokio::test]
    async fn tokens_are_counted_on_another_worker_when_the_picked_one_is_gone() {
        let (kept, pool, service) = serving(2).await;
        // The first worker is the one picked; it dies as the count reaches it.
        kept.engine(0).dies_at_next_request();
        let n = service
            .count_tokens(&Prompt::Text("hello world!".into()), &[])
            .await
            .expect("counted on the other worker");
        assert_eq!(n, 3);
        assert_eq!(pool.deaths(), 1);
        pool.stop();
    }

    #[tokio::test]
    async fn an_embedding_leases_a_slot_and_moves_off_a_dead_engine() {
        use tidepool_engine::embed::{EmbedInput, EmbedRequest};
        let (kept, pool, service) = serving(2).await;
        kept.engine(0).dies_at_next_request();
        let out = service
            .embed(
                Class::Standard,
                EmbedRequest {
                    inputs: vec![EmbedInput::Text("a".into()), EmbedInput::Text("a".into())],
                    truncate: false,
                },
            )
            .await
            .expect("embedded on the other worker");
        assert_eq!(out.vectors.len(), 2);
        assert_eq!(out.vectors[0], out.vectors[1]);
        assert_eq!(pool.deaths(), 1);
        assert_eq!(
            service.in_flight(),
            0,
            "the slot and the count are given back"
        );
        pool.stop();
    }

    #[tokio::test]
    async fn a_generation_whose_engine_died_before_it_started_runs_on_the_replacement() {
        let (kept, pool, service) = serving(1).await;
        let first = pool.workers()[0].id;
        kept.engine(0).dies_at_next_request();

        let events: Vec<GenerationEvent> = service
            .submit(hello())
            .await
            .expect("started again on the replacement")
            .collect()
            .await;
        assert!(
            matches!(events.last(), Some(GenerationEvent::Done { .. })),
            "{events:?}"
        );
        assert_eq!(pool.deaths(), 1);
        assert!(pool.workers().iter().all(|w| w.id != first));
        let engines = kept.engines();
        assert_eq!(engines.len(), 2, "one replacement");
        assert_eq!(
            engines[1].started.load(std::sync::atomic::Ordering::SeqCst),
            1
        );
        pool.stop();
    }

    #[tokio::test]
    async fn a_generation_is_started_again_only_a_bounded_number_of_times() {
        let (kept, pool, service) = serving(1).await;
        // Every engine, the replacements too, dies as its generation starts.
        kept.make_engines_that_die_at_their_first_request();
        kept.engine(0).dies_at_next_request();
        let result = service.submit(hello()).await;
        assert!(
            matches!(
                result,
                Err(SubmitError::Engine(EngineError::Unavailable(_)))
            ),
            "{:?}",
            result.err()
        );
        assert_eq!(pool.deaths() as usize, 1 + RESTARTS_AFTER_ENGINE_LOSS);
        pool.stop();
    }
}
