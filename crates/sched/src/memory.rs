//! Reading what the process really occupies, to check the ledger's estimates against.

/// Resident set size of this process in bytes (0 where the OS does not say).
pub fn process_rss_bytes() -> u64 {
    #[cfg(target_os = "linux")]
    {
        // /proc is cheaper and more precise than a sysinfo refresh.
        if let Ok(s) = std::fs::read_to_string("/proc/self/statm") {
            let page = 4096u64;
            if let Some(rss_pages) = s
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
            {
                return rss_pages * page;
            }
        }
    }
    let pid = sysinfo::Pid::from_u32(std::process::id());
    let mut sys = sysinfo::System::new();
    sys.refresh_processes(sysinfo::ProcessesToUpdate::Some(&[pid]), true);
    sys.process(pid).map(|p| p.memory()).unwrap_or(0)
}

/// CPU time this process has used (user + system, every thread), seconds; `None` where the OS
/// does not say.
pub fn process_cpu_seconds() -> Option<f64> {
    #[cfg(target_os = "linux")]
    {
        // Fields 14 and 15 of /proc/self/stat, after the parenthesised command name.
        let s = std::fs::read_to_string("/proc/self/stat").ok()?;
        let rest = &s[s.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        // SAFETY: sysconf only reads a configuration value.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        (hz > 0).then(|| ticks as f64 / hz as f64)
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// Memory the OS could give this process now (RAM available, not just free), bytes.
pub fn available_memory_bytes() -> u64 {
    let mut sys = sysinfo::System::new();
    sys.refresh_memory();
    sys.available_memory()
}

/// Asks the allocator to hand freed memory back to the OS. glibc keeps freed chunks in its arenas
/// (one per thread that allocated), so after a worker's engine is dropped the process RSS would not
/// fall without this.
pub fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Bytes as a short human string (MiB/GiB, binary units).
pub fn human_bytes(b: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    let b = b as f64;
    if b >= 1024.0 * MIB {
        format!("{:.2} GiB", b / (1024.0 * MIB))
    } else {
        format!("{:.1} MiB", b / MIB)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rss_is_plausible() {
        let rss = super::process_rss_bytes();
        assert!(rss > 1 << 20 && rss < 1 << 40, "rss = {rss}");
        assert_eq!(super::human_bytes(3 * 1024 * 1024), "3.0 MiB");
        #[cfg(target_os = "linux")]
        {
            let before = super::process_cpu_seconds().unwrap();
            // Burn some CPU: the count only goes up.
            let mut x = 0u64;
            for i in 0..50_000_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
            std::hint::black_box(x);
            let after = super::process_cpu_seconds().unwrap();
            assert!(after >= before && after > 0.0, "{before} -> {after}");
        }
    }
}
