//! The speed probe behind `engine = "auto"` on the CPU: load each engine with one slot, run a
//! short greedy decode (twice, keeping the better) after a warm-up, and report decode tokens per
//! second. Takes a few seconds
//! per engine for a 0.5B model; the result is stored (see [`super::choice::SpeedRecords`]) so it
//! runs once per model, device and Tidepool version.

use std::time::Instant;

use futures::StreamExt;

use super::choice::{EngineKind, Measured, ProbeKey};
use super::{Engine, EngineConfig, EngineError};
use crate::request::{ChatMessage, GenerationEvent, GenerationRequest, Role};
use tidepool_models::model_source::LocalModel;

/// Tokens decoded in the timed run.
pub const PROBE_TOKENS: u32 = 32;

/// The key a measurement of `model` on `device` is stored under.
pub fn probe_key(model: &LocalModel, device: &str) -> ProbeKey {
    let first = model.files.first();
    ProbeKey {
        file: first
            .and_then(|f| f.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        bytes: model
            .files
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum(),
        device: device.to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

/// Measures both engines on `model` (each loaded alone, then dropped).
pub async fn measure(
    model: &LocalModel,
    cfg: &EngineConfig,
    context_tokens: u32,
) -> Result<Measured, EngineError> {
    let one = EngineConfig {
        max_sequences: 1,
        prefix_cache_entries: 0,
        ..cfg.clone()
    };
    let mistralrs = {
        let e = super::mistral::MistralEngine::load(model, &one).await?;
        decode_speed(&e).await?
    };
    tracing::info!(
        engine = EngineKind::MistralRs.name(),
        tokens_per_s = mistralrs,
        "speed probe"
    );
    let llamacpp = {
        let e = super::llamacpp::LlamaCppEngine::load(model, &one, context_tokens.min(1024), None)
            .await?;
        decode_speed(&e).await?
    };
    tracing::info!(
        engine = EngineKind::LlamaCpp.name(),
        tokens_per_s = llamacpp,
        "speed probe"
    );
    Ok(Measured {
        mistralrs,
        llamacpp,
    })
}

/// Decode tokens per second of one greedy generation after a short warm-up.
pub async fn decode_speed(engine: &dyn Engine) -> Result<f64, EngineError> {
    // A chat request: instruct models may end a bare text prompt at once (SmolLM2 does), while
    // asked for a long story they keep going.
    let prompt = "Write a long story about a lighthouse keeper and the sea.";
    run(engine, prompt, 4).await?;
    // The better of two runs: on a busy machine one run can lose its time slices to other
    // processes, and the probe is about the engine, not about that moment.
    let mut best: f64 = 0.0;
    for _ in 0..2 {
        let started = Instant::now();
        let (tokens, first) = run(engine, prompt, PROBE_TOKENS).await?;
        let decode = started.elapsed().saturating_sub(first);
        if tokens <= 1 || decode.is_zero() {
            return Err(EngineError::Internal(format!(
                "the speed probe generated only {tokens} token(s)"
            )));
        }
        best = best.max((tokens - 1) as f64 / decode.as_secs_f64());
    }
    Ok(best)
}

/// Generated tokens and the time to the first one.
async fn run(
    engine: &dyn Engine,
    prompt: &str,
    max_tokens: u32,
) -> Result<(u32, std::time::Duration), EngineError> {
    let mut req = GenerationRequest::chat(vec![ChatMessage::new(Role::User, prompt)]);
    req.sampling.temperature = Some(0.0);
    req.sampling.max_tokens = Some(max_tokens);
    let started = Instant::now();
    let mut s = engine.generate(req).await?;
    let mut first = None;
    while let Some(e) = s.next().await {
        match e {
            GenerationEvent::Text(_) | GenerationEvent::ToolCalls(_) => {
                first.get_or_insert_with(|| started.elapsed());
            }
            GenerationEvent::Done { usage, .. } => {
                return Ok((
                    usage.completion_tokens,
                    first.unwrap_or(usage.time_to_first_token),
                ))
            }
            GenerationEvent::Error(e) => return Err(EngineError::Internal(e)),
        }
    }
    Err(EngineError::Internal(
        "the stream ended without Done".into(),
    ))
}
