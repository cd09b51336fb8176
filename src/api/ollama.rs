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
//!   the request translated: `/api/chat` and a templated `/api/generate` to
//!   `/v1/chat/completions`, a `raw` or `suffix` generate to `/v1/completions`, the embedding
//!   calls to `/v1/embeddings`; a streamed answer's SSE events are turned into NDJSON lines one by
//!   one as they arrive.
//!
//! Ollama's "load" calls (a generate without a prompt, a chat without messages) load the model
//! through vramgate; with `keep_alive` 0 they are its "unload" calls and ask the arbiter to unload.
//! Errors have Ollama's shape, `{"error": "message"}`, with the statuses of the OpenAI side.

use std::time::{Duration, Instant};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, SecondsFormat, Utc};
use futures_util::StreamExt;
use serde_json::{Map, Value, json};

use super::AppState;
use super::error::{ApiError, Surface};
use super::openai::arbiter_error;
use super::proxy::{self, BufferedBody, MODEL_HEADER, PinnedBody, pin_model, strip_hop_by_hop};
use crate::arbiter::gate::{ModelGate, Pin, UpstreamKind};
use crate::client::root_cause;
use crate::status::ModelStatus;

/// The Ollama version `/api/version` claims (clients check it before using newer features).
pub const OLLAMA_VERSION: &str = "0.5.0";

/// What `/api/ps` shows as `expires_at` for a model that does not expire (Ollama's keep_alive -1).
const NEVER_EXPIRES: &str = "2318-01-01T00:00:00Z";

/// NDJSON, Ollama's streaming format.
const NDJSON: &str = "application/x-ndjson";

/// The most a translated, non-streamed upstream answer may hold.
const UPSTREAM_ANSWER_LIMIT: usize = 1 << 30;

/// The most of an upstream error body read for its message.
const UPSTREAM_ERROR_LIMIT: usize = 1 << 20;

/// After the final line, how long the rest of the upstream body (normally nothing) may take to
/// arrive, so its connection can go back to the pool.
const DRAIN_LIMIT: Duration = Duration::from_millis(100);

/// An Ollama-style error: `{"error": "message"}`; a 503 says when to come back, as on the OpenAI
/// side.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    ApiError::new(status, message).render(Surface::Ollama)
}

/// Turns an OpenAI-style error response (from `pin_model` or `arbiter_error`) into Ollama's shape,
/// keeping its status and headers (`Retry-After`).
async fn reshape(response: Response) -> Response {
    let (mut parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, UPSTREAM_ERROR_LIMIT).await.unwrap_or_default();
    let message = error_message(&bytes).unwrap_or_else(|| parts.status.to_string());
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let body = json!({ "error": message }).to_string();
    Response::from_parts(parts, Body::from(body))
}

