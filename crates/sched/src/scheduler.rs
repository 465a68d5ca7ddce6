//! The scheduler's front: the one place a request is admitted, counted and given a slot.
//!
//! It holds the live pool (swapped when the served model changes, so the service and the control
//! loop always see the same one), counts what the control loop steers by (arrivals, the last
//! arrival, requests in flight, the request metrics), sheds the batch class while the machine is
//! critically hot, and hands out leases within the request deadline. The waiting line itself and
//! the running set are the [`Pool`]'s.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::metrics::Metrics;
use crate::pool::{AcquireError, Lease, Pool, WorkerState};
use crate::queue::Class;

/// The scheduler. Share it as `Arc<Scheduler>`.
pub struct Scheduler {
    pool: RwLock<Option<Arc<Pool>>>,
    arrivals: AtomicU64,
    last_arrival: Mutex<Option<Instant>>,
    in_flight: Arc<InFlight>,
    /// Why batch-class requests are refused now (critical heat), if they are.
    shedding: RwLock<Option<String>>,
    /// How long a request may wait for a slot.
    queue_deadline: RwLock<Duration>,
    /// Requests by outcome, tokens, latency and time to first token.
    pub metrics: Arc<Metrics>,
    /// Woken when a request arrives while no worker runs, so the control loop starts one now
    /// instead of at its next tick.
    pub demand: tokio::sync::Notify,
}

/// Requests admitted and not yet delivered, and a way to wait for them to end.
#[derive(Default)]
struct InFlight {
    count: AtomicUsize,
    changed: tokio::sync::Notify,
}

/// Counts one request as in flight until dropped (when its client has all of it, or left).
pub struct InFlightGuard(Arc<InFlight>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }
}

/// Why no slot was handed out.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AdmitError {
    /// No model is being served by a pool yet.
    #[error("no worker pool is running yet")]
    NoPool,
    /// The machine sheds this class (critical heat).
    #[error("{0}")]
    Shed(String),
    #[error(transparent)]
    Acquire(#[from] AcquireError),
}

impl Default for Scheduler {
    fn default() -> Self {
        Scheduler {
            pool: RwLock::new(None),
            arrivals: AtomicU64::new(0),
            last_arrival: Mutex::new(None),
            in_flight: Default::default(),
            shedding: RwLock::new(None),
            queue_deadline: RwLock::new(Duration::from_secs(30)),
            metrics: Default::default(),
            demand: tokio::sync::Notify::new(),
        }
    }
}

impl Scheduler {
    pub fn new() -> Arc<Scheduler> {
        Arc::new(Scheduler::default())
    }

    /// The live pool, once a model is served by one.
    pub fn pool(&self) -> Option<Arc<Pool>> {
        self.pool.read().clone()
    }

    /// Serves from `pool` from now on; returns the previous pool, which the caller drains.
    pub fn set_pool(&self, pool: Arc<Pool>) -> Option<Arc<Pool>> {
        self.pool.write().replace(pool)
    }

    /// Counts a request as arrived and in flight until the guard is dropped.
    pub fn admit(&self) -> InFlightGuard {
        self.arrivals.fetch_add(1, Ordering::Relaxed);
        *self.last_arrival.lock() = Some(Instant::now());
        self.in_flight.count.fetch_add(1, Ordering::SeqCst);
        let guard = InFlightGuard(self.in_flight.clone());
        if self.pool().is_some_and(|p| p.active_workers() == 0) {
            // Scaled to zero: the control loop starts a worker at once (it counts this
            // request in flight, so it sees demand even before the request is queued).
            self.demand.notify_one();
        }
        guard
    }

    /// A request counted in flight that did not arrive as a new request (a second generation
    /// of one request, such as a combined profile's reply).
    pub fn count_in_flight(&self) -> InFlightGuard {
        self.in_flight.count.fetch_add(1, Ordering::SeqCst);
        InFlightGuard(self.in_flight.clone())
    }

    /// A slot for a request of `class` that needs `need` tokens of context (prompt and
    /// answer), waiting up to the queue deadline.
    pub async fn lease(&self, class: Class, need: u32) -> Result<Lease, AdmitError> {
        if class == Class::Batch {
            if let Some(why) = self.shedding() {
                return Err(AdmitError::Shed(why));
            }
        }
        let pool = self.pool().ok_or(AdmitError::NoPool)?;
        Ok(pool.acquire_for(class, self.queue_deadline(), need).await?)
    }

    /// Requests admitted so far (a counter; the control loop derives the rate).
    pub fn arrivals(&self) -> u64 {
        self.arrivals.load(Ordering::Relaxed)
    }

    /// Time since the last request arrived, if any did.
    pub fn idle_for(&self) -> Option<Duration> {
        self.last_arrival.lock().map(|t| t.elapsed())
    }

    /// Requests admitted and not yet delivered.
    pub fn in_flight(&self) -> usize {
        self.in_flight.count.load(Ordering::SeqCst)
    }

