//! Management endpoints: index, liveness, status, events, metrics.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::StreamExt;
use futures_util::stream::Stream;
use serde_json::json;
use std::sync::Arc;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use super::error::QueryParams;
use super::{AppState, PREFIX};
use crate::events::{Event, EventKind};
use crate::status::Status;

/// Builds the status document from the current state.
pub(crate) fn current_status(state: &AppState) -> Status {
    let view = state.gpu.borrow().clone();
    let arbiter = state.arbiter.view();
    let mut devices = view.devices.clone();
    for device in &mut devices {
        for process in &mut device.processes {
            process.model = arbiter.process_models.get(&process.pid).cloned();
        }
        // Processes without a figure: one warning per pid, naming its model where it has one.
        let notes = crate::monitor::figureless_warnings(&device.processes, |pid| {
            let model = arbiter.process_models.get(&pid)?;
            Some((model.clone(), arbiter.models.iter().find(|m| &m.id == model).map_or(0, |m| m.vram_mib)))
        });
        device.warnings.extend(notes);
        device.warnings.extend(arbiter.device_warnings.get(&device.index).into_iter().flatten().cloned());
    }
    let mut degraded_reasons = view.degraded_reasons.clone();
    degraded_reasons.extend(arbiter.degraded_reasons.iter().cloned());
    Status {
        version: env!("CARGO_PKG_VERSION").to_string(),
        probe: view.probe,
        devices,
        degraded: !degraded_reasons.is_empty(),
        degraded_reasons,
        models: arbiter.models.clone(),
        leases: arbiter.leases.clone(),
        queue: arbiter.queue.clone(),
        mode: arbiter.mode.clone(),
        ollama: arbiter.ollama.clone(),
        sampled_at: view.sampled_at,
        limits: Some(state.history.limits()),
    }
}

pub(super) async fn index() -> impl IntoResponse {
    let text = format!(
        "vramgate {version}\n\n\
         GET {PREFIX}/status   status document (JSON; same as `vramgate status --json`)\n\
         GET {PREFIX}/events   server-sent events, one JSON object per event\n\
         GET {PREFIX}/history  the last hour of samples: ?since=RFC3339 or ?since=SECONDS (ago)\n\
         GET /ui/              the dashboard (a browser asking for / is sent there)\n\
         GET {PREFIX}/health   liveness\n\
         GET {PREFIX}/models                  models and their states\n\
         POST {PREFIX}/models/NAME/load       load and wait until ready\n\
         POST {PREFIX}/models/NAME/unload     unload and wait until the memory is back\n\
         GET {PREFIX}/models/NAME/logs        ?tail=N&follow=true\n\
         POST {PREFIX}/leases                 hold VRAM: {{\"holder\", \"vram\", \"device\", \"exclusive\", \"priority\", \"wait\", \"ttl\", \"model\", \"hold\", \"pid\"}}\n\
         GET {PREFIX}/leases                  leases held\n\
         POST {PREFIX}/leases/ID/renew        heartbeat\n\
         DELETE {PREFIX}/leases/ID            release\n\
         POST {PREFIX}/models/NAME/attach     an app attaches to its external model (NDJSON instructions)\n\
         POST {PREFIX}/models/NAME/ack        the app acknowledges an instruction\n\
         POST {PREFIX}/mode                   apply a mode: {{\"mode\": \"NAME\"}}\n\
         GET {PREFIX}/mode                    the current mode and the modes defined\n\
         GET /metrics          Prometheus metrics\n\
         POST /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/audio/*, GET /v1/models: OpenAI-compatible\n\
         POST /api/chat, /api/generate, /api/embed, GET /api/tags, /api/ps, /api/version: Ollama-compatible\n",
        version = env!("CARGO_PKG_VERSION")
    );
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text)
}

pub(super) async fn health() -> impl IntoResponse {
    Json(json!({ "status": "ok", "version": env!("CARGO_PKG_VERSION") }))
}

