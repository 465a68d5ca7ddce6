//! Checks an untrusted GGUF file before any library reads it.
//!
//! candle and llama.cpp trust the lengths a GGUF header declares: a 40-byte file whose first key
//! claims to be 2^40 bytes long makes candle try to allocate a terabyte, and the process aborts.
//! [`check`] walks the header with the file's size in hand: every string, array and count is
//! checked against the bytes that remain before anything is allocated for it, tensor shapes are
//! multiplied with overflow checks, tensor types must be known, and every tensor's data must lie
//! inside the file. Only then do the engines see the file.
//!
//! Pure and dependency-free (a reader and a length in, a summary or the reason out), so it is
//! fuzzed on its own (`fuzz/`).

use std::io::Read;

/// `GGUF` in little-endian.
pub const MAGIC: u32 = 0x4655_4747;

/// Limits beyond the file's own size: nothing real comes near them.
pub mod limits {
    /// Metadata keys and tensor names.
    pub const MAX_KEY_BYTES: u64 = 64 * 1024;
    /// One string value (a chat template is a few KiB; 16 MiB leaves room).
    pub const MAX_STRING_BYTES: u64 = 16 << 20;
    /// Metadata entries, and tensors.
    pub const MAX_ENTRIES: u64 = 1 << 20;
    /// Array elements (a vocabulary is ~150k, its merges ~150k).
    pub const MAX_ARRAY_LEN: u64 = 1 << 24;
    /// Arrays nested in arrays.
    pub const MAX_DEPTH: u32 = 4;
    /// Tensor dimensions (ggml's GGML_MAX_DIMS).
    pub const MAX_DIMS: u32 = 4;
}

/// What is wrong with a file, precisely enough to say it to the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GgufError {
    #[error("not a GGUF file (the first bytes are not `GGUF`)")]
    NotGguf,
    #[error("GGUF version {0} is not supported (only 2 and 3)")]
    Version(u32),
    #[error("the file ends at byte {at} inside {what}")]
    Truncated { what: String, at: u64 },
    #[error("{what} declares {claimed}, more than {limit}")]
    TooLarge {
        what: String,
        claimed: u64,
        limit: u64,
    },
    #[error("{what} has unknown value type {ty}")]
    ValueType { what: String, ty: u32 },
    #[error("tensor `{name}` has unknown ggml type {ty}")]
    TensorType { name: String, ty: u32 },
    #[error("tensor `{name}`: {why}")]
    Tensor { name: String, why: String },
    #[error("{what} is not valid UTF-8")]
    Utf8 { what: String },
    #[error("reading the file failed: {0}")]
    Io(String),
}

/// A summary of a file that passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub version: u32,
    pub n_tensors: u64,
    pub n_metadata: u64,
    /// Where tensor data starts.
    pub data_offset: u64,
    /// Bytes of tensor data the tensors declare.
    pub tensor_bytes: u64,
}

/// (block size, bytes per block) of a ggml type, `None` when unknown.
pub fn type_layout(ty: u32) -> Option<(u64, u64)> {
    Some(match ty {
        0 => (1, 4),      // F32
        1 => (1, 2),      // F16
        2 => (32, 18),    // Q4_0
        3 => (32, 20),    // Q4_1
        6 => (32, 22),    // Q5_0
        7 => (32, 24),    // Q5_1
        8 => (32, 34),    // Q8_0
        9 => (32, 36),    // Q8_1
        10 => (256, 84),  // Q2_K
        11 => (256, 110), // Q3_K
        12 => (256, 144), // Q4_K
        13 => (256, 176), // Q5_K
        14 => (256, 210), // Q6_K
        15 => (256, 292), // Q8_K
        16 => (256, 66),  // IQ2_XXS
        17 => (256, 74),  // IQ2_XS
        18 => (256, 98),  // IQ3_XXS
        19 => (256, 50),  // IQ1_S
        20 => (32, 18),   // IQ4_NL
        21 => (256, 110), // IQ3_S
        22 => (256, 82),  // IQ2_S
        23 => (256, 136), // IQ4_XS
        24 => (1, 1),     // I8
        25 => (1, 2),     // I16
        26 => (1, 4),     // I32
        27 => (1, 8),     // I64
        28 => (1, 8),     // F64
        29 => (256, 56),  // IQ1_M
        30 => (1, 2),     // BF16
        34 => (256, 54),  // TQ1_0
        35 => (256, 66),  // TQ2_0
        39 => (32, 17),   // MXFP4
        _ => return None,
    })
}

