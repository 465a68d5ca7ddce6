//! `tidepool bench`: measurements that print numbers (never timed assertions in tests).
//!
//! `bench engine` loads a model in-process and measures load time, resident memory after load,
//! time to first token, single-stream decode speed and CPU time per token, with no HTTP in
//! between; `--power-mode` runs it under a power mode's CPU limit. `bench load` replays a rate
//! trace against a running server; `bench bandwidth` measures memory bandwidth.

use std::time::Instant;

use clap::{Args, Subcommand};
use futures::StreamExt;
use serde::Serialize;
use tidepool_control::cpu_limit::CpuLimiter;
use tidepool_control::power::{Governor, PowerConfig, PowerMode};
use tidepool_control::signals::Machine;
use tidepool_engine::mistral::MistralEngine;
use tidepool_engine::request::{ChatMessage, GenerationEvent, GenerationRequest, Role};
use tidepool_engine::Engine;
use tidepool_engine::{DevicePreference, EngineConfig};
use tidepool_models::model_source::{self, ModelSpec, ModelStore};
use tidepool_sched::memory::{human_bytes, process_rss_bytes};

use crate::stats::median;

use tidepool::progress::BarProgress;

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    kind: BenchKind,
}

#[derive(Subcommand)]
enum BenchKind {
    /// Single-stream speed of one in-process engine: load, RSS, TTFT, decode tokens/s.
    Engine(EngineBench),
    /// Replay a request-rate trace against a running server: latency, TTFT, errors, workers,
    /// reserved memory and RSS over the run.
    Load(crate::load::LoadBench),
    /// What a running server serves with a fixed number of requests in flight (closed loop):
    /// completed requests per second, to scale `bench load` traces to.
    Capacity(crate::load::CapacityBench),
    /// Replay a trace through the real policy against a service model (measured here, or
    /// another machine's figures): latency, TTFT and memory-time of fixed and elastic pools.
    Simulate(crate::simulate::SimulateArgs),
    /// STREAM-style memory bandwidth (1 thread and all cores): the ceiling on CPU decode speed.
    Bandwidth(crate::bandwidth::BandwidthBench),
    /// Drive one running OpenAI-compatible server (Tidepool or a peer): single-stream TTFT and
    /// decode speed, then a concurrency sweep; for side-by-side comparisons (bench/compare.sh).
    Compare(crate::compare::CompareBench),
}

#[derive(Args)]
struct EngineBench {
    /// Catalog id, variant id or .gguf path.
    #[arg(long)]
    model: String,
    /// Tokens to generate per run.
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    /// Measured runs (after one warm-up).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Run on the CPU even if a GPU is available.
    #[arg(long)]
    cpu: bool,
    /// Print one JSON object instead of a table row.
    #[arg(long)]
    json: bool,
    /// A label for the row (e.g. the build flavour).
    #[arg(long, default_value = "")]
    label: String,
    /// Run under this power mode's CPU limit (performance, balanced, power-saver), as the
    /// server's control loop would apply it on this machine.
    #[arg(long)]
    power_mode: Option<PowerMode>,
}

#[derive(Serialize)]
struct EngineResult {
    label: String,
    model: String,
    types: String,
    weights_bytes: u64,
    load_s: f64,
    rss_after_load_bytes: u64,
    rss_growth_bytes: u64,
    ttft_ms_median: f64,
    decode_tok_s_median: f64,
    tokens_per_run: Vec<u32>,
    /// CPU cores the process ran on.
    cpu_cores: usize,
    /// Process CPU time (user + system) per 1000 generated tokens, prompt work included.
    cpu_s_per_1k_tokens: f64,
}

pub async fn run(a: BenchArgs) -> anyhow::Result<()> {
    match a.kind {
        BenchKind::Engine(b) => engine(b).await,
        BenchKind::Load(b) => crate::load::run(b).await,
        BenchKind::Capacity(b) => crate::load::capacity(b).await,
        BenchKind::Simulate(b) => crate::simulate::run(b),
        BenchKind::Compare(b) => crate::compare::run(b).await,
        BenchKind::Bandwidth(b) => {
            tokio::task::spawn_blocking(move || crate::bandwidth::run(b)).await?
        }
    }
}

