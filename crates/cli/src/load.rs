//! `tidepool bench load`: replays a request-rate trace against a running server and reports what
//! clients saw (latency, time to first token, errors) and what the server spent (workers and
//! slots over time, memory-time of reserved memory and of RSS, CPU-seconds, from /admin/status),
//! so fixed and elastic pools can be compared on the same trace. A trace is a list of rates or a
//! named shape ([`Shape`]) scaled to a peak, such as 1.5 × what `tidepool bench capacity`
//! measured one worker to serve.
//!
//! `tidepool bench capacity`: what a running server serves with a fixed number of requests in
//! flight (closed loop), completed requests per second.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use futures::StreamExt;
use serde::Serialize;
use serde_json::{json, Value};

use crate::stats::percentile;

#[derive(Args)]
pub struct LoadBench {
    /// Server base URL.
    #[arg(long, default_value = "http://127.0.0.1:8433")]
    url: String,
    /// Requests per second for each step of the trace.
    #[arg(long, value_delimiter = ',', default_value = "3,12,25,8,2")]
    trace: Vec<f64>,
    /// A named trace instead of `--trace`, relative to its peak (ramp: the seed's 3,12,25,8,2;
    /// bursty; diurnal; noisy).
    #[arg(long)]
    shape: Option<Shape>,
    /// Scale the trace so its highest step is this many requests per second (instead of
    /// `--rate-scale`).
    #[arg(long)]
    peak_rps: Option<f64>,
    /// Seconds each step lasts.
    #[arg(long, default_value_t = 60.0)]
    step_s: f64,
    /// Multiplies every rate (to fit a trace to a small machine).
    #[arg(long, default_value_t = 1.0)]
    rate_scale: f64,
    /// Tokens each request generates.
    #[arg(long, default_value_t = 16)]
    max_tokens: u32,
    /// A label for the result row.
    #[arg(long, default_value = "")]
    label: String,
    /// Print one JSON object instead of a table row.
    #[arg(long)]
    json: bool,
    /// Also write the run as a time series, one JSON object a line: every /admin/status sample
    /// (`"kind": "status"`: workers, reserved and RSS bytes) and every request (`"kind":
    /// "request"`: start, latency, TTFT, HTTP status), with `t` in seconds from the start.
    #[arg(long)]
    timeline_out: Option<std::path::PathBuf>,
}

/// A named trace, each step relative to the peak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Shape {
    /// The seed's ramp 3, 12, 25, 8, 2: up, a peak, down.
    Ramp,
    /// Quiet with two short bursts at the peak.
    Bursty,
    /// A day compressed: a cosine from a night low to a midday peak and back, 12 steps.
    Diurnal,
    /// Alternating around 60 % of the peak: a policy that follows every swing flaps.
    Noisy,
}

impl Shape {
    /// The steps, peak 1.
    pub fn steps(self) -> Vec<f64> {
        match self {
            Shape::Ramp => [3.0, 12.0, 25.0, 8.0, 2.0]
                .iter()
                .map(|r| r / 25.0)
                .collect(),
            Shape::Bursty => vec![0.08, 0.08, 1.0, 0.08, 0.08, 1.0, 0.08, 0.08],
            Shape::Diurnal => (0..12)
                .map(|i| {
                    let phase = i as f64 / 12.0 * std::f64::consts::TAU;
                    (0.5 - 0.5 * phase.cos()).max(0.05)
                })
                .collect(),
            Shape::Noisy => vec![0.7, 0.5, 0.75, 0.45, 0.7, 0.5, 0.75, 0.5],
        }
    }
}

