//! The proxy core both model surfaces (`openai.rs`, `ollama.rs`) share: reading a request body
//! (bounded per request by `proxy.max_body`, and across all requests by the `proxy.max_buffered`
//! budget), finding and pinning a model (loading it if needed), forwarding over the pooled client
//! with `proxy.first_byte_timeout`, and the pinned streaming body that holds the model in use
//! until the answer ends (with `proxy.stall_timeout`), in `relay.rs`.
//!
//! Errors are [`ApiError`]s: each surface renders them in its own shape.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode, header};
use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::AppState;
use super::error::{ApiError, Rejection, Route, discard_rest};
use crate::arbiter::gate::{ModelGate, Pin, UpstreamKind};
use crate::client::root_cause;

pub use super::relay::{Framing, PinnedBody};

/// The proxy's client: hyper's pooled HTTP/1 client, without the layers (URL parsing, redirect
/// and timeout policies) a general-purpose client adds to every request.
pub type UpstreamClient = hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Body>;

/// A client for model servers: keep-alive pool, `TCP_NODELAY` (streamed tokens are small).
pub fn upstream_client() -> UpstreamClient {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build(connector)
}

/// Response header naming the model that served the request.
pub const MODEL_HEADER: &str = "x-vramgate-model";

/// `proxy.max_buffered`: the bytes of request bodies the proxy holds in memory at once, across
/// all requests (each one is read whole before it is forwarded, and a caller waiting for a model
/// to load holds its body meanwhile). A request that would go over it is refused with a 503 and
/// `Retry-After` at once, rather than waiting: its sender can retry, and memory stays bounded.
#[derive(Clone, Debug)]
pub struct BodyBudget {
    bytes: Arc<Semaphore>,
    total: usize,
}

impl BodyBudget {
    /// A budget of `total` bytes (at most what a semaphore counts, about 2^61).
    pub fn new(total: usize) -> BodyBudget {
        let total = total.min(Semaphore::MAX_PERMITS);
        BodyBudget { bytes: Arc::new(Semaphore::new(total)), total }
    }

    /// Bytes not held by any request now.
    pub fn available(&self) -> usize {
        self.bytes.available_permits()
    }

    /// Takes `len` more bytes for a body already holding `held`; `None` when the budget is spent.
    fn take(&self, held: &mut Option<OwnedSemaphorePermit>, len: usize) -> Option<()> {
        if len == 0 {
            return Some(());
        }
        let len = u32::try_from(len).ok()?;
        let permit = Arc::clone(&self.bytes).try_acquire_many_owned(len).ok()?;
        match held {
            Some(held) => held.merge(permit),
            None => *held = Some(permit),
        }
        Some(())
    }
}

/// A request body read whole, holding its share of the [`BodyBudget`] until dropped.
pub struct BufferedBody {
    /// The bytes.
    pub bytes: Bytes,
    /// Returned to the budget when the body is dropped.
    _held: Option<OwnedSemaphorePermit>,
}

/// Reads a whole request body, bounded by `proxy.max_body` (413) and the `proxy.max_buffered`
/// budget (503). The body's bytes count against the budget until the result is dropped.
pub async fn read_body(state: &AppState, mut body: Body) -> Result<BufferedBody, ApiError> {
    let limit = state.max_body_bytes;
    let too_large = || Rejection::BodyTooLarge { limit_bytes: limit, setting: Some("proxy.max_body") };
    // A declared length over the limit is refused before anything is read.
    if http_body::Body::size_hint(&body).lower() > u64::try_from(limit).unwrap_or(u64::MAX) {
        discard_rest(&mut body).await;
        return Err(too_large().into());
    }
    let mut held = None;
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut read: usize = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Rejection::BodyUnreadable { detail: root_cause(&e) })?;
        let Ok(data) = frame.into_data() else { continue };
        let Some(total) = read.checked_add(data.len()).filter(|&n| n <= limit) else {
            drop(held);
            discard_rest(&mut body).await;
            return Err(too_large().into());
        };
        read = total;
        if state.body_budget.take(&mut held, data.len()).is_none() {
            drop((held, chunks));
            discard_rest(&mut body).await;
            return Err(Rejection::BufferBudgetSpent { budget_bytes: state.body_budget.total }.into());
        }
        chunks.push(data);
    }
    let bytes = match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop().unwrap_or_default(),
        _ => {
            let mut whole = Vec::with_capacity(read);
            for chunk in &chunks {
                whole.extend_from_slice(chunk);
            }
            Bytes::from(whole)
        }
    };
    Ok(BufferedBody { bytes, _held: held })
}

