//! The worker pool: in-process engine instances ("workers"), each with its own slots, from which
//! requests lease one slot at a time.
//!
//! - A worker moves Loading → Ready → Draining → Stopped. It is added only after its memory
//!   reservation fits the [`Ledger`], loads off the request path, and is removed only by draining:
//!   it takes no new lease and stops when its last one is returned, so no request is dropped.
//! - [`Pool::acquire`] hands out a slot on the least-loaded Ready worker, or waits in the bounded
//!   [`PriorityQueue`] until one frees up or its deadline passes. Dropping the waiting future (the
//!   client went away) removes it from the queue at once; dropping a [`Lease`] frees its slot.
//! - A worker whose engine dies (its thread panicked, its channel closed, a health probe timed
//!   out) is taken out at once: it is never picked again, its reservation is released, waiting
//!   requests go to the other workers, and a replacement is started. While no worker is healthy
//!   the pool says it is degraded (`/health` answers 503 with the reason). A loader that panics
//!   counts as a failed load and gives its reservation back.
//! - Every transition is an [`Event`] with its reason, kept in a ring buffer.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use futures::future::BoxFuture;
use futures::FutureExt;
use serde::Serialize;
use tokio::sync::oneshot;

use tidepool_engine::{Engine, EngineError, EngineSpec};

use crate::capacity::{ServiceCurve, Throughput};
use crate::ledger::{DoesNotFit, Ledger, Reservation};
use crate::queue::{Class, PriorityQueue, QueueFull, Ticket};

/// Events kept for /admin/events and the dashboard.
const EVENT_CAPACITY: usize = 256;

/// Makes workers: loads one engine instance and says what one reserves.
pub trait WorkerFactory: Send + Sync {
    /// Memory one worker holds while it runs.
    fn reservation(&self) -> Reservation;
    /// Concurrent sequences per worker (its admission limit).
    fn slots(&self) -> usize;
    /// Loads one engine instance.
    fn load(&self) -> BoxFuture<'static, Result<Arc<dyn Engine>, EngineError>>;
}

/// The workers of one model on one engine: what every pool in the application is made of (tests
/// make fakes of their own).
pub struct Workers {
    pub spec: EngineSpec,
    pub reservation: Reservation,
}

impl WorkerFactory for Workers {
    fn reservation(&self) -> Reservation {
        self.reservation
    }

    fn slots(&self) -> usize {
        self.spec.slots()
    }

    fn load(&self) -> BoxFuture<'static, Result<Arc<dyn Engine>, EngineError>> {
        self.spec.load()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    Loading,
    Ready,
    Draining,
    Stopped,
}

/// One scaling or worker event.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Unix time, seconds.
    pub at: f64,
    pub worker: Option<u64>,
    pub from: Option<WorkerState>,
    pub to: Option<WorkerState>,
    pub message: String,
}

/// A worker as /admin/status shows it.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerStatus {
    pub id: u64,
    pub state: WorkerState,
    pub slots_busy: usize,
    pub slots_total: usize,
    /// The bytes this worker accounts for: its own (KV cache, buffers), plus its model's shared
    /// weights when it is the oldest worker holding them, so the figures add up to the total.
    pub reserved_bytes: u64,
    pub age_s: f64,
    /// CPU threads it computes on, where its engine takes a number.
    pub threads: Option<usize>,
    /// Its own reservation's parts (measured once it has loaded, where the engine says): KV
    /// cache, and buffers or overhead.
    pub kv_cache_bytes: u64,
    pub buffer_bytes: u64,
    /// Where the worker runs (`cpu`, `cuda:0`, …), once loaded.
    pub device: Option<String>,
    /// The library that runs it (`mistral.rs`, `llama.cpp`), once loaded.
    pub backend: Option<&'static str>,
}

/// Why no slot was handed out.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AcquireError {
    #[error(transparent)]
    QueueFull(#[from] QueueFull),
    #[error("no worker freed a slot within the {0:.0} s deadline")]
    DeadlineExceeded(f64),
    #[error("the pool has stopped")]
    Stopped,
}

struct Worker {
    id: u64,
    state: WorkerState,
    engine: Option<Arc<dyn Engine>>,
    slots: usize,
    busy: usize,
    started: Instant,
}

