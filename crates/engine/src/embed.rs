//! Embedding requests and results, the same for every engine: what to embed (texts or token
//! ids), how a sequence's token vectors become one vector ([`Pooling`]), and L2 normalization,
//! which the APIs above apply or not as each one specifies.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The most inputs one embedding request may carry (OpenAI's own limit is 2048).
pub const MAX_INPUTS: usize = 2048;

/// One input to embed.
#[derive(Debug, Clone, PartialEq)]
pub enum EmbedInput {
    /// Text, tokenized with the model's special tokens added (BOS, or CLS/SEP) but never parsed
    /// from the text itself.
    Text(String),
    /// Token ids, used as given.
    Tokens(Vec<u32>),
}

/// How the vectors of a sequence's tokens become the sequence's one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// The mean over every token (what a chat model's embeddings default to here).
    Mean,
    /// The first token's vector (BERT's [CLS]).
    Cls,
    /// The last token's vector (decoder embedding models such as Qwen3-Embedding).
    Last,
}

impl Pooling {
    /// The pooling a GGUF declares in `{arch}.pooling_type` (llama.cpp's numbering), if it is
    /// one of these.
    pub fn from_gguf(value: i64) -> Option<Pooling> {
        match value {
            1 => Some(Pooling::Mean),
            2 => Some(Pooling::Cls),
            3 => Some(Pooling::Last),
            _ => None,
        }
    }
}

impl fmt::Display for Pooling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Pooling::Mean => "mean",
            Pooling::Cls => "cls",
            Pooling::Last => "last",
        })
    }
}

impl FromStr for Pooling {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "mean" => Ok(Pooling::Mean),
            "cls" => Ok(Pooling::Cls),
            "last" => Ok(Pooling::Last),
            other => Err(format!("unknown pooling `{other}`: use mean, cls or last")),
        }
    }
}

/// What to embed.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbedRequest {
    pub inputs: Vec<EmbedInput>,
    /// Cut an input longer than the context to its first tokens (Ollama's `truncate`, on by
    /// default there); otherwise such an input is refused.
    pub truncate: bool,
}

/// One vector per input, in the order given, as the model pooled them (not normalized).
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    pub vectors: Vec<Vec<f32>>,
    /// Tokens embedded, every input together (after truncation).
    pub prompt_tokens: u64,
    pub pooling: Pooling,
}

/// Scales `v` to unit length (a zero vector stays zero).
pub fn normalize(v: &mut [f32]) {
    let norm = v
        .iter()
        .map(|x| f64::from(*x) * f64::from(*x))
        .sum::<f64>()
        .sqrt();
    if norm > 0.0 {
        for x in v.iter_mut() {
            *x = (f64::from(*x) / norm) as f32;
        }
    }
}

/// Cosine similarity of two vectors of the same width (0 when either is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizing_gives_unit_length_and_keeps_direction() {
        let mut v = vec![3.0, 4.0];
        normalize(&mut v);
        assert!(
            (v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6,
            "{v:?}"
        );
        let mut zero = vec![0.0, 0.0];
        normalize(&mut zero);
        assert_eq!(zero, vec![0.0, 0.0]);
    }

    #[test]
    fn cosine_of_parallel_orthogonal_and_opposite_vectors() {
        assert!((cosine(&[1.0, 2.0], &[2.0, 4.0]) - 1.0).abs() < 1e-9);
        assert!(cosine(&[1.0, 0.0], &[0.0, 5.0]).abs() < 1e-9);
        assert!((cosine(&[1.0, 1.0], &[-1.0, -1.0]) + 1.0).abs() < 1e-9);
        assert_eq!(cosine(&[0.0], &[1.0]), 0.0);
    }

    #[test]
    fn pooling_reads_llama_cpp_numbers_and_names() {
        assert_eq!(Pooling::from_gguf(1), Some(Pooling::Mean));
        assert_eq!(Pooling::from_gguf(2), Some(Pooling::Cls));
        assert_eq!(Pooling::from_gguf(3), Some(Pooling::Last));
        assert_eq!(Pooling::from_gguf(0), None, "none is not a pooling");
        assert_eq!(Pooling::from_gguf(4), None, "rank is a reranker's");
        assert_eq!("last".parse::<Pooling>(), Ok(Pooling::Last));
        assert!("max"
            .parse::<Pooling>()
            .unwrap_err()
            .contains("mean, cls or last"));
    }
}
