//! Power modes and thermal limits: a pure function of the machine's readings (battery, AC,
//! temperatures) and the `[power]` config to the limits the pool runs under, with the reason for
//! each. A laptop on battery or a hot fanless box is not run like a plugged-in workstation.
//!
//! - Modes: `performance` (no caps), `balanced`, `power-saver`, and `auto`, which follows the
//!   battery: performance on AC, balanced on battery, power-saver below `saver_below_percent`.
//!   Each mode caps workers, slots per worker and CPU cores, and on battery the idle TTL is
//!   shortened and scheduled pre-scaling pauses.
//! - Thermal: at `warn_c` the pool stops growing; at `critical_c` it sheds load (one worker, the
//!   batch class refused). Each level is left only once the temperature is `hysteresis_c` below
//!   the level's threshold, so a sensor hovering at a threshold does not make the pool oscillate.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::signals::MachineReading;

/// The configured power mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PowerMode {
    Performance,
    Balanced,
    PowerSaver,
    /// Follows AC and the battery's charge.
    #[default]
    Auto,
}

impl PowerMode {
    pub const ALL: [PowerMode; 4] = [
        PowerMode::Performance,
        PowerMode::Balanced,
        PowerMode::PowerSaver,
        PowerMode::Auto,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PowerMode::Performance => "performance",
            PowerMode::Balanced => "balanced",
            PowerMode::PowerSaver => "power-saver",
            PowerMode::Auto => "auto",
        }
    }
}

impl fmt::Display for PowerMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for PowerMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        PowerMode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| {
                format!("unknown power mode `{s}`: use performance, balanced, power-saver or auto")
            })
    }
}

/// What one mode allows; unset means no cap from this mode.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModeCaps {
    pub max_workers: Option<usize>,
    /// Concurrent sequences admitted per worker.
    pub slots_per_worker: Option<usize>,
    /// CPU cores the inference threads may run on.
    pub cpu_threads: Option<usize>,
}

/// Temperature limits, in °C, over the hottest CPU sensor or GPU.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ThermalConfig {
    /// The pool stops growing at this temperature.
    pub warn_c: f32,
    /// The pool sheds load (one worker, batch class refused) at this temperature.
    pub critical_c: f32,
    /// A level is left only this far below its threshold.
    pub hysteresis_c: f32,
}

impl Default for ThermalConfig {
    fn default() -> Self {
        ThermalConfig {
            warn_c: 85.0,
            critical_c: 95.0,
            hysteresis_c: 5.0,
        }
    }
}

/// The `[power]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PowerConfig {
    pub mode: PowerMode,
    /// In auto mode on battery, power-saver below this charge (percent).
    pub saver_below_percent: f32,
    pub balanced: ModeCaps,
    pub power_saver: ModeCaps,
    /// On battery, workers idle this long are stopped (when shorter than the policy's TTL).
    pub battery_idle_ttl_s: f64,
    /// Whether scheduled pre-scaling still applies on battery.
    pub prescale_on_battery: bool,
    pub thermal: ThermalConfig,
}

impl Default for PowerConfig {
    fn default() -> Self {
        PowerConfig::for_cores(tidepool_engine::available_cores())
    }
}

impl PowerConfig {
    /// Defaults for a machine with `cores` cores: balanced keeps half the workers and three
    /// quarters of the cores; power-saver one worker with one slot on one core.
    pub fn for_cores(cores: usize) -> PowerConfig {
        let cores = cores.max(1);
        PowerConfig {
            mode: PowerMode::Auto,
            saver_below_percent: 20.0,
            balanced: ModeCaps {
                max_workers: Some(cores.div_ceil(2).clamp(1, 2)),
                slots_per_worker: None,
                cpu_threads: Some((cores - cores / 4).max(1)),
            },
            power_saver: ModeCaps {
                max_workers: Some(1),
                slots_per_worker: Some(1),
                cpu_threads: Some(1),
            },
            battery_idle_ttl_s: 120.0,
            prescale_on_battery: false,
            thermal: ThermalConfig::default(),
        }
    }