struct Inner {
    workers: Vec<Worker>,
    ledger: Ledger,
    queue: PriorityQueue<oneshot::Sender<Lease>>,
    events: VecDeque<Event>,
    events_total: u64,
    next_id: u64,
    stopped: bool,
    /// Slots admitted per worker now (a power mode may admit fewer than a worker has).
    slot_cap: Option<usize>,
    /// The most sequences the pool runs at once, on all its workers together (`None`: every
    /// free slot admits). See [`Pool::set_sequence_cap`].
    sequence_cap: Option<(usize, String)>,
    /// Workers that started loading, ever: a generation that overlapped a load is no sample of
    /// the service curve (loading weights takes the same cores).
    loads_started: u64,
    /// Why the pool has no healthy worker after one died (cleared when one is Ready again).
    degraded: Option<String>,
    /// Workers taken out because their engine died, since start.
    deaths: u64,
    /// What a loaded worker's engine reported it allocated beside the weights: used instead of
    /// the factory's estimate for the next ones.
    measured_own: Option<tidepool_engine::OwnMemory>,
    /// Service time by concurrency, from completed requests.
    curve: ServiceCurve,
}

impl Inner {
    /// The slots worker `w` admits under the current cap.
    fn admits(&self, w: &Worker) -> usize {
        self.slot_cap.map_or(w.slots, |c| w.slots.min(c))
    }
}

/// The pool. Share it as `Arc<Pool>`.
pub struct Pool {
    inner: Mutex<Inner>,
    factory: Arc<dyn WorkerFactory>,
    epoch: Instant,
    /// Woken on every worker event, for [`Pool::wait_ready`].
    changed: tokio::sync::Notify,
}

/// One slot on one worker; dropping it gives the slot back.
pub struct Lease {
    /// `None` once disarmed (the slot was accounted for by other means).
    pool: Option<Arc<Pool>>,
    worker: u64,
    engine: Arc<dyn Engine>,
    acquired: Instant,
    /// Sequences running in the pool when this one started (itself included).
    running_at_start: usize,
    /// [`Inner::loads_started`] when it started, `None` if a worker was loading then.
    loads_at_start: Option<u64>,
    /// When its generation completed and the tokens it generated ([`Lease::completed`]); only
    /// completed ones are samples of the service curve.
    completed: Option<(Instant, u64)>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("worker", &self.worker)
            .finish_non_exhaustive()
    }
}

impl Lease {
    pub fn engine(&self) -> &Arc<dyn Engine> {
        &self.engine
    }

    pub fn worker(&self) -> u64 {
        self.worker
    }

    /// Says the generation on this slot completed now, having generated `tokens`: its service
    /// time is a sample of what the pool serves ([`crate::capacity`]). Failed or cancelled ones
    /// never say it.
    pub fn completed(&mut self, tokens: u64) {
        self.completed
            .get_or_insert_with(|| (Instant::now(), tokens));
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            let sample = self.completed.map(|(at, tokens)| Sample {
                at_start: self.running_at_start,
                loads_at_start: self.loads_at_start,
                held_s: (at - self.acquired).as_secs_f64(),
                tokens,
            });
            pool.release(self.worker, sample);
        }
    }
}

