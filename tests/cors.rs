//! End-to-end: CORS (`[server] cors_origins`). Browser pages on the allowed origins (by default
//! the loopback and app origins Ollama allows) get their preflights answered on every surface,
//! before the token check, and `Access-Control-Allow-Origin` on every answer; other origins get
//! no CORS header at all; `"*"` allows any; a malformed origin is a config error.

mod common;

use common::{Daemon, sim_config};
use reqwest::header::HeaderMap;

fn start(server: &str) -> Daemon {
    let server = server.to_string();
    Daemon::start(move |sim| format!("[server]\n{server}\n{}", sim_config(sim, 10000, "50ms", "reserve_mib = 0")))
}

/// A browser's preflight for a POST with a token and a JSON body from `origin`.
async fn preflight(daemon: &Daemon, path: &str, origin: &str) -> (u16, HeaderMap) {
    let response = common::http::client()
        .request(reqwest::Method::OPTIONS, format!("{}{path}", daemon.url))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "authorization, content-type")
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.headers().clone())
}

async fn get_from(daemon: &Daemon, path: &str, origin: &str, token: Option<&str>) -> (u16, HeaderMap) {
    let mut request = common::http::client().get(format!("{}{path}", daemon.url)).header("origin", origin);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.headers().clone())
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// No header a browser would read as permission.
fn assert_no_cors(headers: &HeaderMap, what: &str) {
    for name in headers.keys() {
        assert!(!name.as_str().starts_with("access-control-"), "{what}: {name} was sent: {headers:?}");
    }
}

const SURFACES: [&str; 4] = ["/v1/chat/completions", "/api/chat", "/vramgate/leases", "/v1/models"];

#[tokio::test]
async fn loopback_origins_are_allowed_by_default_on_every_surface_before_the_token_check() {
    let daemon = start("token = \"s3cret\"");
    for origin in ["http://localhost:3000", "http://127.0.0.1:8080", "http://localhost", "app://obsidian.md"] {
        for path in SURFACES {
            let (status, headers) = preflight(&daemon, path, origin).await;
            assert_eq!(status, 204, "{origin} {path}: {headers:?}");
            assert_eq!(header(&headers, "access-control-allow-origin"), Some(origin), "{path}");
            let methods = header(&headers, "access-control-allow-methods").unwrap_or_default();
            assert!(methods.contains("POST") && methods.contains("GET"), "{path}: {methods}");
            assert_eq!(header(&headers, "access-control-allow-headers"), Some("authorization, content-type"));
            assert!(header(&headers, "vary").is_some_and(|v| v.contains("origin")), "{headers:?}");
        }
        // The answers themselves carry the origin, the 401 of a page without the token too (so
        // the page can read why).
        let (status, headers) = get_from(&daemon, "/api/tags", origin, Some("s3cret")).await;
        assert_eq!(status, 200);
        assert_eq!(header(&headers, "access-control-allow-origin"), Some(origin));
        let (status, headers) = get_from(&daemon, "/v1/models", origin, None).await;
        assert_eq!(status, 401);
        assert_eq!(header(&headers, "access-control-allow-origin"), Some(origin));
    }
}

#[tokio::test]
async fn other_origins_get_no_cors_headers() {
    let daemon = start("");
    for origin in ["https://evil.example", "http://localhost.evil.example", "http://192.168.1.5:3000", "null"] {
        for path in SURFACES {
            let (status, headers) = preflight(&daemon, path, origin).await;
            assert_ne!(status, 204, "{origin} {path}");
            assert_no_cors(&headers, &format!("preflight from {origin} to {path}"));
        }
        let (status, headers) = get_from(&daemon, "/api/tags", origin, None).await;
        assert_eq!(status, 200);
        assert_no_cors(&headers, &format!("GET from {origin}"));
    }
    // A request without an Origin (curl, an SDK) is not a CORS request.
    let response = common::http::get(format!("{}/api/tags", daemon.url)).await.unwrap();
    assert_no_cors(response.headers(), "GET without an origin");
}

#[tokio::test]
async fn configured_origins_replace_the_defaults_and_a_star_allows_any() {
    let daemon = start("cors_origins = [\"https://chat.example\", \"http://*.lan:8080\"]");
    for origin in ["https://chat.example", "http://box.lan:8080"] {
        let (status, headers) = preflight(&daemon, "/api/chat", origin).await;
        assert_eq!(status, 204, "{origin}");
        assert_eq!(header(&headers, "access-control-allow-origin"), Some(origin));
    }
    let (_, headers) = preflight(&daemon, "/api/chat", "http://localhost:3000").await;
    assert_no_cors(&headers, "the default origins are replaced");
    drop(daemon);

    let daemon = start("cors_origins = [\"*\"]");
    let (status, headers) = preflight(&daemon, "/v1/embeddings", "https://anything.example").await;
    assert_eq!(status, 204);
    assert_eq!(header(&headers, "access-control-allow-origin"), Some("*"));
    let (_, headers) = get_from(&daemon, "/vramgate/status", "https://anything.example", None).await;
    assert_eq!(header(&headers, "access-control-allow-origin"), Some("*"));
    drop(daemon);

    let daemon = start("cors_origins = []");
    let (_, headers) = preflight(&daemon, "/api/chat", "http://localhost:3000").await;
    assert_no_cors(&headers, "an empty list turns CORS off");
}

#[test]
fn a_malformed_origin_is_a_config_error_naming_the_entry() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (origins, says) in [
        ("[\"http://localhost:3000\", \"localhost\"]", "is not an origin"),
        ("[\"http://*.x:*\"]", "more than one `*`"),
        ("[\"https://chat.example/app\"]", "without a path"),
    ] {
        let path = dir.path().join("vramgate.toml");
        std::fs::write(&path, format!("[server]\ncors_origins = {origins}\n")).expect("write");
        let output = common::output(common::vramgate().args(["config", "check"]).arg(&path));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{origins}: {stderr}");
        assert!(stderr.contains("server.cors_origins") && stderr.contains(says), "{origins}: {stderr}");
    }
}
