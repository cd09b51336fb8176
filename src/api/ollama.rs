//! The Ollama-compatible surface: `/api/chat`, `/api/generate`, `/api/embed` (and the older
//! `/api/embeddings`), `/api/tags`, `/api/ps` and `/api/version`, so Ollama clients can point at
//! vramgate as if it were Ollama.
//!
//! A request names a model (an id, a model's alias or an `[aliases]` name) in its JSON body's
//! `model` field; it is found and pinned exactly as on the OpenAI side (`proxy::pin_model`: loaded
//! on demand, kept in use until the answer ends or the client goes away). Then:
//!
//! - a model inside a real Ollama (`UpstreamKind::Ollama`) gets the request passed through to the
//!   same path with `model` renamed to Ollama's name and `keep_alive` removed (vramgate, not
//!   Ollama, owns the idle TTL), and the answer streamed back unchanged;
//! - a model behind an OpenAI-compatible server (`UpstreamKind::OpenAi`, e.g. llama-server) gets
//!   the request translated (`ollama_translate.rs`): `/api/chat` and a templated `/api/generate`
//!   to `/v1/chat/completions`, a `raw` or `suffix` generate to `/v1/completions`, the embedding
//!   calls to `/v1/embeddings`; a streamed answer's SSE events are turned into NDJSON lines one by
//!   one as they arrive.
//!
//! Ollama's "load" calls (a generate without a prompt, a chat without messages) load the model
//! through vramgate; with `keep_alive` 0 they are its "unload" calls and ask the arbiter to unload.
//! Errors have Ollama's shape, `{"error": "message"}`, with the statuses of the OpenAI side.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value, json};

use super::AppState;
use super::error::{ApiError, Route, Surface};
use super::ollama_translate::{Translation, translate};
use super::proxy::{self, BufferedBody, Framing, MODEL_HEADER, PinnedBody, strip_hop_by_hop};
use crate::arbiter::gate::{ModelGate, Pin, UpstreamKind};
use crate::metrics;
use crate::status::ModelStatus;

/// The Ollama version `/api/version` claims (clients check it before using newer features).
pub const OLLAMA_VERSION: &str = "0.5.0";

/// What `/api/ps` shows as `expires_at` for a model that does not expire (Ollama's keep_alive -1).
const NEVER_EXPIRES: &str = "2318-01-01T00:00:00Z";

/// NDJSON, Ollama's streaming format.
pub(super) const NDJSON: &str = "application/x-ndjson";

/// The most a translated, non-streamed upstream answer may hold.
pub(super) const UPSTREAM_ANSWER_LIMIT: usize = 1 << 30;

/// The most of an upstream error body read for its message.
pub(super) const UPSTREAM_ERROR_LIMIT: usize = 1 << 20;

/// After the final line, how long the rest of the upstream body (normally nothing) may take to
/// arrive, so its connection can go back to the pool.
pub(super) const DRAIN_LIMIT: Duration = Duration::from_millis(100);

/// An Ollama-style error: `{"error": "message"}`; a 503 says when to come back, as on the OpenAI
/// side.
pub(super) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    ApiError::new(status, message).render(Surface::Ollama)
}

/// The message of an error body: OpenAI's `error.message`, Ollama's `error`, or the text itself.
pub(super) fn error_message(bytes: &[u8]) -> Option<String> {
    if let Ok(value) = serde_json::from_slice::<Value>(bytes) {
        let found = [&value["error"]["message"], &value["error"], &value["message"], &value["detail"]]
            .into_iter()
            .find_map(|v| v.as_str().map(str::to_string));
        if found.is_some() {
            return found;
        }
    }
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    (!text.is_empty()).then(|| text.chars().take(1000).collect())
}

/// An upstream's error answer in Ollama's shape: its 4xx status passes through, anything else is
/// a 502.
pub(super) fn upstream_failure(model: &str, status: StatusCode, bytes: &[u8]) -> Response {
    let message = error_message(bytes).unwrap_or_else(|| format!("model {model} answered {status}"));
    let status = if status.is_client_error() { status } else { StatusCode::BAD_GATEWAY };
    error(status, message)
}

