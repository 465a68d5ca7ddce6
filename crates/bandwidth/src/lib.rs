//! STREAM-style memory bandwidth kernels (McCalpin's Copy, Scale, Add, Triad, plus Read), the
//! physical limit of CPU decoding: generating one token reads every weight once, so no engine
//! decodes faster than `bandwidth / bytes read per token`.
//!
//! A crate of its own so that it is compiled with optimizations even in dev builds (the
//! workspace's `[profile.dev.package.tidepool-bandwidth]`), like the inference kernels it is the
//! yardstick for; `tidepool bench bandwidth` is its command-line face.

use std::hint::black_box;
use std::time::Instant;

use serde::Serialize;

/// One STREAM kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kernel {
    Read,
    Copy,
    Scale,
    Add,
    Triad,
}

impl Kernel {
    pub const ALL: [Kernel; 5] = [
        Kernel::Read,
        Kernel::Copy,
        Kernel::Scale,
        Kernel::Add,
        Kernel::Triad,
    ];

    /// Arrays read plus arrays written per element (STREAM's byte count).
    pub fn arrays_touched(self) -> usize {
        match self {
            Kernel::Read => 1,
            Kernel::Copy | Kernel::Scale => 2,
            Kernel::Add | Kernel::Triad => 3,
        }
    }
}

/// Runs one kernel over `a`, `b`, `c` (equal lengths). Returns a value that depends on the work
/// done, so the compiler cannot drop it.
pub fn run_kernel(kernel: Kernel, a: &mut [f32], b: &[f32], c: &[f32]) -> f32 {
    const Q: f32 = 3.0;
    match kernel {
        Kernel::Read => {
            // 32 independent accumulators (four 8-lane vectors) let the loop vectorize and hide
            // the latency of the adds, so it is bound by memory, not by one dependency chain.
            let mut acc = [0.0f32; 32];
            let chunks = a.chunks_exact(32);
            let tail: f32 = chunks.remainder().iter().sum();
            for ch in chunks {
                for (s, x) in acc.iter_mut().zip(ch) {
                    *s += x;
                }
            }
            acc.iter().sum::<f32>() + tail
        }
        Kernel::Copy => {
            a.copy_from_slice(b);
            a[0]
        }
        Kernel::Scale => {
            for (x, y) in a.iter_mut().zip(b) {
                *x = Q * y;
            }
            a[0]
        }
        Kernel::Add => {
            for ((x, y), z) in a.iter_mut().zip(b).zip(c) {
                *x = y + z;
            }
            a[0]
        }
        Kernel::Triad => {
            for ((x, y), z) in a.iter_mut().zip(b).zip(c) {
                *x = y + Q * z;
            }
            a[0]
        }
    }
}

/// Runs `kernel` once over the arrays split into `threads` contiguous parts, one thread each.
pub fn parallel_pass(kernel: Kernel, a: &mut [f32], b: &[f32], c: &[f32], threads: usize) -> f32 {
    if threads <= 1 {
        return run_kernel(kernel, a, b, c);
    }
    let part = a.len().div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = a
            .chunks_mut(part)
            .zip(b.chunks(part))
            .zip(c.chunks(part))
            .map(|((a, b), c)| s.spawn(move || run_kernel(kernel, a, b, c)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
    })
}

/// Times `reps` passes of `kernel` (after one untimed pass), in seconds each.
pub fn measure(
    kernel: Kernel,
    arrays: &mut [Vec<f32>; 3],
    threads: usize,
    reps: usize,
) -> Vec<f64> {
    let [a, b, c] = arrays;
    black_box(parallel_pass(kernel, a, b, c, threads));
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            black_box(parallel_pass(kernel, black_box(a), b, c, threads));
            t.elapsed().as_secs_f64()
        })
        .collect()
}

/// GB/s (10^9 bytes per second) from one pass's bytes and its time.
pub fn gb_s(bytes: usize, seconds: f64) -> f64 {
    bytes as f64 / seconds.max(1e-12) / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_compute_what_stream_defines() {
        let b: Vec<f32> = (0..37).map(|i| i as f32).collect();
        let c: Vec<f32> = (0..37).map(|i| 2.0 * i as f32).collect();
        let mut a = vec![0.0f32; 37];
        run_kernel(Kernel::Copy, &mut a, &b, &c);
        assert_eq!(a, b);
        run_kernel(Kernel::Scale, &mut a, &b, &c);
        assert_eq!(a[5], 15.0);
        run_kernel(Kernel::Add, &mut a, &b, &c);
        assert_eq!(a[5], 15.0);
        run_kernel(Kernel::Triad, &mut a, &b, &c);
        assert_eq!(a[36], 36.0 + 3.0 * 72.0);
        let sum = run_kernel(Kernel::Read, &mut a, &b, &c);
        let expected: f32 = a.iter().sum();
        assert!((sum - expected).abs() < 1e-2, "{sum} vs {expected}");
    }

    #[test]
    fn parallel_passes_cover_every_element_once() {
        let n = 1001;
        let b = vec![1.0f32; n];
        let c = vec![1.0f32; n];
        let mut a = vec![0.0f32; n];
        parallel_pass(Kernel::Add, &mut a, &b, &c, 3);
        assert!(a.iter().all(|&x| x == 2.0));
        assert_eq!(
            parallel_pass(Kernel::Read, &mut a, &b, &c, 4),
            2.0 * n as f32
        );
    }

    #[test]
    fn bytes_follow_streams_counting() {
        assert_eq!(Kernel::Read.arrays_touched(), 1);
        assert_eq!(Kernel::Copy.arrays_touched(), 2);
        assert_eq!(Kernel::Triad.arrays_touched(), 3);
        assert!((gb_s(2_000_000_000, 1.0) - 2.0).abs() < 1e-9);
    }
}
