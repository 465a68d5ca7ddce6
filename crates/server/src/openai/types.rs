//! OpenAI request bodies as clients send them, and their translation (with validation that
//! names the offending parameter) into Tidepool's internal [`GenerationRequest`].

use serde::Deserialize;
use tidepool_engine::request::{
    ChatMessage, GenerationRequest, OutputConstraint, Prompt, Role, Sampling, ToolCall, ToolChoice,
    ToolSpec,
};

use crate::error::ApiError;

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopSpec {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// `content`: a string or a list of parts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum InContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct InToolCallFunction {
    pub name: String,
    #[serde(default)]
    pub arguments: serde_json::Value,
}

#[derive(Debug, Deserialize)]
pub struct InToolCall {
    #[serde(default)]
    pub id: Option<String>,
    pub function: InToolCallFunction,
}

#[derive(Debug, Deserialize)]
pub struct InMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<InContent>,
    #[serde(default)]
    pub tool_calls: Option<Vec<InToolCall>>,
    #[serde(default)]
    pub tool_call_id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct JsonSchemaSpec {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub schema: Option<serde_json::Value>,
    #[serde(default)]
    pub strict: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaSpec },
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
    #[serde(rename = "type")]
    pub kind: String,
    pub function: InFunction,
}

#[derive(Debug, Deserialize)]
pub struct NamedFunction {
    pub name: String,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum InToolChoice {
    Mode(String),
    Named {
        #[serde(rename = "type")]
        kind: String,
        function: NamedFunction,
    },
}

/// Sampling fields shared by chat and text completions.
#[derive(Debug, Deserialize, Default)]
pub struct SamplingFields {
    #[serde(default)]
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Not in OpenAI's API, but widely sent (llama.cpp, vLLM, Ollama clients).
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub n: Option<i64>,
    #[serde(default)]
    pub stop: Option<StopSpec>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    #[serde(default)]
    pub repetition_penalty: Option<f64>,
    #[serde(default)]
    pub logprobs: Option<serde_json::Value>,
    /// Token id (as a string) → bias from -100 to 100.
    #[serde(default)]
    pub logit_bias: Option<std::collections::HashMap<String, f64>>,
}

#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<InMessage>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    #[serde(default)]
    pub response_format: Option<ResponseFormat>,
    #[serde(default)]
    pub tools: Option<Vec<InTool>>,
    #[serde(default)]
    pub tool_choice: Option<InToolChoice>,
    /// Tidepool's task profile (also `x-tidepool-profile` or `model: "NAME:PROFILE"`).
    #[serde(default)]
    pub profile: Option<String>,
}

/// `prompt`: one string or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptSpec {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub prompt: PromptSpec,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    #[serde(default)]
    pub echo: Option<bool>,
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(default)]
    pub best_of: Option<i64>,
}

/// The default answer length when a request names none (applied by the gateway, which also
/// shortens it to what the context budget leaves).
pub use tidepool_gateway::gateway::DEFAULT_MAX_TOKENS;

