//! The memory ledger: what each worker reserves before it loads, and whether another one fits.
//!
//! A worker's reservation is its resident weights (the GGUF's tensor bytes plus the token
//! embedding mistral.rs dequantizes to a dense table), the KV cache for its slots (KV bytes per
//! token from the model's shapes × the context budget per slot × slots) and a measured overhead.
//! Workers whose engine shares one copy of the weights (llama.cpp) carry the same
//! [`Reservation::shared_weights`] key, and the ledger counts those weights once while any of them
//! holds it: the first worker of a model reserves weights and its own KV, the next ones only their
//! KV and overhead, and the last one to stop gives the weights back.
//! The budget is the smaller of a configured cap and a fraction of the memory available when it is
//! computed. Pure bookkeeping: the readings come from the caller.

use std::collections::BTreeMap;

use tidepool_engine::choice::EngineKind;
use tidepool_models::gguf_info::GgufInfo;

use crate::memory::human_bytes;

/// Bytes one worker holds while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reservation {
    pub weights: u64,
    pub kv_cache: u64,
    pub overhead: u64,
    /// Workers with the same key share one copy of `weights` (see [`weights_key`]); `None`: this
    /// worker holds its own.
    pub shared_weights: Option<u64>,
}

impl Reservation {
    /// Everything this worker needs when it is its model's only worker.
    pub fn total(&self) -> u64 {
        self.weights + self.kv_cache + self.overhead
    }

    /// What it needs on top of weights another worker already holds.
    pub fn own(&self) -> u64 {
        self.kv_cache + self.overhead
    }
}

/// The key under which workers of one model file share its weights.
pub fn weights_key(path: &std::path::Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    tidepool_engine::model_key(path).hash(&mut h);
    h.finish()
}

/// What sizes a worker's reservation.
#[derive(Debug, Clone, Copy)]
pub struct WorkerShape {
    /// Concurrent sequences (its admission limit).
    pub slots: u64,
    /// Tokens of context each slot may hold (prompt + generation).
    pub context_tokens: u64,
    /// Bytes per KV element (2 for f16, 4 for f32).
    pub kv_elem_bytes: u64,
    /// Bytes per activation element, for the dense embedding table (4 on CPU, 2 on GPU).
    pub activation_bytes: u64,
    /// Runtime buffers beyond weights and KV, measured per model (docs/elasticity.md, "Workers,
    /// slots and the memory budget").
    pub overhead: u64,
}

/// The reservation of one worker of `model` with `shape` on `engine`. mistral.rs holds the token
/// embedding table dense (f32 on the CPU) beside the weights as stored; llama.cpp keeps it
/// quantized and mmaps the weights, which its workers of one model share, with an f16 KV cache.
pub fn reservation(model: &GgufInfo, shape: &WorkerShape, engine: EngineKind) -> Reservation {
    let (weights, kv_elem_bytes) = match engine {
        EngineKind::MistralRs => (
            model.resident_weight_bytes(shape.activation_bytes),
            shape.kv_elem_bytes,
        ),
        EngineKind::LlamaCpp => (model.tensor_bytes, 2),
    };
    Reservation {
        weights,
        kv_cache: model.shape.kv_bytes_per_token(kv_elem_bytes)
            * shape.context_tokens
            * shape.slots,
        overhead: shape.overhead,
        shared_weights: match engine {
            EngineKind::LlamaCpp => model.files.first().map(|f| weights_key(f)),
            EngineKind::MistralRs => None,
        },
    }
}

/// The budget: `min(cap, fraction × available)`, where `available` is memory free now plus what
/// the ledger already holds (reserved memory is in use by workers, not lost).
pub fn budget(cap: Option<u64>, fraction: f64, available_now: u64, reserved: u64) -> u64 {
    let by_fraction = ((available_now + reserved) as f64 * fraction.clamp(0.0, 1.0)) as u64;
    cap.map_or(by_fraction, |c| c.min(by_fraction))
}

/// Why a reservation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a worker needs {} but only {} of the {} budget is free", human_bytes(*.need), human_bytes(*.free), human_bytes(*.budget))]
pub struct DoesNotFit {
    pub need: u64,
    pub free: u64,
    pub budget: u64,
}

/// Reservations by worker id against a budget.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    budget: u64,
    held: BTreeMap<u64, Reservation>,
}

