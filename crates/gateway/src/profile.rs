//! Task profiles: one model, several jobs, each a named system prompt + sampling + output
//! constraint + priority class, chosen per request (a `profile` field, the `x-tidepool-profile`
//! header, or a model name such as `qwen2.5-0.5b-instruct:sentiment`).
//!
//! Built in: `sentiment` (one of a fixed label set, grammar-constrained so the output is always a
//! valid label, interactive class, a few tokens), `chat` (the assistant) and `sentiment+chat`, a
//! combined profile that answers both in one request: the label first, then the reply. A combined
//! profile runs its two generations on one worker slot with one shared prompt prefix (the
//! conversation), so the second reuses the first's KV cache through the engine's prefix cache.
//! `[profiles.NAME]` tables in the configuration file add profiles or replace built-in ones.
//!
//! Pure logic: resolution, validation and the rewrite of a request.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use tidepool_engine::request::{
    ChatMessage, GenerationRequest, OutputConstraint, Prompt, Role, ToolChoice,
};
use tidepool_sched::queue::Class;

/// One `[profiles.NAME]` table.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProfileConfig {
    /// Put before the request's own system prompt.
    pub system: Option<String>,
    /// The output is exactly one of these (enforced by a grammar).
    pub labels: Vec<String>,
    /// Caps the request's `max_tokens`.
    pub max_tokens: Option<u32>,
    /// Used when the request sets none.
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// The priority class, unless the request names one in `x-tidepool-priority`.
    pub priority: Option<Class>,
    /// A combined profile: a label profile and an assistant profile, answered in that order.
    pub combine: Vec<String>,
    /// For a label profile used in a combined one: the follow-up question that asks for the
    /// label after the conversation (default: its system prompt and the labels).
    pub question: Option<String>,
}

/// Profiles by name.
pub type Profiles = BTreeMap<String, ProfileConfig>;

/// The built-in profiles.
pub fn builtin() -> Profiles {
    let labels: Vec<String> = ["positive", "negative", "neutral"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut p = Profiles::new();
    p.insert(
        "sentiment".into(),
        ProfileConfig {
            system: Some(
                "Classify the sentiment of the user's message. Answer with exactly one word: positive, negative or neutral.".into(),
            ),
            labels,
            temperature: Some(0.0),
            priority: Some(Class::Interactive),
            question: Some(
                "What is the sentiment of my last message? Answer with exactly one word: positive, negative or neutral.".into(),
            ),
            ..ProfileConfig::default()
        },
    );
    p.insert(
        "chat".into(),
        ProfileConfig {
            system: Some("You are a helpful assistant.".into()),
            priority: Some(Class::Standard),
            ..ProfileConfig::default()
        },
    );
    p.insert(
        "sentiment+chat".into(),
        ProfileConfig {
            combine: vec!["sentiment".into(), "chat".into()],
            ..ProfileConfig::default()
        },
    );
    p
}

/// The built-in profiles with the configured ones added (a configured name replaces a built-in).
pub fn resolve(configured: &Profiles) -> Profiles {
    let mut p = builtin();
    p.extend(configured.iter().map(|(k, v)| (k.clone(), v.clone())));
    p
}

/// Checks every profile; the error names the key (`profiles.NAME.FIELD`).
pub fn validate(profiles: &Profiles) -> Result<(), (String, String)> {
    for (name, p) in profiles {
        let key = |f: &str| format!("profiles.{name}.{f}");
        if name.is_empty() || name.contains(':') || name.chars().any(char::is_whitespace) {
            return Err((
                format!("profiles.{name}"),
                "a profile name must be non-empty, without ':' or spaces".into(),
            ));
        }
        if p.labels.iter().any(|l| l.is_empty()) {
            return Err((key("labels"), "labels must not be empty strings".into()));
        }
        if let Some(m) = p.max_tokens {
            tidepool_bounds::int(&key("max_tokens"), m.into(), 1, 1 << 20)?;
        }
        if p.labels.len() > 256 || p.labels.iter().any(|l| l.len() > 256) {
            return Err((
                key("labels"),
                "at most 256 labels of at most 256 bytes each".into(),
            ));
        }
        if p.temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
            return Err((key("temperature"), "must be between 0 and 2".into()));
        }
        if p.top_p.is_some_and(|t| !(t > 0.0 && t <= 1.0)) {
            return Err((key("top_p"), "must be in (0, 1]".into()));
        }
        if !p.combine.is_empty() {
            let [label, reply] = p.combine.as_slice() else {
                return Err((
                    key("combine"),
                    "names exactly two profiles: a label profile, then an assistant profile".into(),
                ));
            };
            let get = |n: &String| {
                profiles
                    .get(n)
                    .ok_or_else(|| (key("combine"), format!("no profile named `{n}`")))
            };
            let (l, r) = (get(label)?, get(reply)?);
            if l.labels.is_empty() || !l.combine.is_empty() {
                return Err((
                    key("combine"),
                    format!("`{label}` must be a label profile (with `labels`)"),
                ));
            }
            if !r.labels.is_empty() || !r.combine.is_empty() {
                return Err((
                    key("combine"),
                    format!("`{reply}` must be an assistant profile (no `labels`, no `combine`)"),
                ));
            }
            if p.system.is_some() || !p.labels.is_empty() || p.question.is_some() {
                return Err((
                    key("combine"),
                    "a combined profile takes its prompts from the profiles it combines".into(),
                ));
            }
        }
    }
    Ok(())
}

