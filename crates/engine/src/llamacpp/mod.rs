//! [`Engine`] over llama.cpp (through the `llama-cpp-2` crate, built from source, CPU only).
//!
//! One [`LlamaCppEngine`] is one `llama_context` whose KV cache holds `max_sequences` sequences
//! of `context_tokens` each (f16), on top of a mmapped model that every engine of the same file
//! shares ([`resident`]): a second worker costs its KV cache, compute buffers and thread, not a
//! second load. A dedicated OS thread owns the
//! context and runs continuous batching ([`batcher`]): new requests arrive on a channel, are
//! prefilled, and every active sequence decodes together in one batch per step, each with its own
//! sampler chain and grammar. Dropping a stream cancels its sequence and frees its KV cells at
//! the next step.
//!
//! Prompts are rendered with the GGUF's chat template by [`chat`] (as mistral.rs does), output
//! is cut into whole-character deltas with stop strings by [`super::text_out`], and tool calls are parsed
//! by [`tool_calls`]. Grammars (regex, JSON schema, JSON object, Lark) run through llguidance,
//! the same library mistral.rs uses, masking logits before sampling.

mod batcher;
pub mod chat;
mod embed;
mod memory;
mod resident;
pub mod tool_calls;

use std::ffi::{c_char, c_void, CStr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use futures::future::BoxFuture;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::mpsc;

use self::batcher::{Job, Msg};
pub use self::resident::is_resident;
use self::resident::Resident;
use super::logit_bias::check_logit_bias;
use super::{DeviceInfo, Engine, EngineConfig, EngineError, EngineInfo, GenerationStream, Health};
use crate::embed::{EmbedRequest, Embeddings, Pooling};
use crate::request::{
    GenerationEvent, GenerationRequest, OutputConstraint, Prompt, ToolChoice, ToolSpec,
};
use tidepool_models::catalog::DeviceClass;
use tidepool_models::model_source::LocalModel;

/// `EngineInfo::backend` of this engine.
pub const BACKEND: &str = "llama.cpp";

/// Tokens of context each sequence gets when the caller does not say.
pub const DEFAULT_CONTEXT_TOKENS: u32 = 4096;

/// The process-wide llama.cpp backend (it may be initialised once per process).
fn backend() -> Result<&'static LlamaBackend, EngineError> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            route_logs_to_tracing();
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| EngineError::Unavailable(format!("llama.cpp backend: {e}")))
}

/// llama.cpp and ggml log to stderr by default; send their lines to `tracing` instead, errors as
/// warnings and everything else at debug level (model loading alone is hundreds of lines).
fn route_logs_to_tracing() {
    extern "C" fn log(level: llama_cpp_sys_2::ggml_log_level, text: *const c_char, _: *mut c_void) {
        if text.is_null() {
            return;
        }
        // SAFETY: llama.cpp passes a NUL-terminated string valid for this call.
        let text = unsafe { CStr::from_ptr(text) }.to_string_lossy();
        let text = text.trim_end();
        if text.is_empty() {
            return;
        }
        memory::note(text);
        if level == llama_cpp_sys_2::GGML_LOG_LEVEL_ERROR {
            tracing::warn!(target: "llama.cpp", "{text}");
        } else {
            tracing::debug!(target: "llama.cpp", "{text}");
        }
    }
    // SAFETY: registers a static callback that ignores its user-data pointer.
    unsafe { llama_cpp_sys_2::llama_log_set(Some(log), std::ptr::null_mut()) };
}

/// What the caller's side of the engine shares with its batching thread.
struct Shared {
    /// The weights, shared with every other worker of the same file.
    resident: Arc<Resident>,
    /// Tokens of context per sequence.
    context_tokens: u32,
    /// How embeddings are pooled: the configuration's choice, else the model's own.
    pooling: Pooling,
    thread: Arc<ThreadState>,
}

/// Whether the batching thread runs. Held apart from [`Shared`] so the thread can drop its hold
/// on the weights before it says it has ended: once [`LlamaCppEngine::shutdown`] returns,
/// dropping the engine unloads weights no other worker holds.
struct ThreadState {
    /// Cleared by the batching thread when it ends (a panic included).
    alive: AtomicBool,
    /// Why the batching thread ended, once it has.
    died: Mutex<Option<String>>,
    /// Woken when the batching thread ends.
    ended: tokio::sync::Notify,
}

/// A llama.cpp model instance with its batching thread.
pub struct LlamaCppEngine {
    shared: Arc<Shared>,
    jobs: std::sync::mpsc::Sender<Msg>,
    info: EngineInfo,
}

