//! The Ollama backend: a model inside a running Ollama, loaded and released through its HTTP API.
//!
//! vramgate owns the idle TTL, so a load asks Ollama to keep the model forever (`keep_alive: -1`)
//! and a release asks it to unload at once (`keep_alive: 0`), then waits until `/api/ps` no longer
//! lists it. What a loaded model costs is read from `/api/ps` (`size_vram`). These functions only
//! talk HTTP; the arbiter decides when to call them and what the answers mean.

use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Map, Value, json};

/// How often a release polls `/api/ps` while the model is still listed.
const RELEASE_POLL: Duration = Duration::from_millis(20);

/// One entry of Ollama's `GET /api/ps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OllamaLoaded {
    /// The model's name as Ollama lists it (`llama3.2:3b`).
    pub name: String,
    /// GPU memory it holds, in MiB (rounded up).
    pub vram_mib: u64,
    /// All memory it holds (GPU and CPU), in MiB (rounded up).
    pub size_mib: u64,
}

#[derive(Deserialize)]
struct PsAnswer {
    #[serde(default)]
    models: Vec<PsModel>,
}

#[derive(Deserialize)]
struct PsModel {
    #[serde(default)]
    name: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    size_vram: u64,
}

fn mib_up(bytes: u64) -> u64 {
    bytes.div_ceil(1024 * 1024)
}

/// Whether two Ollama model names mean the same model (`llama3` is `llama3:latest`).
pub fn same_model(a: &str, b: &str) -> bool {
    let full = |name: &str| if name.contains(':') { name.to_string() } else { format!("{name}:latest") };
    full(a) == full(b)
}

/// What Ollama at `url` has loaded now.
pub async fn ps(http: &reqwest::Client, url: &str, timeout: Duration) -> Result<Vec<OllamaLoaded>, String> {
    let response = http
        .get(format!("{url}/api/ps"))
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| format!("cannot reach Ollama at {url}: {}", crate::client::root_cause(&e)))?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("Ollama at {url} answered /api/ps with {status}"));
    }
    let answer: PsAnswer =
        response.json().await.map_err(|e| format!("Ollama at {url} sent an unreadable /api/ps answer: {e}"))?;
    Ok(answer
        .models
        .into_iter()
        .map(|m| OllamaLoaded {
            name: if m.name.is_empty() { m.model } else { m.name },
            vram_mib: mib_up(m.size_vram),
            size_mib: mib_up(m.size),
        })
        .collect())
}

/// `POST /api/generate` with no prompt: Ollama's way to load or unload a model.
async fn generate(http: &reqwest::Client, url: &str, body: Value, timeout: Duration) -> Result<(), String> {
    let response = http
        .post(format!("{url}/api/generate"))
        .json(&body)
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| format!("cannot reach Ollama at {url}: {}", crate::client::root_cause(&e)))?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let text = response.text().await.unwrap_or_default();
    // Ollama's errors are `{"error": "..."}`; show the message, else the raw text.
    let message =
        serde_json::from_str::<Value>(&text).ok().and_then(|v| v["error"].as_str().map(str::to_string)).unwrap_or(text);
    Err(format!("Ollama at {url} answered {status}: {}", message.trim()))
}

/// Loads `name` and keeps it loaded until vramgate releases it. `cpu` asks for the CPU form
/// (`num_gpu = 0`).
pub async fn load(
    http: &reqwest::Client,
    url: &str,
    name: &str,
    options: &Map<String, Value>,
    cpu: bool,
    timeout: Duration,
) -> Result<(), String> {
    let mut options = options.clone();
    if cpu {
        options.insert("num_gpu".into(), json!(0));
    }
    let mut body = json!({ "model": name, "keep_alive": -1 });
    if !options.is_empty() {
        body["options"] = Value::Object(options);
    }
    generate(http, url, body, timeout).await
}

/// Asks Ollama to unload `name`, then waits (up to `limit`) until `/api/ps` no longer lists it.
/// `Ok(false)`: still listed when the time was up.
pub async fn unload(http: &reqwest::Client, url: &str, name: &str, limit: Duration) -> Result<bool, String> {
    let started = Instant::now();
    generate(http, url, json!({ "model": name, "keep_alive": 0 }), limit.max(Duration::from_secs(1))).await?;
    loop {
        let loaded = ps(http, url, Duration::from_secs(2)).await?;
        if !loaded.iter().any(|m| same_model(&m.name, name)) {
            return Ok(true);
        }
        if started.elapsed() >= limit {
            return Ok(false);
        }
        tokio::time::sleep(RELEASE_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_without_a_tag_mean_latest() {
        assert!(same_model("llama3", "llama3:latest"));
        assert!(same_model("llama3.2:3b", "llama3.2:3b"));
        assert!(!same_model("llama3.2:3b", "llama3.2:1b"));
        assert!(!same_model("llama3", "llama3:8b"));
    }

    #[test]
    fn sizes_round_up_to_whole_mib() {
        assert_eq!(mib_up(0), 0);
        assert_eq!(mib_up(1), 1);
        assert_eq!(mib_up(1024 * 1024), 1);
        assert_eq!(mib_up(1024 * 1024 + 1), 2);
    }
}
