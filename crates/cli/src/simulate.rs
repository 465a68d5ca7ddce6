//! `tidepool bench simulate`: a trace replayed through the real policy against a service model,
//! for machines we do not have.
//!
//! The model is what `scripts/bench-elastic.sh` measures on a machine: the seconds one request
//! takes while `n` sequences run on the machine ([`ServiceModel`], processor sharing: every
//! running request progresses at `1 / T(n)` of its work per second), the share of it before the
//! first token, how long a worker takes to start (weights resident, or from zero), and the memory
//! a worker reserves. A simulated pool of workers and slots serves the trace's arrivals (evenly
//! spaced, as `bench load` sends them); every second the real [`Policy`] ticks with the signals
//! the real control loop computes (the arrival rate's moving average, queue, in flight, p95
//! latency and TTFT over 30 s) and the capacity the real [`ServiceCurve`] learns from the
//! simulated completions, and its decision is applied as the autoscaler applies it. The result
//! has the columns of `bench load`, so a simulated run can be checked against a real one.
//! Everything here is pure and deterministic; [`run`] only parses and prints.

use clap::Args;
use serde::Serialize;
use tidepool_control::autoscale::smoothed_rate;
use tidepool_control::policy::{Capacity, Policy, PolicyConfig, PoolView, Signals};
use tidepool_sched::capacity::ServiceCurve;

use crate::load::Shape;
use crate::stats::percentile;

/// Seconds per simulation step.
const DT: f64 = 0.01;
/// The control loop's tick, and its windows (as `crates/control/src/autoscale.rs`).
const TICK_S: f64 = 1.0;
const LATENCY_WINDOW_S: f64 = 30.0;
const LATENCY_MIN_COUNT: usize = 5;

/// What a machine does with a model: measured there, or taken from published figures.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceModel {
    /// (sequences running on the machine, seconds one request takes then), ascending.
    pub curve: Vec<(usize, f64)>,
    /// Share of a request's service before its first token.
    pub ttft_fraction: f64,
    /// Seconds from a scale-up decision to a Ready worker, with the weights resident.
    pub load_s: f64,
    /// ... and from zero (the weights not loaded).
    pub cold_load_s: f64,
    pub weights_bytes: u64,
    /// Whether the workers of the model share one copy of the weights.
    pub shared_weights: bool,
    pub kv_bytes_per_slot: u64,
    pub buffer_bytes: u64,
}

impl ServiceModel {
    /// Seconds one request takes while `n` sequences run: interpolated between the measured
    /// points; past the last one, throughput grows no more (time grows with `n`).
    pub fn service_s(&self, n: usize) -> f64 {
        let n = n.max(1) as f64;
        let c = &self.curve;
        let (first, last) = (c[0], c[c.len() - 1]);
        if n <= first.0 as f64 {
            return first.1;
        }
        if n >= last.0 as f64 {
            return last.1 * n / last.0 as f64;
        }
        for w in c.windows(2) {
            let ((n0, t0), (n1, t1)) = (w[0], w[1]);
            if n <= n1 as f64 {
                let f = (n - n0 as f64) / (n1 - n0) as f64;
                return t0 + f * (t1 - t0);
            }
        }
        last.1
    }

    fn reserved(&self, workers: &[SimWorker]) -> u64 {
        if workers.is_empty() {
            return 0;
        }
        let weights = if self.shared_weights {
            self.weights_bytes
        } else {
            self.weights_bytes * workers.len() as u64
        };
        weights
            + workers
                .iter()
                .map(|w| self.buffer_bytes + self.kv_bytes_per_slot * w.slots as u64)
                .sum::<u64>()
    }
}

/// A pool to simulate: `min..=max` workers of `slots` each (`min == max`: fixed).
#[derive(Debug, Clone, PartialEq)]
pub struct PoolShape {
    pub label: String,
    pub slots: usize,
    pub min: usize,
    pub max: usize,
}

impl std::str::FromStr for PoolShape {
    type Err = String;