impl LlamaCppEngine {
    /// Loads `model` with `context_tokens` of KV cache per sequence, computing on `threads` CPU
    /// threads (`None`: every core Tidepool's CPU limit allows). Blocking work runs on a blocking
    /// thread and the engine's own thread.
    pub async fn load(
        model: &LocalModel,
        cfg: &EngineConfig,
        context_tokens: u32,
        threads: Option<usize>,
    ) -> Result<LlamaCppEngine, EngineError> {
        let (model, cfg) = (model.clone(), cfg.clone());
        tokio::task::spawn_blocking(move || {
            Self::load_blocking(&model, &cfg, context_tokens, threads)
        })
        .await
        .map_err(|e| EngineError::Internal(format!("the loader panicked: {e}")))?
    }

    fn load_blocking(
        model: &LocalModel,
        cfg: &EngineConfig,
        context_tokens: u32,
        threads: Option<usize>,
    ) -> Result<LlamaCppEngine, EngineError> {
        let load_err = |message: String| EngineError::Load {
            model: model.name.clone(),
            message,
        };
        let started = Instant::now();
        let backend = backend()?;
        // The weights and header are read once per file; a worker that finds them resident
        // only creates its context.
        let (resident, loaded) = resident::acquire(&model.files).map_err(load_err)?;
        let gguf = resident.gguf.clone();
        let n_ctx_train = resident.model.n_ctx_train().max(1);
        let context_tokens = context_tokens.min(n_ctx_train).max(16);
        let slots = cfg.max_sequences.max(1);
        let pooling = cfg
            .pooling
            .unwrap_or_else(|| embed::model_pooling(&resident));
        let shared = Arc::new(Shared {
            resident,
            context_tokens,
            pooling,
            thread: Arc::new(ThreadState {
                alive: AtomicBool::new(true),
                died: Mutex::new(None),
                ended: tokio::sync::Notify::new(),
            }),
        });
        let threads = threads
            .unwrap_or_else(crate::available_cores)
            .clamp(1, i32::MAX as usize) as i32;
        let n_batch = 512u32.max(slots as u32);
        let ctx_params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(context_tokens * slots as u32))
            .with_n_seq_max(slots as u32)
            .with_n_batch(n_batch)
            .with_n_ubatch(n_batch)
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
        let (jobs, ready) = batcher::spawn(shared.clone(), backend, ctx_params, slots, n_batch)
            .map_err(|e| load_err(e.to_string()))?;
        let mut memory = ready
            .recv()
            .map_err(|_| load_err("the engine thread died while starting".into()))?
            .map_err(load_err)?;
        // llama.cpp sizes its compute buffer for a whole batch of logits (n_batch × vocab f32),
        // but this engine asks for at most one row per sequence per step: the rest is allocated
        // and never touched, so it never becomes resident. The ledger counts what can be.
        let unused_logits = (n_batch as u64).saturating_sub(slots as u64)
            * shared.resident.model.n_vocab().max(0) as u64
            * 4;
        memory.buffers = memory.buffers.saturating_sub(unused_logits);
        tracing::info!(
            model = %model.name,
            backend = BACKEND,
            threads,
            slots,
            context_tokens,
            kv_mib = memory.kv_cache as f64 / 1048576.0,
            buffers_mib = memory.buffers as f64 / 1048576.0,
            weights = if loaded { "loaded" } else { "shared" },
            load_s = started.elapsed().as_secs_f64(),
            "engine ready"
        );
        Ok(LlamaCppEngine {
            shared,
            jobs,
            info: EngineInfo {
                model: model.name.clone(),
                device: DeviceInfo {
                    name: "cpu".into(),
                    class: DeviceClass::Cpu,
                },
                max_sequence_length: context_tokens as usize,
                max_sequences: slots,
                gguf,
                backend: BACKEND,
                threads: Some(threads as usize),
                shares_weights: true,
                own_memory: Some(memory),
            },
        })
    }

    /// The prompt's tokens, rendered and tokenized on the blocking pool (a long conversation
    /// takes a while, and must not hold up the async runtime).
    async fn prompt_tokens(
        &self,
        prompt: &Prompt,
        tools: &[ToolSpec],
    ) -> Result<Vec<LlamaToken>, EngineError> {
        let shared = self.shared.clone();
        let (prompt, tools) = (prompt.clone(), tools.to_vec());
        tokio::task::spawn_blocking(move || shared.resident.prompt_tokens(&prompt, &tools))
            .await
            .map_err(|e| EngineError::Internal(format!("rendering the prompt failed: {e}")))?
    }
}

impl Engine for LlamaCppEngine {
    fn info(&self) -> &EngineInfo {
        &self.info
    }