    /// Checks values; on error, (key, message).
    pub fn validate(&self) -> Result<(), tidepool_bounds::Invalid> {
        use tidepool_bounds::{float, int, seconds};
        let t = &self.thermal;
        let key = |k: &str| format!("power.{k}");
        float(
            &key("saver_below_percent"),
            self.saver_below_percent.into(),
            0.0,
            100.0,
        )?;
        seconds(&key("battery_idle_ttl_s"), self.battery_idle_ttl_s, false)?;
        float(
            &key("thermal.hysteresis_c"),
            t.hysteresis_c.into(),
            0.0,
            100.0,
        )?;
        float(&key("thermal.warn_c"), t.warn_c.into(), -50.0, 200.0)?;
        float(
            &key("thermal.critical_c"),
            t.critical_c.into(),
            -50.0,
            200.0,
        )?;
        if t.warn_c >= t.critical_c {
            return Err((
                key("thermal.warn_c"),
                format!(
                    "must be below thermal.critical_c ({} °C), got {} °C",
                    t.critical_c, t.warn_c
                ),
            ));
        }
        for (name, caps) in [
            ("balanced", &self.balanced),
            ("power_saver", &self.power_saver),
        ] {
            for (k, v) in [
                ("max_workers", caps.max_workers),
                ("slots_per_worker", caps.slots_per_worker),
                ("cpu_threads", caps.cpu_threads),
            ] {
                if let Some(v) = v {
                    int(&key(&format!("{name}.{k}")), v as u64, 1, 1024)?;
                }
            }
        }
        Ok(())
    }

    fn caps(&self, mode: PowerMode) -> ModeCaps {
        match mode {
            PowerMode::Balanced => self.balanced,
            PowerMode::PowerSaver => self.power_saver,
            PowerMode::Performance | PowerMode::Auto => ModeCaps::default(),
        }
    }
}

/// How hot the machine is, relative to the configured limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ThermalLevel {
    #[default]
    Normal,
    /// At or above `warn_c`: no growth.
    Warm,
    /// At or above `critical_c`: shed load.
    Critical,
}

/// The limits the pool runs under now, and why.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct PowerState {
    /// The configured mode.
    pub mode: PowerMode,
    /// The mode in force (auto resolved).
    pub effective: PowerMode,
    pub on_battery: bool,
    pub battery_percent: Option<f32>,
    pub celsius: Option<f32>,
    pub thermal: ThermalLevel,
    /// Workers allowed (mode and heat together).
    pub max_workers: Option<usize>,
    pub slots_per_worker: Option<usize>,
    pub cpu_threads: Option<usize>,
    /// Idle TTL in force on battery.
    pub idle_ttl_s: Option<f64>,
    /// No new workers (too warm).
    pub no_growth: bool,
    /// Refuse the batch class (critical heat).
    pub shed: bool,
    pub pause_schedule: bool,
    /// One line for decisions and the dashboard.
    pub reason: String,
}

/// The power mode's memory: the thermal level with its hysteresis.
#[derive(Debug, Clone, Default)]
pub struct Governor {
    thermal: ThermalLevel,
}

impl Governor {
    pub fn new() -> Governor {
        Governor::default()
    }