/// Now, as Ollama writes timestamps.
pub(super) fn now() -> String {
    rfc3339(Utc::now())
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

pub(super) fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// The Ollama endpoints that name a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Endpoint {
    Chat,
    Generate,
    /// `/api/embed`: `input`, a string or a list, and `embeddings`.
    Embed,
    /// `/api/embeddings` (Ollama's older call): `prompt` and `embedding`.
    Embeddings,
}

/// `POST /api/chat`.
pub(super) async fn chat(State(state): State<AppState>, request: Request) -> Response {
    serve(state, request, Endpoint::Chat).await
}

/// `POST /api/generate`.
pub(super) async fn generate(State(state): State<AppState>, request: Request) -> Response {
    serve(state, request, Endpoint::Generate).await
}

/// `POST /api/embed`.
pub(super) async fn embed(State(state): State<AppState>, request: Request) -> Response {
    serve(state, request, Endpoint::Embed).await
}

/// `POST /api/embeddings`.
pub(super) async fn embeddings(State(state): State<AppState>, request: Request) -> Response {
    serve(state, request, Endpoint::Embeddings).await
}

/// `GET /api/version`.
pub(super) async fn version() -> Json<Value> {
    Json(json!({ "version": OLLAMA_VERSION, "vramgate": env!("CARGO_PKG_VERSION") }))
}

/// The `details` object of a model in `/api/tags` and `/api/ps`: what its weights file says
/// (see `catalog.rs`), empty where nothing is known.
fn details(state: &AppState, model: &ModelStatus) -> Value {
    state.catalog.get(&model.id).map_or_else(
        || json!({ "parent_model": "", "format": "", "family": "", "families": null, "parameter_size": "", "quantization_level": "" }),
        crate::catalog::ModelFacts::details,
    )
}

/// `modified_at` of a model: its weights file's modification time, else the config file's, else
/// the daemon's start.
fn modified_at(state: &AppState, model: &ModelStatus) -> String {
    state.catalog.get(&model.id).map_or_else(now, crate::catalog::ModelFacts::modified_at)
}

fn bytes_of(mib: u64) -> u64 {
    mib.saturating_mul(1 << 20)
}

/// `GET /api/tags`: every configured model, then each model alias and each `[aliases]` name as an
/// entry of its own (an `[aliases]` name with the size of its first candidate).
pub(super) async fn tags(State(state): State<AppState>) -> Json<Value> {
    let view = state.arbiter.view();
    let entry = |name: &str, model: &ModelStatus| {
        json!({
            "name": name,
            "model": name,
            "modified_at": modified_at(&state, model),
            "size": bytes_of(model.vram_mib),
            "digest": "",
            "details": details(&state, model),
        })
    };
    let mut models = Vec::new();
    for model in &view.models {
        models.push(entry(&model.id, model));
    }
    for model in &view.models {
        for alias in &model.aliases {
            models.push(entry(alias, model));
        }
    }
    // `names()` is sorted; those without a gate are the `[aliases]` names.
    let groups = state.arbiter.names().into_iter().filter(|n| state.arbiter.gate(n).is_none());
    for group in groups {
        let first = state
            .arbiter
            .candidates(&group)
            .and_then(|c| c.first())
            .and_then(|id| view.models.iter().find(|m| &m.id == id));
        if let Some(model) = first {
            models.push(entry(&group, model));
        }
    }
    Json(json!({ "models": models }))
}

/// `GET /api/ps`: the models that are loaded (`ready`).
pub(super) async fn ps(State(state): State<AppState>) -> Json<Value> {
    let view = state.arbiter.view();
    let models: Vec<Value> = view
        .models
        .iter()
        .filter(|m| m.state == "ready")
        .map(|model| {
            let size = bytes_of(model.vram_mib);
            let on_gpu = model.placement.as_deref() != Some("cpu");
            json!({
                "name": model.id,
                "model": model.id,
                "size": size,
                "size_vram": if on_gpu { size } else { 0 },
                "digest": "",
                "details": details(&state, model),
                "expires_at": model.expires_at.map_or_else(|| NEVER_EXPIRES.to_string(), rfc3339),
            })
        })
        .collect();
    Json(json!({ "models": models }))
}

