//! The app's settings: the same [`Config`] schema as `tidepool serve`'s TOML file, kept with
//! tauri-plugin-store (`settings.json` in the app's data directory) and validated the same way.
//! `TIDEPOOL_APP_CONFIG=path.toml` starts from a TOML file instead (tests, power users). The file
//! can hold the LAN token, so it is kept readable by its user only (0600).

use tauri::{AppHandle, Manager, Runtime};
use tauri_plugin_store::StoreExt;
use tidepool::config::Config;

const STORE: &str = "settings.json";
const KEY: &str = "config";

/// The saved settings, or the defaults when there are none or they do not validate (said in the
/// log, never a crash).
pub fn load<R: Runtime>(app: &AppHandle<R>) -> Config {
    if let Ok(path) = std::env::var("TIDEPOOL_APP_CONFIG") {
        match Config::load(std::path::Path::new(&path)) {
            Ok(c) => return c,
            Err(e) => tracing::error!("TIDEPOOL_APP_CONFIG: {e}; using the saved settings"),
        }
    }
    let saved = app
        .store(STORE)
        .ok()
        .and_then(|s| s.get(KEY))
        .map(serde_json::from_value::<Config>);
    match saved {
        None => Config::default(),
        Some(Ok(c)) => match c.validate(STORE) {
            Ok(()) => c,
            Err(e) => {
                tracing::error!("saved settings are invalid ({e}); using the defaults");
                Config::default()
            }
        },
        Some(Err(e)) => {
            tracing::error!("saved settings could not be read ({e}); using the defaults");
            Config::default()
        }
    }
}

/// Validates and saves `cfg`.
pub fn save<R: Runtime>(app: &AppHandle<R>, cfg: &Config) -> anyhow::Result<()> {
    cfg.validate(STORE)?;
    let store = app.store(STORE)?;
    store.set(KEY, serde_json::to_value(cfg)?);
    store.save()?;
    private(&app.path().app_data_dir()?.join(STORE))?;
    Ok(())
}

/// Makes `path` readable and writable by its owner only.
fn private(path: &std::path::Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if path.exists() {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    let _ = path;
    Ok(())
}
