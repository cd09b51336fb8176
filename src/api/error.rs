//! Every error the HTTP API answers: one table from what went wrong to `(status, code, message)`,
//! and one renderer per surface, so that each surface's clients can read every error it gives:
//!
//! | surface | paths | body |
//! | --- | --- | --- |
//! | management | `/vramgate/...`, `/metrics`, `/`, anything else | `{"error": {"message", "code": STATUS}}` |
//! | OpenAI | `/v1`, `/v1/...` | `{"error": {"message", "type", "code": CODE}}` |
//! | Ollama | `/api`, `/api/...` | `{"error": "message"}` (the ollama library reads a string) |
//!
//! A 503 always carries `Retry-After` (5 s unless the error knows better). Handlers build an
//! [`ApiError`] from the table ([`Rejection`] for what the request got wrong before a handler
//! ran, [`ArbiterError`] for what the arbiter refused) and render it for the surface that was
//! asked; the extractors here ([`PathParam`], [`QueryParams`], [`JsonBody`]) replace axum's, whose
//! rejections are `text/plain`.

use axum::Json;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::arbiter::ArbiterError;

/// The `Retry-After` of a 503 that does not know when to come back (seconds).
const DEFAULT_RETRY_AFTER_SECS: u64 = 5;

/// The most a management request's body may hold (leases, modes, acknowledgements and attach
/// requests are a few hundred bytes; this is axum's default limit, kept).
pub const MANAGEMENT_BODY_LIMIT: usize = 2 << 20;

/// Which API a path belongs to, and so which error shape its clients read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// vramgate's own routes: `{"error": {"message", "code": STATUS}}`.
    Management,
    /// `/v1/...`: `{"error": {"message", "type", "code"}}`.
    OpenAi,
    /// `/api/...`: `{"error": "message"}`.
    Ollama,
}

impl Surface {
    /// The surface `path` belongs to.
    pub fn of(path: &str) -> Surface {
        if path == "/v1" || path.starts_with("/v1/") {
            Surface::OpenAi
        } else if path == "/api" || path.starts_with("/api/") {
            Surface::Ollama
        } else {
            Surface::Management
        }
    }
}

/// An error a person can act on: its status, the OpenAI-style code (the management shape shows the
/// status as its code), the message, and for a 503 when to come back.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after_secs: Option<u64>,
}

impl ApiError {
    /// An error with a status and a message; its code is the status's generic one.
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, code: generic_code(status), message: message.into(), retry_after_secs: None }
    }

    /// An error with a status, an OpenAI-style code and a message.
    pub fn coded(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), retry_after_secs: None }
    }

    /// The same error, saying when to come back (`Retry-After`, whole seconds, at least 1).
    pub fn retry_after(mut self, secs: u64) -> ApiError {
        self.retry_after_secs = Some(secs.max(1));
        self
    }

    /// The status code.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The answer, in the shape `surface`'s clients read.
    pub fn render(self, surface: Surface) -> Response {
        let body = match surface {
            Surface::Management => json!({ "error": { "message": self.message, "code": self.status.as_u16() } }),
            Surface::OpenAi => {
                let kind = if self.status.is_client_error() { "invalid_request_error" } else { "server_error" };
                json!({ "error": { "message": self.message, "type": kind, "code": self.code } })
            }
            Surface::Ollama => json!({ "error": self.message }),
        };
        let mut response = (self.status, Json(body)).into_response();
        let retry_after = match self.retry_after_secs {
            Some(secs) => Some(secs),
            None => (self.status == StatusCode::SERVICE_UNAVAILABLE).then_some(DEFAULT_RETRY_AFTER_SECS),
        };
        if let Some(secs) = retry_after
            && let Ok(value) = HeaderValue::from_str(&secs.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    }

    /// The answer in the shape of the surface `path` belongs to.
    pub fn render_for(self, path: &str) -> Response {
        self.render(Surface::of(path))
    }
}

/// Management handlers return `Result<_, ApiError>`: their errors take the management shape.
impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.render(Surface::Management)
    }
}

