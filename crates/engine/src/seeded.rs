//! Reproducible sampling for requests that carry a `seed`.
//!
//! mistral.rs samples every sequence from one engine-wide RNG, so two requests with the same seed
//! would see different draws depending on what else is running. For seeded requests Tidepool
//! therefore samples itself, inside a logits processor: temperature, top-k and top-p are applied
//! here, the token is drawn with an RNG derived only from (seed, position), and every other token
//! is masked to -inf so the engine's own (greedy) sampler can only pick that one. Penalties are
//! still applied by the engine before this runs, and grammar masks after it: if the grammar
//! rejects the draw, the engine calls this again on the masked logits and the same (seed,
//! position) draw then lands on an allowed token, so the result stays deterministic.

use candle_core::{Result, Tensor};
use rand::{Rng, SeedableRng};

/// The sampling a seeded request asked for.
#[derive(Debug, Clone, Copy)]
pub struct SeededSampler {
    pub seed: u64,
    pub temperature: f32,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
}

impl SeededSampler {
    /// Picks a token index from raw logits. Pure: same inputs, same output.
    pub fn pick(&self, logits: &[f32], position: usize) -> usize {
        let t = self.temperature.max(1e-4);
        let mut cand: Vec<(usize, f32)> = logits
            .iter()
            .copied()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .collect();
        if cand.is_empty() {
            return 0;
        }
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if let Some(k) = self.top_k.filter(|&k| k > 0) {
            cand.truncate(k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f64> = cand
            .iter()
            .map(|(_, l)| (((l - max) / t) as f64).exp())
            .collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if let Some(p) = self.top_p.filter(|&p| p > 0.0 && p < 1.0) {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, q) in probs.iter().enumerate() {
                acc += q;
                if acc >= p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let s: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|q| *q /= s);
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(
            self.seed ^ (position as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let u: f64 = rng.random();
        let mut acc = 0.0;
        for (i, q) in probs.iter().enumerate() {
            acc += q;
            if u < acc {
                return cand[i].0;
            }
        }
        cand[probs.len() - 1].0
    }
}

impl mistralrs::CustomLogitsProcessor for SeededSampler {
    fn apply(&self, logits: &Tensor, context: &[u32]) -> Result<Tensor> {
        let values: Vec<f32> = logits.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        let chosen = self.pick(&values, context.len());
        let mut masked = vec![f32::NEG_INFINITY; values.len()];
        masked[chosen] = 0.0;
        Tensor::from_vec(masked, values.len(), logits.device())?.to_dtype(logits.dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(seed: u64) -> SeededSampler {
        SeededSampler {
            seed,
            temperature: 1.0,
            top_k: None,
            top_p: None,
        }
    }

    #[test]
    fn same_seed_same_draws_different_seed_differs() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let a: Vec<usize> = (0..40).map(|p| sampler(1).pick(&logits, p)).collect();
        let b: Vec<usize> = (0..40).map(|p| sampler(1).pick(&logits, p)).collect();
        let c: Vec<usize> = (0..40).map(|p| sampler(2).pick(&logits, p)).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn top_k_one_is_greedy_and_masked_tokens_are_never_drawn() {
        let logits = vec![0.1, 3.0, f32::NEG_INFINITY, 2.9];
        let s = SeededSampler {
            top_k: Some(1),
            ..sampler(9)
        };
        for p in 0..20 {
            assert_eq!(s.pick(&logits, p), 1);
            assert_ne!(sampler(p as u64).pick(&logits, p), 2);
        }
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // One dominant token: top_p 0.5 must always pick it.
        let logits = vec![10.0, 0.0, 0.0, 0.0];
        let s = SeededSampler {
            top_p: Some(0.5),
            ..sampler(3)
        };
        assert!((0..50).all(|p| s.pick(&logits, p) == 0));
    }
}
