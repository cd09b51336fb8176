//! The HTTP API (axum). Handlers read shared state through channels and never own it.
//!
//! Management endpoints live under [`PREFIX`] so that the OpenAI (`/v1/...`) and Ollama
//! (`/api/...`) surfaces can use their standard paths beside them; `/metrics` is at the path
//! Prometheus expects.

mod auth;
mod external;
mod leases;
mod manage;
mod models;
mod ollama;
pub mod openai;

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, delete, get, post};
use axum::{Json, Router};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::arbiter::{ArbiterError, ArbiterHandle};
use crate::events::EventBus;
use crate::monitor::GpuView;

/// The prefix of every management endpoint.
pub const PREFIX: &str = "/vramgate";

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The monitor's latest view.
    pub gpu: watch::Receiver<Arc<GpuView>>,
    /// The arbiter, for models and leases.
    pub arbiter: ArbiterHandle,
    /// `scheduler.queue_timeout`: a lease's default wait.
    pub queue_timeout: std::time::Duration,
    /// `defaults.priority`: a lease's default priority.
    pub default_priority: i32,
    /// The proxy's pooled HTTP/1 client to model servers.
    pub upstream: openai::UpstreamClient,
    /// `proxy.max_body` in bytes.
    pub max_body_bytes: usize,
    /// `proxy.first_byte_timeout`; `None` = never.
    pub first_byte_timeout: Option<std::time::Duration>,
    /// `proxy.stall_timeout`; `None` = never.
    pub stall_timeout: Option<std::time::Duration>,
    /// Events, for the stream.
    pub bus: EventBus,
    /// Cancelled at shutdown; long-lived responses (the event stream) end on it.
    pub shutdown: CancellationToken,
    /// `server.token` (or `VRAMGATE_TOKEN`): when set, every route but health requires it.
    pub token: Option<crate::config::Token>,
}

/// Every route; with a token, all of them but health behind [`auth`].
pub fn router(state: AppState) -> Router {
    let token = state.token.clone();
    let guarded = Router::new()
        .route("/", get(manage::index))
        .route(&format!("{PREFIX}/status"), get(manage::status))
        .route(&format!("{PREFIX}/events"), get(manage::events))
        .route(&format!("{PREFIX}/models"), get(models::list))
        .route(&format!("{PREFIX}/models/{{name}}/load"), post(models::load))
        .route(&format!("{PREFIX}/models/{{name}}/unload"), post(models::unload))
        .route(&format!("{PREFIX}/models/{{name}}/logs"), get(models::logs))
        .route(&format!("{PREFIX}/models/{{name}}/attach"), post(external::attach))
        .route(&format!("{PREFIX}/models/{{name}}/ack"), post(external::ack))
        .route(&format!("{PREFIX}/mode"), post(external::set_mode).get(external::get_mode))
        .route(&format!("{PREFIX}/leases"), post(leases::create).get(leases::list))
        .route(&format!("{PREFIX}/leases/{{id}}/renew"), post(leases::renew))
        .route(&format!("{PREFIX}/leases/{{id}}"), delete(leases::release))
        .route("/metrics", get(manage::metrics))
        .route("/v1/models", get(openai::models))
        .route("/v1/chat/completions", post(openai::forward))
        .route("/v1/completions", post(openai::forward))
        .route("/v1/embeddings", post(openai::forward))
        .route("/v1/audio/transcriptions", post(openai::forward))
        .route("/v1/audio/speech", post(openai::forward))
        // Any other /v1 path of a named model passes through unchanged.
        .route("/v1/{*rest}", any(openai::forward))
        // The Ollama-compatible surface.
        .route("/api/chat", post(ollama::chat))
        .route("/api/generate", post(ollama::generate))
        .route("/api/embed", post(ollama::embed))
        .route("/api/embeddings", post(ollama::embeddings))
        .route("/api/tags", get(ollama::tags))
        .route("/api/ps", get(ollama::ps))
        .route("/api/version", get(ollama::version))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    // A layer wraps only the routes (and the fallback) added before it, so health, added after,
    // stays open: supervisors and load balancers probe it without credentials.
    let guarded = match token {
        Some(token) => guarded.layer(axum::middleware::from_fn_with_state(Arc::new(token), auth::require_token)),
        None => guarded,
    };
    guarded.route(&format!("{PREFIX}/health"), get(manage::health)).with_state(state)
}

/// A JSON error a person can act on.
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    /// An error with a status code and a message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into() }
    }
}

/// The HTTP status for an arbiter error on the management API.
fn arbiter_status(error: &ArbiterError) -> StatusCode {
    match error {
        ArbiterError::UnknownModel { .. } | ArbiterError::UnknownLease(_) | ArbiterError::NotFound(_) => {
            StatusCode::NOT_FOUND
        }
        ArbiterError::NeverFits(_) => StatusCode::UNPROCESSABLE_ENTITY,
        ArbiterError::Timeout { .. }
        | ArbiterError::QueueFull(_)
        | ArbiterError::TooManyWaiters(_)
        | ArbiterError::Cooldown { .. }
        | ArbiterError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        ArbiterError::StartFailed { .. } => StatusCode::BAD_GATEWAY,
        ArbiterError::Cancelled(_) | ArbiterError::Conflict(_) => StatusCode::CONFLICT,
        ArbiterError::Invalid(_) => StatusCode::BAD_REQUEST,
        // The step's own error says what went wrong.
        ArbiterError::InMode { inner, .. } => arbiter_status(inner),
    }
}

impl From<ArbiterError> for ApiError {
    fn from(error: ArbiterError) -> ApiError {
        ApiError::new(arbiter_status(&error), error.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": { "message": self.message, "code": self.status.as_u16() } })))
            .into_response()
    }
}

async fn not_found(uri: axum::http::Uri) -> Response {
    let path = uri.path();
    surface_error(path, StatusCode::NOT_FOUND, &format!("no endpoint at {path}; see GET / for the list"), "not_found")
}

/// A known path asked with a method it does not serve (`GET /api/chat`).
async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    let path = uri.path();
    let message = format!("{method} is not served at {path}; see GET / for the methods each endpoint takes");
    surface_error(path, StatusCode::METHOD_NOT_ALLOWED, &message, "method_not_allowed")
}

/// An error in the shape of the surface `path` belongs to, so that each surface's clients can
/// read it: OpenAI's `{"error": {"message", "type", "code"}}` under `/v1/`, Ollama's
/// `{"error": "…"}` under `/api/` (its clients call string methods on it), and the management
/// shape elsewhere. `openai_code` is the OpenAI-style code.
pub(super) fn surface_error(path: &str, status: StatusCode, message: &str, openai_code: &str) -> Response {
    if path == "/v1" || path.starts_with("/v1/") {
        openai::error(status, message, openai_code)
    } else if path == "/api" || path.starts_with("/api/") {
        (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
    } else {
        ApiError::new(status, message).into_response()
    }
}