/// The most JSON values (array elements and object members) a request body may hold: about 100 MiB
/// once parsed; real requests (messages, base64 images, a token context) hold far fewer.
const MAX_JSON_VALUES: usize = 2_000_000;

/// Only the `model` field; everything else is skipped without being built.
#[derive(serde::Deserialize)]
struct ModelOnly<'a> {
    #[serde(borrow, default)]
    model: Option<std::borrow::Cow<'a, str>>,
}

/// Counts the values in a JSON text: commas and opening brackets outside strings, an upper bound
/// on the elements a parse would build.
fn json_value_count(bytes: &[u8]) -> usize {
    let (mut count, mut in_string, mut escaped) = (0, false, false);
    for &byte in bytes {
        if in_string {
            if escaped {
                escaped = false;
            } else if byte == b'\\' {
                escaped = true;
            } else if byte == b'"' {
                in_string = false;
            }
        } else {
            match byte {
                b'"' => in_string = true,
                b',' | b'[' | b'{' => count += 1,
                _ => {}
            }
        }
    }
    count
}

/// Reads the request body (bounded by `proxy.max_body` and `proxy.max_buffered`) as a JSON
/// object; the [`BufferedBody`] holds its bytes' share of the budget until dropped.
async fn read_object(state: &AppState, body: Body) -> Result<(Map<String, Value>, BufferedBody), Response> {
    let buffered = proxy::read_body(state, body).await.map_err(|e| e.render(Surface::Ollama))?;
    let body = &buffered.bytes;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(error(StatusCode::BAD_REQUEST, "the request has no body: send JSON with a `model` field"));
    }
    // A parsed JSON value costs far more than its text for small elements (`[0,0,...]`): an
    // unknown model is answered from a skim that builds nothing, and a body with more values
    // than any real request has is refused before it is built.
    if let Ok(ModelOnly { model: Some(name) }) = serde_json::from_slice::<ModelOnly>(body) {
        let known = |n: &str| state.arbiter.gate(n).is_some() || state.arbiter.candidates(n).is_some();
        let name = name.trim();
        if !name.is_empty() && !known(name) && !name.strip_suffix(":latest").is_some_and(known) {
            return Err(unknown_model(state, name));
        }
    }
    let values = json_value_count(body);
    if values > MAX_JSON_VALUES {
        return Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body holds {values} JSON values; at most {MAX_JSON_VALUES} are accepted on the Ollama API"),
        ));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(object)) => Ok((object, buffered)),
        Ok(_) => Err(error(StatusCode::BAD_REQUEST, "the body must be a JSON object with a `model` field")),
        Err(e) => Err(error(StatusCode::BAD_REQUEST, format!("the body is not valid JSON: {e}"))),
    }
}

/// The `model` field as asked (answers echo it) and as a name vramgate knows where it can: Ollama
/// clients may add the default tag, so `llm:latest` means `llm` when only `llm` exists.
/// `Err` is the reason the field is unusable (a 400).
fn model_name(state: &AppState, object: &Map<String, Value>) -> Result<(String, String), &'static str> {
    let name = match object.get("model") {
        None | Some(Value::Null) => {
            return Err("model is required: name the model to use in `model`");
        }
        Some(Value::String(name)) if !name.trim().is_empty() => name.trim(),
        Some(_) => return Err("`model` must be a non-empty string"),
    };
    let known = |n: &str| state.arbiter.gate(n).is_some() || state.arbiter.candidates(n).is_some();
    if !known(name)
        && let Some(short) = name.strip_suffix(":latest")
        && known(short)
    {
        return Ok((name.to_string(), short.to_string()));
    }
    Ok((name.to_string(), name.to_string()))
}

fn unknown_model(state: &AppState, name: &str) -> Response {
    proxy::unknown_model(state, name).render(Surface::Ollama)
}

