//! The scaling policy: from load signals to a desired number of workers, with the reason.
//!
//! No I/O and no clock: the caller passes the time with every tick, so a recorded or synthetic
//! load trace replays in a unit test, fast and deterministic. The rules follow the Kubernetes
//! horizontal autoscaler, adapted to one machine:
//!
//! - Every tick computes a raw recommendation: enough workers for the arrival rate, one more
//!   than now when the queue or the latency is over target. What a pool serves is what it has
//!   measured ([`Capacity`]: completed requests per second at each number of sequences running
//!   on the machine, for this engine, model and request mix): the fewest workers that run at
//!   most `up.utilization` busy and whose queue keeps the p95 wait for a slot within the p95
//!   TTFT target ([`crate::queueing`]); until it has measured enough, `up.rate_per_worker`
//!   stands in. Past the
//!   level where more sequences were measured to raise throughput by less than `up.min_gain`,
//!   no rule adds a worker: there it would cost memory and serve nothing more.
//! - Scale **up** to the lowest recommendation of the last `up.window_s`: demand must have held
//!   for the whole window, so one spike does not start a worker.
//! - Scale **down** to the highest recommendation of the last `down.stabilization_s`: every rule
//!   must have said "fewer" for the whole window, so a noisy trace does not flap.
//! - Clamped to `[floor, ceiling]`: the floor is `min_workers`, raised by a pre-scaling schedule
//!   and by recent activity (one worker stays until `idle_ttl_s` has passed without a request);
//!   the ceiling is `max_workers`, lowered by what the memory budget fits and by power caps.
//! - From zero, a first worker starts when a request waits or the rate reaches `activation_rate`.
//! - A manual override sets the count until it expires (still within the budget).

use std::collections::VecDeque;
use std::fmt;

use serde::{Deserialize, Serialize};
pub use tidepool_sched::capacity::Throughput;

use crate::settle::Settled;

/// Policy settings (the `[policy]` table of the config file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    pub min_workers: usize,
    pub max_workers: usize,
    /// Requests per second that start the first worker when none runs (a waiting request always
    /// does).
    pub activation_rate: f64,
    /// With no request for this long, the activity floor of one worker goes (scale to zero when
    /// `min_workers` is 0).
    pub idle_ttl_s: f64,
    pub up: UpRules,
    pub down: DownRules,
    pub schedule: Vec<ScheduleRule>,
}

/// The default ceiling: one worker per core, at most 4. On CPU throughput grows with workers up to
/// about the core count and not past it (`scripts/bench-shapes.sh` on 2 cores: 1 worker 34.2 tok/s,
/// 2 workers 45.6, 3 workers 45.6), and each worker costs a full copy of the weights.
pub fn default_max_workers() -> usize {
    tidepool_engine::available_cores().clamp(1, 4)
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            min_workers: 1,
            max_workers: default_max_workers(),
            activation_rate: 0.1,
            idle_ttl_s: 600.0,
            up: UpRules::default(),
            down: DownRules::default(),
            schedule: Vec::new(),
        }
    }
}

/// When to add workers: any rule holding for `window_s`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpRules {
    /// Arrival rate one worker is sized for (requests per second) until the pool has measured
    /// what one serves.
    pub rate_per_worker: f64,
    /// How busy a worker may run by its measured capacity (0.1–1): lower keeps more headroom
    /// (shorter queues, more memory).
    pub utilization: f64,
    /// The least share (0–1) by which more sequences must raise what the pool was measured to
    /// serve: past a level where they raised it less, the pool does not grow (more workers
    /// there cost memory and buy nothing) and runs no more sequences at once. 0 turns it off.
    pub min_gain: f64,
    /// Queued requests per worker above which one more worker is wanted.
    pub queue_per_worker: usize,
    /// p95 end-to-end latency target, milliseconds; unset disables the rule.
    pub p95_latency_ms: Option<f64>,
    /// p95 time-to-first-token target, milliseconds; unset disables the rule.
    pub p95_ttft_ms: Option<f64>,
    pub window_s: f64,
}

impl Default for UpRules {
    fn default() -> Self {
        UpRules {
            rate_per_worker: 8.0,
            utilization: 0.85,
            min_gain: 0.1,
            queue_per_worker: 4,
            p95_latency_ms: None,
            p95_ttft_ms: Some(2000.0),
            window_s: 3.0,
        }
    }
}

/// When to remove workers: all rules holding for `stabilization_s`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DownRules {
    pub stabilization_s: f64,
}

impl Default for DownRules {
    fn default() -> Self {
        DownRules {
            stabilization_s: 300.0,
        }
    }
}

/// "Between `start` and `end` (local time, `HH:MM`) keep at least `min_workers`."
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleRule {
    pub start: String,
    pub end: String,
    pub min_workers: usize,
}

impl ScheduleRule {
    /// Whether `minute` (minutes since local midnight) falls in the rule; windows may wrap
    /// midnight (`22:00`–`06:00`).
    pub fn contains(&self, minute: u32) -> bool {
        let (Some(s), Some(e)) = (parse_hhmm(&self.start), parse_hhmm(&self.end)) else {
            return false;
        };
        if s <= e {
            (s..e).contains(&minute)
        } else {
            minute >= s || minute < e
        }
    }
}

/// `HH:MM` to minutes since midnight.
pub fn parse_hhmm(s: &str) -> Option<u32> {
    let (h, m) = s.split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60 && s.len() == 5).then_some(h * 60 + m)
}

