//! The engine boundary: everything above it (scheduler, gateway, API) sees only [`Engine`] and the
//! internal request and event types of [`request`]; below it is one inference library instance:
//! mistral.rs ([`mistral::MistralEngine`], feature `mistralrs`) or llama.cpp
//! ([`llamacpp::LlamaCppEngine`], feature `llamacpp`), both on by default. [`choice`] says which
//! one serves a model, [`EngineSpec`] loads one more instance of it for the pool.
//!
//! Shared by both engines: output constraints ([`grammar`]), stop strings and whole-character
//! deltas ([`text_out`]), keeping typed control tokens as text ([`special_tokens`]), and the
//! `logit_bias` check ([`logit_bias`]). Built without either feature, the crate has the types and
//! the pure parts only, which is what the scheduler, the control loop and the gateway need.

pub mod choice;
pub mod embed;
pub mod fake;
pub mod grammar;
#[cfg(feature = "llamacpp")]
pub mod llamacpp;
pub mod logit_bias;
#[cfg(feature = "mistralrs")]
pub mod mistral;
#[cfg(all(feature = "llamacpp", feature = "mistralrs"))]
pub mod probe;
pub mod request;
#[cfg(feature = "mistralrs")]
pub mod seeded;
mod spec;
pub mod special_tokens;
#[cfg(all(test, any(feature = "mistralrs", feature = "llamacpp")))]
mod test_fixture;
pub mod text_out;
#[cfg(feature = "mistralrs")]
pub mod token_tap;

pub use request::{GenerationEvent, GenerationRequest};
pub use spec::EngineSpec;

use std::pin::Pin;

use futures::future::BoxFuture;
use futures::Stream;
use serde::Serialize;
use thiserror::Error;

#[cfg(test)]
mod tests {
    #[test]
    fn json_schemas_get_a_compact_layout_unless_they_choose_one() {
        let s = super::compact_json_schema(&serde_json::json!({"type": "object"}));
        assert_eq!(s["x-guidance"]["whitespace_flexible"], false);
        let own =
            serde_json::json!({"type": "object", "x-guidance": {"whitespace_flexible": true}});
        assert_eq!(super::compact_json_schema(&own), own);
    }
}

use crate::request::{Prompt, ToolSpec};
use tidepool_models::gguf_info::GgufInfo;

/// The events of one generation; dropping the stream cancels the generation.
pub type GenerationStream = Pin<Box<dyn Stream<Item = GenerationEvent> + Send>>;

#[derive(Debug, Error, Clone)]
pub enum EngineError {
    /// The request cannot be served as given (a client error: HTTP 400).
    #[error("{0}")]
    Invalid(String),
    /// The engine is not running (HTTP 503).
    #[error("engine unavailable: {0}")]
    Unavailable(String),
    /// The engine failed (HTTP 500).
    #[error("engine error: {0}")]
    Internal(String),
    /// Loading the model failed.
    #[error("failed to load {model}: {message}")]
    Load { model: String, message: String },
}

/// Where an engine runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceInfo {
    /// `cpu`, `cuda:0`, `metal:0`.
    pub name: String,
    pub class: tidepool_models::catalog::DeviceClass,
}

/// Static facts about a loaded engine.
#[derive(Debug, Clone, Serialize)]
pub struct EngineInfo {
    /// The name clients use for this model.
    pub model: String,
    pub device: DeviceInfo,
    /// The longest sequence (prompt + completion) the engine accepts.
    pub max_sequence_length: usize,
    /// Concurrent sequences the engine is configured for.
    pub max_sequences: usize,
    pub gguf: GgufInfo,
    /// Which library runs the model.
    pub backend: &'static str,
    /// CPU threads this instance computes on, where the engine takes a number (llama.cpp).
    pub threads: Option<usize>,
    /// Whether instances of one model share its weights (llama.cpp) or each load their own
    /// (mistral.rs: see docs/elasticity.md, "Weights once per model").
    pub shares_weights: bool,
    /// What this instance allocated beside the weights, where the engine says (llama.cpp).
    pub own_memory: Option<OwnMemory>,
}

