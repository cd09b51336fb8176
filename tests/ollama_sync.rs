//! End-to-end: keeping in step with Ollama. Models are adopted from `/api/ps` only under their own
//! entry (and a load waiting for an adopted model is answered); an Ollama that does not answer is
//! retried with a doubling pause; one that pauses and returns does not keep vramgate's model
//! loaded behind its back. Each test written in review against a bug says in its doc comment what
//! used to go wrong.

mod common;

use std::io::Read;
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::ollama::FakeOllama;
use common::sim_daemon::on_8000_mib as start;
use common::{Daemon, model_in as model, never_within, sim_config};
use serde_json::json;

const SECOND: Duration = Duration::from_secs(1);

/// `adopt_ollama` (`on_ollama_ps`, the `(Unloaded | Failed, Some(entry))` arm) adopts any
/// configured model whose `ollama_model` Ollama lists, even when that entry is already another
/// vramgate model's. Two models on the same Ollama model (the same weights with different
/// `options`, a common setup): loading one makes the other `ready` two seconds later without
/// anyone asking, and the one Ollama runner's 2048 MiB is counted twice (as both models, and
/// subtracted twice from foreign use), so admission refuses memory that is free.
#[tokio::test]
async fn a_model_nobody_loaded_is_not_adopted_from_another_models_ollama_entry() {
    let sim = tempfile::tempdir().unwrap();
    let ollama = FakeOllama::start(sim.path());
    let (url, sim_dir) = (ollama.url.clone(), sim.path().to_path_buf());
    let daemon = Daemon::start(move |_| {
        format!(
            "{}[models.llama]\nbackend = \"ollama\"\nollama_model = \"llama3.2:3b\"\nurl = \"{url}\"\n\
             [models.llama-long]\nbackend = \"ollama\"\nollama_model = \"llama3.2:3b\"\nurl = \"{url}\"\n\
             options = {{ num_ctx = 32768 }}\n",
            sim_config(&sim_dir, 8000, "50ms", "reserve_mib = 0")
        )
    });
    let (code, body) = daemon.load("llama").await;
    assert_eq!(code, 200, "{body}");
    daemon.wait_for_status(5 * SECOND, "llama's footprint", |s| model(s, "llama")["vram_mib"] == 2048).await;
    never_within(&daemon, 4 * SECOND, "llama-long, which nobody loaded, became ready on llama's Ollama entry", |s| {
        model(s, "llama-long")["state"] == "ready"
    })
    .await;
    // 2048 of 8000 used: 5900 more fit.
    let (code, body) = daemon.post("/vramgate/leases", json!({"vram": "5900MiB", "holder": "t", "wait": "0"})).await;
    assert_eq!(code, 201, "{body}");
}

/// `adopt_ollama` makes a model `ready` without answering the callers waiting for it
/// (`ready_waiters`; compare `on_load_finished`, which calls `answer_ready`). A load queued
/// behind a lease, whose model then appears in Ollama (loaded there by hand, or by anything
/// else), is adopted, and its queued load is dropped from the queue as stale (`policy_request`
/// returns `None` for a ready model), but the caller hears nothing until `queue_timeout`, and then
/// gets a 503 "timed out" for a model that has been ready all along.
#[tokio::test]
async fn a_load_waiting_in_the_queue_is_answered_when_its_ollama_model_is_adopted() {
    let sim = tempfile::tempdir().unwrap();
    let ollama = FakeOllama::start(sim.path());
    let (url, sim_dir) = (ollama.url.clone(), sim.path().to_path_buf());
    let daemon = Daemon::start(move |_| {
        format!(
            "{}[scheduler]\nqueue_timeout = \"12s\"\n\
             [models.llama]\nbackend = \"ollama\"\nollama_model = \"llama3.2:3b\"\nurl = \"{url}\"\n",
            sim_config(&sim_dir, 16000, "50ms", "reserve_mib = 0")
        )
    });
    // 1500 MiB left: llama (2048) must wait.
    let (code, body) =
        daemon.post("/vramgate/leases", json!({"vram": "14500MiB", "holder": "job", "ttl": "60s"})).await;
    assert_eq!(code, 201, "{body}");
    let mut events = daemon.events().await;
    let url = daemon.url.clone();
    let load = tokio::spawn(async move {
        let response = common::http::client().post(format!("{url}/vramgate/models/llama/load")).send().await.unwrap();
        let code = response.status().as_u16();
        (code, response.text().await.unwrap_or_default())
    });
    events.next_of("queued", 5 * SECOND).await;
    // Someone loads the model into Ollama directly.
    let loaded = common::http::client()
        .post(format!("{}/api/generate", ollama.url))
        .json(&json!({"model": "llama3.2:3b", "keep_alive": -1}))
        .send()
        .await
        .unwrap();
    assert_eq!(loaded.status(), 200);
    daemon.wait_model_state("llama", "ready", 5 * SECOND).await;
    let answered = tokio::time::timeout(3 * SECOND, load).await;
    let status = daemon.status().await;
    let (code, body) = answered
        .unwrap_or_else(|_| {
            panic!(
                "llama is ready (adopted), but the load waiting for it was not answered within 3 s: {}",
                model(&status, "llama")
            )
        })
        .unwrap();
    assert_eq!(code, 200, "{body}");
}

