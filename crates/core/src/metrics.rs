//! Request metrics: counters by outcome, token counts, and latency / time-to-first-token
//! histograms, kept with atomics and rendered in Prometheus' text format by the server.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency buckets, seconds.
pub const BUCKETS_S: [f64; 12] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0,
];

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Generated to a finish reason.
    Ok,
    /// The client went away first.
    Cancelled,
    /// The engine reported an error mid-generation.
    Error,
    /// Refused: the queue was full (429).
    QueueFull,
    /// Waited past its deadline (503).
    Deadline,
    /// Refused: no model ready, or shutting down (503).
    Unavailable,
    /// The engine refused the request (bad grammar, prompt too long…).
    Invalid,
}

impl Outcome {
    pub const ALL: [Outcome; 7] = [
        Outcome::Ok,
        Outcome::Cancelled,
        Outcome::Error,
        Outcome::QueueFull,
        Outcome::Deadline,
        Outcome::Unavailable,
        Outcome::Invalid,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Cancelled => "cancelled",
            Outcome::Error => "error",
            Outcome::QueueFull => "queue_full",
            Outcome::Deadline => "deadline",
            Outcome::Unavailable => "unavailable",
            Outcome::Invalid => "invalid",
        }
    }
}

/// A cumulative histogram over [`BUCKETS_S`].
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; 12],
    /// Observations above the last bucket.
    over: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        match BUCKETS_S.iter().position(|&b| s <= b) {
            Some(i) => self.counts[i].fetch_add(1, Ordering::Relaxed),
            None => self.over.fetch_add(1, Ordering::Relaxed),
        };
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Bucket counts now (not cumulative; the last is the overflow), for windowed quantiles.
    pub fn snapshot(&self) -> [u64; 13] {
        let mut out = [0; 13];
        for (o, c) in out.iter_mut().zip(&self.counts) {
            *o = c.load(Ordering::Relaxed);
        }
        out[12] = self.over.load(Ordering::Relaxed);
        out
    }

    pub fn count(&self) -> u64 {
        self.counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum::<u64>()
            + self.over.load(Ordering::Relaxed)
    }

    /// Appends the histogram in Prometheus text format.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut acc = 0;
        for (b, c) in BUCKETS_S.iter().zip(&self.counts) {
            acc += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {acc}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count());
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {}", self.count());
    }
}

/// The `q` quantile, in seconds, of the observations between two snapshots (the upper bound of
/// the bucket it falls in; past the last bucket, twice its bound). `None` with fewer than
/// `min_count` observations.
pub fn windowed_quantile(
    before: &[u64; 13],
    now: &[u64; 13],
    q: f64,
    min_count: u64,
) -> Option<f64> {
    let delta: Vec<u64> = now
        .iter()
        .zip(before)
        .map(|(n, b)| n.saturating_sub(*b))
        .collect();
    let total: u64 = delta.iter().sum();
    if total < min_count.max(1) {
        return None;
    }
    let rank = (q * total as f64).ceil().max(1.0) as u64;
    let mut acc = 0;
    for (i, d) in delta.iter().enumerate() {
        acc += d;
        if acc >= rank {
            return Some(BUCKETS_S.get(i).copied().unwrap_or(BUCKETS_S[11] * 2.0));
        }
    }
    None
}

/// All request metrics of one server.
#[derive(Debug, Default)]
pub struct Metrics {
    outcomes: [AtomicU64; 7],
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub latency: Histogram,
    pub ttft: Histogram,
    /// Generations cancelled because their client stopped reading (also counted `cancelled`).
    pub stalled: AtomicU64,
}

impl Metrics {
    pub fn record(&self, outcome: Outcome) {
        let i = Outcome::ALL.iter().position(|&o| o == outcome).unwrap_or(0);
        self.outcomes[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self, outcome: Outcome) -> u64 {
        let i = Outcome::ALL.iter().position(|&o| o == outcome).unwrap_or(0);
        self.outcomes[i].load(Ordering::Relaxed)
    }

    /// A finished generation.
    pub fn finished(&self, prompt: u32, completion: u32, ttft: Duration, total: Duration) {
        self.record(Outcome::Ok);
        self.prompt_tokens
            .fetch_add(prompt as u64, Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(completion as u64, Ordering::Relaxed);
        self.ttft.observe(ttft);
        self.latency.observe(total);
    }

    /// The request metrics in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP tidepool_requests_total Requests by how they ended.\n# TYPE tidepool_requests_total counter"
        );
        for o in Outcome::ALL {
            let _ = writeln!(
                out,
                "tidepool_requests_total{{outcome=\"{}\"}} {}",
                o.as_str(),
                self.count(o)
            );
        }
        let _ = writeln!(
            out,
            "# HELP tidepool_tokens_total Tokens processed.\n# TYPE tidepool_tokens_total counter"
        );
        let _ = writeln!(
            out,
            "tidepool_tokens_total{{kind=\"prompt\"}} {}\ntidepool_tokens_total{{kind=\"completion\"}} {}",
            self.prompt_tokens.load(Ordering::Relaxed),
            self.completion_tokens.load(Ordering::Relaxed)
        );
        self.latency.render(
            out,
            "tidepool_request_duration_seconds",
            "Time from submission to the last token.",
        );
        self.ttft.render(
            out,
            "tidepool_time_to_first_token_seconds",
            "Time from submission to the first token (queueing included).",
        );
        let _ = writeln!(
            out,
            "# HELP tidepool_stalled_clients_total Generations cancelled because the client stopped reading.\n# TYPE tidepool_stalled_clients_total counter\ntidepool_stalled_clients_total {}",
            self.stalled.load(Ordering::Relaxed)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_millis(30));
        h.observe(Duration::from_millis(700));
        h.observe(Duration::from_secs(500));
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.05\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"1\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"120\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
    }

    #[test]
    fn quantiles_over_a_window() {
        let h = Histogram::default();
        h.observe(Duration::from_secs(5));
        let before = h.snapshot();
        for _ in 0..19 {
            h.observe(Duration::from_millis(80));
        }
        h.observe(Duration::from_secs(3));
        let now = h.snapshot();
        // Only the 20 observations after `before` count: 19 fast, 1 slow.
        assert_eq!(windowed_quantile(&before, &now, 0.5, 5), Some(0.1));
        assert_eq!(windowed_quantile(&before, &now, 0.95, 5), Some(0.1));
        assert_eq!(windowed_quantile(&before, &now, 1.0, 5), Some(4.0));
        assert_eq!(windowed_quantile(&now, &now, 0.95, 5), None);
    }

    #[test]
    fn outcomes_and_tokens_render() {
        let m = Metrics::default();
        m.finished(
            10,
            5,
            Duration::from_millis(100),
            Duration::from_millis(900),
        );
        m.record(Outcome::QueueFull);
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains("tidepool_requests_total{outcome=\"ok\"} 1"));
        assert!(out.contains("tidepool_requests_total{outcome=\"queue_full\"} 1"));
        assert!(out.contains("tidepool_tokens_total{kind=\"completion\"} 5"));
    }
}
