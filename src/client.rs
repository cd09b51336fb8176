//! The CLI's HTTP client for the daemon: one place for the base URL and for turning connection
//! failures and error bodies into messages a person can act on.

use anyhow::{Context, anyhow};
use futures_util::{Stream, StreamExt};

use crate::api::PREFIX;
use crate::arbiter::LeaseGrant;
use crate::config::{DEFAULT_LISTEN, TOKEN_ENV, Token, token_from_env};
use crate::events::Event;
use crate::status::{ModelStatus, Status};

/// The URL the CLI uses when neither `--url` nor `VRAMGATE_URL` says otherwise.
pub fn default_url() -> String {
    format!("http://{DEFAULT_LISTEN}")
}

/// A client for one daemon. Cheap to clone (the connection pool is shared).
#[derive(Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
    /// `VRAMGATE_TOKEN`, sent as `Authorization: Bearer …` on every request when set.
    token: Option<Token>,
}

impl Client {
    /// A client for the daemon at `base` (e.g. `http://127.0.0.1:9777`), authenticating with
    /// `VRAMGATE_TOKEN` when it is set.
    pub fn new(base: &str) -> anyhow::Result<Client> {
        let base = base.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(anyhow!("invalid --url {base:?}: expected http://HOST:PORT"));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .build()
            .context("cannot create the HTTP client")?;
        Ok(Client { base, http, token: token_from_env() })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{PREFIX}{path}", self.base)
    }

    async fn get(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        self.send(self.http.get(self.url(path))).await
    }

    async fn post_json(&self, path: &str, body: &serde_json::Value) -> anyhow::Result<reqwest::Response> {
        self.send(self.http.post(self.url(path)).json(body)).await
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let request = match &self.token {
            Some(token) => request.bearer_auth(token.secret()),
            None => request,
        };
        let request = request.build().context("cannot build the request")?;
        let url = request.url().to_string();
        let response = self.http.execute(request).await.map_err(|e| {
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
        if status == reqwest::StatusCode::UNAUTHORIZED {
            let message = match self.token {
                None => format!("the daemon requires a token: set {TOKEN_ENV} ({status} from {url})"),
                Some(_) => format!("the daemon rejected the token in {TOKEN_ENV} ({status} from {url})"),
            };
            return Err(DaemonRefused { status: status.as_u16(), message }.into());
        }
        let body = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or(body);
        Err(DaemonRefused { status: status.as_u16(), message: format!("{message} ({status} from {url})") }.into())
    }

    /// Loads a model and waits until it is ready; the model's status.
    pub async fn load(&self, model: &str) -> anyhow::Result<ModelStatus> {
        let response = self.post_json(&format!("/models/{}/load", encode(model)), &serde_json::json!({})).await?;
        response.json().await.context("unreadable answer from the daemon")
    }

    /// Unloads a model and waits until its memory is back: its status, and whether it was
    /// loaded at all (false: there was nothing to unload).
    pub async fn unload(&self, model: &str) -> anyhow::Result<(ModelStatus, bool)> {
        let response = self.post_json(&format!("/models/{}/unload", encode(model)), &serde_json::json!({})).await?;
        let answer: serde_json::Value = response.json().await.context("unreadable answer from the daemon")?;
        // A daemon from before `was_loaded` existed did unload something, or said nothing.
        let was_loaded = answer["was_loaded"].as_bool().unwrap_or(true);
        let status = serde_json::from_value(answer).context("unreadable answer from the daemon")?;
        Ok((status, was_loaded))
    }

    /// Applies a mode and waits until it is done; the models' states after it.
    pub async fn set_mode(&self, mode: &str) -> anyhow::Result<Vec<ModelStatus>> {
        let response = self.post_json("/mode", &serde_json::json!({ "mode": mode })).await?;
        let answer: serde_json::Value = response.json().await.context("unreadable answer from the daemon")?;
        serde_json::from_value(answer["models"].clone()).context("unreadable answer from the daemon")
    }

    /// Asks for a plan (`POST /vramgate/plan`) and waits for it, however long a measurement
    /// takes; the report as JSON.
    pub async fn plan(&self, body: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
        let response = self.post_json("/plan", body).await?;
        response.json().await.context("unreadable answer from the daemon")
    }

    /// The current mode and the modes defined (`GET /vramgate/mode`).
    pub async fn mode(&self) -> anyhow::Result<serde_json::Value> {
        self.get("/mode").await?.json().await.context("unreadable answer from the daemon")
    }

    /// Releases a lease.
    pub async fn release(&self, id: &str) -> anyhow::Result<()> {
        self.send(self.http.delete(self.url(&format!("/leases/{}", encode(id))))).await.map(|_| ())
    }

    /// A model's log: the last `tail` lines, then (with `follow`) new lines until interrupted.
    pub async fn logs(&self, model: &str, tail: usize, follow: bool) -> anyhow::Result<reqwest::Response> {
        self.get(&format!("/models/{}/logs?tail={tail}&follow={follow}", encode(model))).await
    }

    /// Asks for a lease held by this connection; returns the grant and the response whose body
    /// must be kept open (and read) for as long as the lease is wanted.
    pub async fn hold_lease(&self, request: &serde_json::Value) -> anyhow::Result<(LeaseGrant, reqwest::Response)> {
        let mut response = self.post_json("/leases", request).await?;
        let mut buffered = Vec::new();
        loop {
            let chunk = response.chunk().await.context("the lease stream broke off")?;
            let Some(chunk) = chunk else {
                return Err(anyhow!("the daemon closed the lease stream before granting it"));
            };
            buffered.extend_from_slice(&chunk);
            if let Some(end) = buffered.iter().position(|b| *b == b'\n') {
                let line: serde_json::Value =
                    serde_json::from_slice(&buffered[..end]).context("unreadable lease grant from the daemon")?;
                let grant: LeaseGrant =
                    serde_json::from_value(line["lease"].clone()).context("unreadable lease grant from the daemon")?;
                return Ok((grant, response));
            }
        }
    }

    /// The status document, parsed.
    pub async fn status(&self) -> anyhow::Result<Status> {
        self.get("/status").await?.json().await.context("unreadable status document from the daemon")
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

/// The daemon answered with an error; `status` is the HTTP status.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct DaemonRefused {
    /// HTTP status.
    pub status: u16,
    /// The daemon's message.
    pub message: String,
}

/// Percent-encodes a path segment (model ids may contain `:`, as Ollama's do).
fn encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The innermost error, which for a refused connection is the useful "Connection refused".
pub(crate) fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}
