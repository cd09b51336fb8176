//! End-to-end: the OpenAI-compatible proxy in front of fake model servers on the sim device; and a
//! model in its failure cooldown, answered 503 with the time left in `Retry-After` on both proxy
//! surfaces (OpenAI and Ollama).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Daemon, fake_model, sim_config};
use futures_util::StreamExt;
use serde_json::{Value, json};

const SECOND: Duration = Duration::from_secs(1);

fn start(models: impl Fn(&std::path::Path) -> String, extra: &str) -> Daemon {
    Daemon::start(|sim| format!("{}{extra}\n{}", sim_config(sim, 10000, "50ms", "reserve_mib = 0"), models(sim)))
}

async fn chat(daemon: &Daemon, body: Value) -> reqwest::Response {
    common::http::client().post(format!("{}/v1/chat/completions", daemon.url)).json(&body).send().await.unwrap()
}

#[tokio::test]
async fn a_request_starts_its_model_and_a_second_evicts_the_first() {
    let daemon = start(|sim| [fake_model(sim, "a", 6000, "", ""), fake_model(sim, "b", 6000, "", "")].concat(), "");
    let response = chat(&daemon, json!({"model": "a", "messages": []})).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-vramgate-model"], "a");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "hello from a");

    let response = chat(&daemon, json!({"model": "b", "messages": []})).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["model"], "b");
    assert_eq!(daemon.model("a").await["state"], "unloaded");
    assert_eq!(daemon.model("b").await["state"], "ready");
}

#[tokio::test]
async fn streamed_chunks_arrive_as_they_are_produced() {
    let daemon = start(|sim| fake_model(sim, "a", 1000, "--token-delay 150ms", ""), "");
    let response = chat(&daemon, json!({"model": "a", "stream": true})).await;
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let mut arrivals = Vec::new();
    let mut text = String::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        let piece = String::from_utf8_lossy(&chunk).to_string();
        if piece.contains("tok") {
            arrivals.push(Instant::now());
        }
        text.push_str(&piece);
    }
    assert!(text.contains("tok0") && text.contains("tok4") && text.contains("[DONE]"), "{text}");
    assert!(arrivals.len() >= 4, "chunks came in {} pieces: buffered, not streamed", arrivals.len());
    let spread = *arrivals.last().unwrap() - arrivals[0];
    assert!(spread >= Duration::from_millis(400), "the first and last token arrived {spread:?} apart");
}

#[tokio::test]
async fn a_client_that_disconnects_mid_stream_releases_the_model() {
    let daemon = start(|sim| fake_model(sim, "a", 1000, "--token-delay 1s", ""), "");
    let response = chat(&daemon, json!({"model": "a", "stream": true})).await;
    let mut stream = response.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("tok0"));
    assert_eq!(daemon.model("a").await["in_use"], 1);
    drop(stream);
    daemon.wait_for_status(3 * SECOND, "in_use back to 0", |s| s["models"][0]["in_use"] == 0).await;
}

#[tokio::test]
async fn error_bodies_are_openai_style() {
    let daemon = start(
        |sim| {
            [
                fake_model(sim, "big", 9000, "", "pinned = true"),
                fake_model(sim, "other", 3000, "", ""),
                // Never listens: forwarding to it fails.
                "[models.deaf]\nbackend = \"process\"\ncmd = \"sleep 30\"\nhealth = \"none\"\nvram = 10\n".to_string(),
            ]
            .concat()
        },
        "[scheduler]\nqueue_timeout = \"300ms\"\n[proxy]\nmax_body = \"1MiB\"\n",
    );
    daemon.wait_model_state("big", "ready", 10 * SECOND).await;
    let check = |body: &Value, code: &str| {
        assert_eq!(body["error"]["code"], code, "{body}");
        assert!(body["error"]["message"].is_string() && body["error"]["type"].is_string(), "{body}");
    };
    let client = common::http::client();
    let url = format!("{}/v1/chat/completions", daemon.url);

    let response = client.post(&url).body("{not json").send().await.unwrap();
    assert_eq!(response.status(), 400);
    check(&response.json().await.unwrap(), "invalid_json");
    let response = client.post(&url).json(&json!({"messages": []})).send().await.unwrap();
    assert_eq!(response.status(), 400);
    check(&response.json().await.unwrap(), "missing_model");

    let response = client.post(&url).json(&json!({"model": "  "})).send().await.unwrap();
    assert_eq!(response.status(), 400);
    check(&response.json().await.unwrap(), "invalid_model");

    let response = client.post(&url).json(&json!({"model": "gpt-17"})).send().await.unwrap();
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    check(&body, "model_not_found");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("big") && message.contains("other") && message.contains("deaf"), "{message}");

    // A connection of its own: the server answers 413 without reading the rest of the body and
    // then closes that connection, which a pooled client could otherwise try to reuse.
    let huge = "x".repeat(2 << 20);
    let response =
        common::http::client().post(&url).json(&json!({"model": "other", "pad": huge})).send().await.unwrap();
    assert_eq!(response.status(), 413);
    check(&response.json().await.unwrap(), "body_too_large");

    let response = client.post(&url).json(&json!({"model": "other"})).send().await.unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = response.json().await.unwrap();
    check(&body, "insufficient_vram");
    assert!(body["error"]["message"].as_str().unwrap().contains("needs 3000 MiB on GPU 0"), "{body}");

    let response = client.post(&url).json(&json!({"model": "deaf"})).send().await.unwrap();
    assert_eq!(response.status(), 502);
    check(&response.json().await.unwrap(), "upstream_error");
}

