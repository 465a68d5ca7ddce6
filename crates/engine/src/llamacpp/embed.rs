//! Embeddings on llama.cpp, on the weights the worker's generations use.
//!
//! The worker's own context is built for generation (no embedding output), and llama-cpp-2
//! cannot switch that at run time, so a request gets a context of its own on the same resident
//! weights with embeddings on, used on a blocking thread and dropped when the request is done.
//! The request holds one of the worker's slots meanwhile (the gateway leases it like a
//! generation's).
//!
//! Inputs are packed into decodes of up to [`MAX_SEQUENCES`] sequences and [`CHUNK_TOKENS`]
//! tokens (a causal model's long input continues over several decodes on its KV cache), every
//! token's vector is read back, and each input's vectors are pooled here (mean, first or last).
//! So the context's transient memory is bounded by the chunk, not by the input's length.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};

use llama_cpp_2::context::params::{LlamaContextParams, LlamaPoolingType};
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;

use super::resident::Resident;
use crate::embed::{EmbedInput, EmbedRequest, Embeddings, Pooling};
use crate::EngineError;

/// Sequences decoded together in one batch.
pub const MAX_SEQUENCES: usize = 16;

/// Tokens one request may embed, every input together (OpenAI's own limit).
pub const MAX_REQUEST_TOKENS: usize = 300_000;

/// The pooling of a model: what its GGUF declares (`{arch}.pooling_type`), else the mean over
/// tokens, which suits a chat model's hidden states best of the three.
pub(super) fn model_pooling(resident: &Resident) -> Pooling {
    declared(resident, "pooling_type")
        .and_then(|v| v.trim().parse::<i64>().ok())
        .and_then(Pooling::from_gguf)
        .unwrap_or(Pooling::Mean)
}

/// The token ids of each input, truncated to `limit` tokens or refused past it.
fn tokens_of(
    resident: &Resident,
    request: &EmbedRequest,
    limit: usize,
) -> Result<Vec<Vec<LlamaToken>>, EngineError> {
    let vocab = resident.model.vocab();
    let n_vocab = resident.model.n_vocab().max(0) as u32;
    let mut out = Vec::with_capacity(request.inputs.len());
    for (i, input) in request.inputs.iter().enumerate() {
        let mut tokens = match input {
            EmbedInput::Text(text) => vocab.tokenize(text.as_bytes(), true, false),
            EmbedInput::Tokens(ids) => {
                if let Some(bad) = ids.iter().find(|&&t| t >= n_vocab) {
                    return Err(EngineError::Invalid(format!(
                        "input {i} has token id {bad}, past this model's vocabulary of {n_vocab}"
                    )));
                }
                ids.iter().map(|&t| LlamaToken(t as i32)).collect()
            }
        };
        if tokens.is_empty() {
            return Err(EngineError::Invalid(format!("input {i} is empty")));
        }
        if tokens.len() > limit {
            if !request.truncate {
                return Err(EngineError::Invalid(format!(
                    "input {i} is {} tokens, but this model's context holds {limit}",
                    tokens.len()
                )));
            }
            tokens.truncate(limit);
        }
        out.push(tokens);
    }
    Ok(out)
}

/// One piece of one input in a decode: tokens `range` of input `input`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Piece {
    pub input: usize,
    pub range: std::ops::Range<usize>,
}

