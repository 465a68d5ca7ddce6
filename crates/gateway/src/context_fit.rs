//! Long inputs: what to do when prompt + `max_tokens` exceeds the context budget.
//!
//! The policy is configured (`[context] on_overflow`): `reject` (the default) refuses the request
//! with a clear error; `truncate` drops messages from the middle of the conversation, keeping the
//! system prompt, the first `keep_head` other messages (the head: usually the task) and as many of
//! the latest messages as fit (the tail, always including the last one). Text prompts (raw
//! completions) are never cut.
//!
//! Pure logic: which messages a candidate keeps ([`Layout`]), and the search for the longest tail
//! that fits ([`TailSearch`]), driven by a caller that counts tokens with the real tokenizer.

use serde::{Deserialize, Serialize};

use tidepool_engine::request::{ChatMessage, GenerationRequest, Prompt, Role};

/// What happens to a request too long for the context budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Overflow {
    /// 400, with the numbers.
    #[default]
    Reject,
    /// Drop messages from the middle of the conversation.
    Truncate,
}

/// The `[context]` table of the configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContextConfig {
    /// Tokens one request may use, prompt and completion together; unset means the pool's
    /// `context_tokens` (the KV cache each slot reserves). Never above the model's own limit.
    pub budget_tokens: Option<u32>,
    pub on_overflow: Overflow,
    /// With `truncate`: non-system messages kept from the start of the conversation.
    pub keep_head: usize,
}

impl Default for ContextConfig {
    fn default() -> Self {
        ContextConfig {
            budget_tokens: None,
            on_overflow: Overflow::Reject,
            keep_head: 1,
        }
    }
}

impl ContextConfig {
    pub fn validate(&self) -> Result<(), tidepool_bounds::Invalid> {
        if let Some(b) = self.budget_tokens {
            tidepool_bounds::int("context.budget_tokens", b.into(), 1, 1 << 24)?;
        }
        tidepool_bounds::count("context.keep_head", self.keep_head, 0)
    }
}

/// What truncation did, reported to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Truncation {
    pub dropped_messages: usize,
    /// The prompt's tokens before truncation.
    pub original_prompt_tokens: u32,
}

/// An upper bound on the tokens `request`'s prompt can take once rendered (its tools
/// included), from its bytes: no tokenization needed.
pub fn prompt_upper_bound(request: &GenerationRequest) -> u64 {
    match &request.prompt {
        Prompt::Chat(m) => {
            let tools_bytes = serde_json::to_vec(&request.tools).map_or(0, |v| v.len());
            token_upper_bound(m, tools_bytes)
        }
        Prompt::Text(t) => t.len() as u64 + 16,
    }
}

/// The most tokens `request` can occupy in a worker's context: its prompt's upper bound plus
/// its `max_tokens` (no limit: all of it). The pool gives it a slot only on a worker whose
/// context holds that much ([`tidepool_sched::kv`]).
pub fn tokens_needed(request: &GenerationRequest) -> u32 {
    let answer = request.sampling.max_tokens.map_or(u64::MAX, u64::from);
    prompt_upper_bound(request)
        .saturating_add(answer)
        .min(u64::from(u32::MAX)) as u32
}

/// An upper bound on the tokens a chat prompt can take, from its bytes: byte-level BPE never
/// makes more tokens than bytes, and the chat template adds a few per message plus a default
/// system prompt. When this bound fits, no tokenization is needed.
pub fn token_upper_bound(messages: &[ChatMessage], tools_bytes: usize) -> u64 {
    let content: usize = messages
        .iter()
        .map(|m| {
            m.content.len()
                + m.tool_calls
                    .iter()
                    .map(|c| c.name.len() + c.arguments.len() + 16)
                    .sum::<usize>()
        })
        .sum();
    (content + tools_bytes) as u64 + 16 * (messages.len() as u64 + 1) + 128
}

/// A conversation split into what truncation keeps and what it may drop.
#[derive(Debug, Clone)]
pub struct Layout {
    messages: Vec<ChatMessage>,
    /// Leading system messages: always kept.
    system: usize,
    /// The head after them: kept when it fits.
    head: usize,
}

impl Layout {
    pub fn new(messages: Vec<ChatMessage>, keep_head: usize) -> Layout {
        let system = messages
            .iter()
            .take_while(|m| m.role == Role::System)
            .count();
        // The head never includes the last message (that one is always in the tail).
        let head = keep_head.min(messages.len().saturating_sub(system + 1));
        Layout {
            messages,
            system,
            head,
        }
    }

    /// How many messages the tail can take at most (everything after system and head).
    pub fn max_tail(&self, with_head: bool) -> usize {
        self.messages.len() - self.system - if with_head { self.head } else { 0 }
    }

