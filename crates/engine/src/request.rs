//! The one internal request type every API adapter (OpenAI, Ollama) produces, and the events an
//! engine streams back. Nothing here knows about HTTP or about a particular engine.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Who said a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// A tool call the model made (or, in a request, one it made earlier).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Hash)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// JSON text of the arguments, as OpenAI carries it.
    pub arguments: String,
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Hash)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        ChatMessage {
            role,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }
}

/// What the model is asked to continue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Hash)]
pub enum Prompt {
    /// Chat messages, rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
    /// Raw text, continued as is (`/v1/completions`).
    Text(String),
}

/// Sampling settings. `None` means the engine default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    pub max_tokens: Option<u32>,
    /// 0 means greedy.
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub stop: Vec<String>,
    /// Makes sampled output reproducible: same seed, same request, same output.
    pub seed: Option<u64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    /// Added to these tokens' logits before sampling (OpenAI's `logit_bias`; -100 bans a token).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub logit_bias: std::collections::BTreeMap<u32, f32>,
}

impl Sampling {
    /// Greedy decoding or a fixed seed: the output depends only on the request.
    pub fn is_deterministic(&self) -> bool {
        self.temperature.is_some_and(|t| t <= 0.0) || self.seed.is_some()
    }
}

/// A grammar the output must follow.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub enum OutputConstraint {
    #[default]
    None,
    /// Any JSON object.
    JsonObject,
    /// JSON valid against this JSON Schema.
    JsonSchema(serde_json::Value),
    /// Text matching this regular expression.
    Regex(String),
    /// A Lark grammar (llguidance's dialect).
    Lark(String),
}

/// How the model may use the tools offered.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub enum ToolChoice {
    #[default]
    Auto,
    None,
    /// Must call one of the tools offered (OpenAI's `required`, Anthropic's `any`).
    Required,
    /// Must call this function.
    Function(String),
}

impl ToolChoice {
    /// Whether the output must be a tool call (and so is constrained to one).
    pub fn forces_a_call(&self) -> bool {
        matches!(self, ToolChoice::Required | ToolChoice::Function(_))
    }
}

/// A function the model may call, in OpenAI's JSON shape (`{"type":"function","function":{...}}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    pub name: String,
    pub description: Option<String>,
    /// JSON Schema of the arguments.
    pub parameters: Option<serde_json::Value>,
}

/// Messages one chat request may carry unless `server.max_messages` says otherwise.
pub const DEFAULT_MAX_MESSAGES: usize = 4096;

/// Bounds every request is held to before any work is done on it (both APIs).
pub mod bounds {
    /// Stop strings, and the longest one in bytes.
    pub const MAX_STOPS: usize = 16;
    pub const MAX_STOP_BYTES: usize = 512;
    /// Tools offered in one request.
    pub const MAX_TOOLS: usize = 128;
    /// Biased tokens.
    pub const MAX_LOGIT_BIAS: usize = 1024;
    /// The longest answer a request may ask for.
    pub const MAX_TOKENS: u32 = 1 << 20;
}

/// A request for one generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationRequest {
    pub prompt: Prompt,
    pub sampling: Sampling,
    pub constraint: OutputConstraint,
    pub tools: Vec<ToolSpec>,
    pub tool_choice: ToolChoice,
}

impl GenerationRequest {
    pub fn chat(messages: Vec<ChatMessage>) -> Self {
        GenerationRequest {
            prompt: Prompt::Chat(messages),
            sampling: Sampling::default(),
            constraint: OutputConstraint::None,
            tools: Vec::new(),
            tool_choice: ToolChoice::Auto,
        }
    }

    /// Checks the request against [`bounds`] and `max_messages`; on error (param, message).
    pub fn check_bounds(&self, max_messages: usize) -> Result<(), (String, String)> {
        let err = |p: &str, m: String| Err((p.to_string(), m));
        if let Prompt::Chat(m) = &self.prompt {
            if m.len() > max_messages {
                return err(
                    "messages",
                    format!(
                        "This request has {} messages; this server accepts at most {max_messages} per request.",
                        m.len()
                    ),
                );
            }
        }
        let s = &self.sampling;
        if s.stop.len() > bounds::MAX_STOPS {
            return err(
                "stop",
                format!("At most {} stop sequences are allowed.", bounds::MAX_STOPS),
            );
        }
        if s.stop.iter().any(|x| x.len() > bounds::MAX_STOP_BYTES) {
            return err(
                "stop",
                format!(
                    "A stop sequence may be at most {} bytes.",
                    bounds::MAX_STOP_BYTES
                ),
            );
        }
        if self.tools.len() > bounds::MAX_TOOLS {
            return err(
                "tools",
                format!("At most {} tools are allowed.", bounds::MAX_TOOLS),
            );
        }
        if s.logit_bias.len() > bounds::MAX_LOGIT_BIAS {
            return err(
                "logit_bias",
                format!("At most {} tokens may be biased.", bounds::MAX_LOGIT_BIAS),
            );
        }
        if s.max_tokens.is_some_and(|m| m > bounds::MAX_TOKENS) {
            return err(
                "max_tokens",
                format!("`max_tokens` may be at most {}.", bounds::MAX_TOKENS),
            );
        }
        Ok(())
    }

    pub fn text(text: impl Into<String>) -> Self {
        GenerationRequest {
            prompt: Prompt::Text(text.into()),
            ..GenerationRequest::chat(Vec::new())
        }
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End-of-sequence token (or the end of the output's grammar).
    Stop,
    /// A stop string: its index in the request's `stop`.
    StopSequence(u8),
    /// `max_tokens` or the context window.
    Length,
    ToolCalls,
    /// The client went away or the request was cancelled.
    Cancelled,
}

impl FinishReason {
    pub fn as_openai(self) -> &'static str {
        match self {
            FinishReason::Stop | FinishReason::StopSequence(_) | FinishReason::Cancelled => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
        }
    }
}

/// Token counts and timings of one finished generation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// From submission to the engine to the first generated text.
    #[serde(with = "duration_secs")]
    pub time_to_first_token: Duration,
    /// From submission to the engine to the end.
    #[serde(with = "duration_secs")]
    pub total_time: Duration,
}

impl Usage {
    pub fn total_tokens(&self) -> u32 {
        self.prompt_tokens + self.completion_tokens
    }

    /// Decode speed after the first token.
    pub fn decode_tokens_per_second(&self) -> f64 {
        let decode = self.total_time.saturating_sub(self.time_to_first_token);
        if self.completion_tokens <= 1 || decode.is_zero() {
            return 0.0;
        }
        (self.completion_tokens - 1) as f64 / decode.as_secs_f64()
    }
}

mod duration_secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(tidepool_bounds::duration(f64::deserialize(d)?))
    }
}

/// What an engine streams back for one request. A stream ends with exactly one `Done` or `Error`.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerationEvent {
    /// Generated text, in order.
    Text(String),
    /// The model called tools.
    ToolCalls(Vec<ToolCall>),
    Done {
        finish_reason: FinishReason,
        usage: Usage,
    },
    /// The engine failed part-way; text already sent stands.
    Error(String),
}