async fn engine(b: EngineBench) -> anyhow::Result<()> {
    let device = if b.cpu {
        DevicePreference::Cpu
    } else {
        DevicePreference::Auto
    };
    let spec = ModelSpec::parse(&b.model);
    let local = tokio::task::spawn_blocking(move || {
        model_source::resolve(
            &spec,
            &ModelStore::from_env(),
            device.class(),
            &BarProgress::new(),
        )
    })
    .await??;
    let mut limiter = CpuLimiter::new();
    let cores = match b.power_mode {
        Some(mode) => {
            let caps = PowerConfig {
                mode,
                ..PowerConfig::default()
            };
            let state = Governor::new().update(&caps, &Machine::real().read());
            limiter.apply(state.cpu_threads)?
        }
        None => limiter.cores(),
    };
    let rss0 = process_rss_bytes();
    let t0 = Instant::now();
    let engine = MistralEngine::load(
        &local,
        &EngineConfig {
            device,
            max_sequences: 1,
            prefix_cache_entries: 0,
            pooling: None,
        },
    )
    .await?;
    let load_s = t0.elapsed().as_secs_f64();
    let rss1 = process_rss_bytes();

    let prompt =
        "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle. \
                  Describe the sea, the weather, and every person in the village.";
    let mut ttfts = Vec::new();
    let mut speeds = Vec::new();
    let mut tokens = Vec::new();
    let mut cpu_s = 0.0;
    for i in 0..=b.runs {
        let cpu_before = process_cpu_seconds();
        let mut req = GenerationRequest::chat(vec![ChatMessage::new(Role::User, prompt)]);
        req.sampling.max_tokens = Some(b.max_tokens);
        req.sampling.temperature = Some(0.0);
        let mut stream = engine.generate(req).await?;
        while let Some(ev) = stream.next().await {
            match ev {
                GenerationEvent::Done { usage, .. } if i > 0 => {
                    ttfts.push(usage.time_to_first_token.as_secs_f64() * 1000.0);
                    speeds.push(usage.decode_tokens_per_second());
                    tokens.push(usage.completion_tokens);
                }
                GenerationEvent::Error(e) => anyhow::bail!("generation failed: {e}"),
                _ => {}
            }
        }
        if i > 0 {
            cpu_s += process_cpu_seconds() - cpu_before;
        }
    }
    let generated: u32 = tokens.iter().sum();
    let info = engine.info();
    let r = EngineResult {
        label: b.label,
        // The file, not the catalog id: it names the quantization too.
        model: local.files[0]
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or(local.name),
        types: info.gguf.type_mix(),
        weights_bytes: info.gguf.tensor_bytes,
        load_s,
        rss_after_load_bytes: rss1,
        rss_growth_bytes: rss1.saturating_sub(rss0),
        ttft_ms_median: median(ttfts),
        decode_tok_s_median: median(speeds),
        tokens_per_run: tokens,
        cpu_cores: cores,
        cpu_s_per_1k_tokens: cpu_s * 1000.0 / f64::from(generated.max(1)),
    };
    if b.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "| {} | {} | {} | {:.2} s | {} | {:.0} ms | {:.1} tok/s | {} | {:.1} s | {:?} |",
            r.label,
            r.model,
            r.types,
            r.load_s,
            human_bytes(r.rss_after_load_bytes),
            r.ttft_ms_median,
            r.decode_tok_s_median,
            r.cpu_cores,
            r.cpu_s_per_1k_tokens,
            r.tokens_per_run
        );
    }
    Ok(())
}

/// CPU time (user + system) this process has used, in seconds.
fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes into the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(u.ru_utime) + secs(u.ru_stime)
}
