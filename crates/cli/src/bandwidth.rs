//! `tidepool bench bandwidth`: STREAM-style memory bandwidth on 1 thread and on every core
//! Tidepool may use (kernels in the `tidepool-bandwidth` crate). Arrays are `f32`, sized well past
//! the last-level cache; each kernel runs `--reps` times and the best time is reported (STREAM's
//! convention), with the median beside it. The benchmark report divides each server's decode
//! speed by `bandwidth / bytes read per token`.

use clap::Args;
use serde::Serialize;
use tidepool_bandwidth::{gb_s, measure, Kernel};

#[derive(Args)]
pub struct BandwidthBench {
    /// Size of each array in MiB (three arrays are allocated). Keep it well above the CPU's
    /// last-level cache.
    #[arg(long, default_value_t = 256)]
    array_mib: usize,
    /// Timed repetitions of each kernel (after one untimed pass).
    #[arg(long, default_value_t = 10)]
    reps: usize,
    /// Thread counts to measure (default: 1 and every core this process may use).
    #[arg(long, value_delimiter = ',')]
    threads: Vec<usize>,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct BandwidthResult {
    kernel: Kernel,
    threads: usize,
    array_bytes: usize,
    /// Best of the timed repetitions, in GB/s (10^9 bytes).
    best_gb_s: f64,
    median_gb_s: f64,
}

pub fn run(b: BandwidthBench) -> anyhow::Result<()> {
    anyhow::ensure!(b.array_mib >= 1, "--array-mib must be at least 1");
    anyhow::ensure!(b.reps >= 1, "--reps must be at least 1");
    let cores = tidepool_engine::available_cores();
    let mut threads = if b.threads.is_empty() {
        vec![1, cores]
    } else {
        b.threads.clone()
    };
    threads.dedup();
    anyhow::ensure!(
        threads.iter().all(|&t| t >= 1),
        "--threads must be at least 1"
    );
    let n = b.array_mib * (1 << 20) / std::mem::size_of::<f32>();
    let array_bytes = n * std::mem::size_of::<f32>();
    eprintln!(
        "STREAM-style bandwidth: 3 arrays of {} MiB, {} timed reps, threads {:?}",
        b.array_mib, b.reps, threads
    );
    // Writing every element makes the OS back the pages before anything is timed.
    let mut arrays = [vec![1.0f32; n], vec![2.0f32; n], vec![0.5f32; n]];
    if !b.json {
        println!("| kernel | threads | best GB/s | median GB/s |");
        println!("|---|---|---|---|");
    }
    for &t in &threads {
        for kernel in Kernel::ALL {
            let times = measure(kernel, &mut arrays, t, b.reps);
            let bytes = kernel.arrays_touched() * array_bytes;
            let best = times.iter().copied().fold(f64::INFINITY, f64::min);
            let r = BandwidthResult {
                kernel,
                threads: t,
                array_bytes,
                best_gb_s: gb_s(bytes, best),
                median_gb_s: gb_s(bytes, crate::stats::median(times)),
            };
            if b.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "| {:?} | {} | {:.1} | {:.1} |",
                    r.kernel, r.threads, r.best_gb_s, r.median_gb_s
                );
            }
        }
    }
    Ok(())
}