/// Why a profile cannot serve a request.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ProfileError {
    #[error("unknown profile `{name}`; this server has: {known}")]
    Unknown { name: String, known: String },
    #[error("{0}")]
    Conflict(String),
}

/// What a request becomes under a profile.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    Single {
        request: GenerationRequest,
        class: Option<Class>,
    },
    /// The label request, then the reply request. The label request is built from the reply's
    /// final conversation ([`label_request`]) once that is settled (truncated, degraded), so its
    /// prompt extends the reply's and the reply reuses its KV cache.
    Combined {
        label_profile: String,
        reply: GenerationRequest,
        class: Option<Class>,
    },
}

/// Looks `name` up.
pub fn find<'a>(profiles: &'a Profiles, name: &str) -> Result<&'a ProfileConfig, ProfileError> {
    profiles.get(name).ok_or_else(|| ProfileError::Unknown {
        name: tidepool_bounds::clip(name),
        known: profiles.keys().cloned().collect::<Vec<_>>().join(", "),
    })
}

/// A regular expression matching exactly one of `labels`.
pub fn label_regex(labels: &[String]) -> String {
    let escaped: Vec<String> = labels
        .iter()
        .map(|l| {
            let mut out = String::new();
            for c in l.chars() {
                if "\\.+*?()|[]{}^$#&-~".contains(c) {
                    out.push('\\');
                }
                out.push(c);
            }
            out
        })
        .collect();
    format!("({})", escaped.join("|"))
}

/// Enough tokens for the longest label and the end of sequence (byte-level BPE never needs more
/// tokens than bytes).
fn label_tokens(labels: &[String]) -> u32 {
    labels.iter().map(|l| l.len()).max().unwrap_or(0) as u32 + 2
}

/// `profile` applied to `request`: its system prompt first, its sampling where the request has
/// none, `max_tokens` capped, its label grammar.
pub fn apply(
    name: &str,
    profile: &ProfileConfig,
    mut request: GenerationRequest,
) -> Result<GenerationRequest, ProfileError> {
    if !profile.labels.is_empty() {
        if request.constraint != OutputConstraint::None {
            return Err(ProfileError::Conflict(format!(
                "the profile `{name}` constrains the output to its labels; drop the request's response format"
            )));
        }
        if !request.tools.is_empty() {
            return Err(ProfileError::Conflict(format!(
                "the profile `{name}` answers with a label; it cannot call tools"
            )));
        }
        request.constraint = OutputConstraint::Regex(label_regex(&profile.labels));
        let cap = profile
            .max_tokens
            .unwrap_or(0)
            .max(label_tokens(&profile.labels));
        request.sampling.max_tokens = Some(request.sampling.max_tokens.map_or(cap, |m| m.min(cap)));
    } else if let Some(cap) = profile.max_tokens {
        request.sampling.max_tokens = Some(request.sampling.max_tokens.map_or(cap, |m| m.min(cap)));
    }
    if request.sampling.temperature.is_none() {
        request.sampling.temperature = profile.temperature;
    }
    if request.sampling.top_p.is_none() {
        request.sampling.top_p = profile.top_p;
    }
    if let Some(system) = &profile.system {
        match &mut request.prompt {
            Prompt::Chat(messages) => match messages.first_mut() {
                Some(m) if m.role == Role::System => {
                    m.content = if m.content.is_empty() {
                        system.clone()
                    } else {
                        format!("{system}\n\n{}", m.content)
                    }
                }
                _ => messages.insert(0, ChatMessage::new(Role::System, system.clone())),
            },
            Prompt::Text(_) => {
                return Err(ProfileError::Conflict(format!(
                    "the profile `{name}` has a system prompt; it needs chat messages, not a text prompt"
                )))
            }
        }
    }
    Ok(request)
}