#[tokio::test]
async fn a_backend_killed_mid_stream_ends_with_an_error_event_and_the_next_request_restarts_it() {
    let daemon = start(|sim| fake_model(sim, "a", 1000, "--token-delay 300ms", ""), "");
    let response = chat(&daemon, json!({"model": "a", "stream": true})).await;
    let pid = daemon.model("a").await["pid"].as_u64().unwrap() as i32;
    let mut stream = response.bytes_stream();
    let _first = stream.next().await.unwrap().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    // The stream ends cleanly with an SSE error event (tests/broken_streams.rs has the details).
    let mut rest = Vec::new();
    while let Some(chunk) = stream.next().await {
        rest.extend_from_slice(&chunk.expect("a clean end, not a broken connection"));
    }
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.trim_end().ends_with("}}") && rest.contains("\"upstream_error\""), "{rest}");
    daemon.wait_model_state("a", "unloaded", 5 * SECOND).await;
    let response = chat(&daemon, json!({"model": "a"})).await;
    assert_eq!(response.status(), 200);
    assert_ne!(daemon.model("a").await["pid"].as_u64().unwrap() as i32, pid);
}

#[tokio::test]
async fn models_are_listed_with_aliases_and_state() {
    let daemon = start(|sim| fake_model(sim, "a", 100, "", "aliases = [\"chat\"]"), "");
    let response = chat(&daemon, json!({"model": "chat"})).await;
    assert_eq!(response.headers()["x-vramgate-model"], "a");
    let list: Value = common::http::get(format!("{}/v1/models", daemon.url)).await.unwrap().json().await.unwrap();
    assert_eq!(list["object"], "list");
    let data = list["data"].as_array().unwrap();
    assert!(data.iter().any(|m| m["id"] == "a" && m["state"] == "ready"));
    assert!(data.iter().any(|m| m["id"] == "chat" && m["alias_of"] == "a"));
}

#[tokio::test]
async fn sixty_concurrent_requests_over_three_models_with_room_for_two_never_overcommit() {
    let daemon = start(
        |sim| {
            [
                fake_model(sim, "m1", 4500, "--token-delay 5ms", ""),
                fake_model(sim, "m2", 4500, "--token-delay 5ms", ""),
                fake_model(sim, "m3", 4500, "--token-delay 5ms", ""),
            ]
            .concat()
        },
        "[scheduler]\nqueue_timeout = \"20s\"\n",
    );
    // The watcher reads the sim directory itself, throughout.
    let dir = daemon.device_dir();
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let watcher = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let mut total = 0;
                for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                    let name = entry.file_name().to_string_lossy().to_string();
                    let Ok(pid) = name.parse::<u32>() else { continue };
                    if !vramgate::gpu::pid_is_alive(pid) {
                        continue;
                    }
                    total += std::fs::read_to_string(entry.path())
                        .ok()
                        .and_then(|t| t.trim().parse::<u64>().ok())
                        .unwrap_or(0);
                }
                peak.fetch_max(total, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let client = common::http::client();
    let requests = (0..60).map(|i| {
        let client = client.clone();
        let url = format!("{}/v1/chat/completions", daemon.url);
        let model = format!("m{}", i % 3 + 1);
        async move {
            let response = client.post(url).json(&json!({"model": model, "stream": i % 2 == 0})).send().await.unwrap();
            let status = response.status().as_u16();
            let body = response.text().await.unwrap_or_default();
            (status, body)
        }
    });
    let results = futures_util::future::join_all(requests).await;
    stop.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    for (status, body) in &results {
        assert!(*status == 200 || *status == 503, "{status}: {body}");
        if *status == 503 {
            assert!(body.contains("error"), "{body}");
        }
    }
    let ok = results.iter().filter(|(s, _)| *s == 200).count();
    assert!(ok > 0);
    assert!(peak.load(Ordering::Relaxed) <= 10000, "the device held {} MiB of 10000", peak.load(Ordering::Relaxed));
}

