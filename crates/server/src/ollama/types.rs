//! Ollama request bodies as its clients send them, their translation into Tidepool's internal
//! [`GenerationRequest`], and Ollama-shaped errors (`{"error": "..."}` with the HTTP status).

use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tidepool_engine::request::{
    ChatMessage, GenerationRequest, OutputConstraint, Prompt, Role, ToolCall, ToolChoice, ToolSpec,
};

use crate::error::ApiJson;
pub use crate::error::OllamaError;
use crate::openai::types::{SamplingFields, StopSpec};

/// A JSON body with Ollama-shaped errors (the same parsing and field-naming as the OpenAI API).
pub struct OllamaJson<T>(pub T);

impl<S, T> FromRequest<S> for OllamaJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = OllamaError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match ApiJson::<T>::from_request(req, state).await {
            Ok(ApiJson(v)) => Ok(OllamaJson(v)),
            Err(e) => Err(e.into()),
        }
    }
}

/// `options`: the model parameters Ollama clients send. Others (`num_ctx`, `num_thread`, ...) are
/// accepted and ignored, as Ollama ignores options a model does not use.
#[derive(Debug, Deserialize, Default)]
pub struct Options {
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub top_k: Option<i64>,
    /// Tokens to generate; -1 (and -2) mean "no limit": the server's default, within the context.
    #[serde(default)]
    pub num_predict: Option<i64>,
    #[serde(default)]
    pub stop: Option<StopSpec>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub repeat_penalty: Option<f64>,
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// `keep_alive`: seconds as a number, or a duration string (`"5m"`, `"1h30m"`, `"10s"`, `"-1"`).
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub enum KeepAlive {
    Seconds(f64),
    Text(String),
}

/// What `keep_alive` asks of the pool.
pub use tidepool_control::autoscale::KeepAlive as KeepAliveSetting;

impl KeepAlive {
    pub fn setting(&self) -> Result<KeepAliveSetting, OllamaError> {
        let secs = match self {
            KeepAlive::Seconds(s) => *s,
            KeepAlive::Text(t) => parse_duration(t).ok_or_else(|| {
                OllamaError::bad_request(format!(
                    "invalid keep_alive `{t}`: expected seconds or a duration such as \"5m\", \"1h\", \"-1\""
                ))
            })?,
        };
        if secs.is_nan() {
            return Err(OllamaError::bad_request("invalid keep_alive: NaN"));
        }
        Ok(if secs < 0.0 {
            KeepAliveSetting::Forever
        } else if secs == 0.0 {
            KeepAliveSetting::Unload
        } else {
            KeepAliveSetting::For(tidepool_bounds::duration(secs))
        })
    }
}

/// Durations as Ollama's clients send them: seconds (`"300"`, `"-1"`) or a duration with units
/// (`"5m"`, `"1h30m"`, `"1.5s"`, `"250ms"`), parsed by jiff's duration parser (a superset of Go's
/// `time.ParseDuration`, which Ollama uses). Returns seconds.
pub fn parse_duration(text: &str) -> Option<f64> {
    let t = text.trim();
    if let Ok(v) = t.parse::<f64>() {
        return Some(v);
    }
    t.parse::<jiff::SignedDuration>()
        .ok()
        .map(|d| d.as_secs_f64())
}

/// `format`: `"json"`, a JSON Schema object, or empty.
fn constraint(format: &Option<serde_json::Value>) -> Result<OutputConstraint, OllamaError> {
    match format {
        None | Some(serde_json::Value::Null) => Ok(OutputConstraint::None),
        Some(serde_json::Value::String(s)) if s.is_empty() => Ok(OutputConstraint::None),
        Some(serde_json::Value::String(s)) if s == "json" => Ok(OutputConstraint::JsonObject),
        Some(v @ serde_json::Value::Object(_)) => Ok(OutputConstraint::JsonSchema(v.clone())),
        Some(other) => Err(OllamaError::bad_request(format!(
            "invalid format {other}: expected \"json\" or a JSON Schema object"
        ))),
    }
}

impl Options {
    /// Sampling settings, validated with the same ranges as the OpenAI API.
    pub fn to_sampling(&self) -> Result<tidepool_engine::request::Sampling, OllamaError> {
        let max_tokens = match self.num_predict {
            None => None,
            // The gateway's default, shortened to what the context leaves.
            Some(n) if n < 0 => None,
            Some(0) => {
                return Err(OllamaError::bad_request(
                    "options.num_predict must be at least 1 (or -1 for the server's limit)",
                ))
            }
            Some(n) => Some(n),
        };
        let fields = SamplingFields {
            max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            stop: self.stop.as_ref().map(|s| match s {
                StopSpec::One(s) => StopSpec::One(s.clone()),
                StopSpec::Many(v) => StopSpec::Many(v.clone()),
            }),
            seed: self.seed,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            repetition_penalty: self.repeat_penalty,
            ..SamplingFields::default()
        };
        fields.to_sampling().map_err(|e| {
            let mut e = OllamaError::from(e);
            e.message = format!("invalid options: {}", e.message);
            e
        })
    }
}

/// POST /api/generate
#[derive(Debug, Deserialize)]
pub struct GenerateRequest {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(default)]
    pub system: Option<String>,
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub context: Option<Vec<i64>>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub raw: Option<bool>,
    #[serde(default)]
    pub format: Option<serde_json::Value>,
    #[serde(default)]
    pub images: Option<Vec<String>>,
    #[serde(default)]
    pub options: Option<Options>,
    #[serde(default)]
    pub keep_alive: Option<KeepAlive>,
    #[serde(default)]
    pub think: Option<serde_json::Value>,
    /// Tidepool's task profile (also `x-tidepool-profile` or `"model": "NAME:PROFILE"`).
    #[serde(default)]
    pub profile: Option<String>,
}