    /// `WxS` (W workers of S slots, fixed) or `elastic:MIN-MAX:S`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("`{s}`: expected WxS (e.g. 1x4) or elastic:MIN-MAX:S (e.g. elastic:1-3:2)");
        let num = |v: &str| -> Result<usize, String> {
            v.parse::<usize>()
                .ok()
                .filter(|n| (1..=1024).contains(n) || v == "0")
                .ok_or_else(bad)
        };
        if let Some(rest) = s.strip_prefix("elastic:") {
            let (range, slots) = rest.split_once(':').ok_or_else(bad)?;
            let (lo, hi) = range.split_once('-').ok_or_else(bad)?;
            let (min, max, slots) = (num(lo)?, num(hi)?, num(slots)?);
            if min > max || max == 0 || slots == 0 {
                return Err(bad());
            }
            return Ok(PoolShape {
                label: format!("elastic-{min}-{max}"),
                slots,
                min,
                max,
            });
        }
        let (w, sl) = s.split_once('x').ok_or_else(bad)?;
        let (w, slots) = (num(w)?, num(sl)?);
        if w == 0 || slots == 0 {
            return Err(bad());
        }
        Ok(PoolShape {
            label: s.to_string(),
            slots,
            min: w,
            max: w,
        })
    }
}

#[derive(Debug, Clone)]
struct SimWorker {
    id: u64,
    slots: usize,
    /// Ready at this time (loading until then).
    ready_at: f64,
    draining: bool,
}

#[derive(Debug, Clone)]
struct Running {
    arrived: f64,
    admitted: f64,
    worker: u64,
    /// Work left (1 at the start).
    left: f64,
    first_token: Option<f64>,
    /// Sequences on the machine when it started.
    running_at_start: usize,
}

/// What one simulated run gives (the columns of `bench load`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SimResult {
    pub label: String,
    pub requests: usize,
    pub errors: usize,
    pub latency_p50_s: f64,
    pub latency_p95_s: f64,
    pub ttft_p50_s: f64,
    pub ttft_p95_s: f64,
    pub reserved_gib_s: f64,
    pub transitions: usize,
    /// Ready workers, one sample a second.
    pub workers_over_time: Vec<usize>,
}

