//! Apple GPUs through Metal: the unified-memory budget Metal recommends for this process
//! (`recommendedMaxWorkingSetSize`) and what is allocated against it. macOS only; this module is
//! not compiled on the Linux build machines (docs/elasticity.md).

use super::{GpuReading, GpuReadings, GpuSource};

/// The system's default Metal device.
pub struct MetalGpu {
    device: Option<metal::Device>,
}

impl MetalGpu {
    pub fn open() -> MetalGpu {
        MetalGpu {
            device: metal::Device::system_default(),
        }
    }
}

impl GpuSource for MetalGpu {
    fn read(&mut self) -> GpuReadings {
        let Some(d) = &self.device else {
            return GpuReadings::Absent {
                reason: "Metal reports no device".into(),
            };
        };
        let total = d.recommended_max_working_set_size();
        let used = d.current_allocated_size();
        GpuReadings::Present {
            gpus: vec![GpuReading {
                index: 0,
                name: d.name().to_string(),
                total_bytes: total,
                free_bytes: total.saturating_sub(used),
                celsius: None,
                utilization_percent: None,
                power_watts: None,
                throttle_reasons: Vec::new(),
            }],
        }
    }
}

// SAFETY: a MTLDevice is documented as thread-safe; the source is only read from the control loop.
unsafe impl Send for MetalGpu {}