/// The code an error without a more specific one gets, from its status.
fn generic_code(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "invalid_request_error",
        StatusCode::UNAUTHORIZED => "invalid_api_key",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::CONFLICT => "conflict",
        StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        StatusCode::UNPROCESSABLE_ENTITY => "unprocessable",
        StatusCode::BAD_GATEWAY => "upstream_error",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        StatusCode::GATEWAY_TIMEOUT => "upstream_timeout",
        _ if status.is_client_error() => "invalid_request_error",
        _ => "internal",
    }
}

/// What a request got wrong before any handler logic ran, or what the HTTP layer itself refused.
#[derive(Debug, Clone)]
pub enum Rejection {
    /// No route at the path.
    NoRoute { path: String },
    /// A route that does not take the method.
    WrongMethod { method: String, path: String },
    /// A path parameter that cannot be read (not UTF-8, say); `detail` names the parameter.
    BadPath { path: String, detail: String },
    /// A query string that cannot be read; `parameter` is the one at fault, where known.
    BadQuery { parameter: Option<String>, detail: String },
    /// A body over the route's limit; `setting` is the config key that sets it, if any.
    BodyTooLarge { limit_bytes: usize, setting: Option<&'static str> },
    /// A body that broke off or could not be read.
    BodyUnreadable { detail: String },
    /// A JSON body that is not valid JSON or not of the expected shape; `what` names the request,
    /// `field` the field at fault where known, `expected` an example of a good body.
    BadJson { what: &'static str, field: Option<String>, detail: String, expected: Option<&'static str> },
    /// The proxy's budget for request bodies held in memory at once is spent.
    BufferBudgetSpent { budget_bytes: usize },
}

impl Rejection {
    /// The table: this rejection's status, code and message.
    pub fn entry(&self) -> (StatusCode, &'static str, String) {
        match self {
            Rejection::NoRoute { path } => {
                (StatusCode::NOT_FOUND, "not_found", format!("no endpoint at {path}; see GET / for the list"))
            }
            Rejection::WrongMethod { method, path } => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{method} is not served at {path}; see GET / for the methods each endpoint takes"),
            ),
            Rejection::BadPath { path, detail } => {
                (StatusCode::BAD_REQUEST, "invalid_path", format!("invalid path {path}: {detail}"))
            }
            Rejection::BadQuery { parameter: Some(parameter), detail } => {
                (StatusCode::BAD_REQUEST, "invalid_query", format!("invalid query parameter `{parameter}`: {detail}"))
            }
            Rejection::BadQuery { parameter: None, detail } => {
                (StatusCode::BAD_REQUEST, "invalid_query", format!("invalid query string: {detail}"))
            }
            Rejection::BodyTooLarge { limit_bytes, setting } => {
                let limit = crate::units::Mib(u64::try_from(*limit_bytes >> 20).unwrap_or(u64::MAX));
                let message = match setting {
                    Some(setting) => format!("the request body is larger than {setting} ({limit})"),
                    None => format!("the request body is larger than this endpoint takes ({limit})"),
                };
                (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", message)
            }
            Rejection::BodyUnreadable { detail } => {
                (StatusCode::BAD_REQUEST, "invalid_body", format!("cannot read the request body: {detail}"))
            }
            Rejection::BadJson { what, field, detail, expected } => {
                let mut message = match field {
                    Some(field) => format!("invalid {what}: field `{field}`: {detail}"),
                    None => format!("invalid {what}: {detail}"),
                };
                if let Some(expected) = expected {
                    message.push_str(&format!("; expected {expected}"));
                }
                (StatusCode::BAD_REQUEST, "invalid_json", message)
            }
            Rejection::BufferBudgetSpent { budget_bytes } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_busy",
                format!(
                    "vramgate is holding {} of request bodies already (proxy.max_buffered); try again shortly",
                    crate::units::Mib(u64::try_from(*budget_bytes >> 20).unwrap_or(u64::MAX))
                ),
            ),
        }
    }
}

impl From<Rejection> for ApiError {
    fn from(rejection: Rejection) -> ApiError {
        let (status, code, message) = rejection.entry();
        ApiError::coded(status, code, message)
    }
}

/// Which kind of route an arbiter error answers: the management API reports what happened to the
/// thing asked for; the proxy surfaces report whether the request can be served, as OpenAI
/// clients expect (a model that never fits is "insufficient_vram", 503, not a 422).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `/vramgate/...`.
    Management,
    /// `/v1/...` and `/api/...`.
    Proxy,
}

