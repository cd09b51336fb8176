//! End-to-end: Ollama-backed models through the real daemon, against `vramgate-fake-ollama` (which
//! implements `/api/ps`, `/api/generate` load and unload, `/api/chat` and claims sim VRAM).

mod common;

use std::path::Path;
use std::time::Duration;

use common::ollama::FakeOllama;
use common::{Daemon, model_in as model, sim_config};
use serde_json::{Value, json};

const SECOND: Duration = Duration::from_secs(1);

fn start(sim_dir: &Path, ollama: &FakeOllama) -> Daemon {
    let url = ollama.url.clone();
    let sim_dir = sim_dir.to_path_buf();
    Daemon::start(move |_| {
        format!(
            "{}[models.llama]\nbackend = \"ollama\"\nollama_model = \"llama3.2:3b\"\nurl = \"{url}\"\noptions = {{ num_ctx = 8192 }}\n",
            sim_config(&sim_dir, 8000, "50ms", "reserve_mib = 0")
        )
    })
}

#[tokio::test]
async fn an_ollama_model_loads_and_releases_through_vramgate_with_its_footprint_from_api_ps() {
    let sim = tempfile::tempdir().unwrap();
    let ollama = FakeOllama::start(sim.path());
    let daemon = start(sim.path(), &ollama);
    let (code, body) = daemon.load("llama").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["backend"], "ollama");
    let status =
        daemon.wait_for_status(5 * SECOND, "llama's footprint", |s| model(s, "llama")["vram_mib"] == 2048).await;
    assert_eq!(model(&status, "llama")["upstream"].as_str(), Some(ollama.url.as_str()));
    assert_eq!(status["ollama"][0]["models"][0]["managed_as"], "llama");
    // Its memory (claimed by the fake's pid) is counted as llama, not also as foreign: 2048 of 8000
    // used, and a lease of the remaining 5952 fits at once.
    let lease = daemon.post("/vramgate/leases", json!({"vram": "5952MiB", "holder": "t", "wait": "0"})).await;
    assert_eq!(lease.0, 201, "{}", lease.1);

    // vramgate owns the TTL: the load asked Ollama to keep the model forever, with the options.
    let requests = ollama.get("/fake/requests").await;
    let load = requests.as_array().unwrap().iter().find(|r| r["path"] == "/api/generate").expect("a load");
    assert_eq!(load["body"]["keep_alive"], -1);
    assert_eq!(load["body"]["options"]["num_ctx"], 8192);

    let response =
        common::http::client().delete(format!("{}/vramgate/leases/{}", daemon.url, lease.1["id"].as_str().unwrap()));
    assert_eq!(response.send().await.unwrap().status(), 204);
    let (code, body) = daemon.unload("llama").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["state"], "unloaded");
    assert_eq!(ollama.get("/api/ps").await["models"], json!([]));
    let requests = ollama.get("/fake/requests").await;
    assert!(requests.as_array().unwrap().iter().any(|r| r["body"]["keep_alive"] == 0), "{requests}");
}

#[tokio::test]
async fn a_model_loaded_into_ollama_directly_shows_up_as_ollamas() {
    let sim = tempfile::tempdir().unwrap();
    let ollama = FakeOllama::start(sim.path());
    let daemon = start(sim.path(), &ollama);
    let loaded = common::http::client()
        .post(format!("{}/api/generate", ollama.url))
        .json(&json!({"model": "tiny"}))
        .send()
        .await
        .unwrap();
    assert_eq!(loaded.status(), 200);
    let status = daemon
        .wait_for_status(5 * SECOND, "tiny in Ollama's list", |s| {
            s["ollama"][0]["models"].as_array().is_some_and(|m| m.iter().any(|m| m["name"] == "tiny:latest"))
        })
        .await;
    let entry = &status["ollama"][0]["models"][0];
    assert_eq!((entry["vram_mib"].as_u64(), entry["managed_as"].as_str()), (Some(300), None));
    assert_eq!(status["ollama"][0]["reachable"], true);
    assert_eq!(model(&status, "llama")["state"], "unloaded");
}

