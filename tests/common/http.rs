//! HTTP for tests, with a deadline on every request: a daemon that stops answering fails the test
//! that waits on it instead of hanging the suite.

use std::time::Duration;

/// How long one request may take, its whole body included (a per-request `.timeout(...)` set by
/// a test replaces it).
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(60);

/// A client whose requests end with an error after [`REQUEST_DEADLINE`].
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(REQUEST_DEADLINE).build().expect("an HTTP client")
}

/// `GET url` with [`REQUEST_DEADLINE`], in place of `reqwest::get`.
pub async fn get(url: impl reqwest::IntoUrl) -> reqwest::Result<reqwest::Response> {
    client().get(url).send().await
}
