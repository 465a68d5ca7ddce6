//! CPU load, memory and temperature sensors through sysinfo.

use sysinfo::{Components, CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};

use super::{Sensor, SystemReading, SystemSource};

/// sysinfo's view of this machine. CPU usage is measured between two reads, so the first read
/// reports the load since this source was made.
pub struct Sysinfo {
    system: System,
    components: Components,
}

impl Sysinfo {
    pub fn new() -> Sysinfo {
        let system = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing().with_cpu_usage())
                .with_memory(MemoryRefreshKind::nothing().with_ram()),
        );
        let components = Components::new_with_refreshed_list();
        if components.iter().all(|c| c.temperature().is_none()) {
            tracing::info!(
                "no temperature sensor readable on this machine; thermal limits are off"
            );
        }
        Sysinfo { system, components }
    }
}

impl Default for Sysinfo {
    fn default() -> Self {
        Self::new()
    }
}

impl SystemSource for Sysinfo {
    fn read(&mut self) -> SystemReading {
        self.system.refresh_cpu_usage();
        self.system.refresh_memory();
        self.components.refresh(false);
        SystemReading {
            cpu_percent: self.system.global_cpu_usage(),
            per_core_percent: self.system.cpus().iter().map(|c| c.cpu_usage()).collect(),
            total_memory_bytes: self.system.total_memory(),
            available_memory_bytes: self.system.available_memory(),
            temperatures: self
                .components
                .iter()
                .filter_map(|c| {
                    let t = c.temperature()?;
                    // Some drivers report 0 or absurd values for absent probes.
                    (t.is_finite() && t > 0.0 && t < 150.0).then(|| Sensor {
                        label: c.label().to_string(),
                        celsius: t,
                    })
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_on_this_machine_are_sane() {
        let mut s = Sysinfo::new();
        std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL);
        let r = s.read();
        let cores = std::thread::available_parallelism().unwrap().get();
        assert!(r.per_core_percent.len() >= cores, "{r:?}");
        assert!((0.0..=100.0).contains(&r.cpu_percent), "{r:?}");
        assert!(r.per_core_percent.iter().all(|p| (0.0..=100.0).contains(p)));
        assert!(r.total_memory_bytes > 64 << 20, "{r:?}");
        assert!(r.available_memory_bytes > 0 && r.available_memory_bytes <= r.total_memory_bytes);
        // Sensors are optional (none in a VM), but what is reported is in range.
        assert!(r
            .temperatures
            .iter()
            .all(|t| t.celsius > 0.0 && t.celsius < 150.0));
    }
}