impl PolicyConfig {
    /// Semantic checks; the error names the key.
    pub fn validate(&self) -> Result<(), tidepool_bounds::Invalid> {
        use tidepool_bounds::{count, float, float_above, int, seconds, MAX_SECONDS};
        let key = |k: &str| format!("policy.{k}");
        int(
            &key("max_workers"),
            self.max_workers as u64,
            1,
            MAX_WORKERS as u64,
        )?;
        if self.min_workers > self.max_workers {
            return Err((
                key("min_workers"),
                format!(
                    "{} is above max_workers ({})",
                    self.min_workers, self.max_workers
                ),
            ));
        }
        float_above(
            &key("up.rate_per_worker"),
            self.up.rate_per_worker,
            0.0,
            1e6,
        )?;
        float(&key("up.utilization"), self.up.utilization, 0.1, 1.0)?;
        float(&key("up.min_gain"), self.up.min_gain, 0.0, 1.0)?;
        count(&key("up.queue_per_worker"), self.up.queue_per_worker, 0)?;
        for (k, v) in [
            ("up.p95_latency_ms", self.up.p95_latency_ms),
            ("up.p95_ttft_ms", self.up.p95_ttft_ms),
        ] {
            if let Some(v) = v {
                float_above(&key(k), v, 0.0, MAX_SECONDS * 1000.0)?;
            }
        }
        seconds(&key("up.window_s"), self.up.window_s, false)?;
        seconds(
            &key("down.stabilization_s"),
            self.down.stabilization_s,
            false,
        )?;
        seconds(&key("idle_ttl_s"), self.idle_ttl_s, false)?;
        float(&key("activation_rate"), self.activation_rate, 0.0, 1e6)?;
        int(&key("schedule"), self.schedule.len() as u64, 0, 1000)?;
        for (i, r) in self.schedule.iter().enumerate() {
            for (k, t) in [("start", &r.start), ("end", &r.end)] {
                if parse_hhmm(t).is_none() {
                    return Err((
                        key(&format!("schedule[{i}].{k}")),
                        format!(
                            "`{}` is not a time of day as HH:MM",
                            tidepool_bounds::clip(t)
                        ),
                    ));
                }
            }
            if r.min_workers > self.max_workers {
                return Err((
                    key(&format!("schedule[{i}].min_workers")),
                    format!(
                        "{} is above max_workers ({})",
                        r.min_workers, self.max_workers
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The most workers a policy may name.
pub const MAX_WORKERS: usize = 1024;

/// What the policy sees at one tick.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Signals {
    /// Requests per second arriving (a short moving average).
    pub arrival_rate: f64,
    pub queue_depth: usize,
    pub in_flight: usize,
    pub p95_latency_ms: Option<f64>,
    pub p95_ttft_ms: Option<f64>,
    /// Seconds since the last request arrived; `None` if none ever did.
    pub idle_s: Option<f64>,
    /// Minutes since local midnight, for schedules.
    pub minute_of_day: u32,
}

/// The pool as the policy sees it.
#[derive(Debug, Clone, Default)]
pub struct PoolView {
    /// Workers Loading or Ready (Draining ones are on their way out).
    pub workers: usize,
    /// How many workers the memory budget holds in all.
    pub budget_workers: usize,
    /// What the machine allows now (power mode, battery, heat).
    pub limits: MachineLimits,
    /// The model's idle expiry a request set (Ollama's `keep_alive`), in seconds after the last
    /// request: `INFINITY` keeps it loaded, 0 unloads it once idle. `None`: the policy's own
    /// rules. It never changes the configured policy.
    pub keep_alive_s: Option<f64>,
    /// What the pool serves, as measured; `None` until the pool has measured enough.
    pub capacity: Option<Capacity>,
}

/// What the pool serves, as it measured it.
#[derive(Debug, Clone, PartialEq)]
pub struct Capacity {
    /// Slots per worker.
    pub slots: usize,
    /// Requests per second the pool completes at each number of running sequences.
    pub throughput: Throughput,
}

impl Capacity {
    /// The fewest workers that serve `rate` running at most `utilization` busy and, with a
    /// `wait_s` target, keep the p95 wait for a slot within it (as a queue of the measured rate
    /// and service-time variation would: [`crate::queueing`]); at most `cap` (where more stop paying:
    /// `saturation`). With the reason.
    fn size(
        &self,
        rate: f64,
        utilization: f64,
        wait_s: Option<f64>,
        cap: Option<&Saturation>,
    ) -> (usize, String) {
        let slots = self.slots.max(1);
        let serves = |w: usize| self.throughput.at(w * slots);
        // The p95 wait at `w` workers (`None`: the queue would grow without bound), for service
        // times as variable as measured (exponential until measured).
        let scv = self.throughput.service_scv;
        let wait = |w: usize| {
            let e = serves(w)?;
            let c = w * slots;
            let mu = e.requests_per_s / c as f64;
            crate::queueing::wait_quantile_g(c, rate, mu, 0.95, scv.unwrap_or(1.0))
        };
        let enough = |w: usize| {
            serves(w).is_some_and(|e| e.requests_per_s * utilization >= rate)
                && wait_s.is_none_or(|t| wait(w).is_some_and(|q| q <= t))
        };
        let limit = cap.map_or(MAX_WORKERS, |c| c.workers);
        let w = (1..=limit).find(|&w| enough(w)).unwrap_or(limit);
        let Some(e) = serves(w) else {
            return (w, "nothing measured".into());
        };
        let who = if w == 1 {
            format!("one worker of {slots} slots serves")
        } else {
            format!("{w} workers of {slots} slots serve")
        };
        let mut why = format!(
            "needs {rate:.2} req/s, {who} {:.2} ({}; sized to {:.0} % busy",
            e.requests_per_s,
            e.basis,
            100.0 * utilization
        );
        if let Some(t) = wait_s {
            match wait(w) {
                Some(q) => {
                    why += &format!(", p95 wait for a slot {q:.1} s of {t:.1} s");
                    if let Some(v) = scv {
                        why += &format!(" at service-time CV² {v:.2}");
                    }
                }
                None => why += ", the queue would grow",
            }
        }
        why += ")";
        if let Some(c) = cap.filter(|c| w == c.workers && !enough(w)) {
            why += &format!("; no more: {}", c.why);
        }
        (w, why)
    }

    /// Where the measured curve stops paying, in sequences and in workers of this pool's
    /// slots (`None` until measured, or with `min_gain` 0).
    pub fn saturation(&self, min_gain: f64) -> Option<Saturation> {
        let (n, r) = self.throughput.saturation(min_gain)?;
        let slots = self.slots.max(1);
        let above = self
            .throughput
            .points()
            .iter()
            .filter(|p| p.0 > n)
            .map(|p| format!("{:.2} at {}", p.1, p.0))
            .collect::<Vec<_>>()
            .join(", ");
        Some(Saturation {
            sequences: n,
            workers: n.div_ceil(slots).max(1),
            why: format!(
                "the pool served {r:.2} req/s at {n} running and {above}, less than {:.0} % more",
                100.0 * min_gain
            ),
        })
    }
}

/// Where more sequences were measured not to pay: the most sequences worth running at once,
/// the workers that run them, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Saturation {
    pub sequences: usize,
    pub workers: usize,
    pub why: String,
}

/// Limits from the machine's state (see [`crate::power`]); the default limits nothing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MachineLimits {
    pub max_workers: Option<usize>,
    /// Too warm to add workers.
    pub no_growth: bool,
    /// A shorter idle TTL (on battery).
    pub idle_ttl_s: Option<f64>,
    /// Scheduled pre-scaling is paused (on battery).
    pub pause_schedule: bool,
    /// The machine's state in words, for reasons.
    pub why: String,
}

/// A manual override: this many workers until `until` (policy time, seconds).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Override {
    pub workers: usize,
    pub until: f64,
}

/// The policy's answer for one tick.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub workers: usize,
    pub reason: String,
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} workers: {}", self.workers, self.reason)
    }
}

