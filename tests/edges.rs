//! End-to-end: edges of the Ollama surface (hostile bodies and streams, Ollama's own errors),
//! Ollama adoption, model leases against promotion and demotion, external models behind
//! `[aliases]`. Each test was written in review against a bug it proved; its doc comment says what
//! used to go wrong.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::app::{Answer, App};
use common::ollama::FakeOllama;
use common::stand_in::{Body, Reply, StandIn, port_reporting_cmd};
use common::{Daemon, cpu_form, fake_model, model_in as model, never_within, sim_config};
use futures_util::StreamExt;
use serde_json::{Value, json};

const SECOND: Duration = Duration::from_secs(1);

/// An 8000 MiB sim device without reserve, plus `rest`.
fn start(rest: impl Fn(&Path) -> String) -> Daemon {
    Daemon::start(|sim| format!("{}{}", sim_config(sim, 8000, "50ms", "reserve_mib = 0"), rest(sim)))
}

/// A process's peak resident memory (`VmHWM`), in MiB.
fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM");
    let kib: u64 = line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("VmHWM value");
    kib / 1024
}

/// The translation of a streamed OpenAI answer into NDJSON (`src/api/ollama.rs`, `SseParser`)
/// keeps everything a model server sends until an event ends: `feed` appends to `partial` until a
/// newline and `line` appends every `data:` line to `data` until a blank line, with no limit. A
/// model server that streams one endless event (a bug, a runaway generation, a hostile process)
/// makes the daemon hold all of it in memory; the non-streamed path stops at 1 GiB, this one
/// never does. Here 256 MiB of `data:` lines without a blank line grow the daemon by hundreds of
/// MiB while the OpenAI proxy would relay the same answer in constant memory.
#[tokio::test]
async fn a_streamed_answer_whose_event_never_ends_does_not_grow_the_daemon_without_bound() {
    let dir = tempfile::tempdir().unwrap();
    let (cmd, port_file) = port_reporting_cmd(dir.path());
    // Every GET (the health check) is fine; a POST answers 256 MiB of one event's data lines,
    // never a blank line.
    let _server = StandIn::on_reported_port(
        port_file,
        Arc::new(|method, _, _| match method {
            "GET" => Reply::json(200, &json!({})),
            _ => Reply {
                status: 200,
                content_type: "text/event-stream",
                body: Body::Repeat {
                    chunk: [b"data: ".as_slice(), &[b'x'; 65536], b"\n"].concat(),
                    times: Some(4096),
                    then: b"\n".to_vec(),
                },
            },
        }),
    );
    let daemon =
        start(move |_| format!("[models.m]\nbackend = \"process\"\ncmd = {cmd}\nhealth = \"/health\"\nvram = 100\n"));
    assert_eq!(daemon.load("m").await.0, 200, "{}", daemon.log());
    let pid = daemon.child.id();
    let before = peak_rss_mib(pid);
    let response = common::http::client()
        .post(format!("{}/api/chat", daemon.url))
        .json(&json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    let mut stream = response.bytes_stream();
    let _ = tokio::time::timeout(60 * SECOND, async { while let Some(Ok(_)) = stream.next().await {} }).await;
    let after = peak_rss_mib(pid);
    assert!(
        after.saturating_sub(before) < 64,
        "relaying one streamed answer raised the daemon's peak memory from {before} MiB to {after} MiB: \
         the SSE parser buffers an event without limit"
    );
}

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

/// The promotion drain (`start_process`: wait while `gate.in_use() > 0`, up to `ready_timeout`,
/// then stop the CPU form) counts a model lease's pin as a request that will finish, and stops
/// the CPU form under it when `ready_timeout` runs out. A model lease (README: "keeps it in use,
/// never evicted, while the lease is held; the grant carries its upstream URL") talks to that
/// upstream directly; after `vramgate load` its URL is dead while the lease is still held. The
/// same holds for a mode's forced demotion of a lease-held model (`demote(.., forced)` closes the
/// gate whatever the pins): only the external one-shot form was guarded.
#[tokio::test]
async fn a_promotion_does_not_stop_the_cpu_form_a_model_lease_holds() {
    let daemon = start(|sim| {
        format!(
            "{}[modes.quiet]\ncpu = [\"a\"]\n",
            fake_model(sim, "a", 1000, "", &format!("{}ready_timeout = \"2s\"\nttl = \"0\"", cpu_form(sim, "a")))
        )
    });
    let (code, body) = daemon.post("/vramgate/mode", json!({"mode": "quiet"})).await;
    assert_eq!(code, 200, "{body}");
    let (code, grant) =
        daemon.post("/vramgate/leases", json!({"model": "a", "holder": "direct-client", "ttl": "60s"})).await;
    assert_eq!(code, 201, "{grant}");
    let upstream = grant["upstream"].as_str().expect("the grant's upstream").to_string();
    let health = format!("{upstream}/health");
    assert_eq!(common::http::get(&health).await.unwrap().status(), 200);
    let url = daemon.url.clone();
    let load = tokio::spawn(async move {
        common::http::client().post(format!("{url}/vramgate/models/a/load")).send().await.map(|r| r.status())
    });
    let end = Instant::now() + 5 * SECOND;
    while Instant::now() < end {
        let alive = common::http::get(&health).await.is_ok_and(|r| r.status() == 200);
        assert!(
            alive,
            "the lease {} still holds a, but its upstream {upstream} (a's CPU form) was stopped by the promotion; \
             a is now: {}",
            grant["id"],
            model(&daemon.status().await, "a")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    load.abort();
}

/// Same cause, through a mode: `place_cpu` → `demote(i, "mode", forced = true)` closes the gate
/// and releases the GPU form although a model lease holds it (only the external one-shot form is
/// refused, with a Conflict). The lease holder's upstream URL goes dead while it holds the lease.
#[tokio::test]
async fn a_mode_does_not_demote_a_process_model_a_model_lease_holds() {
    let daemon = start(|sim| {
        format!(
            "{}[modes.quiet]\ncpu = [\"a\"]\n",
            fake_model(sim, "a", 1000, "", &format!("{}ttl = \"0\"", cpu_form(sim, "a")))
        )
    });
    let (code, grant) =
        daemon.post("/vramgate/leases", json!({"model": "a", "holder": "direct-client", "ttl": "60s"})).await;
    assert_eq!(code, 201, "{grant}");
    let upstream = grant["upstream"].as_str().expect("the grant's upstream").to_string();
    let (code, body) = daemon.post("/vramgate/mode", json!({"mode": "quiet"})).await;
    let alive = common::http::get(format!("{upstream}/health")).await.is_ok_and(|r| r.status() == 200);
    // The documented refusal: 409, naming who holds the model.
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        code == 409 && message.contains("holders: direct-client"),
        "mode quiet answered {code} ({body}); expected 409 naming the lease holder direct-client"
    );
    assert!(
        alive,
        "mode quiet (answered {code}: {body}) stopped a's GPU form at {upstream} while lease {} held it",
        grant["id"]
    );
}

/// The Ollama surface refuses a request for an external model "before anything loads" only when
/// the name is the model's own (`state.arbiter.gate(&name)`); an `[aliases]` name has no gate,
/// so `pin_model` chooses and loads the external model first (the app is told `gpu`, memory is
/// reserved) and the request is refused only afterwards (the `UpstreamKind::External` arm).
/// `src/api/openai.rs` has the same hole ("Reached through an alias").
#[tokio::test]
async fn an_ollama_request_through_an_alias_of_an_external_model_does_not_load_it() {
    let daemon =
        start(|_| "[models.clip]\nbackend = \"external\"\nvram = 1000\n[aliases]\nvision = [\"clip\"]\n".into());
    let app = App::attach(&daemon, "clip", 0, |_| Answer::Ok).await;
    let response = common::http::client()
        .post(format!("{}/api/chat", daemon.url))
        .json(&json!({"model": "vision", "messages": [{"role": "user", "content": "a cat"}]}))
        .timeout(10 * SECOND)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let clip = daemon.model("clip").await;
    let seen = app.actions();
    assert_eq!(
        (clip["state"].as_str(), seen.clone()),
        (Some("unloaded"), Vec::<String>::new()),
        "the refused request loaded clip onto the GPU: {clip}; the app was told {seen:?}"
    );
    app.exit();
}

/// README (The Ollama-compatible API): "an error status from the model server is passed on if it
/// is a 4xx and becomes 502 otherwise". That holds for translated requests
/// (`upstream_failure`), but `pass_through` returns an Ollama model's answer whatever its status:
/// Ollama's 500 (a runner that crashed, CUDA out of memory) reaches the client as 500.
#[tokio::test]
async fn a_5xx_from_an_ollama_model_becomes_502_as_the_readme_says() {
    let dir = tempfile::tempdir().unwrap();
    // An Ollama whose load and unload calls work (listed by /api/ps) and whose every other
    // answer is its 500 for a crashed runner.
    let loaded = Arc::new(Mutex::new(BTreeSet::<String>::new()));
    let (_ollama, url) = StandIn::start(Arc::new(move |method, path, body| {
        let body: Value = serde_json::from_slice(body).unwrap_or_default();
        let mut loaded = loaded.lock().unwrap();
        if method == "GET" {
            let models: Vec<Value> = loaded
                .iter()
                .map(|m| json!({"name": m, "model": m, "size": 1u64 << 30, "size_vram": 1u64 << 30}))
                .collect();
            return Reply::json(200, &json!({ "models": models }));
        }
        let name = body["model"].as_str().unwrap_or_default().to_string();
        if path == "/api/generate" && body["prompt"].as_str().is_none_or(str::is_empty) {
            if body["keep_alive"] == 0 {
                loaded.remove(&name);
            } else {
                loaded.insert(name.clone());
            }
            return Reply::json(200, &json!({"model": name, "response": "", "done": true}));
        }
        Reply::json(500, &json!({"error": "llama runner process has terminated: CUDA error: out of memory"}))
    }))
    .await;
    let sim_dir = dir.path().join("sim");
    let daemon = Daemon::start(move |_| {
        format!(
            "{}[models.llama]\nbackend = \"ollama\"\nollama_model = \"llama3.2:3b\"\nurl = \"{url}\"\n",
            sim_config(&sim_dir, 8000, "50ms", "reserve_mib = 0")
        )
    });
    let (code, body) = daemon.load("llama").await;
    assert_eq!(code, 200, "{body}");
    let response = common::http::client()
        .post(format!("{}/api/chat", daemon.url))
        .json(&json!({"model": "llama", "messages": [{"role": "user", "content": "hi"}], "stream": false}))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or_default();
    assert_eq!(status, 502, "Ollama's 500 was passed on as {status}: {body}");
    assert!(body["error"].as_str().is_some_and(|m| m.contains("out of memory")), "{body}");
}

/// The Ollama surface parses every request body into a `serde_json::Value` tree
/// (`read_object`) before it even looks at `model`; the OpenAI side only extracts `model`
/// without building anything. A `Value` costs 32 bytes and more per element, so a body of small
/// numbers within `proxy.max_body` (256 MiB by default, sized for audio uploads) costs the daemon
/// 16 to 32 times its size: one 256 MiB request is 4 to 8 GiB, and a few at once take the whole
/// daemon (and, through `PR_SET_PDEATHSIG`, every model server) down with the OOM killer. Here 32
/// MiB of `[0,0,...]` for an unknown model (answered 404) raises the peak by far more than the
/// body.
#[tokio::test]
async fn a_large_json_body_on_the_ollama_surface_costs_about_its_size_not_many_times_it() {
    let daemon = start(|_| String::new());
    let pid = daemon.child.id();
    let before = peak_rss_mib(pid);
    let mut body = String::with_capacity(33 << 20);
    body.push_str("{\"model\": \"nobody\", \"messages\": [], \"junk\": [0");
    while body.len() < 32 << 20 {
        body.push_str(",0");
    }
    body.push_str("]}");
    let response = common::http::client()
        .post(format!("{}/api/chat", daemon.url))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let after = peak_rss_mib(pid);
    assert!(
        after.saturating_sub(before) < 128,
        "one 32 MiB request on /api/chat raised the daemon's peak memory from {before} MiB to {after} MiB"
    );
}

/// A client that stops reading mid-answer (hung, stopped, gone without a FIN) is cut off after
/// `proxy.client_timeout`, and the model its answer pinned is free again: otherwise the server
/// would never poll that body again and the model could never be evicted.
#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_and_releases_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let (cmd, port_file) = port_reporting_cmd(dir.path());
    // Health is fine; a chat answers events of 64 KiB for as long as anyone reads them.
    let _server = StandIn::on_reported_port(
        port_file,
        Arc::new(|method, _, _| match method {
            "GET" => Reply::json(200, &json!({})),
            _ => Reply {
                status: 200,
                content_type: "text/event-stream",
                body: Body::Repeat {
                    chunk: [b"data: ".as_slice(), &[b'x'; 65536], b"\n\n"].concat(),
                    times: None,
                    then: Vec::new(),
                },
            },
        }),
    );
    let daemon = start(move |_| {
        format!("[proxy]\nclient_timeout = \"1s\"\n[models.flood]\nbackend = \"process\"\ncmd = {cmd}\nvram = 100\n")
    });
    let (code, body) = daemon.load("flood").await;
    assert_eq!(code, 200, "{body}");
    // A raw client that sends its request and then never reads a byte.
    let address = daemon.url.trim_start_matches("http://").to_string();
    let mut client = tokio::net::TcpStream::connect(&address).await.unwrap();
    let request = "{\"model\": \"flood\", \"stream\": true}";
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{request}",
        request.len()
    );
    tokio::io::AsyncWriteExt::write_all(&mut client, head.as_bytes()).await.unwrap();
    daemon.wait_for_status(10 * SECOND, "the flood in use", |s| model(s, "flood")["in_use"] == 1).await;
    daemon.wait_for_status(20 * SECOND, "the stuck client cut off", |s| model(s, "flood")["in_use"] == 0).await;
    drop(client);
}
