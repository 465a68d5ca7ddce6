//! Embeddings on llama.cpp, on the weights the worker's generations use.
//!
//! The worker's own context is built for generation (no embedding output, no pooling), and
//! llama-cpp-2 cannot switch that at run time, so a request gets a context of its own on the
//! same resident weights, with embeddings on and the pooling chosen: sized for the request's
//! tokens (at most one slot's worth per batch), used on a blocking thread, and dropped when the
//! request is done. The request holds one of the worker's slots meanwhile (the gateway leases it
//! like a generation's), so its transient memory stands in for that slot's idle KV cache.
//!
//! Inputs are packed into batches of up to [`MAX_SEQUENCES`] sequences and one slot's context of
//! tokens; each batch is one decode, and each sequence's pooled vector is read back.

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
    let arch = resident
        .model
        .meta_val_str("general.architecture")
        .unwrap_or_default();
    resident
        .model
        .meta_val_str(&format!("{arch}.pooling_type"))
        .ok()
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

/// Packs inputs, in order, into batches of at most `MAX_SEQUENCES` sequences and `budget`
/// tokens (an input alone may fill a batch). Returns index ranges into `lengths`.
pub(super) fn batches(lengths: &[usize], budget: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut tokens = 0;
    for (i, &n) in lengths.iter().enumerate() {
        let full = i - start == MAX_SEQUENCES || (i > start && tokens + n > budget);
        if full {
            out.push(start..i);
            start = i;
            tokens = 0;
        }
        tokens += n;
    }
    if start < lengths.len() {
        out.push(start..lengths.len());
    }
    out
}

/// Embeds every input of `request` with `threads` threads, each input at most `limit` tokens.
/// Stops at the next batch once `cancelled` is set (the client went away).
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
    let plan = batches(&lengths, limit);
    // One context for every batch, sized for the largest.
    let most_tokens = plan
        .iter()
        .map(|r| lengths[r.clone()].iter().sum::<usize>())
        .max()
        .unwrap_or(1)
        .max(1);
    let most_seqs = plan.iter().map(|r| r.len()).max().unwrap_or(1).max(1);
    // A multiple of the sequences: llama.cpp rounds a reserved micro-batch up to one, but not
    // the outputs it reserves beside it, and mean pooling then multiplies mismatched matrices
    // (a GGML_ASSERT abort, e.g. 3 tokens in 2 sequences).
    let most_tokens = most_tokens.div_ceil(most_seqs) * most_seqs;
    let params = LlamaContextParams::default()
        .with_embeddings(true)
        .with_pooling_type(match pooling {
            Pooling::Mean => LlamaPoolingType::Mean,
            Pooling::Cls => LlamaPoolingType::Cls,
            Pooling::Last => LlamaPoolingType::Last,
        })
        // Every sequence shares the cells, so the context is the batch's tokens, and the whole
        // batch is one micro-batch (a non-causal model must see a sequence whole).
        .with_kv_unified(true)
        .with_n_ctx(NonZeroU32::new(most_tokens as u32))
        .with_n_seq_max(most_seqs as u32)
        .with_n_batch(most_tokens as u32)
        .with_n_ubatch(most_tokens as u32)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let started = std::time::Instant::now();
    let mut ctx = resident
        .model
        .new_context(backend, params)
        .map_err(|e| EngineError::Internal(format!("llama.cpp embedding context: {e}")))?;
    let context_s = started.elapsed().as_secs_f64();
    let mut vectors = Vec::with_capacity(inputs.len());
    for range in plan {
        if cancelled.load(Ordering::Relaxed) {
            return Err(EngineError::Internal("the embedding was cancelled".into()));
        }
        let n: usize = lengths[range.clone()].iter().sum();
        let mut batch = LlamaBatch::new(n, range.len() as i32);
        for (seq, tokens) in inputs[range.clone()].iter().enumerate() {
            batch
                .add_sequence(tokens, seq as i32, true)
                .map_err(|e| EngineError::Internal(format!("embedding batch: {e}")))?;
        }
        ctx.clear_kv_cache();
        ctx.decode(&mut batch)
            .map_err(|e| EngineError::Internal(format!("llama.cpp embedding decode: {e}")))?;
        for seq in 0..range.len() {
            let v = ctx.embeddings_seq_ith(seq as i32).map_err(|_| {
                EngineError::Internal("llama.cpp returned no pooled embedding".into())
            })?;
            vectors.push(v.to_vec());
        }
    }
    tracing::debug!(
        inputs = inputs.len(),
        tokens = lengths.iter().sum::<usize>(),
        context_s,
        total_s = started.elapsed().as_secs_f64(),
        "embedded"
    );
    Ok(Embeddings {
        vectors,
        prompt_tokens: lengths.iter().sum::<usize>() as u64,
        pooling,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_keep_order_and_respect_both_limits() {
        assert_eq!(batches(&[3, 3, 3], 6), vec![0..2, 2..3]);
        assert_eq!(
            batches(&[10], 6),
            vec![0..1],
            "an input alone may fill a batch"
        );
        assert_eq!(batches(&[2, 10, 2], 6), vec![0..1, 1..2, 2..3]);
        let many = vec![1; MAX_SEQUENCES + 1];
        assert_eq!(
            batches(&many, 1000),
            vec![0..MAX_SEQUENCES, MAX_SEQUENCES..MAX_SEQUENCES + 1]
        );
        assert!(batches(&[], 6).is_empty());
    }
}
