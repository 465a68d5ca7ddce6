//! Which engine serves a model: `[model] engine` / `tidepool serve --engine`, and what `auto`
//! decides.
//!
//! `auto` picks per device: on a GPU, mistral.rs (the llama.cpp engine is built CPU-only); on the
//! CPU, whichever engine decoded this model faster in a short measured probe. The probe's result is
//! kept in a small JSON file, keyed by (model file name and size, device, Tidepool version), so it
//! runs once per model and machine. Pure decisions and the file format here; running the probe is
//! the caller's (it needs both engines loaded).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use tidepool_models::catalog::DeviceClass;

/// An inference library Tidepool can serve with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// mistral.rs (candle kernels; CUDA, Metal or CPU).
    MistralRs,
    /// llama.cpp through `llama-cpp-2` (CPU in this build).
    LlamaCpp,
}

impl EngineKind {
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::MistralRs => "mistralrs",
            EngineKind::LlamaCpp => "llamacpp",
        }
    }

    /// Whether this build has the engine (each is a cargo feature of tidepool-engine).
    pub fn built(self) -> bool {
        match self {
            EngineKind::MistralRs => cfg!(feature = "mistralrs"),
            EngineKind::LlamaCpp => cfg!(feature = "llamacpp"),
        }
    }
}

/// The configured engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EngineSetting {
    /// Decide per device, by measured speed on the CPU.
    #[default]
    Auto,
    MistralRs,
    LlamaCpp,
}

impl std::str::FromStr for EngineSetting {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(EngineSetting::Auto),
            "mistralrs" => Ok(EngineSetting::MistralRs),
            "llamacpp" => Ok(EngineSetting::LlamaCpp),
            other => Err(format!(
                "unknown engine `{other}`: expected auto, mistralrs or llamacpp"
            )),
        }
    }
}

/// Decode speeds measured for one model on one device, tokens per second.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Measured {
    pub mistralrs: f64,
    pub llamacpp: f64,
}

/// What to do about the engine.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Use {
        kind: EngineKind,
        reason: String,
    },
    /// `auto` on the CPU with no measurement yet: probe both engines, then decide again.
    Measure,
}

/// Why a setting cannot be followed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ChoiceError(String);

/// The decision for `setting` on `device`, given a stored measurement if there is one.
pub fn decide(
    setting: EngineSetting,
    device: DeviceClass,
    measured: Option<&Measured>,
) -> Result<Decision, ChoiceError> {
    let fixed = |kind: EngineKind| -> Result<Decision, ChoiceError> {
        if !kind.built() {
            return Err(ChoiceError(format!(
                "engine `{}` is not in this build (rebuild with the `llamacpp` feature)",
                kind.name()
            )));
        }
        let mut reason = format!(
            "engine `{}` chosen explicitly (--engine or [model] engine)",
            kind.name()
        );
        if kind == EngineKind::LlamaCpp && device == DeviceClass::Gpu {
            reason.push_str("; llama.cpp is built CPU-only here, so it runs on the CPU");
        }
        Ok(Decision::Use { kind, reason })
    };
    match setting {
        EngineSetting::MistralRs => fixed(EngineKind::MistralRs),
        EngineSetting::LlamaCpp => fixed(EngineKind::LlamaCpp),
        EngineSetting::Auto if device == DeviceClass::Gpu => Ok(Decision::Use {
            kind: EngineKind::MistralRs,
            reason: "auto: on a GPU mistral.rs runs the model (llama.cpp is built CPU-only)".into(),
        }),
        EngineSetting::Auto if !EngineKind::LlamaCpp.built() => Ok(Decision::Use {
            kind: EngineKind::MistralRs,
            reason: "auto: this build has no llama.cpp engine".into(),
        }),
        EngineSetting::Auto => Ok(match measured {
            None => Decision::Measure,
            Some(m) => {
                let kind = if m.llamacpp > m.mistralrs {
                    EngineKind::LlamaCpp
                } else {
                    EngineKind::MistralRs
                };
                Decision::Use {
                    kind,
                    reason: format!(
                        "auto: on the CPU {} decoded this model fastest (llama.cpp {:.1} tok/s, \
                         mistral.rs {:.1} tok/s)",
                        kind.name(),
                        m.llamacpp,
                        m.mistralrs
                    ),
                }
            }
        }),
    }
}

/// What a measurement is valid for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ProbeKey {
    /// The model's (first) file name.
    pub file: String,
    pub bytes: u64,
    /// `cpu`, `cuda:0`, ...
    pub device: String,
    pub version: String,
}