/// Reads a whole upstream body, giving up when it goes silent for `proxy.stall_timeout`.
pub async fn read_upstream(body: Body, stall: Option<Duration>, limit: usize) -> Result<Bytes, String> {
    read_upstream_within(body, stall, limit, None).await.map(|read| read.bytes).map_err(|(_, message)| message)
}

/// [`read_upstream`] for an answer vramgate must hold whole to translate it: its bytes count
/// against the `proxy.max_buffered` budget, as request bodies do, until the result is dropped,
/// so many large answers at once cannot grow the daemon past it. Errors: 502 and what failed, or
/// 503 when the budget is spent.
pub async fn read_answer(state: &AppState, body: Body, limit: usize) -> Result<BufferedBody, (StatusCode, String)> {
    read_upstream_within(body, state.stall_timeout, limit, Some(&state.body_budget)).await
}

async fn read_upstream_within(
    body: Body,
    stall: Option<Duration>,
    limit: usize,
    budget: Option<&BodyBudget>,
) -> Result<BufferedBody, (StatusCode, String)> {
    use futures_util::StreamExt;
    let mut stream = body.into_data_stream();
    let mut out = Vec::new();
    let mut held = None;
    let failed = |message: String| (StatusCode::BAD_GATEWAY, message);
    loop {
        let next = match stall {
            Some(limit) => tokio::time::timeout(limit, stream.next()).await.map_err(|_| {
                failed(format!(
                    "the model server sent nothing for {} (proxy.stall_timeout)",
                    crate::units::Rounded(limit)
                ))
            })?,
            None => stream.next().await,
        };
        match next {
            None => return Ok(BufferedBody { bytes: Bytes::from(out), _held: held }),
            Some(Ok(bytes)) => {
                if out.len().checked_add(bytes.len()).is_none_or(|n| n > limit) {
                    return Err(failed(format!("the answer is larger than {} MiB", limit >> 20)));
                }
                if let Some(budget) = budget
                    && budget.take(&mut held, bytes.len()).is_none()
                {
                    let message = format!(
                        "vramgate holds {} MiB of bodies and answers already (proxy.max_buffered); try again shortly",
                        budget.total >> 20
                    );
                    return Err((StatusCode::SERVICE_UNAVAILABLE, message));
                }
                out.extend_from_slice(&bytes);
            }
            Some(Err(e)) => return Err(failed(root_cause(&e))),
        }
    }
}

/// Removes the hop-by-hop headers (the fixed list, and any header the `Connection` header names)
/// and the CORS headers (`Origin` and `Access-Control-*`), in either direction.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
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
    // CORS is vramgate's own decision (`server.cors_origins`, `api/cors.rs`), made for the
    // client that asked it: the client's Origin does not go on (llama-server echoes any Origin
    // into Access-Control-Allow-Origin; Ollama refuses origins of its own list with a 403), and a
    // model server's CORS headers do not come back, or a page on any origin could read an answer
    // vramgate would not let it read.
    headers.remove(header::ORIGIN);
    let cors: Vec<header::HeaderName> =
        headers.keys().filter(|name| name.as_str().starts_with("access-control-")).cloned().collect();
    for name in cors {
        headers.remove(name);
    }
}

/// Hop-by-hop headers, which describe one connection and must not be forwarded.
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

/// The refusal for a request to an external model, which serves inside its app.
pub fn external_refusal(id: &str) -> ApiError {
    ApiError::coded(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        format!(
            "model {id} is an external model: it runs inside the app attached to it, which serves its own requests; \
             vramgate only places it"
        ),
    )
}

/// The error for a name that is no model, alias or `[aliases]` name.
pub fn unknown_model(state: &AppState, name: &str) -> ApiError {
    let names = state.arbiter.names();
    let list = if names.is_empty() { "none configured".to_string() } else { names.join(", ") };
    ApiError::coded(StatusCode::NOT_FOUND, "model_not_found", format!("unknown model {name:?}; available: {list}"))
}