/// The policy with the short history its windows need.
#[derive(Debug, Clone)]
pub struct Policy {
    pub config: PolicyConfig,
    /// (time, raw recommendation), oldest first, covering the longer window.
    history: VecDeque<(f64, usize)>,
    pub manual: Option<Override>,
    /// Where more sequences stop paying, settled on its count (with the figures of the last
    /// reading that said it): the measured curve's levels move with every sample, and a limit
    /// that flips each second is noise ([`crate::settle`]).
    saturation: Settled<Option<Saturation>>,
}

/// How long the measured curve must keep saying a new saturation point (the sequence cap, and
/// the most workers worth running) before the policy acts on it; the first one counts at once.
pub const SATURATION_HOLD_S: f64 = 5.0;

impl Policy {
    pub fn new(config: PolicyConfig) -> Policy {
        Policy {
            config,
            history: VecDeque::new(),
            manual: None,
            saturation: Settled::awaiting(None, SATURATION_HOLD_S),
        }
    }

    /// Where more sequences were measured not to pay, as of the last tick, settled over
    /// [`SATURATION_HOLD_S`] (`None`: not measured, or every step paid): the pool's sequence cap.
    pub fn saturation(&self) -> Option<&Saturation> {
        self.saturation.get().as_ref()
    }

    /// Replaces the configuration (live reload); the history is kept.
    pub fn set_config(&mut self, config: PolicyConfig) {
        self.config = config;
    }