    /// The conversation keeping system, the head if `with_head`, and the last `tail` messages;
    /// and how many messages it drops.
    pub fn select(&self, with_head: bool, tail: usize) -> (Vec<ChatMessage>, usize) {
        let head = if with_head { self.head } else { 0 };
        let tail = tail.min(self.max_tail(with_head));
        let mut kept: Vec<ChatMessage> = self.messages[..self.system + head].to_vec();
        let mut rest = &self.messages[self.messages.len() - tail..];
        // A tool result whose call was dropped means nothing on its own.
        while rest.len() > 1 && rest[0].role == Role::Tool {
            rest = &rest[1..];
        }
        kept.extend_from_slice(rest);
        let dropped = self.messages.len() - kept.len();
        (kept, dropped)
    }
}

/// Binary search for the largest tail in `1..=max` that fits, one token count per step:
/// `next_tail` names the tail to try, `report` says whether it fitted; `best` is the answer once
/// `next_tail` returns `None` (`None` when not even one message fits).
#[derive(Debug, Clone)]
pub struct TailSearch {
    lo: usize,
    hi: usize,
    best: Option<usize>,
    trying: Option<usize>,
    first: bool,
}

impl TailSearch {
    pub fn new(max: usize) -> TailSearch {
        TailSearch {
            lo: 1,
            hi: max,
            best: None,
            trying: None,
            first: true,
        }
    }

    pub fn next_tail(&mut self) -> Option<usize> {
        if self.lo > self.hi {
            return None;
        }
        let mid = self.lo + (self.hi - self.lo).div_ceil(2);
        // Try the largest first: most requests fit whole or nearly.
        let probe = if std::mem::take(&mut self.first) {
            self.hi
        } else {
            mid
        };
        self.trying = Some(probe);
        Some(probe)
    }

    pub fn report(&mut self, fits: bool) {
        let Some(t) = self.trying.take() else {
            return;
        };
        if fits {
            self.best = Some(t);
            self.lo = t + 1;
        } else {
            self.hi = t - 1;
        }
    }

    pub fn best(&self) -> Option<usize> {
        self.best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(n: usize) -> Vec<ChatMessage> {
        let mut v = vec![ChatMessage::new(Role::System, "sys")];
        for i in 0..n {
            let role = if i % 2 == 0 {
                Role::User
            } else {
                Role::Assistant
            };
            v.push(ChatMessage::new(role, format!("m{i}")));
        }
        v
    }

    fn contents(m: &[ChatMessage]) -> Vec<&str> {
        m.iter().map(|m| m.content.as_str()).collect()
    }

    #[test]
    fn layout_keeps_system_head_and_tail() {
        let l = Layout::new(conv(7), 1);
        assert_eq!(l.max_tail(true), 6);
        let (kept, dropped) = l.select(true, 2);
        assert_eq!(contents(&kept), ["sys", "m0", "m5", "m6"]);
        assert_eq!(dropped, 4);
        let (kept, dropped) = l.select(false, 1);
        assert_eq!(contents(&kept), ["sys", "m6"]);
        assert_eq!(dropped, 6);
        let (kept, dropped) = l.select(true, 99);
        assert_eq!(kept.len(), 8);
        assert_eq!(dropped, 0);
    }

    #[test]
    fn the_head_never_swallows_the_last_message() {
        let l = Layout::new(conv(1), 3);
        let (kept, _) = l.select(true, 1);
        assert_eq!(contents(&kept), ["sys", "m0"]);
    }

    #[test]
    fn an_orphaned_tool_result_is_dropped_with_its_call() {
        let mut m = conv(2);
        m.push(ChatMessage::new(Role::Tool, "result"));
        m.push(ChatMessage::new(Role::User, "next"));
        let l = Layout::new(m, 0);
        let (kept, dropped) = l.select(false, 2);
        assert_eq!(contents(&kept), ["sys", "next"]);
        assert_eq!(dropped, 3);
    }

    fn search(max: usize, fits: impl Fn(usize) -> bool) -> (Option<usize>, usize) {
        let mut s = TailSearch::new(max);
        let mut steps = 0;
        while let Some(t) = s.next_tail() {
            steps += 1;
            s.report(fits(t));
        }
        (s.best(), steps)
    }

    #[test]
    fn tail_search_finds_the_largest_fitting_tail() {
        for max in 1..40 {
            for limit in 0..=max {
                let (best, steps) = search(max, |t| t <= limit);
                assert_eq!(
                    best,
                    (limit > 0).then_some(limit),
                    "max {max} limit {limit}"
                );
                assert!(steps <= 2 + (max as f64).log2().ceil() as usize, "{steps}");
            }
        }
        // Whole conversation fits: one count.
        assert_eq!(search(30, |_| true), (Some(30), 1));
    }

    #[test]
    fn the_byte_bound_is_above_the_content() {
        let m = conv(3);
        assert!(token_upper_bound(&m, 0) >= 3 + 3 * 2 + 128);
        assert!(token_upper_bound(&m, 1000) > token_upper_bound(&m, 0) + 999);
    }
}
