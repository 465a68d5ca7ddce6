//! `tidepool bench compare`: drives one running OpenAI-compatible server (Tidepool, llama.cpp's
//! server, mistral.rs's server, …) with the same workload, so servers can be compared side by side
//! on the same GGUF file: single-stream time to first token and decode speed, then a closed-loop
//! concurrency sweep (aggregate tokens/s, request latency, errors).
//!
//! Every request streams, asks for `stream_options.include_usage`, and bans the model's end tokens
//! through `logit_bias` so that each server generates all `max_tokens`; tokens are counted from the
//! final usage when a server sends one, else from content chunks. A server that ignores
//! `logit_bias` may still stop early: such runs are flagged and speeds are computed over what was
//! generated. `bench/compare.sh` starts the servers and calls this once per (model, server).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use futures::StreamExt;
use serde::Serialize;
use serde_json::{json, Value};

use crate::stats::median;
use crate::stats::percentile;

/// A prompt that invites a long answer, so that servers that ignore `logit_bias` rarely stop early.
const PROMPT: &str = "Write a long, detailed story about a lighthouse keeper who finds a message \
in a bottle. Describe the sea, the weather, the lighthouse, and every person in the village, \
chapter by chapter.";

/// Names of end-of-turn / end-of-text tokens in the vocabularies of the models we bench.
const END_TOKEN_NAMES: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "</s>",
];

#[derive(Args)]
pub struct CompareBench {
    /// Base URL of the running server (without /v1).
    #[arg(long)]
    url: String,
    /// Model name to send [default: the first id the server lists at /v1/models].
    #[arg(long)]
    model: Option<String>,
    /// Server label for the output (e.g. tidepool, llamacpp, mistralrs).
    #[arg(long, default_value = "server")]
    label: String,
    /// Model label for the output (e.g. smollm2-q8_0) [default: the GGUF's file stem].
    #[arg(long)]
    model_label: Option<String>,
    /// The GGUF file the server runs: its end tokens are banned and its tensor bytes recorded.
    #[arg(long)]
    gguf: Option<PathBuf>,
    /// Token ids to ban with logit_bias (added to those read from --gguf).
    #[arg(long, value_delimiter = ',')]
    ban_tokens: Vec<u32>,
    /// Tokens each request asks for.
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    /// Measured single-stream runs (after one warm-up).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Concurrency levels of the sweep (closed-loop clients); empty skips the sweep.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    concurrency: Vec<usize>,
    /// Requests each client sends at each sweep level.
    #[arg(long, default_value_t = 2)]
    requests_per_client: usize,
    /// Instead of a request count: each sweep level lasts this many seconds (clients start no new
    /// request after it; running ones finish).
    #[arg(long)]
    duration_s: Option<f64>,
    /// Tokens each sweep request asks for [default: --max-tokens].
    #[arg(long)]
    sweep_max_tokens: Option<u32>,
    /// Skip the single-stream measurement.
    #[arg(long)]
    no_single: bool,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 600.0)]
    timeout_s: f64,
    /// Append one JSON object per measurement to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

/// One parsed server-sent event.
#[derive(Debug, PartialEq)]
enum SseEvent {
    Data(Value),
    Done,
}

/// Splits a byte stream into SSE `data:` events; lines may be split across network chunks.
#[derive(Default)]
struct SseParser {
    buf: Vec<u8>,
}

impl SseParser {
    fn push(&mut self, bytes: &[u8]) -> anyhow::Result<Vec<SseEvent>> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim();
            let Some(data) = line.strip_prefix("data:") else {
                continue; // blank separators, comments (": ping"), event:/id: fields
            };
            let data = data.trim();
            if data == "[DONE]" {
                out.push(SseEvent::Done);
            } else if !data.is_empty() {
                let v = serde_json::from_str(data)
                    .with_context(|| format!("a stream chunk is not JSON: {data}"))?;
                out.push(SseEvent::Data(v));
            }
        }
        Ok(out)
    }
}

