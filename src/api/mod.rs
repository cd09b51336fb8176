//! The HTTP API (axum). Handlers read shared state through channels and never own it.
//!
//! Management endpoints live under [`PREFIX`] so that the OpenAI (`/v1/...`) and Ollama
//! (`/api/...`) surfaces can use their standard paths beside them; `/metrics` is at the path
//! Prometheus expects.

mod auth;

pub mod cors;
pub mod error;
mod external;
mod leases;
mod manage;
mod models;
mod ollama;
mod ollama_show;
mod ollama_translate;
pub mod openai;
mod plan;
pub mod proxy;
mod relay;
pub mod server;
mod ui;

use std::sync::Arc;

use axum::Router;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{any, delete, get, post};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::arbiter::ArbiterHandle;
use crate::events::EventBus;
use crate::monitor::GpuView;
pub use error::ApiError;
use error::Rejection;

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
    pub upstream: proxy::UpstreamClient,
    /// `proxy.max_buffered`: the bytes of request bodies the proxy may hold at once.
    pub body_budget: proxy::BodyBudget,
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
    /// What is known about each model beyond its state (weights file, GGUF header, times).
    pub catalog: Arc<crate::catalog::Catalog>,
    /// `server.cors_origins`.
    pub cors: cors::CorsOrigins,
    /// The counts `/metrics` exposes beside the gauges; the proxy records its requests here.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The recent samples, for `/vramgate/history` and the dashboard.
    pub history: Arc<crate::history::History>,
    /// The monitor's sampler: `vramgate plan --measure` makes it sample fast while it measures.
    pub sampler: crate::monitor::Sampler,
}

/// Every route; with a token, all of them but health behind [`auth`]; all of them behind
/// [`cors`] (outside the token check: a preflight carries no credentials).
pub fn router(state: AppState) -> Router {
    let token = state.token.clone();
    let origins = state.cors.clone();
    let guarded = Router::new()
        .route("/", get(manage::index))
        .route(&format!("{PREFIX}/status"), get(manage::status))
        .route(&format!("{PREFIX}/events"), get(manage::events))
        .route(&format!("{PREFIX}/history"), get(manage::history))
        .route(&format!("{PREFIX}/models"), get(models::list))
        .route(&format!("{PREFIX}/models/{{name}}/load"), post(models::load))
        .route(&format!("{PREFIX}/models/{{name}}/unload"), post(models::unload))
        .route(&format!("{PREFIX}/models/{{name}}/logs"), get(models::logs))
        .route(&format!("{PREFIX}/models/{{name}}/attach"), post(external::attach))
        .route(&format!("{PREFIX}/models/{{name}}/ack"), post(external::ack))
        .route(&format!("{PREFIX}/mode"), post(external::set_mode).get(external::get_mode))
        .route(&format!("{PREFIX}/plan"), post(plan::plan))
        .route(&format!("{PREFIX}/leases"), post(leases::create).get(leases::list))
        .route(&format!("{PREFIX}/leases/{{id}}/renew"), post(leases::renew))
        .route(&format!("{PREFIX}/leases/{{id}}"), delete(leases::release))
        .route("/metrics", get(manage::metrics))
        .route("/v1/models", get(openai::models))
        // `{*id}`: a model id may hold a slash (`org/model`).
        .route("/v1/models/{*id}", get(openai::model))
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
        .route("/api/show", post(ollama_show::show))
        // Model-file management, which vramgate leaves to the tools that own the files.
        .route("/api/pull", any(ollama_show::pull))
        .route("/api/push", any(ollama_show::push))
        .route("/api/create", any(ollama_show::create))
        .route("/api/copy", any(ollama_show::copy))
        .route("/api/delete", any(ollama_show::delete))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    // A layer wraps only the routes (and the fallback) added before it, so health, added after,
    // stays open: supervisors and load balancers probe it without credentials.
    let guarded = match token {
        Some(token) => guarded.layer(axum::middleware::from_fn_with_state(Arc::new(token), auth::require_token)),
        None => guarded,
    };
    // The dashboard's files hold no data (the page asks for the token before it reads any), so
    // they are served without it; a browser asking for `/` is sent to them before the token
    // check, while `curl /` still gets the (guarded) text list.
    let all = guarded
        .route(&format!("{PREFIX}/health"), get(manage::health))
        .merge(ui::routes())
        .layer(axum::middleware::from_fn(ui::redirect_browsers));
    let all =
        if origins.is_empty() { all } else { all.layer(axum::middleware::from_fn_with_state(origins, cors::cors)) };
    all.with_state(state)
}

async fn not_found(uri: axum::http::Uri) -> Response {
    let path = uri.path();
    ApiError::from(Rejection::NoRoute { path: path.to_string() }).render_for(path)
}

/// A known path asked with a method it does not serve (`GET /api/chat`).
async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    let path = uri.path();
    ApiError::from(Rejection::WrongMethod { method: method.to_string(), path: path.to_string() }).render_for(path)
}

/// An error in the shape of the surface `path` belongs to (see [`error`]); `openai_code` is the
/// OpenAI-style code.
pub(super) fn surface_error(path: &str, status: StatusCode, message: &str, openai_code: &'static str) -> Response {
    ApiError::coded(status, openai_code, message).render_for(path)
}
