//! End-to-end: the scheduling promises the docs make about time and order, each with a lower and
//! an upper bound: the failure cooldown (10 s, doubling), `max_queue` for loads, the fairness swap
//! after `max_wait_before_swap` (in-flight streams finish), and pressure relief one model at a time.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::{Daemon, EventStream, fake_model, sim_config};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const SECOND: Duration = Duration::from_secs(1);

/// A 10000 MiB sim device (no reserve) sampled every 50 ms, with `scheduler` and the given models.
fn start(models: impl Fn(&std::path::Path) -> String, scheduler: &str) -> Daemon {
    Daemon::start(|sim| format!("{}{scheduler}\n{}", sim_config(sim, 10000, "50ms", "reserve_mib = 0"), models(sim)))
}

async fn chat(daemon: &Daemon, body: Value) -> reqwest::Response {
    common::http::client().post(format!("{}/v1/chat/completions", daemon.url)).json(&body).send().await.expect("POST")
}

/// When an event happened, by the daemon's clock.
fn event_time(event: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(event["time"].as_str().expect("event time")).expect("RFC 3339 time").to_utc()
}

/// The next `model_state` event of `model` changing to `to`, skipping others.
async fn next_state(events: &mut EventStream, model: &str, to: &str, deadline: Duration) -> Value {
    let end = Instant::now() + deadline;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let event = events.next_of("model_state", left).await;
        if event["model"] == model && event["to"] == to {
            return event;
        }
    }
}

/// A model's `retry_in_s` in status.
async fn retry_in_s(daemon: &Daemon, model: &str) -> u64 {
    let entry = daemon.model(model).await;
    entry["retry_in_s"].as_u64().unwrap_or_else(|| panic!("no retry_in_s: {entry}"))
}

/// A demand through the proxy during the cooldown: refused at once with 503 `model_failed` and a
/// `Retry-After` of the seconds left; returns that header's value.
async fn refused_in_cooldown(daemon: &Daemon, model: &str) -> u64 {
    let asked = Instant::now();
    let response = chat(daemon, json!({"model": model, "messages": []})).await;
    let took = asked.elapsed();
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body: Value = response.json().await.expect("JSON error body");
    assert_eq!((status, body["error"]["code"].as_str()), (503, Some("model_failed")), "{body}");
    assert!(took < 2 * SECOND, "refused after {took:?}, not at once");
    retry_after.and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no numeric Retry-After: {body}"))
}

#[tokio::test]
async fn a_failing_model_cools_down_10_s_then_20_s_and_refuses_demands_meanwhile() {
    let daemon = start(|sim| fake_model(sim, "a", 100, "--exit-on-start 7", ""), "");
    for attempt in 1..=3 {
        let (code, body) = daemon.load("a").await;
        assert_eq!(code, 502, "attempt {attempt}: {body}");
        let expected = if attempt < 3 { "unloaded" } else { "failed" };
        daemon.wait_model_state("a", expected, 5 * SECOND).await;
    }
    // The first cooldown is 10 s: read within a few seconds of the failure, between 8 and 10
    // whole seconds are left.
    let left = retry_in_s(&daemon, "a").await;
    assert!((8..=10).contains(&left), "retry_in_s {left} after the third failure, expected about 10");
    let retry_after = refused_in_cooldown(&daemon, "a").await;
    assert!((8..=10).contains(&retry_after), "Retry-After {retry_after}, expected about 10");
    assert_eq!(daemon.model("a").await["failures"], 3, "a refused demand is not a try");

    // `vramgate load` (explicit) tries at once; its failure doubles the cooldown to 20 s.
    let (code, body) = daemon.load("a").await;
    assert_eq!(code, 502, "{body}");
    let model = daemon.wait_model_state("a", "failed", 5 * SECOND).await;
    assert_eq!(model["failures"], 4);
    let left = retry_in_s(&daemon, "a").await;
    assert!((18..=20).contains(&left), "retry_in_s {left} after the fourth failure, expected about 20 (doubled)");
    let retry_after = refused_in_cooldown(&daemon, "a").await;
    assert!((18..=20).contains(&retry_after), "Retry-After {retry_after}, expected about 20");
}

