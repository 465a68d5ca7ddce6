//! Tidepool's tray app: runs the same server as `tidepool serve` in this process (no sidecar),
//! lives in the system tray, and shows the dashboard (the server's `/`) in a window. Closing the
//! window keeps the app in the tray; a second launch shows the first one's window.

#![cfg_attr(not(debug_assertions), windows_subsystem = "windows")]

mod settings;
mod tray;

use std::sync::Mutex;

use tauri::{AppHandle, Manager, RunEvent, WebviewUrl, WebviewWindowBuilder, WindowEvent};
use tauri_plugin_autostart::{MacosLauncher, ManagerExt};
use tidepool::config::Config;
use tidepool::{launch, Launch, Running};
use tidepool_control::power::PowerMode;

/// The app's state.
pub struct App {
    /// The settings in force (saved on every change).
    pub config: Mutex<Config>,
    /// The in-process server, when running.
    pub running: tokio::sync::Mutex<Option<Running>>,
    /// The dashboard's URL once the server has listened.
    pub url: Mutex<Option<String>>,
    pub items: Mutex<Option<tray::Items>>,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,mistralrs_core=warn,tao=warn,wry=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let app = tauri::Builder::default()
        .plugin(tauri_plugin_single_instance::init(|app, _args, _cwd| {
            tracing::info!("second launch: showing the running app's window");
            show_dashboard(app);
        }))
        .plugin(tauri_plugin_store::Builder::default().build())
        .plugin(tauri_plugin_autostart::init(
            MacosLauncher::LaunchAgent,
            None,
        ))
        .setup(|app| {
            let handle = app.handle().clone();
            let config = settings::load(&handle);
            let (mode, lan) = (config.power.mode, config.server.share_lan);
            app.manage(App {
                config: Mutex::new(config),
                running: tokio::sync::Mutex::new(None),
                url: Mutex::new(None),
                items: Mutex::new(None),
            });
            let items = tray::build(&handle, mode, lan)?;
            *app.state::<App>().items.lock().unwrap() = Some(items);
            tauri::async_runtime::block_on(start_server(&handle));
            show_dashboard(&handle);
            tray::spawn_updates(handle);
            Ok(())
        })
        .on_window_event(|window, event| {
            if let WindowEvent::CloseRequested { api, .. } = event {
                // Closing the window keeps Tidepool serving from the tray.
                api.prevent_close();
                let _ = window.hide();
            }
        })
        .build(tauri::generate_context!())
        .expect("the Tauri app could not be built");
    app.run(|app, event| {
        if let RunEvent::ExitRequested { api, code, .. } = event {
            // No window left is not a reason to quit; the tray's Quit passes an exit code.
            if code.is_none() {
                api.prevent_exit();
            } else {
                let app = app.clone();
                tauri::async_runtime::block_on(stop_server(&app));
            }
        }
    });
}

/// Starts the in-process server with the current settings (on a free port if the configured one
/// is taken).
async fn start_server(app: &AppHandle) {
    let state = app.state::<App>();
    let mut running = state.running.lock().await;
    if running.is_some() {
        return;
    }
    let cfg = state.config.lock().unwrap().clone();
    let started = match launch(cfg.clone(), Launch::default()).await {
        Ok(r) => Ok(r),
        Err(e) => {
            tracing::warn!("{e:#}; trying a free port");
            let mut any = cfg;
            any.server.port = 0;
            launch(any, Launch::default()).await
        }
    };
    match started {
        Ok(r) => {
            tracing::info!("server listening on {}", r.url);
            *state.url.lock().unwrap() = Some(format!("{}/", r.url));
            *running = Some(r);
        }
        Err(e) => tracing::error!("the server could not start: {e:#}"),
    }
}

async fn stop_server(app: &AppHandle) {
    let state = app.state::<App>();
    let r = state.running.lock().await.take();
    if let Some(r) = r {
        if let Err(e) = r.stop().await {
            tracing::warn!("stopping the server: {e:#}");
        }
        tracing::info!("server stopped");
    }
}