/// The rates to play: `trace` or `shape`, scaled to `peak_rps` or by `rate_scale`.
pub fn rates(
    trace: &[f64],
    shape: Option<Shape>,
    peak_rps: Option<f64>,
    rate_scale: f64,
) -> anyhow::Result<Vec<f64>> {
    let steps = shape.map_or_else(|| trace.to_vec(), Shape::steps);
    anyhow::ensure!(
        steps.iter().all(|r| r.is_finite() && *r >= 0.0),
        "trace rates must be numbers of at least 0"
    );
    let peak = steps.iter().copied().fold(0.0, f64::max);
    anyhow::ensure!(peak > 0.0, "the trace has no request");
    let scale = match peak_rps {
        Some(p) if p.is_finite() && p > 0.0 && p <= 10_000.0 => p / peak,
        Some(p) => anyhow::bail!("--peak-rps must be above 0 and at most 10000, got {p}"),
        None => {
            anyhow::ensure!(
                rate_scale.is_finite() && rate_scale > 0.0 && rate_scale <= 10_000.0,
                "--rate-scale must be above 0 and at most 10000, got {rate_scale}"
            );
            rate_scale
        }
    };
    Ok(steps.iter().map(|r| r * scale).collect())
}

/// One /admin/status poll.
#[derive(Debug, Clone, Copy, Default)]
struct StatusSample {
    t: f64,
    /// Ready workers.
    workers: usize,
    /// Slots those workers admit, in all.
    slots: usize,
    reserved: u64,
    rss: u64,
    /// The server's CPU time so far.
    cpu_s: Option<f64>,
}

#[derive(Default)]
struct Samples {
    latency: Vec<f64>,
    ttft: Vec<f64>,
    errors: usize,
    refused: usize,
    /// (start s, latency s, ttft s, status: 200, 429, other code, 0 for transport errors).
    requests: Vec<(f64, f64, f64, u16)>,
}

#[derive(Serialize)]
struct LoadResult {
    label: String,
    requests: usize,
    ok: usize,
    refused_429: usize,
    errors: usize,
    latency_p50_s: f64,
    latency_p95_s: f64,
    latency_max_s: f64,
    ttft_p50_s: f64,
    ttft_p95_s: f64,
    workers_over_time: Vec<usize>,
    slots_over_time: Vec<usize>,
    /// Changes of the worker count.
    transitions: usize,
    avg_reserved_bytes: f64,
    avg_rss_bytes: f64,
    max_rss_bytes: u64,
    /// Reserved memory integrated over the run, GiB·s.
    reserved_gib_s: f64,
    /// RSS integrated over the run, GiB·s.
    rss_gib_s: f64,
    /// The server's CPU time over the run.
    cpu_s: Option<f64>,
    /// The rates played, requests per second per step.
    rates: Vec<f64>,
}

/// A client for the server at `url` (its trailing `/` dropped), once its /health says it is
/// ready.
async fn connect(url: &str) -> anyhow::Result<(reqwest::Client, String)> {
    let client = reqwest::Client::new();
    let url = url.trim_end_matches('/').to_string();
    client
        .get(format!("{url}/health"))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .with_context(|| format!("the server at {url} is not ready"))?;
    Ok((client, url))
}

/// One streamed request: (latency, ttft) or the status code it failed with (0: transport).
async fn one(client: &reqwest::Client, url: &str, max_tokens: u32) -> Result<(f64, f64), u16> {
    let started = Instant::now();
    let body = json!({
        "messages": [{"role": "user", "content": "Tell me about the sea in one sentence."}],
        "max_tokens": max_tokens,
        "stream": true,
    });
    let resp = client
        .post(format!("{url}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .map_err(|_| 0u16)?;
    if !resp.status().is_success() {
        return Err(resp.status().as_u16());
    }
    let mut first = None;
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| 0u16)?;
        if first.is_none() && chunk.windows(9).any(|w| w == b"\"content\"") {
            first = Some(started.elapsed().as_secs_f64());
        }
    }
    let total = started.elapsed().as_secs_f64();
    Ok((total, first.unwrap_or(total)))
}

