//! The OpenAI-compatible surface: `/v1/...` requests name a model; vramgate makes room, starts it
//! if needed, forwards the request and streams the answer back.
//!
//! The per-request path for a ready model is: read the body (bounded), find the `model` field,
//! pin the model through its gate (a read lock and an atomic, no message to the arbiter), forward
//! over a pooled connection, and stream the response back holding the pin; the pin is dropped when
//! the body ends or the client goes away. Only a model that is not ready costs a round trip to the
//! arbiter, which loads it under the usual admission rules.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;
use super::error::{ApiError, PathParam, Surface};
use super::proxy::{self, external_refusal, pinned_response, strip_hop_by_hop};
use crate::arbiter::gate::{Pin, UpstreamKind};
use crate::metrics;

pub use super::proxy::{MODEL_HEADER, UpstreamClient, upstream_client};

/// `GET /v1/models`: every model and alias, with its state.
pub(super) async fn models(State(state): State<AppState>) -> Json<serde_json::Value> {
    let view = state.arbiter.view();
    let mut data = Vec::new();
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for name in state.arbiter.names() {
        if let Some(candidates) = state.arbiter.candidates(&name) {
            groups.push((name, candidates.to_vec()));
        }
    }
    for model in &view.models {
        let created = state.catalog.created(&model.id);
        data.push(
            json!({ "id": model.id, "object": "model", "created": created, "owned_by": "vramgate", "state": model.state }),
        );
        for alias in &model.aliases {
            data.push(json!({
                "id": alias, "object": "model", "created": created, "owned_by": "vramgate",
                "state": model.state, "alias_of": model.id,
            }));
        }
    }
    for (name, candidates) in groups {
        let created = candidates.first().map_or(0, |first| state.catalog.created(first));
        data.push(
            json!({ "id": name, "object": "model", "created": created, "owned_by": "vramgate", "candidates": candidates }),
        );
    }
    Json(json!({ "object": "list", "data": data }))
}

/// `GET /v1/models/{id}`: one entry of [`models`] (a model, a model's alias or an `[aliases]`
/// name), or a 404 in OpenAI's shape (`model_not_found`), as the openai library's
/// `models.retrieve` expects.
pub(super) async fn model(State(state): State<AppState>, PathParam(id): PathParam) -> Response {
    let Json(list) = models(State(state)).await;
    let found = list["data"].as_array().and_then(|data| data.iter().find(|entry| entry["id"] == id.as_str()));
    match found {
        Some(entry) => Json(entry.clone()).into_response(),
        None => ApiError::coded(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!("The model '{id}' does not exist: GET /v1/models lists the models vramgate serves"),
        )
        .render(Surface::OpenAi),
    }
}

/// The `model` a request names: the JSON body's `model` field, or a multipart form's `model` field.
async fn model_name(headers: &HeaderMap, body: &Bytes) -> Result<String, ApiError> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if content_type.starts_with("multipart/form-data") {
        let boundary = multer::parse_boundary(content_type)
            .map_err(|e| invalid(StatusCode::BAD_REQUEST, format!("malformed multipart body: {e}"), "invalid_body"))?;
        let stream = futures_util::stream::once({
            let body = body.clone();
            async move { Ok::<Bytes, std::io::Error>(body) }
        });
        let mut form = multer::Multipart::new(stream, boundary);
        while let Some(field) = form
            .next_field()
            .await
            .map_err(|e| invalid(StatusCode::BAD_REQUEST, format!("malformed multipart body: {e}"), "invalid_body"))?
        {
            if field.name() == Some("model") {
                let text = field.text().await.map_err(|e| {
                    invalid(StatusCode::BAD_REQUEST, format!("unreadable `model` field: {e}"), "invalid_body")
                })?;
                let name = text.trim();
                if name.is_empty() {
                    return Err(invalid(
                        StatusCode::BAD_REQUEST,
                        "`model` must be a non-empty string",
                        "invalid_model",
                    ));
                }
                return Ok(name.to_string());
            }
        }
        return Err(invalid(
            StatusCode::BAD_REQUEST,
            "the form has no `model` field: name the model to use",
            "missing_model",
        ));
    }
    if body.is_empty() {
        return Err(invalid(
            StatusCode::BAD_REQUEST,
            "the request has no body: send JSON with a `model` field",
            "missing_model",
        ));
    }
    // Only the `model` field is wanted: serde skips the rest without building it (this is the
    // per-request path).
    #[derive(serde::Deserialize)]
    struct ModelField<'a> {
        #[serde(borrow, default)]
        model: Option<std::borrow::Cow<'a, str>>,
    }
    let field: ModelField = serde_json::from_slice(body).map_err(|e| {
        if e.is_data() {
            invalid(StatusCode::BAD_REQUEST, format!("`model` must be a non-empty string ({e})"), "invalid_model")
        } else {
            invalid(StatusCode::BAD_REQUEST, format!("the body is not valid JSON: {e}"), "invalid_json")
        }
    })?;
    match field.model {
        Some(name) if !name.trim().is_empty() => Ok(name.trim().to_string()),
        Some(_) => Err(invalid(StatusCode::BAD_REQUEST, "`model` must be a non-empty string", "invalid_model")),
        None => Err(invalid(
            StatusCode::BAD_REQUEST,
            "the body has no `model` field: name the model to use",
            "missing_model",
        )),
    }
}

