//! The OpenAI-compatible surface: `/v1/...` requests name a model; vramgate makes room, starts it
//! if needed, forwards the request and streams the answer back.
//!
//! The per-request path for a ready model is: read the body (bounded), find the `model` field,
//! pin the model through its gate (a read lock and an atomic, no message to the arbiter), forward
//! over a pooled connection, and stream the response back holding the pin; the pin is dropped when
//! the body ends or the client goes away. Only a model that is not ready costs a round trip to the
//! arbiter, which loads it under the usual admission rules.

use std::pin::Pin as StdPin;
use std::task::{Context, Poll};

use std::future::Future;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;
use crate::arbiter::ArbiterError;
use crate::arbiter::gate::{ModelGate, Pin, UpstreamKind};
use crate::client::root_cause;
use std::sync::Arc;

/// The proxy's client: hyper's pooled HTTP/1 client, without the layers (URL parsing, redirect
/// and timeout policies) a general-purpose client adds to every request.
pub type UpstreamClient = hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Body>;

/// A client for model servers: keep-alive pool, `TCP_NODELAY` (streamed tokens are small).
pub fn upstream_client() -> UpstreamClient {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(std::time::Duration::from_secs(5)));
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build(connector)
}

/// Response header naming the model that served the request.
pub const MODEL_HEADER: &str = "x-vramgate-model";

/// An OpenAI-style error: `{"error": {"message", "type", "code"}}`.
pub(crate) fn error(status: StatusCode, message: impl Into<String>, code: &str) -> Response {
    let kind = if status.is_client_error() { "invalid_request_error" } else { "server_error" };
    let body = json!({ "error": { "message": message.into(), "type": kind, "code": code } });
    let mut response = (status, Json(body)).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    }
    response
}

pub(super) fn arbiter_error(failure: ArbiterError) -> Response {
    let (status, code) = match &failure {
        ArbiterError::UnknownModel { .. } => (StatusCode::NOT_FOUND, "model_not_found"),
        ArbiterError::NeverFits(_) => (StatusCode::SERVICE_UNAVAILABLE, "insufficient_vram"),
        ArbiterError::Timeout { .. } | ArbiterError::QueueFull(_) => {
            (StatusCode::SERVICE_UNAVAILABLE, "insufficient_vram")
        }
        ArbiterError::TooManyWaiters(_) => (StatusCode::SERVICE_UNAVAILABLE, "too_many_waiters"),
        ArbiterError::Cooldown { .. } => (StatusCode::SERVICE_UNAVAILABLE, "model_failed"),
        ArbiterError::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
        ArbiterError::StartFailed { .. } => (StatusCode::BAD_GATEWAY, "model_start_failed"),
        ArbiterError::Cancelled(_) | ArbiterError::UnknownLease(_) => (StatusCode::SERVICE_UNAVAILABLE, "cancelled"),
        ArbiterError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_request_error"),
        ArbiterError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
        ArbiterError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
        ArbiterError::InMode { .. } => (StatusCode::SERVICE_UNAVAILABLE, "mode_failed"),
    };
    let mut response = error(status, failure.to_string(), code);
    // A model in its failure cooldown says when the next try is due.
    if let ArbiterError::Cooldown { retry_in, .. } = &failure
        && let Ok(value) = HeaderValue::from_str(&retry_in.as_secs().max(1).to_string())
    {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

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
        data.push(
            json!({ "id": model.id, "object": "model", "created": 0, "owned_by": "vramgate", "state": model.state }),
        );
        for alias in &model.aliases {
            data.push(json!({
                "id": alias, "object": "model", "created": 0, "owned_by": "vramgate",
                "state": model.state, "alias_of": model.id,
            }));
        }
    }
    for (name, candidates) in groups {
        data.push(
            json!({ "id": name, "object": "model", "created": 0, "owned_by": "vramgate", "candidates": candidates }),
        );
    }
    Json(json!({ "object": "list", "data": data }))
}