impl Pool {
    pub fn new(factory: Arc<dyn WorkerFactory>, budget: u64, queue_capacity: usize) -> Arc<Pool> {
        Arc::new(Pool {
            inner: Mutex::new(Inner {
                workers: Vec::new(),
                ledger: Ledger::new(budget),
                queue: PriorityQueue::new(queue_capacity),
                events: VecDeque::new(),
                events_total: 0,
                next_id: 1,
                stopped: false,
                slot_cap: None,
                sequence_cap: None,
                loads_started: 0,
                degraded: None,
                deaths: 0,
                measured_own: None,
                curve: ServiceCurve::default(),
            }),
            factory,
            epoch: Instant::now(),
            changed: tokio::sync::Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain counters behind: keep going.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Seconds since the pool started (the queue's clock).
    fn now(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    /// A slot on the least-loaded Ready worker, waiting up to `deadline` in `class`.
    pub async fn acquire(
        self: &Arc<Self>,
        class: Class,
        deadline: Duration,
    ) -> Result<Lease, AcquireError> {
        // A worker whose engine died while idle is found here, before anyone waits on it.
        self.check_health();
        let (tx, mut rx) = oneshot::channel();
        let ticket = {
            let mut inner = self.lock();
            if inner.stopped {
                return Err(AcquireError::Stopped);
            }
            if let Some(lease) = self.try_lease(&mut inner) {
                return Ok(lease);
            }
            let now = self.now();
            let rate = ready_slots(&inner) as f64;
            inner
                .queue
                .push(tx, class, now, now + deadline.as_secs_f64(), rate)
                .map_err(|(_, full)| AcquireError::QueueFull(full))?
        };
        // Leaves the queue if this future is dropped (client gone) or times out.
        let mut waiting = Waiting {
            pool: self,
            ticket: Some(ticket),
        };
        match tokio::time::timeout(deadline, &mut rx).await {
            Ok(Ok(lease)) => {
                waiting.ticket = None;
                Ok(lease)
            }
            Ok(Err(_)) => {
                waiting.ticket = None;
                Err(AcquireError::Stopped)
            }
            Err(_) => {
                let removed = waiting
                    .ticket
                    .take()
                    .and_then(|t| self.lock().queue.remove(t));
                if removed.is_none() {
                    // Handed a lease just as the deadline passed: use it.
                    if let Ok(lease) = rx.try_recv() {
                        return Ok(lease);
                    }
                }
                Err(AcquireError::DeadlineExceeded(deadline.as_secs_f64()))
            }
        }
    }

    fn try_lease(self: &Arc<Self>, inner: &mut Inner) -> Option<Lease> {
        if inner
            .sequence_cap
            .as_ref()
            .is_some_and(|(c, _)| running(inner) >= *c)
        {
            return None;
        }
        let cap = inner.slot_cap.unwrap_or(usize::MAX);
        let w = inner
            .workers
            .iter_mut()
            .filter(|w| w.state == WorkerState::Ready && w.busy < w.slots.min(cap))
            .filter(|w| w.engine.as_ref().is_some_and(|e| e.health().is_ok()))
            .min_by_key(|w| (w.busy, w.id))?;
        w.busy += 1;
        let (worker, engine) = (w.id, w.engine.clone()?);
        Some(Lease {
            pool: Some(self.clone()),
            worker,
            engine,
            acquired: Instant::now(),
            running_at_start: running(inner),
            loads_at_start: (!loading(inner)).then_some(inner.loads_started),
            completed: None,
        })
    }

    /// Hands free slots to waiting requests, most urgent first.
    fn dispatch(self: &Arc<Self>, inner: &mut Inner) {
        while !inner.queue.is_empty() {
            let Some(lease) = self.try_lease(inner) else {
                return;
            };
            let now = self.now();
            let Some((_, tx, _)) = inner.queue.pop(now) else {
                // Unreachable (the queue was not empty); give the slot back.
                let mut lease = lease;
                lease.pool = None;
                release_slot(inner, lease.worker);
                return;
            };
            if let Err(mut lease) = tx.send(lease) {
                // The waiter is gone: its slot goes to the next one (the lock is held here, so
                // the slot is returned directly rather than by the lease's drop).
                lease.pool = None;
                release_slot(inner, lease.worker);
            }
        }
    }

    /// Gives a slot back; `sample` is what a completed generation measured.
    fn release(self: &Arc<Self>, worker: u64, sample: Option<Sample>) {
        let dead = {
            let mut inner = self.lock();
            // Only a generation that no load overlapped measures the service.
            if let Some(s) =
                sample.filter(|s| s.loads_at_start == Some(inner.loads_started) && !loading(&inner))
            {
                let at_end = running(&inner);
                inner
                    .curve
                    .observe_span(s.at_start, at_end, s.held_s, s.tokens);
            }
            if let Some(stopped) = release_slot(&mut inner, worker) {
                self.stop_worker(&mut inner, stopped);
            }
            // A generation that just ended may have ended because the engine died.
            let dead = inner
                .workers
                .iter()
                .find(|w| w.id == worker)
                .and_then(|w| w.engine.as_ref())
                .and_then(|e| e.health().dead_reason());
            if dead.is_none() {
                self.dispatch(&mut inner);
            }
            dead
        };
        if let Some(why) = dead {
            self.worker_died(worker, &why);
        }
    }

    /// Takes out worker `id`, whose engine died, and starts a replacement. Running requests on
    /// it have already failed (their streams carried the engine's error); waiting ones go to
    /// the other workers.
    pub fn worker_died(self: &Arc<Self>, id: u64, why: &str) {
        let replace = {
            let mut inner = self.lock();
            let Some(pos) = inner.workers.iter().position(|w| w.id == id) else {
                return;
            };
            let w = inner.workers.remove(pos);
            inner.ledger.release(id);
            inner.deaths += 1;
            let replace =
                matches!(w.state, WorkerState::Ready | WorkerState::Loading) && !inner.stopped;
            self.event(
                &mut inner,
                Some(id),
                Some(w.state),
                Some(WorkerState::Stopped),
                format!(
                    "engine died: {why}{}",
                    if replace {
                        "; starting a replacement"
                    } else {
                        ""
                    }
                ),
            );
            let healthy = inner.workers.iter().any(|w| w.state == WorkerState::Ready);
            if !healthy {
                inner.degraded = Some(format!(
                    "worker {id}'s engine died ({why}); a replacement is loading"
                ));
            }
            if let Some(engine) = w.engine {
                std::thread::spawn(move || {
                    // An engine whose thread panicked may panic again on the way down.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(engine)));
                    crate::memory::return_freed_memory();
                });
            }
            self.dispatch(&mut inner);
            replace
        };
        if replace {
            if let Err(e) = self.add_worker(&format!("replacing worker {id}, whose engine died")) {
                let mut inner = self.lock();
                inner.degraded = Some(format!(
                    "worker {id}'s engine died ({why}) and no replacement fits: {e}"
                ));
            }
        }
    }

    /// Checks every Ready worker's engine; the dead ones are taken out and replaced.
    pub fn check_health(self: &Arc<Self>) {
        let dead: Vec<(u64, String)> = {
            let inner = self.lock();
            inner
                .workers
                .iter()
                .filter(|w| w.state == WorkerState::Ready)
                .filter_map(|w| {
                    let why = w.engine.as_ref()?.health().dead_reason()?;
                    Some((w.id, why))
                })
                .collect()
        };
        for (id, why) in dead {
            self.worker_died(id, &why);
        }
    }

    /// Probes every idle Ready worker's engine (a round trip through its thread) with
    /// `timeout`; one that fails or does not answer is taken out and replaced. Busy workers are
    /// left alone: their requests show whether they work.
    pub async fn probe_idle(self: &Arc<Self>, timeout: Duration) {
        let idle: Vec<(u64, Arc<dyn Engine>)> = {
            let inner = self.lock();
            inner
                .workers
                .iter()
                .filter(|w| w.state == WorkerState::Ready && w.busy == 0)
                .filter_map(|w| Some((w.id, w.engine.clone()?)))
                .collect()
        };
        for (id, engine) in idle {
            let why = match tokio::time::timeout(timeout, engine.probe()).await {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => format!("health probe failed: {e}"),
                Err(_) => format!(
                    "health probe did not answer within {:.0} s",
                    timeout.as_secs_f64()
                ),
            };
            self.worker_died(id, &why);
        }
    }

    /// Why the pool has no healthy worker, after one died.
    pub fn degraded(&self) -> Option<String> {
        self.lock().degraded.clone()
    }

    /// Workers whose engine died, since start.
    pub fn deaths(&self) -> u64 {
        self.lock().deaths
    }

    fn event(
        &self,
        inner: &mut Inner,
        worker: Option<u64>,
        from: Option<WorkerState>,
        to: Option<WorkerState>,
        message: String,
    ) {
        tracing::info!(worker, from = ?from, to = ?to, "{message}");
        let at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        inner.events_total += 1;
        inner.events.push_back(Event {
            at,
            worker,
            from,
            to,
            message,
        });
        while inner.events.len() > EVENT_CAPACITY {
            inner.events.pop_front();
        }
        self.changed.notify_waiters();
    }

    /// What the next worker reserves: the factory's estimate, with its own bytes as measured
    /// once a worker has loaded and its engine said.
    fn next_reservation(&self, inner: &Inner) -> Reservation {
        let mut r = self.factory.reservation();
        if let Some(m) = inner.measured_own {
            r.kv_cache = m.kv_cache;
            r.overhead = m.buffers;
        }
        r
    }

    /// Adds one worker: reserves its memory, then loads it in the background. Returns its id.
    pub fn add_worker(self: &Arc<Self>, reason: &str) -> Result<u64, DoesNotFit> {
        let id = {
            let mut inner = self.lock();
            let reservation = self.next_reservation(&inner);
            let id = inner.next_id;
            if let Err(e) = inner.ledger.try_reserve(id, reservation) {
                let msg = format!("worker not started ({reason}): {e}");
                self.event(&mut inner, None, None, None, msg);
                return Err(e);
            }
            inner.next_id += 1;
            inner.loads_started += 1;
            inner.workers.push(Worker {
                id,
                state: WorkerState::Loading,
                engine: None,
                slots: self.factory.slots(),
                busy: 0,
                started: Instant::now(),
            });
            self.event(
                &mut inner,
                Some(id),
                None,
                Some(WorkerState::Loading),
                format!("loading: {reason}"),
            );
            id
        };
        let pool = self.clone();
        let load = self.factory.load();
        tokio::spawn(async move {
            let started = Instant::now();
            let result = match std::panic::AssertUnwindSafe(load).catch_unwind().await {
                Ok(r) => r,
                Err(panic) => Err(EngineError::Internal(format!(
                    "the loader panicked: {}",
                    panic_message(&panic)
                ))),
            };
            let mut inner = pool.lock();
            let Some(pos) = inner.workers.iter().position(|w| w.id == id) else {
                return;
            };
            match result {
                Ok(engine) if inner.workers[pos].state == WorkerState::Loading => {
                    let mut msg = format!("ready in {:.2} s", started.elapsed().as_secs_f64());
                    if let Some(m) = engine.info().own_memory {
                        inner.ledger.true_up(id, m.kv_cache, m.buffers);
                        inner.measured_own = Some(m);
                        msg += &format!(
                            " (its own memory: KV cache {}, buffers {}{})",
                            crate::memory::human_bytes(m.kv_cache),
                            crate::memory::human_bytes(m.buffers),
                            if engine.info().shares_weights {
                                "; weights shared"
                            } else {
                                ""
                            }
                        );
                    }
                    inner.workers[pos].engine = Some(engine);
                    inner.workers[pos].state = WorkerState::Ready;
                    inner.degraded = None;
                    pool.event(
                        &mut inner,
                        Some(id),
                        Some(WorkerState::Loading),
                        Some(WorkerState::Ready),
                        msg,
                    );
                    pool.dispatch(&mut inner);
                }
                Ok(_) => {
                    // Drained while loading: it never served.
                    pool.stop_worker(&mut inner, id);
                }
                Err(e) => {
                    tracing::warn!(worker = id, "worker failed to load: {e}");
                    let msg = format!("load failed: {}", first_line(&e.to_string()));
                    if inner.degraded.is_some() {
                        inner.degraded = Some(format!("no healthy worker: worker {id} {msg}"));
                    }
                    pool.event(
                        &mut inner,
                        Some(id),
                        Some(WorkerState::Loading),
                        Some(WorkerState::Stopped),
                        msg,
                    );
                    inner.workers.remove(pos);
                    inner.ledger.release(id);
                }
            }
        });
        Ok(id)
    }

    /// Starts draining one worker (the least busy; a loading one first): it takes no new requests
    /// and stops when its last one finishes. Returns its id, or `None` when there is none.
    pub fn drain_worker(self: &Arc<Self>, reason: &str) -> Option<u64> {
        let mut inner = self.lock();
        let w = inner
            .workers
            .iter_mut()
            .filter(|w| matches!(w.state, WorkerState::Loading | WorkerState::Ready))
            .min_by_key(|w| {
                (
                    w.state == WorkerState::Ready,
                    w.busy,
                    std::cmp::Reverse(w.id),
                )
            })?;
        let (id, from, idle) = (w.id, w.state, w.busy == 0);
        w.state = WorkerState::Draining;
        self.event(
            &mut inner,
            Some(id),
            Some(from),
            Some(WorkerState::Draining),
            format!("draining: {reason}"),
        );
        if idle && from == WorkerState::Ready {
            self.stop_worker(&mut inner, id);
        }
        Some(id)
    }

    /// Removes a drained worker: drops its engine and gives back its reservation.
    fn stop_worker(&self, inner: &mut Inner, id: u64) {
        let Some(pos) = inner.workers.iter().position(|w| w.id == id) else {
            return;
        };
        let w = inner.workers.remove(pos);
        inner.ledger.release(id);
        self.event(
            inner,
            Some(id),
            Some(w.state),
            Some(WorkerState::Stopped),
            "stopped".into(),
        );
        if let Some(engine) = w.engine {
            // Shutting an engine down joins its threads: not under the pool's lock.
            std::thread::spawn(move || {
                drop(engine);
                crate::memory::return_freed_memory();
            });
        }
    }

    /// Waits until worker `id` is Ready; if it stops first (its load failed, or it was drained),
    /// says why, from its last event.
    pub async fn wait_ready(&self, id: u64) -> Result<(), String> {
        loop {
            // Registered before the check, so an event between the two is not missed.
            let changed = self.changed.notified();
            {
                let inner = self.lock();
                match inner.workers.iter().find(|w| w.id == id) {
                    Some(w) if w.state == WorkerState::Ready => return Ok(()),
                    Some(w) if w.state == WorkerState::Loading => {}
                    _ => {
                        return Err(inner
                            .events
                            .iter()
                            .rev()
                            .find(|e| e.worker == Some(id))
                            .map(|e| e.message.clone())
                            .unwrap_or_else(|| "the worker stopped".into()))
                    }
                }
            }
            changed.await;
        }
    }

    /// Some Ready worker's engine (for work that needs no slot, like counting tokens).
    pub fn any_engine(&self) -> Option<Arc<dyn Engine>> {
        self.lock()
            .workers
            .iter()
            .find(|w| w.state == WorkerState::Ready)
            .and_then(|w| w.engine.clone())
    }

    /// Admits at most `cap` concurrent requests per worker (`None`: each worker's own slots).
    /// Requests already running keep their slots; a raised cap serves waiting requests at once.
    pub fn set_slot_cap(self: &Arc<Self>, cap: Option<usize>) {
        let mut inner = self.lock();
        if inner.slot_cap != cap {
            inner.slot_cap = cap;
            self.dispatch(&mut inner);
        }
    }

    /// Runs at most `cap` sequences at once on all workers together, `why` being the reason
    /// (`None`: every free slot admits). Past the level where the machine was measured to serve
    /// no more, one more sequence running only makes every running one slower: a request
    /// waits in the queue instead (most urgent first) and then runs at full speed. Requests
    /// already running keep their slots; a raised cap serves waiting requests at once.
    pub fn set_sequence_cap(self: &Arc<Self>, cap: Option<(usize, String)>) {
        let cap = cap.map(|(n, why)| (n.max(1), why));
        let mut inner = self.lock();
        let changed = inner.sequence_cap.as_ref().map(|c| c.0) != cap.as_ref().map(|c| c.0);
        if changed {
            let message = match &cap {
                Some((1, why)) => format!("one sequence at a time: {why}"),
                Some((n, why)) => format!("at most {n} sequences at once: {why}"),
                None => "no cap on sequences at once".to_string(),
            };
            self.event(&mut inner, None, None, None, message);
        }
        // The reason's figures follow the curve; only a new count is an event.
        inner.sequence_cap = cap;
        if changed {
            self.dispatch(&mut inner);
        }
    }

    /// The cap [`Pool::set_sequence_cap`] set, with its reason.
    pub fn sequence_cap(&self) -> Option<(usize, String)> {
        self.lock().sequence_cap.clone()
    }

    /// Workers Loading or Ready (the count the policy steers).
    pub fn active_workers(&self) -> usize {
        self.lock()
            .workers
            .iter()
            .filter(|w| matches!(w.state, WorkerState::Loading | WorkerState::Ready))
            .count()
    }

    pub fn workers(&self) -> Vec<WorkerStatus> {
        let inner = self.lock();
        inner
            .workers
            .iter()
            .map(|w| WorkerStatus {
                id: w.id,
                state: w.state,
                slots_busy: w.busy,
                slots_total: inner.admits(w),
                reserved_bytes: inner.ledger.attributed(w.id),
                age_s: w.started.elapsed().as_secs_f64(),
                device: w.engine.as_ref().map(|e| e.info().device.name.clone()),
                backend: w.engine.as_ref().map(|e| e.info().backend),
                threads: w.engine.as_ref().and_then(|e| e.info().threads),
                kv_cache_bytes: inner.ledger.get(w.id).map_or(0, |r| r.kv_cache),
                buffer_bytes: inner.ledger.get(w.id).map_or(0, |r| r.overhead),
            })
            .collect()
    }

    pub fn queue_depth(&self, class: Class) -> usize {
        self.lock().queue.depth(class)
    }

    /// Events since start (the ring buffer keeps only the latest).
    pub fn events_total(&self) -> u64 {
        self.lock().events_total
    }

    pub fn events(&self) -> Vec<Event> {
        self.lock().events.iter().cloned().collect()
    }

    /// (budget, reserved) bytes.
    pub fn memory(&self) -> (u64, u64) {
        let inner = self.lock();
        (inner.ledger.budget(), inner.ledger.reserved())
    }

    /// What the pool serves at each number of running sequences, as measured so far (empty
    /// until enough generations have completed).
    pub fn throughput(&self) -> Throughput {
        self.lock().curve.throughput()
    }

    /// Slots per worker.
    pub fn slots_per_worker(&self) -> usize {
        self.factory.slots()
    }

    /// Bytes of weights reserved once for several workers.
    pub fn shared_weights(&self) -> u64 {
        self.lock().ledger.shared_weights()
    }

    /// How many workers the whole budget holds.
    pub fn budget_workers(&self) -> usize {
        let inner = self.lock();
        let r = self.next_reservation(&inner);
        inner.ledger.workers_that_fit(r)
    }

    /// Refuses new work and fails every waiter (shutdown); running leases finish.
    pub fn stop(&self) {
        let mut inner = self.lock();
        inner.stopped = true;
        let waiting = inner.queue.expire(f64::INFINITY);
        drop(waiting);
    }
}

pub use tidepool_engine::panic_message;

/// The first line of an error (a backtrace or a long cause chain stays in the log).
fn first_line(text: &str) -> &str {
    let line = text.lines().next().unwrap_or("");
    match line.char_indices().nth(300) {
        Some((end, _)) => &line[..end],
        None => line,
    }
}

/// What a completed generation measured, for the service curve.
struct Sample {
    /// Sequences running in the pool when it started (itself included).
    at_start: usize,
    loads_at_start: Option<u64>,
    held_s: f64,
    tokens: u64,
}

/// Whether a worker is loading.
fn loading(inner: &Inner) -> bool {
    inner
        .workers
        .iter()
        .any(|w| w.state == WorkerState::Loading)
}

/// Sequences running in the pool, on every worker.
fn running(inner: &Inner) -> usize {
    inner.workers.iter().map(|w| w.busy).sum()
}

/// Frees one slot of `worker`; returns its id if that drained it completely.
fn release_slot(inner: &mut Inner, worker: u64) -> Option<u64> {
    let w = inner.workers.iter_mut().find(|w| w.id == worker)?;
    w.busy = w.busy.saturating_sub(1);
    (w.state == WorkerState::Draining && w.busy == 0).then_some(w.id)
}

fn ready_slots(inner: &Inner) -> usize {
    inner
        .workers
        .iter()
        .filter(|w| w.state == WorkerState::Ready)
        .map(|w| inner.admits(w))
        .sum()
}

/// Removes a queued waiter when its future is dropped before it got a slot.
struct Waiting<'a> {
    pool: &'a Arc<Pool>,
    ticket: Option<Ticket>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.ticket.take() {
            self.pool.lock().queue.remove(t);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use parking_lot::Mutex;
    use tidepool_engine::fake::FakeEngine;

    use super::*;

    /// Fake workers the test can reach (to kill them).
    #[derive(Default)]
    struct Kept(Mutex<Vec<Arc<FakeEngine>>>);

    impl WorkerFactory for Arc<Kept> {
        fn reservation(&self) -> Reservation {
            Reservation {
                weights: 1,
                kv_cache: 0,
                overhead: 0,
                shared_weights: None,
            }
        }
        fn slots(&self) -> usize {
            2
        }
        fn load(&self) -> BoxFuture<'static, Result<Arc<dyn Engine>, EngineError>> {
            let kept = self.clone();
            Box::pin(async move {
                let e = Arc::new(FakeEngine::new(2, 4));
                kept.0.lock().push(e.clone());
                Ok(e as Arc<dyn Engine>)
            })
        }
    }

    #[tokio::test]
    async fn completed_generations_teach_the_pool_what_it_serves() {
        let kept = Arc::new(Kept::default());
        let pool = Pool::new(Arc::new(kept.clone()), 10, 8);
        for _ in 0..2 {
            let id = pool.add_worker("test").unwrap();
            pool.wait_ready(id).await.unwrap();
        }
        let lease = || pool.acquire(Class::Standard, Duration::from_secs(1));
        // Leases that never complete (failed, cancelled) teach nothing.
        for _ in 0..10 {
            drop(lease().await.unwrap());
        }
        assert!(pool.throughput().is_empty());
        // Two at a time, one on each worker, each completed: measured at two sequences in the
        // pool (the workers share the machine), not one per worker.
        for _ in 0..crate::capacity::MIN_SAMPLES {
            let (mut a, mut b) = (lease().await.unwrap(), lease().await.unwrap());
            assert_ne!(a.worker(), b.worker());
            a.completed(8);
            b.completed(8);
            // Each counts at the mean of the sequences running when it started and ended:
            // a (1 then 2) and b (2 then 1) both at two.
            drop(a);
            drop(b);
        }
        let t = pool.throughput();
        assert_eq!(t.points().len(), 1, "{t:?}");
        assert_eq!(t.points()[0].0, 2);
        assert!(t.points()[0].1 > 0.0);
        assert_eq!(pool.slots_per_worker(), 2);
        pool.stop();
    }

    #[tokio::test]
    async fn a_sequence_cap_queues_requests_past_it_and_a_raised_cap_serves_them() {
        let kept = Arc::new(Kept::default());
        let pool = Pool::new(Arc::new(kept.clone()), 10, 8);
        let id = pool.add_worker("test").unwrap();
        pool.wait_ready(id).await.unwrap();
        pool.set_sequence_cap(Some((1, "measured".into())));
        let first = pool
            .acquire(Class::Standard, Duration::from_secs(1))
            .await
            .unwrap();
        // The worker has a free slot, but the pool runs one sequence at a time: the next
        // request waits in the queue.
        let waiting = tokio::spawn({
            let pool = pool.clone();
            async move {
                pool.acquire(Class::Standard, Duration::from_secs(30))
                    .await
                    .map(|l| l.worker())
            }
        });
        while pool.queue_depth(Class::Standard) == 0 {
            tokio::task::yield_now().await;
        }
        assert!(matches!(
            pool.acquire(Class::Standard, Duration::from_millis(20))
                .await,
            Err(AcquireError::DeadlineExceeded(_))
        ));
        // Lifting the cap serves it at once, with the first still running.
        pool.set_sequence_cap(None);
        assert_eq!(waiting.await.unwrap().unwrap(), id);
        assert_eq!(pool.sequence_cap(), None);
        let said: Vec<String> = pool.events().into_iter().map(|e| e.message).collect();
        assert!(
            said.iter().any(|m| m == "one sequence at a time: measured"),
            "{said:?}"
        );
        drop(first);
        pool.stop();
    }

    #[tokio::test]
    async fn a_dead_engine_is_never_leased_and_is_replaced() {
        let kept = Arc::new(Kept::default());
        let pool = Pool::new(Arc::new(kept.clone()), 10, 8);
        let first = pool.add_worker("test").unwrap();
        pool.wait_ready(first).await.unwrap();
        kept.0.lock()[0].kill();
        // The next acquire finds it dead, takes it out, and waits for the replacement.
        let lease = pool
            .acquire(Class::Standard, Duration::from_secs(10))
            .await
            .expect("the replacement serves");
        assert_ne!(lease.worker(), first);
        assert_eq!(pool.deaths(), 1);
        assert!(pool
            .events()
            .iter()
            .any(|e| e.message.contains("engine died")));
        assert_eq!(pool.degraded(), None);
        assert_eq!(
            pool.memory().1,
            1,
            "the dead worker's reservation was released"
        );
    }

    #[tokio::test]
    async fn the_pool_is_degraded_while_no_replacement_fits() {
        let kept = Arc::new(Kept::default());
        // A budget of one worker: the replacement fits only once the dead one is released.
        let pool = Pool::new(Arc::new(kept.clone()), 1, 8);
        let first = pool.add_worker("test").unwrap();
        pool.wait_ready(first).await.unwrap();
        kept.0.lock()[0].kill();
        pool.check_health();
        let why = pool
            .degraded()
            .expect("degraded until the replacement is ready");
        assert!(why.contains("died"), "{why}");
        let second = pool.workers()[0].id;
        pool.wait_ready(second).await.unwrap();
        assert_eq!(pool.degraded(), None);
    }

    #[tokio::test]
    async fn a_panicking_loader_gives_its_reservation_back() {
        struct Panics;
        impl WorkerFactory for Panics {
            fn reservation(&self) -> Reservation {
                Reservation {
                    weights: 5,
                    kv_cache: 0,
                    overhead: 0,
                    shared_weights: None,
                }
            }
            fn slots(&self) -> usize {
                1
            }
            fn load(&self) -> BoxFuture<'static, Result<Arc<dyn Engine>, EngineError>> {
                Box::pin(async { panic!("a loader bug") })
            }
        }
        let pool = Pool::new(Arc::new(Panics), 10, 8);
        let id = pool.add_worker("test").unwrap();
        let why = pool.wait_ready(id).await.unwrap_err();
        assert!(why.contains("panicked"), "{why}");
        assert_eq!(pool.memory().1, 0);
    }
}