/// Whether Ollama's `keep_alive` says "unload now": 0, "0", "0s", "0m", ...
fn keep_alive_is_zero(value: Option<&Value>) -> bool {
    match value {
        Some(Value::Number(n)) => n.as_f64() == Some(0.0),
        Some(Value::String(s)) => {
            let number = s.trim().trim_end_matches(|c: char| c.is_ascii_alphabetic() || c == 'µ');
            !number.is_empty() && number.parse::<f64>().is_ok_and(|n| n == 0.0)
        }
        _ => false,
    }
}

/// Whether a chat or generate request carries nothing to answer (Ollama's load and unload calls).
fn is_load_call(endpoint: Endpoint, object: &Map<String, Value>) -> bool {
    let empty = |v: Option<&Value>| match v {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.is_empty(),
        Some(Value::Array(a)) => a.is_empty(),
        Some(_) => false,
    };
    match endpoint {
        Endpoint::Generate => empty(object.get("prompt")) && empty(object.get("images")),
        Endpoint::Chat => empty(object.get("messages")),
        Endpoint::Embed | Endpoint::Embeddings => false,
    }
}

/// Unloads what a name means: the model, or each loaded candidate of an `[aliases]` name.
async fn unload(state: &AppState, name: &str) -> Result<(), Response> {
    let ids: Vec<String> = if let Some(gate) = state.arbiter.gate(name) {
        vec![gate.id.clone()]
    } else if let Some(candidates) = state.arbiter.candidates(name) {
        let view = state.arbiter.view();
        candidates
            .iter()
            .filter(|id| view.models.iter().any(|m| &m.id == *id && m.state != "unloaded"))
            .cloned()
            .collect()
    } else {
        return Err(unknown_model(state, name));
    };
    for id in ids {
        let busy = state.arbiter.gate(&id).is_some_and(|gate| gate.in_use() > 0);
        if busy {
            // As Ollama does: this call is answered at once, and the answers other clients are
            // receiving finish first. The arbiter closes the model to new requests and stops it
            // once those end (bounded by the model's stop_timeout).
            let arbiter = state.arbiter.clone();
            tokio::spawn(async move {
                if let Err(e) = arbiter.unload(&id).await {
                    tracing::warn!(model = %id, "unload asked on the Ollama API: {e}");
                }
            });
            continue;
        }
        if let Err(failure) = state.arbiter.unload(&id).await {
            return Err(ApiError::arbiter(failure, Route::Proxy).render(Surface::Ollama));
        }
    }
    Ok(())
}

/// The answer to a load or unload call.
fn load_answer(endpoint: Endpoint, name: &str, reason: &str, model_id: Option<&str>) -> Response {
    let mut body = json!({ "model": name, "created_at": now(), "done": true, "done_reason": reason });
    match endpoint {
        Endpoint::Chat => body["message"] = json!({ "role": "assistant", "content": "" }),
        _ => body["response"] = json!(""),
    }
    with_model_header(Json(body).into_response(), model_id)
}

pub(super) fn with_model_header(mut response: Response, model_id: Option<&str>) -> Response {
    if let Some(value) = model_id.and_then(|id| HeaderValue::from_str(id).ok()) {
        response.headers_mut().insert(MODEL_HEADER, value);
    }
    response
}

/// Every Ollama request that names a model: find, pin (loading if needed), then pass through or
/// translate.
async fn serve(state: AppState, request: Request, endpoint: Endpoint) -> Response {
    let mut record = state.metrics.requests().start(metrics::Surface::Ollama);
    let response = serve_recorded(&state, request, endpoint, &mut record).await;
    record.answered(response.status());
    response
}