/// The `model` a request names: the JSON body's `model` field, or a multipart form's `model` field.
async fn model_name(headers: &HeaderMap, body: &Bytes) -> Result<String, Response> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if content_type.starts_with("multipart/form-data") {
        let boundary = multer::parse_boundary(content_type)
            .map_err(|e| error(StatusCode::BAD_REQUEST, format!("malformed multipart body: {e}"), "invalid_body"))?;
        let stream = futures_util::stream::once({
            let body = body.clone();
            async move { Ok::<Bytes, std::io::Error>(body) }
        });
        let mut form = multer::Multipart::new(stream, boundary);
        while let Some(field) = form
            .next_field()
            .await
            .map_err(|e| error(StatusCode::BAD_REQUEST, format!("malformed multipart body: {e}"), "invalid_body"))?
        {
            if field.name() == Some("model") {
                let text = field.text().await.map_err(|e| {
                    error(StatusCode::BAD_REQUEST, format!("unreadable `model` field: {e}"), "invalid_body")
                })?;
                let name = text.trim();
                if name.is_empty() {
                    return Err(error(StatusCode::BAD_REQUEST, "`model` must be a non-empty string", "invalid_model"));
                }
                return Ok(name.to_string());
            }
        }
        return Err(error(
            StatusCode::BAD_REQUEST,
            "the form has no `model` field: name the model to use",
            "missing_model",
        ));
    }
    if body.is_empty() {
        return Err(error(
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
            error(StatusCode::BAD_REQUEST, format!("`model` must be a non-empty string ({e})"), "invalid_model")
        } else {
            error(StatusCode::BAD_REQUEST, format!("the body is not valid JSON: {e}"), "invalid_json")
        }
    })?;
    match field.model {
        Some(name) if !name.trim().is_empty() => Ok(name.trim().to_string()),
        Some(_) => Err(error(StatusCode::BAD_REQUEST, "`model` must be a non-empty string", "invalid_model")),
        None => {
            Err(error(StatusCode::BAD_REQUEST, "the body has no `model` field: name the model to use", "missing_model"))
        }
    }
}

/// Hop-by-hop headers, which describe one connection and must not be forwarded.
/// Removes the hop-by-hop headers: the fixed list, and any header the `Connection` header names.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| !name.is_empty())
        .collect();
    for name in named {
        headers.remove(name.as_str());
    }
    for hop in HOP_BY_HOP {
        headers.remove(hop);
    }
}

const HOP_BY_HOP: [&str; 11] = [
    "proxy-connection",
    // Answered by vramgate itself (it reads the whole body before forwarding).
    "expect",
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

/// Why a request body could not be read; the message says it for a person.
pub(super) enum BodyError {
    /// Over `proxy.max_body` (413).
    TooLarge(String),
    /// Broken off or otherwise unreadable (400).
    Unreadable(String),
}

/// Reads a whole request body, bounded by `proxy.max_body`.
pub(super) async fn read_body(state: &AppState, body: Body) -> Result<Bytes, BodyError> {
    axum::body::to_bytes(body, state.max_body_bytes).await.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.downcast_ref::<http_body_util::LengthLimitError>().is_some())
            || e.to_string().contains("length limit");
        if too_large {
            BodyError::TooLarge(format!(
                "the request body is larger than proxy.max_body ({} MiB)",
                state.max_body_bytes >> 20
            ))
        } else {
            BodyError::Unreadable(format!("cannot read the request body: {e}"))
        }
    })
}

