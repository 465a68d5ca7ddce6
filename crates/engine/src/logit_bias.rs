//! OpenAI's `logit_bias` for mistral.rs: mistral.rs 0.8.1 carries `SamplingParams::logits_bias`
//! but never applies it, so Tidepool adds the biases itself in a logits processor that runs
//! before sampling (and before the seeded sampler, so seeded requests see them too).
//!
//! A bias of -100 bans a token outright (its logit becomes -inf), as OpenAI documents; other
//! values are added to the logit. [`check_logit_bias`], the validation every engine runs before a
//! generation, lives here too.

use std::collections::BTreeMap;

#[cfg(any(feature = "mistralrs", feature = "llamacpp"))]
use crate::{request::Sampling, EngineError};

/// Refuses `logit_bias` entries for tokens the vocabulary does not have (every engine calls this
/// before it starts a generation).
#[cfg(any(feature = "mistralrs", feature = "llamacpp"))]
pub(crate) fn check_logit_bias(s: &Sampling, vocab: u32) -> std::result::Result<(), EngineError> {
    match s.logit_bias.keys().find(|&&id| id >= vocab) {
        Some(id) => Err(EngineError::Invalid(format!(
            "logit_bias names token {id}, but the vocabulary has {vocab} tokens (ids 0-{})",
            vocab.saturating_sub(1)
        ))),
        None => Ok(()),
    }
}

/// The biases of one request, by token id.
#[derive(Debug, Clone)]
pub struct LogitBias(pub BTreeMap<u32, f32>);

impl LogitBias {
    /// Applies the biases to `logits` in place; ids beyond the vocabulary are ignored (the API
    /// layer has already refused them).
    pub fn apply_to(&self, logits: &mut [f32]) {
        for (&id, &bias) in &self.0 {
            if let Some(l) = logits.get_mut(id as usize) {
                *l = if bias <= -100.0 {
                    f32::NEG_INFINITY
                } else {
                    *l + bias
                };
            }
        }
    }
}

#[cfg(feature = "mistralrs")]
impl mistralrs::CustomLogitsProcessor for LogitBias {
    fn apply(
        &self,
        logits: &candle_core::Tensor,
        _context: &[u32],
    ) -> candle_core::Result<candle_core::Tensor> {
        use candle_core::Tensor;
        let mut values: Vec<f32> = logits.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        self.apply_to(&mut values);
        Tensor::from_vec(values, logits.dims1()?, logits.device())?.to_dtype(logits.dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minus_hundred_bans_other_values_add_and_unknown_ids_are_ignored() {
        let bias = LogitBias(BTreeMap::from([(0, -100.0), (1, 2.5), (99, 5.0)]));
        let mut logits = vec![10.0, 1.0, 3.0];
        bias.apply_to(&mut logits);
        assert_eq!(logits, vec![f32::NEG_INFINITY, 3.5, 3.0]);
    }

    #[test]
    #[cfg(feature = "mistralrs")]
    fn the_processor_changes_the_argmax() {
        use candle_core::Tensor;
        use mistralrs::CustomLogitsProcessor;
        let logits = Tensor::new(&[5.0f32, 1.0, 0.0], &candle_core::Device::Cpu).unwrap();
        let bias = LogitBias(BTreeMap::from([(0, -100.0)]));
        let out: Vec<f32> = bias.apply(&logits, &[]).unwrap().to_vec1().unwrap();
        let argmax = out
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0;
        assert_eq!(argmax, 1);
    }
}
