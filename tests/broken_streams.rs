//! End-to-end: a streamed answer that breaks (the model server dies mid-answer, goes silent for
//! `proxy.stall_timeout`, or sends one event past the 16 MiB cut-off) ends with an error message
//! the client's library understands and then a clean end of the body, on both surfaces: an SSE
//! `data: {"error": {…}}` event on the OpenAI surface (the openai library raises `APIError`), an
//! `{"error": "…"}` line on the Ollama surface (the ollama library raises `ResponseError`), for
//! translated and passed-through models alike. An unload or a shutdown with answers in flight
//! cuts them the same way, and closes their connections so that a server which, like
//! llama-server, exits on SIGTERM only once its clients have gone, exits at once. Each test reads the raw body to its end: a read
//! error is the aborted connection these tests exist to rule out.

mod common;

use std::time::{Duration, Instant};

use common::ollama::FakeOllama;
use common::sim_daemon::on_8000_mib as start;
use common::stand_in::{StandIn, one_long_event, port_reporting_cmd};
use common::{Daemon, fake_model, sim_config};
use futures_util::StreamExt;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

const SECOND: Duration = Duration::from_secs(1);

/// A chat request that streams, on `surface` (`/v1/chat/completions` or `/api/chat`).
async fn stream_chat(daemon: &Daemon, path: &str, model: &str) -> reqwest::Response {
    let body = json!({"model": model, "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let response = common::http::client().post(format!("{}{path}", daemon.url)).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 200, "{path}: {}", daemon.log());
    response
}

/// Reads a body to its end within 20 s, failing the test if the connection breaks (the body does
/// not end cleanly) or it never ends. `on_first` runs once the first piece has arrived.
async fn read_to_clean_end(response: reqwest::Response, on_first: impl FnOnce()) -> String {
    let mut stream = response.bytes_stream();
    let mut body = Vec::new();
    let mut on_first = Some(on_first);
    let read = tokio::time::timeout(20 * SECOND, async {
        while let Some(piece) = stream.next().await {
            match piece {
                Ok(bytes) => body.extend_from_slice(&bytes),
                Err(e) => {
                    let so_far = String::from_utf8_lossy(&body);
                    panic!("the body did not end cleanly ({e:?}); it ended after:\n{so_far}");
                }
            }
            if let Some(first) = on_first.take() {
                first();
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the body never ended: {}", String::from_utf8_lossy(&body));
    String::from_utf8(body).expect("a UTF-8 body")
}

/// The data of the last SSE event of a body, as JSON.
fn last_sse_event(body: &str) -> Value {
    let event = body.trim_end().rsplit("\n\n").next().expect("an event");
    let data = event.strip_prefix("data: ").unwrap_or_else(|| panic!("not a data event: {event:?} in\n{body}"));
    serde_json::from_str(data).unwrap_or_else(|e| panic!("the last event is not JSON ({e}): {event:?}"))
}

/// The last NDJSON line of a body, as JSON; every line before it must be JSON too.
fn last_line(body: &str) -> Value {
    assert!(body.ends_with('\n'), "the last line is not ended: {body:?}");
    let lines: Vec<Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("a line is not JSON ({e}): {l:?}")))
        .collect();
    lines.last().cloned().expect("a line")
}

/// The OpenAI error event every broken stream ends with: `code`, and a message containing `says`.
fn assert_sse_error(body: &str, code: &str, says: &str) {
    let event = last_sse_event(body);
    assert_eq!(event["error"]["code"], code, "{body}");
    assert_eq!(event["error"]["type"], "server_error", "{body}");
    let message = event["error"]["message"].as_str().unwrap_or_else(|| panic!("no message: {event}"));
    assert!(message.contains(says), "{message:?} should say {says:?}");
}

/// The Ollama error line every broken stream ends with: a message (a string) containing `says`.
fn assert_ollama_error(body: &str, says: &str) {
    let line = last_line(body);
    let message = line["error"].as_str().unwrap_or_else(|| panic!("the last line is not an error: {body}"));
    assert!(message.contains(says), "{message:?} should say {says:?}");
}

fn sigkill(pid: u64) {
    kill(Pid::from_raw(i32::try_from(pid).expect("a pid")), Signal::SIGKILL).expect("kill the model server");
}

#[tokio::test]
async fn a_model_server_killed_mid_answer_ends_the_stream_with_an_error_on_both_surfaces() {
    let daemon = start(|sim| fake_model(sim, "a", 1000, "--token-delay 300ms", ""));
    for (path, openai) in [("/v1/chat/completions", true), ("/api/chat", false)] {
        let response = stream_chat(&daemon, path, "a").await;
        let pid = daemon.model("a").await["pid"].as_u64().expect("a pid");
        let body = read_to_clean_end(response, || sigkill(pid)).await;
        if openai {
            assert!(body.starts_with("data: "), "the content came first: {body}");
            assert_sse_error(&body, "upstream_error", "failed mid-answer");
        } else {
            assert!(body.contains("\"content\":\"tok0 \""), "the content came first: {body}");
            assert_ollama_error(&body, "failed mid-answer");
        }
        daemon.wait_model_state("a", "unloaded", 5 * SECOND).await;
    }
}

#[tokio::test]
async fn a_model_server_that_goes_silent_mid_answer_is_cut_off_with_an_error_on_both_surfaces() {
    let daemon = start(|sim| {
        format!("{}[proxy]\nstall_timeout = \"300ms\"\n", fake_model(sim, "a", 1000, "--token-delay 30s", ""))
    });
    let response = stream_chat(&daemon, "/v1/chat/completions", "a").await;
    let body = read_to_clean_end(response, || {}).await;
    assert_sse_error(&body, "upstream_timeout", "proxy.stall_timeout");
    let response = stream_chat(&daemon, "/api/chat", "a").await;
    let body = read_to_clean_end(response, || {}).await;
    assert_ollama_error(&body, "proxy.stall_timeout");
    daemon.wait_for_status(3 * SECOND, "in_use back to 0", |s| s["models"][0]["in_use"] == 0).await;
}

#[tokio::test]
async fn an_event_past_the_cut_off_ends_the_stream_with_an_error_on_both_surfaces() {
    let dir = tempfile::tempdir().unwrap();
    let (cmd, port_file) = port_reporting_cmd(dir.path());
    // One event's data lines, 17 MiB of them, before its end: past the 16 MiB cut-off.
    let _server = StandIn::on_reported_port(port_file, one_long_event(17 * 16));
    let daemon =
        start(move |_| format!("[models.m]\nbackend = \"process\"\ncmd = {cmd}\nhealth = \"/health\"\nvram = 100\n"));
    let response = stream_chat(&daemon, "/v1/chat/completions", "m").await;
    let body = read_to_clean_end(response, || {}).await;
    assert!(body.len() < 4096, "none of the oversized event was relayed ({} bytes)", body.len());
    assert_sse_error(&body, "answer_too_large", "16 MiB");
    let response = stream_chat(&daemon, "/api/chat", "m").await;
    let body = read_to_clean_end(response, || {}).await;
    assert_ollama_error(&body, "16 MiB");
}

/// An Ollama model with one fake Ollama, whose answers stream a line every `token_delay`.
fn ollama_daemon(sim: &std::path::Path, ollama: &FakeOllama, proxy: &str) -> Daemon {
    let url = ollama.url.clone();
    let sim = sim.to_path_buf();
    let proxy = proxy.to_string();
    Daemon::start(move |_| {
        format!(
            "{}{proxy}[models.llama]\nbackend = \"ollama\"\nollama_model = \"llama3.2:3b\"\nurl = \"{url}\"\n",
            sim_config(&sim, 8000, "50ms", "reserve_mib = 0")
        )
    })
}

#[tokio::test]
async fn a_passed_through_ollama_answer_that_breaks_ends_with_an_error_in_its_surfaces_shape() {
    let sim = tempfile::tempdir().unwrap();
    // Silent for 30 s between lines, cut off at 300 ms.
    let ollama = FakeOllama::start_with(sim.path(), 0, &["--token-delay", "30s"]);
    let daemon = ollama_daemon(sim.path(), &ollama, "[proxy]\nstall_timeout = \"300ms\"\n");
    let response = stream_chat(&daemon, "/api/chat", "llama").await;
    let body = read_to_clean_end(response, || {}).await;
    assert_ollama_error(&body, "proxy.stall_timeout");
    // Ollama's OpenAI-compatible route, relayed on the OpenAI surface: an SSE error event.
    let response = stream_chat(&daemon, "/v1/chat/completions", "llama").await;
    let body = read_to_clean_end(response, || {}).await;
    assert_sse_error(&body, "upstream_timeout", "proxy.stall_timeout");
    drop(daemon);
    drop(ollama);

    // Killed after its first line.
    let ollama = FakeOllama::start_with(sim.path(), 0, &["--token-delay", "300ms"]);
    let daemon = ollama_daemon(sim.path(), &ollama, "");
    let response = stream_chat(&daemon, "/api/chat", "llama").await;
    let pid = u64::from(ollama.child.id());
    let body = read_to_clean_end(response, || sigkill(pid)).await;
    assert!(body.lines().count() >= 2, "the first line came before the error: {body}");
    assert_ollama_error(&body, "failed mid-answer");
}

/// A model that stops the way llama-server does (on SIGTERM it stops generating, and exits only
/// once its clients have gone), answering 100 words, one every 100 ms; `stop_timeout` 2 s.
fn stops_like_llama_server(sim: &std::path::Path) -> String {
    let reply = vec!["word"; 100].join(" ");
    let args = format!("--term-waits-for-clients --token-delay 100ms --reply '{reply}'");
    fake_model(sim, "a", 1000, &args, "stop_timeout = \"2s\"")
}

#[tokio::test]
async fn an_unload_cuts_the_answers_in_flight_and_the_server_exits_at_once() {
    let daemon = start(stops_like_llama_server);
    for (path, openai) in [("/v1/chat/completions", true), ("/api/chat", false)] {
        let response = stream_chat(&daemon, path, "a").await;
        let asked = Instant::now();
        // The unload lets the answer run for up to stop_timeout, then cuts it: the body ends
        // with the error, and the server, its client gone, exits on SIGTERM at once.
        let unload = async { (daemon.unload("a").await, Instant::now()) };
        let read = async { (read_to_clean_end(response, || {}).await, Instant::now()) };
        let (((status, answer), unloaded), (body, ended)) = tokio::join!(unload, read);
        assert_eq!(status, 200, "{answer}");
        if openai {
            assert!(body.contains("word "), "the answer ran until the cut: {body}");
            assert_sse_error(&body, "model_stopped", "was stopped");
        } else {
            assert!(body.contains("\"content\":\"word \""), "the answer ran until the cut: {body}");
            assert_ollama_error(&body, "was stopped");
        }
        let cut = ended.duration_since(asked);
        assert!(cut < 4 * SECOND, "{path}: cut {cut:?} after the unload (stop_timeout 2 s)");
        let stopped = unloaded.saturating_duration_since(ended);
        assert!(stopped < SECOND, "{path}: the server stopped {stopped:?} after the cut: {}", daemon.log());
        assert!(!daemon.log().contains("did not stop within"), "{path}: the server was killed: {}", daemon.log());
    }
}

#[tokio::test]
async fn an_unload_answers_a_request_waiting_for_a_whole_answer_with_a_503() {
    let daemon = start(stops_like_llama_server);
    assert_eq!(daemon.load("a").await.0, 200);
    for (path, openai) in [("/v1/chat/completions", true), ("/api/chat", false)] {
        let body = json!({"model": "a", "stream": false, "messages": [{"role": "user", "content": "hi"}]});
        let request = common::http::client().post(format!("{}{path}", daemon.url)).json(&body).send();
        let answered = async {
            let response = request.await.expect("an answer");
            (response.status().as_u16(), response.json::<Value>().await.expect("a JSON answer"))
        };
        // The request reaches the server before the unload does: the unload waits for it.
        let unload = async {
            daemon.wait_for_status(5 * SECOND, "the request in flight", |s| s["models"][0]["in_use"] == 1).await;
            daemon.unload("a").await
        };
        let ((status, answer), (unloaded, _)) = tokio::join!(answered, unload);
        assert_eq!(unloaded, 200);
        assert_eq!(status, 503, "{path}: {answer}");
        let message = if openai { &answer["error"]["message"] } else { &answer["error"] };
        assert!(message.as_str().is_some_and(|m| m.contains("was stopped")), "{path}: {answer}");
        if openai {
            assert_eq!(answer["error"]["code"], "model_stopped", "{answer}");
        }
        // Its connection closed with the cut: the server, its client gone, stopped on SIGTERM.
        assert!(!daemon.log().contains("did not stop within"), "{path}: the server was killed: {}", daemon.log());
        assert_eq!(daemon.load("a").await.0, 200);
    }
}

#[tokio::test]
async fn a_shutdown_cuts_the_answers_in_flight_and_the_daemon_exits_at_once() {
    let mut daemon = start(stops_like_llama_server);
    let response = stream_chat(&daemon, "/v1/chat/completions", "a").await;
    let body = read_to_clean_end(response, || daemon.signal(Signal::SIGTERM)).await;
    assert_sse_error(&body, "model_stopped", "was stopped");
    let status = daemon.wait_exit(5 * SECOND).expect("the daemon exits");
    assert!(status.success(), "{status:?}: {}", daemon.log());
    let log = daemon.log();
    assert!(log.contains("killed=false"), "the server stopped on SIGTERM: {log}");
}