/// Finds the model a name means and pins it, loading it first if it is not ready. For an
/// `[aliases]` name: the first candidate that is ready, else the one the arbiter chooses by fit.
///
/// `to_serve`: the model is wanted to answer a request. An external model cannot (it serves inside
/// its app), so it is refused before anything loads, rather than placed for nothing.
pub async fn pin_model(state: &AppState, name: &str, to_serve: bool) -> Result<(Arc<ModelGate>, Pin), ApiError> {
    let arbiter_error = |e| ApiError::arbiter(e, Route::Proxy);
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
            ApiError::coded(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("alias {name} chose unknown model {chosen}"),
            )
        })?
    } else {
        return Err(unknown_model(state, name));
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
    Err(ApiError::coded(
        StatusCode::SERVICE_UNAVAILABLE,
        "model_busy",
        format!("model {} was swapped out again each time it became ready; try again", model.id),
    ))
}

/// [`pin_model`], recording the wait in `record`: the model a request was for, and how long it
/// waited for its model to be admitted.
pub async fn pin_recorded(
    state: &AppState,
    name: &str,
    to_serve: bool,
    record: &mut crate::metrics::RequestRecord<'_>,
) -> Result<(Arc<ModelGate>, Pin), ApiError> {
    let waiting = std::time::Instant::now();
    let pinned = pin_model(state, name, to_serve).await;
    match &pinned {
        Ok((gate, _)) => record.admitted(&gate.id, waiting.elapsed()),
        // Not admitted: the request still counts for its model, when the name is one.
        Err(_) => {
            if let Some(gate) = state.arbiter.gate(name) {
                record.model(&gate.id);
            }
        }
    }
    pinned
}

