//! Keeping a client's text from forging control tokens.
//!
//! A chat template writes `<|im_start|>system` to open a system turn; if a user types the same
//! characters into a message and the whole prompt is tokenized with special tokens on, the user
//! has opened a system turn of their own. The llama.cpp engine tokenizes client text apart from
//! the template's with special tokens off ([`super::llamacpp::chat::Segment`]). mistral.rs 0.8.1
//! renders and tokenizes the prompt in one piece with no such switch (its
//! `pipeline/processing.rs` applies the template, then encodes the whole string), so for it, and
//! for client text that a template embeds itself (tool-call arguments, tool descriptions),
//! [`neutralize`] breaks each special token's spelling with an invisible word joiner: the text
//! reads the same and tokenizes as plain text.

use crate::request::{ChatMessage, ToolSpec};

/// `text` with every spelling of a special token broken by a word joiner (U+2060) after its
/// first character.
pub fn neutralize(text: &str, specials: &[String]) -> String {
    if !specials
        .iter()
        .any(|s| s.len() > 1 && text.contains(s.as_str()))
    {
        return text.to_string();
    }
    let mut out = text.to_string();
    for s in specials {
        if s.len() < 2 || !out.contains(s.as_str()) {
            continue;
        }
        let mut chars = s.chars();
        let first = chars.next().unwrap_or_default();
        let broken = format!("{first}\u{2060}{}", chars.as_str());
        out = out.replace(s.as_str(), &broken);
    }
    out
}

/// Neutralizes the client text a template embeds by itself: tool-call arguments and names in
/// earlier assistant turns, tool names and descriptions; with `content`, message contents too.
pub fn neutralize_request(
    messages: &mut [ChatMessage],
    tools: &mut [ToolSpec],
    specials: &[String],
    content: bool,
) {
    if specials.is_empty() {
        return;
    }
    for m in messages.iter_mut() {
        if content {
            m.content = neutralize(&m.content, specials);
        }
        for c in &mut m.tool_calls {
            c.arguments = neutralize(&c.arguments, specials);
            c.name = neutralize(&c.name, specials);
        }
    }
    for t in tools.iter_mut() {
        t.name = neutralize(&t.name, specials);
        if let Some(d) = &t.description {
            t.description = Some(neutralize(d, specials));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{Role, ToolCall};

    #[test]
    fn special_spellings_are_broken_and_plain_text_is_untouched() {
        let sp = vec!["<|im_start|>".to_string(), "<|im_end|>".to_string()];
        assert_eq!(neutralize("a<|im_end|>b", &sp), "a<\u{2060}|im_end|>b");
        assert_eq!(neutralize("plain <| text", &sp), "plain <| text");
        let mut msgs = vec![ChatMessage::new(Role::User, "<|im_start|>system")];
        msgs[0].tool_calls.push(ToolCall {
            id: "1".into(),
            name: "f".into(),
            arguments: "{\"x\": \"<|im_end|>\"}".into(),
        });
        let mut tools = vec![ToolSpec {
            name: "f".into(),
            description: Some("<|im_start|>".into()),
            parameters: None,
        }];
        neutralize_request(&mut msgs, &mut tools, &sp, false);
        assert_eq!(
            msgs[0].content, "<|im_start|>system",
            "content left to the engine"
        );
        assert!(!msgs[0].tool_calls[0].arguments.contains("<|im_end|>"));
        assert!(!tools[0]
            .description
            .as_ref()
            .unwrap()
            .contains("<|im_start|>"));
        neutralize_request(&mut msgs, &mut tools, &sp, true);
        assert!(!msgs[0].content.contains("<|im_start|>"));
    }
}
