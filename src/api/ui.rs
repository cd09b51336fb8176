//! The web dashboard at `/ui/`: a page, its script and style, and the vendored uPlot (MIT,
//! `ui/vendor/uPlot.LICENSE`), all embedded in the binary, so running it needs no build step and
//! reads no file. The page reads the same API as everyone else (`/vramgate/status`, `/events`,
//! `/history`, load and unload, modes), with the token when the daemon has one.
//!
//! The files hold no data, so they are served without the token; a browser asking for `/`
//! (`Accept: text/html`) is redirected here before the token check, while `curl /` keeps its
//! text list.

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

use super::AppState;
use super::error::{ApiError, PathParam, Rejection};

/// Where the dashboard lives.
pub const UI_PATH: &str = "/ui/";

/// Every file the page loads: name, content type, bytes.
const ASSETS: &[(&str, &str, &[u8])] = &[
    ("index.html", "text/html; charset=utf-8", include_bytes!("ui/index.html")),
    ("app.js", "text/javascript; charset=utf-8", include_bytes!("ui/app.js")),
    ("app.css", "text/css; charset=utf-8", include_bytes!("ui/app.css")),
    ("uPlot.iife.min.js", "text/javascript; charset=utf-8", include_bytes!("ui/vendor/uPlot.iife.min.js")),
    ("uPlot.min.css", "text/css; charset=utf-8", include_bytes!("ui/vendor/uPlot.min.css")),
    ("uPlot.LICENSE", "text/plain; charset=utf-8", include_bytes!("ui/vendor/uPlot.LICENSE")),
];

/// Scripts only from the daemon itself; uPlot sizes its elements through inline styles.
const CONTENT_SECURITY_POLICY: &str =
    "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'";

/// The dashboard's routes (outside the token check: see the module's doc).
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent(UI_PATH) }))
        .route(UI_PATH, get(|| async { asset("index.html") }))
        .route("/ui/{file}", get(file))
}

async fn file(PathParam(name): PathParam) -> Response {
    asset(&name)
}

fn asset(name: &str) -> Response {
    let Some((_, content_type, bytes)) = ASSETS.iter().find(|(file, _, _)| *file == name) else {
        let path = format!("{UI_PATH}{name}");
        return ApiError::from(Rejection::NoRoute { path: path.clone() }).render_for(&path);
    };
    let mut response = bytes.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // The files change with the binary: revalidate rather than keep an old page after an upgrade.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    response
}

/// Sends a browser's `GET /` to the dashboard; everything else passes on.
pub(super) async fn redirect_browsers(request: Request, next: Next) -> Response {
    let wants_html = request
        .headers()
        .get(header::ACCEPT)
        .and_then(|accept| accept.to_str().ok())
        .is_some_and(|accept| accept.contains("text/html"));
    if request.method() == Method::GET && request.uri().path() == "/" && wants_html {
        return Redirect::to(UI_PATH).into_response();
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes of every file the page loads on its first visit (the page weight, uncompressed).
    fn page_weight() -> usize {
        ASSETS.iter().filter(|(name, _, _)| !name.ends_with("LICENSE")).map(|(_, _, bytes)| bytes.len()).sum()
    }

    #[test]
    fn every_asset_the_page_names_is_served_and_the_page_stays_light() {
        let page = std::str::from_utf8(include_bytes!("ui/index.html")).expect("utf-8");
        for (name, _, bytes) in ASSETS {
            assert!(!bytes.is_empty(), "{name} is empty");
            if !name.ends_with("LICENSE") && *name != "index.html" {
                assert!(page.contains(&format!("\"{name}\"")), "index.html does not load {name}");
            }
        }
        // uPlot is about 50 KB; the page's own files must stay small beside it.
        assert!(page_weight() < 150_000, "the page weighs {} bytes", page_weight());
    }
}
