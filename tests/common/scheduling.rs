//! Helpers for the scheduling tests (the queue, pressure relief, failure cooldowns): a chat request
//! through the OpenAI proxy, when an event happened, and the next state change of a model.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::{Daemon, EventStream};

/// A chat completion request through the OpenAI proxy, sent as is.
pub async fn chat(daemon: &Daemon, body: Value) -> reqwest::Response {
    super::http::client().post(format!("{}/v1/chat/completions", daemon.url)).json(&body).send().await.expect("POST")
}

/// When an event happened, by the daemon's clock.
pub fn event_time(event: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(event["time"].as_str().expect("event time")).expect("RFC 3339 time").to_utc()
}

/// The next `model_state` event of `model` changing to `to`, skipping others.
pub async fn next_state(events: &mut EventStream, model: &str, to: &str, deadline: Duration) -> Value {
    let end = Instant::now() + deadline;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let event = events.next_of("model_state", left).await;
        if event["model"] == model && event["to"] == to {
            return event;
        }
    }
}