/// What one streamed request produced, with times in seconds from sending it.
#[derive(Debug, Default, Clone)]
struct StreamStats {
    first_content_s: Option<f64>,
    last_content_s: Option<f64>,
    content_chunks: u64,
    usage_completion_tokens: Option<u64>,
    finish_reason: Option<String>,
    total_s: f64,
}

impl StreamStats {
    /// Folds one chunk received at `t` seconds into the stats; an `error` object fails.
    fn observe(&mut self, chunk: &Value, t: f64) -> anyhow::Result<()> {
        if let Some(e) = chunk.get("error") {
            anyhow::bail!("the server sent an error in the stream: {e}");
        }
        if let Some(n) = chunk
            .get("usage")
            .and_then(|u| u.get("completion_tokens"))
            .and_then(Value::as_u64)
        {
            self.usage_completion_tokens = Some(n);
        }
        for choice in chunk["choices"].as_array().into_iter().flatten() {
            let content = choice["delta"]["content"]
                .as_str()
                .or_else(|| choice["text"].as_str());
            if content.is_some_and(|c| !c.is_empty()) {
                self.first_content_s.get_or_insert(t);
                self.last_content_s = Some(t);
                self.content_chunks += 1;
            }
            if let Some(r) = choice["finish_reason"].as_str() {
                self.finish_reason = Some(r.to_string());
            }
        }
        Ok(())
    }

    /// Generated tokens: the server's usage when it sent one, else one per content chunk.
    fn tokens(&self) -> u64 {
        self.usage_completion_tokens.unwrap_or(self.content_chunks)
    }

    fn token_source(&self) -> &'static str {
        if self.usage_completion_tokens.is_some() {
            "usage"
        } else {
            "chunks"
        }
    }

    /// Seconds to the first content chunk; the whole request when none came.
    fn ttft_s(&self) -> f64 {
        self.first_content_s.unwrap_or(self.total_s)
    }

    /// Decode speed after the first token: (tokens − 1) / (t_last − t_first).
    fn decode_tok_s(&self) -> f64 {
        decode_tok_s(self.tokens(), self.first_content_s, self.last_content_s)
    }
}

fn decode_tok_s(tokens: u64, first: Option<f64>, last: Option<f64>) -> f64 {
    match (first, last) {
        (Some(a), Some(b)) if b > a && tokens > 1 => (tokens - 1) as f64 / (b - a),
        _ => 0.0,
    }
}