impl SamplingFields {
    pub fn to_sampling(&self) -> Result<Sampling, ApiError> {
        let max_tokens = match (self.max_completion_tokens, self.max_tokens) {
            (Some(v), _) => Some(("max_completion_tokens", v)),
            (None, Some(v)) => Some(("max_tokens", v)),
            (None, None) => None,
        };
        let max_tokens = match max_tokens {
            Some((param, v)) if v < 1 => {
                return Err(ApiError::invalid_param(
                    param,
                    format!("`{param}` must be at least 1, got {v}."),
                ))
            }
            Some((param, v)) if v > u32::MAX as i64 => {
                return Err(ApiError::invalid_param(
                    param,
                    format!("`{param}` is too large."),
                ))
            }
            Some((_, v)) => Some(v as u32),
            None => None,
        };
        if let Some(n) = self.n {
            if n != 1 {
                return Err(ApiError::invalid_param(
                    "n",
                    format!("Only n=1 is supported, got {n}; send separate requests instead."),
                ));
            }
        }
        if matches!(&self.logprobs, Some(v) if !v.is_null() && v != &serde_json::json!(false)) {
            return Err(ApiError::invalid_param(
                "logprobs",
                "`logprobs` is not supported.",
            ));
        }
        let range =
            |param: &str, v: Option<f64>, lo: f64, hi: f64| -> Result<Option<f32>, ApiError> {
                match v {
                    Some(x) if !(lo..=hi).contains(&x) || x.is_nan() => {
                        Err(ApiError::invalid_param(
                            param,
                            format!("`{param}` must be between {lo} and {hi}, got {x}."),
                        ))
                    }
                    other => Ok(other.map(|x| x as f32)),
                }
            };
        let temperature = range("temperature", self.temperature, 0.0, 2.0)?;
        let top_p = range("top_p", self.top_p, 0.0, 1.0)?;
        if top_p == Some(0.0) {
            return Err(ApiError::invalid_param(
                "top_p",
                "`top_p` must be greater than 0.",
            ));
        }
        let presence_penalty = range("presence_penalty", self.presence_penalty, -2.0, 2.0)?;
        let frequency_penalty = range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)?;
        let repetition_penalty = range("repetition_penalty", self.repetition_penalty, 0.0, 10.0)?;
        let top_k = match self.top_k {
            Some(k) if k < 0 => {
                return Err(ApiError::invalid_param(
                    "top_k",
                    "`top_k` must not be negative.",
                ))
            }
            Some(0) | None => None,
            Some(k) => Some(k.min(u32::MAX as i64) as u32),
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(StopSpec::One(s)) => vec![s.clone()],
            Some(StopSpec::Many(v)) => v.clone(),
        };
        if stop.len() > 16 {
            return Err(ApiError::invalid_param(
                "stop",
                "At most 16 stop sequences are allowed.",
            ));
        }
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid_param(
                "stop",
                "Stop sequences must not be empty.",
            ));
        }
        let mut logit_bias = std::collections::BTreeMap::new();
        for (id, &bias) in self.logit_bias.iter().flatten() {
            let Ok(token) = id.parse::<u32>() else {
                return Err(ApiError::invalid_param(
                    "logit_bias",
                    format!("`logit_bias` keys must be token ids, got `{id}`."),
                ));
            };
            if !(-100.0..=100.0).contains(&bias) || bias.is_nan() {
                return Err(ApiError::invalid_param(
                    "logit_bias",
                    format!("`logit_bias` values must be between -100 and 100, got {bias} for token {id}."),
                ));
            }
            logit_bias.insert(token, bias as f32);
        }
        if logit_bias.len() > 300 {
            return Err(ApiError::invalid_param(
                "logit_bias",
                "At most 300 tokens may be biased.",
            ));
        }
        Ok(Sampling {
            logit_bias,
            max_tokens,
            temperature,
            top_p,
            top_k,
            stop,
            seed: self.seed.map(|s| s as u64),
            presence_penalty,
            frequency_penalty,
            repetition_penalty,
        })
    }
}

fn parse_role(role: &str, i: usize) -> Result<Role, ApiError> {
    Ok(match role {
        "system" | "developer" => Role::System,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        "tool" | "function" => Role::Tool,
        other => {
            return Err(ApiError::invalid_param(
                &format!("messages[{i}].role"),
                format!(
                    "Invalid role `{}` in messages[{i}]; expected system, developer, user, assistant or tool.",
                    crate::error::truncate(other, 50)
                ),
            ))
        }
    })
}

fn content_text(content: &Option<InContent>, i: usize) -> Result<String, ApiError> {
    match content {
        None => Ok(String::new()),
        Some(InContent::Text(t)) => Ok(t.clone()),
        Some(InContent::Parts(parts)) => {
            let mut out = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => out.push_str(t),
                    ("text", None) => {
                        return Err(ApiError::invalid_param(
                            &format!("messages[{i}].content[{j}].text"),
                            "A text content part needs `text`.",
                        ))
                    }
                    (kind, _) => {
                        return Err(ApiError::invalid_param(
                            &format!("messages[{i}].content[{j}].type"),
                            format!("Content parts of type `{kind}` are not supported by this model; only `text`."),
                        ))
                    }
                }
            }
            Ok(out)
        }
    }
}