    /// One tick at time `now` (seconds, monotonic).
    pub fn tick(&mut self, now: f64, s: &Signals, pool: PoolView) -> Decision {
        let c = &self.config;
        let current = pool.workers;
        let limits = &pool.limits;
        let ceiling = c
            .max_workers
            .min(pool.budget_workers)
            .min(limits.max_workers.unwrap_or(usize::MAX));
        let ceiling_why = if ceiling == c.max_workers {
            format!("max_workers {}", c.max_workers)
        } else if ceiling == pool.budget_workers {
            format!("the memory budget holds {}", pool.budget_workers)
        } else {
            format!("the machine allows {ceiling} ({})", limits.why)
        };
        let idle_ttl_s = c.idle_ttl_s.min(limits.idle_ttl_s.unwrap_or(f64::INFINITY));
        let idle_ttl_s = pool.keep_alive_s.unwrap_or(idle_ttl_s);

        if let Some(o) = self.manual {
            if now < o.until {
                let machine = limits.max_workers.unwrap_or(usize::MAX);
                let w = o.workers.min(pool.budget_workers).min(machine);
                let mut reason = format!(
                    "manual override to {} for {:.0} s more",
                    o.workers,
                    o.until - now
                );
                if w < o.workers && w == pool.budget_workers {
                    reason += &format!(" (the memory budget holds {w})");
                } else if w < o.workers {
                    reason += &format!(" (the machine allows {w}: {})", limits.why);
                }
                return Decision { workers: w, reason };
            }
            self.manual = None;
        }

        // The raw recommendation of this tick and what drives it.
        // Below the activation rate demand counts as none: a decaying moving average never
        // reaches exactly zero, and would otherwise hold one worker forever.
        let measured = pool.capacity.as_ref().filter(|m| !m.throughput.is_empty());
        // Where more sequences were measured not to pay: never grown past, by any rule.
        // A different point counts only once the curve has said it for SATURATION_HOLD_S.
        let fresh = measured.and_then(|m| m.saturation(c.up.min_gain));
        let saturation = self
            .saturation
            .update_by(now, fresh, |a, b| {
                a.as_ref().map(|s| s.sequences) == b.as_ref().map(|s| s.sequences)
            })
            .clone();
        let c = &self.config;
        let (by_rate, mut why) = match measured {
            Some(m) => m.size(
                s.arrival_rate,
                c.up.utilization,
                c.up.p95_ttft_ms.map(|ms| ms / 1000.0),
                saturation.as_ref(),
            ),
            None => (
                ((s.arrival_rate / c.up.rate_per_worker).ceil() as usize).min(MAX_WORKERS),
                format!(
                    "arrival {:.1} req/s at {:.1} per worker (not yet measured)",
                    s.arrival_rate, c.up.rate_per_worker
                ),
            ),
        };
        let by_rate = if s.arrival_rate < c.activation_rate {
            0
        } else {
            by_rate
        };
        let mut raw = by_rate;
        let over = |v: Option<f64>, t: Option<f64>| matches!((v, t), (Some(v), Some(t)) if v > t);
        let one_more = [
            (
                s.queue_depth > c.up.queue_per_worker.saturating_mul(current),
                format!(
                    "{} queued over {} per worker",
                    s.queue_depth, c.up.queue_per_worker
                ),
            ),
            (
                s.queue_depth > 0 && over(s.p95_ttft_ms, c.up.p95_ttft_ms),
                format!(
                    "p95 TTFT {:.0} ms over {:.0} ms with requests queued",
                    s.p95_ttft_ms.unwrap_or_default(),
                    c.up.p95_ttft_ms.unwrap_or_default()
                ),
            ),
            (
                s.queue_depth > 0 && over(s.p95_latency_ms, c.up.p95_latency_ms),
                format!(
                    "p95 latency {:.0} ms over {:.0} ms with requests queued",
                    s.p95_latency_ms.unwrap_or_default(),
                    c.up.p95_latency_ms.unwrap_or_default()
                ),
            ),
        ];
        for (holds, rule) in one_more {
            if current == 0 || !holds || current < raw {
                continue;
            }
            match &saturation {
                Some(sat) if current + 1 > sat.workers => {
                    raw = raw.max(current.min(sat.workers));
                    why = format!("{rule}, but no more workers: {}", sat.why);
                }
                _ => {
                    raw = current + 1;
                    why = rule;
                }
            }
            break;
        }
        // Busy workers are never recommended away.
        if s.in_flight > 0 && raw == 0 {
            raw = 1;
        }

        self.history.push_back((now, raw));
        let keep = c.up.window_s.max(c.down.stabilization_s);
        // Keep the newest sample at or before the longest window's start, so `covered` can tell
        // that history reaches back that far even when ticks do not land on whole seconds.
        while self.history.len() >= 2 && self.history[1].0 <= now - keep {
            self.history.pop_front();
        }
        let window = |w: f64| self.history.iter().filter(move |&&(t, _)| t >= now - w);
        // A window counts only once history covers it (no decision from one sample).
        let covered = |w: f64| self.history.front().is_some_and(|&(t, _)| t <= now - w);

        // The floor: configured minimum, schedules, activity.
        let mut floor = c.min_workers;
        let mut floor_why = format!("min_workers {}", c.min_workers);
        let mut paused_schedule = None;
        for r in &c.schedule {
            if r.contains(s.minute_of_day) && r.min_workers > floor {
                if limits.pause_schedule {
                    paused_schedule = Some(format!(
                        "schedule {}–{} paused ({})",
                        r.start, r.end, limits.why
                    ));
                    continue;
                }
                floor = r.min_workers;
                floor_why = format!("schedule {}–{} keeps {}", r.start, r.end, r.min_workers);
            }
        }
        // On battery an idle pool gives up even its warm floor after the (shorter) battery TTL.
        let mut released = None;
        if let Some(ttl) = limits.idle_ttl_s {
            let idle = s.idle_s.unwrap_or(now);
            if floor > 0 && s.in_flight == 0 && s.queue_depth == 0 && idle >= ttl {
                floor = 0;
                released = Some(format!(
                    "idle {idle:.0} s, past {ttl:.0} s ({}): warm floor released",
                    limits.why
                ));
            }
        }
        // A request's keep_alive: past it the model is unloaded now, whatever the floor; before
        // it, the model stays loaded.
        let busy = s.in_flight > 0 || s.queue_depth > 0;
        if let Some(k) = pool.keep_alive_s {
            let idle = s.idle_s.unwrap_or(f64::INFINITY);
            if !busy && idle >= k {
                return Decision {
                    workers: 0,
                    reason: format!(
                        "keep_alive: idle {idle:.0} s, past the {k:.0} s a request asked for: unloaded"
                    ),
                };
            }
            if current > 0 && floor < 1 {
                floor = 1;
                floor_why = if k.is_infinite() {
                    "a request's keep_alive keeps the model loaded".to_string()
                } else {
                    format!("a request's keep_alive of {k:.0} s")
                };
            }
        }
        let active = busy || s.idle_s.is_some_and(|i| i < idle_ttl_s);
        if active && current > 0 && floor < 1 {
            floor = 1;
            floor_why = format!("a request within idle TTL {idle_ttl_s:.0} s");
        }
        let floor = floor.min(ceiling);

        // From zero: a waiting request, or the activation rate, starts one worker at once.
        if current == 0 && floor == 0 {
            // A request admitted with no worker waits for one (it may not be queued yet).
            let waiting = s.queue_depth.max(s.in_flight);
            if waiting > 0 {
                let w = raw.clamp(1, ceiling.max(1)).min(ceiling);
                return Decision {
                    workers: w,
                    reason: format!("cold start: {waiting} request(s) waiting"),
                };
            }
            if s.arrival_rate >= c.activation_rate && s.arrival_rate > 0.0 {
                return Decision {
                    workers: raw.clamp(1, ceiling.max(1)).min(ceiling),
                    reason: format!(
                        "activation: arrival {:.2} req/s reached {:.2}",
                        s.arrival_rate, c.activation_rate
                    ),
                };
            }
        }

        let mut target = current;
        let mut reason = format!("steady: {why}");
        if covered(c.up.window_s) || c.up.window_s == 0.0 {
            let sustained = window(c.up.window_s).map(|&(_, r)| r).min().unwrap_or(raw);
            if sustained > current {
                target = sustained;
                reason = format!("scale up: {why} for {:.0} s", c.up.window_s);
            }
        }
        if target == current && (covered(c.down.stabilization_s) || c.down.stabilization_s == 0.0) {
            let highest = window(c.down.stabilization_s)
                .map(|&(_, r)| r)
                .max()
                .unwrap_or(raw);
            if highest < current {
                target = highest;
                reason = format!(
                    "scale down: at most {highest} needed for the last {:.0} s",
                    c.down.stabilization_s
                );
            }
        }
        // Workers past the settled saturation point buy nothing: more sequences were measured
        // not to pay, and the sequence cap leaves them idle. They go now; the stabilization
        // window guards against a dip in load, which this is not.
        if let Some(sat) = saturation
            .as_ref()
            .filter(|s| target == current && current > s.workers)
        {
            target = sat.workers;
            reason = format!("scale down: no more workers pay: {}", sat.why);
        }
        if target < floor {
            reason = if current < floor {
                format!("raise to the floor: {floor_why}")
            } else {
                format!("hold at the floor: {floor_why}")
            };
            target = floor;
        }
        if target > ceiling {
            reason = format!("{reason}; capped: {ceiling_why}");
            target = ceiling;
        }
        if limits.no_growth && target > current && current > 0 {
            reason = format!("hold at {current}, not growing: {}", limits.why);
            target = current;
        }
        if let Some(p) = paused_schedule {
            reason = format!("{reason}; {p}");
        }
        if let Some(r) = released.filter(|_| target < current) {
            reason = format!("{reason}; {r}");
        }
        Decision {
            workers: target,
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(workers: usize) -> PoolView {
        PoolView {
            workers,
            budget_workers: 8,
            limits: MachineLimits::default(),
            keep_alive_s: None,
            capacity: None,
        }
    }

    fn cfg() -> PolicyConfig {
        PolicyConfig {
            min_workers: 1,
            max_workers: 4,
            up: UpRules {
                rate_per_worker: 8.0,
                window_s: 3.0,
                ..UpRules::default()
            },
            down: DownRules {
                stabilization_s: 60.0,
            },
            ..PolicyConfig::default()
        }
    }

    /// [`cfg`] sized by utilization alone (no wait target), for tests of that rule.
    fn by_utilization() -> PolicyConfig {
        let mut c = cfg();
        c.up.p95_ttft_ms = None;
        c
    }

    /// Replays `rate(t)` once a second for `secs`, applying each decision at once (as a pool with
    /// instant loads would), and returns the worker count after every tick.
    fn replay(p: &mut Policy, secs: usize, rate: impl Fn(usize) -> f64) -> Vec<usize> {
        let mut workers = p.config.min_workers;
        let mut out = Vec::new();
        for t in 0..secs {
            let s = Signals {
                arrival_rate: rate(t),
                idle_s: Some(0.0),
                minute_of_day: 12 * 60,
                ..Signals::default()
            };
            workers = p.tick(t as f64, &s, pool(workers)).workers;
            out.push(workers);
        }
        out
    }

    #[test]
    fn ramp_scales_up_within_the_window_and_down_after_stabilization() {
        let mut p = Policy::new(cfg());
        // 3, 12, 25, 8, 2 req/s for 60 s each.
        let rates = [3.0, 12.0, 25.0, 8.0, 2.0];
        let w = replay(&mut p, 300, |t| rates[t / 60]);
        assert!(
            w.iter().all(|&n| (1..=4).contains(&n)),
            "never past min/max"
        );
        assert_eq!(w[59], 1);
        // 12 req/s needs 2: within the 3 s window (+1 tick) of the rise at t=60.
        let up = w[60..].iter().position(|&n| n == 2).unwrap();
        assert!(up <= 4, "took {up} s to scale up");
        // 25 req/s needs 4 (capped at max 4).
        let up = w[120..].iter().position(|&n| n == 4).unwrap();
        assert!(up <= 4, "took {up} s");
        // Down to 8 req/s at t=180: holds 4 for the 60 s stabilization window, then goes to 1.
        assert!(
            w[180..239].iter().all(|&n| n == 4),
            "scaled down before the window"
        );
        assert_eq!(w[245], 1);
        assert_eq!(w[299], 1);
    }

    #[test]
    fn scales_down_when_ticks_do_not_land_on_whole_seconds() {
        let mut p = Policy::new(cfg());
        let mut workers = 3;
        for i in 0..200 {
            let t = i as f64 * 1.0003;
            let s = Signals {
                arrival_rate: 0.0,
                idle_s: Some(0.0),
                ..Signals::default()
            };
            workers = p.tick(t, &s, pool(workers)).workers;
        }
        assert_eq!(workers, 1);
    }

    #[test]
    fn a_short_spike_does_not_start_a_worker() {
        let mut p = Policy::new(cfg());
        let w = replay(&mut p, 30, |t| if t == 10 || t == 11 { 40.0 } else { 2.0 });
        assert!(w.iter().all(|&n| n == 1), "{w:?}");
    }

    #[test]
    fn a_noisy_trace_does_not_flap() {
        let mut p = Policy::new(cfg());
        // Between 7 and 17 req/s, pseudo-randomly: needs 1 to 3 workers from tick to tick.
        let mut x: u64 = 42;
        let noise: Vec<f64> = (0..600)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                7.0 + ((x >> 33) % 1000) as f64 / 100.0
            })
            .collect();
        let w = replay(&mut p, 600, |t| noise[t]);
        let changes = w.windows(2).filter(|p| p[0] != p[1]).count();
        assert!(changes <= 4, "{changes} changes: {w:?}");
        let downs = w.windows(2).filter(|p| p[1] < p[0]).count();
        assert_eq!(downs, 0, "no scale-down while the need keeps coming back");
    }

