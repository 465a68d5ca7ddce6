//! The dashboard: the web files in `ui/`, served at `/` to loopback peers only (the same files
//! the tray app's window loads). Release builds embed them; debug builds read them from the
//! source tree at run time, so editing the UI needs no rebuild.

use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

#[derive(rust_embed::Embed)]
#[folder = "../../ui/"]
#[exclude = "node_modules/*"]
#[exclude = "package*.json"]
struct Ui;

/// GET /, GET /ui/{path}, and the dashboard's own folders at the root (/css, /js, /vendor), so
/// its relative links resolve from / and from /ui/index.html alike: a file of the dashboard.
pub async fn asset(uri: Uri) -> Response {
    let path = uri.path().trim_start_matches('/');
    let path = path.strip_prefix("ui/").unwrap_or(path);
    let path = if path.is_empty() { "index.html" } else { path };
    match Ui::get(path) {
        Some(file) => (
            [
                (header::CONTENT_TYPE, file.metadata.mimetype().to_string()),
                (header::CACHE_CONTROL, "no-cache".to_string()),
            ],
            file.data,
        )
            .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/plain")],
            format!("no dashboard file `{path}`"),
        )
            .into_response(),
    }
}