    fn health(&self) -> Health {
        if self.shared.thread.alive.load(Ordering::Acquire) {
            return Health::Ok;
        }
        let why = self
            .shared
            .thread
            .died
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| "the llama.cpp engine thread ended".into());
        Health::Dead(why)
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _ = self.jobs.send(Msg::Stop);
            self.ended().await;
        })
    }

    fn count_tokens<'a>(
        &'a self,
        prompt: &'a Prompt,
        tools: &'a [ToolSpec],
    ) -> BoxFuture<'a, Result<u32, EngineError>> {
        Box::pin(async move { Ok(self.prompt_tokens(prompt, tools).await?.len() as u32) })
    }

    fn embed(&self, request: EmbedRequest) -> BoxFuture<'_, Result<Embeddings, EngineError>> {
        Box::pin(async move {
            if let Some(why) = self.health().dead_reason() {
                return Err(EngineError::Unavailable(why));
            }
            let shared = self.shared.clone();
            let threads = self.info.threads.unwrap_or(1).clamp(1, i32::MAX as usize) as i32;
            // Dropped with this future (the client went away, so its slot is given back): the
            // blocking work stops at its next batch instead of computing on beside the next
            // request.
            let cancel = CancelOnDrop::default();
            let cancelled = cancel.0.clone();
            tokio::task::spawn_blocking(move || {
                embed::embed_blocking(
                    &shared.resident,
                    backend()?,
                    threads,
                    shared.context_tokens as usize,
                    shared.pooling,
                    &request,
                    &cancelled,
                )
            })
            .await
            .map_err(|e| EngineError::Internal(format!("embedding panicked: {e}")))?
        })
    }

    fn generate(
        &self,
        request: GenerationRequest,
    ) -> BoxFuture<'_, Result<GenerationStream, EngineError>> {
        Box::pin(async move {
            let started = Instant::now();
            check_logit_bias(&request.sampling, self.info.gguf.shape.vocab)?;
            let tools_on = !request.tools.is_empty() && request.tool_choice != ToolChoice::None;
            let tools: &[ToolSpec] = if tools_on { &request.tools } else { &[] };
            let tokens = self.prompt_tokens(&request.prompt, tools).await?;
            if tokens.is_empty() {
                return Err(EngineError::Invalid("the prompt is empty".into()));
            }
            let limit = self.shared.context_tokens as usize;
            if tokens.len() >= limit {
                return Err(EngineError::Invalid(format!(
                    "the prompt is {} tokens, but this engine's context holds {limit} per sequence",
                    tokens.len()
                )));
            }
            let matcher = if tools_on || request.constraint != OutputConstraint::None {
                // A grammar that cannot run is refused before it takes a sequence slot.
                let checked = request.clone();
                tokio::task::spawn_blocking(move || crate::grammar::check(&checked))
                    .await
                    .map_err(|e| {
                        EngineError::Internal(format!("checking the grammar failed: {e}"))
                    })??;
                self.shared.resident.matcher(&request)?
            } else {
                None
            };
            let (tx, rx) = mpsc::unbounded_channel();
            let job = Job {
                tokens,
                sampling: request.sampling,
                matcher,
                parse_tools: tools_on,
                events: tx,
                started,
            };
            self.jobs.send(Msg::Job(Box::new(job))).map_err(|_| {
                EngineError::Unavailable(
                    self.health()
                        .dead_reason()
                        .unwrap_or_else(|| "the engine has stopped".into()),
                )
            })?;
            let stream =
                futures::stream::unfold(
                    rx,
                    |mut rx| async move { rx.recv().await.map(|e| (e, rx)) },
                );
            Ok(Box::pin(stream) as GenerationStream)
        })
    }
}

impl LlamaCppEngine {
    /// Resolves once the batching thread has ended.
    pub(crate) async fn ended(&self) {
        loop {
            let woken = self.shared.thread.ended.notified();
            if !self.shared.thread.alive.load(Ordering::Acquire) {
                return;
            }
            woken.await;
        }
    }

    /// Makes the engine thread's next step panic (tests of the panic path).
    #[cfg(test)]
    pub(crate) fn panic_next_step(&self) {
        let _ = self.jobs.send(Msg::Panic);
    }
}

impl Drop for LlamaCppEngine {
    fn drop(&mut self) {
        tracing::debug!(model = %self.info.model, "llama.cpp engine dropped");
    }
}

/// Sets its flag when dropped.
#[derive(Default)]
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Sends the last event of a stream that failed before it started.
pub(crate) fn fail(events: &mpsc::UnboundedSender<GenerationEvent>, why: String) {
    let _ = events.send(GenerationEvent::Error(why));
}

#[cfg(test)]
mod tests;
