//! The control loop: every tick, read the load signals (from the [`Scheduler`]) and the machine
//! (battery, heat), turn the machine into limits through the power [`Governor`], ask the
//! [`Policy`], and move the live [`Pool`] toward its answer (add workers that fit the budget,
//! drain the surplus). The limits that are not worker counts are applied here too: slots
//! admitted per worker, the CPU cores inference runs on, and refusing the batch class while the
//! machine is critically hot.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tidepool_sched::metrics::Snapshot;
use tidepool_sched::pool::Pool;
use tidepool_sched::queue::Class;
use tidepool_sched::scheduler::Scheduler;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::cpu_limit::CpuLimiter;
use crate::policy::{
    Capacity, Decision, MachineLimits, Override, Policy, PolicyConfig, PoolView, Signals,
};
use crate::power::{Governor, PowerConfig, PowerMode, PowerState, ThermalLevel};
use crate::signals::{Machine, MachineReading};

/// Seconds over which the arrival rate is averaged (the time constant of its moving average).
pub const RATE_WINDOW_S: f64 = 5.0;

/// The arrival rate's moving average after `dt` seconds in which requests arrived at `instant`
/// per second (what the loop computes every tick; `tidepool bench simulate` replays it).
pub fn smoothed_rate(rate: f64, instant: f64, dt: f64) -> f64 {
    let alpha = 1.0 - (-dt / RATE_WINDOW_S).exp();
    rate + alpha * (instant - rate)
}
/// Seconds of requests the p95 latency and TTFT signals cover.
const LATENCY_WINDOW_S: f64 = 30.0;
/// Finished requests a p95 needs before it counts as a signal.
const LATENCY_MIN_COUNT: u64 = 5;
/// How often idle workers' engines are probed, and how long a probe may take.
const PROBE_EVERY: Duration = Duration::from_secs(10);
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The running control loop's state, for /admin/status.
pub struct Autoscaler {
    /// Whose pool it steers, and whose counts it reads.
    scheduler: Arc<Scheduler>,
    /// Set by [`Autoscaler::stop`]: the loop ends at its next tick.
    stopped: AtomicBool,
    policy: Mutex<Policy>,
    state: Mutex<LoopState>,
    power: Mutex<PowerLoop>,
    /// The served model's idle expiry a request set (Ollama's `keep_alive`), if any: never
    /// written into the policy, never saved.
    keep_alive: Mutex<Option<KeepAlive>>,
    epoch: Instant,
}

/// How long a request asks the model to stay loaded after the last request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KeepAlive {
    /// Unload once idle (Ollama's `keep_alive: 0`).
    Unload,
    /// Stay loaded this long after the last request.
    For(Duration),
    /// Stay loaded (a negative `keep_alive`).
    Forever,
}

impl KeepAlive {
    /// Seconds after the last request, `INFINITY` for ever.
    pub fn seconds(self) -> f64 {
        match self {
            KeepAlive::Unload => 0.0,
            KeepAlive::For(d) => d.as_secs_f64(),
            KeepAlive::Forever => f64::INFINITY,
        }
    }
}

/// The machine side of the loop.
struct PowerLoop {
    machine: Machine,
    config: PowerConfig,
    governor: Governor,
    cpu: CpuLimiter,
    /// The CPU limit failed once (unsupported platform): said, not repeated.
    cpu_error_said: bool,
    reading: Option<MachineReading>,
    state: Option<PowerState>,
}

struct LoopState {
    last_tick: Instant,
    last_arrivals: u64,
    rate: f64,
    decision: Option<Decision>,
    signals: Signals,
    /// (time, latency buckets, TTFT buckets), oldest first, covering the latency window.
    histories: std::collections::VecDeque<(Instant, Snapshot, Snapshot)>,
}

