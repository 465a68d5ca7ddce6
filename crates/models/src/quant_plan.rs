//! Which GGML type each tensor gets for a named quantization ("q4_0", "q8_0", "q4_k_m"), following
//! llama.cpp's rules closely enough that fixtures and requantized files have the same type mix,
//! and so the same speed, as the files people download.

use candle_core::quantized::GgmlDType;
use std::fmt;
use std::str::FromStr;

/// A whole-file quantization scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantScheme {
    F32,
    F16,
    Q4_0,
    Q8_0,
    /// llama.cpp's Q4_K_M mix: Q4_K, with Q6_K for the output projection and for attn_v / ffn_down
    /// in "more bits" layers; rows that are not a multiple of 256 fall back to Q5_0 (for Q4_K) or
    /// Q8_0 (for Q6_K), which is what makes Qwen2.5-0.5B's file mostly Q5_0.
    Q4KM,
}

impl FromStr for QuantScheme {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => Self::F32,
            "f16" => Self::F16,
            "q4_0" => Self::Q4_0,
            "q8_0" => Self::Q8_0,
            "q4_k_m" => Self::Q4KM,
            other => {
                return Err(format!(
                    "unknown quantization `{other}` (expected f32, f16, q4_0, q8_0 or q4_k_m)"
                ))
            }
        })
    }
}

impl fmt::Display for QuantScheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Q4_0 => "q4_0",
            Self::Q8_0 => "q8_0",
            Self::Q4KM => "q4_k_m",
        })
    }
}

impl QuantScheme {
    /// GGUF `general.file_type` (llama.cpp's `llama_ftype`).
    pub fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q8_0 => 7,
            Self::Q4KM => 15,
        }
    }

    /// The type for tensor `name` of shape `dims` (GGML order reversed: `[rows, row_len]`).
    /// `n_layers` is the model's block count; `tied` says the token embedding doubles as the
    /// output projection.
    pub fn tensor_type(self, name: &str, dims: &[usize], n_layers: usize, tied: bool) -> GgmlDType {
        // Norms, biases and other vectors stay f32, as llama.cpp keeps them.
        if dims.len() < 2 {
            return GgmlDType::F32;
        }
        let row_len = *dims.last().unwrap();
        let wanted = match self {
            Self::F32 => return GgmlDType::F32,
            Self::F16 => return GgmlDType::F16,
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4KM => {
                let is_output = name == "output.weight" || (tied && name == "token_embd.weight");
                let layer = layer_index(name);
                let more_bits = layer.is_some_and(|i| use_more_bits(i, n_layers));
                if is_output
                    || (more_bits
                        && (name.ends_with("attn_v.weight") || name.ends_with("ffn_down.weight")))
                {
                    GgmlDType::Q6K
                } else {
                    GgmlDType::Q4K
                }
            }
        };
        fallback_for_row(wanted, row_len)
    }
}

/// llama.cpp's replacement when a row is not a whole number of blocks of `wanted`.
pub fn fallback_for_row(wanted: GgmlDType, row_len: usize) -> GgmlDType {
    if row_len.is_multiple_of(wanted.block_size()) {
        return wanted;
    }
    let fallback = match wanted {
        GgmlDType::Q2K | GgmlDType::Q3K => GgmlDType::Q4_0,
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        _ => GgmlDType::F16,
    };
    if row_len.is_multiple_of(fallback.block_size()) {
        fallback
    } else {
        GgmlDType::F16
    }
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers, and every third between.
fn use_more_bits(i: usize, n: usize) -> bool {
    // Past the first clause i >= n / 8 holds, so the subtraction cannot underflow.
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

fn layer_index(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen05b_q4_k_m_is_mostly_q5_0() {
        let s = QuantScheme::Q4KM;
        // 896-wide rows cannot take K-quants.
        assert_eq!(
            s.tensor_type("blk.5.attn_q.weight", &[896, 896], 24, true),
            GgmlDType::Q5_0
        );
        assert_eq!(
            s.tensor_type("blk.5.ffn_up.weight", &[4864, 896], 24, true),
            GgmlDType::Q5_0
        );
        // ffn_down rows are 4864 = 19 * 256 wide: K-quants fit (Q6_K in more-bits layers, Q4_K in others).
        assert_eq!(
            s.tensor_type("blk.6.ffn_down.weight", &[896, 4864], 24, true),
            GgmlDType::Q4K
        );
        assert_eq!(
            s.tensor_type("blk.0.ffn_down.weight", &[896, 4864], 24, true),
            GgmlDType::Q6K
        );
        // Q6_K falls back to Q8_0 on 896-wide rows (attn_v in more-bits layers, tied embedding).
        assert_eq!(
            s.tensor_type("blk.0.attn_v.weight", &[128, 896], 24, true),
            GgmlDType::Q8_0
        );
        assert_eq!(
            s.tensor_type("token_embd.weight", &[151936, 896], 24, true),
            GgmlDType::Q8_0
        );
        assert_eq!(
            s.tensor_type("blk.0.attn_norm.weight", &[896], 24, true),
            GgmlDType::F32
        );
    }

    #[test]
    fn more_bits_layers_match_llama_cpp() {
        let layers: Vec<usize> = (0..24).filter(|&i| use_more_bits(i, 24)).collect();
        assert_eq!(layers, vec![0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23]);
    }

    #[test]
    fn parses_names() {
        assert_eq!("Q4_K_M".parse::<QuantScheme>().unwrap(), QuantScheme::Q4KM);
        assert!("q3_k"
            .parse::<QuantScheme>()
            .unwrap_err()
            .contains("unknown quantization"));
    }
}
