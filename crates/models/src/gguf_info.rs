//! What a GGUF file says about itself: architecture, shapes, tensor types and byte counts, read
//! from the header alone (no tensor data), so memory can be planned before a model loads.
//!
//! Every file is checked by [`tidepool_gguf::check_file`] first (lengths, counts and offsets
//! against the file's size): a malformed or hostile file is an error naming what is wrong,
//! never an allocation it dictates.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use serde::Serialize;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum GgufInfoError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a readable GGUF file: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path} is not a valid GGUF file: {source}")]
    Invalid {
        path: PathBuf,
        source: tidepool_gguf::GgufError,
    },
    #[error("{path}: missing or malformed metadata `{key}`")]
    Metadata { path: PathBuf, key: String },
}

/// The shapes that matter for memory accounting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelShape {
    pub arch: String,
    pub context_length: u64,
    pub layers: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub hidden: u32,
    pub vocab: u32,
}

impl ModelShape {
    /// K and V elements cached per token across all layers.
    pub fn kv_elements_per_token(&self) -> u64 {
        2 * self.layers as u64 * self.kv_heads as u64 * self.head_dim as u64
    }

    /// KV-cache bytes per token at `elem_bytes` bytes per element (2 for f16/bf16, 4 for f32).
    pub fn kv_bytes_per_token(&self, elem_bytes: u64) -> u64 {
        self.kv_elements_per_token() * elem_bytes
    }
}

/// Everything Tidepool reads from a GGUF header (all parts of a split model together).
#[derive(Debug, Clone, Serialize)]
pub struct GgufInfo {
    pub files: Vec<PathBuf>,
    pub name: Option<String>,
    pub shape: ModelShape,
    /// Bytes of tensor data across all files (what the weights occupy once loaded as stored).
    pub tensor_bytes: u64,
    /// Bytes of `token_embd.weight` as stored.
    pub token_embd_bytes: u64,
    /// Whether the output projection reuses the token embedding (no `output.weight`).
    pub tied_embeddings: bool,
    /// Tensor count per GGML type, e.g. {"Q5_0": 144, "Q8_0": 13, "F32": 121}.
    pub tensor_types: BTreeMap<String, usize>,
    pub n_tensors: usize,
    pub has_chat_template: bool,
    /// The end-of-sequence token, if the file names one.
    pub eos_token_id: Option<u32>,
    /// The text of every control or user-defined token (`<|im_start|>`, `<tool_call>`…): what a
    /// user must not be able to type into a prompt.
    pub special_tokens: Vec<String>,
}

/// What identifies one version of a file: its path, size and (on Unix) inode and change time,
/// which no write and no `touch` leaves as they were.
type FileVersion = (PathBuf, u64, u64, i64, i64);

fn file_version(path: &Path) -> std::io::Result<FileVersion> {
    let m = std::fs::metadata(path)?;
    #[cfg(unix)]
    let (ino, secs, nanos) = {
        use std::os::unix::fs::MetadataExt;
        (m.ino(), m.ctime(), m.ctime_nsec())
    };
    #[cfg(not(unix))]
    let (ino, secs, nanos) = {
        let t = m
            .modified()?
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        (0, t.as_secs() as i64, t.subsec_nanos() as i64)
    };
    Ok((path.to_path_buf(), m.len(), ino, secs, nanos))
}

