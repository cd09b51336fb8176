//! `POST /api/show` (what a model is: Ollama clients ask it for the context length and the
//! capabilities before they chat), and Ollama's model-file management calls (`/api/pull`,
//! `/api/push`, `/api/create`, `/api/copy`, `/api/delete`), which vramgate does not serve and
//! answers with what to do instead.
//!
//! `/api/show` names a model in `model` (or, as older clients do, `name`). A model inside a real
//! Ollama gets the request passed through to that Ollama (with Ollama's name of the model), its
//! answer unchanged; it is not loaded for it. Any other model is described from the catalog
//! (`catalog.rs`): `details`, `model_info` (the weights file's GGUF header, keys as Ollama spells
//! them), `capabilities` and `modified_at`. An unknown model is a 404 `{"error": "model 'x' not
//! found"}`, Ollama's own answer.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::AppState;
use super::error::{MANAGEMENT_BODY_LIMIT, read_limited};
use super::ollama::{error, with_model_header};
use super::proxy::strip_hop_by_hop;

/// How long a passed-through `/api/show` may take to start answering when
/// `proxy.first_byte_timeout` is 0 (Ollama answers it from its manifest, in milliseconds).
const OLLAMA_SHOW_TIMEOUT: Duration = Duration::from_secs(30);

/// `POST /api/show`.
pub(super) async fn show(State(state): State<AppState>, request: Request) -> Response {
    let bytes = match read_limited(request.into_body(), MANAGEMENT_BODY_LIMIT, None).await {
        Ok(bytes) => bytes,
        Err(rejection) => return super::ApiError::from(rejection).render(super::error::Surface::Ollama),
    };
    let mut object = match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(object)) => object,
        Ok(_) => return error(StatusCode::BAD_REQUEST, "the body must be a JSON object with a `model` field"),
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("the body is not valid JSON: {e}")),
    };
    let asked = match object.get("model").or_else(|| object.get("name")) {
        Some(Value::String(name)) if !name.trim().is_empty() => name.trim().to_string(),
        None | Some(Value::Null) => return error(StatusCode::BAD_REQUEST, "model is required: name it in `model`"),
        Some(_) => return error(StatusCode::BAD_REQUEST, "`model` must be a non-empty string"),
    };
    let Some(id) = model_id(&state, &asked) else {
        return error(StatusCode::NOT_FOUND, format!("model '{asked}' not found"));
    };
    let Some(facts) = state.catalog.get(&id) else {
        return error(StatusCode::NOT_FOUND, format!("model '{asked}' not found"));
    };
    if let Some((url, ollama_model)) = &facts.ollama {
        object.remove("name");
        object.insert("model".into(), Value::String(ollama_model.clone()));
        let response = pass_through(&state, url, &id, Value::Object(object)).await;
        return with_model_header(response, Some(&id));
    }
    let answer = json!({
        "modelfile": "",
        "parameters": "",
        "template": "",
        "details": facts.details(),
        "model_info": facts.model_info(),
        "capabilities": facts.capabilities,
        "modified_at": facts.modified_at(),
    });
    with_model_header(axum::Json(answer).into_response(), Some(&id))
}

/// The model id a name means: a model or its alias, the name without Ollama's default tag
/// (`llm:latest`), or an `[aliases]` name's first candidate.
fn model_id(state: &AppState, name: &str) -> Option<String> {
    let find = |name: &str| {
        state
            .arbiter
            .gate(name)
            .map(|gate| gate.id.clone())
            .or_else(|| state.arbiter.candidates(name)?.first().cloned())
    };
    find(name).or_else(|| find(name.strip_suffix(":latest")?))
}

/// Sends the show request to the Ollama that holds the model and returns its answer as it came;
/// a failure to reach it is a 502 naming the model and the address.
async fn pass_through(state: &AppState, url: &str, id: &str, body: Value) -> Response {
    let address = format!("{}/api/show", url.trim_end_matches('/'));
    let uri: axum::http::Uri = match address.parse() {
        Ok(uri) => uri,
        Err(e) => return error(StatusCode::BAD_GATEWAY, format!("cannot address Ollama for model {id} at {url}: {e}")),
    };
    let mut request = axum::http::Request::new(Body::from(body.to_string()));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = uri;
    request.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let limit = state.first_byte_timeout.unwrap_or(OLLAMA_SHOW_TIMEOUT);
    match tokio::time::timeout(limit, state.upstream.request(request)).await {
        Ok(Ok(response)) => {
            let (mut head, incoming) = response.into_parts();
            strip_hop_by_hop(&mut head.headers);
            Response::from_parts(head, Body::new(incoming))
        }
        Ok(Err(e)) => error(
            StatusCode::BAD_GATEWAY,
            format!("cannot reach Ollama at {url} for model {id}: {}", crate::client::root_cause(&e)),
        ),
        Err(_) => error(
            StatusCode::GATEWAY_TIMEOUT,
            format!("Ollama at {url} did not answer /api/show for model {id} within {limit:?}"),
        ),
    }
}

/// The status of the model-file calls vramgate does not serve: 501 Not Implemented (the server
/// does not support the function), which Ollama clients raise as an error carrying the message.
const NOT_SERVED: StatusCode = StatusCode::NOT_IMPLEMENTED;

/// `/api/pull`.
pub(super) async fn pull() -> Response {
    error(
        NOT_SERVED,
        "vramgate does not download models: pull it with the Ollama that will serve it (`ollama pull NAME`, \
         then add it as a [models.ID] table with backend = \"ollama\"), or download the weights file yourself \
         and add a [models.ID] table whose cmd serves it",
    )
}

/// `/api/push`.
pub(super) async fn push() -> Response {
    error(NOT_SERVED, "vramgate does not upload models: push it from the Ollama that holds it (`ollama push NAME`)")
}

/// `/api/create`.
pub(super) async fn create() -> Response {
    error(
        NOT_SERVED,
        "vramgate does not create models: create it in Ollama (`ollama create`) and add it as a [models.ID] table \
         with backend = \"ollama\", or add a [models.ID] table whose cmd serves the weights file",
    )
}

/// `/api/copy`.
pub(super) async fn copy() -> Response {
    error(
        NOT_SERVED,
        "vramgate does not copy models: give a model another name with `aliases` in its [models.ID] table, \
         or an [aliases] entry",
    )
}

/// `/api/delete`.
pub(super) async fn delete() -> Response {
    error(
        NOT_SERVED,
        "vramgate does not delete models: remove its [models.ID] table from vramgate's config, and delete its \
         files with the tool that made them (`ollama rm NAME` for a model inside Ollama)",
    )
}
