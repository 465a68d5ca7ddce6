//! What one worker serves, learned online from the requests the pool runs.
//!
//! Every completed generation is one sample: how long it held its slot, and how many sequences
//! ran on its worker meanwhile (the mean of the counts when it started and when it ended). The
//! [`ServiceCurve`] keeps a moving average of the service time at each such concurrency `n`; a
//! worker running `n` sequences then serves `n / service_time(n)` requests per second. That is
//! the capacity of a shape measured on this machine, this engine and this model, with the answer
//! lengths clients really ask for: what the policy sizes the pool by instead of a constant.
//! Pure: the pool feeds it, the policy reads it.

/// The highest concurrency level kept (more sequences than this on one worker count here).
pub const MAX_LEVEL: usize = 64;
/// Samples a level needs before its figure counts.
pub const MIN_SAMPLES: u64 = 4;
/// Weight of a new sample in the moving average (the curve follows a changing request mix).
const ALPHA: f64 = 0.2;

/// Service time by concurrency, for one model on one engine.
#[derive(Debug, Clone, Default)]
pub struct ServiceCurve {
    /// Index `n - 1`: requests that ran with `n` sequences on their worker.
    levels: Vec<Level>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Level {
    mean_s: f64,
    samples: u64,
}

/// A worker's measured capacity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WorkerRate {
    /// Requests per second one worker serves with every slot busy.
    pub requests_per_s: f64,
    /// The concurrency it was measured at (at most the worker's slots).
    pub at_sequences: usize,
    /// Samples behind the figure.
    pub samples: u64,
}

impl ServiceCurve {
    /// One completed request: it held a slot `held_s` seconds while `running` sequences (itself
    /// included) ran on its worker.
    pub fn observe(&mut self, running: usize, held_s: f64) {
        if !held_s.is_finite() || held_s <= 0.0 || running == 0 {
            return;
        }
        let n = running.min(MAX_LEVEL);
        if self.levels.len() < n {
            self.levels.resize(n, Level::default());
        }
        let l = &mut self.levels[n - 1];
        l.mean_s = if l.samples == 0 {
            held_s
        } else {
            l.mean_s + ALPHA * (held_s - l.mean_s)
        };
        l.samples += 1;
    }

    /// One completed request that held a slot `held_s` seconds, with `at_start` sequences on its
    /// worker when it started and `at_end` when it ended (itself included in both): it counts at
    /// the concurrency between the two.
    pub fn observe_span(&mut self, at_start: usize, at_end: usize, held_s: f64) {
        self.observe((at_start + at_end).div_ceil(2), held_s);
    }

    /// What one worker of `slots` slots serves when all are busy: the figure measured at `slots`
    /// sequences, or, until that level is measured, at the highest level below it that is (a
    /// batching engine serves at least as much with more sequences, so this errs low). `None`
    /// until some level has [`MIN_SAMPLES`].
    pub fn worker_rate(&self, slots: usize) -> Option<WorkerRate> {
        let top = slots.clamp(1, MAX_LEVEL).min(self.levels.len());
        (1..=top).rev().find_map(|n| {
            let l = self.levels[n - 1];
            (l.samples >= MIN_SAMPLES && l.mean_s > 0.0).then(|| WorkerRate {
                requests_per_s: n as f64 / l.mean_s,
                at_sequences: n,
                samples: l.samples,
            })
        })
    }

    /// Forgets everything (the model or its engine changed).
    pub fn clear(&mut self) {
        self.levels.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_is_sequences_over_service_time_at_the_highest_measured_level() {
        let mut c = ServiceCurve::default();
        assert_eq!(c.worker_rate(4), None, "nothing measured");
        for _ in 0..MIN_SAMPLES {
            c.observe(1, 2.0);
        }
        // One sequence at a time, 2 s each: 0.5 req/s, whatever the slots until more is known.
        let one = c.worker_rate(4).unwrap();
        assert_eq!((one.requests_per_s, one.at_sequences), (0.5, 1));
        for _ in 0..MIN_SAMPLES - 1 {
            c.observe(2, 2.5);
        }
        assert_eq!(
            c.worker_rate(4).unwrap().at_sequences,
            1,
            "too few samples at 2"
        );
        c.observe(2, 2.5);
        // Two at a time, 2.5 s each: 0.8 req/s.
        assert_eq!(c.worker_rate(4).unwrap().requests_per_s, 0.8);
        // A one-slot worker is still measured at one.
        assert_eq!(c.worker_rate(1).unwrap().requests_per_s, 0.5);
    }

    #[test]
    fn the_average_follows_a_changing_mix_and_ignores_nonsense() {
        let mut c = ServiceCurve::default();
        for _ in 0..MIN_SAMPLES {
            c.observe(1, 1.0);
        }
        for _ in 0..30 {
            c.observe(1, 4.0);
        }
        let r = c.worker_rate(1).unwrap().requests_per_s;
        assert!((r - 0.25).abs() < 0.01, "{r}");
        c.observe(0, 1.0);
        c.observe(1, f64::NAN);
        c.observe(1, -1.0);
        c.observe(10_000, 1.0);
        assert_eq!(c.worker_rate(1).unwrap().samples, MIN_SAMPLES + 30);
        c.clear();
        assert_eq!(c.worker_rate(1), None);
    }
}