#[tokio::test]
async fn ollama_down_fails_its_models_and_degrades_then_recovers_by_itself() {
    let sim = tempfile::tempdir().unwrap();
    let ollama = FakeOllama::start(sim.path());
    let port = ollama.port();
    let daemon = start(sim.path(), &ollama);
    assert_eq!(daemon.load("llama").await.0, 200);
    let mut events = daemon.events().await;

    ollama.stop();
    let status = daemon.wait_for_status(10 * SECOND, "llama failed", |s| model(s, "llama")["state"] == "failed").await;
    assert_eq!(status["degraded"], true);
    let reasons = status["degraded_reasons"].to_string();
    assert!(reasons.contains("Ollama at") && reasons.contains("does not answer"), "{reasons}");
    assert!(model(&status, "llama")["note"].as_str().unwrap_or_default().contains("cannot reach Ollama"), "{status}");
    let event = events.next_of("ollama_reachability", 5 * SECOND).await;
    assert_eq!(event["reachable"], false);
    // A request meanwhile fails fast with the reason rather than hanging.
    let (code, body) = daemon.load("llama").await;
    assert_eq!(code, 502, "{body}");

    let _back = FakeOllama::start_with(sim.path(), port, &[]);
    let status = daemon
        .wait_for_status(15 * SECOND, "recovery", |s| {
            s["degraded"] == false && model(s, "llama")["state"] == "unloaded"
        })
        .await;
    assert!(model(&status, "llama")["note"].is_null(), "{status}");
    let event = events.next_of("ollama_reachability", 5 * SECOND).await;
    assert_eq!(event["reachable"], true);
    let (code, body) = daemon.load("llama").await;
    assert_eq!(code, 200, "{body}");
}

#[tokio::test]
async fn openai_requests_for_an_ollama_model_go_to_ollama_under_its_name() {
    let sim = tempfile::tempdir().unwrap();
    let ollama = FakeOllama::start(sim.path());
    let daemon = start(sim.path(), &ollama);
    let response = common::http::client()
        .post(format!("{}/v1/chat/completions", daemon.url))
        .json(&json!({"model": "llama", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-vramgate-model"], "llama");
    let answer: Value = response.json().await.unwrap();
    assert!(answer["choices"][0]["message"]["content"].as_str().is_some_and(|c| !c.is_empty()), "{answer}");
    let requests = ollama.get("/fake/requests").await;
    let forwarded =
        requests.as_array().unwrap().iter().find(|r| r["path"] == "/v1/chat/completions").expect("forwarded");
    assert_eq!(forwarded["body"]["model"], "llama3.2:3b");
}

#[tokio::test]
async fn a_mode_places_an_ollama_model_on_the_cpu_with_num_gpu_zero_and_back() {
    let sim = tempfile::tempdir().unwrap();
    let ollama = FakeOllama::start(sim.path());
    let url = ollama.url.clone();
    let sim_dir = sim.path().to_path_buf();
    let daemon = Daemon::start(move |_| {
        format!(
            "{}[models.llama]\nbackend = \"ollama\"\nollama_model = \"llama3.2:3b\"\nurl = \"{url}\"\n\
             [modes.quiet]\ncpu = [\"llama\"]\n[modes.busy]\ngpu = [\"llama\"]\n",
            sim_config(&sim_dir, 8000, "50ms", "reserve_mib = 0")
        )
    });
    let (code, body) = daemon.post("/vramgate/mode", json!({"mode": "busy"})).await;
    assert_eq!(code, 200, "{body}");
    daemon.wait_for_status(5 * SECOND, "llama on the GPU at 2048", |s| model(s, "llama")["vram_mib"] == 2048).await;

    let (code, body) = daemon.post("/vramgate/mode", json!({"mode": "quiet"})).await;
    assert_eq!(code, 200, "{body}");
    let status = daemon.status().await;
    assert_eq!(
        (model(&status, "llama")["state"].as_str(), model(&status, "llama")["placement"].as_str()),
        (Some("ready"), Some("cpu"))
    );
    assert_eq!(model(&status, "llama")["vram_mib"], 0, "on the CPU it counts no GPU memory");
    let listed = ollama.get("/api/ps").await;
    assert_eq!(listed["models"][0]["size_vram"], 0, "{listed}");
    let requests = ollama.get("/fake/requests").await;
    let last_load = requests.as_array().unwrap().iter().rev().find(|r| r["body"]["keep_alive"] == -1).unwrap();
    assert_eq!(last_load["body"]["options"]["num_gpu"], 0);

    let (code, body) = daemon.post("/vramgate/mode", json!({"mode": "busy"})).await;
    assert_eq!(code, 200, "{body}");
    let status = daemon.status().await;
    assert_eq!(model(&status, "llama")["placement"], "gpu");
    assert!(ollama.get("/api/ps").await["models"][0]["size_vram"].as_u64().unwrap_or(0) > 0);
}