/// Every `/v1/...` request that names a model: find, pin (loading if needed), forward, stream.
pub(super) async fn forward(State(state): State<AppState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = match read_body(&state, body).await {
        Ok(body) => body,
        Err(BodyError::TooLarge(message)) => return error(StatusCode::PAYLOAD_TOO_LARGE, message, "body_too_large"),
        Err(BodyError::Unreadable(message)) => return error(StatusCode::BAD_REQUEST, message, "invalid_body"),
    };
    let name = match model_name(&parts.headers, &body).await {
        Ok(name) => name,
        Err(response) => return response,
    };
    let (gate, pin) = match pin_model(&state, &name, true).await {
        Ok(pinned) => pinned,
        Err(response) => return response,
    };
    let mut headers = parts.headers;
    let body = match pin.kind() {
        UpstreamKind::OpenAi => body,
        UpstreamKind::Ollama { model, .. } => match renamed_for_ollama(&body, model) {
            Some(renamed) => {
                // The length changed with the name; hyper sets the new one.
                headers.remove(header::CONTENT_LENGTH);
                renamed
            }
            None => body,
        },
        // Reached through an alias.
        UpstreamKind::External => return external_refusal(&gate.id),
    };
    // The request goes on as it came, with the model's address and without hop-by-hop headers:
    // its header map is moved, not rebuilt (this is the per-request path).
    let mut uri = axum::http::uri::Parts::default();
    uri.scheme = Some(axum::http::uri::Scheme::HTTP);
    uri.authority = pin.authority.clone();
    uri.path_and_query = parts.uri.path_and_query().cloned();
    let uri = match axum::http::Uri::from_parts(uri) {
        Ok(uri) => uri,
        Err(e) => {
            return error(
                StatusCode::BAD_GATEWAY,
                format!("cannot address model {} at {}: {e}", gate.id, pin.upstream),
                "upstream_error",
            );
        }
    };
    strip_hop_by_hop(&mut headers);
    let mut upstream = axum::http::Request::new(Body::from(body));
    *upstream.method_mut() = parts.method;
    *upstream.uri_mut() = uri;
    *upstream.headers_mut() = headers;
    let sent = state.upstream.request(upstream);
    let answered = match state.first_byte_timeout {
        Some(limit) => match tokio::time::timeout(limit, sent).await {
            Ok(answered) => answered,
            // Dropping the request here drops the pin too: the model is free to go.
            Err(_) => {
                return error(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "model {} did not start answering within {} (proxy.first_byte_timeout)",
                        gate.id,
                        crate::units::Rounded(limit)
                    ),
                    "upstream_timeout",
                );
            }
        },
        None => sent.await,
    };
    let response = match answered {
        Ok(response) => response,
        Err(e) => {
            return error(
                StatusCode::BAD_GATEWAY,
                format!("model {} at {} failed: {}", gate.id, pin.upstream, root_cause(&e)),
                "upstream_error",
            );
        }
    };
    let (mut head, incoming) = response.into_parts();
    strip_hop_by_hop(&mut head.headers);
    if let Ok(model) = HeaderValue::from_str(&gate.id) {
        head.headers.insert(MODEL_HEADER, model);
    }
    let stall = state.stall_timeout.map(|limit| (limit, Box::pin(tokio::time::sleep(limit))));
    Response::from_parts(head, Body::new(PinnedBody { inner: incoming, stall, _pin: pin }))
}

fn external_refusal(id: &str) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        format!(
            "model {id} is an external model: it runs inside the app attached to it, which serves its own requests; \
             vramgate only places it"
        ),
        "invalid_request_error",
    )
}

/// A JSON body with its `model` field set to Ollama's name of the model (Ollama's OpenAI-compatible
/// routes know models by that name, not by vramgate's id); `None` if the body is not a JSON object.
fn renamed_for_ollama(body: &Bytes, ollama_name: &str) -> Option<Bytes> {
    let mut value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value.as_object_mut()?.insert("model".into(), serde_json::Value::String(ollama_name.to_string()));
    serde_json::to_vec(&value).ok().map(Bytes::from)
}