impl Autoscaler {
    /// A control loop over `scheduler`'s pool, reading `machine` (real sources:
    /// [`Machine::real`]).
    pub fn new(
        scheduler: Arc<Scheduler>,
        config: PolicyConfig,
        power: PowerConfig,
        machine: Machine,
    ) -> Arc<Autoscaler> {
        Arc::new(Autoscaler {
            policy: Mutex::new(Policy::new(config)),
            power: Mutex::new(PowerLoop {
                machine,
                config: power,
                governor: Governor::new(),
                cpu: CpuLimiter::new(),
                cpu_error_said: false,
                reading: None,
                state: None,
            }),
            state: Mutex::new(LoopState {
                last_tick: Instant::now(),
                last_arrivals: scheduler.arrivals(),
                rate: 0.0,
                decision: None,
                signals: Signals::default(),
                histories: Default::default(),
            }),
            scheduler,
            stopped: AtomicBool::new(false),
            keep_alive: Mutex::new(None),
            epoch: Instant::now(),
        })
    }

    /// Runs ticks every `every` until [`Autoscaler::stop`].
    pub fn spawn(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_probe = Instant::now();
            loop {
                tokio::select! {
                    _ = interval.tick() => {}
                    // A request arrived with no worker running: start one now.
                    _ = this.scheduler.demand.notified() => {}
                }
                if this.stopped.load(Ordering::SeqCst) {
                    return;
                }
                this.tick();
                if last_probe.elapsed() >= PROBE_EVERY {
                    last_probe = Instant::now();
                    if let Some(pool) = this.pool() {
                        tokio::spawn(async move { pool.probe_idle(PROBE_TIMEOUT).await });
                    }
                }
            }
        })
    }

    /// Ends the loop (shutdown): workers stay as they are while running requests drain.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
    }

    /// One control step; `None` while no pool is served.
    pub fn tick(&self) -> Option<Decision> {
        // One pool for the whole tick, even if the served model is switched meanwhile.
        let pool = self.pool()?;
        // Dead engines are replaced before anything is decided.
        pool.check_health();
        let signals = {
            let mut st = self.state.lock();
            let now = Instant::now();
            let dt = now.duration_since(st.last_tick).as_secs_f64().max(1e-3);
            let arrivals = self.scheduler.arrivals();
            let instant = arrivals.saturating_sub(st.last_arrivals) as f64 / dt;
            st.rate = smoothed_rate(st.rate, instant, dt);
            st.last_tick = now;
            st.last_arrivals = arrivals;
            let m = &self.scheduler.metrics;
            let (lat_now, ttft_now) = (m.latency.snapshot(), m.ttft.snapshot());
            st.histories.push_back((now, lat_now, ttft_now));
            while st.histories.len() > 1
                && now.duration_since(st.histories[0].0).as_secs_f64() > LATENCY_WINDOW_S
            {
                st.histories.pop_front();
            }
            let (_, lat_then, ttft_then) = st.histories[0];
            let p95 = |then: &Snapshot, now: &Snapshot| {
                now.quantile_since(then, 0.95, LATENCY_MIN_COUNT)
                    .map(|s| s * 1000.0)
            };
            st.signals = Signals {
                arrival_rate: st.rate,
                queue_depth: Class::ALL.iter().map(|&c| pool.queue_depth(c)).sum(),
                in_flight: self.scheduler.in_flight(),
                p95_latency_ms: p95(&lat_then, &lat_now),
                p95_ttft_ms: p95(&ttft_then, &ttft_now),
                idle_s: self.scheduler.idle_for().map(|d| d.as_secs_f64()),
                minute_of_day: local_minute_of_day(),
            };
            st.signals.clone()
        };
        let limits = self.machine_tick(&pool);
        let view = PoolView {
            workers: pool.active_workers(),
            budget_workers: pool.budget_workers(),
            limits,
            keep_alive_s: self.keep_alive().map(KeepAlive::seconds),
            capacity: Some(Capacity {
                slots: pool.slots_per_worker(),
                throughput: pool.throughput(),
            }),
        };
        let current = view.workers;
        let (decision, saturation) = {
            let mut policy = self.policy.lock();
            let d = policy.tick(self.epoch.elapsed().as_secs_f64(), &signals, view);
            (d, policy.saturation().cloned())
        };
        // Past where more sequences stopped paying, requests queue instead of slowing the others
        // (the policy's settled point: it changes only once the curve has kept saying it).
        pool.set_sequence_cap(saturation.map(|s| (s.sequences, s.why)));
        let mut active = current;
        while active < decision.workers {
            if pool.add_worker(&decision.reason).is_err() {
                break;
            }
            active += 1;
        }
        while active > decision.workers {
            if pool.drain_worker(&decision.reason).is_none() {
                break;
            }
            active -= 1;
        }
        let mut st = self.state.lock();
        if st.decision.as_ref().map(|d| d.workers) != Some(decision.workers) {
            tracing::info!(workers = decision.workers, "{}", decision.reason);
        }
        st.decision = Some(decision.clone());
        Some(decision)
    }

    /// Reads the machine, updates the power state, applies the limits that are not worker counts
    /// (slots, CPU cores, shedding) and returns those that are, for the policy.
    fn machine_tick(&self, pool: &Arc<Pool>) -> MachineLimits {
        let mut p = self.power.lock();
        let reading = p.machine.read();
        let cfg = p.config.clone();
        let state = p.governor.update(&cfg, &reading);
        pool.set_slot_cap(state.slots_per_worker);
        match p.cpu.apply(state.cpu_threads) {
            Ok(_) => p.cpu_error_said = false,
            Err(e) if !p.cpu_error_said => {
                tracing::warn!("the power mode's CPU limit is not applied: {e}");
                p.cpu_error_said = true;
            }
            Err(_) => {}
        }
        let shed = state.shed.then(|| state.reason.clone());
        if shed != self.scheduler.shedding() {
            match &shed {
                Some(why) => tracing::warn!("shedding batch requests: {why}"),
                None => tracing::info!("no longer shedding batch requests"),
            }
            self.scheduler.set_shedding(shed);
        }
        if p.state.as_ref().map(|s| &s.reason) != Some(&state.reason) {
            tracing::info!(mode = %state.effective, "power: {}", state.reason);
        }
        let limits = MachineLimits {
            max_workers: state.max_workers,
            no_growth: state.no_growth,
            idle_ttl_s: state.idle_ttl_s,
            pause_schedule: state.pause_schedule,
            why: state.reason.clone(),
        };
        p.reading = Some(reading);
        p.state = Some(state);
        limits
    }

    /// The latest machine reading and the power state derived from it.
    pub fn machine(&self) -> (Option<MachineReading>, Option<PowerState>) {
        let p = self.power.lock();
        (p.reading.clone(), p.state.clone())
    }

    /// CPU cores inference may use now.
    pub fn cpu_cores(&self) -> usize {
        let p = self.power.lock();
        p.cpu.current().unwrap_or(p.cpu.cores())
    }

    pub fn power_config(&self) -> PowerConfig {
        self.power.lock().config.clone()
    }

    /// Replaces the power config (already validated) and applies it at once.
    pub fn set_power_config(&self, config: PowerConfig) -> Option<Decision> {
        self.power.lock().config = config;
        self.tick()
    }

    /// The latest decision and the signals it was made on.
    pub fn last(&self) -> (Option<Decision>, Signals) {
        let st = self.state.lock();
        (st.decision.clone(), st.signals.clone())
    }

    /// Holds the pool at `workers` for `ttl` (still within the memory budget), applied at once.
    pub fn set_override(&self, workers: usize, ttl: Duration) -> Option<Decision> {
        let until = self.epoch.elapsed().as_secs_f64()
            + ttl.as_secs_f64().min(tidepool_bounds::MAX_SECONDS);
        self.policy.lock().manual = Some(Override { workers, until });
        self.tick()
    }

    /// Sets (or with `None` clears) the served model's idle expiry from a request's
    /// `keep_alive`; a change applies at the next tick.
    pub fn set_keep_alive(&self, keep_alive: Option<KeepAlive>) {
        let mut k = self.keep_alive.lock();
        if std::mem::replace(&mut *k, keep_alive) != keep_alive {
            tracing::info!(?keep_alive, "the model's keep_alive, from a request");
        }
    }

    /// The idle expiry a request set, if any.
    pub fn keep_alive(&self) -> Option<KeepAlive> {
        *self.keep_alive.lock()
    }

    /// The pool it steers: the scheduler's live pool.
    pub fn pool(&self) -> Option<Arc<Pool>> {
        self.scheduler.pool()
    }

    /// Replaces the policy (already validated); the next tick uses it.
    pub fn set_config(&self, config: PolicyConfig) {
        self.policy.lock().set_config(config);
    }

    pub fn config(&self) -> PolicyConfig {
        self.policy.lock().config.clone()
    }
}

