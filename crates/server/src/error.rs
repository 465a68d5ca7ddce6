//! Errors in the API's own shape: OpenAI's `{"error": {"message", "type", "param", "code"}}`
//! for `/v1` and the rest, Ollama's `{"error": "..."}` under `/api/`, Anthropic's
//! `{"type": "error", "error": {"type", "message"}}` under `/v1/messages`, each with the right
//! HTTP status, and the JSON body extractor that produces them for malformed or invalid requests.

use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tidepool_engine::EngineError;
use tidepool_gateway::service::SubmitError;

/// An error response.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u64>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

/// `text` cut to at most `max` characters (with `…` when cut), for echoing client input.
pub fn truncate(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    match text.char_indices().nth(max) {
        None => std::borrow::Cow::Borrowed(text),
        Some((end, _)) => std::borrow::Cow::Owned(format!("{}…", &text[..end])),
    }
}

/// A short reference logged beside an internal error, so the client can quote it without seeing
/// the engine's internals.
fn incident_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
}

impl ApiError {
    /// An error with any status.
    pub fn with_status(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self::new(status, kind, message)
    }

    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 400 for a bad value of `param`.
    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param.to_string()),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    /// 409: the request conflicts with work already running.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "invalid_request_error", message)
    }

    /// 401: a LAN peer without the right bearer token.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiError {
            code: Some("invalid_api_key"),
            ..Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message)
        }
    }

    /// 429 with Retry-After: a LAN peer over its rate limit.
    pub fn rate_limited(message: impl Into<String>, retry_after_s: u64) -> Self {
        ApiError {
            code: Some("rate_limit_exceeded"),
            retry_after: Some(retry_after_s),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub fn model_not_found(model: &str, served: &str) -> Self {
        ApiError {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!(
                    "The model `{}` does not exist. This server serves `{served}`.",
                    truncate(model, 100)
                ),
            )
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError {
            code: Some("not_found"),
            ..Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
        }
    }

    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            message,
        )
    }

    pub fn unavailable(message: impl Into<String>, retry_after: u64) -> Self {
        ApiError {
            code: Some("service_unavailable"),
            retry_after: Some(retry_after),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
        }
    }

    /// 403: not allowed from where the request came.
    pub fn forbidden(message: impl Into<String>) -> Self {
        ApiError {
            code: Some("forbidden"),
            ..Self::new(StatusCode::FORBIDDEN, "permission_error", message)
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// A 500 for a failure inside the engine or the server: the details (an engine's message, a
    /// backtrace) go to the log under an id; the client gets the id, never the internals.
    pub fn hidden(context: &str, detail: &str) -> Self {
        let id = incident_id();
        tracing::warn!(incident = %id, "{context}: {detail}");
        ApiError::internal(format!(
            "{context} (an internal error; the server log has the details under incident {id})."
        ))
    }

    /// The JSON body, for embedding in a stream.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(Body {
            error: Inner {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        })
        .expect("error bodies serialize")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json_with_retry(self.status, self.to_json(), self.retry_after)
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::NotReady(m) => ApiError::unavailable(m, 5),
            SubmitError::ShuttingDown => ApiError::unavailable(e.to_string(), 5),
            SubmitError::Busy {
                message,
                retry_after_s,
            } => ApiError {
                code: Some("queue_full"),
                retry_after: Some(retry_after_s),
                ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
            },
            SubmitError::Shed {
                message,
                retry_after_s,
            } => ApiError {
                code: Some("shedding_load"),
                ..ApiError::unavailable(message, retry_after_s)
            },
            SubmitError::DeadlineExceeded(m) => ApiError {
                code: Some("deadline_exceeded"),
                ..ApiError::unavailable(m, 1)
            },
            SubmitError::Engine(e) => e.into(),
        }
    }
}