impl ProbeKey {
    fn as_string(&self) -> String {
        format!(
            "{}|{}|{}|{}",
            self.file, self.bytes, self.device, self.version
        )
    }
}

/// Stored measurements (`engine-speed.json` in Tidepool's data directory).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SpeedRecords {
    pub records: BTreeMap<String, Measured>,
}

impl SpeedRecords {
    /// Reads the file; a missing or unreadable one is empty (the probe runs again).
    pub fn load(path: &Path) -> SpeedRecords {
        std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Writes the file (through a temporary file, so a crash leaves no torn JSON).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("json.partial");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(tmp, path)
    }

    pub fn get(&self, key: &ProbeKey) -> Option<&Measured> {
        self.records.get(&key.as_string())
    }

    pub fn insert(&mut self, key: &ProbeKey, m: Measured) {
        self.records.insert(key.as_string(), m);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(d: Result<Decision, ChoiceError>) -> EngineKind {
        match d.unwrap() {
            Decision::Use { kind, .. } => kind,
            Decision::Measure => panic!("expected a decision"),
        }
    }

    #[test]
    fn a_fixed_setting_is_followed() {
        let m = Measured {
            mistralrs: 50.0,
            llamacpp: 10.0,
        };
        assert_eq!(
            kind(decide(EngineSetting::MistralRs, DeviceClass::Cpu, None)),
            EngineKind::MistralRs
        );
        if EngineKind::LlamaCpp.built() {
            assert_eq!(
                kind(decide(EngineSetting::LlamaCpp, DeviceClass::Cpu, Some(&m))),
                EngineKind::LlamaCpp
            );
        } else {
            assert!(decide(EngineSetting::LlamaCpp, DeviceClass::Cpu, None).is_err());
        }
    }

    #[test]
    fn auto_takes_mistralrs_on_a_gpu_whatever_was_measured() {
        let m = Measured {
            mistralrs: 1.0,
            llamacpp: 100.0,
        };
        assert_eq!(
            kind(decide(EngineSetting::Auto, DeviceClass::Gpu, Some(&m))),
            EngineKind::MistralRs
        );
        assert_eq!(
            kind(decide(EngineSetting::Auto, DeviceClass::Gpu, None)),
            EngineKind::MistralRs
        );
    }

    #[test]
    fn auto_on_the_cpu_measures_then_takes_the_faster() {
        if !EngineKind::LlamaCpp.built() {
            return;
        }
        assert_eq!(
            decide(EngineSetting::Auto, DeviceClass::Cpu, None).unwrap(),
            Decision::Measure
        );
        let llama_faster = Measured {
            mistralrs: 20.0,
            llamacpp: 50.0,
        };
        match decide(EngineSetting::Auto, DeviceClass::Cpu, Some(&llama_faster)).unwrap() {
            Decision::Use { kind, reason } => {
                assert_eq!(kind, EngineKind::LlamaCpp);
                assert!(
                    reason.contains("50.0") && reason.contains("20.0"),
                    "{reason}"
                );
            }
            d => panic!("{d:?}"),
        }
        let mistral_faster = Measured {
            mistralrs: 30.0,
            llamacpp: 29.0,
        };
        assert_eq!(
            kind(decide(
                EngineSetting::Auto,
                DeviceClass::Cpu,
                Some(&mistral_faster)
            )),
            EngineKind::MistralRs
        );
    }

    #[test]
    fn settings_parse_and_unknown_ones_say_what_is_expected() {
        assert_eq!("llamacpp".parse(), Ok(EngineSetting::LlamaCpp));
        assert_eq!("auto".parse(), Ok(EngineSetting::Auto));
        let e = "llama".parse::<EngineSetting>().unwrap_err();
        assert!(e.contains("auto, mistralrs or llamacpp"), "{e}");
    }

    #[test]
    fn records_round_trip_by_key() {
        let dir = std::env::temp_dir().join(format!("tp-choice-{}", std::process::id()));
        let path = dir.join("engine-speed.json");
        let key = ProbeKey {
            file: "m.gguf".into(),
            bytes: 10,
            device: "cpu".into(),
            version: "0.1.0".into(),
        };
        assert!(SpeedRecords::load(&path).get(&key).is_none());
        let mut r = SpeedRecords::default();
        let m = Measured {
            mistralrs: 1.5,
            llamacpp: 2.5,
        };
        r.insert(&key, m);
        r.save(&path).unwrap();
        let back = SpeedRecords::load(&path);
        assert_eq!(back.get(&key), Some(&m));
        let other = ProbeKey {
            version: "0.2.0".into(),
            ..key
        };
        assert!(back.get(&other).is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