pub async fn run(a: LoadBench) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.step_s.is_finite() && a.step_s > 0.0 && a.step_s <= 86_400.0,
        "--step-s must be above 0 and at most 86400, got {}",
        a.step_s
    );
    let rates = rates(&a.trace, a.shape, a.peak_rps, a.rate_scale)?;
    let (client, url) = connect(&a.url).await?;

    let samples = Arc::new(Mutex::new(Samples::default()));
    let status_log: Arc<Mutex<Vec<StatusSample>>> = Default::default();
    let started = Instant::now();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));

    // Poll /admin/status once a second: workers, reserved bytes, RSS.
    let poller = {
        let (client, url, log, done) = (
            client.clone(),
            url.clone(),
            status_log.clone(),
            done.clone(),
        );
        tokio::spawn(async move {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(r) = client.get(format!("{url}/admin/status")).send().await {
                    if let Ok(v) = r.json::<Value>().await {
                        let ready: Vec<&Value> = v["workers"]
                            .as_array()
                            .map(|w| w.iter().filter(|w| w["state"] == "ready").collect())
                            .unwrap_or_default();
                        let sample = StatusSample {
                            t: started.elapsed().as_secs_f64(),
                            workers: ready.len(),
                            slots: ready
                                .iter()
                                .map(|w| w["slots_total"].as_u64().unwrap_or(0) as usize)
                                .sum(),
                            reserved: v["memory"]["reserved_bytes"].as_u64().unwrap_or(0),
                            rss: v["memory"]["process_rss_bytes"].as_u64().unwrap_or(0),
                            cpu_s: v["process_cpu_s"].as_f64(),
                        };
                        log.lock().unwrap().push(sample);
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };

    // Open-loop arrivals at evenly spaced times within each step.
    let mut tasks = Vec::new();
    let mut at = 0.0;
    for (i, &rate) in rates.iter().enumerate() {
        let step_end = (i + 1) as f64 * a.step_s;
        if rate <= 0.0 {
            at = step_end;
            continue;
        }
        while at < step_end {
            let wait = Duration::from_secs_f64(at).saturating_sub(started.elapsed());
            tokio::time::sleep(wait).await;
            let (client, url, samples) = (client.clone(), url.clone(), samples.clone());
            let max_tokens = a.max_tokens;
            tasks.push(tokio::spawn(async move {
                let t = started.elapsed().as_secs_f64();
                let r = one(&client, &url, max_tokens).await;
                let mut s = samples.lock().unwrap();
                match r {
                    Ok((lat, ttft)) => {
                        s.latency.push(lat);
                        s.ttft.push(ttft);
                        s.requests.push((t, lat, ttft, 200));
                    }
                    Err(code) => {
                        if code == 429 {
                            s.refused += 1;
                        } else {
                            s.errors += 1;
                        }
                        let lat = started.elapsed().as_secs_f64() - t;
                        s.requests.push((t, lat, lat, code));
                    }
                }
            }));
            at += 1.0 / rate;
        }
        eprintln!(
            "step {}/{}: {:.2} req/s done ({} requests so far)",
            i + 1,
            rates.len(),
            rate,
            tasks.len()
        );
    }
    let requests = tasks.len();
    for t in tasks {
        let _ = t.await;
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = poller.await;

    let mut s = std::mem::take(&mut *samples.lock().unwrap());
    let log = status_log.lock().unwrap().clone();
    if let Some(path) = &a.timeline_out {
        write_timeline(path, &log, &s.requests)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let n = log.len().max(1) as f64;
    let workers: Vec<usize> = log.iter().map(|l| l.workers).collect();
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let r = LoadResult {
        label: a.label,
        requests,
        ok: s.latency.len(),
        refused_429: s.refused,
        errors: s.errors,
        latency_p50_s: percentile(&mut s.latency, 0.5),
        latency_p95_s: percentile(&mut s.latency, 0.95),
        latency_max_s: s.latency.iter().copied().fold(0.0, f64::max),
        ttft_p50_s: percentile(&mut s.ttft, 0.5),
        ttft_p95_s: percentile(&mut s.ttft, 0.95),
        transitions: workers.windows(2).filter(|p| p[0] != p[1]).count(),
        workers_over_time: workers,
        slots_over_time: log.iter().map(|l| l.slots).collect(),
        avg_reserved_bytes: log.iter().map(|l| l.reserved as f64).sum::<f64>() / n,
        avg_rss_bytes: log.iter().map(|l| l.rss as f64).sum::<f64>() / n,
        max_rss_bytes: log.iter().map(|l| l.rss).max().unwrap_or(0),
        reserved_gib_s: integrate(&log, |l| gib(l.reserved)),
        rss_gib_s: integrate(&log, |l| gib(l.rss)),
        cpu_s: match (
            log.first().and_then(|l| l.cpu_s),
            log.last().and_then(|l| l.cpu_s),
        ) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        },
        rates,
    };
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "| pool | requests | 429 | errors | latency p50 / p95 / max | TTFT p50 / p95 | reserved / RSS memory-time | CPU | transitions | ready workers over time (count x s) |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|");
        println!(
            "| {} | {} | {} | {} | {:.2} / {:.2} / {:.2} s | {:.2} / {:.2} s | {:.1} / {:.1} GiB·s | {} | {} | {} |",
            r.label,
            r.requests,
            r.refused_429,
            r.errors,
            r.latency_p50_s,
            r.latency_p95_s,
            r.latency_max_s,
            r.ttft_p50_s,
            r.ttft_p95_s,
            r.reserved_gib_s,
            r.rss_gib_s,
            r.cpu_s.map_or("-".into(), |c| format!("{c:.0} s")),
            r.transitions,
            compress(&r.workers_over_time)
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct CapacityBench {
    /// Server base URL.
    #[arg(long, default_value = "http://127.0.0.1:8433")]
    url: String,
    /// Requests kept in flight (the slots of the shape measured).
    #[arg(long, default_value_t = 2)]
    concurrency: usize,
    /// Seconds to measure, after one request per slot to warm up.
    #[arg(long, default_value_t = 30.0)]
    seconds: f64,
    /// Tokens each request generates.
    #[arg(long, default_value_t = 16)]
    max_tokens: u32,
    /// Print one JSON object instead of a line of text.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct CapacityResult {
    concurrency: usize,
    seconds: f64,
    completed: usize,
    failed: usize,
    requests_per_s: f64,
    latency_p50_s: f64,
    ttft_p50_s: f64,
}

/// Keeps `concurrency` requests in flight for `seconds` and counts what completes.
pub async fn capacity(a: CapacityBench) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=4096).contains(&a.concurrency),
        "--concurrency must be 1 to 4096, got {}",
        a.concurrency
    );
    anyhow::ensure!(
        a.seconds.is_finite() && a.seconds > 0.0 && a.seconds <= 86_400.0,
        "--seconds must be above 0 and at most 86400, got {}",
        a.seconds
    );
    let (client, url) = connect(&a.url).await?;
    // Warm up: one request per slot.
    let warm: Vec<_> = (0..a.concurrency)
        .map(|_| one(&client, &url, a.max_tokens))
        .collect();
    futures::future::join_all(warm).await;
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(a.seconds);
    let loops: Vec<_> = (0..a.concurrency)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let (mut done, mut failed, mut latency) = (Vec::new(), 0usize, Vec::new());
                while Instant::now() < until {
                    match one(&client, &url, a.max_tokens).await {
                        Ok(times) => {
                            done.push(Instant::now());
                            latency.push(times);
                        }
                        Err(_) => failed += 1,
                    }
                }
                (done, failed, latency)
            })
        })
        .collect();
    let (mut completed, mut failed, mut latency) = (0, 0, Vec::new());
    for l in loops {
        let (done, f, lat) = l.await?;
        // Only what completed inside the window counts.
        completed += done.iter().filter(|&&t| t <= until).count();
        failed += f;
        latency.extend(lat);
    }
    let mut ttft: Vec<f64> = latency.iter().map(|t| t.1).collect();
    let mut latency: Vec<f64> = latency.iter().map(|t| t.0).collect();
    let r = CapacityResult {
        concurrency: a.concurrency,
        seconds: a.seconds,
        completed,
        failed,
        requests_per_s: completed as f64 / a.seconds,
        latency_p50_s: percentile(&mut latency, 0.5),
        ttft_p50_s: percentile(&mut ttft, 0.5),
    };
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{} in flight: {:.2} req/s ({} completed in {:.0} s, {} failed; latency p50 {:.2} s)",
            r.concurrency, r.requests_per_s, r.completed, r.seconds, r.failed, r.latency_p50_s
        );
    }
    Ok(())
}