/// The table for arbiter errors: `(status on management routes, status on the proxy, code)`.
pub fn arbiter_entry(error: &ArbiterError) -> (StatusCode, StatusCode, &'static str) {
    use StatusCode as S;
    match error {
        ArbiterError::UnknownModel { .. } => (S::NOT_FOUND, S::NOT_FOUND, "model_not_found"),
        ArbiterError::UnknownLease(_) => (S::NOT_FOUND, S::SERVICE_UNAVAILABLE, "cancelled"),
        ArbiterError::NotFound(_) => (S::NOT_FOUND, S::NOT_FOUND, "not_found"),
        ArbiterError::NeverFits(_) => (S::UNPROCESSABLE_ENTITY, S::SERVICE_UNAVAILABLE, "insufficient_vram"),
        ArbiterError::Timeout { .. } | ArbiterError::QueueFull(_) => {
            (S::SERVICE_UNAVAILABLE, S::SERVICE_UNAVAILABLE, "insufficient_vram")
        }
        ArbiterError::TooManyWaiters(_) => (S::SERVICE_UNAVAILABLE, S::SERVICE_UNAVAILABLE, "too_many_waiters"),
        ArbiterError::Cooldown { .. } => (S::SERVICE_UNAVAILABLE, S::SERVICE_UNAVAILABLE, "model_failed"),
        ArbiterError::ShuttingDown => (S::SERVICE_UNAVAILABLE, S::SERVICE_UNAVAILABLE, "shutting_down"),
        ArbiterError::StartFailed { .. } => (S::BAD_GATEWAY, S::BAD_GATEWAY, "model_start_failed"),
        ArbiterError::Cancelled(_) => (S::CONFLICT, S::SERVICE_UNAVAILABLE, "cancelled"),
        ArbiterError::Conflict(_) => (S::CONFLICT, S::CONFLICT, "conflict"),
        ArbiterError::Invalid(_) => (S::BAD_REQUEST, S::BAD_REQUEST, "invalid_request_error"),
        // A mode step's own error says what went wrong on the management API.
        ArbiterError::InMode { inner, .. } => {
            let (management, _, _) = arbiter_entry(inner);
            (management, S::SERVICE_UNAVAILABLE, "mode_failed")
        }
    }
}

impl ApiError {
    /// An arbiter error as `route` reports it; a model in its failure cooldown says when the next
    /// try is due.
    pub fn arbiter(error: ArbiterError, route: Route) -> ApiError {
        let (management, proxy, code) = arbiter_entry(&error);
        let status = match route {
            Route::Management => management,
            Route::Proxy => proxy,
        };
        let retry = match &error {
            ArbiterError::Cooldown { retry_in, .. } => Some(retry_in.as_secs()),
            _ => None,
        };
        let error = ApiError::coded(status, code, error.to_string());
        match retry {
            Some(secs) => error.retry_after(secs),
            None => error,
        }
    }
}

impl From<ArbiterError> for ApiError {
    fn from(error: ArbiterError) -> ApiError {
        ApiError::arbiter(error, Route::Management)
    }
}

/// One path parameter as a string, rejected in the surface's shape (axum's `Path` answers
/// `text/plain`): `%FF` in a model name is a 400 naming the parameter.
pub struct PathParam(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathParam {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<String>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(PathParam(value)),
            Err(rejection) => {
                let path = parts.uri.path().to_string();
                let rejection = Rejection::BadPath { path: path.clone(), detail: rejection.body_text() };
                Err(ApiError::from(rejection).render_for(&path))
            }
        }
    }
}

/// The query string deserialized into `T`, rejected in the surface's shape with the parameter at
/// fault named (axum's `Query` answers `text/plain` and does not name it).
pub struct QueryParams<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for QueryParams<T> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or("");
        let deserializer = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(deserializer).map(QueryParams).map_err(|e| {
            let parameter = e.path().to_string();
            let parameter = (parameter != ".").then_some(parameter);
            let rejection = Rejection::BadQuery { parameter, detail: e.into_inner().to_string() };
            ApiError::from(rejection).render_for(parts.uri.path())
        })
    }
}

