//! `tidepool`: the command-line face of Tidepool.
//!
//! - `serve`: run the OpenAI-compatible server on a model.
//! - `models`, `pull`: the model catalog and downloads.
//! - `fixture`, `requantize`: make test models and fast-kernel variants.
//! - `bench`: measurements that print numbers.

mod bandwidth;
mod bench;
mod compare;
mod load;
mod models;
mod serve;
mod simulate;
mod stats;
mod tools;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tidepool",
    version,
    about = "Local elastic LLM inference: an OpenAI-compatible server over mistral.rs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (OpenAI-compatible API on loopback by default).
    Serve(serve::ServeArgs),
    /// List the model catalog and which models are downloaded.
    Models,
    /// Download a catalog model (with a progress bar).
    Pull(models::PullArgs),
    /// Write a random-weight GGUF with real shapes and a real tokenizer, for tests and benchmarks.
    Fixture(tools::FixtureArgs),
    /// Convert tensors in slow-on-CPU types (Q4_1, Q5_0, Q5_1) of a GGUF to Q4_0 or Q8_0.
    Requantize(tools::RequantizeArgs),
    /// Benchmarks that print numbers.
    Bench(bench::BenchArgs),
}

fn init_tracing() {
    let default = "info,mistralrs_core=warn,mistralrs_quant=warn,candle_core=warn,hf_hub=warn,tower_http=warn";
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(a) => serve::run(a).await,
            Command::Models => models::list(),
            Command::Pull(a) => models::pull(a).await,
            Command::Fixture(a) => tools::fixture(a).await,
            Command::Requantize(a) => tools::requantize(a).await,
            Command::Bench(a) => bench::run(a).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
