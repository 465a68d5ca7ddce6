//! The tiny fixture model (random weights, a real tokenizer and chat template), written once per
//! test binary, for the engines' own tests.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use tidepool_models::fixture::{write_fixture, FixtureOptions, FixtureShape};
use tidepool_models::quant_plan::QuantScheme;

/// The tiny Q8_0 fixture's path.
pub(crate) fn tiny_path() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("tp-engine-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tiny-q8_0.gguf");
        let opts = FixtureOptions {
            shape: FixtureShape::named("tiny").unwrap(),
            quant: QuantScheme::Q8_0,
            seed: 1,
        };
        write_fixture(&opts, &path, &|_, _| {}).unwrap();
        path
    })
}