/// Bytes one engine instance allocated for itself, beside the (possibly shared) weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct OwnMemory {
    pub kv_cache: u64,
    /// Compute and output buffers.
    pub buffers: u64,
}

/// A JSON schema for llguidance with one fixed layout (`, ` and `: `, no other whitespace), unless
/// the schema sets its own `x-guidance` options. llguidance's default lets whitespace go anywhere
/// between tokens, and a weak (or random-weight) model then pads with newlines and tabs until
/// `max_tokens` cuts the JSON short. Both engines use this, so they accept the same outputs.
pub(crate) fn compact_json_schema(schema: &serde_json::Value) -> serde_json::Value {
    let mut schema = schema.clone();
    if let Some(obj) = schema.as_object_mut() {
        obj.entry("x-guidance").or_insert_with(|| {
            serde_json::json!({
                "whitespace_flexible": false,
                "item_separator": ", ",
                "key_separator": ": ",
            })
        });
    }
    schema
}

/// Whether an engine can still serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Ok,
    /// The engine cannot serve again (its thread ended or panicked, its channel closed).
    Dead(String),
}

impl Health {
    pub fn is_ok(&self) -> bool {
        *self == Health::Ok
    }

    pub fn dead_reason(self) -> Option<String> {
        match self {
            Health::Ok => None,
            Health::Dead(why) => Some(why),
        }
    }
}

/// A Lark grammar (llguidance's dialect) for exactly one call of the tool `choice` names, or of
/// any one of `tools` for [`ToolChoice::Required`](crate::request::ToolChoice), in the Hermes
/// form Qwen2.5 and SmolLM2 use (`<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`),
/// the arguments held to that tool's schema. Both engines constrain a forcing `tool_choice` with
/// it, so the call always comes and always parses.
pub fn forced_call_lark(
    tools: &[crate::request::ToolSpec],
    choice: &crate::request::ToolChoice,
) -> Result<String, EngineError> {
    use crate::request::ToolChoice;
    let chosen: Vec<&crate::request::ToolSpec> = match choice {
        ToolChoice::Function(name) => {
            vec![tools.iter().find(|t| &t.name == name).ok_or_else(|| {
                EngineError::Invalid(format!(
                    "tool_choice names `{}`, which is not in `tools`",
                    tidepool_bounds::clip(name)
                ))
            })?]
        }
        ToolChoice::Required => tools.iter().collect(),
        ToolChoice::Auto | ToolChoice::None => {
            return Err(EngineError::Internal(
                "a forced call was asked for without a forcing tool_choice".into(),
            ))
        }
    };
    if chosen.is_empty() {
        return Err(EngineError::Invalid(
            "tool_choice requires a tool call, but `tools` is empty".into(),
        ));
    }
    // The call is any of the chosen tools' calls: each alternative is that tool's own schema,
    // so whichever the model picks, its arguments validate.
    let schema = match chosen.as_slice() {
        [one] => call_schema(one),
        many => serde_json::json!({
            "anyOf": many.iter().map(|t| call_schema(t)).collect::<Vec<_>>(),
            "x-guidance": COMPACT_JSON.clone(),
        }),
    };
    Ok(format!(
        "start: \"<tool_call>\\n\" call \"\\n</tool_call>\"\ncall: %json {schema}\n"
    ))
}

/// llguidance's JSON layout for calls: compact, one space after `,` and `:`.
static COMPACT_JSON: std::sync::LazyLock<serde_json::Value> = std::sync::LazyLock::new(
    || serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
);

/// The JSON Schema of one call of `tool` in the Hermes layout Qwen's template uses
/// (`{"name": …, "arguments": {…}}`), in one compact layout: free whitespace lets a model pad
/// forever.
fn call_schema(tool: &crate::request::ToolSpec) -> serde_json::Value {
    let args = tool
        .parameters
        .clone()
        .unwrap_or_else(|| serde_json::json!({"type": "object"}));
    serde_json::json!({
        "type": "object",
        "properties": {"name": {"const": tool.name}, "arguments": args},
        "required": ["name", "arguments"],
        "additionalProperties": false,
        "x-guidance": COMPACT_JSON.clone(),
    })
}