/// The message of an error body: OpenAI's `error.message`, Ollama's `error`, or the text itself.
fn error_message(bytes: &[u8]) -> Option<String> {
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
fn upstream_failure(model: &str, status: StatusCode, bytes: &[u8]) -> Response {
    let message = error_message(bytes).unwrap_or_else(|| format!("model {model} answered {status}"));
    let status = if status.is_client_error() { status } else { StatusCode::BAD_GATEWAY };
    error(status, message)
}

/// Now, as Ollama writes timestamps.
fn now() -> String {
    rfc3339(Utc::now())
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// The Ollama endpoints that name a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
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

/// The `details` object of a model in `/api/tags` and `/api/ps`.
fn details(model: &ModelStatus) -> Value {
    json!({
        "parent_model": "",
        "format": "",
        "family": model.backend,
        "families": [model.backend],
        "parameter_size": "",
        "quantization_level": "",
    })
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
            "modified_at": rfc3339(model.last_used.unwrap_or(DateTime::UNIX_EPOCH)),
            "size": bytes_of(model.vram_mib),
            "digest": "",
            "details": details(model),
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
                "details": details(model),
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
        let busy = state.arbiter.gate(&id).filter(|gate| gate.in_use() > 0);
        if let Some(gate) = busy {
            // As Ollama does: the answers other clients are receiving finish first; the unload
            // follows once the model is idle (bounded by proxy.stall_timeout), and this call is
            // answered at once.
            let arbiter = state.arbiter.clone();
            let limit = state.stall_timeout.unwrap_or(Duration::from_secs(600));
            tokio::spawn(async move {
                let until = Instant::now() + limit;
                while gate.in_use() > 0 && Instant::now() < until {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if let Err(e) = arbiter.unload(&gate.id).await {
                    tracing::warn!(model = %gate.id, "unload asked on the Ollama API: {e}");
                }
            });
            continue;
        }
        if let Err(failure) = state.arbiter.unload(&id).await {
            return Err(reshape(arbiter_error(failure)).await);
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

fn with_model_header(mut response: Response, model_id: Option<&str>) -> Response {
    if let Some(value) = model_id.and_then(|id| HeaderValue::from_str(id).ok()) {
        response.headers_mut().insert(MODEL_HEADER, value);
    }
    response
}

/// Every Ollama request that names a model: find, pin (loading if needed), then pass through or
/// translate.
async fn serve(state: AppState, request: Request, endpoint: Endpoint) -> Response {
    let started = Instant::now();
    let (parts, body) = request.into_parts();
    // The body counts against proxy.max_buffered until this function returns: through a load
    // and until the model's answer has started.
    let (object, _buffered) = match read_object(&state, body).await {
        Ok(read) => read,
        Err(response) => return response,
    };
    let (asked, name) = match model_name(&state, &object) {
        Ok(names) => names,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    if is_load_call(endpoint, &object) && keep_alive_is_zero(object.get("keep_alive")) {
        return match unload(&state, &name).await {
            Ok(()) => load_answer(endpoint, &asked, "unload", None),
            Err(response) => response,
        };
    }
    // An external model is only loaded by a load call (it serves its requests inside its app).
    let (gate, pin) = match pin_model(&state, &name, !is_load_call(endpoint, &object)).await {
        Ok(pinned) => pinned,
        Err(e) => return e.render(Surface::Ollama),
    };
    if is_load_call(endpoint, &object) {
        return load_answer(endpoint, &asked, "load", Some(&gate.id));
    }
    let load_duration = started.elapsed();
    match pin.kind().clone() {
        UpstreamKind::Ollama { .. } => {
            pass_through(&state, &gate, pin, parts.uri.path_and_query(), parts.headers, object).await
        }
        UpstreamKind::OpenAi => {
            let request = Translation { endpoint, asked, name, started, load_duration };
            translate(&state, &gate, pin, &parts.headers, object, request).await
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
async fn send(
    state: &AppState,
    gate: &ModelGate,
    pin: &Pin,
    path_and_query: &str,
    headers: HeaderMap,
    body: Vec<u8>,
) -> Result<axum::http::Response<Body>, Response> {
    let address = format!("{}{path_and_query}", pin.upstream.trim_end_matches('/'));
    let uri: axum::http::Uri = address.parse().map_err(|e| {
        error(StatusCode::BAD_GATEWAY, format!("cannot address model {} at {}: {e}", gate.id, pin.upstream))
    })?;
    let mut upstream = axum::http::Request::new(Body::from(body));
    *upstream.method_mut() = Method::POST;
    *upstream.uri_mut() = uri;
    *upstream.headers_mut() = headers;
    match proxy::send(state, gate, pin, upstream).await {
        Ok(response) => Ok(response.map(Body::new)),
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
    gate: &ModelGate,
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
    let response = match send(state, gate, &pin, path, headers, body).await {
        Ok(response) => response,
        Err(response) => return response,
    };
    let (mut head, incoming) = response.into_parts();
    if head.status.is_server_error() {
        // Ollama's own failure (out of memory, a crashed runner): a 502 naming it, like the
        // translated path; its 4xx (a bad request) passes through unchanged below.
        let bytes = read_all(incoming, state.stall_timeout, UPSTREAM_ERROR_LIMIT).await.unwrap_or_default();
        return upstream_failure(&gate.id, head.status, &bytes);
    }
    strip_hop_by_hop(&mut head.headers);
    if let Ok(model) = HeaderValue::from_str(&gate.id) {
        head.headers.insert(MODEL_HEADER, model);
    }
    Response::from_parts(head, Body::new(PinnedBody::new(incoming, state.stall_timeout, pin)))
}

/// What a translated request answers with.
struct Translation {
    endpoint: Endpoint,
    /// The name the client asked for, echoed in every answer (as Ollama does).
    asked: String,
    /// The name vramgate knows it by, sent upstream.
    name: String,
    /// When the request arrived: `total_duration` counts from here.
    started: Instant,
    /// The time spent finding and loading the model.
    load_duration: Duration,
}

/// Ollama's `options` and `format` in OpenAI's terms, added to `out`. Options without an OpenAI
/// equivalent (num_ctx, repeat_penalty, mirostat, ...) are left out; `top_k` and `min_p` go as
/// the extensions llama-server and vLLM accept under those names.
fn map_options(object: &Map<String, Value>, out: &mut Map<String, Value>) {
    if let Some(Value::Object(options)) = object.get("options") {
        for (from, to) in [
            ("temperature", "temperature"),
            ("top_p", "top_p"),
            ("top_k", "top_k"),
            ("min_p", "min_p"),
            ("seed", "seed"),
            ("stop", "stop"),
            ("presence_penalty", "presence_penalty"),
            ("frequency_penalty", "frequency_penalty"),
        ] {
            if let Some(value) = options.get(from).filter(|v| !v.is_null()) {
                out.insert(to.into(), value.clone());
            }
        }
        // Ollama's -1 (no limit) and -2 (fill the context) have no OpenAI form: left out.
        if let Some(n) = options.get("num_predict").and_then(Value::as_i64).filter(|n| *n > 0) {
            out.insert("max_tokens".into(), n.into());
        }
    }
    match object.get("format") {
        Some(Value::String(format)) if format == "json" => {
            out.insert("response_format".into(), json!({ "type": "json_object" }));
        }
        Some(schema @ Value::Object(_)) => {
            out.insert(
                "response_format".into(),
                json!({ "type": "json_schema", "json_schema": { "name": "response", "schema": schema } }),
            );
        }
        _ => {}
    }
}

/// One Ollama chat message as an OpenAI message (`images` are dropped: OpenAI wants them as
/// content parts, which llama-server only reads with a vision projector loaded).
fn openai_message(message: &Value) -> Value {
    let mut out = Map::new();
    out.insert("role".into(), message.get("role").cloned().unwrap_or_else(|| json!("user")));
    let content = match message.get("content") {
        None | Some(Value::Null) => json!(""),
        Some(content) => content.clone(),
    };
    out.insert("content".into(), content);
    if let Some(Value::Array(calls)) = message.get("tool_calls") {
        let calls: Vec<Value> = calls
            .iter()
            .enumerate()
            .map(|(i, call)| {
                let function = &call["function"];
                let arguments = match &function["arguments"] {
                    Value::String(text) => text.clone(),
                    Value::Null => "{}".to_string(),
                    other => other.to_string(),
                };
                let id = call.get("id").and_then(Value::as_str).map_or_else(|| format!("call_{i}"), str::to_string);
                json!({ "id": id, "type": "function", "function": { "name": function["name"], "arguments": arguments } })
            })
            .collect();
        out.insert("tool_calls".into(), Value::Array(calls));
    }
    if let Some(id) = message.get("tool_call_id").filter(|v| v.is_string()) {
        out.insert("tool_call_id".into(), id.clone());
    }
    if let Some(name) = message.get("tool_name").filter(|v| v.is_string()) {
        out.insert("name".into(), name.clone());
    }
    Value::Object(out)
}

/// The upstream path and body for a translated chat or generate request.
fn completion_request(
    endpoint: Endpoint,
    name: &str,
    object: &Map<String, Value>,
) -> Result<(&'static str, Value), String> {
    let stream = object.get("stream").and_then(Value::as_bool).unwrap_or(true);
    let mut out = Map::new();
    out.insert("model".into(), json!(name));
    let path = match endpoint {
        Endpoint::Chat => {
            let messages = match object.get("messages") {
                Some(Value::Array(messages)) => messages.iter().map(openai_message).collect::<Vec<_>>(),
                _ => return Err("`messages` must be a list of messages".into()),
            };
            out.insert("messages".into(), Value::Array(messages));
            if let Some(tools) = object.get("tools").filter(|t| t.as_array().is_some_and(|a| !a.is_empty())) {
                out.insert("tools".into(), tools.clone());
            }
            "/v1/chat/completions"
        }
        Endpoint::Generate => {
            let text = |key: &str| -> Result<Option<String>, String> {
                match object.get(key) {
                    None | Some(Value::Null) => Ok(None),
                    Some(Value::String(s)) => Ok(Some(s.clone())),
                    Some(_) => Err(format!("`{key}` must be a string")),
                }
            };
            let prompt = text("prompt")?.unwrap_or_default();
            let system = text("system")?.filter(|s| !s.is_empty());
            let suffix = text("suffix")?.filter(|s| !s.is_empty());
            let raw = object.get("raw").and_then(Value::as_bool).unwrap_or(false);
            if raw || suffix.is_some() {
                // Ollama's raw mode: the prompt exactly as given, no chat template.
                let prompt = match system {
                    Some(system) => format!("{system}\n\n{prompt}"),
                    None => prompt,
                };
                out.insert("prompt".into(), json!(prompt));
                if let Some(suffix) = suffix {
                    out.insert("suffix".into(), json!(suffix));
                }
                "/v1/completions"
            } else {
                // Ollama applies the model's template to a prompt; the chat endpoint is where an
                // OpenAI server does that.
                let mut messages = Vec::new();
                if let Some(system) = system {
                    messages.push(json!({ "role": "system", "content": system }));
                }
                messages.push(json!({ "role": "user", "content": prompt }));
                out.insert("messages".into(), Value::Array(messages));
                "/v1/chat/completions"
            }
        }
        Endpoint::Embed | Endpoint::Embeddings => unreachable!("embeddings are not completions"),
    };
    out.insert("stream".into(), json!(stream));
    if stream {
        out.insert("stream_options".into(), json!({ "include_usage": true }));
    }
    map_options(object, &mut out);
    Ok((path, Value::Object(out)))
}

/// Translates a request for an OpenAI-speaking model, sends it and translates the answer.
async fn translate(
    state: &AppState,
    gate: &ModelGate,
    pin: Pin,
    client_headers: &HeaderMap,
    object: Map<String, Value>,
    request: Translation,
) -> Response {
    let embedding = matches!(request.endpoint, Endpoint::Embed | Endpoint::Embeddings);
    let (path, body) = if embedding {
        let input = match request.endpoint {
            Endpoint::Embed => object.get("input"),
            _ => object.get("prompt"),
        };
        let empty = match input {
            None | Some(Value::Null) => true,
            Some(Value::String(s)) => s.is_empty(),
            Some(Value::Array(a)) => a.is_empty(),
            Some(_) => return error(StatusCode::BAD_REQUEST, "`input` must be a string or a list of strings"),
        };
        if empty {
            // Ollama loads the model and answers with no embeddings.
            let body = match request.endpoint {
                Endpoint::Embed => json!({ "model": request.asked, "embeddings": [] }),
                _ => json!({ "embedding": [] }),
            };
            return with_model_header(Json(body).into_response(), Some(&gate.id));
        }
        let mut out = json!({ "model": request.name, "input": input });
        if let Some(dimensions) = object.get("dimensions").filter(|d| d.is_u64()) {
            out["dimensions"] = dimensions.clone();
        }
        ("/v1/embeddings", out)
    } else {
        match completion_request(request.endpoint, &request.name, &object) {
            Ok(translated) => translated,
            Err(message) => return error(StatusCode::BAD_REQUEST, message),
        }
    };
    let stream = body["stream"].as_bool().unwrap_or(false);
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let accept = if stream { "text/event-stream" } else { "application/json" };
    headers.insert(header::ACCEPT, HeaderValue::from_static(accept));
    if let Some(authorization) = client_headers.get(header::AUTHORIZATION) {
        headers.insert(header::AUTHORIZATION, authorization.clone());
    }
    tracing::debug!(model = %gate.id, path, stream, "ollama request translated for an OpenAI server");
    let sent = Instant::now();
    let response = match send(state, gate, &pin, path, headers, body.to_string().into_bytes()).await {
        Ok(response) => response,
        Err(response) => return response,
    };
    let (head, incoming) = response.into_parts();
    if !head.status.is_success() {
        let bytes = read_all(incoming, state.stall_timeout, UPSTREAM_ERROR_LIMIT).await.unwrap_or_default();
        return upstream_failure(&gate.id, head.status, &bytes);
    }
    let event_stream = head
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let mut progress = Progress::new(request, sent);
    if stream && event_stream {
        let relay = Relay {
            upstream: incoming.into_data_stream(),
            parser: SseParser::default(),
            progress,
            stall: state.stall_timeout,
            model: gate.id.clone(),
            phase: Phase::Streaming,
            _pin: pin,
        };
        let response = Response::builder()
            .header(header::CONTENT_TYPE, NDJSON)
            .header(header::CACHE_CONTROL, "no-cache")
            .body(Body::from_stream(relay.into_stream()))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
        return with_model_header(response, Some(&gate.id));
    }
    let bytes = match read_all(incoming, state.stall_timeout, UPSTREAM_ANSWER_LIMIT).await {
        Ok(bytes) => bytes,
        Err(message) => {
            return error(StatusCode::BAD_GATEWAY, format!("model {} at {} failed: {message}", gate.id, pin.upstream));
        }
    };
    drop(pin);
    let answer: Value = match serde_json::from_slice(&bytes) {
        Ok(answer) => answer,
        Err(e) => {
            return error(
                StatusCode::BAD_GATEWAY,
                format!("model {} answered with something other than JSON: {e}", gate.id),
            );
        }
    };
    if let Some(message) = answer.get("error").and_then(|_| error_message(&bytes)) {
        return error(StatusCode::BAD_GATEWAY, message);
    }
    let response = if embedding {
        Json(progress.embeddings(&answer)).into_response()
    } else if stream {
        // The server answered a streamed request in one piece: still NDJSON, as a stream of one
        // content line and the final line.
        let mut out = Vec::new();
        progress.whole_as_lines(&answer, &mut out);
        Response::builder()
            .header(header::CONTENT_TYPE, NDJSON)
            .body(Body::from(out))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
    } else {
        Json(progress.whole(&answer)).into_response()
    };
    with_model_header(response, Some(&gate.id))
}

/// Reads a whole upstream body, giving up when it goes silent for `proxy.stall_timeout`.
async fn read_all(body: Body, stall: Option<Duration>, limit: usize) -> Result<Bytes, String> {
    let mut stream = body.into_data_stream();
    let mut out = Vec::new();
    loop {
        let next = match stall {
            Some(limit) => tokio::time::timeout(limit, stream.next()).await.map_err(|_| {
                format!("the model server sent nothing for {} (proxy.stall_timeout)", crate::units::Rounded(limit))
            })?,
            None => stream.next().await,
        };
        match next {
            None => return Ok(Bytes::from(out)),
            Some(Ok(bytes)) => {
                if out.len() + bytes.len() > limit {
                    return Err(format!("the answer is larger than {} MiB", limit >> 20));
                }
                out.extend_from_slice(&bytes);
            }
            Some(Err(e)) => return Err(root_cause(&e)),
        }
    }
}

/// The most one streamed event (or one tool call being assembled) may hold: a model server that
/// never ends an event must not grow the daemon without bound.
const MAX_EVENT_BYTES: usize = 16 << 20;

/// A server-sent-events parser fed with reads of any size: an event split across reads waits for
/// its end, several events in one read all come out.
#[derive(Default)]
struct SseParser {
    /// The start of a line not yet ended.
    partial: Vec<u8>,
    /// How much of `partial` is known to hold no newline (so a read scans only what is new).
    scanned: usize,
    /// The `data` of the event being read (its lines joined with `\n`).
    data: Option<String>,
}

impl SseParser {
    /// Feeds bytes; the data of each event they complete is appended to `events`. `Err` if an
    /// event grows past [`MAX_EVENT_BYTES`].
    fn feed(&mut self, bytes: &[u8], events: &mut Vec<String>) -> Result<(), String> {
        self.partial.extend_from_slice(bytes);
        let mut start = 0;
        let mut from = self.scanned;
        while let Some(end) = self.partial[from..].iter().position(|b| *b == b'\n') {
            let line = self.partial[start..from + end].to_vec();
            start = from + end + 1;
            from = start;
            self.line(&line, events);
        }
        self.partial.drain(..start);
        self.scanned = self.partial.len();
        let pending = self.partial.len() + self.data.as_ref().map_or(0, String::len);
        if pending > MAX_EVENT_BYTES {
            return Err(format!(
                "the model server sent an event larger than {} MiB; the answer was cut off",
                MAX_EVENT_BYTES >> 20
            ));
        }
        Ok(())
    }

    /// The stream ended: an unterminated last line and event still count.
    fn finish(&mut self, events: &mut Vec<String>) {
        self.scanned = 0;
        let line = std::mem::take(&mut self.partial);
        if !line.is_empty() {
            self.line(&line, events);
        }
        if let Some(data) = self.data.take() {
            events.push(data);
        }
    }

    fn line(&mut self, line: &[u8], events: &mut Vec<String>) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            if let Some(data) = self.data.take() {
                events.push(data);
            }
            return;
        }
        let line = String::from_utf8_lossy(line);
        if line.starts_with(':') {
            return; // a comment (keep-alive)
        }
        let (field, value) = line.split_once(':').unwrap_or((&line, ""));
        if field == "data" {
            let value = value.strip_prefix(' ').unwrap_or(value);
            match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            }
        }
    }
}

/// One tool call being assembled from streamed deltas.
#[derive(Default)]
struct ToolCall {
    name: String,
    arguments: String,
}

/// What a translated answer has said so far, and the timings for its final line.
struct Progress {
    request: Translation,
    /// When the request went upstream.
    sent: Instant,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    deltas: u64,
    finish_reason: Option<String>,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    tool_calls: Vec<ToolCall>,
    done: bool,
}

/// OpenAI's `finish_reason` as Ollama's `done_reason`.
fn done_reason(finish_reason: Option<&str>) -> &'static str {
    match finish_reason {
        Some("length") => "length",
        _ => "stop",
    }
}

/// The text a choice carries: a chat delta's or message's `content`, or a completion's `text`.
fn choice_text<'a>(choice: &'a Value, part: &str) -> Option<&'a str> {
    choice[part]["content"].as_str().or_else(|| choice["text"].as_str())
}

/// OpenAI tool calls (arguments as a JSON string) as Ollama's (arguments as an object).
fn ollama_tool_calls(calls: impl Iterator<Item = (String, String)>) -> Vec<Value> {
    calls
        .map(|(name, arguments)| {
            let arguments = serde_json::from_str::<Value>(&arguments).unwrap_or(Value::String(arguments));
            json!({ "function": { "name": name, "arguments": arguments } })
        })
        .collect()
}

impl Progress {
    fn new(request: Translation, sent: Instant) -> Progress {
        Progress {
            request,
            sent,
            first_token: None,
            last_token: None,
            deltas: 0,
            finish_reason: None,
            prompt_tokens: None,
            completion_tokens: None,
            tool_calls: Vec::new(),
            done: false,
        }
    }

    /// A line (or whole answer) carrying text: `message` for chat, `response` for generate.
    fn line(&self, content: &str, thinking: Option<&str>, done: bool) -> Value {
        let mut line = json!({ "model": self.request.asked, "created_at": now() });
        match self.request.endpoint {
            Endpoint::Chat => {
                let mut message = json!({ "role": "assistant", "content": content });
                if let Some(thinking) = thinking {
                    message["thinking"] = json!(thinking);
                }
                line["message"] = message;
            }
            _ => {
                line["response"] = json!(content);
                if let Some(thinking) = thinking {
                    line["thinking"] = json!(thinking);
                }
            }
        }
        line["done"] = json!(done);
        line
    }

    /// Adds `done_reason`, the counts and the durations to a final line.
    fn complete(&self, line: &mut Value) {
        let end = Instant::now();
        line["done_reason"] = json!(done_reason(self.finish_reason.as_deref()));
        line["total_duration"] = json!(nanos(end - self.request.started));
        line["load_duration"] = json!(nanos(self.request.load_duration));
        if let Some(count) = self.prompt_tokens {
            line["prompt_eval_count"] = json!(count);
        }
        let first = self.first_token.unwrap_or(end);
        line["prompt_eval_duration"] = json!(nanos(first.saturating_duration_since(self.sent)));
        line["eval_count"] = json!(self.completion_tokens.unwrap_or(self.deltas));
        let last = self.last_token.unwrap_or(end);
        line["eval_duration"] = json!(nanos(last.saturating_duration_since(first)));
    }

    fn push_line(out: &mut Vec<u8>, line: &Value) {
        out.extend_from_slice(line.to_string().as_bytes());
        out.push(b'\n');
    }

    fn usage(&mut self, answer: &Value) {
        if let Some(n) = answer["usage"]["prompt_tokens"].as_u64() {
            self.prompt_tokens = Some(n);
        }
        if let Some(n) = answer["usage"]["completion_tokens"].as_u64() {
            self.completion_tokens = Some(n);
        }
    }

    /// One SSE event's data: its NDJSON lines go to `out`. `Err` is an error the server sent in
    /// the stream.
    fn event(&mut self, data: &str, out: &mut Vec<u8>) -> Result<(), String> {
        let data = data.trim();
        if data.is_empty() || self.done {
            return Ok(());
        }
        if data == "[DONE]" {
            self.final_lines(out);
            return Ok(());
        }
        let chunk: Value =
            serde_json::from_str(data).map_err(|e| format!("unreadable event from the model server: {e}"))?;
        if !chunk["error"].is_null() {
            return Err(error_message(data.as_bytes()).unwrap_or_else(|| "the model server reported an error".into()));
        }
        self.usage(&chunk);
        let Some(choice) = chunk["choices"].get(0) else { return Ok(()) };
        if let Some(reason) = choice["finish_reason"].as_str() {
            self.finish_reason = Some(reason.to_string());
        }
        if let Some(calls) = choice["delta"]["tool_calls"].as_array() {
            for (position, call) in calls.iter().enumerate() {
                // A model server's index is not trusted to size memory: at most one past the
                // calls seen so far.
                let index = call["index"]
                    .as_u64()
                    .map_or(position, |i| usize::try_from(i).unwrap_or(usize::MAX))
                    .min(self.tool_calls.len());
                if self.tool_calls.len() <= index {
                    self.tool_calls.resize_with(index + 1, ToolCall::default);
                }
                let assembled = &mut self.tool_calls[index];
                if let Some(name) = call["function"]["name"].as_str() {
                    assembled.name.push_str(name);
                }
                if let Some(arguments) = call["function"]["arguments"].as_str() {
                    assembled.arguments.push_str(arguments);
                }
                if assembled.name.len() + assembled.arguments.len() > MAX_EVENT_BYTES {
                    return Err(format!(
                        "the model server sent a tool call larger than {} MiB; the answer was cut off",
                        MAX_EVENT_BYTES >> 20
                    ));
                }
            }
        }
        let content = choice_text(choice, "delta").unwrap_or("");
        let thinking = choice["delta"]["reasoning_content"].as_str().filter(|t| !t.is_empty());
        if !content.is_empty() || thinking.is_some() {
            let now = Instant::now();
            self.first_token.get_or_insert(now);
            self.last_token = Some(now);
            self.deltas += 1;
            Self::push_line(out, &self.line(content, thinking, false));
        }
        Ok(())
    }

    /// The line with the assembled tool calls (if any), then the final line.
    fn final_lines(&mut self, out: &mut Vec<u8>) {
        if self.done {
            return;
        }
        self.done = true;
        if !self.tool_calls.is_empty() && self.request.endpoint == Endpoint::Chat {
            let calls = std::mem::take(&mut self.tool_calls);
            let mut line = self.line("", None, false);
            line["message"]["tool_calls"] = json!(ollama_tool_calls(calls.into_iter().map(|c| (c.name, c.arguments))));
            Self::push_line(out, &line);
        }
        let mut line = self.line("", None, true);
        self.complete(&mut line);
        Self::push_line(out, &line);
    }

    /// Reads a whole (non-streamed) completion.
    fn absorb(&mut self, answer: &Value) -> (String, Option<String>, Vec<Value>) {
        let now = Instant::now();
        self.first_token = Some(self.sent);
        self.last_token = Some(now);
        self.usage(answer);
        let choice = &answer["choices"][0];
        self.finish_reason = choice["finish_reason"].as_str().map(str::to_string);
        let content = choice_text(choice, "message").unwrap_or("").to_string();
        let thinking = choice["message"]["reasoning_content"].as_str().filter(|t| !t.is_empty()).map(str::to_string);
        let calls = choice["message"]["tool_calls"].as_array().map_or_else(Vec::new, |calls| {
            ollama_tool_calls(calls.iter().map(|c| {
                let name = c["function"]["name"].as_str().unwrap_or("").to_string();
                let arguments = match &c["function"]["arguments"] {
                    Value::String(text) => text.clone(),
                    other => other.to_string(),
                };
                (name, arguments)
            }))
        });
        if !content.is_empty() {
            self.deltas = 1;
        }
        (content, thinking, calls)
    }

    /// A whole completion as one Ollama object.
    fn whole(&mut self, answer: &Value) -> Value {
        let (content, thinking, calls) = self.absorb(answer);
        let mut line = self.line(&content, thinking.as_deref(), true);
        if !calls.is_empty() && self.request.endpoint == Endpoint::Chat {
            line["message"]["tool_calls"] = json!(calls);
        }
        self.complete(&mut line);
        line
    }

    /// A whole completion as NDJSON: the content line, then the final line.
    fn whole_as_lines(&mut self, answer: &Value, out: &mut Vec<u8>) {
        let (content, thinking, calls) = self.absorb(answer);
        let mut line = self.line(&content, thinking.as_deref(), false);
        if !calls.is_empty() && self.request.endpoint == Endpoint::Chat {
            line["message"]["tool_calls"] = json!(calls);
        }
        Self::push_line(out, &line);
        self.done = true;
        let mut last = self.line("", None, true);
        self.complete(&mut last);
        Self::push_line(out, &last);
    }

    /// An OpenAI embeddings answer as Ollama's.
    fn embeddings(&mut self, answer: &Value) -> Value {
        self.usage(answer);
        let mut data: Vec<&Value> = answer["data"].as_array().map(|d| d.iter().collect()).unwrap_or_default();
        data.sort_by_key(|d| d["index"].as_u64().unwrap_or(0));
        let vectors: Vec<Value> = data.iter().map(|d| d["embedding"].clone()).collect();
        if self.request.endpoint == Endpoint::Embeddings {
            return json!({ "embedding": vectors.into_iter().next().unwrap_or_else(|| json!([])) });
        }
        let mut body = json!({
            "model": self.request.asked,
            "embeddings": vectors,
            "total_duration": nanos(self.request.started.elapsed()),
            "load_duration": nanos(self.request.load_duration),
        });
        if let Some(count) = self.prompt_tokens {
            body["prompt_eval_count"] = json!(count);
        }
        body
    }
}

/// Where a relayed stream is.
enum Phase {
    Streaming,
    /// The final line went out; what is left of the upstream body is read (briefly) so its
    /// connection can be reused, then the stream ends.
    Draining,
    /// The upstream failed after the error line went out: the client's stream breaks with this.
    Broken(String),
    Ended,
}

/// A streamed completion being turned into NDJSON, holding the model in use until it ends or the
/// client goes away (the stream is dropped with the response body).
struct Relay {
    upstream: axum::body::BodyDataStream,
    parser: SseParser,
    progress: Progress,
    stall: Option<Duration>,
    model: String,
    phase: Phase,
    _pin: Pin,
}

impl Relay {
    fn into_stream(self) -> impl futures_util::Stream<Item = Result<Bytes, axum::BoxError>> + Send + 'static {
        futures_util::stream::unfold(self, |mut relay| async move {
            let item = relay.next().await?;
            Some((item, relay))
        })
    }

    /// The next piece of the client's stream: the lines of the next upstream read that produced
    /// any, as soon as it arrives.
    async fn next(&mut self) -> Option<Result<Bytes, axum::BoxError>> {
        loop {
            match std::mem::replace(&mut self.phase, Phase::Ended) {
                Phase::Ended => return None,
                Phase::Broken(message) => return Some(Err(message.into())),
                Phase::Draining => {
                    let deadline = tokio::time::Instant::now() + DRAIN_LIMIT;
                    while let Ok(Some(Ok(_))) = tokio::time::timeout_at(deadline, self.upstream.next()).await {}
                    return None;
                }
                Phase::Streaming => {}
            }
            let next = match self.stall {
                Some(limit) => match tokio::time::timeout(limit, self.upstream.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        let message = format!(
                            "the model server sent nothing for {} (proxy.stall_timeout)",
                            crate::units::Rounded(limit)
                        );
                        return Some(Ok(self.fail(message)));
                    }
                },
                None => self.upstream.next().await,
            };
            let mut events = Vec::new();
            let ended = match next {
                Some(Ok(bytes)) => {
                    if let Err(message) = self.parser.feed(&bytes, &mut events) {
                        return Some(Ok(self.fail(message)));
                    }
                    false
                }
                Some(Err(e)) => {
                    let message = format!("model {} failed mid-answer: {}", self.model, root_cause(&e));
                    return Some(Ok(self.fail(message)));
                }
                None => {
                    self.parser.finish(&mut events);
                    true
                }
            };
            let mut out = Vec::new();
            self.phase = Phase::Streaming;
            for data in events {
                if let Err(message) = self.progress.event(&data, &mut out) {
                    Progress::push_line(&mut out, &json!({ "error": message }));
                    self.phase = Phase::Ended;
                    break;
                }
            }
            if matches!(self.phase, Phase::Streaming) {
                if ended {
                    // A server that ends without `[DONE]` still gets its answer a final line.
                    self.progress.final_lines(&mut out);
                    self.phase = Phase::Ended;
                } else if self.progress.done {
                    self.phase = Phase::Draining;
                }
            }
            if !out.is_empty() {
                return Some(Ok(Bytes::from(out)));
            }
        }
    }

    /// An error line for the client, after which its stream breaks.
    fn fail(&mut self, message: String) -> Bytes {
        tracing::warn!(model = %self.model, "{message}");
        self.phase = Phase::Broken(message.clone());
        Bytes::from(format!("{}\n", json!({ "error": message })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events_of(reads: &[&str]) -> Vec<String> {
        let mut parser = SseParser::default();
        let mut events = Vec::new();
        for read in reads {
            parser.feed(read.as_bytes(), &mut events).unwrap();
        }
        parser.finish(&mut events);
        events
    }

    #[test]
    fn sse_events_split_across_reads_or_packed_into_one_come_out_whole() {
        let whole = "data: {\"a\":1}\n\ndata: {\"b\":2}\n\ndata: [DONE]\n\n";
        let expected = vec!["{\"a\":1}".to_string(), "{\"b\":2}".into(), "[DONE]".into()];
        assert_eq!(events_of(&[whole]), expected);
        // Every split point, including inside "data:" and between the two newlines.
        for cut in 0..whole.len() {
            assert_eq!(events_of(&[&whole[..cut], &whole[cut..]]), expected, "cut at {cut}");
        }
        let bytes: Vec<String> = whole.chars().map(String::from).collect();
        let reads: Vec<&str> = bytes.iter().map(String::as_str).collect();
        assert_eq!(events_of(&reads), expected);
    }

    #[test]
    fn sse_crlf_comments_multiline_data_and_an_unterminated_last_event() {
        assert_eq!(
            events_of(&[": keep-alive\r\n\r\nevent: x\r\ndata: one\r\ndata:two\r\n\r\ndata: {\"last\":true}"]),
            vec!["one\ntwo".to_string(), "{\"last\":true}".into()]
        );
    }

    #[test]
    fn sse_multibyte_characters_split_across_reads_survive() {
        let text = "data: {\"c\":\"héllo ✓\"}\n\n";
        let bytes = text.as_bytes();
        for cut in 0..bytes.len() {
            let mut parser = SseParser::default();
            let mut events = Vec::new();
            parser.feed(&bytes[..cut], &mut events).unwrap();
            parser.feed(&bytes[cut..], &mut events).unwrap();
            assert_eq!(events, vec!["{\"c\":\"héllo ✓\"}".to_string()]);
        }
    }

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
    fn a_chat_maps_messages_options_and_format() {
        let request = object(json!({
            "model": "llm",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "look", "images": ["aGk="]},
                {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}]},
                {"role": "tool", "content": "42", "tool_name": "f"},
            ],
            "options": {"temperature": 0.2, "top_p": 0.9, "num_predict": 64, "stop": ["\n\n"], "seed": 7, "num_ctx": 4096},
            "format": "json",
            "keep_alive": "5m",
        }));
        let (path, body) = completion_request(Endpoint::Chat, "llm", &request).unwrap();
        assert_eq!(path, "/v1/chat/completions");
        assert_eq!(body["stream"], true, "Ollama streams unless told not to");
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["messages"][1], json!({"role": "user", "content": "look"}));
        assert_eq!(body["messages"][2]["tool_calls"][0]["function"]["arguments"], "{\"x\":1}");
        assert_eq!(body["messages"][3]["name"], "f");
        assert_eq!(body["temperature"], 0.2);
        assert_eq!(body["top_p"], 0.9);
        assert_eq!(body["max_tokens"], 64);
        assert_eq!(body["stop"], json!(["\n\n"]));
        assert_eq!(body["seed"], 7);
        assert_eq!(body["response_format"], json!({"type": "json_object"}));
        assert!(body.get("num_ctx").is_none() && body.get("keep_alive").is_none() && body.get("options").is_none());

        let request = object(json!({"model": "llm", "messages": [], "stream": false, "options": {"num_predict": -1}}));
        let (_, body) = completion_request(Endpoint::Chat, "llm", &request).unwrap();
        assert_eq!(body["stream"], false);
        assert!(body.get("stream_options").is_none() && body.get("max_tokens").is_none());
        assert!(completion_request(Endpoint::Chat, "llm", &object(json!({"messages": "hi"}))).is_err());
    }

    #[test]
    fn a_generate_is_a_chat_unless_raw() {
        let request = object(json!({"prompt": "why?", "system": "be brief", "format": {"type": "object"}}));
        let (path, body) = completion_request(Endpoint::Generate, "llm", &request).unwrap();
        assert_eq!(path, "/v1/chat/completions");
        assert_eq!(
            body["messages"],
            json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": "why?"}])
        );
        assert_eq!(body["response_format"]["type"], "json_schema");
        assert_eq!(body["response_format"]["json_schema"]["schema"], json!({"type": "object"}));

        let request = object(json!({"prompt": "why?", "system": "be brief", "raw": true, "stream": false}));
        let (path, body) = completion_request(Endpoint::Generate, "llm", &request).unwrap();
        assert_eq!(path, "/v1/completions");
        assert_eq!(body["prompt"], "be brief\n\nwhy?");
        assert!(completion_request(Endpoint::Generate, "llm", &object(json!({"prompt": 3}))).is_err());
    }

    fn progress(endpoint: Endpoint) -> Progress {
        let request = Translation {
            endpoint,
            asked: "llm".into(),
            name: "llm".into(),
            started: Instant::now(),
            load_duration: Duration::ZERO,
        };
        Progress::new(request, Instant::now())
    }

    fn lines(out: &[u8]) -> Vec<Value> {
        std::str::from_utf8(out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    #[test]
    fn streamed_chunks_become_lines_and_done_ends_them() {
        let mut progress = progress(Endpoint::Chat);
        let mut out = Vec::new();
        progress
            .event(
                r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":"Hel"},"finish_reason":null}]}"#,
                &mut out,
            )
            .unwrap();
        progress
            .event(r#"{"choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":"length"}]}"#, &mut out)
            .unwrap();
        progress.event(r#"{"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2}}"#, &mut out).unwrap();
        progress.event("[DONE]", &mut out).unwrap();
        progress.event("[DONE]", &mut out).unwrap();
        let lines = lines(&out);
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert_eq!(lines[0]["message"], json!({"role": "assistant", "content": "Hel"}));
        assert_eq!(lines[0]["done"], false);
        assert_eq!(lines[1]["message"]["content"], "lo");
        let last = &lines[2];
        assert_eq!((last["done"].clone(), last["done_reason"].clone()), (json!(true), json!("length")));
        assert_eq!((last["prompt_eval_count"].clone(), last["eval_count"].clone()), (json!(4), json!(2)));
        assert_eq!(last["model"], "llm");
        assert!(last["total_duration"].is_u64() && last["eval_duration"].is_u64());
        assert!(DateTime::parse_from_rfc3339(last["created_at"].as_str().unwrap()).is_ok());
    }

    #[test]
    fn streamed_tool_calls_are_assembled_and_completions_text_is_read() {
        let mut progress = progress(Endpoint::Chat);
        let mut out = Vec::new();
        let first = r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"c","function":{"name":"get","arguments":"{\"ci"}}]}}]}"#;
        let second = r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"ty\":\"Oslo\"}"}}]},"finish_reason":"tool_calls"}]}"#;
        progress.event(first, &mut out).unwrap();
        progress.event(second, &mut out).unwrap();
        progress.event("[DONE]", &mut out).unwrap();
        let lines = lines(&out);
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines[0]["message"]["tool_calls"],
            json!([{"function": {"name": "get", "arguments": {"city": "Oslo"}}}])
        );
        assert_eq!(lines[1]["done_reason"], "stop");

        let mut progress = self::progress(Endpoint::Generate);
        let mut out = Vec::new();
        progress.event(r#"{"choices":[{"text":"abc","finish_reason":null}]}"#, &mut out).unwrap();
        assert_eq!(self::lines(&out)[0]["response"], "abc");
        assert!(
            progress.event(r#"{"error":{"message":"context full"}}"#, &mut out).unwrap_err().contains("context full")
        );
    }

    #[test]
    fn a_whole_answer_becomes_one_object() {
        let mut progress = progress(Endpoint::Chat);
        let answer = json!({
            "choices": [{"message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1},
        });
        let whole = progress.whole(&answer);
        assert_eq!(whole["message"], json!({"role": "assistant", "content": "hi"}));
        assert_eq!((whole["done"].clone(), whole["done_reason"].clone()), (json!(true), json!("stop")));
        assert_eq!((whole["prompt_eval_count"].clone(), whole["eval_count"].clone()), (json!(3), json!(1)));
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

    #[tokio::test]
    async fn openai_errors_are_reshaped_keeping_status_and_retry_after() {
        let openai =
            ApiError::coded(StatusCode::SERVICE_UNAVAILABLE, "insufficient_vram", "no room").render(Surface::OpenAi);
        let response = reshape(openai).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(response.headers().contains_key(header::RETRY_AFTER));
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&bytes).unwrap(), json!({"error": "no room"}));
    }
}