    #[test]
    fn budget_and_power_caps_bound_the_count() {
        let mut p = Policy::new(cfg());
        let s = Signals {
            arrival_rate: 100.0,
            idle_s: Some(0.0),
            ..Signals::default()
        };
        let mut last = Decision {
            workers: 0,
            reason: String::new(),
        };
        for t in 0..10 {
            last = p.tick(
                t as f64,
                &s,
                PoolView {
                    workers: 1,
                    budget_workers: 2,
                    limits: MachineLimits::default(),
                    capacity: None,
                    keep_alive_s: None,
                },
            );
        }
        assert_eq!(last.workers, 2);
        assert!(last.reason.contains("memory budget"), "{}", last.reason);
        let d = p.tick(
            11.0,
            &s,
            PoolView {
                workers: 2,
                budget_workers: 8,
                limits: MachineLimits {
                    max_workers: Some(1),
                    why: "power-saver mode".into(),
                    ..MachineLimits::default()
                },
                keep_alive_s: None,
                capacity: None,
            },
        );
        assert_eq!(d.workers, 1);
        assert!(d.reason.contains("power-saver"), "{}", d.reason);
    }

    #[test]
    fn scale_to_zero_after_idle_ttl_and_cold_start_on_a_request() {
        let mut p = Policy::new(PolicyConfig {
            min_workers: 0,
            idle_ttl_s: 30.0,
            ..cfg()
        });
        let mut workers = 1;
        for t in 0..200 {
            let s = Signals {
                idle_s: Some(t as f64),
                ..Signals::default()
            };
            workers = p.tick(t as f64, &s, pool(workers)).workers;
            if t < 30 {
                assert_eq!(workers, 1, "t={t}");
            }
        }
        assert_eq!(workers, 0);
        let d = p.tick(
            200.0,
            &Signals {
                queue_depth: 1,
                idle_s: Some(0.0),
                ..Signals::default()
            },
            pool(0),
        );
        assert_eq!(d.workers, 1);
        assert!(d.reason.contains("cold start"), "{}", d.reason);
        // A request admitted but not yet queued (the scheduler woke the loop at its arrival)
        // starts one too.
        let d = p.tick(
            201.0,
            &Signals {
                in_flight: 1,
                idle_s: Some(0.0),
                ..Signals::default()
            },
            pool(0),
        );
        assert_eq!(d.workers, 1, "{d}");
        assert!(d.reason.contains("cold start: 1 request"), "{d}");
    }

    #[test]
    fn a_decaying_rate_below_activation_lets_the_pool_reach_zero() {
        let mut p = Policy::new(PolicyConfig {
            min_workers: 0,
            idle_ttl_s: 5.0,
            ..cfg()
        });
        let mut workers = 1;
        for t in 0..120 {
            // An average that decays toward zero without reaching it.
            let s = Signals {
                arrival_rate: 2.0 * (-(t as f64) / 5.0).exp(),
                idle_s: Some(t as f64),
                ..Signals::default()
            };
            workers = p.tick(t as f64, &s, pool(workers)).workers;
        }
        assert_eq!(workers, 0);
    }

    #[test]
    fn activation_threshold_gates_the_first_worker() {
        let mut p = Policy::new(PolicyConfig {
            min_workers: 0,
            activation_rate: 1.0,
            ..cfg()
        });
        let tick = |p: &mut Policy, t: f64, rate: f64| {
            p.tick(
                t,
                &Signals {
                    arrival_rate: rate,
                    ..Signals::default()
                },
                pool(0),
            )
        };
        assert_eq!(tick(&mut p, 0.0, 0.5).workers, 0);
        assert_eq!(tick(&mut p, 1.0, 1.5).workers, 1);
    }

    #[test]
    fn schedule_keeps_a_floor_and_override_expires() {
        let mut c = cfg();
        c.schedule.push(ScheduleRule {
            start: "07:50".into(),
            end: "09:00".into(),
            min_workers: 2,
        });
        let mut p = Policy::new(c);
        let at = |minute| Signals {
            minute_of_day: minute,
            idle_s: Some(0.0),
            ..Signals::default()
        };
        let d = p.tick(0.0, &at(7 * 60 + 55), pool(1));
        assert_eq!(d.workers, 2);
        assert!(d.reason.contains("schedule"), "{}", d.reason);
        p.manual = Some(Override {
            workers: 3,
            until: 100.0,
        });
        assert_eq!(p.tick(50.0, &at(12 * 60), pool(2)).workers, 3);
        // Expired: back to policy (stabilization keeps 3 for now, so check the override is gone).
        p.tick(150.0, &at(12 * 60), pool(3));
        assert!(p.manual.is_none());
    }