    /// The limits for this reading.
    pub fn update(&mut self, cfg: &PowerConfig, reading: &MachineReading) -> PowerState {
        let on_battery = reading.battery.discharging();
        let percent = reading.battery.percent();
        let effective = match cfg.mode {
            PowerMode::Auto if !on_battery => PowerMode::Performance,
            PowerMode::Auto if percent.is_some_and(|p| p < cfg.saver_below_percent) => {
                PowerMode::PowerSaver
            }
            PowerMode::Auto => PowerMode::Balanced,
            m => m,
        };
        let caps = cfg.caps(effective);
        let celsius = reading.max_celsius();
        self.thermal = next_level(self.thermal, celsius, &cfg.thermal);

        let mut why = match (cfg.mode, on_battery, percent) {
            (PowerMode::Auto, true, Some(p)) => format!("auto: {effective} on battery at {p:.0} %"),
            (PowerMode::Auto, _, _) => format!("auto: {effective} on AC"),
            (m, true, Some(p)) => format!("{m} mode, on battery at {p:.0} %"),
            (m, _, _) => format!("{m} mode"),
        };
        let mut max_workers = caps.max_workers;
        match self.thermal {
            ThermalLevel::Normal => {}
            ThermalLevel::Warm => {
                why += &format!(
                    "; {:.0} °C reached the warning {:.0} °C: not growing until below {:.0} °C",
                    celsius.unwrap_or_default(),
                    cfg.thermal.warn_c,
                    cfg.thermal.warn_c - cfg.thermal.hysteresis_c
                )
            }
            ThermalLevel::Critical => {
                max_workers = Some(1);
                why += &format!(
                    "; {:.0} °C reached the critical {:.0} °C: shedding to one worker, batch refused until below {:.0} °C",
                    celsius.unwrap_or_default(),
                    cfg.thermal.critical_c,
                    cfg.thermal.critical_c - cfg.thermal.hysteresis_c
                );
            }
        }
        PowerState {
            mode: cfg.mode,
            effective,
            on_battery,
            battery_percent: percent,
            celsius,
            thermal: self.thermal,
            max_workers,
            slots_per_worker: caps.slots_per_worker,
            cpu_threads: caps.cpu_threads,
            idle_ttl_s: on_battery.then_some(cfg.battery_idle_ttl_s),
            no_growth: self.thermal != ThermalLevel::Normal,
            shed: self.thermal == ThermalLevel::Critical,
            pause_schedule: on_battery && !cfg.prescale_on_battery,
            reason: why,
        }
    }
}

/// The thermal state machine: levels are entered at their threshold and left `hysteresis_c`
/// below it. No reading means no thermal limit.
fn next_level(now: ThermalLevel, celsius: Option<f32>, t: &ThermalConfig) -> ThermalLevel {
    let Some(c) = celsius else {
        return ThermalLevel::Normal;
    };
    let entered = if c >= t.critical_c {
        ThermalLevel::Critical
    } else if c >= t.warn_c {
        ThermalLevel::Warm
    } else {
        ThermalLevel::Normal
    };
    let held = match now {
        ThermalLevel::Critical if c >= t.critical_c - t.hysteresis_c => ThermalLevel::Critical,
        ThermalLevel::Critical | ThermalLevel::Warm if c >= t.warn_c - t.hysteresis_c => {
            ThermalLevel::Warm
        }
        _ => ThermalLevel::Normal,
    };
    entered.max_level(held)
}

impl ThermalLevel {
    fn rank(self) -> u8 {
        match self {
            ThermalLevel::Normal => 0,
            ThermalLevel::Warm => 1,
            ThermalLevel::Critical => 2,
        }
    }

