//! Anthropic Messages request bodies as the `anthropic` SDKs send them, their translation (with
//! validation that names the offending field) into Tidepool's internal [`GenerationRequest`],
//! and errors in Anthropic's shape (`{"type": "error", "error": {"type", "message"}}`).

use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use tidepool_engine::request::{
    bounds, ChatMessage, GenerationRequest, OutputConstraint, Prompt, Role, Sampling, ToolCall,
    ToolChoice, ToolSpec,
};

pub use crate::error::AnthropicError;
use crate::error::{truncate, ApiJson};

/// A JSON body with Anthropic-shaped errors (the same parsing as [`ApiJson`]).
pub struct AnthropicJson<T>(pub T);

impl<S, T> FromRequest<S> for AnthropicJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = AnthropicError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match ApiJson::<T>::from_request(req, state).await {
            Ok(ApiJson(v)) => Ok(AnthropicJson(v)),
            Err(e) => Err(AnthropicError(e)),
        }
    }
}

/// `system` and a message's `content`: a string or a list of content blocks (kept as JSON and
/// read by [`MessagesRequest::to_messages`], so an unknown block type gets an error naming it).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum TextOrBlocks {
    Text(String),
    Blocks(Vec<Value>),
}

#[derive(Debug, Deserialize)]
pub struct InMessage {
    pub role: String,
    pub content: TextOrBlocks,
}