/// A request the proxy cannot read a model from.
fn invalid(status: StatusCode, message: impl Into<String>, code: &'static str) -> ApiError {
    ApiError::coded(status, code, message)
}

/// Every `/v1/...` request that names a model: find, pin (loading if needed), forward, stream.
pub(super) async fn forward(State(state): State<AppState>, request: Request) -> Response {
    let mut record = state.metrics.requests().start(metrics::Surface::OpenAi);
    let response = forward_request(&state, request, &mut record).await.unwrap_or_else(|e| e.render(Surface::OpenAi));
    record.answered(response.status());
    response
}

async fn forward_request(
    state: &AppState,
    request: Request,
    record: &mut metrics::RequestRecord<'_>,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    // The body counts against proxy.max_buffered until the model's answer has started (while
    // the model loads, too).
    let buffered = proxy::read_body(state, body).await?;
    let name = model_name(&parts.headers, &buffered.bytes).await?;
    let (gate, pin) = proxy::pin_recorded(state, &name, true, record).await?;
    let mut headers = parts.headers;
    let body = match pin.kind() {
        UpstreamKind::OpenAi => buffered.bytes.clone(),
        UpstreamKind::Ollama { model, .. } => match renamed_for_ollama(&buffered.bytes, model) {
            Some(renamed) => {
                // The length changed with the name; hyper sets the new one.
                headers.remove(header::CONTENT_LENGTH);
                renamed
            }
            None => buffered.bytes.clone(),
        },
        // Reached through an alias.
        UpstreamKind::External => return Err(external_refusal(&gate.id)),
    };
    // The request goes on as it came, with the model's address and without hop-by-hop headers
    // (built again, for the new address, if it must be sent again after a crash).
    strip_hop_by_hop(&mut headers);
    let build = |pin: &Pin| {
        let mut uri = axum::http::uri::Parts::default();
        uri.scheme = Some(axum::http::uri::Scheme::HTTP);
        uri.authority = pin.authority.clone();
        uri.path_and_query = parts.uri.path_and_query().cloned();
        let uri = axum::http::Uri::from_parts(uri).map_err(|e| proxy::unaddressable(pin, e))?;
        Ok(proxy::upstream_request(&parts.method, uri, &headers, &body))
    };
    let (pin, response) = proxy::send_retrying(state, &gate, pin, build).await?;
    drop(buffered);
    Ok(pinned_response(state, &gate, pin, response))
}

/// A JSON body with its `model` field set to Ollama's name of the model (Ollama's OpenAI-compatible
/// routes know models by that name, not by vramgate's id); `None` if the body is not a JSON object.
fn renamed_for_ollama(body: &Bytes, ollama_name: &str) -> Option<Bytes> {
    let mut value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value.as_object_mut()?.insert("model".into(), serde_json::Value::String(ollama_name.to_string()));
    serde_json::to_vec(&value).ok().map(Bytes::from)
}
