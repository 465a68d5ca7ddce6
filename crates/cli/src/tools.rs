//! `tidepool fixture` and `tidepool requantize`: model files made locally.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use tidepool_models::fixture::{write_fixture, FixtureOptions, FixtureShape};
use tidepool_models::gguf_info::GgufInfo;
use tidepool_models::model_source::Progress;
use tidepool_models::quant_plan::QuantScheme;
use tidepool_sched::memory::human_bytes;

use tidepool::progress::BarProgress;

#[derive(Args)]
pub struct FixtureArgs {
    /// Architecture (only qwen2 is generated).
    #[arg(long, default_value = "qwen2")]
    arch: String,
    /// tiny, small, qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-3b or qwen2.5-7b.
    #[arg(long, default_value = "tiny")]
    size: String,
    /// f32, f16, q4_0, q8_0 or q4_k_m (llama.cpp's mix, with its fallbacks for narrow rows).
    #[arg(long, default_value = "q8_0")]
    quant: String,
    /// Seed for the random weights.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Output file.
    #[arg(long)]
    out: PathBuf,
}

pub async fn fixture(a: FixtureArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.arch == "qwen2",
        "only the qwen2 architecture can be generated (got `{}`)",
        a.arch
    );
    let shape = FixtureShape::named(&a.size)?;
    let quant: QuantScheme = a.quant.parse().map_err(anyhow::Error::msg)?;
    let opts = FixtureOptions {
        shape,
        quant,
        seed: a.seed,
    };
    let out = a.out.clone();
    let started = std::time::Instant::now();
    tokio::task::spawn_blocking(move || {
        let progress = BarProgress::new();
        let n = opts.shape.tensors().len() as u64;
        progress.start(
            &format!("writing {} ({} {})", out.display(), opts.shape.name, quant),
            Some(n),
        );
        let r = write_fixture(&opts, &out, &|_, _| progress.advance(1));
        progress.finish();
        r
    })
    .await??;
    let info = GgufInfo::read(std::slice::from_ref(&a.out))?;
    println!(
        "wrote {} in {:.1}s: {} tensors, {} of weights ({}), vocab {}, {} layers",
        a.out.display(),
        started.elapsed().as_secs_f64(),
        info.n_tensors,
        human_bytes(info.tensor_bytes),
        info.type_mix(),
        info.shape.vocab,
        info.shape.layers
    );
    Ok(())
}

#[derive(Args)]
pub struct RequantizeArgs {
    /// Input GGUF.
    input: PathBuf,
    /// Output GGUF.
    output: PathBuf,
    /// q4_0 or q8_0.
    #[arg(long, default_value = "q4_0")]
    to: String,
}

pub async fn requantize(a: RequantizeArgs) -> anyhow::Result<()> {
    let (input, output, to) = (a.input.clone(), a.output.clone(), a.to.clone());
    let report = tokio::task::spawn_blocking(move || {
        let progress = BarProgress::new();
        let r = tidepool_models::requantize::requantize(&input, &output, &to, &|done, total| {
            if done == 1 {
                progress.start(&format!("requantizing to {to}"), Some(total as u64));
            }
            progress.advance(1);
        });
        progress.finish();
        r
    })
    .await?
    .with_context(|| format!("requantizing {}", a.input.display()))?;
    println!(
        "wrote {}: {} tensors converted, {} kept; {} -> {}",
        a.output.display(),
        report.converted,
        report.kept,
        human_bytes(report.bytes_before),
        human_bytes(report.bytes_after)
    );
    Ok(())
}