/// The plan for `request` under the profile `name`.
pub fn plan(
    profiles: &Profiles,
    name: &str,
    request: GenerationRequest,
) -> Result<Plan, ProfileError> {
    let profile = find(profiles, name)?;
    if profile.combine.is_empty() {
        return Ok(Plan::Single {
            request: apply(name, profile, request)?,
            class: profile.priority,
        });
    }
    let (label_name, reply_name) = (&profile.combine[0], &profile.combine[1]);
    let (label_profile, reply_profile) = (find(profiles, label_name)?, find(profiles, reply_name)?);
    if !request.tools.is_empty() {
        return Err(ProfileError::Conflict(format!(
            "the combined profile `{name}` does not take tools"
        )));
    }
    if request.constraint != OutputConstraint::None {
        return Err(ProfileError::Conflict(format!(
            "the combined profile `{name}` does not take a response format"
        )));
    }
    let Prompt::Chat(_) = &request.prompt else {
        return Err(ProfileError::Conflict(format!(
            "the combined profile `{name}` needs chat messages"
        )));
    };
    let _ = label_profile;
    Ok(Plan::Combined {
        label_profile: label_name.clone(),
        reply: apply(reply_name, reply_profile, request)?,
        class: profile.priority.or(reply_profile.priority),
    })
}

