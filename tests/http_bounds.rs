//! The HTTP server's bounds: a connection whose request head does not arrive in time
//! (`server.header_read_timeout`, slowloris) is closed; at most `server.max_connections`
//! connections are served at once (more wait until one closes); and request bodies held in
//! memory across all requests stay under `proxy.max_buffered` (more is a 503 with `Retry-After`
//! in the surface's shape), and so do the whole answers vramgate holds to translate them.

mod common;

use std::time::{Duration, Instant};

use common::stand_in::{Reply, StandIn, port_reporting_cmd};
use common::{Daemon, sim_config};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const DEADLINE: Duration = Duration::from_secs(10);

fn daemon_with(keys: &str) -> Daemon {
    Daemon::start(|sim| format!("{}{keys}", sim_config(sim, 8192, "50ms", "")))
}

fn address(daemon: &Daemon) -> String {
    daemon.url.trim_start_matches("http://").trim_end_matches('/').to_string()
}

/// Reads until the server closes the connection (EOF or reset), within `deadline`; `None` if it
/// is still open then.
async fn closed_within(stream: &mut TcpStream, deadline: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buffer = [0u8; 4096];
    let closed = tokio::time::timeout(deadline, async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    closed.ok().map(|()| started.elapsed())
}

/// Sends a keep-alive request on a raw connection and reads its whole (small) answer, so that the
/// connection is surely being served.
async fn served_connection(daemon: &Daemon) -> TcpStream {
    let mut stream = TcpStream::connect(address(daemon)).await.expect("connect");
    stream.write_all(b"GET /vramgate/health HTTP/1.1\r\nHost: test\r\n\r\n").await.expect("write");
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    tokio::time::timeout(DEADLINE, async {
        // The health answer is small JSON: done once its closing brace arrived.
        while !answer.ends_with(b"}") {
            let n = stream.read(&mut buffer).await.expect("read");
            assert!(n > 0, "the server closed a connection it should serve");
            answer.extend_from_slice(&buffer[..n]);
        }
    })
    .await
    .expect("the health answer within the deadline");
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
    stream
}

#[tokio::test]
async fn a_half_sent_request_head_is_closed_after_the_header_read_timeout() {
    let daemon = daemon_with("[server]\nheader_read_timeout = \"300ms\"\n");
    let mut stream = TcpStream::connect(address(&daemon)).await.expect("connect");
    // The request line and one header, never the blank line that ends the head.
    stream.write_all(b"GET /vramgate/status HTTP/1.1\r\nHost: test\r\n").await.expect("write");
    let after = closed_within(&mut stream, DEADLINE).await;
    let after = after.expect("the half-sent request's connection is closed by the server");
    assert!(after >= Duration::from_millis(250), "closed after {after:?}, before the timeout");

    // A connection that sends nothing at all is closed too.
    let mut silent = TcpStream::connect(address(&daemon)).await.expect("connect");
    assert!(closed_within(&mut silent, DEADLINE).await.is_some(), "a silent connection is closed");

    // Whole requests are still served.
    let status = common::http::get(format!("{}/vramgate/health", daemon.url)).await.expect("health");
    assert_eq!(status.status(), 200);
}

#[tokio::test]
async fn a_long_answer_outlives_the_header_read_timeout() {
    // The timeout bounds reading a request's head, not the answer: a connection-held lease
    // streams a line every 250 ms for as long as it is held.
    let daemon = daemon_with("[server]\nheader_read_timeout = \"200ms\"\n");
    let mut response = common::http::client()
        .post(format!("{}/vramgate/leases", daemon.url))
        .json(&serde_json::json!({"vram": "100MiB", "hold": "connection", "holder": "long"}))
        .send()
        .await
        .expect("the lease stream");
    assert_eq!(response.status(), 200);
    let started = Instant::now();
    let mut text = String::new();
    // Six heartbeats: 1.5 s, over seven times the timeout.
    while text.matches("\"held\"").count() < 6 {
        let chunk = tokio::time::timeout(DEADLINE, response.chunk()).await.expect("a line within the deadline");
        let chunk = chunk.expect("the stream is not broken").expect("the stream has not ended");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(started.elapsed() >= Duration::from_millis(1000), "{text}");
}

#[tokio::test]
async fn connections_beyond_max_connections_wait_until_one_closes() {
    let daemon = daemon_with("[server]\nmax_connections = 2\nheader_read_timeout = \"60s\"\n");
    let first = served_connection(&daemon).await;
    let _second = served_connection(&daemon).await;

    let url = format!("{}/vramgate/health", daemon.url);
    let third = tokio::spawn(async move { common::http::client().get(url).send().await.map(|r| r.status()) });
    // Both slots are held by idle keep-alive connections: the third is not served meanwhile.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!third.is_finished(), "a third connection was served while two were open (max_connections = 2)");

    drop(first);
    let status = tokio::time::timeout(DEADLINE, third)
        .await
        .expect("the waiting connection is served once one closes")
        .expect("the task")
        .expect("an answer");
    assert_eq!(status, 200);
}

/// Starts a request whose body declares `declared` bytes, sends `sent` of them and then stalls,
/// holding its share of the body budget while the server reads.
async fn stalled_upload(daemon: &Daemon, path: &str, declared: usize, sent: usize) -> TcpStream {
    let mut stream = TcpStream::connect(address(daemon)).await.expect("connect");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.expect("write the head");
    stream.write_all(&vec![b' '; sent]).await.expect("write part of the body");
    stream
}

/// Posts a body of `len` bytes until the answer is a 503 (the stalled upload's bytes arrive at
/// the server in their own time), for up to `within`; `None` if none came.
async fn busy_within(daemon: &Daemon, path: &str, len: usize, within: Duration) -> Option<reqwest::Response> {
    let started = Instant::now();
    while started.elapsed() < within {
        let mut body = format!("{{\"model\": \"nope\", \"pad\": \"{}", "x".repeat(len));
        body.push_str("\"}");
        let response = common::http::client()
            .post(format!("{}{path}", daemon.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("an answer");
        if response.status() == 503 {
            return Some(response);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// A stalled upload of 700 KiB (of a declared 1 MiB) held beside posts of `len` bytes, until one
/// is refused for the body budget. The server does not always hand a stalled upload's bytes to
/// the handler that counts them at once (hyper may keep part of them in its connection buffer,
/// where `server.max_connections` bounds them), so a fresh stalled upload is tried when one is
/// not counted within a second. Returns the 503 and the upload that holds the budget.
async fn until_busy(daemon: &Daemon, path: &str, len: usize) -> (reqwest::Response, TcpStream) {
    let started = Instant::now();
    loop {
        let held = stalled_upload(daemon, path, 1 << 20, 700 << 10).await;
        if let Some(response) = busy_within(daemon, path, len, Duration::from_secs(1)).await {
            return (response, held);
        }
        assert!(started.elapsed() < DEADLINE, "{path}: never refused for the body budget");
    }
}

#[tokio::test]
async fn bodies_beyond_max_buffered_are_a_503_with_retry_after_in_the_surfaces_shape() {
    let daemon = daemon_with("[proxy]\nmax_body = \"1MiB\"\nmax_buffered = \"1MiB\"\n");
    // 700 KiB held by an upload that stalls: another 700 KiB cannot be held beside it.
    let (response, held) = until_busy(&daemon, "/v1/chat/completions", 700 << 10).await;
    assert!(response.headers().contains_key("retry-after"), "{:?}", response.headers());
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "server_busy", "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("proxy.max_buffered")), "{body}");

    drop(held);
    let (response, held) = until_busy(&daemon, "/api/chat", 700 << 10).await;
    assert!(response.headers().contains_key("retry-after"), "{:?}", response.headers());
    let body: Value = response.json().await.expect("JSON");
    assert!(body["error"].as_str().is_some_and(|m| m.contains("proxy.max_buffered")), "Ollama's shape: {body}");

    // The stalled upload goes away: its bytes are back in the budget, and the same request is
    // read whole (and answered for what it is: an unknown model).
    drop(held);
    let started = Instant::now();
    loop {
        let mut body = format!("{{\"model\": \"nope\", \"pad\": \"{}", "x".repeat(700 << 10));
        body.push_str("\"}");
        let response = common::http::client()
            .post(format!("{}/v1/chat/completions", daemon.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("an answer");
        if response.status() == 404 {
            break;
        }
        assert!(started.elapsed() < DEADLINE, "the budget never came back: {}", response.status());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `config check` on `text`.
fn config_check(text: &str) -> std::process::Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vramgate.toml");
    std::fs::write(&path, text).expect("write config");
    common::output(common::vramgate().args(["config", "check"]).arg(&path))
}

#[test]
fn config_check_bounds_the_servers_own_limits_naming_key_and_line() {
    let cases = [
        ("[server]\nmax_connections = 0\n", "server.max_connections", "line 2"),
        ("[server]\nheader_read_timeout = \"2d\"\n", "server.header_read_timeout", "line 2"),
        ("[proxy]\nmax_body = \"64MiB\"\nmax_buffered = \"32MiB\"\n", "proxy.max_buffered", "line 3"),
    ];
    for (text, key, line) in cases {
        let out = config_check(&format!("[gpu]\nprobe = \"none\"\n{text}"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {stderr}");
        let line = format!("line {}", line.trim_start_matches("line ").parse::<u32>().expect("a line") + 2);
        assert!(stderr.contains(key) && stderr.contains(&line), "{text}: names {key} and {line}: {stderr}");
    }
    let out = config_check("[gpu]\nprobe = \"none\"\n[server]\nmax_connections = 1\nheader_read_timeout = \"0\"\n");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn a_whole_answer_held_for_translation_counts_against_max_buffered() {
    let dir = tempfile::tempdir().unwrap();
    let (cmd, port_file) = port_reporting_cmd(dir.path());
    // A chat answer whose content is as long as the prompt's first message says (in KiB).
    let _server = StandIn::on_reported_port(
        port_file,
        std::sync::Arc::new(|method, _, body| {
            let asked: Value = serde_json::from_slice(body).unwrap_or_default();
            let kib = asked["messages"][0]["content"].as_str().and_then(|c| c.parse::<usize>().ok()).unwrap_or(0);
            let content = "x".repeat(kib << 10);
            match method {
                "GET" => Reply::json(200, &serde_json::json!({})),
                _ => Reply::json(200, &serde_json::json!({"choices": [{"message": {"content": content}}]})),
            }
        }),
    );
    let daemon = Daemon::start(move |sim| {
        format!(
            "{}[proxy]\nmax_body = \"1MiB\"\nmax_buffered = \"1MiB\"\n[models.m]\nbackend = \"process\"\ncmd = {cmd}\nhealth = \"/health\"\nvram = 100\n",
            sim_config(sim, 8192, "50ms", "")
        )
    });
    let chat = |kib: &str| {
        let body = serde_json::json!({"model": "m", "stream": false, "messages": [{"role": "user", "content": kib}]});
        common::http::client().post(format!("{}/api/chat", daemon.url)).json(&body).send()
    };
    let response = chat("512").await.expect("an answer");
    assert_eq!(response.status(), 200, "an answer under the budget is translated");
    let answer: Value = response.json().await.expect("JSON");
    assert_eq!(answer["message"]["content"].as_str().map(str::len), Some(512 << 10));

    let response = chat("2048").await.expect("an answer");
    assert_eq!(response.status(), 503, "an answer over the budget is not held");
    let answer: Value = response.json().await.expect("JSON");
    assert!(answer["error"].as_str().is_some_and(|m| m.contains("proxy.max_buffered")), "{answer}");
}