/// A tool call in Ollama's shape: arguments are a JSON object, not a string.
#[derive(Debug, Deserialize)]
pub struct InToolCallFunction {
    pub name: String,
    #[serde(default)]
    pub arguments: serde_json::Value,
}

#[derive(Debug, Deserialize)]
pub struct InToolCall {
    pub function: InToolCallFunction,
}

#[derive(Debug, Deserialize)]
pub struct InMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<String>,
    #[serde(default)]
    pub images: Option<Vec<String>>,
    #[serde(default)]
    pub tool_calls: Option<Vec<InToolCall>>,
    #[serde(default)]
    pub tool_name: Option<String>,
    #[serde(default)]
    pub thinking: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct InFunction {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub parameters: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
pub struct InTool {
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    pub function: InFunction,
}

/// POST /api/chat
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub messages: Option<Vec<InMessage>>,
    #[serde(default)]
    pub tools: Option<Vec<InTool>>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub format: Option<serde_json::Value>,
    #[serde(default)]
    pub options: Option<Options>,
    #[serde(default)]
    pub keep_alive: Option<KeepAlive>,
    #[serde(default)]
    pub think: Option<serde_json::Value>,
    /// Tidepool's task profile (also `x-tidepool-profile` or `"model": "NAME:PROFILE"`).
    #[serde(default)]
    pub profile: Option<String>,
}

/// POST /api/show
#[derive(Debug, Deserialize)]
pub struct ShowRequest {
    #[serde(default)]
    pub model: Option<String>,
    /// The older name of `model`.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub verbose: Option<bool>,
}

fn no_images(images: &Option<Vec<String>>, what: &str) -> Result<(), OllamaError> {
    if images.as_ref().is_some_and(|i| !i.is_empty()) {
        return Err(OllamaError::bad_request(format!(
            "{what}: images are not supported by this model (text only)"
        )));
    }
    Ok(())
}

fn no_thinking(think: &Option<serde_json::Value>) -> Result<(), OllamaError> {
    match think {
        None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => Ok(()),
        Some(_) => Err(OllamaError::bad_request(
            "think: this model does not support thinking",
        )),
    }
}

/// What `/api/generate` and `/api/chat` bodies have in common, so one handler serves both.
pub trait GenerationBody {
    fn model(&self) -> Option<&str>;
    /// The task profile named in the body (Tidepool's extension).
    fn profile(&self) -> Option<&str>;
    fn keep_alive(&self) -> &Option<KeepAlive>;
    /// Streaming is Ollama's default.
    fn is_stream(&self) -> bool;
    /// A body with nothing to generate only loads (or, with `keep_alive: 0`, unloads) the model.
    fn is_load_only(&self) -> bool;
    fn to_generation(&self) -> Result<GenerationRequest, OllamaError>;
}