    fn on_battery(why: &str) -> MachineLimits {
        MachineLimits {
            idle_ttl_s: Some(60.0),
            pause_schedule: true,
            why: why.into(),
            ..MachineLimits::default()
        }
    }

    #[test]
    fn on_battery_schedules_pause_and_an_idle_pool_releases_its_floor() {
        let mut c = cfg();
        c.down.stabilization_s = 0.0;
        c.schedule.push(ScheduleRule {
            start: "07:50".into(),
            end: "09:00".into(),
            min_workers: 2,
        });
        let mut p = Policy::new(c);
        let s = |idle: f64| Signals {
            minute_of_day: 8 * 60,
            idle_s: Some(idle),
            ..Signals::default()
        };
        let view = |workers| PoolView {
            limits: on_battery("balanced, on battery at 50 %"),
            ..pool(workers)
        };
        // The schedule would keep 2; on battery it is paused and says so.
        let d = p.tick(0.0, &s(10.0), view(1));
        assert_eq!(d.workers, 1, "{d}");
        assert!(d.reason.contains("paused"), "{d}");
        // Idle past the battery TTL (60 s, shorter than idle_ttl_s): even min_workers goes.
        let d = p.tick(1.0, &s(61.0), view(1));
        assert_eq!(d.workers, 0, "{d}");
        assert!(d.reason.contains("warm floor released"), "{d}");
        // On AC the same tick keeps the schedule's floor.
        let d = p.tick(2.0, &s(61.0), pool(1));
        assert_eq!(d.workers, 2, "{d}");
    }

    #[test]
    fn too_warm_holds_the_count_but_lets_it_shrink() {
        let mut p = Policy::new(cfg());
        let busy = Signals {
            arrival_rate: 30.0,
            idle_s: Some(0.0),
            ..Signals::default()
        };
        let warm = |workers| PoolView {
            limits: MachineLimits {
                no_growth: true,
                why: "88 °C reached the warning 85 °C".into(),
                ..MachineLimits::default()
            },
            ..pool(workers)
        };
        for t in 0..10 {
            let d = p.tick(t as f64, &busy, warm(2));
            assert_eq!(d.workers, 2, "{d}");
            if t > 3 {
                assert!(d.reason.contains("not growing"), "{d}");
            }
        }
        // Nothing is stopped by heat alone below critical; once cool, it grows.
        assert_eq!(p.tick(10.0, &busy, pool(2)).workers, 4);
    }

    #[test]
    fn schedule_windows_and_validation() {
        let r = ScheduleRule {
            start: "22:00".into(),
            end: "06:00".into(),
            min_workers: 1,
        };
        assert!(r.contains(23 * 60) && r.contains(60) && !r.contains(12 * 60));
        let mut c = cfg();
        c.schedule.push(ScheduleRule {
            start: "7:5".into(),
            end: "09:00".into(),
            min_workers: 1,
        });
        assert_eq!(c.validate().unwrap_err().0, "policy.schedule[0].start");
        let c = PolicyConfig {
            min_workers: 5,
            ..cfg()
        };
        assert_eq!(c.validate().unwrap_err().0, "policy.min_workers");
        assert!(cfg().validate().is_ok());
    }

    #[test]
    fn a_request_keep_alive_unloads_or_keeps_without_touching_the_config() {
        let mut p = Policy::new(cfg());
        let before = p.config.clone();
        let idle = |i: f64| Signals {
            idle_s: Some(i),
            ..Signals::default()
        };
        let ka = |workers, k: f64| PoolView {
            keep_alive_s: Some(k),
            ..pool(workers)
        };
        // keep_alive 0: unloaded as soon as nothing runs, min_workers 1 notwithstanding.
        let busy = Signals {
            in_flight: 1,
            idle_s: Some(0.0),
            ..Signals::default()
        };
        assert_eq!(p.tick(0.0, &busy, ka(1, 0.0)).workers, 1);
        let d = p.tick(1.0, &idle(0.5), ka(1, 0.0));
        assert_eq!(d.workers, 0, "{d}");
        assert!(d.reason.contains("keep_alive"), "{d}");
        // keep_alive 30 s: loaded until then.
        assert_eq!(p.tick(2.0, &idle(10.0), ka(1, 30.0)).workers, 1);
        assert_eq!(p.tick(3.0, &idle(31.0), ka(1, 30.0)).workers, 0);
        // keep_alive -1 (forever) with min_workers 0: the model stays.
        let mut zero = Policy::new(PolicyConfig {
            min_workers: 0,
            idle_ttl_s: 5.0,
            ..cfg()
        });
        let d = zero.tick(0.0, &idle(1e6), ka(1, f64::INFINITY));
        assert_eq!(d.workers, 1, "{d}");
        // Without keep_alive the same idle pool goes to zero (after its down window).
        assert_eq!(p.config, before, "the policy itself is never rewritten");
    }

    /// A pool of 4-slot workers measured to serve `rps` requests per second at 4 sequences.
    fn measured(workers: usize, rps: f64) -> PoolView {
        curve(workers, 4, &[(4, rps)])
    }

    /// A pool of `slots`-slot workers with this measured throughput curve.
    fn curve(workers: usize, slots: usize, points: &[(usize, f64)]) -> PoolView {
        PoolView {
            capacity: Some(Capacity {
                slots,
                throughput: Throughput::from_points(points.iter().copied()),
            }),
            ..pool(workers)
        }
    }

    /// Replays `rate(t)` against a pool of measured capacity, applying decisions at once.
    fn replay_measured(
        p: &mut Policy,
        secs: usize,
        view: impl Fn(usize) -> PoolView,
        rate: impl Fn(usize) -> f64,
    ) -> (Vec<usize>, Decision) {
        let mut workers = p.config.min_workers;
        let mut out = Vec::new();
        let mut last = None;
        for t in 0..secs {
            let s = Signals {
                arrival_rate: rate(t),
                idle_s: Some(0.0),
                ..Signals::default()
            };
            let d = p.tick(t as f64, &s, view(workers));
            workers = d.workers;
            out.push(workers);
            last = Some(d);
        }
        (out, last.unwrap())
    }