/// What a [`JsonBody`] is, for its error messages.
pub trait JsonRequest: DeserializeOwned {
    /// The request's name in messages ("lease request").
    const WHAT: &'static str;
    /// An example of a good body, shown with shape errors.
    const EXAMPLE: Option<&'static str> = None;
    /// What an empty (or all-whitespace) body means; `None`: it is an error like any bad JSON.
    fn when_empty() -> Option<Self> {
        None
    }
}

/// A management request's JSON body: read within [`MANAGEMENT_BODY_LIMIT`] (413 above it) and
/// deserialized with the field at fault named; every rejection in the surface's shape.
pub struct JsonBody<T>(pub T);

impl<T: JsonRequest, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = Response;

    async fn from_request(request: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let path = request.uri().path().to_string();
        let bytes = read_limited(request.into_body(), MANAGEMENT_BODY_LIMIT, None)
            .await
            .map_err(|rejection| ApiError::from(rejection).render_for(&path))?;
        if bytes.iter().all(u8::is_ascii_whitespace)
            && let Some(value) = T::when_empty()
        {
            return Ok(JsonBody(value));
        }
        parse_json::<T>(&bytes).map(JsonBody).map_err(|rejection| ApiError::from(rejection).render_for(&path))
    }
}

/// `bytes` as a `T`, or the rejection naming the field at fault.
pub fn parse_json<T: JsonRequest>(bytes: &[u8]) -> Result<T, Rejection> {
    let bad = |field: Option<String>, detail: String| Rejection::BadJson {
        what: T::WHAT,
        field,
        detail,
        expected: T::EXAMPLE,
    };
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let field = e.path().to_string();
        bad((field != ".").then_some(field), e.into_inner().to_string())
    })?;
    // Trailing text after the value is an error, as `serde_json::from_slice` has it.
    deserializer.end().map_err(|e| bad(None, e.to_string()))?;
    Ok(value)
}

/// Reads a whole body of at most `limit` bytes; `setting` names the config key of the limit.
pub async fn read_limited(
    mut body: axum::body::Body,
    limit: usize,
    setting: Option<&'static str>,
) -> Result<axum::body::Bytes, Rejection> {
    use http_body_util::BodyExt;
    let too_large = Rejection::BodyTooLarge { limit_bytes: limit, setting };
    // A declared length over the limit is refused before anything is kept.
    if http_body::Body::size_hint(&body).lower() > u64::try_from(limit).unwrap_or(u64::MAX) {
        discard_rest(&mut body).await;
        return Err(too_large);
    }
    let mut whole = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Rejection::BodyUnreadable { detail: crate::client::root_cause(&e) })?;
        let Ok(data) = frame.into_data() else { continue };
        if whole.len().checked_add(data.len()).is_none_or(|n| n > limit) {
            discard_rest(&mut body).await;
            return Err(too_large);
        }
        whole.extend_from_slice(&data);
    }
    Ok(axum::body::Bytes::from(whole))
}

/// The most of a refused body read (and dropped) before the refusal is sent.
const DISCARD_LIMIT_BYTES: usize = 64 << 20;
/// How long reading a refused body may take before the refusal is sent anyway.
const DISCARD_LIMIT_TIME: std::time::Duration = std::time::Duration::from_secs(2);

