//! End-to-end: transitions that overlap (an unload during a demotion, a load during one, a
//! promotion while the CPU form streams, pressure, the resident cap, one-shot leases, an Ollama
//! that pauses), and hostile input. Each test was written in review against a bug it proved; its
//! doc comment says what used to go wrong.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::app::{Answer, App};
use common::ollama::FakeOllama;
use common::stand_in::{Body, Reply, StandIn, port_reporting_cmd};
use common::{Daemon, cpu_form, fake, fake_model, model_in as model, never_within, sim_config};
use futures_util::StreamExt;
use serde_json::{Value, json};

const SECOND: Duration = Duration::from_secs(1);

/// An 8000 MiB sim device without reserve, plus `rest`.
fn start(rest: impl Fn(&Path) -> String) -> Daemon {
    Daemon::start(|sim| format!("{}{}", sim_config(sim, 8000, "50ms", "reserve_mib = 0"), rest(sim)))
}

/// Collects every event of the daemon in the background.
fn collect_events(mut events: common::EventStream) -> Arc<Mutex<Vec<Value>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let out = seen.clone();
    tokio::spawn(async move {
        loop {
            let event = events.next(Duration::from_secs(3600)).await;
            out.lock().unwrap().push(event);
        }
    });
    seen
}

/// Used to fail: `vramgate unload` of a model while it is being demoted to the CPU is never answered, and
/// the model ends up ready on the CPU instead of unloaded. `request_unload` parks the caller in
/// `unload_waiters` of an `Unloading` model, but `on_released` with `then_cpu` starts the CPU
/// form and returns without looking at `unload_waiters`.
#[tokio::test]
async fn an_unload_during_a_demotion_is_answered_and_the_model_ends_unloaded() {
    let daemon = start(|sim| {
        format!(
            "{}[modes.quiet]\ncpu = [\"a\"]\n",
            // The GPU form takes 1.5 s to let go of its memory after SIGTERM: the demotion is slow.
            fake_model(sim, "a", 2000, "--stop-delay 1500ms", &format!("{}stop_timeout = \"5s\"", cpu_form(sim, "a")))
        )
    });
    assert_eq!(daemon.load("a").await.0, 200);
    let url = daemon.url.clone();
    let mode = tokio::spawn(async move {
        common::http::client().post(format!("{url}/vramgate/mode")).json(&json!({"mode": "quiet"})).send().await
    });
    daemon.wait_model_state("a", "unloading", 5 * SECOND).await;
    let url = daemon.url.clone();
    let unload = tokio::spawn(async move {
        let response = common::http::client().post(format!("{url}/vramgate/models/a/unload")).send().await.unwrap();
        let code = response.status().as_u16();
        (code, response.json::<Value>().await.unwrap_or_default())
    });
    // The demotion completes within ~1.5 s; the unload must be answered soon after.
    let answered = tokio::time::timeout(8 * SECOND, unload).await;
    let status = daemon.status().await;
    let (code, body) = answered
        .unwrap_or_else(|_| {
            panic!("`unload a` asked during its demotion was never answered; a is now: {}", model(&status, "a"))
        })
        .unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(daemon.model("a").await["state"], "unloaded");
    let _ = mode.await;
}