/// Cuts the inputs, in order, into decodes of at most `chunk` tokens. On a causal model
/// (`split`) an input longer than what is left of a decode continues in the next one (its KV
/// cache carries its earlier tokens); otherwise an input is never split (a non-causal model must
/// see it whole) and starts a new decode when it does not fit. At most [`MAX_SEQUENCES`] inputs
/// share a decode.
pub(super) fn decodes(lengths: &[usize], chunk: usize, split: bool) -> Vec<Vec<Piece>> {
    let chunk = chunk.max(1);
    let mut out: Vec<Vec<Piece>> = Vec::new();
    let mut current: Vec<Piece> = Vec::new();
    let mut used = 0;
    for (input, &len) in lengths.iter().enumerate() {
        let mut start = 0;
        while start < len {
            let room = chunk - used;
            let full = current.len() == MAX_SEQUENCES || (!split && len > room && used > 0);
            if room == 0 || full {
                out.push(std::mem::take(&mut current));
                used = 0;
                continue;
            }
            let take = if split { room.min(len - start) } else { len };
            current.push(Piece {
                input,
                range: start..start + take,
            });
            used += take;
            start += take;
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Whether the model attends causally (a BERT-style encoder declares
/// `{arch}.attention.causal = false`).
fn is_causal(resident: &Resident) -> bool {
    declared(resident, "attention.causal").is_none_or(|v| v.trim() != "false")
}

/// The model's own metadata `{arch}.{key}`, as llama.cpp reads it.
fn declared(resident: &Resident, key: &str) -> Option<String> {
    let arch = &resident.gguf.shape.arch;
    resident.model.meta_val_str(&format!("{arch}.{key}")).ok()
}

/// One input's token vectors as they come, pooled at the end.
#[derive(Default)]
struct Pool {
    sum: Vec<f64>,
    first: Vec<f32>,
    last: Vec<f32>,
    n: usize,
}

impl Pool {
    fn add(&mut self, v: &[f32]) {
        if self.n == 0 {
            self.sum = vec![0.0; v.len()];
            self.first = v.to_vec();
        }
        for (s, x) in self.sum.iter_mut().zip(v) {
            *s += f64::from(*x);
        }
        self.last = v.to_vec();
        self.n += 1;
    }

    fn finish(self, pooling: Pooling) -> Vec<f32> {
        match pooling {
            Pooling::Mean => self
                .sum
                .iter()
                .map(|s| (s / self.n.max(1) as f64) as f32)
                .collect(),
            Pooling::Cls => self.first,
            Pooling::Last => self.last,
        }
    }
}

/// Tokens decoded at once on a causal model. With embeddings on, this llama.cpp still computes
/// the output head for every token and keeps a vocabulary-wide row of logits for each
/// (`has_logits` is always true, `src/llama-context.cpp`), so a decode of `n` tokens holds
/// `n` x vocabulary x 4 bytes: 78 MB on Qwen2.5's 151 936 tokens at 128, whatever the input's
/// length, where one decode of a slot's 2048 tokens held 1.2 GB.
pub const CHUNK_TOKENS: usize = 128;

/// Embeds every input of `request` with `threads` threads, each input at most `limit` tokens.
/// Stops at the next decode once `cancelled` is set (the client went away).
///
/// The token vectors come out unpooled and are pooled here, so that a long input can be decoded
/// in [`CHUNK_TOKENS`] pieces (llama.cpp pools within one decode only); a non-causal model's
/// input is decoded whole.
pub(super) fn embed_blocking(
    resident: &Resident,
    backend: &LlamaBackend,
    threads: i32,
    limit: usize,
    pooling: Pooling,
    request: &EmbedRequest,
    cancelled: &AtomicBool,
) -> Result<Embeddings, EngineError> {
    let inputs = tokens_of(resident, request, limit)?;
    let lengths: Vec<usize> = inputs.iter().map(Vec::len).collect();
    let total: usize = lengths.iter().sum();
    if total > MAX_REQUEST_TOKENS {
        return Err(EngineError::Invalid(format!(
            "the inputs are {total} tokens together; at most {MAX_REQUEST_TOKENS} are embedded in one request"
        )));
    }
    let causal = is_causal(resident);
    let longest = lengths.iter().copied().max().unwrap_or(1).max(1);
    let chunk = if causal {
        CHUNK_TOKENS.min(total.max(1))
    } else {
        longest
    };
    let plan = decodes(&lengths, chunk, causal);
    // The sequences open at once: a decode's pieces (an input carried over from the last decode
    // is this one's first piece). llama.cpp aborts the process unless the batch holds at least
    // as many outputs as sequences, and rounds a reserved micro-batch up to a multiple of them
    // (but not the outputs beside it), so the batch is such a multiple.
    let seqs = plan.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let batch_tokens = chunk.div_ceil(seqs) * seqs;
    // The cells hold every input open at once: at most one carried over from the last decode
    // (all its tokens) beside this decode's.
    let n_ctx = if causal {
        longest + batch_tokens
    } else {
        batch_tokens
    };
    let params = LlamaContextParams::default()
        .with_embeddings(true)
        .with_pooling_type(LlamaPoolingType::None)
        .with_kv_unified(true)
        .with_n_ctx(NonZeroU32::new(n_ctx as u32))
        .with_n_seq_max(seqs as u32)
        .with_n_batch(batch_tokens as u32)
        .with_n_ubatch(batch_tokens as u32)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let started = std::time::Instant::now();
    let mut ctx = resident
        .model
        .new_context(backend, params)
        .map_err(|e| EngineError::Internal(format!("llama.cpp embedding context: {e}")))?;
    let context_s = started.elapsed().as_secs_f64();
    let internal = |what: &str| EngineError::Internal(format!("llama.cpp embedding: {what}"));

    let mut pools: Vec<Pool> = (0..inputs.len()).map(|_| Pool::default()).collect();
    // Sequence ids of the inputs open in the cells, and the ids free.
    let mut seq_of: std::collections::HashMap<usize, i32> = Default::default();
    let mut free: Vec<i32> = (0..seqs as i32).rev().collect();
    let mut vectors = Vec::with_capacity(inputs.len());
    let mut batch = LlamaBatch::new(batch_tokens, seqs as i32);
    for pieces in plan {
        if cancelled.load(Ordering::Relaxed) {
            return Err(EngineError::Internal("the embedding was cancelled".into()));
        }
        batch.clear();
        for p in &pieces {
            let seq = match seq_of.get(&p.input) {
                Some(&s) => s,
                None => {
                    let s = free.pop().ok_or_else(|| internal("out of sequence ids"))?;
                    seq_of.insert(p.input, s);
                    s
                }
            };
            for pos in p.range.clone() {
                batch
                    .add(inputs[p.input][pos], pos as i32, &[seq], true)
                    .map_err(|e| internal(&e.to_string()))?;
            }
        }
        ctx.decode(&mut batch)
            .map_err(|e| internal(&format!("decode: {e}")))?;
        let mut row = 0i32;
        for p in &pieces {
            for _ in p.range.clone() {
                let v = ctx
                    .embeddings_ith(row)
                    .map_err(|_| internal("no vector for a token"))?;
                pools[p.input].add(v);
                row += 1;
            }
            if p.range.end == lengths[p.input] {
                // Done: its cells and its id go back.
                if let Some(seq) = seq_of.remove(&p.input) {
                    ctx.clear_kv_cache_seq(Some(seq as u32), None, None)
                        .map_err(|e| internal(&e.to_string()))?;
                    free.push(seq);
                }
            }
        }
    }
    for pool in pools {
        vectors.push(pool.finish(pooling));
    }
    tracing::debug!(
        inputs = inputs.len(),
        tokens = total,
        context_s,
        total_s = started.elapsed().as_secs_f64(),
        "embedded"
    );
    Ok(Embeddings {
        vectors,
        prompt_tokens: total as u64,
        pooling,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(input: usize, range: std::ops::Range<usize>) -> Piece {
        Piece { input, range }
    }

    #[test]
    fn a_causal_models_inputs_are_cut_into_decodes_of_at_most_the_chunk() {
        assert_eq!(
            decodes(&[3, 3, 3], 6, true),
            vec![vec![piece(0, 0..3), piece(1, 0..3)], vec![piece(2, 0..3)]]
        );
        // A long input continues in the next decode, beside the inputs after it.
        assert_eq!(
            decodes(&[2, 10, 2], 6, true),
            vec![
                vec![piece(0, 0..2), piece(1, 0..4)],
                vec![piece(1, 4..10)],
                vec![piece(2, 0..2)]
            ]
        );
        let many = vec![1; MAX_SEQUENCES + 1];
        let d = decodes(&many, 1000, true);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].len(), MAX_SEQUENCES);
        assert!(decodes(&[], 6, true).is_empty());
    }

    #[test]
    fn a_non_causal_models_inputs_are_never_split() {
        assert_eq!(
            decodes(&[2, 5, 2], 5, false),
            vec![
                vec![piece(0, 0..2)],
                vec![piece(1, 0..5)],
                vec![piece(2, 0..2)]
            ]
        );
        assert_eq!(
            decodes(&[2, 3, 4], 5, false),
            vec![vec![piece(0, 0..2), piece(1, 0..3)], vec![piece(2, 0..4)]]
        );
    }

    #[test]
    fn pooling_of_token_vectors() {
        let mut p = Pool::default();
        p.add(&[1.0, 2.0]);
        p.add(&[3.0, 6.0]);
        assert_eq!(p.finish(Pooling::Mean), vec![2.0, 4.0]);
        let mut p = Pool::default();
        p.add(&[1.0, 2.0]);
        p.add(&[3.0, 6.0]);
        assert_eq!(p.finish(Pooling::Cls), vec![1.0, 2.0]);
        let mut p = Pool::default();
        p.add(&[1.0, 2.0]);
        p.add(&[3.0, 6.0]);
        assert_eq!(p.finish(Pooling::Last), vec![3.0, 6.0]);
    }
}