impl Ledger {
    pub fn new(budget: u64) -> Ledger {
        Ledger {
            budget,
            held: BTreeMap::new(),
        }
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// A new budget (readings change); existing reservations stay even if now over it.
    pub fn set_budget(&mut self, budget: u64) {
        self.budget = budget;
    }

    /// Each shared copy of weights held now, by key: (the oldest holder, which carries it in
    /// the per-worker figures; its bytes, the largest any holder reserved, should the figures of
    /// one model's workers differ).
    fn shared_copies(&self) -> BTreeMap<u64, (u64, u64)> {
        let mut copies = BTreeMap::new();
        for (&id, r) in &self.held {
            if let Some(key) = r.shared_weights {
                let copy = copies.entry(key).or_insert((id, 0));
                copy.1 = copy.1.max(r.weights);
            }
        }
        copies
    }

    /// Bytes held: every worker's own, plus each shared model's weights once.
    pub fn reserved(&self) -> u64 {
        let own_weights: u64 = self
            .held
            .values()
            .filter(|r| r.shared_weights.is_none())
            .map(|r| r.weights)
            .sum();
        let own: u64 = self.held.values().map(Reservation::own).sum();
        own + own_weights + self.shared_weights()
    }

    /// The weights held once for several workers, in all.
    pub fn shared_weights(&self) -> u64 {
        self.shared_copies().values().map(|&(_, w)| w).sum()
    }

    pub fn free(&self) -> u64 {
        self.budget.saturating_sub(self.reserved())
    }

    /// What reserving `r` now adds to the ledger: its own bytes, and its weights unless a
    /// worker already holds the copy it would share.
    pub fn need(&self, r: &Reservation) -> u64 {
        let held = r
            .shared_weights
            .is_some_and(|k| self.held.values().any(|h| h.shared_weights == Some(k)));
        if held {
            r.own()
        } else {
            r.total()
        }
    }

    /// Reserves `r` for worker `id`, or says why it does not fit.
    pub fn try_reserve(&mut self, id: u64, r: Reservation) -> Result<(), DoesNotFit> {
        let free = self.free();
        let need = self.need(&r);
        if need > free {
            return Err(DoesNotFit {
                need,
                free,
                budget: self.budget,
            });
        }
        self.held.insert(id, r);
        Ok(())
    }

    /// Gives back worker `id`'s reservation (when it has stopped); shared weights go back with
    /// the last worker that holds them.
    pub fn release(&mut self, id: u64) -> Option<Reservation> {
        self.held.remove(&id)
    }

    /// Replaces worker `id`'s own bytes with what its engine reports it allocated (the
    /// reservation was an estimate made before it loaded).
    pub fn true_up(&mut self, id: u64, kv_cache: u64, overhead: u64) {
        if let Some(r) = self.held.get_mut(&id) {
            r.kv_cache = kv_cache;
            r.overhead = overhead;
        }
    }

    pub fn get(&self, id: u64) -> Option<Reservation> {
        self.held.get(&id).copied()
    }

    /// The bytes worker `id` accounts for: its own, plus shared weights when it is the oldest
    /// worker holding them (so the workers' figures add up to [`Ledger::reserved`]).
    pub fn attributed(&self, id: u64) -> u64 {
        let Some(r) = self.held.get(&id) else {
            return 0;
        };
        let Some(key) = r.shared_weights else {
            return r.total();
        };
        match self.shared_copies().get(&key) {
            Some(&(oldest, weights)) if oldest == id => weights + r.own(),
            _ => r.own(),
        }
    }

    /// How many workers of reservation `r` the whole budget holds (for the policy's ceiling):
    /// with shared weights, one copy of them and each worker's own bytes.
    pub fn workers_that_fit(&self, r: Reservation) -> usize {
        let (fixed, each) = match r.shared_weights {
            Some(_) => (r.weights, r.own()),
            None => (0, r.total()),
        };
        if fixed > self.budget {
            return 0;
        }
        match each {
            0 => usize::MAX,
            e => ((self.budget - fixed) / e) as usize,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_models::gguf_info::ModelShape;

    fn qwen05b_q4_0() -> GgufInfo {
        GgufInfo {
            files: Vec::new(),
            name: None,
            shape: ModelShape {
                arch: "qwen2".into(),
                context_length: 32768,
                layers: 24,
                kv_heads: 2,
                head_dim: 64,
                hidden: 896,
                vocab: 151_936,
            },
            tensor_bytes: 278_200_000,
            token_embd_bytes: 76_600_000,
            tied_embeddings: true,
            tensor_types: Default::default(),
            n_tensors: 290,
            has_chat_template: true,
            eos_token_id: Some(151_645),
            special_tokens: Vec::new(),
        }
    }

    #[test]
    fn reservation_counts_weights_embedding_and_kv() {
        let shape = WorkerShape {
            slots: 4,
            context_tokens: 4096,
            kv_elem_bytes: 2,
            activation_bytes: 4,
            overhead: 100 << 20,
        };
        let r = reservation(&qwen05b_q4_0(), &shape, EngineKind::MistralRs);
        // Dense f32 embedding: 151936 × 896 × 4.
        assert_eq!(r.weights, 278_200_000 + 151_936 * 896 * 4);
        // KV: 2 × 24 layers × 2 heads × 64 dims × 2 bytes = 12 KiB per token.
        assert_eq!(r.kv_cache, 12_288 * 4096 * 4);
        assert_eq!(r.total(), r.weights + r.kv_cache + (100 << 20));
        // llama.cpp: the weights as stored, the same f16 KV.
        let l = reservation(&qwen05b_q4_0(), &shape, EngineKind::LlamaCpp);
        assert_eq!(l.weights, 278_200_000);
        assert_eq!(l.kv_cache, r.kv_cache);
    }

    #[test]
    fn ledger_refuses_what_does_not_fit_and_releases() {
        let r = Reservation {
            weights: 600,
            kv_cache: 200,
            overhead: 100,
            shared_weights: None,
        };
        let mut l = Ledger::new(2000);
        assert_eq!(l.workers_that_fit(r), 2);
        l.try_reserve(1, r).unwrap();
        l.try_reserve(2, r).unwrap();
        let e = l.try_reserve(3, r).unwrap_err();
        assert_eq!(
            e,
            DoesNotFit {
                need: 900,
                free: 200,
                budget: 2000
            }
        );
        assert!(e.to_string().contains("needs"), "{e}");
        assert_eq!(l.release(1), Some(r));
        assert_eq!(l.free(), 1100);
        l.try_reserve(3, r).unwrap();
        assert_eq!(l.reserved(), 1800);
    }

    #[test]
    fn shared_weights_count_once_and_go_back_with_their_last_worker() {
        let r = Reservation {
            weights: 600,
            kv_cache: 200,
            overhead: 100,
            shared_weights: Some(7),
        };
        let mut l = Ledger::new(2000);
        // One copy of the weights, then 300 per worker: (2000 - 600) / 300.
        assert_eq!(l.workers_that_fit(r), 4);
        assert_eq!(l.need(&r), 900);
        l.try_reserve(1, r).unwrap();
        assert_eq!(l.need(&r), 300);
        l.try_reserve(2, r).unwrap();
        l.try_reserve(3, r).unwrap();
        assert_eq!(l.reserved(), 600 + 3 * 300);
        assert_eq!(l.shared_weights(), 600);
        // The oldest holder carries the weights in the per-worker figures, which add up.
        assert_eq!((l.attributed(1), l.attributed(2)), (900, 300));
        let e = l.try_reserve(
            5,
            Reservation {
                shared_weights: Some(8),
                ..r
            },
        );
        assert_eq!(
            e.unwrap_err().need,
            900,
            "another model's weights are its own"
        );
        l.try_reserve(4, r).unwrap();
        assert!(l.try_reserve(5, r).is_err(), "the budget is full");
        // The weights stay while any holder does; the first one's leaving moves them on.
        l.release(1);
        assert_eq!(l.reserved(), 600 + 3 * 300);
        assert_eq!(l.attributed(2), 900);
        l.release(2);
        l.release(3);
        l.release(4);
        assert_eq!((l.reserved(), l.shared_weights()), (0, 0));
        // Workers that hold their own weights count them each.
        let own = Reservation {
            shared_weights: None,
            ..r
        };
        l.try_reserve(6, own).unwrap();
        l.try_reserve(7, own).unwrap();
        assert_eq!(l.reserved(), 1800);
        assert_eq!(l.workers_that_fit(own), 2);
    }

    #[test]
    fn budget_is_the_smaller_of_cap_and_fraction() {
        assert_eq!(budget(None, 0.5, 1000, 0), 500);
        // What the ledger holds counts as available to it.
        assert_eq!(budget(None, 0.5, 600, 400), 500);
        assert_eq!(budget(Some(300), 0.5, 1000, 0), 300);
        assert_eq!(budget(Some(900), 2.0, 1000, 0), 900);
    }
}