/// One loaded model that generates text.
pub trait Engine: Send + Sync {
    fn info(&self) -> &EngineInfo;

    /// Whether the engine can serve: cheap, no I/O (the pool asks before every lease).
    fn health(&self) -> Health {
        Health::Ok
    }

    /// Stops the engine now: running requests end with an error; once the returned future is
    /// done the engine reports itself dead.
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    /// A round trip through the engine's own thread, proving it still answers (the pool runs
    /// it with a timeout on idle workers).
    fn probe(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        let h = self.health();
        Box::pin(async move {
            match h {
                Health::Ok => Ok(()),
                Health::Dead(why) => Err(EngineError::Unavailable(why)),
            }
        })
    }

    /// Starts a generation. Errors that can be known before the first token (bad grammar, prompt
    /// too long) come back here; later failures arrive as [`GenerationEvent::Error`].
    fn generate(
        &self,
        request: GenerationRequest,
    ) -> BoxFuture<'_, Result<GenerationStream, EngineError>>;

    /// One vector per input, pooled as the model says (not normalized). Engines that cannot
    /// embed refuse with a client error that says so.
    fn embed(
        &self,
        _request: embed::EmbedRequest,
    ) -> BoxFuture<'_, Result<embed::Embeddings, EngineError>> {
        let backend = self.info().backend;
        Box::pin(async move {
            Err(EngineError::Invalid(format!(
                "embeddings are served by the llama.cpp engine; this model runs on {backend} \
                 (start Tidepool with `--engine llamacpp` to embed with it)"
            )))
        })
    }

    /// Number of tokens `prompt` occupies once rendered (chat template included).
    fn count_tokens<'a>(
        &'a self,
        prompt: &'a Prompt,
        tools: &'a [ToolSpec],
    ) -> BoxFuture<'a, Result<u32, EngineError>>;
}

/// Whether this build can run on a GPU here (a `cuda` or `metal` build on a machine that has one).
pub fn gpu_available() -> bool {
    #[cfg(feature = "mistralrs")]
    {
        mistral::gpu_available()
    }
    #[cfg(not(feature = "mistralrs"))]
    {
        false
    }
}

/// The text of a panic's payload.
pub fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(no message)".into())
}

/// The name under which a model file's weights are shared: its canonical path, so two
/// spellings of one file are one model (the llama.cpp engine's cache and the memory ledger key
/// by it).
pub fn model_key(path: &std::path::Path) -> std::path::PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The CPU cores this process may run on.
pub fn available_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Which device to run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DevicePreference {
    /// The best device this build supports: CUDA, then Metal, then CPU.
    #[default]
    Auto,
    Cpu,
}

impl DevicePreference {
    /// The device class a model would land on, for choosing a default quantization before
    /// anything loads.
    pub fn class(self) -> tidepool_models::catalog::DeviceClass {
        use tidepool_models::catalog::DeviceClass;
        match self {
            DevicePreference::Cpu => DeviceClass::Cpu,
            DevicePreference::Auto => {
                if gpu_available() {
                    DeviceClass::Gpu
                } else {
                    DeviceClass::Cpu
                }
            }
        }
    }
}

/// How to load an engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub device: DevicePreference,
    /// Concurrent sequences (the worker's slots).
    pub max_sequences: usize,
    /// Prompt prefixes kept for reuse across requests (mistral.rs prefix cache); 0 disables it.
    pub prefix_cache_entries: usize,
    /// How embeddings are pooled; `None`: as the model's GGUF says, else the mean.
    pub pooling: Option<embed::Pooling>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            device: DevicePreference::Auto,
            max_sequences: 4,
            prefix_cache_entries: 16,
            pooling: None,
        }
    }
}
