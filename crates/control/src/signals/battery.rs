//! The battery through starship-battery (on Linux it reads /sys/class/power_supply; macOS,
//! Windows and the BSDs have their own backends in the crate).

use starship_battery::units::energy::watt_hour;
use starship_battery::units::time::second;
use starship_battery::{Manager, State};

use super::{BatteryReading, BatterySource};

/// The OS's batteries, combined into one reading.
pub struct OsBattery {
    manager: Result<Manager, String>,
    /// The last absence reason logged, so an absent battery is said once, not every tick.
    said: Option<String>,
}

impl OsBattery {
    pub fn new() -> OsBattery {
        OsBattery {
            manager: Manager::new().map_err(|e| e.to_string()),
            said: None,
        }
    }

    fn absent(&mut self, reason: String) -> BatteryReading {
        if self.said.as_deref() != Some(&reason) {
            tracing::info!("battery: {reason}");
            self.said = Some(reason.clone());
        }
        BatteryReading::Absent { reason }
    }
}

impl Default for OsBattery {
    fn default() -> Self {
        Self::new()
    }
}

impl BatterySource for OsBattery {
    fn read(&mut self) -> BatteryReading {
        let batteries = match &self.manager {
            Ok(m) => m.batteries().map_err(|e| e.to_string()),
            Err(e) => Err(e.clone()),
        };
        let batteries: Vec<_> = match batteries {
            Ok(b) => b.filter_map(Result::ok).collect(),
            Err(e) => return self.absent(format!("the OS battery interface failed: {e}")),
        };
        if batteries.is_empty() {
            return self.absent("no battery on this machine".into());
        }
        self.said = None;
        let (mut energy, mut full) = (0.0f64, 0.0f64);
        let mut discharging = false;
        let mut to_empty: Option<f64> = None;
        for b in &batteries {
            energy += b.energy().get::<watt_hour>() as f64;
            full += b.energy_full().get::<watt_hour>() as f64;
            if b.state() == State::Discharging {
                discharging = true;
                if let Some(t) = b.time_to_empty() {
                    *to_empty.get_or_insert(0.0) += t.get::<second>() as f64;
                }
            }
        }
        BatteryReading::Present {
            on_ac: !discharging,
            percent: if full > 0.0 {
                (100.0 * energy / full).clamp(0.0, 100.0) as f32
            } else {
                0.0
            },
            time_to_empty_s: to_empty,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On this build machine (a VM) there is no battery: that must read as absent, not fail.
    /// On a laptop it reads as present with a sane charge.
    #[test]
    fn the_real_battery_reads_as_absent_or_sane() {
        let mut b = OsBattery::new();
        match b.read() {
            BatteryReading::Absent { reason } => assert!(!reason.is_empty()),
            BatteryReading::Present { percent, .. } => assert!((0.0..=100.0).contains(&percent)),
        }
        // A second read says the same without logging again.
        let again = b.read();
        assert_eq!(
            matches!(again, BatteryReading::Absent { .. }),
            b.said.is_some()
        );
    }
}
