//! The model picker's API (loopback only): the catalog with what is on disk, downloads in the
//! background with their progress, and switching the served model at run time, for the dashboard.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tidepool_models::catalog::Catalog;
use tidepool_models::model_source::{ModelStore, Progress};

use crate::error::{ApiError, ApiJson};
use crate::AppState;

/// A download's state, as the dashboard shows it.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Download {
    /// `downloading`, `done` or `failed`.
    pub state: &'static str,
    /// What is being done now (downloading a file, requantizing…).
    pub phase: String,
    pub bytes: u64,
    pub total: Option<u64>,
    pub error: Option<String>,
}

/// Downloads by variant id.
#[derive(Default)]
pub struct Downloads(Mutex<HashMap<String, Download>>);

impl Downloads {
    fn set(&self, id: &str, f: impl FnOnce(&mut Download)) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(map.entry(id.to_string()).or_default());
    }

    fn get(&self, id: &str) -> Option<Download> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }
}

/// Progress into the shared download state.
struct Tracker {
    downloads: Arc<Downloads>,
    id: String,
}

impl Progress for Tracker {
    fn start(&self, what: &str, total: Option<u64>) {
        self.downloads.set(&self.id, |d| {
            d.phase = what.to_string();
            d.bytes = 0;
            d.total = total;
        });
    }

    fn advance(&self, delta: u64) {
        self.downloads.set(&self.id, |d| d.bytes += delta);
    }

    fn finish(&self) {}
}

#[derive(Serialize)]
pub struct ModelRow {
    id: String,
    name: String,
    quant: String,
    size_bytes: u64,
    downloaded: bool,
    /// The model this server serves.
    active: bool,
    download: Option<Download>,
}

fn rows(app: &AppState) -> Vec<ModelRow> {
    let store = ModelStore::from_env();
    let mut out = Vec::new();
    for m in &Catalog::builtin().models {
        for v in &m.variants {
            let id = m.variant_id(v);
            out.push(ModelRow {
                downloaded: store.find(m, v).is_some(),
                active: app.service.serves(&id),
                download: app.downloads.get(&id),
                name: m.name.clone(),
                quant: v.quant.clone(),
                size_bytes: v.size_mb * 1_000_000,
                id,
            });
        }
    }
    out
}

/// Loads another model and makes it the served one (the front end that started the server knows
/// how: `tidepool serve` and the tray app provide it). Requests running on the old model finish
/// on it; new ones go to the new model once it is ready.
pub trait ModelSwitcher: Send + Sync {
    fn switch(&self, app: AppState, id: String) -> BoxFuture<'static, anyhow::Result<()>>;
}

/// A model switch and how it went.
#[derive(Debug, Clone, Serialize)]
pub struct Switch {
    pub id: String,
    /// `switching`, `done` or `failed`.
    pub state: &'static str,
    pub error: Option<String>,
}

