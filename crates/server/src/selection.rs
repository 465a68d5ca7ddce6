//! What a client selects besides the request body, the same way for both APIs: the priority class
//! (`x-tidepool-priority`) and the task profile (`x-tidepool-profile`, a `profile` body field, or a
//! model name with a `:profile` suffix such as `qwen2.5-0.5b-instruct:sentiment`).

use axum::http::request::Parts;
use tidepool_sched::queue::Class;

use crate::error::ApiError;
use crate::AppState;

/// The header that carries a request's priority class.
pub const PRIORITY_HEADER: &str = "x-tidepool-priority";

/// The header that names a task profile (the response carries the same header back).
pub use crate::report::PROFILE_HEADER;

/// The selections a request's headers carry.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// `None` when the client named no class (the profile's class, else standard, applies).
    pub class: Option<Class>,
    pub profile: Option<String>,
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Selection {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let header = |name: &str| -> Result<Option<String>, ApiError> {
            match parts.headers.get(name) {
                None => Ok(None),
                Some(v) => v.to_str().map(|s| Some(s.trim().to_string())).map_err(|_| {
                    ApiError::invalid_param(name, format!("Invalid `{name}` header: not text"))
                }),
            }
        };
        let class = match header(PRIORITY_HEADER)? {
            None => None,
            Some(v) => Some(v.parse::<Class>().map_err(|e| {
                ApiError::invalid_param(
                    PRIORITY_HEADER,
                    format!("Invalid `{PRIORITY_HEADER}` header: {e}"),
                )
            })?),
        };
        let profile = header(PROFILE_HEADER)?.filter(|p| !p.is_empty());
        Ok(Selection { class, profile })
    }
}

/// Resolves the model name and the profile from every place a client may put them: the model
/// must be the served one, optionally with `:latest` or `:PROFILE`; the places that name a
/// profile must agree. Returns the model name to echo and the profile.
pub fn model_and_profile(
    app: &AppState,
    model: Option<&str>,
    body_profile: Option<&str>,
    header_profile: Option<&str>,
) -> Result<(String, Option<String>), ApiError> {
    let served = app.service.model_name();
    let (name, suffix) = match model.map(str::trim) {
        None | Some("") => (served.clone(), None),
        Some(m) if app.service.serves(m) => (served.clone(), None),
        Some(m) => match m.rsplit_once(':') {
            Some((base, tag)) if app.service.serves(base) => {
                let profile = (tag != "latest" && !tag.is_empty()).then(|| tag.to_string());
                if let Some(p) = &profile {
                    if !app.gateway.profiles().contains_key(p) {
                        return Err(ApiError::model_not_found(m, &served));
                    }
                }
                (m.to_string(), profile)
            }
            _ => return Err(ApiError::model_not_found(m, &served)),
        },
    };
    let mut chosen: Option<(&str, String)> = None;
    for (place, p) in [
        ("model", suffix),
        ("profile", body_profile.map(str::to_string)),
        (PROFILE_HEADER, header_profile.map(str::to_string)),
    ] {
        let Some(p) = p.filter(|p| !p.is_empty()) else {
            continue;
        };
        match &chosen {
            Some((first, q)) if *q != p => {
                return Err(ApiError::invalid_param(
                    "profile",
                    format!("The profile is named twice and differently: `{q}` in `{first}`, `{p}` in `{place}`."),
                ))
            }
            Some(_) => {}
            None => chosen = Some((place, p)),
        }
    }
    Ok((name, chosen.map(|(_, p)| p)))
}
