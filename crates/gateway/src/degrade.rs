//! Degraded mode: when the backlog passes a threshold, standard-class requests get a short answer
//! (a capped `max_tokens` and a hint appended to the system prompt) so the queue drains instead of
//! making them wait past their deadline. Interactive requests are never degraded (they are served
//! first anyway) and batch requests are meant to wait.
//!
//! Pure logic: the decision and the rewrite of the request.

use serde::{Deserialize, Serialize};

use tidepool_engine::request::{ChatMessage, GenerationRequest, Prompt, Role};
use tidepool_sched::queue::Class;

/// The `[degraded]` table of the configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DegradedConfig {
    /// Degrade standard requests while at least this many requests wait for a slot; unset turns
    /// degraded mode off.
    pub backlog_threshold: Option<usize>,
    /// The most tokens a degraded answer may have.
    pub max_tokens: u32,
    /// Appended to the system prompt of degraded requests.
    pub hint: String,
}

impl Default for DegradedConfig {
    fn default() -> Self {
        DegradedConfig {
            backlog_threshold: None,
            max_tokens: 64,
            hint: "The service is busy: answer in one or two short sentences.".into(),
        }
    }
}

impl DegradedConfig {
    pub fn validate(&self) -> Result<(), tidepool_bounds::Invalid> {
        if self.backlog_threshold == Some(0) {
            return Err((
                "degraded.backlog_threshold".into(),
                "must be at least 1 (leave it unset to turn degraded mode off)".into(),
            ));
        }
        if let Some(t) = self.backlog_threshold {
            tidepool_bounds::count("degraded.backlog_threshold", t, 1)?;
        }
        tidepool_bounds::int("degraded.max_tokens", self.max_tokens.into(), 1, 1 << 20)?;
        tidepool_bounds::int("degraded.hint", self.hint.len() as u64, 0, 4096)
            .map_err(|(k, _)| (k, "must be at most 4096 bytes".into()))
    }

    /// Whether a request of `class` arriving with `backlog` requests waiting is degraded.
    pub fn applies(&self, class: Class, backlog: usize) -> bool {
        class == Class::Standard && self.backlog_threshold.is_some_and(|t| backlog >= t)
    }

    /// The short version of `request`: `max_tokens` capped, the hint appended to the system
    /// prompt (a system message is added when there is none; text prompts only get the cap).
    pub fn degrade(&self, mut request: GenerationRequest) -> GenerationRequest {
        let cap = request
            .sampling
            .max_tokens
            .map_or(self.max_tokens, |m| m.min(self.max_tokens));
        request.sampling.max_tokens = Some(cap);
        if let Prompt::Chat(messages) = &mut request.prompt {
            if !self.hint.is_empty() {
                match messages.first_mut() {
                    Some(m) if m.role == Role::System => {
                        if !m.content.is_empty() {
                            m.content.push_str("\n\n");
                        }
                        m.content.push_str(&self.hint);
                    }
                    _ => messages.insert(0, ChatMessage::new(Role::System, self.hint.clone())),
                }
            }
        }
        request
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(threshold: Option<usize>) -> DegradedConfig {
        DegradedConfig {
            backlog_threshold: threshold,
            max_tokens: 32,
            hint: "Be short.".into(),
        }
    }

    #[test]
    fn only_standard_requests_past_the_threshold() {
        let c = cfg(Some(3));
        assert!(!c.applies(Class::Standard, 2));
        assert!(c.applies(Class::Standard, 3));
        assert!(!c.applies(Class::Interactive, 50));
        assert!(!c.applies(Class::Batch, 50));
        assert!(!cfg(None).applies(Class::Standard, 1000));
    }

    #[test]
    fn degrading_caps_tokens_and_appends_the_hint() {
        let c = cfg(Some(1));
        let mut r = GenerationRequest::chat(vec![
            ChatMessage::new(Role::System, "You are kind."),
            ChatMessage::new(Role::User, "hi"),
        ]);
        r.sampling.max_tokens = Some(500);
        let d = c.degrade(r);
        assert_eq!(d.sampling.max_tokens, Some(32));
        let Prompt::Chat(m) = &d.prompt else { panic!() };
        assert_eq!(m[0].content, "You are kind.\n\nBe short.");

        let mut r = GenerationRequest::chat(vec![ChatMessage::new(Role::User, "hi")]);
        r.sampling.max_tokens = Some(8);
        let d = c.degrade(r);
        assert_eq!(d.sampling.max_tokens, Some(8));
        let Prompt::Chat(m) = &d.prompt else { panic!() };
        assert_eq!(
            (m[0].role, m[0].content.as_str()),
            (Role::System, "Be short.")
        );
        assert_eq!(m.len(), 2);

        let d = c.degrade(GenerationRequest::text("once"));
        assert_eq!(d.prompt, Prompt::Text("once".into()));
        assert_eq!(d.sampling.max_tokens, Some(32));
    }
}