/// Writes the status samples and the requests as JSON lines (see `--timeline-out`).
fn write_timeline(
    path: &std::path::Path,
    status: &[StatusSample],
    requests: &[(f64, f64, f64, u16)],
) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    for s in status {
        let v = json!({"kind": "status", "t": s.t, "workers": s.workers, "slots": s.slots,
                       "reserved_bytes": s.reserved, "rss_bytes": s.rss, "cpu_s": s.cpu_s});
        writeln!(f, "{v}")?;
    }
    let mut requests = requests.to_vec();
    requests.sort_by(|a, b| a.0.total_cmp(&b.0));
    for (t, latency, ttft, status) in requests {
        let v = json!({"kind": "request", "t": t, "latency_s": latency, "ttft_s": ttft,
                       "status": status});
        writeln!(f, "{v}")?;
    }
    f.flush()?;
    Ok(())
}

/// The integral of `f` over the samples' times (trapezoids), in `f`'s unit × seconds.
fn integrate(log: &[StatusSample], f: impl Fn(&StatusSample) -> f64) -> f64 {
    log.windows(2)
        .map(|w| (w[1].t - w[0].t) * (f(&w[0]) + f(&w[1])) / 2.0)
        .sum()
}

/// `1x12 2x30 1x8`: run-length encoding of the worker count over time (one sample a second).
pub fn compress(v: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let j = v[i..]
            .iter()
            .position(|&x| x != v[i])
            .map_or(v.len(), |k| i + k);
        out.push(format!("{}x{}", v[i], j - i));
        i = j;
    }
    out.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_lengths() {
        assert_eq!(compress(&[1, 1, 2, 2, 2, 1]), "1x2 2x3 1x1");
    }

    #[test]
    fn traces_scale_to_their_peak_and_bad_numbers_are_refused() {
        let r = rates(&[], Some(Shape::Ramp), Some(3.0), 1.0).unwrap();
        assert_eq!(r.len(), 5);
        assert!(
            (r[2] - 3.0).abs() < 1e-9 && (r[0] - 0.36).abs() < 1e-9,
            "{r:?}"
        );
        for s in [Shape::Bursty, Shape::Diurnal, Shape::Noisy] {
            let r = rates(&[], Some(s), Some(2.0), 1.0).unwrap();
            let peak = r.iter().copied().fold(0.0, f64::max);
            assert!((peak - 2.0).abs() < 1e-9, "{s:?}: {r:?}");
            assert!(r.iter().all(|&x| x > 0.0), "{s:?}: {r:?}");
        }
        assert_eq!(rates(&[1.0, 2.0], None, None, 0.5).unwrap(), vec![0.5, 1.0]);
        assert!(rates(&[1.0], None, Some(-1.0), 1.0).is_err());
        assert!(rates(&[1.0], None, None, f64::NAN).is_err());
        assert!(rates(&[0.0], None, None, 1.0).is_err());
        assert!(rates(&[-1.0, 2.0], None, None, 1.0).is_err());
    }

    #[test]
    fn memory_time_integrates_over_the_samples() {
        let at = |t: f64, reserved: u64| StatusSample {
            t,
            reserved,
            ..StatusSample::default()
        };
        let log = [at(0.0, 1 << 30), at(2.0, 1 << 30), at(4.0, 3 << 30)];
        let v = integrate(&log, |s| s.reserved as f64 / (1u64 << 30) as f64);
        assert!((v - (2.0 + 4.0)).abs() < 1e-9, "{v}");
    }
}
