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
use crate::kv::ContextSizing;
use crate::ledger::{DoesNotFit, Ledger, Reservation};
use crate::queue::{Class, PriorityQueue, QueueFull, Ticket};

/// Events kept for /admin/events and the dashboard.
const EVENT_CAPACITY: usize = 256;

/// Makes workers: loads one engine instance and says what one reserves.
pub trait WorkerFactory: Send + Sync {
    /// Memory one worker holds while it runs, with `context` tokens of context per slot.
    fn reservation(&self, context: u32) -> Reservation;
    /// Concurrent sequences per worker (its admission limit).
    fn slots(&self) -> usize;
    /// The most context per slot a worker may get (the configured `context_tokens`).
    fn max_context(&self) -> u32;
    /// Loads one engine instance with `context` tokens of context per slot.
    fn load(&self, context: u32) -> BoxFuture<'static, Result<Arc<dyn Engine>, EngineError>>;
}

/// The workers of one model on one engine: what every pool in the application is made of (tests
/// make fakes of their own).
pub struct Workers {
    /// Its `context_tokens` is the most a worker gets per slot.
    pub spec: EngineSpec,
    /// A worker's reservation with `spec.context_tokens` per slot.
    pub reservation: Reservation,
}

impl WorkerFactory for Workers {
    fn reservation(&self, context: u32) -> Reservation {
        // The KV cache is linear in the context (bytes per token × tokens × slots).
        let full = u64::from(self.spec.context_tokens.max(1));
        Reservation {
            kv_cache: (u128::from(self.reservation.kv_cache) * u128::from(context)
                / u128::from(full)) as u64,
            ..self.reservation
        }
    }

    fn slots(&self) -> usize {
        self.spec.slots()
    }

    fn max_context(&self) -> u32 {
        self.spec.context_tokens
    }

    fn load(&self, context: u32) -> BoxFuture<'static, Result<Arc<dyn Engine>, EngineError>> {
        EngineSpec {
            context_tokens: context,
            ..self.spec.clone()
        }
        .load()
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
    /// Tokens of context each of its slots holds ([`crate::kv`]).
    pub context_tokens: u32,
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
    /// Tokens of context per slot: it serves only requests that need no more.
    context: u32,
    busy: usize,
    started: Instant,
}

impl Worker {
    /// Whether it may take new requests (or will once loaded).
    fn active(&self) -> bool {
        matches!(self.state, WorkerState::Loading | WorkerState::Ready)
    }
}

/// A request waiting for a slot: where to send its lease, and the context it needs.
struct Waiter {
    tx: oneshot::Sender<Lease>,
    need: u32,
}

struct Inner {
    workers: Vec<Worker>,
    ledger: Ledger,
    queue: PriorityQueue<Waiter>,
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
    /// What a loaded worker's engine reported it allocated beside the weights, by its context
    /// per slot: used instead of the factory's estimate for the next ones of that size.
    measured_own: std::collections::BTreeMap<u32, tidepool_engine::OwnMemory>,
    /// The context a new worker gets, from what recent requests needed.
    kv: ContextSizing,
    /// A worker is draining to make room for a larger one ([`Pool::make_room`]).
    making_room: bool,
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
                measured_own: Default::default(),
                kv: ContextSizing::fixed(factory.max_context()),
                making_room: false,
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

    /// A slot on the least-loaded Ready worker, waiting up to `deadline` in `class`, for a
    /// request that fits any worker's context.
    pub async fn acquire(
        self: &Arc<Self>,
        class: Class,
        deadline: Duration,
    ) -> Result<Lease, AcquireError> {
        self.acquire_for(class, deadline, 0).await
    }

