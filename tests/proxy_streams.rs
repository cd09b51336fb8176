//! End-to-end: what the proxies hold up against, on both surfaces. A streamed event that never
//! ends and a large JSON body cost the daemon about their size, not without bound; a huge
//! tool-call index from a model server does not kill it; a client that stops reading is cut off
//! and releases its model; Ollama's unload call does not cut off an answer another client is
//! streaming. Each test was written in review against a bug it proved; its doc comment says what
//! used to go wrong.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::sim_daemon::on_8000_mib as start;
use common::stand_in::{Body, Reply, StandIn, one_long_event, port_reporting_cmd};
use common::{fake_model, model_in as model};
use futures_util::StreamExt;
use serde_json::{Value, json};

const SECOND: Duration = Duration::from_secs(1);

/// A process's peak resident memory (`VmHWM`), in MiB.
fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM");
    let kib: u64 = line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("VmHWM value");
    kib / 1024
}

/// The translation of a streamed OpenAI answer into NDJSON (`src/api/ollama.rs`, `SseParser`)
/// keeps everything a model server sends until an event ends: `feed` appends to `partial` until a
/// newline and `line` appends every `data:` line to `data` until a blank line, with no limit. A
/// model server that streams one endless event (a bug, a runaway generation, a hostile process)
/// makes the daemon hold all of it in memory; the non-streamed path stops at 1 GiB, this one
/// never does. Here 256 MiB of `data:` lines without a blank line grow the daemon by hundreds of
/// MiB while the OpenAI proxy would relay the same answer in constant memory.
#[tokio::test]
async fn a_streamed_answer_whose_event_never_ends_does_not_grow_the_daemon_without_bound() {
    let dir = tempfile::tempdir().unwrap();
    let (cmd, port_file) = port_reporting_cmd(dir.path());
    // Every GET (the health check) is fine; a POST answers 256 MiB of one event's data lines,
    // never a blank line.
    let _server = StandIn::on_reported_port(port_file, one_long_event(4096));
    let daemon =
        start(move |_| format!("[models.m]\nbackend = \"process\"\ncmd = {cmd}\nhealth = \"/health\"\nvram = 100\n"));
    assert_eq!(daemon.load("m").await.0, 200, "{}", daemon.log());
    let pid = daemon.child.id();
    let before = peak_rss_mib(pid);
    let response = common::http::client()
        .post(format!("{}/api/chat", daemon.url))
        .json(&json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    let mut stream = response.bytes_stream();
    let _ = tokio::time::timeout(60 * SECOND, async { while let Some(Ok(_)) = stream.next().await {} }).await;
    let after = peak_rss_mib(pid);
    assert!(
        after.saturating_sub(before) < 64,
        "relaying one streamed answer raised the daemon's peak memory from {before} MiB to {after} MiB: \
         the SSE parser buffers an event without limit"
    );
}

/// The Ollama surface parses every request body into a `serde_json::Value` tree
/// (`read_object`) before it even looks at `model`; the OpenAI side only extracts `model`
/// without building anything. A `Value` costs 32 bytes and more per element, so a body of small
/// numbers within `proxy.max_body` (256 MiB by default, sized for audio uploads) costs the daemon
/// 16 to 32 times its size: one 256 MiB request is 4 to 8 GiB, and a few at once take the whole
/// daemon (and, through `PR_SET_PDEATHSIG`, every model server) down with the OOM killer. Here 32
/// MiB of `[0,0,...]` for an unknown model (answered 404) raises the peak by far more than the
/// body.
#[tokio::test]
async fn a_large_json_body_on_the_ollama_surface_costs_about_its_size_not_many_times_it() {
    let daemon = start(|_| String::new());
    let pid = daemon.child.id();
    let before = peak_rss_mib(pid);
    let mut body = String::with_capacity(33 << 20);
    body.push_str("{\"model\": \"nobody\", \"messages\": [], \"junk\": [0");
    while body.len() < 32 << 20 {
        body.push_str(",0");
    }
    body.push_str("]}");
    let response = common::http::client()
        .post(format!("{}/api/chat", daemon.url))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let after = peak_rss_mib(pid);
    assert!(
        after.saturating_sub(before) < 128,
        "one 32 MiB request on /api/chat raised the daemon's peak memory from {before} MiB to {after} MiB"
    );
}

/// Used to fail (panic on input): the Ollama surface's translation of a streamed OpenAI answer trusts the
/// model server's `tool_calls[].index` and grows a vector to that length
/// (`src/api/ollama.rs`, `Progress::event`: `self.tool_calls.resize_with(index + 1, ..)`). An
/// index of 1e11 asks for terabytes: the allocation fails and the whole daemon aborts.
#[tokio::test]
async fn a_huge_tool_call_index_from_a_model_server_does_not_kill_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let (cmd, port_file) = port_reporting_cmd(dir.path());
    // Health is fine; a chat streams one tool call with index 1e11, then `[DONE]`.
    let call = json!({"index": 100_000_000_000u64, "id": "c", "type": "function",
                      "function": {"name": "f", "arguments": "{}"}});
    let chunk = json!({"choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": null}]});
    let events = format!("data: {chunk}\n\ndata: [DONE]\n\n").into_bytes();
    let _server = StandIn::on_reported_port(
        port_file,
        Arc::new(move |method, _, _| match method {
            "GET" => Reply::json(200, &json!({})),
            _ => Reply {
                status: 200,
                content_type: "text/event-stream",
                body: Body::Repeat { chunk: events.clone(), times: Some(1), then: Vec::new() },
            },
        }),
    );
    let daemon = start(move |_| {
        format!("[models.tools]\nbackend = \"process\"\ncmd = {cmd}\nhealth = \"/health\"\nvram = 100\n")
    });
    assert_eq!(daemon.load("tools").await.0, 200, "{}", daemon.log());
    let _ = common::http::client()
        .post(format!("{}/api/chat", daemon.url))
        .json(&json!({"model": "tools", "messages": [{"role": "user", "content": "call it"}]}))
        .timeout(10 * SECOND)
        .send()
        .await
        .map(|r| async move { r.text().await });
    let alive = common::http::get(format!("{}/vramgate/health", daemon.url)).await.is_ok_and(|r| r.status() == 200);
    let mut daemon = daemon;
    let exited = daemon.child.try_wait().ok().flatten();
    assert!(alive && exited.is_none(), "the daemon died ({exited:?}); its log ends with:\n{}", {
        let log = daemon.log();
        log.lines().rev().take(5).collect::<Vec<_>>().join("\n")
    });
}