/// Docs: while Ollama does not answer, vramgate "waits 2 s, doubling up to 30 s". A
/// listener that closes every connection at once stands in for an Ollama that is down; the times
/// of the daemon's `/api/ps` tries show the pause doubling (only its first steps, to stay fast).
#[tokio::test]
async fn an_ollama_that_does_not_answer_is_retried_with_a_doubling_pause() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let tries = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let seen = tries.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let _ = stream.set_read_timeout(Some(SECOND));
            let mut head = [0u8; 256];
            let read = stream.read(&mut head).unwrap_or(0);
            if String::from_utf8_lossy(&head[..read]).starts_with("GET /api/ps") {
                seen.lock().unwrap().push(Instant::now());
            }
            // Dropped without an answer: the try fails.
        }
    });
    let _daemon = start(move |_| {
        format!("[models.llama]\nbackend = \"ollama\"\nollama_model = \"llama3.2:3b\"\nurl = \"{url}\"\n")
    });
    let end = Instant::now() + 15 * SECOND;
    while tries.lock().unwrap().len() < 3 {
        assert!(Instant::now() < end, "fewer than 3 tries of /api/ps within 15 s: {:?}", tries.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let tries = tries.lock().unwrap().clone();
    let (first, second) = (tries[1] - tries[0], tries[2] - tries[1]);
    // Lower bounds at the nominal pauses (a timer never fires early); generous upper bounds, as a
    // loaded machine only makes tries late. The cap and the reset are unit tests of the pure step.
    assert!(first >= Duration::from_millis(1950) && first <= Duration::from_millis(3500), "first pause {first:?}");
    assert!(
        second >= Duration::from_millis(3950) && second <= Duration::from_millis(6500),
        "the pause does not double: {first:?} then {second:?}"
    );
}

/// Used to fail: an Ollama that stops answering for a few seconds (busy, paused) and comes back leaves the
/// model vramgate had loaded there loaded forever (`keep_alive: -1`) behind vramgate's back:
/// the `Err` branch of `on_ollama_ps` marks the model `failed` without releasing it, and the
/// recovery path makes it `unloaded` although `/api/ps` still lists it. Its memory is then
/// foreign, listed with `managed_as: null`, and no TTL ever releases it.
#[tokio::test]
async fn an_ollama_that_pauses_and_returns_does_not_keep_vramgates_model_loaded_forever() {
    let sim = tempfile::tempdir().unwrap();
    let ollama = FakeOllama::start(sim.path());
    let url = ollama.url.clone();
    let sim_dir = sim.path().to_path_buf();
    let daemon = Daemon::start(move |_| {
        format!(
            "{}[models.llama]\nbackend = \"ollama\"\nollama_model = \"llama3.2:3b\"\nurl = \"{url}\"\n",
            sim_config(&sim_dir, 8000, "50ms", "reserve_mib = 0")
        )
    });
    assert_eq!(daemon.load("llama").await.0, 200);
    ollama.signal(nix::sys::signal::Signal::SIGSTOP);
    daemon.wait_model_state("llama", "failed", 15 * SECOND).await;
    ollama.signal(nix::sys::signal::Signal::SIGCONT);
    daemon.wait_for_status(20 * SECOND, "Ollama reachable again", |s| s["degraded"] == false).await;
    // Either vramgate adopts the model again (ready) or it releases it from Ollama.
    daemon
        .wait_for_status(5 * SECOND, "llama either managed again or gone from Ollama", |s| {
            let listed_unmanaged = s["ollama"][0]["models"]
                .as_array()
                .is_some_and(|m| m.iter().any(|m| m["name"] == "llama3.2:3b" && m["managed_as"].is_null()));
            model(s, "llama")["state"] == "ready" || !listed_unmanaged
        })
        .await;
}