/// Checks the GGUF file at `path`.
pub fn check_file(path: &std::path::Path) -> Result<Checked, GgufError> {
    let file = std::fs::File::open(path).map_err(|e| GgufError::Io(e.to_string()))?;
    let len = file
        .metadata()
        .map_err(|e| GgufError::Io(e.to_string()))?
        .len();
    check(std::io::BufReader::new(file), len)
}

/// Checks a GGUF file of `len` bytes read from `r`.
pub fn check(r: impl Read, len: u64) -> Result<Checked, GgufError> {
    let mut c = Cursor { r, pos: 0, len };
    if c.u32("the magic number")? != MAGIC {
        return Err(GgufError::NotGguf);
    }
    let version = c.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::Version(version));
    }
    let n_tensors = c.u64("the tensor count")?;
    let n_metadata = c.u64("the metadata count")?;
    bound("the tensor count", n_tensors, limits::MAX_ENTRIES)?;
    bound("the metadata count", n_metadata, limits::MAX_ENTRIES)?;
    let mut alignment = 32u64;
    for i in 0..n_metadata {
        let key = c.string(&format!("metadata key {i}"), limits::MAX_KEY_BYTES)?;
        let ty = c.u32(&format!("the type of `{key}`"))?;
        if key == "general.alignment" && ty == 4 {
            alignment = u64::from(c.u32("general.alignment")?);
            if alignment == 0 || !alignment.is_power_of_two() || alignment > 1 << 16 {
                return Err(GgufError::TooLarge {
                    what: "general.alignment (a power of two)".into(),
                    claimed: alignment,
                    limit: 1 << 16,
                });
            }
            continue;
        }
        c.skip_value(&key, ty, 0)?;
    }
    let mut tensors = Vec::new();
    for i in 0..n_tensors {
        let name = c.string(&format!("tensor name {i}"), limits::MAX_KEY_BYTES)?;
        let n_dims = c.u32(&format!("the dimensions of `{name}`"))?;
        if n_dims == 0 || n_dims > limits::MAX_DIMS {
            return Err(GgufError::Tensor {
                name,
                why: format!("{n_dims} dimensions (1 to {} allowed)", limits::MAX_DIMS),
            });
        }
        let mut elems: u64 = 1;
        let mut first_dim = 0;
        for d in 0..n_dims {
            let dim = c.u64(&format!("a dimension of `{name}`"))?;
            if d == 0 {
                first_dim = dim;
            }
            elems = elems.checked_mul(dim).ok_or_else(|| GgufError::Tensor {
                name: name.clone(),
                why: "its shape overflows".into(),
            })?;
        }
        let ty = c.u32(&format!("the type of `{name}`"))?;
        let offset = c.u64(&format!("the offset of `{name}`"))?;
        let Some((block, bytes_per_block)) = type_layout(ty) else {
            return Err(GgufError::TensorType { name, ty });
        };
        if first_dim % block != 0 {
            return Err(GgufError::Tensor {
                name,
                why: format!("its rows ({first_dim}) are not whole blocks of {block}"),
            });
        }
        let bytes = (elems / block)
            .checked_mul(bytes_per_block)
            .ok_or_else(|| GgufError::Tensor {
                name: name.clone(),
                why: "its size overflows".into(),
            })?;
        if offset % alignment != 0 {
            return Err(GgufError::Tensor {
                name,
                why: format!("its offset {offset} is not aligned to {alignment}"),
            });
        }
        tensors.push((name, offset, bytes));
    }
    let data_offset = c.pos.div_ceil(alignment) * alignment;
    let data_len = len.saturating_sub(data_offset);
    let mut tensor_bytes: u64 = 0;
    for (name, offset, bytes) in tensors {
        let end = offset.checked_add(bytes).filter(|&e| e <= data_len);
        if end.is_none() {
            return Err(GgufError::Tensor {
                name,
                why: format!(
                    "its data ({bytes} bytes at offset {offset}) runs past the end of the file ({data_len} bytes of tensor data)"
                ),
            });
        }
        tensor_bytes = tensor_bytes.saturating_add(bytes);
    }
    Ok(Checked {
        version,
        n_tensors,
        n_metadata,
        data_offset,
        tensor_bytes,
    })
}

fn bound(what: &str, claimed: u64, limit: u64) -> Result<(), GgufError> {
    if claimed > limit {
        Err(GgufError::TooLarge {
            what: what.to_string(),
            claimed,
            limit,
        })
    } else {
        Ok(())
    }
}

/// A reader that knows how many bytes are left.
struct Cursor<R> {
    r: R,
    pos: u64,
    len: u64,
}