impl ChatCompletionRequest {
    pub fn is_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }

    pub fn to_generation(&self) -> Result<GenerationRequest, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid_param(
                "messages",
                "`messages` must not be empty.",
            ));
        }
        let mut messages = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.iter().enumerate() {
            let role = parse_role(&m.role, i)?;
            let content = content_text(&m.content, i)?;
            let tool_calls = m
                .tool_calls
                .iter()
                .flatten()
                .enumerate()
                .map(|(j, c)| ToolCall {
                    id: c.id.clone().unwrap_or_else(|| format!("call_{i}_{j}")),
                    name: c.function.name.clone(),
                    arguments: match &c.function.arguments {
                        serde_json::Value::String(s) => s.clone(),
                        serde_json::Value::Null => "{}".into(),
                        other => other.to_string(),
                    },
                })
                .collect::<Vec<_>>();
            if role != Role::Assistant && !tool_calls.is_empty() {
                return Err(ApiError::invalid_param(
                    &format!("messages[{i}].tool_calls"),
                    "Only assistant messages may carry `tool_calls`.",
                ));
            }
            let _ = &m.name;
            messages.push(ChatMessage {
                role,
                content,
                tool_calls,
                tool_call_id: m.tool_call_id.clone(),
            });
        }
        let constraint =
            match &self.response_format {
                None | Some(ResponseFormat::Text) => OutputConstraint::None,
                Some(ResponseFormat::JsonObject) => OutputConstraint::JsonObject,
                Some(ResponseFormat::JsonSchema { json_schema }) => {
                    let _ = (&json_schema.name, json_schema.strict);
                    match &json_schema.schema {
                        Some(s) if s.is_object() => OutputConstraint::JsonSchema(s.clone()),
                        _ => return Err(ApiError::invalid_param(
                            "response_format.json_schema.schema",
                            "`response_format.json_schema.schema` must be a JSON Schema object.",
                        )),
                    }
                }
            };
        let mut tools = Vec::new();
        for (i, t) in self.tools.iter().flatten().enumerate() {
            if t.kind != "function" {
                return Err(ApiError::invalid_param(
                    &format!("tools[{i}].type"),
                    format!("Tool type `{}` is not supported; only `function`.", t.kind),
                ));
            }
            if t.function.name.is_empty() {
                return Err(ApiError::invalid_param(
                    &format!("tools[{i}].function.name"),
                    "Function names must not be empty.",
                ));
            }
            tools.push(ToolSpec {
                name: t.function.name.clone(),
                description: t.function.description.clone(),
                parameters: t.function.parameters.clone(),
            });
        }
        let tool_choice = match &self.tool_choice {
            None => ToolChoice::Auto,
            Some(InToolChoice::Mode(m)) => match m.as_str() {
                "auto" => ToolChoice::Auto,
                "none" => ToolChoice::None,
                "required" if tools.is_empty() => {
                    return Err(ApiError::invalid_param(
                        "tool_choice",
                        "`required` needs at least one tool in `tools`.",
                    ))
                }
                "required" => ToolChoice::Required,
                other => {
                    return Err(ApiError::invalid_param(
                        "tool_choice",
                        format!("Invalid tool_choice `{other}`; expected none, auto, required or a function."),
                    ))
                }
            },
            Some(InToolChoice::Named { kind, function }) => {
                if kind != "function" {
                    return Err(ApiError::invalid_param(
                        "tool_choice.type",
                        "Only `function` tool choices are supported.",
                    ));
                }
                if !tools.iter().any(|t| t.name == function.name) {
                    return Err(ApiError::invalid_param(
                        "tool_choice.function.name",
                        format!("`{}` is not among the `tools` of this request.", function.name),
                    ));
                }
                ToolChoice::Function(function.name.clone())
            }
        };
        if tool_choice != ToolChoice::None
            && !tools.is_empty()
            && constraint != OutputConstraint::None
        {
            return Err(ApiError::invalid_param(
                "response_format",
                "`response_format` cannot be combined with `tools`.",
            ));
        }
        Ok(GenerationRequest {
            prompt: Prompt::Chat(messages),
            sampling: self.sampling.to_sampling()?,
            constraint,
            tools,
            tool_choice,
        })
    }
}