impl From<tidepool_gateway::gateway::GatewayError> for ApiError {
    fn from(e: tidepool_gateway::gateway::GatewayError) -> Self {
        match e {
            tidepool_gateway::gateway::GatewayError::Submit(e) => e.into(),
            tidepool_gateway::gateway::GatewayError::Profile(
                e @ tidepool_gateway::profile::ProfileError::Unknown { .. },
            ) => ApiError {
                code: Some("profile_not_found"),
                param: Some("profile".into()),
                ..ApiError::new(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    format!("{e}."),
                )
            },
            tidepool_gateway::gateway::GatewayError::Profile(e) => {
                ApiError::invalid_param("profile", format!("{e}."))
            }
            tidepool_gateway::gateway::GatewayError::Invalid { param, message } => {
                ApiError::invalid_param(&param, message)
            }
            tidepool_gateway::gateway::GatewayError::ContextTooLong(m) => ApiError {
                code: Some("context_length_exceeded"),
                ..ApiError::invalid_param("messages", m)
            },
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Invalid(m) => {
                let mut err = ApiError::bad_request(m);
                if err.message.contains("context") || err.message.contains("too long") {
                    err.code = Some("context_length_exceeded");
                    err.param = Some("messages".into());
                }
                err
            }
            EngineError::Unavailable(m) => ApiError::unavailable(m, 5),
            EngineError::Internal(m) => ApiError::hidden("The engine failed", &m),
            EngineError::Load { model, message } => ApiError::hidden(
                &format!("The model `{}` failed to load", truncate(&model, 100)),
                &message,
            ),
        }
    }
}

/// The error for a generation that failed part-way: the client's own output constraint is a 400
/// that says what went wrong; anything else is an engine failure, hidden behind an incident id.
pub fn generation_failed(e: &str) -> ApiError {
    match e.strip_prefix(tidepool_engine::grammar::FAILED) {
        Some(why) => ApiError::invalid_param(
            "response_format",
            format!(
                "The output constraint cannot be followed: {}",
                truncate(why, 300)
            ),
        ),
        None => ApiError::hidden("The generation failed", e),
    }
}

/// Marks the 500 that [`panic_response`] made, so [`panics_in_shape`] can reshape it.
#[derive(Clone, Copy)]
struct FromPanic;

/// The last resort (tower-http's `CatchPanicLayer`): a handler that panicked answers an
/// OpenAI-shaped 500 whose details stay in the log.
pub fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let what = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("a panic without a message");
    let mut resp = ApiError::hidden("The server failed on this request", what).into_response();
    resp.extensions_mut().insert(FromPanic);
    resp
}

/// Middleware just inside the panic catcher: a caught panic on an Ollama or Anthropic route is
/// answered in that API's shape.
pub async fn panics_in_shape(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = req.uri().path().to_string();
    let reshape = path.starts_with("/api/") || is_anthropic_path(&path);
    let resp = next.run(req).await;
    if !(reshape && resp.extensions().get::<FromPanic>().is_some()) {
        return resp;
    }
    let body = axum::body::to_bytes(resp.into_body(), 64 * 1024)
        .await
        .unwrap_or_default();
    let message = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| "The server failed on this request.".into());
    in_shape_for(&path, ApiError::internal(message))
}

/// How long a client may take to send its request body.
const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A JSON request body, parsed whatever the content type says, with OpenAI-style errors:
/// malformed JSON and wrong types give 400 naming the field; a body over the limit gives 413.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let read = tokio::time::timeout(BODY_READ_TIMEOUT, bytes::Bytes::from_request(req, state));
        let Ok(read) = read.await else {
            return Err(ApiError {
                code: Some("request_timeout"),
                ..ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "invalid_request_error",
                    format!(
                        "The request body did not arrive within {} s.",
                        BODY_READ_TIMEOUT.as_secs()
                    ),
                )
            });
        };
        let bytes = match read {
            Ok(b) => b,
            Err(rejection) => {
                let status = rejection.status();
                if status == StatusCode::PAYLOAD_TOO_LARGE {
                    return Err(ApiError {
                        code: Some("request_too_large"),
                        ..ApiError::new(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "invalid_request_error",
                            "The request body is larger than this server accepts.",
                        )
                    });
                }
                return Err(ApiError::bad_request(format!(
                    "Could not read the request body: {}",
                    rejection.body_text()
                )));
            }
        };
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::bad_request(
                "The request body is empty; expected a JSON object.",
            ));
        }
        let de = &mut serde_json::Deserializer::from_slice(&bytes);
        parse_error(serde_path_to_error::deserialize(de), &bytes).map_err(clipped)
    }
}