/// Finds the model a name means and pins it, loading it first if it is not ready. For an
/// `[aliases]` name: the first candidate that is ready, else the one the arbiter chooses by fit.
///
/// `to_serve`: the model is wanted to answer a request. An external model cannot (it serves inside
/// its app), so it is refused before anything loads, rather than placed for nothing.
pub(super) async fn pin_model(state: &AppState, name: &str, to_serve: bool) -> Result<(Arc<ModelGate>, Pin), Response> {
    let model = if let Some(gate) = state.arbiter.gate(name) {
        if to_serve && gate.kind == UpstreamKind::External {
            return Err(external_refusal(name));
        }
        gate
    } else if let Some(candidates) = state.arbiter.candidates(name) {
        // External models serve their requests inside their app: never a request's choice.
        let candidates: Vec<String> = candidates
            .iter()
            .filter(|c| state.arbiter.gate(c).is_some_and(|g| g.kind != UpstreamKind::External))
            .cloned()
            .collect();
        if candidates.is_empty() {
            return Err(external_refusal(name));
        }
        for candidate in &candidates {
            if let Some(gate) = state.arbiter.gate(candidate)
                && let Some(pin) = gate.try_pin()
            {
                return Ok((gate, pin));
            }
        }
        let chosen = state.arbiter.choose(&candidates).await.map_err(arbiter_error)?;
        state.arbiter.gate(&chosen).ok_or_else(|| {
            error(StatusCode::INTERNAL_SERVER_ERROR, format!("alias {name} chose unknown model {chosen}"), "internal")
        })?
    } else {
        let names = state.arbiter.names();
        let list = if names.is_empty() { "none configured".to_string() } else { names.join(", ") };
        return Err(error(
            StatusCode::NOT_FOUND,
            format!("unknown model {name:?}; available: {list}"),
            "model_not_found",
        ));
    };
    if let Some(pin) = model.try_pin() {
        return Ok((model, pin));
    }
    // Not ready: the arbiter loads it (queueing, evicting) and answers with a pin taken the
    // moment it became ready, so it cannot be evicted before this request uses it. A missing pin
    // (it closed again in that instant) is retried a few times, not forever.
    for _ in 0..3 {
        if let Some(pin) = state.arbiter.pin(&model.id).await.map_err(arbiter_error)? {
            return Ok((model, pin));
        }
    }
    Err(error(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("model {} was swapped out again each time it became ready; try again", model.id),
        "model_busy",
    ))
}

/// The upstream's body, frame by frame as it arrives, holding the model in use until it ends or
/// is dropped (the client went away).
pub(super) struct PinnedBody<B> {
    pub(super) inner: B,
    /// `proxy.stall_timeout` and the timer it runs, reset by every frame: a server that stops
    /// sending mid-answer breaks the stream instead of holding the model in use forever.
    pub(super) stall: Option<(std::time::Duration, StdPin<Box<tokio::time::Sleep>>)>,
    pub(super) _pin: Pin,
}

impl<B> http_body::Body for PinnedBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: StdPin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let frame = StdPin::new(&mut this.inner).poll_frame(cx);
        if let Some((limit, timer)) = &mut this.stall {
            if frame.is_ready() {
                timer.as_mut().reset(tokio::time::Instant::now() + *limit);
            } else if timer.as_mut().poll(cx).is_ready() {
                let message = format!(
                    "the model server sent nothing for {} (proxy.stall_timeout)",
                    crate::units::Rounded(*limit)
                );
                return Poll::Ready(Some(Err(message.into())));
            }
        }
        frame.map(|frame| frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_named_by_connection_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, X-Trace-Hop"));
        headers.insert("x-trace-hop", HeaderValue::from_static("1"));
        headers.insert(header::EXPECT, HeaderValue::from_static("100-continue"));
        headers.insert(header::HOST, HeaderValue::from_static("vramgate"));
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        strip_hop_by_hop(&mut headers);
        let left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(headers.contains_key(header::CONTENT_TYPE) && headers.contains_key(header::AUTHORIZATION));
    }
}
