//! Tool calls in generated text, for the llama.cpp engine (mistral.rs parses its own).
//!
//! Qwen2.5's chat template (Hermes style) asks the model to answer a tool call as
//! `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one block per call; some models
//! answer with the bare JSON object. While a request offers tools, the engine holds back output
//! that starts like a call ([`may_be_call`]) and, at the end, turns it into
//! [`ToolCall`]s ([`parse`]) or, if it is not one after all, releases it as text. Pure.

use crate::request::ToolCall;

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";
const BARE: &str = "{\"name\"";

/// Whether `text` (the output so far) is, or may still become, a tool call.
pub fn may_be_call(text: &str) -> bool {
    let t = text.trim_start();
    [OPEN, BARE]
        .iter()
        .any(|p| t.starts_with(p) || p.starts_with(t))
}

/// Whether `text` opens a call with the template's marker (so, unparsed, it is a call that was
/// cut off, not an answer).
pub fn is_call_start(text: &str) -> bool {
    text.trim_start().starts_with(OPEN)
}

/// The calls in a complete output, or `None` when it is not (only) tool calls.
pub fn parse(text: &str) -> Option<Vec<ToolCall>> {
    let mut rest = text.trim();
    let mut calls = Vec::new();
    if rest.starts_with('{') {
        return one_call(rest).map(|c| vec![c]);
    }
    while !rest.is_empty() {
        let body = rest.strip_prefix(OPEN)?;
        // A missing close tag at the very end (cut by a stop token) still counts.
        let (json, after) = match body.find(CLOSE) {
            Some(end) => (&body[..end], &body[end + CLOSE.len()..]),
            None => (body, ""),
        };
        calls.push(one_call(json.trim())?);
        rest = after.trim_start();
    }
    (!calls.is_empty()).then_some(calls)
}

fn one_call(json: &str) -> Option<ToolCall> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let name = v.get("name")?.as_str()?.to_string();
    let args = v
        .get("arguments")
        .or_else(|| v.get("parameters"))
        .cloned()
        .unwrap_or_else(|| serde_json::json!({}));
    // OpenAI carries arguments as JSON text.
    let arguments = match args {
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    };
    Some(ToolCall {
        id: format!("call-{:016x}", rand::random::<u64>()),
        name,
        arguments,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hermes_blocks_are_calls() {
        let out = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>";
        let calls = parse(out).unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].name, "get_weather");
        assert_eq!(calls[0].arguments, r#"{"city":"Paris"}"#);
        assert_eq!(calls[1].name, "now");
        assert_ne!(calls[0].id, calls[1].id);
    }

    #[test]
    fn bare_json_and_unclosed_blocks_are_calls() {
        assert_eq!(
            parse(r#"{"name": "f", "arguments": "{\"a\":1}"}"#).unwrap()[0].arguments,
            r#"{"a":1}"#
        );
        assert_eq!(parse("<tool_call>{\"name\": \"f\"}").unwrap()[0].name, "f");
    }

    #[test]
    fn other_text_is_not_a_call() {
        assert!(parse("The weather is fine.").is_none());
        assert!(parse("<tool_call>not json</tool_call>").is_none());
        assert!(parse("<tool_call>{\"name\": \"f\"}</tool_call> and then text").is_none());
        assert!(parse(r#"{"city": "Paris"}"#).is_none());
    }

    #[test]
    fn holding_back_starts_only_on_what_looks_like_a_call() {
        assert!(may_be_call(""));
        assert!(may_be_call("  <tool"));
        assert!(may_be_call("<tool_call>\n{\"na"));
        assert!(may_be_call("{\"na"));
        assert!(!may_be_call("Hello"));
        assert!(!may_be_call("<b>"));
    }
}
