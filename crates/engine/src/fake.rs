//! A scripted [`Engine`] for the tests of the crates above this one (scheduler, control loop,
//! gateway), which build and test without an inference library. It answers every request with
//! `tokens` copies of `"tok "` (one event each), stops at `max_tokens`, can be told to hold each
//! token until released, and can be killed. The real engines are tested on real models in this
//! crate and end to end.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::StreamExt;
use tidepool_models::catalog::DeviceClass;
use tidepool_models::gguf_info::{GgufInfo, ModelShape};

use crate::embed::{EmbedInput, EmbedRequest, Embeddings, Pooling};
use crate::request::{FinishReason, GenerationEvent, GenerationRequest, Prompt, ToolSpec, Usage};
use crate::{DeviceInfo, Engine, EngineError, EngineInfo, GenerationStream, Health};

/// The fake engine. Share it as `Arc<FakeEngine>`.
pub struct FakeEngine {
    info: EngineInfo,
    /// Tokens per answer when the request names no `max_tokens`.
    pub tokens: u32,
    dead: AtomicBool,
    /// The next `generate` or `count_tokens` finds the engine gone (it died after it was
    /// picked).
    dies_at_request: AtomicBool,
    /// Generations started.
    pub started: AtomicUsize,
    /// When set, each token waits for [`FakeEngine::release`].
    gate: Option<Arc<tokio::sync::Semaphore>>,
}

impl FakeEngine {
    /// An engine with `slots` sequences that answers `tokens` tokens.
    pub fn new(slots: usize, tokens: u32) -> FakeEngine {
        FakeEngine {
            info: EngineInfo {
                model: "fake".into(),
                device: DeviceInfo {
                    name: "cpu".into(),
                    class: DeviceClass::Cpu,
                },
                max_sequence_length: 4096,
                max_sequences: slots,
                gguf: fake_gguf(),
                backend: "fake",
                threads: None,
                shares_weights: false,
                own_memory: None,
            },
            tokens,
            dead: AtomicBool::new(false),
            dies_at_request: AtomicBool::new(false),
            started: AtomicUsize::new(0),
            gate: None,
        }
    }

    /// The same, holding every token until [`FakeEngine::release`] lets it go.
    pub fn gated(slots: usize, tokens: u32) -> FakeEngine {
        FakeEngine {
            gate: Some(Arc::new(tokio::sync::Semaphore::new(0))),
            ..FakeEngine::new(slots, tokens)
        }
    }

    /// Lets `n` held tokens go.
    pub fn release(&self, n: usize) {
        if let Some(g) = &self.gate {
            g.add_permits(n);
        }
    }

    /// The engine dies: `health` says so and requests are refused.
    pub fn kill(&self) {
        self.dead.store(true, Ordering::SeqCst);
    }

    /// The engine dies when the next generation or token count reaches it, as one whose thread
    /// ends between being picked and the request's arrival does.
    pub fn dies_at_next_request(&self) {
        self.dies_at_request.store(true, Ordering::SeqCst);
    }
}

impl FakeEngine {
    /// A request reached the engine: refused if it is dead (or dies now).
    fn reached(&self) -> Result<(), EngineError> {
        if self.dies_at_request.swap(false, Ordering::SeqCst) {
            self.kill();
        }
        match self.health() {
            Health::Dead(why) => Err(EngineError::Unavailable(why)),
            Health::Ok => Ok(()),
        }
    }
}

/// A GGUF description of the fake model's shapes (a tiny Qwen2).
pub fn fake_gguf() -> GgufInfo {
    GgufInfo {
        files: Vec::new(),
        name: Some("fake".into()),
        shape: ModelShape {
            arch: "qwen2".into(),
            context_length: 4096,
            layers: 2,
            kv_heads: 2,
            head_dim: 16,
            hidden: 64,
            vocab: 1024,
        },
        tensor_bytes: 1 << 20,
        token_embd_bytes: 1 << 16,
        tied_embeddings: true,
        tensor_types: BTreeMap::new(),
        n_tensors: 1,
        has_chat_template: true,
        eos_token_id: Some(1004),
        special_tokens: vec!["<|im_start|>".into(), "<|im_end|>".into()],
    }
}