impl<R: Read> Cursor<R> {
    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn truncated(&self, what: &str) -> GgufError {
        GgufError::Truncated {
            what: what.to_string(),
            at: self.pos,
        }
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        if self.remaining() < N as u64 {
            return Err(self.truncated(what));
        }
        let mut b = [0u8; N];
        self.r
            .read_exact(&mut b)
            .map_err(|_| self.truncated(what))?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.bytes::<4>(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.bytes::<8>(what)?))
    }

    /// Skips `n` bytes that must be in the file.
    fn skip(&mut self, n: u64, what: &str) -> Result<(), GgufError> {
        if self.remaining() < n {
            return Err(self.truncated(what));
        }
        let copied = std::io::copy(&mut (&mut self.r).take(n), &mut std::io::sink())
            .map_err(|e| GgufError::Io(e.to_string()))?;
        if copied != n {
            return Err(self.truncated(what));
        }
        self.pos += n;
        Ok(())
    }

    /// A length-prefixed string, read only after its length is known to fit.
    fn string(&mut self, what: &str, limit: u64) -> Result<String, GgufError> {
        let n = self.u64(what)?;
        bound(what, n, limit)?;
        if self.remaining() < n {
            return Err(GgufError::TooLarge {
                what: format!("{what} (its length)"),
                claimed: n,
                limit: self.remaining(),
            });
        }
        let mut buf = vec![0u8; n as usize];
        self.r
            .read_exact(&mut buf)
            .map_err(|_| self.truncated(what))?;
        self.pos += n;
        String::from_utf8(buf).map_err(|_| GgufError::Utf8 {
            what: what.to_string(),
        })
    }

    fn skip_value(&mut self, key: &str, ty: u32, depth: u32) -> Result<(), GgufError> {
        if let Some(size) = scalar_size(ty) {
            return self.skip(size, key);
        }
        match ty {
            8 => {
                let n = self.u64(key)?;
                bound(&format!("the string `{key}`"), n, limits::MAX_STRING_BYTES)?;
                self.skip(n, key)
            }
            9 => {
                if depth >= limits::MAX_DEPTH {
                    return Err(GgufError::TooLarge {
                        what: format!("the nesting of arrays in `{key}`"),
                        claimed: u64::from(depth) + 1,
                        limit: u64::from(limits::MAX_DEPTH),
                    });
                }
                let elem = self.u32(key)?;
                let n = self.u64(key)?;
                bound(&format!("the array `{key}`"), n, limits::MAX_ARRAY_LEN)?;
                match scalar_size(elem) {
                    Some(size) => {
                        let total = n.checked_mul(size).ok_or_else(|| self.truncated(key))?;
                        self.skip(total, key)
                    }
                    None if elem == 8 || elem == 9 => {
                        // Every element takes at least its 8-byte length (or 12-byte header).
                        let least = if elem == 8 { 8 } else { 12 };
                        if n.saturating_mul(least) > self.remaining() {
                            return Err(GgufError::TooLarge {
                                what: format!("the array `{key}` ({n} elements)"),
                                claimed: n.saturating_mul(least),
                                limit: self.remaining(),
                            });
                        }
                        for _ in 0..n {
                            self.skip_value(key, elem, depth + 1)?;
                        }
                        Ok(())
                    }
                    None => Err(GgufError::ValueType {
                        what: format!("an element of `{key}`"),
                        ty: elem,
                    }),
                }
            }
            _ => Err(GgufError::ValueType {
                what: format!("`{key}`"),
                ty,
            }),
        }
    }
}

