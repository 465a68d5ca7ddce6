//! The control loop: every tick, read the load signals, ask the [`Policy`], and move the [`Pool`]
//! toward its answer (add workers that fit the budget, drain the surplus).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::metrics::windowed_quantile;
use crate::policy::{Decision, Override, Policy, PolicyConfig, PoolView, Signals};
use crate::pool::Pool;
use crate::queue::Class;
use crate::service::Service;

/// Seconds over which the arrival rate is averaged.
const RATE_WINDOW_S: f64 = 5.0;
/// Seconds of requests the p95 latency and TTFT signals cover.
const LATENCY_WINDOW_S: f64 = 30.0;
/// Finished requests a p95 needs before it counts as a signal.
const LATENCY_MIN_COUNT: u64 = 5;

/// The running control loop's state, for /admin/status.
pub struct Autoscaler {
    pool: Arc<Pool>,
    service: Arc<Service>,
    policy: Mutex<Policy>,
    state: Mutex<LoopState>,
    epoch: Instant,
}

struct LoopState {
    last_tick: Instant,
    last_arrivals: u64,
    rate: f64,
    decision: Option<Decision>,
    signals: Signals,
    /// (time, latency buckets, TTFT buckets), oldest first, covering the latency window.
    histories: std::collections::VecDeque<(Instant, [u64; 13], [u64; 13])>,
}

impl Autoscaler {
    pub fn new(pool: Arc<Pool>, service: Arc<Service>, config: PolicyConfig) -> Arc<Autoscaler> {
        Arc::new(Autoscaler {
            policy: Mutex::new(Policy::new(config)),
            state: Mutex::new(LoopState {
                last_tick: Instant::now(),
                last_arrivals: service.arrivals(),
                rate: 0.0,
                decision: None,
                signals: Signals::default(),
                histories: Default::default(),
            }),
            pool,
            service,
            epoch: Instant::now(),
        })
    }

    /// Runs ticks every `every` until the service shuts down.
    pub fn spawn(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                if this.service.is_shutting_down() {
                    return;
                }
                this.tick();
            }
        })
    }

    /// One control step.
    pub fn tick(&self) -> Decision {
        let signals = {
            let mut st = self.state.lock().unwrap();
            let now = Instant::now();
            let dt = now.duration_since(st.last_tick).as_secs_f64().max(1e-3);
            let arrivals = self.service.arrivals();
            let instant = (arrivals - st.last_arrivals) as f64 / dt;
            let alpha = 1.0 - (-dt / RATE_WINDOW_S).exp();
            st.rate += alpha * (instant - st.rate);
            st.last_tick = now;
            st.last_arrivals = arrivals;
            let m = &self.service.metrics;
            let (lat_now, ttft_now) = (m.latency.snapshot(), m.ttft.snapshot());
            st.histories.push_back((now, lat_now, ttft_now));
            while st.histories.len() > 1
                && now.duration_since(st.histories[0].0).as_secs_f64() > LATENCY_WINDOW_S
            {
                st.histories.pop_front();
            }
            let (_, lat_then, ttft_then) = st.histories[0];
            let p95 = |then: &[u64; 13], now: &[u64; 13]| {
                windowed_quantile(then, now, 0.95, LATENCY_MIN_COUNT).map(|s| s * 1000.0)
            };
            st.signals = Signals {
                arrival_rate: st.rate,
                queue_depth: Class::ALL.iter().map(|&c| self.pool.queue_depth(c)).sum(),
                in_flight: self.service.in_flight(),
                p95_latency_ms: p95(&lat_then, &lat_now),
                p95_ttft_ms: p95(&ttft_then, &ttft_now),
                idle_s: self.service.idle_for().map(|d| d.as_secs_f64()),
                minute_of_day: local_minute_of_day(),
            };
            st.signals.clone()
        };
        let view = PoolView {
            workers: self.pool.active_workers(),
            budget_workers: self.pool.budget_workers(),
            power_cap: None,
        };
        let decision =
            self.policy
                .lock()
                .unwrap()
                .tick(self.epoch.elapsed().as_secs_f64(), &signals, view);
        let mut active = view.workers;
        while active < decision.workers {
            if self.pool.add_worker(&decision.reason).is_err() {
                break;
            }
            active += 1;
        }
        while active > decision.workers {
            if self.pool.drain_worker(&decision.reason).is_none() {
                break;
            }
            active -= 1;
        }
        let mut st = self.state.lock().unwrap();
        if st.decision.as_ref().map(|d| d.workers) != Some(decision.workers) {
            tracing::info!(workers = decision.workers, "{}", decision.reason);
        }
        st.decision = Some(decision.clone());
        decision
    }

    /// The latest decision and the signals it was made on.
    pub fn last(&self) -> (Option<Decision>, Signals) {
        let st = self.state.lock().unwrap();
        (st.decision.clone(), st.signals.clone())
    }

    /// Holds the pool at `workers` for `ttl` (still within the memory budget), applied at once.
    pub fn set_override(&self, workers: usize, ttl: Duration) -> Decision {
        let until = self.epoch.elapsed().as_secs_f64() + ttl.as_secs_f64();
        self.policy.lock().unwrap().manual = Some(Override { workers, until });
        self.tick()
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Replaces the policy (already validated); the next tick uses it.
    pub fn set_config(&self, config: PolicyConfig) {
        self.policy.lock().unwrap().set_config(config);
    }

    pub fn config(&self) -> PolicyConfig {
        self.policy.lock().unwrap().config.clone()
    }
}

/// Minutes since local midnight (schedules are written in local time).
fn local_minute_of_day() -> u32 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as libc::time_t)
        .unwrap_or(0);
    // SAFETY: localtime_r writes only into the `tm` it is given.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !libc::localtime_r(&now, &mut tm).is_null() };
    if ok {
        (tm.tm_hour * 60 + tm.tm_min) as u32
    } else {
        ((now / 60) % (24 * 60)) as u32
    }
}