impl CompletionRequest {
    pub fn is_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }

    /// One internal request per prompt.
    pub fn to_generations(&self) -> Result<Vec<GenerationRequest>, ApiError> {
        if self.echo.unwrap_or(false) {
            return Err(ApiError::invalid_param("echo", "`echo` is not supported."));
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::invalid_param(
                "suffix",
                "`suffix` is not supported.",
            ));
        }
        if self.best_of.is_some_and(|b| b != 1) {
            return Err(ApiError::invalid_param(
                "best_of",
                "Only best_of=1 is supported.",
            ));
        }
        let prompts = match &self.prompt {
            PromptSpec::One(p) => vec![p.clone()],
            PromptSpec::Many(v) if v.is_empty() => {
                return Err(ApiError::invalid_param(
                    "prompt",
                    "`prompt` must not be an empty list.",
                ))
            }
            PromptSpec::Many(v) if v.len() > 16 => {
                return Err(ApiError::invalid_param(
                    "prompt",
                    "At most 16 prompts per request.",
                ))
            }
            PromptSpec::Many(v) => v.clone(),
        };
        if prompts.iter().any(String::is_empty) {
            return Err(ApiError::invalid_param(
                "prompt",
                "Prompts must not be empty.",
            ));
        }
        let sampling = self.sampling.to_sampling()?;
        Ok(prompts
            .into_iter()
            .map(|p| GenerationRequest {
                sampling: sampling.clone(),
                ..GenerationRequest::text(p)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(v: serde_json::Value) -> Result<GenerationRequest, ApiError> {
        serde_json::from_value::<ChatCompletionRequest>(v)
            .unwrap()
            .to_generation()
    }

    #[test]
    fn maps_a_full_chat_request() {
        let g = chat(serde_json::json!({
            "model": "m", "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.9, "stop": "END",
            "seed": 3, "presence_penalty": 0.1, "frequency_penalty": -0.1,
            "response_format": {"type": "json_object"}
        }))
        .unwrap();
        assert_eq!(g.sampling.max_tokens, Some(7));
        assert_eq!(g.sampling.stop, vec!["END"]);
        assert_eq!(g.sampling.seed, Some(3));
        assert_eq!(g.constraint, OutputConstraint::JsonObject);
        let Prompt::Chat(m) = g.prompt else { panic!() };
        assert_eq!(m[1].content, "hi");
    }

    #[test]
    fn bad_parameters_are_named() {
        let base = |k: &str, v: serde_json::Value| {
            let mut j = serde_json::json!({"messages": [{"role": "user", "content": "x"}]});
            j[k] = v;
            chat(j).unwrap_err()
        };
        assert_eq!(
            base("temperature", 3.0.into()).param.as_deref(),
            Some("temperature")
        );
        assert_eq!(
            base("max_tokens", 0.into()).param.as_deref(),
            Some("max_tokens")
        );
        assert_eq!(base("n", 2.into()).param.as_deref(), Some("n"));
        assert_eq!(base("top_p", 0.0.into()).param.as_deref(), Some("top_p"));
        let e =
            chat(serde_json::json!({"messages": [{"role": "robot", "content": "x"}]})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
        let e = chat(serde_json::json!({"messages": []})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
        let e = chat(
            serde_json::json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
        )
        .unwrap_err();
        assert!(e.message.contains("image_url"));
    }

    #[test]
    fn tools_and_choice() {
        let g = chat(serde_json::json!({
            "messages": [{"role": "user", "content": "weather?"}],
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}
        }))
        .unwrap();
        assert_eq!(g.tool_choice, ToolChoice::Function("get_weather".into()));
        let e = chat(serde_json::json!({
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "a"}}],
            "tool_choice": {"type": "function", "function": {"name": "b"}}
        }))
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tool_choice.function.name"));
        let two = serde_json::json!([
            {"type": "function", "function": {"name": "a"}},
            {"type": "function", "function": {"name": "b"}}]);
        let g = chat(serde_json::json!({
            "messages": [{"role": "user", "content": "x"}], "tools": two, "tool_choice": "required"
        }))
        .unwrap();
        assert_eq!(g.tool_choice, ToolChoice::Required);
        let e = chat(serde_json::json!({
            "messages": [{"role": "user", "content": "x"}], "tool_choice": "required"
        }))
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tool_choice"));
    }
}