#[derive(Debug, Deserialize)]
pub struct InTool {
    /// `custom` (or absent) for a client tool; Anthropic's server tools have other types.
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub input_schema: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct InToolChoice {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub disable_parallel_tool_use: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct OutputFormat {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub schema: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct OutputConfig {
    #[serde(default)]
    pub format: Option<OutputFormat>,
    #[serde(default)]
    pub effort: Option<Value>,
}

/// `POST /v1/messages` (and, without `max_tokens`, `/v1/messages/count_tokens`).
#[derive(Debug, Deserialize)]
pub struct MessagesRequest {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub max_tokens: Option<i64>,
    pub messages: Vec<InMessage>,
    #[serde(default)]
    pub system: Option<TextOrBlocks>,
    #[serde(default)]
    pub stop_sequences: Option<Vec<String>>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub tools: Option<Vec<InTool>>,
    #[serde(default)]
    pub tool_choice: Option<InToolChoice>,
    /// Extended thinking: this model does not think aloud, so only "disabled" (or nothing) is
    /// meaningful; an enabled budget is accepted and has no effect.
    #[serde(default)]
    pub thinking: Option<Value>,
    /// `format` (a JSON schema the answer must follow) is honoured; `effort` has no meaning for
    /// this model and is accepted.
    #[serde(default)]
    pub output_config: Option<OutputConfig>,
    /// `metadata.user_id` and the like: accepted, unused.
    #[serde(default)]
    pub metadata: Option<Value>,
}

fn field(path: &str, message: impl Into<String>) -> AnthropicError {
    AnthropicError::invalid(format!("{path}: {}", message.into()))
}

/// The text of a list of blocks that may only be text (`system`, a tool result's content).
fn text_blocks(blocks: &[Value], path: &str) -> Result<String, AnthropicError> {
    let mut parts = Vec::with_capacity(blocks.len());
    for (j, b) in blocks.iter().enumerate() {
        match (b["type"].as_str(), b["text"].as_str()) {
            (Some("text"), Some(t)) => parts.push(t.to_string()),
            (Some("text"), None) => {
                return Err(field(&format!("{path}.{j}.text"), "Field required"))
            }
            (Some("image" | "document"), _) => {
                return Err(field(
                    &format!("{path}.{j}.type"),
                    "this model reads text only; images and documents are not supported",
                ))
            }
            (kind, _) => {
                return Err(field(
                    &format!("{path}.{j}.type"),
                    format!(
                        "unsupported block type `{}` here; expected `text`",
                        truncate(kind.unwrap_or("(none)"), 40)
                    ),
                ))
            }
        }
    }
    Ok(parts.join("\n"))
}

impl MessagesRequest {
    pub fn is_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    /// `max_tokens: 0` asks for no answer (Anthropic: only warm the prompt cache): the reply is
    /// an empty message with the prompt's size.
    pub fn generates(&self) -> bool {
        self.max_tokens != Some(0)
    }

    /// The answer's constraint (`output_config.format`).
    fn constraint(&self) -> Result<OutputConstraint, AnthropicError> {
        let Some(format) = self.output_config.as_ref().and_then(|c| c.format.as_ref()) else {
            return Ok(OutputConstraint::None);
        };
        if format.kind != "json_schema" {
            return Err(field(
                "output_config.format.type",
                format!(
                    "Input tag '{}' does not match the expected tag 'json_schema'",
                    truncate(&format.kind, 40)
                ),
            ));
        }
        match &format.schema {
            Some(s @ Value::Object(_)) => Ok(OutputConstraint::JsonSchema(s.clone())),
            Some(_) => Err(field(
                "output_config.format.schema",
                "Input should be a JSON Schema object",
            )),
            None => Err(field("output_config.format.schema", "Field required")),
        }
    }

    /// The stop sequences as sent (their order is what `stop_sequence` reports by).
    pub fn stops(&self) -> &[String] {
        self.stop_sequences.as_deref().unwrap_or_default()
    }

    /// The chat messages (`system` first), with tool uses and results as tool calls and tool
    /// messages.
    pub fn to_messages(&self) -> Result<Vec<ChatMessage>, AnthropicError> {
        if self.messages.is_empty() {
            return Err(field("messages", "at least one message is required"));
        }
        let mut out = Vec::with_capacity(self.messages.len() + 1);
        match &self.system {
            None => {}
            Some(TextOrBlocks::Text(t)) => out.push(ChatMessage::new(Role::System, t.clone())),
            Some(TextOrBlocks::Blocks(b)) => {
                out.push(ChatMessage::new(Role::System, text_blocks(b, "system")?))
            }
        }
        for (i, m) in self.messages.iter().enumerate() {
            let role = match m.role.as_str() {
                "user" => Role::User,
                "assistant" => Role::Assistant,
                other => {
                    return Err(field(
                        &format!("messages.{i}.role"),
                        format!(
                            "Input should be 'user' or 'assistant', got `{}` (a system prompt goes in the top-level `system`)",
                            truncate(other, 40)
                        ),
                    ))
                }
            };
            let blocks = match &m.content {
                TextOrBlocks::Text(t) => {
                    out.push(ChatMessage::new(role, t.clone()));
                    continue;
                }
                TextOrBlocks::Blocks(b) => b,
            };
            let mut text = Vec::new();
            let mut calls = Vec::new();
            for (j, b) in blocks.iter().enumerate() {
                let path = format!("messages.{i}.content.{j}");
                match b["type"].as_str() {
                    Some("text") => match b["text"].as_str() {
                        Some(t) => text.push(t.to_string()),
                        None => return Err(field(&format!("{path}.text"), "Field required")),
                    },
                    Some("tool_use") if role == Role::Assistant => {
                        let (Some(id), Some(name)) = (b["id"].as_str(), b["name"].as_str()) else {
                            return Err(field(&path, "a tool_use block needs `id` and `name`"));
                        };
                        let input = match &b["input"] {
                            Value::Null => json!({}),
                            v @ Value::Object(_) => v.clone(),
                            _ => {
                                return Err(field(
                                    &format!("{path}.input"),
                                    "Input should be an object",
                                ))
                            }
                        };
                        calls.push(ToolCall {
                            id: id.to_string(),
                            name: name.to_string(),
                            arguments: input.to_string(),
                        });
                    }
                    Some("tool_result") if role == Role::User => {
                        let Some(id) = b["tool_use_id"].as_str() else {
                            return Err(field(&format!("{path}.tool_use_id"), "Field required"));
                        };
                        let mut content = match &b["content"] {
                            Value::Null => String::new(),
                            Value::String(s) => s.clone(),
                            Value::Array(parts) => text_blocks(parts, &format!("{path}.content"))?,
                            _ => {
                                return Err(field(
                                    &format!("{path}.content"),
                                    "Input should be a string or a list of text blocks",
                                ))
                            }
                        };
                        if b["is_error"].as_bool() == Some(true) {
                            content = format!("Error: {content}");
                        }
                        // A tool's result is its own turn, before what the user adds.
                        out.push(ChatMessage {
                            tool_call_id: Some(id.to_string()),
                            ..ChatMessage::new(Role::Tool, content)
                        });
                    }
                    Some(kind @ ("tool_use" | "tool_result")) => {
                        return Err(field(
                            &format!("{path}.type"),
                            format!(
                                "`{kind}` blocks belong in {} messages",
                                if kind == "tool_use" { "assistant" } else { "user" }
                            ),
                        ))
                    }
                    // Earlier thinking is not part of what this model reads.
                    Some("thinking" | "redacted_thinking") => {}
                    Some("image" | "document") => {
                        return Err(field(
                            &format!("{path}.type"),
                            "this model reads text only; images and documents are not supported",
                        ))
                    }
                    other => {
                        return Err(field(
                            &format!("{path}.type"),
                            format!(
                                "unsupported content block type `{}`; expected text, tool_use or tool_result",
                                truncate(other.unwrap_or("(none)"), 40)
                            ),
                        ))
                    }
                }
            }
            if !text.is_empty() || !calls.is_empty() || blocks.is_empty() {
                out.push(ChatMessage {
                    tool_calls: calls,
                    ..ChatMessage::new(role, text.join("\n"))
                });
            }
        }
        Ok(out)
    }

    /// The tools and how the model may use them.
    pub fn to_tools(&self) -> Result<(Vec<ToolSpec>, ToolChoice), AnthropicError> {
        let mut tools = Vec::new();
        for (i, t) in self.tools.iter().flatten().enumerate() {
            if !matches!(t.kind.as_deref(), None | Some("custom")) {
                return Err(field(
                    &format!("tools.{i}.type"),
                    format!(
                        "server tools (`{}`) are not available on a local model; define a custom tool with `input_schema`",
                        truncate(t.kind.as_deref().unwrap_or_default(), 40)
                    ),
                ));
            }
            if t.name.is_empty() || t.name.len() > 128 {
                return Err(field(
                    &format!("tools.{i}.name"),
                    "a tool name must be 1 to 128 characters",
                ));
            }
            let schema = match &t.input_schema {
                Some(s @ Value::Object(_)) => s.clone(),
                Some(_) => {
                    return Err(field(
                        &format!("tools.{i}.input_schema"),
                        "Input should be a JSON Schema object",
                    ))
                }
                None => return Err(field(&format!("tools.{i}.input_schema"), "Field required")),
            };
            tools.push(ToolSpec {
                name: t.name.clone(),
                description: t.description.clone(),
                parameters: Some(schema),
            });
        }
        let choice = match &self.tool_choice {
            None => ToolChoice::Auto,
            Some(c) => {
                let _ = c.disable_parallel_tool_use;
                match c.kind.as_str() {
                    "auto" => ToolChoice::Auto,
                    "none" => ToolChoice::None,
                    "any" | "tool" if tools.is_empty() => {
                        return Err(field(
                            "tool_choice.type",
                            format!("`{}` needs at least one tool in `tools`", c.kind),
                        ))
                    }
                    "any" => ToolChoice::Required,
                    "tool" => match c.name.as_deref() {
                        Some(n) if tools.iter().any(|t| t.name == n) => {
                            ToolChoice::Function(n.to_string())
                        }
                        Some(n) => {
                            return Err(field(
                                "tool_choice.name",
                                format!("`{}` is not among the `tools` of this request", truncate(n, 100)),
                            ))
                        }
                        None => return Err(field("tool_choice.name", "Field required")),
                    },
                    other => {
                        return Err(field(
                            "tool_choice.type",
                            format!(
                                "Input tag '{}' does not match any of the expected tags: 'auto', 'any', 'tool', 'none'",
                                truncate(other, 40)
                            ),
                        ))
                    }
                }
            }
        };
        Ok((tools, choice))
    }

    fn to_sampling(&self) -> Result<Sampling, AnthropicError> {
        let max_tokens = match self.max_tokens {
            None => return Err(field("max_tokens", "Field required")),
            Some(m) if m < 0 => {
                return Err(field(
                    "max_tokens",
                    format!("must not be negative, got {m}"),
                ))
            }
            Some(m) if m > bounds::MAX_TOKENS as i64 => {
                return Err(field(
                    "max_tokens",
                    format!("may be at most {}, got {m}", bounds::MAX_TOKENS),
                ))
            }
            // 0 (nothing to generate) is answered without the engine: see `generates`.
            Some(m) => (m as u32).max(1),
        };
        let unit = |name: &str, v: Option<f64>| match v {
            Some(x) if !(0.0..=1.0).contains(&x) || x.is_nan() => {
                Err(field(name, format!("must be between 0 and 1, got {x}")))
            }
            other => Ok(other.map(|x| x as f32)),
        };
        let temperature = unit("temperature", self.temperature)?;
        let top_p = unit("top_p", self.top_p)?;
        if top_p == Some(0.0) {
            return Err(field("top_p", "must be greater than 0"));
        }
        let top_k = match self.top_k {
            Some(k) if k < 0 => return Err(field("top_k", "must not be negative")),
            Some(0) | None => None,
            Some(k) => Some(k.min(u32::MAX as i64) as u32),
        };
        let stop = self.stops().to_vec();
        if stop.iter().any(String::is_empty) {
            return Err(field("stop_sequences", "stop sequences must not be empty"));
        }
        Ok(Sampling {
            max_tokens: Some(max_tokens),
            temperature,
            top_p,
            top_k,
            stop,
            ..Sampling::default()
        })
    }

    /// The internal request (bounds on counts and lengths are the gateway's).
    pub fn to_generation(&self) -> Result<GenerationRequest, AnthropicError> {
        let messages = self.to_messages()?;
        let (tools, tool_choice) = self.to_tools()?;
        let constraint = self.constraint()?;
        if constraint != OutputConstraint::None && tool_choice.forces_a_call() {
            return Err(field(
                "output_config.format",
                "a forced tool call and an output format cannot both shape the answer",
            ));
        }
        let _ = self.output_config.as_ref().map(|c| &c.effort);
        Ok(GenerationRequest {
            prompt: Prompt::Chat(messages),
            sampling: self.to_sampling()?,
            constraint,
            tools,
            tool_choice,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: Value) -> MessagesRequest {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn maps_system_turns_tool_uses_and_results() {
        let g = req(json!({
            "model": "m", "max_tokens": 64, "system": [{"type": "text", "text": "be brief"}],
            "stop_sequences": ["END"], "temperature": 0.5, "top_k": 5,
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "21 C"}]},
                    {"type": "text", "text": "And tomorrow?"}]}],
            "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any"}
        }))
        .to_generation()
        .unwrap();
        let Prompt::Chat(m) = &g.prompt else { panic!() };
        let roles: Vec<Role> = m.iter().map(|m| m.role).collect();
        assert_eq!(
            roles,
            [
                Role::System,
                Role::User,
                Role::Assistant,
                Role::Tool,
                Role::User
            ]
        );
        assert_eq!(m[2].tool_calls[0].arguments, r#"{"city":"Paris"}"#);
        assert_eq!(m[3].tool_call_id.as_deref(), Some("toolu_1"));
        assert_eq!(m[3].content, "21 C");
        assert_eq!(g.tool_choice, ToolChoice::Required);
        assert_eq!(g.sampling.max_tokens, Some(64));
        assert_eq!(g.sampling.stop, ["END"]);
        assert_eq!(g.sampling.top_k, Some(5));
    }