/// Minutes since local midnight (schedules are written in local time, the system's zone).
fn local_minute_of_day() -> u32 {
    let now = jiff::Zoned::now();
    (now.hour() as u32) * 60 + now.minute() as u32
}

/// Registers the power state's and the machine's metrics (mode, thermal level, battery, cores in
/// use, hottest sensor, free GPU memory), read from the control loop once it runs.
pub fn register(loop_: Arc<std::sync::OnceLock<Arc<Autoscaler>>>, registry: &mut Registry) {
    registry.register_collector(Box::new(PowerCollector(loop_)));
}

struct PowerCollector(Arc<std::sync::OnceLock<Arc<Autoscaler>>>);

impl std::fmt::Debug for PowerCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PowerCollector")
    }
}

impl Collector for PowerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(scaler) = self.0.get() else {
            return Ok(());
        };
        let (reading, power) = scaler.machine();
        let mut gauge = |name: &str, help: &str, v: f64| -> Result<(), std::fmt::Error> {
            ConstGauge::new(v).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Gauge,
            )?)
        };
        if let Some(power) = &power {
            let level = match power.thermal {
                ThermalLevel::Normal => 0.0,
                ThermalLevel::Warm => 1.0,
                ThermalLevel::Critical => 2.0,
            };
            gauge(
                "tidepool_thermal_level",
                "0 normal, 1 warm (not growing), 2 critical (shedding).",
                level,
            )?;
            gauge(
                "tidepool_on_battery",
                "1 when running on battery.",
                f64::from(u8::from(power.on_battery)),
            )?;
            gauge(
                "tidepool_cpu_cores_in_use",
                "CPU cores inference may run on under the power mode.",
                scaler.cpu_cores() as f64,
            )?;
        }
        if let Some(r) = &reading {
            if let Some(c) = r.max_celsius() {
                gauge(
                    "tidepool_max_celsius",
                    "The hottest CPU sensor or GPU.",
                    c.into(),
                )?;
            }
            if let Some(p) = r.battery.percent() {
                gauge("tidepool_battery_percent", "Battery charge.", p.into())?;
            }
        }
        if let Some(power) = &power {
            let mut modes = encoder.encode_descriptor(
                "tidepool_power_mode",
                "The power mode in force (1 for the effective mode).",
                None,
                MetricType::Gauge,
            )?;
            for m in PowerMode::ALL.into_iter().filter(|&m| m != PowerMode::Auto) {
                ConstGauge::new(i64::from(power.effective == m))
                    .encode(modes.encode_family(&[("mode", m.to_string())])?)?;
            }
        }
        if let Some(r) = reading.filter(|r| !r.gpus.gpus().is_empty()) {
            let mut free = encoder.encode_descriptor(
                "tidepool_gpu_free_bytes",
                "Free GPU memory.",
                None,
                MetricType::Gauge,
            )?;
            for g in r.gpus.gpus() {
                ConstGauge::new(g.free_bytes as i64)
                    .encode(free.encode_family(&[("gpu", g.index.to_string())])?)?;
            }
        }
        Ok(())
    }
}