#[tokio::test]
async fn an_alias_with_candidates_picks_by_fit() {
    let daemon = start(
        |sim| {
            [
                fake_model(sim, "big", 8000, "", "priority = 10"),
                fake_model(sim, "small", 3000, "", "priority = 10"),
                fake_model(sim, "vip", 5000, "", "priority = 100"),
            ]
            .concat()
        },
        "[aliases]\nchat = [\"big\", \"small\"]\n",
    );
    // Nothing is ready: the first candidate fits, so it is used.
    let response = chat(&daemon, json!({"model": "chat"})).await;
    assert_eq!((response.status().as_u16(), response.headers()["x-vramgate-model"].to_str().unwrap()), (200, "big"));
    // A higher-priority model takes the room; big would have to evict it, so small is chosen.
    assert_eq!(daemon.load("vip").await.0, 200);
    assert_eq!(daemon.model("big").await["state"], "unloaded");
    let response = chat(&daemon, json!({"model": "chat"})).await;
    assert_eq!(response.headers()["x-vramgate-model"], "small");
    // Now small is ready, and ready wins.
    let response = chat(&daemon, json!({"model": "chat"})).await;
    assert_eq!(response.headers()["x-vramgate-model"], "small");
    assert_eq!(daemon.model("vip").await["state"], "ready");
}

#[tokio::test]
async fn a_warmup_request_reaches_the_model_before_the_first_real_one() {
    let daemon = start(
        |sim| {
            [
                fake_model(
                    sim,
                    "a",
                    100,
                    "",
                    "warmup = { path = \"/v1/chat/completions\", body = { model = \"a\", messages = [{ role = \"user\", content = \"warmup-ping\" }] } }",
                ),
                fake_model(sim, "broken", 100, "", "warmup = { path = \"/nope\", body = {} }"),
            ]
            .concat()
        },
        "",
    );
    let response =
        chat(&daemon, json!({"model": "a", "messages": [{"role": "user", "content": "real-request"}]})).await;
    assert_eq!(response.status(), 200);
    let logs = common::http::get(format!("{}/vramgate/models/a/logs", daemon.url)).await.unwrap().text().await.unwrap();
    let warm = logs.find("warmup-ping").expect("the warmup reached the model");
    let real = logs.find("real-request").expect("the request reached the model");
    assert!(warm < real, "{logs}");
    let response = chat(&daemon, json!({"model": "broken"})).await;
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("warmup request"), "{body}");
}