    #[test]
    fn bad_fields_are_named() {
        let base = json!({"max_tokens": 8, "messages": [{"role": "user", "content": "x"}]});
        let err = |patch: Value| {
            let mut v = base.clone();
            for (k, val) in patch.as_object().unwrap() {
                v[k] = val.clone();
            }
            req(v).to_generation().unwrap_err().0.message
        };
        assert!(err(json!({"max_tokens": -1})).starts_with("max_tokens"));
        assert!(err(json!({"output_config": {"format": {"type": "xml"}}}))
            .starts_with("output_config.format.type"));
        assert!(err(json!({"temperature": 1.5})).starts_with("temperature"));
        assert!(err(json!({"messages": []})).starts_with("messages"));
        assert!(
            err(json!({"messages": [{"role": "system", "content": "x"}]}))
                .starts_with("messages.0.role")
        );
        assert!(err(
            json!({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]})
        )
        .contains("images"));
        assert!(err(
            json!({"tools": [{"name": "t", "input_schema": {"type": "object"}}],
                           "tool_choice": {"type": "tool", "name": "u"}})
        )
        .starts_with("tool_choice.name"));
        assert!(
            err(json!({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}))
                .starts_with("tools.0.type")
        );
        let mut no_max = base.clone();
        no_max.as_object_mut().unwrap().remove("max_tokens");
        assert!(req(no_max).to_generation().is_err());
    }
}
