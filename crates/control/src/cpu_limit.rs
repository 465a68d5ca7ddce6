//! Limits the CPU cores inference runs on, at run time.
//!
//! candle runs its CPU kernels on rayon's global thread pool, which is sized once per process,
//! and mistral.rs spawns each engine's thread itself behind private traits, so neither a pool per
//! worker nor a resized global pool is reachable from outside. What can change at run time is
//! where those threads may run: on Linux the limiter sets the CPU affinity of every thread of the
//! process (`sched_setaffinity` on each entry of `/proc/self/task`; threads started later inherit
//! it from their creator) to the first N cores it was allowed at start. The rayon pool keeps its
//! threads, but they share N cores, so compute, power draw and heat follow N. Elsewhere the limit
//! is reported as unsupported.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum CpuLimitError {
    #[error("limiting CPU cores is not supported on this platform")]
    Unsupported,
    #[error("setting the CPU affinity failed: {0}")]
    Os(std::io::Error),
}

/// The process's CPU cores, as allowed at start, and the limit applied now.
pub struct CpuLimiter {
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    allowed: Vec<usize>,
    current: Option<usize>,
}

impl CpuLimiter {
    /// Remembers the cores this process may run on now (the limit's upper bound).
    pub fn new() -> CpuLimiter {
        CpuLimiter {
            allowed: allowed_cpus(),
            current: None,
        }
    }

    /// Cores available without a limit.
    pub fn cores(&self) -> usize {
        self.allowed.len().max(1)
    }

    /// The limit in force (`None`: all cores).
    pub fn current(&self) -> Option<usize> {
        self.current
    }

    /// Runs every thread of the process on the first `cores` allowed cores, or on all of them
    /// for `None`. Returns the cores now in use. Does nothing if the limit is unchanged.
    pub fn apply(&mut self, cores: Option<usize>) -> Result<usize, CpuLimitError> {
        let cores = cores.map(|n| n.clamp(1, self.cores()));
        let effective = cores.filter(|&n| n < self.cores());
        if effective == self.current {
            return Ok(effective.unwrap_or(self.cores()));
        }
        set_process_affinity(&self.allowed[..effective.unwrap_or(self.allowed.len())])?;
        self.current = effective;
        Ok(effective.unwrap_or(self.cores()))
    }
}

impl Default for CpuLimiter {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(target_os = "linux")]
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most its size into it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return (0..available_cores()).collect();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

#[cfg(not(target_os = "linux"))]
fn allowed_cpus() -> Vec<usize> {
    (0..available_cores()).collect()
}

/// CPU cores this process may use now (at least 1): what the defaults that follow the machine
/// (workers, power-mode caps) are sized by.
pub use tidepool_engine::available_cores;

#[cfg(target_os = "linux")]
fn set_process_affinity(cpus: &[usize]) -> Result<(), CpuLimitError> {
    // SAFETY: as above; sched_setaffinity only reads the set.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        set
    };
    let tasks = std::fs::read_dir("/proc/self/task").map_err(CpuLimitError::Os)?;
    for task in tasks.flatten() {
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: see above.
        let rc =
            unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            // A thread that exited since the directory was read is not an error.
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(CpuLimitError::Os(e));
            }
        }
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn set_process_affinity(_cpus: &[usize]) -> Result<(), CpuLimitError> {
    Err(CpuLimitError::Unsupported)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn cpus_of_this_thread() -> usize {
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            assert_eq!(
                libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set),
                0
            );
            libc::CPU_COUNT(&set) as usize
        }
    }

    #[test]
    fn limits_every_thread_and_lifts_again() {
        let mut l = CpuLimiter::new();
        let all = l.cores();
        assert_eq!(cpus_of_this_thread(), all);
        if all == 1 {
            // Nothing to limit on one core: a limit of one is no limit.
            assert_eq!(l.apply(Some(1)).unwrap(), 1);
            assert_eq!(l.current(), None);
            return;
        }
        // A thread started before the limit is limited too.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (back_tx, back_rx) = std::sync::mpsc::channel();
        let other = std::thread::spawn(move || {
            rx.recv().unwrap();
            back_tx.send(cpus_of_this_thread()).unwrap();
        });
        assert_eq!(l.apply(Some(1)).unwrap(), 1);
        assert_eq!(l.current(), Some(1));
        assert_eq!(cpus_of_this_thread(), 1);
        tx.send(()).unwrap();
        assert_eq!(back_rx.recv().unwrap(), 1);
        other.join().unwrap();
        // A thread started after inherits it.
        assert_eq!(std::thread::spawn(cpus_of_this_thread).join().unwrap(), 1);
        assert_eq!(l.apply(None).unwrap(), all);
        assert_eq!(cpus_of_this_thread(), all);
        // More than there are means all of them.
        assert_eq!(l.apply(Some(all + 5)).unwrap(), all);
        assert_eq!(l.current(), None);
    }
}
