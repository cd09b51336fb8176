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
//!
//! A process model that is running is also asked what it runs with: llama-server's `GET /props`
//! tells the context size of the running server (`default_generation_settings.n_ctx`), which goes
//! into `parameters` as `num_ctx` (where Ollama puts a model's context size; `model_info` keeps
//! the trained length, as Ollama does), and whether it takes images (`modalities.vision`). Not
//! running, the command's `-c`/`--ctx-size` is the figure. Asking is best effort: a server without
//! `/props` (404), a slow one, or an answer that does not tell leaves the answer as the config and
//! the header make it.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::AppState;
use super::error::{MANAGEMENT_BODY_LIMIT, Rejection, read_limited};
use super::ollama::{error, with_model_header};
use super::proxy::strip_hop_by_hop;

/// How long a running model's server may take to answer `GET /props` (whole answer, body
/// included) before `/api/show` answers without it; `proxy.first_byte_timeout`, when shorter,
/// bounds it too. llama-server answers from memory, in milliseconds.
const PROPS_TIMEOUT: Duration = Duration::from_secs(2);

/// The most of a `/props` answer read (llama-server's is a few KiB, most of it the chat template).
const PROPS_BODY_LIMIT: usize = 1 << 20;

/// How wide Ollama pads a parameter's name in `parameters` (`num_ctx` then the value, aligned).
const PARAMETER_NAME_WIDTH: usize = 30;

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
    let running = server_props(&state, &id).await.unwrap_or_default();
    let mut capabilities = facts.capabilities.clone();
    if running.vision && !capabilities.contains(&"vision") {
        capabilities.push("vision");
    }
    let parameters = running
        .n_ctx
        .or(facts.ctx_size)
        .map(|n_ctx| format!("{:<PARAMETER_NAME_WIDTH$} {n_ctx}", "num_ctx"))
        .unwrap_or_default();
    let answer = json!({
        "modelfile": "",
        "parameters": parameters,
        "template": "",
        "details": facts.details(),
        "model_info": facts.model_info(),
        "capabilities": capabilities,
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

/// What a running model's server says about itself in `/props`.
#[derive(Debug, Default, PartialEq, Eq)]
struct ServerProps {
    /// The context size it runs with.
    n_ctx: Option<u64>,
    /// It takes images.
    vision: bool,
}

/// Asks model `id`'s server for its `/props` when the model is ready (not loading it for that);
/// `None` when it is not running, or its server does not answer in time with JSON (logged at
/// debug: a server that is not llama-server has no `/props`, which is no fault).
async fn server_props(state: &AppState, id: &str) -> Option<ServerProps> {
    let view = state.arbiter.view();
    let model = view.models.iter().find(|model| model.id == id && model.state == "ready")?;
    let upstream = model.upstream.as_deref()?;
    let limit = state.first_byte_timeout.map_or(PROPS_TIMEOUT, |first_byte| first_byte.min(PROPS_TIMEOUT));
    match tokio::time::timeout(limit, fetch_props(state, upstream)).await {
        Ok(Ok(props)) => Some(props),
        Ok(Err(reason)) => {
            tracing::debug!(model = %id, "no /props from {upstream}: {reason}");
            None
        }
        Err(_) => {
            tracing::debug!(model = %id, "no /props from {upstream}: no answer within {limit:?}");
            None
        }
    }
}

/// `GET {upstream}/props`, read up to [`PROPS_BODY_LIMIT`].
async fn fetch_props(state: &AppState, upstream: &str) -> Result<ServerProps, String> {
    let address = format!("{}/props", upstream.trim_end_matches('/'));
    let uri: axum::http::Uri = address.parse().map_err(|e| format!("bad address {address}: {e}"))?;
    let mut request = axum::http::Request::new(Body::empty());
    *request.uri_mut() = uri;
    let response = state.upstream.request(request).await.map_err(|e| crate::client::root_cause(&e))?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("status {status}"));
    }
    let bytes =
        read_limited(Body::new(response.into_body()), PROPS_BODY_LIMIT, None).await.map_err(
            |rejection| match rejection {
                Rejection::BodyTooLarge { .. } => format!("the answer is larger than {PROPS_BODY_LIMIT} bytes"),
                Rejection::BodyUnreadable { detail } => format!("the answer broke off: {detail}"),
                other => other.entry().2,
            },
        )?;
    let props: Value = serde_json::from_slice(&bytes).map_err(|e| format!("not JSON: {e}"))?;
    Ok(parse_props(&props))
}

/// The figures of a `/props` answer: `default_generation_settings.n_ctx` (a positive integer)
/// and `modalities.vision` (true); anything else there is ignored.
fn parse_props(props: &Value) -> ServerProps {
    ServerProps {
        n_ctx: props.pointer("/default_generation_settings/n_ctx").and_then(Value::as_u64).filter(|&n| n > 0),
        vision: props.pointer("/modalities/vision").and_then(Value::as_bool).unwrap_or(false),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn props_tell_the_running_context_size_and_vision() {
        // Abridged from llama-server's answer (b1-0c1e570, `-c 2048`).
        let props = json!({
            "default_generation_settings": {"params": {"n_predict": -1}, "n_ctx": 2048},
            "total_slots": 4,
            "modalities": {"vision": true, "video": false, "audio": false},
        });
        assert_eq!(parse_props(&props), ServerProps { n_ctx: Some(2048), vision: true });
        let older = json!({"default_generation_settings": {"n_ctx": 512}});
        assert_eq!(parse_props(&older), ServerProps { n_ctx: Some(512), vision: false });
        for untelling in [
            json!({}),
            json!([1, 2]),
            json!({"default_generation_settings": {"n_ctx": "2048"}, "modalities": {"vision": "yes"}}),
            json!({"default_generation_settings": {"n_ctx": 0}}),
            json!({"default_generation_settings": {"n_ctx": -1}}),
            json!({"n_ctx": 2048}),
        ] {
            assert_eq!(parse_props(&untelling), ServerProps::default(), "{untelling}");
        }
    }
}
