//! Bearer-token authentication: with `server.token` (or `VRAMGATE_TOKEN`) set, every route but
//! `/vramgate/health` requires `Authorization: Bearer TOKEN`, and a missing or wrong token is
//! answered 401 in the shape of the surface that was asked (OpenAI under `/v1/`, Ollama under
//! `/api/`, the management shape elsewhere), with `WWW-Authenticate: Bearer`.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;

use crate::config::Token;

/// The middleware: passes the request on when it carries the token, else answers 401.
pub(super) async fn require_token(State(token): State<Arc<Token>>, mut request: Request, next: Next) -> Response {
    match presented_token(request.headers()) {
        Some(presented) if tokens_match(presented.as_bytes(), token.secret().as_bytes()) => {
            // The credential is vramgate's own: it must never travel on to a model server (an
            // Ollama may be another host, over plain http).
            request.headers_mut().remove(header::AUTHORIZATION);
            next.run(request).await
        }
        presented => {
            let message = if presented.is_some() {
                "the token is wrong: send the daemon's token as `Authorization: Bearer TOKEN` (VRAMGATE_TOKEN for the CLI)"
            } else {
                "the daemon requires a token: send `Authorization: Bearer TOKEN` (set VRAMGATE_TOKEN for the CLI \
                 and the Python client; an OpenAI client's API key)"
            };
            unauthorized(request.uri().path(), message)
        }
    }
}

/// The credential of an `Authorization: Bearer …` header (the scheme is case-insensitive, as
/// RFC 9110 says), if there is one.
fn presented_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, credential) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| credential.trim())
}

/// Compares without stopping at the first differing byte, so the answer's timing does not tell
/// an attacker how much of a guess was right (only whether its length was). A fold over the XOR
/// of the bytes does this without a dependency; `black_box` keeps the compiler from turning it
/// back into an early-exit comparison.
fn tokens_match(presented: &[u8], expected: &[u8]) -> bool {
    if presented.len() != expected.len() {
        return false;
    }
    let difference = presented.iter().zip(expected).fold(0u8, |acc, (a, b)| acc | std::hint::black_box(a ^ b));
    difference == 0
}

/// The 401 in the shape of the surface `path` belongs to.
fn unauthorized(path: &str, message: &str) -> Response {
    let mut response = super::surface_error(path, StatusCode::UNAUTHORIZED, message, "invalid_api_key");
    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).expect("header value"));
        headers
    }

    #[test]
    fn bearer_credential_is_read_case_insensitively() {
        assert_eq!(presented_token(&headers("Bearer s3cret")), Some("s3cret"));
        assert_eq!(presented_token(&headers("bearer s3cret")), Some("s3cret"));
        assert_eq!(presented_token(&headers("Basic czNjcmV0")), None);
        assert_eq!(presented_token(&headers("Bearer")), None);
        assert_eq!(presented_token(&HeaderMap::new()), None);
    }

    #[test]
    fn tokens_match_only_when_equal() {
        assert!(tokens_match(b"s3cret", b"s3cret"));
        assert!(!tokens_match(b"s3creT", b"s3cret"));
        assert!(!tokens_match(b"s3cre", b"s3cret"));
        assert!(!tokens_match(b"", b"s3cret"));
        assert!(!tokens_match(b"s3crets", b"s3cret"));
    }

    async fn body_json(response: Response) -> serde_json::Value {
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16).await.expect("body");
        serde_json::from_slice(&bytes).expect("json body")
    }

    #[tokio::test]
    async fn each_surface_gets_its_own_error_shape() {
        let openai = unauthorized("/v1/chat/completions", "no");
        assert_eq!(openai.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(openai.headers()[header::WWW_AUTHENTICATE], "Bearer");
        let body = body_json(openai).await;
        assert_eq!(body["error"]["code"], "invalid_api_key");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["message"], "no");

        let ollama = unauthorized("/api/chat", "no");
        assert_eq!(ollama.headers()[header::WWW_AUTHENTICATE], "Bearer");
        assert_eq!(body_json(ollama).await, serde_json::json!({ "error": "no" }));

        let manage = unauthorized("/vramgate/status", "no");
        assert_eq!(manage.headers()[header::WWW_AUTHENTICATE], "Bearer");
        assert_eq!(body_json(manage).await, serde_json::json!({ "error": { "message": "no", "code": 401 } }));
    }
}