#[tokio::test]
async fn loads_beyond_max_queue_are_refused_at_once() {
    let daemon = start(
        |sim| (1..=4).map(|i| fake_model(sim, &format!("m{i}"), 100, "", "")).collect::<String>(),
        "[scheduler]\nmax_queue = 2\nqueue_timeout = \"20s\"\n",
    );
    // A lease holds the whole device: every load must wait.
    let (code, blocker) = daemon.post("/vramgate/leases", json!({"vram": 10000, "holder": "blocker"})).await;
    assert_eq!(code, 201, "{blocker}");
    let waiting: Vec<_> = ["m1", "m2"]
        .into_iter()
        .map(|model| {
            let url = format!("{}/vramgate/models/{model}/load", daemon.url);
            tokio::spawn(async move { common::http::client().post(url).send().await.expect("POST").status().as_u16() })
        })
        .collect();
    daemon
        .wait_for_status(5 * SECOND, "two loads queued", |s| s["queue"].as_array().is_some_and(|q| q.len() == 2))
        .await;

    // A third distinct model through the management API: refused at once, not queued.
    let asked = Instant::now();
    let (code, body) = tokio::time::timeout(5 * SECOND, daemon.load("m3")).await.expect("answered at once");
    assert_eq!(code, 503, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("queue is full (2 waiting)"), "{body}");
    // A fourth through the proxy: the same refusal, OpenAI-style.
    let response = tokio::time::timeout(5 * SECOND, chat(&daemon, json!({"model": "m4"}))).await.expect("answered");
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("JSON error body");
    assert_eq!(status, 503, "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or_default().contains("queue is full"), "{body}");
    assert!(asked.elapsed() < 2 * SECOND, "the refusals took {:?}", asked.elapsed());
    let status = daemon.status().await;
    assert_eq!(status["queue"].as_array().map(Vec::len), Some(2), "{status:#}");
    for model in ["m3", "m4"] {
        assert_eq!(common::model_in(&status, model)["state"], "unloaded");
    }

    // The queued ones are served once the memory is free.
    let id = blocker["id"].as_str().expect("lease id");
    common::http::client().delete(format!("{}/vramgate/leases/{id}", daemon.url)).send().await.expect("DELETE");
    for load in waiting {
        assert_eq!(tokio::time::timeout(10 * SECOND, load).await.expect("served").expect("task"), 200);
    }
}

/// The busy model's streamed answer: ten chunks, one every 50 ms (half a second per stream).
const REPLY: &str = "c0 c1 c2 c3 c4 c5 c6 c7 c8 c9";

/// One streamed request to the busy model, read to its end.
struct Streamed {
    status: u16,
    /// Everything the body carried, up to its end or its error.
    text: String,
    /// Why reading the body failed (a cut stream), if it did.
    error: Option<String>,
    started: Instant,
    ended: Instant,
}

impl Streamed {
    /// Panics unless the stream is intact: 200, every content chunk in order, then `[DONE]`.
    fn assert_intact(&self, index: usize) {
        let data: Vec<&str> = self.text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
        let content: String = data
            .iter()
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter_map(|chunk| chunk["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
            .collect();
        assert!(
            self.status == 200 && self.error.is_none() && content == REPLY && data.last() == Some(&"[DONE]"),
            "stream {index} was not intact (status {}, error {:?}):\n{}",
            self.status,
            self.error,
            self.text
        );
    }
}

/// What the traffic driver is told: start one more stream, or stop.
enum Traffic {
    Next,
    Stop,
}

/// Streams from `model` once and reads the answer to its end. When its third chunk arrives (while
/// seven are still to come) it asks for the next stream, so consecutive streams overlap and the
/// model is never idle, unless `stop` is set.
async fn stream_once(
    url: String,
    model: &'static str,
    stop: Arc<AtomicBool>,
    next: mpsc::UnboundedSender<Traffic>,
) -> Streamed {
    let started = Instant::now();
    let body = json!({"model": model, "stream": true, "messages": []});
    let response = common::http::client().post(&url).json(&body).send().await;
    let mut streamed = Streamed { status: 0, text: String::new(), error: None, started, ended: started };
    match response {
        Err(e) => streamed.error = Some(e.to_string()),
        Ok(response) => {
            streamed.status = response.status().as_u16();
            let mut body = response.bytes_stream();
            let mut asked_next = false;
            while let Some(piece) = body.next().await {
                match piece {
                    Ok(bytes) => streamed.text.push_str(&String::from_utf8_lossy(&bytes)),
                    Err(e) => {
                        streamed.error = Some(e.to_string());
                        break;
                    }
                }
                if !asked_next && streamed.text.matches("data: {").count() >= 3 && !stop.load(Ordering::SeqCst) {
                    asked_next = true;
                    let _ = next.send(Traffic::Next);
                }
            }
        }
    }
    streamed.ended = Instant::now();
    streamed
}

#[tokio::test]
async fn a_request_behind_continuous_traffic_waits_max_wait_before_swap_and_in_flight_streams_finish() {
    let max_wait = SECOND;
    let daemon = start(
        |sim| {
            [
                fake_model(sim, "a", 6000, "", ""),
                fake_model(sim, "b", 6000, &format!("--token-delay 50ms --reply '{REPLY}'"), ""),
            ]
            .concat()
        },
        "[scheduler]\nmax_wait_before_swap = \"1s\"\nqueue_timeout = \"20s\"\n",
    );
    assert_eq!(daemon.load("b").await.0, 200);
    let mut events = daemon.events().await;

    // Two chains of overlapping streams to b: each stream starts the next before it ends, so b is
    // in use without a gap until the swap stops taking new requests.
    let stop = Arc::new(AtomicBool::new(false));
    let (next, mut asks) = mpsc::unbounded_channel::<Traffic>();
    let driver: JoinHandle<Vec<JoinHandle<Streamed>>> = {
        let (url, stop, next) = (format!("{}/v1/chat/completions", daemon.url), stop.clone(), next.clone());
        tokio::spawn(async move {
            let mut streams = Vec::new();
            while let Some(Traffic::Next) = asks.recv().await {
                if !stop.load(Ordering::SeqCst) {
                    streams.push(tokio::spawn(stream_once(url.clone(), "b", stop.clone(), next.clone())));
                }
            }
            streams
        })
    };
    for _ in 0..2 {
        next.send(Traffic::Next).expect("driver running");
    }
    daemon
        .wait_for_status(5 * SECOND, "b in continuous use", |s| {
            common::model_in(s, "b")["in_use"].as_u64().is_some_and(|n| n >= 2)
        })
        .await;

    let asked = Instant::now();
    let asked_wall = Utc::now();
    let response = tokio::time::timeout(15 * SECOND, chat(&daemon, json!({"model": "a", "messages": []})))
        .await
        .expect("a is served within 15 s");
    let waited = asked.elapsed();
    stop.store(true, Ordering::SeqCst);
    let _ = next.send(Traffic::Stop);
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    assert_eq!(status, 200, "{text}");
    // Not before max_wait_before_swap (b was never idle), and soon after it: the streams in
    // flight take at most half a second, then b stops and a starts.
    assert!(waited >= max_wait, "a was served after {waited:?}, before max_wait_before_swap ({max_wait:?})");
    assert!(waited < max_wait + 3 * SECOND, "a waited {waited:?} behind b's traffic (max_wait_before_swap 1 s)");

    // The swap path ran: b was drained (no new requests), then evicted for a, not before the
    // wait was up.
    let evicted = next_state(&mut events, "b", "unloading", 5 * SECOND).await;
    assert_eq!(evicted["reason"], "evicted_for:a", "{evicted}");
    let evicted_after = (event_time(&evicted) - asked_wall).to_std().unwrap_or_default();
    assert!(evicted_after >= max_wait, "b was evicted {evicted_after:?} after a asked");
    let log = daemon.log();
    assert!(
        log.lines().any(|l| l.contains("draining: a request waited too long for its memory") && l.contains("model=b")),
        "no draining line for b:\n{log}"
    );

    // Every stream to b finished intact, also those in flight when b was drained.
    let streams = tokio::time::timeout(5 * SECOND, driver).await.expect("the driver stops").expect("driver task");
    let drained_at = asked + max_wait;
    let mut across_the_drain = 0;
    for (index, stream) in streams.into_iter().enumerate() {
        let streamed = tokio::time::timeout(20 * SECOND, stream).await.expect("stream ended").expect("stream task");
        streamed.assert_intact(index);
        if streamed.started < drained_at && streamed.ended > drained_at {
            across_the_drain += 1;
        }
    }
    assert!(across_the_drain > 0, "no stream was in flight when b was drained: the swap path was not exercised");
}

#[tokio::test]
async fn pressure_relief_releases_one_model_at_a_time_waiting_for_each_release() {
    // Each release takes 400 ms: the server holds its memory for that long after SIGTERM.
    let slow = "--stop-delay 400ms";
    let daemon = start(
        |sim| {
            [
                fake_model(sim, "low1", 500, slow, "priority = 1"),
                fake_model(sim, "low2", 1000, slow, "priority = 2"),
                fake_model(sim, "high", 4100, "", "priority = 9"),
            ]
            .concat()
        },
        "",
    );
    for model in ["low1", "low2", "high"] {
        assert_eq!(daemon.load(model).await.0, 200, "{model}");
    }
    let mut events = daemon.events().await;
    // 5600 used by models; a foreign 4000 takes the device to 96 % (emergency). Releasing low1
    // leaves 91 % (still critical: relief goes on), releasing low2 81 % (relief stops).
    let claimed = Utc::now();
    daemon.claim("desktop", 4000);
    let first = next_state(&mut events, "low1", "unloading", 5 * SECOND).await;
    assert_eq!(first["reason"], "pressure", "{first}");
    // The next relief starts only once the first release is complete (its memory is back).
    let mut order = Vec::new();
    let end = Instant::now() + 10 * SECOND;
    while order.len() < 2 {
        let event = events.next_of("model_state", end.saturating_duration_since(Instant::now())).await;
        match (event["model"].as_str(), event["to"].as_str()) {
            (Some("low1"), Some("unloaded")) | (Some("low2"), Some("unloading")) => order.push(event),
            _ => {}
        }
    }
    assert_eq!(
        (order[0]["model"].as_str(), order[1]["model"].as_str()),
        (Some("low1"), Some("low2")),
        "low2's relief began before low1's memory was back: {order:?}"
    );
    assert_eq!(order[1]["reason"], "pressure", "{}", order[1]);
    let first_release = (event_time(&order[0]) - event_time(&first)).to_std().unwrap_or_default();
    assert!(first_release >= Duration::from_millis(350), "low1's release took only {first_release:?}");
    next_state(&mut events, "low2", "unloaded", 5 * SECOND).await;
    // 4100 + 4000 of 10000 is below critical (87.5 %): relief stops there.
    daemon.wait_for_status(5 * SECOND, "the memory back", |s| s["devices"][0]["used_mib"] == 8100).await;
    common::never_within(&daemon, Duration::from_millis(300), "high must stay", |s| {
        common::model_in(s, "high")["state"] != "ready"
    })
    .await;
    let took = (Utc::now() - claimed).to_std().unwrap_or_default();
    assert!(took < 5 * SECOND, "relief took {took:?}");
}

/// Fairness only when it helps: a waiter that could fit only if a leased model went away must not
/// drain that model, because the lease never ends for it; requests to the ready model keep being
/// served at once (before, each waited out the waiter's whole `wait`).
#[tokio::test]
async fn a_model_a_lease_holds_is_not_drained_for_a_waiter_it_cannot_help() {
    let daemon = start(
        |sim| fake_model(sim, "llm", 6000, "", ""),
        "[scheduler]\nmax_wait_before_swap = \"200ms\"\nqueue_timeout = \"10s\"\n",
    );
    let (code, held) = daemon.post("/vramgate/leases", json!({"model": "llm", "ttl": "60s", "holder": "app"})).await;
    assert_eq!(code, 201, "{held}");
    // 5000 MiB fit only without llm, which its lease keeps.
    let waiter = {
        let url = daemon.url.clone();
        tokio::spawn(async move {
            let client = common::http::client();
            let body = json!({"vram": "5000MiB", "holder": "job", "wait": "3s"});
            let response = client.post(format!("{url}/vramgate/leases")).json(&body).send().await.expect("POST");
            response.status().as_u16()
        })
    };
    // Past max_wait_before_swap, by the daemon's own record of when the waiter queued.
    daemon
        .wait_for_status(5 * SECOND, "the waiter queued for 600 ms", |s| {
            s["queue"].as_array().and_then(|q| q.first()).and_then(|w| w["since"].as_str()).is_some_and(|since| {
                DateTime::parse_from_rfc3339(since)
                    .is_ok_and(|t| Utc::now().signed_duration_since(t) > chrono::Duration::milliseconds(600))
            })
        })
        .await;
    let asked = Instant::now();
    let response = chat(&daemon, json!({"model": "llm", "messages": [{"role": "user", "content": "hi"}]})).await;
    let took = asked.elapsed();
    assert_eq!(response.status(), 200);
    assert!(took < SECOND, "a request to the ready llm waited {took:?} behind a waiter draining cannot help");
    assert!(!daemon.log().contains("draining"), "llm was drained:\n{}", daemon.log());
    assert_eq!(waiter.await.expect("waiter"), 503, "the waiter gives up after its wait");
}
