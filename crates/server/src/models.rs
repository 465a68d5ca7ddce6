//! The model picker's API (loopback only): the catalog with what is on disk, and downloads in the
//! background with their progress, for the dashboard.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use tidepool_core::catalog::Catalog;
use tidepool_core::model_source::{ModelStore, Progress};

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

/// GET /admin/models
pub async fn list(State(app): State<AppState>) -> Json<serde_json::Value> {
    let rows = tokio::task::spawn_blocking(move || rows(&app))
        .await
        .unwrap_or_default();
    Json(serde_json::json!({ "models": rows }))
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
            req.id
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
                d.error = Some(e.to_string());
            }
        });
    });
    Ok((
        StatusCode::ACCEPTED,
        Json(app.downloads.get(&req.id).unwrap_or_default()),
    ))
}
