//! NVIDIA GPUs through NVML, which nvml-wrapper loads at run time (libnvidia-ml), so one binary
//! runs with or without the driver: without it the source reads as absent.

use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::Nvml;

use super::{GpuReading, GpuReadings, GpuSource};

/// The real GPU source of this platform: Metal on macOS, NVML elsewhere.
pub fn real_source() -> Box<dyn GpuSource> {
    #[cfg(target_os = "macos")]
    return Box::new(super::metal::MetalGpu::open());
    #[cfg(not(target_os = "macos"))]
    Box::new(NvmlGpus::open())
}

/// NVML, opened once.
pub struct NvmlGpus {
    nvml: Result<Nvml, String>,
}

impl NvmlGpus {
    pub fn open() -> NvmlGpus {
        let nvml = Nvml::init().map_err(|e| format!("NVML is not available ({e})"));
        match &nvml {
            Ok(n) => tracing::info!(
                devices = n.device_count().unwrap_or(0),
                "NVML loaded: reading NVIDIA GPUs"
            ),
            Err(e) => tracing::info!("no NVIDIA GPU readings: {e}"),
        }
        NvmlGpus { nvml }
    }
}

impl GpuSource for NvmlGpus {
    fn read(&mut self) -> GpuReadings {
        let nvml = match &self.nvml {
            Ok(n) => n,
            Err(e) => return GpuReadings::Absent { reason: e.clone() },
        };
        let count = match nvml.device_count() {
            Ok(0) => {
                return GpuReadings::Absent {
                    reason: "NVML reports no device".into(),
                }
            }
            Ok(n) => n,
            Err(e) => {
                return GpuReadings::Absent {
                    reason: format!("NVML could not count devices: {e}"),
                }
            }
        };
        let gpus = (0..count)
            .filter_map(|i| {
                let d = nvml.device_by_index(i).ok()?;
                let mem = d.memory_info().ok()?;
                Some(GpuReading {
                    index: i,
                    name: d.name().unwrap_or_else(|_| format!("GPU {i}")),
                    total_bytes: mem.total,
                    free_bytes: mem.free,
                    celsius: d.temperature(TemperatureSensor::Gpu).ok().map(|t| t as f32),
                    utilization_percent: d.utilization_rates().ok().map(|u| u.gpu),
                    power_watts: d.power_usage().ok().map(|mw| mw as f32 / 1000.0),
                    throttle_reasons: d
                        .current_throttle_reasons()
                        .map(|r| r.iter_names().map(|(n, _)| n.to_lowercase()).collect())
                        .unwrap_or_default(),
                })
            })
            .collect();
        GpuReadings::Present { gpus }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without the NVIDIA driver (this build machine) NVML reads as absent with a reason; with it,
    /// every GPU has sane memory readings.
    #[test]
    fn nvml_reads_as_absent_or_sane() {
        match NvmlGpus::open().read() {
            GpuReadings::Absent { reason } => assert!(!reason.is_empty()),
            GpuReadings::Present { gpus } => {
                for g in gpus {
                    assert!(g.total_bytes > 0 && g.free_bytes <= g.total_bytes, "{g:?}");
                }
            }
        }
    }
}