impl Engine for FakeEngine {
    fn info(&self) -> &EngineInfo {
        &self.info
    }

    fn health(&self) -> Health {
        if self.dead.load(Ordering::SeqCst) {
            Health::Dead("the fake engine was killed".into())
        } else {
            Health::Ok
        }
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        self.kill();
        Box::pin(async {})
    }

    fn generate(
        &self,
        request: GenerationRequest,
    ) -> BoxFuture<'_, Result<GenerationStream, EngineError>> {
        Box::pin(async move {
            self.reached()?;
            self.started.fetch_add(1, Ordering::SeqCst);
            let n = request.sampling.max_tokens.unwrap_or(self.tokens);
            let prompt_tokens = prompt_len(&request.prompt);
            let gate = self.gate.clone();
            let started = Instant::now();
            let tokens = futures::stream::iter(0..n).then(move |_| {
                let gate = gate.clone();
                async move {
                    if let Some(g) = gate {
                        if let Ok(p) = g.acquire().await {
                            p.forget();
                        }
                    }
                    GenerationEvent::Text("tok ".into())
                }
            });
            let done = futures::stream::once(async move {
                GenerationEvent::Done {
                    finish_reason: FinishReason::Length,
                    usage: Usage {
                        prompt_tokens,
                        completion_tokens: n,
                        time_to_first_token: Duration::ZERO,
                        total_time: started.elapsed(),
                    },
                }
            });
            Ok(Box::pin(tokens.chain(done)) as GenerationStream)
        })
    }

    fn count_tokens<'a>(
        &'a self,
        prompt: &'a Prompt,
        _tools: &'a [ToolSpec],
    ) -> BoxFuture<'a, Result<u32, EngineError>> {
        Box::pin(async move {
            self.reached()?;
            Ok(prompt_len(prompt))
        })
    }

    fn embed(&self, request: EmbedRequest) -> BoxFuture<'_, Result<Embeddings, EngineError>> {
        Box::pin(async move {
            self.reached()?;
            let mut prompt_tokens = 0;
            let mut vectors = Vec::with_capacity(request.inputs.len());
            for (i, input) in request.inputs.iter().enumerate() {
                let bytes: Vec<u8> = match input {
                    EmbedInput::Text(t) => t.as_bytes().to_vec(),
                    EmbedInput::Tokens(ids) => ids.iter().flat_map(|t| t.to_le_bytes()).collect(),
                };
                if bytes.is_empty() {
                    return Err(EngineError::Invalid(format!("input {i} is empty")));
                }
                prompt_tokens += (bytes.len() as u64 / 4).max(1);
                vectors.push(fake_vector(&bytes));
            }
            Ok(Embeddings {
                vectors,
                prompt_tokens,
                pooling: Pooling::Mean,
            })
        })
    }
}

/// Width of the fake engine's embeddings.
pub const FAKE_EMBEDDING_WIDTH: usize = 8;

/// A vector that depends on the bytes and only on them: how many fall in each of 8 residue
/// classes, plus one (so it is never zero).
fn fake_vector(bytes: &[u8]) -> Vec<f32> {
    let mut v = vec![1.0f32; FAKE_EMBEDDING_WIDTH];
    for b in bytes {
        v[usize::from(*b) % FAKE_EMBEDDING_WIDTH] += 1.0;
    }
    v
}

/// One token per 4 bytes of prompt text, at least one.
fn prompt_len(p: &Prompt) -> u32 {
    let bytes = match p {
        Prompt::Text(t) => t.len(),
        Prompt::Chat(m) => m.iter().map(|m| m.content.len() + 8).sum(),
    };
    (bytes / 4).max(1) as u32
}