impl GenerationBody for GenerateRequest {
    fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    fn profile(&self) -> Option<&str> {
        self.profile.as_deref()
    }

    fn keep_alive(&self) -> &Option<KeepAlive> {
        &self.keep_alive
    }

    fn is_stream(&self) -> bool {
        self.stream.unwrap_or(true)
    }

    /// An empty prompt.
    fn is_load_only(&self) -> bool {
        self.prompt.as_deref().unwrap_or("").is_empty()
    }

    fn to_generation(&self) -> Result<GenerationRequest, OllamaError> {
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(OllamaError::bad_request(
                "suffix: fill-in-the-middle is not supported by this model",
            ));
        }
        if self.template.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(OllamaError::bad_request(
                "template: custom prompt templates are not supported; the model's chat template is used (or send \"raw\": true)",
            ));
        }
        if self.context.as_ref().is_some_and(|c| !c.is_empty()) {
            return Err(OllamaError::bad_request(
                "context: token contexts are not supported; use /api/chat for conversations",
            ));
        }
        no_images(&self.images, "images")?;
        no_thinking(&self.think)?;
        let prompt = self.prompt.clone().unwrap_or_default();
        let prompt = if self.raw.unwrap_or(false) {
            Prompt::Text(prompt)
        } else {
            let mut messages = Vec::new();
            if let Some(s) = self.system.as_deref().filter(|s| !s.is_empty()) {
                messages.push(ChatMessage::new(Role::System, s));
            }
            messages.push(ChatMessage::new(Role::User, prompt));
            Prompt::Chat(messages)
        };
        let sampling = self
            .options
            .as_ref()
            .map_or_else(|| Options::default().to_sampling(), |o| o.to_sampling())?;
        Ok(GenerationRequest {
            prompt,
            sampling,
            constraint: constraint(&self.format)?,
            tools: Vec::new(),
            tool_choice: ToolChoice::Auto,
        })
    }
}

impl GenerationBody for ChatRequest {
    fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    fn profile(&self) -> Option<&str> {
        self.profile.as_deref()
    }

    fn keep_alive(&self) -> &Option<KeepAlive> {
        &self.keep_alive
    }

    fn is_stream(&self) -> bool {
        self.stream.unwrap_or(true)
    }

    /// No messages, as in Ollama.
    fn is_load_only(&self) -> bool {
        self.messages.as_ref().is_none_or(|m| m.is_empty())
    }