impl GgufInfo {
    /// [`GgufInfo::read`], remembered for the life of the process (the last 16 models): reading
    /// and checking a header with a 150 000-token vocabulary takes a noticeable part of a cold
    /// start, and a model that scaled to zero loads the same file again. A file that changed
    /// (size, inode or change time) is read and checked again.
    pub fn read_cached(files: &[PathBuf]) -> Result<GgufInfo, GgufInfoError> {
        type Cache = std::sync::Mutex<lru::LruCache<Vec<FileVersion>, GgufInfo>>;
        static CACHE: std::sync::OnceLock<Cache> = std::sync::OnceLock::new();
        let cache = CACHE.get_or_init(|| {
            std::sync::Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(16).expect("nonzero"),
            ))
        });
        let Ok(key) = files
            .iter()
            .map(|p| file_version(p))
            .collect::<std::io::Result<Vec<_>>>()
        else {
            // Unreadable: `read` says why.
            return Self::read(files);
        };
        if let Some(hit) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(hit.clone());
        }
        let info = Self::read(files)?;
        cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .put(key, info.clone());
        Ok(info)
    }

    /// Reads the headers of one model's GGUF file(s).
    pub fn read(files: &[PathBuf]) -> Result<GgufInfo, GgufInfoError> {
        let mut metadata = None;
        let mut tensor_bytes = 0u64;
        let mut token_embd_bytes = 0u64;
        let mut has_output = false;
        let mut tensor_types = BTreeMap::new();
        let mut n_tensors = 0;
        for path in files {
            let content = read_content(path)?;
            for (name, t) in &content.tensor_infos {
                let bytes = tensor_storage_bytes(t.ggml_dtype, t.shape.elem_count());
                tensor_bytes += bytes;
                n_tensors += 1;
                *tensor_types
                    .entry(dtype_name(t.ggml_dtype).to_string())
                    .or_insert(0) += 1;
                match name.as_str() {
                    "token_embd.weight" => token_embd_bytes = bytes,
                    "output.weight" => has_output = true,
                    _ => {}
                }
            }
            // Split files repeat the model metadata in the first part only.
            if metadata.is_none() && content.metadata.contains_key("general.architecture") {
                metadata = Some((path.clone(), content.metadata));
            }
        }
        let (first, md) = metadata.ok_or_else(|| GgufInfoError::Metadata {
            path: files.first().cloned().unwrap_or_default(),
            key: "general.architecture".into(),
        })?;
        let shape = shape_from_metadata(&first, &md)?;
        let special_tokens = special_tokens(&md);
        Ok(GgufInfo {
            files: files.to_vec(),
            name: md
                .get("general.name")
                .and_then(|v| v.to_string().ok())
                .cloned(),
            shape,
            tensor_bytes,
            token_embd_bytes,
            tied_embeddings: !has_output,
            tensor_types,
            n_tensors,
            has_chat_template: md.contains_key("tokenizer.chat_template"),
            eos_token_id: md
                .get("tokenizer.ggml.eos_token_id")
                .and_then(|v| v.to_u32().ok()),
            special_tokens,
        })
    }

    /// Bytes of weights resident once mistral.rs has loaded the model on `activation_bytes`-wide
    /// activations: the tensors as stored, plus the token-embedding table, which the Qwen2 and
    /// Llama GGUF loaders dequantize into a dense `vocab x hidden` matrix for the lookup.
    pub fn resident_weight_bytes(&self, activation_bytes: u64) -> u64 {
        self.tensor_bytes + self.shape.vocab as u64 * self.shape.hidden as u64 * activation_bytes
    }

    /// A short description of the tensor type mix, e.g. `Q5_0×132 Q8_0×13 Q6_K×12 F32×121`.
    pub fn type_mix(&self) -> String {
        let mut v: Vec<_> = self.tensor_types.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        v.iter()
            .map(|(k, n)| format!("{k}×{n}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// The tokens a GGUF marks as control (3) or user-defined (4), as text.
fn special_tokens(md: &std::collections::HashMap<String, Value>) -> Vec<String> {
    let (Some(Ok(tokens)), Some(Ok(types))) = (
        md.get("tokenizer.ggml.tokens").map(|v| v.to_vec()),
        md.get("tokenizer.ggml.token_type").map(|v| v.to_vec()),
    ) else {
        return Vec::new();
    };
    let mut out: Vec<String> = tokens
        .iter()
        .zip(types)
        .filter(|(_, t)| matches!(t.to_i32(), Ok(3 | 4)))
        .filter_map(|(tok, _)| tok.to_string().ok().cloned())
        .filter(|t| t.len() > 1)
        .collect();
    out.sort();
    out.dedup();
    out
}

pub(crate) fn read_content(path: &Path) -> Result<Content, GgufInfoError> {
    tidepool_gguf::check_file(path).map_err(|source| match source {
        tidepool_gguf::GgufError::Io(_) => GgufInfoError::Open {
            path: path.to_path_buf(),
            source: std::io::Error::other(source.to_string()),
        },
        source => GgufInfoError::Invalid {
            path: path.to_path_buf(),
            source,
        },
    })?;
    let mut f = std::fs::File::open(path).map_err(|source| GgufInfoError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    Content::read(&mut f).map_err(|e| GgufInfoError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Bytes a tensor of `elems` elements occupies in `dtype`.
pub fn tensor_storage_bytes(dtype: GgmlDType, elems: usize) -> u64 {
    (elems / dtype.block_size() * dtype.type_size()) as u64
}

/// GGML's name for a type (`Q4_K`, `Q8_0`, `F32`).
pub fn dtype_name(dtype: GgmlDType) -> &'static str {
    match dtype {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

fn shape_from_metadata(
    path: &Path,
    md: &std::collections::HashMap<String, Value>,
) -> Result<ModelShape, GgufInfoError> {
    let missing = |key: &str| GgufInfoError::Metadata {
        path: path.to_path_buf(),
        key: key.to_string(),
    };
    let arch = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or_else(|| missing("general.architecture"))?;
    let int = |suffix: &str| -> Result<u64, GgufInfoError> {
        let key = format!("{arch}.{suffix}");
        md.get(&key)
            .and_then(|v| v.to_u64().ok())
            .ok_or_else(|| missing(&key))
    };
    let hidden = int("embedding_length")?;
    let heads = int("attention.head_count")?;
    let head_dim = match int("attention.key_length") {
        Ok(k) => k,
        Err(_) => hidden / heads.max(1),
    };
    let vocab = match md
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.to_vec().ok())
    {
        Some(tokens) => tokens.len() as u64,
        None => int("vocab_size")?,
    };
    Ok(ModelShape {
        context_length: int("context_length")?,
        layers: int("block_count")? as u32,
        kv_heads: int("attention.head_count_kv").unwrap_or(heads) as u32,
        head_dim: head_dim as u32,
        hidden: hidden as u32,
        vocab: vocab as u32,
        arch,
    })
}