async fn serve_recorded(
    state: &AppState,
    request: Request,
    endpoint: Endpoint,
    record: &mut metrics::RequestRecord<'_>,
) -> Response {
    let started = Instant::now();
    let (parts, body) = request.into_parts();
    // The body counts against proxy.max_buffered until this function returns: through a load
    // and until the model's answer has started.
    let (object, _buffered) = match read_object(state, body).await {
        Ok(read) => read,
        Err(response) => return response,
    };
    let (asked, name) = match model_name(state, &object) {
        Ok(names) => names,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    if is_load_call(endpoint, &object) && keep_alive_is_zero(object.get("keep_alive")) {
        if let Some(gate) = state.arbiter.gate(&name) {
            record.model(&gate.id);
        }
        return match unload(state, &name).await {
            Ok(()) => load_answer(endpoint, &asked, "unload", None),
            Err(response) => response,
        };
    }
    // An external model is only loaded by a load call (it serves its requests inside its app).
    let (gate, pin) = match proxy::pin_recorded(state, &name, !is_load_call(endpoint, &object), record).await {
        Ok(pinned) => pinned,
        Err(e) => return e.render(Surface::Ollama),
    };
    if is_load_call(endpoint, &object) {
        return load_answer(endpoint, &asked, "load", Some(&gate.id));
    }
    let load_duration = started.elapsed();
    match pin.kind().clone() {
        UpstreamKind::Ollama { .. } => {
            pass_through(state, &gate, pin, parts.uri.path_and_query(), parts.headers, object).await
        }
        UpstreamKind::OpenAi => {
            let request = Translation { endpoint, asked, name, started, load_duration };
            translate(state, &gate, pin, &parts.headers, object, request).await
        }
        UpstreamKind::External => error(
            StatusCode::BAD_REQUEST,
            format!(
                "model {} runs inside an attached application and serves no requests through vramgate; \
                 a generate without a prompt loads it",
                gate.id
            ),
        ),
    }
}

/// Sends a request to the pinned model's server, waiting at most `proxy.first_byte_timeout` for
/// the answer to start. Errors are Ollama-style responses.
pub(super) async fn send(
    state: &AppState,
    gate: &Arc<ModelGate>,
    pin: Pin,
    path_and_query: &str,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(Pin, axum::http::Response<Body>), Response> {
    let build = |pin: &Pin| {
        let address = format!("{}{path_and_query}", pin.upstream.trim_end_matches('/'));
        let uri = address.parse().map_err(|e| proxy::unaddressable(pin, e))?;
        Ok(proxy::upstream_request(&Method::POST, uri, &headers, &body))
    };
    match proxy::send_retrying(state, gate, pin, build).await {
        Ok((pin, response)) => Ok((pin, response.map(Body::new))),
        Err(e) => Err(e.render(Surface::Ollama)),
    }
}

/// The body for a model inside Ollama: `model` becomes Ollama's name for it, and `keep_alive`
/// goes (vramgate loaded it to stay and decides when it leaves; without the field Ollama keeps
/// the duration it was loaded with).
/// Ollama options fixed when a model is loaded (a different value makes Ollama reload it).
const LOAD_OPTIONS: &[&str] =
    &["num_ctx", "num_gpu", "main_gpu", "num_batch", "low_vram", "use_mmap", "use_mlock", "numa"];

/// The body Ollama gets: its own name for the model, no `keep_alive` (vramgate owns the idle
/// TTL), and the model's configured `options` over the client's (plus `num_gpu = 0` while it runs
/// on the CPU): Ollama reloads a model whose options differ, and vramgate owns its size and
/// placement.
fn ollama_body(
    mut object: Map<String, Value>,
    ollama_model: &str,
    configured: &Map<String, Value>,
    on_cpu: bool,
) -> Map<String, Value> {
    object.insert("model".into(), Value::String(ollama_model.to_string()));
    object.remove("keep_alive");
    let mut options = match object.remove("options") {
        Some(Value::Object(options)) => options,
        _ => Map::new(),
    };
    // Options that decide how much memory the runner takes, and where: vramgate admitted the model
    // with the configured ones, so a client's cannot make Ollama reload it at another size.
    for key in LOAD_OPTIONS {
        options.remove(*key);
    }
    options.extend(configured.iter().map(|(k, v)| (k.clone(), v.clone())));
    if on_cpu {
        options.insert("num_gpu".into(), Value::from(0));
    }
    if !options.is_empty() {
        object.insert("options".into(), Value::Object(options));
    }
    object
}

/// Passes a request through to a real Ollama and streams its answer back unchanged, holding the
/// pin until the answer ends or the client goes away.
async fn pass_through(
    state: &AppState,
    gate: &Arc<ModelGate>,
    pin: Pin,
    path_and_query: Option<&axum::http::uri::PathAndQuery>,
    mut headers: HeaderMap,
    object: Map<String, Value>,
) -> Response {
    let body = match pin.kind() {
        UpstreamKind::Ollama { model, options } => ollama_body(object, model, options, pin.on_cpu),
        _ => object,
    };
    let body = Value::Object(body).to_string().into_bytes();
    strip_hop_by_hop(&mut headers);
    headers.remove(header::CONTENT_LENGTH);
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let path = path_and_query.map_or("/", |p| p.as_str());
    let (pin, response) = match send(state, gate, pin, path, headers, Bytes::from(body)).await {
        Ok(sent) => sent,
        Err(response) => return response,
    };
    let (mut head, incoming) = response.into_parts();
    if head.status.is_server_error() {
        // Ollama's own failure (out of memory, a crashed runner): a 502 naming it, like the
        // translated path; its 4xx (a bad request) passes through unchanged below.
        let bytes = proxy::read_upstream(incoming, state.stall_timeout, UPSTREAM_ERROR_LIMIT).await.unwrap_or_default();
        return upstream_failure(&gate.id, head.status, &bytes);
    }
    strip_hop_by_hop(&mut head.headers);
    if let Ok(model) = HeaderValue::from_str(&gate.id) {
        head.headers.insert(MODEL_HEADER, model);
    }
    // Ollama streams NDJSON: an answer that breaks ends with an `{"error": …}` line and a clean end.
    let framing = Framing::of(&head.headers);
    if framing != Framing::Opaque {
        head.headers.remove(header::CONTENT_LENGTH);
    }
    Response::from_parts(head, Body::new(PinnedBody::new(incoming, state.stall_timeout, pin, framing)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_zero_in_its_forms() {
        for zero in [json!(0), json!(0.0), json!("0"), json!("0s"), json!("0m"), json!(" 0ms ")] {
            assert!(keep_alive_is_zero(Some(&zero)), "{zero}");
        }
        for other in [json!(-1), json!("5m"), json!("-1"), json!(""), json!("s"), json!(null), json!(true)] {
            assert!(!keep_alive_is_zero(Some(&other)), "{other}");
        }
        assert!(!keep_alive_is_zero(None));
    }

    #[test]
    fn the_ollama_body_names_ollamas_model_and_drops_keep_alive() {
        let object =
            json!({"model": "chat", "keep_alive": 0, "messages": [], "options": {"num_ctx": 8192, "temperature": 0.5}});
        let Value::Object(object) = object else { unreachable!() };
        // The client's sampling options pass; its load options (the runner's size) do not.
        let body = Value::Object(ollama_body(object.clone(), "llama3.2:3b", &Map::new(), false));
        assert_eq!(body, json!({"model": "llama3.2:3b", "messages": [], "options": {"temperature": 0.5}}));
        // The model's configured options win over the client's, and the CPU form is kept.
        let configured = self::object(json!({"num_ctx": 4096}));
        let body = Value::Object(ollama_body(object, "llama3.2:3b", &configured, true));
        assert_eq!(body["options"], json!({"num_ctx": 4096, "num_gpu": 0, "temperature": 0.5}));
    }

    fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(object) => object,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn upstream_errors_keep_4xx_and_become_502_otherwise() {
        let response =
            upstream_failure("m", StatusCode::BAD_REQUEST, br#"{"error":{"message":"too long","code":400}}"#);
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let response = upstream_failure("m", StatusCode::INTERNAL_SERVER_ERROR, b"boom");
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(error_message(br#"{"error":"plain"}"#).as_deref(), Some("plain"));
        assert_eq!(error_message(b"  ").as_deref(), None);
    }
}