/// The request body every server gets. `tag` starts the prompt so that no two requests share more
/// than the chat template's head: no server can answer from a response cache or reuse one
/// request's prompt KV for the next.
fn request_body(model: &str, max_tokens: u32, ban: &BTreeSet<u32>, tag: u64) -> Value {
    let bias: serde_json::Map<String, Value> =
        ban.iter().map(|t| (t.to_string(), json!(-100))).collect();
    let mut body = json!({
        "model": model,
        "messages": [{"role": "user", "content": format!("Request {tag}. {PROMPT}")}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if !bias.is_empty() {
        body["logit_bias"] = Value::Object(bias);
    }
    body
}

/// Sends one streamed chat request and reads it to the end.
async fn stream_once(
    client: &reqwest::Client,
    url: &str,
    body: &Value,
) -> anyhow::Result<StreamStats> {
    let started = Instant::now();
    let resp = client
        .post(format!("{url}/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .with_context(|| format!("POST {url}/v1/chat/completions"))?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        anyhow::bail!("{status}: {}", text.chars().take(300).collect::<String>());
    }
    let mut parser = SseParser::default();
    let mut stats = StreamStats::default();
    let mut bytes = resp.bytes_stream();
    'read: while let Some(chunk) = bytes.next().await {
        let chunk = chunk.context("reading the stream")?;
        let t = started.elapsed().as_secs_f64();
        for ev in parser.push(&chunk)? {
            match ev {
                SseEvent::Data(v) => stats.observe(&v, t)?,
                SseEvent::Done => break 'read,
            }
        }
    }
    stats.total_s = started.elapsed().as_secs_f64();
    Ok(stats)
}

/// The fields every result line carries.
#[derive(Serialize, Clone)]
struct Common {
    server: String,
    model: String,
    url: String,
    model_name_sent: String,
    gguf: Option<String>,
    gguf_tensor_bytes: Option<u64>,
    kv_bytes_per_token_f16: Option<u64>,
    banned_tokens: Vec<u32>,
    unix_time: u64,
}

#[derive(Serialize)]
struct SingleResult {
    #[serde(flatten)]
    common: Common,
    workload: &'static str,
    concurrency: usize,
    max_tokens: u32,
    runs: usize,
    ttft_ms_median: f64,
    decode_tok_s_median: f64,
    total_s_median: f64,
    tokens_generated: Vec<u64>,
    token_source: &'static str,
    ttft_ms: Vec<f64>,
    decode_tok_s: Vec<f64>,
    total_s: Vec<f64>,
    finish_reasons: Vec<Option<String>>,
    /// Runs that generated fewer than max_tokens (the server stopped early).
    short_runs: usize,
}

#[derive(Serialize)]
struct SweepResult {
    #[serde(flatten)]
    common: Common,
    workload: &'static str,
    concurrency: usize,
    max_tokens: u32,
    requests: usize,
    ok: usize,
    errors: usize,
    first_error: Option<String>,
    wall_s: f64,
    tokens_total: u64,
    aggregate_tok_s: f64,
    latency_p50_s: f64,
    latency_p95_s: f64,
    ttft_p50_s: f64,
    ttft_p95_s: f64,
    /// Requests that generated fewer than max_tokens.
    short_requests: usize,
}

pub async fn run(a: CompareBench) -> anyhow::Result<()> {
    let url = a.url.trim_end_matches('/').to_string();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs_f64(a.timeout_s))
        .build()?;
    let model = match &a.model {
        Some(m) => m.clone(),
        None => first_model(&client, &url).await?,
    };

    let mut ban: BTreeSet<u32> = a.ban_tokens.iter().copied().collect();
    let (mut tensor_bytes, mut kv_bytes) = (None, None);
    if let Some(path) = &a.gguf {
        let g = read_gguf(path)?;
        ban.extend(g.end_tokens);
        tensor_bytes = Some(g.tensor_bytes);
        kv_bytes = Some(g.kv_bytes_per_token_f16);
    }
    let model_label = a.model_label.clone().unwrap_or_else(|| {
        a.gguf
            .as_deref()
            .and_then(Path::file_stem)
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| model.clone())
    });
    let common = Common {
        server: a.label.clone(),
        model: model_label,
        url: url.clone(),
        model_name_sent: model.clone(),
        gguf: a.gguf.as_ref().map(|p| p.display().to_string()),
        gguf_tensor_bytes: tensor_bytes,
        kv_bytes_per_token_f16: kv_bytes,
        banned_tokens: ban.iter().copied().collect(),
        unix_time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    eprintln!(
        "compare: {} / {} at {url} (model {model:?}, banned tokens {:?})",
        common.server, common.model, common.banned_tokens
    );
    let mut out = match &a.json_out {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("opening {}", p.display()))?,
        ),
        None => None,
    };

    if !a.no_single {
        let r = single(&client, &url, &model, &ban, &a, common.clone()).await?;
        println!(
            "| {} | {} | single stream | TTFT {:.0} ms | decode {:.1} tok/s | total {:.2} s | tokens {:?} ({}){} |",
            r.common.server,
            r.common.model,
            r.ttft_ms_median,
            r.decode_tok_s_median,
            r.total_s_median,
            r.tokens_generated,
            r.token_source,
            if r.short_runs > 0 {
                format!(" SHORT: {} run(s) < {} tokens", r.short_runs, r.max_tokens)
            } else {
                String::new()
            }
        );
        append_json(&mut out, &r)?;
    }

    if !a.concurrency.is_empty() {
        println!("| server | model | clients | requests | errors | tok/s | latency p50 / p95 | TTFT p50 | short |");
        println!("|---|---|---|---|---|---|---|---|---|");
    }
    for &c in &a.concurrency {
        let r = sweep_level(&client, &url, &model, &ban, &a, c, common.clone()).await;
        println!(
            "| {} | {} | {} | {} | {} | {:.1} | {:.2} / {:.2} s | {:.0} ms | {} |",
            r.common.server,
            r.common.model,
            r.concurrency,
            r.requests,
            r.errors,
            r.aggregate_tok_s,
            r.latency_p50_s,
            r.latency_p95_s,
            r.ttft_p50_s * 1000.0,
            r.short_requests
        );
        if let Some(e) = &r.first_error {
            eprintln!("compare: {c} clients: {} error(s), first: {e}", r.errors);
        }
        append_json(&mut out, &r)?;
    }
    Ok(())
}