/// Used to fail: an external model whose app cannot carry out `cpu` is re-evicted and re-demoted in a
/// tight loop: the `demotion_failed` path in `on_ack` makes it `ready` on the GPU again and calls
/// `memory_released`, so the waiting load is reconsidered at once, evicts it again, and the app
/// gets another `cpu` instruction, as fast as it can answer.
#[tokio::test]
async fn a_failed_external_demotion_is_not_retried_in_a_tight_loop() {
    let daemon = start(|sim| {
        format!(
            "[models.clip]\nbackend = \"external\"\nvram = 1000\non_evict = \"cpu\"\npriority = 10\n{}",
            fake_model(sim, "big", 7500, "", "priority = 50\nttl = \"0\"")
        )
    });
    let app =
        App::attach(&daemon, "clip", 1000, |action| if action == "cpu" { Answer::Fail } else { Answer::Ok }).await;
    let (code, body) = daemon.load("clip").await;
    assert_eq!(code, 200, "{body}");
    let url = daemon.url.clone();
    let _big =
        tokio::spawn(
            async move { common::http::client().post(format!("{url}/vramgate/models/big/load")).send().await },
        );
    // The demotion must happen (big needs clip's room), or there is no retry to count.
    let asked = Instant::now() + 3 * SECOND;
    while !app.actions().iter().any(|a| a == "cpu") {
        assert!(
            Instant::now() < asked,
            "clip was never told `cpu` within 3 s to make room for big: {:?}",
            app.actions()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let end = Instant::now() + 3 * SECOND;
    while Instant::now() < end {
        let cpu = app.actions().iter().filter(|a| *a == "cpu").count();
        assert!(cpu <= 3, "the app got {cpu} `cpu` instructions within 3 s after refusing the first one");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.exit();
}

/// Used to fail: a model demoted under pressure (`on_evict = "cpu"`) is promoted straight back by
/// `promote_demoted`, which only asks the policy whether it fits (usable − foreign), not whether
/// the device would be back at the emergency level; pressure relief then demotes it again, and so
/// on: the model flaps between GPU and CPU for as long as the pressure lasts.
#[tokio::test]
async fn a_model_demoted_under_pressure_does_not_flap_between_gpu_and_cpu() {
    let daemon =
        start(|sim| fake_model(sim, "a", 1000, "", &format!("{}on_evict = \"cpu\"\nttl = \"0\"", cpu_form(sim, "a"))));
    assert_eq!(daemon.load("a").await.0, 200);
    let events = collect_events(daemon.events().await);
    // 1000 + 6700 of 8000 = 96 %: emergency. Without a, 84 %: below critical.
    daemon.claim("desktop", 6700);
    let count = |reason: &str| {
        events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| {
                e["type"] == "model_state" && e["model"] == "a" && e["to"] == "loading" && e["reason"] == reason
            })
            .count()
    };
    let end = Instant::now() + 5 * SECOND;
    while count("demoted") == 0 {
        assert!(Instant::now() < end, "a was not demoted under pressure within 5 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Watch for 3 s (or until it has clearly looped).
    let end = Instant::now() + 3 * SECOND;
    while Instant::now() < end && count("demoted") < 5 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (demotions, promotions) = (count("demoted"), count("promoted"));
    assert!(
        demotions <= 1 && promotions == 0,
        "under lasting pressure, a was demoted {demotions} times and promoted {promotions} times: \
         promoted back into the emergency, demoted again, and so on"
    );
}

/// Used to fail: a mode that puts a model on the CPU does not stick if that model had been demoted by an
/// eviction before: `place_cpu` answers "already there" without clearing `prefers_gpu`, so
/// `promote_demoted` moves it back to the GPU as soon as there is room, against the mode.
#[tokio::test]
async fn a_model_a_mode_put_on_the_cpu_is_not_promoted_back() {
    let daemon = start(|sim| {
        format!(
            "{}{}[modes.quiet]\ncpu = [\"a\"]\n",
            fake_model(sim, "a", 1000, "", &format!("{}on_evict = \"cpu\"\nttl = \"0\"", cpu_form(sim, "a"))),
            fake_model(sim, "big", 7500, "", "ttl = \"0\"")
        )
    });
    assert_eq!(daemon.load("a").await.0, 200);
    assert_eq!(daemon.load("big").await.0, 200);
    daemon.wait_for_status(5 * SECOND, "a demoted for big", |s| model(s, "a")["placement"] == "cpu").await;
    let (code, body) = daemon.post("/vramgate/mode", json!({"mode": "quiet"})).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(daemon.unload("big").await.0, 200);
    never_within(&daemon, 2 * SECOND, "mode quiet put a on the CPU, yet it went back to the GPU", |s| {
        model(s, "a")["state"] != "ready" || model(s, "a")["placement"] != "cpu"
    })
    .await;
}

/// Used to fail: a one-shot model lease on an external model that is not granted (here: it timed out)
/// leaves `oneshot` set; from then on a plain `vramgate load` of that model "succeeds" with no app
/// attached (ready on the GPU, its memory reserved for nobody), instead of failing with the
/// documented message that says how to attach.
#[tokio::test]
async fn a_failed_one_shot_lease_does_not_make_an_external_model_loadable_without_an_app() {
    let daemon = start(|_| "[models.clip]\nbackend = \"external\"\nvram = 1000\n".into());
    let (code, hold) = daemon.post("/vramgate/leases", json!({"vram": "7500MiB", "holder": "ffmpeg"})).await;
    assert_eq!(code, 201, "{hold}");
    let (code, body) = daemon.post("/vramgate/leases", json!({"model": "clip", "wait": "0", "pid": 1})).await;
    assert_eq!(code, 503, "{body}");
    let id = hold["id"].as_str().unwrap();
    let response = common::http::client().delete(format!("{}/vramgate/leases/{id}", daemon.url)).send().await.unwrap();
    assert_eq!(response.status(), 204);

    let (code, body) = daemon.load("clip").await;
    assert_eq!(code, 502, "loading an external model with no app attached must fail; got {body}");
    assert!(body.to_string().contains("attach"), "{body}");
}

/// Used to fail (README: "Held this way the model is in use, so it is never evicted or demoted"): a mode
/// demotes an external model held in the one-shot form. `place_cpu` → `demote(forced)` ignores
/// the lease's pin; with no app to instruct, the "demotion" completes at once and status says the
/// model is on the CPU, while the lease holder, who was never told, keeps using the GPU (now
/// counted as foreign).
#[tokio::test]
async fn a_mode_does_not_demote_an_external_model_held_by_a_one_shot_lease() {
    let daemon =
        start(|_| "[models.clip]\nbackend = \"external\"\nvram = 1000\n[modes.quiet]\ncpu = [\"clip\"]\n".into());
    let (code, grant) = daemon.post("/vramgate/leases", json!({"model": "clip", "ttl": "30s"})).await;
    assert_eq!(code, 201, "{grant}");
    assert_eq!(daemon.model("clip").await["placement"], "gpu");
    let (code, body) = daemon.post("/vramgate/mode", json!({"mode": "quiet"})).await;
    let clip = daemon.model("clip").await;
    assert_eq!(
        clip["placement"], "gpu",
        "a lease-held external model was demoted by a mode (mode answered {code}: {body})"
    );
    // The documented refusal: 409, saying the one-shot lease holds it (its holder has no name to
    // give: a one-shot lease is held by whoever took it).
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        code == 409 && message.contains("held by a lease in the one-shot form"),
        "mode quiet answered {code} ({body}); expected 409 saying a one-shot lease holds clip"
    );
}

/// Used to fail: a mode fails halfway when a model in its `cpu` list happens to be loading (a request, a
/// preload or an automatic promotion just started it): `place_cpu` answers 409 "is loading; place
/// it on the CPU once that is done" instead of waiting, although the README says each step is
/// waited for. The same happens to `initial_mode` with a preloaded model.
#[tokio::test]
async fn a_mode_waits_for_a_model_that_is_loading_instead_of_failing() {
    let daemon = start(|sim| {
        format!("{}[modes.quiet]\ncpu = [\"a\"]\n", fake_model(sim, "a", 2000, "--load-delay 1s", &cpu_form(sim, "a")))
    });
    let url = daemon.url.clone();
    let load =
        tokio::spawn(async move { common::http::client().post(format!("{url}/vramgate/models/a/load")).send().await });
    daemon.wait_model_state("a", "loading", 5 * SECOND).await;
    let (code, body) = daemon.post("/vramgate/mode", json!({"mode": "quiet"})).await;
    assert_eq!(code, 200, "mode quiet while a was loading: {body}");
    assert_eq!(daemon.model("a").await["placement"], "cpu");
    let _ = load.await;
}

/// Used to fail: `vramgate load` of a model while it is being demoted answers 200 with the model on the
/// CPU. The README says a load of a model on the CPU promotes it; here the load's caller joins the
/// demotion's `ready_waiters` and is answered when the CPU form is ready.
#[tokio::test]
async fn a_load_during_a_demotion_ends_with_the_model_on_the_gpu() {
    let daemon = start(|sim| {
        format!(
            "{}[modes.quiet]\ncpu = [\"a\"]\n",
            fake_model(sim, "a", 2000, "--stop-delay 1s", &format!("{}stop_timeout = \"5s\"", cpu_form(sim, "a")))
        )
    });
    assert_eq!(daemon.load("a").await.0, 200);
    let url = daemon.url.clone();
    let mode = tokio::spawn(async move {
        common::http::client().post(format!("{url}/vramgate/mode")).json(&json!({"mode": "quiet"})).send().await
    });
    daemon.wait_model_state("a", "unloading", 5 * SECOND).await;
    let (code, body) = daemon.load("a").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["placement"], "gpu", "`load a` answered with a on the CPU: {body}");
    let _ = mode.await;
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

/// Used to fail: `promote_demoted` ignores `[scheduler] resident_cap`: a model demoted to make room under
/// the cap is promoted straight back as soon as the memory allows it, so more models are resident
/// on the GPU than the cap permits.
#[tokio::test]
async fn a_promotion_does_not_exceed_the_resident_cap() {
    let daemon = Daemon::start(|sim| {
        format!(
            "{}[scheduler]\nresident_cap = 1\n{}{}",
            sim_config(sim, 8000, "50ms", "reserve_mib = 0"),
            fake_model(sim, "a", 1000, "", &format!("{}on_evict = \"cpu\"\nttl = \"0\"", cpu_form(sim, "a"))),
            fake_model(sim, "b", 1000, "", "ttl = \"0\"")
        )
    });
    assert_eq!(daemon.load("a").await.0, 200);
    let (code, body) = daemon.load("b").await;
    assert_eq!(code, 200, "{body}");
    never_within(&daemon, 2 * SECOND, "resident_cap = 1, yet two models hold the GPU", |s| {
        let on_gpu = s["models"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| {
                (m["state"] == "ready" && m["placement"] == "gpu") || (m["state"] == "loading" && m["device"] == 0)
            })
            .count();
        on_gpu > 1
    })
    .await;
}

/// Used to fail: promoting a model from its CPU form (`vramgate load` of a model a mode put on the CPU)
/// stops the CPU form even while a request is streaming from it: `start_load` closes the gate with
/// `close()` (not `close_if_idle`) and `start_process` stops the previous process at once. The
/// README: "While the answer is being sent the model is in use and never evicted".
#[tokio::test]
async fn a_promotion_does_not_break_a_request_streaming_from_the_cpu_form() {
    let daemon = start(|sim| {
        let cpu = format!(
            "cpu_cmd = \"{} --port ${{PORT}} --sim-dir {} --vram 0 --name a-cpu --token-delay 300ms\"\n",
            fake(),
            sim.display()
        );
        format!("{}[modes.quiet]\ncpu = [\"a\"]\n", fake_model(sim, "a", 1000, "", &cpu))
    });
    let (code, body) = daemon.post("/vramgate/mode", json!({"mode": "quiet"})).await;
    assert_eq!(code, 200, "{body}");
    let response = common::http::client()
        .post(format!("{}/v1/chat/completions", daemon.url))
        .json(&json!({"model": "a", "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let first = tokio::time::timeout(5 * SECOND, stream.next()).await.expect("a first chunk");
    assert!(first.is_some_and(|c| c.is_ok()));
    assert_eq!(daemon.model("a").await["in_use"], 1);
    // Promote it while the answer streams.
    let url = daemon.url.clone();
    let load = tokio::spawn(async move {
        common::http::client().post(format!("{url}/vramgate/models/a/load")).send().await.map(|r| r.status())
    });
    let mut body = String::new();
    let outcome = loop {
        match tokio::time::timeout(10 * SECOND, stream.next()).await {
            Err(_) => break Err("no chunk within 10 s".to_string()),
            Ok(None) => break Ok(()),
            Ok(Some(Err(e))) => break Err(format!("the stream broke: {e}")),
            Ok(Some(Ok(chunk))) => body.push_str(&String::from_utf8_lossy(&chunk)),
        }
    };
    assert!(
        outcome.is_ok() && body.contains("[DONE]"),
        "the answer streaming from a's CPU form was cut by the promotion: {outcome:?}; received: {body}"
    );
    let _ = load.await;
}

/// Used to fail (panic on input): the Ollama surface's translation of a streamed OpenAI answer trusts the
/// model server's `tool_calls[].index` and grows a vector to that length
/// (`src/api/ollama.rs`, `Progress::event`: `self.tool_calls.resize_with(index + 1, ..)`). An
/// index of 1e11 asks for terabytes: the allocation fails and the whole daemon aborts.
#[tokio::test]
async fn a_huge_tool_call_index_from_a_model_server_does_not_kill_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let (cmd, port_file) = port_reporting_cmd(dir.path());
    // Health is fine; a chat streams one tool call with index 1e11, then `[DONE]`.
    let call = json!({"index": 100_000_000_000u64, "id": "c", "type": "function",
                      "function": {"name": "f", "arguments": "{}"}});
    let chunk = json!({"choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": null}]});
    let events = format!("data: {chunk}\n\ndata: [DONE]\n\n").into_bytes();
    let _server = StandIn::on_reported_port(
        port_file,
        Arc::new(move |method, _, _| match method {
            "GET" => Reply::json(200, &json!({})),
            _ => Reply {
                status: 200,
                content_type: "text/event-stream",
                body: Body::Repeat { chunk: events.clone(), times: Some(1), then: Vec::new() },
            },
        }),
    );
    let daemon = start(move |_| {
        format!("[models.tools]\nbackend = \"process\"\ncmd = {cmd}\nhealth = \"/health\"\nvram = 100\n")
    });
    assert_eq!(daemon.load("tools").await.0, 200, "{}", daemon.log());
    let _ = common::http::client()
        .post(format!("{}/api/chat", daemon.url))
        .json(&json!({"model": "tools", "messages": [{"role": "user", "content": "call it"}]}))
        .timeout(10 * SECOND)
        .send()
        .await
        .map(|r| async move { r.text().await });
    let alive = common::http::get(format!("{}/vramgate/health", daemon.url)).await.is_ok_and(|r| r.status() == 200);
    let mut daemon = daemon;
    let exited = daemon.child.try_wait().ok().flatten();
    assert!(alive && exited.is_none(), "the daemon died ({exited:?}); its log ends with:\n{}", {
        let log = daemon.log();
        log.lines().rev().take(5).collect::<Vec<_>>().join("\n")
    });
}

/// Used to fail (same cause as `a_mode_waits_for_a_model_that_is_loading_instead_of_failing`):
/// `initial_mode` never applies when a model of its `cpu` list is also `preload`ed: the arbiter
/// starts the preload before it reads the mode's first command, so `place_cpu` always finds the
/// model `loading` and the mode fails with 409 (only logged); the daemon runs without a mode.
#[tokio::test]
async fn the_initial_mode_applies_even_when_one_of_its_cpu_models_is_preloaded() {
    let daemon = Daemon::start(|sim| {
        format!(
            "[server]\ninitial_mode = \"quiet\"\n{}{}[modes.quiet]\ncpu = [\"a\"]\n",
            sim_config(sim, 8000, "50ms", "reserve_mib = 0"),
            fake_model(sim, "a", 2000, "", &format!("{}preload = true", cpu_form(sim, "a")))
        )
    });
    let end = Instant::now() + 10 * SECOND;
    loop {
        let status = daemon.status().await;
        if status["mode"] == "quiet" {
            assert_eq!(model(&status, "a")["placement"], "cpu");
            break;
        }
        let log = daemon.log();
        if let Some(line) = log.lines().find(|l| l.contains("initial mode quiet") && l.contains("failed")) {
            panic!("initial_mode failed: {line}");
        }
        assert!(Instant::now() < end, "initial mode not applied within 10 s; status: {status:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Used to fail: a `/v1/...` request naming an external model is refused with 400 ("it runs inside the
/// app attached to it ... vramgate only places it") only after `pin_model` has loaded it: the
/// app is told to put the model on the GPU, the memory is reserved (evicting idle models if
/// needed), and it stays there until its TTL. A refused request should have no such effect.
#[tokio::test]
async fn a_refused_openai_request_for_an_external_model_does_not_load_it() {
    let daemon = start(|_| "[models.clip]\nbackend = \"external\"\nvram = 1000\n".into());
    let app = App::attach(&daemon, "clip", 1000, |_| Answer::Ok).await;
    let response = common::http::client()
        .post(format!("{}/v1/embeddings", daemon.url))
        .json(&json!({"model": "clip", "input": "a cat"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let clip = daemon.model("clip").await;
    assert_eq!(
        (clip["state"].as_str(), app.actions()),
        (Some("unloaded"), Vec::<String>::new()),
        "the refused request loaded clip onto the GPU: {clip}"
    );
    app.exit();
}