pub(super) async fn status(State(state): State<AppState>) -> Json<Status> {
    Json(current_status(&state))
}

/// `GET /metrics`: the gauges read from the status document now, and the counts.
pub(super) async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let body = state.metrics.render(current_status(&state));
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], body)
}

fn sse_event(event: &Event) -> SseEvent {
    // Serializing our own plain types cannot fail; an empty object is a harmless fallback.
    let data = serde_json::to_string(event).unwrap_or_else(|_| "{}".into());
    SseEvent::default().id(event.seq.to_string()).event(event.kind.name()).data(data)
}

/// The event stream. It subscribes before the response headers go out, so a client that has
/// seen the headers will see every event published after. It ends at shutdown, so that open
/// streams never hold the daemon up.
pub(super) async fn events(State(state): State<AppState>) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let stream = BroadcastStream::new(state.bus.subscribe())
        .map(|item| {
            let event = match item {
                Ok(event) => event,
                // Tell this listener what it missed rather than silently skipping.
                Err(BroadcastStreamRecvError::Lagged(count)) => {
                    Arc::new(Event { seq: 0, time: chrono::Utc::now(), kind: EventKind::EventsLost { count } })
                }
            };
            Ok(sse_event(&event))
        })
        .take_until(state.shutdown.cancelled_owned());
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// `GET /vramgate/history`'s query: `since` is an RFC 3339 time or a number of seconds ago.
#[derive(Debug, serde::Deserialize)]
pub(super) struct HistoryQuery {
    #[serde(default, deserialize_with = "since_time")]
    since: Option<chrono::DateTime<chrono::Utc>>,
}

/// `since=2026-01-02T03:04:05Z` or `since=900` (the last 15 minutes).
fn since_time<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, D::Error> {
    let text: String = serde::Deserialize::deserialize(deserializer)?;
    parse_since(&text, chrono::Utc::now()).map(Some).map_err(serde::de::Error::custom)
}

/// Parses a `since` value relative to `now`.
fn parse_since(text: &str, now: chrono::DateTime<chrono::Utc>) -> Result<chrono::DateTime<chrono::Utc>, String> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        // Further back than the clock goes is simply "everything".
        let back = i64::try_from(seconds).ok().and_then(chrono::TimeDelta::try_seconds);
        return Ok(back
            .and_then(|back| now.checked_sub_signed(back))
            .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC));
    }
    chrono::DateTime::parse_from_rfc3339(text).map(|time| time.to_utc()).map_err(|e| {
        format!(
            "{text:?} is neither an RFC 3339 time (like 2026-01-02T03:04:05Z) nor a whole number of seconds ago ({e})"
        )
    })
}

/// The recent samples (see [`crate::history`]), newest last.
pub(super) async fn history(
    State(state): State<AppState>,
    QueryParams(query): QueryParams<HistoryQuery>,
) -> impl IntoResponse {
    let samples = state.history.since(query.since);
    Json(json!({
        "interval_ms": state.history.interval_ms(),
        "capacity": state.history.capacity(),
        "limits": state.history.limits(),
        "samples": samples,
    }))
}

#[cfg(test)]
mod tests {
    use super::parse_since;

    #[test]
    fn since_is_a_time_or_seconds_ago_and_anything_else_says_so() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-12-02T03:00:00Z").expect("a time").to_utc();
        assert_eq!(parse_since("900", now).map(|t| t.to_rfc3339()), Ok("2026-12-02T02:45:00+00:00".into()));
        assert_eq!(
            parse_since("2026-12-02T02:00:00+01:00", now).map(|t| t.to_rfc3339()),
            Ok("2026-12-02T01:00:00+00:00".into())
        );
        assert_eq!(parse_since("99999999999999999", now), Ok(chrono::DateTime::<chrono::Utc>::MIN_UTC));
        let error = parse_since("yesterday", now).expect_err("not a time");
        assert!(error.contains("\"yesterday\" is neither an RFC 3339 time"), "{error}");
        assert!(parse_since("-5", now).is_err());
    }
}
