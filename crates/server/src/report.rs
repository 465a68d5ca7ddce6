//! How both APIs tell a client what the gateway did to its request: `x-tidepool-*` response
//! headers, the same for OpenAI and Ollama.

use axum::http::{HeaderMap, HeaderValue};
use tidepool_gateway::gateway::{CacheStatus, Report};

/// `hit` or `miss` (absent when the answer cache is off).
pub const CACHE_HEADER: &str = "x-tidepool-cache";

/// The number of messages dropped to fit the context budget (absent when none were).
pub const TRUNCATED_HEADER: &str = "x-tidepool-truncated";

/// `true` when the request got degraded mode's short answer (absent otherwise).
pub const DEGRADED_HEADER: &str = "x-tidepool-degraded";

/// The task profile that served the request.
pub const PROFILE_HEADER: &str = "x-tidepool-profile";

/// A combined profile's label.
pub const LABEL_HEADER: &str = "x-tidepool-label";

/// Every header a report may add (exposed to allowed cross-origin pages by the CORS policy).
pub const HEADER_NAMES: [&str; 5] = [
    CACHE_HEADER,
    TRUNCATED_HEADER,
    DEGRADED_HEADER,
    PROFILE_HEADER,
    LABEL_HEADER,
];

/// Adds the report's headers.
pub fn insert_headers(headers: &mut HeaderMap, report: &Report) {
    for (name, value) in [
        (PROFILE_HEADER, &report.profile),
        (LABEL_HEADER, &report.label),
    ] {
        if let Some(v) = value.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
            headers.insert(name, v);
        }
    }
    if let Some(c) = report.cache {
        headers.insert(CACHE_HEADER, HeaderValue::from_static(c.as_str()));
    }
    if report.degraded {
        headers.insert(DEGRADED_HEADER, HeaderValue::from_static("true"));
    }
    if let Some(t) = report.truncation {
        headers.insert(TRUNCATED_HEADER, HeaderValue::from(t.dropped_messages));
    }
}

/// The truncation report as it appears in `usage` (OpenAI) or the final object (Ollama):
/// `{"dropped_messages": N, "original_prompt_tokens": T}`.
pub fn truncation_json(report: &Report) -> Option<serde_json::Value> {
    report
        .truncation
        .map(|t| serde_json::to_value(t).expect("serializes"))
}

/// A combined profile's parts, as they appear beside `usage`:
/// `{"label": "...", "label_prompt_tokens", "label_completion_tokens", "label_seconds"}`.
pub fn label_json(report: &Report) -> Option<serde_json::Value> {
    let (label, u) = (report.label.as_ref()?, report.label_usage?);
    Some(serde_json::json!({
        "label": label,
        "label_prompt_tokens": u.prompt_tokens,
        "label_completion_tokens": u.completion_tokens,
        "label_seconds": u.total_time.as_secs_f64(),
    }))
}

/// The field that carries [`label_json`].
pub const LABEL_FIELD: &str = "tidepool_label";

/// The field that carries [`truncation_json`].
pub const TRUNCATION_FIELD: &str = "tidepool_truncation";

/// One report for several answers to one request (`/v1/completions` with a list of prompts): a
/// hit only if every answer was.
pub fn merge(reports: &[Report]) -> Report {
    let mut out = reports.first().cloned().unwrap_or_default();
    if reports.iter().any(|r| r.cache == Some(CacheStatus::Miss)) {
        out.cache = Some(CacheStatus::Miss);
    }
    out.degraded = reports.iter().any(|r| r.degraded);
    out
}