    /// Waits until no request is in flight, or `timeout` passes; returns how many still are.
    pub async fn wait_idle(&self, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Registered before the check, so a change between the two is not missed.
            let changed = self.in_flight.changed.notified();
            if self.in_flight() == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.in_flight();
            }
        }
    }

    /// Refuses batch-class requests with `why` (`None`: accept them again).
    pub fn set_shedding(&self, why: Option<String>) {
        *self.shedding.write() = why;
    }

    pub fn shedding(&self) -> Option<String> {
        self.shedding.read().clone()
    }

    pub fn queue_deadline(&self) -> Duration {
        *self.queue_deadline.read()
    }

    pub fn set_queue_deadline(&self, d: Duration) {
        *self.queue_deadline.write() = d;
    }

    /// Requests waiting for a slot, all classes together.
    pub fn backlog(&self) -> usize {
        self.pool()
            .map_or(0, |p| Class::ALL.iter().map(|&c| p.queue_depth(c)).sum())
    }

    /// Registers the request metrics and the live pool's state (queue depth by class, workers
    /// by state, memory, events) in the application's registry.
    pub fn register(self: &Arc<Self>, registry: &mut Registry) {
        self.metrics.register(registry);
        registry.register_collector(Box::new(PoolCollector(self.clone())));
    }
}

/// The live pool's state, read at each scrape.
struct PoolCollector(Arc<Scheduler>);

impl std::fmt::Debug for PoolCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PoolCollector")
    }
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    ConstGauge::new(value as i64).encode(encoder.encode_descriptor(
        name,
        help,
        None,
        MetricType::Gauge,
    )?)
}

impl Collector for PoolCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        gauge(
            &mut encoder,
            "tidepool_in_flight",
            "Requests admitted and not yet delivered (running or waiting).",
            self.0.in_flight() as u64,
        )?;
        let Some(pool) = self.0.pool() else {
            return Ok(());
        };
        let mut queue = encoder.encode_descriptor(
            "tidepool_queue_depth",
            "Requests waiting for a slot, by class.",
            None,
            MetricType::Gauge,
        )?;
        for c in Class::ALL {
            ConstGauge::new(pool.queue_depth(c) as i64)
                .encode(queue.encode_family(&[("class", c.as_str())])?)?;
        }
        let workers = pool.workers();
        let mut by_state = encoder.encode_descriptor(
            "tidepool_workers",
            "Workers by state.",
            None,
            MetricType::Gauge,
        )?;
        for (state, name) in [
            (WorkerState::Loading, "loading"),
            (WorkerState::Ready, "ready"),
            (WorkerState::Draining, "draining"),
        ] {
            let n = workers.iter().filter(|w| w.state == state).count();
            ConstGauge::new(n as i64).encode(by_state.encode_family(&[("state", name)])?)?;
        }
        let (budget, reserved) = pool.memory();
        gauge(
            &mut encoder,
            "tidepool_memory_budget_bytes",
            "What workers may reserve in all.",
            budget,
        )?;
        gauge(
            &mut encoder,
            "tidepool_memory_reserved_bytes",
            "What running workers reserve.",
            reserved,
        )?;
        crate::metrics::encode_counter(
            &mut encoder,
            "tidepool_pool_events",
            "Worker and scaling events since start.",
            pool.events_total(),
        )?;
        crate::metrics::encode_counter(
            &mut encoder,
            "tidepool_engine_deaths",
            "Workers taken out because their engine died.",
            pool.deaths(),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::fake::FakeWorkers;

    #[tokio::test]
    async fn admits_counts_sheds_and_leases_from_the_live_pool() {
        let s = Scheduler::new();
        assert_eq!(
            s.lease(Class::Standard, 1).await.unwrap_err(),
            AdmitError::NoPool
        );
        let pool = Pool::new(FakeWorkers::new(1, 4), 10, 4);
        let id = pool.add_worker("test").unwrap();
        pool.wait_ready(id).await.unwrap();
        assert!(s.set_pool(pool.clone()).is_none());
        let guard = s.admit();
        assert_eq!((s.arrivals(), s.in_flight()), (1, 1));
        let lease = s.lease(Class::Standard, 1).await.unwrap();
        assert_eq!(lease.worker(), id);
        s.set_shedding(Some("critical heat".into()));
        assert_eq!(
            s.lease(Class::Batch, 1).await.unwrap_err(),
            AdmitError::Shed("critical heat".into())
        );
        drop(lease);
        drop(guard);
        assert_eq!(s.wait_idle(Duration::from_secs(1)).await, 0);
        // A new pool replaces the old one for everyone.
        let other = Pool::new(FakeWorkers::new(1, 4), 10, 4);
        let old = s.set_pool(other.clone()).unwrap();
        assert!(Arc::ptr_eq(&old, &pool));
        assert!(Arc::ptr_eq(&s.pool().unwrap(), &other));
    }
}
