//! The CLI's HTTP client for the daemon: one place for the base URL and for turning connection
//! failures and error bodies into messages a person can act on.

use anyhow::{Context, anyhow};
use futures_util::{Stream, StreamExt};

use crate::api::PREFIX;
use crate::config::DEFAULT_LISTEN;
use crate::events::Event;

/// The URL the CLI uses when neither `--url` nor `VRAMGATE_URL` says otherwise.
pub fn default_url() -> String {
    format!("http://{DEFAULT_LISTEN}")
}

/// A client for one daemon.
pub struct Client {
    base: String,
    http: reqwest::Client,
}

impl Client {
    /// A client for the daemon at `base` (e.g. `http://127.0.0.1:9777`).
    pub fn new(base: &str) -> anyhow::Result<Client> {
        let base = base.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(anyhow!("invalid --url {base:?}: expected http://HOST:PORT"));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .build()
            .context("cannot create the HTTP client")?;
        Ok(Client { base, http })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{PREFIX}{path}", self.base)
    }

    async fn get(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        let url = self.url(path);
        let response = self.http.get(&url).send().await.map_err(|e| {
            anyhow!(
                "cannot reach vramgate at {}: {}. Is `vramgate serve` running? (set --url or VRAMGATE_URL)",
                self.base,
                root_cause(&e)
            )
        })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or(body);
        Err(anyhow!("vramgate at {} answered {status} for {url}: {message}", self.base))
    }

    /// The status document, exactly as the daemon sent it.
    pub async fn status_text(&self) -> anyhow::Result<String> {
        self.get("/status").await?.text().await.context("status response broke off")
    }

    /// The event stream, one event at a time, until the daemon closes it.
    pub async fn events(&self) -> anyhow::Result<impl Stream<Item = anyhow::Result<(String, Event)>>> {
        let response = self.get("/events").await?;
        let stream = eventsource_stream::EventStream::new(response.bytes_stream()).map(|item| {
            let message = item.map_err(|e| anyhow!("event stream broke off: {e}"))?;
            let event: Event = serde_json::from_str(&message.data)
                .with_context(|| format!("unreadable event from the daemon: {}", message.data))?;
            Ok((message.data, event))
        });
        Ok(stream)
    }
}

/// The innermost error, which for a refused connection is the useful "Connection refused".
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}