/// Bytes of a fixed-size GGUF value type.
fn scalar_size(ty: u32) -> Option<u64> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        10..=12 => 8,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer for test files.
    #[derive(Default)]
    struct W(Vec<u8>);

    impl W {
        fn u32(mut self, v: u32) -> Self {
            self.0.extend(v.to_le_bytes());
            self
        }
        fn u64(mut self, v: u64) -> Self {
            self.0.extend(v.to_le_bytes());
            self
        }
        fn s(self, t: &str) -> Self {
            let mut w = self.u64(t.len() as u64);
            w.0.extend(t.as_bytes());
            w
        }
        fn header(n_tensors: u64, n_kv: u64) -> Self {
            W::default().u32(MAGIC).u32(3).u64(n_tensors).u64(n_kv)
        }
        fn pad_to(mut self, n: usize) -> Self {
            self.0.resize(n, 0);
            self
        }
    }

    fn run(w: &W) -> Result<Checked, GgufError> {
        check(&w.0[..], w.0.len() as u64)
    }

    fn valid() -> W {
        // One key, one 32x2 Q8_0 tensor (2 blocks of 34 bytes).
        W::header(1, 1)
            .s("general.architecture")
            .u32(8)
            .s("qwen2")
            .s("w")
            .u32(2)
            .u64(32)
            .u64(2)
            .u32(8)
            .u64(0)
    }

    #[test]
    fn a_valid_file_passes() {
        let w = valid();
        let data_at = w.0.len().div_ceil(32) * 32;
        let w = w.pad_to(data_at + 68);
        let c = run(&w).unwrap();
        assert_eq!(c.tensor_bytes, 68);
        assert_eq!(c.data_offset as usize, data_at);
    }

    #[test]
    fn the_terabyte_key_is_refused_before_any_allocation() {
        // The hostile tester's 40-byte file: the first key claims 2^40 bytes.
        let w = W::header(0, 1).u64(1 << 40).pad_to(40);
        let e = run(&w).unwrap_err();
        assert!(matches!(e, GgufError::TooLarge { .. }), "{e}");
        // Within the key limit but past the end of the file.
        let w = W::header(0, 1).u64(1000).pad_to(40);
        assert!(matches!(run(&w).unwrap_err(), GgufError::TooLarge { .. }));
    }

    #[test]
    fn lying_counts_arrays_and_offsets_are_refused() {
        assert_eq!(
            run(&W(b"GG".to_vec())),
            Err(GgufError::Truncated {
                what: "the magic number".into(),
                at: 0
            })
        );
        assert_eq!(
            run(&W::default().u32(0x1234).u32(3)),
            Err(GgufError::NotGguf)
        );
        assert_eq!(
            run(&W::default().u32(MAGIC).u32(9)),
            Err(GgufError::Version(9))
        );
        assert!(matches!(
            run(&W::header(u64::MAX, 0)),
            Err(GgufError::TooLarge { .. })
        ));
        // An array of 2^24 u64 in a tiny file.
        let w = W::header(0, 1).s("a").u32(9).u32(10).u64(1 << 24);
        assert!(matches!(run(&w), Err(GgufError::Truncated { .. })));
        // An array of many strings with no bytes behind them.
        let w = W::header(0, 1).s("a").u32(9).u32(8).u64(1 << 20);
        assert!(matches!(run(&w), Err(GgufError::TooLarge { .. })));
        // Deeply nested arrays.
        let mut w = W::header(0, 1).s("a");
        for _ in 0..6 {
            w = w.u32(9).u32(9).u64(1);
        }
        assert!(matches!(
            run(&w.pad_to(200)),
            Err(GgufError::TooLarge { .. } | GgufError::Truncated { .. })
        ));
        // Unknown value type.
        let w = W::header(0, 1).s("a").u32(77).pad_to(64);
        assert!(matches!(run(&w), Err(GgufError::ValueType { .. })));
        // Tensor data past the end of the file.
        let w = valid();
        let n = w.0.len();
        assert!(matches!(
            run(&w.pad_to(n + 8)),
            Err(GgufError::Tensor { .. })
        ));
        // A shape whose product overflows.
        let w = W::header(1, 0)
            .s("w")
            .u32(2)
            .u64(1 << 40)
            .u64(1 << 40)
            .u32(0)
            .u64(0)
            .pad_to(200);
        assert!(matches!(run(&w), Err(GgufError::Tensor { .. })));
        // An unknown tensor type.
        let w = W::header(1, 0)
            .s("w")
            .u32(1)
            .u64(32)
            .u32(99)
            .u64(0)
            .pad_to(200);
        assert!(matches!(run(&w), Err(GgufError::TensorType { ty: 99, .. })));
        // Misaligned offset.
        let w = W::header(1, 0)
            .s("w")
            .u32(1)
            .u64(32)
            .u32(0)
            .u64(3)
            .pad_to(400);
        assert!(matches!(run(&w), Err(GgufError::Tensor { .. })));
    }

    #[test]
    fn every_prefix_of_a_valid_file_is_an_error_not_a_panic() {
        let w = valid();
        let data_at = w.0.len().div_ceil(32) * 32;
        let full = w.pad_to(data_at + 68).0;
        for cut in 0..full.len() {
            assert!(check(&full[..cut], cut as u64).is_err(), "prefix {cut}");
        }
        // And byte flips never panic.
        for i in 0..full.len() {
            for bit in [0x01u8, 0x80, 0xff] {
                let mut f = full.clone();
                f[i] ^= bit;
                let _ = check(&f[..], f.len() as u64);
            }
        }
    }
}
