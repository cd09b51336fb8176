//! Every error is JSON in the shape of the surface that was asked, with `application/json`:
//! invalid bytes in a path parameter, a query parameter that does not parse, a body over the
//! limit on every route that reads one, and JSON bodies of the wrong syntax or shape (the field
//! at fault named). axum's own rejections for these are `text/plain`.

mod common;

use std::time::Duration;

use common::{Daemon, fake_model, sim_config};
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(20);

/// The three shapes, by surface.
#[derive(Clone, Copy, Debug)]
enum Shape {
    Management,
    OpenAi,
    Ollama,
}

/// Sends a request and checks that the answer is `status`, JSON, in `shape`; returns the message.
async fn expect_error(request: reqwest::RequestBuilder, status: u16, shape: Shape, what: &str) -> String {
    let response = request.timeout(DEADLINE).send().await.unwrap_or_else(|e| panic!("{what}: no answer: {e}"));
    assert_eq!(response.status().as_u16(), status, "{what}");
    let content_type =
        response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let text = response.text().await.unwrap_or_default();
    assert_eq!(content_type, "application/json", "{what}: {text}");
    let body: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{what}: not JSON: {text:?}"));
    let message = match shape {
        Shape::Management => {
            assert_eq!(body["error"]["code"], status, "{what}: {body}");
            body["error"]["message"].as_str()
        }
        Shape::OpenAi => {
            assert!(body["error"]["code"].is_string() && body["error"]["type"].is_string(), "{what}: {body}");
            body["error"]["message"].as_str()
        }
        Shape::Ollama => body["error"].as_str(),
    };
    let message = message.unwrap_or_else(|| panic!("{what}: no message in {body}")).to_string();
    assert!(!message.is_empty(), "{what}: {body}");
    message
}

fn daemon() -> Daemon {
    Daemon::start(|sim| {
        format!(
            "{}[proxy]\nmax_body = \"1MiB\"\n{}",
            sim_config(sim, 8192, "50ms", ""),
            fake_model(sim, "llm", 1000, "", "")
        )
    })
}

#[tokio::test]
async fn invalid_bytes_in_a_path_parameter_are_a_json_400_naming_it() {
    let daemon = daemon();
    let client = common::http::client();
    let url = |path: &str| format!("{}{path}", daemon.url);
    let cases = [
        (client.post(url("/vramgate/models/%FF/load")), "name"),
        (client.post(url("/vramgate/models/%FF/unload")), "name"),
        (client.get(url("/vramgate/models/%FF/logs")), "name"),
        (client.post(url("/vramgate/models/%FF/ack")).json(&json!({"session": "a", "seq": 1, "ok": true})), "name"),
        (client.post(url("/vramgate/models/%FF/attach")), "name"),
        (client.post(url("/vramgate/leases/%FF/renew")), "id"),
        (client.delete(url("/vramgate/leases/%FF")), "id"),
    ];
    for (request, parameter) in cases {
        let what = format!("{request:?}");
        let message = expect_error(request, 400, Shape::Management, &what).await;
        assert!(message.contains(&format!("`{parameter}`")), "{what}: names the parameter: {message}");
    }
}

#[tokio::test]
async fn a_query_parameter_that_does_not_parse_is_a_json_400_naming_it() {
    let daemon = daemon();
    let client = common::http::client();
    for (query, parameter) in [("tail=-1", "tail"), ("tail=lots", "tail"), ("follow=maybe", "follow")] {
        let request = client.get(format!("{}/vramgate/models/llm/logs?{query}", daemon.url));
        let message = expect_error(request, 400, Shape::Management, query).await;
        assert!(message.contains(&format!("`{parameter}`")), "{query}: names the parameter: {message}");
    }
    // A good query still works.
    let response = client.get(format!("{}/vramgate/models/llm/logs?tail=5", daemon.url)).send().await.unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn a_body_over_the_limit_is_a_json_413_on_every_route_that_reads_one() {
    let daemon = daemon();
    // Over the management limit (2 MiB) and over this daemon's proxy.max_body (1 MiB).
    let huge = json!({ "pad": "x".repeat(3 << 20) });
    let cases = [
        ("/vramgate/leases", Shape::Management),
        ("/vramgate/mode", Shape::Management),
        ("/vramgate/models/llm/ack", Shape::Management),
        ("/vramgate/models/llm/attach", Shape::Management),
        ("/v1/chat/completions", Shape::OpenAi),
        ("/v1/embeddings", Shape::OpenAi),
        ("/api/chat", Shape::Ollama),
        ("/api/generate", Shape::Ollama),
    ];
    for (path, shape) in cases {
        // A client of its own per request: the server answers without reading the rest and
        // closes the connection.
        let request = common::http::client().post(format!("{}{path}", daemon.url)).json(&huge);
        let message = expect_error(request, 413, shape, path).await;
        assert!(message.contains("larger than"), "{path}: {message}");
    }
}

#[tokio::test]
async fn json_bodies_of_the_wrong_syntax_or_shape_are_a_json_400_naming_the_field() {
    let daemon = daemon();
    let client = common::http::client();
    let post = |path: &str, body: &'static str| {
        client.post(format!("{}{path}", daemon.url)).header("content-type", "application/json").body(body)
    };
    let cases: [(&str, &'static str, &str); 7] = [
        ("/vramgate/leases", r#"{"vram": "1G", "device": "zero"}"#, "device"),
        ("/vramgate/leases", r#"{"vram": "lots"}"#, "vram"),
        ("/vramgate/leases", r#"{"vram": "1G", "colour": 1}"#, "colour"),
        ("/vramgate/leases", r#"{"vram": "1G""#, "line 1"),
        ("/vramgate/mode", r#"{"mode": 3}"#, "mode"),
        ("/vramgate/models/llm/ack", r#"{"session": "att-1", "seq": "one", "ok": true}"#, "seq"),
        ("/vramgate/models/llm/attach", r#"{"pid": -4}"#, "pid"),
    ];
    for (path, body, named) in cases {
        let what = format!("{path} {body}");
        let message = expect_error(post(path, body), 400, Shape::Management, &what).await;
        assert!(message.contains(named), "{what}: names {named}: {message}");
    }
}
