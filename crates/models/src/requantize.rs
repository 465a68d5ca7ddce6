//! Rewrites a GGUF so that tensors stored in types without fast CPU kernels become a type that has
//! one. On x86-64, candle has AVX2 vec-dot kernels for Q4_0, Q8_0 and the K-quants; Q4_1, Q5_0 and
//! Q5_1 run a scalar loop several times slower. SmolLM2-135M as shipped on PyPI is Q4_1, and its
//! 576-wide rows cannot take K-quants, so Q4_0 (or Q8_0) is the fast choice for it.

use std::io::BufWriter;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use thiserror::Error;

use crate::gguf_info::{dtype_name, read_content};
use crate::quant_plan::fallback_for_row;

#[derive(Debug, Error)]
pub enum RequantizeError {
    #[error(transparent)]
    Read(#[from] crate::gguf_info::GgufInfoError),
    #[error("requantizing to `{0}` is not supported (choose q4_0 or q8_0)")]
    Target(String),
    #[error("tensor `{name}`: {source}")]
    Tensor {
        name: String,
        source: candle_core::Error,
    },
    #[error("writing {path}: {message}")]
    Write { path: String, message: String },
}

/// What a requantization did.
#[derive(Debug, Clone)]
pub struct RequantizeReport {
    pub converted: usize,
    pub kept: usize,
    pub bytes_before: u64,
    pub bytes_after: u64,
}

/// Types that run on candle's scalar fallback on CPU.
pub fn is_slow_on_cpu(t: GgmlDType) -> bool {
    matches!(t, GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1)
}

/// Converts every matrix stored in a slow type (see [`is_slow_on_cpu`]) to `target` (`q4_0` or
/// `q8_0`); everything else is copied as is.
pub fn requantize(
    input: &Path,
    output: &Path,
    target: &str,
    progress: &dyn Fn(usize, usize),
) -> Result<RequantizeReport, RequantizeError> {
    let (target_type, file_type) = match target.to_ascii_lowercase().as_str() {
        "q4_0" => (GgmlDType::Q4_0, 2u32),
        "q8_0" => (GgmlDType::Q8_0, 7u32),
        other => return Err(RequantizeError::Target(other.to_string())),
    };
    let content = read_content(input)?;
    let mut reader =
        std::fs::File::open(input).map_err(|source| crate::gguf_info::GgufInfoError::Open {
            path: input.to_path_buf(),
            source,
        })?;
    // Keep the file's tensor order: loaders do not care, but diffs and mmap locality do.
    let mut names: Vec<(&String, u64)> = content
        .tensor_infos
        .iter()
        .map(|(n, t)| (n, t.offset))
        .collect();
    names.sort_by_key(|(_, off)| *off);

    let mut report = RequantizeReport {
        converted: 0,
        kept: 0,
        bytes_before: 0,
        bytes_after: 0,
    };
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    let total = names.len();
    for (i, (name, _)) in names.iter().enumerate() {
        let terr = |source| RequantizeError::Tensor {
            name: name.to_string(),
            source,
        };
        let q = content
            .tensor(&mut reader, name, &Device::Cpu)
            .map_err(terr)?;
        report.bytes_before += q.storage_size_in_bytes() as u64;
        let dims = q.shape().dims().to_vec();
        let q = if dims.len() >= 2 && is_slow_on_cpu(q.dtype()) {
            let to = fallback_for_row(target_type, *dims.last().unwrap());
            let f = q.dequantize(&Device::Cpu).map_err(terr)?;
            report.converted += 1;
            QTensor::quantize(&f, to).map_err(terr)?
        } else {
            report.kept += 1;
            q
        };
        report.bytes_after += q.storage_size_in_bytes() as u64;
        tensors.push((name.to_string(), q));
        progress(i + 1, total);
    }

    let mut metadata: Vec<(String, Value)> = content.metadata.into_iter().collect();
    metadata.sort_by(|a, b| a.0.cmp(&b.0));
    for (k, v) in metadata.iter_mut() {
        if k == "general.file_type" {
            *v = Value::U32(file_type);
        }
    }
    metadata.push((
        "tidepool.requantized_from".into(),
        Value::String(
            input
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        ),
    ));

    let werr = |message: String| RequantizeError::Write {
        path: output.display().to_string(),
        message,
    };
    let tmp = output.with_extension("gguf.partial");
    let file = std::fs::File::create(&tmp).map_err(|e| werr(e.to_string()))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    candle_core::quantized::gguf_file::write(&mut w, &md, &ts).map_err(|e| werr(e.to_string()))?;
    w.into_inner()
        .map_err(|e| werr(e.to_string()))?
        .sync_all()
        .map_err(|e| werr(e.to_string()))?;
    std::fs::rename(&tmp, output).map_err(|e| werr(e.to_string()))?;
    tracing::info!(
        converted = report.converted,
        kept = report.kept,
        target = dtype_name(target_type),
        "requantized {}",
        input.display()
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture::{write_fixture, FixtureOptions, FixtureShape};
    use crate::gguf_info::GgufInfo;
    use crate::quant_plan::QuantScheme;

    #[test]
    fn converts_slow_types_and_keeps_the_rest() {
        let dir = std::env::temp_dir().join(format!("tp-requant-{}", std::process::id()));
        let src = dir.join("mix.gguf");
        // Tiny q4_k_m: 64-wide rows fall back from Q4_K to Q5_0 (slow) and Q6_K to Q8_0 (fast).
        let opts = FixtureOptions {
            shape: FixtureShape::named("tiny").unwrap(),
            quant: QuantScheme::Q4KM,
            seed: 1,
        };
        write_fixture(&opts, &src, &|_, _| {}).unwrap();
        let before = GgufInfo::read(std::slice::from_ref(&src)).unwrap();
        assert!(
            before.tensor_types.contains_key("Q5_0"),
            "{:?}",
            before.tensor_types
        );

        let dst = dir.join("mix-q4_0.gguf");
        let report = requantize(&src, &dst, "q4_0", &|_, _| {}).unwrap();
        let after = GgufInfo::read(std::slice::from_ref(&dst)).unwrap();
        assert_eq!(report.converted, before.tensor_types["Q5_0"]);
        assert!(!after.tensor_types.contains_key("Q5_0"));
        assert_eq!(after.tensor_types["Q8_0"], before.tensor_types["Q8_0"]);
        assert_eq!(after.n_tensors, before.n_tensors);
        assert_eq!(after.shape, before.shape);
        assert!(requantize(&src, &dst, "q2_k", &|_, _| {}).is_err());
        std::fs::remove_dir_all(dir).ok();
    }
}
