//! Request metrics: counts by outcome, token counts, and latency / time-to-first-token
//! histograms. Recorded here once; read back by the control loop (windowed quantiles over
//! [`Snapshot`]s) and exposed through the application's one `prometheus_client` registry
//! ([`Metrics::register`]), which does all the encoding.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeGaugeValue, EncodeMetric, MetricEncoder,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// Encodes one unlabelled counter, for collectors that read their values when scraped.
pub fn encode_counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    ConstCounter::new(value).encode(encoder.encode_descriptor(
        name,
        help,
        None,
        MetricType::Counter,
    )?)
}

/// Encodes one unlabelled gauge (`i64` or `f64`), for collectors that read their values when
/// scraped.
pub fn encode_gauge<N: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: N,
) -> Result<(), std::fmt::Error> {
    ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

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

    fn index(self) -> usize {
        self as usize
    }
}

/// Bucket counts of a [`Histogram`] at one moment (not cumulative; the last is the overflow).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Snapshot([u64; BUCKETS_S.len() + 1]);

impl Snapshot {
    /// Observations in all.
    pub fn count(&self) -> u64 {
        self.0.iter().sum()
    }

    /// The `q` quantile, in seconds, of the observations between `before` and `self` (the upper
    /// bound of the bucket it falls in; past the last bucket, twice its bound). `None` with
    /// fewer than `min_count` observations.
    pub fn quantile_since(&self, before: &Snapshot, q: f64, min_count: u64) -> Option<f64> {
        let delta: Vec<u64> = self
            .0
            .iter()
            .zip(&before.0)
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
                let last = BUCKETS_S[BUCKETS_S.len() - 1];
                return Some(BUCKETS_S.get(i).copied().unwrap_or(last * 2.0));
            }
        }
        None
    }
}

/// A histogram over [`BUCKETS_S`], recorded with atomics.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS_S.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = BUCKETS_S
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(BUCKETS_S.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(
            d.as_micros().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }

    /// Bucket counts now, for windowed quantiles.
    pub fn snapshot(&self) -> Snapshot {
        let mut out = [0; BUCKETS_S.len() + 1];
        for (o, c) in out.iter_mut().zip(&self.counts) {
            *o = c.load(Ordering::Relaxed);
        }
        Snapshot(out)
    }

    pub fn count(&self) -> u64 {
        self.snapshot().count()
    }

    fn sum_seconds(&self) -> f64 {
        self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// The histogram for the encoder: (upper bound, count in that bucket), the overflow under
    /// `+Inf` (which prometheus_client spells `f64::MAX`); it makes them cumulative.
    fn buckets(&self) -> Vec<(f64, u64)> {
        let s = self.snapshot();
        BUCKETS_S
            .iter()
            .copied()
            .chain([f64::MAX])
            .zip(s.0)
            .collect()
    }
}

/// All request metrics of one server.
#[derive(Debug, Default)]
pub struct Metrics {
    outcomes: [AtomicU64; Outcome::ALL.len()],
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub latency: Histogram,
    pub ttft: Histogram,
    /// Generations cancelled because their client stopped reading (also counted `cancelled`).
    pub stalled: AtomicU64,
}

impl Metrics {
    pub fn record(&self, outcome: Outcome) {
        self.outcomes[outcome.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self, outcome: Outcome) -> u64 {
        self.outcomes[outcome.index()].load(Ordering::Relaxed)
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

    /// Registers these metrics (as `tidepool_*`) in the application's registry.
    pub fn register(self: &Arc<Self>, registry: &mut Registry) {
        registry.register_collector(Box::new(MetricsCollector(self.clone())));
    }
}

#[derive(Debug)]
struct MetricsCollector(Arc<Metrics>);

/// A histogram as prometheus_client encodes it.
struct Encoded<'a>(&'a Histogram);

impl EncodeMetric for Encoded<'_> {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            self.0.sum_seconds(),
            self.0.count(),
            &self.0.buckets(),
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

impl Collector for MetricsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = &self.0;
        let mut requests = encoder.encode_descriptor(
            "tidepool_requests",
            "Requests by how they ended.",
            None,
            MetricType::Counter,
        )?;
        for o in Outcome::ALL {
            let labels = [("outcome", o.as_str())];
            ConstCounter::new(m.count(o)).encode(requests.encode_family(&labels)?)?;
        }
        let mut tokens = encoder.encode_descriptor(
            "tidepool_tokens",
            "Tokens processed.",
            None,
            MetricType::Counter,
        )?;
        for (kind, v) in [
            ("prompt", &m.prompt_tokens),
            ("completion", &m.completion_tokens),
        ] {
            ConstCounter::new(v.load(Ordering::Relaxed))
                .encode(tokens.encode_family(&[("kind", kind)])?)?;
        }
        for (name, help, h) in [
            (
                "tidepool_request_duration_seconds",
                "Time from submission to the last token.",
                &m.latency,
            ),
            (
                "tidepool_time_to_first_token_seconds",
                "Time from submission to the first token (queueing included).",
                &m.ttft,
            ),
        ] {
            Encoded(h).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Histogram,
            )?)?;
        }
        encode_counter(
            &mut encoder,
            "tidepool_stalled_clients",
            "Generations cancelled because the client stopped reading.",
            m.stalled.load(Ordering::Relaxed),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(m: &Arc<Metrics>) -> String {
        let mut r = Registry::default();
        m.register(&mut r);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
        out
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Arc::new(Metrics::default());
        m.latency.observe(Duration::from_millis(30));
        m.latency.observe(Duration::from_millis(700));
        m.latency.observe(Duration::from_secs(500));
        let out = text(&m);
        let name = "tidepool_request_duration_seconds";
        assert!(
            out.contains(&format!("{name}_bucket{{le=\"0.05\"}} 1\n")),
            "{out}"
        );
        assert!(
            out.contains(&format!("{name}_bucket{{le=\"1.0\"}} 2\n")),
            "{out}"
        );
        assert!(
            out.contains(&format!("{name}_bucket{{le=\"120.0\"}} 2\n")),
            "{out}"
        );
        assert!(
            out.contains(&format!("{name}_bucket{{le=\"+Inf\"}} 3\n")),
            "{out}"
        );
        assert!(out.contains(&format!("{name}_count 3\n")), "{out}");
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
        assert_eq!(now.quantile_since(&before, 0.5, 5), Some(0.1));
        assert_eq!(now.quantile_since(&before, 0.95, 5), Some(0.1));
        assert_eq!(now.quantile_since(&before, 1.0, 5), Some(4.0));
        assert_eq!(now.quantile_since(&now, 0.95, 5), None);
    }

    #[test]
    fn outcomes_and_tokens_render() {
        let m = Arc::new(Metrics::default());
        m.finished(
            10,
            5,
            Duration::from_millis(100),
            Duration::from_millis(900),
        );
        m.record(Outcome::QueueFull);
        let out = text(&m);
        assert!(
            out.contains("tidepool_requests_total{outcome=\"ok\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("tidepool_requests_total{outcome=\"queue_full\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("tidepool_tokens_total{kind=\"completion\"} 5"),
            "{out}"
        );
    }
}