/// Appends `v` as one JSON line to the --json-out file, if there is one.
fn append_json<T: Serialize>(out: &mut Option<std::fs::File>, v: &T) -> anyhow::Result<()> {
    if let Some(f) = out.as_mut() {
        writeln!(f, "{}", serde_json::to_string(v)?)?;
    }
    Ok(())
}

/// The first model id the server lists; also the reachability check.
async fn first_model(client: &reqwest::Client, url: &str) -> anyhow::Result<String> {
    let v: Value = client
        .get(format!("{url}/v1/models"))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .with_context(|| format!("cannot reach the server at {url} (is it running and ready?)"))?
        .json()
        .await
        .with_context(|| format!("{url}/v1/models did not answer JSON"))?;
    v["data"][0]["id"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("{url}/v1/models lists no model: {v}"))
}

async fn single(
    client: &reqwest::Client,
    url: &str,
    model: &str,
    ban: &BTreeSet<u32>,
    a: &CompareBench,
    common: Common,
) -> anyhow::Result<SingleResult> {
    let mut runs = Vec::new();
    for i in 0..=a.runs {
        let body = request_body(model, a.max_tokens, ban, next_tag());
        let s = stream_once(client, url, &body).await.with_context(|| {
            format!("single-stream run {i} against {url} failed (is the server running?)")
        })?;
        eprintln!(
            "compare: single stream {} {}: {} tokens, TTFT {:.0} ms, {:.1} tok/s",
            if i == 0 { "warm-up" } else { "run" },
            i,
            s.tokens(),
            s.ttft_s() * 1000.0,
            s.decode_tok_s()
        );
        if i > 0 {
            runs.push(s);
        }
    }
    let ttft: Vec<f64> = runs.iter().map(|s| s.ttft_s() * 1000.0).collect();
    let decode: Vec<f64> = runs.iter().map(StreamStats::decode_tok_s).collect();
    let total: Vec<f64> = runs.iter().map(|s| s.total_s).collect();
    Ok(SingleResult {
        common,
        workload: "single-stream",
        concurrency: 1,
        max_tokens: a.max_tokens,
        runs: runs.len(),
        ttft_ms_median: median(ttft.clone()),
        decode_tok_s_median: median(decode.clone()),
        total_s_median: median(total.clone()),
        tokens_generated: runs.iter().map(StreamStats::tokens).collect(),
        token_source: runs.first().map_or("none", StreamStats::token_source),
        short_runs: runs
            .iter()
            .filter(|s| s.tokens() < u64::from(a.max_tokens))
            .count(),
        finish_reasons: runs.iter().map(|s| s.finish_reason.clone()).collect(),
        ttft_ms: ttft,
        decode_tok_s: decode,
        total_s: total,
    })
}

