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
//!
//! The tap is also how a generation is wound down when its client is gone. mistral.rs 0.8.1 has
//! no per-request cancel, and dropping a request's response channel is not safe: when a batch
//! step fails it sends the error to every sequence of the batch with `.unwrap()`
//! (`utils/mod.rs:183`), so one dropped receiver kills the engine thread. Tidepool therefore keeps
//! every receiver until mistral.rs has sent its last response, and to end early it sets
//! [`TapCounts::wind_down`]: from the next step the end-of-sequence token gets a bias so large
//! that it is sampled as soon as the grammar (if any) allows it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::{Result, Tensor};

/// Token counts observed by a [`TokenTap`].
#[derive(Debug, Default)]
pub struct TapCounts {
    /// Context length at the first sampling step, i.e. the prompt; 0 until then.
    first: AtomicUsize,
    /// Longest context seen at a sampling step.
    last: AtomicUsize,
    /// Set when the client is gone: end the sequence at the next chance.
    winding_down: AtomicBool,
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

    /// Ends the generation as soon as possible (its client is gone).
    pub fn wind_down(&self) {
        self.winding_down.store(true, Ordering::Release);
    }

    pub fn is_winding_down(&self) -> bool {
        self.winding_down.load(Ordering::Acquire)
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

/// How much the end-of-sequence logit is raised while winding down: far above any real logit,
/// while a grammar's -inf mask still wins over it.
const WIND_DOWN_BIAS: f32 = 1e4;

/// A logits processor that records context lengths into shared [`TapCounts`] and, once told to
/// wind down, makes the end-of-sequence token the choice. It runs first in the chain, so the
/// seeded sampler after it draws the end token too.
#[derive(Debug, Clone, Default)]
pub struct TokenTap {
    pub counts: Arc<TapCounts>,
    /// The model's end-of-sequence token.
    pub eos: Option<u32>,
}

impl mistralrs::CustomLogitsProcessor for TokenTap {
    fn apply(&self, logits: &Tensor, context: &[u32]) -> Result<Tensor> {
        self.counts.observe(context.len());
        let Some(eos) = self.eos.filter(|_| self.counts.is_winding_down()) else {
            return Ok(logits.clone());
        };
        let mut values: Vec<f32> = logits.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        if let Some(l) = values.get_mut(eos as usize) {
            *l += WIND_DOWN_BIAS;
        }
        Tensor::from_vec(values, logits.dims1()?, logits.device())?.to_dtype(logits.dtype())
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

    #[test]
    fn winding_down_makes_the_end_token_the_argmax_and_a_mask_still_wins() {
        use mistralrs::CustomLogitsProcessor;
        let tap = TokenTap {
            eos: Some(2),
            ..TokenTap::default()
        };
        let logits = Tensor::new(&[5.0f32, 1.0, 0.0], &candle_core::Device::Cpu).unwrap();
        let argmax = |t: Tensor| {
            let v: Vec<f32> = t.to_vec1().unwrap();
            v.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0
        };
        assert_eq!(argmax(tap.apply(&logits, &[1]).unwrap()), 0);
        tap.counts.wind_down();
        assert_eq!(argmax(tap.apply(&logits, &[1]).unwrap()), 2);
        let masked =
            Tensor::new(&[5.0f32, 1.0, f32::NEG_INFINITY], &candle_core::Device::Cpu).unwrap();
        assert_eq!(argmax(tap.apply(&masked, &[1]).unwrap()), 0);
    }
}
