//! `tidepool bench load`: replays a request-rate trace against a running server and reports what
//! clients saw (latency, time to first token, errors) and what the server spent (workers, reserved
//! memory, RSS from /admin/status), so fixed and elastic pools can be compared on the same trace.

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

/// One /admin/status poll: (t s, ready workers, reserved bytes, RSS bytes).
type StatusSample = (f64, usize, u64, u64);

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
    avg_reserved_bytes: f64,
    avg_rss_bytes: f64,
    max_rss_bytes: u64,
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
    let client = reqwest::Client::new();
    let url = a.url.trim_end_matches('/').to_string();
    client
        .get(format!("{url}/health"))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .with_context(|| format!("the server at {url} is not ready"))?;

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
                        let workers = v["workers"]
                            .as_array()
                            .map(|w| w.iter().filter(|w| w["state"] == "ready").count())
                            .unwrap_or(0);
                        let reserved = v["memory"]["reserved_bytes"].as_u64().unwrap_or(0);
                        let rss = v["memory"]["process_rss_bytes"].as_u64().unwrap_or(0);
                        let t = started.elapsed().as_secs_f64();
                        log.lock().unwrap().push((t, workers, reserved, rss));
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };

    // Open-loop arrivals at evenly spaced times within each step.
    let mut tasks = Vec::new();
    let mut at = 0.0;
    for (i, rate) in a.trace.iter().enumerate() {
        let rate = rate * a.rate_scale;
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
            a.trace.len(),
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
        workers_over_time: log.iter().map(|l| l.1).collect(),
        avg_reserved_bytes: log.iter().map(|l| l.2 as f64).sum::<f64>() / n,
        avg_rss_bytes: log.iter().map(|l| l.3 as f64).sum::<f64>() / n,
        max_rss_bytes: log.iter().map(|l| l.3).max().unwrap_or(0),
    };
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        let gib = |b: f64| b / (1u64 << 30) as f64;
        println!(
            "| {} | {} | {} | {} | {:.2} / {:.2} / {:.2} s | {:.2} / {:.2} s | {:.2} GiB | {:.2} GiB (max {:.2}) | {} |",
            r.label,
            r.requests,
            r.refused_429,
            r.errors,
            r.latency_p50_s,
            r.latency_p95_s,
            r.latency_max_s,
            r.ttft_p50_s,
            r.ttft_p95_s,
            gib(r.avg_reserved_bytes),
            gib(r.avg_rss_bytes),
            gib(r.max_rss_bytes as f64),
            compress(&r.workers_over_time)
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
    for &(t, workers, reserved, rss) in status {
        let v = json!({"kind": "status", "t": t, "workers": workers,
                       "reserved_bytes": reserved, "rss_bytes": rss});
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

/// `1x12 2x30 1x8`: run-length encoding of the worker count over time (one sample a second).
fn compress(v: &[usize]) -> String {
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
}