/// An error whose message and parameter echo client input, cut to a readable length (a 3 MB
/// field name or value is not sent back).
fn clipped(mut e: ApiError) -> ApiError {
    e.message = truncate(&e.message, 500).into_owned();
    e.param = e.param.map(|p| truncate(&p, 100).into_owned());
    e
}

/// The body's value, or an OpenAI-style error naming the field that is wrong.
fn parse_error<T>(
    result: Result<T, serde_path_to_error::Error<serde_json::Error>>,
    bytes: &[u8],
) -> Result<ApiJson<T>, ApiError> {
    match result {
        Ok(v) => Ok(ApiJson(v)),
        Err(err) => {
            let path = err.path().to_string();
            let inner = err.into_inner();
            if inner.is_syntax() || inner.is_eof() {
                Err(ApiError::bad_request(format!(
                    "We could not parse the JSON body of your request: {inner}"
                )))
            } else if path.is_empty() || path == "." {
                let msg = inner.to_string();
                // Flattened fields lose their path: find the field from the error's position
                // (a missing field is reported at the end of the object, so not for those).
                let located = (!msg.starts_with("missing field"))
                    .then(|| field_at(bytes, inner.line(), inner.column()))
                    .flatten();
                if let Some(field) = located {
                    return Err(ApiError::invalid_param(
                        &field,
                        format!("Invalid value for `{field}`: {msg}"),
                    ));
                }
                // "missing field `messages`": name the field.
                match msg
                    .split('`')
                    .nth(1)
                    .filter(|_| msg.starts_with("missing field"))
                {
                    Some(field) => Err(ApiError::invalid_param(
                        field,
                        format!("Missing required parameter: `{field}`."),
                    )),
                    None => Err(ApiError::bad_request(format!(
                        "Invalid request body: {msg}"
                    ))),
                }
            } else {
                Err(ApiError::invalid_param(
                    &path,
                    format!("Invalid value for `{path}`: {inner}"),
                ))
            }
        }
    }
}

/// The top-level field of a JSON object whose value spans the 1-based `line`/`column` position
/// (serde_json reports errors there). `None` when the position is outside every value.
fn field_at(body: &[u8], line: usize, column: usize) -> Option<String> {
    if line == 0 {
        return None;
    }
    // Byte offset of the position.
    let mut offset = 0;
    for _ in 1..line {
        offset += body[offset..].iter().position(|&b| b == b'\n')? + 1;
    }
    let target = offset + column.saturating_sub(1);
    let (mut depth, mut i) = (0usize, 0usize);
    let mut current: Option<String> = None;
    while i < body.len() && i <= target {
        match body[i] {
            b'"' => {
                let start = i + 1;
                i += 1;
                while i < body.len() && body[i] != b'"' {
                    i += if body[i] == b'\\' { 2 } else { 1 };
                }
                let end = i.min(body.len());
                if depth == 1 {
                    // A string at depth 1 followed by `:` is a key.
                    let rest = body.get(end + 1..).unwrap_or_default();
                    if rest.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b':') {
                        current = Some(String::from_utf8_lossy(&body[start..end]).into_owned());
                    }
                }
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    current
}

#[cfg(test)]
mod tests {
    use super::field_at;

    #[test]
    fn finds_the_field_around_an_error_position() {
        let body = br#"{"messages": [{"role": "user", "content": "a:b"}], "temperature": "hot"}"#;
        let col = body.windows(5).position(|w| w == b"\"hot\"").unwrap() + 5;
        assert_eq!(field_at(body, 1, col).as_deref(), Some("temperature"));
        assert_eq!(field_at(body, 1, 20).as_deref(), Some("messages"));
        let multi = b"{\n  \"top_p\": [1]\n}";
        assert_eq!(field_at(multi, 2, 13).as_deref(), Some("top_p"));
        assert_eq!(field_at(b"{}", 1, 1), None);
    }
}

/// An error in Ollama's shape: `{"error": "message"}` with an HTTP status.
#[derive(Debug, Clone)]
pub struct OllamaError {
    pub status: StatusCode,
    pub message: String,
    pub retry_after: Option<u64>,
}

impl OllamaError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        OllamaError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        OllamaError {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The JSON body, also used as the last line of a stream that failed part-way.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "error": self.message })
    }
}