/// Shows the dashboard window, creating it the first time.
fn show_dashboard(app: &AppHandle) {
    if let Some(w) = app.get_webview_window("main") {
        let _ = w.show();
        let _ = w.unminimize();
        let _ = w.set_focus();
        return;
    }
    let url = app.state::<App>().url.lock().unwrap().clone();
    let Some(url) = url.and_then(|u| u.parse().ok()) else {
        tracing::warn!("no dashboard to show: the server is not running");
        return;
    };
    match WebviewWindowBuilder::new(app, "main", WebviewUrl::External(url))
        .title("Tidepool")
        .inner_size(1200.0, 820.0)
        .min_inner_size(420.0, 480.0)
        .build()
    {
        Ok(_) => tracing::info!("dashboard window created"),
        Err(e) => tracing::error!("the dashboard window could not be created: {e}"),
    }
}

/// Saves the settings after a change from the tray.
fn persist(app: &AppHandle, change: impl FnOnce(&mut Config)) {
    let state = app.state::<App>();
    let cfg = {
        let mut cfg = state.config.lock().unwrap();
        change(&mut cfg);
        cfg.clone()
    };
    if let Err(e) = settings::save(app, &cfg) {
        tracing::error!("settings not saved: {e:#}");
    }
}

/// Saves what the dashboard changed through the admin API (policy, power, LAN sharing), so the
/// next start uses it too.
pub async fn persist_live_changes(app: &AppHandle) {
    let state = app.state::<App>();
    let live = {
        let running = state.running.lock().await;
        let Some(r) = running.as_ref() else { return };
        let Some(scaler) = r.state.autoscaler.get() else {
            return;
        };
        let sharing = r.state.sharing.status();
        (
            scaler.config(),
            scaler.power_config(),
            sharing.enabled,
            sharing.token,
        )
    };
    let changed = {
        let cfg = state.config.lock().unwrap();
        cfg.policy != live.0
            || cfg.power != live.1
            || cfg.server.share_lan != live.2
            || (live.3.is_some() && cfg.server.lan_token != live.3)
    };
    if changed {
        tracing::info!("saving settings changed from the dashboard");
        persist(app, |c| {
            c.policy = live.0;
            c.power = live.1;
            c.server.share_lan = live.2;
            if live.3.is_some() {
                c.server.lan_token = live.3;
            }
        });
    }
}

/// Tray menu actions.
pub fn on_menu(app: &AppHandle, id: &str) {
    let app = app.clone();
    match id {
        "open" => show_dashboard(&app),
        "quit" => {
            tauri::async_runtime::spawn(async move {
                stop_server(&app).await;
                app.exit(0);
            });
        }
        "server" => {
            tauri::async_runtime::spawn(async move {
                let running = app.state::<App>().running.lock().await.is_some();
                if running {
                    stop_server(&app).await;
                } else {
                    start_server(&app).await;
                }
            });
        }
        "autostart" => {
            let l = app.autolaunch();
            let r = if l.is_enabled().unwrap_or(false) {
                l.disable()
            } else {
                l.enable()
            };
            if let Err(e) = r {
                tracing::error!("start at login could not be changed: {e}");
            }
        }
        "lan" => {
            tauri::async_runtime::spawn(async move {
                let state = app.state::<App>();
                let running = state.running.lock().await;
                let on = match running.as_ref() {
                    Some(r) => {
                        let on = !r.state.sharing.status().enabled;
                        match r.state.sharing.set_enabled(&r.state, on) {
                            Ok(s) => {
                                tracing::info!(urls = ?s.urls, "LAN sharing {}", if on { "on" } else { "off" });
                                on
                            }
                            Err(e) => {
                                tracing::error!("LAN sharing: {}", e.message);
                                return;
                            }
                        }
                    }
                    None => !state.config.lock().unwrap().server.share_lan,
                };
                drop(running);
                persist(&app, |c| c.server.share_lan = on);
            });
        }
        other => {
            if let Some(mode) = other
                .strip_prefix("mode:")
                .and_then(|m| m.parse::<PowerMode>().ok())
            {
                tauri::async_runtime::spawn(async move {
                    persist(&app, |c| c.power.mode = mode);
                    let power = app.state::<App>().config.lock().unwrap().power.clone();
                    if let Some(r) = app.state::<App>().running.lock().await.as_ref() {
                        if let Some(scaler) = r.state.autoscaler.get() {
                            scaler.set_power_config(power);
                        }
                    }
                });
            }
        }
    }
}