/// A request for a model's server: `uri` (its address), with the client's method, headers and
/// body (built again for each try: a request sent once more after a crash goes to a new address).
pub fn upstream_request(
    method: &axum::http::Method,
    uri: axum::http::Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> axum::http::Request<Body> {
    let mut request = axum::http::Request::new(Body::from(body.clone()));
    *request.method_mut() = method.clone();
    *request.uri_mut() = uri;
    *request.headers_mut() = headers.clone();
    request
}

/// The error for a model address that makes no URI.
pub fn unaddressable(pin: &Pin, error: impl std::fmt::Display) -> ApiError {
    ApiError::coded(
        StatusCode::BAD_GATEWAY,
        "upstream_error",
        format!("cannot address model {} at {}: {error}", pin.model_id(), pin.upstream),
    )
}

/// The error for a request whose model was told to stop before it answered.
pub fn stopped_before_answering(id: &str) -> ApiError {
    ApiError::coded(
        StatusCode::SERVICE_UNAVAILABLE,
        "model_stopped",
        format!("model {id} was stopped (unloaded or shut down) before it answered; try again"),
    )
}

/// Sends a request to the pinned model's server over the pooled client, waiting at most
/// `proxy.first_byte_timeout` for the answer to start, and no longer than the model serves: a
/// model told to stop meanwhile ([`Pin::cut`]) ends the wait and closes the connection (a
/// llama-server generating a whole answer exits on SIGTERM only once its client has gone).
pub async fn send(
    state: &AppState,
    gate: &ModelGate,
    pin: &Pin,
    request: axum::http::Request<Body>,
) -> Result<axum::http::Response<hyper::body::Incoming>, ApiError> {
    send_once(state, gate, pin, request).await.map_err(|(error, _)| error)
}

/// How long a request that could not connect to its model server waits for vramgate to see that
/// server's exit (a process's exit reaches the engine within milliseconds; more on a loaded
/// machine) before the failure counts as final.
const CRASH_NOTICE: Duration = Duration::from_secs(2);

/// A connection that breaks this soon after the request went out, before any answer, on a
/// server that turns out to have crashed, was a kept-alive connection to a server already dead:
/// its end had not been read yet when the request was written. No server reads a request and
/// dies of it this fast in practice; one that does sees it twice.
const STALE_CONNECTION: Duration = Duration::from_millis(100);

/// Sends the request `build` makes for the pinned model, as [`send`] does. When it did not reach
/// the server because that server had just died (it could not connect, or its kept-alive
/// connection broke within [`STALE_CONNECTION`] with no answer; vramgate sees the crash within
/// [`CRASH_NOTICE`]: typically a request sent in the instant after a crash), the model is started
/// again and the request sent once more, to the new server. A connection that breaks later is
/// not retried: the server may have read the request (and died of it). Only for process models:
/// an Ollama's death is not one model's crash, and vramgate does not restart it.
pub async fn send_retrying(
    state: &AppState,
    gate: &Arc<ModelGate>,
    pin: Pin,
    build: impl Fn(&Pin) -> Result<axum::http::Request<Body>, ApiError>,
) -> Result<(Pin, axum::http::Response<hyper::body::Incoming>), ApiError> {
    let failed = match send_once(state, gate, &pin, build(&pin)?).await {
        Ok(response) => return Ok((pin, response)),
        Err((error, false)) => return Err(error),
        Err((error, true)) => error,
    };
    if *pin.kind() != UpstreamKind::OpenAi {
        return Err(failed);
    }
    if !pin.crashed_within(CRASH_NOTICE).await {
        return Err(failed);
    }
    drop(pin);
    tracing::info!(model = %gate.id, "{}: its server died; sending the request again once it has restarted", failed.message());
    let (_, pin) = pin_model(state, &gate.id, true).await?;
    let response = send(state, gate, &pin, build(&pin)?).await?;
    Ok((pin, response))
}

/// [`send`], telling a failure to connect or a stale connection (`true`: nothing of the request
/// reached a live server, if it crashed, so it may be sent again to a restarted one) from the
/// other failures.
async fn send_once(
    state: &AppState,
    gate: &ModelGate,
    pin: &Pin,
    request: axum::http::Request<Body>,
) -> Result<axum::http::Response<hyper::body::Incoming>, (ApiError, bool)> {
    let started = std::time::Instant::now();
    let sent = async {
        tokio::select! {
            biased;
            () = pin.cut() => None,
            answered = state.upstream.request(request) => Some(answered),
        }
    };
    let sent = async { sent.await.ok_or_else(|| (stopped_before_answering(&gate.id), false)) };
    let answered = match state.first_byte_timeout {
        // Dropping the request here drops the caller's pin too: the model is free to go.
        Some(limit) => tokio::time::timeout(limit, sent).await.map_err(|_| {
            let error = ApiError::coded(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                format!(
                    "model {} did not start answering within {} (proxy.first_byte_timeout)",
                    gate.id,
                    crate::units::Rounded(limit)
                ),
            );
            (error, false)
        })??,
        None => sent.await?,
    };
    answered.map_err(|e| {
        let error = ApiError::coded(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            format!("model {} at {} failed: {}", gate.id, pin.upstream, root_cause(&e)),
        );
        (error, e.is_connect() || started.elapsed() < STALE_CONNECTION)
    })
}

/// The upstream's answer streamed back holding `pin`, with the hop-by-hop headers removed and
/// the serving model named in [`MODEL_HEADER`]; a streamed answer (SSE, NDJSON) that breaks ends
/// with an error message in its own framing and a clean end ([`PinnedBody`]).
pub fn pinned_response(
    state: &AppState,
    gate: &ModelGate,
    pin: Pin,
    response: axum::http::Response<hyper::body::Incoming>,
) -> axum::response::Response {
    let (mut head, incoming) = response.into_parts();
    strip_hop_by_hop(&mut head.headers);
    if let Ok(model) = axum::http::HeaderValue::from_str(&gate.id) {
        head.headers.insert(MODEL_HEADER, model);
    }
    let framing = Framing::of(&head.headers);
    if framing != Framing::Opaque {
        // A broken stream ends with one more message than the server sent.
        head.headers.remove(header::CONTENT_LENGTH);
    }
    let body = PinnedBody::new(incoming, state.stall_timeout, pin, framing);
    axum::response::Response::from_parts(head, Body::new(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

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

    /// A page on an origin vramgate does not allow must not read an answer because the model
    /// server allowed it: neither the client's Origin nor the server's CORS headers pass.
    #[test]
    fn cors_headers_do_not_pass_the_proxy_either_way() {
        let mut headers = HeaderMap::new();
        headers.insert(header::ORIGIN, "https://evil.example".parse().expect("a header value"));
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, "https://evil.example".parse().expect("a header value"));
        headers.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, "true".parse().expect("a header value"));
        headers.insert(header::CONTENT_TYPE, "text/event-stream".parse().expect("a header value"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert!(headers.contains_key(header::CONTENT_TYPE));
    }

    #[test]
    fn the_budget_is_taken_and_given_back() {
        let budget = BodyBudget::new(10);
        let mut first = None;
        assert!(budget.take(&mut first, 6).is_some());
        assert!(budget.take(&mut first, 2).is_some());
        assert_eq!(budget.available(), 2);
        let mut second = None;
        assert!(budget.take(&mut second, 3).is_none(), "over the budget");
        assert!(budget.take(&mut second, 2).is_some());
        drop(first);
        assert_eq!(budget.available(), 8, "a dropped body gives its bytes back");
        drop(second);
        assert_eq!(budget.available(), 10);
    }
}