impl From<ApiError> for OllamaError {
    fn from(e: ApiError) -> Self {
        OllamaError {
            status: e.status,
            message: e.message,
            retry_after: e.retry_after,
        }
    }
}

impl From<SubmitError> for OllamaError {
    fn from(e: SubmitError) -> Self {
        ApiError::from(e).into()
    }
}

impl IntoResponse for OllamaError {
    fn into_response(self) -> Response {
        json_with_retry(self.status, self.to_json(), self.retry_after)
    }
}

/// An error in Anthropic's shape, with the HTTP status and, where the client should come back
/// later, `Retry-After`.
#[derive(Debug, Clone)]
pub struct AnthropicError(pub ApiError);

impl AnthropicError {
    pub fn invalid(message: impl Into<String>) -> Self {
        AnthropicError(ApiError::bad_request(message))
    }

    /// Anthropic's error type for an HTTP status.
    pub fn kind(&self) -> &'static str {
        match self.0.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::SERVICE_UNAVAILABLE => "overloaded_error",
            s if s.is_client_error() => "invalid_request_error",
            _ => "api_error",
        }
    }

    /// The JSON body, also sent as the `error` event of a stream that fails part-way.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"type": "error", "error": {"type": self.kind(), "message": self.0.message}})
    }
}

impl From<ApiError> for AnthropicError {
    fn from(e: ApiError) -> Self {
        AnthropicError(e)
    }
}

impl From<tidepool_gateway::gateway::GatewayError> for AnthropicError {
    fn from(e: tidepool_gateway::gateway::GatewayError) -> Self {
        AnthropicError(e.into())
    }
}

impl From<tidepool_gateway::service::SubmitError> for AnthropicError {
    fn from(e: tidepool_gateway::service::SubmitError) -> Self {
        AnthropicError(e.into())
    }
}

impl IntoResponse for AnthropicError {
    fn into_response(self) -> Response {
        let mut resp = (self.0.status, axum::Json(self.to_json())).into_response();
        if let Some(s) = self.0.retry_after {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, s.into());
        }
        resp
    }
}

/// Whether `path` is the Anthropic API's (its errors take Anthropic's shape).
pub fn is_anthropic_path(path: &str) -> bool {
    path == "/v1/messages" || path.starts_with("/v1/messages/")
}

/// An error for a route-level failure (unknown route, wrong method, shutting down) in the shape
/// of the API the path belongs to: Ollama's under `/api/`, Anthropic's under `/v1/messages`,
/// OpenAI's elsewhere.
pub fn in_shape_for(path: &str, e: ApiError) -> Response {
    if path.starts_with("/api/") {
        OllamaError::from(e).into_response()
    } else if is_anthropic_path(path) {
        AnthropicError(e).into_response()
    } else {
        e.into_response()
    }
}

/// An error body with its status and, when the client should come back later, `Retry-After`.
fn json_with_retry(
    status: StatusCode,
    body: serde_json::Value,
    retry_after: Option<u64>,
) -> Response {
    let mut resp = (status, axum::Json(body)).into_response();
    if let Some(s) = retry_after {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    resp
}