/// One level of the sweep: `c` closed-loop clients, each sending requests back to back.
async fn sweep_level(
    client: &reqwest::Client,
    url: &str,
    model: &str,
    ban: &BTreeSet<u32>,
    a: &CompareBench,
    c: usize,
    common: Common,
) -> SweepResult {
    let max_tokens = a.sweep_max_tokens.unwrap_or(a.max_tokens);
    let ban = Arc::new(ban.clone());
    let started = Instant::now();
    let deadline = a.duration_s.map(|d| started + Duration::from_secs_f64(d));
    let per_client = a.requests_per_client;
    let mut tasks = Vec::new();
    for _ in 0..c {
        let (client, url, ban, model) = (
            client.clone(),
            url.to_string(),
            ban.clone(),
            model.to_string(),
        );
        tasks.push(tokio::spawn(async move {
            let mut results = Vec::new();
            let mut sent = 0;
            loop {
                let more = match deadline {
                    Some(d) => Instant::now() < d,
                    None => sent < per_client,
                };
                if !more {
                    break;
                }
                sent += 1;
                let body = request_body(&model, max_tokens, &ban, next_tag());
                results.push(stream_once(&client, &url, &body).await);
            }
            results
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        match t.await {
            Ok(r) => all.extend(r),
            Err(e) => all.push(Err(anyhow::anyhow!("client task failed: {e}"))),
        }
    }
    let wall_s = started.elapsed().as_secs_f64();
    let requests = all.len();
    let mut first_error = None;
    let mut ok = Vec::new();
    for r in all {
        match r {
            Ok(s) => ok.push(s),
            Err(e) => {
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    let tokens_total: u64 = ok.iter().map(StreamStats::tokens).sum();
    let mut latency: Vec<f64> = ok.iter().map(|s| s.total_s).collect();
    let mut ttft: Vec<f64> = ok.iter().map(StreamStats::ttft_s).collect();
    SweepResult {
        common,
        workload: "concurrency-sweep",
        concurrency: c,
        max_tokens,
        requests,
        ok: ok.len(),
        errors: requests - ok.len(),
        first_error,
        wall_s,
        tokens_total,
        aggregate_tok_s: aggregate_tok_s(tokens_total, wall_s),
        latency_p50_s: percentile(&mut latency, 0.5),
        latency_p95_s: percentile(&mut latency, 0.95),
        ttft_p50_s: percentile(&mut ttft, 0.5),
        ttft_p95_s: percentile(&mut ttft, 0.95),
        short_requests: ok
            .iter()
            .filter(|s| s.tokens() < u64::from(max_tokens))
            .count(),
    }
}

/// A number no other request of this process (or, in practice, of an earlier run) has used.
fn next_tag() -> u64 {
    static NEXT: std::sync::OnceLock<std::sync::atomic::AtomicU64> = std::sync::OnceLock::new();
    NEXT.get_or_init(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        std::sync::atomic::AtomicU64::new((now % 100_000) * 1000)
    })
    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn aggregate_tok_s(tokens: u64, wall_s: f64) -> f64 {
    if wall_s > 0.0 {
        tokens as f64 / wall_s
    } else {
        0.0
    }
}

/// What the bench needs from the GGUF a server runs.
struct GgufFacts {
    end_tokens: Vec<u32>,
    tensor_bytes: u64,
    kv_bytes_per_token_f16: u64,
}

fn read_gguf(path: &Path) -> anyhow::Result<GgufFacts> {
    let info = tidepool_models::gguf_info::GgufInfo::read(&[path.to_path_buf()])
        .with_context(|| format!("reading the GGUF header of {}", path.display()))?;
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut f)
        .with_context(|| format!("reading the GGUF metadata of {}", path.display()))?;
    let md = &content.metadata;
    let eos = md
        .get("tokenizer.ggml.eos_token_id")
        .and_then(|v| v.to_u32().ok());
    let tokens: Vec<String> = md
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.to_vec().ok())
        .map(|v| {
            v.iter()
                .map(|t| t.to_string().cloned().unwrap_or_default())
                .collect()
        })
        .unwrap_or_default();
    Ok(GgufFacts {
        end_tokens: end_tokens(eos, &tokens),
        tensor_bytes: info.tensor_bytes,
        kv_bytes_per_token_f16: info.shape.kv_bytes_per_token(2),
    })
}

/// The EOS id plus every vocabulary entry named like an end-of-turn or end-of-text token.
fn end_tokens(eos: Option<u32>, vocab: &[String]) -> Vec<u32> {
    let mut ids: BTreeSet<u32> = eos.into_iter().collect();
    for (i, t) in vocab.iter().enumerate() {
        if END_TOKEN_NAMES.contains(&t.as_str()) {
            ids.insert(i as u32);
        }
    }
    ids.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_lines_split_across_chunks() {
        let mut p = SseParser::default();
        assert!(p.push(b"data: {\"a\":").unwrap().is_empty());
        let ev = p.push(b" 1}\n\n: ping\n\ndata: [DONE]\n\n").unwrap();
        assert_eq!(ev, vec![SseEvent::Data(json!({"a": 1})), SseEvent::Done]);
        // CRLF line ends, no space after the colon.
        let ev = p.push(b"data:{\"b\":2}\r\n\r\n").unwrap();
        assert_eq!(ev, vec![SseEvent::Data(json!({"b": 2}))]);
        assert!(p.push(b"data: not json\n").is_err());
    }

    #[test]
    fn chunks_count_tokens_and_times() {
        let mut s = StreamStats::default();
        let role = json!({"choices": [{"delta": {"role": "assistant"}, "finish_reason": null}]});
        s.observe(&role, 0.1).unwrap();
        for (i, t) in [0.5, 0.6, 0.7, 0.9].iter().enumerate() {
            let c = json!({"choices": [{"delta": {"content": format!("w{i}")}}]});
            s.observe(&c, *t).unwrap();
        }
        s.observe(
            &json!({"choices": [{"delta": {}, "finish_reason": "length"}]}),
            0.9,
        )
        .unwrap();
        assert_eq!(s.first_content_s, Some(0.5));
        assert_eq!(s.tokens(), 4);
        assert_eq!(s.token_source(), "chunks");
        assert!((s.decode_tok_s() - 3.0 / 0.4).abs() < 1e-9);
        assert_eq!(s.finish_reason.as_deref(), Some("length"));
        // The final usage chunk (no choices) wins over the chunk count.
        let usage = json!({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 5}});
        s.observe(&usage, 1.0).unwrap();
        assert_eq!(s.tokens(), 5);
        assert_eq!(s.token_source(), "usage");
        assert!(s.observe(&json!({"error": {"message": "x"}}), 1.0).is_err());
    }

    #[test]
    fn speeds() {
        assert_eq!(decode_tok_s(1, Some(0.1), Some(0.1)), 0.0);
        assert_eq!(decode_tok_s(11, Some(1.0), Some(3.0)), 5.0);
        assert_eq!(decode_tok_s(5, None, None), 0.0);
        assert_eq!(aggregate_tok_s(100, 4.0), 25.0);
        assert_eq!(aggregate_tok_s(100, 0.0), 0.0);
    }

    #[test]
    fn end_tokens_from_vocab_and_eos() {
        let vocab: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(end_tokens(Some(2), &vocab), vec![0, 2]);
        assert_eq!(end_tokens(None, &[]), Vec::<u32>::new());
    }

    #[test]
    fn body_bans_tokens_and_asks_for_usage() {
        let b = request_body("m", 8, &[151643, 151645].into_iter().collect(), 7);
        assert_eq!(b["logit_bias"]["151645"], json!(-100));
        assert_eq!(b["stream_options"]["include_usage"], json!(true));
        assert!(request_body("m", 8, &BTreeSet::new(), 8)
            .get("logit_bias")
            .is_none());
        assert_ne!(
            b["messages"],
            request_body("m", 8, &BTreeSet::new(), 8)["messages"]
        );
        assert_ne!(next_tag(), next_tag());
    }
}