/// The label half of a combined profile: the reply's conversation (same prompt prefix), then
/// the label question, answered under the label grammar.
pub fn label_request(
    name: &str,
    profile: &ProfileConfig,
    reply: &GenerationRequest,
) -> Result<GenerationRequest, ProfileError> {
    let Prompt::Chat(messages) = &reply.prompt else {
        return Err(ProfileError::Conflict(
            "a combined profile needs chat messages".into(),
        ));
    };
    let question = profile.question.clone().unwrap_or_else(|| {
        format!(
            "{}\nAnswer with exactly one of: {}.",
            profile.system.as_deref().unwrap_or(""),
            profile.labels.join(", ")
        )
    });
    let mut messages = messages.clone();
    messages.push(ChatMessage::new(Role::User, question));
    let mut label = GenerationRequest::chat(messages);
    label.sampling.temperature = Some(profile.temperature.unwrap_or(0.0));
    label.sampling.top_p = profile.top_p;
    label.sampling.seed = reply.sampling.seed;
    label.tool_choice = ToolChoice::Auto;
    if profile.labels.is_empty() {
        return Err(ProfileError::Conflict(format!(
            "`{name}` has no labels to answer with"
        )));
    }
    label.constraint = OutputConstraint::Regex(label_regex(&profile.labels));
    let cap = profile
        .max_tokens
        .unwrap_or(0)
        .max(label_tokens(&profile.labels));
    label.sampling.max_tokens = Some(cap);
    Ok(label)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(text: &str) -> GenerationRequest {
        let mut r = GenerationRequest::chat(vec![ChatMessage::new(Role::User, text)]);
        r.sampling.max_tokens = Some(1024);
        r
    }

    #[test]
    fn builtins_are_valid_and_configured_ones_replace_them() {
        let p = builtin();
        validate(&p).unwrap();
        let mut mine = Profiles::new();
        mine.insert(
            "chat".into(),
            ProfileConfig {
                system: Some("Talk like a pirate.".into()),
                ..Default::default()
            },
        );
        let all = resolve(&mine);
        assert_eq!(all["chat"].system.as_deref(), Some("Talk like a pirate."));
        assert!(all.contains_key("sentiment"));
    }

    #[test]
    fn validation_names_the_key() {
        let mut p = builtin();
        p.insert(
            "bad".into(),
            ProfileConfig {
                combine: vec!["chat".into(), "sentiment".into()],
                ..Default::default()
            },
        );
        let (key, _) = validate(&p).unwrap_err();
        assert_eq!(key, "profiles.bad.combine");
        let mut p = builtin();
        p.insert(
            "x".into(),
            ProfileConfig {
                combine: vec!["sentiment".into(), "nope".into()],
                ..Default::default()
            },
        );
        assert!(validate(&p).unwrap_err().1.contains("nope"));
        let mut p = Profiles::new();
        p.insert("a:b".into(), ProfileConfig::default());
        assert!(validate(&p).is_err());
    }

    #[test]
    fn sentiment_constrains_caps_and_prepends_its_prompt() {
        let Plan::Single { request, class } =
            plan(&builtin(), "sentiment", user("I love it")).unwrap()
        else {
            panic!()
        };
        assert_eq!(class, Some(Class::Interactive));
        assert_eq!(
            request.constraint,
            OutputConstraint::Regex("(positive|negative|neutral)".into())
        );
        assert_eq!(request.sampling.max_tokens, Some(10));
        assert_eq!(request.sampling.temperature, Some(0.0));
        let Prompt::Chat(m) = &request.prompt else {
            panic!()
        };
        assert_eq!(m[0].role, Role::System);
        assert!(m[0].content.starts_with("Classify"));
        assert_eq!(m[1].content, "I love it");
    }

    #[test]
    fn the_request_keeps_its_own_system_prompt_and_explicit_sampling() {
        let mut r = GenerationRequest::chat(vec![
            ChatMessage::new(Role::System, "Context: a shop review."),
            ChatMessage::new(Role::User, "meh"),
        ]);
        r.sampling.temperature = Some(0.7);
        let Plan::Single { request, .. } = plan(&builtin(), "chat", r).unwrap() else {
            panic!()
        };
        assert_eq!(request.sampling.temperature, Some(0.7));
        let Prompt::Chat(m) = &request.prompt else {
            panic!()
        };
        assert_eq!(
            m[0].content,
            "You are a helpful assistant.\n\nContext: a shop review."
        );
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn combined_shares_the_prompt_prefix() {
        let profiles = builtin();
        let Plan::Combined {
            label_profile,
            reply,
            ..
        } = plan(
            &profiles,
            "sentiment+chat",
            user("The tide ruined my picnic"),
        )
        .unwrap()
        else {
            panic!()
        };
        assert_eq!(label_profile, "sentiment");
        let label = label_request("sentiment", &profiles["sentiment"], &reply).unwrap();
        let (Prompt::Chat(l), Prompt::Chat(r)) = (&label.prompt, &reply.prompt) else {
            panic!()
        };
        // The label's conversation is the reply's plus one question.
        assert_eq!(&l[..r.len()], &r[..]);
        assert_eq!(l.len(), r.len() + 1);
        assert!(l.last().unwrap().content.contains("sentiment"));
        assert!(matches!(label.constraint, OutputConstraint::Regex(_)));
        assert_eq!(reply.constraint, OutputConstraint::None);
        assert_eq!(reply.sampling.max_tokens, Some(1024));
    }

    #[test]
    fn conflicts_and_unknown_names() {
        let mut r = user("x");
        r.constraint = OutputConstraint::JsonObject;
        assert!(matches!(
            plan(&builtin(), "sentiment", r),
            Err(ProfileError::Conflict(_))
        ));
        let e = plan(&builtin(), "poetry", user("x")).unwrap_err();
        assert!(e.to_string().contains("sentiment"), "{e}");
        assert!(plan(&builtin(), "chat", GenerationRequest::text("x")).is_err());
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(
            label_regex(&["a.b".into(), "c|d".into(), "e f".into()]),
            "(a\\.b|c\\|d|e f)"
        );
    }
}
