//! The tray: an icon that shows the pool's state (idle, serving, scaling, hot or on battery) and
//! a menu with a status line, the dashboard, the power mode, LAN sharing, start/stop, start at
//! login and quit. What the pool is doing is read from the in-process server every 2 s.

use std::time::Duration;

use tauri::image::Image;
use tauri::menu::{CheckMenuItem, Menu, MenuItem, PredefinedMenuItem, Submenu};
use tauri::tray::TrayIconBuilder;
use tauri::{AppHandle, Manager, Wry};
use tauri_plugin_autostart::ManagerExt;
use tidepool_control::power::{PowerMode, ThermalLevel};
use tidepool_sched::pool::WorkerState;

use crate::App;

/// What the tray icon shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Look {
    /// Server stopped or nothing running.
    Idle,
    Serving,
    /// Workers loading or draining.
    Scaling,
    /// Too warm, or limited by the battery.
    Hot,
}

impl Look {
    fn rgb(self) -> [u8; 3] {
        match self {
            Look::Idle => [148, 163, 184],
            Look::Serving => [16, 185, 129],
            Look::Scaling => [59, 130, 246],
            Look::Hot => [249, 115, 22],
        }
    }

    fn label(self) -> &'static str {
        match self {
            Look::Idle => "idle",
            Look::Serving => "serving",
            Look::Scaling => "scaling",
            Look::Hot => "limited (heat or battery)",
        }
    }

    /// A 32x32 filled circle in the state's colour, drawn here so every state has an icon.
    pub fn icon(self) -> Image<'static> {
        const N: usize = 32;
        let [r, g, b] = self.rgb();
        let mut rgba = vec![0u8; N * N * 4];
        let c = (N as f32 - 1.0) / 2.0;
        for y in 0..N {
            for x in 0..N {
                let d = ((x as f32 - c).powi(2) + (y as f32 - c).powi(2)).sqrt();
                let alpha = (13.5 - d).clamp(0.0, 1.0);
                let i = (y * N + x) * 4;
                rgba[i..i + 4].copy_from_slice(&[r, g, b, (alpha * 255.0) as u8]);
            }
        }
        Image::new_owned(rgba, N as u32, N as u32)
    }
}

/// The menu items that change after start.
pub struct Items {
    status: MenuItem<Wry>,
    modes: Vec<(PowerMode, CheckMenuItem<Wry>)>,
    lan: CheckMenuItem<Wry>,
    server: MenuItem<Wry>,
}

/// Creates the tray icon and its menu.
pub fn build(app: &AppHandle, mode: PowerMode, lan: bool) -> tauri::Result<Items> {
    let status = MenuItem::with_id(app, "status", "Tidepool: starting…", false, None::<&str>)?;
    let open = MenuItem::with_id(app, "open", "Open dashboard", true, None::<&str>)?;
    let modes: Vec<(PowerMode, CheckMenuItem<Wry>)> = PowerMode::ALL
        .into_iter()
        .map(|m| {
            let label = match m {
                PowerMode::Auto => "Auto (follow the battery)",
                PowerMode::Performance => "Performance",
                PowerMode::Balanced => "Balanced",
                PowerMode::PowerSaver => "Power saver",
            };
            CheckMenuItem::with_id(
                app,
                format!("mode:{m}"),
                label,
                true,
                m == mode,
                None::<&str>,
            )
            .map(|i| (m, i))
        })
        .collect::<tauri::Result<_>>()?;
    let mode_refs: Vec<&dyn tauri::menu::IsMenuItem<Wry>> = modes
        .iter()
        .map(|(_, i)| i as &dyn tauri::menu::IsMenuItem<Wry>)
        .collect();
    let power = Submenu::with_items(app, "Power mode", true, &mode_refs)?;
    let lan_item = CheckMenuItem::with_id(app, "lan", "Share on LAN", true, lan, None::<&str>)?;
    let server = MenuItem::with_id(app, "server", "Stop server", true, None::<&str>)?;
    let login = CheckMenuItem::with_id(
        app,
        "autostart",
        "Start at login",
        true,
        app.autolaunch().is_enabled().unwrap_or(false),
        None::<&str>,
    )?;
    let quit = MenuItem::with_id(app, "quit", "Quit Tidepool", true, None::<&str>)?;
    let menu = Menu::with_items(
        app,
        &[
            &status,
            &PredefinedMenuItem::separator(app)?,
            &open,
            &power,
            &lan_item,
            &server,
            &login,
            &PredefinedMenuItem::separator(app)?,
            &quit,
        ],
    )?;
    TrayIconBuilder::with_id("tidepool")
        .icon(Look::Idle.icon())
        .tooltip("Tidepool")
        .menu(&menu)
        .show_menu_on_left_click(true)
        .on_menu_event(|app, event| crate::on_menu(app, event.id().as_ref()))
        .build(app)?;
    tracing::info!("tray created");
    Ok(Items {
        status,
        modes,
        lan: lan_item,
        server,
    })
}

/// Keeps the icon, tooltip and menu in step with the server, every 2 s.
pub fn spawn_updates(app: AppHandle) {
    tauri::async_runtime::spawn(async move {
        let mut last = None;
        loop {
            let (look, line, mode, lan, running) = snapshot(&app).await;
            let state = app.state::<App>();
            if let Some(items) = state.items.lock().unwrap().as_ref() {
                let _ = items.status.set_text(&line);
                for (m, item) in &items.modes {
                    let _ = item.set_checked(*m == mode);
                }
                let _ = items.lan.set_checked(lan);
                let _ = items.server.set_text(if running {
                    "Stop server"
                } else {
                    "Start server"
                });
            }
            if let Some(tray) = app.tray_by_id("tidepool") {
                if last != Some(look) {
                    let _ = tray.set_icon(Some(look.icon()));
                    last = Some(look);
                }
                let _ = tray.set_tooltip(Some(format!("Tidepool: {line}")));
            }
            crate::persist_live_changes(&app).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });
}

/// (icon, status line, configured power mode, sharing on, server running) now.
async fn snapshot(app: &AppHandle) -> (Look, String, PowerMode, bool, bool) {
    let state = app.state::<App>();
    let mode = state.config.lock().unwrap().power.mode;
    let running = state.running.lock().await;
    let Some(r) = running.as_ref() else {
        return (Look::Idle, "server stopped".into(), mode, false, false);
    };
    let lan = r.state.sharing.status().enabled;
    let Some(scaler) = r.state.autoscaler.get() else {
        return (Look::Scaling, "loading the model…".into(), mode, lan, true);
    };
    let workers = scaler.pool().map(|p| p.workers()).unwrap_or_default();
    let ready = workers
        .iter()
        .filter(|w| w.state == WorkerState::Ready)
        .count();
    let moving = workers
        .iter()
        .any(|w| matches!(w.state, WorkerState::Loading | WorkerState::Draining));
    let (_, signals) = scaler.last();
    let (_, power) = scaler.machine();
    let limited = power
        .as_ref()
        .is_some_and(|p| p.thermal != ThermalLevel::Normal || p.on_battery);
    let look = if limited {
        Look::Hot
    } else if moving {
        Look::Scaling
    } else if signals.in_flight > 0 {
        Look::Serving
    } else {
        Look::Idle
    };
    let line = format!(
        "{ready} worker{} · {:.1} req/s · {}",
        if ready == 1 { "" } else { "s" },
        signals.arrival_rate,
        look.label()
    );
    (look, line, mode, lan, true)
}
