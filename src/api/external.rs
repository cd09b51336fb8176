//! External models: an app attaches to its model over a long-lived NDJSON stream, receives
//! placement instructions on it, and acknowledges each with a POST.
//!
//! The stream's first line is `{"event":"attached","session":"att-1","model":"clip"}`; then come
//! `{"event":"instruction","seq":1,"action":"gpu"|"cpu"|"release"}` lines, with a
//! `{"event":"held"}` heartbeat every 250 ms so that a dead app is noticed within a second (the
//! write fails). When the stream ends, for whatever reason, the app is detached and everything it
//! held is released.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::error::{JsonBody, JsonRequest, PathParam};
use super::{ApiError, AppState};
use crate::arbiter::{Ack, ArbiterHandle};

/// Heartbeat on the attached stream (see the lease stream, which does the same).
const HEARTBEAT: Duration = Duration::from_millis(250);

/// `POST /vramgate/models/{id}/attach`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AttachRequest {
    /// The app's process id: its GPU memory is the model's while the model is on the GPU.
    #[serde(default)]
    pid: Option<u32>,
    /// Who is attaching, for status and events.
    #[serde(default)]
    holder: Option<String>,
}

/// Detaches the app when the stream is dropped (the app went away or the daemon stops).
impl JsonRequest for AttachRequest {
    const WHAT: &'static str = "attach request";
    const EXAMPLE: Option<&'static str> = Some(r#"{"pid": 1234, "holder": "my-app"} or no body"#);
    fn when_empty() -> Option<Self> {
        Some(AttachRequest::default())
    }
}

/// An acknowledgement's body (the arbiter's [`Ack`]).
#[derive(Debug, Deserialize)]
#[serde(transparent)]
pub(super) struct AckBody(Ack);

impl JsonRequest for AckBody {
    const WHAT: &'static str = "acknowledgement";
    const EXAMPLE: Option<&'static str> = Some(r#"{"session": "att-1", "seq": 1, "ok": true}"#);
}

struct DetachOnDrop {
    arbiter: ArbiterHandle,
    model: String,
    session: String,
}

impl Drop for DetachOnDrop {
    fn drop(&mut self) {
        self.arbiter.detach_detached(&self.model, &self.session);
    }
}

pub(super) async fn attach(
    State(state): State<AppState>,
    PathParam(name): PathParam,
    JsonBody(request): JsonBody<AttachRequest>,
) -> Result<Response, ApiError> {
    let holder = request.holder.unwrap_or_else(|| match request.pid {
        Some(pid) => format!("pid {pid}"),
        None => "app".into(),
    });
    let attached = state.arbiter.attach(&name, request.pid, &holder).await?;
    let first = json!({ "event": "attached", "session": attached.session, "model": name }).to_string() + "\n";
    let guard = DetachOnDrop { arbiter: state.arbiter.clone(), model: name, session: attached.session };
    let shutdown = state.shutdown.clone();
    let stream = futures_util::stream::unfold(
        (Some(first), attached.instructions, guard, shutdown),
        |(first, mut instructions, guard, shutdown)| async move {
            if let Some(first) = first {
                return Some((Ok::<Bytes, Infallible>(Bytes::from(first)), (None, instructions, guard, shutdown)));
            }
            let line = tokio::select! {
                _ = shutdown.cancelled() => return None,
                instruction = instructions.recv() => match instruction {
                    // The arbiter dropped the attachment (replaced): end the stream.
                    None => return None,
                    Some(instruction) => {
                        json!({ "event": "instruction", "seq": instruction.seq, "action": instruction.action })
                            .to_string()
                            + "\n"
                    }
                },
                _ = tokio::time::sleep(HEARTBEAT) => "{\"event\":\"held\"}\n".to_string(),
            };
            Some((Ok(Bytes::from(line)), (None, instructions, guard, shutdown)))
        },
    );
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(stream)).into_response())
}

/// `POST /vramgate/models/{id}/ack`: `{"session", "seq", "ok", "error"}`.
pub(super) async fn ack(
    State(state): State<AppState>,
    PathParam(name): PathParam,
    JsonBody(AckBody(ack)): JsonBody<AckBody>,
) -> Result<StatusCode, ApiError> {
    state.arbiter.ack(&name, ack).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /vramgate/mode` body: `{"mode": "recording"}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SetMode {
    mode: String,
}

/// Applies a mode and answers when it is done (or with the first step that failed).
impl JsonRequest for SetMode {
    const WHAT: &'static str = "mode request";
    const EXAMPLE: Option<&'static str> = Some(r#"{"mode": "NAME"}"#);
}

pub(super) async fn set_mode(
    State(state): State<AppState>,
    JsonBody(request): JsonBody<SetMode>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let models = state.arbiter.set_mode(&request.mode).await?;
    Ok(Json(json!({ "mode": request.mode, "models": models })))
}

/// The current mode and every mode defined.
pub(super) async fn get_mode(State(state): State<AppState>) -> Json<serde_json::Value> {
    let modes: serde_json::Map<String, serde_json::Value> = state
        .arbiter
        .modes()
        .iter()
        .map(|(name, mode)| (name.clone(), json!({ "gpu": mode.gpu_models(), "cpu": mode.cpu, "unload": mode.unload })))
        .collect();
    Json(json!({ "mode": state.arbiter.view().mode, "modes": modes }))
}
