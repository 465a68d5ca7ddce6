//! `tidepool models` and `tidepool pull`.

use clap::Args;
use tidepool_engine::DevicePreference;
use tidepool_models::catalog::Catalog;
use tidepool_models::model_source::ModelStore;

use tidepool::progress::BarProgress;

pub fn list() -> anyhow::Result<()> {
    let catalog = Catalog::builtin();
    let store = ModelStore::from_env();
    let device = DevicePreference::Auto.class();
    println!("{:<36} {:>9}  {:<9} SOURCE", "MODEL", "SIZE", "STATUS");
    for m in &catalog.models {
        let default_quant = m.default_quant_for(device);
        for v in &m.variants {
            let id = m.variant_id(v);
            let mark = if v.quant == default_quant {
                if m.id == catalog.default {
                    " (default)"
                } else {
                    " *"
                }
            } else {
                ""
            };
            let status = match store.find(m, v) {
                Some(_) => "pulled",
                None => "-",
            };
            let source = match (&m.repo, &m.pypi, &v.requantize_from) {
                (_, _, Some(from)) => format!("requantized from {from}"),
                (Some(repo), _, _) => format!("hf.co/{repo}"),
                (None, Some(p), _) => format!("pypi:{}=={}", p.package, p.version),
                (None, None, _) => String::new(),
            };
            println!(
                "{:<36} {:>6} MB  {:<9} {}",
                format!("{id}{mark}"),
                v.size_mb,
                status,
                source
            );
        }
    }
    println!(
        "\n`tidepool serve --model <id>` takes a model id (its device default quantization, marked *) or a\n\
         variant id from the first column. HF cache: {}; Tidepool's own models: {}",
        store.hf_cache.display(),
        store.home.join("models").display()
    );
    Ok(())
}

#[derive(Args)]
pub struct PullArgs {
    /// A catalog id (`qwen2.5-0.5b-instruct`) or variant id (`qwen2.5-0.5b-instruct-q8_0`).
    id: String,
    /// Choose the quantization for CPU even if a GPU is present.
    #[arg(long)]
    cpu: bool,
}

pub async fn pull(a: PullArgs) -> anyhow::Result<()> {
    let device = if a.cpu {
        DevicePreference::Cpu
    } else {
        DevicePreference::Auto
    };
    let (entry, variant) = Catalog::builtin().resolve(&a.id, device.class())?;
    let (entry, variant) = (entry.clone(), variant.clone());
    let store = ModelStore::from_env();
    let files = tokio::task::spawn_blocking(move || {
        let progress = BarProgress::new();
        store.pull(&entry, &variant, &progress)
    })
    .await??;
    for f in files {
        println!("{}", f.display());
    }
    Ok(())
}
