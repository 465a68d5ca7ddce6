//! What the pool serves, learned online from the requests it runs.
//!
//! Every completed generation is one sample: how long it held its slot, how many tokens it
//! generated, and how many sequences ran in the pool meanwhile (the mean of the counts when it
//! started and when it ended, over every worker of the model: they share the machine's cores or
//! the GPU). The [`ServiceCurve`] keeps a moving average of the seconds per generated token at
//! each such concurrency `n`, and one of the tokens a request generates; the pool running `n`
//! sequences then completes `n / (seconds_per_token(n) × tokens_per_request)` requests per
//! second. Kept per token, a change in answer length moves every level at once instead of
//! making the levels measured before it look faster or slower than the others. That is the machine's
//! curve for this engine, model and the answer lengths clients really ask for, and
//! [`Throughput`] reads it: what a pool of `n` sequences serves (measured, interpolated, or
//! extrapolated past what was measured), and where more sequences stop buying throughput. The
//! policy sizes the pool by it instead of a constant.
//!
//! The curve also measures how much service times vary, which decides how long a queue of them
//! waits: each sample's size is its held seconds over its level's seconds per token (the tokens
//! it was worth, prompt processing included), and the moving mean and mean square of those
//! sizes give their squared coefficient of variation. Pure: the pool feeds it, the policy reads
//! it.

/// The highest concurrency level kept (more sequences than this count here).
pub const MAX_LEVEL: usize = 256;
/// Samples a level needs before its figure counts.
pub const MIN_SAMPLES: u64 = 8;
/// Weight of a new sample in the moving average (the curve follows a changing request mix).
const ALPHA: f64 = 0.2;

/// Service time by concurrency, for one model on one engine.
#[derive(Debug, Clone, Default)]
pub struct ServiceCurve {
    /// Index `n - 1`: requests that ran with `n` sequences in the pool.
    levels: Vec<Level>,
    /// Moving average of the tokens a request generates (0 before the first sample).
    tokens_per_request: f64,
    /// Moving mean and mean square of a request's size in tokens' worth of its level's time.
    size: Moments,
}

/// A moving mean and mean square.
#[derive(Debug, Clone, Copy, Default)]
struct Moments {
    mean: f64,
    square: f64,
    samples: u64,
}

impl Moments {
    fn observe(&mut self, x: f64) {
        if self.samples == 0 {
            (self.mean, self.square) = (x, x * x);
        } else {
            self.mean += ALPHA * (x - self.mean);
            self.square += ALPHA * (x * x - self.square);
        }
        self.samples += 1;
    }

    /// The squared coefficient of variation (variance over the squared mean), once
    /// [`MIN_SAMPLES`] were seen.
    fn scv(&self) -> Option<f64> {
        (self.samples >= MIN_SAMPLES && self.mean > 0.0)
            .then(|| ((self.square - self.mean * self.mean) / (self.mean * self.mean)).max(0.0))
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Level {
    /// Moving average of seconds per generated token.
    mean_s: f64,
    samples: u64,
}

impl ServiceCurve {
    /// One completed request: it held a slot `held_s` seconds and generated `tokens` tokens
    /// (counted as at least one) while `running` sequences (itself included) ran in the pool.
    pub fn observe(&mut self, running: usize, held_s: f64, tokens: u64) {
        if !held_s.is_finite() || held_s <= 0.0 || running == 0 {
            return;
        }
        let tokens = tokens.max(1) as f64;
        let per_token = held_s / tokens;
        let n = running.min(MAX_LEVEL);
        if self.levels.len() < n {
            self.levels.resize(n, Level::default());
        }
        let average = |mean: f64, first: bool, x: f64| {
            if first {
                x
            } else {
                mean + ALPHA * (x - mean)
            }
        };
        let l = &mut self.levels[n - 1];
        if l.samples > 0 && l.mean_s > 0.0 {
            // Its size against what its level took per token before it.
            self.size.observe(held_s / l.mean_s);
        }
        l.mean_s = average(l.mean_s, l.samples == 0, per_token);
        l.samples += 1;
        self.tokens_per_request = average(
            self.tokens_per_request,
            self.tokens_per_request == 0.0,
            tokens,
        );
    }

    /// One completed request that held a slot `held_s` seconds and generated `tokens`, with
    /// `at_start` sequences in the pool when it started and `at_end` when it ended (itself
    /// included in both): it counts at the concurrency between the two.
    pub fn observe_span(&mut self, at_start: usize, at_end: usize, held_s: f64, tokens: u64) {
        self.observe((at_start + at_end).div_ceil(2), held_s, tokens);
    }

    /// Requests per second at the levels measured well enough to count ([`MIN_SAMPLES`] each),
    /// for requests of the current average length.
    pub fn throughput(&self) -> Throughput {
        let tokens = self.tokens_per_request;
        let mut t = Throughput::from_points(
            self.levels
                .iter()
                .enumerate()
                .filter(|(_, l)| l.samples >= MIN_SAMPLES && l.mean_s > 0.0)
                .map(|(i, l)| (i + 1, (i + 1) as f64 / (l.mean_s * tokens))),
        );
        t.service_scv = self.size.scv();
        t
    }

    /// Forgets everything (the model or its engine changed).
    pub fn clear(&mut self) {
        self.levels.clear();
        self.tokens_per_request = 0.0;
        self.size = Moments::default();
    }
}

/// Requests per second the pool completes at each number of running sequences, as measured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Throughput {
    /// (sequences, requests per second), ascending by sequences, each finite and positive.
    points: Vec<(usize, f64)>,
    /// The squared coefficient of variation of service times (variance over squared mean: 1
    /// for exponential ones, 0 for constant ones), once measured.
    pub service_scv: Option<f64>,
}

/// What the pool serves at some number of sequences, and how that is known.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    pub requests_per_s: f64,
    pub basis: Basis,
}