    fn max_level(self, other: ThermalLevel) -> ThermalLevel {
        if other.rank() > self.rank() {
            other
        } else {
            self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signals::{BatteryReading, GpuReadings, Sensor, SystemReading};

    fn reading(battery: Option<(bool, f32)>, celsius: Option<f32>) -> MachineReading {
        MachineReading {
            system: SystemReading {
                temperatures: celsius
                    .map(|c| {
                        vec![Sensor {
                            label: "cpu".into(),
                            celsius: c,
                        }]
                    })
                    .unwrap_or_default(),
                ..SystemReading::default()
            },
            battery: match battery {
                Some((on_ac, percent)) => BatteryReading::Present {
                    on_ac,
                    percent,
                    time_to_empty_s: None,
                },
                None => BatteryReading::Absent {
                    reason: "none".into(),
                },
            },
            gpus: GpuReadings::Absent {
                reason: "none".into(),
            },
        }
    }

    #[test]
    fn auto_follows_ac_and_charge() {
        let cfg = PowerConfig::for_cores(8);
        let mut g = Governor::new();
        let s = g.update(&cfg, &reading(Some((true, 60.0)), None));
        assert_eq!(s.effective, PowerMode::Performance);
        assert_eq!(s.max_workers, None);
        assert!(!s.pause_schedule && s.idle_ttl_s.is_none());

        let s = g.update(&cfg, &reading(Some((false, 60.0)), None));
        assert_eq!(s.effective, PowerMode::Balanced);
        assert_eq!(s.max_workers, Some(2));
        assert_eq!(s.cpu_threads, Some(6));
        assert_eq!(s.idle_ttl_s, Some(120.0));
        assert!(s.pause_schedule);
        assert!(s.reason.contains("on battery at 60 %"), "{}", s.reason);

        let s = g.update(&cfg, &reading(Some((false, 15.0)), None));
        assert_eq!(s.effective, PowerMode::PowerSaver);
        assert_eq!(
            (s.max_workers, s.slots_per_worker, s.cpu_threads),
            (Some(1), Some(1), Some(1))
        );

        // No battery at all: a desktop is always on AC.
        let s = g.update(&cfg, &reading(None, None));
        assert_eq!(s.effective, PowerMode::Performance);
    }

    #[test]
    fn a_fixed_mode_ignores_the_battery_but_still_shortens_the_idle_ttl() {
        let cfg = PowerConfig {
            mode: PowerMode::Performance,
            prescale_on_battery: true,
            ..PowerConfig::for_cores(4)
        };
        let s = Governor::new().update(&cfg, &reading(Some((false, 5.0)), None));
        assert_eq!(s.effective, PowerMode::Performance);
        assert_eq!(s.max_workers, None);
        assert_eq!(s.idle_ttl_s, Some(120.0));
        assert!(!s.pause_schedule);
    }

    #[test]
    fn thermal_levels_have_hysteresis() {
        let cfg = PowerConfig::for_cores(4);
        let mut g = Governor::new();
        let mut level = |c: f32| {
            let s = g.update(&cfg, &reading(None, Some(c)));
            (s.thermal, s.max_workers, s.no_growth, s.shed)
        };
        assert_eq!(level(70.0), (ThermalLevel::Normal, None, false, false));
        assert_eq!(level(86.0), (ThermalLevel::Warm, None, true, false));
        // Just under the warning is still warm (hysteresis 5 °C).
        assert_eq!(level(82.0).0, ThermalLevel::Warm);
        assert_eq!(level(96.0), (ThermalLevel::Critical, Some(1), true, true));
        // 91 °C is under critical but inside its band: still shedding.
        assert_eq!(level(91.0).0, ThermalLevel::Critical);
        // Below the band: warm again (still above warn - hysteresis).
        assert_eq!(level(89.0).0, ThermalLevel::Warm);
        assert_eq!(level(79.0).0, ThermalLevel::Normal);
        // A sensor noisy around the warning does not flap once inside the band.
        assert_eq!(level(85.5).0, ThermalLevel::Warm);
        for c in [84.0, 85.2, 83.1, 85.9, 81.0] {
            assert_eq!(level(c).0, ThermalLevel::Warm, "{c}");
        }
        // No sensor: no thermal limit.
        assert_eq!(level(f32::NAN).0, ThermalLevel::Normal);
    }

    #[test]
    fn validation_names_the_key() {
        let mut cfg = PowerConfig::for_cores(2);
        cfg.thermal.warn_c = 99.0;
        assert_eq!(cfg.validate().unwrap_err().0, "power.thermal.warn_c");
        let mut cfg = PowerConfig::for_cores(2);
        cfg.power_saver.cpu_threads = Some(0);
        assert_eq!(
            cfg.validate().unwrap_err().0,
            "power.power_saver.cpu_threads"
        );
        assert!("turbo".parse::<PowerMode>().is_err());
        assert_eq!("power-saver".parse(), Ok(PowerMode::PowerSaver));
    }
}