    /// A slot on the least-loaded Ready worker whose context holds `need` tokens (the prompt and
    /// the answer), waiting up to `deadline` in `class`. When no worker holds that much, the
    /// smallest is replaced by one that does ([`crate::kv`]).
    pub async fn acquire_for(
        self: &Arc<Self>,
        class: Class,
        deadline: Duration,
        need: u32,
    ) -> Result<Lease, AcquireError> {
        // A worker whose engine died while idle is found here, before anyone waits on it.
        self.check_health();
        let (tx, mut rx) = oneshot::channel();
        let ticket = {
            let mut inner = self.lock();
            if inner.stopped {
                return Err(AcquireError::Stopped);
            }
            inner.kv.observe(need);
            let need = inner.kv.clamp_need(need);
            if let Some(lease) = self.try_lease(&mut inner, need) {
                return Ok(lease);
            }
            let now = self.now();
            let rate = ready_slots(&inner) as f64;
            let ticket = inner
                .queue
                .push(
                    Waiter { tx, need },
                    class,
                    now,
                    now + deadline.as_secs_f64(),
                    rate,
                )
                .map_err(|(_, full)| AcquireError::QueueFull(full))?;
            self.make_room(&mut inner);
            ticket
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

    /// A slot for a request that needs `need` tokens of context, if one is free now.
    fn try_lease(self: &Arc<Self>, inner: &mut Inner, need: u32) -> Option<Lease> {
        if inner
            .sequence_cap
            .as_ref()
            .is_some_and(|(c, _)| running(inner) >= *c)
        {
            return None;
        }
        let cap = inner.slot_cap.unwrap_or(usize::MAX);
        // The least busy worker that holds it; among those, the smallest context (the larger
        // ones stay free for the requests only they hold).
        let w = inner
            .workers
            .iter_mut()
            .filter(|w| w.state == WorkerState::Ready && w.busy < w.slots.min(cap))
            .filter(|w| w.context >= need)
            .filter(|w| w.engine.as_ref().is_some_and(|e| e.health().is_ok()))
            .min_by_key(|w| (w.busy, w.context, w.id))?;
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

    /// Hands free slots to waiting requests, most urgent first (a request that no free slot
    /// holds lets the next one through).
    fn dispatch(self: &Arc<Self>, inner: &mut Inner) {
        while !inner.queue.is_empty() {
            // The largest context a free slot holds now.
            let Some(free) = self.free_context(inner) else {
                return;
            };
            let now = self.now();
            let Some((_, waiter, _)) = inner.queue.pop_where(now, |w| w.need <= free) else {
                return;
            };
            let Some(lease) = self.try_lease(inner, waiter.need) else {
                // Unreachable (a free slot holds it); it waits again, at the back.
                drop(waiter);
                return;
            };
            if let Err(mut lease) = waiter.tx.send(lease) {
                // The waiter is gone: its slot goes to the next one (the lock is held here, so
                // the slot is returned directly rather than by the lease's drop).
                lease.pool = None;
                release_slot(inner, lease.worker);
            }
        }
    }

    /// The largest context per slot among workers with a slot free to lease now (under the
    /// caps), if any.
    fn free_context(&self, inner: &Inner) -> Option<u32> {
        if inner
            .sequence_cap
            .as_ref()
            .is_some_and(|(c, _)| running(inner) >= *c)
        {
            return None;
        }
        inner
            .workers
            .iter()
            .filter(|w| w.state == WorkerState::Ready && w.busy < inner.admits(w))
            .filter(|w| w.engine.as_ref().is_some_and(|e| e.health().is_ok()))
            .map(|w| w.context)
            .max()
    }

    /// When a waiting request needs more context than every worker holds, puts a worker that
    /// holds it in place of the smallest one: the new one is added if the budget allows, and
    /// the smallest drains (it finishes what it runs). When the budget holds the new one only
    /// without the smallest, the smallest drains first and the new one is added when it has
    /// stopped. With no worker at all, the control loop starts the first one, already sized
    /// for what waits.
    fn make_room(self: &Arc<Self>, inner: &mut Inner) {
        if inner.stopped || inner.kv.is_fixed() {
            return;
        }
        let largest = inner
            .workers
            .iter()
            .filter(|w| w.active())
            .map(|w| w.context)
            .max();
        let Some(need) = inner
            .queue
            .items()
            .map(|w| w.need)
            .filter(|&n| largest.is_none_or(|l| n > l))
            .max()
        else {
            inner.making_room = false;
            return;
        };
        if largest.is_none() && !inner.making_room {
            return;
        }
        let context = inner.kv.fitting(need).max(inner.kv.next());
        let why = format!(
            "a request needs {need} tokens of context; {}",
            match largest {
                Some(l) => format!("the workers hold {l} per slot"),
                None => "no worker holds it".to_string(),
            }
        );
        // The smallest active worker goes (of those, the least busy).
        let smallest = inner
            .workers
            .iter()
            .filter(|w| w.active())
            .min_by_key(|w| (w.context, w.busy, std::cmp::Reverse(w.id)))
            .map(|w| w.id);
        let reservation = self.next_reservation(inner, context);
        let need_bytes = inner.ledger.need(&reservation);
        if need_bytes <= inner.ledger.free() {
            if self.add_worker_locked(inner, context, &why).is_ok() {
                inner.making_room = false;
                if let Some(id) = smallest {
                    self.drain_locked(inner, id, &format!("replaced by a larger worker: {why}"));
                }
            }
            return;
        }
        if inner.making_room {
            // A worker is already draining to make room: wait for it to stop.
            return;
        }
        // Would the budget hold it without the smallest? Then that one gives its memory back
        // first; its replacement is added when it has stopped (see `stop_worker`).
        let without = |id: u64| {
            let mut ledger = inner.ledger.clone();
            ledger.release(id);
            (ledger.need(&reservation), ledger.free())
        };
        match smallest.map(|id| (id, without(id))) {
            Some((id, (need, free))) if need <= free => {
                inner.making_room = true;
                self.drain_locked(
                    inner,
                    id,
                    &format!("making room for a larger worker: {why}"),
                );
            }
            other => {
                let (need, free) = other.map_or((need_bytes, inner.ledger.free()), |(_, nf)| nf);
                let msg = format!(
                    "no larger worker fits the memory budget ({why}): it needs {} and {} is free",
                    crate::memory::human_bytes(need),
                    crate::memory::human_bytes(free),
                );
                if inner.events.back().is_none_or(|e| e.message != msg) {
                    self.event(inner, None, None, None, msg);
                }
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
    fn next_reservation(&self, inner: &Inner, context: u32) -> Reservation {
        let mut r = self.factory.reservation(context);
        if let Some(m) = inner.measured_own.get(&context) {
            r.kv_cache = m.kv_cache;
            r.overhead = m.buffers;
        }
        r
    }

    /// Adds one worker, with the context recent requests need: reserves its memory, then loads
    /// it in the background. Returns its id.
    pub fn add_worker(self: &Arc<Self>, reason: &str) -> Result<u64, DoesNotFit> {
        let mut inner = self.lock();
        // The context recent requests need; if the budget holds no worker that large, the
        // largest smaller one it holds (a request it does not hold waits for room).
        let mut context = inner.kv.next();
        while context > inner.kv.min() {
            let r = self.next_reservation(&inner, context);
            if inner.ledger.need(&r) <= inner.ledger.free() {
                break;
            }
            context = (context / 2).max(inner.kv.min());
        }
        self.add_worker_locked(&mut inner, context, reason)
    }

    /// Adds one worker of `context` tokens per slot (see [`Pool::add_worker`]).
    fn add_worker_locked(
        self: &Arc<Self>,
        inner: &mut Inner,
        context: u32,
        reason: &str,
    ) -> Result<u64, DoesNotFit> {
        let reservation = self.next_reservation(inner, context);
        let id = inner.next_id;
        if let Err(e) = inner.ledger.try_reserve(id, reservation) {
            let msg = format!("worker not started ({reason}): {e}");
            self.event(inner, None, None, None, msg);
            return Err(e);
        }
        inner.next_id += 1;
        inner.loads_started += 1;
        inner.workers.push(Worker {
            id,
            state: WorkerState::Loading,
            engine: None,
            slots: self.factory.slots(),
            context,
            busy: 0,
            started: Instant::now(),
        });
        let sized = if inner.kv.is_fixed() {
            String::new()
        } else {
            format!(" ({context} tokens of context per slot)")
        };
        self.event(
            inner,
            Some(id),
            None,
            Some(WorkerState::Loading),
            format!("loading{sized}: {reason}"),
        );
        let pool = self.clone();
        let load = self.factory.load(context);
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
                        inner.measured_own.insert(context, m);
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
        // Of the least busy, the one with the most context (it holds the most memory), then
        // the newest.
        let id = inner
            .workers
            .iter()
            .filter(|w| w.active())
            .min_by_key(|w| {
                (
                    w.state == WorkerState::Ready,
                    w.busy,
                    std::cmp::Reverse(w.context),
                    std::cmp::Reverse(w.id),
                )
            })?
            .id;
        self.drain_locked(&mut inner, id, reason);
        Some(id)
    }

    /// Starts draining worker `id` (stops it at once if it is idle).
    fn drain_locked(self: &Arc<Self>, inner: &mut Inner, id: u64, reason: &str) {
        let Some(w) = inner.workers.iter_mut().find(|w| w.id == id) else {
            return;
        };
        let (from, idle) = (w.state, w.busy == 0);
        w.state = WorkerState::Draining;
        self.event(
            inner,
            Some(id),
            Some(from),
            Some(WorkerState::Draining),
            format!("draining: {reason}"),
        );
        if idle && from == WorkerState::Ready {
            self.stop_worker(inner, id);
        }
    }

    /// Removes a drained worker: drops its engine and gives back its reservation.
    fn stop_worker(self: &Arc<Self>, inner: &mut Inner, id: u64) {
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
        // Its memory may be what a larger worker for a waiting request was waiting for.
        if tokio::runtime::Handle::try_current().is_ok() {
            self.make_room(inner);
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

    /// Sizes new workers' context between `min` and the factory's most tokens per slot, by what
    /// requests need ([`crate::kv`]); `min` at or above that most gives every worker the most.
    pub fn set_min_context(&self, min: u32) {
        let max = self.factory.max_context();
        self.lock().kv.set_range(min, max);
    }

    /// The context sizing: (least, most, what the next worker gets) tokens per slot.
    pub fn context_sizing(&self) -> (u32, u32, u32) {
        let inner = self.lock();
        (inner.kv.min(), inner.kv.max(), inner.kv.next())
    }

    /// The most tokens one request may use: the largest context a worker may get per slot.
    pub fn max_context(&self) -> u32 {
        self.factory.max_context()
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
                context_tokens: w.context,
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
        let r = self.next_reservation(&inner, inner.kv.next());
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

    use tidepool_engine::fake::FakeEngine;

    use super::*;
    use crate::fake::FakeWorkers;

    /// Workers whose reservation is one byte of weights (shared) and one byte per token of
    /// context (so the budget decides what fits).
    struct ByContext;

    impl WorkerFactory for ByContext {
        fn reservation(&self, context: u32) -> Reservation {
            Reservation {
                weights: 1,
                kv_cache: context.into(),
                overhead: 0,
                shared_weights: Some(7),
            }
        }
        fn slots(&self) -> usize {
            1
        }
        fn max_context(&self) -> u32 {
            4096
        }
        fn load(&self, _context: u32) -> BoxFuture<'static, Result<Arc<dyn Engine>, EngineError>> {
            Box::pin(async { Ok(Arc::new(FakeEngine::new(1, 4)) as Arc<dyn Engine>) })
        }
    }

    fn contexts(pool: &Pool) -> Vec<(WorkerState, u32)> {
        pool.workers()
            .into_iter()
            .map(|w| (w.state, w.context_tokens))
            .collect()
    }

    #[tokio::test]
    async fn workers_get_the_context_requests_need_and_a_longer_request_gets_a_larger_worker() {
        let kept = FakeWorkers::new(2, 4);
        let pool = Pool::new(kept.clone(), 10, 8);
        pool.set_min_context(256);
        // Short requests seen: the next worker holds them, not the configured 4096.
        for _ in 0..3 {
            let refused = pool
                .acquire_for(Class::Standard, Duration::from_millis(1), 100)
                .await;
            assert!(matches!(refused, Err(AcquireError::DeadlineExceeded(_))));
        }
        assert_eq!(pool.context_sizing(), (256, 4096, 256));
        let small = pool.add_worker("test").unwrap();
        pool.wait_ready(small).await.unwrap();
        assert_eq!(
            kept.contexts(),
            [256],
            "loaded with the context it was given"
        );
        let short = pool
            .acquire_for(Class::Standard, Duration::from_secs(5), 200)
            .await
            .unwrap();
        assert_eq!(short.worker(), small);
        // A request that needs 3000 tokens is never given the small worker's free slot: a
        // worker that holds it takes the small one's place, which drains.
        let long = pool
            .acquire_for(Class::Standard, Duration::from_secs(5), 3000)
            .await
            .unwrap();
        assert_ne!(long.worker(), small);
        assert_eq!(
            contexts(&pool),
            [(WorkerState::Draining, 256), (WorkerState::Ready, 4096)]
        );
        let said: Vec<String> = pool.events().into_iter().map(|e| e.message).collect();
        assert!(
            said.iter().any(|m| m
                .contains("a request needs 3000 tokens of context; the workers hold 256 per slot")),
            "{said:?}"
        );
        // The small worker finishes what it ran, then stops; the large one serves short ones too.
        drop(short);
        assert_eq!(contexts(&pool), [(WorkerState::Ready, 4096)]);
        drop(long);
        let again = pool
            .acquire_for(Class::Standard, Duration::from_secs(5), 100)
            .await
            .unwrap();
        assert_ne!(again.worker(), small);
        pool.stop();
    }

    #[tokio::test]
    async fn a_larger_worker_that_does_not_fit_beside_the_small_one_waits_for_its_memory() {
        // Room for the weights and 4096 + 255 tokens: a large worker alone, not beside the
        // small one.
        let pool = Pool::new(Arc::new(ByContext), 1 + 4096 + 255, 8);
        pool.set_min_context(256);
        pool.acquire_for(Class::Standard, Duration::from_millis(1), 100)
            .await
            .unwrap_err();
        let small = pool.add_worker("test").unwrap();
        pool.wait_ready(small).await.unwrap();
        let short = pool
            .acquire_for(Class::Standard, Duration::from_secs(5), 100)
            .await
            .unwrap();
        let long = tokio::spawn({
            let pool = pool.clone();
            async move {
                pool.acquire_for(Class::Standard, Duration::from_secs(10), 3000)
                    .await
                    .map(|l| (l.worker(), l))
            }
        });
        // It cannot be added beside the small one: the small one drains first.
        while pool.workers()[0].state != WorkerState::Draining {
            tokio::task::yield_now().await;
        }
        assert_eq!(contexts(&pool), [(WorkerState::Draining, 256)]);
        drop(short);
        let (id, lease) = long.await.unwrap().unwrap();
        assert_ne!(id, small);
        assert_eq!(contexts(&pool), [(WorkerState::Ready, 4096)]);
        assert_eq!(pool.memory().1, 1 + 4096);
        drop(lease);
        pool.stop();
    }

    #[tokio::test]
    async fn fixed_sizing_never_replaces_a_worker() {
        let kept = FakeWorkers::new(2, 4);
        let pool = Pool::new(kept.clone(), 10, 8);
        let id = pool.add_worker("test").unwrap();
        pool.wait_ready(id).await.unwrap();
        let lease = pool
            .acquire_for(Class::Standard, Duration::from_secs(5), 100_000)
            .await
            .unwrap();
        assert_eq!(
            lease.worker(),
            id,
            "a need above the context is clamped to it"
        );
        assert_eq!(kept.contexts(), [4096]);
        pool.stop();
    }

    #[tokio::test]
    async fn completed_generations_teach_the_pool_what_it_serves() {
        let kept = FakeWorkers::new(2, 4);
        let pool = Pool::new(kept.clone(), 10, 8);
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
        let kept = FakeWorkers::new(2, 4);
        let pool = Pool::new(kept.clone(), 10, 8);
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
        let kept = FakeWorkers::new(2, 4);
        let pool = Pool::new(kept.clone(), 10, 8);
        let first = pool.add_worker("test").unwrap();
        pool.wait_ready(first).await.unwrap();
        kept.engine(0).kill();
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
        let kept = FakeWorkers::new(2, 4);
        // A budget of one worker: the replacement fits only once the dead one is released.
        let pool = Pool::new(kept.clone(), 1, 8);
        let first = pool.add_worker("test").unwrap();
        pool.wait_ready(first).await.unwrap();
        kept.engine(0).kill();
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
            fn reservation(&self, _context: u32) -> Reservation {
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
            fn max_context(&self) -> u32 {
                4096
            }
            fn load(
                &self,
                _context: u32,
            ) -> BoxFuture<'static, Result<Arc<dyn Engine>, EngineError>> {
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