    #[test]
    fn measured_capacity_sizes_the_pool_to_the_fewest_workers_that_serve_the_rate() {
        // One worker of 4 slots serves 2.6 req/s; at 85 % that is 2.21: 2.1 req/s needs one,
        // 4.0 needs two, 6.5 needs three (2.21 × 3 = 6.63), whatever rate_per_worker says.
        for (rate, want, says) in [
            (
                2.1,
                1,
                "one worker of 4 slots serves 2.60 (measured at 4 running",
            ),
            (
                4.0,
                2,
                "2 workers of 4 slots serve 5.20 (scaled from 4 running",
            ),
            (
                6.5,
                3,
                "3 workers of 4 slots serve 7.80 (scaled from 4 running",
            ),
        ] {
            let mut p = Policy::new(by_utilization());
            let (w, d) = replay_measured(&mut p, 10, |w| measured(w, 2.6), |_| rate);
            assert_eq!(*w.last().unwrap(), want, "{rate} req/s: {d}");
            assert!(
                d.reason.contains(says),
                "the reason names the measured capacity: {d}"
            );
        }
        // The cheapest shape: no more workers than needed, even with budget for 8.
        let mut p = Policy::new(by_utilization());
        let (w, _) = replay_measured(&mut p, 10, |w| measured(w, 2.6), |_| 2.1);
        assert!(w.iter().all(|&n| n <= 1), "{w:?}");
    }

    #[test]
    fn unmeasured_pools_fall_back_to_rate_per_worker() {
        // 20 req/s at the configured 8 per worker: three workers, and the reason says why.
        let mut p = Policy::new(cfg());
        let (w, d) = replay_measured(&mut p, 10, pool, |_| 20.0);
        assert_eq!(*w.last().unwrap(), 3, "{d}");
        assert!(d.reason.contains("not yet measured"), "{d}");
        // Measured as faster than the constant: fewer workers for the same rate.
        let mut p = Policy::new(cfg());
        let (w, _) = replay_measured(&mut p, 10, |w| measured(w, 20.0), |_| 20.0);
        assert_eq!(*w.last().unwrap(), 2);
    }

    #[test]
    fn measured_sizing_stays_within_the_budget_and_the_power_caps() {
        // 30 req/s at 2.6 per worker would need 14: the budget holds 3.
        let mut p = Policy::new(cfg());
        let budget = |w| PoolView {
            budget_workers: 3,
            ..measured(w, 2.6)
        };
        let (w, d) = replay_measured(&mut p, 10, budget, |_| 30.0);
        assert!(w.iter().all(|&n| n <= 3), "{w:?}");
        assert!(d.reason.contains("memory budget"), "{d}");
        // On battery the machine allows one, and the decision says so.
        let mut p = Policy::new(cfg());
        let battery = |w| PoolView {
            limits: MachineLimits {
                max_workers: Some(1),
                why: "power-saver mode".into(),
                ..MachineLimits::default()
            },
            ..measured(w, 2.6)
        };
        let (w, d) = replay_measured(&mut p, 10, battery, |_| 30.0);
        assert!(w.iter().all(|&n| n <= 1), "{w:?}");
        assert!(d.reason.contains("power-saver"), "{d}");
    }

    #[test]
    fn a_noisy_rate_around_one_workers_capacity_does_not_flap() {
        // The rate swings either side of what one worker serves at 85 % (2.21 req/s) every
        // few seconds: up needs 3 s of "two", down 60 s of "one"; count the transitions.
        let mut p = Policy::new(cfg());
        let (w, _) = replay_measured(
            &mut p,
            600,
            |w| measured(w, 2.6),
            |t| if (t / 2) % 2 == 0 { 2.4 } else { 1.9 },
        );
        let transitions = w.windows(2).filter(|p| p[0] != p[1]).count();
        assert!(transitions <= 2, "{transitions} transitions: {w:?}");
    }

    #[test]
    fn the_pool_never_grows_past_where_more_sequences_stopped_paying() {
        // A GPU-like curve: one worker of 8 slots serves 2.7 req/s, 32 sequences served 0.9.
        // 10 req/s is more than any shape serves: one worker, and the reason says why.
        let gpu = |w| curve(w, 8, &[(1, 1.0), (8, 2.7), (32, 0.9)]);
        let mut p = Policy::new(cfg());
        let (w, d) = replay_measured(&mut p, 10, gpu, |_| 10.0);
        assert!(w.iter().all(|&n| n == 1), "{w:?}");
        assert!(d.reason.contains("no more"), "{d}");
        assert!(d.reason.contains("at 8 running"), "{d}");
        // A 2-core CPU: four sequences served no more than one; a deep queue adds nobody.
        let cpu = |w| curve(w, 2, &[(1, 1.73), (2, 1.53), (4, 1.6)]);
        let mut p = Policy::new(cfg());
        let queued = Signals {
            arrival_rate: 3.0,
            queue_depth: 40,
            in_flight: 42,
            p95_ttft_ms: Some(9000.0),
            idle_s: Some(0.0),
            ..Signals::default()
        };
        for t in 0..10 {
            let d = p.tick(t as f64, &queued, cpu(1));
            assert_eq!(d.workers, 1, "{d}");
            assert!(d.reason.contains("but no more workers"), "{d}");
        }
        // A pool that grew to two before it learned that is brought back to one (after the
        // stabilization window), queue or not.
        let mut p = Policy::new(cfg());
        let mut workers = 2;
        for t in 0..200 {
            workers = p.tick(t as f64, &queued, cpu(workers)).workers;
        }
        assert_eq!(workers, 1);
    }

    #[test]
    fn the_saturation_point_changes_only_once_the_curve_keeps_saying_it() {
        // The curve's levels move with every sample: one reading says one sequence at a time,
        // the next that four pay, and so on (the ramp on the 2-core machine flipped five times
        // in 13 s). The first reading counts; a change must hold for SATURATION_HOLD_S.
        let one = |w| curve(w, 2, &[(1, 2.5), (4, 2.4), (6, 2.5)]);
        let four = |w| curve(w, 2, &[(1, 2.0), (4, 2.6), (6, 2.5)]);
        let light = Signals {
            arrival_rate: 0.5,
            in_flight: 1,
            idle_s: Some(0.0),
            ..Signals::default()
        };
        let mut p = Policy::new(cfg());
        assert!(p.saturation().is_none(), "nothing measured");
        p.tick(0.0, &light, one(1));
        assert_eq!(
            p.saturation().map(|s| s.sequences),
            Some(1),
            "the first counts"
        );
        for t in 1..10 {
            let view = if t % 2 == 0 { one(1) } else { four(1) };
            p.tick(t as f64, &light, view);
            assert_eq!(
                p.saturation().map(|s| s.sequences),
                Some(1),
                "flapping at {t} s"
            );
        }
        // Four, read for long enough, replaces it, with its own figures in the reason.
        for t in 10..=15 {
            p.tick(t as f64, &light, four(1));
        }
        let s = p.saturation().expect("still saturated");
        assert_eq!((s.sequences, s.workers), (4, 2));
        assert!(s.why.contains("2.60 req/s at 4 running"), "{}", s.why);
    }