/// Reads and drops what is left of a refused body (at most [`DISCARD_LIMIT_BYTES`], for at most
/// [`DISCARD_LIMIT_TIME`]), keeping nothing. A server that answers and closes with the body still
/// arriving makes the kernel reset the connection, and the client loses the answer (a 413 it
/// could act on) to "connection reset"; a body too large to drain still gets that.
pub async fn discard_rest(body: &mut axum::body::Body) {
    use http_body_util::BodyExt;
    let drain = async {
        let mut dropped: usize = 0;
        while let Some(Ok(frame)) = body.frame().await {
            if let Some(data) = frame.data_ref() {
                dropped = dropped.saturating_add(data.len());
                if dropped > DISCARD_LIMIT_BYTES {
                    return;
                }
            }
        }
    };
    let _ = tokio::time::timeout(DISCARD_LIMIT_TIME, drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body_json(response: Response) -> serde_json::Value {
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16).await.expect("body");
        serde_json::from_slice(&bytes).expect("json body")
    }

    #[test]
    fn paths_belong_to_their_surface() {
        assert_eq!(Surface::of("/v1"), Surface::OpenAi);
        assert_eq!(Surface::of("/v1/chat/completions"), Surface::OpenAi);
        assert_eq!(Surface::of("/v1x"), Surface::Management);
        assert_eq!(Surface::of("/api"), Surface::Ollama);
        assert_eq!(Surface::of("/api/chat"), Surface::Ollama);
        assert_eq!(Surface::of("/apix"), Surface::Management);
        assert_eq!(Surface::of("/vramgate/leases"), Surface::Management);
        assert_eq!(Surface::of("/"), Surface::Management);
    }

    #[tokio::test]
    async fn one_error_three_shapes_and_a_503_says_when_to_come_back() {
        let error = ApiError::from(Rejection::BufferBudgetSpent { budget_bytes: 1 << 30 });
        let management = error.clone().render(Surface::Management);
        assert_eq!(management.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(management.headers()[header::RETRY_AFTER], "5");
        assert_eq!(management.headers()[header::CONTENT_TYPE], "application/json");
        let body = body_json(management).await;
        assert_eq!(body["error"]["code"], 503);
        assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("proxy.max_buffered")), "{body}");

        let openai = error.clone().render(Surface::OpenAi);
        assert_eq!(openai.headers()[header::RETRY_AFTER], "5");
        let body = body_json(openai).await;
        assert_eq!(body["error"]["code"], "server_busy");
        assert_eq!(body["error"]["type"], "server_error");

        let ollama = error.retry_after(9).render(Surface::Ollama);
        assert_eq!(ollama.headers()[header::RETRY_AFTER], "9");
        let body = body_json(ollama).await;
        assert!(body["error"].as_str().is_some_and(|m| m.contains("proxy.max_buffered")), "{body}");
    }

    #[tokio::test]
    async fn arbiter_errors_keep_each_routes_status_and_a_cooldown_says_when() {
        let never = || ArbiterError::NeverFits("needs 9000 MiB".into());
        let management = ApiError::arbiter(never(), Route::Management);
        assert_eq!(management.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let proxy = ApiError::arbiter(never(), Route::Proxy).render(Surface::OpenAi);
        assert_eq!(proxy.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body_json(proxy).await["error"]["code"], "insufficient_vram");

        let cooldown = ArbiterError::Cooldown {
            model: "llm".into(),
            failures: 3,
            retry_in: std::time::Duration::from_secs(42),
            last_error: "exited".into(),
        };
        let response = ApiError::arbiter(cooldown, Route::Proxy).render(Surface::Ollama);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "42");
        let body = body_json(response).await;
        assert!(body["error"].as_str().is_some_and(|m| m.contains("llm")), "{body}");

        let lease = ApiError::from(ArbiterError::UnknownLease("l-1".into()));
        assert_eq!(lease.status(), StatusCode::NOT_FOUND);
        assert_eq!(ApiError::arbiter(ArbiterError::UnknownLease("l-1".into()), Route::Proxy).status(), {
            StatusCode::SERVICE_UNAVAILABLE
        });
    }

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Example {
        #[serde(default)]
        count: Option<u32>,
    }

    impl JsonRequest for Example {
        const WHAT: &'static str = "example request";
        const EXAMPLE: Option<&'static str> = Some("{\"count\": 1}");
    }

    #[test]
    fn json_shape_errors_name_the_field_and_syntax_errors_the_position() {
        let Err(Rejection::BadJson { field, detail, .. }) = parse_json::<Example>(br#"{"count": "x"}"#) else {
            panic!("a string for a number is rejected");
        };
        assert_eq!(field.as_deref(), Some("count"), "{detail}");
        let Err(rejection) = parse_json::<Example>(br#"{"count": 1"#) else { panic!("cut-off JSON is rejected") };
        let (status, code, message) = rejection.entry();
        assert_eq!((status, code), (StatusCode::BAD_REQUEST, "invalid_json"));
        assert!(message.contains("example request") && message.contains("line 1"), "{message}");
        assert!(message.contains("expected {\"count\": 1}"), "{message}");
        assert!(parse_json::<Example>(br#"{"count": 1} x"#).is_err(), "trailing text is rejected");
        assert_eq!(parse_json::<Example>(br#"{"count": 1}"#).ok().and_then(|e| e.count), Some(1));
    }
}