/// Replays `rates` (requests per second, `step_s` each) against `pool` on `model`, with the
/// policy `base` (its min and max replaced by the pool's); requests waiting longer than
/// `deadline_s` fail.
pub fn simulate(
    model: &ServiceModel,
    pool: &PoolShape,
    base: &PolicyConfig,
    rates: &[f64],
    step_s: f64,
    deadline_s: f64,
) -> SimResult {
    let mut cfg = base.clone();
    cfg.min_workers = pool.min;
    cfg.max_workers = pool.max;
    let mut policy = Policy::new(cfg);
    let mut curve = ServiceCurve::default();
    let arrivals = arrival_times(rates, step_s);
    let end_of_trace = rates.len() as f64 * step_s;

    let mut next_id = 1u64;
    let mut workers: Vec<SimWorker> = Vec::new();
    for _ in 0..pool.min {
        workers.push(SimWorker {
            id: next_id,
            slots: pool.slots,
            ready_at: 0.0,
            draining: false,
        });
        next_id += 1;
    }
    let mut queue: std::collections::VecDeque<f64> = Default::default();
    let mut running: Vec<Running> = Vec::new();
    // (finished at, latency, ttft)
    let mut done: Vec<(f64, f64, f64)> = Vec::new();
    let mut errors = 0usize;
    let mut next_arrival = 0usize;
    let (mut rate, mut last_tick, mut arrived_since_tick) = (0.0f64, 0.0f64, 0usize);
    let mut last_arrival: Option<f64> = None;
    let mut reserved_gib_s = 0.0;
    let mut workers_over_time = Vec::new();
    let gib = (1u64 << 30) as f64;

    let mut t = 0.0f64;
    let mut step = 0u64;
    loop {
        // Arrivals.
        while next_arrival < arrivals.len() && arrivals[next_arrival] <= t {
            queue.push_back(arrivals[next_arrival]);
            last_arrival = Some(arrivals[next_arrival]);
            arrived_since_tick += 1;
            next_arrival += 1;
        }
        // Deadlines.
        while queue.front().is_some_and(|&a| t - a > deadline_s) {
            queue.pop_front();
            errors += 1;
        }
        // Admission: the least-loaded Ready worker with a free slot.
        while !queue.is_empty() {
            let busy = |id: u64| on_worker(&running, id);
            let Some(w) = workers
                .iter()
                .filter(|w| !w.draining && w.ready_at <= t && busy(w.id) < w.slots)
                .min_by_key(|w| (busy(w.id), w.id))
            else {
                break;
            };
            // The curve counts every sequence on the machine, as the pool's does.
            let (id, at_start) = (w.id, running.len() + 1);
            let arrived = queue.pop_front().unwrap_or(t);
            running.push(Running {
                arrived,
                admitted: t,
                worker: id,
                left: 1.0,
                first_token: None,
                running_at_start: at_start,
            });
        }
        // Service: processor sharing over every running sequence on the machine.
        let n = running.len();
        if n > 0 {
            let progress = DT / model.service_s(n);
            for r in running.iter_mut() {
                r.left -= progress;
                if r.first_token.is_none() && 1.0 - r.left >= model.ttft_fraction {
                    r.first_token = Some(t + DT);
                }
            }
        }
        let mut i = 0;
        while i < running.len() {
            if running[i].left <= 1e-12 {
                let r = running.swap_remove(i);
                let end = t + DT;
                let at_end = running.len() + 1;
                // Every simulated request generates the same answer.
                curve.observe_span(r.running_at_start, at_end, end - r.admitted, 1);
                done.push((
                    end,
                    end - r.arrived,
                    r.first_token.unwrap_or(end) - r.arrived,
                ));
            } else {
                i += 1;
            }
        }
        // Drained workers stop when idle.
        workers.retain(|w| !w.draining || running.iter().any(|r| r.worker == w.id));
        reserved_gib_s += model.reserved(&workers) as f64 / gib * DT;

        // The control loop's tick.
        if t - last_tick >= TICK_S - 1e-9 {
            let dt = t - last_tick;
            let instant = arrived_since_tick as f64 / dt;
            rate = smoothed_rate(rate, instant, dt);
            arrived_since_tick = 0;
            last_tick = t;
            let recent: Vec<&(f64, f64, f64)> = done
                .iter()
                .filter(|d| d.0 >= t - LATENCY_WINDOW_S)
                .collect();
            let p95 = |pick: fn(&(f64, f64, f64)) -> f64| {
                (recent.len() >= LATENCY_MIN_COUNT).then(|| {
                    let mut v: Vec<f64> = recent.iter().map(|d| pick(d)).collect();
                    percentile(&mut v, 0.95) * 1000.0
                })
            };
            let signals = Signals {
                arrival_rate: rate,
                queue_depth: queue.len(),
                in_flight: queue.len() + running.len(),
                p95_latency_ms: p95(|d| d.1),
                p95_ttft_ms: p95(|d| d.2),
                idle_s: last_arrival.map(|a| t - a),
                minute_of_day: 12 * 60,
            };
            let active: Vec<&SimWorker> = workers.iter().filter(|w| !w.draining).collect();
            let view = PoolView {
                workers: active.len(),
                budget_workers: usize::MAX,
                limits: Default::default(),
                keep_alive_s: None,
                capacity: Some(Capacity {
                    slots: pool.slots,
                    throughput: curve.throughput(),
                }),
            };
            let current = view.workers;
            let decision = policy.tick(t, &signals, view);
            if decision.workers > current {
                // A worker of an engine that shares weights, while another holds them, only
                // makes its context; otherwise the weights load (from zero, or per worker).
                let load = if model.shared_weights && !workers.is_empty() {
                    model.load_s
                } else {
                    model.cold_load_s
                };
                for _ in current..decision.workers {
                    workers.push(SimWorker {
                        id: next_id,
                        slots: pool.slots,
                        ready_at: t + load,
                        draining: false,
                    });
                    next_id += 1;
                }
            } else if decision.workers < current {
                for _ in decision.workers..current {
                    // The least busy (a loading one first), as the pool drains.
                    let busy = |id: u64| on_worker(&running, id);
                    if let Some(w) = workers
                        .iter_mut()
                        .filter(|w| !w.draining)
                        .min_by_key(|w| (w.ready_at <= t, busy(w.id), std::cmp::Reverse(w.id)))
                    {
                        w.draining = true;
                    }
                }
                workers.retain(|w| !w.draining || running.iter().any(|r| r.worker == w.id));
            }
            workers_over_time.push(
                workers
                    .iter()
                    .filter(|w| !w.draining && w.ready_at <= t)
                    .count(),
            );
        }

        step += 1;
        t = step as f64 * DT;
        let finished = next_arrival >= arrivals.len() && queue.is_empty() && running.is_empty();
        if (finished && t >= end_of_trace) || t > end_of_trace + deadline_s + 3600.0 {
            break;
        }
    }
    let mut latency: Vec<f64> = done.iter().map(|d| d.1).collect();
    let mut ttft: Vec<f64> = done.iter().map(|d| d.2).collect();
    SimResult {
        label: pool.label.clone(),
        requests: arrivals.len(),
        errors,
        latency_p50_s: percentile(&mut latency, 0.5),
        latency_p95_s: percentile(&mut latency, 0.95),
        ttft_p50_s: percentile(&mut ttft, 0.5),
        ttft_p95_s: percentile(&mut ttft, 0.95),
        reserved_gib_s,
        transitions: workers_over_time
            .windows(2)
            .filter(|p| p[0] != p[1])
            .count(),
        workers_over_time,
    }
}

