//! Lease endpoints: any job (FFmpeg, a training run, another language's app) holds VRAM.
//!
//! Two ways to hold a lease. With a heartbeat (`ttl`, the default): the answer is the grant, and
//! the lease expires unless renewed. Tied to the connection (`"hold": "connection"`, what
//! `vramgate run` uses): the answer is a stream of NDJSON lines, the grant first and then a
//! heartbeat line every 250 ms; the lease is released when the client goes away, which the next
//! heartbeat write notices, so even a SIGKILLed client frees its lease within a second.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::error::{JsonBody, JsonRequest, PathParam};
use super::{ApiError, AppState};
use crate::arbiter::{ArbiterHandle, LeaseGrant, LeaseRequest};
use crate::status::LeaseStatus;
use crate::units::{Mib, Span};

/// Heartbeat of a connection-held lease: short enough to notice a dead client well within a
/// second, long enough to cost nothing.
const STREAM_HEARTBEAT: Duration = Duration::from_millis(250);
/// Heartbeat TTL when the request sets none.
const DEFAULT_TTL: Duration = Duration::from_secs(30);

/// How the client holds the lease.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum HoldMode {
    /// Until `ttl` passes without a renew.
    #[default]
    Ttl,
    /// As long as this HTTP response is being read.
    Connection,
}

/// The request body of `POST /vramgate/leases`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateLease {
    /// Who holds it, for status and messages.
    #[serde(default)]
    holder: Option<String>,
    /// Memory to hold: `"6G"`, `"1536MiB"`, or a number of MiB. Not used with `model`.
    #[serde(default)]
    vram: Option<Mib>,
    #[serde(default)]
    device: Option<u32>,
    #[serde(default)]
    exclusive: bool,
    #[serde(default)]
    priority: Option<i32>,
    /// How long to wait for memory: `"30s"`, `"500ms"`, or seconds as a number or a string (`5`,
    /// `1.5`, `"5"`); `0` fails at once. Default: `scheduler.queue_timeout`.
    #[serde(default)]
    wait: Option<Span>,
    /// Heartbeat for `hold = "ttl"`, written like `wait`.
    #[serde(default)]
    ttl: Option<Span>,
    /// Keep this model loaded and in use instead of holding raw memory.
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    hold: HoldMode,
    /// The holder's pid: with `model` naming an external model, its GPU memory is the model's.
    #[serde(default)]
    pid: Option<u32>,
}

impl JsonRequest for CreateLease {
    const WHAT: &'static str = "lease request";
    const EXAMPLE: Option<&'static str> = Some(r#"{"vram": "6G"} or {"model": "NAME"}"#);
}

pub(super) async fn list(State(state): State<AppState>) -> Json<Vec<LeaseStatus>> {
    Json(state.arbiter.view().leases.clone())
}

pub(super) async fn create(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<CreateLease>,
) -> Result<Response, ApiError> {
    if body.vram.is_none() && body.model.is_none() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "a lease needs `vram` (e.g. \"6G\") or `model`"));
    }
    if body.vram.is_some() && body.model.is_some() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "a lease takes `vram` or `model`, not both"));
    }
    if body.model.is_some() && body.exclusive {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "`exclusive` applies to memory leases (`vram`), not to model leases",
        ));
    }
    if body.hold == HoldMode::Connection && body.ttl.is_some() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "`ttl` applies to hold = \"ttl\" only"));
    }
    let ttl = match body.hold {
        HoldMode::Ttl => {
            let ttl = body.ttl.map(Span::get).unwrap_or(DEFAULT_TTL);
            if ttl.is_zero() {
                return Err(ApiError::new(StatusCode::BAD_REQUEST, "`ttl` must be longer than 0"));
            }
            Some(ttl)
        }
        HoldMode::Connection => None,
    };
    let request = LeaseRequest {
        holder: body.holder.unwrap_or_else(|| "anonymous".into()),
        vram_mib: body.vram.map(|v| v.0).unwrap_or(0),
        device: body.device,
        exclusive: body.exclusive,
        priority: body.priority.unwrap_or(state.default_priority),
        wait: body.wait.map(Span::get).unwrap_or(state.queue_timeout),
        ttl,
        model: body.model,
        pid: body.pid,
    };
    // If the client disconnects while this waits, the handler is dropped with the reply channel
    // and the arbiter gives the lease straight back when it would have granted it.
    let grant = state.arbiter.acquire(request).await?;
    match body.hold {
        HoldMode::Ttl => Ok((StatusCode::CREATED, Json(grant)).into_response()),
        HoldMode::Connection => Ok(held_by_connection(state.arbiter.clone(), grant, state.shutdown.clone())),
    }
}

/// Releases the lease when dropped: the response body is dropped when the client goes away.
struct ReleaseOnDrop {
    arbiter: ArbiterHandle,
    id: String,
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        self.arbiter.release_detached(&self.id, "disconnected");
    }
}

fn held_by_connection(
    arbiter: ArbiterHandle,
    grant: LeaseGrant,
    shutdown: tokio_util::sync::CancellationToken,
) -> Response {
    let first = serde_json::json!({ "event": "granted", "lease": grant }).to_string() + "\n";
    let guard = ReleaseOnDrop { arbiter, id: grant.id.clone() };
    let stream = futures_util::stream::unfold((Some(first), guard, shutdown), |(first, guard, shutdown)| async move {
        if let Some(first) = first {
            return Some((Ok::<Bytes, Infallible>(Bytes::from(first)), (None, guard, shutdown)));
        }
        tokio::select! {
            _ = shutdown.cancelled() => None,
            _ = tokio::time::sleep(STREAM_HEARTBEAT) => {
                let line = Bytes::from_static(b"{\"event\":\"held\"}\n");
                Some((Ok(line), (None, guard, shutdown)))
            }
        }
    });
    ([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(stream)).into_response()
}

pub(super) async fn renew(
    State(state): State<AppState>,
    PathParam(id): PathParam,
) -> Result<Json<LeaseGrant>, ApiError> {
    Ok(Json(state.arbiter.renew(&id).await?))
}

pub(super) async fn release(State(state): State<AppState>, PathParam(id): PathParam) -> Result<StatusCode, ApiError> {
    state.arbiter.release(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}
