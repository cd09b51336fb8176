//! Every error is answered in the shape of the surface that was asked, so that each surface's
//! clients can read it: unknown paths and methods an endpoint does not take get OpenAI's shape
//! under `/v1/`, Ollama's `{"error": "…"}` under `/api/` (the ollama library's `ResponseError`
//! expects a string there), and the management shape elsewhere.

mod common;

use std::time::Duration;

use common::Daemon;
use serde_json::Value;

async fn ask(daemon: &Daemon, method: reqwest::Method, path: &str) -> (u16, Value) {
    let response = common::http::client()
        .request(method, format!("{}{path}", daemon.url))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("an answer");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("{path}: not JSON: {text:?}")))
}

fn assert_ollama_shape(body: &Value, what: &str) {
    assert!(body["error"].as_str().is_some_and(|m| !m.is_empty()), "{what}: Ollama's shape is a string: {body}");
}

fn assert_openai_shape(body: &Value, code: &str, what: &str) {
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {body}");
    assert_eq!(body["error"]["code"], code, "{what}: {body}");
    assert!(body["error"]["type"].is_string(), "{what}: {body}");
}

fn assert_management_shape(body: &Value, status: u16, what: &str) {
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {body}");
    assert_eq!(body["error"]["code"], status, "{what}: {body}");
}

#[tokio::test]
async fn unknown_paths_answer_in_their_surfaces_shape() {
    let daemon = Daemon::start_sim(8192, "50ms");
    // (`/api/show` and `/api/pull` are served: tests/ollama_show.rs.)
    for path in ["/api/nope", "/api/blobs/sha256-0", "/api"] {
        let (status, body) = ask(&daemon, reqwest::Method::POST, path).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert_ollama_shape(&body, path);
    }
    for path in ["/vramgate/nope", "/nope"] {
        let (status, body) = ask(&daemon, reqwest::Method::GET, path).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert_management_shape(&body, 404, path);
    }
    let (status, body) = ask(&daemon, reqwest::Method::GET, "/v1").await;
    assert_eq!(status, 404, "/v1: {body}");
    assert_openai_shape(&body, "not_found", "/v1");
}

#[tokio::test]
async fn a_method_an_endpoint_does_not_take_is_405_in_its_surfaces_shape() {
    let daemon = Daemon::start_sim(8192, "50ms");
    let (status, body) = ask(&daemon, reqwest::Method::GET, "/api/chat").await;
    assert_eq!(status, 405, "{body}");
    assert_ollama_shape(&body, "GET /api/chat");
    let (status, body) = ask(&daemon, reqwest::Method::GET, "/v1/chat/completions").await;
    assert_eq!(status, 405, "{body}");
    assert_openai_shape(&body, "method_not_allowed", "GET /v1/chat/completions");
    let (status, body) = ask(&daemon, reqwest::Method::DELETE, "/vramgate/status").await;
    assert_eq!(status, 405, "{body}");
    assert_management_shape(&body, 405, "DELETE /vramgate/status");
}
