//! End-to-end: the wait queue and fairness. Waiters are served by priority, then arrival; the
//! queue is bounded (`max_queue`, for leases and loads, refused at once beyond it); a client that
//! gives up while queued leaves nothing behind; `queue_timeout` bounds the wait for memory, not
//! the start; an absurd `wait` never crashes the arbiter. Fairness: a request behind continuous
//! traffic waits `max_wait_before_swap`, then the busy model is drained (its in-flight streams
//! finish) and evicted, but only when that helps: a model a lease holds is never drained.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::fake_model;
use common::scheduling::{chat, event_time, next_state};
use common::sim_daemon::on_10000_mib as start;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const SECOND: Duration = Duration::from_secs(1);

#[tokio::test]
async fn the_queue_serves_priority_then_arrival_and_is_bounded() {
    let daemon = start(|_| String::new(), "[scheduler]\nmax_queue = 2\nqueue_timeout = \"10s\"\n");
    let (code, blocker) = daemon.post("/vramgate/leases", json!({"vram": 9000, "holder": "blocker"})).await;
    assert_eq!(code, 201, "{blocker}");
    let mut events = daemon.events().await;
    let first = {
        let url = daemon.url.clone();
        tokio::spawn(async move {
            let body = json!({"vram": 5000, "holder": "early-low", "priority": 1});
            common::http::client().post(format!("{url}/vramgate/leases")).json(&body).send().await.unwrap().status()
        })
    };
    // Wait until it is queued before the next arrives, so arrival order is certain.
    let queued = events.next_of("queued", 5 * SECOND).await;
    assert_eq!(queued["requester"], "early-low");
    assert!(queued["reason"].as_str().unwrap().contains("blocker 9000 MiB (lease)"), "{queued}");
    let second = {
        let url = daemon.url.clone();
        tokio::spawn(async move {
            let body = json!({"vram": 5000, "holder": "late-high", "priority": 9});
            common::http::client().post(format!("{url}/vramgate/leases")).json(&body).send().await.unwrap().status()
        })
    };
    assert_eq!(events.next_of("queued", 5 * SECOND).await["requester"], "late-high");
    // The queue holds two: a third is refused at once.
    let (code, body) = daemon.post("/vramgate/leases", json!({"vram": 100, "holder": "third"})).await;
    assert_eq!(code, 503, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("queue is full"), "{body}");

    let id = blocker["id"].as_str().unwrap();
    common::http::client().delete(format!("{}/vramgate/leases/{id}", daemon.url)).send().await.unwrap();
    let granted = events.next_of("lease_granted", 5 * SECOND).await;
    assert_eq!(granted["holder"], "late-high", "higher priority first");
    assert_eq!(second.await.unwrap(), 201);
    // Both fit once the blocker is gone (5000 + 5000 of 10000): the earlier, lower-priority one
    // comes right after.
    assert_eq!(events.next_of("lease_granted", 5 * SECOND).await["holder"], "early-low");
    assert_eq!(first.await.unwrap(), 201);
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

#[tokio::test]
async fn a_client_that_gives_up_while_queued_leaves_no_lease_behind() {
    let daemon = start(|_| String::new(), "[scheduler]\nqueue_timeout = \"10s\"\n");
    let (_, blocker) = daemon.post("/vramgate/leases", json!({"vram": 10000, "holder": "blocker"})).await;
    let mut events = daemon.events().await;
    // Raw connections, so the test knows each request was written before it hangs up.
    let address = daemon.url.trim_start_matches("http://").to_string();
    let mut sockets = Vec::new();
    for i in 0..5 {
        use tokio::io::AsyncWriteExt;
        let body = json!({"vram": 1000, "holder": format!("w{i}"), "hold": "connection"}).to_string();
        let request = format!(
            "POST /vramgate/leases HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut socket = tokio::net::TcpStream::connect(&address).await.unwrap();
        socket.write_all(request.as_bytes()).await.unwrap();
        sockets.push(socket);
    }
    let queued = events.next_of("queued", 5 * SECOND).await;
    assert!(queued["requester"].as_str().unwrap().starts_with('w'), "{queued}");
    drop(sockets);
    let id = blocker["id"].as_str().unwrap();
    common::http::client().delete(format!("{}/vramgate/leases/{id}", daemon.url)).send().await.unwrap();
    // Whatever was granted to a vanished client is released at once.
    daemon.wait_for_status(3 * SECOND, "no leases", |s| s["leases"].as_array().is_some_and(|l| l.is_empty())).await;
}

#[tokio::test]
async fn a_slow_start_is_waited_for_beyond_queue_timeout() {
    // queue_timeout bounds the wait for memory; once admitted, the start may take ready_timeout.
    let daemon =
        start(|sim| fake_model(sim, "slow", 100, "--load-delay 800ms", ""), "[scheduler]\nqueue_timeout = \"300ms\"\n");
    let (code, body) = daemon.load("slow").await;
    assert_eq!(code, 200, "{body}");
}

#[tokio::test]
async fn an_absurd_wait_is_refused_or_honoured_but_never_crashes_the_arbiter() {
    let daemon = start(|sim| fake_model(sim, "a", 100, "", ""), "");
    let (code, body) = daemon
        .post(
            "/vramgate/leases",
            json!({"vram": "1G", "holder": "x", "wait": 18446744073709551615u64, "ttl": 18446744073709551615u64}),
        )
        .await;
    assert!(code == 201 || code == 400, "{code} {body}");
    assert_eq!(daemon.load("a").await.0, 200, "the arbiter still works");
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