/// GET /admin/models
pub async fn list(State(app): State<AppState>) -> Json<serde_json::Value> {
    let switch = app.switch.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let rows = tokio::task::spawn_blocking(move || rows(&app))
        .await
        .unwrap_or_default();
    Json(serde_json::json!({ "models": rows, "switch": switch }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UseRequest {
    id: String,
}

/// PUT /admin/model `{"id": "<catalog or variant id, or .gguf path>"}`: switches the served model
/// in the background (202); GET /admin/models shows the switch's state.
pub async fn switch(
    State(app): State<AppState>,
    ApiJson(req): ApiJson<UseRequest>,
) -> Result<(StatusCode, Json<Switch>), ApiError> {
    let Some(switcher) = app.switcher.clone() else {
        return Err(ApiError::unavailable(
            "This server cannot switch models at run time.",
            60,
        ));
    };
    if req.id.len() > 4096 {
        return Err(ApiError::invalid_param("id", "`id` is too long"));
    }
    if app.service.serves(&req.id) {
        return Err(ApiError::invalid_param(
            "id",
            format!(
                "`{}` is the model being served already",
                crate::error::truncate(&req.id, 100)
            ),
        ));
    }
    // A local file is checked now, so a malformed one is a 400 rather than a failed switch.
    let path = std::path::PathBuf::from(&req.id);
    if req.id.ends_with(".gguf") && path.is_file() {
        let checked = tokio::task::spawn_blocking(move || tidepool_gguf::check_file(&path))
            .await
            .map_err(|e| ApiError::hidden("Checking the model file failed", &e.to_string()))?;
        if let Err(e) = checked {
            return Err(ApiError::invalid_param(
                "id",
                format!(
                    "`{}` is not a valid GGUF file: {e}",
                    crate::error::truncate(&req.id, 200)
                ),
            ));
        }
    }
    let started = Switch {
        id: req.id.clone(),
        state: "switching",
        error: None,
    };
    {
        let mut current = app.switch.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = current.as_ref().filter(|s| s.state == "switching") {
            return Err(ApiError::conflict(format!(
                "A switch to `{}` is still running.",
                s.id
            )));
        }
        *current = Some(started.clone());
    }
    let slot = app.switch.clone();
    let id = req.id;
    let job = switcher.switch(app, id.clone());
    tokio::spawn(async move {
        let result = job.await;
        let mut s = slot.lock().unwrap_or_else(|p| p.into_inner());
        *s = Some(match result {
            Ok(()) => Switch {
                id,
                state: "done",
                error: None,
            },
            Err(e) => {
                tracing::warn!("switching the model failed: {e:#}");
                // The first line of the cause chain; a backtrace stays in the log.
                let shown = format!("{e:#}");
                let shown = shown.lines().next().unwrap_or("").to_string();
                Switch {
                    id,
                    state: "failed",
                    error: Some(crate::error::truncate(&shown, 300).into_owned()),
                }
            }
        });
    });
    Ok((StatusCode::ACCEPTED, Json(started)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullRequest {
    id: String,
}

/// POST /admin/models/pull `{"id": "<variant id>"}`: starts a download (202); progress shows in
/// GET /admin/models. A download already running is not started twice.
pub async fn pull(
    State(app): State<AppState>,
    ApiJson(req): ApiJson<PullRequest>,
) -> Result<(StatusCode, Json<Download>), ApiError> {
    let catalog = Catalog::builtin();
    let found = catalog.models.iter().find_map(|m| {
        m.variants
            .iter()
            .find(|v| m.variant_id(v) == req.id)
            .map(|v| (m.clone(), v.clone()))
    });
    let Some((entry, variant)) = found else {
        return Err(ApiError::not_found(format!(
            "No model variant `{}` in the catalog (see GET /admin/models).",
            crate::error::truncate(&req.id, 100)
        )));
    };
    if let Some(d) = app
        .downloads
        .get(&req.id)
        .filter(|d| d.state == "downloading")
    {
        return Ok((StatusCode::ACCEPTED, Json(d)));
    }
    app.downloads.set(&req.id, |d| {
        *d = Download {
            state: "downloading",
            phase: "starting".into(),
            ..Download::default()
        }
    });
    let downloads = app.downloads.clone();
    let id = req.id.clone();
    tokio::task::spawn_blocking(move || {
        let tracker = Tracker {
            downloads: downloads.clone(),
            id: id.clone(),
        };
        let result = ModelStore::from_env().pull(&entry, &variant, &tracker);
        downloads.set(&id, |d| match result {
            Ok(_) => {
                d.state = "done";
                d.error = None;
            }
            Err(e) => {
                tracing::warn!(model = %id, "download failed: {e}");
                d.state = "failed";
                d.error = Some(crate::error::truncate(&e.to_string(), 300).into_owned());
            }
        });
    });
    Ok((
        StatusCode::ACCEPTED,
        Json(app.downloads.get(&req.id).unwrap_or_default()),
    ))
}