    #[test]
    fn workers_past_the_saturation_point_go_without_waiting_out_the_window() {
        // Three one-slot workers, at a rate that keeps all three; then the curve says more than
        // one sequence does not pay (1.6 req/s at 1 running, 1.55 at 2 and 3): once that held
        // for SATURATION_HOLD_S the pool goes to one at once, not 60 s (the window) later.
        let paying = |w| curve(w, 1, &[(1, 0.6), (2, 1.2), (3, 1.8)]);
        let flat = |w| curve(w, 1, &[(1, 1.6), (2, 1.55), (3, 1.55)]);
        let busy = Signals {
            arrival_rate: 1.4,
            in_flight: 3,
            idle_s: Some(0.0),
            ..Signals::default()
        };
        let mut p = Policy::new(by_utilization());
        let mut workers = 1;
        for t in 0..10 {
            workers = p.tick(t as f64, &busy, paying(workers)).workers;
        }
        assert_eq!(workers, 3);
        let mut at = None;
        for t in 10..30 {
            let d = p.tick(t as f64, &busy, flat(workers));
            if d.workers < workers {
                workers = d.workers;
                at = Some((t, d));
            }
        }
        let (t, d) = at.expect("scaled down");
        assert_eq!(workers, 1, "{d}");
        assert!(t <= 10 + SATURATION_HOLD_S as usize + 1, "at {t} s: {d}");
        assert!(d.reason.contains("no more workers pay"), "{d}");
        // The floor still holds.
        let mut floor = by_utilization();
        floor.min_workers = 2;
        let mut p = Policy::new(floor);
        let d = p.tick(0.0, &busy, flat(3));
        assert_eq!(d.workers, 2, "{d}");
    }

    #[test]
    fn a_level_not_yet_measured_is_tried_where_the_last_step_paid() {
        // One sequence serves 0.6 req/s and two 0.8 (+33 %): at 1.1 req/s the pool goes to
        // four one-slot workers, scaled from two (three: 1.2 × 0.85 = 1.02 is short; four:
        // 1.6 × 0.85 = 1.36).
        let two = |w| curve(w, 1, &[(1, 0.6), (2, 0.8)]);
        let mut p = Policy::new(by_utilization());
        let (w, d) = replay_measured(&mut p, 10, two, |_| 1.1);
        assert_eq!(*w.last().unwrap(), 4, "{d}");
        assert!(d.reason.contains("scaled from 2 running"), "{d}");
        // The queue rule still adds one where nothing says it would not pay.
        let mut p = Policy::new(by_utilization());
        let queued = Signals {
            arrival_rate: 0.1,
            queue_depth: 9,
            in_flight: 10,
            idle_s: Some(0.0),
            ..Signals::default()
        };
        let d = p.tick(0.0, &queued, two(1));
        assert_eq!(d.workers, 1, "one tick is not a window: {d}");
        let d = (1..=3)
            .map(|t| p.tick(t as f64, &queued, two(1)))
            .last()
            .unwrap();
        assert_eq!(d.workers, 2, "{d}");
        assert!(d.reason.contains("queued over"), "{d}");
    }

    #[test]
    fn the_pool_keeps_the_p95_wait_for_a_slot_within_the_ttft_target() {
        // One-slot workers, each 1.6 req/s on its own and 1.2 when two run (the cores are
        // shared). At 1.15 req/s one worker is 72 % busy (within 85 %) but its p95 wait would
        // be 5.9 s: with the 2 s TTFT target the pool runs two (1.5 s).
        let shared = |w| curve(w, 1, &[(1, 1.6), (2, 2.4), (3, 3.0)]);
        let mut p = Policy::new(cfg());
        let (w, d) = replay_measured(&mut p, 10, shared, |_| 1.15);
        assert_eq!(*w.last().unwrap(), 2, "{d}");
        assert!(
            d.reason.contains("p95 wait for a slot 1.5 s of 2.0 s"),
            "the reason names the wait: {d}"
        );
        // Without the target, utilization alone keeps one.
        let mut p = Policy::new(by_utilization());
        let (w, d) = replay_measured(&mut p, 10, shared, |_| 1.15);
        assert_eq!(*w.last().unwrap(), 1, "{d}");
        // A looser target (10 s) keeps one too; a light load never needs more than one.
        let mut loose = cfg();
        loose.up.p95_ttft_ms = Some(10_000.0);
        let mut p = Policy::new(loose);
        assert_eq!(
            *replay_measured(&mut p, 10, shared, |_| 1.15)
                .0
                .last()
                .unwrap(),
            1
        );
        let mut p = Policy::new(cfg());
        assert_eq!(
            *replay_measured(&mut p, 10, shared, |_| 0.3)
                .0
                .last()
                .unwrap(),
            1
        );
        // Where more stop paying (the saturation point), the wait does not grow the pool past
        // it: the reason says why no more.
        let flat = |w| curve(w, 1, &[(1, 1.6), (2, 1.62), (3, 1.6)]);
        let mut p = Policy::new(cfg());
        let (w, d) = replay_measured(&mut p, 10, flat, |_| 1.15);
        assert_eq!(*w.last().unwrap(), 1, "{d}");
        assert!(d.reason.contains("no more"), "{d}");
    }

    #[test]
    fn regular_service_times_need_fewer_workers_for_the_same_wait() {
        // At 0.9 req/s one 1.6 req/s worker is 56 % busy; an M/M/1 queue's p95 wait is 3.5 s,
        // over the 2 s target, so until the variation is measured the pool runs two.
        let points = [(1, 1.6), (2, 2.4), (3, 3.0)];
        let mut p = Policy::new(cfg());
        let unmeasured = |w| curve(w, 1, &points);
        let (w, d) = replay_measured(&mut p, 10, unmeasured, |_| 0.9);
        assert_eq!(*w.last().unwrap(), 2, "{d}");
        // Measured nearly constant (every answer reaches max_tokens): half that wait, 1.7 s,
        // and one worker keeps it.
        let regular = |w| {
            let mut v = curve(w, 1, &points);
            if let Some(c) = v.capacity.as_mut() {
                c.throughput.service_scv = Some(0.0);
            }
            v
        };
        let mut p = Policy::new(cfg());
        let (w, d) = replay_measured(&mut p, 10, regular, |_| 0.9);
        assert_eq!(*w.last().unwrap(), 1, "{d}");
        assert!(
            d.reason
                .contains("p95 wait for a slot 1.7 s of 2.0 s at service-time CV² 0.00"),
            "the reason names the variation: {d}"
        );
    }
}