#[tokio::test]
async fn multipart_uploads_are_routed_by_their_model_field_and_unknown_paths_pass_through() {
    let daemon = start(|sim| fake_model(sim, "stt", 100, "", ""), "");
    let form = reqwest::multipart::Form::new()
        .text("model", "stt")
        .part("file", reqwest::multipart::Part::bytes(vec![0u8; 64 * 1024]).file_name("a.wav"));
    let response = common::http::client()
        .post(format!("{}/v1/audio/transcriptions", daemon.url))
        .multipart(form)
        .send()
        .await
        .unwrap();
    // The fake's canned transcription comes back, from the right model.
    assert_eq!(response.headers()["x-vramgate-model"], "stt");
    assert_eq!(response.headers()["x-fake-model"], "stt");
    assert_eq!(response.json::<Value>().await.unwrap(), json!({"text": "hello from stt"}));
    let form = reqwest::multipart::Form::new().text("language", "en");
    let response = common::http::client()
        .post(format!("{}/v1/audio/transcriptions", daemon.url))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "missing_model");
    // Any other /v1 path of a named model reaches its server unchanged.
    let response = common::http::client()
        .post(format!("{}/v1/embeddings?probe=1", daemon.url))
        .json(&json!({"model": "stt", "input": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "list");
}

#[tokio::test]
async fn a_model_that_never_answers_is_a_504_and_is_not_kept_in_use() {
    let daemon = start(|sim| fake_model(sim, "a", 100, "", ""), "[proxy]\nfirst_byte_timeout = \"300ms\"\n");
    let (_, body) = daemon.load("a").await;
    let upstream = body["upstream"].as_str().unwrap().to_string();
    common::http::client().post(format!("{upstream}/hang")).send().await.unwrap();
    let response = chat(&daemon, json!({"model": "a"})).await;
    assert_eq!(response.status(), 504);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_timeout");
    assert!(body["error"]["message"].as_str().unwrap().contains("first_byte_timeout"), "{body}");
    daemon.wait_for_status(3 * SECOND, "in_use back to 0", |s| s["models"][0]["in_use"] == 0).await;
}

#[tokio::test]
async fn a_stream_that_stalls_is_cut_off_with_an_error_event_and_the_model_released() {
    let daemon = start(|sim| fake_model(sim, "a", 100, "--token-delay 3s", ""), "[proxy]\nstall_timeout = \"400ms\"\n");
    let response = chat(&daemon, json!({"model": "a", "stream": true})).await;
    assert_eq!(response.status(), 200);
    let started = Instant::now();
    let mut stream = response.bytes_stream();
    let mut body = Vec::new();
    while let Some(chunk) = stream.next().await {
        body.extend_from_slice(&chunk.expect("a clean end, not a broken connection"));
    }
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("\"upstream_timeout\""), "the stalled stream ends with an error event: {body}");
    assert!(started.elapsed() < Duration::from_secs(3), "broken off after {:?}", started.elapsed());
    daemon.wait_for_status(3 * SECOND, "in_use back to 0", |s| s["models"][0]["in_use"] == 0).await;
}

/// Fails the model's start three times, which puts it in its failure cooldown (10 s at first).
async fn fail_three_times(daemon: &Daemon) {
    for _ in 0..3 {
        let (code, body) = daemon.load("a").await;
        assert_eq!(code, 502, "{body}");
    }
    daemon.wait_model_state("a", "failed", 5 * SECOND).await;
}

/// The remaining cooldown in status, in whole seconds.
async fn retry_in_s(daemon: &Daemon) -> u64 {
    let model = daemon.model("a").await;
    model["retry_in_s"].as_u64().unwrap_or_else(|| panic!("no retry_in_s: {model}"))
}

/// `Retry-After` of a response, in seconds.
fn retry_after(response: &reqwest::Response) -> u64 {
    let header = response.headers().get("retry-after").expect("a Retry-After header");
    header.to_str().ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("Retry-After {header:?}"))
}

#[tokio::test]
async fn a_model_in_its_failure_cooldown_is_answered_503_with_the_time_left_on_both_proxy_surfaces() {
    let daemon = Daemon::start(|sim| {
        format!("{}{}", sim_config(sim, 10000, "50ms", ""), fake_model(sim, "a", 100, "--exit-on-start 7", ""))
    });
    fail_three_times(&daemon).await;
    let client = common::http::client();
    let chat = json!({"model": "a", "messages": [{"role": "user", "content": "hi"}]});

    let before = retry_in_s(&daemon).await;
    let response = client.post(format!("{}/v1/chat/completions", daemon.url)).json(&chat).send().await.unwrap();
    let after = retry_in_s(&daemon).await;
    assert_eq!(response.status(), 503);
    let seconds = retry_after(&response);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "model_failed", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("exit status 7"), "the last error: {body}");
    // The time left, not a generic hint: within what status said just before and after.
    assert!((after..=before).contains(&seconds), "Retry-After {seconds}, status said {before} then {after}");
    // A first cooldown is 10 s, and the generic `Retry-After: 5` of other 503s must not pass.
    assert!(seconds <= 10 && after >= 6, "a first cooldown of 10 s: Retry-After {seconds}, status said {after}");

    let before = retry_in_s(&daemon).await;
    let response = client.post(format!("{}/api/chat", daemon.url)).json(&chat).send().await.unwrap();
    let after = retry_in_s(&daemon).await;
    assert_eq!(response.status(), 503);
    let seconds = retry_after(&response);
    let body: Value = response.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("next automatic try"), "{body}");
    assert!((after..=before).contains(&seconds), "Retry-After {seconds}, status said {before} then {after}");
    // Refused without another start: the cooldown is not spent on demands.
    assert_eq!(daemon.model("a").await["failures"], 3);
}