/// Sequences running on worker `id`.
fn on_worker(running: &[Running], id: u64) -> usize {
    running.iter().filter(|r| r.worker == id).count()
}

/// Arrival times: evenly spaced within each step, as `bench load` sends them.
fn arrival_times(rates: &[f64], step_s: f64) -> Vec<f64> {
    let mut out = Vec::new();
    let mut at = 0.0;
    for (i, &rate) in rates.iter().enumerate() {
        let end = (i + 1) as f64 * step_s;
        if rate <= 0.0 {
            at = end;
            continue;
        }
        while at < end {
            out.push(at);
            at += 1.0 / rate;
        }
    }
    out
}

#[derive(Args)]
pub struct SimulateArgs {
    /// Seconds one request takes while N sequences run on the machine: `N:SECONDS,...`
    /// (from `tidepool bench capacity` at each concurrency N: N / its req/s).
    #[arg(long)]
    service: String,
    /// Share of a request's service before its first token.
    #[arg(long, default_value_t = 0.1)]
    ttft_fraction: f64,
    /// Seconds to a Ready worker with the weights resident.
    #[arg(long, default_value_t = 0.1)]
    load_s: f64,
    /// Seconds to a Ready worker from zero.
    #[arg(long, default_value_t = 1.0)]
    cold_load_s: f64,
    #[arg(long, default_value_t = 100)]
    weights_mib: u64,
    /// Workers share one copy of the weights (llama.cpp).
    #[arg(long)]
    shared_weights: bool,
    #[arg(long, default_value_t = 8)]
    kv_mib_per_slot: u64,
    /// What a slot of an elastic pool's worker reserves, whose context is sized by the
    /// requests (`[pool] min_context_tokens`); default: `--kv-mib-per-slot`.
    #[arg(long)]
    elastic_kv_mib_per_slot: Option<u64>,
    #[arg(long, default_value_t = 20)]
    buffers_mib: u64,
    /// Pools to simulate: WxS (fixed) or elastic:MIN-MAX:S.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1x1,1x2,1x4,1x8,3x2,elastic:1-3:2"
    )]
    pools: Vec<PoolShape>,
    #[arg(long, default_value = "ramp")]
    shape: Shape,
    /// The trace's peak, requests per second.
    #[arg(long)]
    peak_rps: f64,
    #[arg(long, default_value_t = 20.0)]
    step_s: f64,
    /// A waiting request fails after this long (the benchmark servers' queue deadline).
    #[arg(long, default_value_t = 120.0)]
    deadline_s: f64,
    /// The elastic policy's rules (the benchmark servers' by default): `up.window_s`,
    /// `up.queue_per_worker`, `up.utilization`, `down.stabilization_s`.
    #[arg(long, default_value_t = 3.0)]
    up_window_s: f64,
    #[arg(long, default_value_t = 4)]
    queue_per_worker: usize,
    #[arg(long, default_value_t = 0.85)]
    utilization: f64,
    #[arg(long, default_value_t = 15.0)]
    stabilization_s: f64,
    /// One JSON object per pool instead of a table.
    #[arg(long)]
    json: bool,
}

