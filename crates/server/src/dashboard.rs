//! The dashboard: the web files in `ui/`, served at `/` to loopback peers only (the same files
//! the tray app's window loads). Every build embeds them (rust-embed's `debug-embed`): a path
//! is looked up in the embedded set and nothing else, so no request can name a file on disk
//! (`/js/../../etc/passwd` is simply not in the set). Editing the UI needs a rebuild of this
//! crate (a few seconds).

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
                // The dashboard is never framed by another page (clickjacking).
                (header::X_FRAME_OPTIONS, "DENY".to_string()),
                (
                    header::CONTENT_SECURITY_POLICY,
                    "frame-ancestors 'none'".to_string(),
                ),
            ],
            file.data,
        )
            .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/plain")],
            format!("no dashboard file `{}`", crate::error::truncate(path, 100)),
        )
            .into_response(),
    }
}
