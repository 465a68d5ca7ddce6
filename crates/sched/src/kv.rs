//! KV tokens reserved: how much context each new worker's slots get, from what requests need.
//!
//! A worker's KV cache is most of what it reserves beside the weights, and llama.cpp allocates it
//! whole when the worker is made (`context × slots` tokens). Most requests need a small part of
//! the configured context (`[pool] context_tokens`): a classification or a short answer is a few
//! hundred tokens. So the context a worker gets is an elastic quantity too: the pool remembers
//! what the last [`RECENT`] requests needed (the prompt's upper bound plus `max_tokens`), and a
//! new worker gets the next power of two above the largest of them, within
//! `[min_context_tokens, context_tokens]`. A request is only ever given a slot on a worker whose
//! context holds it; one that needs more than every worker holds gets a worker of its size in
//! place of the smallest one ([`crate::pool::Pool`] does that). With `min = max` every worker
//! has the configured context, as before.
//!
//! Pure logic: the pool feeds it needs and asks for sizes.

use std::collections::VecDeque;

/// Requests whose needs size the next worker.
pub const RECENT: usize = 64;

/// The context per slot a worker gets before any request was seen: what an answer of the
/// default length (1024 tokens) after a short conversation needs.
pub const INITIAL_CONTEXT: u32 = 2048;

/// The context sizes workers get.
#[derive(Debug, Clone)]
pub struct ContextSizing {
    min: u32,
    max: u32,
    recent: VecDeque<u32>,
}

impl ContextSizing {
    /// Workers between `min` and `max` tokens of context per slot (`min` is raised to at least
    /// 16 and lowered to `max`).
    pub fn new(min: u32, max: u32) -> ContextSizing {
        let max = max.max(16);
        ContextSizing {
            min: min.clamp(16, max),
            max,
            recent: VecDeque::with_capacity(RECENT),
        }
    }

    /// Every worker gets the same context: `max`.
    pub fn fixed(max: u32) -> ContextSizing {
        ContextSizing::new(max, max)
    }

    /// The most context a worker gets per slot (what the gateway holds requests to).
    pub fn max(&self) -> u32 {
        self.max
    }

    pub fn min(&self) -> u32 {
        self.min
    }

    /// Whether every worker gets the same context.
    pub fn is_fixed(&self) -> bool {
        self.min >= self.max
    }

    /// A request's need, as the pool routes it: never above the largest context (the gateway
    /// already refused what does not fit that).
    pub fn clamp_need(&self, need: u32) -> u32 {
        need.min(self.max)
    }

    /// Remembers what one arriving request needs.
    pub fn observe(&mut self, need: u32) {
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(self.clamp_need(need));
    }

    /// The context per slot for a worker that must hold `need` tokens.
    pub fn fitting(&self, need: u32) -> u32 {
        if self.is_fixed() {
            return self.max;
        }
        need.max(1)
            .checked_next_power_of_two()
            .unwrap_or(u32::MAX)
            .clamp(self.min, self.max)
    }

    /// The context per slot for the next worker: enough for every recent request.
    pub fn next(&self) -> u32 {
        match self.recent.iter().max() {
            Some(&largest) => self.fitting(largest),
            None => self.fitting(INITIAL_CONTEXT),
        }
    }

    /// Sets the range; what was seen is kept.
    pub fn set_range(&mut self, min: u32, max: u32) {
        let recent = std::mem::take(&mut self.recent);
        *self = ContextSizing::new(min, max);
        for n in recent {
            self.observe(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_worker_holds_every_recent_request_rounded_up_to_a_power_of_two() {
        let mut k = ContextSizing::new(512, 4096);
        assert_eq!(k.next(), INITIAL_CONTEXT, "nothing seen yet");
        for need in [60, 90, 75] {
            k.observe(need);
        }
        assert_eq!(k.next(), 512, "never below the minimum");
        k.observe(700);
        assert_eq!(k.next(), 1024);
        k.observe(1025);
        assert_eq!(k.next(), 2048);
        k.observe(100_000);
        assert_eq!(k.next(), 4096, "never above the configured context");
        assert_eq!(k.clamp_need(100_000), 4096);
    }

    #[test]
    fn a_long_request_sizes_workers_until_it_leaves_the_window() {
        let mut k = ContextSizing::new(256, 4096);
        k.observe(3000);
        for _ in 0..RECENT - 1 {
            k.observe(40);
        }
        assert_eq!(k.next(), 4096);
        k.observe(40);
        assert_eq!(k.next(), 256);
    }

    #[test]
    fn fixed_sizing_always_gives_the_configured_context() {
        let mut k = ContextSizing::fixed(4096);
        assert!(k.is_fixed());
        k.observe(10);
        assert_eq!((k.next(), k.fitting(10)), (4096, 4096));
        // A minimum above the maximum is the maximum.
        let k = ContextSizing::new(8192, 1024);
        assert_eq!((k.min(), k.max(), k.next()), (1024, 1024, 1024));
        let mut k = ContextSizing::fixed(4096);
        k.observe(10);
        k.set_range(512, 4096);
        assert_eq!(k.next(), 512, "what was seen is kept");
    }

    #[test]
    fn fitting_rounds_up_and_clamps() {
        let k = ContextSizing::new(512, 4096);
        assert_eq!(k.fitting(0), 512);
        assert_eq!(k.fitting(513), 1024);
        assert_eq!(k.fitting(1024), 1024);
        assert_eq!(k.fitting(u32::MAX), 4096);
    }
}
