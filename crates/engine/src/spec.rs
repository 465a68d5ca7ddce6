//! What it takes to load one more instance of an engine: the pool keeps one [`EngineSpec`] per
//! model and calls [`EngineSpec::load`] each time it adds a worker, whichever library runs it.

use std::sync::Arc;

use futures::future::BoxFuture;
use tidepool_models::model_source::LocalModel;

use crate::choice::EngineKind;
use crate::{Engine, EngineConfig, EngineError};

/// One model on one engine, loadable as many times as the pool asks.
#[derive(Debug, Clone)]
pub struct EngineSpec {
    pub kind: EngineKind,
    pub model: LocalModel,
    pub config: EngineConfig,
    /// Tokens of context per slot: llama.cpp sizes its KV cache by it (mistral.rs allocates as
    /// sequences grow, up to the model's context).
    pub context_tokens: u32,
    /// CPU threads per llama.cpp instance; `None`: every core the CPU limit allows.
    pub threads: Option<usize>,
}

impl EngineSpec {
    /// Concurrent sequences per instance.
    pub fn slots(&self) -> usize {
        self.config.max_sequences.max(1)
    }

    /// Loads one instance (blocking work runs off the async runtime).
    pub fn load(&self) -> BoxFuture<'static, Result<Arc<dyn Engine>, EngineError>> {
        let spec = self.clone();
        Box::pin(async move {
            match spec.kind {
                #[cfg(feature = "mistralrs")]
                EngineKind::MistralRs => {
                    let e = crate::mistral::MistralEngine::load(&spec.model, &spec.config).await?;
                    Ok(Arc::new(e) as Arc<dyn Engine>)
                }
                #[cfg(feature = "llamacpp")]
                EngineKind::LlamaCpp => {
                    let e = crate::llamacpp::LlamaCppEngine::load(
                        &spec.model,
                        &spec.config,
                        spec.context_tokens,
                        spec.threads,
                    )
                    .await?;
                    Ok(Arc::new(e) as Arc<dyn Engine>)
                }
                #[allow(unreachable_patterns)]
                other => Err(EngineError::Load {
                    model: spec.model.name.clone(),
                    message: format!("this build has no {} engine", other.name()),
                }),
            }
        })
    }
}
