//! Output constraints (JSON schema, JSON object, regex, Lark, a named tool call) as llguidance
//! grammars, one definition for both engines, and their check before a generation starts.
//!
//! A grammar llguidance cannot use (a recursive `$ref` it cannot compile, a Lark syntax error)
//! is the client's mistake: [`check`] builds the parser and computes the first token mask on a
//! byte-level vocabulary, so such a request is refused with a 400 before it takes a slot,
//! instead of failing mid-generation as a 500.

use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};

use super::EngineError;
use crate::request::{GenerationRequest, OutputConstraint};

/// The grammar a request's output must follow, `None` when it is free.
pub fn of(req: &GenerationRequest) -> Result<Option<TopLevelGrammar>, EngineError> {
    Ok(match &req.constraint {
        OutputConstraint::None => match (&req.tool_choice, req.tools.is_empty()) {
            // A tool must be called: constrain the output to that call (or one of them).
            (choice, false) if choice.forces_a_call() => Some(TopLevelGrammar::from_lark(
                super::forced_call_lark(&req.tools, choice)?,
            )),
            _ => None,
        },
        OutputConstraint::JsonObject => Some(TopLevelGrammar::from_json_schema(
            super::compact_json_schema(&serde_json::json!({"type": "object"})),
        )),
        OutputConstraint::JsonSchema(s) => Some(TopLevelGrammar::from_json_schema(
            super::compact_json_schema(s),
        )),
        OutputConstraint::Regex(r) => Some(TopLevelGrammar::from_regex(r)),
        OutputConstraint::Lark(g) => Some(TopLevelGrammar::from_lark(g.clone())),
    })
}

/// A parser factory over a 256-token byte vocabulary: what a grammar means does not depend on
/// the model's vocabulary, so this is enough to tell a usable grammar from a broken one.
fn byte_factory() -> Result<&'static Arc<ParserFactory>, EngineError> {
    static F: OnceLock<Result<Arc<ParserFactory>, String>> = OnceLock::new();
    F.get_or_init(|| {
        ParserFactory::new_simple(&toktrie::ApproximateTokEnv::single_byte_env())
            .map(Arc::new)
            .map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| EngineError::Internal(format!("grammar support: {e}")))
}

/// A usable matcher of `grammar` from `factory`: the parser is built and the first mask
/// computed, so a grammar that cannot run fails here.
pub fn matcher(factory: &ParserFactory, grammar: TopLevelGrammar) -> Result<Matcher, EngineError> {
    let parser = factory
        .create_parser(grammar)
        .map_err(|e| invalid(&e.to_string()))?;
    let mut m = Matcher::new(Ok(parser));
    m.compute_mask().map_err(|e| invalid(&e.to_string()))?;
    // `compute_mask` does not advance the matcher: the engine computes this mask again.
    Ok(m)
}

fn invalid(e: &str) -> EngineError {
    EngineError::Invalid(format!(
        "the output constraint cannot be used: {}",
        tidepool_bounds::clip(e)
    ))
}

/// Steps of the dry run [`check`] takes through a grammar.
const DRY_RUN_STEPS: usize = 48;

/// Checks the request's constraint, if it has one (see the module doc): the grammar is built,
/// and walked for a few dozen bytes along the lowest allowed byte at each step, so a grammar
/// that explodes as soon as it starts (an object that must contain itself) fails here too.
pub fn check(req: &GenerationRequest) -> Result<(), EngineError> {
    let Some(g) = of(req)? else {
        return Ok(());
    };
    let factory = byte_factory()?;
    let mut m = matcher(factory, g)?;
    let eos = factory.tok_env().tok_trie().eos_token();
    for _ in 0..DRY_RUN_STEPS {
        if m.is_stopped() {
            break;
        }
        let mask = m.compute_mask().map_err(|e| invalid(&e.to_string()))?;
        // Any allowed byte but the end; none (only the end is allowed) means the output may
        // stop here, which is fine.
        let mut next = None;
        mask.iter_set_entries(|t| {
            if next.is_none() && t as u32 != eos && t < 256 {
                next = Some(t as u32);
            }
        });
        let Some(t) = next else { break };
        m.consume_token(t).map_err(|e| invalid(&e.to_string()))?;
    }
    Ok(())
}

/// The message prefix of a generation that failed because of its output constraint (a
/// grammar that became unusable part-way): the client's mistake, answered as such.
pub const FAILED: &str = "the output constraint failed: ";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{ChatMessage, Role};

    fn with(constraint: OutputConstraint) -> GenerationRequest {
        GenerationRequest {
            constraint,
            ..GenerationRequest::chat(vec![ChatMessage::new(Role::User, "x")])
        }
    }

    #[test]
    fn usable_grammars_pass_and_broken_ones_are_client_errors() {
        check(&with(OutputConstraint::None)).unwrap();
        check(&with(OutputConstraint::JsonObject)).unwrap();
        check(&with(OutputConstraint::JsonSchema(serde_json::json!({
            "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]
        }))))
        .unwrap();
        check(&with(OutputConstraint::Regex("[a-z]+".into()))).unwrap();
        for bad in [
            OutputConstraint::Lark("start: (".into()),
            OutputConstraint::Regex("(".into()),
            OutputConstraint::JsonSchema(serde_json::json!({"$ref": "#/$defs/nothing"})),
            // An object that must contain itself: fine to start, explodes after `{"`.
            OutputConstraint::JsonSchema(serde_json::json!({
                "type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]
            })),
        ] {
            let e = check(&with(bad.clone())).unwrap_err();
            assert!(matches!(e, EngineError::Invalid(_)), "{bad:?}: {e}");
        }
    }
}
