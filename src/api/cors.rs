//! CORS, so browser apps on the allowed origins (`[server] cors_origins`; by default the
//! loopback and desktop-app origins Ollama allows) can call every surface.
//!
//! A request whose `Origin` is allowed: a preflight (`OPTIONS` with
//! `Access-Control-Request-Method`) is answered here, 204 with the `Access-Control-Allow-*`
//! headers, before authentication (a browser never sends credentials on a preflight); any other
//! request goes on and its answer carries `Access-Control-Allow-Origin`. A request from an origin
//! that is not allowed, or without one, passes through untouched: no CORS header at all, so the
//! browser refuses the answer to the page. (tower-http's `CorsLayer` answers every `OPTIONS` and
//! sends the allowed methods and headers to any origin, hence this small layer.)

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

#[cfg(test)]
use crate::config::{DEFAULT_CORS_ORIGINS, cors_origin_problem};

/// The methods a preflight is told the API accepts.
const ALLOWED_METHODS: &str = "GET, POST, DELETE, OPTIONS, HEAD";
/// The request headers a preflight is told are accepted when it names none.
const DEFAULT_ALLOWED_HEADERS: &str = "authorization, content-type";
/// The answer headers a page may read (beyond the CORS-safelisted ones).
const EXPOSED_HEADERS: &str = "retry-after, x-vramgate-model, www-authenticate";
/// How long a browser may cache a preflight's answer, in seconds.
const PREFLIGHT_MAX_AGE: &str = "600";

/// The allowed origins: exact origins, patterns with one `*` (any run of characters), or `*`
/// alone for every origin.
#[derive(Debug, Clone, Default)]
pub struct CorsOrigins {
    patterns: Arc<[String]>,
}

impl CorsOrigins {
    /// The origins `server.cors_origins` lists (already validated: see [`crate::config::cors_origin_problem`]).
    pub fn new(patterns: &[String]) -> CorsOrigins {
        CorsOrigins { patterns: patterns.iter().map(|p| p.trim_end_matches('/').to_string()).collect() }
    }

    /// Whether CORS is off (an empty list).
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether `origin` is allowed.
    pub fn allows(&self, origin: &str) -> bool {
        self.patterns.iter().any(|pattern| matches(pattern, origin))
    }

    /// The `Access-Control-Allow-Origin` value for `origin`: `*` when every origin is allowed,
    /// else the origin itself; `None` when it is not allowed.
    fn allow_origin(&self, origin: &HeaderValue) -> Option<HeaderValue> {
        let text = origin.to_str().ok()?;
        if self.patterns.iter().any(|p| p == "*") {
            return Some(HeaderValue::from_static("*"));
        }
        self.allows(text).then(|| origin.clone())
    }
}

/// Whether `origin` matches `pattern` (`*` alone: anything; one `*` inside: any run of
/// characters there; else equal, ASCII case-insensitively as origins compare).
fn matches(pattern: &str, origin: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern.eq_ignore_ascii_case(origin),
        Some((before, after)) => {
            origin.len() >= before.len() + after.len()
                && origin.get(..before.len()).is_some_and(|o| o.eq_ignore_ascii_case(before))
                && origin.get(origin.len() - after.len()..).is_some_and(|o| o.eq_ignore_ascii_case(after))
        }
    }
}

/// The middleware (see the module docs).
pub(super) async fn cors(State(origins): State<CorsOrigins>, request: Request, next: Next) -> Response {
    let Some(allowed) = request.headers().get(header::ORIGIN).and_then(|o| origins.allow_origin(o)) else {
        return next.run(request).await;
    };
    let is_preflight =
        request.method() == Method::OPTIONS && request.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    if is_preflight {
        let mut response = StatusCode::NO_CONTENT.into_response();
        let headers = response.headers_mut();
        let asked = request.headers().get(header::ACCESS_CONTROL_REQUEST_HEADERS).cloned();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allowed);
        headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static(ALLOWED_METHODS));
        // The headers the page asked for (it sends only what its request will carry); the
        // token is checked on the request itself, not here.
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            asked.unwrap_or(HeaderValue::from_static(DEFAULT_ALLOWED_HEADERS)),
        );
        headers.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static(PREFLIGHT_MAX_AGE));
        vary(headers, "origin, access-control-request-method, access-control-request-headers");
        return response;
    }
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allowed);
    headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static(EXPOSED_HEADERS));
    vary(headers, "origin");
    response
}

/// Adds to `Vary` (a cache must not give one origin's answer to another).
fn vary(headers: &mut HeaderMap, value: &'static str) {
    headers.append(header::VARY, HeaderValue::from_static(value));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origins(list: &[&str]) -> CorsOrigins {
        CorsOrigins::new(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn the_defaults_allow_loopback_on_any_port_and_app_schemes_only() {
        let defaults = origins(DEFAULT_CORS_ORIGINS);
        for allowed in ["http://localhost", "http://localhost:3000", "https://127.0.0.1:8443", "app://obsidian.md"] {
            assert!(defaults.allows(allowed), "{allowed}");
        }
        for refused in ["https://evil.example", "http://localhost.evil.example", "http://10.0.0.1:3000", "null"] {
            assert!(!defaults.allows(refused), "{refused}");
        }
    }

    #[test]
    fn a_star_allows_everything_and_an_exact_origin_only_itself() {
        assert!(origins(&["*"]).allows("https://anything.example"));
        let exact = origins(&["https://chat.example/"]);
        assert!(exact.allows("https://chat.example"));
        assert!(!exact.allows("https://chat.example:444"));
        assert!(!origins(&[]).allows("http://localhost"));
    }

    #[test]
    fn bad_patterns_are_named() {
        assert_eq!(cors_origin_problem("*"), None);
        assert_eq!(cors_origin_problem("http://localhost:*"), None);
        assert!(cors_origin_problem("").is_some());
        assert!(cors_origin_problem("localhost").is_some_and(|p| p.contains("not an origin")));
        assert!(cors_origin_problem("http://*.x:*").is_some_and(|p| p.contains("more than one")));
        assert!(cors_origin_problem("http://x/path").is_some_and(|p| p.contains("without a path")));
    }
}