    fn to_generation(&self) -> Result<GenerationRequest, OllamaError> {
        no_thinking(&self.think)?;
        let mut messages = Vec::new();
        for (i, m) in self.messages.iter().flatten().enumerate() {
            let role = match m.role.as_str() {
                "system" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                "tool" => Role::Tool,
                other => {
                    return Err(OllamaError::bad_request(format!(
                        "messages[{i}].role: invalid role `{other}`; expected system, user, assistant or tool"
                    )))
                }
            };
            no_images(&m.images, &format!("messages[{i}].images"))?;
            let tool_calls: Vec<ToolCall> = m
                .tool_calls
                .iter()
                .flatten()
                .enumerate()
                .map(|(j, c)| ToolCall {
                    id: format!("call_{i}_{j}"),
                    name: c.function.name.clone(),
                    arguments: match &c.function.arguments {
                        serde_json::Value::Null => "{}".into(),
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    },
                })
                .collect();
            if role != Role::Assistant && !tool_calls.is_empty() {
                return Err(OllamaError::bad_request(format!(
                    "messages[{i}].tool_calls: only assistant messages may carry tool calls"
                )));
            }
            let _ = &m.thinking;
            messages.push(ChatMessage {
                role,
                content: m.content.clone().unwrap_or_default(),
                tool_calls,
                tool_call_id: m.tool_name.clone(),
            });
        }
        let mut tools = Vec::new();
        for (i, t) in self.tools.iter().flatten().enumerate() {
            if t.kind.as_deref().is_some_and(|k| k != "function") {
                return Err(OllamaError::bad_request(format!(
                    "tools[{i}].type: only `function` tools are supported"
                )));
            }
            if t.function.name.is_empty() {
                return Err(OllamaError::bad_request(format!(
                    "tools[{i}].function.name must not be empty"
                )));
            }
            tools.push(ToolSpec {
                name: t.function.name.clone(),
                description: t.function.description.clone(),
                parameters: t.function.parameters.clone(),
            });
        }
        let constraint = constraint(&self.format)?;
        if !tools.is_empty() && constraint != OutputConstraint::None {
            return Err(OllamaError::bad_request(
                "format cannot be combined with tools",
            ));
        }
        let sampling = self
            .options
            .as_ref()
            .map_or_else(|| Options::default().to_sampling(), |o| o.to_sampling())?;
        Ok(GenerationRequest {
            prompt: Prompt::Chat(messages),
            sampling,
            constraint,
            tools,
            tool_choice: ToolChoice::Auto,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;
    use serde_json::json;

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(parse_duration("300"), Some(300.0));
        assert_eq!(parse_duration("-1"), Some(-1.0));
        assert_eq!(parse_duration("5m"), Some(300.0));
        assert_eq!(parse_duration("1h30m"), Some(5400.0));
        assert_eq!(parse_duration("250ms"), Some(0.25));
        assert_eq!(parse_duration("-1m"), Some(-60.0));
        assert_eq!(parse_duration("soon"), None);
        assert_eq!(parse_duration(""), None);
        assert_eq!(parse_duration("m"), None);
    }

    #[test]
    fn keep_alive_settings() {
        let s = |v: serde_json::Value| {
            serde_json::from_value::<KeepAlive>(v)
                .unwrap()
                .setting()
                .unwrap()
        };
        assert_eq!(s(json!(0)), KeepAliveSetting::Unload);
        assert_eq!(s(json!("0")), KeepAliveSetting::Unload);
        assert_eq!(s(json!(-1)), KeepAliveSetting::Forever);
        assert_eq!(
            s(json!("5m")),
            KeepAliveSetting::For(std::time::Duration::from_secs(300))
        );
        assert!(serde_json::from_value::<KeepAlive>(json!("soon"))
            .unwrap()
            .setting()
            .is_err());
    }

    #[test]
    fn generate_maps_options_and_format() {
        let r: GenerateRequest = serde_json::from_value(json!({
            "model": "m", "prompt": "hi", "system": "be brief", "format": "json",
            "options": {"temperature": 0, "top_p": 0.5, "num_predict": 7, "stop": ["x"], "seed": 4,
                        "num_ctx": 2048}
        }))
        .unwrap();
        let g = r.to_generation().unwrap();
        assert_eq!(g.sampling.max_tokens, Some(7));
        assert_eq!(g.sampling.temperature, Some(0.0));
        assert_eq!(g.sampling.seed, Some(4));
        assert_eq!(g.sampling.stop, vec!["x"]);
        assert_eq!(g.constraint, OutputConstraint::JsonObject);
        let Prompt::Chat(m) = g.prompt else { panic!() };
        assert_eq!(m[0].role, Role::System);
        assert_eq!(m[1].content, "hi");
        assert!(r.is_stream());

        let raw: GenerateRequest =
            serde_json::from_value(json!({"prompt": "abc", "raw": true, "stream": false,
                "format": {"type": "object"}}))
            .unwrap();
        let g = raw.to_generation().unwrap();
        assert_eq!(g.prompt, Prompt::Text("abc".into()));
        assert!(matches!(g.constraint, OutputConstraint::JsonSchema(_)));
        assert!(!raw.is_stream());
    }

    #[test]
    fn bad_values_are_400_with_a_reason() {
        let e = |v: serde_json::Value| {
            serde_json::from_value::<ChatRequest>(v)
                .unwrap()
                .to_generation()
                .unwrap_err()
        };
        let err = e(json!({"messages": [{"role": "robot", "content": "x"}]}));
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert!(err.message.contains("robot"), "{}", err.message);
        let err = e(json!({"messages": [], "options": {"temperature": 5}}));
        assert!(err.message.contains("temperature"), "{}", err.message);
        let err = e(json!({"messages": [], "format": 3}));
        assert!(err.message.contains("format"), "{}", err.message);
        let err = e(json!({"messages": [], "options": {"num_predict": 0}}));
        assert!(err.message.contains("num_predict"), "{}", err.message);
        let err = e(json!({"messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}));
        assert!(err.message.contains("images"), "{}", err.message);
    }
}
