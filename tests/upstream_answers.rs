//! End-to-end: what a model server's own answers become. An upstream 4xx (a prompt or embedding
//! input longer than the server takes) reaches the client with its status, in the shape of the
//! surface it asked, never as a 502; and Ollama answers translated from llama-server take their
//! durations and counts from llama-server's `timings`, so an app computing tokens per second gets
//! the server's numbers rather than a zero prompt time. A request whose connection fails because
//! the model server has just died is sent once more, to the restarted server.

mod common;

use std::time::Duration;

use common::fake_model;
use common::sim_daemon::on_8000_mib as start;
use serde_json::{Value, json};

/// A prompt of 40 words: past the fake's `--max-input 8`.
fn long_text() -> String {
    vec!["word"; 40].join(" ")
}

async fn post(url: String, body: Value) -> (u16, Value) {
    let response = common::http::client().post(url).json(&body).send().await.unwrap();
    let status = response.status().as_u16();
    let body = tokio::time::timeout(Duration::from_secs(10), response.json::<Value>()).await;
    (status, body.expect("the answer within 10 s").expect("a JSON answer"))
}

#[tokio::test]
async fn an_upstream_400_passes_through_on_both_surfaces() {
    let daemon = start(|sim| fake_model(sim, "a", 100, "--max-input 8", ""));
    let long = long_text();
    let server_says = "exceeds the available context size";

    // The OpenAI surface: the server's own body, status 400.
    for (path, body) in [
        ("/v1/embeddings", json!({"model": "a", "input": long})),
        ("/v1/chat/completions", json!({"model": "a", "messages": [{"role": "user", "content": long}]})),
    ] {
        let (status, answer) = post(format!("{}{path}", daemon.url), body).await;
        assert_eq!(status, 400, "{path}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_else(|| panic!("{path}: {answer}"));
        assert!(message.contains(server_says), "{path}: {answer}");
    }

    // The Ollama surface: `{"error": "…"}` with the server's message, status 400, streamed or not.
    for (path, body) in [
        ("/api/embed", json!({"model": "a", "input": long})),
        ("/api/embeddings", json!({"model": "a", "prompt": long})),
        ("/api/chat", json!({"model": "a", "stream": false, "messages": [{"role": "user", "content": long}]})),
        ("/api/chat", json!({"model": "a", "messages": [{"role": "user", "content": long}]})),
        ("/api/generate", json!({"model": "a", "prompt": long})),
    ] {
        let (status, answer) = post(format!("{}{path}", daemon.url), body).await;
        assert_eq!(status, 400, "{path}: {answer}");
        let message = answer["error"].as_str().unwrap_or_else(|| panic!("{path}: not Ollama's shape: {answer}"));
        assert!(message.contains(server_says), "{path}: {answer}");
    }

    // A short input is answered as usual.
    let (status, answer) = post(format!("{}/api/embed", daemon.url), json!({"model": "a", "input": "hi"})).await;
    assert_eq!(status, 200, "{answer}");
}

/// The fake's `--timings`: the prompt took 12.5 ms, the generation 80.25 ms.
const PROMPT_NANOS: u64 = 12_500_000;
const EVAL_NANOS: u64 = 80_250_000;

/// The final line of an NDJSON body.
fn final_line(body: &str) -> Value {
    let last = body.lines().last().unwrap_or_else(|| panic!("no lines: {body:?}"));
    serde_json::from_str(last).unwrap_or_else(|e| panic!("not JSON ({e}): {last:?}"))
}

#[tokio::test]
async fn ollama_durations_and_counts_come_from_the_servers_timings() {
    let daemon = start(|sim| fake_model(sim, "a", 100, "--timings --token-delay 5ms", ""));
    let prompt = "one two three";

    // Not streamed: the whole answer's `timings`.
    let (status, answer) = post(
        format!("{}/api/chat", daemon.url),
        json!({"model": "a", "stream": false, "messages": [{"role": "user", "content": prompt}]}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["prompt_eval_duration"], PROMPT_NANOS, "{answer}");
    assert_eq!(answer["eval_duration"], EVAL_NANOS, "{answer}");
    assert_eq!(answer["prompt_eval_count"], 3, "{answer}");
    assert_eq!(answer["eval_count"], 3, "`hello from a`: {answer}");

    // Streamed: the last chunk's `timings`, in the final line.
    let response = common::http::client()
        .post(format!("{}/api/generate", daemon.url))
        .json(&json!({"model": "a", "prompt": prompt}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(10), response.text()).await.expect("within 10 s").unwrap();
    let last = final_line(&body);
    assert_eq!(last["done"], true, "{body}");
    assert_eq!(last["prompt_eval_duration"], PROMPT_NANOS, "{body}");
    assert_eq!(last["eval_duration"], EVAL_NANOS, "{body}");
    assert_eq!(last["prompt_eval_count"], 3, "{body}");
    assert_eq!(last["eval_count"], 5, "five chunks: {body}");
}

/// A model whose server runs under a shell that outlives it by `linger`: when the server dies,
/// vramgate sees the model's exit only then, and a request sent in between finds nobody
/// listening (the window a request sent in the instant after a crash falls into).
fn lingering_after_death(sim: &std::path::Path, linger: &str) -> String {
    let server = format!(
        "{} --port ${{PORT}} --sim-dir {} --vram 100 --name a --load-delay 50ms",
        common::fake(),
        sim.display()
    );
    format!(
        "[models.a]\nbackend = \"process\"\ncmd = [\"sh\", \"-c\", \"{server}; sleep {linger}\"]\nvram = 100\n\
         stop_timeout = \"1s\"\n"
    )
}

/// The pid of the server that answered (the fake names itself in a header).
async fn answering_pid(url: String, body: &Value) -> (u16, Option<u32>, Value) {
    let response = common::http::client().post(url).json(body).send().await.unwrap();
    let status = response.status().as_u16();
    let pid = response.headers().get("x-fake-pid").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    let answer = tokio::time::timeout(Duration::from_secs(10), response.json::<Value>()).await;
    (status, pid, answer.expect("the answer within 10 s").expect("a JSON answer"))
}

#[tokio::test]
async fn a_request_that_finds_its_model_server_just_dead_is_sent_again_after_the_restart() {
    let daemon = start(|sim| lingering_after_death(sim, "0.5"));
    for path in ["/v1/chat/completions", "/api/chat"] {
        let body = json!({"model": "a", "stream": false, "messages": [{"role": "user", "content": "hi"}]});
        // The OpenAI surface passes the fake's headers on: which server answered.
        let (status, first, answer) = answering_pid(format!("{}/v1/chat/completions", daemon.url), &body).await;
        assert_eq!(status, 200, "{answer}");
        let shell = daemon.model("a").await["pid"].clone();
        let pid = nix::unistd::Pid::from_raw(i32::try_from(first.expect("a pid")).expect("a pid"));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill the model server");
        // Sent at once: the server is gone, its shell (the model's process) not yet.
        let (status, _, answer) = answering_pid(format!("{}{path}", daemon.url), &body).await;
        assert_eq!(status, 200, "{path}: the request was sent again once the model restarted: {answer}");
        assert_ne!(daemon.model("a").await["pid"], shell, "{path}: the model was started again");
        assert!(daemon.log().contains("sending the request again"), "{path}: {}", daemon.log());
    }
}

#[tokio::test]
async fn a_model_server_that_refuses_connections_but_lives_on_is_not_retried() {
    // The server dies but its shell lives for a minute: vramgate sees no crash, so the failure
    // is the answer (after the short wait for the crash to show), and nothing is sent twice.
    let daemon = start(|sim| lingering_after_death(sim, "60"));
    let body = json!({"model": "a", "messages": [{"role": "user", "content": "hi"}]});
    let url = format!("{}/v1/chat/completions", daemon.url);
    let (status, first, answer) = answering_pid(url.clone(), &body).await;
    assert_eq!(status, 200, "{answer}");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(first.expect("a pid")).expect("a pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill the model server");
    let (status, _, answer) = answering_pid(url, &body).await;
    assert_eq!(status, 502, "{answer}");
    assert_eq!(answer["error"]["code"], "upstream_error", "{answer}");
    assert!(!daemon.log().contains("sending the request again"), "{}", daemon.log());
}

#[tokio::test]
async fn a_request_whose_server_dies_while_answering_it_is_not_sent_again() {
    // A whole answer takes 1.5 s: the server read the request and dies while working on it.
    let daemon = start(|sim| fake_model(sim, "a", 100, "--token-delay 300ms", ""));
    let body = json!({"model": "a", "stream": false, "messages": [{"role": "user", "content": "hi"}]});
    let (status, pid, answer) = answering_pid(format!("{}/v1/chat/completions", daemon.url), &body).await;
    assert_eq!(status, 200, "{answer}");
    let pid = pid.expect("the fake names its pid");
    let asked = post(format!("{}/v1/chat/completions", daemon.url), body);
    let kill = async {
        daemon
            .wait_for_status(Duration::from_secs(5), "the request in flight", |s| s["models"][0]["in_use"] == 1)
            .await;
        // The scenario itself, not a wait for something: the server has been working on the
        // request for a while (past the 100 ms in which a broken connection counts as stale).
        tokio::time::sleep(Duration::from_millis(500)).await;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("a pid"));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill the model server");
    };
    let ((status, answer), ()) = tokio::join!(asked, kill);
    assert_eq!(status, 502, "{answer}");
    assert!(!daemon.log().contains("sending the request again"), "{}", daemon.log());
}