/// A client that stops reading mid-answer (hung, stopped, gone without a FIN) is cut off after
/// `proxy.client_timeout`, and the model its answer pinned is free again: otherwise the server
/// would never poll that body again and the model could never be evicted.
#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_and_releases_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let (cmd, port_file) = port_reporting_cmd(dir.path());
    // Health is fine; a chat answers events of 64 KiB for as long as anyone reads them.
    let _server = StandIn::on_reported_port(
        port_file,
        Arc::new(|method, _, _| match method {
            "GET" => Reply::json(200, &json!({})),
            _ => Reply {
                status: 200,
                content_type: "text/event-stream",
                body: Body::Repeat {
                    chunk: [b"data: ".as_slice(), &[b'x'; 65536], b"\n\n"].concat(),
                    times: None,
                    then: Vec::new(),
                },
            },
        }),
    );
    let daemon = start(move |_| {
        format!("[proxy]\nclient_timeout = \"1s\"\n[models.flood]\nbackend = \"process\"\ncmd = {cmd}\nvram = 100\n")
    });
    let (code, body) = daemon.load("flood").await;
    assert_eq!(code, 200, "{body}");
    // A raw client that sends its request and then never reads a byte.
    let address = daemon.url.trim_start_matches("http://").to_string();
    let mut client = tokio::net::TcpStream::connect(&address).await.unwrap();
    let request = "{\"model\": \"flood\", \"stream\": true}";
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{request}",
        request.len()
    );
    tokio::io::AsyncWriteExt::write_all(&mut client, head.as_bytes()).await.unwrap();
    daemon.wait_for_status(10 * SECOND, "the flood in use", |s| model(s, "flood")["in_use"] == 1).await;
    daemon.wait_for_status(20 * SECOND, "the stuck client cut off", |s| model(s, "flood")["in_use"] == 0).await;
    drop(client);
}

/// Ollama's unload call (`/api/generate` with no prompt and `keep_alive: 0`, Open WebUI's "unload"
/// button, scripts that free the GPU after their own request) sets the runner to expire: Ollama
/// unloads it once the requests using it are done. On vramgate's Ollama surface the same call is
/// `arbiter.unload` → `begin_unload("requested")`, which closes the gate whatever the pins and
/// stops the server at once: another client's answer, streaming from that model, is cut off
/// mid-way. The model should go once it is idle, as in Ollama.
#[tokio::test]
async fn an_ollama_unload_call_does_not_cut_off_an_answer_another_client_is_streaming() {
    let daemon = start(|sim| fake_model(sim, "a", 1000, "--token-delay 400ms", "ttl = \"0\""));
    assert_eq!(daemon.load("a").await.0, 200);
    let response = common::http::client()
        .post(format!("{}/api/chat", daemon.url))
        .json(&json!({"model": "a", "messages": [{"role": "user", "content": "tell me a story"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let first = tokio::time::timeout(5 * SECOND, stream.next()).await.expect("a first line").expect("a chunk");
    assert!(first.is_ok(), "{first:?}");
    // Another client unloads the model the Ollama way.
    let (code, body) = daemon.post("/api/generate", json!({"model": "a", "keep_alive": 0})).await;
    let mut text = String::from_utf8_lossy(&first.unwrap()).to_string();
    let mut broken = None;
    while let Ok(Some(chunk)) = tokio::time::timeout(10 * SECOND, stream.next()).await {
        match chunk {
            Ok(bytes) => text.push_str(&String::from_utf8_lossy(&bytes)),
            Err(e) => {
                broken = Some(e.to_string());
                break;
            }
        }
    }
    let done = text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).any(|l| l["done"] == true);
    assert!(
        done && broken.is_none(),
        "the unload call (answered {code}: {body}) cut off the answer streaming to another client: \
         broken = {broken:?}, received: {text}"
    );
}
