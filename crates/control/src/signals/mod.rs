//! What the machine says: CPU load, memory, temperatures, battery and GPUs. Each source is a
//! trait with a real implementation (sysinfo, the OS's battery, NVML loaded at run time, Metal on
//! macOS) and a scripted fake for tests ([`fake`]). A source that is not there (no battery, no
//! sensor, no NVIDIA driver) is a normal state, reported as absent with the reason, never an error
//! repeated every tick.

pub mod battery;
pub mod fake;
pub mod gpu;
#[cfg(target_os = "macos")]
pub mod metal;
pub mod system;

use serde::Serialize;

/// CPU, memory and temperature sensors.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SystemReading {
    /// Busy share of all cores, 0–100.
    pub cpu_percent: f32,
    /// Busy share of each core, 0–100.
    pub per_core_percent: Vec<f32>,
    pub total_memory_bytes: u64,
    pub available_memory_bytes: u64,
    /// Every temperature sensor that reports one: (label, °C).
    pub temperatures: Vec<Sensor>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sensor {
    pub label: String,
    pub celsius: f32,
}

impl SystemReading {
    /// The hottest sensor, if any reports.
    pub fn max_celsius(&self) -> Option<f32> {
        self.temperatures
            .iter()
            .map(|s| s.celsius)
            .fold(None, |m, c| Some(m.map_or(c, |m: f32| m.max(c))))
    }
}

/// The battery, as the OS reports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum BatteryReading {
    /// No battery (a desktop, a server, a VM), or the OS does not say.
    Absent { reason: String },
    Present {
        /// On mains power (charging, full, or not discharging).
        on_ac: bool,
        /// Charge, 0–100 (several batteries: their combined energy).
        percent: f32,
        /// Seconds to empty while discharging, where the OS estimates it.
        time_to_empty_s: Option<f64>,
    },
}

impl BatteryReading {
    /// On battery power: present and not on AC.
    pub fn discharging(&self) -> bool {
        matches!(self, BatteryReading::Present { on_ac: false, .. })
    }

    pub fn percent(&self) -> Option<f32> {
        match self {
            BatteryReading::Present { percent, .. } => Some(*percent),
            BatteryReading::Absent { .. } => None,
        }
    }
}

/// One GPU's readings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuReading {
    pub index: u32,
    pub name: String,
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub celsius: Option<f32>,
    /// GPU busy share, 0–100.
    pub utilization_percent: Option<u32>,
    pub power_watts: Option<f32>,
    /// Why the GPU is running below its clocks right now (empty when it is not).
    pub throttle_reasons: Vec<String>,
}

/// The machine's GPUs.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum GpuReadings {
    /// No GPU readings: no driver, no device, or a platform without the source.
    Absent {
        reason: String,
    },
    Present {
        gpus: Vec<GpuReading>,
    },
}

impl GpuReadings {
    pub fn gpus(&self) -> &[GpuReading] {
        match self {
            GpuReadings::Present { gpus } => gpus,
            GpuReadings::Absent { .. } => &[],
        }
    }

    /// Free memory on the GPU with the most of it.
    pub fn most_free_bytes(&self) -> Option<u64> {
        self.gpus().iter().map(|g| g.free_bytes).max()
    }

    pub fn max_celsius(&self) -> Option<f32> {
        self.gpus()
            .iter()
            .filter_map(|g| g.celsius)
            .fold(None, |m, c| Some(m.map_or(c, |m: f32| m.max(c))))
    }
}

/// Everything read at one tick.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MachineReading {
    pub system: SystemReading,
    pub battery: BatteryReading,
    pub gpus: GpuReadings,
}

impl MachineReading {
    /// The hottest reading of any CPU sensor or GPU.
    pub fn max_celsius(&self) -> Option<f32> {
        match (self.system.max_celsius(), self.gpus.max_celsius()) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }
}

/// CPU, memory and temperatures.
pub trait SystemSource: Send {
    fn read(&mut self) -> SystemReading;
}

/// The battery.
pub trait BatterySource: Send {
    fn read(&mut self) -> BatteryReading;
}

/// The GPUs.
pub trait GpuSource: Send {
    fn read(&mut self) -> GpuReadings;
}

/// The machine's sources, read together once per tick.
pub struct Machine {
    pub system: Box<dyn SystemSource>,
    pub battery: Box<dyn BatterySource>,
    pub gpus: Box<dyn GpuSource>,
}

impl Machine {
    /// The real sources of this machine. NVML is opened here, once: without a driver the GPU
    /// source simply reads as absent.
    pub fn real() -> Machine {
        Machine {
            system: Box::new(system::Sysinfo::new()),
            battery: Box::new(battery::OsBattery::new()),
            gpus: gpu::real_source(),
        }
    }

    pub fn read(&mut self) -> MachineReading {
        MachineReading {
            system: self.system.read(),
            battery: self.battery.read(),
            gpus: self.gpus.read(),
        }
    }
}