/// Where an [`Estimate`] comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Basis {
    /// Measured at exactly this many sequences.
    Measured(usize),
    /// Interpolated between two measured levels.
    Between(usize, usize),
    /// Scaled in proportion from the nearest measured level (an engine that batches well serves
    /// in proportion to its sequences until measured otherwise).
    From(usize),
}

impl std::fmt::Display for Basis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Basis::Measured(n) => write!(f, "measured at {n} running"),
            Basis::Between(a, b) => write!(f, "between {a} and {b} running, as measured"),
            Basis::From(n) => write!(f, "scaled from {n} running, not yet measured"),
        }
    }
}

impl Throughput {
    /// From (sequences, requests per second) points in any order; nonsense is left out and a
    /// repeated level keeps its last figure.
    pub fn from_points(points: impl IntoIterator<Item = (usize, f64)>) -> Throughput {
        let mut v: Vec<(usize, f64)> = points
            .into_iter()
            .filter(|&(n, r)| n > 0 && r.is_finite() && r > 0.0)
            .collect();
        v.sort_by_key(|p| p.0);
        v.reverse();
        v.dedup_by_key(|p| p.0);
        v.reverse();
        Throughput {
            points: v,
            service_scv: None,
        }
    }

    /// The measured levels, ascending.
    pub fn points(&self) -> &[(usize, f64)] {
        &self.points
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// What the pool serves with `n` sequences running; `None` when nothing is measured.
    pub fn at(&self, n: usize) -> Option<Estimate> {
        let n = n.max(1);
        let (first, last) = (self.points.first()?, self.points.last()?);
        let est = |requests_per_s, basis| {
            Some(Estimate {
                requests_per_s,
                basis,
            })
        };
        if let Some(&(_, r)) = self.points.iter().find(|p| p.0 == n) {
            return est(r, Basis::Measured(n));
        }
        if n < first.0 {
            return est(first.1 * n as f64 / first.0 as f64, Basis::From(first.0));
        }
        if n > last.0 {
            return est(last.1 * n as f64 / last.0 as f64, Basis::From(last.0));
        }
        let hi = self.points.iter().position(|p| p.0 > n)?;
        let ((a, ra), (b, rb)) = (self.points[hi - 1], self.points[hi]);
        let r = ra + (rb - ra) * (n - a) as f64 / (b - a) as f64;
        est(r, Basis::Between(a, b))
    }

    /// The fewest sequences past which the measured curve stops paying: the lowest level `a`
    /// that has measured levels above it, every one of which serves less than `1 + min_gain`
    /// times what `a` serves (more sequences bought less than `min_gain` more throughput, or
    /// less). `None` while some higher level paid at every level measured, and always with a
    /// `min_gain` of 0 (the rule turned off: a fixed shape stays fixed).
    pub fn saturation(&self, min_gain: f64) -> Option<(usize, f64)> {
        if min_gain.is_nan() || min_gain <= 0.0 {
            return None;
        }
        let n = self.points.len();
        self.points
            .iter()
            .take(n.saturating_sub(1))
            .enumerate()
            .find_map(|(i, &(a, ra))| {
                self.points[i + 1..]
                    .iter()
                    .all(|&(_, rb)| rb < ra * (1.0 + min_gain))
                    .then_some((a, ra))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_level_counts_once_it_has_enough_samples() {
        let mut c = ServiceCurve::default();
        assert!(c.throughput().is_empty(), "nothing measured");
        for _ in 0..MIN_SAMPLES {
            c.observe(1, 2.0, 1);
        }
        // One sequence at a time, 2 s each: 0.5 req/s.
        assert_eq!(c.throughput().points(), &[(1, 0.5)]);
        for _ in 0..MIN_SAMPLES - 1 {
            c.observe_span(2, 2, 2.5, 1);
        }
        assert_eq!(c.throughput().points().len(), 1, "too few samples at 2");
        // Started with 1 running, ended with 3: it counts at 2.
        c.observe_span(1, 3, 2.5, 1);
        // Two at a time, 2.5 s each: 0.8 req/s.
        assert_eq!(c.throughput().points(), &[(1, 0.5), (2, 0.8)]);
    }

    #[test]
    fn the_average_follows_a_changing_mix_and_ignores_nonsense() {
        let mut c = ServiceCurve::default();
        for _ in 0..MIN_SAMPLES {
            c.observe(1, 1.0, 1);
        }
        for _ in 0..30 {
            c.observe(1, 4.0, 1);
        }
        let r = c.throughput().points()[0].1;
        assert!((r - 0.25).abs() < 0.01, "{r}");
        c.observe(0, 1.0, 1);
        c.observe(1, f64::NAN, 1);
        c.observe(1, -1.0, 1);
        // Past the highest level kept it counts there.
        for _ in 0..MIN_SAMPLES {
            c.observe(10_000, 1.0, 1);
        }
        let points = c.throughput();
        assert_eq!(points.points().len(), 2);
        assert_eq!(points.points()[1], (MAX_LEVEL, MAX_LEVEL as f64));
        c.clear();
        assert!(c.throughput().is_empty());
    }

    #[test]
    fn a_longer_answer_moves_every_level_at_once() {
        // One sequence: 10-token answers in 1 s. Then the mix changes to 100-token answers,
        // measured at two sequences only, taking 10 s each: per token, two sequences serve
        // twice what one does, whatever the answers' length.
        let mut c = ServiceCurve::default();
        for _ in 0..MIN_SAMPLES {
            c.observe(1, 1.0, 10);
        }
        for _ in 0..40 {
            c.observe(2, 10.0, 100);
        }
        let t = c.throughput();
        let (one, two) = (t.points()[0].1, t.points()[1].1);
        assert!((two / one - 2.0).abs() < 0.01, "{t:?}");
        // In requests per second at today's length: two serve 0.2, one 0.1.
        assert!((two - 0.2).abs() < 0.01, "{t:?}");
        assert_eq!(t.saturation(0.1), None);
    }

    #[test]
    fn estimates_are_measured_interpolated_or_scaled_from_the_nearest_level() {
        let t = Throughput::from_points([(4, 2.0), (2, 1.5), (0, 9.0), (8, f64::NAN)]);
        assert_eq!(
            t.points(),
            &[(2, 1.5), (4, 2.0)],
            "sorted, nonsense left out"
        );
        let at = |n| t.at(n).unwrap();
        assert_eq!(at(2).requests_per_s, 1.5);
        assert_eq!(at(2).basis, Basis::Measured(2));
        assert_eq!(at(3).requests_per_s, 1.75);
        assert_eq!(at(3).basis, Basis::Between(2, 4));
        assert_eq!(at(1).requests_per_s, 0.75);
        assert_eq!(at(8).requests_per_s, 4.0);
        assert_eq!(at(8).basis, Basis::From(4));
        assert_eq!(Throughput::default().at(4), None);
    }

    #[test]
    fn saturation_is_the_first_level_more_sequences_do_not_pay_past() {
        // A GPU-like curve: grows to 8 sequences, falls at 32.
        let gpu = Throughput::from_points([(1, 1.0), (8, 2.7), (32, 0.9)]);
        assert_eq!(gpu.saturation(0.1), Some((8, 2.7)));
        // A 2-core CPU: one sequence serves about what four do.
        let cpu = Throughput::from_points([(1, 1.73), (2, 1.53), (4, 1.60)]);
        assert_eq!(cpu.saturation(0.1), Some((1, 1.73)));
        assert_eq!(cpu.saturation(0.0), None, "0 turns the rule off");
        // Every step paid (+33 % from one to two): not saturated, as far as measured.
        let two = Throughput::from_points([(1, 0.6), (2, 0.8)]);
        assert_eq!(two.saturation(0.1), None);
        assert_eq!(two.saturation(0.5), Some((1, 0.6)));
        // A dip that a higher level makes up for is not saturation.
        let dip = Throughput::from_points([(1, 1.0), (2, 0.9), (4, 2.0)]);
        assert_eq!(dip.saturation(0.1), None);
        assert_eq!(Throughput::from_points([(4, 2.0)]).saturation(0.1), None);
    }

    #[test]
    fn the_variation_of_service_times_is_measured_per_level() {
        let mut c = ServiceCurve::default();
        // Every request 32 tokens, 2 s at one running and 3 s at two: sizes never vary.
        for _ in 0..=MIN_SAMPLES {
            c.observe(1, 2.0, 32);
            c.observe(2, 3.0, 32);
        }
        let scv = c.throughput().service_scv.expect("measured");
        assert!(scv < 1e-9, "{scv}");
        // Half the requests take ten times as long: variance well above the mean squared.
        let mut c = ServiceCurve::default();
        for i in 0..4 * MIN_SAMPLES {
            let (s, t) = if i % 2 == 0 { (1.0, 4) } else { (10.0, 40) };
            c.observe(1, s, t);
        }
        let scv = c.throughput().service_scv.expect("measured");
        assert!(scv > 0.4, "{scv}");
        c.clear();
        assert_eq!(c.throughput().service_scv, None);
    }
}
