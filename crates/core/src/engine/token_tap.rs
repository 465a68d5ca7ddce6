//! Counts the tokens of one generation from inside the engine, so a generation whose last chunk
//! mistral.rs never sends can still be finished with an honest `usage`.
//!
//! mistral.rs (0.8) holds back a streamed token that ends in an incomplete UTF-8 sequence until the
//! next token completes it. When that token is also the last one (`max_tokens` reached in the middle
//! of a multi-byte character), the final chunk, the one carrying `finish_reason` and `usage`, is
//! never sent: the response channel just closes. The tap sits in the sequence's logits-processor
//! chain, where every sampling step passes with the full token context, and remembers the prompt
//! length (the context at the first step) and the longest context seen; the caller then knows how
//! many tokens were generated.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::{Result, Tensor};

/// Token counts observed by a [`TokenTap`].
#[derive(Debug, Default)]
pub struct TapCounts {
    /// Context length at the first sampling step, i.e. the prompt; 0 until then.
    first: AtomicUsize,
    /// Longest context seen at a sampling step.
    last: AtomicUsize,
}

impl TapCounts {
    /// Records one sampling step over a context of `len` tokens.
    pub fn observe(&self, len: usize) {
        let _ = self
            .first
            .compare_exchange(0, len, Ordering::Relaxed, Ordering::Relaxed);
        self.last.fetch_max(len, Ordering::Relaxed);
    }

    /// Prompt tokens, if a step has run.
    pub fn prompt_tokens(&self) -> Option<u32> {
        match self.first.load(Ordering::Relaxed) {
            0 => None,
            n => Some(n as u32),
        }
    }

    /// Tokens sampled so far: every step samples one token, and the context at a step holds the
    /// prompt plus the tokens of earlier steps.
    pub fn generated_tokens(&self) -> u32 {
        let first = self.first.load(Ordering::Relaxed);
        if first == 0 {
            return 0;
        }
        (self.last.load(Ordering::Relaxed) - first + 1) as u32
    }
}

/// A pass-through logits processor that records context lengths into shared [`TapCounts`].
#[derive(Debug, Clone, Default)]
pub struct TokenTap {
    pub counts: Arc<TapCounts>,
}

impl mistralrs::CustomLogitsProcessor for TokenTap {
    fn apply(&self, logits: &Tensor, context: &[u32]) -> Result<Tensor> {
        self.counts.observe(context.len());
        Ok(logits.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_prompt_and_generated_tokens() {
        let c = TapCounts::default();
        assert_eq!(c.prompt_tokens(), None);
        assert_eq!(c.generated_tokens(), 0);
        // Prompt of 12 tokens; steps see 12, 13, 14 tokens of context: three tokens sampled.
        for len in [12, 13, 14] {
            c.observe(len);
        }
        assert_eq!(c.prompt_tokens(), Some(12));
        assert_eq!(c.generated_tokens(), 3);
        // A grammar resample repeats a step with the same context: no extra token.
        c.observe(14);
        assert_eq!(c.generated_tokens(), 3);
    }
}
