//! Weights loaded once per model file and shared by every worker on top.
//!
//! A [`Resident`] is one `llama_model` (the mmapped GGUF) with what is read from it once: the chat
//! template, the special tokens, llguidance's view of the vocabulary. Every [`super::LlamaCppEngine`]
//! of the same file holds an `Arc` of it and adds only its own `llama_context` (KV cache, compute
//! buffers, threads), so a new worker allocates memory and starts a thread instead of reloading.
//! The cache keeps `Weak` references: when the last worker of a model ends, its weights are
//! unloaded (scale to zero), and the next worker loads them again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use llguidance::{Matcher, ParserFactory};
use tidepool_models::gguf_info::GgufInfo;

use super::chat::{ChatTemplate, Segment};
use crate::request::{GenerationRequest, Prompt, ToolSpec};
use crate::EngineError;

/// One loaded model, shared by its workers.
pub(crate) struct Resident {
    pub model: LlamaModel,
    pub template: Option<ChatTemplate>,
    /// llguidance's view of the vocabulary, built on the first constrained request.
    grammar: OnceLock<Result<Arc<ParserFactory>, String>>,
    /// What Tidepool read from the GGUF's header (once: a large vocabulary takes a while),
    /// the special tokens client text must not forge included.
    pub gguf: GgufInfo,
}

/// Each model file's slot: locked while it loads, so two workers started at once load it once.
type Slot = Arc<Mutex<Weak<Resident>>>;

fn cache() -> &'static Mutex<HashMap<PathBuf, Slot>> {
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, Slot>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// Whether the weights of `path` are loaded now (held by at least one worker).
pub fn is_resident(path: &Path) -> bool {
    let slot = cache()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&crate::model_key(path))
        .cloned();
    slot.is_some_and(|s| s.lock().unwrap_or_else(|p| p.into_inner()).strong_count() > 0)
}

/// The resident model of `files` (a GGUF, or its splits, first one first), loading it first if
/// no worker holds it (blocking). The second value is whether this call loaded it; the error
/// says why it could not be loaded.
pub(crate) fn acquire(files: &[PathBuf]) -> Result<(Arc<Resident>, bool), String> {
    let path = files.first().ok_or("no model file")?;
    let slot = {
        let mut cache = cache().lock().unwrap_or_else(|p| p.into_inner());
        // Forget files no worker holds (their slot is not being loaded: nobody has it locked).
        cache.retain(|_, s| {
            Arc::strong_count(s) > 1 || s.try_lock().map(|w| w.strong_count() > 0).unwrap_or(true)
        });
        cache.entry(crate::model_key(path)).or_default().clone()
    };
    let mut held = slot.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(r) = held.upgrade() {
        return Ok((r, false));
    }
    let r = Arc::new(Resident::load(files)?);
    *held = Arc::downgrade(&r);
    Ok((r, true))
}

impl Resident {
    fn load(files: &[PathBuf]) -> Result<Resident, String> {
        let gguf = GgufInfo::read_cached(files).map_err(|e| e.to_string())?;
        // The first split names the others; llama.cpp finds them beside it.
        let path = &files[0];
        let backend = super::backend().map_err(|e| e.to_string())?;
        let params = LlamaModelParams::default().with_use_mmap(true);
        let model = LlamaModel::load_from_file(backend, path, &params)
            .map_err(|e| format!("llama.cpp could not load {}: {e}", path.display()))?;
        let special = |t: LlamaToken| -> String {
            if t.0 < 0 {
                return String::new();
            }
            String::from_utf8_lossy(&model.vocab().token_to_piece(t, true, None)).into_owned()
        };
        let template = model
            .meta_val_str("tokenizer.chat_template")
            .ok()
            .map(|source| ChatTemplate {
                source,
                bos_token: special(model.vocab().bos()),
                eos_token: special(model.vocab().eos()),
            });
        tracing::debug!(path = %path.display(), "llama.cpp: weights loaded");
        Ok(Resident {
            model,
            template,
            grammar: OnceLock::new(),
            gguf,
        })
    }

    /// The prompt's tokens. A chat prompt is rendered by the chat template into template and
    /// client segments: the template's text is tokenized with special tokens on, the client's
    /// with them off, so control tokens typed into a message stay text. A raw text prompt is
    /// the client's own template and is tokenized with special tokens on, as llama.cpp's server
    /// does.
    pub fn prompt_tokens(
        &self,
        prompt: &Prompt,
        tools: &[ToolSpec],
    ) -> Result<Vec<LlamaToken>, EngineError> {
        let vocab = self.model.vocab();
        match prompt {
            Prompt::Text(t) => Ok(vocab.tokenize(t.as_bytes(), true, true)),
            Prompt::Chat(messages) => {
                if messages.is_empty() {
                    return Err(EngineError::Invalid("`messages` must not be empty".into()));
                }
                let template = self.template.as_ref().ok_or_else(|| {
                    EngineError::Invalid("this model has no chat template".into())
                })?;
                let mut messages = messages.clone();
                let mut tools = tools.to_vec();
                crate::special_tokens::neutralize_request(
                    &mut messages,
                    &mut tools,
                    &self.gguf.special_tokens,
                    false,
                );
                let segments = template
                    .render_segments(&messages, &tools, &self.gguf.special_tokens)
                    .map_err(|e| EngineError::Invalid(e.to_string()))?;
                let mut tokens = Vec::new();
                for (i, seg) in segments.iter().enumerate() {
                    let (text, special) = match seg {
                        Segment::Template(t) => (t, true),
                        Segment::Client(t) => (t, false),
                    };
                    vocab.tokenize_into(text.as_bytes(), &mut tokens, i == 0, special);
                }
                Ok(tokens)
            }
        }
    }

    fn parser_factory(&self) -> Result<Arc<ParserFactory>, EngineError> {
        self.grammar
            .get_or_init(|| {
                let env = super::batcher::tok_env(&self.model);
                ParserFactory::new_simple(&env)
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(|e| EngineError::Internal(format!("grammar support: {e}")))
    }

    /// The grammar matcher of a request, or `None` when its output is free; a grammar that
    /// cannot run is refused here ([`crate::grammar::matcher`]).
    pub fn matcher(&self, req: &GenerationRequest) -> Result<Option<Matcher>, EngineError> {
        match crate::grammar::of(req)? {
            None => Ok(None),
            Some(g) => Ok(Some(crate::grammar::matcher(&*self.parser_factory()?, g)?)),
        }
    }
}

impl Drop for Resident {
    fn drop(&mut self) {
        tracing::debug!("llama.cpp: weights unloaded (their last worker ended)");
    }
}