/// Parses `N:SECONDS,...` into an ascending curve.
fn parse_curve(s: &str) -> anyhow::Result<Vec<(usize, f64)>> {
    let mut c = Vec::new();
    for part in s.split(',') {
        let (n, t) = part
            .split_once(':')
            .ok_or_else(|| anyhow::anyhow!("--service: `{part}` is not N:SECONDS"))?;
        let n: usize = n.trim().parse()?;
        let t: f64 = t.trim().parse()?;
        anyhow::ensure!(
            (1..=4096).contains(&n) && t.is_finite() && t > 0.0 && t <= 86_400.0,
            "--service: `{part}`: N must be 1 to 4096 and SECONDS above 0 and at most 86400"
        );
        c.push((n, t));
    }
    c.sort_by_key(|p| p.0);
    c.dedup_by_key(|p| p.0);
    anyhow::ensure!(!c.is_empty(), "--service needs at least one point");
    Ok(c)
}

pub fn run(a: SimulateArgs) -> anyhow::Result<()> {
    let check = |name: &str, v: f64, lo: f64, hi: f64| {
        anyhow::ensure!(
            v.is_finite() && v >= lo && v <= hi,
            "--{name} must be {lo} to {hi}, got {v}"
        );
        Ok(())
    };
    check("ttft-fraction", a.ttft_fraction, 0.0, 1.0)?;
    check("load-s", a.load_s, 0.0, 3600.0)?;
    check("cold-load-s", a.cold_load_s, 0.0, 3600.0)?;
    check("peak-rps", a.peak_rps, 1e-6, 10_000.0)?;
    check("step-s", a.step_s, 1.0, 86_400.0)?;
    check("deadline-s", a.deadline_s, 1.0, 86_400.0)?;
    let mib = |m: u64| -> anyhow::Result<u64> {
        anyhow::ensure!(m <= 1 << 24, "memory sizes must be at most 16 TiB");
        Ok(m << 20)
    };
    let model = ServiceModel {
        curve: parse_curve(&a.service)?,
        ttft_fraction: a.ttft_fraction,
        load_s: a.load_s,
        cold_load_s: a.cold_load_s,
        weights_bytes: mib(a.weights_mib)?,
        shared_weights: a.shared_weights,
        kv_bytes_per_slot: mib(a.kv_mib_per_slot)?,
        buffer_bytes: mib(a.buffers_mib)?,
    };
    let rates = crate::load::rates(&[], Some(a.shape), Some(a.peak_rps), 1.0)?;
    let mut base = PolicyConfig::default();
    base.up.window_s = a.up_window_s;
    base.up.queue_per_worker = a.queue_per_worker;
    base.up.utilization = a.utilization;
    base.down.stabilization_s = a.stabilization_s;
    base.validate()
        .map_err(|(key, why)| anyhow::anyhow!("policy: {key}: {why}"))?;
    if !a.json {
        println!("| pool | requests | errors | latency p50 / p95 | TTFT p50 / p95 | reserved GiB·s | transitions | workers over time |");
        println!("|---|---|---|---|---|---|---|---|");
    }
    let elastic_model = ServiceModel {
        kv_bytes_per_slot: match a.elastic_kv_mib_per_slot {
            Some(m) => mib(m)?,
            None => model.kv_bytes_per_slot,
        },
        ..model.clone()
    };
    for pool in &a.pools {
        let model = if pool.min == pool.max {
            &model
        } else {
            &elastic_model
        };
        let r = simulate(model, pool, &base, &rates, a.step_s, a.deadline_s);
        if a.json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!(
                "| {} | {} | {} | {:.2} / {:.2} s | {:.2} / {:.2} s | {:.1} | {} | {} |",
                r.label,
                r.requests,
                r.errors,
                r.latency_p50_s,
                r.latency_p95_s,
                r.ttft_p50_s,
                r.ttft_p95_s,
                r.reserved_gib_s,
                r.transitions,
                crate::load::compress(&r.workers_over_time)
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> ServiceModel {
        ServiceModel {
            // 0.5 s alone; 2 at a time 0.8 s each (2.5 req/s); no gain past 4.
            curve: vec![(1, 0.5), (2, 0.8), (4, 1.4)],
            ttft_fraction: 0.1,
            load_s: 0.1,
            cold_load_s: 1.0,
            weights_bytes: 100 << 20,
            shared_weights: true,
            kv_bytes_per_slot: 10 << 20,
            buffer_bytes: 10 << 20,
        }
    }

    fn base() -> PolicyConfig {
        let mut c = PolicyConfig::default();
        c.up.window_s = 3.0;
        c.down.stabilization_s = 15.0;
        c
    }

    #[test]
    fn service_time_interpolates_and_saturates() {
        let m = model();
        assert_eq!(m.service_s(1), 0.5);
        assert!((m.service_s(3) - 1.1).abs() < 1e-9);
        // Past the last point: 4 per 1.4 s at most.
        assert!((m.service_s(8) - 2.8).abs() < 1e-9);
    }

    #[test]
    fn pools_parse_and_nonsense_is_refused() {
        let p: PoolShape = "1x4".parse().unwrap();
        assert_eq!((p.min, p.max, p.slots), (1, 1, 4));
        let e: PoolShape = "elastic:1-3:2".parse().unwrap();
        assert_eq!(
            (e.min, e.max, e.slots, e.label.as_str()),
            (1, 3, 2, "elastic-1-3")
        );
        for bad in ["0x2", "1x0", "x", "elastic:3-1:2", "elastic:1-3", "2x99999"] {
            assert!(bad.parse::<PoolShape>().is_err(), "{bad}");
        }
        assert!(parse_curve("1:0.5,2:0.8").is_ok());
        assert!(parse_curve("0:1").is_err() && parse_curve("1:-1").is_err());
    }

    #[test]
    fn a_light_load_is_served_at_the_single_request_time() {
        // 0.5 req/s, each alone: latency = 0.5 s, TTFT = 0.05 s.
        let r = simulate(
            &model(),
            &"1x2".parse().unwrap(),
            &base(),
            &[0.5],
            20.0,
            60.0,
        );
        assert_eq!((r.requests, r.errors), (10, 0));
        assert!((r.latency_p95_s - 0.5).abs() < 0.02, "{r:?}");
        assert!((r.ttft_p50_s - 0.05).abs() < 0.02, "{r:?}");
        // Memory: weights + one worker of 2 slots + buffers, for the whole run.
        let gib_s = 130.0 / 1024.0 * 20.0;
        assert!((r.reserved_gib_s - gib_s).abs() / gib_s < 0.05, "{r:?}");
    }

    #[test]
    fn the_elastic_pool_grows_for_the_peak_and_shrinks_after_it() {
        // A worker of 2 slots serves 2.5 req/s; the peak asks 4.
        let rates = [0.5, 4.0, 0.5, 0.5];
        let e = simulate(
            &model(),
            &"elastic:1-3:2".parse().unwrap(),
            &base(),
            &rates,
            20.0,
            60.0,
        );
        let one = simulate(
            &model(),
            &"1x2".parse().unwrap(),
            &base(),
            &rates,
            20.0,
            60.0,
        );
        let max = simulate(
            &model(),
            &"3x2".parse().unwrap(),
            &base(),
            &rates,
            20.0,
            60.0,
        );
        let peak = e.workers_over_time.iter().copied().max().unwrap();
        assert!(peak >= 2, "{e:?}");
        assert_eq!(*e.workers_over_time.last().unwrap(), 1, "back down: {e:?}");
        assert!(e.latency_p95_s < one.latency_p95_s, "{e:?} vs {one:?}");
        assert!(e.reserved_gib_s < max.reserved_gib_s, "{e:?} vs {max:?}");
        assert!(e.transitions <= 4, "{e:?}");
    }
}
