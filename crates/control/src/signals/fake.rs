//! Scripted sources for tests: a test holds a handle and changes what the next read returns
//! (unplug the charger, drain the battery, heat the CPU), then drives the real policy and pool.

use std::sync::{Arc, Mutex};

use super::{
    BatteryReading, BatterySource, GpuReadings, GpuSource, Machine, Sensor, SystemReading,
    SystemSource,
};

/// A handle to change what the fake machine reads.
#[derive(Clone)]
pub struct FakeMachine {
    system: Arc<Mutex<SystemReading>>,
    battery: Arc<Mutex<BatteryReading>>,
    gpus: Arc<Mutex<GpuReadings>>,
}

struct Shared<T>(Arc<Mutex<T>>);

impl SystemSource for Shared<SystemReading> {
    fn read(&mut self) -> SystemReading {
        self.0.lock().unwrap().clone()
    }
}

impl BatterySource for Shared<BatteryReading> {
    fn read(&mut self) -> BatteryReading {
        self.0.lock().unwrap().clone()
    }
}

impl GpuSource for Shared<GpuReadings> {
    fn read(&mut self) -> GpuReadings {
        self.0.lock().unwrap().clone()
    }
}

impl FakeMachine {
    /// A plugged-in machine at 50 °C with 4 cores, 16 GiB free, a full battery and no GPU.
    pub fn new() -> FakeMachine {
        FakeMachine {
            system: Arc::new(Mutex::new(SystemReading {
                cpu_percent: 10.0,
                per_core_percent: vec![10.0; 4],
                total_memory_bytes: 32 << 30,
                available_memory_bytes: 16 << 30,
                temperatures: vec![Sensor {
                    label: "fake cpu".into(),
                    celsius: 50.0,
                }],
            })),
            battery: Arc::new(Mutex::new(BatteryReading::Present {
                on_ac: true,
                percent: 100.0,
                time_to_empty_s: None,
            })),
            gpus: Arc::new(Mutex::new(GpuReadings::Absent {
                reason: "fake machine without GPU".into(),
            })),
        }
    }

    /// The sources to hand to the control loop.
    pub fn machine(&self) -> Machine {
        Machine {
            system: Box::new(Shared(self.system.clone())),
            battery: Box::new(Shared(self.battery.clone())),
            gpus: Box::new(Shared(self.gpus.clone())),
        }
    }

    pub fn set_battery(&self, on_ac: bool, percent: f32) {
        *self.battery.lock().unwrap() = BatteryReading::Present {
            on_ac,
            percent,
            time_to_empty_s: (!on_ac).then_some(percent as f64 * 60.0),
        };
    }

    pub fn remove_battery(&self) {
        *self.battery.lock().unwrap() = BatteryReading::Absent {
            reason: "fake machine without battery".into(),
        };
    }

    pub fn set_celsius(&self, celsius: f32) {
        self.system.lock().unwrap().temperatures = vec![Sensor {
            label: "fake cpu".into(),
            celsius,
        }];
    }

    pub fn set_gpus(&self, gpus: GpuReadings) {
        *self.gpus.lock().unwrap() = gpus;
    }
}

impl Default for FakeMachine {
    fn default() -> Self {
        Self::new()
    }
}
